//! The exchange's durable state: the server registry, the user directory and the relay
//! outboxes, one per target host.
//!
//! Trees: `servers` (server id → [`ServerRecord`]), `directory` (user → home server, and
//! version → user), `relay` (per target, number → `906` envelope; per origin, the highest
//! `905` number stored). A claim writes its two directory records in one batch (claims are
//! rare); so does a release, which removes the user's home and adds a version whose user has
//! none: hosts learn of it in version order, as of a claim. A `905` writes one outbox entry per target, then the origin's number: a crash
//! between them makes the origin send it again, and the targets take it once (an inbox holds a
//! message at most once).

use super::{Sealer, StoreError, decode, encode, flush_with, get_u64, keys, open_db};
use iim_proto::peer::{Envelope, RelayRow, ServerInfo};
use iim_proto::{Address, Message, UserId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A registered host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerRecord {
    /// Its number (the bits of its message ids above `iim_proto::peer::ID_BITS`).
    pub number: u16,
    /// Its address for clients.
    pub addr: String,
    /// Whether it was connected when this was written (a restarted exchange marks every
    /// server down until it joins again).
    pub up: bool,
    /// When it last joined or left, in ms since the Unix epoch.
    pub since: u64,
    /// The SHA-256 of the credential it was given at its first join.
    pub credential: Vec<u8>,
}

/// What [`ExchangeStore::join`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joining {
    /// A known server showed its credential: its number.
    Known(u16),
    /// A new server: its number. The credential it showed is the one it must show from now
    /// on.
    New(u16),
    /// The server id is registered to a host with another credential.
    WrongCredential,
}

pub(super) fn credential_hash(credential: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(credential.as_bytes()).to_vec()
}

