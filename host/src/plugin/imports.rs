//! The host's side of interface `iim`: what a plugin may call.
//!
//! Every import checks its arguments first, and acts only for the user who caused the event
//! being handled (the acting user). Effects (`send`, `kv-set`, `kv-delete`) are not applied
//! here: they are collected into the call's [`Effects`], which the plugin's lane applies once
//! `handle` returns `ok`. A call that traps or fails leaves nothing behind, so a retried event
//! has its effects once.
//!
//! Two levels of error, as the WIT says: the inner `result` is a [`HostError`] the plugin
//! handles (bad argument, not allowed, or `unavailable` when the host's store failed, so that
//! the plugin fails and its event is retried); the outer `wasmtime::Result` would trap the
//! guest, and none of these imports returns an error there.

use super::bindings::iim::plugin::iim::Host as IimHost;
use super::bindings::iim::plugin::types::{
    self as wit, HostError, LogLevel, PresenceEntry, PresenceState,
};
use super::convert;
use crate::iim::{Iim, IimError};
use crate::registry::Registry;
use crate::store::Store;
use iim_proto::{Address, DeviceId, Message, MessageId, MessageKind, UserId};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Longest key of a plugin's storage, in bytes.
pub const MAX_KV_KEY: usize = 256;
/// Largest value of a plugin's storage, in bytes.
pub const MAX_KV_VALUE: usize = 64 * 1024;
/// `send` calls one `handle` may make.
pub const MAX_SENDS_PER_CALL: usize = 64;
/// Most keys one `kv-keys` returns.
pub const MAX_KV_KEYS: usize = 1000;
/// Storage writes one `handle` may make.
pub const MAX_KV_WRITES_PER_CALL: usize = 256;
/// Longest log line kept, in bytes: of the `log` import, and of a plugin's stdout and stderr
/// ([`super::stdio`]).
pub const MAX_LOG_LINE: usize = 4096;

/// What the imports need from the host.
pub struct Services {
    /// Durable state.
    pub store: Store,
    /// Online devices.
    pub registry: Arc<Registry>,
    /// The IIM entry point.
    pub iim: Arc<Iim>,
    /// Largest message body.
    pub max_body: u32,
    /// Largest frame a delivery must fit in.
    pub max_frame: u32,
    /// Most users one `send` or `resolve` may name.
    pub max_send_users: usize,
}

/// A message a plugin sent, to be delivered when its call succeeds.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// The message being handled, passed on unchanged.
    Forward(Arc<Message>),
    /// A new message from the acting user's device; the host numbers it when it is sent.
    New {
        /// Its kind.
        kind: MessageKind,
        /// Whom it is addressed to.
        to: Vec<Address>,
        /// Its body.
        body: Vec<u8>,
    },
}

/// One `send`, checked.
#[derive(Debug, Clone)]
pub struct PendingSend {
    /// The message.
    pub message: Outgoing,
    /// Its recipients, each once.
    pub users: Vec<UserId>,
}

/// The effects of one call, applied only if it returns `ok`.
#[derive(Debug, Default)]
pub struct Effects {
    /// Messages sent, in order.
    pub sends: Vec<PendingSend>,
    /// Storage writes: `None` deletes.
    pub kv: BTreeMap<String, Option<Vec<u8>>>,
    kv_writes: usize,
}

/// Who a call acts for, and what it has done so far.
pub struct Call {
    /// The user who caused the event.
    pub user: UserId,
    /// That user's device.
    pub device: DeviceId,
    /// The message being handled, for a message event.
    pub message: Option<Arc<Message>>,
    /// Whether the plugin handles groups: only it may send to a group, or a `group` message.
    pub groups: bool,
    /// Effects collected so far.
    pub effects: Effects,
}

/// The data of one plugin instance's store.
pub struct PluginState {
    plugin: Arc<str>,
    services: Arc<Services>,
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    /// `wasi:http`: its context, and the hooks that send what the plugin may send.
    http: wasmtime_wasi_http::WasiHttpCtx,
    http_hooks: super::http::PluginHttp,
    call: Option<Call>,
    /// Whether the plugin called `subscribe-groups` in its `init`.
    groups: bool,
    /// The clock of the call in progress, for the epoch callback.
    pub(super) clock: super::runtime::CallClock,
}

