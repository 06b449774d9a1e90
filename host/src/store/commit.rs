//! Group commit and checkpoints: the one writer.
//!
//! Producers send *jobs* (closures from the registry's write path) to one writer thread over a
//! bounded queue. The writer runs every queued job in order — so memory changes and the log
//! agree on one total order — and each job appends its entries to the commit's
//! write-ahead-log frame. The frame is appended and fsynced once for everything queued, and
//! only then is each job told it is durable. A 2xx therefore survives `kill -9`.
//!
//! Sled holds the checkpointed state. Every [`CHECKPOINT_EVERY`] (or when a segment passes
//! [`MAX_SEGMENT_BYTES`]) the writer starts a new log segment and hands what changed since
//! the last checkpoint — dirty twin ids, raw key/value changes and history samples — to the
//! checkpoint thread, which writes the current bytes of each dirty twin and one history chunk
//! per series as one atomic sled batch with the checkpoint marker, flushes, and deletes the
//! covered segments. Many updates to one twin between checkpoints cost one sled write.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustc_hash::FxBuildHasher;
use tokio::sync::{mpsc, oneshot};

pub use super::batch::{Batch, KvOp, Numbering, PendingHistory};
use super::checkpoint::{checkpointer, Checkpoint, Checkpointer};
use super::wal::Segment;
use super::StoreError;
use crate::types::TwinId;

/// Jobs that may wait for the writer. Each job is one API call or one ingest batch, so this
/// bounds memory held by pending writes; when it is full producers wait up to
/// [`ENQUEUE_TIMEOUT`] and then get [`StoreError::Overloaded`] (retry later).
pub const QUEUE_CAPACITY: usize = 4096;
/// Most jobs folded into one commit, so one frame never grows without limit.
pub const MAX_JOBS_PER_COMMIT: usize = 4096;
/// A commit stops taking more jobs once its log frame passes this size (one job may still
/// exceed it; a frame's length must fit the frame header's u32).
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// How long a producer waits for a queue slot before giving up with `Overloaded`.
pub const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most history samples waiting for a checkpoint. When the checkpoint thread falls this far
/// behind, the writer stops taking jobs until it catches up (producers then see 429s), so
/// memory stays bounded: at most twice this many samples (pending + being checkpointed).
pub const MAX_PENDING_SAMPLES: usize = 8_000_000;

/// Default checkpoint interval (`serve --checkpoint-every`; bounds replay after a crash).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// Checkpoint when the current log segment grows past this.
pub const MAX_SEGMENT_BYTES: u64 = 256 * 1024 * 1024;

/// Supplies the current persisted bytes of a twin (`None` when it no longer exists).
pub trait StateSource: Send + Sync + 'static {
    /// The twin's record as stored (`None`: no such twin now).
    fn twin_bytes(&self, id: &TwinId) -> Option<Vec<u8>>;
    /// Whether the twin exists now.
    fn contains(&self, id: &TwinId) -> bool;
    /// How many twins there are now.
    fn twin_count(&self) -> usize;
    /// Every twin's id (a compaction writes them all).
    fn twin_ids(&self) -> Vec<TwinId>;
}

/// Runs before a checkpoint lets the log segments it covers be deleted, with the highest
/// change number in them (the event log persists its tail through it, so no event exists
/// only in a deleted segment). An error postpones the checkpoint.
pub type CheckpointHook = Arc<dyn Fn(u64) -> Result<(), String> + Send + Sync>;

/// Called once the commit holding a job is durable (or failed), on the sync thread in
/// commit order: publishes the job's changes and acknowledges it.
pub type Done = Box<dyn FnOnce(Result<u64, String>) + Send>;
/// A unit of work for the writer: change memory, log it, return what to do once durable.
pub type Job = Box<dyn FnOnce(&mut Batch) -> Done + Send>;

enum Msg {
    Job(Job),
    /// Wake up (time-based checkpoints on an idle node).
    Tick,
    /// Finish what is queued before this, checkpoint, and stop.
    Close,
}

/// Counters of the writer, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub commits: AtomicU64,
    pub jobs: AtomicU64,
    pub log_bytes: AtomicU64,
    pub commit_micros: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checkpoint_micros: AtomicU64,
    /// How long the last checkpoint took (the next waits at least twice that).
    pub last_checkpoint_micros: AtomicU64,
    pub twin_writes: AtomicU64,
    pub points: AtomicU64,
}

