//! Which devices are online, and the way to hand each of them a delivery.

use iim_proto::{DeviceId, ErrorCode, Message, UserId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, mpsc, watch};

/// A session's number, unique in this host process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

/// A message appended to an inbox, on its way to one device's session.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Its inbox position.
    pub seq: u64,
    /// The message.
    pub message: Arc<Message>,
}

/// Why the host ends a session from outside it.
#[derive(Debug, Clone)]
pub struct Kick {
    /// The code sent to the client.
    pub code: ErrorCode,
    /// The reason sent to the client.
    pub reason: String,
}

struct Entry {
    device: DeviceId,
    session: SessionId,
    deliveries: mpsc::Sender<Delivery>,
    lag: Arc<Notify>,
    kick: watch::Sender<Option<Kick>>,
}

impl Entry {
    fn kick(&self, code: ErrorCode, reason: impl Into<String>) {
        let _ = self.kick.send(Some(Kick {
            code,
            reason: reason.into(),
        }));
    }
}

/// What a session gets when it becomes its device's delivery session.
pub struct Attachment {
    /// Its number.
    pub session: SessionId,
    /// Deliveries appended after the attachment.
    pub deliveries: mpsc::Receiver<Delivery>,
    /// Notified when a delivery did not fit in the queue: the session must read the inbox
    /// from the store again (everything pushed is in the inbox first).
    pub lag: Arc<Notify>,
    /// Set when the host ends the session.
    pub kick: watch::Receiver<Option<Kick>>,
}

/// An authenticated connection, delivery session or not: what ends it when its device is
/// revoked or its account deleted.
struct Connection {
    device: DeviceId,
    id: SessionId,
    kick: watch::Sender<Option<Kick>>,
}

/// What an authenticated connection holds while it is one: told when the host ends it.
pub struct SignedIn {
    /// Its number, to sign it out with.
    pub id: SessionId,
    /// Set when the host ends the connection.
    pub kick: watch::Receiver<Option<Kick>>,
}

/// The delivery sessions of every online device, and every authenticated connection.
pub struct Registry {
    sessions: Mutex<HashMap<UserId, Vec<Entry>>>,
    connections: Mutex<HashMap<UserId, Vec<Connection>>>,
    next_session: AtomicU64,
    queue: usize,
}

