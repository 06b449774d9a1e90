//! Durable storage: a write-ahead log with group commit, checkpointed into an embedded sled
//! database.
//!
//! Owns: the on-disk layout ([`keys`], [`wal`]), the format-version check, the one writer
//! thread ([`commit`]) that runs the registry's jobs in order, fsyncs one log frame for all of
//! them and only then acknowledges, and the checkpoint thread that folds the log into sled.
//! Exposes: [`Store`] (open, read scans, the log tail for replay, the writer).
//! Must never: interpret twins or validate anything — the registry decides what to write;
//! the store only makes it durable.

mod batch;
pub mod blocks;
mod checkpoint;
pub mod commit;
pub mod journal;
pub mod keys;
pub mod twin_files;
pub mod wal;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use commit::{
    Batch, CheckpointHook, CommitHandle, CommitStats, KvOp, Numbering, PendingHistory, StateSource,
};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record under key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "the data directory has format version {found}, this build reads versions 1 to {expected} \
         (and upgrades older ones in place); use a newer twinhost release or a new --data-dir"
    )]
    FormatVersion { found: u64, expected: u64 },
    /// A file of the data directory could not be read or written; `what` names it.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The hook that runs before a checkpoint failed (the checkpoint is retried later).
    #[error("before the checkpoint: {0}")]
    Checkpoint(String),
    #[error("the write queue is full; retry shortly")]
    Overloaded,
    #[error("the store is shutting down")]
    Closed,
    /// Writing the log failed once: memory may hold changes the disk does not, so the store
    /// refuses every later write instead of acknowledging what a restart would lose.
    #[error(
        "the store stopped taking writes after it failed to write its log ({0}); everything \
         acknowledged before is safe: fix the disk and restart the server"
    )]
    Poisoned(String),
}

impl StoreError {
    /// An I/O error on `what` (a path or a step), keeping the `io::Error` as the source.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let what = what.into();
        move |source| StoreError::Io { what, source }
    }
}

/// The embedded database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    wal_dir: PathBuf,
    /// `<data-dir>/twins`: the twins at rest ([`twin_files`]).
    twins_dir: PathBuf,
    /// The twin files the manifest names (read on open, updated by each checkpoint).
    manifest: Arc<parking_lot::Mutex<twin_files::Manifest>>,
    /// `<data-dir>/history`: the history journal ([`journal`]), and its manifest.
    history_dir: PathBuf,
    journal: Arc<parking_lot::Mutex<twin_files::Manifest>>,
    fold_every: std::time::Duration,
    compact_slack: u64,
    pending: Arc<parking_lot::Mutex<PendingHistory>>,
    checkpoint_every: std::time::Duration,
    /// The format version found on open (1 until the registry's upgrade finishes).
    format: Arc<std::sync::atomic::AtomicU64>,
    before_checkpoint: Arc<std::sync::OnceLock<CheckpointHook>>,
    /// The writer, once started: configuration writes go through its queue too. Weak, so
    /// the store (held by many) does not keep the writer running.
    committer: Arc<std::sync::OnceLock<commit::WeakCommitHandle>>,
    /// Held across one configuration change (see [`Store::lock_config`]).
    config: Arc<tokio::sync::Mutex<()>>,
}

/// sled's page cache when no size is given (`serve --cache-mb` sets it).
pub const DEFAULT_CACHE_BYTES: u64 = 128 * 1024 * 1024;

/// What [`Store::recover`] found after the last checkpoint.
pub struct Recovered {
    /// The log entries after the checkpoint, in order, for the registry to replay.
    pub entries: Vec<wal::Entry>,
    /// The last log segment (the writer continues with the next).
    pub last_segment: u64,
}

/// Where an upgraded directory's numbering and clock continue.
pub struct Upgrade {
    /// Highest change number given out (the old event reservation, then one per twin).
    pub lseq: u64,
    /// Highest HLC derived for the upgraded twins.
    pub hlc: u64,
}

