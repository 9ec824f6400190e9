//! Sans-IO reliability for one hop (client → host, host → device): the sender's retransmission
//! schedule with backoff and a retry budget, and the receiver's reorder buffer.
//!
//! QUIC delivers a stream's bytes reliably, but only while the connection lives, and only up to
//! the peer's transport: a frame the peer's application never processed is not acknowledged by
//! anything QUIC sees. So every hop acknowledges at the application level, per message, as TCP
//! does per byte. The sender keeps what it sent in a [`Retransmit`] until the matching
//! acknowledgement comes back; what is not acknowledged in time is sent again, later each time,
//! and after the retry budget the sender gives the peer up (the host disconnects the device;
//! what it had not acknowledged stays in its inbox). The receiver passes what it gets through a
//! [`Reorder`], which hands items to the application once each, in sequence order, however
//! the network duplicated or reordered them.
//!
//! Neither machine reads a clock or touches a socket: the driver passes `now` (time since any
//! fixed start) and carries out what the machine answers. The same code runs in the host, in
//! the client, and in the simulated network of the tests.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// When to send an unacknowledged item again, and when to give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the first retransmission.
    pub initial: Duration,
    /// Longest wait between two transmissions; each wait doubles up to this.
    pub max: Duration,
    /// Transmissions of one item, the first included, after which the peer is given up.
    pub budget: u32,
}

impl Default for RetryPolicy {
    /// 2 s, doubling up to 16 s, 6 transmissions: a peer is given up 62 s after the first
    /// transmission that it never acknowledged. Mobile links stall for seconds (a handover, a
    /// tunnel); a minute of silence is a dead peer.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(16),
            budget: 6,
        }
    }
}

impl RetryPolicy {
    /// The wait after the `transmissions`-th transmission (1 for the first).
    pub fn wait_after(&self, transmissions: u32) -> Duration {
        let doublings = transmissions.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// How long after the first transmission an item that is never acknowledged is given up.
    pub fn give_up_after(&self) -> Duration {
        (1..=self.budget).map(|n| self.wait_after(n)).sum()
    }
}

/// What [`Retransmit::poll`] asks the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due<K> {
    /// Send these items again, in this order (oldest first).
    Resend(Vec<K>),
    /// This item was sent the whole budget and never acknowledged: the peer is not
    /// answering. Every item was dropped from the machine; the driver ends the session and
    /// keeps the items for the next one.
    GiveUp(K),
}

/// The sender's side of a hop: what was sent and not yet acknowledged, and when to send it
/// again.
#[derive(Debug, Clone)]
pub struct Retransmit<K> {
    policy: RetryPolicy,
    /// Per item: transmissions so far, and when the current one times out.
    items: BTreeMap<K, (u32, Duration)>,
    /// The same items by time-out.
    deadlines: BTreeSet<(Duration, K)>,
}

impl<K: Ord + Clone> Retransmit<K> {
    /// An empty schedule.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            items: BTreeMap::new(),
            deadlines: BTreeSet::new(),
        }
    }

    /// The policy it follows.
    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// Records the first transmission of `id` at `now`. An item already waiting keeps its
    /// schedule (sending it twice does not buy it a bigger budget).
    pub fn sent(&mut self, id: K, now: Duration) {
        if self.items.contains_key(&id) {
            return;
        }
        let deadline = now + self.policy.wait_after(1);
        self.deadlines.insert((deadline, id.clone()));
        self.items.insert(id, (1, deadline));
    }

    /// Records the acknowledgement of `id`; `false` if it was not waiting (a duplicate or a
    /// late acknowledgement, which the driver ignores).
    pub fn acked(&mut self, id: &K) -> bool {
        match self.items.remove(id) {
            Some((_, deadline)) => {
                self.deadlines.remove(&(deadline, id.clone()));
                true
            }
            None => false,
        }
    }

    /// Records a cumulative acknowledgement: every item up to and including `id`. Returns how
    /// many were waiting.
    pub fn acked_through(&mut self, id: &K) -> usize {
        use std::ops::Bound::{Excluded, Unbounded};
        let first_after = self
            .items
            .range((Excluded(id), Unbounded))
            .next()
            .map(|(k, _)| k.clone());
        let rest = match first_after {
            Some(first_after) => self.items.split_off(&first_after),
            None => BTreeMap::new(),
        };
        let done = std::mem::replace(&mut self.items, rest);
        for (k, (_, deadline)) in &done {
            self.deadlines.remove(&(*deadline, k.clone()));
        }
        done.len()
    }

    /// When the driver must call [`Retransmit::poll`] next; `None` while nothing waits.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// What is due at `now`: the items to send again, or the item that exhausted its budget.
    pub fn poll(&mut self, now: Duration) -> Option<Due<K>> {
        let mut resend = Vec::new();
        while let Some((deadline, id)) = self.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(entry) = self.items.get_mut(&id) else {
                continue;
            };
            if entry.0 >= self.policy.budget {
                self.clear();
                return Some(Due::GiveUp(id));
            }
            entry.0 += 1;
            entry.1 = now + self.policy.wait_after(entry.0);
            self.deadlines.insert((entry.1, id.clone()));
            resend.push(id);
        }
        resend.sort();
        (!resend.is_empty()).then_some(Due::Resend(resend))
    }

    /// Items sent and not acknowledged.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing waits for an acknowledgement.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Transmissions of `id` so far, if it is waiting.
    pub fn transmissions(&self, id: &K) -> Option<u32> {
        self.items.get(id).map(|(n, _)| *n)
    }

    /// Forgets everything: the session ended, and the next one starts from the receiver's
    /// acknowledged position.
    pub fn clear(&mut self) {
        self.items.clear();
        self.deadlines.clear();
    }
}

