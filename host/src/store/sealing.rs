//! Encryption at rest: the data keys, their file, and the [`Sealer`] that encrypts the values
//! that carry what users wrote (docs/security.md).
//!
//! A sealed value is `version (1) ‖ key id (4, big-endian) ‖ salt (16) ‖ nonce (12) ‖
//! ciphertext ‖ tag (16)`: AES-256-GCM (ring's) under a subkey derived from the data key and the
//! salt with HKDF-SHA256 (RFC 5869, ring's), with the tree's name and the record's key as
//! associated data, so that a value moved to another record no longer opens. Why a subkey:
//! nonces are random (a counter would repeat when a data directory is copied and both copies
//! run, or restored from a backup), and AES-GCM allows about 2^32 random nonces per key; a
//! sealer takes a new random salt, so a new subkey, at every start and after [`SUBKEY_USES`]
//! seals, which keeps the chance of a repeated nonce under a subkey below 2^-37. (RustCrypto's
//! XChaCha20-Poly1305, whose 192-bit nonces need no subkeys, seals a 200-byte record in about
//! 2 µs here against 0.3 µs for this: on the message path that was a fifth of the throughput.)
//! Which records are sealed is said in one place, [`super::keys::sealed`]; keys (user names,
//! positions) stay readable, which is what lets the store find records without the key.
//!
//! The data keys live in a key file outside the data directory. It names the key that seals
//! new writes (`current`) and keeps older ones, which still open what they sealed until the
//! store has re-encrypted it ([`super::Store::reseal`]).

use rand::RngCore;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::StoreError;

/// The version byte of a sealed value.
const VERSION: u8 = 1;
const SALT: usize = 16;
const NONCE: usize = 12;
const TAG: usize = 16;
/// Where the ciphertext starts: after version, key id, salt and nonce.
const BODY: usize = 1 + 4 + SALT + NONCE;
/// What sealing adds to a value: version, key id, salt, nonce, tag.
pub const OVERHEAD: usize = BODY + TAG;
/// Seals under one subkey, at most, before a sealer derives the next.
pub const SUBKEY_USES: u64 = 1 << 30;
/// HKDF's `info`: what the subkeys are for.
const SUBKEY_INFO: &[u8] = b"iim store value v1";
/// Subkeys kept for opening, at most (one per start and per 2^30 seals of each key).
const MAX_OPENERS: usize = 4096;

/// A data key's number in its key file.
pub type KeyId = u32;

/// Why the data keys could not be read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("data key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a key file.
    #[error("data key file {path} is not valid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The key file as written: the current key's id and every key, in hex.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileText {
    current: KeyId,
    keys: Vec<KeyText>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyText {
    id: KeyId,
    /// 32 bytes, 64 hex digits.
    key: String,
    /// When it was made, in milliseconds since the Unix epoch.
    created_at: u64,
}

const KEY_FILE_HEADER: &str = "\
# iim data keys (docs/security.md). Whoever holds this file and a copy of the data directory
# can read every stored message: keep it out of the data directory and of its backups, readable
# by the host's user only. `iim-host admin rotate-key` adds a key and makes it current; keep the
# older keys as long as a backup of the data directory made before the rotation may be restored.
";

/// A data key.
#[derive(Clone)]
struct DataKey {
    bytes: [u8; 32],
    created_at: u64,
}

/// A subkey a sealer seals with: derived from a data key and a random salt.
struct Subkey {
    salt: [u8; SALT],
    key: Arc<LessSafeKey>,
    /// Seals made under it.
    uses: AtomicU64,
}

/// Subkeys for opening, by data key and salt.
type Openers = HashMap<(KeyId, [u8; SALT]), Arc<LessSafeKey>>;

/// The data keys of a key file: the current one seals, every one opens.
pub struct DataKeys {
    path: PathBuf,
    current: KeyId,
    keys: BTreeMap<KeyId, DataKey>,
    /// The subkey each key seals with now.
    sealing: RwLock<HashMap<KeyId, Arc<Subkey>>>,
    /// Subkeys derived so far, by key and salt, for opening.
    opening: Mutex<Openers>,
}

impl Clone for DataKeys {
    /// The same keys, with subkeys of their own.
    fn clone(&self) -> Self {
        Self::with(self.path.clone(), self.current, self.keys.clone())
    }
}

impl std::fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("DataKeys")
            .field("path", &self.path)
            .field("current", &self.current)
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn new_key(now: u64) -> Result<DataKey, KeyFileError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| {
        KeyFileError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other("the system's random number generator failed"),
        }
    })?;
    Ok(DataKey {
        bytes,
        created_at: now,
    })
}

