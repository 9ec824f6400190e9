//! The host's side of one client connection.
//!
//! A [`HostSession`] takes what the client sent ([`HostSession::handle_data`]), what the store
//! and the other sessions produced for it ([`HostSession::handle_inbox`],
//! [`HostSession::handle_live`]) and the passing of time ([`HostSession::handle_timeout`]). It
//! answers with frames to send ([`HostSession::poll_transmit`]), the moment it wants to be
//! woken ([`HostSession::poll_timeout`]) and [`Action`]s the driver carries out: checking a
//! password, storing submissions, reading the inbox, saving the device's cursor, raising plugin
//! events. An action that has an outcome (a login's, a submission's, an inbox page) holds the
//! session until the driver hands the outcome back: frames are handled one at a time, in the
//! order the client sent them, so one sender's messages are accepted in its order.
//!
//! The rules it keeps (`docs/protocol.md` gives the client's view):
//! - The first frame is `Hello` (within the handshake timeout); then the connection has the
//!   auth timeout to log in or authenticate.
//! - Until the TLS handshake is complete, frames may be 0-RTT early data that an attacker can
//!   replay: only frames safe to replay are taken (`ClientFrame::allowed_early`), the rest are
//!   refused with `too_early`, and a delivery session authenticated early attaches only once the
//!   handshake is complete.
//! - Consecutive submissions are stored together and answered after one flush (group commit);
//!   past the session's rate, the next one waits for its turn and nothing more is read.
//! - A receive session gets its backlog from its cursor before anything new (I3): it attaches
//!   first, then reads the inbox until it is empty, sends `Synced`, and only then takes live
//!   deliveries, dropping the ones the backlog sent. A paged session announces its backlog and
//!   sends it a page per `Fetch`.
//! - At most `max_in_flight` deliveries wait for acknowledgement; each is sent again with
//!   doubling waits and, past the retry budget, the device is given up with `too_slow` (I4).
//!   The cursor moves only on acknowledgements, to just before the oldest delivery still
//!   waiting, and is saved once for the acknowledgements read together.

use super::{End, Refusal, RetryPolicy};
use crate::codec::{CodecError, FrameDecoder, encode_deliver, encode_frame};
use crate::frame::{
    AccountOp, ClientFrame, ErrorCode, Message, MessageId, MessageKind, RelationKind, RelationOp,
    RequestId, ServerFrame, SessionMode,
};
use crate::name::{Address, DeviceId, UserId};
use crate::rate::TokenBucket;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a session is allowed and given.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The host's server id, for `Welcome`.
    pub server: String,
    /// Largest frame either side sends, in bytes.
    pub max_frame: u32,
    /// Largest message body the host accepts, for `Welcome`.
    pub max_body: u32,
    /// Time from the connection's start to `Hello`.
    pub handshake_timeout: Duration,
    /// Time from `Welcome` to a successful login or authentication.
    pub auth_timeout: Duration,
    /// Deliveries waiting for acknowledgement, at most.
    pub max_in_flight: usize,
    /// Inbox entries read from the store at a time while sending a backlog.
    pub sync_batch: usize,
    /// Retransmission of unacknowledged deliveries.
    pub retry: RetryPolicy,
    /// Submissions per second, on average (0: none past the burst).
    pub submit_rate: u32,
    /// Submissions in a burst.
    pub submit_burst: u32,
    /// Register, login and authenticate attempts per second.
    pub auth_rate: u32,
    /// Register, login and authenticate attempts in a burst.
    pub auth_burst: u32,
}

/// The user and device a session acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
}

/// A submission's fields (`Submit` or `SubmitExpiring`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    /// Request id.
    pub req: RequestId,
    /// The client's idempotency id.
    pub client_id: u64,
    /// The kind.
    pub kind: MessageKind,
    /// The recipients: users, or one group.
    pub to: Vec<Address>,
    /// The body.
    pub body: Vec<u8>,
    /// Seconds until it expires, if the client chose; otherwise the host's default.
    pub ttl_secs: Option<u32>,
}

impl Submission {
    /// The submission in `frame`, if it is one; else the frame back.
    pub fn of(frame: ClientFrame) -> Result<Self, ClientFrame> {
        match frame {
            ClientFrame::Submit {
                req,
                client_id,
                kind,
                to,
                body,
            } => Ok(Self {
                req,
                client_id,
                kind,
                to,
                body,
                ttl_secs: None,
            }),
            ClientFrame::SubmitExpiring {
                req,
                client_id,
                kind,
                to,
                body,
                ttl_secs,
            } => Ok(Self {
                req,
                client_id,
                kind,
                to,
                body,
                ttl_secs: Some(ttl_secs),
            }),
            other => Err(other),
        }
    }
}

/// The outcome of one stored submission ([`Action::Accept`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmitAnswer {
    /// The host's id for the message.
    pub id: MessageId,
    /// When the host accepted it, in ms since the Unix epoch.
    pub sent_at: u64,
}

/// The outcome of a login or authentication ([`Action::Login`], [`Action::Authenticate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authenticated {
    /// The password was right: the device's new token.
    LoggedIn {
        /// The token.
        token: String,
    },
    /// The token was right.
    TokenAccepted,
    /// The user lives on another host of the network; the connection stays unauthenticated.
    Redirect {
        /// The home host's server id.
        server: String,
        /// Its address for clients.
        addr: String,
    },
}

/// What waits in an inbox for a paged session ([`HostSession::handle_attached`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxSummary {
    /// How many entries.
    pub count: u64,
    /// The sum of their body sizes, in bytes.
    pub bytes: u64,
    /// The ids of the first entries, oldest first.
    pub ids: Vec<MessageId>,
    /// The position of the last entry.
    pub last: u64,
}

