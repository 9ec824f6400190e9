//! The connection: a driver task reads frames and routes them; requests write under a lock.

use crate::ClientError;
use iim_proto::{
    ClientFrame, DeviceId, ErrorCode, FrameDecoder, Message, MessageId, MessageKind, RelationKind,
    RelationOp, RequestId, ServerFrame, SessionMode, UserId,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The host's UDP address.
    pub server: SocketAddr,
    /// The name the host's certificate must carry.
    pub server_name: String,
    /// Certificates to trust as roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// Names this client in the host's log.
    pub agent: String,
    /// How long to wait for the connection and the handshake.
    pub connect_timeout: Duration,
    /// How long to wait for the answer to a request.
    pub request_timeout: Duration,
    /// How long a [`Device`](crate::Device) waits before its first attempt to reconnect; the
    /// wait doubles after each failed attempt, up to [`ClientConfig::reconnect_max`].
    pub reconnect_first: Duration,
    /// The longest wait between two attempts to reconnect.
    pub reconnect_max: Duration,
    /// The QUIC configuration made from `roots`, shared by every clone of this configuration,
    /// with the TLS sessions it can resume (for 0-RTT).
    pub(crate) quic: QuicCache,
}

/// A QUIC client configuration and the roots it was made for.
type MadeFor = (Vec<CertificateDer<'static>>, quinn::ClientConfig);

/// The QUIC client configuration of a [`ClientConfig`], made once for its roots.
#[derive(Clone, Default)]
pub(crate) struct QuicCache(Arc<Mutex<Option<MadeFor>>>);

impl std::fmt::Debug for QuicCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuicCache")
    }
}

impl QuicCache {
    /// The configuration for `roots`: the one made before if the roots are the same (so its
    /// TLS sessions can be resumed), else a new one.
    pub(crate) fn get(
        &self,
        roots: &[CertificateDer<'static>],
    ) -> Result<quinn::ClientConfig, ClientError> {
        let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((for_roots, config)) = cached.as_ref()
            && for_roots == roots
        {
            return Ok(config.clone());
        }
        let config = quic_client_config(roots)?;
        *cached = Some((roots.to_vec(), config.clone()));
        Ok(config)
    }
}

impl ClientConfig {
    /// A configuration for the host at `server`, named `localhost`, trusting nothing yet.
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            server_name: "localhost".into(),
            roots: Vec::new(),
            agent: format!("iim-client/{}", env!("CARGO_PKG_VERSION")),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            reconnect_first: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            quic: QuicCache::default(),
        }
    }

    /// Trusts the certificates of a PEM file (a host's generated `cert.pem`, or a CA).
    pub fn with_ca_file(mut self, path: &Path) -> Result<Self, ClientError> {
        let err = |reason: String| ClientError::Ca {
            path: path.display().to_string(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no certificate in the file".into()));
        }
        self.roots.extend(certs);
        Ok(self)
    }

    /// This configuration for another host of the same network, at `server`: the same roots,
    /// server name, agent and timeouts, and TLS sessions of its own to resume. (Every host of a
    /// network presents a certificate for the same name, but each issues its own session
    /// tickets: one host's tickets would only cost another a refused 0-RTT attempt.)
    pub fn for_host(&self, server: SocketAddr) -> Self {
        Self {
            server,
            quic: QuicCache::default(),
            ..self.clone()
        }
    }
}

impl ClientConfig {
    /// This configuration for the host a redirect named, at `addr` (`host:port`): an address
    /// keeps the server name (the network's hosts share one), a DNS name becomes the server
    /// name the host's certificate must carry.
    pub(crate) async fn redirected(&self, addr: &str) -> Result<Self, ClientError> {
        let mut config = self.for_host(resolve(addr).await?);
        if parse_host_port(addr)?.is_none()
            && let Some((name, _)) = addr.rsplit_once(':')
        {
            config.server_name = name.to_owned();
        }
        Ok(config)
    }
}

