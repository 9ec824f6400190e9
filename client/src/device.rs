//! A device that stays connected: [`Device`] reconnects by itself, resubmits what the host has
//! not accepted, and hands each delivery to the application once.
//!
//! A device keeps one session machine ([`iim_proto::session::ClientSession`]) across its
//! connections: its outbox of submissions the host has not accepted (written again, in their
//! order and with their client ids, once a new connection is authenticated, so that the host
//! accepts each once and in the order it was made) and its filter of repeats (each delivery is
//! handed to the application once, whatever the host sends again after a reconnect or a
//! crash). One task per device owns the current [`Connection`] and makes a new one when it is
//! lost, waiting longer after each failed attempt ([`Backoff`]). A host that answers the login
//! with a redirect sends the device to the user's home host, for good: every later reconnect
//! goes there.

use crate::connection::addresses;
use crate::connection::{
    Accepted, ClientConfig, Connection, Event, Page, Redirects, accepted, follow_redirects, page,
    ttl_secs,
};
use crate::driver::{Reply, Shared};
use crate::transfer::{self, Destination, DownloadedFile, Progress};
use crate::{ClientError, new_client_id};
use iim_proto::body::FileRef;
use iim_proto::file::Sha256;
use iim_proto::session::{Backoff, Outgoing, Request};
use iim_proto::{Address, DeviceId, Message, MessageId, MessageKind, SessionMode, UserId};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// How a [`Device`] proves who it is.
#[derive(Clone)]
pub enum Credentials {
    /// Log in with the password; the host hands out a token, which the device uses from then on.
    Password(String),
    /// A token from an earlier login ([`Device::token`], [`Connection::login`]).
    Token(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        f.write_str(match self {
            Credentials::Password(_) => "Password(..)",
            Credentials::Token(_) => "Token(..)",
        })
    }
}

/// What happened to a [`Device`].
#[derive(Debug, Clone)]
pub enum Update {
    /// A message for this device, handed over once; acknowledge it with [`Device::ack`].
    Message {
        /// Its inbox position.
        seq: u64,
        /// The message.
        message: Message,
    },
    /// Every message that waited for this device when it (re)connected has been delivered.
    Synced {
        /// How many that was.
        count: u64,
    },
    /// The connection was lost, or an attempt to connect again failed; the device tries again
    /// after `retry_in`. A `reason` of [`ClientError::Redirected`] says that the host sent the
    /// device to the user's home host: it tries there at once, and stays there.
    Disconnected {
        /// Why it was lost.
        reason: ClientError,
        /// How long until the next attempt.
        retry_in: Duration,
    },
    /// The device is connected and authenticated again.
    Reconnected,
    /// In a [`SessionMode::Paged`] device, what waits for it after each (re)connection; fetch
    /// it with [`Device::fetch`].
    Backlog {
        /// How many messages.
        count: u64,
        /// The sum of their body sizes, in bytes.
        bytes: u64,
        /// Their ids, oldest first (the first [`iim_proto::BACKLOG_IDS`] if there are more).
        ids: Vec<MessageId>,
    },
}

/// A submission on its way: resolves to the host's [`Accepted`] once the host has the message
/// durably, however many reconnects that takes, or to the host's refusal.
pub struct Submission {
    client_id: u64,
    answer: oneshot::Receiver<Reply>,
}

impl Submission {
    /// The submission's idempotency id.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }
}

impl Future for Submission {
    type Output = Result<Accepted, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer).poll(cx).map(|answer| {
            answer
                .unwrap_or_else(|_| {
                    Err(ClientError::ConnectionLost("the device was closed".into()))
                })
                .and_then(accepted)
        })
    }
}

/// How many times in a row a [`Device`]'s file transfer is tried on a connection that stays
/// up, without a byte more, before it fails: the waits between them grow from
/// [`ClientConfig::reconnect_first`] to [`ClientConfig::reconnect_max`] (about 90 s with the
/// defaults, which outlasts the host's noticing that a lost connection is gone).
pub const TRANSFER_ATTEMPTS: u32 = 8;