/// The subkey of `key` for `salt`.
fn derive(key: &DataKey, salt: &[u8; SALT]) -> LessSafeKey {
    let prk = Salt::new(HKDF_SHA256, salt).extract(&key.bytes);
    // The length asked for is AES-256's key length, which HKDF-SHA256 always gives.
    let okm = prk
        .expand(&[SUBKEY_INFO], &AES_256_GCM)
        .unwrap_or_else(|_| unreachable!("32 bytes is within HKDF-SHA256's output"));
    LessSafeKey::new(UnboundKey::from(okm))
}

impl DataKeys {
    fn with(path: PathBuf, current: KeyId, keys: BTreeMap<KeyId, DataKey>) -> Self {
        Self {
            path,
            current,
            keys,
            sealing: RwLock::default(),
            opening: Mutex::default(),
        }
    }

    /// Reads the key file at `path`.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(io_error(path))?;
        let invalid = |reason: String| KeyFileError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let file: KeyFileText = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let mut keys = BTreeMap::new();
        for key in file.keys {
            let bytes = unhex(&key.key)
                .ok_or_else(|| invalid(format!("key {} is not 64 hex digits", key.id)))?;
            let data_key = DataKey {
                bytes,
                created_at: key.created_at,
            };
            if keys.insert(key.id, data_key).is_some() {
                return Err(invalid(format!("key {} is there twice", key.id)));
            }
        }
        if !keys.contains_key(&file.current) {
            return Err(invalid(format!(
                "the current key, {}, is not among its keys",
                file.current
            )));
        }
        Ok(Self::with(path.to_owned(), file.current, keys))
    }

    /// Makes a key file at `path` with one new key (mode 0600; refused if one is there).
    pub fn create(path: &Path, now: u64) -> Result<Self, KeyFileError> {
        let keys = Self::with(path.to_owned(), 1, BTreeMap::from([(1, new_key(now)?)]));
        keys.write(false)?;
        Ok(keys)
    }

    /// These keys and a new one, made current, written to the key file (replacing it
    /// atomically). The new key's id is one more than the largest.
    pub fn rotated(&self, now: u64) -> Result<Self, KeyFileError> {
        let id = self.keys.keys().next_back().copied().unwrap_or(0) + 1;
        let mut keys = self.clone();
        keys.keys.insert(id, new_key(now)?);
        keys.current = id;
        keys.write(true)?;
        Ok(keys)
    }

    /// The key file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key that seals new writes.
    pub fn current(&self) -> KeyId {
        self.current
    }

    /// Whether key `id` is in the file.
    pub fn has(&self, id: KeyId) -> bool {
        self.keys.contains_key(&id)
    }

    /// Writes the file: a temporary file beside it (mode 0600), synced, renamed over it.
    fn write(&self, replace: bool) -> Result<(), KeyFileError> {
        let path = &self.path;
        let text = KeyFileText {
            current: self.current,
            keys: self
                .keys
                .iter()
                .map(|(id, key)| KeyText {
                    id: *id,
                    key: hex(&key.bytes),
                    created_at: key.created_at,
                })
                .collect(),
        };
        let body = toml::to_string(&text).map_err(|e| KeyFileError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if !replace && path.exists() {
            return Err(KeyFileError::Io {
                path: path.clone(),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(".new");
        let temporary = path.with_file_name(name);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&temporary).map_err(io_error(&temporary))?;
        file.write_all(KEY_FILE_HEADER.as_bytes())
            .and_then(|()| file.write_all(body.as_bytes()))
            .and_then(|()| file.sync_all())
            .map_err(io_error(&temporary))?;
        std::fs::rename(&temporary, path).map_err(io_error(path))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&dir))
    }

    /// The subkey key `id` seals with now (which must be in the file): a new one, with a
    /// new random salt, at first and after [`SUBKEY_USES`] seals.
    fn subkey(&self, id: KeyId) -> Arc<Subkey> {
        let fresh = |sub: &Subkey| sub.uses.load(Ordering::Relaxed) < SUBKEY_USES;
        if let Some(sub) = self
            .sealing
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .filter(|sub| fresh(sub))
        {
            return Arc::clone(sub);
        }
        let mut sealing = self.sealing.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(sub) = sealing.get(&id).filter(|sub| fresh(sub)) {
            return Arc::clone(sub);
        }
        let mut salt = [0u8; SALT];
        rand::rng().fill_bytes(&mut salt);
        let key = Arc::new(derive(&self.keys[&id], &salt));
        self.opener_insert(id, salt, Arc::clone(&key));
        let sub = Arc::new(Subkey {
            salt,
            key,
            uses: AtomicU64::new(0),
        });
        sealing.insert(id, Arc::clone(&sub));
        sub
    }

    fn opener_insert(&self, id: KeyId, salt: [u8; SALT], key: Arc<LessSafeKey>) {
        let mut opening = self.opening.lock().unwrap_or_else(PoisonError::into_inner);
        if opening.len() >= MAX_OPENERS {
            opening.clear();
        }
        opening.insert((id, salt), key);
    }

    /// The subkey that opens what key `id` sealed under `salt`, if the file has key `id`.
    fn opener(&self, id: KeyId, salt: [u8; SALT]) -> Option<Arc<LessSafeKey>> {
        if let Some(key) = self
            .opening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(id, salt))
        {
            return Some(Arc::clone(key));
        }
        let key = Arc::new(derive(self.keys.get(&id)?, &salt));
        self.opener_insert(id, salt, Arc::clone(&key));
        Some(key)
    }

    fn seal_with(&self, id: KeyId, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let sub = self.subkey(id);
        sub.uses.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; NONCE];
        rand::rng().fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
        out.push(VERSION);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&sub.salt);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let mut body = out.split_off(BODY);
        // Sealing fails only past AES-GCM's 64 GiB per value: never for a store's records.
        if sub
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .is_err()
        {
            unreachable!("a record is far below AES-GCM's limit");
        }
        out.append(&mut body);
        out
    }

    fn open(&self, aad: &[u8], stored: &[u8]) -> Result<Vec<u8>, OpenError> {
        let id = key_of(stored).ok_or(OpenError::NotSealed)?;
        let mut salt = [0u8; SALT];
        salt.copy_from_slice(&stored[5..5 + SALT]);
        let mut nonce = [0u8; NONCE];
        nonce.copy_from_slice(&stored[5 + SALT..BODY]);
        let key = self.opener(id, salt).ok_or(OpenError::MissingKey(id))?;
        let mut body = stored[BODY..].to_vec();
        let plain_len = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| OpenError::Wrong(id))?
            .len();
        body.truncate(plain_len);
        Ok(body)
    }
}

