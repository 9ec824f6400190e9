//! The exchange's PostgreSQL store (DESIGN.md §10): its schema, versioned.
//!
//! A schema is a list of [`Migration`]s, numbered from 1 without gaps. [`migrate`] brings a
//! database to the newest: in one transaction, under an advisory lock (so that exchanges that
//! start together apply each migration once), it applies those the database has not had and
//! records each in the table `iim_schema`. A database already past the newest this binary
//! knows is refused, unchanged: an older exchange must not write to a schema it does not know.

use super::exchange::{Joining, credential_hash, same_credential};
use super::exchange_db::Change;
use super::sealing::OpenError;
use super::{Sealer, StoreError, decode, encode};
use iim_proto::peer::{Envelope, RelayRow, ServerInfo};
use iim_proto::{Address, Message, UserId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tokio::sync::broadcast;
use tokio_postgres::{Client, GenericClient};

/// The advisory lock held while a schema is migrated (its key: "iim" and 1).
const MIGRATION_LOCK: i64 = 0x0069_696d_0000_0001;

/// One step of a schema.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number: the first is 1, each next one more.
    pub version: i32,
    /// What it does, in a few words (kept in `iim_schema`).
    pub name: &'static str,
    /// Its statements, run as one batch.
    pub sql: &'static str,
}

/// What [`migrate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The database's version before (0: a database never migrated).
    pub from: i32,
    /// Its version now.
    pub to: i32,
}

/// Why a schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The list of migrations is not numbered 1, 2, 3… (a bug of this binary).
    #[error("migration {name:?} is numbered {version}, where {expected} was due")]
    Numbering {
        /// The migration's name.
        name: &'static str,
        /// Its number.
        version: i32,
        /// The number it should have.
        expected: i32,
    },
    /// The database's schema is newer than any this binary knows.
    #[error(
        "the database's schema is at version {found}, newer than this iim-host knows \
         (up to {known}): run the iim-host that migrated it, or a newer one"
    )]
    Newer {
        /// The database's version.
        found: i32,
        /// The newest this binary knows.
        known: i32,
    },
    /// A migration's statements failed; nothing of it, or of the migrations after it, was
    /// applied.
    #[error("migration {version} ({name}) failed: {}", described(source))]
    Failed {
        /// The migration's number.
        version: i32,
        /// Its name.
        name: &'static str,
        /// What the database said.
        source: tokio_postgres::Error,
    },
    /// The database failed otherwise.
    #[error("the database: {}", described(.0))]
    Database(#[from] tokio_postgres::Error),
}

/// What the database said: its own message and SQLSTATE code, which the driver's `Display`
/// leaves out ("db error").
fn described(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({}: {})", error, db.code().code(), db.message()),
        None => error.to_string(),
    }
}

/// Brings the database of `client` to the newest version of `migrations`.
pub async fn migrate(
    client: &mut Client,
    migrations: &[Migration],
) -> Result<Migrated, MigrationError> {
    for (expected, migration) in (1..).zip(migrations) {
        if migration.version != expected {
            return Err(MigrationError::Numbering {
                name: migration.name,
                version: migration.version,
                expected,
            });
        }
    }
    let known = migrations.last().map_or(0, |m| m.version);
    let transaction = client.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS iim_schema (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
    let from: i32 = transaction
        .query_one("SELECT coalesce(max(version), 0) FROM iim_schema", &[])
        .await?
        .get(0);
    if from > known {
        return Err(MigrationError::Newer { found: from, known });
    }
    for migration in &migrations[usize::try_from(from).unwrap_or(0)..] {
        let failed = |source| MigrationError::Failed {
            version: migration.version,
            name: migration.name,
            source,
        };
        transaction
            .batch_execute(migration.sql)
            .await
            .map_err(failed)?;
        transaction
            .execute(
                "INSERT INTO iim_schema (version, name) VALUES ($1, $2)",
                &[&migration.version, &migration.name],
            )
            .await
            .map_err(failed)?;
    }
    transaction.commit().await?;
    if from < known {
        tracing::info!(from, to = known, "database schema migrated");
    }
    Ok(Migrated { from, to: known })
}

/// The exchange's schema, oldest first (DESIGN.md §10). Names are stored as their text
/// (`Address`'s `Display`: `alice`, `#team`).
pub const SCHEMA: &[Migration] = &[
    Migration {
        version: 1,
        name: "registry, directory and relay",
        sql: "CREATE TABLE servers (
              id text PRIMARY KEY,
              number integer NOT NULL UNIQUE,
              addr text NOT NULL,
              up boolean NOT NULL,
              since bigint NOT NULL,
              credential bytea NOT NULL
          );
          -- Every name's home now.
          CREATE TABLE directory (
              name text PRIMARY KEY,
              home text NOT NULL
          );
          -- One row per change, in order: what a host that caught up to a version lacks.
          CREATE TABLE directory_log (
              version bigint PRIMARY KEY,
              name text NOT NULL
          );
          -- The last version, one row: taking it for update orders claims and releases.
          CREATE TABLE directory_head (
              one boolean PRIMARY KEY DEFAULT true CHECK (one),
              version bigint NOT NULL
          );
          INSERT INTO directory_head (version) VALUES (0);
          -- Each relayed message once, by its id (unique in the network), sealed as the
          -- exchange's store seals what users wrote.
          CREATE TABLE relay_messages (
              id bigint PRIMARY KEY,
              body bytea NOT NULL
          );
          -- One row per target host and message, numbered per target in the order stored:
          -- the target's outbox. A row goes when its target acknowledges it durable.
          CREATE TABLE relay_rows (
              target text NOT NULL,
              seq bigint NOT NULL,
              message bigint NOT NULL REFERENCES relay_messages (id),
              users bytea NOT NULL,
              PRIMARY KEY (target, seq)
          );
          CREATE INDEX relay_rows_message ON relay_rows (message);
          -- Per target: its last number and the highest it acknowledged.
          CREATE TABLE relay_targets (
              target text PRIMARY KEY,
              last bigint NOT NULL,
              acked bigint NOT NULL
          );
          -- Per origin host: the highest `905` number stored.
          CREATE TABLE relay_inbound (
              origin text PRIMARY KEY,
              seq bigint NOT NULL
          );
          -- Whether relayed messages are sealed (decided by the first exchange to connect),
          -- and a known text sealed with each data key that sealed some: an exchange whose
          -- key file lacks a key, or holds another under its id, is refused at its start.
          CREATE TABLE sealing (
              one boolean PRIMARY KEY DEFAULT true CHECK (one),
              sealed boolean NOT NULL
          );
          CREATE TABLE key_checks (
              key bigint PRIMARY KEY,
              sealed bytea NOT NULL
          );",
    },
    Migration {
        version: 2,
        name: "presence",
        // Who is online on each host, as its exchange heard it: what an exchange that
        // starts, or that missed notices, reads to know it. Rows change at every login and
        // logout; a host that joins again tells it anew.
        sql: "CREATE TABLE presence (
                  server text NOT NULL,
                  user_id text NOT NULL,
                  devices integer NOT NULL,
                  PRIMARY KEY (server, user_id)
              );",
    },
    Migration {
        version: 3,
        name: "relay tables kept small",
        // `relay_rows` and `relay_messages` are queues: rows go in at one end and out at the
        // other all day. They are vacuumed whenever autovacuum comes by and finds 1,000 dead
        // rows, however many live ones wait for a host that is down (PostgreSQL's default
        // waits until the dead are a fifth of the live), and without pausing. Measured
        // (`iim-bench network --database --housekeeping`, docs/network.md "Housekeeping"):
        // with a million rows waiting, the dead rows at their most fell from 445,000 to
        // 175,000 in 150 s. `relay_targets` and `relay_inbound`, a few rows updated at every
        // batch, need nothing: all their updates were HOT with the default fill factor.
        // A host's row in `servers` no longer says whether it is up: the exchange that
        // forwards to it holds a lock, and that is what counts (`servers`).
        sql: "ALTER TABLE relay_rows SET (autovacuum_vacuum_scale_factor = 0,
                  autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0);
              ALTER TABLE relay_messages SET (autovacuum_vacuum_scale_factor = 0,
                  autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0);
              ALTER TABLE servers DROP COLUMN up, DROP COLUMN since;",
    },
];

