//! The built-in handling of `chat` messages: deliver to the addressees.
//!
//! This is messaging policy, and it moves into the chat plugin when the plugin runtime lands;
//! it already goes only through the IIM entry point (`resolve`, then `send`), as a plugin will.

use crate::iim::{Iim, IimError, SendReport};
use iim_proto::Message;

/// Delivers a chat message to its addressees.
pub fn handle(iim: &Iim, message: &Message) -> Result<SendReport, IimError> {
    let list = iim.resolve(&message.to)?;
    iim.send(message, &list)
}
