//! Host configuration: defaults, then a TOML file, then command-line flags.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The address a host listens on unless told otherwise: loopback only, so a development host
/// is not reachable from the network by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7447";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid configuration.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything a host is configured with.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// What this process is: a host (the default) or the exchange of a network of hosts.
    pub role: Role,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Directory for the store and the generated certificate.
    pub data_dir: PathBuf,
    /// This host's server id.
    pub server_id: String,
    /// TLS settings.
    pub tls: TlsConfig,
    /// Limits on what one client may send and buffer.
    pub limits: Limits,
    /// The plugin runtime.
    pub plugins: PluginsConfig,
    /// The network of hosts this host belongs to (none: a host alone), or, for the exchange,
    /// the network it serves.
    pub network: NetworkConfig,
    /// Encryption at rest: the data key.
    pub storage: StorageConfig,
    /// The metrics and health endpoint.
    pub metrics: MetricsConfig,
}

/// Where the metrics and health endpoint listens (README, "Metrics and health").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address of `/metrics`, `/healthz` and `/readyz` (plain HTTP). Off without it.
    pub listen: Option<SocketAddr>,
}

/// How what the host stores is encrypted (docs/security.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Whether message bodies, files and plugin values are encrypted in the data directory
    /// (the default). A store once encrypted cannot be opened with this off; a store that is
    /// not is encrypted (migrated) when a host first starts with it on.
    pub encrypt: bool,
    /// The data key file. Without it, `<data_dir>.key`: beside the data directory, never
    /// inside it, so that a copy of the data directory does not carry its key. Made on first
    /// start (mode 0600) if missing and the store is new or not yet encrypted.
    pub key_file: Option<PathBuf>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            encrypt: true,
            key_file: None,
        }
    }
}

/// What an `iim-host` process is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A host: clients, plugins, inboxes.
    #[default]
    Host,
    /// The exchange of a network of hosts: registry, directory, relay.
    Exchange,
}

/// How a host joins a network, or how the exchange serves one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// A host: the exchange's UDP address (`host:port`), or the addresses of several exchanges
    /// of one network (sharing one database), separated by commas: the host joins the first
    /// that answers, and when its link is lost it tries the next. Without it the host is
    /// alone.
    pub exchange: Option<String>,
    /// A host: the PEM certificate (or CA) to trust for the exchange; for several exchanges,
    /// a file with each one's certificate, or the CA that signed them.
    pub exchange_cert: Option<PathBuf>,
    /// A host: the name the exchange's certificate carries.
    pub exchange_name: Option<String>,
    /// The secret every host of the network shows the exchange when it joins.
    pub secret: Option<String>,
    /// A host: its address for clients, where other hosts redirect its users. Without it, the
    /// address it listens on (which must then not be a wildcard address).
    pub advertise: Option<String>,
    /// The exchange: the PostgreSQL database that keeps the network's state, which any
    /// number of exchanges share (libpq's forms: `postgresql://user@host/db` or
    /// `host=… dbname=…`; a primary and its standbys as several hosts with
    /// `target_session_attrs=read-write`). Without it, the exchange keeps the state in its
    /// data directory, alone.
    pub database: Option<String>,
    /// The exchange: the database has no synchronous standby, and that is meant (one
    /// database server: what it commits survives its crash, not the loss of its disk).
    /// Without it, a database without synchronous replication is refused.
    pub database_single_node: bool,
    /// The exchange: how many connections to the database it keeps for its calls, which run
    /// side by side on them (1 to 1000; default 8). Besides those it has one that listens and
    /// one per host it forwards to.
    pub database_connections: Option<usize>,
}

impl NetworkConfig {
    /// The addresses of the exchanges in `exchange`, in the order given.
    pub fn exchanges(&self) -> Vec<&str> {
        self.exchange
            .as_deref()
            .map(|list| list.split(',').map(str::trim).collect())
            .unwrap_or_default()
    }

    /// The name of the exchange's certificate.
    pub fn exchange_name(&self) -> &str {
        self.exchange_name.as_deref().unwrap_or("localhost")
    }
}

/// Whether `id` is a valid server id: 1 to 64 bytes of `a-z 0-9 . _ -`, as user names.
pub fn valid_server_id(id: &str) -> bool {
    iim_proto::UserId::new(id).is_ok()
}