/// A relayed message as `relay_messages` keeps it (sealed).
#[derive(Serialize, Deserialize)]
struct Relayed {
    message: Message,
    expires_at: Option<u64>,
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        StoreError::Database(described(&error))
    }
}

/// What an exchange asks of its database's durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A commit must reach a synchronous standby (the default): a failover to that standby
    /// loses nothing acknowledged. A database without one is refused.
    Replicated,
    /// One database server, no standby: what it commits survives a crash of it, not the loss
    /// of its disk, and there is nothing to fail over to.
    SingleNode,
}

/// The exchange's state in PostgreSQL: the registry, the directory and the relay, which any
/// number of exchanges share. Every change is one transaction, durable when it returns.
///
/// Calls run on a pool of connections, side by side: the links of many hosts commit at once,
/// and the database flushes their commits together. A connection that ended (its server died,
/// a failover) is made again at the next use, to whichever server the connection string finds
/// writable; one that stopped answering is closed ([`DATABASE_TIMEOUT`]).
pub struct PgExchange {
    /// Where the database is, and this exchange's name in it (`application_name`).
    config: tokio_postgres::Config,
    pool: deadpool_postgres::Pool,
    /// The relayed messages (what users wrote) are sealed.
    sealer: Sealer,
}

/// How long a database call may take, once it has a connection, before the exchange gives up
/// on that connection (a database that went silent, a network that dropped the route): the
/// call fails, the connection is closed, and the next call is made on a new one.
pub const DATABASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a call waits for a connection of the pool when every one is busy.
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// The connections an exchange keeps to its database for its calls, unless configured
/// (`network.database_connections`); besides, it has one that listens and one per host it
/// forwards to.
pub const DEFAULT_CONNECTIONS: usize = 8;

impl PgExchange {
    /// Connects to the database at `url` (libpq's forms: `postgresql://…` or `host=… …`; for
    /// a primary and its standbys, every host with `target_session_attrs=read-write`), checks
    /// that it is as durable as `durability` asks, and brings its schema up to date;
    /// relayed messages are sealed by `sealer`.
    pub async fn connect(
        url: &str,
        sealer: Sealer,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        Self::connect_as(url, "", DEFAULT_CONNECTIONS, sealer, durability).await
    }

