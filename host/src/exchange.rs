//! The exchange role of `iim-host` (DESIGN.md §1–3): the hub of a network of hosts.
//!
//! Hosts join it over QUIC (ALPN `iim-peer/1`, one stream each, frames of
//! [`iim_proto::peer`]) with the network's secret. It keeps, in its own store
//! ([`ExchangeStore`]): the registry of servers (id, number, address, up or down), the user
//! directory (user → home server, claimed at registration, released when the account is
//! deleted) and one relay outbox per host. It serves the registry and the directory to every
//! host, which cache them; and it relays: a `905` from a host is stored as one `906` per
//! target host, acknowledged once durable, and sent to each target as soon as it is
//! connected, in order, until the target acknowledges it. A host that goes away is marked
//! down; what is for it waits in its outbox.

use crate::clock::now_ms;
use crate::config::Config;
use crate::peer::{self, PeerError, PeerStream};
use crate::server::ServerError;
use crate::store::StoreError;
use crate::store::exchange::{ExchangeStore, Joining};
use iim_proto::peer::{
    Envelope, ExchangeFrame, FilePart, HostFrame, PEER_ALPN, PEER_VERSION, ServerInfo,
};
use iim_proto::relay::{AckBeyondSent, Incoming, RelayLink};
use iim_proto::{Address, ErrorCode, UserId};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, broadcast, mpsc, watch};

