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

fn to_json(value: &impl Serialize) -> Vec<u8> {
    // Strings, numbers and lists always encode.
    serde_json::to_vec(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BodyError> {
    serde_json::from_slice(body).map_err(|e| BodyError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
