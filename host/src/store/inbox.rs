//! Inboxes, in the message log ([`super::hot`]): each user's ordered entries, their positions
//! and expiries, the high water of positions, the prune mark.
//!
//! An append is one record. [`Inbox::append`] chooses the position itself and hands it on while
//! it still holds the inbox, so that positions are chosen, stored and handed to online devices
//! in one order.

use super::hot::{Head, Journal};
use super::log::Located;
use super::{Cursors, Sealer, StoreError, decode, encode, keys};
use iim_proto::session::InboxSummary;
use iim_proto::{Message, MessageId, UserId};
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

/// How far past the stored high-water mark a user's positions resume after a start.
///
/// Entries are pushed to online devices before the store commits them (only the submission is
/// durable when it is accepted), so a crash can lose the last entries of an inbox after a
/// device has seen their positions. A device drops a position it has seen as a repeat, so
/// those positions must never be handed out again: a run starts each inbox this far above
/// what the store shows, far more than one inbox takes between two commit rounds. Positions
/// only need to grow, not to be contiguous.
pub const RESTART_GAP: u64 = 1 << 20;

/// Shards of the inbox heads, each under its own lock.
const HEAD_SHARDS: usize = 64;

/// An inbox entry whose time ran out ([`Inbox::due`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// When it expired, in ms since the Unix epoch.
    pub at: u64,
    /// Whose inbox.
    pub user: UserId,
    /// Its position.
    pub seq: u64,
    /// The message's id.
    pub id: MessageId,
}

/// The first byte of a pruned inbox entry: one every device acknowledged, kept without its
/// body until it expires. A whole entry begins with its message's id (a varint of a number
/// from 1), never with a zero byte.
const PRUNED: u8 = 0;

/// An inbox entry as stored.
enum Entry {
    /// The message, waiting for a device.
    Whole(Message),
    /// Every device acknowledged it: the message without its body.
    Pruned(Message),
}

impl Entry {
    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match bytes.split_first() {
            Some((&PRUNED, rest)) => decode("inbox", rest).map(Entry::Pruned),
            _ => decode("inbox", bytes).map(Entry::Whole),
        }
    }

    fn pruned(message: Message) -> Vec<u8> {
        let mut bytes = vec![PRUNED];
        bytes.extend(encode(&Message {
            body: Vec::new(),
            ..message
        }));
        bytes
    }

    fn whole(self) -> Option<Message> {
        match self {
            Entry::Whole(message) => Some(message),
            Entry::Pruned(_) => None,
        }
    }

    fn into_message(self) -> Message {
        match self {
            Entry::Whole(message) | Entry::Pruned(message) => message,
        }
    }
}

/// Every user's inbox.
#[derive(Clone)]
pub struct Inbox {
    journal: Arc<Journal>,
    cursors: Cursors,
    /// Entries are sealed.
    sealer: Sealer,
    /// The last position of each inbox seen since start, sharded by user. An append holds its
    /// shard's lock from choosing the position until the hand-off, so that positions are
    /// handed out, stored and delivered in one order.
    heads: Arc<Vec<Mutex<HashMap<UserId, u64>>>>,
}

impl Inbox {
    pub(super) fn new(journal: &Arc<Journal>, cursors: Cursors, sealer: &Sealer) -> Self {
        Self {
            journal: Arc::clone(journal),
            cursors,
            sealer: sealer.clone(),
            heads: Arc::new(
                (0..HEAD_SHARDS)
                    .map(|_| Mutex::new(HashMap::new()))
                    .collect(),
            ),
        }
    }

