//! The exchange's durable state: the server registry, the user directory and the relay
//! outboxes, one per target host.
//!
//! Trees: `servers` (server id → [`ServerRecord`]), `directory` (user → home server, and
//! version → user), `relay` (per target, number → `906` envelope; per origin, the highest
//! `905` number stored). A claim writes its two directory records in one batch (claims are
//! rare). A `905` writes one outbox entry per target, then the origin's number: a crash
//! between them makes the origin send it again, and the targets take it once (an inbox holds a
//! message at most once).

use super::{StoreError, decode, encode, flush_with, get_u64, keys, open_db};
use iim_proto::UserId;
use iim_proto::peer::{Envelope, RelayRow, ServerInfo};
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
    flusher: std::sync::mpsc::Sender<super::FlushWaiter>,
}

impl ExchangeStore {
    /// Opens (creating if needed) the store in directory `path`. Every server is marked down:
    /// it is up again when it joins.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let (db, flusher) = open_db(path, "iim-exchange-flush")?;
        let store = Self {
            servers: db.open_tree("servers")?,
            directory: db.open_tree("directory")?,
            relay: db.open_tree("relay")?,
            registry_lock: Default::default(),
            outbox_heads: Default::default(),
            flusher,
            db,
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

    // ---- registry ----

    /// Registers server `id` at `addr` as up; a new server gets the next number. Returns its
    /// number.
    pub fn join(&self, id: &str, addr: &str, now: u64) -> Result<u16, StoreError> {
        let _lock = self.registry_lock.lock().unwrap_or_else(|p| p.into_inner());
        let number = match self.server(id)? {
            Some(record) => record.number,
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
                next as u16
            }
        };
        let record = ServerRecord {
            number,
            addr: addr.to_owned(),
            up: true,
            since: now,
        };
        self.servers.insert(keys::ex_server(id), encode(&record))?;
        Ok(number)
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

    /// Claims `user` for `server`: the home of `user` afterwards, and the new directory
    /// version if the name was free.
    pub fn claim(&self, user: &UserId, server: &str) -> Result<(String, Option<u64>), StoreError> {
        let _lock = self.registry_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(home) = self.home(user)? {
            return Ok((home, None));
        }
        let version = self.directory_version()? + 1;
        let mut batch = sled::Batch::default();
        batch.insert(keys::ex_home(user), server.as_bytes());
        batch.insert(keys::ex_version(version), user.as_str().as_bytes());
        self.directory.apply_batch(batch)?;
        Ok((server.to_owned(), Some(version)))
    }

    /// The home server of `user`, if it exists.
    pub fn home(&self, user: &UserId) -> Result<Option<String>, StoreError> {
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
    pub fn directory_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(u64, Vec<(UserId, String)>), StoreError> {
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
                .and_then(|name| UserId::new(name).ok())
                .ok_or_else(corrupt)?;
            if let Some(home) = self.home(&user)? {
                entries.push((user, home));
            }
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
        if seq <= self.inbound(origin)? {
            return Ok(Vec::new());
        }
        let Envelope {
            message,
            expires_at,
            rows,
        } = envelope;
        let mut targets = Vec::with_capacity(rows.len());
        for row in rows {
            if self.server(&row.server)?.is_none() {
                tracing::warn!(origin, server = %row.server, id = %message.id, "a relayed message names a server the registry does not have; that row is dropped");
                continue;
            }
            let target = row.server.clone();
            let one = Envelope {
                message: message.clone(),
                expires_at,
                rows: vec![RelayRow {
                    server: row.server,
                    users: row.users,
                }],
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
        let seq = last + 1;
        self.relay
            .insert(keys::ex_outbox(target, seq), encode(envelope))?;
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
            out.push((seq, decode("relay", &value)?));
        }
        Ok(out)
    }

    /// `target` has every entry of its outbox up to `seq`: they go.
    pub fn outbox_acked(&self, target: &str, seq: u64) -> Result<(), StoreError> {
        let acked_key = keys::ex_acked(target);
        if seq > get_u64(&self.relay, "relay", &acked_key)?.unwrap_or(0) {
            self.relay.insert(acked_key, &seq.to_be_bytes())?;
        }
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
