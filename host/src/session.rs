//! One task per client connection: the handshake, then frames in, answers and deliveries out.
//!
//! The session reads the connection's one bidirectional stream through the sans-IO
//! [`FrameDecoder`] and handles one frame at a time, so one sender's messages are accepted and
//! dispatched in the order it sent them. Bad input ends only this session, with an error frame
//! that says why.

use crate::cmd::{self, Refusal, submit::Submission};
use crate::dispatch;
use crate::registry::{Delivery, Kick, SessionId};
use crate::{Host, now_ms};
use iim_proto::{
    AckOutcome, ClientFrame, CodecError, DeliveryWindow, DeviceId, ErrorCode, FrameDecoder,
    RequestId, ServerFrame, SessionMode, TokenBucket, UserId,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
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
}

/// A connection's state.
struct Session {
    host: Arc<Host>,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    auth: Option<Auth>,
    attached: Option<Attached>,
    deliveries: Option<mpsc::Receiver<Delivery>>,
    kick: Option<watch::Receiver<Option<Kick>>>,
    submit_rate: TokenBucket,
    auth_rate: TokenBucket,
}

enum Event {
    Read(Result<Option<usize>, quinn::ReadError>),
    Delivery(Option<Delivery>),
    Kicked(Option<Kick>),
    Shutdown,
}

/// Runs the session of an accepted connection until it ends.
pub async fn run(host: Arc<Host>, conn: quinn::Connection) {
    let span = tracing::info_span!("session", remote = %conn.remote_address(), user = tracing::field::Empty, device = tracing::field::Empty);
    async move {
        let timeout = Duration::from_secs(host.config.limits.handshake_timeout_secs);
        let (send, recv) = match tokio::time::timeout(timeout, conn.accept_bi()).await {
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
            deliveries: None,
            kick: None,
            submit_rate: TokenBucket::new(limits.submit_rate, limits.submit_burst, now_ms()),
            auth_rate: TokenBucket::new(limits.auth_rate, limits.auth_burst, now_ms()),
        };
        let end = session.serve().await;
        session.finish(end).await;
    }
    .instrument(span)
    .await
}

