//! Each device's cursor into its user's inbox (the `cursors` tree).

use super::{StoreError, decode_u64, get_u64, keys};
use iim_proto::{DeviceId, UserId};

/// The devices' cursors: how far each has acknowledged its user's inbox.
#[derive(Clone)]
pub struct Cursors {
    tree: sled::Tree,
}

impl Cursors {
    pub(super) fn new(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            tree: db.open_tree("cursors")?,
        })
    }

    /// Gives every device with a token a cursor (at 0) unless it has one: before inboxes were
    /// pruned, a device had a cursor only once it acknowledged something, and pruning must
    /// wait for every device that ever logged in. A cursor's key is its token's.
    pub(super) fn upgrade(&self, tokens: &sled::Tree) -> Result<(), StoreError> {
        for entry in tokens.iter() {
            let (user_device, _) = entry?;
            let _ = self.tree.compare_and_swap(
                &user_device,
                None::<&[u8]>,
                Some(&0u64.to_be_bytes()),
            )?;
        }
        Ok(())
    }

    /// The cursors of every device of `user`.
    pub fn of_user(&self, user: &UserId) -> Result<Vec<u64>, StoreError> {
        self.tree
            .scan_prefix(keys::cursor_prefix(user))
            .map(|entry| decode_u64("cursors", &entry?.1))
            .collect()
    }

    /// Makes `device` one of the devices whose acknowledgements [`super::Inbox::prune`] waits for,
    /// with nothing acknowledged, unless it is one already.
    pub fn add(&self, user: &UserId, device: &DeviceId) -> Result<(), StoreError> {
        // Taken or not, the device has a cursor now.
        let _ = self.tree.compare_and_swap(
            keys::cursor(user, device),
            None::<&[u8]>,
            Some(&0u64.to_be_bytes()),
        )?;
        Ok(())
    }

    /// The position `device` has acknowledged up to (0 for a new device).
    pub fn get(&self, user: &UserId, device: &DeviceId) -> Result<u64, StoreError> {
        Ok(get_u64(&self.tree, "cursors", keys::cursor(user, device))?.unwrap_or(0))
    }

    /// Moves `device`'s cursor forward to `seq`; a cursor already past it stays (an old
    /// session's late ack must not move it back).
    pub fn set(&self, user: &UserId, device: &DeviceId, seq: u64) -> Result<(), StoreError> {
        let _busy = crate::metrics::Busy::start(|m| &m.busy_store);
        self.tree
            .fetch_and_update(keys::cursor(user, device), |old| {
                let old = old
                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    .map_or(0, u64::from_be_bytes);
                Some(old.max(seq).to_be_bytes().to_vec())
            })?;
        Ok(())
    }

    /// Forgets `device`'s cursor (revoked): pruning waits for it no more.
    pub fn remove(&self, user: &UserId, device: &DeviceId) -> Result<(), StoreError> {
        self.tree.remove(keys::cursor(user, device))?;
        Ok(())
    }

    /// Forgets the cursors of every device of `user` (the account was deleted).
    pub fn forget_user(&self, user: &UserId) -> Result<(), StoreError> {
        for entry in self.tree.scan_prefix(keys::cursor_prefix(user)) {
            self.tree.remove(entry?.0)?;
        }
        Ok(())
    }
}
