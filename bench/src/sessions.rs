//! Idle sessions (issue 18, Deliver 4): what a logged-in, idle device costs the host in memory,
//! how fast devices log in with their tokens, and one message fanned out to all of them.
//!
//! - *Set-up.* A chat-only host (the real `iim-host`, a fresh data directory, on 127.0.0.1)
//!   with the benchmark's submission rate ([`crate::iim_run::HOST_CONFIG`]) and
//!   `limits.max_connections` raised to `clients` + [`SPARE_CONNECTIONS`]: its default, 10,000
//!   connections at once, would refuse the last sessions of a 10,000 run. Users `d0`, `d1`, …
//!   each register and log in with their password once (one device each, `SendOnly`) on a
//!   connection of their own, [`crate::network::bounded`]'s 32 at a time: a token each. That is
//!   two argon2id hashes a user on the host's `limits.max_hashing` threads, which set the rate;
//!   no other limit applies: two attempts a connection are within `limits.auth_burst` (10),
//!   loopback is exempt from the limits per address, and 32 waiting is within
//!   `limits.hashing_queue` (256), so nothing is refused. The sender, `fanout`, logs in too.
//! - *Token logins.* The host's resident memory (`VmRSS`) is read, then every device connects
//!   and sends `Hello` and `Authenticate` with its token in `Receive` mode, [`CONNECTING`] at a
//!   time, each on a QUIC connection of its own that then stays open and idle: keep-alives only
//!   (iim-client's desktop profile, a PING after 10 s of quiet). The connections share client
//!   endpoints of [`PER_ENDPOINT`] connections each (one UDP socket each), so that this process
//!   needs no descriptor per session, and speak the protocol with iim-proto's frames rather
//!   than through iim-client, whose `Connection` binds a socket of its own and runs a session
//!   machine and a driver task that an idle device here does not need. Measured: from the
//!   first connection to the last device's `Synced`, and each login's own time; then the
//!   host's memory again: its growth over `clients` is the memory of an idle session (issue
//!   18's goal: at most 32 KiB).
//! - *Fan-out.* The sender submits one chat message to every device's user. A submission names
//!   at most 256 recipients (`iim_proto::MAX_TARGETS`), so it is `ceil(clients / 256)`
//!   submissions of the same body, all in flight at once. Measured: from the first submission
//!   to the first, the median and the last device getting it. Every device acknowledges what
//!   it gets and must get the message exactly once (a `Deliver` at a position it already had
//!   is a retransmission, not a repeat): a device without it after [`STALL`], one that gets it
//!   again within [`GRACE`] after the last device got it, any other message, or a session that
//!   ends fails the run.

use crate::stats::{self, Clock};
use anyhow::{Context, anyhow, bail, ensure};
use iim_client::proto::{
    Address, ClientFrame, DEFAULT_MAX_FRAME, DeviceId, FrameDecoder, MAX_TARGETS, Message,
    MessageId, MessageKind, PROTOCOL_VERSION, ServerFrame, SessionMode, UserId, encode_frame,
};
use iim_e2e::HostProcess;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;

/// Connections over the sessions (and the sender) that the host's `limits.max_connections`
/// allows: for the registrations still closing when the sessions start.
const SPARE_CONNECTIONS: u32 = 100;
/// Token logins in flight at once: enough to keep the host's cores busy with handshakes,
/// few enough that none waits near the host's 10 s handshake timeout.
const CONNECTING: usize = 64;
/// Connections per client endpoint (one UDP socket each).
const PER_ENDPOINT: u32 = 500;
/// The receive buffer asked for each client socket, in bytes.
const RECV_BUFFER: usize = 4 << 20;
/// Longest wait for the next report of any device (a login done, a delivery).
const STALL: Duration = Duration::from_secs(60);
/// How long after the last device got the message a repeat would still be noticed.
const GRACE: Duration = Duration::from_secs(1);
/// The device every user logs in as.
const DEVICE: &str = "d";
/// The request id of every session's `Authenticate`.
const AUTH_REQ: u64 = 1;
/// The goal of issue 18 for an idle session, in KiB.
pub const GOAL_KIB: f64 = 32.0;

