//! One hop (a sender with a durable queue, a receiver with a durable application log) driven by
//! the `reliable` machines over a simulated network that loses, duplicates, delays and so
//! reorders packets, and restarts either side, over thousands of seeds.
//!
//! The sender is the host delivering a user's inbox to a device (or a client submitting its
//! outbox to the host): items 1..=N become available over time; it sends them in a window,
//! resends what is not acknowledged, gives the peer up past the retry budget, and on every new
//! session resumes from the position the receiver says it has. The receiver hands items to its
//! application through a `Reorder` and acknowledges cumulatively; its application log and its
//! position are stored together, so a restart keeps both and loses only what was held.
//!
//! Every run must end with the application holding exactly 1..=N: each once, in order.

use iim_proto::{Due, Offered, Reorder, Retransmit, RetryPolicy};
use proptest::prelude::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

const MS: Duration = Duration::from_millis(1);

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
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[derive(Debug, Clone, Copy)]
struct Faults {
    loss: f64,
    duplicate: f64,
    /// Packets take 1 ms to this long, each its own time, so they overtake one another.
    max_delay_ms: u64,
    /// Chance, per millisecond, that one side restarts.
    restart_per_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Packet {
    /// The receiver opens a session: it has everything up to `cursor`.
    Hello {
        cursor: u64,
    },
    Data {
        seq: u64,
    },
    Ack {
        upto: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum To {
    Sender,
    Receiver,
}

/// A packet on the wire: (arrival, tie-break, session, to, packet).
type InFlight = (Duration, u64, u32, To, Packet);

struct Sender {
    /// Which session it is in: packets of another session are not its (a dead connection's).
    session: Option<u32>,
    schedule: Retransmit<u64>,
    /// Next position to send for the first time.
    next: u64,
    /// Everything up to here was acknowledged in some session.
    acked: u64,
}

struct Receiver {
    session: u32,
    buffer: Reorder<()>,
    /// The application's log, stored with the position (`buffer.last()`).
    log: Vec<u64>,
}

struct Sim {
    rng: Rng,
    faults: Faults,
    now: Duration,
    wire: BinaryHeap<Reverse<InFlight>>,
    sent_packets: u64,
    sender: Sender,
    receiver: Receiver,
    window: u64,
    items: u64,
    /// Item i is available from `i * arrival_gap`.
    arrival_gap: Duration,
    give_ups: u32,
    /// When the receiver reconnects after the sender gave it up.
    reconnect_at: Option<Duration>,
}

impl Sim {
    fn send(&mut self, session: u32, to: To, packet: Packet) {
        if self.rng.chance(self.faults.loss) {
            return;
        }
        let copies = if self.rng.chance(self.faults.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = MS * self.rng.between(1, self.faults.max_delay_ms) as u32;
            self.sent_packets += 1;
            self.wire.push(Reverse((
                self.now + delay,
                self.sent_packets,
                session,
                to,
                packet,
            )));
        }
    }

    fn available(&self) -> u64 {
        let gap = self.arrival_gap.as_millis().max(1) as u64;
        (self.now.as_millis() as u64 / gap).min(self.items)
    }

    /// The receiver starts a session: new number, hello with its stored position.
    fn receiver_connects(&mut self) {
        self.receiver.session += 1;
        let cursor = self.receiver.buffer.last();
        self.send(self.receiver.session, To::Sender, Packet::Hello { cursor });
    }

    /// Sends what the window allows for the first time.
    fn sender_fill(&mut self) {
        let Some(session) = self.sender.session else {
            return;
        };
        let limit = self.available().min(self.sender.acked + self.window);
        while self.sender.next <= limit {
            let seq = self.sender.next;
            self.sender.schedule.sent(seq, self.now);
            self.send(session, To::Receiver, Packet::Data { seq });
            self.sender.next += 1;
        }
    }

    fn on_packet(&mut self, session: u32, to: To, packet: Packet) {
        match (to, packet) {
            (To::Sender, Packet::Hello { cursor }) => {
                if self.sender.session.is_some_and(|s| s >= session) {
                    return; // an older session's hello, late
                }
                // A new session: resume from the receiver's position.
                self.sender.session = Some(session);
                self.sender.schedule.clear();
                self.sender.acked = self.sender.acked.max(cursor);
                self.sender.next = cursor + 1;
                self.sender_fill();
            }
            (To::Sender, Packet::Ack { upto }) => {
                if self.sender.session != Some(session) {
                    return;
                }
                self.sender.schedule.acked_through(&upto);
                self.sender.acked = self.sender.acked.max(upto);
                self.sender_fill();
            }
            (To::Receiver, Packet::Data { seq }) => {
                if session != self.receiver.session {
                    return;
                }
                match self.receiver.buffer.offer(seq, ()) {
                    Offered::Ready(ready) => {
                        self.receiver.log.extend(ready.iter().map(|(s, ())| *s));
                        let upto = self.receiver.buffer.last();
                        self.send(session, To::Sender, Packet::Ack { upto });
                    }
                    Offered::Duplicate => {
                        let upto = self.receiver.buffer.last();
                        self.send(session, To::Sender, Packet::Ack { upto });
                    }
                    Offered::Held | Offered::TooFarAhead => {}
                }
            }
            _ => unreachable!("packets go one way each"),
        }
    }

    fn poll_sender(&mut self) {
        let Some(session) = self.sender.session else {
            return;
        };
        match self.sender.schedule.poll(self.now) {
            Some(Due::Resend(ids)) => {
                for seq in ids {
                    self.send(session, To::Receiver, Packet::Data { seq });
                }
            }
            Some(Due::GiveUp(_)) => {
                // The peer is given up: the session ends; the items stay queued.
                self.give_ups += 1;
                self.sender.session = None;
                self.reconnect_at = Some(self.now + 500 * MS);
            }
            None => {}
        }
    }

    fn maybe_restart(&mut self) {
        if !self.rng.chance(self.faults.restart_per_ms) {
            return;
        }
        if self.rng.chance(0.5) {
            // The sender restarts: it keeps its queue, loses its session and schedule.
            self.sender.session = None;
            self.sender.schedule.clear();
            self.reconnect_at = Some(self.now + 200 * MS);
        } else {
            // The receiver restarts: it keeps its log and position, loses what it held.
            self.receiver.buffer = Reorder::new(self.receiver.buffer.last(), self.window * 2);
            self.receiver_connects();
        }
    }

    fn done(&self) -> bool {
        self.receiver.log.len() as u64 == self.items && self.sender.acked == self.items
    }
}

/// Runs one hop with `seed`: faults for the first `stormy` of simulated time, then a clean
/// network until everything arrived. Returns the application's log.
fn run(seed: u64, faults: Faults, items: u64, stormy: Duration) -> Result<Vec<u64>, String> {
    let policy = RetryPolicy {
        initial: 100 * MS,
        max: 800 * MS,
        budget: 5,
    };
    let window = 8;
    let mut sim = Sim {
        rng: Rng(seed),
        faults,
        now: Duration::ZERO,
        wire: BinaryHeap::new(),
        sent_packets: 0,
        sender: Sender {
            session: None,
            schedule: Retransmit::new(policy),
            next: 1,
            acked: 0,
        },
        receiver: Receiver {
            session: 0,
            buffer: Reorder::new(0, window * 2),
            log: Vec::new(),
        },
        window,
        items,
        arrival_gap: 10 * MS,
        give_ups: 0,
        reconnect_at: None,
    };
    sim.receiver_connects();
    let limit = stormy + Duration::from_secs(120);
    while !sim.done() {
        if sim.now > limit {
            return Err(format!(
                "not done after {limit:?}: log has {} of {items}, sender acked {}",
                sim.receiver.log.len(),
                sim.sender.acked
            ));
        }
        if sim.now >= stormy {
            sim.faults = Faults {
                loss: 0.0,
                duplicate: 0.0,
                max_delay_ms: 5,
                restart_per_ms: 0.0,
            };
        }
        // Everything due in this millisecond, then the next.
        while let Some(Reverse((at, ..))) = sim.wire.peek()
            && *at <= sim.now
        {
            let Some(Reverse((_, _, session, to, packet))) = sim.wire.pop() else {
                break;
            };
            sim.on_packet(session, to, packet);
        }
        sim.poll_sender();
        if sim.reconnect_at.is_some_and(|at| at <= sim.now) {
            sim.reconnect_at = None;
            sim.receiver_connects();
        }
        // A hello lost on the way must not leave the two apart for good: the receiver tries
        // again when it has heard nothing of its session for a while (its keep-alive).
        if sim.sender.session != Some(sim.receiver.session)
            && sim.reconnect_at.is_none()
            && sim.now.as_millis() % 1000 == 999
        {
            sim.receiver_connects();
        }
        sim.sender_fill();
        sim.maybe_restart();
        sim.now += MS;
    }
    Ok(sim.receiver.log)
}

fn expect_exact(log: &[u64], items: u64) -> Result<(), String> {
    let expected: Vec<u64> = (1..=items).collect();
    if log == expected.as_slice() {
        Ok(())
    } else {
        Err(format!("the application got {log:?}"))
    }
}

const STORM: Faults = Faults {
    loss: 0.2,
    duplicate: 0.1,
    max_delay_ms: 200,
    restart_per_ms: 0.0005,
};

#[test]
fn a_clean_network_delivers_everything_in_order() {
    let clean = Faults {
        loss: 0.0,
        duplicate: 0.0,
        max_delay_ms: 5,
        restart_per_ms: 0.0,
    };
    let log = run(1, clean, 200, Duration::ZERO).expect("done");
    expect_exact(&log, 200).expect("exact");
}

#[test]
fn a_receiver_that_never_acknowledges_is_given_up_after_the_budget() {
    let policy = RetryPolicy {
        initial: 100 * MS,
        max: 800 * MS,
        budget: 5,
    };
    let mut schedule = Retransmit::new(policy);
    schedule.sent(1u64, Duration::ZERO);
    schedule.sent(2u64, 10 * MS);
    // Item 1 and item 2 are each sent again on their own schedule until item 1, the first to
    // exhaust its budget, gives the peer up.
    let mut transmissions = [1u32, 1];
    let given_up_at = loop {
        let now = schedule.next_deadline().expect("something waits");
        match schedule.poll(now) {
            Some(Due::Resend(ids)) => {
                for id in ids {
                    transmissions[id as usize - 1] += 1;
                }
            }
            Some(Due::GiveUp(id)) => {
                assert_eq!(id, 1);
                break now;
            }
            None => unreachable!("polled at its deadline"),
        }
    };
    assert_eq!(transmissions, [policy.budget, policy.budget]);
    assert_eq!(given_up_at, policy.give_up_after());
    assert_eq!(
        given_up_at,
        Duration::from_millis(100 + 200 + 400 + 800 + 800)
    );
    assert!(schedule.is_empty(), "the session's state is dropped");
}

#[test]
fn a_storm_with_restarts_loses_and_duplicates_nothing() {
    for seed in 0..20 {
        let log = run(seed, STORM, 100, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        expect_exact(&log, 100).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any seed, any mix of faults: exactly 1..=N at the application.
    #[test]
    fn every_seed_delivers_exactly_once_in_order(
        seed in any::<u64>(),
        loss in 0.0f64..0.5,
        duplicate in 0.0f64..0.5,
        max_delay_ms in 1u64..400,
        restarts in 0.0f64..0.002,
    ) {
        let faults = Faults { loss, duplicate, max_delay_ms, restart_per_ms: restarts };
        let log = run(seed, faults, 40, Duration::from_secs(3));
        prop_assert!(log.is_ok(), "{:?}", log.err());
        let log = log.unwrap_or_default();
        prop_assert!(expect_exact(&log, 40).is_ok(), "{:?}", log);
    }
}
