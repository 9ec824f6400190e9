//! A device that stays connected: [`Device`] reconnects by itself, resubmits what the host has
//! not accepted, and hands each delivery to the application once.
//!
//! One task per device owns the current [`Connection`]. Submissions wait in an ordered outbox
//! until the host accepts them; after a reconnect they are written again, in their order, with
//! their client ids, so that the host accepts each once and in the order it was made. The host
//! sends a device its inbox positions in increasing order and, after a reconnect, again from the
//! device's cursor: a position not above the highest one handed to the application is a repeat.
//! A message the application has already had that comes again at a new position (the host lost
//! its first inbox entry in a crash and appended it again) is a repeat too, recognised by its id.
//! A host that answers the login with a redirect sends the device to the user's home host, for
//! good: every later reconnect goes there.

use crate::connection::{
    Accepted, Answer, ClientConfig, Connection, Event, Page, Redirects, accepted, follow_redirects,
    page, ttl_secs,
};
use crate::{ClientError, new_client_id};
use iim_proto::{DeviceId, Message, MessageId, MessageKind, SessionMode, UserId};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

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
    answer: oneshot::Receiver<Result<Accepted, ClientError>>,
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
            answer.unwrap_or_else(|_| {
                Err(ClientError::ConnectionLost("the device was closed".into()))
            })
        })
    }
}

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
    commands: mpsc::UnboundedSender<Command>,
    updates: tokio::sync::Mutex<mpsc::UnboundedReceiver<Result<Update, ClientError>>>,
}

enum Command {
    Submit(Outgoing),
    Ack(u64),
    Fetch(u32, oneshot::Sender<Result<Page, ClientError>>),
    Close(oneshot::Sender<()>),
}

/// A submission the host has not accepted yet.
struct Outgoing {
    client_id: u64,
    kind: MessageKind,
    to: Vec<UserId>,
    body: Vec<u8>,
    ttl_secs: Option<u32>,
    reply: oneshot::Sender<Result<Accepted, ClientError>>,
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
        let (conn, token, config) = match credentials {
            Credentials::Password(password) => {
                Connection::login_home(config, user, &password, device, mode).await?
            }
            Credentials::Token(token) => {
                let token_ref = token.as_str();
                let (conn, config) = follow_redirects(config, |config| async move {
                    let conn = Connection::connect(&config).await?;
                    conn.authenticate(user, device, token_ref, mode).await?;
                    Ok(conn)
                })
                .await?;
                (conn, token, config)
            }
        };
        let (home_tx, home) = watch::channel((conn.server().to_owned(), config.server));
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (updates_tx, updates) = mpsc::unbounded_channel();
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let supervisor = Supervisor {
            login: Login {
                config,
                redirected_to: None,
                user: user.clone(),
                device: device.clone(),
                token: token.clone(),
                mode,
            },
            commands: commands_rx,
            updates: updates_tx,
            answers_tx,
            answers,
            outbox: BTreeMap::new(),
            next_key: 0,
            generation: 0,
            handover: Handover::default(),
            home: home_tx,
        };
        tokio::spawn(supervisor.run(conn));
        Ok(Self {
            token,
            home,
            commands,
            updates: tokio::sync::Mutex::new(updates),
        })
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
    pub fn submit(
        &self,
        client_id: u64,
        kind: MessageKind,
        to: &[UserId],
        body: &[u8],
    ) -> Submission {
        self.enqueue(client_id, kind, to, body, None)
    }

    fn enqueue(
        &self,
        client_id: u64,
        kind: MessageKind,
        to: &[UserId],
        body: &[u8],
        ttl_secs: Option<u32>,
    ) -> Submission {
        let (reply, answer) = oneshot::channel();
        let outgoing = Outgoing {
            client_id,
            kind,
            to: to.to_vec(),
            body: body.to_vec(),
            ttl_secs,
            reply,
        };
        // If the device has ended, `answer` fails at once (its sender is dropped here).
        let _ = self.commands.send(Command::Submit(outgoing));
        Submission { client_id, answer }
    }

