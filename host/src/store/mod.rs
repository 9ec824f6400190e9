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
pub mod exchange;
mod files;
mod inbox;
pub mod keys;
mod messages;
mod network;
mod plugin_kv;
mod relations;

pub use accounts::Accounts;
pub use cursors::Cursors;
pub use dead_letters::DeadLetters;
pub use files::{FileRecord, Files};
pub use inbox::{Expiry, Inbox, RESTART_GAP};
pub use messages::{Acceptance, Messages};
pub use network::NetworkStore;
pub use plugin_kv::PluginStorage;
pub use relations::Relations;

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

/// The host's durable state, one handle per concern. Cloning it is cheap: the clones share
/// the database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    flusher: std::sync::mpsc::Sender<FlushWaiter>,
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
        let result = db
            .flush()
            .map(drop)
            .and_then(|_| match &log_file {
                // sled writes its log with sync_file_range, which leaves the file's size and
                // the disk's write cache unsynced; fsync closes that gap.
                Some(file) => file.sync_data().map_err(sled::Error::Io),
                None => Ok(()),
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
    /// Opens (creating if needed) the store in directory `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let (db, flusher) = open_db(path, "iim-store-flush")?;
        let cursors = Cursors::new(&db)?;
        Self {
            accounts: Accounts::new(&db)?,
            relations: Relations::new(&db)?,
            messages: Messages::new(&db)?,
            inbox: Inbox::new(&db, cursors.clone())?,
            cursors,
            plugin_kv: PluginStorage::new(&db)?,
            dead_letters: DeadLetters::new(&db)?,
            files: Files::new(&db)?,
            network: NetworkStore::new(&db)?,
            flusher,
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

    /// Makes every write made before this call durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        flush_with(&self.flusher).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::messages::Dispatch;
    use super::*;
    use iim_proto::{DeviceId, Message, MessageId, UserId};

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
