//! The exchange's registry, directory and relay, whichever store keeps them: its own sled
//! store ([`ExchangeStore`], the embedded default) or a PostgreSQL database that several
//! exchanges share ([`PgExchange`], DESIGN.md §10). Both answer alike, and both tell of their
//! changes alike ([`ExchangeDb::changes`]): the sled store of the changes this exchange made,
//! the database of those every exchange made. An exchange tells its hosts what changed from
//! these notices alone, so that it does not matter which exchange made a change.

use super::StoreError;
use super::exchange::{ExchangeStore, Joining};
use super::postgres::{Forwarding, PgExchange};
use iim_proto::peer::{Envelope, ServerInfo};
use iim_proto::{Address, UserId};
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::broadcast;

/// Notices held for a slow reader before it is told it missed some.
const CHANGES_CAPACITY: usize = 16_384;

/// A change to the network's state, as the store tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A `905` was stored with a row for `target`: its outbox grew.
    Relayed(String),
    /// The registry changed (a host joined or left).
    Servers,
    /// The directory has a new version.
    Directory,
    /// Users of host `server` have this many devices online now (0: offline).
    Presence {
        /// The host.
        server: String,
        /// Its users, each with its devices online.
        entries: Vec<(UserId, u32)>,
    },
    /// Every user of host `server` counts as offline.
    PresenceGone(String),
    /// Notices may have been lost (the database's connection was made again, or the reader
    /// fell behind): whoever keeps a view of the state reads it again.
    Missed,
}

/// Where an exchange keeps the network's state.
pub struct ExchangeDb {
    backend: Backend,
    changes: broadcast::Sender<Change>,
    /// Per host, its users with devices online (the sled store's: presence is not written to
    /// its disk, it is told again by each host that joins).
    presence: Mutex<HashMap<String, HashMap<UserId, u32>>>,
    /// The task that listens to the database, stopped with the store.
    listener: Option<tokio::task::JoinHandle<()>>,
}

enum Backend {
    Sled(ExchangeStore),
    Postgres(Box<PgExchange>),
}

impl Drop for ExchangeDb {
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ExchangeDb {
    /// The exchange's own sled store.
    pub fn sled(store: ExchangeStore) -> Self {
        Self {
            backend: Backend::Sled(store),
            changes: broadcast::channel(CHANGES_CAPACITY).0,
            presence: Mutex::default(),
            listener: None,
        }
    }

    /// A PostgreSQL database, whose changes (by any exchange) are heard from now on.
    pub async fn postgres(db: PgExchange) -> Result<Self, StoreError> {
        let changes = broadcast::channel(CHANGES_CAPACITY).0;
        let listener = db.listen(changes.clone()).await?;
        Ok(Self {
            backend: Backend::Postgres(Box::new(db)),
            changes,
            presence: Mutex::default(),
            listener: Some(listener),
        })
    }

    /// The sled store, if that is where the state is (its data key rotation is its own).
    pub fn sled_store(&self) -> Option<&ExchangeStore> {
        match &self.backend {
            Backend::Sled(store) => Some(store),
            Backend::Postgres(_) => None,
        }
    }

    /// The database, if that is where the state is.
    pub fn postgres_db(&self) -> Option<&PgExchange> {
        match &self.backend {
            Backend::Sled(_) => None,
            Backend::Postgres(db) => Some(db),
        }
    }

    /// The changes from now on. A reader that falls behind is told [`Change::Missed`].
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Tells of a change the sled store made (the database tells of its own).
    fn changed(&self, change: Change) {
        if matches!(self.backend, Backend::Sled(_)) {
            let _ = self.changes.send(change);
        }
    }

    /// Registers server `id` at `addr` as up, if `credential` is the one it showed at its
    /// first join; a new server gets the next number, and its credential is recorded.
    pub async fn join(
        &self,
        id: &str,
        addr: &str,
        credential: &str,
        now: u64,
    ) -> Result<Joining, StoreError> {
        let joining = match &self.backend {
            Backend::Sled(store) => store.join(id, addr, credential, now),
            Backend::Postgres(db) => db.join(id, addr, credential).await,
        }?;
        if joining != Joining::WrongCredential {
            self.changed(Change::Servers);
        }
        Ok(joining)
    }

    /// Marks server `id` down.
    pub async fn leave(&self, id: &str, now: u64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(store) => store.leave(id, now),
            Backend::Postgres(db) => db.leave().await,
        }?;
        self.changed(Change::Servers);
        Ok(())
    }