/// Where plugins come from and what each call into one may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// The directory of `.wasm` plugins (each with an optional `.toml` of its configuration).
    /// Without it, `<data_dir>/plugins`. A directory that does not exist yet is created with
    /// the default plugins (chat, presence, receipts) in it; at later starts a default plugin
    /// still as a host installed it is upgraded to this host's build (see `.iim-defaults`).
    pub dir: Option<PathBuf>,
    /// Where compiled plugins are cached, so that a restart does not compile them again.
    /// Without it, `<data_dir>/plugin-cache`.
    pub cache_dir: Option<PathBuf>,
    /// Milliseconds between two looks at the directory for added, changed or removed plugins.
    pub watch_interval_ms: u64,
    /// Milliseconds one call into a plugin (`init` or `handle`) may run.
    pub call_timeout_ms: u64,
    /// Linear memory one plugin instance may grow to, in MiB.
    pub max_memory_mib: u64,
    /// Times an event is tried on a plugin before it is set aside as a dead letter.
    pub max_attempts: u32,
    /// Events waiting for one plugin, at most; past it, the sessions raising events wait.
    pub queue: usize,
    /// Instances of each plugin handling its events side by side. The events of one acting
    /// user always go to the same instance, so each user's events are handled one at a time,
    /// in order.
    pub instances: usize,
    /// Most users one `send` may name.
    pub max_send_users: usize,
}

/// How many backlog entries a session reads from the store at a time.
const SYNC_BATCH: usize = 256;

/// The largest `limits.max_frame`: a relay envelope between hosts carries one message and
/// the names of up to [`MAX_SEND_USERS_LIMIT`] users, and must fit the link's frame limit.
pub const MAX_FRAME_LIMIT: u32 = 1024 * 1024;

/// The largest `plugins.max_send_users` (see [`MAX_FRAME_LIMIT`]).
pub const MAX_SEND_USERS_LIMIT: usize = 100_000;

/// Most password hashing threads: each holds 19 MiB for good.
pub const MAX_HASHING: usize = 64;

/// Most instances of one plugin (`plugins.instances`, or a plugin's `[host] instances`): the
/// instance pool is sized for a dozen plugins of this many, one of them being replaced.
pub const MAX_PLUGIN_INSTANCES: usize = 16;

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: None,
            cache_dir: None,
            watch_interval_ms: 500,
            call_timeout_ms: 1000,
            max_memory_mib: 128,
            max_attempts: 3,
            queue: 4096,
            instances: 8,
            max_send_users: 10_000,
        }
    }
}

/// Where the host's certificate comes from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain. Without it the host uses `<data_dir>/cert.pem`, generating a
    /// self-signed certificate there on first start.
    pub cert: Option<PathBuf>,
    /// PEM private key, required with `cert`; otherwise `<data_dir>/key.pem`.
    pub key: Option<PathBuf>,
    /// Extra DNS names for a generated certificate (it always covers `localhost`,
    /// `127.0.0.1` and `::1`).
    pub names: Vec<String>,
}

