//! Each device's cursor into its user's inbox, in the message log ([`super::hot`]).

use super::StoreError;
use super::hot::{Head, Journal};
use iim_proto::{DeviceId, UserId};
use std::sync::Arc;

/// The devices' cursors: how far each has acknowledged its user's inbox.
#[derive(Clone)]
pub struct Cursors {
    journal: Arc<Journal>,
}

impl Cursors {
    pub(super) fn new(journal: &Arc<Journal>) -> Self {
        Self {
            journal: Arc::clone(journal),
        }
    }

    /// The cursors of every device of `user`.
    pub fn of_user(&self, user: &UserId) -> Result<Vec<u64>, StoreError> {
        let inner = self.journal.lock();
        Ok(inner
            .state
            .users
            .get(user)
            .map(|inbox| inbox.cursors.values().copied().collect())
            .unwrap_or_default())
    }

    /// Makes `device` one of the devices whose acknowledgements [`super::Inbox::prune`] waits for,
    /// with nothing acknowledged, unless it is one already.
    pub fn add(&self, user: &UserId, device: &DeviceId) -> Result<(), StoreError> {
        let mut inner = self.journal.lock();
        let has = inner
            .state
            .users
            .get(user)
            .is_some_and(|inbox| inbox.cursors.contains_key(device));
        if !has {
            let head = Head::Cursor {
                user: user.clone(),
                device: device.clone(),
                seq: 0,
            };
            inner.log(head, &[]);
        }
        Ok(())
    }

    /// The position `device` has acknowledged up to (0 for a new device).
    pub fn get(&self, user: &UserId, device: &DeviceId) -> Result<u64, StoreError> {
        let inner = self.journal.lock();
        Ok(inner
            .state
            .users
            .get(user)
            .and_then(|inbox| inbox.cursors.get(device).copied())
            .unwrap_or(0))
    }

    /// Moves `device`'s cursor forward to `seq`; a cursor already past it stays (an old
    /// session's late ack must not move it back).
    pub fn set(&self, user: &UserId, device: &DeviceId, seq: u64) -> Result<(), StoreError> {
        let _busy = crate::metrics::Busy::start(|m| &m.busy_store);
        let mut inner = self.journal.lock();
        let now = inner
            .state
            .users
            .get(user)
            .and_then(|inbox| inbox.cursors.get(device).copied());
        if now.is_none_or(|now| now < seq) {
            let head = Head::Cursor {
                user: user.clone(),
                device: device.clone(),
                seq,
            };
            inner.log(head, &[]);
        }
        Ok(())
    }

    /// Forgets `device`'s cursor (revoked): pruning waits for it no more.
    pub fn remove(&self, user: &UserId, device: &DeviceId) -> Result<(), StoreError> {
        let head = Head::CursorRemoved {
            user: user.clone(),
            device: device.clone(),
        };
        self.journal.lock().log(head, &[]);
        Ok(())
    }

    /// Forgets the cursors of every device of `user` (the account was deleted).
    pub fn forget_user(&self, user: &UserId) -> Result<(), StoreError> {
        let head = Head::ForgetCursors { user: user.clone() };
        self.journal.lock().log(head, &[]);
        Ok(())
    }
}