/// The figures of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    /// Devices, each a user of its own, each on a connection of its own.
    pub clients: u32,
    /// Client endpoints (UDP sockets) the sessions share.
    pub client_endpoints: u32,
    /// What the host's log says of its open-file limit at start.
    pub host_fd_limit: String,
    /// `limits.max_connections` of the host.
    pub max_connections: u32,
    /// Registrations and password logins (two hashes a user), in s.
    pub password_secs: f64,
    /// Users registered and logged in with their password per second.
    pub password_users_per_s: f64,
    /// From the first token login's connection to the last device's `Synced`, in s.
    pub token_login_secs: f64,
    /// Token logins per second.
    pub token_logins_per_s: f64,
    /// Median of a token login's own time (connection, handshake, `Authenticate`, `Synced`),
    /// in ms.
    pub token_login_p50_ms: f64,
    /// 99th percentile of the same, in ms.
    pub token_login_p99_ms: f64,
    /// The host's resident memory before the token logins (the users registered, the sender
    /// online), in MiB.
    pub rss_before_mib: f64,
    /// After every device logged in, in MiB.
    pub rss_after_mib: f64,
    /// Datagrams the host's UDP socket dropped, its receive buffer full (Linux's
    /// `/proc/net/udp`), from the first token login to the end of the fan-out: each costs a
    /// retransmission, a lost handshake packet a second.
    pub host_socket_drops: u64,
    /// `(rss_after - rss_before) / clients`, in KiB.
    pub kib_per_session: f64,
    /// After the fan-out, in MiB.
    pub rss_after_fanout_mib: f64,
    /// This process's resident memory before the token logins, in MiB.
    pub bench_rss_before_mib: f64,
    /// After every device logged in, in MiB.
    pub bench_rss_after_mib: f64,
    /// Submissions of the message (at most 256 recipients each).
    pub fanout_submissions: u32,
    /// From the first submission to the last `Accepted`, in ms.
    pub fanout_accepted_ms: f64,
    /// From the first submission to the first device getting the message, in ms.
    pub fanout_first_ms: f64,
    /// To the median device, in ms.
    pub fanout_p50_ms: f64,
    /// To the last device, in ms.
    pub fanout_last_ms: f64,
    /// Devices checked to have got the message exactly once.
    pub deliveries_checked: u32,
}

/// Runs the measurement against a fresh host with `clients` idle devices.
pub async fn run(clients: u32) -> anyhow::Result<Figures> {
    let max_connections = clients.saturating_add(SPARE_CONNECTIONS);
    let config = format!(
        "{}max_connections = {max_connections}\n",
        crate::iim_run::HOST_CONFIG
    );
    let host =
        tokio::task::spawn_blocking(move || HostProcess::start_chat_only_with_config(&config))
            .await
            .context("starting the host")??;
    eprintln!("sessions: host listening on {}", host.addr);
    let result = measure(&host, clients, max_connections).await;
    if result.is_err() {
        crate::iim_run::print_log_tail("host", &host);
    }
    result
}