/// The producers' side of the writer.
#[derive(Clone)]
pub struct CommitHandle {
    tx: mpsc::Sender<Msg>,
    /// Set by the syncer when a log write fails: why. From then on every job is refused.
    poisoned: Arc<std::sync::OnceLock<String>>,
    threads: Arc<parking_lot::Mutex<Vec<JoinHandle<()>>>>,
    pub stats: Arc<CommitStats>,
}

impl CommitHandle {
    /// Run `job` on the writer and wait until its changes are durable.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Batch) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        self.run_then(move |b| (job(b), ()), |()| {}).await
    }

    /// Like [`CommitHandle::run`], and once the job's changes are durable call `on_durable`
    /// with the second half of its output — on the sync thread, in commit order, before the
    /// job is acknowledged (a caller that sees its write succeed also finds it in the event
    /// log). Keep it short: it delays the next commit.
    pub async fn run_then<T: Send + 'static, P: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Batch) -> (T, P) + Send + 'static,
        on_durable: impl FnOnce(P) + Send + 'static,
    ) -> Result<T, StoreError> {
        if let Some(why) = self.poisoned.get() {
            return Err(StoreError::Poisoned(why.clone()));
        }
        let (tx, rx) = oneshot::channel();
        let boxed: Job = Box::new(move |b: &mut Batch| {
            let (out, publish) = job(b);
            Box::new(move |r: Result<u64, String>| {
                if r.is_ok() {
                    on_durable(publish);
                }
                let _ = tx.send(r.map(|_| out));
            })
        });
        match tokio::time::timeout(ENQUEUE_TIMEOUT, self.tx.send(Msg::Job(boxed))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(StoreError::Closed),
            Err(_) => return Err(StoreError::Overloaded),
        }
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(why)) => Err(StoreError::Poisoned(why)),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// A handle that does not keep the writer running (see [`WeakCommitHandle`]).
    pub fn downgrade(&self) -> WeakCommitHandle {
        WeakCommitHandle {
            tx: self.tx.downgrade(),
            poisoned: self.poisoned.clone(),
            stats: self.stats.clone(),
        }
    }

    /// Jobs waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Let everything queued so far commit, write a final checkpoint and stop the store's
    /// threads. Later writes fail with [`StoreError::Closed`].
    pub fn shutdown(&self) {
        let threads = std::mem::take(&mut *self.threads.lock());
        if threads.is_empty() {
            return;
        }
        // `send` waits for room, so the marker lands after every job already queued. A plain
        // thread does the waiting: this may be called from inside the async runtime.
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = self.tx.blocking_send(Msg::Close);
            });
        });
        for t in threads {
            let _ = t.join();
        }
    }
}

/// The store's handle on the writer, for configuration writes. Weak: the writer stops when
/// the registry's handles are gone, even while things holding the store (the event log's
/// checkpoint hook among them) are still being dropped.
#[derive(Clone)]
pub struct WeakCommitHandle {
    tx: mpsc::WeakSender<Msg>,
    poisoned: Arc<std::sync::OnceLock<String>>,
    stats: Arc<CommitStats>,
}

impl WeakCommitHandle {
    /// A handle to run jobs with, while the writer runs. Its [`CommitHandle::shutdown`] does
    /// nothing: the registry's handle owns the threads.
    pub fn upgrade(&self) -> Option<CommitHandle> {
        Some(CommitHandle {
            tx: self.tx.upgrade()?,
            poisoned: self.poisoned.clone(),
            threads: Arc::default(),
            stats: self.stats.clone(),
        })
    }

    /// Why the store refuses writes, once a log write has failed.
    pub fn poisoned(&self) -> Option<String> {
        self.poisoned.get().cloned()
    }
}

