//! `iim-plugin-sdk`: what a Rust plugin author depends on to write an iim plugin.
//!
//! A plugin is a WebAssembly component (`wasm32-wasip2`) built against the WIT package
//! [`WIT_PACKAGE`] (`wit/iim.wit` at the root of the repository). The host raises events; the
//! plugin decides what is sent to whom, through the IIM entry point: [`host::resolve`] the
//! recipients into a user-list, then [`host::send`].
//!
//! With this crate a plugin is a type that implements [`Plugin`] — built once per instance
//! from its [`Config`], it names its subscriptions and handles events — and one line,
//! [`export_plugin!`], that makes it the component's export. The WIT types are re-exported
//! here under their generated names ([`Message`], [`Event`], [`UserList`], ...), and the host's
//! services are the plain functions of [`host`].
//!
//! Outside a component the same code runs natively against [`testing::FakeHost`], an
//! in-memory host that records what the plugin sends, so a plugin's logic is unit-tested with
//! `cargo test`.
//!
//! # Version 0.1.2
//!
//! This SDK builds against `iim:plugin@0.1.2`. Each version since 0.1.0 only adds imports, and
//! a host loads plugins built against its version or an earlier one. 0.1.2 adds
//! [`host::pass_on`]: the message being handled passed on, unchanged, to users, in one call
//! and without the message or a user-list crossing back to the host (what the `chat` plugin
//! does with every message). 0.1.1 added:
//! - [`host::kv_keys`] lists the keys of the plugin's storage under a prefix, in byte order,
//!   at most [`host::MAX_KV_KEYS`] per call, so that a plugin can keep one key per item (a
//!   group's members) instead of one large value;
//! - `subscribe-groups`: a plugin whose [`Plugin::groups`] answers `true` is subscribed to
//!   groups during `init` ([`host::subscribe_groups`]). It then receives every message
//!   addressed to a group (`to` is one `#name`, see [`Message::group`]) and every delivery of
//!   one, each group's events in one instance and in order, and it alone may send a new
//!   message addressed to a group or of kind [`GROUP_KIND`]. `plugins/groups` is that plugin.
//!
//! # Example
//!
//! A plugin that answers every `ping` message with a `pong` to its sender, and its test:
//!
//! ```
//! use iim_plugin_sdk::{
//!     Config, Event, Message, MessageKind, Plugin, PluginError, Subscription, host,
//! };
//!
//! /// Answers pings.
//! pub struct Ping {
//!     answer: String,
//! }
//!
//! impl Plugin for Ping {
//!     const NAME: &'static str = "ping";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!
//!     fn new(config: &Config) -> Result<Self, PluginError> {
//!         config.deny_unknown(&["answer"])?;
//!         let answer = config.get_or("answer", "pong").to_owned();
//!         Ok(Ping { answer })
//!     }
//!
//!     fn subscriptions(&self) -> Vec<Subscription> {
//!         vec![Subscription::Message(MessageKind::Custom("ping".into()))]
//!     }
//!
//!     fn handle(&self, event: Event) -> Result<(), PluginError> {
//!         let Event::Message(ping) = event else {
//!             return Ok(());
//!         };
//!         iim_plugin_sdk::debug!("ping {} from {}", ping.id, ping.sender);
//!         // A new message from the acting user (the pinger) to the pinger.
//!         let pong = Message::new(
//!             MessageKind::Custom("pong".into()),
//!             vec![ping.sender.clone()],
//!             self.answer.clone().into_bytes(),
//!         );
//!         host::send_to(&pong, &pong.to)?;
//!         Ok(())
//!     }
//! }
//!
//! iim_plugin_sdk::export_plugin!(Ping);
//!
//! # fn main() -> Result<(), PluginError> {
//! // The test: natively, against the fake host.
//! use iim_plugin_sdk::testing::FakeHost;
//!
//! let mut fake = FakeHost::new();
//! fake.add_user("bob").connect("alice", "phone");
//! let ping = fake.submit("alice", MessageKind::Custom("ping".into()), &["bob"], b"");
//! fake.run::<Ping>(&[("answer", "hello")], ping)?;
//!
//! let [pong] = fake.sent() else { panic!("one message sent") };
//! assert_eq!(pong.recipients(), ["alice"]);
//! assert_eq!(pong.message.sender, "alice");
//! assert_eq!(pong.message.body, b"hello");
//! assert_eq!(fake.inbox("alice").len(), 1);
//!
//! // A misspelt key is refused when the plugin is loaded.
//! assert!(matches!(
//!     fake.init::<Ping>(&[("anwser", "hi")]),
//!     Err(PluginError::InvalidConfig(_))
//! ));
//! # Ok(())
//! # }
//! ```
//!
//! Built with `cargo build --release --target wasm32-wasip2`, a `cdylib` crate with such a
//! plugin is a component that exports `iim:plugin/handler@0.1.1`.

#[doc(hidden)]
// Generated glue: unsafe by nature (see Cargo.toml), documented by the WIT file.
#[allow(unsafe_code, missing_docs)]
pub mod bindings;
mod config;
pub mod host;
pub mod http;
#[doc(hidden)]
pub mod runtime;
// Natively only (a component talks to the real host), but documented for every target.
#[cfg(any(not(target_arch = "wasm32"), doc))]
pub mod testing;
mod types;

