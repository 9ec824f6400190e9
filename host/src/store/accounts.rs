//! Accounts and device tokens (the `users` and `tokens` trees).

use super::{StoreError, UserRecord, decode, encode, keys};
use iim_proto::{DeviceId, UserId};
use std::collections::HashSet;
use std::sync::{Arc, RwLock};

/// Most users [`Accounts::exists`] remembers.
const KNOWN_USERS: usize = 65_536;

/// The accounts of a host's users and their devices' tokens.
#[derive(Clone)]
pub struct Accounts {
    pub(super) users: sled::Tree,
    pub(super) tokens: sled::Tree,
    /// Users known to exist (accounts are never deleted), up to [`KNOWN_USERS`]: every
    /// submission and send checks its recipients, and this spares the store those reads.
    known: Arc<RwLock<HashSet<UserId>>>,
}

impl Accounts {
    pub(super) fn new(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            users: db.open_tree("users")?,
            tokens: db.open_tree("tokens")?,
            known: Arc::default(),
        })
    }

    /// Creates `user`; `false` if the name is taken.
    pub fn create(&self, user: &UserId, record: &UserRecord) -> Result<bool, StoreError> {
        let created = self
            .users
            .compare_and_swap(keys::user(user), None::<&[u8]>, Some(encode(record)))?
            .is_ok();
        Ok(created)
    }

    /// The account of `user`, if it exists.
    pub fn get(&self, user: &UserId) -> Result<Option<UserRecord>, StoreError> {
        self.users
            .get(keys::user(user))?
            .map(|v| decode("users", &v))
            .transpose()
    }

    /// Every user with an account here, by name.
    pub fn names(&self) -> Result<Vec<UserId>, StoreError> {
        self.users
            .iter()
            .map(|entry| {
                let (key, _) = entry?;
                std::str::from_utf8(&key)
                    .ok()
                    .and_then(|name| UserId::new(name).ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        tree: "users",
                        reason: "a key that is not a user name".into(),
                    })
            })
            .collect()
    }

    /// Whether `user` exists.
    pub fn exists(&self, user: &UserId) -> Result<bool, StoreError> {
        let known = || self.known.read().unwrap_or_else(|p| p.into_inner());
        if known().contains(user) {
            return Ok(true);
        }
        let exists = self.users.contains_key(keys::user(user))?;
        if exists && known().len() < KNOWN_USERS {
            self.known
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(user.clone());
        }
        Ok(exists)
    }

    /// Stores the hash of the token of `device`, replacing an earlier one.
    pub fn set_token(
        &self,
        user: &UserId,
        device: &DeviceId,
        hash: &[u8],
    ) -> Result<(), StoreError> {
        self.tokens.insert(keys::token(user, device), hash)?;
        Ok(())
    }

    /// The hash of the token of `device`, if it has one.
    pub fn token(&self, user: &UserId, device: &DeviceId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tokens
            .get(keys::token(user, device))?
            .map(|v| v.to_vec()))
    }

    /// Revokes the token of `device`.
    pub fn remove_token(&self, user: &UserId, device: &DeviceId) -> Result<(), StoreError> {
        self.tokens.remove(keys::token(user, device))?;
        Ok(())
    }
}
