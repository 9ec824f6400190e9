//! The plugin's storage: every key is built here, and every value read and written here.
//!
//! The layout (`<user>` and `<device>` are names: 1 to 64 bytes of `a-z 0-9 . _ -`, so never
//! a `/`; `<n>` a sequence number written with 20 digits, so that keys sort by it):
//!
//! | key | value | what |
//! |---|---|---|
//! | `c/<user>/<device>` | the card's bytes, as published | a device's card; absent when unpublished |
//! | `p/<user>/<device>/<n>` | a key package's bytes, as published | one key package waiting; a claim takes the lowest `<n>` |
//!
//! Why so: a device's key packages are one key each, so that a claim takes one with one
//! delete and a publish adds some without rewriting the others; `kv-keys` lists them in the
//! order they were published (`<n>` is one more than the highest waiting, so it restarts at 0
//! once a device's packages are all claimed, which keeps the order). Values are the raw bytes,
//! not base64, so a 16 KiB key package is a 16 KiB value (the host allows 64 KiB).
//!
//! Writes per event, against the host's [`MAX_KV_WRITES_PER_EVENT`]: a publish writes its card
//! and at most [`MAX_PACKAGES_PER_REQUEST`](crate::MAX_PACKAGES_PER_REQUEST) packages; an
//! unpublish deletes a card and at most [`MAX_WAITING`](crate::MAX_WAITING) packages; a claim
//! deletes one package for each of at most [`MAX_NAMES`](crate::MAX_NAMES) devices (checked
//! below, when the crate compiles).
//!
//! Concurrency: every event of one user is handled in order, so a user's own keys are written
//! by one event at a time. A claim deletes *another* user's package: two claims of one device
//! handled at once in two instances could both take the same package, so the plugin must run
//! with one instance (`instances = 1` in its `[host]` table; see the README).

use crate::{MAX_DEVICES, MAX_NAMES, MAX_PACKAGES_PER_REQUEST, MAX_WAITING, MAX_WAITING_PER_USER};
use iim_plugin_sdk::host::{self, MAX_KV_KEYS, MAX_KV_WRITES_PER_EVENT};
use iim_plugin_sdk::{HostError, PluginError};

// What one event writes stays within the host's limit: a publish's packages and its card, an
// unpublish's packages and the card, a claim's packages.
const _: () = assert!(MAX_PACKAGES_PER_REQUEST < MAX_KV_WRITES_PER_EVENT);
const _: () = assert!(MAX_WAITING < MAX_KV_WRITES_PER_EVENT);
const _: () = assert!(MAX_NAMES <= MAX_KV_WRITES_PER_EVENT);
const _: () = assert!(MAX_DEVICES + MAX_WAITING_PER_USER <= MAX_KV_WRITES_PER_EVENT);

/// The keys, built in one place.
mod keys {
    /// A device's card.
    pub fn card(user: &str, device: &str) -> String {
        format!("c/{user}/{device}")
    }

    /// The cards of a user's devices (a prefix).
    pub fn cards(user: &str) -> String {
        format!("c/{user}/")
    }

    /// The key packages of all of a user's devices (a prefix).
    pub fn user_packages(user: &str) -> String {
        format!("p/{user}/")
    }

    /// The key packages of a device (a prefix).
    pub fn packages(user: &str, device: &str) -> String {
        format!("p/{user}/{device}/")
    }

    /// A device's `n`th key package.
    pub fn package(user: &str, device: &str, n: u64) -> String {
        format!("p/{user}/{device}/{n:020}")
    }
}

/// The storage key of a waiting key package, to delete it once it is claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageKey(String);

/// `device`'s card, if it published one.
pub fn card(user: &str, device: &str) -> Result<Option<Vec<u8>>, HostError> {
    host::kv_get(&keys::card(user, device))
}

/// Stores `device`'s card, replacing the one before.
pub fn set_card(user: &str, device: &str, card: &[u8]) -> Result<(), HostError> {
    host::kv_set(&keys::card(user, device), card)
}