/// A logged-in device that reconnects by itself, with a growing wait
/// ([`ClientConfig::reconnect_first`] doubling up to [`ClientConfig::reconnect_max`]), when the
/// connection is lost or the host restarts. Nothing submitted is lost or accepted twice, and no
/// delivery is handed to the application twice.
///
/// It gives up only on an error that connecting again cannot get past (see
/// [`ClientError::is_transient`]): a token that is no longer valid, another session of the
/// device taking over. That error is then the last thing [`Device::next`] returns, and every
/// submission still waiting fails with it.
///
/// It follows redirects: a host that answers its login (or a reconnect's authentication) with
/// `Redirect` names the user's home host, and the device connects there at once and for every
/// later reconnect ([`Device::home`]), [`MAX_REDIRECTS`](crate::MAX_REDIRECTS) redirects in a
/// row at most.
///
/// ```no_run
/// # async fn demo() -> Result<(), iim_client::ClientError> {
/// use iim_client::{ClientConfig, Credentials, Device, Update};
/// use iim_proto::{DeviceId, SessionMode, UserId};
///
/// let config = ClientConfig::new("127.0.0.1:7447".parse().unwrap())
///     .with_ca_file("iim-data/cert.pem".as_ref())?;
/// let alice = UserId::new("alice").unwrap();
/// let device = DeviceId::new("phone").unwrap();
/// let phone = Device::open(&config, &alice, &device, Credentials::Password("pw".into()),
///     SessionMode::Receive).await?;
/// phone.send_text(&UserId::new("bob").unwrap(), "hi").await?;
/// while let Some(update) = phone.next().await {
///     match update? {
///         Update::Message { seq, message } => {
///             println!("{}: {}", message.from, String::from_utf8_lossy(&message.body));
///             phone.ack(seq);
///         }
///         Update::Disconnected { reason, retry_in } => eprintln!("{reason}; again in {retry_in:?}"),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
pub struct Device {
    token: String,
    /// The server id and address of the host of the last connection.
    home: watch::Receiver<(String, SocketAddr)>,
    /// The session machine, shared with the current connection.
    shared: Arc<Shared>,
    /// Asks the device's task to close (answered once closed).
    close: mpsc::UnboundedSender<oneshot::Sender<()>>,
    updates: tokio::sync::Mutex<mpsc::UnboundedReceiver<Result<Update, ClientError>>>,
    /// The current QUIC connection, for file transfers: `None` while the device reconnects,
    /// and the channel closed once the device has ended.
    quic: watch::Receiver<Option<quinn::Connection>>,
    /// How long a file transfer waits for the host ([`ClientConfig::request_timeout`]).
    request_timeout: Duration,
    /// The wait between attempts of a file transfer on a connection that stays up.
    retry: Backoff,
    /// Tells the device's task that the network changed.
    network: Arc<Notify>,
}

impl Device {
    /// Connects and logs in (or authenticates with a token), following redirects to the user's
    /// home host. Errors of this first attempt are returned as they are; later losses are
    /// recovered by reconnecting.
    pub async fn open(
        config: &ClientConfig,
        user: &UserId,
        device: &DeviceId,
        credentials: Credentials,
        mode: SessionMode,
    ) -> Result<Self, ClientError> {
        let shared = Shared::new(&config.agent, config.request_timeout, true);
        // Watching from before the connection is made: a change while it is made is a change.
        let network = Arc::new(Notify::new());
        let interfaces = if config.watch_network {
            crate::interfaces::watch(Arc::clone(&network))
        } else {
            None
        };
        let (conn, token, config) = match credentials {
            Credentials::Password(password) => {
                Connection::login_home_on(config, Some(&shared), user, &password, device, mode)
                    .await?
            }
            Credentials::Token(token) => {
                let token_ref = token.as_str();
                let shared_ref = &shared;
                let (conn, config) = follow_redirects(config, |config| async move {
                    Connection::resume_on(&config, shared_ref, user, device, token_ref, mode).await
                })
                .await?;
                (conn, token, config)
            }
        };
        let (home_tx, home) = watch::channel((conn.server().to_owned(), config.server));
        let (quic_tx, quic) = watch::channel(Some(conn.quic().clone()));
        let (request_timeout, retry) = (
            config.request_timeout,
            Backoff::new(config.reconnect_first, config.reconnect_max),
        );
        let (close, close_rx) = mpsc::unbounded_channel();
        let (updates_tx, updates) = mpsc::unbounded_channel();
        let supervisor = Supervisor {
            login: Login {
                config,
                redirected_to: None,
                user: user.clone(),
                device: device.clone(),
                token: token.clone(),
                mode,
            },
            shared: Arc::clone(&shared),
            close: close_rx,
            updates: updates_tx,
            home: home_tx,
            quic: quic_tx,
            network: Arc::clone(&network),
            _interfaces: interfaces,
        };
        tokio::spawn(supervisor.run(conn));
        Ok(Self {
            token,
            home,
            shared,
            close,
            updates: tokio::sync::Mutex::new(updates),
            quic,
            request_timeout,
            retry,
            network,
        })
    }

