//! One suite, two stores: the exchange's registry and directory answer alike from its own sled
//! store and from PostgreSQL (a cluster the test starts, `iim_e2e::postgres`); and in
//! PostgreSQL, exchanges that share the database see one registry and one directory.

use iim_e2e::postgres::{self, Cluster};
use iim_host::store::exchange::{ExchangeStore, Joining};
use iim_host::store::exchange_db::{Change, ExchangeDb};
use iim_host::store::postgres::Durability::{Replicated, SingleNode};
use iim_host::store::postgres::PgExchange;
use iim_host::store::{DataKeys, Sealer};
use iim_proto::peer::{Envelope, RelayRow};
use iim_proto::{Address, DeviceId, Message, MessageId, MessageKind, UserId};
use std::collections::HashMap;

fn user(name: &str) -> Address {
    Address::User(UserId::new(name).expect("valid"))
}

fn group(name: &str) -> Address {
    format!("#{name}").parse().expect("valid")
}

fn message(id: u64) -> Message {
    Message {
        id: MessageId(id),
        kind: MessageKind::Chat,
        from: UserId::new("alice").expect("valid"),
        from_device: DeviceId::new("phone").expect("valid"),
        to: vec![user("bob")],
        body: b"a secret plan".to_vec(),
        sent_at: 1,
    }
}

fn row(server: &str, users: &[&str]) -> RelayRow {
    RelayRow {
        server: server.into(),
        users: users.iter().map(|u| user(u)).collect(),
    }
}

/// What every store must do with relayed messages.
async fn relay(db: &ExchangeDb) -> anyhow::Result<()> {
    for (i, id) in ["h1", "h2", "h3"].iter().enumerate() {
        db.join(id, &format!("127.0.0.1:{i}"), "", 1).await?;
    }
    let envelope = Envelope {
        message: message(10),
        expires_at: Some(99),
        rows: vec![
            row("h2", &["carol", "bob"]),
            row("h3", &["dave"]),
            row("h9", &["eve"]),
            row("h1", &["alice"]),
            row("h2", &["bob", "erin"]),
        ],
    };
    let targets = db.relay_in("h1", 1, envelope.clone()).await?;
    assert_eq!(
        targets,
        ["h2", "h3"],
        "a server the registry lacks, and the origin itself, are dropped"
    );
    assert!(
        db.relay_in("h1", 1, envelope.clone()).await?.is_empty(),
        "905 number 1 from h1 was stored before"
    );
    db.flush().await?;
    assert_eq!(db.inbound("h1").await?, 1);
    assert_eq!(db.inbound("h2").await?, 0);
    let to_h2 = db.outbox("h2", 0, 10).await?;
    assert_eq!(to_h2.len(), 1);
    let (seq, ref to_h2) = to_h2[0];
    assert_eq!(seq, 1);
    assert_eq!(to_h2.message, message(10));
    assert_eq!(to_h2.expires_at, Some(99));
    assert_eq!(
        to_h2.rows,
        [row("h2", &["bob", "carol", "erin"])],
        "one row per server, each user once"
    );
    assert_eq!(
        db.outbox("h3", 0, 10).await?[0].1.rows,
        [row("h3", &["dave"])]
    );

    // Numbered per target, in the order stored; taken from any point.
    let more = Envelope {
        message: message(11),
        rows: vec![row("h2", &["bob"])],
        ..envelope
    };
    assert_eq!(db.relay_in("h1", 2, more).await?, ["h2"]);
    let numbers: Vec<u64> = db.outbox("h2", 0, 10).await?.iter().map(|e| e.0).collect();
    assert_eq!(numbers, [1, 2]);
    assert_eq!(db.outbox("h2", 1, 10).await?[0].1.message.id, MessageId(11));
    assert_eq!(db.outbox("h2", 0, 1).await?.len(), 1, "at most the limit");

    // h2 took the first: it goes; h3's copy of the same message waits.
    db.outbox_acked("h2", 1).await?;
    assert_eq!(db.outbox_len("h2").await?, 1);
    assert_eq!(db.outbox_len("h3").await?, 1, "h3's is its own");
    assert_eq!(db.outbox("h3", 0, 10).await?[0].1.message, message(10));
    db.outbox_acked("h2", 2).await?;
    db.outbox_acked("h3", 1).await?;
    assert_eq!(db.outbox_len("h2").await?, 0);
    assert_eq!(db.outbox_len("h3").await?, 0);
    // Numbering goes on after what was acknowledged.
    let third = Envelope {
        message: message(12),
        expires_at: None,
        rows: vec![row("h2", &["bob"])],
    };
    db.relay_in("h1", 3, third).await?;
    assert_eq!(db.outbox("h2", 0, 10).await?[0].0, 3);
    Ok(())
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
    // A host is up while it is joined and an exchange forwards to it.
    let forwarding = db.forward("h1").await?.expect("no exchange forwards to h1");
    assert!(forwarding.is_held());
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
    let db = ExchangeDb::sled(ExchangeStore::open(&dir.path().join("exchange"))?);
    registry_and_directory(&db).await
}

