//! The real machines of `iim_proto` against each other over a simulated network, over
//! thousands of seeds: a `HostSession` for every connection a device makes, against the
//! devices' `ClientSession`s, and two `RelayLink` ends (quinn-proto's `Pair` tests, for iim).
//!
//! The drivers are written for the test: a host with an in-memory store that loses what it had
//! not flushed when it crashes (a random prefix of it survives, as sled recovers a prefix of
//! its log), a registry of delivery sessions, and devices whose applications keep what they
//! were handed. The network is what QUIC leaves visible to the application: each connection
//! is an ordered byte stream, cut at random points and delayed; a packet lost below it holds
//! the stream up until QUIC sends it again (a stall), packets duplicated or reordered below it
//! never show; a path that fails kills the connection, losing what was in flight both ways,
//! and each end learns of it after its own delay (the host much later: its idle timeout), so
//! a device's old session may live on beside its new one. Duplicates and reordering above
//! QUIC are the machines' own doing: deliveries sent again after their timer or a reconnect,
//! a backlog read racing live deliveries, an outbox written again after a reconnect.
//!
//! Faults (connection losses, host crashes, device restarts) come only during the first part
//! of a run; then every run must end with I1–I4 holding for what the applications got:
//! every message the sender submitted is accepted and reaches each of the recipient's devices
//! exactly once and in the order it was sent, offline ones before new ones (I3 shows as that
//! order), and a device that does not acknowledge is given up (`too_slow`) and still gets it
//! all once it does.

use iim_proto::relay::{Incoming, RelayLink};
use iim_proto::session::{
    Action, Authenticated, Backoff, ClientConfig, ClientEvent, ClientSession, End, HostConfig,
    HostSession, InboxSummary, Outgoing, Request, RetryPolicy, SubmitAnswer,
};
use iim_proto::{
    DeviceId, ErrorCode, Message, MessageId, MessageKind, ServerFrame, SessionMode, UserId,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MS: Duration = Duration::from_millis(1);

/// How far above the store's highest position a restarted host resumes an inbox (the host's
/// `iim::RESTART_GAP`).
const RESTART_GAP: u64 = 1 << 20;

/// splitmix64: small, seedable, and enough for fault injection.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        MS * self.between(lo, hi) as u32
    }
}

/// What goes wrong, and how often.
#[derive(Debug, Clone, Copy)]
struct Faults {
    /// Largest delay of a piece of a stream, in ms (a stream's pieces stay in order).
    jitter_ms: u64,
    /// Chance that a piece waits for a lost packet to be sent again (0.2 to 1.5 s).
    stall: f64,
    /// Mean time between connection losses, in ms (0: none).
    kill_every: u64,
    /// Mean time between host crashes, in ms (0: none).
    crash_every: u64,
    /// Mean time between restarts of a device's process, in ms (0: none).
    restart_every: u64,
}

/// Something on a connection's stream.
#[derive(Debug)]
enum Item {
    Data(Vec<u8>),
    /// The sender closed the connection after what came before.
    Closed,
}

/// One direction of a connection: pieces in arrival order.
#[derive(Debug, Default)]
struct Pipe {
    items: VecDeque<(Instant, Item)>,
    last: Option<Instant>,
}

impl Pipe {
    fn send(&mut self, now: Instant, rng: &mut Rng, faults: &Faults, bytes: Vec<u8>) {
        // Cut at random points: the reader reassembles frames from whatever comes.
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let take = (rng.between(1, 3 * rest.len() as u64 / 2) as usize).min(rest.len());
            let (piece, tail) = rest.split_at(take);
            self.push(now, rng, faults, Item::Data(piece.to_vec()));
            rest = tail;
        }
    }

    fn push(&mut self, now: Instant, rng: &mut Rng, faults: &Faults, item: Item) {
        let mut at = now + rng.ms(1, faults.jitter_ms.max(1));
        if rng.chance(faults.stall) {
            at += rng.ms(200, 1500);
        }
        let at = self.last.map_or(at, |last| last.max(at));
        self.last = Some(at);
        self.items.push_back((at, item));
    }

    fn next_at(&self) -> Option<Instant> {
        self.items.front().map(|(at, _)| *at)
    }

    fn take(&mut self, now: Instant) -> Option<Item> {
        if self.next_at()? <= now {
            return self.items.pop_front().map(|(_, item)| item);
        }
        None
    }
}

/// A connection between a device and the host.
struct Conn {
    device: usize,
    to_host: Pipe,
    to_device: Pipe,
    /// The path failed: nothing more gets through.
    dead: bool,
    /// When the host notices the loss (its idle timeout).
    host_notices: Option<Instant>,
    /// When the TLS handshake completes, for a connection that began with 0-RTT early data.
    confirms: Option<Instant>,
}

// ---- the host ----

/// A write to the store, in the order it was made.
#[derive(Debug, Clone)]
enum Op {
    Dedup(DeviceId, u64, MessageId),
    Dispatch(MessageId, Arc<Message>),
    Dispatched(MessageId),
    Append(UserId, u64, Arc<Message>),
    Cursor(UserId, DeviceId, u64),
    NextId(u64),
}

/// The durable state, as records.
#[derive(Debug, Clone, Default)]
struct Records {
    dedup: HashMap<(DeviceId, u64), MessageId>,
    dispatch: BTreeMap<MessageId, Arc<Message>>,
    inbox: HashMap<UserId, BTreeMap<u64, Arc<Message>>>,
    cursors: HashMap<(UserId, DeviceId), u64>,
    next_id: u64,
}

