//! The bodies of the messages that iim's default plugins and the host send and take: receipts,
//! read reports, presence notices and file references, in JSON, as `docs/plugins.md`
//! documents them for client authors.
//!
//! One definition, shared: the plugins (through `iim-plugin-sdk`) write and read them with
//! these types, the host writes the `expired` receipt with them, the `iim` CLI shows them, and
//! the tests check them. A reader ignores the fields it does not know, so that what a newer
//! plugin sends still reads; user and device names are plain text here (the host checked them
//! when it took the message).

use serde::{Deserialize, Serialize};

pub mod keys;

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// It is not the JSON of this body.
    #[error("{0}")]
    Json(String),
    /// A read report named another state than `read`.
    #[error("a client may only report `read`, not `{0}`")]
    NotRead(String),
}

/// The body of a `receipt` message: what happened to a message the recipient of the receipt
/// sent (or, for `read`, received on another device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Receipt {
    /// Message `id` reached `device` of its recipient `user` (the receipts plugin).
    Delivered {
        /// The message.
        id: u64,
        /// The recipient.
        user: String,
        /// The recipient's device that acknowledged it.
        device: String,
    },
    /// `user` read message `id`, as `device` reported (the receipts plugin, to the sender and
    /// to the reader's other devices).
    Read {
        /// The message.
        id: u64,
        /// The reader.
        user: String,
        /// The device that reported it.
        device: String,
    },
    /// Message `id` was not sent to `users`, for `reason` (the chat plugin's policy).
    Refused {
        /// The message.
        id: u64,
        /// The addressees refused.
        users: Vec<String>,
        /// Why.
        reason: String,
    },
    /// How many members of a group got and read a message of the sender's (from the plugin that
    /// handles groups): sent when a count reaches 1, 2, 4, 8, … and when it reaches every
    /// member, so a message to `m` members costs its sender about `2 log2 m` receipts, not `2m`.
    Counts {
        /// The message.
        id: u64,
        /// Its group, without `#`.
        group: String,
        /// Members it was sent to.
        members: u32,
        /// Members with a device that has it.
        delivered: u32,
        /// Members who reported reading it.
        read: u32,
    },
    /// Message `id` expired before any device of `user` got it (the host).
    Expired {
        /// The message.
        id: u64,
        /// The recipient who never got it.
        user: String,
    },
}

impl Receipt {
    /// The body's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// A receipt from a body's bytes.
    pub fn from_json(body: &[u8]) -> Result<Self, BodyError> {
        from_json(body)
    }
}

/// The body a client submits (a `receipt` message to the sender) to say its user read a chat
/// message: `{"state":"read","id":ID}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadReport {
    /// The message read.
    pub id: u64,
}

/// The report as JSON: a state and an id.
#[derive(Serialize, Deserialize)]
struct ReportJson {
    state: String,
    id: u64,
}

impl ReadReport {
    /// The body's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(&ReportJson {
            state: "read".into(),
            id: self.id,
        })
    }

    /// A report from a body's bytes: its state must be `read`.
    pub fn from_json(body: &[u8]) -> Result<Self, BodyError> {
        let ReportJson { state, id } = from_json(body)?;
        if state != "read" {
            return Err(BodyError::NotRead(state));
        }
        Ok(Self { id })
    }
}

/// The body of a `presence` message: the presence of some users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// One entry per user.
    pub presence: Vec<PresenceEntry>,
}

/// One user's presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    /// The user.
    pub user: String,
    /// Online or offline.
    pub state: PresenceState,
    /// How many of the user's devices are online.
    pub devices: u32,
}

/// Whether a user has a device online.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceState {
    /// At least one device online.
    Online,
    /// None.
    Offline,
}

impl Presence {
    /// The body's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// A presence body from its bytes.
    pub fn from_json(body: &[u8]) -> Result<Self, BodyError> {
        from_json(body)
    }
}

/// The kind of a file message: a custom kind, `file`, that the chat plugin handles like chat.
pub const FILE_KIND: &str = "file";

/// The body of a `file` message: a file the sender uploaded (or received) on their home host,
/// by its id, with what a client shows before downloading it. The host checks, when it takes
/// the message, that the sender may read the file and that the size is the stored one; each
/// recipient may then download it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// The file's id: its SHA-256, 64 lower-case hex digits.
    pub file: String,
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type (may be empty).
    #[serde(default)]
    pub media_type: String,
}

