//! A plugin built against `iim:plugin@0.1.0` exactly as that version was released (its WIT is
//! frozen beside this file, in `wit/`), without the SDK, which follows the newest version: the
//! test that a host of a later 0.1.x still loads and runs what was built for 0.1.0.
//!
//! It handles messages of kind `compat`: it counts them in its storage and passes each on to
//! its addressees with the count so far appended to the body (`hello` becomes `hello #1`), so
//! a test sees that `init`, `handle`, `resolve`, `send`, `kv-get` and `kv-set` all work.

#[allow(unsafe_code, missing_docs)]
mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
    });
}

use bindings::exports::iim::plugin::handler::Guest;
use bindings::iim::plugin::iim as host;
use bindings::iim::plugin::types::{
    Event, Message, MessageKind, PluginError, PluginInfo, Subscription,
};

const KIND: &str = "compat";

struct Compat;

impl Guest for Compat {
    fn init(_config: Vec<(String, String)>) -> Result<PluginInfo, PluginError> {
        Ok(PluginInfo {
            name: "compat".into(),
            version: "0.1.0".into(),
            subscriptions: vec![Subscription::Message(MessageKind::Custom(KIND.into()))],
        })
    }

    fn handle(event: Event) -> Result<(), PluginError> {
        let Event::Message(message) = event else {
            return Err(PluginError::Rejected("compat handles messages only".into()));
        };
        let failed = |e| PluginError::Failed(format!("{e:?}"));
        let count = match host::kv_get("count").map_err(failed)? {
            Some(bytes) => u64::from_be_bytes(bytes.try_into().unwrap_or([0; 8])) + 1,
            None => 1,
        };
        host::kv_set("count", &count.to_be_bytes()).map_err(failed)?;
        let mut body = message.body.clone();
        body.extend_from_slice(format!(" #{count}").as_bytes());
        let users = host::resolve(&message.to).map_err(failed)?;
        let passed = Message {
            id: 0,
            body,
            ..message
        };
        host::send(&passed, &users).map_err(failed)?;
        Ok(())
    }
}

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
const _: () = {
    bindings::export!(Compat with_types_in bindings);
};
