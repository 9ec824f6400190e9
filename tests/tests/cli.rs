//! The `iim` command-line client against the real host: the README's tour, as a test.

use anyhow::{Context, bail};
use iim_e2e::{HostProcess, STEP, binary};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

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

#[test]
fn two_users_chat_through_the_cli_including_offline() -> anyhow::Result<()> {
    let host = HostProcess::start()?;
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    for (profile, user) in [(&a, "alice"), (&b, "bob")] {
        ok(iim(
            &host,
            profile,
            &["register", user, "--password", "correct horse"],
        )?)?;
        ok(iim(
            &host,
            profile,
            &["login", user, "--password", "correct horse"],
        )?)?;
    }
    ok(iim(&host, &a, &["friend", "add", "bob"])?)?;
    assert_eq!(ok(iim(&host, &a, &["friend", "list"])?)?, "bob\n");
    assert_eq!(
        ok(iim(&host, &a, &["--json", "friend", "list"])?)?.trim(),
        "[\"bob\"]"
    );

    // Bob is offline: the messages wait for him.
    let first: u64 = ok(iim(&host, &a, &["send", "bob", "are you there?"])?)?
        .trim()
        .parse()?;
    let second: u64 = ok(iim(&host, &a, &["send", "bob", "call me"])?)?
        .trim()
        .parse()?;
    assert!(second > first);

    // Bob listens (with the profile from login: no --server or --ca needed any more).
    let mut listen = Command::new(binary("iim")?)
        .arg("--profile")
        .arg(&b)
        .args(["--json", "listen"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = listen.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || -> anyhow::Result<serde_json::Value> {
        let line = rx.recv_timeout(STEP).context("no line from iim listen")?;
        Ok(serde_json::from_str(&line)?)
    };
    let m1 = next()?;
    let m2 = next()?;
    assert_eq!(next()?["kind"], "synced");
    assert_eq!(
        (m1["id"].as_u64(), m1["body"].as_str()),
        (Some(first), Some("are you there?"))
    );
    assert_eq!(
        (m2["id"].as_u64(), m2["body"].as_str()),
        (Some(second), Some("call me"))
    );
    for field in ["kind", "id", "from", "to", "body", "sent_at"] {
        assert!(!m1[field].is_null(), "listen --json prints {field}");
    }
    assert_eq!(m1["from"], "alice");
    assert_eq!(m1["to"][0], "bob");
    assert_eq!(m1["kind"], "chat");

    // Live, both ways.
    let live: u64 = ok(iim(&host, &a, &["send", "bob", "live now"])?)?
        .trim()
        .parse()?;
    let m3 = next()?;
    assert_eq!(
        (m3["id"].as_u64(), m3["body"].as_str()),
        (Some(live), Some("live now"))
    );
    ok(iim(&host, &b, &["send", "alice", "on my way"])?)?;
    let _ = listen.kill();
    let _ = listen.wait();

    // Errors: one line on stderr, non-zero exit.
    let bad = iim(&host, &a, &["send", "nobody", "hi"])?;
    assert!(!bad.status.success());
    let stderr = String::from_utf8(bad.stderr)?;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no such user: nobody"), "{stderr}");
    let bad = iim(
        &host,
        &a,
        &["login", "alice", "--password", "wrong password"],
    )?;
    assert!(!bad.status.success());
    assert!(String::from_utf8(bad.stderr)?.contains("wrong user name or password"));

    // Logout revokes the token and forgets the login.
    ok(iim(&host, &b, &["logout"])?)?;
    let after = iim(&host, &b, &["send", "alice", "x"])?;
    assert!(String::from_utf8(after.stderr)?.contains("not logged in"));
    Ok(())
}
