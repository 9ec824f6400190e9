//! A device's side of its connections to its host.
//!
//! A [`ClientSession`] lives as long as the device does, across the connections it makes one
//! after another ([`ClientSession::connect`] starts one, [`ClientSession::disconnected`] ends
//! it). It numbers requests and pairs them with their answers, keeps the submissions the host
//! has not accepted in an ordered outbox (written again, in order and with the same client
//! ids, once a new connection is authenticated), and passes deliveries through one [`Filter`]
//! that hands each message to the application once. [`Backoff`] is the wait between attempts
//! to connect again.

use super::Refusal;
use crate::codec::{FrameDecoder, encode_frame};
use crate::frame::{
    AccountOp, ClientFrame, ErrorCode, Message, MessageId, MessageKind, RelationKind, RelationOp,
    RequestId, ServerFrame, SessionMode,
};
use crate::name::{Address, DeviceId, UserId};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How a client session behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Names the client software in the host's log (`Hello`).
    pub agent: String,
    /// How long a request may wait for its answer.
    pub request_timeout: Duration,
    /// Whether submissions outlive a connection: a device that reconnects keeps them and
    /// writes them again once the next connection is authenticated. Otherwise a submission
    /// is dropped with the connection it was made on, and with its timeout.
    pub keep_outbox: bool,
}

/// A request the application makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Create an account.
    Register {
        /// The new user.
        user: UserId,
        /// The password.
        password: String,
    },
    /// Log in with a password.
    Login {
        /// The user.
        user: UserId,
        /// The password.
        password: String,
        /// The device.
        device: DeviceId,
        /// Whether the connection takes the device's deliveries.
        mode: SessionMode,
    },
    /// Authenticate with a device's token.
    Authenticate {
        /// The user.
        user: UserId,
        /// The device.
        device: DeviceId,
        /// The token.
        token: String,
        /// Whether the connection takes the device's deliveries.
        mode: SessionMode,
    },
    /// Revoke the device's token.
    Logout,
    /// Change or read a relation list.
    Relation {
        /// Which list.
        kind: RelationKind,
        /// What to do.
        op: RelationOp,
    },
    /// The next page of a paged session's backlog.
    Fetch {
        /// Most messages.
        max: u32,
    },
    /// Change, list, revoke or delete what the account holds.
    Account(AccountOp),
}

impl Request {
    fn frame(self, req: RequestId) -> ClientFrame {
        match self {
            Request::Register { user, password } => ClientFrame::Register {
                req,
                user,
                password,
            },
            Request::Login {
                user,
                password,
                device,
                mode,
            } => ClientFrame::Login {
                req,
                user,
                password,
                device,
                mode,
            },
            Request::Authenticate {
                user,
                device,
                token,
                mode,
            } => ClientFrame::Authenticate {
                req,
                user,
                device,
                token,
                mode,
            },
            Request::Logout => ClientFrame::Logout { req },
            Request::Relation { kind, op } => ClientFrame::Relation { req, kind, op },
            Request::Fetch { max } => ClientFrame::Fetch { req, max },
            Request::Account(op) => ClientFrame::Account { req, op },
        }
    }

    fn authenticates(&self) -> bool {
        matches!(self, Request::Login { .. } | Request::Authenticate { .. })
    }
}

/// A submission: a message the application hands the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Its idempotency id: the host accepts a `(user, device, client id)` once.
    pub client_id: u64,
    /// What it is.
    pub kind: MessageKind,
    /// The recipients: users, or one group.
    pub to: Vec<Address>,
    /// The payload.
    pub body: Vec<u8>,
    /// Seconds it may wait for its recipients, if not the host's default.
    pub ttl_secs: Option<u32>,
}

impl Outgoing {
    fn frame(&self, req: RequestId) -> ClientFrame {
        match self.ttl_secs {
            None => ClientFrame::Submit {
                req,
                client_id: self.client_id,
                kind: self.kind.clone(),
                to: self.to.clone(),
                body: self.body.clone(),
            },
            Some(ttl_secs) => ClientFrame::SubmitExpiring {
                req,
                client_id: self.client_id,
                kind: self.kind.clone(),
                to: self.to.clone(),
                body: self.body.clone(),
                ttl_secs,
            },
        }
    }
}

