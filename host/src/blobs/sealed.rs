//! The encrypted form of a blob file (docs/security.md, "at rest"), used when the store seals
//! what users wrote.
//!
//! ```text
//! header, 108 bytes:
//!   "iimblob" (7) ‖ format 1 (1)
//!   ‖ the file key, sealed with the data key (81: the store's sealed-value form, see
//!     `store::sealing`, of 32 random bytes, under tree "blobs" and the file id's hex)
//!   ‖ the STREAM nonce prefix (19 random bytes)
//! then the plaintext in chunks of 64 KiB, the last one shorter (and empty for an empty file),
//!   each sealed with the file key by STREAM (`StreamBE32` over XChaCha20-Poly1305: the nonce
//!   is the prefix ‖ the chunk's position, 32 bits big-endian ‖ 1 for the last chunk, else 0),
//!   so each is 16 bytes (its tag) longer than its plaintext.
//! ```
//!
//! Every file has its own random key, so that no two files share a (key, nonce) pair, and a
//! rotation of the data key re-wraps 81 bytes per file instead of re-encrypting the files. The
//! wrapped key's associated data names the file: a header copied onto another file does not
//! open. STREAM's positions and last-chunk flag make a reordered, repeated or truncated chunk
//! fail to open, like an altered one. A read can start at any chunk, since each chunk's nonce
//! follows from its position.
//!
//! Only the crate's AEAD and its STREAM construction are used; nothing here is cryptography
//! of its own.

use super::FileId;
use crate::store::sealing::{self, KeyId, OpenError};
use crate::store::{Sealer, StoreError};
use chacha20poly1305::aead::generic_array::GenericArray;
use chacha20poly1305::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

/// Plaintext bytes in a chunk (all but the last).
pub(super) const CHUNK: u64 = 64 * 1024;
/// What STREAM adds to a chunk: its tag.
const TAG: u64 = 16;
/// A whole chunk as stored.
const STORED_CHUNK: u64 = CHUNK + TAG;
const MAGIC: &[u8; 7] = b"iimblob";
/// The format's version, after the magic.
const FORMAT: u8 = 1;
const FILE_KEY: usize = 32;
/// The file key, sealed.
const WRAPPED: usize = FILE_KEY + sealing::OVERHEAD;
/// XChaCha20's 24-byte nonce less the 5 bytes STREAM takes (position and last flag).
const PREFIX: usize = 19;
/// The header's length.
pub(super) const HEADER: u64 = (MAGIC.len() + 1 + WRAPPED + PREFIX) as u64;
/// The tree name under which the file keys are sealed (the sealed value's associated data).
const TREE: &str = "blobs";
/// The largest file STREAM's 32-bit position can number: 2³² − 1 chunks (256 TiB).
pub(super) const MAX_SIZE: u64 = u32::MAX as u64 * CHUNK;

/// How many chunks a file of `size` bytes is cut into: at least one, since the last chunk
/// (empty for an empty file) is what seals the file's end.
pub(super) fn chunks(size: u64) -> u64 {
    size.div_ceil(CHUNK).max(1)
}

/// The plaintext length of chunk `index` of a file of `size` bytes.
fn plain_len(size: u64, index: u64) -> u64 {
    if index + 1 < chunks(size) {
        CHUNK
    } else {
        size - (chunks(size) - 1) * CHUNK
    }
}

/// The length of the stored file of `size` plaintext bytes: the header, the plaintext, and a
/// tag per chunk.
#[cfg(test)]
pub(super) fn stored_len(size: u64) -> u64 {
    HEADER + size + chunks(size) * TAG
}

