//! Variants of the chat load run in alternate rounds (A B C, A B C, …), each run against a
//! fresh host with a fresh data directory, so that the machine's drift over the whole falls on
//! every variant alike: what `--encryption` and `--baseline` share.

use crate::iim_run::{self, Variant};
use crate::stats::{self, Clock, Load, Summary};

/// Runs `rounds` rounds of `variants`; returns each variant's runs, in round order.
pub async fn run(
    load: Load,
    clock: Clock,
    rounds: u32,
    variants: &[Variant<'_>],
) -> anyhow::Result<Vec<Vec<Summary>>> {
    let mut runs: Vec<Vec<Summary>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (variant, runs) in variants.iter().zip(&mut runs) {
            let run = iim_run::run_with(load, clock, variant).await?;
            eprintln!(
                "round {round}: {} {:.0} msgs/s",
                variant.name, run.msgs_per_s
            );
            runs.push(run);
        }
    }
    Ok(runs)
}

/// Prints every run as a table in the order they ran, each row named by its variant's short
/// name and its round (`clear 1`), and the raw relay's run last.
pub fn print(variants: &[(&str, &[Summary])], raw: &Summary) {
    let rounds = variants
        .iter()
        .map(|(_, runs)| runs.len())
        .max()
        .unwrap_or(0);
    let mut rows: Vec<(String, &Summary)> = Vec::new();
    for round in 0..rounds {
        for (name, runs) in variants {
            if let Some(run) = runs.get(round) {
                rows.push((format!("{name} {}", round + 1), run));
            }
        }
    }
    let mut table: Vec<(&str, &Summary)> = rows.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    table.push(("raw", raw));
    stats::print_runs(&table);
}

/// The throughput of the runs `of` over that of the runs `over`, round by round.
pub fn ratios(of: &[Summary], over: &[Summary]) -> Vec<f64> {
    of.iter()
        .zip(over)
        .map(|(a, b)| a.msgs_per_s / b.msgs_per_s)
        .collect()
}

/// `ratios` for a line of text: `1.023, 0.998`.
pub fn listed(ratios: &[f64]) -> String {
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    each.join(", ")
}
