//! The plugin's storage: every key is built here, and every record is read and written here.
//!
//! The layout (`<g>` is a group's name without `#`; `<gen>` its *generation*, the id of the
//! request that created it, unique in the network; `<id>` a message id written with 20 digits,
//! so that keys sort by id):
//!
//! | key | value | what |
//! |---|---|---|
//! | `g/<g>` | [`GroupRecord`], JSON | the group now; absent when there is none |
//! | `m/<g>/<gen>/<user>` | role: `owner`, `admin`, `member` | one key per member |
//! | `u/<user>/<g>` | `<gen>`, decimal | the user's groups, for `list` and the limit |
//! | `t/<g>/<gen>/<id>` | [`Tracked`], JSON | a message's receipt counts |
//! | `o/<g>/<gen>/<n>` | `<id>`, decimal | the `n`th message tracked (20 digits), in the group's order |
//! | `k/<g>/<gen>/<id>/d/<user>`, `…/r/<user>` | empty | a member has it, read it |
//! | `c/<g>` | [`Chores`](crate::cleanup::Chores), JSON | what is left to delete |
//!
//! Why so: a group may have 10,000 members and an event may write only 256 keys, so the
//! members are one key each (adding one is one write, listing them is `kv-keys`), not one large
//! value. The generation in the keys is what lets a group be deleted in one event: its record
//! goes, and its keys, now of no generation in use, are deleted a few hundred per event after
//! (`cleanup`); a group created again under the same name starts a new generation, so no old
//! member leaks into it. A user's index entry `u/<user>/<g>` is live only while it names the
//! group's current generation; stale ones are skipped and cleaned lazily.
//!
//! Concurrency: the host hands every event of a group to one instance, in order, so the keys
//! under `g/<g>`, `m/<g>/`, `t/<g>/`, `k/<g>/`, `c/<g>` and every `u/<user>/<g>` are written by
//! that group's events only, and read-modify-write of them is safe. `u/<user>/` as a whole is
//! written by many groups at once (each its own key), and read by the user's `list`: nothing
//! ever reads-modifies-writes a value shared by two groups.

use iim_plugin_sdk::body::GroupRole;
use iim_plugin_sdk::host::{self, MAX_KV_KEYS, MAX_KV_WRITES_PER_EVENT};
use iim_plugin_sdk::{HostError, MessageId, PluginError, UserId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The keys, built in one place.
pub mod keys {
    use iim_plugin_sdk::MessageId;

    /// A group's record.
    pub fn group(group: &str) -> String {
        format!("g/{group}")
    }

    /// The members of a generation of a group (a prefix).
    pub fn members(group: &str, generation: u64) -> String {
        format!("m/{group}/{generation}/")
    }

    /// One member's role.
    pub fn member(group: &str, generation: u64, user: &str) -> String {
        format!("m/{group}/{generation}/{user}")
    }

    /// A user's groups (a prefix).
    pub fn user_groups(user: &str) -> String {
        format!("u/{user}/")
    }

    /// A user's entry for one group.
    pub fn user_group(user: &str, group: &str) -> String {
        format!("u/{user}/{group}")
    }

    /// The tracked messages of a generation of a group (a prefix).
    pub fn tracked_all(group: &str, generation: u64) -> String {
        format!("t/{group}/{generation}/")
    }

    /// A tracked message's counts.
    pub fn tracked(group: &str, generation: u64, id: MessageId) -> String {
        format!("t/{group}/{generation}/{id:020}")
    }

    /// The tracked messages of a generation in the group's order (a prefix): ids do not say
    /// it, as each is numbered by its sender's host.
    pub fn tracked_order_all(group: &str, generation: u64) -> String {
        format!("o/{group}/{generation}/")
    }

    /// The `n`th message tracked.
    pub fn tracked_order(group: &str, generation: u64, n: u64) -> String {
        format!("o/{group}/{generation}/{n:020}")
    }

    /// Every mark of a generation of a group (a prefix).
    pub fn marks_all(group: &str, generation: u64) -> String {
        format!("k/{group}/{generation}/")
    }

    /// Every mark of one message (a prefix).
    pub fn marks_of(group: &str, generation: u64, id: MessageId) -> String {
        format!("k/{group}/{generation}/{id:020}/")
    }

    /// The marks of one kind of one message (a prefix).
    pub fn marks(group: &str, generation: u64, id: MessageId, mark: super::Mark) -> String {
        format!("k/{group}/{generation}/{id:020}/{}/", mark.letter())
    }

    /// `user`'s mark of one kind on one message.
    pub fn mark(
        group: &str,
        generation: u64,
        id: MessageId,
        mark: super::Mark,
        user: &str,
    ) -> String {
        format!("{}{user}", marks(group, generation, id, mark))
    }

    /// What is left to delete of a group's old keys.
    pub fn chores(group: &str) -> String {
        format!("c/{group}")
    }
}

/// A group as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Its title.
    pub title: String,
    /// Its owner.
    pub owner: UserId,
    /// How many members it has, the owner included.
    pub members: u32,
    /// The id of the request that created it: the generation its keys are under.
    pub generation: u64,
    /// How many of its messages have receipt counts kept (`t/` keys).
    #[serde(default)]
    pub tracked: u32,
    /// How many of its messages were ever tracked: the next one's place in the `o/` keys.
    #[serde(default)]
    pub tracked_ever: u64,
}

