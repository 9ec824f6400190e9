//! The exchange's PostgreSQL store (DESIGN.md §10): its schema, versioned.
//!
//! A schema is a list of [`Migration`]s, numbered from 1 without gaps. [`migrate`] brings a
//! database to the newest: in one transaction, under an advisory lock (so that exchanges that
//! start together apply each migration once), it applies those the database has not had and
//! records each in the table `iim_schema`. A database already past the newest this binary
//! knows is refused, unchanged: an older exchange must not write to a schema it does not know.

use tokio_postgres::Client;

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
