//! Between the host's values (`iim-proto`, the user-list of [`crate::iim`]) and the WIT's.

use super::bindings::iim::plugin::types::{self as wit, HostError};
use crate::iim::UserList;
use iim_proto::{Message, MessageKind};

/// A host message kind as the WIT's.
pub fn kind_to_wit(kind: &MessageKind) -> wit::MessageKind {
    match kind {
        MessageKind::Chat => wit::MessageKind::Chat,
        MessageKind::Receipt => wit::MessageKind::Receipt,
        MessageKind::Presence => wit::MessageKind::Presence,
        MessageKind::Custom(name) => wit::MessageKind::Custom(name.clone()),
    }
}

/// A WIT message kind as the host's; a custom name must be valid, as in a submission.
pub fn kind_from_wit(kind: wit::MessageKind) -> Result<MessageKind, HostError> {
    let kind = match kind {
        wit::MessageKind::Chat => MessageKind::Chat,
        wit::MessageKind::Receipt => MessageKind::Receipt,
        wit::MessageKind::Presence => MessageKind::Presence,
        wit::MessageKind::Custom(name) => MessageKind::Custom(name),
    };
    kind.check()
        .map_err(|e| HostError::InvalidArgument(e.to_string()))?;
    Ok(kind)
}

/// A stored message as the WIT's.
pub fn message_to_wit(message: &Message) -> wit::Message {
    wit::Message {
        id: message.id.0,
        kind: kind_to_wit(&message.kind),
        sender: message.from.to_string(),
        sender_device: message.from_device.to_string(),
        to: message.to.iter().map(|u| u.to_string()).collect(),
        body: message.body.clone(),
        sent_at: message.sent_at,
    }
}

/// A resolved user-list as the WIT's.
pub fn user_list_to_wit(list: &UserList) -> wit::UserList {
    wit::UserList {
        servers: list
            .servers
            .iter()
            .map(|server| wit::ServerRow {
                server: server.server.clone(),
                users: server
                    .users
                    .iter()
                    .map(|user| wit::UserRow {
                        user: user.user.to_string(),
                        devices: user
                            .devices
                            .iter()
                            .map(|d| wit::DeviceRow {
                                device: d.device.to_string(),
                                session: d.session.0,
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
}