/// What the driver must do for the session. The variants that say "hand the outcome back"
/// hold the session until the driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create an account; hand the outcome back with [`HostSession::handle_answer`]
    /// (`ServerFrame::Ok`).
    Register {
        /// Request id.
        req: RequestId,
        /// The new user.
        user: UserId,
        /// The password.
        password: String,
    },
    /// Check a password and issue the device a token (or redirect the user home); hand the
    /// outcome back with [`HostSession::handle_authenticated`].
    Login {
        /// Request id.
        req: RequestId,
        /// The user.
        user: UserId,
        /// The password.
        password: String,
        /// The device.
        device: DeviceId,
    },
    /// Check a device's token (or redirect the user home); hand the outcome back with
    /// [`HostSession::handle_authenticated`].
    Authenticate {
        /// Request id.
        req: RequestId,
        /// The user.
        user: UserId,
        /// The device.
        device: DeviceId,
        /// The token.
        token: String,
    },
    /// Revoke the device's token and end its delivery session elsewhere; hand the outcome back
    /// with [`HostSession::handle_logged_out`]. The session then ends.
    Logout {
        /// Request id.
        req: RequestId,
        /// Who logs out.
        who: Identity,
    },
    /// Change or read a relation list; hand the answer back with
    /// [`HostSession::handle_answer`].
    Relation {
        /// Request id.
        req: RequestId,
        /// Whose list.
        user: UserId,
        /// Which list.
        kind: RelationKind,
        /// What to do.
        op: RelationOp,
    },
    /// Change, list, revoke or delete what `who`'s account holds; hand the answer back with
    /// [`HostSession::handle_answer`], or for [`AccountOp::Delete`] with
    /// [`HostSession::handle_logged_out`] (the session then ends).
    Account {
        /// Request id.
        req: RequestId,
        /// Who asks.
        who: Identity,
        /// What to do.
        op: AccountOp,
    },
    /// Check and store these submissions of `who`, make them durable with one flush, and
    /// hand the outcomes back, in this order, with [`HostSession::handle_accepted`]; then
    /// dispatch the new messages.
    Accept {
        /// The sender.
        who: Identity,
        /// The submissions, in the order they were sent.
        submissions: Vec<Submission>,
    },
    /// Make this connection the delivery session of `who`'s device (ending the one it
    /// replaces) and read its cursor, and for a paged session the inbox's summary after it;
    /// hand them back with [`HostSession::handle_attached`].
    Attach {
        /// The device.
        who: Identity,
        /// Receive or paged.
        mode: SessionMode,
    },
    /// Read up to `max` entries of `user`'s inbox after position `after`, in position order;
    /// hand them back with [`HostSession::handle_inbox`].
    ReadInbox {
        /// Whose inbox.
        user: UserId,
        /// The position to read after.
        after: u64,
        /// Most entries to read (at least 1).
        max: usize,
    },
    /// Store the device's cursor (not durably: a cursor lost in a crash means a redelivery,
    /// which the device recognises) and prune what every device of the user acknowledged.
    SaveCursor {
        /// The device.
        who: Identity,
        /// The new cursor.
        cursor: u64,
    },
    /// The device acknowledged these deliveries: raise `delivered` for the ones a plugin
    /// wants.
    Delivered {
        /// The recipient.
        who: Identity,
        /// The messages, in position order.
        messages: Vec<Arc<Message>>,
    },
    /// The device is online, after its backlog: raise `session-opened`.
    Online {
        /// The device.
        who: Identity,
    },
    /// The session is over: the driver detaches it from the device's deliveries and, if it
    /// went online, raises `session-closed`.
    Detach {
        /// The device.
        who: Identity,
        /// Whether it had sent `Synced`.
        online: bool,
    },
}

/// Where a session is.
#[derive(Debug)]
enum Phase {
    /// Waiting for `Hello`.
    Handshake { deadline: Instant },
    /// Welcomed; waiting for a login or an authentication.
    Unauthenticated { deadline: Instant },
    /// Acting as a device.
    Authenticated { who: Identity, delivery: Delivery },
    /// Over; the driver reads [`HostSession::end`].
    Closed,
}

/// What an authenticated session is to its device's deliveries.
#[derive(Debug)]
enum Delivery {
    /// Nothing (a send-only session).
    None,
    /// A receive or paged session authenticated in 0-RTT early data: it attaches once the
    /// handshake is complete (a replayed connection never completes it).
    AfterHandshake(SessionMode),
    /// Waiting for the driver to attach it.
    Attaching(SessionMode),
    /// The device's delivery session.
    Attached { window: Window, stage: Stage },
}

/// How far a delivery session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Sending the backlog from the store; `Synced` after it. `sent` counts what it sent.
    Backlog { sent: u64 },
    /// A paged session's backlog, sent a page per `Fetch`: up to position `last`, `remaining`
    /// messages still to fetch.
    Paged {
        sent: u64,
        last: u64,
        remaining: u64,
    },
    /// After `Synced`: taking live deliveries, or reading the inbox again (`catching_up`)
    /// after the live queue overflowed or after the last page.
    Online { catching_up: bool },
}

/// A delivery sent and not yet acknowledged.
#[derive(Debug)]
struct Outstanding {
    message: Arc<Message>,
    /// Transmissions so far.
    transmissions: u32,
    /// When it is sent again.
    deadline: Instant,
}

/// The deliveries of a delivery session: what was sent, what waits for acknowledgement.
#[derive(Debug)]
struct Window {
    /// Everything up to here is acknowledged (the stored cursor, at first).
    cursor: u64,
    /// The highest position sent.
    last_sent: u64,
    /// Sent and not acknowledged, by position.
    outstanding: BTreeMap<u64, Outstanding>,
    /// The earliest deadline of `outstanding`, when known.
    next_deadline: Option<Option<Instant>>,
}

impl Window {
    fn new(cursor: u64) -> Self {
        Self {
            cursor,
            last_sent: cursor,
            outstanding: BTreeMap::new(),
            next_deadline: Some(None),
        }
    }

    fn room(&self, max_in_flight: usize) -> usize {
        max_in_flight.saturating_sub(self.outstanding.len())
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        *self
            .next_deadline
            .get_or_insert_with(|| self.outstanding.values().map(|o| o.deadline).min())
    }

    fn sent(&mut self, seq: u64, message: Arc<Message>, deadline: Instant) {
        self.last_sent = seq;
        self.outstanding.insert(
            seq,
            Outstanding {
                message,
                transmissions: 1,
                deadline,
            },
        );
        if let Some(next) = &mut self.next_deadline {
            *next = Some(next.map_or(deadline, |n| n.min(deadline)));
        }
    }

    /// The acknowledgement of every delivery up to `seq`: the messages acknowledged, and the
    /// new cursor if it moved. An acknowledgement of nothing sent is ignored.
    fn ack(&mut self, seq: u64) -> (Vec<Arc<Message>>, Option<u64>) {
        if seq <= self.cursor || seq > self.last_sent {
            return (Vec::new(), None);
        }
        let rest = self.outstanding.split_off(&(seq + 1));
        let acked = std::mem::replace(&mut self.outstanding, rest);
        self.next_deadline = None;
        let cursor = match self.outstanding.keys().next() {
            Some(&oldest) => oldest - 1,
            None => self.last_sent,
        };
        let moved = (cursor > self.cursor).then(|| {
            self.cursor = cursor;
            cursor
        });
        (acked.into_values().map(|o| o.message).collect(), moved)
    }
}

/// A submission of the batch being accepted: stored, or refused before it was.
#[derive(Debug)]
enum Slot {
    Stored(RequestId, u64),
    Refused(RequestId, Refusal),
}

/// The outcome a session waits for before it handles the next frame.
#[derive(Debug)]
enum Waiting {
    /// [`HostSession::handle_answer`] for this request.
    Answer(RequestId),
    /// [`HostSession::handle_authenticated`]: who asked, and the mode of the session.
    Auth {
        req: RequestId,
        user: UserId,
        device: DeviceId,
        mode: SessionMode,
    },
    /// [`HostSession::handle_logged_out`].
    Logout(RequestId),
    /// [`HostSession::handle_accepted`], for these slots.
    Accept(Vec<Slot>),
    /// [`HostSession::handle_attached`].
    Attach,
    /// [`HostSession::handle_inbox`]: for the backlog or a catch-up, or for a page.
    Inbox(Option<PageRequest>),
}

/// A `Fetch` being answered.
#[derive(Debug, Clone, Copy)]
struct PageRequest {
    req: RequestId,
    want: usize,
}

/// Something to send, encoded when the driver takes it.
#[derive(Debug)]
enum Transmit {
    Frame(ServerFrame),
    Deliver(u64, Arc<Message>),
}

/// Deliveries a session sent since the driver last took its counts
/// ([`HostSession::take_counts`]): the figures of a host's metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryCounts {
    /// Deliveries written, first sendings and repeats.
    pub sent: u64,
    /// Of them, repeats: deliveries sent again for want of an acknowledgement.
    pub resent: u64,
}

