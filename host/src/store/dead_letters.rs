//! Events no plugin build could handle, kept for the operator (the `dead_letters` tree).
//!
//! The store keeps each as the bytes the plugin runtime made of it: what a dead letter is
//! belongs to the plugins, not to the store.

use super::{StoreError, decode_u64, keys};

/// The dead letters, numbered in the order they were set aside.
#[derive(Clone)]
pub struct DeadLetters {
    db: sled::Db,
    tree: sled::Tree,
}

impl DeadLetters {
    pub(super) fn new(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            db: db.clone(),
            tree: db.open_tree("dead_letters")?,
        })
    }

    /// Keeps a dead letter; returns its number.
    pub fn add(&self, letter: &[u8]) -> Result<u64, StoreError> {
        let id = self.db.generate_id()?;
        self.tree.insert(keys::dead_letter(id), letter)?;
        Ok(id)
    }

    /// Dead letter `id`, if it is kept.
    pub fn get(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(keys::dead_letter(id))?.map(|v| v.to_vec()))
    }

    /// Takes dead letter `id` out; `false` if it was no longer there.
    pub fn remove(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self.tree.remove(keys::dead_letter(id))?.is_some())
    }

    /// Every dead letter with its number, oldest first.
    pub fn all(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.tree
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                Ok((decode_u64("dead_letters", &key)?, value.to_vec()))
            })
            .collect()
    }
}
