//! Durable state behind one small interface: a [`Store`] with one handle per concern.
//!
//! The message path's records are in the message log ([`hot`], [`log`]): messages accepted for
//! dispatch, inboxes, cursors, a host's relay position — appended to numbered segment files in
//! commit rounds, held in memory, replayed at start, compacted with snapshots. Everything else
//! is in sled: [`Accounts`] (trees `users`, `tokens`), [`Relations`] (`relations`), the dedup
//! and effect records of [`Messages`] (`messages`) and the numbering of message ids,
//! [`PluginStorage`] (`plugin_kv`), [`DeadLetters`] (`dead_letters`, kept as the plugin
//! runtime's bytes), [`Files`] (`files`) and [`NetworkStore`] (`network`: a host's view of its
//! network and its relay outbox). The exchange has a store of its own ([`exchange`]), in sled
//! only. Every sled key is built in [`keys`]; values are postcard. Concurrent writers of the
//! same records are serialised by the caller's locks (or the handle's). The store knows
//! nothing of plugins, sessions or the network's link.
//!
//! Durability: a write here is in memory, not yet on disk. [`Store::flush`] makes every write
//! before it durable. One flusher thread serves every caller (group commit): it takes all the
//! requests waiting and makes one commit round for them — sled flushed (and its log file
//! synced, if the flush wrote anything), then the message log's new records written with one
//! write and synced — and answers them all; every 200 ms it commits what nobody waited for (an
//! acknowledgement's cursor). sled flushes nothing by itself here.
//!
//! Crash consistency: each store recovers a prefix of its writes in order (sled its log, the
//! message log its records), and a round makes sled durable before the message log, so a
//! message-log record is never durable without the sled writes made before it (a plugin's
//! effect record, a dead letter, an account). The other way round is not kept by the rounds:
//! the few sled writes that must not outlive a message-log record wait for a commit first (a
//! dead letter handed back is removed after its message is durably pending; a plugin's values
//! are written after the messages its event sent are durable, `Store::commit_now`), and a
//! host's relay position is in the message log with the entries it made.

mod accounts;
mod cursors;
mod dead_letters;
mod dedup;
mod encryption;
pub mod exchange;
pub mod exchange_db;
mod files;
mod hot;
mod inbox;
pub mod keys;
mod log;
mod messages;
mod migrate;
mod network;
mod plugin_kv;
pub mod postgres;
mod relations;
pub mod sealing;

pub use accounts::{Accounts, DeviceRecord};
pub use cursors::Cursors;
pub use dead_letters::DeadLetters;
pub use files::{FileRecord, Files};
pub use hot::Counts;
pub use inbox::{Expiry, Inbox, RESTART_GAP};
pub use messages::{Acceptance, Messages};
pub use network::NetworkStore;
pub use plugin_kv::PluginStorage;
pub use relations::Relations;
pub use sealing::{DataKeys, KeyFileError, KeyId, Sealer};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::path::Path;

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption it detected).
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// Making writes durable failed (every caller waiting for that flush gets the error).
    #[error("flushing the store: {0}")]
    Flush(#[source] std::sync::Arc<StoreError>),
    /// A commit round could not write the message log: nothing written since is durable, and
    /// the store takes no more writes until the host is restarted.
    #[error("the message log failed: {0}")]
    Failed(String),
    /// The flusher thread could not be started, or has stopped.
    #[error("the store's flusher: {0}")]
    Flusher(&'static str),
    /// A sealed value did not open (docs/security.md).
    #[error("a stored value under {tree} does not open: {reason}")]
    Sealed {
        /// The tree it is in.
        tree: &'static str,
        /// Why.
        reason: sealing::OpenError,
    },
    /// The store's data keys are missing or wrong; nothing was changed.
    #[error("{0}")]
    Keys(String),
    /// The data key file could not be read or written.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// Sealing a store kept in the clear, or re-encrypting, failed on the disk.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The exchange's PostgreSQL database failed, or could not be reached (its own words).
    #[error("the database: {0}")]
    Database(String),
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

/// A record [`Store::records_containing`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundRecord {
    /// Its tree.
    pub tree: String,
    /// Its key.
    pub key: Vec<u8>,
    /// Whether the key holds what was looked for (else the value does).
    pub in_key: bool,
}

impl std::fmt::Display for FoundRecord {
    /// `tree key (in the key|value)`, the key's bytes shown as text where they are printable
    /// and `\xNN` where not.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key: String = self
            .key
            .iter()
            .map(|&b| std::ascii::escape_default(b).to_string())
            .collect();
        let place = if self.in_key { "key" } else { "value" };
        write!(f, "{}\t{key}\t(in the {place})", self.tree)
    }
}

/// The host's durable state, one handle per concern. Cloning it is cheap: the clones share
/// the database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    /// The message path's records (messages for dispatch, inboxes, cursors).
    journal: std::sync::Arc<hot::Journal>,
    flusher: std::sync::mpsc::Sender<FlushWaiter>,
    /// Seals the records that hold what users wrote (docs/security.md).
    pub sealer: Sealer,
    /// The store's directory (its key checks are beside it).
    path: std::path::PathBuf,
    /// Accounts and device tokens.
    pub accounts: Accounts,
    /// Friends and colleagues.
    pub relations: Relations,
    /// Accepted messages and the numbering of their ids.
    pub messages: Messages,
    /// Every user's inbox, and its positions.
    pub inbox: Inbox,
    /// The devices' cursors into their users' inboxes.
    pub cursors: Cursors,
    /// The plugins' own storage.
    pub plugin_kv: PluginStorage,
    /// Events no plugin build could handle.
    pub dead_letters: DeadLetters,
    /// The files' records and who may read them (the bytes are in the blob store).
    pub files: Files,
    /// In a network of hosts: what this host knows of it, and its relay outbox.
    pub network: NetworkStore,
}

/// What seals the store in directory `store`: nothing if `encrypt` is off; else the keys of
/// `key_file`, made (mode 0600) if it does not exist and the store is not encrypted yet. A
/// missing key file of an encrypted store is an error: a new key would not open it.
pub fn sealer_for(store: &Path, key_file: &Path, encrypt: bool) -> Result<Sealer, StoreError> {
    if !encrypt {
        return Ok(Sealer::clear());
    }
    if key_file.exists() {
        return Ok(Sealer::new(DataKeys::load(key_file)?));
    }
    if encryption::is_sealed(store)? {
        return Err(StoreError::Keys(format!(
            "the store {} is encrypted and its data key file {} is missing: restore that file \
             (a new key cannot open the store)",
            store.display(),
            key_file.display()
        )));
    }
    let keys = DataKeys::create(key_file, crate::clock::now_ms())?;
    tracing::warn!(
        key_file = %key_file.display(),
        "made a new data key: without this file the store cannot be read; back it up apart \
         from the data directory"
    );
    Ok(Sealer::new(keys))
}

