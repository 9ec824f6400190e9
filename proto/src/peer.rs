//! The frames between the hosts of a network and their exchange (DESIGN.md §2–3).
//!
//! Each host keeps one QUIC connection to the exchange, ALPN [`PEER_ALPN`], with one
//! bidirectional stream that the host opens, framed by [`crate::codec`] like a client's. The
//! host sends [`HostFrame`]s, the exchange [`ExchangeFrame`]s. Both directions carry relay
//! envelopes (seed 000's `905`, host to exchange, and `906`, exchange to host) numbered per
//! direction and per host; each side acknowledges the highest number it has made durable, and
//! at every join the two sides tell each other where they are, so that what was sent and not
//! acknowledged is sent again and nothing is taken twice.

use crate::frame::Message;
use crate::name::{Address, UserId};
use serde::{Deserialize, Serialize};

/// The ALPN protocol name of the connection between a host and its exchange.
pub const PEER_ALPN: &[u8] = b"iim-peer/1";

/// The version of the peer protocol, announced in [`HostFrame::Join`].
pub const PEER_VERSION: u16 = 1;

/// Bits of a message id below its host's number: a host numbers at most 2^42 (4.4 × 10^12)
/// messages.
pub const ID_BITS: u32 = 42;

/// The highest host number: with [`ID_BITS`], every message id stays below 2^53, so it fits a
/// JSON number read by JavaScript (`docs/plugins.md`).
pub const MAX_HOST_NUMBER: u16 = (1 << (53 - ID_BITS)) - 1;

/// A host as the exchange's registry lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Its server id.
    pub id: String,
    /// The number the exchange gave it when it first joined (1 to [`MAX_HOST_NUMBER`]): the
    /// bits above [`ID_BITS`] of the ids of the messages it numbers, so that message ids are
    /// unique in the network.
    pub number: u16,
    /// Its address for clients, where the users whose home it is are redirected.
    pub addr: String,
    /// Whether it is connected to the exchange now.
    pub up: bool,
}

/// The users of a relay envelope who live on one server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRow {
    /// The server's id.
    pub server: String,
    /// Its users, each once; or a group whose home the server is, alone: the message is for
    /// the group (its plugin there passes it on to the members).
    pub users: Vec<Address>,
}

/// A message on its way between hosts: the message once, and the rows of the servers it goes
/// to (seed 000's server row-set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The message, as its origin host accepted or sent it (its id is unique in the network).
    pub message: Message,
    /// When it expires, in ms since the Unix epoch, if its sender chose a time to live.
    pub expires_at: Option<u64>,
    /// One row per target server: every target server in a `905`, the receiving host's own
    /// row alone in a `906`.
    pub rows: Vec<RelayRow>,
}

/// A frame a host sends to its exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostFrame {
    /// First frame: who the host is. Answered by [`ExchangeFrame::Joined`] or, refused, by
    /// [`ExchangeFrame::Error`] and the end of the connection.
    Join {
        /// [`PEER_VERSION`].
        version: u16,
        /// The host's server id.
        server: String,
        /// Its address for clients.
        addr: String,
        /// The network's shared secret.
        secret: String,
        /// A secret of this host's own, made and kept before its first join: the exchange
        /// records it then, and a server id belongs to the host that shows it.
        credential: String,
        /// The directory version the host has every entry up to; the exchange sends the
        /// entries after it.
        directory_since: u64,
        /// The highest `906` number the host has made durable; the exchange sends from the
        /// next one.
        relayed_in: u64,
    },
    /// Registration: asks that `user` be a user of this host. Answered by
    /// [`ExchangeFrame::Claimed`].
    Claim {
        /// Request id.
        req: u64,
        /// The user name.
        user: Address,
    },
    /// Asks for the home of users this host does not know. Answered by
    /// [`ExchangeFrame::Found`].
    Lookup {
        /// Request id.
        req: u64,
        /// The users.
        users: Vec<Address>,
    },
    /// Seed 000's `905`: a message for users of other servers, once, with their rows.
    Relay {
        /// Its number in this host's relay outbox: one more than the one before.
        seq: u64,
        /// The envelope.
        envelope: Envelope,
    },
    /// Every `906` up to `seq` is durable on this host.
    Ack {
        /// The highest.
        seq: u64,
    },
    /// How many devices of some of this host's users are online now.
    Presence {
        /// (user, devices online).
        entries: Vec<(UserId, u32)>,
    },
    /// Asks host `server`, through the exchange, for up to [`FILE_PART`] bytes of file
    /// `sha256` from `offset` (a user of this host may read it, and `server` numbered the
    /// message that named it). Answered by [`ExchangeFrame::FilePart`] with the same `req`.
    FileGet {
        /// Request id.
        req: u64,
        /// The host that has the file.
        server: String,
        /// The file.
        sha256: [u8; 32],
        /// Where to start.
        offset: u64,
    },
    /// This host's answer to an [`ExchangeFrame::FileGet`] of host `to`.
    FilePart {
        /// The request id `to` gave.
        req: u64,
        /// The host that asked.
        to: String,
        /// The bytes, or why not.
        part: FilePart,
    },
    /// The account of `user`, a user of this host, was deleted: its name is free again in
    /// the network. Answered by [`ExchangeFrame::Released`]; a name whose home is another host
    /// is not released. (Appended last: the frames before keep their numbers on the wire.)
    Release {
        /// Request id.
        req: u64,
        /// The user name.
        user: UserId,
    },
}