#[tokio::test]
async fn postgres_keeps_the_registry_and_the_directory() -> anyhow::Result<()> {
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    let db = ExchangeDb::postgres(
        PgExchange::connect(&cluster.url(), Sealer::clear(), SingleNode).await?,
    )
    .await?;
    registry_and_directory(&db).await?;

    // A second exchange on the same database: the same registry and directory, and numbers
    // and versions that go on from the first's.
    let other = ExchangeDb::postgres(
        PgExchange::connect(&cluster.url(), Sealer::clear(), SingleNode).await?,
    )
    .await?;
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
        let db = PgExchange::connect(&cluster.url(), Sealer::clear(), SingleNode).await?;
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
    let db = PgExchange::connect(&cluster.url(), Sealer::clear(), SingleNode).await?;
    let (last, entries) = db.directory_after(0, 100).await?;
    assert_eq!((last, entries.len()), (25, 25));
    Ok(())
}

/// What every store must do with several `905`s at once.
async fn relay_batch(db: &ExchangeDb) -> anyhow::Result<()> {
    for (i, id) in ["h1", "h2"].iter().enumerate() {
        db.join(id, &format!("127.0.0.1:{i}"), "", 1).await?;
    }
    let numbered = |n: u64| Envelope {
        message: message(20 + n),
        expires_at: None,
        rows: vec![row("h2", &["bob"])],
    };
    db.relay_in("h1", 1, numbered(1)).await?;
    // The ones stored before are recognised, the others stored in order.
    let stored = db
        .relay_in_batch(
            "h1",
            vec![
                (1, numbered(1)),
                (2, numbered(2)),
                (2, numbered(2)),
                (3, numbered(3)),
            ],
        )
        .await?;
    assert_eq!(
        stored,
        [vec![], vec!["h2".to_owned()], vec![], vec!["h2".to_owned()]]
    );
    db.flush().await?;
    assert_eq!(db.inbound("h1").await?, 3);
    let ids: Vec<(u64, MessageId)> = db
        .outbox("h2", 0, 10)
        .await?
        .iter()
        .map(|(seq, e)| (*seq, e.message.id))
        .collect();
    assert_eq!(
        ids,
        [(1, MessageId(21)), (2, MessageId(22)), (3, MessageId(23))]
    );
    Ok(())
}

#[tokio::test]
async fn the_sled_store_relays_several_at_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    relay_batch(&ExchangeDb::sled(ExchangeStore::open(
        &dir.path().join("exchange"),
    )?))
    .await
}

#[tokio::test]
async fn postgres_relays_several_at_once() -> anyhow::Result<()> {
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    let db = PgExchange::connect(&cluster.url(), Sealer::clear(), SingleNode).await?;
    relay_batch(&ExchangeDb::postgres(db).await?).await
}

#[tokio::test]
async fn the_sled_store_relays() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = ExchangeDb::sled(ExchangeStore::open(&dir.path().join("exchange"))?);
    relay(&db).await
}