/// The quinn client configuration for an iim host: TLS 1.3, ALPN `iim/1`, trusting `roots`.
pub fn quic_client_config(
    roots: &[CertificateDer<'static>],
) -> Result<quinn::ClientConfig, ClientError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in roots {
        store.add(cert.clone()).map_err(|e| ClientError::Ca {
            path: "(roots)".into(),
            reason: e.to_string(),
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
    tls.alpn_protocols = vec![iim_proto::ALPN.to_vec()];
    // Resumed sessions may carry 0-RTT early data; `Connection` sends only frames that are
    // safe to replay in it.
    tls.enable_early_data = true;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Keep-alives well inside the host's idle timeout keep a quiet session (and the NAT
    // binding of a mobile network) open.
    transport.keep_alive_interval(Some(Duration::from_secs(10)));
    transport.max_idle_timeout(Duration::from_secs(30).try_into().ok());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Something the host pushed to this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message for this device; acknowledge it with [`Connection::ack`]`(seq)`.
    Message {
        /// Its inbox position.
        seq: u64,
        /// The message.
        message: Message,
    },
    /// Every message that waited for this device has been delivered.
    Synced {
        /// How many that was.
        count: u64,
    },
    /// In a [`SessionMode::Paged`] session, what waits for the device; fetch it with
    /// [`Connection::fetch`].
    Backlog {
        /// How many messages.
        count: u64,
        /// The sum of their body sizes, in bytes.
        bytes: u64,
        /// Their ids, oldest first (the first [`iim_proto::BACKLOG_IDS`] if there are more).
        ids: Vec<MessageId>,
    },
}

/// The host's answer to [`Connection::fetch`], after the page's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// How many messages the page held.
    pub count: u32,
    /// How many backlog messages are still to fetch; at 0, [`Event::Synced`] follows.
    pub remaining: u64,
}

/// The host's answer to a submission: the *sent* receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The message's id.
    pub id: MessageId,
    /// When the host accepted it, in milliseconds since the Unix epoch.
    pub sent_at: u64,
    /// The client id it was submitted with.
    pub client_id: u64,
}

type Pending = Arc<Mutex<PendingState>>;

#[derive(Default)]
struct PendingState {
    waiting: HashMap<RequestId, oneshot::Sender<Result<ServerFrame, ClientError>>>,
    /// Set once the connection is over; later requests fail with it at once.
    closed: Option<ClientError>,
}

/// A connection to an iim host. Dropping it closes the connection.
pub struct Connection {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    /// Whole frames for the writer task: a request cancelled by its caller never leaves half a
    /// frame on the stream.
    writer: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<Result<Event, ClientError>>>,
    request_timeout: Duration,
    next_req: AtomicU64,
    max_frame: u32,
    max_body: u32,
    server: String,
    used_0rtt: bool,
}

/// The request id of the `Authenticate` a resuming connection sends with `Hello`.
const EARLY_REQ: RequestId = 1;

fn lock(pending: &Pending) -> std::sync::MutexGuard<'_, PendingState> {
    pending.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connection {
    /// Connects, opens the stream and does the version handshake. Resuming a TLS session
    /// with a host this configuration reached before, it sends `Hello` as 0-RTT early data.
    pub async fn connect(config: &ClientConfig) -> Result<Self, ClientError> {
        Self::open(config, None).await
    }

    /// Connects and authenticates with a token from an earlier [`Connection::login`], as a
    /// device coming back does. Resuming a TLS session with a host this configuration reached
    /// before, `Hello` and `Authenticate` go in the first flight as 0-RTT early data, so the
    /// connection is ready one round trip after it starts: the host takes only what is safe
    /// to replay from early data, and a receive session starts once the handshake is complete
    /// (`docs/protocol.md`, "0-RTT"). A host that is not the user's home answers with
    /// [`ClientError::Redirected`] (and the connection is closed); [`Connection::resume_home`]
    /// follows it.
    pub async fn resume(
        config: &ClientConfig,
        user: &UserId,
        device: &DeviceId,
        token: &str,
        mode: SessionMode,
    ) -> Result<Self, ClientError> {
        let authenticate = ClientFrame::Authenticate {
            req: EARLY_REQ,
            user: user.clone(),
            device: device.clone(),
            token: token.to_owned(),
            mode,
        };
        Self::open(config, Some(authenticate)).await
    }

    /// Connects to `config`'s host and logs in as [`Connection::login`] does, following the
    /// host's redirects to the user's home host (at most [`MAX_REDIRECTS`] in a row). Returns
    /// the connection, the device's token, and the configuration of the host that logged the
    /// device in: `config` itself, or [`ClientConfig::for_host`] the home host, to keep for
    /// the next connection. A connection that was redirected is closed.
    pub async fn login_home(
        config: &ClientConfig,
        user: &UserId,
        password: &str,
        device: &DeviceId,
        mode: SessionMode,
    ) -> Result<(Self, String, ClientConfig), ClientError> {
        let ((conn, token), home) = follow_redirects(config, |config| async move {
            let conn = Self::connect(&config).await?;
            // On an error (a redirect too) `conn` is dropped here, which closes it.
            let token = conn.login(user, password, device, mode).await?;
            Ok((conn, token))
        })
        .await?;
        Ok((conn, token, home))
    }

    /// [`Connection::resume`], following the host's redirects to the user's home host as
    /// [`Connection::login_home`] does. Returns the connection and the configuration of the
    /// host that took the token.
    pub async fn resume_home(
        config: &ClientConfig,
        user: &UserId,
        device: &DeviceId,
        token: &str,
        mode: SessionMode,
    ) -> Result<(Self, ClientConfig), ClientError> {
        follow_redirects(config, |config| async move {
            Self::resume(&config, user, device, token, mode).await
        })
        .await
    }

    /// Whether the host took this connection's 0-RTT early data.
    pub fn used_0rtt(&self) -> bool {
        self.used_0rtt
    }

    /// Connects, sends `Hello` and `first`, and reads their answers: in 0-RTT early data if
    /// the TLS session can be resumed, else (or if the host refuses early data) after the
    /// handshake.
    async fn open(config: &ClientConfig, first: Option<ClientFrame>) -> Result<Self, ClientError> {
        match Self::attempt(config, first.clone(), true).await {
            Ok(conn) => Ok(conn),
            Err((true, e)) => {
                tracing::debug!(error = %e, "0-RTT attempt failed; connecting in full");
                Self::attempt(config, first, false)
                    .await
                    .map_err(|(_, e)| e)
            }
            Err((false, e)) => Err(e),
        }
    }

    /// One connection attempt; the error says whether it went out as 0-RTT.
    async fn attempt(
        config: &ClientConfig,
        first: Option<ClientFrame>,
        allow_0rtt: bool,
    ) -> Result<Self, (bool, ClientError)> {
        let addr = config.server;
        let connect_err = |reason: String| ClientError::Connect { addr, reason };
        let full = |e| (false, e);
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().unwrap_or_else(|_| unreachable!())
        } else {
            "0.0.0.0:0".parse().unwrap_or_else(|_| unreachable!())
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| full(connect_err(e.to_string())))?;
        endpoint.set_default_client_config(config.quic.get(&config.roots).map_err(full)?);
        let connecting = endpoint
            .connect(addr, &config.server_name)
            .map_err(|e| full(connect_err(e.to_string())))?;
        // Without 0-RTT (the fallback after early data was refused), the handshake completes
        // before anything is sent: a stale session ticket must not be tried again.
        let attempt_0rtt = if allow_0rtt {
            connecting.into_0rtt()
        } else {
            Err(connecting)
        };
        let (conn, early) = match attempt_0rtt {
            Ok((conn, accepted)) => (conn, Some(accepted)),
            Err(connecting) => {
                let conn = tokio::time::timeout(config.connect_timeout, connecting)
                    .await
                    .map_err(|_| full(connect_err("timed out".into())))?
                    .map_err(|e| full(connect_err(e.to_string())))?;
                (conn, None)
            }
        };
        let zero_rtt = early.is_some();
        let handshake = async {
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            let hello = ClientFrame::Hello {
                version: iim_proto::PROTOCOL_VERSION,
                agent: config.agent.clone(),
            };
            let mut bytes = iim_proto::encode_frame(&hello, iim_proto::DEFAULT_MAX_FRAME)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            if let Some(first) = &first {
                bytes.extend(
                    iim_proto::encode_frame(first, iim_proto::DEFAULT_MAX_FRAME)
                        .map_err(|e| ClientError::Protocol(e.to_string()))?,
                );
            }
            send.write_all(&bytes)
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            // Until Welcome says otherwise, accept frames of the default limit.
            let mut decoder = FrameDecoder::new(iim_proto::DEFAULT_MAX_FRAME);
            let welcome = read_frame(&mut recv, &mut decoder).await?;
            let answer = match (&first, &welcome) {
                (Some(_), Some(ServerFrame::Welcome { .. })) => {
                    read_frame(&mut recv, &mut decoder).await?
                }
                _ => None,
            };
            // Early data the host refused (it lost the TLS session) is lost with the stream.
            let used_0rtt = match early {
                Some(accepted) => {
                    if !accepted.await {
                        return Err(ClientError::ConnectionLost(
                            "the host refused 0-RTT early data".into(),
                        ));
                    }
                    true
                }
                None => false,
            };
            Ok::<_, ClientError>((send, recv, decoder, welcome, answer, used_0rtt))
        };
        let (send, recv, decoder, welcome, answer, used_0rtt) =
            tokio::time::timeout(config.connect_timeout, handshake)
                .await
                .map_err(|_| (zero_rtt, connect_err("timed out".into())))?
                .map_err(|e| (zero_rtt, e))?;
        let opened = Self::welcomed(
            config, conn, endpoint, send, recv, decoder, welcome, used_0rtt,
        )
        .map_err(full)?;
        match answer {
            None if first.is_none() => Ok(opened),
            Some(ServerFrame::Error { req, code, message }) => Err(full(match req {
                Some(_) => ClientError::Refused { code, message },
                None => ClientError::ClosedByHost { code, message },
            })),
            Some(answer) => expect_ok(answer).map(|()| opened).map_err(full),
            None => Err(full(ClientError::ConnectionLost(
                "closed before answering".into(),
            ))),
        }
    }

    /// The connection, once the host's `Welcome` came.
    #[allow(clippy::too_many_arguments)]
    fn welcomed(
        config: &ClientConfig,
        conn: quinn::Connection,
        endpoint: quinn::Endpoint,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        decoder: FrameDecoder,
        welcome: Option<ServerFrame>,
        used_0rtt: bool,
    ) -> Result<Self, ClientError> {
        let (max_frame, max_body, server) = match welcome {
            Some(ServerFrame::Welcome {
                max_frame,
                max_body,
                server,
                ..
            }) => (max_frame, max_body, server),
            Some(ServerFrame::Error { code, message, .. }) => {
                return Err(ClientError::ClosedByHost { code, message });
            }
            Some(other) => {
                return Err(ClientError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )));
            }
            None => {
                return Err(ClientError::ConnectionLost(
                    "closed during handshake".into(),
                ));
            }
        };
        let pending: Pending = Arc::default();
        // Unbounded so that the reader never waits for the application: answers to requests
        // must get through while deliveries pile up unread. The host bounds what it sends
        // ahead of acknowledgements.
        let (events_tx, events) = mpsc::unbounded_channel();
        tokio::spawn(drive(
            recv,
            decoder,
            max_frame,
            Arc::clone(&pending),
            events_tx,
        ));
        let (writer, frames) = mpsc::channel(256);
        tokio::spawn(write_frames(send, frames));
        Ok(Self {
            conn,
            endpoint,
            writer,
            pending,
            events: tokio::sync::Mutex::new(events),
            request_timeout: config.request_timeout,
            next_req: AtomicU64::new(EARLY_REQ + 1),
            max_frame,
            max_body,
            server,
            used_0rtt,
        })
    }

    /// The host's server id, from its Welcome.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The largest message body the host accepts.
    pub fn max_body(&self) -> u32 {
        self.max_body
    }

    /// The underlying QUIC connection (for its statistics and addresses).
    pub fn quic(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Moves the connection to a new UDP socket on a new local port, as a phone does when it
    /// changes networks. The connection, its session and everything in flight carry on: QUIC
    /// validates the new path and the host follows it.
    pub fn rebind(&self) -> Result<SocketAddr, ClientError> {
        let old = self
            .endpoint
            .local_addr()
            .map_err(|e| ClientError::ConnectionLost(format!("no local address: {e}")))?;
        let bind = SocketAddr::new(old.ip(), 0);
        let rebind_err = |e: std::io::Error| {
            ClientError::ConnectionLost(format!("cannot move to a new socket: {e}"))
        };
        let socket = std::net::UdpSocket::bind(bind).map_err(rebind_err)?;
        let new = socket.local_addr().map_err(rebind_err)?;
        self.endpoint.rebind(socket).map_err(rebind_err)?;
        Ok(new)
    }

    /// The local UDP address the connection uses now.
    pub fn local_addr(&self) -> Result<SocketAddr, ClientError> {
        self.endpoint
            .local_addr()
            .map_err(|e| ClientError::ConnectionLost(format!("no local address: {e}")))
    }

    /// Creates an account.
    pub async fn register(&self, user: &UserId, password: &str) -> Result<(), ClientError> {
        let answer = self
            .request(|req| ClientFrame::Register {
                req,
                user: user.clone(),
                password: password.to_owned(),
            })
            .await?;
        expect_ok(answer)
    }

    /// Logs in as `device` and returns the device's token. In [`SessionMode::Receive`] the
    /// connection then starts to receive the device's messages. A host that is not the user's
    /// home answers with [`ClientError::Redirected`], and the connection stays unauthenticated;
    /// [`Connection::login_home`] follows it.
    pub async fn login(
        &self,
        user: &UserId,
        password: &str,
        device: &DeviceId,
        mode: SessionMode,
    ) -> Result<String, ClientError> {
        let answer = self
            .request(|req| ClientFrame::Login {
                req,
                user: user.clone(),
                password: password.to_owned(),
                device: device.clone(),
                mode,
            })
            .await?;
        match answer {
            ServerFrame::LoggedIn { token, .. } => Ok(token),
            other => Err(unexpected(other)),
        }
    }

    /// Authenticates with a token from an earlier [`Connection::login`]. A host that is not the
    /// user's home answers with [`ClientError::Redirected`], as to [`Connection::login`].
    pub async fn authenticate(
        &self,
        user: &UserId,
        device: &DeviceId,
        token: &str,
        mode: SessionMode,
    ) -> Result<(), ClientError> {
        let answer = self
            .request(|req| ClientFrame::Authenticate {
                req,
                user: user.clone(),
                device: device.clone(),
                token: token.to_owned(),
                mode,
            })
            .await?;
        expect_ok(answer)
    }

    /// Revokes this device's token; the host then ends the connection.
    pub async fn logout(&self) -> Result<(), ClientError> {
        let answer = self.request(|req| ClientFrame::Logout { req }).await?;
        expect_ok(answer)
    }

    /// Adds `user` to the list of `kind`.
    pub async fn add_relation(&self, kind: RelationKind, user: &UserId) -> Result<(), ClientError> {
        self.change_relation(kind, RelationOp::Add(user.clone()))
            .await
    }

    /// Removes `user` from the list of `kind`.
    pub async fn remove_relation(
        &self,
        kind: RelationKind,
        user: &UserId,
    ) -> Result<(), ClientError> {
        self.change_relation(kind, RelationOp::Remove(user.clone()))
            .await
    }

    async fn change_relation(&self, kind: RelationKind, op: RelationOp) -> Result<(), ClientError> {
        let answer = self
            .request(|req| ClientFrame::Relation { req, kind, op })
            .await?;
        expect_ok(answer)
    }

    /// The list of `kind`, sorted by name.
    pub async fn relations(&self, kind: RelationKind) -> Result<Vec<UserId>, ClientError> {
        let answer = self
            .request(|req| ClientFrame::Relation {
                req,
                kind,
                op: RelationOp::List,
            })
            .await?;
        match answer {
            ServerFrame::Users { users, .. } => Ok(users),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a chat message with `text` to `to`.
    pub async fn send_text(&self, to: &UserId, text: &str) -> Result<Accepted, ClientError> {
        self.submit(
            new_client_id(),
            MessageKind::Chat,
            std::slice::from_ref(to),
            text.as_bytes(),
        )
        .await
    }

    /// Submits a message with the idempotency id `client_id`: submitting it again with the same
    /// id (say, after a lost answer) is answered with the same id and delivers nothing twice.
    pub async fn submit(
        &self,
        client_id: u64,
        kind: MessageKind,
        to: &[UserId],
        body: &[u8],
    ) -> Result<Accepted, ClientError> {
        let answer = self
            .start_submit(client_id, kind, to.to_vec(), body.to_vec(), None)
            .await?;
        accepted(answer.wait().await?)
    }

    /// [`Connection::submit`] with a time to live: the recipients whose devices have not got
    /// the message `ttl` after the host accepted it never will, and the sender gets an
    /// `expired` receipt for each of them (`docs/plugins.md`). Whole seconds, at least 1.
    pub async fn submit_expiring(
        &self,
        client_id: u64,
        kind: MessageKind,
        to: &[UserId],
        body: &[u8],
        ttl: Duration,
    ) -> Result<Accepted, ClientError> {
        let answer = self
            .start_submit(
                client_id,
                kind,
                to.to_vec(),
                body.to_vec(),
                Some(ttl_secs(ttl)),
            )
            .await?;
        accepted(answer.wait().await?)
    }

    /// Writes a submission and returns at once, without its answer: submissions started one
    /// after the other reach the host, and are accepted, in that order.
    pub(crate) async fn start_submit(
        &self,
        client_id: u64,
        kind: MessageKind,
        to: Vec<UserId>,
        body: Vec<u8>,
        ttl_secs: Option<u32>,
    ) -> Result<Answer, ClientError> {
        self.start_request(|req| match ttl_secs {
            None => ClientFrame::Submit {
                req,
                client_id,
                kind,
                to,
                body,
            },
            Some(ttl_secs) => ClientFrame::SubmitExpiring {
                req,
                client_id,
                kind,
                to,
                body,
                ttl_secs,
            },
        })
        .await
    }

    /// In a [`SessionMode::Paged`] session, asks for the next page of the backlog: up to `max`
    /// messages, which arrive as [`Event::Message`]s before this returns.
    pub async fn fetch(&self, max: u32) -> Result<Page, ClientError> {
        page(self.start_fetch(max).await?.wait().await?)
    }

    /// Writes a fetch and returns at once, without its answer.
    pub(crate) async fn start_fetch(&self, max: u32) -> Result<Answer, ClientError> {
        self.start_request(|req| ClientFrame::Fetch { req, max })
            .await
    }

    /// Acknowledges every delivery up to and including `seq`.
    pub async fn ack(&self, seq: u64) -> Result<(), ClientError> {
        self.write(&ClientFrame::Ack { seq }).await
    }

    /// The next event; `None` once the connection has ended and every event was taken.
    /// If the host ended the connection with an error, that error comes last, as `Some(Err)`.
    pub async fn next_event(&self) -> Option<Result<Event, ClientError>> {
        self.events.lock().await.recv().await
    }

    /// Closes the connection once the host has read everything sent on it, acknowledgements
    /// included, and waits (briefly) for the host to learn it.
    ///
    /// Closing drops what is not yet sent, and the host drops what it has not read; the host
    /// answers a request only after reading every frame sent before it, so one last answered
    /// request (whatever the answer) makes them safe. Both waits end after 2 s.
    pub async fn close(self) {
        let _ = tokio::time::timeout(CLOSE_WAIT, self.relations(RelationKind::Friend)).await;
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
    }

    async fn request(
        &self,
        frame: impl FnOnce(RequestId) -> ClientFrame,
    ) -> Result<ServerFrame, ClientError> {
        self.start_request(frame).await?.wait().await
    }

    /// Writes a request and returns what waits for its answer.
    async fn start_request(
        &self,
        frame: impl FnOnce(RequestId) -> ClientFrame,
    ) -> Result<Answer, ClientError> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if let Some(closed) = &pending.closed {
                return Err(closed.clone());
            }
            pending.waiting.insert(req, tx);
        }
        if let Err(e) = self.write(&frame(req)).await {
            lock(&self.pending).waiting.remove(&req);
            return Err(e);
        }
        Ok(Answer {
            req,
            rx,
            pending: Arc::clone(&self.pending),
            timeout: self.request_timeout,
        })
    }

    async fn write(&self, frame: &ClientFrame) -> Result<(), ClientError> {
        let bytes = iim_proto::encode_frame(frame, self.max_frame)
            .map_err(|e| ClientError::TooLarge(e.to_string()))?;
        self.writer.send(bytes).await.map_err(|_| {
            lock(&self.pending)
                .closed
                .clone()
                .unwrap_or_else(|| ClientError::ConnectionLost("the stream is closed".into()))
        })
    }
}

