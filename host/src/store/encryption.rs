//! The store's side of encryption at rest: checking a store's data keys before anything is
//! written, sealing a store kept in the clear until now, and re-encrypting what older keys
//! sealed after a rotation. Which records are sealed is [`keys::sealed`]; how is
//! [`super::sealing`].

use super::sealing::{self, KeyId, OpenError, Sealer};
use super::{StoreError, get_u64, keys};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What a key check record holds, sealed.
const CHECK: &[u8] = b"iim data key check";

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// `path` with `suffix` added to its last component (`store` → `store.sealing`).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(suffix);
    path.with_file_name(name)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let dir = match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("syncing", dir))
}

/// Whether `db` holds any record that an encrypted store seals.
fn has_sealed_records(db: &sled::Db) -> Result<bool, StoreError> {
    for name in keys::SEALED_TREES {
        if !db.tree_names().iter().any(|n| n == name.as_bytes()) {
            continue;
        }
        for entry in db.open_tree(name)?.iter() {
            if keys::sealed(name, &entry?.0) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Seals the store at `path` if `sealer` seals and the store holds records in the clear: every
/// record is copied into a new database beside it (`<path>.sealing`), sealed records sealed,
/// which then takes the store's place. Copying rather than sealing in place leaves nothing in
/// the clear in sled's log. A copy a crash cut off is made again; one that was complete is put
/// in place.
pub(super) fn seal_if_clear(path: &Path, sealer: &Sealer) -> Result<(), StoreError> {
    let sealing = beside(path, ".sealing");
    let clear = beside(path, ".clear");
    if sealing.exists() {
        if path.exists() {
            std::fs::remove_dir_all(&sealing).map_err(io_error("removing", &sealing))?;
        } else {
            // The copy was complete and the store moved aside: finish the swap.
            std::fs::rename(&sealing, path).map_err(io_error("moving into place", path))?;
            sync_dir(path)?;
        }
    }
    if clear.exists() && path.exists() {
        std::fs::remove_dir_all(&clear).map_err(io_error("removing", &clear))?;
    }
    let Some(keys) = sealer.keys() else {
        return Ok(());
    };
    // A store with key checks is encrypted (they are written once it is): it is not opened
    // here, so that a wrong key file changes nothing.
    if !path.exists() || KeyChecks::of(path).read()?.is_some() {
        return Ok(());
    }
    let old = sled::Config::new().path(path).flush_every_ms(None).open()?;
    let log = path.join("log");
    if old.contains_key(keys::SEALED)?
        || !(has_sealed_records(&old)? || super::hot::log_has_records(&log)?)
    {
        return Ok(());
    }
    let total: usize = old.len()
        + old
            .tree_names()
            .iter()
            .filter(|n| n.as_ref() != b"__sled__default")
            .map(|n| old.open_tree(n).map(|t| t.len()).unwrap_or(0))
            .sum::<usize>();
    tracing::info!(
        store = %path.display(),
        records = total,
        key_file = %keys.path().display(),
        "encrypting a store kept in the clear until now (once; the host starts when it is done)"
    );
    let new = sled::Config::new()
        .path(&sealing)
        .flush_every_ms(None)
        .open()?;
    let mut copied = 0usize;
    let mut last_report = std::time::Instant::now();
    for name in old.tree_names() {
        let (from, to, tree) = if name.as_ref() == b"__sled__default" {
            (
                std::ops::Deref::deref(&old).clone(),
                std::ops::Deref::deref(&new).clone(),
                String::from("default"),
            )
        } else {
            (
                old.open_tree(&name)?,
                new.open_tree(&name)?,
                String::from_utf8_lossy(&name).into_owned(),
            )
        };
        for entry in from.iter() {
            let (key, value) = entry?;
            let value = if keys::sealed(&tree, &key) {
                sealer.seal(&tree, &key, value.to_vec())
            } else {
                value.to_vec()
            };
            to.insert(key, value)?;
            copied += 1;
            if last_report.elapsed() >= std::time::Duration::from_secs(5) {
                tracing::info!(copied, total, "encrypting the store");
                last_report = std::time::Instant::now();
            }
        }
    }
    // Numbers go on above the old database's: sled's id generator starts again in a new one.
    let floor = get_u64(&old, "default", keys::ID_FLOOR)?.unwrap_or(0) + old.generate_id()? + 1;
    new.insert(keys::ID_FLOOR, &floor.to_be_bytes())?;
    new.insert(keys::SEALED, &[])?;
    copied += super::hot::seal_log(&log, &sealing.join("log"), sealer)? as usize;
    new.flush()?;
    drop((old, new));
    std::fs::rename(path, &clear).map_err(io_error("moving aside", path))?;
    std::fs::rename(&sealing, path).map_err(io_error("moving into place", path))?;
    sync_dir(path)?;
    KeyChecks::of(path).add(sealer, keys.current())?;
    std::fs::remove_dir_all(&clear).map_err(io_error("removing", &clear))?;
    tracing::info!(records = copied, "the store is encrypted");
    Ok(())
}

/// The key checks of the store at `path`, in a file beside it (`<path>.keys`): for every data
/// key some record may still be sealed with, a known text sealed with that key. Read before
/// the store is opened (opening a sled database writes to it), so that a store opened with the
/// wrong key file, or none, is refused before anything changes. One line per key: `id hex`.
struct KeyChecks {
    path: PathBuf,
}

impl KeyChecks {
    fn of(store: &Path) -> Self {
        Self {
            path: beside(store, ".keys"),
        }
    }

    /// The checks, by key id; `None` if the store is not encrypted (no file).
    fn read(&self) -> Result<Option<BTreeMap<KeyId, Vec<u8>>>, StoreError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("reading", &self.path)(e)),
        };
        let corrupt = |line: &str| {
            StoreError::Keys(format!(
                "the key check file {} is damaged (line {line:?})",
                self.path.display()
            ))
        };
        let mut checks = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (id, hex) = line.split_once(' ').ok_or_else(|| corrupt(line))?;
            let id: KeyId = id.parse().map_err(|_| corrupt(line))?;
            let bytes = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| corrupt(line))?;
            checks.insert(id, bytes);
        }
        Ok(Some(checks))
    }

    /// Replaces the file with `checks`: a temporary file, synced, renamed over it.
    fn write(&self, checks: &BTreeMap<KeyId, Vec<u8>>) -> Result<(), StoreError> {
        let mut text = String::new();
        for (id, check) in checks {
            let hex: String = check.iter().map(|b| format!("{b:02x}")).collect();
            text.push_str(&format!("{id} {hex}\n"));
        }
        let temporary = beside(&self.path, ".new");
        std::fs::write(&temporary, text)
            .and_then(|()| std::fs::File::open(&temporary)?.sync_all())
            .map_err(io_error("writing", &temporary))?;
        std::fs::rename(&temporary, &self.path).map_err(io_error("writing", &self.path))?;
        sync_dir(&self.path)
    }

    /// Adds the check of key `id` of `sealer`.
    fn add(&self, sealer: &Sealer, id: KeyId) -> Result<(), StoreError> {
        let mut checks = self.read()?.unwrap_or_default();
        let check = sealer
            .seal_with(id, "keys", &id.to_be_bytes(), CHECK)
            .ok_or_else(|| StoreError::Keys(format!("data key {id} is not in the key file")))?;
        checks.insert(id, check);
        self.write(&checks)
    }
}

