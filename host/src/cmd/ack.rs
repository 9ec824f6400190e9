//! `Ack`: what a device's acknowledgements cause. Its cursor is saved once for the
//! acknowledgements read together, the inbox is pruned up to the lowest cursor of the user's
//! devices, and `delivered` is raised for the plugins that want to hear of it.

use crate::Host;
use crate::iim::Home;
use crate::plugin::{Delivered, Event};
use iim_proto::body::Receipt;
use iim_proto::session::Identity;
use iim_proto::{Address, GroupId, Message, MessageKind};
use std::sync::Arc;

/// Writes the device's new cursor and prunes what every device of the user has now
/// acknowledged. Not flushed: a cursor lost in a crash only means a redelivery, which the
/// device recognises by the message id (and the pruning written after it is lost with it).
pub fn save_cursor(host: &Host, who: &Identity, cursor: u64) {
    let store = &host.store;
    if let Err(e) = store
        .cursors
        .set(&who.user, &who.device, cursor)
        .and_then(|()| store.inbox.prune(&who.user))
    {
        tracing::error!(error = %e, "cursor not saved or inbox not pruned");
    }
}

/// Raises `delivered` for each acknowledged message whose kind a plugin wants it for; a
/// message addressed to a group, for the plugin that handles groups.
pub async fn delivered(host: &Host, who: &Identity, messages: Vec<Arc<Message>>) {
    crate::metrics::metrics().acks.inc_by(messages.len() as u64);
    for message in messages {
        let group = message.group();
        if let Some(group) = group
            && let Home::Remote(server) = host.iim.group_home(group)
        {
            tell_group_home(host, who, &message, group, server);
            continue;
        }
        let wanted = match group {
            Some(_) => host.plugins.handles_groups(),
            None => host.plugins.wants_delivered(&message.kind),
        };
        if !wanted {
            continue;
        }
        let delivered = Delivered {
            id: message.id,
            kind: message.kind.clone(),
            sender: message.from.clone(),
            sender_device: message.from_device.clone(),
            recipient: who.user.clone(),
            recipient_device: who.device.clone(),
        };
        let event = match group {
            Some(group) => Event::GroupDelivered(delivered, group.clone()),
            None => Event::Delivered(delivered),
        };
        host.plugins.raise(event).await;
    }
}

/// A device of this host got a message of a group whose home is another host: its groups
/// plugin, which counts deliveries for the sender, learns it there, from the member, in a
/// `delivered` receipt addressed to the group. Not for the sender's own devices. Like a
/// `delivered` event, it lives in memory until relayed: a crash may lose one.
fn tell_group_home(
    host: &Host,
    who: &Identity,
    message: &Message,
    group: &GroupId,
    server: String,
) {
    if who.user == message.from {
        return;
    }
    let body = Receipt::Delivered {
        id: message.id.0,
        user: who.user.to_string(),
        device: who.device.to_string(),
    }
    .to_json();
    let told = host
        .store
        .messages
        .number(|id| Message {
            id,
            kind: MessageKind::Receipt,
            from: who.user.clone(),
            from_device: who.device.clone(),
            to: vec![Address::Group(group.clone())],
            body,
            sent_at: crate::clock::now_ms(),
        })
        .map_err(crate::iim::IimError::from)
        .and_then(|receipt| host.iim.relay_to_group(&receipt, group, server));
    if let Err(e) = told {
        tracing::warn!(id = %message.id, %group, error = %e, "the group's home host was not told of a delivery");
    }
}
