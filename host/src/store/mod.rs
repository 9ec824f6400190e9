//! Durable state, in sled, behind one small interface.
//!
//! Trees: `users`, `tokens`, `relations`, `messages` (dedup, dispatch and effect records),
//! `inbox` (entries and id records), `cursors`, `plugin_kv` (each plugin's own storage),
//! `dead_letters` (events no plugin build could handle). Their keys are built in [`keys`]; values are postcard.
//! Concurrent writers of the same records are serialised by the caller's locks, which is much
//! cheaper than sled's transactions.
//!
//! Crash consistency without batches on the message path: sled recovers a prefix of its log
//! (the writes up to the first one that did not reach the disk), so records that belong
//! together are written one by one, in an order in which every prefix is either harmless or
//! repaired. A submission writes its dispatch record (which names its client id) before its
//! dedup record; [`Store::open`] writes any dedup record a crash cut off. An inbox append writes
//! the expiry record, then the id record, then the entry; an append done again (the dispatch
//! record outlives the appends) appends anew where it finds an id record without its entry, and
//! the expiry sweep takes out whatever an append left. sled's atomic batches are kept for rare
//! writes only: each one makes sled write its log buffer out twice, which on the message path
//! cost two thirds of the throughput.
//!
//! Durability: a write here is in sled's log, not yet on disk. [`Store::flush`] makes every
//! write before it durable. One flusher thread serves every caller (group commit): it takes all
//! the requests waiting, flushes sled's log once and `fsync`s the log file once, and answers
//! them all. Callers that need durability (Accepted) so share one disk sync instead of paying
//! one each. A single flusher also keeps sled 0.34's `flush_async` out of the picture: run by
//! many tasks at once it can deadlock sled's I/O threads.

pub mod exchange;
pub mod keys;
mod network;

use iim_proto::{DeviceId, Message, MessageId, RelationKind, UserId};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::path::Path;

/// An inbox entry whose time ran out ([`Store::due_expiries`]).
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

/// What waits in an inbox after a position ([`Store::inbox_summary`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxSummary {
    /// How many entries.
    pub count: u64,
    /// The sum of their body sizes, in bytes.
    pub bytes: u64,
    /// The ids of the first entries, oldest first.
    pub ids: Vec<MessageId>,
    /// The position of the last entry.
    pub last: u64,
}

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption it detected).
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// Making writes durable failed.
    #[error("flushing the store: {0}")]
    Flush(String),
    /// A stored value could not be decoded.
    #[error("stored value under {tree} is corrupt: {reason}")]
    Corrupt {
        /// The tree it is in.
        tree: &'static str,
        /// What the decoder said.
        reason: String,
    },
}

/// An account as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    /// The argon2id hash of the password, in PHC string form.
    pub password_hash: String,
    /// When the account was created, in milliseconds since the Unix epoch.
    pub created_at: u64,
}

/// What [`Store::accept`] did with a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    /// The message is new; it is stored and waiting for dispatch.
    New(Message),
    /// The same `(user, device, client id)` was accepted before.
    Duplicate {
        /// The first submission's id.
        id: MessageId,
        /// When the first submission was accepted.
        sent_at: u64,
        /// The first submission, if its dispatch has not finished (it is dispatched again).
        pending: Option<Message>,
    },
}

/// A dispatch record: an accepted message not yet in all its recipients' inboxes.
#[derive(Debug, Serialize, Deserialize)]
struct Dispatch {
    /// The client id it was submitted with, for a client's submission: its dedup record is
    /// `(message.from, message.from_device, client_id)`.
    client_id: Option<u64>,
    /// The message.
    message: Message,
}

/// An event a plugin failed to handle in every attempt, kept for the operator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The plugin (file) name.
    pub plugin: String,
    /// The version of the build that failed.
    pub version: String,
    /// The digest of that build.
    pub digest: String,
    /// The event.
    pub event: crate::plugin::Event,
    /// Why the last attempt failed.
    pub error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When it was set aside, in milliseconds since the Unix epoch.
    pub at: u64,
}

/// The host's durable state.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    users: sled::Tree,
    tokens: sled::Tree,
    relations: sled::Tree,
    messages: sled::Tree,
    inbox: sled::Tree,
    cursors: sled::Tree,
    plugin_kv: sled::Tree,
    dead_letters: sled::Tree,
    /// Held from choosing a message id to committing the message, so that ids follow the
    /// order in which messages are accepted.
    accept_order: std::sync::Arc<std::sync::Mutex<()>>,
    flusher: std::sync::mpsc::Sender<FlushWaiter>,
    /// Users known to exist (accounts are never deleted), up to [`KNOWN_USERS`]: every
    /// submission and send checks its recipients, and this spares the store those reads.
    known_users: std::sync::Arc<std::sync::RwLock<std::collections::HashSet<UserId>>>,
    /// In a network of hosts: what this host knows of it, and its relay outbox.
    network: sled::Tree,
    /// The bits of every message id above `iim_proto::peer::ID_BITS`: this host's number in its
    /// network (0 alone).
    id_prefix: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The last number of the relay outbox, held while an envelope is numbered and written so
    /// that the outbox is written in number order.
    outbox_head: std::sync::Arc<std::sync::Mutex<Option<u64>>>,
}