    /// [`PgExchange::connect`], for the exchange named `name` (its address), with at most
    /// `connections` connections for its calls: every connection it makes says so, and
    /// [`PgExchange::exchanges`] lists it by that name.
    pub async fn connect_as(
        url: &str,
        name: &str,
        connections: usize,
        sealer: Sealer,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Database(format!("network.database is not a connection string: {e}"))
        })?;
        config
            .application_name(format!("{APPLICATION}{name}"))
            // A database that is cut off, not closed, is noticed within seconds.
            .keepalives_idle(std::time::Duration::from_secs(5))
            .keepalives_interval(std::time::Duration::from_secs(2))
            .keepalives_retries(3)
            .tcp_user_timeout(DATABASE_TIMEOUT)
            .connect_timeout(DATABASE_TIMEOUT);
        // Every connection's session, whatever the server's defaults: its commits wait for
        // the synchronous standbys, and a transaction left open holds its rows a short time.
        let session = format!(
            "-c synchronous_commit=on -c idle_in_transaction_session_timeout={}",
            FORWARD_IDLE.as_millis()
        );
        let options = match config.get_options() {
            Some(given) if !given.trim().is_empty() => format!("{given} {session}"),
            _ => session,
        };
        config.options(options);
        let mut client = open(&config).await?;
        if durability == Durability::Replicated {
            replicated(&client).await?;
        }
        migrate(&mut client, SCHEMA)
            .await
            .map_err(|e| StoreError::Database(e.to_string()))?;
        check_keys(&mut client, &sealer).await?;
        let manager = deadpool_postgres::Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                // A connection that ended is made again; one that went silent is closed by
                // `run`'s timeout.
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(connections.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(DATABASE_TIMEOUT))
            .recycle_timeout(Some(DATABASE_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Database(format!("a pool of connections: {e}")))?;
        Ok(Self {
            config,
            pool,
            sealer,
        })
    }

    /// Runs `call` on a connection of the pool, waiting for one if every one is busy. The
    /// call may take [`DATABASE_TIMEOUT`] from when it has its connection (the wait for one
    /// is not counted): after that it fails, and its connection, which stopped answering, is
    /// closed instead of given back.
    async fn run<T>(
        &self,
        call: impl AsyncFnOnce(&mut deadpool_postgres::ClientWrapper) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut client = self.pool.get().await.map_err(|e| self.unavailable(e))?;
        let outcome = tokio::time::timeout(DATABASE_TIMEOUT, call(&mut client)).await;
        match outcome {
            Ok(done) => done,
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                Err(StoreError::Database(format!(
                    "no answer from the database in {} s; that connection is closed, the next \
                     call makes a new one",
                    DATABASE_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// Why no connection of the pool could be had.
    fn unavailable(&self, error: deadpool_postgres::PoolError) -> StoreError {
        use deadpool_postgres::{PoolError, TimeoutType};
        StoreError::Database(match error {
            PoolError::Timeout(TimeoutType::Wait) => format!(
                "all {} connections to the database stayed busy for {} s \
                 (network.database_connections)",
                self.pool.status().max_size,
                POOL_WAIT.as_secs()
            ),
            PoolError::Timeout(_) => format!(
                "cannot connect to the database: no answer in {} s",
                DATABASE_TIMEOUT.as_secs()
            ),
            PoolError::Backend(e) => format!("cannot connect to the database: {}", described(&e)),
            other => other.to_string(),
        })
    }

    // ---- registry ----

    /// As [`super::exchange::ExchangeStore::join`].
    pub async fn join(
        &self,
        id: &str,
        addr: &str,
        credential: &str,
    ) -> Result<Joining, StoreError> {
        self.run(async |client| {
            let transaction = client.transaction().await?;
            // New numbers are handed out one at a time.
            transaction
                .batch_execute("LOCK TABLE servers IN SHARE ROW EXCLUSIVE MODE")
                .await?;
            let known = transaction
                .query_opt(
                    &transaction
                        .prepare_cached("SELECT number, credential FROM servers WHERE id = $1")
                        .await?,
                    &[&id],
                )
                .await?;
            let (joining, number) = match known {
                Some(row) => {
                    let stored: Vec<u8> = row.get(1);
                    if !same_credential(&stored, credential) {
                        return Ok(Joining::WrongCredential);
                    }
                    let number = number_of(row.get(0))?;
                    (Joining::Known(number), number)
                }
                None => {
                    let last: i32 = transaction
                        .query_one("SELECT coalesce(max(number), 0) FROM servers", &[])
                        .await?
                        .get(0);
                    let next = number_of(last.saturating_add(1))
                        .ok()
                        .filter(|n| *n <= iim_proto::peer::MAX_HOST_NUMBER)
                        .ok_or_else(|| StoreError::Corrupt {
                            tree: "servers",
                            reason: "every server number is taken".into(),
                        })?;
                    (Joining::New(next), next)
                }
            };
            transaction
                .execute(
                    &transaction
                        .prepare_cached(
                            "INSERT INTO servers (id, number, addr, credential)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (id) DO UPDATE SET addr = $3",
                        )
                        .await?,
                    &[&id, &i32::from(number), &addr, &credential_hash(credential)],
                )
                .await?;
            notify(&*transaction, SERVERS).await?;
            transaction.commit().await?;
            Ok(joining)
        })
        .await
    }

    /// As [`super::exchange::ExchangeStore::leave`]: whether a host is up is whether an
    /// exchange forwards to it ([`PgExchange::servers`]), so nothing is written; the other
    /// exchanges are told to read the registry again.
    pub async fn leave(&self) -> Result<(), StoreError> {
        self.registry_changed().await
    }

    /// As [`super::exchange::ExchangeStore::servers`]; a host is up while an exchange
    /// forwards to it ([`PgExchange::forward`]): whichever exchange it is linked to, and not
    /// after that exchange died.
    pub async fn servers(&self) -> Result<Vec<ServerInfo>, StoreError> {
        self.run(async |client| {
            let rows = client
                .query(
                    &format!(
                        "SELECT s.id, s.number, s.addr, EXISTS (
                             SELECT 1 FROM pg_locks l
                             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                                 AND ((l.classid::bigint << 32) | l.objid::bigint) = {HELD_KEY})
                         FROM servers s ORDER BY s.id"
                    ),
                    &[],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(ServerInfo {
                        id: row.get(0),
                        number: number_of(row.get(1))?,
                        addr: row.get(2),
                        up: row.get(3),
                    })
                })
                .collect()
        })
        .await
    }

    // ---- directory ----

    /// As [`super::exchange::ExchangeStore::claim`].
    pub async fn claim(
        &self,
        name: &Address,
        server: &str,
    ) -> Result<(String, Option<u64>), StoreError> {
        self.run(async |client| {
            let transaction = client.transaction().await?;
            let version = next_version(&transaction).await?;
            let name = name.to_string();
            if let Some(row) = transaction
                .query_opt("SELECT home FROM directory WHERE name = $1", &[&name])
                .await?
            {
                // Taken: the version taken above is given back with the transaction.
                return Ok((row.get(0), None));
            }
            transaction
                .execute(
                    &transaction
                        .prepare_cached("INSERT INTO directory (name, home) VALUES ($1, $2)")
                        .await?,
                    &[&name, &server],
                )
                .await?;
            log_version(&transaction, version, &name).await?;
            notify(&*transaction, DIRECTORY).await?;
            transaction.commit().await?;
            Ok((server.to_owned(), Some(count_of("directory_log", version)?)))
        })
        .await
    }

    /// As [`super::exchange::ExchangeStore::release`].
    pub async fn release(
        &self,
        user: &UserId,
        server: &str,
    ) -> Result<(Option<String>, Option<u64>), StoreError> {
        self.run(async |client| {
            let transaction = client.transaction().await?;
            let version = next_version(&transaction).await?;
            let name = Address::User(user.clone()).to_string();
            let home: Option<String> = transaction
                .query_opt("SELECT home FROM directory WHERE name = $1", &[&name])
                .await?
                .map(|row| row.get(0));
            match home {
                None => return Ok((None, None)),
                Some(home) if home != server => return Ok((Some(home), None)),
                Some(_) => {}
            }
            transaction
                .execute("DELETE FROM directory WHERE name = $1", &[&name])
                .await?;
            log_version(&transaction, version, &name).await?;
            notify(&*transaction, DIRECTORY).await?;
            transaction.commit().await?;
            Ok((None, Some(count_of("directory_log", version)?)))
        })
        .await
    }

    /// As [`super::exchange::ExchangeStore::home`].
    pub async fn home(&self, name: &Address) -> Result<Option<String>, StoreError> {
        self.run(async |client| {
            Ok(client
                .query_opt(
                    &client
                        .prepare_cached("SELECT home FROM directory WHERE name = $1")
                        .await?,
                    &[&name.to_string()],
                )
                .await?
                .map(|row| row.get(0)))
        })
        .await
    }

    /// As [`super::exchange::ExchangeStore::directory_version`].
    pub async fn directory_version(&self) -> Result<u64, StoreError> {
        self.run(async |client| {
            let version: i64 = client
                .query_one("SELECT version FROM directory_head", &[])
                .await?
                .get(0);
            count_of("directory_log", version)
        })
        .await
    }

    /// As [`super::exchange::ExchangeStore::directory_after`].
    pub async fn directory_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(u64, Vec<(Address, String)>), StoreError> {
        self.run(async |client| {
            let rows = client
                .query(
                    &client
                        .prepare_cached(
                            "SELECT l.version, l.name, coalesce(d.home, '')
                     FROM directory_log l LEFT JOIN directory d ON d.name = l.name
                     WHERE l.version > $1 ORDER BY l.version LIMIT $2",
                        )
                        .await?,
                    &[&ms(after), &i64::try_from(limit).unwrap_or(i64::MAX)],
                )
                .await?;
            let mut last = after;
            let mut entries = Vec::with_capacity(rows.len());
            for row in &rows {
                last = count_of("directory_log", row.get(0))?;
                let name: String = row.get(1);
                let name = name.parse::<Address>().map_err(|e| StoreError::Corrupt {
                    tree: "directory_log",
                    reason: format!("{name:?} is not a name: {e}"),
                })?;
                entries.push((name, row.get(2)));
            }
            Ok((last, entries))
        })
        .await
    }
}

impl PgExchange {
    // ---- relay ----

    /// As [`super::exchange::ExchangeStore::inbound`].
    pub async fn inbound(&self, origin: &str) -> Result<u64, StoreError> {
        self.run(async |client| {
            let seq: Option<i64> = client
                .query_opt(
                    &client
                        .prepare_cached("SELECT seq FROM relay_inbound WHERE origin = $1")
                        .await?,
                    &[&origin],
                )
                .await?
                .map(|row| row.get(0));
            seq.map_or(Ok(0), |seq| count_of("relay_inbound", seq))
        })
        .await
    }

    /// Stores `905` number `seq` from `origin` in one transaction: the message once, one row
    /// per target in its outbox, the origin's number. Returns the targets, or nothing if it
    /// was stored before (by this exchange or another). Durable when it returns.
    pub async fn relay_in(
        &self,
        origin: &str,
        seq: u64,
        envelope: Envelope,
    ) -> Result<Vec<String>, StoreError> {
        let mut stored = self.relay_in_batch(origin, vec![(seq, envelope)]).await?;
        Ok(stored.pop().unwrap_or_default())
    }

    /// Stores `905`s from `origin`, numbered in order, in one transaction (one commit, one
    /// wait for the disk and the standby, for all of them): for each, its targets (none if it
    /// was stored before). A batch takes the same few statements whatever its size: the
    /// messages, the rows and the targets' numbers each go in one statement over arrays.
    pub async fn relay_in_batch(
        &self,
        origin: &str,
        batch: Vec<(u64, Envelope)>,
    ) -> Result<Vec<Vec<String>>, StoreError> {
        self.run(async |client| {
            let transaction = client.transaction().await?;
            // The origin's row, locked: two links of one host store its `905`s one at a time.
            transaction
                .execute(
                    &transaction
                        .prepare_cached(
                            "INSERT INTO relay_inbound (origin, seq) VALUES ($1, 0)
                     ON CONFLICT (origin) DO NOTHING",
                        )
                        .await?,
                    &[&origin],
                )
                .await?;
            let stored: i64 = transaction
                .query_one(
                    &transaction
                        .prepare_cached(
                            "SELECT seq FROM relay_inbound WHERE origin = $1 FOR UPDATE",
                        )
                        .await?,
                    &[&origin],
                )
                .await?
                .get(0);
            let first = count_of("relay_inbound", stored)?;
            // Only the servers the rows name, not the whole registry.
            let mut named: Vec<&str> = batch
                .iter()
                .filter(|(seq, _)| *seq > first)
                .flat_map(|(_, envelope)| envelope.rows.iter().map(|row| row.server.as_str()))
                .collect();
            named.sort_unstable();
            named.dedup();
            let known: Vec<String> = if named.is_empty() {
                Vec::new()
            } else {
                transaction
                    .query("SELECT id FROM servers WHERE id = ANY($1)", &[&named])
                    .await?
                    .iter()
                    .map(|row| row.get(0))
                    .collect()
            };
            let mut new = NewRows::default();
            let mut last = first;
            let mut all_targets = Vec::with_capacity(batch.len());
            for (seq, envelope) in batch {
                if seq <= last {
                    all_targets.push(Vec::new());
                    continue;
                }
                all_targets.push(new.add(origin, envelope, &known, &self.sealer)?);
                last = seq;
            }
            if !new.message_ids.is_empty() {
                // A message relayed before (another origin's copy cannot have its id) is kept.
                transaction
                    .execute(
                        &transaction
                            .prepare_cached(
                                "INSERT INTO relay_messages (id, body)
                         SELECT * FROM unnest($1::bigint[], $2::bytea[])
                         ON CONFLICT (id) DO NOTHING",
                            )
                            .await?,
                        &[&new.message_ids, &new.bodies],
                    )
                    .await?;
            }
            if !new.targets.is_empty() {
                self.number_rows(&transaction, &new).await?;
            }
            if last > first {
                transaction
                    .execute(
                        &transaction
                            .prepare_cached("UPDATE relay_inbound SET seq = $2 WHERE origin = $1")
                            .await?,
                        &[&origin, &ms(last)],
                    )
                    .await?;
            }
            transaction.commit().await?;
            if !new.targets.is_empty() {
                tell_relayed(client, &new.targets).await;
            }
            Ok(all_targets)
        })
        .await
    }

    /// Numbers `new`'s rows in each target's outbox, in order, and stores them; tells, at
    /// commit, the exchange that forwards to each target.
    async fn number_rows(
        &self,
        transaction: &deadpool_postgres::Transaction<'_>,
        new: &NewRows,
    ) -> Result<(), StoreError> {
        let targets: Vec<&str> = new.targets.iter().map(|(t, _)| t.as_str()).collect();
        let counts: Vec<i64> = new.targets.iter().map(|(_, n)| *n).collect();
        transaction
            .execute(
                &transaction
                    .prepare_cached(
                        "INSERT INTO relay_targets (target, last, acked)
                 SELECT unnest($1::text[]), 0, 0
                 ON CONFLICT (target) DO NOTHING",
                    )
                    .await?,
                &[&targets],
            )
            .await?;
        // Locked in the targets' order (as every batch locks them): two exchanges storing
        // for the same targets at once wait for each other, they do not deadlock.
        transaction
            .execute(
                &transaction
                    .prepare_cached(
                        "SELECT 1 FROM relay_targets WHERE target = ANY($1)
                 ORDER BY target FOR UPDATE",
                    )
                    .await?,
                &[&targets],
            )
            .await?;
        let numbered = transaction
            .query(
                &transaction
                    .prepare_cached(
                        "UPDATE relay_targets t SET last = t.last + c.n
                 FROM unnest($1::text[], $2::bigint[]) AS c(target, n)
                 WHERE t.target = c.target
                 RETURNING t.target, t.last - c.n",
                    )
                    .await?,
                &[&targets, &counts],
            )
            .await?;
        let mut next: HashMap<String, i64> = HashMap::with_capacity(numbered.len());
        for row in &numbered {
            next.insert(row.get(0), row.get(1));
        }
        let mut seqs = Vec::with_capacity(new.row_targets.len());
        for target in &new.row_targets {
            let number = next.get_mut(target).ok_or_else(|| StoreError::Corrupt {
                tree: "relay_targets",
                reason: format!("no outbox number for {target}"),
            })?;
            *number += 1;
            seqs.push(*number);
        }
        transaction
            .execute(
                &transaction
                    .prepare_cached(
                        "INSERT INTO relay_rows (target, seq, message, users)
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[])",
                    )
                    .await?,
                &[&new.row_targets, &seqs, &new.row_messages, &new.row_users],
            )
            .await?;
        Ok(())
    }

    /// As [`super::exchange::ExchangeStore::outbox`].
    pub async fn outbox(
        &self,
        target: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Envelope)>, StoreError> {
        self.run(async |client| {
            let rows = client
                .query(
                    &client
                        .prepare_cached(
                            "SELECT r.seq, r.users, m.id, m.body
                     FROM relay_rows r JOIN relay_messages m ON m.id = r.message
                     WHERE r.target = $1 AND r.seq > $2 ORDER BY r.seq LIMIT $3",
                        )
                        .await?,
                    &[
                        &target,
                        &ms(after),
                        &i64::try_from(limit).unwrap_or(i64::MAX),
                    ],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let seq = count_of("relay_rows", row.get(0))?;
                let users: Vec<Address> = decode("relay_rows", row.get(1))?;
                let id: i64 = row.get(2);
                let body: &[u8] = row.get(3);
                let body = self
                    .sealer
                    .open("relay_messages", &id.to_be_bytes(), body)?;
                let Relayed {
                    message,
                    expires_at,
                } = decode("relay_messages", &body)?;
                let envelope = Envelope {
                    message,
                    expires_at,
                    rows: vec![RelayRow {
                        server: target.to_owned(),
                        users,
                    }],
                };
                out.push((seq, envelope));
            }
            Ok(out)
        })
        .await
    }

    /// `target` has every row of its outbox up to `seq`: they go, and so does each message
    /// no other target still waits for.
    pub async fn outbox_acked(&self, target: &str, seq: u64) -> Result<(), StoreError> {
        self.run(async |client| {
            let transaction = client.transaction().await?;
            let last: Option<i64> = transaction
                .query_opt(
                    &transaction
                        .prepare_cached(
                            "SELECT last FROM relay_targets WHERE target = $1 FOR UPDATE",
                        )
                        .await?,
                    &[&target],
                )
                .await?
                .map(|row| row.get(0));
            let last = last.map_or(Ok(0), |last| count_of("relay_targets", last))?;
            if seq > last {
                // As in the sled store: numbering goes on above what the host has.
                tracing::error!(
                    target,
                    acknowledged = seq,
                    last,
                    "a host acknowledged relay envelopes this exchange has no record of"
                );
            }
            transaction
                .execute(
                    &transaction
                        .prepare_cached(
                            "INSERT INTO relay_targets (target, last, acked) VALUES ($1, $2, $2)
                     ON CONFLICT (target) DO UPDATE
                     SET acked = greatest(relay_targets.acked, $2),
                         last = greatest(relay_targets.last, $2)",
                        )
                        .await?,
                    &[&target, &ms(seq)],
                )
                .await?;
            // The messages first, locked in order: of two targets acknowledging the last rows
            // of one message at once, the second sees the first's rows gone and removes it.
            let messages: Vec<i64> = transaction
                .query(
                    &transaction
                        .prepare_cached(
                            "SELECT id FROM relay_messages WHERE id IN
                         (SELECT message FROM relay_rows WHERE target = $1 AND seq <= $2)
                     ORDER BY id FOR UPDATE",
                        )
                        .await?,
                    &[&target, &ms(seq)],
                )
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            transaction
                .execute(
                    &transaction
                        .prepare_cached("DELETE FROM relay_rows WHERE target = $1 AND seq <= $2")
                        .await?,
                    &[&target, &ms(seq)],
                )
                .await?;
            transaction
                .execute(
                    &transaction
                        .prepare_cached(
                            "DELETE FROM relay_messages m WHERE m.id = ANY($1)
                     AND NOT EXISTS (SELECT 1 FROM relay_rows r WHERE r.message = m.id)",
                        )
                        .await?,
                    &[&messages],
                )
                .await?;
            transaction.commit().await?;
            Ok(())
        })
        .await
    }

    /// How many rows wait in `target`'s outbox.
    pub async fn outbox_len(&self, target: &str) -> Result<usize, StoreError> {
        self.run(async |client| {
            let count: i64 = client
                .query_one(
                    &client
                        .prepare_cached("SELECT count(*) FROM relay_rows WHERE target = $1")
                        .await?,
                    &[&target],
                )
                .await?
                .get(0);
            Ok(usize::try_from(count).unwrap_or(0))
        })
        .await
    }
}

/// What a batch of `905`s adds, gathered to be stored a statement per table.
#[derive(Default)]
struct NewRows {
    /// The messages, each once, sealed.
    message_ids: Vec<i64>,
    seen: std::collections::HashSet<i64>,
    bodies: Vec<Vec<u8>>,
    /// The rows in the order they are numbered: target, message, users.
    row_targets: Vec<String>,
    row_messages: Vec<i64>,
    row_users: Vec<Vec<u8>>,
    /// Each target once, with its number of rows, in the order of their names.
    targets: Vec<(String, i64)>,
}

impl NewRows {
    /// Adds one `905` from `origin` (of the servers, those `known`): its targets.
    fn add(
        &mut self,
        origin: &str,
        envelope: Envelope,
        known: &[String],
        sealer: &Sealer,
    ) -> Result<Vec<String>, StoreError> {
        let Envelope {
            message,
            expires_at,
            rows,
        } = envelope;
        let rows = super::exchange::target_rows(origin, &message, rows, |server| {
            Ok(known.iter().any(|k| k == server))
        })?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let id = i64::try_from(message.id.0).map_err(|_| StoreError::Corrupt {
            tree: "relay_messages",
            reason: format!("message id {} is out of range", message.id),
        })?;
        let mut targets = Vec::with_capacity(rows.len());
        for row in rows {
            match self
                .targets
                .binary_search_by(|(t, _)| t.as_str().cmp(&row.server))
            {
                Ok(at) => self.targets[at].1 += 1,
                Err(at) => self.targets.insert(at, (row.server.clone(), 1)),
            }
            self.row_targets.push(row.server.clone());
            self.row_messages.push(id);
            self.row_users.push(encode(&row.users));
            targets.push(row.server);
        }
        // A message the batch names twice is stored once.
        if self.seen.insert(id) {
            self.message_ids.push(id);
            self.bodies.push(sealer.seal(
                "relay_messages",
                &id.to_be_bytes(),
                encode(&Relayed {
                    message,
                    expires_at,
                }),
            ));
        }
        Ok(targets)
    }
}

/// The channel on which every change is told, at its commit, to every exchange that
/// listens. A notice is one line naming what changed (`servers`, `directory`,
/// `relayed\t<target>`, `presence-gone\t<server>`), or `presence\t<server>` followed by a
/// line `<user>\t<devices>` per user.
const CHANGES_CHANNEL: &str = "iim_changes";
const SERVERS: &str = "servers";
const DIRECTORY: &str = "directory";
const RELAYED: &str = "relayed";
const PRESENCE: &str = "presence";
const PRESENCE_GONE: &str = "presence-gone";
/// The most bytes a notice carries (PostgreSQL's limit is 8000).
const NOTICE_MAX: usize = 7900;

/// Tells the exchange that forwards to each of `targets` that rows were stored for it, after
/// their commit and not in it. PostgreSQL commits the transactions that notify one at a
/// time (it holds a lock through each one's commit), so a notice in the relay's transaction
/// would make every link's commit wait for the others' flushes. Told on its own, without
/// waiting for the disk (a notice is not kept across a crash anyway), it holds that lock for
/// a moment. A notice lost (this exchange dies between the commit and here) delays the rows
/// until the forwarder looks at its outbox again, which it does every few seconds.
async fn tell_relayed(client: &deadpool_postgres::ClientWrapper, targets: &[(String, i64)]) {
    let notices: Vec<String> = targets
        .iter()
        .map(|(target, _)| format!("{RELAYED}\t{target}"))
        .collect();
    let told = async {
        let statement = client
            .prepare_cached(
                "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, notice)
                 FROM unnest($2::text[]) AS notice",
            )
            .await?;
        client
            .execute(&statement, &[&CHANGES_CHANNEL, &notices])
            .await
    };
    if let Err(e) = told.await {
        tracing::warn!(error = %described(&e), "cannot tell the other exchanges of relayed rows");
    }
}

/// Tells every exchange that listens of `notice`, once `client`'s transaction commits.
async fn notify(client: &impl GenericClient, notice: &str) -> Result<(), StoreError> {
    client
        .execute("SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &notice])
        .await?;
    Ok(())
}

/// The change a notice tells of (`None`: not one this exchange knows).
fn change_of(notice: &str) -> Option<Change> {
    let mut lines = notice.lines();
    let (kind, name) = match lines.next()?.split_once('\t') {
        Some((kind, name)) => (kind, Some(name)),
        None => (notice, None),
    };
    Some(match (kind, name) {
        (SERVERS, None) => Change::Servers,
        (DIRECTORY, None) => Change::Directory,
        (RELAYED, Some(target)) => Change::Relayed(target.to_owned()),
        (PRESENCE_GONE, Some(server)) => Change::PresenceGone(server.to_owned()),
        (PRESENCE, Some(server)) => {
            let entries = lines
                .map(|line| {
                    let (user, devices) = line.split_once('\t')?;
                    Some((UserId::new(user).ok()?, devices.parse().ok()?))
                })
                .collect::<Option<Vec<_>>>()?;
            Change::Presence {
                server: server.to_owned(),
                entries,
            }
        }
        _ => return None,
    })
}

impl PgExchange {
    // ---- presence ----

    /// Users of host `server` have this many devices online now (0: offline): stored, and
    /// told to every exchange.
    pub async fn set_presence(
        &self,
        server: &str,
        entries: &[(UserId, u32)],
    ) -> Result<(), StoreError> {
        let (online, offline): (Vec<_>, Vec<_>) = entries.iter().partition(|(_, n)| *n > 0);
        let users = |entries: &[&(UserId, u32)]| -> Vec<String> {
            entries.iter().map(|(user, _)| user.to_string()).collect()
        };
        let devices: Vec<i32> = online
            .iter()
            .map(|(_, n)| i32::try_from(*n).unwrap_or(i32::MAX))
            .collect();
        self.run(async |client| {
            let transaction = client.transaction().await?;
            if !online.is_empty() {
                transaction
                    .execute(
                        &transaction
                            .prepare_cached(
                                "INSERT INTO presence (server, user_id, devices)
                         SELECT $1, * FROM unnest($2::text[], $3::integer[])
                         ON CONFLICT (server, user_id) DO UPDATE SET devices = excluded.devices",
                            )
                            .await?,
                        &[&server, &users(&online), &devices],
                    )
                    .await?;
            }
            if !offline.is_empty() {
                transaction
                    .execute(
                        &transaction
                            .prepare_cached(
                                "DELETE FROM presence WHERE server = $1 AND user_id = ANY($2)",
                            )
                            .await?,
                        &[&server, &users(&offline)],
                    )
                    .await?;
            }
            let head = format!("{PRESENCE}\t{server}");
            let mut notice = head.clone();
            for (user, devices) in entries {
                let line = format!("\n{user}\t{devices}");
                if notice.len() + line.len() > NOTICE_MAX {
                    notify(&*transaction, &notice).await?;
                    notice.clone_from(&head);
                }
                notice.push_str(&line);
            }
            if notice.len() > head.len() {
                notify(&*transaction, &notice).await?;
            }
            transaction.commit().await?;
            Ok(())
        })
        .await
    }

    /// Every user of host `server` counts as offline: its rows go, and every exchange is told.
    pub async fn forget_presence(&self, server: &str) -> Result<(), StoreError> {
        self.run(async |client| {
            let transaction = client.transaction().await?;
            transaction
                .execute("DELETE FROM presence WHERE server = $1", &[&server])
                .await?;
            notify(&*transaction, &format!("{PRESENCE_GONE}\t{server}")).await?;
            transaction.commit().await?;
            Ok(())
        })
        .await
    }

    /// Per host, its users with devices online and how many.
    pub async fn presence(&self) -> Result<HashMap<String, HashMap<UserId, u32>>, StoreError> {
        self.run(async |client| {
            let mut presence: HashMap<String, HashMap<UserId, u32>> = HashMap::new();
            for row in client
                .query("SELECT server, user_id, devices FROM presence", &[])
                .await?
            {
                let user: &str = row.get(1);
                let user = UserId::new(user).map_err(|_| StoreError::Corrupt {
                    tree: "presence",
                    reason: format!("{user:?} is not a user id"),
                })?;
                let devices: i32 = row.get(2);
                presence
                    .entry(row.get(0))
                    .or_default()
                    .insert(user, u32::try_from(devices).unwrap_or(0));
            }
            Ok(presence)
        })
        .await
    }

    // ---- forwarding and notices, across exchanges ----

    /// The right to forward `target`'s `906`s, if no other exchange has it: an advisory lock
    /// held on a connection of its own while the [`Forwarding`] lives. When its holder dies,
    /// its connection ends and the database frees the lock for another exchange; when its
    /// holder stops (a process stopped, a machine frozen), the database ends the connection
    /// once it has been idle [`FORWARD_IDLE`], which a live holder never lets it be.
    pub async fn forward(&self, target: &str) -> Result<Option<Forwarding>, StoreError> {
        tokio::time::timeout(DATABASE_TIMEOUT, self.take_forwarding(target))
            .await
            .map_err(|_| {
                StoreError::Database(format!(
                    "no answer from the database in {} s to take the right to forward to {target}",
                    DATABASE_TIMEOUT.as_secs()
                ))
            })?
    }

    async fn take_forwarding(&self, target: &str) -> Result<Option<Forwarding>, StoreError> {
        let client = open(&self.config).await?;
        client
            .batch_execute(&format!(
                "SET idle_session_timeout = {}",
                FORWARD_IDLE.as_millis()
            ))
            .await?;
        let taken: bool = client
            .query_one(
                &format!("SELECT pg_try_advisory_lock({FORWARD_KEY})"),
                &[&target],
            )
            .await?
            .get(0);
        if !taken {
            return Ok(None);
        }
        let client = std::sync::Arc::new(client);
        let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let heartbeat = tokio::spawn({
            let (client, lost) = (std::sync::Arc::clone(&client), std::sync::Arc::clone(&lost));
            let target = target.to_owned();
            async move {
                loop {
                    tokio::time::sleep(FORWARD_IDLE / 5).await;
                    let beat =
                        tokio::time::timeout(FORWARD_IDLE, client.batch_execute(FORWARDING_BEAT));
                    let failed = match beat.await {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(described(&e)),
                        Err(_) => Some("the connection stopped answering".into()),
                    };
                    if let Some(e) = failed {
                        tracing::warn!(%target, error = %e, "lost the right to forward");
                        lost.store(true, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                }
            }
        });
        Ok(Some(Forwarding {
            client,
            lost,
            heartbeat,
        }))
    }

    /// Tells every exchange that the registry changed (a target's forwarder changed: whether
    /// the host is up).
    pub async fn registry_changed(&self) -> Result<(), StoreError> {
        self.run(async |client| notify(&**client, SERVERS).await)
            .await
    }

    /// Every exchange connected to the database (by name), with the hosts it forwards to.
    pub async fn exchanges(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        self.run(async |client| {
            let rows = client
                .query(
                    &format!(
                        "SELECT a.application_name, s.id
                         FROM pg_stat_activity a
                         LEFT JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory'
                             AND l.granted AND l.objsubid = 1
                         LEFT JOIN servers s
                             ON ((l.classid::bigint << 32) | l.objid::bigint) = {HELD_KEY}
                         WHERE a.application_name LIKE '{APPLICATION}%'
                         ORDER BY 1, 2"
                    ),
                    &[],
                )
                .await?;
            let mut exchanges: Vec<(String, Vec<String>)> = Vec::new();
            for row in rows {
                let name: &str = row.get(0);
                let name = name.strip_prefix(APPLICATION).unwrap_or(name).to_owned();
                if exchanges.last().is_none_or(|(last, _)| *last != name) {
                    exchanges.push((name, Vec::new()));
                }
                if let (Some((_, targets)), Some(target)) =
                    (exchanges.last_mut(), row.get::<_, Option<String>>(1))
                {
                    targets.push(target);
                }
            }
            Ok(exchanges)
        })
        .await
    }

    /// Listens, on a connection of its own, to the changes every exchange of this database
    /// commits, and tells them to `changes` until the task returned is aborted. A connection
    /// that ends is made again (every second until it is), and [`Change::Missed`] told.
    pub(super) async fn listen(
        &self,
        changes: broadcast::Sender<Change>,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let mut listening = Listening::open(&self.config).await?;
        let config = self.config.clone();
        Ok(tokio::spawn(async move {
            loop {
                // A live exchange's connection is never idle long: a stopped one's is ended
                // by the database, and holds back no notices.
                let mut beat = tokio::time::interval(FORWARD_IDLE / 5);
                loop {
                    tokio::select! {
                        notice = listening.notices.recv() => {
                            let Some(notice) = notice else { break };
                            match change_of(&notice) {
                                Some(change) => {
                                    let _ = changes.send(change);
                                }
                                None => tracing::warn!(%notice, "a notice this exchange does not know"),
                            }
                        }
                        _ = beat.tick() => {
                            let beat = listening.client.batch_execute(LISTENING_BEAT);
                            if !matches!(tokio::time::timeout(FORWARD_IDLE, beat).await, Ok(Ok(()))) {
                                tracing::warn!("the connection that listens to the database stopped answering");
                                break;
                            }
                        }
                    }
                }
                listening = loop {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    match Listening::open(&config).await {
                        Ok(listening) => break listening,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot listen to the database; trying again")
                        }
                    }
                };
                tracing::info!("listening to the database again");
                let _ = changes.send(Change::Missed);
            }
        }))
    }
}

/// A connection that listens to [`CHANGES_CHANNEL`].
struct Listening {
    /// Ends with the connection.
    notices: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Dropped, it would end the connection.
    client: Client,
}

impl Listening {
    async fn open(config: &tokio_postgres::Config) -> Result<Self, StoreError> {
        let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
        let (tx, notices) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(notice))) => {
                        if tx.send(notice.payload().to_owned()).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %described(&e), "the connection that listens to the database ended");
                        return;
                    }
                    None => return,
                }
            }
        });
        client
            .batch_execute(&format!(
                "SET idle_session_timeout = {}; LISTEN {CHANGES_CHANNEL}",
                FORWARD_IDLE.as_millis()
            ))
            .await?;
        Ok(Self { notices, client })
    }
}

