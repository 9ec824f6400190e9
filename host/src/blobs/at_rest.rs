//! The files' encryption over the store's life: files kept in the clear until now encrypted
//! when the host first starts with `storage.encrypt` on, and the files' keys wrapped again
//! with the current data key after a rotation.
//!
//! Both replace a complete file by a copy: written beside it (in `files/tmp/`), synced, renamed
//! over it, the directory synced. A run cut off leaves each file either as it was or replaced,
//! and a copy in `tmp/`, which the next [`Blobs::open`] removes; it is then simply done again.

use super::sealed::{self, Header, Unopened};
use super::{BlobError, Blobs, Claim, FileId, io_error, sync_dir};
use crate::store::KeyId;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

/// Written in `files/` once every file is encrypted: later starts need not look at them.
pub(super) const SEALED: &str = ".sealed";
/// Written in `files/` when the encryption of the files starts, removed when it is done.
pub(super) const SEALING: &str = ".sealing";

/// How often a long run says how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Calls `each` with the id and path of every complete file of the store in `dir`, one
/// fan-out directory (`files/ab/`) at a time.
fn each_complete(
    dir: &Path,
    mut each: impl FnMut(FileId, PathBuf) -> Result<(), BlobError>,
) -> Result<(), BlobError> {
    for fan_out in fan_outs(dir)? {
        for entry in fs::read_dir(&fan_out).map_err(io_error("listing", &fan_out))? {
            let entry = entry.map_err(io_error("listing", &fan_out))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // Only what `Upload::finish` puts there: a file named by its id, in the directory
            // of its first two digits.
            match FileId::parse(name) {
                Ok(id) if id.as_str() == name && fan_out.ends_with(&name[..2]) => {
                    each(id, entry.path())?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The fan-out directories of the store in `dir`.
fn fan_outs(dir: &Path) -> Result<Vec<PathBuf>, BlobError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("listing", dir))? {
        let entry = entry.map_err(io_error("listing", dir))?;
        let name = entry.file_name();
        let is_fan_out = name.to_str().is_some_and(|n| {
            n.len() == 2
                && n.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if is_fan_out && entry.path().is_dir() {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// Calls `each` with the id, size and path of every partial file.
fn each_partial(
    dir: &Path,
    mut each: impl FnMut(FileId, u64, PathBuf) -> Result<(), BlobError>,
) -> Result<(), BlobError> {
    let partial = dir.join("partial");
    for entry in fs::read_dir(&partial).map_err(io_error("listing", &partial))? {
        let entry = entry.map_err(io_error("listing", &partial))?;
        let name = entry.file_name();
        let Some((id, size)) = name.to_str().and_then(|n| n.split_once('-')) else {
            continue;
        };
        if let (Ok(id), Ok(size)) = (FileId::parse(id), size.parse::<u64>()) {
            each(id, size, entry.path())?;
        }
    }
    Ok(())
}

fn header_of(path: &Path) -> Result<Option<(File, Header)>, BlobError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("opening", path)(e)),
    };
    let header = Header::read_from(&mut file).map_err(io_error("reading", path))?;
    Ok(header.map(|header| (file, header)))
}

/// Writes marker `name` in `dir`, durably.
fn mark(dir: &Path, name: &str) -> Result<(), BlobError> {
    let path = dir.join(name);
    File::create(&path)
        .and_then(|mut f| {
            f.write_all(b"the files here are encrypted with the host's data key\n")?;
            f.sync_all()
        })
        .map_err(io_error("writing", &path))?;
    sync_dir(dir)
}

/// Unless the store is marked encrypted: encrypts every complete file of `blobs` still in the
/// clear, and removes the partial files in the clear (their uploads start over); then marks
/// the store encrypted.
pub(super) fn encrypt_clear_files_once(blobs: &Blobs) -> Result<(), BlobError> {
    let (sealed, sealing) = (blobs.dir.join(SEALED), blobs.dir.join(SEALING));
    if sealed.exists() {
        if sealing.exists() {
            // A run stopped between its two markers.
            fs::remove_file(&sealing).map_err(io_error("removing", &sealing))?;
        }
        return Ok(());
    }
    encrypt_clear_files(blobs)
}

fn encrypt_clear_files(blobs: &Blobs) -> Result<(), BlobError> {
    let dir = &blobs.dir;
    if !dir.join(SEALING).exists() {
        mark(dir, SEALING)?;
    }
    let started = Instant::now();
    let mut removed = 0u64;
    each_partial(dir, |id, _, path| {
        let opens =
            header_of(&path)?.is_some_and(|(_, header)| header.open(&blobs.sealer, &id).is_ok());
        if !opens {
            fs::remove_file(&path).map_err(io_error("removing", &path))?;
            removed += 1;
        }
        Ok(())
    })?;
    let mut total = 0u64;
    each_complete(dir, |_, _| {
        total += 1;
        Ok(())
    })?;
    if total > 0 || removed > 0 {
        tracing::info!(
            files = total,
            removed_partial = removed,
            "encrypting the files at rest"
        );
    }
    let (mut done, mut encrypted, mut bytes, mut damaged) = (0u64, 0u64, 0u64, 0u64);
    let mut last_report = Instant::now();
    each_complete(dir, |id, path| {
        match encrypt_one(blobs, &id, &path)? {
            Found::InTheClear { size } => {
                encrypted += 1;
                bytes += size;
            }
            Found::Encrypted => {}
            Found::Damaged => damaged += 1,
        }
        done += 1;
        if last_report.elapsed() >= PROGRESS_EVERY {
            tracing::info!(done, of = total, "encrypting the files at rest");
            last_report = Instant::now();
        }
        Ok(())
    })?;
    if encrypted > 0 || removed > 0 {
        tracing::info!(
            files = encrypted,
            bytes,
            damaged,
            took_ms = started.elapsed().as_millis() as u64,
            "the files are encrypted at rest"
        );
    }
    mark(dir, SEALED)?;
    let sealing = dir.join(SEALING);
    fs::remove_file(&sealing).map_err(io_error("removing", &sealing))?;
    sync_dir(dir)
}

/// What a complete file was when the files were encrypted.
enum Found {
    /// In the clear, of that size: now encrypted.
    InTheClear {
        /// Its size.
        size: u64,
    },
    /// Encrypted already.
    Encrypted,
    /// Neither: left as it is.
    Damaged,
}

/// Encrypts complete file `id` at `path` if it is in the clear.
fn encrypt_one(blobs: &Blobs, id: &FileId, path: &Path) -> Result<Found, BlobError> {
    let mut file = File::open(path).map_err(io_error("opening", path))?;
    let header = Header::read_from(&mut file).map_err(io_error("reading", path))?;
    // Encrypted already (an earlier run cut off) if and only if its header opens: a file in
    // the clear could start with the magic number.
    if header
        .as_ref()
        .is_some_and(|h| h.open(&blobs.sealer, id).is_ok())
    {
        return Ok(Found::Encrypted);
    }
    let size = file.metadata().map_err(io_error("reading", path))?.len();
    let copy = blobs.tmp_path(&format!("{id}.sealing"));
    let mut out = File::create(&copy).map_err(io_error("creating", &copy))?;
    let in_the_clear = sealed::seal_copy(&mut file, size, &blobs.sealer, id, &mut out)
        .map_err(io_error("encrypting", path))?;
    if !in_the_clear {
        drop(out);
        let _ = fs::remove_file(&copy);
        // Neither encrypted under these keys nor the bytes its name says.
        if let Some(key) = header.as_ref().and_then(Header::key_id)
            && blobs.sealer.keys().is_some_and(|keys| !keys.has(key))
        {
            return Err(BlobError::KeyMissing {
                path: path.to_owned(),
                key,
            });
        }
        tracing::warn!(
            path = %path.display(),
            "a stored file is neither encrypted nor the bytes its name says: left as it is \
             (reading it fails)"
        );
        return Ok(Found::Damaged);
    }
    out.sync_all().map_err(io_error("syncing", &copy))?;
    drop(out);
    fs::rename(&copy, path).map_err(io_error("moving into place", path))?;
    sync_dir(path.parent().unwrap_or(&blobs.dir))?;
    Ok(Found::InTheClear { size })
}

/// The data keys some file's key is wrapped with (complete files and partial ones).
pub(super) fn keys_in_use(blobs: &Blobs) -> Result<BTreeSet<KeyId>, BlobError> {
    let mut ids = BTreeSet::new();
    if !blobs.sealer.is_on() {
        return Ok(ids);
    }
    let mut note = |path: &Path| {
        if let Some(id) = header_of(path)?.and_then(|(_, header)| header.key_id()) {
            ids.insert(id);
        }
        Ok(())
    };
    each_complete(&blobs.dir, |_, path| note(&path))?;
    each_partial(&blobs.dir, |_, _, path| note(&path))?;
    Ok(ids)
}

/// Wraps again with the current data key the key of every file wrapped with another; how many.
pub(super) fn reseal(blobs: &Blobs, mut progress: impl FnMut(u64)) -> Result<u64, BlobError> {
    let Some(current) = blobs.sealer.keys().map(|keys| keys.current()) else {
        return Ok(0);
    };
    let mut done = 0u64;
    let mut first_error = None;
    each_complete(&blobs.dir, |id, path| {
        // A removal waits for the copy, so that a file removed meanwhile does not come back.
        let _replacing = blobs
            .replacing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some((mut file, header)) = header_of(&path)? else {
            if path.exists() {
                first_error.get_or_insert_with(|| unreadable(&path, Unopened::NotEncrypted));
            }
            return Ok(());
        };
        if header.key_id() == Some(current) {
            return Ok(());
        }
        let rewrapped = match header.rewrapped(&blobs.sealer, &id) {
            Ok(rewrapped) => rewrapped,
            // Damaged: the others are done all the same, and the error said at the end.
            Err(reason) => {
                first_error.get_or_insert_with(|| unopened(&path, reason));
                return Ok(());
            }
        };
        let copy = blobs.tmp_path(&format!("{id}.reseal"));
        let mut out = File::create(&copy).map_err(io_error("creating", &copy))?;
        // The chunks do not change (the file key is the same): copied as they are.
        out.write_all(rewrapped.bytes())
            .and_then(|()| io::copy(&mut file, &mut out))
            .and_then(|_| out.sync_all())
            .map_err(io_error("writing", &copy))?;
        drop(out);
        fs::rename(&copy, &path).map_err(io_error("moving into place", &path))?;
        sync_dir(path.parent().unwrap_or(&blobs.dir))?;
        done += 1;
        progress(done);
        Ok(())
    })?;
    each_partial(&blobs.dir, |id, _, path| {
        // A partial file being written is left to its upload, which wraps its key again when
        // it finishes; the others are taken, so that no upload starts meanwhile.
        {
            let mut writing = blobs.writing.lock().unwrap_or_else(PoisonError::into_inner);
            if !writing.insert(path.clone()) {
                return Ok(());
            }
        }
        let claim = Claim {
            writing: Arc::clone(&blobs.writing),
            path,
        };
        if rewrap_partial(blobs, &id, &claim.path, current)? {
            done += 1;
            progress(done);
        }
        Ok(())
    })?;
    first_error.map_or(Ok(done), Err)
}

/// Rewrites a partial file's header in place with its key wrapped with key `current`: whether
/// it did. A partial file is only a cut-off upload's bytes: if a crash tears its header, its
/// upload starts over, so it is not worth a copy.
fn rewrap_partial(
    blobs: &Blobs,
    id: &FileId,
    path: &Path,
    current: KeyId,
) -> Result<bool, BlobError> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error("opening", path)(e)),
    };
    let Some(header) = Header::read_from(&mut file).map_err(io_error("reading", path))? else {
        return Ok(false);
    };
    if header.key_id() == Some(current) {
        return Ok(false);
    }
    // One whose header does not open is started over by its next upload anyway.
    let Ok(rewrapped) = header.rewrapped(&blobs.sealer, id) else {
        return Ok(false);
    };
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.write_all(rewrapped.bytes()))
        .and_then(|()| file.sync_data())
        .map_err(io_error("writing", path))?;
    Ok(true)
}

/// The error of a stored file whose header does not open.
pub(super) fn unopened(path: &Path, reason: Unopened) -> BlobError {
    match reason {
        Unopened::Key(crate::store::sealing::OpenError::MissingKey(key)) => BlobError::KeyMissing {
            path: path.to_owned(),
            key,
        },
        reason => unreadable(path, reason),
    }
}

fn unreadable(path: &Path, reason: impl std::fmt::Display) -> BlobError {
    BlobError::Unreadable {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}
