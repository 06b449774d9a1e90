//! Checkpoints: the background thread that folds what the log holds into the data directory
//! — the current record of each dirty twin into a new twin file ([`super::twin_files`]),
//! then raw key/value changes in order, one history chunk per series, the manifest naming
//! the new file and the checkpoint marker as one atomic sled batch — flushes, and deletes
//! the covered log segments. A failed checkpoint is carried into the next; no segment goes
//! before one succeeds.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rustc_hash::FxBuildHasher;

use super::batch::{KvOp, PendingHistory, SeriesMap};
use super::commit::{CheckpointHook, CommitStats, StateSource};
use super::journal;
use super::twin_files::{self, FileWriter, Manifest};
use super::{keys, wal, StoreError};
use crate::types::TwinId;

pub(super) struct Checkpoint {
    pub(super) upto: u64,
    /// Highest change number and HLC in the covered segments.
    pub(super) lseq: u64,
    pub(super) hlc: u64,
    pub(super) dirty: HashSet<TwinId, FxBuildHasher>,
    pub(super) kv: Vec<KvOp>,
    pub(super) points: Vec<Arc<SeriesMap>>,
}

impl Checkpoint {
    /// Fold a failed earlier checkpoint into this one: its changes come first, and this one's
    /// marker covers both.
    pub(super) fn absorb(&mut self, earlier: Checkpoint) {
        self.lseq = self.lseq.max(earlier.lseq);
        self.hlc = self.hlc.max(earlier.hlc);
        self.dirty.extend(earlier.dirty);
        let mut kv = earlier.kv;
        kv.append(&mut self.kv);
        self.kv = kv;
        let mut points = earlier.points;
        points.append(&mut self.points);
        self.points = points;
    }
}

/// What the checkpoint thread works with.
pub(super) struct Checkpointer {
    pub(super) db: sled::Db,
    pub(super) wal_dir: PathBuf,
    pub(super) twins_dir: PathBuf,
    pub(super) manifest: Arc<parking_lot::Mutex<Manifest>>,
    pub(super) history_dir: PathBuf,
    pub(super) journal: Arc<parking_lot::Mutex<Manifest>>,
    pub(super) fold_every: std::time::Duration,
    pub(super) compact_slack: u64,
    pub(super) source: Arc<dyn StateSource>,
    pub(super) pending: Arc<parking_lot::Mutex<PendingHistory>>,
    pub(super) busy: Arc<AtomicBool>,
    pub(super) stats: Arc<CommitStats>,
    pub(super) hook: Arc<std::sync::OnceLock<CheckpointHook>>,
}

pub(super) fn checkpointer(c: Checkpointer, rx: std::sync::mpsc::Receiver<Checkpoint>) {
    let Checkpointer {
        db,
        wal_dir,
        twins_dir,
        manifest,
        history_dir,
        journal,
        fold_every,
        compact_slack,
        source,
        pending,
        busy,
        stats,
        hook,
    } = c;
    lower_priority();
    // A failed checkpoint's changes exist only in the log segments it covers; they are
    // carried into the next checkpoint, and no segment is deleted until one succeeds.
    let mut carry: Option<Checkpoint> = None;
    for mut ck in rx {
        let started = Instant::now();
        if let Some(earlier) = carry.take() {
            ck.absorb(earlier);
        }
        // Everything of the covered segments was published before they were handed over:
        // the hook persists it before the marker lets replay skip those segments.
        let hooked = match hook.get() {
            Some(h) => h(ck.lseq).map_err(StoreError::Checkpoint),
            None => Ok(()),
        };
        let hook_ms = started.elapsed().as_millis() as u64;
        let files = Files {
            dir: &twins_dir,
            manifest: &manifest,
            slack: compact_slack,
            history_dir: &history_dir,
            journal: &journal,
        };
        match hooked.and_then(|()| write_checkpoint(&db, &files, source.as_ref(), &ck)) {
            Ok(()) => {
                let written_ms = started.elapsed().as_millis() as u64;
                {
                    // Journaled now: readable from memory until the fold.
                    let mut p = pending.lock();
                    let maps = std::mem::take(&mut p.checkpointing);
                    let n: usize = maps.iter().flat_map(|m| m.values()).map(Vec::len).sum();
                    if n > 0 {
                        p.journaled.extend(maps);
                        p.journaled_samples += n;
                        p.journaled_since.get_or_insert_with(Instant::now);
                    }
                }
                let t_wal = Instant::now();
                if let Err(e) = wal::remove_upto(&wal_dir, ck.upto) {
                    tracing::warn!(error = %e, "could not remove checkpointed log segments");
                }
                let wal_ms = t_wal.elapsed().as_millis() as u64;
                stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                let took = started.elapsed().as_micros() as u64;
                stats.checkpoint_micros.fetch_add(took, Ordering::Relaxed);
                stats.last_checkpoint_micros.store(took, Ordering::Relaxed);
                stats
                    .twin_writes
                    .fetch_add(ck.dirty.len() as u64, Ordering::Relaxed);
                stats.points.fetch_add(
                    ck.points
                        .iter()
                        .flat_map(|m| m.values())
                        .map(|v| v.len() as u64)
                        .sum(),
                    Ordering::Relaxed,
                );
                tracing::debug!(
                    upto = ck.upto,
                    twins = ck.dirty.len(),
                    ms = started.elapsed().as_millis() as u64,
                    hook_ms,
                    written_ms,
                    wal_ms,
                    "checkpoint"
                );
                let fold_due = {
                    let p = pending.lock();
                    p.journaled_samples >= journal::FOLD_SAMPLES
                        || p.journaled_since.is_some_and(|t| t.elapsed() >= fold_every)
                };
                if fold_due {
                    let folded = Instant::now();
                    match fold(&db, &files, source.as_ref(), &pending, ck.upto) {
                        Ok(n) => tracing::debug!(
                            samples = n,
                            ms = folded.elapsed().as_millis() as u64,
                            "history journal folded"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "folding the history journal failed; retried after the next checkpoint")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "checkpoint failed; its changes stay in the log and are retried with the next");
                carry = Some(ck);
            }
        }
        busy.store(false, Ordering::Release);
    }
}

/// Checkpoints are background work: let request threads and the commit path win the CPU
/// (Linux applies `setpriority` to the calling thread when given its thread id).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; failure only leaves the priority as is.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, CHECKPOINT_NICE);
    }
}

