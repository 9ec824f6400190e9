//! End-to-end: the plugin platform. Real `iim-host` processes load real components from their
//! plugins directory; clients see what the plugins decide.

use anyhow::Context as _;
use iim_client::Connection;
use iim_client::proto::body::ReadReport;
use iim_client::proto::{ErrorCode, Message, MessageKind, RelationKind, UserId};
use iim_e2e::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

type Result = anyhow::Result<()>;

/// The JSON body of a presence or receipt message.
fn body_json(message: &Message) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(&message.body)?)
}

/// The next message, which must be of `kind`.
async fn expect_kind(conn: &Connection, kind: MessageKind) -> anyhow::Result<Message> {
    let message = next_message(conn).await?;
    anyhow::ensure!(
        message.kind == kind,
        "expected a {kind} message, got {message:?} ({})",
        text(&message)
    );
    Ok(message)
}

/// Submits a message of `kind` to one user, with a fresh client id.
async fn submit(
    conn: &Connection,
    kind: MessageKind,
    to: &UserId,
    body: &[u8],
) -> std::result::Result<iim_client::Accepted, iim_client::ClientError> {
    conn.submit(
        iim_client::new_client_id(),
        kind,
        std::slice::from_ref(to),
        body,
    )
    .await
}

/// Nothing arrives on `conn` for a short while.
async fn quiet(conn: &Connection) -> Result {
    match tokio::time::timeout(Duration::from_millis(300), conn.next_event()).await {
        Err(_) => Ok(()),
        Ok(event) => anyhow::bail!("expected nothing, got {event:?}"),
    }
}

/// Copies `from` over `to` by writing a temporary file and renaming it, as an operator should
/// (the host never sees half a file).
fn install(from: &Path, to: &Path) -> Result {
    let bytes = std::fs::read(from)?;
    replace_with(&bytes, to)
}

