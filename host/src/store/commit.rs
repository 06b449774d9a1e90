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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rustc_hash::FxBuildHasher;
use tokio::sync::{mpsc, oneshot};

use super::wal::{self, encode, Segment, Stamp};
use super::{keys, StoreError};
use crate::types::{Cause, Hlc, Lifecycle, Properties, Twin, TwinId};

/// Jobs that may wait for the writer. Each job is one API call or one ingest batch, so this
/// bounds memory held by pending writes; when it is full producers wait up to
/// [`ENQUEUE_TIMEOUT`] and then get [`StoreError::Overloaded`] (HTTP 429).
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
    fn twin_bytes(&self, id: &TwinId) -> Option<Vec<u8>>;
}

/// A raw key/value change (models, relationships, cleanup of deleted twins).
#[derive(Debug, Clone)]
pub enum KvOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Remove every key under a prefix.
    DeletePrefix(Vec<u8>),
}

/// Samples per twin: (property, time in µs, value). Keyed by twin with a fast hasher; the
/// few properties of one twin are told apart by a scan.
type SeriesMap = HashMap<TwinId, Vec<Sample>, FxBuildHasher>;
/// One history sample: property, time in µs, value.
type Sample = (Arc<str>, i64, f64);

/// History samples not yet checkpointed; readers merge them with sled's chunks.
#[derive(Default)]
pub struct PendingHistory {
    current: SeriesMap,
    current_samples: usize,
    /// Samples handed to a checkpoint that has not succeeded yet (more than one after a
    /// failed checkpoint, whose samples are carried into the next).
    checkpointing: Vec<Arc<SeriesMap>>,
}

impl PendingHistory {
    /// Pending samples of one series (unordered).
    pub fn samples(&self, id: TwinId, property: &str) -> Vec<(i64, f64)> {
        let maps = std::iter::once(&self.current).chain(self.checkpointing.iter().map(|m| &**m));
        maps.filter_map(|m| m.get(&id))
            .flatten()
            .filter(|(name, _, _)| &**name == property)
            .map(|(_, ts, v)| (*ts, *v))
            .collect()
    }
}

/// The writer's numbering: the node's next change number and its hybrid logical clock. Only
/// the writer thread ticks them, so change numbers follow the commit order exactly.
#[derive(Clone, Copy, Debug, Default)]
pub struct Numbering {
    pub next_lseq: u64,
    pub hlc: Hlc,
}

/// Runs before a checkpoint lets the log segments it covers be deleted, with the highest
/// change number in them (the event log persists its tail through it, so no event exists
/// only in a deleted segment). An error postpones the checkpoint.
pub type CheckpointHook = Arc<dyn Fn(u64) -> Result<(), String> + Send + Sync>;

