//! An open load: every message due at a time fixed in advance, whatever the answers, and what
//! a run under it saw.
//!
//! Message `k` of sender `s` of `S` is due at `start + (k * S + s) / rate`: the senders take
//! turns, so the whole load is evenly spaced, `1 / rate` apart, and each sender's own messages
//! are `S / rate` apart. A pacer thread hands each sender its messages as they fall due; a
//! sender issues each at once, without waiting for anything the ones before it wait for. Its
//! body carries its *due* time, not the time it was issued, so a latency runs from when the
//! message should have gone: a host (or a load generator) that falls behind shows it in the
//! figures instead of slowing the load down (no coordinated omission).

use crate::stats::{self, Clock, Load, Tail, Tally};
use anyhow::bail;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long after its due time a message may be issued before it counts as late: the pacer
/// sleeps in the kernel, which wakes it some tens of microseconds after it asked.
pub const LATE: Duration = Duration::from_millis(1);
/// How long after the last message was due a run still waits for deliveries: what has not
/// arrived by then counts as undelivered.
pub const DRAIN: Duration = Duration::from_secs(5);
/// How long after the pacer starts the first message is due, so that the thread's start is
/// not the first message's delay.
const LEAD: Duration = Duration::from_millis(50);

/// When each message of an open-loop run is due.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Senders, each with a receiver of its own.
    pub senders: u32,
    /// Messages each sender sends.
    pub messages: u32,
    /// Messages offered per second, over all senders.
    pub rate: f64,
    /// Body size of every message, in bytes.
    pub body: usize,
    /// When the first message is due, on the run's clock (set by [`pace`]).
    start_ns: u64,
}

impl Schedule {
    /// `rate` messages per second from `senders` senders for `secs` seconds (at least one
    /// message each), with bodies of `body` bytes.
    pub fn new(senders: u32, rate: f64, secs: f64, body: usize) -> anyhow::Result<Self> {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("an offered rate of {rate} msgs/s: it must be above 0");
        }
        if senders == 0 {
            bail!("an open load needs at least one sender");
        }
        let per_sender = (rate * secs / f64::from(senders)).round();
        if per_sender > f64::from(u32::MAX) {
            bail!("{per_sender} messages per sender are too many");
        }
        Ok(Self {
            senders,
            messages: (per_sender as u32).max(1),
            rate,
            body,
            start_ns: 0,
        })
    }

    /// The same load's shape, for the helpers that take one (its window means nothing here).
    pub fn load(&self) -> Load {
        Load {
            pairs: self.senders,
            messages: self.messages,
            window: 1,
            body: self.body,
        }
    }

    /// Messages offered in all.
    pub fn total(&self) -> u64 {
        u64::from(self.senders) * u64::from(self.messages)
    }

    /// When message `index` of sender `sender` is due, on the run's clock.
    pub fn due_ns(&self, sender: u32, index: u32) -> u64 {
        let turn = u64::from(index) * u64::from(self.senders) + u64::from(sender);
        self.start_ns + (turn as f64 * 1e9 / self.rate) as u64
    }

    /// When the last message is due.
    pub fn end_ns(&self) -> u64 {
        self.due_ns(self.senders - 1, self.messages - 1)
    }

    /// When a run stops waiting for deliveries: [`DRAIN`] after the last message was due.
    pub fn until_ns(&self) -> u64 {
        self.end_ns() + u64::try_from(DRAIN.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Asks Linux to end the sleeps of the threads this process starts from now on as close to
/// the time they asked for as it can: a timer slack of 1 ns instead of the default 50 µs. The
/// pacer's sleeps then end about 40 µs after a message is due instead of 90 µs (measured on
/// the 2-core machine this was written on), which would count in every latency, the raw
/// relay's most. Call it before the runtime starts: a thread takes its slack from the thread
/// that started it, and `/proc/self/timerslack_ns` is the main thread's. Where the file cannot
/// be written the run goes on, and the lateness it reports shows what that cost.
pub fn tighten_timer_slack() {
    if let Err(e) = std::fs::write("/proc/self/timerslack_ns", "1") {
        eprintln!(
            "iim-bench: cannot lower the timer slack ({e}): the load generator will issue \
             messages later"
        );
    }
}

/// How long a receiver may wait for its next message: `stall`, or less if `until` (on
/// `clock`) comes first; none once it came. Without `until`, always `stall`.
pub fn wait(stall: Duration, clock: Clock, until: Option<u64>) -> Option<Duration> {
    match until {
        None => Some(stall),
        Some(until) => {
            let left = until.checked_sub(clock.now_ns()).filter(|&ns| ns > 0)?;
            Some(stall.min(Duration::from_nanos(left)))
        }
    }
}

/// A message falling due.
#[derive(Debug, Clone, Copy)]
pub struct Due {
    /// Its index among its sender's messages.
    pub index: u32,
    /// When it was due, on the run's clock.
    pub due_ns: u64,
}

/// Starts the schedule [`LEAD`] from now: returns it with its start set, and one channel per
/// sender on which a pacer thread hands the sender each of its messages as it falls due, in
/// order. The thread ends after the last message, or once every channel is dropped.
///
/// A thread of its own, sleeping in the kernel, rather than tokio's timer: tokio's timer
/// counts whole milliseconds, which would delay a message by up to one, more than the raw
/// relay's whole latency.
pub fn pace(
    schedule: Schedule,
    clock: Clock,
) -> anyhow::Result<(Schedule, Vec<mpsc::UnboundedReceiver<Due>>)> {
    let schedule = Schedule {
        start_ns: clock.now_ns() + u64::try_from(LEAD.as_nanos()).unwrap_or(0),
        ..schedule
    };
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..schedule.senders)
        .map(|_| mpsc::unbounded_channel())
        .unzip();
    std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || {
            for index in 0..schedule.messages {
                for (sender, channel) in (0u32..).zip(&senders) {
                    let due_ns = schedule.due_ns(sender, index);
                    let due = clock.instant_at(due_ns);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if channel.send(Due { index, due_ns }).is_err() && all_closed(&senders) {
                        return;
                    }
                }
            }
        })?;
    Ok((schedule, receivers))
}