/// The plaintext size of a stored file of `len` bytes, the inverse of `stored_len`; `None` if
/// no file has that length.
///
/// After the header, every chunk but the last takes `STORED_CHUNK` bytes and the last one
/// between `TAG` + 1 and `STORED_CHUNK` (exactly `TAG` only for an empty file, its one chunk
/// empty): so the chunks are the body's length over `STORED_CHUNK`, rounded up, and the size is
/// the body less a tag per chunk.
pub(super) fn plain_size(len: u64) -> Option<u64> {
    let body = len.checked_sub(HEADER)?;
    let n = body.div_ceil(STORED_CHUNK);
    let last = body.checked_sub(n.checked_sub(1)? * STORED_CHUNK)?;
    (last > TAG || (n == 1 && last == TAG)).then(|| body - n * TAG)
}

/// Why a header did not give its file key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unopened {
    /// It is not a header of this format (a file in the clear, or a damaged one).
    NotEncrypted,
    /// The wrapped key did not open.
    Key(OpenError),
}

impl fmt::Display for Unopened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotEncrypted => write!(f, "it does not start with an encrypted file's header"),
            Self::Key(reason) => write!(f, "its key: {reason}"),
        }
    }
}

/// A stored file's header.
#[derive(Clone)]
pub(super) struct Header([u8; HEADER as usize]);

impl Header {
    /// A new file's header: a new random file key, wrapped with the current data key, and a
    /// new random nonce prefix; and the cipher of its chunks. `None` if `sealer` seals nothing.
    pub(super) fn new(sealer: &Sealer, id: &FileId) -> Option<(Self, FileCipher)> {
        let mut key = [0u8; FILE_KEY];
        let mut prefix = [0u8; PREFIX];
        // The thread's generator is a CSPRNG seeded from the operating system.
        let mut random = rand::rng();
        random.fill_bytes(&mut key);
        random.fill_bytes(&mut prefix);
        let wrapped = sealer.seal(TREE, id.as_str().as_bytes(), key.to_vec());
        let header = Self::assemble(&wrapped, &prefix)?;
        Some((header, FileCipher::new(&key, &prefix)))
    }

    fn assemble(wrapped: &[u8], prefix: &[u8]) -> Option<Self> {
        // A sealer in the clear passes the key through, unwrapped: no header is made of that.
        if wrapped.len() != WRAPPED || prefix.len() != PREFIX {
            return None;
        }
        let mut bytes = [0u8; HEADER as usize];
        bytes[..MAGIC.len()].copy_from_slice(MAGIC);
        bytes[MAGIC.len()] = FORMAT;
        bytes[MAGIC.len() + 1..][..WRAPPED].copy_from_slice(wrapped);
        bytes[MAGIC.len() + 1 + WRAPPED..].copy_from_slice(prefix);
        Some(Self(bytes))
    }

