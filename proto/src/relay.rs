//! The store-and-forward hop between a host and the exchange, sans-IO: one [`RelayLink`] at
//! each end of a link.
//!
//! Both directions carry numbered envelopes (seed 000's `905` from a host, `906` from the
//! exchange), each side's numbers growing by one per envelope in its durable outbox. A sender
//! keeps at most a window of envelopes ahead of the other side's acknowledgement; a receiver
//! applies each number once and acknowledges cumulatively, only what it made durable, once
//! half a window waits or when it has nothing else to do. Nothing here is timed: the link runs
//! over one QUIC stream, which loses nothing while it lives. When it dies, the two sides join
//! again and tell each other the highest number each holds durably; each then sends again
//! from the other's mark, and whatever the receiver already had is recognised as a repeat.
//!
//! The driver (`iim-host`'s `network` for a host, `exchange` for the exchange) owns the
//! outbox and the store; the link decides what to send, what to take and when to acknowledge.

/// Envelopes sent ahead of the other side's acknowledgement, at most.
pub const RELAY_WINDOW: u64 = 1024;

/// An acknowledgement that cannot be right: the link must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the peer acknowledged {acked}, but only {sent} was sent")]
pub struct AckBeyondSent {
    /// What the peer acknowledged.
    pub acked: u64,
    /// The highest number sent.
    pub sent: u64,
}

/// What to do with an envelope that came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// New: apply it (durably before the acknowledgement that [`RelayLink::poll_ack`] asks for).
    Apply,
    /// Applied before (sent again after a join): drop it.
    Repeat,
}

/// One end of a link between a host and the exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLink {
    window: u64,
    /// The highest number sent on this link.
    sent: u64,
    /// The highest number the peer acknowledged.
    acked: u64,
    /// The highest number taken from the peer.
    taken: u64,
    /// The highest number acknowledged to the peer.
    acked_in: u64,
}

impl RelayLink {
    /// The link as two sides that just joined see it: the peer holds durably everything this
    /// side sent up to `peer_holds`, and this side holds durably what the peer sent up to
    /// `holds`. Sending starts after `peer_holds`.
    pub fn joined(peer_holds: u64, holds: u64) -> Self {
        Self::with_window(RELAY_WINDOW, peer_holds, holds)
    }

    /// [`RelayLink::joined`] with a window of `window` envelopes (at least 2).
    pub fn with_window(window: u64, peer_holds: u64, holds: u64) -> Self {
        Self {
            window: window.max(2),
            sent: peer_holds,
            acked: peer_holds,
            taken: holds,
            acked_in: holds,
        }
    }

    /// The highest number sent: the driver reads its outbox after it.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// The highest number the peer acknowledged: the driver's outbox may drop up to it.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// How many more envelopes may be sent before the peer acknowledges.
    pub fn room(&self) -> usize {
        self.window.saturating_sub(self.sent - self.acked) as usize
    }

    /// Envelope `seq` was written to the peer (in number order, each once per link).
    pub fn on_sent(&mut self, seq: u64) {
        debug_assert!(seq > self.sent, "envelopes are sent in order");
        self.sent = self.sent.max(seq);
    }

    /// The peer holds every envelope up to `seq`: `Ok(Some(seq))` if that is news (the driver
    /// drops them from its outbox, and may send more), `Ok(None)` for an old acknowledgement.
    pub fn on_ack(&mut self, seq: u64) -> Result<Option<u64>, AckBeyondSent> {
        if seq > self.sent {
            return Err(AckBeyondSent {
                acked: seq,
                sent: self.sent,
            });
        }
        if seq <= self.acked {
            return Ok(None);
        }
        self.acked = seq;
        Ok(Some(seq))
    }

    /// Envelope `seq` came from the peer.
    pub fn on_envelope(&mut self, seq: u64) -> Incoming {
        if seq <= self.taken {
            return Incoming::Repeat;
        }
        self.taken = seq;
        Incoming::Apply
    }

    /// The highest number taken from the peer.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// An acknowledgement to send, if one is due: once half a window waits, or whatever
    /// waits when the driver has nothing else to do (`idle`). The driver makes what it applied
    /// durable first, then sends it and calls [`RelayLink::on_ack_sent`].
    pub fn poll_ack(&self, idle: bool) -> Option<u64> {
        let waiting = self.taken - self.acked_in;
        (waiting >= self.window / 2 || (idle && waiting > 0)).then_some(self.taken)
    }

    /// The acknowledgement of everything up to `seq` was sent.
    pub fn on_ack_sent(&mut self, seq: u64) {
        self.acked_in = self.acked_in.max(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_keeps_a_window_ahead_of_acknowledgements() {
        let mut link = RelayLink::with_window(4, 10, 0);
        assert_eq!((link.sent(), link.room()), (10, 4));
        for seq in 11..=14 {
            link.on_sent(seq);
        }
        assert_eq!(link.room(), 0);
        assert_eq!(link.on_ack(12), Ok(Some(12)));
        assert_eq!(link.room(), 2);
        assert_eq!(link.on_ack(11), Ok(None), "an old acknowledgement");
        assert_eq!(
            link.on_ack(15),
            Err(AckBeyondSent {
                acked: 15,
                sent: 14
            })
        );
        assert_eq!(link.acked(), 12);
    }

    #[test]
    fn a_receiver_takes_each_number_once_and_acknowledges_by_half_windows_or_when_idle() {
        let mut link = RelayLink::with_window(4, 0, 5);
        assert_eq!(
            link.on_envelope(5),
            Incoming::Repeat,
            "held before the join"
        );
        assert_eq!(link.on_envelope(6), Incoming::Apply);
        assert_eq!(link.poll_ack(false), None, "less than half a window");
        assert_eq!(link.poll_ack(true), Some(6), "nothing else to do");
        assert_eq!(link.on_envelope(7), Incoming::Apply);
        assert_eq!(link.on_envelope(7), Incoming::Repeat);
        assert_eq!(link.poll_ack(false), Some(7), "half a window waits");
        link.on_ack_sent(7);
        assert_eq!(link.poll_ack(true), None);
        assert_eq!(link.taken(), 7);
    }
}
