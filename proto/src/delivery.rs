//! Per-device delivery bookkeeping, sans-IO: which deliveries are in flight on a session and
//! how far the device's cursor may move when it acknowledges.
//!
//! The cursor is the inbox position up to which the device has acknowledged everything. It only
//! moves forward, and never past a delivery still in flight, so a device that disconnects is
//! sent again exactly what it had not acknowledged.

use std::collections::BTreeSet;

/// What an acknowledgement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The cursor moved to this position; the driver persists it.
    Advanced(u64),
    /// Recorded, but an earlier delivery is still in flight, so the cursor stays.
    Held,
    /// Nothing with that position was in flight (a duplicate or a bogus ack); ignored.
    Unknown,
}

/// The deliveries of one device session.
#[derive(Debug, Clone)]
pub struct DeliveryWindow {
    cursor: u64,
    last_sent: u64,
    in_flight: BTreeSet<u64>,
}

impl DeliveryWindow {
    /// A window for a device whose stored cursor is `cursor`.
    pub fn new(cursor: u64) -> Self {
        Self {
            cursor,
            last_sent: cursor,
            in_flight: BTreeSet::new(),
        }
    }

    /// The acknowledged position.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The highest position sent on this session (the cursor if none).
    pub fn last_sent(&self) -> u64 {
        self.last_sent
    }

    /// Deliveries sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether the delivery at `seq` should be sent: `false` if it was sent already (the same
    /// entry reached the session both from the backlog scan and live).
    pub fn should_send(&self, seq: u64) -> bool {
        seq > self.last_sent
    }

    /// Records that the delivery at `seq` was sent. Positions must be sent in increasing order.
    pub fn on_sent(&mut self, seq: u64) {
        debug_assert!(seq > self.last_sent, "deliveries must be sent in order");
        self.last_sent = self.last_sent.max(seq);
        self.in_flight.insert(seq);
    }

    /// Records the device's acknowledgement of every delivery up to and including `seq`.
    pub fn on_ack(&mut self, seq: u64) -> AckOutcome {
        if seq <= self.cursor || seq > self.last_sent {
            return AckOutcome::Unknown;
        }
        let rest = self.in_flight.split_off(&(seq + 1));
        self.in_flight = rest;
        let new_cursor = match self.in_flight.first() {
            Some(&oldest) => oldest - 1,
            None => self.last_sent,
        };
        if new_cursor > self.cursor {
            self.cursor = new_cursor;
            AckOutcome::Advanced(new_cursor)
        } else {
            AckOutcome::Held
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_move_the_cursor_forward_only() {
        let mut w = DeliveryWindow::new(4);
        for seq in [5, 7, 9] {
            assert!(w.should_send(seq));
            w.on_sent(seq);
        }
        assert!(!w.should_send(7));
        assert_eq!(w.on_ack(7), AckOutcome::Advanced(8));
        assert_eq!(w.on_ack(7), AckOutcome::Unknown);
        assert_eq!(w.on_ack(3), AckOutcome::Unknown);
        assert_eq!(w.on_ack(12), AckOutcome::Unknown, "never sent");
        assert_eq!(w.in_flight(), 1);
        assert_eq!(w.on_ack(9), AckOutcome::Advanced(9));
        assert_eq!(w.cursor(), 9);
    }
}
