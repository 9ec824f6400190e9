//! A host's membership in a network of hosts: its link to the exchange, and what it knows of
//! the network (DESIGN.md §2–3).
//!
//! [`Network`] holds the registry, the user directory and the presence of other hosts' users,
//! cached in memory and (registry, directory) in the store, so that a host restarted while the
//! exchange is away still routes. [`run`] keeps one QUIC connection to the exchange: it joins,
//! takes the directory entries it lacks and every later one, sends the relay outbox (`905`s) in
//! order and drops what the exchange acknowledged, and applies the `906`s it receives to the
//! inboxes of its users, acknowledging each once it is durable. Connection lost: it joins
//! again, with a growing wait, and each side sends again what the other did not acknowledge.

use crate::Host;
use crate::config::Config;
use crate::store::{Store, StoreError};
use anyhow::Context;
use iim_proto::peer::{
    Envelope, ExchangeFrame, HostFrame, PEER_ALPN, PEER_VERSION, RelayRow, ServerInfo,
};
use iim_proto::relay::{Incoming, RelayLink};
use iim_proto::session::Backoff;
use iim_proto::{FrameDecoder, UserId, encode_frame};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};

/// Largest frame between a host and the exchange: a message of the largest frame a host may
/// configure (1 MiB) and the rows of the most users one send may name (100,000 names of at
/// most 64 bytes).
pub const PEER_MAX_FRAME: u32 = 16 * 1024 * 1024;
/// Largest first frame (`Join`) the exchange reads from a connection it does not know yet.
const JOIN_MAX_FRAME: u32 = 16 * 1024;
/// How long a claim or look-up waits for the exchange.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long connecting and joining may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait before the first attempt to join again; it doubles after each failed attempt.
const REJOIN_FIRST: Duration = Duration::from_millis(200);
/// The longest wait between two attempts to join.
const REJOIN_MAX: Duration = Duration::from_secs(5);

/// Why the network could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The exchange is not connected or did not answer in time.
    #[error("the exchange is out of reach: {0}")]
    Unavailable(String),
    /// A relay envelope would be larger than the link between hosts carries.
    #[error("too large to relay: {0}")]
    TooLarge(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Relay counters since the host started, for the operator (`iim-host admin network`).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// `905` envelopes put in the outbox.
    pub envelopes_out: AtomicU64,
    /// `905` envelopes written to the exchange (again after a reconnect included).
    pub envelopes_sent: AtomicU64,
    /// `905` envelopes the exchange acknowledged.
    pub envelopes_acked: AtomicU64,
    /// `906` envelopes received and applied (repeats excluded).
    pub envelopes_in: AtomicU64,
    /// Inbox entries those made.
    pub relayed_deliveries: AtomicU64,
}

/// This host's view of its network.
pub struct Network {
    server: String,
    addr: String,
    store: Store,
    homes: RwLock<HashMap<UserId, String>>,
    directory_version: AtomicU64,
    servers: RwLock<BTreeMap<String, ServerInfo>>,
    /// Users of other hosts with devices online, and how many.
    presence: RwLock<HashMap<UserId, u32>>,
    up: AtomicBool,
    outbox_ready: Notify,
    requests: Mutex<HashMap<u64, oneshot::Sender<ExchangeFrame>>>,
    next_req: AtomicU64,
    control: mpsc::UnboundedSender<HostFrame>,
    control_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<HostFrame>>,
    /// This host's users whose number of online devices changed since the link last told
    /// the exchange: it sends their counts as they are when it sends them.
    presence_changed: Mutex<std::collections::HashSet<UserId>>,
    presence_ready: Notify,
    /// Relay counters.
    pub stats: RelayStats,
}

impl Network {
    /// The network of host `server` (reachable by clients at `addr`), from what `store` cached.
    pub fn new(server: String, addr: String, store: Store) -> Result<Self, StoreError> {
        let (version, homes) = store.network.cached_directory()?;
        let servers = store
            .network
            .cached_servers()?
            .into_iter()
            .map(|s| (s.id.clone(), ServerInfo { up: false, ..s }))
            .collect();
        let (control, control_rx) = mpsc::unbounded_channel();
        Ok(Self {
            server,
            addr,
            store,
            homes: RwLock::new(homes.into_iter().collect()),
            directory_version: AtomicU64::new(version),
            servers: RwLock::new(servers),
            presence: RwLock::default(),
            up: AtomicBool::new(false),
            outbox_ready: Notify::new(),
            requests: Mutex::default(),
            next_req: AtomicU64::new(1),
            control,
            control_rx: tokio::sync::Mutex::new(control_rx),
            presence_changed: Mutex::default(),
            presence_ready: Notify::new(),
            stats: RelayStats::default(),
        })
    }