/// The format of the records this version writes: 2 since inboxes are pruned.
const FORMAT: u64 = 2;

/// Most users [`Store::user_exists`] remembers.
const KNOWN_USERS: usize = 65_536;

type FlushWaiter = tokio::sync::oneshot::Sender<Result<(), String>>;

/// The group-commit loop: one sled flush and one fsync for every batch of waiting callers.
/// Ends when every `Store` is dropped.
fn run_flusher(
    db: sled::Db,
    log_file: Option<std::fs::File>,
    requests: std::sync::mpsc::Receiver<FlushWaiter>,
) {
    while let Ok(first) = requests.recv() {
        // Every request already queued was made after its caller's writes, and so is covered
        // by a flush that starts now.
        let waiters: Vec<FlushWaiter> = std::iter::once(first).chain(requests.try_iter()).collect();
        let result = db
            .flush()
            .map_err(|e| e.to_string())
            .and_then(|_| match &log_file {
                // sled writes its log with sync_file_range, which leaves the file's size and
                // the disk's write cache unsynced; fsync closes that gap.
                Some(file) => file.sync_data().map_err(|e| e.to_string()),
                None => Ok(()),
            });
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

/// Opens the sled database in directory `path` and starts its flusher thread (named `thread`).
fn open_db(
    path: &Path,
    thread: &str,
) -> Result<(sled::Db, std::sync::mpsc::Sender<FlushWaiter>), StoreError> {
    let db = sled::Config::new().path(path).open()?;
    // sled keeps its log in `<path>/db`; an fd of our own on it lets the flusher fsync it.
    let log_file = std::fs::File::open(path.join("db")).ok();
    let (flusher, requests) = std::sync::mpsc::channel();
    let flush_db = db.clone();
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || run_flusher(flush_db, log_file, requests))
        .map_err(|e| StoreError::Flush(format!("cannot start the flusher: {e}")))?;
    Ok((db, flusher))
}

/// Asks `flusher` to make every write before this call durable, and waits.
async fn flush_with(flusher: &std::sync::mpsc::Sender<FlushWaiter>) -> Result<(), StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let gone = || StoreError::Flush("the flusher has stopped".into());
    flusher.send(tx).map_err(|_| gone())?;
    rx.await.map_err(|_| gone())?.map_err(StoreError::Flush)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding our own in-memory values into a Vec cannot fail.
    postcard::to_stdvec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        reason: e.to_string(),
    })
}

fn decode_u64(tree: &'static str, bytes: &[u8]) -> Result<u64, StoreError> {
    let raw: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        tree,
        reason: format!("expected 8 bytes, found {}", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(raw))
}

/// The number stored under `key` in `tree` (named `name`), if any.
fn get_u64(
    tree: &sled::Tree,
    name: &'static str,
    key: impl AsRef<[u8]>,
) -> Result<Option<u64>, StoreError> {
    tree.get(key)?.map(|v| decode_u64(name, &v)).transpose()
}

