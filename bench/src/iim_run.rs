//! The iim run: the real `iim-host` binary, real clients, chat messages from each sender to its
//! receiver, every delivery acknowledged; the bodies sent as they are, or sealed end to end by
//! each sender and opened by its receiver ([`Sealing`]).

use crate::stats::{self, Clock, FirstSend, Load, Summary, Tally};
use anyhow::{Context, anyhow, bail};
use iim_client::e2e::{CardNews, Keyring};
use iim_client::proto::body::keys::{CardEntry, KeysRequest};
use iim_client::proto::{Address, DeviceId, ErrorCode, Message, MessageKind, SessionMode, UserId};
use iim_client::{Connection, Event};
use iim_e2e::HostProcess;
use std::path::Path;
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

/// Runs the load against a fresh host process and returns its figures.
pub async fn run(load: Load, clock: Clock) -> anyhow::Result<Summary> {
    run_with(load, clock, "iim", "", Sealing::Clear).await
}

/// [`run`] against a host with configuration `extra` too, labelled `name`, the bodies sealed
/// or not as `sealing` says.
pub async fn run_with(
    load: Load,
    clock: Clock,
    name: &str,
    extra: &str,
    sealing: Sealing,
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
        if (conn.max_body() as usize) < wire_body.unwrap_or(load.body) {
            bail!(
                "--body {} ({} bytes sealed) is over the host's limit of {} bytes",
                load.body,
                wire_body.unwrap_or(load.body),
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
    for ((i, conn), opener) in receivers.iter().enumerate().zip(openers) {
        let conn = Arc::clone(conn);
        let from = pairs[i].0.clone();
        let who = pairs[i].1.clone();
        tasks.spawn(async move {
            receive(conn, from, load, clock, opener)
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
/// arrived; with a keyring, opens each and fails unless it holds the plaintext sent.
async fn receive(
    conn: Arc<Connection>,
    from: UserId,
    load: Load,
    clock: Clock,
    mut keyring: Option<Keyring>,
) -> anyhow::Result<Tally> {
    let expected = load.messages;
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
