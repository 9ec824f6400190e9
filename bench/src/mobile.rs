//! Mobile recovery: how long a listening device takes to hear again after its address changes,
//! and after its host is killed, against a client that behaves as `iim-client` did before it
//! watched the network and the host's answers (the baseline, measured in the same run).
//!
//! Each scenario runs a listening [`Device`] of `bob` against a chat-only host and a sender
//! `alice` on a connection of her own:
//! - **address change**: bob reaches the host through a relay on loopback; the relay gives bob
//!   a new address towards the host ([`LossyPath::rebind_all`]), as a change of network or a
//!   NAT that forgets its binding does. `now`: the device is told
//!   ([`Device::network_changed`], which the library calls itself when an interface address
//!   changes); `before`: nothing tells it. Measured: from the change to bob's device handing
//!   over the next message, sent right after the change.
//! - **kill and restart**: the host is killed with SIGKILL and started again at once. Measured:
//!   from the kill to the device's `Reconnected`, and to the next message handed over.
//! - **kill, host stays down**: measured: from the kill to the device's `Disconnected` (it
//!   noticed), then the host is started again.
//!
//! `before` is the old client: keep-alive 10 s, idle timeout 30 s, nothing watching the host's
//! answers (a dead host noticed at the idle timeout), no network watch. `desktop` and `mobile`
//! are [`NetworkProfile`]s. Every message sent is checked to be handed over once.

use anyhow::{Context, bail, ensure};
use iim_client::proto::{DeviceId, SessionMode, UserId};
use iim_client::{ClientConfig, Credentials, Device, NetworkProfile, Update};
use iim_e2e::HostProcess;
use iim_e2e::lossy::{Impairment, LossyPath};
use std::time::{Duration, Instant};

/// A relay that does nothing to what it carries, but can change the client's address.
const CLEAN: Impairment = Impairment {
    loss: 0.0,
    duplicate: 0.0,
    delay: 0.0,
    delay_ms: (0, 0),
};

/// How a measured client is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Client {
    /// As before issue 16: keep-alive 10 s, idle 30 s, no dead-host watch, no network watch.
    Before,
    /// [`NetworkProfile::Desktop`], network watched.
    Desktop,
    /// [`NetworkProfile::Mobile`], network watched.
    Mobile,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Before => "before",
            Client::Desktop => "desktop",
            Client::Mobile => "mobile",
        }
    }

    fn config(self, host: &HostProcess) -> anyhow::Result<ClientConfig> {
        let mut config = host.client_config()?;
        // A host that comes back is tried again quickly, the same for every client.
        config.reconnect_first = Duration::from_millis(200);
        config.reconnect_max = Duration::from_secs(2);
        match self {
            Client::Before => {
                config.keep_alive = Duration::from_secs(10);
                config.idle_timeout = Duration::from_secs(30);
                // Longer than the idle timeout: the idle timeout comes first, as it did.
                config.dead_host_after = Duration::from_secs(3600);
                config.watch_network = false;
            }
            Client::Desktop => config = config.with_profile(NetworkProfile::Desktop),
            Client::Mobile => config = config.with_profile(NetworkProfile::Mobile),
        }
        Ok(config)
    }
}

/// The times of one scenario for one client, in ms, one per round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Times {
    /// The client.
    pub client: Client,
    /// One per round.
    pub ms: Vec<f64>,
}

impl Times {
    fn mean(&self) -> f64 {
        self.ms.iter().sum::<f64>() / self.ms.len().max(1) as f64
    }

    fn max(&self) -> f64 {
        self.ms.iter().copied().fold(0.0, f64::max)
    }
}

/// Figures of the mobile run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    /// Rounds of the address change and of the kill and restart.
    pub rounds: u32,
    /// Address change to the next message handed over.
    pub address_change: Vec<Times>,
    /// Kill (and restart at once) to `Reconnected`.
    pub kill_restart_reconnected: Vec<Times>,
    /// Kill (and restart at once) to the next message handed over.
    pub kill_restart_message: Vec<Times>,
    /// Kill (host down) to `Disconnected`.
    pub kill_down_noticed: Vec<Times>,
}

