//! A group's conversation: its members' messages passed on to every member, and the counts of
//! who got and read each, told to its sender as they reach 1, 2, 4, 8, … and every member.

use crate::answer::{self, Failure, refused};
use crate::cleanup::{self, Job};
use crate::store::{Mark, Storage, Tracked};
use iim_plugin_sdk::body::{ReadReport, Receipt};
use iim_plugin_sdk::{Delivery, Message, MessageKind, PluginError, host};

/// How many of a group's latest messages keep their receipt counts: a message to `m` members
/// keeps up to `2m` marks, so a group of 10,000 keeps at most 2 million.
pub const KEEP_RECEIPTS: u32 = 100;

/// A message of a member to group `group`: passed on unchanged (same id) to every member, the
/// sender included, so that all the sender's devices have the group's history in one order.
pub fn forward(store: &mut Storage, group: &str, message: &Message) -> Result<(), Failure> {
    let Some(mut record) = store.group(group)? else {
        return refused(format!(
            "you are not a member of #{group}: there is no such group"
        ));
    };
    let generation = record.generation;
    if store.role(group, generation, &message.sender)?.is_none() {
        return refused(format!("you are not a member of #{group}"));
    }
    let members = store.members(group, generation)?;
    answer::to_users(message, &members)?;
    // Handled again (a host that restarted before it recorded the first time): the counts so
    // far stay.
    if store.tracked(group, generation, message.id)?.is_some() {
        return Ok(());
    }
    let tracked = Tracked {
        sender: message.sender.clone(),
        members: u32::try_from(members.len().saturating_sub(1)).unwrap_or(u32::MAX),
        delivered: 0,
        read: 0,
    };
    store.save_tracked(group, generation, message.id, &tracked)?;
    store.track_in_order(group, generation, record.tracked_ever, message.id)?;
    record.tracked_ever += 1;
    record.tracked += 1;
    if record.tracked > KEEP_RECEIPTS
        && let Some(oldest) = store.take_oldest_tracked(group, generation)?
    {
        store.delete_tracked(group, generation, oldest)?;
        cleanup::add(
            store,
            group,
            Job::Receipts {
                generation,
                id: oldest,
            },
        )?;
        record.tracked -= 1;
    }
    store.save_group(group, &record)?;
    Ok(())
}

/// A `receipt` message addressed to group `group`: a member reports reading one of its
/// messages (`{"state":"read","id":…}`), or the member's home host, when it is not the
/// group's, reports that a device of the member got one (`delivered`, naming the member).
/// Counted once per member; passed on to no one.
pub fn receipt(store: &mut Storage, group: &str, report: &Message) -> Result<(), Failure> {
    let member = &report.sender;
    let (id, mark) = match (
        ReadReport::from_json(&report.body),
        Receipt::from_json(&report.body),
    ) {
        (Ok(ReadReport { id }), _) => (id, Mark::Read),
        (_, Ok(Receipt::Delivered { id, user, .. })) if user == *member => (id, Mark::Delivered),
        _ => {
            return refused(format!(
                r#"a receipt addressed to #{group} is a read report, {{"state":"read","id":<message id>}}"#
            ));
        }
    };
    let Some(record) = store.group(group)? else {
        return refused(format!(
            "you are not a member of #{group}: there is no such group"
        ));
    };
    let generation = record.generation;
    if store.role(group, generation, member)?.is_none() {
        return refused(format!("you are not a member of #{group}"));
    }
    let Some(mut tracked) = store.tracked(group, generation, id)? else {
        iim_plugin_sdk::debug!("#{group}: receipt for message {id}, whose counts are not kept");
        return Ok(());
    };
    // The sender's own devices are not news.
    if tracked.sender == *member {
        return Ok(());
    }
    if mark == Mark::Read && !got(store, group, generation, id, member)? {
        // A message the reader never got cannot be read.
        return Ok(());
    }
    if store.mark(group, generation, id, mark, member)? {
        match mark {
            Mark::Delivered => tracked.delivered += 1,
            Mark::Read => tracked.read += 1,
        }
        counted(store, group, generation, id, &tracked, mark)?;
    }
    Ok(())
}

/// Whether `member` got message `id`: a device of theirs acknowledged it (counted), or it is
/// in their inbox on this host.
fn got(
    store: &Storage,
    group: &str,
    generation: u64,
    id: u64,
    member: &str,
) -> Result<bool, Failure> {
    if store.is_marked(group, generation, id, Mark::Delivered, member)? {
        return Ok(true);
    }
    Ok(host::inbox_message(member, id)?.is_some())
}

/// A device of a member acknowledged a message of a group: the member is counted once, at
/// their first device; the sender's own devices are not counted.
pub fn delivered(store: &mut Storage, delivery: &Delivery) -> Result<(), PluginError> {
    let recipient = &delivery.recipient;
    // The delivery does not say the group; the message in the recipient's inbox does.
    let Some(message) = host::inbox_message(recipient, delivery.id)? else {
        return Ok(());
    };
    let Some(group) = message.group() else {
        return Ok(());
    };
    if *recipient != delivery.sender {
        count_delivery(store, group, delivery)?;
    }
    cleanup::run(store, group)
}

fn count_delivery(
    store: &mut Storage,
    group: &str,
    delivery: &Delivery,
) -> Result<(), PluginError> {
    let Some(record) = store.group(group)? else {
        return Ok(());
    };
    let generation = record.generation;
    // A notice, or a message whose counts are no longer kept.
    let Some(mut tracked) = store.tracked(group, generation, delivery.id)? else {
        return Ok(());
    };
    if store.mark(
        group,
        generation,
        delivery.id,
        Mark::Delivered,
        &delivery.recipient,
    )? {
        tracked.delivered += 1;
        counted(
            store,
            group,
            generation,
            delivery.id,
            &tracked,
            Mark::Delivered,
        )?;
    }
    Ok(())
}

/// Records `tracked`, whose `moved` count just grew by one, and tells the sender if that count
/// reached a power of two or every member: about `2 log2 m` receipts for `m` members, not `2m`.
fn counted(
    store: &mut Storage,
    group: &str,
    generation: u64,
    id: u64,
    tracked: &Tracked,
    moved: Mark,
) -> Result<(), PluginError> {
    store.save_tracked(group, generation, id, tracked)?;
    let count = match moved {
        Mark::Delivered => tracked.delivered,
        Mark::Read => tracked.read,
    };
    if !(count.is_power_of_two() || count == tracked.members) {
        return Ok(());
    }
    let body = Receipt::Counts {
        id,
        group: group.to_owned(),
        members: tracked.members,
        delivered: tracked.delivered,
        read: tracked.read,
    }
    .to_json();
    let receipt = Message::new(MessageKind::Receipt, vec![tracked.sender.clone()], body);
    host::send_to(&receipt, &receipt.to)?;
    Ok(())
}
