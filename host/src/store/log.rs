//! The message log's files: numbered segments of framed records, appended in commit rounds,
//! replayed at start.
//!
//! A record is `length (4, little-endian) ‖ crc32 (4) ‖ head length (4) ‖ head ‖ blob`: the
//! length and the CRC-32 cover everything after the CRC. The head says what happened (postcard,
//! read by [`super::hot`]); the blob carries a sealed value (a message), which a reader later
//! finds by its place ([`Loc`]) without decoding the record again. Records are appended to an
//! in-memory tail; a commit round writes the whole tail with one `write` and one `sync_data`.
//! A crash leaves a prefix of the records in order: at start, the first record whose length or
//! CRC does not check ends the log (the segment is cut there), as long as no later segment holds
//! anything — a bad record followed by good ones is corruption, and refused.
//!
//! A segment fills to about [`SEGMENT_BYTES`]; the next round starts the next one. Old segments
//! go when a snapshot (written by [`super::hot`] into a segment of its own) is complete.

use super::StoreError;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The size past which a commit round starts a new segment.
pub(super) const SEGMENT_BYTES: u64 = 64 << 20;

/// The largest record the log reads back: anything longer is a damaged length.
const MAX_RECORD: usize = 256 << 20;

/// Length, CRC and head length.
const FRAME: usize = 12;

/// Where a record's blob is: its segment, its first byte, its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    pub(super) segment: u32,
    pub(super) offset: u64,
    pub(super) len: u32,
}

/// The records appended since the last commit round, and the round being written.
pub(super) struct Tail {
    /// The segment new records go to.
    segment: u32,
    /// Where in it the next record goes.
    end: u64,
    /// Where the records not yet taken by a round start (in `segment`).
    start: u64,
    /// The records not yet taken by a round.
    pending: Vec<u8>,
    /// The round being written: its segment, where it starts, its bytes.
    writing: Option<(u32, u64, Arc<Vec<u8>>)>,
    /// The open segments, for reading.
    files: BTreeMap<u32, Arc<File>>,
    /// The bytes of the segments before `segment`.
    older: u64,
    /// The log's directory.
    dir: PathBuf,
}

/// A round to write: taken from the tail by [`Tail::take`].
pub(super) struct Round {
    start: u64,
    bytes: Arc<Vec<u8>>,
    file: Arc<File>,
    /// A segment made for this round: the directory is synced too.
    new_segment: bool,
}

impl Round {
    /// Whether it has nothing to write.
    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Writes the round and makes it durable.
    pub(super) fn write(&self, dir: &Path) -> std::io::Result<()> {
        if self.bytes.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&self.bytes, self.start)?;
        let metrics = crate::metrics::metrics();
        crate::metrics::timed(&metrics.fsync_seconds, || self.file.sync_data())?;
        if self.new_segment {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

fn segment_path(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("{segment:08}.log"))
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Segments' bytes by number.
type Segments = BTreeMap<u32, Vec<u8>>;

/// One record read back.
pub(super) struct Read<'a> {
    pub(super) head: &'a [u8],
    pub(super) loc: Loc,
}

/// Splits `bytes` (segment `segment`) into records; returns them and where the good records
/// end (the length of `bytes` unless a record is cut off or damaged).
fn records(segment: u32, bytes: &[u8]) -> (Vec<Read<'_>>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= FRAME {
        let word = |i: usize| {
            let b = &bytes[at + i..at + i + 4];
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
        };
        let (len, crc, head_len) = (word(0), word(4) as u32, word(8));
        if !(4..=MAX_RECORD).contains(&len) || head_len > len - 4 || at + 8 + len > bytes.len() {
            break;
        }
        let body = &bytes[at + 8..at + 8 + len];
        if crc32fast::hash(body) != crc {
            break;
        }
        let head = &body[4..4 + head_len];
        let blob = &body[4 + head_len..];
        let blob_at = (at + FRAME + head_len) as u64;
        out.push(Read {
            head,
            loc: Loc {
                segment,
                offset: blob_at,
                len: blob.len() as u32,
            },
        });
        at += 8 + len;
    }
    (out, at)
}

