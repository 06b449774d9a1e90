//! Checkpoints: the background thread that folds what the log holds into the data directory
//! — the current record of each dirty twin into a new twin file ([`super::twin_files`]),
//! then raw key/value changes in order, one history chunk per series, the manifest naming
//! the new file and the checkpoint marker as one atomic sled batch — flushes, and deletes
//! the covered log segments. A failed checkpoint is carried into the next; no segment goes
//! before one succeeds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rustc_hash::FxBuildHasher;

use super::batch::{KvOp, PendingHistory, Sample, SeriesMap};
use super::commit::{CheckpointHook, CommitStats, StateSource};
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
        let files = Files {
            dir: &twins_dir,
            manifest: &manifest,
            slack: compact_slack,
        };
        match hooked.and_then(|()| write_checkpoint(&db, &files, source.as_ref(), &ck)) {
            Ok(()) => {
                pending.lock().checkpointing.clear();
                if let Err(e) = wal::remove_upto(&wal_dir, ck.upto) {
                    tracing::warn!(error = %e, "could not remove checkpointed log segments");
                }
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
                    "checkpoint"
                );
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

/// Where the twin files go, and the manifest naming them.
struct Files<'a> {
    dir: &'a std::path::Path,
    manifest: &'a parking_lot::Mutex<Manifest>,
    slack: u64,
}

/// Write the twin file of a checkpoint: the dirty twins' records, or every twin when the
/// files hold too many superseded records (a compaction, starting a new generation).
/// Returns the file's writer, finished by the caller once the rest is staged, the manifest to
/// commit with the marker, and the dirty twins that exist (their history is kept).
fn write_twins(
    files: &Files<'_>,
    source: &dyn StateSource,
    dirty: &HashSet<TwinId, FxBuildHasher>,
) -> Result<
    (
        Option<(FileWriter, Manifest)>,
        HashSet<TwinId, FxBuildHasher>,
    ),
    StoreError,
> {
    let mut present: HashSet<TwinId, FxBuildHasher> = HashSet::default();
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
            for id in ids {
                if let Some(rec) = source.twin_bytes(&id) {
                    w.push(&id, Some(&rec))?;
                }
            }
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
    let mut next = current.clone();
    next.next += 1;
    if compacting {
        next.generation = generation;
        next.files = vec![name];
        next.records = w.records();
    } else {
        next.generation = generation;
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
    let seq = ck.upto.to_be_bytes();
    // Samples per twin, from every map this checkpoint covers.
    let mut per_twin: HashMap<TwinId, Vec<&Sample>, FxBuildHasher> = HashMap::default();
    for map in &ck.points {
        for (id, samples) in map.iter() {
            per_twin.entry(*id).or_default().extend(samples.iter());
        }
    }
    for (id, mut samples) in per_twin {
        // Every twin with samples is dirty; one gone by now (deleted) keeps no history.
        if !present.contains(&id) {
            continue;
        }
        // One chunk per property: group this twin's samples by name, each group by time.
        samples.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        for group in samples.chunk_by(|a, b| a.0 == b.0) {
            let mut key = keys::history_series(&id, &group[0].0);
            key.extend_from_slice(&keys::ts_bytes(group[0].1));
            key.extend_from_slice(&seq);
            let mut val = Vec::with_capacity(group.len() * 16);
            for (_, ts, v) in group {
                val.extend_from_slice(&ts.to_le_bytes());
                val.extend_from_slice(&v.to_le_bytes());
            }
            b.insert(key, val);
        }
    }
    if ck.lseq > 0 {
        b.insert(keys::META_LSEQ, &ck.lseq.to_be_bytes());
        b.insert(keys::META_HLC, &ck.hlc.to_be_bytes());
    }
    b.insert(keys::META_WAL_CHECKPOINT, &ck.upto.to_be_bytes());
    let t1 = Instant::now();
    let committed = db.apply_batch(b).and_then(|()| db.flush().map(drop));
    if let Err(e) = committed {
        // The new file is named by no committed manifest: the next open removes it.
        return Err(e.into());
    }
    let history_ms = t1.elapsed().as_millis() as u64;
    if let Some(m) = manifest {
        let compacted = m.files.len() == 1;
        *files.manifest.lock() = m.clone();
        if compacted {
            // Only now are the older files named by no committed manifest.
            if let Err(e) = twin_files::remove_unlisted(files.dir, &m.files) {
                tracing::warn!(error = %e, "could not remove twin files a compaction replaced");
            }
        }
    }
    tracing::debug!(twins_ms, history_ms, "checkpoint written");
    Ok(())
}