/// Everything the writer starts with.
pub(super) struct Start {
    pub db: sled::Db,
    pub wal_dir: PathBuf,
    pub twins_dir: PathBuf,
    pub manifest: Arc<parking_lot::Mutex<super::twin_files::Manifest>>,
    pub history_dir: PathBuf,
    pub journal: Arc<parking_lot::Mutex<super::twin_files::Manifest>>,
    pub fold_every: Duration,
    pub compact_slack: u64,
    pub next_segment: u64,
    pub source: Arc<dyn StateSource>,
    pub pending: Arc<parking_lot::Mutex<PendingHistory>>,
    /// Changes replayed from the log that the first checkpoint must persist.
    pub replayed: Option<Batch>,
    pub checkpoint_every: Duration,
    /// Where numbering starts (above everything stored).
    pub numbering: Numbering,
    pub before_checkpoint: Arc<std::sync::OnceLock<CheckpointHook>>,
}

pub(super) fn start(s: Start) -> Result<CommitHandle, StoreError> {
    let (tx, rx) = mpsc::channel::<Msg>(QUEUE_CAPACITY);
    let stats = Arc::new(CommitStats::default());
    let segment = Segment::create(&s.wal_dir, s.next_segment).map_err(io_err)?;
    let (ck_tx, ck_rx) = std::sync::mpsc::sync_channel::<Checkpoint>(1);
    // Commits prepared by the writer wait here for the syncer: one being synced and one
    // being prepared keeps both busy without holding more than a few frames in memory.
    let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<Commit>(2);
    let busy = Arc::new(AtomicBool::new(false));
    let poisoned: Arc<std::sync::OnceLock<String>> = Arc::default();
    let ckpt = {
        let c = Checkpointer {
            db: s.db.clone(),
            wal_dir: s.wal_dir.clone(),
            twins_dir: s.twins_dir.clone(),
            manifest: s.manifest.clone(),
            history_dir: s.history_dir.clone(),
            journal: s.journal.clone(),
            fold_every: s.fold_every,
            compact_slack: s.compact_slack,
            source: s.source.clone(),
            pending: s.pending.clone(),
            busy: busy.clone(),
            stats: stats.clone(),
            hook: s.before_checkpoint.clone(),
        };
        spawn("twinhost-checkpoint", move || checkpointer(c, ck_rx))
    };
    // Wakes the writer so time-based checkpoints happen on an idle node too.
    let _ticker = {
        let tx = tx.downgrade();
        let every = s.checkpoint_every;
        spawn("twinhost-commit-tick", move || loop {
            std::thread::sleep(every / 4);
            let Some(tx) = tx.upgrade() else { return };
            if tx.try_send(Msg::Tick).is_err() && tx.is_closed() {
                return;
            }
        })
    };
    let syncer = {
        let sy = Syncer {
            db: s.db.clone(),
            pending: s.pending.clone(),
            ck_tx,
            busy,
            stats: stats.clone(),
            checkpoint_every: s.checkpoint_every,
            poisoned: poisoned.clone(),
        };
        spawn("twinhost-sync", move || syncer(sy, sync_rx, segment))
    };
    let writer = {
        let (replayed, pending, numbering) = (s.replayed, s.pending.clone(), s.numbering);
        spawn("twinhost-commit", move || {
            writer(rx, sync_tx, replayed, pending, numbering)
        })
    };
    Ok(CommitHandle {
        tx,
        poisoned,
        // The ticker is not joined: it sleeps between ticks and ends by itself once the
        // queue is gone, so shutdown does not wait for its sleep.
        threads: Arc::new(parking_lot::Mutex::new(vec![writer, syncer, ckpt])),
        stats,
    })
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawning a store thread")
}

fn io_err(e: std::io::Error) -> StoreError {
    StoreError::Io {
        what: "the write-ahead log".into(),
        source: e,
    }
}

/// What the writer hands to the syncer: one frame and everything that follows from it.
struct Commit {
    batch: Batch,
    dones: Vec<Done>,
    /// Checkpoint right after this commit (replayed state, shutdown).
    checkpoint_now: bool,
    closing: bool,
}