/// Per-session limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted, in bytes.
    pub max_frame: u32,
    /// Largest message body accepted, in bytes.
    pub max_body: u32,
    /// Deliveries buffered for one device before it is disconnected as too slow.
    pub session_queue: usize,
    /// Seconds a new connection has to open its stream and send `Hello`.
    pub handshake_timeout_secs: u64,
    /// Seconds a connection may stay unauthenticated after its handshake.
    pub auth_timeout_secs: u64,
    /// Connections served at once; more are refused.
    pub max_connections: usize,
    /// Threads hashing and checking passwords (register and login). Each keeps its 19 MiB of
    /// argon2 memory for the life of the host and takes a core for tens of ms per hash; more
    /// threads than cores add memory, not speed.
    pub max_hashing: usize,
    /// Registrations and logins waiting for a hashing thread, at most. Past it a register or
    /// login is refused at once with `rate_limited` ("the host is busy checking passwords; try
    /// again in N s"), so that a burst of logins is told to come back rather than left waiting
    /// past the client's patience (30 s for an answer, in `iim-client`). The default, 256, is
    /// about 4 s of hashing on 2 cores and 10 s on one slow core; raise it with the cores.
    pub hashing_queue: usize,
    /// Seconds without any packet before a connection is dropped, at most: QUIC takes the
    /// smaller of this and the client's own idle timeout (30 s in `iim-client`'s desktop
    /// profile, 60 s in its mobile one). It is also how long a client that vanished without a
    /// word (a phone out of coverage) still counts as online.
    pub idle_timeout_secs: u64,
    /// Seconds a write to a client may wait for it to read before the session is ended.
    pub write_timeout_secs: u64,
    /// Deliveries sent to one device and not yet acknowledged, at most; past it the host
    /// waits for acks (and reads what it delivers next from the inbox).
    pub max_in_flight: usize,
    /// Milliseconds after which a delivery not yet acknowledged is sent again; each wait
    /// doubles up to `retransmit_max_ms`.
    pub retransmit_initial_ms: u64,
    /// Longest wait, in milliseconds, between two transmissions of a delivery.
    pub retransmit_max_ms: u64,
    /// Transmissions of one delivery, the first included, after which a device that did not
    /// acknowledge it is disconnected (what it did not acknowledge stays in its inbox).
    pub retransmit_budget: u32,
    /// Submissions one session may make per second, on average. Past the burst the session
    /// reads further submissions only as the rate allows (none is refused, so a sender's order
    /// holds); with a rate of 0 they are refused with `rate_limited`.
    pub submit_rate: u32,
    /// Submissions one session may make in a burst.
    pub submit_burst: u32,
    /// Register, login and authenticate attempts one connection may make per second.
    pub auth_rate: u32,
    /// Register, login and authenticate attempts one connection may make in a burst.
    pub auth_burst: u32,
    /// Seconds a message stays in the inbox of a recipient none of whose devices acknowledged
    /// it, unless its sender chose another time to live (`SubmitExpiring`); then it expires
    /// and its sender is told. 0: messages without their own time to live never expire.
    pub message_ttl_secs: u64,
    /// Largest file an upload may announce, in bytes (100 MiB by default).
    pub max_file: u64,
    /// File streams (uploads and downloads) one connection may have open at once.
    pub file_streams: u32,
    /// Bytes of files one user may have uploaded to this host, counting each file they were
    /// the first to upload (1 GiB by default; 0: no limit).
    pub file_quota: u64,
    /// Seconds a file stays once no inbox message references it any longer, counted from
    /// its last upload or reference (30 days by default; 0: files stay for ever).
    pub file_ttl_secs: u64,
    /// Seconds between two looks for files that may leave.
    pub file_sweep_secs: u64,
    /// Networks whose addresses the `address_*` limits leave alone (`a.b.c.d/n`, `x::/n`, or
    /// one address). By default loopback, where the operator's own tools and tests run.
    pub address_exempt: Vec<String>,
    /// Connections open at once from one address (an IPv4 address or an IPv6 /64), at most.
    /// Past it a new connection is closed at once with `rate_limited`. Sized for a carrier's
    /// NAT, where many phones share one address.
    pub address_max_connections: u32,
    /// New connections one address may open per minute, on average; past the burst, one is
    /// closed at once with `rate_limited` and the time to wait.
    pub address_connects_per_minute: u32,
    /// New connections one address may open in a burst.
    pub address_connect_burst: u32,
    /// Password log-ins one address may attempt per minute, on average (tokens, which devices
    /// reconnect with, are not counted: they are cheap to check and cannot be guessed).
    pub address_logins_per_minute: u32,
    /// Password log-ins one address may attempt in a burst.
    pub address_login_burst: u32,
    /// Registrations one address may make per hour, on average.
    pub address_registrations_per_hour: u32,
    /// Registrations one address may make in a burst.
    pub address_register_burst: u32,
}

impl Limits {
    /// The default time to live of a message, if messages expire by default.
    pub fn message_ttl(&self) -> Option<Duration> {
        (self.message_ttl_secs > 0).then(|| Duration::from_secs(self.message_ttl_secs))
    }

    /// What a client connection's session machine is given.
    pub fn session(&self, server: &str) -> iim_proto::session::HostConfig {
        iim_proto::session::HostConfig {
            server: server.to_owned(),
            max_frame: self.max_frame,
            max_body: self.max_body,
            handshake_timeout: Duration::from_secs(self.handshake_timeout_secs),
            auth_timeout: Duration::from_secs(self.auth_timeout_secs),
            max_in_flight: self.max_in_flight.max(1),
            sync_batch: SYNC_BATCH,
            retry: self.retry_policy(),
            submit_rate: self.submit_rate,
            submit_burst: self.submit_burst,
            auth_rate: self.auth_rate,
            auth_burst: self.auth_burst,
        }
    }

