//! Each plugin's own storage (the `plugin_kv` tree).

use super::{Sealer, StoreError, keys};

/// The key-value storage of every plugin, each in its own namespace.
#[derive(Clone)]
pub struct PluginStorage {
    tree: sled::Tree,
    /// Values are sealed; keys are not (a plugin looks them up by prefix).
    sealer: Sealer,
}

impl PluginStorage {
    pub(super) fn new(db: &sled::Db, sealer: &Sealer) -> Result<Self, StoreError> {
        Ok(Self {
            tree: db.open_tree("plugin_kv")?,
            sealer: sealer.clone(),
        })
    }

    /// A value of `plugin`'s own storage.
    pub fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = keys::plugin_kv(plugin, key);
        self.tree
            .get(&key)?
            .map(|v| Ok(self.sealer.open("plugin_kv", &key, &v)?.into_owned()))
            .transpose()
    }

    /// The keys of `plugin`'s storage that start with `prefix`, in byte order, after `after`
    /// if it is given: at most `limit`.
    pub fn keys(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let namespace = keys::plugin_kv(plugin, "").len();
        let start = keys::plugin_kv(plugin, prefix);
        let range = match after {
            Some(after) if after >= prefix => self.tree.range((
                std::ops::Bound::Excluded(keys::plugin_kv(plugin, after)),
                std::ops::Bound::Unbounded,
            )),
            _ => self.tree.range(start.clone()..),
        };
        let mut found = Vec::new();
        for entry in range {
            let (key, _) = entry?;
            if !key.starts_with(&start) || found.len() >= limit {
                break;
            }
            found.push(String::from_utf8_lossy(&key[namespace..]).into_owned());
        }
        Ok(found)
    }

    /// Writes (or, for `None`, removes) values of `plugin`'s storage in one atomic batch.
    pub fn apply(
        &self,
        plugin: &str,
        writes: &std::collections::BTreeMap<String, Option<Vec<u8>>>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (key, value) in writes {
            match value {
                Some(value) => {
                    let key = keys::plugin_kv(plugin, key);
                    let sealed = self.sealer.seal("plugin_kv", &key, value.clone());
                    batch.insert(key, sealed)
                }
                None => batch.remove(keys::plugin_kv(plugin, key)),
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }
}