/// Runs every scenario for every client.
pub async fn run(rounds: u32) -> anyhow::Result<Figures> {
    let mut host = crate::iim_run::start_host().await?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let mut figures = Figures {
        rounds,
        address_change: Vec::new(),
        kill_restart_reconnected: Vec::new(),
        kill_restart_message: Vec::new(),
        kill_down_noticed: Vec::new(),
    };
    let mut sent = 0u32;
    for client in [Client::Before, Client::Desktop] {
        eprintln!("address change: {}", client.name());
        let ms = address_change(&host, &alice, &bob, client, rounds, &mut sent).await?;
        figures.address_change.push(Times { client, ms });
    }
    for client in [Client::Before, Client::Desktop, Client::Mobile] {
        eprintln!("kill and restart: {}", client.name());
        let (reconnected, message) =
            kill_restart(&mut host, &alice, &bob, client, rounds, &mut sent).await?;
        figures.kill_restart_reconnected.push(Times {
            client,
            ms: reconnected,
        });
        figures.kill_restart_message.push(Times {
            client,
            ms: message,
        });
    }
    for client in [Client::Before, Client::Desktop, Client::Mobile] {
        eprintln!("kill, host down: {}", client.name());
        let ms = kill_down(&mut host, &bob, client).await?;
        figures.kill_down_noticed.push(Times {
            client,
            ms: vec![ms],
        });
    }
    Ok(figures)
}

/// Opens bob's listening device with `config`, and waits until its backlog is delivered.
async fn listener(config: &ClientConfig, bob: &UserId) -> anyhow::Result<Device> {
    let device = Device::open(
        config,
        bob,
        &DeviceId::new("phone")?,
        Credentials::Password(iim_e2e::PASSWORD.into()),
        SessionMode::Receive,
    )
    .await?;
    loop {
        match next(&device).await? {
            Update::Synced { .. } => return Ok(device),
            Update::Message { seq, .. } => device.ack(seq),
            _ => {}
        }
    }
}

/// The device's next update, within two minutes (a mobile client's keep-alive is 25 s).
async fn next(device: &Device) -> anyhow::Result<Update> {
    next_within(device, 120).await
}

/// Waits for the message with body `text` (acknowledging it); fails on any other message,
/// which would be one handed over twice or out of turn.
async fn message(device: &Device, text: &str) -> anyhow::Result<Instant> {
    loop {
        if let Update::Message { seq, message } = next(device).await? {
            device.ack(seq);
            let body = String::from_utf8_lossy(&message.body);
            ensure!(body == text, "expected {text:?}, got {body:?}");
            return Ok(Instant::now());
        }
    }
}

/// Sends `text` from alice to bob on a connection of her own (the host may just have
/// restarted: she logs in afresh each time).
async fn send(host: &HostProcess, alice: &UserId, bob: &UserId, text: &str) -> anyhow::Result<()> {
    let conn = host.connect().await?;
    conn.login(
        alice,
        iim_e2e::PASSWORD,
        &DeviceId::new("laptop")?,
        SessionMode::SendOnly,
    )
    .await?;
    conn.send_text(bob, text).await?;
    conn.close().await;
    Ok(())
}

async fn address_change(
    host: &HostProcess,
    alice: &UserId,
    bob: &UserId,
    client: Client,
    rounds: u32,
    sent: &mut u32,
) -> anyhow::Result<Vec<f64>> {
    let path = LossyPath::start(host.addr, CLEAN, 0).await?;
    let mut config = client.config(host)?;
    config.server = path.addr();
    let phone = listener(&config, bob).await?;
    // Alice stays connected: only the way to bob is measured.
    let laptop = Device::open(
        &host.client_config()?,
        alice,
        &DeviceId::new("laptop")?,
        Credentials::Password(iim_e2e::PASSWORD.into()),
        SessionMode::SendOnly,
    )
    .await?;
    let mut ms = Vec::new();
    for round in 0..rounds {
        // The phone is idle: its acknowledgement of the last message, sent from the new
        // address, would tell the host where it is now.
        path.quiet(Duration::from_millis(300)).await;
        path.rebind_all();
        let changed = Instant::now();
        if client != Client::Before {
            phone.network_changed();
        }
        *sent += 1;
        let text = format!("m{sent}");
        laptop.send_text(bob, &text).await?;
        let at = message(&phone, &text).await?;
        ms.push(at.duration_since(changed).as_secs_f64() * 1e3);
        eprintln!("  round {round}: {:.1} ms", ms[ms.len() - 1]);
    }
    phone.close().await;
    laptop.close().await;
    Ok(ms)
}

