//! `Fetch`, and the backlog of every delivery session: a connection becomes its device's
//! delivery session, and the inbox is read for it from the device's cursor, pushed (the
//! backlog of a receive session, a catch-up after its live queue overflowed) or a page per
//! `Fetch` (a paged session).

use crate::Host;
use crate::registry::Attachment;
use crate::store::StoreError;
use iim_proto::session::{Identity, InboxSummary};
use iim_proto::{Message, SessionMode, UserId};
use std::sync::Arc;

/// Makes this connection the delivery session of `who`'s device (ending the one it
/// replaces): its attachment to the registry, and the device's cursor with, for a paged
/// session, the summary of what waits after it.
pub fn attach(
    host: &Host,
    who: &Identity,
    mode: SessionMode,
) -> Result<(Attachment, u64, Option<InboxSummary>), StoreError> {
    // From now on the inbox keeps what this device has not acknowledged: before it can take a
    // live delivery that another device's ack could prune.
    host.store.cursors.add(&who.user, &who.device)?;
    // Attached before the backlog is read: an entry appended meanwhile reaches the session
    // both ways, and the session drops the second copy.
    let attachment = host.registry.attach(&who.user, &who.device);
    let read = || -> Result<_, StoreError> {
        let cursor = host.store.cursors.get(&who.user, &who.device)?;
        let summary = match mode {
            SessionMode::Paged => Some(host.store.inbox.summary(
                &who.user,
                cursor,
                iim_proto::BACKLOG_IDS,
            )?),
            _ => None,
        };
        Ok((cursor, summary))
    };
    match read() {
        Ok((cursor, summary)) => Ok((attachment, cursor, summary)),
        Err(e) => {
            host.registry.detach(&who.user, attachment.session);
            Err(e)
        }
    }
}

/// Up to `max` entries of `user`'s inbox after position `after`, in position order.
pub fn read(
    host: &Host,
    user: &UserId,
    after: u64,
    max: usize,
) -> Result<Vec<(u64, Arc<Message>)>, StoreError> {
    Ok(host
        .store
        .inbox
        .after(user, after, max)?
        .into_iter()
        .map(|(seq, message)| (seq, Arc::new(message)))
        .collect())
}