impl Records {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Dedup(device, client_id, id) => {
                self.dedup.insert((device.clone(), *client_id), *id);
            }
            Op::Dispatch(id, message) => {
                self.dispatch.insert(*id, Arc::clone(message));
            }
            Op::Dispatched(id) => {
                self.dispatch.remove(id);
            }
            Op::Append(user, seq, message) => {
                self.inbox
                    .entry(user.clone())
                    .or_default()
                    .insert(*seq, Arc::clone(message));
            }
            Op::Cursor(user, device, seq) => {
                let cursor = self
                    .cursors
                    .entry((user.clone(), device.clone()))
                    .or_default();
                *cursor = (*cursor).max(*seq);
            }
            Op::NextId(id) => self.next_id = self.next_id.max(*id),
        }
    }

    fn high(&self, user: &UserId) -> u64 {
        let last = self
            .inbox
            .get(user)
            .and_then(|inbox| inbox.keys().next_back().copied())
            .unwrap_or(0);
        let cursors = self
            .cursors
            .iter()
            .filter(|((u, _), _)| u == user)
            .map(|(_, c)| *c)
            .max()
            .unwrap_or(0);
        last.max(cursors)
    }

    fn has(&self, user: &UserId, id: MessageId) -> bool {
        self.inbox
            .get(user)
            .is_some_and(|inbox| inbox.values().any(|m| m.id == id))
    }
}

/// The store: what is durable, and the writes since the last flush.
#[derive(Default)]
struct Store {
    durable: Records,
    current: Records,
    unflushed: Vec<Op>,
}

impl Store {
    fn write(&mut self, op: Op) {
        self.current.apply(&op);
        self.unflushed.push(op);
    }

    fn flush(&mut self) {
        for op in self.unflushed.drain(..) {
            self.durable.apply(&op);
        }
    }

    /// A crash: the durable records and a prefix of the writes after them.
    fn crash(&mut self, rng: &mut Rng) {
        let keep = rng.between(0, self.unflushed.len() as u64) as usize;
        self.unflushed.truncate(keep);
        self.flush();
        self.current = self.durable.clone();
    }
}

/// A delivery session's place in the registry, and its live queue.
struct Attached {
    user: UserId,
    queue: VecDeque<(u64, Arc<Message>)>,
    lagged: bool,
}

/// What the host keeps per connection.
struct Side {
    machine: HostSession,
    attached: Option<Attached>,
    /// The session ended and its connection was closed.
    over: bool,
}

struct Host {
    config: HostConfig,
    store: Store,
    sessions: BTreeMap<u32, Side>,
    /// The delivery session of each device.
    registry: HashMap<(UserId, DeviceId), u32>,
    /// The last position of each inbox since the host started.
    heads: HashMap<UserId, u64>,
    up: bool,
    next_flush: Instant,
}

/// Live deliveries a session queues before it lags (and reads the inbox again).
const LIVE_QUEUE: usize = 6;

impl Host {
    fn new(now: Instant) -> Self {
        Self {
            config: HostConfig {
                server: "h1".into(),
                max_frame: iim_proto::DEFAULT_MAX_FRAME,
                max_body: iim_proto::DEFAULT_MAX_BODY,
                handshake_timeout: Duration::from_secs(10),
                auth_timeout: Duration::from_secs(60),
                max_in_flight: 8,
                sync_batch: 3,
                retry: RetryPolicy {
                    initial: MS * 300,
                    max: MS * 1200,
                    budget: 4,
                },
                submit_rate: 40,
                submit_burst: 4,
                auth_rate: 100,
                auth_burst: 100,
            },
            store: Store::default(),
            sessions: BTreeMap::new(),
            registry: HashMap::new(),
            heads: HashMap::new(),
            up: true,
            next_flush: now + MS * 500,
        }
    }

    /// Appends `message` to `user`'s inbox (once) and hands it to the user's delivery
    /// sessions.
    fn append(&mut self, user: &UserId, message: &Arc<Message>) {
        if self.store.current.has(user, message.id) {
            return;
        }
        let head = match self.heads.get(user) {
            Some(&head) => head,
            None => self.store.current.high(user) + RESTART_GAP,
        };
        let seq = head + 1;
        self.heads.insert(user.clone(), seq);
        self.store
            .write(Op::Append(user.clone(), seq, Arc::clone(message)));
        for (_, side) in self.sessions.iter_mut() {
            if let Some(a) = side.attached.as_mut()
                && &a.user == user
                && !side.over
            {
                if a.queue.len() < LIVE_QUEUE {
                    a.queue.push_back((seq, Arc::clone(message)));
                } else {
                    a.lagged = true;
                }
            }
        }
    }

    /// Hands a stored message to its recipients (the chat plugin's part), then lets go of its
    /// dispatch record.
    fn dispatch(&mut self, message: &Arc<Message>) {
        for user in message.to.iter().filter_map(|to| to.user()) {
            self.append(user, message);
        }
        self.store.write(Op::Dispatched(message.id));
    }

    fn crash(&mut self, rng: &mut Rng) {
        self.store.crash(rng);
        self.sessions.clear();
        self.registry.clear();
        self.heads.clear();
        self.up = false;
    }

    /// The host starts again: what was accepted and not dispatched is dispatched.
    fn restart(&mut self, now: Instant) {
        self.up = true;
        self.next_flush = now + MS * 500;
        let pending: Vec<Arc<Message>> = self.store.current.dispatch.values().cloned().collect();
        for message in pending {
            self.dispatch(&message);
        }
    }

