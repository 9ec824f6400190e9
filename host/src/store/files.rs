//! What the host knows of the files in its blob store (the `files` tree): each file's name,
//! media type and size as uploaded, who may read it, which inbox messages reference it, when
//! it was last uploaded or referenced, and each user's usage. The bytes are in
//! [`crate::blobs`].

use super::{Sealer, StoreError, decode, decode_u64, encode, get_u64, keys};
use iim_proto::UserId;
use iim_proto::file::Sha256;
use serde::{Deserialize, Serialize};

/// A file as uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Its size in bytes.
    pub size: u64,
    /// Its name, as first uploaded.
    pub name: String,
    /// Its media type, as first uploaded.
    pub media_type: String,
    /// Who first uploaded it.
    pub uploader: UserId,
    /// When, in milliseconds since the Unix epoch.
    pub stored_at: u64,
}

/// The files' records and who may read each.
#[derive(Clone)]
pub struct Files {
    tree: sled::Tree,
    /// File records are sealed: they hold the file's name and media type.
    sealer: Sealer,
}

impl Files {
    pub(super) fn new(db: &sled::Db, sealer: &Sealer) -> Result<Self, StoreError> {
        Ok(Self {
            tree: db.open_tree("files")?,
            sealer: sealer.clone(),
        })
    }

    /// `record`, the record of file `sha256`, as stored.
    fn seal(&self, sha256: &Sha256, record: &FileRecord) -> Vec<u8> {
        self.sealer
            .seal("files", &keys::file(sha256), encode(record))
    }

    fn open(&self, key: &[u8], stored: &[u8]) -> Result<FileRecord, StoreError> {
        decode("files", &self.sealer.open("files", key, stored)?)
    }

    /// Records file `sha256` unless it is recorded already (a second upload of the same bytes
    /// keeps the first name, and counts against nobody's quota), and lets `record.uploader`
    /// read it.
    pub fn stored(&self, sha256: &Sha256, record: &FileRecord) -> Result<(), StoreError> {
        let new = self
            .tree
            .compare_and_swap(
                keys::file(sha256),
                None::<&[u8]>,
                Some(self.seal(sha256, record)),
            )?
            .is_ok();
        self.tree
            .insert(keys::file_touched(sha256), &record.stored_at.to_be_bytes())?;
        if new {
            // After the record: a crash between the two leaves the user's usage short by
            // this file, never counted twice.
            self.tree
                .update_and_fetch(keys::file_usage(&record.uploader), |old| {
                    let used = old.and_then(|v| decode_u64("files", v).ok()).unwrap_or(0);
                    Some(used.saturating_add(record.size).to_be_bytes().to_vec())
                })?;
        }
        self.grant(&record.uploader, sha256)
    }

    /// Records file `sha256`, fetched from another host of the network for users of this one,
    /// unless it is recorded already: nobody's upload, so it counts against no quota.
    pub fn fetched(&self, sha256: &Sha256, record: &FileRecord) -> Result<(), StoreError> {
        // The mark first: a record without it would count against a quota when it goes.
        self.tree.insert(keys::file_fetched(sha256), &[])?;
        let sealed = self.seal(sha256, record);
        let _ = self
            .tree
            .compare_and_swap(keys::file(sha256), None::<&[u8]>, Some(sealed))?;
        self.tree
            .insert(keys::file_touched(sha256), &record.stored_at.to_be_bytes())?;
        Ok(())
    }

