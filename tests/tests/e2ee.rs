//! End-to-end encryption through the `iim` client against the real host, with the key
//! directory (the `keys` plugin): what the recipients' devices read, what the host holds, and
//! what a device added later, a revoked device and a body altered or played again come to.

use anyhow::{Context, ensure};
use iim_client::e2e::{E2eError, GroupMessage, Keyring, Processed};
use iim_client::proto::{DeviceId, Message, MessageKind, UserId};
use iim_e2e::cli::*;
use iim_e2e::{HostProcess, PASSWORD, Plugins, default_plugin, next_event, within};
use std::path::Path;

/// A host with the chat plugin, plugin `other` (receipts, groups), and the keys plugin (the
/// key directory, in one instance as its README asks).
fn keys_host(other: &str) -> anyhow::Result<HostProcess> {
    let (chat, other_wasm) = (default_plugin("chat")?, default_plugin(other)?);
    let keys = default_plugin("keys")?;
    HostProcess::start_with(
        "",
        Plugins::Configured(&[
            ("chat", &chat, ""),
            (other, &other_wasm, ""),
            ("keys", &keys, "[host]\ninstances = 1\n"),
        ]),
    )
}

/// `iim login USER --device DEVICE` in a new profile `dir/USER-DEVICE`, then `iim e2e
/// setup`; returns the profile and the fingerprint it printed.
fn device(
    host: &HostProcess,
    dir: &Path,
    user: &str,
    device: &str,
) -> anyhow::Result<(std::path::PathBuf, String)> {
    let profile = dir.join(format!("{user}-{device}"));
    ok(iim(
        host,
        &profile,
        &["login", user, "--password", PASSWORD, "--device", device],
    )?)?;
    let out = ok(iim(host, &profile, &["e2e", "setup"])?)?;
    let fingerprint = out
        .lines()
        .find_map(|line| line.strip_prefix("fingerprint "))
        .with_context(|| format!("no fingerprint in {out:?}"))?
        .to_owned();
    ensure!(
        out.contains(&format!("published the card of {user}/{device}")),
        "{out}"
    );
    Ok((profile, fingerprint))
}

/// The next line of `listen`'s JSON that is a chat message, skipping receipts.
fn next_chat(listen: &Listen) -> anyhow::Result<serde_json::Value> {
    loop {
        let line = listen.json()?;
        if line["kind"] == "chat" {
            return Ok(line);
        }
    }
}

/// The next chat message a library session gets, with its raw body, acknowledged.
async fn next_raw(conn: &iim_client::Connection) -> anyhow::Result<(u64, Message)> {
    loop {
        if let iim_client::Event::Message { seq, message } = next_event(conn).await? {
            conn.ack(seq).await?;
            if message.kind == MessageKind::Chat {
                return Ok((seq, message));
            }
        }
    }
}

/// The keyring `user`'s `device` left in its CLI profile `profile`.
fn saved_keys(profile: &Path, user: &str, device: &str) -> anyhow::Result<Keyring> {
    let path = profile.join("e2e.keys");
    Ok(Keyring::open_or_create(
        &path,
        &UserId::new(user)?,
        &DeviceId::new(device)?,
        0,
    )?)
}

fn user(name: &str) -> UserId {
    UserId::new(name).expect("user")
}