/// What happened, for the driver and the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The host answered `Hello`: the connection is open.
    Welcomed {
        /// The host's server id.
        server: String,
        /// Largest frame the host accepts.
        max_frame: u32,
        /// Largest message body the host accepts.
        max_body: u32,
    },
    /// The answer to request `req`: its frame, or the host's refusal.
    Answer {
        /// The request.
        req: RequestId,
        /// The answer.
        answer: Result<ServerFrame, Refusal>,
    },
    /// Request `req` got no answer within the request timeout; a late answer is dropped.
    TimedOut {
        /// The request.
        req: RequestId,
    },
    /// The host's answer to submission `key` ([`ClientSession::submit`]): `ServerFrame::Accepted`
    /// (the *sent* receipt), or its refusal.
    Submitted {
        /// The submission.
        key: u64,
        /// The answer.
        answer: Result<ServerFrame, Refusal>,
    },
    /// Submission `key` got no answer in time on this connection. A session that keeps its
    /// outbox still has it (the connection is of no use: the driver should make a new one).
    SubmissionTimedOut {
        /// The submission.
        key: u64,
    },
    /// A message for the application, handed over once; acknowledge it with
    /// [`ClientSession::ack`].
    Message {
        /// Its inbox position.
        seq: u64,
        /// The message.
        message: Message,
    },
    /// The backlog has been delivered.
    Synced {
        /// How many messages it held.
        count: u64,
    },
    /// A paged session's backlog summary.
    Backlog {
        /// How many messages.
        count: u64,
        /// The sum of their body sizes.
        bytes: u64,
        /// Their ids, oldest first.
        ids: Vec<MessageId>,
    },
    /// The host ended the connection, saying why (an `Error` frame without a request).
    ClosedByHost {
        /// The code.
        code: ErrorCode,
        /// The reason.
        message: String,
    },
    /// The host sent what this client cannot understand: the connection is of no use.
    ProtocolError(String),
}

/// What a delivery is to the application ([`Filter::on_delivery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New: hand it to the application.
    Show,
    /// Handed over before: drop it, and acknowledge it at once if `ack` (its acknowledgement
    /// was lost with an earlier connection, or nothing before it waits for the application).
    Repeat {
        /// Whether to acknowledge it now.
        ack: bool,
    },
}

/// How many of the last message ids handed over the filter remembers.
pub const RECENT_IDS: usize = 4096;

/// The one filter between the host's deliveries and the application: each message is handed
/// over once, whatever the host sends again.
///
/// The host sends a device's inbox positions in increasing order, and sends one again when it
/// was not acknowledged in time or after a reconnect (from the device's cursor): a position not
/// above the highest one handed over is a repeat. A message handed over before that comes at a
/// new position (the host lost its first inbox entry in a crash and appended it again) is a
/// repeat too, recognised by its id among the last [`RECENT_IDS`]; acknowledging it would
/// acknowledge the positions before it, so that waits until the application acknowledged what
/// it was handed before.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// The highest inbox position handed to the application (or skipped as a repeat).
    shown: Option<u64>,
    /// The highest position the application acknowledged, counting the repeats skipped before
    /// it as acknowledged.
    acked: Option<u64>,
    /// The ids of the last [`RECENT_IDS`] messages handed over, oldest first.
    recent: VecDeque<MessageId>,
    recent_set: HashSet<MessageId>,
    /// Positions of repeats recognised by id, each with the position the application must
    /// have acknowledged before the repeat is acknowledged for it. Both only grow.
    skipped: VecDeque<(u64, u64)>,
}

impl Filter {
    /// What to do with the delivery of message `id` at position `seq`.
    pub fn on_delivery(&mut self, seq: u64, id: MessageId) -> Verdict {
        if self.shown.is_some_and(|shown| seq <= shown) {
            return Verdict::Repeat {
                ack: self.acked.is_some_and(|acked| seq <= acked),
            };
        }
        if self.recent_set.contains(&id) {
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

    /// The application acknowledged `seq`: the skipped repeats to acknowledge now.
    pub fn on_ack(&mut self, seq: u64) -> Vec<u64> {
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

/// The wait between attempts to connect: `first`, doubling after each failed attempt up to
/// `max`. One policy for everything that reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Waits of `first`, then twice as long each time, up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max: max.max(first),
            next: first,
        }
    }

    /// The wait before the next attempt; the one after is twice as long (up to the maximum).
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = wait.saturating_mul(2).min(self.max);
        wait
    }

    /// The wait the next attempt would get, without counting it.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// A connection worked: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// What a request on the connection waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// An application's request.
    Request { authenticates: bool },
    /// Submission `key` of the outbox.
    Submission(u64),
}

