//! A push gateway for tests: a real HTTPS server on 127.0.0.1 (hyper, rustls, a certificate
//! of its own) standing in for FCM or APNs. It records every request it receives and answers
//! each with the status the test set (200 unless told otherwise); it can be stopped (its port
//! then refuses connections) and started again on the same port.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request the gateway received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its method.
    pub method: String,
    /// Its path and query.
    pub path: String,
    /// HTTP/1.1 or HTTP/2.
    pub version: String,
    /// Its headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub body: Vec<u8>,
}

impl Received {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(&self.body)?)
    }
}

/// What the gateway shares with its connections.
struct State {
    received: Mutex<Vec<Received>>,
    status: AtomicU16,
}

/// The gateway. Dropping it stops it.
pub struct Gateway {
    addr: SocketAddr,
    /// Its certificate, for the host to trust (`http_ca_file`).
    pub cert: PathBuf,
    _dir: tempfile::TempDir,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<State>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// Starts a gateway on a free port of 127.0.0.1; `h2` offers HTTP/2 (as APNs does,
    /// which speaks nothing else), else HTTP/1.1 only.
    pub async fn start(h2: bool) -> anyhow::Result<Self> {
        let generated =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
                .context("generating the gateway's certificate")?;
        let dir = tempfile::tempdir()?;
        let cert = dir.path().join("gateway.pem");
        std::fs::write(&cert, generated.cert.pem())?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            generated.signing_key.serialize_der(),
        ));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![generated.cert.der().clone()], key)?;
        tls.alpn_protocols = if h2 {
            vec![b"h2".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            received: Mutex::new(Vec::new()),
            status: AtomicU16::new(200),
        });
        let tls = Arc::new(tls);
        let task = tokio::spawn(serve(listener, Arc::clone(&tls), Arc::clone(&state)));
        Ok(Self {
            addr,
            cert,
            _dir: dir,
            tls,
            state,
            task: Some(task),
        })
    }

    /// Its origin: `https://127.0.0.1:PORT`.
    pub fn origin(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The push plugin's configuration file (`push.toml`) that posts here, FCM-shaped.
    pub fn push_config(&self) -> String {
        format!(
            "gateway = \"{}/v1/projects/test/messages:send\"\nformat = \"fcm\"\n\
             [host]\nallowed_outbound_hosts = [\"{}\"]\nhttp_ca_file = \"{}\"\n",
            self.origin(),
            self.origin(),
            self.cert.display()
        )
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until at least `n` requests were received (at most `within`), and returns them.
    pub async fn wait_for(&self, n: usize, within: Duration) -> anyhow::Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let received = self.received();
            if received.len() >= n {
                return Ok(received);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the gateway received {} requests within {within:?}, not {n}",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Answers every request from now on with `status`.
    pub fn answer(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Stops listening: connections to its port are refused.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again, on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        // The aborted task lets go of its socket once it has been dropped.
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.task = Some(tokio::spawn(serve(
            listener,
            Arc::clone(&self.tls),
            Arc::clone(&self.state),
        )));
        Ok(())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts connections until aborted, each served by a task that the abort ends too.
async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<State>,
) {
    let mut connections = tokio::task::JoinSet::new();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, state) = (acceptor.clone(), Arc::clone(&state));
        connections.spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper::service::service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, hyper::Error>(record(&state, request).await) }
            });
            if h2 {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            }
        });
    }
}

/// Records `request` and answers with the status set.
async fn record(
    state: &State,
    request: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let received = Received {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        version: format!("{:?}", parts.version),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    state
        .received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(received);
    let status = state.status.load(Ordering::SeqCst);
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(b"{}")));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    response
}
