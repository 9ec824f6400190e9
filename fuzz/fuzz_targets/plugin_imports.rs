//! The argument checks of the plugin imports (`iim-host`'s `plugin::imports`): `send`'s message
//! and user-list, the user names of `resolve` and `presence`, the storage keys and values, and
//! the line `log` keeps. The checks run before the host looks anything up, on whatever a plugin
//! passes.
//!
//! Checked: no argument makes them panic; and what they let through keeps the rules. A `send`
//! that passes is from the acting user, within the call's sends; its new message has a valid
//! kind (not the host's own `waiting`), a body within the limit, valid recipients (one group
//! at most, alone, and only from the plugin that handles groups) and fits a delivery frame
//! with the largest id; a message passed on is the one being handled, unchanged; its users are
//! the user-list's, valid, each once, at most the limit, on servers the host knows. A forged
//! sender is refused as forged, whatever else is wrong.

#![no_main]

use arbitrary::Arbitrary;
use iim_host::plugin::bindings::iim::plugin::types as wit;
use iim_host::plugin::imports::{
    Call, MAX_KV_KEY, MAX_KV_VALUE, MAX_LOG_LINE, MAX_SENDS_PER_CALL, Outgoing, PendingSend,
    SendLimits, check_key_range, check_kv_write, check_send_arguments, check_user_names, log_line,
};
use iim_proto::{Address, DeviceId, GROUP_KIND, Message, MessageId, MessageKind, UserId};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::sync::Arc;

/// The acting user, and the message being handled (from another user, to the acting one).
const ACTING: &str = "alice";
const HANDLED_ID: u64 = 77;
/// The host's own server, and another one of its network.
const SERVERS: [&str; 2] = ["h1", "h2"];

/// A name: most often one that the checks accept, so that they go deep.
#[derive(Arbitrary, Debug)]
enum Name {
    Acting,
    Known(u8),
    Group(u8),
    Raw(String),
}