/// Nice value of the checkpoint thread.
const CHECKPOINT_NICE: libc::c_int = 10;

/// A set of twin ids.
type Ids = HashSet<TwinId, FxBuildHasher>;

/// Where the twin files go, and the manifest naming them.
struct Files<'a> {
    dir: &'a std::path::Path,
    manifest: &'a parking_lot::Mutex<Manifest>,
    slack: u64,
    history_dir: &'a std::path::Path,
    journal: &'a parking_lot::Mutex<Manifest>,
}

/// Write the twin file of a checkpoint: the dirty twins' records, or every twin when the
/// files hold too many superseded records (a compaction, starting a new generation).
/// Returns the file's writer, finished by the caller once the rest is staged, the manifest to
/// commit with the marker, and the dirty twins that exist (their history is kept).
fn write_twins(
    files: &Files<'_>,
    source: &dyn StateSource,
    dirty: &Ids,
) -> Result<(Option<(FileWriter, Manifest)>, Ids), StoreError> {
    let mut present = Ids::default();
    let current = files.manifest.lock().clone();
    let ids = current
        .wants_compaction(source.twin_count(), files.slack)
        .then(|| source.twin_ids());
    let compacting = ids.is_some();
    if dirty.is_empty() && !compacting {
        return Ok((None, present));
    }
    let generation = if compacting {
        current.generation + 1
    } else {
        current.generation.max(1)
    };
    let name = current.next_name(generation);
    let mut w = FileWriter::create(files.dir, &name)?;
    let written = (|| {
        if let Some(ids) = ids {
            for id in dirty {
                if source.contains(id) {
                    present.insert(*id);
                }
            }
            w.push_all(source, ids)?;
        } else {
            for id in dirty {
                let rec = source.twin_bytes(id);
                if rec.is_some() {
                    present.insert(*id);
                }
                w.push(id, rec.as_deref())?;
            }
        }
        Ok::<_, StoreError>(())
    })();
    if let Err(e) = written {
        w.abandon();
        return Err(e);
    }
    let mut next = current;
    next.next += 1;
    next.generation = generation;
    if compacting {
        next.files = vec![name];
        next.records = w.records();
    } else {
        next.files.push(name);
        next.records += w.records();
    }
    Ok((Some((w, next)), present))
}

