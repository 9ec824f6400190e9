//! What the host knows of the files in its blob store (the `files` tree): each file's name,
//! media type and size as uploaded, and who may read it. The bytes are in [`crate::blobs`].

use super::{StoreError, decode, encode, keys};
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
    /// keeps the first name), and lets `record.uploader` read it.
    pub fn stored(&self, sha256: &Sha256, record: &FileRecord) -> Result<(), StoreError> {
        let _ =
            self.tree
                .compare_and_swap(keys::file(sha256), None::<&[u8]>, Some(encode(record)))?;
        self.grant(&record.uploader, sha256)
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