impl FileRef {
    /// The body's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// A file body from its bytes.
    pub fn from_json(body: &[u8]) -> Result<Self, BodyError> {
        from_json(body)
    }

    /// The file's SHA-256, if `file` is an id.
    pub fn sha256(&self) -> Option<crate::file::Sha256> {
        crate::file::parse_hex(&self.file)
    }
}

/// A member's place in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupRole {
    /// Created the group or was handed it: may do everything, and is the only one who may
    /// delete it, make admins and hand the group on.
    Owner,
    /// May rename the group and add and remove members (not the owner, nor other admins).
    Admin,
    /// May write to the group, read who is in it and leave.
    Member,
}

impl std::fmt::Display for GroupRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Member => "member",
        })
    }
}

impl std::str::FromStr for GroupRole {
    type Err = BodyError;
    fn from_str(text: &str) -> Result<Self, BodyError> {
        match text {
            "owner" => Ok(Self::Owner),
            "admin" => Ok(Self::Admin),
            "member" => Ok(Self::Member),
            other => Err(BodyError::Json(format!(
                "a role is owner, admin or member, not {other:?}"
            ))),
        }
    }
}

/// What a user asks of the groups plugin: the body of a message of kind
/// [`GROUP_KIND`](crate::GROUP_KIND) addressed to the group (`#name`), or for `list` to the
/// user themself. The plugin answers the requester with a [`GroupReply`] or a `refused`
/// [`Receipt`] naming the request's id, and tells the members what changed with a
/// [`GroupNotice`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum GroupRequest {
    /// Makes the group, with the requester as its owner and `members` as members.
    Create {
        /// A title to show; the group's name if empty.
        #[serde(default)]
        title: String,
        /// The first members besides the owner.
        #[serde(default)]
        members: Vec<String>,
    },
    /// Sets the title (owner and admins). The group's name (`#name`) never changes.
    Rename {
        /// The new title.
        title: String,
    },
    /// Deletes the group (owner).
    Delete,
    /// Adds members (owner and admins).
    Add {
        /// The users.
        users: Vec<String>,
    },
    /// Removes members (the owner anyone but themself, an admin plain members).
    Remove {
        /// The users.
        users: Vec<String>,
    },
    /// Leaves the group (anyone but the owner, who hands it on or deletes it first).
    Leave,
    /// Sets a member's role (owner): `owner` hands the group on, and the old owner becomes
    /// an admin.
    Role {
        /// The member.
        user: String,
        /// The new role.
        role: GroupRole,
    },
    /// Asks for the members and their roles (members).
    Members,
    /// Asks for the requester's groups.
    List,
    /// Asks which members got and read message `id` of the group (its sender).
    Receipts {
        /// The message.
        id: u64,
    },
    /// Takes a deleted account out of the group, then passes the request on to the first of
    /// `next` with the rest: the groups plugin sends it itself, as the deleted user, when the
    /// host tells it of the deletion ([`ACCOUNT_DELETED_KIND`]). The group goes on without the
    /// user (an owner's group to its first admin by name, else its first member, else it is
    /// deleted). Refused from a user whose account exists.
    Forget {
        /// The user's other groups, without `#`, to go through after this one.
        #[serde(default)]
        next: Vec<String>,
    },
}

impl GroupRequest {
    /// The request as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// Reads a request.
    pub fn from_json(body: &[u8]) -> Result<Self, BodyError> {
        from_json(body)
    }
}

/// What changed in a group: the body of a message of kind [`GROUP_KIND`](crate::GROUP_KIND)
/// addressed to the group, from the member who changed it, to every member (before and
/// after the change, so a removed member learns it). Members see these in the group's order,
/// among its messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum GroupNotice {
    /// The group was made.
    Created {
        /// Its title.
        title: String,
        /// Its members, the owner first.
        members: Vec<String>,
    },
    /// Its title changed.
    Renamed {
        /// The new title.
        title: String,
    },
    /// Members were added.
    Added {
        /// The users.
        users: Vec<String>,
    },
    /// Members were removed.
    Removed {
        /// The users.
        users: Vec<String>,
    },
    /// The sender left.
    Left,
    /// A member's role changed.
    Role {
        /// The member.
        user: String,
        /// The new role.
        role: GroupRole,
    },
    /// The group was deleted.
    Deleted,
}