    /// Carries out what session `conn`'s machine asks.
    fn act(&mut self, now: Instant, conn: u32) {
        loop {
            let Some(side) = self.sessions.get_mut(&conn) else {
                return;
            };
            let Some(action) = side.machine.poll_action() else {
                return;
            };
            match action {
                Action::Authenticate {
                    req, user, device, ..
                } => {
                    assert_eq!(user.as_str(), device_user(&device), "a device of its user");
                    side.machine
                        .handle_authenticated(now, req, Ok(Authenticated::TokenAccepted));
                }
                Action::Accept { who, submissions } => {
                    let mut outcomes = Vec::new();
                    let mut new = Vec::new();
                    for s in submissions {
                        let key = (who.device.clone(), s.client_id);
                        let id = match self.store.current.dedup.get(&key) {
                            Some(&id) => id,
                            None => {
                                let id = MessageId(self.store.current.next_id + 1);
                                self.store.write(Op::NextId(id.0));
                                let message = Arc::new(Message {
                                    id,
                                    kind: s.kind,
                                    from: who.user.clone(),
                                    from_device: who.device.clone(),
                                    to: s.to,
                                    body: s.body,
                                    sent_at: 0,
                                });
                                self.store.write(Op::Dispatch(id, Arc::clone(&message)));
                                self.store.write(Op::Dedup(key.0, key.1, id));
                                new.push(message);
                                id
                            }
                        };
                        outcomes.push(Ok(SubmitAnswer { id, sent_at: 0 }));
                    }
                    // Durable before it is answered (I1).
                    self.store.flush();
                    if let Some(side) = self.sessions.get_mut(&conn) {
                        side.machine.handle_accepted(now, outcomes);
                    }
                    for message in new {
                        self.dispatch(&message);
                    }
                }
                Action::Attach { who, mode } => {
                    let key = (who.user.clone(), who.device.clone());
                    if let Some(old) = self.registry.insert(key.clone(), conn)
                        && old != conn
                        && let Some(old) = self.sessions.get_mut(&old)
                    {
                        old.machine.close(End::Error {
                            code: ErrorCode::SESSION_REPLACED,
                            reason: "replaced".into(),
                        });
                    }
                    let cursor = self.store.current.cursors.get(&key).copied().unwrap_or(0);
                    let summary = (mode == SessionMode::Paged).then(|| {
                        let after: Vec<(u64, MessageId)> = self
                            .store
                            .current
                            .inbox
                            .get(&who.user)
                            .map(|inbox| {
                                inbox
                                    .range(cursor + 1..)
                                    .map(|(seq, m)| (*seq, m.id))
                                    .collect()
                            })
                            .unwrap_or_default();
                        InboxSummary {
                            count: after.len() as u64,
                            bytes: 0,
                            ids: after.iter().map(|(_, id)| *id).collect(),
                            last: after.last().map_or(0, |(seq, _)| *seq),
                        }
                    });
                    let side = self.sessions.get_mut(&conn).expect("acting");
                    side.attached = Some(Attached {
                        user: who.user,
                        queue: VecDeque::new(),
                        lagged: false,
                    });
                    side.machine.handle_attached(now, cursor, summary);
                }
                Action::ReadInbox { user, after, max } => {
                    let entries: Vec<(u64, Arc<Message>)> = self
                        .store
                        .current
                        .inbox
                        .get(&user)
                        .map(|inbox| {
                            inbox
                                .range(after + 1..)
                                .take(max)
                                .map(|(seq, m)| (*seq, Arc::clone(m)))
                                .collect()
                        })
                        .unwrap_or_default();
                    side.machine.handle_inbox(now, entries);
                }
                Action::SaveCursor { who, cursor } => {
                    self.store.write(Op::Cursor(who.user, who.device, cursor));
                }
                Action::Detach { who, .. } => {
                    let key = (who.user, who.device);
                    if self.registry.get(&key) == Some(&conn) {
                        self.registry.remove(&key);
                    }
                    side.attached = None;
                }
                Action::Delivered { .. } | Action::Online { .. } => {}
                other => panic!("the devices never ask for {other:?}"),
            }
        }
    }
}

fn device_user(device: &DeviceId) -> &'static str {
    if device.as_str().starts_with("alice") {
        "alice"
    } else {
        "bob"
    }
}

// ---- the devices ----

/// What a device's application does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Submits the messages to bob, in order.
    Sender,
    /// Takes deliveries and acknowledges each after up to `ack_ms`; acknowledges nothing
    /// before `acks_from` (a device that stopped acknowledging).
    Receiver {
        mode: SessionMode,
        ack_ms: u64,
        acks_from: Duration,
    },
}

struct Device {
    name: DeviceId,
    user: UserId,
    role: Role,
    session: ClientSession,
    conn: Option<u32>,
    /// The request id of the authentication on the current connection, until it is answered.
    authenticating: Option<u64>,
    connect_at: Option<Instant>,
    backoff: Backoff,
    // The sender's application, kept across restarts: what it means to send, and the ids the
    // host gave what it accepted.
    to_send: Vec<u64>,
    next_send: usize,
    send_at: Instant,
    submitted: HashMap<u64, u64>,
    accepted: BTreeMap<u64, MessageId>,
    // A receiver's application, kept across restarts: what it was handed, in order.
    log: Vec<(u64, Message)>,
    /// Acknowledgements the application will make, in time order.
    acks: VecDeque<(Instant, u64)>,
    start: Instant,
    /// How the host ended its connections.
    closes: Vec<ErrorCode>,
}

fn device_config() -> ClientConfig {
    ClientConfig {
        agent: "pair".into(),
        request_timeout: Duration::from_secs(5),
        keep_outbox: true,
    }
}

