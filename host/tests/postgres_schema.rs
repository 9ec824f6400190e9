//! The exchange's PostgreSQL schema is migrated at most once per version, all of a migration
//! or none of it, and a database newer than the binary is refused unchanged — against a real
//! cluster the test starts (`iim_e2e::postgres`).

use iim_e2e::postgres::{self, Cluster};
use iim_host::store::postgres::{Migrated, Migration, MigrationError, migrate};

const FIRST: Migration = Migration {
    version: 1,
    name: "servers",
    sql: "CREATE TABLE servers (id text PRIMARY KEY, address text NOT NULL)",
};
const SECOND: Migration = Migration {
    version: 2,
    name: "directory",
    sql: "CREATE TABLE directory (address text PRIMARY KEY, server text NOT NULL);
          INSERT INTO servers VALUES ('h1', '127.0.0.1:1')",
};
const THIRD: Migration = Migration {
    version: 3,
    name: "servers up",
    sql: "ALTER TABLE servers ADD COLUMN up boolean NOT NULL DEFAULT false",
};

async fn versions(client: &tokio_postgres::Client) -> anyhow::Result<Vec<(i32, String)>> {
    let rows = client
        .query("SELECT version, name FROM iim_schema ORDER BY version", &[])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn table_exists(client: &tokio_postgres::Client, name: &str) -> anyhow::Result<bool> {
    let row = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn a_schema_is_migrated_once_per_version_whole_or_not_at_all() -> anyhow::Result<()> {
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    let mut client = cluster.connect().await?;

    // A new database gets every migration; a second start applies nothing.
    let done = migrate(&mut client, &[FIRST, SECOND]).await?;
    assert_eq!(done, Migrated { from: 0, to: 2 });
    let done = migrate(&mut client, &[FIRST, SECOND]).await?;
    assert_eq!(done, Migrated { from: 2, to: 2 });
    assert_eq!(
        versions(&client).await?,
        [(1, "servers".to_owned()), (2, "directory".to_owned())]
    );
    let servers: i64 = client
        .query_one("SELECT count(*) FROM servers", &[])
        .await?
        .get(0);
    assert_eq!(servers, 1, "the second migration ran once");

    // A migration that fails leaves nothing of itself: its first statement is undone too.
    let broken = Migration {
        version: 3,
        name: "broken",
        sql: "CREATE TABLE half (x integer); SELECT no_such_function()",
    };
    let err = migrate(&mut client, &[FIRST, SECOND, broken])
        .await
        .expect_err("a failing migration");
    assert!(
        matches!(err, MigrationError::Failed { version: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("broken"), "{err}");
    assert!(
        err.to_string().contains("no_such_function"),
        "the database's own words: {err}"
    );
    assert!(!table_exists(&client, "half").await?);
    assert_eq!(versions(&client).await?.len(), 2);

    // A later binary's migration is applied on its start.
    let done = migrate(&mut client, &[FIRST, SECOND, THIRD]).await?;
    assert_eq!(done, Migrated { from: 2, to: 3 });

    // And an older binary is then refused, with both versions named, changing nothing.
    let err = migrate(&mut client, &[FIRST, SECOND])
        .await
        .expect_err("an older binary");
    assert!(
        matches!(err, MigrationError::Newer { found: 3, known: 2 }),
        "{err}"
    );
    assert!(err.to_string().contains("version 3"), "{err}");
    assert_eq!(versions(&client).await?.len(), 3);

    // A list numbered with a gap is this binary's bug, refused before the database is touched.
    let err = migrate(&mut client, &[FIRST, THIRD])
        .await
        .expect_err("a gap");
    assert!(
        matches!(
            err,
            MigrationError::Numbering {
                version: 3,
                expected: 2,
                ..
            }
        ),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn exchanges_starting_together_apply_each_migration_once() -> anyhow::Result<()> {
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut client = cluster.connect().await?;
        starts.spawn(async move { migrate(&mut client, &[FIRST, SECOND, THIRD]).await });
    }
    let mut done = Vec::new();
    while let Some(result) = starts.join_next().await {
        done.push(result??);
    }
    // One of them migrated from nothing; the others, after its lock, found it done.
    done.sort_by_key(|m| m.from);
    assert_eq!(done[0], Migrated { from: 0, to: 3 });
    assert!(done[1..].iter().all(|m| *m == Migrated { from: 3, to: 3 }));
    let client = cluster.connect().await?;
    assert_eq!(versions(&client).await?.len(), 3);
    let servers: i64 = client
        .query_one("SELECT count(*) FROM servers", &[])
        .await?
        .get(0);
    assert_eq!(servers, 1, "the second migration ran once");
    Ok(())
}

/// A database an exchange of schema version 2 left — a host registered, a message waiting
/// for it — is brought to the newest version by the next exchange's start: the host is
/// known by its credential and number, its message is still there, and the relay tables
/// have their storage parameters.
#[tokio::test]
async fn a_database_of_version_2_is_brought_up_to_date_keeping_its_rows() -> anyhow::Result<()> {
    use iim_host::store::Sealer;
    use iim_host::store::exchange::Joining;
    use iim_host::store::postgres::{Durability, PgExchange, SCHEMA};
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    let mut client = cluster.connect().await?;
    assert_eq!(
        migrate(&mut client, &SCHEMA[..2]).await?,
        Migrated { from: 0, to: 2 }
    );
    let (known, h2) = (
        "h1's credential, long enough",
        "h2's credential, long enough",
    );
    // Rows as an exchange of version 2 wrote them (the credential is kept as its SHA-256).
    client
        .batch_execute(
            "INSERT INTO servers (id, number, addr, up, since, credential)
                 VALUES ('h1', 1, '127.0.0.1:1', true, 5, sha256('h1''s credential, long enough'::bytea));
             INSERT INTO relay_messages (id, body) VALUES (7, '\\x00');
             INSERT INTO relay_rows (target, seq, message, users) VALUES ('h1', 1, 7, '\\x00');
             INSERT INTO relay_targets (target, last, acked) VALUES ('h1', 1, 0);",
        )
        .await?;

    let db = PgExchange::connect(&cluster.url(), Sealer::clear(), Durability::SingleNode).await?;
    let newest = SCHEMA.last().map_or(0, |m| m.version);
    assert_eq!(versions(&client).await?.len(), usize::try_from(newest)?);
    let columns: Vec<String> = client
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_name = 'servers' ORDER BY ordinal_position",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(columns, ["id", "number", "addr", "credential"]);
    let options: Vec<String> = client
        .query(
            "SELECT unnest(reloptions) FROM pg_class WHERE relname = 'relay_rows'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        options.contains(&"autovacuum_vacuum_scale_factor=0".to_owned()),
        "{options:?}"
    );
    let waiting: i64 = client
        .query_one("SELECT count(*) FROM relay_rows WHERE target = 'h1'", &[])
        .await?
        .get(0);
    assert_eq!(waiting, 1, "the waiting row is kept");
    assert_eq!(
        db.join("h1", "127.0.0.1:9", known).await?,
        Joining::Known(1)
    );
    assert_eq!(db.join("h2", "127.0.0.1:2", h2).await?, Joining::New(2));
    assert_eq!(
        db.join("h1", "127.0.0.1:9", "someone else's credential")
            .await?,
        Joining::WrongCredential
    );
    let servers = db.servers().await?;
    let addrs: Vec<(&str, &str)> = servers
        .iter()
        .map(|s| (s.id.as_str(), s.addr.as_str()))
        .collect();
    assert_eq!(addrs, [("h1", "127.0.0.1:9"), ("h2", "127.0.0.1:2")]);
    Ok(())
}
