//! Rotating the data key while the host (or the exchange) runs (`iim-host admin rotate-key`,
//! docs/security.md).
//!
//! A rotation adds a key to the key file and makes it current (the file is replaced
//! atomically, then the store records the new key's check, then every writer seals with it);
//! then, in the background, whatever older keys sealed — records of the store, and the wrapped
//! keys of the files — is re-encrypted with it. Reads never wait: an older key opens what it
//! sealed until then. A rotation cut off by a restart goes on at the next start. The key file
//! keeps the older keys, for backups of the data directory made before the rotation.

use crate::blobs::Blobs;
use crate::store::exchange::ExchangeStore;
use crate::store::{DataKeys, KeyId, Sealer, Store, StoreError};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What a rotation re-encrypts: a host's store and files, or an exchange's store.
pub trait Sealed: Clone + Send + 'static {
    /// What seals it.
    fn sealer(&self) -> &Sealer;
    /// Makes `rotated`'s current key seal every new write.
    fn rotate(&self, rotated: DataKeys) -> Result<(), StoreError>;
    /// Re-encrypts what older keys sealed: the records (`records` told how many so far), then
    /// the files (`files`).
    fn reseal(
        &self,
        records: &mut dyn FnMut(u64),
        files: &mut dyn FnMut(u64),
    ) -> Result<(), String>;
    /// Forgets the older keys' checks: nothing is sealed with them any longer.
    fn forget_older_keys(&self) -> Result<(), StoreError>;
    /// The keys something may still be sealed with.
    fn keys_in_use(&self) -> Result<BTreeSet<KeyId>, StoreError>;
}

/// A host's data: its store and its files.
#[derive(Clone)]
pub struct HostData {
    /// The store.
    pub store: Store,
    /// The files.
    pub blobs: Blobs,
}

impl Sealed for HostData {
    fn sealer(&self) -> &Sealer {
        &self.store.sealer
    }

    fn rotate(&self, rotated: DataKeys) -> Result<(), StoreError> {
        self.store.rotate(rotated)
    }

    fn reseal(
        &self,
        records: &mut dyn FnMut(u64),
        files: &mut dyn FnMut(u64),
    ) -> Result<(), String> {
        self.store.reseal(records).map_err(|e| e.to_string())?;
        self.blobs
            .reseal(files)
            .map_err(|e| e.to_string())
            .map(drop)
    }

    fn forget_older_keys(&self) -> Result<(), StoreError> {
        self.store.forget_older_keys()
    }

    fn keys_in_use(&self) -> Result<BTreeSet<KeyId>, StoreError> {
        // The store's key checks cover the files too: an older key's check goes only once
        // every file's key is wrapped again (`reseal`), so no file's header is read here.
        self.store.keys_in_use()
    }
}

impl Sealed for ExchangeStore {
    fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    fn rotate(&self, rotated: DataKeys) -> Result<(), StoreError> {
        ExchangeStore::rotate(self, rotated)
    }

    fn reseal(&self, records: &mut dyn FnMut(u64), _: &mut dyn FnMut(u64)) -> Result<(), String> {
        ExchangeStore::reseal(self, records)
            .map_err(|e| e.to_string())
            .map(drop)
    }

    fn forget_older_keys(&self) -> Result<(), StoreError> {
        ExchangeStore::forget_older_keys(self)
    }

    fn keys_in_use(&self) -> Result<BTreeSet<KeyId>, StoreError> {
        ExchangeStore::keys_in_use(self)
    }
}

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

/// The key rotations of a host or an exchange: one at a time.
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
    pub fn rotate(&self, data: &impl Sealed) -> Result<String, String> {
        let Some(keys) = data.sealer().keys() else {
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
        data.rotate(rotated)
            .map_err(|e| format!("cannot start sealing with the new key: {e}"))?;
        tracing::info!(key = current, older, key_file = %path, "data key rotated");
        self.resume(data);
        Ok(format!(
            "data key {current} of {path} now seals every new write; what key {older} and \
             older sealed is being re-encrypted in the background (iim-host admin key-status). \
             Keep the older keys in the file while backups made before now may be restored.\n"
        ))
    }

    /// Re-encrypts in the background whatever older keys sealed, if anything (a rotation just
    /// made, or one a restart cut off).
    pub fn resume(&self, data: &impl Sealed) {
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
        let (data, shared) = (data.clone(), Arc::clone(&self.progress));
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = reseal(&data, &shared);
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
    pub fn status(&self, data: &impl Sealed) -> String {
        let Some(keys) = data.sealer().keys() else {
            return "encryption off (storage.encrypt = false)\n".into();
        };
        let mut out = String::new();
        let _ = writeln!(out, "key_file {}", keys.path().display());
        let _ = writeln!(out, "current {}", keys.current());
        match data.keys_in_use() {
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

/// Re-encrypts the records, then the files' keys, then forgets the older keys.
fn reseal(data: &impl Sealed, progress: &Mutex<Progress>) -> Result<(), String> {
    let last_log = Mutex::new(Instant::now());
    let log = |what: &str, n: u64| {
        let mut last = last_log.lock().unwrap_or_else(PoisonError::into_inner);
        if last.elapsed() >= Duration::from_secs(5) {
            tracing::info!(n, "re-encrypting {what}");
            *last = Instant::now();
        }
    };
    let set = |update: &dyn Fn(&mut Progress)| {
        update(&mut progress.lock().unwrap_or_else(PoisonError::into_inner));
    };
    data.reseal(
        &mut |n| {
            set(&|p| p.records = n);
            log("records", n);
        },
        &mut |n| {
            set(&|p| p.files = n);
            log("files", n);
        },
    )?;
    data.forget_older_keys().map_err(|e| e.to_string())
}
