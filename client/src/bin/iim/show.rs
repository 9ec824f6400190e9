//! How `iim listen` shows a message: one line of text for a person (after the time), or one
//! JSON object for a program.
//!
//! Message ids are written `id 12` (`(id 12)` after a chat line, `message 12` in a receipt):
//! `#` starts a group's name (`#team`), and nothing else.

use super::e2e::Seal;
use iim_client::proto::body::{
    FILE_KIND, FileRef, GroupMember, GroupNotice, GroupReply, GroupSummary, Presence,
    PresenceEntry, PresenceState, Receipt,
};
use iim_client::proto::{Address, GROUP_KIND, GroupId, Message, MessageKind};
use serde::Deserialize;

/// A message's body as `listen` understands it.
enum Body {
    /// Chat, or a kind this client does not know: shown as text.
    Text(String),
    /// A receipt, and the JSON it came as.
    Receipt(Receipt, serde_json::Value),
    /// The entries of a presence message, and the JSON it came as.
    Presence(Vec<PresenceEntry>, serde_json::Value),
    /// A file message's reference, and the JSON it came as.
    File(FileRef, serde_json::Value),
    /// What changed in a group (a `group` message to the group), and the JSON it came as.
    GroupNotice(GroupNotice, serde_json::Value),
    /// The groups plugin's answer to a request of this user's (a `group` message to the
    /// user), and the JSON it came as.
    GroupReply(GroupReply, serde_json::Value),
    /// A body of a kind `listen` reads that does not have the documented shape: shown as text
    /// with its kind, so that a newer plugin's message is still seen.
    Unreadable { text: String, reason: String },
}

impl Body {
    fn of(message: &Message) -> Self {
        let json = || serde_json::from_slice::<serde_json::Value>(&message.body);
        let parsed = match &message.kind {
            MessageKind::Custom(kind) if kind == FILE_KIND => {
                json().and_then(|json| Ok(Body::File(FileRef::deserialize(&json)?, json)))
            }
            // A reply names the request it answers (`reply`); a notice says what happened
            // (`event`).
            MessageKind::Custom(kind) if kind == GROUP_KIND => json().and_then(|json| {
                if json.get("reply").is_some() {
                    Ok(Body::GroupReply(GroupReply::deserialize(&json)?, json))
                } else {
                    Ok(Body::GroupNotice(GroupNotice::deserialize(&json)?, json))
                }
            }),
            MessageKind::Chat | MessageKind::Custom(_) => {
                return Body::Text(String::from_utf8_lossy(&message.body).into_owned());
            }
            // Fields this client does not know are ignored, as the format asks.
            MessageKind::Receipt => {
                json().and_then(|json| Ok(Body::Receipt(Receipt::deserialize(&json)?, json)))
            }
            MessageKind::Presence => json()
                .and_then(|json| Ok(Body::Presence(Presence::deserialize(&json)?.presence, json))),
        };
        parsed.unwrap_or_else(|e| Body::Unreadable {
            text: String::from_utf8_lossy(&message.body).into_owned(),
            reason: e.to_string(),
        })
    }
}

/// The group a message is addressed to, if it is addressed to one.
pub(crate) fn group_of(message: &Message) -> Option<&GroupId> {
    match message.to.as_slice() {
        [Address::Group(group)] => Some(group),
        _ => None,
    }
}

/// The line `listen` prints for a message.
pub(crate) fn message_line(json: bool, message: &Message) -> String {
    message_line_sealed(json, message, &Seal::Plain)
}

/// The line `listen` prints for a message whose body was end-to-end encrypted (`seal`): one
/// opened shows what it said, marked `e2e`; one that carried no message says what it did; one
/// that did not open says why.
pub(crate) fn message_line_sealed(json: bool, message: &Message, seal: &Seal) -> String {
    let body = match seal {
        Seal::Failed(reason) => {
            Body::Text(format!("[end-to-end encrypted, not readable: {reason}]"))
        }
        Seal::Notice(text) => Body::Text(format!("[{text}]")),
        Seal::Plain | Seal::Opened | Seal::Hidden => Body::of(message),
    };
    message_line_of(json, message, body, seal)
}

