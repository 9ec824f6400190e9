//! The blob store's cost of encryption at rest: a file uploaded into and downloaded from
//! `iim_host::blobs::Blobs` with its sealer on (XChaCha20-Poly1305 STREAM in 64 KiB chunks)
//! against the same store kept in the clear, the baseline, in MiB/s. No network and no host:
//! only what `cmd::file` asks of the store.
//!
//! Each round writes a new file of `mib` MiB of pseudo-random bytes (its first 8 bytes
//! changed: files are kept by their SHA-256) through `Blobs::upload`, `Upload::write` in
//! pieces of 256 KiB (as `cmd::file` does) and `Upload::finish` (the SHA-256 check, the fsync
//! and the rename included; the SHA-256 the client announces is computed beforehand, untimed);
//! then reads it back with `Blobs::read`, 256 KiB at a time, comparing each piece with the
//! file's bytes. The download reads what the upload just wrote, from the page cache: it
//! measures what decrypting costs, not the disk. Rounds alternate between the two stores, so
//! that a drift of the machine weighs on both alike; the figures are the medians.

use anyhow::{Context, bail};
use iim_host::blobs::{Begun, Blobs, FileId};
use iim_host::store::{DataKeys, Sealer};
use sha2::Digest;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `cmd::file` writes and reads at a time.
const PIECE: usize = 256 * 1024;

/// The shape of a run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// The file's size, in MiB.
    pub mib: u64,
    /// Uploads and downloads measured per store, each of a new file.
    pub rounds: u32,
}

/// One store's figures: medians over the rounds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Store {
    /// The upload, `Blobs::upload` to `Upload::finish` returned, in MiB/s.
    pub upload_mib_per_s: f64,
    /// The download, `Blobs::read` to the last byte read, in MiB/s.
    pub download_mib_per_s: f64,
    /// Every round's upload, in MiB/s.
    pub uploads: Vec<f64>,
    /// Every round's download, in MiB/s.
    pub downloads: Vec<f64>,
    /// The stored file's size over the file's.
    pub stored_over_plain: f64,
}

/// The run's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    /// The file's size, in MiB.
    pub mib: u64,
    /// Rounds per store.
    pub rounds: u32,
    /// The store kept in the clear (the baseline).
    pub clear: Store,
    /// The store with its sealer on.
    pub encrypted: Store,
    /// Encrypted over clear, upload.
    pub upload_ratio: f64,
    /// Encrypted over clear, download.
    pub download_ratio: f64,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Pseudo-random bytes (xorshift), so that nothing compresses or repeats by chance.
fn content(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// A store, and the directory it keeps its files in.
struct Opened {
    blobs: Blobs,
    files: PathBuf,
}

fn open(dir: &Path, max: u64, sealer: Sealer) -> anyhow::Result<Opened> {
    let files = dir.join("files");
    let blobs = Blobs::open(&files, max, sealer)?;
    Ok(Opened { blobs, files })
}

/// Uploads and downloads `bytes` through `store`: MiB/s of each, and the stored file's length.
fn round(store: &Opened, bytes: &[u8]) -> anyhow::Result<(f64, f64, u64)> {
    let blobs = &store.blobs;
    let mib = bytes.len() as f64 / (1024.0 * 1024.0);
    let id = FileId::from_digest(&sha2::Sha256::digest(bytes).into());

    let started = Instant::now();
    let Begun::Partial(mut upload) = blobs.upload(&id, bytes.len() as u64)? else {
        bail!("the store had the file already");
    };
    for piece in bytes.chunks(PIECE) {
        upload.write(piece)?;
    }
    upload.finish()?;
    let upload_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let (mut reader, size) = blobs.read(&id, 0)?.context("the file is not there")?;
    let mut at = 0usize;
    let mut piece = Vec::with_capacity(PIECE);
    loop {
        piece.clear();
        let n = (&mut reader).take(PIECE as u64).read_to_end(&mut piece)?;
        if n == 0 {
            break;
        }
        if bytes.get(at..at + n) != Some(&piece[..]) {
            bail!("the bytes read at {at} are not the file's");
        }
        at += n;
    }
    let download_secs = started.elapsed().as_secs_f64();
    if at != bytes.len() || size != bytes.len() as u64 {
        bail!("{at} bytes read of {}, size said {size}", bytes.len());
    }
    let stored_at = store.files.join(&id.as_str()[..2]).join(id.as_str());
    let stored = std::fs::metadata(stored_at)?.len();
    blobs.remove(&id)?;
    Ok((mib / upload_secs, mib / download_secs, stored))
}

/// Runs the measurement.
pub fn run(shape: Shape) -> anyhow::Result<Figures> {
    let len = usize::try_from(shape.mib << 20)?;
    let dir = tempfile::tempdir()?;
    let clear = open(&dir.path().join("clear"), len as u64, Sealer::clear())?;
    let keys = DataKeys::create(&dir.path().join("data.key"), 1)?;
    let encrypted = open(&dir.path().join("encrypted"), len as u64, Sealer::new(keys))?;
    let mut bytes = content(len);
    // A first round of each, unmeasured: the page cache and the allocator warmed alike.
    let mut runs: [(Vec<f64>, Vec<f64>, u64); 2] = Default::default();
    for n in 0..=shape.rounds {
        for (store, run) in [&clear, &encrypted].into_iter().zip(runs.iter_mut()) {
            bytes[..8].copy_from_slice(&u64::from(n).to_le_bytes());
            let (up, down, stored) = round(store, &bytes)?;
            if n > 0 {
                run.0.push(up);
                run.1.push(down);
            }
            run.2 = stored;
        }
    }
    let figures = |(uploads, downloads, stored): &(Vec<f64>, Vec<f64>, u64)| Store {
        upload_mib_per_s: median(uploads),
        download_mib_per_s: median(downloads),
        uploads: uploads.clone(),
        downloads: downloads.clone(),
        stored_over_plain: *stored as f64 / len as f64,
    };
    let (clear, encrypted) = (figures(&runs[0]), figures(&runs[1]));
    Ok(Figures {
        mib: shape.mib,
        rounds: shape.rounds,
        upload_ratio: encrypted.upload_mib_per_s / clear.upload_mib_per_s,
        download_ratio: encrypted.download_mib_per_s / clear.download_mib_per_s,
        clear,
        encrypted,
    })
}

/// Prints the figures as a table.
pub fn print(f: &Figures) {
    println!(
        "blob store, a {} MiB file, {} rounds per store (medians, MiB/s)",
        f.mib, f.rounds
    );
    println!(
        "{:<12} {:>10} {:>10} {:>14}",
        "", "upload", "download", "stored/plain"
    );
    for (name, store) in [("clear", &f.clear), ("encrypted", &f.encrypted)] {
        println!(
            "{name:<12} {:>10.1} {:>10.1} {:>14.6}",
            store.upload_mib_per_s, store.download_mib_per_s, store.stored_over_plain
        );
    }
    println!(
        "{:<12} {:>10.2} {:>10.2}",
        "enc/clear", f.upload_ratio, f.download_ratio
    );
}
