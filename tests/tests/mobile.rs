//! Mobile clients: a change of network noticed at once, and a dead host noticed by a client
//! that only listens.
//!
//! On loopback, a relay between client and host stands for the phone's network: giving the
//! client a new address towards the host ([`LossyPath::rebind_all`]) is what a change of
//! network or a NAT that forgets its binding does. In network namespaces the test makes (root
//! only), the client's real interface address changes and the `iim` CLI notices it itself,
//! through netlink.

use anyhow::{Context, ensure};
use iim_client::proto::{DeviceId, SessionMode, UserId};
use iim_client::{ClientConfig, ClientError, Credentials, Device, Update};
use iim_e2e::lossy::{Impairment, LossyPath};
use iim_e2e::{HostProcess, PASSWORD, netns, within};
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

type Result<T = ()> = anyhow::Result<T>;

/// The goal: after a change of address, the next message arrives within this.
const WITHIN: Duration = Duration::from_secs(1);

/// How long a path must have been quiet before a client's address changes.
const QUIET: Duration = Duration::from_millis(300);

/// A path that does nothing to what it carries, but can change the client's address.
const CLEAN: Impairment = Impairment {
    loss: 0.0,
    duplicate: 0.0,
    delay: 0.0,
    delay_ms: (0, 0),
};

/// Opens `user`'s device `name` with `config`.
async fn open(
    config: &ClientConfig,
    user: &UserId,
    name: &str,
    mode: SessionMode,
) -> Result<Device> {
    let device = DeviceId::new(name)?;
    let credentials = Credentials::Password(PASSWORD.into());
    Ok(within(
        "open",
        Device::open(config, user, &device, credentials, mode),
    )
    .await??)
}