    /// The registry, by server id.
    pub async fn servers(&self) -> Result<Vec<ServerInfo>, StoreError> {
        match &self.backend {
            Backend::Sled(store) => store.servers(),
            Backend::Postgres(db) => db.servers().await,
        }
    }

    /// Claims `name` (a user's or a group's) for `server`: its home afterwards, and the new
    /// directory version if the name was free.
    pub async fn claim(
        &self,
        name: &Address,
        server: &str,
    ) -> Result<(String, Option<u64>), StoreError> {
        let claimed = match &self.backend {
            Backend::Sled(store) => store.claim(name, server),
            Backend::Postgres(db) => db.claim(name, server).await,
        }?;
        if claimed.1.is_some() {
            self.changed(Change::Directory);
        }
        Ok(claimed)
    }

    /// Releases `user`'s name, whose account `server` deleted: its home afterwards (`None`:
    /// free), and the new directory version if it was `server`'s until now.
    pub async fn release(
        &self,
        user: &UserId,
        server: &str,
    ) -> Result<(Option<String>, Option<u64>), StoreError> {
        let released = match &self.backend {
            Backend::Sled(store) => store.release(user, server),
            Backend::Postgres(db) => db.release(user, server).await,
        }?;
        if released.1.is_some() {
            self.changed(Change::Directory);
        }
        Ok(released)
    }

    /// The home server of `name`, if it has one.
    pub async fn home(&self, name: &Address) -> Result<Option<String>, StoreError> {
        match &self.backend {
            Backend::Sled(store) => store.home(name),
            Backend::Postgres(db) => db.home(name).await,
        }
    }