/// The numbers of messages and dead letters: sled's id generator, above the last number an
/// earlier database of this store used (a store sealed by copying it into a new database
/// records that number, [`keys::ID_FLOOR`]), so that no number is used twice.
#[derive(Clone)]
pub(crate) struct Ids {
    db: sled::Db,
    floor: u64,
}

impl Ids {
    fn new(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            db: db.clone(),
            floor: get_u64(db, "default", keys::ID_FLOOR)?.unwrap_or(0),
        })
    }

    /// A number never handed out before.
    pub(crate) fn next(&self) -> Result<u64, StoreError> {
        Ok(self.floor + self.db.generate_id()?)
    }
}

/// The format of the records this version writes: 2 since inboxes are pruned, 3 since the
/// message path's records are in the message log ([`LOG_FORMAT`]), 4 since dedup records are
/// kept in chunks ([`CHUNK_FORMAT`]), 5 since the relay outbox is in the message log.
const FORMAT: u64 = 5;

/// The first format whose dedup records are kept in chunks.
const CHUNK_FORMAT: u64 = 4;

/// The first format whose message path's records are in the message log.
const LOG_FORMAT: u64 = 3;

/// How often the store commits when nobody asks it to.
const COMMIT_TICK: std::time::Duration = std::time::Duration::from_millis(200);

type FlushWaiter = tokio::sync::oneshot::Sender<Result<(), std::sync::Arc<StoreError>>>;

