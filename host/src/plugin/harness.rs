//! `iim-host plugin test FILE.wasm SCRIPT`: a plugin component run against a host of its own,
//! outside any server, with a script of events and what each should do. For plugin authors in
//! any language: the `.wasm` is the real one, run by the host's engine and imports, on a store
//! in a temporary directory ([`Sandbox`]).
//!
//! A script is TOML:
//!
//! ```toml
//! users = ["alice", "bob", "carol"]   # accounts that exist
//! friends = { alice = ["bob"] }       # relations, one-way as in the host
//! colleagues = { bob = ["carol"] }
//!
//! [config]                            # the plugin's configuration, as in NAME.toml
//! max_body = 8
//!
//! [init]                              # optional: what init should answer
//! subscriptions = ["message(typing)"] #   exactly these
//! # refused = "max_body"              #   or: refuses the configuration, saying this
//!
//! [[event]]                           # a message submitted by alice's device phone
//! message = { from = "alice", to = ["bob", "carol"], kind = "typing", body = "started" }
//! sends = [{ to = ["bob", "carol"], forward = true }]  # exactly these sends, in order
//!
//! [[event]]
//! message = { from = "alice", to = ["bob"], kind = "typing", body = "far too long" }
//! rejected = "more than the 8 allowed"                 # refused, the reason containing this
//! ```
//!
//! Events: `message = {from, device?, to, kind, body | body_hex}`, `session_opened` and
//! `session_closed = {user, device?, devices_online?}`, `delivered = {event, user, device?}`
//! (the delivery of the message of event number `event`, counted from 1). Outcomes: ok (the
//! default; then `sends`, default none, must match), `rejected`, `failed` or `trapped` with a
//! part of the reason. A send is `{to, kind?, body?, forward?}` (its sender is always the acting
//! user: the host allows no other): `to` the users it goes to (any order), `forward = true` if
//! it is the message being handled, passed on. After
//! an event, `stored = {key = "value"}` checks the plugin's storage (`""` for no value).
//! The effects of an ok event are applied, so later events see its storage and inboxes.

use super::LoadedInfo;
use super::check::Sandbox;
use super::event::{Delivered, Event, SessionInfo};
use super::imports::{Call, Effects, Outgoing};
use super::runtime::{CallOutcome, LoadError, Runtime};
use super::settings::Settings;
use iim_proto::{Address, DeviceId, Message, MessageKind, RelationKind, UserId};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

