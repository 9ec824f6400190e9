//! The push plugin: wakes a phone that has no connection (an app in the background, a phone in
//! a pocket) with a notification through a push gateway, when a message waits for its user.
//!
//! - A device registers: it submits a `push` message `{"op":"register","token":"…"}` addressed
//!   to its own user (`iim push register TOKEN`); `{"op":"unregister"}` stops it. The plugin
//!   keeps the token per device and answers with a `push` message to the user:
//!   `{"op":"registered","device":"…"}`, `unregistered`, or `refused` with a reason (a token
//!   of the wrong shape for the gateway).
//! - The host tells it (a `waiting` notice) when a message lands in a user's inbox, naming the
//!   user's devices that were online to take it. If none was, it posts one notification to
//!   the configured gateway for each registered device of that user, over HTTPS, shaped for
//!   FCM (HTTP v1) or APNs; if some were, only to the registered devices that are not online
//!   and asked for it (`{"op":"register","token":"…","always":true}`, `iim push register
//!   --always`: a phone that wants a notification while its user's laptop is connected).
//! - A burst is one push: after a push to a device, the next ones within `collapse_secs` are
//!   held back and counted, and the next push after that says how many messages wait ("3 new
//!   messages"); the gateway is also given a collapse key, so the phone shows one
//!   notification. The count starts again when one of the user's devices comes online.
//! - At most `max_per_hour` pushes per device; past it, nothing until the hour is over.
//! - The message's text goes in the push only with `include_body = true` (it then passes
//!   through the gateway's operator); otherwise the push says who wrote, not what. An end-to-end
//!   encrypted message has no text to give: its push says "Encrypted message".
//! - A gateway that fails (no connection, 5xx, 429) is tried again with a growing wait
//!   (`retries` times: 0.2 s, 0.8 s, 3.2 s); a token the gateway says is gone (404, 410) is
//!   forgotten. A notice no device could be notified for fails, so the host tries it again
//!   and then sets it aside as a dead letter the operator sees (`iim-host admin
//!   dead-letters`); a notice some devices were notified for succeeds, with the failures in the
//!   log (so a retry does not notify the others twice).
//!
//! Configuration (`push.toml` beside `push.wasm`): `gateway` (the URL: FCM's
//! `https://fcm.googleapis.com/v1/projects/PROJECT/messages:send`, or APNs'
//! `https://api.push.apple.com`), `format` (`fcm` or `apns`), `authorization` (the
//! `Authorization` header's value, if the gateway wants one), `apns_topic` (APNs: the app's
//! bundle id), `kinds` (which messages notify: `chat,file,group`), `include_body` (`false`),
//! `body_chars` (100), `collapse_secs` (60), `max_per_hour` (30), `retries` (2), `timeout_ms`
//! (3000). The gateway's origin must also be in the file's `[host]` table:
//! `allowed_outbound_hosts = ["https://fcm.googleapis.com"]` — the host sends nowhere else.

use iim_plugin_sdk::body::{
    ACCOUNT_DELETED_KIND, PUSH_KIND, PushReply, PushRequest, WAITING_KIND, Waiting, is_end_to_end,
};
use iim_plugin_sdk::http::{HttpError, Request, Response};
use iim_plugin_sdk::{
    Config, Event, Message, MessageKind, Plugin, PluginError, SessionInfo, Subscription, host,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The waits before the second, third, … attempt to reach the gateway.
const BACKOFF_MS: [u64; 3] = [200, 800, 3200];

/// Which gateway the plugin talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// Firebase Cloud Messaging, HTTP v1: one POST to the gateway's URL per token.
    Fcm,
    /// Apple Push Notification service: one POST to `<gateway>/3/device/<token>`.
    Apns,
}

/// The push plugin.
#[derive(Debug)]
pub struct Push {
    gateway: String,
    format: Format,
    authorization: Option<String>,
    apns_topic: Option<String>,
    kinds: Vec<String>,
    include_body: bool,
    body_chars: usize,
    collapse_ms: u64,
    max_per_hour: u32,
    retries: usize,
    timeout: Duration,
}