/// Whether `credential` is the one whose hash is `stored` (in constant time).
pub(super) fn same_credential(stored: &[u8], credential: &str) -> bool {
    let given = credential_hash(credential);
    given.len() == stored.len()
        && given
            .iter()
            .zip(stored)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The rows of a `905` from `origin` that are relayed: one per target server, each user
/// once, none empty (a row set that repeats a server, a faulty or hostile host's, makes no
/// more copies); rows for the origin's own users, or for a server `known` does not have, are
/// dropped with a warning.
pub(super) fn target_rows(
    origin: &str,
    message: &Message,
    rows: Vec<RelayRow>,
    mut known: impl FnMut(&str) -> Result<bool, StoreError>,
) -> Result<Vec<RelayRow>, StoreError> {
    let mut merged: Vec<RelayRow> = Vec::new();
    for row in rows {
        if row.server == origin {
            tracing::warn!(origin, id = %message.id, "a relayed message names the origin's own users; that row is dropped");
            continue;
        }
        if !known(&row.server)? {
            tracing::warn!(origin, server = %row.server, id = %message.id, "a relayed message names a server the registry does not have; that row is dropped");
            continue;
        }
        match merged.iter_mut().find(|r| r.server == row.server) {
            Some(r) => r.users.extend(row.users),
            None => merged.push(row),
        }
    }
    for row in &mut merged {
        row.users.sort();
        row.users.dedup();
    }
    merged.retain(|row| !row.users.is_empty());
    Ok(merged)
}

/// The exchange's durable state.
#[derive(Clone)]
pub struct ExchangeStore {
    db: sled::Db,
    servers: sled::Tree,
    directory: sled::Tree,
    relay: sled::Tree,
    /// Held while a server is registered (numbers are handed out once) or a name claimed.
    registry_lock: Arc<Mutex<()>>,
    /// The last outbox number of each target, held while an envelope is numbered and written.
    outbox_heads: Arc<Mutex<HashMap<String, u64>>>,
    /// Held while a `905` is stored: two links of one host (the old one not yet ended) must
    /// not store the same envelopes side by side.
    inbound_lock: Arc<Mutex<()>>,
    flusher: std::sync::mpsc::Sender<super::FlushWaiter>,
    /// The relayed envelopes (they hold messages) are sealed.
    pub(crate) sealer: Sealer,
    /// The store's directory (its key checks are beside it).
    path: std::path::PathBuf,
}

impl ExchangeStore {
    /// Opens (creating if needed) the store in directory `path`. Every server is marked down:
    /// it is up again when it joins.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Sealer::clear())
    }

    /// Opens (creating if needed) the store in directory `path`, its relayed messages sealed
    /// by `sealer`; a store kept in the clear until now is sealed first, and one whose keys
    /// `sealer` lacks is refused before anything is written (as [`super::Store::open_with`]).
    pub fn open_with(path: &Path, sealer: Sealer) -> Result<Self, StoreError> {
        super::encryption::seal_if_clear(path, &sealer)?;
        super::encryption::check_keys(path, &sealer)?;
        let (db, flusher) = open_db(path, "iim-exchange-flush")?;
        super::encryption::mark_sealed(&db, &sealer)?;
        let store = Self {
            sealer,
            servers: db.open_tree("servers")?,
            directory: db.open_tree("directory")?,
            relay: db.open_tree("relay")?,
            registry_lock: Default::default(),
            outbox_heads: Default::default(),
            inbound_lock: Default::default(),
            flusher,
            db,
            path: path.to_owned(),
        };
        for entry in store.servers.iter() {
            let (key, value) = entry?;
            let mut record: ServerRecord = decode("servers", &value)?;
            if record.up {
                record.up = false;
                store.servers.insert(key, encode(&record))?;
            }
        }
        Ok(store)
    }

    /// Makes every write made before this call durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        flush_with(&self.flusher).await
    }

    /// As [`super::Store::rotate`].
    pub fn rotate(&self, rotated: super::DataKeys) -> Result<(), StoreError> {
        super::encryption::rotate(&self.path, &self.sealer, rotated)
    }

    /// As [`super::Store::reseal`].
    pub fn reseal(&self, progress: impl FnMut(u64)) -> Result<u64, StoreError> {
        super::encryption::reseal(&self.db, &self.sealer, progress)
    }

    /// As [`super::Store::forget_older_keys`].
    pub fn forget_older_keys(&self) -> Result<(), StoreError> {
        super::encryption::forget_older_keys(&self.path, &self.sealer)
    }

    /// As [`super::Store::keys_in_use`].
    pub fn keys_in_use(&self) -> Result<std::collections::BTreeSet<super::KeyId>, StoreError> {
        super::encryption::keys_in_use(&self.path)
    }

    // ---- registry ----

    /// Registers server `id` at `addr` as up, if `credential` is the one it showed at its
    /// first join; a new server gets the next number, and its credential is recorded.
    pub fn join(
        &self,
        id: &str,
        addr: &str,
        credential: &str,
        now: u64,
    ) -> Result<Joining, StoreError> {
        let _lock = self.registry_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (joining, hash) = match self.server(id)? {
            Some(record) => {
                if !same_credential(&record.credential, credential) {
                    return Ok(Joining::WrongCredential);
                }
                (Joining::Known(record.number), record.credential)
            }
            None => {
                let next = get_u64(&self.db, "default", keys::EX_NEXT_NUMBER)?.unwrap_or(1);
                if next > u64::from(iim_proto::peer::MAX_HOST_NUMBER) {
                    return Err(StoreError::Corrupt {
                        tree: "servers",
                        reason: "every server number is taken".into(),
                    });
                }
                self.db
                    .insert(keys::EX_NEXT_NUMBER, &(next + 1).to_be_bytes())?;
                (Joining::New(next as u16), credential_hash(credential))
            }
        };
        let number = match &joining {
            Joining::Known(n) | Joining::New(n) => *n,
            Joining::WrongCredential => 0,
        };
        let record = ServerRecord {
            number,
            addr: addr.to_owned(),
            up: true,
            since: now,
            credential: hash,
        };
        self.servers.insert(keys::ex_server(id), encode(&record))?;
        Ok(joining)
    }

    /// Marks server `id` down.
    pub fn leave(&self, id: &str, now: u64) -> Result<(), StoreError> {
        let _lock = self.registry_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut record) = self.server(id)? {
            record.up = false;
            record.since = now;
            self.servers.insert(keys::ex_server(id), encode(&record))?;
        }
        Ok(())
    }

    /// Server `id`'s record.
    pub fn server(&self, id: &str) -> Result<Option<ServerRecord>, StoreError> {
        self.servers
            .get(keys::ex_server(id))?
            .map(|v| decode("servers", &v))
            .transpose()
    }

    /// The registry, by server id.
    pub fn servers(&self) -> Result<Vec<ServerInfo>, StoreError> {
        self.servers
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                let record: ServerRecord = decode("servers", &value)?;
                Ok(ServerInfo {
                    id: String::from_utf8_lossy(&key).into_owned(),
                    number: record.number,
                    addr: record.addr,
                    up: record.up,
                })
            })
            .collect()
    }

    // ---- directory ----

    /// Claims `user` (a user's name or a group's) for `server`: the home of `user`
    /// afterwards, and the new directory version if the name was free.
    pub fn claim(&self, user: &Address, server: &str) -> Result<(String, Option<u64>), StoreError> {
        let _lock = self.registry_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(home) = self.home(user)? {
            return Ok((home, None));
        }
        let version = self.directory_version()? + 1;
        let mut batch = sled::Batch::default();
        batch.insert(keys::ex_home(user), server.as_bytes());
        batch.insert(keys::ex_version(version), user.to_string().as_bytes());
        self.directory.apply_batch(batch)?;
        Ok((server.to_owned(), Some(version)))
    }

    /// Releases the name of `user`, whose account `server` deleted: the name's home afterwards
    /// (`None`: it is free), and the new directory version if it was `server`'s until now.
    /// The version's entry has no home ([`ExchangeStore::directory_after`] gives it an empty
    /// one), so that hosts forget the name. A name of another server is not released; a name
    /// nobody has is free already.
    pub fn release(
        &self,
        user: &UserId,
        server: &str,
    ) -> Result<(Option<String>, Option<u64>), StoreError> {
        let _lock = self.registry_lock.lock().unwrap_or_else(|p| p.into_inner());
        let name = Address::User(user.clone());
        match self.home(&name)? {
            None => return Ok((None, None)),
            Some(home) if home != server => return Ok((Some(home), None)),
            Some(_) => {}
        }
        let version = self.directory_version()? + 1;
        let mut batch = sled::Batch::default();
        batch.remove(keys::ex_home(&name));
        batch.insert(keys::ex_version(version), name.to_string().as_bytes());
        self.directory.apply_batch(batch)?;
        Ok((None, Some(version)))
    }

    /// The home server of `user` (a user or a group), if it exists.
    pub fn home(&self, user: &Address) -> Result<Option<String>, StoreError> {
        Ok(self
            .directory
            .get(keys::ex_home(user))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The version of the last directory entry.
    pub fn directory_version(&self) -> Result<u64, StoreError> {
        let (start, end) = keys::ex_versions_after(0);
        Ok(match self.directory.range(start..end).next_back() {
            Some(entry) => keys::ex_version_of(&entry?.0).unwrap_or(0),
            None => 0,
        })
    }

    /// Up to `limit` directory entries after version `after`, with the version of the last.
    /// Each names its user's home as it is now: empty for a name released since (as a host
    /// takes each entry in order, the last one of a name is what the host keeps).
    pub fn directory_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(u64, Vec<(Address, String)>), StoreError> {
        let (start, end) = keys::ex_versions_after(after);
        let mut last = after;
        let mut entries = Vec::new();
        for entry in self.directory.range(start..end).take(limit) {
            let (key, value) = entry?;
            let corrupt = || StoreError::Corrupt {
                tree: "directory",
                reason: "a version record that does not decode".into(),
            };
            last = keys::ex_version_of(&key).ok_or_else(corrupt)?;
            let user = std::str::from_utf8(&value)
                .ok()
                .and_then(|name| name.parse::<Address>().ok())
                .ok_or_else(corrupt)?;
            let home = self.home(&user)?.unwrap_or_default();
            entries.push((user, home));
        }
        Ok((last, entries))
    }

    // ---- relay ----

    /// The highest `905` number from `origin` that is stored.
    pub fn inbound(&self, origin: &str) -> Result<u64, StoreError> {
        Ok(get_u64(&self.relay, "relay", keys::ex_inbound(origin))?.unwrap_or(0))
    }

    /// Stores `905` number `seq` from `origin`: one `906` per row, in its target's outbox.
    /// Returns the targets, or nothing if it was stored before. Durable after the next flush.
    pub fn relay_in(
        &self,
        origin: &str,
        seq: u64,
        envelope: Envelope,
    ) -> Result<Vec<String>, StoreError> {
        let _inbound = self.inbound_lock.lock().unwrap_or_else(|p| p.into_inner());
        if seq <= self.inbound(origin)? {
            return Ok(Vec::new());
        }
        let Envelope {
            message,
            expires_at,
            rows,
        } = envelope;
        let merged = target_rows(origin, &message, rows, |server| {
            Ok(self.server(server)?.is_some())
        })?;
        let mut targets = Vec::with_capacity(merged.len());
        for row in merged {
            let target = row.server.clone();
            let one = Envelope {
                message: message.clone(),
                expires_at,
                rows: vec![row],
            };
            self.outbox_push(&target, &one)?;
            targets.push(target);
        }
        self.relay
            .insert(keys::ex_inbound(origin), &seq.to_be_bytes())?;
        Ok(targets)
    }

    fn outbox_push(&self, target: &str, envelope: &Envelope) -> Result<u64, StoreError> {
        let mut heads = self.outbox_heads.lock().unwrap_or_else(|p| p.into_inner());
        let last = match heads.get(target) {
            Some(&last) => last,
            None => self.outbox_last(target)?,
        };
        let seq = last.saturating_add(1);
        let key = keys::ex_outbox(target, seq);
        let sealed = self.sealer.seal("relay", &key, encode(envelope));
        self.relay.insert(key, sealed)?;
        heads.insert(target.to_owned(), seq);
        Ok(seq)
    }

    /// The last number of `target`'s outbox: its last entry, or what `target` acknowledged.
    fn outbox_last(&self, target: &str) -> Result<u64, StoreError> {
        let (start, end) = keys::ex_outbox_after(target, 0);
        let last = match self.relay.range(start..end).next_back() {
            Some(entry) => keys::outbox_seq(&entry?.0).unwrap_or(0),
            None => 0,
        };
        let acked = get_u64(&self.relay, "relay", keys::ex_acked(target))?.unwrap_or(0);
        Ok(last.max(acked))
    }

    /// Up to `limit` entries of `target`'s outbox after `after`, in order.
    pub fn outbox(
        &self,
        target: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Envelope)>, StoreError> {
        let (start, end) = keys::ex_outbox_after(target, after);
        let mut out = Vec::new();
        for entry in self.relay.range(start..end).take(limit) {
            let (key, value) = entry?;
            let seq = keys::outbox_seq(&key).ok_or_else(|| StoreError::Corrupt {
                tree: "relay",
                reason: "outbox key without a number".into(),
            })?;
            let envelope = self.sealer.open("relay", &key, &value)?;
            out.push((seq, decode("relay", &envelope)?));
        }
        Ok(out)
    }

    /// `target` has every entry of its outbox up to `seq`: they go.
    pub fn outbox_acked(&self, target: &str, seq: u64) -> Result<(), StoreError> {
        let mut heads = self.outbox_heads.lock().unwrap_or_else(|p| p.into_inner());
        let last = match heads.get(target) {
            Some(&last) => last,
            None => self.outbox_last(target)?,
        };
        if seq > last {
            // The host has numbers this exchange never made durably (its store was lost or
            // rolled back): numbering goes on above them, or the host would take new
            // envelopes for repeats and drop them.
            tracing::error!(
                target,
                acknowledged = seq,
                last,
                "a host acknowledged relay envelopes this exchange has no record of"
            );
        }
        let acked_key = keys::ex_acked(target);
        if seq > get_u64(&self.relay, "relay", &acked_key)?.unwrap_or(0) {
            self.relay.insert(acked_key, &seq.to_be_bytes())?;
        }
        heads.insert(target.to_owned(), last.max(seq));
        drop(heads);
        let (start, _) = keys::ex_outbox_after(target, 0);
        let end = keys::ex_outbox(target, seq.saturating_add(1));
        for entry in self.relay.range(start..end) {
            self.relay.remove(entry?.0)?;
        }
        Ok(())
    }

    /// How many envelopes wait in `target`'s outbox.
    pub fn outbox_len(&self, target: &str) -> usize {
        let (start, end) = keys::ex_outbox_after(target, 0);
        self.relay.range(start..end).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{message, reopen};

    fn user(name: &str) -> Address {
        Address::User(iim_proto::UserId::new(name).expect("valid"))
    }

    fn row(server: &str, users: &[&str]) -> RelayRow {
        RelayRow {
            server: server.into(),
            users: users.iter().map(|u| user(u)).collect(),
        }
    }

    #[test]
    fn servers_keep_their_numbers_and_a_name_is_claimed_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("exchange");
        {
            let store = ExchangeStore::open(&path).expect("open");
            let h1 = "h1's own secret";
            assert_eq!(
                store.join("h1", "127.0.0.1:1", h1, 1).expect("join"),
                Joining::New(1)
            );
            assert_eq!(
                store.join("h2", "127.0.0.1:2", "h2's", 1).expect("join"),
                Joining::New(2)
            );
            assert_eq!(
                store.join("h1", "127.0.0.1:9", h1, 2).expect("again"),
                Joining::Known(1),
                "same number"
            );
            // Another host that takes h1's id (a new data directory, a mistake) is refused,
            // and changes nothing.
            for wrong in ["", "0123", &h1[1..]] {
                assert_eq!(
                    store.join("h1", "127.0.0.1:66", wrong, 3).expect("join"),
                    Joining::WrongCredential
                );
            }
            assert_eq!(
                store.claim(&user("alice"), "h1").expect("claim"),
                ("h1".to_owned(), Some(1))
            );
            assert_eq!(
                store.claim(&user("alice"), "h2").expect("claim"),
                ("h1".to_owned(), None),
                "taken"
            );
            assert_eq!(
                store.claim(&user("alice"), "h1").expect("claim"),
                ("h1".to_owned(), None),
                "its own already"
            );
            assert_eq!(
                store.claim(&user("bob"), "h2").expect("claim"),
                ("h2".to_owned(), Some(2))
            );
        }
        let store = reopen(&path, ExchangeStore::open);
        let servers = store.servers().expect("servers");
        assert_eq!(
            servers
                .iter()
                .map(|s| (s.id.as_str(), s.number, s.addr.as_str(), s.up))
                .collect::<Vec<_>>(),
            vec![
                ("h1", 1, "127.0.0.1:9", false),
                ("h2", 2, "127.0.0.1:2", false)
            ],
            "a restarted exchange has every host down until it joins"
        );
        assert!(matches!(
            store.join("h3", "127.0.0.1:3", "h3's", 3).expect("join"),
            Joining::New(3)
        ));
        assert_eq!(store.directory_version().expect("version"), 2);
        assert_eq!(
            store.directory_after(0, 1).expect("read"),
            (1, vec![(user("alice"), "h1".to_owned())])
        );
        assert_eq!(
            store.directory_after(1, 10).expect("read"),
            (2, vec![(user("bob"), "h2".to_owned())])
        );
        assert_eq!(store.directory_after(2, 10).expect("read"), (2, vec![]));
    }

    #[test]
    fn a_released_name_leaves_the_directory_in_a_version_of_its_own_and_is_free_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("exchange");
        let dora = iim_proto::UserId::new("dora").expect("valid");
        {
            let store = ExchangeStore::open(&path).expect("open");
            assert_eq!(
                store.claim(&user("dora"), "h1").expect("claim"),
                ("h1".to_owned(), Some(1))
            );
            assert_eq!(
                store.claim(&user("bob"), "h2").expect("claim"),
                ("h2".to_owned(), Some(2))
            );
            // Only its home releases a name.
            assert_eq!(
                store.release(&dora, "h2").expect("release"),
                (Some("h1".to_owned()), None),
                "h1's, not h2's"
            );
            assert_eq!(
                store.home(&user("dora")).expect("home").as_deref(),
                Some("h1")
            );
            assert_eq!(
                store.release(&dora, "h1").expect("release"),
                (None, Some(3))
            );
            assert_eq!(store.home(&user("dora")).expect("home"), None);
            assert_eq!(
                store.release(&dora, "h1").expect("again"),
                (None, None),
                "free already: nothing new"
            );
        }
        // Durable, and in the version log: a host that joins after it learns that the name
        // is free (an empty home), wherever it starts.
        let store = reopen(&path, ExchangeStore::open);
        assert_eq!(store.directory_version().expect("version"), 3);
        assert_eq!(
            store.directory_after(2, 10).expect("read"),
            (3, vec![(user("dora"), String::new())])
        );
        assert_eq!(
            store.directory_after(0, 10).expect("read"),
            (
                3,
                vec![
                    (user("dora"), String::new()),
                    (user("bob"), "h2".to_owned()),
                    (user("dora"), String::new()),
                ]
            ),
            "every entry of a name as the name is now"
        );
        // Another host claims the name: a new version, its home.
        assert_eq!(
            store.claim(&user("dora"), "h2").expect("claim"),
            ("h2".to_owned(), Some(4))
        );
        assert_eq!(
            store.directory_after(3, 10).expect("read"),
            (4, vec![(user("dora"), "h2".to_owned())])
        );
        assert_eq!(
            store.release(&dora, "h1").expect("release"),
            (Some("h2".to_owned()), None),
            "h1 cannot release h2's dora"
        );
    }

    #[test]
    fn a_relayed_message_is_stored_once_per_target_host_and_taken_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("exchange");
        let store = ExchangeStore::open(&path).expect("open");
        for (i, id) in ["h1", "h2", "h3"].iter().enumerate() {
            store
                .join(id, &format!("127.0.0.1:{i}"), "", 1)
                .expect("join");
        }
        let envelope = Envelope {
            message: message(10),
            expires_at: Some(99),
            rows: vec![
                row("h2", &["bob", "carol"]),
                row("h3", &["dave"]),
                row("h9", &["eve"]),
            ],
        };
        let targets = store.relay_in("h1", 1, envelope.clone()).expect("store");
        assert_eq!(
            targets,
            vec!["h2", "h3"],
            "a server the registry lacks is dropped"
        );
        assert!(
            store
                .relay_in("h1", 1, envelope.clone())
                .expect("again")
                .is_empty(),
            "905 number 1 from h1 was stored before"
        );
        assert_eq!(store.inbound("h1").expect("read"), 1);
        let to_h2 = store.outbox("h2", 0, 10).expect("read");
        assert_eq!(to_h2.len(), 1);
        assert_eq!(to_h2[0].0, 1);
        assert_eq!(to_h2[0].1.rows, vec![row("h2", &["bob", "carol"])]);
        assert_eq!(to_h2[0].1.expires_at, Some(99));
        assert_eq!(
            store.outbox("h3", 0, 10).expect("read")[0].1.rows,
            vec![row("h3", &["dave"])]
        );

        // h2 took it: its outbox empties, and its numbering goes on after a reopen.
        store.outbox_acked("h2", 1).expect("ack");
        assert_eq!(store.outbox_len("h2"), 0);
        assert_eq!(store.outbox_len("h3"), 1, "h3's is its own");
        drop(store);
        let store = reopen(&path, ExchangeStore::open);
        let more = Envelope {
            rows: vec![row("h2", &["bob"])],
            ..envelope
        };
        store.relay_in("h1", 2, more).expect("store");
        assert_eq!(store.outbox("h2", 0, 10).expect("read")[0].0, 2);
    }
}