impl PluginState {
    /// The state of a new instance of plugin `plugin`.
    pub fn new(
        plugin: &str,
        services: Arc<Services>,
        wasi: WasiCtx,
        (table, limits): (ResourceTable, StoreLimits),
        outbound: Arc<super::http::Policy>,
    ) -> Self {
        Self {
            plugin: plugin.into(),
            services,
            wasi,
            table,
            limits,
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            http_hooks: super::http::PluginHttp(outbound),
            call: None,
            groups: false,
            clock: Default::default(),
        }
    }

    /// The state of a call made from native code rather than from a component: the same
    /// imports, with no WASI and no limits. For benchmarks that compare a native handler with
    /// a plugin, and for tests of the imports.
    pub fn native(plugin: &str, services: Arc<Services>) -> Self {
        Self::new(
            plugin,
            services,
            wasmtime_wasi::WasiCtxBuilder::new().build(),
            (ResourceTable::new(), StoreLimits::default()),
            Arc::new(super::http::Policy::none(plugin)),
        )
    }

    /// The store limits, for the store's limiter.
    pub fn limits(&mut self) -> &mut StoreLimits {
        &mut self.limits
    }

    /// Starts a call acting for `call.user`.
    pub fn begin(&mut self, call: Call) {
        self.call = Some(call);
    }

    /// Whether the plugin asked for the conversations of groups in its `init`.
    pub fn subscribed_groups(&self) -> bool {
        self.groups
    }

    /// Ends the current call and returns what it did.
    pub fn end(&mut self) -> Option<Call> {
        self.call.take()
    }

    fn call(&mut self, import: &str) -> Result<&mut Call, HostError> {
        self.call.as_mut().ok_or_else(|| {
            HostError::PermissionDenied(format!("{import} is only allowed while handling an event"))
        })
    }

    fn acting(&mut self, import: &str, user: &str) -> Result<UserId, HostError> {
        let call = self.call(import)?;
        if call.user.as_str() != user {
            return Err(HostError::PermissionDenied(format!(
                "{import} is only allowed for the acting user {}, not {user}",
                call.user
            )));
        }
        Ok(call.user.clone())
    }

    /// Checks a list of user names: how many, and that each is valid.
    fn parse_users(&self, names: &[String]) -> Result<Vec<UserId>, HostError> {
        check_user_names(names, self.services.max_send_users)
    }

    /// Checks a list of user names, and that each user exists.
    fn existing_users(&self, names: &[String]) -> Result<Vec<UserId>, HostError> {
        let users = self.parse_users(names)?;
        for user in &users {
            self.check_exists(user)?;
        }
        Ok(users)
    }

    /// Checks that `user` exists, on this host or another of its network.
    fn check_exists(&self, user: &UserId) -> Result<(), HostError> {
        match self.services.iim.exists(user) {
            Ok(true) => Ok(()),
            Ok(false) => Err(HostError::UnknownUser(user.to_string())),
            Err(e) => Err(unavailable(e)),
        }
    }

    fn check_send(&mut self, msg: wit::Message, list: wit::UserList) -> Result<u32, HostError> {
        let services = Arc::clone(&self.services);
        let limits = SendLimits {
            max_body: services.max_body,
            max_frame: services.max_frame,
            max_users: services.max_send_users,
        };
        let server = services.iim.server();
        let directory = services.iim.directory();
        let known_server =
            |row: &str| row == server || directory.is_some_and(|d| d.server_info(row).is_some());
        let call = self.call("send")?;
        let send = check_send_arguments(call, limits, msg, &list, known_server)?;
        for user in &send.users {
            self.check_exists(user)?;
        }
        let count = send.users.len() as u32;
        let call = self.call("send")?;
        call.effects.sends.push(send);
        Ok(count)
    }

    fn check_pass_on(&mut self, names: &[String]) -> Result<u32, HostError> {
        let users = self.parse_users(names)?;
        let call = self.call("pass-on")?;
        let Some(handled) = call.message.clone() else {
            return Err(HostError::InvalidArgument(
                "pass-on passes on the message being handled, and this event is not a message"
                    .into(),
            ));
        };
        if users.is_empty() {
            return Ok(0);
        }
        check_sends_left(call)?;
        let mut recipients = Vec::with_capacity(users.len());
        let mut seen = HashSet::with_capacity(users.len());
        for user in users {
            if seen.insert(user.clone()) {
                self.check_exists(&user)?;
                recipients.push(user);
            }
        }
        let count = recipients.len() as u32;
        self.call("pass-on")?.effects.sends.push(PendingSend {
            message: Outgoing::Forward(handled),
            users: recipients,
        });
        Ok(count)
    }

