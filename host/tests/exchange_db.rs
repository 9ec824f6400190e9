//! One suite, two stores: the exchange's registry and directory answer alike from its own sled
//! store and from PostgreSQL (a cluster the test starts, `iim_e2e::postgres`); and in
//! PostgreSQL, exchanges that share the database see one registry and one directory.

use iim_e2e::postgres::{self, Cluster};
use iim_host::store::exchange::{ExchangeStore, Joining};
use iim_host::store::exchange_db::ExchangeDb;
use iim_host::store::postgres::PgExchange;
use iim_proto::{Address, UserId};

fn user(name: &str) -> Address {
    Address::User(UserId::new(name).expect("valid"))
}

fn group(name: &str) -> Address {
    format!("#{name}").parse().expect("valid")
}

/// What every store must do with the registry and the directory.
async fn registry_and_directory(db: &ExchangeDb) -> anyhow::Result<()> {
    let h1 = "h1's own secret";
    assert_eq!(db.join("h1", "127.0.0.1:1", h1, 1).await?, Joining::New(1));
    assert_eq!(
        db.join("h2", "127.0.0.1:2", "h2's", 1).await?,
        Joining::New(2)
    );
    assert_eq!(
        db.join("h1", "127.0.0.1:9", h1, 2).await?,
        Joining::Known(1),
        "same number, new address"
    );
    // Another host that takes h1's id is refused, and changes nothing.
    for wrong in ["", "0123", &h1[1..]] {
        assert_eq!(
            db.join("h1", "127.0.0.1:66", wrong, 3).await?,
            Joining::WrongCredential
        );
    }
    db.leave("h2", 4).await?;
    let servers: Vec<_> = db
        .servers()
        .await?
        .into_iter()
        .map(|s| (s.id, s.number, s.addr, s.up))
        .collect();
    assert_eq!(
        servers,
        [
            ("h1".to_owned(), 1, "127.0.0.1:9".to_owned(), true),
            ("h2".to_owned(), 2, "127.0.0.1:2".to_owned(), false),
        ]
    );

    // A name is claimed once; its home answers every later claim.
    assert_eq!(
        db.claim(&user("alice"), "h1").await?,
        ("h1".into(), Some(1))
    );
    assert_eq!(db.claim(&user("alice"), "h2").await?, ("h1".into(), None));
    assert_eq!(
        db.claim(&group("team"), "h2").await?,
        ("h2".into(), Some(2))
    );
    assert_eq!(db.home(&group("team")).await?.as_deref(), Some("h2"));
    assert_eq!(db.home(&user("nobody")).await?, None);

    // Only its home releases a name; the release is a version of its own.
    let alice = UserId::new("alice")?;
    assert_eq!(db.release(&alice, "h2").await?, (Some("h1".into()), None));
    assert_eq!(db.release(&alice, "h1").await?, (None, Some(3)));
    assert_eq!(
        db.release(&alice, "h1").await?,
        (None, None),
        "free already"
    );
    assert_eq!(db.home(&user("alice")).await?, None);
    assert_eq!(db.directory_version().await?, 3);

    // The log, as each name is now: a host catching up from any version ends where the
    // directory is.
    assert_eq!(
        db.directory_after(0, 10).await?,
        (
            3,
            vec![
                (user("alice"), String::new()),
                (group("team"), "h2".into()),
                (user("alice"), String::new()),
            ]
        )
    );
    assert_eq!(
        db.directory_after(1, 1).await?,
        (2, vec![(group("team"), "h2".into())])
    );
    assert_eq!(db.directory_after(3, 10).await?, (3, vec![]));
    // Free again: another host claims it.
    assert_eq!(
        db.claim(&user("alice"), "h2").await?,
        ("h2".into(), Some(4))
    );
    assert_eq!(
        db.directory_after(3, 10).await?,
        (4, vec![(user("alice"), "h2".into())])
    );
    Ok(())
}

#[tokio::test]
async fn the_sled_store_keeps_the_registry_and_the_directory() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = ExchangeDb::Sled(ExchangeStore::open(&dir.path().join("exchange"))?);
    registry_and_directory(&db).await
}

#[tokio::test]
async fn postgres_keeps_the_registry_and_the_directory() -> anyhow::Result<()> {
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    let db = ExchangeDb::Postgres(PgExchange::connect(&cluster.url()).await?);
    registry_and_directory(&db).await?;

    // A second exchange on the same database: the same registry and directory, and numbers
    // and versions that go on from the first's.
    let other = ExchangeDb::Postgres(PgExchange::connect(&cluster.url()).await?);
    assert_eq!(
        other.join("h3", "127.0.0.1:3", "h3's", 5).await?,
        Joining::New(3)
    );
    assert_eq!(other.home(&user("alice")).await?.as_deref(), Some("h2"));
    assert_eq!(
        other.claim(&user("bob"), "h3").await?,
        ("h3".into(), Some(5))
    );
    assert_eq!(db.directory_version().await?, 5);
    Ok(())
}

#[tokio::test]
async fn exchanges_claiming_one_name_at_once_give_it_one_home() -> anyhow::Result<()> {
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    let mut claims = tokio::task::JoinSet::new();
    for i in 0..4 {
        let db = PgExchange::connect(&cluster.url()).await?;
        claims.spawn(async move {
            let mut won = Vec::new();
            for n in 0..25 {
                let name = user(&format!("user{n}"));
                if let (_, Some(version)) = db.claim(&name, &format!("h{i}")).await? {
                    won.push(version);
                }
            }
            anyhow::Ok(won)
        });
    }
    let mut versions = Vec::new();
    while let Some(won) = claims.join_next().await {
        versions.extend(won??);
    }
    // Each of the 25 names was won once, and the versions have no gaps and no repeats.
    versions.sort_unstable();
    assert_eq!(versions, (1..=25).collect::<Vec<u64>>());
    let db = PgExchange::connect(&cluster.url()).await?;
    let (last, entries) = db.directory_after(0, 100).await?;
    assert_eq!((last, entries.len()), (25, 25));
    Ok(())
}
