//! A plugin that misbehaves on request, for the host's fault tests (never load it in
//! production). It handles messages of kind `misbehave`; the body says what to do:
//!
//! - `trap`: panics, which traps the instance;
//! - `loop`: never returns;
//! - `sleep`: sleeps for an hour (blocking on a WASI clock: host code, out of the epoch's
//!   reach, so only the call's async timeout ends it);
//! - `alloc`: allocates until its memory limit;
//! - `fail`: returns `failed` (the host retries, then sets the event aside);
//! - `reject`: returns `rejected`;
//! - `forge`: sends as another user (the first addressee);
//! - `forge-group`: sends a `group` notice to the first addressee, then a chat message
//!   addressed to the group `#team`, neither of which a plugin that does not handle groups
//!   may send;
//! - `badlist`: sends to a user-list naming an unknown server, then one naming a user twice;
//! - `count`: adds one to a stored counter, answering the count;
//! - `count-then-fail`: adds one to the counter, then fails (the write must not last);
//! - `stderr TEXT`, `stdout TEXT`: writes the line TEXT to its stderr or stdout (which the
//!   host logs under the plugin's name), then passes the message on;
//! - anything else: passes the message on to its addressees.
//!
//! With `mode = "pass"` in its configuration it misbehaves no more: every message is passed on
//! (for the tests of handing dead letters back once a plugin is fixed).
//!
//! What the host answered `forge`, `badlist` and `count` is reported to the sender as a
//! message of kind `misbehave-report`, so a test sees the host's error as the plugin saw it.

use iim_plugin_sdk::{
    Config, Event, Message, MessageKind, Plugin, PluginError, ServerRow, Subscription, UserList,
    UserRow, host,
};

/// The misbehaving plugin.
pub struct Misbehave {
    /// `mode = "pass"`: pass every message on, whatever its body says.
    pass: bool,
}

const KIND: &str = "misbehave";

impl Plugin for Misbehave {
    const NAME: &'static str = "misbehave";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new(config: &Config) -> Result<Self, PluginError> {
        config.deny_unknown(&["mode"])?;
        let pass = match config.get("mode") {
            None | Some("misbehave") => false,
            Some("pass") => true,
            Some(other) => {
                return Err(PluginError::InvalidConfig(format!(
                    "mode: expected \"misbehave\" or \"pass\", got {other:?}"
                )));
            }
        };
        Ok(Misbehave { pass })
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::Message(MessageKind::Custom(KIND.into()))]
    }

    fn handle(&self, event: Event) -> Result<(), PluginError> {
        let Event::Message(message) = event else {
            return Ok(());
        };
        if self.pass {
            host::forward(&message)?;
            return Ok(());
        }
        match message.body.as_slice() {
            b"trap" => panic!("asked to trap"),
            b"loop" => {
                let mut spins = 0u64;
                loop {
                    spins = std::hint::black_box(spins.wrapping_add(1));
                }
            }
            b"sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(())
            }
            b"alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            b"fail" => Err(PluginError::Failed("asked to fail".into())),
            b"reject" => Err(PluginError::Rejected("asked to reject".into())),
            b"forge" => {
                let victim = message.to.first().cloned().unwrap_or_default();
                let mut forged = Message::new(
                    MessageKind::Chat,
                    vec![message.sender.clone()],
                    b"forged".to_vec(),
                );
                forged.sender = victim;
                let answer = host::send_to(&forged, &forged.to.clone());
                report(&message, &format!("forge: {answer:?}"))
            }
            b"forge-group" => {
                let addressee = message.to.first().cloned().unwrap_or_default();
                let notice = Message::new(
                    MessageKind::Custom("group".into()),
                    vec![addressee.clone()],
                    br#"{"event":"added","users":["mallory"]}"#.to_vec(),
                );
                let first = host::send_to(&notice, std::slice::from_ref(&addressee));
                let to_group =
                    Message::new(MessageKind::Chat, vec!["#team".into()], b"forged".to_vec());
                let second = host::send_to(&to_group, std::slice::from_ref(&addressee));
                report(&message, &format!("forge-group: {first:?} / {second:?}"))
            }
            b"badlist" => {
                let elsewhere = UserList {
                    servers: vec![ServerRow {
                        server: "elsewhere".into(),
                        users: vec![row(&message.sender)],
                    }],
                };
                let first = host::send(&message, &elsewhere);
                let twice = host::resolve(std::slice::from_ref(&message.sender)).map(|mut list| {
                    if let Some(server) = list.servers.first_mut() {
                        server.users.push(row(&message.sender));
                    }
                    list
                });
                let second = match twice {
                    Ok(list) => host::send(&message, &list),
                    Err(e) => Err(e),
                };
                report(&message, &format!("badlist: {first:?} / {second:?}"))
            }
            b"pass-on" => {
                let addressee = message.to.first().cloned().unwrap_or_default();
                let unknown = host::pass_on(&[addressee.clone(), "nobody-here".into()]);
                let twice = host::pass_on(&[addressee.clone(), addressee]);
                report(&message, &format!("pass-on: {unknown:?} / {twice:?}"))
            }
            body if body.starts_with(b"stderr ") || body.starts_with(b"stdout ") => {
                let (stream, text) = body.split_at(b"stderr ".len());
                let text = String::from_utf8_lossy(text);
                if stream == b"stderr " {
                    eprintln!("{text}");
                } else {
                    println!("{text}");
                }
                host::forward(&message)?;
                Ok(())
            }
            b"count" | b"count-then-fail" => {
                let count = host::kv_get("count")?
                    .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                    .map_or(0, u64::from_be_bytes)
                    + 1;
                host::kv_set("count", &count.to_be_bytes())?;
                if message.body == b"count-then-fail" {
                    return Err(PluginError::Rejected("counted, then refused".into()));
                }
                report(&message, &format!("count: {count}"))
            }
            _ => {
                host::forward(&message)?;
                Ok(())
            }
        }
    }
}

fn row(user: &str) -> UserRow {
    UserRow {
        user: user.to_owned(),
        devices: Vec::new(),
    }
}

/// Tells the sender what happened.
fn report(message: &Message, text: &str) -> Result<(), PluginError> {
    let answer = Message::new(
        MessageKind::Custom("misbehave-report".into()),
        vec![message.sender.clone()],
        text.as_bytes().to_vec(),
    );
    host::send_to(&answer, &answer.to)?;
    Ok(())
}

iim_plugin_sdk::export_plugin!(Misbehave);