/// Why a stored value did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// It is not a sealed value (too short, or another version).
    NotSealed,
    /// It was sealed with a key the key file lacks.
    MissingKey(KeyId),
    /// The key of that id does not open it: another key under that id, or altered bytes.
    Wrong(KeyId),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotSealed => write!(f, "it is not encrypted"),
            Self::MissingKey(id) => write!(f, "it is sealed with data key {id}, which is missing"),
            Self::Wrong(id) => write!(
                f,
                "data key {id} does not open it (another key, or the value was altered)"
            ),
        }
    }
}

/// The id of the key that sealed `stored`, if it is a sealed value.
pub fn key_of(stored: &[u8]) -> Option<KeyId> {
    if stored.len() < OVERHEAD || stored[0] != VERSION {
        return None;
    }
    Some(KeyId::from_be_bytes([
        stored[1], stored[2], stored[3], stored[4],
    ]))
}

/// The associated data of a record: its tree's name and its key.
fn aad(tree: &str, key: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(tree.len() + 1 + key.len());
    aad.extend_from_slice(tree.as_bytes());
    aad.push(0);
    aad.extend_from_slice(key);
    aad
}

/// Seals and opens the store's sealed records with the current data keys; passes them through
/// unchanged for a store kept in the clear (`storage.encrypt = false`). Cloning it is cheap:
/// the clones share the keys, which a rotation replaces for all of them at once.
#[derive(Clone, Default)]
pub struct Sealer {
    keys: Option<Arc<RwLock<Arc<DataKeys>>>>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Sealer").field(&self.keys()).finish()
    }
}

impl Sealer {
    /// A sealer for a store kept in the clear.
    pub fn clear() -> Self {
        Self::default()
    }

    /// A sealer with `keys`.
    pub fn new(keys: DataKeys) -> Self {
        Self {
            keys: Some(Arc::new(RwLock::new(Arc::new(keys)))),
        }
    }

    /// Whether values are sealed.
    pub fn is_on(&self) -> bool {
        self.keys.is_some()
    }

    /// The keys now in use, if values are sealed.
    pub fn keys(&self) -> Option<Arc<DataKeys>> {
        self.keys
            .as_ref()
            .map(|k| Arc::clone(&k.read().unwrap_or_else(PoisonError::into_inner)))
    }

    /// Replaces the keys (a rotation): every clone seals with the new current key from now on.
    pub fn replace(&self, keys: DataKeys) {
        if let Some(shared) = &self.keys {
            *shared.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        }
    }

    /// `plain`, the value of record `key` of `tree`, as it is to be stored.
    pub fn seal(&self, tree: &str, key: &[u8], plain: Vec<u8>) -> Vec<u8> {
        match self.keys() {
            Some(keys) => keys.seal_with(keys.current, &aad(tree, key), &plain),
            None => plain,
        }
    }