impl Store {
    /// Open (or create) the database under `dir` with sled's default cache
    /// ([`DEFAULT_CACHE_BYTES`]); see [`Store::open_with_cache`].
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Open (or create) the database under `dir`, checking the format version, with a
    /// page cache of `cache_bytes` (`serve --cache-mb`). A directory of an older format
    /// opens for the registry to upgrade ([`Store::needs_upgrade`]).
    ///
    /// # Errors
    /// [`StoreError::FormatVersion`] for a format this build cannot read; sled and I/O errors.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("db"))
            // Group commit flushes explicitly; sled's own periodic flush is only a backstop.
            .flush_every_ms(Some(1000))
            .cache_capacity(cache_bytes)
            .open()?;
        let format = match db.get(keys::META_FORMAT_VERSION)? {
            Some(v) => {
                let found = v.as_ref().try_into().map(u64::from_be_bytes).map_err(|_| {
                    StoreError::Corrupt {
                        key: "format_version".into(),
                        reason: "not 8 bytes".into(),
                    }
                })?;
                if !(1..=keys::FORMAT_VERSION).contains(&found) {
                    return Err(StoreError::FormatVersion {
                        found,
                        expected: keys::FORMAT_VERSION,
                    });
                }
                if (keys::TWIN_FILES_FORMAT..keys::FORMAT_VERSION).contains(&found) {
                    // Formats 4 and later differ only in how new twins, log entries and
                    // history are written, and the old ones still read: marking the directory
                    // is the upgrade.
                    tracing::info!(
                        "upgrading the data directory from format {found} to {}",
                        keys::FORMAT_VERSION
                    );
                    mark_current_format(&db)?
                } else {
                    found
                }
            }
            None => mark_current_format(&db)?,
        };
        let wal_dir = dir.join("wal");
        std::fs::create_dir_all(&wal_dir)
            .map_err(StoreError::io(format!("creating {}", wal_dir.display())))?;
        let twins_dir = dir.join(twin_files::DIR);
        let history_dir = dir.join(journal::DIR);
        for d in [&twins_dir, &history_dir] {
            std::fs::create_dir_all(d)
                .map_err(StoreError::io(format!("creating {}", d.display())))?;
        }
        // The history journal's samples are readable from memory until folded into sled.
        let journal_manifest = twin_files::Manifest::stored(&db, keys::META_HISTORY_FILES)?;
        let (journaled, journaled_samples) = journal::read(&history_dir, &journal_manifest)?;
        // The folds in history blocks, by number, with their spans.
        let mut folds = std::collections::BTreeMap::new();
        for kv in db.scan_prefix([keys::HISTORY_FOLD]) {
            let (k, v) = kv?;
            let n = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes);
            match (n, blocks::decode_span(&v)) {
                (Some(n), Some(span)) => {
                    folds.insert(n, span);
                }
                _ => {
                    return Err(StoreError::Corrupt {
                        key: format!("history fold {k:?}"),
                        reason: "not a fold number and span".into(),
                    })
                }
            }
        }
        let pending = PendingHistory {
            folds,
            journaled_since: (!journaled.is_empty()).then(std::time::Instant::now),
            journaled,
            journaled_samples,
            ..PendingHistory::default()
        };
        Ok(Store {
            db,
            wal_dir,
            twins_dir,
            manifest: Arc::default(),
            history_dir,
            journal: Arc::new(parking_lot::Mutex::new(journal_manifest)),
            fold_every: journal::FOLD_EVERY,
            compact_slack: twin_files::COMPACT_SLACK,
            pending: Arc::new(parking_lot::Mutex::new(pending)),
            checkpoint_every: commit::CHECKPOINT_EVERY,
            format: Arc::new(format.into()),
            before_checkpoint: Arc::default(),
            committer: Arc::default(),
            config: Arc::default(),
        })
    }

    /// Whether this is a directory of an older format the registry must upgrade before
    /// writing.
    pub fn needs_upgrade(&self) -> bool {
        self.format() < keys::FORMAT_VERSION
    }

    /// The format version of the directory (the one found on open until an upgrade ends).
    pub fn format(&self) -> u64 {
        self.format.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every twin at rest, newest record first: `f` gets each twin's current record once
    /// (`None`: deleted since an older file had it, and nothing older of it follows). Files
    /// the manifest does not name (left over from a crash) are removed first. Format 4 only:
    /// older directories keep one sled key per twin (`keys::TWIN`), read by the registry's
    /// upgrade.
    pub fn read_twins(
        &self,
        mut f: impl FnMut(crate::types::TwinId, Option<&[u8]>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let manifest = twin_files::Manifest::stored(&self.db, keys::META_TWIN_FILES)?;
        let removed =
            twin_files::remove_unlisted(&self.twins_dir, twin_files::EXT, &manifest.files)?;
        if removed > 0 {
            tracing::info!(
                files = removed,
                "removed twin files left over from an interrupted checkpoint"
            );
        }
        for name in manifest.files.iter().rev() {
            twin_files::read_file(&self.twins_dir.join(name), &mut f)?;
        }
        *self.manifest.lock() = manifest;
        Ok(())
    }

    /// Finish the upgrade from format 1, 2 or 3: write every twin `source` holds (the records
    /// just read from sled) into the first twin file, then the numbering floor, the manifest
    /// and the new format version in one batch; then drop the old per-twin keys. A crash
    /// before that batch leaves the old format (the upgrade runs again; the file is removed
    /// as unlisted); a crash after it leaves some old keys, which the next open removes.
    pub fn finish_upgrade(&self, up: Upgrade, source: &dyn StateSource) -> Result<(), StoreError> {
        let mut manifest = twin_files::Manifest {
            generation: 1,
            next: 1,
            ..Default::default()
        };
        let name = manifest.next_name(1);
        let mut w = twin_files::FileWriter::create(&self.twins_dir, &name)?;
        w.push_all(source, source.twin_ids())?;
        manifest.records = w.finish()?;
        manifest.files.push(name);
        manifest.next += 1;
        let mut b = sled::Batch::default();
        b.insert(keys::META_LSEQ, &up.lseq.to_be_bytes());
        b.insert(keys::META_HLC, &up.hlc.to_be_bytes());
        b.remove(keys::META_EVENT_SEQ_RESERVED);
        b.insert(keys::META_TWIN_FILES, manifest.encode());
        b.insert(
            keys::META_FORMAT_VERSION,
            &keys::FORMAT_VERSION.to_be_bytes(),
        );
        self.db.apply_batch(b)?;
        self.db.flush()?;
        *self.manifest.lock() = manifest;
        self.format
            .store(keys::FORMAT_VERSION, std::sync::atomic::Ordering::Relaxed);
        self.remove_legacy_twin_keys()
    }

    /// Remove the per-twin sled keys of formats 1-3 (after an upgrade, or what an interrupted
    /// one left), 10,000 per batch.
    pub fn remove_legacy_twin_keys(&self) -> Result<(), StoreError> {
        loop {
            let mut b = sled::Batch::default();
            let mut n = 0;
            for k in self.db.scan_prefix([keys::TWIN]).keys().take(10_000) {
                b.remove(k?);
                n += 1;
            }
            if n == 0 {
                return Ok(());
            }
            self.db.apply_batch(b)?;
        }
    }

    /// Read an 8-byte big-endian counter (0 when absent).
    pub fn get_u64(&self, key: &[u8]) -> Result<u64, StoreError> {
        Ok(self
            .db
            .get(key)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Install the hook that runs before each checkpoint (once; later calls are ignored).
    pub fn set_before_checkpoint(&self, hook: CheckpointHook) {
        let _ = self.before_checkpoint.set(hook);
    }

    /// How often the log is folded into sled (bounds replay after a crash). Set before the
    /// registry starts the writer.
    pub fn with_checkpoint_every(mut self, every: std::time::Duration) -> Self {
        self.checkpoint_every = every.max(std::time::Duration::from_millis(10));
        self
    }

    /// Superseded twin records the twin files may hold beyond the live twins before a
    /// checkpoint compacts them (default [`twin_files::COMPACT_SLACK`]; tests set it low).
    pub fn with_compact_slack(mut self, slack: u64) -> Self {
        self.compact_slack = slack;
        self
    }

    /// How often the history journal is folded into sled (default [`journal::FOLD_EVERY`];
    /// tests set it to zero: after every checkpoint).
    pub fn with_fold_every(mut self, every: std::time::Duration) -> Self {
        self.fold_every = every;
        self
    }

    /// The history journal's files now (empty right after a fold).
    pub fn journal_files(&self) -> Vec<String> {
        self.journal.lock().files.clone()
    }

    /// How many records the twin files hold (what a load may read at most, before it has
    /// read them: to size its lists once).
    pub fn stored_twin_records(&self) -> Result<u64, StoreError> {
        Ok(twin_files::Manifest::stored(&self.db, keys::META_TWIN_FILES)?.records)
    }

    /// The twin files the manifest names now.
    pub fn twin_files(&self) -> twin_files::Manifest {
        self.manifest.lock().clone()
    }

    /// The last checkpointed log segment (0 before the first checkpoint).
    fn checkpoint_marker(&self) -> Result<u64, StoreError> {
        self.get_u64(keys::META_WAL_CHECKPOINT)
    }

    /// Entries logged after the last checkpoint, in order, with the last segment number. Raw
    /// key/value entries are applied to sled right away, so loading from sled sees them; the
    /// caller replays the rest into memory (and re-creates the events of numbered entries).
    pub fn recover(&self) -> Result<Recovered, StoreError> {
        let after = self.checkpoint_marker()?;
        let (entries, last) = wal::read_after(&self.wal_dir, after).map_err(StoreError::io(
            format!("reading the write-ahead log in {}", self.wal_dir.display()),
        ))?;
        // Raw entries are applied here and passed on too: a numbered one (a relationship or
        // model change) is an event the replay re-creates.
        for e in &entries {
            let raw = match e {
                wal::Entry::Put(k, v) => batch::RawOp::Put(k, v),
                wal::Entry::DeleteKey(k) => batch::RawOp::Delete(k),
                wal::Entry::DeletePrefix(p) => batch::RawOp::DeletePrefix(p),
                _ => continue,
            };
            raw.apply(&self.db)?;
        }
        let twin_entries = entries;
        self.db.flush()?;
        if !twin_entries.is_empty() {
            tracing::info!(
                entries = twin_entries.len(),
                "replaying the write-ahead log"
            );
        }
        Ok(Recovered {
            entries: twin_entries,
            last_segment: last,
        })
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
        std::fs::create_dir_all(&dir)
            .map_err(StoreError::io(format!("creating {}", dir.display())))?;
        Ok(dir)
    }

    /// Start the writer after [`Store::recover`]: `last_segment` is what `recover` returned,
    /// `replayed` the changes its replay made (persisted by the first checkpoint), `source`
    /// supplies the current bytes of dirty twins, and `numbering` continues above everything
    /// stored.
    pub fn start_committer(
        &self,
        source: Arc<dyn StateSource>,
        last_segment: u64,
        replayed: Option<Batch>,
        numbering: Numbering,
    ) -> Result<CommitHandle, StoreError> {
        let handle = commit::start(commit::Start {
            db: self.db.clone(),
            wal_dir: self.wal_dir.clone(),
            twins_dir: self.twins_dir.clone(),
            manifest: self.manifest.clone(),
            history_dir: self.history_dir.clone(),
            journal: self.journal.clone(),
            fold_every: self.fold_every,
            compact_slack: self.compact_slack,
            next_segment: last_segment + 1,
            source,
            pending: self.pending.clone(),
            replayed,
            checkpoint_every: self.checkpoint_every,
            numbering,
            before_checkpoint: self.before_checkpoint.clone(),
        })?;
        let _ = self.committer.set(handle.downgrade());
        Ok(handle)
    }

    /// Write configuration (rules, behaviors, modules, tokens) through the commit queue:
    /// logged and fsynced with the twins' changes, readable with [`Store::get`] once this
    /// returns. Waits for room in the queue like any write (backpressure).
    ///
    /// # Errors
    /// [`StoreError::Overloaded`] when the queue stays full, [`StoreError::Closed`] before
    /// the writer starts or after it stops, [`StoreError::Poisoned`] after a failed log write.
    pub async fn write(&self, ops: Vec<KvOp>) -> Result<(), StoreError> {
        let commit = self
            .committer
            .get()
            .and_then(commit::WeakCommitHandle::upgrade)
            .ok_or(StoreError::Closed)?;
        commit
            .run(move |b| {
                for op in ops {
                    b.config(op);
                }
            })
            .await
    }

    /// Serialize configuration changes across subsystems: a change that checks other
    /// configuration (a module delete asks who uses the module) and one that adds to it (a
    /// behavior binding that module) hold this from their check to their write, so they
    /// cannot interleave. Only configuration writers take it — never the write path of twins,
    /// the dispatcher or a rule shard — and it is never held while a guest runs.
    pub async fn lock_config(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.config.clone().lock_owned().await
    }

    /// Write one record and flush, outside the commit queue: only for what is written before
    /// the writer starts (the node id on a first start). Configuration goes through
    /// [`Store::write`].
    pub fn put_durable(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.db.insert(key, value)?;
        self.db.flush()?;
        Ok(())
    }

    /// Write data that can be rebuilt (compiled artifacts) straight to sled, without the
    /// log: losing it in a crash costs a recompile, nothing else.
    pub fn put_cache(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.db.insert(key, value)?;
        Ok(())
    }

    /// Why the store refuses writes, once a write of its log has failed.
    pub fn poisoned(&self) -> Option<String> {
        self.committer
            .get()
            .and_then(commit::WeakCommitHandle::poisoned)
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

/// Record that `db` holds this build's format (durably: a directory half marked is still the
/// old format, which this build also reads).
fn mark_current_format(db: &sled::Db) -> Result<u64, StoreError> {
    db.insert(
        keys::META_FORMAT_VERSION,
        &keys::FORMAT_VERSION.to_be_bytes(),
    )?;
    db.flush()?;
    Ok(keys::FORMAT_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::commit::tests::NoTwins;

    fn started(dir: &Path) -> (Store, CommitHandle) {
        let store = Store::open(dir).unwrap();
        let last = store.recover().unwrap().last_segment;
        let handle = store
            .start_committer(Arc::new(NoTwins), last, None, Numbering::default())
            .unwrap();
        (store, handle)
    }

    #[tokio::test]
    async fn configuration_is_readable_once_written_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (store, handle) = started(dir.path());
        store
            .write(vec![KvOp::Put(b"Rk".to_vec(), b"v1".to_vec())])
            .await
            .unwrap();
        // Readable at once, not only after the next checkpoint.
        assert_eq!(store.get(b"Rk").unwrap().as_deref(), Some(&b"v1"[..]));
        store
            .write(vec![KvOp::Put(b"Rk".to_vec(), b"v2".to_vec())])
            .await
            .unwrap();
        handle.shutdown();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        store.recover().unwrap();
        assert_eq!(store.get(b"Rk").unwrap().as_deref(), Some(&b"v2"[..]));
    }

    #[tokio::test]
    async fn a_failed_log_write_poisons_the_store_instead_of_exiting() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let last = store.recover().unwrap().last_segment;
        // The next segment is a device that refuses every write (ENOSPC).
        std::os::unix::fs::symlink("/dev/full", dir.path().join("wal/00000000000000000001.wal"))
            .unwrap();
        let _handle = store
            .start_committer(Arc::new(NoTwins), last, None, Numbering::default())
            .unwrap();
        assert_eq!(store.poisoned(), None);
        let first = store
            .write(vec![KvOp::Put(b"Rk".to_vec(), b"v".to_vec())])
            .await;
        assert!(matches!(first, Err(StoreError::Poisoned(_))), "{first:?}");
        let why = store.poisoned().expect("poisoned after a failed log write");
        assert!(why.contains("space"), "{why}");
        // Later writes are refused at once, and nothing reached sled.
        let later = store
            .write(vec![KvOp::Put(b"Rk".to_vec(), b"v".to_vec())])
            .await;
        assert!(matches!(later, Err(StoreError::Poisoned(_))), "{later:?}");
        assert!(
            later.unwrap_err().to_string().contains("restart"),
            "the error says what to do"
        );
        assert_eq!(store.get(b"Rk").unwrap(), None);
    }

    #[tokio::test]
    async fn the_store_does_not_keep_the_writer_running() {
        let dir = tempfile::tempdir().unwrap();
        let (store, handle) = started(dir.path());
        // Subsystems keep clones of the store for as long as they run.
        let held = store.clone();
        store
            .write(vec![KvOp::Put(b"Rk".to_vec(), b"v".to_vec())])
            .await
            .unwrap();
        // The registry's handle gone: the writer stops, configuration writes say so, and
        // the directory can be opened again once the store is dropped.
        drop(handle);
        let started = std::time::Instant::now();
        while store.write(vec![]).await.is_ok() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "writer still running"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(matches!(held.write(vec![]).await, Err(StoreError::Closed)));
        drop((store, held));
        let started = std::time::Instant::now();
        while Store::open(dir.path()).is_err() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "directory still locked"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_checkpoint_lets_configuration_leave_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path())
            .unwrap()
            .with_checkpoint_every(std::time::Duration::from_millis(20));
        let last = store.recover().unwrap().last_segment;
        let _handle = store
            .start_committer(Arc::new(NoTwins), last, None, Numbering::default())
            .unwrap();
        // A module's bytes, with no twin written after them.
        let big = vec![7u8; 4 << 20];
        store
            .write(vec![KvOp::Put(b"bX".to_vec(), big)])
            .await
            .unwrap();
        let log_bytes = || -> u64 {
            std::fs::read_dir(dir.path().join("wal"))
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum()
        };
        let started = std::time::Instant::now();
        while log_bytes() > 1 << 20 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "the configuration stays in the log: {} bytes",
                log_bytes()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(store.get(b"bX").unwrap().map(|v| v.len()), Some(4 << 20));
    }
}
