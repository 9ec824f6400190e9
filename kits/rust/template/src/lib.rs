//! The `{{name}}` plugin: passes each message of kind `{{name}}` on, unchanged, to its
//! addressees other than the sender.
//!
//! `iim_plugin_sdk` gives the WIT types (`Message`, `Event`, ...) and the host's functions
//! (`host::pass_on`, `host::resolve`, `host::send`, `host::kv_get`, ...). Return `Err(PluginError::Rejected(..))`
//! to refuse an event for good, `Err(PluginError::Failed(..))` to have it tried again. A panic
//! traps the instance: the host counts it as a failed attempt, so return errors instead.

use iim_plugin_sdk::{
    Config, Event, HostError, MessageKind, Plugin, PluginError, Subscription, UserId, host,
};

/// The plugin; one is built per instance, by `new`, from the configuration (`{{name}}.toml`).
pub struct Relay;

impl Plugin for Relay {
    const NAME: &'static str = "{{name}}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new(config: &Config) -> Result<Self, PluginError> {
        // A key this plugin does not know is refused, so a misspelt one is noticed.
        config.deny_unknown(&[])?;
        Ok(Relay)
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::Message(MessageKind::Custom("{{name}}".into()))]
    }

    fn handle(&self, event: Event) -> Result<(), PluginError> {
        let Event::Message(message) = event else {
            return Err(PluginError::Rejected("{{name}} handles only messages".into()));
        };
        let mut to: Vec<UserId> = Vec::new();
        for user in &message.to {
            if *user != message.sender && !to.contains(user) {
                to.push(user.clone());
            }
        }
        // The message being handled, unchanged (same id): the host passes it on.
        host::pass_on(&to).map_err(|e| match e {
            // The host could not do it now: try the event again.
            HostError::Unavailable(reason) => PluginError::Failed(reason),
            other => PluginError::Rejected(format!("{other:?}")),
        })?;
        iim_plugin_sdk::debug!("{} passed on to {} users", message.id, to.len());
        Ok(())
    }
}

iim_plugin_sdk::export_plugin!(Relay);

#[cfg(test)]
mod tests {
    use super::*;
    use iim_plugin_sdk::testing::FakeHost;

    #[test]
    fn a_message_reaches_the_addressees_but_not_the_sender() -> Result<(), PluginError> {
        let mut fake = FakeHost::new();
        fake.add_user("alice").add_user("bob");
        let kind = MessageKind::Custom("{{name}}".into());
        let message = fake.submit("alice", kind, &["bob", "alice"], b"hello");
        fake.run::<Relay>(&[], message)?;
        let [sent] = fake.sent() else {
            panic!("one send, got {:?}", fake.sent());
        };
        assert_eq!(sent.recipients(), ["bob"]);
        assert_eq!(sent.message.body, b"hello");
        Ok(())
    }
}
