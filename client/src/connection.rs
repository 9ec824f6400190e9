//! One connection to a host: the application's requests go to the device's session machine
//! ([`iim_proto::session::ClientSession`]), and a driver task ([`crate::driver`]) moves its
//! frames over the QUIC stream and routes the answers back.

use crate::ClientError;
use crate::driver::{self, Reply, Shared};
use crate::transfer::{self, Destination, DownloadedFile};
use iim_proto::body::FileRef;
use iim_proto::file::Sha256;
use iim_proto::session::{Outgoing, Request};
use iim_proto::{
    AccountOp, Address, DeviceId, DeviceInfo, ErrorCode, Message, MessageId, MessageKind,
    RelationKind, RelationOp, ServerFrame, SessionMode, UserId,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
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
    /// How long the connection may stay quiet (nothing received) before the client sends a
    /// QUIC keep-alive. Each keep-alive keeps the host's idle timer and the NAT bindings on
    /// the way open, and asks the host for an answer, which is how a client that only listens
    /// notices a host that is gone (see [`ClientConfig::dead_host_after`]). It costs a few
    /// dozen bytes each way, and on a phone a radio wake-up: see [`NetworkProfile`].
    pub keep_alive: Duration,
    /// The QUIC idle timeout this client offers: a connection that receives nothing for that
    /// long is over. QUIC takes the smaller of the two peers' timeouts, so the host's
    /// `limits.idle_timeout_secs` (60 s unless configured) caps it. It must be longer than
    /// [`ClientConfig::keep_alive`].
    pub idle_timeout: Duration,
    /// How long a keep-alive may go unanswered before the client takes the host for gone and
    /// ends the connection (a [`Device`](crate::Device) then reconnects): a client that only
    /// listens notices a dead host `keep_alive + dead_host_after` after the last packet it
    /// got, instead of after the idle timeout. A live host answers a keep-alive within a
    /// round trip; this is the margin for a lossy link, where QUIC sends the keep-alive again.
    pub dead_host_after: Duration,
    /// Whether a [`Device`](crate::Device) watches the machine's network interfaces (netlink
    /// on Linux, the system's own notifications on macOS and Windows) and calls
    /// [`Device::network_changed`](crate::Device::network_changed) by itself when an address
    /// comes or goes. An application that gets the OS's connectivity callbacks itself (a
    /// mobile app) may turn it off and call `network_changed` from them; so may one that runs
    /// many devices in one process, since each device with it on keeps a watch (a netlink
    /// socket and a task) of its own.
    pub watch_network: bool,
    /// The QUIC configuration made from `roots` and the timeouts, shared by every clone of
    /// this configuration, with the TLS sessions it can resume (for 0-RTT).
    pub(crate) quic: QuicCache,
}

/// How a client spends keep-alives: the defaults of [`ClientConfig`]'s timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkProfile {
    /// A machine on a fixed network and mains power: a keep-alive after 10 s of quiet, idle
    /// timeout 30 s, a host taken for gone 5 s after an unanswered keep-alive (so a listener
    /// notices a dead host within 15 s of its last packet). 10 s of quiet costs nothing worth
    /// saving on a desk, and keeps a host restart's reconnect within 10 s.
    Desktop,
    /// A phone on battery and a mobile network: a keep-alive after 25 s of quiet (under the
    /// 30 s after which many mobile carriers' NATs forget a quiet UDP binding, so the host can
    /// still reach the phone), idle timeout 60 s (two keep-alives and their retransmissions
    /// fit in it), a host taken for gone 10 s after an unanswered keep-alive (a mobile link
    /// may hold a packet back for seconds). That is 2.5 times fewer radio wake-ups than
    /// `Desktop`; a listener notices a dead host within 35 s. A change of network is noticed
    /// at once whatever the profile ([`ClientConfig::watch_network`]).
    Mobile,
}

impl NetworkProfile {
    /// `(keep_alive, idle_timeout, dead_host_after)`.
    fn timeouts(self) -> (Duration, Duration, Duration) {
        let s = Duration::from_secs;
        match self {
            NetworkProfile::Desktop => (s(10), s(30), s(5)),
            NetworkProfile::Mobile => (s(25), s(60), s(10)),
        }
    }
}