    /// This host's server id.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Whether the link to the exchange is up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The home server of `user` as the directory says, if it knows the user.
    pub fn home_of(&self, user: &UserId) -> Option<String> {
        read(&self.homes).get(user).cloned()
    }

    /// How many users the cached directory holds.
    pub fn directory_len(&self) -> usize {
        read(&self.homes).len()
    }

    /// Server `id`, if the registry has it.
    pub fn server_info(&self, id: &str) -> Option<ServerInfo> {
        read(&self.servers).get(id).cloned()
    }

    /// The registry.
    pub fn servers(&self) -> Vec<ServerInfo> {
        read(&self.servers).values().cloned().collect()
    }

    /// How many devices of `user`, a user of another host, are online (0 if unknown).
    pub fn presence_of(&self, user: &UserId) -> u32 {
        read(&self.presence).get(user).copied().unwrap_or(0)
    }

    /// How many users of other hosts have devices online, as far as this host knows.
    pub fn remote_online(&self) -> usize {
        read(&self.presence).len()
    }

    /// Registration: claims `user` for this host. `Ok(home)`: the user's home afterwards
    /// (this host if the name was free or its own already).
    pub async fn claim(&self, user: &UserId) -> Result<String, NetworkError> {
        match self
            .request(|req| HostFrame::Claim {
                req,
                user: user.clone(),
            })
            .await?
        {
            ExchangeFrame::Claimed { home, .. } => {
                self.learn(&[(user.clone(), home.clone())])?;
                Ok(home)
            }
            other => Err(NetworkError::Unavailable(format!(
                "unexpected answer to a claim: {other:?}"
            ))),
        }
    }

    /// Asks the exchange for the homes of `users` this host does not know, and caches them.
    /// Does nothing while the exchange is out of reach (the users stay unknown).
    pub async fn look_up(&self, users: &[UserId]) -> Result<(), NetworkError> {
        let unknown: Vec<UserId> = {
            let homes = read(&self.homes);
            users
                .iter()
                .filter(|u| !homes.contains_key(*u))
                .cloned()
                .collect()
        };
        if unknown.is_empty() || !self.is_up() {
            return Ok(());
        }
        if let ExchangeFrame::Found { homes, .. } = self
            .request(|req| HostFrame::Lookup {
                req,
                users: unknown,
            })
            .await?
        {
            self.learn(&homes)?;
        }
        Ok(())
    }

    async fn request(
        &self,
        frame: impl FnOnce(u64) -> HostFrame,
    ) -> Result<ExchangeFrame, NetworkError> {
        if !self.is_up() {
            return Err(NetworkError::Unavailable("not connected".into()));
        }
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.requests).insert(req, tx);
        let _ = self.control.send(frame(req));
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, rx).await;
        lock(&self.requests).remove(&req);
        match answer {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(_)) => Err(NetworkError::Unavailable("the link was lost".into())),
            Err(_) => Err(NetworkError::Unavailable(format!(
                "no answer within {REQUEST_TIMEOUT:?}"
            ))),
        }
    }

    fn learn(&self, entries: &[(UserId, String)]) -> Result<(), StoreError> {
        self.store.network.cache_directory(entries, None)?;
        let mut homes = write(&self.homes);
        for (user, server) in entries {
            homes.insert(user.clone(), server.clone());
        }
        Ok(())
    }

    /// Tells the other hosts (through the exchange) that the number of online devices of
    /// `user`, a user of this host, changed. The link sends the number as it is when it sends
    /// it, so that reports of a user's sessions opening and closing at once cannot arrive in
    /// the wrong order. While the exchange is out of reach nothing is sent: every join sends
    /// the presence of every online user.
    pub fn report_presence(&self, user: &UserId) {
        if self.is_up() {
            lock(&self.presence_changed).insert(user.clone());
            self.presence_ready.notify_one();
        }
    }

    /// Puts a message for users of other servers in the relay outbox, once, with their rows
    /// (seed 000's `905`); the link sends it to the exchange.
    pub fn relay(
        &self,
        message: &iim_proto::Message,
        expires_at: Option<u64>,
        rows: Vec<RelayRow>,
    ) -> Result<(), NetworkError> {
        let envelope = Envelope {
            message: message.clone(),
            expires_at,
            rows,
        };
        // An envelope too large for the link would stop the relay for good: refused here, so
        // that the send fails visibly instead.
        let probe = HostFrame::Relay {
            seq: u64::MAX,
            envelope,
        };
        if let Err(e) = encode_frame(&probe, PEER_MAX_FRAME) {
            return Err(NetworkError::TooLarge(e.to_string()));
        }
        let HostFrame::Relay { envelope, .. } = probe else {
            unreachable!("built above");
        };
        self.store.network.relay_push(&envelope)?;
        self.stats.envelopes_out.fetch_add(1, Ordering::Relaxed);
        self.outbox_ready.notify_one();
        Ok(())
    }

    fn set_servers(&self, servers: Vec<ServerInfo>) -> Result<(), StoreError> {
        self.store.network.cache_servers(&servers)?;
        let mut map = write(&self.servers);
        for server in servers {
            map.insert(server.id.clone(), server);
        }
        Ok(())
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(|p| p.into_inner())
}

