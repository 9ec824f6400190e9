//! Hands an accepted message to whatever handles its kind, and finishes its dispatch record.
//!
//! A message is recorded for dispatch in the same atomic store batch that accepts it, and the
//! record is removed only after the handler's `send` has put it in every inbox. A host that
//! stops in between dispatches it again at the next start ([`recover`]); `send` appends a
//! message to an inbox at most once, so the retry delivers nothing twice.

use crate::Host;
use crate::chat;
use crate::iim::IimError;
use iim_proto::{Message, MessageKind};

/// Whether this host has a handler for `kind`.
pub fn supports(kind: &MessageKind) -> bool {
    matches!(kind, MessageKind::Chat)
}

/// Runs the handler of `message`'s kind, then removes its dispatch record.
pub fn run(host: &Host, message: &Message) -> Result<(), IimError> {
    match message.kind {
        MessageKind::Chat => {
            chat::handle(&host.iim, message)?;
        }
        // Refused at submission; a record of another kind can only come from a newer build.
        ref other => {
            tracing::warn!(id = %message.id, kind = %other, "no handler for this kind; left for dispatch");
            return Ok(());
        }
    }
    host.store.finish_dispatch(message.id)?;
    Ok(())
}

/// Dispatches every message accepted before a stop whose dispatch did not finish.
/// Returns how many were dispatched.
pub fn recover(host: &Host) -> Result<usize, IimError> {
    retry_older_than(host, u64::MAX)
}

/// Dispatches again the messages accepted before `before_ms` (Unix milliseconds) whose
/// dispatch has not finished: a dispatch that failed while the host runs is retried, not left
/// until the next start. Returns how many were dispatched.
pub fn retry_older_than(host: &Host, before_ms: u64) -> Result<usize, IimError> {
    let pending = host.store.pending_dispatch()?;
    let mut done = 0;
    for message in pending.iter().filter(|m| m.sent_at < before_ms) {
        match run(host, message) {
            Ok(()) => done += 1,
            Err(e) => {
                tracing::error!(id = %message.id, error = %e, "recovered message not dispatched")
            }
        }
    }
    Ok(done)
}
