//! The example plugin of every kit, in Rust: `typing` passes "user is typing" indicators on.
//!
//! The same behaviour in each kit's language (`kits/*/example`), so that the kits can be
//! compared on one workload (`iim-bench plugins --lang ...`):
//! - configuration: `max_body` (a whole number, 1 to 65536, default 64) and `kind` (the custom
//!   kind it handles, default `typing`); any other key, or a bad value, is `invalid-config`;
//! - a message of that kind: a body over `max_body` bytes or not UTF-8 is `rejected`; otherwise
//!   the message itself goes, unchanged, to its addressees other than the sender (each once).
//!   A host error is `failed` (tried again) when the host is unavailable, `rejected` otherwise.

use iim_plugin_sdk::{
    Config, Event, HostError, MessageKind, Plugin, PluginError, Subscription, UserId, host,
};

/// The largest `max_body` the configuration may ask for.
const MAX_BODY_LIMIT: usize = 65536;

/// The typing plugin.
#[derive(Debug)]
pub struct Typing {
    max_body: usize,
    kind: String,
}

impl Plugin for Typing {
    const NAME: &'static str = "typing";
    const VERSION: &'static str = "0.1.0";

    fn new(config: &Config) -> Result<Self, PluginError> {
        config.deny_unknown(&["max_body", "kind"])?;
        let max_body = match config.get("max_body") {
            None => 64,
            Some(text) => match text.parse::<usize>() {
                Ok(n)
                    if text.bytes().all(|b| b.is_ascii_digit())
                        && (1..=MAX_BODY_LIMIT).contains(&n) =>
                {
                    n
                }
                _ => {
                    return Err(PluginError::InvalidConfig(format!(
                        "max_body must be a whole number from 1 to {MAX_BODY_LIMIT}, got {text:?}"
                    )));
                }
            },
        };
        let kind = config.get_or("kind", "typing");
        let valid = (1..=64).contains(&kind.len())
            && kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !valid {
            return Err(PluginError::InvalidConfig(format!(
                "kind must be 1 to 64 bytes of a-z 0-9 . _ -, got {kind:?}"
            )));
        }
        Ok(Typing {
            max_body,
            kind: kind.to_owned(),
        })
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::Message(MessageKind::Custom(
            self.kind.clone(),
        ))]
    }

    fn handle(&self, event: Event) -> Result<(), PluginError> {
        let Event::Message(message) = event else {
            return Err(PluginError::Rejected(format!(
                "typing handles only messages of kind {}",
                self.kind
            )));
        };
        let size = message.body.len();
        if size > self.max_body {
            return Err(PluginError::Rejected(format!(
                "typing body is {size} bytes, more than the {} allowed",
                self.max_body
            )));
        }
        if std::str::from_utf8(&message.body).is_err() {
            return Err(PluginError::Rejected("typing body is not UTF-8".into()));
        }
        let mut to: Vec<UserId> = Vec::new();
        for user in &message.to {
            if *user != message.sender && !to.contains(user) {
                to.push(user.clone());
            }
        }
        // The message being handled, unchanged (same id): the host passes it on.
        host::pass_on(&to).map_err(|e| match e {
            HostError::Unavailable(reason) => PluginError::Failed(format!("pass-on: {reason}")),
            other => PluginError::Rejected(format!("pass-on: {other:?}")),
        })?;
        iim_plugin_sdk::debug!(
            "typing {} from {} to {} users",
            message.id,
            message.sender,
            to.len()
        );
        Ok(())
    }
}

iim_plugin_sdk::export_plugin!(Typing);

#[cfg(test)]
mod tests {
    use super::*;
    use iim_plugin_sdk::testing::FakeHost;

    fn typing() -> MessageKind {
        MessageKind::Custom("typing".into())
    }

    #[test]
    fn an_indicator_goes_to_the_addressees_once_and_not_back() -> Result<(), PluginError> {
        let mut fake = FakeHost::new();
        fake.add_user("alice").add_user("bob").add_user("carol");
        let message = fake.submit(
            "alice",
            typing(),
            &["bob", "carol", "bob", "alice"],
            b"started",
        );
        fake.run::<Typing>(&[], message)?;
        let [sent] = fake.sent() else {
            panic!("one send, got {:?}", fake.sent());
        };
        assert_eq!(sent.recipients(), ["bob", "carol"]);
        assert_eq!(sent.message.body, b"started");
        Ok(())
    }

    #[test]
    fn long_or_binary_bodies_are_rejected() {
        let mut fake = FakeHost::new();
        fake.add_user("alice").add_user("bob");
        let long = fake.submit("alice", typing(), &["bob"], &[b'x'; 9]);
        let Err(PluginError::Rejected(reason)) = fake.run::<Typing>(&[("max_body", "8")], long)
        else {
            panic!("a 9-byte body is refused");
        };
        assert_eq!(reason, "typing body is 9 bytes, more than the 8 allowed");
        let binary = fake.submit("alice", typing(), &["bob"], &[0xff]);
        assert!(matches!(
            fake.run::<Typing>(&[], binary),
            Err(PluginError::Rejected(reason)) if reason == "typing body is not UTF-8"
        ));
        assert!(fake.sent().is_empty());
    }

    #[test]
    fn bad_configuration_is_refused_naming_the_key() {
        let mut fake = FakeHost::new();
        for config in [
            [("max_body", "0")],
            [("max_body", "+5")],
            [("kind", "Typing")],
            [("colour", "red")],
        ] {
            assert!(
                matches!(
                    fake.init::<Typing>(&config),
                    Err(PluginError::InvalidConfig(_))
                ),
                "{config:?}"
            );
        }
        let typing2 = fake
            .init::<Typing>(&[("kind", "typing2")])
            .map(|p| p.subscriptions());
        assert!(
            matches!(typing2, Ok(subs) if subs == [Subscription::Message(MessageKind::Custom("typing2".into()))])
        );
    }
}