/// The host's side of one client connection. See the [module documentation](self).
#[derive(Debug)]
pub struct HostSession {
    config: HostConfig,
    /// The session's own clock origin, for the rate limits.
    start: Instant,
    phase: Phase,
    /// Whether the TLS handshake is complete (nothing read from here on is early data).
    confirmed: bool,
    decoder: FrameDecoder,
    /// Frames handed in whole ([`HostSession::handle_frame`]), before the decoder's.
    frames: VecDeque<ClientFrame>,
    /// A submission over the session's rate, taken at the instant given.
    held: Option<(ClientFrame, Instant)>,
    waiting: Option<Waiting>,
    /// The submissions read together, not yet handed to the driver.
    batch: Vec<Slot>,
    batch_submissions: Vec<Submission>,
    submit_rate: TokenBucket,
    auth_rate: TokenBucket,
    /// The cursor moved by acknowledgements not yet saved.
    unsaved_cursor: Option<u64>,
    transmits: VecDeque<Transmit>,
    actions: VecDeque<Action>,
    end: Option<End>,
    counts: DeliveryCounts,
}

impl HostSession {
    /// The session of a connection that started at `now`. `early`: the TLS handshake is not
    /// complete yet, so what arrives may be 0-RTT early data
    /// ([`HostSession::handle_confirmed`] says when it is).
    pub fn new(now: Instant, config: HostConfig, early: bool) -> Self {
        let deadline = super::deadline(now, config.handshake_timeout);
        Self {
            start: now,
            phase: Phase::Handshake { deadline },
            confirmed: !early,
            decoder: FrameDecoder::new(config.max_frame),
            frames: VecDeque::new(),
            held: None,
            waiting: None,
            batch: Vec::new(),
            batch_submissions: Vec::new(),
            submit_rate: TokenBucket::new(config.submit_rate, config.submit_burst, 0),
            auth_rate: TokenBucket::new(config.auth_rate, config.auth_burst, 0),
            unsaved_cursor: None,
            transmits: VecDeque::new(),
            actions: VecDeque::new(),
            end: None,
            counts: DeliveryCounts::default(),
            config,
        }
    }

    // ---- what the driver asks ----

