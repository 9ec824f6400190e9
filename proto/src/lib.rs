//! The iim wire protocol.
//!
//! This crate is the one place that knows the wire format: the frames a client and a host
//! exchange ([`frame`]), how they are put on a QUIC stream ([`codec`]), the rules for the
//! names that appear in them ([`name`]), the frames between hosts and their exchange
//! ([`peer`]) and the bodies of the messages the default plugins define ([`body`]). It also
//! holds the protocol's logic as sans-IO machines: a connection's two ends ([`session`]) and
//! the hop between a host and its exchange ([`relay`]). No sockets, no clock, no runtime: the
//! host and the client drive it.
//!
//! The full description, with every frame, every error code and the order of frames for each
//! operation, is `docs/protocol.md` at the root of the repository.

pub mod body;
pub mod codec;
pub mod file;
pub mod frame;
pub mod name;
pub mod peer;
pub mod rate;
pub mod relay;
pub mod session;

pub use codec::{CodecError, FrameDecoder, encode_deliver, encode_frame};
pub use frame::*;
pub use name::{Address, DeviceId, GroupId, NameError, UserId, stable_hash};
pub use rate::TokenBucket;
pub use session::{Refusal, RetryPolicy};

/// The ALPN protocol name negotiated in the TLS handshake of every iim QUIC connection.
pub const ALPN: &[u8] = b"iim/1";

/// The protocol version a peer announces in [`ClientFrame::Hello`] / [`ServerFrame::Welcome`].
///
/// A host accepts exactly the versions in [`SUPPORTED_VERSIONS`].
pub const PROTOCOL_VERSION: u16 = 1;

/// The protocol versions this build of the protocol can speak.
pub const SUPPORTED_VERSIONS: &[u16] = &[PROTOCOL_VERSION];

/// Default largest frame body, in bytes, either side accepts (the length prefix excluded).
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024;

/// Default largest message body, in bytes, a host accepts in a submission.
pub const DEFAULT_MAX_BODY: u32 = 32 * 1024;

/// Most recipients one submission may name.
pub const MAX_TARGETS: usize = 256;

/// Most message ids a [`ServerFrame::Backlog`] summary lists (about 10 KB at most).
pub const BACKLOG_IDS: usize = 1000;
