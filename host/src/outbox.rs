//! The relay outbox (seed 000's `905`s): what this host sends users of other hosts, each
//! message once with the rows of the hosts it goes to, durably in the store until the exchange
//! acknowledges it. The IIM entry point puts envelopes in; the link to the exchange
//! ([`crate::network`]) sends them.

use crate::peer::PEER_MAX_FRAME;
use crate::store::{Store, StoreError};
use iim_proto::peer::{Envelope, HostFrame, RelayRow};
use iim_proto::{Address, CodecError, Message, encode_frame};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;

/// Why an envelope could not be put in the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// It would be larger than the link between hosts carries: it would stop the relay for
    /// good, so the send fails visibly instead.
    #[error("too large to relay: {0}")]
    TooLarge(#[source] CodecError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Relay counters since the host started, for the operator (`iim-host admin network`).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// `905` envelopes put in the outbox.
    pub envelopes_out: AtomicU64,
    /// `905` envelopes written to the exchange (again after a reconnect included).
    pub envelopes_sent: AtomicU64,
    /// `905` envelopes the exchange acknowledged.
    pub envelopes_acked: AtomicU64,
    /// `906` envelopes received and applied (repeats excluded).
    pub envelopes_in: AtomicU64,
    /// Inbox entries those made.
    pub relayed_deliveries: AtomicU64,
}

/// The relay outbox of a host.
pub struct RelayOutbox {
    store: Store,
    /// Wakes the link: something is in the outbox.
    pub ready: Notify,
    /// The relay counters.
    pub stats: RelayStats,
}

impl RelayOutbox {
    /// The outbox kept in `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            ready: Notify::new(),
            stats: RelayStats::default(),
        }
    }

    /// Puts `message` for users of other servers in the outbox, once, with their rows; the
    /// link sends it to the exchange. Durable after the next flush.
    pub fn push(
        &self,
        message: &Message,
        expires_at: Option<u64>,
        rows: Vec<RelayRow>,
    ) -> Result<(), OutboxError> {
        let probe = HostFrame::Relay {
            seq: u64::MAX,
            envelope: Envelope {
                message: message.clone(),
                expires_at,
                rows,
            },
        };
        encode_frame(&probe, PEER_MAX_FRAME).map_err(OutboxError::TooLarge)?;
        let HostFrame::Relay { envelope, .. } = probe else {
            unreachable!("built above");
        };
        self.store.network.relay_push(&envelope)?;
        self.stats.envelopes_out.fetch_add(1, Ordering::Relaxed);
        self.ready.notify_one();
        Ok(())
    }
}

/// The rows of `users` (users of other servers, or a group of another server) grouped by
/// home server, in first-seen order.
pub fn rows_by_server(users: impl IntoIterator<Item = (Address, String)>) -> Vec<RelayRow> {
    let mut rows: Vec<RelayRow> = Vec::new();
    for (user, server) in users {
        match rows.iter_mut().find(|r| r.server == server) {
            Some(row) => row.users.push(user),
            None => rows.push(RelayRow {
                server,
                users: vec![user],
            }),
        }
    }
    rows
}