impl GroupNotice {
    /// The notice as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// Reads a notice.
    pub fn from_json(body: &[u8]) -> Result<Self, BodyError> {
        from_json(body)
    }
}

/// One member of a group and their role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    /// The user.
    pub user: String,
    /// Their role.
    pub role: GroupRole,
}

/// One group of a user's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// Its name, without `#`.
    pub group: String,
    /// Its title.
    pub title: String,
    /// The user's role in it.
    pub role: GroupRole,
    /// How many members it has.
    pub members: u32,
}

/// The groups plugin's answer to a [`GroupRequest`]: the body of a message of kind
/// [`GROUP_KIND`](crate::GROUP_KIND) addressed to the requester only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "lowercase")]
pub enum GroupReply {
    /// A change was made (the members got a [`GroupNotice`] too).
    Done {
        /// The request's message id.
        request: u64,
    },
    /// The members of a group.
    Members {
        /// The request's message id.
        request: u64,
        /// The group, without `#`.
        group: String,
        /// Its title.
        title: String,
        /// Its members, the owner first, then admins, then members, each by name.
        members: Vec<GroupMember>,
    },
    /// The requester's groups, by name.
    List {
        /// The request's message id.
        request: u64,
        /// The groups.
        groups: Vec<GroupSummary>,
    },
    /// Who got and read a message.
    Receipts {
        /// The request's message id.
        request: u64,
        /// The message.
        id: u64,
        /// Members it was sent to.
        members: u32,
        /// Members with a device that has it, by name.
        delivered: Vec<String>,
        /// Members who reported reading it, by name.
        read: Vec<String>,
    },
}

impl GroupReply {
    /// The request this answers.
    pub fn request(&self) -> u64 {
        match self {
            Self::Done { request }
            | Self::Members { request, .. }
            | Self::List { request, .. }
            | Self::Receipts { request, .. } => *request,
        }
    }

    /// The reply as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// Reads a reply.
    pub fn from_json(body: &[u8]) -> Result<Self, BodyError> {
        from_json(body)
    }
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    // Strings, numbers and lists always encode.
    serde_json::to_vec(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BodyError> {
    serde_json::from_slice(body).map_err(|e| BodyError::Json(e.to_string()))
}

/// The kind of the messages a device sends to register for push notifications, and of the push
/// plugin's answers (`docs/plugins.md`, "Push").
pub const PUSH_KIND: &str = "push";

/// The kind of the host's notices that a message waits for a user none of whose devices is
/// online: raised by the host only (a client or a plugin that sends one is refused), handled by
/// the plugin that handles this kind (the push plugin). Their body is a [`Waiting`].
pub const WAITING_KIND: &str = "waiting";

/// The kind of the host's notice that an account was deleted: raised by the host only (a
/// client or a plugin that sends one is refused), to every plugin that handles this kind, acting
/// as the deleted user, so that each forgets what it keeps for the user (the push plugin: its
/// devices' tokens). Its body is an [`AccountDeleted`].
pub const ACCOUNT_DELETED_KIND: &str = "account-deleted";

/// Whether messages of custom kind `kind` are the host's own notices ([`WAITING_KIND`],
/// [`ACCOUNT_DELETED_KIND`]), which no client or plugin may send.
pub fn is_host_notice(kind: &str) -> bool {
    kind == WAITING_KIND || kind == ACCOUNT_DELETED_KIND
}

/// The body of the host's [`ACCOUNT_DELETED_KIND`] notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountDeleted {
    /// The user whose account was deleted (the notice's sender and only addressee as well).
    pub user: String,
}

impl AccountDeleted {
    /// The notice's body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a notice's body.
    pub fn from_json(body: &[u8]) -> Result<Self, BodyError> {
        serde_json::from_slice(body).map_err(|e| BodyError::Json(e.to_string()))
    }
}

/// What a device asks of the push plugin: the body of a [`PUSH_KIND`] message addressed to its
/// own user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PushRequest {
    /// Notify this device through the push gateway, at `token` (an APNs device token or an
    /// FCM registration token, as the plugin's configured gateway takes), when a message waits
    /// and none of the user's devices is online, or with `always`, whenever this device is not
    /// online (a phone that wants a notification while its user's laptop is connected).
    /// Registering again replaces the token.
    Register {
        /// The token the device's platform gave it.
        token: String,
        /// Notified whenever it is offline, not only when every device of the user is.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        always: bool,
    },
    /// Stop notifying this device.
    Unregister,
}

