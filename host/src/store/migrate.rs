//! Moving a store of an earlier format into the current one: the message path's records, kept
//! in sled up to format 2, go into the message log (format 3); the dedup records, one sled
//! record each up to format 3, go into chunks of up to 256 (format 4); the relay outbox, in
//! sled up to format 4, goes into the message log (format 5).
//!
//! The move writes every record as a snapshot in the log and commits it, then records format
//! 3 in sled and flushes, then clears the old records. A crash before the format is durable
//! leaves format 2 and a log that the next start throws away before moving again; after it,
//! old records left behind are cleared at the next start.

use super::hot::{Head, Journal};
use super::{StoreError, decode, decode_u64, keys};
use iim_proto::{GroupId, Message, UserId};
use std::collections::HashMap;
use std::path::Path;

/// Removes the message log in `dir`, if there is one (a move a crash cut off).
pub(super) fn discard_log(dir: &Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io {
            what: "removing a message log a move cut off",
            path: dir.to_owned(),
            source,
        }),
    }
}

/// Moves the message path's records of a store of format `format` (1 or 2) from sled into
/// `journal`'s log, then marks the store as of the current format.
pub(super) fn into_log(
    db: &sled::Db,
    journal: &Journal,
    sealer: &super::Sealer,
    format: u64,
) -> Result<(), StoreError> {
    let messages = db.open_tree("messages")?;
    let inbox = db.open_tree("inbox")?;
    let cursors = db.open_tree("cursors")?;
    let network = db.open_tree("network")?;
    if format < 2 {
        // Before inboxes were pruned, a device had a cursor only once it acknowledged
        // something; pruning must wait for every device that ever logged in.
        for entry in db.open_tree("tokens")?.iter() {
            let (user_device, _) = entry?;
            let _ =
                cursors.compare_and_swap(&user_device, None::<&[u8]>, Some(&0u64.to_be_bytes()))?;
        }
    }
    let mut moved = 0u64;
    {
        let mut inner = journal.lock();
        inner.log(Head::Snapshot, &[]);
        for entry in messages.iter() {
            let (key, value) = entry?;
            match key.first().copied() {
                Some(keys::DISPATCH) | Some(keys::OLD_DISPATCH) => {
                    let plain = sealer.open("messages", &key, &value)?;
                    let dispatch: super::messages::Dispatch =
                        if key.first() == Some(&keys::DISPATCH) {
                            decode("messages", &plain)?
                        } else {
                            super::messages::Dispatch {
                                client_id: None,
                                message: decode::<Message>("messages", &plain)?,
                            }
                        };
                    let m = &dispatch.message;
                    let id_key = keys::dispatch(m.id.0);
                    let ttl = messages
                        .get(keys::ttl(m.id.0))?
                        .map(|v| decode_u64("messages", &v))
                        .transpose()?;
                    let head = Head::Accepted {
                        id: m.id.0,
                        client: dispatch
                            .client_id
                            .map(|c| (m.from.clone(), m.from_device.clone(), c)),
                        sent_at: m.sent_at,
                        expires_at: ttl,
                    };
                    let blob = sealer.seal("messages", &id_key, super::encode(&dispatch));
                    inner.log(head, &blob);
                    moved += 1;
                }
                Some(keys::TTL) => {
                    let id = keys::number_after_tag(&key).ok_or_else(|| corrupt("a ttl key"))?;
                    let at = decode_u64("messages", &value)?;
                    inner.log(Head::Ttl { id, at }, &[]);
                }
                Some(keys::GROUP_APPLYING) => {
                    let name = std::str::from_utf8(&key[1..]).ok();
                    let group = name.and_then(|n| GroupId::new(n).ok());
                    let group = group.ok_or_else(|| corrupt("a group key"))?;
                    let id = decode_u64("messages", &value)?;
                    inner.log(Head::Applying { group, id }, &[]);
                }
                _ => {}
            }
        }
        // Expiry records: (user, seq) → when; those whose entry a crash cut off still raise
        // the inbox's high water.
        let mut expiries: HashMap<(UserId, u64), u64> = HashMap::new();
        let mut marks: HashMap<UserId, (u64, u64)> = HashMap::new();
        for entry in inbox.scan_prefix(keys::EXPIRY_PREFIX) {
            let (key, _) = entry?;
            let (at, user, seq) =
                keys::expiry_parts(&key).ok_or_else(|| corrupt("an expiry key"))?;
            expiries.insert((user, seq), at);
        }
        for entry in inbox.iter() {
            let (key, value) = entry?;
            match key.first().copied() {
                Some(keys::INBOX_ENTRY) => {
                    let (user, seq) =
                        keys::inbox_parts(&key).ok_or_else(|| corrupt("an inbox key"))?;
                    let plain = sealer.open("inbox", &key, &value)?;
                    let pruned = plain.first() == Some(&0);
                    let message: Message =
                        decode("inbox", if pruned { &plain[1..] } else { &plain })?;
                    let head = Head::Appended {
                        user: user.clone(),
                        seq,
                        id: message.id.0,
                        expires_at: expiries.remove(&(user, seq)),
                        pruned,
                    };
                    inner.log(head, &value);
                    moved += 1;
                }
                Some(keys::INBOX_HIGH) | Some(keys::INBOX_PRUNED) => {
                    let name = std::str::from_utf8(&key[1..]).ok();
                    let user = name.and_then(|n| UserId::new(n).ok());
                    let user = user.ok_or_else(|| corrupt("an inbox mark"))?;
                    let value = decode_u64("inbox", &value)?;
                    let mark = marks.entry(user).or_default();
                    if key.first() == Some(&keys::INBOX_HIGH) {
                        mark.0 = mark.0.max(value);
                    } else {
                        mark.1 = mark.1.max(value);
                    }
                }
                _ => {}
            }
        }
        for ((user, seq), _) in expiries {
            let mark = marks.entry(user).or_default();
            mark.0 = mark.0.max(seq);
        }
        for (user, (high, pruned)) in marks {
            inner.log(Head::Marks { user, high, pruned }, &[]);
        }
        for entry in cursors.iter() {
            let (key, value) = entry?;
            let (user, device) = keys::cursor_parts(&key).ok_or_else(|| corrupt("a cursor key"))?;
            let seq = decode_u64("cursors", &value)?;
            inner.log(Head::Cursor { user, device, seq }, &[]);
        }
        if let Some(seq) = network.get(keys::NET_RELAYED_IN)? {
            let seq = decode_u64("network", &seq)?;
            inner.log(Head::RelayedIn { seq }, &[]);
        }
        inner.log(Head::SnapshotDone, &[]);
    }
    journal.commit()?;
    db.insert(keys::FORMAT, &super::LOG_FORMAT.to_be_bytes())?;
    journal.commit()?;
    // The old records go; a crash now leaves some, which nothing reads.
    for entry in messages.iter() {
        let (key, _) = entry?;
        if matches!(
            key.first().copied(),
            Some(keys::DISPATCH | keys::OLD_DISPATCH | keys::TTL | keys::GROUP_APPLYING)
        ) {
            messages.remove(key)?;
        }
    }
    inbox.clear()?;
    cursors.clear()?;
    network.remove(keys::NET_RELAYED_IN)?;
    journal.commit()?;
    if moved > 0 {
        tracing::info!(
            records = moved,
            "moved the store's messages and inboxes into the message log"
        );
    }
    Ok(())
}