/// Most bytes of a file one [`FilePart`] carries.
pub const FILE_PART: u32 = 256 * 1024;

/// Part of a file, for a host that fetches it from another (see [`HostFrame::FileGet`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilePart {
    /// The bytes from `offset`: at most [`FILE_PART`], fewer only at the end of the file.
    Data {
        /// The whole file's size.
        size: u64,
        /// Its name, as uploaded.
        name: String,
        /// Its media type, as uploaded.
        media_type: String,
        /// Where these bytes start.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Not sent.
    Refused {
        /// Why, for programs: `not_found` (the host has no such file it may share),
        /// `unavailable` (that host is not connected to the exchange).
        code: crate::frame::ErrorCode,
        /// Why, for people.
        message: String,
    },
}

/// A frame the exchange sends to a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExchangeFrame {
    /// The host is registered and connected.
    Joined {
        /// Its number (see [`ServerInfo::number`]).
        number: u16,
        /// The registry: every server of the network.
        servers: Vec<ServerInfo>,
        /// The highest `905` number from this host the exchange has made durable; the host
        /// sends from the next one.
        relayed_out: u64,
    },
    /// Directory entries (user → home server), in version order: after `Joined` the ones the
    /// host lacks, then each new one as users register anywhere. An empty home: the name was
    /// released (its account deleted; [`HostFrame::Release`]), and no host has it now.
    Directory {
        /// The version of the last entry.
        version: u64,
        /// The entries.
        entries: Vec<(Address, String)>,
    },
    /// The registry changed (a server joined, moved or went up or down).
    Servers {
        /// Every server of the network.
        servers: Vec<ServerInfo>,
    },
    /// Answer to [`HostFrame::Claim`]: the home of the user, which is the claiming host if the
    /// name was free or already its own.
    Claimed {
        /// The request.
        req: u64,
        /// The user's home server.
        home: String,
    },
    /// Answer to [`HostFrame::Lookup`]: the users that exist, with their homes.
    Found {
        /// The request.
        req: u64,
        /// The users found.
        homes: Vec<(Address, String)>,
    },
    /// Seed 000's `906`: a message for users of the receiving host.
    Relay {
        /// Its number in the exchange's outbox for this host: one more than the one before.
        seq: u64,
        /// The envelope, with the receiving host's row alone.
        envelope: Envelope,
    },
    /// Every `905` up to `seq` from this host is durable on the exchange.
    Ack {
        /// The highest.
        seq: u64,
    },
    /// Presence of users of other hosts: how many devices each has online.
    Presence {
        /// (user, devices online).
        entries: Vec<(UserId, u32)>,
    },
    /// The join was refused, or the exchange is ending the connection.
    Error {
        /// What went wrong, for programs.
        code: crate::frame::ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
    /// Host `by` asks this host for part of a file ([`HostFrame::FileGet`]); answered by
    /// [`HostFrame::FilePart`] naming `by` and `req`.
    FileGet {
        /// The request id `by` gave.
        req: u64,
        /// The host that asks.
        by: String,
        /// The file.
        sha256: [u8; 32],
        /// Where to start.
        offset: u64,
    },
    /// The answer to this host's [`HostFrame::FileGet`] `req`.
    FilePart {
        /// The request.
        req: u64,
        /// The bytes, or why not.
        part: FilePart,
    },
    /// Answer to [`HostFrame::Release`], as [`ExchangeFrame::Claimed`] answers a claim: the
    /// home of the name afterwards. (Appended last: the frames before keep their numbers on
    /// the wire.)
    Released {
        /// The request.
        req: u64,
        /// `None`: the name is free, released now or nobody's before. `Some(home)`: the
        /// release was refused, the name is another host's, `home`.
        home: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first byte of a frame's postcard encoding is its variant's number.
    fn variant<T: Serialize>(frame: &T) -> u8 {
        postcard::to_stdvec(frame).expect("encode")[0]
    }

    #[test]
    fn release_frames_come_after_the_others_on_the_wire() {
        let release = HostFrame::Release {
            req: 7,
            user: UserId::new("dora").expect("valid"),
        };
        let released = ExchangeFrame::Released {
            req: 7,
            home: Some("h2".into()),
        };
        assert_eq!(variant(&HostFrame::Ack { seq: 1 }), 4, "unchanged");
        assert_eq!(variant(&release), 8);
        assert_eq!(variant(&ExchangeFrame::Ack { seq: 1 }), 6, "unchanged");
        assert_eq!(variant(&released), 11);
        let bytes = postcard::to_stdvec(&release).expect("encode");
        assert_eq!(
            postcard::from_bytes::<HostFrame>(&bytes).expect("decode"),
            release
        );
        let bytes = postcard::to_stdvec(&released).expect("encode");
        assert_eq!(
            postcard::from_bytes::<ExchangeFrame>(&bytes).expect("decode"),
            released
        );
    }
}
