//! End-to-end encryption core of iim: sans-IO, no sockets, no clock of its own (times come in as
//! arguments), no cryptographic primitive of its own.
//!
//! # Keys
//!
//! Every device has a [`DeviceIdentity`]: an Ed25519 signature key pair, which is also its MLS
//! credential (a `BasicCredential` whose identity is `"<user>/<device>"`), and an X25519 HPKE key
//! pair for 1:1 messages. Its public half, the [`DeviceCard`], is self-signed and published
//! through the host's key directory. Everything uses one ciphersuite,
//! `MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519` ([`CIPHERSUITE`]), and the primitives of
//! openmls's RustCrypto provider (HPKE RFC 9180, Ed25519, SHA-256).
//!
//! # 1:1 messages ([`seal`], [`open`])
//!
//! An envelope is `MAGIC_DIRECT ‖ content ‖ Ed25519 signature`. The content names the sender's
//! user and device and holds one HPKE (base mode, single shot) copy of the message per recipient
//! device: the addressed users' devices and the sender's own devices, whose cards the caller
//! passes. Bound where:
//!
//! - the HPKE `info` of a copy binds a fixed label, the sender's user/device and that copy's
//!   recipient user/device: a copy moved to another envelope, sender or recipient does not open;
//! - the sealed plaintext carries the addressed users (`to_users`) and a random 128-bit nonce:
//!   a client checks that it (or its own user, for a sent message) is addressed and keeps the
//!   nonces it has seen, so a body the host replays or redirects is noticed;
//! - the signature, by the sender's device key, covers the magic and the whole content (every
//!   copy): a single changed bit anywhere makes [`open`] fail.
//!
//! The signed payloads all start with an 8-byte magic beginning with `i` (0x69), which no MLS
//! `SignWithLabel` content (a varint label length below 64, then `"MLS 1.0 "`) can start with,
//! so the one Ed25519 key serves both without one signature passing for the other.
//!
//! # Groups ([`Device`])
//!
//! Groups are MLS groups (RFC 9420, openmls) whose id is the iim group name. A [`Device`] holds
//! the identity, the secrets of its unused key packages and every group, and saves all of it to
//! bytes. Only one device per group (its creator's) commits, and the host delivers a group's
//! messages to every member in one order, so concurrent commits never need resolving; a commit
//! is merged by its author at once. Five past epochs are kept, so an application message sent
//! just before a commit still opens after it.
//!
//! # What a host can and cannot do
//!
//! The host carries opaque bodies. It can withhold, delay, reorder (1:1) or replay them; it
//! cannot read them, nor alter, forge or redirect them without the receiving client noticing
//! (an error from [`open`] or [`Device::process`], or a nonce seen before).
//!
//! The key directory is trusted on first use: a host that hands out its own card for a device
//! could read what is sealed to that card. [`DeviceCard::fingerprint`] exists so users can
//! compare keys out of band, and [`Device::add`] checks each key package against the card the
//! client accepted, so a checked card covers groups too.
//!
//! # Limits
//!
//! - 1:1 copies are sealed to the recipient's static HPKE key: there is no per-message forward
//!   secrecy. Whoever steals a device's HPKE secret opens every 1:1 copy ever sealed to it (that
//!   they recorded). MLS gives groups forward secrecy and post-compromise security per epoch.
//! - A device whose card was not passed at seal time (added later, or revoked) gets
//!   [`Error::NotForThisDevice`]; a member added to a group cannot read what was sent before.
//! - Metadata is not hidden: the host sees who sends to which devices, when and how much.
//! - openmls reads the system clock for key package lifetimes; nothing else here does.

mod direct;
mod group;
mod identity;

pub use direct::{Opened, is_e2e, open, peek_sender, seal};
pub use group::{Device, GroupMessage, Processed};
pub use identity::{DeviceCard, DeviceIdentity, valid_name};

use openmls::prelude::Ciphersuite;

/// The one MLS ciphersuite, whose HPKE and signature scheme 1:1 envelopes use as well.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// The first bytes of a 1:1 envelope.
pub const MAGIC_DIRECT: &[u8; 8] = b"iim-e2e\x01";
/// The first bytes of a group (MLS) body: commit, welcome or application message.
pub const MAGIC_MLS: &[u8; 8] = b"iim-mls\x01";

/// At most this many recipient devices (copies) in a 1:1 envelope.
pub const MAX_COPIES: usize = 256;
/// At most this many addressed users in a 1:1 envelope.
pub const MAX_TO_USERS: usize = 256;
/// At most this many bytes of plaintext in a 1:1 envelope or a group message.
pub const MAX_PLAINTEXT: usize = 1 << 20;
/// At most this many bytes in a user or device name.
pub const MAX_NAME: usize = 64;
/// At most this many bytes in a group name.
pub const MAX_GROUP_NAME: usize = 128;
/// How many past epochs' secrets a group member keeps.
pub const MAX_PAST_EPOCHS: usize = 5;