/// Directory entries per frame when a host catches up.
const DIRECTORY_CHUNK: usize = 1000;
/// How long a new connection has to open its stream, and then to join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the link of one host ended.
#[derive(Debug, thiserror::Error)]
enum HostLinkError {
    /// The host did not open its stream or join in time.
    #[error("{0} took too long")]
    Timeout(&'static str),
    /// The connection failed.
    #[error("the connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The link's stream failed.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// The join was refused.
    #[error("join refused: {0}")]
    Refused(String),
    /// The host broke the protocol.
    #[error("the host broke the protocol: {0}")]
    Protocol(String),
    /// The host acknowledged envelopes this exchange never sent it.
    #[error(transparent)]
    Acknowledged(#[from] AckBeyondSent),
    /// A new link of the same host took over.
    #[error("replaced by a new link of {0}")]
    Replaced(String),
    /// The host fell too far behind the notices to all hosts: it joins again to catch up.
    #[error("the host fell {0} notices behind; it joins again to catch up")]
    Lagged(u64),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Something every connected host (but one, perhaps) is told.
#[derive(Debug)]
struct Broadcast {
    /// The host not to tell (the one it came from).
    except: Option<String>,
    frame: ExchangeFrame,
}

/// The connection of one host.
struct Link {
    id: u64,
    outbox_ready: Arc<Notify>,
    replaced: Arc<Notify>,
    /// Frames for this host alone: file requests and parts between two hosts. Bounded by
    /// the asking hosts, which wait for each part before they ask for the next.
    direct: mpsc::UnboundedSender<ExchangeFrame>,
}

/// Relay counters since the exchange started.
#[derive(Debug, Default)]
struct Stats {
    envelopes_in: AtomicU64,
    envelopes_out: AtomicU64,
    envelopes_acked: AtomicU64,
}

struct State {
    store: ExchangeStore,
    secret: String,
    links: Mutex<HashMap<String, Link>>,
    next_link: AtomicU64,
    events: broadcast::Sender<Arc<Broadcast>>,
    /// Per host, its users with devices online and how many.
    presence: Mutex<HashMap<String, HashMap<UserId, u32>>>,
    stats: Stats,
    shutdown: watch::Receiver<bool>,
    /// Held from a claim's or a release's numbering to its broadcast, so that hosts hear of
    /// directory versions in order.
    claims: tokio::sync::Mutex<()>,
    /// Data key rotations (`admin rotate-key`) and their re-encryption.
    key_rotation: crate::key_rotation::KeyRotation,
    /// Permits for connections that have not joined yet.
    joining: Arc<tokio::sync::Semaphore>,
}

/// Connections that have not joined yet, at most.
const MAX_JOINING: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    fn tell(&self, except: Option<&str>, frame: ExchangeFrame) {
        let _ = self.events.send(Arc::new(Broadcast {
            except: except.map(str::to_owned),
            frame,
        }));
    }

    fn tell_servers(&self) {
        match self.store.servers() {
            Ok(servers) => self.tell(None, ExchangeFrame::Servers { servers }),
            Err(e) => tracing::error!(error = %e, "cannot read the registry"),
        }
    }

    /// Every user of `server` counts as offline: the other hosts are told.
    fn forget_presence(&self, server: &str) {
        let gone: Vec<(UserId, u32)> = lock(&self.presence)
            .remove(server)
            .unwrap_or_default()
            .into_keys()
            .map(|user| (user, 0))
            .collect();
        for entries in gone.chunks(DIRECTORY_CHUNK) {
            self.tell(
                Some(server),
                ExchangeFrame::Presence {
                    entries: entries.to_vec(),
                },
            );
        }
    }

    fn notify(&self, target: &str) {
        if let Some(link) = lock(&self.links).get(target) {
            link.outbox_ready.notify_one();
        }
    }

    /// Hands `frame` to host `target`'s link; `false` if it is not connected.
    fn send_to(&self, target: &str, frame: ExchangeFrame) -> bool {
        lock(&self.links)
            .get(target)
            .is_some_and(|link| link.direct.send(frame).is_ok())
    }
}

/// An exchange that is listening.
pub struct Exchange {
    state: Arc<State>,
    endpoint: quinn::Endpoint,
    stop: watch::Sender<bool>,
    cert_path: std::path::PathBuf,
    data_dir: std::path::PathBuf,
    metrics: Option<crate::metrics::Endpoint>,
}

/// What the metrics endpoint reads of the exchange at each scrape: each host's relay outbox.
struct Observed(Arc<State>);

impl crate::metrics::Observed for Observed {
    fn refresh(&self, metrics: &crate::metrics::Metrics) {
        let Ok(servers) = self.0.store.servers() else {
            return;
        };
        for server in servers {
            let waiting = self.0.store.outbox_len(&server.id);
            metrics
                .relay_waiting
                .get_or_create(&crate::metrics::label("peer", server.id))
                .set(i64::try_from(waiting).unwrap_or(i64::MAX));
        }
    }

    fn readiness(&self) -> Result<(), String> {
        crate::metrics::until_shutdown(&self.0.shutdown)
    }
}

impl Exchange {
    /// Opens the exchange's store and certificate, and binds.
    pub async fn start(config: Config) -> Result<Self, ServerError> {
        let (server_config, cert_path) =
            crate::server::prepare(&config, PEER_ALPN, peer::transport())?;
        let store_path = config.data_dir.join("exchange");
        let store =
            crate::store::sealer_for(&store_path, &config.key_file(), config.storage.encrypt)
                .and_then(|sealer| ExchangeStore::open_with(&store_path, sealer))
                .map_err(|source| ServerError::OpenStore {
                    path: store_path.clone(),
                    source,
                })?;
        let socket = crate::server::bind(&config)?;
        let endpoint = crate::server::endpoint(&config, server_config, socket)?;
        let (stop, shutdown) = watch::channel(false);
        let (events, _) = broadcast::channel(16_384);
        let state = Arc::new(State {
            store,
            secret: config.network.secret.clone().unwrap_or_default(),
            links: Mutex::default(),
            next_link: AtomicU64::new(1),
            events,
            presence: Mutex::default(),
            stats: Stats::default(),
            shutdown,
            claims: tokio::sync::Mutex::new(()),
            joining: Arc::new(tokio::sync::Semaphore::new(MAX_JOINING)),
            key_rotation: Default::default(),
        });
        let metrics = match config.metrics.listen {
            Some(addr) => {
                let observed = Arc::new(Observed(Arc::clone(&state)));
                Some(crate::metrics::Endpoint::start(addr, observed).await?)
            }
            None => None,
        };
        Ok(Self {
            state,
            endpoint,
            stop,
            cert_path,
            data_dir: config.data_dir,
            metrics,
        })
    }

    /// Where the metrics endpoint listens, if it does.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(crate::metrics::Endpoint::addr)
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        self.endpoint.local_addr().map_err(ServerError::LocalAddr)
    }

    /// The certificate hosts should trust (`network.exchange_cert`).
    pub fn cert_path(&self) -> &std::path::Path {
        &self.cert_path
    }

    /// Serves hosts until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> Result<(), ServerError> {
        if let Some(keys) = self.state.store.sealer.keys() {
            let in_use = self.state.store.keys_in_use()?;
            if in_use.iter().any(|&id| id != keys.current()) {
                tracing::info!(
                    ?in_use,
                    current = keys.current(),
                    "a key rotation did not finish: re-encrypting in the background"
                );
                self.state.key_rotation.resume(&self.state.store);
            }
        }
        let state = Arc::clone(&self.state);
        let commands: crate::admin::Commands = Arc::new(move |command| {
            let state = Arc::clone(&state);
            Box::pin(async move { answer(&state, &command) })
        });
        let admin =
            crate::admin::serve_socket(&self.data_dir, self.state.shutdown.clone(), commands)
                .map_err(ServerError::Admin)?;
        let mut links = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        if let Some(metrics) = &self.metrics {
            metrics.serving(true);
        }
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    // Connections that have not joined yet are few: anyone may open one.
                    let Ok(permit) = Arc::clone(&self.state.joining).try_acquire_owned() else {
                        tracing::warn!(remote = %incoming.remote_address(), "connection refused: too many joins under way");
                        incoming.refuse();
                        continue;
                    };
                    let state = Arc::clone(&self.state);
                    links.spawn(async move {
                        let remote = incoming.remote_address();
                        let conn = match incoming.await {
                            Ok(conn) => conn,
                            Err(e) => return tracing::debug!(%remote, error = %e, "handshake failed"),
                        };
                        if let Err(e) = serve(&state, conn.clone(), permit).await {
                            tracing::info!(%remote, error = %e, "host link ended");
                        }
                        // On every path: a connection that never joined must not linger.
                        conn.close(0u32.into(), b"");
                    });
                }
                Some(joined) = links.join_next(), if !links.is_empty() => {
                    if let Err(e) = joined {
                        tracing::error!(error = %e, "a host link task failed");
                    }
                }
                () = &mut stop => break,
            }
        }
        tracing::info!("shutting down");
        if let Some(metrics) = &self.metrics {
            metrics.serving(false);
        }
        let _ = self.stop.send(true);
        let _ = admin.await;
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while links.join_next().await.is_some() {}
        })
        .await;
        links.abort_all();
        self.endpoint.close(
            quinn::VarInt::from_u32(ErrorCode::SHUTTING_DOWN.0.into()),
            b"shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        self.state.store.flush().await?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The exchange's admin commands: `network` shows the registry, the directory's size and
/// each host's relay outbox; `rotate-key` and `key-status` as a host's.
fn answer(state: &State, command: &str) -> String {
    match command {
        "rotate-key" => match state.key_rotation.rotate(&state.store) {
            Ok(reply) => reply,
            Err(e) => format!("error: {e}\n"),
        },
        "key-status" => state.key_rotation.status(&state.store),
        "network" => {
            let mut out = String::new();
            let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
            let _ = writeln!(out, "role exchange");
            let _ = writeln!(
                out,
                "directory_version {}",
                state.store.directory_version().unwrap_or(0)
            );
            let _ = writeln!(out, "envelopes_in {}", load(&state.stats.envelopes_in));
            let _ = writeln!(out, "envelopes_out {}", load(&state.stats.envelopes_out));
            let _ = writeln!(
                out,
                "envelopes_acked {}",
                load(&state.stats.envelopes_acked)
            );
            match state.store.servers() {
                Ok(servers) => {
                    for s in servers {
                        let _ = writeln!(
                            out,
                            "host {} number {} addr {} {} waiting {}",
                            s.id,
                            s.number,
                            s.addr,
                            if s.up { "up" } else { "down" },
                            state.store.outbox_len(&s.id)
                        );
                    }
                }
                Err(e) => {
                    let _ = writeln!(out, "error: cannot read the registry: {e}");
                }
            }
            out
        }
        other => format!(
            "error: unknown command {other:?}; the exchange knows network, rotate-key and \
             key-status\n"
        ),
    }
}

/// The exchange's end of one host's link.
type Peer = PeerStream<HostFrame>;

impl Peer {
    /// Refuses the join: says why, and ends.
    async fn refuse(mut self, code: ErrorCode, message: String) -> Result<(), HostLinkError> {
        tracing::warn!(%code, %message, "join refused");
        let _ = self
            .write(&ExchangeFrame::Error {
                code,
                message: message.clone(),
            })
            .await;
        let _ = self.send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.send.stopped()).await;
        Err(HostLinkError::Refused(message))
    }
}