fn message_line_of(json: bool, message: &Message, body: Body, seal: &Seal) -> String {
    if json {
        let mut line = serde_json::json!({
            "kind": message.kind.to_string(),
            "id": message.id.0,
            "from": message.from,
            "from_device": message.from_device,
            "to": message.to,
            "sent_at": message.sent_at,
        });
        let body = match body {
            Body::Text(text) => text.into(),
            // Passed on whole, fields this client does not know included.
            Body::Receipt(_, json)
            | Body::Presence(_, json)
            | Body::File(_, json)
            | Body::GroupNotice(_, json)
            | Body::GroupReply(_, json) => json,
            Body::Unreadable { text, reason } => {
                line["invalid"] = reason.into();
                text.into()
            }
        };
        line["body"] = body;
        if let Seal::Opened | Seal::Notice(_) | Seal::Failed(_) = seal {
            line["e2e"] = true.into();
        }
        if let Seal::Failed(reason) = seal {
            line["e2e_error"] = reason.as_str().into();
        }
        line.to_string()
    } else {
        let mark = match seal {
            Seal::Opened | Seal::Notice(_) | Seal::Failed(_) => " [e2e]",
            Seal::Plain | Seal::Hidden => "",
        };
        format!(
            "{} {}{mark}",
            format_time(message.sent_at),
            describe(message, body)
        )
    }
}

/// What `listen` prints for a message, after its time. A message to a group starts with the
/// group's name.
fn describe(message: &Message, body: Body) -> String {
    let group = group_of(message);
    let place = group.map(|g| format!("#{g} ")).unwrap_or_default();
    let raw = |text: &str| {
        let label = match &message.kind {
            MessageKind::Chat => String::new(),
            other => format!("[{other}] "),
        };
        format!(
            "{place}{}: {label}{text}  (id {})",
            message.from, message.id
        )
    };
    match body {
        Body::Text(text) | Body::Unreadable { text, .. } => raw(&text),
        Body::File(file, _) => {
            let media_type = match file.media_type.as_str() {
                "" => String::new(),
                media_type => format!(", {media_type}"),
            };
            format!(
                "{place}file from {}: {} ({} bytes{media_type}) id {}",
                message.from, file.name, file.size, file.file
            )
        }
        Body::Receipt(receipt, _) => receipt_text(&receipt),
        Body::GroupNotice(notice, _) => {
            let group = group.map_or_else(|| "#?".to_owned(), |g| format!("#{g}"));
            notice_text(&group, message.from.as_str(), &notice)
        }
        Body::GroupReply(reply, _) => reply_text(&reply),
        // A notification has one entry, the sender's; a snapshot lists the user's contacts,
        // never the user, who sends it.
        Body::Presence(entries, _) => match entries.as_slice() {
            [entry] if entry.user == message.from.as_str() => match entry.state {
                PresenceState::Online => format!(
                    "{} is online ({} device{})",
                    entry.user,
                    entry.devices,
                    if entry.devices == 1 { "" } else { "s" }
                ),
                PresenceState::Offline => format!("{} is offline", entry.user),
            },
            [] => "contacts: none".to_owned(),
            entries => {
                let list: Vec<String> = entries
                    .iter()
                    .map(|e| match e.state {
                        PresenceState::Online => format!("{} online ({})", e.user, e.devices),
                        PresenceState::Offline => format!("{} offline", e.user),
                    })
                    .collect();
                format!("contacts: {}", list.join(", "))
            }
        },
    }
}

/// A receipt, as a sentence about the message it is for.
fn receipt_text(receipt: &Receipt) -> String {
    match receipt {
        Receipt::Delivered { id, user, device } => {
            format!("message {id} delivered to {user} ({device})")
        }
        Receipt::Read { id, user, device } => format!("message {id} read by {user} ({device})"),
        Receipt::Expired { id, user } => format!("message {id} expired before {user} got it"),
        Receipt::Counts {
            id,
            group,
            members,
            delivered,
            read,
        } => format!(
            "message {id} in #{group}: delivered to {delivered} of {members}, read by {read}"
        ),
        // The groups plugin refuses a message or a request as a whole: it names nobody.
        Receipt::Refused { id, users, reason } if users.is_empty() => {
            format!("message {id} refused: {reason}")
        }
        Receipt::Refused { id, users, reason } => {
            format!("message {id} refused for {}: {reason}", users.join(", "))
        }
    }
}

