//! The bodies of `keys` messages: what a device asks ([`KeysRequest`]) and what the plugin
//! answers ([`KeysReply`]). UTF-8 JSON objects tagged by `op`; cards and key packages travel as
//! standard base64 (RFC 4648 §4, with padding).
//!
//! The key directory plugin (`plugins/keys`) reads the requests and writes the replies with
//! these types; `plugins/keys/README.md` documents them for client authors.

use super::to_json;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// The custom kind of the key directory's requests and replies.
pub const KEYS_KIND: &str = "keys";

/// Opaque bytes (a card, a key package), written in JSON as a standard base64 string.
#[derive(Clone, PartialEq, Eq)]
pub struct Base64(pub Vec<u8>);

impl fmt::Debug for Base64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Base64({} bytes)", self.0.len())
    }
}

impl Serialize for Base64 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Base64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD
            .decode(text.as_bytes())
            .map(Base64)
            .map_err(|e| serde::de::Error::custom(format!("not standard base64: {e}")))
    }
}

/// What a device asks of the key directory: the body of a [`KEYS_KIND`] message addressed to
/// its own user. Whose card or key packages a request writes is never taken from the body: it
/// is always the sending (acting) user's, and for `publish` the sending device's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum KeysRequest {
    /// Stores the sending device's card, replacing the one it published before, and adds its
    /// key packages to those waiting to be claimed.
    Publish {
        /// The device's card (`iim_e2ee::DeviceCard`'s bytes).
        card: Base64,
        /// One-time MLS key packages of the device, oldest first.
        #[serde(default)]
        key_packages: Vec<Base64>,
    },
    /// Removes a device's card and every key package of it waiting: `device`, a device of the
    /// sending user, or the sending device itself when it is left out.
    Unpublish {
        /// The device, of the sending user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
    },
    /// The published cards of every device of `users` (anyone's).
    Cards {
        /// Whose cards.
        users: Vec<String>,
    },
    /// Takes one key package of each device named `user/device`, with its card.
    Claim {
        /// The devices, each `user/device`.
        devices: Vec<String>,
    },
}

impl KeysRequest {
    /// The body's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// A request from a body's bytes.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

/// The key directory's answer to a request: a [`KEYS_KIND`] message from the user to the
/// user (so every device of the user gets it), naming the request and the device that sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysReply {
    /// What it says, tagged by `op`.
    #[serde(flatten)]
    pub answer: Answer,
    /// The id of the request's message.
    pub request: u64,
    /// The device that sent the request: the others of the user ignore the reply.
    pub device: String,
}

impl KeysReply {
    /// The body's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// A reply from a body's bytes.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

/// What a [`KeysReply`] says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Answer {
    /// The card is stored and the key packages added: `key_packages` of the device wait now.
    Published {
        /// How many key packages of the device wait to be claimed, these included.
        key_packages: u32,
    },
    /// The card and key packages of device `removed` are gone (or were never there).
    Unpublished {
        /// The device unpublished.
        removed: String,
    },
    /// A part of the answer to `cards`.
    Cards {
        /// Cards, grouped by user in the order asked.
        cards: Vec<CardEntry>,
        /// More parts follow; the last part has none.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
        /// In the last part: users whose cards had no room in this answer (all of theirs or
        /// some): ask again for them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unanswered: Vec<String>,
    },
    /// A part of the answer to `claim`: the key packages taken, each now given to no one else.
    Claimed {
        /// One key package per device, with the device's card.
        packages: Vec<ClaimedPackage>,
        /// In the last part: the devices named that have no card or no key package waiting,
        /// each `user/device`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        missing: Vec<String>,
        /// More parts follow; the last part has none.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
        /// In the last part: devices (`user/device`) whose key package had no room in this
        /// answer; none of theirs was taken: ask again for them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unanswered: Vec<String>,
    },
    /// The request was not carried out, for `reason`; nothing changed.
    Refused {
        /// Why, as a sentence.
        reason: String,
    },
}

/// One device's published card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardEntry {
    /// The user.
    pub user: String,
    /// The device.
    pub device: String,
    /// Its card, as the device published it.
    pub card: Base64,
}

/// One key package claimed, with the card of its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedPackage {
    /// The user.
    pub user: String,
    /// The device.
    pub device: String,
    /// The device's card, as published.
    pub card: Base64,
    /// The key package, as published.
    pub key_package: Base64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_back_and_carry_bytes_as_base64() {
        let publish = KeysRequest::Publish {
            card: Base64(b"card".to_vec()),
            key_packages: vec![Base64(vec![0, 1, 255])],
        };
        let json = String::from_utf8(publish.to_json()).expect("utf-8");
        assert_eq!(
            json,
            r#"{"op":"publish","card":"Y2FyZA==","key_packages":["AAH/"]}"#
        );
        assert_eq!(KeysRequest::from_json(json.as_bytes()).ok(), Some(publish));
        assert_eq!(
            KeysRequest::from_json(br#"{"op":"unpublish"}"#).ok(),
            Some(KeysRequest::Unpublish { device: None })
        );
        assert!(KeysRequest::from_json(br#"{"op":"publish","card":"not base64!"}"#).is_err());
    }

    #[test]
    fn replies_name_the_request_and_device_and_leave_out_what_is_empty() {
        let reply = KeysReply {
            answer: Answer::Claimed {
                packages: Vec::new(),
                missing: vec!["bob/phone".into()],
                more: false,
                unanswered: Vec::new(),
            },
            request: 7,
            device: "laptop".into(),
        };
        let json = String::from_utf8(reply.to_json()).expect("utf-8");
        assert_eq!(
            json,
            r#"{"op":"claimed","packages":[],"missing":["bob/phone"],"request":7,"device":"laptop"}"#
        );
        assert_eq!(KeysReply::from_json(json.as_bytes()).ok(), Some(reply));
    }
}
