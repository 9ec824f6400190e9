//! `iim chat` in a real terminal: each chat runs in tmux against the real host; the tests type
//! with `send-keys` and read what a person would see with `capture-pane`.
//!
//! Without tmux on the machine the terminal tests say so and pass, unless `IIM_TMUX_REQUIRED`
//! is set (as `.ci/run` sets it), which makes that a failure.

use anyhow::{Context, bail, ensure};
use iim_client::Update;
use iim_client::proto::{MessageId, MessageKind, SessionMode};
use iim_e2e::lossy::{Impairment, LossyPath};
use iim_e2e::{HostProcess, PASSWORD, STEP, binary};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a chat may take to get its connection back after the host restarted: its waits
/// grow (0.5 s, 1 s, 2 s, ...) and an attempt that started while the host was down goes on
/// until the host answers or the attempt times out (10 s).
const RECONNECT: Duration = Duration::from_secs(60);

/// A tmux server of the test's own (its socket in the test's directory, so that it goes with
/// it), killed when dropped, also when the test fails. Each chat runs in a session of its own,
/// 200 columns by 50 rows, with no status bar, and stays on screen once it has ended so that
/// its last words and exit status can be read.
struct Tmux {
    socket: PathBuf,
    config: PathBuf,
}

impl Tmux {
    /// A server with its socket and settings in `dir` (started by the first session); `None`
    /// (the test is skipped) if tmux is missing and `IIM_TMUX_REQUIRED` is not set.
    fn start(dir: &Path) -> anyhow::Result<Option<Self>> {
        let found = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|out| out.status.success());
        if !found {
            ensure!(
                std::env::var_os("IIM_TMUX_REQUIRED").is_none(),
                "the chat tests need tmux on this machine (IIM_TMUX_REQUIRED is set)"
            );
            eprintln!(
                "skipped: the chat tests need tmux (IIM_TMUX_REQUIRED=1 makes this a failure)"
            );
            return Ok(None);
        }
        let socket = dir.join("tmux.socket");
        let config = dir.join("tmux.conf");
        std::fs::write(
            &config,
            "set -g remain-on-exit on\nset -g status off\nset -g history-limit 10000\n",
        )?;
        Ok(Some(Self { socket, config }))
    }

    /// `tmux ARGS` on this server; fails unless tmux succeeds.
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut tmux = Command::new("tmux");
        tmux.arg("-S")
            .arg(&self.socket)
            .arg("-f")
            .arg(&self.config)
            .args(args);
        let output = output_within(tmux, b"").with_context(|| format!("tmux {args:?}"))?;
        ensure!(
            output.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `program ARGS` in a new session named `name`.
    fn open(&self, name: &str, command: &[String]) -> anyhow::Result<Pane<'_>> {
        let mut args = vec!["new-session", "-d", "-s", name, "-x", "200", "-y", "50"];
        // Several arguments: tmux runs the program itself, without a shell in between (which
        // would take the Ctrl-C meant for the chat).
        args.extend(command.iter().map(String::as_str));
        self.run(&args)?;
        Ok(Pane {
            tmux: self,
            name: name.to_owned(),
        })
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Ends every chat still running (a hang-up, which each takes as the end) and the server.
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// One chat's terminal.
struct Pane<'t> {
    tmux: &'t Tmux,
    name: String,
}