/// The next chat message `device` is handed (acknowledged), skipping other updates.
async fn next_text(device: &Device) -> Result<String> {
    loop {
        match within("a message", device.next())
            .await?
            .context("the device ended")??
        {
            Update::Message { seq, message } => {
                device.ack(seq);
                return Ok(String::from_utf8(message.body)?);
            }
            Update::Disconnected { reason, .. } => eprintln!("disconnected: {reason}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_whose_address_changes_gets_the_next_message_within_a_second() -> Result {
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let path = LossyPath::start(host.addr, CLEAN, 1).await?;
    let mut config = host.client_config()?;
    config.server = path.addr();
    let phone = open(&config, &bob, "phone", SessionMode::Receive).await?;
    let laptop = open(
        &host.client_config()?,
        &alice,
        "laptop",
        SessionMode::SendOnly,
    )
    .await?;
    laptop.send_text(&bob, "before").await?;
    ensure!(next_text(&phone).await? == "before");

    let mut took = Vec::new();
    for round in 0..3 {
        // The phone's address changes while it only listens (its acknowledgement of the last
        // message sent and answered: else that would tell the host the new address); the OS
        // tells the app.
        path.quiet(QUIET).await;
        path.rebind_all();
        phone.network_changed();
        let changed = Instant::now();
        laptop.send_text(&bob, &format!("after {round}")).await?;
        ensure!(next_text(&phone).await? == format!("after {round}"));
        took.push(changed.elapsed());
    }
    eprintln!("first message after each change: {took:?}");
    ensure!(
        took.iter().all(|t| *t < WITHIN),
        "a message took {took:?} to reach a listener that moved (goal: under {WITHIN:?})"
    );

    // Nothing was handed over twice, nor is anything left.
    phone.close().await;
    let (_again, backlog) = host.online(&bob, "phone").await?;
    ensure!(backlog.is_empty(), "{} delivered again", backlog.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_whose_address_changes_is_answered_and_heard_within_a_second() -> Result {
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let path = LossyPath::start(host.addr, CLEAN, 2).await?;
    let mut config = host.client_config()?;
    config.server = path.addr();
    let phone = open(&config, &alice, "phone", SessionMode::Receive).await?;
    let laptop = open(&host.client_config()?, &bob, "laptop", SessionMode::Receive).await?;
    phone.send_text(&bob, "before").await?;
    ensure!(next_text(&laptop).await? == "before");

    let mut took = Vec::new();
    for round in 0..3 {
        // The sender says something at once: that alone moves the host to its new address,
        // and the host's answer (Accepted) must find it there.
        path.quiet(QUIET).await;
        path.rebind_all();
        let changed = Instant::now();
        let accepted =
            within("accepted", phone.send_text(&bob, &format!("after {round}"))).await??;
        let answered = changed.elapsed();
        ensure!(next_text(&laptop).await? == format!("after {round}"));
        took.push((answered, changed.elapsed()));
        ensure!(accepted.id.0 > 0);
    }
    eprintln!("(accepted, received) after each change: {took:?}");
    ensure!(
        took.iter().all(|(a, r)| *a < WITHIN && *r < WITHIN),
        "the sender's messages took {took:?} after its address changed (goal: under {WITHIN:?})"
    );
    phone.close().await;
    laptop.close().await;
    let (_again, backlog) = host.online(&bob, "laptop").await?;
    ensure!(backlog.is_empty(), "{} delivered again", backlog.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_notices_a_killed_host_at_its_next_keep_alive_not_at_the_idle_timeout() -> Result
{
    let mut host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let mut config = host.client_config()?;
    config.keep_alive = Duration::from_secs(1);
    config.dead_host_after = Duration::from_secs(1);
    config.idle_timeout = Duration::from_secs(30);
    config.reconnect_first = Duration::from_millis(200);
    config.reconnect_max = Duration::from_secs(1);
    let phone = open(&config, &bob, "phone", SessionMode::Receive).await?;
    // Settled: the backlog (none) delivered.
    loop {
        if let Update::Synced { .. } = within("synced", phone.next()).await?.context("ended")?? {
            break;
        }
    }

    host.kill9()?;
    let killed = Instant::now();
    let reason = loop {
        match within("a disconnect", phone.next())
            .await?
            .context("the device ended")??
        {
            Update::Disconnected { reason, .. } => break reason,
            other => eprintln!("before the disconnect: {other:?}"),
        }
    };
    let noticed = killed.elapsed();
    eprintln!("noticed the dead host after {noticed:?}: {reason}");
    ensure!(
        matches!(reason, ClientError::Timeout(_)),
        "the device should have given up on the silent host, not {reason:?}"
    );
    // Keep-alive 1 s + 1 s unanswered: about 2 s; the idle timeout would have been 30 s.
    ensure!(
        noticed < Duration::from_secs(10),
        "the dead host was noticed only after {noticed:?}"
    );

    // Back, the host is found again and what was sent meanwhile arrives.
    tokio::task::block_in_place(|| host.restart())?;
    let laptop = open(
        &host.client_config()?,
        &alice,
        "laptop",
        SessionMode::SendOnly,
    )
    .await?;
    laptop.send_text(&bob, "back").await?;
    ensure!(next_text(&phone).await? == "back");
    Ok(())
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iim_listen_notices_its_interface_address_change_through_netlink() -> Result {
    if !netns::available()? {
        return Ok(());
    }
    let link = netns::Link::new()?;
    let listen = std::net::SocketAddr::new(link.host_ip().into(), 7447);
    let host = HostProcess::start_in_namespace(&link.host, listen)?;
    let profiles = tempfile::tempdir()?;
    // `iim` in namespace `ns` with profile `who`.
    let cli = |ns: &str, who: &str| -> Result<std::process::Command> {
        let mut command = host.iim_in(Some(ns), &profiles.path().join(who))?;
        command.env("IIM_PASSWORD", PASSWORD);
        Ok(command)
    };
    let run = |mut command: std::process::Command| -> Result {
        let out = command.output()?;
        ensure!(
            out.status.success(),
            "iim failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    for who in ["alice", "bob"] {
        let mut register = cli(&link.client, who)?;
        register.args(["register", who]);
        run(register)?;
    }
    let mut login = cli(&link.client, "bob")?;
    login.args(["login", "bob"]);
    run(login)?;
    let mut login = cli(&link.host, "alice")?;
    login.args(["login", "alice"]);
    run(login)?;

    // Bob listens from the client side, and prints each message as a line of JSON.
    let mut listen = cli(&link.client, "bob")?;
    listen
        .args(["--json", "listen"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut listener = Killed(listen.spawn()?);
    let stdout = listener.0.stdout.take().context("stdout")?;
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines_tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    // The text of the next chat message bob's listener prints, and when it printed it.
    let mut next_chat = async || -> Result<(Instant, String)> {
        loop {
            let (at, line) = within("a line from iim listen", lines.recv())
                .await?
                .context("iim listen ended")?;
            let json: serde_json::Value = serde_json::from_str(&line)?;
            if json["kind"] == "chat" {
                return Ok((at, json["body"].as_str().unwrap_or_default().to_owned()));
            }
        }
    };
    // Alice stays connected (`iim chat` reading lines from a pipe), so that what is measured
    // is the way to bob, not a sender's start.
    let mut chat = cli(&link.host, "alice")?;
    chat.args(["chat", "bob", "--no-read"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut sender = Killed(chat.spawn()?);
    let mut say = sender.0.stdin.take().context("stdin")?;
    let mut send = |text: &str| -> Result {
        use std::io::Write;
        say.write_all(format!("{text}\n").as_bytes())?;
        Ok(say.flush()?)
    };
    send("before")?;
    ensure!(next_chat().await?.1 == "before");

    let mut took = Vec::new();
    for round in 0..2 {
        // The phone is idle when it moves: its acknowledgement of the last message, sent from
        // the new address, would tell the host where it is without any help.
        tokio::time::sleep(QUIET).await;
        let moved_to = tokio::task::block_in_place(|| link.move_client())?;
        let changed = Instant::now();
        let text = format!("after move {round} to {moved_to}");
        send(&text)?;
        let (at, got) = next_chat().await?;
        ensure!(got == text, "got {got:?}, not {text:?}");
        took.push(at.duration_since(changed));
    }
    eprintln!("first message after each change of address: {took:?}");
    ensure!(
        took.iter().all(|t| *t < WITHIN),
        "a message took {took:?} to reach a listener whose address changed (goal: under \
         {WITHIN:?})"
    );
    drop(say);
    let _ = tokio::task::block_in_place(|| sender.0.wait());
    drop(listener);
    drop(host);
    Ok(())
}