pub use bindings::iim::plugin::types::{
    Delivery, DeviceId, DeviceRow, Event, HostError, LogLevel, Message, MessageId, MessageKind,
    PluginError, PluginInfo, PresenceEntry, PresenceState, ServerRow, SessionInfo, Subscription,
    UserId, UserList, UserRow,
};
pub use config::Config;
/// The custom kind of the messages that manage groups (requests, notices, replies): only the
/// plugin that handles groups ([`Plugin::groups`]) takes or sends them.
pub use iim_proto::GROUP_KIND;
/// The bodies of the messages the default plugins send and take (receipts, read reports,
/// presence notices, group requests, notices and replies): one definition, shared with the
/// host, the `iim` CLI and the tests.
pub use iim_proto::body;

/// The WIT package (name and version) this SDK builds plugins against.
pub const WIT_PACKAGE: &str = "iim:plugin@0.1.2";

/// An iim plugin: built once per instance from its configuration, then handed the events it
/// subscribed to, one at a time.
///
/// Make it the component's export with [`export_plugin!`]. `handle` takes `&self`: a plugin
/// that keeps state between events uses interior mutability (`Cell`, `RefCell`); an instance
/// is single-threaded. That state lives as long as the instance, which the host may replace
/// at any time (after a failure, for example): what must last goes in [`host::kv_set`].
///
/// The host runs several instances of a plugin side by side (`plugins.instances`, 8 by
/// default). All the events of one acting user go to the same instance, in order; another
/// user's may go to another instance. So in-memory state is per instance: keep per-user state
/// there if you like, but anything shared between users belongs in storage.
pub trait Plugin: Sized + 'static {
    /// A short name for logs and for the operator.
    const NAME: &'static str;
    /// The plugin's own version, usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;

    /// Builds the plugin from its configuration; [`PluginError::InvalidConfig`] if it is not
    /// valid, and the host does not load the plugin. No event is being handled yet, so there
    /// is no acting user: `send`, storage writes, relations and inboxes are refused here.
    fn new(config: &Config) -> Result<Self, PluginError>;

    /// The events this plugin handles.
    fn subscriptions(&self) -> Vec<Subscription>;

    /// Handles one event. The messages it sent and the values it stored take effect only if
    /// it returns `Ok`; [`PluginError::Rejected`] refuses the event for good,
    /// [`PluginError::Failed`] (what `?` on a [`HostError`] gives) has it run again.
    fn handle(&self, event: Event) -> Result<(), PluginError>;

    /// Whether this plugin handles the conversations of groups (since 0.1.1): if it answers
    /// `true`, `init` calls [`host::subscribe_groups`] after [`Plugin::new`], and the host then
    /// hands it every message addressed to a group (`to` is one `#name`), of any kind, and
    /// every delivery of such a message, whatever its subscriptions say; each group's events go
    /// to one instance, in order. Only such a plugin may send a new message addressed to a
    /// group or of kind [`GROUP_KIND`], and a host loads at most one. `false` by default.
    fn groups(&self) -> bool {
        false
    }

    /// What `init` answers the host: the name, version and subscriptions.
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: Self::NAME.to_owned(),
            version: Self::VERSION.to_owned(),
            subscriptions: self.subscriptions(),
        }
    }
}

/// Makes a [`Plugin`] type the component's export (`iim:plugin/handler`): `init` builds it
/// with [`Plugin::new`] and keeps it, `handle` hands it each event. Use it once per plugin
/// crate, at the top level: `iim_plugin_sdk::export_plugin!(MyPlugin);`.
///
/// Outside `wasm32` there is nothing to export; the macro only checks that the type is a
/// `Plugin`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        // The export glue wit-bindgen generates is unsafe (it reads and writes the component
        // ABI's memory); this allow covers that glue only. A plugin crate sets `unsafe_code`
        // to `deny` rather than `forbid` so that this allow can take effect.
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        const _: () = {
            struct IimPluginExport;

            impl $crate::bindings::exports::iim::plugin::handler::Guest for IimPluginExport {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::core::result::Result<$crate::PluginInfo, $crate::PluginError> {
                    $crate::runtime::init::<$plugin>(config)
                }

                fn handle(event: $crate::Event) -> ::core::result::Result<(), $crate::PluginError> {
                    $crate::runtime::handle::<$plugin>(event)
                }
            }

    $crate::bindings::export_guest!(IimPluginExport with_types_in $crate::bindings);
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn() = $crate::runtime::assert_plugin::<$plugin>;
    };
}

/// Writes a log line at `level` through [`host::log`], formatted like `format!`.
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {
        $crate::host::log($level, &::std::format!($($arg)+))
    };
}

/// Writes a `trace` log line, formatted like `format!`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Trace, $($arg)+) };
}

/// Writes a `debug` log line, formatted like `format!`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Debug, $($arg)+) };
}

/// Writes an `info` log line, formatted like `format!`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Info, $($arg)+) };
}

/// Writes a `warn` log line, formatted like `format!`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Warn, $($arg)+) };
}

/// Writes an `error` log line, formatted like `format!`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Error, $($arg)+) };
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_package_the_wit_file_declares() {
        let wit = include_str!("../../wit/iim.wit");
        let declared = wit
            .lines()
            .find_map(|line| line.strip_prefix("package "))
            .map(|rest| rest.trim_end_matches(';'));
        assert_eq!(declared, Some(super::WIT_PACKAGE));
    }
}
