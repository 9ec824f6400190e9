//! The frames a client and a host exchange, and the values inside them.
//!
//! Every frame travels on the connection's one bidirectional stream, encoded by [`crate::codec`].
//! Requests carry a [`RequestId`] chosen by the client; the host's answer carries the same id.

use crate::name::{Address, DeviceId, UserId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A client-chosen number that pairs a request with its answer on one connection.
pub type RequestId = u64;

/// A message's id, assigned by the host when it accepts the message.
///
/// Ids grow: a message accepted after another has a larger id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a message is; the host hands each kind to whatever handles it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MessageKind {
    /// A direct chat message between users.
    Chat,
    /// A receipt (delivered, read) about another message.
    Receipt,
    /// A kind defined by a plugin, named by it.
    Custom(String),
    /// A presence notification or snapshot. (Last so that adding it kept the wire indices of
    /// the kinds before it.)
    Presence,
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageKind::Chat => f.write_str("chat"),
            MessageKind::Receipt => f.write_str("receipt"),
            MessageKind::Custom(name) => f.write_str(name),
            MessageKind::Presence => f.write_str("presence"),
        }
    }
}

/// The inverse of `Display`: a built-in kind's name is that kind, any other name a custom
/// kind (whether a plugin handles it is the host's to say). So a custom kind cannot be named
/// `chat`, `receipt` or `presence`: its name would read as the built-in one everywhere.
/// Longest name of a custom message kind, in bytes.
pub const MAX_KIND: usize = 64;

/// A custom kind whose name is empty or longer than [`MAX_KIND`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a custom kind is 1 to {MAX_KIND} bytes")]
pub struct KindError;

impl MessageKind {
    /// Checks a custom kind's name: 1 to [`MAX_KIND`] bytes. For clients' submissions and
    /// plugins' sends alike.
    pub fn check(&self) -> Result<(), KindError> {
        match self {
            MessageKind::Custom(name) if name.is_empty() || name.len() > MAX_KIND => Err(KindError),
            _ => Ok(()),
        }
    }
}

impl std::str::FromStr for MessageKind {
    type Err = std::convert::Infallible;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Ok(match name {
            "chat" => MessageKind::Chat,
            "receipt" => MessageKind::Receipt,
            "presence" => MessageKind::Presence,
            custom => MessageKind::Custom(custom.to_owned()),
        })
    }
}

/// A message as the host stores and delivers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The host's id for it.
    pub id: MessageId,
    /// What it is.
    pub kind: MessageKind,
    /// The user who sent it; set by the host from the session, never by the client.
    pub from: UserId,
    /// The device it was sent from.
    pub from_device: DeviceId,
    /// Whom it was addressed to: users, or one group.
    pub to: Vec<Address>,
    /// The payload; UTF-8 text for chat.
    pub body: Vec<u8>,
    /// When the host accepted it, in milliseconds since the Unix epoch.
    pub sent_at: u64,
}

/// The kind of the messages that manage groups and tell members what changed in them
/// (`body::group`).
pub const GROUP_KIND: &str = "group";

/// The group `to` addresses, if it names one: a message names users, or one group.
pub fn group_of(to: &[Address]) -> Option<&crate::name::GroupId> {
    match to {
        [Address::Group(group)] => Some(group),
        _ => None,
    }
}

impl Message {
    /// The group the message is addressed to, if it is.
    pub fn group(&self) -> Option<&crate::name::GroupId> {
        group_of(&self.to)
    }

    /// Checks that the message, with the largest id, position and time, fits in a `Deliver`
    /// frame of `max_frame` bytes: otherwise no device could ever receive it.
    pub fn check_deliverable(&self, max_frame: u32) -> Result<(), crate::CodecError> {
        let probe = Message {
            id: MessageId(u64::MAX),
            sent_at: u64::MAX,
            ..self.clone()
        };
        crate::encode_deliver(u64::MAX, &probe, max_frame).map(drop)
    }
}

