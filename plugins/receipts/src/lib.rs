//! The receipts plugin: tells the sender of a chat message when it was delivered to a device
//! of a recipient, and when a recipient read it.
//!
//! Subscribes to `delivered(chat)` and `message(receipt)`:
//! - when a recipient's device acknowledges a chat message, the sender gets a new `receipt`
//!   message `{"state":"delivered","id":<id>,"user":"<recipient>","device":"<device>"}`;
//! - a client reports that its user read a chat message by submitting a `receipt` message
//!   `{"state":"read","id":<id>}` addressed to the message's sender. If the message is in the
//!   reader's inbox, the sender and the reader (so the reader's other devices learn it too) get
//!   one new `receipt` message `{"state":"read","id":<id>,"user":"<reader>","device":"<device>"}`.
//!   Anything else is `rejected`, with the reason; the submitted receipt itself goes nowhere.
//!
//! It takes no configuration (any key is `invalid-config`). `docs/plugins.md` documents the
//! bodies for client authors.

use iim_plugin_sdk::body::{BodyError, ReadReport, Receipt};
use iim_plugin_sdk::{
    Config, Delivery, Event, Message, MessageKind, Plugin, PluginError, Subscription, UserId, host,
};

/// The receipts plugin.
#[derive(Debug)]
pub struct Receipts;

impl Plugin for Receipts {
    const NAME: &'static str = "receipts";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new(config: &Config) -> Result<Self, PluginError> {
        config.deny_unknown(&[])?;
        Ok(Receipts)
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![
            Subscription::Delivered(MessageKind::Chat),
            Subscription::Message(MessageKind::Receipt),
        ]
    }

    fn handle(&self, event: Event) -> Result<(), PluginError> {
        match event {
            Event::Delivered(delivery) => delivered(&delivery),
            Event::Message(report) => read(&report),
            Event::SessionOpened(_) | Event::SessionClosed(_) => Err(PluginError::Rejected(
                "the receipts plugin handles deliveries and receipts only".to_owned(),
            )),
        }
    }
}

/// A recipient's device received a chat message: tell its sender.
fn delivered(delivery: &Delivery) -> Result<(), PluginError> {
    let body = Receipt::Delivered {
        id: delivery.id,
        user: delivery.recipient.clone(),
        device: delivery.recipient_device.clone(),
    }
    .to_json();
    let receipt = Message::new(MessageKind::Receipt, vec![delivery.sender.clone()], body);
    host::send_to(&receipt, &receipt.to)?;
    Ok(())
}

/// A client says its user read a message: check it, then tell the sender and the reader.
fn read(report: &Message) -> Result<(), PluginError> {
    let reader = &report.sender;
    // Other fields are ignored, for clients newer than this plugin.
    let ReadReport { id } = ReadReport::from_json(&report.body).map_err(|e| match e {
        BodyError::Json(e) => PluginError::Rejected(format!(
            r#"a receipt's body is {{"state":"read","id":<message id>}}: {e}"#
        )),
        not_read => PluginError::Rejected(not_read.to_string()),
    })?;
    let Some(original) = host::inbox_message(reader, id)? else {
        return Err(PluginError::Rejected(format!(
            "message {id} is not in {reader}'s inbox"
        )));
    };
    if original.kind != MessageKind::Chat {
        return Err(PluginError::Rejected(format!(
            "message {id} is a {} message: only chat messages are read",
            original.kind
        )));
    }
    if !report.to.contains(&original.sender) {
        return Err(PluginError::Rejected(format!(
            "a read receipt for message {id} is addressed to its sender, {}",
            original.sender
        )));
    }
    let body = Receipt::Read {
        id,
        user: reader.clone(),
        device: report.sender_device.clone(),
    }
    .to_json();
    let mut to: Vec<UserId> = vec![original.sender];
    if !to.contains(reader) {
        to.push(reader.clone());
    }
    let receipt = Message::new(MessageKind::Receipt, to, body);
    host::send_to(&receipt, &receipt.to)?;
    Ok(())
}

iim_plugin_sdk::export_plugin!(Receipts);

#[cfg(test)]
mod tests {
    use super::*;
    use iim_plugin_sdk::testing::{FakeHost, Sent};

    /// alice sent bob chat message 7 (bob has it); bob also has presence message 8.
    fn scene() -> (FakeHost, Message) {
        let mut fake = FakeHost::new();
        fake.connect("alice", "phone")
            .connect("bob", "phone")
            .connect("bob", "laptop")
            .add_user("carol");
        let chat = Message {
            id: 7,
            kind: MessageKind::Chat,
            sender: "alice".into(),
            sender_device: "phone".into(),
            to: vec!["bob".into()],
            body: b"hi".to_vec(),
            sent_at: 1,
        };
        let presence = Message {
            id: 8,
            kind: MessageKind::Presence,
            ..chat.clone()
        };
        fake.put_in_inbox("bob", chat.clone())
            .put_in_inbox("bob", presence);
        (fake, chat)
    }

    fn body(sent: &Sent) -> String {
        String::from_utf8_lossy(&sent.message.body).into_owned()
    }

    /// bob's laptop reports `body` as a receipt addressed `to`.
    fn report(fake: &mut FakeHost, to: &[&str], body: &str) -> Event {
        fake.submit_from("bob", "laptop", MessageKind::Receipt, to, body.as_bytes())
    }

