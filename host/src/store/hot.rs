//! The message path's records: accepted messages waiting for dispatch, inboxes, cursors, and
//! the relay position — kept in memory and in the message log ([`super::log`]) instead of sled.
//!
//! Every change is one record, appended to the log's tail and applied to the in-memory state
//! under one lock, in one order: replaying the log rebuilds the state exactly ([`State::apply`]
//! is used for both). A record is atomic (it is whole in the log or not at all), so none of
//! sled's write orders and repairs are needed here. A commit round ([`Journal::commit`]) first
//! flushes sled, then writes the tail: a record is durable only with every sled write made
//! before it (a plugin's effect record, a dead letter, an account). The bodies (sealed, as in
//! sled before) stay in the log's files; memory holds where each one is.
//!
//! The dedup records of client submissions stay in sled (they are kept for good, and memory
//! must not grow with every message ever sent), up to 256 client ids of a device to a sled
//! record ([`keys::dedup_chunk`]): an accepted submission's dedup record is held
//! in memory, beside its `Accepted` record in the log, until the compactor writes a batch of
//! them to sled (more than [`DEDUP_IN_MEMORY`], or before a compaction drops the segments that
//! hold their records), off the commit rounds. A crash loses only dedup records whose
//! `Accepted` records are still in the log: replay puts them back in memory. A dedup record
//! never reaches the disk before its message.
//!
//! The log is compacted with snapshots ([`Journal::compact`]): a new segment starts with a
//! `Snapshot` record, every live record still in an older segment is copied into it (a pruned
//! entry without its body, a value an older data key sealed sealed anew), then `SnapshotDone`;
//! once that is durable, the older segments go. Records written meanwhile interleave with the
//! copies: every record either sets what it names outright or changes nothing that a later
//! copy does not carry, so replay from the snapshot's segment gives the same state.

use super::dedup::Held;
use super::log::{Loc, Located, Tail};
use super::{Sealer, StoreError, keys};
use iim_proto::{DeviceId, GroupId, UserId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// What a record says happened. Postcard numbers the variants in this order: new ones go at
/// the end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum Head {
    /// A snapshot starts in this segment.
    Snapshot,
    /// The snapshot that started in this segment is complete.
    SnapshotDone,
    /// A message accepted for dispatch (blob: its sealed dispatch record); a client's
    /// submission names its dedup record.
    Accepted {
        id: u64,
        client: Option<(UserId, DeviceId, u64)>,
        sent_at: u64,
        expires_at: Option<u64>,
    },
    /// The message is in every recipient's inbox.
    Dispatched { id: u64 },
    /// The effects of handling message `id` of `group` are being applied.
    Applying { group: GroupId, id: u64 },
    /// When message `id` expires (a message with its own time to live).
    Ttl { id: u64, at: u64 },
    /// An inbox entry (blob: the sealed entry), or a snapshot's copy of one.
    Appended {
        user: UserId,
        seq: u64,
        id: u64,
        expires_at: Option<u64>,
        pruned: bool,
    },
    /// Every entry of `user`'s inbox up to `through` is acknowledged by every device.
    Pruned { user: UserId, through: u64 },
    /// The entry at `seq` (message `id`) expired and leaves.
    Expired {
        user: UserId,
        seq: u64,
        id: u64,
        at: u64,
    },
    /// A snapshot's copy of an inbox's marks.
    Marks {
        user: UserId,
        high: u64,
        pruned: u64,
    },
    /// A device's cursor moves to `seq` (0: the device takes deliveries from now on).
    Cursor {
        user: UserId,
        device: DeviceId,
        seq: u64,
    },
    /// A device's cursor goes (the device was revoked).
    CursorRemoved { user: UserId, device: DeviceId },
    /// `user`'s inbox goes (the account was deleted).
    ForgetInbox { user: UserId },
    /// `user`'s cursors go (the account was deleted).
    ForgetCursors { user: UserId },
    /// What this host applied of its relay link from the exchange.
    RelayedIn { seq: u64 },
    /// The dedup records of `user`'s devices go (the account was deleted).
    ForgetDedup { user: UserId },
    /// An envelope in the relay outbox, numbered `seq` (blob: the sealed envelope), or a
    /// snapshot's copy of one.
    RelayOut { seq: u64 },
    /// The exchange has every relay outbox envelope up to `seq`: they leave the outbox.
    RelayAcked { seq: u64 },
}

/// An accepted message waiting for dispatch.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    pub(super) loc: Loc,
    client: Option<(UserId, DeviceId, u64)>,
    sent_at: u64,
    expires_at: Option<u64>,
}

/// An inbox entry.
#[derive(Debug, Clone)]
pub(super) struct EntryState {
    pub(super) id: u64,
    pub(super) loc: Loc,
    pub(super) pruned: bool,
    pub(super) expires_at: Option<u64>,
}