impl Device {
    fn new(now: Instant, name: &str, role: Role, messages: u64) -> Self {
        let name = DeviceId::new(name).expect("valid");
        Self {
            user: UserId::new(device_user(&name)).expect("valid"),
            name,
            role,
            session: ClientSession::new(device_config()),
            conn: None,
            authenticating: None,
            connect_at: Some(now),
            backoff: Backoff::new(MS * 100, Duration::from_secs(2)),
            to_send: if role == Role::Sender {
                (1..=messages).collect()
            } else {
                Vec::new()
            },
            next_send: 0,
            send_at: now,
            submitted: HashMap::new(),
            accepted: BTreeMap::new(),
            log: Vec::new(),
            acks: VecDeque::new(),
            start: now,
            closes: Vec::new(),
        }
    }

    fn mode(&self) -> SessionMode {
        match self.role {
            Role::Sender => SessionMode::SendOnly,
            Role::Receiver { mode, .. } => mode,
        }
    }

    fn submit(&mut self, now: Instant, client_id: u64) {
        let key = self.session.submit(
            now,
            Outgoing {
                client_id,
                kind: MessageKind::Chat,
                to: vec![UserId::new("bob").expect("valid").into()],
                body: client_id.to_be_bytes().to_vec(),
                ttl_secs: None,
            },
        );
        self.submitted.insert(key, client_id);
    }

    /// The connection is over: connect again after a growing wait.
    fn lost(&mut self, now: Instant) {
        self.session.disconnected();
        self.conn = None;
        self.authenticating = None;
        self.connect_at = Some(now + self.backoff.next_wait());
    }

    /// The device's process restarts: the session machine is new; the application kept what
    /// it was handed and the filter with it, or what it means to send.
    fn restart(&mut self, now: Instant) {
        self.session = ClientSession::with_filter(device_config(), self.session.filter().clone());
        self.submitted.clear();
        self.acks.clear();
        self.lost(now);
        if self.role == Role::Sender {
            for i in 0..self.next_send {
                let client_id = self.to_send[i];
                if !self.accepted.contains_key(&client_id) {
                    self.submit(now, client_id);
                }
            }
        }
        // What it has, it acknowledges again: its acknowledgements died with it.
        if let Some(&(seq, _)) = self.log.last() {
            let at = self.ack_time(now, 0);
            self.acks.push_back((at, seq));
        }
    }

    /// When an acknowledgement decided at `now` is made.
    fn ack_time(&self, now: Instant, delay_ms: u64) -> Instant {
        match self.role {
            Role::Receiver { acks_from, .. } => {
                (now + MS * delay_ms as u32).max(self.start + acks_from)
            }
            Role::Sender => now,
        }
    }

    /// Hands what the session says to the application.
    fn take_events(&mut self, now: Instant, rng: &mut Rng) -> DeviceOutcome {
        let mut outcome = DeviceOutcome::Fine;
        while let Some(event) = self.session.poll_event() {
            match event {
                ClientEvent::Welcomed { .. } | ClientEvent::Synced { .. } => {}
                ClientEvent::Answer { req, answer } => {
                    if self.authenticating == Some(req) {
                        assert_eq!(answer, Ok(ServerFrame::Ok { req }), "{}", self.name);
                        self.authenticating = None;
                        self.backoff.reset();
                    } else if let Ok(ServerFrame::Page { remaining, .. }) = answer {
                        if remaining > 0 {
                            self.session.request(now, Request::Fetch { max: 3 });
                        }
                    } else {
                        panic!("{}: unexpected answer {answer:?}", self.name);
                    }
                }
                ClientEvent::Backlog { count, .. } => {
                    if count > 0 {
                        self.session.request(now, Request::Fetch { max: 3 });
                    }
                }
                ClientEvent::Submitted { key, answer } => {
                    let client_id = self.submitted.remove(&key).expect("a submission of ours");
                    match answer {
                        Ok(ServerFrame::Accepted {
                            id, client_id: c, ..
                        }) => {
                            assert_eq!(c, client_id);
                            let first = *self.accepted.entry(client_id).or_insert(id);
                            assert_eq!(first, id, "a resubmission is the same message");
                        }
                        other => panic!("{}: submission {client_id} answered {other:?}", self.name),
                    }
                }
                ClientEvent::Message { seq, message } => {
                    let delay = match self.role {
                        Role::Receiver { ack_ms, .. } => rng.between(0, ack_ms),
                        Role::Sender => panic!("the sender receives nothing"),
                    };
                    self.log.push((seq, message));
                    let at = self.ack_time(now, delay);
                    self.acks.push_back((at, seq));
                }
                // No answer in time: the connection is of no use; a new one writes again what
                // was not answered.
                ClientEvent::TimedOut { .. } | ClientEvent::SubmissionTimedOut { .. } => {
                    outcome = DeviceOutcome::Drop;
                }
                ClientEvent::ClosedByHost { code, .. } => {
                    self.closes.push(code);
                    outcome = DeviceOutcome::Drop;
                }
                ClientEvent::ProtocolError(e) => panic!("{}: protocol error: {e}", self.name),
            }
        }
        outcome
    }
}

/// Whether a device goes on with its connection.
#[derive(Debug, PartialEq, Eq)]
enum DeviceOutcome {
    Fine,
    /// It gives the connection up.
    Drop,
}

// ---- the simulation ----

struct Sim {
    now: Instant,
    start: Instant,
    rng: Rng,
    faults: Faults,
    /// Faults stop here; then everything must settle.
    calm_from: Instant,
    host: Host,
    host_back_at: Option<Instant>,
    devices: Vec<Device>,
    conns: BTreeMap<u32, Conn>,
    next_conn: u32,
    next_kill: Option<Instant>,
    next_crash: Option<Instant>,
    next_restart: Option<Instant>,
}

