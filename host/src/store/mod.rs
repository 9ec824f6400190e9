//! Durable state, in sled, behind one small interface: a [`Store`] with one handle per concern.
//!
//! [`Accounts`] (trees `users`, `tokens`), [`Relations`] (`relations`), [`Messages`]
//! (`messages`: dedup, dispatch, effect and time-to-live records, and message ids), [`Inbox`]
//! (`inbox`: entries, id, expiry, high-water and prune records, and the positions),
//! [`Cursors`] (`cursors`), [`PluginStorage`] (`plugin_kv`), [`DeadLetters`] (`dead_letters`,
//! kept as the plugin runtime's bytes) and [`NetworkStore`] (`network`: a host's view of its
//! network and its relay outbox). The exchange has a store of its own ([`exchange`]). Every key
//! is built in [`keys`]; values are postcard. Concurrent writers of the same records are
//! serialised by the caller's locks (or the handle's), which is much cheaper than sled's
//! transactions. The store knows nothing of plugins, sessions or the network's link.
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

mod accounts;
mod cursors;
mod dead_letters;
mod encryption;
pub mod exchange;
mod files;
mod inbox;
pub mod keys;
mod messages;
mod network;
mod plugin_kv;
mod relations;
pub mod sealing;

pub use accounts::{Accounts, DeviceRecord};
pub use cursors::Cursors;
pub use dead_letters::DeadLetters;
pub use files::{FileRecord, Files};
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
    Flush(#[source] std::sync::Arc<sled::Error>),
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

/// The format of the records this version writes: 2 since inboxes are pruned.
const FORMAT: u64 = 2;

type FlushWaiter = tokio::sync::oneshot::Sender<Result<(), std::sync::Arc<sled::Error>>>;

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
        let metrics = crate::metrics::metrics();
        metrics.commit_round_size.observe(waiters.len() as f64);
        let result = crate::metrics::timed(&metrics.commit_seconds, || {
            db.flush().map(drop).and_then(|_| match &log_file {
                // sled writes its log with sync_file_range, which leaves the file's size and
                // the disk's write cache unsynced; fsync closes that gap.
                Some(file) => crate::metrics::timed(&metrics.fsync_seconds, || file.sync_data())
                    .map_err(sled::Error::Io),
                None => Ok(()),
            })
        })
        .map_err(std::sync::Arc::new);
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
        .map_err(|_| StoreError::Flusher("cannot start its thread"))?;
    Ok((db, flusher))
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
        let (db, flusher) = open_db(path, "iim-store-flush")?;
        encryption::mark_sealed(&db, &sealer)?;
        let ids = Ids::new(&db)?;
        let cursors = Cursors::new(&db)?;
        Self {
            accounts: Accounts::new(&db)?,
            relations: Relations::new(&db)?,
            messages: Messages::new(&db, ids.clone(), &sealer)?,
            inbox: Inbox::new(&db, cursors.clone(), &sealer)?,
            cursors,
            plugin_kv: PluginStorage::new(&db, &sealer)?,
            dead_letters: DeadLetters::new(&db, ids, &sealer)?,
            files: Files::new(&db, &sealer)?,
            network: NetworkStore::new(&db, &sealer)?,
            flusher,
            sealer,
            path: path.to_owned(),
            db,
        }
        .recovered()
    }

    /// Repairs what a crash can leave half written (see the module's documentation) and moves
    /// an earlier version's records to the current form.
    fn recovered(self) -> Result<Self, StoreError> {
        let format = get_u64(&self.db, "default", keys::FORMAT)?.unwrap_or(1);
        if format < FORMAT {
            self.cursors.upgrade(&self.accounts.tokens)?;
            self.db.insert(keys::FORMAT, &FORMAT.to_be_bytes())?;
        }
        self.messages.recover()?;
        Ok(self)
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
        Ok(found)
    }

    /// Makes every write made before this call durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        flush_with(&self.flusher).await
    }

    /// Seals new writes with `rotated`'s current key (a rotation: the key file, written, has
    /// it and the older keys). What older keys sealed stays readable until [`Store::reseal`].
    pub fn rotate(&self, rotated: DataKeys) -> Result<(), StoreError> {
        encryption::rotate(&self.path, &self.sealer, rotated)
    }

    /// Re-encrypts with the current data key what older keys sealed (after a rotation, or
    /// one a restart cut off); `progress` is told how many records so far. Returns how many.
    /// One at a time: the caller does not start another rotation meanwhile.
    pub fn reseal(&self, progress: impl FnMut(u64)) -> Result<u64, StoreError> {
        encryption::reseal(&self.db, &self.sealer, progress)
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
            .tree
            .insert(keys::dispatch(10), encode(&cut))
            .expect("write");
        // A dispatch record of an earlier version: the message alone.
        let mut old = keys::OLD_DISPATCH_PREFIX.to_vec();
        old.extend_from_slice(&11u64.to_be_bytes());
        store
            .messages
            .tree
            .insert(old, encode(&message(11)))
            .expect("write");
        let store = store.recovered().expect("recover");

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
            store
                .messages
                .tree
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
        store
            .accounts
            .set_token(&bob, &phone, b"hash")
            .expect("token");
        store
            .accounts
            .set_token(&bob, &tablet, b"hash")
            .expect("token");
        store
            .inbox
            .append_at(&bob, 1, &message(10), None)
            .expect("append");
        store.cursors.set(&bob, &phone, 1).expect("cursor");
        let store = store.recovered().expect("recover");
        assert_eq!(
            store.inbox.prune(&bob).expect("prune"),
            0,
            "the tablet has not acknowledged"
        );
        assert_eq!(positions(&store, "bob"), [1]);
        assert_eq!(store.cursors.get(&bob, &phone).expect("read"), 1, "kept");
        // Opening again changes nothing.
        store.cursors.set(&bob, &tablet, 1).expect("cursor");
        let store = store.recovered().expect("recover");
        assert_eq!(store.cursors.get(&bob, &tablet).expect("read"), 1);
        assert_eq!(store.inbox.prune(&bob).expect("prune"), 1);
    }

    #[test]
    fn an_append_a_crash_cut_off_is_done_again_and_a_whole_one_is_not() {
        let (_dir, store) = open();
        let bob = UserId::new("bob").expect("valid");
        // Cut off after the id record: no entry at position 1.
        store
            .inbox
            .tree
            .insert(keys::inbox_id(&bob, 10), &1u64.to_be_bytes())
            .expect("write");
        assert_eq!(
            store.inbox.message(&bob, MessageId(10)).expect("read"),
            None
        );
        assert_eq!(store.inbox.high_water(&bob).expect("read"), 0);
        // After the restart, another message took position 1 first.
        assert!(
            store
                .inbox
                .append_at(&bob, 1, &message(11), None)
                .expect("append")
        );
        assert_eq!(
            store.inbox.message(&bob, MessageId(10)).expect("read"),
            None
        );
        // Dispatched again, message 10 is appended after it.
        assert!(
            store
                .inbox
                .append_at(&bob, 2, &message(10), None)
                .expect("append")
        );
        assert_eq!(
            store.inbox.message(&bob, MessageId(10)).expect("read"),
            Some(message(10))
        );

        // Cut off after the expiry and id records of message 12 at position 3: a message sent
        // for an event that is not handled again, so it is never appended anew.
        store
            .inbox
            .tree
            .insert(keys::expiry(100, &bob, 3), &12u64.to_be_bytes())
            .expect("write");
        store
            .inbox
            .tree
            .insert(keys::inbox_id(&bob, 12), &3u64.to_be_bytes())
            .expect("write");
        // A whole append, then a dispatch done again: not appended twice.
        assert!(
            store
                .inbox
                .append_at(&bob, 4, &message(13), Some(150))
                .expect("append")
        );
        assert!(
            !store
                .inbox
                .append_at(&bob, 5, &message(13), Some(150))
                .expect("append")
        );
        // The expiry records clean up after the cut-off append and leave the whole one.
        let due = store.inbox.due(120, 10).expect("due");
        assert_eq!(
            due.iter().map(|e| (e.at, e.seq, e.id)).collect::<Vec<_>>(),
            [(100, 3, MessageId(12))]
        );
        for expiry in &due {
            store.inbox.expire(expiry).expect("expire");
        }
        assert_eq!(
            store
                .inbox
                .tree
                .get(keys::inbox_id(&bob, 12))
                .expect("read"),
            None
        );
        assert_eq!(positions(&store, "bob"), [1, 2, 4]);
        assert_eq!(
            store.inbox.message(&bob, MessageId(13)).expect("read"),
            Some(message(13))
        );
        assert_eq!(store.inbox.due(200, 10).expect("due").len(), 1);
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
        assert_eq!(
            store.inbox.tree.get(keys::inbox(&bob, 1)).expect("read"),
            None
        );
        assert_eq!(
            store
                .inbox
                .tree
                .get(keys::inbox_id(&bob, 11))
                .expect("read"),
            None
        );
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