/// A registered device, as kept in storage (`device/<user>/<device>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Registration {
    token: String,
    /// Notified whenever it is offline, not only when every device of the user is.
    #[serde(default)]
    always: bool,
}

/// What the plugin remembers of a device's pushes (`state/<user>/<device>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PushState {
    /// When the last push went, in ms (the notice's time).
    last_ms: u64,
    /// Messages held back since then.
    held: u32,
    /// The start of the current hour of the rate limit, and the pushes in it.
    hour_ms: u64,
    in_hour: u32,
}

impl Plugin for Push {
    const NAME: &'static str = "push";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new(config: &Config) -> Result<Self, PluginError> {
        config.deny_unknown(&[
            "gateway",
            "format",
            "authorization",
            "apns_topic",
            "kinds",
            "include_body",
            "body_chars",
            "collapse_secs",
            "max_per_hour",
            "retries",
            "timeout_ms",
        ])?;
        let invalid = |why: String| PluginError::InvalidConfig(why);
        let gateway = config.require("gateway")?.trim_end_matches('/').to_owned();
        Request::post(&gateway)
            .parts()
            .map_err(|e| invalid(format!("gateway: {e}")))?;
        let format = match config.require("format")? {
            "fcm" => Format::Fcm,
            "apns" => Format::Apns,
            other => return Err(invalid(format!("format {other:?}: `fcm` or `apns`"))),
        };
        let apns_topic = config.get("apns_topic").map(str::to_owned);
        if format == Format::Apns && apns_topic.is_none() {
            return Err(invalid(
                "apns_topic (the app's bundle id) is required with format = \"apns\"".into(),
            ));
        }
        let kinds: Vec<String> = config
            .get_or("kinds", "chat,file,group")
            .split(',')
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .collect();
        let retries: usize = config.parse_or("retries", 2)?;
        if retries > BACKOFF_MS.len() {
            return Err(invalid(format!(
                "retries {retries}: at most {}",
                BACKOFF_MS.len()
            )));
        }
        Ok(Push {
            gateway,
            format,
            authorization: config.get("authorization").map(str::to_owned),
            apns_topic,
            kinds,
            include_body: config.parse_or("include_body", false)?,
            body_chars: config.parse_or("body_chars", 100)?,
            collapse_ms: config
                .parse_or::<u64>("collapse_secs", 60)?
                .saturating_mul(1000),
            max_per_hour: config.parse_or("max_per_hour", 30)?,
            retries,
            timeout: Duration::from_millis(config.parse_or("timeout_ms", 3000)?),
        })
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![
            Subscription::Message(MessageKind::Custom(PUSH_KIND.into())),
            Subscription::Message(MessageKind::Custom(WAITING_KIND.into())),
            // The host's notice that an account was deleted: its tokens go.
            Subscription::Message(MessageKind::Custom(ACCOUNT_DELETED_KIND.into())),
            Subscription::SessionOpened,
        ]
    }

    fn handle(&self, event: Event) -> Result<(), PluginError> {
        match event {
            Event::Message(m) if m.kind == MessageKind::Custom(WAITING_KIND.into()) => {
                self.waiting(&m)
            }
            Event::Message(m) if m.kind == MessageKind::Custom(ACCOUNT_DELETED_KIND.into()) => {
                forget(&m.sender)
            }
            Event::Message(m) => self.request(&m),
            Event::SessionOpened(session) => online(&session),
            Event::Delivered(_) | Event::SessionClosed(_) => Ok(()),
        }
    }
}

/// The storage key of `user`'s `device`'s registration, and the prefix of all of `user`'s.
fn device_key(user: &str, device: &str) -> String {
    format!("device/{user}/{device}")
}

fn state_key(user: &str, device: &str) -> String {
    format!("state/{user}/{device}")
}

