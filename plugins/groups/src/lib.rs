//! The groups plugin: conversations of many, named `#name`, with members and roles.
//!
//! At `init` it subscribes to groups (`subscribe-groups`): the host hands it every message
//! addressed to a group, of any kind, and every delivery of one, each group's events to one
//! instance in the order the host accepted them. It also subscribes to `message(group)`, for
//! the one request a user addresses to themself (`list`).
//!
//! - A `group` message to `#g` is a request (`create`, `rename`, `delete`, `add`, `remove`,
//!   `leave`, `role`, `members`, `receipts`; `requests`). A change is told to the members
//!   concerned with a `group` notice addressed to `#g`, and the requester gets a `done`
//!   reply; a question gets its answer in one or more replies, then `done`.
//! - Any other message to `#g` from a member is passed on unchanged (same id) to every member,
//!   the sender included (`conversation`); a `receipt` to `#g` is a member's read report.
//! - A delivery of a group's message counts the member once; the sender gets the delivered and
//!   read counts as each reaches 1, 2, 4, 8, … and every member.
//! - Anything refused (not a member, not allowed, malformed, a limit) is answered with a
//!   `refused` receipt to the sender, naming the group, and the event is handled (`ok`): a
//!   rejected event's sends would be dropped, the receipt with them.
//!
//! Configuration (`groups.toml`): `max_members` (members per group, the owner included;
//! default and most 10,000) and `max_groups` (groups per user; default 1000, most 4000). Any
//! other key is `invalid-config`. `docs/plugins.md` ("The groups plugin") documents the
//! bodies and rules for client authors; `store` documents the storage layout.

mod answer;
mod cleanup;
mod conversation;
mod requests;
mod store;

use answer::Failure;
use iim_plugin_sdk::body::ACCOUNT_DELETED_KIND;
use iim_plugin_sdk::{Config, Event, Message, MessageKind, Plugin, PluginError, Subscription};
use requests::Limits;
use store::Storage;

/// The largest `max_members`: a `members` answer for 10,000 takes 34 of the 64 messages an
/// event may send.
pub const MAX_MEMBERS: u32 = 10_000;
/// The largest `max_groups`: a `list` answer for 4000 takes 50 messages.
pub const MAX_GROUPS: u32 = 4000;

/// The groups plugin.
#[derive(Debug)]
pub struct Groups {
    limits: Limits,
}

impl Groups {
    /// Members per group, the owner included.
    pub fn max_members(&self) -> u32 {
        self.limits.max_members
    }

    /// Groups per user.
    pub fn max_groups(&self) -> u32 {
        self.limits.max_groups
    }

    /// A message addressed to `group`.
    fn to_group(&self, store: &mut Storage, group: &str, message: &Message) -> Result<(), Failure> {
        match &message.kind {
            kind if *kind == MessageKind::group() => {
                requests::to_group(self.limits, store, group, message)
            }
            MessageKind::Receipt => conversation::receipt(store, group, message),
            _ => conversation::forward(store, group, message),
        }
    }
}

fn limit(config: &Config, key: &str, default: u32, most: u32) -> Result<u32, PluginError> {
    let value = config.parse_or(key, default)?;
    if !(1..=most).contains(&value) {
        return Err(PluginError::InvalidConfig(format!(
            "`{key} = {value}`: it is 1 to {most}"
        )));
    }
    Ok(value)
}

impl Plugin for Groups {
    const NAME: &'static str = "groups";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new(config: &Config) -> Result<Self, PluginError> {
        config.deny_unknown(&["max_members", "max_groups"])?;
        Ok(Groups {
            limits: Limits {
                max_members: limit(config, "max_members", MAX_MEMBERS, MAX_MEMBERS)?,
                max_groups: limit(config, "max_groups", 1000, MAX_GROUPS)?,
            },
        })
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        // Messages to groups come through `groups`; a `list` request is addressed to its
        // requester, so it comes as a `group` message to a user. A deleted account leaves its
        // groups (`requests::forget_everywhere`).
        vec![
            Subscription::Message(MessageKind::group()),
            Subscription::Message(MessageKind::Custom(ACCOUNT_DELETED_KIND.into())),
        ]
    }

    fn groups(&self) -> bool {
        true
    }

    fn handle(&self, event: Event) -> Result<(), PluginError> {
        let mut store = Storage::new();
        match event {
            Event::Message(message)
                if message.kind == MessageKind::Custom(ACCOUNT_DELETED_KIND.into()) =>
            {
                requests::forget_everywhere(&mut store, &message.sender)
            }
            Event::Message(message) => {
                let group = message.group().map(str::to_owned);
                let outcome = match &group {
                    Some(group) => self.to_group(&mut store, group, &message),
                    None => requests::to_self(&mut store, &message),
                };
                match outcome {
                    Ok(()) => {}
                    Err(Failure::Refused(reason)) => answer::refuse(&message, &reason)?,
                    Err(Failure::Plugin(e)) => return Err(e),
                }
                match &group {
                    Some(group) => cleanup::run(&mut store, group),
                    None => Ok(()),
                }
            }
            Event::Delivered(delivery) => conversation::delivered(&mut store, &delivery),
            Event::SessionOpened(_) | Event::SessionClosed(_) => Err(PluginError::Rejected(
                "the groups plugin handles messages and deliveries only".to_owned(),
            )),
        }
    }
}

iim_plugin_sdk::export_plugin!(Groups);

#[cfg(test)]
mod tests;
