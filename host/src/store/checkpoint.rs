//! Checkpoints: the background thread that folds what the log holds into the data directory
//! — the current record of each dirty twin into a new twin file ([`super::twin_files`]), the
//! history samples into a history journal file ([`super::journal`]), then raw key/value
//! changes in order, the manifests naming the new files and the checkpoint marker as one
//! atomic sled batch — flushes, and deletes the covered log segments. A failed checkpoint is
//! carried into the next; no segment goes before one succeeds.
//!
//! Beside it, the fold thread moves the history journal into history blocks
//! ([`super::blocks`]) every `fold_every` or once [`journal::FOLD_SAMPLES`] wait.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rustc_hash::FxBuildHasher;

use super::batch::{KvOp, PendingHistory, Sample, SeriesMap};
use super::commit::{CheckpointHook, CommitStats, StateSource};
use super::twin_files::{self, FileWriter, Manifest};
use super::{blocks, journal};
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
    // The history journal is folded into sled on a thread of its own: a fold of millions of
    // samples takes a minute, and checkpoints go on meanwhile.
    let (fold_tx, fold_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let stop: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let folder = {
        let f = Folder {
            db: db.clone(),
            history_dir: history_dir.clone(),
            journal: journal.clone(),
            source: source.clone(),
            pending: pending.clone(),
            stop: stop.clone(),
        };
        std::thread::Builder::new()
            .name("twinhost-fold".into())
            .spawn(move || folder(f, fold_rx))
            .expect("spawning the history fold thread")
    };
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
        match hooked.and_then(|()| write_checkpoint(&db, &files, source.as_ref(), &pending, &ck)) {
            Ok(()) => {
                let written_ms = started.elapsed().as_millis() as u64;
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
                let (fold_due, over) = {
                    let p = pending.lock();
                    (
                        p.journaled_samples >= journal::FOLD_SAMPLES
                            || p.journaled_since.is_some_and(|t| t.elapsed() >= fold_every),
                        p.journaled_samples >= journal::MAX_JOURNALED,
                    )
                };
                if over {
                    // The fold fell behind: wait until it takes this request (it finishes the
                    // one in progress first), so the journal held in memory stays bounded.
                    let waited = Instant::now();
                    let _ = fold_tx.send(());
                    tracing::debug!(
                        ms = waited.elapsed().as_millis() as u64,
                        "checkpoint waited for the history fold"
                    );
                } else if fold_due {
                    // At most one fold waits behind the one running.
                    let _ = fold_tx.try_send(());
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "checkpoint failed; its changes stay in the log and are retried with the next");
                carry = Some(ck);
            }
        }
        busy.store(false, Ordering::Release);
    }
    // Stopping: a fold asked for (the last checkpoint's) or in progress gets a moment to
    // finish; what it leaves stays in the journal, read back at the next start.
    let _ = stop.set(Instant::now() + STOP_FOLD_GRACE);
    drop(fold_tx);
    let _ = folder.join();
}

/// How long a clean stop lets a history fold go on before leaving the rest in the journal.
const STOP_FOLD_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// What the fold thread works with.
struct Folder {
    db: sled::Db,
    history_dir: PathBuf,
    journal: Arc<parking_lot::Mutex<Manifest>>,
    source: Arc<dyn StateSource>,
    pending: Arc<parking_lot::Mutex<PendingHistory>>,
    /// Set when the store stops: a fold still going at this time gives up.
    stop: Arc<std::sync::OnceLock<Instant>>,
}

