//! The cost of encryption at rest and of end-to-end encryption: the chat load of the default
//! benchmark against a host whose store is in the clear, one whose store is encrypted
//! (`storage.encrypt = true`, the default), and one whose store is encrypted while every
//! sender also seals each body end to end for its receiver (`iim_client::e2e::Keyring::seal`)
//! and every receiver opens it and checks it (`Keyring::open`). The three run in alternate
//! rounds (clear, encrypted, e2e, clear, encrypted, e2e, …) so that the machine's drift falls
//! on them alike, and the raw relay runs once as the baseline of the run.
//!
//! The e2e figure includes the clients' sealing and opening: the bench's clients run in this
//! process, on the same cores as the host, and a message counts as sent before it is sealed
//! and as received once opened. Their cards are exchanged in memory rather than through the
//! host's key directory. A message that does not open, or opens into other bytes than were
//! sealed, fails the run.
//!
//! ```text
//! cargo run --release -p iim-bench -- --encryption [ROUNDS] [--pairs 8] [--messages 2000]
//! ```

use crate::iim_run::{Build, Sealing, Variant};
use crate::stats::{Clock, Load, Summary};
use crate::{raw, rounds};
use serde::Serialize;

/// A host kept in the clear.
const CLEAR: &str = "[storage]\nencrypt = false\n";

/// The figures of every round.
#[derive(Debug, Serialize)]
pub struct Figures {
    /// Each round's run in the clear.
    pub clear: Vec<Summary>,
    /// Each round's run encrypted at rest.
    pub encrypted: Vec<Summary>,
    /// Each round's run encrypted at rest and end to end.
    pub end_to_end: Vec<Summary>,
    /// The raw relay, once.
    pub raw: Summary,
}

impl Figures {
    fn mean(values: impl ExactSizeIterator<Item = f64>) -> f64 {
        let n = values.len().max(1) as f64;
        values.sum::<f64>() / n
    }

    fn mean_rate(runs: &[Summary]) -> f64 {
        Self::mean(runs.iter().map(|s| s.msgs_per_s))
    }
}

/// Runs `rounds` rounds of the three, then the raw relay.
pub async fn run(load: Load, rounds: u32) -> anyhow::Result<Figures> {
    let clock = Clock::new();
    let variant = |name, extra, sealing| Variant {
        name,
        build: &Build::Current,
        extra,
        sealing,
    };
    let variants = [
        variant("clear", CLEAR, Sealing::Clear),
        variant("encrypted", "", Sealing::Clear),
        variant("e2e", "", Sealing::EndToEnd),
    ];
    let [clear, encrypted, end_to_end] =
        <[Vec<Summary>; 3]>::try_from(rounds::run(load, clock, rounds, &variants).await?)
            .map_err(|_| anyhow::anyhow!("the rounds did not run three variants"))?;
    let raw = raw::run(load, clock).await?;
    Ok(Figures {
        clear,
        encrypted,
        end_to_end,
        raw,
    })
}

/// Prints the figures: every run, then the ratios.
pub fn report(load: &Load, figures: &Figures, json: bool) {
    let at_rest = rounds::ratios(&figures.encrypted, &figures.clear);
    let e2e_over_encrypted = rounds::ratios(&figures.end_to_end, &figures.encrypted);
    let e2e_over_clear = rounds::ratios(&figures.end_to_end, &figures.clear);
    let mean = |ratios: &[f64]| Figures::mean(ratios.iter().copied());
    let sealed_body = figures.end_to_end.first().and_then(|s| s.sealed_body);
    if json {
        let value = serde_json::json!({
            "pairs": load.pairs,
            "messages_per_sender": load.messages,
            "body": load.body,
            "sealed_body": sealed_body,
            "figures": figures,
            "encrypted_over_clear": at_rest,
            "encrypted_over_clear_mean": mean(&at_rest),
            "encrypted_over_raw": Figures::mean_rate(&figures.encrypted) / figures.raw.msgs_per_s,
            "e2e_over_encrypted": e2e_over_encrypted,
            "e2e_over_encrypted_mean": mean(&e2e_over_encrypted),
            "e2e_over_clear": e2e_over_clear,
            "e2e_over_clear_mean": mean(&e2e_over_clear),
            "e2e_over_raw": Figures::mean_rate(&figures.end_to_end) / figures.raw.msgs_per_s,
        });
        println!("{value}");
        return;
    }
    println!("{}", load.describe());
    if let Some(sealed) = sealed_body {
        println!(
            "e2e: each body of {} bytes sealed into {sealed} bytes by its sender and opened by its \
             receiver, in the bench's clients on the same cores as the host",
            load.body
        );
    }
    rounds::print(
        &[
            ("clear", &figures.clear),
            ("enc", &figures.encrypted),
            ("e2e", &figures.end_to_end),
        ],
        &figures.raw,
    );
    println!(
        "encrypted/clear (msgs/s): {:.3} (per round: {}); cost of encryption at rest: {:.1}%",
        mean(&at_rest),
        rounds::listed(&at_rest),
        (1.0 - mean(&at_rest)) * 100.0
    );
    println!(
        "e2e/encrypted (msgs/s): {:.3} (per round: {}); cost of end-to-end encryption on top: \
         {:.1}%",
        mean(&e2e_over_encrypted),
        rounds::listed(&e2e_over_encrypted),
        (1.0 - mean(&e2e_over_encrypted)) * 100.0
    );
    println!(
        "e2e/clear (msgs/s): {:.3} (per round: {}); cost of both: {:.1}%",
        mean(&e2e_over_clear),
        rounds::listed(&e2e_over_clear),
        (1.0 - mean(&e2e_over_clear)) * 100.0
    );
    println!(
        "encrypted/raw (msgs/s): {:.4}; e2e/raw: {:.4}",
        Figures::mean_rate(&figures.encrypted) / figures.raw.msgs_per_s,
        Figures::mean_rate(&figures.end_to_end) / figures.raw.msgs_per_s
    );
}