/// One connection's state.
#[derive(Debug)]
struct Connection {
    decoder: FrameDecoder,
    /// Largest frame the host takes (its Welcome's, the protocol's default until then).
    max_frame: u32,
    welcomed: bool,
    /// A login or authentication on it succeeded.
    authenticated: bool,
    next_req: RequestId,
    /// Requests waiting for their answer, with their deadline.
    pending: BTreeMap<RequestId, (Waiting, Instant)>,
}

/// A device's side of its connections. See the [module documentation](self).
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    connection: Option<Connection>,
    filter: Filter,
    /// Submissions not yet answered, in the order they were made, with the request id they
    /// were last written with on the current connection.
    outbox: BTreeMap<u64, (Outgoing, Option<RequestId>)>,
    next_key: u64,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<ClientEvent>,
}

/// The request id of the first request of a connection: `docs/protocol.md` has a client that
/// resumes send `Hello` and its `Authenticate` (this id) in 0-RTT early data.
pub const FIRST_REQ: RequestId = 1;

impl ClientSession {
    /// A session not yet connected.
    pub fn new(config: ClientConfig) -> Self {
        Self {
            config,
            connection: None,
            filter: Filter::default(),
            outbox: BTreeMap::new(),
            next_key: 1,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// A session whose filter was kept from an earlier run of the device (an application that
    /// persists what it handed over, and this filter with it, restarts where it was).
    pub fn with_filter(config: ClientConfig, filter: Filter) -> Self {
        Self {
            filter,
            ..Self::new(config)
        }
    }

    /// The filter of repeats: what the application was handed and acknowledged.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// A new connection starts: `Hello` is the first frame on it. What was not answered on the
    /// last one is forgotten, but the outbox (if it is kept), written again once the new
    /// connection is authenticated.
    pub fn connect(&mut self, now: Instant) {
        let _ = now;
        self.disconnected();
        self.connection = Some(Connection {
            decoder: FrameDecoder::new(crate::DEFAULT_MAX_FRAME),
            max_frame: crate::DEFAULT_MAX_FRAME,
            welcomed: false,
            authenticated: false,
            next_req: FIRST_REQ,
            pending: BTreeMap::new(),
        });
        self.transmit(ClientFrame::Hello {
            version: crate::PROTOCOL_VERSION,
            agent: self.config.agent.clone(),
        });
    }

    /// The connection is over (lost, closed, or given up by the driver). Its requests are
    /// forgotten: the driver fails what waits for them. The outbox is kept if the session
    /// keeps it, and dropped otherwise.
    pub fn disconnected(&mut self) {
        self.connection = None;
        self.transmits.clear();
        if self.config.keep_outbox {
            for (_, req) in self.outbox.values_mut() {
                *req = None;
            }
        } else {
            self.outbox.clear();
        }
    }

    /// Whether a connection is open (started and not over).
    pub fn is_connected(&self) -> bool {
        self.connection.is_some()
    }

    /// Makes a request on the current connection: its id, for the answer
    /// ([`ClientEvent::Answer`]). `None` without a connection.
    pub fn request(&mut self, now: Instant, request: Request) -> Option<RequestId> {
        let deadline = now + self.config.request_timeout;
        let connection = self.connection.as_mut()?;
        let req = connection.next_req;
        connection.next_req += 1;
        let waiting = Waiting::Request {
            authenticates: request.authenticates(),
        };
        connection.pending.insert(req, (waiting, deadline));
        self.transmit(request.frame(req));
        Some(req)
    }

    /// Adds a submission to the outbox and returns its key (for [`ClientEvent::Submitted`]).
    /// It is written at once if the connection may take it — it is authenticated, or the
    /// session does not keep its outbox (the host then answers whatever it must) — and
    /// otherwise once a connection is authenticated.
    pub fn submit(&mut self, now: Instant, outgoing: Outgoing) -> u64 {
        let key = self.next_key;
        self.next_key += 1;
        self.outbox.insert(key, (outgoing, None));
        let ready = self
            .connection
            .as_ref()
            .is_some_and(|c| c.authenticated || !self.config.keep_outbox);
        if ready {
            self.write_submission(now, key);
        }
        key
    }

    /// Forgets submission `key` (its caller gave up on it). Once written, the host may still
    /// accept it.
    pub fn cancel(&mut self, key: u64) {
        self.outbox.remove(&key);
    }

    /// Submissions not yet answered.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// The application has every message up to position `seq`: acknowledged to the host (with
    /// the repeats skipped before it that this makes due).
    pub fn ack(&mut self, seq: u64) {
        let due = self.filter.on_ack(seq);
        if self.connection.is_some() {
            for seq in std::iter::once(seq).chain(due) {
                self.transmit(ClientFrame::Ack { seq });
            }
        }
    }

    /// Bytes the host sent on the connection's stream.
    pub fn handle_data(&mut self, now: Instant, bytes: &[u8]) {
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        connection.decoder.push(bytes);
        loop {
            let Some(connection) = self.connection.as_mut() else {
                return;
            };
            match connection.decoder.decode::<ServerFrame>() {
                Ok(Some(frame)) => self.handle_frame(now, frame),
                Ok(None) => return,
                Err(e) => {
                    self.events
                        .push_back(ClientEvent::ProtocolError(e.to_string()));
                    return self.disconnected();
                }
            }
        }
    }

    /// Requests and submissions whose answer is overdue.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        let due: Vec<RequestId> = connection
            .pending
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(req, _)| *req)
            .collect();
        for req in due {
            let Some((waiting, _)) = connection.pending.remove(&req) else {
                continue;
            };
            self.events.push_back(match waiting {
                Waiting::Request { .. } => ClientEvent::TimedOut { req },
                Waiting::Submission(key) => {
                    if !self.config.keep_outbox {
                        self.outbox.remove(&key);
                    }
                    ClientEvent::SubmissionTimedOut { key }
                }
            });
        }
    }