    fn kv_write(&mut self, key: String, value: Option<Vec<u8>>) -> Result<(), HostError> {
        check_kv_write(&key, value.as_deref())?;
        let call = self.call("kv-set and kv-delete")?;
        if call.effects.kv_writes >= MAX_KV_WRITES_PER_CALL {
            return Err(HostError::LimitExceeded(format!(
                "at most {MAX_KV_WRITES_PER_CALL} storage writes per event"
            )));
        }
        call.effects.kv_writes += 1;
        call.effects.kv.insert(key, value);
        Ok(())
    }
}

/// The limits `send` checks a message and its user-list against.
#[derive(Debug, Clone, Copy)]
pub struct SendLimits {
    /// Largest message body.
    pub max_body: u32,
    /// Largest frame a delivery must fit in.
    pub max_frame: u32,
    /// Most users one user-list may name.
    pub max_users: usize,
}

/// Checks the arguments of a `send` made during `call`, before anything is looked up: the
/// sender is the acting user; the call has sends left; the message is a new one within the
/// limits or the one being handled, passed on unchanged; the user-list's servers are known
/// (`known_server`), its names valid and each user named once, at most `limits.max_users`.
/// Whether each user exists is the caller's to check. A function of its arguments alone, so
/// that it can be fuzzed (`fuzz/fuzz_targets/plugin_imports.rs`).
pub fn check_send_arguments(
    call: &Call,
    limits: SendLimits,
    msg: wit::Message,
    list: &wit::UserList,
    known_server: impl Fn(&str) -> bool,
) -> Result<PendingSend, HostError> {
    if msg.sender != call.user.as_str() {
        return Err(HostError::ForgedSender(msg.sender));
    }
    check_sends_left(call)?;
    let message = match (&call.message, msg.id) {
        (_, 0) => {
            let kind = convert::kind_from_wit(msg.kind)?;
            if msg.body.len() > limits.max_body as usize {
                return Err(HostError::LimitExceeded(format!(
                    "body of {} bytes is over the limit of {}",
                    msg.body.len(),
                    limits.max_body
                )));
            }
            let to = msg
                .to
                .iter()
                .map(|name| parse_address(name))
                .collect::<Result<Vec<_>, _>>()?;
            if to.len() > iim_proto::MAX_TARGETS {
                return Err(HostError::LimitExceeded(format!(
                    "a message names at most {} recipients",
                    iim_proto::MAX_TARGETS
                )));
            }
            let to_group = to.iter().any(|a| a.group().is_some());
            if to_group && to.len() > 1 {
                return Err(HostError::InvalidArgument(
                    "a message is addressed to users or to one group, not both".into(),
                ));
            }
            if let MessageKind::Custom(k) = &kind
                && iim_proto::body::is_host_notice(k)
            {
                return Err(HostError::PermissionDenied(format!(
                    "kind {k} is the host's own: its notices to plugins"
                )));
            }
            let group_kind = matches!(&kind, MessageKind::Custom(k) if k == iim_proto::GROUP_KIND);
            if (to_group || group_kind) && !call.groups {
                return Err(HostError::PermissionDenied(
                    "only the plugin that handles groups may send a message addressed to \
                         a group or of kind group"
                        .into(),
                ));
            }
            let probe = Message {
                id: MessageId(0),
                kind: kind.clone(),
                from: call.user.clone(),
                from_device: call.device.clone(),
                to: to.clone(),
                body: msg.body.clone(),
                sent_at: 0,
            };
            probe
                .check_deliverable(limits.max_frame)
                .map_err(|e| HostError::LimitExceeded(e.to_string()))?;
            Outgoing::New {
                kind,
                to,
                body: msg.body,
            }
        }
        (Some(handled), id) if id == handled.id.0 => {
            let kind = convert::kind_from_wit(msg.kind)?;
            if kind != handled.kind || msg.body != handled.body {
                return Err(HostError::InvalidArgument(format!(
                    "message {id} is passed on with another kind or body; send a new \
                         message (id 0) instead"
                )));
            }
            Outgoing::Forward(Arc::clone(handled))
        }
        (_, id) => return Err(HostError::UnknownMessage(id)),
    };
    let mut users = Vec::new();
    let mut seen = HashSet::new();
    for row in &list.servers {
        if !known_server(&row.server) {
            return Err(HostError::UnknownServer(row.server.clone()));
        }
        for user_row in &row.users {
            let user = parse_user(&user_row.user)?;
            for device in &user_row.devices {
                DeviceId::new(&device.device).map_err(|e| {
                    HostError::InvalidArgument(format!(
                        "device {:?} of user {user}: {e}",
                        device.device
                    ))
                })?;
            }
            if !seen.insert(user.clone()) {
                return Err(HostError::InvalidArgument(format!(
                    "user {user} appears twice in the user-list"
                )));
            }
            if seen.len() > limits.max_users {
                return Err(HostError::LimitExceeded(format!(
                    "a user-list names at most {} users",
                    limits.max_users
                )));
            }
            users.push(user);
        }
    }
    Ok(PendingSend { message, users })
}