/// The devices of `user` that have a card, in byte order.
pub fn devices(user: &str) -> Result<Vec<String>, HostError> {
    let prefix = keys::cards(user);
    Ok(all_keys(&prefix)?
        .into_iter()
        .filter_map(|key| key.strip_prefix(&prefix).map(str::to_owned))
        .collect())
}

/// Every card of `user`'s devices: (device, card), in the devices' byte order.
pub fn cards(user: &str) -> Result<Vec<(String, Vec<u8>)>, HostError> {
    let mut cards = Vec::new();
    for device in devices(user)? {
        // Listed a moment ago, in this event: it is there, unless the host lost it.
        if let Some(card) = card(user, &device)? {
            cards.push((device, card));
        }
    }
    Ok(cards)
}

/// The keys of `device`'s waiting key packages, oldest first.
fn package_keys(user: &str, device: &str) -> Result<Vec<String>, HostError> {
    all_keys(&keys::packages(user, device))
}

/// How many key packages of `device` wait.
pub fn waiting(user: &str, device: &str) -> Result<usize, HostError> {
    Ok(package_keys(user, device)?.len())
}

/// Adds `packages` after those of `device` waiting, in their order.
pub fn add_packages(user: &str, device: &str, packages: &[Vec<u8>]) -> Result<(), PluginError> {
    let prefix = keys::packages(user, device);
    let next = match package_keys(user, device)?.last() {
        None => 0,
        Some(last) => sequence(&prefix, last)? + 1,
    };
    for (n, package) in (next..).zip(packages) {
        host::kv_set(&keys::package(user, device, n), package)?;
    }
    Ok(())
}

/// The oldest key package of `device` waiting, and its key, without taking it.
pub fn oldest_package(
    user: &str,
    device: &str,
) -> Result<Option<(PackageKey, Vec<u8>)>, HostError> {
    let Some(key) = host::kv_keys(&keys::packages(user, device), None, 1)?
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    Ok(host::kv_get(&key)?.map(|package| (PackageKey(key), package)))
}

/// Takes a key package: it is given to no one else.
pub fn take_package(key: &PackageKey) -> Result<(), HostError> {
    host::kv_delete(&key.0)
}

/// Removes `device`'s card and every key package of it waiting; how many packages there were.
pub fn remove_device(user: &str, device: &str) -> Result<usize, HostError> {
    host::kv_delete(&keys::card(user, device))?;
    let packages = package_keys(user, device)?;
    for key in &packages {
        host::kv_delete(key)?;
    }
    Ok(packages.len())
}

/// How many key packages of all of `user`'s devices wait.
pub fn waiting_of_user(user: &str) -> Result<usize, HostError> {
    Ok(all_keys(&keys::user_packages(user))?.len())
}

/// Removes every card and key package of `user` (the account was deleted); how many keys.
/// At most [`MAX_DEVICES`] + [`MAX_WAITING_PER_USER`] writes.
pub fn forget_user(user: &str) -> Result<usize, HostError> {
    let all: Vec<String> = all_keys(&keys::cards(user))?
        .into_iter()
        .chain(all_keys(&keys::user_packages(user))?)
        .collect();
    for key in &all {
        host::kv_delete(key)?;
    }
    Ok(all.len())
}

/// The sequence number of package key `key`, under `prefix`.
fn sequence(prefix: &str, key: &str) -> Result<u64, PluginError> {
    key.strip_prefix(prefix)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| PluginError::Failed(format!("storage key {key:?} is not a key package's")))
}

/// Every key under `prefix`, in byte order.
fn all_keys(prefix: &str) -> Result<Vec<String>, HostError> {
    let mut all = Vec::new();
    loop {
        let keys = host::kv_keys(prefix, all.last().map(String::as_str), MAX_KV_KEYS)?;
        let done = keys.len() < MAX_KV_KEYS as usize;
        all.extend(keys);
        if done {
            return Ok(all);
        }
    }
}
