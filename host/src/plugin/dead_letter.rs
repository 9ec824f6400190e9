//! Dead letters: the events no build of a plugin could handle in every attempt, kept in the
//! store for the operator (`iim-host admin dead-letters`) until they are handed back. The
//! store keeps them as bytes; what one holds is the plugin runtime's business.

use super::Event;
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};

/// An event a plugin failed to handle in every attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The plugin (file) name.
    pub plugin: String,
    /// The version of the build that failed.
    pub version: String,
    /// The digest of that build.
    pub digest: String,
    /// The event.
    pub event: Event,
    /// Why the last attempt failed.
    pub error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When it was set aside, in milliseconds since the Unix epoch.
    pub at: u64,
}

impl DeadLetter {
    /// Keeps the letter in `store`; returns its number.
    pub fn keep(&self, store: &Store) -> Result<u64, StoreError> {
        // Encoding our own in-memory value into a Vec cannot fail.
        store
            .dead_letters
            .add(&postcard::to_stdvec(self).unwrap_or_default())
    }

    /// Dead letter `id`, if `store` keeps it.
    pub fn read(store: &Store, id: u64) -> Result<Option<Self>, StoreError> {
        store
            .dead_letters
            .get(id)?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    /// Every dead letter `store` keeps, with its number, oldest first.
    pub fn all(store: &Store) -> Result<Vec<(u64, Self)>, StoreError> {
        store
            .dead_letters
            .all()?
            .into_iter()
            .map(|(id, bytes)| Ok((id, decode(&bytes)?)))
            .collect()
    }
}

fn decode(bytes: &[u8]) -> Result<DeadLetter, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        tree: "dead_letters",
        reason: e.to_string(),
    })
}
