//! The iim run: the real `iim-host` binary, real clients, chat messages from each sender to its
//! receiver, every delivery acknowledged.

use crate::stats::{self, Clock, FirstSend, Load, Summary, Tally};
use anyhow::{Context, anyhow, bail};
use iim_client::proto::{DeviceId, ErrorCode, MessageKind, SessionMode, UserId};
use iim_client::{Connection, Event};
use iim_e2e::HostProcess;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;

/// Longest wait for the next delivery, or for the answer to a submission, before giving up.
const STALL: Duration = Duration::from_secs(60);
/// How long a sender waits before submitting again a message the host refused as over its rate.
const RATE_BACKOFF: Duration = Duration::from_millis(10);

/// The host's configuration for a benchmark: the defaults, except the per-session submission
/// rate (1,000/s, bursts of 2,000), a limit against abuse that would otherwise throttle each
/// sender and so cap what is measured.
pub const HOST_CONFIG: &str = "[limits]\nsubmit_rate = 1000000\nsubmit_burst = 1000000\n";

/// Starts a chat-only host with [`HOST_CONFIG`].
pub async fn start_host() -> anyhow::Result<HostProcess> {
    start_host_with("").await
}

/// Starts a chat-only host with [`HOST_CONFIG`] and `extra` (TOML sections other than
/// `[limits]`).
pub async fn start_host_with(extra: &str) -> anyhow::Result<HostProcess> {
    let config = format!("{extra}\n{HOST_CONFIG}");
    tokio::task::spawn_blocking(move || HostProcess::start_chat_only_with_config(&config))
        .await
        .context("starting the host")?
}

/// Where a run's users live: the senders at one host, the receivers at `receivers`, pair
/// after pair in turn. `name` labels the run's progress lines and starts its users' names, so
/// that runs against the same hosts take fresh users.
#[derive(Clone, Copy)]
pub struct Placement<'a> {
    /// The run's label, and the start of its users' names.
    pub name: &'a str,
    /// Where every sender lives.
    pub senders: &'a HostProcess,
    /// Where the receivers live: pair `i` at `receivers[i % receivers.len()]`.
    pub receivers: &'a [&'a HostProcess],
}

impl Placement<'_> {
    fn receiver_host(&self, pair: usize) -> &HostProcess {
        self.receivers[pair % self.receivers.len()]
    }
}

/// A sender and its receiver.
pub type Pair = (UserId, UserId);

/// Runs the load against a fresh host process and returns its figures.
pub async fn run(load: Load, clock: Clock) -> anyhow::Result<Summary> {
    run_with(load, clock, "iim", "").await
}

/// [`run`] against a host with configuration `extra` too, labelled `name`.
pub async fn run_with(
    load: Load,
    clock: Clock,
    name: &str,
    extra: &str,
) -> anyhow::Result<Summary> {
    // Chat only: the load counts every message a receiver gets (no presence snapshots).
    let host = start_host_with(extra).await?;
    eprintln!("{name}: host listening on {}", host.addr);
    let place = Placement {
        name,
        senders: &host,
        receivers: &[&host],
    };
    let result = async {
        let pairs = register(place, load).await?;
        measure(place, &pairs, load, clock).await
    }
    .await;
    if result.is_err() {
        print_log_tail("host", &host);
    }
    result
}

/// Prints the last lines of `host`'s log, after a failure.
pub fn print_log_tail(name: &str, host: &HostProcess) {
    let log = host.log();
    let tail: Vec<&str> = log.lines().rev().take(10).collect();
    eprintln!("last lines of the log of {name}:");
    for line in tail.iter().rev() {
        eprintln!("  {line}");
    }
}

/// Logs `user` in on `conn` as device `device`, with [`iim_e2e::PASSWORD`] and within
/// [`iim_e2e::STEP`].
pub async fn login(
    conn: &Connection,
    user: &UserId,
    device: &str,
    mode: SessionMode,
) -> anyhow::Result<()> {
    let device = DeviceId::new(device)?;
    iim_e2e::within("login", conn.login(user, iim_e2e::PASSWORD, &device, mode)).await??;
    Ok(())
}

/// Registers the run's senders and receivers, each at its host.
pub async fn register(place: Placement<'_>, load: Load) -> anyhow::Result<Vec<Pair>> {
    let mut pairs = Vec::with_capacity(load.pairs as usize);
    for i in 0..load.pairs {
        let sender = place
            .senders
            .register(&format!("{}-s{i}", place.name))
            .await?;
        let receiver = place
            .receiver_host(i as usize)
            .register(&format!("{}-r{i}", place.name))
            .await?;
        pairs.push((sender, receiver));
    }
    eprintln!("{}: registered {} users", place.name, 2 * load.pairs);
    Ok(pairs)
}