    /// The next frame to send, encoded.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        while let Some(transmit) = self.transmits.pop_front() {
            let encoded = match &transmit {
                Transmit::Frame(frame) => encode_frame(frame, self.config.max_frame),
                Transmit::Deliver(seq, message) => {
                    self.counts.sent += 1;
                    encode_deliver(*seq, message, self.config.max_frame)
                }
            };
            match encoded {
                Ok(bytes) => return Some(bytes),
                // Everything sent was checked against the limit when it was accepted; a frame
                // that does not fit is a host bug, and the session cannot go on without it.
                Err(e) => self.close(End::Error {
                    code: ErrorCode::INTERNAL,
                    reason: format!("answer not encodable: {e}"),
                }),
            }
        }
        None
    }

    /// The deliveries sent since the last call.
    pub fn take_counts(&mut self) -> DeliveryCounts {
        std::mem::take(&mut self.counts)
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`HostSession::handle_timeout`] must be called next.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let phase = match &mut self.phase {
            Phase::Handshake { deadline } => Some(*deadline),
            Phase::Unauthenticated { deadline } => match self.waiting {
                Some(Waiting::Auth { .. }) => None,
                _ => Some(*deadline),
            },
            Phase::Authenticated {
                delivery: Delivery::Attached { window, .. },
                ..
            } => window.next_deadline(),
            Phase::Authenticated { .. } | Phase::Closed => None,
        };
        let held = self.held.as_ref().map(|(_, at)| *at);
        [phase, held].into_iter().flatten().min()
    }

    /// Whether the driver should read more from the client: not while a submission waits for
    /// its turn or an outcome is awaited (the client's flow control then holds it back), nor
    /// once the session is over.
    pub fn wants_data(&self) -> bool {
        self.held.is_none() && self.waiting.is_none() && self.end.is_none()
    }

    /// Whether the driver may hand over a live delivery now ([`HostSession::handle_live`]):
    /// the backlog is done and the window has room.
    pub fn wants_live(&self) -> bool {
        match &self.phase {
            Phase::Authenticated {
                delivery:
                    Delivery::Attached {
                        window,
                        stage: Stage::Online { catching_up: false },
                    },
                ..
            } => window.room(self.config.max_in_flight) > 0 && self.end.is_none(),
            _ => false,
        }
    }

    /// Why the session ended, once it has: the driver sends what is left to transmit (for an
    /// error, the `Error` frame), carries out the last actions and closes the connection.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// Who the session acts as, once authenticated.
    pub fn identity(&self) -> Option<&Identity> {
        match &self.phase {
            Phase::Authenticated { who, .. } => Some(who),
            _ => None,
        }
    }

    // ---- inputs ----

    /// Bytes the client sent on the connection's stream.
    pub fn handle_data(&mut self, now: Instant, bytes: &[u8]) {
        self.handle_data_parts(now, &[bytes]);
    }

    /// Bytes the client sent, in the pieces they were read in (in order).
    pub fn handle_data_parts(&mut self, now: Instant, parts: &[impl AsRef<[u8]>]) {
        if self.end.is_some() {
            return;
        }
        for part in parts {
            self.decoder.push(part.as_ref());
        }
        self.process(now);
    }

    /// A whole frame the client sent (for a driver that decodes itself).
    pub fn handle_frame(&mut self, now: Instant, frame: ClientFrame) {
        if self.end.is_some() {
            return;
        }
        self.frames.push_back(frame);
        self.process(now);
    }

    /// The client finished its stream. In the middle of a frame, that frame is malformed.
    pub fn handle_finished(&mut self, now: Instant) {
        let _ = now;
        let partial = self.decoder.buffered();
        self.close(if partial > 0 {
            End::Error {
                code: ErrorCode::MALFORMED,
                reason: format!(
                    "the stream finished in the middle of a frame ({partial} bytes of it came)"
                ),
            }
        } else {
            End::Done
        });
    }

    /// The TLS handshake is complete: nothing read from now on is early data, and a delivery
    /// session authenticated early attaches.
    pub fn handle_confirmed(&mut self, now: Instant) {
        self.confirmed = true;
        if let Phase::Authenticated { who, delivery } = &mut self.phase
            && let Delivery::AfterHandshake(mode) = *delivery
        {
            *delivery = Delivery::Attaching(mode);
            self.waiting = Some(Waiting::Attach);
            self.actions.push_back(Action::Attach {
                who: who.clone(),
                mode,
            });
        }
        self.process(now);
    }

    /// Time passed: deadlines, the held submission's turn, retransmissions.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.end.is_some() {
            return;
        }
        match &mut self.phase {
            Phase::Handshake { deadline } if now >= *deadline => {
                return self.close(End::Error {
                    code: ErrorCode::HANDSHAKE,
                    reason: "no Hello in time".into(),
                });
            }
            Phase::Unauthenticated { deadline }
                if now >= *deadline && !matches!(self.waiting, Some(Waiting::Auth { .. })) =>
            {
                let secs = self.config.auth_timeout.as_secs();
                return self.close(End::Error {
                    code: ErrorCode::NOT_AUTHENTICATED,
                    reason: format!("not authenticated within {secs} s of connecting"),
                });
            }
            Phase::Authenticated {
                delivery: Delivery::Attached { window, .. },
                ..
            } => {
                let retry = &self.config.retry;
                match retransmit(window, retry, now, &mut self.transmits) {
                    Ok(resent) => self.counts.resent += resent,
                    Err(end) => return self.close(end),
                }
            }
            _ => {}
        }
        if self.held.as_ref().is_some_and(|(_, at)| now >= *at) {
            self.process(now);
        }
    }

    /// The host ends the session (the device's session was replaced, it logged out elsewhere,
    /// the host shuts down, a store failure) or the driver lost the connection.
    pub fn close(&mut self, end: End) {
        if self.end.is_some() {
            return;
        }
        self.flush_acks();
        if let End::Error { code, reason } = &end {
            self.transmits.push_back(Transmit::Frame(ServerFrame::error(
                None,
                *code,
                reason.clone(),
            )));
        }
        if let Phase::Authenticated { who, delivery } =
            std::mem::replace(&mut self.phase, Phase::Closed)
        {
            let online = match delivery {
                Delivery::Attached { stage, .. } => Some(matches!(stage, Stage::Online { .. })),
                // Attached already, perhaps, by a driver that had not answered yet.
                Delivery::Attaching(_) => Some(false),
                Delivery::None | Delivery::AfterHandshake(_) => None,
            };
            if let Some(online) = online {
                self.actions.push_back(Action::Detach { who, online });
            }
        }
        self.waiting = None;
        self.held = None;
        self.end = Some(end);
    }

    /// The outcome of [`Action::Register`], [`Action::Relation`] or [`Action::Account`].
    pub fn handle_answer(
        &mut self,
        now: Instant,
        req: RequestId,
        answer: Result<ServerFrame, Refusal>,
    ) {
        if !matches!(self.waiting, Some(Waiting::Answer(r)) if r == req) {
            return;
        }
        self.waiting = None;
        self.answer(req, answer);
        self.process(now);
    }

    /// The outcome of [`Action::Login`] or [`Action::Authenticate`].
    pub fn handle_authenticated(
        &mut self,
        now: Instant,
        req: RequestId,
        outcome: Result<Authenticated, Refusal>,
    ) {
        let Some(Waiting::Auth {
            req: waiting,
            user,
            device,
            mode,
        }) = self.waiting.take()
        else {
            return;
        };
        if waiting != req {
            return;
        }
        match outcome {
            Err(refusal) => self.refuse(req, refusal),
            Ok(Authenticated::Redirect { server, addr }) => {
                self.send(ServerFrame::Redirect { req, server, addr });
            }
            Ok(ok) => {
                self.send(match ok {
                    Authenticated::LoggedIn { token } => ServerFrame::LoggedIn { req, token },
                    _ => ServerFrame::Ok { req },
                });
                let who = Identity { user, device };
                let delivery = match mode {
                    SessionMode::SendOnly => Delivery::None,
                    mode if !self.confirmed => Delivery::AfterHandshake(mode),
                    mode => {
                        self.waiting = Some(Waiting::Attach);
                        self.actions.push_back(Action::Attach {
                            who: who.clone(),
                            mode,
                        });
                        Delivery::Attaching(mode)
                    }
                };
                self.phase = Phase::Authenticated { who, delivery };
            }
        }
        self.process(now);
    }

    /// The outcome of [`Action::Logout`] or of an account's deletion: on success the session
    /// ends.
    pub fn handle_logged_out(
        &mut self,
        now: Instant,
        req: RequestId,
        outcome: Result<(), Refusal>,
    ) {
        if !matches!(self.waiting, Some(Waiting::Logout(r)) if r == req) {
            return;
        }
        self.waiting = None;
        match outcome {
            Ok(()) => {
                self.send(ServerFrame::Ok { req });
                self.close(End::Done);
            }
            Err(refusal) => {
                self.refuse(req, refusal);
                self.process(now);
            }
        }
    }

    /// The outcomes of [`Action::Accept`], one per submission, in order: each is answered,
    /// in the order the client sent them, with the refusals made before they were stored.
    pub fn handle_accepted(&mut self, now: Instant, outcomes: Vec<Result<SubmitAnswer, Refusal>>) {
        let Some(Waiting::Accept(slots)) = self.waiting.take() else {
            return;
        };
        let mut outcomes = outcomes.into_iter();
        for slot in slots {
            match slot {
                Slot::Refused(req, refusal) => self.refuse(req, refusal),
                Slot::Stored(req, client_id) => match outcomes.next() {
                    Some(Ok(SubmitAnswer { id, sent_at })) => self.send(ServerFrame::Accepted {
                        req,
                        client_id,
                        id,
                        sent_at,
                    }),
                    Some(Err(refusal)) => self.refuse(req, refusal),
                    None => self.refuse(
                        req,
                        Refusal::new(ErrorCode::INTERNAL, "the message could not be stored"),
                    ),
                },
            }
        }
        self.process(now);
    }

    /// The outcome of [`Action::Attach`]: the device's cursor and, for a paged session, what
    /// waits after it. The backlog starts.
    pub fn handle_attached(&mut self, now: Instant, cursor: u64, summary: Option<InboxSummary>) {
        if !matches!(self.waiting, Some(Waiting::Attach)) {
            return;
        }
        self.waiting = None;
        let Phase::Authenticated { delivery, .. } = &mut self.phase else {
            return;
        };
        let Delivery::Attaching(mode) = *delivery else {
            return;
        };
        let stage = match (mode, summary) {
            (SessionMode::Paged, Some(summary)) => {
                let stage = if summary.count > 0 {
                    Stage::Paged {
                        sent: 0,
                        last: summary.last,
                        remaining: summary.count,
                    }
                } else {
                    // Nothing waiting: `Synced` follows at once, as in a receive session.
                    Stage::Backlog { sent: 0 }
                };
                self.transmits
                    .push_back(Transmit::Frame(ServerFrame::Backlog {
                        count: summary.count,
                        bytes: summary.bytes,
                        ids: summary.ids,
                    }));
                stage
            }
            _ => Stage::Backlog { sent: 0 },
        };
        *delivery = Delivery::Attached {
            window: Window::new(cursor),
            stage,
        };
        self.process(now);
    }

    /// The entries of [`Action::ReadInbox`], in position order.
    pub fn handle_inbox(&mut self, now: Instant, entries: Vec<(u64, Arc<Message>)>) {
        self.take_inbox(now, entries);
        self.process(now);
    }

    /// Sends the entries read: a page, a part of the backlog, or a catch-up.
    fn take_inbox(&mut self, now: Instant, entries: Vec<(u64, Arc<Message>)>) {
        let Some(Waiting::Inbox(page)) = self.waiting.take() else {
            return;
        };
        let retry_wait = self.config.retry.wait_after(1);
        let Phase::Authenticated {
            who,
            delivery: Delivery::Attached { window, stage },
        } = &mut self.phase
        else {
            return;
        };
        match (*stage, page) {
            (
                Stage::Paged {
                    sent,
                    last,
                    remaining,
                },
                Some(PageRequest { req, want }),
            ) => {
                let mut count = 0u32;
                for (seq, message) in entries {
                    if seq <= window.last_sent {
                        continue;
                    }
                    if seq > last {
                        break;
                    }
                    window.sent(seq, Arc::clone(&message), super::deadline(now, retry_wait));
                    self.transmits.push_back(Transmit::Deliver(seq, message));
                    count += 1;
                }
                let sent = sent + u64::from(count);
                // A short page with room to spare means the rest of the backlog is gone
                // (expired).
                let remaining = if (count as usize) < want {
                    0
                } else {
                    remaining.saturating_sub(u64::from(count))
                };
                let last_page = remaining == 0 || window.last_sent >= last;
                let remaining = if last_page { 0 } else { remaining };
                self.transmits.push_back(Transmit::Frame(ServerFrame::Page {
                    req,
                    count,
                    remaining,
                }));
                if last_page {
                    // What came in since the summary follows, read from the store, as in a
                    // receive session.
                    *stage = Stage::Online { catching_up: true };
                    self.transmits
                        .push_back(Transmit::Frame(ServerFrame::Synced { count: sent }));
                    self.actions.push_back(Action::Online { who: who.clone() });
                } else {
                    *stage = Stage::Paged {
                        sent,
                        last,
                        remaining,
                    };
                }
            }
            (Stage::Backlog { sent }, None) if entries.is_empty() => {
                // The backlog is out: the device is online from now on, after it (I3).
                *stage = Stage::Online { catching_up: false };
                self.transmits
                    .push_back(Transmit::Frame(ServerFrame::Synced { count: sent }));
                self.actions.push_back(Action::Online { who: who.clone() });
            }
            (Stage::Online { catching_up: true }, None) if entries.is_empty() => {
                *stage = Stage::Online { catching_up: false };
            }
            (Stage::Backlog { .. } | Stage::Online { catching_up: true }, None) => {
                let mut count = 0;
                for (seq, message) in entries {
                    if seq <= window.last_sent {
                        continue;
                    }
                    window.sent(seq, Arc::clone(&message), super::deadline(now, retry_wait));
                    self.transmits.push_back(Transmit::Deliver(seq, message));
                    count += 1;
                }
                if let Stage::Backlog { sent } = stage {
                    *sent += count;
                }
            }
            _ => {}
        }
    }

    /// An entry appended to the device's inbox while it is online, as the registry pushes it.
    /// Entries arrive in position order; one the backlog already sent is dropped.
    pub fn handle_live(&mut self, now: Instant, seq: u64, message: Arc<Message>) {
        let retry_wait = self.config.retry.wait_after(1);
        if let Phase::Authenticated {
            delivery:
                Delivery::Attached {
                    window,
                    stage: Stage::Online { catching_up: false },
                },
            ..
        } = &mut self.phase
            && seq > window.last_sent
        {
            window.sent(seq, Arc::clone(&message), super::deadline(now, retry_wait));
            self.transmits.push_back(Transmit::Deliver(seq, message));
        }
    }

    /// The live queue overflowed and the driver emptied it: everything in it is in the inbox,
    /// so the session reads the inbox again from what it sent last.
    pub fn handle_lag(&mut self, now: Instant) {
        if let Phase::Authenticated {
            delivery:
                Delivery::Attached {
                    stage: stage @ Stage::Online { .. },
                    ..
                },
            ..
        } = &mut self.phase
        {
            *stage = Stage::Online { catching_up: true };
        }
        self.process(now);
    }

    // ---- the frames ----

    /// Handles frames until one needs an outcome, a submission must wait for its turn, or none
    /// is left; then starts what the session does by itself (reading its backlog).
    fn process(&mut self, now: Instant) {
        while self.end.is_none() && self.waiting.is_none() {
            let frame = match self.next_frame(now) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(end) => return self.close(end),
            };
            if let Phase::Handshake { .. } = self.phase {
                self.hello(now, frame);
                continue;
            }
            match Submission::of(frame) {
                Ok(submission) => {
                    if let Some(wait) = self.submit_wait(now) {
                        // Over the session's rate: what came before is answered now, and
                        // nothing more is read until the rate allows this one. Nothing is
                        // refused, so the sender's order holds; QUIC's flow control holds
                        // back a sender that does not wait.
                        self.held = Some((submission.into_frame(), now + wait));
                        break;
                    }
                    self.take_submission(now, submission);
                }
                Err(frame) => {
                    self.start_accepting();
                    if self.waiting.is_some() {
                        // The submissions before it are answered first.
                        self.frames.push_front(frame);
                        break;
                    }
                    self.handle(now, frame);
                }
            }
        }
        if self.end.is_none() && self.waiting.is_none() {
            self.start_accepting();
        }
        if self.waiting.is_none() {
            self.flush_acks();
            self.read_backlog();
        }
    }

    /// The next frame: the held one once its turn came, then the queued ones, then the
    /// decoder's.
    fn next_frame(&mut self, now: Instant) -> Result<Option<ClientFrame>, End> {
        if let Some((frame, at)) = self.held.take() {
            if now < at {
                self.held = Some((frame, at));
                return Ok(None);
            }
            return Ok(Some(frame));
        }
        if let Some(frame) = self.frames.pop_front() {
            return Ok(Some(frame));
        }
        self.decoder
            .decode::<ClientFrame>()
            .map_err(|e| End::Error {
                code: match e {
                    CodecError::FrameTooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
                    CodecError::Malformed(_) | CodecError::Empty => ErrorCode::MALFORMED,
                },
                reason: e.to_string(),
            })
    }

    /// How long the next submission must wait for its turn, if it must. Only an authenticated
    /// session waits (an unauthenticated one is refused at once), and not where no wait would
    /// do (a rate of 0: refused).
    fn submit_wait(&self, now: Instant) -> Option<Duration> {
        self.identity()?;
        match self.submit_rate.wait_ms(self.ms(now)) {
            Some(0) | None => None,
            Some(ms) => Some(Duration::from_millis(ms)),
        }
    }

    /// Adds a submission to the batch read together: refused before it is stored if the
    /// session is not authenticated or over its rate.
    fn take_submission(&mut self, now: Instant, submission: Submission) {
        let req = submission.req;
        if self.identity().is_none() {
            return self.batch.push(Slot::Refused(req, not_authenticated()));
        }
        if !self.submit_rate.try_take(self.ms(now)) {
            return self.batch.push(Slot::Refused(
                req,
                Refusal::new(
                    ErrorCode::RATE_LIMITED,
                    "too many messages on this connection; slow down",
                ),
            ));
        }
        self.batch.push(Slot::Stored(req, submission.client_id));
        self.batch_submissions.push(submission);
    }

    /// Hands the batch of submissions read together to the driver (or answers it at once if
    /// every one was refused).
    fn start_accepting(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let slots = std::mem::take(&mut self.batch);
        let submissions = std::mem::take(&mut self.batch_submissions);
        match self.identity().cloned() {
            Some(who) if !submissions.is_empty() => {
                self.actions.push_back(Action::Accept { who, submissions });
                self.waiting = Some(Waiting::Accept(slots));
            }
            _ => {
                for slot in slots {
                    if let Slot::Refused(req, refusal) = slot {
                        self.refuse(req, refusal);
                    }
                }
            }
        }
    }

    /// Handles one frame that is not a submission.
    fn handle(&mut self, now: Instant, frame: ClientFrame) {
        if !frame.allowed_early() && !self.confirmed {
            return self.refuse(
                frame.req().unwrap_or(0),
                Refusal::new(
                    ErrorCode::TOO_EARLY,
                    "not taken in 0-RTT early data, which can be replayed; send it again once \
                     the handshake is complete",
                ),
            );
        }
        if let ClientFrame::Register { req, .. }
        | ClientFrame::Login { req, .. }
        | ClientFrame::Authenticate { req, .. } = &frame
            && !self.auth_rate.try_take(self.ms(now))
        {
            return self.refuse(
                *req,
                Refusal::new(
                    ErrorCode::RATE_LIMITED,
                    "too many log-in attempts on this connection; slow down",
                ),
            );
        }
        match frame {
            ClientFrame::Hello { .. } => self.close(End::Error {
                code: ErrorCode::HANDSHAKE,
                reason: "Hello sent twice".into(),
            }),
            ClientFrame::Register {
                req,
                user,
                password,
            } => {
                self.waiting = Some(Waiting::Answer(req));
                self.actions.push_back(Action::Register {
                    req,
                    user,
                    password,
                });
            }
            ClientFrame::Login {
                req,
                user,
                password,
                device,
                mode,
            } => {
                let action = Action::Login {
                    req,
                    user: user.clone(),
                    password,
                    device: device.clone(),
                };
                self.authenticate(req, user, device, mode, action);
            }
            ClientFrame::Authenticate {
                req,
                user,
                device,
                token,
                mode,
            } => {
                let action = Action::Authenticate {
                    req,
                    user: user.clone(),
                    device: device.clone(),
                    token,
                };
                self.authenticate(req, user, device, mode, action);
            }
            ClientFrame::Logout { req } => match self.identity().cloned() {
                Some(who) => {
                    self.flush_acks();
                    self.waiting = Some(Waiting::Logout(req));
                    self.actions.push_back(Action::Logout { req, who });
                }
                None => self.refuse(req, not_authenticated()),
            },
            ClientFrame::Relation { req, kind, op } => match self.identity() {
                Some(who) => {
                    let user = who.user.clone();
                    self.waiting = Some(Waiting::Answer(req));
                    self.actions.push_back(Action::Relation {
                        req,
                        user,
                        kind,
                        op,
                    });
                }
                None => self.refuse(req, not_authenticated()),
            },
            ClientFrame::Account { req, op } => match self.identity().cloned() {
                Some(who) => {
                    self.waiting = Some(match op {
                        AccountOp::Delete { .. } => {
                            self.flush_acks();
                            Waiting::Logout(req)
                        }
                        _ => Waiting::Answer(req),
                    });
                    self.actions.push_back(Action::Account { req, who, op });
                }
                None => self.refuse(req, not_authenticated()),
            },
            ClientFrame::Ack { seq } => self.ack(seq),
            ClientFrame::Fetch { req, max } => self.fetch(req, max),
            // Taken apart in `process`.
            ClientFrame::Submit { req, .. } | ClientFrame::SubmitExpiring { req, .. } => self
                .refuse(
                    req,
                    Refusal::new(ErrorCode::INTERNAL, "a submission out of its place"),
                ),
        }
    }

    /// A login or an authentication: refused on an authenticated connection, else handed to
    /// the driver (`action`), the session waiting for its outcome.
    fn authenticate(
        &mut self,
        req: RequestId,
        user: UserId,
        device: DeviceId,
        mode: SessionMode,
        action: Action,
    ) {
        if self.identity().is_some() {
            return self.refuse(req, already_authenticated());
        }
        self.waiting = Some(Waiting::Auth {
            req,
            user,
            device,
            mode,
        });
        self.actions.push_back(action);
    }

    /// The first frame: `Hello`, answered with `Welcome`.
    fn hello(&mut self, now: Instant, frame: ClientFrame) {
        let ClientFrame::Hello { version, .. } = frame else {
            return self.close(End::Error {
                code: ErrorCode::HANDSHAKE,
                reason: "the first frame must be Hello".into(),
            });
        };
        if !crate::SUPPORTED_VERSIONS.contains(&version) {
            return self.close(End::Error {
                code: ErrorCode::UNSUPPORTED_VERSION,
                reason: format!(
                    "protocol version {version} is not supported; this host speaks {:?}",
                    crate::SUPPORTED_VERSIONS
                ),
            });
        }
        self.send(ServerFrame::Welcome {
            version,
            max_frame: self.config.max_frame,
            max_body: self.config.max_body,
            server: self.config.server.clone(),
        });
        self.phase = Phase::Unauthenticated {
            deadline: super::deadline(now, self.config.auth_timeout),
        };
    }

    /// The device has every delivery up to `seq`. The plugins hear of the deliveries at once,
    /// before anything the client sent after the acknowledgement (a read report, say); the
    /// cursor is saved once for the acknowledgements read together.
    fn ack(&mut self, seq: u64) {
        let Phase::Authenticated {
            who,
            delivery: Delivery::Attached { window, .. },
        } = &mut self.phase
        else {
            // A connection without deliveries: nothing to acknowledge.
            return;
        };
        let (acked, cursor) = window.ack(seq);
        if !acked.is_empty() {
            self.actions.push_back(Action::Delivered {
                who: who.clone(),
                messages: acked,
            });
        }
        if cursor.is_some() {
            self.unsaved_cursor = cursor;
        }
    }

    /// Saves the cursor the acknowledgements read together moved.
    fn flush_acks(&mut self) {
        let Some(cursor) = self.unsaved_cursor.take() else {
            return;
        };
        if let Some(who) = self.identity().cloned() {
            self.actions.push_back(Action::SaveCursor { who, cursor });
        }
    }

    /// A paged session asks for its next page.
    fn fetch(&mut self, req: RequestId, max: u32) {
        let max_in_flight = self.config.max_in_flight;
        let Phase::Authenticated {
            who,
            delivery:
                Delivery::Attached {
                    window,
                    stage: Stage::Paged { .. },
                },
        } = &self.phase
        else {
            return self.refuse(
                req,
                Refusal::new(
                    ErrorCode::INVALID_ARGUMENT,
                    "nothing to fetch: only a session opened in Paged mode fetches its \
                     backlog, and only until Synced",
                ),
            );
        };
        if max == 0 {
            return self.refuse(
                req,
                Refusal::new(ErrorCode::INVALID_ARGUMENT, "fetch at least 1 message"),
            );
        }
        let want = (max as usize).min(window.room(max_in_flight));
        let (user, after) = (who.user.clone(), window.last_sent);
        self.waiting = Some(Waiting::Inbox(Some(PageRequest { req, want })));
        if want == 0 {
            // The window is full: an empty page, without reading the store.
            return self.take_inbox(self.start, Vec::new());
        }
        self.actions.push_back(Action::ReadInbox {
            user,
            after,
            max: want,
        });
    }

    /// Starts the next read of the backlog from the store, if the session is sending one and
    /// the window has room.
    fn read_backlog(&mut self) {
        if self.end.is_some() {
            return;
        }
        let max_in_flight = self.config.max_in_flight;
        let sync_batch = self.config.sync_batch.max(1);
        let Phase::Authenticated {
            who,
            delivery:
                Delivery::Attached {
                    window,
                    stage: Stage::Backlog { .. } | Stage::Online { catching_up: true },
                },
        } = &self.phase
        else {
            return;
        };
        let room = window.room(max_in_flight);
        if room == 0 {
            return;
        }
        self.actions.push_back(Action::ReadInbox {
            user: who.user.clone(),
            after: window.last_sent,
            max: room.min(sync_batch),
        });
        self.waiting = Some(Waiting::Inbox(None));
    }

    // ---- helpers ----

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_millis() as u64
    }

    fn send(&mut self, frame: ServerFrame) {
        self.transmits.push_back(Transmit::Frame(frame));
    }

    fn refuse(&mut self, req: RequestId, refusal: Refusal) {
        self.send(ServerFrame::error(Some(req), refusal.code, refusal.message));
    }

    fn answer(&mut self, req: RequestId, answer: Result<ServerFrame, Refusal>) {
        match answer {
            Ok(frame) => self.send(frame),
            Err(refusal) => self.refuse(req, refusal),
        }
    }
}