/// One user's inbox and cursors.
#[derive(Debug, Default)]
pub(super) struct UserState {
    pub(super) entries: BTreeMap<u64, EntryState>,
    pub(super) ids: HashMap<u64, u64>,
    /// The highest position an expired entry had.
    pub(super) high: u64,
    /// How far pruning went.
    pub(super) pruned: u64,
    pub(super) cursors: BTreeMap<DeviceId, u64>,
}

impl Pending {
    /// The record that accepts message `id` as it is now (a snapshot's copy).
    fn head(&self, id: u64) -> Head {
        Head::Accepted {
            id,
            client: self.client.clone(),
            sent_at: self.sent_at,
            expires_at: self.expires_at,
        }
    }
}

impl EntryState {
    /// The record of this entry, at `seq` of `user`'s inbox, as it is now (a snapshot's copy).
    fn head(&self, user: &UserId, seq: u64) -> Head {
        Head::Appended {
            user: user.clone(),
            seq,
            id: self.id,
            expires_at: self.expires_at,
            pruned: self.pruned,
        }
    }
}

impl UserState {
    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.cursors.is_empty() && self.high == 0 && self.pruned == 0
    }
}

/// What the records say, in memory.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) pending: BTreeMap<u64, Pending>,
    pub(super) ttl: HashMap<u64, u64>,
    pub(super) applying: HashMap<GroupId, u64>,
    pub(super) users: HashMap<UserId, UserState>,
    /// (expires at, user, seq) → message id.
    pub(super) expiries: BTreeMap<(u64, UserId, u64), u64>,
    pub(super) relayed_in: u64,
    /// The relay outbox: where each envelope waiting for the exchange is, by number.
    pub(super) relay_out: BTreeMap<u64, Loc>,
    /// The highest relay outbox number the exchange acknowledged.
    pub(super) relay_acked: u64,
    /// Entries that still hold their message.
    pub(super) whole: i64,
    /// Dedup records not yet written to sled, by chunk.
    pub(super) unsaved: Held,
    /// Dedup records being written to sled ([`Journal::save_dedups`] takes them out of
    /// `unsaved` at once, not one by one under the lock), still looked up here until written.
    pub(super) saving: Arc<Held>,
    /// Bytes of blobs live records point at (for when to compact).
    pub(super) live: u64,
}

impl State {
    /// The dedup record at place `low` of `chunk` held in memory: (message id, sent at).
    pub(super) fn dedup(&self, chunk: &[u8], low: u8) -> Option<(u64, u64)> {
        self.unsaved
            .get(chunk, low)
            .or_else(|| self.saving.get(chunk, low))
    }

    /// The highest relay outbox number used, never handed out again: the last one waiting,
    /// or the last one acknowledged (an acknowledgement removes only numbers up to its own).
    pub(super) fn relay_high(&self) -> u64 {
        let last = self.relay_out.last_key_value().map_or(0, |(seq, _)| *seq);
        last.max(self.relay_acked)
    }

