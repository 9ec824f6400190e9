//! The cost of encryption at rest: the chat load of the default benchmark against a host whose
//! store is encrypted (`storage.encrypt = true`, the default) and one whose store is in the
//! clear, in alternate rounds (clear, encrypted, clear, encrypted, …) so that the machine's
//! drift falls on both alike, and once over the raw relay as the baseline of the run.
//!
//! ```text
//! cargo run --release -p iim-bench -- --encryption [ROUNDS] [--pairs 8] [--messages 2000]
//! ```

use crate::iim_run;
use crate::raw;
use crate::stats::{self, Clock, Load, Summary};
use serde::Serialize;

/// A host kept in the clear.
const CLEAR: &str = "[storage]\nencrypt = false\n";

/// The figures of every round.
#[derive(Debug, Serialize)]
pub struct Figures {
    /// Each round's run in the clear.
    pub clear: Vec<Summary>,
    /// Each round's run encrypted.
    pub encrypted: Vec<Summary>,
    /// The raw relay, once.
    pub raw: Summary,
}

impl Figures {
    /// Encrypted throughput over clear throughput, per round.
    fn ratios(&self) -> Vec<f64> {
        self.encrypted
            .iter()
            .zip(&self.clear)
            .map(|(e, c)| e.msgs_per_s / c.msgs_per_s)
            .collect()
    }

    fn mean(runs: &[Summary]) -> f64 {
        runs.iter().map(|s| s.msgs_per_s).sum::<f64>() / runs.len().max(1) as f64
    }
}

/// Runs `rounds` rounds of both, then the raw relay.
pub async fn run(load: Load, rounds: u32) -> anyhow::Result<Figures> {
    let clock = Clock::new();
    let (mut clear, mut encrypted) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let run = iim_run::run_with(load, clock, "clear", CLEAR).await?;
        eprintln!("round {round}: in the clear {:.0} msgs/s", run.msgs_per_s);
        clear.push(run);
        let run = iim_run::run_with(load, clock, "encrypted", "").await?;
        eprintln!("round {round}: encrypted {:.0} msgs/s", run.msgs_per_s);
        encrypted.push(run);
    }
    let raw = raw::run(load, clock).await?;
    Ok(Figures {
        clear,
        encrypted,
        raw,
    })
}

/// Prints the figures: every run, then the ratios.
pub fn report(load: &Load, figures: &Figures, json: bool) {
    let ratios = figures.ratios();
    let mean_ratio = ratios.iter().sum::<f64>() / ratios.len().max(1) as f64;
    if json {
        let value = serde_json::json!({
            "pairs": load.pairs,
            "messages_per_sender": load.messages,
            "figures": figures,
            "encrypted_over_clear": ratios,
            "encrypted_over_clear_mean": mean_ratio,
            "encrypted_over_raw": Figures::mean(&figures.encrypted) / figures.raw.msgs_per_s,
        });
        println!("{value}");
        return;
    }
    println!("{}", load.describe());
    let mut runs = Vec::new();
    let names: Vec<(String, String)> = (1..=figures.clear.len())
        .map(|i| (format!("clear {i}"), format!("enc {i}")))
        .collect();
    for (i, (clear, encrypted)) in names.iter().enumerate() {
        runs.push((clear.as_str(), &figures.clear[i]));
        runs.push((encrypted.as_str(), &figures.encrypted[i]));
    }
    runs.push(("raw", &figures.raw));
    stats::print_runs(&runs);
    let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    println!(
        "encrypted/clear (msgs/s): {mean_ratio:.3} (per round: {}); cost of encryption at rest: \
         {:.1}%",
        listed.join(", "),
        (1.0 - mean_ratio) * 100.0
    );
    println!(
        "encrypted/raw (msgs/s): {:.4}",
        Figures::mean(&figures.encrypted) / figures.raw.msgs_per_s
    );
}
