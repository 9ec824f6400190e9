//! What both runs share: the load, the clock, the message body that carries its send time, the
//! receivers' tallies and the summary of a run.

use anyhow::{Context, anyhow, bail};
use iim_e2e::metrics::Scrape;
use std::time::{Duration, Instant};

/// Bytes at the start of every body that the benchmark reads back: the send time (16 hex
/// digits) and the message's index (8 hex digits). Hex keeps a chat body valid UTF-8 text.
pub const HEADER: usize = 24;

/// The load both runs carry.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Load {
    /// Sender/receiver pairs.
    pub pairs: u32,
    /// Messages each sender sends.
    #[serde(rename = "messages_per_sender")]
    pub messages: u32,
    /// Most submissions a sender has in flight.
    pub window: u32,
    /// Body size of every message, in bytes.
    pub body: usize,
}

impl Load {
    /// Fails unless the load sends something and its bodies can carry their header.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.pairs == 0 || self.messages == 0 || self.window == 0 {
            bail!("--pairs, --messages and --window must be at least 1");
        }
        if self.body < HEADER {
            bail!("--body must be at least {HEADER} bytes (the send time and index)");
        }
        Ok(())
    }

    /// One line saying what the load is.
    pub fn describe(&self) -> String {
        format!(
            "{} pairs x {} messages of {} bytes, window {} per sender",
            self.pairs, self.messages, self.body, self.window
        )
    }

    /// Messages every run must deliver.
    pub fn total(&self) -> u64 {
        u64::from(self.pairs) * u64::from(self.messages)
    }
}

/// The run's time base: every timestamp is nanoseconds since one [`Instant`].
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }

    /// Nanoseconds since the clock started.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant `ns` nanoseconds after the clock started.
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }
}

/// A body of `len` bytes (at least [`HEADER`]) carrying its send time and index.
pub fn body(len: usize, sent_ns: u64, index: u32) -> Vec<u8> {
    let mut bytes = format!("{sent_ns:016x}{index:08x}").into_bytes();
    bytes.resize(len.max(HEADER), b'.');
    bytes
}

/// The send time and index a body carries.
pub fn parse_body(body: &[u8]) -> anyhow::Result<(u64, u32)> {
    let head = body
        .get(..HEADER)
        .ok_or_else(|| anyhow!("body of {} bytes is too short", body.len()))?;
    let (sent, index) = head.split_at(16);
    let hex = |digits: &[u8]| -> anyhow::Result<u64> {
        let text = std::str::from_utf8(digits).context("body header is not text")?;
        u64::from_str_radix(text, 16).context("body header is not hex")
    };
    Ok((hex(sent)?, u32::try_from(hex(index)?)?))
}

/// What one receiver saw.
#[derive(Debug)]
pub struct Tally {
    seen: Vec<bool>,
    count: u32,
    /// End-to-end latency of each message, in nanoseconds.
    pub latencies: Vec<u64>,
    /// When the last message arrived.
    pub last_ns: u64,
}

impl Tally {
    /// A tally expecting the messages with indexes `0..expected`.
    pub fn new(expected: u32) -> Self {
        Self {
            seen: vec![false; expected as usize],
            count: 0,
            latencies: Vec::with_capacity(expected as usize),
            last_ns: 0,
        }
    }

    /// Records a message received at `now_ns`; fails on an unknown index or a duplicate.
    pub fn record(&mut self, body: &[u8], now_ns: u64) -> anyhow::Result<()> {
        let (sent, index) = parse_body(body)?;
        let Some(seen) = self.seen.get_mut(index as usize) else {
            bail!("message index {index} was never sent");
        };
        if *seen {
            bail!("message {index} delivered twice");
        }
        *seen = true;
        self.count += 1;
        self.latencies.push(now_ns.saturating_sub(sent));
        self.last_ns = self.last_ns.max(now_ns);
        Ok(())
    }

    /// How many distinct messages arrived.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether every expected message arrived.
    pub fn done(&self) -> bool {
        self.count as usize == self.seen.len()
    }

    /// The indexes of the expected messages that did not arrive.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0u32..)
            .zip(&self.seen)
            .filter(|(_, seen)| !**seen)
            .map(|(index, _)| index)
    }
}