/// Whether the store at `path` (which may not exist) is encrypted. Writes nothing.
pub(super) fn is_sealed(path: &Path) -> Result<bool, StoreError> {
    Ok(KeyChecks::of(path).read()?.is_some() || beside(path, ".sealing").exists())
}

/// Refuses the store at `path` if `sealer` lacks or gets wrong a data key it uses, or is off
/// for an encrypted store — before the store is opened, so that nothing changes. For a store
/// that `sealer` seals and that has no checks yet (new), or none of its current key (a
/// rotation a crash cut off after the key file was written), records them.
pub(super) fn check_keys(path: &Path, sealer: &Sealer) -> Result<(), StoreError> {
    let checks = KeyChecks::of(path);
    let found = checks.read()?;
    let Some(data_keys) = sealer.keys() else {
        if found.is_some() {
            return Err(StoreError::Keys(
                "the store is encrypted and storage.encrypt is off: it opens only with its \
                 data key (storage.key_file)"
                    .into(),
            ));
        }
        return Ok(());
    };
    let file = data_keys.path().display();
    for (id, check) in found.iter().flatten() {
        match sealer.try_open("keys", &id.to_be_bytes(), check) {
            Ok(text) if text == CHECK => {}
            Err(OpenError::MissingKey(id)) => {
                return Err(StoreError::Keys(format!(
                    "the store holds data sealed with data key {id}, which the key file {file} \
                     lacks: is it this data directory's key file?"
                )));
            }
            _ => {
                return Err(StoreError::Keys(format!(
                    "data key {id} of {file} does not open this store: the wrong key file \
                     (or the store's key checks were altered)"
                )));
            }
        }
    }
    if !found.is_some_and(|f| f.contains_key(&data_keys.current())) {
        checks.add(sealer, data_keys.current())?;
    }
    Ok(())
}

