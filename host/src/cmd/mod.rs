//! One module per request a client can make. Each takes the host and the request's fields
//! and returns the answer or a [`Refusal`]; the session turns either into a frame.

pub mod account;
pub mod relation;
pub mod submit;

use crate::iim::IimError;
use crate::store::StoreError;
use iim_proto::ErrorCode;

/// A request the host will not carry out, and why: sent to the client as an error frame.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The code.
    pub code: ErrorCode,
    /// The reason, for people.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        // The client learns only that the host failed; the operator gets the detail.
        tracing::error!(error = %e, "store failure while handling a request");
        Refusal::new(
            ErrorCode::INTERNAL,
            "the host could not complete the request",
        )
    }
}

impl From<IimError> for Refusal {
    fn from(e: IimError) -> Self {
        match e {
            IimError::UnknownUser(user) => {
                Refusal::new(ErrorCode::UNKNOWN_USER, format!("no such user: {user}"))
            }
            IimError::UnknownServer(server) => Refusal::new(
                ErrorCode::INVALID_ARGUMENT,
                format!("server {server} is not reachable"),
            ),
            IimError::Relay(reason) => Refusal::new(ErrorCode::INTERNAL, reason),
            IimError::Store(e) => e.into(),
        }
    }
}
