//! `FakeHost`: an in-memory host, so that a plugin's logic runs natively under `cargo test`.
//!
//! Outside a component (any target but `wasm32`) the functions of [`crate::host`] call the
//! `FakeHost` installed on the current thread. [`FakeHost::handle`] installs it, sets the
//! acting user from the event as the real host does, runs the plugin, and takes it back; the
//! test then looks at what was sent ([`FakeHost::sent`]), logged, stored or put in inboxes.
//!
//! The fake applies the checks of the real host that catch plugin bugs:
//! - a message's `sender` must be the acting user (`forged-sender`); its id must be 0, or the
//!   id of the message event being handled (`unknown-message`), which is then passed on with
//!   its kind and body unchanged (`invalid-argument`);
//! - user and device names must be valid (`invalid-argument`) and users must exist
//!   (`unknown-user`); a user-list's rows must name this host's server (`unknown-server`) and
//!   each user once (`invalid-argument`);
//! - `friends`, `colleagues` and `inbox-message` answer for the acting user only, and `send`,
//!   `kv-set` and `kv-delete` need an event being handled (`permission-denied`): there is no
//!   acting user during `init`;
//! - the real host's limits on body size, on sends and storage writes per event and on
//!   storage keys and values (`limit-exceeded`, `invalid-argument`);
//! - the effects of `handle` (sends, inbox appends, storage) remain only if it returns `ok`;
//! - groups (`iim:plugin@0.1.1`): `subscribe-groups` is allowed only during `init` (the SDK
//!   calls it for a plugin whose [`Plugin::groups`] is `true`, and [`FakeHost::init`] records
//!   it: [`FakeHost::subscribed_groups`]). The events of a group (a message addressed to
//!   `#name`, and the delivery of a message in the recipient's inbox that is addressed to
//!   one) are handed only to such a plugin, whatever its subscriptions; and a new message
//!   addressed to a group or of kind [`GROUP_KIND`](crate::GROUP_KIND) may be sent only by it
//!   (`permission-denied`), addressed to users or to one group, not both (`invalid-argument`);
//! - `pass-on` (`iim:plugin@0.1.2`) passes on the message event being handled, as `send` of
//!   it to `resolve(users)` does, and is `invalid-argument` during any other event;
//! - `kv-keys` answers as the host does: the keys under a prefix in byte order, after `after`,
//!   at most [`MAX_KV_KEYS`](crate::host::MAX_KV_KEYS), the event's own writes included.
//!
//! Relations are one-way lists, as on the host: `add_friend("alice", "bob")` puts bob in
//! alice's friends, not alice in bob's.

use crate::{
    Config, Delivery, DeviceId, DeviceRow, Event, HostError, LogLevel, Message, MessageId,
    MessageKind, Plugin, PluginError, PresenceEntry, PresenceState, ServerRow, SessionInfo, UserId,
    UserList, UserRow, runtime,
};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

pub use crate::host::{MAX_KV_KEY, MAX_KV_VALUE, MAX_KV_WRITES_PER_EVENT, MAX_SENDS_PER_EVENT};

thread_local! {
    /// The fake host that `crate::host` calls on this thread, while one is installed.
    static CURRENT: RefCell<Option<FakeHost>> = const { RefCell::new(None) };
}

/// The longest custom kind name, in bytes (as in the WIT file).
const MAX_KIND: usize = 64;
/// The longest user or device name, in bytes (as in the WIT file).
const MAX_NAME: usize = 64;
/// The largest message body by default, in bytes (the host's default `max_body`).
pub const DEFAULT_MAX_BODY: usize = 32 * 1024;

/// One `send` the plugin made, as the host carried it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The message as the host sent it: a new message numbered, with its `sender-device` and
    /// `sent-at` set.
    pub message: Message,
    /// The user-list it was sent to.
    pub users: UserList,
    /// How many inboxes it was added to (a message is in an inbox at most once).
    pub appended: u32,
}

impl Sent {
    /// The users of the user-list, in its order.
    pub fn recipients(&self) -> Vec<&str> {
        self.users
            .servers
            .iter()
            .flat_map(|s| &s.users)
            .map(|u| u.user.as_str())
            .collect()
    }
}

/// An in-memory host with users, relations, online devices, inboxes and plugin storage, that
/// records every message sent and every line logged. See the [module](self) documentation.
#[derive(Clone, Debug)]
pub struct FakeHost {
    server: String,
    /// Every user, with the devices online.
    users: BTreeMap<UserId, Vec<DeviceRow>>,
    friends: BTreeMap<UserId, BTreeSet<UserId>>,
    colleagues: BTreeMap<UserId, BTreeSet<UserId>>,
    inboxes: BTreeMap<UserId, Vec<Message>>,
    kv: BTreeMap<String, Vec<u8>>,
    sent: Vec<Sent>,
    logs: Vec<(LogLevel, String)>,
    /// The acting user and device, while an event is handled.
    acting: Option<(UserId, DeviceId)>,
    /// The message event being handled: the one message `send` may pass on.
    handled: Option<Message>,
    /// Sends and storage writes of the event being handled, against the per-event limits.
    sends: usize,
    kv_writes: usize,
    /// The plugins (by name) that called `subscribe-groups` in their `init`.
    groups: BTreeSet<String>,
    /// Whether `subscribe-groups` was called since the `init` in progress began.
    subscribed_in_init: bool,
    /// Whether the plugin handling the current event handles groups (may send to them).
    handling_groups: bool,
    next_id: MessageId,
    next_session: u64,
    now_ms: u64,
    max_body: usize,
    /// Outbound HTTP requests made, and the answers still to give.
    http_requests: Vec<crate::http::Request>,
    http_answers: std::collections::VecDeque<Result<crate::http::Response, crate::http::HttpError>>,
}

impl Default for FakeHost {
    fn default() -> Self {
        Self {
            server: Self::SERVER.to_owned(),
            users: BTreeMap::new(),
            friends: BTreeMap::new(),
            colleagues: BTreeMap::new(),
            inboxes: BTreeMap::new(),
            kv: BTreeMap::new(),
            sent: Vec::new(),
            logs: Vec::new(),
            acting: None,
            handled: None,
            sends: 0,
            kv_writes: 0,
            groups: BTreeSet::new(),
            subscribed_in_init: false,
            handling_groups: false,
            next_id: 1,
            next_session: 1,
            // 2023-11-14: any fixed time will do; tests are deterministic.
            now_ms: 1_700_000_000_000,
            max_body: DEFAULT_MAX_BODY,
            http_requests: Vec::new(),
            http_answers: std::collections::VecDeque::new(),
        }
    }
}

/// What `handle` may change, kept to undo it if `handle` fails.
struct Effects {
    inboxes: BTreeMap<UserId, Vec<Message>>,
    kv: BTreeMap<String, Vec<u8>>,
    sent: usize,
    next_id: MessageId,
}

impl FakeHost {
    /// The name of the fake host's one server, in every user-list it resolves.
    pub const SERVER: &'static str = "local";

    /// A host with no users.
    pub fn new() -> Self {
        Self::default()
    }

    // ----- Setting the scene -----

    /// Adds a user (offline) if it does not exist yet.
    pub fn add_user(&mut self, user: &str) -> &mut Self {
        self.users.entry(user.to_owned()).or_default();
        self
    }