/// The right to forward one target's `906`s ([`PgExchange::forward`]); let go when dropped.
pub struct Forwarding {
    client: std::sync::Arc<Client>,
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Forwarding {
    /// Whether it is still held: its connection lives.
    pub fn is_held(&self) -> bool {
        !self.client.is_closed() && !self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// What a connection that listens asks, to show it is alive (and which it is, in
/// `pg_stat_activity`).
pub const LISTENING_BEAT: &str = "SELECT 'iim listening'";
/// What a forwarder's connection asks, to show it is alive.
pub const FORWARDING_BEAT: &str = "SELECT 'iim forwarding'";

/// What every connection of an exchange names itself, before the exchange's own name.
const APPLICATION: &str = "iim exchange ";
/// How long a forwarder's connection may be idle before the database ends it.
const FORWARD_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
/// The advisory lock of the target named by the query's `$1`.
const FORWARD_KEY: &str = "hashtextextended('iim forward ' || $1, 0)";
/// The same lock, of the target of `servers` row `s`.
const HELD_KEY: &str = "hashtextextended('iim forward ' || s.id, 0)";

/// A connection to `config`'s database, driven by a task of its own (its session as
/// [`PgExchange::connect_as`] sets every connection's).
async fn open(config: &tokio_postgres::Config) -> Result<Client, StoreError> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %described(&e), "the connection to the database ended");
        }
    });
    Ok(client)
}