async fn measure(
    host: &HostProcess,
    clients: u32,
    max_connections: u32,
) -> anyhow::Result<Figures> {
    let clock = Clock::new();
    let pid = host.pid().context("the host is not running")?;
    let host_fd_limit = host
        .log()
        .lines()
        .find_map(|line| Some(line.split_once("fd_limit: ")?.1.to_owned()))
        .unwrap_or_else(|| "(nothing in the host's log)".into());
    eprintln!("sessions: host's open-file limit: {host_fd_limit}");

    eprintln!(
        "sessions: {clients} users register and log in with their password (two hashes each)"
    );
    let started = Instant::now();
    let devices = Arc::new(password_logins(host, clients).await?);
    let password_secs = started.elapsed().as_secs_f64();
    let sender_user = host.register("fanout").await?;
    let sender = Arc::new(host.connect().await?);
    crate::iim_run::login(&sender, &sender_user, DEVICE, SessionMode::SendOnly).await?;

    let rss_before = crate::process::rss_mib(pid)?;
    let bench_rss_before = crate::process::rss_mib(std::process::id())?;
    eprintln!(
        "sessions: {clients} users in {password_secs:.1} s; host at {rss_before:.1} MiB; \
         {clients} token logins, {CONNECTING} at a time"
    );
    let endpoints = endpoints(host, clients)?;
    let drops_before = socket_drops(host.addr)?;
    let (reports, mut inbox) = mpsc::unbounded_channel();
    let login_started = clock.now_ns();
    let mut sessions = JoinSet::new();
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    for index in 0..clients {
        let permit = Arc::clone(&connecting).acquire_owned().await?;
        let session = Session {
            index,
            device: Arc::clone(&devices),
            endpoint: endpoints[(index / PER_ENDPOINT) as usize].clone(),
            server: host.addr,
            reports: reports.clone(),
            clock,
        };
        sessions.spawn(session.run(permit));
    }
    let mut took = Vec::with_capacity(clients as usize);
    let mut last_ready = login_started;
    while took.len() < clients as usize {
        match next_report(&mut inbox, "a token login").await? {
            Report::Ready { took_ns, at, .. } => {
                took.push(took_ns);
                last_ready = last_ready.max(at);
                if took.len().is_multiple_of(1000) && took.len() < clients as usize {
                    eprintln!("sessions: {} of {clients} logged in", took.len());
                }
            }
            Report::Got { index, message, .. } => {
                bail!(
                    "device {index} got {} before the fan-out",
                    describe(&message)
                )
            }
            Report::Failed { index, why } => bail!("device {index}: {why:#}"),
        }
    }
    let token_login_secs = (last_ready - login_started) as f64 / 1e9;
    took.sort_unstable();
    let rss_after = crate::process::rss_mib(pid)?;
    let bench_rss_after = crate::process::rss_mib(std::process::id())?;
    let kib_per_session = (rss_after - rss_before) * 1024.0 / f64::from(clients);
    eprintln!(
        "sessions: {clients} logged in in {token_login_secs:.1} s; host at {rss_after:.1} MiB \
         ({kib_per_session:.1} KiB a session); one message to all"
    );

    let fanout = fan_out(&sender, &sender_user, &devices, &mut inbox, clock).await?;
    let rss_after_fanout = crate::process::rss_mib(pid)?;
    let host_socket_drops = socket_drops(host.addr)?.saturating_sub(drops_before);
    for endpoint in &endpoints {
        endpoint.close(0u32.into(), b"done");
    }
    drop(sender);
    for endpoint in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    sessions.abort_all();

    let ms = |ns: u64| ns as f64 / 1e6;
    Ok(Figures {
        clients,
        client_endpoints: u32::try_from(endpoints.len())?,
        host_fd_limit,
        max_connections,
        password_secs,
        password_users_per_s: f64::from(clients) / password_secs,
        token_login_secs,
        token_logins_per_s: f64::from(clients) / token_login_secs,
        token_login_p50_ms: ms(stats::percentile(&took, 0.5)),
        token_login_p99_ms: ms(stats::percentile(&took, 0.99)),
        rss_before_mib: rss_before,
        rss_after_mib: rss_after,
        host_socket_drops,
        kib_per_session,
        rss_after_fanout_mib: rss_after_fanout,
        bench_rss_before_mib: bench_rss_before,
        bench_rss_after_mib: bench_rss_after,
        fanout_submissions: fanout.submissions,
        fanout_accepted_ms: ms(fanout.accepted_ns),
        fanout_first_ms: ms(fanout.arrivals.first().copied().unwrap_or(0)),
        fanout_p50_ms: ms(stats::percentile(&fanout.arrivals, 0.5)),
        fanout_last_ms: ms(fanout.arrivals.last().copied().unwrap_or(0)),
        deliveries_checked: u32::try_from(fanout.arrivals.len())?,
    })
}

