//! The IIM entry point: `resolve(users) -> user-list` and `send(msg, user-list)`.
//!
//! This is the service plugins call (through the `iim` interface of the WIT, see
//! [`crate::plugin`]): it decides nothing about *who* gets a message, only *how* it gets there. A user-list
//! is seed 000's server row-set: one row per server, each with the rows of its users and their
//! online devices, so that resolving once gives both the distribution and the channels.

use crate::clock::now_ms;
use crate::directory::Directory;
use crate::outbox::{OutboxError, RelayOutbox, rows_by_server};
use crate::registry::{Delivery, Registry, SessionId};
use crate::store::{Store, StoreError};
use iim_proto::{Address, DeviceId, GroupId, Message, MessageKind, UserId};
use std::sync::Arc;

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
    /// A row names a server the network does not have.
    #[error("server {0} is not in this host's network")]
    UnknownServer(String),
    /// The message cannot be relayed to other hosts.
    #[error("cannot relay the message: {0}")]
    Relay(#[from] OutboxError),
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
    /// Users of other servers the message was relayed to (in one envelope).
    pub relayed: usize,
}

/// Where a user lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Home {
    /// On this host.
    Local,
    /// On another host of the network: its server id.
    Remote(String),
}

/// The IIM entry point of one host.
pub struct Iim {
    server: String,
    store: Store,
    registry: Arc<Registry>,
    /// How long a message without its own time to live stays unacknowledged in an inbox.
    default_ttl: Option<std::time::Duration>,
    /// In a network of hosts: what this host knows of it, and its relay outbox.
    network: Option<(Arc<Directory>, Arc<RelayOutbox>)>,
    /// Woken when a relayed message was recorded for the plugins.
    relayed_for_plugins: tokio::sync::Notify,
    /// Messages put in inboxes, for the plugin that notifies devices that are offline (the
    /// push plugin): see [`Iim::waiting_notices`].
    waiting: WaitingQueue,
}

/// How many waiting notices may be queued for the plugins; past it, new ones are dropped (and
/// counted in the log), so that a push gateway that is down never holds up delivery. Notices
/// for a user with a device online (which only a device that asked to be notified anyway
/// needs) take only the first half, so that those for a user with none keep room.
pub const WAITING_QUEUE: usize = 10_000;

/// A waiting notice: a message put in a user's inbox, and which of the user's devices were
/// online to take it (none, for the notice that matters most). Lives in memory: a crash may
/// lose one (never the message); a dead letter keeps one that failed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WaitingNotice {
    /// The user.
    pub user: UserId,
    /// The message.
    pub message: Arc<Message>,
    /// The user's devices that had a delivery session.
    pub online: Vec<DeviceId>,
}

/// The queue of waiting notices: the sending end, the receiving end until the host takes it,
/// whether a plugin takes them (none queued while nobody does), and how many were dropped.
struct WaitingQueue {
    tx: tokio::sync::mpsc::Sender<WaitingNotice>,
    rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<WaitingNotice>>>,
    wanted: std::sync::atomic::AtomicBool,
    dropped: std::sync::atomic::AtomicU64,
}

impl WaitingQueue {
    fn new() -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(WAITING_QUEUE);
        Self {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
            // Until the task that takes them says otherwise.
            wanted: std::sync::atomic::AtomicBool::new(true),
            dropped: Default::default(),
        }
    }
}

impl Iim {
    /// The entry point of host `server`, whose messages expire after `default_ttl` unless
    /// they have their own time to live.
    pub fn new(
        server: String,
        store: Store,
        registry: Arc<Registry>,
        default_ttl: Option<std::time::Duration>,
        network: Option<(Arc<Directory>, Arc<RelayOutbox>)>,
    ) -> Self {
        Self {
            server,
            store,
            registry,
            default_ttl,
            network,
            relayed_for_plugins: tokio::sync::Notify::new(),
            waiting: WaitingQueue::new(),
        }
    }

