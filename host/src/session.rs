//! One task per client connection: the handshake, then frames in, answers and deliveries out.
//!
//! The session reads the connection's one bidirectional stream through the sans-IO
//! [`FrameDecoder`] and handles one frame at a time, so one sender's messages are accepted and
//! dispatched in the order it sent them. Bad input ends only this session, with an error frame
//! that says why.

use crate::Host;
use crate::cmd::{self, Refusal, submit::Submission};
use crate::plugin::{Delivered, Event as PluginEvent, SessionInfo};
use crate::registry::{Delivery, Kick, SessionId};
use iim_proto::{
    AckOutcome, ClientFrame, CodecError, DeliveryWindow, DeviceId, Due, ErrorCode, FrameDecoder,
    RequestId, Retransmit, ServerFrame, SessionMode, TokenBucket, UserId,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

/// How many backlog entries are read from the store at a time while syncing a device.
const SYNC_BATCH: usize = 256;

/// Why a session ends.
#[derive(Debug)]
enum End {
    /// The client finished its stream or logged out.
    Done,
    /// The host ends the session with an error frame.
    Error(ErrorCode, String),
    /// The connection failed underneath.
    Transport(String),
    /// The client stopped reading: nothing more can be written to it.
    Stalled,
}

impl From<CodecError> for End {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::FrameTooLarge { .. } => {
                End::Error(ErrorCode::FRAME_TOO_LARGE, e.to_string())
            }
            CodecError::Malformed(_) | CodecError::Empty => {
                End::Error(ErrorCode::MALFORMED, e.to_string())
            }
        }
    }
}

struct Auth {
    user: UserId,
    device: DeviceId,
}

/// The delivery side of a receive-mode session.
struct Attached {
    session: SessionId,
    window: DeliveryWindow,
    /// Reading the inbox from the store instead of taking live deliveries: from login until
    /// the backlog is sent, and again after the live queue overflowed.
    syncing: bool,
    /// Backlog messages sent so far; `None` once `Synced` was sent.
    backlog: Option<u64>,
    /// In a paged session, until its last page: the backlog's last position and how many of
    /// its messages are still to fetch. The backlog is then sent only on `Fetch`.
    paged: Option<Paged>,
    deliveries: mpsc::Receiver<Delivery>,
    lag: Arc<Notify>,
    kick: watch::Receiver<Option<Kick>>,
    /// What was sent and not acknowledged, and when to send it again.
    retransmit: Retransmit<u64>,
    /// The messages of those deliveries, by position, to send again.
    unacked: std::collections::BTreeMap<u64, Arc<iim_proto::Message>>,
    /// Deliveries sent and not yet acknowledged whose acknowledgement a plugin wants to hear
    /// of (a `delivered` subscription), by position.
    watched: std::collections::VecDeque<(u64, Delivered)>,
    /// The cursor the acks read so far moved to, not yet written to the store: written once
    /// for all the acks read together.
    unsaved_cursor: Option<u64>,
}

/// The backlog of a paged session that is still to fetch.
#[derive(Debug, Clone, Copy)]
struct Paged {
    /// The inbox position of its last message.
    last: u64,
    /// How many of its messages have not been sent.
    remaining: u64,
}

/// A submission checked and stored, with its answer and the message to dispatch; or the
/// request's refusal.
type Stored = Result<(ServerFrame, Option<iim_proto::Message>), (RequestId, Refusal)>;

/// A connection's state.
struct Session {
    host: Arc<Host>,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    auth: Option<Auth>,
    attached: Option<Attached>,
    /// Until the TLS handshake is complete: whatever is read may be 0-RTT early data, which
    /// an attacker can replay. `None` once it is complete.
    early: Option<Pin<Box<quinn::ZeroRttAccepted>>>,
    /// A receive or paged session authenticated in early data: it becomes the device's
    /// delivery session once the handshake is complete (a replayed connection never
    /// completes it, so it cannot take the device's deliveries).
    attach_when_confirmed: Option<SessionMode>,
    submit_rate: TokenBucket,
    auth_rate: TokenBucket,
    /// A submission read over the session's rate, taken when the rate allows: at `resume_at`,
    /// until which nothing more is read (everything else the session does goes on).
    held: Option<ClientFrame>,
    resume_at: Option<Instant>,
    /// The session's own monotonic clock for the rate limits (wall time can step back).
    started: Instant,
}

enum Event {
    Read(Result<Option<usize>, quinn::ReadError>),
    /// The submission rate allows the held submission.
    Resume,
    Delivery(Option<Delivery>),
    Kicked(Option<Kick>),
    Lagged,
    SyncStep,
    Retransmit,
    Confirmed,
    AuthTimeout,
    Shutdown,
}

