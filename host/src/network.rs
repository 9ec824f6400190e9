//! A host's link to the exchange of its network (DESIGN.md §2–3).
//!
//! [`Network`] is the host's side of the link: it joins, takes the directory entries it lacks
//! and every later one into the [`Directory`], sends the relay outbox (`905`s) in order and
//! drops what the exchange acknowledged, and applies the `906`s it receives to the inboxes of
//! its users through the IIM entry point, acknowledging each once it is durable — the hop's
//! rules are [`RelayLink`]'s. It also carries claims, look-ups and presence reports, and
//! releases the names of deleted accounts (kept in the store until the exchange has released
//! them, and asked again whenever the link comes up). Link lost: it joins again with a growing
//! wait, and each side sends again what the other did not acknowledge. [`first_join`] gets a
//! new host its number before it serves anyone.

use crate::blobs::{Blobs, FileId};
use crate::config::Config;
use crate::directory::Directory;
use crate::iim::{Iim, IimError};
use crate::outbox::RelayOutbox;
use crate::peer::{self, PeerError, PeerStream};
use crate::registry::Registry;
use crate::store::{Store, StoreError};
use iim_proto::file::Sha256;
use iim_proto::peer::{ExchangeFrame, FilePart, HostFrame, PEER_ALPN, PEER_VERSION, ServerInfo};
use iim_proto::relay::{AckBeyondSent, Incoming, RelayLink};
use iim_proto::session::Backoff;
use iim_proto::{Address, ErrorCode, UserId};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// How long a claim or look-up waits for the exchange.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long connecting and joining may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait before the first attempt to join again; it doubles after each failed attempt.
const REJOIN_FIRST: Duration = Duration::from_millis(200);
/// The longest wait between two attempts to join.
const REJOIN_MAX: Duration = Duration::from_secs(5);
/// The wait before names left to release are asked again while the link is up (the exchange
/// did not answer in time); a link that comes up asks at once.
const RELEASE_RETRY: Duration = Duration::from_secs(5);