impl Submission {
    /// The frame it came in.
    fn into_frame(self) -> ClientFrame {
        match self.ttl_secs {
            None => ClientFrame::Submit {
                req: self.req,
                client_id: self.client_id,
                kind: self.kind,
                to: self.to,
                body: self.body,
            },
            Some(ttl_secs) => ClientFrame::SubmitExpiring {
                req: self.req,
                client_id: self.client_id,
                kind: self.kind,
                to: self.to,
                body: self.body,
                ttl_secs,
            },
        }
    }
}

/// Sends again what is due, or gives the device up once a delivery used its retry budget
/// (I4): what it did not acknowledge stays in the inbox for its next session. Returns how
/// many it sends again.
fn retransmit(
    window: &mut Window,
    policy: &RetryPolicy,
    now: Instant,
    transmits: &mut VecDeque<Transmit>,
) -> Result<u64, End> {
    if window.next_deadline().is_none_or(|at| at > now) {
        return Ok(0);
    }
    let mut resent = 0;
    for (seq, o) in window.outstanding.iter_mut() {
        if o.deadline > now {
            continue;
        }
        if o.transmissions >= policy.budget {
            return Err(End::Error {
                code: ErrorCode::TOO_SLOW,
                reason: format!(
                    "delivery {seq} sent {} times over {} ms and never acknowledged; what was \
                     not acknowledged stays in the inbox",
                    policy.budget,
                    policy.give_up_after().as_millis()
                ),
            });
        }
        o.transmissions += 1;
        o.deadline = super::deadline(now, policy.wait_after(o.transmissions));
        transmits.push_back(Transmit::Deliver(*seq, Arc::clone(&o.message)));
        resent += 1;
    }
    window.next_deadline = None;
    Ok(resent)
}

