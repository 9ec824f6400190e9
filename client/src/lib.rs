//! `iim-client`: connect to an iim host over QUIC and use it from any tokio program.
//!
//! One [`Connection`] value per connection; no process-global state. Requests (`register`,
//! `login`, `send`, ...) can be made concurrently from several tasks; deliveries arrive as
//! [`Event`]s from [`Connection::next_event`] and are acknowledged with [`Connection::ack`].
//!
//! In a network of hosts each user has a home host, and the others answer a login with a
//! redirect there ([`ClientError::Redirected`]). [`Connection::login_home`],
//! [`Connection::resume_home`] and [`Device`] follow redirects by themselves and say where they
//! ended up, for the application to remember.
//!
//! Files travel on QUIC streams of their own, beside the session's: [`Connection::upload_file`]
//! returns the [`FileRef`](iim_proto::body::FileRef) to send in a `file` message, and
//! [`Connection::download_file`] fetches a file a message named. Both go on from where a
//! cut-off transfer stopped; [`Device::upload_file`] and [`Device::download_file`] do that by
//! themselves across reconnects.
//!
//! ```no_run
//! # async fn demo() -> Result<(), iim_client::ClientError> {
//! use iim_client::{ClientConfig, Connection, Event};
//! use iim_proto::{DeviceId, SessionMode, UserId};
//!
//! let config = ClientConfig::new("127.0.0.1:7447".parse().unwrap())
//!     .with_ca_file("iim-data/cert.pem".as_ref())?;
//! let conn = Connection::connect(&config).await?;
//! let alice = UserId::new("alice").unwrap();
//! conn.login(&alice, "correct horse", &DeviceId::new("laptop").unwrap(), SessionMode::Receive)
//!     .await?;
//! conn.send_text(&UserId::new("bob").unwrap(), "hi").await?;
//! while let Some(event) = conn.next_event().await {
//!     if let Event::Message { seq, message } = event? {
//!         println!("{}: {}", message.from, String::from_utf8_lossy(&message.body));
//!         conn.ack(seq).await?;
//!     }
//! }
//! # Ok(()) }
//! ```

mod connection;
mod device;
mod driver;
pub mod e2e;
mod interfaces;
mod transfer;

pub use connection::{
    Accepted, ClientConfig, Connection, Event, MAX_REDIRECTS, NetworkProfile, Page, new_client_id,
    quic_client_config,
};
pub use device::{Credentials, Device, Submission, TRANSFER_ATTEMPTS, Update};
pub use iim_proto as proto;
pub use transfer::DownloadedFile;

use iim_proto::ErrorCode;

/// Why a client operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The CA file could not be read or holds no certificate.
    #[error("certificate file {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// The [`ClientConfig`] is not usable: timeouts that do not fit together.
    #[error("client configuration: {0}")]
    Config(String),
    /// No QUIC connection could be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The host's address.
        addr: std::net::SocketAddr,
        /// Why: the socket, the QUIC connection or the timeout's error.
        #[source]
        source: std::sync::Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The host refused the request.
    #[error("{message} ({})", code.name())]
    Refused {
        /// The error code.
        code: ErrorCode,
        /// The host's reason.
        message: String,
    },
    /// The host ended the connection, saying why.
    #[error("the host closed the connection: {message} ({})", code.name())]
    ClosedByHost {
        /// The error code.
        code: ErrorCode,
        /// The host's reason.
        message: String,
    },
    /// The connection is gone.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The host sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No answer came in time.
    #[error("no answer from the host within {0:?}")]
    Timeout(std::time::Duration),
    /// The request is larger than the host accepts.
    #[error("request too large: {0}")]
    TooLarge(String),
    /// The host answered `Login` or `Authenticate` with `Redirect`: the user's home is another
    /// host of the network, and this connection stays unauthenticated.
    /// [`Connection::login_home`], [`Connection::resume_home`] and [`Device`] follow it.
    #[error("user's home is host {server} at {addr}")]
    Redirected {
        /// The home host's server id.
        server: String,
        /// Its address for clients, `host:port` as the host gave it.
        addr: String,
    },
    /// The address a host redirected to could not be resolved (a name's lookup failed).
    #[error("cannot resolve {addr}: {reason}")]
    Resolve {
        /// The address, `host:port`.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A local file of a transfer could not be read or written, or is not what the transfer
    /// needs: a file that changed while it was uploaded, a name the protocol does not allow.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// The bytes a download got are not the file asked for: their SHA-256 differs, or more
    /// came than its size. The partial download was deleted; downloading again starts afresh.
    #[error("the download of file {file} failed its check: {reason}")]
    Corrupt {
        /// The file's id.
        file: String,
        /// What did not match, and what became of the partial download.
        reason: String,
    },
}

impl ClientError {
    /// The protocol error code, if the host sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } | ClientError::ClosedByHost { code, .. } => {
                Some(*code)
            }
            _ => None,
        }
    }

    /// Whether connecting again may get past this error: the network or the host went away,
    /// no answer came, a name did not resolve, or the host asked the device to come back later
    /// (`shutting_down`, `too_slow`, `unavailable`, `rate_limited`). Not a refused login, not another session of the device
    /// taking over, and not a redirect (following one is a new connection elsewhere, made on
    /// purpose).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::ConnectionLost(_)
            | ClientError::Timeout(_)
            | ClientError::Resolve { .. } => true,
            // A connection over a limit of its address is closed with `rate_limited` and the
            // time to wait.
            ClientError::ClosedByHost { code, .. } => {
                *code == ErrorCode::SHUTTING_DOWN
                    || *code == ErrorCode::TOO_SLOW
                    || *code == ErrorCode::RATE_LIMITED
            }
            // Something the host needs (its network's exchange) is out of reach for now, or it
            // is too busy checking passwords: the refusal says when to come back.
            ClientError::Refused { code, .. } => {
                *code == ErrorCode::UNAVAILABLE || *code == ErrorCode::RATE_LIMITED
            }
            _ => false,
        }
    }
}
