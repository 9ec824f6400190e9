//! The frames between a host and its exchange, as each reads them off the link's stream:
//! `HostFrame`s (what the exchange receives) and `ExchangeFrame`s (what a host receives).
//!
//! Input: a byte choosing the direction and the limits, a byte choosing how the stream is cut
//! into pieces, then the stream. The limits are the link's (a small first frame, the `Join`,
//! then the link's own limit: `iim-host`'s `peer::read_frames`) or small ones that most frames
//! cross. Checked (`iim_fuzz::check_stream`): decoding is the same whatever the pieces; an
//! error is an error (never a panic) and is final; the limits hold, the raised one only after
//! the first frame; every frame decoded encodes again within its limit and decodes to itself.

#![no_main]

use iim_fuzz::{Limits, check_stream, header};
use iim_host::peer::{JOIN_MAX_FRAME, PEER_MAX_FRAME};
use iim_proto::peer::{ExchangeFrame, HostFrame};
use libfuzzer_sys::fuzz_target;

/// The link's limits: a `Join` first, then anything.
const LINK: Limits = Limits {
    first: JOIN_MAX_FRAME,
    rest: PEER_MAX_FRAME,
};

fuzz_target!(|data: &[u8]| {
    let ([kind, chunking], stream) = header::<2>(data);
    let limits = match (kind >> 1) % 4 {
        0 => LINK,
        1 => Limits::one(1024),
        2 => Limits {
            first: 64,
            rest: 4096,
        },
        _ => Limits::one(8),
    };
    if kind % 2 == 0 {
        check_stream::<HostFrame>(stream, limits, chunking);
    } else {
        check_stream::<ExchangeFrame>(stream, limits, chunking);
    }
});