    /// Tells the device that the machine's network changed: what a mobile application calls
    /// from the system's connectivity callback (a device with
    /// [`ClientConfig::watch_network`] also notices a change of address by itself). If it is
    /// connected, the connection moves to a new socket and probes the path at once
    /// ([`Connection::network_changed`]), so that the host sends to the new address within a
    /// round trip; if it is waiting to reconnect, it tries now instead of at the end of its
    /// wait.
    pub fn network_changed(&self) {
        self.network.notify_one();
    }

    /// The device's token, for [`Credentials::Token`] next time.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The server id and address of the host the device last connected to: the user's home
    /// host, where it connects from now on. It differs from the configuration's
    /// [`ClientConfig::server`] once a redirect was followed (worth remembering: the next
    /// [`Device::open`] can go straight there). It changes when a reconnect that followed a
    /// redirect succeeds, just before [`Update::Reconnected`].
    pub fn home(&self) -> (String, SocketAddr) {
        self.home.borrow().clone()
    }

    /// Submits a message with the idempotency id `client_id` and returns at once. Submissions
    /// reach the host in the order they were made, and it accepts them in that order.
    pub fn submit<A: Clone + Into<Address>>(
        &self,
        client_id: u64,
        kind: MessageKind,
        to: &[A],
        body: &[u8],
    ) -> Submission {
        self.enqueue(client_id, kind, to, body, None)
    }

    fn enqueue<A: Clone + Into<Address>>(
        &self,
        client_id: u64,
        kind: MessageKind,
        to: &[A],
        body: &[u8],
        ttl_secs: Option<u32>,
    ) -> Submission {
        let outgoing = Outgoing {
            client_id,
            kind,
            to: addresses(to),
            body: body.to_vec(),
            ttl_secs,
        };
        let answer = self.shared.lock().submit(outgoing);
        self.shared.wake();
        Submission { client_id, answer }
    }

    /// [`Device::submit`] with a time to live (see [`Connection::submit_expiring`]).
    pub fn submit_expiring<A: Clone + Into<Address>>(
        &self,
        client_id: u64,
        kind: MessageKind,
        to: &[A],
        body: &[u8],
        ttl: Duration,
    ) -> Submission {
        self.enqueue(client_id, kind, to, body, Some(ttl_secs(ttl)))
    }

    /// Sends a chat message with `text` to `to`.
    pub fn send_text(&self, to: &UserId, text: &str) -> Submission {
        self.submit(
            new_client_id(),
            MessageKind::Chat,
            std::slice::from_ref(to),
            text.as_bytes(),
        )
    }

    /// Acknowledges every delivery up to and including `seq`. If the connection is lost before
    /// the host has it, the device acknowledges again what the host sends again.
    pub fn ack(&self, seq: u64) {
        self.shared.lock().session.ack(seq);
        self.shared.wake();
    }

