//! The metrics endpoint of a host started with `[metrics] listen` (README, "Metrics, health
//! and logs"): where it listens, and its samples.

use crate::{HostProcess, within};
use anyhow::{Context as _, anyhow, ensure};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the endpoint of `host` listens, from the line its log says it on.
pub async fn endpoint(host: &HostProcess) -> anyhow::Result<SocketAddr> {
    within("the metrics endpoint's address in the log", async {
        loop {
            let log = host.log();
            let found = log
                .lines()
                .find(|l| l.contains("metrics endpoint listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::parse::<SocketAddr>);
            if let Some(addr) = found {
                return addr.context("the address in the log");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?
}

/// One HTTP/1.1 GET: the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = within("connect", tokio::net::TcpStream::connect(addr)).await??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    within("response", stream.read_to_string(&mut response)).await??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of the head in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// A scrape: every sample, by its name with its labels (`iim_acks_total`,
/// `iim_plugin_calls_total{plugin="chat"}`).
#[derive(Debug)]
pub struct Scrape(pub HashMap<String, f64>);

impl Scrape {
    /// The samples `addr` serves now.
    pub async fn of(addr: SocketAddr) -> anyhow::Result<Self> {
        let (status, body) = get(addr, "/metrics").await?;
        ensure!(status == 200, "/metrics answered {status}: {body}");
        ensure!(
            body.ends_with("# EOF\n"),
            "the exposition did not end: {body}"
        );
        let mut samples = HashMap::new();
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line
                .rsplit_once(' ')
                .ok_or_else(|| anyhow!("a sample without a value: {line:?}"))?;
            let value = value
                .parse()
                .with_context(|| format!("the value of {line:?}"))?;
            samples.insert(name.to_owned(), value);
        }
        Ok(Self(samples))
    }

    /// A sample's value; absent (a family with no such labels yet) is 0.
    pub fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }
}