/// The text sealed in `key_checks`.
const KEY_CHECK: &[u8] = b"iim exchange data key check";

/// Fails unless `sealer` opens what the database holds: sealed messages need its data keys
/// (each key's check opening), a database in the clear a sealer in the clear. The first
/// exchange decides; the current key's check is added if it is new.
async fn check_keys(client: &mut Client, sealer: &Sealer) -> Result<(), StoreError> {
    let transaction = client.transaction().await?;
    transaction
        .execute(
            "INSERT INTO sealing (sealed) VALUES ($1) ON CONFLICT (one) DO NOTHING",
            &[&sealer.is_on()],
        )
        .await?;
    let sealed: bool = transaction
        .query_one("SELECT sealed FROM sealing FOR UPDATE", &[])
        .await?
        .get(0);
    let Some(keys) = sealer.keys() else {
        if sealed {
            return Err(StoreError::Keys(
                "the database's relayed messages are encrypted and storage.encrypt is off: \
                 the exchange needs their data key (storage.key_file)"
                    .into(),
            ));
        }
        transaction.commit().await?;
        return Ok(());
    };
    if !sealed {
        return Err(StoreError::Keys(
            "the database's relayed messages are kept in the clear (its first exchange ran \
             with storage.encrypt off): start this exchange with it off too"
                .into(),
        ));
    }
    let file = keys.path().display();
    for row in transaction
        .query("SELECT key, sealed FROM key_checks", &[])
        .await?
    {
        let id: i64 = row.get(0);
        let check: &[u8] = row.get(1);
        match sealer.try_open("key_checks", &id.to_be_bytes(), check) {
            Ok(text) if text == KEY_CHECK => {}
            Err(OpenError::MissingKey(id)) => {
                return Err(StoreError::Keys(format!(
                    "the database holds messages sealed with data key {id}, which the key \
                     file {file} lacks: is it the network's exchange key file?"
                )));
            }
            _ => {
                return Err(StoreError::Keys(format!(
                    "data key {id} of {file} does not open the database's messages: another \
                     key file with the same key ids?"
                )));
            }
        }
    }
    let current = i64::from(keys.current());
    let check = sealer.seal("key_checks", &current.to_be_bytes(), KEY_CHECK.to_vec());
    transaction
        .execute(
            "INSERT INTO key_checks (key, sealed) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &[&current, &check],
        )
        .await?;
    transaction.commit().await?;
    Ok(())
}

