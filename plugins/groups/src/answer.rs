//! What the plugin sends: a group's messages to its members, notices, replies and refusals.

use iim_plugin_sdk::body::{GroupNotice, GroupReply, GroupRequest, Receipt};
use iim_plugin_sdk::{HostError, Message, MessageKind, PluginError, UserId, UserList, host};

/// Most users one `resolve` names: the host's default `plugins.max_send_users`. A host
/// configured lower answers `limit-exceeded`, and the list is halved until it fits.
pub const RESOLVE_USERS: usize = 10_000;

/// Why a request or a message is not carried out.
#[derive(Debug)]
pub enum Failure {
    /// Refused, for this reason (a sentence naming the group): the sender is told with a
    /// `refused` receipt, and the event is handled (`ok`), so that the receipt is sent.
    Refused(String),
    /// The plugin failed: the event is retried.
    Plugin(PluginError),
}

impl From<PluginError> for Failure {
    fn from(e: PluginError) -> Self {
        Failure::Plugin(e)
    }
}

impl From<HostError> for Failure {
    fn from(e: HostError) -> Self {
        Failure::Plugin(e.into())
    }
}

/// A refusal for `reason`.
pub fn refused<T>(reason: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::Refused(reason.into()))
}

/// Sends `message` to `users`: resolved at most [`RESOLVE_USERS`] at a time, one send each.
/// A user the host no longer knows is left out (a group outlives nothing else, but a
/// member's account is not the plugin's to keep).
pub fn to_users(message: &Message, users: &[UserId]) -> Result<(), PluginError> {
    for chunk in users.chunks(RESOLVE_USERS) {
        send_resolved(message, chunk.to_vec())?;
    }
    Ok(())
}

fn send_resolved(message: &Message, mut users: Vec<UserId>) -> Result<(), PluginError> {
    loop {
        if users.is_empty() {
            return Ok(());
        }
        match host::resolve(&users) {
            Ok(list) => {
                host::send(message, &list)?;
                return Ok(());
            }
            Err(HostError::UnknownUser(gone)) => {
                iim_plugin_sdk::warn!("message {}: user {gone} is gone; left out", message.id);
                users.retain(|user| *user != gone);
            }
            Err(HostError::LimitExceeded(_)) if users.len() > 1 => {
                let second = users.split_off(users.len() / 2);
                send_resolved(message, users)?;
                return send_resolved(message, second);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Tells `members` of `group` what changed: a new `group` message addressed to the group,
/// from the acting user.
pub fn notice(group: &str, members: &[UserId], notice: &GroupNotice) -> Result<(), PluginError> {
    let message = Message::new(
        MessageKind::group(),
        vec![format!("#{group}")],
        notice.to_json(),
    );
    to_users(&message, members)
}

/// Sends `request` to `group` (without `#`), from the acting user, to be handled in the
/// group's order: a `group` message addressed to the group and sent to nobody, which the host
/// hands to this plugin as if the acting user had submitted it.
pub fn request(group: &str, request: &GroupRequest) -> Result<(), HostError> {
    let message = Message::new(
        MessageKind::group(),
        vec![format!("#{group}")],
        request.to_json(),
    );
    host::send(
        &message,
        &UserList {
            servers: Vec::new(),
        },
    )?;
    Ok(())
}

/// Answers `requester` with `reply`: a new `group` message to them only.
pub fn reply(requester: &str, reply: &GroupReply) -> Result<(), HostError> {
    let message = Message::new(
        MessageKind::group(),
        vec![requester.to_owned()],
        reply.to_json(),
    );
    host::send_to(&message, &message.to)?;
    Ok(())
}

/// Answers `request` that it was carried out.
pub fn done(request: &Message) -> Result<(), HostError> {
    reply(
        &request.sender,
        &GroupReply::Done {
            request: request.id,
        },
    )
}

/// Answers `request` with the replies `reply` makes of `items`, at most `per_part` items
/// each (in half as many if the host finds one over its body limit), then
/// [`GroupReply::Done`]: a client gathers the parts until `done`.
pub fn in_parts<T: Clone>(
    request: &Message,
    items: &[T],
    per_part: usize,
    reply: impl Fn(&[T]) -> GroupReply,
) -> Result<(), HostError> {
    if items.is_empty() {
        send_part(&request.sender, items, &reply)?;
    }
    for part in items.chunks(per_part.max(1)) {
        send_part(&request.sender, part, &reply)?;
    }
    done(request)
}

fn send_part<T: Clone>(
    requester: &str,
    items: &[T],
    reply: &impl Fn(&[T]) -> GroupReply,
) -> Result<(), HostError> {
    match self::reply(requester, &reply(items)) {
        Err(HostError::LimitExceeded(_)) if items.len() > 1 => {
            let (first, second) = items.split_at(items.len() / 2);
            send_part(requester, first, reply)?;
            send_part(requester, second, reply)
        }
        result => result,
    }
}

/// Tells the sender of `message` why it was not carried out: a new `receipt` message to them
/// only, `refused`, naming the message.
pub fn refuse(message: &Message, reason: &str) -> Result<(), PluginError> {
    iim_plugin_sdk::debug!(
        "message {} from {} refused: {reason}",
        message.id,
        message.sender
    );
    let body = Receipt::Refused {
        id: message.id,
        users: Vec::new(),
        reason: reason.to_owned(),
    }
    .to_json();
    let receipt = Message::new(MessageKind::Receipt, vec![message.sender.clone()], body);
    host::send_to(&receipt, &receipt.to)?;
    Ok(())
}
