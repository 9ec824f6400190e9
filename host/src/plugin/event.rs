//! The events the host raises for plugins, and what a plugin subscribes to.

use super::bindings::iim::plugin::types as wit;
use super::convert;
use iim_proto::{DeviceId, GroupId, Message, MessageId, MessageKind, UserId};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A device acknowledged a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// The message.
    pub id: MessageId,
    /// Its kind.
    pub kind: MessageKind,
    /// Its sender.
    pub sender: UserId,
    /// The sender's device.
    pub sender_device: DeviceId,
    /// The user who received it.
    pub recipient: UserId,
    /// The device that acknowledged it.
    pub recipient_device: DeviceId,
}

/// A device's session opened or closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// How many of the user's devices are online now.
    pub devices_online: u32,
}

/// A message waits in a user's inbox: for the plugin that handles
/// [`WAITING_KIND`](iim_proto::body::WAITING_KIND) notices (the push plugin), which notifies
/// the devices that were not online to take it. `Iim` makes them as it appends to inboxes.
pub use crate::iim::WaitingNotice as Waiting;

/// The device a host's notice comes from, in its WIT message.
pub const NOTICE_DEVICE: &str = "iim-host";

/// Something that happened, for the plugins that subscribed to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A client's message was accepted.
    Message(Arc<Message>),
    /// A device acknowledged a message.
    Delivered(Delivered),
    /// A delivery session opened, after its backlog.
    SessionOpened(SessionInfo),
    /// A delivery session closed.
    SessionClosed(SessionInfo),
    /// A device acknowledged a message addressed to a group. (After the others, so that the
    /// dead letters stored before it existed still read.)
    GroupDelivered(Delivered, GroupId),
    /// A message waits in a user's inbox. (Last, as `GroupDelivered`.)
    Waiting(Waiting),
    /// An account was deleted: the plugins forget what they keep for its user. (Last, as
    /// `GroupDelivered`.)
    AccountDeleted(AccountDeletion),
}

/// An account's deletion, as its notice to a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountDeletion {
    /// A number of the deletion's own (from the store's message ids): the plugins' notices
    /// are recorded under it until each plugin handled its own, and what a plugin sends while
    /// handling it is numbered once under it.
    pub id: MessageId,
    /// The user.
    pub user: UserId,
    /// When, in ms since the Unix epoch.
    pub at: u64,
}

/// What a plugin handles.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subscription {
    /// Submitted messages of a kind.
    Message(MessageKind),
    /// Deliveries of messages of a kind.
    Delivered(MessageKind),
    /// Sessions opening.
    SessionOpened,
    /// Sessions closing.
    SessionClosed,
    /// Every message addressed to a group, of any kind, and its deliveries (`subscribe-groups`).
    Groups,
}

impl Subscription {
    /// The subscription from a plugin's `init`; a custom kind must be a valid name.
    pub fn from_wit(sub: wit::Subscription) -> Result<Self, wit::HostError> {
        let kind = convert::kind_from_wit;
        Ok(match sub {
            wit::Subscription::Message(k) => Self::Message(kind(k)?),
            wit::Subscription::Delivered(k) => Self::Delivered(kind(k)?),
            wit::Subscription::SessionOpened => Self::SessionOpened,
            wit::Subscription::SessionClosed => Self::SessionClosed,
        })
    }
}

impl std::fmt::Display for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Message(kind) => write!(f, "message({kind})"),
            Self::Delivered(kind) => write!(f, "delivered({kind})"),
            Self::SessionOpened => f.write_str("session-opened"),
            Self::SessionClosed => f.write_str("session-closed"),
            Self::Groups => f.write_str("groups"),
        }
    }
}

impl Event {
    /// The subscription that asks for this event.
    pub fn subscription(&self) -> Subscription {
        if self.group().is_some() {
            return Subscription::Groups;
        }
        match self {
            Self::Message(m) => Subscription::Message(m.kind.clone()),
            Self::Delivered(d) => Subscription::Delivered(d.kind.clone()),
            Self::SessionOpened(_) => Subscription::SessionOpened,
            Self::SessionClosed(_) => Subscription::SessionClosed,
            Self::GroupDelivered(..) => Subscription::Groups,
            Self::Waiting(_) => {
                Subscription::Message(MessageKind::Custom(iim_proto::body::WAITING_KIND.into()))
            }
            Self::AccountDeleted(_) => Subscription::Message(MessageKind::Custom(
                iim_proto::body::ACCOUNT_DELETED_KIND.into(),
            )),
        }
    }

    /// The group whose conversation this event belongs to, if any: a message addressed to a
    /// group, or its delivery.
    pub fn group(&self) -> Option<&GroupId> {
        match self {
            Self::Message(m) => m.group(),
            Self::GroupDelivered(_, group) => Some(group),
            Self::Delivered(_)
            | Self::SessionOpened(_)
            | Self::SessionClosed(_)
            | Self::Waiting(_)
            | Self::AccountDeleted(_) => None,
        }
    }