/// Fails unless the database commits to a synchronous standby; warns if none is streaming
/// now (commits then wait until one is).
async fn replicated(client: &Client) -> Result<(), StoreError> {
    let names: String = client
        .query_one("SELECT current_setting('synchronous_standby_names')", &[])
        .await?
        .get(0);
    if names.trim().is_empty() {
        return Err(StoreError::Database(
            "the database has no synchronous standby (synchronous_standby_names is empty): \
             a failover could lose relayed messages the exchange acknowledged. Give it one, \
             or declare the database single-node"
                .into(),
        ));
    }
    let streaming: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')",
            &[],
        )
        .await?
        .get(0);
    if streaming == 0 {
        tracing::warn!(
            synchronous_standby_names = %names,
            "no synchronous standby is connected to the database: its commits wait until one is"
        );
    }
    Ok(())
}

/// A number stored as `bigint` (never negative when written).
fn count_of(table: &'static str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        tree: table,
        reason: format!("a negative number {value}"),
    })
}

/// The directory's next version, taken for this transaction (claims and releases wait here
/// for one another, on every exchange).
async fn next_version(transaction: &tokio_postgres::Transaction<'_>) -> Result<i64, StoreError> {
    Ok(transaction
        .query_one(
            "UPDATE directory_head SET version = version + 1 RETURNING version",
            &[],
        )
        .await?
        .get(0))
}

async fn log_version(
    transaction: &tokio_postgres::Transaction<'_>,
    version: i64,
    name: &str,
) -> Result<(), StoreError> {
    transaction
        .execute(
            "INSERT INTO directory_log (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
    Ok(())
}

/// A time or a version as PostgreSQL's `bigint`.
fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn number_of(value: i32) -> Result<u16, StoreError> {
    u16::try_from(value).map_err(|_| StoreError::Corrupt {
        tree: "servers",
        reason: format!("server number {value} is out of range"),
    })
}
