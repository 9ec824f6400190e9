//! Latency under a fixed load: messages offered at a fixed rate, independent of the answers,
//! through a host and through the raw relay.
//!
//! First the closed-loop load of the default benchmark (`--messages` per sender, `--window`)
//! measures the maximum of each: iim's msgs/s and the raw relay's. Then, for each fraction `f`
//! of `--at`, `f` times iim's maximum is offered for `--seconds`, first to a fresh host, then
//! to a fresh relay: the same absolute rate to both, so that each row compares iim with raw at
//! one offered rate. The schedule (`schedule.rs`) fixes when every message is due; a sender
//! issues it then, whether or not the ones before it were answered, and its latency runs from
//! that due time to its delivery (no coordinated omission). Each run waits at most
//! [`schedule::DRAIN`] after its last message was due; what has not arrived by then counts as
//! undelivered, with its age then as its latency.
//!
//! The load generator runs in this process, on the same cores as the host: it says how many
//! messages it issued more than [`schedule::LATE`] after their due time, and warns when that
//! is more than 1% of them (its figures then say more about the generator than the host).
//!
//! ```text
//! cargo run --release -p iim-bench -- open-loop [--pairs 8] [--seconds 10] [--at 0.25,0.5,0.75]
//!     [--body 100] [--messages 4000] [--window 32] [--json]
//! ```

use crate::schedule::{self, OpenFigures, Schedule};
use crate::stats::{Breakdown, Clock, Load, Summary};
use crate::{iim_run, raw};
use anyhow::bail;
use serde::Serialize;

/// The fraction of the maximum at which issue 18 sets its goal.
const GOAL_AT: f64 = 0.5;
/// The goal: iim's p99 at most this many times the raw relay's at the same offered rate...
const GOAL_RATIO: f64 = 2.0;
/// ... or at most this, in microseconds.
const GOAL_US: f64 = 10_000.0;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The closed-loop load that measures the maxima; its pairs are the open loads' senders.
    pub max_load: Load,
    /// Seconds each open-loop run offers messages for.
    pub seconds: f64,
    /// The offered rates, as fractions of iim's closed-loop maximum.
    pub at: Vec<f64>,
}

impl Shape {
    /// Fails unless every run would offer something for a while.
    pub fn check(&self) -> anyhow::Result<()> {
        self.max_load.check()?;
        if !(self.seconds.is_finite() && self.seconds > 0.0) {
            bail!("--seconds must be above 0");
        }
        if self.at.is_empty() || self.at.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
            bail!("--at takes one or more fractions above 0 (0.5: half the maximum)");
        }
        Ok(())
    }
}

/// The figures.
#[derive(Debug, Serialize)]
pub struct Figures {
    /// Senders (each with its receiver).
    pub pairs: u32,
    /// Seconds each open-loop run offered messages for.
    pub seconds: f64,
    /// Body size, in bytes.
    pub body: usize,
    /// iim's closed-loop run.
    pub iim_max: Summary,
    /// The raw relay's closed-loop run.
    pub raw_max: Summary,
    /// The open-loop runs, one pair per offered rate.
    pub rates: Vec<AtRate>,
}

/// iim and the raw relay at one offered rate.
#[derive(Debug, Serialize)]
pub struct AtRate {
    /// The offered rate as a fraction of iim's closed-loop maximum.
    pub fraction: f64,
    /// Messages per second offered, to both.
    pub offered_per_s: f64,
    /// Through a host.
    pub iim: OpenFigures,
    /// Where the host's CPU went.
    pub iim_breakdown: Breakdown,
    /// Through the raw relay.
    pub raw: OpenFigures,
}

impl AtRate {
    fn p99_ratio(&self) -> f64 {
        self.iim.latency.p99_us / self.raw.latency.p99_us
    }
}

/// Measures the maxima, then each offered rate.
pub async fn run(shape: Shape) -> anyhow::Result<Figures> {
    let clock = Clock::new();
    let load = shape.max_load;
    let iim_max = iim_run::run(load, clock).await?;
    eprintln!("iim: closed-loop maximum {:.0} msgs/s", iim_max.msgs_per_s);
    let raw_max = raw::run(load, clock).await?;
    eprintln!("raw: closed-loop maximum {:.0} msgs/s", raw_max.msgs_per_s);
    let mut rates = Vec::with_capacity(shape.at.len());
    for &fraction in &shape.at {
        let rate = fraction * iim_max.msgs_per_s;
        let offered = Schedule::new(load.pairs, rate, shape.seconds, load.body)?;
        eprintln!(
            "open loop at {:.0}% of iim's maximum: {rate:.0} msgs/s, {} messages per sender",
            fraction * 100.0,
            offered.messages
        );
        let (schedule, run, iim_breakdown) = iim_run::run_open(offered, clock).await?;
        let iim = OpenFigures::of(&schedule, &run);
        say("iim", &iim);
        eprintln!("iim: {}", iim_breakdown.describe().replace('\n', "\niim: "));
        let (schedule, run) = raw::run_open(offered, clock).await?;
        let raw = OpenFigures::of(&schedule, &run);
        say("raw", &raw);
        rates.push(AtRate {
            fraction,
            offered_per_s: rate,
            iim,
            iim_breakdown,
            raw,
        });
    }
    Ok(Figures {
        pairs: load.pairs,
        seconds: shape.seconds,
        body: load.body,
        iim_max,
        raw_max,
        rates,
    })
}