/// A device of the user came online: the user sees what waits, so the next message offline
/// pushes at once again.
fn online(session: &SessionInfo) -> Result<(), PluginError> {
    for device in registered(&session.user)? {
        host::kv_delete(&state_key(&session.user, &device))?;
    }
    Ok(())
}

/// `user`'s account was deleted: every registration of theirs and its state go.
fn forget(user: &str) -> Result<(), PluginError> {
    for device in registered(user)? {
        host::kv_delete(&device_key(user, &device))?;
        host::kv_delete(&state_key(user, &device))?;
    }
    Ok(())
}

/// The devices of `user` that registered.
fn registered(user: &str) -> Result<Vec<String>, PluginError> {
    let prefix = format!("device/{user}/");
    let mut devices = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let keys = host::kv_keys(&prefix, after.as_deref(), host::MAX_KV_KEYS)?;
        let Some(last) = keys.last().cloned() else {
            return Ok(devices);
        };
        devices.extend(
            keys.iter()
                .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned)),
        );
        after = Some(last);
    }
}

impl Push {
    /// A device's request: register its token, or forget it.
    fn request(&self, m: &Message) -> Result<(), PluginError> {
        let (user, device) = (&m.sender, &m.sender_device);
        let reply = match PushRequest::from_json(&m.body) {
            Ok(PushRequest::Register { token, always }) => match self.check_token(&token) {
                Ok(()) => {
                    let registration = Registration { token, always };
                    host::kv_set(&device_key(user, device), &to_json(&registration))?;
                    host::kv_delete(&state_key(user, device))?;
                    PushReply::Registered {
                        device: device.clone(),
                    }
                }
                Err(reason) => PushReply::Refused {
                    device: device.clone(),
                    reason,
                },
            },
            Ok(PushRequest::Unregister) => {
                host::kv_delete(&device_key(user, device))?;
                host::kv_delete(&state_key(user, device))?;
                PushReply::Unregistered {
                    device: device.clone(),
                }
            }
            Err(e) => PushReply::Refused {
                device: device.clone(),
                reason: format!("not a push request: {e}"),
            },
        };
        let answer = Message::new(
            MessageKind::Custom(PUSH_KIND.into()),
            vec![user.clone()],
            reply.to_json(),
        );
        host::send_to(&answer, &answer.to)?;
        Ok(())
    }