    /// The limits per address; `address_exempt` was checked by [`Config::validate`] (a
    /// network that does not parse is left out).
    pub fn address_limits(&self) -> crate::address_limits::Settings {
        crate::address_limits::Settings {
            exempt: self
                .address_exempt
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            max_connections: self.address_max_connections,
            connects_per_minute: self.address_connects_per_minute,
            connect_burst: self.address_connect_burst,
            logins_per_minute: self.address_logins_per_minute,
            login_burst: self.address_login_burst,
            registrations_per_hour: self.address_registrations_per_hour,
            register_burst: self.address_register_burst,
        }
    }

    /// When deliveries are sent again, and when a device is given up.
    pub fn retry_policy(&self) -> iim_proto::RetryPolicy {
        iim_proto::RetryPolicy {
            initial: Duration::from_millis(self.retransmit_initial_ms),
            max: Duration::from_millis(self.retransmit_max_ms),
            budget: self.retransmit_budget,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: iim_proto::DEFAULT_MAX_FRAME,
            max_body: iim_proto::DEFAULT_MAX_BODY,
            session_queue: 4096,
            handshake_timeout_secs: 10,
            auth_timeout_secs: 60,
            max_connections: 10_000,
            max_hashing: 4,
            hashing_queue: 256,
            idle_timeout_secs: 60,
            write_timeout_secs: 30,
            max_in_flight: 1024,
            retransmit_initial_ms: 2_000,
            retransmit_max_ms: 16_000,
            retransmit_budget: 6,
            submit_rate: 1000,
            submit_burst: 2000,
            auth_rate: 2,
            auth_burst: 10,
            message_ttl_secs: 30 * 24 * 3600,
            max_file: 100 * 1024 * 1024,
            file_streams: 4,
            file_quota: 1024 * 1024 * 1024,
            file_ttl_secs: 30 * 24 * 3600,
            file_sweep_secs: 60,
            address_exempt: vec!["127.0.0.0/8".into(), "::1".into()],
            address_max_connections: 1000,
            address_connects_per_minute: 600,
            address_connect_burst: 300,
            address_logins_per_minute: 60,
            address_login_burst: 60,
            address_registrations_per_hour: 60,
            address_register_burst: 20,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            role: Role::Host,
            network: NetworkConfig::default(),
            listen: DEFAULT_LISTEN.parse().unwrap_or_else(|_| unreachable!()),
            data_dir: PathBuf::from("iim-data"),
            server_id: "h1".into(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            plugins: PluginsConfig::default(),
            storage: StorageConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file; keys it does not set keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Checks values that the types alone do not bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_frame < 1024 {
            return Err(ConfigError::Invalid(
                "limits.max_frame must be at least 1024".into(),
            ));
        }
        let networked = self.role == Role::Exchange || self.network.exchange.is_some();
        if networked && l.max_frame > MAX_FRAME_LIMIT {
            return Err(ConfigError::Invalid(format!(
                "limits.max_frame must be at most {MAX_FRAME_LIMIT} in a network of hosts"
            )));
        }
        if l.max_body == 0 || l.max_body > l.max_frame.saturating_sub(1024) {
            return Err(ConfigError::Invalid(
                "limits.max_body must be between 1 and limits.max_frame - 1024 \
                 (room for the message's other fields)"
                    .into(),
            ));
        }
        if !valid_server_id(&self.server_id) {
            return Err(ConfigError::Invalid(
                "server_id must be 1 to 64 bytes of a-z 0-9 . _ -".into(),
            ));
        }
        let n = &self.network;
        let secret_ok = n.secret.as_ref().is_some_and(|s| s.len() >= 8);
        match self.role {
            Role::Exchange if !secret_ok => {
                return Err(ConfigError::Invalid(
                    "the exchange needs network.secret (at least 8 bytes), the secret its \
                     hosts join with"
                        .into(),
                ));
            }
            Role::Host
                if n.database.is_some()
                    || n.database_single_node
                    || n.database_connections.is_some() =>
            {
                return Err(ConfigError::Invalid(
                    "network.database, network.database_single_node and \
                     network.database_connections are the exchange's (role = \"exchange\"); a \
                     host keeps its data in data_dir"
                        .into(),
                ));
            }
            Role::Exchange if n.database.is_none() && n.database_single_node => {
                return Err(ConfigError::Invalid(
                    "network.database_single_node says what network.database is: set both".into(),
                ));
            }
            Role::Exchange if n.database.is_none() && n.database_connections.is_some() => {
                return Err(ConfigError::Invalid(
                    "network.database_connections are connections to network.database: set both"
                        .into(),
                ));
            }
            Role::Exchange
                if n.database_connections
                    .is_some_and(|c| !(1..=1000).contains(&c)) =>
            {
                return Err(ConfigError::Invalid(
                    "network.database_connections must be 1 to 1000".into(),
                ));
            }
            Role::Host if n.exchanges().iter().any(|addr| addr.is_empty()) => {
                return Err(ConfigError::Invalid(
                    "network.exchange is an address (host:port), or several separated by commas"
                        .into(),
                ));
            }
            Role::Host if n.exchange.is_some() && (!secret_ok || n.exchange_cert.is_none()) => {
                return Err(ConfigError::Invalid(
                    "a host joining a network needs network.secret (at least 8 bytes) and \
                     network.exchange_cert"
                        .into(),
                ));
            }
            Role::Host
                if n.exchange.is_some()
                    && n.advertise.is_none()
                    && self.listen.ip().is_unspecified() =>
            {
                return Err(ConfigError::Invalid(
                    "a host listening on a wildcard address needs network.advertise, the \
                     address its users are redirected to"
                        .into(),
                ));
            }
            _ => {}
        }
        if self.storage.key_file.is_none() && self.data_dir.file_name().is_none() {
            return Err(ConfigError::Invalid(format!(
                "data_dir {} has no name of its own to put the data key beside: set \
                 storage.key_file",
                self.data_dir.display()
            )));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "tls.cert and tls.key go together".into(),
            ));
        }
        if self.limits.retransmit_initial_ms == 0
            || self.limits.retransmit_max_ms < self.limits.retransmit_initial_ms
            || self.limits.retransmit_budget == 0
        {
            return Err(ConfigError::Invalid(
                "limits.retransmit_initial_ms and retransmit_budget must be at least 1, and \
                 retransmit_max_ms at least retransmit_initial_ms"
                    .into(),
            ));
        }
        // Values past these would overflow a count or allocate without bound at start (the
        // fuzz target `config` checks that nothing it accepts panics).
        for (key, value, max) in [
            ("limits.file_streams", u64::from(l.file_streams), 1024),
            ("limits.session_queue", l.session_queue as u64, 1 << 20),
            ("limits.hashing_queue", l.hashing_queue as u64, 1 << 16),
            ("plugins.queue", self.plugins.queue as u64, 1 << 20),
        ] {
            if value > max {
                return Err(ConfigError::Invalid(format!("{key} must be at most {max}")));
            }
        }
        const CENTURY_SECS: u64 = 100 * 365 * 24 * 3600;
        for (key, secs) in [
            ("handshake_timeout_secs", l.handshake_timeout_secs),
            ("auth_timeout_secs", l.auth_timeout_secs),
            ("idle_timeout_secs", l.idle_timeout_secs),
            ("write_timeout_secs", l.write_timeout_secs),
            ("retransmit_initial_ms", l.retransmit_initial_ms / 1000),
            ("retransmit_max_ms", l.retransmit_max_ms / 1000),
            ("message_ttl_secs", l.message_ttl_secs),
            ("file_ttl_secs", l.file_ttl_secs),
            ("file_sweep_secs", l.file_sweep_secs),
        ] {
            if secs > CENTURY_SECS {
                return Err(ConfigError::Invalid(format!(
                    "limits.{key} must be at most a hundred years"
                )));
            }
        }
        for network in &l.address_exempt {
            network
                .parse::<crate::address_limits::Network>()
                .map_err(|e| ConfigError::Invalid(format!("limits.address_exempt: {e}")))?;
        }
        for (key, value) in [
            ("address_max_connections", l.address_max_connections),
            ("address_connect_burst", l.address_connect_burst),
            ("address_login_burst", l.address_login_burst),
            ("address_register_burst", l.address_register_burst),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "limits.{key} must be at least 1"
                )));
            }
        }
        if l.max_hashing == 0 || l.max_hashing > MAX_HASHING {
            return Err(ConfigError::Invalid(format!(
                "limits.max_hashing must be between 1 and {MAX_HASHING}"
            )));
        }
        let p = &self.plugins;
        for (key, value) in [
            ("call_timeout_ms", p.call_timeout_ms),
            ("max_memory_mib", p.max_memory_mib),
            ("max_attempts", u64::from(p.max_attempts)),
            ("queue", p.queue as u64),
            ("instances", p.instances as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "plugins.{key} must be at least 1"
                )));
            }
        }
        if p.max_send_users == 0 || (networked && p.max_send_users > MAX_SEND_USERS_LIMIT) {
            return Err(ConfigError::Invalid(format!(
                "plugins.max_send_users must be at least 1, and at most {MAX_SEND_USERS_LIMIT} \
                 in a network of hosts"
            )));
        }
        if p.instances > MAX_PLUGIN_INSTANCES {
            return Err(ConfigError::Invalid(format!(
                "plugins.instances must be at most {MAX_PLUGIN_INSTANCES}"
            )));
        }
        Ok(())
    }

    /// The cache of compiled plugins.
    pub fn plugin_cache_dir(&self) -> PathBuf {
        self.plugins
            .cache_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("plugin-cache"))
    }

    /// The data key file: `storage.key_file`, or `<data_dir>.key`.
    pub fn key_file(&self) -> PathBuf {
        // `validate` refuses a data directory without a name of its own (`.`, `/`) unless
        // `storage.key_file` is set.
        self.storage.key_file.clone().unwrap_or_else(|| {
            let mut name = self.data_dir.file_name().unwrap_or_default().to_owned();
            name.push(".key");
            self.data_dir.with_file_name(name)
        })
    }

    /// The plugins directory.
    pub fn plugins_dir(&self) -> PathBuf {
        self.plugins
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("plugins"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\n[limits]\nmax_body = 2048\n",
        )
        .expect("write");
        let config = Config::from_file(&path).expect("parse");
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.limits.max_body, 2048);
        assert_eq!(config.limits.max_frame, iim_proto::DEFAULT_MAX_FRAME);
        config.validate().expect("valid");

        std::fs::write(&path, "lisen = \"127.0.0.1:9000\"\n").expect("write");
        let err = Config::from_file(&path).expect_err("typo refused");
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn retransmission_limits_are_checked() {
        let mut config = Config::default();
        config.validate().expect("defaults are valid");
        assert_eq!(
            config.limits.retry_policy().give_up_after(),
            Duration::from_secs(62)
        );
        config.limits.retransmit_max_ms = config.limits.retransmit_initial_ms - 1;
        let err = config.validate().expect_err("max below initial");
        assert!(err.to_string().contains("retransmit_max_ms"), "{err}");
        config.limits = Limits {
            retransmit_budget: 0,
            ..Limits::default()
        };
        assert!(config.validate().is_err(), "a budget of 0");
    }

    /// Writes `toml` to `path` and loads it: valid or not as `valid` says, and if not, the
    /// error names `key`. Returns what was loaded.
    fn load_checked(path: &Path, toml: &str, valid: bool, key: &str) -> Config {
        std::fs::write(path, toml).expect("write");
        let config = Config::from_file(path).expect("parse");
        match config.validate() {
            Ok(()) => assert!(valid, "accepted: {toml}"),
            Err(e) => {
                assert!(!valid, "refused: {toml}: {e}");
                assert!(e.to_string().contains(key), "{e}");
            }
        }
        config
    }

    #[test]
    fn hashing_threads_are_bounded_and_the_queue_may_be_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host.toml");
        for (threads, queue, valid) in [
            (0, 8, false),
            (1, 0, true),
            (64, 1000, true),
            (65, 8, false),
        ] {
            let toml = format!("[limits]\nmax_hashing = {threads}\nhashing_queue = {queue}\n");
            let config = load_checked(&path, &toml, valid, "limits.max_hashing");
            assert_eq!(config.limits.hashing_queue, queue);
        }
    }

    #[test]
    fn only_an_exchange_with_a_database_has_database_connections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host.toml");
        let exchange = "role = \"exchange\"\n[network]\nsecret = \"a network secret\"\n";
        let database = "database = \"postgresql://iim@127.0.0.1/iim\"\n";
        for (toml, valid) in [
            (
                format!("{exchange}{database}database_connections = 1\n"),
                true,
            ),
            (
                format!("{exchange}{database}database_connections = 1000\n"),
                true,
            ),
            (
                format!("{exchange}{database}database_connections = 0\n"),
                false,
            ),
            (
                format!("{exchange}{database}database_connections = 1001\n"),
                false,
            ),
            (format!("{exchange}database_connections = 4\n"), false),
            ("[network]\ndatabase_connections = 4\n".to_owned(), false),
        ] {
            load_checked(&path, &toml, valid, "network.database_connections");
        }
    }

    #[test]
    fn plugin_instances_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host.toml");
        for (instances, valid) in [(0, false), (1, true), (16, true), (17, false)] {
            let toml = format!("[plugins]\ninstances = {instances}\n");
            let config = load_checked(&path, &toml, valid, "plugins.instances");
            assert_eq!(config.plugins.instances, instances);
        }
    }
}