impl Session {
    async fn serve(&mut self) -> End {
        if let Err(end) = self.handshake().await {
            return end;
        }
        // Frames that arrived in the same read as Hello are already buffered.
        if let Err(end) = self.drain_frames().await {
            return end;
        }
        let mut buf = vec![0u8; 16 * 1024];
        let mut shutdown = self.host.shutdown.clone();
        loop {
            let event = tokio::select! {
                read = self.recv.read(&mut buf) => Event::Read(read),
                delivery = next_delivery(&mut self.deliveries) => Event::Delivery(delivery),
                kick = next_kick(&mut self.kick) => Event::Kicked(kick),
                _ = shutdown.wait_for(|stopping| *stopping) => Event::Shutdown,
            };
            let step = match event {
                Event::Read(Ok(Some(n))) => {
                    self.decoder.push(&buf[..n]);
                    self.drain_frames().await
                }
                Event::Read(Ok(None)) => Err(End::Done),
                Event::Read(Err(quinn::ReadError::ConnectionLost(
                    quinn::ConnectionError::ApplicationClosed(_),
                ))) => Err(End::Done),
                Event::Read(Err(e)) => Err(End::Transport(e.to_string())),
                Event::Delivery(Some(delivery)) => self.deliver(delivery).await,
                // The registry dropped this session: it was replaced or found too slow, and
                // the kick says which.
                Event::Delivery(None) => {
                    self.deliveries = None;
                    match self.kick.as_ref().and_then(|k| k.borrow().clone()) {
                        Some(kick) => Err(End::Error(kick.code, kick.reason)),
                        None => Err(End::Error(
                            ErrorCode::INTERNAL,
                            "delivery queue closed".into(),
                        )),
                    }
                }
                Event::Kicked(Some(kick)) => Err(End::Error(kick.code, kick.reason)),
                Event::Kicked(None) => Ok(()),
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
    async fn handshake(&mut self) -> Result<(), End> {
        let timeout = Duration::from_secs(self.host.config.limits.handshake_timeout_secs);
        let mut buf = vec![0u8; 4096];
        let hello = tokio::time::timeout(timeout, async {
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

    async fn drain_frames(&mut self) -> Result<(), End> {
        while let Some(frame) = self.decoder.decode::<ClientFrame>()? {
            self.handle(frame).await?;
        }
        Ok(())
    }

    async fn handle(&mut self, frame: ClientFrame) -> Result<(), End> {
        if let Some((req, refusal)) = self.rate_limit(&frame) {
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
                let check = self
                    .check_unauthenticated()
                    .and_then(|()| cmd::account::authenticate(&self.host, &user, &device, &token));
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
                let answer = self
                    .require_auth()
                    .and_then(|auth| cmd::relation::handle(&self.host, req, &auth.user, kind, op));
                self.answer(req, answer).await
            }
            ClientFrame::Submit {
                req,
                client_id,
                kind,
                to,
                body,
            } => {
                let (user, device) = match self.require_auth() {
                    Ok(auth) => (auth.user.clone(), auth.device.clone()),
                    Err(refusal) => return self.refuse(req, refusal).await,
                };
                let submission = Submission {
                    req,
                    client_id,
                    kind,
                    to,
                    body,
                };
                match cmd::submit::handle(&self.host, &user, &device, submission).await {
                    Ok((accepted, message)) => {
                        self.write(&accepted).await?;
                        if let Some(message) = message
                            && let Err(e) = dispatch::run(&self.host, &message)
                        {
                            // Accepted and durable: it stays recorded for dispatch and is
                            // dispatched again at the next start.
                            tracing::error!(id = %message.id, error = %e, "dispatch failed");
                        }
                        Ok(())
                    }
                    Err(refusal) => self.refuse(req, refusal).await,
                }
            }
            ClientFrame::Ack { seq } => {
                self.ack(seq);
                Ok(())
            }
        }
    }

    /// Refuses a request over the session's rate, before any work is done for it.
    fn rate_limit(&mut self, frame: &ClientFrame) -> Option<(RequestId, Refusal)> {
        let (req, bucket, what) = match frame {
            ClientFrame::Submit { req, .. } => (*req, &mut self.submit_rate, "messages"),
            ClientFrame::Register { req, .. }
            | ClientFrame::Login { req, .. }
            | ClientFrame::Authenticate { req, .. } => {
                (*req, &mut self.auth_rate, "log-in attempts")
            }
            _ => return None,
        };
        if bucket.try_take(now_ms()) {
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
        self.auth = Some(Auth {
            user: user.clone(),
            device: device.clone(),
        });
        if mode == SessionMode::SendOnly {
            return Ok(());
        }
        // Attach before scanning: an entry appended during the scan reaches the session either
        // way, and the window drops the second copy.
        let attachment = self.host.registry.attach(&user, &device);
        self.deliveries = Some(attachment.deliveries);
        self.kick = Some(attachment.kick);
        self.attached = Some(Attached {
            session: attachment.session,
            window: DeliveryWindow::new(0),
        });
        let cursor = self.host.store.cursor(&user, &device).map_err(internal)?;
        if let Some(attached) = self.attached.as_mut() {
            attached.window = DeliveryWindow::new(cursor);
        }
        let mut count = 0u64;
        loop {
            let after = self.window().map_or(cursor, DeliveryWindow::last_sent);
            let batch = self
                .host
                .store
                .inbox_after(&user, after, SYNC_BATCH)
                .map_err(internal)?;
            if batch.is_empty() {
                break;
            }
            for (seq, message) in batch {
                self.send_delivery(seq, ServerFrame::Deliver { seq, message })
                    .await?;
                count += 1;
            }
        }
        self.write(&ServerFrame::Synced { count }).await
    }

    fn window(&self) -> Option<&DeliveryWindow> {
        self.attached.as_ref().map(|a| &a.window)
    }

    async fn deliver(&mut self, delivery: Delivery) -> Result<(), End> {
        if !self.window().is_some_and(|w| w.should_send(delivery.seq)) {
            return Ok(());
        }
        let frame = ServerFrame::Deliver {
            seq: delivery.seq,
            message: Arc::unwrap_or_clone(delivery.message),
        };
        self.send_delivery(delivery.seq, frame).await
    }

    async fn send_delivery(&mut self, seq: u64, frame: ServerFrame) -> Result<(), End> {
        self.write(&frame).await?;
        if let Some(attached) = self.attached.as_mut() {
            attached.window.on_sent(seq);
        }
        Ok(())
    }

    fn ack(&mut self, seq: u64) {
        let (Some(auth), Some(attached)) = (self.auth.as_ref(), self.attached.as_mut()) else {
            tracing::debug!(seq, "ack on a connection without deliveries; ignored");
            return;
        };
        match attached.window.on_ack(seq) {
            AckOutcome::Advanced(cursor) => {
                // Not flushed: a cursor lost in a crash only means a redelivery, which the
                // device recognises by the message id.
                if let Err(e) = self.host.store.set_cursor(&auth.user, &auth.device, cursor) {
                    tracing::error!(error = %e, "cursor not saved");
                }
            }
            AckOutcome::Held => {}
            AckOutcome::Unknown => tracing::debug!(seq, "ack of nothing in flight; ignored"),
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

    /// Says why the session ends, lets the client read it, and closes the connection.
    async fn finish(mut self, end: End) {
        if let (Some(auth), Some(attached)) = (&self.auth, &self.attached) {
            self.host.registry.detach(&auth.user, attached.session);
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

async fn next_delivery(deliveries: &mut Option<mpsc::Receiver<Delivery>>) -> Option<Delivery> {
    match deliveries {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_kick(kick: &mut Option<watch::Receiver<Option<Kick>>>) -> Option<Kick> {
    match kick {
        Some(rx) => match rx.changed().await {
            Ok(()) => rx.borrow_and_update().clone(),
            // The registry let go of this session; the delivery queue closing says why.
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