    /// Appends `message` to `user`'s inbox at its next position, unless it is there already (a
    /// dispatch done again), to leave it at `expires_at` if not acknowledged by then; then,
    /// still holding the inbox, calls `then` with the position (to hand the entry to the
    /// user's online devices). `None` if the message was in the inbox already.
    ///
    /// A new entry goes after the highest of: the inbox's last entry, every device's cursor,
    /// the highest position expiry took out, and (after a start) [`RESTART_GAP`] above them.
    pub fn append<T>(
        &self,
        user: &UserId,
        message: &Message,
        expires_at: Option<u64>,
        then: impl FnOnce(u64) -> T,
    ) -> Result<Option<T>, StoreError> {
        self.append_if(user, message, expires_at, || Ok(true), then)
    }

    /// [`Inbox::append`], if `exists` says, under the inbox's lock, that the user still
    /// exists: an account deleted meanwhile ([`Inbox::forget_user`] takes the same lock) gets
    /// no entry. `None` if the message was not appended.
    pub fn append_if<T>(
        &self,
        user: &UserId,
        message: &Message,
        expires_at: Option<u64>,
        exists: impl FnOnce() -> Result<bool, StoreError>,
        then: impl FnOnce(u64) -> T,
    ) -> Result<Option<T>, StoreError> {
        let _busy = crate::metrics::Busy::start(|m| &m.busy_store);
        let mut heads = self.shard(user).lock().unwrap_or_else(|p| p.into_inner());
        if !exists()? {
            return Ok(None);
        }
        let head = match heads.get(user) {
            Some(&head) => head,
            None => self.high_water(user)?.saturating_add(RESTART_GAP),
        };
        let seq = head + 1;
        if !self.append_at(user, seq, message, expires_at)? {
            return Ok(None);
        }
        heads.insert(user.clone(), seq);
        Ok(Some(then(seq)))
    }

    fn shard(&self, user: &UserId) -> &Mutex<HashMap<UserId, u64>> {
        let mut hasher = DefaultHasher::new();
        user.hash(&mut hasher);
        &self.heads[hasher.finish() as usize % HEAD_SHARDS]
    }

    /// Removes `user`'s inbox: its entries and marks (the account was deleted; its name, if
    /// registered again, starts a new inbox). Holds the inbox's lock, so that an append racing
    /// with the deletion either is removed here or finds the account gone
    /// ([`Inbox::append_if`]).
    pub fn forget_user(&self, user: &UserId) -> Result<(), StoreError> {
        let mut heads = self.shard(user).lock().unwrap_or_else(|p| p.into_inner());
        heads.remove(user);
        let mut inner = self.journal.lock();
        let before = inner.state.whole;
        inner.log(Head::ForgetInbox { user: user.clone() }, &[]);
        let waiting = before - inner.state.whole;
        drop(inner);
        crate::metrics::metrics().inbox_waiting.dec_by(waiting);
        Ok(())
    }

    /// How many entries of every inbox still hold their message, for the metric
    /// `inbox_waiting`.
    pub fn count_waiting(&self) -> Result<i64, StoreError> {
        Ok(self.journal.lock().state.whole)
    }

    /// Appends `message` to `user`'s inbox at `seq`, unless it is there already (a dispatch
    /// retried after a crash), to leave it at `expires_at` if not acknowledged by then.
    /// Returns whether it was appended.
    ///
    /// The caller serialises appends to one inbox and hands out increasing `seq`s.
    pub(super) fn append_at(
        &self,
        user: &UserId,
        seq: u64,
        message: &Message,
        expires_at: Option<u64>,
    ) -> Result<bool, StoreError> {
        if self.seq_of(user, message.id).is_some() {
            return Ok(false);
        }
        let key = keys::inbox(user, seq);
        let sealed = self.sealer.seal("inbox", &key, encode(message));
        let head = Head::Appended {
            user: user.clone(),
            seq,
            id: message.id.0,
            expires_at,
            pruned: false,
        };
        self.journal.lock().log(head, &sealed);
        let metrics = crate::metrics::metrics();
        metrics.inbox_appends.inc();
        metrics.inbox_waiting.inc();
        Ok(true)
    }

