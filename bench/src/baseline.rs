//! The chat load against a baseline build of the host, in the same run: the `iim-host` and
//! chat plugin that `bench/baseline.sh` built at another commit (A) and this workspace's (B),
//! in alternate rounds (A B A B …), each against a fresh host with a fresh data directory, then
//! the raw relay once. Issue 18 measures its throughput goals this way, against its starting
//! commit.
//!
//! The summary takes the median of each variant's rounds (of msgs/s, p50 and p99 alike), and
//! the ratio current/baseline is that of the median throughputs; the per-round ratios (round
//! i's B over round i's A) are listed beside it.
//!
//! ```text
//! bash bench/baseline.sh [REV] [DIR]     # prints DIR
//! cargo run --release -p iim-bench -- --baseline DIR [--rounds 2] [--pairs 8] [--messages 4000]
//! ```

use crate::iim_run::{Build, Sealing, Variant};
use crate::stats::{self, Clock, Load, Summary};
use crate::{raw, rounds};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The figures of every round.
#[derive(Debug, Serialize)]
pub struct Figures {
    /// The baseline's worktree.
    pub baseline_dir: PathBuf,
    /// The baseline's commit (`git describe --always --dirty`), if git could tell.
    pub baseline_commit: Option<String>,
    /// This workspace's commit, `-dirty` with uncommitted changes, if git could tell.
    pub current_commit: Option<String>,
    /// Each round's run of the baseline.
    pub baseline: Vec<Summary>,
    /// Each round's run of this workspace's build.
    pub current: Vec<Summary>,
    /// The raw relay, once.
    pub raw: Summary,
}

/// The medians of one variant's rounds.
#[derive(Debug, Serialize)]
struct Medians {
    msgs_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// Its median throughput over the raw relay's.
    over_raw: f64,
}

impl Medians {
    fn of(runs: &[Summary], raw: &Summary) -> Self {
        let msgs_per_s = stats::median(runs.iter().map(|s| s.msgs_per_s));
        Self {
            msgs_per_s,
            p50_us: stats::median(runs.iter().map(|s| s.p50_us)),
            p99_us: stats::median(runs.iter().map(|s| s.p99_us)),
            over_raw: msgs_per_s / raw.msgs_per_s,
        }
    }
}

/// What `--json` prints: the load's fields (as the default benchmark prints them), then the
/// figures.
#[derive(Serialize)]
struct Json<'a> {
    #[serde(flatten)]
    load: &'a Load,
    rounds: usize,
    figures: &'a Figures,
    summary: &'static str,
    baseline_median: &'a Medians,
    current_median: &'a Medians,
    current_over_baseline: f64,
    current_over_baseline_per_round: &'a [f64],
}

/// Runs `rounds` rounds of `baseline` (made in `dir`: [`Build::other`]) and of this
/// workspace's build, then the raw relay.
pub async fn run(load: Load, rounds: u32, baseline: Build, dir: &Path) -> anyhow::Result<Figures> {
    let current = Build::Current;
    let variant = |name, build| Variant {
        name,
        build,
        extra: "",
        sealing: Sealing::Clear,
    };
    let variants = [variant("base", &baseline), variant("curr", &current)];
    let clock = Clock::new();
    let [baseline, current] =
        <[Vec<Summary>; 2]>::try_from(rounds::run(load, clock, rounds, &variants).await?)
            .map_err(|_| anyhow::anyhow!("the rounds did not run two variants"))?;
    let raw = raw::run(load, clock).await?;
    Ok(Figures {
        baseline_dir: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
        baseline_commit: describe(dir),
        current_commit: describe(&iim_e2e::workspace()),
        baseline,
        current,
        raw,
    })
}

/// The commit checked out in `dir`, `-dirty` if its tracked files changed.
fn describe(dir: &Path) -> Option<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

/// Prints every run, the medians and the ratios, as a table or as one JSON object.
pub fn report(load: &Load, figures: &Figures, json: bool) {
    let baseline = Medians::of(&figures.baseline, &figures.raw);
    let current = Medians::of(&figures.current, &figures.raw);
    let ratio = current.msgs_per_s / baseline.msgs_per_s;
    let per_round = rounds::ratios(&figures.current, &figures.baseline);
    if json {
        let value = Json {
            load,
            rounds: figures.baseline.len(),
            figures,
            summary: "median of the rounds",
            baseline_median: &baseline,
            current_median: &current,
            current_over_baseline: ratio,
            current_over_baseline_per_round: &per_round,
        };
        println!("{}", serde_json::to_string(&value).unwrap_or_default());
        return;
    }
    println!("{}", load.describe());
    let commit = |c: &Option<String>| c.clone().unwrap_or_else(|| "unknown commit".into());
    println!(
        "base: {} in {}; curr: {} (this workspace)",
        commit(&figures.baseline_commit),
        figures.baseline_dir.display(),
        commit(&figures.current_commit)
    );
    rounds::print(
        &[("base", &figures.baseline), ("curr", &figures.current)],
        &figures.raw,
    );
    println!(
        "median of {} rounds: {:>12} {:>10} {:>10} {:>10}",
        figures.baseline.len(),
        "msgs/s",
        "p50 µs",
        "p99 µs",
        "iim/raw"
    );
    for (name, m) in [("base", &baseline), ("curr", &current)] {
        println!(
            "{name:<19} {:>12.1} {:>10.1} {:>10.1} {:>10.4}",
            m.msgs_per_s, m.p50_us, m.p99_us, m.over_raw
        );
    }
    println!(
        "current/baseline (msgs/s, medians): {ratio:.3} (per round: {})",
        rounds::listed(&per_round)
    );
}