/// The QUIC client configuration for the exchange: TLS 1.3, ALPN `iim-peer/1`, trusting the
/// configured certificate.
fn client_config(config: &Config) -> anyhow::Result<quinn::ClientConfig> {
    let path = config
        .network
        .exchange_cert
        .as_ref()
        .context("network.exchange_cert is not set")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
    {
        let cert = cert.with_context(|| format!("cannot read {}", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{}: not a usable certificate", path.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(peer_transport()));
    Ok(client)
}

/// QUIC transport settings of the link between a host and the exchange, both sides.
pub fn peer_transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // A host or exchange that is gone (killed, cut off) is noticed within seconds: a host
    // then counts as down and what is for it is held.
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Duration::from_secs(5).try_into().ok());
    transport
}

async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = addr.parse() {
        return Ok(addr);
    }
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))
}

/// Reads and decodes the frames `peer` sends on `recv`, on a task of its own; the first error
/// ends them. With a `gate`, the first frame may be at most [`JOIN_MAX_FRAME`] bytes and
/// nothing more is read until the gate opens (the peer is known): a connection that has not
/// joined makes the reader hold one small frame, no more. The frames are queued without
/// bound otherwise, so that neither side's loop can block the other's writes (relays are
/// bounded by the window).
fn read_frames<F: serde::de::DeserializeOwned + Send + 'static>(
    mut recv: quinn::RecvStream,
    peer: &'static str,
    mut gate: Option<oneshot::Receiver<()>>,
) -> mpsc::UnboundedReceiver<Result<F, String>> {
    let (tx, frames) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let first_max = if gate.is_some() {
            JOIN_MAX_FRAME
        } else {
            PEER_MAX_FRAME
        };
        let mut decoder = FrameDecoder::new(first_max);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            loop {
                match decoder.decode::<F>() {
                    Ok(Some(frame)) => {
                        if tx.send(Ok(frame)).is_err() {
                            return;
                        }
                        if let Some(gate) = gate.take() {
                            if gate.await.is_err() {
                                return;
                            }
                            decoder.set_max(PEER_MAX_FRAME);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(format!("bad frame from {peer}: {e}")));
                        return;
                    }
                }
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.push(&buf[..n]),
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(format!("link lost: {e}")));
                    return;
                }
            }
        }
    });
    frames
}

/// One end of the link between a host and the exchange: the connection, its stream to write
/// frames to, and the frames the other side sent (`In`).
pub(crate) struct PeerStream<In> {
    pub(crate) conn: quinn::Connection,
    pub(crate) send: quinn::SendStream,
    frames: mpsc::UnboundedReceiver<Result<In, String>>,
    peer: &'static str,
}

impl<In: serde::de::DeserializeOwned + Send + 'static> PeerStream<In> {
    /// The stream of `conn` to and from `peer` (for messages); see [`read_frames`] for `gate`.
    pub(crate) fn new(
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        peer: &'static str,
        gate: Option<oneshot::Receiver<()>>,
    ) -> Self {
        Self {
            conn,
            send,
            frames: read_frames(recv, peer, gate),
            peer,
        }
    }

    /// Writes one frame.
    pub(crate) async fn write(&mut self, frame: &impl serde::Serialize) -> anyhow::Result<()> {
        let bytes = encode_frame(frame, PEER_MAX_FRAME)?;
        self.send.write_all(&bytes).await?;
        Ok(())
    }

    /// The next frame the other side sent.
    pub(crate) async fn next(&mut self) -> anyhow::Result<In> {
        match self.frames.recv().await {
            Some(Ok(frame)) => Ok(frame),
            Some(Err(e)) => anyhow::bail!("{e}"),
            None => anyhow::bail!("{} closed the link", self.peer),
        }
    }
}