/// What changed in `group` (`#team`), done by `by`: `#team: alice added bob, carol`.
pub(crate) fn notice_text(group: &str, by: &str, notice: &GroupNotice) -> String {
    let what = match notice {
        GroupNotice::Created { title, members } => {
            let titled = match title.as_str() {
                "" => String::new(),
                title if Some(title) == group.strip_prefix('#') => String::new(),
                title => format!(" {title:?}"),
            };
            let others: Vec<&str> = members
                .iter()
                .map(String::as_str)
                .filter(|m| *m != by)
                .collect();
            match others.as_slice() {
                [] => format!("{by} created the group{titled}"),
                others => format!("{by} created the group{titled} with {}", others.join(", ")),
            }
        }
        GroupNotice::Renamed { title } => format!("{by} renamed the group {title:?}"),
        GroupNotice::Added { users } => format!("{by} added {}", users.join(", ")),
        GroupNotice::Removed { users } => format!("{by} removed {}", users.join(", ")),
        GroupNotice::Left => format!("{by} left"),
        GroupNotice::Role { user, role } => format!("{by} made {user} {role}"),
        GroupNotice::Deleted => format!("{by} deleted the group"),
    };
    format!("{group}: {what}")
}

/// The groups plugin's reply to a request, on one line (`iim group` prints the same replies
/// more fully).
fn reply_text(reply: &GroupReply) -> String {
    match reply {
        GroupReply::Done { request } => format!("group request {request} done"),
        GroupReply::Members { group, members, .. } => {
            format!("#{group} members: {}", members_inline(members))
        }
        GroupReply::List { groups, .. } if groups.is_empty() => "your groups: none".to_owned(),
        GroupReply::List { groups, .. } => {
            let list: Vec<String> = groups.iter().map(summary_text).collect();
            format!("your groups: {}", list.join(", "))
        }
        GroupReply::Receipts {
            id,
            members,
            delivered,
            read,
            ..
        } => format!(
            "message {id}: delivered to {} of {members}{}, read by {}{}",
            delivered.len(),
            names_in_parentheses(delivered),
            read.len(),
            names_in_parentheses(read),
        ),
    }
}

/// `alice (owner), bob (admin), carol (member)`.
fn members_inline(members: &[GroupMember]) -> String {
    members
        .iter()
        .map(|m| format!("{} ({})", m.user, m.role))
        .collect::<Vec<_>>()
        .join(", ")
}

/// ` (bob, carol)`, or nothing for nobody.
fn names_in_parentheses(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}

/// One group of the user's: `#team (owner, 3 members)`, then its title if it has one of its
/// own: `#team (owner, 3 members) The team`.
pub(crate) fn summary_text(group: &GroupSummary) -> String {
    let members = match group.members {
        1 => "1 member".to_owned(),
        n => format!("{n} members"),
    };
    let title = match group.title.as_str() {
        "" => String::new(),
        title if title == group.group => String::new(),
        title => format!(" {title}"),
    };
    format!("#{} ({}, {members}){title}", group.group, group.role)
}