/// Runs the session of an accepted connection until it ends. `early` resolves when the TLS
/// handshake is complete; until then the connection may carry 0-RTT early data.
pub async fn run(host: Arc<Host>, conn: quinn::Connection, early: quinn::ZeroRttAccepted) {
    let span = tracing::info_span!("session", remote = %conn.remote_address(), user = tracing::field::Empty, device = tracing::field::Empty);
    async move {
        // One deadline for opening the stream and sending Hello.
        let deadline =
            Instant::now() + Duration::from_secs(host.config.limits.handshake_timeout_secs);
        let (send, recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connection closed before opening a stream");
                return;
            }
            Err(_) => {
                conn.close(
                    quinn::VarInt::from_u32(ErrorCode::HANDSHAKE.0.into()),
                    b"no stream opened",
                );
                return;
            }
        };
        let limits = host.config.limits.clone();
        let mut session = Session {
            decoder: FrameDecoder::new(host.config.limits.max_frame),
            host,
            conn,
            send,
            recv,
            auth: None,
            attached: None,
            early: Some(Box::pin(early)),
            attach_when_confirmed: None,
            submit_rate: TokenBucket::new(limits.submit_rate, limits.submit_burst, 0),
            auth_rate: TokenBucket::new(limits.auth_rate, limits.auth_burst, 0),
            held: None,
            resume_at: None,
            started: Instant::now(),
        };
        let end = session.serve(deadline).await;
        session.finish(end).await;
    }
    .instrument(span)
    .await
}

