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
//! With the store's [`Sealer`] on (`storage.encrypt`, the default), every file is encrypted at
//! rest, complete or partial (`sealed`: a header with the file's own key wrapped with the data
//! key, then the bytes in chunks of 64 KiB sealed by STREAM). An upload's partial file is
//! written a whole chunk at a time, so that nothing in `partial/` is ever in the clear: what is
//! less than a chunk waits in memory, and is lost if the upload is cut off (the next one goes on
//! from the end of the last whole chunk). A store kept in the clear until then is encrypted when
//! it is first opened with the sealer on, and marked so (`at_rest`); a data key rotation wraps
//! the files' keys again ([`Blobs::reseal`]).
//!
//! Who may upload or download which file, quotas and how long files stay are decided above
//! this module; it only stores bytes and keeps its promise about them. Its I/O is blocking: an
//! async caller runs it on a blocking thread.

mod at_rest;
mod sealed;

use crate::store::{KeyId, Sealer};
use iim_proto::UserId;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::Notify;

/// A file's name: the SHA-256 of its bytes, in lower-case hex.
///
/// It stays the SHA-256 of the plaintext when files are encrypted at rest (clients name files
/// by it): whoever holds a copy of the data directory and a candidate file can therefore tell
/// whether that file is stored here, though not read what is stored.
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
    #[error(
        "{have} of the announced {size} bytes arrived; the next upload of the file goes on \
         from byte {kept}"
    )]
    Incomplete {
        /// Bytes received so far.
        have: u64,
        /// Bytes kept, where the next upload goes on from: all that arrived, or, when the
        /// files are encrypted, up to the end of their last whole chunk.
        kept: u64,
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
    /// A stored file does not open: it was altered or damaged on disk (or, at a rotation, is
    /// not in the encrypted form).
    #[error("the stored file {path} does not open: {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A stored file's key is wrapped with a data key the key file lacks.
    #[error(
        "the stored file {path} is encrypted with data key {key}, which the key file lacks: is \
         it this data directory's key file?"
    )]
    KeyMissing {
        /// The file.
        path: PathBuf,
        /// The missing key's id.
        key: KeyId,
    },
    /// The files are encrypted, and the store was opened in the clear.
    #[error(
        "the files in {0} are encrypted; storage.encrypt is off (they open only with their data \
         key)"
    )]
    Encrypted(PathBuf),
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
    /// Encrypts the files (the store's sealer: its keys, and their rotations).
    sealer: Sealer,
    /// The partial files an [`Upload`] (or a reseal) is writing now: one writer each.
    writing: Arc<Mutex<HashSet<PathBuf>>>,
    /// Held while a complete file is replaced by a copy (a reseal) or removed, so that a file
    /// removed meanwhile does not come back.
    replacing: Arc<Mutex<()>>,
}

impl Blobs {
    /// Opens (creating if need be) the blob store in `dir`, taking files of at most `max_size`
    /// bytes, encrypted with `sealer` (in the clear if it is off).
    ///
    /// With the sealer on, a store not marked encrypted yet is first encrypted: every complete
    /// file in the clear (each replaced by an encrypted copy, so that a run cut off is simply
    /// done again at the next open), and its partial files in the clear removed. A store
    /// marked encrypted is refused with the sealer off.
    pub fn open(dir: &Path, max_size: u64, sealer: Sealer) -> Result<Self, BlobError> {
        let encrypted = dir.join(at_rest::SEALED).exists() || dir.join(at_rest::SEALING).exists();
        if encrypted && !sealer.is_on() {
            return Err(BlobError::Encrypted(dir.to_owned()));
        }
        let partial = dir.join("partial");
        fs::create_dir_all(&partial).map_err(io_error("creating", &partial))?;
        // Copies a run cut off left behind; the run is done again.
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp).map_err(io_error("creating", &tmp))?;
        for entry in fs::read_dir(&tmp).map_err(io_error("listing", &tmp))? {
            let path = entry.map_err(io_error("listing", &tmp))?.path();
            fs::remove_file(&path).map_err(io_error("removing", &path))?;
        }
        let blobs = Self {
            dir: dir.to_owned(),
            max_size,
            sealer,
            writing: Arc::default(),
            replacing: Arc::default(),
        };
        if blobs.sealer.is_on() {
            at_rest::encrypt_clear_files_once(&blobs)?;
        }
        Ok(blobs)
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

    /// A temporary file's path: a copy made to replace a file.
    fn tmp_path(&self, name: &str) -> PathBuf {
        self.dir.join("tmp").join(name)
    }

    /// The size of a stored file of `len` bytes at `path`: its plaintext's.
    fn plain_size(&self, path: &Path, len: u64) -> Result<u64, BlobError> {
        if !self.sealer.is_on() {
            return Ok(len);
        }
        sealed::plain_size(len).ok_or_else(|| BlobError::Unreadable {
            path: path.to_owned(),
            reason: format!("no encrypted file is {len} bytes long"),
        })
    }

