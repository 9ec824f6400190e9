//! The value of a dedup chunk ([`keys::dedup_chunk`]): the dedup records of up to 256 client
//! ids of one device, each `low byte, message id, sent at` (17 bytes, numbers big-endian),
//! sorted by low byte, each low byte once. A look-up is a binary search in place; nothing is
//! decoded.

use super::{StoreError, keys};

/// One record's bytes.
const RECORD: usize = 17;

/// A record of a chunk: (message id, sent at).
pub(super) type Record = (u64, u64);

/// A chunk's key and the records to save into it, each under its dedup key.
pub(super) type ChunkRecords = (Vec<u8>, Vec<(Vec<u8>, Record)>);

fn corrupt(len: usize) -> StoreError {
    StoreError::Corrupt {
        tree: "messages",
        reason: format!(
            "a dedup chunk of {len} bytes, not a whole number of {RECORD}-byte records"
        ),
    }
}

fn parse(record: &[u8]) -> (u8, Record) {
    let number = |at: usize| {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&record[at..at + 8]);
        u64::from_be_bytes(bytes)
    };
    (record[0], (number(1), number(9)))
}

/// The records of a chunk's value, in order of their low bytes.
pub(super) fn records(value: &[u8]) -> Result<impl Iterator<Item = (u8, Record)> + '_, StoreError> {
    if !value.len().is_multiple_of(RECORD) {
        return Err(corrupt(value.len()));
    }
    Ok(value.chunks_exact(RECORD).map(parse))
}

/// The record of place `low` in a chunk's value.
pub(super) fn find(value: &[u8], low: u8) -> Result<Option<Record>, StoreError> {
    if !value.len().is_multiple_of(RECORD) {
        return Err(corrupt(value.len()));
    }
    let (mut from, mut to) = (0, value.len() / RECORD);
    while from < to {
        let middle = (from + to) / 2;
        let (at, record) = parse(&value[middle * RECORD..(middle + 1) * RECORD]);
        match at.cmp(&low) {
            std::cmp::Ordering::Equal => return Ok(Some(record)),
            std::cmp::Ordering::Less => from = middle + 1,
            std::cmp::Ordering::Greater => to = middle,
        }
    }
    Ok(None)
}

/// A chunk's value holding the records of `old` (a chunk's value, if there was one) and
/// `new`. Where both hold a place, `old`'s record stays: a client id is accepted once, and
/// the record saved first is the one its repeats were answered with.
pub(super) fn merge(old: Option<&[u8]>, new: &[(u8, Record)]) -> Result<Vec<u8>, StoreError> {
    let mut all: std::collections::BTreeMap<u8, Record> = new.iter().copied().collect();
    if let Some(old) = old {
        all.extend(records(old)?);
    }
    let mut value = Vec::with_capacity(all.len() * RECORD);
    for (low, (id, sent_at)) in all {
        value.push(low);
        value.extend_from_slice(&id.to_be_bytes());
        value.extend_from_slice(&sent_at.to_be_bytes());
    }
    Ok(value)
}

/// The records of `records` (dedup keys, as [`keys::dedup`] makes them, and their records) by
/// the chunk that holds them, in the chunks' order.
pub(super) fn by_chunk(records: Vec<(Vec<u8>, Record)>) -> Result<Vec<ChunkRecords>, StoreError> {
    let mut chunks: std::collections::BTreeMap<Vec<u8>, Vec<(Vec<u8>, Record)>> =
        std::collections::BTreeMap::new();
    for (key, record) in records {
        let (chunk, _) = keys::dedup_chunk(&key).ok_or_else(|| StoreError::Corrupt {
            tree: "messages",
            reason: "a dedup record's key that names no chunk".into(),
        })?;
        chunks.entry(chunk).or_default().push((key, record));
    }
    Ok(chunks.into_iter().collect())
}

