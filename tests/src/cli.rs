//! Helpers for the tests of the `iim` command-line client: run it against a host, and read a
//! running `iim listen` line by line.

use crate::{HostProcess, STEP, binary};
use anyhow::{Context, bail, ensure};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};

/// `iim ARGS` for `host`, with profile `profile`.
pub fn iim_command(host: &HostProcess, profile: &Path, args: &[&str]) -> anyhow::Result<Command> {
    let mut command = host.iim(profile)?;
    command.args(args);
    Ok(command)
}

/// Runs `iim ARGS` for `host`, with profile `profile`, to its end.
pub fn iim(host: &HostProcess, profile: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Ok(iim_command(host, profile, args)?.output()?)
}

/// [`iim`] with `input` on its stdin.
pub fn iim_with_stdin(
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

/// What `iim` printed, if it succeeded; else its error.
pub fn ok(output: Output) -> anyhow::Result<String> {
    if !output.status.success() {
        bail!("iim failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Checks that `iim ARGS` failed as the CLI fails: a non-zero exit and one line on stderr,
/// `iim: ` and the error, which contains `message`.
pub fn fails_in_one_line(output: Output, args: &[&str], message: &str) -> anyhow::Result<()> {
    ensure!(!output.status.success(), "{args:?} fails");
    let stderr = String::from_utf8(output.stderr)?;
    ensure!(stderr.lines().count() == 1, "{args:?}: {stderr}");
    ensure!(stderr.starts_with("iim: "), "{args:?}: {stderr}");
    ensure!(stderr.contains(message), "{args:?}: {stderr}");
    Ok(())
}

/// Runs `iim send` and returns the message id it printed.
pub fn send(host: &HostProcess, profile: &Path, to: &str, text: &str) -> anyhow::Result<u64> {
    Ok(ok(iim(host, profile, &["send", to, text])?)?
        .trim()
        .parse()?)
}

/// `iim register USER` then `iim login USER --device DEVICE` with profile `profile`, checking
/// what each prints.
pub fn register_and_login(
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
pub fn alice_and_listening_bob(
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
pub struct Listen {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// What it printed on stderr, for the failure messages.
    pub stderr: Arc<Mutex<String>>,
}

impl Listen {
    /// Starts `iim --profile PROFILE ARGS` (the profile from `login` says where the host is).
    pub fn start(profile: &Path, args: &[&str]) -> anyhow::Result<Self> {
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
    pub fn line(&self) -> anyhow::Result<String> {
        self.lines.recv_timeout(STEP).with_context(|| {
            let stderr = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
            format!("no line from iim listen (stderr so far: {stderr:?})")
        })
    }

    /// The next line of `--json` output.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        let line = self.line()?;
        serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))
    }

    /// The next line of text output, without its time (checked to be `HH:MM:SS`).
    pub fn text(&self) -> anyhow::Result<String> {
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
    pub fn texts_in_any_order(&self, expected: &[String]) -> anyhow::Result<()> {
        let mut got = (0..expected.len())
            .map(|_| self.text())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut want = expected.to_vec();
        got.sort();
        want.sort();
        ensure!(got == want, "expected {want:?}, got {got:?}");
        Ok(())
    }

    /// The next lines of text output, until they hold every line of `expected`: for what
    /// arrives among lines whose number and order depend on timing (the groups plugin's
    /// counts, the answers that `iim group` left for the listener).
    pub fn texts_until_all(&self, expected: &[String]) -> anyhow::Result<Vec<String>> {
        let mut got = Vec::new();
        while !expected.iter().all(|line| got.contains(line)) {
            let line = self
                .text()
                .with_context(|| format!("expected {expected:#?}, got {got:#?}"))?;
            got.push(line);
        }
        Ok(got)
    }

    /// Presses Ctrl-C: the client says goodbye to the host and exits, having printed nothing
    /// more.
    pub fn interrupt(mut self) -> anyhow::Result<()> {
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
