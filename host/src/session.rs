//! One task per client connection: a thin driver around the sans-IO session machine.
//!
//! [`iim_proto::session::HostSession`] holds the protocol of a connection: the handshake,
//! authentication, the backlog, deliveries and their acknowledgements, retransmission, the
//! pacing of submissions and the rules of 0-RTT. This task moves bytes between the
//! connection's one bidirectional stream and the machine, hands it the device's live
//! deliveries, kicks and the passing of time, and carries out the machine's actions with the
//! host's store, registry, network and plugins (one [`cmd`] module per request, plus `ack` and
//! `fetch`). It runs inside a `tracing` span with the connection's address, user and device.

use crate::Host;
use crate::cmd;
use crate::metrics::Busy;
use crate::plugin::{Event, SessionInfo};
use crate::registry::{Attachment, Delivery, Kick, SignedIn};
use iim_proto::session::{Action, Authenticated, End, HostSession, Identity, Refusal};
use iim_proto::{AccountOp, DeviceId, ErrorCode, ServerFrame, UserId};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, watch};
use tracing::Instrument;

/// How long the last frames of a session that ends may take to write.
const LAST_WRITE: Duration = Duration::from_secs(2);

/// Received chunks a session takes from its stream at once.
const READ_CHUNKS: usize = 16;

/// A connection's driver.
struct Session {
    host: Arc<Host>,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    machine: HostSession,
    /// Resolves when the TLS handshake is complete; until then what is read may be 0-RTT
    /// early data. `None` once it resolved.
    early: Option<Pin<Box<quinn::ZeroRttAccepted>>>,
    /// The device's deliveries, once the session is its delivery session.
    delivery: Option<Attachment>,
    /// Once authenticated: the registry's hold on the connection, which ends it when its
    /// device is revoked or its account deleted.
    signed_in: Option<(Identity, SignedIn)>,
    /// The client stopped reading: nothing more can be written to it.
    stalled: bool,
    /// No more file streams will come: the connection is ending.
    streams_closed: bool,
}

/// Runs the session of an accepted connection until it ends. `early` resolves when the TLS
/// handshake is complete; until then the connection may carry 0-RTT early data.
pub async fn run(host: Arc<Host>, conn: quinn::Connection, early: quinn::ZeroRttAccepted) {
    let span = tracing::info_span!("session", remote = %conn.remote_address(), user = tracing::field::Empty, device = tracing::field::Empty);
    async move {
        let _open = Open::connection();
        // What a session holds while it waits is what every idle connection costs: the
        // session and its `serve` loop, nothing of how it opened (in `open`, which returns
        // it), of what it does (`act` boxes each action) or of how it ends (boxed).
        let Some(mut session) = Session::open(host, conn, early).await else {
            return;
        };
        session.serve().await;
        Box::pin(session.finish()).await;
    }
    .instrument(span)
    .await
}

/// A connection counted open (the metric `connections`) while it lives.
struct Open;

impl Open {
    fn connection() -> Self {
        crate::metrics::metrics().connections.inc();
        Self
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        crate::metrics::metrics().connections.dec();
    }
}

/// The refusal of a request its address is over a limit for (`[limits] address_*`).
fn over_address_limit(limited: &crate::address_limits::Limited) -> Refusal {
    tracing::info!(%limited, "refused: over the limit of its address");
    Refusal::new(ErrorCode::RATE_LIMITED, limited.to_string())
}

