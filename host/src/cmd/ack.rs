//! `Ack`: what a device's acknowledgements cause. Its cursor is saved once for the
//! acknowledgements read together, the inbox is pruned up to the lowest cursor of the user's
//! devices, and `delivered` is raised for the plugins that want to hear of it.

use crate::Host;
use crate::plugin::{Delivered, Event};
use iim_proto::Message;
use iim_proto::session::Identity;
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
    for message in messages {
        let group = message.group();
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