/// A progress line for one run, and the warning if the generator fell behind.
fn say(name: &str, f: &OpenFigures) {
    eprintln!(
        "{name}: delivered {} of {} ({:.0} msgs/s), p99 {:.0} µs",
        f.delivered, f.offered, f.delivered_per_s, f.latency.p99_us
    );
    if !f.kept_schedule() {
        eprintln!(
            "{name}: WARNING: the load generator issued {} of {} messages more than {} ms late \
             (p99 {:.0} µs late): it did not keep its schedule, and this run's figures say as much \
             about this process as about what it measures",
            f.late,
            f.offered,
            schedule::LATE.as_millis(),
            f.issued_late.p99_us
        );
    }
}

/// Issue 18's goal at 50% of the maximum, if that rate was measured.
#[derive(Debug, Serialize)]
struct Goal {
    iim_p99_us: f64,
    raw_p99_us: f64,
    ratio: f64,
    /// iim's messages not delivered in time: the goal is not met with any.
    undelivered: u64,
    met: bool,
}

impl Goal {
    fn of(figures: &Figures) -> Option<Self> {
        let at = figures
            .rates
            .iter()
            .find(|r| (r.fraction - GOAL_AT).abs() < 1e-9)?;
        let ratio = at.p99_ratio();
        Some(Self {
            iim_p99_us: at.iim.latency.p99_us,
            raw_p99_us: at.raw.latency.p99_us,
            ratio,
            undelivered: at.iim.undelivered(),
            met: at.iim.undelivered() == 0
                && (ratio <= GOAL_RATIO || at.iim.latency.p99_us <= GOAL_US),
        })
    }
}

/// Prints the figures as a table, or as one JSON object.
pub fn report(figures: &Figures, json: bool) {
    let goal = Goal::of(figures);
    if json {
        let rates: Vec<serde_json::Value> = figures
            .rates
            .iter()
            .map(|r| {
                serde_json::json!({
                    "fraction": r.fraction,
                    "offered_per_s": r.offered_per_s,
                    "iim": r.iim,
                    "raw": r.raw,
                    "iim_breakdown": r.iim_breakdown,
                    "p99_iim_over_raw": r.p99_ratio(),
                    "generator_kept_schedule": r.iim.kept_schedule() && r.raw.kept_schedule(),
                })
            })
            .collect();
        let value = serde_json::json!({
            "pairs": figures.pairs,
            "seconds": figures.seconds,
            "body": figures.body,
            "iim_max": figures.iim_max,
            "raw_max": figures.raw_max,
            "rates": rates,
            "goal_p99_at_half": goal,
        });
        println!("{value}");
        return;
    }
    println!(
        "open loop: {} senders, {} s per run, bodies of {} bytes; closed-loop maximum: iim {:.0} \
         msgs/s, raw {:.0} msgs/s (iim/raw {:.4})",
        figures.pairs,
        figures.seconds,
        figures.body,
        figures.iim_max.msgs_per_s,
        figures.raw_max.msgs_per_s,
        figures.iim_max.msgs_per_s / figures.raw_max.msgs_per_s
    );
    println!(
        "latency from each message's due time to its delivery, in µs; late: issued over {} ms \
         after its due time by this process",
        schedule::LATE.as_millis()
    );
    println!(
        "{:>5} {:>10} {:<4} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9}",
        "at",
        "offered/s",
        "run",
        "delivered/s",
        "p50",
        "p99",
        "p99.9",
        "max",
        "undeliv.",
        "late",
        "p99 late"
    );
    for r in &figures.rates {
        for (name, f) in [("iim", &r.iim), ("raw", &r.raw)] {
            println!(
                "{:>4.0}% {:>10.0} {:<4} {:>11.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9} {:>7} {:>9.0}",
                r.fraction * 100.0,
                r.offered_per_s,
                name,
                f.delivered_per_s,
                f.latency.p50_us,
                f.latency.p99_us,
                f.latency.p999_us,
                f.latency.max_us,
                f.undelivered(),
                f.late,
                f.issued_late.p99_us
            );
        }
    }
    println!("where the host's CPU went in each iim run:");
    for r in &figures.rates {
        let lines = r.iim_breakdown.describe().replace('\n', "\n      ");
        println!("{:>4.0}%  {lines}", r.fraction * 100.0);
    }
    let ratios: Vec<String> = figures
        .rates
        .iter()
        .map(|r| format!("{:.0}%: {:.2}", r.fraction * 100.0, r.p99_ratio()))
        .collect();
    println!(
        "p99 iim/raw at the same offered rate: {}",
        ratios.join(", ")
    );
    if figures
        .rates
        .iter()
        .any(|r| !(r.iim.kept_schedule() && r.raw.kept_schedule()))
    {
        println!(
            "WARNING: the load generator did not keep its schedule in every run (the late \
             column): those rows measure it as much as the host or the relay"
        );
    }
    if figures
        .rates
        .iter()
        .any(|r| r.iim.undelivered() + r.raw.undelivered() > 0)
    {
        println!(
            "WARNING: some messages were not delivered within {} s of the run's end; they count \
             with their age then, so those rows' tails are lower bounds",
            schedule::DRAIN.as_secs()
        );
    }
    match goal {
        Some(g) => println!(
            "goal, p99 at 50% of the maximum ≤ {GOAL_RATIO}× raw's or ≤ {} ms: {} (iim {:.0} µs, \
             raw {:.0} µs, ratio {:.2}{})",
            GOAL_US / 1e3,
            if g.met { "met" } else { "not met" },
            g.iim_p99_us,
            g.raw_p99_us,
            g.ratio,
            if g.undelivered > 0 {
                format!("; {} messages undelivered", g.undelivered)
            } else {
                String::new()
            }
        ),
        None => println!("goal, p99 at 50% of the maximum: not measured (--at has no 0.5)"),
    }
}
