//! Accounts, device tokens and what a device did last (the `users`, `tokens` and `devices`
//! trees).

use super::{StoreError, UserRecord, decode, encode, keys};
use iim_proto::{DeviceId, UserId};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Arc, RwLock};

/// Most users [`Accounts::exists`] remembers.
const KNOWN_USERS: usize = 65_536;

/// When a device logged in and was last active, in ms since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Its last log-in with the password.
    pub logged_in_at: u64,
    /// The last time one of its sessions opened or ended.
    pub last_active_at: u64,
}

/// The accounts of a host's users and their devices' tokens.
#[derive(Clone)]
pub struct Accounts {
    pub(super) users: sled::Tree,
    pub(super) tokens: sled::Tree,
    devices: sled::Tree,
    /// (deletion id, plugin) → user: a deleted account's notice a plugin has not handled yet.
    notices: sled::Tree,
    /// Users known to exist, up to [`KNOWN_USERS`]: every submission and send checks its
    /// recipients, and this spares the store those reads. A deleted account leaves it first.
    known: Arc<RwLock<HashSet<UserId>>>,
}

impl Accounts {
    pub(super) fn new(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            users: db.open_tree("users")?,
            tokens: db.open_tree("tokens")?,
            devices: db.open_tree("devices")?,
            notices: db.open_tree("deletion_notices")?,
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
            // Looked at again under the lock: an account deleted meanwhile (under it too)
            // must not be remembered as existing.
            let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
            if self.users.contains_key(keys::user(user))? {
                known.insert(user.clone());
            }
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

    /// Revokes the token of `device` and forgets what it did last.
    pub fn remove_token(&self, user: &UserId, device: &DeviceId) -> Result<(), StoreError> {
        self.tokens.remove(keys::token(user, device))?;
        self.devices.remove(keys::device(user, device))?;
        Ok(())
    }

    /// Replaces `user`'s password hash; `false` if the account does not exist.
    pub fn set_password(&self, user: &UserId, password_hash: String) -> Result<bool, StoreError> {
        let Some(mut record) = self.get(user)? else {
            return Ok(false);
        };
        record.password_hash = password_hash;
        self.users.insert(keys::user(user), encode(&record))?;
        Ok(true)
    }

    /// Records that `device` was active at `now` (and logged in with the password, if
    /// `logged_in`), if it has a token (a revoked device is forgotten, not touched).
    pub fn touch(
        &self,
        user: &UserId,
        device: &DeviceId,
        now: u64,
        logged_in: bool,
    ) -> Result<(), StoreError> {
        if !self.tokens.contains_key(keys::token(user, device))? {
            return Ok(());
        }
        self.devices
            .fetch_and_update(keys::device(user, device), |old| {
                let mut record: DeviceRecord = old
                    .and_then(|v| postcard::from_bytes(v).ok())
                    .unwrap_or_default();
                record.last_active_at = record.last_active_at.max(now);
                if logged_in {
                    record.logged_in_at = now;
                }
                Some(encode(&record))
            })?;
        Ok(())
    }

    /// The devices of `user` with a token, by name, and what each did last.
    pub fn devices(&self, user: &UserId) -> Result<Vec<(DeviceId, DeviceRecord)>, StoreError> {
        let prefix = keys::user_prefix(user);
        let mut out = Vec::new();
        for entry in self.tokens.scan_prefix(&prefix) {
            let (key, _) = entry?;
            let device =
                keys::device_of(&key, prefix.len()).ok_or_else(|| StoreError::Corrupt {
                    tree: "tokens",
                    reason: "a key that does not end in a device name".into(),
                })?;
            let record = match self.devices.get(&key)? {
                Some(v) => decode("devices", &v)?,
                None => DeviceRecord::default(),
            };
            out.push((device, record));
        }
        Ok(out)
    }

    /// Deletes `user`'s account, its devices' tokens and records. The name is free from here
    /// on (the caller clears what else the user owned).
    pub fn delete(&self, user: &UserId) -> Result<(), StoreError> {
        {
            let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
            self.users.remove(keys::user(user))?;
            known.remove(user);
        }
        let prefix = keys::user_prefix(user);
        for tree in [&self.tokens, &self.devices] {
            for entry in tree.scan_prefix(&prefix) {
                tree.remove(entry?.0)?;
            }
        }
        Ok(())
    }

    /// Records that `plugins` must be told of `user`'s deletion `id` (made at `at`), until
    /// each handled it ([`Accounts::notice_handled`]).
    pub fn notice_deletion(
        &self,
        id: u64,
        user: &UserId,
        at: u64,
        plugins: &[String],
    ) -> Result<(), StoreError> {
        for plugin in plugins {
            self.notices
                .insert(keys::deletion_notice(id, plugin), encode(&(user, at)))?;
        }
        Ok(())
    }

    /// Plugin `plugin` is done with deletion `id`'s notice (handled, refused or set aside).
    pub fn notice_handled(&self, id: u64, plugin: &str) -> Result<(), StoreError> {
        self.notices.remove(keys::deletion_notice(id, plugin))?;
        Ok(())
    }

    /// Every deletion notice not handled yet: (deletion id, plugin, user, when).
    pub fn pending_notices(&self) -> Result<Vec<(u64, String, UserId, u64)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.notices.iter() {
            let (key, value) = entry?;
            let (user, at): (UserId, u64) = decode("deletion_notices", &value)?;
            let (id, plugin) =
                keys::deletion_notice_parts(&key).ok_or_else(|| StoreError::Corrupt {
                    tree: "deletion_notices",
                    reason: "a key that is not a deletion and a plugin".into(),
                })?;
            out.push((id, plugin, user, at));
        }
        Ok(out)
    }
}