impl Pane<'_> {
    /// Types `text`, then Enter.
    fn type_line(&self, text: &str) -> anyhow::Result<()> {
        self.tmux
            .run(&["send-keys", "-t", &self.name, "-l", text])?;
        self.keys(&["Enter"])
    }

    /// Presses keys, by tmux's names: `Enter`, `C-c`, `Left`...
    fn keys(&self, keys: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["send-keys", "-t", &self.name];
        args.extend(keys);
        self.tmux.run(&args).map(drop)
    }

    /// Everything on screen and above it, rows wrapped by the terminal joined again.
    fn screen(&self) -> anyhow::Result<String> {
        self.tmux
            .run(&["capture-pane", "-p", "-J", "-S", "-", "-t", &self.name])
    }

    /// Waits until the screen holds `text`; returns it.
    fn wait_for(&self, text: &str) -> anyhow::Result<String> {
        self.wait_until(&format!("{text:?}"), STEP, |screen| screen.contains(text))
    }

    /// Waits until the screen holds one of `texts`; returns it.
    fn wait_for_one_of(&self, texts: &[String]) -> anyhow::Result<String> {
        self.wait_until(&format!("one of {texts:?}"), STEP, |screen| {
            texts.iter().any(|text| screen.contains(text.as_str()))
        })
    }

    /// Waits, until `deadline` from now at most, for the screen to be as `done` says (`what`,
    /// for the failure); returns it.
    fn wait_until(
        &self,
        what: &str,
        deadline: Duration,
        done: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let until = Instant::now() + deadline;
        loop {
            let screen = self.screen()?;
            if done(&screen) {
                return Ok(screen);
            }
            if Instant::now() > until {
                bail!(
                    "{}'s terminal did not show {what} within {deadline:?}; it shows:\n{screen}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the chat to end; its exit status.
    fn exit_status(&self) -> anyhow::Result<i32> {
        let until = Instant::now() + STEP;
        loop {
            let state = self.tmux.run(&[
                "display-message",
                "-p",
                "-t",
                &self.name,
                "#{pane_dead}:#{pane_dead_status}:#{pid}",
            ])?;
            let mut fields = state.trim().split(':');
            let (dead, status, server) = (fields.next(), fields.next(), fields.next());
            match (dead, status) {
                (Some("1"), Some(status)) if !status.is_empty() => {
                    return status.parse().context("the exit status");
                }
                // The terminal is closed but tmux has not collected the process's status: tmux
                // (with libutempter) runs a helper with SIGCHLD at its default, ignored, and the
                // SIGCHLD of a process that ends just then is lost. Another one makes tmux look
                // again.
                (Some("1"), _) => {
                    if let Some(server) = server {
                        let _ = Command::new("kill").args(["-s", "CHLD", server]).status();
                    }
                }
                _ => {}
            }
            if Instant::now() > until {
                bail!(
                    "{}'s chat did not end; its terminal shows:\n{}",
                    self.name,
                    self.screen()?
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `iim --server SERVER --ca CA --profile PROFILE ARGS`, for `host` unless `server` says
/// where to connect instead.
fn iim_args(
    host: &HostProcess,
    server: Option<std::net::SocketAddr>,
    profile: &Path,
    args: &[&str],
) -> anyhow::Result<Vec<String>> {
    let mut all = vec![
        binary("iim")?.display().to_string(),
        "--server".into(),
        server.unwrap_or(host.addr).to_string(),
        "--ca".into(),
        host.cert.display().to_string(),
        "--profile".into(),
        profile.display().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    Ok(all)
}

/// Runs `iim ARGS` for `host` with `profile`, and `input` on its stdin.
fn iim(host: &HostProcess, profile: &Path, args: &[&str], input: &[u8]) -> anyhow::Result<Output> {
    let command = iim_args(host, None, profile, args)?;
    let mut iim = Command::new(&command[0]);
    iim.args(&command[1..]);
    output_within(iim, input).with_context(|| format!("iim {args:?}"))
}

/// Runs `command` with `input` on its stdin (then closed); what it printed, unless it takes
/// longer than [`STEP`]: then it is killed.
fn output_within(mut command: Command, input: &[u8]) -> anyhow::Result<Output> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(input)?;
    let pid = child.id().to_string();
    // Its output is read while it runs, by a thread: a full pipe would hold it up.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(STEP) {
        Ok(output) => Ok(output?),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            bail!("no answer within {STEP:?}")
        }
    }
}

/// What a command that succeeded printed.
fn ok(output: Output) -> anyhow::Result<String> {
    ensure!(
        output.status.success(),
        "iim failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Registers `user` (with the tests' password, so that the library can log in too) and logs
/// them in on `device` with profile `profile`.
fn register_and_login(
    host: &HostProcess,
    profile: &Path,
    user: &str,
    device: &str,
) -> anyhow::Result<()> {
    ok(iim(
        host,
        profile,
        &["register", user, "--password", PASSWORD],
        b"",
    )?)?;
    let login = ["login", user, "--password", PASSWORD, "--device", device];
    ok(iim(host, profile, &login, b"")?)?;
    Ok(())
}

/// Checks that `screen` holds `lines` in this order.
fn in_order(screen: &str, lines: &[&str]) -> anyhow::Result<()> {
    let mut from = 0;
    for line in lines {
        let Some(at) = screen[from..].find(line) else {
            bail!("{line:?} is not after the lines before it in:\n{screen}");
        };
        from += at + line.len();
    }
    Ok(())
}

/// The message id in `screen` after the last `before` (`bob: hi  (id ` → 42).
fn id_after(screen: &str, before: &str) -> anyhow::Result<u64> {
    let (_, rest) = screen
        .rsplit_once(before)
        .with_context(|| format!("no {before:?} in:\n{screen}"))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .with_context(|| format!("no id after {before:?} in:\n{screen}"))
}

/// The case: Alice and Bob, friends, each chatting in a terminal. What waited for Bob
/// comes first, in order; each sees the other come online and go; a line typed reaches the
/// other side, and its sender sees it go from pending to read (each chat reports the
/// conversation's messages read); `/history` shows it all again; `/quit` and Ctrl-D end the
/// chats with status 0, and the line typed just before `/quit` is not lost.
#[test]
fn two_people_chat_in_terminals_with_receipts_presence_history_and_a_clean_exit()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let Some(tmux) = Tmux::start(dir.path())? else {
        return Ok(());
    };
    let host = HostProcess::start()?;
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    register_and_login(&host, &a, "alice", "laptop")?;
    register_and_login(&host, &b, "bob", "phone")?;
    ok(iim(&host, &a, &["friend", "add", "bob"], b"")?)?;
    ok(iim(&host, &b, &["friend", "add", "alice"], b"")?)?;
    // Bob is offline: these wait for him.
    let first: u64 = ok(iim(&host, &a, &["send", "bob", "are you there?"], b"")?)?
        .trim()
        .parse()?;
    let second: u64 = ok(iim(&host, &a, &["send", "bob", "call me"], b"")?)?
        .trim()
        .parse()?;

    let alice = tmux.open("alice", &iim_args(&host, None, &a, &["chat", "bob"])?)?;
    alice.wait_for("chatting as alice on device laptop with bob")?;
    alice.wait_for("contacts: bob offline")?;

    // Bob's chat starts with what waited for him, in order, then goes live.
    let bob = tmux.open("bob", &iim_args(&host, None, &b, &["chat", "alice"])?)?;
    let screen = bob.wait_for("live from here")?;
    in_order(
        &screen,
        &[
            "chatting as bob on device phone with alice",
            &format!("alice: are you there?  (id {first})"),
            &format!("alice: call me  (id {second})"),
            "(2 message(s) that waited for you above; live from here)",
        ],
    )?;
    bob.wait_for("contacts: alice online (1)")?;

    // Alice sees Bob come online, and her messages reach him and get read: his conversation is
    // with her.
    for line in [
        "bob is online (1 device)".to_owned(),
        format!("message {first} delivered to bob (phone)"),
        format!("message {first} read by bob (phone)"),
        format!("message {second} read by bob (phone)"),
    ] {
        alice.wait_for(&line)?;
    }

    // Bob types; Alice sees it arrive; Bob sees it delivered and read.
    bob.type_line("hello alice")?;
    let screen = alice.wait_for("bob: hello alice  (id ")?;
    let hello = id_after(&screen, "bob: hello alice  (id ")?;
    bob.wait_for_one_of(&[
        format!("bob → alice: hello alice  (id {hello}, read by alice)"),
        format!("message {hello} read by alice (laptop): \"hello alice\""),
    ])?;

    // Alice answers, then puts a word right before Enter: Left past " you", a key there.
    alice.type_line("hi bob")?;
    bob.wait_for("alice: hi bob  (id ")?;
    alice.keys(&["-l", "how ar you"])?;
    alice.keys(&["Left", "Left", "Left", "Left", "e", "Enter"])?;
    bob.wait_for("alice: how are you  (id ")?;

    // Everything that arrived since Bob's chat started, again, in order.
    bob.type_line("/history")?;
    let screen = bob.wait_for("── end of the history ──")?;
    let (_, history) = screen
        .rsplit_once("── what arrived since the chat started ──")
        .context("no history")?;
    in_order(
        history,
        &[
            "alice: are you there?",
            "alice: call me",
            "contacts: alice online (1)",
            &format!("bob → alice: hello alice  (id {hello}, read by alice)"),
            "alice: hi bob",
            "alice: how are you",
            "── end of the history ──",
        ],
    )?;

    // A line typed and /quit at once: the chat waits for the host to have it, and ends well.
    bob.type_line("last words")?;
    bob.type_line("/quit")?;
    ensure!(bob.exit_status()? == 0, "{}", bob.screen()?);
    alice.wait_for("bob: last words  (id ")?;
    // Bob's last session closed: Alice sees him go.
    alice.wait_for("bob is offline")?;

    // Ctrl-D on an empty line leaves too.
    alice.keys(&["C-d"])?;
    ensure!(alice.exit_status()? == 0, "{}", alice.screen()?);
    Ok(())
}

/// A group in terminals: Alice talks to `#team`, Bob to Alice. Bob sees the group's message
/// (with the group and its sender), Alice its counts; once Bob turns to `#team`, what it showed
/// is reported read and Alice's counts say so. An own message to the group is shown once,
/// though the group passes it back. A message to a user who does not exist is refused on a line
/// and the chat goes on; Ctrl-C ends a chat with status 0.
#[test]
fn a_group_chat_shows_its_counts_and_a_refusal_and_ctrl_c_leaves() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let Some(tmux) = Tmux::start(dir.path())? else {
        return Ok(());
    };
    let host = HostProcess::start()?;
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    register_and_login(&host, &a, "alice", "laptop")?;
    register_and_login(&host, &b, "bob", "phone")?;
    let created = ok(iim(&host, &a, &["group", "create", "team", "bob"], b"")?)?;
    ensure!(created.contains("created #team"), "{created}");

    let alice = tmux.open("alice", &iim_args(&host, None, &a, &["chat", "#team"])?)?;
    alice.wait_for("live from here")?;
    let bob = tmux.open("bob", &iim_args(&host, None, &b, &["chat", "alice"])?)?;
    bob.wait_for("#team: alice created the group with bob")?;
    bob.wait_for("live from here")?;

    alice.type_line("hello team")?;
    let screen = bob.wait_for("#team alice: hello team  (id ")?;
    let hello = id_after(&screen, "#team alice: hello team  (id ")?;
    alice.wait_for_one_of(&[
        format!("#team alice: hello team  (id {hello}, delivered to 1 of 1, read by 0)"),
        format!("message {hello} in #team: delivered to 1 of 1, read by 0"),
    ])?;

    // Bob's conversation was Alice: turning to the group reports what it showed read.
    bob.type_line("/to #team")?;
    bob.wait_for("talking to #team")?;
    alice.wait_for_one_of(&[
        format!("#team alice: hello team  (id {hello}, delivered to 1 of 1, read by 1)"),
        format!("message {hello} in #team: delivered to 1 of 1, read by 1"),
    ])?;

    // Bob writes to the group: shown once on his side, though it comes back to him.
    bob.type_line("glad to be here")?;
    let screen = alice.wait_for("#team bob: glad to be here  (id ")?;
    let glad = id_after(&screen, "#team bob: glad to be here  (id ")?;
    let screen = bob.wait_for_one_of(&[
        format!("#team bob: glad to be here  (id {glad}, delivered to 1 of 1"),
        format!("message {glad} in #team: delivered to 1 of 1"),
    ])?;
    ensure!(
        screen.matches("#team bob: glad to be here").count() == 1,
        "bob's own message shown twice:\n{screen}"
    );

    // A user who does not exist: the host's refusal, on a line; the chat goes on.
    bob.type_line("/to nobody")?;
    bob.wait_for("talking to nobody")?;
    bob.type_line("anyone?")?;
    bob.wait_for("not sent: no such user: nobody")?;
    bob.type_line("/to two words")?;
    bob.wait_for("/to takes one user or group")?;
    bob.type_line("/to alice")?;
    bob.type_line("still here")?;
    alice.wait_for("bob: still here  (id ")?;

    alice.keys(&["C-c"])?;
    ensure!(alice.exit_status()? == 0, "{}", alice.screen()?);
    bob.keys(&["C-c"])?;
    ensure!(bob.exit_status()? == 0, "{}", bob.screen()?);
    Ok(())
}

/// The host stops while Bob chats: his chat says the connection is lost and that it is
/// reconnecting; a line typed meanwhile is shown pending, and once the host is back the chat
/// says so, the line is accepted, and it reaches Alice.
#[test]
fn a_line_typed_while_the_host_is_down_is_pending_until_it_is_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let Some(tmux) = Tmux::start(dir.path())? else {
        return Ok(());
    };
    let mut host = HostProcess::start()?;
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    register_and_login(&host, &a, "alice", "laptop")?;
    register_and_login(&host, &b, "bob", "phone")?;
    let alice = tmux.open("alice", &iim_args(&host, None, &a, &["chat", "bob"])?)?;
    alice.wait_for("live from here")?;
    let bob = tmux.open("bob", &iim_args(&host, None, &b, &["chat", "alice"])?)?;
    bob.wait_for("live from here")?;

    // The host stops, telling its sessions so.
    host.terminate()?;
    let status = tokio::runtime::Runtime::new()?.block_on(host.wait())?;
    ensure!(status.success(), "the host ended with {status}");
    bob.wait_for("connection lost (the host closed the connection")?;
    bob.wait_for("reconnecting in 0.5 s…")?;
    bob.type_line("are you back?")?;
    bob.wait_for("bob → alice: are you back?  (pending)")?;

    host.restart()?;
    let screen = bob.wait_until("the line sent after the reconnect", RECONNECT, |screen| {
        screen.contains("reconnected")
            && (screen.contains("bob → alice: are you back?  (id ")
                || screen.contains("sent to alice: \"are you back?\""))
    })?;
    in_order(&screen, &["(pending)", "reconnected"])?;
    let screen = alice.wait_until("bob's line", RECONNECT, |screen| {
        screen.contains("bob: are you back?  (id ")
    })?;
    ensure!(
        screen.matches("bob: are you back?").count() == 1,
        "shown twice:\n{screen}"
    );

    bob.type_line("/quit")?;
    ensure!(bob.exit_status()? == 0, "{}", bob.screen()?);
    alice.type_line("/quit")?;
    ensure!(alice.exit_status()? == 0, "{}", alice.screen()?);
    Ok(())
}

/// Bob's chat goes through a path that loses one datagram in ten, sends one in twenty twice and
/// holds one in ten back (both ways): every line he types reaches Alice once, in the order he
/// typed it, and his terminal shows each accepted.
#[test]
fn every_line_typed_over_a_lossy_link_arrives_once_in_order() -> anyhow::Result<()> {
    const LINES: usize = 20;
    let dir = tempfile::tempdir()?;
    let Some(tmux) = Tmux::start(dir.path())? else {
        return Ok(());
    };
    let host = HostProcess::start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let alice = runtime.block_on(host.register("alice"))?;
    let b = dir.path().join("bob");
    register_and_login(&host, &b, "bob", "phone")?;
    let impairment = Impairment {
        loss: 0.10,
        duplicate: 0.05,
        delay: 0.10,
        delay_ms: (5, 50),
    };
    // The relay runs on the runtime's threads while the test types.
    let path = runtime.block_on(LossyPath::start(host.addr, impairment, 0xc4a7))?;
    let tablet = runtime.block_on(host.device(&alice, "tablet", SessionMode::Receive))?;
    let received = runtime.spawn(async move {
        let mut got: Vec<(String, MessageId)> = Vec::new();
        let from_bob = |update: Update| match update {
            Update::Message { seq, message } => {
                tablet.ack(seq);
                (message.kind == MessageKind::Chat && message.from.as_str() == "bob").then(|| {
                    (
                        String::from_utf8_lossy(&message.body).into_owned(),
                        message.id,
                    )
                })
            }
            _ => None,
        };
        let all = async {
            while got.len() < LINES {
                let update = tablet.next().await.context("alice's tablet ended")??;
                got.extend(from_bob(update));
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(RECONNECT * 2, all)
            .await
            .context("not every line arrived")??;
        // Anything repeated would come now.
        let more = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match tablet.next().await {
                    Some(Ok(update)) => {
                        if let Some(repeat) = from_bob(update) {
                            return Some(repeat);
                        }
                    }
                    _ => return None,
                }
            }
        })
        .await;
        if let Ok(Some(repeat)) = more {
            bail!("after every line, {repeat:?} came again");
        }
        anyhow::Ok(got)
    });

    let bob = tmux.open(
        "bob",
        &iim_args(&host, Some(path.addr()), &b, &["chat", "alice"])?,
    )?;
    bob.wait_until("the chat live", RECONNECT, |screen| {
        screen.contains("live from here")
    })?;
    for i in 0..LINES {
        bob.type_line(&format!("m{i}"))?;
    }
    let got = runtime.block_on(received)??;
    let texts: Vec<&str> = got.iter().map(|(text, _)| text.as_str()).collect();
    let typed: Vec<String> = (0..LINES).map(|i| format!("m{i}")).collect();
    ensure!(texts == typed, "alice got {texts:?}");
    ensure!(
        got.windows(2).all(|pair| pair[0].1 < pair[1].1),
        "ids out of order: {got:?}"
    );
    bob.wait_until("every line accepted", RECONNECT, |screen| {
        (0..LINES).all(|i| {
            screen.contains(&format!("bob → alice: m{i}  (id "))
                || screen.contains(&format!("sent to alice: \"m{i}\""))
        })
    })?;
    bob.type_line("/quit")?;
    ensure!(bob.exit_status()? == 0, "{}", bob.screen()?);
    let (seen, dropped, duplicated, delayed) = path.counts().snapshot();
    eprintln!(
        "the path saw {seen} datagrams: {dropped} dropped, {duplicated} sent twice, {delayed} held back"
    );
    ensure!(dropped > 0, "the path lost nothing");
    Ok(())
}

/// Without a terminal the chat reads lines and prints lines: what a pipe gives is sent, the chat
/// ends at its end once the host has it. It needs a login, as every command does, and refuses
/// --json.
#[test]
fn chat_reads_a_pipe_needs_a_login_and_refuses_json() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let host = HostProcess::start_chat_only()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let alice = runtime.block_on(host.register("alice"))?;
    let tablet = runtime.block_on(host.device(&alice, "tablet", SessionMode::Receive))?;
    let b = dir.path().join("bob");
    register_and_login(&host, &b, "bob", "phone")?;

    let out = ok(iim(
        &host,
        &b,
        &["chat", "alice"],
        b"from a pipe\n/who\nno newline",
    )?)?;
    in_order(
        &out,
        &[
            "chatting as bob on device phone with alice",
            "bob → alice: from a pipe  (pending)",
            "no contact's presence known",
            "bob → alice: no newline  (pending)",
        ],
    )?;
    ensure!(out.contains("sent to alice: \"from a pipe\""), "{out}");
    ensure!(out.contains("sent to alice: \"no newline\""), "{out}");
    ensure!(
        !out.contains('\x1b'),
        "no terminal, no escape sequences: {out:?}"
    );
    let got = runtime.block_on(async {
        let mut got = Vec::new();
        while got.len() < 2 {
            let next = tokio::time::timeout(STEP, tablet.next()).await;
            if let Update::Message { seq, message } = next?.context("ended")?? {
                tablet.ack(seq);
                got.push(String::from_utf8_lossy(&message.body).into_owned());
            }
        }
        anyhow::Ok(got)
    })?;
    ensure!(got == ["from a pipe", "no newline"], "alice got {got:?}");

    let output = iim(&host, &dir.path().join("nobody"), &["chat", "alice"], b"")?;
    ensure!(!output.status.success());
    let stderr = String::from_utf8(output.stderr)?;
    ensure!(stderr.starts_with("iim: not logged in"), "{stderr}");

    let output = iim(&host, &b, &["--json", "chat", "alice"], b"")?;
    ensure!(!output.status.success());
    let stderr = String::from_utf8(output.stderr)?;
    ensure!(stderr.contains("prints no JSON"), "{stderr}");
    Ok(())
}