impl PushRequest {
    /// The body's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// A request from a body's bytes.
    pub fn from_json(body: &[u8]) -> Result<Self, BodyError> {
        from_json(body)
    }
}

/// The push plugin's answer to a [`PushRequest`], a [`PUSH_KIND`] message to the user's
/// devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PushReply {
    /// `device` will be notified.
    Registered {
        /// The device.
        device: String,
    },
    /// `device` will not be notified any more.
    Unregistered {
        /// The device.
        device: String,
    },
    /// The request was not taken, for `reason` (a token of the wrong shape for the gateway).
    Refused {
        /// The device.
        device: String,
        /// Why.
        reason: String,
    },
}

impl PushReply {
    /// The body's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// An answer from a body's bytes.
    pub fn from_json(body: &[u8]) -> Result<Self, BodyError> {
        from_json(body)
    }
}

/// The body of the host's [`WAITING_KIND`] notice: message `id`, now in the user's inbox, and
/// which of the user's devices were online to take it (`online`; empty when none was). The
/// message itself (its body) can be read with `inbox-message(user, id)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    /// The message's id.
    pub id: u64,
    /// Its kind (`chat`, `file`, `group`, a receipt…).
    pub kind: String,
    /// Its sender.
    pub from: String,
    /// The sender's device.
    pub from_device: String,
    /// Its addressees: users, or one group (`#team`).
    pub to: Vec<String>,
    /// When its host accepted it, in milliseconds since the Unix epoch.
    pub sent_at: u64,
    /// The user's devices that were online (had a delivery session) and took it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub online: Vec<String>,
}

impl Waiting {
    /// The notice for `message`, which `online` devices of the user took.
    pub fn of(message: &crate::Message, online: &[crate::DeviceId]) -> Self {
        Self {
            id: message.id.0,
            kind: message.kind.to_string(),
            from: message.from.to_string(),
            from_device: message.from_device.to_string(),
            to: message.to.iter().map(ToString::to_string).collect(),
            sent_at: message.sent_at,
            online: online.iter().map(ToString::to_string).collect(),
        }
    }

    /// The body's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// A notice from a body's bytes.
    pub fn from_json(body: &[u8]) -> Result<Self, BodyError> {
        from_json(body)
    }
}

/// The first bytes of an end-to-end encrypted 1:1 envelope: the same bytes as the `iim-e2ee`
/// crate's `MAGIC_DIRECT`, repeated here so that a plugin can tell ciphertext without that crate.
pub const E2E_DIRECT_MAGIC: &[u8; 8] = b"iim-e2e\x01";

/// The first bytes of an end-to-end encrypted MLS group message: the same bytes as the
/// `iim-e2ee` crate's `MAGIC_MLS`.
pub const E2E_GROUP_MAGIC: &[u8; 8] = b"iim-mls\x01";