    /// `plain` sealed with key `id` (which must be in the key file).
    pub(super) fn seal_with(
        &self,
        id: KeyId,
        tree: &str,
        key: &[u8],
        plain: &[u8],
    ) -> Option<Vec<u8>> {
        let keys = self.keys()?;
        keys.has(id)
            .then(|| keys.seal_with(id, &aad(tree, key), plain))
    }

    /// The value of record `key` of `tree`, as stored, opened.
    pub fn open<'a>(
        &self,
        tree: &'static str,
        key: &[u8],
        stored: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, StoreError> {
        match self.keys() {
            Some(keys) => keys
                .open(&aad(tree, key), stored)
                .map(Cow::Owned)
                .map_err(|reason| StoreError::Sealed { tree, reason }),
            None => Ok(Cow::Borrowed(stored)),
        }
    }

    /// Like [`open`](Self::open), but says why it failed as an [`OpenError`].
    pub(super) fn try_open(
        &self,
        tree: &str,
        key: &[u8],
        stored: &[u8],
    ) -> Result<Vec<u8>, OpenError> {
        match self.keys() {
            Some(keys) => keys.open(&aad(tree, key), stored),
            None => Ok(stored.to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_under_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.key");
        let keys = DataKeys::create(&path, 1).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let sealer = Sealer::new(keys);
        let sealed = sealer.seal("inbox", b"k1", b"hello bob".to_vec());
        assert_eq!(sealed.len(), 9 + OVERHEAD);
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(
            &*sealer.open("inbox", b"k1", &sealed).unwrap(),
            b"hello bob"
        );
        // Another record, another tree, an altered byte, another key file: refused.
        assert!(sealer.open("inbox", b"k2", &sealed).is_err());
        assert!(sealer.open("messages", b"k1", &sealed).is_err());
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(sealer.open("inbox", b"k1", &altered).is_err());
        let other = Sealer::new(DataKeys::create(&dir.path().join("other.key"), 1).unwrap());
        assert_eq!(
            other.try_open("inbox", b"k1", &sealed),
            Err(OpenError::Wrong(1))
        );
        assert_eq!(
            other.try_open("inbox", b"k1", b"plain"),
            Err(OpenError::NotSealed)
        );

        // Rotated: new values under key 2, old ones still open; the file has both.
        let rotated = sealer.keys().unwrap().rotated(2).unwrap();
        sealer.replace(rotated);
        let newer = sealer.seal("inbox", b"k1", b"again".to_vec());
        assert_eq!((key_of(&sealed), key_of(&newer)), (Some(1), Some(2)));
        let reloaded = Sealer::new(DataKeys::load(&path).unwrap());
        assert_eq!(
            &*reloaded.open("inbox", b"k1", &sealed).unwrap(),
            b"hello bob"
        );
        assert_eq!(&*reloaded.open("inbox", b"k1", &newer).unwrap(), b"again");
        assert_eq!(reloaded.keys().unwrap().current(), 2);
        // A key file is never made over another.
        assert!(DataKeys::create(&path, 3).is_err());
    }

    #[test]
    fn each_start_seals_under_a_subkey_of_its_own_and_opens_every_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.key");
        let first = Sealer::new(DataKeys::create(&path, 1).unwrap());
        let second = Sealer::new(DataKeys::load(&path).unwrap());
        let a = first.seal("inbox", b"k", b"one".to_vec());
        let b = second.seal("inbox", b"k", b"two".to_vec());
        let c = first.seal("inbox", b"k", b"three".to_vec());
        // The salt (after version and key id) names the subkey: one per sealer, kept.
        assert_ne!(a[5..21], b[5..21]);
        assert_eq!(a[5..21], c[5..21]);
        // Nonces differ under one subkey.
        assert_ne!(a[21..33], c[21..33]);
        for (sealer, value, text) in [
            (&second, &a, &b"one"[..]),
            (&first, &b, &b"two"[..]),
            (&second, &c, &b"three"[..]),
        ] {
            assert_eq!(&*sealer.open("inbox", b"k", value).unwrap(), text);
        }
    }

    #[test]
    fn a_damaged_key_file_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.key");
        for (text, reason) in [
            ("current = 1\nkeys = []\n", "the current key"),
            (
                "current = 1\n[[keys]]\nid = 1\nkey = \"zz\"\ncreated_at = 0\n",
                "64 hex digits",
            ),
            ("nonsense", "expected"),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = DataKeys::load(&path).unwrap_err().to_string();
            assert!(error.contains(reason), "{error}");
        }
        let error = DataKeys::load(&dir.path().join("none.key")).unwrap_err();
        assert!(matches!(error, KeyFileError::Io { .. }), "{error}");
    }
}
