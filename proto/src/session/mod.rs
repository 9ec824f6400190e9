//! The connection protocol between a device and its host, as two sans-IO machines.
//!
//! [`HostSession`] is the host's side of one client connection: the handshake, authentication,
//! the offline backlog (pushed, or paged on request), live deliveries, their acknowledgements and
//! retransmission, and the pacing of submissions. [`ClientSession`] is a device's side, across
//! the connections it makes one after another: requests and their answers, the outbox of
//! submissions not yet accepted, the filter that hands each delivery to the application once,
//! and the wait between reconnects.
//!
//! Neither machine reads a clock or touches a socket, a store or a plugin, as in quinn-proto:
//! every input takes `now`, and the driver asks the machine what to send
//! (`poll_transmit`), when to wake it (`poll_timeout`) and what else to do (`poll_action`,
//! `poll_event`). The host's driver is `iim-host`'s `session` module, the client's is
//! `iim-client`; `proto/tests/pair.rs` drives both over a simulated network.

mod client;
mod host;

pub use client::{
    Backoff, ClientConfig, ClientEvent, ClientSession, Filter, Outgoing, Request, Verdict,
};
pub use host::{
    Action, Authenticated, DeliveryCounts, HostConfig, HostSession, Identity, InboxSummary,
    Submission, SubmitAnswer,
};

use crate::frame::ErrorCode;
use std::time::{Duration, Instant};

/// A request the host will not carry out, and why: sent to the client as an `Error` frame
/// about the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code, for programs.
    pub code: ErrorCode,
    /// The reason, for people.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code.name())
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The client finished its stream or logged out: a clean close, without an error.
    Done,
    /// The host ends the session with this error; the `Error` frame saying so (without a
    /// request id) is the last thing transmitted.
    Error {
        /// The code.
        code: ErrorCode,
        /// The reason, for people.
        reason: String,
    },
    /// The connection failed underneath (the driver said so): nothing more can be sent.
    Lost(String),
}

/// When an unacknowledged delivery is sent again, and when the device is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the first retransmission.
    pub initial: Duration,
    /// Longest wait between two transmissions; each wait doubles up to this.
    pub max: Duration,
    /// Transmissions of one delivery, the first included, after which the device is given up.
    pub budget: u32,
}

impl Default for RetryPolicy {
    /// 2 s, doubling up to 16 s, 6 transmissions: a device is given up 62 s after the first
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

    /// How long after the first transmission a delivery that is never acknowledged is given up
    /// (at most `Duration::MAX`).
    pub fn give_up_after(&self) -> Duration {
        // The waits stop doubling by the 32nd transmission: those are added one by one, the
        // rest (up to 4 billion of them) multiplied.
        let doubling = self.budget.min(32);
        let first = (1..=doubling).fold(Duration::ZERO, |sum, n| {
            sum.saturating_add(self.wait_after(n))
        });
        let rest = self.budget - doubling;
        first.saturating_add(self.wait_after(doubling + 1).saturating_mul(rest))
    }
}

/// The longest wait a machine sets a deadline for: a configured timeout longer than this (a
/// century) comes when this does, and never panics the clock's arithmetic.
const LONGEST_WAIT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// When a wait of `wait` from `now` ends.
fn deadline(now: Instant, wait: Duration) -> Instant {
    now + wait.min(LONGEST_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_double_up_to_the_maximum() {
        let p = RetryPolicy {
            initial: 100 * MS,
            max: 400 * MS,
            budget: 4,
        };
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
        assert_eq!(huge.give_up_after(), Duration::MAX, "no overflow");
    }

    /// The longest times a host's configuration lets through (TOML's largest integer) made
    /// the session panic at its first deadline, and `give_up_after` at its sum. The `config`
    /// fuzz target checks that a valid configuration gives a working session; these inputs are
    /// in its corpus (`fuzz/corpus/config/crash-*`).
    #[test]
    fn the_longest_configurable_times_neither_overflow_nor_take_long() {
        let longest = RetryPolicy {
            initial: Duration::from_millis(i64::MAX as u64),
            max: Duration::from_millis(i64::MAX as u64),
            budget: u32::MAX,
        };
        assert_eq!(longest.give_up_after(), Duration::MAX);
        let many = RetryPolicy {
            initial: MS,
            max: 4 * MS,
            budget: u32::MAX,
        };
        let waits = 1 + 2 + 4 * (u64::from(u32::MAX) - 2);
        assert_eq!(many.give_up_after(), Duration::from_millis(waits));
        let now = Instant::now();
        assert_eq!(deadline(now, Duration::MAX), now + LONGEST_WAIT);
        assert_eq!(deadline(now, 5 * MS), now + 5 * MS);
    }
}
