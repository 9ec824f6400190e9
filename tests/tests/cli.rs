//! The `iim` command-line client against the real host with its default plugins (chat,
//! presence, receipts): the README's tour, as a test.

use anyhow::{Context, bail, ensure};
use iim_e2e::{HostProcess, STEP, binary};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};

fn iim(host: &HostProcess, profile: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(binary("iim")?)
        .arg("--server")
        .arg(host.addr.to_string())
        .arg("--ca")
        .arg(&host.cert)
        .arg("--profile")
        .arg(profile)
        .args(args)
        .output()?)
}

fn ok(output: Output) -> anyhow::Result<String> {
    if !output.status.success() {
        bail!("iim failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8(output.stdout)?)
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
        let bad = iim(&host, profile, args)?;
        assert!(!bad.status.success(), "{args:?} fails");
        let stderr = String::from_utf8(bad.stderr)?;
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
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
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    for (profile, user) in [(&a, "alice"), (&b, "bob")] {
        register_and_login(&host, profile, user, "phone")?;
    }
    let bob = Listen::start(&b, &["--json", "listen"])?;
    assert_eq!(bob.json()?["kind"], "synced");
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
