//! Files, beside the sled store: a content-addressed blob store in `<data-dir>/files/`.
//!
//! A file is named by the SHA-256 of its bytes (64 lower-case hex digits, its [`FileId`]) and
//! lives at `files/<first two digits>/<id>` once complete. An upload writes to
//! `files/partial/<id>-<size>`, hashing as it goes; a lost connection leaves the partial file,
//! and the next upload of the same bytes goes on from its end ([`Upload::offset`]). When the
//! announced size is reached the hash is checked, the file synced and renamed into place, and
//! the directory synced: a complete file is either whole and verified, or absent. Nothing in
//! `partial/` is ever served.
//!
//! Who may upload or download which file, quotas and how long files stay are decided above
//! this module; it only stores bytes and keeps its promise about them. Its I/O is blocking: an
//! async caller runs it on a blocking thread.

use iim_proto::UserId;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::Notify;

/// A file's name: the SHA-256 of its bytes, in lower-case hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(String);

impl FileId {
    /// The id of a file whose SHA-256 is `digest`.
    pub fn from_digest(digest: &[u8; 32]) -> Self {
        Self(iim_proto::file::hex(digest))
    }

    /// Parses an id as clients write it (64 hex digits; upper case is accepted).
    pub fn parse(text: &str) -> Result<Self, BlobError> {
        match iim_proto::file::parse_hex(text) {
            Some(digest) => Ok(Self::from_digest(&digest)),
            None => Err(BlobError::BadId(text.chars().take(80).collect())),
        }
    }

    /// The SHA-256 the id names.
    pub fn digest(&self) -> [u8; 32] {
        // Made only from a digest (see `parse` and `from_digest`): always 64 hex digits.
        iim_proto::file::parse_hex(&self.0).unwrap_or_default()
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why the blob store could not do what was asked. Nothing but the upload concerned changes.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// Not a file id.
    #[error("not a file id (64 hex digits of a SHA-256): {0:?}")]
    BadId(String),
    /// An upload announced more than the limit.
    #[error("a file of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// The announced size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// More bytes came than the upload announced.
    #[error("more than the announced {size} bytes")]
    Overrun {
        /// The announced size.
        size: u64,
    },
    /// The upload ended before its announced size.
    #[error("{have} of the announced {size} bytes arrived")]
    Incomplete {
        /// Bytes received so far (kept: the upload may go on from there).
        have: u64,
        /// The announced size.
        size: u64,
    },
    /// The bytes do not have the announced SHA-256; what was received is thrown away.
    #[error("the bytes' SHA-256 is {actual}, not the announced {announced}")]
    HashMismatch {
        /// The announced id.
        announced: FileId,
        /// What the bytes hash to.
        actual: FileId,
    },
    /// Another upload of the same file is under way.
    #[error("the file {0} is being uploaded by another connection")]
    Busy(FileId),
    /// The disk failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BlobError + 'a {
    move |source| BlobError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The blob store. Cloning it is cheap: the clones share the uploads in progress.
#[derive(Clone)]
pub struct Blobs {
    dir: PathBuf,
    max_size: u64,
    /// The partial files an [`Upload`] is writing now: one writer each.
    writing: Arc<Mutex<HashSet<PathBuf>>>,
}

impl Blobs {
    /// Opens (creating if need be) the blob store in `dir`, taking files of at most `max_size`
    /// bytes.
    pub fn open(dir: &Path, max_size: u64) -> Result<Self, BlobError> {
        let partial = dir.join("partial");
        fs::create_dir_all(&partial).map_err(io_error("creating", &partial))?;
        Ok(Self {
            dir: dir.to_owned(),
            max_size,
            writing: Arc::default(),
        })
    }

    /// The largest file taken.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    fn complete_path(&self, id: &FileId) -> PathBuf {
        self.dir.join(&id.0[..2]).join(&id.0)
    }

    fn partial_path(&self, id: &FileId, size: u64) -> PathBuf {
        self.dir.join("partial").join(format!("{id}-{size}"))
    }

    /// The size of file `id` if it is complete here.
    pub fn size(&self, id: &FileId) -> Result<Option<u64>, BlobError> {
        let path = self.complete_path(id);
        match fs::metadata(&path) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("reading", &path)(e)),
        }
    }

    /// File `id`, opened for reading from `offset`, and its size; `None` unless it is complete
    /// here.
    pub fn read(&self, id: &FileId, offset: u64) -> Result<Option<(File, u64)>, BlobError> {
        let path = self.complete_path(id);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("opening", &path)(e)),
        };
        let size = file.metadata().map_err(io_error("reading", &path))?.len();
        file.seek(SeekFrom::Start(offset.min(size)))
            .map_err(io_error("reading", &path))?;
        Ok(Some((file, size)))
    }

    /// Starts or resumes the upload of a file of `size` bytes whose SHA-256 is `id`. If the file
    /// is complete here already, says so and takes no bytes; otherwise the upload goes on from
    /// what an earlier, cut-off upload of the same file left ([`Upload::offset`]).
    pub fn upload(&self, id: &FileId, size: u64) -> Result<Begun, BlobError> {
        if size > self.max_size {
            return Err(BlobError::TooLarge {
                size,
                limit: self.max_size,
            });
        }
        if let Some(have) = self.size(id)? {
            return Ok(Begun::Complete { size: have });
        }
        let path = self.partial_path(id, size);
        {
            let mut writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
            if !writing.insert(path.clone()) {
                return Err(BlobError::Busy(id.clone()));
            }
        }
        // From here on the path is ours; the guard gives it back however this ends.
        let claim = Claim {
            writing: Arc::clone(&self.writing),
            path,
        };
        let path = &claim.path;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io_error("opening", path))?;
        // What an earlier upload left is hashed again (the hasher's state was not kept); a
        // partial file longer than announced cannot be this upload's: it starts afresh.
        let mut hasher = Sha256::new();
        let mut have = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(io_error("reading", path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            have += n as u64;
        }
        if have > size {
            file.set_len(0).map_err(io_error("truncating", path))?;
            hasher = Sha256::new();
            have = 0;
        }
        Ok(Begun::Partial(Box::new(Upload {
            blobs: self.clone(),
            id: id.clone(),
            size,
            have,
            hasher,
            file,
            claim,
        })))
    }

    /// Removes file `id` (complete or partial); whether anything was there.
    pub fn remove(&self, id: &FileId) -> Result<bool, BlobError> {
        let path = self.complete_path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("removing", &path)(e)),
        }
    }
}