impl Sim {
    fn new(seed: u64, faults: Faults, messages: u64) -> Self {
        let start = Instant::now();
        let mut rng = Rng(seed);
        let phone_ack = rng.between(0, 400);
        let devices = vec![
            Device::new(start, "alice-phone", Role::Sender, messages),
            Device::new(
                start,
                "bob-phone",
                Role::Receiver {
                    mode: SessionMode::Receive,
                    ack_ms: phone_ack,
                    acks_from: Duration::ZERO,
                },
                0,
            ),
            // Stops acknowledging for a while: given up, over and over, then back.
            Device::new(
                start,
                "bob-tablet",
                Role::Receiver {
                    mode: SessionMode::Receive,
                    ack_ms: 50,
                    acks_from: rng.ms(5_000, 20_000),
                },
                0,
            ),
            Device::new(
                start,
                "bob-laptop",
                Role::Receiver {
                    mode: SessionMode::Paged,
                    ack_ms: 100,
                    acks_from: Duration::ZERO,
                },
                0,
            ),
        ];
        let mut sim = Self {
            now: start,
            start,
            calm_from: start + Duration::from_secs(25),
            host: Host::new(start),
            host_back_at: None,
            devices,
            conns: BTreeMap::new(),
            next_conn: 1,
            next_kill: None,
            next_crash: None,
            next_restart: None,
            rng,
            faults,
        };
        sim.next_kill = sim.after(faults.kill_every);
        sim.next_crash = sim.after(faults.crash_every);
        sim.next_restart = sim.after(faults.restart_every);
        sim
    }

    /// A moment around `mean` ms from now, if faults of that kind happen at all.
    fn after(&mut self, mean: u64) -> Option<Instant> {
        (mean > 0).then(|| self.now + self.rng.ms(mean / 2, mean * 3 / 2))
    }

    fn done(&self) -> bool {
        let sender = &self.devices[0];
        sender.accepted.len() == sender.to_send.len()
            && self.devices[1..]
                .iter()
                .all(|d| d.log.len() == sender.to_send.len() && d.acks.is_empty())
    }

    /// Runs until everything settled (true) or `limit` passed.
    fn run(&mut self, limit: Duration) -> bool {
        let end = self.start + limit;
        while self.now < end {
            if self.now >= self.calm_from && self.done() {
                return true;
            }
            let Some(next) = self.next_event() else {
                return self.done();
            };
            self.now = next.max(self.now);
            self.step();
        }
        self.done()
    }

    fn next_event(&mut self) -> Option<Instant> {
        let mut times: Vec<Instant> = Vec::new();
        for conn in self.conns.values() {
            times.extend(conn.to_host.next_at());
            times.extend(conn.to_device.next_at());
            times.extend(conn.host_notices);
            times.extend(conn.confirms);
        }
        for side in self.host.sessions.values_mut() {
            times.extend(side.machine.poll_timeout());
        }
        if self.host.up {
            times.push(self.host.next_flush);
        }
        times.extend(self.host_back_at);
        for d in &self.devices {
            times.extend(d.session.poll_timeout());
            times.extend(d.connect_at);
            times.extend(d.acks.iter().map(|(at, _)| *at).min());
            if d.next_send < d.to_send.len() {
                times.push(d.send_at);
            }
        }
        if self.now < self.calm_from {
            times.extend(self.next_kill);
            times.extend(self.next_crash);
            times.extend(self.next_restart);
        }
        times.into_iter().min()
    }

    fn step(&mut self) {
        let now = self.now;
        self.faults_due();
        if self.host_back_at.is_some_and(|at| at <= now) {
            self.host_back_at = None;
            self.host.restart(now);
        }
        if self.host.up && self.host.next_flush <= now {
            self.host.store.flush();
            self.host.next_flush = now + MS * 500;
        }
        // What arrives.
        let ids: Vec<u32> = self.conns.keys().copied().collect();
        for id in ids {
            while let Some(item) = self.conn_mut(id).and_then(|c| c.to_host.take(now)) {
                self.arrive_at_host(id, item);
            }
            while let Some(item) = self.conn_mut(id).and_then(|c| c.to_device.take(now)) {
                self.arrive_at_device(id, item);
            }
            let conn = self.conns.get_mut(&id).expect("listed");
            if conn.confirms.is_some_and(|at| at <= now) {
                conn.confirms = None;
                if let Some(side) = self.host.sessions.get_mut(&id) {
                    side.machine.handle_confirmed(now);
                }
            }
            if conn.host_notices.is_some_and(|at| at <= now) {
                conn.host_notices = None;
                if let Some(side) = self.host.sessions.get_mut(&id) {
                    side.machine.close(End::Lost("idle timeout".into()));
                }
            }
        }
        // Time passing on the host.
        let sessions: Vec<u32> = self.host.sessions.keys().copied().collect();
        for id in &sessions {
            if let Some(side) = self.host.sessions.get_mut(id)
                && side.machine.poll_timeout().is_some_and(|at| at <= now)
            {
                side.machine.handle_timeout(now);
            }
        }
        self.settle_host();
        // The devices.
        for i in 0..self.devices.len() {
            self.device_step(i);
        }
        self.settle_host();
        self.forget_finished();
    }

    fn conn_mut(&mut self, id: u32) -> Option<&mut Conn> {
        self.conns.get_mut(&id)
    }