    /// Whether `token` has the shape the gateway's tokens have.
    fn check_token(&self, token: &str) -> Result<(), String> {
        match self.format {
            // APNs device tokens are hex: 32 bytes today, longer allowed.
            Format::Apns => {
                if (64..=200).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    Ok(())
                } else {
                    Err("an APNs device token is 64 to 200 hex digits".into())
                }
            }
            // FCM registration tokens: letters, digits, `-_:`.
            Format::Fcm => {
                let fits = token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':'));
                if (20..=4096).contains(&token.len()) && fits {
                    Ok(())
                } else {
                    Err("an FCM registration token is 20 to 4096 of A-Z a-z 0-9 - _ :".into())
                }
            }
        }
    }

    /// The host's notice that message `waiting.id` waits for the acting user: notify each
    /// registered device that is not online, if none is or if it asked to be anyway.
    fn waiting(&self, notice: &Message) -> Result<(), PluginError> {
        let user = &notice.sender;
        let waiting = Waiting::from_json(&notice.body)
            .map_err(|e| PluginError::Rejected(format!("not a waiting notice: {e}")))?;
        if !self.kinds.contains(&waiting.kind) {
            return Ok(());
        }
        let (mut notified, mut failures) = (0, Vec::new());
        for device in registered(user)? {
            if waiting.online.contains(&device) {
                continue;
            }
            match self.notify(user, &device, &waiting) {
                Ok(true) => notified += 1,
                Ok(false) => {}
                Err(e) => {
                    iim_plugin_sdk::warn!(
                        "push to {user}/{device} for message {} failed: {e}",
                        waiting.id
                    );
                    failures.push(format!("{device}: {e}"));
                }
            }
        }
        if !failures.is_empty() && notified == 0 {
            // Nothing went: the host tries again, then keeps it for the operator.
            return Err(PluginError::Failed(format!(
                "the gateway was not reached: {}",
                failures.join("; ")
            )));
        }
        Ok(())
    }

    /// Notifies `device` of `user` of `waiting`, unless a push went to it lately (it is held
    /// back and counted) or it had its hour's pushes. Whether a push went.
    fn notify(&self, user: &str, device: &str, waiting: &Waiting) -> Result<bool, String> {
        let Some(registration) = host::kv_get(&device_key(user, device))
            .map_err(|e| e.describe())?
            .and_then(|bytes| serde_json::from_slice::<Registration>(&bytes).ok())
        else {
            return Ok(false);
        };
        // Another device of the user has the message: only a device that asked is notified.
        if !waiting.online.is_empty() && !registration.always {
            return Ok(false);
        }
        let state_key = state_key(user, device);
        let mut state: PushState = host::kv_get(&state_key)
            .map_err(|e| e.describe())?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let now = waiting.sent_at;
        let save =
            |state: &PushState| host::kv_set(&state_key, &to_json(state)).map_err(|e| e.describe());
        if state.last_ms > 0 && now.saturating_sub(state.last_ms) < self.collapse_ms {
            state.held += 1;
            save(&state)?;
            return Ok(false);
        }
        if now.saturating_sub(state.hour_ms) >= 3_600_000 {
            (state.hour_ms, state.in_hour) = (now, 0);
        }
        if state.in_hour >= self.max_per_hour {
            state.held += 1;
            save(&state)?;
            iim_plugin_sdk::debug!(
                "push to {user}/{device}: {} this hour already",
                state.in_hour
            );
            return Ok(false);
        }
        let waiting_count = state.held + 1;
        let request = self.request_for(user, &registration.token, waiting, waiting_count);
        match self.post(&request)? {
            Posted::Sent => {
                state.last_ms = now;
                state.held = 0;
                state.in_hour += 1;
                save(&state)?;
                Ok(true)
            }
            Posted::Gone(status) => {
                iim_plugin_sdk::info!(
                    "the gateway says the token of {user}/{device} is gone ({status}); forgotten"
                );
                host::kv_delete(&device_key(user, device)).map_err(|e| e.describe())?;
                host::kv_delete(&state_key).map_err(|e| e.describe())?;
                Ok(false)
            }
        }
    }

    /// The gateway's request notifying `token` of `waiting` (`count` messages waiting).
    fn request_for(&self, user: &str, token: &str, waiting: &Waiting, count: u32) -> Request {
        let title = match waiting.to.first().filter(|to| to.starts_with('#')) {
            Some(group) => format!("{} in {group}", waiting.from),
            None => waiting.from.clone(),
        };
        let text = if count > 1 {
            format!("{count} new messages")
        } else {
            self.text_of(user, waiting)
        };
        let collapse = format!("iim-{user}");
        let mut request = match self.format {
            Format::Fcm => {
                let body = serde_json::json!({
                    "message": {
                        "token": token,
                        "notification": {"title": title, "body": text},
                        "android": {"collapse_key": collapse, "priority": "high"},
                        "data": {
                            "iim_id": waiting.id.to_string(),
                            "iim_from": waiting.from,
                            "iim_kind": waiting.kind,
                            "iim_waiting": count.to_string(),
                        },
                    }
                });
                Request::post(&self.gateway).body(body.to_string().into_bytes())
            }
            Format::Apns => {
                let body = serde_json::json!({
                    "aps": {
                        "alert": {"title": title, "body": text},
                        "thread-id": waiting.from,
                        "sound": "default",
                    },
                    "iim": {"id": waiting.id, "from": waiting.from, "kind": waiting.kind, "waiting": count},
                });
                let url = format!("{}/3/device/{token}", self.gateway);
                let mut request = Request::post(&url)
                    .header("apns-push-type", "alert")
                    .header("apns-priority", "10")
                    .header("apns-collapse-id", &collapse)
                    .body(body.to_string().into_bytes());
                if let Some(topic) = &self.apns_topic {
                    request = request.header("apns-topic", topic);
                }
                request
            }
        };
        request = request
            .header("content-type", "application/json")
            .timeout(self.timeout);
        if let Some(authorization) = &self.authorization {
            request = request.header("authorization", authorization);
        }
        request
    }

    /// What the push says of one message: its text if the configuration lets it through, else
    /// what it is. An end-to-end encrypted body is ciphertext, which read as text would show
    /// the user noise (and hand the gateway bytes of it), so it is named, never shown.
    fn text_of(&self, user: &str, waiting: &Waiting) -> String {
        let generic = match waiting.kind.as_str() {
            "file" => "sent a file",
            _ => "New message",
        };
        if !self.include_body || waiting.kind != "chat" {
            return generic.to_owned();
        }
        match host::inbox_message(user, waiting.id) {
            Ok(Some(message)) if is_end_to_end(&message.body) => "Encrypted message".to_owned(),
            Ok(Some(message)) => {
                let text = String::from_utf8_lossy(&message.body);
                let mut cut: String = text.chars().take(self.body_chars).collect();
                if text.chars().count() > self.body_chars {
                    cut.push('…');
                }
                cut
            }
            // Read or expired already: say only that there was one.
            Ok(None) | Err(_) => generic.to_owned(),
        }
    }

    /// Posts `request`, trying again after a growing wait when the gateway may get better.
    fn post(&self, request: &Request) -> Result<Posted, String> {
        let mut attempt = 0;
        loop {
            let outcome = request.send();
            let again = match &outcome {
                Ok(response) if (200..300).contains(&response.status) => return Ok(Posted::Sent),
                Ok(response) if matches!(response.status, 404 | 410) => {
                    return Ok(Posted::Gone(response.status));
                }
                Ok(response) if response.status == 429 || response.status >= 500 => {
                    format!("the gateway answered {}", describe(response))
                }
                Ok(response) => return Err(format!("the gateway answered {}", describe(response))),
                // Refused by the host: trying again changes nothing.
                Err(e @ (HttpError::Denied | HttpError::Invalid(_) | HttpError::TooLarge)) => {
                    return Err(e.to_string());
                }
                Err(e) => e.to_string(),
            };
            let Some(wait) = BACKOFF_MS.get(attempt).filter(|_| attempt < self.retries) else {
                return Err(again);
            };
            iim_plugin_sdk::debug!("push failed ({again}); again in {wait} ms");
            std::thread::sleep(Duration::from_millis(*wait));
            attempt += 1;
        }
    }
}