/// What one commit's jobs write. Handed to each job by the writer thread.
#[derive(Default)]
pub struct Batch {
    numbering: Numbering,
    /// The host clock in ms, read once per job (stamps within a job share it; the HLC's
    /// counter keeps them apart).
    now_ms: i64,
    /// Twins numbered by the current job: `(change number, id)`.
    numbered: Vec<(u64, TwinId)>,
    /// Highest change number and HLC stamped in (or replayed into) this batch.
    max_lseq: u64,
    max_hlc: u64,
    frame: Vec<u8>,
    dirty: Vec<TwinId>,
    kv: Vec<KvOp>,
    points: Vec<(TwinId, Arc<str>, i64, f64)>,
    deleted: Vec<TwinId>,
    names: HashMap<Box<str>, Arc<str>, FxBuildHasher>,
}

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }

    /// Number the change whose entries follow: the node's next change number and a tick of
    /// its clock, logged in this frame (so the number is as durable as the change).
    pub fn stamp(&mut self, cause: Option<&Cause>) -> Stamp {
        let s = self.next_stamp(cause);
        encode::stamp(&mut self.frame, &s);
        s
    }

    /// Number and log an alert (`record` is the registry's serialized alert).
    pub fn alert(&mut self, cause: Option<&Cause>, record: &[u8]) -> Stamp {
        let s = self.next_stamp(cause);
        encode::alert(&mut self.frame, &s, record);
        s
    }

    fn next_stamp(&mut self, cause: Option<&Cause>) -> Stamp {
        let lseq = self.numbering.next_lseq;
        self.numbering.next_lseq += 1;
        let hlc = self.numbering.hlc.tick(self.now_ms);
        self.max_lseq = lseq;
        self.max_hlc = hlc;
        Stamp {
            lseq,
            hlc,
            cause: cause.cloned(),
        }
    }

    /// Note that twin `id` now has change number `lseq` (for the registry's change feed,
    /// which takes them after each job).
    pub fn numbered(&mut self, lseq: u64, id: TwinId) {
        self.numbered.push((lseq, id));
    }

    /// The twins numbered since the last call.
    pub fn take_numbered(&mut self) -> Vec<(u64, TwinId)> {
        std::mem::take(&mut self.numbered)
    }

    /// Read the host clock for the next job's stamps.
    fn start_job(&mut self) {
        self.now_ms = Utc::now().timestamp_millis();
    }

    /// A change number and clock met during replay: the first checkpoint records them.
    pub fn note_replayed(&mut self, lseq: u64, hlc: u64) {
        self.max_lseq = self.max_lseq.max(lseq);
        self.max_hlc = self.max_hlc.max(hlc);
    }

    /// A merge patch applied to the twin created at `born`, producing `version`.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        id: TwinId,
        born: DateTime<Utc>,
        version: u64,
        now: DateTime<Utc>,
        ts: DateTime<Utc>,
        patch: &Properties,
    ) {
        encode::update(&mut self.frame, &id, born, version, now, ts, patch);
        self.dirty.push(id);
    }

    pub fn create(&mut self, twin: &Twin) {
        encode::create(&mut self.frame, twin);
        self.dirty.push(twin.id);
    }

    /// A twin's whole state after merging a change made elsewhere.
    pub fn state(&mut self, twin: &Twin) {
        encode::state(&mut self.frame, twin);
        self.dirty.push(twin.id);
    }

    /// A clock seen on a change made elsewhere: later stamps are above it.
    pub fn observe(&mut self, hlc: u64) {
        self.numbering.hlc.observe(hlc);
    }

    /// A twin removed; its pending history is dropped with it.
    pub fn delete(&mut self, id: TwinId) {
        encode::delete(&mut self.frame, &id);
        self.dirty.push(id);
        self.deleted.push(id);
        self.points.retain(|p| p.0 != id);
    }

    pub fn lifecycle(
        &mut self,
        id: TwinId,
        born: DateTime<Utc>,
        version: u64,
        now: DateTime<Utc>,
        state: Lifecycle,
    ) {
        encode::lifecycle(&mut self.frame, &id, born, version, now, state);
        self.dirty.push(id);
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        encode::put(&mut self.frame, &key, &value);
        self.kv.push(KvOp::Put(key, value));
    }

    pub fn delete_key(&mut self, key: Vec<u8>) {
        encode::delete_key(&mut self.frame, &key);
        self.kv.push(KvOp::Delete(key));
    }

    pub fn delete_prefix(&mut self, prefix: Vec<u8>) {
        encode::delete_prefix(&mut self.frame, &prefix);
        self.kv.push(KvOp::DeletePrefix(prefix));
    }

    /// A history sample (derived from logged entries, so not logged itself).
    pub fn point(&mut self, id: TwinId, property: &str, ts_micros: i64, value: f64) {
        let name = match self.names.get(property) {
            Some(n) => n.clone(),
            None => {
                let n: Arc<str> = Arc::from(property);
                self.names.insert(property.into(), n.clone());
                n
            }
        };
        self.points.push((id, name, ts_micros, value));
    }

    /// Drop the samples this batch holds for a twin (replay of a delete).
    pub fn forget_points(&mut self, id: TwinId) {
        self.points.retain(|p| p.0 != id);
    }

    /// Mark a twin dirty without logging (state rebuilt by replay).
    pub fn mark_dirty(&mut self, id: TwinId) {
        self.dirty.push(id);
    }
}