/// Alice and Bob with two devices each: what Alice's phone sends with `--e2e` reaches both of
/// Bob's devices and Alice's laptop in the clear, and only them; the host holds an opaque
/// body; a device Bob adds later reads what is sent after, not before; a device he revokes
/// gets no copy of what is sent after; a body altered, or played again, is refused on Bob's
/// phone; receipts still come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_with_two_devices_each_talk_end_to_end_through_the_cli() -> anyhow::Result<()> {
    let mut host = keys_host("receipts")?;
    let dir = tempfile::tempdir()?;
    for name in ["alice", "bob"] {
        ok(iim(
            &host,
            &dir.path().join(name),
            &["register", name, "--password", PASSWORD],
        )?)?;
    }
    let (alice_phone, alice_fp) = device(&host, dir.path(), "alice", "phone")?;
    let (alice_laptop, _) = device(&host, dir.path(), "alice", "laptop")?;
    let (bob_phone, bob_fp) = device(&host, dir.path(), "bob", "phone")?;
    let (bob_laptop, _) = device(&host, dir.path(), "bob", "laptop")?;
    ensure!(
        alice_fp != bob_fp && alice_fp.len() == 39,
        "{alice_fp} {bob_fp}"
    );

    // A device of bob's that never set up e2e, through the library: it sees the bodies as
    // the host holds them.
    let (probe, _) = host.online(&user("bob"), "probe").await?;
    // And one that is away: bob's inbox keeps every message for it, so the store holds them
    // all at the end.
    let (away, _) = host.online(&user("bob"), "away").await?;
    away.close().await;

    let listeners: Vec<Listen> = [&bob_phone, &bob_laptop, &alice_laptop]
        .into_iter()
        .map(|profile| Listen::start(profile, &["--json", "listen"]))
        .collect::<anyhow::Result<_>>()?;
    for listen in &listeners {
        ensure!(listen.json()?["kind"] == "synced");
    }

    let sent = iim(&host, &alice_phone, &["send", "--e2e", "bob", "secret one"])?;
    let stderr = String::from_utf8_lossy(&sent.stderr).into_owned();
    let id: u64 = ok(sent)?.trim().parse()?;
    // Alice's phone pinned the devices it saw for the first time, and said so.
    for seen in ["bob/phone", "bob/laptop", "alice/laptop"] {
        ensure!(stderr.contains(&format!("{seen} ")), "{stderr}");
    }
    ensure!(
        stderr.contains(&bob_fp),
        "bob's phone's fingerprint shown: {stderr}"
    );
    // Receipts still work: alice's laptop hears that the message reached bob.
    let mut delivered = false;
    let mut chat = false;
    while !(delivered && chat) {
        let line = listeners[2].json()?;
        match line["kind"].as_str() {
            Some("receipt") if line["body"]["id"] == id && line["body"]["state"] == "delivered" => {
                delivered = true;
            }
            Some("chat") => {
                ensure!(line["id"] == id && line["body"] == "secret one", "{line}");
                ensure!(line["e2e"] == true, "{line}");
                chat = true;
            }
            _ => {}
        }
    }
    for listen in &listeners[..2] {
        let line = next_chat(listen)?;
        ensure!(line["id"] == id, "{line}");
        ensure!(line["body"] == "secret one", "{line}");
        ensure!(line["e2e"] == true && line["from"] == "alice", "{line}");
        ensure!(line.get("e2e_error").is_none(), "{line}");
    }
    let (_, raw) = within("the probe's copy", next_raw(&probe)).await??;
    ensure!(raw.id.0 == id, "{raw:?}");
    ensure!(iim_client::e2e::is_end_to_end(&raw.body));
    ensure!(
        !String::from_utf8_lossy(&raw.body).contains("secret one"),
        "the host sees an opaque body"
    );

    // A message sent in the clear, for comparison, and through the default setting: `iim e2e
    // on bob` makes `iim send` encrypt, `--plain` sends one in the clear all the same.
    ok(iim(&host, &alice_phone, &["e2e", "on", "bob"])?)?;
    let id2: u64 = ok(iim(
        &host,
        &alice_phone,
        &["send", "bob", "secret by default"],
    )?)?
    .trim()
    .parse()?;
    let id3: u64 = ok(iim(
        &host,
        &alice_phone,
        &["send", "--plain", "bob", "plain words"],
    )?)?
    .trim()
    .parse()?;
    let line = next_chat(&listeners[0])?;
    ensure!(
        line["id"] == id2 && line["body"] == "secret by default" && line["e2e"] == true,
        "{line}"
    );
    let line = next_chat(&listeners[0])?;
    ensure!(
        line["id"] == id3 && line["body"] == "plain words" && line.get("e2e").is_none(),
        "{line}"
    );
    // `iim chat` follows the setting too: a line typed (here piped) to bob is encrypted.
    ok(iim_with_stdin(
        &host,
        &alice_phone,
        &["chat", "bob"],
        b"secret through chat\n",
    )?)?;
    let line = next_chat(&listeners[0])?;
    ensure!(
        line["body"] == "secret through chat" && line["e2e"] == true,
        "{line}"
    );

    // Bob adds a tablet: it cannot read what was sent before it had keys (if it is given it),
    // and reads what is sent after.
    let (bob_tablet, _) = device(&host, dir.path(), "bob", "tablet")?;
    let tablet = Listen::start(&bob_tablet, &["--json", "listen"])?;
    let id4: u64 = ok(iim(
        &host,
        &alice_phone,
        &["send", "--e2e", "bob", "secret four"],
    )?)?
    .trim()
    .parse()?;
    // A new device gets what waits in the user's inbox: the earlier e2e messages, which it
    // cannot read.
    let mut unreadable = 0;
    loop {
        let line = tablet.json()?;
        if line["kind"] != "chat" {
            continue;
        }
        if line["id"] == id4 {
            ensure!(
                line["body"] == "secret four" && line["e2e"] == true,
                "{line}"
            );
            break;
        }
        if line["e2e"] == true {
            let error = line["e2e_error"].as_str().unwrap_or_default();
            ensure!(error.contains("no copy for this device"), "{line}");
            unreadable += 1;
        }
    }
    ensure!(unreadable >= 2, "the earlier e2e messages: {unreadable}");

    // Bob revokes the laptop: its card leaves the directory, and what alice sends next has no
    // copy for it.
    ok(iim(&host, &bob_phone, &["account", "revoke", "laptop"])?)?;
    let id5: u64 = ok(iim(
        &host,
        &alice_phone,
        &["send", "--e2e", "bob", "secret five"],
    )?)?
    .trim()
    .parse()?;
    for (id, text) in [(id4, "secret four"), (id5, "secret five")] {
        let line = next_chat(&listeners[0])?;
        ensure!(line["id"] == id && line["body"] == text, "{line}");
    }
    let mut raw5 = None;
    while raw5.is_none() {
        let (_, message) = within("the probe's copies", next_raw(&probe)).await??;
        if message.id.0 == id5 {
            raw5 = Some(message);
        }
    }
    let raw5 = raw5.context("message five")?;
    let mut laptop_keys = saved_keys(&bob_laptop, "bob", "laptop")?;
    let refused = laptop_keys
        .open(&raw5)
        .expect_err("no copy for the revoked laptop");
    ensure!(
        matches!(&refused, E2eError::Crypto(e) if e.to_string() == "no copy for this device"),
        "{refused}"
    );

    // A body altered on the way (here by the sender's own client, which the receiving client
    // cannot tell from the host), and one played again, are refused.
    let mut altered = raw.body.clone();
    let middle = altered.len() / 2;
    altered[middle] ^= 0x20;
    for (name, body) in [("altered", altered), ("replayed", raw.body.clone())] {
        let file = dir.path().join(name);
        std::fs::write(&file, &body)?;
        let path = file.to_str().context("path")?;
        ok(iim(
            &host,
            &alice_phone,
            &["send", "--plain", "--body-file", path, "bob", "alice"],
        )?)?;
    }
    let mut refusals = Vec::new();
    while refusals.len() < 2 {
        let line = next_chat(&listeners[0])?;
        if let Some(error) = line["e2e_error"].as_str() {
            refusals.push(error.to_owned());
        }
    }
    ensure!(refusals[0].contains("REFUSED"), "{refusals:?}");
    ensure!(refusals[1].contains("replay"), "{refusals:?}");

    // The host holds no plaintext of what was encrypted, and the plain message in the clear
    // (sealed at rest, opened by `store find` with the data key).
    drop(listeners);
    drop(tablet);
    probe.close().await;
    host.terminate()?;
    host.wait().await?;
    for secret in [
        "secret one",
        "secret by default",
        "secret four",
        "secret five",
    ] {
        let found = host.store_find(secret)?;
        ensure!(found.is_empty(), "{secret}: {found:?}");
    }
    ensure!(
        !host.store_find("plain words")?.is_empty(),
        "the control is found"
    );
    Ok(())
}