async fn kill_restart(
    host: &mut HostProcess,
    alice: &UserId,
    bob: &UserId,
    client: Client,
    rounds: u32,
    sent: &mut u32,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let phone = listener(&client.config(host)?, bob).await?;
    let (mut reconnected, mut handed) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // A moment after the last packet, as a kill would come at any time.
        tokio::time::sleep(Duration::from_millis(1500 * u64::from(round % 3))).await;
        let killed = Instant::now();
        tokio::task::block_in_place(|| host.restart())?;
        *sent += 1;
        let text = format!("m{sent}");
        send(host, alice, bob, &text).await?;
        let back = loop {
            match next(&phone).await? {
                Update::Reconnected => break Instant::now(),
                Update::Message { .. } => bail!("a message before the reconnect"),
                _ => {}
            }
        };
        let at = message(&phone, &text).await?;
        reconnected.push(back.duration_since(killed).as_secs_f64() * 1e3);
        handed.push(at.duration_since(killed).as_secs_f64() * 1e3);
        eprintln!(
            "  round {round}: reconnected after {:.1} ms, message after {:.1} ms",
            reconnected[reconnected.len() - 1],
            handed[handed.len() - 1]
        );
    }
    phone.close().await;
    Ok((reconnected, handed))
}

async fn kill_down(host: &mut HostProcess, bob: &UserId, client: Client) -> anyhow::Result<f64> {
    let phone = listener(&client.config(host)?, bob).await?;
    host.kill9()?;
    let killed = Instant::now();
    loop {
        if let Update::Disconnected { reason, .. } = next_within(&phone, 120).await? {
            let ms = killed.elapsed().as_secs_f64() * 1e3;
            eprintln!("  noticed after {ms:.1} ms: {reason}");
            tokio::task::block_in_place(|| host.restart())?;
            loop {
                if let Update::Reconnected = next(&phone).await? {
                    break;
                }
            }
            phone.close().await;
            return Ok(ms);
        }
    }
}

/// The device's next update, within `secs` seconds (the idle timeout may come first).
async fn next_within(device: &Device, secs: u64) -> anyhow::Result<Update> {
    tokio::time::timeout(Duration::from_secs(secs), device.next())
        .await
        .context("no update")?
        .context("the device ended")?
        .map_err(Into::into)
}

/// Prints the figures as a table, with each client's mean against `before`'s.
pub fn print(f: &Figures) {
    println!(
        "mobile recovery, {} rounds (ms: mean, max; ratio to before)",
        f.rounds
    );
    let table = |title: &str, rows: &[Times]| {
        println!("{title}");
        let before = rows
            .iter()
            .find(|t| t.client == Client::Before)
            .map(Times::mean);
        for t in rows {
            let ratio = before
                .filter(|b| *b > 0.0)
                .map(|b| format!("{:.3}", t.mean() / b))
                .unwrap_or_default();
            println!(
                "  {:<8} {:>10.1} {:>10.1}  {ratio}",
                t.client.name(),
                t.mean(),
                t.max()
            );
        }
    };
    table("address change -> next message", &f.address_change);
    table(
        "kill, restart at once -> reconnected",
        &f.kill_restart_reconnected,
    );
    table(
        "kill, restart at once -> next message",
        &f.kill_restart_message,
    );
    table("kill, host down -> noticed", &f.kill_down_noticed);
}
