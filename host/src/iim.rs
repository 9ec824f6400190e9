//! The IIM entry point: `resolve(users) -> user-list` and `send(msg, user-list)`.
//!
//! This is the service plugins call (through the `iim` interface of the WIT, see
//! [`crate::plugin`]): it decides nothing about *who* gets a message, only *how* it gets there. A user-list
//! is seed 000's server row-set: one row per server, each with the rows of its users and their
//! online devices, so that resolving once gives both the distribution and the channels.

use crate::registry::{Delivery, Registry, SessionId};
use crate::store::{Store, StoreError};
use iim_proto::{DeviceId, Message, UserId};
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

/// A resolved set of recipients, grouped by the server that holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserList {
    /// One row per server.
    pub servers: Vec<ServerRow>,
}

/// The users of a user-list that live on one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRow {
    /// The server's id.
    pub server: String,
    /// Its users.
    pub users: Vec<UserRow>,
}

/// One user of a user-list and the devices that were online when it was resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    /// The user.
    pub user: UserId,
    /// The online devices and their sessions (channels).
    pub devices: Vec<DeviceRow>,
}

/// An online device of a user-list row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    /// The device.
    pub device: DeviceId,
    /// Its delivery session.
    pub session: SessionId,
}

/// Why `resolve` or `send` failed.
#[derive(Debug, thiserror::Error)]
pub enum IimError {
    /// A user named does not exist.
    #[error("no such user: {0}")]
    UnknownUser(UserId),
    /// A row names a server this host cannot reach (cross-server relay is not built yet).
    #[error("server {0} is not reachable from this host")]
    UnknownServer(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `send` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Inbox entries appended (a recipient that had the message already is not counted).
    pub appended: usize,
    /// Deliveries handed to online sessions.
    pub live: usize,
}

const INBOX_SHARDS: usize = 64;

/// How far past the stored high-water mark a user's positions resume after a start.
///
/// Entries are pushed to online devices before the store flushes them (only the submission is
/// durable when it is accepted), so a crash can lose the last entries of an inbox after a
/// device has seen their positions. A device drops a position it has seen as a repeat, so
/// those positions must never be handed out again: a run starts each inbox this far above
/// what the store shows, far more than one inbox takes between two flushes (sled flushes at
/// least every 500 ms). Positions only need to grow, not to be contiguous.
pub const RESTART_GAP: u64 = 1 << 20;

/// The IIM entry point of one host.
pub struct Iim {
    server: String,
    store: Store,
    registry: Arc<Registry>,
    /// The last inbox position of each user seen since start, sharded by user. An append holds
    /// its shard's lock from choosing the position until the live hand-off, so positions are
    /// handed out, stored and delivered in one order: a session that scans its backlog and
    /// then takes live deliveries sees every position exactly once and in order.
    inbox_heads: Vec<Mutex<HashMap<UserId, u64>>>,
    /// How long a message without its own time to live stays unacknowledged in an inbox.
    default_ttl: Option<std::time::Duration>,
}

impl Iim {
    /// The entry point of host `server`, whose messages expire after `default_ttl` unless
    /// they have their own time to live.
    pub fn new(
        server: String,
        store: Store,
        registry: Arc<Registry>,
        default_ttl: Option<std::time::Duration>,
    ) -> Self {
        Self {
            server,
            store,
            registry,
            default_ttl,
            inbox_heads: (0..INBOX_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    /// This host's server id.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Resolves `users` into a user-list: each user's server and online devices.
    /// Duplicates are resolved once.
    pub fn resolve(&self, users: &[UserId]) -> Result<UserList, IimError> {
        let mut rows: Vec<UserRow> = Vec::with_capacity(users.len());
        for user in users {
            if rows.iter().any(|r| &r.user == user) {
                continue;
            }
            if !self.store.user_exists(user)? {
                return Err(IimError::UnknownUser(user.clone()));
            }
            let devices = self
                .registry
                .online(user)
                .into_iter()
                .map(|(device, session)| DeviceRow { device, session })
                .collect();
            rows.push(UserRow {
                user: user.clone(),
                devices,
            });
        }
        Ok(UserList {
            servers: vec![ServerRow {
                server: self.server.clone(),
                users: rows,
            }],
        })
    }

    /// Sends `message` to every user of `list`: appends it to each inbox, then hands it to
    /// each online device. Sending the same message twice appends it once.
    ///
    /// The device rows of the list are not trusted for the hand-off: a device that came online
    /// after `resolve` must get the message too, so the live sessions are read under the inbox
    /// lock (one map look-up), which closes the race with a login's backlog scan.
    pub fn send(&self, message: &Message, list: &UserList) -> Result<SendReport, IimError> {
        if let Some(row) = list.servers.iter().find(|r| r.server != self.server) {
            return Err(IimError::UnknownServer(row.server.clone()));
        }
        let message = Arc::new(message.clone());
        let mut report = SendReport::default();
        for row in list.servers.iter().flat_map(|s| &s.users) {
            if let Some(live) = self.append(&row.user, &message)? {
                report.appended += 1;
                report.live += live;
            }
        }
        Ok(report)
    }

    /// Appends to one inbox and hands the entry to the user's sessions. `None` if the message
    /// was in that inbox already.
    fn append(&self, user: &UserId, message: &Arc<Message>) -> Result<Option<usize>, IimError> {
        let mut hasher = DefaultHasher::new();
        user.hash(&mut hasher);
        let shard = &self.inbox_heads[hasher.finish() as usize % INBOX_SHARDS];
        let mut heads = shard.lock().unwrap_or_else(|p| p.into_inner());
        let head = match heads.get(user) {
            Some(&head) => head,
            None => self
                .store
                .inbox_high_water(user)?
                .saturating_add(RESTART_GAP),
        };
        let seq = head + 1;
        let expires_at = match self.store.message_expiry(message.id)? {
            Some(at) => Some(at),
            None => self
                .default_ttl
                .map(|ttl| message.sent_at.saturating_add(ttl.as_millis() as u64)),
        };
        if !self.store.append_inbox(user, seq, message, expires_at)? {
            return Ok(None);
        }
        heads.insert(user.clone(), seq);
        let delivery = Delivery {
            seq,
            message: Arc::clone(message),
        };
        Ok(Some(self.registry.push(user, &delivery)))
    }
}