/// Compares two secrets in a time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// One host's link: the join, then relay both ways until it ends.
async fn serve(
    state: &Arc<State>,
    conn: quinn::Connection,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), HostLinkError> {
    let (send, recv) = tokio::time::timeout(JOIN_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| HostLinkError::Timeout("opening a stream"))??;
    // Only the join is read before the host is known: small, and nothing after it.
    let (go, gate) = tokio::sync::oneshot::channel();
    let mut peer = Peer::new(conn.clone(), send, recv, "the host", Some(gate));
    let first = tokio::time::timeout(JOIN_TIMEOUT, peer.next())
        .await
        .map_err(|_| HostLinkError::Timeout("joining"))??;
    let HostFrame::Join {
        version,
        server,
        addr,
        secret,
        credential,
        directory_since,
        relayed_in,
    } = first
    else {
        return peer
            .refuse(ErrorCode::HANDSHAKE, "the first frame must be Join".into())
            .await;
    };
    if version != PEER_VERSION {
        return peer
            .refuse(
                ErrorCode::UNSUPPORTED_VERSION,
                format!("this exchange speaks peer protocol {PEER_VERSION}, not {version}"),
            )
            .await;
    }
    if !same_secret(&secret, &state.secret) {
        return peer
            .refuse(ErrorCode::AUTH_FAILED, "wrong network secret".into())
            .await;
    }
    if !crate::config::valid_server_id(&server) || addr.is_empty() || addr.len() > 256 {
        return peer
            .refuse(
                ErrorCode::INVALID_ARGUMENT,
                "a server id is 1 to 64 bytes of a-z 0-9 . _ -, and an address 1 to 256 bytes"
                    .into(),
            )
            .await;
    }
    if credential.len() < 16 || credential.len() > 256 {
        return peer
            .refuse(
                ErrorCode::INVALID_ARGUMENT,
                "a host's credential is 16 to 256 bytes".into(),
            )
            .await;
    }
    let number = match state.store.join(&server, &addr, &credential, now_ms())? {
        Joining::Known(number) | Joining::New(number) => number,
        Joining::WrongCredential => {
            return peer
                .refuse(
                    ErrorCode::AUTH_FAILED,
                    format!(
                        "server id {server} is registered to another host (its credential \
                         differs): is this host's data directory new, or is another host \
                         using this id?"
                    ),
                )
                .await;
        }
    };
    let _ = go.send(());
    drop(permit);
    // Told before this link registers, so that it does not miss what follows.
    let mut events = state.events.subscribe();
    let link_id = state.next_link.fetch_add(1, Ordering::Relaxed);
    let outbox_ready = Arc::new(Notify::new());
    let replaced = Arc::new(Notify::new());
    let (direct, mut direct_rx) = mpsc::unbounded_channel();
    if let Some(old) = lock(&state.links).insert(
        server.clone(),
        Link {
            id: link_id,
            outbox_ready: Arc::clone(&outbox_ready),
            replaced: Arc::clone(&replaced),
            direct,
        },
    ) {
        old.replaced.notify_one();
    }
    // Whoever was online there may be gone: the host tells again who is online now.
    state.forget_presence(&server);
    tracing::info!(%server, number, %addr, "host joined");
    let result = relay(
        state,
        &mut peer,
        Joined {
            server: &server,
            number,
            directory_since,
            relayed_in,
        },
        &mut events,
        &mut direct_rx,
        &outbox_ready,
        &replaced,
    )
    .await;
    // Gone, unless a new link of the same host replaced this one.
    let ours = {
        let mut links = lock(&state.links);
        let ours = links.get(&server).is_some_and(|l| l.id == link_id);
        if ours {
            links.remove(&server);
            // Under the lock, so that a new link of the host cannot join in between.
            if let Err(e) = state.store.leave(&server, now_ms()) {
                tracing::error!(%server, error = %e, "cannot mark the host down");
            }
        }
        ours
    };
    if ours {
        tracing::info!(%server, "host left");
        state.tell_servers();
        state.forget_presence(&server);
    }
    conn.close(0u32.into(), b"");
    result
}