/// The uploads in progress: for each file, who uploads it and how to stop that upload.
///
/// A phone that loses its network leaves its upload's stream waiting for bytes until the
/// host's idle timeout ends the old connection (and a close may not reach the host at all:
/// quinn does not send it while the congestion window is full). When the same user uploads
/// the same file again meanwhile, the old upload is stopped (what it wrote stays) and the new
/// one goes on from there, instead of being refused as busy for up to that timeout.
#[derive(Default)]
pub struct Uploads {
    running: Mutex<HashMap<FileId, Running>>,
    /// Numbers the uploads, so that one that ended does not unregister its successor.
    numbers: std::sync::atomic::AtomicU64,
}

/// An upload under way: its user, its number, and what stops it.
struct Running {
    user: UserId,
    number: u64,
    stop: Arc<Notify>,
}

impl Uploads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileId, Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers an upload of `id` by `user`: its number, and what stops it.
    pub fn start(&self, id: &FileId, user: &UserId) -> (u64, Arc<Notify>) {
        let n = self
            .numbers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stop = Arc::new(Notify::new());
        let running = Running {
            user: user.clone(),
            number: n,
            stop: Arc::clone(&stop),
        };
        self.lock().insert(id.clone(), running);
        (n, stop)
    }

    /// Stops `user`'s upload of `id`, if one runs: whether one did.
    pub fn stop(&self, id: &FileId, user: &UserId) -> bool {
        match self.lock().get(id) {
            Some(running) if running.user == *user => {
                running.stop.notify_one();
                true
            }
            _ => false,
        }
    }

    /// Upload `n` of `id` ended.
    pub fn end(&self, id: &FileId, n: u64) {
        let mut uploads = self.lock();
        if uploads.get(id).is_some_and(|running| running.number == n) {
            uploads.remove(id);
        }
    }
}