/// The datagrams the UDP socket bound to `addr` (IPv4) has dropped: the last column of its
/// line in `/proc/net/udp`, where the local address is `HEXIP:HEXPORT`.
fn socket_drops(addr: SocketAddr) -> anyhow::Result<u64> {
    let table = std::fs::read_to_string("/proc/net/udp").context("reading /proc/net/udp")?;
    let local = format!(":{:04X}", addr.port());
    table
        .lines()
        .skip(1)
        .find(|line| {
            line.split_whitespace()
                .nth(1)
                .is_some_and(|l| l.ends_with(&local))
        })
        .and_then(|line| line.split_whitespace().last()?.parse().ok())
        .with_context(|| format!("no socket on port {} in /proc/net/udp", addr.port()))
}

/// A device: its user, and the token its password login gave.
struct Device {
    user: UserId,
    token: String,
}

/// Registers users `d0` to `d{clients-1}` and logs each in once with its password, each on a
/// connection of its own; returns their devices, in order.
async fn password_logins(host: &HostProcess, clients: u32) -> anyhow::Result<Vec<Device>> {
    let config = Arc::new(host.client_config()?);
    let done = Arc::new(std::sync::atomic::AtomicU32::new(0));
    crate::network::bounded(clients, |i| {
        let (config, done) = (Arc::clone(&config), Arc::clone(&done));
        async move {
            let user = UserId::new(format!("d{i}"))?;
            let conn = iim_e2e::within("connect", iim_client::Connection::connect(&config))
                .await?
                .context("connect")?;
            iim_e2e::within("register", conn.register(&user, iim_e2e::PASSWORD))
                .await?
                .with_context(|| format!("registering {user}"))?;
            let device = DeviceId::new(DEVICE)?;
            let token = iim_e2e::within(
                "login",
                conn.login(&user, iim_e2e::PASSWORD, &device, SessionMode::SendOnly),
            )
            .await?
            .with_context(|| format!("logging {user} in"))?;
            conn.close().await;
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n.is_multiple_of(1000) && n < clients {
                eprintln!("sessions: {n} of {clients} users registered and logged in");
            }
            anyhow::Ok(Device { user, token })
        }
    })
    .await
}

/// The client endpoints for `clients` connections, [`PER_ENDPOINT`] each, on 127.0.0.1 with
/// iim-client's QUIC configuration (its desktop keep-alive and idle timeout), each socket's
/// receive buffer [`RECV_BUFFER`]: at the default (208 KiB on Linux) the socket of 500
/// connections drops packets when the fan-out reaches them all at once, and the figures would
/// be this process's losses.
fn endpoints(host: &HostProcess, clients: u32) -> anyhow::Result<Vec<quinn::Endpoint>> {
    let quic = iim_client::quic_client_config(&host.client_config()?.roots)?;
    (0..clients.div_ceil(PER_ENDPOINT))
        .map(|_| {
            let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
                .context("a client socket")?;
            let state = quinn::udp::UdpSocketState::new((&socket).into())?;
            // Linux caps it at net.core.rmem_max; a smaller buffer only costs losses.
            let _ = state.set_recv_buffer_size((&socket).into(), RECV_BUFFER);
            let mut endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .context("a client endpoint")?;
            endpoint.set_default_client_config(quic.clone());
            Ok(endpoint)
        })
        .collect()
}

/// What a device tells the run.
enum Report {
    /// A device is authenticated and its (empty) backlog delivered: `took_ns` after its
    /// connection started, `at` on the run's clock.
    Ready { took_ns: u64, at: u64 },
    /// Device `index` got `message` (a position it had not had), `at` on the run's clock.
    Got {
        index: u32,
        message: Message,
        at: u64,
    },
    /// Device `index`'s login failed, or its session ended.
    Failed { index: u32, why: anyhow::Error },
}