impl std::str::FromStr for NetworkProfile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "desktop" => Ok(NetworkProfile::Desktop),
            "mobile" => Ok(NetworkProfile::Mobile),
            other => Err(format!(
                "unknown network profile {other:?}: `desktop` or `mobile`"
            )),
        }
    }
}

/// What a QUIC client configuration is made from.
#[derive(Clone, PartialEq, Eq)]
struct QuicParams {
    roots: Vec<CertificateDer<'static>>,
    keep_alive: Duration,
    idle_timeout: Duration,
}

/// A QUIC client configuration and what it was made from.
type MadeFor = (QuicParams, quinn::ClientConfig);

/// The QUIC client configuration of a [`ClientConfig`], made once for its roots.
#[derive(Clone, Default)]
pub(crate) struct QuicCache(Arc<Mutex<Option<MadeFor>>>);

impl std::fmt::Debug for QuicCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuicCache")
    }
}

impl QuicCache {
    /// The configuration for `config`'s roots and timeouts: the one made before if they are
    /// the same (so its TLS sessions can be resumed), else a new one.
    fn get(&self, config: &ClientConfig) -> Result<quinn::ClientConfig, ClientError> {
        let params = QuicParams {
            roots: config.roots.clone(),
            keep_alive: config.keep_alive,
            idle_timeout: config.idle_timeout,
        };
        let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((made_for, quic)) = cached.as_ref()
            && *made_for == params
        {
            return Ok(quic.clone());
        }
        let quic = quic_config(&params)?;
        *cached = Some((params, quic.clone()));
        Ok(quic)
    }
}

impl ClientConfig {
    /// A configuration for the host at `server`, named `localhost`, trusting nothing yet.
    pub fn new(server: SocketAddr) -> Self {
        let (keep_alive, idle_timeout, dead_host_after) = NetworkProfile::Desktop.timeouts();
        Self {
            server,
            server_name: "localhost".into(),
            roots: Vec::new(),
            agent: format!("iim-client/{}", env!("CARGO_PKG_VERSION")),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            reconnect_first: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            keep_alive,
            idle_timeout,
            dead_host_after,
            watch_network: true,
            quic: QuicCache::default(),
        }
    }

    /// Sets the keep-alive, idle timeout and dead-host margin of `profile`.
    pub fn with_profile(mut self, profile: NetworkProfile) -> Self {
        (self.keep_alive, self.idle_timeout, self.dead_host_after) = profile.timeouts();
        self
    }