/// Whether an authenticated connection takes deliveries for its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionMode {
    /// The connection is the device's delivery session: it receives the offline backlog, then
    /// every new message. A second delivery session of the same device replaces the first.
    Receive,
    /// The connection only sends and manages the account; nothing is delivered to it and it
    /// leaves the device's delivery session alone. Command-line tools use this.
    SendOnly,
    /// As [`SessionMode::Receive`], but the backlog comes in pages the device asks for: the
    /// host first sends [`ServerFrame::Backlog`] (how much is waiting), then a page for each
    /// [`ClientFrame::Fetch`], then [`ServerFrame::Synced`] after the last page, then every
    /// new message. For a device on a slow or metered link with much waiting.
    Paged,
}

/// The two kinds of relation a user keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RelationKind {
    /// Friends.
    Friend,
    /// Colleagues.
    Colleague,
}

impl fmt::Display for RelationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RelationKind::Friend => "friend",
            RelationKind::Colleague => "colleague",
        })
    }
}

/// What to do with a relation list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelationOp {
    /// Add a user to the list. Adding one already there succeeds and changes nothing.
    Add(UserId),
    /// Remove a user from the list. Removing one not there succeeds and changes nothing.
    Remove(UserId),
    /// Answer with the list.
    List,
}

/// What a user does with their own account ([`ClientFrame::Account`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountOp {
    /// Replace the password. Every other device's token is revoked and its sessions end: a
    /// password is changed most often because it may be known to someone else, who may have
    /// logged a device in with it. The device that asks keeps its token. Answered by
    /// [`ServerFrame::Ok`].
    ChangePassword {
        /// The password now.
        old: String,
        /// The new one; the rules of registration apply.
        new: String,
    },
    /// List the account's devices. Answered by [`ServerFrame::Devices`].
    Devices,
    /// Revoke a device: its token is revoked, its sessions end at once, it receives nothing
    /// more. A device may revoke itself. Answered by [`ServerFrame::Ok`].
    Revoke(DeviceId),
    /// Delete the account with what the host keeps of it (devices, inbox, relations, files,
    /// plugins' data; `docs/protocol.md` "Accounts" says what else, and what not yet). Answered by
    /// [`ServerFrame::Ok`]; then every session of the account ends, this one included.
    Delete {
        /// The password, asked again: deleting cannot be undone.
        password: String,
    },
}

/// One of a user's devices, as [`ServerFrame::Devices`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Its name.
    pub device: DeviceId,
    /// When it last logged in with its password, in ms since the Unix epoch (0 if a host of an
    /// earlier version issued its token).
    pub logged_in_at: u64,
    /// When it was last active (a session opened or ended), in ms since the Unix epoch.
    pub last_active_at: u64,
    /// How many sessions it has open now.
    pub sessions: u32,
}

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// First frame of every connection: the protocol version the client speaks.
    Hello {
        /// Protocol version, see [`crate::PROTOCOL_VERSION`].
        version: u16,
        /// Free text naming the client software, for the host's log.
        agent: String,
    },
    /// Create an account. Answered by [`ServerFrame::Ok`].
    Register {
        /// Request id.
        req: RequestId,
        /// The new user's name.
        user: UserId,
        /// The password; the host keeps only an argon2id hash of it.
        password: String,
    },
    /// Check a password, issue a token for the device and authenticate the connection as that
    /// device. Answered by [`ServerFrame::LoggedIn`].
    Login {
        /// Request id.
        req: RequestId,
        /// The user.
        user: UserId,
        /// The password.
        password: String,
        /// The device logging in; a new name adds a device.
        device: DeviceId,
        /// Whether this connection takes the device's deliveries.
        mode: SessionMode,
    },
    /// Authenticate the connection with a token from an earlier [`ClientFrame::Login`].
    /// Answered by [`ServerFrame::Ok`].
    Authenticate {
        /// Request id.
        req: RequestId,
        /// The user.
        user: UserId,
        /// The device the token was issued to.
        device: DeviceId,
        /// The token.
        token: String,
        /// Whether this connection takes the device's deliveries.
        mode: SessionMode,
    },
    /// Revoke this device's token and end the session. Answered by [`ServerFrame::Ok`].
    Logout {
        /// Request id.
        req: RequestId,
    },
    /// Change or read one of the user's relation lists. Answered by [`ServerFrame::Ok`]
    /// (add, remove) or [`ServerFrame::Users`] (list).
    Relation {
        /// Request id.
        req: RequestId,
        /// Which list.
        kind: RelationKind,
        /// What to do.
        op: RelationOp,
    },
    /// Submit a message. Answered by [`ServerFrame::Accepted`] once it is durable.
    Submit {
        /// Request id.
        req: RequestId,
        /// The client's idempotency id: a second submission with the same `(user, device,
        /// client_id)` is answered with the first one's id and is not delivered again.
        client_id: u64,
        /// What it is.
        kind: MessageKind,
        /// The recipients: users, or one group.
        to: Vec<Address>,
        /// The payload.
        body: Vec<u8>,
    },
    /// The device has every delivery up to and including `seq` that was sent to it on this
    /// connection, and need not be sent them again. Not answered.
    Ack {
        /// The inbox position of the delivery, from [`ServerFrame::Deliver`].
        seq: u64,
    },
    /// In a [`SessionMode::Paged`] session, asks for the next page of the backlog: up to
    /// `max` deliveries (fewer if that many are already waiting for acknowledgement).
    /// Answered by the deliveries, then [`ServerFrame::Page`].
    Fetch {
        /// Request id.
        req: RequestId,
        /// The most deliveries to send; at least 1.
        max: u32,
    },
    /// [`ClientFrame::Submit`] with a time to live: the message leaves the inboxes of the
    /// recipients who have not got it `ttl_secs` after it was accepted, and the sender is told
    /// (an `expired` receipt, see `docs/plugins.md`). Answered by [`ServerFrame::Accepted`].
    SubmitExpiring {
        /// Request id.
        req: RequestId,
        /// The client's idempotency id, as for [`ClientFrame::Submit`].
        client_id: u64,
        /// What it is.
        kind: MessageKind,
        /// The recipients: users, or one group.
        to: Vec<Address>,
        /// The payload.
        body: Vec<u8>,
        /// Seconds from acceptance until it expires; at least 1.
        ttl_secs: u32,
    },
    /// Change, list, revoke or delete what the account holds. Answered as each
    /// [`AccountOp`] says.
    Account {
        /// Request id.
        req: RequestId,
        /// What to do.
        op: AccountOp,
    },
}