fn replace_with(bytes: &[u8], to: &Path) -> Result {
    let tmp = to.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

/// `bytes` with a custom section appended: a different build of the same component (another
/// digest), as a rebuild would give.
fn rebuilt(bytes: &[u8], generation: u32) -> Vec<u8> {
    let name = b"iim-test-generation";
    let payload = generation.to_le_bytes();
    let size = 1 + name.len() + payload.len();
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    out.push(size as u8); // fits in one LEB128 byte
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

#[tokio::test]
async fn presence_is_sent_to_online_friends_and_colleagues_with_a_snapshot_at_login() -> Result {
    let host = HostProcess::start()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let carol = host.register("carol").await?;
    let dave = host.register("dave").await?;
    // Bob and Carol count Alice among their friends or colleagues; Dave does not.
    let (b, _) = host.online(&bob, "phone").await?;
    let (c, _) = host.online(&carol, "phone").await?;
    let (d, _) = host.online(&dave, "phone").await?;
    for conn in [&b, &c, &d] {
        // Each login with no contacts yet: an empty snapshot.
        let snapshot = expect_kind(conn, MessageKind::Presence).await?;
        assert_eq!(body_json(&snapshot)?, json!({"presence": []}));
    }
    let (a0, _) = host.online(&alice, "setup").await?;
    expect_kind(&a0, MessageKind::Presence).await?;
    a0.add_relation(RelationKind::Friend, &bob).await?;
    a0.add_relation(RelationKind::Colleague, &carol).await?;
    a0.add_relation(RelationKind::Friend, &dave).await?;
    a0.close().await;
    // Alice's first device went offline: her friends and colleagues who are online hear it.
    for conn in [&b, &c, &d] {
        let offline = expect_kind(conn, MessageKind::Presence).await?;
        assert_eq!(
            body_json(&offline)?,
            json!({"presence": [{"user": "alice", "state": "offline", "devices": 0}]})
        );
        assert_eq!(offline.from, alice);
    }
    d.close().await;

    let (a, _) = host.online(&alice, "phone").await?;
    // Her snapshot: every friend and colleague, sorted, with their state.
    let snapshot = expect_kind(&a, MessageKind::Presence).await?;
    assert_eq!(
        body_json(&snapshot)?,
        json!({"presence": [
            {"user": "bob", "state": "online", "devices": 1},
            {"user": "carol", "state": "online", "devices": 1},
            {"user": "dave", "state": "offline", "devices": 0},
        ]})
    );
    // The online ones hear she is online, in one message each (one send, two recipients).
    let to_bob = expect_kind(&b, MessageKind::Presence).await?;
    let to_carol = expect_kind(&c, MessageKind::Presence).await?;
    assert_eq!(
        body_json(&to_bob)?,
        json!({"presence": [{"user": "alice", "state": "online", "devices": 1}]})
    );
    assert_eq!(to_bob.id, to_carol.id, "one message sent to both");

    // A second device does not announce her again; closing it leaves her online.
    let (a2, _) = host.online(&alice, "laptop").await?;
    expect_kind(&a2, MessageKind::Presence).await?;
    a2.close().await;
    quiet(&b).await?;

    // Her last device goes: offline.
    a.close().await;
    let gone = expect_kind(&b, MessageKind::Presence).await?;
    assert_eq!(
        body_json(&gone)?,
        json!({"presence": [{"user": "alice", "state": "offline", "devices": 0}]})
    );
    expect_kind(&c, MessageKind::Presence).await?;
    Ok(())
}

#[tokio::test]
async fn delivered_and_read_receipts_reach_the_sender_and_read_state_the_reader_s_devices() -> Result
{
    let host = HostProcess::start()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    expect_kind(&a, MessageKind::Presence).await?;
    let (b, _) = host.online(&bob, "phone").await?;
    expect_kind(&b, MessageKind::Presence).await?;
    let (b2, _) = host.online(&bob, "laptop").await?;
    // The laptop's snapshot goes to Bob, so to both his devices.
    expect_kind(&b2, MessageKind::Presence).await?;
    expect_kind(&b, MessageKind::Presence).await?;

    let sent = a.send_text(&bob, "did you get this?").await?;
    let on_phone = expect_kind(&b, MessageKind::Chat).await?;
    let on_laptop = expect_kind(&b2, MessageKind::Chat).await?;
    assert_eq!((on_phone.id, on_laptop.id), (sent.id, sent.id));

    // Each of Bob's devices acknowledged it: a delivered receipt per device.
    let mut delivered = Vec::new();
    for _ in 0..2 {
        let receipt = expect_kind(&a, MessageKind::Receipt).await?;
        assert_eq!(receipt.from, bob);
        delivered.push(body_json(&receipt)?);
    }
    delivered.sort_by_key(|v| v["device"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        delivered,
        vec![
            json!({"state": "delivered", "id": sent.id.0, "user": "bob", "device": "laptop"}),
            json!({"state": "delivered", "id": sent.id.0, "user": "bob", "device": "phone"}),
        ]
    );

    // Bob reads it on his phone: Alice learns it, and so does Bob's laptop.
    let read = ReadReport { id: sent.id.0 }.to_json();
    submit(&b, MessageKind::Receipt, &alice, &read).await?;
    let expected = json!({"state": "read", "id": sent.id.0, "user": "bob", "device": "phone"});
    assert_eq!(
        body_json(&expect_kind(&a, MessageKind::Receipt).await?)?,
        expected
    );
    assert_eq!(
        body_json(&expect_kind(&b2, MessageKind::Receipt).await?)?,
        expected
    );

    // A read receipt for a message Bob never got is refused by the plugin: Alice hears nothing.
    let forged = ReadReport {
        id: sent.id.0 + 1000,
    }
    .to_json();
    submit(&b, MessageKind::Receipt, &alice, &forged).await?;
    quiet(&a).await?;
    Ok(())
}

#[tokio::test]
async fn chat_is_refused_without_the_chat_plugin_and_back_when_it_returns() -> Result {
    let TwoUsers {
        host, bob, a, b, ..
    } = TwoUsers::start().await?;
    let chat = host.plugins_dir().join("chat.wasm");
    let saved = std::fs::read(&chat)?;

    std::fs::remove_file(&chat)?;
    let listed = host.admin("reload").await?;
    assert!(!listed.contains("chat"), "chat still loaded: {listed}");
    let refused = a.send_text(&bob, "anyone there?").await;
    assert_eq!(code_of(refused)?, ErrorCode::UNSUPPORTED_KIND);
    quiet(&b).await?;

    // The sessions stayed up: putting the plugin back restores chat on them.
    replace_with(&saved, &chat)?;
    let listed = host.admin("reload").await?;
    assert!(listed.contains("message(chat)"), "chat not back: {listed}");
    let sent = a.send_text(&bob, "back again").await?;
    let got = next_message(&b).await?;
    assert_eq!((got.id, text(&got)), (sent.id, "back again".to_owned()));
    Ok(())
}

#[tokio::test]
async fn an_invalid_build_is_refused_and_the_loaded_one_keeps_serving() -> Result {
    let TwoUsers {
        host, bob, a, b, ..
    } = TwoUsers::start().await?;
    let chat = host.plugins_dir().join("chat.wasm");
    let before = host.admin("plugins").await?;

    // Not a component at all, then a component that does not fit the world.
    replace_with(b"\0asm garbage", &chat)?;
    host.admin("reload").await?;
    let misfit = test_plugin("misbehave")?;
    let wrong_world = std::fs::read(&misfit)?;
    // The misbehave plugin fits the world; cut it short to break it.
    replace_with(&wrong_world[..wrong_world.len() / 2], &chat)?;
    // The old build still serves, and the listing says why the new one was refused.
    let after = host.admin("reload").await?;
    let (serving, refused) = after.split_at(before.len());
    assert_eq!(serving, before, "the old build still serves: {after}");
    assert!(
        refused.starts_with("chat\trefused: not a valid component"),
        "{after}"
    );
    let log = host.log();
    assert!(
        log.contains("plugin refused") && log.contains("the loaded build keeps serving"),
        "{log}"
    );

    let sent = a.send_text(&bob, "still here").await?;
    let got = next_message(&b).await?;
    assert_eq!(got.id, sent.id);
    Ok(())
}

#[tokio::test]
async fn chat_replaced_ten_times_under_load_delivers_every_message_once_in_order() -> Result {
    let TwoUsers {
        host, bob, a, b, ..
    } = TwoUsers::start().await?;
    let chat = host.plugins_dir().join("chat.wasm");
    let original = std::fs::read(&chat)?;
    let digests = under_load((a, b, bob), MessageKind::Chat, async {
        let mut digests = std::collections::BTreeSet::new();
        for generation in 1..=10 {
            replace_with(&rebuilt(&original, generation), &chat)?;
            digests.insert(host.admin("reload").await?);
        }
        anyhow::Ok(digests)
    })
    .await?;
    assert_eq!(digests?.len(), 10, "ten different builds served");
    assert_eq!(host.log().matches("plugin replaced").count(), 10);
    Ok(())
}

#[tokio::test]
async fn chat_s_instances_changed_under_load_keep_every_message_once_in_order() -> Result {
    let TwoUsers {
        host, bob, a, b, ..
    } = TwoUsers::start().await?;
    let config = host.plugins_dir().join("chat.toml");
    let listed = under_load((a, b, bob), MessageKind::Chat, async {
        let mut listed = Vec::new();
        for instances in [1, 3, 16, 2, 8, 1] {
            replace_with(
                format!("[host]\ninstances = {instances}\n").as_bytes(),
                &config,
            )?;
            let plugins = host.admin("reload").await?;
            let chat = plugins
                .lines()
                .find(|l| l.starts_with("chat\t"))
                .context("chat listed")?
                .to_owned();
            listed.push((instances, chat));
        }
        anyhow::Ok(listed)
    })
    .await?;
    for (instances, line) in listed? {
        assert!(
            line.contains(&format!("instances {instances},")),
            "{instances}: {line}"
        );
    }
    Ok(())
}

/// A host with chat and the misbehaving test plugin, and Alice and Bob online.
async fn misbehaving_host(
    config: &str,
) -> anyhow::Result<(HostProcess, UserId, UserId, Connection, Connection)> {
    let chat = default_plugin("chat")?;
    let misbehave = test_plugin("misbehave")?;
    let host = HostProcess::start_with(
        config,
        Plugins::Only(&[("chat", &chat), ("misbehave", &misbehave)]),
    )?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let (b, _) = host.online(&bob, "phone").await?;
    Ok((host, alice, bob, a, b))
}

async fn misbehave(a: &Connection, to: &UserId, what: &str) -> anyhow::Result<()> {
    submit(
        a,
        MessageKind::Custom("misbehave".into()),
        to,
        what.as_bytes(),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn plugins_that_trap_loop_sleep_or_exhaust_memory_fail_alone_and_their_events_are_set_aside()
-> Result {
    let (host, _alice, bob, a, b) =
        misbehaving_host("[plugins]\ncall_timeout_ms = 300\nmax_memory_mib = 32\n").await?;
    for what in ["trap", "loop", "sleep", "alloc", "fail"] {
        misbehave(&a, &bob, what).await?;
        // Meanwhile chat, another plugin, is served.
        let sent = a.send_text(&bob, &format!("after {what}")).await?;
        let got = expect_kind(&b, MessageKind::Chat).await?;
        assert_eq!(got.id, sent.id);
    }
    // The misbehaving plugin still works, on a fresh instance.
    misbehave(&a, &bob, "hello").await?;
    let passed = expect_kind(&b, MessageKind::Custom("misbehave".into())).await?;
    assert_eq!(text(&passed), "hello");

    // Every failed event was tried three times and set aside, with the reason.
    let letters = host.admin("dead-letters").await?;
    let lines: Vec<&str> = letters.lines().collect();
    assert_eq!(lines.len(), 5, "{letters}");
    assert!(
        lines[0].contains("attempts 3") && lines[0].contains("trapped"),
        "{letters}"
    );
    assert!(
        lines[1].contains("ran longer than its 300 ms limit"),
        "{letters}"
    );
    // Asleep in the host (a WASI clock), where the epoch cannot interrupt: the async timeout.
    assert!(lines[2].contains("timed out after 300 ms"), "{letters}");
    assert!(lines[3].contains("memory"), "{letters}");
    assert!(lines[4].contains("failed: asked to fail"), "{letters}");
    quiet(&b).await?;
    Ok(())
}

#[tokio::test]
async fn a_plugin_stuck_on_one_user_s_event_keeps_serving_the_others() -> Result {
    // Three attempts of a call that runs until its 2 s limit: about 6 s on one lane.
    let (host, alice, bob, a, b) = misbehaving_host("[plugins]\ncall_timeout_ms = 2000\n").await?;
    // A user whose events go to another of the plugin's 8 lanes than Alice's.
    let lanes = 8;
    let carol = (0..)
        .map(|i| UserId::new(format!("carol{i}")))
        .find(|u| {
            u.as_ref()
                .is_ok_and(|u| u.partition(lanes) != alice.partition(lanes))
        })
        .expect("some name falls in another lane")?;
    host.register(carol.as_str()).await?;
    let (c, _) = host.online(&carol, "phone").await?;

    misbehave(&a, &bob, "loop").await?;
    misbehave(&c, &bob, "count").await?;
    // Carol's event is handled while Alice's still runs: her answer comes back before Alice's
    // event has used up its attempts.
    let report = expect_kind(&c, MessageKind::Custom("misbehave-report".into())).await?;
    assert_eq!(text(&report), "count: 1");
    assert_eq!(host.admin("dead-letters").await?, "no dead letters\n");

    // Alice's event does end as a dead letter, and her next one is handled after it.
    misbehave(&a, &bob, "after the loop").await?;
    let passed = expect_kind(&b, MessageKind::Custom("misbehave".into())).await?;
    assert_eq!(text(&passed), "after the loop");
    let letters = host.admin("dead-letters").await?;
    assert!(
        letters.lines().count() == 1 && letters.contains("ran longer than its 2000 ms limit"),
        "{letters}"
    );
    quiet(&b).await?;
    Ok(())
}

#[tokio::test]
async fn dead_letters_are_handed_back_once_the_plugin_is_fixed() -> Result {
    let (host, _alice, bob, a, b) = misbehaving_host("").await?;
    misbehave(&a, &bob, "fail").await?;
    let letters = wait_for_dead_letters(&host, 1).await?;
    let id = letters.split('\t').next().unwrap_or_default().to_owned();

    // While the plugin still fails, a retry fails again and the event is set aside anew.
    let retried = host.admin(&format!("retry-dead-letters {id}")).await?;
    assert_eq!(retried, format!("{id}\trequeued to misbehave\n"));
    let again = wait_for_dead_letters(&host, 1).await?;
    assert!(
        again.contains("failed: asked to fail") && !again.starts_with(&format!("{id}\t")),
        "{again}"
    );

    // Fixed (here: told to pass everything on), the plugin handles it: Bob gets the message.
    std::fs::write(
        host.plugins_dir().join("misbehave.toml"),
        "mode = \"pass\"\n",
    )?;
    host.admin("reload").await?;
    let retried = host.admin("retry-dead-letters").await?;
    assert!(retried.ends_with("\trequeued to misbehave\n"), "{retried}");
    let passed = expect_kind(&b, MessageKind::Custom("misbehave".into())).await?;
    assert_eq!(text(&passed), "fail");
    assert_eq!(host.admin("dead-letters").await?, "no dead letters\n");
    assert_eq!(host.admin("retry-dead-letters").await?, "no dead letters\n");

    // A number that is not a dead letter is an error, and says so.
    let missing = host.admin("retry-dead-letters 999999").await;
    let error = format!(
        "{:#}",
        missing.err().context("a missing letter is an error")?
    );
    assert!(error.contains("no dead letter 999999"), "{error}");
    quiet(&b).await?;
    Ok(())
}

/// The dead-letter list once it has `count` letters (the plugin's three attempts take a moment).
async fn wait_for_dead_letters(host: &HostProcess, count: usize) -> anyhow::Result<String> {
    for _ in 0..200 {
        let letters = host.admin("dead-letters").await?;
        if letters != "no dead letters\n" && letters.lines().count() == count {
            return Ok(letters);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{count} dead letters did not appear")
}

#[tokio::test]
async fn what_a_plugin_prints_is_logged_under_its_name() -> Result {
    let (host, _alice, bob, a, b) = misbehaving_host("").await?;
    let kind = MessageKind::Custom("misbehave".into());
    // The plugin writes while it handles the message, so its line is logged once Bob has it.
    for stream in ["stderr", "stdout"] {
        misbehave(&a, &bob, &format!("{stream} marker-on-{stream}")).await?;
        expect_kind(&b, kind.clone()).await?;
        let log = host.log();
        let line = log
            .lines()
            .find(|line| line.contains(&format!("marker-on-{stream}")))
            .with_context(|| format!("no marker-on-{stream} in the host's log:\n{log}"))?;
        assert!(
            line.contains("plugin=misbehave") && line.contains(&format!("stream=\"{stream}\"")),
            "{line}"
        );
    }
    // A Rust plugin's panic message, the usual reason a plugin writes to stderr, says whose.
    misbehave(&a, &bob, "trap").await?;
    wait_for_dead_letters(&host, 1).await?;
    let log = host.log();
    let panics: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("asked to trap"))
        .collect();
    assert_eq!(panics.len(), 3, "one per attempt: {panics:#?}");
    for line in panics {
        assert!(line.contains("plugin=misbehave"), "{line}");
    }
    Ok(())
}

#[tokio::test]
async fn forged_senders_and_malformed_user_lists_get_clear_errors_and_send_nothing() -> Result {
    let (_host, _alice, bob, a, b) = misbehaving_host("").await?;
    misbehave(&a, &bob, "forge").await?;
    let report = expect_kind(&a, MessageKind::Custom("misbehave-report".into())).await?;
    assert_eq!(
        text(&report),
        "forge: Err(HostError::ForgedSender(\"bob\"))"
    );

    misbehave(&a, &bob, "badlist").await?;
    let report = expect_kind(&a, MessageKind::Custom("misbehave-report".into())).await?;
    let report = text(&report);
    assert!(report.contains("UnknownServer(\"elsewhere\")"), "{report}");
    assert!(report.contains("appears twice"), "{report}");

    // Only the plugin that handles groups may speak for one.
    misbehave(&a, &bob, "forge-group").await?;
    let report = expect_kind(&a, MessageKind::Custom("misbehave-report".into())).await?;
    let report = text(&report);
    assert_eq!(
        report.matches("PermissionDenied").count(),
        2,
        "both the group notice and the message to #team are refused: {report}"
    );
    // Bob received none of it.
    quiet(&b).await?;
    Ok(())
}

#[tokio::test]
async fn pass_on_delivers_the_handled_message_once_and_refuses_unknown_users() -> Result {
    let (_host, _alice, bob, a, b) = misbehaving_host("").await?;
    let kind = MessageKind::Custom("misbehave".into());
    let accepted = submit(&a, kind.clone(), &bob, b"pass-on").await?;
    let report = expect_kind(&a, MessageKind::Custom("misbehave-report".into())).await?;
    assert_eq!(
        text(&report),
        "pass-on: Err(HostError::UnknownUser(\"nobody-here\")) / Ok(1)"
    );
    let passed = expect_kind(&b, kind).await?;
    assert_eq!(passed.id, accepted.id, "the message itself, same id");
    assert_eq!(text(&passed), "pass-on");
    quiet(&b).await?;
    Ok(())
}

#[tokio::test]
async fn plugin_storage_keeps_only_what_successful_calls_wrote() -> Result {
    let (_host, _alice, bob, a, _b) = misbehaving_host("").await?;
    for (what, expected) in [
        ("count", Some("count: 1")),
        ("count-then-fail", None),
        ("count", Some("count: 2")),
    ] {
        misbehave(&a, &bob, what).await?;
        if let Some(expected) = expected {
            let report = expect_kind(&a, MessageKind::Custom("misbehave-report".into())).await?;
            assert_eq!(text(&report), expected);
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_plugin_added_at_run_time_serves_its_kind() -> Result {
    let TwoUsers {
        host, bob, a, b, ..
    } = TwoUsers::start().await?;
    let kind = MessageKind::Custom("misbehave".into());
    let refused = submit(&a, kind.clone(), &bob, b"hi").await;
    assert_eq!(code_of(refused)?, ErrorCode::UNSUPPORTED_KIND);
    install(
        &test_plugin("misbehave")?,
        &host.plugins_dir().join("misbehave.wasm"),
    )?;
    host.admin("reload").await?;
    misbehave(&a, &bob, "hi").await?;
    assert_eq!(text(&expect_kind(&b, kind).await?), "hi");
    Ok(())
}

#[tokio::test]
async fn a_plugin_built_against_wit_0_1_0_still_loads_and_runs() -> Result {
    let TwoUsers {
        host, bob, a, b, ..
    } = TwoUsers::start().await?;
    install(
        &test_plugin("compat")?,
        &host.plugins_dir().join("compat.wasm"),
    )?;
    host.admin("reload").await?;
    let plugins = host.admin("plugins").await?;
    assert!(
        plugins.contains("compat"),
        "the 0.1.0 plugin is not loaded: {plugins}"
    );
    let kind = MessageKind::Custom("compat".into());
    for (sent, want) in [("hello", "hello #1"), ("again", "again #2")] {
        submit(&a, kind.clone(), &bob, sent.as_bytes()).await?;
        assert_eq!(text(&expect_kind(&b, kind.clone()).await?), want);
    }
    Ok(())
}