/// Called once the commit holding a job is durable (or failed), on the sync thread in
/// commit order: publishes the job's changes and acknowledges it.
pub type Done = Box<dyn FnOnce(Result<u64, Arc<StoreError>>) + Send>;
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
    pub twin_writes: AtomicU64,
    pub points: AtomicU64,
}

/// The producers' side of the writer.
#[derive(Clone)]
pub struct CommitHandle {
    tx: mpsc::Sender<Msg>,
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
        let (tx, rx) = oneshot::channel();
        let boxed: Job = Box::new(move |b: &mut Batch| {
            let (out, publish) = job(b);
            Box::new(move |r: Result<u64, Arc<StoreError>>| {
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
            Ok(Err(e)) => Err(StoreError::Corrupt {
                key: "commit".into(),
                reason: e.to_string(),
            }),
            Err(_) => Err(StoreError::Closed),
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

/// Everything the writer starts with.
pub(super) struct Start {
    pub db: sled::Db,
    pub wal_dir: PathBuf,
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

struct Checkpoint {
    upto: u64,
    /// Highest change number and HLC in the covered segments.
    lseq: u64,
    hlc: u64,
    dirty: HashSet<TwinId, FxBuildHasher>,
    kv: Vec<KvOp>,
    points: Vec<Arc<SeriesMap>>,
}

impl Checkpoint {
    /// Fold a failed earlier checkpoint into this one: its changes come first, and this one's
    /// marker covers both.
    fn absorb(&mut self, earlier: Checkpoint) {
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

pub(super) fn start(s: Start) -> Result<CommitHandle, StoreError> {
    let (tx, rx) = mpsc::channel::<Msg>(QUEUE_CAPACITY);
    let stats = Arc::new(CommitStats::default());
    let segment = Segment::create(&s.wal_dir, s.next_segment).map_err(io_err)?;
    let (ck_tx, ck_rx) = std::sync::mpsc::sync_channel::<Checkpoint>(1);
    // Commits prepared by the writer wait here for the syncer: one being synced and one
    // being prepared keeps both busy without holding more than a few frames in memory.
    let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<Commit>(2);
    let busy = Arc::new(AtomicBool::new(false));
    let ckpt = {
        let c = Checkpointer {
            db: s.db.clone(),
            wal_dir: s.wal_dir.clone(),
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
        let (stats, pending) = (stats.clone(), s.pending.clone());
        let every = s.checkpoint_every;
        spawn("twinhost-sync", move || {
            syncer(sync_rx, segment, pending, ck_tx, busy, stats, every)
        })
    };
    let writer = {
        let (replayed, pending, numbering) = (s.replayed, s.pending.clone(), s.numbering);
        spawn("twinhost-commit", move || {
            writer(rx, sync_tx, replayed, pending, numbering)
        })
    };
    Ok(CommitHandle {
        tx,
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
    StoreError::Io(e.to_string())
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

/// Appends and fsyncs each commit, acknowledges it, and starts checkpoints.
fn syncer(
    rx: std::sync::mpsc::Receiver<Commit>,
    mut segment: Segment,
    pending: Arc<parking_lot::Mutex<PendingHistory>>,
    ck_tx: std::sync::mpsc::SyncSender<Checkpoint>,
    busy: Arc<AtomicBool>,
    stats: Arc<CommitStats>,
    checkpoint_every: Duration,
) {
    let mut seq = 0u64;
    let mut last_checkpoint = Instant::now();
    let mut dirty: HashSet<TwinId, FxBuildHasher> = HashSet::default();
    let mut kv: Vec<KvOp> = Vec::new();
    let (mut lseq, mut hlc) = (0u64, 0u64);
    for Commit {
        mut batch,
        dones,
        checkpoint_now,
        closing,
    } in rx
    {
        if !batch.frame.is_empty() {
            seq += 1;
            let started = Instant::now();
            if let Err(e) = segment.append(&batch.frame) {
                // Memory already holds these changes; without the log they would be
                // acknowledged-but-lost after a restart. Stop rather than lie.
                tracing::error!(error = %e, "cannot write the write-ahead log; stopping");
                eprintln!("fatal: cannot write the write-ahead log: {e}");
                std::process::exit(70);
            }
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats
                .log_bytes
                .fetch_add(batch.frame.len() as u64, Ordering::Relaxed);
            stats
                .commit_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            metrics::histogram!("twinhost_commit_seconds").record(started.elapsed().as_secs_f64());
        }
        publish_points(&pending, &mut batch);
        lseq = lseq.max(batch.max_lseq);
        hlc = hlc.max(batch.max_hlc);
        dirty.extend(batch.dirty.drain(..));
        kv.append(&mut batch.kv);
        stats.jobs.fetch_add(dones.len() as u64, Ordering::Relaxed);
        for d in dones {
            d(Ok(seq));
        }
        let due = checkpoint_now
            || last_checkpoint.elapsed() >= checkpoint_every
            || segment.bytes >= MAX_SEGMENT_BYTES;
        let something =
            !dirty.is_empty() || !kv.is_empty() || !pending.lock().current.is_empty() || lseq > 0;
        if due && something && (closing || !busy.load(Ordering::Acquire)) {
            if let Err(e) = segment.rotate() {
                tracing::error!(error = %e, "cannot start a new log segment; checkpoint postponed");
            } else {
                busy.store(true, Ordering::Release);
                let points = {
                    let mut p = pending.lock();
                    p.current_samples = 0;
                    let map = Arc::new(std::mem::take(&mut p.current));
                    p.checkpointing.push(map.clone());
                    map
                };
                let ck = Checkpoint {
                    upto: segment.number - 1,
                    lseq: std::mem::take(&mut lseq),
                    hlc: std::mem::take(&mut hlc),
                    dirty: std::mem::take(&mut dirty),
                    kv: std::mem::take(&mut kv),
                    points: vec![points],
                };
                // Capacity 1 and `busy` make this wait only at shutdown.
                let _ = ck_tx.send(ck);
                last_checkpoint = Instant::now();
            }
        }
        if closing {
            break;
        }
    }
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
    }
    p.current_samples += batch.points.len();
    for (id, name, ts, v) in batch.points.drain(..) {
        p.current.entry(id).or_default().push((name, ts, v));
    }
}

/// What the checkpoint thread works with.
struct Checkpointer {
    db: sled::Db,
    wal_dir: PathBuf,
    source: Arc<dyn StateSource>,
    pending: Arc<parking_lot::Mutex<PendingHistory>>,
    busy: Arc<AtomicBool>,
    stats: Arc<CommitStats>,
    hook: Arc<std::sync::OnceLock<CheckpointHook>>,
}

fn checkpointer(c: Checkpointer, rx: std::sync::mpsc::Receiver<Checkpoint>) {
    let Checkpointer {
        db,
        wal_dir,
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
            Some(h) => h(ck.lseq).map_err(StoreError::Io),
            None => Ok(()),
        };
        match hooked.and_then(|()| write_checkpoint(&db, source.as_ref(), &ck)) {
            Ok(()) => {
                pending.lock().checkpointing.clear();
                if let Err(e) = wal::remove_upto(&wal_dir, ck.upto) {
                    tracing::warn!(error = %e, "could not remove checkpointed log segments");
                }
                stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                stats
                    .checkpoint_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
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

fn write_checkpoint(
    db: &sled::Db,
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
    let mut present: HashSet<TwinId, FxBuildHasher> = HashSet::default();
    for id in &ck.dirty {
        let key = keys::twin(id);
        match source.twin_bytes(id) {
            Some(bytes) => {
                present.insert(*id);
                b.insert(&key[..], bytes);
            }
            None => b.remove(&key[..]),
        }
    }
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
    db.apply_batch(b)?;
    db.flush()?;
    Ok(())
}

#[cfg(test)]
#[path = "commit_tests.rs"]
mod tests;