/// A test script.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// Accounts that exist.
    #[serde(default)]
    users: Vec<String>,
    /// Friends lists.
    #[serde(default)]
    friends: BTreeMap<String, Vec<String>>,
    /// Colleagues lists.
    #[serde(default)]
    colleagues: BTreeMap<String, Vec<String>>,
    /// The plugin's configuration.
    #[serde(default)]
    config: toml::Table,
    /// What `init` should answer.
    init: Option<InitExpected>,
    /// The events, in order.
    #[serde(default)]
    event: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InitExpected {
    subscriptions: Option<Vec<String>>,
    refused: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    message: Option<MessageSpec>,
    session_opened: Option<SessionSpec>,
    session_closed: Option<SessionSpec>,
    delivered: Option<DeliveredSpec>,
    rejected: Option<String>,
    failed: Option<String>,
    trapped: Option<String>,
    #[serde(default)]
    sends: Vec<SendSpec>,
    #[serde(default)]
    stored: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageSpec {
    from: String,
    device: Option<String>,
    #[serde(default)]
    to: Vec<String>,
    kind: String,
    body: Option<String>,
    body_hex: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionSpec {
    user: String,
    device: Option<String>,
    devices_online: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveredSpec {
    event: usize,
    user: String,
    device: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendSpec {
    to: Vec<String>,
    kind: Option<String>,
    body: Option<String>,
    #[serde(default)]
    forward: bool,
}

/// What a run found: a line per step, and how many failed.
pub struct Report {
    /// Human-readable lines, one per step (and more for a failure).
    pub text: String,
    /// Steps that did not go as the script says.
    pub failures: usize,
    /// Steps run.
    pub steps: usize,
}

/// Parses a script; the error names what is wrong.
pub fn parse(text: &str) -> Result<Script, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

fn user(name: &str) -> anyhow::Result<UserId> {
    UserId::new(name).map_err(|e| anyhow::anyhow!("{name:?}: {e}"))
}

fn device(name: Option<&str>) -> anyhow::Result<DeviceId> {
    let name = name.unwrap_or("phone");
    DeviceId::new(name).map_err(|e| anyhow::anyhow!("device {name:?}: {e}"))
}

/// Runs `script` against the component `bytes`, named `name`.
pub async fn run(
    runtime: &Runtime,
    bytes: &[u8],
    name: &str,
    script: &Script,
) -> anyhow::Result<Report> {
    if let Some(InitExpected {
        subscriptions: Some(_),
        refused: Some(_),
    }) = &script.init
    {
        anyhow::bail!("[init]: subscriptions or refused, not both");
    }
    for (index, step) in script.event.iter().enumerate() {
        let outcomes = [&step.rejected, &step.failed, &step.trapped];
        anyhow::ensure!(
            outcomes.iter().filter(|o| o.is_some()).count() <= 1,
            "event {}: one of rejected, failed, trapped, not several",
            index + 1
        );
    }
    let users = script
        .users
        .iter()
        .map(|u| user(u))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sandbox = Sandbox::new(&users)?;
    let store = &sandbox.services.store;
    for (kind, lists) in [
        (RelationKind::Friend, &script.friends),
        (RelationKind::Colleague, &script.colleagues),
    ] {
        for (owner, others) in lists {
            for other in others {
                store.relations.add(&user(owner)?, kind, &user(other)?)?;
            }
        }
    }
    let config = super::settings::parse(
        &toml::to_string(&script.config)?,
        &crate::config::PluginsConfig::default(),
    )
    .map_err(|e| anyhow::anyhow!("[config]: {e}"))?;
    let settings = Settings {
        // One instance: the script's events in one order.
        instances: 1,
        ..config.settings
    };
    let build = runtime.compile(bytes)?;
    let mut out = String::new();
    let mut failures = 0;
    let init = runtime
        .instantiate(
            &build,
            name,
            Arc::clone(&sandbox.services),
            &config.config,
            &settings,
        )
        .await;
    let (mut instance, info) = match (init, &script.init) {
        (
            Err(LoadError::Config(reason)),
            Some(InitExpected {
                refused: Some(want),
                ..
            }),
        ) => {
            let pass = reason.contains(want.as_str());
            failures += usize::from(!pass);
            let _ = writeln!(
                out,
                "{} init: refused its configuration: {reason}{}",
                mark(pass),
                if pass {
                    String::new()
                } else {
                    format!(" (expected a refusal saying {want:?})")
                }
            );
            return Ok(Report {
                text: out,
                failures,
                steps: 1,
            });
        }
        (Err(e), _) => {
            let _ = writeln!(out, "FAIL init: {e}");
            return Ok(Report {
                text: out,
                failures: 1,
                steps: 1,
            });
        }
        (Ok((mut instance, info)), expected) => {
            let groups = instance.state().subscribed_groups();
            let info = LoadedInfo::from_init(info, groups, &build.digest)?;
            let subs: Vec<String> = info.subscriptions.iter().map(|s| s.to_string()).collect();
            let problem = match expected {
                Some(InitExpected {
                    refused: Some(want),
                    ..
                }) => Some(format!(
                    "expected it to refuse its configuration, saying {want:?}"
                )),
                Some(InitExpected {
                    subscriptions: Some(want),
                    ..
                }) if *want != subs => Some(format!("expected subscriptions {want:?}")),
                _ => None,
            };
            failures += usize::from(problem.is_some());
            let _ = writeln!(
                out,
                "{} init: {} {}, handles {}{}",
                mark(problem.is_none()),
                info.name,
                info.version,
                subs.join(", "),
                problem.map(|p| format!(" ({p})")).unwrap_or_default()
            );
            (instance, info)
        }
    };
    let mut messages: Vec<Option<Arc<Message>>> = Vec::new();
    for (index, step) in script.event.iter().enumerate() {
        let number = index + 1;
        let event = match event_of(step, &messages, &sandbox) {
            Ok(event) => event,
            Err(e) => anyhow::bail!("event {number}: {e:#}"),
        };
        messages.push(match &event {
            Event::Message(m) => Some(Arc::clone(m)),
            _ => None,
        });
        let (acting, acting_device) = event.acting();
        instance.state().begin(Call {
            user: acting.clone(),
            device: acting_device.clone(),
            message: match &event {
                Event::Message(m) => Some(Arc::clone(m)),
                _ => None,
            },
            groups: info.subscriptions.contains(&super::Subscription::Groups),
            effects: Effects::default(),
        });
        let outcome = instance
            .handle(&event.to_wit(), settings.call_timeout())
            .await;
        let effects = instance
            .state()
            .end()
            .map(|c| c.effects)
            .unwrap_or_default();
        let sends: Vec<String> = effects
            .sends
            .iter()
            .map(|s| describe_send(s, &event))
            .collect();
        let (got, reason) = match &outcome {
            CallOutcome::Handled => ("ok", String::new()),
            CallOutcome::Rejected(r) => ("rejected", r.clone()),
            CallOutcome::Failed(r) => ("failed", r.clone()),
            CallOutcome::Trapped(r) => ("trapped", r.trim_start_matches("trapped: ").to_owned()),
        };
        let want = [
            ("rejected", &step.rejected),
            ("failed", &step.failed),
            ("trapped", &step.trapped),
        ]
        .into_iter()
        .find_map(|(what, part)| part.as_ref().map(|p| (what, p.as_str())));
        let mut problems = Vec::new();
        match want {
            Some((what, part)) if got != what || !reason.contains(part) => {
                problems.push(format!("expected {what} saying {part:?}"));
            }
            None if got != "ok" => problems.push("expected ok".to_owned()),
            _ => {}
        }
        if got == "ok" {
            if let Err(problem) = sends_match(&step.sends, &effects) {
                problems.push(problem);
            }
        } else if !step.sends.is_empty() {
            problems.push(format!("expected {} sends", step.sends.len()));
        }
        if matches!(outcome, CallOutcome::Trapped(_)) {
            // As a lane would: a fresh instance for the next event.
            match runtime
                .instantiate(
                    &build,
                    name,
                    Arc::clone(&sandbox.services),
                    &config.config,
                    &settings,
                )
                .await
            {
                Ok((fresh, _)) => instance = fresh,
                Err(e) => anyhow::bail!("after event {number} trapped, no new instance: {e}"),
            }
        }
        if got == "ok" {
            // Requests to groups stay recorded for dispatch: the sandbox raises no more events.
            super::lane::apply(&sandbox.services, name, &event, effects)
                .map_err(|e| anyhow::anyhow!("event {number}: applying its effects: {e}"))?;
        }
        for (key, value) in &step.stored {
            let there = store.plugin_kv.get(name, key)?.unwrap_or_default();
            if there != value.as_bytes() {
                problems.push(format!(
                    "expected storage {key:?} = {value:?}, found {:?}",
                    String::from_utf8_lossy(&there)
                ));
            }
        }
        failures += usize::from(!problems.is_empty());
        let _ = writeln!(
            out,
            "{} event {number} ({event}): {got}{}{}",
            mark(problems.is_empty()),
            if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            },
            if sends.is_empty() {
                String::new()
            } else {
                format!("; sent {}", sends.join("; "))
            }
        );
        for problem in problems {
            let _ = writeln!(out, "       {problem}");
        }
    }
    Ok(Report {
        text: out,
        failures,
        steps: script.event.len() + 1,
    })
}

fn mark(pass: bool) -> &'static str {
    if pass { "ok  " } else { "FAIL" }
}

/// The event a step raises; a message is numbered by the sandbox's store, as a host would.
fn event_of(
    step: &Step,
    messages: &[Option<Arc<Message>>],
    sandbox: &Sandbox,
) -> anyhow::Result<Event> {
    let given = [
        step.message.is_some(),
        step.session_opened.is_some(),
        step.session_closed.is_some(),
        step.delivered.is_some(),
    ]
    .into_iter()
    .filter(|g| *g)
    .count();
    anyhow::ensure!(
        given == 1,
        "an event is one of message, session_opened, session_closed, delivered ({given} given)"
    );
    if let Some(m) = &step.message {
        let kind: MessageKind = m.kind.parse().map_err(|e| anyhow::anyhow!("kind: {e}"))?;
        kind.check()
            .map_err(|e| anyhow::anyhow!("kind {:?}: {e}", m.kind))?;
        let to =
            m.to.iter()
                .map(|a| {
                    a.parse::<Address>()
                        .map_err(|e| anyhow::anyhow!("to {a:?}: {e}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
        let body = match (&m.body, &m.body_hex) {
            (Some(text), None) => text.as_bytes().to_vec(),
            (None, Some(hex)) => decode_hex(hex)?,
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => anyhow::bail!("body or body_hex, not both"),
        };
        let (from, from_device) = (user(&m.from)?, device(m.device.as_deref())?);
        let message = sandbox.services.store.messages.number(|id| Message {
            id,
            kind,
            from,
            from_device,
            to,
            body,
            sent_at: crate::clock::now_ms(),
        })?;
        return Ok(Event::Message(Arc::new(message)));
    }
    let session = |s: &SessionSpec, online: u32| -> anyhow::Result<SessionInfo> {
        Ok(SessionInfo {
            user: user(&s.user)?,
            device: device(s.device.as_deref())?,
            devices_online: s.devices_online.unwrap_or(online),
        })
    };
    if let Some(s) = &step.session_opened {
        return Ok(Event::SessionOpened(session(s, 1)?));
    }
    if let Some(s) = &step.session_closed {
        return Ok(Event::SessionClosed(session(s, 0)?));
    }
    let d = step.delivered.as_ref().expect("counted above");
    let Some(Some(message)) = d.event.checked_sub(1).and_then(|i| messages.get(i)) else {
        anyhow::bail!(
            "delivered: event {} is not an earlier message event",
            d.event
        );
    };
    Ok(Event::Delivered(Delivered {
        id: message.id,
        kind: message.kind.clone(),
        sender: message.from.clone(),
        sender_device: message.from_device.clone(),
        recipient: user(&d.user)?,
        recipient_device: device(d.device.as_deref())?,
    }))
}

fn decode_hex(hex: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(
        hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "body_hex {hex:?} has a character that is not a hex digit"
    );
    anyhow::ensure!(
        hex.len().is_multiple_of(2),
        "body_hex has an odd number of digits"
    );
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16)
                .map_err(|_| anyhow::anyhow!("body_hex: {:?} is not hex", &hex[i..i + 2]))
        })
        .collect()
}

/// One send, said in a line: `bob, carol <- typing from alice "started" (passed on)`.
fn describe_send(send: &super::imports::PendingSend, event: &Event) -> String {
    let users: Vec<&str> = send.users.iter().map(|u| u.as_str()).collect();
    let (kind, body, forward) = match &send.message {
        Outgoing::Forward(m) => (m.kind.to_string(), &m.body, true),
        Outgoing::New { kind, body, .. } => (kind.to_string(), body, false),
    };
    let from = event.acting().0;
    format!(
        "{} <- {kind} from {from} {:?}{}",
        users.join(", "),
        String::from_utf8_lossy(body),
        if forward { " (passed on)" } else { "" }
    )
}

fn sends_match(want: &[SendSpec], effects: &Effects) -> Result<(), String> {
    if want.len() != effects.sends.len() {
        return Err(format!(
            "expected {} sends, the plugin made {}",
            want.len(),
            effects.sends.len()
        ));
    }
    for (n, (want, got)) in want.iter().zip(&effects.sends).enumerate() {
        let mut users: Vec<&str> = got.users.iter().map(|u| u.as_str()).collect();
        users.sort_unstable();
        let mut to: Vec<&str> = want.to.iter().map(String::as_str).collect();
        to.sort_unstable();
        let (kind, body, forward) = match &got.message {
            Outgoing::Forward(m) => (m.kind.to_string(), &m.body, true),
            Outgoing::New { kind, body, .. } => (kind.to_string(), body, false),
        };
        let wrong = if users != to {
            Some(format!("to {users:?}, expected {to:?}"))
        } else if want.kind.as_ref().is_some_and(|k| *k != kind) {
            Some(format!("kind {kind}, expected {:?}", want.kind))
        } else if want
            .body
            .as_ref()
            .is_some_and(|b| b.as_bytes() != body.as_slice())
        {
            Some(format!(
                "body {:?}, expected {:?}",
                String::from_utf8_lossy(body),
                want.body
            ))
        } else if want.forward != forward {
            Some(if forward {
                "the message handled, passed on; expected a new message".to_owned()
            } else {
                "a new message; expected the message handled, passed on".to_owned()
            })
        } else {
            None
        };
        if let Some(wrong) = wrong {
            return Err(format!("send {}: {wrong}", n + 1));
        }
    }
    Ok(())
}