/// `HH:MM:SS` UTC of a Unix time in milliseconds.
pub(crate) fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use iim_client::proto::{DeviceId, MessageId, UserId};

    /// A message of `kind` from bob's phone to alice, sent at 12:03:07 UTC.
    fn message(kind: MessageKind, body: &str) -> Message {
        Message {
            id: MessageId(43),
            kind,
            from: UserId::new("bob").expect("name"),
            from_device: DeviceId::new("phone").expect("name"),
            to: vec![UserId::new("alice").expect("name").into()],
            body: body.as_bytes().to_vec(),
            sent_at: (12 * 3600 + 3 * 60 + 7) * 1000 + 250,
        }
    }

    /// The same, addressed to the group `#team`.
    fn to_team(kind: MessageKind, body: &str) -> Message {
        Message {
            to: vec!["#team".parse().expect("address")],
            ..message(kind, body)
        }
    }

    fn text(kind: MessageKind, body: &str) -> String {
        message_line(false, &message(kind, body))
    }

    fn json(kind: MessageKind, body: &str) -> serde_json::Value {
        serde_json::from_str(&message_line(true, &message(kind, body)))
            .expect("listen --json prints JSON")
    }

    fn group_kind() -> MessageKind {
        MessageKind::Custom(GROUP_KIND.into())
    }

    #[test]
    fn chat_and_custom_kinds_are_shown_as_text() {
        assert_eq!(text(MessageKind::Chat, "hi"), "12:03:07 bob: hi  (id 43)");
        assert_eq!(
            text(MessageKind::Custom("typing".into()), "{}"),
            "12:03:07 bob: [typing] {}  (id 43)"
        );
    }

    #[test]
    fn receipts_are_shown_as_sentences() {
        let receipt = |body| text(MessageKind::Receipt, body);
        assert_eq!(
            receipt(r#"{"state":"delivered","id":42,"user":"bob","device":"phone"}"#),
            "12:03:07 message 42 delivered to bob (phone)"
        );
        assert_eq!(
            receipt(r#"{"state":"read","id":42,"user":"bob","device":"laptop","later":1}"#),
            "12:03:07 message 42 read by bob (laptop)"
        );
        assert_eq!(
            receipt(
                r#"{"state":"refused","id":42,"users":["carol","dave"],"reason":"not a friend"}"#
            ),
            "12:03:07 message 42 refused for carol, dave: not a friend"
        );
        assert_eq!(
            receipt(
                r#"{"state":"refused","id":42,"users":[],"reason":"you are not a member of #team"}"#
            ),
            "12:03:07 message 42 refused: you are not a member of #team"
        );
        assert_eq!(
            receipt(r#"{"state":"expired","id":42,"user":"carol"}"#),
            "12:03:07 message 42 expired before carol got it"
        );
        assert_eq!(
            receipt(
                r#"{"state":"counts","id":42,"group":"team","members":10,"delivered":4,"read":1}"#
            ),
            "12:03:07 message 42 in #team: delivered to 4 of 10, read by 1"
        );
    }

    #[test]
    fn presence_changes_and_snapshots_are_shown_as_sentences() {
        let presence = |body| text(MessageKind::Presence, body);
        assert_eq!(
            presence(r#"{"presence":[{"user":"bob","state":"online","devices":1}]}"#),
            "12:03:07 bob is online (1 device)"
        );
        assert_eq!(
            presence(r#"{"presence":[{"user":"bob","state":"offline","devices":0}]}"#),
            "12:03:07 bob is offline"
        );
        // From bob, about his contacts: a snapshot, even with one entry.
        assert_eq!(
            presence(r#"{"presence":[{"user":"carol","state":"online","devices":2}]}"#),
            "12:03:07 contacts: carol online (2)"
        );
        assert_eq!(
            presence(
                r#"{"presence":[{"user":"alice","state":"online","devices":1},{"user":"carol","state":"offline","devices":0}]}"#
            ),
            "12:03:07 contacts: alice online (1), carol offline"
        );
        assert_eq!(presence(r#"{"presence":[]}"#), "12:03:07 contacts: none");
    }

    #[test]
    fn a_body_of_another_shape_is_shown_raw_with_its_kind() {
        assert_eq!(
            text(MessageKind::Receipt, r#"{"state":"seen","id":42}"#),
            r#"12:03:07 bob: [receipt] {"state":"seen","id":42}  (id 43)"#
        );
        assert_eq!(
            text(MessageKind::Presence, "not json"),
            "12:03:07 bob: [presence] not json  (id 43)"
        );
        assert_eq!(
            message_line(false, &to_team(group_kind(), r#"{"event":"exploded"}"#)),
            r#"12:03:07 #team bob: [group] {"event":"exploded"}  (id 43)"#
        );
        let line = json(MessageKind::Presence, r#"{"presence":"?"}"#);
        assert_eq!(line["body"], r#"{"presence":"?"}"#);
        assert!(line["invalid"].is_string(), "{line}");
    }

    #[test]
    fn json_lines_carry_receipt_and_presence_bodies_as_objects() {
        let body = r#"{"state":"read","id":42,"user":"bob","device":"laptop","later":1}"#;
        let line = json(MessageKind::Receipt, body);
        assert_eq!(line["kind"], "receipt");
        assert_eq!(line["from"], "bob");
        assert_eq!(line["id"], 43);
        assert_eq!(
            line["body"],
            serde_json::from_str::<serde_json::Value>(body).expect("json")
        );
        assert!(line.get("invalid").is_none());
        let line = json(MessageKind::Chat, "hi");
        assert_eq!(line["body"], "hi");
    }

    #[test]
    fn file_messages_are_shown_with_their_name_size_type_and_id() {
        let id = "ab".repeat(32);
        let body = format!(
            r#"{{"file":"{id}","name":"report.pdf","size":12345,"media_type":"application/pdf"}}"#
        );
        let file = MessageKind::Custom(FILE_KIND.into());
        assert_eq!(
            text(file.clone(), &body),
            format!("12:03:07 file from bob: report.pdf (12345 bytes, application/pdf) id {id}")
        );
        let untyped = format!(r#"{{"file":"{id}","name":"a.bin","size":1}}"#);
        assert_eq!(
            text(file.clone(), &untyped),
            format!("12:03:07 file from bob: a.bin (1 bytes) id {id}")
        );
        assert_eq!(
            message_line(false, &to_team(file.clone(), &body)),
            format!(
                "12:03:07 #team file from bob: report.pdf (12345 bytes, application/pdf) id {id}"
            )
        );
        let line = json(file.clone(), &body);
        assert_eq!(line["kind"], "file");
        assert_eq!(line["body"]["file"], id);
        assert_eq!(line["body"]["size"], 12345);
        // A body of another shape is still seen.
        assert_eq!(
            text(file, "{}"),
            "12:03:07 bob: [file] {}  (id 43)".to_owned()
        );
    }

    #[test]
    fn group_messages_are_shown_with_the_group() {
        let line = |kind, body| message_line(false, &to_team(kind, body));
        assert_eq!(
            line(MessageKind::Chat, "hello"),
            "12:03:07 #team bob: hello  (id 43)"
        );
        assert_eq!(
            line(MessageKind::Custom("typing".into()), "{}"),
            "12:03:07 #team bob: [typing] {}  (id 43)"
        );
        let json: serde_json::Value =
            serde_json::from_str(&message_line(true, &to_team(MessageKind::Chat, "hello")))
                .expect("json");
        assert_eq!(json["to"], serde_json::json!(["#team"]));
        assert_eq!(json["body"], "hello");
    }

    #[test]
    fn group_notices_say_who_changed_what() {
        let notice = |body| message_line(false, &to_team(group_kind(), body));
        assert_eq!(
            notice(r#"{"event":"created","title":"","members":["bob","alice","carol"]}"#),
            "12:03:07 #team: bob created the group with alice, carol"
        );
        assert_eq!(
            notice(r#"{"event":"created","title":"The team","members":["bob"]}"#),
            r#"12:03:07 #team: bob created the group "The team""#
        );
        assert_eq!(
            notice(r#"{"event":"created","title":"team","members":["bob","alice"]}"#),
            "12:03:07 #team: bob created the group with alice"
        );
        assert_eq!(
            notice(r#"{"event":"renamed","title":"Night shift"}"#),
            r#"12:03:07 #team: bob renamed the group "Night shift""#
        );
        assert_eq!(
            notice(r#"{"event":"added","users":["alice","carol"]}"#),
            "12:03:07 #team: bob added alice, carol"
        );
        assert_eq!(
            notice(r#"{"event":"removed","users":["carol"]}"#),
            "12:03:07 #team: bob removed carol"
        );
        assert_eq!(notice(r#"{"event":"left"}"#), "12:03:07 #team: bob left");
        assert_eq!(
            notice(r#"{"event":"role","user":"alice","role":"admin"}"#),
            "12:03:07 #team: bob made alice admin"
        );
        assert_eq!(
            notice(r#"{"event":"deleted"}"#),
            "12:03:07 #team: bob deleted the group"
        );
        let json: serde_json::Value = serde_json::from_str(&message_line(
            true,
            &to_team(group_kind(), r#"{"event":"left","later":1}"#),
        ))
        .expect("json");
        assert_eq!(json["kind"], "group");
        assert_eq!(
            json["body"],
            serde_json::json!({"event": "left", "later": 1})
        );
    }

    #[test]
    fn group_replies_are_shown_on_one_line() {
        let reply = |body| text(group_kind(), body);
        assert_eq!(
            reply(r#"{"reply":"done","request":40}"#),
            "12:03:07 group request 40 done"
        );
        assert_eq!(
            reply(
                r#"{"reply":"members","request":40,"group":"team","title":"","members":[{"user":"bob","role":"owner"},{"user":"alice","role":"member"}]}"#
            ),
            "12:03:07 #team members: bob (owner), alice (member)"
        );
        assert_eq!(
            reply(
                r#"{"reply":"list","request":40,"groups":[{"group":"team","title":"The team","role":"admin","members":3},{"group":"ops","title":"ops","role":"member","members":1}]}"#
            ),
            "12:03:07 your groups: #team (admin, 3 members) The team, #ops (member, 1 member)"
        );
        assert_eq!(
            reply(r#"{"reply":"list","request":40,"groups":[]}"#),
            "12:03:07 your groups: none"
        );
        assert_eq!(
            reply(
                r#"{"reply":"receipts","request":40,"id":12,"members":3,"delivered":["alice","carol"],"read":[]}"#
            ),
            "12:03:07 message 12: delivered to 2 of 3 (alice, carol), read by 0"
        );
    }
}
