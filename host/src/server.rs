//! The QUIC endpoint: accepts connections, runs a session for each, and shuts down cleanly.

use crate::blobs::Blobs;
use crate::config::{Config, ConfigError};
use crate::directory::Directory;
use crate::hashing::PasswordHashers;
use crate::iim::Iim;
use crate::network::{self, LinkError, LinkParts, Network};
use crate::outbox::RelayOutbox;
use crate::plugin::{PluginHost, Services, loader};
use crate::registry::Registry;
use crate::store::{Store, StoreError};
use crate::tls::TlsError;
use crate::{Host, metrics, session, tls};
use iim_proto::ErrorCode;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Why a host (or the exchange) could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is not valid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The metrics endpoint could not listen.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::ListenError),
    /// The data directory could not be made.
    #[error("cannot create data directory {}: {source}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate, its key or the reset keys could not be loaded or made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The TLS configuration cannot serve QUIC.
    #[error("TLS configuration is not usable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store in {}: {source}", path.display())]
    OpenStore {
        /// Its directory.
        path: PathBuf,
        /// Why.
        source: StoreError,
    },
    /// The exchange's database (`network.database`) could not be used.
    #[error("cannot start on network.database: {0}")]
    Database(StoreError),
    /// The store failed.
    #[error("the store: {0}")]
    Store(#[from] StoreError),
    /// The blob store (`<data-dir>/files`) could not be opened.
    #[error("cannot open the files: {0}")]
    Blobs(#[from] crate::blobs::BlobError),
    /// The host could not join its network.
    #[error("cannot join the network: {0}")]
    Network(#[from] LinkError),
    /// The thread of the link to the exchange could not start.
    #[error("cannot start the link to the exchange: {0}")]
    LinkThread(#[source] std::io::Error),
    /// The plugin runtime could not start.
    #[error("cannot start the plugin runtime: {0}")]
    Plugins(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The default plugins could not be installed.
    #[error("cannot install the default plugins in {}: {source}", path.display())]
    Defaults {
        /// The plugins directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The password hashing threads could not be started.
    #[error("cannot start the password hashing threads: {0}")]
    Hashers(#[source] std::io::Error),
    /// The operator's socket could not be opened.
    #[error("cannot open the admin socket: {0}")]
    Admin(#[source] std::io::Error),
    /// The local address could not be read.
    #[error("cannot read the bound address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// A host that is listening.
pub struct Server {
    host: Arc<Host>,
    loader: loader::Loader,
    endpoint: quinn::Endpoint,
    stop: tokio::sync::watch::Sender<bool>,
    cert_path: std::path::PathBuf,
    metrics: Option<metrics::Endpoint>,
}

/// What the metrics endpoint reads of a host at each scrape.
struct Observed(Arc<Host>);

impl metrics::Observed for Observed {
    fn refresh<'a>(&'a self, metrics: &'a metrics::Metrics) -> metrics::Refreshing<'a> {
        Box::pin(async move { self.set_gauges(metrics) })
    }

    fn readiness(&self) -> Result<(), String> {
        metrics::until_shutdown(&self.0.shutdown)
    }
}

impl Observed {
    fn set_gauges(&self, metrics: &metrics::Metrics) {
        let host = &self.0;
        let online: u32 = host.registry.online_counts().iter().map(|(_, n)| n).sum();
        metrics.devices_online.set(online.into());
        if let Some(network) = &host.network {
            let waiting = host.store.network.relay_waiting();
            let exchange = metrics::label("peer", "exchange");
            metrics
                .relay_waiting
                .get_or_create(&exchange)
                .set(i64::try_from(waiting).unwrap_or(i64::MAX));
            metrics.exchange_connected.set(network.is_up().into());
        }
    }
}

/// QUIC transport settings for client connections.
pub fn transport(config: &Config) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    // A client opens one bidirectional stream for its session and one more for each file it
    // uploads or downloads; allowing more would only let a peer park data in streams nobody
    // reads.
    transport.max_concurrent_bidi_streams((1 + config.limits.file_streams).into());
    transport.max_concurrent_uni_streams(0u32.into());
    let idle = Duration::from_secs(config.limits.idle_timeout_secs);
    transport.max_idle_timeout(idle.try_into().ok());
    transport
}

/// Checks the configuration, makes the data directory, and loads (or generates) the
/// certificate: the QUIC server configuration for `alpn` with `transport`, and the
/// certificate's path. For a host and for the exchange.
pub(crate) fn prepare(
    config: &Config,
    alpn: &[u8],
    transport: quinn::TransportConfig,
) -> Result<(quinn::ServerConfig, PathBuf), ServerError> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let identity = tls::load_or_generate(config)?;
    let cert_path = identity.cert_path.clone();
    let crypto = tls::server_config(identity, alpn)?;
    let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
    server_config.transport_config(Arc::new(transport));
    Ok((server_config, cert_path))
}

/// The QUIC endpoint on `socket`, with the data directory's reset keys (so that after a
/// restart the peers of the old process learn at once that it is gone).
pub(crate) fn endpoint(
    config: &Config,
    server_config: quinn::ServerConfig,
    socket: std::net::UdpSocket,
) -> Result<quinn::Endpoint, ServerError> {
    let reset_keys = tls::ResetKeys::load_or_generate(&config.data_dir)?;
    quinn::Endpoint::new(
        reset_keys.endpoint_config(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| ServerError::Listen {
        addr: config.listen,
        source,
    })
}

/// Binds the UDP socket `config` listens on.
pub(crate) fn bind(config: &Config) -> Result<std::net::UdpSocket, ServerError> {
    let socket =
        std::net::UdpSocket::bind(config.listen).map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
    let sized = quinn::udp::UdpSocketState::new((&socket).into()).and_then(|state| {
        state.set_recv_buffer_size((&socket).into(), RECV_BUFFER)?;
        state.recv_buffer_size((&socket).into())
    });
    match sized {
        Ok(bytes) if bytes < RECV_BUFFER / 2 => tracing::info!(
            bytes,
            wanted = RECV_BUFFER,
            "the kernel gave the socket a small receive buffer: a burst of connections \
             (devices reconnecting at once) may overflow it and wait for retransmissions; \
             raise net.core.rmem_max"
        ),
        Ok(bytes) => tracing::debug!(bytes, "socket receive buffer"),
        Err(e) => tracing::warn!(error = %e, "cannot size the socket's receive buffer"),
    }
    Ok(socket)
}

/// The receive buffer a host's or an exchange's socket asks the kernel for (capped at twice
/// `net.core.rmem_max`). At the kernel's default, about 208 KiB, thousands of devices logging
/// in at once overflow it: `iim-bench sessions --clients 10000` lost 60,575 packets, each lost
/// handshake packet a second's wait for its client.
const RECV_BUFFER: usize = 8 << 20;

/// Completes the handshake of a connection refused for its address's limit and closes it with
/// `rate_limited` and the time to wait, so that the client is told why (a bare refusal would
/// look like a host that is down). Bounded by the handshake timeout.
async fn close_over_limit(incoming: quinn::Incoming, limited: crate::address_limits::Limited) {
    let Ok(connecting) = incoming.accept() else {
        return;
    };
    if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(10), connecting).await {
        conn.close(
            quinn::VarInt::from_u32(ErrorCode::RATE_LIMITED.0.into()),
            limited.to_string().as_bytes(),
        );
        // Until the close is sent.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    }
}

impl Server {
    /// Opens the store, loads the certificate and the plugins, routes the messages accepted
    /// before the last stop that no plugin handled yet, and binds.
    pub async fn start(config: Config) -> Result<Self, ServerError> {
        let (server_config, cert_path) = prepare(&config, iim_proto::ALPN, transport(&config))?;
        let socket = bind(&config)?;
        let store_path = config.data_dir.join("store");
        let store =
            crate::store::sealer_for(&store_path, &config.key_file(), config.storage.encrypt)
                .and_then(|sealer| Store::open_with(&store_path, sealer))
                .map_err(|source| ServerError::OpenStore {
                    path: store_path.clone(),
                    source,
                })?;
        let blobs = Blobs::open(
            &config.data_dir.join("files"),
            config.limits.max_file,
            store.sealer.clone(),
        )?;
        let registry = Arc::new(Registry::new(config.limits.session_queue));
        let network = match &config.network.exchange {
            None => None,
            Some(exchange) => {
                let bound = socket.local_addr().map_err(ServerError::LocalAddr)?;
                let addr = network::advertised(&config, bound);
                let directory = Arc::new(Directory::new(config.server_id.clone(), store.clone())?);
                let number = match store.network.host_number()? {
                    Some(number) => number,
                    None => {
                        tracing::info!(%exchange, "joining the network for the first time");
                        network::first_join(&config, &directory, &addr, &store).await?
                    }
                };
                store.messages.use_host_number(number);
                tracing::info!(%exchange, number, "member of a network");
                let outbox = Arc::new(RelayOutbox::new(store.clone()));
                Some(Arc::new(Network::new(
                    directory,
                    outbox,
                    addr,
                    store.clone(),
                )))
            }
        };
        let iim = Arc::new(Iim::new(
            config.server_id.clone(),
            store.clone(),
            Arc::clone(&registry),
            config.limits.message_ttl(),
            network
                .as_ref()
                .map(|n| (Arc::clone(&n.directory), Arc::clone(&n.outbox))),
        ));
        let services = Arc::new(Services {
            store: store.clone(),
            registry: Arc::clone(&registry),
            iim: Arc::clone(&iim),
            max_body: config.limits.max_body,
            max_frame: config.limits.max_frame,
            max_send_users: config.plugins.max_send_users,
        });
        let plugins = Arc::new(
            PluginHost::new(
                config.plugins.clone(),
                Some(&config.plugin_cache_dir()),
                services,
            )
            .map_err(|e| ServerError::Plugins(e.into()))?,
        );
        let plugins_dir = config.plugins_dir();
        let defaults =
            loader::install_defaults(&plugins_dir).map_err(|source| ServerError::Defaults {
                path: plugins_dir.clone(),
                source,
            })?;
        if defaults.created {
            tracing::info!(dir = %plugins_dir.display(), "installed the default plugins");
        }
        for name in &defaults.upgraded {
            tracing::info!(plugin = %name, "default plugin upgraded to this host's build");
        }
        for name in &defaults.added {
            tracing::info!(plugin = %name, "default plugin new in this host's build; installed");
        }
        for name in &defaults.kept {
            tracing::info!(plugin = %name, "default plugin replaced by the operator; kept, not upgraded");
        }
        let mut loader = loader::Loader::new(Arc::clone(&plugins), plugins_dir);
        loader.scan().await;
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let passwords =
            PasswordHashers::start(config.limits.max_hashing, config.limits.hashing_queue)
                .map_err(ServerError::Hashers)?;
        let host = Arc::new(Host {
            store,
            registry,
            iim,
            plugins,
            network,
            shutdown,
            passwords,
            blobs,
            uploads: Default::default(),
            key_rotation: Default::default(),
            addresses: Arc::new(crate::address_limits::AddressLimits::new(
                config.limits.address_limits(),
            )),
            config,
        });
        if let Some(keys) = host.store.sealer.keys() {
            // Covers the files' keys too (see `Store::keys_in_use`): no file is read at start.
            let in_use = host.store.keys_in_use()?;
            if in_use.iter().any(|&id| id != keys.current()) {
                tracing::info!(
                    ?in_use,
                    current = keys.current(),
                    "a key rotation did not finish: re-encrypting in the background"
                );
                host.key_rotation.resume(&host.data());
            }
        }
        let recovered = host.plugins.route_pending().await?;
        if recovered > 0 {
            tracing::info!(
                recovered,
                "routed messages accepted before the last stop to their plugins"
            );
        }
        let endpoint = endpoint(&host.config, server_config, socket)?;
        let metrics = match host.config.metrics.listen {
            Some(addr) => {
                let observed = Arc::new(Observed(Arc::clone(&host)));
                let endpoint = metrics::Endpoint::start(addr, observed).await?;
                // Only a host that shows its metrics reads every inbox for them.
                count_inboxes(host.store.clone());
                Some(endpoint)
            }
            None => None,
        };
        Ok(Self {
            host,
            loader,
            endpoint,
            stop,
            cert_path,
            metrics,
        })
    }

    /// Where the metrics endpoint listens, if it does.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(metrics::Endpoint::addr)
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        self.endpoint.local_addr().map_err(ServerError::LocalAddr)
    }

    /// The certificate clients should trust.
    pub fn cert_path(&self) -> &std::path::Path {
        &self.cert_path
    }

    /// What the host's sessions share: its store, registry, plugins and network.
    pub fn host(&self) -> Arc<Host> {
        Arc::clone(&self.host)
    }

    /// Serves until `stop` resolves, then ends every session and flushes the store.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> Result<(), ServerError> {
        let mut sessions = JoinSet::new();
        let retries = tokio::spawn(retry_dispatch(Arc::clone(&self.host)));
        let notices = self
            .host
            .iim
            .waiting_notices()
            .map(|notices| tokio::spawn(forward_waiting(Arc::clone(&self.host), notices)));
        let expiry = tokio::spawn(crate::expiry::run(Arc::clone(&self.host)));
        let watcher = tokio::spawn(self.loader.watch(self.host.shutdown.clone()));
        let admin = crate::admin::start(Arc::clone(&self.host)).map_err(ServerError::Admin)?;
        let link = self
            .host
            .network
            .as_ref()
            .map(|network| {
                let parts = LinkParts {
                    config: self.host.config.clone(),
                    iim: Arc::clone(&self.host.iim),
                    registry: Arc::clone(&self.host.registry),
                    shutdown: self.host.shutdown.clone(),
                    blobs: self.host.blobs.clone(),
                };
                network::spawn(Arc::clone(network), parts)
            })
            .transpose()
            .map_err(ServerError::LinkThread)?;
        tokio::pin!(stop);
        if let Some(metrics) = &self.metrics {
            metrics.serving(true);
        }
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    if sessions.len() >= self.host.config.limits.max_connections {
                        tracing::warn!(remote = %incoming.remote_address(), "connection refused: at the connection limit");
                        incoming.refuse();
                        continue;
                    }
                    let remote = incoming.remote_address();
                    let open = match self.host.addresses.connect(remote.ip(), crate::clock::now_ms()) {
                        Ok(open) => open,
                        Err(limited) => {
                            tracing::info!(%remote, %limited, "connection refused: over the limit of its address");
                            sessions.spawn(close_over_limit(incoming, limited));
                            continue;
                        }
                    };
                    let host = Arc::clone(&self.host);
                    sessions.spawn(async move {
                        // Counted against its address until the session ends.
                        let _open = open;
                        let connecting = match incoming.accept() {
                            Ok(connecting) => connecting,
                            Err(e) => return tracing::debug!(error = %e, "handshake failed"),
                        };
                        // The session starts at once, so that a resuming client's 0-RTT
                        // frames are answered without waiting for the handshake; the session
                        // acts on them only as far as they are safe to replay.
                        match connecting.into_0rtt() {
                            Ok((conn, complete)) => session::run(host, conn, complete).await,
                            Err(connecting) => match connecting.await {
                                Ok(_) => tracing::error!("a server connection refused 0.5-RTT"),
                                Err(e) => tracing::debug!(error = %e, "handshake failed"),
                            },
                        }
                    });
                }
                Some(joined) = sessions.join_next(), if !sessions.is_empty() => {
                    if let Err(e) = joined {
                        tracing::error!(error = %e, "a session task failed");
                    }
                }
                () = &mut stop => break,
            }
        }
        tracing::info!(sessions = sessions.len(), "shutting down");
        if let Some(metrics) = &self.metrics {
            metrics.serving(false);
        }
        let _ = self.stop.send(true);
        let _ = retries.await;
        // It may be waiting for room in a plugin's queue; what it holds is only notices.
        if let Some(notices) = notices {
            notices.abort();
        }
        let _ = expiry.await;
        let _ = watcher.await;
        let _ = admin.await;
        if let Some(link) = link {
            let _ = link.await;
        }
        self.host
            .registry
            .kick_all(ErrorCode::SHUTTING_DOWN, "the host is shutting down");
        // Sessions say goodbye and close; give them a bounded time to do so.
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            sessions.abort_all();
        }
        self.endpoint.close(
            quinn::VarInt::from_u32(ErrorCode::SHUTTING_DOWN.0.into()),
            b"shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        // Lanes finish what is queued; what they do not finish in time stays recorded.
        if tokio::time::timeout(Duration::from_secs(5), self.host.plugins.stop())
            .await
            .is_err()
        {
            tracing::warn!(
                "plugins still busy at shutdown; their messages stay recorded for dispatch"
            );
        }
        self.host.store.flush().await?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Counts the inbox entries waiting after a start (the metric `inbox_waiting`), on a thread
/// of its own: the store may hold many, and the host serves meanwhile.
fn count_inboxes(store: Store) {
    tokio::task::spawn_blocking(move || match store.inbox.count_waiting() {
        Ok(waiting) => {
            metrics::metrics().inbox_waiting.inc_by(waiting);
        }
        Err(e) => tracing::warn!(error = %e, "cannot count the inboxes' entries for the metrics"),
    });
}

/// Hands the host's waiting notices (`Iim::waiting_notices`) to the plugin that handles them,
/// if one is loaded, and tells `Iim` every second whether one is (so that a host without one
/// queues none); stops at shutdown. Waiting for room in that plugin's queue holds up only this
/// task: the notices queue behind it, and past the queue's size they are dropped, never
/// delivery.
async fn forward_waiting(
    host: Arc<Host>,
    mut notices: tokio::sync::mpsc::Receiver<crate::iim::WaitingNotice>,
) {
    let kind = iim_proto::MessageKind::Custom(iim_proto::body::WAITING_KIND.into());
    let mut shutdown = host.shutdown.clone();
    let mut look = tokio::time::interval(Duration::from_secs(1));
    loop {
        let notice = tokio::select! {
            notice = notices.recv() => match notice {
                Some(notice) => notice,
                None => return,
            },
            _ = look.tick() => {
                host.iim.want_waiting_notices(host.plugins.handler_of(&kind).is_some());
                continue;
            }
            _ = shutdown.changed() => return,
        };
        if host.plugins.handler_of(&kind).is_none() {
            continue;
        }
        let event = crate::plugin::Event::Waiting(notice);
        host.plugins.raise(event).await;
    }
}

/// How often messages recorded for dispatch and not on their way to a plugin are routed.
const DISPATCH_RETRY: Duration = Duration::from_secs(5);

/// Every few seconds, and whenever a relayed message was recorded for the plugins, routes what
/// is recorded for dispatch and not on its way to a plugin (a plugin that was missing, a store
/// failure, a group message from another host); stops at shutdown.
async fn retry_dispatch(host: Arc<Host>) {
    let mut ticks = crate::clock::Ticks::new(host.shutdown.clone(), DISPATCH_RETRY);
    loop {
        // A member's message relayed from another host is routed at once.
        tokio::select! {
            more = ticks.next() => if !more { break },
            () = host.iim.dispatch_wanted() => {}
        }
        match host.plugins.route_pending().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(routed = n, "routed messages waiting for a plugin"),
            Err(e) => tracing::error!(error = %e, "routing waiting messages failed"),
        }
    }
}
