//! The driver: one task per connection moves bytes between the QUIC stream and the device's
//! [`ClientSession`], and routes what the machine says to whoever waits for it.
//!
//! The machine is shared ([`Shared`]) between the application's calls, which make requests and
//! submissions under its lock, and the connection's task, which reads, writes and keeps time.
//! A [`Device`](crate::Device) keeps one machine across its connections, so its outbox and its
//! filter of repeats outlive each of them; each connection has a number, and the task of a
//! connection that was replaced touches nothing.

use crate::ClientError;
use crate::connection::Event;
use iim_proto::session::{ClientConfig as SessionConfig, ClientEvent, ClientSession, Refusal};
use iim_proto::{ErrorCode, RequestId, ServerFrame};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot};

/// An answer, or why none came.
pub(crate) type Reply = Result<ServerFrame, ClientError>;

/// What the host's `Welcome` said.
#[derive(Debug, Clone)]
pub(crate) struct Welcome {
    pub(crate) server: String,
    pub(crate) max_body: u32,
}

/// The machine and who waits for what, shared by the application and the connection's task.
pub(crate) struct Shared {
    core: Mutex<Core>,
    /// Wakes the connection's task: something is to be written, or a deadline changed.
    wake: Notify,
}

pub(crate) struct Core {
    pub(crate) session: ClientSession,
    /// The number of the current connection.
    generation: u64,
    /// Why the current connection ended, once it has.
    closed: Option<ClientError>,
    welcome: Option<oneshot::Sender<Welcome>>,
    requests: HashMap<RequestId, oneshot::Sender<Reply>>,
    /// Waiting for the answers to submissions, by outbox key.
    submissions: HashMap<u64, oneshot::Sender<Reply>>,
    /// The current connection's deliveries and its last error.
    events: Option<mpsc::UnboundedSender<Result<Event, ClientError>>>,
    request_timeout: Duration,
    keep_outbox: bool,
    /// The device gave up for good: new submissions fail at once with this.
    gone: Option<ClientError>,
}