    /// Which of a plugin's `lanes` handles this event: its group's for a group's event (one
    /// order per group), its acting user's otherwise (one order per user).
    pub fn lane(&self, lanes: usize) -> usize {
        match self.group() {
            Some(group) => group.partition(lanes),
            None => self.acting().0.partition(lanes),
        }
    }

    /// The user who caused it, and that user's device: the acting user of its handling.
    pub fn acting(&self) -> (&UserId, &DeviceId) {
        match self {
            Self::Message(m) => (&m.from, &m.from_device),
            Self::Delivered(d) | Self::GroupDelivered(d, _) => (&d.recipient, &d.recipient_device),
            Self::SessionOpened(s) | Self::SessionClosed(s) => (&s.user, &s.device),
            Self::Waiting(w) => (&w.user, notice_device()),
            Self::AccountDeleted(d) => (&d.user, notice_device()),
        }
    }

    /// A key naming this event for as long as it can be handled again after a restart: the
    /// messages a plugin sends while handling it are numbered once under this key, so a
    /// second handling sends nothing twice. `None` for events that do not outlive the process.
    pub fn durable_key(&self) -> Option<Vec<u8>> {
        match self {
            Self::Message(m) => {
                let mut key = b"m".to_vec();
                key.extend_from_slice(&m.id.0.to_be_bytes());
                Some(key)
            }
            Self::AccountDeleted(d) => {
                let mut key = b"a".to_vec();
                key.extend_from_slice(&d.id.0.to_be_bytes());
                Some(key)
            }
            Self::Delivered(_)
            | Self::SessionOpened(_)
            | Self::SessionClosed(_)
            | Self::GroupDelivered(..)
            | Self::Waiting(_) => None,
        }
    }

    /// The event as the WIT's.
    pub fn to_wit(&self) -> wit::Event {
        match self {
            Self::Message(m) => wit::Event::Message(convert::message_to_wit(m)),
            Self::Delivered(d) | Self::GroupDelivered(d, _) => {
                wit::Event::Delivered(wit::Delivery {
                    id: d.id.0,
                    kind: convert::kind_to_wit(&d.kind),
                    sender: d.sender.to_string(),
                    sender_device: d.sender_device.to_string(),
                    recipient: d.recipient.to_string(),
                    recipient_device: d.recipient_device.to_string(),
                })
            }
            Self::SessionOpened(s) => wit::Event::SessionOpened(session_to_wit(s)),
            Self::SessionClosed(s) => wit::Event::SessionClosed(session_to_wit(s)),
            // A message of the host's, to the user it waits for, telling which one waits.
            Self::Waiting(w) => wit::Event::Message(wit::Message {
                id: w.message.id.0,
                kind: wit::MessageKind::Custom(iim_proto::body::WAITING_KIND.into()),
                sender: w.user.to_string(),
                sender_device: NOTICE_DEVICE.into(),
                to: vec![w.user.to_string()],
                body: iim_proto::body::Waiting::of(&w.message, &w.online).to_json(),
                sent_at: w.message.sent_at,
            }),
            // A message of the host's, from and to the deleted user.
            Self::AccountDeleted(d) => wit::Event::Message(wit::Message {
                id: d.id.0,
                kind: wit::MessageKind::Custom(iim_proto::body::ACCOUNT_DELETED_KIND.into()),
                sender: d.user.to_string(),
                sender_device: NOTICE_DEVICE.into(),
                to: vec![d.user.to_string()],
                body: iim_proto::body::AccountDeleted {
                    user: d.user.to_string(),
                }
                .to_json(),
                sent_at: d.at,
            }),
        }
    }
}

/// [`NOTICE_DEVICE`] as a device name.
fn notice_device() -> &'static DeviceId {
    static DEVICE: std::sync::OnceLock<DeviceId> = std::sync::OnceLock::new();
    DEVICE.get_or_init(|| DeviceId::new(NOTICE_DEVICE).unwrap_or_else(|_| unreachable!()))
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Message(m) => write!(f, "message {} ({}) from {}", m.id, m.kind, m.from),
            Self::Delivered(d) => write!(
                f,
                "delivered {} ({}) to {}/{}",
                d.id, d.kind, d.recipient, d.recipient_device
            ),
            Self::GroupDelivered(d, group) => write!(
                f,
                "delivered {} ({}, #{group}) to {}/{}",
                d.id, d.kind, d.recipient, d.recipient_device
            ),
            Self::SessionOpened(s) => write!(f, "session-opened {}/{}", s.user, s.device),
            Self::SessionClosed(s) => write!(f, "session-closed {}/{}", s.user, s.device),
            Self::Waiting(w) => write!(
                f,
                "waiting {} ({}) for {}",
                w.message.id, w.message.kind, w.user
            ),
            Self::AccountDeleted(d) => write!(f, "account-deleted {} ({})", d.user, d.id),
        }
    }
}

fn session_to_wit(s: &SessionInfo) -> wit::SessionInfo {
    wit::SessionInfo {
        user: s.user.to_string(),
        device: s.device.to_string(),
        devices_online: s.devices_online,
    }
}