    /// Reads a header from the start of `file` (left just after it); `None` if the file is
    /// shorter than a header.
    pub(super) fn read_from(file: &mut File) -> io::Result<Option<Self>> {
        file.seek(SeekFrom::Start(0))?;
        let mut bytes = [0u8; HEADER as usize];
        match file.read_exact(&mut bytes) {
            Ok(()) => Ok(Some(Self(bytes))),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The header as stored.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn is_this_format(&self) -> bool {
        self.0.starts_with(MAGIC) && self.0[MAGIC.len()] == FORMAT
    }

    fn wrapped(&self) -> &[u8] {
        &self.0[MAGIC.len() + 1..][..WRAPPED]
    }

    fn prefix(&self) -> &[u8] {
        &self.0[MAGIC.len() + 1 + WRAPPED..]
    }

    /// The data key that wrapped the file key, as the header says (not checked: see
    /// [`Header::open`]).
    pub(super) fn key_id(&self) -> Option<KeyId> {
        self.is_this_format()
            .then(|| sealing::key_of(self.wrapped()))
            .flatten()
    }

    fn file_key(&self, sealer: &Sealer, id: &FileId) -> Result<[u8; FILE_KEY], Unopened> {
        if !self.is_this_format() || !sealer.is_on() {
            return Err(Unopened::NotEncrypted);
        }
        let key = sealer
            .open(TREE, id.as_str().as_bytes(), self.wrapped())
            .map_err(|e| match e {
                StoreError::Sealed { reason, .. } => Unopened::Key(reason),
                _ => Unopened::NotEncrypted,
            })?;
        <[u8; FILE_KEY]>::try_from(&*key).map_err(|_| Unopened::NotEncrypted)
    }

    /// The cipher of file `id`'s chunks, if its key opens under the data keys: what tells an
    /// encrypted file (a magic number alone could begin a user's file).
    pub(super) fn open(&self, sealer: &Sealer, id: &FileId) -> Result<FileCipher, Unopened> {
        let key = self.file_key(sealer, id)?;
        Ok(FileCipher::new(&key, self.prefix()))
    }

    /// The same header with the same file key wrapped again, with the current data key.
    pub(super) fn rewrapped(&self, sealer: &Sealer, id: &FileId) -> Result<Self, Unopened> {
        let key = self.file_key(sealer, id)?;
        let wrapped = sealer.seal(TREE, id.as_str().as_bytes(), key.to_vec());
        Self::assemble(&wrapped, self.prefix()).ok_or(Unopened::NotEncrypted)
    }
}

/// Seals and opens one file's chunks: STREAM, at any position.
pub(super) struct FileCipher(StreamBE32<XChaCha20Poly1305>);

impl FileCipher {
    fn new(key: &[u8; FILE_KEY], prefix: &[u8]) -> Self {
        let aead = XChaCha20Poly1305::new(key.into());
        Self(StreamBE32::from_aead(
            aead,
            GenericArray::from_slice(prefix),
        ))
    }

    /// STREAM's position of chunk `index`, and whether it is the last of a file of `size`.
    fn position(size: u64, index: u64) -> io::Result<(u32, bool)> {
        let position = u32::try_from(index)
            .map_err(|_| io::Error::other("a file of more chunks than STREAM can number"))?;
        Ok((position, index + 1 == chunks(size)))
    }

    /// Seals the plaintext of chunk `index` of a file of `size` bytes in place (its tag
    /// appended).
    pub(super) fn seal(&self, size: u64, index: u64, chunk: &mut Vec<u8>) -> io::Result<()> {
        let (position, last) = Self::position(size, index)?;
        self.0
            .encrypt_in_place(position, last, b"", chunk)
            .map_err(|_| io::Error::other("a chunk could not be encrypted"))
    }

    /// Opens chunk `index` of a file of `size` bytes in place; false if it does not open (it
    /// was altered, moved, or cut short).
    pub(super) fn open(&self, size: u64, index: u64, chunk: &mut Vec<u8>) -> bool {
        match Self::position(size, index) {
            Ok((position, last)) => self.0.decrypt_in_place(position, last, b"", chunk).is_ok(),
            Err(_) => false,
        }
    }
}

/// Writes a file's plaintext in its encrypted form, after its header: each chunk as soon as it
/// is whole (the last one, shorter, at the file's size); what is less than a chunk stays here.
pub(super) struct ChunkWriter {
    header: Header,
    cipher: FileCipher,
    size: u64,
    /// Chunks written.
    written: u64,
    /// The plaintext of the next chunk so far, with room for its tag.
    tail: Vec<u8>,
}

impl ChunkWriter {
    /// A writer of a file of `size` bytes whose first `written` chunks are written.
    pub(super) fn new(header: Header, cipher: FileCipher, size: u64, written: u64) -> Self {
        Self {
            header,
            cipher,
            size,
            written,
            tail: Vec::with_capacity(STORED_CHUNK as usize),
        }
    }

    /// Takes the next bytes of the plaintext (no more than the file has left), writing to
    /// `out` every chunk they complete. Called with none, it writes an empty file's chunk.
    pub(super) fn write(&mut self, mut bytes: &[u8], out: &mut impl Write) -> io::Result<()> {
        while self.written < chunks(self.size) {
            let need = plain_len(self.size, self.written) as usize;
            let take = (need - self.tail.len()).min(bytes.len());
            self.tail.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.tail.len() < need {
                break;
            }
            self.cipher.seal(self.size, self.written, &mut self.tail)?;
            let written = out.write_all(&self.tail);
            self.tail.clear();
            written?;
            self.written += 1;
        }
        if bytes.is_empty() {
            Ok(())
        } else {
            Err(io::Error::other("more bytes than the file's size"))
        }
    }

    /// The plaintext bytes in whole chunks written: where a resumed upload goes on from.
    pub(super) fn durable(&self) -> u64 {
        (self.written * CHUNK).min(self.size)
    }

    /// The file's header.
    pub(super) fn header(&self) -> &Header {
        &self.header
    }
}

/// What an encrypted partial file holds: its header, and the whole chunks from the start
/// that open.
pub(super) struct Scanned {
    /// The header.
    pub(super) header: Header,
    /// Its file key's cipher.
    pub(super) cipher: FileCipher,
    /// The whole chunks that open, from the first.
    pub(super) good: u64,
    /// Their plaintext, hashed.
    pub(super) hasher: Sha256,
    /// Whether bytes follow them (a chunk cut short or altered: a crash mid-write).
    pub(super) torn: bool,
}

/// Reads back a partial file of a file `id` of `size` bytes: its header, then each chunk while
/// they open, hashing their plaintext. `None` if it has nothing of use: no header, or one that
/// does not open under the data keys.
pub(super) fn scan(
    file: &mut File,
    sealer: &Sealer,
    id: &FileId,
    size: u64,
) -> io::Result<Option<Scanned>> {
    let len = file.metadata()?.len();
    let Some(header) = Header::read_from(file)? else {
        return Ok(None);
    };
    let Ok(cipher) = header.open(sealer, id) else {
        return Ok(None);
    };
    let mut hasher = Sha256::new();
    let (mut good, mut end) = (0, HEADER);
    let mut chunk = Vec::with_capacity(STORED_CHUNK as usize);
    while good < chunks(size) {
        let stored = plain_len(size, good) + TAG;
        if end + stored > len {
            break;
        }
        chunk.resize(stored as usize, 0);
        file.read_exact(&mut chunk)?;
        if !cipher.open(size, good, &mut chunk) {
            break;
        }
        hasher.update(&chunk);
        good += 1;
        end += stored;
    }
    Ok(Some(Scanned {
        header,
        cipher,
        good,
        hasher,
        torn: end < len,
    }))
}

/// Copies the first `good` chunks of a partial file of `size` bytes to `out` under a new key
/// (`header`, `cipher`): the positions after them, which bytes on the disk may have used
/// already, are then never sealed twice under one key and nonce.
pub(super) fn rekey(
    old: &mut File,
    old_cipher: &FileCipher,
    size: u64,
    good: u64,
    (header, cipher): (&Header, &FileCipher),
    out: &mut File,
) -> io::Result<()> {
    old.seek(SeekFrom::Start(HEADER))?;
    out.write_all(header.bytes())?;
    let mut chunk = Vec::with_capacity(STORED_CHUNK as usize);
    for index in 0..good {
        chunk.resize((plain_len(size, index) + TAG) as usize, 0);
        old.read_exact(&mut chunk)?;
        if !old_cipher.open(size, index, &mut chunk) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a chunk changed while it was copied",
            ));
        }
        cipher.seal(size, index, &mut chunk)?;
        out.write_all(&chunk)?;
    }
    Ok(())
}