    /// [`Device::submit`] with a time to live (see [`Connection::submit_expiring`]).
    pub fn submit_expiring(
        &self,
        client_id: u64,
        kind: MessageKind,
        to: &[UserId],
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
        let _ = self.commands.send(Command::Ack(seq));
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
        let (reply, answer) = oneshot::channel();
        let _ = self.commands.send(Command::Fetch(max, reply));
        answer
            .await
            .unwrap_or_else(|_| Err(ClientError::ConnectionLost("the device was closed".into())))
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
        if self.commands.send(Command::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}

/// How long a closing device waits for answers already on their way.
const LAST_ANSWERS: Duration = Duration::from_millis(500);

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
    async fn connect(&mut self) -> Result<Connection, ClientError> {
        if let Some(addr) = &self.redirected_to {
            self.config = self.config.redirected(addr).await?;
            self.redirected_to = None;
        }
        Connection::resume(
            &self.config,
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
    /// The wait before the last attempt that was not a redirect's.
    wait: Duration,
    max: Duration,
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
    /// The first attempt waits [`ClientConfig::reconnect_first`].
    fn new(config: &ClientConfig) -> Self {
        Self {
            wait: config.reconnect_first,
            max: config.reconnect_max,
            redirects: Redirects::default(),
        }
    }

    /// After an attempt failed with `error`: a redirect is followed at once (a host answered;
    /// nothing is wrong to wait out) and leaves the wait as it was; a transient error doubles
    /// the wait; anything else, or one redirect too many, ends the device.
    fn after(&mut self, error: &ClientError) -> Next {
        match error {
            ClientError::Redirected { server, addr } => match self.redirects.follow(server, addr) {
                Ok(()) => Next::Home(addr.clone()),
                Err(e) => Next::GiveUp(e),
            },
            e if e.is_transient() => {
                self.wait = (self.wait * 2).min(self.max);
                Next::Wait(self.wait)
            }
            e => Next::GiveUp(e.clone()),
        }
    }
}

/// The task that owns a device's connection.
struct Supervisor {
    login: Login,
    commands: mpsc::UnboundedReceiver<Command>,
    updates: mpsc::UnboundedSender<Result<Update, ClientError>>,
    /// Answers to submissions: (connection generation, outbox key, answer).
    answers_tx: mpsc::UnboundedSender<(u64, u64, Result<Accepted, ClientError>)>,
    answers: mpsc::UnboundedReceiver<(u64, u64, Result<Accepted, ClientError>)>,
    /// Submissions not yet accepted, in the order they were made.
    outbox: BTreeMap<u64, Outgoing>,
    next_key: u64,
    /// Counts connections, so that a late answer from an old one is recognised.
    generation: u64,
    /// What was handed to the application, and what it acknowledged.
    handover: Handover,
    /// The host of the last connection, for [`Device::home`].
    home: watch::Sender<(String, SocketAddr)>,
}

/// How many of the last message ids handed over a device remembers, to recognise a message
/// that comes again at a new position.
const RECENT_IDS: usize = 4096;

/// What a device handed to its application and what the application acknowledged: decides
/// which deliveries are repeats and what to acknowledge for them.
#[derive(Debug, Default)]
struct Handover {
    /// The highest inbox position handed to the application (or skipped as a repeat).
    shown: Option<u64>,
    /// The highest position the application acknowledged, counting the repeats skipped before
    /// it as acknowledged.
    acked: Option<u64>,
    /// The ids of the last [`RECENT_IDS`] messages handed over, oldest first.
    recent: VecDeque<MessageId>,
    recent_set: HashSet<MessageId>,
    /// Positions of repeats recognised by id, each with the position the application must have
    /// acknowledged before the repeat is acknowledged for it.
    /// Both only grow from one to the next.
    skipped: VecDeque<(u64, u64)>,
}

/// What to do with a delivery.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Hand it to the application.
    Show,
    /// Handed over before; acknowledge it at once if `ack` (its acknowledgement was lost with
    /// an earlier connection, or nothing before it is still unacknowledged).
    Repeat { ack: bool },
}

impl Handover {
    fn on_delivery(&mut self, seq: u64, id: MessageId) -> Verdict {
        if self.shown.is_some_and(|shown| seq <= shown) {
            return Verdict::Repeat {
                ack: self.acked.is_some_and(|acked| seq <= acked),
            };
        }
        if self.recent_set.contains(&id) {
            // Acknowledging it acknowledges every position before it on this connection: only
            // once the application has acknowledged what it was handed before.
            let before = self.shown.unwrap_or(0);
            self.shown = Some(seq);
            if self.acked.unwrap_or(0) >= before {
                self.acked = Some(seq);
                return Verdict::Repeat { ack: true };
            }
            self.skipped.push_back((seq, before));
            return Verdict::Repeat { ack: false };
        }
        self.shown = Some(seq);
        if self.recent.len() == RECENT_IDS
            && let Some(oldest) = self.recent.pop_front()
        {
            self.recent_set.remove(&oldest);
        }
        self.recent.push_back(id);
        self.recent_set.insert(id);
        Verdict::Show
    }

    /// The application acknowledged `seq`: returns the skipped repeats to acknowledge now.
    fn on_ack(&mut self, seq: u64) -> Vec<u64> {
        self.acked = self.acked.max(Some(seq));
        let mut due = Vec::new();
        while let Some(&(skipped, before)) = self.skipped.front() {
            if self.acked.unwrap_or(0) < before {
                break;
            }
            self.skipped.pop_front();
            if self.acked.is_some_and(|acked| acked < skipped) {
                self.acked = Some(skipped);
                due.push(skipped);
            }
        }
        due
    }
}

impl Supervisor {
    async fn run(mut self, mut conn: Connection) {
        loop {
            let reason = match self.serve(&conn).await {
                Served::Closed(done) => {
                    // The host answers close's last request after every submission before it,
                    // so their answers are in (or on their way to) `answers` once it returns.
                    conn.close().await;
                    if done.is_some() {
                        self.take_last_answers().await;
                    }
                    self.fail_outbox(&ClientError::ConnectionLost(
                        "the device was closed before the host answered".into(),
                    ));
                    drop(done);
                    return;
                }
                Served::Lost(reason) => reason,
            };
            drop(conn);
            if !reason.is_transient() {
                return self.end(reason);
            }
            let mut reason = reason;
            let mut reconnect = Reconnect::new(&self.login.config);
            let mut delay = self.login.config.reconnect_first;
            conn = loop {
                let _ = self.updates.send(Ok(Update::Disconnected {
                    reason,
                    retry_in: delay,
                }));
                let login = &mut self.login;
                let attempt = async move {
                    tokio::time::sleep(delay).await;
                    login.connect().await
                };
                let Some(outcome) = Self::while_waiting(
                    &mut self.commands,
                    &mut self.outbox,
                    &mut self.next_key,
                    &mut self.handover,
                    attempt,
                )
                .await
                else {
                    return;
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
            let _ = self.updates.send(Ok(Update::Reconnected));
        }
    }

    /// Runs `attempt` while taking the application's commands; `None` if the application
    /// closed the device meanwhile.
    async fn while_waiting<T>(
        commands: &mut mpsc::UnboundedReceiver<Command>,
        outbox: &mut BTreeMap<u64, Outgoing>,
        next_key: &mut u64,
        handover: &mut Handover,
        attempt: impl Future<Output = T>,
    ) -> Option<T> {
        tokio::pin!(attempt);
        loop {
            tokio::select! {
                outcome = &mut attempt => return Some(outcome),
                command = commands.recv() => match command {
                    None | Some(Command::Close(_)) => return None,
                    Some(Command::Submit(outgoing)) => {
                        outbox.insert(*next_key, outgoing);
                        *next_key += 1;
                    }
                    // What comes due is acknowledged when the host sends it again.
                    Some(Command::Ack(seq)) => drop(handover.on_ack(seq)),
                    Some(Command::Fetch(_, reply)) => {
                        let _ = reply.send(Err(ClientError::ConnectionLost(
                            "not connected; the backlog is summed up again after the reconnect"
                                .into(),
                        )));
                    }
                },
            }
        }
    }

    /// Serves one connection until it is lost or the application closes the device.
    async fn serve(&mut self, conn: &Connection) -> Served {
        self.generation += 1;
        // What the last connection left unaccepted goes first, in its order.
        let keys: Vec<u64> = self.outbox.keys().copied().collect();
        for key in keys {
            if let Err(e) = self.transmit(conn, key).await {
                return Served::Lost(e);
            }
        }
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    None => return Served::Closed(None),
                    Some(Command::Close(done)) => {
                        self.commands.close();
                        return Served::Closed(Some(done));
                    }
                    Some(Command::Submit(outgoing)) => {
                        let key = self.next_key;
                        self.next_key += 1;
                        self.outbox.insert(key, outgoing);
                        if let Err(e) = self.transmit(conn, key).await {
                            return Served::Lost(e);
                        }
                    }
                    Some(Command::Ack(seq)) => {
                        let due = self.handover.on_ack(seq);
                        for seq in std::iter::once(seq).chain(due) {
                            if let Err(e) = conn.ack(seq).await {
                                return Served::Lost(e);
                            }
                        }
                    }
                    Some(Command::Fetch(max, reply)) => match conn.start_fetch(max).await {
                        Ok(answer) => {
                            tokio::spawn(async move {
                                let _ = reply.send(answer.wait().await.and_then(page));
                            });
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.clone()));
                            return Served::Lost(e);
                        }
                    },
                },
                Some((generation, key, answer)) = self.answers.recv() => {
                    if generation != self.generation {
                        continue;
                    }
                    match answer {
                        Ok(accepted) => self.reply(key, Ok(accepted)),
                        // No answer in time: the connection is of no use; a new one resends.
                        Err(e @ ClientError::Timeout(_)) => return Served::Lost(e),
                        // The event stream says how the connection ended.
                        Err(e) if e.is_transient() => {}
                        Err(refused) => self.reply(key, Err(refused)),
                    }
                }
                event = conn.next_event() => match event {
                    Some(Ok(Event::Message { seq, message })) => {
                        match self.handover.on_delivery(seq, message.id) {
                            Verdict::Show => {
                                let _ = self.updates.send(Ok(Update::Message { seq, message }));
                            }
                            Verdict::Repeat { ack: true } => {
                                if let Err(e) = conn.ack(seq).await {
                                    return Served::Lost(e);
                                }
                            }
                            Verdict::Repeat { ack: false } => {}
                        }
                    }
                    Some(Ok(Event::Synced { count })) => {
                        let _ = self.updates.send(Ok(Update::Synced { count }));
                    }
                    Some(Ok(Event::Backlog { count, bytes, ids })) => {
                        let _ = self.updates.send(Ok(Update::Backlog { count, bytes, ids }));
                    }
                    Some(Err(e)) => return Served::Lost(e),
                    None => {
                        return Served::Lost(ClientError::ConnectionLost("the connection ended".into()));
                    }
                },
            }
        }
    }

    /// Writes the outbox's submission `key` and has its answer come back as a message.
    async fn transmit(&self, conn: &Connection, key: u64) -> Result<(), ClientError> {
        let Some(outgoing) = self.outbox.get(&key) else {
            return Ok(());
        };
        let answer: Answer = conn
            .start_submit(
                outgoing.client_id,
                outgoing.kind.clone(),
                outgoing.to.clone(),
                outgoing.body.clone(),
                outgoing.ttl_secs,
            )
            .await?;
        let answers = self.answers_tx.clone();
        let generation = self.generation;
        tokio::spawn(async move {
            let answer = answer.wait().await.and_then(accepted);
            let _ = answers.send((generation, key, answer));
        });
        Ok(())
    }

    /// Hands the answers that came before the close to their submissions (waiting a moment
    /// for the tasks that forward them).
    async fn take_last_answers(&mut self) {
        while !self.outbox.is_empty() {
            let next = tokio::time::timeout(LAST_ANSWERS, self.answers.recv()).await;
            let Ok(Some((generation, key, answer))) = next else {
                return;
            };
            if generation == self.generation && !matches!(&answer, Err(e) if e.is_transient()) {
                self.reply(key, answer);
            }
        }
    }

    fn reply(&mut self, key: u64, answer: Result<Accepted, ClientError>) {
        if let Some(outgoing) = self.outbox.remove(&key) {
            let _ = outgoing.reply.send(answer);
        }
    }

    fn fail_outbox(&mut self, error: &ClientError) {
        for (_, outgoing) in std::mem::take(&mut self.outbox) {
            let _ = outgoing.reply.send(Err(error.clone()));
        }
    }

    /// Gives up: every waiting submission fails with `error`, and so does [`Device::next`].
    fn end(mut self, error: ClientError) {
        self.fail_outbox(&error);
        let _ = self.updates.send(Err(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_that_comes_again_at_a_new_position_is_not_handed_over_twice() {
        let mut h = Handover::default();
        let (a, b, c) = (MessageId(10), MessageId(11), MessageId(12));
        assert_eq!(h.on_delivery(1, a), Verdict::Show);
        assert_eq!(h.on_delivery(2, b), Verdict::Show);
        // A repeat by position: acknowledged again only once the application acknowledged it.
        assert_eq!(h.on_delivery(2, b), Verdict::Repeat { ack: false });
        assert!(h.on_ack(1).is_empty());
        assert_eq!(h.on_delivery(1, a), Verdict::Repeat { ack: true });

        // After a host crash, `b` comes again at a far position. Acknowledging that would
        // acknowledge position 2 too, which the application has not acknowledged: it waits.
        assert_eq!(h.on_delivery(1_000_002, b), Verdict::Repeat { ack: false });
        assert_eq!(h.on_delivery(1_000_003, c), Verdict::Show);
        // The application acknowledges `b` at the position it was handed over with: the
        // repeat is acknowledged for it.
        assert_eq!(h.on_ack(2), vec![1_000_002]);
        assert_eq!(h.acked, Some(1_000_002));
        assert!(h.on_ack(1_000_003).is_empty());
        // Sent again on a later connection, the repeat is acknowledged at once.
        assert_eq!(h.on_delivery(1_000_002, b), Verdict::Repeat { ack: true });
        // With nothing unacknowledged before it, a repeat by id is acknowledged at once.
        assert_eq!(h.on_delivery(2_000_001, c), Verdict::Repeat { ack: true });
        assert_eq!(h.acked, Some(2_000_001));
    }

    #[test]
    fn a_reconnect_follows_a_redirect_at_once_and_backs_off_from_failures() {
        let mut config = ClientConfig::new("127.0.0.1:7501".parse().expect("addr"));
        config.reconnect_first = Duration::from_millis(500);
        config.reconnect_max = Duration::from_secs(2);
        let mut reconnect = Reconnect::new(&config);
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

    #[test]
    fn only_the_last_ids_are_remembered() {
        let mut h = Handover::default();
        for i in 0..=RECENT_IDS as u64 {
            assert_eq!(h.on_delivery(i + 1, MessageId(i)), Verdict::Show);
        }
        assert_eq!(h.recent.len(), RECENT_IDS);
        assert_eq!(h.recent_set.len(), RECENT_IDS);
        // The oldest is forgotten; the one after it is not.
        let next = RECENT_IDS as u64 + 2;
        assert_eq!(h.on_delivery(next, MessageId(0)), Verdict::Show);
        assert_eq!(
            h.on_delivery(next + 1, MessageId(2)),
            Verdict::Repeat { ack: false }
        );
    }
}