/// `chunks` in groups of at most `most_records` records (a chunk holding more is a group of
/// its own) and at most `most_chunks` chunks, in order.
pub(super) fn groups(
    chunks: &[ChunkRecords],
    most_records: usize,
    most_chunks: usize,
) -> Vec<&[ChunkRecords]> {
    let mut groups = Vec::new();
    let (mut from, mut records) = (0, 0);
    for (i, (_, of_chunk)) in chunks.iter().enumerate() {
        let full = i - from == most_chunks || records + of_chunk.len() > most_records;
        if i > from && full {
            groups.push(&chunks[from..i]);
            (from, records) = (i, 0);
        }
        records += of_chunk.len();
    }
    if from < chunks.len() {
        groups.push(&chunks[from..]);
    }
    groups
}

/// Saves `chunks` (as [`by_chunk`] groups them) into `tree`: one read and one write of each
/// chunk, in one sled batch. The caller keeps other writers of these chunks away.
pub(super) fn save(tree: &sled::Tree, chunks: &[ChunkRecords]) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    for (chunk, records) in chunks {
        let new: Vec<(u8, Record)> = records
            .iter()
            .filter_map(|(key, record)| Some((*key.last()?, *record)))
            .collect();
        let old = tree.get(chunk)?;
        batch.insert(chunk.as_slice(), merge(old.as_deref(), &new)?);
    }
    tree.apply_batch(batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_records_are_found_and_the_first_saved_stays() {
        let value = merge(None, &[(9, (90, 1)), (3, (30, 1)), (200, (2000, 1))]).expect("merge");
        assert_eq!(value.len(), 3 * RECORD);
        let value =
            merge(Some(&value), &[(3, (31, 2)), (0, (1, 2)), (255, (255, 2))]).expect("merge");
        let all: Vec<_> = records(&value).expect("records").collect();
        assert_eq!(
            all,
            [
                (0, (1, 2)),
                (3, (30, 1)),
                (9, (90, 1)),
                (200, (2000, 1)),
                (255, (255, 2))
            ]
        );
        for (low, record) in &all {
            assert_eq!(find(&value, *low).expect("find"), Some(*record));
        }
        for low in [1, 2, 4, 10, 199, 254] {
            assert_eq!(find(&value, low).expect("find"), None);
        }
        assert_eq!(find(&[], 0).expect("find"), None);
    }

    #[test]
    fn a_full_chunk_finds_every_place() {
        let new: Vec<(u8, Record)> = (0..=255u8)
            .rev()
            .map(|l| (l, (u64::from(l) << 40, 7)))
            .collect();
        let value = merge(None, &new).expect("merge");
        for low in 0..=255u8 {
            assert_eq!(
                find(&value, low).expect("find"),
                Some((u64::from(low) << 40, 7))
            );
        }
    }

    #[test]
    fn groups_hold_few_records_and_few_chunks_and_every_chunk_once() {
        let chunk = |n: usize| (vec![n as u8], vec![(Vec::new(), (0, 0)); n]);
        let chunks: Vec<ChunkRecords> = [256, 256, 256, 256, 256, 3, 1, 1, 1, 1, 1, 500, 600]
            .into_iter()
            .map(chunk)
            .collect();
        let groups = groups(&chunks, 1024, 4);
        let sizes: Vec<Vec<usize>> = groups
            .iter()
            .map(|g| g.iter().map(|c| c.1.len()).collect())
            .collect();
        assert_eq!(
            sizes,
            [
                vec![256, 256, 256, 256],
                vec![256, 3, 1, 1],
                vec![1, 1, 1, 500],
                vec![600]
            ]
        );
        // One chunk over the bound is a group of its own.
        let big = [chunk(2000)];
        assert_eq!(super::groups(&big, 1024, 4).len(), 1);
        assert!(super::groups(&[], 1024, 4).is_empty());
    }

    #[test]
    fn a_cut_value_is_an_error_not_a_panic() {
        let value = merge(None, &[(1, (1, 1))]).expect("merge");
        assert!(matches!(
            find(&value[..16], 1),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(records(&value[..5]).is_err());
        assert!(merge(Some(&value[..1]), &[]).is_err());
    }
}