    /// Applies a record whose blob is at `loc`.
    pub(super) fn apply(&mut self, head: &Head, loc: Loc) {
        match head {
            Head::Snapshot | Head::SnapshotDone => {}
            Head::Accepted {
                id,
                client,
                sent_at,
                expires_at,
            } => {
                if let Some(old) = self.pending.insert(
                    *id,
                    Pending {
                        loc,
                        client: client.clone(),
                        sent_at: *sent_at,
                        expires_at: *expires_at,
                    },
                ) {
                    self.live -= u64::from(old.loc.len);
                }
                self.live += u64::from(loc.len);
                if let Some(at) = expires_at {
                    self.ttl.insert(*id, *at);
                }
                if let Some((user, device, client_id)) = client {
                    let (chunk, low) = keys::dedup_chunk_of(user, device, *client_id);
                    self.unsaved.insert(chunk, low, (*id, *sent_at));
                }
            }
            Head::Dispatched { id } => {
                if let Some(old) = self.pending.remove(id) {
                    self.live -= u64::from(old.loc.len);
                }
            }
            Head::Applying { group, id } => {
                self.applying.insert(group.clone(), *id);
            }
            Head::Ttl { id, at } => {
                self.ttl.insert(*id, *at);
            }
            Head::Appended {
                user,
                seq,
                id,
                expires_at,
                pruned,
            } => {
                let inbox = self.users.entry(user.clone()).or_default();
                let entry = EntryState {
                    id: *id,
                    loc,
                    pruned: *pruned,
                    expires_at: *expires_at,
                };
                if let Some(old) = inbox.entries.insert(*seq, entry) {
                    self.whole -= i64::from(!old.pruned);
                    self.live -= u64::from(old.loc.len);
                    if inbox.ids.get(&old.id) == Some(seq) {
                        inbox.ids.remove(&old.id);
                    }
                    if let Some(at) = old.expires_at {
                        self.expiries.remove(&(at, user.clone(), *seq));
                    }
                }
                inbox.ids.insert(*id, *seq);
                self.whole += i64::from(!pruned);
                self.live += u64::from(loc.len);
                if let Some(at) = expires_at {
                    self.expiries.insert((*at, user.clone(), *seq), *id);
                }
            }
            Head::Pruned { user, through } => {
                let inbox = self.users.entry(user.clone()).or_default();
                let from = inbox.pruned;
                if *through > from {
                    for entry in inbox.entries.range_mut(from + 1..=*through).map(|(_, e)| e) {
                        if !entry.pruned {
                            entry.pruned = true;
                            self.whole -= 1;
                        }
                    }
                    inbox.pruned = *through;
                }
            }
            Head::Expired { user, seq, id, at } => {
                self.expiries.remove(&(*at, user.clone(), *seq));
                let inbox = self.users.entry(user.clone()).or_default();
                if inbox.entries.get(seq).is_some_and(|e| e.id == *id)
                    && let Some(old) = inbox.entries.remove(seq)
                {
                    self.whole -= i64::from(!old.pruned);
                    self.live -= u64::from(old.loc.len);
                }
                if inbox.ids.get(id) == Some(seq) {
                    inbox.ids.remove(id);
                }
                // Positions are never handed out twice, even when the last entries are gone.
                inbox.high = inbox.high.max(*seq);
            }
            Head::Marks { user, high, pruned } => {
                let inbox = self.users.entry(user.clone()).or_default();
                inbox.high = inbox.high.max(*high);
                inbox.pruned = inbox.pruned.max(*pruned);
            }
            Head::Cursor { user, device, seq } => {
                let inbox = self.users.entry(user.clone()).or_default();
                let cursor = inbox.cursors.entry(device.clone()).or_insert(0);
                *cursor = (*cursor).max(*seq);
            }
            Head::CursorRemoved { user, device } => {
                if let Some(inbox) = self.users.get_mut(user) {
                    inbox.cursors.remove(device);
                }
                self.drop_if_empty(user);
            }
            Head::ForgetInbox { user } => {
                if let Some(inbox) = self.users.get_mut(user) {
                    for (seq, entry) in std::mem::take(&mut inbox.entries) {
                        self.whole -= i64::from(!entry.pruned);
                        self.live -= u64::from(entry.loc.len);
                        if let Some(at) = entry.expires_at {
                            self.expiries.remove(&(at, user.clone(), seq));
                        }
                    }
                    inbox.ids.clear();
                    inbox.high = 0;
                    inbox.pruned = 0;
                }
                self.drop_if_empty(user);
            }
            Head::ForgetCursors { user } => {
                if let Some(inbox) = self.users.get_mut(user) {
                    inbox.cursors.clear();
                }
                self.drop_if_empty(user);
            }
            Head::RelayedIn { seq } => self.relayed_in = *seq,
            Head::RelayOut { seq } => {
                if let Some(old) = self.relay_out.insert(*seq, loc) {
                    self.live -= u64::from(old.len);
                }
                self.live += u64::from(loc.len);
            }
            Head::RelayAcked { seq } => {
                let waiting = self.relay_out.split_off(&(seq.saturating_add(1)));
                for (_, gone) in std::mem::replace(&mut self.relay_out, waiting) {
                    self.live -= u64::from(gone.len);
                }
                self.relay_acked = self.relay_acked.max(*seq);
            }
            Head::ForgetDedup { user } => {
                let prefix = keys::dedup_chunk_prefix(user);
                self.unsaved.forget(&prefix);
                if !self.saving.is_empty() {
                    Arc::make_mut(&mut self.saving).forget(&prefix);
                }
            }
        }
    }

    /// A snapshot's records of everything that has no blob: groups being applied, times to
    /// live not run out by `now`, the relay position, each inbox's marks and cursors.
    fn bodiless(&self, now: u64) -> Vec<Head> {
        let mut heads: Vec<Head> = self
            .applying
            .iter()
            .map(|(group, id)| Head::Applying {
                group: group.clone(),
                id: *id,
            })
            .collect();
        heads.extend(
            self.ttl
                .iter()
                .filter(|(_, at)| **at > now)
                .map(|(id, at)| Head::Ttl { id: *id, at: *at }),
        );
        heads.push(Head::RelayedIn {
            seq: self.relayed_in,
        });
        heads.push(Head::RelayAcked {
            seq: self.relay_acked,
        });
        for (user, inbox) in &self.users {
            heads.push(Head::Marks {
                user: user.clone(),
                high: inbox.high,
                pruned: inbox.pruned,
            });
            heads.extend(inbox.cursors.iter().map(|(device, seq)| Head::Cursor {
                user: user.clone(),
                device: device.clone(),
                seq: *seq,
            }));
        }
        heads
    }

