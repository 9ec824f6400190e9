//! Events no plugin build could handle, kept for the operator (the `dead_letters` tree).
//!
//! The store keeps each as the bytes the plugin runtime made of it: what a dead letter is
//! belongs to the plugins, not to the store.

use super::{Ids, Sealer, StoreError, decode_u64, keys};

/// The dead letters, numbered in the order they were set aside.
#[derive(Clone)]
pub struct DeadLetters {
    ids: Ids,
    tree: sled::Tree,
    /// Dead letters are sealed: they hold the event, its message with it.
    sealer: Sealer,
}

impl DeadLetters {
    pub(super) fn new(db: &sled::Db, ids: Ids, sealer: &Sealer) -> Result<Self, StoreError> {
        Ok(Self {
            ids,
            sealer: sealer.clone(),
            tree: db.open_tree("dead_letters")?,
        })
    }

    /// Keeps a dead letter; returns its number.
    pub fn add(&self, letter: &[u8]) -> Result<u64, StoreError> {
        let id = self.ids.next()?;
        let key = keys::dead_letter(id);
        let sealed = self.sealer.seal("dead_letters", &key, letter.to_vec());
        self.tree.insert(key, sealed)?;
        Ok(id)
    }

    /// Dead letter `id`, if it is kept.
    pub fn get(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let key = keys::dead_letter(id);
        self.tree
            .get(&key)?
            .map(|v| Ok(self.sealer.open("dead_letters", &key, &v)?.into_owned()))
            .transpose()
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
                let letter = self.sealer.open("dead_letters", &key, &value)?;
                Ok((decode_u64("dead_letters", &key)?, letter.into_owned()))
            })
            .collect()
    }
}
