//! Group commit: the one writer.
//!
//! Producers (the registry's write path, auth, models) reserve a slot in a bounded queue,
//! make their in-memory change, then enqueue a [`CommitRequest`]. The writer thread takes
//! everything queued (up to [`MAX_REQUESTS_PER_COMMIT`]), turns it into one atomic sled batch,
//! flushes (fsync) and only then acknowledges every request in it.
//!
//! Twins are written by *state*, not by delta: a request names the twins it dirtied and the
//! writer asks the [`StateSource`] for their current bytes at commit time. Many updates to one
//! twin in a batch therefore cost one write, and what is written is never older than anything
//! acknowledged. History points are appended: one packed chunk per series per commit.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::keys;
use super::StoreError;
use crate::types::TwinId;

/// How many requests may wait for the writer. Each request is one API call or one ingest
/// batch, so this bounds memory held by pending writes; when it is full producers wait up to
/// [`ENQUEUE_TIMEOUT`] and then get [`StoreError::Overloaded`] (HTTP 429).
pub const QUEUE_CAPACITY: usize = 8192;
/// Upper bound of requests folded into one commit, so one flush never grows without limit.
pub const MAX_REQUESTS_PER_COMMIT: usize = 8192;
/// How long a producer waits for a queue slot before giving up with `Overloaded`.
pub const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// Supplies the current persisted bytes of a twin (`None` when it no longer exists).
pub trait StateSource: Send + Sync + 'static {
    fn twin_bytes(&self, id: &TwinId) -> Option<Vec<u8>>;
}

/// A raw key/value change.
#[derive(Debug)]
pub enum KvOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Remove every key under a prefix (a deleted twin's history or relationships).
    DeletePrefix(Vec<u8>),
}

/// One numeric sample of a history series.
#[derive(Debug)]
pub struct Point {
    /// Series key prefix, see [`keys::history_series`].
    pub series: Vec<u8>,
    pub ts_micros: i64,
    pub value: f64,
}

/// What one producer wants made durable.
#[derive(Debug, Default)]
pub struct CommitRequest {
    pub twins: Vec<TwinId>,
    pub kv: Vec<KvOp>,
    pub points: Vec<Point>,
    /// Told after the flush; `None` for fire-and-forget maintenance writes.
    pub ack: Option<oneshot::Sender<Result<u64, Arc<StoreError>>>>,
}

/// Counters of the writer, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub commits: AtomicU64,
    pub requests: AtomicU64,
    pub twin_writes: AtomicU64,
    pub points: AtomicU64,
    pub commit_micros: AtomicU64,
}

/// The producers' side of the writer.
#[derive(Clone)]
pub struct CommitHandle {
    tx: mpsc::Sender<CommitRequest>,
    thread: Arc<parking_lot::Mutex<Option<JoinHandle<()>>>>,
    pub stats: Arc<CommitStats>,
}

/// A reserved slot in the queue: take it *before* changing memory so a full queue is refused
/// with no state change.
pub struct Slot<'a>(mpsc::Permit<'a, CommitRequest>);

impl Slot<'_> {
    /// Enqueue the request and return the receiver of its acknowledgement.
    pub fn send(self, mut req: CommitRequest) -> oneshot::Receiver<Result<u64, Arc<StoreError>>> {
        let (tx, rx) = oneshot::channel();
        req.ack = Some(tx);
        self.0.send(req);
        rx
    }
}

impl CommitHandle {
    /// Reserve a slot, waiting at most [`ENQUEUE_TIMEOUT`].
    pub async fn reserve(&self) -> Result<Slot<'_>, StoreError> {
        match tokio::time::timeout(ENQUEUE_TIMEOUT, self.tx.reserve()).await {
            Ok(Ok(p)) => Ok(Slot(p)),
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => Err(StoreError::Overloaded),
        }
    }

    /// Requests waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Enqueue and wait until durable.
    pub async fn commit(&self, req: CommitRequest) -> Result<u64, StoreError> {
        let rx = self.reserve().await?.send(req);
        wait(rx).await
    }

    /// Stop accepting writes, let the writer drain and flush, and join it.
    pub fn shutdown(self) {
        let thread = self.thread.lock().take();
        drop(self.tx);
        if let Some(t) = thread {
            // Other clones of the sender may still exist (they fail with `Closed` once the
            // writer is gone); the writer exits when all are dropped.
            let _ = t.join();
        }
    }
}