/// The receipt counts of one message of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracked {
    /// Who sent it.
    pub sender: UserId,
    /// The members it was sent to, the sender not counted.
    pub members: u32,
    /// Members with a device that has it.
    pub delivered: u32,
    /// Members who reported reading it.
    pub read: u32,
}

/// What a mark records of a member and a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// A device of the member has it.
    Delivered,
    /// The member reported reading it.
    Read,
}

impl Mark {
    fn letter(self) -> char {
        match self {
            Mark::Delivered => 'd',
            Mark::Read => 'r',
        }
    }
}

/// The plugin's storage as one event sees it: reads, and writes counted against the host's
/// limit per event, so that the cleanup knows how many it may still make.
#[derive(Debug, Default)]
pub struct Storage {
    writes: usize,
}

impl Storage {
    /// The storage at the start of an event: no write made yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many writes this event may still make.
    pub fn writes_left(&self) -> usize {
        MAX_KV_WRITES_PER_EVENT.saturating_sub(self.writes)
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), HostError> {
        host::kv_set(key, value)?;
        self.writes += 1;
        Ok(())
    }

    /// Deletes `key`: one write.
    pub fn delete(&mut self, key: &str) -> Result<(), HostError> {
        host::kv_delete(key)?;
        self.writes += 1;
        Ok(())
    }

    fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, PluginError> {
        match host::kv_get(key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| PluginError::Failed(format!("stored {key} is not valid: {e}"))),
        }
    }

    fn set_json<T: Serialize>(&mut self, key: &str, value: &T) -> Result<(), PluginError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| PluginError::Failed(format!("cannot encode {key}: {e}")))?;
        Ok(self.set(key, &bytes)?)
    }

    /// The keys under `prefix`, after `after`, at most `limit` (one call).
    pub fn keys(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, HostError> {
        host::kv_keys(prefix, after, limit)
    }

    /// Every key under `prefix`, without the prefix, in order: a call per 1000.
    pub fn all_under(&self, prefix: &str) -> Result<Vec<String>, HostError> {
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = host::kv_keys(prefix, after.as_deref(), MAX_KV_KEYS)?;
            let full = page.len() >= MAX_KV_KEYS as usize;
            after = page.last().cloned();
            found.extend(
                page.into_iter()
                    .filter_map(|key| key.strip_prefix(prefix).map(str::to_owned)),
            );
            if !full {
                return Ok(found);
            }
        }
    }

    // ----- Groups and their members -----

    /// Group `group`'s record, if it exists.
    pub fn group(&self, group: &str) -> Result<Option<GroupRecord>, PluginError> {
        self.get_json(&keys::group(group))
    }

    /// Writes group `group`'s record.
    pub fn save_group(&mut self, group: &str, record: &GroupRecord) -> Result<(), PluginError> {
        self.set_json(&keys::group(group), record)
    }

    /// Deletes group `group`'s record (one write): its other keys stay until the cleanup.
    pub fn delete_group(&mut self, group: &str) -> Result<(), HostError> {
        self.delete(&keys::group(group))
    }

    /// `user`'s role in generation `generation` of `group`, if a member.
    pub fn role(
        &self,
        group: &str,
        generation: u64,
        user: &str,
    ) -> Result<Option<GroupRole>, PluginError> {
        let key = keys::member(group, generation, user);
        match host::kv_get(&key)? {
            None => Ok(None),
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.parse().ok())
                .map(Some)
                .ok_or_else(|| PluginError::Failed(format!("stored {key} is not a role"))),
        }
    }

    /// Sets the role of `user`, a member already (one write).
    pub fn set_role(
        &mut self,
        group: &str,
        generation: u64,
        user: &str,
        role: GroupRole,
    ) -> Result<(), HostError> {
        let key = keys::member(group, generation, user);
        self.set(&key, role.to_string().as_bytes())
    }

    /// Makes `user` a member with `role`, and puts the group in the user's index: two writes.
    pub fn add_member(
        &mut self,
        group: &str,
        generation: u64,
        user: &str,
        role: GroupRole,
    ) -> Result<(), HostError> {
        self.set_role(group, generation, user, role)?;
        self.set(
            &keys::user_group(user, group),
            generation.to_string().as_bytes(),
        )
    }

    /// Takes `user` out of the group and its index: two writes.
    pub fn remove_member(
        &mut self,
        group: &str,
        generation: u64,
        user: &str,
    ) -> Result<(), HostError> {
        self.delete(&keys::member(group, generation, user))?;
        self.delete(&keys::user_group(user, group))
    }

    /// Every member of generation `generation` of `group`, by name: a call per 1000.
    pub fn members(&self, group: &str, generation: u64) -> Result<Vec<UserId>, HostError> {
        self.all_under(&keys::members(group, generation))
    }

    // ----- A user's groups -----

    /// The generation `user`'s index entry for `group` names, if there is one.
    pub fn user_entry(&self, user: &str, group: &str) -> Result<Option<u64>, HostError> {
        Ok(host::kv_get(&keys::user_group(user, group))?
            .and_then(|bytes| std::str::from_utf8(&bytes).ok()?.parse().ok()))
    }

    /// The group and its record if `user`'s entry for it is live: it names the group's
    /// generation now (a deleted group's entries stay behind until the cleanup, and a group
    /// created again has a new generation).
    pub fn live_entry(&self, user: &str, group: &str) -> Result<Option<GroupRecord>, PluginError> {
        let Some(generation) = self.user_entry(user, group)? else {
            return Ok(None);
        };
        Ok(self
            .group(group)?
            .filter(|record| record.generation == generation))
    }

    /// Whether `user` is in `max` groups or more. The index is counted first, as it is fast;
    /// only if it has `max` entries or more are they checked one by one, as some may be of
    /// deleted groups.
    pub fn in_max_groups(&self, user: &str, max: u32) -> Result<bool, PluginError> {
        let prefix = keys::user_groups(user);
        let mut entries = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = host::kv_keys(&prefix, after.as_deref(), MAX_KV_KEYS)?;
            let full = page.len() >= MAX_KV_KEYS as usize;
            after = page.last().cloned();
            entries.extend(page);
            if !full {
                break;
            }
        }
        if entries.len() < max as usize {
            return Ok(false);
        }
        let mut live = 0;
        for key in &entries {
            let group = key.strip_prefix(&prefix).unwrap_or(key);
            if self.live_entry(user, group)?.is_some() {
                live += 1;
                if live >= max {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    // ----- Receipts -----

    /// The counts of message `id` of the group, if they are kept.
    pub fn tracked(
        &self,
        group: &str,
        generation: u64,
        id: MessageId,
    ) -> Result<Option<Tracked>, PluginError> {
        self.get_json(&keys::tracked(group, generation, id))
    }

    /// Records that message `id` is the group's `n`th tracked message (one write).
    pub fn track_in_order(
        &mut self,
        group: &str,
        generation: u64,
        n: u64,
        id: MessageId,
    ) -> Result<(), HostError> {
        self.set(
            &keys::tracked_order(group, generation, n),
            id.to_string().as_bytes(),
        )
    }

    /// Writes the counts of message `id` (one write).
    pub fn save_tracked(
        &mut self,
        group: &str,
        generation: u64,
        id: MessageId,
        tracked: &Tracked,
    ) -> Result<(), PluginError> {
        self.set_json(&keys::tracked(group, generation, id), tracked)
    }

    /// Forgets the counts of message `id` (one write); its marks go with the cleanup.
    pub fn delete_tracked(
        &mut self,
        group: &str,
        generation: u64,
        id: MessageId,
    ) -> Result<(), HostError> {
        self.delete(&keys::tracked(group, generation, id))
    }

    /// The tracked message first in the group's order, the oldest, with its `o/` key; forgets
    /// that key (one write). A key whose value does not read (none is written so) is dropped.
    pub fn take_oldest_tracked(
        &mut self,
        group: &str,
        generation: u64,
    ) -> Result<Option<MessageId>, HostError> {
        let prefix = keys::tracked_order_all(group, generation);
        let Some(key) = host::kv_keys(&prefix, None, 1)?.into_iter().next() else {
            return Ok(None);
        };
        let id = host::kv_get(&key)?
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse().ok());
        self.delete(&key)?;
        Ok(id)
    }

    /// Marks `user` as having message `id` or having read it; `false` if they were already.
    pub fn mark(
        &mut self,
        group: &str,
        generation: u64,
        id: MessageId,
        mark: Mark,
        user: &str,
    ) -> Result<bool, HostError> {
        if self.is_marked(group, generation, id, mark, user)? {
            return Ok(false);
        }
        self.set(&keys::mark(group, generation, id, mark, user), b"")?;
        Ok(true)
    }

    /// Whether `user` is marked so for message `id`.
    pub fn is_marked(
        &self,
        group: &str,
        generation: u64,
        id: MessageId,
        mark: Mark,
        user: &str,
    ) -> Result<bool, HostError> {
        Ok(host::kv_get(&keys::mark(group, generation, id, mark, user))?.is_some())
    }

    /// The members marked so for message `id`, by name.
    pub fn marked(
        &self,
        group: &str,
        generation: u64,
        id: MessageId,
        mark: Mark,
    ) -> Result<Vec<UserId>, HostError> {
        self.all_under(&keys::marks(group, generation, id, mark))
    }

    // ----- Cleanup -----

    /// The cleanup's record of `group`.
    pub fn chores<T: DeserializeOwned>(&self, group: &str) -> Result<Option<T>, PluginError> {
        self.get_json(&keys::chores(group))
    }

    /// Writes (or, with `None`, deletes) the cleanup's record of `group`: one write.
    pub fn save_chores<T: Serialize>(
        &mut self,
        group: &str,
        chores: Option<&T>,
    ) -> Result<(), PluginError> {
        match chores {
            Some(chores) => self.set_json(&keys::chores(group), chores),
            None => Ok(self.delete(&keys::chores(group))?),
        }
    }
}
