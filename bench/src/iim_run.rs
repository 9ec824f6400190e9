//! The iim run: the real `iim-host` binary, real clients, chat messages from each sender to its
//! receiver, every delivery acknowledged; the bodies sent as they are, or sealed end to end by
//! each sender and opened by its receiver ([`Sealing`]).

use crate::schedule::{self, Due, OpenRun, Part, Parts, Schedule};
use crate::stats::{self, Breakdown, Clock, FirstSend, Load, Summary, Tally};
use anyhow::{Context, anyhow, bail};
use iim_client::e2e::{CardNews, Keyring};
use iim_client::proto::body::keys::{CardEntry, KeysRequest};
use iim_client::proto::{Address, DeviceId, ErrorCode, Message, MessageKind, SessionMode, UserId};
use iim_client::{Accepted, ClientError, Connection, Event};
use iim_e2e::metrics::Scrape;
use iim_e2e::{HostProcess, Plugins};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;
use tokio::sync::mpsc;
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
    start_host_with(&Build::Current, "").await
}

/// Which build of the host a run starts.
#[derive(Debug, Clone)]
pub enum Build {
    /// This workspace's `iim-host` and chat plugin.
    Current,
    /// Another build's (`bench/baseline.sh`): its `iim-host` with its own chat plugin.
    Other {
        /// Its `iim-host` executable.
        host: PathBuf,
        /// Its chat plugin.
        chat: PathBuf,
    },
}

impl Build {
    /// The build `bench/baseline.sh` made in the worktree `dir`: `dir/target/release/iim-host`
    /// and the chat plugin its build script built into `dir/target/plugins-wasm`.
    pub fn other(dir: &Path) -> anyhow::Result<Self> {
        let dir = std::fs::canonicalize(dir).with_context(|| {
            format!(
                "no baseline at {} (bash bench/baseline.sh [REV] [DIR] makes one)",
                dir.display()
            )
        })?;
        let host = dir.join("target/release/iim-host");
        let chat = dir.join("target/plugins-wasm/wasm32-wasip2/release/iim_plugin_chat.wasm");
        for file in [&host, &chat] {
            if !file.is_file() {
                bail!(
                    "no {}: build the baseline first (bash bench/baseline.sh [REV] [DIR])",
                    file.display()
                );
            }
        }
        Ok(Self::Other { host, chat })
    }
}

/// Starts a chat-only host of `build` with [`HOST_CONFIG`] and `extra` (TOML sections other
/// than `[limits]`).
pub async fn start_host_with(build: &Build, extra: &str) -> anyhow::Result<HostProcess> {
    let config = format!("{extra}\n{HOST_CONFIG}");
    let build = build.clone();
    tokio::task::spawn_blocking(move || match &build {
        Build::Current => HostProcess::start_chat_only_with_config(&config),
        Build::Other { host, chat } => {
            HostProcess::start_from(host, &config, Plugins::Only(&[("chat", chat)]))
        }
    })
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
    /// The metrics endpoint of the senders' host, if it serves one: the run then says where
    /// the host's CPU went ([`Breakdown`]).
    pub probe: Option<SocketAddr>,
}

impl Placement<'_> {
    fn receiver_host(&self, pair: usize) -> &HostProcess {
        self.receivers[pair % self.receivers.len()]
    }
}

/// A sender and its receiver.
pub type Pair = (UserId, UserId);

/// What the clients do with each chat body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealing {
    /// Sent as it is: text the host can read.
    Clear,
    /// Sealed end to end: each sender seals every body for its receiver with an
    /// `iim_client::e2e::Keyring` and submits what `Keyring::seal` gives, and each receiver
    /// opens it with its own and checks the plaintext is the one sent. The senders' and
    /// receivers' cards are exchanged in memory, not through the host's key directory, which
    /// a chat-only host does not run. The sealing and the opening are the clients' work, timed
    /// with the rest: a message counts as sent before it is sealed and as received once opened.
    EndToEnd,
}

/// The device every user of a run logs in as.
const DEVICE: &str = "bench";

/// A kind of host and client a run measures.
#[derive(Debug, Clone, Copy)]
pub struct Variant<'a> {
    /// The run's label, and the start of its users' names.
    pub name: &'a str,
    /// The host's build.
    pub build: &'a Build,
    /// The host's configuration besides [`HOST_CONFIG`]: TOML sections other than `[limits]`.
    pub extra: &'a str,
    /// What the clients do with each body.
    pub sealing: Sealing,
}