    fn drop_if_empty(&mut self, user: &UserId) {
        if self.users.get(user).is_some_and(UserState::is_empty) {
            self.users.remove(user);
        }
    }
}

/// The state and the log's tail, under one lock.
pub(super) struct Inner {
    pub(super) state: State,
    pub(super) tail: Tail,
}

impl Inner {
    /// Appends a record and applies it.
    pub(super) fn log(&mut self, head: Head, blob: &[u8]) -> Loc {
        let loc = self.tail.append(&encode_head(&head), blob);
        self.state.apply(&head, loc);
        loc
    }
}

fn encode_head(head: &Head) -> Vec<u8> {
    // Encoding our own in-memory values into a Vec cannot fail.
    postcard::to_stdvec(head).unwrap_or_default()
}

fn decode_head(bytes: &[u8]) -> Result<Head, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        tree: "message log",
        reason: format!("a record that does not decode: {e}"),
    })
}

/// The message path's records, shared by the handles [`super::Messages`], [`super::Inbox`],
/// [`super::Cursors`] and [`super::NetworkStore`] (its relay position).
pub(crate) struct Journal {
    inner: Mutex<Inner>,
    pub(super) sealer: Sealer,
    /// sled, flushed first in every round, and its log file (synced: sled's own flush leaves
    /// the file's size and the disk's cache unsynced).
    db: sled::Db,
    sled_log: Option<std::fs::File>,
    /// Held through a round: rounds are written one at a time, in order.
    committing: Mutex<()>,
    /// The size and time of change of sled's log file when a round last looked.
    sled_seen: Mutex<Option<(u64, Option<std::time::SystemTime>)>>,
    /// Serialises compactions (and re-encryptions, which are compactions).
    compacting: Mutex<()>,
    /// Held while dedup records are written to sled, or removed from it.
    saving: Mutex<()>,
    /// Why a round failed to reach the disk, if one did: no round after it is written.
    failed: Mutex<Option<String>>,
}

/// How many records of each kind the message path holds ([`super::Store::counts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Dedup records, in memory and in sled.
    pub dedup: u64,
    /// Messages accepted and not yet dispatched.
    pub pending: u64,
    /// Inbox entries.
    pub entries: u64,
    /// Of them, pruned (every device acknowledged them).
    pub pruned: u64,
    /// Entries with an expiry.
    pub expiries: u64,
    /// The sum of every device's cursor.
    pub cursor_sum: u64,
    /// The sum of every inbox's prune mark.
    pub prune_mark_sum: u64,
}

impl Journal {
    /// How many records of each kind there are; `tree` holds the saved dedup records.
    pub(super) fn counts(&self, tree: &sled::Tree) -> Result<Counts, StoreError> {
        let _saving = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let inner = self.lock();
        let mut saved = 0;
        for entry in tree.scan_prefix(keys::DEDUP_CHUNK_PREFIX) {
            let (chunk, value) = entry?;
            for (low, _) in super::dedup::records(&value)? {
                // A dedup record saved and still held in memory counts once.
                saved += u64::from(inner.state.dedup(&chunk, low).is_none());
            }
        }
        let state = &inner.state;
        let mut counts = Counts {
            // `saving` is empty: no save is under way.
            dedup: state.unsaved.len() as u64 + saved,
            pending: state.pending.len() as u64,
            expiries: state.expiries.len() as u64,
            ..Counts::default()
        };
        for inbox in state.users.values() {
            counts.entries += inbox.entries.len() as u64;
            counts.pruned += inbox.entries.values().filter(|e| e.pruned).count() as u64;
            counts.cursor_sum += inbox.cursors.values().sum::<u64>();
            counts.prune_mark_sum += inbox.pruned;
        }
        Ok(counts)
    }
}