    /// Puts `friend` in `user`'s friends (adding both users if needed).
    pub fn add_friend(&mut self, user: &str, friend: &str) -> &mut Self {
        self.add_user(user).add_user(friend);
        self.friends
            .entry(user.to_owned())
            .or_default()
            .insert(friend.to_owned());
        self
    }

    /// Puts `colleague` in `user`'s colleagues (adding both users if needed).
    pub fn add_colleague(&mut self, user: &str, colleague: &str) -> &mut Self {
        self.add_user(user).add_user(colleague);
        self.colleagues
            .entry(user.to_owned())
            .or_default()
            .insert(colleague.to_owned());
        self
    }

    /// Brings `user`'s `device` online (adding the user if needed), with a new session.
    pub fn connect(&mut self, user: &str, device: &str) -> &mut Self {
        let session = self.next_session;
        let devices = self.users.entry(user.to_owned()).or_default();
        if !devices.iter().any(|d| d.device == device) {
            devices.push(DeviceRow {
                device: device.to_owned(),
                session,
            });
            self.next_session += 1;
        }
        self
    }

    /// Takes `user`'s `device` offline.
    pub fn disconnect(&mut self, user: &str, device: &str) -> &mut Self {
        if let Some(devices) = self.users.get_mut(user) {
            devices.retain(|d| d.device != device);
        }
        self
    }

    /// Puts `message` in `user`'s inbox, as if it had been sent to them earlier.
    pub fn put_in_inbox(&mut self, user: &str, message: Message) -> &mut Self {
        self.add_user(user);
        self.next_id = self.next_id.max(message.id + 1);
        self.inboxes
            .entry(user.to_owned())
            .or_default()
            .push(message);
        self
    }

    /// Sets the host clock, in milliseconds since the Unix epoch.
    pub fn set_now_ms(&mut self, now_ms: u64) -> &mut Self {
        self.now_ms = now_ms;
        self
    }

    /// Sets the largest body of a new message, in bytes (the host's `max_body`; default
    /// [`DEFAULT_MAX_BODY`]).
    pub fn set_max_body(&mut self, max_body: usize) -> &mut Self {
        self.max_body = max_body;
        self
    }

    // ----- Events -----

    /// A client of `sender` submits a message and the host accepts it: numbers it and returns
    /// the `message` event (the message is in no inbox until a plugin sends it). It comes from
    /// the sender's first online device, or from a device named `device` if none is online.
    pub fn submit(&mut self, sender: &str, kind: MessageKind, to: &[&str], body: &[u8]) -> Event {
        let device = self
            .users
            .get(sender)
            .and_then(|devices| devices.first())
            .map_or_else(|| "device".to_owned(), |d| d.device.clone());
        self.submit_from(sender, &device, kind, to, body)
    }

    /// Like [`submit`](Self::submit), from the sender's `device`.
    pub fn submit_from(
        &mut self,
        sender: &str,
        device: &str,
        kind: MessageKind,
        to: &[&str],
        body: &[u8],
    ) -> Event {
        let id = self.next_id;
        self.next_id += 1;
        Event::Message(Message {
            id,
            kind,
            sender: sender.to_owned(),
            sender_device: device.to_owned(),
            to: to.iter().map(|u| (*u).to_owned()).collect(),
            body: body.to_vec(),
            sent_at: self.now_ms,
        })
    }

    /// The host's notice that `message` waits in `user`'s inbox, naming the user's devices
    /// online now (`connect`): a message event of kind
    /// [`WAITING_KIND`](crate::body::WAITING_KIND) from the host, acting as `user` (see
    /// `docs/plugins.md`, "push"). The message is put in the user's inbox too, as the host
    /// would have.
    pub fn waiting(&mut self, user: &str, message: &Message) -> Event {
        self.put_in_inbox(user, message.clone());
        let online = self
            .users
            .get(user)
            .map(|devices| devices.iter().map(|d| d.device.clone()).collect())
            .unwrap_or_default();
        let notice = crate::body::Waiting {
            id: message.id,
            kind: message.kind.to_string(),
            from: message.sender.clone(),
            from_device: message.sender_device.clone(),
            to: message.to.clone(),
            sent_at: message.sent_at,
            online,
        };
        Event::Message(Message {
            id: message.id,
            kind: MessageKind::Custom(crate::body::WAITING_KIND.into()),
            sender: user.to_owned(),
            sender_device: "iim-host".to_owned(),
            to: vec![user.to_owned()],
            body: notice.to_json(),
            sent_at: message.sent_at,
        })
    }

    /// The host's notice that `user`'s account was deleted: a message event of kind
    /// [`ACCOUNT_DELETED_KIND`](crate::body::ACCOUNT_DELETED_KIND) from the host, acting as
    /// `user` (see `docs/plugins.md`, "The `account-deleted` notice"). The user is gone from this host.
    pub fn account_deleted(&mut self, user: &str) -> Event {
        self.users.remove(user);
        let body = crate::body::AccountDeleted {
            user: user.to_owned(),
        };
        Event::Message(Message {
            id: 0,
            kind: MessageKind::Custom(crate::body::ACCOUNT_DELETED_KIND.into()),
            sender: user.to_owned(),
            sender_device: "iim-host".to_owned(),
            to: vec![user.to_owned()],
            body: body.to_json(),
            sent_at: self.now_ms,
        })
    }

    /// `recipient`'s `device` acknowledges `message`: the `delivered` event.
    pub fn acknowledge(&mut self, recipient: &str, device: &str, message: &Message) -> Event {
        Event::Delivered(Delivery {
            id: message.id,
            kind: message.kind.clone(),
            sender: message.sender.clone(),
            sender_device: message.sender_device.clone(),
            recipient: recipient.to_owned(),
            recipient_device: device.to_owned(),
        })
    }

    /// Brings `user`'s `device` online and returns the `session-opened` event.
    pub fn open_session(&mut self, user: &str, device: &str) -> Event {
        self.connect(user, device);
        Event::SessionOpened(self.session_info(user, device))
    }

    /// Takes `user`'s `device` offline and returns the `session-closed` event.
    pub fn close_session(&mut self, user: &str, device: &str) -> Event {
        self.disconnect(user, device);
        Event::SessionClosed(self.session_info(user, device))
    }

    fn session_info(&self, user: &str, device: &str) -> SessionInfo {
        SessionInfo {
            user: user.to_owned(),
            device: device.to_owned(),
            devices_online: self.devices_online(user),
        }
    }

    // ----- Running a plugin -----

    /// Builds plugin `P` from `config`, as the host's `init` does: [`Plugin::new`], then
    /// `subscribe-groups` if the plugin handles groups, which this host then records
    /// ([`subscribed_groups`](Self::subscribed_groups)).
    pub fn init<P: Plugin>(&mut self, config: &[(&str, &str)]) -> Result<P, PluginError> {
        let config = Config::from_pairs(config);
        self.subscribed_in_init = false;
        let plugin = self.enter(|| runtime::build::<P>(&config))?;
        // As the host: a plugin's new build handles groups only if its own init asked.
        if std::mem::take(&mut self.subscribed_in_init) {
            self.groups.insert(P::NAME.to_owned());
        } else {
            self.groups.remove(P::NAME);
        }
        Ok(plugin)
    }

