//! `iim-host`: the iim server.
//!
//! A QUIC endpoint ([`server`]) runs one task per connection ([`session`]); each frame a
//! session reads is handled by one module of [`cmd`]. Durable state is in [`store`]; online
//! devices in [`registry`]. What is sent to whom is decided by WebAssembly plugins
//! ([`plugin`]), which the host calls with events and which answer through the IIM entry
//! point ([`iim`]).

pub mod accounts;
pub mod admin;
pub mod cmd;
pub mod config;
pub mod exchange;
pub mod expiry;
pub mod hashing;
pub mod iim;
pub mod network;
pub mod plugin;
pub mod registry;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;

use std::sync::Arc;

/// Everything the sessions of one host share.
pub struct Host {
    /// The configuration it was started with.
    pub config: config::Config,
    /// Durable state.
    pub store: store::Store,
    /// Online devices.
    pub registry: Arc<registry::Registry>,
    /// The IIM entry point.
    pub iim: Arc<iim::Iim>,
    /// The plugins, and the routing of events to them.
    pub plugins: Arc<plugin::PluginHost>,
    /// Becomes `true` when the host starts shutting down.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// The threads that hash and check passwords: they bound the memory and CPU that
    /// registrations and logins take, and refuse what would wait too long.
    pub passwords: hashing::PasswordHashers,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The ticks of a task the host runs every `period` until it shuts down.
pub(crate) struct Ticks {
    interval: tokio::time::Interval,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Ticks {
    /// Ticks every `period` (the first at once), late ticks delayed rather than bunched.
    pub(crate) fn new(host: &Host, period: std::time::Duration) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            interval,
            shutdown: host.shutdown.clone(),
        }
    }

    /// Waits for the next tick: `false` once the host is shutting down.
    pub(crate) async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.interval.tick() => true,
            _ = self.shutdown.wait_for(|stopping| *stopping) => false,
        }
    }
}
