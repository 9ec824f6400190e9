//! Rotating the data key while the host runs (`iim-host admin rotate-key`, docs/security.md).
//!
//! A rotation adds a key to the key file and makes it current (the file is replaced
//! atomically, then the store records the new key's check, then every writer seals with it);
//! then, in the background, whatever older keys sealed — records of the store, and the wrapped
//! keys of the files — is re-encrypted with it. Reads never wait: an older key opens what it
//! sealed until then. A rotation cut off by a restart goes on at the next start. The key file
//! keeps the older keys, for backups of the data directory made before the rotation.

use crate::blobs::Blobs;
use crate::store::Store;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What a re-encryption has done so far.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Whether it is still running.
    running: bool,
    /// Records of the store re-encrypted.
    records: u64,
    /// Files whose key was wrapped again.
    files: u64,
    /// When it started and how long it took.
    started: Option<Instant>,
    took: Option<Duration>,
    /// How it failed, if it did.
    error: Option<String>,
}

/// The host's key rotations: one at a time.
#[derive(Debug, Default)]
pub struct KeyRotation {
    progress: Arc<Mutex<Progress>>,
}

impl KeyRotation {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes a new data key current and starts re-encrypting in the background; the answer
    /// for the operator.
    pub fn rotate(&self, store: &Store, blobs: &Blobs) -> Result<String, String> {
        let Some(keys) = store.sealer.keys() else {
            return Err(
                "the store is kept in the clear (storage.encrypt = false): there is no data key \
                 to rotate"
                    .into(),
            );
        };
        {
            let progress = self.progress();
            if progress.running {
                return Err(format!(
                    "a rotation is still re-encrypting ({} records, {} files so far): wait for \
                     it (iim-host admin key-status)",
                    progress.records, progress.files
                ));
            }
        }
        let older = keys.current();
        let rotated = keys
            .rotated(crate::clock::now_ms())
            .map_err(|e| format!("cannot write the new key: {e}"))?;
        let current = rotated.current();
        let path = rotated.path().display().to_string();
        store
            .rotate(rotated)
            .map_err(|e| format!("cannot start sealing with the new key: {e}"))?;
        tracing::info!(key = current, older, key_file = %path, "data key rotated");
        self.resume(store, blobs);
        Ok(format!(
            "data key {current} of {path} now seals every new write; what key {older} and \
             older sealed is being re-encrypted in the background (iim-host admin key-status). \
             Keep the older keys in the file while backups made before now may be restored.\n"
        ))
    }

    /// Re-encrypts in the background whatever older keys sealed, if anything (a rotation just
    /// made, or one a restart cut off).
    pub fn resume(&self, store: &Store, blobs: &Blobs) {
        {
            let mut progress = self.progress();
            if progress.running {
                return;
            }
            *progress = Progress {
                running: true,
                started: Some(Instant::now()),
                ..Progress::default()
            };
        }
        let (store, blobs, shared) = (store.clone(), blobs.clone(), Arc::clone(&self.progress));
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = reseal(&store, &blobs, &shared);
            let mut progress = shared.lock().unwrap_or_else(PoisonError::into_inner);
            progress.running = false;
            progress.took = Some(started.elapsed());
            match result {
                Ok(()) => tracing::info!(
                    records = progress.records,
                    files = progress.files,
                    took_ms = started.elapsed().as_millis() as u64,
                    "re-encryption with the current data key done"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "re-encryption with the current data key failed; it goes on at the next start");
                    progress.error = Some(e);
                }
            }
        });
    }

    /// The operator's view: the key file, the current key, the keys still in use, and the
    /// re-encryption's progress.
    pub fn status(&self, store: &Store) -> String {
        let Some(keys) = store.sealer.keys() else {
            return "encryption off (storage.encrypt = false)\n".into();
        };
        let mut out = String::new();
        let _ = writeln!(out, "key_file {}", keys.path().display());
        let _ = writeln!(out, "current {}", keys.current());
        // The store's key checks cover the files too: an older key's check goes only once
        // every file's key is wrapped again (`reseal`), so no file's header is read here.
        match store.keys_in_use() {
            Ok(ids) => {
                let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
                let _ = writeln!(out, "in_use {}", ids.join(","));
            }
            Err(e) => {
                let _ = writeln!(out, "in_use unknown: {e}");
            }
        }
        let progress = self.progress().clone();
        let state = match (&progress.error, progress.running, progress.started) {
            (_, _, None) => "none",
            (_, true, _) => "running",
            (Some(_), false, _) => "failed",
            (None, false, _) => "done",
        };
        let _ = writeln!(out, "reencryption {state}");
        let _ = writeln!(out, "reencrypted_records {}", progress.records);
        let _ = writeln!(out, "reencrypted_files {}", progress.files);
        if let Some(took) = progress.took {
            let _ = writeln!(out, "took_ms {}", took.as_millis());
        }
        if let Some(error) = progress.error {
            let _ = writeln!(out, "error {error}");
        }
        out
    }
}

/// Re-encrypts the store's records, then the files' keys, then forgets the older keys.
fn reseal(store: &Store, blobs: &Blobs, progress: &Mutex<Progress>) -> Result<(), String> {
    let mut last_log = Instant::now();
    let mut log = |what: &str, n: u64| {
        if last_log.elapsed() >= Duration::from_secs(5) {
            tracing::info!(n, "re-encrypting {what}");
            last_log = Instant::now();
        }
    };
    store
        .reseal(|n| {
            progress
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .records = n;
            log("records", n);
        })
        .map_err(|e| e.to_string())?;
    blobs
        .reseal(|n| {
            progress
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .files = n;
            log("files", n);
        })
        .map_err(|e| e.to_string())?;
    store.forget_older_keys().map_err(|e| e.to_string())
}