    fn faults_due(&mut self) {
        let now = self.now;
        if now >= self.calm_from {
            return;
        }
        if self.next_kill.is_some_and(|at| at <= now) {
            self.next_kill = self.after(self.faults.kill_every);
            let alive: Vec<u32> = self
                .conns
                .iter()
                .filter(|(_, c)| !c.dead)
                .map(|(id, _)| *id)
                .collect();
            if !alive.is_empty() {
                let id = alive[self.rng.between(0, alive.len() as u64 - 1) as usize];
                self.kill(id);
            }
        }
        if self.next_crash.is_some_and(|at| at <= now) {
            self.next_crash = self.after(self.faults.crash_every);
            if self.host.up {
                self.host.crash(&mut self.rng);
                self.host_back_at = Some(now + self.rng.ms(50, 2000));
                // The devices learn at once (a stateless reset, or the port unreachable).
                let ids: Vec<u32> = self.conns.keys().copied().collect();
                for id in ids {
                    self.kill(id);
                    if let Some(conn) = self.conns.get_mut(&id) {
                        conn.host_notices = None;
                    }
                }
            }
        }
        if self.next_restart.is_some_and(|at| at <= now) {
            self.next_restart = self.after(self.faults.restart_every);
            let i = self.rng.between(0, self.devices.len() as u64 - 1) as usize;
            if let Some(id) = self.devices[i].conn {
                self.kill(id);
            }
            self.devices[i].restart(now);
        }
    }

    /// The path of connection `id` fails: what was in flight is lost; the device notices
    /// soon, the host at its idle timeout.
    fn kill(&mut self, id: u32) {
        let now = self.now;
        let host_after = self.rng.ms(100, 30_000);
        let device_after = self.rng.ms(1, 3_000);
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.dead {
            return;
        }
        conn.dead = true;
        conn.to_host.items.clear();
        conn.to_device.items.clear();
        conn.host_notices = Some(now + host_after);
        conn.to_device.last = None;
        conn.to_device
            .items
            .push_back((now + device_after, Item::Closed));
    }

    fn arrive_at_host(&mut self, id: u32, item: Item) {
        let now = self.now;
        let Some(side) = self.host.sessions.get_mut(&id) else {
            return;
        };
        match item {
            Item::Data(bytes) => side.machine.handle_data(now, &bytes),
            Item::Closed => side.machine.close(End::Lost("closed".into())),
        }
    }

    fn arrive_at_device(&mut self, id: u32, item: Item) {
        let now = self.now;
        let Some(device) = self.conns.get(&id).map(|c| c.device) else {
            return;
        };
        let d = &mut self.devices[device];
        if d.conn != Some(id) {
            // An earlier connection of the device: it has moved on.
            return;
        }
        match item {
            Item::Data(bytes) => d.session.handle_data(now, &bytes),
            Item::Closed => {
                d.lost(now);
                return;
            }
        }
        if d.take_events(now, &mut self.rng) == DeviceOutcome::Drop {
            let d = &mut self.devices[device];
            d.lost(now);
            self.kill(id);
        }
        self.flush_device(device);
    }

    fn device_step(&mut self, i: usize) {
        let now = self.now;
        let d = &mut self.devices[i];
        if d.connect_at.is_some_and(|at| at <= now) {
            d.connect_at = None;
            self.connect(i);
        }
        let d = &mut self.devices[i];
        if d.role == Role::Sender {
            while d.next_send < d.to_send.len() && d.send_at <= now {
                let client_id = d.to_send[d.next_send];
                d.next_send += 1;
                d.submit(now, client_id);
                d.send_at = now + self.rng.ms(5, 150);
            }
        }
        let d = &mut self.devices[i];
        let mut due = Vec::new();
        d.acks.retain(|&(at, seq)| {
            if at <= now {
                due.push(seq);
                false
            } else {
                true
            }
        });
        for seq in due {
            d.session.ack(seq);
        }
        if d.session.poll_timeout().is_some_and(|at| at <= now) {
            d.session.handle_timeout(now);
        }
        let conn = d.conn;
        if d.take_events(now, &mut self.rng) == DeviceOutcome::Drop {
            let d = &mut self.devices[i];
            d.lost(now);
            if let Some(id) = conn {
                self.kill(id);
            }
        }
        self.flush_device(i);
    }

    /// A device opens a connection: `Hello` and `Authenticate` in the first flight (as 0-RTT
    /// early data half the time).
    fn connect(&mut self, i: usize) {
        let now = self.now;
        let id = self.next_conn;
        self.next_conn += 1;
        let d = &mut self.devices[i];
        d.session.connect(now);
        let mode = d.mode();
        d.authenticating = d.session.request(
            now,
            Request::Authenticate {
                user: d.user.clone(),
                device: d.name.clone(),
                token: "token".into(),
                mode,
            },
        );
        d.conn = Some(id);
        let early = self.rng.chance(0.5);
        let mut conn = Conn {
            device: i,
            to_host: Pipe::default(),
            to_device: Pipe::default(),
            dead: false,
            host_notices: None,
            confirms: early.then(|| now + self.rng.ms(5, 200)),
        };
        if self.host.up {
            let machine = HostSession::new(now, self.host.config.clone(), early);
            self.host.sessions.insert(
                id,
                Side {
                    machine,
                    attached: None,
                    over: false,
                },
            );
        } else {
            // Nobody listens: the attempt fails soon.
            conn.dead = true;
            conn.to_device
                .items
                .push_back((now + self.rng.ms(10, 300), Item::Closed));
        }
        self.conns.insert(id, conn);
        self.flush_device(i);
    }

    /// Puts what device `i` has to send on its connection.
    fn flush_device(&mut self, i: usize) {
        let d = &mut self.devices[i];
        let Some(id) = d.conn else {
            while d.session.poll_transmit().is_some() {}
            return;
        };
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        while let Some(bytes) = d.session.poll_transmit() {
            if !conn.dead {
                conn.to_host
                    .send(self.now, &mut self.rng, &self.faults, bytes);
            }
        }
    }

