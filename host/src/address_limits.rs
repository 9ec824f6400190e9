//! Limits per network address, beside those per connection: connections open at once and
//! opened per minute, password logins per minute and registrations per hour
//! (`[limits] address_*`, docs/security.md).
//!
//! A connection's limits do not stop a client that opens many: these do. An address is an IPv4
//! address, or an IPv6 /64 (one subscriber's network: a host there may use any address of it).
//! Addresses in `address_exempt` (by default loopback, where the operator's own tools run) are
//! not limited. Many users may share an address (a carrier's NAT, an office): the defaults are
//! sized for hundreds of them, far above one person's use and far below what a script does.

use iim_proto::TokenBucket;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Entries kept at most; past it, addresses whose allowances are whole and that have no
/// connection open are forgotten (they would start whole anyway).
const MAX_ADDRESSES: usize = 100_000;

/// What an address is limited as: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressKey(u128);

impl AddressKey {
    /// The key of `ip` (an IPv4-mapped IPv6 address is its IPv4 address).
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => Self((u128::from(v6) >> 64 << 64) | 1),
        }
    }
}

/// A network of addresses (`10.0.0.0/8`, `::1/128`) that is not limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    ip: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (text, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{text:?} is not an address or a network (a.b.c.d/n)"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Self { ip, prefix })
    }
}

impl Network {
    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let mask = |bits: u32, prefix: u8| -> u128 {
            if prefix == 0 {
                0
            } else {
                (u128::MAX << (128 - u32::from(prefix))) >> (128 - bits)
            }
        };
        match (self.ip, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let m = mask(32, self.prefix);
                u128::from(u32::from(net)) & m == u128::from(u32::from(ip)) & m
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let m = mask(128, self.prefix);
                u128::from(net) & m == u128::from(ip) & m
            }
            _ => false,
        }
    }
}

/// Why an address was refused: what it did too much, and when it may try again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("too many {what} from your address; try again in {} s", wait_ms.div_ceil(1000).max(1))]
pub struct Limited {
    /// What: "connections", "log-in attempts", "registrations".
    pub what: &'static str,
    /// Milliseconds until one more is allowed (for open connections: a guess).
    pub wait_ms: u64,
}

/// An allowance counted per `period_ms`: a [`TokenBucket`] fed a clock whose unit is a
/// thousandth of the period, so that its rate per second is a rate per period.
#[derive(Debug, Clone)]
struct Allowance {
    bucket: TokenBucket,
    unit_ms: u64,
}

impl Allowance {
    fn new(per_period: u32, burst: u32, period_ms: u64, now_ms: u64) -> Self {
        let unit_ms = (period_ms / 1000).max(1);
        Self {
            bucket: TokenBucket::new(per_period, burst, now_ms / unit_ms),
            unit_ms,
        }
    }

    fn take(&mut self, now_ms: u64, what: &'static str) -> Result<(), Limited> {
        let now = now_ms / self.unit_ms;
        if self.bucket.try_take(now) {
            return Ok(());
        }
        let wait_ms = self
            .bucket
            .wait_ms(now)
            .map_or(u64::MAX, |w| w.saturating_mul(self.unit_ms));
        Err(Limited { what, wait_ms })
    }

    fn is_whole(&self, now_ms: u64, burst: u32) -> bool {
        // Whole when `burst` tokens could be taken now: no waiting at any of them.
        let mut probe = self.bucket.clone();
        (0..burst).all(|_| probe.try_take(now_ms / self.unit_ms))
    }
}

/// One address's allowances and open connections.
#[derive(Debug)]
struct Entry {
    open: u32,
    connects: Allowance,
    logins: Allowance,
    registrations: Allowance,
}

/// The limits per address (`[limits] address_*` in the configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Networks not limited.
    pub exempt: Vec<Network>,
    /// Connections open at once.
    pub max_connections: u32,
    /// New connections per minute, and in a burst.
    pub connects_per_minute: u32,
    /// New connections in a burst.
    pub connect_burst: u32,
    /// Password log-ins per minute.
    pub logins_per_minute: u32,
    /// Password log-ins in a burst.
    pub login_burst: u32,
    /// Registrations per hour.
    pub registrations_per_hour: u32,
    /// Registrations in a burst.
    pub register_burst: u32,
}

/// The limits of every address, shared by the sessions.
#[derive(Debug)]
pub struct AddressLimits {
    limits: Settings,
    entries: Mutex<HashMap<AddressKey, Entry>>,
}

/// An open connection counted against its address, until dropped.
#[derive(Debug)]
pub struct OpenConnection {
    limits: Option<(Arc<AddressLimits>, AddressKey)>,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some((limits, key)) = self.limits.take() {
            let mut entries = limits.lock();
            if let Some(entry) = entries.get_mut(&key) {
                entry.open = entry.open.saturating_sub(1);
            }
        }
    }
}

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;