impl Store {
    /// Opens (creating if needed) the store in directory `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let (db, flusher) = open_db(path, "iim-store-flush")?;
        Self {
            users: db.open_tree("users")?,
            tokens: db.open_tree("tokens")?,
            relations: db.open_tree("relations")?,
            messages: db.open_tree("messages")?,
            inbox: db.open_tree("inbox")?,
            cursors: db.open_tree("cursors")?,
            plugin_kv: db.open_tree("plugin_kv")?,
            dead_letters: db.open_tree("dead_letters")?,
            network: db.open_tree("network")?,
            accept_order: Default::default(),
            flusher,
            known_users: Default::default(),
            id_prefix: Default::default(),
            outbox_head: Default::default(),
            db,
        }
        .recovered()
    }

    /// Repairs what a crash can leave half written (see the module's documentation) and moves
    /// an earlier version's records to the current form.
    fn recovered(self) -> Result<Self, StoreError> {
        let format = get_u64(&self.db, "default", keys::FORMAT)?.unwrap_or(1);
        if format < FORMAT {
            // Before inboxes were pruned, a device had a cursor only once it acknowledged
            // something. Every device that ever logged in gets one, so that pruning waits for it
            // (a cursor's key is its token's).
            for entry in self.tokens.iter() {
                let (user_device, _) = entry?;
                let _ = self.cursors.compare_and_swap(
                    &user_device,
                    None::<&[u8]>,
                    Some(&0u64.to_be_bytes()),
                )?;
            }
            self.db.insert(keys::FORMAT, &FORMAT.to_be_bytes())?;
        }
        for entry in self.messages.scan_prefix(keys::OLD_DISPATCH_PREFIX) {
            let (key, value) = entry?;
            let message: Message = decode("messages", &value)?;
            let mut batch = sled::Batch::default();
            batch.insert(
                keys::dispatch(message.id.0),
                encode(&Dispatch {
                    client_id: None,
                    message,
                }),
            );
            batch.remove(key);
            self.messages.apply_batch(batch)?;
        }
        for entry in self.messages.scan_prefix(keys::DISPATCH_PREFIX) {
            let (_, value) = entry?;
            let dispatch: Dispatch = decode("messages", &value)?;
            let Some(client_id) = dispatch.client_id else {
                continue;
            };
            let m = &dispatch.message;
            let dedup_key = keys::dedup(&m.from, &m.from_device, client_id);
            if !self.messages.contains_key(&dedup_key)? {
                tracing::info!(id = %m.id, "restoring the dedup record a crash cut off");
                self.messages
                    .insert(dedup_key, encode(&(m.id.0, m.sent_at)))?;
            }
        }
        Ok(self)
    }

    /// A new message id: this host's number in the high bits, then a number that grows (the
    /// caller holds `accept_order`).
    fn next_id(&self) -> Result<MessageId, StoreError> {
        let prefix = self.id_prefix.load(std::sync::atomic::Ordering::Relaxed);
        Ok(MessageId(prefix | (self.db.generate_id()? + 1)))
    }

    /// Makes every write made before this call durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        flush_with(&self.flusher).await
    }

    // ---- accounts ----

    /// Creates `user`; `false` if the name is taken.
    pub fn create_user(&self, user: &UserId, record: &UserRecord) -> Result<bool, StoreError> {
        let created = self
            .users
            .compare_and_swap(keys::user(user), None::<&[u8]>, Some(encode(record)))?
            .is_ok();
        Ok(created)
    }

    /// The account of `user`, if it exists.
    pub fn user(&self, user: &UserId) -> Result<Option<UserRecord>, StoreError> {
        self.users
            .get(keys::user(user))?
            .map(|v| decode("users", &v))
            .transpose()
    }

    /// Every user with an account here, by name.
    pub fn user_names(&self) -> Result<Vec<UserId>, StoreError> {
        self.users
            .iter()
            .map(|entry| {
                let (key, _) = entry?;
                std::str::from_utf8(&key)
                    .ok()
                    .and_then(|name| UserId::new(name).ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        tree: "users",
                        reason: "a key that is not a user name".into(),
                    })
            })
            .collect()
    }

    /// Whether `user` exists.
    pub fn user_exists(&self, user: &UserId) -> Result<bool, StoreError> {
        let known = || self.known_users.read().unwrap_or_else(|p| p.into_inner());
        if known().contains(user) {
            return Ok(true);
        }
        let exists = self.users.contains_key(keys::user(user))?;
        if exists && known().len() < KNOWN_USERS {
            self.known_users
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(user.clone());
        }
        Ok(exists)
    }

    /// Stores the hash of the token of `device`, replacing an earlier one.
    pub fn set_token(
        &self,
        user: &UserId,
        device: &DeviceId,
        hash: &[u8],
    ) -> Result<(), StoreError> {
        self.tokens.insert(keys::token(user, device), hash)?;
        Ok(())
    }

    /// The hash of the token of `device`, if it has one.
    pub fn token(&self, user: &UserId, device: &DeviceId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tokens
            .get(keys::token(user, device))?
            .map(|v| v.to_vec()))
    }

    /// Revokes the token of `device`.
    pub fn remove_token(&self, user: &UserId, device: &DeviceId) -> Result<(), StoreError> {
        self.tokens.remove(keys::token(user, device))?;
        Ok(())
    }

    // ---- relations ----

    /// Adds `other` to `user`'s list of `kind`.
    pub fn add_relation(
        &self,
        user: &UserId,
        kind: RelationKind,
        other: &UserId,
    ) -> Result<(), StoreError> {
        self.relations
            .insert(keys::relation(user, kind, other), &[])?;
        Ok(())
    }

    /// Removes `other` from `user`'s list of `kind`.
    pub fn remove_relation(
        &self,
        user: &UserId,
        kind: RelationKind,
        other: &UserId,
    ) -> Result<(), StoreError> {
        self.relations.remove(keys::relation(user, kind, other))?;
        Ok(())
    }

    /// `user`'s list of `kind`, sorted by name.
    pub fn relations(&self, user: &UserId, kind: RelationKind) -> Result<Vec<UserId>, StoreError> {
        let prefix = keys::relation_prefix(user, kind);
        let mut out = Vec::new();
        for entry in self.relations.scan_prefix(&prefix) {
            let (key, _) = entry?;
            let other =
                keys::relation_other(&key, prefix.len()).ok_or_else(|| StoreError::Corrupt {
                    tree: "relations",
                    reason: "key does not end in a user name".into(),
                })?;
            out.push(other);
        }
        Ok(out)
    }

    // ---- messages ----

    /// Stores a submission unless the same `(user, device, client_id)` was stored before.
    ///
    /// `build` makes the message from the id assigned to it. The new message is recorded for
    /// dispatch; it is durable after the next [`Store::flush`].
    pub fn accept(
        &self,
        user: &UserId,
        device: &DeviceId,
        client_id: u64,
        expires_at: Option<u64>,
        build: impl FnOnce(MessageId) -> Message,
    ) -> Result<Acceptance, StoreError> {
        let dedup_key = keys::dedup(user, device, client_id);
        let _order = self.accept_order.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = self.messages.get(&dedup_key)? {
            return self.duplicate(&existing);
        }
        let message = build(self.next_id()?);
        // In this order (see the module's documentation): a crash that keeps the dispatch
        // record but not the dedup record is repaired when the store opens.
        if let Some(at) = expires_at {
            self.messages
                .insert(keys::ttl(message.id.0), &at.to_be_bytes())?;
        }
        let dispatch = Dispatch {
            client_id: Some(client_id),
            message,
        };
        self.messages
            .insert(keys::dispatch(dispatch.message.id.0), encode(&dispatch))?;
        let message = dispatch.message;
        self.messages
            .insert(dedup_key, encode(&(message.id.0, message.sent_at)))?;
        Ok(Acceptance::New(message))
    }

    /// When message `id` expires, if it was submitted with its own time to live.
    pub fn message_expiry(&self, id: MessageId) -> Result<Option<u64>, StoreError> {
        get_u64(&self.messages, "messages", keys::ttl(id.0))
    }

    fn duplicate(&self, dedup_record: &[u8]) -> Result<Acceptance, StoreError> {
        let (id, sent_at) = decode::<(u64, u64)>("messages", dedup_record)?;
        let pending = self
            .messages
            .get(keys::dispatch(id))?
            .map(|v| decode::<Dispatch>("messages", &v).map(|d| d.message))
            .transpose()?;
        Ok(Acceptance::Duplicate {
            id: MessageId(id),
            sent_at,
            pending,
        })
    }

    /// A new message a plugin sends while handling a durable event: numbered once per
    /// `(plugin, event_key, index)`, so handling the event again yields the same message.
    pub fn effect_message(
        &self,
        plugin: &str,
        event_key: &[u8],
        index: u32,
        build: impl FnOnce(MessageId) -> Message,
    ) -> Result<Message, StoreError> {
        let key = keys::effect(plugin, event_key, index);
        let _order = self.accept_order.lock().unwrap_or_else(|p| p.into_inner());
        let mut message = build(MessageId(0));
        if let Some(existing) = self.messages.get(&key)? {
            let (id, sent_at) = decode::<(u64, u64)>("messages", &existing)?;
            message.id = MessageId(id);
            message.sent_at = sent_at;
            return Ok(message);
        }
        message.id = self.next_id()?;
        self.messages
            .insert(key, encode(&(message.id.0, message.sent_at)))?;
        Ok(message)
    }

    /// A new message a plugin sends while handling an event that does not outlive the
    /// process: numbered, not recorded.
    pub fn new_message(
        &self,
        build: impl FnOnce(MessageId) -> Message,
    ) -> Result<Message, StoreError> {
        let _order = self.accept_order.lock().unwrap_or_else(|p| p.into_inner());
        Ok(build(self.next_id()?))
    }

    /// Every accepted message whose dispatch did not finish, oldest first.
    pub fn pending_dispatch(&self) -> Result<Vec<Message>, StoreError> {
        self.messages
            .scan_prefix(keys::DISPATCH_PREFIX)
            .map(|entry| {
                let (_, value) = entry?;
                decode::<Dispatch>("messages", &value).map(|d| d.message)
            })
            .collect()
    }

    /// Records that message `id` is in every recipient's inbox.
    pub fn finish_dispatch(&self, id: MessageId) -> Result<(), StoreError> {
        self.messages.remove(keys::dispatch(id.0))?;
        Ok(())
    }

    // ---- inboxes and cursors ----

    /// Appends `message` to `user`'s inbox at `seq`, unless it is there already (a dispatch
    /// retried after a crash), to leave it at `expires_at` if not acknowledged by then.
    /// Returns whether it was appended.
    ///
    /// The caller serialises appends to one inbox and hands out increasing `seq`s.
    pub fn append_inbox(
        &self,
        user: &UserId,
        seq: u64,
        message: &Message,
        expires_at: Option<u64>,
    ) -> Result<bool, StoreError> {
        let id_key = keys::inbox_id(user, message.id.0);
        // An id record without its entry is an append a crash cut off: appended anew below.
        if let Some(at) = get_u64(&self.inbox, "inbox", &id_key)?
            && self.entry_is(user, at, message.id)?
        {
            return Ok(false);
        }
        // In this order (see the module's documentation): the expiry record first, so that
        // whatever a crash leaves of an append is taken out when it is due.
        if let Some(at) = expires_at {
            self.inbox
                .insert(keys::expiry(at, user, seq), &message.id.0.to_be_bytes())?;
        }
        self.inbox.insert(id_key, &seq.to_be_bytes())?;
        self.inbox.insert(keys::inbox(user, seq), encode(message))?;
        Ok(true)
    }

    /// Whether position `seq` of `user`'s inbox holds message `id` (whole or pruned).
    fn entry_is(&self, user: &UserId, seq: u64, id: MessageId) -> Result<bool, StoreError> {
        Ok(self
            .entry(user, seq)?
            .is_some_and(|entry| entry.message().id == id))
    }

    fn entry(&self, user: &UserId, seq: u64) -> Result<Option<Entry>, StoreError> {
        self.inbox
            .get(keys::inbox(user, seq))?
            .map(|v| Entry::decode(&v))
            .transpose()
    }

    /// The entry at position `seq` of `user`'s inbox, if it is there and not pruned.
    pub fn inbox_entry(&self, user: &UserId, seq: u64) -> Result<Option<Message>, StoreError> {
        Ok(self.entry(user, seq)?.and_then(Entry::whole))
    }

    /// Prunes the entries of `user`'s inbox that every device of the user has acknowledged
    /// (every device with a cursor: one is made when a device first takes deliveries). A
    /// pruned entry keeps its position, id, kind and sender but not its body, and is read by
    /// no session; it leaves when it expires. Returns how many entries were pruned.
    pub fn prune(&self, user: &UserId) -> Result<usize, StoreError> {
        let Some(through) = self.cursors_of(user)?.into_iter().min() else {
            return Ok(0);
        };
        let mark_key = keys::inbox_pruned(user);
        let from = get_u64(&self.inbox, "inbox", &mark_key)?.unwrap_or(0);
        if through <= from {
            return Ok(0);
        }
        let (start, end) = keys::inbox_range(user, from);
        let end = end.min(keys::inbox(user, through.saturating_add(1)));
        let mut pruned = 0;
        for entry in self.inbox.range(start..end) {
            let (key, value) = entry?;
            if let Entry::Whole(message) = Entry::decode(&value)? {
                // Unless the entry changed meanwhile (it expired): then it stays as it is.
                let swapped =
                    self.inbox
                        .compare_and_swap(key, Some(value), Some(Entry::pruned(message)))?;
                pruned += usize::from(swapped.is_ok());
            }
        }
        self.inbox.insert(mark_key, &through.to_be_bytes())?;
        Ok(pruned)
    }

    /// Up to `limit` inbox entries whose time ran out by `now`, the earliest first.
    pub fn due_expiries(&self, now: u64, limit: usize) -> Result<Vec<Expiry>, StoreError> {
        let (start, end) = keys::expiry_due(now);
        let mut due = Vec::new();
        for entry in self.inbox.range(start..end).take(limit) {
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
        if get_u64(&self.inbox, "inbox", &id_key)? == Some(expiry.seq) {
            batch.remove(id_key);
        }
        if self.entry_is(user, expiry.seq, expiry.id)? {
            batch.remove(keys::inbox(user, expiry.seq));
            // The inbox's last entries may be going: remember how far positions went.
            let high_key = keys::inbox_high(&expiry.user);
            if expiry.seq > get_u64(&self.inbox, "inbox", &high_key)?.unwrap_or(0) {
                batch.insert(high_key, &expiry.seq.to_be_bytes());
            }
        }
        self.inbox.apply_batch(batch)?;
        Ok(())
    }

    /// Whether any device of `user` has acknowledged inbox position `seq`.
    pub fn acknowledged_by_any(&self, user: &UserId, seq: u64) -> Result<bool, StoreError> {
        Ok(self
            .cursors_of(user)?
            .into_iter()
            .any(|cursor| cursor >= seq))
    }

    /// Message `id` if it is in `user`'s inbox; without its body if it was pruned
    /// ([`Store::prune`]).
    pub fn inbox_message(
        &self,
        user: &UserId,
        id: MessageId,
    ) -> Result<Option<Message>, StoreError> {
        let Some(seq) = get_u64(&self.inbox, "inbox", keys::inbox_id(user, id.0))? else {
            return Ok(None);
        };
        // An id record whose append a crash cut off may point at a missing or another entry.
        Ok(self
            .entry(user, seq)?
            .map(Entry::into_message)
            .filter(|message| message.id == id))
    }

    /// Up to `limit` entries of `user`'s inbox after position `after`, in order.
    pub fn inbox_after(
        &self,
        user: &UserId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Message)>, StoreError> {
        let (start, end) = keys::inbox_range(user, after);
        let mut out = Vec::new();
        for entry in self.inbox.range(start..end) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry?;
            let seq = keys::inbox_seq(&key).ok_or_else(|| StoreError::Corrupt {
                tree: "inbox",
                reason: "key does not end in a position".into(),
            })?;
            if let Some(message) = Entry::decode(&value)?.whole() {
                out.push((seq, message));
            }
        }
        Ok(out)
    }

    /// What waits in `user`'s inbox after position `after`: how many entries, the sum of their
    /// body sizes, the ids of the first `max_ids`, and the last position (`after` if none).
    pub fn inbox_summary(
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
        for entry in self.inbox.range(start..end) {
            let (key, value) = entry?;
            let Some(message) = Entry::decode(&value)?.whole() else {
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

    /// The highest position used in `user`'s inbox or acknowledged by one of its devices.
    /// A new entry goes after it.
    pub fn inbox_high_water(&self, user: &UserId) -> Result<u64, StoreError> {
        let (start, end) = keys::inbox_range(user, 0);
        let last = match self.inbox.range(start..end).next_back() {
            Some(entry) => keys::inbox_seq(&entry?.0).unwrap_or(0),
            None => 0,
        };
        let expired = get_u64(&self.inbox, "inbox", keys::inbox_high(user))?;
        let acknowledged = self.cursors_of(user)?.into_iter().max();
        Ok(last
            .max(expired.unwrap_or(0))
            .max(acknowledged.unwrap_or(0)))
    }

    /// The cursors of every device of `user`.
    fn cursors_of(&self, user: &UserId) -> Result<Vec<u64>, StoreError> {
        self.cursors
            .scan_prefix(keys::cursor_prefix(user))
            .map(|entry| decode_u64("cursors", &entry?.1))
            .collect()
    }

    /// Makes `device` one of the devices whose acknowledgements [`Store::prune`] waits for,
    /// with nothing acknowledged, unless it is one already.
    pub fn add_cursor(&self, user: &UserId, device: &DeviceId) -> Result<(), StoreError> {
        // Taken or not, the device has a cursor now.
        let _ = self.cursors.compare_and_swap(
            keys::cursor(user, device),
            None::<&[u8]>,
            Some(&0u64.to_be_bytes()),
        )?;
        Ok(())
    }

    /// The position `device` has acknowledged up to (0 for a new device).
    pub fn cursor(&self, user: &UserId, device: &DeviceId) -> Result<u64, StoreError> {
        Ok(get_u64(&self.cursors, "cursors", keys::cursor(user, device))?.unwrap_or(0))
    }

    /// Moves `device`'s cursor forward to `seq`; a cursor already past it stays (an old
    /// session's late ack must not move it back).
    pub fn set_cursor(&self, user: &UserId, device: &DeviceId, seq: u64) -> Result<(), StoreError> {
        self.cursors
            .fetch_and_update(keys::cursor(user, device), |old| {
                let old = old
                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    .map_or(0, u64::from_be_bytes);
                Some(old.max(seq).to_be_bytes().to_vec())
            })?;
        Ok(())
    }

    // ---- plugins ----

    /// A value of `plugin`'s own storage.
    pub fn plugin_kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .plugin_kv
            .get(keys::plugin_kv(plugin, key))?
            .map(|v| v.to_vec()))
    }

    /// Writes (or, for `None`, removes) values of `plugin`'s storage in one atomic batch.
    pub fn plugin_kv_apply(
        &self,
        plugin: &str,
        writes: &std::collections::BTreeMap<String, Option<Vec<u8>>>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (key, value) in writes {
            match value {
                Some(value) => batch.insert(keys::plugin_kv(plugin, key), value.as_slice()),
                None => batch.remove(keys::plugin_kv(plugin, key)),
            }
        }
        self.plugin_kv.apply_batch(batch)?;
        Ok(())
    }

    /// Keeps a dead letter; returns its number.
    pub fn add_dead_letter(&self, letter: &DeadLetter) -> Result<u64, StoreError> {
        let id = self.db.generate_id()?;
        self.dead_letters
            .insert(keys::dead_letter(id), encode(letter))?;
        Ok(id)
    }

    /// Dead letter `id`, if it is kept.
    pub fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, StoreError> {
        self.dead_letters
            .get(keys::dead_letter(id))?
            .map(|v| decode("dead_letters", &v))
            .transpose()
    }

    /// Takes dead letter `id` (read as `letter`) out to be handled again. A message event is
    /// recorded for dispatch first, so that from here on it is a pending message like any
    /// other: a crash before it is handled leaves it pending, never lost (at worst the letter
    /// stays listed too, and handling it twice delivers it once). `false` if the letter was no
    /// longer there.
    pub fn requeue_dead_letter(&self, id: u64, letter: &DeadLetter) -> Result<bool, StoreError> {
        if let crate::plugin::Event::Message(message) = &letter.event {
            let dispatch = Dispatch {
                client_id: None,
                message: (**message).clone(),
            };
            self.messages
                .insert(keys::dispatch(message.id.0), encode(&dispatch))?;
        }
        Ok(self.dead_letters.remove(keys::dead_letter(id))?.is_some())
    }

    /// Every dead letter with its number, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<(u64, DeadLetter)>, StoreError> {
        self.dead_letters
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                Ok((
                    decode_u64("dead_letters", &key)?,
                    decode("dead_letters", &value)?,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn message(id: u64) -> Message {
        Message {
            id: MessageId(id),
            kind: iim_proto::MessageKind::Chat,
            from: UserId::new("alice").expect("valid"),
            from_device: DeviceId::new("phone").expect("valid"),
            to: vec![UserId::new("bob").expect("valid")],
            body: b"hi".to_vec(),
            sent_at: 1,
        }
    }

    /// Opens `path` again after its last store was dropped: its flusher thread lets go of the
    /// database (and its file lock) a moment later.
    pub(crate) fn reopen<T>(path: &Path, open: impl Fn(&Path) -> Result<T, StoreError>) -> T {
        for _ in 0..200 {
            match open(path) {
                Ok(store) => return store,
                Err(StoreError::Sled(sled::Error::Io(e)))
                    if e.to_string().contains("could not acquire lock") =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
        panic!("reopen: the database stayed locked for 2 s")
    }

    /// The positions of the entries sessions would read from `user`'s inbox.
    fn positions(store: &Store, user: &str) -> Vec<u64> {
        let user = UserId::new(user).expect("valid");
        let entries = store.inbox_after(&user, 0, 100).expect("read");
        entries.into_iter().map(|(seq, _)| seq).collect()
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("store")).expect("open");
        (dir, store)
    }

    #[test]
    fn a_submission_whose_dedup_record_a_crash_cut_off_gets_it_back_on_opening() {
        let (_dir, store) = open();
        let alice = UserId::new("alice").expect("valid");
        let phone = DeviceId::new("phone").expect("valid");
        // What a crash between the two writes of `accept` leaves: the dispatch record alone.
        let cut = Dispatch {
            client_id: Some(7),
            message: message(10),
        };
        store
            .messages
            .insert(keys::dispatch(10), encode(&cut))
            .expect("write");
        // A dispatch record of an earlier version: the message alone.
        let mut old = keys::OLD_DISPATCH_PREFIX.to_vec();
        old.extend_from_slice(&11u64.to_be_bytes());
        store
            .messages
            .insert(old, encode(&message(11)))
            .expect("write");
        let store = store.recovered().expect("recover");

        let again = store
            .accept(&alice, &phone, 7, None, |_| {
                unreachable!("not a new message")
            })
            .expect("accept");
        assert_eq!(
            again,
            Acceptance::Duplicate {
                id: MessageId(10),
                sent_at: 1,
                pending: Some(message(10)),
            },
            "the resubmission is the same message, not a second one"
        );
        let pending: Vec<MessageId> = store
            .pending_dispatch()
            .expect("read")
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(pending, [MessageId(10), MessageId(11)]);
        assert_eq!(
            store
                .messages
                .scan_prefix(keys::OLD_DISPATCH_PREFIX)
                .count(),
            0,
            "the old record was moved"
        );
    }

    #[test]
    fn devices_of_an_earlier_version_get_a_cursor_so_that_pruning_waits_for_them() {
        let (_dir, store) = open();
        let bob = UserId::new("bob").expect("valid");
        let (phone, tablet) = (
            DeviceId::new("phone").expect("valid"),
            DeviceId::new("tablet").expect("valid"),
        );
        // As an earlier version left it: two devices logged in, only the phone acknowledged.
        store.db.remove(keys::FORMAT).expect("write");
        store.set_token(&bob, &phone, b"hash").expect("token");
        store.set_token(&bob, &tablet, b"hash").expect("token");
        store
            .append_inbox(&bob, 1, &message(10), None)
            .expect("append");
        store.set_cursor(&bob, &phone, 1).expect("cursor");
        let store = store.recovered().expect("recover");
        assert_eq!(
            store.prune(&bob).expect("prune"),
            0,
            "the tablet has not acknowledged"
        );
        assert_eq!(positions(&store, "bob"), [1]);
        assert_eq!(store.cursor(&bob, &phone).expect("read"), 1, "kept");
        // Opening again changes nothing.
        store.set_cursor(&bob, &tablet, 1).expect("cursor");
        let store = store.recovered().expect("recover");
        assert_eq!(store.cursor(&bob, &tablet).expect("read"), 1);
        assert_eq!(store.prune(&bob).expect("prune"), 1);
    }

    #[test]
    fn an_append_a_crash_cut_off_is_done_again_and_a_whole_one_is_not() {
        let (_dir, store) = open();
        let bob = UserId::new("bob").expect("valid");
        // Cut off after the id record: no entry at position 1.
        store
            .inbox
            .insert(keys::inbox_id(&bob, 10), &1u64.to_be_bytes())
            .expect("write");
        assert_eq!(
            store.inbox_message(&bob, MessageId(10)).expect("read"),
            None
        );
        assert_eq!(store.inbox_high_water(&bob).expect("read"), 0);
        // After the restart, another message took position 1 first.
        assert!(
            store
                .append_inbox(&bob, 1, &message(11), None)
                .expect("append")
        );
        assert_eq!(
            store.inbox_message(&bob, MessageId(10)).expect("read"),
            None
        );
        // Dispatched again, message 10 is appended after it.
        assert!(
            store
                .append_inbox(&bob, 2, &message(10), None)
                .expect("append")
        );
        assert_eq!(
            store.inbox_message(&bob, MessageId(10)).expect("read"),
            Some(message(10))
        );

        // Cut off after the expiry and id records of message 12 at position 3: a message sent
        // for an event that is not handled again, so it is never appended anew.
        store
            .inbox
            .insert(keys::expiry(100, &bob, 3), &12u64.to_be_bytes())
            .expect("write");
        store
            .inbox
            .insert(keys::inbox_id(&bob, 12), &3u64.to_be_bytes())
            .expect("write");
        // A whole append, then a dispatch done again: not appended twice.
        assert!(
            store
                .append_inbox(&bob, 4, &message(13), Some(150))
                .expect("append")
        );
        assert!(
            !store
                .append_inbox(&bob, 5, &message(13), Some(150))
                .expect("append")
        );
        // The expiry records clean up after the cut-off append and leave the whole one.
        let due = store.due_expiries(120, 10).expect("due");
        assert_eq!(
            due.iter().map(|e| (e.at, e.seq, e.id)).collect::<Vec<_>>(),
            [(100, 3, MessageId(12))]
        );
        for expiry in &due {
            store.expire(expiry).expect("expire");
        }
        assert_eq!(
            store.inbox.get(keys::inbox_id(&bob, 12)).expect("read"),
            None
        );
        assert_eq!(positions(&store, "bob"), [1, 2, 4]);
        assert_eq!(
            store.inbox_message(&bob, MessageId(13)).expect("read"),
            Some(message(13))
        );
        assert_eq!(store.due_expiries(200, 10).expect("due").len(), 1);
    }

    #[test]
    fn entries_every_device_acknowledged_are_pruned_to_what_a_read_receipt_needs() {
        let (_dir, store) = open();
        let bob = UserId::new("bob").expect("valid");
        let (phone, laptop) = (
            DeviceId::new("phone").expect("valid"),
            DeviceId::new("laptop").expect("valid"),
        );
        for seq in 1..=4 {
            store
                .append_inbox(&bob, seq, &message(10 + seq), Some(1000 + seq))
                .expect("append");
        }
        // No device takes deliveries yet: nothing is pruned.
        assert_eq!(store.prune(&bob).expect("prune"), 0);
        store.add_cursor(&bob, &phone).expect("cursor");
        store.add_cursor(&bob, &laptop).expect("cursor");
        store.add_cursor(&bob, &laptop).expect("again");
        assert_eq!(store.cursor(&bob, &laptop).expect("read"), 0);
        store.set_cursor(&bob, &phone, 3).expect("cursor");
        assert_eq!(store.prune(&bob).expect("prune"), 0, "the laptop has none");
        store.set_cursor(&bob, &laptop, 2).expect("cursor");
        assert_eq!(store.prune(&bob).expect("prune"), 2);
        assert_eq!(store.prune(&bob).expect("prune"), 0, "done already");

        // Sessions read only what some device still waits for.
        let left = positions(&store, "bob");
        assert_eq!(left, [3, 4]);
        assert_eq!(store.inbox_after(&bob, 0, 1).expect("read").len(), 1);
        let summary = store.inbox_summary(&bob, 0, 10).expect("summary");
        assert_eq!((summary.count, summary.last), (2, 4));
        assert_eq!(store.inbox_entry(&bob, 1).expect("read"), None);
        // A read receipt can still be checked: the message is there without its body.
        let pruned = store
            .inbox_message(&bob, MessageId(11))
            .expect("read")
            .expect("kept");
        assert_eq!(
            (pruned.id, pruned.from, pruned.body.len()),
            (MessageId(11), message(11).from, 0)
        );
        // Dispatched again, it is not appended again.
        assert!(
            !store
                .append_inbox(&bob, 5, &message(11), None)
                .expect("append")
        );
        // Positions go on after the pruned entries.
        assert_eq!(store.inbox_high_water(&bob).expect("read"), 4);

        // When their time is up, pruned entries leave with their records.
        for expiry in store.due_expiries(1002, 10).expect("due") {
            store.expire(&expiry).expect("expire");
        }
        assert_eq!(
            store.inbox_message(&bob, MessageId(11)).expect("read"),
            None
        );
        assert_eq!(store.inbox.get(keys::inbox(&bob, 1)).expect("read"), None);
        assert_eq!(
            store.inbox.get(keys::inbox_id(&bob, 11)).expect("read"),
            None
        );
        assert_eq!(store.inbox_after(&bob, 0, 10).expect("read").len(), 2);
    }

    #[test]
    fn expired_entries_leave_the_inbox_and_their_positions_are_not_used_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("store")).expect("open");
        let bob = UserId::new("bob").expect("valid");
        let phone = DeviceId::new("phone").expect("valid");
        store
            .append_inbox(&bob, 1, &message(10), Some(100))
            .expect("append");
        store
            .append_inbox(&bob, 2, &message(11), Some(300))
            .expect("append");
        store
            .append_inbox(&bob, 3, &message(12), Some(100))
            .expect("append");
        store
            .append_inbox(&bob, 4, &message(13), Some(300))
            .expect("append");
        store.set_cursor(&bob, &phone, 1).expect("cursor");
        assert!(store.acknowledged_by_any(&bob, 1).expect("read"));
        assert!(!store.acknowledged_by_any(&bob, 3).expect("read"));

        let due = store.due_expiries(200, 10).expect("due");
        assert_eq!(
            due.iter().map(|e| (e.at, e.seq)).collect::<Vec<_>>(),
            [(100, 1), (100, 3)]
        );
        for expiry in &due {
            let entry = store.inbox_entry(&bob, expiry.seq).expect("read");
            assert_eq!(entry.map(|m| m.id), Some(expiry.id));
            store.expire(expiry).expect("expire");
            assert_eq!(
                store.inbox_entry(&bob, expiry.seq).expect("read"),
                None,
                "gone"
            );
        }
        let left = positions(&store, "bob");
        assert_eq!(left, [2, 4]);
        assert_eq!(
            store.inbox_message(&bob, MessageId(12)).expect("read"),
            None
        );

        // Then the rest expires, the last entry with it: a new entry still goes after it.
        for expiry in store.due_expiries(400, 10).expect("due") {
            store.expire(&expiry).expect("expire");
        }
        assert!(store.inbox_after(&bob, 0, 10).expect("read").is_empty());
        assert_eq!(store.inbox_high_water(&bob).expect("read"), 4);
        assert!(store.due_expiries(u64::MAX, 10).expect("due").is_empty());
    }
}