/// The next chat line of `listen` that says `text` (group notices and other lines skipped).
fn chat_saying(listen: &Listen, text: &str) -> anyhow::Result<serde_json::Value> {
    loop {
        let line = next_chat(listen)?;
        if line["body"]
            .as_str()
            .is_some_and(|body| body.contains(text))
        {
            return Ok(line);
        }
    }
}

/// The next raw chat message to `#team` a library session gets that is an MLS application
/// message (commits and welcomes skipped).
async fn next_raw_application(conn: &iim_client::Connection) -> anyhow::Result<Message> {
    loop {
        let (_, message) = within("a group message", next_raw(conn)).await??;
        if GroupMessage::from_bytes(&message.body).is_ok_and(|m| m.is_application()) {
            return Ok(message);
        }
    }
}

/// A group with end-to-end encryption through the CLI: the owner's device makes the MLS group
/// of `#team` and adds every member's device; members read each other; the host holds only
/// opaque bodies; a member removed from the group is removed from the MLS group before the
/// next message, which their device cannot open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_talks_end_to_end_and_a_member_removed_cannot_read_after() -> anyhow::Result<()> {
    let mut host = keys_host("groups")?;
    let dir = tempfile::tempdir()?;
    for name in ["alice", "bob", "carol"] {
        ok(iim(
            &host,
            &dir.path().join(name),
            &["register", name, "--password", PASSWORD],
        )?)?;
    }
    let (alice, _) = device(&host, dir.path(), "alice", "phone")?;
    let (bob, _) = device(&host, dir.path(), "bob", "phone")?;
    let (carol, _) = device(&host, dir.path(), "carol", "phone")?;
    ok(iim(
        &host,
        &alice,
        &["group", "create", "team", "bob", "carol"],
    )?)?;
    // Bob's device without keys, which sees the group's bodies as the host holds them.
    let (probe, _) = host.online(&user("bob"), "probe").await?;
    let listens: Vec<Listen> = [&bob, &carol]
        .into_iter()
        .map(|profile| Listen::start(profile, &["--json", "listen"]))
        .collect::<anyhow::Result<_>>()?;

    let made = ok(iim(&host, &alice, &["--json", "e2e", "group", "team"])?)?;
    let made: serde_json::Value = serde_json::from_str(made.trim())?;
    ensure!(
        made["added"] == serde_json::json!(["bob/phone", "carol/phone"]),
        "{made}"
    );
    for listen in &listens {
        let joined = chat_saying(listen, "joined #team's end-to-end group")?;
        ensure!(joined["e2e"] == true, "{joined}");
    }

    ok(iim(
        &host,
        &alice,
        &["send", "--e2e", "#team", "group secret one"],
    )?)?;
    for listen in &listens {
        let line = next_chat(listen)?;
        ensure!(
            line["body"] == "group secret one" && line["e2e"] == true && line["from"] == "alice",
            "{line}"
        );
    }
    ok(iim(
        &host,
        &bob,
        &["send", "--e2e", "#team", "bob's group secret"],
    )?)?;
    let line = chat_saying(&listens[1], "bob's group secret")?;
    ensure!(line["e2e"] == true && line["from"] == "bob", "{line}");
    let raw = next_raw_application(&probe).await?;
    ensure!(
        !String::from_utf8_lossy(&raw.body).contains("group secret one"),
        "the host sees an opaque body"
    );

    // Carol leaves the group (removed by alice): alice's next e2e message first removes her
    // device from the MLS group.
    ok(iim(&host, &alice, &["group", "remove", "team", "carol"])?)?;
    ok(iim(
        &host,
        &alice,
        &["send", "--e2e", "#team", "after carol"],
    )?)?;
    let change = chat_saying(&listens[0], "end-to-end keys changed")?;
    ensure!(
        change["body"]
            .as_str()
            .is_some_and(|b| b.contains("removed carol/phone")),
        "{change}"
    );
    let line = next_chat(&listens[0])?;
    ensure!(
        line["body"] == "after carol" && line["e2e"] == true,
        "{line}"
    );
    // The bodies as the host holds them: the commit that removes carol's device, then the
    // message.
    let mut commit = None;
    let after = loop {
        let (_, message) = within("a group message", next_raw(&probe)).await??;
        if message.id.0 <= raw.id.0 {
            continue;
        }
        match GroupMessage::from_bytes(&message.body) {
            Ok(m) if m.is_application() && commit.is_some() => break message,
            Ok(m) if m.is_application() => {}
            Ok(m) if !m.is_welcome() => commit = Some(message),
            _ => {}
        }
    };
    let commit = commit.context("the removal's commit")?;
    // Carol's keys, as her device left them.
    drop(listens);
    // Joining used one of carol's ten key packages, and her device published another.
    let setup = ok(iim(&host, &carol, &["e2e", "setup"])?)?;
    ensure!(setup.contains("(20 key packages wait)"), "{setup}");
    let mut carol_keys = saved_keys(&carol, "carol", "phone")?;
    // As her device has them (the host no longer sends her the group's messages, the commit
    // included), they do not open the message: it is of the epoch after her removal.
    let refused = carol_keys
        .process_group(&after)
        .expect_err("carol cannot read after her removal");
    ensure!(
        matches!(&refused, E2eError::Crypto(e) if e.to_string().starts_with("mls:")),
        "{refused:?}"
    );
    // Given the commit, they learn that her device is out of the group.
    match carol_keys.process_group(&commit)? {
        Processed::Commit { removed, .. } => {
            ensure!(removed == ["carol/phone"], "{removed:?}");
        }
        other => anyhow::bail!("not a commit: {other:?}"),
    }
    let refused = carol_keys
        .process_group(&after)
        .expect_err("carol cannot read after her removal");
    ensure!(matches!(refused, E2eError::NotInGroup(_)), "{refused}");

    // For comparison, a message to the group in the clear.
    ok(iim(&host, &alice, &["send", "#team", "plain team words"])?)?;
    within("the plain message", async {
        loop {
            let (_, message) = next_raw(&probe).await?;
            if message.body == b"plain team words" {
                return anyhow::Ok(());
            }
        }
    })
    .await??;

    probe.close().await;
    host.terminate()?;
    host.wait().await?;
    for secret in ["group secret one", "bob's group secret", "after carol"] {
        let found = host.store_find(secret)?;
        ensure!(found.is_empty(), "{secret}: {found:?}");
    }
    ensure!(
        !host.store_find("plain team words")?.is_empty(),
        "the control is found"
    );
    Ok(())
}