/// How a post ended, short of an error.
enum Posted {
    /// The gateway took it.
    Sent,
    /// The gateway says the token is no longer valid (this status).
    Gone(u16),
}

/// A response, for a log line: its status and the start of its body.
fn describe(response: &Response) -> String {
    let body = String::from_utf8_lossy(&response.body);
    let body: String = body.chars().take(200).collect();
    format!("{} {}", response.status, body.trim())
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

iim_plugin_sdk::export_plugin!(Push);

#[cfg(test)]
mod tests {
    use super::*;
    use iim_plugin_sdk::body::{E2E_DIRECT_MAGIC, E2E_GROUP_MAGIC};
    use iim_plugin_sdk::testing::FakeHost;

    const TOKEN: &str = "fcm-token-0123456789abcdef";
    const GATEWAY: &str = "https://push.example.com/v1/projects/p/messages:send";

    fn host_with(config: &[(&str, &str)]) -> (FakeHost, Push) {
        let mut host = FakeHost::new();
        host.add_user("alice").add_user("bob");
        let mut all = vec![("gateway", GATEWAY), ("format", "fcm")];
        all.extend_from_slice(config);
        let push = host.init::<Push>(&all).expect("init");
        (host, push)
    }

    fn register(host: &mut FakeHost, push: &Push, device: &str, token: &str) {
        register_with(host, push, device, token, false);
    }

    fn register_with(host: &mut FakeHost, push: &Push, device: &str, token: &str, always: bool) {
        let body = PushRequest::Register {
            token: token.into(),
            always,
        }
        .to_json();
        let event = host.submit_from(
            "bob",
            device,
            MessageKind::Custom(PUSH_KIND.into()),
            &["bob"],
            &body,
        );
        host.handle(push, event).expect("register");
    }

    /// A chat message from alice to bob, and the host's notice that it waits for bob.
    fn chat(host: &mut FakeHost, text: &str) -> Event {
        let Event::Message(message) =
            host.submit("alice", MessageKind::Chat, &["bob"], text.as_bytes())
        else {
            unreachable!()
        };
        host.waiting("bob", &message)
    }

    fn posted(host: &FakeHost) -> Vec<serde_json::Value> {
        host.http_requests()
            .iter()
            .map(|r| serde_json::from_slice(&r.body).expect("json"))
            .collect()
    }

    #[test]
    fn a_registered_device_is_notified_once_of_a_waiting_message_without_its_text() {
        let (mut host, push) = host_with(&[]);
        register(&mut host, &push, "phone", TOKEN);
        let reply = host.take_sent().pop().expect("a reply");
        assert_eq!(
            PushReply::from_json(&reply.message.body),
            Ok(PushReply::Registered {
                device: "phone".into()
            })
        );
        let notice = chat(&mut host, "the secret plans");
        host.handle(&push, notice).expect("waiting");
        let requests = host.http_requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].url, GATEWAY);
        let body = &posted(&host)[0]["message"];
        assert_eq!(body["token"], TOKEN);
        assert_eq!(body["notification"]["title"], "alice");
        assert_eq!(body["notification"]["body"], "New message");
        assert_eq!(body["android"]["collapse_key"], "iim-bob");
        assert!(!String::from_utf8_lossy(&requests[0].body).contains("secret"));
    }

    #[test]
    fn a_deleted_account_s_registrations_go_and_another_user_s_stay() {
        let (mut host, push) = host_with(&[]);
        register(&mut host, &push, "phone", TOKEN);
        register(&mut host, &push, "tablet", TOKEN);
        let body = PushRequest::Register {
            token: TOKEN.into(),
            always: false,
        }
        .to_json();
        let kind = MessageKind::Custom(PUSH_KIND.into());
        let event = host.submit_from("alice", "phone", kind, &["alice"], &body);
        host.handle(&push, event).expect("register");
        let notice = chat(&mut host, "one");
        host.handle(&push, notice).expect("waiting");
        assert!(host.stored_keys().any(|k| k.starts_with("state/bob/")));

        let deleted = host.account_deleted("bob");
        host.handle(&push, deleted).expect("account deleted");
        let left: Vec<&str> = host.stored_keys().collect();
        assert_eq!(left, ["device/alice/phone"]);
    }

    #[test]
    fn a_token_of_the_wrong_shape_is_refused_and_not_kept() {
        let (mut host, push) = host_with(&[]);
        register(&mut host, &push, "phone", "short");
        let reply = host.take_sent().pop().expect("a reply");
        assert!(matches!(
            PushReply::from_json(&reply.message.body),
            Ok(PushReply::Refused { .. })
        ));
        assert!(host.stored("device/bob/phone").is_none());
        let notice = chat(&mut host, "hi");
        host.handle(&push, notice).expect("waiting");
        assert!(host.http_requests().is_empty());
    }

    #[test]
    fn a_burst_is_one_push_and_the_next_one_counts_what_was_held_back() {
        let (mut host, push) = host_with(&[("collapse_secs", "60")]);
        register(&mut host, &push, "phone", TOKEN);
        for text in ["one", "two", "three"] {
            let notice = chat(&mut host, text);
            host.handle(&push, notice).expect("waiting");
        }
        assert_eq!(host.http_requests().len(), 1, "one push for the burst");
        host.set_now_ms(1_700_000_000_000 + 61_000);
        let notice = chat(&mut host, "four");
        host.handle(&push, notice).expect("waiting");
        let bodies = posted(&host);
        assert_eq!(bodies.len(), 2);
        assert_eq!(
            bodies[1]["message"]["notification"]["body"],
            "3 new messages"
        );
        assert_eq!(bodies[1]["message"]["data"]["iim_waiting"], "3");
    }

    #[test]
    fn a_device_coming_online_ends_the_burst() {
        let (mut host, push) = host_with(&[]);
        register(&mut host, &push, "phone", TOKEN);
        let notice = chat(&mut host, "one");
        host.handle(&push, notice).expect("waiting");
        let opened = host.open_session("bob", "laptop");
        host.handle(&push, opened).expect("opened");
        host.close_session("bob", "laptop");
        let notice = chat(&mut host, "two");
        host.handle(&push, notice).expect("waiting");
        assert_eq!(host.http_requests().len(), 2);
    }

    #[test]
    fn with_another_device_online_only_a_device_that_asked_is_notified() {
        let (mut host, push) = host_with(&[("collapse_secs", "0")]);
        register(&mut host, &push, "phone", TOKEN);
        register_with(
            &mut host,
            &push,
            "tablet",
            "fcm-token-of-the-tablet-0123",
            true,
        );
        host.connect("bob", "laptop");
        let notice = chat(&mut host, "while the laptop is on");
        host.handle(&push, notice).expect("waiting");
        let bodies = posted(&host);
        assert_eq!(bodies.len(), 1, "{bodies:?}");
        assert_eq!(
            bodies[0]["message"]["token"],
            "fcm-token-of-the-tablet-0123"
        );
        // A device that is online itself gets nothing, whatever it asked.
        host.connect("bob", "tablet");
        let notice = chat(&mut host, "while the tablet is on");
        host.handle(&push, notice).expect("waiting");
        assert_eq!(host.http_requests().len(), 1);
    }

    #[test]
    fn pushes_per_device_and_hour_are_limited() {
        let (mut host, push) = host_with(&[("collapse_secs", "0"), ("max_per_hour", "2")]);
        register(&mut host, &push, "phone", TOKEN);
        for text in ["1", "2", "3", "4"] {
            let notice = chat(&mut host, text);
            host.handle(&push, notice).expect("waiting");
        }
        assert_eq!(host.http_requests().len(), 2);
        host.set_now_ms(1_700_000_000_000 + 3_600_000);
        let notice = chat(&mut host, "5");
        host.handle(&push, notice).expect("waiting");
        assert_eq!(host.http_requests().len(), 3, "a new hour");
    }

    #[test]
    fn the_text_goes_only_when_configured_and_cut() {
        let (mut host, push) = host_with(&[("include_body", "true"), ("body_chars", "5")]);
        register(&mut host, &push, "phone", TOKEN);
        let notice = chat(&mut host, "hello world");
        host.handle(&push, notice).expect("waiting");
        assert_eq!(
            posted(&host)[0]["message"]["notification"]["body"],
            "hello…"
        );
    }

    #[test]
    fn an_end_to_end_encrypted_message_is_named_not_shown() {
        let (mut host, push) = host_with(&[("include_body", "true"), ("collapse_secs", "0")]);
        register(&mut host, &push, "phone", TOKEN);
        for magic in [E2E_DIRECT_MAGIC, E2E_GROUP_MAGIC] {
            let mut body = magic.to_vec();
            body.extend_from_slice(b"ciphertext \xff\x00");
            let Event::Message(message) = host.submit("alice", MessageKind::Chat, &["bob"], &body)
            else {
                unreachable!()
            };
            let notice = host.waiting("bob", &message);
            host.handle(&push, notice).expect("waiting");
        }
        let posted = posted(&host);
        assert_eq!(posted.len(), 2, "{posted:?}");
        for push in &posted {
            assert_eq!(push["message"]["notification"]["body"], "Encrypted message");
        }
    }

    #[test]
    fn a_gateway_that_fails_is_tried_again_then_the_notice_fails_for_the_host_to_keep() {
        let (mut host, push) = host_with(&[("retries", "1")]);
        register(&mut host, &push, "phone", TOKEN);
        let unavailable = Response {
            status: 503,
            headers: Vec::new(),
            body: b"down".to_vec(),
        };
        host.answer_http(Ok(unavailable.clone()));
        let notice = chat(&mut host, "one");
        host.handle(&push, notice)
            .expect("the second attempt went through");
        assert_eq!(host.http_requests().len(), 2);

        host.set_now_ms(1_700_000_000_000 + 120_000);
        host.answer_http(Ok(unavailable.clone()))
            .answer_http(Ok(unavailable));
        let notice = chat(&mut host, "two");
        let error = host
            .handle(&push, notice)
            .expect_err("the gateway stays down");
        assert!(
            matches!(&error, PluginError::Failed(reason) if reason.contains("503 down")),
            "{error:?}"
        );
        host.answer_http(Err(HttpError::Denied));
        let notice = chat(&mut host, "three");
        assert!(host.handle(&push, notice).is_err());
        assert_eq!(
            host.http_requests().len(),
            5,
            "a denied request is not tried again"
        );
    }

    #[test]
    fn a_token_the_gateway_says_is_gone_is_forgotten() {
        let (mut host, push) = host_with(&[]);
        register(&mut host, &push, "phone", TOKEN);
        host.answer_http(Ok(Response {
            status: 404,
            headers: Vec::new(),
            body: b"UNREGISTERED".to_vec(),
        }));
        let notice = chat(&mut host, "one");
        host.handle(&push, notice).expect("waiting");
        assert!(host.stored("device/bob/phone").is_none());
    }

    #[test]
    fn apns_requests_go_to_the_token_s_path_with_apple_s_headers() {
        let mut host = FakeHost::new();
        host.add_user("alice").add_user("bob");
        let push = host
            .init::<Push>(&[
                ("gateway", "https://api.push.apple.com/"),
                ("format", "apns"),
                ("apns_topic", "com.example.chat"),
                ("authorization", "bearer abc"),
            ])
            .expect("init");
        let token = "ab".repeat(32);
        register(&mut host, &push, "phone", &token);
        let notice = chat(&mut host, "hi");
        host.handle(&push, notice).expect("waiting");
        let request = &host.http_requests()[0];
        assert_eq!(
            request.url,
            format!("https://api.push.apple.com/3/device/{token}")
        );
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(header("apns-topic"), Some("com.example.chat"));
        assert_eq!(header("apns-collapse-id"), Some("iim-bob"));
        assert_eq!(header("authorization"), Some("bearer abc"));
        assert_eq!(posted(&host)[0]["aps"]["alert"]["title"], "alice");
    }

    #[test]
    fn a_configuration_without_what_it_needs_is_refused() {
        let mut host = FakeHost::new();
        for config in [
            vec![("format", "fcm")],
            vec![("gateway", GATEWAY), ("format", "webpush")],
            vec![("gateway", "push.example.com"), ("format", "fcm")],
            vec![("gateway", GATEWAY), ("format", "apns")],
            vec![("gateway", GATEWAY), ("format", "fcm"), ("retries", "9")],
            vec![("gateway", GATEWAY), ("format", "fcm"), ("colour", "red")],
        ] {
            assert!(
                matches!(
                    host.init::<Push>(&config),
                    Err(PluginError::InvalidConfig(_))
                ),
                "{config:?}"
            );
        }
    }
}
