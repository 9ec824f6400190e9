//! Friends and colleagues (the `relations` tree).

use super::{StoreError, keys};
use iim_proto::{RelationKind, UserId};

/// Each user's lists of friends and colleagues.
#[derive(Clone)]
pub struct Relations {
    tree: sled::Tree,
}

impl Relations {
    pub(super) fn new(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            tree: db.open_tree("relations")?,
        })
    }

    /// Adds `other` to `user`'s list of `kind`.
    pub fn add(&self, user: &UserId, kind: RelationKind, other: &UserId) -> Result<(), StoreError> {
        self.tree.insert(keys::relation(user, kind, other), &[])?;
        Ok(())
    }

    /// Removes `other` from `user`'s list of `kind`.
    pub fn remove(
        &self,
        user: &UserId,
        kind: RelationKind,
        other: &UserId,
    ) -> Result<(), StoreError> {
        self.tree.remove(keys::relation(user, kind, other))?;
        Ok(())
    }

    /// `user`'s list of `kind`, sorted by name.
    pub fn list(&self, user: &UserId, kind: RelationKind) -> Result<Vec<UserId>, StoreError> {
        let prefix = keys::relation_prefix(user, kind);
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, _) = entry?;
            let other =
                keys::relation_other(&key, prefix.len()).ok_or_else(|| StoreError::Corrupt {
                    tree: "relations",
                    reason: "key does not end in a user name".into(),
                })?;
            out.push(other);
        }
        Ok(out)
    }

    /// Removes `user`'s lists, and `user` from everyone's lists (the account was deleted).
    /// Every list is read: deleting an account is rare, and a second index would cost every
    /// change of a relation a write.
    pub fn forget_user(&self, user: &UserId) -> Result<(), StoreError> {
        let own = keys::user_prefix(user);
        for entry in self.tree.iter() {
            let (key, _) = entry?;
            if key.starts_with(&own) || keys::related_user(&key).as_ref() == Some(user) {
                self.tree.remove(key)?;
            }
        }
        Ok(())
    }
}