/// Encrypts `plain`, a complete file of `size` bytes in the clear, into `out`; whether its
/// bytes were `size` bytes whose SHA-256 is `id` (if not, `out` is of no use).
pub(super) fn seal_copy(
    plain: &mut File,
    size: u64,
    sealer: &Sealer,
    id: &FileId,
    out: &mut File,
) -> io::Result<bool> {
    let (header, cipher) = Header::new(sealer, id)
        .ok_or_else(|| io::Error::other("no data key to encrypt the file with"))?;
    plain.seek(SeekFrom::Start(0))?;
    out.write_all(header.bytes())?;
    let mut writer = ChunkWriter::new(header, cipher, size, 0);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut have = 0u64;
    loop {
        let n = plain.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if have + n as u64 > size {
            return Ok(false);
        }
        hasher.update(&buf[..n]);
        writer.write(&buf[..n], out)?;
        have += n as u64;
    }
    if have != size {
        return Ok(false);
    }
    writer.write(&[], out)?;
    Ok(FileId::from_digest(&hasher.finalize().into()) == *id)
}

/// A stored file's plaintext from an offset, decrypted a chunk at a time.
pub(super) struct SealedReader {
    file: File,
    id: FileId,
    cipher: FileCipher,
    size: u64,
    /// The next chunk to read from the disk.
    next: u64,
    /// Bytes of the next chunk read to leave out (the offset falls inside it).
    skip: usize,
    /// The plaintext of the chunk read last, and how much of it was handed out.
    chunk: Vec<u8>,
    at: usize,
    /// A chunk did not open: every read fails from then on.
    failed: bool,
}

