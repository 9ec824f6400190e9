//! The QUIC endpoint: accepts connections, runs a session for each, and shuts down cleanly.

use crate::config::Config;
use crate::iim::Iim;
use crate::registry::Registry;
use crate::store::Store;
use crate::{Host, dispatch, session, tls};
use anyhow::Context;
use iim_proto::ErrorCode;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// A host that is listening.
pub struct Server {
    host: Arc<Host>,
    endpoint: quinn::Endpoint,
    stop: tokio::sync::watch::Sender<bool>,
    cert_path: std::path::PathBuf,
}

/// QUIC transport settings for client connections.
pub fn transport(config: &Config) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    // A client opens one bidirectional stream; a few more are allowed so that a client that
    // reconnects on the same connection is not stuck, but nothing can open hundreds.
    transport.max_concurrent_bidi_streams(4u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    let idle = Duration::from_secs(config.limits.idle_timeout_secs);
    transport.max_idle_timeout(idle.try_into().ok());
    transport
}

impl Server {
    /// Opens the store, loads the certificate, recovers unfinished dispatches and binds.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        let identity = tls::load_or_generate(&config)?;
        let cert_path = identity.cert_path.clone();
        let crypto = tls::server_config(identity)?;
        let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
            .context("TLS configuration is not usable for QUIC")?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
        server_config.transport_config(Arc::new(transport(&config)));

        let store_path = config.data_dir.join("store");
        let store = Store::open(&store_path)
            .with_context(|| format!("cannot open the store in {}", store_path.display()))?;
        let registry = Arc::new(Registry::new(config.limits.session_queue));
        let iim = Iim::new(
            config.server_id.clone(),
            store.clone(),
            Arc::clone(&registry),
        );
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let host = Arc::new(Host {
            store,
            registry,
            iim,
            shutdown,
            config,
        });
        let recovered = dispatch::recover(&host)?;
        if recovered > 0 {
            tracing::info!(
                recovered,
                "dispatched messages accepted before the last stop"
            );
        }
        let endpoint = quinn::Endpoint::server(server_config, host.config.listen)
            .with_context(|| format!("cannot listen on {}", host.config.listen))?;
        Ok(Self {
            host,
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
        tokio::pin!(stop);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let host = Arc::clone(&self.host);
                    sessions.spawn(async move {
                        match incoming.await {
                            Ok(conn) => session::run(host, conn).await,
                            Err(e) => tracing::debug!(error = %e, "handshake failed"),
                        }
                    });
                }
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
                () = &mut stop => break,
            }
        }
        tracing::info!(sessions = sessions.len(), "shutting down");
        let _ = self.stop.send(true);
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
        self.host.store.flush().await?;
        tracing::info!("stopped");
        Ok(())
    }
}