/// Brings the `pairs` (from [`register`]) online, runs the load through them and returns its
/// figures.
pub async fn measure(
    place: Placement<'_>,
    pairs: &[Pair],
    load: Load,
    clock: Clock,
) -> anyhow::Result<Summary> {
    let mut receivers = Vec::with_capacity(pairs.len());
    for (i, (_, receiver)) in pairs.iter().enumerate() {
        let (conn, backlog) = place.receiver_host(i).online(receiver, "bench").await?;
        if !backlog.is_empty() {
            bail!("{receiver} has a backlog of {} messages", backlog.len());
        }
        receivers.push(Arc::new(conn));
    }
    let mut senders = Vec::with_capacity(pairs.len());
    for (sender, _) in pairs {
        let conn = place.senders.connect().await?;
        login(&conn, sender, "bench", SessionMode::SendOnly).await?;
        if (conn.max_body() as usize) < load.body {
            bail!(
                "--body {} is over the host's limit of {} bytes",
                load.body,
                conn.max_body()
            );
        }
        senders.push(Arc::new(conn));
    }
    eprintln!(
        "{}: {} receivers online, {} senders logged in; sending",
        place.name, load.pairs, load.pairs
    );

    let first_send = Arc::new(FirstSend::new());
    let rate_limited = Arc::new(AtomicU64::new(0));
    // Senders and receivers in one set, so that whichever fails first ends the run.
    let mut tasks: JoinSet<anyhow::Result<Option<Tally>>> = JoinSet::new();
    for (i, conn) in receivers.iter().enumerate() {
        let conn = Arc::clone(conn);
        let from = pairs[i].0.clone();
        let messages = load.messages;
        let who = pairs[i].1.clone();
        tasks.spawn(async move {
            receive(conn, from, messages, clock)
                .await
                .map(Some)
                .with_context(|| format!("receiver {who}"))
        });
    }
    for (i, conn) in senders.iter().enumerate() {
        let to = pairs[i].1.clone();
        let next = Arc::new(AtomicU32::new(0));
        for _ in 0..load.window {
            let worker = send_worker(
                Arc::clone(conn),
                to.clone(),
                Arc::clone(&next),
                load,
                clock,
                Arc::clone(&first_send),
                Arc::clone(&rate_limited),
            );
            let who = pairs[i].0.clone();
            tasks.spawn(async move {
                worker
                    .await
                    .map(|()| None)
                    .with_context(|| format!("sender {who}"))
            });
        }
    }
    let mut tallies = Vec::with_capacity(receivers.len());
    while let Some(done) = tasks.join_next().await {
        if let Some(tally) = done.context("a benchmark task failed")?? {
            tallies.push(tally);
        }
    }
    let summary = Summary::of(&tallies, first_send.get(), load.total())?;
    let refused = rate_limited.load(Ordering::Relaxed);
    if refused > 0 {
        eprintln!(
            "{}: warning: the host's per-session rate limit refused {refused} submissions \
             (submitted again after {} ms); the figures are capped by it",
            place.name,
            RATE_BACKOFF.as_millis()
        );
    }

    for conn in senders.into_iter().chain(receivers) {
        if let Ok(conn) = Arc::try_unwrap(conn) {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
        }
    }
    Ok(summary)
}

/// One of a sender's `window` workers: submits message after message until the sender's
/// `messages` are taken, so at most `window` submissions are in flight per sender.
async fn send_worker(
    conn: Arc<Connection>,
    to: UserId,
    next: Arc<AtomicU32>,
    load: Load,
    clock: Clock,
    first_send: Arc<FirstSend>,
    rate_limited: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let to = [to];
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= load.messages {
            return Ok(());
        }
        let now = clock.now_ns();
        first_send.record(now);
        let body = stats::body(load.body, now, index);
        // Over the host's per-session rate, back off and submit again with the same client id,
        // as a client should; the time spent counts, as it would for a user.
        let client_id = iim_client::new_client_id();
        loop {
            let answer =
                tokio::time::timeout(STALL, conn.submit(client_id, MessageKind::Chat, &to, &body))
                    .await
                    .map_err(|_| {
                        anyhow!(
                            "no answer to submission {index} for {} s (is the host stuck?)",
                            STALL.as_secs()
                        )
                    })?;
            match answer {
                Ok(_) => break,
                Err(e) if e.code() == Some(ErrorCode::RATE_LIMITED) => {
                    rate_limited.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(RATE_BACKOFF).await;
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("submitting message {index} to {}", to[0]));
                }
            }
        }
    }
}

/// A receiver: takes deliveries from `from`, acknowledging each, until `expected` arrived.
async fn receive(
    conn: Arc<Connection>,
    from: UserId,
    expected: u32,
    clock: Clock,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new(expected);
    while !tally.done() {
        let event = tokio::time::timeout(STALL, conn.next_event())
            .await
            .map_err(|_| {
                anyhow!(
                    "no delivery for {} s; received {} of {expected}",
                    STALL.as_secs(),
                    tally.count()
                )
            })?;
        match event {
            Some(Ok(Event::Message { seq, message })) => {
                let now = clock.now_ns();
                if message.from != from {
                    bail!("unexpected message from {}", message.from);
                }
                tally.record(&message.body, now)?;
                conn.ack(seq).await.context("acknowledging a delivery")?;
            }
            Some(Ok(Event::Synced { .. })) => {}
            Some(Ok(other @ Event::Backlog { .. })) => bail!("a receive session got {other:?}"),
            Some(Err(e)) => return Err(e).context("receiving"),
            None => bail!(
                "the connection ended (lost, or closed by the host) after {} of {expected} \
                 messages",
                tally.count()
            ),
        }
    }
    Ok(tally)
}