impl AddressLimits {
    /// No address has used anything yet.
    pub fn new(limits: Settings) -> Self {
        Self {
            limits,
            entries: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AddressKey, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn exempt(&self, ip: IpAddr) -> bool {
        self.limits.exempt.iter().any(|n| n.contains(ip))
    }

    /// Runs `f` on the entry of `ip` (made whole if new), unless `ip` is exempt.
    fn with<T>(
        &self,
        ip: IpAddr,
        now_ms: u64,
        f: impl FnOnce(&mut Entry) -> Result<T, Limited>,
    ) -> Option<Result<T, Limited>> {
        if self.exempt(ip) {
            return None;
        }
        let l = &self.limits;
        let mut entries = self.lock();
        if entries.len() >= MAX_ADDRESSES {
            entries.retain(|_, e| {
                e.open > 0
                    || !e.connects.is_whole(now_ms, l.connect_burst)
                    || !e.logins.is_whole(now_ms, l.login_burst)
                    || !e.registrations.is_whole(now_ms, l.register_burst)
            });
        }
        let entry = entries.entry(AddressKey::of(ip)).or_insert_with(|| Entry {
            open: 0,
            connects: Allowance::new(l.connects_per_minute, l.connect_burst, MINUTE_MS, now_ms),
            logins: Allowance::new(l.logins_per_minute, l.login_burst, MINUTE_MS, now_ms),
            registrations: Allowance::new(
                l.registrations_per_hour,
                l.register_burst,
                HOUR_MS,
                now_ms,
            ),
        });
        Some(f(entry))
    }

    /// A new connection from `ip`: counted until the returned guard drops, or refused if the
    /// address has too many open or opened too many lately.
    pub fn connect(self: &Arc<Self>, ip: IpAddr, now_ms: u64) -> Result<OpenConnection, Limited> {
        let max_open = self.limits.max_connections;
        let counted = self.with(ip, now_ms, |entry| {
            if entry.open >= max_open {
                return Err(Limited {
                    what: "open connections",
                    wait_ms: 10_000,
                });
            }
            entry.connects.take(now_ms, "new connections")?;
            entry.open += 1;
            Ok(())
        });
        match counted {
            None => Ok(OpenConnection { limits: None }),
            Some(Ok(())) => Ok(OpenConnection {
                limits: Some((Arc::clone(self), AddressKey::of(ip))),
            }),
            Some(Err(limited)) => Err(limited),
        }
    }

    /// A password log-in attempt from `ip`.
    pub fn login(&self, ip: IpAddr, now_ms: u64) -> Result<(), Limited> {
        self.with(ip, now_ms, |entry| {
            entry.logins.take(now_ms, "log-in attempts")
        })
        .unwrap_or(Ok(()))
    }

    /// A registration from `ip`.
    pub fn register(&self, ip: IpAddr, now_ms: u64) -> Result<(), Limited> {
        self.with(ip, now_ms, |entry| {
            entry.registrations.take(now_ms, "registrations")
        })
        .unwrap_or(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits() -> Settings {
        Settings {
            exempt: vec!["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()],
            max_connections: 2,
            connects_per_minute: 60,
            connect_burst: 3,
            logins_per_minute: 6,
            login_burst: 2,
            registrations_per_hour: 2,
            register_burst: 1,
        }
    }

    #[test]
    fn each_address_has_its_own_allowances_and_exempt_ones_none() {
        let limits = Arc::new(AddressLimits::new(limits()));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        // Two open at once; a third waits for one to close.
        let first = limits.connect(a, 0).unwrap();
        let _second = limits.connect(a, 0).unwrap();
        let refused = limits.connect(a, 0).unwrap_err();
        assert_eq!(refused.what, "open connections");
        assert!(
            limits.connect(b, 0).is_ok(),
            "another address is not affected"
        );
        drop(first);
        // Three opened in a burst, then one a second (60 a minute).
        let third = limits.connect(a, 0).unwrap();
        drop(third);
        // (Counted in thousandths of the period: 60 ms for a minute.)
        let refused = limits.connect(a, 0).unwrap_err();
        assert_eq!(refused.what, "new connections");
        assert!((1000..=1060).contains(&refused.wait_ms), "{refused:?}");
        assert!(limits.connect(a, 1060).is_ok());

        // Log-ins: 2 at once, then one every 10 s.
        assert!(limits.login(a, 0).is_ok() && limits.login(a, 0).is_ok());
        let refused = limits.login(a, 0).unwrap_err();
        assert!((10_000..=10_060).contains(&refused.wait_ms), "{refused:?}");
        assert!(
            refused
                .to_string()
                .starts_with("too many log-in attempts from your address; try again in 1"),
            "{refused}"
        );
        assert!(limits.login(a, 10_060).is_ok());
        // Registrations: 1, then one every 30 minutes.
        assert!(limits.register(a, 0).is_ok());
        let wait = limits.register(a, 0).unwrap_err().wait_ms;
        assert!((1_800_000..=1_803_600).contains(&wait), "{wait}");

        // Loopback is exempt, IPv4-mapped or not.
        for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.5"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!((0..10).all(|_| limits.login(ip, 0).is_ok()), "{ip}");
        }
    }

    #[test]
    fn an_ipv6_subscriber_is_one_address_and_a_mapped_ipv4_address_is_itself() {
        let x: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let z: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(AddressKey::of(x), AddressKey::of(y));
        assert_ne!(AddressKey::of(x), AddressKey::of(z));
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        assert_eq!(AddressKey::of(v4), AddressKey::of(mapped));
        let net: Network = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("every".parse::<Network>().is_err());
        let all: Network = "::/0".parse().unwrap();
        assert!(all.contains(x));
    }
}