/// A host's end of its link to the exchange.
type Link = PeerStream<ExchangeFrame>;

/// The exchange refused the join.
#[derive(Debug, thiserror::Error)]
#[error("the exchange refused this host: {message} ({code})")]
struct JoinRefused {
    code: iim_proto::ErrorCode,
    message: String,
}

impl JoinRefused {
    /// Whether trying again cannot help: the secret, the credential, the version or the
    /// server id is wrong, which only the operator can fix.
    fn is_final(&self) -> bool {
        use iim_proto::ErrorCode;
        [
            ErrorCode::AUTH_FAILED,
            ErrorCode::UNSUPPORTED_VERSION,
            ErrorCode::INVALID_ARGUMENT,
            ErrorCode::HANDSHAKE,
        ]
        .contains(&self.code)
    }
}

/// What the exchange's `Joined` said.
struct Joined {
    number: u16,
    servers: Vec<ServerInfo>,
    relayed_out: u64,
}

/// Connects to the exchange and joins: the link, and the exchange's `Joined`.
async fn join(config: &Config, network: &Network) -> anyhow::Result<(Link, Joined)> {
    let exchange = config
        .network
        .exchange
        .as_deref()
        .context("network.exchange is not set")?;
    let addr = resolve(exchange).await?;
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(client_config(config)?);
    let conn = endpoint
        .connect(addr, config.network.exchange_name())?
        .await
        .with_context(|| format!("cannot connect to the exchange at {exchange}"))?;
    let (send, recv) = conn.open_bi().await?;
    let mut link = Link::new(conn, send, recv, "the exchange", None);
    // What this host says it has must be durable: the exchange drops what it acknowledges.
    let relayed_in = network.store.network.relayed_in()?;
    network.store.flush().await?;
    link.write(&HostFrame::Join {
        version: PEER_VERSION,
        server: network.server.clone(),
        addr: network.addr.clone(),
        secret: config.network.secret.clone().unwrap_or_default(),
        credential: network.store.network.host_credential()?,
        directory_since: network.directory_version.load(Ordering::Relaxed),
        relayed_in,
    })
    .await?;
    match link.next().await? {
        ExchangeFrame::Joined {
            number,
            servers,
            relayed_out,
        } => Ok((
            link,
            Joined {
                number,
                servers,
                relayed_out,
            },
        )),
        ExchangeFrame::Error { code, message } => Err(JoinRefused { code, message }.into()),
        other => anyhow::bail!("the exchange answered the join with {other:?}"),
    }
}