    /// The position of message `id` in `user`'s inbox, if it is there.
    fn seq_of(&self, user: &UserId, id: MessageId) -> Option<u64> {
        let inner = self.journal.lock();
        inner.state.users.get(user)?.ids.get(&id.0).copied()
    }

    /// Where the entry at `seq` of `user`'s inbox is, and whether it was pruned.
    fn locate(&self, user: &UserId, seq: u64) -> Result<Option<(Located, bool)>, StoreError> {
        let inner = self.journal.lock();
        let Some(entry) = inner
            .state
            .users
            .get(user)
            .and_then(|i| i.entries.get(&seq))
        else {
            return Ok(None);
        };
        Ok(Some((inner.tail.locate(entry.loc)?, entry.pruned)))
    }

    /// The entry at `seq` of `user`'s inbox, read from where [`Inbox::locate`] found it.
    fn read(&self, user: &UserId, seq: u64, located: Located) -> Result<Entry, StoreError> {
        let key = keys::inbox(user, seq);
        Entry::decode(&self.sealer.open("inbox", &key, &located.read()?)?)
    }

    fn stored(&self, user: &UserId, seq: u64) -> Result<Option<Entry>, StoreError> {
        let Some((located, pruned)) = self.locate(user, seq)? else {
            return Ok(None);
        };
        let entry = self.read(user, seq, located)?;
        Ok(Some(match entry {
            Entry::Whole(message) if pruned => Entry::Pruned(Message {
                body: Vec::new(),
                ..message
            }),
            entry => entry,
        }))
    }

    /// The entry at position `seq` of `user`'s inbox, if it is there and not pruned.
    pub fn entry(&self, user: &UserId, seq: u64) -> Result<Option<Message>, StoreError> {
        Ok(self.stored(user, seq)?.and_then(Entry::whole))
    }

    /// Prunes the entries of `user`'s inbox that every device of the user has acknowledged
    /// (every device with a cursor: one is made when a device first takes deliveries). A
    /// pruned entry keeps its position, id, kind and sender but not its body, and is read by
    /// no session; it leaves when it expires. Returns how many entries were pruned.
    pub fn prune(&self, user: &UserId) -> Result<usize, StoreError> {
        let _busy = crate::metrics::Busy::start(|m| &m.busy_store);
        let mut inner = self.journal.lock();
        let Some(inbox) = inner.state.users.get(user) else {
            return Ok(0);
        };
        let Some(through) = inbox.cursors.values().min().copied() else {
            return Ok(0);
        };
        if through <= inbox.pruned {
            return Ok(0);
        }
        let before = inner.state.whole;
        let head = Head::Pruned {
            user: user.clone(),
            through,
        };
        inner.log(head, &[]);
        let pruned = before - inner.state.whole;
        drop(inner);
        crate::metrics::metrics().inbox_waiting.dec_by(pruned);
        Ok(pruned as usize)
    }

    /// Up to `limit` inbox entries whose time ran out by `now`, the earliest first.
    pub fn due(&self, now: u64, limit: usize) -> Result<Vec<Expiry>, StoreError> {
        let inner = self.journal.lock();
        Ok(inner
            .state
            .expiries
            .iter()
            .take_while(|((at, _, _), _)| *at <= now)
            .take(limit)
            .map(|((at, user, seq), id)| Expiry {
                at: *at,
                user: user.clone(),
                seq: *seq,
                id: MessageId(*id),
            })
            .collect())
    }

    /// Takes an expired entry (whole or pruned) out of its inbox.
    pub fn expire(&self, expiry: &Expiry) -> Result<(), StoreError> {
        let mut inner = self.journal.lock();
        let before = inner.state.whole;
        let head = Head::Expired {
            user: expiry.user.clone(),
            seq: expiry.seq,
            id: expiry.id.0,
            at: expiry.at,
        };
        inner.log(head, &[]);
        let unacknowledged = before - inner.state.whole;
        drop(inner);
        if unacknowledged > 0 {
            let metrics = crate::metrics::metrics();
            metrics.expired.inc_by(unacknowledged as u64);
            metrics.inbox_waiting.dec_by(unacknowledged);
        }
        Ok(())
    }