/// Marks `db` sealed (after [`check_keys`]), or refuses it if it is sealed and `sealer` is off
/// (its key checks are gone).
pub(super) fn mark_sealed(db: &sled::Db, sealer: &Sealer) -> Result<(), StoreError> {
    match (sealer.is_on(), db.contains_key(keys::SEALED)?) {
        (true, false) => {
            db.insert(keys::SEALED, &[])?;
        }
        (false, true) => {
            return Err(StoreError::Keys(
                "the store is encrypted and storage.encrypt is off: it opens only with its \
                 data key (storage.key_file)"
                    .into(),
            ));
        }
        _ => {}
    }
    Ok(())
}

/// The ids of the data keys some record of the store at `path` may still be sealed with.
pub(super) fn keys_in_use(path: &Path) -> Result<BTreeSet<KeyId>, StoreError> {
    Ok(KeyChecks::of(path)
        .read()?
        .map(|checks| checks.into_keys().collect())
        .unwrap_or_default())
}

/// Re-encrypts with the current data key every sealed record of `db` that an older key
/// sealed. Records changed
/// meanwhile by a writer are left to it (it seals with the current key); passes go on until one
/// finds nothing left. Calls `progress` with the number of records re-encrypted so far. Returns
/// how many records were re-encrypted.
pub(super) fn reseal(
    db: &sled::Db,
    sealer: &Sealer,
    mut progress: impl FnMut(u64),
) -> Result<u64, StoreError> {
    let Some(data_keys) = sealer.keys() else {
        return Ok(0);
    };
    let current = data_keys.current();
    let mut done = 0u64;
    loop {
        let mut found = 0u64;
        for name in keys::SEALED_TREES {
            if !db.tree_names().iter().any(|n| n == name.as_bytes()) {
                continue;
            }
            let tree = db.open_tree(name)?;
            for entry in tree.iter() {
                let (key, value) = entry?;
                if !keys::sealed(name, &key) || sealing::key_of(&value) == Some(current) {
                    continue;
                }
                found += 1;
                let plain =
                    sealer
                        .try_open(name, &key, &value)
                        .map_err(|reason| StoreError::Sealed {
                            tree: "(re-encryption)",
                            reason,
                        })?;
                let again = sealer.seal(name, &key, plain);
                if tree
                    .compare_and_swap(&key, Some(value), Some(again))?
                    .is_ok()
                {
                    done += 1;
                    progress(done);
                }
            }
        }
        if found == 0 {
            break;
        }
    }
    Ok(done)
}

/// Forgets the checks of every key but the current one: no record of the store at `path` is
/// sealed with them any longer ([`reseal`] is done).
pub(super) fn forget_older_keys(path: &Path, sealer: &Sealer) -> Result<(), StoreError> {
    let Some(data_keys) = sealer.keys() else {
        return Ok(());
    };
    let checks = KeyChecks::of(path);
    let mut found = checks.read()?.unwrap_or_default();
    found.retain(|id, _| *id == data_keys.current());
    checks.write(&found)
}

/// Makes `rotated` (the key file after a rotation) the keys `sealer` seals with: records the
/// new key's check first, so that a restart knows that key is in use.
pub(super) fn rotate(
    path: &Path,
    sealer: &Sealer,
    rotated: sealing::DataKeys,
) -> Result<(), StoreError> {
    if !sealer.is_on() {
        return Err(StoreError::Keys(
            "the store is kept in the clear (storage.encrypt is off): no key to rotate".into(),
        ));
    }
    let current = rotated.current();
    KeyChecks::of(path).add(&Sealer::new(rotated.clone()), current)?;
    sealer.replace(rotated);
    Ok(())
}