/// The next report, waiting at most [`STALL`] for it.
async fn next_report(
    inbox: &mut mpsc::UnboundedReceiver<Report>,
    waiting_for: &str,
) -> anyhow::Result<Report> {
    match tokio::time::timeout(STALL, inbox.recv()).await {
        Err(_) => bail!(
            "no device reported anything for {} s, waiting for {waiting_for}",
            STALL.as_secs()
        ),
        Ok(None) => bail!("every session ended"),
        Ok(Some(report)) => Ok(report),
    }
}

/// One device's session: a token login on a connection of its own, then deliveries, each
/// acknowledged and reported.
struct Session {
    index: u32,
    /// Every device; this one is `index`.
    device: Arc<Vec<Device>>,
    endpoint: quinn::Endpoint,
    server: SocketAddr,
    reports: mpsc::UnboundedSender<Report>,
    clock: Clock,
}

impl Session {
    /// Logs in (holding `permit` until then), reports it, then listens until the connection
    /// ends; reports why it did. A report the run no longer reads is dropped.
    async fn run(self, permit: OwnedSemaphorePermit) {
        let index = self.index;
        let started = self.clock.now_ns();
        let opened = iim_e2e::within("a token login", self.open()).await;
        drop(permit);
        let why = match opened.and_then(|stream| stream) {
            Ok(mut stream) => {
                let at = self.clock.now_ns();
                let took_ns = at.saturating_sub(started);
                let _ = self.reports.send(Report::Ready { took_ns, at });
                let Err(why) = self.listen(&mut stream).await;
                why
            }
            Err(why) => why.context("logging in with the token"),
        };
        let _ = self.reports.send(Report::Failed { index, why });
    }

    /// Connects, says `Hello` and `Authenticate` (in one write) and waits for their answers and
    /// the end of the (empty) backlog.
    async fn open(&self) -> anyhow::Result<Stream> {
        let Device { user, token } = &self.device[self.index as usize];
        let conn = self.endpoint.connect(self.server, "localhost")?.await?;
        let (send, recv) = conn.open_bi().await?;
        let mut stream = Stream {
            _conn: conn,
            send,
            recv,
            decoder: FrameDecoder::new(DEFAULT_MAX_FRAME),
        };
        let hello = ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            agent: "iim-bench sessions".into(),
        };
        let authenticate = ClientFrame::Authenticate {
            req: AUTH_REQ,
            user: user.clone(),
            device: DeviceId::new(DEVICE)?,
            token: token.clone(),
            mode: SessionMode::Receive,
        };
        let mut bytes = encode_frame(&hello, DEFAULT_MAX_FRAME)?;
        bytes.extend(encode_frame(&authenticate, DEFAULT_MAX_FRAME)?);
        stream.send.write_all(&bytes).await?;
        let (mut welcomed, mut authenticated) = (false, false);
        loop {
            match stream.next().await? {
                ServerFrame::Welcome { .. } => welcomed = true,
                ServerFrame::Ok { req: AUTH_REQ } => authenticated = true,
                ServerFrame::Synced { count: 0 } if welcomed && authenticated => {
                    return Ok(stream);
                }
                other => bail!("{user} got {other:?}"),
            }
        }
    }

    /// Acknowledges every delivery and reports each position not had before; ends (with why)
    /// on anything else, or when the connection does.
    async fn listen(&self, stream: &mut Stream) -> anyhow::Result<Infallible> {
        let mut last = 0;
        loop {
            match stream.next().await? {
                ServerFrame::Deliver { seq, message } => {
                    let at = self.clock.now_ns();
                    stream
                        .send
                        .write_all(&encode_frame(&ClientFrame::Ack { seq }, DEFAULT_MAX_FRAME)?)
                        .await?;
                    if seq > last {
                        last = seq;
                        let index = self.index;
                        let _ = self.reports.send(Report::Got { index, message, at });
                    }
                }
                other => bail!("an idle session got {other:?}"),
            }
        }
    }
}

