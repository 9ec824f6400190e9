//! The `iim` command-line client against the real host with its default plugins (chat,
//! presence, receipts, groups): the README's tours, as tests.

use anyhow::{Context, ensure};
use iim_e2e::cli::*;
use iim_e2e::{HostProcess, Plugins, STEP, default_plugin, test_plugin};
use std::process::Output;
use std::sync::Arc;

#[test]
fn two_users_chat_see_each_other_and_get_receipts_through_the_cli() -> anyhow::Result<()> {
    let host = HostProcess::start()?;
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    for (profile, user, device) in [(&a, "alice", "laptop"), (&b, "bob", "phone")] {
        register_and_login(&host, profile, user, device)?;
    }
    // Each is the other's contact: each hears when the other comes online or goes offline.
    ok(iim(&host, &a, &["friend", "add", "bob"])?)?;
    ok(iim(&host, &b, &["friend", "add", "alice"])?)?;
    assert_eq!(ok(iim(&host, &a, &["friend", "list"])?)?, "bob\n");
    assert_eq!(
        ok(iim(&host, &a, &["--json", "friend", "list"])?)?.trim(),
        "[\"bob\"]"
    );

    // Bob is offline: the messages wait for him.
    let first = send(&host, &a, "bob", "are you there?")?;
    let second = send(&host, &a, "bob", "call me")?;
    assert!(second > first);

    // Alice listens, as a person reads it: first, who of her contacts is online.
    let alice = Listen::start(&a, &["listen"])?;
    assert_eq!(alice.text()?, "contacts: bob offline");

    // Bob listens, as JSON: what waited for him, then his contacts.
    let bob = Listen::start(&b, &["--json", "listen"])?;
    let m1 = bob.json()?;
    let m2 = bob.json()?;
    assert_eq!(
        bob.json()?,
        serde_json::json!({ "kind": "synced", "count": 2 })
    );
    assert_eq!(
        (m1["id"].as_u64(), m1["body"].as_str()),
        (Some(first), Some("are you there?"))
    );
    assert_eq!(
        (m2["id"].as_u64(), m2["body"].as_str()),
        (Some(second), Some("call me"))
    );
    for field in ["kind", "id", "from", "from_device", "to", "body", "sent_at"] {
        assert!(!m1[field].is_null(), "listen --json prints {field}");
    }
    assert_eq!(
        (&m1["kind"], &m1["from"], &m1["from_device"], &m1["to"]),
        (
            &"chat".into(),
            &"alice".into(),
            &"laptop".into(),
            &serde_json::json!(["bob"])
        )
    );
    let contacts = bob.json()?;
    assert_eq!(contacts["kind"], "presence");
    assert_eq!(
        contacts["body"],
        serde_json::json!({ "presence": [{ "user": "alice", "state": "online", "devices": 1 }] })
    );

    // Alice sees Bob come online and her two messages reach his phone.
    alice.texts_in_any_order(&[
        "bob is online (1 device)".into(),
        format!("message {first} delivered to bob (phone)"),
        format!("message {second} delivered to bob (phone)"),
    ])?;

    // Live, both ways, each with its delivered receipt.
    let live = send(&host, &a, "bob", "live now")?;
    let m3 = bob.json()?;
    assert_eq!(
        (m3["id"].as_u64(), m3["body"].as_str()),
        (Some(live), Some("live now"))
    );
    assert_eq!(
        alice.text()?,
        format!("message {live} delivered to bob (phone)")
    );
    let reply = send(&host, &b, "alice", "on my way")?;
    assert_eq!(alice.text()?, format!("bob: on my way  (id {reply})"));
    let delivered = bob.json()?;
    assert_eq!(
        (&delivered["kind"], &delivered["from"], &delivered["body"]),
        (
            &"receipt".into(),
            &"alice".into(),
            &serde_json::json!({ "state": "delivered", "id": reply, "user": "alice", "device": "laptop" })
        )
    );

    // Bob marks the first message read: Alice learns it, and so do Bob's devices.
    let first_arg = first.to_string();
    let read = ["read", first_arg.as_str(), "--from", "alice"];
    assert_eq!(
        ok(iim(&host, &b, &read)?)?,
        format!("reported message {first} from alice as read\n")
    );
    assert_eq!(
        alice.text()?,
        format!("message {first} read by bob (phone)")
    );
    let receipt = bob.json()?;
    assert_eq!(
        (&receipt["kind"], &receipt["body"]),
        (
            &"receipt".into(),
            &serde_json::json!({ "state": "read", "id": first, "user": "bob", "device": "phone" })
        )
    );
    // Reporting it again sends nothing: each line Alice sees from here on is asserted.
    ok(iim(&host, &b, &read)?)?;

    // Bob stops listening: Alice sees him go offline.
    bob.interrupt()?;
    assert_eq!(alice.text()?, "bob is offline");

    // Bob listens again, as text, marking each chat message read once it is shown.
    let bob = Listen::start(&b, &["listen", "--read"])?;
    assert_eq!(bob.text()?, "contacts: alice online (1)");
    assert_eq!(alice.text()?, "bob is online (1 device)");
    let news = send(&host, &a, "bob", "read me")?;
    assert_eq!(bob.text()?, format!("alice: read me  (id {news})"));
    assert_eq!(bob.text()?, format!("message {news} read by bob (phone)"));
    assert_eq!(
        alice.text()?,
        format!("message {news} delivered to bob (phone)")
    );
    assert_eq!(alice.text()?, format!("message {news} read by bob (phone)"));
    bob.interrupt()?;
    assert_eq!(alice.text()?, "bob is offline");
    alice.interrupt()?;

    // Errors: one line on stderr, non-zero exit.
    for (profile, args, message) in [
        (&a, &["send", "nobody", "hi"][..], "no such user: nobody"),
        (
            &b,
            &["read", "1", "--from", "nobody"][..],
            "no such user: nobody",
        ),
        (
            &a,
            &["login", "alice", "--password", "wrong password"][..],
            "wrong user name or password",
        ),
    ] {
        fails_in_one_line(iim(&host, profile, args)?, args, message)?;
    }

    // Logout revokes the token and forgets the login.
    ok(iim(&host, &b, &["logout"])?)?;
    let after = iim(&host, &b, &["send", "alice", "x"])?;
    assert!(String::from_utf8(after.stderr)?.contains("not logged in"));
    Ok(())
}

