//! The metrics and health endpoint (`--metrics`, `[metrics] listen`) of a real host and of a
//! real exchange, scraped over HTTP while users talk: the counters move by what happened.

use anyhow::{bail, ensure};
use iim_client::Connection;
use iim_client::proto::MessageKind;
use iim_e2e::metrics::{Scrape, endpoint, get};
use iim_e2e::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

type Result = anyhow::Result<()>;

/// The endpoint configuration: any free port on loopback.
const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

/// The answer of `/readyz` once it is 200, or the last within [`STEP`]: a process prints the
/// line its port is read from just before it starts taking traffic, and says it is ready
/// from then.
async fn ready(addr: SocketAddr) -> anyhow::Result<(u16, String)> {
    let started = std::time::Instant::now();
    loop {
        let answer = get(addr, "/readyz").await?;
        if answer.0 == 200 || started.elapsed() > STEP {
            return Ok(answer);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Scrapes `addr` until `done` holds of a scrape (failing after [`STEP`]): for what the host
/// counts after it answered (acknowledgements, connections closing).
async fn until(
    addr: SocketAddr,
    what: &str,
    done: impl Fn(&Scrape) -> bool,
) -> anyhow::Result<Scrape> {
    let mut last = None;
    let waited = tokio::time::timeout(STEP, async {
        loop {
            let scrape = Scrape::of(addr).await?;
            if done(&scrape) {
                return Ok(scrape);
            }
            last = Some(scrape);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    match waited {
        Ok(scrape) => scrape,
        Err(_) => bail!("{what}: not within {STEP:?}; last scrape: {last:?}"),
    }
}

/// Receives `n` chat messages on `conn`, acknowledging each.
async fn receive(conn: &Connection, n: usize) -> Result {
    for _ in 0..n {
        let message = next_message(conn).await?;
        ensure!(message.kind == MessageKind::Chat, "got {message:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_host_s_counters_move_with_its_traffic_and_it_says_it_is_healthy_and_ready() -> Result {
    let chat = default_plugin("chat")?;
    let misbehave = test_plugin("misbehave")?;
    let config = format!("{METRICS}[plugins]\ncall_timeout_ms = 300\n");
    let host = HostProcess::start_with(
        &config,
        Plugins::Only(&[("chat", &chat), ("misbehave", &misbehave)]),
    )?;
    let addr = endpoint(&host).await?;
    assert_eq!(get(addr, "/healthz").await?, (200, "ok\n".into()));
    assert_eq!(ready(addr).await?, (200, "ready\n".into()));
    assert_eq!(get(addr, "/nothing").await?.0, 404);

    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let carol = host.register("carol").await?;
    let before = until(addr, "the registrations' connections closed", |s| {
        s.get("iim_connections") == 0.0
    })
    .await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let (b, _) = host.online(&bob, "phone").await?;
    let online = Scrape::of(addr).await?;
    assert_eq!(online.get("iim_connections"), 2.0);
    assert_eq!(online.get("iim_devices_online"), 2.0);

    // Chat while a scraper reads the endpoint over and over: every scrape is whole, and no
    // counter goes back.
    let scraping = Arc::new(AtomicBool::new(true));
    let scraper = tokio::spawn({
        let scraping = Arc::clone(&scraping);
        async move {
            let mut last = Scrape::of(addr).await?;
            let mut scrapes = 1;
            while scraping.load(Ordering::Relaxed) {
                let next = Scrape::of(addr).await?;
                for (name, value) in &last.0 {
                    if name.ends_with("_total") || name.ends_with("_count") {
                        ensure!(next.get(name) >= *value, "{name} went back from {value}");
                    }
                }
                last = next;
                scrapes += 1;
            }
            anyhow::Ok(scrapes)
        }
    });
    // Enough messages that each part of the message path is timed at least once: the host
    // times one section in 16 at random (a part with 400 sections goes untimed with a
    // chance of (15/16)^400, about 6e-12).
    const N: usize = 400;
    let receiving = receive(&b, N);
    let sending = async {
        for i in 0..N {
            a.send_text(&bob, &format!("message {i}")).await?;
        }
        anyhow::Ok(())
    };
    let (received, sent) = tokio::join!(receiving, sending);
    received?;
    sent?;
    scraping.store(false, Ordering::Relaxed);
    let scrapes = scraper.await??;
    assert!(scrapes >= 2, "only {scrapes} scrapes during the traffic");

    let n = N as f64;
    let after = until(addr, "every acknowledgement counted", |s| {
        s.get("iim_acks_total") - before.get("iim_acks_total") >= n
    })
    .await?;
    let moved = |name: &str| after.get(name) - before.get(name);
    assert_eq!(moved("iim_submissions_total{outcome=\"accepted\"}"), n);
    assert_eq!(moved("iim_submissions_total{outcome=\"refused\"}"), 0.0);
    assert_eq!(moved("iim_inbox_appends_total"), n);
    assert_eq!(moved("iim_deliveries_total"), n);
    assert_eq!(moved("iim_redeliveries_total"), 0.0);
    assert_eq!(moved("iim_acks_total"), n);
    let chat_calls = moved("iim_plugin_calls_total{plugin=\"chat\"}");
    assert_eq!(chat_calls, n, "one call per message");
    assert_eq!(
        moved("iim_plugin_call_seconds_count{plugin=\"chat\"}"),
        chat_calls
    );
    assert!(moved("iim_plugin_call_seconds_sum{plugin=\"chat\"}") > 0.0);
    assert_eq!(moved("iim_plugin_failures_total{plugin=\"chat\"}"), 0.0);
    // Every accepted submission was made durable by a commit round; a round syncs the disk
    // once or twice (sled's log file if sled wrote, the message log if it has new records),
    // and every one these submissions waited for had records to write.
    let commits = moved("iim_commit_seconds_count");
    assert!(commits >= 1.0, "{commits} commits");
    assert!(moved("iim_commit_round_size_sum") >= n, "{after:?}");
    let fsyncs = moved("iim_fsync_seconds_count");
    assert!(
        fsyncs >= 1.0 && fsyncs <= 2.0 * commits,
        "{fsyncs} disk syncs in {commits} commits"
    );
    // Where the CPU went: every part of the message path took some, and the process more
    // than their sum.
    let parts: f64 = ["store", "plugin", "frames"]
        .iter()
        .map(|part| {
            let busy = moved(&format!("iim_busy_seconds_total{{part=\"{part}\"}}"));
            assert!(busy > 0.0, "no CPU time counted for {part}");
            busy
        })
        .sum();
    assert!(moved("iim_cpu_seconds_total") > parts, "{after:?}");
    // Bob acknowledged everything: nothing waits in an inbox (once his cursor is saved).
    until(addr, "bob's inbox emptied", |s| {
        s.get("iim_inbox_waiting") == 0.0
    })
    .await?;

    // Messages to a user who is away wait in her inbox until her device takes them.
    for i in 0..5 {
        a.send_text(&carol, &format!("for later {i}")).await?;
    }
    // Appended once chat handled them, after they were accepted.
    until(addr, "five entries waiting", |s| {
        s.get("iim_inbox_waiting") == 5.0
    })
    .await?;
    // Her backlog, each acknowledged as it came.
    let (c, backlog) = host.online(&carol, "phone").await?;
    assert_eq!(backlog.len(), 5);
    until(addr, "carol's inbox emptied", |s| {
        s.get("iim_inbox_waiting") == 0.0
    })
    .await?;

    // A plugin that traps: each attempt counts as a failure, the event as one dead letter;
    // chat's counters are not touched.
    a.submit(
        iim_client::new_client_id(),
        MessageKind::Custom("misbehave".into()),
        std::slice::from_ref(&bob),
        b"trap",
    )
    .await?;
    let failed = until(addr, "the trap's dead letter counted", |s| {
        s.get("iim_plugin_dead_letters_total{plugin=\"misbehave\"}") == 1.0
    })
    .await?;
    assert_eq!(
        failed.get("iim_plugin_failures_total{plugin=\"misbehave\"}"),
        3.0,
        "three attempts"
    );
    assert_eq!(
        failed.get("iim_plugin_failures_total{plugin=\"chat\"}"),
        0.0
    );

    // Connections that end are counted out.
    for conn in [a, b, c] {
        conn.close().await;
    }
    until(addr, "the connections counted out", |s| {
        s.get("iim_connections") == 0.0 && s.get("iim_devices_online") == 0.0
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_exchange_shows_each_host_s_relay_outbox() -> Result {
    let toml = format!("role = \"exchange\"\n{METRICS}[network]\nsecret = \"{NETWORK_SECRET}\"\n");
    let exchange = HostProcess::start_with(&toml, Plugins::Default)?;
    let addr = endpoint(&exchange).await?;
    assert_eq!(ready(addr).await?, (200, "ready\n".into()));
    let mut hosts = Vec::new();
    for id in ["h1", "h2"] {
        hosts.push(HostProcess::start_in_network(
            &exchange,
            id,
            METRICS,
            Plugins::Default,
        )?);
    }
    let alice = hosts[0].register("alice").await?;
    let bob = hosts[1].register("bob").await?;
    let h1 = endpoint(&hosts[0]).await?;
    until(h1, "h1 joined", |s| s.get("iim_exchange_connected") == 1.0).await?;

    // h2 away: what h1's users send to its users waits in the exchange's outbox for it.
    hosts[1].kill9()?;
    let (a, _) = hosts[0].online(&alice, "phone").await?;
    for i in 0..3 {
        a.send_text(&bob, &format!("relayed {i}")).await?;
    }
    let waiting = until(addr, "three envelopes waiting for h2", |s| {
        s.get("iim_relay_waiting{peer=\"h2\"}") == 3.0
    })
    .await?;
    assert_eq!(waiting.get("iim_relay_waiting{peer=\"h1\"}"), 0.0);
    // h1's own outbox emptied: the exchange took them.
    until(h1, "h1's outbox emptied", |s| {
        s.get("iim_relay_waiting{peer=\"exchange\"}") == 0.0
    })
    .await?;

    // h2 back: they are relayed to it, and bob gets them.
    hosts[1].restart()?;
    let (b, backlog) = hosts[1].online(&bob, "phone").await?;
    let mut got = backlog.len();
    while got < 3 {
        next_message(&b).await?;
        got += 1;
    }
    until(addr, "h2's outbox emptied", |s| {
        s.get("iim_relay_waiting{peer=\"h2\"}") == 0.0
    })
    .await?;
    Ok(())
}