    /// Checks that the timeouts make sense together: each at least a second (a millisecond
    /// for `dead_host_after`), a keep-alive sent before the idle timeout ends the connection.
    pub fn check(&self) -> Result<(), ClientError> {
        let second = Duration::from_secs(1);
        if self.keep_alive < second || self.idle_timeout < second {
            return Err(ClientError::Config(format!(
                "keep-alive ({:?}) and idle timeout ({:?}) must be at least 1 s",
                self.keep_alive, self.idle_timeout
            )));
        }
        if self.keep_alive >= self.idle_timeout {
            return Err(ClientError::Config(format!(
                "the keep-alive ({:?}) must be shorter than the idle timeout ({:?}), or a quiet \
                 connection ends before its keep-alive",
                self.keep_alive, self.idle_timeout
            )));
        }
        if self.idle_timeout > Duration::from_secs(3600) {
            return Err(ClientError::Config(format!(
                "idle timeout {:?} is over an hour",
                self.idle_timeout
            )));
        }
        if self.dead_host_after.is_zero() {
            return Err(ClientError::Config(
                "dead_host_after must not be zero".into(),
            ));
        }
        Ok(())
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

/// The quinn client configuration for an iim host: TLS 1.3, ALPN `iim/1`, trusting `roots`,
/// with the [`NetworkProfile::Desktop`] keep-alive and idle timeout.
pub fn quic_client_config(
    roots: &[CertificateDer<'static>],
) -> Result<quinn::ClientConfig, ClientError> {
    let (keep_alive, idle_timeout, _) = NetworkProfile::Desktop.timeouts();
    quic_config(&QuicParams {
        roots: roots.to_vec(),
        keep_alive,
        idle_timeout,
    })
}

/// [`quic_client_config`] with `params`' timeouts.
fn quic_config(params: &QuicParams) -> Result<quinn::ClientConfig, ClientError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in &params.roots {
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
    // Keep-alives well inside the idle timeout keep a quiet session (and the NAT binding of a
    // mobile network) open.
    transport.keep_alive_interval(Some(params.keep_alive));
    let idle = quinn::IdleTimeout::try_from(params.idle_timeout)
        .map_err(|_| ClientError::Config(format!("idle timeout {:?}", params.idle_timeout)))?;
    transport.max_idle_timeout(Some(idle));
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

/// A connection to an iim host. Dropping it closes the connection.
pub struct Connection {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    /// The device's session machine, which this connection drives.
    shared: Arc<Shared>,
    /// This connection's number on the machine.
    generation: u64,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<Result<Event, ClientError>>>,
    max_body: u32,
    server: String,
    used_0rtt: bool,
    /// How long a file transfer waits for the host: an answer, or room for the next bytes.
    request_timeout: Duration,
}

impl Connection {
    /// Connects, opens the stream and does the version handshake. Resuming a TLS session
    /// with a host this configuration reached before, it sends `Hello` as 0-RTT early data.
    pub async fn connect(config: &ClientConfig) -> Result<Self, ClientError> {
        Self::open(config, &Self::machine(config), None).await
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
        Self::resume_on(config, &Self::machine(config), user, device, token, mode).await
    }

    /// [`Connection::resume`] on a device's machine.
    pub(crate) async fn resume_on(
        config: &ClientConfig,
        shared: &Arc<Shared>,
        user: &UserId,
        device: &DeviceId,
        token: &str,
        mode: SessionMode,
    ) -> Result<Self, ClientError> {
        let authenticate = Request::Authenticate {
            user: user.clone(),
            device: device.clone(),
            token: token.to_owned(),
            mode,
        };
        Self::open(config, shared, Some(authenticate)).await
    }

    /// The machine of a connection on its own: its submissions go with it.
    fn machine(config: &ClientConfig) -> Arc<Shared> {
        Shared::new(&config.agent, config.request_timeout, false)
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
        Self::login_home_on(config, None, user, password, device, mode).await
    }

    /// [`Connection::login_home`], on a device's machine if one is given.
    pub(crate) async fn login_home_on(
        config: &ClientConfig,
        shared: Option<&Arc<Shared>>,
        user: &UserId,
        password: &str,
        device: &DeviceId,
        mode: SessionMode,
    ) -> Result<(Self, String, ClientConfig), ClientError> {
        let ((conn, token), home) = follow_redirects(config, |config| async move {
            let shared = shared.cloned().unwrap_or_else(|| Self::machine(&config));
            let conn = Self::open(&config, &shared, None).await?;
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

    /// Connects, sends `Hello` and `first`, and waits for their answers: in 0-RTT early data
    /// if the TLS session can be resumed, else (or if the host refuses early data) after the
    /// handshake.
    async fn open(
        config: &ClientConfig,
        shared: &Arc<Shared>,
        first: Option<Request>,
    ) -> Result<Self, ClientError> {
        match Self::attempt(config, shared, first.clone(), true).await {
            Ok(conn) => Ok(conn),
            Err((true, e)) => {
                tracing::debug!(error = %e, "0-RTT attempt failed; connecting in full");
                Self::attempt(config, shared, first, false)
                    .await
                    .map_err(|(_, e)| e)
            }
            Err((false, e)) => Err(e),
        }
    }

    /// One connection attempt; the error says whether it went out as 0-RTT.
    async fn attempt(
        config: &ClientConfig,
        shared: &Arc<Shared>,
        first: Option<Request>,
        allow_0rtt: bool,
    ) -> Result<Self, (bool, ClientError)> {
        let addr = config.server;
        let connect_err = |source: Box<dyn std::error::Error + Send + Sync>| ClientError::Connect {
            addr,
            source: source.into(),
        };
        let full = |e| (false, e);
        let bind: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| full(connect_err(e.into())))?;
        config.check().map_err(full)?;
        endpoint.set_default_client_config(config.quic.get(config).map_err(full)?);
        let connecting = endpoint
            .connect(addr, &config.server_name)
            .map_err(|e| full(connect_err(e.into())))?;
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
                    .map_err(|e| {
                        full(closed_by_host(&e).unwrap_or_else(|| connect_err(e.into())))
                    })?;
                (conn, None)
            }
        };
        let zero_rtt = early.is_some();
        let handshake = async {
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| closed_by_host(&e).unwrap_or_else(|| connect_err(e.into())))?;
            let (generation, welcome, events) = shared.start();
            let answer = match first {
                Some(first) => Some(shared.lock().request(generation, first)?),
                None => None,
            };
            tokio::spawn(driver::drive(
                Arc::clone(shared),
                generation,
                conn.clone(),
                (send, recv),
                driver::Liveness::new(config.keep_alive, config.dead_host_after),
            ));
            shared.wake();
            let welcome = match welcome.await {
                Ok(welcome) => welcome,
                Err(_) => {
                    return Err(shared.lock().unusable(generation).unwrap_or_else(|| {
                        ClientError::ConnectionLost("closed during handshake".into())
                    }));
                }
            };
            let answer = match answer {
                Some(answer) => Some(answer.await.unwrap_or_else(|_| {
                    Err(ClientError::ConnectionLost(
                        "closed before answering".into(),
                    ))
                })?),
                None => None,
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
            Ok::<_, ClientError>((generation, welcome, events, answer, used_0rtt))
        };
        let (generation, welcome, events, answer, used_0rtt) =
            tokio::time::timeout(config.connect_timeout, handshake)
                .await
                .map_err(|e| (zero_rtt, connect_err(e.into())))?
                .map_err(|e| {
                    let lost = matches!(
                        e,
                        ClientError::ConnectionLost(_) | ClientError::Connect { .. }
                    );
                    (zero_rtt && lost, e)
                })?;
        if let Some(answer) = answer {
            expect_ok(answer).map_err(full)?;
        }
        Ok(Self {
            conn,
            endpoint,
            shared: Arc::clone(shared),
            generation,
            events: tokio::sync::Mutex::new(events),
            max_body: welcome.max_body,
            server: welcome.server,
            used_0rtt,
            request_timeout: config.request_timeout,
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

    /// Tells the connection that the machine's network changed (an address came or went, the
    /// OS switched from Wi-Fi to the mobile network): what a mobile application calls from
    /// the system's connectivity callback. The connection moves to a new UDP socket
    /// ([`Connection::rebind`]), which sends a probe to the host at once from whatever
    /// address the system now routes through, with a new connection id; the host validates
    /// the new path and sends there from then on, within a round trip. Without it, the host
    /// keeps sending to the old address until the client next says something (its next
    /// keep-alive, when it only listens). A new socket rather than the old one, because the
    /// old one may be bound to an address that is gone. Returns the new local address.
    pub fn network_changed(&self) -> Result<SocketAddr, ClientError> {
        let moved_to = self.rebind()?;
        tracing::info!(%moved_to, "network changed; probing the path to the host");
        Ok(moved_to)
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
            .request(Request::Register {
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
            .request(Request::Login {
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
            .request(Request::Authenticate {
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
        let answer = self.request(Request::Logout).await?;
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
        let answer = self.request(Request::Relation { kind, op }).await?;
        expect_ok(answer)
    }

    /// The list of `kind`, sorted by name.
    pub async fn relations(&self, kind: RelationKind) -> Result<Vec<UserId>, ClientError> {
        let answer = self
            .request(Request::Relation {
                kind,
                op: RelationOp::List,
            })
            .await?;
        match answer {
            ServerFrame::Users { users, .. } => Ok(users),
            other => Err(unexpected(other)),
        }
    }

    /// Replaces the account's password. Every other device's token is revoked and its
    /// sessions end (they log in again with the new password); this device keeps its token.
    pub async fn change_password(&self, old: &str, new: &str) -> Result<(), ClientError> {
        let op = AccountOp::ChangePassword {
            old: old.to_owned(),
            new: new.to_owned(),
        };
        expect_ok(self.request(Request::Account(op)).await?)
    }

    /// The account's devices (those with a token), sorted by name, with their last activity
    /// and open sessions.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        match self.request(Request::Account(AccountOp::Devices)).await? {
            ServerFrame::Devices { devices, .. } => Ok(devices),
            other => Err(unexpected(other)),
        }
    }

    /// Revokes `device`: its token, its sessions (ended at once) and its deliveries.
    pub async fn revoke_device(&self, device: &DeviceId) -> Result<(), ClientError> {
        let op = AccountOp::Revoke(device.clone());
        expect_ok(self.request(Request::Account(op)).await?)
    }

    /// Deletes the account and everything it owns; cannot be undone. The connection then
    /// ends.
    pub async fn delete_account(&self, password: &str) -> Result<(), ClientError> {
        let op = AccountOp::Delete {
            password: password.to_owned(),
        };
        expect_ok(self.request(Request::Account(op)).await?)
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
    pub async fn submit<A: Clone + Into<Address>>(
        &self,
        client_id: u64,
        kind: MessageKind,
        to: &[A],
        body: &[u8],
    ) -> Result<Accepted, ClientError> {
        let answer = self.start_submit(client_id, kind, addresses(to), body.to_vec(), None)?;
        accepted(answer.wait().await?)
    }

    /// [`Connection::submit`] with a time to live: the recipients whose devices have not got
    /// the message `ttl` after the host accepted it never will, and the sender gets an
    /// `expired` receipt for each of them (`docs/plugins.md`). Whole seconds, at least 1.
    pub async fn submit_expiring<A: Clone + Into<Address>>(
        &self,
        client_id: u64,
        kind: MessageKind,
        to: &[A],
        body: &[u8],
        ttl: Duration,
    ) -> Result<Accepted, ClientError> {
        let answer = self.start_submit(
            client_id,
            kind,
            addresses(to),
            body.to_vec(),
            Some(ttl_secs(ttl)),
        )?;
        accepted(answer.wait().await?)
    }

    /// Adds a submission to the machine's outbox and returns at once, without its answer:
    /// submissions started one after the other reach the host, and are accepted, in that order.
    pub(crate) fn start_submit(
        &self,
        client_id: u64,
        kind: MessageKind,
        to: Vec<Address>,
        body: Vec<u8>,
        ttl_secs: Option<u32>,
    ) -> Result<Answer, ClientError> {
        let outgoing = Outgoing {
            client_id,
            kind,
            to,
            body,
            ttl_secs,
        };
        let rx = {
            let mut core = self.shared.lock();
            if let Some(e) = core.unusable(self.generation) {
                return Err(e);
            }
            core.submit(outgoing)
        };
        self.shared.wake();
        Ok(Answer { rx })
    }

    /// Uploads the file at `path` to the host, on a stream of its own, and returns the
    /// reference to send in a `file` message (kind [`iim_proto::body::FILE_KIND`], body
    /// [`FileRef::to_json`]). The connection must be authenticated.
    ///
    /// The file is read twice and never held in memory whole: once to hash it (the host
    /// names files by their SHA-256), once to send it. The host asks only for what it lacks:
    /// nothing if it has the file already, the rest if an earlier upload of the same bytes was
    /// cut off. `progress` is called with the bytes the host has and the file's size, first
    /// with where the upload starts, then after every chunk.
    ///
    /// Fails with [`ClientError::Refused`] if the host refuses the file (its code and
    /// reason kept), with [`ClientError::File`] if the file cannot be read, has a name the
    /// protocol does not allow (its name is `path`'s last component), or changed while it
    /// was uploaded, and with an error that [`ClientError::is_transient`] if the connection
    /// was lost: uploading again on a new connection goes on from what the host kept.
    /// [`Device::upload_file`](crate::Device::upload_file) does that by itself.
    pub async fn upload_file(
        &self,
        path: &Path,
        media_type: &str,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<FileRef, ClientError> {
        transfer::upload(&self.conn, self.request_timeout, path, media_type, progress).await
    }

    /// Downloads the file `sha256` to `out`, on a stream of its own, and says what it is.
    /// The connection must be authenticated, and the user allowed to read the file (its
    /// uploader, or a recipient of a `file` message naming it).
    ///
    /// The bytes go to `<out>.part` as they come; if that exists (an earlier download was
    /// cut off), the download goes on from its end. Once the host has sent every byte, the
    /// SHA-256 of the whole `.part` is checked and it is renamed to `out` (replacing what
    /// was there). `progress` is called with the bytes there are and the file's size.
    ///
    /// Fails with [`ClientError::Refused`] if the host refuses (`not_found`: no such file
    /// that the user may read), with [`ClientError::Corrupt`] if the bytes are not the file
    /// (the `.part` is then deleted), with [`ClientError::File`] if `out` or its `.part`
    /// cannot be written, and with an error that [`ClientError::is_transient`] if the
    /// connection was lost: downloading again goes on from the `.part`.
    /// [`Device::download_file`](crate::Device::download_file) does that by itself.
    pub async fn download_file(
        &self,
        sha256: &Sha256,
        out: &Path,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<DownloadedFile, ClientError> {
        let to = Destination::File(out);
        transfer::download(&self.conn, self.request_timeout, sha256, to, progress).await
    }

    /// [`Connection::download_file`] into the directory `dir`, under the name the host sends
    /// (its uploader's). Until it is whole the file is `<dir>/<id>.part` (`id` in hex), as
    /// the name is not known before the host answers. A name that is not a plain file name
    /// is refused, and so is one that exists in `dir` already: a download does not replace
    /// a file nobody named.
    pub async fn download_file_into(
        &self,
        sha256: &Sha256,
        dir: &Path,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<DownloadedFile, ClientError> {
        let to = Destination::Directory(dir);
        transfer::download(&self.conn, self.request_timeout, sha256, to, progress).await
    }

    /// In a [`SessionMode::Paged`] session, asks for the next page of the backlog: up to `max`
    /// messages, which arrive as [`Event::Message`]s before this returns.
    pub async fn fetch(&self, max: u32) -> Result<Page, ClientError> {
        page(self.start_request(Request::Fetch { max })?.wait().await?)
    }

    /// Acknowledges every delivery up to and including `seq` (and a repeat the host sent again
    /// at a new position that this makes due: see [`iim_proto::session::Filter`]).
    pub async fn ack(&self, seq: u64) -> Result<(), ClientError> {
        {
            let mut core = self.shared.lock();
            if let Some(e) = core.unusable(self.generation) {
                return Err(e);
            }
            core.session.ack(seq);
        }
        self.shared.wake();
        Ok(())
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

    async fn request(&self, request: Request) -> Result<ServerFrame, ClientError> {
        self.start_request(request)?.wait().await
    }

    /// Makes a request and returns at once, with what waits for its answer.
    fn start_request(&self, request: Request) -> Result<Answer, ClientError> {
        let rx = self.shared.lock().request(self.generation, request)?;
        self.shared.wake();
        Ok(Answer { rx })
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

/// A request written to the host, waiting for its answer (the machine times it out).
pub(crate) struct Answer {
    rx: oneshot::Receiver<Reply>,
}

impl Answer {
    /// The answer, or why none came: the connection ended, or the request timed out.
    pub(crate) async fn wait(self) -> Result<ServerFrame, ClientError> {
        self.rx
            .await
            .unwrap_or_else(|_| Err(ClientError::ConnectionLost("the connection ended".into())))
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

/// The host's own close of a connection it would not serve (over a limit of its address,
/// shutting down), as the error it says: its code and reason, rather than a failure to connect.
fn closed_by_host(e: &quinn::ConnectionError) -> Option<ClientError> {
    let quinn::ConnectionError::ApplicationClosed(close) = e else {
        return None;
    };
    let code = u16::try_from(close.error_code.into_inner())
        .ok()
        .filter(|&code| code != 0)?;
    Some(ClientError::ClosedByHost {
        code: ErrorCode(code),
        message: String::from_utf8_lossy(&close.reason).into_owned(),
    })
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

/// The addresses of a submission, from users or addresses.
pub(crate) fn addresses<A: Clone + Into<Address>>(to: &[A]) -> Vec<Address> {
    to.iter().cloned().map(Into::into).collect()
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
            code: iim_proto::ErrorCode::AUTH_FAILED,
            message: "no".into(),
        };
        let (outcome, tried) =
            follow(vec![Err(redirected("h2", "127.0.0.1:7502")), Err(refused)]).await;
        assert_eq!(
            outcome.err().and_then(|e| e.code()),
            Some(iim_proto::ErrorCode::AUTH_FAILED)
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
