//! Accepted messages: dispatch, group and time-to-live records in the message log
//! ([`super::hot`]); dedup and effect records in sled's `messages` tree; the numbering of
//! message ids.
//!
//! A submission is one `Accepted` record; its dedup record reaches sled only once that record
//! is durable (see [`super::hot`]).

use super::hot::{Head, Journal};
use super::{Ids, Sealer, StoreError, decode, encode, keys};
use iim_proto::{DeviceId, Message, MessageId, UserId};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What [`Messages::accept`] did with a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    /// The message is new; it is stored and waiting for dispatch.
    New(Message),
    /// The same `(user, device, client id)` was accepted before.
    Duplicate {
        /// The first submission's id.
        id: MessageId,
        /// When the first submission was accepted.
        sent_at: u64,
        /// The first submission, if its dispatch has not finished (it is dispatched again).
        pending: Option<Message>,
    },
}

/// A dispatch record: an accepted message not yet in all its recipients' inboxes.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Dispatch {
    /// The client id it was submitted with, for a client's submission: its dedup record is
    /// `(message.from, message.from_device, client_id)`.
    pub(super) client_id: Option<u64>,
    /// The message.
    pub(super) message: Message,
}

/// The accepted messages of a host and the numbering of their ids.
#[derive(Clone)]
pub struct Messages {
    ids: Ids,
    pub(super) tree: sled::Tree,
    /// Dispatch records are sealed: they hold the message.
    sealer: Sealer,
    /// The dispatch records.
    journal: Arc<Journal>,
    /// Held from choosing a message id to committing the message, so that ids follow the
    /// order in which messages are accepted.
    accept_order: Arc<Mutex<()>>,
    /// The bits of every message id above `iim_proto::peer::ID_BITS`: this host's number in
    /// its network (0 alone).
    id_prefix: Arc<AtomicU64>,
}