    /// In a [`SessionMode::Paged`] device, asks for the next page of the backlog: up to `max`
    /// messages, which arrive as [`Update::Message`]s (possibly just after the answer). A
    /// position the device handed over on an earlier connection is not handed over again, nor
    /// a message it handed over before at another position (after a host crash), so fewer
    /// messages may come than the page's `count`, and the summary's counts and ids may include
    /// them. Fails if the
    /// connection is lost first; after the reconnect a new [`Update::Backlog`] says what is
    /// left.
    pub async fn fetch(&self, max: u32) -> Result<Page, ClientError> {
        let answer = {
            let mut core = self.shared.lock();
            let generation = core.generation();
            core.request(generation, Request::Fetch { max })
                .map_err(|_| {
                    ClientError::ConnectionLost(
                        "not connected; the backlog is summed up again after the reconnect".into(),
                    )
                })?
        };
        self.shared.wake();
        let answer = answer
            .await
            .unwrap_or_else(|_| Err(ClientError::ConnectionLost("the connection ended".into())))?;
        page(answer)
    }

    /// [`Connection::upload_file`], carried on across lost connections: an upload cut off
    /// goes on from what the host kept, on the device's next connection, as many times as
    /// that takes. `progress` may go back once (to where the host says the next attempt
    /// starts) after a loss.
    ///
    /// Fails with what [`Connection::upload_file`] fails with, save a lost connection; and
    /// with the device's own error if it gives up or is closed. On a connection that stays
    /// up, an error worth trying again after a while (the host is busy with the same file on
    /// a connection it has not noticed is gone yet, say) is tried again with a growing wait,
    /// [`TRANSFER_ATTEMPTS`] times in a row at most without a byte more.
    pub async fn upload_file(
        &self,
        path: &Path,
        media_type: &str,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<FileRef, ClientError> {
        self.with_retries(&Upload { path, media_type }, progress)
            .await
    }

    /// [`Connection::download_file`], carried on across lost connections as
    /// [`Device::upload_file`] is: a download cut off goes on from its `<out>.part` on the
    /// device's next connection.
    pub async fn download_file(
        &self,
        sha256: &Sha256,
        out: &Path,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<DownloadedFile, ClientError> {
        let to = Destination::File(out);
        self.with_retries(&Download { sha256, to }, progress).await
    }

    /// [`Connection::download_file_into`], carried on across lost connections as
    /// [`Device::download_file`] is.
    pub async fn download_file_into(
        &self,
        sha256: &Sha256,
        dir: &Path,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<DownloadedFile, ClientError> {
        let to = Destination::Directory(dir);
        self.with_retries(&Download { sha256, to }, progress).await
    }

    /// Runs `attempt` on the device's connection until it succeeds or fails for good: after
    /// a lost connection, on the next one; after another transient error, on the same one
    /// after a growing wait, as long as attempts move bytes.
    async fn with_retries<T: Transfer>(
        &self,
        transfer: &T,
        progress: Progress<'_>,
    ) -> Result<T::Output, ClientError> {
        let mut quic = self.quic.clone();
        let mut retry = self.retry;
        let mut stalled = 0;
        // The furthest any attempt got: an attempt that gets further is progress.
        let mut furthest = None;
        loop {
            let conn = self.connected(&mut quic).await?;
            let before = furthest;
            let mut tracked = |done: u64, size: u64| {
                furthest = furthest.max(Some(done));
                progress(done, size);
            };
            let error = match transfer
                .attempt(&conn, self.request_timeout, &mut tracked)
                .await
            {
                Ok(done) => return Ok(done),
                Err(e) if e.is_transient() => e,
                Err(e) => return Err(e),
            };
            if furthest > before {
                retry.reset();
                stalled = 0;
            }
            if conn.close_reason().is_some() {
                // The device reconnects by itself; the transfer goes on on its next connection.
                tracing::debug!(%error, "file transfer cut off; going on after the reconnect");
                continue;
            }
            stalled += 1;
            if stalled >= TRANSFER_ATTEMPTS {
                return Err(error);
            }
            let wait = retry.next_wait();
            tracing::debug!(%error, ?wait, "file transfer failed; trying again");
            tokio::time::sleep(wait).await;
        }
    }

    /// The device's connection, once it has a live one; the device's error once it has ended.
    async fn connected(
        &self,
        quic: &mut watch::Receiver<Option<quinn::Connection>>,
    ) -> Result<quinn::Connection, ClientError> {
        loop {
            let current = quic.borrow_and_update().clone();
            if let Some(conn) = current
                && conn.close_reason().is_none()
            {
                return Ok(conn);
            }
            if quic.changed().await.is_err() {
                return Err(self.shared.lock().gone().unwrap_or_else(|| {
                    ClientError::ConnectionLost("the device was closed".into())
                }));
            }
        }
    }

    /// The next update; `None` once the device has ended and every update was taken.
    pub async fn next(&self) -> Option<Result<Update, ClientError>> {
        self.updates.lock().await.recv().await
    }

    /// Makes sure the host has read every acknowledgement and submission, then closes the
    /// connection. Submissions the host answered resolve with its answer; any other (the
    /// device was disconnected, or no answer came) fails, and may be submitted again with
    /// the same client id.
    pub async fn close(self) {
        let (done, closed) = oneshot::channel();
        if self.close.send(done).is_ok() {
            let _ = closed.await;
        }
    }
}

/// A file transfer that a [`Device`] carries on across its connections.
trait Transfer {
    /// What it gives once done.
    type Output;

    /// One attempt, on `conn`.
    fn attempt<'a>(
        &'a self,
        conn: &'a quinn::Connection,
        timeout: Duration,
        progress: Progress<'a>,
    ) -> impl Future<Output = Result<Self::Output, ClientError>> + Send + 'a;
}

/// [`Device::upload_file`]'s transfer.
struct Upload<'p> {
    path: &'p Path,
    media_type: &'p str,
}

impl Transfer for Upload<'_> {
    type Output = FileRef;