/// Why a claim, a release or a look-up could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The exchange is not connected or did not answer in time.
    #[error("the exchange is out of reach: {0}")]
    Unavailable(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why the link to the exchange failed (it joins again), or why a host cannot join at all.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// `network.exchange` or `network.exchange_cert` is not set.
    #[error("{0} is not set")]
    Unconfigured(&'static str),
    /// The exchange's certificate could not be read.
    #[error("cannot read the exchange's certificate {}: {source}", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate of the file is not usable as a root.
    #[error("{}: not a usable certificate: {source}", path.display())]
    Root {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls::Error,
    },
    /// The TLS configuration could not be made.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The TLS configuration is not usable for QUIC.
    #[error("TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The exchange's address could not be resolved.
    #[error("cannot resolve {addr}: {reason}")]
    Resolve {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The local endpoint could not be made.
    #[error("cannot open a local endpoint: {0}")]
    Endpoint(#[source] std::io::Error),
    /// The connection could not be started.
    #[error("cannot connect to the exchange at {addr}: {source}")]
    Connect {
        /// The exchange's address.
        addr: String,
        /// Why.
        source: quinn::ConnectError,
    },
    /// The connection failed.
    #[error("the connection to the exchange failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The link's stream failed.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// The exchange refused the join.
    #[error("the exchange refused this host: {message} ({code})")]
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its reason.
        message: String,
    },
    /// The exchange ended the link, saying why.
    #[error("the exchange ended the link: {message} ({code})")]
    Ended {
        /// Its code.
        code: ErrorCode,
        /// Its reason.
        message: String,
    },
    /// The exchange sent what the protocol does not allow.
    #[error("the exchange broke the protocol: {0}")]
    Protocol(String),
    /// The exchange acknowledged envelopes this host never sent.
    #[error(transparent)]
    Acknowledged(#[from] AckBeyondSent),
    /// The exchange gives this host another number than its store holds.
    #[error(
        "the exchange numbers this host {given}, but its store says {stored:?}: is another host \
         using server id {server}?"
    )]
    NumberMismatch {
        /// The number the exchange gave.
        given: u16,
        /// The number the store holds.
        stored: Option<u16>,
        /// This host's server id.
        server: String,
    },
    /// Something took too long.
    #[error("{0} took too long")]
    Timeout(&'static str),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A relayed message could not be applied.
    #[error("a relayed message could not be applied: {0}")]
    Apply(#[from] IimError),
}

impl LinkError {
    /// Whether trying again cannot help: the secret, the credential, the version or the
    /// server id is wrong, or the configuration is, which only the operator can fix.
    fn is_final(&self) -> bool {
        match self {
            LinkError::Refused { code, .. } => [
                ErrorCode::AUTH_FAILED,
                ErrorCode::UNSUPPORTED_VERSION,
                ErrorCode::INVALID_ARGUMENT,
                ErrorCode::HANDSHAKE,
            ]
            .contains(code),
            LinkError::Unconfigured(_)
            | LinkError::Certificate { .. }
            | LinkError::Root { .. }
            | LinkError::Tls(_)
            | LinkError::Quic(_) => true,
            _ => false,
        }
    }
}

/// A host's side of its link to the exchange.
pub struct Network {
    /// What the host knows of its network.
    pub directory: Arc<Directory>,
    /// The relay outbox.
    pub outbox: Arc<RelayOutbox>,
    /// This host's address for clients, given at each join.
    addr: String,
    store: Store,
    up: AtomicBool,
    requests: Mutex<HashMap<u64, oneshot::Sender<ExchangeFrame>>>,
    next_req: AtomicU64,
    control: mpsc::UnboundedSender<HostFrame>,
    control_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<HostFrame>>,
    /// This host's users whose number of online devices changed since the link last told
    /// the exchange: it sends their counts as they are when it sends them.
    presence_changed: Mutex<HashSet<UserId>>,
    presence_ready: Notify,
    /// The files being fetched from other hosts, each by one download at a time.
    fetching: Mutex<HashMap<Sha256, Arc<tokio::sync::Mutex<()>>>>,
    /// Held while a name waiting to be released is released, or claimed again: the claim
    /// comes after the release, and no release follows it.
    releasing: tokio::sync::Mutex<()>,
    /// Wakes the releases: a name waits to be released, or the link came up.
    releases_ready: Notify,
}

/// What the link drives besides the network: the configuration it joins with, the entry
/// point that applies relayed messages, the registry it reports presence from, and the
/// signal to stop.
pub struct LinkParts {
    /// The host's configuration.
    pub config: Config,
    /// The IIM entry point.
    pub iim: Arc<Iim>,
    /// Online devices.
    pub registry: Arc<Registry>,
    /// Becomes `true` when the host shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// The blob store, whose files other hosts may fetch.
    pub blobs: Blobs,
}

impl Network {
    /// The link of a host reachable by clients at `addr`, over `directory` and `outbox`.
    pub fn new(
        directory: Arc<Directory>,
        outbox: Arc<RelayOutbox>,
        addr: String,
        store: Store,
    ) -> Self {
        let (control, control_rx) = mpsc::unbounded_channel();
        Self {
            directory,
            outbox,
            addr,
            store,
            up: AtomicBool::new(false),
            requests: Mutex::default(),
            next_req: AtomicU64::new(1),
            control,
            control_rx: tokio::sync::Mutex::new(control_rx),
            presence_changed: Mutex::default(),
            presence_ready: Notify::new(),
            fetching: Mutex::default(),
            releasing: tokio::sync::Mutex::new(()),
            releases_ready: Notify::new(),
        }
    }

    /// This host's server id.
    pub fn server(&self) -> &str {
        self.directory.server()
    }

    /// Whether the link to the exchange is up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Registration, or a group's creation: claims `name` for this host. `Ok(home)`: its
    /// home afterwards (this host if the name was free or its own already). A user's name
    /// that waited to be released ([`Network::release_later`]) and is this host's again
    /// waits no more.
    pub async fn claim(&self, name: impl Into<Address>) -> Result<String, NetworkError> {
        let name = name.into();
        let waiting = match &name {
            Address::User(user) if self.store.network.is_to_release(user)? => Some(user.clone()),
            _ => None,
        };
        // Only then in turn with the releases: other claims do not wait for each other.
        let _releasing = match waiting {
            Some(_) => Some(self.releasing.lock().await),
            None => None,
        };
        match self
            .request(|req| HostFrame::Claim {
                req,
                user: name.clone(),
            })
            .await?
        {
            ExchangeFrame::Claimed { home, .. } => {
                self.directory.learn(&[(name, home.clone())])?;
                if let Some(user) = waiting
                    && home == self.server()
                {
                    self.store.network.release_done(&user)?;
                }
                Ok(home)
            }
            other => Err(NetworkError::Unavailable(format!(
                "unexpected answer to a claim: {other:?}"
            ))),
        }
    }

    /// Releases the name of `user`, whose account this host deleted, at the exchange: the
    /// name is free in the network again, and the other hosts forget it. `Ok`: the exchange
    /// does not list the name as this host's any more (released now, free already, or —
    /// logged — another host's), this host's directory says the same, and the name no longer
    /// waits to be released ([`Network::release_later`]). Call it once the account is gone
    /// from this host.
    pub async fn release(&self, user: UserId) -> Result<(), NetworkError> {
        let _releasing = self.releasing.lock().await;
        self.release_now(&user).await
    }

    /// [`Network::release`], in turn with claims (the caller holds `releasing`).
    async fn release_now(&self, user: &UserId) -> Result<(), NetworkError> {
        match self
            .request(|req| HostFrame::Release {
                req,
                user: user.clone(),
            })
            .await?
        {
            ExchangeFrame::Released { home, .. } => {
                if let Some(home) = &home {
                    tracing::warn!(%user, %home, "the exchange did not release the name of a deleted account: it is another host's");
                }
                self.directory
                    .learn(&[(user.clone().into(), home.unwrap_or_default())])?;
                self.store.network.release_done(user)?;
                tracing::info!(%user, "user name released in the network");
                Ok(())
            }
            other => Err(NetworkError::Unavailable(format!(
                "unexpected answer to a release: {other:?}"
            ))),
        }
    }

    /// Records, durably after the next flush, that the name of `user`, whose account this
    /// host deleted, is to be released at the exchange, and wakes the releases: the link
    /// releases it as soon as it is up, after a restart too, trying again until the exchange
    /// answers. A name claimed again here before that ([`Network::claim`]), or whose account
    /// exists here again, is not released.
    pub fn release_later(&self, user: &UserId) -> Result<(), StoreError> {
        self.store.network.release_later(user)?;
        self.releases_ready.notify_one();
        Ok(())
    }

    /// Releases every name that waits to be released, while the link is up. `Ok(true)`: some
    /// are left, for the exchange did not answer.
    async fn release_waiting(&self) -> Result<bool, NetworkError> {
        if !self.is_up() {
            // The link coming up wakes the releases again.
            return Ok(false);
        }
        let names = self.store.network.to_release()?;
        if names.is_empty() {
            return Ok(false);
        }
        // Only what is durable is released: an account whose deletion a crash could undo
        // keeps its name.
        self.store.flush().await?;
        for user in names {
            let _releasing = self.releasing.lock().await;
            if !self.store.network.is_to_release(&user)? {
                continue;
            }
            if self.store.accounts.exists(&user)? {
                // Registered here again: the name is in use.
                self.store.network.release_done(&user)?;
                continue;
            }
            match self.release_now(&user).await {
                Ok(()) => {}
                Err(NetworkError::Unavailable(reason)) => {
                    tracing::info!(%user, %reason, "a deleted account's name is released later");
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Asks the exchange for the homes of `names` (users or groups) this host does not know,
    /// and caches them. Does nothing while the exchange is out of reach (they stay unknown).
    pub async fn look_up(&self, names: &[Address]) -> Result<(), NetworkError> {
        let unknown: Vec<Address> = names
            .iter()
            .filter(|u| !self.directory.knows(u))
            .cloned()
            .collect();
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
            self.directory.learn(&homes)?;
        }
        Ok(())
    }

    /// Runs `fetch` (of file `sha256` from another host) unless another one for the same file
    /// runs: then waits for that one, and runs `fetch` after it (which finds the file here).
    pub async fn fetching<T>(&self, sha256: Sha256, fetch: impl Future<Output = T>) -> T {
        let one = Arc::clone(lock(&self.fetching).entry(sha256).or_default());
        let outcome = {
            let _turn = one.lock().await;
            fetch.await
        };
        let mut fetching = lock(&self.fetching);
        // Ours and the map's: nobody else waits.
        if Arc::strong_count(&one) == 2 {
            fetching.remove(&sha256);
        }
        outcome
    }

    /// Asks host `server` for part of file `sha256` from `offset` (at most
    /// [`iim_proto::peer::FILE_PART`] bytes).
    pub async fn fetch_part(
        &self,
        server: &str,
        sha256: Sha256,
        offset: u64,
    ) -> Result<FilePart, NetworkError> {
        match self
            .request(|req| HostFrame::FileGet {
                req,
                server: server.to_owned(),
                sha256,
                offset,
            })
            .await?
        {
            ExchangeFrame::FilePart { part, .. } => Ok(part),
            other => Err(NetworkError::Unavailable(format!(
                "unexpected answer to a file request: {other:?}"
            ))),
        }
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
}

fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(|p| p.into_inner())
}

/// The QUIC client configuration for the exchange: TLS 1.3, ALPN `iim-peer/1`, trusting the
/// configured certificate.
fn client_config(config: &Config) -> Result<quinn::ClientConfig, LinkError> {
    let path = config
        .network
        .exchange_cert
        .as_ref()
        .ok_or(LinkError::Unconfigured("network.exchange_cert"))?;
    let certificate = |source| LinkError::Certificate {
        path: path.clone(),
        source,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(certificate)? {
        roots
            .add(cert.map_err(certificate)?)
            .map_err(|source| LinkError::Root {
                path: path.clone(),
                source,
            })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(peer::transport()));
    Ok(client)
}

async fn resolve(addr: &str) -> Result<SocketAddr, LinkError> {
    if let Ok(addr) = addr.parse() {
        return Ok(addr);
    }
    let failed = |reason: String| LinkError::Resolve {
        addr: addr.to_owned(),
        reason,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| failed(e.to_string()))?
        .next()
        .ok_or_else(|| failed("no address".into()))
}

/// A host's end of its link to the exchange.
type Link = PeerStream<ExchangeFrame>;

/// What the exchange's `Joined` said.
struct Joined {
    number: u16,
    servers: Vec<ServerInfo>,
    relayed_out: u64,
}

/// The exchanges a host may join (`network.exchange`), the one to try next first: the one
/// it was last linked to, until it fails.
struct Exchanges<'a> {
    list: Vec<&'a str>,
    next: usize,
}

impl<'a> Exchanges<'a> {
    fn of(config: &'a Config) -> Self {
        Self {
            list: config.network.exchanges(),
            next: 0,
        }
    }

    /// The exchange to try now.
    fn current(&self) -> Result<&'a str, LinkError> {
        let n = self.list.len();
        match n {
            0 => Err(LinkError::Unconfigured("network.exchange")),
            _ => Ok(self.list[self.next % n]),
        }
    }

    /// The one tried, or linked to, failed: the next is tried first.
    fn failed(&mut self) {
        self.next = self.next.wrapping_add(1);
    }
}

/// Connects to the exchange at `exchange` and joins as the host of `directory`, reachable at
/// `addr`: the link, and the exchange's `Joined`.
async fn join(
    config: &Config,
    exchange: &str,
    directory: &Directory,
    addr: &str,
    store: &Store,
) -> Result<(Link, Joined), LinkError> {
    let exchange_addr = resolve(exchange).await?;
    let bind: SocketAddr = if exchange_addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(LinkError::Endpoint)?;
    endpoint.set_default_client_config(client_config(config)?);
    let conn = endpoint
        .connect(exchange_addr, config.network.exchange_name())
        .map_err(|source| LinkError::Connect {
            addr: exchange.to_owned(),
            source,
        })?
        .await?;
    let (send, recv) = conn.open_bi().await?;
    let mut link = Link::new(conn, send, recv, "the exchange", None);
    // What this host says it has must be durable: the exchange drops what it acknowledges.
    let relayed_in = store.network.relayed_in()?;
    store.flush().await?;
    link.write(&HostFrame::Join {
        version: PEER_VERSION,
        server: directory.server().to_owned(),
        addr: addr.to_owned(),
        secret: config.network.secret.clone().unwrap_or_default(),
        credential: store.network.host_credential()?,
        directory_since: directory.version(),
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
        ExchangeFrame::Error { code, message } => Err(LinkError::Refused { code, message }),
        other => Err(LinkError::Protocol(format!(
            "it answered the join with {other:?}"
        ))),
    }
}

/// Before a host that never joined its network serves anyone: joins once to learn its number,
/// the high bits of its message ids, and records it. Tries until the exchange answers, or
/// refuses the host for a reason only the operator can fix.
pub async fn first_join(
    config: &Config,
    directory: &Directory,
    addr: &str,
    store: &Store,
) -> Result<u16, LinkError> {
    // This host's credential, made and kept before the exchange ever sees it: a crash at any
    // moment of the first join leaves the host able to show it again.
    if store.network.host_credential()?.is_empty() {
        let credential: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        store.network.set_host_credential(&credential)?;
        store.flush().await?;
    }
    let mut backoff = Backoff::new(REJOIN_FIRST, REJOIN_MAX);
    let mut exchanges = Exchanges::of(config);
    loop {
        let exchange = exchanges.current()?;
        let joined =
            tokio::time::timeout(JOIN_TIMEOUT, join(config, exchange, directory, addr, store))
                .await
                .unwrap_or(Err(LinkError::Timeout("joining")));
        match joined {
            Ok((
                mut link,
                Joined {
                    number, servers, ..
                },
            )) => {
                directory.set_servers(servers)?;
                match claim_existing_users(&mut link, directory, store).await {
                    Ok(()) => {
                        store.network.set_host_number(number)?;
                        store.flush().await?;
                        link.conn.close(0u32.into(), b"joined");
                        return Ok(number);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming this host's users failed; joining again");
                        link.conn.close(0u32.into(), b"");
                    }
                }
            }
            Err(e) if e.is_final() => return Err(e),
            Err(e) => {
                tracing::warn!(
                    %exchange,
                    error = %e,
                    "waiting for the exchange to give this host its number"
                );
                exchanges.failed();
            }
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

/// A host that served users alone before it joined: claims each of its users in the
/// network's directory, so that the other hosts find them. A name another host claimed first
/// stays that host's, here too: this host's user of that name is no longer reachable (logged
/// as an error for the operator, who must rename one of them).
async fn claim_existing_users(
    link: &mut Link,
    directory: &Directory,
    store: &Store,
) -> Result<(), LinkError> {
    let users = store.accounts.names()?;
    if users.is_empty() {
        return Ok(());
    }
    for (req, user) in users.iter().enumerate() {
        link.write(&HostFrame::Claim {
            req: req as u64,
            user: user.clone().into(),
        })
        .await?;
    }
    let mut answered = 0;
    while answered < users.len() {
        let frame = tokio::time::timeout(JOIN_TIMEOUT, link.next())
            .await
            .map_err(|_| LinkError::Timeout("answering the claims"))??;
        // Directory and presence news are sent again at the next join.
        let ExchangeFrame::Claimed { req, home } = frame else {
            continue;
        };
        answered += 1;
        let Some(user) = users.get(req as usize) else {
            continue;
        };
        if home == directory.server() {
            directory.learn(&[(user.clone().into(), home)])?;
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

/// Runs [`run`] on a thread of its own, with a runtime of its own (which also drives the
/// link's QUIC connection); resolves when it has ended.
///
/// The link is one task that every message to or from another host goes through, and each
/// of its steps waits for a disk sync: on the host's runtime it would wait behind whatever
/// the sessions have queued (a presence notice to a thousand local contacts puts their
/// sessions in the run queues before the relay's sync is done), and every host after it would
/// wait too. On its own thread it is scheduled as soon as it is woken.
pub fn spawn(
    network: Arc<Network>,
    parts: LinkParts,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("iim-link-io")
        .build()?;
    let (done, ended) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("iim-link".into())
        .spawn(move || {
            runtime.block_on(run(network, parts));
            // Its only blocking tasks read parts of files for other hosts.
            runtime.shutdown_timeout(LINK_SHUTDOWN);
            drop(done);
        })?;
    Ok(async move {
        let _ = ended.await;
    })
}

/// How long a stopping link waits for the file reads it started.
const LINK_SHUTDOWN: Duration = Duration::from_secs(2);

/// Keeps the link to the exchange, and releases the names of deleted accounts, until the host
/// shuts down. On the link's own thread: see [`spawn`].
async fn run(network: Arc<Network>, parts: LinkParts) {
    let releases = release_names(&network, parts.shutdown.clone());
    tokio::join!(keep_link(&network, &parts), releases);
}

/// Releases the names that wait to be released ([`Network::release_later`]) whenever one is
/// added or the link comes up, and every [`RELEASE_RETRY`] while the exchange leaves some
/// unanswered, until the host shuts down.
async fn release_names(network: &Network, mut shutdown: watch::Receiver<bool>) {
    loop {
        let retry = match network.release_waiting().await {
            Ok(left) => left,
            Err(e) => {
                tracing::error!(error = %e, "cannot release the names of deleted accounts");
                true
            }
        };
        tokio::select! {
            () = network.releases_ready.notified() => {}
            () = tokio::time::sleep(RELEASE_RETRY), if retry => {}
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
    }
}

/// Keeps the link to the exchange until the host shuts down.
async fn keep_link(network: &Network, parts: &LinkParts) {
    let mut shutdown = parts.shutdown.clone();
    let mut backoff = Backoff::new(REJOIN_FIRST, REJOIN_MAX);
    let mut exchanges = Exchanges::of(&parts.config);
    loop {
        let exchange = match exchanges.current() {
            Ok(exchange) => exchange,
            Err(e) => return tracing::error!(error = %e, "no exchange to join"),
        };
        let result = tokio::select! {
            r = serve(network, parts, exchange) => r,
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        };
        let was_up = network.up.swap(false, Ordering::Relaxed);
        network.directory.link_down();
        match result {
            Ok(()) => return,
            Err(e) => {
                exchanges.failed();
                if was_up {
                    backoff.reset();
                    tracing::warn!(%exchange, error = %e, "link to the exchange lost; joining again");
                } else {
                    tracing::warn!(%exchange, error = %e, "cannot join the exchange; trying again");
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
async fn serve(network: &Network, parts: &LinkParts, exchange: &str) -> Result<(), LinkError> {
    let (directory, outbox, store) = (&network.directory, &network.outbox, &network.store);
    let (mut link, joined) = tokio::time::timeout(
        JOIN_TIMEOUT,
        join(&parts.config, exchange, directory, &network.addr, store),
    )
    .await
    .map_err(|_| LinkError::Timeout("joining"))??;
    let Joined {
        number,
        servers,
        relayed_out,
    } = joined;
    let stored = store.network.host_number()?;
    if stored != Some(number) {
        return Err(LinkError::NumberMismatch {
            given: number,
            stored,
            server: directory.server().to_owned(),
        });
    }
    directory.set_servers(servers)?;
    store.network.relay_acked(relayed_out)?;
    let mut control = network.control_rx.lock().await;
    // Whatever was queued for an earlier link is stale: requests time out, presence is sent
    // again below.
    while control.try_recv().is_ok() {}
    network.up.store(true, Ordering::Relaxed);
    network.releases_ready.notify_one();
    tracing::info!(number, %exchange, "joined the network");
    lock(&network.presence_changed).clear();
    for entries in parts.registry.online_counts().chunks(1000) {
        link.write(&HostFrame::Presence {
            entries: entries.to_vec(),
        })
        .await?;
    }
    // The hop's state: what the exchange holds of this host's outbox, and what this host
    // holds of what the exchange sent it.
    let mut relay = RelayLink::joined(relayed_out, store.network.relayed_in()?);
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
                        let delivered = parts.iim.deliver_relayed(&envelope)?;
                        store.network.set_relayed_in(seq)?;
                        outbox.stats.envelopes_in.fetch_add(1, Ordering::Relaxed);
                        outbox.stats.relayed_deliveries.fetch_add(delivered as u64, Ordering::Relaxed);
                    }
                    // Acknowledged once durable, once half a window waits.
                    acknowledge(&mut link, store, &mut relay, false).await?;
                }
                ExchangeFrame::Ack { seq } => {
                    let before = relay.acked();
                    if let Some(seq) = relay.on_ack(seq)? {
                        outbox.stats.envelopes_acked.fetch_add(seq - before, Ordering::Relaxed);
                        store.network.relay_acked(seq)?;
                    }
                    pump(&mut link, network, &mut relay).await?;
                }
                ExchangeFrame::Directory { version, entries } => {
                    directory.update(version, entries)?;
                }
                ExchangeFrame::Servers { servers } => directory.set_servers(servers)?,
                ExchangeFrame::Presence { entries } => directory.set_presence(entries),
                ExchangeFrame::FileGet { req, by, sha256, offset } => {
                    // On a task of its own: the disk is read off the link's loop.
                    let (store, blobs) = (store.clone(), parts.blobs.clone());
                    let control = network.control.clone();
                    tokio::spawn(async move {
                        let part = serve_part(store, blobs, sha256, offset).await;
                        let _ = control.send(HostFrame::FilePart { req, to: by, part });
                    });
                }
                answer @ (ExchangeFrame::Claimed { .. }
                | ExchangeFrame::Found { .. }
                | ExchangeFrame::FilePart { .. }
                | ExchangeFrame::Released { .. }) => {
                    let req = match &answer {
                        ExchangeFrame::Claimed { req, .. }
                        | ExchangeFrame::Found { req, .. }
                        | ExchangeFrame::FilePart { req, .. }
                        | ExchangeFrame::Released { req, .. } => *req,
                        _ => 0,
                    };
                    if let Some(waiter) = lock(&network.requests).remove(&req) {
                        let _ = waiter.send(answer);
                    }
                }
                ExchangeFrame::Error { code, message } => {
                    return Err(LinkError::Ended { code, message });
                }
                ExchangeFrame::Joined { .. } => {
                    return Err(LinkError::Protocol("it sent Joined twice".into()));
                }
            },
            () = network.presence_ready.notified() => {
                let users: Vec<UserId> = lock(&network.presence_changed).drain().collect();
                let entries: Vec<(UserId, u32)> = users
                    .into_iter()
                    .map(|user| {
                        let devices = parts.registry.online(&user).len() as u32;
                        (user, devices)
                    })
                    .collect();
                for entries in entries.chunks(1000) {
                    link.write(&HostFrame::Presence { entries: entries.to_vec() }).await?;
                }
            }
            () = outbox.ready.notified() => {
                pump(&mut link, network, &mut relay).await?;
            }
            // Nothing else to do: what was applied is made durable, then acknowledged, once
            // for every envelope read together.
            () = std::future::ready(()), if idle_ack => {
                acknowledge(&mut link, store, &mut relay, true).await?;
            }
        }
    }
}

/// Sends the acknowledgement the link asks for, if it asks (`idle`: whatever waits), once
/// what it covers is durable.
async fn acknowledge(
    link: &mut Link,
    store: &Store,
    relay: &mut RelayLink,
    idle: bool,
) -> Result<(), LinkError> {
    let Some(seq) = relay.poll_ack(idle) else {
        return Ok(());
    };
    store.flush().await?;
    link.write(&HostFrame::Ack { seq }).await?;
    relay.on_ack_sent(seq);
    Ok(())
}

/// Sends outbox entries after what was sent, as far as the link's window allows.
async fn pump(link: &mut Link, network: &Network, relay: &mut RelayLink) -> Result<(), LinkError> {
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
            network
                .outbox
                .stats
                .envelopes_sent
                .fetch_add(1, Ordering::Relaxed);
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

/// Part of file `sha256` from `offset`, for another host of the network: only a file a
/// message of this host's went to another host with ([`crate::store::files::Files::shared`]),
/// complete here.
async fn serve_part(store: Store, blobs: Blobs, sha256: Sha256, offset: u64) -> FilePart {
    let not_found = || FilePart::Refused {
        code: ErrorCode::NOT_FOUND,
        message: format!("no file {} to share here", iim_proto::file::hex(&sha256)),
    };
    let read = tokio::task::spawn_blocking(move || {
        if !store.files.is_shared(&sha256).map_err(|e| e.to_string())? {
            return Ok(None);
        }
        let Some(record) = store.files.get(&sha256).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        // Decrypted here if the store encrypts its files: another host gets the file's bytes,
        // and keeps them under its own data key.
        let Some((reader, size)) = blobs
            .read(&FileId::from_digest(&sha256), offset)
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(reader, u64::from(iim_proto::peer::FILE_PART)),
            &mut bytes,
        )
        .map_err(|e| e.to_string())?;
        Ok::<_, String>(Some((record, size, bytes)))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match read {
        Ok(Some((record, size, bytes))) => FilePart::Data {
            size,
            name: record.name,
            media_type: record.media_type,
            offset: offset.min(size),
            bytes,
        },
        Ok(None) => not_found(),
        Err(e) => FilePart::Refused {
            code: ErrorCode::INTERNAL,
            message: format!("cannot read the file: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;
    use crate::exchange::Exchange;
    use crate::server::Server;
    use crate::store::UserRecord;
    use std::path::Path;

    const SECRET: &str = "the test network's secret";

    /// Waits (at most 20 s) until `done`.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "timed out: {what}");
    }

    /// An exchange in `dir`, listening on `listen`: its address, certificate, and what stops
    /// it (awaited until it has stopped).
    async fn exchange(
        dir: &Path,
        listen: SocketAddr,
    ) -> (
        SocketAddr,
        PathBuf,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let config = Config {
            role: Role::Exchange,
            data_dir: dir.join("exchange"),
            listen,
            network: crate::config::NetworkConfig {
                secret: Some(SECRET.into()),
                ..Default::default()
            },
            ..Config::default()
        };
        // The address of an exchange that stopped a moment ago may not be free yet.
        let mut tries = 0;
        let exchange = loop {
            match Exchange::start(config.clone()).await {
                Ok(exchange) => break exchange,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "the exchange cannot start yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the exchange cannot start: {e}"),
            }
        };
        let addr = exchange.local_addr().expect("addr");
        let cert = exchange.cert_path().to_owned();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = exchange
                .run(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        (addr, cert, stop, task)
    }

    /// Host `id` of the network of the exchange at `exchange`, in `dir`.
    async fn host(
        dir: &Path,
        id: &str,
        exchange: SocketAddr,
        cert: &Path,
    ) -> (Arc<crate::Host>, oneshot::Sender<()>) {
        let config = Config {
            server_id: id.into(),
            data_dir: dir.join(id),
            listen: "127.0.0.1:0".parse().expect("addr"),
            network: crate::config::NetworkConfig {
                exchange: Some(exchange.to_string()),
                exchange_cert: Some(cert.to_owned()),
                secret: Some(SECRET.into()),
                ..Default::default()
            },
            ..Config::default()
        };
        let server = Server::start(config).await.expect("host");
        let host = server.host();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        (host, stop)
    }

    fn network(host: &crate::Host) -> &Network {
        host.network.as_deref().expect("in a network")
    }

    /// Registers `name` on `host` as registration does: the claim, then the account.
    async fn register(host: &crate::Host, name: &str) -> UserId {
        let user = UserId::new(name).expect("valid");
        let home = network(host).claim(user.clone()).await.expect("claim");
        assert_eq!(home, network(host).server(), "{user} is free");
        let record = UserRecord {
            password_hash: "not a hash".into(),
            created_at: 1,
        };
        assert!(host.store.accounts.create(&user, &record).expect("create"));
        host.store.flush().await.expect("flush");
        user
    }

    /// Deletes `user`'s account on `host` and records the release of the name, as the
    /// deletion of an account does.
    async fn delete(host: &crate::Host, user: &UserId) {
        host.store.delete_user(user).expect("delete");
        network(host).release_later(user).expect("record");
        host.store.flush().await.expect("flush");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_account_s_name_is_released_at_once_or_when_the_exchange_is_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, cert, stop, running) =
            exchange(dir.path(), "127.0.0.1:0".parse().expect("addr")).await;
        let (h1, _stop1) = host(dir.path(), "h1", addr, &cert).await;
        let (h2, _stop2) = host(dir.path(), "h2", addr, &cert).await;
        until("both links up", || {
            network(&h1).is_up() && network(&h2).is_up()
        })
        .await;

        // Released at once while the exchange is there: h2 forgets the name and may take it;
        // h1 learns it is h2's.
        let dora = register(&h1, "dora").await;
        until("h2 knowing dora", || {
            network(&h2).directory.home_of_user(&dora).is_some()
        })
        .await;
        delete(&h1, &dora).await;
        until("h2 forgetting dora", || {
            network(&h2).directory.home_of_user(&dora).is_none()
        })
        .await;
        // The exchange answers h1 and tells h2 in either order: wait for the answer too.
        until("h1's release of dora answered", || {
            !h1.store.network.is_to_release(&dora).expect("read")
        })
        .await;
        assert_eq!(network(&h2).claim(dora.clone()).await.expect("claim"), "h2");
        until("h1 learning dora's new home", || {
            network(&h1).directory.home_of_user(&dora).as_deref() == Some("h2")
        })
        .await;

        // Deleted while the exchange is away: the release waits in the store, and goes when
        // the link is back.
        let ella = register(&h1, "ella").await;
        until("h2 knowing ella", || {
            network(&h2).directory.home_of_user(&ella).is_some()
        })
        .await;
        let _ = stop.send(());
        running.await.expect("stopped");
        until("h1's link down", || !network(&h1).is_up()).await;
        delete(&h1, &ella).await;
        assert!(
            h1.store.network.is_to_release(&ella).expect("read"),
            "waits"
        );
        let (_, _, _stop, _running) = exchange(dir.path(), addr).await;
        until("h2 forgetting ella", || {
            network(&h2).directory.home_of_user(&ella).is_none()
        })
        .await;
        // The exchange answers h1 and tells h2 in either order: wait for the answer too.
        until("h1's release of ella answered", || {
            !h1.store.network.is_to_release(&ella).expect("read")
        })
        .await;
        assert_eq!(network(&h2).claim(ella).await.expect("claim"), "h2");

        // A name registered here again before its release went (the releases not woken yet)
        // is not released any more.
        let fay = register(&h1, "fay").await;
        h1.store.delete_user(&fay).expect("delete");
        h1.store.network.release_later(&fay).expect("record");
        let again = register(&h1, "fay").await;
        assert!(!h1.store.network.is_to_release(&again).expect("read"));
        assert_eq!(
            network(&h2).claim(again).await.expect("claim"),
            "h1",
            "still h1's"
        );
    }
}