/// What went wrong. Nothing here says more than needed about why a body did not open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes do not start with the expected magic (not an e2e body, or another kind).
    #[error("not an iim e2e body of this kind")]
    BadMagic,
    /// The bytes are not a well-formed value of their kind (truncated, trailing bytes, ...).
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A size limit was exceeded.
    #[error("too large: {0}")]
    TooLarge(&'static str),
    /// A user or device name is not 1 to 64 bytes of `a-z 0-9 . _ -`, or a group name is not
    /// 1 to 128 bytes without control characters.
    #[error("invalid name {0:?}")]
    InvalidName(String),
    /// A signature does not verify (a card's self-signature or an envelope's).
    #[error("bad signature")]
    BadSignature,
    /// The envelope's sender is not the one the given card is for.
    #[error("the envelope is from {claimed}, not from the card's {card}")]
    WrongSender {
        /// `user/device` the envelope names.
        claimed: String,
        /// `user/device` of the card passed.
        card: String,
    },
    /// The envelope holds no copy for this device (added after it was sent, or revoked).
    #[error("no copy for this device")]
    NotForThisDevice,
    /// This device's copy does not open (altered, or sealed for another key or sender).
    #[error("the copy does not open")]
    DecryptFailed,
    /// A 1:1 message whose addressed users include neither this device's user nor the sender's.
    #[error("the message is not addressed to this user")]
    NotAddressed,
    /// A recipient card given to [`seal`] is for a user not addressed, or is given twice.
    #[error("bad recipient {0}")]
    BadRecipient(String),
    /// [`seal`] was given no recipient card.
    #[error("no recipient")]
    NoRecipients,
    /// A key package does not match the card it was given with, or does not verify.
    #[error("key package refused: {0}")]
    BadKeyPackage(String),
    /// This device has no group of that name.
    #[error("no group {0:?}")]
    UnknownGroup(String),
    /// This device already has a group of that name.
    #[error("group {0:?} exists already")]
    GroupExists(String),
    /// No member of the group has that identity.
    #[error("no member {0:?}")]
    UnknownMember(String),
    /// A message openmls refused (wrong epoch, bad signature, not a member any more, ...).
    #[error("mls: {0}")]
    Mls(String),
    /// A kind of MLS message this scheme does not use (a proposal, a group info, ...).
    #[error("unexpected mls message: {0}")]
    Unexpected(&'static str),
    /// The crypto provider failed (its random numbers, keys or storage).
    #[error("crypto provider: {0}")]
    Crypto(String),
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An e2e body as it arrives, told apart by its magic and parsed, not yet verified.
#[derive(Debug)]
pub enum E2eBody {
    /// A 1:1 envelope: its sender's `(user, device)`, to fetch its card for [`open`].
    Direct {
        /// The sender's user.
        user: String,
        /// The sender's device.
        device: String,
    },
    /// A group (MLS) message, for [`Device::process`].
    Mls(GroupMessage),
}

impl E2eBody {
    /// Parses an e2e body of either kind; [`Error::BadMagic`] for a plain body.
    pub fn from_bytes(body: &[u8]) -> Result<Self> {
        if body.starts_with(MAGIC_DIRECT) {
            let (user, device) = peek_sender(body)?;
            Ok(Self::Direct { user, device })
        } else if body.starts_with(MAGIC_MLS) {
            GroupMessage::from_bytes(body).map(Self::Mls)
        } else {
            Err(Error::BadMagic)
        }
    }
}

/// Runs every parser of the crate on `bytes`, keyless: the entry of the fuzz target. It must
/// never panic, whatever the bytes; every parser returns an error instead.
pub fn parse_any(bytes: &[u8]) {
    let _ = E2eBody::from_bytes(bytes);
    let _ = peek_sender(bytes);
    let _ = direct::Envelope::parse(bytes);
    let _ = GroupMessage::from_bytes(bytes);
    let _ = DeviceCard::from_bytes(bytes);
    let _ = DeviceIdentity::from_bytes(bytes);
    let _ = Device::from_bytes(bytes);
    // The framing is skipped by the fuzzer's mutations as often as not: try the raw formats too.
    let mut framed = MAGIC_MLS.to_vec();
    framed.extend_from_slice(bytes);
    let _ = GroupMessage::from_bytes(&framed);
}

/// postcard of `value`; serializing our own plain structs to a `Vec` cannot fail, but the
/// error is kept rather than unwrapped.
fn encode<T: serde::Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|_| Error::Malformed(what))
}

/// Parses exactly one postcard value from `bytes`: trailing bytes are an error.
fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8], what: &'static str) -> Result<T> {
    match postcard::take_from_bytes(bytes) {
        Ok((value, [])) => Ok(value),
        _ => Err(Error::Malformed(what)),
    }
}

/// `bytes` without its 8-byte `magic`, or [`Error::BadMagic`].
fn strip_magic<'a>(bytes: &'a [u8], magic: &[u8; 8]) -> Result<&'a [u8]> {
    bytes.strip_prefix(magic.as_slice()).ok_or(Error::BadMagic)
}

#[cfg(test)]
mod tests;