    /// The next frame to write, encoded.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When [`ClientSession::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.connection
            .as_ref()?
            .pending
            .values()
            .map(|(_, deadline)| *deadline)
            .min()
    }

    fn transmit(&mut self, frame: ClientFrame) {
        let max = self
            .connection
            .as_ref()
            .map_or(crate::DEFAULT_MAX_FRAME, |c| c.max_frame);
        match encode_frame(&frame, max) {
            Ok(bytes) => self.transmits.push_back(bytes),
            // Refused here rather than by the host: a frame over its limit would end the
            // connection. The request's answer is this refusal.
            Err(e) => {
                let refusal = Refusal::new(ErrorCode::FRAME_TOO_LARGE, e.to_string());
                let Some(req) = frame.req() else { return };
                let waiting = self
                    .connection
                    .as_mut()
                    .and_then(|c| c.pending.remove(&req));
                self.events.push_back(match waiting {
                    Some((Waiting::Submission(key), _)) => {
                        self.outbox.remove(&key);
                        ClientEvent::Submitted {
                            key,
                            answer: Err(refusal),
                        }
                    }
                    _ => ClientEvent::Answer {
                        req,
                        answer: Err(refusal),
                    },
                });
            }
        }
    }

    /// Writes outbox entry `key` on the current connection.
    fn write_submission(&mut self, now: Instant, key: u64) {
        let deadline = now + self.config.request_timeout;
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        let Some((outgoing, written)) = self.outbox.get_mut(&key) else {
            return;
        };
        let req = connection.next_req;
        connection.next_req += 1;
        *written = Some(req);
        connection
            .pending
            .insert(req, (Waiting::Submission(key), deadline));
        let frame = outgoing.frame(req);
        self.transmit(frame);
    }

    fn handle_frame(&mut self, now: Instant, frame: ServerFrame) {
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        let (req, answer) = match frame {
            ServerFrame::Welcome {
                max_frame,
                max_body,
                server,
                ..
            } => {
                if connection.welcomed {
                    self.events
                        .push_back(ClientEvent::ProtocolError("Welcome sent twice".into()));
                    return self.disconnected();
                }
                connection.welcomed = true;
                connection.max_frame = max_frame;
                connection.decoder.set_max(max_frame);
                self.events.push_back(ClientEvent::Welcomed {
                    server,
                    max_frame,
                    max_body,
                });
                return;
            }
            ServerFrame::Deliver { seq, message } => {
                match self.filter.on_delivery(seq, message.id) {
                    Verdict::Show => self.events.push_back(ClientEvent::Message { seq, message }),
                    Verdict::Repeat { ack: true } => self.transmit(ClientFrame::Ack { seq }),
                    Verdict::Repeat { ack: false } => {}
                }
                return;
            }
            ServerFrame::Synced { count } => {
                return self.events.push_back(ClientEvent::Synced { count });
            }
            ServerFrame::Backlog { count, bytes, ids } => {
                return self
                    .events
                    .push_back(ClientEvent::Backlog { count, bytes, ids });
            }
            ServerFrame::Error {
                req: None,
                code,
                message,
            } => {
                self.events
                    .push_back(ClientEvent::ClosedByHost { code, message });
                return self.disconnected();
            }
            ServerFrame::Error {
                req: Some(req),
                code,
                message,
            } => (req, Err(Refusal::new(code, message))),
            ServerFrame::Ok { req }
            | ServerFrame::LoggedIn { req, .. }
            | ServerFrame::Users { req, .. }
            | ServerFrame::Accepted { req, .. }
            | ServerFrame::Page { req, .. }
            | ServerFrame::Redirect { req, .. }
            | ServerFrame::Devices { req, .. } => (req, Ok(frame)),
        };
        // An answer to nothing (its request timed out) is dropped.
        let Some((waiting, _)) = connection.pending.remove(&req) else {
            return;
        };
        match waiting {
            Waiting::Request { authenticates } => {
                let now_authenticated = authenticates
                    && matches!(
                        answer,
                        Ok(ServerFrame::Ok { .. } | ServerFrame::LoggedIn { .. })
                    );
                self.events.push_back(ClientEvent::Answer { req, answer });
                if now_authenticated {
                    connection.authenticated = true;
                    self.write_outbox(now);
                }
            }
            Waiting::Submission(key) => {
                // Something the host needs is out of reach for now: a device that keeps its
                // outbox writes it again on its next connection.
                let transient = matches!(&answer, Err(r) if r.code == ErrorCode::UNAVAILABLE);
                if transient && self.config.keep_outbox {
                    return;
                }
                self.outbox.remove(&key);
                self.events
                    .push_back(ClientEvent::Submitted { key, answer });
            }
        }
    }

    /// Writes, in order, what the outbox holds and the current connection has not been given.
    fn write_outbox(&mut self, now: Instant) {
        let keys: Vec<u64> = self
            .outbox
            .iter()
            .filter(|(_, (_, written))| written.is_none())
            .map(|(key, _)| *key)
            .collect();
        for key in keys {
            self.write_submission(now, key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_that_comes_again_at_a_new_position_is_not_handed_over_twice() {
        let mut h = Filter::default();
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
    fn only_the_last_ids_are_remembered() {
        let mut h = Filter::default();
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

    #[test]
    fn waits_double_up_to_the_maximum_and_start_again_after_a_success() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(500), ms(2000));
        let waits: Vec<_> = (0..4).map(|_| backoff.next_wait()).collect();
        assert_eq!(waits, [ms(500), ms(1000), ms(2000), ms(2000)]);
        backoff.reset();
        assert_eq!(backoff.peek(), ms(500));
    }

    fn session(keep_outbox: bool) -> (ClientSession, Instant) {
        let config = ClientConfig {
            agent: "test".into(),
            request_timeout: Duration::from_secs(5),
            keep_outbox,
        };
        (ClientSession::new(config), Instant::now())
    }

    fn frames(session: &mut ClientSession) -> Vec<ClientFrame> {
        let mut decoder = FrameDecoder::new(1 << 20);
        while let Some(bytes) = session.poll_transmit() {
            decoder.push(&bytes);
        }
        std::iter::from_fn(|| decoder.decode().expect("valid")).collect()
    }

    fn host_sends(session: &mut ClientSession, now: Instant, frame: ServerFrame) {
        let bytes = encode_frame(&frame, 1 << 20).expect("encode");
        session.handle_data(now, &bytes);
    }

    /// Authenticates the connection: the request's id.
    fn authenticate(s: &mut ClientSession, now: Instant) -> RequestId {
        s.request(
            now,
            Request::Authenticate {
                user: UserId::new("alice").expect("valid"),
                device: DeviceId::new("phone").expect("valid"),
                token: "t".into(),
                mode: SessionMode::Receive,
            },
        )
        .expect("connected")
    }

    fn chat(client_id: u64) -> Outgoing {
        Outgoing {
            client_id,
            kind: MessageKind::Chat,
            to: vec![UserId::new("bob").expect("valid").into()],
            body: b"hi".to_vec(),
            ttl_secs: None,
        }
    }

    #[test]
    fn a_device_writes_its_outbox_again_in_order_once_a_new_connection_is_authenticated() {
        let (mut s, now) = session(true);
        // Made before any connection: kept.
        let first = s.submit(now, chat(1));
        s.connect(now);
        let auth = authenticate(&mut s, now);
        assert_eq!(auth, FIRST_REQ);
        let second = s.submit(now, chat(2));
        // Nothing is submitted before the authentication is answered.
        assert!(matches!(
            frames(&mut s).as_slice(),
            [ClientFrame::Hello { .. }, ClientFrame::Authenticate { .. }]
        ));
        host_sends(&mut s, now, ServerFrame::Ok { req: auth });
        let written = frames(&mut s);
        let ids: Vec<u64> = written
            .iter()
            .map(|f| match f {
                ClientFrame::Submit { client_id, .. } => *client_id,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(ids, [1, 2]);
        // The connection is lost before the answers: both are written again, in order, on the
        // next one.
        s.connect(now);
        let auth = authenticate(&mut s, now);
        host_sends(&mut s, now, ServerFrame::Ok { req: auth });
        let written = frames(&mut s);
        assert_eq!(written.len(), 4, "{written:?}");
        let req_of = |client: u64| {
            written
                .iter()
                .find_map(|f| match f {
                    ClientFrame::Submit { req, client_id, .. } if *client_id == client => {
                        Some(*req)
                    }
                    _ => None,
                })
                .expect("written")
        };
        host_sends(
            &mut s,
            now,
            ServerFrame::Accepted {
                req: req_of(1),
                client_id: 1,
                id: MessageId(7),
                sent_at: 0,
            },
        );
        host_sends(
            &mut s,
            now,
            ServerFrame::error(Some(req_of(2)), ErrorCode::UNKNOWN_USER, "no bob"),
        );
        let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
        assert!(events.contains(&ClientEvent::Submitted {
            key: first,
            answer: Ok(ServerFrame::Accepted {
                req: req_of(1),
                client_id: 1,
                id: MessageId(7),
                sent_at: 0
            })
        }));
        assert!(events.iter().any(|e| matches!(e,
            ClientEvent::Submitted { key, answer: Err(r) } if *key == second && r.code == ErrorCode::UNKNOWN_USER)));
        assert_eq!(s.outbox_len(), 0);
    }

    #[test]
    fn a_connection_s_requests_time_out_and_late_answers_are_dropped() {
        let (mut s, now) = session(false);
        s.connect(now);
        let req = s
            .request(
                now,
                Request::Relation {
                    kind: RelationKind::Friend,
                    op: RelationOp::List,
                },
            )
            .expect("connected");
        let key = s.submit(now, chat(9));
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(5)));
        s.handle_timeout(now + Duration::from_secs(5));
        let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
        assert_eq!(
            events,
            [
                ClientEvent::TimedOut { req },
                ClientEvent::SubmissionTimedOut { key }
            ]
        );
        assert_eq!(
            s.outbox_len(),
            0,
            "a connection's submission goes with its timeout"
        );
        host_sends(&mut s, now, ServerFrame::Ok { req });
        assert_eq!(s.poll_event(), None);
    }

    #[test]
    fn deliveries_are_filtered_and_repeats_acknowledged_for_the_application() {
        let (mut s, now) = session(true);
        s.connect(now);
        let _ = frames(&mut s);
        let message = |id| Message {
            id: MessageId(id),
            kind: MessageKind::Chat,
            from: UserId::new("bob").expect("valid"),
            from_device: DeviceId::new("phone").expect("valid"),
            to: vec![UserId::new("alice").expect("valid").into()],
            body: Vec::new(),
            sent_at: 0,
        };
        host_sends(
            &mut s,
            now,
            ServerFrame::Deliver {
                seq: 4,
                message: message(40),
            },
        );
        host_sends(
            &mut s,
            now,
            ServerFrame::Deliver {
                seq: 4,
                message: message(40),
            },
        );
        assert!(matches!(
            s.poll_event(),
            Some(ClientEvent::Message { seq: 4, .. })
        ));
        assert_eq!(s.poll_event(), None, "the repeat is not handed over");
        assert!(
            frames(&mut s).is_empty(),
            "nor acknowledged before the application"
        );
        s.ack(4);
        assert_eq!(frames(&mut s), [ClientFrame::Ack { seq: 4 }]);
        // After a reconnect the host sends it again: acknowledged at once.
        s.connect(now);
        let _ = frames(&mut s);
        host_sends(
            &mut s,
            now,
            ServerFrame::Deliver {
                seq: 4,
                message: message(40),
            },
        );
        assert_eq!(frames(&mut s), [ClientFrame::Ack { seq: 4 }]);
        assert_eq!(s.poll_event(), None);
    }
}