    /// Runs the host's sessions until none has anything left to do.
    fn settle_host(&mut self) {
        let now = self.now;
        loop {
            let mut busy = false;
            let ids: Vec<u32> = self.host.sessions.keys().copied().collect();
            for id in ids {
                self.host.act(now, id);
                let Some(side) = self.host.sessions.get_mut(&id) else {
                    continue;
                };
                if let Some(a) = side.attached.as_mut() {
                    if a.lagged {
                        a.lagged = false;
                        a.queue.clear();
                        side.machine.handle_lag(now);
                        busy = true;
                    }
                    while side.machine.wants_live() {
                        let Some((seq, message)) = a.queue.pop_front() else {
                            break;
                        };
                        side.machine.handle_live(now, seq, message);
                        busy = true;
                    }
                }
                let mut sent = false;
                while let Some(bytes) = side.machine.poll_transmit() {
                    sent = true;
                    if let Some(conn) = self.conns.get_mut(&id)
                        && !conn.dead
                    {
                        conn.to_device.send(now, &mut self.rng, &self.faults, bytes);
                    }
                }
                busy |= sent;
                if side.machine.end().is_some() && !side.over {
                    side.over = true;
                    busy = true;
                    if let Some(conn) = self.conns.get_mut(&id)
                        && !conn.dead
                    {
                        // The host closes the connection after its last frames.
                        conn.to_device
                            .push(now, &mut self.rng, &self.faults, Item::Closed);
                        conn.dead = true;
                    }
                }
            }
            if !busy {
                return;
            }
        }
    }

    /// Forgets sessions that ended and connections nobody uses.
    fn forget_finished(&mut self) {
        let host = &mut self.host;
        host.sessions
            .retain(|_, side| !(side.over && side.machine.poll_action().is_none()));
        let devices = &self.devices;
        self.conns.retain(|id, conn| {
            devices[conn.device].conn == Some(*id)
                || host.sessions.contains_key(id)
                || !conn.to_device.items.is_empty()
        });
    }

    /// Checks I1–I4 on what the applications got.
    fn check(&self, seed: u64) {
        let sender = &self.devices[0];
        let sent: Vec<u64> = sender.to_send.clone();
        assert_eq!(
            sender.accepted.keys().copied().collect::<Vec<_>>(),
            sent,
            "seed {seed}: every submission accepted (I1)"
        );
        let ids: Vec<MessageId> = sender.accepted.values().copied().collect();
        let mut increasing = ids.clone();
        increasing.sort();
        increasing.dedup();
        assert_eq!(increasing, ids, "seed {seed}: ids follow acceptance");
        for d in &self.devices[1..] {
            let got: Vec<u64> = d
                .log
                .iter()
                .map(|(_, m)| u64::from_be_bytes(m.body.as_slice().try_into().expect("8 bytes")))
                .collect();
            assert_eq!(
                got, sent,
                "seed {seed}: {} got every message once, in order (I1, I2, I3)",
                d.name
            );
            let got_ids: Vec<MessageId> = d.log.iter().map(|(_, m)| m.id).collect();
            assert_eq!(
                got_ids, ids,
                "seed {seed}: {} got the accepted messages",
                d.name
            );
            let positions: Vec<u64> = d.log.iter().map(|(seq, _)| *seq).collect();
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "seed {seed}: {} was handed positions in increasing order: {positions:?}",
                d.name
            );
        }
    }
}

fn faults_for(seed: u64) -> Faults {
    let mut rng = Rng(seed ^ 0x5eed);
    Faults {
        jitter_ms: rng.between(1, 120),
        stall: [0.0, 0.01, 0.05][rng.between(0, 2) as usize],
        kill_every: [0, 800, 3_000][rng.between(0, 2) as usize],
        crash_every: [0, 0, 4_000, 9_000][rng.between(0, 3) as usize],
        restart_every: [0, 0, 5_000][rng.between(0, 2) as usize],
    }
}

/// Seeds run by default; `PAIR_SEEDS` sets another number (`PAIR_SEED` runs just one).
fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("PAIR_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let count = std::env::var("PAIR_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000u64);
    (1..=count).collect()
}

#[test]
fn devices_and_a_host_over_a_faulty_network_deliver_everything_once_in_order() {
    let mut given_up = 0;
    let mut crashes_seen = 0;
    for seed in seeds() {
        let faults = faults_for(seed);
        let messages = 10 + seed % 31;
        let mut sim = Sim::new(seed, faults, messages);
        let settled = sim.run(Duration::from_secs(600));
        assert!(
            settled,
            "seed {seed} ({faults:?}) did not settle: sender accepted {}/{}, logs {:?}",
            sim.devices[0].accepted.len(),
            messages,
            sim.devices[1..]
                .iter()
                .map(|d| d.log.len())
                .collect::<Vec<_>>()
        );
        sim.check(seed);
        if std::env::var_os("PAIR_VERBOSE").is_some() {
            eprintln!(
                "seed {seed}: {faults:?} {} conns, {:?} simulated, closes {:?}",
                sim.next_conn - 1,
                sim.now - sim.start,
                sim.devices
                    .iter()
                    .map(|d| d.closes.clone())
                    .collect::<Vec<_>>()
            );
        }
        let tablet = &sim.devices[2];
        // I4: a device that stops acknowledging is given up, and loses nothing by it.
        if tablet.closes.contains(&ErrorCode::TOO_SLOW) {
            given_up += 1;
        }
        crashes_seen += usize::from(faults.crash_every > 0);
    }
    let runs = seeds().len();
    if runs >= 100 {
        assert!(
            given_up > runs / 4,
            "a silent device was given up in only {given_up} of {runs} runs"
        );
        assert!(crashes_seen > runs / 4, "too few runs with host crashes");
    }
}