    /// The size of file `id` if it is complete here (of its plaintext, if it is encrypted).
    pub fn size(&self, id: &FileId) -> Result<Option<u64>, BlobError> {
        let path = self.complete_path(id);
        match fs::metadata(&path) {
            Ok(meta) => self.plain_size(&path, meta.len()).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("reading", &path)(e)),
        }
    }

    /// File `id`'s bytes from `offset` (past the end: none), decrypted if it is encrypted, and
    /// its size; `None` unless it is complete here. A file whose header does not open is an
    /// error here; a chunk that does not open, an error of the reader's (kind `InvalidData`).
    pub fn read(&self, id: &FileId, offset: u64) -> Result<Option<(BlobReader, u64)>, BlobError> {
        let path = self.complete_path(id);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("opening", &path)(e)),
        };
        let len = file.metadata().map_err(io_error("reading", &path))?.len();
        let size = self.plain_size(&path, len)?;
        if !self.sealer.is_on() {
            file.seek(SeekFrom::Start(offset.min(size)))
                .map_err(io_error("reading", &path))?;
            return Ok(Some((BlobReader(Source::Clear(file)), size)));
        }
        let header = sealed::Header::read_from(&mut file)
            .map_err(io_error("reading", &path))?
            .ok_or_else(|| at_rest::unopened(&path, sealed::Unopened::NotEncrypted))?;
        let cipher = header
            .open(&self.sealer, id)
            .map_err(|reason| at_rest::unopened(&path, reason))?;
        let reader = sealed::SealedReader::new(file, id.clone(), cipher, size, offset)
            .map_err(io_error("reading", &path))?;
        Ok(Some((BlobReader(Source::Sealed(Box::new(reader))), size)))
    }

    /// Wraps again with the current data key the key of every file wrapped with an older one
    /// (after a rotation, [`Sealer::replace`]): a copy of each with its new header and the same
    /// chunks, synced and renamed over it (a download under way reads on from the old one).
    /// The partial file of an upload under way is left to it: it wraps its key again when it
    /// finishes. `progress` is told how many so far; returns how many. A file whose key does not
    /// open is an error, once every other is done. Nothing with the sealer off.
    pub fn reseal(&self, progress: impl FnMut(u64)) -> Result<u64, BlobError> {
        at_rest::reseal(self, progress)
    }

    /// The data keys that wrap some file's key, complete or partial (none in the clear): a key
    /// not among them and the store's seals nothing of the files.
    pub fn keys_in_use(&self) -> Result<BTreeSet<KeyId>, BlobError> {
        at_rest::keys_in_use(self)
    }

    /// Starts or resumes the upload of a file of `size` bytes whose SHA-256 is `id`. If the file
    /// is complete here already, says so and takes no bytes; otherwise the upload goes on from
    /// what an earlier, cut-off upload of the same file left ([`Upload::offset`]).
    pub fn upload(&self, id: &FileId, size: u64) -> Result<Begun, BlobError> {
        let limit = match self.sealer.is_on() {
            true => self.max_size.min(sealed::MAX_SIZE),
            false => self.max_size,
        };
        if size > limit {
            return Err(BlobError::TooLarge { size, limit });
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
        if self.sealer.is_on() {
            return self.resume_sealed(id, size, claim);
        }
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
            sealing: None,
            failed: false,
            claim,
        })))
    }

    /// Starts or resumes an encrypted upload: the partial file is read back, each chunk
    /// decrypted and hashed, and kept up to the last whole chunk that opens. A partial file
    /// whose header does not open starts afresh, under a new key. One with bytes after that
    /// chunk (a crash mid-write, an altered chunk) is copied, up to it, under a new key: the
    /// positions whose earlier ciphertext is on the disk are not sealed again under the same
    /// key and nonce, with what may be other bytes. (A position past the file's end is sealed
    /// again under the same key only when a crash took back a chunk that was never synced:
    /// with the same bytes, when the client resends the file it named, so the same
    /// ciphertext.)
    fn resume_sealed(&self, id: &FileId, size: u64, claim: Claim) -> Result<Begun, BlobError> {
        let path = &claim.path;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(io_error("opening", path))?;
        let scanned =
            sealed::scan(&mut file, &self.sealer, id, size).map_err(io_error("reading", path))?;
        let fresh_header = || {
            sealed::Header::new(&self.sealer, id).ok_or_else(|| BlobError::Io {
                what: "encrypting",
                path: path.clone(),
                source: io::Error::other("no data key"),
            })
        };
        let (writer, hasher) = match scanned {
            None => {
                let (header, cipher) = fresh_header()?;
                file.set_len(0)
                    .and_then(|()| file.seek(SeekFrom::Start(0)))
                    .and_then(|_| file.write_all(header.bytes()))
                    .map_err(io_error("writing", path))?;
                (
                    sealed::ChunkWriter::new(header, cipher, size, 0),
                    Sha256::new(),
                )
            }
            Some(sealed::Scanned {
                header,
                cipher,
                good,
                hasher,
                torn: false,
            }) => (sealed::ChunkWriter::new(header, cipher, size, good), hasher),
            Some(sealed::Scanned {
                cipher,
                good,
                hasher,
                torn: true,
                ..
            }) => {
                let (header, new_cipher) = fresh_header()?;
                let copy = self.tmp_path(&format!("{id}-{size}.rekey"));
                let mut out = OpenOptions::new()
                    .create(true)
                    .read(true)
                    .write(true)
                    .truncate(true)
                    .open(&copy)
                    .map_err(io_error("creating", &copy))?;
                sealed::rekey(
                    &mut file,
                    &cipher,
                    size,
                    good,
                    (&header, &new_cipher),
                    &mut out,
                )
                .and_then(|()| out.sync_all())
                .map_err(io_error("writing", &copy))?;
                fs::rename(&copy, path).map_err(io_error("moving into place", path))?;
                sync_dir(&self.dir.join("partial"))?;
                file = out;
                (
                    sealed::ChunkWriter::new(header, new_cipher, size, good),
                    hasher,
                )
            }
        };
        // Written on from the end of the last whole chunk, which is the file's end: bytes
        // after it were copied away above.
        file.seek(SeekFrom::End(0))
            .map_err(io_error("reading", path))?;
        Ok(Begun::Partial(Box::new(Upload {
            blobs: self.clone(),
            id: id.clone(),
            size,
            have: writer.durable(),
            hasher,
            file,
            sealing: Some(Box::new(writer)),
            failed: false,
            claim,
        })))
    }

    /// Removes file `id` (complete or partial); whether anything was there.
    pub fn remove(&self, id: &FileId) -> Result<bool, BlobError> {
        let path = self.complete_path(id);
        let _replacing = self
            .replacing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
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
    /// Bytes taken (written, or waiting in `sealing` for the rest of their chunk).
    have: u64,
    hasher: Sha256,
    file: File,
    /// With the sealer on: what encrypts the bytes into the partial file.
    sealing: Option<Box<sealed::ChunkWriter>>,
    /// A write failed: what the partial file holds past its last whole chunk is unknown, and
    /// this upload takes nothing more (the next one reads the file back).
    failed: bool,
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
    /// How many bytes the store has taken: the sender goes on from here. (Encrypted, what is
    /// less than a chunk is kept in memory until its chunk is whole; cut off, an upload
    /// goes on from the end of the last whole chunk.)
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
        if self.failed {
            return Err(io_error("writing", path)(io::Error::other(
                "an earlier write of this upload failed",
            )));
        }
        let written = match &mut self.sealing {
            Some(writer) => writer.write(bytes, &mut self.file),
            None => self.file.write_all(bytes),
        };
        if let Err(e) = written {
            self.failed = true;
            return Err(io_error("writing", path)(e));
        }
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
        let path = self.claim.path.clone();
        if self.failed {
            return Err(io_error("writing", &path)(io::Error::other(
                "an earlier write of this upload failed",
            )));
        }
        if self.have < self.size {
            // Kept on disk (not synced: a crash may take some back, and the next upload
            // goes on from what is there); encrypted, up to the last whole chunk.
            let _ = self.file.flush();
            return Err(BlobError::Incomplete {
                have: self.have,
                kept: self.sealing.as_ref().map_or(self.have, |w| w.durable()),
                size: self.size,
            });
        }
        if let Some(writer) = &mut self.sealing {
            // An empty file's one chunk, which no bytes completed.
            writer
                .write(&[], &mut self.file)
                .map_err(io_error("writing", &path))?;
        }
        let hasher = std::mem::take(&mut self.hasher);
        let actual = FileId::from_digest(&hasher.finalize().into());
        if actual != self.id {
            let _ = fs::remove_file(&path);
            return Err(BlobError::HashMismatch {
                announced: self.id.clone(),
                actual,
            });
        }
        self.rewrap_if_rotated()?;
        self.file.sync_all().map_err(io_error("syncing", &path))?;
        let target = self.blobs.complete_path(&self.id);
        let parent = target.parent().unwrap_or(&self.blobs.dir).to_owned();
        fs::create_dir_all(&parent).map_err(io_error("creating", &parent))?;
        fs::rename(&path, &target).map_err(io_error("moving into place", &target))?;
        sync_dir(&parent)?;
        Ok(self.id.clone())
    }
}