/// How many bytes of an upload are written between two syncs of its partial file.
const SYNC_EVERY: u64 = 8 << 20;

/// What [`Blobs::upload`] found.
#[derive(Debug)]
pub enum Begun {
    /// The file is here already, whole: nothing needs sending.
    Complete {
        /// Its size.
        size: u64,
    },
    /// Bytes are wanted, from [`Upload::offset`] on.
    Partial(Box<Upload>),
}

/// A partial file's single writer, released when the upload ends however it ends.
#[derive(Debug)]
struct Claim {
    writing: Arc<Mutex<HashSet<PathBuf>>>,
    path: PathBuf,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.writing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.path);
    }
}

/// An upload in progress: the only writer of its partial file.
pub struct Upload {
    blobs: Blobs,
    id: FileId,
    size: u64,
    have: u64,
    hasher: Sha256,
    file: File,
    claim: Claim,
}

impl fmt::Debug for Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upload")
            .field("id", &self.id)
            .field("size", &self.size)
            .field("have", &self.have)
            .finish_non_exhaustive()
    }
}

impl Upload {
    /// How many bytes the store has: the sender goes on from here.
    pub fn offset(&self) -> u64 {
        self.have
    }

    /// The announced size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends the next bytes. More than announced is refused, and nothing of them is written.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        if self.have + bytes.len() as u64 > self.size {
            return Err(BlobError::Overrun { size: self.size });
        }
        let path = &self.claim.path;
        self.file
            .write_all(bytes)
            .map_err(io_error("writing", path))?;
        self.hasher.update(bytes);
        let before = self.have;
        self.have += bytes.len() as u64;
        // Synced as it comes, while the next bytes arrive, so that the sync at the end (which
        // the uploader waits for) has little left to write.
        if before / SYNC_EVERY != self.have / SYNC_EVERY {
            self.file.sync_data().map_err(io_error("syncing", path))?;
        }
        Ok(())
    }

    /// Ends the upload once every announced byte came: checks the hash, syncs the file and
    /// moves it into place (and syncs the directory), so that from the moment this returns the
    /// file is durable and served. Short of the size, the bytes stay for a later upload to go
    /// on from; with another hash, they are thrown away.
    pub fn finish(mut self) -> Result<FileId, BlobError> {
        if self.have < self.size {
            // Kept on disk (not synced: a crash may take some back, and the next upload
            // goes on from what is there).
            let _ = self.file.flush();
            return Err(BlobError::Incomplete {
                have: self.have,
                size: self.size,
            });
        }
        let hasher = std::mem::take(&mut self.hasher);
        let actual = FileId::from_digest(&hasher.finalize().into());
        let path = self.claim.path.clone();
        if actual != self.id {
            let _ = fs::remove_file(&path);
            return Err(BlobError::HashMismatch {
                announced: self.id.clone(),
                actual,
            });
        }
        self.file.sync_all().map_err(io_error("syncing", &path))?;
        let target = self.blobs.complete_path(&self.id);
        let parent = target.parent().unwrap_or(&self.blobs.dir).to_owned();
        fs::create_dir_all(&parent).map_err(io_error("creating", &parent))?;
        fs::rename(&path, &target).map_err(io_error("moving into place", &target))?;
        sync_dir(&parent)?;
        Ok(self.id.clone())
    }
}

