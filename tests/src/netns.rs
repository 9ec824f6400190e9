//! Network namespaces a test makes for itself: a host and a client on two sides of a virtual
//! Ethernet link, where the client's address can change as a phone's does.
//!
//! Making them takes root (or CAP_NET_ADMIN) and `ip` from iproute2. A test that cannot have
//! them says so and passes, unless `IIM_NETNS_REQUIRED=1` (set by `.ci/run`) asks that it
//! fail instead.

use anyhow::{Context, bail};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// `ip netns exec NAMESPACE PROGRAM`: `program` runs in `namespace` (`ip` becomes it, so its
/// process id is the program's).
pub fn exec(namespace: &str, program: &Path) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", namespace]).arg(program);
    command
}

/// Runs `ip ARGS`, failing with what it printed.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether this process can make namespaces; if not, and `IIM_NETNS_REQUIRED` is not set,
/// says why on stderr.
pub fn available() -> anyhow::Result<bool> {
    let probe = format!("iim-probe-{}", std::process::id());
    let made = ip(&["netns", "add", &probe]);
    let _ = ip(&["netns", "del", &probe]);
    match made {
        Ok(()) => Ok(true),
        Err(e) if std::env::var_os("IIM_NETNS_REQUIRED").is_some() => {
            Err(e.context("IIM_NETNS_REQUIRED is set but no network namespace can be made"))
        }
        Err(e) => {
            eprintln!("skipped: no network namespace can be made here ({e:#})");
            Ok(false)
        }
    }
}

/// Two namespaces joined by a veth pair: `host` side 10.77.0.1/24 and 10.78.0.1/24, `client`
/// side 10.77.0.2/24 with a default route over the link (so that it keeps reaching the host
/// whatever its address). The addresses are the same in every pair: each pair's namespaces
/// are a world of their own. Dropping it deletes both, and the link with them.
pub struct Link {
    /// The host's namespace.
    pub host: String,
    /// The client's namespace.
    pub client: String,
    /// The client side's interface.
    client_if: String,
}

impl Link {
    /// Makes the namespaces and the link.
    pub fn new() -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Unique across the tests of this run and other runs at the same time; an interface's
        // name has 15 bytes at most.
        let tag = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let link = Link {
            host: format!("iim-h-{tag}"),
            client: format!("iim-c-{tag}"),
            client_if: "iimc".into(),
        };
        let (host, client) = (link.host.as_str(), link.client.as_str());
        let veth_host = format!("ih{tag}");
        let veth_client = format!("ic{tag}");
        ip(&["netns", "add", host])?;
        ip(&["netns", "add", client])?;
        ip(&[
            "link",
            "add",
            &veth_host,
            "type",
            "veth",
            "peer",
            "name",
            &veth_client,
        ])?;
        ip(&["link", "set", &veth_host, "netns", host, "name", "iimh"])?;
        ip(&[
            "link",
            "set",
            &veth_client,
            "netns",
            client,
            "name",
            &link.client_if,
        ])?;
        for (ns, dev) in [(host, "iimh"), (client, "iimc")] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&["-n", host, "addr", "add", "10.77.0.1/24", "dev", "iimh"])?;
        ip(&["-n", host, "addr", "add", "10.78.0.1/24", "dev", "iimh"])?;
        ip(&["-n", client, "addr", "add", "10.77.0.2/24", "dev", "iimc"])?;
        ip(&["-n", client, "route", "add", "default", "dev", "iimc"])?;
        Ok(link)
    }

    /// The host side's first address.
    pub fn host_ip(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, 77, 0, 1)
    }

    /// The client moves from 10.77.0.2 to 10.78.0.2 (or back): the new address comes, then
    /// the old one goes, as when a phone changes networks. Returns the new address.
    pub fn move_client(&self) -> anyhow::Result<std::net::Ipv4Addr> {
        let (old, new) = (
            std::net::Ipv4Addr::new(10, 77, 0, 2),
            std::net::Ipv4Addr::new(10, 78, 0, 2),
        );
        let now_on_old = Command::new("ip")
            .args([
                "-n",
                &self.client,
                "-4",
                "addr",
                "show",
                "dev",
                &self.client_if,
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("{old}/")))
            .unwrap_or(true);
        let (from, to) = if now_on_old { (old, new) } else { (new, old) };
        let dev = self.client_if.as_str();
        ip(&[
            "-n",
            &self.client,
            "addr",
            "add",
            &format!("{to}/24"),
            "dev",
            dev,
        ])?;
        ip(&[
            "-n",
            &self.client,
            "addr",
            "del",
            &format!("{from}/24"),
            "dev",
            dev,
        ])?;
        Ok(to)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.host]);
        let _ = ip(&["netns", "del", &self.client]);
    }
}