/// Who joined, and where it said it was.
struct Joined<'a> {
    server: &'a str,
    number: u16,
    directory_since: u64,
    relayed_in: u64,
}

/// Whether a `905` from host number `number` is one it may send: a message it numbered
/// itself (or, number 0, before it joined a network). Its sender is not checked: a host also
/// relays messages about other hosts' users' messages in their name (an `expired` receipt
/// goes from the original sender to the original sender).
fn own_message(number: u16, envelope: &Envelope) -> bool {
    let prefix = envelope.message.id.0 >> iim_proto::peer::ID_BITS;
    prefix == 0 || prefix == u64::from(number)
}

/// Whether a `905` from `server` is a member's message to one of its groups, which the
/// group's home passes on to the members with the number the member's host gave it
/// (DESIGN.md §7: the home is the group's sequencer, and every copy has one id).
fn group_home_passes_on(
    store: &ExchangeStore,
    server: &str,
    envelope: &Envelope,
) -> Result<bool, StoreError> {
    let Some(group) = envelope.message.group() else {
        return Ok(false);
    };
    Ok(store.home(&Address::Group(group.clone()))?.as_deref() == Some(server))
}

async fn relay(
    state: &Arc<State>,
    peer: &mut Peer,
    joined: Joined<'_>,
    events: &mut broadcast::Receiver<Arc<Broadcast>>,
    direct: &mut mpsc::UnboundedReceiver<ExchangeFrame>,
    outbox_ready: &Notify,
    replaced: &Notify,
) -> Result<(), HostLinkError> {
    let server = joined.server;
    let servers: Vec<ServerInfo> = state.store.servers()?;
    // What the exchange says it has must be durable: the host drops what it acknowledges.
    let relayed_out = state.store.inbound(server)?;
    state.store.flush().await?;
    peer.write(&ExchangeFrame::Joined {
        number: joined.number,
        servers,
        relayed_out,
    })
    .await?;
    state.tell_servers();
    // The directory entries the host lacks.
    let mut since = joined.directory_since;
    loop {
        // Under the claims lock: a claim is read only once it is durable.
        let (version, entries) = {
            let _claims = state.claims.lock().await;
            state.store.directory_after(since, DIRECTORY_CHUNK)?
        };
        if version == since {
            break;
        }
        peer.write(&ExchangeFrame::Directory { version, entries })
            .await?;
        since = version;
    }
    // Who is online on the other hosts.
    let online: Vec<(UserId, u32)> = lock(&state.presence)
        .iter()
        .filter(|(host, _)| host.as_str() != server)
        .flat_map(|(_, users)| users.iter().map(|(u, d)| (u.clone(), *d)))
        .collect();
    for chunk in online.chunks(DIRECTORY_CHUNK) {
        peer.write(&ExchangeFrame::Presence {
            entries: chunk.to_vec(),
        })
        .await?;
    }
    state.store.outbox_acked(server, joined.relayed_in)?;
    // The hop's state: what the host holds of its outbox here, and what this exchange holds
    // of the host's `905`s.
    let mut link = RelayLink::joined(joined.relayed_in, relayed_out);
    let mut shutdown = state.shutdown.clone();
    pump(state, peer, server, &mut link).await?;
    loop {
        let idle_ack = link.poll_ack(true).is_some();
        tokio::select! {
            biased;
            () = async { let _ = shutdown.wait_for(|stopping| *stopping).await; } => {
                let _ = peer.write(&ExchangeFrame::Error {
                    code: ErrorCode::SHUTTING_DOWN,
                    message: "the exchange is shutting down".into(),
                }).await;
                return Ok(());
            }
            () = replaced.notified() => return Err(HostLinkError::Replaced(server.to_owned())),
            frame = peer.next() => match frame? {
                HostFrame::Relay { seq, envelope } => {
                    if link.on_envelope(seq) == Incoming::Apply {
                        if own_message(joined.number, &envelope)
                            || group_home_passes_on(&state.store, server, &envelope)?
                        {
                            let targets = state.store.relay_in(server, seq, envelope)?;
                            if !targets.is_empty() {
                                state.stats.envelopes_in.fetch_add(1, Ordering::Relaxed);
                            }
                            for target in targets {
                                state.notify(&target);
                            }
                        } else {
                            tracing::error!(%server, seq, id = %envelope.message.id, from = %envelope.message.from, "a relayed message numbered by another host; dropped");
                        }
                    }
                    // Acknowledged once durable, once half a window waits.
                    acknowledge(state, peer, &mut link, false).await?;
                }
                HostFrame::Ack { seq } => {
                    let before = link.acked();
                    if let Some(seq) = link.on_ack(seq)? {
                        state.stats.envelopes_acked.fetch_add(seq - before, Ordering::Relaxed);
                        state.store.outbox_acked(server, seq)?;
                    }
                    pump(state, peer, server, &mut link).await?;
                }
                HostFrame::Claim { req, user } => {
                    // In version order from numbering to broadcast (see `State::claims`).
                    let _claims = state.claims.lock().await;
                    let (home, version) = state.store.claim(&user, server)?;
                    if let Some(version) = version {
                        state.store.flush().await?;
                        tracing::info!(%user, home = %home, version, "user registered");
                        state.tell(None, ExchangeFrame::Directory {
                            version,
                            entries: vec![(user, home.clone())],
                        });
                    }
                    drop(_claims);
                    peer.write(&ExchangeFrame::Claimed { req, home }).await?;
                }
                HostFrame::Release { req, user } => {
                    // Under the claims lock, as a claim: hosts hear of versions in order, and
                    // a host that joins meanwhile reads the release only once it is durable.
                    let _claims = state.claims.lock().await;
                    let (home, version) = state.store.release(&user, server)?;
                    if let Some(version) = version {
                        state.store.flush().await?;
                        tracing::info!(%user, version, "user name released");
                        state.tell(None, ExchangeFrame::Directory {
                            version,
                            entries: vec![(user.into(), String::new())],
                        });
                    } else if let Some(home) = &home {
                        tracing::warn!(%server, %user, %home, "a host asked to release a name of another host; refused");
                    }
                    drop(_claims);
                    peer.write(&ExchangeFrame::Released { req, home }).await?;
                }
                HostFrame::Lookup { req, users } => {
                    // Under the claims lock: a claim is read only once it is durable.
                    let _claims = state.claims.lock().await;
                    let mut homes = Vec::new();
                    for user in users.into_iter().take(iim_proto::MAX_TARGETS) {
                        if let Some(home) = state.store.home(&user)? {
                            homes.push((user, home));
                        }
                    }
                    drop(_claims);
                    peer.write(&ExchangeFrame::Found { req, homes }).await?;
                }
                HostFrame::Presence { entries } => {
                    let mut told = Vec::with_capacity(entries.len());
                    for (user, devices) in entries {
                        // Only its own users: a host cannot speak for another's.
                        if state.store.home(&user.clone().into())?.as_deref() != Some(server) {
                            tracing::warn!(%server, %user, "presence of a user who is not the host's own; ignored");
                            continue;
                        }
                        let mut presence = lock(&state.presence);
                        let users = presence.entry(server.to_owned()).or_default();
                        if devices == 0 {
                            users.remove(&user);
                        } else {
                            users.insert(user.clone(), devices);
                        }
                        told.push((user, devices));
                    }
                    if !told.is_empty() {
                        state.tell(Some(server), ExchangeFrame::Presence { entries: told });
                    }
                }
                HostFrame::FileGet { req, server: from, sha256, offset } => {
                    let asked = state.send_to(&from, ExchangeFrame::FileGet {
                        req,
                        by: server.to_owned(),
                        sha256,
                        offset,
                    });
                    if !asked {
                        peer.write(&ExchangeFrame::FilePart {
                            req,
                            part: FilePart::Refused {
                                code: ErrorCode::UNAVAILABLE,
                                message: format!("host {from} is not connected to the network"),
                            },
                        }).await?;
                    }
                }
                HostFrame::FilePart { req, to, part } => {
                    // An asker that went away meanwhile asks again when it is back.
                    state.send_to(&to, ExchangeFrame::FilePart { req, part });
                }
                HostFrame::Join { .. } => {
                    return Err(HostLinkError::Protocol("Join sent twice".into()));
                }
            },
            Some(frame) = direct.recv() => peer.write(&frame).await?,
            event = events.recv() => match event {
                Ok(event) => {
                    if event.except.as_deref() != Some(server) {
                        peer.write(&event.frame).await?;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Err(HostLinkError::Lagged(n));
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            () = outbox_ready.notified() => pump(state, peer, server, &mut link).await?,
            // Nothing else to do: the `905`s read are made durable and acknowledged, once for
            // all of them.
            () = std::future::ready(()), if idle_ack => {
                acknowledge(state, peer, &mut link, true).await?;
            }
        }
    }
}

/// Sends the acknowledgement the link asks for, if it asks (`idle`: whatever waits), once
/// what it covers is durable.
async fn acknowledge(
    state: &State,
    peer: &mut Peer,
    link: &mut RelayLink,
    idle: bool,
) -> Result<(), HostLinkError> {
    let Some(seq) = link.poll_ack(idle) else {
        return Ok(());
    };
    state.store.flush().await?;
    peer.write(&ExchangeFrame::Ack { seq }).await?;
    link.on_ack_sent(seq);
    Ok(())
}

/// Sends `server`'s outbox after what was sent, as far as the link's window allows.
async fn pump(
    state: &State,
    peer: &mut Peer,
    server: &str,
    link: &mut RelayLink,
) -> Result<(), HostLinkError> {
    loop {
        let room = link.room();
        if room == 0 {
            return Ok(());
        }
        let entries = state.store.outbox(server, link.sent(), room)?;
        if entries.is_empty() {
            return Ok(());
        }
        // Only what is durable leaves: a host must never hold a number this exchange could
        // lose in a crash and hand out again.
        state.store.flush().await?;
        for (seq, envelope) in entries {
            peer.write(&ExchangeFrame::Relay { seq, envelope }).await?;
            state.stats.envelopes_out.fetch_add(1, Ordering::Relaxed);
            link.on_sent(seq);
        }
    }
}