/// Before a host that never joined its network serves anyone: joins once to learn its number,
/// the high bits of its message ids, and records it. Tries until the exchange answers.
pub async fn first_join(config: &Config, network: &Network) -> anyhow::Result<u16> {
    // This host's credential, made and kept before the exchange ever sees it: a crash at any
    // moment of the first join leaves the host able to show it again.
    if network.store.network.host_credential()?.is_empty() {
        let credential: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        network.store.network.set_host_credential(&credential)?;
        network.store.flush().await?;
    }
    let mut backoff = Backoff::new(REJOIN_FIRST, REJOIN_MAX);
    loop {
        match tokio::time::timeout(JOIN_TIMEOUT, join(config, network)).await {
            Ok(Ok((
                mut link,
                Joined {
                    number, servers, ..
                },
            ))) => {
                network.set_servers(servers)?;
                if let Err(e) = claim_existing_users(&mut link, network).await {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "claiming this host's users failed; joining again"
                    );
                    link.conn.close(0u32.into(), b"");
                    tokio::time::sleep(backoff.next_wait()).await;
                    continue;
                }
                network.store.network.set_host_number(number)?;
                network.store.flush().await?;
                link.conn.close(0u32.into(), b"joined");
                return Ok(number);
            }
            Ok(Err(e)) => {
                if e.downcast_ref::<JoinRefused>()
                    .is_some_and(JoinRefused::is_final)
                {
                    return Err(e.context("cannot join the network"));
                }
                tracing::warn!(
                    error = format!("{e:#}"),
                    "waiting for the exchange to give this host its number"
                )
            }
            Err(_) => tracing::warn!("waiting for the exchange to give this host its number"),
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

/// A host that served users alone before it joined: claims each of its users in the
/// network's directory, so that the other hosts find them. A name another host claimed first
/// stays that host's, here too: this host's user of that name is no longer reachable (logged
/// as an error for the operator, who must rename one of them).
async fn claim_existing_users(link: &mut Link, network: &Network) -> anyhow::Result<()> {
    let users = network.store.accounts.names()?;
    if users.is_empty() {
        return Ok(());
    }
    for (req, user) in users.iter().enumerate() {
        link.write(&HostFrame::Claim {
            req: req as u64,
            user: user.clone(),
        })
        .await?;
    }
    let mut answered = 0;
    while answered < users.len() {
        let frame = tokio::time::timeout(JOIN_TIMEOUT, link.next())
            .await
            .context("the exchange did not answer the claims in time")??;
        // Directory and presence news are sent again at the next join.
        let ExchangeFrame::Claimed { req, home } = frame else {
            continue;
        };
        answered += 1;
        let Some(user) = users.get(req as usize) else {
            continue;
        };
        if home == network.server {
            network.learn(&[(user.clone(), home)])?;
        } else {
            tracing::error!(%user, %home, "this host's user has a name another host of the network registered first: the name is that host's user now (messages to it go there, logging in is redirected there)");
        }
    }
    tracing::info!(
        users = users.len(),
        "claimed the users this host had before it joined"
    );
    Ok(())
}

/// Keeps the link to the exchange until the host shuts down.
pub async fn run(host: Arc<Host>, network: Arc<Network>) {
    let mut shutdown = host.shutdown.clone();
    let mut backoff = Backoff::new(REJOIN_FIRST, REJOIN_MAX);
    loop {
        let result = tokio::select! {
            r = serve(&host, &network) => r,
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        };
        let was_up = network.up.swap(false, Ordering::Relaxed);
        write(&network.presence).clear();
        for server in write(&network.servers).values_mut() {
            server.up = false;
        }
        match result {
            Ok(()) => return,
            Err(e) => {
                if was_up {
                    backoff.reset();
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "link to the exchange lost; joining again"
                    );
                } else {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "cannot join the exchange; trying again"
                    );
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_wait()) => {}
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
    }
}

/// One link's life: join, then relay both ways until it fails.
async fn serve(host: &Arc<Host>, network: &Network) -> anyhow::Result<()> {
    let (mut link, joined) = tokio::time::timeout(JOIN_TIMEOUT, join(&host.config, network))
        .await
        .context("joining took too long")??;
    let Joined {
        number,
        servers,
        relayed_out,
    } = joined;
    if network.store.network.host_number()? != Some(number) {
        anyhow::bail!(
            "the exchange numbers this host {number}, but its store says {:?}: is another host \
             using server id {}?",
            network.store.network.host_number()?,
            network.server
        );
    }
    network.set_servers(servers)?;
    network.store.network.relay_acked(relayed_out)?;
    let mut control = network.control_rx.lock().await;
    // Whatever was queued for an earlier link is stale: requests time out, presence is sent
    // again below.
    while control.try_recv().is_ok() {}
    network.up.store(true, Ordering::Relaxed);
    tracing::info!(number, "joined the network");
    lock(&network.presence_changed).clear();
    for entries in host.registry.online_counts().chunks(1000) {
        link.write(&HostFrame::Presence {
            entries: entries.to_vec(),
        })
        .await?;
    }
    // The hop's state: what the exchange holds of this host's outbox, and what this host
    // holds of what the exchange sent it.
    let mut relay = RelayLink::joined(relayed_out, network.store.network.relayed_in()?);
    pump(&mut link, network, &mut relay).await?;
    loop {
        let idle_ack = relay.poll_ack(true).is_some();
        tokio::select! {
            biased;
            // Claims and look-ups first: a session waits for each.
            Some(frame) = control.recv() => link.write(&frame).await?,
            frame = link.next() => match frame? {
                ExchangeFrame::Relay { seq, envelope } => {
                    if relay.on_envelope(seq) == Incoming::Apply {
                        let delivered = host.iim.deliver_relayed(&envelope)?;
                        network.store.network.set_relayed_in(seq)?;
                        network.stats.envelopes_in.fetch_add(1, Ordering::Relaxed);
                        network.stats.relayed_deliveries.fetch_add(delivered as u64, Ordering::Relaxed);
                    }
                    // Acknowledged once durable, once half a window waits.
                    acknowledge(&mut link, host, &mut relay, false).await?;
                }
                ExchangeFrame::Ack { seq } => {
                    let before = relay.acked();
                    if let Some(seq) = relay.on_ack(seq)? {
                        network.stats.envelopes_acked.fetch_add(seq - before, Ordering::Relaxed);
                        network.store.network.relay_acked(seq)?;
                    }
                    pump(&mut link, network, &mut relay).await?;
                }
                ExchangeFrame::Directory { version, entries } => {
                    network.store.network.cache_directory(&entries, Some(version))?;
                    let mut homes = write(&network.homes);
                    for (user, server) in entries {
                        homes.insert(user, server);
                    }
                    network.directory_version.fetch_max(version, Ordering::Relaxed);
                }
                ExchangeFrame::Servers { servers } => network.set_servers(servers)?,
                ExchangeFrame::Presence { entries } => {
                    let mut presence = write(&network.presence);
                    for (user, devices) in entries {
                        if devices == 0 {
                            presence.remove(&user);
                        } else {
                            presence.insert(user, devices);
                        }
                    }
                }
                answer @ (ExchangeFrame::Claimed { .. } | ExchangeFrame::Found { .. }) => {
                    let req = match &answer {
                        ExchangeFrame::Claimed { req, .. } | ExchangeFrame::Found { req, .. } => *req,
                        _ => 0,
                    };
                    if let Some(waiter) = lock(&network.requests).remove(&req) {
                        let _ = waiter.send(answer);
                    }
                }
                ExchangeFrame::Error { code, message } => {
                    anyhow::bail!("the exchange ended the link: {message} ({code})")
                }
                ExchangeFrame::Joined { .. } => anyhow::bail!("the exchange sent Joined twice"),
            },
            () = network.presence_ready.notified() => {
                let users: Vec<UserId> = lock(&network.presence_changed).drain().collect();
                let entries: Vec<(UserId, u32)> = users
                    .into_iter()
                    .map(|user| {
                        let devices = host.registry.online(&user).len() as u32;
                        (user, devices)
                    })
                    .collect();
                for entries in entries.chunks(1000) {
                    link.write(&HostFrame::Presence { entries: entries.to_vec() }).await?;
                }
            }
            () = network.outbox_ready.notified() => {
                pump(&mut link, network, &mut relay).await?;
            }
            // Nothing else to do: what was applied is made durable, then acknowledged, once
            // for every envelope read together.
            () = std::future::ready(()), if idle_ack => {
                acknowledge(&mut link, host, &mut relay, true).await?;
            }
        }
    }
}

/// Sends the acknowledgement the link asks for, if it asks (`idle`: whatever waits), once
/// what it covers is durable.
async fn acknowledge(
    link: &mut Link,
    host: &Host,
    relay: &mut RelayLink,
    idle: bool,
) -> anyhow::Result<()> {
    let Some(seq) = relay.poll_ack(idle) else {
        return Ok(());
    };
    host.store.flush().await?;
    link.write(&HostFrame::Ack { seq }).await?;
    relay.on_ack_sent(seq);
    Ok(())
}

/// Sends outbox entries after what was sent, as far as the link's window allows.
async fn pump(link: &mut Link, network: &Network, relay: &mut RelayLink) -> anyhow::Result<()> {
    loop {
        let room = relay.room();
        if room == 0 {
            return Ok(());
        }
        let entries = network.store.network.relay_outbox(relay.sent(), room)?;
        if entries.is_empty() {
            return Ok(());
        }
        // Only what is durable leaves: the exchange must never hold a number this host could
        // lose in a crash and hand out again.
        network.store.flush().await?;
        for (seq, envelope) in entries {
            link.write(&HostFrame::Relay { seq, envelope }).await?;
            network.stats.envelopes_sent.fetch_add(1, Ordering::Relaxed);
            relay.on_sent(seq);
        }
    }
}

/// The address this host gives for its users: `network.advertise`, or the bound address.
pub fn advertised(config: &Config, bound: SocketAddr) -> String {
    config
        .network
        .advertise
        .clone()
        .unwrap_or_else(|| bound.to_string())
}

/// The rows of `users` (users of other servers) grouped by home server, in first-seen order.
pub fn rows_by_server(users: impl IntoIterator<Item = (UserId, String)>) -> Vec<RelayRow> {
    let mut rows: Vec<RelayRow> = Vec::new();
    for (user, server) in users {
        match rows.iter_mut().find(|r| r.server == server) {
            Some(row) => row.users.push(user),
            None => rows.push(RelayRow {
                server,
                users: vec![user],
            }),
        }
    }
    rows
}
