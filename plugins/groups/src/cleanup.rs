//! Deleting what a group no longer needs, a few hundred keys per event.
//!
//! An event may write 256 keys, and a deleted group of 10,000 members leaves 20,000 (a member
//! key and an index entry each) plus its receipts; a message whose receipts are no longer kept
//! leaves up to two marks per member. So such deletions are *chores*, recorded under the group
//! (`c/<g>`) and carried out by every later event of that group (any message addressed to it,
//! any delivery of one, such as the `deleted` notice's to each member) with the writes it has
//! left. Until then the keys are harmless: they are of a generation no longer in use, or of a
//! message no longer tracked, and every reader checks.

use crate::store::{Storage, keys};
use iim_plugin_sdk::host::MAX_KV_KEYS;
use iim_plugin_sdk::{MessageId, PluginError};
use serde::{Deserialize, Serialize};

/// Most chores an event looks at: finishing one may cost only reads (its keys are gone
/// already), and an event must end.
const CHORES_PER_EVENT: usize = 16;

/// What is left to delete of a group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chores {
    /// Oldest first.
    pub jobs: Vec<Job>,
}

/// One deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "lowercase")]
pub enum Job {
    /// Every key of a deleted generation of the group: its members (and their index entries
    /// that still name it), its tracked messages, their order and their marks.
    Generation {
        /// The generation.
        generation: u64,
    },
    /// The marks of a message whose receipts are no longer kept.
    Receipts {
        /// The group's generation.
        generation: u64,
        /// The message.
        id: MessageId,
    },
}

/// Adds `job` to `group`'s chores (one write).
pub fn add(store: &mut Storage, group: &str, job: Job) -> Result<(), PluginError> {
    let mut chores: Chores = store.chores(group)?.unwrap_or_default();
    chores.jobs.push(job);
    store.save_chores(group, Some(&chores))
}

/// Carries out `group`'s chores with the writes this event has left, keeping one to record
/// what remains.
pub fn run(store: &mut Storage, group: &str) -> Result<(), PluginError> {
    let Some(mut chores) = store.chores::<Chores>(group)? else {
        return Ok(());
    };
    let mut finished = 0;
    while let Some(job) = chores.jobs.get(finished) {
        if finished >= CHORES_PER_EVENT || budget(store) == 0 {
            break;
        }
        let done = match *job {
            Job::Generation { generation } => generation_gone(store, group, generation)?,
            Job::Receipts { generation, id } => {
                prefix_gone(store, &keys::marks_of(group, generation, id))?
            }
        };
        if !done {
            break;
        }
        finished += 1;
    }
    if finished == 0 {
        return Ok(());
    }
    chores.jobs.drain(..finished);
    if chores.jobs.is_empty() {
        store.save_chores::<Chores>(group, None)
    } else {
        store.save_chores(group, Some(&chores))
    }
}

/// The writes the cleanup may make now: what the event has left, less one for its record.
fn budget(store: &Storage) -> usize {
    store.writes_left().saturating_sub(1)
}

/// Deletes keys under `prefix` while the budget lasts: whether none is left.
fn prefix_gone(store: &mut Storage, prefix: &str) -> Result<bool, PluginError> {
    loop {
        let ask = budget(store).min(MAX_KV_KEYS as usize);
        if ask == 0 {
            return Ok(false);
        }
        // The deletes of this event are seen: each call starts again from the first key left.
        let keys = store.keys(prefix, None, ask as u32)?;
        for key in &keys {
            store.delete(key)?;
        }
        if keys.len() < ask {
            return Ok(true);
        }
    }
}

/// Deletes the keys of a deleted generation while the budget lasts: whether none is left.
fn generation_gone(store: &mut Storage, group: &str, generation: u64) -> Result<bool, PluginError> {
    let prefix = keys::members(group, generation);
    loop {
        // A member may take two writes: its key and its index entry.
        let ask = (budget(store) / 2).min(MAX_KV_KEYS as usize);
        if ask == 0 {
            return Ok(false);
        }
        let members = store.keys(&prefix, None, ask as u32)?;
        for key in &members {
            let user = key.strip_prefix(&prefix).unwrap_or(key);
            // The entry names a newer generation if the user is in the group created again.
            if store.user_entry(user, group)? == Some(generation) {
                store.delete(&keys::user_group(user, group))?;
            }
            store.delete(key)?;
        }
        if members.len() < ask {
            break;
        }
    }
    Ok(prefix_gone(store, &keys::tracked_all(group, generation))?
        && prefix_gone(store, &keys::tracked_order_all(group, generation))?
        && prefix_gone(store, &keys::marks_all(group, generation))?)
}