impl Default for Variant<'_> {
    /// This workspace's host, as configured for a benchmark, and bodies in the clear.
    fn default() -> Self {
        Self {
            name: "iim",
            build: &Build::Current,
            extra: "",
            sealing: Sealing::Clear,
        }
    }
}

/// Runs the load against a fresh host process, which serves its metrics, and returns its
/// figures with where the host's CPU went.
pub async fn run(load: Load, clock: Clock) -> anyhow::Result<Summary> {
    let variant = Variant {
        extra: METRICS,
        ..Variant::default()
    };
    run_with(load, clock, &variant).await
}

/// The configuration of a host that serves its metrics on a free port of loopback: the run
/// reads them to say where the host's CPU went.
pub const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

/// [`run`] against a fresh host of `variant`.
pub async fn run_with(load: Load, clock: Clock, variant: &Variant<'_>) -> anyhow::Result<Summary> {
    let Variant {
        name,
        build,
        extra,
        sealing,
    } = *variant;
    // Chat only: the load counts every message a receiver gets (no presence snapshots).
    let host = start_host_with(build, extra).await?;
    eprintln!("{name}: host listening on {}", host.addr);
    let probe = match extra.contains("[metrics]") {
        true => Some(iim_e2e::metrics::endpoint(&host).await?),
        false => None,
    };
    let place = Placement {
        name,
        senders: &host,
        receivers: &[&host],
        probe,
    };
    let result = async {
        let pairs = register(place, load).await?;
        measure(place, &pairs, load, clock, sealing).await
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

/// Brings the `pairs` (from [`register`]) online, runs the load through them, its bodies
/// sealed or not as `sealing` says, and returns its figures.
pub async fn measure(
    place: Placement<'_>,
    pairs: &[Pair],
    load: Load,
    clock: Clock,
    sealing: Sealing,
) -> anyhow::Result<Summary> {
    // The keyrings' files would go here, but a run never saves them: the directory only gives
    // each keyring a path of its own.
    let keyring_dir = tempfile::tempdir().context("a directory for the keyrings")?;
    let mut keyrings = match sealing {
        Sealing::Clear => Vec::new(),
        Sealing::EndToEnd => keyrings(keyring_dir.path(), pairs)?,
    }
    .into_iter();
    let mut outboxes = Vec::with_capacity(pairs.len());
    let mut openers = Vec::with_capacity(pairs.len());
    for (_, receiver) in pairs {
        let (sealer, opener) = keyrings.next().unzip();
        outboxes.push(Arc::new(Outbox {
            to: receiver.clone(),
            next: AtomicU32::new(0),
            sealer,
        }));
        openers.push(opener);
    }
    // What the host is given to carry: the body as it is, or sealed.
    let wire_body = match &outboxes.first().and_then(|o| o.sealer.as_ref()) {
        Some(sealer) => {
            let (sealed, _) = sealer.seal(&pairs[0].1, &stats::body(load.body, 0, 0))?;
            eprintln!(
                "{}: bodies of {} bytes are sealed into {} bytes",
                place.name,
                load.body,
                sealed.len()
            );
            Some(sealed.len())
        }
        None => None,
    };

    let (receivers, senders) = connect(place, pairs, load.body, wire_body).await?;

    let first_send = Arc::new(FirstSend::new());
    let rate_limited = Arc::new(AtomicU64::new(0));
    let before = match place.probe {
        Some(addr) => Some(Scrape::of(addr).await?),
        None => None,
    };
    // Senders and receivers in one set, so that whichever fails first ends the run.
    let mut tasks: JoinSet<anyhow::Result<Option<Tally>>> = JoinSet::new();
    for ((i, conn), opener) in receivers.iter().enumerate().zip(openers) {
        let conn = Arc::clone(conn);
        let from = pairs[i].0.clone();
        let who = pairs[i].1.clone();
        tasks.spawn(async move {
            receive(conn, from, load, clock, opener, None)
                .await
                .map(Some)
                .with_context(|| format!("receiver {who}"))
        });
    }
    for (i, (conn, outbox)) in senders.iter().zip(&outboxes).enumerate() {
        for _ in 0..load.window {
            let worker = send_worker(
                Arc::clone(conn),
                Arc::clone(outbox),
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
    let mut summary = Summary::of(&tallies, first_send.get(), load.total())?;
    summary.sealed_body = wire_body;
    if let (Some(addr), Some(before)) = (place.probe, before) {
        let after = Scrape::of(addr).await?;
        summary.breakdown = Some(Breakdown::between(&before, &after, &summary));
    }
    let refused = rate_limited.load(Ordering::Relaxed);
    if refused > 0 {
        eprintln!(
            "{}: warning: the host's per-session rate limit refused {refused} submissions \
             (submitted again after {} ms); the figures are capped by it",
            place.name,
            RATE_BACKOFF.as_millis()
        );
    }

    close(senders.into_iter().chain(receivers)).await;
    Ok(summary)
}

/// Brings the receivers of `pairs` online and logs their senders in; fails if a receiver has
/// a backlog or the host takes no bodies of `body` bytes (`wire_body` once sealed).
async fn connect(
    place: Placement<'_>,
    pairs: &[Pair],
    body: usize,
    wire_body: Option<usize>,
) -> anyhow::Result<(Vec<Arc<Connection>>, Vec<Arc<Connection>>)> {
    let mut receivers = Vec::with_capacity(pairs.len());
    for (i, (_, receiver)) in pairs.iter().enumerate() {
        let (conn, backlog) = place.receiver_host(i).online(receiver, DEVICE).await?;
        if !backlog.is_empty() {
            bail!("{receiver} has a backlog of {} messages", backlog.len());
        }
        receivers.push(Arc::new(conn));
    }
    let mut senders = Vec::with_capacity(pairs.len());
    for (sender, _) in pairs {
        let conn = place.senders.connect().await?;
        login(&conn, sender, DEVICE, SessionMode::SendOnly).await?;
        if (conn.max_body() as usize) < wire_body.unwrap_or(body) {
            bail!(
                "--body {body} ({} bytes sealed) is over the host's limit of {} bytes",
                wire_body.unwrap_or(body),
                conn.max_body()
            );
        }
        senders.push(Arc::new(conn));
    }
    eprintln!(
        "{}: {} receivers online, {} senders logged in; sending",
        place.name,
        pairs.len(),
        pairs.len()
    );
    Ok((receivers, senders))
}

/// Closes the connections no task holds any more, each within 2 s.
async fn close(conns: impl Iterator<Item = Arc<Connection>>) {
    for conn in conns {
        if let Ok(conn) = Arc::try_unwrap(conn) {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
        }
    }
}

/// A sender's keyring, with the cards it seals with: its own and its receiver's.
struct Sealer {
    keyring: Keyring,
    cards: Vec<CardEntry>,
}

impl Sealer {
    /// `plaintext` sealed for `to`, and the addresses to submit it to: `to` alone, as in a
    /// clear run (a copy to the sender's own user would be a second delivery to store).
    fn seal(&self, to: &UserId, plaintext: &[u8]) -> anyhow::Result<(Vec<u8>, Vec<Address>)> {
        let (body, addresses) = self
            .keyring
            .seal(std::slice::from_ref(to), &self.cards, plaintext)
            .context("sealing")?;
        if !matches!(addresses.as_slice(), [Address::User(u)] if u == to) {
            bail!("a body sealed for {to} is to go to {addresses:?}, not to {to} alone");
        }
        Ok((body, addresses))
    }
}

/// Makes a keyring for each sender and each receiver of `pairs`, its file (never written) in
/// `dir`, and gives each keyring of a pair the other's card, as the key directory would.
fn keyrings(dir: &Path, pairs: &[Pair]) -> anyhow::Result<Vec<(Sealer, Keyring)>> {
    let device = DeviceId::new(DEVICE)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let make = |user: &UserId| -> anyhow::Result<(Keyring, CardEntry)> {
        let path = dir.join(format!("{user}.keys"));
        let mut keyring = Keyring::open_or_create(&path, user, &device, now_ms)?;
        // The card a device publishes to the key directory; no key packages, which only MLS
        // groups use.
        let KeysRequest::Publish { card, .. } = keyring.publish(0)? else {
            bail!("the keyring of {user} made no publish request");
        };
        let entry = CardEntry {
            user: user.to_string(),
            device: DEVICE.into(),
            card,
        };
        Ok((keyring, entry))
    };
    let mut made = Vec::with_capacity(pairs.len());
    for (sender, receiver) in pairs {
        let (mut sending, sender_card) = make(sender)?;
        let (mut receiving, receiver_card) = make(receiver)?;
        let cards = vec![sender_card, receiver_card];
        for keyring in [&mut sending, &mut receiving] {
            for news in keyring.accept_cards(&cards) {
                if !matches!(news, CardNews::New { .. } | CardNews::Known { .. }) {
                    bail!("the keyring of {} refused a card: {news:?}", keyring.me());
                }
            }
        }
        made.push((
            Sealer {
                keyring: sending,
                cards,
            },
            receiving,
        ));
    }
    Ok(made)
}

/// What a sender sends, shared by its `window` workers.
struct Outbox {
    /// Its receiver.
    to: UserId,
    /// The index of the next message to take.
    next: AtomicU32,
    /// Its keyring, when the run seals end to end.
    sealer: Option<Sealer>,
}

/// One of a sender's `window` workers: submits message after message until the sender's
/// `messages` are taken, so at most `window` submissions are in flight per sender.
async fn send_worker(
    conn: Arc<Connection>,
    outbox: Arc<Outbox>,
    load: Load,
    clock: Clock,
    first_send: Arc<FirstSend>,
    rate_limited: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let to = [Address::User(outbox.to.clone())];
    loop {
        let index = outbox.next.fetch_add(1, Ordering::Relaxed);
        if index >= load.messages {
            return Ok(());
        }
        let now = clock.now_ns();
        first_send.record(now);
        let plaintext = stats::body(load.body, now, index);
        let sealed;
        let (body, addresses) = match &outbox.sealer {
            None => (&plaintext, &to[..]),
            Some(sealer) => {
                sealed = sealer.seal(&outbox.to, &plaintext)?;
                (&sealed.0, &sealed.1[..])
            }
        };
        // Over the host's per-session rate, back off and submit again with the same client id,
        // as a client should; the time spent counts, as it would for a user.
        let client_id = iim_client::new_client_id();
        loop {
            let submission = conn.submit(client_id, MessageKind::Chat, addresses, body);
            let answer = tokio::time::timeout(STALL, submission).await.map_err(|_| {
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
                        .with_context(|| format!("submitting message {index} to {}", outbox.to));
                }
            }
        }
    }
}

/// A receiver: takes deliveries from `from`, acknowledging each, until the sender's messages
/// arrived (or, given `until`, that time on `clock` came); with a keyring, opens each and fails
/// unless it holds the plaintext sent.
async fn receive(
    conn: Arc<Connection>,
    from: UserId,
    load: Load,
    clock: Clock,
    mut keyring: Option<Keyring>,
    until: Option<u64>,
) -> anyhow::Result<Tally> {
    let expected = load.messages;
    let mut tally = Tally::new(expected);
    while !tally.done() {
        let Some(wait) = schedule::wait(STALL, clock, until) else {
            break;
        };
        let event = match tokio::time::timeout(wait, conn.next_event()).await {
            Ok(event) => event,
            Err(_) if schedule::wait(STALL, clock, until).is_none() => break,
            Err(_) => bail!(
                "no delivery for {} s; received {} of {expected}",
                STALL.as_secs(),
                tally.count()
            ),
        };
        match event {
            Some(Ok(Event::Message { seq, message })) => {
                if message.from != from {
                    bail!("unexpected message from {}", message.from);
                }
                let opened = match keyring.as_mut() {
                    None => None,
                    Some(keyring) => Some(open(keyring, &message)?),
                };
                let now = clock.now_ns();
                let body = match &opened {
                    None => &message.body,
                    Some(plaintext) => {
                        check_plaintext(plaintext, load.body)?;
                        plaintext
                    }
                };
                tally.record(body, now)?;
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

/// The plaintext of the sealed `message`, opened with `keyring`.
fn open(keyring: &mut Keyring, message: &Message) -> anyhow::Result<Vec<u8>> {
    let opened = keyring.open(message).with_context(|| {
        format!(
            "opening message {} from {}/{}",
            message.id.0, message.from, message.from_device
        )
    })?;
    Ok(opened.plaintext)
}

/// Fails unless `plaintext` is the body of `len` bytes its header says was sent.
fn check_plaintext(plaintext: &[u8], len: usize) -> anyhow::Result<()> {
    let (sent_ns, index) = stats::parse_body(plaintext)?;
    if plaintext != stats::body(len, sent_ns, index).as_slice() {
        bail!("message {index} opened into other bytes than were sealed");
    }
    Ok(())
}

/// Runs `schedule` open loop against a fresh host of this workspace: each sender submits each
/// message as it falls due, without waiting for the answers to those before it, and each
/// receiver takes what arrives until every message did or [`schedule::DRAIN`] after the last
/// was due.
pub async fn run_open(
    schedule: Schedule,
    clock: Clock,
) -> anyhow::Result<(Schedule, OpenRun, Breakdown)> {
    let host = start_host_with(&Build::Current, METRICS).await?;
    let probe = iim_e2e::metrics::endpoint(&host).await?;
    let place = Placement {
        name: "open",
        senders: &host,
        receivers: &[&host],
        probe: Some(probe),
    };
    let result = async {
        let load = schedule.load();
        let pairs = register(place, load).await?;
        let (receivers, senders) = connect(place, &pairs, load.body, None).await?;
        let before = Scrape::of(probe).await?;
        let (schedule, dues) = schedule::pace(schedule, clock)?;
        let until = schedule.until_ns();
        let mut tasks: JoinSet<anyhow::Result<Part>> = JoinSet::new();
        for (i, conn) in receivers.iter().enumerate() {
            let (conn, from, who) = (Arc::clone(conn), pairs[i].0.clone(), pairs[i].1.clone());
            tasks.spawn(async move {
                let tally = receive(conn, from, load, clock, None, Some(until))
                    .await
                    .with_context(|| format!("receiver {who}"))?;
                Ok(Part::Received(i, tally))
            });
        }
        for (i, (conn, dues)) in senders.iter().zip(dues).enumerate() {
            let (conn, to, who) = (Arc::clone(conn), pairs[i].1.clone(), pairs[i].0.clone());
            tasks.spawn(async move {
                let lateness = send_open(conn, to, dues, load.body, clock, until)
                    .await
                    .with_context(|| format!("sender {who}"))?;
                Ok(Part::Sent(lateness))
            });
        }
        let mut parts = Parts::new(schedule.senders);
        while let Some(done) = tasks.join_next().await {
            parts.add(done.context("a benchmark task failed")??)?;
        }
        let run = parts.finish(clock)?;
        let after = Scrape::of(probe).await?;
        let delivered = run.tallies.iter().map(|t| u64::from(t.count())).sum();
        let secs = run.end_ns.saturating_sub(schedule.due_ns(0, 0)) as f64 / 1e9;
        let breakdown = Breakdown::of(&before, &after, delivered, secs);
        close(senders.into_iter().chain(receivers)).await;
        Ok((schedule, run, breakdown))
    }
    .await;
    if result.is_err() {
        print_log_tail("host", &host);
    }
    result
}

/// An open-loop sender: submits each message as the pacer hands it over, on `conn`, to `to`;
/// then waits for the answers still due, until `until`. Fails if the host refuses one.
/// Returns how late it issued each message.
async fn send_open(
    conn: Arc<Connection>,
    to: UserId,
    mut dues: mpsc::UnboundedReceiver<Due>,
    body: usize,
    clock: Clock,
    until: u64,
) -> anyhow::Result<Vec<u64>> {
    let to = [Address::User(to)];
    let mut lateness = Vec::new();
    let mut answers: JoinSet<(u32, Result<Accepted, ClientError>)> = JoinSet::new();
    let check = |(index, answer): (u32, Result<Accepted, ClientError>)| {
        answer
            .map(|_| ())
            .with_context(|| format!("submitting message {index}"))
    };
    while let Some(due) = dues.recv().await {
        let body = schedule::issue(clock, due, &mut lateness, body);
        let (conn, to, index) = (Arc::clone(&conn), to.clone(), due.index);
        let mut submission = Box::pin(async move {
            let id = iim_client::new_client_id();
            (index, conn.submit(id, MessageKind::Chat, &to, &body).await)
        });
        // Polled once here, the submission enters the connection's outbox now, and a
        // connection writes its submissions in the order they entered it: this sender's
        // reach the host in their schedule's order, none waiting for an earlier one's answer.
        match poll_once(&mut submission).await {
            Poll::Ready(answer) => check(answer)?,
            Poll::Pending => {
                answers.spawn(submission);
            }
        }
        while let Some(answer) = answers.try_join_next() {
            check(answer.context("a submission's task failed")?)?;
        }
    }
    let answered = async {
        while let Some(answer) = answers.join_next().await {
            check(answer.context("a submission's task failed")?)?;
        }
        Ok::<_, anyhow::Error>(())
    };
    // What is not answered by then shows as undelivered.
    if let Ok(answered) = tokio::time::timeout_at(clock.instant_at(until).into(), answered).await {
        answered?;
    }
    Ok(lateness)
}

/// Polls `future` once: its output if that was enough, else `Pending` (it goes on when polled
/// again, by whoever holds it then).
async fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx))).await
}