/// What [`Reorder::offer`] made of an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offered<T> {
    /// In order: these items (the one offered, then any it unblocked), for the application,
    /// in sequence order. The driver acknowledges [`Reorder::last`].
    Ready(Vec<(u64, T)>),
    /// Handed over before (a retransmission whose acknowledgement was lost): the driver
    /// acknowledges [`Reorder::last`] again and drops it.
    Duplicate,
    /// Ahead of a gap: kept until the items before it arrive.
    Held,
    /// So far ahead that keeping it would pass the buffer's bound: dropped; the sender sends
    /// it again once the gap is filled.
    TooFarAhead,
}

/// The receiver's side of a hop: items numbered 1, 2, 3, … are handed to the application once
/// each and in order (the `lastId` and pending queue of the design's seed 001 §8.2).
#[derive(Debug, Clone)]
pub struct Reorder<T> {
    last: u64,
    held: BTreeMap<u64, T>,
    window: u64,
}

impl<T> Reorder<T> {
    /// A buffer whose application has everything up to `last` (a stored cursor, 0 for none)
    /// and that holds items at most `window` positions past it.
    pub fn new(last: u64, window: u64) -> Self {
        Self {
            last,
            held: BTreeMap::new(),
            window: window.max(1),
        }
    }

    /// The position up to which everything was handed to the application: what the receiver
    /// acknowledges.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Items held ahead of a gap.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The first position missing, if items are held past it.
    pub fn first_missing(&self) -> Option<u64> {
        (!self.held.is_empty()).then_some(self.last + 1)
    }

    /// Takes item `seq`.
    pub fn offer(&mut self, seq: u64, item: T) -> Offered<T> {
        if seq <= self.last || self.held.contains_key(&seq) {
            return Offered::Duplicate;
        }
        if seq > self.last.saturating_add(self.window) {
            return Offered::TooFarAhead;
        }
        if seq != self.last + 1 {
            self.held.insert(seq, item);
            return Offered::Held;
        }
        let mut ready = vec![(seq, item)];
        self.last = seq;
        while let Some(next) = self.held.remove(&(self.last + 1)) {
            self.last += 1;
            ready.push((self.last, next));
        }
        Offered::Ready(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: 100 * MS,
            max: 400 * MS,
            budget: 4,
        }
    }

    #[test]
    fn waits_double_up_to_the_maximum() {
        let p = policy();
        let waits: Vec<_> = (1..=5).map(|n| p.wait_after(n)).collect();
        assert_eq!(waits, [100 * MS, 200 * MS, 400 * MS, 400 * MS, 400 * MS]);
        assert_eq!(p.give_up_after(), 1100 * MS);
        assert_eq!(
            RetryPolicy::default().give_up_after(),
            Duration::from_secs(62)
        );
        let huge = RetryPolicy {
            initial: Duration::from_secs(u64::MAX / 4),
            max: Duration::MAX,
            budget: 40,
        };
        assert_eq!(huge.wait_after(40), Duration::MAX, "no overflow");
    }

    #[test]
    fn an_unacknowledged_item_is_resent_with_backoff_then_given_up() {
        let mut r = Retransmit::new(policy());
        r.sent(7u64, Duration::ZERO);
        assert_eq!(r.next_deadline(), Some(100 * MS));
        assert_eq!(r.poll(99 * MS), None);
        assert_eq!(r.poll(100 * MS), Some(Due::Resend(vec![7])));
        assert_eq!(r.next_deadline(), Some(300 * MS));
        assert_eq!(r.poll(300 * MS), Some(Due::Resend(vec![7])));
        assert_eq!(r.poll(700 * MS), Some(Due::Resend(vec![7])));
        assert_eq!(r.transmissions(&7), Some(4));
        assert_eq!(r.poll(1099 * MS), None);
        assert_eq!(r.poll(1100 * MS), Some(Due::GiveUp(7)));
        assert!(r.is_empty());
        assert_eq!(r.next_deadline(), None);
    }

    #[test]
    fn acknowledgements_stop_the_schedule() {
        let mut r = Retransmit::new(policy());
        for id in 1..=5u64 {
            r.sent(id, MS * id as u32);
        }
        r.sent(3, 50 * MS);
        assert_eq!(r.transmissions(&3), Some(1), "sending again buys no budget");
        assert!(r.acked(&2));
        assert!(!r.acked(&2), "a duplicate acknowledgement");
        assert_eq!(r.acked_through(&3), 2);
        assert_eq!(r.len(), 2);
        assert_eq!(r.poll(200 * MS), Some(Due::Resend(vec![4, 5])));
        assert_eq!(r.acked_through(&9), 2);
        assert_eq!(r.poll(Duration::from_secs(10)), None);
    }

    #[test]
    fn reorder_hands_over_each_item_once_in_order() {
        let mut r = Reorder::new(10, 4);
        assert_eq!(r.offer(10, 'x'), Offered::Duplicate);
        assert_eq!(r.offer(12, 'b'), Offered::Held);
        assert_eq!(r.offer(12, 'b'), Offered::Duplicate);
        assert_eq!(r.offer(15, 'e'), Offered::TooFarAhead);
        assert_eq!(r.offer(13, 'c'), Offered::Held);
        assert_eq!(r.first_missing(), Some(11));
        assert_eq!(
            r.offer(11, 'a'),
            Offered::Ready(vec![(11, 'a'), (12, 'b'), (13, 'c')])
        );
        assert_eq!(r.last(), 13);
        assert_eq!(r.held(), 0);
        assert_eq!(r.first_missing(), None);
        assert_eq!(r.offer(14, 'd'), Offered::Ready(vec![(14, 'd')]));
    }
}
