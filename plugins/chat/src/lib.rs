//! The chat plugin: delivers a `chat` message to its addressees, under a policy.
//!
//! Subscribes to `message(chat)` and `message(file)` (a file message, whose body references a
//! file the host keeps, goes where a chat message would). The message itself is passed on (same id) to the users in its
//! `to`; it goes back to the sender only if the sender addressed themself.
//!
//! Configuration (`chat.toml` beside `chat.wasm`):
//! - `policy = "anyone"` (default): every addressee gets the message.
//! - `policy = "friends"`: only addressees in the sender's friends (and the sender themself)
//!   get it. If any addressee is refused, the sender gets one `receipt` message listing them:
//!   `{"state":"refused","id":<id>,"users":["<addressee>",..],"reason":"not a friend"}`.
//!   One message rather than one per addressee: a message may name 256 addressees, and the
//!   host allows 64 sends per event.
//!
//! Any other value, or any other key, is `invalid-config`. `docs/plugins.md` documents the
//! bodies for client authors.

use iim_plugin_sdk::body::{self, Receipt};
use iim_plugin_sdk::{
    Config, Event, HostError, Message, MessageKind, Plugin, PluginError, Subscription, UserId, host,
};
use std::fmt;
use std::str::FromStr;

/// Who may be sent a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Every addressee.
    Anyone,
    /// Only the sender's friends, and the sender themself.
    Friends,
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "anyone" => Ok(Policy::Anyone),
            "friends" => Ok(Policy::Friends),
            _ => Err(r#"expected "anyone" or "friends""#.to_owned()),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Anyone => "anyone",
            Policy::Friends => "friends",
        })
    }
}

/// The chat plugin.
#[derive(Debug)]
pub struct Chat {
    policy: Policy,
}

impl Chat {
    /// The policy it was configured with.
    pub fn policy(&self) -> Policy {
        self.policy
    }
}

