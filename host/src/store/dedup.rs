//! The value of a dedup chunk ([`super::keys::dedup_chunk`]): the dedup records of up to 256 client
//! ids of one device, each `low byte, message id, sent at` (17 bytes, numbers big-endian),
//! sorted by low byte, each low byte once. A look-up is a binary search in place; nothing is
//! decoded. In memory, until they are saved, the records are held by chunk too ([`Held`]).

use super::StoreError;

/// One record's bytes.
const RECORD: usize = 17;

/// A record of a chunk: (message id, sent at).
pub(super) type Record = (u64, u64);

/// A chunk's key and records of it, each at its place (the client id's low byte).
pub(super) type ChunkRecords<'a> = (&'a [u8], &'a [(u8, Record)]);

/// Dedup records held in memory, by chunk: one key and one small vector for up to 256
/// records of a device, not a key each.
#[derive(Debug, Default, Clone)]
pub(super) struct Held {
    chunks: std::collections::HashMap<Vec<u8>, Vec<(u8, Record)>>,
    records: usize,
}

impl Held {
    /// Holds `record` at place `low` of `chunk` (a record there is replaced: the same one,
    /// when a snapshot copies a message's record).
    pub(super) fn insert(&mut self, chunk: Vec<u8>, low: u8, record: Record) {
        let places = self.chunks.entry(chunk).or_default();
        match places.iter_mut().find(|(at, _)| *at == low) {
            Some(place) => place.1 = record,
            None => {
                places.push((low, record));
                self.records += 1;
            }
        }
    }

    /// The record at place `low` of `chunk`, if held.
    pub(super) fn get(&self, chunk: &[u8], low: u8) -> Option<Record> {
        let places = self.chunks.get(chunk)?;
        places.iter().find(|(at, _)| *at == low).map(|(_, r)| *r)
    }

    /// Lets go of the chunks whose keys start with `prefix`.
    pub(super) fn forget(&mut self, prefix: &[u8]) {
        let mut gone = 0;
        self.chunks.retain(|chunk, places| {
            let keep = !chunk.starts_with(prefix);
            gone += if keep { 0 } else { places.len() };
            keep
        });
        self.records -= gone;
    }

    /// How many records are held.
    pub(super) fn len(&self) -> usize {
        self.records
    }

    pub(super) fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Holds what `other` holds too, where this holds nothing at its place.
    pub(super) fn absorb(&mut self, other: &Held) {
        for (chunk, places) in &other.chunks {
            for (low, record) in places {
                if self.get(chunk, *low).is_none() {
                    self.insert(chunk.clone(), *low, *record);
                }
            }
        }
    }

    /// Every chunk held, in the chunks' order (sled's: neighbours are written together).
    pub(super) fn sorted(&self) -> Vec<ChunkRecords<'_>> {
        let mut chunks: Vec<ChunkRecords<'_>> = self
            .chunks
            .iter()
            .map(|(chunk, places)| (chunk.as_slice(), places.as_slice()))
            .collect();
        chunks.sort_unstable_by(|a, b| a.0.cmp(b.0));
        chunks
    }
}

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

/// `chunks` in groups of at most `most_records` records (a chunk holding more is a group of
/// its own) and at most `most_chunks` chunks, in order.
pub(super) fn groups<'a, 'b>(
    chunks: &'b [ChunkRecords<'a>],
    most_records: usize,
    most_chunks: usize,
) -> Vec<&'b [ChunkRecords<'a>]> {
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

/// Saves `chunks` into `tree`: one read and one write of each chunk, in one sled batch. The
/// caller keeps other writers of these chunks away.
pub(super) fn save(tree: &sled::Tree, chunks: &[ChunkRecords<'_>]) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    for (chunk, places) in chunks {
        let old = tree.get(chunk)?;
        batch.insert(*chunk, merge(old.as_deref(), places)?);
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
        let places = vec![(0, (0, 0)); 2000];
        let chunk = |n: usize| -> ChunkRecords<'_> { (b"c", &places[..n]) };
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
    fn held_records_are_found_counted_and_forgotten_by_chunk() {
        let mut held = Held::default();
        held.insert(b"cu\0a".to_vec(), 1, (10, 1));
        held.insert(b"cu\0a".to_vec(), 2, (20, 1));
        held.insert(b"cu\0a".to_vec(), 1, (10, 1));
        held.insert(b"cv\0a".to_vec(), 1, (30, 1));
        assert_eq!(held.len(), 3, "a record held again counts once");
        assert_eq!(held.get(b"cu\0a", 2), Some((20, 1)));
        assert_eq!(held.get(b"cu\0a", 3), None);
        assert_eq!(held.get(b"cw\0a", 1), None);
        let sorted: Vec<&[u8]> = held.sorted().iter().map(|c| c.0).collect();
        assert_eq!(sorted, [&b"cu\0a"[..], &b"cv\0a"[..]]);
        let mut other = Held::default();
        other.insert(b"cu\0a".to_vec(), 2, (99, 9));
        other.insert(b"cu\0a".to_vec(), 4, (40, 1));
        held.absorb(&other);
        assert_eq!(held.len(), 4);
        assert_eq!(held.get(b"cu\0a", 2), Some((20, 1)), "what was held stays");
        held.forget(b"cu\0");
        assert_eq!(held.len(), 1);
        assert_eq!(held.get(b"cv\0a", 1), Some((30, 1)));
        assert!(!held.is_empty());
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
