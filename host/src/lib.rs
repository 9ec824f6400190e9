//! `iim-host`: the iim server.
//!
//! A QUIC endpoint ([`server`]) runs one task per connection ([`session`]); each frame a
//! session reads is handled by one module of [`cmd`]. Durable state is in [`store`]; online
//! devices in [`registry`]. What is sent to whom is decided by WebAssembly plugins
//! ([`plugin`]), which the host calls with events and which answer through the IIM entry
//! point ([`iim`]).

pub mod accounts;
pub mod address_limits;
pub mod admin;
pub mod blobs;
pub mod clock;
pub mod cmd;
pub mod config;
pub mod directory;
pub mod exchange;
pub mod expiry;
pub mod fd_limit;
pub mod hashing;
pub mod iim;
pub mod key_rotation;
pub mod metrics;
pub mod network;
pub mod outbox;
pub mod peer;
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
    /// The link to the network's exchange, in a network of hosts.
    pub network: Option<Arc<network::Network>>,
    /// Becomes `true` when the host starts shutting down.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// The threads that hash and check passwords: they bound the memory and CPU that
    /// registrations and logins take, and refuse what would wait too long.
    pub passwords: hashing::PasswordHashers,
    /// The files' bytes, beside the store.
    pub blobs: blobs::Blobs,
    /// The uploads in progress, which a newer upload of the same file by the same user takes
    /// over.
    pub uploads: blobs::Uploads,
    /// Data key rotations (`admin rotate-key`) and their re-encryption.
    pub key_rotation: key_rotation::KeyRotation,
    /// The limits per network address: connections, log-ins, registrations.
    pub addresses: Arc<address_limits::AddressLimits>,
}

impl Host {
    /// What its data key seals, for a key rotation: the store and the files.
    pub fn data(&self) -> key_rotation::HostData {
        key_rotation::HostData {
            store: self.store.clone(),
            blobs: self.blobs.clone(),
        }
    }
}