/// Folds the history journal each time the checkpoint thread asks, until the checkpoint
/// thread goes.
fn folder(f: Folder, rx: std::sync::mpsc::Receiver<()>) {
    lower_priority();
    let give_up = || f.stop.get().is_some_and(|at| Instant::now() >= *at);
    for () in rx {
        let started = Instant::now();
        match fold(
            &f.db,
            &f.history_dir,
            &f.journal,
            f.source.as_ref(),
            &f.pending,
            &give_up,
        ) {
            Ok(Some(n)) => tracing::debug!(
                samples = n,
                ms = started.elapsed().as_millis() as u64,
                "history journal folded"
            ),
            Ok(None) => tracing::info!(
                ms = started.elapsed().as_millis() as u64,
                "stopping: the history fold in progress was left for the next start (its samples stay in the journal)"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "folding the history journal failed; retried after the next checkpoint")
            }
        }
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
    pending: &parking_lot::Mutex<PendingHistory>,
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
    // The history samples it covers, into the journal (folded into history blocks later).
    // The journal's manifest is held from here until it is published with the samples it
    // names moved to `journaled`: the fold thread, which removes the files it folded from the
    // same manifest, sees either both or neither.
    let t_journal = Instant::now();
    let mut journal_guard = files.journal.lock();
    let journal_manifest = {
        let mut m = journal_guard.clone();
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
        *journal_guard = m;
    }
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
    drop(journal_guard);
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

/// Fold the journaled history samples into sled's history blocks ([`blocks`]: the next fold
/// number, each twin's samples of the whole span in one record), then drop the journal files
/// they came from. Returns the samples folded, or `None` when `give_up` said to stop first
/// (the journal is then left as it was: its samples are folded again by the next fold, and
/// readers return identical samples once).
///
/// Checkpoints go on meanwhile and add journal files and samples: the fold takes the files
/// and the samples journaled when it starts, together (checkpoints publish both under the
/// journal's lock), and at the end removes only those.
fn fold(
    db: &sled::Db,
    history_dir: &std::path::Path,
    journal: &parking_lot::Mutex<Manifest>,
    source: &dyn StateSource,
    pending: &parking_lot::Mutex<PendingHistory>,
    give_up: &dyn Fn() -> bool,
) -> Result<Option<usize>, StoreError> {
    let (folding, maps, deleted) = {
        let j = journal.lock();
        let p = pending.lock();
        (
            j.files.clone(),
            p.journaled.clone(),
            p.journal_deleted.clone(),
        )
    };
    if maps.is_empty() && folding.is_empty() {
        return Ok(Some(0));
    }
    // The fold's number and span go first: retention finds its blocks by them, even if a
    // crash stops the fold half way (the next fold then writes those samples again).
    let span = maps
        .iter()
        .flat_map(|m| m.values())
        .flatten()
        .fold((i64::MAX, i64::MIN), |(lo, hi), s| {
            (lo.min(s.1), hi.max(s.1))
        });
    if span.0 > span.1 {
        // No samples (only empty series): nothing to write.
        return finish_fold(db, history_dir, journal, pending, &folding, maps.len(), 0);
    }
    // A number of its own, known to readers from here on: a fold that fails or gives up
    // half way leaves blocks no later fold writes over.
    let number = {
        let mut p = pending.lock();
        let n = p
            .next_fold
            .max(p.folds.last_key_value().map_or(1, |(n, _)| n + 1));
        p.next_fold = n + 1;
        n
    };
    db.insert(keys::history_fold(number), &blocks::encode_span(span))?;
    pending.lock().folds.insert(number, span);
    // Blocks of twins in id order, made one at a time and written a few at a time: a fold of
    // 8M samples holds their twins' ids and a batch of blocks, not every block at once.
    let mut block = blocks::BlockWriter::default();
    let mut batch = sled::Batch::default();
    let mut in_batch = 0usize;
    let mut samples: Vec<&Sample> = Vec::new();
    for id in journal::twins_in_order(&maps) {
        if deleted.contains(&id) || !source.contains(&id) {
            continue;
        }
        samples.clear();
        samples.extend(maps.iter().filter_map(|m| m.get(&id)).flatten());
        if samples.is_empty() {
            continue;
        }
        samples.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        block.push(&id, &samples);
        if block.full() {
            let (first, bytes) = block.take().expect("a full block");
            in_batch += bytes.len();
            batch.insert(keys::history_block(number, &first), bytes);
            if in_batch >= FOLD_BATCH_BYTES {
                if give_up() {
                    return Ok(None);
                }
                db.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
    }
    if give_up() {
        return Ok(None);
    }
    if let Some((first, bytes)) = block.take() {
        batch.insert(keys::history_block(number, &first), bytes);
    }
    db.apply_batch(batch)?;
    let samples: usize = maps.iter().flat_map(|m| m.values()).map(Vec::len).sum();
    finish_fold(
        db,
        history_dir,
        journal,
        pending,
        &folding,
        maps.len(),
        samples,
    )
}

/// The end of a fold that took `folding` (the journal files) and the first `maps` journaled
/// maps, holding `samples`: remove them from the manifest, then (once that is durable) the
/// files, and from memory.
fn finish_fold(
    db: &sled::Db,
    history_dir: &std::path::Path,
    journal: &parking_lot::Mutex<Manifest>,
    pending: &parking_lot::Mutex<PendingHistory>,
    folding: &[String],
    maps: usize,
    samples: usize,
) -> Result<Option<usize>, StoreError> {
    {
        let mut j = journal.lock();
        let mut m = j.clone();
        // Checkpoints only append to the list: the files folded are still its head.
        debug_assert!(m.files.starts_with(folding));
        m.files.drain(..folding.len().min(m.files.len()));
        m.records = m.records.saturating_sub(samples as u64);
        db.insert(keys::META_HISTORY_FILES, m.encode())?;
        *j = m;
    }
    // The files go only once a manifest without them is durable.
    db.flush()?;
    for name in folding {
        if let Err(e) = std::fs::remove_file(history_dir.join(name)) {
            tracing::warn!(error = %e, file = name, "could not remove a folded history journal file");
        }
    }
    let mut p = pending.lock();
    p.journaled.drain(..maps);
    p.journaled_samples = p.journaled_samples.saturating_sub(samples);
    let PendingHistory {
        journaled,
        checkpointing,
        journal_deleted,
        journaled_since,
        ..
    } = &mut *p;
    // A deleted twin stays hidden while samples of it may still be journaled.
    journal_deleted.retain(|id| {
        journaled
            .iter()
            .chain(checkpointing.iter())
            .any(|m| m.contains_key(id))
    });
    *journaled_since = (!journaled.is_empty()).then(Instant::now);
    Ok(Some(samples))
}

/// History block bytes per sled batch when the journal is folded. Small: sled holds a lock
/// that stops every other write to the store while it applies a batch (20,000 series chunks
/// held it for ~400 ms at a million twins, and a peer's merge, which writes its cursor, waited).
const FOLD_BATCH_BYTES: usize = 512 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every twin exists.
    struct AllTwins;

    impl StateSource for AllTwins {
        fn twin_bytes(&self, _: &TwinId) -> Option<Vec<u8>> {
            None
        }
        fn contains(&self, _: &TwinId) -> bool {
            true
        }
        fn twin_count(&self) -> usize {
            0
        }
        fn twin_ids(&self) -> Vec<TwinId> {
            Vec::new()
        }
    }

    /// A journal of one file per map, in `dir`, named from number 1, with a manifest.
    fn journaled(dir: &std::path::Path, maps: &[SeriesMap], first: u64) -> Vec<String> {
        maps.iter()
            .enumerate()
            .map(|(i, m)| {
                let name = journal::name(first + i as u64);
                let (w, _) = journal::write(dir, &name, &[Arc::new(m.clone())], |_| true)
                    .unwrap()
                    .unwrap();
                w.finish().unwrap();
                name
            })
            .collect()
    }

    fn samples(id: TwinId, n: usize) -> SeriesMap {
        let t: Arc<str> = Arc::from("temperature");
        let mut m = SeriesMap::default();
        m.insert(
            id,
            (0..n).map(|i| (t.clone(), i as i64, i as f64)).collect(),
        );
        m
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        db: sled::Db,
        history: PathBuf,
        journal: parking_lot::Mutex<Manifest>,
        pending: parking_lot::Mutex<PendingHistory>,
    }

    /// A store with `maps` journaled, one file each.
    fn fixture(maps: &[SeriesMap]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let history = dir.path().join("history");
        std::fs::create_dir_all(&history).unwrap();
        let files = journaled(&history, maps, 1);
        let journal = parking_lot::Mutex::new(Manifest {
            next: files.len() as u64 + 1,
            files,
            ..Default::default()
        });
        let pending = parking_lot::Mutex::new(PendingHistory {
            journaled: maps.iter().cloned().map(Arc::new).collect(),
            journaled_samples: maps.iter().flat_map(|m| m.values()).map(Vec::len).sum(),
            journaled_since: Some(Instant::now()),
            ..Default::default()
        });
        Fixture {
            _dir: dir,
            db,
            history,
            journal,
            pending,
        }
    }

    impl Fixture {
        /// Fold this store's journal (every twin exists), giving up when `give_up` says.
        fn fold(&self, give_up: &dyn Fn() -> bool) -> Option<usize> {
            fold(
                &self.db,
                &self.history,
                &self.journal,
                &AllTwins,
                &self.pending,
                give_up,
            )
            .unwrap()
        }
    }

    fn blocks_in_sled(db: &sled::Db) -> usize {
        db.scan_prefix([keys::HISTORY_BLOCK]).count()
    }

    /// A checkpoint that journals a file while a fold runs keeps its file and samples: the
    /// fold removes only what it folded.
    #[test]
    fn a_fold_keeps_what_a_checkpoint_journals_meanwhile() {
        let (a, b, c) = (TwinId::new_v7(), TwinId::new_v7(), TwinId::new_v7());
        let f = fixture(&[samples(a, 3), samples(b, 2)]);
        let (first, second) = {
            let j = f.journal.lock();
            (j.files[0].clone(), j.files[1].clone())
        };
        let later = samples(c, 4);
        let checkpointed = std::cell::Cell::new(false);
        // Called between the fold's sled batches: the first call journals one more file, as a
        // checkpoint would (file, manifest and samples under the journal's lock).
        let meanwhile = || {
            if !checkpointed.replace(true) {
                let mut j = f.journal.lock();
                let name = journaled(&f.history, std::slice::from_ref(&later), j.next).remove(0);
                j.files.push(name);
                j.next += 1;
                let mut p = f.pending.lock();
                p.journaled.push(Arc::new(later.clone()));
                p.journaled_samples += 4;
            }
            false
        };
        let folded = f.fold(&meanwhile);
        assert_eq!(folded, Some(5), "the samples journaled when it started");
        assert!(checkpointed.get());
        assert_eq!(
            blocks_in_sled(&f.db),
            1,
            "one block of the two twins it folded"
        );
        assert_eq!(
            f.pending.lock().folds_within(0, 2),
            vec![1],
            "fold 1, samples at 0..2"
        );
        let j = f.journal.lock().clone();
        assert_eq!(
            j.files,
            vec![journal::name(3)],
            "only the later file is left"
        );
        assert_eq!(
            Manifest::stored(&f.db, keys::META_HISTORY_FILES)
                .unwrap()
                .files,
            j.files,
            "and that is what sled holds"
        );
        assert!(!f.history.join(&first).exists() && !f.history.join(&second).exists());
        assert!(f.history.join(journal::name(3)).exists());
        let p = f.pending.lock();
        assert_eq!(p.journaled.len(), 1);
        assert_eq!(*p.journaled[0], later);
        assert_eq!(p.journaled_samples, 4);
        assert!(p.journaled_since.is_some(), "samples are still journaled");
    }

    /// A fold told to give up (the store is stopping) leaves the journal as it was: its
    /// files, its manifest and the samples readable from memory.
    #[test]
    fn a_fold_that_gives_up_leaves_the_journal_whole() {
        let (a, b) = (TwinId::new_v7(), TwinId::new_v7());
        let f = fixture(&[samples(a, 3), samples(b, 2)]);
        let before = f.journal.lock().clone();
        let folded = f.fold(&|| true);
        assert_eq!(folded, None);
        assert_eq!(*f.journal.lock(), before);
        assert!(before.files.iter().all(|n| f.history.join(n).exists()));
        let p = f.pending.lock();
        assert_eq!(p.journaled.len(), 2);
        assert_eq!(p.journaled_samples, 5);
        drop(p);
        // The next fold takes all of it.
        assert_eq!(f.fold(&|| false), Some(5));
        assert!(f.journal.lock().files.is_empty());
        assert!(f.pending.lock().journaled.is_empty());
        assert!(f.pending.lock().journaled_since.is_none());
    }

    /// A deleted twin stays hidden while samples of it are still journaled, and is forgotten
    /// once none are.
    #[test]
    fn a_deleted_twin_is_forgotten_only_when_none_of_its_samples_are_left() {
        let (a, b) = (TwinId::new_v7(), TwinId::new_v7());
        let f = fixture(&[samples(a, 3)]);
        f.pending.lock().journal_deleted.extend([a, b]);
        // b's samples are on their way to the journal with a checkpoint.
        f.pending.lock().checkpointing.push(Arc::new(samples(b, 1)));
        f.fold(&|| false);
        let p = f.pending.lock();
        assert!(!p.journal_deleted.contains(&a));
        assert!(p.journal_deleted.contains(&b));
        assert_eq!(
            blocks_in_sled(&f.db),
            0,
            "a deleted twin's samples are not folded"
        );
    }
}