#[test]
fn listen_reconnects_by_itself_when_the_host_restarts() -> anyhow::Result<()> {
    let mut host = HostProcess::start_chat_only()?;
    let (_dir, a, bob) = alice_and_listening_bob(&host)?;
    let before = send(&host, &a, "bob", "before")?;
    assert_eq!(bob.json()?["id"], before);

    // The host stops (telling its sessions so) and comes back on the same address.
    host.terminate()?;
    let status = tokio::runtime::Runtime::new()?.block_on(host.wait())?;
    ensure!(status.success(), "the host ended with {status}");
    host.restart()?;

    // The listener reconnects by itself: a new session, then what is sent now ("before",
    // acknowledged already, is not shown again).
    assert_eq!(bob.json()?["kind"], "synced");
    let after = send(&host, &a, "bob", "after")?;
    let got = bob.json()?;
    assert_eq!(got["id"], after, "{got}");
    assert_eq!(got["body"], "after");
    let stderr = Arc::clone(&bob.stderr);
    bob.interrupt()?;
    // Its stderr is read to the end by a thread, which the exit just ended.
    let deadline = std::time::Instant::now() + STEP;
    let said = loop {
        let said = stderr.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if said.contains("iim: reconnected") || std::time::Instant::now() > deadline {
            break said;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        said.contains("shutting_down") && said.contains("reconnecting in"),
        "{said}"
    );
    assert!(said.contains("iim: reconnected"), "{said}");
    Ok(())
}

#[test]
fn send_takes_a_custom_kind_and_a_body_from_a_file_or_stdin() -> anyhow::Result<()> {
    // The test plugin `misbehave` handles the custom kind `misbehave`, and passes on unchanged
    // a message whose body is none of its requests.
    let (chat, misbehave) = (default_plugin("chat")?, test_plugin("misbehave")?);
    let host = HostProcess::start_with(
        "",
        Plugins::Only(&[("chat", &chat), ("misbehave", &misbehave)]),
    )?;
    let (dir, a, bob) = alice_and_listening_bob(&host)?;

    // Checks that bob's listener printed the message alice's `send` did, with `kind` and
    // `body`; returns its id.
    let received = |sent: Output, kind: &str, body: &str| -> anyhow::Result<u64> {
        let id: u64 = ok(sent)?.trim().parse()?;
        let got = bob.json()?;
        let want = serde_json::json!({ "id": id, "from": "alice", "kind": kind, "body": body });
        let seen = serde_json::json!({
            "id": got["id"], "from": got["from"], "kind": got["kind"], "body": got["body"]
        });
        ensure!(seen == want, "expected {want}, got {got}");
        Ok(id)
    };
    let file = dir.path().join("body.txt");
    // Several lines, and the file's last newline: the body is the file's bytes, all of them.
    std::fs::write(&file, "from a file\nsecond line\n")?;
    let file_arg = file.to_str().context("a UTF-8 path")?;
    let custom = ["send", "bob", "--kind", "misbehave"];
    let from_file = received(
        iim(
            &host,
            &a,
            &[&custom[..], &["--body-file", file_arg]].concat(),
        )?,
        "misbehave",
        "from a file\nsecond line\n",
    )?;
    let from_stdin = received(
        iim_with_stdin(&host, &a, &[&custom[..], &["-"]].concat(), b"from stdin")?,
        "misbehave",
        "from stdin",
    )?;
    assert!(from_stdin > from_file);
    // `--body-file -` is stdin too, and chat is still the default kind.
    received(
        iim_with_stdin(&host, &a, &["send", "bob", "--body-file", "-"], b"chat")?,
        "chat",
        "chat",
    )?;

    // Errors: one line on stderr, non-zero exit, and nothing sent (bob's next line is the
    // message after them).
    let missing = dir.path().join("missing.txt");
    let missing_arg = missing.to_str().context("a UTF-8 path")?;
    // One byte over the host's default limit.
    let large = dir.path().join("large.bin");
    std::fs::write(&large, vec![b'x'; 32 * 1024 + 1])?;
    let large_arg = large.to_str().context("a UTF-8 path")?;
    let cannot_read = format!("cannot read {missing_arg}: ");
    for (args, message) in [
        (
            &["send", "bob", "--body-file", missing_arg][..],
            cannot_read.as_str(),
        ),
        // With --body-file every argument is a recipient: a TEXT too is not one.
        (
            &["send", "bob", "some text", "--body-file", file_arg][..],
            "\"some text\" is not a user or a group",
        ),
        (
            &["send", "bob", "#team", "hi"][..],
            "a message goes to users or to one group, not both: #team and bob",
        ),
        (&["send", "bob"][..], "no body"),
        (
            &["send", "bob", "--body-file", large_arg][..],
            "over the host's limit of 32768 bytes",
        ),
        (
            &["send", "bob", "--kind", "typing", "hi"][..],
            "no plugin on this host handles messages of kind typing",
        ),
        // This host has no groups plugin: the host refuses the request at once.
        (&["group", "members", "team"][..], "(unsupported_kind)"),
        (&["send", "#team", "hi"][..], "(unsupported_kind)"),
    ] {
        fails_in_one_line(iim(&host, &a, args)?, args, message)?;
    }
    received(
        iim(&host, &a, &["send", "bob", "after the errors"])?,
        "chat",
        "after the errors",
    )?;
    bob.interrupt()
}

#[test]
fn a_file_sent_with_the_cli_reaches_the_listener_and_downloads_whole() -> anyhow::Result<()> {
    let chat = default_plugin("chat")?;
    let host = HostProcess::start_with("", Plugins::Only(&[("chat", &chat)]))?;
    let (dir, a, bob) = alice_and_listening_bob(&host)?;
    let b = dir.path().join("bob");
    let path = dir.path().join("report.pdf");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &bytes)?;
    let path_arg = path.to_str().context("a UTF-8 path")?;

    let sent = ok(iim(&host, &a, &["--json", "send-file", "bob", path_arg])?)?;
    let sent: serde_json::Value = serde_json::from_str(sent.trim())?;
    let id = sent["file"].as_str().context("the file id")?.to_owned();
    ensure!(id.len() == 64, "a file id is 64 hex digits: {sent}");

    // Bob's listener shows the file message with what a client needs to fetch it.
    let got = bob.json()?;
    ensure!(got["kind"] == "file" && got["from"] == "alice", "{got}");
    ensure!(got["body"]["file"] == id.as_str(), "{got}");
    ensure!(got["body"]["name"] == "report.pdf", "{got}");
    ensure!(got["body"]["size"] == 3_000_000, "{got}");
    ensure!(got["body"]["media_type"] == "application/pdf", "{got}");

    // Bob downloads it whole; what is written is what alice sent.
    let out = dir.path().join("fetched.pdf");
    let out_arg = out.to_str().context("a UTF-8 path")?;
    ok(iim(&host, &b, &["download", &id, "--out", out_arg])?)?;
    ensure!(
        std::fs::read(&out)? == bytes,
        "the downloaded file is the sent one"
    );
    ensure!(
        !dir.path().join("fetched.pdf.part").exists(),
        "no .part is left"
    );

    // A file nobody sent bob: one line, not_found, and nothing written.
    let unknown = "ab".repeat(32);
    let nothing = dir.path().join("nothing.bin");
    let nothing_arg = nothing.to_str().context("a UTF-8 path")?;
    let args = ["download", unknown.as_str(), "--out", nothing_arg];
    fails_in_one_line(iim(&host, &b, &args)?, &args, "not_found")?;
    ensure!(
        !nothing.exists(),
        "nothing is written for a refused download"
    );
    Ok(())
}