#[tokio::test]
async fn postgres_relays_each_message_stored_once_and_sealed() -> anyhow::Result<()> {
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    let keys = tempfile::tempdir()?;
    let sealer = Sealer::new(DataKeys::create(&keys.path().join("data.key"), 1)?);
    let db = ExchangeDb::postgres(
        PgExchange::connect(&cluster.url(), sealer.clone(), SingleNode).await?,
    )
    .await?;
    relay(&db).await?;

    let sql = cluster.connect().await?;
    let count = |table: &'static str| {
        let sql = &sql;
        async move {
            let row = sql
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await?;
            anyhow::Ok(row.get::<_, i64>(0))
        }
    };
    // Acknowledged messages are gone; the one still waiting is stored once, sealed.
    assert_eq!(count("relay_messages").await?, 1);
    let body: Vec<u8> = sql
        .query_one("SELECT body FROM relay_messages", &[])
        .await?
        .get(0);
    assert!(
        !body.windows(13).any(|w| w == b"a secret plan"),
        "sealed at rest"
    );

    // A message for two hosts is one row of relay_messages; it goes with the last target.
    let envelope = Envelope {
        message: message(20),
        expires_at: None,
        rows: vec![row("h2", &["bob"]), row("h3", &["dave"])],
    };
    db.relay_in("h1", 4, envelope).await?;
    assert_eq!(count("relay_messages").await?, 2);
    assert_eq!(count("relay_rows").await?, 3);
    db.outbox_acked("h2", 4).await?;
    assert_eq!(count("relay_messages").await?, 1, "h3 still waits for it");
    db.outbox_acked("h3", 2).await?;
    assert_eq!(count("relay_messages").await?, 0);

    // Another exchange on the same database (a restart, or a second one): the same outboxes,
    // numbering going on, a repeated 905 recognised; and a wrong key is refused.
    let other =
        ExchangeDb::postgres(PgExchange::connect(&cluster.url(), sealer, SingleNode).await?)
            .await?;
    assert_eq!(other.inbound("h1").await?, 4);
    let again = Envelope {
        message: message(21),
        expires_at: None,
        rows: vec![row("h2", &["bob"])],
    };
    assert!(other.relay_in("h1", 4, again.clone()).await?.is_empty());
    assert_eq!(other.relay_in("h1", 5, again).await?, ["h2"]);
    assert_eq!(other.outbox("h2", 0, 10).await?[0].0, 5);

    // An exchange with another key file, or none, is refused at its start, saying why.
    let wrong = Sealer::new(DataKeys::create(&keys.path().join("other.key"), 1)?);
    let Err(err) = PgExchange::connect(&cluster.url(), wrong, SingleNode).await else {
        panic!("another key file was taken");
    };
    assert!(err.to_string().contains("does not open"), "{err}");
    let Err(err) = PgExchange::connect(&cluster.url(), Sealer::clear(), SingleNode).await else {
        panic!("an exchange without the key was taken");
    };
    assert!(err.to_string().contains("storage.encrypt is off"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_database_kept_in_the_clear_is_not_opened_by_an_exchange_that_seals() -> anyhow::Result<()>
{
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    PgExchange::connect(&cluster.url(), Sealer::clear(), SingleNode).await?;
    let keys = tempfile::tempdir()?;
    let sealer = Sealer::new(DataKeys::create(&keys.path().join("data.key"), 1)?);
    let Err(err) = PgExchange::connect(&cluster.url(), sealer, SingleNode).await else {
        panic!("a sealing exchange took a database kept in the clear");
    };
    assert!(err.to_string().contains("in the clear"), "{err}");
    Ok(())
}

#[tokio::test]
async fn targets_acknowledging_one_message_at_once_leave_nothing_behind() -> anyhow::Result<()> {
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    let db = PgExchange::connect(&cluster.url(), Sealer::clear(), SingleNode).await?;
    for id in ["h1", "h2", "h3"] {
        db.join(id, "127.0.0.1:1", "").await?;
    }
    const MESSAGES: u64 = 100;
    for n in 1..=MESSAGES {
        let envelope = Envelope {
            message: message(n),
            expires_at: None,
            rows: vec![row("h2", &["bob"]), row("h3", &["dave"])],
        };
        db.relay_in("h1", n, envelope).await?;
    }
    // h2 and h3 acknowledge through two exchanges, one message at a time, each message by
    // both at the same moment.
    let together = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let mut acks = tokio::task::JoinSet::new();
    for target in ["h2", "h3"] {
        let db = PgExchange::connect(&cluster.url(), Sealer::clear(), SingleNode).await?;
        let together = std::sync::Arc::clone(&together);
        acks.spawn(async move {
            for n in 1..=MESSAGES {
                together.wait().await;
                db.outbox_acked(target, n).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = acks.join_next().await {
        done??;
    }
    let sql = cluster.connect().await?;
    let left: i64 = sql
        .query_one("SELECT count(*) FROM relay_messages", &[])
        .await?
        .get(0);
    assert_eq!(left, 0, "every message went with its last target");
    Ok(())
}

#[tokio::test]
async fn calls_run_side_by_side_and_one_that_gets_no_answer_gives_up_its_connection()
-> anyhow::Result<()> {
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    let db = std::sync::Arc::new(
        PgExchange::connect(&cluster.url(), Sealer::clear(), SingleNode).await?,
    );
    for id in ["h1", "h2", "h3"] {
        db.join(id, "127.0.0.1:1", "").await?;
    }
    let to_h3 = |n| Envelope {
        message: message(n),
        expires_at: None,
        rows: vec![row("h3", &["dave"])],
    };
    assert_eq!(db.relay_in("h1", 1, to_h3(1)).await?, ["h3"]);
    // Another session holds h1's row: h1's next batch waits for it, on its connection.
    let mut sql = cluster.connect().await?;
    let holder = sql.transaction().await?;
    holder
        .execute(
            "SELECT 1 FROM relay_inbound WHERE origin = 'h1' FOR UPDATE",
            &[],
        )
        .await?;
    let stuck = tokio::spawn({
        let db = std::sync::Arc::clone(&db);
        async move { db.relay_in("h1", 2, to_h3(2)).await }
    });
    let watcher = cluster.connect().await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                &[],
            )
            .await?
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "h1's batch never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Meanwhile h2's batch is stored, on another connection.
    assert_eq!(db.relay_in("h2", 1, to_h3(3)).await?, ["h3"]);
    assert!(!stuck.is_finished(), "h1's batch still waits");
    // h1's gets no answer: it fails after the timeout, and its connection is closed.
    let Err(err) = stuck.await? else {
        panic!("a batch that waited past the timeout was stored")
    };
    assert!(
        err.to_string().contains("no answer from the database"),
        "{err}"
    );
    holder.rollback().await?;
    // Nothing of it was stored; sent again, it is, on a new connection.
    assert_eq!(db.inbound("h1").await?, 1);
    assert_eq!(db.relay_in("h1", 2, to_h3(2)).await?, ["h3"]);
    let ids: Vec<(u64, u64)> = db
        .outbox("h3", 0, 10)
        .await?
        .iter()
        .map(|(seq, envelope)| (*seq, envelope.message.id.0))
        .collect();
    assert_eq!(ids, [(1, 1), (2, 3), (3, 2)]);
    Ok(())
}

#[tokio::test]
async fn a_failover_to_the_synchronous_standby_loses_no_acknowledged_relay() -> anyhow::Result<()> {
    if !postgres::available()? {
        return Ok(());
    }
    // A database without a synchronous standby is refused unless declared single-node.
    let alone = Cluster::start(&[])?;
    let Err(err) = PgExchange::connect(&alone.url(), Sealer::clear(), Replicated).await else {
        panic!("a database with no standby was taken");
    };
    assert!(err.to_string().contains("synchronous standby"), "{err}");
    drop(alone);

    let mut primary = Cluster::start(&["synchronous_standby_names=standby1"])?;
    let standby = Cluster::start_standby(&primary, "standby1")?;
    // The standby first: the exchange must find the writable one.
    let url = Cluster::url_of_writable(&[&standby, &primary]);
    let db = std::sync::Arc::new(PgExchange::connect(&url, Sealer::clear(), Replicated).await?);
    for id in ["h1", "h2"] {
        db.join(id, "127.0.0.1:1", "").await?;
    }
    // h1 relays to h2 without pause; the primary dies under it and the standby takes over.
    let writer = {
        let db = std::sync::Arc::clone(&db);
        tokio::spawn(async move {
            let mut acknowledged = 0;
            for n in 1..=100_000 {
                let envelope = Envelope {
                    message: message(n),
                    expires_at: None,
                    rows: vec![row("h2", &["bob"])],
                };
                if db.relay_in("h1", n, envelope).await.is_err() {
                    break;
                }
                acknowledged = n;
            }
            acknowledged
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    primary.stop("immediate")?;
    let acknowledged = tokio::time::timeout(std::time::Duration::from_secs(20), writer).await??;
    assert!(
        acknowledged > 0,
        "nothing was relayed before the primary died"
    );
    standby.promote()?;

    // The same exchange goes on: its connection is made again, to the promoted standby (the
    // first use may still meet the old one ending).
    let read = db.outbox("h2", 0, 200_000).await;
    let outbox = match read {
        Ok(outbox) => outbox,
        Err(_) => db.outbox("h2", 0, 200_000).await?,
    };
    let ids: Vec<u64> = outbox.iter().map(|(_, e)| e.message.id.0).collect();
    assert!(
        ids.len() as u64 >= acknowledged,
        "{} acknowledged, {} after the failover",
        acknowledged,
        ids.len()
    );
    assert_eq!(
        ids[..acknowledged as usize],
        (1..=acknowledged).collect::<Vec<_>>(),
        "every acknowledged message, in order"
    );
    let next = u64::try_from(ids.len())? + 1;
    let envelope = Envelope {
        message: message(next),
        expires_at: None,
        rows: vec![row("h2", &["bob"])],
    };
    assert_eq!(db.relay_in("h1", next, envelope).await?, ["h2"]);
    eprintln!(
        "{acknowledged} relays acknowledged before the primary died, {} kept",
        ids.len()
    );
    Ok(())
}

#[tokio::test]
async fn one_exchange_at_a_time_forwards_a_target_and_every_one_hears_of_every_change()
-> anyhow::Result<()> {
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    let connect = || async {
        let db = PgExchange::connect(&cluster.url(), Sealer::clear(), SingleNode).await?;
        anyhow::Ok(ExchangeDb::postgres(db).await?)
    };
    let (a_db, b_db) = (connect().await?, connect().await?);
    let step = std::time::Duration::from_secs(10);
    // What a commits, b hears of (and a itself, as every exchange of the database).
    let mut heard = b_db.changes();
    macro_rules! next {
        () => {
            tokio::time::timeout(step, heard.recv()).await??
        };
    }
    for id in ["h1", "h2", "h3"] {
        a_db.join(id, "127.0.0.1:1", "", 1).await?;
        assert_eq!(next!(), Change::Servers);
    }
    a_db.claim(&user("bob"), "h2").await?;
    assert_eq!(next!(), Change::Directory);
    let online = vec![(UserId::new("bob")?, 2)];
    a_db.set_presence("h2", online.clone()).await?;
    assert_eq!(
        next!(),
        Change::Presence {
            server: "h2".into(),
            entries: online.clone()
        }
    );
    assert_eq!(
        b_db.presence().await?,
        HashMap::from([("h2".to_owned(), online.into_iter().collect())])
    );
    a_db.forget_presence("h2").await?;
    assert_eq!(next!(), Change::PresenceGone("h2".into()));
    assert!(b_db.presence().await?.is_empty());
    // A presence notice too long for one notice is told in several.
    let many: Vec<(UserId, u32)> = (0..500)
        .map(|i| Ok((UserId::new(format!("user-with-a-long-name-{i:04}"))?, 1)))
        .collect::<anyhow::Result<_>>()?;
    a_db.set_presence("h3", many.clone()).await?;
    let mut told = Vec::new();
    while told.len() < many.len() {
        let Change::Presence { server, entries } = next!() else {
            panic!("a presence notice was expected")
        };
        assert_eq!(server, "h3");
        told.extend(entries);
    }
    assert_eq!(told, many);
    assert_eq!(b_db.presence().await?["h3"].len(), 500);
    a_db.leave("h3", 2).await?;
    assert_eq!(next!(), Change::Servers);

    let envelope = Envelope {
        message: message(1),
        expires_at: None,
        rows: vec![row("h2", &["bob"]), row("h3", &["dave"])],
    };
    a_db.relay_in("h1", 1, envelope).await?;
    let mut targets = vec![next!(), next!()];
    targets.sort_by_key(|change| format!("{change:?}"));
    assert_eq!(
        targets,
        [Change::Relayed("h2".into()), Change::Relayed("h3".into())]
    );

    let a = a_db.postgres_db().expect("PostgreSQL");
    let b = b_db.postgres_db().expect("PostgreSQL");
    // One forwarder per target: b has h2, so a cannot; h3 is free.
    let held = b.forward("h2").await?.expect("h2 is free");
    assert!(a.forward("h2").await?.is_none(), "b forwards h2");
    assert!(a.forward("h3").await?.is_some(), "h3's is another lock");
    // b's connection ends (b died): a takes h2 over.
    drop(held);
    let deadline = tokio::time::Instant::now() + step;
    loop {
        if a.forward("h2").await?.is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "h2 was never freed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn the_sled_store_tells_of_its_changes_as_the_database_does() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = ExchangeDb::sled(ExchangeStore::open(&dir.path().join("exchange"))?);
    let mut heard = db.changes();
    db.join("h1", "127.0.0.1:1", "h1's credential", 1).await?;
    db.join("h2", "127.0.0.1:2", "h2's credential", 1).await?;
    assert_eq!(heard.try_recv()?, Change::Servers);
    assert_eq!(heard.try_recv()?, Change::Servers);
    // A refused join changes nothing, and tells of nothing.
    db.join("h2", "127.0.0.1:2", "not h2's credential", 1)
        .await?;
    db.claim(&user("bob"), "h2").await?;
    assert_eq!(heard.try_recv()?, Change::Directory);
    db.claim(&user("bob"), "h1").await?;
    let online = vec![(UserId::new("bob")?, 1)];
    db.set_presence("h2", online.clone()).await?;
    assert_eq!(
        heard.try_recv()?,
        Change::Presence {
            server: "h2".into(),
            entries: online.clone()
        }
    );
    assert_eq!(
        db.presence().await?,
        HashMap::from([("h2".to_owned(), online.into_iter().collect())])
    );
    db.forget_presence("h2").await?;
    assert_eq!(heard.try_recv()?, Change::PresenceGone("h2".into()));
    let envelope = Envelope {
        message: message(1),
        expires_at: None,
        rows: vec![row("h2", &["bob"])],
    };
    db.relay_in("h1", 1, envelope).await?;
    assert_eq!(heard.try_recv()?, Change::Relayed("h2".into()));
    assert!(heard.try_recv().is_err(), "nothing more");
    Ok(())
}

#[tokio::test]
async fn an_exchange_whose_listening_connection_ends_listens_again_and_says_it_missed_notices()
-> anyhow::Result<()> {
    if !postgres::available()? {
        return Ok(());
    }
    let cluster = Cluster::start(&[])?;
    let db = ExchangeDb::postgres(
        PgExchange::connect(&cluster.url(), Sealer::clear(), SingleNode).await?,
    )
    .await?;
    let mut heard = db.changes();
    let sql = cluster.connect().await?;
    let ended: i64 = sql
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE pid <> pg_backend_pid() AND (query LIKE '%LISTEN%' OR query = $1)",
            &[&iim_host::store::postgres::LISTENING_BEAT],
        )
        .await?
        .get(0);
    assert_eq!(ended, 1, "one connection listens");
    let step = std::time::Duration::from_secs(10);
    assert_eq!(
        tokio::time::timeout(step, heard.recv()).await??,
        Change::Missed
    );
    // And it hears again.
    db.join("h1", "127.0.0.1:1", "h1's credential", 1).await?;
    assert_eq!(
        tokio::time::timeout(step, heard.recv()).await??,
        Change::Servers
    );
    Ok(())
}