impl Messages {
    pub(super) fn new(
        db: &sled::Db,
        ids: Ids,
        sealer: &Sealer,
        journal: &Arc<Journal>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            ids,
            tree: db.open_tree("messages")?,
            sealer: sealer.clone(),
            journal: Arc::clone(journal),
            accept_order: Arc::default(),
            id_prefix: Arc::default(),
        })
    }

    /// Numbers every message from now on with `number`, this host's number in its network
    /// (the bits of its id above `iim_proto::peer::ID_BITS`).
    pub fn use_host_number(&self, number: u16) {
        self.id_prefix.store(
            u64::from(number) << iim_proto::peer::ID_BITS,
            Ordering::Relaxed,
        );
    }

    /// A new message id: this host's number in the high bits, then a number that grows (the
    /// caller holds `accept_order`).
    fn next_id(&self) -> Result<MessageId, StoreError> {
        let prefix = self.id_prefix.load(Ordering::Relaxed);
        Ok(MessageId(prefix | (self.ids.next()? + 1)))
    }

    /// A new id, in the order of message ids, for something the host numbers that is not a
    /// message (an account's deletion).
    pub fn new_id(&self) -> Result<MessageId, StoreError> {
        let _order = self.accept_order.lock().unwrap_or_else(|p| p.into_inner());
        self.next_id()
    }

    /// Stores a submission unless the same `(user, device, client_id)` was stored before.
    ///
    /// `build` makes the message from the id assigned to it. The new message is recorded for
    /// dispatch; it is durable after the next [`super::Store::flush`].
    pub fn accept(
        &self,
        user: &UserId,
        device: &DeviceId,
        client_id: u64,
        expires_at: Option<u64>,
        build: impl FnOnce(MessageId) -> Message,
    ) -> Result<Acceptance, StoreError> {
        let _busy = crate::metrics::Busy::start(|m| &m.busy_store);
        let (chunk, low) = keys::dedup_chunk_of(user, device, client_id);
        let _order = self.accept_order.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = self.dedup(&chunk, low)? {
            return self.duplicate(existing);
        }
        let message = build(self.next_id()?);
        let head = Head::Accepted {
            id: message.id.0,
            client: Some((user.clone(), device.clone(), client_id)),
            sent_at: message.sent_at,
            expires_at,
        };
        let dispatch = Dispatch {
            client_id: Some(client_id),
            message,
        };
        let sealed = self.seal(&dispatch);
        self.journal.lock().log(head, &sealed);
        Ok(Acceptance::New(dispatch.message))
    }

    /// The dedup record at place `low` of `chunk`: (message id, sent at).
    fn dedup(&self, chunk: &[u8], low: u8) -> Result<Option<(u64, u64)>, StoreError> {
        if let Some(found) = self.journal.lock().state.dedup(chunk, low) {
            return Ok(Some(found));
        }
        match self.tree.get(chunk)? {
            Some(value) => super::dedup::find(&value, low),
            None => Ok(None),
        }
    }

    /// When message `id` expires, if it was submitted with its own time to live.
    pub fn expiry(&self, id: MessageId) -> Result<Option<u64>, StoreError> {
        Ok(self.journal.lock().state.ttl.get(&id.0).copied())
    }

    fn duplicate(&self, (id, sent_at): (u64, u64)) -> Result<Acceptance, StoreError> {
        let pending = self.read_pending(id)?.map(|d| d.message);
        Ok(Acceptance::Duplicate {
            id: MessageId(id),
            sent_at,
            pending,
        })
    }

    /// A new message a plugin sends while handling a durable event: numbered once per
    /// `(plugin, event_key, index)`, so handling the event again yields the same message.
    pub fn effect(
        &self,
        plugin: &str,
        event_key: &[u8],
        index: u32,
        build: impl FnOnce(MessageId) -> Message,
    ) -> Result<Message, StoreError> {
        let _busy = crate::metrics::Busy::start(|m| &m.busy_store);
        let key = keys::effect(plugin, event_key, index);
        let _order = self.accept_order.lock().unwrap_or_else(|p| p.into_inner());
        let mut message = build(MessageId(0));
        if let Some(existing) = self.tree.get(&key)? {
            let (id, sent_at) = decode::<(u64, u64)>("messages", &existing)?;
            message.id = MessageId(id);
            message.sent_at = sent_at;
            return Ok(message);
        }
        message.id = self.next_id()?;
        self.tree
            .insert(key, encode(&(message.id.0, message.sent_at)))?;
        Ok(message)
    }

    /// A new message a plugin sends while handling an event that does not outlive the
    /// process: numbered, not recorded.
    pub fn number(&self, build: impl FnOnce(MessageId) -> Message) -> Result<Message, StoreError> {
        let _order = self.accept_order.lock().unwrap_or_else(|p| p.into_inner());
        Ok(build(self.next_id()?))
    }

    /// The dispatch record of message `id`, if it is pending.
    fn read_pending(&self, id: u64) -> Result<Option<Dispatch>, StoreError> {
        let located = {
            let inner = self.journal.lock();
            match inner.state.pending.get(&id) {
                Some(p) => inner.tail.locate(p.loc)?,
                None => return Ok(None),
            }
        };
        self.open(&keys::dispatch(id), &located.read()?).map(Some)
    }

    /// Every accepted message whose dispatch did not finish: a group's message whose effects
    /// were being applied ([`Messages::applying`]) first, then oldest first.
    pub fn pending(&self) -> Result<Vec<Message>, StoreError> {
        let (applying, found) = {
            let inner = self.journal.lock();
            let applying: std::collections::HashSet<u64> =
                inner.state.applying.values().copied().collect();
            let mut found = Vec::with_capacity(inner.state.pending.len());
            for (id, p) in &inner.state.pending {
                found.push((*id, inner.tail.locate(p.loc)?));
            }
            (applying, found)
        };
        let mut pending = found
            .into_iter()
            .map(|(id, located)| Ok(self.open(&keys::dispatch(id), &located.read()?)?.message))
            .collect::<Result<Vec<_>, StoreError>>()?;
        // A group's message whose effects a crash cut off first, then by id (a stable sort).
        pending.sort_by_key(|m| !applying.contains(&m.id.0));
        Ok(pending)
    }

    /// Records that the effects of handling message `id` of `group` are about to be applied
    /// (written before them): of the messages of a group still recorded for dispatch after a
    /// crash, only this one can have reached some members and not others, so it goes first
    /// (see [`Messages::pending`]) and every member keeps one order.
    pub fn applying(&self, group: &iim_proto::GroupId, id: MessageId) -> Result<(), StoreError> {
        let head = Head::Applying {
            group: group.clone(),
            id: id.0,
        };
        self.journal.lock().log(head, &[]);
        Ok(())
    }

    /// Forgets the dedup records of `user`'s devices (the account was deleted). Its messages
    /// still on their way are the recipients' and go on.
    pub fn forget_user(&self, user: &iim_proto::UserId) -> Result<(), StoreError> {
        self.journal.forget_dedups(user, &self.tree)
    }

    /// Whether message `id` is still recorded for dispatch.
    pub fn is_pending(&self, id: MessageId) -> Result<bool, StoreError> {
        Ok(self.journal.lock().state.pending.contains_key(&id.0))
    }

    /// Records that message `id` is in every recipient's inbox.
    pub fn dispatched(&self, id: MessageId) -> Result<(), StoreError> {
        let _busy = crate::metrics::Busy::start(|m| &m.busy_store);
        let mut inner = self.journal.lock();
        if inner.state.pending.contains_key(&id.0) {
            inner.log(Head::Dispatched { id: id.0 }, &[]);
        }
        Ok(())
    }

    /// Records `message` for dispatch again (a dead letter handed back): from here on it is a
    /// pending message like any other.
    pub fn redispatch(&self, message: &Message) -> Result<(), StoreError> {
        let dispatch = Dispatch {
            client_id: None,
            message: message.clone(),
        };
        let head = Head::Accepted {
            id: message.id.0,
            client: None,
            sent_at: message.sent_at,
            expires_at: None,
        };
        let sealed = self.seal(&dispatch);
        self.journal.lock().log(head, &sealed);
        Ok(())
    }

    /// A dispatch record as stored.
    fn seal(&self, dispatch: &Dispatch) -> Vec<u8> {
        let key = keys::dispatch(dispatch.message.id.0);
        self.sealer.seal("messages", &key, encode(dispatch))
    }

    /// The dispatch record stored under `key`.
    pub(super) fn open(&self, key: &[u8], stored: &[u8]) -> Result<Dispatch, StoreError> {
        decode("messages", &self.sealer.open("messages", key, stored)?)
    }
}