impl Tail {
    /// Opens the log in `dir` (made if missing) and hands every record from segment `from` on
    /// to `each`, in order; segments before `from` are deleted. `from` is chosen by `base`,
    /// which is shown every segment's records first. A record cut off at the end is cut away.
    pub(super) fn open(
        dir: &Path,
        base: impl FnMut(u32, &[Read<'_>]) -> bool,
        mut each: impl FnMut(&Read<'_>) -> Result<(), StoreError>,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io("making the message log's directory", dir))?;
        let segments = Self::segments(dir)?;
        let (from, mut read) = Self::base(dir, &segments, base)?;
        let mut files = BTreeMap::new();
        let (mut segment, mut end) = (from.unwrap_or(1), 0);
        let mut older = 0;
        let mut cut = None;
        for &number in &segments {
            let path = segment_path(dir, number);
            if Some(number) < from {
                std::fs::remove_file(&path).map_err(io("removing an old log segment", &path))?;
                continue;
            }
            let bytes = match read.remove(&number) {
                Some(bytes) => bytes,
                None => std::fs::read(&path).map_err(io("reading a log segment", &path))?,
            };
            if let Some(at) = cut {
                if !bytes.is_empty() {
                    return Err(StoreError::Corrupt {
                        tree: "message log",
                        reason: format!(
                            "segment {number} holds records after a damaged one in segment \
                             {at} (the log's files were changed or the disk lost writes)"
                        ),
                    });
                }
                std::fs::remove_file(&path).map_err(io("removing an empty log segment", &path))?;
                continue;
            }
            let (read, good) = records(number, &bytes);
            for record in &read {
                each(record)?;
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io("opening a log segment", &path))?;
            if good < bytes.len() {
                tracing::warn!(
                    segment = number,
                    at = good,
                    lost = bytes.len() - good,
                    "the message log ends in a record a crash cut off; it is cut away"
                );
                file.set_len(good as u64)
                    .and_then(|()| file.sync_all())
                    .map_err(io("cutting a log segment", &path))?;
                cut = Some(number);
            }
            files.insert(number, Arc::new(file));
            older += end;
            (segment, end) = (number, good as u64);
        }
        if files.is_empty() {
            let path = segment_path(dir, segment);
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io("making a log segment", &path))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing the message log's directory", dir))?;
            files.insert(segment, Arc::new(file));
        }
        Ok(Self {
            segment,
            end,
            start: end,
            pending: Vec::new(),
            writing: None,
            files,
            older,
            dir: dir.to_owned(),
        })
    }

    /// The numbers of the segments in `dir`, in order.
    fn segments(dir: &Path) -> Result<Vec<u32>, StoreError> {
        let mut segments = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io("listing the message log", dir))? {
            let entry = entry.map_err(io("listing the message log", dir))?;
            let name = entry.file_name();
            let Some(number) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            segments.push(number);
        }
        segments.sort_unstable();
        Ok(segments)
    }

    /// The newest segment `base` accepts as where replay starts (a complete snapshot's), and
    /// the bytes of the segments it read on the way (from the newest down to it), which the
    /// replay then does not read again.
    fn base(
        dir: &Path,
        segments: &[u32],
        mut base: impl FnMut(u32, &[Read<'_>]) -> bool,
    ) -> Result<(Option<u32>, Segments), StoreError> {
        let mut read = BTreeMap::new();
        for &number in segments.iter().rev() {
            let path = segment_path(dir, number);
            let bytes = std::fs::read(&path).map_err(io("reading a log segment", &path))?;
            let found = base(number, &records(number, &bytes).0);
            read.insert(number, bytes);
            if found {
                return Ok((Some(number), read));
            }
        }
        Ok((segments.first().copied(), read))
    }

    /// The directory of the log.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends a record; returns where its blob is.
    pub(super) fn append(&mut self, head: &[u8], blob: &[u8]) -> Loc {
        let len = 4 + head.len() + blob.len();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&(head.len() as u32).to_le_bytes());
        hasher.update(head);
        hasher.update(blob);
        self.pending.reserve(8 + len);
        self.pending.extend_from_slice(&(len as u32).to_le_bytes());
        self.pending
            .extend_from_slice(&hasher.finalize().to_le_bytes());
        self.pending
            .extend_from_slice(&(head.len() as u32).to_le_bytes());
        self.pending.extend_from_slice(head);
        let offset = self.end + (FRAME + head.len()) as u64;
        self.pending.extend_from_slice(blob);
        self.end += (8 + len) as u64;
        Loc {
            segment: self.segment,
            offset,
            len: blob.len() as u32,
        }
    }

    /// Takes the pending records as a round to write; records appended after this go to a new
    /// segment if `roll` or if the segment is full. Returns the round and the new segment's
    /// number if one was started.
    pub(super) fn take(&mut self, roll: bool) -> Result<(Round, Option<u32>), StoreError> {
        let bytes = Arc::new(std::mem::take(&mut self.pending));
        let file = Arc::clone(&self.files[&self.segment]);
        let round = Round {
            start: self.start,
            new_segment: self.start == 0 && !bytes.is_empty(),
            bytes: Arc::clone(&bytes),
            file,
        };
        self.writing = Some((self.segment, self.start, bytes));
        self.start = self.end;
        let rolled = if roll || self.end >= SEGMENT_BYTES {
            Some(self.next_segment()?)
        } else {
            None
        };
        Ok((round, rolled))
    }

    /// Starts a new segment (nothing is pending): records appended from now on go to it. Its
    /// file is made now.
    fn next_segment(&mut self) -> Result<u32, StoreError> {
        let number = self.segment + 1;
        let path = segment_path(&self.dir, number);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io("making a log segment", &path))?;
        self.files.insert(number, Arc::new(file));
        self.older += self.end;
        self.segment = number;
        self.end = 0;
        self.start = 0;
        Ok(number)
    }

    /// The round `round` is durable: its bytes are read from its file from now on.
    pub(super) fn written(&mut self, round: &Round) {
        if self
            .writing
            .as_ref()
            .is_some_and(|(_, _, bytes)| Arc::ptr_eq(bytes, &round.bytes))
        {
            self.writing = None;
        }
    }

    /// Deletes the segments before `segment` (a snapshot in it is complete and durable).
    pub(super) fn drop_before(&mut self, segment: u32) -> Result<(), StoreError> {
        let old: Vec<u32> = self.files.range(..segment).map(|(n, _)| *n).collect();
        for number in old {
            if let Some(file) = self.files.remove(&number) {
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                self.older = self.older.saturating_sub(len);
            }
            let path = segment_path(&self.dir, number);
            std::fs::remove_file(&path).map_err(io("removing an old log segment", &path))?;
        }
        Ok(())
    }

    /// The bytes of the log, written or not.
    pub(super) fn size(&self) -> u64 {
        self.older + self.end
    }

    /// A blob's bytes, if they are still in memory (pending or being written); else the file
    /// to read them from.
    pub(super) fn locate(&self, loc: Loc) -> Result<Located, StoreError> {
        let range = |start: u64| {
            let from = (loc.offset - start) as usize;
            from..from + loc.len as usize
        };
        if loc.segment == self.segment && loc.offset >= self.start {
            return Ok(Located::Here(self.pending[range(self.start)].to_vec()));
        }
        if let Some((segment, start, bytes)) = &self.writing
            && loc.segment == *segment
            && loc.offset >= *start
            && loc.offset < start + bytes.len() as u64
        {
            return Ok(Located::Here(bytes[range(*start)].to_vec()));
        }
        match self.files.get(&loc.segment) {
            Some(file) => Ok(Located::File(Arc::clone(file), loc)),
            None => Err(StoreError::Corrupt {
                tree: "message log",
                reason: format!("a record in segment {} that is gone", loc.segment),
            }),
        }
    }
}

/// Where a blob's bytes are ([`Tail::locate`]).
pub(super) enum Located {
    Here(Vec<u8>),
    File(Arc<File>, Loc),
}

impl Located {
    /// The bytes (read from the file if they are there).
    pub(super) fn read(self) -> Result<Vec<u8>, StoreError> {
        match self {
            Located::Here(bytes) => Ok(bytes),
            Located::File(file, loc) => {
                let mut bytes = vec![0; loc.len as usize];
                file.read_exact_at(&mut bytes, loc.offset)
                    .map_err(|source| StoreError::Io {
                        what: "reading the message log",
                        path: PathBuf::from(format!("segment {}", loc.segment)),
                        source,
                    })?;
                Ok(bytes)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record read back: head, blob, place.
    type Seen = (Vec<u8>, Vec<u8>, Loc);

    fn open_all(dir: &Path) -> (Tail, Vec<Seen>) {
        let mut seen = Vec::new();
        let tail = Tail::open(
            dir,
            |_, _| false,
            |r| {
                seen.push((r.head.to_vec(), r.loc));
                Ok(())
            },
        )
        .expect("open");
        let seen = seen
            .into_iter()
            .map(|(head, loc)| {
                let blob = tail.locate(loc).expect("locate").read().expect("read");
                (head, blob, loc)
            })
            .collect();
        (tail, seen)
    }

    fn commit(tail: &mut Tail) {
        commit_rolling(tail, false);
    }

    fn commit_rolling(tail: &mut Tail, roll: bool) {
        let (round, _) = tail.take(roll).expect("take");
        round.write(&tail.dir.clone()).expect("write");
        tail.written(&round);
    }

    #[test]
    fn records_come_back_in_order_from_memory_and_from_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut tail, seen) = open_all(dir.path());
        assert!(seen.is_empty());
        let a = tail.append(b"h1", b"first");
        let b = tail.append(b"h2", b"");
        let Located::Here(bytes) = tail.locate(a).expect("locate") else {
            panic!("pending records are read from memory")
        };
        assert_eq!(bytes, b"first");
        commit(&mut tail);
        assert_eq!(
            tail.locate(a).expect("locate").read().expect("read"),
            b"first"
        );
        let c = tail.append(b"h3", b"third");
        commit(&mut tail);
        drop(tail);
        let (tail, seen) = open_all(dir.path());
        let heads: Vec<&[u8]> = seen.iter().map(|(h, _, _)| h.as_slice()).collect();
        assert_eq!(heads, [&b"h1"[..], b"h2", b"h3"]);
        assert_eq!(seen[1].2, b);
        assert_eq!(seen[2].2, c);
        assert_eq!(
            tail.locate(c).expect("locate").read().expect("read"),
            b"third"
        );
    }

    #[test]
    fn a_record_a_crash_cut_off_ends_the_log_and_a_damaged_one_before_others_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut tail, _) = open_all(dir.path());
        tail.append(b"h1", b"one");
        tail.append(b"h2", b"two");
        commit(&mut tail);
        drop(tail);
        let path = segment_path(dir.path(), 1);
        let whole = std::fs::read(&path).expect("read");
        // Every cut of the last record leaves the first alone.
        for cut in 1..(whole.len() - 18) {
            std::fs::write(&path, &whole[..whole.len() - cut]).expect("write");
            let (mut tail, seen) = open_all(dir.path());
            assert_eq!(seen.len(), 1, "cut {cut}");
            // Appending after the cut works, and is read back.
            tail.append(b"h3", b"three");
            commit(&mut tail);
            drop(tail);
            let (_, seen) = open_all(dir.path());
            let heads: Vec<&[u8]> = seen.iter().map(|(h, _, _)| h.as_slice()).collect();
            assert_eq!(heads, [&b"h1"[..], b"h3"], "cut {cut}");
        }
        // A flipped byte in the first record, with a good one in a later segment: refused.
        let mut damaged = whole.clone();
        damaged[14] ^= 1;
        std::fs::write(&path, &damaged).expect("write");
        std::fs::write(segment_path(dir.path(), 2), &whole).expect("write");
        let err = Tail::open(dir.path(), |_, _| false, |_| Ok(()))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("after a damaged one"), "{err}");
    }

    #[test]
    fn replay_starts_at_the_segment_base_chooses_and_older_ones_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut tail, _) = open_all(dir.path());
        tail.append(b"old", b"");
        commit_rolling(&mut tail, true);
        tail.append(b"base", b"");
        tail.append(b"new", b"x");
        commit(&mut tail);
        drop(tail);
        let mut seen = Vec::new();
        let tail = Tail::open(
            dir.path(),
            |_, records| records.first().is_some_and(|r| r.head == b"base"),
            |r| {
                seen.push(r.head.to_vec());
                Ok(())
            },
        )
        .expect("open");
        assert_eq!(seen, [b"base".to_vec(), b"new".to_vec()]);
        assert!(!segment_path(dir.path(), 1).exists());
        assert_eq!(tail.segment, 2);
    }
}