/// A frame sent by a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// Answer to [`ClientFrame::Hello`]: the host speaks this version and these limits.
    Welcome {
        /// The version both sides now speak.
        version: u16,
        /// Largest frame body the host accepts, in bytes.
        max_frame: u32,
        /// Largest message body the host accepts, in bytes.
        max_body: u32,
        /// The host's server id.
        server: String,
    },
    /// A request succeeded and has nothing more to say.
    Ok {
        /// The request.
        req: RequestId,
    },
    /// Answer to [`ClientFrame::Login`].
    LoggedIn {
        /// The request.
        req: RequestId,
        /// The device's token, to use with [`ClientFrame::Authenticate`].
        token: String,
    },
    /// A list of users, answering [`RelationOp::List`].
    Users {
        /// The request.
        req: RequestId,
        /// The users, sorted by name.
        users: Vec<UserId>,
    },
    /// The submitted message is durable: the *sent* receipt.
    Accepted {
        /// The request.
        req: RequestId,
        /// The client's idempotency id, as submitted.
        client_id: u64,
        /// The host's id for the message.
        id: MessageId,
        /// When the host accepted it, in milliseconds since the Unix epoch.
        sent_at: u64,
    },
    /// A message for this device. The device answers with [`ClientFrame::Ack`].
    Deliver {
        /// The message's position in the user's inbox: it grows by one or more with every
        /// message appended, and deliveries on a connection come in increasing `seq`.
        seq: u64,
        /// The message.
        message: Message,
    },
    /// The offline backlog has been delivered: every message after this one is new.
    Synced {
        /// How many backlog messages were delivered before this frame.
        count: u64,
    },
    /// A request failed, or (without `req`) the connection is about to be closed.
    Error {
        /// The request that failed, if the error is about one.
        req: Option<RequestId>,
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
    /// The summary of the backlog at the start of a [`SessionMode::Paged`] session: what
    /// waits for the device, to be fetched with [`ClientFrame::Fetch`].
    Backlog {
        /// How many messages.
        count: u64,
        /// The sum of their body sizes, in bytes.
        bytes: u64,
        /// Their ids, oldest first; the first [`crate::BACKLOG_IDS`] if there are more.
        ids: Vec<MessageId>,
    },
    /// A page of the backlog has been sent: the answer to [`ClientFrame::Fetch`], after its
    /// deliveries. When `remaining` is 0, [`ServerFrame::Synced`] follows.
    Page {
        /// The request.
        req: RequestId,
        /// How many deliveries the page held.
        count: u32,
        /// How many backlog messages are still to fetch.
        remaining: u64,
    },
    /// Answer to [`ClientFrame::Login`] or [`ClientFrame::Authenticate`] for a user whose home
    /// is another host of the network: connect to `addr` and ask there. The connection stays
    /// unauthenticated.
    Redirect {
        /// The request.
        req: RequestId,
        /// The home host's server id.
        server: String,
        /// Its address for clients (`host:port`).
        addr: String,
    },
    /// The account's devices, answering [`AccountOp::Devices`].
    Devices {
        /// The request.
        req: RequestId,
        /// The devices with a token, sorted by name.
        devices: Vec<DeviceInfo>,
    },
}