#[cfg(test)]
impl Journal {
    /// Everything the state holds, as text, bodies opened (a pruned entry's without its body):
    /// what a replay must give back.
    pub(super) fn fingerprint(&self) -> Vec<String> {
        let inner = self.lock();
        let state = &inner.state;
        let read = |tree: &'static str, key: Vec<u8>, loc: Loc| -> Vec<u8> {
            let stored = inner
                .tail
                .locate(loc)
                .expect("locate")
                .read()
                .expect("read");
            self.sealer
                .open(tree, &key, &stored)
                .expect("open")
                .into_owned()
        };
        let mut out = Vec::new();
        for (id, p) in &state.pending {
            let plain = read("messages", keys::dispatch(*id), p.loc);
            out.push(format!(
                "pending {id} {:?} {} {:?} {plain:?}",
                p.client, p.sent_at, p.expires_at
            ));
        }
        let mut ttl: Vec<_> = state.ttl.iter().collect();
        ttl.sort();
        out.push(format!("ttl {ttl:?}"));
        let mut applying: Vec<_> = state.applying.iter().collect();
        applying.sort();
        out.push(format!("applying {applying:?}"));
        let mut users: Vec<_> = state.users.iter().collect();
        users.sort_by(|a, b| a.0.cmp(b.0));
        for (user, inbox) in users {
            out.push(format!(
                "user {user} high {} pruned {} cursors {:?}",
                inbox.high, inbox.pruned, inbox.cursors
            ));
            for (seq, e) in &inbox.entries {
                let plain = read("inbox", keys::inbox(user, *seq), e.loc);
                let plain = if e.pruned {
                    super::inbox::pruned_form(&plain).expect("pruned")
                } else {
                    plain
                };
                out.push(format!(
                    "  {seq} {} {} {:?} {plain:?}",
                    e.id, e.pruned, e.expires_at
                ));
            }
            let mut ids: Vec<_> = inbox.ids.iter().collect();
            ids.sort();
            out.push(format!("  ids {ids:?}"));
        }
        for (seq, loc) in &state.relay_out {
            let plain = read("network", keys::net_outbox(*seq), *loc);
            out.push(format!("relay out {seq} {plain:?}"));
        }
        out.push(format!(
            "relay acked {} high {}",
            state.relay_acked,
            state.relay_high()
        ));
        out.push(format!("expiries {:?}", state.expiries));
        out.push(format!(
            "relayed {} whole {}",
            state.relayed_in, state.whole
        ));
        out
    }
}

/// Opens the log in `dir` and rebuilds its state: from the newest segment that holds a whole
/// snapshot (older segments are removed), else from the first.
fn replay(dir: &Path) -> Result<(State, Tail), StoreError> {
    let mut state = State::default();
    let tail = Tail::open(
        dir,
        |_, records| {
            records
                .iter()
                .any(|r| matches!(decode_head(r.head), Ok(Head::SnapshotDone)))
        },
        |record| {
            state.apply(&decode_head(record.head)?, record.loc);
            Ok(())
        },
    )?;
    Ok((state, tail))
}