impl Shared {
    /// A machine with no connection yet.
    pub(crate) fn new(agent: &str, request_timeout: Duration, keep_outbox: bool) -> Arc<Self> {
        let session = ClientSession::new(SessionConfig {
            agent: agent.to_owned(),
            request_timeout,
            keep_outbox,
        });
        Arc::new(Self {
            core: Mutex::new(Core {
                session,
                generation: 0,
                closed: Some(ClientError::ConnectionLost("not connected".into())),
                welcome: None,
                requests: HashMap::new(),
                submissions: HashMap::new(),
                events: None,
                request_timeout,
                keep_outbox,
                gone: None,
            }),
            wake: Notify::new(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        // Every update of the core is made whole under the lock; a panic elsewhere leaves it
        // consistent.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the connection's task after a change made under the lock.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Starts a new connection on the machine (`Hello` first): its number, what its Welcome
    /// will say, and its deliveries. Whatever waited on the last connection fails.
    pub(crate) fn start(
        &self,
    ) -> (
        u64,
        oneshot::Receiver<Welcome>,
        mpsc::UnboundedReceiver<Result<Event, ClientError>>,
    ) {
        let mut core = self.lock();
        let lost = ClientError::ConnectionLost("replaced by a new connection".into());
        let generation = core.generation;
        core.end(generation, lost);
        core.generation += 1;
        core.closed = None;
        core.session.connect(Instant::now());
        let (welcome_tx, welcome) = oneshot::channel();
        core.welcome = Some(welcome_tx);
        let (events_tx, events) = mpsc::unbounded_channel();
        core.events = Some(events_tx);
        (core.generation, welcome, events)
    }
}

impl Core {
    /// Why connection `generation` cannot be used, if it cannot.
    pub(crate) fn unusable(&self, generation: u64) -> Option<ClientError> {
        if generation != self.generation {
            return Some(ClientError::ConnectionLost(
                "replaced by a new connection".into(),
            ));
        }
        self.closed.clone()
    }

    /// Makes a request on connection `generation`: what waits for its answer.
    pub(crate) fn request(
        &mut self,
        generation: u64,
        request: iim_proto::session::Request,
    ) -> Result<oneshot::Receiver<Reply>, ClientError> {
        if let Some(e) = self.unusable(generation) {
            return Err(e);
        }
        let req = self
            .session
            .request(Instant::now(), request)
            .ok_or_else(|| ClientError::ConnectionLost("not connected".into()))?;
        let (tx, rx) = oneshot::channel();
        self.requests.insert(req, tx);
        // A request the machine refused at once (too large to send) is answered now.
        self.route(generation);
        Ok(rx)
    }

    /// The error the device gave up with, once it has.
    pub(crate) fn gone(&self) -> Option<ClientError> {
        self.gone.clone()
    }

    /// The number of the current connection.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Adds a submission to the outbox: what waits for its answer.
    pub(crate) fn submit(
        &mut self,
        outgoing: iim_proto::session::Outgoing,
    ) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        if let Some(gone) = &self.gone {
            let _ = tx.send(Err(gone.clone()));
            return rx;
        }
        let key = self.session.submit(Instant::now(), outgoing);
        self.submissions.insert(key, tx);
        // A submission the machine refused at once (too large to send) is answered now.
        self.route(self.generation);
        rx
    }

    /// The device gives up for good with `error`: what waits fails with it, and so does
    /// whatever is submitted later.
    pub(crate) fn give_up(&mut self, error: &ClientError) {
        self.fail_submissions(error);
        self.gone = Some(error.clone());
    }

    /// Fails every submission still waiting with `error`.
    pub(crate) fn fail_submissions(&mut self, error: &ClientError) {
        for (key, waiter) in std::mem::take(&mut self.submissions) {
            self.session.cancel(key);
            let _ = waiter.send(Err(error.clone()));
        }
    }

    /// Connection `generation` is over: what waited for it fails with `error`, which is also
    /// its last event unless the connection was merely lost.
    pub(crate) fn end(&mut self, generation: u64, error: ClientError) {
        if generation != self.generation || self.closed.is_some() {
            return;
        }
        self.session.disconnected();
        self.welcome = None;
        for (_, waiter) in self.requests.drain() {
            let _ = waiter.send(Err(error.clone()));
        }
        if !self.keep_outbox {
            self.fail_submissions(&error);
        }
        if let Some(events) = self.events.take()
            && !matches!(error, ClientError::ConnectionLost(_))
        {
            let _ = events.send(Err(error.clone()));
        }
        self.closed = Some(error);
    }

    /// Hands what the machine says to whoever waits for it.
    fn route(&mut self, generation: u64) {
        while let Some(event) = self.session.poll_event() {
            let delivered = match event {
                ClientEvent::Welcomed {
                    server, max_body, ..
                } => {
                    if let Some(waiter) = self.welcome.take() {
                        let _ = waiter.send(Welcome { server, max_body });
                    }
                    continue;
                }
                ClientEvent::Answer { req, answer } => {
                    if let Some(waiter) = self.requests.remove(&req) {
                        let _ = waiter.send(answer.map_err(refused));
                    }
                    continue;
                }
                ClientEvent::TimedOut { req } => {
                    if let Some(waiter) = self.requests.remove(&req) {
                        let _ = waiter.send(Err(ClientError::Timeout(self.request_timeout)));
                    }
                    continue;
                }
                ClientEvent::Submitted { key, answer } => {
                    if let Some(waiter) = self.submissions.remove(&key) {
                        let _ = waiter.send(answer.map_err(refused));
                    }
                    continue;
                }
                ClientEvent::SubmissionTimedOut { key } => {
                    let timeout = ClientError::Timeout(self.request_timeout);
                    if self.keep_outbox {
                        // No answer in time: the connection is of no use; a new one writes
                        // the submission again.
                        return self.end(generation, timeout);
                    }
                    if let Some(waiter) = self.submissions.remove(&key) {
                        let _ = waiter.send(Err(timeout));
                    }
                    continue;
                }
                ClientEvent::ClosedByHost { code, message } => {
                    return self.end(generation, ClientError::ClosedByHost { code, message });
                }
                ClientEvent::ProtocolError(reason) => {
                    return self.end(generation, ClientError::Protocol(reason));
                }
                ClientEvent::Message { seq, message } => Event::Message { seq, message },
                ClientEvent::Synced { count } => Event::Synced { count },
                ClientEvent::Backlog { count, bytes, ids } => Event::Backlog { count, bytes, ids },
            };
            // Nobody may be listening for events any more; requests are still answered.
            if let Some(events) = &self.events {
                let _ = events.send(Ok(delivered));
            }
        }
    }
}

/// The error for the host's refusal of a request. A frame over the host's limit is refused
/// before it is sent (the host never refuses a request with that code: it closes).
fn refused(refusal: Refusal) -> ClientError {
    if refusal.code == ErrorCode::FRAME_TOO_LARGE {
        return ClientError::TooLarge(refusal.message);
    }
    ClientError::Refused {
        code: refusal.code,
        message: refusal.message,
    }
}

/// The error a failed read of the host's stream means: the host closed the connection with a
/// reason (its code is an iim error code), or it is lost.
pub(crate) fn read_error(e: quinn::ReadError) -> ClientError {
    match e {
        quinn::ReadError::ConnectionLost(lost) => connection_error(lost),
        e => ClientError::ConnectionLost(e.to_string()),
    }
}

/// The error the end of the QUIC connection means: the host closed it with a reason (its code
/// is an iim error code), or it is lost.
pub(crate) fn connection_error(e: quinn::ConnectionError) -> ClientError {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) if close.error_code.into_inner() != 0 => {
            ClientError::ClosedByHost {
                code: ErrorCode(u16::try_from(close.error_code.into_inner()).unwrap_or(0)),
                message: String::from_utf8_lossy(&close.reason).into_owned(),
            }
        }
        // Its Display is only "connection lost"; the reason (timed out, reset) is what helps.
        lost => ClientError::ConnectionLost(lost.to_string()),
    }
}

/// Notices a host that stopped answering. QUIC sends a keep-alive once nothing has been
/// received for the keep-alive interval, and a live host answers it within a round trip; so
/// nothing received for the keep-alive interval and `dead_host_after` more means the host (or
/// the path to it) is gone, long before the idle timeout says so.
pub(crate) struct Liveness {
    /// Nothing received for this long: the host is gone.
    limit: Duration,
    /// How often the count of received datagrams is looked at.
    every: Duration,
    /// The count when it last moved, and when that was seen.
    received: u64,
    moved_at: Instant,
}

impl Liveness {
    pub(crate) fn new(keep_alive: Duration, dead_host_after: Duration) -> Self {
        Self {
            limit: keep_alive + dead_host_after,
            every: (dead_host_after / 2).clamp(Duration::from_millis(100), Duration::from_secs(1)),
            received: 0,
            moved_at: Instant::now(),
        }
    }