impl Upload {
    /// Wraps the file key again with the current data key if a rotation came since the upload
    /// began, so that a reseal need not come back for this file. In place: it is still a
    /// partial file (a crash that tore the header would only make its upload start over).
    fn rewrap_if_rotated(&mut self) -> Result<(), BlobError> {
        let Some(writer) = &self.sealing else {
            return Ok(());
        };
        let current = self.blobs.sealer.keys().map(|keys| keys.current());
        if writer.header().key_id() == current {
            return Ok(());
        }
        let path = &self.claim.path;
        let rewrapped = writer
            .header()
            .rewrapped(&self.blobs.sealer, &self.id)
            .map_err(|reason| at_rest::unopened(path, reason))?;
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.write_all(rewrapped.bytes()))
            .map_err(io_error("writing", path))
    }
}

/// A stored file's bytes, from where [`Blobs::read`] was asked to start: read from the disk,
/// and decrypted a chunk at a time when the store encrypts its files. A chunk that does not
/// open (the file was altered on disk) is an error of kind `InvalidData`, never bytes.
pub struct BlobReader(Source);

enum Source {
    Clear(File),
    Sealed(Box<sealed::SealedReader>),
}

impl fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let form = match &self.0 {
            Source::Clear(_) => "clear",
            Source::Sealed(_) => "encrypted",
        };
        f.debug_tuple("BlobReader").field(&form).finish()
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.0 {
            Source::Clear(file) => file.read(buf),
            Source::Sealed(reader) => reader.read(buf),
        }
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
    use crate::store::DataKeys;

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

    /// A blob store in a temporary directory (`<tmp>/files`), with its data key file beside
    /// it (`<tmp>/data.key`) when it encrypts.
    struct Fixture {
        dir: tempfile::TempDir,
        sealer: Sealer,
    }

    impl Fixture {
        fn new(encrypt: bool) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let sealer = match encrypt {
                true => Sealer::new(DataKeys::create(&dir.path().join("data.key"), 1).unwrap()),
                false => Sealer::clear(),
            };
            Self { dir, sealer }
        }

        fn files(&self) -> PathBuf {
            self.dir.path().join("files")
        }

        fn open(&self, max_size: u64) -> Blobs {
            Blobs::open(&self.files(), max_size, self.sealer.clone()).unwrap()
        }
    }

    fn upload_all(blobs: &Blobs, bytes: &[u8], piece: usize) -> FileId {
        let id = id_of(bytes);
        let mut upload = partial(blobs.upload(&id, bytes.len() as u64).unwrap());
        for part in bytes.chunks(piece.max(1)) {
            upload.write(part).unwrap();
        }
        assert_eq!(upload.finish().unwrap(), id);
        id
    }

    /// Every file under `dir`, recursively.
    fn every_file(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(every_file(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Cuts an upload off mid-chunk, then resumes it on a new store (a restart): it goes on
    /// from `resumed_at`, and only the whole file is served.
    fn cut_off_and_resumed(encrypt: bool, resumed_at: u64) {
        let fixture = Fixture::new(encrypt);
        let blobs = fixture.open(1 << 20);
        let bytes = content(300_000);
        let id = id_of(&bytes);

        let mut first = partial(blobs.upload(&id, bytes.len() as u64).unwrap());
        assert_eq!(first.offset(), 0);
        first.write(&bytes[..123_457]).unwrap();
        assert_eq!(first.offset(), 123_457);
        assert!(matches!(
            first.finish(),
            Err(BlobError::Incomplete { have: 123_457, kept, .. }) if kept == resumed_at
        ));
        assert_eq!(
            read_all(&blobs, &id, 0),
            None,
            "a partial file is never served"
        );

        // A new store on the same directory (a restart) finds what was left.
        let blobs = fixture.open(1 << 20);
        let mut second = partial(blobs.upload(&id, bytes.len() as u64).unwrap());
        assert_eq!(second.offset(), resumed_at);
        second.write(&bytes[resumed_at as usize..]).unwrap();
        assert_eq!(second.finish().unwrap(), id);

        assert_eq!(read_all(&blobs, &id, 0).unwrap(), bytes);
        assert_eq!(read_all(&blobs, &id, 200_000).unwrap(), &bytes[200_000..]);
        assert_eq!(blobs.size(&id).unwrap(), Some(bytes.len() as u64));
        assert!(matches!(
            blobs.upload(&id, bytes.len() as u64).unwrap(),
            Begun::Complete { size: 300_000 }
        ));
        assert_eq!(
            fs::read_dir(fixture.files().join("partial"))
                .unwrap()
                .count(),
            0,
            "nothing partial is left behind"
        );
    }

    #[test]
    fn an_upload_cut_off_goes_on_from_where_it_stopped_and_only_the_whole_file_is_served() {
        cut_off_and_resumed(false, 123_457);
    }

    #[test]
    fn an_encrypted_upload_cut_off_mid_chunk_goes_on_from_its_last_whole_chunk() {
        // 123 457 bytes are one whole chunk and 57 921 bytes that were only in memory.
        cut_off_and_resumed(true, 65_536);
    }

    fn wrong_bytes_too_many_bytes_and_too_large_files(encrypt: bool) {
        let fixture = Fixture::new(encrypt);
        let blobs = fixture.open(1000);
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
    fn wrong_bytes_too_many_bytes_and_too_large_files_are_refused_and_change_nothing_else() {
        wrong_bytes_too_many_bytes_and_too_large_files(false);
        wrong_bytes_too_many_bytes_and_too_large_files(true);
    }

    #[test]
    fn encrypted_files_of_every_size_read_back_from_any_offset() {
        let fixture = Fixture::new(true);
        let blobs = fixture.open(8 << 20);
        let k = sealed::CHUNK as usize;
        for (len, piece) in [
            (0, 1),
            (1, 1),
            (k - 1, 1000),
            (k, k),
            (k + 1, 7777),
            ((3 << 20) + 5, 100_000),
        ] {
            let bytes = content(len);
            let id = upload_all(&blobs, &bytes, piece);
            let stored = fs::metadata(blobs.complete_path(&id)).unwrap().len();
            assert_eq!(stored, sealed::stored_len(len as u64), "{len} bytes");
            assert_eq!(blobs.size(&id).unwrap(), Some(len as u64));
            let offsets = [
                0,
                1,
                k - 1,
                k,
                k + 1,
                2 * k + 12_345,
                len / 2,
                len.saturating_sub(1),
                len,
            ];
            for offset in offsets.into_iter().filter(|o| *o <= len) {
                let (mut reader, size) = blobs.read(&id, offset as u64).unwrap().unwrap();
                assert_eq!(size, len as u64);
                let mut read = Vec::new();
                reader.read_to_end(&mut read).unwrap();
                assert!(read == bytes[offset..], "{len} bytes from {offset}");
            }
            // Past the end: nothing (the caller refuses such an offset).
            assert_eq!(read_all(&blobs, &id, len as u64 + 10).unwrap(), b"");
            // Small reads straddling chunks give the same bytes.
            let (mut reader, _) = blobs.read(&id, 0).unwrap().unwrap();
            let mut read = Vec::new();
            let mut buf = [0u8; 1000];
            loop {
                let n = reader.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                read.extend_from_slice(&buf[..n]);
            }
            assert!(read == bytes, "{len} bytes in small reads");
        }
        // A restart (the store marked encrypted: nothing scanned) reads them all the same.
        let blobs = fixture.open(8 << 20);
        let bytes = content(k + 1);
        assert_eq!(read_all(&blobs, &id_of(&bytes), 0).unwrap(), bytes);
    }

    /// Content of `len` bytes that says a marker string over and over.
    fn marked(len: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(len + 64);
        let mut n = 0u64;
        while bytes.len() < len {
            bytes.extend_from_slice(format!("PLAINTEXT-MARKER-{n:08}|").as_bytes());
            n += 1;
        }
        bytes.truncate(len);
        bytes
    }

    #[test]
    fn no_plaintext_of_an_encrypted_upload_reaches_the_disk() {
        let fixture = Fixture::new(true);
        let blobs = fixture.open(1 << 20);
        let whole = marked(500_000);
        upload_all(&blobs, &whole, 12_345);
        // One cut off mid-chunk, one under way with a chunk not yet whole, one of less than a
        // chunk.
        let cut = marked(400_000 + 1);
        let cut_id = id_of(&cut);
        let mut upload = partial(blobs.upload(&cut_id, cut.len() as u64).unwrap());
        upload.write(&cut[..150_000]).unwrap();
        drop(upload);
        let going = marked(300_000 + 2);
        let mut going_upload = partial(blobs.upload(&id_of(&going), going.len() as u64).unwrap());
        going_upload.write(&going[..100_000]).unwrap();
        let small = marked(100);
        let mut small_upload = partial(blobs.upload(&id_of(&small), 100).unwrap());
        small_upload.write(&small[..99]).unwrap();

        let files = every_file(&fixture.files());
        assert!(files.len() >= 4, "{files:?}");
        for path in files {
            let stored = fs::read(&path).unwrap();
            assert!(
                !contains(&stored, b"PLAINTEXT-MARKER"),
                "{} holds plaintext",
                path.display()
            );
        }
        drop((going_upload, small_upload));
        assert_eq!(read_all(&blobs, &id_of(&whole), 0).unwrap(), whole);
    }

    #[test]
    fn an_altered_encrypted_file_fails_to_read_instead_of_giving_other_bytes() {
        let fixture = Fixture::new(true);
        let blobs = fixture.open(1 << 20);
        let bytes = content(200_000);
        let id = upload_all(&blobs, &bytes, 65_536);
        let path = blobs.complete_path(&id);
        let original = fs::read(&path).unwrap();
        let stored_chunk = sealed::CHUNK as usize + 16;
        let header = sealed::HEADER as usize;

        // A byte of the second chunk flipped: the first still reads, the second fails.
        let mut altered = original.clone();
        altered[header + stored_chunk + 10] ^= 1;
        fs::write(&path, &altered).unwrap();
        let (mut reader, _) = blobs.read(&id, 0).unwrap().unwrap();
        let mut first = vec![0u8; 65_536];
        reader.read_exact(&mut first).unwrap();
        assert_eq!(first, bytes[..65_536]);
        let error = reader.read(&mut [0u8; 10]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert!(reader.read(&mut [0u8; 10]).is_err(), "and it stays failed");
        let (mut reader, _) = blobs.read(&id, 70_000).unwrap().unwrap();
        assert!(reader.read_to_end(&mut Vec::new()).is_err());

        // The file key's wrapping altered: the file does not open at all.
        let mut altered = original.clone();
        altered[40] ^= 1;
        fs::write(&path, &altered).unwrap();
        assert!(matches!(
            blobs.read(&id, 0),
            Err(BlobError::Unreadable { .. })
        ));

        // Cut short by a whole chunk: the chunk that is now last was not sealed as last.
        let short = &original[..header + 2 * stored_chunk];
        fs::write(&path, short).unwrap();
        assert_eq!(blobs.size(&id).unwrap(), Some(2 * 65_536));
        let (mut reader, _) = blobs.read(&id, 0).unwrap().unwrap();
        assert!(reader.read_to_end(&mut Vec::new()).is_err());

        // Two chunks swapped: neither opens where it is.
        let mut swapped = original[..header].to_vec();
        swapped.extend_from_slice(&original[header + stored_chunk..header + 2 * stored_chunk]);
        swapped.extend_from_slice(&original[header..header + stored_chunk]);
        swapped.extend_from_slice(&original[header + 2 * stored_chunk..]);
        fs::write(&path, &swapped).unwrap();
        let (mut reader, _) = blobs.read(&id, 0).unwrap().unwrap();
        assert!(reader.read_to_end(&mut Vec::new()).is_err());

        // A file moved onto another file's name does not open there.
        let other = content(10);
        let other_id = upload_all(&blobs, &other, 10);
        fs::write(blobs.complete_path(&other_id), &original).unwrap();
        assert!(blobs.read(&other_id, 0).is_err());
    }

    #[test]
    fn a_torn_or_foreign_partial_file_is_cut_back_to_what_opens() {
        let fixture = Fixture::new(true);
        let blobs = fixture.open(1 << 20);
        let bytes = content(300_000);
        let id = id_of(&bytes);
        let mut upload = partial(blobs.upload(&id, bytes.len() as u64).unwrap());
        upload.write(&bytes[..200_000]).unwrap();
        drop(upload);
        let path = blobs.partial_path(&id, bytes.len() as u64);
        let before = fs::read(&path).unwrap();
        assert_eq!(before.len(), sealed::HEADER as usize + 3 * (65_536 + 16));

        // A crash in the middle of the fourth chunk's write left part of it.
        let mut torn = before.clone();
        torn.extend_from_slice(&[0x5a; 30_000]);
        fs::write(&path, &torn).unwrap();
        let mut upload = partial(blobs.upload(&id, bytes.len() as u64).unwrap());
        assert_eq!(upload.offset(), 3 * 65_536);
        // The chunks it kept were sealed again under a new key: the positions after them are
        // never sealed twice with one key.
        let rekeyed = fs::read(&path).unwrap();
        assert_eq!(rekeyed.len(), before.len());
        assert_ne!(
            rekeyed[..sealed::HEADER as usize],
            before[..sealed::HEADER as usize]
        );
        upload.write(&bytes[3 * 65_536..250_000]).unwrap();
        drop(upload);

        // A chunk altered: cut back to the one before it.
        let mut altered = fs::read(&path).unwrap();
        let second = sealed::HEADER as usize + 65_536 + 16;
        altered[second + 5] ^= 1;
        fs::write(&path, &altered).unwrap();
        let upload = partial(blobs.upload(&id, bytes.len() as u64).unwrap());
        assert_eq!(upload.offset(), 65_536);
        drop(upload);

        // A header that does not open (torn, or another key's): started over.
        let mut altered = fs::read(&path).unwrap();
        altered[30] ^= 1;
        fs::write(&path, &altered).unwrap();
        let mut upload = partial(blobs.upload(&id, bytes.len() as u64).unwrap());
        assert_eq!(upload.offset(), 0);
        upload.write(&bytes).unwrap();
        assert_eq!(upload.finish().unwrap(), id);
        assert_eq!(read_all(&blobs, &id, 0).unwrap(), bytes);
        assert_eq!(
            fs::read_dir(fixture.files().join("tmp")).unwrap().count(),
            0,
            "no copy is left behind"
        );
    }

    /// Writes a complete file in the clear, as a store kept in the clear has it.
    fn put_clear(files: &Path, bytes: &[u8]) -> FileId {
        let id = id_of(bytes);
        let path = files.join(&id.as_str()[..2]).join(id.as_str());
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
        id
    }

    #[test]
    fn a_store_in_the_clear_is_encrypted_at_its_first_open_with_the_sealer_on() {
        let fixture = Fixture::new(true);
        let files = fixture.files();
        // A store kept in the clear: files, one that starts as an encrypted one would, an
        // empty one, a cut-off upload, and a file damaged on disk.
        let clear = Blobs::open(&files, 1 << 20, Sealer::clear()).unwrap();
        let sizes = [0, 1, 65_536, 150_000];
        let mut stored: Vec<(FileId, Vec<u8>)> = sizes
            .iter()
            .map(|n| {
                let bytes = marked(*n);
                (upload_all(&clear, &bytes, 4096), bytes)
            })
            .collect();
        let mut lookalike = b"iimblob\x01\x01\x00\x00\x00\x01".to_vec();
        lookalike.extend_from_slice(&marked(1000));
        stored.push((put_clear(&files, &lookalike), lookalike.clone()));
        let cut = marked(200_000);
        let mut upload = partial(clear.upload(&id_of(&cut), 200_000).unwrap());
        upload.write(&cut[..100_000]).unwrap();
        drop(upload);
        let damaged = put_clear(&files, b"PLAINTEXT-MARKER damaged");
        fs::write(
            files.join(&damaged.as_str()[..2]).join(damaged.as_str()),
            b"PLAINTEXT-MARKER altered",
        )
        .unwrap();

        let blobs = fixture.open(1 << 20);
        for (id, bytes) in &stored {
            assert_eq!(blobs.size(id).unwrap(), Some(bytes.len() as u64));
            assert!(read_all(&blobs, id, 0).unwrap() == *bytes);
        }
        for path in every_file(&files) {
            let holds = contains(&fs::read(&path).unwrap(), b"PLAINTEXT-MARKER");
            // Only the damaged file, left as it was (it reads as nothing but an error).
            assert_eq!(
                holds,
                path.ends_with(damaged.as_str()),
                "{}",
                path.display()
            );
        }
        assert!(blobs.read(&damaged, 0).is_err());
        assert_eq!(
            fs::read_dir(files.join("partial")).unwrap().count(),
            0,
            "the cut-off upload in the clear starts over"
        );
        assert!(files.join(at_rest::SEALED).exists());
        assert!(!files.join(at_rest::SEALING).exists());

        // Encrypted files are not encrypted again, and the store no longer opens in the clear.
        let before: Vec<Vec<u8>> = stored
            .iter()
            .map(|(id, _)| fs::read(blobs.complete_path(id)).unwrap())
            .collect();
        let blobs = fixture.open(1 << 20);
        for ((id, _), bytes) in stored.iter().zip(&before) {
            assert!(fs::read(blobs.complete_path(id)).unwrap() == *bytes);
        }
        let error = Blobs::open(&files, 1 << 20, Sealer::clear()).err().unwrap();
        assert!(matches!(error, BlobError::Encrypted(_)), "{error}");
        assert!(
            error
                .to_string()
                .contains("encrypted; storage.encrypt is off"),
            "{error}"
        );
    }

    #[test]
    fn an_encryption_of_the_files_cut_off_is_done_again_at_the_next_open() {
        let fixture = Fixture::new(true);
        let files = fixture.files();
        let contents: Vec<Vec<u8>> = [10, 70_000, 140_000].map(marked).into();
        let ids: Vec<FileId> = contents.iter().map(|b| put_clear(&files, b)).collect();
        // What a run cut off leaves: the first file encrypted (made here on a copy of the
        // store), a half-written copy of the second in tmp/, the third untouched.
        let done = tempfile::tempdir().unwrap();
        let copy = done.path().join("files");
        for bytes in &contents {
            put_clear(&copy, bytes);
        }
        drop(Blobs::open(&copy, 1 << 20, fixture.sealer.clone()).unwrap());
        let in_copy = |id: &FileId| copy.join(&id.as_str()[..2]).join(id.as_str());
        let in_store = |id: &FileId| files.join(&id.as_str()[..2]).join(id.as_str());
        fs::copy(in_copy(&ids[0]), in_store(&ids[0])).unwrap();
        let half = fs::read(in_copy(&ids[1])).unwrap();
        fs::create_dir_all(files.join("tmp")).unwrap();
        fs::write(
            files.join("tmp").join(format!("{}.sealing", ids[1])),
            &half[..half.len() / 2],
        )
        .unwrap();
        fs::write(files.join(at_rest::SEALING), b"").unwrap();
        // Cut off, it is not taken for a store in the clear either.
        assert!(matches!(
            Blobs::open(&files, 1 << 20, Sealer::clear()),
            Err(BlobError::Encrypted(_))
        ));
        let first_before = fs::read(in_store(&ids[0])).unwrap();

        let blobs = fixture.open(1 << 20);
        for (id, bytes) in ids.iter().zip(&contents) {
            assert!(read_all(&blobs, id, 0).unwrap() == *bytes);
        }
        assert!(
            fs::read(in_store(&ids[0])).unwrap() == first_before,
            "the file already encrypted was left as it was"
        );
        for path in every_file(&files) {
            assert!(!contains(&fs::read(&path).unwrap(), b"PLAINTEXT-MARKER"));
        }
        assert_eq!(fs::read_dir(files.join("tmp")).unwrap().count(), 0);
        assert!(files.join(at_rest::SEALED).exists());
        assert!(!files.join(at_rest::SEALING).exists());
    }

    #[test]
    fn a_reseal_after_a_rotation_wraps_every_file_key_with_the_new_data_key() {
        let fixture = Fixture::new(true);
        let blobs = fixture.open(1 << 20);
        let contents: Vec<Vec<u8>> = [0, 5000, 200_000].map(content).into();
        let ids: Vec<FileId> = contents
            .iter()
            .map(|b| upload_all(&blobs, b, 9999))
            .collect();
        // A cut-off upload's partial file, and an upload under way.
        let cut = content(150_000 + 1);
        let mut upload = partial(blobs.upload(&id_of(&cut), cut.len() as u64).unwrap());
        upload.write(&cut[..140_000]).unwrap();
        drop(upload);
        let going = content(100_000 + 2);
        let mut going_upload = partial(blobs.upload(&id_of(&going), going.len() as u64).unwrap());
        going_upload.write(&going[..70_000]).unwrap();
        assert_eq!(blobs.keys_in_use().unwrap(), BTreeSet::from([1]));
        let header = sealed::HEADER as usize;
        let chunks_before: Vec<Vec<u8>> = ids
            .iter()
            .map(|id| fs::read(blobs.complete_path(id)).unwrap()[header..].to_vec())
            .collect();
        // A download under way since before the rotation.
        let (mut reading, _) = blobs.read(&ids[2], 0).unwrap().unwrap();
        let mut first = vec![0u8; 1000];
        reading.read_exact(&mut first).unwrap();

        let rotated = fixture.sealer.keys().unwrap().rotated(2).unwrap();
        fixture.sealer.replace(rotated);
        let mut told = Vec::new();
        // Three complete files and the cut-off partial file; the upload under way is its own.
        assert_eq!(blobs.reseal(|n| told.push(n)).unwrap(), 4);
        assert_eq!(told, [1, 2, 3, 4]);
        assert_eq!(blobs.keys_in_use().unwrap(), BTreeSet::from([1, 2]));
        going_upload.write(&going[70_000..]).unwrap();
        going_upload.finish().unwrap();
        assert_eq!(blobs.keys_in_use().unwrap(), BTreeSet::from([2]));
        assert_eq!(blobs.reseal(|_| {}).unwrap(), 0, "nothing left to do");

        let mut rest = Vec::new();
        reading.read_to_end(&mut rest).unwrap();
        first.extend(rest);
        assert!(first == contents[2], "the download under way read on");
        for ((id, bytes), chunks) in ids.iter().zip(&contents).zip(&chunks_before) {
            assert!(read_all(&blobs, id, 0).unwrap() == *bytes);
            let stored = fs::read(blobs.complete_path(id)).unwrap();
            assert!(stored[header..] == chunks[..], "the chunks did not change");
        }
        assert!(read_all(&blobs, &id_of(&going), 0).unwrap() == going);
        let mut resumed = partial(blobs.upload(&id_of(&cut), cut.len() as u64).unwrap());
        assert_eq!(resumed.offset(), 131_072);
        resumed.write(&cut[131_072..]).unwrap();
        resumed.finish().unwrap();
        // A restart with the key file as written reads them all.
        let reloaded = Sealer::new(DataKeys::load(&fixture.dir.path().join("data.key")).unwrap());
        let blobs = Blobs::open(&fixture.files(), 1 << 20, reloaded).unwrap();
        assert!(read_all(&blobs, &id_of(&cut), 0).unwrap() == cut);
        for (id, bytes) in ids.iter().zip(&contents) {
            assert!(read_all(&blobs, id, 0).unwrap() == *bytes);
        }
        assert_eq!(blobs.keys_in_use().unwrap(), BTreeSet::from([2]));
    }

    #[test]
    fn a_store_in_the_clear_keeps_files_as_they_are_and_has_no_keys_in_use() {
        let fixture = Fixture::new(false);
        let blobs = fixture.open(1 << 20);
        let bytes = content(100_000);
        let id = upload_all(&blobs, &bytes, 4096);
        assert!(fs::read(blobs.complete_path(&id)).unwrap() == bytes);
        assert_eq!(blobs.keys_in_use().unwrap(), BTreeSet::new());
        assert_eq!(blobs.reseal(|_| {}).unwrap(), 0);
        assert!(!fixture.files().join(at_rest::SEALED).exists());
    }

    #[test]
    fn one_writer_per_partial_file() {
        for encrypt in [false, true] {
            let fixture = Fixture::new(encrypt);
            let blobs = fixture.open(1000);
            let bytes = content(10);
            let id = id_of(&bytes);
            let first = partial(blobs.upload(&id, 10).unwrap());
            assert!(matches!(blobs.upload(&id, 10), Err(BlobError::Busy(_))));
            drop(first);
            let mut second = partial(blobs.upload(&id, 10).unwrap());
            second.write(&bytes).unwrap();
            second.finish().unwrap();
        }
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
