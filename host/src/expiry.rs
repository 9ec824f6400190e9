//! Messages whose time ran out: taken out of the inboxes, and their senders told which
//! recipients never got them.
//!
//! Every inbox entry of a message with a time to live (its own, or the host's default
//! `limits.message_ttl_secs`) has an expiry record. Once a second the due records are swept:
//! each entry leaves its inbox (a pruned one, which every device acknowledged, quietly), and if
//! no device of the recipient had acknowledged it, the sender gets an `expired` receipt
//! (`docs/plugins.md`). Only chat and custom kinds are reported: receipts and presence
//! notifications expire quietly (a report about an expired report would never end).
//!
//! The receipt is sent before the entry is removed, and numbered once per (message,
//! recipient), so a crash between the two sends nothing twice: the next sweep finds the entry
//! again and the same receipt, which the sender's inbox already holds.

use crate::Host;
use crate::clock::now_ms;
use crate::iim::IimError;
use crate::store::{Expiry, StoreError};
use iim_proto::body::Receipt;
use iim_proto::{Message, MessageKind};
use std::sync::Arc;
use std::time::Duration;

/// How often due entries are swept.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Entries read from the store at a time.
const BATCH: usize = 256;

/// The namespace of the receipts' numbering records: not a valid plugin name, so no plugin's
/// records can collide with it.
const NUMBERING: &str = "host:expiry";

/// Why a sweep stopped.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An `expired` receipt could not be sent.
    #[error("cannot send an expired receipt: {0}")]
    Report(#[from] IimError),
}

/// What a sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Inbox entries that expired.
    pub expired: usize,
    /// `expired` receipts sent to senders.
    pub reported: usize,
}

/// Takes every entry due by `now` out of its inbox, telling senders.
pub fn sweep(host: &Host, now: u64) -> Result<Swept, SweepError> {
    let mut swept = Swept::default();
    loop {
        let due = host.store.inbox.due(now, BATCH)?;
        if due.is_empty() {
            return Ok(swept);
        }
        for expiry in due {
            let entry = host.store.inbox.entry(&expiry.user, expiry.seq)?;
            if let Some(message) = &entry {
                if reportable(message)
                    && !host
                        .store
                        .inbox
                        .acknowledged_by_any(&expiry.user, expiry.seq)?
                {
                    report(host, message, &expiry)?;
                    swept.reported += 1;
                }
                swept.expired += 1;
            }
            // The file a leaving message referenced no longer stays for it: before the entry
            // goes, so that a crash between the two leaves the entry to be swept again.
            host.store.files.unreferenced(&expiry.user, expiry.id.0)?;
            host.store.inbox.expire(&expiry)?;
        }
    }
}

/// Whether the sender hears of the message expiring: what a user wrote to another user.
fn reportable(message: &Message) -> bool {
    matches!(message.kind, MessageKind::Chat | MessageKind::Custom(_))
}

/// Sends the sender of `message` an `expired` receipt for the recipient of `expiry`.
fn report(host: &Host, message: &Message, expiry: &Expiry) -> Result<(), SweepError> {
    let mut key = message.id.0.to_be_bytes().to_vec();
    key.extend_from_slice(expiry.user.as_str().as_bytes());
    let body = Receipt::Expired {
        id: message.id.0,
        user: expiry.user.to_string(),
    };
    let notice = host
        .store
        .messages
        .effect(NUMBERING, &key, 0, |id| Message {
            id,
            kind: MessageKind::Receipt,
            from: message.from.clone(),
            from_device: message.from_device.clone(),
            to: vec![message.from.clone().into()],
            body: body.to_json(),
            sent_at: now_ms(),
        })?;
    let to = host.iim.resolve(std::slice::from_ref(&message.from))?;
    host.iim.send(&notice, &to)?;
    Ok(())
}

/// Removes the files that may leave by `now`: no inbox message references them, and none
/// was uploaded or referenced for `limits.file_ttl_secs`. Their records go first, then their
/// bytes, so that a crash between the two leaves only bytes nobody can name (a new upload of
/// the same file finds and keeps them). Returns how many files left.
pub fn collect_files(host: &Host, now: u64) -> Result<usize, SweepError> {
    let ttl = host.config.limits.file_ttl_secs;
    if ttl == 0 {
        return Ok(0);
    }
    let mut removed = 0;
    for sha256 in host.store.files.unused(now, ttl.saturating_mul(1000))? {
        if host.store.files.forget(&sha256)?.is_some() {
            let id = crate::blobs::FileId::from_digest(&sha256);
            if let Err(e) = host.blobs.remove(&id) {
                tracing::error!(error = %e, file = %id, "file forgotten but its bytes not removed");
            }
            removed += 1;
        }
    }
    Ok(removed)
}

/// Sweeps once a second until shutdown, and looks for files that may leave every
/// `limits.file_sweep_secs`.
pub async fn run(host: Arc<Host>) {
    let mut ticks = crate::clock::Ticks::new(host.shutdown.clone(), SWEEP_EVERY);
    let file_sweep = host.config.limits.file_sweep_secs.max(1);
    let mut seconds = 0u64;
    while ticks.next().await {
        seconds += 1;
        if seconds.is_multiple_of(file_sweep) {
            let collecting = Arc::clone(&host);
            match tokio::task::spawn_blocking(move || collect_files(&collecting, now_ms())).await {
                Ok(Ok(0)) => {}
                Ok(Ok(removed)) => tracing::info!(removed, "unused files removed"),
                Ok(Err(e)) => tracing::error!(error = %e, "file sweep failed"),
                Err(e) => tracing::error!(error = %e, "file sweep panicked"),
            }
        }
        let sweeping = Arc::clone(&host);
        match tokio::task::spawn_blocking(move || sweep(&sweeping, now_ms())).await {
            Ok(Ok(Swept { expired: 0, .. })) => {}
            Ok(Ok(swept)) => tracing::info!(
                expired = swept.expired,
                reported = swept.reported,
                "messages expired"
            ),
            Ok(Err(e)) => tracing::error!(error = %e, "expiry sweep failed"),
            Err(e) => tracing::error!(error = %e, "expiry sweep panicked"),
        }
    }
}
