//! The host's services: one plain function per import of the `iim` interface, plus
//! [`send_to`] and [`forward`], which resolve and send in one call.
//!
//! In a component (`target_arch = "wasm32"`) each function calls the host. On any other target
//! it calls the [`FakeHost`](crate::testing::FakeHost) of the current thread, so a plugin's logic
//! runs natively under `cargo test`; with no fake host installed every call fails with
//! `unavailable` and log lines go to standard error.
//!
//! Every call acts on behalf of the acting user of the event being handled (see the WIT file).
//!
//! [`kv_keys`] and [`subscribe_groups`] are imports of `iim:plugin@0.1.1`, [`pass_on`] of
//! `0.1.2`: a host of an earlier version does not load a plugin that uses them.

use crate::{HostError, LogLevel, Message, MessageId, PresenceEntry, UserId, UserList};

/// `send` calls one event may make (the host's limit): more are `limit-exceeded`.
pub const MAX_SENDS_PER_EVENT: usize = 64;
/// Storage writes (`kv-set`, `kv-delete`) one event may make (the host's limit).
pub const MAX_KV_WRITES_PER_EVENT: usize = 256;
/// The longest storage key, in bytes (the host's limit).
pub const MAX_KV_KEY: usize = 256;
/// The largest stored value, in bytes (the host's limit).
pub const MAX_KV_VALUE: usize = 64 * 1024;
/// The most keys one [`kv_keys`] returns: a larger `limit` counts as this.
pub const MAX_KV_KEYS: u32 = 1000;

// The generated imports in a component; functions of the same signatures that call the fake
// host anywhere else.
#[cfg(target_arch = "wasm32")]
use crate::bindings::iim::plugin::iim as imp;
#[cfg(not(target_arch = "wasm32"))]
use crate::testing::calls as imp;

/// Resolves `users` into a user-list: their servers and online devices. Duplicates are
/// resolved once; an unknown user is `unknown-user`.
pub fn resolve(users: &[UserId]) -> Result<UserList, HostError> {
    imp::resolve(users)
}

/// The IIM entry point: sends `msg` to every user of `users` when `handle` returns `ok`.
///
/// `msg.id` is 0 for a new message (see [`Message::new`]) or the id of the message being
/// handled; `msg.sender` must be the acting user. Returns how many users it was sent to.
pub fn send(msg: &Message, users: &UserList) -> Result<u32, HostError> {
    imp::send(msg, users)
}

/// Since 0.1.2. Passes the message being handled on, unchanged (same id), to every user of
/// `users`: [`send`] of that message to [`resolve`]`(users)`, in one call and without the
/// message or a user-list crossing back to the host. Duplicates count once; an unknown user is
/// `unknown-user`; an event that is not a message is `invalid-argument`. Sends nothing and
/// returns 0 when `users` is empty.
pub fn pass_on(users: &[UserId]) -> Result<u32, HostError> {
    if users.is_empty() {
        return Ok(0);
    }
    imp::pass_on(users)
}

/// The acting user's friends; `permission-denied` for anyone else's.
pub fn friends(user: &str) -> Result<Vec<UserId>, HostError> {
    imp::friends(user)
}

/// The acting user's colleagues; `permission-denied` for anyone else's.
pub fn colleagues(user: &str) -> Result<Vec<UserId>, HostError> {
    imp::colleagues(user)
}

/// The presence of each of `users`, in the same order.
pub fn presence(users: &[UserId]) -> Result<Vec<PresenceEntry>, HostError> {
    imp::presence(users)
}

/// Message `id` of the acting user's inbox, if it is there (without its body once every device
/// of the user has acknowledged it, until it expires); `permission-denied` for anyone else's
/// inbox.
pub fn inbox_message(user: &str, id: MessageId) -> Result<Option<Message>, HostError> {
    imp::inbox_message(user, id)
}

/// A value from this plugin's own storage.
pub fn kv_get(key: &str) -> Result<Option<Vec<u8>>, HostError> {
    imp::kv_get(key)
}

/// Stores a value in this plugin's own storage, when `handle` returns `ok`.
pub fn kv_set(key: &str, value: &[u8]) -> Result<(), HostError> {
    imp::kv_set(key, value)
}

/// Removes a value from this plugin's own storage, when `handle` returns `ok`.
pub fn kv_delete(key: &str) -> Result<(), HostError> {
    imp::kv_delete(key)
}

/// Since 0.1.1. The keys of this plugin's storage that start with `prefix`, in byte order,
/// after `after` if it is given, at most `limit` of them (a `limit` over [`MAX_KV_KEYS`] counts
/// as that). The writes of the event being handled are seen, as [`kv_get`] sees them. To read
/// every key under a prefix, call it again with `after` = the last key returned, until it
/// returns fewer than asked.
pub fn kv_keys(prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<String>, HostError> {
    imp::kv_keys(prefix, after, limit)
}

/// Since 0.1.1. Makes this plugin the one that handles the conversations of groups: every
/// message addressed to a group (its `to` is one `#name`), whatever its kind, and every
/// delivery of such a message comes to it, each group's events to one instance, in order; and
/// it alone may send a new message addressed to a group or of kind
/// [`GROUP_KIND`](crate::GROUP_KIND). Allowed only during `init` (`permission-denied` while an
/// event is handled).
///
/// A plugin does not call it itself: it answers `true` from [`Plugin::groups`](crate::Plugin::groups)
/// and the SDK calls it during `init`.
pub fn subscribe_groups() -> Result<(), HostError> {
    imp::subscribe_groups()
}

/// Writes a line to the host's log, under this plugin's name. The [`info!`](crate::info) family
/// of macros formats and calls this.
pub fn log(level: LogLevel, message: &str) {
    imp::log(level, message);
}

/// Resolves `users`, then sends `msg` to them: the usual pair of calls. Sends nothing and
/// returns 0 when `users` is empty.
pub fn send_to(msg: &Message, users: &[UserId]) -> Result<u32, HostError> {
    if users.is_empty() {
        return Ok(0);
    }
    send(msg, &resolve(users)?)
}

/// Passes `msg`, the message being handled, on unchanged (same id) to the users it is
/// addressed to. The same as `send_to(msg, &msg.to)`.
pub fn forward(msg: &Message) -> Result<u32, HostError> {
    send_to(msg, &msg.to)
}