    /// The version of the directory's last change.
    pub async fn directory_version(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sled(store) => store.directory_version(),
            Backend::Postgres(db) => db.directory_version().await,
        }
    }

    /// Up to `limit` directory changes after version `after`, with the version of the last;
    /// each names its name's home as it is now (empty: released since).
    pub async fn directory_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(u64, Vec<(Address, String)>), StoreError> {
        match &self.backend {
            Backend::Sled(store) => store.directory_after(after, limit),
            Backend::Postgres(db) => db.directory_after(after, limit).await,
        }
    }

    /// The highest `905` number from `origin` that is stored.
    pub async fn inbound(&self, origin: &str) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sled(store) => store.inbound(origin),
            Backend::Postgres(db) => db.inbound(origin).await,
        }
    }

    /// Stores `905` number `seq` from `origin`: one `906` per target host, in its outbox.
    /// Returns the targets, or nothing if it was stored before. Durable after
    /// [`ExchangeDb::flush`].
    pub async fn relay_in(
        &self,
        origin: &str,
        seq: u64,
        envelope: Envelope,
    ) -> Result<Vec<String>, StoreError> {
        let targets = match &self.backend {
            Backend::Sled(store) => store.relay_in(origin, seq, envelope),
            Backend::Postgres(db) => db.relay_in(origin, seq, envelope).await,
        }?;
        for target in &targets {
            self.changed(Change::Relayed(target.clone()));
        }
        Ok(targets)
    }

    /// [`ExchangeDb::relay_in`] for `905`s from `origin` in order, at once (in PostgreSQL one
    /// transaction): for each, its targets.
    pub async fn relay_in_batch(
        &self,
        origin: &str,
        batch: Vec<(u64, Envelope)>,
    ) -> Result<Vec<Vec<String>>, StoreError> {
        let stored = match &self.backend {
            Backend::Sled(store) => batch
                .into_iter()
                .map(|(seq, envelope)| store.relay_in(origin, seq, envelope))
                .collect::<Result<Vec<_>, _>>(),
            Backend::Postgres(db) => db.relay_in_batch(origin, batch).await,
        }?;
        for target in stored.iter().flatten() {
            self.changed(Change::Relayed(target.clone()));
        }
        Ok(stored)
    }

    /// Up to `limit` entries of `target`'s outbox after `after`, in order.
    pub async fn outbox(
        &self,
        target: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Envelope)>, StoreError> {
        match &self.backend {
            Backend::Sled(store) => store.outbox(target, after, limit),
            Backend::Postgres(db) => db.outbox(target, after, limit).await,
        }
    }

    /// `target` has every entry of its outbox up to `seq`: they go.
    pub async fn outbox_acked(&self, target: &str, seq: u64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(store) => store.outbox_acked(target, seq),
            Backend::Postgres(db) => db.outbox_acked(target, seq).await,
        }
    }

    /// How many envelopes wait in `target`'s outbox.
    pub async fn outbox_len(&self, target: &str) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Sled(store) => Ok(store.outbox_len(target)),
            Backend::Postgres(db) => db.outbox_len(target).await,
        }
    }

    /// Users of host `server` have this many devices online now (0: offline).
    pub async fn set_presence(
        &self,
        server: &str,
        entries: Vec<(UserId, u32)>,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(_) => {
                let mut presence = lock(&self.presence);
                set_presence(presence.entry(server.to_owned()).or_default(), &entries);
            }
            Backend::Postgres(db) => db.set_presence(server, &entries).await?,
        }
        self.changed(Change::Presence {
            server: server.to_owned(),
            entries,
        });
        Ok(())
    }

    /// Every user of host `server` counts as offline.
    pub async fn forget_presence(&self, server: &str) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(_) => {
                lock(&self.presence).remove(server);
            }
            Backend::Postgres(db) => db.forget_presence(server).await?,
        }
        self.changed(Change::PresenceGone(server.to_owned()));
        Ok(())
    }

    /// Per host, its users with devices online and how many.
    pub async fn presence(&self) -> Result<HashMap<String, HashMap<UserId, u32>>, StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(lock(&self.presence).clone()),
            Backend::Postgres(db) => db.presence().await,
        }
    }

    /// The right to forward `target`'s `906`s, if no other exchange has it (an exchange
    /// alone on its own store always has it); held while the value lives.
    pub async fn forward(&self, target: &str) -> Result<Option<Forward>, StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(Some(Forward::Alone)),
            Backend::Postgres(db) => Ok(db.forward(target).await?.map(Forward::Shared)),
        }
    }

    /// Tells every exchange that the registry changed (which exchange forwards a host).
    pub async fn registry_changed(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(_) => {
                self.changed(Change::Servers);
                Ok(())
            }
            Backend::Postgres(db) => db.registry_changed().await,
        }
    }

    /// The exchanges of the database, by name, each with the hosts it forwards to (`None`:
    /// an exchange on its own store, alone).
    pub async fn exchanges(&self) -> Result<Option<Vec<(String, Vec<String>)>>, StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(None),
            Backend::Postgres(db) => db.exchanges().await.map(Some),
        }
    }

    /// Makes every change made before this call durable (PostgreSQL's are when they return).
    pub async fn flush(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(store) => store.flush().await,
            Backend::Postgres(_) => Ok(()),
        }
    }
}

/// Takes `entries` (users with this many devices online, 0: offline) into `users`.
pub fn set_presence(users: &mut HashMap<UserId, u32>, entries: &[(UserId, u32)]) {
    for (user, devices) in entries {
        match devices {
            0 => users.remove(user),
            n => users.insert(user.clone(), *n),
        };
    }
}

/// The right to forward one host's `906`s ([`ExchangeDb::forward`]).
pub enum Forward {
    /// The only exchange of its store.
    Alone,
    /// A lock in the database.
    Shared(Forwarding),
}

impl Forward {
    /// Whether it is still held (a database's lock goes with its connection).
    pub fn is_held(&self) -> bool {
        match self {
            Self::Alone => true,
            Self::Shared(forwarding) => forwarding.is_held(),
        }
    }
}