/// The figures of one run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    /// Messages delivered.
    pub delivered: u64,
    /// Seconds from the first send to the last delivery.
    pub secs: f64,
    /// Delivered messages per second.
    pub msgs_per_s: f64,
    /// Median end-to-end latency, in microseconds.
    pub p50_us: f64,
    /// 99th percentile end-to-end latency, in microseconds.
    pub p99_us: f64,
    /// The size of a body as the host carried it, when the clients sealed the bodies end to
    /// end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealed_body: Option<usize>,
    /// Where the host's CPU went, when it served its metrics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breakdown: Option<Breakdown>,
}

/// Where a host's CPU went during a run, per delivered message, from the counters it keeps
/// (its metrics endpoint, scraped as the sending started and once everything was delivered):
/// the process's CPU time, and the time its threads spent in each part of the message path
/// (`iim_busy_seconds_total{part}`: thread CPU time, the host timing one section in 16).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Breakdown {
    /// The host's CPU time, µs per message.
    pub cpu_us: f64,
    /// Of it, the message path's store records (accept, append, acknowledge, read), µs.
    pub store_us: f64,
    /// Calls into plugins, with the imports they call, µs.
    pub plugin_us: f64,
    /// Sessions decoding, handling and encoding frames, µs.
    pub frames_us: f64,
    /// The rest: QUIC and TLS, the store's commits, scheduling, µs.
    pub other_us: f64,
    /// The host's CPU time over the run's wall time: cores it kept busy.
    pub cores: f64,
    /// The store's commit rounds during the run.
    pub commits: f64,
    /// Their mean duration, ms.
    pub commit_ms: f64,
    /// Disk syncs during the run.
    pub fsyncs: f64,
    /// Their mean duration, ms.
    pub fsync_ms: f64,
}

impl Breakdown {
    /// The breakdown of `run` from the scrapes `before` and `after` it.
    pub fn between(before: &Scrape, after: &Scrape, run: &Summary) -> Self {
        Self::of(before, after, run.delivered, run.secs)
    }

    /// The breakdown of a run that delivered `delivered` messages in `secs`, from the scrapes
    /// `before` and `after` it.
    pub fn of(before: &Scrape, after: &Scrape, delivered: u64, secs: f64) -> Self {
        let moved = |name: &str| after.get(name) - before.get(name);
        let per_message = |secs: f64| secs * 1e6 / delivered.max(1) as f64;
        let busy =
            |part: &str| per_message(moved(&format!("iim_busy_seconds_total{{part=\"{part}\"}}")));
        let cpu_secs = moved("iim_cpu_seconds_total");
        let (store_us, plugin_us, frames_us) = (busy("store"), busy("plugin"), busy("frames"));
        let cpu_us = per_message(cpu_secs);
        let mean_ms = |name: &str| {
            let count = moved(&format!("{name}_count"));
            (count, moved(&format!("{name}_sum")) * 1e3 / count.max(1.0))
        };
        let (commits, commit_ms) = mean_ms("iim_commit_seconds");
        let (fsyncs, fsync_ms) = mean_ms("iim_fsync_seconds");
        Self {
            commits,
            commit_ms,
            fsyncs,
            fsync_ms,
            cpu_us,
            store_us,
            plugin_us,
            frames_us,
            other_us: cpu_us - store_us - plugin_us - frames_us,
            cores: cpu_secs / secs.max(f64::MIN_POSITIVE),
        }
    }

    /// Two lines for a table: the CPU, then the commits.
    pub fn describe(&self) -> String {
        format!(
            "host CPU per message {:.1} µs ({:.2} cores): store {:.1} µs, plugin {:.1} µs, \
             frames {:.1} µs, other (QUIC, TLS, commits, scheduling) {:.1} µs\n\
             store commits {:.0} ({:.2} ms each), disk syncs {:.0} ({:.2} ms each)",
            self.cpu_us,
            self.cores,
            self.store_us,
            self.plugin_us,
            self.frames_us,
            self.other_us,
            self.commits,
            self.commit_ms,
            self.fsyncs,
            self.fsync_ms
        )
    }
}