/// `limit-exceeded` once `call` has made the most sends an event may.
fn check_sends_left(call: &Call) -> Result<(), HostError> {
    if call.effects.sends.len() >= MAX_SENDS_PER_CALL {
        return Err(HostError::LimitExceeded(format!(
            "at most {MAX_SENDS_PER_CALL} sends per event"
        )));
    }
    Ok(())
}

/// Checks a list of user names (of `resolve` and `presence`): at most `max`, each valid.
pub fn check_user_names(names: &[String], max: usize) -> Result<Vec<UserId>, HostError> {
    if names.len() > max {
        return Err(HostError::LimitExceeded(format!(
            "{} users named; at most {max}",
            names.len()
        )));
    }
    names.iter().map(|name| parse_user(name)).collect()
}

/// Checks the arguments of `kv-set` (`value`) and `kv-delete` (none): the key's length and
/// the value's size.
pub fn check_kv_write(key: &str, value: Option<&[u8]>) -> Result<(), HostError> {
    check_key(key)?;
    if let Some(v) = value
        && v.len() > MAX_KV_VALUE
    {
        return Err(HostError::LimitExceeded(format!(
            "a stored value is at most {MAX_KV_VALUE} bytes"
        )));
    }
    Ok(())
}

/// Checks the arguments of `kv-keys`: the prefix and the key to start after are at most
/// [`MAX_KV_KEY`] bytes (either may be empty).
pub fn check_key_range(prefix: &str, after: Option<&str>) -> Result<(), HostError> {
    if prefix.len() > MAX_KV_KEY || after.is_some_and(|a| a.len() > MAX_KV_KEY) {
        return Err(HostError::InvalidArgument(format!(
            "a storage key is at most {MAX_KV_KEY} bytes"
        )));
    }
    Ok(())
}

