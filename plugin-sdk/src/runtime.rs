//! What `export_plugin!` wires the generated `Guest` to: the instance created at `init`, and
//! the acting user of the event being handled.
//!
//! A component instance is single-threaded and the host calls it one export at a time, so
//! thread-locals hold this state; the fake host uses the same functions natively, one plugin
//! per test thread.

use crate::{Config, Event, Plugin, PluginError, PluginInfo};
use std::any::Any;
use std::cell::RefCell;

thread_local! {
    /// The plugin `init` created; `handle` runs on it.
    static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    /// The acting user and device of the event being handled, for `Message::new`.
    static ACTING: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

/// The `init` export: builds the plugin from its configuration and keeps it for `handle`.
pub fn init<P: Plugin>(config: Vec<(String, String)>) -> Result<PluginInfo, PluginError> {
    let plugin = build::<P>(&Config::new(config))?;
    let info = plugin.info();
    INSTANCE.set(Some(Box::new(plugin)));
    Ok(info)
}

/// What `init` does before it answers: builds the plugin with [`Plugin::new`], then, if it
/// handles groups ([`Plugin::groups`]), calls `subscribe-groups`, which is allowed only then.
/// The fake host builds plugins with it too.
pub fn build<P: Plugin>(config: &Config) -> Result<P, PluginError> {
    let plugin = P::new(config)?;
    if plugin.groups() {
        crate::host::subscribe_groups()?;
    }
    Ok(plugin)
}

/// The `handle` export: runs the event on the instance `init` kept.
pub fn handle<P: Plugin>(event: Event) -> Result<(), PluginError> {
    INSTANCE.with_borrow(|instance| {
        match instance.as_ref().and_then(|i| i.downcast_ref::<P>()) {
            Some(plugin) => dispatch(plugin, event),
            // The host never does this; say so rather than trap.
            None => Err(PluginError::Failed(format!(
                "plugin {} was handed an event before init",
                P::NAME
            ))),
        }
    })
}

/// Runs `event` on `plugin` with the event's acting user set for [`crate::Message::new`].
pub fn dispatch<P: Plugin>(plugin: &P, event: Event) -> Result<(), PluginError> {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            ACTING.set(None);
        }
    }
    ACTING.set(Some((
        event.acting_user().to_owned(),
        event.acting_device().to_owned(),
    )));
    let _clear = Clear;
    plugin.handle(event)
}

/// The acting user and device of the event being handled, if one is.
pub fn acting() -> Option<(String, String)> {
    ACTING.with_borrow(Clone::clone)
}

/// Compiles only if `P` is a plugin: what `export_plugin!` checks outside a component.
pub fn assert_plugin<P: Plugin>() {}
