//! The exchange role of `iim-host` (DESIGN.md §1–3): the hub of a network of hosts.
//!
//! Hosts join it over QUIC (ALPN `iim-peer/1`, one stream each, frames of
//! [`iim_proto::peer`]) with the network's secret. It keeps, in its store ([`ExchangeDb`]:
//! its own sled store, or a PostgreSQL database that other exchanges share): the registry of
//! servers (id, number, address, up or down), the user directory (user → home server,
//! claimed at registration, released when the account is deleted), who is online on each
//! host, and one relay outbox per host. It serves the registry and the directory to every
//! host, which cache them; and it relays: a `905` from a host is stored as one `906` per
//! target host, acknowledged once durable, and sent to each target as soon as it is
//! connected, in order, until the target acknowledges it. A host that goes away is marked
//! down; what is for it waits in its outbox.
//!
//! What it tells its hosts of changes (the registry, the directory, presence, outboxes
//! that grew) it learns from the store's notices ([`Change`]) alone, whichever exchange
//! made the change: one task ([`follow`]) turns them into frames for every host.

use crate::clock::now_ms;
use crate::config::Config;
use crate::peer::{self, PeerError, PeerStream};
use crate::server::ServerError;
use crate::store::StoreError;
use crate::store::exchange::{ExchangeStore, Joining};
use crate::store::exchange_db::{Change, ExchangeDb, Forward};
use crate::store::postgres::{DEFAULT_CONNECTIONS, Durability, PgExchange};
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
/// How often a link that cannot forward to its host yet (another exchange has the right,
/// its link not yet gone) asks again.
const FORWARD_RETRY: Duration = Duration::from_millis(250);
/// How often a forwarder looks at its host's outbox without being told of new rows.
const OUTBOX_RECHECK: Duration = Duration::from_secs(2);
/// How often the registry is read again and told to every link, which passes it on if its
/// host's view differs: of hosts whose exchange died no notice tells, and a link's first view
/// may be one no notice was read for.
const REGISTRY_POLL: Duration = Duration::from_secs(2);

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
    store: ExchangeDb,
    secret: String,
    links: Mutex<HashMap<String, Link>>,
    next_link: AtomicU64,
    events: broadcast::Sender<Arc<Broadcast>>,
    /// Per host, its users with devices online and how many, as the store told
    /// ([`follow`] keeps it).
    presence: Mutex<HashMap<String, HashMap<UserId, u32>>>,
    stats: Stats,
    shutdown: watch::Receiver<bool>,
    /// Held from a host's row in the registry to its link's entry in `links` (a join), and
    /// from the entry's removal to the row (a leave): a host that joins again as its old
    /// link ends is not marked down.
    membership: tokio::sync::Mutex<()>,
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

    /// Tells every host the registry as the store has it now. Each link passes it on only if
    /// it differs from what that link last told its host ([`relay`]): a link's first view is
    /// read when it joins, which may fall between two reads of this one (a host's lock taken
    /// or let go meanwhile), so what one host was told is not what another was.
    async fn tell_servers(&self) {
        match self.store.servers().await {
            Ok(servers) => self.tell(None, ExchangeFrame::Servers { servers }),
            Err(e) => tracing::error!(error = %e, "cannot read the registry"),
        }
    }

    /// Tells the other hosts that these users of `server` have this many devices online now.
    fn tell_presence(&self, server: &str, entries: Vec<(UserId, u32)>) {
        for entries in entries.chunks(DIRECTORY_CHUNK) {
            self.tell(
                Some(server),
                ExchangeFrame::Presence {
                    entries: entries.to_vec(),
                },
            );
        }
    }

    /// Takes the presence the store told of into the view, and tells the other hosts.
    fn presence_changed(&self, server: &str, entries: Vec<(UserId, u32)>) {
        crate::store::exchange_db::set_presence(
            lock(&self.presence).entry(server.to_owned()).or_default(),
            &entries,
        );
        self.tell_presence(server, entries);
    }

    /// Every user of `server` counts as offline: the other hosts are told.
    fn presence_gone(&self, server: &str) {
        let gone: Vec<(UserId, u32)> = lock(&self.presence)
            .remove(server)
            .unwrap_or_default()
            .into_keys()
            .map(|user| (user, 0))
            .collect();
        self.tell_presence(server, gone);
    }

    /// Reads presence from the store again, and tells the other hosts what differs from
    /// the view.
    async fn presence_again(&self) -> Result<(), StoreError> {
        let now = self.store.presence().await?;
        let mut told: Vec<(String, Vec<(UserId, u32)>)> = Vec::new();
        {
            let mut view = lock(&self.presence);
            for (server, users) in view.iter() {
                let gone: Vec<(UserId, u32)> = users
                    .keys()
                    .filter(|user| !now.get(server).is_some_and(|n| n.contains_key(*user)))
                    .map(|user| (user.clone(), 0))
                    .collect();
                told.push((server.clone(), gone));
            }
            for (server, users) in &now {
                let seen = view.get(server);
                let changed: Vec<(UserId, u32)> = users
                    .iter()
                    .filter(|(user, n)| seen.and_then(|s| s.get(*user)) != Some(*n))
                    .map(|(user, n)| (user.clone(), *n))
                    .collect();
                told.push((server.clone(), changed));
            }
            *view = now;
        }
        for (server, entries) in told {
            self.tell_presence(&server, entries);
        }
        Ok(())
    }

    /// Wakes the link of every host, to look at its outbox again.
    fn notify_all(&self) {
        for link in lock(&self.links).values() {
            link.outbox_ready.notify_one();
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
    metrics: Option<crate::metrics::Endpoint>,
    /// Tells hosts of the store's changes (`follow`).
    follower: tokio::task::JoinHandle<()>,
    /// Serves the admin socket.
    admin: tokio::task::JoinHandle<()>,
}

/// What the metrics endpoint reads of the exchange at each scrape: each host's relay outbox.
struct Observed(Arc<State>);

impl crate::metrics::Observed for Observed {
    fn refresh<'a>(
        &'a self,
        metrics: &'a crate::metrics::Metrics,
    ) -> crate::metrics::Refreshing<'a> {
        Box::pin(async move {
            let store = &self.0.store;
            let Ok(servers) = store.servers().await else {
                return;
            };
            for server in servers {
                let Ok(waiting) = store.outbox_len(&server.id).await else {
                    return;
                };
                metrics
                    .relay_waiting
                    .get_or_create(&crate::metrics::label("peer", server.id))
                    .set(i64::try_from(waiting).unwrap_or(i64::MAX));
            }
        })
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
        let socket = crate::server::bind(&config)?;
        let name = socket
            .local_addr()
            .map_err(ServerError::LocalAddr)?
            .to_string();
        let store = open_store(&config, &name).await?;
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
            joining: Arc::new(tokio::sync::Semaphore::new(MAX_JOINING)),
            membership: tokio::sync::Mutex::new(()),
            key_rotation: Default::default(),
        });
        let metrics = match config.metrics.listen {
            Some(addr) => {
                let observed = Arc::new(Observed(Arc::clone(&state)));
                Some(crate::metrics::Endpoint::start(addr, observed).await?)
            }
            None => None,
        };
        // Listening to the store's notices before any host joins, none is missed. The admin
        // socket is served before `start` returns, so that it answers as soon as the exchange
        // says it listens.
        let changes = state.store.changes();
        state.presence_again().await?;
        let told = state.store.directory_version().await?;
        let follower = tokio::spawn(follow(Arc::clone(&state), changes, told));
        let commands: crate::admin::Commands = Arc::new({
            let state = Arc::clone(&state);
            move |command| {
                let state = Arc::clone(&state);
                Box::pin(async move { answer(&state, &command).await })
            }
        });
        let admin = crate::admin::serve_socket(&config.data_dir, state.shutdown.clone(), commands)
            .map_err(ServerError::Admin)?;
        Ok(Self {
            state,
            endpoint,
            stop,
            cert_path,
            metrics,
            follower,
            admin,
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
        if let Some(store) = self.state.store.sled_store()
            && let Some(keys) = store.sealer.keys()
        {
            let in_use = store.keys_in_use()?;
            if in_use.iter().any(|&id| id != keys.current()) {
                tracing::info!(
                    ?in_use,
                    current = keys.current(),
                    "a key rotation did not finish: re-encrypting in the background"
                );
                self.state.key_rotation.resume(store);
            }
        }
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
        let _ = self.admin.await;
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
        self.follower.abort();
        self.state.store.flush().await?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The exchange's admin commands: `network` shows the registry, the directory's size and
/// each host's relay outbox; `rotate-key` and `key-status` as a host's.
async fn answer(state: &State, command: &str) -> String {
    let sled = state.store.sled_store();
    match command {
        "rotate-key" | "key-status" if sled.is_none() => format!(
            "error: {command}: this exchange's relayed messages are in PostgreSQL, sealed with \
             the data key every exchange of the database shares; rotating it is not supported \
             yet (docs/network.md)\n"
        ),
        "rotate-key" => match sled.map(|store| state.key_rotation.rotate(store)) {
            Some(Ok(reply)) => reply,
            Some(Err(e)) => format!("error: {e}\n"),
            None => unreachable!("answered above"),
        },
        "key-status" => sled.map_or_else(String::new, |store| state.key_rotation.status(store)),
        "network" => {
            let mut out = String::new();
            let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
            let _ = writeln!(out, "role exchange");
            let _ = writeln!(
                out,
                "directory_version {}",
                state.store.directory_version().await.unwrap_or(0)
            );
            let _ = writeln!(out, "envelopes_in {}", load(&state.stats.envelopes_in));
            let _ = writeln!(out, "envelopes_out {}", load(&state.stats.envelopes_out));
            let _ = writeln!(
                out,
                "envelopes_acked {}",
                load(&state.stats.envelopes_acked)
            );
            match state.store.exchanges().await {
                Ok(Some(exchanges)) => {
                    for (name, targets) in exchanges {
                        let _ = writeln!(out, "exchange {name} forwards [{}]", targets.join(" "));
                    }
                }
                Ok(None) => {
                    let mut targets: Vec<String> = lock(&state.links).keys().cloned().collect();
                    targets.sort();
                    let _ = writeln!(out, "exchange alone forwards [{}]", targets.join(" "));
                }
                Err(e) => {
                    let _ = writeln!(out, "error: cannot read the exchanges: {e}");
                }
            }
            match state.store.servers().await {
                Ok(servers) => {
                    for s in servers {
                        let waiting = match state.store.outbox_len(&s.id).await {
                            Ok(n) => n.to_string(),
                            Err(e) => format!("unknown ({e})"),
                        };
                        let _ = writeln!(
                            out,
                            "host {} number {} addr {} {} waiting {waiting}",
                            s.id,
                            s.number,
                            s.addr,
                            if s.up { "up" } else { "down" },
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
    // From the registry's row to the link's entry, and back when it ends.
    let membership = state.membership.lock().await;
    let number = match state
        .store
        .join(&server, &addr, &credential, now_ms())
        .await?
    {
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
    let forgotten = state.store.forget_presence(&server).await;
    drop(membership);
    forgotten?;
    tracing::info!(%server, number, %addr, "host joined");
    let mut forwarding = None;
    let result = relay(
        state,
        &mut peer,
        Joined {
            server: &server,
            number,
            directory_since,
            relayed_in,
        },
        Channels {
            events: &mut events,
            direct: &mut direct_rx,
            outbox_ready: &outbox_ready,
            replaced: &replaced,
        },
        &mut forwarding,
    )
    .await;
    // An exchange that lost the right to forward to the host (it was stopped, and the host
    // went to another) leaves the host as the other sees it.
    let forwarder = forwarding.as_ref().is_some_and(Forward::is_held);
    // Let go before the others are told, so that they read the host down (on PostgreSQL a
    // host is up while its forwarder's lock is held).
    drop(forwarding);
    // Gone, unless a new link of the same host replaced this one.
    let membership = state.membership.lock().await;
    let ours = {
        let mut links = lock(&state.links);
        let ours = links.get(&server).is_some_and(|l| l.id == link_id);
        if ours {
            links.remove(&server);
        }
        ours
    };
    if ours && forwarder {
        tracing::info!(%server, "host left");
        if let Err(e) = state.store.leave(&server, now_ms()).await {
            tracing::error!(%server, error = %e, "cannot mark the host down");
        }
        if let Err(e) = state.store.forget_presence(&server).await {
            tracing::error!(%server, error = %e, "cannot forget who was online on the host");
        }
    }
    drop(membership);
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
async fn group_home_passes_on(
    store: &ExchangeDb,
    server: &str,
    envelope: &Envelope,
) -> Result<bool, StoreError> {
    let Some(group) = envelope.message.group() else {
        return Ok(false);
    };
    Ok(store.home(&Address::Group(group.clone())).await?.as_deref() == Some(server))
}

/// What a link hears from the rest of the exchange.
struct Channels<'a> {
    /// What every host is told.
    events: &'a mut broadcast::Receiver<Arc<Broadcast>>,
    /// What this host alone is told.
    direct: &'a mut mpsc::UnboundedReceiver<ExchangeFrame>,
    /// The host's outbox grew.
    outbox_ready: &'a Notify,
    /// A new link of the host took over.
    replaced: &'a Notify,
}

/// Relays both ways until the link ends; `forwarding`: the right to forward the host's
/// `906`s, once taken.
async fn relay(
    state: &Arc<State>,
    peer: &mut Peer,
    joined: Joined<'_>,
    channels: Channels<'_>,
    forwarding: &mut Option<Forward>,
) -> Result<(), HostLinkError> {
    let Channels {
        events,
        direct,
        outbox_ready,
        replaced,
    } = channels;
    let server = joined.server;
    let servers: Vec<ServerInfo> = state.store.servers().await?;
    // The registry as this host was last told it.
    let mut registry = servers.clone();
    // What the exchange says it has must be durable: the host drops what it acknowledges.
    let relayed_out = state.store.inbound(server).await?;
    state.store.flush().await?;
    peer.write(&ExchangeFrame::Joined {
        number: joined.number,
        servers,
        relayed_out,
    })
    .await?;
    // The directory entries the host lacks.
    let mut since = joined.directory_since;
    loop {
        let (version, entries) = state.store.directory_after(since, DIRECTORY_CHUNK).await?;
        if version == since {
            break;
        }
        // Only what is durable is told.
        state.store.flush().await?;
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
    state.store.outbox_acked(server, joined.relayed_in).await?;
    // The hop's state: what the host holds of its outbox here, and what this exchange holds
    // of the host's `905`s.
    let mut link = RelayLink::joined(joined.relayed_in, relayed_out);
    let mut shutdown = state.shutdown.clone();
    // Only the exchange with the right forwards the host's `906`s: one at a time, whichever
    // exchanges the host has been linked to.
    *forwarding = take_forwarding(state, server, None).await?;
    pump(state, peer, server, &mut link, forwarding).await?;
    let mut inbound = Inbound::default();
    let mut retry = tokio::time::interval(FORWARD_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut recheck = tokio::time::interval(OUTBOX_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let idle_ack = link.poll_ack(true).is_some();
        let forwarding_lost = forwarding.as_ref().is_none_or(|f| !f.is_held());
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
                            || group_home_passes_on(&state.store, server, &envelope).await?
                        {
                            // Stored with the others that came meanwhile, before they are
                            // acknowledged.
                            inbound.pending.push((seq, envelope));
                        } else {
                            tracing::error!(%server, seq, id = %envelope.message.id, from = %envelope.message.from, "a relayed message numbered by another host; dropped");
                        }
                    }
                    // Acknowledged once durable, once half a window waits.
                    acknowledge(state, peer, &mut link, false, server, &mut inbound).await?;
                }
                HostFrame::Ack { seq } => {
                    let before = link.acked();
                    if let Some(seq) = link.on_ack(seq)? {
                        state.stats.envelopes_acked.fetch_add(seq - before, Ordering::Relaxed);
                        state.store.outbox_acked(server, seq).await?;
                    }
                    pump(state, peer, server, &mut link, forwarding).await?;
                }
                HostFrame::Claim { req, user } => {
                    // Every host hears of it from the store's notice (`follow`).
                    let (home, version) = state.store.claim(&user, server).await?;
                    if let Some(version) = version {
                        tracing::info!(%user, home = %home, version, "user registered");
                    }
                    // Answered once durable: the host registers the user on this answer.
                    state.store.flush().await?;
                    peer.write(&ExchangeFrame::Claimed { req, home }).await?;
                }
                HostFrame::Release { req, user } => {
                    let (home, version) = state.store.release(&user, server).await?;
                    if let Some(version) = version {
                        tracing::info!(%user, version, "user name released");
                    } else if let Some(home) = &home {
                        tracing::warn!(%server, %user, %home, "a host asked to release a name of another host; refused");
                    }
                    state.store.flush().await?;
                    peer.write(&ExchangeFrame::Released { req, home }).await?;
                }
                HostFrame::Lookup { req, users } => {
                    let mut homes = Vec::new();
                    for user in users.into_iter().take(iim_proto::MAX_TARGETS) {
                        if let Some(home) = state.store.home(&user).await? {
                            homes.push((user, home));
                        }
                    }
                    // Only what is durable is told.
                    state.store.flush().await?;
                    peer.write(&ExchangeFrame::Found { req, homes }).await?;
                }
                HostFrame::Presence { entries } => {
                    let mut told = Vec::with_capacity(entries.len());
                    for (user, devices) in entries {
                        // Only its own users: a host cannot speak for another's.
                        if state.store.home(&user.clone().into()).await?.as_deref() != Some(server) {
                            tracing::warn!(%server, %user, "presence of a user who is not the host's own; ignored");
                            continue;
                        }
                        told.push((user, devices));
                    }
                    if !told.is_empty() {
                        // Every other host hears of it from the store's notice (`follow`).
                        state.store.set_presence(server, told).await?;
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
                Ok(event) => match &event.frame {
                    _ if event.except.as_deref() == Some(server) => {}
                    // Told again every `REGISTRY_POLL`: passed on when it differs.
                    ExchangeFrame::Servers { servers } => {
                        if *servers != registry {
                            peer.write(&event.frame).await?;
                            registry.clone_from(servers);
                        }
                    }
                    frame => peer.write(frame).await?,
                },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Err(HostLinkError::Lagged(n));
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            () = outbox_ready.notified() => {
                pump(state, peer, server, &mut link, forwarding).await?;
            }
            _ = retry.tick(), if forwarding_lost => {
                *forwarding = take_forwarding(state, server, forwarding.take()).await?;
                pump(state, peer, server, &mut link, forwarding).await?;
            }
            // Rows whose notice was lost (the exchange that stored them died between their
            // commit and the notice) are sent all the same. Only a shared store's notices
            // can be lost: the exchange's own store tells of every row it stores.
            _ = recheck.tick(), if !forwarding_lost && matches!(forwarding, Some(Forward::Shared(_))) => {
                pump(state, peer, server, &mut link, forwarding).await?;
            }
            // Nothing else to do: the `905`s read are made durable and acknowledged, once for
            // all of them.
            () = std::future::ready(()), if idle_ack => {
                acknowledge(state, peer, &mut link, true, server, &mut inbound).await?;
            }
        }
    }
}

/// What a link holds of the host's `905`s between their arrival and their acknowledgement.
#[derive(Default)]
struct Inbound {
    /// Read, to be stored (at once) before they are acknowledged.
    pending: Vec<(u64, Envelope)>,
}

/// Sends the acknowledgement the link asks for, if it asks (`idle`: whatever waits), once
/// what it covers is stored (`905`s read meanwhile, at once) and durable.
async fn acknowledge(
    state: &State,
    peer: &mut Peer,
    link: &mut RelayLink,
    idle: bool,
    server: &str,
    inbound: &mut Inbound,
) -> Result<(), HostLinkError> {
    let Some(seq) = link.poll_ack(idle) else {
        return Ok(());
    };
    if !inbound.pending.is_empty() {
        let batch = std::mem::take(&mut inbound.pending);
        for targets in state.store.relay_in_batch(server, batch).await? {
            if !targets.is_empty() {
                state.stats.envelopes_in.fetch_add(1, Ordering::Relaxed);
            }
            for target in targets {
                state.notify(&target);
            }
        }
    }
    state.store.flush().await?;
    peer.write(&ExchangeFrame::Ack { seq }).await?;
    link.on_ack_sent(seq);
    Ok(())
}

/// The right to forward `server`'s `906`s: `held` if it still is, else taken if it is
/// free (every exchange is told: the host counts as up where it is forwarded to).
async fn take_forwarding(
    state: &State,
    server: &str,
    held: Option<Forward>,
) -> Result<Option<Forward>, StoreError> {
    if let Some(held) = held {
        if held.is_held() {
            return Ok(Some(held));
        }
        tracing::warn!(%server, "lost the right to forward to the host; taking it again");
    }
    let taken = state.store.forward(server).await?;
    if taken.is_some() {
        state.store.registry_changed().await?;
    } else {
        tracing::debug!(%server, "another exchange forwards to the host; waiting");
    }
    Ok(taken)
}

/// Sends `server`'s outbox after what was sent, as far as the link's window allows, if this
/// exchange has the right to (`forwarding`).
async fn pump(
    state: &State,
    peer: &mut Peer,
    server: &str,
    link: &mut RelayLink,
    forwarding: &Option<Forward>,
) -> Result<(), HostLinkError> {
    if forwarding.as_ref().is_none_or(|f| !f.is_held()) {
        return Ok(());
    }
    loop {
        let room = link.room();
        if room == 0 {
            return Ok(());
        }
        let entries = state.store.outbox(server, link.sent(), room).await?;
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

/// Opens the store `config` names: the database of `network.database`, or the exchange's own
/// in its data directory.
async fn open_store(config: &Config, name: &str) -> Result<ExchangeDb, ServerError> {
    let store_path = config.data_dir.join("exchange");
    let sealer = crate::store::sealer_for(&store_path, &config.key_file(), config.storage.encrypt)
        .map_err(|source| ServerError::OpenStore {
            path: store_path.clone(),
            source,
        })?;
    let Some(url) = &config.network.database else {
        let store = ExchangeStore::open_with(&store_path, sealer).map_err(|source| {
            ServerError::OpenStore {
                path: store_path.clone(),
                source,
            }
        })?;
        return Ok(ExchangeDb::sled(store));
    };
    let durability = match config.network.database_single_node {
        true => Durability::SingleNode,
        false => Durability::Replicated,
    };
    let connections = config
        .network
        .database_connections
        .unwrap_or(DEFAULT_CONNECTIONS);
    let db = PgExchange::connect_as(url, name, connections, sealer, durability)
        .await
        .map_err(ServerError::Database)?;
    tracing::info!(
        ?durability,
        connections,
        "the network's state is in PostgreSQL"
    );
    ExchangeDb::postgres(db)
        .await
        .map_err(ServerError::Database)
}

/// Tells the exchange's hosts of every change the store tells of, until the store's notices
/// end. `told`: the directory version hosts were told of.
async fn follow(state: Arc<State>, mut changes: broadcast::Receiver<Change>, mut told: u64) {
    let mut poll = tokio::time::interval(REGISTRY_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let received = tokio::select! {
            received = changes.recv() => received,
            _ = poll.tick() => {
                state.tell_servers().await;
                continue;
            }
        };
        let change = match received {
            Ok(change) => change,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "fell behind the store's notices: reading it again"
                );
                Change::Missed
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let done = match change {
            Change::Relayed(target) => {
                state.notify(&target);
                Ok(())
            }
            Change::Servers => {
                state.tell_servers().await;
                Ok(())
            }
            Change::Directory => tell_directory(&state, &mut told).await,
            Change::Presence { server, entries } => {
                state.presence_changed(&server, entries);
                Ok(())
            }
            Change::PresenceGone(server) => {
                state.presence_gone(&server);
                Ok(())
            }
            Change::Missed => {
                state.notify_all();
                state.tell_servers().await;
                match tell_directory(&state, &mut told).await {
                    Ok(()) => state.presence_again().await,
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = done {
            // Told again at the next notice; a host that joins meanwhile reads it itself.
            tracing::error!(error = %e, "cannot read what changed from the store");
        }
    }
}

/// Tells every host of the directory's changes after version `told`, in version order, once
/// they are durable.
async fn tell_directory(state: &State, told: &mut u64) -> Result<(), StoreError> {
    loop {
        let (version, entries) = state.store.directory_after(*told, DIRECTORY_CHUNK).await?;
        if version == *told {
            return Ok(());
        }
        state.store.flush().await?;
        state.tell(None, ExchangeFrame::Directory { version, entries });
        *told = version;
    }
}