/// Runs jobs in queue order and prepares commits. It never waits for the disk: while the
/// syncer fsyncs one commit, the next one is being prepared here.
fn writer(
    mut rx: mpsc::Receiver<Msg>,
    sync_tx: std::sync::mpsc::SyncSender<Commit>,
    replayed: Option<Batch>,
    pending: Arc<parking_lot::Mutex<PendingHistory>>,
    mut numbering: Numbering,
) {
    if let Some(batch) = replayed {
        let _ = sync_tx.send(Commit {
            batch,
            dones: Vec::new(),
            checkpoint_now: true,
            closing: false,
        });
    }
    let mut closing = false;
    let mut last_frame = 0;
    while !closing {
        // Too many samples wait for a checkpoint: stop taking jobs, and keep asking the
        // syncer for a checkpoint (it decides only when a commit arrives).
        while pending.lock().current_samples >= MAX_PENDING_SAMPLES {
            let nudge = Commit {
                batch: Batch::new(),
                dones: Vec::new(),
                checkpoint_now: true,
                closing: false,
            };
            if sync_tx.send(nudge).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Frames of a steady load are alike: start at the last one's size instead of
        // growing (and copying) the buffer by doubling.
        let mut batch = Batch {
            numbering,
            frame: Vec::with_capacity(last_frame.min(MAX_FRAME_BYTES)),
            ..Batch::default()
        };
        let mut dones: Vec<Done> = Vec::new();
        match rx.blocking_recv() {
            Some(Msg::Job(job)) => {
                batch.start_job();
                dones.push(job(&mut batch))
            }
            Some(Msg::Tick) => {}
            Some(Msg::Close) | None => closing = true,
        }
        while !closing && dones.len() < MAX_JOBS_PER_COMMIT && batch.frame.len() < MAX_FRAME_BYTES {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => {
                    batch.start_job();
                    dones.push(job(&mut batch))
                }
                Ok(Msg::Tick) => {}
                Ok(Msg::Close) => closing = true,
                Err(_) => break,
            }
        }
        numbering = batch.numbering;
        last_frame = batch.frame.len();
        let commit = Commit {
            batch,
            dones,
            checkpoint_now: closing,
            closing,
        };
        if sync_tx.send(commit).is_err() {
            return;
        }
    }
    // Jobs still queued after Close are dropped: their callers see `Closed`.
    rx.close();
}

/// What the sync thread works with.
struct Syncer {
    /// Configuration changes are written here once durable ([`Batch::config`]).
    db: sled::Db,
    pending: Arc<parking_lot::Mutex<PendingHistory>>,
    ck_tx: std::sync::mpsc::SyncSender<Checkpoint>,
    /// A checkpoint is running: the next waits for it.
    busy: Arc<AtomicBool>,
    stats: Arc<CommitStats>,
    checkpoint_every: Duration,
    /// Set once a log write fails (see [`StoreError::Poisoned`]).
    poisoned: Arc<std::sync::OnceLock<String>>,
}

/// What has changed since the last checkpoint started.
#[derive(Default)]
struct SinceCheckpoint {
    dirty: HashSet<TwinId, FxBuildHasher>,
    kv: Vec<KvOp>,
    /// Configuration was written (to sled, unflushed): a checkpoint flushes it and lets its
    /// log segments go, so a module's bytes do not sit in the log until the next twin write.
    config: bool,
    lseq: u64,
    hlc: u64,
}

/// Appends and fsyncs each commit, acknowledges it, and starts checkpoints.
fn syncer(sy: Syncer, rx: std::sync::mpsc::Receiver<Commit>, mut segment: Segment) {
    let mut seq = 0u64;
    let mut last_checkpoint = Instant::now();
    let mut since = SinceCheckpoint::default();
    for mut commit in rx {
        if let Some(why) = sy.poisoned.get() {
            refuse(commit.dones, why);
            if commit.closing {
                break;
            }
            continue;
        }
        if !commit.batch.frame.is_empty() {
            seq += 1;
            if let Err(e) = sy.append(&mut segment, &commit.batch) {
                // Memory already holds these changes; without the log they would be
                // acknowledged-but-lost after a restart. Refuse them and every later write
                // (no checkpoint either: it would persist what was never logged).
                let why = format!("{e}");
                tracing::error!(error = %e, "cannot write the write-ahead log; the store refuses writes from now on");
                let _ = sy.poisoned.set(why.clone());
                refuse(commit.dones, &why);
                if commit.closing {
                    break;
                }
                continue;
            }
        }
        if let Err(e) = apply_now(&sy.db, &commit.batch.direct) {
            tracing::error!(error = %e, "cannot write configuration to sled; it is in the log and is applied again at the next start");
        }
        let batch = &mut commit.batch;
        since.config |= !batch.direct.is_empty();
        publish_points(&sy.pending, batch);
        since.lseq = since.lseq.max(batch.max_lseq);
        since.hlc = since.hlc.max(batch.max_hlc);
        since.dirty.extend(batch.dirty.drain(..));
        since.kv.append(&mut batch.kv);
        sy.stats
            .jobs
            .fetch_add(commit.dones.len() as u64, Ordering::Relaxed);
        for d in commit.dones {
            d(Ok(seq));
        }
        // Under load a checkpoint waits at least twice as long as the last one took: the
        // checkpoint thread then works at most half the time, and each checkpoint folds more
        // updates per twin and per series (their cost is per twin and series, not per update).
        let last = Duration::from_micros(sy.stats.last_checkpoint_micros.load(Ordering::Relaxed));
        let due = commit.checkpoint_now
            || last_checkpoint.elapsed() >= sy.checkpoint_every.max(2 * last)
            || segment.bytes >= MAX_SEGMENT_BYTES;
        if due && sy.checkpoint(&mut segment, &mut since, commit.closing) {
            last_checkpoint = Instant::now();
        }
        if commit.closing {
            break;
        }
    }
}

