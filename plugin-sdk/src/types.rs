//! Methods on the values of the WIT `types` interface.

use crate::{Event, HostError, Message, MessageKind, PluginError, Subscription, UserId, runtime};
use std::fmt;

impl Message {
    /// A new message from the acting user of the event being handled: id 0 (the host numbers
    /// it when it sends), `sender` the acting user, `sender-device` the acting device (the host
    /// sets it anyway), `sent-at` 0 (the host sets it).
    ///
    /// Outside `handle` there is no acting user: `sender` is then empty, and the host refuses
    /// to send the message (`forged-sender`).
    pub fn new(kind: MessageKind, to: Vec<UserId>, body: Vec<u8>) -> Self {
        let (sender, sender_device) = runtime::acting().unwrap_or_default();
        Self {
            id: 0,
            kind,
            sender,
            sender_device,
            to,
            body,
            sent_at: 0,
        }
    }

    /// The group this message is addressed to, without its `#`, if its `to` is exactly one
    /// group (`#name`): how the host tells a group's message from a message to users.
    pub fn group(&self) -> Option<&str> {
        match self.to.as_slice() {
            [only] => only.strip_prefix('#'),
            _ => None,
        }
    }
}

impl MessageKind {
    /// The custom kind [`GROUP_KIND`](crate::GROUP_KIND): group requests, notices and replies.
    pub fn group() -> Self {
        MessageKind::Custom(crate::GROUP_KIND.to_owned())
    }
}

impl Event {
    /// The user on whose behalf the plugin acts while it handles this event: the sender of a
    /// message, the recipient of a delivery, the owner of a session.
    pub fn acting_user(&self) -> &str {
        match self {
            Event::Message(m) => &m.sender,
            Event::Delivered(d) => &d.recipient,
            Event::SessionOpened(s) | Event::SessionClosed(s) => &s.user,
        }
    }

    /// The device of the acting user that caused this event.
    pub fn acting_device(&self) -> &str {
        match self {
            Event::Message(m) => &m.sender_device,
            Event::Delivered(d) => &d.recipient_device,
            Event::SessionOpened(s) | Event::SessionClosed(s) => &s.device,
        }
    }
}

impl Subscription {
    /// Whether this subscription asks for `event`: the host hands a plugin only the events
    /// one of its subscriptions matches. Except the events of groups: a message addressed to
    /// a group, and its deliveries, go to the plugin that handles groups
    /// ([`Plugin::groups`](crate::Plugin::groups)) and to no other, whatever the kind.
    pub fn matches(&self, event: &Event) -> bool {
        match (self, event) {
            (Subscription::Message(kind), Event::Message(m)) => *kind == m.kind,
            (Subscription::Delivered(kind), Event::Delivered(d)) => *kind == d.kind,
            (Subscription::SessionOpened, Event::SessionOpened(_))
            | (Subscription::SessionClosed, Event::SessionClosed(_)) => true,
            _ => false,
        }
    }
}

/// The kind's WIT name (`chat`, `receipt`, `presence`), or a custom kind's own name.
impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageKind::Chat => f.write_str("chat"),
            MessageKind::Receipt => f.write_str("receipt"),
            MessageKind::Presence => f.write_str("presence"),
            MessageKind::Custom(name) => f.write_str(name),
        }
    }
}

impl HostError {
    /// A sentence for a log line or a `plugin-error` (the generated `Display` is the `Debug`
    /// form).
    pub fn describe(&self) -> String {
        match self {
            HostError::UnknownUser(user) => format!("unknown user `{user}`"),
            HostError::UnknownServer(server) => format!("unknown server `{server}`"),
            HostError::ForgedSender(user) => {
                format!("forged sender: `{user}` is not the acting user")
            }
            HostError::UnknownMessage(id) => {
                format!("unknown message {id}: neither 0 nor the message being handled")
            }
            HostError::InvalidArgument(text) => format!("invalid argument: {text}"),
            HostError::PermissionDenied(text) => format!("permission denied: {text}"),
            HostError::LimitExceeded(text) => format!("limit exceeded: {text}"),
            HostError::Unavailable(text) => format!("host unavailable: {text}"),
        }
    }
}

/// A host error the plugin does not handle itself fails the event (`failed`): the host runs it
/// again, then sets it aside for the operator. This is what `?` on a host call does.
impl From<HostError> for PluginError {
    fn from(e: HostError) -> Self {
        PluginError::Failed(e.describe())
    }
}