impl Summary {
    /// Sums the tallies of a run whose first message was sent at `first_send_ns`; fails unless
    /// exactly `expected` messages were delivered.
    pub fn of(tallies: &[Tally], first_send_ns: u64, expected: u64) -> anyhow::Result<Self> {
        let delivered: u64 = tallies.iter().map(|t| u64::from(t.count())).sum();
        if delivered != expected {
            bail!("delivered {delivered} messages, expected {expected}");
        }
        let mut latencies: Vec<u64> = tallies
            .iter()
            .flat_map(|t| t.latencies.iter().copied())
            .collect();
        latencies.sort_unstable();
        let last = tallies.iter().map(|t| t.last_ns).max().unwrap_or(0);
        let secs = last.saturating_sub(first_send_ns) as f64 / 1e9;
        if secs <= 0.0 {
            bail!("the run took no measurable time");
        }
        Ok(Self {
            delivered,
            secs,
            msgs_per_s: delivered as f64 / secs,
            p50_us: percentile(&latencies, 0.50) as f64 / 1e3,
            p99_us: percentile(&latencies, 0.99) as f64 / 1e3,
            sealed_body: None,
            breakdown: None,
        })
    }
}

/// Prints runs as a table, one row per `(name, summary)`.
pub fn print_runs(runs: &[(&str, &Summary)]) {
    println!(
        "{:<10} {:>10} {:>8} {:>12} {:>10} {:>10}",
        "run", "delivered", "secs", "msgs/s", "p50 µs", "p99 µs"
    );
    for (name, s) in runs {
        println!(
            "{:<10} {:>10} {:>8.3} {:>12.1} {:>10.1} {:>10.1}",
            name, s.delivered, s.secs, s.msgs_per_s, s.p50_us, s.p99_us
        );
    }
}

/// The latencies of an open-loop run, where the tail is the point.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Tail {
    /// Median, in microseconds.
    pub p50_us: f64,
    /// 99th percentile, in microseconds.
    pub p99_us: f64,
    /// 99.9th percentile, in microseconds.
    pub p999_us: f64,
    /// The largest, in microseconds.
    pub max_us: f64,
}

impl Tail {
    /// The tail of `sorted` latencies in nanoseconds; zeros for none.
    pub fn of(sorted: &[u64]) -> Self {
        let us = |p: f64| percentile(sorted, p) as f64 / 1e3;
        Self {
            p50_us: us(0.50),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: us(1.0),
        }
    }
}

/// The median of `values` (the mean of the middle two of an even count); 0 for none.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.into_iter().collect();
    sorted.sort_unstable_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The nearest-rank percentile `p` (0..=1) of sorted values; 0 for none.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or(0)
}

/// The earliest time stored so far, for senders racing to record the first send.
#[derive(Debug)]
pub struct FirstSend(std::sync::atomic::AtomicU64);

impl FirstSend {
    /// Nothing recorded yet.
    pub fn new() -> Self {
        Self(std::sync::atomic::AtomicU64::new(u64::MAX))
    }

    /// Records a send at `ns`.
    pub fn record(&self, ns: u64) {
        self.0.fetch_min(ns, std::sync::atomic::Ordering::Relaxed);
    }

    /// The earliest send recorded.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trips() -> anyhow::Result<()> {
        let b = body(100, 123_456_789, 42);
        assert_eq!(b.len(), 100);
        assert!(std::str::from_utf8(&b).is_ok());
        assert_eq!(parse_body(&b)?, (123_456_789, 42));
        Ok(())
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn tail_and_median() {
        let v: Vec<u64> = (1..=1000).map(|n| n * 1000).collect();
        let tail = Tail::of(&v);
        assert_eq!(
            (tail.p50_us, tail.p99_us, tail.p999_us, tail.max_us),
            (500.0, 990.0, 999.0, 1000.0)
        );
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median([]), 0.0);
    }

    #[test]
    fn tally_refuses_duplicates() -> anyhow::Result<()> {
        let mut t = Tally::new(2);
        t.record(&body(30, 5, 0), 10)?;
        assert!(t.record(&body(30, 5, 0), 11).is_err());
        assert!(t.record(&body(30, 5, 2), 11).is_err());
        assert_eq!(t.missing().collect::<Vec<_>>(), vec![1]);
        t.record(&body(30, 6, 1), 20)?;
        assert!(t.done());
        assert_eq!(t.missing().count(), 0);
        assert_eq!(t.latencies, vec![5, 14]);
        Ok(())
    }
}