    fn rejection(fake: &mut FakeHost, event: Event) -> String {
        match fake.run::<Receipts>(&[], event) {
            Err(PluginError::Rejected(reason)) => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn describes_itself_and_takes_no_configuration() {
        let mut fake = FakeHost::new();
        let info = fake.init::<Receipts>(&[]).expect("no config").info();
        assert_eq!(info.name, "receipts");
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(
            info.subscriptions,
            [
                Subscription::Delivered(MessageKind::Chat),
                Subscription::Message(MessageKind::Receipt),
            ]
        );
        assert!(matches!(
            fake.init::<Receipts>(&[("read", "off")]),
            Err(PluginError::InvalidConfig(_))
        ));
    }

    #[test]
    fn a_delivery_is_reported_to_the_sender() {
        let (mut fake, chat) = scene();
        let event = fake.acknowledge("bob", "laptop", &chat);
        fake.run::<Receipts>(&[], event).expect("handled");
        let [receipt] = fake.sent() else {
            panic!("one receipt: {:?}", fake.sent())
        };
        assert_eq!(receipt.recipients(), ["alice"]);
        assert_eq!(receipt.message.kind, MessageKind::Receipt);
        assert_eq!(receipt.message.sender, "bob", "from the recipient");
        assert_eq!(receipt.message.sender_device, "laptop");
        assert_eq!(
            body(receipt),
            r#"{"state":"delivered","id":7,"user":"bob","device":"laptop"}"#
        );
        assert_eq!(fake.inbox("alice"), std::slice::from_ref(&receipt.message));
    }

    #[test]
    fn a_read_message_is_reported_to_the_sender_and_the_reader_in_one_send() {
        let (mut fake, _) = scene();
        let event = report(&mut fake, &["alice"], r#"{"state":"read","id":7}"#);
        fake.run::<Receipts>(&[], event).expect("handled");
        let [receipt] = fake.sent() else {
            panic!("one receipt: {:?}", fake.sent())
        };
        assert_eq!(receipt.recipients(), ["alice", "bob"]);
        assert_eq!(receipt.message.sender, "bob");
        assert_eq!(
            body(receipt),
            r#"{"state":"read","id":7,"user":"bob","device":"laptop"}"#
        );
        assert_eq!(fake.inbox("alice"), std::slice::from_ref(&receipt.message));
        assert!(fake.inbox("bob").contains(&receipt.message));
    }

    #[test]
    fn reading_ones_own_message_is_reported_once() {
        let (mut fake, _) = scene();
        let note = Message {
            id: 9,
            kind: MessageKind::Chat,
            sender: "bob".into(),
            sender_device: "phone".into(),
            to: vec!["bob".into()],
            body: b"note".to_vec(),
            sent_at: 1,
        };
        fake.put_in_inbox("bob", note);
        let event = report(&mut fake, &["bob"], r#"{"state":"read","id":9}"#);
        fake.run::<Receipts>(&[], event).expect("handled");
        let [receipt] = fake.sent() else {
            panic!("one receipt: {:?}", fake.sent())
        };
        assert_eq!(receipt.recipients(), ["bob"]);
    }

    #[test]
    fn a_message_not_in_the_readers_inbox_is_rejected() {
        let (mut fake, _) = scene();
        let event = report(&mut fake, &["alice"], r#"{"state":"read","id":70}"#);
        let reason = rejection(&mut fake, event);
        assert_eq!(reason, "message 70 is not in bob's inbox");
        assert!(fake.sent().is_empty());

        // carol was never sent message 7.
        let event = fake.submit(
            "carol",
            MessageKind::Receipt,
            &["alice"],
            br#"{"state":"read","id":7}"#,
        );
        assert_eq!(
            rejection(&mut fake, event),
            "message 7 is not in carol's inbox"
        );
        assert!(fake.sent().is_empty());
    }

    #[test]
    fn a_receipt_must_be_addressed_to_the_messages_sender() {
        let (mut fake, _) = scene();
        let event = report(&mut fake, &["carol"], r#"{"state":"read","id":7}"#);
        let reason = rejection(&mut fake, event);
        assert!(
            reason.contains("addressed to its sender, alice"),
            "{reason}"
        );
        assert!(fake.sent().is_empty());
    }

    #[test]
    fn malformed_or_forged_reports_are_rejected() {
        let (mut fake, _) = scene();
        for (body, expected) in [
            ("read 7", "a receipt's body is"),
            (r#"{"state":"read"}"#, "missing field `id`"),
            (r#"{"state":"read","id":-1}"#, "a receipt's body is"),
            (
                r#"{"state":"delivered","id":7}"#,
                "only report `read`, not `delivered`",
            ),
            (
                r#"{"state":"read","id":8}"#,
                "message 8 is a presence message",
            ),
        ] {
            let event = report(&mut fake, &["alice"], body);
            let reason = rejection(&mut fake, event);
            assert!(reason.contains(expected), "{body}: {reason}");
        }
        assert!(fake.sent().is_empty());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let (mut fake, _) = scene();
        let event = report(
            &mut fake,
            &["alice"],
            r#"{"state":"read","id":7,"at":1700000000000}"#,
        );
        fake.run::<Receipts>(&[], event).expect("handled");
        assert_eq!(fake.sent().len(), 1);
    }
}