impl Registry {
    /// A registry whose sessions buffer at most `queue` deliveries each.
    pub fn new(queue: usize) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            queue: queue.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, Vec<Entry>>> {
        // A panic while holding this lock cannot leave the map half-updated (every update is
        // one push or retain), so a poisoned lock is still consistent.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_connections(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, Vec<Connection>>> {
        // As `lock`: every update is one push or retain.
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a connection that authenticated as `device` of `user` until
    /// [`Registry::sign_out`], so that revoking the device ends it.
    pub fn sign_in(&self, user: &UserId, device: &DeviceId) -> SignedIn {
        let id = SessionId(self.next_session.fetch_add(1, Ordering::Relaxed));
        let (tx, kick) = watch::channel(None);
        self.lock_connections()
            .entry(user.clone())
            .or_default()
            .push(Connection {
                device: device.clone(),
                id,
                kick: tx,
            });
        SignedIn { id, kick }
    }

    /// Forgets a connection that ended.
    pub fn sign_out(&self, user: &UserId, id: SessionId) {
        let mut connections = self.lock_connections();
        if let Some(list) = connections.get_mut(user) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                connections.remove(user);
            }
        }
    }

    /// How many authenticated connections each device of `user` has open.
    pub fn connections(&self, user: &UserId) -> HashMap<DeviceId, u32> {
        let mut counts = HashMap::new();
        for connection in self.lock_connections().get(user).into_iter().flatten() {
            *counts.entry(connection.device.clone()).or_default() += 1;
        }
        counts
    }

    /// Ends every connection of `user` for which `which` holds, delivery sessions included.
    fn kick_connections(
        &self,
        user: &UserId,
        which: impl Fn(&DeviceId) -> bool,
        code: ErrorCode,
        reason: &str,
    ) {
        for connection in self.lock_connections().get(user).into_iter().flatten() {
            if which(&connection.device) {
                let _ = connection.kick.send(Some(Kick {
                    code,
                    reason: reason.to_owned(),
                }));
            }
        }
        if let Some(entries) = self.lock().get(user) {
            for entry in entries.iter().filter(|e| which(&e.device)) {
                entry.kick(code, reason);
            }
        }
    }

    /// Makes a new session the delivery session of `device`, ending the one it replaces.
    pub fn attach(&self, user: &UserId, device: &DeviceId) -> Attachment {
        let session = SessionId(self.next_session.fetch_add(1, Ordering::Relaxed));
        let (tx, deliveries) = mpsc::channel(self.queue);
        let (kick_tx, kick) = watch::channel(None);
        let lag = Arc::new(Notify::new());
        let mut sessions = self.lock();
        let entries = sessions.entry(user.clone()).or_default();
        entries.retain(|e| {
            let same = &e.device == device;
            if same {
                e.kick(
                    ErrorCode::SESSION_REPLACED,
                    "another connection of this device took over its deliveries",
                );
            }
            !same
        });
        entries.push(Entry {
            device: device.clone(),
            session,
            deliveries: tx,
            lag: Arc::clone(&lag),
            kick: kick_tx,
        });
        Attachment {
            session,
            deliveries,
            lag,
            kick,
        }
    }

    /// Removes a session (it ended). Does nothing if it was replaced already.
    pub fn detach(&self, user: &UserId, session: SessionId) {
        let mut sessions = self.lock();
        if let Some(entries) = sessions.get_mut(user) {
            entries.retain(|e| e.session != session);
            if entries.is_empty() {
                sessions.remove(user);
            }
        }
    }

    /// The online devices of `user` and their sessions.
    pub fn online(&self, user: &UserId) -> Vec<(DeviceId, SessionId)> {
        self.lock()
            .get(user)
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| (e.device.clone(), e.session))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every user with devices online, and how many.
    pub fn online_counts(&self) -> Vec<(UserId, u32)> {
        self.lock()
            .iter()
            .map(|(user, entries)| (user.clone(), entries.len() as u32))
            .collect()
    }

    /// Hands `delivery` to every online device of `user`; returns how many took it.
    ///
    /// A session whose queue is full is told it lagged instead: the delivery is in the inbox
    /// already, so the session catches up from the store, and one slow device cannot make the
    /// host buffer without bound.
    pub fn push(&self, user: &UserId, delivery: &Delivery) -> usize {
        let mut sessions = self.lock();
        let Some(entries) = sessions.get_mut(user) else {
            return 0;
        };
        let mut delivered = 0;
        entries.retain(|e| match e.deliveries.try_send(delivery.clone()) {
            Ok(()) => {
                delivered += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                e.lag.notify_one();
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if entries.is_empty() {
            sessions.remove(user);
        }
        delivered
    }

    /// Ends every connection of one device (logged out, revoked).
    pub fn kick_device(&self, user: &UserId, device: &DeviceId, code: ErrorCode, reason: &str) {
        self.kick_connections(user, |d| d == device, code, reason);
    }

    /// Ends every connection of `user`'s devices but `keep` (the password changed).
    pub fn kick_others(&self, user: &UserId, keep: &DeviceId, code: ErrorCode, reason: &str) {
        self.kick_connections(user, |d| d != keep, code, reason);
    }

    /// Ends every connection of `user` (the account was deleted).
    pub fn kick_user(&self, user: &UserId, code: ErrorCode, reason: &str) {
        self.kick_connections(user, |_| true, code, reason);
    }

    /// Ends every session (host shutdown).
    pub fn kick_all(&self, code: ErrorCode, reason: &str) {
        for entry in self.lock().values().flatten() {
            entry.kick(code, reason);
        }
    }
}