/// Whether a message body is end-to-end encrypted (it starts with [`E2E_DIRECT_MAGIC`] or
/// [`E2E_GROUP_MAGIC`]): ciphertext, which no plugin or host can read and none should show as
/// text.
pub fn is_end_to_end(body: &[u8]) -> bool {
    body.starts_with(E2E_DIRECT_MAGIC) || body.starts_with(E2E_GROUP_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_to_end_bodies_are_told_by_their_magic() {
        assert!(is_end_to_end(b"iim-e2e\x01ciphertext"));
        assert!(is_end_to_end(b"iim-mls\x01"));
        assert!(!is_end_to_end(b"hello"));
        assert!(!is_end_to_end(b"iim-e2e\x02ciphertext"), "another version");
        assert!(!is_end_to_end(b"iim-e2e"), "too short");
        assert!(
            !is_end_to_end(b"iim-crd\x01card"),
            "a device card is no message"
        );
        assert!(!is_end_to_end(b""));
    }

    #[test]
    fn bodies_are_the_documented_json() {
        let delivered = Receipt::Delivered {
            id: 7,
            user: "bob".into(),
            device: "laptop".into(),
        };
        assert_eq!(
            delivered.to_json(),
            br#"{"state":"delivered","id":7,"user":"bob","device":"laptop"}"#
        );
        let expired = Receipt::Expired {
            id: 9,
            user: "carol".into(),
        };
        assert_eq!(
            expired.to_json(),
            br#"{"state":"expired","id":9,"user":"carol"}"#
        );
        let refused = Receipt::Refused {
            id: 4,
            users: vec!["dave".into()],
            reason: "not a friend".into(),
        };
        assert_eq!(
            refused.to_json(),
            br#"{"state":"refused","id":4,"users":["dave"],"reason":"not a friend"}"#
        );
        assert_eq!(
            ReadReport { id: 3 }.to_json(),
            br#"{"state":"read","id":3}"#
        );
        let presence = Presence {
            presence: vec![PresenceEntry {
                user: "bob".into(),
                state: PresenceState::Online,
                devices: 2,
            }],
        };
        assert_eq!(
            presence.to_json(),
            br#"{"presence":[{"user":"bob","state":"online","devices":2}]}"#
        );
    }

    #[test]
    fn group_bodies_are_the_documented_json() {
        assert_eq!(
            GroupRequest::Add {
                users: vec!["bob".into()]
            }
            .to_json(),
            br#"{"op":"add","users":["bob"]}"#
        );
        assert_eq!(
            GroupRequest::from_json(br#"{"op":"create"}"#),
            Ok(GroupRequest::Create {
                title: String::new(),
                members: Vec::new()
            })
        );
        assert_eq!(
            GroupRequest::from_json(br#"{"op":"role","user":"bob","role":"admin"}"#),
            Ok(GroupRequest::Role {
                user: "bob".into(),
                role: GroupRole::Admin
            })
        );
        assert!(GroupRequest::from_json(br#"{"op":"role","user":"bob","role":"king"}"#).is_err());
        assert_eq!(GroupNotice::Left.to_json(), br#"{"event":"left"}"#);
        assert_eq!(
            GroupReply::Done { request: 5 }.to_json(),
            br#"{"reply":"done","request":5}"#
        );
        let counts = Receipt::Counts {
            id: 9,
            group: "team".into(),
            members: 10,
            delivered: 4,
            read: 1,
        };
        assert_eq!(
            counts.to_json(),
            br#"{"state":"counts","id":9,"group":"team","members":10,"delivered":4,"read":1}"#
        );
    }

    #[test]
    fn readers_ignore_unknown_fields_and_refuse_other_shapes() {
        assert_eq!(
            Receipt::from_json(br#"{"state":"read","id":7,"user":"b","device":"d","at":1}"#),
            Ok(Receipt::Read {
                id: 7,
                user: "b".into(),
                device: "d".into()
            })
        );
        assert!(Receipt::from_json(br#"{"state":"seen","id":7}"#).is_err());
        assert_eq!(
            ReadReport::from_json(br#"{"state":"read","id":7,"at":1}"#),
            Ok(ReadReport { id: 7 })
        );
        assert_eq!(
            ReadReport::from_json(br#"{"state":"delivered","id":7}"#),
            Err(BodyError::NotRead("delivered".into()))
        );
        assert!(matches!(
            ReadReport::from_json(br#"{"state":"read","id":-1}"#),
            Err(BodyError::Json(_))
        ));
        assert!(Presence::from_json(br#"{"presence":"?"}"#).is_err());
    }

    #[test]
    fn push_bodies_read_back_and_name_their_op() {
        let register = PushRequest::Register {
            token: "ab12".into(),
            always: false,
        };
        assert_eq!(register.to_json(), br#"{"op":"register","token":"ab12"}"#);
        assert_eq!(PushRequest::from_json(&register.to_json()), Ok(register));
        assert_eq!(
            PushRequest::from_json(br#"{"op":"unregister"}"#),
            Ok(PushRequest::Unregister)
        );
        assert!(PushRequest::from_json(br#"{"op":"register"}"#).is_err());
        let reply = PushReply::Refused {
            device: "phone".into(),
            reason: "no".into(),
        };
        assert_eq!(PushReply::from_json(&reply.to_json()), Ok(reply));
        let waiting = Waiting {
            id: 7,
            kind: "chat".into(),
            from: "alice".into(),
            from_device: "laptop".into(),
            to: vec!["bob".into()],
            sent_at: 1,
            online: vec!["laptop".into()],
        };
        assert_eq!(Waiting::from_json(&waiting.to_json()), Ok(waiting));
        assert_eq!(
            PushRequest::from_json(br#"{"op":"register","token":"t","always":true}"#),
            Ok(PushRequest::Register {
                token: "t".into(),
                always: true
            })
        );
    }
}