/// The group-commit loop: one commit (`commit`: a flush and a sync) for every batch of waiting
/// callers. Ends when every handle on `requests`' sender is dropped.
fn run_flusher(
    commit: impl Fn() -> Result<bool, StoreError>,
    tick: Option<std::time::Duration>,
    requests: std::sync::mpsc::Receiver<FlushWaiter>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        let first = match tick {
            Some(tick) => match requests.recv_timeout(tick) {
                Ok(first) => first,
                Err(RecvTimeoutError::Timeout) => {
                    // What no caller waited for (an acknowledgement's cursor, a device's
                    // last activity) is durable within a tick all the same; counted as a
                    // commit if there was anything to make durable.
                    let started = std::time::Instant::now();
                    match commit() {
                        Ok(true) => crate::metrics::metrics()
                            .commit_seconds
                            .observe(started.elapsed().as_secs_f64()),
                        Ok(false) => {}
                        Err(e) => tracing::error!(error = %e, "the store's periodic commit failed"),
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            },
            None => match requests.recv() {
                Ok(first) => first,
                Err(_) => return,
            },
        };
        // Every request already queued was made after its caller's writes, and so is covered
        // by a commit that starts now.
        let waiters: Vec<FlushWaiter> = std::iter::once(first).chain(requests.try_iter()).collect();
        let metrics = crate::metrics::metrics();
        metrics.commit_round_size.observe(waiters.len() as f64);
        let result = crate::metrics::timed(&metrics.commit_seconds, &commit)
            .map(drop)
            .map_err(std::sync::Arc::new);
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

/// Starts a flusher thread named `thread` that commits with `commit` when asked, and every
/// `tick` if nobody asks.
fn start_flusher(
    thread: &str,
    tick: Option<std::time::Duration>,
    commit: impl Fn() -> Result<bool, StoreError> + Send + 'static,
) -> Result<std::sync::mpsc::Sender<FlushWaiter>, StoreError> {
    let (flusher, requests) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || run_flusher(commit, tick, requests))
        .map_err(|_| StoreError::Flusher("cannot start its thread"))?;
    Ok(flusher)
}

/// Opens the sled database in directory `path`, with an fd of our own on its log file (sled
/// keeps it in `<path>/db`) to sync it: sled writes its log with `sync_file_range`, which
/// leaves the file's size and the disk's write cache unsynced.
fn open_sled(
    path: &Path,
    flush_every_ms: Option<u64>,
) -> Result<(sled::Db, Option<std::fs::File>), StoreError> {
    let db = sled::Config::new()
        .path(path)
        .flush_every_ms(flush_every_ms)
        .open()?;
    let log_file = std::fs::File::open(path.join("db")).ok();
    Ok((db, log_file))
}

/// Opens the sled database in directory `path` and starts its flusher thread (named `thread`):
/// one sled flush and one sync of its log file per round.
fn open_db(
    path: &Path,
    thread: &str,
) -> Result<(sled::Db, std::sync::mpsc::Sender<FlushWaiter>), StoreError> {
    let (db, log_file) = open_sled(path, Some(500))?;
    let flush_db = db.clone();
    let flusher = start_flusher(thread, None, move || {
        flush_db.flush()?;
        if let Some(file) = &log_file {
            let metrics = crate::metrics::metrics();
            crate::metrics::timed(&metrics.fsync_seconds, || file.sync_data())
                .map_err(sled::Error::Io)?;
        }
        Ok(true)
    })?;
    Ok((db, flusher))
}

/// Starts the thread that compacts `journal`'s log when asked (by the flusher, when the log
/// holds more dead records than live ones); it ends when the flusher does.
fn start_compactor(
    journal: &std::sync::Arc<hot::Journal>,
) -> Result<std::sync::mpsc::SyncSender<()>, StoreError> {
    let (asks, asked) = std::sync::mpsc::sync_channel::<()>(1);
    let weak = std::sync::Arc::downgrade(journal);
    std::thread::Builder::new()
        .name("iim-store-compact".into())
        .spawn(move || {
            while asked.recv().is_ok() {
                let Some(journal) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = journal.maintain() {
                    tracing::error!(error = %e, "compacting the message log failed");
                }
            }
        })
        .map_err(|_| StoreError::Flusher("cannot start the compactor's thread"))?;
    Ok(asks)
}

/// Asks `flusher` to make every write before this call durable, and waits.
async fn flush_with(flusher: &std::sync::mpsc::Sender<FlushWaiter>) -> Result<(), StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let gone = || StoreError::Flusher("it has stopped");
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
    /// Opens (creating if needed) the store in directory `path`, kept in the clear (tests,
    /// tools, and `storage.encrypt = false`).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Sealer::clear())
    }

    /// Opens (creating if needed) the store in directory `path`, its records sealed by
    /// `sealer`. A store kept in the clear until now is sealed first (into a new directory
    /// that then takes its place); a store whose keys `sealer` lacks is refused before
    /// anything is written.
    pub fn open_with(path: &Path, sealer: Sealer) -> Result<Self, StoreError> {
        encryption::seal_if_clear(path, &sealer)?;
        encryption::check_keys(path, &sealer)?;
        // sled flushes only in the commit rounds: a round's sled flush is then all that sled
        // wrote, and the round syncs its file only if it wrote anything.
        let (db, sled_log) = open_sled(path, None)?;
        encryption::mark_sealed(&db, &sealer)?;
        let log_dir = path.join("log");
        let format = get_u64(&db, "default", keys::FORMAT)?.unwrap_or(1);
        if format < LOG_FORMAT {
            // A log a move cut off before it was done: the move starts again.
            migrate::discard_log(&log_dir)?;
        }
        let journal = std::sync::Arc::new(hot::Journal::open(&log_dir, &sealer, &db, sled_log)?);
        if format < LOG_FORMAT {
            migrate::into_log(&db, &journal, &sealer, format)?;
        }
        // Before the format is marked: it runs whenever sled still holds an outbox.
        migrate::outbox_into_log(&db, &journal)?;
        migrate::dedup_into_chunks(&db, &journal, format)?;
        if get_u64(&db, "default", keys::FORMAT)?.unwrap_or(1) < FORMAT {
            db.insert(keys::FORMAT, &FORMAT.to_be_bytes())?;
            journal.commit()?;
        }
        let compactor = start_compactor(&journal)?;
        let committer = std::sync::Arc::clone(&journal);
        let flusher = start_flusher("iim-store-commit", Some(COMMIT_TICK), move || {
            let wrote = committer.commit()?;
            if committer.wants_work() {
                // Full: one is under way.
                let _ = compactor.try_send(());
            }
            Ok(wrote)
        })?;
        let ids = Ids::new(&db)?;
        let cursors = Cursors::new(&journal);
        Ok(Self {
            accounts: Accounts::new(&db)?,
            relations: Relations::new(&db)?,
            messages: Messages::new(&db, ids.clone(), &sealer, &journal)?,
            inbox: Inbox::new(&journal, cursors.clone(), &sealer),
            cursors,
            plugin_kv: PluginStorage::new(&db, &sealer)?,
            dead_letters: DeadLetters::new(&db, ids, &sealer)?,
            files: Files::new(&db, &sealer)?,
            network: NetworkStore::new(&db, &sealer, &journal)?,
            flusher,
            sealer,
            path: path.to_owned(),
            journal,
            db,
        })
    }

    /// Deletes `user`'s account and everything of it the store holds: devices and tokens,
    /// cursors, inbox, relations (theirs, and them in others' lists), dedup records, files
    /// (returned: the bytes are the blob store's to remove). The account goes first, so that
    /// nothing new is appended for it (see [`Inbox::append_if`]). Not flushed. What plugins
    /// keep for the user is theirs to forget (they are told), and messages the user sent that
    /// are in others' inboxes are those users'.
    pub fn delete_user(
        &self,
        user: &iim_proto::UserId,
    ) -> Result<Vec<iim_proto::file::Sha256>, StoreError> {
        self.accounts.delete(user)?;
        self.cursors.forget_user(user)?;
        self.inbox.forget_user(user)?;
        self.relations.forget_user(user)?;
        self.messages.forget_user(user)?;
        self.files.forget_user(user)
    }

    /// Every record whose key or (opened, if sealed) value holds `needle`: an audit of what
    /// the store keeps of a name or a text (`iim-host store find`), for instance after an
    /// account was deleted. Reads every record of every tree.
    pub fn records_containing(&self, needle: &[u8]) -> Result<Vec<FoundRecord>, StoreError> {
        let holds =
            |bytes: &[u8]| !needle.is_empty() && bytes.windows(needle.len()).any(|w| w == needle);
        let mut found = Vec::new();
        for name in self.db.tree_names() {
            let tree_name = String::from_utf8_lossy(&name).into_owned();
            let tree = self.db.open_tree(&name)?;
            for entry in tree.iter() {
                let (key, value) = entry?;
                let in_key = holds(&key);
                let in_value = !in_key
                    && if keys::sealed(&tree_name, &key) {
                        let plain =
                            self.sealer
                                .try_open(&tree_name, &key, &value)
                                .map_err(|reason| StoreError::Sealed {
                                    tree: "(a search)",
                                    reason,
                                })?;
                        holds(&plain)
                    } else {
                        holds(&value)
                    };
                if in_key || in_value {
                    found.push(FoundRecord {
                        tree: tree_name.clone(),
                        key: key.to_vec(),
                        in_key,
                    });
                }
            }
        }
        found.extend(self.journal.records_containing(&holds)?);
        Ok(found)
    }

    /// Makes every write made before this call durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        flush_with(&self.flusher).await
    }

    /// How many records of each kind the message path holds (`iim-bench store` checks that
    /// every way of writing them ends with the same).
    pub fn counts(&self) -> Result<Counts, StoreError> {
        self.journal.counts(&self.messages.tree)
    }

    /// Makes every write made before this call durable, on this thread (a commit round of its
    /// own, not shared with other callers): for the rare writer that must order a sled write
    /// after the message log's.
    pub fn commit_now(&self) -> Result<(), StoreError> {
        self.journal.commit().map(drop)
    }

    /// Seals new writes with `rotated`'s current key (a rotation: the key file, written, has
    /// it and the older keys). What older keys sealed stays readable until [`Store::reseal`].
    pub fn rotate(&self, rotated: DataKeys) -> Result<(), StoreError> {
        encryption::rotate(&self.path, &self.sealer, rotated)
    }

    /// Re-encrypts with the current data key what older keys sealed (after a rotation, or
    /// one a restart cut off); `progress` is told how many records so far. Returns how many.
    /// One at a time: the caller does not start another rotation meanwhile.
    pub fn reseal(&self, mut progress: impl FnMut(u64)) -> Result<u64, StoreError> {
        let in_sled = encryption::reseal(&self.db, &self.sealer, &mut progress)?;
        if !self.sealer.is_on() {
            return Ok(in_sled);
        }
        let in_log = self.journal.compact(true, |n| progress(in_sled + n))?;
        Ok(in_sled + in_log)
    }

    /// Forgets the older data keys: nothing here is sealed with them any longer
    /// ([`Store::reseal`] is done). The key file keeps them, for backups.
    pub fn forget_older_keys(&self) -> Result<(), StoreError> {
        encryption::forget_older_keys(&self.path, &self.sealer)
    }

    /// The data keys some record may still be sealed with (empty for a store in the clear);
    /// the files' keys too, as long as a rotation's caller forgets the older keys only after
    /// the files are re-wrapped as well (`key_rotation` does).
    pub fn keys_in_use(&self) -> Result<std::collections::BTreeSet<KeyId>, StoreError> {
        encryption::keys_in_use(&self.path)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::messages::Dispatch;
    use super::*;
    use iim_proto::{DeviceId, Message, MessageId, RelationKind, UserId};

    pub(crate) fn message(id: u64) -> Message {
        Message {
            id: MessageId(id),
            kind: iim_proto::MessageKind::Chat,
            from: UserId::new("alice").expect("valid"),
            from_device: DeviceId::new("phone").expect("valid"),
            to: vec![UserId::new("bob").expect("valid").into()],
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
        let entries = store.inbox.after(&user, 0, 100).expect("read");
        entries.into_iter().map(|(seq, _)| seq).collect()
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("store")).expect("open");
        (dir, store)
    }

    /// Every file under `dir` whose bytes contain `needle`.
    fn files_containing(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                found.extend(files_containing(&path, needle));
            } else if std::fs::read(&path)
                .expect("read")
                .windows(needle.len())
                .any(|w| w == needle)
            {
                found.push(path);
            }
        }
        found
    }

    fn marked(id: u64) -> Message {
        Message {
            body: format!("QZX-secret-{id}").into_bytes(),
            ..message(id)
        }
    }

    /// Writes what users write into every sealed kind of record of `store`.
    fn fill(store: &Store) {
        let bob = UserId::new("bob").expect("valid");
        let phone = DeviceId::new("phone").expect("valid");
        for i in 0..50u64 {
            let accepted = store
                .messages
                .accept(&bob, &phone, i, None, |id| Message { id, ..marked(i) })
                .expect("accept");
            let Acceptance::New(m) = accepted else {
                panic!("new")
            };
            store
                .inbox
                .append(&bob, &m, Some(10_000), |_| ())
                .expect("append");
        }
        let writes = std::collections::BTreeMap::from([(
            "token".to_owned(),
            Some(b"QZX-secret-plugin-value".to_vec()),
        )]);
        store.plugin_kv.apply("push", &writes).expect("kv");
        store
            .dead_letters
            .add(b"QZX-secret-dead-letter")
            .expect("dead letter");
        store
            .network
            .set_host_credential("QZX-secret-credential")
            .expect("credential");
    }

    fn key_file(dir: &Path, name: &str) -> Sealer {
        Sealer::new(DataKeys::create(&dir.join(name), 1).expect("key file"))
    }

    #[test]
    fn a_deleted_user_leaves_no_record_and_an_append_after_the_deletion_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_with(&dir.path().join("store"), key_file(dir.path(), "data.key"))
            .expect("open");
        let user = |name: &str| UserId::new(name).expect("valid");
        let (gone, bob) = (user("gone-user"), user("bob"));
        let phone = DeviceId::new("phone").expect("valid");
        let record = UserRecord {
            password_hash: "hash".into(),
            created_at: 1,
        };
        for who in [&gone, &bob] {
            assert!(store.accounts.create(who, &record).expect("create"));
            store
                .accounts
                .set_token(who, &phone, b"token")
                .expect("token");
            store.accounts.touch(who, &phone, 5, true).expect("touch");
            store.cursors.add(who, &phone).expect("cursor");
        }
        store
            .relations
            .add(&gone, RelationKind::Friend, &bob)
            .expect("relation");
        store
            .relations
            .add(&bob, RelationKind::Colleague, &gone)
            .expect("relation");
        let accepted = store
            .messages
            .accept(&gone, &phone, 7, None, |id| Message {
                id,
                from: gone.clone(),
                ..message(0)
            })
            .expect("accept");
        let Acceptance::New(sent) = accepted else {
            panic!("new")
        };
        let to_gone = store
            .messages
            .number(|id| Message { id, ..message(0) })
            .expect("id");
        for (who, m) in [(&gone, &to_gone), (&bob, &sent)] {
            store
                .inbox
                .append(who, m, Some(10_000), |_| ())
                .expect("append");
        }
        // In every inbox it was for: its dispatch is done.
        store.messages.dispatched(sent.id).expect("dispatched");
        let holding = |store: &Store| store.records_containing(b"gone-user").expect("search");
        assert!(holding(&store).len() >= 8, "{:?}", holding(&store));

        store.delete_user(&gone).expect("delete");
        // What is left holds the name only in bob's inbox, as the sender of bob's message.
        let left = holding(&store);
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!((left[0].tree.as_str(), left[0].in_key), ("inbox", false));
        assert!(!store.accounts.exists(&gone).expect("exists"));
        assert!(store.accounts.devices(&gone).expect("devices").is_empty());
        assert_eq!(
            store
                .relations
                .list(&bob, RelationKind::Colleague)
                .expect("list"),
            Vec::<UserId>::new()
        );
        // A message on its way when the account went finds it gone and writes nothing.
        let late = Message {
            id: MessageId(to_gone.id.0 + 100),
            ..to_gone.clone()
        };
        let appended = store
            .inbox
            .append_if(&gone, &late, None, || store.accounts.exists(&gone), |_| ())
            .expect("append");
        assert!(appended.is_none());
        assert_eq!(holding(&store).len(), 1);
        // Bob's account is untouched.
        assert!(store.accounts.exists(&bob).expect("exists"));
        assert_eq!(store.accounts.devices(&bob).expect("devices").len(), 1);
        assert_eq!(positions(&store, "bob").len(), 1);
    }

    #[test]
    fn a_sealed_store_holds_nothing_in_the_clear_and_opens_only_with_its_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let sealer = key_file(dir.path(), "data.key");
        let store = Store::open_with(&path, sealer.clone()).expect("open");
        fill(&store);
        let bob = UserId::new("bob").expect("valid");
        assert_eq!(store.inbox.after(&bob, 0, 100).expect("read").len(), 50);
        store.db.flush().expect("flush");
        drop(store);
        assert_eq!(
            files_containing(&path, b"QZX-secret"),
            Vec::<std::path::PathBuf>::new()
        );

        let files_before = |p: &Path| {
            let mut all = Vec::new();
            for entry in std::fs::read_dir(p).expect("dir") {
                let path = entry.expect("entry").path();
                if path.is_file() {
                    all.push((path.clone(), std::fs::read(&path).expect("read")));
                }
            }
            all.sort();
            all
        };
        let before = files_before(&path);
        for (sealer, why) in [
            (Sealer::clear(), "storage.encrypt is off"),
            (
                key_file(dir.path(), "other.key"),
                "does not open this store",
            ),
        ] {
            let refused = reopen_err(&path, sealer);
            assert!(refused.contains(why), "{refused}");
        }
        assert!(
            before == files_before(&path),
            "a refused open changed the store"
        );

        let store = reopen(&path, |p| Store::open_with(p, sealer.clone()));
        assert_eq!(store.inbox.after(&bob, 0, 100).expect("read").len(), 50);
        assert_eq!(
            store.plugin_kv.get("push", "token").expect("kv").as_deref(),
            Some(&b"QZX-secret-plugin-value"[..])
        );
        assert_eq!(
            store.network.host_credential().expect("credential"),
            "QZX-secret-credential"
        );
    }

    /// The error of opening `path` with `sealer`, waiting for the lock of a store just dropped.
    fn reopen_err(path: &Path, sealer: Sealer) -> String {
        for _ in 0..200 {
            match Store::open_with(path, sealer.clone()) {
                Ok(_) => panic!("opened"),
                Err(StoreError::Sled(sled::Error::Io(e)))
                    if e.to_string().contains("could not acquire lock") =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return e.to_string(),
            }
        }
        panic!("the database stayed locked for 2 s")
    }

    #[test]
    fn a_store_in_the_clear_is_sealed_by_copying_and_its_numbers_go_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let store = Store::open(&path).expect("open");
        fill(&store);
        let last = store.messages.number(|id| message(id.0)).expect("id").id;
        store.db.flush().expect("flush");
        drop(store);
        assert!(
            !files_containing(&path, b"QZX-secret").is_empty(),
            "the scan finds it"
        );

        let sealer = key_file(dir.path(), "data.key");
        let store = reopen(&path, |p| Store::open_with(p, sealer.clone()));
        assert!(files_containing(&path, b"QZX-secret").is_empty());
        assert!(
            !dir.path().join("store.sealing").exists() && !dir.path().join("store.clear").exists()
        );
        let bob = UserId::new("bob").expect("valid");
        let inbox = store.inbox.after(&bob, 0, 100).expect("read");
        assert_eq!(inbox.len(), 50);
        assert_eq!(inbox[7].1.body, b"QZX-secret-7");
        assert_eq!(store.messages.pending().expect("pending").len(), 50);
        let next = store.messages.number(|id| message(id.0)).expect("id").id;
        assert!(next > last, "{next:?} after {last:?}");
        assert_eq!(store.dead_letters.all().expect("all").len(), 1);
    }

    #[test]
    fn a_copy_a_crash_cut_off_is_made_again_and_a_whole_one_put_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let store = Store::open(&path).expect("open");
        fill(&store);
        store.db.flush().expect("flush");
        drop(store);
        // A copy cut off: a half-made `store.sealing` beside the store.
        std::fs::create_dir_all(dir.path().join("store.sealing")).expect("dir");
        std::fs::write(dir.path().join("store.sealing/db"), b"half").expect("write");
        let sealer = key_file(dir.path(), "data.key");
        let store = reopen(&path, |p| Store::open_with(p, sealer.clone()));
        let bob = UserId::new("bob").expect("valid");
        assert_eq!(store.inbox.after(&bob, 0, 100).expect("read").len(), 50);
        drop(store);
        // A whole copy, the store moved aside but the copy not yet in place.
        std::fs::rename(&path, dir.path().join("store.sealing")).expect("rename");
        let store = reopen(&path, |p| Store::open_with(p, sealer.clone()));
        assert_eq!(store.inbox.after(&bob, 0, 100).expect("read").len(), 50);
    }

    #[test]
    fn after_a_rotation_old_records_open_and_a_reseal_leaves_only_the_new_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let sealer = key_file(dir.path(), "data.key");
        let store = Store::open_with(&path, sealer.clone()).expect("open");
        fill(&store);
        let rotated = sealer.keys().expect("keys").rotated(2).expect("rotate");
        store.rotate(rotated).expect("rotate");
        assert_eq!(store.keys_in_use().expect("in use"), [1, 2].into());
        let bob = UserId::new("bob").expect("valid");
        assert_eq!(store.inbox.after(&bob, 0, 100).expect("read").len(), 50);
        let mut seen = 0;
        let resealed = store.reseal(|n| seen = n).expect("reseal");
        // 50 dispatch records, 50 entries, a plugin value, a dead letter, a credential.
        assert_eq!((resealed, seen), (103, 103));
        assert_eq!(store.reseal(|_| ()).expect("again"), 0);
        store.forget_older_keys().expect("forget");
        assert_eq!(store.keys_in_use().expect("in use"), [2].into());
        store.db.flush().expect("flush");
        drop(store);
        // Key 1 is no longer needed.
        let text = std::fs::read_to_string(dir.path().join("data.key")).expect("read");
        let only_2 = text
            .split("[[keys]]")
            .filter(|b| b.contains("\nid = 2\n"))
            .map(|b| format!("current = 2\n[[keys]]{b}"))
            .next()
            .expect("key 2");
        std::fs::write(dir.path().join("data.key"), only_2).expect("write");
        let sealer = Sealer::new(DataKeys::load(&dir.path().join("data.key")).expect("load"));
        let store = reopen(&path, |p| Store::open_with(p, sealer.clone()));
        assert_eq!(store.inbox.after(&bob, 0, 100).expect("read").len(), 50);
    }

    /// A store of format `format` at `path`, as an earlier version left it: `fill` writes its
    /// records into sled.
    fn earlier_store(path: &Path, format: u64, fill: impl FnOnce(&sled::Db)) {
        let db = sled::Config::new().path(path).open().expect("sled");
        if format > 1 {
            db.insert(keys::FORMAT, &format.to_be_bytes())
                .expect("write");
        }
        fill(&db);
        db.flush().expect("flush");
    }

    fn put(db: &sled::Db, tree: &str, key: Vec<u8>, value: &[u8]) {
        db.open_tree(tree)
            .expect("tree")
            .insert(key, value)
            .expect("write");
    }

    #[test]
    fn a_store_of_format_2_moves_into_the_log_and_a_cut_off_dedup_record_comes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let bob = UserId::new("bob").expect("valid");
        earlier_store(&path, 2, |db| {
            // What a crash between the two writes of an earlier `accept` left: the dispatch
            // record alone.
            let cut = Dispatch {
                client_id: Some(7),
                message: message(10),
            };
            put(db, "messages", keys::dispatch(10), &encode(&cut));
            // A dispatch record of an earlier version still: the message alone.
            let mut old = keys::OLD_DISPATCH_PREFIX.to_vec();
            old.extend_from_slice(&11u64.to_be_bytes());
            put(db, "messages", old, &encode(&message(11)));
            put(db, "messages", keys::ttl(10), &500u64.to_be_bytes());
            // An inbox entry with its expiry, another pruned, the marks, a cursor.
            put(db, "inbox", keys::inbox(&bob, 5), &encode(&message(12)));
            put(db, "inbox", keys::inbox_id(&bob, 12), &5u64.to_be_bytes());
            put(
                db,
                "inbox",
                keys::expiry(900, &bob, 5),
                &12u64.to_be_bytes(),
            );
            let mut pruned = vec![0];
            pruned.extend(encode(&Message {
                body: Vec::new(),
                ..message(9)
            }));
            put(db, "inbox", keys::inbox(&bob, 4), &pruned);
            put(db, "inbox", keys::inbox_id(&bob, 9), &4u64.to_be_bytes());
            put(db, "inbox", keys::inbox_pruned(&bob), &4u64.to_be_bytes());
            put(db, "inbox", keys::inbox_high(&bob), &3u64.to_be_bytes());
            put(
                db,
                "cursors",
                keys::cursor(&bob, &DeviceId::new("phone").expect("valid")),
                &4u64.to_be_bytes(),
            );
            put(
                db,
                "network",
                keys::NET_RELAYED_IN.to_vec(),
                &33u64.to_be_bytes(),
            );
        });
        let check = |store: &Store| {
            let alice = UserId::new("alice").expect("valid");
            let phone = DeviceId::new("phone").expect("valid");
            let again = store
                .messages
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
                .messages
                .pending()
                .expect("read")
                .iter()
                .map(|m| m.id)
                .collect();
            assert_eq!(pending, [MessageId(10), MessageId(11)]);
            assert_eq!(
                store.messages.expiry(MessageId(10)).expect("read"),
                Some(500)
            );
            assert_eq!(positions(store, "bob"), [5]);
            let kept = store
                .inbox
                .message(&bob, MessageId(9))
                .expect("read")
                .expect("kept");
            assert!(kept.body.is_empty(), "pruned, without its body");
            assert_eq!(store.inbox.high_water(&bob).expect("read"), 5);
            let due = store.inbox.due(1000, 10).expect("due");
            assert_eq!(
                due.iter().map(|e| (e.at, e.seq)).collect::<Vec<_>>(),
                [(900, 5)]
            );
            assert_eq!(store.network.relayed_in().expect("read"), 33);
            assert_eq!(store.cursors.of_user(&bob).expect("read"), [4]);
        };
        let store = reopen(&path, Store::open);
        check(&store);
        assert_eq!(
            store.db.open_tree("inbox").expect("tree").len(),
            0,
            "the old records are gone from sled"
        );
        drop(store);
        // Opening again reads the same from the log.
        let store = reopen(&path, Store::open);
        check(&store);
    }

    #[test]
    fn dedup_records_of_format_3_move_into_chunks_and_still_answer_repeats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let alice = UserId::new("alice").expect("valid");
        let (phone, tablet) = (
            DeviceId::new("phone").expect("valid"),
            DeviceId::new("tablet").expect("valid"),
        );
        // Client ids over three chunks of the phone, one far away, one of the tablet; each
        // (message id, sent at) its own.
        let mut old: Vec<(DeviceId, u64)> = (0..600).map(|c| (phone.clone(), c)).collect();
        old.push((phone.clone(), u64::MAX));
        old.push((tablet.clone(), 7));
        let record = |c: u64| (c.wrapping_mul(3).wrapping_add(1), c.wrapping_add(1000));
        earlier_store(&path, 3, |db| {
            for (device, c) in &old {
                put(
                    db,
                    "messages",
                    keys::dedup(&alice, device, *c),
                    &encode(&record(*c)),
                );
            }
            // A move a crash cut off: one chunk already written, holding one of them.
            let (chunk, low) = keys::dedup_chunk(&keys::dedup(&alice, &phone, 5)).expect("key");
            put(
                db,
                "messages",
                chunk,
                &dedup::merge(None, &[(low, record(5))]).expect("merge"),
            );
        });
        let check = |store: &Store, new: u64| {
            for (device, c) in &old {
                let again = store
                    .messages
                    .accept(&alice, device, *c, None, |_| unreachable!("a repeat"))
                    .expect("accept");
                let (id, sent_at) = record(*c);
                assert_eq!(
                    again,
                    Acceptance::Duplicate {
                        id: MessageId(id),
                        sent_at,
                        pending: None,
                    },
                    "client id {c} of {device}"
                );
            }
            assert_eq!(
                store.counts().expect("counts").dedup,
                old.len() as u64 + new
            );
            let legacy = store.db.open_tree("messages").expect("tree");
            assert_eq!(
                legacy.scan_prefix(keys::DEDUP_PREFIX).count(),
                0,
                "moved, not copied"
            );
            // 3 chunks of the phone's first 600, 1 for u64::MAX, 1 of the tablet.
            assert_eq!(legacy.scan_prefix(keys::DEDUP_CHUNK_PREFIX).count(), 5);
        };
        let store = reopen(&path, Store::open);
        check(&store, 0);
        assert_eq!(
            get_u64(&store.db, "default", keys::FORMAT).expect("read"),
            Some(FORMAT)
        );
        // A new client id is new, a neighbour of the saved ones and far from them.
        for c in [600, 1 << 40] {
            let new = store
                .messages
                .accept(&alice, &phone, c, None, |id| Message { id, ..message(0) })
                .expect("accept");
            assert!(matches!(new, Acceptance::New(_)), "client id {c}");
        }
        drop(store);
        let store = reopen(&path, Store::open);
        check(&store, 2);
        // Deleting the account forgets them all.
        store.delete_user(&alice).expect("delete");
        let legacy = store.db.open_tree("messages").expect("tree");
        assert_eq!(legacy.scan_prefix(keys::DEDUP_CHUNK_PREFIX).count(), 0);
        assert_eq!(store.counts().expect("counts").dedup, 0);
    }

    #[test]
    fn devices_of_an_earlier_version_get_a_cursor_so_that_pruning_waits_for_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let bob = UserId::new("bob").expect("valid");
        let (phone, tablet) = (
            DeviceId::new("phone").expect("valid"),
            DeviceId::new("tablet").expect("valid"),
        );
        // As format 1 left it: two devices logged in, only the phone acknowledged.
        earlier_store(&path, 1, |db| {
            put(db, "tokens", keys::token(&bob, &phone), b"hash");
            put(db, "tokens", keys::token(&bob, &tablet), b"hash");
            put(db, "inbox", keys::inbox(&bob, 1), &encode(&message(10)));
            put(db, "inbox", keys::inbox_id(&bob, 10), &1u64.to_be_bytes());
            put(
                db,
                "cursors",
                keys::cursor(&bob, &phone),
                &1u64.to_be_bytes(),
            );
        });
        let store = reopen(&path, Store::open);
        assert_eq!(
            store.inbox.prune(&bob).expect("prune"),
            0,
            "the tablet has not acknowledged"
        );
        assert_eq!(positions(&store, "bob"), [1]);
        assert_eq!(store.cursors.get(&bob, &phone).expect("read"), 1, "kept");
        store.cursors.set(&bob, &tablet, 1).expect("cursor");
        assert_eq!(store.inbox.prune(&bob).expect("prune"), 1);
    }

    #[test]
    fn an_append_a_crash_cut_off_in_an_earlier_format_still_raises_the_high_water() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let bob = UserId::new("bob").expect("valid");
        // Cut off after the expiry and id records of message 12 at position 3; message 10's
        // cut off after its id record.
        earlier_store(&path, 2, |db| {
            put(db, "inbox", keys::inbox_id(&bob, 10), &1u64.to_be_bytes());
            put(
                db,
                "inbox",
                keys::expiry(100, &bob, 3),
                &12u64.to_be_bytes(),
            );
            put(db, "inbox", keys::inbox_id(&bob, 12), &3u64.to_be_bytes());
        });
        let store = reopen(&path, Store::open);
        assert_eq!(
            store.inbox.message(&bob, MessageId(10)).expect("read"),
            None
        );
        assert_eq!(store.inbox.high_water(&bob).expect("read"), 3);
        assert!(store.inbox.due(u64::MAX, 10).expect("due").is_empty());
        // Dispatched again, both are appended.
        assert!(
            store
                .inbox
                .append_at(&bob, 4, &message(10), None)
                .expect("append")
        );
        assert!(
            store
                .inbox
                .append_at(&bob, 5, &message(12), None)
                .expect("append")
        );
        assert!(
            !store
                .inbox
                .append_at(&bob, 6, &message(12), None)
                .expect("append")
        );
        assert_eq!(positions(&store, "bob"), [4, 5]);
    }

    #[test]
    fn a_relay_outbox_of_format_4_moves_into_the_log_and_numbering_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let envelope = |id: u64| iim_proto::peer::Envelope {
            message: message(id),
            expires_at: None,
            rows: vec![iim_proto::peer::RelayRow {
                server: "h2".into(),
                users: vec![UserId::new("bob").expect("valid").into()],
            }],
        };
        // Acknowledged up to 3; 4 and 5 wait.
        earlier_store(&path, 4, |db| {
            put(
                db,
                "network",
                keys::NET_OUTBOX_ACKED.to_vec(),
                &3u64.to_be_bytes(),
            );
            for seq in [4, 5] {
                put(
                    db,
                    "network",
                    keys::net_outbox(seq),
                    &encode(&envelope(seq)),
                );
            }
        });
        let check = |store: &Store, waiting: &[u64]| {
            let read = store.network.relay_outbox(0, 10).expect("read");
            let seqs: Vec<u64> = read.iter().map(|(seq, _)| *seq).collect();
            assert_eq!(seqs, waiting);
            for (seq, e) in read {
                assert_eq!(e, envelope(seq), "the envelope as it was");
            }
            assert_eq!(store.network.relay_waiting(), waiting.len());
        };
        let store = reopen(&path, Store::open);
        check(&store, &[4, 5]);
        let network = store.db.open_tree("network").expect("tree");
        assert_eq!(
            network.scan_prefix(keys::NET_OUTBOX_PREFIX).count(),
            0,
            "gone from sled"
        );
        assert!(network.get(keys::NET_OUTBOX_ACKED).expect("read").is_none());
        assert_eq!(
            get_u64(&store.db, "default", keys::FORMAT).expect("read"),
            Some(FORMAT)
        );
        assert_eq!(store.network.relay_push(&envelope(6)).expect("push"), 6);
        store.network.relay_acked(4).expect("ack");
        drop((network, store));
        let store = reopen(&path, Store::open);
        check(&store, &[5, 6]);
        // Everything acknowledged: numbering goes on after it, across a restart.
        store.network.relay_acked(6).expect("ack");
        drop(store);
        let store = reopen(&path, Store::open);
        check(&store, &[]);
        assert_eq!(store.network.relay_push(&envelope(7)).expect("push"), 7);
    }

    #[test]
    fn compactions_under_writes_replay_to_the_same_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let sealer = key_file(dir.path(), "data.key");
        let store = Store::open_with(&path, sealer.clone()).expect("open");
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                let users: Vec<UserId> = (0..7)
                    .map(|i| UserId::new(format!("u{i}")).expect("valid"))
                    .collect();
                let phone = DeviceId::new("phone").expect("valid");
                let alice = UserId::new("alice").expect("valid");
                for i in 0..3000u64 {
                    let user = &users[(i % 7) as usize];
                    let m = Message {
                        id: MessageId(10_000 + i),
                        ..marked(i)
                    };
                    store
                        .inbox
                        .append(user, &m, Some(i % 500), |_| ())
                        .expect("append");
                    if i % 5 == 0 {
                        store
                            .cursors
                            .set(user, &phone, 1 << 20 | i)
                            .expect("cursor");
                        store.inbox.prune(user).expect("prune");
                    }
                    if i % 13 == 0 {
                        for expiry in store.inbox.due(i / 10, 20).expect("due") {
                            store.inbox.expire(&expiry).expect("expire");
                        }
                    }
                    let accepted = store
                        .messages
                        .accept(&alice, &phone, i, Some(i + 50_000), |id| Message {
                            id,
                            ..marked(i)
                        })
                        .expect("accept");
                    if let Acceptance::New(m) = accepted
                        && i % 3 != 0
                    {
                        store.messages.dispatched(m.id).expect("dispatched");
                    }
                    // An earlier one again, wherever its dedup record is: in memory, being
                    // saved by a compaction, or in sled.
                    for earlier in [i / 2, i.saturating_sub(1)] {
                        let again = store.messages.accept(&alice, &phone, earlier, None, |_| {
                            unreachable!("client id {earlier} again, at {i}")
                        });
                        assert!(matches!(again, Ok(Acceptance::Duplicate { .. })));
                    }
                    if i % 700 == 0 {
                        store.cursors.forget_user(user).expect("forget");
                        store.inbox.forget_user(user).expect("forget");
                    }
                    // The relay outbox: an envelope for another host every other message,
                    // acknowledged some way behind.
                    if i % 2 == 0 {
                        let envelope = iim_proto::peer::Envelope {
                            message: marked(i),
                            expires_at: Some(i),
                            rows: vec![iim_proto::peer::RelayRow {
                                server: "h2".into(),
                                users: vec![user.clone().into()],
                            }],
                        };
                        let seq = store.network.relay_push(&envelope).expect("push");
                        if i % 22 == 0 {
                            store
                                .network
                                .relay_acked(seq.saturating_sub(7))
                                .expect("ack");
                        }
                    }
                    if i % 97 == 0 {
                        store.journal.commit().expect("commit");
                    }
                }
            })
        };
        let mut compactions = 0;
        while !writer.is_finished() {
            store.journal.compact(false, |_| ()).expect("compact");
            compactions += 1;
        }
        writer.join().expect("writer");
        store.journal.compact(false, |_| ()).expect("compact");
        assert!(
            compactions > 1,
            "compacted {compactions} times under writes"
        );
        let before = store.journal.fingerprint();
        assert!(before.len() > 1000, "{} lines", before.len());
        assert!(
            before.iter().filter(|l| l.starts_with("relay out")).count() > 5,
            "envelopes wait in the relay outbox"
        );
        drop(store);
        let store = reopen(&path, |p| Store::open_with(p, sealer.clone()));
        let after = store.journal.fingerprint();
        assert!(before == after, "the replay differs");
        // Every dedup record is back: each submission is a repeat.
        let alice = UserId::new("alice").expect("valid");
        let phone = DeviceId::new("phone").expect("valid");
        for i in [0, 1, 1500, 2999] {
            let again = store
                .messages
                .accept(&alice, &phone, i, None, |_| unreachable!("a repeat"))
                .expect("accept");
            assert!(matches!(again, Acceptance::Duplicate { .. }));
        }
    }

    #[test]
    fn the_log_is_compacted_and_replays_to_the_same_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let store = Store::open(&path).expect("open");
        let bob = UserId::new("bob").expect("valid");
        let phone = DeviceId::new("phone").expect("valid");
        store.cursors.add(&bob, &phone).expect("cursor");
        for seq in 1..=300 {
            let m = marked(seq);
            store
                .inbox
                .append_at(&bob, seq, &m, Some(10_000 + seq))
                .expect("append");
        }
        store.cursors.set(&bob, &phone, 100).expect("cursor");
        assert_eq!(store.inbox.prune(&bob).expect("prune"), 100);
        for expiry in store.inbox.due(10_050, 1000).expect("due") {
            store.inbox.expire(&expiry).expect("expire");
        }
        let alice = UserId::new("alice").expect("valid");
        for c in 0..5 {
            store
                .messages
                .accept(&alice, &phone, c, Some(99_999_999_999_999), |id| Message {
                    id,
                    ..marked(1000 + c)
                })
                .expect("accept");
        }
        let first = store.messages.pending().expect("pending")[0].id;
        store.messages.dispatched(first).expect("dispatched");
        let before = (
            store.inbox.after(&bob, 0, 1000).expect("read"),
            store.inbox.message(&bob, MessageId(60)).expect("read"),
            store.messages.pending().expect("pending"),
            store.inbox.high_water(&bob).expect("read"),
            store.inbox.count_waiting().expect("count"),
        );
        store.journal.compact(false, |_| ()).expect("compact");
        let log = path.join("log");
        let segments = std::fs::read_dir(&log).expect("list").count();
        assert_eq!(segments, 1, "the older segments went");
        let after = |store: &Store| {
            (
                store.inbox.after(&bob, 0, 1000).expect("read"),
                store.inbox.message(&bob, MessageId(60)).expect("read"),
                store.messages.pending().expect("pending"),
                store.inbox.high_water(&bob).expect("read"),
                store.inbox.count_waiting().expect("count"),
            )
        };
        assert_eq!(after(&store), before);
        // The pruned entries lost their bodies in the copy.
        assert!(files_containing(&log, b"QZX-secret-60").is_empty());
        assert_eq!(files_containing(&log, b"QZX-secret-200").len(), 1);
        drop(store);
        let store = reopen(&path, Store::open);
        assert_eq!(after(&store), before);
        let again = store
            .messages
            .accept(&alice, &phone, 3, None, |_| unreachable!("a repeat"))
            .expect("accept");
        assert!(matches!(again, Acceptance::Duplicate { .. }));
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
                .inbox
                .append_at(&bob, seq, &message(10 + seq), Some(1000 + seq))
                .expect("append");
        }
        // No device takes deliveries yet: nothing is pruned.
        assert_eq!(store.inbox.prune(&bob).expect("prune"), 0);
        store.cursors.add(&bob, &phone).expect("cursor");
        store.cursors.add(&bob, &laptop).expect("cursor");
        store.cursors.add(&bob, &laptop).expect("again");
        assert_eq!(store.cursors.get(&bob, &laptop).expect("read"), 0);
        store.cursors.set(&bob, &phone, 3).expect("cursor");
        assert_eq!(
            store.inbox.prune(&bob).expect("prune"),
            0,
            "the laptop has none"
        );
        store.cursors.set(&bob, &laptop, 2).expect("cursor");
        assert_eq!(store.inbox.prune(&bob).expect("prune"), 2);
        assert_eq!(store.inbox.prune(&bob).expect("prune"), 0, "done already");

        // Sessions read only what some device still waits for.
        let left = positions(&store, "bob");
        assert_eq!(left, [3, 4]);
        assert_eq!(store.inbox.after(&bob, 0, 1).expect("read").len(), 1);
        let summary = store.inbox.summary(&bob, 0, 10).expect("summary");
        assert_eq!((summary.count, summary.last), (2, 4));
        assert_eq!(store.inbox.entry(&bob, 1).expect("read"), None);
        // A read receipt can still be checked: the message is there without its body.
        let pruned = store
            .inbox
            .message(&bob, MessageId(11))
            .expect("read")
            .expect("kept");
        assert_eq!(
            (pruned.id, pruned.from, pruned.body.len()),
            (MessageId(11), message(11).from, 0)
        );
        // Dispatched again, it is not appended again.
        assert!(
            !store
                .inbox
                .append_at(&bob, 5, &message(11), None)
                .expect("append")
        );
        // Positions go on after the pruned entries.
        assert_eq!(store.inbox.high_water(&bob).expect("read"), 4);

        // When their time is up, pruned entries leave with their records.
        for expiry in store.inbox.due(1002, 10).expect("due") {
            store.inbox.expire(&expiry).expect("expire");
        }
        assert_eq!(
            store.inbox.message(&bob, MessageId(11)).expect("read"),
            None
        );
        assert_eq!(store.inbox.entry(&bob, 1).expect("read"), None);
        assert_eq!(store.inbox.after(&bob, 0, 10).expect("read").len(), 2);
    }

    #[test]
    fn expired_entries_leave_the_inbox_and_their_positions_are_not_used_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("store")).expect("open");
        let bob = UserId::new("bob").expect("valid");
        let phone = DeviceId::new("phone").expect("valid");
        store
            .inbox
            .append_at(&bob, 1, &message(10), Some(100))
            .expect("append");
        store
            .inbox
            .append_at(&bob, 2, &message(11), Some(300))
            .expect("append");
        store
            .inbox
            .append_at(&bob, 3, &message(12), Some(100))
            .expect("append");
        store
            .inbox
            .append_at(&bob, 4, &message(13), Some(300))
            .expect("append");
        store.cursors.set(&bob, &phone, 1).expect("cursor");
        assert!(store.inbox.acknowledged_by_any(&bob, 1).expect("read"));
        assert!(!store.inbox.acknowledged_by_any(&bob, 3).expect("read"));

        let due = store.inbox.due(200, 10).expect("due");
        assert_eq!(
            due.iter().map(|e| (e.at, e.seq)).collect::<Vec<_>>(),
            [(100, 1), (100, 3)]
        );
        for expiry in &due {
            let entry = store.inbox.entry(&bob, expiry.seq).expect("read");
            assert_eq!(entry.map(|m| m.id), Some(expiry.id));
            store.inbox.expire(expiry).expect("expire");
            assert_eq!(
                store.inbox.entry(&bob, expiry.seq).expect("read"),
                None,
                "gone"
            );
        }
        let left = positions(&store, "bob");
        assert_eq!(left, [2, 4]);
        assert_eq!(
            store.inbox.message(&bob, MessageId(12)).expect("read"),
            None
        );

        // Then the rest expires, the last entry with it: a new entry still goes after it.
        for expiry in store.inbox.due(400, 10).expect("due") {
            store.inbox.expire(&expiry).expect("expire");
        }
        assert!(store.inbox.after(&bob, 0, 10).expect("read").is_empty());
        assert_eq!(store.inbox.high_water(&bob).expect("read"), 4);
        assert!(store.inbox.due(u64::MAX, 10).expect("due").is_empty());
    }
}
