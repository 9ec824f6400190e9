//! Inboxes (the `inbox` tree): each user's ordered log of messages, its positions, and the
//! records that make it crash-safe (id records, expiry records, the high water of positions,
//! the prune mark).
//!
//! An append writes its expiry record, then its id record, then its entry (see the store's
//! module documentation for why this order is safe). [`Inbox::append`] chooses the position
//! itself and hands it on while it still holds the inbox, so that positions are chosen, stored
//! and handed to online devices in one order.

use super::{Cursors, Sealer, StoreError, decode, decode_u64, encode, get_u64, keys};
use iim_proto::session::InboxSummary;
use iim_proto::{Message, MessageId, UserId};
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

/// How far past the stored high-water mark a user's positions resume after a start.
///
/// Entries are pushed to online devices before the store flushes them (only the submission is
/// durable when it is accepted), so a crash can lose the last entries of an inbox after a
/// device has seen their positions. A device drops a position it has seen as a repeat, so
/// those positions must never be handed out again: a run starts each inbox this far above
/// what the store shows, far more than one inbox takes between two flushes (sled flushes at
/// least every 500 ms). Positions only need to grow, not to be contiguous.
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

    fn message(&self) -> &Message {
        match self {
            Entry::Whole(message) | Entry::Pruned(message) => message,
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
    pub(super) tree: sled::Tree,
    cursors: Cursors,
    /// Entries are sealed.
    sealer: Sealer,
    /// The last position of each inbox seen since start, sharded by user. An append holds its
    /// shard's lock from choosing the position until the hand-off, so that positions are
    /// handed out, stored and delivered in one order.
    heads: Arc<Vec<Mutex<HashMap<UserId, u64>>>>,
}

impl Inbox {
    pub(super) fn new(
        db: &sled::Db,
        cursors: Cursors,
        sealer: &Sealer,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            tree: db.open_tree("inbox")?,
            cursors,
            sealer: sealer.clone(),
            heads: Arc::new(
                (0..HEAD_SHARDS)
                    .map(|_| Mutex::new(HashMap::new()))
                    .collect(),
            ),
        })
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

    /// Removes `user`'s inbox: its entries, their id and expiry records, its marks (the
    /// account was deleted; its name, if registered again, starts a new inbox). Holds the
    /// inbox's lock, so that an append racing with the deletion either is removed here or
    /// finds the account gone ([`Inbox::append_if`]).
    pub fn forget_user(&self, user: &UserId) -> Result<(), StoreError> {
        let mut heads = self.shard(user).lock().unwrap_or_else(|p| p.into_inner());
        heads.remove(user);
        let (start, end) = keys::inbox_range(user, 0);
        let waiting = self.count_whole(self.tree.range(start..end))?;
        for prefix in keys::inbox_prefixes(user) {
            for entry in self.tree.scan_prefix(prefix) {
                self.tree.remove(entry?.0)?;
            }
        }
        for entry in self.tree.scan_prefix(keys::EXPIRY_PREFIX) {
            let (key, _) = entry?;
            if keys::expiry_parts(&key).is_some_and(|(_, of, _)| &of == user) {
                self.tree.remove(key)?;
            }
        }
        self.tree.remove(keys::inbox_high(user))?;
        self.tree.remove(keys::inbox_pruned(user))?;
        crate::metrics::metrics().inbox_waiting.dec_by(waiting);
        Ok(())
    }

    /// How many entries of every inbox still hold their message, for the metric
    /// `inbox_waiting`: read once after a start (in the background; appends, prunes and
    /// expiries while it reads may be counted off by as many).
    pub fn count_waiting(&self) -> Result<i64, StoreError> {
        self.count_whole(self.tree.scan_prefix(keys::INBOX_ENTRY_PREFIX))
    }

    /// How many of `entries` still hold their message.
    fn count_whole(
        &self,
        entries: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    ) -> Result<i64, StoreError> {
        let mut whole = 0;
        for entry in entries {
            let (key, value) = entry?;
            whole += i64::from(matches!(self.entry_of(&key, &value)?, Entry::Whole(_)));
        }
        Ok(whole)
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
        let id_key = keys::inbox_id(user, message.id.0);
        // An id record without its entry is an append a crash cut off: appended anew below.
        if let Some(at) = get_u64(&self.tree, "inbox", &id_key)?
            && self.entry_is(user, at, message.id)?
        {
            return Ok(false);
        }
        // In this order (see the module's documentation): the expiry record first, so that
        // whatever a crash leaves of an append is taken out when it is due.
        if let Some(at) = expires_at {
            self.tree
                .insert(keys::expiry(at, user, seq), &message.id.0.to_be_bytes())?;
        }
        self.tree.insert(id_key, &seq.to_be_bytes())?;
        let key = keys::inbox(user, seq);
        let sealed = self.sealer.seal("inbox", &key, encode(message));
        self.tree.insert(key, sealed)?;
        let metrics = crate::metrics::metrics();
        metrics.inbox_appends.inc();
        metrics.inbox_waiting.inc();
        Ok(true)
    }

    /// Whether position `seq` of `user`'s inbox holds message `id` (whole or pruned).
    fn entry_is(&self, user: &UserId, seq: u64, id: MessageId) -> Result<bool, StoreError> {
        Ok(self
            .stored(user, seq)?
            .is_some_and(|entry| entry.message().id == id))
    }

    fn stored(&self, user: &UserId, seq: u64) -> Result<Option<Entry>, StoreError> {
        let key = keys::inbox(user, seq);
        self.tree
            .get(&key)?
            .map(|v| self.entry_of(&key, &v))
            .transpose()
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
        let Some(through) = self.cursors.of_user(user)?.into_iter().min() else {
            return Ok(0);
        };
        let mark_key = keys::inbox_pruned(user);
        let from = get_u64(&self.tree, "inbox", &mark_key)?.unwrap_or(0);
        if through <= from {
            return Ok(0);
        }
        let (start, end) = keys::inbox_range(user, from);
        let end = end.min(keys::inbox(user, through.saturating_add(1)));
        let mut pruned = 0;
        for entry in self.tree.range(start..end) {
            let (key, value) = entry?;
            if let Entry::Whole(message) = self.entry_of(&key, &value)? {
                let without_body = self.sealer.seal("inbox", &key, Entry::pruned(message));
                // Unless the entry changed meanwhile (it expired): then it stays as it is.
                let swapped = self
                    .tree
                    .compare_and_swap(key, Some(value), Some(without_body))?;
                pruned += usize::from(swapped.is_ok());
            }
        }
        self.tree.insert(mark_key, &through.to_be_bytes())?;
        crate::metrics::metrics()
            .inbox_waiting
            .dec_by(pruned as i64);
        Ok(pruned)
    }

    /// Up to `limit` inbox entries whose time ran out by `now`, the earliest first.
    pub fn due(&self, now: u64, limit: usize) -> Result<Vec<Expiry>, StoreError> {
        let (start, end) = keys::expiry_due(now);
        let mut due = Vec::new();
        for entry in self.tree.range(start..end).take(limit) {
            let (key, value) = entry?;
            let (at, user, seq) = keys::expiry_parts(&key).ok_or_else(|| StoreError::Corrupt {
                tree: "inbox",
                reason: "an expiry key that does not decode".into(),
            })?;
            let id = MessageId(decode_u64("inbox", &value)?);
            due.push(Expiry { at, user, seq, id });
        }
        Ok(due)
    }

    /// Takes an expired entry (whole or pruned) out of its inbox, with its records, in one
    /// batch.
    pub fn expire(&self, expiry: &Expiry) -> Result<(), StoreError> {
        let user = &expiry.user;
        let mut batch = sled::Batch::default();
        batch.remove(keys::expiry(expiry.at, user, expiry.seq));
        // The id record goes if it is this entry's, even without the entry (an append a crash
        // cut off); a message appended anew elsewhere keeps its own.
        let id_key = keys::inbox_id(user, expiry.id.0);
        if get_u64(&self.tree, "inbox", &id_key)? == Some(expiry.seq) {
            batch.remove(id_key);
        }
        let entry = self
            .stored(user, expiry.seq)?
            .filter(|entry| entry.message().id == expiry.id);
        let unacknowledged = matches!(entry, Some(Entry::Whole(_)));
        if entry.is_some() {
            batch.remove(keys::inbox(user, expiry.seq));
            // The inbox's last entries may be going: remember how far positions went.
            let high_key = keys::inbox_high(&expiry.user);
            if expiry.seq > get_u64(&self.tree, "inbox", &high_key)?.unwrap_or(0) {
                batch.insert(high_key, &expiry.seq.to_be_bytes());
            }
        }
        self.tree.apply_batch(batch)?;
        if unacknowledged {
            let metrics = crate::metrics::metrics();
            metrics.expired.inc();
            metrics.inbox_waiting.dec();
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
        let Some(seq) = get_u64(&self.tree, "inbox", keys::inbox_id(user, id.0))? else {
            return Ok(None);
        };
        // An id record whose append a crash cut off may point at a missing or another entry.
        Ok(self
            .stored(user, seq)?
            .map(Entry::into_message)
            .filter(|message| message.id == id))
    }

    /// Up to `limit` entries of `user`'s inbox after position `after`, in order.
    pub fn after(
        &self,
        user: &UserId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Message)>, StoreError> {
        let _busy = crate::metrics::Busy::start(|m| &m.busy_store);
        let (start, end) = keys::inbox_range(user, after);
        let mut out = Vec::new();
        for entry in self.tree.range(start..end) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry?;
            let seq = keys::inbox_seq(&key).ok_or_else(|| StoreError::Corrupt {
                tree: "inbox",
                reason: "key does not end in a position".into(),
            })?;
            if let Some(message) = self.entry_of(&key, &value)?.whole() {
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
        let (start, end) = keys::inbox_range(user, after);
        let mut summary = InboxSummary {
            count: 0,
            bytes: 0,
            ids: Vec::new(),
            last: after,
        };
        for entry in self.tree.range(start..end) {
            let (key, value) = entry?;
            let Some(message) = self.entry_of(&key, &value)?.whole() else {
                continue;
            };
            summary.count += 1;
            summary.bytes += message.body.len() as u64;
            if summary.ids.len() < max_ids {
                summary.ids.push(message.id);
            }
            summary.last = keys::inbox_seq(&key).unwrap_or(summary.last);
        }
        Ok(summary)
    }

    /// The entry stored under `key`.
    fn entry_of(&self, key: &[u8], stored: &[u8]) -> Result<Entry, StoreError> {
        Entry::decode(&self.sealer.open("inbox", key, stored)?)
    }

    /// The highest position used in `user`'s inbox or acknowledged by one of its devices.
    /// A new entry goes after it.
    pub fn high_water(&self, user: &UserId) -> Result<u64, StoreError> {
        let (start, end) = keys::inbox_range(user, 0);
        let last = match self.tree.range(start..end).next_back() {
            Some(entry) => keys::inbox_seq(&entry?.0).unwrap_or(0),
            None => 0,
        };
        let expired = get_u64(&self.tree, "inbox", keys::inbox_high(user))?;
        let acknowledged = self.cursors.of_user(user)?.into_iter().max();
        Ok(last
            .max(expired.unwrap_or(0))
            .max(acknowledged.unwrap_or(0)))
    }
}