    /// Hands `event` to `plugin` with this host installed and the event's acting user set.
    /// If the plugin fails, what it sent and stored is undone, as on the real host.
    ///
    /// # Panics
    ///
    /// If none of the plugin's subscriptions matches the event, or the event is a group's (see
    /// the [module](self) documentation) and the plugin did not subscribe to groups in its
    /// [`init`](Self::init): the host would never hand it that event, so the test (or the
    /// plugin's subscriptions) is wrong.
    pub fn handle<P: Plugin>(&mut self, plugin: &P, event: Event) -> Result<(), PluginError> {
        let groups = self.groups.contains(P::NAME);
        match self.group_of(&event) {
            Some(group) => assert!(
                groups,
                "plugin {} did not subscribe to groups in its init, and the host hands the \
                 events of group #{group} only to the plugin that did: {event:?}",
                P::NAME
            ),
            None => {
                let subscriptions = plugin.subscriptions();
                assert!(
                    subscriptions.iter().any(|s| s.matches(&event)),
                    "plugin {} is not subscribed to {event:?} (its subscriptions: \
                     {subscriptions:?})",
                    P::NAME
                );
            }
        }
        self.handling_groups = groups;
        self.acting = Some((
            event.acting_user().to_owned(),
            event.acting_device().to_owned(),
        ));
        self.handled = match &event {
            Event::Message(m) => Some(m.clone()),
            Event::Delivered(_) | Event::SessionOpened(_) | Event::SessionClosed(_) => None,
        };
        self.sends = 0;
        self.kv_writes = 0;
        let before = Effects {
            inboxes: self.inboxes.clone(),
            kv: self.kv.clone(),
            sent: self.sent.len(),
            next_id: self.next_id,
        };
        let result = self.enter(|| runtime::dispatch(plugin, event));
        self.acting = None;
        self.handled = None;
        self.handling_groups = false;
        if result.is_err() {
            self.inboxes = before.inboxes;
            self.kv = before.kv;
            self.sent.truncate(before.sent);
            self.next_id = before.next_id;
        }
        result
    }

    /// The group whose conversation `event` belongs to, as the host decides it: a message
    /// addressed to one group, or the delivery of such a message (found in the recipient's
    /// inbox).
    fn group_of(&self, event: &Event) -> Option<String> {
        match event {
            Event::Message(m) => m.group().map(str::to_owned),
            Event::Delivered(d) => self
                .inbox(&d.recipient)
                .iter()
                .find(|m| m.id == d.id)
                .and_then(|m| m.group().map(str::to_owned)),
            Event::SessionOpened(_) | Event::SessionClosed(_) => None,
        }
    }

    /// Builds plugin `P` from `config`, then hands it `event`: [`init`](Self::init) then
    /// [`handle`](Self::handle).
    pub fn run<P: Plugin>(
        &mut self,
        config: &[(&str, &str)],
        event: Event,
    ) -> Result<(), PluginError> {
        let plugin = self.init::<P>(config)?;
        self.handle(&plugin, event)
    }