    fn attempt<'a>(
        &'a self,
        conn: &'a quinn::Connection,
        timeout: Duration,
        progress: Progress<'a>,
    ) -> impl Future<Output = Result<FileRef, ClientError>> + Send + 'a {
        transfer::upload(conn, timeout, self.path, self.media_type, progress)
    }
}

/// [`Device::download_file`]'s and [`Device::download_file_into`]'s transfer.
struct Download<'p> {
    sha256: &'p Sha256,
    to: Destination<'p>,
}

impl Transfer for Download<'_> {
    type Output = DownloadedFile;

    fn attempt<'a>(
        &'a self,
        conn: &'a quinn::Connection,
        timeout: Duration,
        progress: Progress<'a>,
    ) -> impl Future<Output = Result<DownloadedFile, ClientError>> + Send + 'a {
        transfer::download(conn, timeout, self.sha256, self.to, progress)
    }
}

/// How a connection's service ended.
enum Served {
    /// The application closed the device (told once closed) or let go of it.
    Closed(Option<oneshot::Sender<()>>),
    /// The connection was lost, or is no longer usable.
    Lost(ClientError),
}

/// What a reconnect needs.
struct Login {
    /// Where to connect: the user's home host once a redirect named it.
    config: ClientConfig,
    /// The address of a redirect not resolved yet: resolved by the next attempt, which then
    /// switches `config` to it. Kept apart so that a failed lookup is retried as such, not
    /// by asking the redirecting host again.
    redirected_to: Option<String>,
    user: UserId,
    device: DeviceId,
    token: String,
    mode: SessionMode,
}

impl Login {
    async fn connect(&mut self, shared: &Arc<Shared>) -> Result<Connection, ClientError> {
        if let Some(addr) = &self.redirected_to {
            self.config = self.config.redirected(addr).await?;
            self.redirected_to = None;
        }
        Connection::resume_on(
            &self.config,
            shared,
            &self.user,
            &self.device,
            &self.token,
            self.mode,
        )
        .await
    }
}

/// One run of attempts to reconnect: the growing wait between them, and the redirects followed.
struct Reconnect {
    backoff: Backoff,
    redirects: Redirects,
}

/// What a device does after an attempt to reconnect failed.
#[derive(Debug)]
enum Next {
    /// Tries again after this wait.
    Wait(Duration),
    /// Tries at once at the home host, at this address (`host:port`), the redirect named.
    Home(String),
    /// Gives up with this error.
    GiveUp(ClientError),
}

