//! The key directory plugin: where devices publish what others need to encrypt to them end to
//! end (issue 17), and where others fetch it.
//!
//! Each device has a card (its public keys, self-signed: `iim_e2ee::DeviceCard`) and publishes
//! one-time MLS key packages. Both are opaque bytes here: the plugin has no cryptography and
//! cannot verify a signature; clients verify cards against the fingerprints they pinned. What
//! the plugin guarantees is *where* a card is stored: under the user and device that sent it,
//! never under names taken from a body, so a user can publish, replace or remove only their
//! own devices' cards.
//!
//! Subscribes to `message(keys)`. A device sends a `keys` message addressed to its own user,
//! whose body is `{"op": ...}` (`iim_proto::body::keys::KeysRequest`):
//! - `publish`: stores the sending device's card (replacing its older one) and adds its key
//!   packages to those waiting;
//! - `unpublish`: removes a device's card and waiting key packages (any device of the user may
//!   remove any other: a device revoked, or logged out);
//! - `cards`: the cards of every device of some users (anyone's);
//! - `claim`: takes one key package of each device named (given to no one else), with its
//!   card; devices with none left are `missing`.
//!
//! The answer is a `keys` message to the user (`iim_proto::body::keys::KeysReply`), naming the
//! request's id and the device that sent it; a refusal is a `refused` reply with the reason, and
//! changes nothing. It takes no configuration (any key is `invalid-config`), but must run with
//! one instance (`store` says why). `README.md` documents the bodies for client authors;
//! `store` documents the storage layout.

mod answer;
mod requests;
mod store;

use answer::Request;
use iim_plugin_sdk::body::ACCOUNT_DELETED_KIND;
use iim_plugin_sdk::body::keys::{Answer, KEYS_KIND};
use iim_plugin_sdk::{Config, Event, MessageKind, Plugin, PluginError, Subscription};
use requests::Failure;

/// The largest card, in bytes (a real one is a few hundred).
pub const MAX_CARD: usize = 4 * 1024;
/// The largest key package, in bytes (a real one is a few hundred).
pub const MAX_KEY_PACKAGE: usize = 16 * 1024;
/// Most key packages one `publish` adds.
pub const MAX_PACKAGES_PER_REQUEST: usize = 20;
/// Most key packages of one device waiting to be claimed: a `publish` past it is refused.
pub const MAX_WAITING: usize = 100;
/// Most devices of one user with a card published: a new device's `publish` past it is
/// refused.
pub const MAX_DEVICES: usize = 32;
/// Most key packages of all of one user's devices waiting: so that everything of a user fits
/// in the writes of one event, which a deleted account's notice makes (`store::forget_user`).
pub const MAX_WAITING_PER_USER: usize = 200;
/// Most users one `cards`, or devices one `claim`, names.
pub const MAX_NAMES: usize = 64;
/// The longest user or device name, in bytes (the host's).
pub const MAX_NAME: usize = 64;

/// The key directory plugin.
#[derive(Debug)]
pub struct Keys;

impl Plugin for Keys {
    const NAME: &'static str = "keys";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new(config: &Config) -> Result<Self, PluginError> {
        config.deny_unknown(&[])?;
        Ok(Keys)
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![
            Subscription::Message(MessageKind::Custom(KEYS_KIND.into())),
            // The host's notice that an account was deleted: its cards and packages go.
            Subscription::Message(MessageKind::Custom(ACCOUNT_DELETED_KIND.into())),
        ]
    }

    fn handle(&self, event: Event) -> Result<(), PluginError> {
        let Event::Message(message) = event else {
            return Err(PluginError::Rejected(
                "the keys plugin handles keys messages only".to_owned(),
            ));
        };
        if message.kind == MessageKind::Custom(ACCOUNT_DELETED_KIND.into()) {
            let removed = store::forget_user(&message.sender)?;
            iim_plugin_sdk::debug!(
                "{}'s account deleted: {removed} keys removed",
                message.sender
            );
            return Ok(());
        }
        let request = Request { message: &message };
        match requests::carry_out(request) {
            Ok(()) => Ok(()),
            // Answered, and the event handled: a rejected event's sends would be dropped.
            Err(Failure::Refused(reason)) => {
                iim_plugin_sdk::debug!(
                    "keys request {} from {}/{} refused: {reason}",
                    message.id,
                    message.sender,
                    message.sender_device
                );
                request.reply(Answer::Refused { reason })?;
                Ok(())
            }
            Err(Failure::Plugin(e)) => Err(e),
        }
    }
}

iim_plugin_sdk::export_plugin!(Keys);

#[cfg(test)]
mod tests;