/// Answer the jobs of a commit that was not (or cannot be) logged.
fn refuse(dones: Vec<Done>, why: &str) {
    for d in dones {
        d(Err(why.to_owned()));
    }
}

impl Syncer {
    /// Append and fsync one commit's frame.
    fn append(&self, segment: &mut Segment, batch: &Batch) -> std::io::Result<()> {
        let started = Instant::now();
        segment.append(&batch.frame)?;
        let stats = &self.stats;
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats
            .log_bytes
            .fetch_add(batch.frame.len() as u64, Ordering::Relaxed);
        stats
            .commit_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        metrics::histogram!("twinhost_commit_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Start a checkpoint of what changed since the last one, unless there is nothing to do
    /// or one is still running (at shutdown this waits for it). Whether one started.
    fn checkpoint(
        &self,
        segment: &mut Segment,
        since: &mut SinceCheckpoint,
        closing: bool,
    ) -> bool {
        let something = !since.dirty.is_empty()
            || !since.kv.is_empty()
            || since.config
            || !self.pending.lock().current.is_empty()
            || since.lseq > 0;
        if !something || (!closing && self.busy.load(Ordering::Acquire)) {
            return false;
        }
        if let Err(e) = segment.rotate() {
            tracing::error!(error = %e, "cannot start a new log segment; checkpoint postponed");
            return false;
        }
        self.busy.store(true, Ordering::Release);
        let points = {
            let mut p = self.pending.lock();
            p.current_samples = 0;
            let map = Arc::new(std::mem::take(&mut p.current));
            p.checkpointing.push(map.clone());
            map
        };
        let since = std::mem::take(since);
        let ck = Checkpoint {
            upto: segment.number - 1,
            lseq: since.lseq,
            hlc: since.hlc,
            dirty: since.dirty,
            kv: since.kv,
            points: vec![points],
        };
        // Capacity 1 and `busy` make this wait only at shutdown.
        let _ = self.ck_tx.send(ck);
        true
    }
}

/// Write configuration changes to sled now (they are already in the log).
fn apply_now(db: &sled::Db, ops: &[KvOp]) -> Result<(), sled::Error> {
    ops.iter().try_for_each(|op| op.raw().apply(db))
}

fn publish_points(pending: &parking_lot::Mutex<PendingHistory>, batch: &mut Batch) {
    if batch.points.is_empty() && batch.deleted.is_empty() {
        return;
    }
    let mut p = pending.lock();
    for id in batch.deleted.drain(..) {
        if let Some(gone) = p.current.remove(&id) {
            p.current_samples -= gone.len();
        }
        // Its samples may be journaled, or be on their way there with a checkpoint.
        if !p.journaled.is_empty() || !p.checkpointing.is_empty() {
            p.journal_deleted.insert(id);
        }
    }
    p.current_samples += batch.points.len();
    for (id, name, ts, v) in batch.points.drain(..) {
        p.current.entry(id).or_default().push((name, ts, v));
    }
}

#[cfg(test)]
#[path = "commit_tests.rs"]
pub(super) mod tests;