impl Reconnect {
    /// Waits of [`ClientConfig::reconnect_first`], doubling up to
    /// [`ClientConfig::reconnect_max`].
    fn new(config: &ClientConfig) -> Self {
        Self {
            backoff: Backoff::new(config.reconnect_first, config.reconnect_max),
            redirects: Redirects::default(),
        }
    }

    /// The wait before the first attempt.
    fn first(&mut self) -> Duration {
        self.backoff.next_wait()
    }

    /// After an attempt failed with `error`: a redirect is followed at once (a host answered;
    /// nothing is wrong to wait out) and leaves the wait as it was; a transient error waits
    /// longer than the last time; anything else, or one redirect too many, ends the device.
    fn after(&mut self, error: &ClientError) -> Next {
        match error {
            ClientError::Redirected { server, addr } => match self.redirects.follow(server, addr) {
                Ok(()) => Next::Home(addr.clone()),
                Err(e) => Next::GiveUp(e),
            },
            e if e.is_transient() => Next::Wait(self.backoff.next_wait()),
            e => Next::GiveUp(e.clone()),
        }
    }
}

/// The task that owns a device's connection.
struct Supervisor {
    login: Login,
    shared: Arc<Shared>,
    close: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    updates: mpsc::UnboundedSender<Result<Update, ClientError>>,
    /// The host of the last connection, for [`Device::home`].
    home: watch::Sender<(String, SocketAddr)>,
    /// The current QUIC connection, for [`Device`]'s file transfers.
    quic: watch::Sender<Option<quinn::Connection>>,
    /// Notified when the network changed.
    network: Arc<Notify>,
    /// The watch of the network interfaces, if any, which ends with the task.
    _interfaces: Option<crate::interfaces::InterfaceWatch>,
}

