//! The process's open-file limit (`RLIMIT_NOFILE`), raised at start from its soft limit to its
//! hard one.
//!
//! A client connection does not take a descriptor of its own: every QUIC connection goes
//! through the one UDP socket the host listens on. What does take descriptors is the store
//! (sled's files and the message log's segments), the plugins and their cache, the metrics
//! endpoint's TCP connections, and every file upload or download in progress (its blob file;
//! up to `limits.file_streams` on one connection). Many systems start a process with a soft
//! limit of 1,024 under a much higher hard limit; the soft limit is the process's own to raise,
//! so the host raises it rather than fail at the 1,025th file some busy day. Where even the
//! hard limit is below what `limits.max_connections` sessions may need, the host says so at
//! start, with both numbers, so that the operator raises it (`ulimit -Hn`, systemd's
//! `LimitNOFILE=`) before the day it matters.

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, rlim_t, setrlimit};

/// Descriptors kept for the host's own files and sockets, whatever the number of sessions: the
/// store, the plugins and their cache, the listening sockets, the metrics endpoint's clients.
const RESERVED: rlim_t = 256;

/// Raises the soft open-file limit to the hard limit, logging the change (at info) or why it
/// could not be made, and warns if the limit is then below what `max_connections` sessions
/// may need ([`too_low`]). Never fails: a host with a low limit still serves.
pub fn raise(max_connections: usize) {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit (RLIMIT_NOFILE)");
            return;
        }
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::info!(
                    from = soft,
                    to = hard,
                    "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
                );
                hard
            }
            // macOS refuses an unlimited soft limit for files; the soft one stays.
            Err(e) => {
                tracing::warn!(
                    soft,
                    hard,
                    error = %e,
                    "cannot raise the open-file limit (RLIMIT_NOFILE) to its hard limit"
                );
                soft
            }
        }
    } else {
        tracing::info!(
            limit = soft,
            "the open-file limit (RLIMIT_NOFILE) is at its hard limit already"
        );
        soft
    };
    if let Some(needed) = too_low(limit, max_connections) {
        tracing::warn!(
            limit,
            needed,
            max_connections,
            "the open-file limit (RLIMIT_NOFILE) is too low for limits.max_connections \
             sessions each transferring a file: raise the hard limit (ulimit -Hn, systemd's \
             LimitNOFILE=) to at least the number needed"
        );
    }
}

/// The descriptors `max_connections` sessions may need — [`RESERVED`], and one file transfer
/// in progress per session — if the open-file limit `limit` is below it.
fn too_low(limit: rlim_t, max_connections: usize) -> Option<rlim_t> {
    let sessions = rlim_t::try_from(max_connections).unwrap_or(rlim_t::MAX);
    let needed = RESERVED.saturating_add(sessions);
    (limit != RLIM_INFINITY && limit < needed).then_some(needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_below_the_sessions_and_the_reserve_is_too_low() {
        assert_eq!(too_low(1024, 10_000), Some(10_256));
        assert_eq!(too_low(10_255, 10_000), Some(10_256));
        assert_eq!(too_low(10_256, 10_000), None);
        assert_eq!(too_low(RLIM_INFINITY, usize::MAX), None);
    }
}