    /// After a look at `received` (the connection's count of datagrams received) at `now`:
    /// whether the host is gone.
    fn gone(&mut self, received: u64, now: Instant) -> bool {
        if received != self.received {
            self.received = received;
            self.moved_at = now;
        }
        now.duration_since(self.moved_at) >= self.limit
    }
}

/// Runs connection `generation` of `shared`'s machine over `send` and `recv` until it ends or
/// is replaced; then closes `conn` if the client decided it was over.
pub(crate) async fn drive(
    shared: Arc<Shared>,
    generation: u64,
    conn: quinn::Connection,
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
    mut liveness: Liveness,
) {
    let mut look = tokio::time::interval(liveness.every);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 16 * 1024];
    let mut out: Vec<u8> = Vec::new();
    let mut written = 0;
    loop {
        let timeout = {
            let mut core = shared.lock();
            if core.unusable(generation).is_some() {
                break;
            }
            while let Some(bytes) = core.session.poll_transmit() {
                out.extend_from_slice(&bytes);
            }
            core.session.poll_timeout()
        };
        let sleep = async {
            match timeout {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = recv.read(&mut buf) => {
                let mut core = shared.lock();
                if core.unusable(generation).is_some() {
                    break;
                }
                match read {
                    Ok(Some(n)) => {
                        core.session.handle_data(Instant::now(), &buf[..n]);
                        core.route(generation);
                    }
                    Ok(None) => core.end(
                        generation,
                        ClientError::ConnectionLost("the host closed the stream".into()),
                    ),
                    Err(e) => core.end(generation, read_error(e)),
                }
            }
            wrote = send.write(&out[written..]), if written < out.len() => match wrote {
                Ok(n) => {
                    written += n;
                    if written == out.len() {
                        out.clear();
                        written = 0;
                    }
                }
                Err(e) => shared
                    .lock()
                    .end(generation, ClientError::ConnectionLost(e.to_string())),
            },
            () = shared.wake.notified() => {}
            _ = look.tick() => {
                let received = conn.stats().udp_rx.datagrams;
                if liveness.gone(received, Instant::now()) {
                    tracing::info!(quiet = ?liveness.limit, "the host stopped answering");
                    shared.lock().end(generation, ClientError::Timeout(liveness.limit));
                }
            }
            () = sleep => {
                let mut core = shared.lock();
                core.session.handle_timeout(Instant::now());
                core.route(generation);
            }
        }
    }
    // A connection the client gave up on (a protocol error, no answer in time) is closed,
    // so that the host lets go of it at once.
    let client_side = matches!(
        shared.lock().unusable(generation),
        Some(ClientError::Protocol(_) | ClientError::Timeout(_))
    );
    if client_side {
        conn.close(0u32.into(), b"given up");
    }
    // Another connection's task may be waiting for the wake this one took.
    shared.wake();
}
