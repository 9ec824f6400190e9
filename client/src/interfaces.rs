//! Watching the machine's network interfaces, so that a [`Device`](crate::Device) notices a
//! change of network at once (a phone moving from Wi-Fi to its mobile network, a laptop
//! docked): netlink on Linux, the system's notifications on macOS and Windows, through
//! `if-watch`.
//!
//! What matters is that an address came or went: the path to the host may have changed, and
//! the host keeps sending to the old address until the client says something from the new
//! one. The watch says so; the device then probes the path ([`Device::network_changed`]).
//!
//! [`Device::network_changed`]: crate::Device::network_changed

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// One change of network usually comes as several events (the new address comes, the old one
/// goes, an IPv6 address follows): they are taken together if they come this close, ...
const BURST: Duration = Duration::from_millis(50);

/// ... for this long at most, so that changes in quick succession (away and back) are each
/// acted on.
const BURST_MOST: Duration = Duration::from_millis(150);

/// A running watch; dropping it stops it.
pub(crate) struct InterfaceWatch(tokio::task::AbortHandle);

impl Drop for InterfaceWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts watching; `changed` is notified after each change of the machine's addresses. `None`
/// (and a warning in the log) if the system does not let this process watch.
///
/// A change is an address that comes or goes, against the addresses read when the watch
/// starts: the watcher first reports every address there is, and those are no change, however
/// late its task runs, and even if a real change comes in the same burst. A burst that moves
/// away and back again is a change too: the host may have followed the first move.
pub(crate) fn watch(changed: Arc<Notify>) -> Option<InterfaceWatch> {
    let mut known: BTreeSet<IpAddr> = match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces
            .iter()
            .map(if_addrs::Interface::ip)
            .filter(matters)
            .collect(),
        // Then the watcher's first report reads as a change: one probe too many.
        Err(error) => {
            tracing::debug!(%error, "cannot read the interfaces' addresses");
            BTreeSet::new()
        }
    };
    let mut watcher = match if_watch::tokio::IfWatcher::new() {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::warn!(
                %error,
                "cannot watch the network interfaces: a change of network is noticed only at \
                 the next keep-alive (an application can call Device::network_changed itself)"
            );
            return None;
        }
    };
    let task = tokio::spawn(async move {
        loop {
            let mut changed_any = match next_event(&mut watcher).await {
                Ok(event) => apply(&mut known, &event),
                Err(error) => {
                    tracing::warn!(%error, "watching the network interfaces failed; stopped");
                    return;
                }
            };
            let until = tokio::time::Instant::now() + BURST_MOST;
            while tokio::time::Instant::now() < until {
                match tokio::time::timeout(BURST, next_event(&mut watcher)).await {
                    Ok(Ok(event)) => changed_any |= apply(&mut known, &event),
                    _ => break,
                }
            }
            if changed_any {
                tracing::debug!(now = ?known, "network interface addresses changed");
                changed.notify_one();
            }
        }
    });
    Some(InterfaceWatch(task.abort_handle()))
}

/// `event` applied to the set of addresses `addrs`: whether it changed it.
fn apply(addrs: &mut BTreeSet<IpAddr>, event: &if_watch::IfEvent) -> bool {
    match event {
        if_watch::IfEvent::Up(net) if matters(&net.addr()) => addrs.insert(net.addr()),
        if_watch::IfEvent::Down(net) => addrs.remove(&net.addr()),
        if_watch::IfEvent::Up(_) => false,
    }
}

async fn next_event(
    watcher: &mut if_watch::tokio::IfWatcher,
) -> std::io::Result<if_watch::IfEvent> {
    std::future::poll_fn(|cx| watcher.poll_if_event(cx)).await
}

/// Whether an address can change the path to a host: not the loopback's, nor an IPv6
/// link-local address (which comes and goes with every interface and reaches no host).
fn matters(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_that_reach_hosts_change_the_set() {
        let net = |s: &str| s.parse::<if_watch::IpNet>().expect("net");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let up = |s: &str| if_watch::IfEvent::Up(net(s));
        let down = |s: &str| if_watch::IfEvent::Down(net(s));
        let mut addrs: BTreeSet<IpAddr> = [ip("10.1.2.3")].into();
        // The watcher's first report of what is there already changes nothing.
        assert!(!apply(&mut addrs, &up("10.1.2.3/24")));
        assert!(!apply(&mut addrs, &up("127.0.0.1/8")));
        assert!(!apply(&mut addrs, &up("fe80::1/64")));
        assert_eq!(addrs, [ip("10.1.2.3")].into());
        assert!(apply(&mut addrs, &up("2001:db8::5/64")));
        assert!(apply(&mut addrs, &down("10.1.2.3/24")));
        assert_eq!(addrs, [ip("2001:db8::5")].into());
        // Away and back is a change each way.
        assert!(apply(&mut addrs, &up("10.1.2.3/24")));
        assert!(apply(&mut addrs, &down("10.1.2.3/24")));
    }
}
