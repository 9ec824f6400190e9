//! The `iim` command-line client against the real host with its default plugins (chat,
//! presence, receipts): the README's tour, as a test.

use anyhow::{Context, bail, ensure};
use iim_e2e::{HostProcess, Plugins, STEP, binary, default_plugin, test_plugin};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};

/// `iim ARGS` for `host`, with profile `profile`.
fn iim_command(host: &HostProcess, profile: &Path, args: &[&str]) -> anyhow::Result<Command> {
    let mut command = Command::new(binary("iim")?);
    command
        .arg("--server")
        .arg(host.addr.to_string())
        .arg("--ca")
        .arg(&host.cert)
        .arg("--profile")
        .arg(profile)
        .args(args);
    Ok(command)
}

fn iim(host: &HostProcess, profile: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Ok(iim_command(host, profile, args)?.output()?)
}

/// [`iim`] with `input` on its stdin.
fn iim_with_stdin(
    host: &HostProcess,
    profile: &Path,
    args: &[&str],
    input: &[u8],
) -> anyhow::Result<Output> {
    let mut child = iim_command(host, profile, args)?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Written whole, then closed (dropped): the end of stdin is the end of the body.
    child.stdin.take().context("stdin")?.write_all(input)?;
    Ok(child.wait_with_output()?)
}

fn ok(output: Output) -> anyhow::Result<String> {
    if !output.status.success() {
        bail!("iim failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Checks that `iim ARGS` failed as the CLI fails: a non-zero exit and one line on stderr,
/// `iim: ` and the error, which contains `message`.
fn fails_in_one_line(output: Output, args: &[&str], message: &str) -> anyhow::Result<()> {
    ensure!(!output.status.success(), "{args:?} fails");
    let stderr = String::from_utf8(output.stderr)?;
    ensure!(stderr.lines().count() == 1, "{args:?}: {stderr}");
    ensure!(stderr.starts_with("iim: "), "{args:?}: {stderr}");
    ensure!(stderr.contains(message), "{args:?}: {stderr}");
    Ok(())
}

/// Runs `iim send` and returns the message id it printed.
fn send(host: &HostProcess, profile: &Path, to: &str, text: &str) -> anyhow::Result<u64> {
    Ok(ok(iim(host, profile, &["send", to, text])?)?
        .trim()
        .parse()?)
}

/// `iim register USER` then `iim login USER --device DEVICE` with profile `profile`, checking
/// what each prints.
fn register_and_login(
    host: &HostProcess,
    profile: &Path,
    user: &str,
    device: &str,
) -> anyhow::Result<()> {
    let password = "correct horse";
    assert_eq!(
        ok(iim(
            host,
            profile,
            &["register", user, "--password", password]
        )?)?,
        format!("registered {user}\n")
    );
    assert_eq!(
        ok(iim(
            host,
            profile,
            &["login", user, "--password", password, "--device", device],
        )?)?,
        format!("logged in as {user} on device {device}\n")
    );
    Ok(())
}

/// Alice and Bob registered and logged in on device `phone` of `host`, with profiles in a new
/// temporary directory, and Bob listening as JSON, past his `synced`: the directory, Alice's
/// profile and Bob's listener.
fn alice_and_listening_bob(
    host: &HostProcess,
) -> anyhow::Result<(tempfile::TempDir, PathBuf, Listen)> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    for (profile, user) in [(&a, "alice"), (&b, "bob")] {
        register_and_login(host, profile, user, "phone")?;
    }
    let bob = Listen::start(&b, &["--json", "listen"])?;
    assert_eq!(bob.json()?["kind"], "synced");
    Ok((dir, a, bob))
}

/// A running `iim listen`, its output read line by line.
struct Listen {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// What it printed on stderr, for the failure messages.
    stderr: Arc<Mutex<String>>,
}

impl Listen {
    /// Starts `iim --profile PROFILE ARGS` (the profile from `login` says where the host is).
    fn start(profile: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(binary("iim")?)
            .arg("--profile")
            .arg(profile)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut stderr_pipe = child.stderr.take().context("stderr")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let log = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text);
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_str(&text);
        });
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            stderr,
        })
    }

    /// The next line.
    fn line(&self) -> anyhow::Result<String> {
        self.lines.recv_timeout(STEP).with_context(|| {
            let stderr = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
            format!("no line from iim listen (stderr so far: {stderr:?})")
        })
    }

    /// The next line of `--json` output.
    fn json(&self) -> anyhow::Result<serde_json::Value> {
        let line = self.line()?;
        serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))
    }

    /// The next line of text output, without its time (checked to be `HH:MM:SS`).
    fn text(&self) -> anyhow::Result<String> {
        let line = self.line()?;
        let (time, rest) = line.split_once(' ').unwrap_or_default();
        let is_time = time.len() == 8
            && time.bytes().enumerate().all(|(i, c)| match i % 3 {
                2 => c == b':',
                _ => c.is_ascii_digit(),
            });
        ensure!(is_time, "a listen line starts with HH:MM:SS: {line:?}");
        Ok(rest.to_owned())
    }

    /// The next lines of text output: exactly `expected`, in any order. For what the host's
    /// plugins send independently of one another (presence and receipts).
    fn texts_in_any_order(&self, expected: &[String]) -> anyhow::Result<()> {
        let mut got = (0..expected.len())
            .map(|_| self.text())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut want = expected.to_vec();
        got.sort();
        want.sort();
        ensure!(got == want, "expected {want:?}, got {got:?}");
        Ok(())
    }

    /// Presses Ctrl-C: the client says goodbye to the host and exits, having printed nothing
    /// more.
    fn interrupt(mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -INT failed");
        match self.lines.recv_timeout(STEP) {
            Err(RecvTimeoutError::Disconnected) => {}
            Ok(line) => bail!("unexpected line from iim listen: {line}"),
            Err(RecvTimeoutError::Timeout) => bail!("iim listen did not stop on Ctrl-C"),
        }
        let status = self.child.wait()?;
        ensure!(status.success(), "iim listen ended with {status}");
        Ok(())
    }
}

impl Drop for Listen {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
        format!("#{first} delivered to bob (phone)"),
        format!("#{second} delivered to bob (phone)"),
    ])?;

    // Live, both ways, each with its delivered receipt.
    let live = send(&host, &a, "bob", "live now")?;
    let m3 = bob.json()?;
    assert_eq!(
        (m3["id"].as_u64(), m3["body"].as_str()),
        (Some(live), Some("live now"))
    );
    assert_eq!(alice.text()?, format!("#{live} delivered to bob (phone)"));
    let reply = send(&host, &b, "alice", "on my way")?;
    assert_eq!(alice.text()?, format!("bob: on my way  (#{reply})"));
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
        format!("reported #{first} from alice as read\n")
    );
    assert_eq!(alice.text()?, format!("#{first} read by bob (phone)"));
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
    assert_eq!(bob.text()?, format!("alice: read me  (#{news})"));
    assert_eq!(bob.text()?, format!("#{news} read by bob (phone)"));
    assert_eq!(alice.text()?, format!("#{news} delivered to bob (phone)"));
    assert_eq!(alice.text()?, format!("#{news} read by bob (phone)"));
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
        (
            &["send", "bob", "text", "--body-file", file_arg][..],
            "two bodies",
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