/// The line `log` keeps of `message`: its first [`MAX_LOG_LINE`] bytes, cut back to the last
/// whole character.
pub fn log_line(message: String) -> String {
    let mut line = message;
    if line.len() > MAX_LOG_LINE {
        let mut end = MAX_LOG_LINE;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}

fn parse_user(name: &str) -> Result<UserId, HostError> {
    UserId::new(name).map_err(|e| HostError::InvalidArgument(format!("user {name:?}: {e}")))
}

fn parse_address(text: &str) -> Result<Address, HostError> {
    text.parse()
        .map_err(|e| HostError::InvalidArgument(format!("address {text:?}: {e}")))
}

/// Checks a storage key (of `kv-get`, `kv-set`, `kv-delete`): 1 to [`MAX_KV_KEY`] bytes.
pub fn check_key(key: &str) -> Result<(), HostError> {
    if key.is_empty() || key.len() > MAX_KV_KEY {
        return Err(HostError::InvalidArgument(format!(
            "a storage key is 1 to {MAX_KV_KEY} bytes"
        )));
    }
    Ok(())
}

fn unavailable(e: impl std::fmt::Display) -> HostError {
    HostError::Unavailable(e.to_string())
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime_wasi_http::WasiHttpView for PluginState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}

impl wit::Host for PluginState {}

impl IimHost for PluginState {
    fn resolve(
        &mut self,
        users: Vec<String>,
    ) -> wasmtime::Result<Result<wit::UserList, HostError>> {
        Ok((|| {
            let users = self.parse_users(&users)?;
            // `Iim::resolve` checks that each user exists; no need to look twice.
            let list = self.services.iim.resolve(&users).map_err(|e| match e {
                IimError::UnknownUser(user) => HostError::UnknownUser(user.to_string()),
                other => unavailable(other),
            })?;
            Ok(convert::user_list_to_wit(&list))
        })())
    }

    fn send(
        &mut self,
        msg: wit::Message,
        users: wit::UserList,
    ) -> wasmtime::Result<Result<u32, HostError>> {
        let result = self.check_send(msg, users);
        if let Err(e) = &result {
            tracing::debug!(plugin = %self.plugin, error = ?e, "send refused");
        }
        Ok(result)
    }

    fn pass_on(&mut self, users: Vec<String>) -> wasmtime::Result<Result<u32, HostError>> {
        let result = self.check_pass_on(&users);
        if let Err(e) = &result {
            tracing::debug!(plugin = %self.plugin, error = ?e, "pass-on refused");
        }
        Ok(result)
    }

    fn friends(&mut self, user: String) -> wasmtime::Result<Result<Vec<String>, HostError>> {
        Ok(self.relations(user, iim_proto::RelationKind::Friend, "friends"))
    }

    fn colleagues(&mut self, user: String) -> wasmtime::Result<Result<Vec<String>, HostError>> {
        Ok(self.relations(user, iim_proto::RelationKind::Colleague, "colleagues"))
    }

    fn presence(
        &mut self,
        users: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<PresenceEntry>, HostError>> {
        Ok((|| {
            let users = self.existing_users(&users)?;
            Ok(users
                .into_iter()
                .map(|user| {
                    let local = self.services.registry.online(&user).len() as u32;
                    // A user of another host: as its host last told the exchange.
                    let devices = match self.services.iim.directory() {
                        Some(directory) if local == 0 => directory.presence_of(&user),
                        _ => local,
                    };
                    PresenceEntry {
                        user: user.to_string(),
                        state: if devices > 0 {
                            PresenceState::Online
                        } else {
                            PresenceState::Offline
                        },
                        devices,
                    }
                })
                .collect())
        })())
    }

    fn inbox_message(
        &mut self,
        user: String,
        id: u64,
    ) -> wasmtime::Result<Result<Option<wit::Message>, HostError>> {
        Ok((|| {
            let user = self.acting("inbox-message", &user)?;
            let found = self
                .services
                .store
                .inbox
                .message(&user, MessageId(id))
                .map_err(unavailable)?;
            Ok(found.as_ref().map(convert::message_to_wit))
        })())
    }

    fn kv_get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, HostError>> {
        Ok((|| {
            check_key(&key)?;
            if let Some(call) = &self.call
                && let Some(pending) = call.effects.kv.get(&key)
            {
                return Ok(pending.clone());
            }
            self.services
                .store
                .plugin_kv
                .get(&self.plugin, &key)
                .map_err(unavailable)
        })())
    }

    fn kv_set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), HostError>> {
        Ok(self.kv_write(key, Some(value)))
    }

    fn kv_delete(&mut self, key: String) -> wasmtime::Result<Result<(), HostError>> {
        Ok(self.kv_write(key, None))
    }

    fn kv_keys(
        &mut self,
        prefix: String,
        after: Option<String>,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<String>, HostError>> {
        Ok((|| {
            let limit = (limit as usize).min(MAX_KV_KEYS);
            check_key_range(&prefix, after.as_deref())?;
            let pending = self.call.as_ref().map(|call| &call.effects.kv);
            let in_range =
                |key: &String| key.starts_with(&prefix) && after.as_ref().is_none_or(|a| key > a);
            // Enough stored keys that, once the pending deletes are taken out, `limit` remain.
            let deletes = pending.map_or(0, |kv| {
                kv.iter()
                    .filter(|(k, v)| v.is_none() && in_range(k))
                    .count()
            });
            let stored = self
                .services
                .store
                .plugin_kv
                .keys(&self.plugin, &prefix, after.as_deref(), limit + deletes)
                .map_err(unavailable)?;
            let mut keys: std::collections::BTreeSet<String> = stored.into_iter().collect();
            if let Some(kv) = pending {
                for (key, value) in kv.iter().filter(|(k, _)| in_range(k)) {
                    match value {
                        Some(_) => keys.insert(key.clone()),
                        None => keys.remove(key),
                    };
                }
            }
            Ok(keys.into_iter().take(limit).collect())
        })())
    }

    fn subscribe_groups(&mut self) -> wasmtime::Result<Result<(), HostError>> {
        Ok(if self.call.is_some() {
            Err(HostError::PermissionDenied(
                "subscribe-groups is only allowed in init".into(),
            ))
        } else {
            self.groups = true;
            Ok(())
        })
    }

    fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        let line = log_line(message);
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{line}"),
            LogLevel::Debug => tracing::debug!(plugin, "{line}"),
            LogLevel::Info => tracing::info!(plugin, "{line}"),
            LogLevel::Warn => tracing::warn!(plugin, "{line}"),
            LogLevel::Error => tracing::error!(plugin, "{line}"),
        }
        Ok(())
    }
}