fn not_authenticated() -> Refusal {
    Refusal::new(ErrorCode::NOT_AUTHENTICATED, "log in or authenticate first")
}

fn already_authenticated() -> Refusal {
    Refusal::new(
        ErrorCode::ALREADY_AUTHENTICATED,
        "this connection is already authenticated",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::FrameDecoder;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> HostConfig {
        HostConfig {
            server: "h1".into(),
            max_frame: crate::DEFAULT_MAX_FRAME,
            max_body: crate::DEFAULT_MAX_BODY,
            handshake_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(60),
            max_in_flight: 4,
            sync_batch: 2,
            retry: RetryPolicy {
                initial: 100 * MS,
                max: 400 * MS,
                budget: 3,
            },
            submit_rate: 10,
            submit_burst: 2,
            auth_rate: 100,
            auth_burst: 100,
        }
    }

    fn user(name: &str) -> UserId {
        UserId::new(name).expect("valid")
    }

    fn device() -> DeviceId {
        DeviceId::new("phone").expect("valid")
    }

    /// What the session sent, decoded.
    fn sent(s: &mut HostSession) -> Vec<ServerFrame> {
        let mut decoder = FrameDecoder::new(1 << 20);
        while let Some(bytes) = s.poll_transmit() {
            decoder.push(&bytes);
        }
        std::iter::from_fn(|| decoder.decode().expect("valid")).collect()
    }

    fn actions(s: &mut HostSession) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn hello() -> ClientFrame {
        ClientFrame::Hello {
            version: crate::PROTOCOL_VERSION,
            agent: "test".into(),
        }
    }

    fn authenticate(req: RequestId, mode: SessionMode) -> ClientFrame {
        ClientFrame::Authenticate {
            req,
            user: user("bob"),
            device: device(),
            token: "t".into(),
            mode,
        }
    }

    fn chat(req: RequestId) -> ClientFrame {
        ClientFrame::Submit {
            req,
            client_id: req,
            kind: MessageKind::Chat,
            to: vec![user("alice").into()],
            body: b"hi".to_vec(),
        }
    }

    fn message(id: u64) -> Arc<Message> {
        Arc::new(Message {
            id: MessageId(id),
            kind: MessageKind::Chat,
            from: user("alice"),
            from_device: device(),
            to: vec![user("bob").into()],
            body: b"hi".to_vec(),
            sent_at: 0,
        })
    }

    /// A session authenticated as bob's phone in `mode`, its handshake complete.
    fn authenticated(now: Instant, mode: SessionMode) -> HostSession {
        let mut s = HostSession::new(now, config(), false);
        s.handle_frame(now, hello());
        s.handle_frame(now, authenticate(1, mode));
        assert!(matches!(
            actions(&mut s).as_slice(),
            [Action::Authenticate { .. }]
        ));
        s.handle_authenticated(now, 1, Ok(Authenticated::TokenAccepted));
        let _ = sent(&mut s);
        s
    }

    #[test]
    fn the_first_frame_must_be_hello_and_only_once() {
        let now = Instant::now();
        let mut s = HostSession::new(now, config(), false);
        s.handle_frame(now, chat(1));
        assert!(matches!(s.end(), Some(End::Error { code, .. }) if *code == ErrorCode::HANDSHAKE));
        let mut s = HostSession::new(now, config(), false);
        s.handle_frame(now, hello());
        s.handle_frame(now, hello());
        assert!(matches!(
            sent(&mut s).as_slice(),
            [ServerFrame::Welcome { .. }, ServerFrame::Error { req: None, code, .. }]
                if *code == ErrorCode::HANDSHAKE
        ));
        // No Hello in time.
        let mut s = HostSession::new(now, config(), false);
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(10)));
        s.handle_timeout(now + Duration::from_secs(10));
        assert!(s.end().is_some());
    }

    #[test]
    fn early_data_takes_only_what_is_safe_to_replay_and_attaches_once_confirmed() {
        let now = Instant::now();
        let mut s = HostSession::new(now, config(), true);
        s.handle_frame(now, hello());
        s.handle_frame(
            now,
            ClientFrame::Login {
                req: 1,
                user: user("bob"),
                password: "pw".into(),
                device: device(),
                mode: SessionMode::Receive,
            },
        );
        let frames = sent(&mut s);
        assert!(matches!(
            frames.last(),
            Some(ServerFrame::Error { req: Some(1), code, .. }) if *code == ErrorCode::TOO_EARLY
        ));
        s.handle_frame(now, authenticate(2, SessionMode::Receive));
        assert!(matches!(
            actions(&mut s).as_slice(),
            [Action::Authenticate { .. }]
        ));
        s.handle_authenticated(now, 2, Ok(Authenticated::TokenAccepted));
        // Authenticated, but not the device's delivery session before the handshake is over.
        assert!(actions(&mut s).is_empty());
        s.handle_confirmed(now);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [Action::Attach { .. }]
        ));
    }

    #[test]
    fn submissions_read_together_are_accepted_together_and_past_the_rate_wait_their_turn() {
        let now = Instant::now();
        let mut s = authenticated(now, SessionMode::SendOnly);
        // A burst of 2, then 10 per second: the third waits 100 ms, and nothing is read
        // meanwhile.
        let mut bytes = Vec::new();
        for req in 10..13 {
            bytes.extend(crate::encode_frame(&chat(req), 1024).expect("encode"));
        }
        s.handle_data(now, &bytes);
        let Some(Action::Accept { submissions, .. }) = s.poll_action() else {
            panic!("the first two are accepted together");
        };
        assert_eq!(submissions.len(), 2);
        let answer = |id| {
            Ok(SubmitAnswer {
                id: MessageId(id),
                sent_at: 0,
            })
        };
        s.handle_accepted(now, vec![answer(1), answer(2)]);
        assert!(!s.wants_data(), "the third waits for its turn");
        assert_eq!(s.poll_timeout(), Some(now + 100 * MS));
        s.handle_timeout(now + 100 * MS);
        let Some(Action::Accept { submissions, .. }) = s.poll_action() else {
            panic!("the third is accepted in its turn");
        };
        assert_eq!(submissions[0].req, 12);
        s.handle_accepted(now + 100 * MS, vec![answer(3)]);
        let reqs: Vec<RequestId> = sent(&mut s)
            .into_iter()
            .map(|f| match f {
                ServerFrame::Accepted { req, .. } => req,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(reqs, [10, 11, 12], "answered in the order sent");
    }

    #[test]
    fn a_backlog_is_read_in_batches_within_the_window_and_synced_before_anything_live() {
        let now = Instant::now();
        let mut s = authenticated(now, SessionMode::Receive);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [Action::Attach { .. }]
        ));
        s.handle_attached(now, 10, None);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [Action::ReadInbox {
                after: 10,
                max: 2,
                ..
            }]
        ));
        assert!(!s.wants_live(), "nothing live before the backlog");
        s.handle_inbox(now, vec![(11, message(1)), (12, message(2))]);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [Action::ReadInbox {
                after: 12,
                max: 2,
                ..
            }]
        ));
        s.handle_inbox(now, vec![(13, message(3))]);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [Action::ReadInbox {
                after: 13,
                max: 1,
                ..
            }]
        ));
        s.handle_inbox(now, Vec::new());
        assert!(matches!(
            actions(&mut s).as_slice(),
            [Action::Online { .. }]
        ));
        let frames = sent(&mut s);
        assert!(matches!(
            frames.last(),
            Some(ServerFrame::Synced { count: 3 })
        ));
        // Live now: a copy of what the backlog sent is dropped.
        s.handle_live(now, 13, message(3));
        s.handle_live(now, 14, message(4));
        let seqs: Vec<u64> = sent(&mut s)
            .into_iter()
            .filter_map(|f| match f {
                ServerFrame::Deliver { seq, .. } => Some(seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [14]);
        assert!(!s.wants_live(), "the window of 4 is full");
        // One acknowledgement moves the cursor and frees the window.
        s.handle_frame(now, ClientFrame::Ack { seq: 14 });
        let acts = actions(&mut s);
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::SaveCursor { cursor: 14, .. }))
        );
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::Delivered { messages, .. } if messages.len() == 4))
        );
        assert!(s.wants_live());
    }

    #[test]
    fn an_unacknowledged_delivery_is_sent_again_then_the_device_is_given_up() {
        let now = Instant::now();
        let mut s = authenticated(now, SessionMode::Receive);
        let _ = actions(&mut s);
        s.handle_attached(now, 0, None);
        let _ = actions(&mut s);
        s.handle_inbox(now, vec![(1, message(1))]);
        let _ = actions(&mut s);
        s.handle_inbox(now, Vec::new());
        let _ = (actions(&mut s), sent(&mut s));
        let first = DeliveryCounts { sent: 1, resent: 0 };
        assert_eq!(s.take_counts(), first);
        // 100 ms, then 200 ms more: sent three times; at the third deadline, given up.
        s.handle_timeout(now + 100 * MS);
        assert_eq!(sent(&mut s).len(), 1);
        s.handle_timeout(now + 300 * MS);
        assert_eq!(sent(&mut s).len(), 1);
        let repeats = DeliveryCounts { sent: 2, resent: 2 };
        assert_eq!(s.take_counts(), repeats);
        s.handle_timeout(now + 700 * MS);
        assert!(matches!(s.end(), Some(End::Error { code, .. }) if *code == ErrorCode::TOO_SLOW));
        assert!(matches!(
            actions(&mut s).as_slice(),
            [Action::Detach { online: true, .. }]
        ));
    }

    #[test]
    fn a_paged_backlog_goes_out_a_page_per_fetch() {
        let now = Instant::now();
        let mut s = authenticated(now, SessionMode::Paged);
        let _ = actions(&mut s);
        let summary = InboxSummary {
            count: 3,
            bytes: 6,
            ids: vec![MessageId(1), MessageId(2), MessageId(3)],
            last: 3,
        };
        s.handle_attached(now, 0, Some(summary));
        assert!(actions(&mut s).is_empty(), "nothing pushed before a fetch");
        assert!(matches!(
            sent(&mut s).as_slice(),
            [ServerFrame::Backlog { count: 3, .. }]
        ));
        s.handle_frame(now, ClientFrame::Fetch { req: 5, max: 0 });
        assert!(matches!(
            sent(&mut s).as_slice(),
            [ServerFrame::Error { req: Some(5), code, .. }] if *code == ErrorCode::INVALID_ARGUMENT
        ));
        s.handle_frame(now, ClientFrame::Fetch { req: 6, max: 2 });
        assert!(matches!(
            actions(&mut s).as_slice(),
            [Action::ReadInbox {
                after: 0,
                max: 2,
                ..
            }]
        ));
        s.handle_inbox(now, vec![(1, message(1)), (2, message(2))]);
        assert!(matches!(
            sent(&mut s).last(),
            Some(ServerFrame::Page {
                req: 6,
                count: 2,
                remaining: 1
            })
        ));
        s.handle_frame(now, ClientFrame::Fetch { req: 7, max: 2 });
        let _ = actions(&mut s);
        s.handle_inbox(now, vec![(3, message(3)), (4, message(4))]);
        let frames = sent(&mut s);
        assert!(
            matches!(
                frames.as_slice(),
                [
                    ServerFrame::Deliver { seq: 3, .. },
                    ServerFrame::Page {
                        req: 7,
                        count: 1,
                        remaining: 0
                    },
                    ServerFrame::Synced { count: 3 }
                ]
            ),
            "the entry after the summary waits for Synced: {frames:?}"
        );
    }

    #[test]
    fn a_stream_finished_mid_frame_is_malformed_and_between_frames_is_done() {
        let now = Instant::now();
        let mut s = HostSession::new(now, config(), false);
        let hello = crate::encode_frame(&hello(), 1024).expect("encode");
        s.handle_data(now, &hello);
        s.handle_data(now, &[0, 0, 0, 9, 1]);
        s.handle_finished(now);
        assert!(matches!(s.end(), Some(End::Error { code, .. }) if *code == ErrorCode::MALFORMED));
        let mut s = HostSession::new(now, config(), false);
        s.handle_data(now, &hello);
        s.handle_finished(now);
        assert_eq!(s.end(), Some(&End::Done));
    }
}