/// Wait for an acknowledgement.
pub async fn wait(rx: oneshot::Receiver<Result<u64, Arc<StoreError>>>) -> Result<u64, StoreError> {
    match rx.await {
        Ok(Ok(seq)) => Ok(seq),
        Ok(Err(e)) => Err(match &*e {
            StoreError::Sled(s) => StoreError::Sled(s.clone()),
            other => StoreError::Corrupt {
                key: "commit".into(),
                reason: other.to_string(),
            },
        }),
        Err(_) => Err(StoreError::Closed),
    }
}

pub(super) fn start(db: sled::Db, source: Arc<dyn StateSource>) -> CommitHandle {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let stats = Arc::new(CommitStats::default());
    let st = stats.clone();
    let thread = std::thread::Builder::new()
        .name("twinhost-commit".into())
        .spawn(move || writer(db, source, rx, st))
        .expect("spawning the commit thread");
    CommitHandle {
        tx,
        thread: Arc::new(parking_lot::Mutex::new(Some(thread))),
        stats,
    }
}

fn writer(
    db: sled::Db,
    source: Arc<dyn StateSource>,
    mut rx: mpsc::Receiver<CommitRequest>,
    stats: Arc<CommitStats>,
) {
    let mut seq: u64 = 0;
    let mut reqs: Vec<CommitRequest> = Vec::with_capacity(256);
    while let Some(first) = rx.blocking_recv() {
        reqs.push(first);
        while reqs.len() < MAX_REQUESTS_PER_COMMIT {
            match rx.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        seq += 1;
        let started = Instant::now();
        let result = commit_once(&db, source.as_ref(), &mut reqs, seq, &stats);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats
            .requests
            .fetch_add(reqs.len() as u64, Ordering::Relaxed);
        stats
            .commit_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        metrics::histogram!("twinhost_commit_seconds").record(started.elapsed().as_secs_f64());
        let result = result.map(|()| seq).map_err(Arc::new);
        if let Err(e) = &result {
            tracing::error!(error = %e, "group commit failed; the affected requests get an error");
        }
        for r in reqs.drain(..) {
            if let Some(ack) = r.ack {
                let _ = ack.send(result.clone());
            }
        }
    }
    if let Err(e) = db.flush() {
        tracing::error!(error = %e, "final flush failed");
    }
}

fn commit_once(
    db: &sled::Db,
    source: &dyn StateSource,
    reqs: &mut [CommitRequest],
    seq: u64,
    stats: &CommitStats,
) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    let mut dirty: HashSet<TwinId> = HashSet::new();
    let mut series: HashMap<Vec<u8>, Vec<(i64, f64)>> = HashMap::new();
    let mut prefix_deletes = Vec::new();
    let mut npoints = 0u64;
    for r in reqs.iter_mut() {
        dirty.extend(r.twins.drain(..));
        for p in r.points.drain(..) {
            npoints += 1;
            series
                .entry(p.series)
                .or_default()
                .push((p.ts_micros, p.value));
        }
    }
    // Prefix deletions first (they may remove a twin's old history), then puts.
    for r in reqs.iter_mut() {
        for op in r.kv.drain(..) {
            match op {
                KvOp::Put(k, v) => batch.insert(k, v),
                KvOp::Delete(k) => batch.remove(k),
                KvOp::DeletePrefix(p) => prefix_deletes.push(p),
            }
        }
    }
    let mut deleted_prefixes = sled::Batch::default();
    for p in &prefix_deletes {
        for kv in db.scan_prefix(p).keys() {
            deleted_prefixes.remove(kv?);
        }
    }
    if !prefix_deletes.is_empty() {
        db.apply_batch(deleted_prefixes)?;
    }
    for id in &dirty {
        let key = keys::twin(id);
        match source.twin_bytes(id) {
            Some(bytes) => batch.insert(&key[..], bytes),
            None => batch.remove(&key[..]),
        }
    }
    let seq_bytes = seq.to_be_bytes();
    for (mut key, mut pts) in series {
        pts.sort_by_key(|p| p.0);
        key.extend_from_slice(&keys::ts_bytes(pts[0].0));
        key.extend_from_slice(&seq_bytes);
        let mut val = Vec::with_capacity(pts.len() * 16);
        for (ts, v) in pts {
            val.extend_from_slice(&ts.to_le_bytes());
            val.extend_from_slice(&v.to_le_bytes());
        }
        batch.insert(key, val);
    }
    db.apply_batch(batch)?;
    db.flush()?;
    stats
        .twin_writes
        .fetch_add(dirty.len() as u64, Ordering::Relaxed);
    stats.points.fetch_add(npoints, Ordering::Relaxed);
    Ok(())
}