    /// Runs `f` with this host installed on the current thread, so that [`crate::host`] calls
    /// reach it. [`handle`](Self::handle) uses it; call it directly to try host calls outside
    /// a plugin (there is no acting user then).
    ///
    /// # Panics
    ///
    /// If a fake host is installed on this thread already.
    pub fn enter<R>(&mut self, f: impl FnOnce() -> R) -> R {
        /// Takes the host back even if `f` panics.
        struct Restore<'a>(&'a mut FakeHost);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                if let Some(host) = CURRENT.take() {
                    *self.0 = host;
                }
            }
        }
        assert!(
            CURRENT.with_borrow(Option::is_none),
            "a FakeHost is installed on this thread already"
        );
        CURRENT.set(Some(std::mem::take(self)));
        let _restore = Restore(self);
        f()
    }

    /// Calls `f` on the fake host installed on this thread, if there is one.
    pub(crate) fn with_current<R>(f: impl FnOnce(&mut FakeHost) -> R) -> Option<R> {
        CURRENT.with_borrow_mut(|current| current.as_mut().map(f))
    }

    // ----- Looking at the outcome -----

    /// Every outbound HTTP request the plugin made, in order (also those of events that
    /// failed: a request is not undone).
    pub fn http_requests(&self) -> &[crate::http::Request] {
        &self.http_requests
    }

    /// Queues the answer to the next outbound HTTP request the plugin makes; a request with
    /// no answer queued gets `200` with an empty body.
    pub fn answer_http(
        &mut self,
        answer: Result<crate::http::Response, crate::http::HttpError>,
    ) -> &mut Self {
        self.http_answers.push_back(answer);
        self
    }

    /// Records `request` and gives the next queued answer.
    fn http(
        &mut self,
        request: &crate::http::Request,
    ) -> Result<crate::http::Response, crate::http::HttpError> {
        request.parts()?;
        self.http_requests.push(request.clone());
        self.http_answers
            .pop_front()
            .unwrap_or(Ok(crate::http::Response {
                status: 200,
                headers: Vec::new(),
                body: Vec::new(),
            }))
    }

    /// Every `send` of the events handled successfully, in order.
    pub fn sent(&self) -> &[Sent] {
        &self.sent
    }

    /// Returns the sends recorded so far and forgets them.
    pub fn take_sent(&mut self) -> Vec<Sent> {
        std::mem::take(&mut self.sent)
    }

    /// Every line the plugin logged, failed events included.
    pub fn logs(&self) -> &[(LogLevel, String)] {
        &self.logs
    }

    /// `user`'s inbox, oldest first.
    pub fn inbox(&self, user: &str) -> &[Message] {
        self.inboxes.get(user).map_or(&[], Vec::as_slice)
    }

    /// The value the plugin stored under `key`.
    pub fn stored(&self, key: &str) -> Option<&[u8]> {
        self.kv.get(key).map(Vec::as_slice)
    }

    /// Whether plugin `P` subscribed to groups in its last [`init`](Self::init) on this host.
    pub fn subscribed_groups<P: Plugin>(&self) -> bool {
        self.groups.contains(P::NAME)
    }

    /// Every key the plugin has stored, in byte order.
    pub fn stored_keys(&self) -> impl Iterator<Item = &str> {
        self.kv.keys().map(String::as_str)
    }

    /// How many of `user`'s devices are online.
    pub fn devices_online(&self, user: &str) -> u32 {
        self.users
            .get(user)
            .map_or(0, |d| u32::try_from(d.len()).unwrap_or(u32::MAX))
    }

    // ----- The `iim` imports -----

    /// The acting user, or `permission-denied` outside `handle`.
    fn acting_user(&self, call: &str) -> Result<&str, HostError> {
        self.acting
            .as_ref()
            .map(|(user, _)| user.as_str())
            .ok_or_else(|| {
                HostError::PermissionDenied(format!(
                    "`{call}` is only allowed while an event is handled"
                ))
            })
    }

    /// `permission-denied` unless `user` is the acting user.
    fn only_acting(&self, call: &str, user: &str) -> Result<(), HostError> {
        let acting = self.acting_user(call)?;
        if user == acting {
            Ok(())
        } else {
            Err(HostError::PermissionDenied(format!(
                "`{call}` of `{user}` while acting for `{acting}`"
            )))
        }
    }

    /// `invalid-argument` unless `name` is a valid name, `unknown-user` unless the user exists.
    fn known(&self, user: &str) -> Result<(), HostError> {
        valid_name("user", user)?;
        if self.users.contains_key(user) {
            Ok(())
        } else {
            Err(HostError::UnknownUser(user.to_owned()))
        }
    }

    fn resolve(&mut self, users: &[UserId]) -> Result<UserList, HostError> {
        let mut rows: Vec<UserRow> = Vec::with_capacity(users.len());
        for user in users {
            if rows.iter().any(|r| &r.user == user) {
                continue;
            }
            self.known(user)?;
            rows.push(UserRow {
                user: user.clone(),
                devices: self.users.get(user).cloned().unwrap_or_default(),
            });
        }
        Ok(UserList {
            servers: vec![ServerRow {
                server: self.server.clone(),
                users: rows,
            }],
        })
    }

    fn pass_on(&mut self, users: &[UserId]) -> Result<u32, HostError> {
        self.acting_user("pass-on")?;
        let Some(handled) = self.handled.clone() else {
            return Err(HostError::InvalidArgument(
                "pass-on passes on the message being handled, and this event is not a message"
                    .to_owned(),
            ));
        };
        if users.is_empty() {
            return Ok(0);
        }
        let list = self.resolve(users)?;
        self.send(&handled, &list)
    }

    fn send(&mut self, msg: &Message, users: &UserList) -> Result<u32, HostError> {
        let acting = self.acting_user("send")?;
        if msg.sender != acting {
            return Err(HostError::ForgedSender(msg.sender.clone()));
        }
        if self.sends >= MAX_SENDS_PER_EVENT {
            return Err(HostError::LimitExceeded(format!(
                "at most {MAX_SENDS_PER_EVENT} sends per event"
            )));
        }
        if let MessageKind::Custom(name) = &msg.kind
            && (name.is_empty() || name.len() > MAX_KIND)
        {
            return Err(HostError::InvalidArgument(format!(
                "a custom kind is 1 to {MAX_KIND} bytes"
            )));
        }
        let message = match (&self.handled, msg.id) {
            (_, 0) => {
                if msg.body.len() > self.max_body {
                    return Err(HostError::LimitExceeded(format!(
                        "body of {} bytes is over the limit of {}",
                        msg.body.len(),
                        self.max_body
                    )));
                }
                self.check_new_addresses(msg)?;
                let mut message = msg.clone();
                message.id = self.next_id;
                message.sender_device = self
                    .acting
                    .as_ref()
                    .map(|(_, device)| device.clone())
                    .unwrap_or_default();
                message.sent_at = self.now_ms;
                message
            }
            (Some(handled), id) if id == handled.id => {
                if msg.kind != handled.kind || msg.body != handled.body {
                    return Err(HostError::InvalidArgument(format!(
                        "message {id} is passed on with another kind or body; send a new \
                         message (id 0) instead"
                    )));
                }
                // The host passes on the message it has, whatever else the plugin changed.
                handled.clone()
            }
            (_, id) => return Err(HostError::UnknownMessage(id)),
        };
        let mut recipients: Vec<&str> = Vec::new();
        for row in &users.servers {
            if row.server != self.server {
                return Err(HostError::UnknownServer(row.server.clone()));
            }
            for user in &row.users {
                for device in &user.devices {
                    valid_name("device", &device.device)?;
                }
                self.known(&user.user)?;
                if recipients.contains(&user.user.as_str()) {
                    return Err(HostError::InvalidArgument(format!(
                        "user {} appears twice in the user-list",
                        user.user
                    )));
                }
                recipients.push(&user.user);
            }
        }
        let count = u32::try_from(recipients.len()).unwrap_or(u32::MAX);
        if msg.id == 0 {
            self.next_id += 1;
        }
        self.sends += 1;
        let mut appended = 0;
        for user in users.servers.iter().flat_map(|s| &s.users) {
            let inbox = self.inboxes.entry(user.user.clone()).or_default();
            if !inbox.iter().any(|m| m.id == message.id) {
                inbox.push(message.clone());
                appended += 1;
            }
        }
        self.sent.push(Sent {
            message,
            users: users.clone(),
            appended,
        });
        Ok(count)
    }

    /// The host's checks of a new message's `to` and kind: valid names or one group, and
    /// groups only for the plugin that handles them.
    fn check_new_addresses(&self, msg: &Message) -> Result<(), HostError> {
        let mut to_group = false;
        for address in &msg.to {
            match address.strip_prefix('#') {
                Some(group) => {
                    valid_name("group", group)?;
                    to_group = true;
                }
                None => valid_name("user", address)?,
            }
        }
        if msg.to.len() > iim_proto::MAX_TARGETS {
            return Err(HostError::LimitExceeded(format!(
                "a message names at most {} recipients",
                iim_proto::MAX_TARGETS
            )));
        }
        if to_group && msg.to.len() > 1 {
            return Err(HostError::InvalidArgument(
                "a message is addressed to users or to one group, not both".into(),
            ));
        }
        let group_kind = matches!(&msg.kind, MessageKind::Custom(k) if k == crate::GROUP_KIND);
        if (to_group || group_kind) && !self.handling_groups {
            return Err(HostError::PermissionDenied(
                "only the plugin that handles groups may send a message addressed to a group \
                 or of kind group"
                    .into(),
            ));
        }
        Ok(())
    }

    fn friends(&mut self, user: &str) -> Result<Vec<UserId>, HostError> {
        self.only_acting("friends", user)?;
        Ok(self
            .friends
            .get(user)
            .map(|f| f.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn colleagues(&mut self, user: &str) -> Result<Vec<UserId>, HostError> {
        self.only_acting("colleagues", user)?;
        Ok(self
            .colleagues
            .get(user)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn presence(&mut self, users: &[UserId]) -> Result<Vec<PresenceEntry>, HostError> {
        users
            .iter()
            .map(|user| {
                self.known(user)?;
                let devices = self.devices_online(user);
                Ok(PresenceEntry {
                    user: user.clone(),
                    state: if devices > 0 {
                        PresenceState::Online
                    } else {
                        PresenceState::Offline
                    },
                    devices,
                })
            })
            .collect()
    }

    fn inbox_message(&mut self, user: &str, id: MessageId) -> Result<Option<Message>, HostError> {
        self.only_acting("inbox-message", user)?;
        Ok(self.inbox(user).iter().find(|m| m.id == id).cloned())
    }

    fn kv_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        valid_key(key)?;
        Ok(self.kv.get(key).cloned())
    }

    fn kv_set(&mut self, key: &str, value: &[u8]) -> Result<(), HostError> {
        self.kv_write(key, Some(value))
    }

    fn kv_delete(&mut self, key: &str) -> Result<(), HostError> {
        self.kv_write(key, None)
    }

    fn kv_write(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        valid_key(key)?;
        if value.is_some_and(|v| v.len() > MAX_KV_VALUE) {
            return Err(HostError::LimitExceeded(format!(
                "a stored value is at most {MAX_KV_VALUE} bytes"
            )));
        }
        self.acting_user("kv-set and kv-delete")?;
        if self.kv_writes >= MAX_KV_WRITES_PER_EVENT {
            return Err(HostError::LimitExceeded(format!(
                "at most {MAX_KV_WRITES_PER_EVENT} storage writes per event"
            )));
        }
        self.kv_writes += 1;
        match value {
            Some(value) => self.kv.insert(key.to_owned(), value.to_vec()),
            None => self.kv.remove(key),
        };
        Ok(())
    }

    fn kv_keys(
        &mut self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, HostError> {
        if prefix.len() > MAX_KV_KEY || after.is_some_and(|a| a.len() > MAX_KV_KEY) {
            return Err(HostError::InvalidArgument(format!(
                "a storage key is at most {MAX_KV_KEY} bytes"
            )));
        }
        let limit = limit.min(crate::host::MAX_KV_KEYS) as usize;
        // The event's writes are in `kv` already (undone if it fails), so they are seen.
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        Ok(self
            .kv
            .range::<str, _>((start, Bound::Unbounded))
            .map(|(key, _)| key)
            .take_while(|key| key.starts_with(prefix))
            .take(limit)
            .cloned()
            .collect())
    }

    fn subscribe_groups(&mut self) -> Result<(), HostError> {
        if self.acting.is_some() {
            return Err(HostError::PermissionDenied(
                "subscribe-groups is only allowed in init".into(),
            ));
        }
        self.subscribed_in_init = true;
        Ok(())
    }

    fn log(&mut self, level: LogLevel, message: &str) {
        self.logs.push((level, message.to_owned()));
    }
}

/// `invalid-argument` unless `name` is 1 to 64 bytes of `a-z 0-9 . _ -`.
fn valid_name(what: &str, name: &str) -> Result<(), HostError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(HostError::InvalidArgument(format!(
            "{what} {name:?}: a name is 1 to {MAX_NAME} bytes of a-z 0-9 . _ -"
        )))
    }
}

/// `invalid-argument` unless `key` is 1 to [`MAX_KV_KEY`] bytes.
fn valid_key(key: &str) -> Result<(), HostError> {
    if key.is_empty() || key.len() > MAX_KV_KEY {
        return Err(HostError::InvalidArgument(format!(
            "a storage key is 1 to {MAX_KV_KEY} bytes"
        )));
    }
    Ok(())
}

/// The `iim` imports, with the signatures of the generated ones, calling the fake host of
/// this thread: what [`crate::host`] calls outside a component.
pub(crate) mod calls {
    use super::FakeHost;
    use crate::{HostError, LogLevel, Message, MessageId, PresenceEntry, UserId, UserList};

    /// Calls the fake host of this thread, or fails with `unavailable` if there is none.
    fn fake<T>(call: impl FnOnce(&mut FakeHost) -> Result<T, HostError>) -> Result<T, HostError> {
        FakeHost::with_current(call).unwrap_or_else(|| {
            Err(HostError::Unavailable(
                "no host: outside a component, run the plugin through \
                 iim_plugin_sdk::testing::FakeHost"
                    .to_owned(),
            ))
        })
    }

    pub fn resolve(users: &[UserId]) -> Result<UserList, HostError> {
        fake(|host| host.resolve(users))
    }

    pub fn send(msg: &Message, users: &UserList) -> Result<u32, HostError> {
        fake(|host| host.send(msg, users))
    }

    pub fn pass_on(users: &[UserId]) -> Result<u32, HostError> {
        fake(|host| host.pass_on(users))
    }

    pub fn friends(user: &str) -> Result<Vec<UserId>, HostError> {
        fake(|host| host.friends(user))
    }

    pub fn colleagues(user: &str) -> Result<Vec<UserId>, HostError> {
        fake(|host| host.colleagues(user))
    }

    pub fn presence(users: &[UserId]) -> Result<Vec<PresenceEntry>, HostError> {
        fake(|host| host.presence(users))
    }

    pub fn inbox_message(user: &str, id: MessageId) -> Result<Option<Message>, HostError> {
        fake(|host| host.inbox_message(user, id))
    }

    pub fn kv_get(key: &str) -> Result<Option<Vec<u8>>, HostError> {
        fake(|host| host.kv_get(key))
    }

    pub fn kv_set(key: &str, value: &[u8]) -> Result<(), HostError> {
        fake(|host| host.kv_set(key, value))
    }

    pub fn kv_delete(key: &str) -> Result<(), HostError> {
        fake(|host| host.kv_delete(key))
    }

    pub fn kv_keys(
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, HostError> {
        fake(|host| host.kv_keys(prefix, after, limit))
    }

    pub fn subscribe_groups() -> Result<(), HostError> {
        fake(FakeHost::subscribe_groups)
    }

    /// An outbound HTTP request, to the fake host's recorded answers.
    pub fn http_send(
        request: &crate::http::Request,
    ) -> Result<crate::http::Response, crate::http::HttpError> {
        FakeHost::with_current(|host| host.http(request)).unwrap_or_else(|| {
            Err(crate::http::HttpError::Failed(
                "no host: outside a component, run the plugin through \
                 iim_plugin_sdk::testing::FakeHost"
                    .to_owned(),
            ))
        })
    }

    /// Without a fake host, log lines go to standard error.
    pub fn log(level: LogLevel, message: &str) {
        if FakeHost::with_current(|host| host.log(level, message)).is_none() {
            eprintln!("[{level:?}] {message}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Subscription, host};

    /// A plugin that runs a script on every event it can be handed.
    struct Probe(fn(&Event) -> Result<(), PluginError>);

    impl Plugin for Probe {
        const NAME: &'static str = "probe";
        const VERSION: &'static str = "0";

        fn new(_: &Config) -> Result<Self, PluginError> {
            Ok(Probe(|_| Ok(())))
        }

        fn subscriptions(&self) -> Vec<Subscription> {
            vec![
                Subscription::Message(MessageKind::Chat),
                Subscription::Delivered(MessageKind::Chat),
                Subscription::SessionOpened,
            ]
        }

        fn handle(&self, event: Event) -> Result<(), PluginError> {
            (self.0)(&event)
        }
    }

    fn scene() -> FakeHost {
        let mut fake = FakeHost::new();
        fake.connect("alice", "phone")
            .connect("alice", "laptop")
            .connect("bob", "phone")
            .add_user("carol")
            .add_friend("alice", "bob");
        fake
    }

    fn chat(fake: &mut FakeHost, to: &[&str]) -> Event {
        fake.submit("alice", MessageKind::Chat, to, b"hi")
    }

    #[test]
    fn pass_on_passes_the_handled_message_on_and_only_during_a_message() {
        let mut fake = scene();
        let event = chat(&mut fake, &["bob"]);
        let Event::Message(handled) = event.clone() else {
            unreachable!("a message event")
        };
        let probe = Probe(|_| {
            assert!(matches!(
                host::pass_on(&["bob".into(), "mallory".into()]),
                Err(HostError::UnknownUser(user)) if user == "mallory"
            ));
            assert_eq!(host::pass_on(&[]), Ok(0));
            assert_eq!(
                host::pass_on(&["bob".into(), "carol".into(), "bob".into()]),
                Ok(2)
            );
            Ok(())
        });
        fake.handle(&probe, event).expect("handled");
        let [sent] = fake.sent() else {
            panic!("one send: {:?}", fake.sent())
        };
        assert_eq!(sent.message, handled, "the message itself, same id");
        assert_eq!(sent.recipients(), ["bob", "carol"]);
        assert_eq!(fake.inbox("carol"), [handled]);

        let opened = Probe(|_| {
            assert!(matches!(
                host::pass_on(&["bob".into()]),
                Err(HostError::InvalidArgument(_))
            ));
            Ok(())
        });
        let session = fake.open_session("alice", "phone");
        fake.handle(&opened, session).expect("handled");
        assert_eq!(fake.sent().len(), 1, "nothing more sent");
    }

    #[test]
    fn a_new_message_is_from_the_acting_user_and_numbered_by_the_host() {
        let mut fake = scene();
        let event = chat(&mut fake, &["bob"]);
        let probe = Probe(|_| {
            let note = Message::new(MessageKind::Receipt, vec!["bob".into()], b"x".to_vec());
            assert_eq!((note.id, note.sender.as_str()), (0, "alice"));
            let sent = host::send_to(&note, &["bob".into(), "carol".into(), "bob".into()])?;
            assert_eq!(sent, 2, "duplicates are resolved once");
            Ok(())
        });
        fake.handle(&probe, event).expect("handled");
        let [sent] = fake.sent() else {
            panic!("one send: {:?}", fake.sent())
        };
        assert_eq!(sent.recipients(), ["bob", "carol"]);
        assert_eq!(sent.appended, 2);
        assert_eq!(sent.message.id, 2, "the chat message took id 1");
        assert_eq!(sent.message.sender_device, "phone");
        assert_eq!(sent.message.sent_at, 1_700_000_000_000);
        assert_eq!(fake.inbox("carol"), std::slice::from_ref(&sent.message));
        let bob = &sent.users.servers[0].users[0];
        assert_eq!(bob.devices.len(), 1);
        assert_eq!(bob.devices[0].device, "phone");
    }

    #[test]
    fn a_forged_sender_is_refused_and_nothing_is_sent() {
        let mut fake = scene();
        let event = chat(&mut fake, &["bob"]);
        let probe = Probe(|_| {
            let mut forged = Message::new(MessageKind::Chat, vec!["carol".into()], vec![]);
            forged.sender = "bob".into();
            let refused = host::send_to(&forged, &forged.to);
            assert_eq!(refused, Err(HostError::ForgedSender("bob".into())));
            refused?;
            Ok(())
        });
        let result = fake.handle(&probe, event);
        assert!(
            matches!(&result, Err(PluginError::Failed(text)) if text.contains("forged sender")),
            "{result:?}"
        );
        assert!(fake.sent().is_empty());
        assert!(fake.inbox("carol").is_empty());
    }

    #[test]
    fn a_message_passed_on_keeps_its_id_and_must_be_unchanged() {
        let mut fake = scene();
        let event = chat(&mut fake, &["bob"]);
        let probe = Probe(|event| {
            let Event::Message(m) = event else {
                unreachable!("subscribed to chat messages")
            };
            let mut changed = m.clone();
            changed.body = b"edited".to_vec();
            assert!(matches!(
                host::send_to(&changed, &m.to),
                Err(HostError::InvalidArgument(_))
            ));
            // Only the kind and body are checked; the host passes on the message it has.
            let mut readdressed = m.clone();
            readdressed.to = vec!["carol".into()];
            assert_eq!(host::send_to(&readdressed, &["carol".into()]), Ok(1));
            let mut other = m.clone();
            other.id += 100;
            assert_eq!(
                host::send_to(&other, &m.to),
                Err(HostError::UnknownMessage(m.id + 100))
            );
            assert_eq!(host::forward(m), Ok(1));
            Ok(())
        });
        fake.handle(&probe, event.clone()).expect("handled");
        let Event::Message(original) = event else {
            unreachable!()
        };
        assert_eq!(fake.inbox("carol"), std::slice::from_ref(&original));
        assert_eq!(fake.inbox("bob"), [original]);
    }

    #[test]
    fn relations_and_inboxes_are_the_acting_users_only() {
        let mut fake = scene();
        let event = chat(&mut fake, &["bob"]);
        let probe = Probe(|_| {
            assert_eq!(host::friends("alice"), Ok(vec!["bob".to_owned()]));
            assert_eq!(host::colleagues("alice"), Ok(vec![]));
            assert!(matches!(
                host::friends("bob"),
                Err(HostError::PermissionDenied(_))
            ));
            assert!(matches!(
                host::colleagues("bob"),
                Err(HostError::PermissionDenied(_))
            ));
            assert!(matches!(
                host::inbox_message("bob", 1),
                Err(HostError::PermissionDenied(_))
            ));
            assert_eq!(host::inbox_message("alice", 1), Ok(None));
            Ok(())
        });
        fake.handle(&probe, event).expect("handled");
    }

    #[test]
    fn unknown_users_and_servers_are_refused() {
        let mut fake = scene();
        let event = chat(&mut fake, &["bob"]);
        let probe = Probe(|_| {
            assert_eq!(
                host::resolve(&["bob".into(), "mallory".into()]),
                Err(HostError::UnknownUser("mallory".into()))
            );
            assert_eq!(
                host::presence(&["mallory".into()]),
                Err(HostError::UnknownUser("mallory".into()))
            );
            let mut list = host::resolve(&["bob".into()])?;
            list.servers[0].server = "elsewhere".into();
            let note = Message::new(MessageKind::Chat, vec!["bob".into()], vec![]);
            assert_eq!(
                host::send(&note, &list),
                Err(HostError::UnknownServer("elsewhere".into()))
            );
            Ok(())
        });
        fake.handle(&probe, event).expect("handled");
    }

    #[test]
    fn presence_counts_online_devices() {
        let mut fake = scene();
        let event = fake.open_session("carol", "tablet");
        let probe = Probe(|_| {
            let entries = host::presence(&["alice".into(), "bob".into(), "carol".into()])?;
            let seen: Vec<_> = entries
                .iter()
                .map(|e| (e.user.as_str(), e.state, e.devices))
                .collect();
            assert_eq!(
                seen,
                [
                    ("alice", PresenceState::Online, 2),
                    ("bob", PresenceState::Online, 1),
                    ("carol", PresenceState::Online, 1),
                ]
            );
            Ok(())
        });
        fake.handle(&probe, event).expect("handled");
        fake.disconnect("bob", "phone");
        assert_eq!(fake.devices_online("bob"), 0);
        let Event::SessionClosed(info) = fake.close_session("alice", "phone") else {
            unreachable!()
        };
        assert_eq!(info.devices_online, 1);
    }

    #[test]
    fn a_failed_event_leaves_no_effect_but_its_logs() {
        let mut fake = scene();
        let event = chat(&mut fake, &["bob"]);
        let probe = Probe(|event| {
            let Event::Message(m) = event else {
                unreachable!()
            };
            host::forward(m)?;
            host::kv_set("count", b"1")?;
            crate::warn!("giving up on {}", m.id);
            Err(PluginError::Failed("on purpose".into()))
        });
        let result = fake.handle(&probe, event);
        assert_eq!(result, Err(PluginError::Failed("on purpose".into())));
        assert!(fake.sent().is_empty());
        assert!(fake.inbox("bob").is_empty());
        assert_eq!(fake.stored("count"), None);
        assert_eq!(fake.logs(), [(LogLevel::Warn, "giving up on 1".to_owned())]);
    }

    #[test]
    fn storage_persists_across_events() {
        let mut fake = scene();
        let store = Probe(|_| host::kv_set("k", b"v").map_err(Into::into));
        let event = chat(&mut fake, &["bob"]);
        fake.handle(&store, event).expect("stored");
        let read = Probe(|_| {
            assert_eq!(host::kv_get("k"), Ok(Some(b"v".to_vec())));
            host::kv_delete("k")?;
            assert_eq!(host::kv_get("k"), Ok(None));
            Ok(())
        });
        let event = chat(&mut fake, &["bob"]);
        fake.handle(&read, event).expect("read");
        assert_eq!(fake.stored("k"), None);
    }

    #[test]
    fn host_calls_need_a_host_and_most_need_an_event() {
        assert!(matches!(
            host::resolve(&["bob".into()]),
            Err(HostError::Unavailable(_))
        ));
        let mut fake = scene();
        fake.enter(|| {
            // As during `init`: no acting user.
            let message = Message::new(MessageKind::Chat, vec!["bob".into()], vec![]);
            assert_eq!(message.sender, "", "no acting user outside handle");
            assert!(host::resolve(&["bob".into()]).is_ok());
            assert!(host::presence(&["bob".into()]).is_ok());
            assert_eq!(host::kv_get("k"), Ok(None));
            for refused in [
                host::send_to(&message, &message.to).map(drop),
                host::friends("alice").map(drop),
                host::inbox_message("alice", 1).map(drop),
                host::kv_set("k", b"v"),
                host::kv_delete("k"),
            ] {
                assert!(
                    matches!(refused, Err(HostError::PermissionDenied(_))),
                    "{refused:?}"
                );
            }
        });
    }

    #[test]
    fn malformed_names_and_user_lists_are_invalid() {
        let mut fake = scene();
        let event = chat(&mut fake, &["bob"]);
        let probe = Probe(|_| {
            assert!(matches!(
                host::resolve(&["Bob".into()]),
                Err(HostError::InvalidArgument(_))
            ));
            let mut list = host::resolve(&["bob".into()])?;
            let bob = list.servers[0].users[0].clone();
            list.servers[0].users.push(bob);
            let note = Message::new(MessageKind::Chat, vec!["bob".into()], vec![]);
            let twice = host::send(&note, &list);
            assert!(
                matches!(&twice, Err(HostError::InvalidArgument(t)) if t.contains("twice")),
                "{twice:?}"
            );
            let bad_to = Message::new(MessageKind::Chat, vec!["no one".into()], vec![]);
            assert!(matches!(
                host::send_to(&bad_to, &["bob".into()]),
                Err(HostError::InvalidArgument(_))
            ));
            let big = Message::new(MessageKind::Chat, vec![], vec![0; DEFAULT_MAX_BODY + 1]);
            assert!(matches!(
                host::send_to(&big, &["bob".into()]),
                Err(HostError::LimitExceeded(_))
            ));
            let bad_kind = Message::new(MessageKind::Custom(String::new()), vec![], vec![]);
            assert!(matches!(
                host::send_to(&bad_kind, &["bob".into()]),
                Err(HostError::InvalidArgument(_))
            ));
            assert!(matches!(
                host::kv_set("", b"v"),
                Err(HostError::InvalidArgument(_))
            ));
            assert!(matches!(
                host::kv_set("k", &vec![0; MAX_KV_VALUE + 1]),
                Err(HostError::LimitExceeded(_))
            ));
            Ok(())
        });
        fake.handle(&probe, event).expect("handled");
        assert!(fake.sent().is_empty());
    }

    #[test]
    fn sends_per_event_are_limited() {
        let mut fake = scene();
        let event = chat(&mut fake, &["bob"]);
        let probe = Probe(|_| {
            let note = Message::new(MessageKind::Chat, vec!["bob".into()], vec![]);
            for _ in 0..MAX_SENDS_PER_EVENT {
                host::send_to(&note, &note.to)?;
            }
            assert!(matches!(
                host::send_to(&note, &note.to),
                Err(HostError::LimitExceeded(_))
            ));
            Ok(())
        });
        fake.handle(&probe, event).expect("handled");
        assert_eq!(fake.sent().len(), MAX_SENDS_PER_EVENT);
        assert_eq!(fake.inbox("bob").len(), MAX_SENDS_PER_EVENT);
    }

    #[test]
    fn only_a_message_event_can_be_passed_on() {
        let mut fake = scene();
        let Event::Message(message) = chat(&mut fake, &["bob"]) else {
            unreachable!()
        };
        fake.put_in_inbox("bob", message.clone());
        let event = fake.acknowledge("bob", "phone", &message);
        let probe = Probe(|event| {
            let Event::Delivered(d) = event else {
                unreachable!()
            };
            let mine = Message {
                id: d.id,
                ..Message::new(MessageKind::Chat, vec!["alice".into()], vec![])
            };
            assert_eq!(
                host::send_to(&mine, &mine.to),
                Err(HostError::UnknownMessage(d.id))
            );
            Ok(())
        });
        fake.handle(&probe, event).expect("handled");
    }

    #[test]
    #[should_panic(expected = "not subscribed")]
    fn an_event_the_plugin_did_not_subscribe_to_is_a_test_bug() {
        let mut fake = scene();
        let event = fake.submit("alice", MessageKind::Presence, &["bob"], b"");
        let _ = fake.handle(&Probe(|_| Ok(())), event);
    }

    #[test]
    fn kv_keys_lists_a_prefix_in_byte_order_with_the_events_own_writes() {
        let mut fake = scene();
        let event = chat(&mut fake, &["bob"]);
        let fill = Probe(|_| {
            for key in ["m/b", "m/a", "m/c", "m0", "n/a", "m/", "m/a/x"] {
                host::kv_set(key, b"")?;
            }
            Ok(())
        });
        fake.handle(&fill, event).expect("stored");
        let event = chat(&mut fake, &["bob"]);
        let list = Probe(|_| {
            let keys = |prefix, after, limit| host::kv_keys(prefix, after, limit);
            assert_eq!(keys("m/", None, 10)?, ["m/", "m/a", "m/a/x", "m/b", "m/c"]);
            assert_eq!(keys("m/", Some("m/a"), 2)?, ["m/a/x", "m/b"]);
            assert_eq!(keys("m/", Some("m/c"), 10)?, Vec::<String>::new());
            assert_eq!(
                keys("m/", Some("a"), 1)?,
                ["m/"],
                "`after` before the prefix"
            );
            assert_eq!(keys("m/", Some("z"), 10)?, Vec::<String>::new());
            assert_eq!(keys("m/", None, 0)?, Vec::<String>::new());
            assert_eq!(keys("", None, 100)?.len(), 7, "every key");
            // This event's writes are seen before they are applied.
            host::kv_delete("m/b")?;
            host::kv_set("m/bb", b"")?;
            assert_eq!(keys("m/", Some("m/a/x"), 10)?, ["m/bb", "m/c"]);
            let long = "k".repeat(MAX_KV_KEY + 1);
            assert!(matches!(
                keys(&long, None, 1),
                Err(HostError::InvalidArgument(_))
            ));
            assert!(matches!(
                keys("m/", Some(&long), 1),
                Err(HostError::InvalidArgument(_))
            ));
            Ok(())
        });
        fake.handle(&list, event).expect("listed");
        // Outside an event too, as during `init`.
        let keys = fake.enter(|| host::kv_keys("m/", None, 100));
        assert_eq!(
            keys,
            Ok(["m/", "m/a", "m/a/x", "m/bb", "m/c"]
                .map(String::from)
                .to_vec())
        );
    }

    #[test]
    fn kv_keys_answers_at_most_a_thousand_keys() {
        let mut fake = scene();
        // Stores 250 keys `k/NNNN`, the batch the body names (an event writes at most 256).
        let fill = Probe(|event| {
            let Event::Message(m) = event else {
                unreachable!()
            };
            let batch = usize::from(m.body[0]);
            for i in batch * 250..(batch + 1) * 250 {
                host::kv_set(&format!("k/{i:04}"), b"")?;
            }
            Ok(())
        });
        for batch in 0..5 {
            let event = fake.submit("alice", MessageKind::Chat, &["bob"], &[batch]);
            fake.handle(&fill, event).expect("stored");
        }
        let all = fake
            .enter(|| host::kv_keys("k/", None, u32::MAX))
            .expect("keys");
        assert_eq!(all.len(), 1000, "a limit over 1000 counts as 1000");
        assert!(all.windows(2).all(|w| w[0] < w[1]), "in byte order");
        let last = all.last().cloned();
        let rest = fake
            .enter(|| host::kv_keys("k/", last.as_deref(), 1000))
            .expect("keys");
        assert_eq!(rest.len(), 250, "the next page after the last key");
    }

    /// A plugin that handles groups (and chat messages), running a script on every event.
    struct GroupProbe(fn(&Event) -> Result<(), PluginError>);

    impl Plugin for GroupProbe {
        const NAME: &'static str = "group-probe";
        const VERSION: &'static str = "0";

        fn new(_: &Config) -> Result<Self, PluginError> {
            Ok(GroupProbe(|_| Ok(())))
        }

        fn subscriptions(&self) -> Vec<Subscription> {
            vec![Subscription::Message(MessageKind::group())]
        }

        fn handle(&self, event: Event) -> Result<(), PluginError> {
            (self.0)(&event)
        }

        fn groups(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_groups_plugin_subscribes_in_init_only() {
        let mut fake = scene();
        fake.init::<Probe>(&[]).expect("init");
        assert!(!fake.subscribed_groups::<Probe>());
        fake.init::<GroupProbe>(&[]).expect("init");
        assert!(fake.subscribed_groups::<GroupProbe>());
        let event = fake.submit("alice", MessageKind::group(), &["alice"], b"{}");
        let again = GroupProbe(|_| {
            assert!(matches!(
                host::subscribe_groups(),
                Err(HostError::PermissionDenied(_))
            ));
            Ok(())
        });
        fake.handle(&again, event).expect("handled");
        // The export glue subscribes too.
        fake.enter(|| runtime::init::<GroupProbe>(vec![]))
            .expect("init");
    }

    #[test]
    fn only_the_groups_plugin_sends_to_a_group_or_of_kind_group() {
        let mut fake = scene();
        fake.init::<GroupProbe>(&[]).expect("init");
        let event = fake.submit("alice", MessageKind::Chat, &["#team"], b"hi");
        let Event::Message(message) = event.clone() else {
            unreachable!()
        };
        assert_eq!(message.group(), Some("team"));
        let groups = GroupProbe(|event| {
            let Event::Message(m) = event else {
                unreachable!()
            };
            // The member list is the plugin's: the message goes on unchanged.
            assert_eq!(host::send_to(m, &["alice".into(), "bob".into()]), Ok(2));
            let notice = Message::new(MessageKind::group(), vec!["#team".into()], b"{}".to_vec());
            assert_eq!(host::send_to(&notice, &["bob".into()]), Ok(1));
            let both = Message::new(
                MessageKind::Chat,
                vec!["#team".into(), "bob".into()],
                vec![],
            );
            assert!(matches!(
                host::send_to(&both, &["bob".into()]),
                Err(HostError::InvalidArgument(_))
            ));
            let bad = Message::new(MessageKind::Chat, vec!["#Team".into()], vec![]);
            assert!(matches!(
                host::send_to(&bad, &["bob".into()]),
                Err(HostError::InvalidArgument(_))
            ));
            Ok(())
        });
        fake.handle(&groups, event).expect("handled");
        assert_eq!(fake.inbox("bob").len(), 2);
        assert_eq!(fake.inbox("alice"), [message]);

        // A plugin that did not subscribe to groups may not.
        let event = chat(&mut fake, &["bob"]);
        let other = Probe(|_| {
            for (kind, to) in [
                (MessageKind::Chat, "#team"),
                (MessageKind::group(), "bob"),
                (MessageKind::group(), "#team"),
            ] {
                let message = Message::new(kind, vec![to.into()], b"{}".to_vec());
                let refused = host::send_to(&message, &["bob".into()]);
                assert!(
                    matches!(refused, Err(HostError::PermissionDenied(_))),
                    "{refused:?}"
                );
            }
            Ok(())
        });
        fake.handle(&other, event).expect("handled");
        assert_eq!(fake.inbox("bob").len(), 2, "nothing more");
    }

    #[test]
    fn a_groups_events_go_to_the_groups_plugin_whatever_their_kind() {
        let mut fake = scene();
        fake.init::<GroupProbe>(&[]).expect("init");
        // Not subscribed to chat messages nor to deliveries: a group's are its all the same.
        let event = fake.submit("alice", MessageKind::Chat, &["#team"], b"hi");
        let Event::Message(message) = event.clone() else {
            unreachable!()
        };
        let forward = GroupProbe(|event| {
            let Event::Message(m) = event else {
                unreachable!()
            };
            host::send_to(m, &["bob".into()])?;
            Ok(())
        });
        fake.handle(&forward, event).expect("handled");
        let delivered = fake.acknowledge("bob", "phone", &message);
        fake.handle(&GroupProbe(|_| Ok(())), delivered)
            .expect("a group's delivery");
    }

    #[test]
    #[should_panic(expected = "did not subscribe to groups")]
    fn a_groups_message_is_not_handed_to_another_plugin() {
        let mut fake = scene();
        fake.init::<Probe>(&[]).expect("init");
        // Probe handles chat messages, but not a group's.
        let event = fake.submit("alice", MessageKind::Chat, &["#team"], b"hi");
        let _ = fake.handle(&Probe(|_| Ok(())), event);
    }

    #[test]
    fn the_export_glue_keeps_the_instance_init_built() {
        let mut fake = scene();
        let event = chat(&mut fake, &["bob"]);
        fake.enter(|| {
            assert!(matches!(
                runtime::handle::<Probe>(event.clone()),
                Err(PluginError::Failed(_))
            ));
            let info = runtime::init::<Probe>(vec![]).expect("init");
            assert_eq!(info.name, "probe");
            assert_eq!(info.subscriptions.len(), 3);
            assert_eq!(runtime::handle::<Probe>(event), Ok(()));
        });
    }
}