    /// A message naming file `sha256` left for another host at `now`: the network's hosts may
    /// fetch the file from here, and it stays its time to live from now.
    pub fn shared(&self, sha256: &Sha256, now: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(keys::file_shared(sha256), &[]);
        batch.insert(keys::file_touched(sha256), &now.to_be_bytes());
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Whether another host of the network may fetch file `sha256` from here.
    pub fn is_shared(&self, sha256: &Sha256) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(keys::file_shared(sha256))?)
    }

    /// The last message that named file `sha256` on its way to an inbox here: its id (whose
    /// host has the file) and its sender.
    pub fn named_by(&self, sha256: &Sha256) -> Result<Option<(u64, UserId)>, StoreError> {
        let Some(value) = self.tree.get(keys::file_named(sha256))? else {
            return Ok(None);
        };
        let corrupt = || StoreError::Corrupt {
            tree: "files",
            reason: format!("a file's naming message of {} bytes", value.len()),
        };
        let (id, sender) = value.split_at_checked(8).ok_or_else(corrupt)?;
        let id = u64::from_be_bytes(id.try_into().map_err(|_| corrupt())?);
        let sender = std::str::from_utf8(sender)
            .ok()
            .and_then(|s| UserId::new(s).ok())
            .ok_or_else(corrupt)?;
        Ok(Some((id, sender)))
    }

    /// The bytes of the files `user` was the first to upload here.
    pub fn usage(&self, user: &UserId) -> Result<u64, StoreError> {
        Ok(get_u64(&self.tree, "files", keys::file_usage(user))?.unwrap_or(0))
    }

    /// File `sha256`'s record, if it is stored here.
    pub fn get(&self, sha256: &Sha256) -> Result<Option<FileRecord>, StoreError> {
        let key = keys::file(sha256);
        self.tree
            .get(&key)?
            .map(|v| self.open(&key, &v))
            .transpose()
    }

    /// Lets `user` read file `sha256` (a message referencing it reached their inbox).
    pub fn grant(&self, user: &UserId, sha256: &Sha256) -> Result<(), StoreError> {
        self.tree.insert(keys::file_reader(user, sha256), &[])?;
        Ok(())
    }

    /// Whether `user` may read file `sha256`.
    pub fn may_read(&self, user: &UserId, sha256: &Sha256) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(keys::file_reader(user, sha256))?)
    }

    /// Message `id` from `sender`, which references file `sha256`, is going into `user`'s
    /// inbox at `now`: the user may read the file, and it stays while the message is in that
    /// inbox; if the file is another host's, it is fetched from the host that numbered `id`. Written
    /// before the message is appended, so that no entry ever references a file without the
    /// file knowing (an append found to be a repeat writes the same keys again).
    pub fn referenced(
        &self,
        user: &UserId,
        id: u64,
        sender: &UserId,
        sha256: &Sha256,
        now: u64,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut named = id.to_be_bytes().to_vec();
        named.extend_from_slice(sender.as_str().as_bytes());
        batch.insert(keys::file_named(sha256), named);
        batch.insert(keys::file_reader(user, sha256), &[]);
        batch.insert(keys::file_ref(user, id), &sha256[..]);
        batch.insert(keys::file_ref_by_file(sha256, user, id), &[]);
        batch.insert(keys::file_touched(sha256), &now.to_be_bytes());
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Message `id` is leaving `user`'s inbox: the file it referenced, if any, no longer
    /// stays for it. (The user may still read the file while it is here.)
    pub fn unreferenced(&self, user: &UserId, id: u64) -> Result<(), StoreError> {
        let key = keys::file_ref(user, id);
        let Some(sha256) = self.tree.get(&key)? else {
            return Ok(());
        };
        let sha256: Sha256 = sha256
            .as_ref()
            .try_into()
            .map_err(|_| StoreError::Corrupt {
                tree: "files",
                reason: format!("a file reference of {} bytes", sha256.len()),
            })?;
        let mut batch = sled::Batch::default();
        batch.remove(keys::file_ref_by_file(&sha256, user, id));
        batch.remove(key);
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// The files that no inbox message references and that nobody uploaded or referenced in
    /// the `ttl_ms` before `now`: those that may leave.
    pub fn unused(&self, now: u64, ttl_ms: u64) -> Result<Vec<Sha256>, StoreError> {
        let mut unused = Vec::new();
        for entry in self.tree.scan_prefix(keys::files()) {
            let (key, value) = entry?;
            let Ok(sha256) = Sha256::try_from(&key[1..]) else {
                continue;
            };
            let record = self.open(&key, &value)?;
            let touched = get_u64(&self.tree, "files", keys::file_touched(&sha256))?
                .unwrap_or(record.stored_at);
            if touched.saturating_add(ttl_ms) <= now
                && self
                    .tree
                    .scan_prefix(keys::file_refs(&sha256))
                    .next()
                    .is_none()
            {
                unused.push(sha256);
            }
        }
        Ok(unused)
    }

    /// Forgets file `sha256`: its record, its readers, and its size in its uploader's usage.
    /// Returns the record, if there was one. The bytes are the blob store's to remove.
    pub fn forget(&self, sha256: &Sha256) -> Result<Option<FileRecord>, StoreError> {
        let Some(record) = self.get(sha256)? else {
            return Ok(None);
        };
        let mut batch = sled::Batch::default();
        for entry in self.tree.scan_prefix(keys::file_readers(sha256)) {
            batch.remove(entry?.0);
        }
        let fetched = self.tree.contains_key(keys::file_fetched(sha256))?;
        batch.remove(keys::file_touched(sha256));
        batch.remove(keys::file_shared(sha256));
        batch.remove(keys::file_fetched(sha256));
        batch.remove(keys::file_named(sha256));
        batch.remove(keys::file(sha256));
        self.tree.apply_batch(batch)?;
        if !fetched {
            self.tree
                .update_and_fetch(keys::file_usage(&record.uploader), |old| {
                    let used = old.and_then(|v| decode_u64("files", v).ok()).unwrap_or(0);
                    Some(used.saturating_sub(record.size).to_be_bytes().to_vec())
                })?;
        }
        Ok(Some(record))
    }

    /// Forgets what `user` had of files (the account was deleted): the files they were the
    /// first to upload (returned: their bytes are the blob store's to remove), their right to
    /// read others', their inbox's references, their usage. Every reader and file record is
    /// read: deleting an account is rare, and an index by uploader would cost every upload.
    pub fn forget_user(&self, user: &UserId) -> Result<Vec<Sha256>, StoreError> {
        let mut uploaded = Vec::new();
        for entry in self.tree.scan_prefix(keys::files()) {
            let (key, value) = entry?;
            if let Ok(sha256) = Sha256::try_from(&key[1..])
                && self.open(&key, &value)?.uploader == *user
            {
                uploaded.push(sha256);
            }
        }
        for sha256 in &uploaded {
            self.forget(sha256)?;
        }
        let mut batch = sled::Batch::default();
        for entry in self.tree.scan_prefix(keys::file_refs_of(user)) {
            let (key, sha256) = entry?;
            if let (Ok(sha256), Some(id)) = (Sha256::try_from(&sha256[..]), keys::inbox_seq(&key)) {
                batch.remove(keys::file_ref_by_file(&sha256, user, id));
            }
            batch.remove(key);
        }
        for entry in self.tree.scan_prefix(keys::FILE_READER_PREFIX) {
            let (key, _) = entry?;
            if keys::file_reader_user(&key).as_ref() == Some(user) {
                batch.remove(key);
            }
        }
        batch.remove(keys::file_usage(user));
        self.tree.apply_batch(batch)?;
        Ok(uploaded)
    }
}