/// Whether the message log in `dir` holds any record.
pub(super) fn log_has_records(dir: &Path) -> Result<bool, StoreError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(false);
    };
    for entry in entries.flatten() {
        if entry.metadata().is_ok_and(|m| m.len() > 0) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Copies the live records of the message log in `from`, kept in the clear, into a new log in
/// `to`, sealed by `sealer` (sealing a store kept in the clear). Returns how many values were
/// sealed.
pub(super) fn seal_log(from: &Path, to: &Path, sealer: &Sealer) -> Result<u64, StoreError> {
    let (state, old) = replay(from)?;
    let mut new = Inner {
        state: State::default(),
        tail: Tail::open(to, |_, _| false, |_| Ok(()))?,
    };
    new.log(Head::Snapshot, &[]);
    let mut sealed = 0;
    for (id, p) in &state.pending {
        let plain = old.locate(p.loc)?.read()?;
        new.log(
            p.head(*id),
            &sealer.seal("messages", &keys::dispatch(*id), plain),
        );
        sealed += 1;
    }
    for (user, inbox) in &state.users {
        for (seq, entry) in &inbox.entries {
            let plain = old.locate(entry.loc)?.read()?;
            let plain = if entry.pruned {
                super::inbox::pruned_form(&plain)?
            } else {
                plain
            };
            let sealed_entry = sealer.seal("inbox", &keys::inbox(user, *seq), plain);
            new.log(entry.head(user, *seq), &sealed_entry);
            sealed += 1;
        }
    }
    for (seq, loc) in &state.relay_out {
        let plain = old.locate(*loc)?.read()?;
        new.log(
            Head::RelayOut { seq: *seq },
            &sealer.seal("network", &keys::net_outbox(*seq), plain),
        );
        sealed += 1;
    }
    // Every time to live is carried over, run out or not, as the records were.
    for head in state.bodiless(0) {
        new.log(head, &[]);
    }
    new.log(Head::SnapshotDone, &[]);
    let (round, _) = new.tail.take(false)?;
    round.write(to).map_err(|source| StoreError::Io {
        what: "writing the sealed message log",
        path: to.to_owned(),
        source,
    })?;
    Ok(sealed)
}

impl Drop for Journal {
    /// What is still in memory is committed, as sled flushes what it holds when it is dropped.
    fn drop(&mut self) {
        if let Err(e) = self.commit() {
            tracing::error!(error = %e, "committing the message log at close failed");
        }
    }
}

/// When the log is compacted: once it holds this many bytes more than its live records and
/// more than twice as many.
const COMPACT_SLACK: u64 = 2 * super::log::SEGMENT_BYTES;

/// Dedup records kept in memory (their `Accepted` records in the log) before they are written
/// to sled, off the commit rounds.
const DEDUP_IN_MEMORY: usize = 1 << 16;

/// The most dedup records written to sled in one batch when they are saved, and the most
/// chunks (a client that numbers its submissions at random has a chunk for each).
const DEDUP_SAVE_RECORDS: usize = 1024;
const DEDUP_SAVE_CHUNKS: usize = 64;

/// The pause between two of those batches, in which sled's readers and writers go on.
const DEDUP_SAVE_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

impl Journal {
    /// Opens the log in `dir` and rebuilds the state from it.
    pub(super) fn open(
        dir: &Path,
        sealer: &Sealer,
        db: &sled::Db,
        sled_log: Option<std::fs::File>,
    ) -> Result<Self, StoreError> {
        let (state, tail) = replay(dir)?;
        Ok(Self {
            inner: Mutex::new(Inner { state, tail }),
            sealer: sealer.clone(),
            db: db.clone(),
            sled_log,
            committing: Mutex::new(()),
            sled_seen: Mutex::new(None),
            compacting: Mutex::new(()),
            saving: Mutex::new(()),
            failed: Mutex::new(None),
        })
    }

    /// The state and the tail, locked.
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One commit round: takes the records appended so far, flushes sled (so that every sled
    /// write before them is durable first; sled's log file is synced only if the flush wrote
    /// something: sled flushes nothing by itself here), then writes and syncs them.
    /// Returns whether it wrote anything.
    pub(super) fn commit(&self) -> Result<bool, StoreError> {
        self.commit_rolling(false).map(|(_, wrote)| wrote)
    }

    /// [`Journal::commit`]; with `roll`, the records appended after the round's go to a new
    /// segment, whose number is returned (with whether it wrote anything).
    fn commit_rolling(&self, roll: bool) -> Result<(Option<u32>, bool), StoreError> {
        let _one = self.committing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = &*self.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(StoreError::Failed(reason.clone()));
        }
        let (round, rolled, dir) = {
            let mut inner = self.lock();
            let dir = inner.tail.dir().to_owned();
            let (round, rolled) = inner.tail.take(roll)?;
            (round, rolled, dir)
        };
        // sled's own threads may write out a full buffer between rounds: its file changed
        // since the last sync is synced too.
        let flushed = self.db.flush()? > 0;
        let sled_wrote = self.sled_log_changed() || flushed;
        if sled_wrote && let Some(file) = &self.sled_log {
            let metrics = crate::metrics::metrics();
            crate::metrics::timed(&metrics.fsync_seconds, || file.sync_data())
                .map_err(sled::Error::Io)?;
        }
        if let Err(source) = round.write(&dir) {
            // The round's records are in memory, not on disk: a later round written after
            // them would leave a hole, so none is.
            let reason = format!("writing the message log in {}: {source}", dir.display());
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
            return Err(StoreError::Failed(reason));
        }
        self.lock().tail.written(&round);
        Ok((rolled, sled_wrote || !round.is_empty()))
    }

    /// Whether sled's log file changed (its size or its time of change) since the last round
    /// looked; remembers what it saw.
    fn sled_log_changed(&self) -> bool {
        let Some(seen) = self
            .sled_log
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| (m.len(), m.modified().ok()))
        else {
            return false;
        };
        let mut last = self.sled_seen.lock().unwrap_or_else(|p| p.into_inner());
        let changed = last.as_ref() != Some(&seen);
        *last = Some(seen);
        changed
    }

    /// Writes the dedup records held in memory to sled (durable at the next round), into
    /// their chunks ([`keys::dedup_chunk`]).
    pub(super) fn save_dedups(&self) -> Result<(), StoreError> {
        let _saving = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        // Taken out of `unsaved` at once (with those of a save that failed, if one did), and
        // looked up in `saving` until they are in sled.
        let (records, failed) = {
            let mut inner = self.lock();
            let state = &mut inner.state;
            let mut records = std::mem::take(&mut state.unsaved);
            let failed = std::mem::take(&mut state.saving);
            records.absorb(&failed);
            state.saving = Arc::new(records);
            (Arc::clone(&state.saving), failed)
        };
        drop(failed);
        let chunks = records.sorted();
        let tree = self.db.open_tree("messages")?;
        // A few at a time, with a pause between them: a sled batch holds sled's write lock,
        // which every read of sled waits for (a submission's dedup look-up among them); one
        // batch of 65,536 records stalled the message path for half a second.
        let groups = super::dedup::groups(&chunks, DEDUP_SAVE_RECORDS, DEDUP_SAVE_CHUNKS);
        for (i, group) in groups.into_iter().enumerate() {
            if i > 0 {
                std::thread::sleep(DEDUP_SAVE_PAUSE);
            }
            super::dedup::save(&tree, group)?;
        }
        drop(chunks);
        let saved = std::mem::take(&mut self.lock().state.saving);
        // Freed here, not under the lock.
        drop((saved, records));
        Ok(())
    }

    /// Forgets the dedup records of `user`'s devices, in memory and in sled's `tree`.
    pub(super) fn forget_dedups(&self, user: &UserId, tree: &sled::Tree) -> Result<(), StoreError> {
        let _saving = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        self.lock()
            .log(Head::ForgetDedup { user: user.clone() }, &[]);
        for entry in tree.scan_prefix(keys::dedup_chunk_prefix(user)) {
            tree.remove(entry?.0)?;
        }
        Ok(())
    }

    /// Whether the compactor has work: a log with enough dead records to compact, or more
    /// dedup records in memory than [`DEDUP_IN_MEMORY`].
    pub(super) fn wants_work(&self) -> bool {
        let (compact, save) = self.work();
        compact || save
    }

    /// Whether the log holds enough dead records to compact, and whether more dedup records
    /// than [`DEDUP_IN_MEMORY`] wait in memory.
    fn work(&self) -> (bool, bool) {
        let inner = self.lock();
        (
            inner.tail.size() > inner.state.live.saturating_mul(2) + COMPACT_SLACK,
            inner.state.unsaved.len() > DEDUP_IN_MEMORY,
        )
    }

    /// The compactor's work ([`Journal::wants_work`]).
    pub(super) fn maintain(&self) -> Result<(), StoreError> {
        let (compact, save) = self.work();
        if compact {
            let started = std::time::Instant::now();
            self.compact(false, |_| ())?;
            tracing::info!(
                ms = started.elapsed().as_millis() as u64,
                "compacted the message log"
            );
        } else if save {
            self.save_dedups()?;
        }
        Ok(())
    }

    /// Every record whose key or opened value `holds` what is looked for, named as the tree
    /// and key sled kept it under before the message log (`iim-host store find`).
    pub(super) fn records_containing(
        &self,
        holds: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<super::FoundRecord>, StoreError> {
        let mut blobs = Vec::new();
        let mut found = Vec::new();
        {
            let inner = self.lock();
            for (id, p) in &inner.state.pending {
                blobs.push(("messages", keys::dispatch(*id), inner.tail.locate(p.loc)?));
            }
            for (user, inbox) in &inner.state.users {
                for (seq, entry) in &inbox.entries {
                    let key = keys::inbox(user, *seq);
                    blobs.push(("inbox", key, inner.tail.locate(entry.loc)?));
                }
                for device in inbox.cursors.keys() {
                    let key = keys::cursor(user, device);
                    if holds(&key) {
                        found.push(super::FoundRecord {
                            tree: "cursors".into(),
                            key,
                            in_key: true,
                        });
                    }
                }
            }
        }
        for (tree, key, located) in blobs {
            let in_key = holds(&key);
            let in_value = !in_key && {
                let plain =
                    self.sealer
                        .try_open(tree, &key, &located.read()?)
                        .map_err(|reason| StoreError::Sealed {
                            tree: "(a search)",
                            reason,
                        })?;
                holds(&plain)
            };
            if in_key || in_value {
                found.push(super::FoundRecord {
                    tree: tree.into(),
                    key,
                    in_key,
                });
            }
        }
        Ok(found)
    }

    /// Compacts the log: a snapshot of every live record in a new segment, then the older
    /// segments go. With `reseal`, every sealed value not sealed with the current data key is
    /// sealed with it (and every record is copied, wherever it is). `commit` makes what was
    /// appended durable (a commit round); `progress` is told how many values were sealed anew.
    /// Returns how many.
    pub(super) fn compact(
        &self,
        reseal: bool,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, StoreError> {
        let _one = self.compacting.lock().unwrap_or_else(|p| p.into_inner());
        let base = self.commit_rolling(true)?.0.ok_or(StoreError::Flusher(
            "a compaction's commit did not start a segment",
        ))?;
        self.lock().log(Head::Snapshot, &[]);
        // The dedup records of the messages accepted in the older segments, in sled before
        // those segments go (the last round below flushes sled first).
        self.save_dedups()?;
        let users = {
            let mut inner = self.lock();
            let now = crate::clock::now_ms();
            let small = inner.state.bodiless(now);
            // Expired time-to-live records go.
            inner.state.ttl.retain(|_, at| *at > now);
            for head in small {
                inner.log(head, &[]);
            }
            inner.state.users.keys().cloned().collect::<Vec<UserId>>()
        };
        let mut resealed = 0;
        let current = self.sealer.keys().map(|k| k.current());
        // Whether a blob sealed as `stored` must be sealed anew.
        let stale = |stored: &[u8]| {
            reseal && current.is_some() && super::sealing::key_of(stored) != current
        };
        self.copy_older(
            ("messages", keys::dispatch),
            &stale,
            |state, from| older(&state.pending, from, base, |p| p.loc),
            |state, id, loc| {
                let p = state.pending.get(&id).filter(|p| p.loc == loc)?;
                Some(p.head(id))
            },
            &mut resealed,
            &mut progress,
        )?;
        // One the exchange acknowledged meanwhile is not copied.
        self.copy_older(
            ("network", keys::net_outbox),
            &stale,
            |state, from| older(&state.relay_out, from, base, |loc| *loc),
            |state, seq, loc| {
                (state.relay_out.get(&seq) == Some(&loc)).then_some(Head::RelayOut { seq })
            },
            &mut resealed,
            &mut progress,
        )?;
        for user in &users {
            loop {
                let found: Vec<(u64, EntryState, Located)> = {
                    let inner = self.lock();
                    let Some(inbox) = inner.state.users.get(user) else {
                        break;
                    };
                    let mut found = Vec::new();
                    for (seq, entry) in &inbox.entries {
                        if entry.loc.segment < base {
                            found.push((*seq, entry.clone(), inner.tail.locate(entry.loc)?));
                        }
                        if found.len() == 256 {
                            break;
                        }
                    }
                    found
                };
                if found.is_empty() {
                    break;
                }
                let mut copies = Vec::new();
                for (seq, entry, located) in found {
                    let key = keys::inbox(user, seq);
                    let stored = located.read()?;
                    let is_stale = stale(&stored);
                    let blob = if entry.pruned || is_stale {
                        let plain = self.sealer.open("inbox", &key, &stored)?;
                        let plain = if entry.pruned {
                            super::inbox::pruned_form(&plain)?
                        } else {
                            plain.into_owned()
                        };
                        resealed += u64::from(is_stale);
                        self.sealer.seal("inbox", &key, plain)
                    } else {
                        stored
                    };
                    copies.push((seq, entry, blob));
                }
                let mut inner = self.lock();
                for (seq, entry, blob) in copies {
                    let same = inner
                        .state
                        .users
                        .get(user)
                        .and_then(|i| i.entries.get(&seq))
                        .is_some_and(|e| e.loc == entry.loc && e.pruned == entry.pruned);
                    if !same {
                        continue;
                    }
                    inner.log(entry.head(user, seq), &blob);
                }
                drop(inner);
                progress(resealed);
            }
        }
        self.lock().log(Head::SnapshotDone, &[]);
        self.commit()?;
        self.lock().tail.drop_before(base)?;
        Ok(resealed)
    }
}

/// Up to 256 records of `map`, from key `from` on, whose blobs are in a segment older than
/// `base`: (key, where the blob is).
fn older<T>(
    map: &BTreeMap<u64, T>,
    from: u64,
    base: u32,
    loc: impl Fn(&T) -> Loc,
) -> Vec<(u64, Loc)> {
    map.range(from..)
        .map(|(key, value)| (*key, loc(value)))
        .filter(|(_, loc)| loc.segment < base)
        .take(256)
        .collect()
}

impl Journal {
    /// A compaction's copy of the records of one map of the state whose blobs are in a
    /// segment older than the snapshot's, in key order, a batch at a time: `older` finds a
    /// batch from a key on, `current` gives the record as it is now if its blob is still where it was
    /// read (one changed or gone meanwhile was written to a newer segment, or needs no copy).
    /// A blob sealed with another key than the current one is sealed anew if `stale` says so,
    /// under `tree` and the key `key_of` makes; `resealed` counts them, `progress` is told.
    fn copy_older(
        &self,
        (tree, key_of): (&'static str, fn(u64) -> Vec<u8>),
        stale: &dyn Fn(&[u8]) -> bool,
        older: impl Fn(&State, u64) -> Vec<(u64, Loc)>,
        current: impl Fn(&State, u64, Loc) -> Option<Head>,
        resealed: &mut u64,
        progress: &mut impl FnMut(u64),
    ) -> Result<(), StoreError> {
        let mut from = 0;
        loop {
            let found: Vec<(u64, Loc, Located)> = {
                let inner = self.lock();
                older(&inner.state, from)
                    .into_iter()
                    .map(|(key, loc)| Ok((key, loc, inner.tail.locate(loc)?)))
                    .collect::<Result<_, StoreError>>()?
            };
            let Some(&(last, _, _)) = found.last() else {
                return Ok(());
            };
            let mut copies = Vec::with_capacity(found.len());
            for (key, loc, located) in found {
                let mut blob = located.read()?;
                if stale(&blob) {
                    let sealed_as = key_of(key);
                    let plain = self.sealer.open(tree, &sealed_as, &blob)?.into_owned();
                    blob = self.sealer.seal(tree, &sealed_as, plain);
                    *resealed += 1;
                }
                copies.push((key, loc, blob));
            }
            let mut inner = self.lock();
            for (key, loc, blob) in copies {
                if let Some(head) = current(&inner.state, key, loc) {
                    inner.log(head, &blob);
                }
            }
            drop(inner);
            progress(*resealed);
            match last.checked_add(1) {
                Some(next) => from = next,
                None => return Ok(()),
            }
        }
    }
}