fn write_checkpoint(
    db: &sled::Db,
    files: &Files<'_>,
    source: &dyn StateSource,
    ck: &Checkpoint,
) -> Result<(), StoreError> {
    // Stage raw changes in order so a prefix delete also removes keys put earlier in it.
    let mut staged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    for op in &ck.kv {
        match op {
            KvOp::Put(k, v) => {
                staged.insert(k.clone(), Some(v.clone()));
            }
            KvOp::Delete(k) => {
                staged.insert(k.clone(), None);
            }
            KvOp::DeletePrefix(p) => {
                for (_, v) in staged
                    .range_mut(p.clone()..)
                    .take_while(|(k, _)| k.starts_with(p))
                {
                    *v = None;
                }
                for k in db.scan_prefix(p).keys() {
                    staged.insert(k?.to_vec(), None);
                }
            }
        }
    }
    let mut b = sled::Batch::default();
    for (k, v) in staged {
        match v {
            Some(v) => b.insert(k, v),
            None => b.remove(k),
        }
    }
    let t0 = Instant::now();
    let (file, present) = write_twins(files, source, &ck.dirty)?;
    // The file is durable before the manifest naming it commits.
    let manifest = match file {
        Some((w, m)) => {
            w.finish()?;
            b.insert(keys::META_TWIN_FILES, m.encode());
            Some(m)
        }
        None => None,
    };
    let twins_ms = t0.elapsed().as_millis() as u64;
    // The history samples it covers, into the journal (folded into sled's chunks later).
    let t_journal = Instant::now();
    let journal_manifest = {
        let mut m = files.journal.lock().clone();
        let name = journal::name(m.next);
        match journal::write(files.history_dir, &name, &ck.points, |id| {
            present.contains(id)
        })? {
            Some((w, samples)) => {
                w.finish()?;
                m.files.push(name);
                m.next += 1;
                m.records += samples;
                b.insert(keys::META_HISTORY_FILES, m.encode());
                Some(m)
            }
            None => None,
        }
    };
    if ck.lseq > 0 {
        b.insert(keys::META_LSEQ, &ck.lseq.to_be_bytes());
        b.insert(keys::META_HLC, &ck.hlc.to_be_bytes());
    }
    b.insert(keys::META_WAL_CHECKPOINT, &ck.upto.to_be_bytes());
    let journal_ms = t_journal.elapsed().as_millis() as u64;
    let t1 = Instant::now();
    let committed = db.apply_batch(b).and_then(|()| db.flush().map(drop));
    if let Err(e) = committed {
        // The new file is named by no committed manifest: the next open removes it.
        return Err(e.into());
    }
    let history_ms = t1.elapsed().as_millis() as u64;
    if let Some(m) = journal_manifest {
        *files.journal.lock() = m;
    }
    if let Some(m) = manifest {
        let compacted = m.files.len() == 1;
        *files.manifest.lock() = m.clone();
        if compacted {
            // Only now are the older files named by no committed manifest.
            if let Err(e) = twin_files::remove_unlisted(files.dir, twin_files::EXT, &m.files) {
                tracing::warn!(error = %e, "could not remove twin files a compaction replaced");
            }
        }
    }
    tracing::debug!(
        twins_ms,
        journal_ms,
        sled_ms = history_ms,
        "checkpoint written"
    );
    Ok(())
}

/// Fold the journaled history samples into sled's chunks (one per series for the whole
/// span, keyed with `seq`), then drop the journal files. Returns the samples folded.
fn fold(
    db: &sled::Db,
    files: &Files<'_>,
    source: &dyn StateSource,
    pending: &parking_lot::Mutex<PendingHistory>,
    seq: u64,
) -> Result<usize, StoreError> {
    let (maps, deleted) = {
        let p = pending.lock();
        (p.journaled.clone(), p.journal_deleted.clone())
    };
    let chunks = journal::chunks(&maps, seq, |id| {
        !deleted.contains(id) && source.contains(id)
    });
    for part in chunks.chunks(FOLD_BATCH) {
        let mut b = sled::Batch::default();
        for (k, v) in part {
            b.insert(&k[..], &v[..]);
        }
        db.apply_batch(b)?;
    }
    drop(chunks);
    let mut m = files.journal.lock().clone();
    let old = std::mem::take(&mut m.files);
    m.records = 0;
    db.insert(keys::META_HISTORY_FILES, m.encode())?;
    db.flush()?;
    *files.journal.lock() = m;
    for name in old {
        if let Err(e) = std::fs::remove_file(files.history_dir.join(&name)) {
            tracing::warn!(error = %e, file = name, "could not remove a folded history journal file");
        }
    }
    let mut p = pending.lock();
    p.journaled.drain(..maps.len());
    p.journaled_samples = p
        .journaled
        .iter()
        .flat_map(|m| m.values())
        .map(Vec::len)
        .sum();
    p.journal_deleted.clear();
    p.journaled_since = None;
    Ok(maps.iter().flat_map(|m| m.values()).map(Vec::len).sum())
}

/// History chunks per sled batch when the journal is folded. Small: sled holds a lock that
/// stops every other write to the store while it applies a batch (20,000 chunks held it for
/// ~400 ms at a million twins, and a peer's merge, which writes its cursor, waited).
const FOLD_BATCH: usize = 500;