    /// The notices that a message was put in a user's inbox (not the user's own messages,
    /// which the user has seen), with the user's devices that were online to take it. Taken
    /// once, by the task that hands them to the plugins; `None` after.
    pub fn waiting_notices(&self) -> Option<tokio::sync::mpsc::Receiver<WaitingNotice>> {
        self.waiting
            .rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Whether a plugin takes waiting notices: the task that takes them says so, so that none
    /// is queued on a host that has no such plugin.
    pub fn want_waiting_notices(&self, wanted: bool) {
        self.waiting
            .wanted
            .store(wanted, std::sync::atomic::Ordering::Relaxed);
    }

    /// Queues the notice that `message` is in `user`'s inbox, which `live` of the user's
    /// devices took, unless the queue is full (half full, if one took it).
    fn notice_waiting(&self, user: &UserId, message: &Arc<Message>, live: usize) {
        use std::sync::atomic::Ordering;
        if &message.from == user || !self.waiting.wanted.load(Ordering::Relaxed) {
            return;
        }
        let tx = &self.waiting.tx;
        let room = if live == 0 { 1 } else { WAITING_QUEUE / 2 };
        let online = match live {
            0 => Vec::new(),
            _ => self
                .registry
                .online(user)
                .into_iter()
                .map(|(d, _)| d)
                .collect(),
        };
        let notice = WaitingNotice {
            user: user.clone(),
            message: Arc::clone(message),
            online,
        };
        if tx.capacity() < room || tx.try_send(notice).is_err() {
            let dropped = self
                .waiting
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if dropped.is_multiple_of(1000) {
                tracing::warn!(
                    dropped = dropped + 1,
                    "waiting notices dropped: the plugin that notifies is not keeping up"
                );
            }
        }
    }

    /// This host's server id.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// In a network of hosts: what this host knows of it.
    pub fn directory(&self) -> Option<&Arc<Directory>> {
        self.network.as_ref().map(|(directory, _)| directory)
    }

    /// Where `user` lives, if the user exists. In a network the directory decides (a name is
    /// one user in the whole network); a user the directory does not name lives here if it
    /// has an account here.
    pub fn home(&self, user: &UserId) -> Result<Option<Home>, IimError> {
        if let Some(server) = self.directory().and_then(|d| d.home_of_user(user))
            && server != self.server
        {
            return Ok(Some(Home::Remote(server)));
        }
        // A name claimed for this host whose account a crash cut off does not exist.
        Ok(self.store.accounts.exists(user)?.then_some(Home::Local))
    }

    /// Where `group` lives: the host whose name claim made it (DESIGN.md §7, its sequencer).
    /// A group the directory does not name is this host's, whose groups plugin knows whether
    /// it exists.
    pub fn group_home(&self, group: &GroupId) -> Home {
        match self
            .directory()
            .and_then(|d| d.home_of(&Address::Group(group.clone())))
        {
            Some(server) if server != self.server => Home::Remote(server),
            _ => Home::Local,
        }
    }

    /// Hands `message`, addressed to a group of host `server`, to that host (one `905`
    /// whose row names the group): its groups plugin passes it on to the members there.
    pub fn relay_to_group(
        &self,
        message: &Message,
        group: &GroupId,
        server: String,
    ) -> Result<(), IimError> {
        let Some((_, outbox)) = &self.network else {
            return Err(IimError::UnknownServer(server));
        };
        let explicit = self.store.messages.expiry(message.id)?;
        self.sharing(message)?;
        let rows = rows_by_server([(Address::Group(group.clone()), server)]);
        outbox.push(message, explicit, rows)?;
        Ok(())
    }

    /// A file message is leaving for another host: the network's hosts may fetch its file
    /// from here (`docs/protocol.md`, "Files across hosts").
    fn sharing(&self, message: &Message) -> Result<(), IimError> {
        if let Some(sha256) = file_of(message) {
            self.store.files.shared(&sha256, now_ms())?;
        }
        Ok(())
    }

    /// Waits until a relayed message was recorded for this host's plugins to handle
    /// ([`Iim::deliver_relayed`]).
    pub async fn dispatch_wanted(&self) {
        self.relayed_for_plugins.notified().await;
    }

    /// Whether `user` exists, here or on another host of the network.
    pub fn exists(&self, user: &UserId) -> Result<bool, IimError> {
        Ok(self.home(user)?.is_some())
    }

    /// Resolves `users` into a user-list: each user's server and, for users of this host,
    /// their online devices. Duplicates are resolved once.
    pub fn resolve(&self, users: &[UserId]) -> Result<UserList, IimError> {
        let mut servers: Vec<ServerRow> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for user in users {
            if !seen.insert(user) {
                continue;
            }
            let (server, devices) = match self.home(user)? {
                None => return Err(IimError::UnknownUser(user.clone())),
                Some(Home::Local) => (
                    &self.server,
                    self.registry
                        .online(user)
                        .into_iter()
                        .map(|(device, session)| DeviceRow { device, session })
                        .collect(),
                ),
                Some(Home::Remote(server)) => {
                    let row = UserRow {
                        user: user.clone(),
                        devices: Vec::new(),
                    };
                    match servers.iter_mut().find(|r| r.server == server) {
                        Some(r) => r.users.push(row),
                        None => servers.push(ServerRow {
                            server,
                            users: vec![row],
                        }),
                    }
                    continue;
                }
            };
            let row = UserRow {
                user: user.clone(),
                devices,
            };
            match servers.iter_mut().find(|r| &r.server == server) {
                Some(r) => r.users.push(row),
                None => servers.push(ServerRow {
                    server: server.clone(),
                    users: vec![row],
                }),
            }
        }
        Ok(UserList { servers })
    }

    /// Sends `message` to every user of `list`: appends it to the inbox of each user of this
    /// host and hands it to their online devices, and puts it once in the relay outbox for the
    /// users of other hosts, with their rows (seed 000's `905`). Sending the same message
    /// twice appends it once to each inbox.
    ///
    /// Each user goes where the directory says, whatever row of `list` names it. The device
    /// rows are not trusted for the hand-off either: a device that came online after `resolve`
    /// must get the message too, so the live sessions are read under the inbox lock (one map
    /// look-up), which closes the race with a login's backlog scan.
    pub fn send(&self, message: &Message, list: &UserList) -> Result<SendReport, IimError> {
        let mut local = Vec::new();
        let mut remote = Vec::new();
        for user in list.servers.iter().flat_map(|s| &s.users) {
            match self.home(&user.user)? {
                None => return Err(IimError::UnknownUser(user.user.clone())),
                Some(Home::Local) => local.push(&user.user),
                Some(Home::Remote(server)) => {
                    remote.push((Address::User(user.user.clone()), server))
                }
            }
        }
        let explicit = self.store.messages.expiry(message.id)?;
        let expires_at = self.expires_at(message, explicit);
        let message = Arc::new(message.clone());
        let mut report = SendReport::default();
        // The relay first: its link waits for a disk sync and three hops, the local sessions
        // for neither, and the link is woken before the sessions are.
        if let Some((_, outbox)) = &self.network
            && !remote.is_empty()
        {
            report.relayed = remote.len();
            self.sharing(&message)?;
            outbox.push(&message, explicit, rows_by_server(remote))?;
        }
        for user in local {
            if let Some(live) = self.append(user, &message, expires_at)? {
                report.appended += 1;
                report.live += live;
                self.notice_waiting(user, &message, live);
            }
        }
        Ok(report)
    }

    /// Delivers a message relayed from another host (seed 000's `906`) to the users of this
    /// host its rows name, exactly as [`Iim::send`] does for its own. Returns how many inbox
    /// entries it made (a message already in an inbox is not appended again).
    ///
    /// A row naming a group of this host is a member's message from another host: it is
    /// recorded for dispatch, as if accepted here, and the groups plugin passes it on.
    pub fn deliver_relayed(&self, envelope: &iim_proto::peer::Envelope) -> Result<usize, IimError> {
        let message = Arc::new(envelope.message.clone());
        let expires_at = self.expires_at(&message, envelope.expires_at);
        let mut appended = 0;
        for row in &envelope.rows {
            if row.server != self.server {
                tracing::warn!(server = %row.server, id = %message.id, "a relayed message names another server's users; ignored");
                continue;
            }
            for to in &row.users {
                let user = match to {
                    Address::User(user) => user,
                    Address::Group(group) => {
                        tracing::debug!(%group, id = %message.id, "a member's message from another host, for the group");
                        self.store.messages.redispatch(&message)?;
                        self.relayed_for_plugins.notify_one();
                        continue;
                    }
                };
                if !self.store.accounts.exists(user)? {
                    tracing::warn!(%user, id = %message.id, "a relayed message for a user this host does not have; dropped");
                    continue;
                }
                if let Some(live) = self.append(user, &message, expires_at)? {
                    appended += 1;
                    self.notice_waiting(user, &message, live);
                }
            }
        }
        Ok(appended)
    }

    /// When `message` leaves an inbox unacknowledged: at its own time to live, else after
    /// the host's default.
    fn expires_at(&self, message: &Message, explicit: Option<u64>) -> Option<u64> {
        explicit.or_else(|| {
            self.default_ttl
                .map(|ttl| message.sent_at.saturating_add(ttl.as_millis() as u64))
        })
    }

    /// Appends to one inbox and hands the entry to the user's sessions, under the inbox's
    /// lock, so that positions are handed out, stored and delivered in one order: a session
    /// that scans its backlog and then takes live deliveries sees every position exactly once
    /// and in order. `None` if the message was in that inbox already.
    fn append(
        &self,
        user: &UserId,
        message: &Arc<Message>,
        expires_at: Option<u64>,
    ) -> Result<Option<usize>, IimError> {
        // A file message lets its recipient read the file, from before it can be delivered,
        // and keeps the file while it is in the inbox.
        // Its body was checked when the message was accepted; a relayed one that does not
        // read grants nothing.
        if let Some(sha256) = file_of(message) {
            self.store
                .files
                .referenced(user, message.id.0, &message.from, &sha256, now_ms())?;
        }
        // An account deleted while the message was on its way gets nothing.
        let exists = || self.store.accounts.exists(user);
        Ok(self
            .store
            .inbox
            .append_if(user, message, expires_at, exists, |seq| {
                let delivery = Delivery {
                    seq,
                    message: Arc::clone(message),
                };
                self.registry.push(user, &delivery)
            })?)
    }
}

/// The file a `file` message references, if it is one.
fn file_of(message: &Message) -> Option<iim_proto::file::Sha256> {
    match &message.kind {
        MessageKind::Custom(kind) if kind == iim_proto::body::FILE_KIND => {
            iim_proto::body::FileRef::from_json(&message.body)
                .ok()?
                .sha256()
        }
        _ => None,
    }
}