/// A session's stream, and its connection (held: dropping its last handle would close it).
struct Stream {
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl Stream {
    /// The host's next frame.
    async fn next(&mut self) -> anyhow::Result<ServerFrame> {
        loop {
            if let Some(frame) = self.decoder.decode()? {
                return Ok(frame);
            }
            let chunk = self
                .recv
                .read_chunk(usize::MAX, true)
                .await?
                .context("the host ended the stream")?;
            self.decoder.push(&chunk.bytes);
        }
    }
}

/// What the fan-out found; times from the first submission, in ns.
struct FanOut {
    submissions: u32,
    /// To the last `Accepted`.
    accepted_ns: u64,
    /// To each device's getting it, sorted.
    arrivals: Vec<u64>,
}

/// `sender` (user `from`) submits one chat message to every device's user, [`MAX_TARGETS`] a
/// submission, all at once; waits until every device has it, then [`GRACE`] more for repeats.
async fn fan_out(
    sender: &Arc<iim_client::Connection>,
    from: &UserId,
    devices: &[Device],
    inbox: &mut mpsc::UnboundedReceiver<Report>,
    clock: Clock,
) -> anyhow::Result<FanOut> {
    let body = format!(
        "iim-bench sessions: one message to {} devices",
        devices.len()
    );
    let submitted = clock.now_ns();
    let mut submitting = JoinSet::new();
    for (c, chunk) in devices.chunks(MAX_TARGETS).enumerate() {
        let to: Vec<UserId> = chunk.iter().map(|d| d.user.clone()).collect();
        let (sender, body) = (Arc::clone(sender), body.clone());
        submitting.spawn(async move {
            let accepted = sender
                .submit(
                    iim_client::new_client_id(),
                    MessageKind::Chat,
                    &to,
                    body.as_bytes(),
                )
                .await
                .with_context(|| format!("submission {c}"))?;
            anyhow::Ok((c, accepted.id, clock.now_ns()))
        });
    }
    let accepting = async {
        let mut accepted = vec![None; submitting.len()];
        while let Some(done) = submitting.join_next().await {
            let (c, id, at) = done.context("a submission failed")??;
            accepted[c] = Some((id, at.saturating_sub(submitted)));
        }
        anyhow::Ok(accepted)
    };
    let receiving = async {
        let mut got: Vec<Option<(MessageId, u64)>> = vec![None; devices.len()];
        let mut have = 0;
        let mut grace_until = None;
        loop {
            let report = match grace_until {
                None => next_report(inbox, "the message").await?,
                Some(until) => match tokio::time::timeout_at(until, inbox.recv()).await {
                    Ok(Some(report)) => report,
                    Ok(None) => bail!("every session ended"),
                    Err(_) => return anyhow::Ok(got),
                },
            };
            let (index, message, at) = match report {
                Report::Got { index, message, at } => (index, message, at),
                Report::Failed { index, why } => bail!("device {index}: {why:#}"),
                Report::Ready { .. } => bail!("a device logged in during the fan-out"),
            };
            let device = &devices[index as usize];
            ensure!(
                message.kind == MessageKind::Chat
                    && message.from == *from
                    && message.body == body.as_bytes()
                    && message.to.contains(&Address::User(device.user.clone())),
                "{} got {}",
                device.user,
                describe(&message)
            );
            if let Some((first, _)) = got[index as usize] {
                bail!(
                    "{} got the message twice: {first}, then {}",
                    device.user,
                    message.id
                );
            }
            got[index as usize] = Some((message.id, at.saturating_sub(submitted)));
            have += 1;
            if have == devices.len() {
                grace_until = Some(tokio::time::Instant::now() + GRACE);
            }
        }
    };
    let (accepted, got) = tokio::try_join!(accepting, receiving)?;
    let mut arrivals = Vec::with_capacity(devices.len());
    for (i, got) in got.into_iter().enumerate() {
        let (id, at) = got.ok_or_else(|| anyhow!("{} did not get the message", devices[i].user))?;
        let (expected, _) = accepted[i / MAX_TARGETS]
            .with_context(|| format!("submission {} was not answered", i / MAX_TARGETS))?;
        ensure!(
            id == expected,
            "{} got message {id}, but its submission was accepted as {expected}",
            devices[i].user
        );
        arrivals.push(at);
    }
    arrivals.sort_unstable();
    Ok(FanOut {
        submissions: u32::try_from(accepted.len())?,
        accepted_ns: accepted
            .iter()
            .flatten()
            .map(|(_, at)| *at)
            .max()
            .unwrap_or(0),
        arrivals,
    })
}

/// A message, briefly, for an error.
fn describe(message: &Message) -> String {
    format!(
        "{} message {} from {} to {} addressees",
        message.kind,
        message.id,
        message.from,
        message.to.len()
    )
}

/// Prints the figures as a table.
pub fn print(f: &Figures) {
    let row = |label: &str, value: String| println!("  {label:<44} {value}");
    println!(
        "sessions: {} devices, each a user and a QUIC connection of its own, logged in and \
         idle, against one chat-only host",
        f.clients
    );
    println!(
        "  (host: limits.max_connections = {}; {}; client side: {} UDP sockets)",
        f.max_connections, f.host_fd_limit, f.client_endpoints
    );
    row(
        "set-up: register + password login (2 hashes)",
        format!(
            "{:>9.1} s ({:.1} users/s: the host's hashing threads)",
            f.password_secs, f.password_users_per_s
        ),
    );
    row(
        "token logins, all",
        format!(
            "{:>9.2} s ({:.0} logins/s, {CONNECTING} at a time)",
            f.token_login_secs, f.token_logins_per_s
        ),
    );
    row(
        "a token login, p50 / p99",
        format!(
            "{:>9.1} ms / {:.1} ms",
            f.token_login_p50_ms, f.token_login_p99_ms
        ),
    );
    row("host RSS before", format!("{:>9.1} MiB", f.rss_before_mib));
    row("host RSS after", format!("{:>9.1} MiB", f.rss_after_mib));
    let goal = if f.kib_per_session <= GOAL_KIB {
        "met"
    } else {
        "MISSED"
    };
    row(
        "memory per idle session",
        format!(
            "{:>9.1} KiB (goal <= {GOAL_KIB} KiB: {goal})",
            f.kib_per_session
        ),
    );
    row(
        "datagrams the host's socket dropped",
        format!(
            "{:>9} (its receive buffer full; a lost handshake packet costs 1 s)",
            f.host_socket_drops
        ),
    );
    row(
        "host RSS after the fan-out",
        format!("{:>9.1} MiB", f.rss_after_fanout_mib),
    );
    row(
        "bench RSS before / after the logins",
        format!(
            "{:>9.1} MiB / {:.1} MiB",
            f.bench_rss_before_mib, f.bench_rss_after_mib
        ),
    );
    println!(
        "one chat message to all {} devices: {} submissions of at most {MAX_TARGETS} recipients \
         (the protocol's limit), all in flight",
        f.clients, f.fanout_submissions
    );
    row(
        "to the last Accepted",
        format!("{:>9.1} ms", f.fanout_accepted_ms),
    );
    row(
        "to the first device",
        format!("{:>9.1} ms", f.fanout_first_ms),
    );
    row(
        "to the median device",
        format!("{:>9.1} ms", f.fanout_p50_ms),
    );
    row(
        "to the last device",
        format!("{:>9.1} ms", f.fanout_last_ms),
    );
    row(
        "devices that got it exactly once",
        format!("{:>9} of {}", f.deliveries_checked, f.clients),
    );
}
