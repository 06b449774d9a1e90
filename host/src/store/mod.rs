//! Durable storage: a write-ahead log with group commit, checkpointed into an embedded sled
//! database.
//!
//! Owns: the on-disk layout ([`keys`], [`wal`]), the format-version check, the one writer
//! thread ([`commit`]) that runs the registry's jobs in order, fsyncs one log frame for all of
//! them and only then acknowledges, and the checkpoint thread that folds the log into sled.
//! Exposes: [`Store`] (open, read scans, the log tail for replay, the writer).
//! Must never: interpret twins or validate anything — the registry decides what to write;
//! the store only makes it durable.

pub mod commit;
pub mod keys;
pub mod wal;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use commit::{Batch, CommitHandle, CommitStats, KvOp, PendingHistory, StateSource};

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
    #[error("write-ahead log: {0}")]
    Io(String),
    #[error("the write queue is full; retry shortly")]
    Overloaded,
    #[error("the store is shutting down")]
    Closed,
}

/// The embedded database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    wal_dir: PathBuf,
    pending: Arc<parking_lot::Mutex<PendingHistory>>,
    checkpoint_every: std::time::Duration,
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
        let wal_dir = dir.join("wal");
        std::fs::create_dir_all(&wal_dir).map_err(|e| StoreError::Io(e.to_string()))?;
        Ok(Store {
            db,
            wal_dir,
            pending: Arc::default(),
            checkpoint_every: commit::CHECKPOINT_EVERY,
        })
    }

    /// How often the log is folded into sled (bounds replay after a crash). Set before the
    /// registry starts the writer.
    pub fn with_checkpoint_every(mut self, every: std::time::Duration) -> Self {
        self.checkpoint_every = every.max(std::time::Duration::from_millis(10));
        self
    }

    /// The last checkpointed log segment (0 before the first checkpoint).
    fn checkpoint_marker(&self) -> Result<u64, StoreError> {
        Ok(self
            .db
            .get(keys::META_WAL_CHECKPOINT)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Entries logged after the last checkpoint, in order, with the last segment number. Raw
    /// key/value entries are applied to sled right away, so loading from sled sees them; the
    /// caller replays the twin entries into memory.
    pub fn recover(&self) -> Result<(Vec<wal::Entry>, u64), StoreError> {
        let after = self.checkpoint_marker()?;
        let (entries, last) =
            wal::read_after(&self.wal_dir, after).map_err(|e| StoreError::Io(e.to_string()))?;
        let mut twin_entries = Vec::with_capacity(entries.len());
        for e in entries {
            match e {
                wal::Entry::Put(k, v) => {
                    self.db.insert(k, v)?;
                }
                wal::Entry::DeleteKey(k) => {
                    self.db.remove(k)?;
                }
                wal::Entry::DeletePrefix(p) => {
                    for k in self.db.scan_prefix(&p).keys() {
                        self.db.remove(k?)?;
                    }
                }
                other => twin_entries.push(other),
            }
        }
        self.db.flush()?;
        if !twin_entries.is_empty() {
            tracing::info!(
                entries = twin_entries.len(),
                "replaying the write-ahead log"
            );
        }
        Ok((twin_entries, last))
    }

    /// History samples not yet checkpointed.
    pub fn pending_history(&self) -> &parking_lot::Mutex<PendingHistory> {
        &self.pending
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

    /// `<data-dir>/events`: the event log's persisted tail (files of its own, created here).
    pub fn events_dir(&self) -> Result<PathBuf, StoreError> {
        let dir = self
            .wal_dir
            .parent()
            .map_or_else(|| PathBuf::from("events"), |p| p.join("events"));
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::Io(e.to_string()))?;
        Ok(dir)
    }

    /// Start the writer after [`Store::recover`]: `last_segment` is what `recover` returned,
    /// `replayed` the changes its replay made (persisted by the first checkpoint), and
    /// `source` supplies the current bytes of dirty twins.
    pub fn start_committer(
        &self,
        source: Arc<dyn StateSource>,
        last_segment: u64,
        replayed: Option<Batch>,
    ) -> Result<CommitHandle, StoreError> {
        commit::start(commit::Start {
            db: self.db.clone(),
            wal_dir: self.wal_dir.clone(),
            next_segment: last_segment + 1,
            source,
            pending: self.pending.clone(),
            replayed,
            checkpoint_every: self.checkpoint_every,
        })
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