/// Moves the dedup records kept one by one (format 3) into their chunks, then marks the store
/// as of the current format (4), then removes them (and any such record a crash left behind
/// after the format was marked). Saving a record into its chunk keeps a record already there,
/// so a move a crash cut off is simply made again.
pub(super) fn dedup_into_chunks(
    db: &sled::Db,
    journal: &Journal,
    format: u64,
) -> Result<(), StoreError> {
    let messages = db.open_tree("messages")?;
    if format < super::CHUNK_FORMAT {
        let mut moved = 0u64;
        let mut held = super::dedup::Held::default();
        let mut move_held = |held: &mut super::dedup::Held| {
            moved += held.len() as u64;
            let chunks = held.sorted();
            for group in chunks.chunks(1024) {
                super::dedup::save(&messages, group)?;
            }
            drop(chunks);
            *held = super::dedup::Held::default();
            Ok::<_, StoreError>(())
        };
        for entry in messages.scan_prefix(keys::DEDUP_PREFIX) {
            let (key, value) = entry?;
            let (chunk, low) = keys::dedup_chunk(&key).ok_or_else(|| corrupt("a dedup key"))?;
            held.insert(chunk, low, decode::<(u64, u64)>("messages", &value)?);
            // Records of one chunk are next to each other: a chunk may be written twice
            // across two groups, which merging allows.
            if held.len() == 1 << 16 {
                move_held(&mut held)?;
            }
        }
        move_held(&mut held)?;
        journal.commit()?;
        db.insert(keys::FORMAT, &super::FORMAT.to_be_bytes())?;
        journal.commit()?;
        if moved > 0 {
            tracing::info!(records = moved, "moved the dedup records into chunks");
        }
    }
    let mut removed = 0u64;
    for entry in messages.scan_prefix(keys::DEDUP_PREFIX) {
        messages.remove(entry?.0)?;
        removed += 1;
    }
    if removed > 0 {
        journal.commit()?;
    }
    Ok(())
}

/// Moves the relay outbox kept in sled (formats up to 4: its envelopes and the number the
/// exchange acknowledged, in the `network` tree) into the message log, then removes it from
/// sled. Runs whenever sled still holds any of it: the log's records set what they name
/// outright, so a move a crash cut off is simply made again. The sealed envelopes are copied
/// as they are (sealed for the same tree and key).
pub(super) fn outbox_into_log(db: &sled::Db, journal: &Journal) -> Result<(), StoreError> {
    let network = db.open_tree("network")?;
    let acked = super::get_u64(&network, "network", keys::NET_OUTBOX_ACKED)?;
    let mut entries = Vec::new();
    for entry in network.scan_prefix(keys::NET_OUTBOX_PREFIX) {
        let (key, sealed) = entry?;
        let seq = keys::outbox_seq(&key).ok_or_else(|| corrupt("a relay outbox key"))?;
        entries.push((key, seq, sealed));
    }
    if acked.is_none() && entries.is_empty() {
        return Ok(());
    }
    {
        let mut inner = journal.lock();
        for (_, seq, sealed) in &entries {
            inner.log(Head::RelayOut { seq: *seq }, sealed);
        }
        // After the entries: one an acknowledgement's removal left behind goes.
        if let Some(seq) = acked {
            inner.log(Head::RelayAcked { seq }, &[]);
        }
    }
    journal.commit()?;
    for (key, _, _) in &entries {
        network.remove(key)?;
    }
    network.remove(keys::NET_OUTBOX_ACKED)?;
    journal.commit()?;
    tracing::info!(
        envelopes = entries.len(),
        "moved the relay outbox into the message log"
    );
    Ok(())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt {
        tree: "(moving into the message log)",
        reason: format!("{what} that does not decode"),
    }
}