impl Session {
    async fn serve(&mut self, handshake_deadline: Instant) -> End {
        if let Err(end) = self.handshake(handshake_deadline).await {
            return end;
        }
        // Frames that arrived in the same read as Hello are already buffered.
        if let Err(end) = self.drain_frames().await {
            return end;
        }
        let mut buf = vec![0u8; 16 * 1024];
        let mut shutdown = self.host.shutdown.clone();
        let limits = self.host.config.limits.clone();
        let max_in_flight = limits.max_in_flight.max(1);
        let auth_deadline = Instant::now() + Duration::from_secs(limits.auth_timeout_secs);
        loop {
            let unauthenticated = self.auth.is_none().then_some(auth_deadline);
            let (deliveries, kick, lag, can_sync, can_live, retransmit_at) =
                match self.attached.as_mut() {
                    Some(a) => {
                        let room = a.window.in_flight() < max_in_flight;
                        (
                            Some(&mut a.deliveries),
                            Some(&mut a.kick),
                            Some(Arc::clone(&a.lag)),
                            a.syncing && room && a.paged.is_none(),
                            !a.syncing && room,
                            a.retransmit.next_deadline().map(|at| self.started + at),
                        )
                    }
                    None => (None, None, None, false, false, None),
                };
            let is_early = self.early.is_some();
            let early = self.early.as_mut();
            let resume_at = self.resume_at;
            // Biased: the handshake's end first, so that nothing read after it counts as early;
            // then what the client sent (acks above all), before more is sent to it.
            let event = tokio::select! {
                biased;
                _ = async { early?.await; Some(()) }, if is_early => Event::Confirmed,
                read = self.recv.read(&mut buf), if resume_at.is_none() => Event::Read(read),
                () = sleep_until(resume_at) => Event::Resume,
                _ = shutdown.wait_for(|stopping| *stopping) => Event::Shutdown,
                kick = next_kick(kick) => Event::Kicked(kick),
                () = notified(lag.as_deref()) => Event::Lagged,
                () = sleep_until(retransmit_at) => Event::Retransmit,
                () = sleep_until(unauthenticated) => Event::AuthTimeout,
                () = std::future::ready(()), if can_sync => Event::SyncStep,
                delivery = next_delivery(deliveries), if can_live => Event::Delivery(delivery),
            };
            let step = match event {
                Event::Read(Ok(Some(n))) => {
                    self.decoder.push(&buf[..n]);
                    self.drain_frames().await
                }
                Event::Resume => {
                    self.resume_at = None;
                    self.drain_frames().await
                }
                Event::Read(Ok(None)) => Err(End::Done),
                Event::Read(Err(quinn::ReadError::ConnectionLost(
                    quinn::ConnectionError::ApplicationClosed(_),
                ))) => Err(End::Done),
                Event::Read(Err(e)) => Err(End::Transport(e.to_string())),
                Event::Delivery(Some(delivery)) => self.deliver(delivery).await,
                // The registry let go of this session: it was replaced, and the kick says so.
                Event::Delivery(None) => {
                    match self.attached.as_ref().and_then(|a| a.kick.borrow().clone()) {
                        Some(kick) => Err(End::Error(kick.code, kick.reason)),
                        None => Err(End::Error(
                            ErrorCode::INTERNAL,
                            "delivery queue closed".into(),
                        )),
                    }
                }
                Event::Kicked(Some(kick)) => Err(End::Error(kick.code, kick.reason)),
                Event::Kicked(None) => Ok(()),
                Event::Lagged => {
                    if let Some(a) = self.attached.as_mut() {
                        // Everything queued is in the inbox: drop it and read the store.
                        while a.deliveries.try_recv().is_ok() {}
                        a.syncing = true;
                        tracing::debug!("live queue overflowed; catching up from the inbox");
                    }
                    Ok(())
                }
                Event::SyncStep => self.sync_step(max_in_flight).await,
                Event::Confirmed => self.confirmed().await,
                Event::Retransmit => self.retransmit().await,
                Event::AuthTimeout => Err(End::Error(
                    ErrorCode::NOT_AUTHENTICATED,
                    format!(
                        "not authenticated within {} s of connecting",
                        limits.auth_timeout_secs
                    ),
                )),
                Event::Shutdown => Err(End::Error(
                    ErrorCode::SHUTTING_DOWN,
                    "the host is shutting down; reconnect later".into(),
                )),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Reads `Hello` and answers `Welcome`.
    async fn handshake(&mut self, deadline: Instant) -> Result<(), End> {
        let mut buf = vec![0u8; 4096];
        let hello = tokio::time::timeout_at(deadline, async {
            loop {
                if let Some(frame) = self.decoder.decode::<ClientFrame>()? {
                    return Ok(frame);
                }
                match self.recv.read(&mut buf).await {
                    Ok(Some(n)) => self.decoder.push(&buf[..n]),
                    Ok(None) => return Err(End::Done),
                    Err(e) => return Err(End::Transport(e.to_string())),
                }
            }
        })
        .await
        .map_err(|_| End::Error(ErrorCode::HANDSHAKE, "no Hello in time".into()))??;
        let ClientFrame::Hello { version, agent } = hello else {
            return Err(End::Error(
                ErrorCode::HANDSHAKE,
                "the first frame must be Hello".into(),
            ));
        };
        if !iim_proto::SUPPORTED_VERSIONS.contains(&version) {
            return Err(End::Error(
                ErrorCode::UNSUPPORTED_VERSION,
                format!(
                    "protocol version {version} is not supported; this host speaks {:?}",
                    iim_proto::SUPPORTED_VERSIONS
                ),
            ));
        }
        tracing::debug!(%agent, version, "hello");
        let limits = &self.host.config.limits;
        self.write(&ServerFrame::Welcome {
            version,
            max_frame: limits.max_frame,
            max_body: limits.max_body,
            server: self.host.iim.server().to_owned(),
        })
        .await
    }

    /// Handles every whole frame received. Consecutive submissions are stored one by one and
    /// made durable together, with one flush, before any of them is answered; the acks move
    /// the device's stored cursor once.
    async fn drain_frames(&mut self) -> Result<(), End> {
        let drained = self.handle_frames().await;
        self.save_cursor();
        drained
    }

    async fn handle_frames(&mut self) -> Result<(), End> {
        let mut submissions = Vec::new();
        loop {
            let frame = match self.held.take() {
                Some(frame) => frame,
                None => match self.decoder.decode::<ClientFrame>()? {
                    Some(frame) => frame,
                    None => break,
                },
            };
            if Submission::is(&frame) {
                if self.auth.is_some()
                    && let Some(wait) = self.submit_wait()
                {
                    // Over the session's rate: what came before is answered now, and nothing
                    // more is read until the rate allows this one. Nothing is refused, so the
                    // sender's order holds; QUIC's flow control holds back a sender that does
                    // not wait; kicks, deliveries and shutdown go on meanwhile.
                    self.held = Some(frame);
                    self.resume_at = Some(Instant::now() + wait);
                    break;
                }
                // A recipient who registered on another host a moment ago: asked for once the
                // submission is about to be stored.
                if let ClientFrame::Submit { to, .. } | ClientFrame::SubmitExpiring { to, .. } =
                    &frame
                    && self.auth.is_some()
                {
                    cmd::relation::look_up(&self.host, to).await;
                }
                submissions.push(self.store_submission(frame));
            } else {
                self.commit(std::mem::take(&mut submissions)).await?;
                self.handle(frame).await?;
            }
        }
        self.commit(submissions).await
    }

    /// Checks and stores one submission (not yet durably).
    fn store_submission(&mut self, frame: ClientFrame) -> Stored {
        // Refused before it takes from the rate: an unauthenticated connection never waits.
        if let Err(refusal) = self.require_auth() {
            return Err((frame.req().unwrap_or(0), refusal));
        }
        if let Some((req, refusal)) = self.rate_limit(&frame) {
            return Err((req, refusal));
        }
        let Some(submission) = Submission::of(frame) else {
            return Err((0, Refusal::new(ErrorCode::INTERNAL, "not a submission")));
        };
        let req = submission.req;
        let auth = self.require_auth().map_err(|refusal| (req, refusal))?;
        cmd::submit::accept(&self.host, &auth.user, &auth.device, submission)
            .map_err(|refusal| (req, refusal))
    }

    /// Makes the stored submissions durable with one flush, then answers each in order and
    /// dispatches the new messages.
    async fn commit(&mut self, stored: Vec<Stored>) -> Result<(), End> {
        if stored.is_empty() {
            return Ok(());
        }
        let mut stored = stored;
        if stored.iter().any(Result::is_ok)
            && let Err(e) = self.host.store.flush().await
        {
            tracing::error!(error = %e, "submissions not flushed");
            // Not known to be durable, so not accepted; they stay recorded for dispatch, and a
            // resubmission with the same client id finds them.
            for entry in &mut stored {
                if let Ok((ServerFrame::Accepted { req, .. }, _)) = entry {
                    *entry = Err((
                        *req,
                        Refusal::new(ErrorCode::INTERNAL, "the message could not be stored"),
                    ));
                }
            }
        }
        let mut answered = Ok(());
        for entry in stored {
            match entry {
                Ok((accepted, message)) => {
                    // Durable now: dispatched whether or not the answer reaches the client.
                    if answered.is_ok() {
                        answered = self.write(&accepted).await;
                    }
                    if let Some(message) = message {
                        // Recorded for dispatch until its plugin has handled it.
                        self.host
                            .plugins
                            .raise(PluginEvent::Message(Arc::new(message)))
                            .await;
                    }
                }
                Err((req, refusal)) => {
                    if answered.is_ok() {
                        answered = self.refuse(req, refusal).await;
                    }
                }
            }
        }
        answered
    }

    /// Whether the TLS handshake is complete (looked at now, without waiting).
    fn handshake_complete(&mut self) -> bool {
        let Some(early) = self.early.as_mut() else {
            return true;
        };
        let mut cx = Context::from_waker(Waker::noop());
        // It also resolves when the connection ends before the handshake completed.
        if early.as_mut().poll(&mut cx).is_ready() && self.conn.close_reason().is_none() {
            self.early = None;
            return true;
        }
        false
    }

    /// The handshake is complete: a session authenticated in early data takes its device's
    /// deliveries now.
    async fn confirmed(&mut self) -> Result<(), End> {
        self.early = None;
        // The future also resolves when the connection ends first (a replayed first flight
        // that timed out): such a connection must not take the device's deliveries.
        if let Some(reason) = self.conn.close_reason() {
            return Err(End::Transport(format!(
                "connection ended before its handshake completed: {reason}"
            )));
        }
        let (Some(mode), Some(auth)) = (self.attach_when_confirmed.take(), &self.auth) else {
            return Ok(());
        };
        let (user, device) = (auth.user.clone(), auth.device.clone());
        self.attach(user, device, mode).await
    }

    async fn handle(&mut self, frame: ClientFrame) -> Result<(), End> {
        if !frame.allowed_early() && !self.handshake_complete() {
            return self
                .refuse(
                    frame.req().unwrap_or(0),
                    Refusal::new(
                        ErrorCode::TOO_EARLY,
                        "not taken in 0-RTT early data, which can be replayed; send it again \
                         once the handshake is complete",
                    ),
                )
                .await;
        }
        // Submissions are rate-limited where they are stored.
        if !Submission::is(&frame)
            && let Some((req, refusal)) = self.rate_limit(&frame)
        {
            return self.refuse(req, refusal).await;
        }
        match frame {
            ClientFrame::Hello { .. } => {
                Err(End::Error(ErrorCode::HANDSHAKE, "Hello sent twice".into()))
            }
            ClientFrame::Register {
                req,
                user,
                password,
            } => {
                let answer = cmd::account::register(&self.host, &user, password).await;
                self.answer(req, answer.map(|()| ServerFrame::Ok { req }))
                    .await
            }
            ClientFrame::Login {
                req,
                user,
                password,
                device,
                mode,
            } => {
                if let Err(refusal) = self.check_unauthenticated() {
                    return self.refuse(req, refusal).await;
                }
                match cmd::account::redirect(&self.host, req, &user) {
                    Ok(Some(redirect)) => return self.write(&redirect).await,
                    Ok(None) => {}
                    Err(refusal) => return self.refuse(req, refusal).await,
                }
                match cmd::account::login(&self.host, &user, password, &device).await {
                    Ok(token) => {
                        self.write(&ServerFrame::LoggedIn { req, token }).await?;
                        self.authenticated(user, device, mode).await
                    }
                    Err(refusal) => self.refuse(req, refusal).await,
                }
            }
            ClientFrame::Authenticate {
                req,
                user,
                device,
                token,
                mode,
            } => {
                match self
                    .check_unauthenticated()
                    .and_then(|()| cmd::account::redirect(&self.host, req, &user))
                {
                    Ok(Some(redirect)) => return self.write(&redirect).await,
                    Ok(None) => {}
                    Err(refusal) => return self.refuse(req, refusal).await,
                }
                let check = cmd::account::authenticate(&self.host, &user, &device, &token);
                match check {
                    Ok(()) => {
                        self.write(&ServerFrame::Ok { req }).await?;
                        self.authenticated(user, device, mode).await
                    }
                    Err(refusal) => self.refuse(req, refusal).await,
                }
            }
            ClientFrame::Logout { req } => {
                let (user, device) = match self.require_auth() {
                    Ok(auth) => (auth.user.clone(), auth.device.clone()),
                    Err(refusal) => return self.refuse(req, refusal).await,
                };
                match cmd::account::logout(&self.host, &user, &device).await {
                    Ok(()) => {
                        self.write(&ServerFrame::Ok { req }).await?;
                        Err(End::Done)
                    }
                    Err(refusal) => self.refuse(req, refusal).await,
                }
            }
            ClientFrame::Relation { req, kind, op } => {
                let user = match self.require_auth() {
                    Ok(auth) => auth.user.clone(),
                    Err(refusal) => return self.refuse(req, refusal).await,
                };
                let answer = cmd::relation::handle(&self.host, req, &user, kind, op).await;
                self.answer(req, answer).await
            }
            submit @ (ClientFrame::Submit { .. } | ClientFrame::SubmitExpiring { .. }) => {
                let stored = self.store_submission(submit);
                self.commit(vec![stored]).await
            }
            ClientFrame::Ack { seq } => {
                self.ack(seq).await;
                Ok(())
            }
            ClientFrame::Fetch { req, max } => self.fetch(req, max).await,
        }
    }

    /// Sends the next page of a paged session's backlog, answers `Page`, and after the last
    /// page sends `Synced` and goes online.
    async fn fetch(&mut self, req: RequestId, max: u32) -> Result<(), End> {
        let max_in_flight = self.host.config.limits.max_in_flight.max(1);
        let page = match (&self.auth, &self.attached) {
            (Some(auth), Some(attached)) => attached.paged.map(|paged| {
                let room = max_in_flight.saturating_sub(attached.window.in_flight());
                (auth.user.clone(), attached.window.last_sent(), paged, room)
            }),
            _ => None,
        };
        let Some((user, last_sent, paged, room)) = page else {
            return self
                .refuse(
                    req,
                    Refusal::new(
                        ErrorCode::INVALID_ARGUMENT,
                        "nothing to fetch: only a session opened in Paged mode fetches its \
                         backlog, and only until Synced",
                    ),
                )
                .await;
        };
        if max == 0 {
            return self
                .refuse(
                    req,
                    Refusal::new(ErrorCode::INVALID_ARGUMENT, "fetch at least 1 message"),
                )
                .await;
        }
        let want = (max as usize).min(room);
        let batch = self
            .host
            .store
            .inbox_after(&user, last_sent, want)
            .map_err(internal)?;
        let mut count = 0u32;
        for (seq, message) in batch {
            if seq > paged.last {
                break;
            }
            self.send_delivery(seq, Arc::new(message)).await?;
            count += 1;
        }
        let Some(attached) = self.attached.as_mut() else {
            return Ok(());
        };
        if let Some(sent) = attached.backlog.as_mut() {
            *sent += u64::from(count);
        }
        // A short page with room to spare means the rest of the backlog is gone (expired).
        let remaining = if (count as usize) < want {
            0
        } else {
            paged.remaining.saturating_sub(u64::from(count))
        };
        let last_page = remaining == 0 || attached.window.last_sent() >= paged.last;
        let remaining = if last_page { 0 } else { remaining };
        attached.paged = (!last_page).then_some(Paged { remaining, ..paged });
        self.write(&ServerFrame::Page {
            req,
            count,
            remaining,
        })
        .await?;
        if last_page {
            // What came in since the summary follows, as in a receive session.
            self.synced().await?;
        }
        Ok(())
    }

    /// How long the session must wait before it takes the next submission, if it must wait at
    /// all. `None` also where no wait would do (a rate of 0): the submission is then refused.
    fn submit_wait(&self) -> Option<Duration> {
        let now = self.started.elapsed().as_millis() as u64;
        match self.submit_rate.wait_ms(now) {
            Some(0) | None => None,
            Some(ms) => Some(Duration::from_millis(ms)),
        }
    }

    /// Refuses a request over the session's rate, before any work is done for it.
    fn rate_limit(&mut self, frame: &ClientFrame) -> Option<(RequestId, Refusal)> {
        let (req, bucket, what) = match frame {
            ClientFrame::Submit { req, .. } | ClientFrame::SubmitExpiring { req, .. } => {
                (*req, &mut self.submit_rate, "messages")
            }
            ClientFrame::Register { req, .. }
            | ClientFrame::Login { req, .. }
            | ClientFrame::Authenticate { req, .. } => {
                (*req, &mut self.auth_rate, "log-in attempts")
            }
            _ => return None,
        };
        if bucket.try_take(self.started.elapsed().as_millis() as u64) {
            return None;
        }
        Some((
            req,
            Refusal::new(
                ErrorCode::RATE_LIMITED,
                format!("too many {what} on this connection; slow down"),
            ),
        ))
    }

    fn check_unauthenticated(&self) -> Result<(), Refusal> {
        match self.auth {
            Some(_) => Err(Refusal::new(
                ErrorCode::ALREADY_AUTHENTICATED,
                "this connection is already authenticated",
            )),
            None => Ok(()),
        }
    }

    fn require_auth(&self) -> Result<&Auth, Refusal> {
        self.auth.as_ref().ok_or_else(|| {
            Refusal::new(ErrorCode::NOT_AUTHENTICATED, "log in or authenticate first")
        })
    }

    /// Marks the connection as `user`'s `device`; in receive mode, makes it the device's
    /// delivery session and sends the backlog before anything new.
    async fn authenticated(
        &mut self,
        user: UserId,
        device: DeviceId,
        mode: SessionMode,
    ) -> Result<(), End> {
        let span = tracing::Span::current();
        span.record("user", user.as_str());
        span.record("device", device.as_str());
        tracing::info!(?mode, "authenticated");
        // What the acks read so far moved, for the identity they were read under.
        self.save_cursor();
        self.auth = Some(Auth {
            user: user.clone(),
            device: device.clone(),
        });
        if mode == SessionMode::SendOnly {
            return Ok(());
        }
        if !self.handshake_complete() {
            self.attach_when_confirmed = Some(mode);
            return Ok(());
        }
        self.attach(user, device, mode).await
    }

    /// Makes this connection the device's delivery session and starts on its backlog (pushed,
    /// or summed up for a paged session).
    async fn attach(
        &mut self,
        user: UserId,
        device: DeviceId,
        mode: SessionMode,
    ) -> Result<(), End> {
        self.save_cursor();
        // From now on the inbox keeps what this device has not acknowledged: before it can
        // take a live delivery that another device's ack could prune.
        self.host
            .store
            .add_cursor(&user, &device)
            .map_err(internal)?;
        // Attach before reading the backlog: an entry appended meanwhile reaches the session
        // both ways, and the window drops the second copy.
        let attachment = self.host.registry.attach(&user, &device);
        let cursor = self.host.store.cursor(&user, &device).map_err(internal)?;
        let paged = if mode == SessionMode::Paged {
            let summary = self
                .host
                .store
                .inbox_summary(&user, cursor, iim_proto::BACKLOG_IDS)
                .map_err(internal)?;
            self.write(&ServerFrame::Backlog {
                count: summary.count,
                bytes: summary.bytes,
                ids: summary.ids,
            })
            .await?;
            // With nothing waiting, `Synced` follows at once, as in a receive session.
            (summary.count > 0).then_some(Paged {
                last: summary.last,
                remaining: summary.count,
            })
        } else {
            None
        };
        self.attached = Some(Attached {
            session: attachment.session,
            window: DeliveryWindow::new(cursor),
            syncing: true,
            backlog: Some(0),
            paged,
            deliveries: attachment.deliveries,
            lag: attachment.lag,
            kick: attachment.kick,
            retransmit: Retransmit::new(self.host.config.limits.retry_policy()),
            unacked: std::collections::BTreeMap::new(),
            watched: std::collections::VecDeque::new(),
            unsaved_cursor: None,
        });
        Ok(())
    }

    /// Sends the next page of the inbox from the store, as far as the window allows; at the
    /// end of the inbox, switches to live deliveries (after `Synced`, the first time).
    async fn sync_step(&mut self, max_in_flight: usize) -> Result<(), End> {
        let (Some(auth), Some(attached)) = (self.auth.as_ref(), self.attached.as_ref()) else {
            return Ok(());
        };
        let room = max_in_flight.saturating_sub(attached.window.in_flight());
        let batch = self
            .host
            .store
            .inbox_after(
                &auth.user,
                attached.window.last_sent(),
                room.min(SYNC_BATCH),
            )
            .map_err(internal)?;
        if batch.is_empty() {
            if let Some(a) = self.attached.as_mut() {
                a.syncing = false;
            }
            return self.synced().await;
        }
        for (seq, message) in batch {
            self.send_delivery(seq, Arc::new(message)).await?;
            if let Some(count) = self.attached.as_mut().and_then(|a| a.backlog.as_mut()) {
                *count += 1;
            }
        }
        Ok(())
    }

    /// Sends `Synced` once, at the end of the backlog; the device is online from then on.
    async fn synced(&mut self) -> Result<(), End> {
        let Some(count) = self.attached.as_mut().and_then(|a| a.backlog.take()) else {
            return Ok(());
        };
        self.write(&ServerFrame::Synced { count }).await?;
        // Online from now on, after the backlog (I3): the presence plugin hears of it.
        let Some(opened) = self.session_info() else {
            return Ok(());
        };
        if let Some(network) = self.host.iim.network() {
            network.report_presence(&opened.user);
        }
        self.host
            .plugins
            .raise(PluginEvent::SessionOpened(opened))
            .await;
        Ok(())
    }

    async fn deliver(&mut self, delivery: Delivery) -> Result<(), End> {
        if !self
            .attached
            .as_ref()
            .is_some_and(|a| a.window.should_send(delivery.seq))
        {
            return Ok(());
        }
        self.send_delivery(delivery.seq, delivery.message).await
    }

    async fn send_delivery(
        &mut self,
        seq: u64,
        message: Arc<iim_proto::Message>,
    ) -> Result<(), End> {
        // The message moves into the frame (cloned only if other sessions share it) and back
        // out of it, to be kept for a retransmission.
        let frame = ServerFrame::Deliver {
            seq,
            message: Arc::unwrap_or_clone(message),
        };
        self.write(&frame).await?;
        let ServerFrame::Deliver { message, .. } = frame else {
            unreachable!("built as a delivery above");
        };
        let watch = match &self.auth {
            Some(auth) if self.host.plugins.wants_delivered(&message.kind) => Some(Delivered {
                id: message.id,
                kind: message.kind.clone(),
                sender: message.from.clone(),
                sender_device: message.from_device.clone(),
                recipient: auth.user.clone(),
                recipient_device: auth.device.clone(),
            }),
            _ => None,
        };
        let now = self.started.elapsed();
        if let Some(attached) = self.attached.as_mut() {
            attached.window.on_sent(seq);
            attached.retransmit.sent(seq, now);
            attached.unacked.insert(seq, Arc::new(message));
            if let Some(delivered) = watch
                && attached.watched.back().is_none_or(|(last, _)| *last < seq)
            {
                attached.watched.push_back((seq, delivered));
            }
        }
        Ok(())
    }

    /// Sends again what the device has not acknowledged in time, or gives the device up once a
    /// delivery has used its retry budget (I4): the session ends, and what was not
    /// acknowledged stays in the inbox for the device's next session.
    async fn retransmit(&mut self) -> Result<(), End> {
        let now = self.started.elapsed();
        let Some(attached) = self.attached.as_mut() else {
            return Ok(());
        };
        match attached.retransmit.poll(now) {
            None => Ok(()),
            Some(Due::GiveUp(seq)) => {
                let policy = attached.retransmit.policy();
                Err(End::Error(
                    ErrorCode::TOO_SLOW,
                    format!(
                        "delivery {seq} sent {} times over {} ms and never acknowledged; what \
                         was not acknowledged stays in the inbox",
                        policy.budget,
                        policy.give_up_after().as_millis()
                    ),
                ))
            }
            Some(Due::Resend(seqs)) => {
                let frames: Vec<ServerFrame> = seqs
                    .iter()
                    .filter_map(|seq| {
                        let message = attached.unacked.get(seq)?;
                        Some(ServerFrame::Deliver {
                            seq: *seq,
                            message: (**message).clone(),
                        })
                    })
                    .collect();
                tracing::debug!(
                    count = frames.len(),
                    "sending unacknowledged deliveries again"
                );
                for frame in &frames {
                    self.write(frame).await?;
                }
                Ok(())
            }
        }
    }

    async fn ack(&mut self, seq: u64) {
        let Some(attached) = self.attached.as_mut() else {
            tracing::debug!(seq, "ack on a connection without deliveries; ignored");
            return;
        };
        let outcome = attached.window.on_ack(seq);
        if outcome != AckOutcome::Unknown {
            attached.retransmit.acked_through(&seq);
            attached.unacked = attached.unacked.split_off(&(seq + 1));
        }
        match outcome {
            AckOutcome::Advanced(cursor) => {
                attached.unsaved_cursor = Some(cursor);
                let mut received = Vec::new();
                while attached.watched.front().is_some_and(|(s, _)| *s <= cursor) {
                    if let Some((_, delivered)) = attached.watched.pop_front() {
                        received.push(delivered);
                    }
                }
                for delivered in received {
                    self.host
                        .plugins
                        .raise(PluginEvent::Delivered(delivered))
                        .await;
                }
            }
            AckOutcome::Held => {}
            AckOutcome::Unknown => tracing::debug!(seq, "ack of nothing in flight; ignored"),
        }
    }

    /// Writes the cursor the acks moved to, and prunes what every device of the user has now
    /// acknowledged. Not flushed: a cursor lost in a crash only means a redelivery, which the
    /// device recognises by the message id (and the pruning written after it is lost with it).
    fn save_cursor(&mut self) {
        let (Some(auth), Some(attached)) = (self.auth.as_ref(), self.attached.as_mut()) else {
            return;
        };
        let Some(cursor) = attached.unsaved_cursor.take() else {
            return;
        };
        let store = &self.host.store;
        if let Err(e) = store
            .set_cursor(&auth.user, &auth.device, cursor)
            .and_then(|()| store.prune(&auth.user))
        {
            tracing::error!(error = %e, "cursor not saved or inbox not pruned");
        }
    }

    async fn answer(
        &mut self,
        req: RequestId,
        answer: Result<ServerFrame, Refusal>,
    ) -> Result<(), End> {
        match answer {
            Ok(frame) => self.write(&frame).await,
            Err(refusal) => self.refuse(req, refusal).await,
        }
    }

    async fn refuse(&mut self, req: RequestId, refusal: Refusal) -> Result<(), End> {
        tracing::debug!(req, code = %refusal.code, reason = %refusal.message, "refused");
        self.write(&ServerFrame::error(
            Some(req),
            refusal.code,
            refusal.message,
        ))
        .await
    }

    /// Writes a frame. A client that stops reading blocks the write once QUIC's flow-control
    /// window is full; past the write timeout the session is ended, so a stalled client cannot
    /// hold a session (and its deliveries) forever.
    async fn write(&mut self, frame: &ServerFrame) -> Result<(), End> {
        let bytes = iim_proto::encode_frame(frame, self.host.config.limits.max_frame)
            .map_err(|e| End::Error(ErrorCode::INTERNAL, format!("answer not encodable: {e}")))?;
        let timeout = Duration::from_secs(self.host.config.limits.write_timeout_secs);
        match tokio::time::timeout(timeout, self.send.write_all(&bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Transport(e.to_string())),
            Err(_) => Err(End::Stalled),
        }
    }

    /// The session's device and how many of its user's devices are online now, for the
    /// session events.
    fn session_info(&self) -> Option<SessionInfo> {
        let auth = self.auth.as_ref()?;
        Some(SessionInfo {
            user: auth.user.clone(),
            device: auth.device.clone(),
            devices_online: self.host.registry.online(&auth.user).len() as u32,
        })
    }

    /// Says why the session ends, lets the client read it, and closes the connection.
    async fn finish(mut self, end: End) {
        if let (Some(auth), Some(attached)) = (&self.auth, &self.attached) {
            self.host.registry.detach(&auth.user, attached.session);
            // The other hosts count the user's attached sessions: told of every one that ends,
            // whether it went online or not.
            if let Some(network) = self.host.iim.network() {
                network.report_presence(&auth.user);
            }
            // Only a session that went online (sent Synced) goes offline.
            if attached.backlog.is_none()
                && let Some(closed) = self.session_info()
            {
                self.host
                    .plugins
                    .raise(PluginEvent::SessionClosed(closed))
                    .await;
            }
        }
        let code = match &end {
            End::Done => {
                tracing::info!("session ended by the client");
                0
            }
            End::Transport(e) => {
                tracing::info!(error = %e, "connection lost");
                return;
            }
            End::Stalled => {
                tracing::info!("client stopped reading; closing");
                let code = ErrorCode::TOO_SLOW;
                self.conn
                    .close(quinn::VarInt::from_u32(code.0.into()), b"not reading");
                return;
            }
            End::Error(code, reason) => {
                tracing::info!(%code, %reason, "session ended by the host");
                let frame = ServerFrame::error(None, *code, reason.clone());
                // Bounded: a client that does not read gets the close without the frame.
                let _ = tokio::time::timeout(Duration::from_secs(2), self.write(&frame)).await;
                code.0
            }
        };
        let _ = self.send.finish();
        // Give the client a moment to read what was written before the connection closes.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.send.stopped()).await;
        self.conn.close(quinn::VarInt::from_u32(code.into()), b"");
    }
}

fn internal(e: crate::store::StoreError) -> End {
    tracing::error!(error = %e, "store failure");
    End::Error(
        ErrorCode::INTERNAL,
        "the host could not read its store".into(),
    )
}

async fn next_delivery(deliveries: Option<&mut mpsc::Receiver<Delivery>>) -> Option<Delivery> {
    match deliveries {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn notified(lag: Option<&Notify>) {
    match lag {
        Some(lag) => lag.notified().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn next_kick(kick: Option<&mut watch::Receiver<Option<Kick>>>) -> Option<Kick> {
    match kick {
        Some(rx) => match rx.changed().await {
            Ok(()) => rx.borrow_and_update().clone(),
            // The registry let go of this session; the delivery queue closing says why.
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
