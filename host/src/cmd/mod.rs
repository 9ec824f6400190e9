//! One module per request a client can make, and for what a delivery session does: each
//! carries out an [`iim_proto::session::Action`] of the session machine with the host's
//! store, network and plugins, and returns its outcome (an answer or a [`Refusal`]), which
//! the session hands back to the machine.

pub mod account;
pub mod ack;
pub mod fetch;
pub mod file;
pub mod group;
pub mod relation;
pub mod submit;

use crate::iim::IimError;
use crate::store::StoreError;
use iim_proto::ErrorCode;

pub use iim_proto::Refusal;

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
            IimError::Relay(e) => Refusal::new(ErrorCode::INTERNAL, e.to_string()),
            IimError::Store(e) => e.into(),
        }
    }
}