impl Session {
    /// The session of `conn`, once the client opened its stream; none if it did not in
    /// time (the connection is closed) or the connection ended first.
    async fn open(
        host: Arc<Host>,
        conn: quinn::Connection,
        early: quinn::ZeroRttAccepted,
    ) -> Option<Self> {
        let config = host.config.limits.session(host.iim.server());
        let mut machine = HostSession::new(Instant::now(), config, true);
        // One deadline for opening the stream and sending Hello: the machine's first.
        let deadline = machine
            .poll_timeout()
            .map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std);
        let (send, recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connection closed before opening a stream");
                return None;
            }
            Err(_) => {
                conn.close(
                    quinn::VarInt::from_u32(ErrorCode::HANDSHAKE.0.into()),
                    b"no stream opened",
                );
                return None;
            }
        };
        Some(Session {
            host,
            conn,
            send,
            recv,
            machine,
            early: Some(Box::pin(early)),
            delivery: None,
            signed_in: None,
            stalled: false,
            streams_closed: false,
        })
    }

    /// The address the client is at now.
    fn ip(&self) -> std::net::IpAddr {
        self.conn.remote_address().ip()
    }

    /// Drives the machine until the session ends.
    async fn serve(&mut self) {
        // What the client sent, taken as the chunks quinn received (no copy, and no buffer of
        // the session's own: an idle session holds none), several at a time.
        let mut chunks: [bytes::Bytes; READ_CHUNKS] = Default::default();
        let mut shutdown = self.host.shutdown.clone();
        loop {
            self.act().await;
            if self.machine.end().is_some() {
                return;
            }
            if let Err(end) = self.transmit().await {
                return self.machine.close(end);
            }
            let timeout = self.machine.poll_timeout();
            let (wants_data, wants_live) = (self.machine.wants_data(), self.machine.wants_live());
            let early = self.early.as_mut();
            let is_early = early.is_some();
            let (deliveries, lag, kick) = match self.delivery.as_mut() {
                Some(a) => (Some(&mut a.deliveries), Some(&*a.lag), Some(&mut a.kick)),
                None => (None, None, None),
            };
            let ended = self.signed_in.as_mut().map(|(_, s)| &mut s.kick);
            // Biased: the handshake's end first, so that nothing read after it counts as
            // early; then what the client sent (acks above all), before more is sent to it.
            tokio::select! {
                biased;
                _ = async { early?.await; Some(()) }, if is_early => self.confirmed(),
                read = self.recv.read_chunks(&mut chunks), if wants_data => match read {
                    Ok(Some(n)) => {
                        self.check_confirmed();
                        let _busy = Busy::start(|m| &m.busy_frames);
                        self.machine.handle_data_parts(Instant::now(), &chunks[..n]);
                        // Not kept until the next read: they hold received packets.
                        chunks[..n].fill(bytes::Bytes::new());
                    }
                    Ok(None) => self.machine.handle_finished(Instant::now()),
                    Err(quinn::ReadError::ConnectionLost(
                        quinn::ConnectionError::ApplicationClosed(_),
                    )) => self.machine.close(End::Done),
                    // Its Display is only "connection lost"; the reason (timed out, reset)
                    // is what the operator needs.
                    Err(quinn::ReadError::ConnectionLost(lost)) => {
                        self.machine.close(End::Lost(lost.to_string()));
                    }
                    Err(e) => self.machine.close(End::Lost(e.to_string())),
                },
                // A file stream: served by a task of its own, as the connection's identity
                // is now (refused if it has none yet).
                stream = self.conn.accept_bi(), if !self.streams_closed => match stream {
                    Ok((send, recv)) => {
                        let who = self.machine.identity().cloned();
                        let host = Arc::clone(&self.host);
                        tokio::spawn(
                            cmd::file::serve(host, who, send, recv).in_current_span(),
                        );
                    }
                    // The connection is ending; the session's own stream says how.
                    Err(_) => self.streams_closed = true,
                },
                _ = shutdown.wait_for(|stopping| *stopping) => self.machine.close(End::Error {
                    code: ErrorCode::SHUTTING_DOWN,
                    reason: "the host is shutting down; reconnect later".into(),
                }),
                kick = next_kick(kick) => if let Some(kick) = kick {
                    self.machine.close(kicked(kick));
                },
                kick = next_kick(ended) => if let Some(kick) = kick {
                    self.machine.close(kicked(kick));
                },
                () = notified(lag) => {
                    if let Some(a) = self.delivery.as_mut() {
                        // Everything queued is in the inbox: dropped, and read from the store.
                        while a.deliveries.try_recv().is_ok() {}
                        tracing::debug!("live queue overflowed; catching up from the inbox");
                    }
                    self.machine.handle_lag(Instant::now());
                }
                () = sleep_until(timeout) => self.machine.handle_timeout(Instant::now()),
                delivery = next_delivery(deliveries), if wants_live => match delivery {
                    Some(d) => {
                        let now = Instant::now();
                        self.machine.handle_live(now, d.seq, d.message);
                        // What else is queued goes out in the same write.
                        while self.machine.wants_live()
                            && let Some(a) = self.delivery.as_mut()
                            && let Ok(d) = a.deliveries.try_recv()
                        {
                            self.machine.handle_live(now, d.seq, d.message);
                        }
                    }
                    // The registry let go of this session: it was replaced, and the kick
                    // says so.
                    None => {
                        let kick = self.delivery.as_ref().and_then(|a| a.kick.borrow().clone());
                        self.machine.close(kick.map_or_else(
                            || End::Error {
                                code: ErrorCode::INTERNAL,
                                reason: "delivery queue closed".into(),
                            },
                            kicked,
                        ));
                    }
                },
            }
        }
    }

    /// Carries out what the machine asks, handing back the outcomes.
    async fn act(&mut self) {
        while let Some(action) = self.machine.poll_action() {
            Box::pin(self.carry_out(action)).await;
        }
    }

    async fn carry_out(&mut self, action: Action) {
        let host = Arc::clone(&self.host);
        match action {
            Action::Register {
                req,
                user,
                password,
            } => {
                let answer = match host.addresses.register(self.ip(), crate::clock::now_ms()) {
                    Ok(()) => cmd::account::register(&host, &user, password).await,
                    Err(limited) => Err(over_address_limit(&limited)),
                };
                let answer = answer.map(|()| ServerFrame::Ok { req });
                self.machine.handle_answer(Instant::now(), req, answer);
            }
            Action::Login {
                req,
                user,
                password,
                device,
            } => {
                let outcome = match host.addresses.login(self.ip(), crate::clock::now_ms()) {
                    Ok(()) => cmd::account::login(&host, &user, password, &device).await,
                    Err(limited) => Err(over_address_limit(&limited)),
                };
                self.authenticated(req, outcome, &user, &device);
            }
            Action::Authenticate {
                req,
                user,
                device,
                token,
            } => {
                let outcome = cmd::account::authenticate(&host, &user, &device, &token);
                self.authenticated(req, outcome, &user, &device);
            }
            Action::Logout { req, who } => {
                let outcome = cmd::account::logout(&host, &who.user, &who.device).await;
                self.machine.handle_logged_out(Instant::now(), req, outcome);
            }
            Action::Account { req, who, op } => match op {
                AccountOp::Delete { password } => {
                    let outcome = cmd::account::delete(&host, &who, password).await;
                    self.machine.handle_logged_out(Instant::now(), req, outcome);
                }
                op => {
                    let answer = cmd::account::manage(&host, req, &who, op).await;
                    self.machine.handle_answer(Instant::now(), req, answer);
                }
            },
            Action::Relation {
                req,
                user,
                kind,
                op,
            } => {
                let answer = cmd::relation::handle(&host, req, &user, kind, op).await;
                self.machine.handle_answer(Instant::now(), req, answer);
            }
            Action::Accept { who, submissions } => {
                let (outcomes, dispatch) = cmd::submit::accept_all(&host, &who, submissions).await;
                self.machine.handle_accepted(Instant::now(), outcomes);
                // Durable now: answered first, then dispatched whether or not the answers
                // reach the client.
                if let Err(end) = self.transmit().await {
                    self.machine.close(end);
                }
                for message in dispatch {
                    host.plugins.raise(Event::Message(Arc::new(message))).await;
                }
            }
            Action::Attach { who, mode } => match cmd::fetch::attach(&host, &who, mode) {
                Ok((attachment, cursor, summary)) => {
                    self.delivery = Some(attachment);
                    self.machine
                        .handle_attached(Instant::now(), cursor, summary);
                }
                Err(e) => self.machine.close(internal(e)),
            },
            Action::ReadInbox { user, after, max } => {
                match cmd::fetch::read(&host, &user, after, max) {
                    Ok(entries) => self.machine.handle_inbox(Instant::now(), entries),
                    Err(e) => self.machine.close(internal(e)),
                }
            }
            Action::SaveCursor { who, cursor } => cmd::ack::save_cursor(&host, &who, cursor),
            Action::Delivered { who, messages } => cmd::ack::delivered(&host, &who, messages).await,
            Action::Online { who } => {
                // Online from now on, after the backlog (I3): the presence plugin hears of it.
                if let Some(network) = &host.network {
                    network.report_presence(&who.user);
                }
                let opened = session_info(&host, &who);
                host.plugins.raise(Event::SessionOpened(opened)).await;
            }
            Action::Detach { who, online } => {
                if let Some(attachment) = self.delivery.take() {
                    host.registry.detach(&who.user, attachment.session);
                }
                // The other hosts count the user's attached sessions: told of every one that
                // ends, whether it went online or not.
                if let Some(network) = &host.network {
                    network.report_presence(&who.user);
                }
                // Only a session that went online (sent Synced) goes offline.
                if online {
                    let closed = session_info(&host, &who);
                    host.plugins.raise(Event::SessionClosed(closed)).await;
                }
            }
        }
    }

    /// Hands a login's or an authentication's outcome to the machine, and names the session
    /// after the device it now acts as.
    fn authenticated(
        &mut self,
        req: u64,
        outcome: Result<Authenticated, Refusal>,
        user: &UserId,
        device: &DeviceId,
    ) {
        if let Ok(Authenticated::LoggedIn { .. } | Authenticated::TokenAccepted) = &outcome {
            let signed_in = self.host.registry.sign_in(user, device);
            let who = Identity {
                user: user.clone(),
                device: device.clone(),
            };
            self.signed_in = Some((who, signed_in));
            let span = tracing::Span::current();
            span.record("user", user.as_str());
            span.record("device", device.as_str());
            tracing::info!("authenticated");
        }
        self.machine
            .handle_authenticated(Instant::now(), req, outcome);
    }

    /// Writes what the machine has to send, in one write. A client that stops reading blocks
    /// it once QUIC's flow-control window is full; past the write timeout the session is
    /// ended, so a stalled client cannot hold a session (and its deliveries) forever.
    async fn transmit(&mut self) -> Result<(), End> {
        let busy = Busy::start(|m| &m.busy_frames);
        let mut bytes = Vec::new();
        while let Some(frame) = self.machine.poll_transmit() {
            bytes.extend_from_slice(&frame);
        }
        drop(busy);
        let counts = self.machine.take_counts();
        if counts.sent > 0 {
            let metrics = crate::metrics::metrics();
            metrics.deliveries.inc_by(counts.sent - counts.resent);
            metrics.redeliveries.inc_by(counts.resent);
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let timeout = Duration::from_secs(self.host.config.limits.write_timeout_secs);
        match tokio::time::timeout(timeout, self.send.write_all(&bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(quinn::WriteError::ConnectionLost(lost))) => Err(End::Lost(lost.to_string())),
            Ok(Err(e)) => Err(End::Lost(e.to_string())),
            Err(_) => {
                self.stalled = true;
                Err(End::Lost("the client stopped reading".into()))
            }
        }
    }

    /// Whether the TLS handshake completed meanwhile (looked at now, without waiting), so
    /// that what was just read is not taken for early data.
    fn check_confirmed(&mut self) {
        let Some(early) = self.early.as_mut() else {
            return;
        };
        if early
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_ready()
        {
            self.confirmed();
        }
    }

    /// The handshake is complete: a session authenticated in early data takes its device's
    /// deliveries now. The future also resolves when the connection ends first (a replayed
    /// first flight that timed out): such a connection must not take them.
    fn confirmed(&mut self) {
        self.early = None;
        match self.conn.close_reason() {
            Some(reason) => self.machine.close(End::Lost(format!(
                "connection ended before its handshake completed: {reason}"
            ))),
            None => self.machine.handle_confirmed(Instant::now()),
        }
    }

    /// Carries out the last actions, says why the session ends, lets the client read it, and
    /// closes the connection.
    async fn finish(mut self) {
        self.act().await;
        if let Some((who, signed_in)) = self.signed_in.take() {
            self.host.registry.sign_out(&who.user, signed_in.id);
            // The device's last activity; not for a revoked device or a deleted account.
            let kicked = signed_in.kick.borrow().is_some();
            if !kicked
                && let Err(e) = self.host.store.accounts.touch(
                    &who.user,
                    &who.device,
                    crate::clock::now_ms(),
                    false,
                )
            {
                tracing::warn!(error = %e, "the device's last activity not recorded");
            }
        }
        if self.stalled {
            tracing::info!("client stopped reading; closing");
            self.conn.close(
                quinn::VarInt::from_u32(ErrorCode::TOO_SLOW.0.into()),
                b"not reading",
            );
            return;
        }
        let code = match self.machine.end().cloned().unwrap_or(End::Done) {
            End::Done => {
                tracing::info!("session ended by the client");
                0
            }
            End::Lost(e) => {
                tracing::info!(error = %e, "connection lost");
                return;
            }
            End::Error { code, reason } => {
                tracing::info!(%code, %reason, "session ended by the host");
                code.0
            }
        };
        // Bounded: a client that does not read gets the close without the last frames.
        let _ = tokio::time::timeout(LAST_WRITE, self.transmit()).await;
        let _ = self.send.finish();
        // Give the client a moment to read what was written before the connection closes.
        let _ = tokio::time::timeout(LAST_WRITE, self.send.stopped()).await;
        self.conn.close(quinn::VarInt::from_u32(code.into()), b"");
    }
}

/// The device of `who` and how many of its user's devices are online now, for the session
/// events.
fn session_info(host: &Host, who: &Identity) -> SessionInfo {
    SessionInfo {
        user: who.user.clone(),
        device: who.device.clone(),
        devices_online: host.registry.online(&who.user).len() as u32,
    }
}

fn kicked(kick: Kick) -> End {
    End::Error {
        code: kick.code,
        reason: kick.reason,
    }
}

fn internal(e: crate::store::StoreError) -> End {
    tracing::error!(error = %e, "store failure");
    End::Error {
        code: ErrorCode::INTERNAL,
        reason: "the host could not read its store".into(),
    }
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
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
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
