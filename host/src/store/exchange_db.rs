//! The exchange's registry and directory, whichever store keeps them: its own sled store
//! ([`ExchangeStore`], the embedded default) or a PostgreSQL database that several exchanges
//! share ([`PgExchange`], DESIGN.md §10). Both answer alike; what differs is who else sees
//! the changes (the other exchanges of the same database).

use super::StoreError;
use super::exchange::{ExchangeStore, Joining};
use super::postgres::PgExchange;
use iim_proto::peer::{Envelope, ServerInfo};
use iim_proto::{Address, UserId};

/// Where an exchange keeps the network's registry and directory.
pub enum ExchangeDb {
    /// Its own sled store.
    Sled(ExchangeStore),
    /// A PostgreSQL database.
    Postgres(PgExchange),
}

impl ExchangeDb {
    /// Registers server `id` at `addr` as up, if `credential` is the one it showed at its
    /// first join; a new server gets the next number, and its credential is recorded.
    pub async fn join(
        &self,
        id: &str,
        addr: &str,
        credential: &str,
        now: u64,
    ) -> Result<Joining, StoreError> {
        match self {
            Self::Sled(store) => store.join(id, addr, credential, now),
            Self::Postgres(db) => db.join(id, addr, credential, now).await,
        }
    }

    /// Marks server `id` down.
    pub async fn leave(&self, id: &str, now: u64) -> Result<(), StoreError> {
        match self {
            Self::Sled(store) => store.leave(id, now),
            Self::Postgres(db) => db.leave(id, now).await,
        }
    }

    /// The registry, by server id.
    pub async fn servers(&self) -> Result<Vec<ServerInfo>, StoreError> {
        match self {
            Self::Sled(store) => store.servers(),
            Self::Postgres(db) => db.servers().await,
        }
    }

    /// Claims `name` (a user's or a group's) for `server`: its home afterwards, and the new
    /// directory version if the name was free.
    pub async fn claim(
        &self,
        name: &Address,
        server: &str,
    ) -> Result<(String, Option<u64>), StoreError> {
        match self {
            Self::Sled(store) => store.claim(name, server),
            Self::Postgres(db) => db.claim(name, server).await,
        }
    }

    /// Releases `user`'s name, whose account `server` deleted: its home afterwards (`None`:
    /// free), and the new directory version if it was `server`'s until now.
    pub async fn release(
        &self,
        user: &UserId,
        server: &str,
    ) -> Result<(Option<String>, Option<u64>), StoreError> {
        match self {
            Self::Sled(store) => store.release(user, server),
            Self::Postgres(db) => db.release(user, server).await,
        }
    }

    /// The home server of `name`, if it has one.
    pub async fn home(&self, name: &Address) -> Result<Option<String>, StoreError> {
        match self {
            Self::Sled(store) => store.home(name),
            Self::Postgres(db) => db.home(name).await,
        }
    }

    /// The version of the directory's last change.
    pub async fn directory_version(&self) -> Result<u64, StoreError> {
        match self {
            Self::Sled(store) => store.directory_version(),
            Self::Postgres(db) => db.directory_version().await,
        }
    }

    /// Up to `limit` directory changes after version `after`, with the version of the last;
    /// each names its name's home as it is now (empty: released since).
    pub async fn directory_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(u64, Vec<(Address, String)>), StoreError> {
        match self {
            Self::Sled(store) => store.directory_after(after, limit),
            Self::Postgres(db) => db.directory_after(after, limit).await,
        }
    }

    /// The highest `905` number from `origin` that is stored.
    pub async fn inbound(&self, origin: &str) -> Result<u64, StoreError> {
        match self {
            Self::Sled(store) => store.inbound(origin),
            Self::Postgres(db) => db.inbound(origin).await,
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
        match self {
            Self::Sled(store) => store.relay_in(origin, seq, envelope),
            Self::Postgres(db) => db.relay_in(origin, seq, envelope).await,
        }
    }

    /// Up to `limit` entries of `target`'s outbox after `after`, in order.
    pub async fn outbox(
        &self,
        target: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Envelope)>, StoreError> {
        match self {
            Self::Sled(store) => store.outbox(target, after, limit),
            Self::Postgres(db) => db.outbox(target, after, limit).await,
        }
    }

    /// `target` has every entry of its outbox up to `seq`: they go.
    pub async fn outbox_acked(&self, target: &str, seq: u64) -> Result<(), StoreError> {
        match self {
            Self::Sled(store) => store.outbox_acked(target, seq),
            Self::Postgres(db) => db.outbox_acked(target, seq).await,
        }
    }

    /// How many envelopes wait in `target`'s outbox.
    pub async fn outbox_len(&self, target: &str) -> Result<usize, StoreError> {
        match self {
            Self::Sled(store) => Ok(store.outbox_len(target)),
            Self::Postgres(db) => db.outbox_len(target).await,
        }
    }

    /// Makes every change made before this call durable (PostgreSQL's are when they return).
    pub async fn flush(&self) -> Result<(), StoreError> {
        match self {
            Self::Sled(store) => store.flush().await,
            Self::Postgres(_) => Ok(()),
        }
    }
}