    /// Whether any device of `user` has acknowledged inbox position `seq`.
    pub fn acknowledged_by_any(&self, user: &UserId, seq: u64) -> Result<bool, StoreError> {
        Ok(self
            .cursors
            .of_user(user)?
            .into_iter()
            .any(|cursor| cursor >= seq))
    }

    /// Message `id` if it is in `user`'s inbox; without its body if it was pruned
    /// ([`Inbox::prune`]).
    pub fn message(&self, user: &UserId, id: MessageId) -> Result<Option<Message>, StoreError> {
        let Some(seq) = self.seq_of(user, id) else {
            return Ok(None);
        };
        Ok(self
            .stored(user, seq)?
            .map(Entry::into_message)
            .filter(|message| message.id == id))
    }

    /// The entries of `user`'s inbox after position `after` that still hold their message, up
    /// to `limit` of them (all if `None`), where they are.
    fn whole_after(
        &self,
        user: &UserId,
        after: u64,
        limit: Option<usize>,
    ) -> Result<Vec<(u64, Located)>, StoreError> {
        let inner = self.journal.lock();
        let Some(inbox) = inner.state.users.get(user) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (seq, entry) in inbox.entries.range(after.saturating_add(1)..) {
            if limit.is_some_and(|limit| out.len() >= limit) {
                break;
            }
            if !entry.pruned {
                out.push((*seq, inner.tail.locate(entry.loc)?));
            }
        }
        Ok(out)
    }

    /// Up to `limit` entries of `user`'s inbox after position `after`, in order.
    pub fn after(
        &self,
        user: &UserId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Message)>, StoreError> {
        let _busy = crate::metrics::Busy::start(|m| &m.busy_store);
        let mut out = Vec::new();
        for (seq, located) in self.whole_after(user, after, Some(limit))? {
            if let Some(message) = self.read(user, seq, located)?.whole() {
                out.push((seq, message));
            }
        }
        Ok(out)
    }

    /// What waits in `user`'s inbox after position `after`: how many entries, the sum of their
    /// body sizes, the ids of the first `max_ids`, and the last position (`after` if none).
    pub fn summary(
        &self,
        user: &UserId,
        after: u64,
        max_ids: usize,
    ) -> Result<InboxSummary, StoreError> {
        let mut summary = InboxSummary {
            count: 0,
            bytes: 0,
            ids: Vec::new(),
            last: after,
        };
        for (seq, located) in self.whole_after(user, after, None)? {
            let Some(message) = self.read(user, seq, located)?.whole() else {
                continue;
            };
            summary.count += 1;
            summary.bytes += message.body.len() as u64;
            if summary.ids.len() < max_ids {
                summary.ids.push(message.id);
            }
            summary.last = seq;
        }
        Ok(summary)
    }

    /// The highest position used in `user`'s inbox or acknowledged by one of its devices.
    /// A new entry goes after it.
    pub fn high_water(&self, user: &UserId) -> Result<u64, StoreError> {
        let inner = self.journal.lock();
        let Some(inbox) = inner.state.users.get(user) else {
            return Ok(0);
        };
        let last = inbox.entries.keys().next_back().copied().unwrap_or(0);
        let acknowledged = inbox.cursors.values().max().copied().unwrap_or(0);
        Ok(last.max(inbox.high).max(acknowledged))
    }
}

/// An inbox entry's plain bytes without its body (what a pruned entry keeps).
pub(super) fn pruned_form(plain: &[u8]) -> Result<Vec<u8>, StoreError> {
    match Entry::decode(plain)? {
        Entry::Whole(message) | Entry::Pruned(message) => Ok(Entry::pruned(message)),
    }
}
