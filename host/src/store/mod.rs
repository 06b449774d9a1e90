//! Durable storage on an embedded sled database, with group commit.
//!
//! Owns: the on-disk layout ([`keys`]), the format-version check, and the one writer thread
//! ([`commit`]) that batches concurrent changes into one atomic `apply_batch` + `flush` and
//! only then acknowledges them. Exposes: [`Store`] (open, read scans, the commit queue).
//! Must never: interpret twins or validate anything — the registry decides what to write;
//! the store only makes it durable. Nothing outside the registry, history and auth enqueues
//! writes.

pub mod commit;
pub mod keys;

use std::path::Path;
use std::sync::Arc;

pub use commit::{CommitHandle, CommitRequest, CommitStats, KvOp, Point, StateSource};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record under key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "the data directory has format version {found}, this build reads version {expected}; \
         use a matching twinhost release or a new --data-dir"
    )]
    FormatVersion { found: u64, expected: u64 },
    #[error("the write queue is full; retry shortly")]
    Overloaded,
    #[error("the store is shutting down")]
    Closed,
}

/// The embedded database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

impl Store {
    /// Open (or create) the database under `dir`, checking the format version.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("db"))
            // Group commit flushes explicitly; sled's own periodic flush is only a backstop.
            .flush_every_ms(Some(1000))
            .cache_capacity(512 * 1024 * 1024)
            .open()?;
        match db.get(keys::META_FORMAT_VERSION)? {
            Some(v) => {
                let found = v.as_ref().try_into().map(u64::from_be_bytes).map_err(|_| {
                    StoreError::Corrupt {
                        key: "format_version".into(),
                        reason: "not 8 bytes".into(),
                    }
                })?;
                if found != keys::FORMAT_VERSION {
                    return Err(StoreError::FormatVersion {
                        found,
                        expected: keys::FORMAT_VERSION,
                    });
                }
            }
            None => {
                db.insert(
                    keys::META_FORMAT_VERSION,
                    &keys::FORMAT_VERSION.to_be_bytes(),
                )?;
                db.flush()?;
            }
        }
        Ok(Store { db })
    }

    /// Iterate over `(key, value)` pairs whose key starts with `prefix`.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> impl DoubleEndedIterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> {
        self.db
            .scan_prefix(prefix)
            .map(|r| r.map_err(StoreError::from))
    }

    /// Iterate over a key range.
    pub fn range(
        &self,
        from: &[u8],
        to: &[u8],
    ) -> impl DoubleEndedIterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> {
        self.db
            .range(from.to_vec()..to.to_vec())
            .map(|r| r.map_err(StoreError::from))
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.db.get(key)?)
    }

    /// Remove keys directly, outside the commit queue. Only for maintenance of data that is not
    /// twin state (history retention), where losing the removal in a crash is harmless.
    pub fn remove_keys<I: IntoIterator<Item = sled::IVec>>(
        &self,
        keys: I,
    ) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for k in keys {
            b.remove(k);
        }
        self.db.apply_batch(b)?;
        Ok(())
    }

    /// Start the group-commit writer. `source` supplies the current bytes of dirty twins.
    pub fn start_committer(&self, source: Arc<dyn StateSource>) -> CommitHandle {
        commit::start(self.db.clone(), source)
    }

    /// Bytes on disk (sled's estimate).
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Flush everything to disk (used at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

impl Store {
    /// Write one small record and flush, outside the group-commit queue. For rare records
    /// that are not twin state (API tokens), never for twins.
    pub fn put_durable(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.db.insert(key, value)?;
        self.db.flush()?;
        Ok(())
    }
}