fn all_closed(channels: &[mpsc::UnboundedSender<Due>]) -> bool {
    channels.iter().all(mpsc::UnboundedSender::is_closed)
}

/// What an open-loop run saw, before it is summed up.
#[derive(Debug)]
pub struct OpenRun {
    /// Each receiver's tally, in the senders' order.
    pub tallies: Vec<Tally>,
    /// How long after its due time each message was issued, in nanoseconds.
    pub lateness: Vec<u64>,
    /// When the run stopped waiting for deliveries.
    pub end_ns: u64,
}

/// What one task of an open-loop run hands back.
#[derive(Debug)]
pub enum Part {
    /// Receiver number `.0`'s tally.
    Received(usize, Tally),
    /// A sender's lateness, as [`issue`] recorded it.
    Sent(Vec<u64>),
}

/// The parts of an open-loop run as its tasks end, in any order.
#[derive(Debug)]
pub struct Parts {
    tallies: Vec<Option<Tally>>,
    lateness: Vec<u64>,
}

impl Parts {
    /// Nothing yet from `pairs` pairs.
    pub fn new(pairs: u32) -> Self {
        Self {
            tallies: (0..pairs).map(|_| None).collect(),
            lateness: Vec::new(),
        }
    }

    /// Adds what a task handed back.
    pub fn add(&mut self, part: Part) -> anyhow::Result<()> {
        match part {
            Part::Received(i, tally) => {
                *self
                    .tallies
                    .get_mut(i)
                    .ok_or_else(|| anyhow::anyhow!("no receiver {i}"))? = Some(tally);
            }
            Part::Sent(lateness) => self.lateness.extend(lateness),
        }
        Ok(())
    }

    /// The run, which stopped waiting for deliveries now; fails if a receiver is missing.
    pub fn finish(self, clock: Clock) -> anyhow::Result<OpenRun> {
        let end_ns = clock.now_ns();
        let tallies = self
            .tallies
            .into_iter()
            .collect::<Option<Vec<Tally>>>()
            .ok_or_else(|| anyhow::anyhow!("a receiver left no tally"))?;
        Ok(OpenRun {
            tallies,
            lateness: self.lateness,
            end_ns,
        })
    }
}