impl Supervisor {
    async fn run(mut self, mut conn: Connection) {
        loop {
            let reason = match self.serve(&conn).await {
                Served::Closed(done) => {
                    // The host answers close's last request after every submission before it,
                    // so their answers are in once it returns.
                    conn.close().await;
                    self.shared
                        .lock()
                        .fail_submissions(&ClientError::ConnectionLost(
                            "the device was closed before the host answered".into(),
                        ));
                    drop(done);
                    return;
                }
                Served::Lost(reason) => reason,
            };
            self.quic.send_replace(None);
            drop(conn);
            if !reason.is_transient() {
                return self.end(reason);
            }
            let mut reason = reason;
            let mut reconnect = Reconnect::new(&self.login.config);
            let mut delay = reconnect.first();
            conn = loop {
                let _ = self.updates.send(Ok(Update::Disconnected {
                    reason,
                    retry_in: delay,
                }));
                let login = &mut self.login;
                let shared = &self.shared;
                let network = &self.network;
                let attempt = async move {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        // A new network may be the one that reaches the host: no point waiting.
                        () = network.notified() => {
                            tracing::info!("network changed; reconnecting now");
                        }
                    }
                    login.connect(shared).await
                };
                let outcome = tokio::select! {
                    outcome = attempt => outcome,
                    done = self.close.recv() => {
                        self.shared.lock().fail_submissions(&ClientError::ConnectionLost(
                            "the device was closed before the host answered".into(),
                        ));
                        drop(done);
                        return;
                    }
                };
                let error = match outcome {
                    Ok(conn) => break conn,
                    Err(e) => e,
                };
                match reconnect.after(&error) {
                    Next::Wait(wait) => delay = wait,
                    Next::Home(addr) => {
                        tracing::info!(%addr, "the user's home is another host; reconnecting there");
                        self.login.redirected_to = Some(addr);
                        delay = Duration::ZERO;
                    }
                    Next::GiveUp(e) => return self.end(e),
                }
                reason = error;
            };
            self.home
                .send_replace((conn.server().to_owned(), self.login.config.server));
            self.quic.send_replace(Some(conn.quic().clone()));
            let _ = self.updates.send(Ok(Update::Reconnected));
        }
    }

    /// Hands the connection's deliveries to the application until the connection is lost or
    /// the application closes the device.
    async fn serve(&mut self, conn: &Connection) -> Served {
        loop {
            let event = tokio::select! {
                done = self.close.recv() => return Served::Closed(done),
                event = conn.next_event() => event,
                () = self.network.notified() => {
                    if let Err(e) = conn.network_changed() {
                        return Served::Lost(e);
                    }
                    continue;
                }
            };
            let update = match event {
                Some(Ok(Event::Message { seq, message })) => Update::Message { seq, message },
                Some(Ok(Event::Synced { count })) => Update::Synced { count },
                Some(Ok(Event::Backlog { count, bytes, ids })) => {
                    Update::Backlog { count, bytes, ids }
                }
                Some(Err(e)) => return Served::Lost(e),
                None => {
                    return Served::Lost(ClientError::ConnectionLost(
                        "the connection ended".into(),
                    ));
                }
            };
            let _ = self.updates.send(Ok(update));
        }
    }

    /// Gives up: every waiting submission fails with `error`, and so does [`Device::next`].
    fn end(self, error: ClientError) {
        self.shared.lock().give_up(&error);
        let _ = self.updates.send(Err(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    /// An application can spawn a transfer: its future is `Send`.
    #[allow(dead_code)]
    fn transfers_can_be_spawned(device: &Device, conn: &Connection) {
        let mut progress = |_: u64, _: u64| {};
        let (path, id) = (Path::new("f"), [0u8; 32]);
        assert_send(&device.upload_file(path, "", &mut progress));
        assert_send(&device.download_file(&id, path, &mut progress));
        assert_send(&device.download_file_into(&id, path, &mut progress));
        assert_send(&conn.upload_file(path, "", &mut progress));
        assert_send(&conn.download_file(&id, path, &mut progress));
        assert_send(&conn.download_file_into(&id, path, &mut progress));
    }

    #[test]
    fn a_reconnect_follows_a_redirect_at_once_and_backs_off_from_failures() {
        let mut config = ClientConfig::new("127.0.0.1:7501".parse().expect("addr"));
        config.reconnect_first = Duration::from_millis(500);
        config.reconnect_max = Duration::from_secs(2);
        let mut reconnect = Reconnect::new(&config);
        assert_eq!(reconnect.first().as_millis(), 500);
        let lost = ClientError::ConnectionLost("gone".into());
        let redirect = |n: u16| ClientError::Redirected {
            server: format!("h{n}"),
            addr: format!("127.0.0.1:{n}"),
        };
        let wait = |next: Next| match next {
            Next::Wait(wait) => wait.as_millis(),
            other => panic!("expected a wait, got {other:?}"),
        };
        let home = |next: Next| match next {
            Next::Home(addr) => addr,
            other => panic!("expected the home host, got {other:?}"),
        };
        assert_eq!(wait(reconnect.after(&lost)), 1000);
        // A redirect is followed at once, and the wait goes on where it was.
        assert_eq!(home(reconnect.after(&redirect(2))), "127.0.0.1:2");
        assert_eq!(wait(reconnect.after(&lost)), 2000);
        assert_eq!(wait(reconnect.after(&lost)), 2000);
        assert_eq!(home(reconnect.after(&redirect(3))), "127.0.0.1:3");
        assert_eq!(home(reconnect.after(&redirect(2))), "127.0.0.1:2");
        // A fourth redirect in one run of attempts is a loop.
        match reconnect.after(&redirect(3)) {
            Next::GiveUp(ClientError::Protocol(m)) => assert!(m.starts_with("redirect loop")),
            other => panic!("expected to give up, got {other:?}"),
        }
        // A refusal ends the device.
        let refused = ClientError::Refused {
            code: iim_proto::ErrorCode::AUTH_FAILED,
            message: "no".into(),
        };
        let mut reconnect = Reconnect::new(&config);
        assert!(matches!(
            reconnect.after(&refused),
            Next::GiveUp(ClientError::Refused { .. })
        ));
    }
}