impl PluginState {
    fn relations(
        &mut self,
        user: String,
        kind: iim_proto::RelationKind,
        import: &str,
    ) -> Result<Vec<String>, HostError> {
        let user = self.acting(import, &user)?;
        let list = self
            .services
            .store
            .relations
            .list(&user, kind)
            .map_err(unavailable)?;
        Ok(list.into_iter().map(|u| u.to_string()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SendLimits = SendLimits {
        max_body: 64,
        max_frame: 4096,
        max_users: 2,
    };

    fn call(handled: Option<Message>) -> Call {
        Call {
            user: UserId::new("alice").expect("valid"),
            device: DeviceId::new("phone").expect("valid"),
            message: handled.map(Arc::new),
            groups: false,
            effects: Effects::default(),
        }
    }

    fn new_message(sender: &str, to: &[&str], body: &[u8]) -> wit::Message {
        wit::Message {
            id: 0,
            kind: wit::MessageKind::Chat,
            sender: sender.into(),
            sender_device: String::new(),
            to: to.iter().map(|t| t.to_string()).collect(),
            body: body.to_vec(),
            sent_at: 0,
        }
    }

    fn list(rows: &[(&str, &[&str])]) -> wit::UserList {
        wit::UserList {
            servers: rows
                .iter()
                .map(|(server, users)| wit::ServerRow {
                    server: server.to_string(),
                    users: users
                        .iter()
                        .map(|user| wit::UserRow {
                            user: user.to_string(),
                            devices: Vec::new(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn check(
        call: &Call,
        msg: wit::Message,
        list: &wit::UserList,
    ) -> Result<Vec<String>, HostError> {
        check_send_arguments(call, LIMITS, msg, list, |server| server == "h1")
            .map(|send| send.users.iter().map(|u| u.to_string()).collect())
    }

    #[test]
    fn a_send_is_checked_before_anything_is_looked_up() {
        let call = call(None);
        let to_bob = list(&[("h1", &["bob"])]);
        let hi = new_message("alice", &["bob"], b"hi");
        assert_eq!(
            check(&call, hi.clone(), &to_bob).ok(),
            Some(vec!["bob".into()])
        );

        let forged = new_message("bob", &["#team"], &[0; 1000]);
        assert!(matches!(
            check(&call, forged, &to_bob),
            Err(HostError::ForgedSender(_))
        ));
        let long = new_message("alice", &["bob"], &[0; 65]);
        assert!(matches!(
            check(&call, long, &to_bob),
            Err(HostError::LimitExceeded(_))
        ));
        let group = new_message("alice", &["#team"], b"hi");
        assert!(matches!(
            check(&call, group, &to_bob),
            Err(HostError::PermissionDenied(_))
        ));
        let elsewhere = list(&[("h9", &["bob"])]);
        assert!(matches!(
            check(&call, hi.clone(), &elsewhere),
            Err(HostError::UnknownServer(_))
        ));
        let twice = list(&[("h1", &["bob"]), ("h1", &["bob"])]);
        assert!(matches!(
            check(&call, hi.clone(), &twice),
            Err(HostError::InvalidArgument(e)) if e.contains("twice")
        ));
        let many = list(&[("h1", &["bob", "carol", "dave"])]);
        assert!(matches!(
            check(&call, hi, &many),
            Err(HostError::LimitExceeded(_))
        ));
    }

    #[test]
    fn only_the_handled_message_passes_on_and_unchanged() {
        let handled = Message {
            id: MessageId(7),
            kind: MessageKind::Chat,
            from: UserId::new("bob").expect("valid"),
            from_device: DeviceId::new("laptop").expect("valid"),
            to: vec![UserId::new("alice").expect("valid").into()],
            body: b"hi".to_vec(),
            sent_at: 1,
        };
        let call = call(Some(handled));
        let to_carol = list(&[("h1", &["carol"])]);
        let forward = wit::Message {
            id: 7,
            ..new_message("alice", &["alice"], b"hi")
        };
        assert_eq!(
            check(&call, forward.clone(), &to_carol).ok(),
            Some(vec!["carol".into()])
        );
        let changed = wit::Message {
            body: b"ho".to_vec(),
            ..forward.clone()
        };
        assert!(matches!(
            check(&call, changed, &to_carol),
            Err(HostError::InvalidArgument(_))
        ));
        let other = wit::Message { id: 8, ..forward };
        assert!(matches!(
            check(&call, other, &to_carol),
            Err(HostError::UnknownMessage(_))
        ));
    }

    #[test]
    fn pass_on_sends_the_handled_message_to_existing_users_each_once() {
        use super::super::bindings::iim::plugin::iim::Host as _;
        let names = ["alice", "bob", "carol"].map(|u| UserId::new(u).expect("valid"));
        let sandbox = super::super::check::Sandbox::new(&names).expect("sandbox");
        let mut state = PluginState::native("chat", Arc::clone(&sandbox.services));
        let users = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let handled = Message {
            id: MessageId(7),
            kind: MessageKind::Chat,
            from: names[0].clone(),
            from_device: DeviceId::new("phone").expect("valid"),
            to: vec![names[1].clone().into()],
            body: b"hi".to_vec(),
            sent_at: 1,
        };

        // Outside an event, and during an event that is not a message: refused.
        assert!(matches!(
            state.pass_on(users(&["bob"])).expect("no trap"),
            Err(HostError::PermissionDenied(_))
        ));
        state.begin(call(None));
        assert!(matches!(
            state.pass_on(users(&["bob"])).expect("no trap"),
            Err(HostError::InvalidArgument(_))
        ));
        assert!(state.end().expect("a call").effects.sends.is_empty());

        state.begin(call(Some(handled.clone())));
        assert!(matches!(state.pass_on(users(&[])).expect("no trap"), Ok(0)));
        assert!(matches!(
            state.pass_on(users(&["bob", "dave"])).expect("no trap"),
            Err(HostError::UnknownUser(user)) if user == "dave"
        ));
        assert!(matches!(
            state.pass_on(users(&["Bob"])).expect("no trap"),
            Err(HostError::InvalidArgument(_))
        ));
        assert!(matches!(
            state
                .pass_on(users(&["bob", "carol", "bob"]))
                .expect("no trap"),
            Ok(2)
        ));
        let effects = state.end().expect("a call").effects;
        let [send] = effects.sends.as_slice() else {
            panic!("one send, the refused calls none: {:?}", effects.sends);
        };
        assert!(matches!(&send.message, Outgoing::Forward(m) if **m == handled));
        assert_eq!(send.users, [names[1].clone(), names[2].clone()]);

        // One send each against the limit per event.
        state.begin(call(Some(handled)));
        for _ in 0..MAX_SENDS_PER_CALL {
            assert!(matches!(
                state.pass_on(users(&["bob"])).expect("no trap"),
                Ok(1)
            ));
        }
        assert!(matches!(
            state.pass_on(users(&["bob"])).expect("no trap"),
            Err(HostError::LimitExceeded(_))
        ));
    }

    #[test]
    fn storage_keys_and_log_lines_are_bounded() {
        assert!(check_kv_write("k", Some(&[0; MAX_KV_VALUE])).is_ok());
        assert!(check_kv_write("", None).is_err());
        assert!(check_kv_write("k", Some(&[0; MAX_KV_VALUE + 1])).is_err());
        assert!(check_key_range("", None).is_ok());
        assert!(check_key_range("", Some(&"k".repeat(MAX_KV_KEY + 1))).is_err());
        let line = log_line("é".repeat(MAX_LOG_LINE));
        assert_eq!(line.len(), MAX_LOG_LINE);
        let line = log_line(format!("x{}", "é".repeat(MAX_LOG_LINE)));
        assert_eq!(line.len(), MAX_LOG_LINE - 1);
    }
}
