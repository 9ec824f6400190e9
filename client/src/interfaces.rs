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

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The watcher reports every address there is when it starts; they have all come once it has
/// been quiet this long, and what follows is a change.
const SETTLED: Duration = Duration::from_millis(100);

/// One change of network usually comes as several events (the old address goes, the new one
/// comes, an IPv6 address follows): they are taken together if they come this close.
const BURST: Duration = Duration::from_millis(50);

/// A running watch; dropping it stops it.
pub(crate) struct InterfaceWatch(tokio::task::AbortHandle);

impl Drop for InterfaceWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts watching; `changed` is notified after each change. `None` (and a warning in the
/// log) if the system does not let this process watch.
pub(crate) fn watch(changed: Arc<Notify>) -> Option<InterfaceWatch> {
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
        let failed = |error: std::io::Error| {
            tracing::warn!(%error, "watching the network interfaces failed; stopped");
        };
        // What is there already is no change.
        loop {
            match tokio::time::timeout(SETTLED, next_event(&mut watcher)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return failed(error),
                Err(_) => break,
            }
        }
        loop {
            match next_event(&mut watcher).await {
                Ok(event) if matters(&event) => {
                    tracing::debug!(?event, "network interface address changed");
                    while let Ok(Ok(_)) =
                        tokio::time::timeout(BURST, next_event(&mut watcher)).await
                    {
                    }
                    changed.notify_one();
                }
                Ok(_) => {}
                Err(error) => return failed(error),
            }
        }
    });
    Some(InterfaceWatch(task.abort_handle()))
}

async fn next_event(
    watcher: &mut if_watch::tokio::IfWatcher,
) -> std::io::Result<if_watch::IfEvent> {
    std::future::poll_fn(|cx| watcher.poll_if_event(cx)).await
}

/// Whether an address event can change the path to a host: not the loopback's, nor an IPv6
/// link-local address (which comes and goes with every interface and reaches no host).
fn matters(event: &if_watch::IfEvent) -> bool {
    let (if_watch::IfEvent::Up(net) | if_watch::IfEvent::Down(net)) = event;
    match net.addr() {
        IpAddr::V4(v4) => !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_link_local_addresses_are_no_change_of_network() {
        let net = |s: &str| s.parse::<if_watch::IpNet>().expect("net");
        assert!(!matters(&if_watch::IfEvent::Up(net("127.0.0.2/8"))));
        assert!(!matters(&if_watch::IfEvent::Down(net("::1/128"))));
        assert!(!matters(&if_watch::IfEvent::Up(net("fe80::1/64"))));
        assert!(matters(&if_watch::IfEvent::Up(net("10.1.2.3/24"))));
        assert!(matters(&if_watch::IfEvent::Down(net("2001:db8::5/64"))));
    }
}