/// One end of a host–exchange link, with its durable outbox and what it took from the other.
struct End2 {
    /// Envelope numbers in its outbox (all of them; the peer's acknowledgement drops them).
    outbox_len: u64,
    /// What it applied of the peer's envelopes, durably, in order.
    applied: Vec<u64>,
    /// What it applied since its last flush.
    unflushed: Vec<u64>,
    acked_by_peer: u64,
    link: Option<RelayLink>,
}

impl End2 {
    /// An end with `outbox_len` envelopes to send and nothing received yet.
    fn new(outbox_len: u64) -> Self {
        Self {
            outbox_len,
            applied: Vec::new(),
            unflushed: Vec::new(),
            acked_by_peer: 0,
            link: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Join { holds: u64 },
    Envelope(u64),
    Ack(u64),
}

#[test]
fn two_relay_link_ends_hand_over_every_envelope_once_in_order_across_losses_and_restarts() {
    for seed in seeds().into_iter().take(2_000) {
        let mut rng = Rng(seed.wrapping_mul(7919));
        let total = rng.between(20, 400);
        let window = rng.between(2, 16);
        let mut ends = [End2::new(total), End2::new(total)];
        // One ordered pipe each way; a connection is up while `up`.
        let mut pipes: [VecDeque<Wire>; 2] = [VecDeque::new(), VecDeque::new()];
        let mut up = false;
        let mut steps = 0u64;
        let mut faults = 0;
        while steps < 200_000 {
            steps += 1;
            let calm = steps > 20_000;
            let done = ends
                .iter()
                .all(|e| e.applied.len() as u64 == total && e.unflushed.is_empty());
            if done && calm {
                break;
            }
            if !up {
                // Both join: each tells the other what it holds durably.
                pipes = [VecDeque::new(), VecDeque::new()];
                for (i, end) in ends.iter_mut().enumerate() {
                    end.link = None;
                    pipes[i].push_back(Wire::Join {
                        holds: end.applied.len() as u64,
                    });
                }
                up = true;
            }
            if !calm && rng.chance(0.002) {
                // The connection dies; what was in flight is lost.
                up = false;
                faults += 1;
                continue;
            }
            if !calm && rng.chance(0.001) {
                // One end restarts: what it had not flushed is gone.
                let i = rng.between(0, 1) as usize;
                let keep = rng.between(0, ends[i].unflushed.len() as u64) as usize;
                let kept: Vec<u64> = ends[i].unflushed.drain(..).take(keep).collect();
                ends[i].applied.extend(kept);
                up = false;
                faults += 1;
                continue;
            }
            // One end acts: it reads one thing from its pipe, or sends, or acknowledges.
            let i = rng.between(0, 1) as usize;
            let from = 1 - i;
            match rng.between(0, 3) {
                0 | 1 => {
                    let Some(wire) = pipes[from].pop_front() else {
                        continue;
                    };
                    let end = &mut ends[i];
                    match wire {
                        Wire::Join { holds } => {
                            // A peer never loses what it acknowledged.
                            assert!(
                                holds >= end.acked_by_peer && holds <= end.outbox_len,
                                "seed {seed}"
                            );
                            end.acked_by_peer = holds;
                            let mine = end.applied.len() as u64 + end.unflushed.len() as u64;
                            // What this end says at its join is durable: flushed first.
                            end.applied.append(&mut end.unflushed);
                            assert_eq!(end.applied.len() as u64, mine);
                            end.link = Some(RelayLink::with_window(window, holds, mine));
                        }
                        Wire::Envelope(seq) => {
                            let Some(link) = end.link.as_mut() else {
                                continue;
                            };
                            if link.on_envelope(seq) == Incoming::Apply {
                                let expected =
                                    end.applied.len() as u64 + end.unflushed.len() as u64 + 1;
                                assert_eq!(seq, expected, "seed {seed}: envelopes come in order");
                                end.unflushed.push(seq);
                            }
                            if let Some(ack) = link.poll_ack(false) {
                                end.applied.append(&mut end.unflushed);
                                pipes[i].push_back(Wire::Ack(ack));
                                link.on_ack_sent(ack);
                            }
                        }
                        Wire::Ack(seq) => {
                            let Some(link) = end.link.as_mut() else {
                                continue;
                            };
                            match link.on_ack(seq) {
                                Ok(Some(acked)) => end.acked_by_peer = acked,
                                Ok(None) => {}
                                Err(e) => panic!("seed {seed}: {e}"),
                            }
                        }
                    }
                }
                2 => {
                    let end = &mut ends[i];
                    let Some(link) = end.link.as_mut() else {
                        continue;
                    };
                    let room = link.room() as u64;
                    let from_seq = link.sent() + 1;
                    for seq in from_seq..(from_seq + room).min(end.outbox_len + 1) {
                        pipes[i].push_back(Wire::Envelope(seq));
                        link.on_sent(seq);
                    }
                }
                _ => {
                    // Nothing else to do: whatever waits is made durable and acknowledged.
                    let end = &mut ends[i];
                    let Some(link) = end.link.as_mut() else {
                        continue;
                    };
                    if let Some(ack) = link.poll_ack(true) {
                        end.applied.append(&mut end.unflushed);
                        pipes[i].push_back(Wire::Ack(ack));
                        link.on_ack_sent(ack);
                    }
                }
            }
        }
        for end in &ends {
            assert_eq!(
                end.applied,
                (1..=total).collect::<Vec<_>>(),
                "seed {seed}: every envelope applied once, in order ({faults} faults)"
            );
        }
    }
}