/// The figures of one open-loop run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct OpenFigures {
    /// Messages per second offered.
    pub offered_per_s: f64,
    /// Messages offered.
    pub offered: u64,
    /// Messages delivered before the run stopped waiting.
    pub delivered: u64,
    /// Messages delivered per second, from the first due time to the last delivery.
    pub delivered_per_s: f64,
    /// Latency from each message's due time to its delivery. Messages not delivered count
    /// with their age when the run stopped waiting ([`DRAIN`] after the last was due), so with
    /// any undelivered the tail is a lower bound.
    pub latency: Tail,
    /// Messages the load generator issued more than [`LATE`] after their due time.
    pub late: u64,
    /// How late the load generator issued its messages.
    pub issued_late: Tail,
}

impl OpenFigures {
    /// Sums up `run`, made on `schedule` (as [`pace`] started it).
    pub fn of(schedule: &Schedule, run: &OpenRun) -> Self {
        let mut latencies: Vec<u64> = Vec::with_capacity(run.lateness.len());
        let mut last_ns = schedule.start_ns;
        for (sender, tally) in (0u32..).zip(&run.tallies) {
            latencies.extend(&tally.latencies);
            latencies.extend(
                tally
                    .missing()
                    .map(|index| run.end_ns.saturating_sub(schedule.due_ns(sender, index))),
            );
            last_ns = last_ns.max(tally.last_ns);
        }
        latencies.sort_unstable();
        let delivered: u64 = run.tallies.iter().map(|t| u64::from(t.count())).sum();
        let secs = last_ns.saturating_sub(schedule.start_ns) as f64 / 1e9;
        let mut lateness = run.lateness.clone();
        lateness.sort_unstable();
        let late_ns = u64::try_from(LATE.as_nanos()).unwrap_or(u64::MAX);
        Self {
            offered_per_s: schedule.rate,
            offered: schedule.total(),
            delivered,
            delivered_per_s: if secs > 0.0 {
                delivered as f64 / secs
            } else {
                0.0
            },
            latency: Tail::of(&latencies),
            late: lateness.iter().filter(|&&ns| ns > late_ns).count() as u64,
            issued_late: Tail::of(&lateness),
        }
    }

    /// Messages offered but not delivered.
    pub fn undelivered(&self) -> u64 {
        self.offered.saturating_sub(self.delivered)
    }

    /// Whether the load generator kept its schedule: at most 1% of the messages issued more
    /// than [`LATE`] after their due time.
    pub fn kept_schedule(&self) -> bool {
        self.late * 100 <= self.offered
    }
}

/// Records in `lateness` how late message `due` is issued, now, and returns its body of
/// `body` bytes, which carries its due time: both transports' senders issue through this, so
/// that "issued" and "latency" mean the same for both.
pub fn issue(clock: Clock, due: Due, lateness: &mut Vec<u64>, body: usize) -> Vec<u8> {
    lateness.push(clock.now_ns().saturating_sub(due.due_ns));
    stats::body(body, due.due_ns, due.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_take_turns_evenly() -> anyhow::Result<()> {
        let schedule = Schedule::new(4, 1000.0, 2.0, 100)?;
        assert_eq!(schedule.messages, 500);
        assert_eq!(schedule.total(), 2000);
        // 1 ms apart over all senders, 4 ms apart for one.
        assert_eq!(schedule.due_ns(0, 0), 0);
        assert_eq!(schedule.due_ns(1, 0), 1_000_000);
        assert_eq!(schedule.due_ns(0, 1), 4_000_000);
        assert_eq!(schedule.end_ns(), 1_999_000_000);
        assert!(Schedule::new(4, 0.0, 2.0, 100).is_err());
        assert_eq!(Schedule::new(4, 1.0, 0.1, 100)?.messages, 1);
        Ok(())
    }

    #[test]
    fn undelivered_messages_count_with_their_age() -> anyhow::Result<()> {
        let schedule = Schedule::new(1, 1000.0, 0.002, 100)?;
        let mut tally = Tally::new(2);
        // Message 0, due at 0, arrived at 300 µs; message 1 (due at 1 ms) never did.
        tally.record(&stats::body(100, 0, 0), 300_000)?;
        let run = OpenRun {
            tallies: vec![tally],
            lateness: vec![10_000, 2_000_000],
            end_ns: 11_000_000,
        };
        let figures = OpenFigures::of(&schedule, &run);
        assert_eq!((figures.delivered, figures.undelivered()), (1, 1));
        assert_eq!(figures.latency.max_us, 10_000.0);
        assert_eq!(figures.late, 1);
        assert!(!figures.kept_schedule());
        Ok(())
    }
}