impl Plugin for Chat {
    const NAME: &'static str = "chat";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new(config: &Config) -> Result<Self, PluginError> {
        config.deny_unknown(&["policy"])?;
        Ok(Chat {
            policy: config.parse_or("policy", Policy::Anyone)?,
        })
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        // A file message (its body a reference to a file the host keeps) goes where a chat
        // message would, under the same policy.
        vec![
            Subscription::Message(MessageKind::Chat),
            Subscription::Message(MessageKind::Custom(body::FILE_KIND.into())),
        ]
    }

    fn handle(&self, event: Event) -> Result<(), PluginError> {
        let Event::Message(msg) = event else {
            return Err(PluginError::Rejected(
                "the chat plugin handles chat and file messages only".to_owned(),
            ));
        };
        let mut addressees: Vec<UserId> = Vec::with_capacity(msg.to.len());
        for user in &msg.to {
            if !addressees.contains(user) {
                addressees.push(user.clone());
            }
        }
        let (allowed, refused) = match self.policy {
            Policy::Anyone => (addressees, Vec::new()),
            Policy::Friends => {
                let friends = host::friends(&msg.sender)?;
                addressees
                    .into_iter()
                    .partition(|user| *user == msg.sender || friends.contains(user))
            }
        };
        // The message itself, unchanged: it does not cross back to the host.
        host::pass_on(&allowed).map_err(|e| match e {
            // The host checks addressees when it accepts a message; one unknown here cannot
            // become known by retrying.
            HostError::UnknownUser(user) => {
                PluginError::Rejected(format!("unknown addressee `{user}`"))
            }
            e => e.into(),
        })?;
        if refused.is_empty() {
            return Ok(());
        }
        iim_plugin_sdk::debug!(
            "message {} from {}: refused {} addressee(s) who are not friends",
            msg.id,
            msg.sender,
            refused.len()
        );
        let body = Receipt::Refused {
            id: msg.id,
            users: refused,
            reason: "not a friend".into(),
        }
        .to_json();
        let receipt = Message::new(MessageKind::Receipt, vec![msg.sender.clone()], body);
        match host::send_to(&receipt, &receipt.to) {
            Ok(_) => Ok(()),
            // A host configured with a small body limit: the friends still get the message,
            // which matters more than telling the sender about the others.
            Err(HostError::LimitExceeded(why)) => {
                iim_plugin_sdk::warn!("message {}: refusal receipt not sent: {why}", msg.id);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

iim_plugin_sdk::export_plugin!(Chat);

#[cfg(test)]
mod tests {
    use super::*;
    use iim_plugin_sdk::LogLevel;
    use iim_plugin_sdk::testing::FakeHost;

    /// alice, bob, carol online; alice has bob as a friend; carol has alice as a friend.
    fn scene() -> FakeHost {
        let mut fake = FakeHost::new();
        fake.connect("alice", "phone")
            .connect("bob", "phone")
            .connect("carol", "laptop")
            .add_user("dave")
            .add_friend("alice", "bob")
            .add_friend("carol", "alice");
        fake
    }

    fn submitted(event: &Event) -> Message {
        match event {
            Event::Message(m) => m.clone(),
            _ => unreachable!("a message event"),
        }
    }

    #[test]
    fn describes_itself() {
        let chat = FakeHost::new().init::<Chat>(&[]).expect("default config");
        let info = chat.info();
        assert_eq!(info.name, "chat");
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(
            info.subscriptions,
            [
                Subscription::Message(MessageKind::Chat),
                Subscription::Message(MessageKind::Custom("file".into())),
            ]
        );
        assert_eq!(chat.policy(), Policy::Anyone);
    }

    #[test]
    fn refuses_an_unknown_policy_or_key() {
        let mut fake = FakeHost::new();
        let Err(PluginError::InvalidConfig(text)) = fake.init::<Chat>(&[("policy", "sometimes")])
        else {
            panic!("an unknown policy must be invalid-config");
        };
        assert!(
            text.contains("sometimes") && text.contains("friends"),
            "{text}"
        );
        assert!(matches!(
            fake.init::<Chat>(&[("polcy", "friends")]),
            Err(PluginError::InvalidConfig(_))
        ));
        let friends = fake
            .init::<Chat>(&[("policy", "friends")])
            .expect("friends policy");
        assert_eq!(friends.policy(), Policy::Friends);
    }

    #[test]
    fn anyone_policy_passes_the_message_on_to_its_addressees_only() {
        let mut fake = scene();
        let event = fake.submit("alice", MessageKind::Chat, &["bob", "carol", "bob"], b"hi");
        let message = submitted(&event);
        fake.run::<Chat>(&[], event).expect("handled");

        let [sent] = fake.sent() else {
            panic!("one send: {:?}", fake.sent())
        };
        assert_eq!(sent.message, message, "passed on unchanged, same id");
        assert_eq!(sent.recipients(), ["bob", "carol"]);
        assert_eq!(fake.inbox("bob"), std::slice::from_ref(&message));
        assert_eq!(fake.inbox("carol"), [message]);
        assert!(
            fake.inbox("alice").is_empty(),
            "not sent back to the sender"
        );
    }

    #[test]
    fn a_file_message_goes_where_chat_would_under_the_same_policy() {
        let mut fake = scene();
        let body = br#"{"file":"ab","name":"a.pdf","size":1,"media_type":""}"#;
        let kind = MessageKind::Custom("file".into());
        let event = fake.submit("alice", kind, &["bob", "carol"], body);
        let message = submitted(&event);
        fake.run::<Chat>(&[("policy", "friends")], event)
            .expect("handled");
        assert_eq!(fake.inbox("bob"), [message], "passed on unchanged, same id");
        assert!(fake.inbox("carol").is_empty(), "not alice's friend");
    }

    #[test]
    fn a_sender_who_addresses_themself_gets_it() {
        let mut fake = scene();
        let event = fake.submit("alice", MessageKind::Chat, &["alice", "bob"], b"hi");
        let message = submitted(&event);
        fake.run::<Chat>(&[("policy", "friends")], event)
            .expect("handled");
        assert_eq!(fake.inbox("alice"), std::slice::from_ref(&message));
        assert_eq!(fake.inbox("bob"), [message]);
        assert_eq!(fake.sent().len(), 1, "no refusal");
    }

    #[test]
    fn friends_policy_refuses_a_non_friend_and_tells_the_sender() {
        let mut fake = scene();
        // carol has alice as a friend, but alice does not have carol: refused.
        let event = fake.submit("alice", MessageKind::Chat, &["bob", "carol", "dave"], b"hi");
        let message = submitted(&event);
        fake.run::<Chat>(&[("policy", "friends")], event)
            .expect("handled");

        let [forwarded, receipt] = fake.sent() else {
            panic!("the message and one receipt: {:?}", fake.sent())
        };
        assert_eq!(forwarded.message, message);
        assert_eq!(forwarded.recipients(), ["bob"]);
        assert!(fake.inbox("carol").is_empty());
        assert!(fake.inbox("dave").is_empty());

        assert_eq!(receipt.recipients(), ["alice"]);
        assert_eq!(receipt.message.kind, MessageKind::Receipt);
        assert_eq!(receipt.message.sender, "alice");
        assert_eq!(receipt.message.to, ["alice"]);
        assert_ne!(receipt.message.id, message.id, "a new message");
        assert_eq!(
            String::from_utf8_lossy(&receipt.message.body),
            format!(
                r#"{{"state":"refused","id":{},"users":["carol","dave"],"reason":"not a friend"}}"#,
                message.id
            )
        );
        assert_eq!(fake.inbox("alice"), std::slice::from_ref(&receipt.message));
    }

    #[test]
    fn friends_policy_refusing_everyone_sends_only_receipts() {
        let mut fake = scene();
        let event = fake.submit("alice", MessageKind::Chat, &["carol"], b"hi");
        fake.run::<Chat>(&[("policy", "friends")], event)
            .expect("handled");
        let [receipt] = fake.sent() else {
            panic!("one receipt: {:?}", fake.sent())
        };
        assert_eq!(receipt.recipients(), ["alice"]);
        assert!(fake.inbox("carol").is_empty());
    }

    #[test]
    fn many_refused_addressees_make_one_receipt() {
        let mut fake = scene();
        let strangers: Vec<String> = (0..200).map(|i| format!("stranger{i}")).collect();
        for user in &strangers {
            fake.add_user(user);
        }
        let to: Vec<&str> = strangers.iter().map(String::as_str).collect();
        let event = fake.submit("alice", MessageKind::Chat, &to, b"hi");
        fake.run::<Chat>(&[("policy", "friends")], event)
            .expect("handled");
        let [receipt] = fake.sent() else {
            panic!("one receipt: {} sends", fake.sent().len())
        };
        let body: serde_json::Value =
            serde_json::from_slice(&receipt.message.body).expect("JSON body");
        assert_eq!(body["users"].as_array().map(Vec::len), Some(200));
    }

    #[test]
    fn a_receipt_over_the_body_limit_does_not_stop_the_message() {
        let mut fake = scene();
        fake.set_max_body(40);
        let event = fake.submit("alice", MessageKind::Chat, &["bob", "carol"], b"hi");
        let message = submitted(&event);
        fake.run::<Chat>(&[("policy", "friends")], event)
            .expect("handled");
        let [forwarded] = fake.sent() else {
            panic!("only the message: {:?}", fake.sent())
        };
        assert_eq!(forwarded.message, message);
        assert!(
            fake.logs()
                .iter()
                .any(|(level, line)| *level == LogLevel::Warn && line.contains("not sent")),
            "{:?}",
            fake.logs()
        );
    }

    #[test]
    fn sending_to_nobody_is_fine() {
        let mut fake = scene();
        let event = fake.submit("alice", MessageKind::Chat, &[], b"hi");
        fake.run::<Chat>(&[], event).expect("handled");
        assert!(fake.sent().is_empty());
    }

    #[test]
    fn an_unknown_addressee_rejects_the_message() {
        let mut fake = scene();
        let event = fake.submit("alice", MessageKind::Chat, &["bob", "mallory"], b"hi");
        let result = fake.run::<Chat>(&[], event);
        assert_eq!(
            result,
            Err(PluginError::Rejected("unknown addressee `mallory`".into()))
        );
        assert!(fake.inbox("bob").is_empty(), "nothing happens");
    }
}
