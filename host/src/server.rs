//! The QUIC endpoint: accepts connections, runs a session for each, and shuts down cleanly.

use crate::config::Config;
use crate::hashing::PasswordHashers;
use crate::iim::Iim;
use crate::network::{self, Network};
use crate::plugin::{PluginHost, Services, loader};
use crate::registry::Registry;
use crate::store::Store;
use crate::{Host, session, tls};
use anyhow::Context;
use iim_proto::ErrorCode;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// A host that is listening.
pub struct Server {
    host: Arc<Host>,
    loader: loader::Loader,
    endpoint: quinn::Endpoint,
    stop: tokio::sync::watch::Sender<bool>,
    cert_path: std::path::PathBuf,
}

/// QUIC transport settings for client connections.
pub fn transport(config: &Config) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    // A client opens exactly one bidirectional stream; allowing more would only let a peer
    // park data in streams nobody reads.
    transport.max_concurrent_bidi_streams(1u32.into());
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
) -> anyhow::Result<(quinn::ServerConfig, std::path::PathBuf)> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let identity = tls::load_or_generate(config)?;
    let cert_path = identity.cert_path.clone();
    let crypto = tls::server_config(identity, alpn)?;
    let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .context("TLS configuration is not usable for QUIC")?;
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
) -> anyhow::Result<quinn::Endpoint> {
    let reset_keys = tls::ResetKeys::load_or_generate(&config.data_dir)?;
    quinn::Endpoint::new(
        reset_keys.endpoint_config(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("cannot listen on {}", config.listen))
}

impl Server {
    /// Opens the store, loads the certificate and the plugins, routes the messages accepted
    /// before the last stop that no plugin handled yet, and binds.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let (server_config, cert_path) = prepare(&config, iim_proto::ALPN, transport(&config))?;
        let socket = std::net::UdpSocket::bind(config.listen)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let store_path = config.data_dir.join("store");
        let store = Store::open(&store_path)
            .with_context(|| format!("cannot open the store in {}", store_path.display()))?;
        let network = match &config.network.exchange {
            None => None,
            Some(exchange) => {
                let addr = network::advertised(&config, socket.local_addr()?);
                let network =
                    Arc::new(Network::new(config.server_id.clone(), addr, store.clone())?);
                let number = match store.host_number()? {
                    Some(number) => number,
                    None => {
                        tracing::info!(%exchange, "joining the network for the first time");
                        network::first_join(&config, &network).await?
                    }
                };
                store.use_host_number(number);
                tracing::info!(%exchange, number, "member of a network");
                Some(network)
            }
        };
        let registry = Arc::new(Registry::new(config.limits.session_queue));
        let iim = Arc::new(Iim::new(
            config.server_id.clone(),
            store.clone(),
            Arc::clone(&registry),
            config.limits.message_ttl(),
            network,
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
            .map_err(|e| anyhow::anyhow!("cannot start the plugin runtime: {e:#}"))?,
        );
        let plugins_dir = config.plugins_dir();
        let defaults = loader::install_defaults(&plugins_dir).with_context(|| {
            format!(
                "cannot install the default plugins in {}",
                plugins_dir.display()
            )
        })?;
        if defaults.created {
            tracing::info!(dir = %plugins_dir.display(), "installed the default plugins");
        }
        for name in &defaults.upgraded {
            tracing::info!(plugin = %name, "default plugin upgraded to this host's build");
        }
        for name in &defaults.kept {
            tracing::info!(plugin = %name, "default plugin replaced by the operator; kept, not upgraded");
        }
        let mut loader = loader::Loader::new(Arc::clone(&plugins), plugins_dir);
        loader.scan().await;
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let passwords =
            PasswordHashers::start(config.limits.max_hashing, config.limits.hashing_queue)
                .context("cannot start the password hashing threads")?;
        let host = Arc::new(Host {
            store,
            registry,
            iim,
            plugins,
            shutdown,
            passwords,
            config,
        });
        let recovered = host.plugins.route_pending().await?;
        if recovered > 0 {
            tracing::info!(
                recovered,
                "routed messages accepted before the last stop to their plugins"
            );
        }
        let endpoint = endpoint(&host.config, server_config, socket)?;
        Ok(Self {
            host,
            loader,
            endpoint,
            stop,
            cert_path,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The certificate clients should trust.
    pub fn cert_path(&self) -> &std::path::Path {
        &self.cert_path
    }

    /// Serves until `stop` resolves, then ends every session and flushes the store.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let mut sessions = JoinSet::new();
        let retries = tokio::spawn(retry_dispatch(Arc::clone(&self.host)));
        let expiry = tokio::spawn(crate::expiry::run(Arc::clone(&self.host)));
        let watcher = tokio::spawn(self.loader.watch(self.host.shutdown.clone()));
        let admin =
            crate::admin::start(Arc::clone(&self.host)).context("cannot open the admin socket")?;
        let link =
            self.host.iim.network().map(|network| {
                tokio::spawn(network::run(Arc::clone(&self.host), Arc::clone(network)))
            });
        tokio::pin!(stop);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    if sessions.len() >= self.host.config.limits.max_connections {
                        tracing::warn!(remote = %incoming.remote_address(), "connection refused: at the connection limit");
                        incoming.refuse();
                        continue;
                    }
                    let host = Arc::clone(&self.host);
                    sessions.spawn(async move {
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
        let _ = self.stop.send(true);
        let _ = retries.await;
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

/// How often messages recorded for dispatch and not on their way to a plugin are routed.
const DISPATCH_RETRY: Duration = Duration::from_secs(5);

/// Every few seconds, routes what is recorded for dispatch and not on its way to a plugin
/// (a plugin that was missing, a store failure); stops at shutdown.
async fn retry_dispatch(host: Arc<Host>) {
    let mut ticks = crate::Ticks::new(&host, DISPATCH_RETRY);
    while ticks.next().await {
        match host.plugins.route_pending().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(routed = n, "routed messages waiting for a plugin"),
            Err(e) => tracing::error!(error = %e, "routing waiting messages failed"),
        }
    }
}