impl SealedReader {
    /// A reader of `file` (whose plaintext has `size` bytes) from `offset` (at most `size`).
    pub(super) fn new(
        mut file: File,
        id: FileId,
        cipher: FileCipher,
        size: u64,
        offset: u64,
    ) -> io::Result<Self> {
        let offset = offset.min(size);
        let index = offset / CHUNK;
        let next = if offset == size {
            // Nothing left to read (an empty file, or the end of one).
            chunks(size)
        } else {
            file.seek(SeekFrom::Start(HEADER + index * STORED_CHUNK))?;
            index
        };
        Ok(Self {
            file,
            id,
            cipher,
            size,
            next,
            skip: (offset % CHUNK) as usize,
            chunk: Vec::with_capacity(STORED_CHUNK as usize),
            at: 0,
            failed: false,
        })
    }

    fn read_chunk(&mut self) -> io::Result<()> {
        let index = self.next;
        self.chunk
            .resize((plain_len(self.size, index) + TAG) as usize, 0);
        self.at = 0;
        let opened = match self.file.read_exact(&mut self.chunk) {
            Ok(()) => self.cipher.open(self.size, index, &mut self.chunk),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => false,
            Err(e) => {
                self.chunk.clear();
                return Err(e);
            }
        };
        if !opened {
            self.chunk.clear();
            self.failed = true;
            return Err(self.altered(index));
        }
        self.at = self.skip.min(self.chunk.len());
        self.skip = 0;
        self.next += 1;
        Ok(())
    }

    fn altered(&self, index: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "file {}: chunk {index} does not open (the file was altered on disk)",
                self.id
            ),
        )
    }
}

impl Read for SealedReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.failed {
            return Err(self.altered(self.next));
        }
        while self.at == self.chunk.len() {
            if self.next >= chunks(self.size) || out.is_empty() {
                return Ok(0);
            }
            self.read_chunk()?;
        }
        let n = out.len().min(self.chunk.len() - self.at);
        out[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_plaintext_size_follows_from_the_stored_length() {
        assert_eq!(HEADER, 108);
        for size in [
            0,
            1,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            2 * CHUNK,
            3 * CHUNK + 17,
            (5 << 20) + 3,
        ] {
            assert_eq!(plain_size(stored_len(size)), Some(size), "size {size}");
        }
        // Lengths no file has: shorter than a header and a tag, or a last chunk of no more
        // than a tag after whole ones.
        for len in [0, HEADER, HEADER + TAG - 1, HEADER + STORED_CHUNK + TAG] {
            assert_eq!(plain_size(len), None, "length {len}");
        }
        assert_eq!(plain_len(CHUNK, 0), CHUNK);
        assert_eq!(plain_len(CHUNK + 1, 1), 1);
        assert_eq!(plain_len(0, 0), 0);
    }
}