/// Makes a rename into `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("syncing", dir))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn id_of(bytes: &[u8]) -> FileId {
        FileId::from_digest(&Sha256::digest(bytes).into())
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn partial(begun: Begun) -> Upload {
        match begun {
            Begun::Partial(upload) => *upload,
            Begun::Complete { .. } => panic!("expected an upload"),
        }
    }

    fn read_all(blobs: &Blobs, id: &FileId, offset: u64) -> Option<Vec<u8>> {
        let (mut file, _) = blobs.read(id, offset).unwrap()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        Some(bytes)
    }

    #[test]
    fn an_upload_cut_off_goes_on_from_where_it_stopped_and_only_the_whole_file_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path(), 1 << 20).unwrap();
        let bytes = content(300_000);
        let id = id_of(&bytes);

        let mut first = partial(blobs.upload(&id, bytes.len() as u64).unwrap());
        assert_eq!(first.offset(), 0);
        first.write(&bytes[..123_457]).unwrap();
        assert!(matches!(
            first.finish(),
            Err(BlobError::Incomplete { have: 123_457, .. })
        ));
        assert_eq!(
            read_all(&blobs, &id, 0),
            None,
            "a partial file is never served"
        );

        // A new store on the same directory (a restart) finds what was left.
        let blobs = Blobs::open(dir.path(), 1 << 20).unwrap();
        let mut second = partial(blobs.upload(&id, bytes.len() as u64).unwrap());
        assert_eq!(second.offset(), 123_457);
        second.write(&bytes[123_457..]).unwrap();
        assert_eq!(second.finish().unwrap(), id);

        assert_eq!(read_all(&blobs, &id, 0).unwrap(), bytes);
        assert_eq!(read_all(&blobs, &id, 200_000).unwrap(), &bytes[200_000..]);
        assert_eq!(blobs.size(&id).unwrap(), Some(bytes.len() as u64));
        assert!(matches!(
            blobs.upload(&id, bytes.len() as u64).unwrap(),
            Begun::Complete { size: 300_000 }
        ));
        assert_eq!(
            fs::read_dir(dir.path().join("partial")).unwrap().count(),
            0,
            "nothing partial is left behind"
        );
    }

    #[test]
    fn wrong_bytes_too_many_bytes_and_too_large_files_are_refused_and_change_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path(), 1000).unwrap();
        let bytes = content(1000);
        let id = id_of(&bytes);

        assert!(matches!(
            blobs.upload(&id, 1001),
            Err(BlobError::TooLarge {
                size: 1001,
                limit: 1000
            })
        ));

        let mut upload = partial(blobs.upload(&id, 1000).unwrap());
        upload.write(&bytes[..900]).unwrap();
        assert!(matches!(
            upload.write(&bytes[..200]),
            Err(BlobError::Overrun { size: 1000 })
        ));
        assert_eq!(upload.offset(), 900, "the refused bytes were not written");
        let mut other = bytes.clone();
        other[999] ^= 1;
        upload.write(&other[900..]).unwrap();
        assert!(matches!(
            upload.finish(),
            Err(BlobError::HashMismatch { ref announced, .. }) if *announced == id
        ));
        assert_eq!(blobs.size(&id).unwrap(), None);

        // The wrong bytes were thrown away: the next upload starts from nothing.
        let mut again = partial(blobs.upload(&id, 1000).unwrap());
        assert_eq!(again.offset(), 0);
        again.write(&bytes).unwrap();
        assert_eq!(again.finish().unwrap(), id);
        assert_eq!(read_all(&blobs, &id, 0).unwrap(), bytes);
    }

    #[test]
    fn one_writer_per_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path(), 1000).unwrap();
        let bytes = content(10);
        let id = id_of(&bytes);
        let first = partial(blobs.upload(&id, 10).unwrap());
        assert!(matches!(blobs.upload(&id, 10), Err(BlobError::Busy(_))));
        drop(first);
        let mut second = partial(blobs.upload(&id, 10).unwrap());
        second.write(&bytes).unwrap();
        second.finish().unwrap();
    }

    #[test]
    fn ids_are_64_hex_digits_and_name_their_digest() {
        let id = id_of(b"abc");
        assert_eq!(
            id.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(FileId::parse(&id.as_str().to_uppercase()).unwrap(), id);
        assert_eq!(FileId::from_digest(&id.digest()), id);
        for bad in ["", "ba78", "../../etc/passwd", &"g".repeat(64)] {
            assert!(matches!(FileId::parse(bad), Err(BlobError::BadId(_))));
        }
    }
}