/// A host with the chat and groups plugins only: every line a listener shows comes from
/// what the test does (no presence notices, no per-member receipts).
fn start_groups_host() -> anyhow::Result<HostProcess> {
    let chat = default_plugin("chat")?;
    let groups = default_plugin("groups")?;
    HostProcess::start_with("", Plugins::Only(&[("chat", &chat), ("groups", &groups)]))
}

#[test]
fn two_users_make_a_group_talk_in_it_and_share_a_file_through_the_cli() -> anyhow::Result<()> {
    let host = start_groups_host()?;
    let dir = tempfile::tempdir()?;
    let [a, b, c] = ["alice", "bob", "carol"].map(|user| dir.path().join(user));
    for (profile, user) in [(&a, "alice"), (&b, "bob"), (&c, "carol")] {
        register_and_login(&host, profile, user, "phone")?;
    }

    // Alice makes a group and adds Bob; each command prints the plugin's answer.
    let create = ["group", "create", "team", "--title", "The team"];
    assert_eq!(ok(iim(&host, &a, &create)?)?, "created #team\n");
    assert_eq!(
        ok(iim(&host, &a, &["group", "add", "#team", "bob"])?)?,
        "added bob to #team\n"
    );
    assert_eq!(
        ok(iim(&host, &a, &["group", "members", "team"])?)?,
        "alice  owner\nbob    member\n"
    );
    let members: serde_json::Value = serde_json::from_str(&ok(iim(
        &host,
        &a,
        &["--json", "group", "members", "team"],
    )?)?)?;
    assert_eq!(
        (&members["group"], &members["title"], &members["members"]),
        (
            &"team".into(),
            &"The team".into(),
            &serde_json::json!([
                { "user": "alice", "role": "owner" },
                { "user": "bob", "role": "member" }
            ])
        )
    );
    assert_eq!(
        ok(iim(&host, &a, &["group", "list"])?)?,
        "#team (owner, 2 members) The team\n"
    );

    // Bob listens, marking what he reads: the notice of his joining waited for him.
    let bob = Listen::start(&b, &["listen", "--read"])?;
    assert_eq!(bob.text()?, "#team: alice added bob");
    // A group command while he listens takes his device's deliveries for a moment; the
    // listener takes them back once it is done (the answer was the command's alone).
    assert_eq!(
        ok(iim(&host, &b, &["group", "list"])?)?,
        "#team (member, 2 members) The team\n"
    );

    // They talk in it: every member gets each message, its sender too.
    let hello = send(&host, &a, "#team", "hello team")?;
    assert_eq!(
        bob.text()?,
        format!("#team alice: hello team  (id {hello})")
    );
    let hi = send(&host, &b, "#team", "hi alice")?;
    assert_eq!(bob.text()?, format!("#team bob: hi alice  (id {hi})"));

    // A file to the group: Bob sees it and downloads it whole.
    let path = dir.path().join("notes.txt");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::write(&path, &bytes)?;
    let path_arg = path.to_str().context("a UTF-8 path")?;
    let file = ok(iim(&host, &a, &["send-file", "#team", path_arg])?)?
        .trim()
        .to_owned();
    ensure!(file.len() == 64, "a file id: {file}");
    assert_eq!(
        bob.text()?,
        format!("#team file from alice: notes.txt (300000 bytes, text/plain) id {file}")
    );
    let out = dir.path().join("fetched.txt");
    let out_arg = out.to_str().context("a UTF-8 path")?;
    ok(iim(&host, &b, &["download", &file, "--out", out_arg])?)?;
    ensure!(
        std::fs::read(&out)? == bytes,
        "the downloaded file is the sent one"
    );

    // Carol is not a member: her message is refused with the plugin's reason, and nobody
    // gets it; so are her requests.
    let carol = Listen::start(&c, &["listen"])?;
    let refused = send(&host, &c, "#team", "let me in")?;
    let line = carol.text()?;
    ensure!(
        line.starts_with(&format!("message {refused} refused: ")) && line.contains("not a member"),
        "{line}"
    );
    let args = ["group", "members", "team"];
    fails_in_one_line(iim(&host, &c, &args)?, &args, "not a member")?;
    carol.interrupt()?;
    let after = send(&host, &a, "#team", "after carol")?;
    assert_eq!(
        bob.text()?,
        format!("#team alice: after carol  (id {after})")
    );
    let stderr = Arc::clone(&bob.stderr);
    bob.interrupt()?;
    // Bob's listener said what happened when the command took its deliveries (its stderr is
    // read to the end by a thread, which the exit just ended).
    let deadline = std::time::Instant::now() + STEP;
    let said = loop {
        let said = stderr.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !said.is_empty() || std::time::Instant::now() > deadline {
            break said;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    ensure!(
        said.contains("`iim group` took this device's deliveries")
            && said.contains("listening again"),
        "{said}"
    );

    // Alice listens: what waited for her, the group's history and her commands' answers
    // among it, and the counts for her messages (Bob got and read "hello team").
    let alice = Listen::start(&a, &["listen"])?;
    alice.texts_until_all(&[
        r#"#team: alice created the group "The team""#.to_owned(),
        "#team: alice added bob".to_owned(),
        "#team members: alice (owner), bob (member)".to_owned(),
        format!("#team alice: hello team  (id {hello})"),
        format!("#team bob: hi alice  (id {hi})"),
        format!("#team alice: after carol  (id {after})"),
        format!("message {hello} in #team: delivered to 1 of 1, read by 1"),
    ])?;
    assert_eq!(
        ok(iim(
            &host,
            &a,
            &["group", "receipts", "team", &hello.to_string()]
        )?)?,
        format!(
            "message {hello} in #team: delivered to 1 of 1, read by 1\ndelivered: bob\nread: bob\n"
        )
    );

    // Bob leaves; Alice sees it.
    assert_eq!(
        ok(iim(&host, &b, &["group", "leave", "team"])?)?,
        "left #team\n"
    );
    alice.texts_until_all(&["#team: bob left".to_owned()])?;
    alice.interrupt()?;
    assert_eq!(
        ok(iim(&host, &a, &["group", "members", "team"])?)?,
        "alice  owner\n"
    );

    // Errors: one line on stderr, non-zero exit.
    for (args, message) in [
        (
            &["send", "#team", "bob", "hi"][..],
            "not both: #team and bob",
        ),
        (&["group", "delete", "nowhere"][..], "refused: "),
    ] {
        fails_in_one_line(iim(&host, &a, args)?, args, message)?;
    }
    // A name that cannot be a group's is the argument parser's to refuse.
    let bad = iim(&host, &a, &["group", "members", "Team"])?;
    let stderr = String::from_utf8(bad.stderr)?;
    ensure!(
        !bad.status.success() && stderr.contains("not a group name"),
        "{stderr}"
    );
    Ok(())
}

/// `iim account`: the devices listed, one revoked (its profile's token then opens nothing),
/// the password changed (the other device logged out, this one kept), the account deleted
/// (its profile forgotten, the name free again).
#[test]
fn a_user_manages_devices_password_and_deletes_the_account_through_the_cli() -> anyhow::Result<()> {
    let host = HostProcess::start_chat_only()?;
    let dir = tempfile::tempdir()?;
    let (phone, laptop, tablet) = (
        dir.path().join("phone"),
        dir.path().join("laptop"),
        dir.path().join("tablet"),
    );
    register_and_login(&host, &phone, "erin", "phone")?;
    for (profile, device) in [(&laptop, "laptop"), (&tablet, "tablet")] {
        ok(iim(
            &host,
            profile,
            &[
                "login",
                "erin",
                "--password",
                "correct horse",
                "--device",
                device,
            ],
        )?)?;
    }
    let listed = ok(iim(&host, &phone, &["account", "devices"])?)?;
    let names: Vec<&str> = listed
        .lines()
        .map(|line| line.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(names, ["laptop", "phone", "tablet"], "{listed}");
    ensure!(
        listed.contains("phone (this one)") && listed.contains("last active"),
        "{listed}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(iim(&host, &phone, &["--json", "account", "devices"])?)?)?;
    ensure!(json.as_array().is_some_and(|d| d.len() == 3), "{json}");

    assert_eq!(
        ok(iim(&host, &phone, &["account", "revoke", "laptop"])?)?,
        "revoked device laptop of erin\n"
    );
    let args = ["friend", "list"];
    fails_in_one_line(iim(&host, &laptop, &args)?, &args, "auth_failed")?;

    let args = [
        "account",
        "password",
        "--old",
        "wrong password",
        "--new",
        "a new one!",
    ];
    fails_in_one_line(iim(&host, &phone, &args)?, &args, "wrong password")?;
    ok(iim(
        &host,
        &phone,
        &[
            "account",
            "password",
            "--old",
            "correct horse",
            "--new",
            "a new one!",
        ],
    )?)?;
    let args = ["friend", "list"];
    fails_in_one_line(iim(&host, &tablet, &args)?, &args, "auth_failed")?;
    ok(iim(&host, &phone, &["friend", "list"])?)?;

    let args = ["account", "delete", "--password", "a new one!"];
    fails_in_one_line(iim(&host, &phone, &args)?, &args, "add --yes")?;
    assert_eq!(
        ok(iim(
            &host,
            &phone,
            &["account", "delete", "--password", "a new one!", "--yes"]
        )?)?,
        "deleted the account erin\n"
    );
    ensure!(!phone.join("profile.json").exists(), "the profile stays");
    ok(iim(
        &host,
        &phone,
        &["register", "erin", "--password", "another one"],
    )?)?;
    Ok(())
}
