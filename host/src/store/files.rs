//! What the host knows of the files in its blob store (the `files` tree): each file's name,
//! media type and size as uploaded, and who may read it. The bytes are in [`crate::blobs`].

use super::{StoreError, decode, decode_u64, encode, get_u64, keys};
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
}

impl Files {
    pub(super) fn new(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            tree: db.open_tree("files")?,
        })
    }

    /// Records file `sha256` unless it is recorded already (a second upload of the same bytes
    /// keeps the first name, and counts against nobody's quota), and lets `record.uploader`
    /// read it.
    pub fn stored(&self, sha256: &Sha256, record: &FileRecord) -> Result<(), StoreError> {
        let new = self
            .tree
            .compare_and_swap(keys::file(sha256), None::<&[u8]>, Some(encode(record)))?
            .is_ok();
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

    /// The bytes of the files `user` was the first to upload here.
    pub fn usage(&self, user: &UserId) -> Result<u64, StoreError> {
        Ok(get_u64(&self.tree, "files", keys::file_usage(user))?.unwrap_or(0))
    }

    /// File `sha256`'s record, if it is stored here.
    pub fn get(&self, sha256: &Sha256) -> Result<Option<FileRecord>, StoreError> {
        self.tree
            .get(keys::file(sha256))?
            .map(|v| decode("files", &v))
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
}