/// A time to live in whole seconds, as the protocol carries it: rounded up, and at most
/// `u32::MAX` (136 years).
pub(crate) fn ttl_secs(ttl: Duration) -> u32 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// How long [`Connection::close`] waits for the host, twice at most.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A request written to the host, waiting for its answer.
pub(crate) struct Answer {
    req: RequestId,
    rx: oneshot::Receiver<Result<ServerFrame, ClientError>>,
    pending: Pending,
    timeout: Duration,
}

impl Answer {
    /// The answer, or why none came: the connection ended, or the request timed out.
    pub(crate) async fn wait(self) -> Result<ServerFrame, ClientError> {
        match tokio::time::timeout(self.timeout, self.rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(ClientError::ConnectionLost("the connection ended".into())),
            Err(_) => {
                lock(&self.pending).waiting.remove(&self.req);
                Err(ClientError::Timeout(self.timeout))
            }
        }
    }
}

/// The [`Page`] in the answer to a fetch.
pub(crate) fn page(answer: ServerFrame) -> Result<Page, ClientError> {
    match answer {
        ServerFrame::Page {
            count, remaining, ..
        } => Ok(Page { count, remaining }),
        other => Err(unexpected(other)),
    }
}

/// The [`Accepted`] in the answer to a submission.
pub(crate) fn accepted(answer: ServerFrame) -> Result<Accepted, ClientError> {
    match answer {
        ServerFrame::Accepted {
            id,
            sent_at,
            client_id,
            ..
        } => Ok(Accepted {
            id,
            sent_at,
            client_id,
        }),
        other => Err(unexpected(other)),
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Without this the reader task would keep the QUIC connection (and, with keep-alives,
        // the host's session for this device) alive after the application let go of it.
        self.conn.close(0u32.into(), b"dropped");
    }
}

/// Writes whole frames, one after another, until the connection or the channel ends.
async fn write_frames(mut send: quinn::SendStream, mut frames: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = frames.recv().await {
        if send.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

fn expect_ok(answer: ServerFrame) -> Result<(), ClientError> {
    match answer {
        ServerFrame::Ok { .. } => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// The error for an answer that is not the one a request expects. The host redirects only
/// `Login` and `Authenticate` (the early one of [`Connection::resume`] included); their
/// callers get the redirect as [`ClientError::Redirected`].
fn unexpected(frame: ServerFrame) -> ClientError {
    match frame {
        ServerFrame::Redirect { server, addr, .. } => ClientError::Redirected { server, addr },
        other => ClientError::Protocol(format!("unexpected answer {other:?}")),
    }
}

/// How many redirects in a row a client follows before it gives up: hosts that disagree about
/// a user's home would otherwise send it round in circles.
pub const MAX_REDIRECTS: usize = 3;

/// The redirects followed in a row, to stop at [`MAX_REDIRECTS`].
#[derive(Debug, Default)]
pub(crate) struct Redirects {
    /// Where each one pointed, `server at addr`, for the error.
    followed: Vec<String>,
}

impl Redirects {
    /// Counts a redirect to `server` at `addr`; a "redirect loop" error once
    /// [`MAX_REDIRECTS`] were followed in a row.
    pub(crate) fn follow(&mut self, server: &str, addr: &str) -> Result<(), ClientError> {
        let hop = format!("{server} at {addr}");
        if self.followed.len() >= MAX_REDIRECTS {
            return Err(ClientError::Protocol(format!(
                "redirect loop: redirected {} times in a row ({}), then to {hop}",
                self.followed.len(),
                self.followed.join(", "),
            )));
        }
        self.followed.push(hop);
        Ok(())
    }
}

/// The socket address of `addr`, a redirect's `host:port`: an IP address and port as they
/// are, else a name looked up (its first address).
pub(crate) async fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    if let Some(parsed) = parse_host_port(addr)? {
        return Ok(parsed);
    }
    let failed = |reason: String| ClientError::Resolve {
        addr: addr.to_owned(),
        reason,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| failed(e.to_string()))?
        .next()
        .ok_or_else(|| failed("no address".into()))
}

/// `addr` as a socket address if it is one (`127.0.0.1:7447`, `[::1]:7447`), `None` if it is
/// a name and a port, to look up. Anything else is not an address a host may redirect to.
fn parse_host_port(addr: &str) -> Result<Option<SocketAddr>, ClientError> {
    if let Ok(parsed) = addr.parse() {
        return Ok(Some(parsed));
    }
    match addr.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty() && !host.contains(':') && port.parse::<u16>().is_ok() =>
        {
            Ok(None)
        }
        _ => Err(ClientError::Protocol(format!(
            "the host redirected to {addr:?}, which is not host:port"
        ))),
    }
}

/// Runs `attempt` against `config`'s host and, while it answers [`ClientError::Redirected`],
/// against the host it names (at most [`MAX_REDIRECTS`] in a row). Returns what the last
/// attempt gave and the configuration it was made with.
pub(crate) async fn follow_redirects<T, F, Fut>(
    config: &ClientConfig,
    mut attempt: F,
) -> Result<(T, ClientConfig), ClientError>
where
    F: FnMut(ClientConfig) -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut config = config.clone();
    let mut redirects = Redirects::default();
    loop {
        match attempt(config.clone()).await {
            Ok(done) => return Ok((done, config)),
            Err(ClientError::Redirected { server, addr }) => {
                redirects.follow(&server, &addr)?;
                tracing::info!(%server, %addr, "the user's home is another host; connecting there");
                config = config.redirected(&addr).await?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A fresh idempotency id.
pub fn new_client_id() -> u64 {
    rand::random()
}

async fn read_frame(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<ServerFrame>, ClientError> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(frame) = decoder
            .decode::<ServerFrame>()
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            return Ok(Some(frame));
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.push(&buf[..n]),
            Ok(None) => return Ok(None),
            // The host closed the connection with a reason; its code is an iim error code.
            Err(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(
                close,
            ))) if close.error_code.into_inner() != 0 => {
                return Err(ClientError::ClosedByHost {
                    code: ErrorCode(u16::try_from(close.error_code.into_inner()).unwrap_or(0)),
                    message: String::from_utf8_lossy(&close.reason).into_owned(),
                });
            }
            Err(e) => return Err(ClientError::ConnectionLost(e.to_string())),
        }
    }
}

/// Reads every frame the host sends and routes it: answers to their request, the rest to the
/// event queue. Ends when the stream does, failing whatever still waits.
async fn drive(
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
    max_frame: u32,
    pending: Pending,
    events: mpsc::UnboundedSender<Result<Event, ClientError>>,
) {
    decoder.set_max(max_frame);
    // The highest inbox position received on this connection. The host sends a device's
    // positions in increasing order, and sends one again only when it was not acknowledged in
    // time (docs/protocol.md, "Retransmission"): a position not above it is such a repeat.
    let mut highest: Option<u64> = None;
    let end = loop {
        let frame = match read_frame(&mut recv, &mut decoder).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break ClientError::ConnectionLost("the host closed the stream".into()),
            Err(e) => break e,
        };
        let (req, answer) = match frame {
            ServerFrame::Deliver { seq, message } => {
                if highest.is_some_and(|highest| seq <= highest) {
                    // A retransmission of what the application has (its ack is on its way,
                    // or the application has not acknowledged it yet).
                    continue;
                }
                highest = Some(seq);
                // Nobody may be listening for events any more; requests are still answered.
                let _ = events.send(Ok(Event::Message { seq, message }));
                continue;
            }
            ServerFrame::Synced { count } => {
                let _ = events.send(Ok(Event::Synced { count }));
                continue;
            }
            ServerFrame::Backlog { count, bytes, ids } => {
                let _ = events.send(Ok(Event::Backlog { count, bytes, ids }));
                continue;
            }
            ServerFrame::Error {
                req: None,
                code,
                message,
            } => break ClientError::ClosedByHost { code, message },
            ServerFrame::Error {
                req: Some(req),
                code,
                message,
            } => (req, Err(ClientError::Refused { code, message })),
            ServerFrame::Ok { req }
            | ServerFrame::LoggedIn { req, .. }
            | ServerFrame::Users { req, .. }
            | ServerFrame::Accepted { req, .. }
            | ServerFrame::Page { req, .. }
            | ServerFrame::Redirect { req, .. } => (req, Ok(frame)),
            ServerFrame::Welcome { .. } => {
                break ClientError::Protocol("Welcome sent twice".into());
            }
        };
        let waiter = lock(&pending).waiting.remove(&req);
        match waiter {
            Some(tx) => {
                let _ = tx.send(answer);
            }
            None => tracing::warn!(req, "answer to no request"),
        }
    };
    let waiting = {
        let mut state = lock(&pending);
        state.closed = Some(end.clone());
        std::mem::take(&mut state.waiting)
    };
    for (_, tx) in waiting {
        let _ = tx.send(Err(end.clone()));
    }
    let last = match end {
        e @ ClientError::ClosedByHost { .. } => Some(e),
        ClientError::ConnectionLost(_) => None,
        other => Some(other),
    };
    if let Some(e) = last {
        let _ = events.send(Err(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirected(server: &str, addr: &str) -> ClientError {
        ClientError::Redirected {
            server: server.into(),
            addr: addr.into(),
        }
    }

    fn config() -> ClientConfig {
        let mut config = ClientConfig::new("127.0.0.1:7501".parse().expect("addr"));
        config.server_name = "iim.example".into();
        config
    }

    #[test]
    fn a_redirect_answer_is_the_redirected_error() {
        let answer = ServerFrame::Redirect {
            req: 2,
            server: "h2".into(),
            addr: "127.0.0.1:7502".into(),
        };
        let e = unexpected(answer);
        assert!(matches!(&e, ClientError::Redirected { server, addr }
            if server == "h2" && addr == "127.0.0.1:7502"));
        assert_eq!(e.to_string(), "user's home is host h2 at 127.0.0.1:7502");
        assert!(!e.is_transient());
        assert_eq!(e.code(), None);
        // Another answer stays a protocol error.
        assert!(matches!(
            unexpected(ServerFrame::Ok { req: 2 }),
            ClientError::Protocol(_)
        ));
    }

    #[test]
    fn three_redirects_in_a_row_are_followed_and_a_fourth_is_a_loop() {
        let mut redirects = Redirects::default();
        for (server, addr) in [("h2", "a:1"), ("h3", "b:2"), ("h2", "a:1")] {
            redirects.follow(server, addr).expect("within the bound");
        }
        let Err(ClientError::Protocol(message)) = redirects.follow("h3", "b:2") else {
            panic!("a fourth redirect is followed");
        };
        assert!(message.starts_with("redirect loop"), "{message}");
        assert!(
            message.contains("h2 at a:1, h3 at b:2, h2 at a:1"),
            "{message}"
        );
        assert_eq!(MAX_REDIRECTS, 3);
    }

    #[test]
    fn a_redirect_address_is_an_ip_and_port_or_a_name_and_port() {
        let parse = |addr: &str| parse_host_port(addr).map_err(|e| e.to_string());
        assert_eq!(
            parse("127.0.0.1:7502"),
            Ok(Some("127.0.0.1:7502".parse().expect("addr")))
        );
        assert_eq!(
            parse("[::1]:7502"),
            Ok(Some("[::1]:7502".parse().expect("addr")))
        );
        // Names are looked up.
        assert_eq!(parse("h2.example.net:7447"), Ok(None));
        for bad in ["", "h2", "h2:", ":7447", "h2:port", "h2:70000", "::1:7447"] {
            let Err(message) = parse(bad) else {
                panic!("{bad:?} taken as an address");
            };
            assert!(message.contains("not host:port"), "{bad:?}: {message}");
        }
    }

    #[tokio::test]
    async fn a_name_is_resolved_and_an_ip_is_taken_as_it_is() {
        let ip = resolve("10.1.2.3:7502")
            .await
            .expect("an IP needs no lookup");
        assert_eq!(ip, "10.1.2.3:7502".parse().expect("addr"));
        // `localhost` resolves from the hosts file, without a network.
        let local = resolve("localhost:7502").await.expect("localhost resolves");
        assert!(local.ip().is_loopback(), "{local}");
        assert_eq!(local.port(), 7502);
        assert!(matches!(resolve("h2").await, Err(ClientError::Protocol(_))));
    }

    #[test]
    fn the_configuration_for_another_host_keeps_its_trust_but_not_its_sessions() {
        let config = config();
        let home = config.for_host("127.0.0.1:7502".parse().expect("addr"));
        assert_eq!(home.server, "127.0.0.1:7502".parse().expect("addr"));
        assert_eq!(home.server_name, "iim.example");
        assert_eq!(home.roots, config.roots);
        assert_eq!(home.request_timeout, config.request_timeout);
        assert!(!Arc::ptr_eq(&home.quic.0, &config.quic.0));
        assert!(Arc::ptr_eq(&config.clone().quic.0, &config.quic.0));
    }

    /// Drives `follow_redirects` with answers in place of hosts: each attempt takes the next
    /// answer, `Ok(())` or an error, and records the address it was made for.
    async fn follow(
        answers: Vec<Result<(), ClientError>>,
    ) -> (Result<SocketAddr, ClientError>, Vec<SocketAddr>) {
        let answers = Mutex::new(answers.into_iter());
        let tried = Mutex::new(Vec::new());
        let outcome = follow_redirects(&config(), |config| {
            tried.lock().expect("lock").push(config.server);
            let answer = answers.lock().expect("lock").next().expect("an answer");
            async move {
                assert_eq!(config.server_name, "iim.example");
                answer
            }
        })
        .await
        .map(|((), home)| home.server);
        (outcome, tried.into_inner().expect("lock"))
    }

    #[tokio::test]
    async fn redirects_are_followed_to_the_home_host() {
        let addr = |a: &str| a.parse::<SocketAddr>().expect("addr");
        let (home, tried) = follow(vec![
            Err(redirected("h2", "127.0.0.1:7502")),
            Err(redirected("h3", "127.0.0.1:7503")),
            Ok(()),
        ])
        .await;
        assert_eq!(home.expect("logged in"), addr("127.0.0.1:7503"));
        assert_eq!(
            tried,
            [
                addr("127.0.0.1:7501"),
                addr("127.0.0.1:7502"),
                addr("127.0.0.1:7503")
            ]
        );

        // Without a redirect, the configuration's own host.
        let (home, tried) = follow(vec![Ok(())]).await;
        assert_eq!(home.expect("logged in"), addr("127.0.0.1:7501"));
        assert_eq!(tried.len(), 1);
    }

    #[tokio::test]
    async fn a_redirect_loop_and_other_errors_end_the_attempts() {
        let around = (0..=MAX_REDIRECTS)
            .map(|i| {
                Err(redirected(
                    &format!("h{i}"),
                    &format!("127.0.0.1:{}", 7502 + i),
                ))
            })
            .collect();
        let (outcome, tried) = follow(around).await;
        assert!(
            matches!(&outcome, Err(ClientError::Protocol(m)) if m.starts_with("redirect loop")),
            "{outcome:?}"
        );
        assert_eq!(tried.len(), MAX_REDIRECTS + 1);

        // A refusal at the home host is the answer; nothing more is tried.
        let refused = ClientError::Refused {
            code: ErrorCode::AUTH_FAILED,
            message: "no".into(),
        };
        let (outcome, tried) =
            follow(vec![Err(redirected("h2", "127.0.0.1:7502")), Err(refused)]).await;
        assert_eq!(
            outcome.err().and_then(|e| e.code()),
            Some(ErrorCode::AUTH_FAILED)
        );
        assert_eq!(tried.len(), 2);

        // A redirect to something that is not an address is not followed.
        let (outcome, tried) = follow(vec![Err(redirected("h2", "nowhere"))]).await;
        assert!(
            matches!(outcome, Err(ClientError::Protocol(_))),
            "{outcome:?}"
        );
        assert_eq!(tried.len(), 1);
    }
}