impl Name {
    fn text(&self) -> String {
        match self {
            Name::Acting => ACTING.into(),
            Name::Known(n) => ["bob", "carol", "dave", "eve"][usize::from(*n) % 4].into(),
            Name::Group(n) => ["#team", "#x", "#team"][usize::from(*n) % 3].into(),
            Name::Raw(text) => text.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Kind {
    Handled,
    Chat,
    Receipt,
    Presence,
    Group,
    Waiting,
    Custom(String),
}

#[derive(Arbitrary, Debug)]
enum Id {
    New,
    Handled,
    Other(u64),
}

#[derive(Arbitrary, Debug)]
struct Row {
    server: Name,
    users: Vec<(Name, Vec<Name>)>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Limits, small so that they are crossed: body 0-255 bytes, frame 1024 + 0-2047, 1-8
    /// users.
    max_body: u8,
    max_frame: u16,
    max_users: u8,
    /// Whether the plugin handles groups; whether a message is being handled; sends made.
    groups: bool,
    handling: bool,
    sends_made: u8,
    sender: Name,
    id: Id,
    kind: Kind,
    /// `None`: the handled message's body.
    body: Option<Vec<u8>>,
    to: Vec<Name>,
    rows: Vec<Row>,
    names: Vec<Name>,
    key: String,
    value: Option<Vec<u8>>,
    after: Option<String>,
    log: String,
}

fn user(name: &str) -> UserId {
    UserId::new(name).expect("a valid name")
}

fuzz_target!(|input: Input| {
    let handled = Arc::new(Message {
        id: MessageId(HANDLED_ID),
        kind: MessageKind::Custom("poll".into()),
        from: user("bob"),
        from_device: DeviceId::new("phone").expect("a valid name"),
        to: vec![user(ACTING).into()],
        body: b"handled".to_vec(),
        sent_at: 1,
    });
    let limits = SendLimits {
        max_body: u32::from(input.max_body),
        max_frame: 1024 + u32::from(input.max_frame % 2048),
        max_users: usize::from(input.max_users % 8) + 1,
    };
    let mut call = Call {
        user: user(ACTING),
        device: DeviceId::new("laptop").expect("a valid name"),
        message: input.handling.then(|| Arc::clone(&handled)),
        groups: input.groups,
        effects: Default::default(),
    };
    let sends_made = usize::from(input.sends_made % 70);
    call.effects.sends = (0..sends_made)
        .map(|_| PendingSend {
            message: Outgoing::Forward(Arc::clone(&handled)),
            users: Vec::new(),
        })
        .collect();

    let kind = match &input.kind {
        Kind::Handled => wit::MessageKind::Custom("poll".into()),
        Kind::Chat => wit::MessageKind::Chat,
        Kind::Receipt => wit::MessageKind::Receipt,
        Kind::Presence => wit::MessageKind::Presence,
        Kind::Group => wit::MessageKind::Custom(GROUP_KIND.into()),
        Kind::Waiting => wit::MessageKind::Custom(iim_proto::body::WAITING_KIND.into()),
        Kind::Custom(name) => wit::MessageKind::Custom(name.clone()),
    };
    let msg = wit::Message {
        id: match input.id {
            Id::New => 0,
            Id::Handled => HANDLED_ID,
            Id::Other(id) => id,
        },
        kind,
        sender: input.sender.text(),
        sender_device: "whatever".into(),
        to: input.to.iter().map(Name::text).collect(),
        body: input.body.clone().unwrap_or_else(|| handled.body.clone()),
        sent_at: 0,
    };
    let list = wit::UserList {
        servers: input
            .rows
            .iter()
            .map(|row| wit::ServerRow {
                server: match &row.server {
                    Name::Known(n) => SERVERS[usize::from(*n) % 2].into(),
                    other => other.text(),
                },
                users: row
                    .users
                    .iter()
                    .map(|(name, devices)| wit::UserRow {
                        user: name.text(),
                        devices: devices
                            .iter()
                            .map(|d| wit::DeviceRow {
                                device: d.text(),
                                session: 1,
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
    };
    let known = |server: &str| SERVERS.contains(&server);
    match check_send_arguments(&call, limits, msg.clone(), &list, known) {
        Ok(send) => check_passed(&send, &msg, &list, &call, limits, &handled),
        Err(error) => {
            if msg.sender != ACTING {
                assert!(
                    matches!(error, wit::HostError::ForgedSender(_)),
                    "{error:?}"
                );
            }
        }
    }

    let names: Vec<String> = input.names.iter().map(Name::text).collect();
    if let Ok(users) = check_user_names(&names, limits.max_users) {
        assert!(users.len() <= limits.max_users);
        assert!(users.iter().map(UserId::as_str).eq(names.iter()));
    }

    let kv = check_kv_write(&input.key, input.value.as_deref());
    let key_ok = (1..=MAX_KV_KEY).contains(&input.key.len());
    let value_ok = input.value.as_ref().is_none_or(|v| v.len() <= MAX_KV_VALUE);
    assert_eq!(kv.is_ok(), key_ok && value_ok);
    let range = check_key_range(&input.key, input.after.as_deref());
    let after_ok = input.after.as_ref().is_none_or(|a| a.len() <= MAX_KV_KEY);
    assert_eq!(range.is_ok(), input.key.len() <= MAX_KV_KEY && after_ok);

    let line = log_line(input.log.clone());
    assert!(input.log.starts_with(&line) && line.len() <= MAX_LOG_LINE);
    assert!(line.len() == input.log.len() || line.len() + 4 > MAX_LOG_LINE);
});

/// What a `send` the checks let through must be.
fn check_passed(
    send: &PendingSend,
    msg: &wit::Message,
    list: &wit::UserList,
    call: &Call,
    limits: SendLimits,
    handled: &Arc<Message>,
) {
    assert_eq!(msg.sender, ACTING);
    assert!(call.effects.sends.len() < MAX_SENDS_PER_CALL);
    match &send.message {
        Outgoing::New { kind, to, body } => {
            assert_eq!(msg.id, 0);
            assert!(kind.check().is_ok());
            assert_ne!(
                kind,
                &MessageKind::Custom(iim_proto::body::WAITING_KIND.into())
            );
            assert!(body.len() <= limits.max_body as usize);
            assert!(to.len() <= iim_proto::MAX_TARGETS);
            let to_group = to.iter().any(|a| matches!(a, Address::Group(_)));
            assert!(!to_group || to.len() == 1, "a group and more: {to:?}");
            let group_kind = kind == &MessageKind::Custom(GROUP_KIND.into());
            assert!(call.groups || !(to_group || group_kind));
            let probe = Message {
                id: MessageId(u64::MAX),
                kind: kind.clone(),
                from: call.user.clone(),
                from_device: call.device.clone(),
                to: to.clone(),
                body: body.clone(),
                sent_at: u64::MAX,
            };
            assert!(iim_proto::encode_deliver(u64::MAX, &probe, limits.max_frame).is_ok());
        }
        Outgoing::Forward(message) => {
            assert!(call.message.is_some());
            assert_eq!(msg.id, HANDLED_ID);
            assert!(Arc::ptr_eq(message, handled));
        }
    }
    let listed: Vec<&str> = list
        .servers
        .iter()
        .flat_map(|row| row.users.iter().map(|u| u.user.as_str()))
        .collect();
    assert!(send.users.iter().map(UserId::as_str).eq(listed));
    assert!(send.users.len() <= limits.max_users);
    assert_eq!(
        send.users.iter().collect::<HashSet<_>>().len(),
        send.users.len()
    );
    for row in &list.servers {
        assert!(SERVERS.contains(&row.server.as_str()));
        for device in row.users.iter().flat_map(|u| &u.devices) {
            assert!(DeviceId::new(&device.device).is_ok());
        }
    }
}