/// A numbered error, stable across versions: programs match on the number, people read the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorCode(pub u16);

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $num:literal, $text:literal;)*) => {
        impl ErrorCode {
            $($(#[$doc])* pub const $name: ErrorCode = ErrorCode($num);)*

            /// Every code this version defines, in order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// A short lowercase name for the code, as in `docs/protocol.md`.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($num => $text,)*
                    _ => "unknown",
                }
            }
        }
    };
}

error_codes! {
    /// The frame could not be decoded. The connection is closed.
    MALFORMED = 1, "malformed";
    /// The frame is larger than the limit. The connection is closed.
    FRAME_TOO_LARGE = 2, "frame_too_large";
    /// The client's protocol version is not spoken by the host. The connection is closed.
    UNSUPPORTED_VERSION = 3, "unsupported_version";
    /// The first frame was not `Hello`, or `Hello` came twice. The connection is closed.
    HANDSHAKE = 4, "handshake";
    /// The request needs an authenticated connection.
    NOT_AUTHENTICATED = 5, "not_authenticated";
    /// The connection is already authenticated.
    ALREADY_AUTHENTICATED = 6, "already_authenticated";
    /// Wrong user, password, device or token.
    AUTH_FAILED = 7, "auth_failed";
    /// The user name is taken.
    USER_EXISTS = 8, "user_exists";
    /// A named user does not exist.
    UNKNOWN_USER = 9, "unknown_user";
    /// An argument is not acceptable (empty recipient list, relation with oneself, ...).
    INVALID_ARGUMENT = 10, "invalid_argument";
    /// The message body is larger than the host's limit.
    BODY_TOO_LARGE = 11, "body_too_large";
    /// Nothing on this host handles the message's kind.
    UNSUPPORTED_KIND = 12, "unsupported_kind";
    /// Another connection became this device's delivery session. The connection is closed.
    SESSION_REPLACED = 13, "session_replaced";
    /// The session sends faster than the host allows.
    RATE_LIMITED = 14, "rate_limited";
    /// The host is shutting down. The connection is closed; reconnect later.
    SHUTTING_DOWN = 15, "shutting_down";
    /// The host failed; the request may be retried.
    INTERNAL = 16, "internal";
    /// The device stopped acknowledging or reading deliveries. The connection is closed; what
    /// was not acknowledged stays in the inbox and is delivered at the next session.
    TOO_SLOW = 17, "too_slow";
    /// The device logged out (from another connection). The connection is closed.
    LOGGED_OUT = 18, "logged_out";
    /// The request came in 0-RTT early data, which an attacker could replay, and is not
    /// idempotent; send it again once the handshake is complete.
    TOO_EARLY = 19, "too_early";
    /// Something the request needs is out of reach for now (in a network of hosts, the
    /// exchange); the request may be sent again later.
    UNAVAILABLE = 20, "unavailable";
    /// No such file on this host, or not one the user may read (the host does not say which).
    NOT_FOUND = 21, "not_found";
    /// The upload would take the user past their file quota on this host.
    QUOTA_EXCEEDED = 22, "quota_exceeded";
    /// The device was revoked (from another device, or its password changed elsewhere). The
    /// connection is closed; the device must log in with the password again.
    REVOKED = 23, "revoked";
    /// The account was deleted. The connection is closed.
    ACCOUNT_DELETED = 24, "account_deleted";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl ClientFrame {
    /// The request id, for the frames that are requests.
    pub fn req(&self) -> Option<RequestId> {
        match self {
            ClientFrame::Register { req, .. }
            | ClientFrame::Login { req, .. }
            | ClientFrame::Authenticate { req, .. }
            | ClientFrame::Logout { req }
            | ClientFrame::Relation { req, .. }
            | ClientFrame::Submit { req, .. }
            | ClientFrame::Fetch { req, .. }
            | ClientFrame::SubmitExpiring { req, .. }
            | ClientFrame::Account { req, .. } => Some(*req),
            ClientFrame::Hello { .. } | ClientFrame::Ack { .. } => None,
        }
    }

    /// Whether the frame may be acted on when it arrives in 0-RTT early data, which an attacker
    /// can record and replay: taking it twice must change nothing more than taking it once.
    /// A submission is deduplicated by its client id; a token only authenticates; `Fetch`
    /// and `Ack` only move what a session is sent. Creating an account, logging in (a new
    /// token), logging out and changing relations are not.
    pub fn allowed_early(&self) -> bool {
        match self {
            ClientFrame::Hello { .. }
            | ClientFrame::Authenticate { .. }
            | ClientFrame::Submit { .. }
            | ClientFrame::SubmitExpiring { .. }
            | ClientFrame::Ack { .. }
            | ClientFrame::Fetch { .. } => true,
            ClientFrame::Relation { op, .. } => *op == RelationOp::List,
            ClientFrame::Account { op, .. } => *op == AccountOp::Devices,
            ClientFrame::Register { .. }
            | ClientFrame::Login { .. }
            | ClientFrame::Logout { .. } => false,
        }
    }
}

impl ServerFrame {
    /// An error frame about request `req`.
    pub fn error(req: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            req,
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn a_kind_s_name_reads_back_as_that_kind() {
        for kind in [
            MessageKind::Chat,
            MessageKind::Receipt,
            MessageKind::Presence,
            MessageKind::Custom("typing".into()),
        ] {
            assert_eq!(kind.to_string().parse(), Ok(kind));
        }
    }

    #[test]
    fn only_what_is_safe_to_replay_is_allowed_in_early_data() {
        let alice = crate::UserId::new("alice").expect("valid");
        let device = crate::DeviceId::new("phone").expect("valid");
        let allowed = [
            ClientFrame::Hello {
                version: 1,
                agent: "a".into(),
            },
            ClientFrame::Authenticate {
                req: 1,
                user: alice.clone(),
                device: device.clone(),
                token: "t".into(),
                mode: SessionMode::Receive,
            },
            ClientFrame::Submit {
                req: 2,
                client_id: 9,
                kind: MessageKind::Chat,
                to: vec![alice.clone().into()],
                body: vec![],
            },
            ClientFrame::Ack { seq: 3 },
            ClientFrame::Fetch { req: 4, max: 1 },
            ClientFrame::Relation {
                req: 5,
                kind: RelationKind::Friend,
                op: RelationOp::List,
            },
        ];
        let refused = [
            ClientFrame::Register {
                req: 6,
                user: alice.clone(),
                password: "p".into(),
            },
            ClientFrame::Login {
                req: 7,
                user: alice.clone(),
                password: "p".into(),
                device,
                mode: SessionMode::SendOnly,
            },
            ClientFrame::Logout { req: 8 },
            ClientFrame::Relation {
                req: 9,
                kind: RelationKind::Friend,
                op: RelationOp::Add(alice),
            },
            ClientFrame::Account {
                req: 10,
                op: AccountOp::Delete {
                    password: "p".into(),
                },
            },
        ];
        assert!(allowed.iter().all(ClientFrame::allowed_early));
        assert!(!refused.iter().any(ClientFrame::allowed_early));
    }

    #[test]
    fn error_codes_are_unique_and_named() {
        let numbers: HashSet<u16> = ErrorCode::ALL.iter().map(|c| c.0).collect();
        assert_eq!(numbers.len(), ErrorCode::ALL.len());
        let names: HashSet<&str> = ErrorCode::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        assert_eq!(ErrorCode(999).name(), "unknown");
    }
}
