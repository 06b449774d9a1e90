//! The node's ordered event log: sequence numbers, the in-memory tail, the persisted tail and
//! live fan-out.
//!
//! An event's sequence number is its change's number: the store's writer numbers every
//! committed change (and every alert, which rules and behaviors raise through the registry)
//! inside the write-ahead-log frame that makes it durable. Changes arrive from the registry's
//! change sink on the store's sync thread, in that order, right after they are durable; each
//! goes into a bounded in-memory ring (for resumption) and onto a bounded broadcast channel
//! (live subscribers; one shared buffer, so a slow subscriber costs no extra memory and
//! never slows the others — it is told it lagged). The newest events are written as a chunk
//! file in `<data-dir>/events/` (written aside, synced, renamed into place) before each
//! checkpoint drops the log segments they could be re-created from, by a persister thread
//! every 10 s (which also trims the persisted tail by count and age), and at shutdown.
//!
//! So numbers never repeat and committed changes leave no hole, even after `kill -9`: an event
//! is either in the persisted tail or its change is still in the write-ahead log, and a
//! restart re-creates it from there with its number.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use parking_lot::{Condvar, Mutex};
use tokio::sync::broadcast;

pub use super::event::{Event, EventType};
use crate::registry::{Change, Registry};
use crate::store::{Store, StoreError};

/// Events kept in memory for resumption (and the default persisted tail).
pub const DEFAULT_TAIL: usize = 100_000;
/// Default age limit of the persisted tail.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Events a live subscriber may fall behind before it is told it lagged.
pub const SUBSCRIBER_BUFFER: usize = 8192;
/// How often the persister writes the tail on its own (checkpoints have it written before
/// they drop the log segments its events could be re-created from).
pub const PERSIST_EVERY: Duration = Duration::from_secs(10);
/// How often the persisted tail is trimmed by age.
const TRIM_EVERY: Duration = Duration::from_secs(1);
/// Most evicted events waiting for the persister to free them.
const MAX_GRAVEYARD: usize = 4 << 20;
/// Batches of alerts waiting to be numbered by the writer; more are dropped (and counted).
const ALERT_QUEUE: usize = 4096;

/// Sizes of the tails.
#[derive(Clone, Copy, Debug)]
pub struct LogConfig {
    /// Events kept in memory and in the persisted tail.
    pub tail: usize,
    /// Persisted events older than this are dropped.
    pub max_age: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            tail: DEFAULT_TAIL,
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

/// A persisted chunk: its last sequence number (chunks hold contiguous numbers) and when
/// it was written.
#[derive(Clone, Copy, Debug)]
struct ChunkMeta {
    last: u64,
    last_ts_ms: i64,
}

struct State {
    /// One above the last number appended.
    next_seq: u64,
    ring: VecDeque<Arc<Event>>,
    /// Highest sequence number written to the persisted tail.
    persisted: u64,
    chunks: BTreeMap<u64, ChunkMeta>,
    closing: bool,
    /// Events evicted from the ring, waiting to be freed by the persister.
    graveyard: Vec<Arc<Event>>,
    /// Live fan-out; `None` once the log is shut down, which ends every subscription.
    live: Option<broadcast::Sender<Arc<Event>>>,
}

struct Inner {
    /// Where the persisted tail's chunk files live.
    dir: PathBuf,
    source: String,
    /// This node's id: the origin of persisted events stored before events named theirs.
    node_id: Arc<str>,
    cfg: LogConfig,
    state: Mutex<State>,
    wake: Condvar,
    subscribers: AtomicUsize,
    appended: AtomicU64,
    /// Becomes true at shutdown.
    closed: tokio::sync::watch::Sender<bool>,
    persister: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held while writing the persisted tail (the persister and checkpoints both do).
    persisting: Mutex<()>,
    /// Alerts on their way to the registry, which numbers and logs them.
    alerts: tokio::sync::mpsc::Sender<Vec<Event>>,
    alerts_dropped: AtomicU64,
}

/// The event log. Cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

/// What [`EventLog::read_after`] found.
pub struct Read {
    pub events: Vec<Arc<Event>>,
    /// The oldest sequence number still held (in memory or persisted).
    pub first_available: u64,
    /// The next sequence number to be handed out.
    pub next_seq: u64,
}

/// A chunk file: `<first>-<last>-<written ms>.json`, a JSON array of events.
fn chunk_path(dir: &Path, first: u64, meta: ChunkMeta) -> PathBuf {
    dir.join(format!(
        "{first:020}-{:020}-{:016}.json",
        meta.last, meta.last_ts_ms
    ))
}

fn parse_chunk_name(name: &str) -> Option<(u64, ChunkMeta)> {
    let mut parts = name.strip_suffix(".json")?.split('-');
    let first = parts.next()?.parse().ok()?;
    let last = parts.next()?.parse().ok()?;
    let last_ts_ms = parts.next()?.parse().ok()?;
    Some((first, ChunkMeta { last, last_ts_ms }))
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io {
        what: "the event log's persisted tail".into(),
        source: e,
    }
}

impl EventLog {
    /// Open the log on `store`, numbered by `registry`: load the persisted tail's index, take
    /// back the events a crash kept from it (re-created from the write-ahead log by the
    /// registry's replay), and start the persister and the alert path. Must run inside the
    /// async runtime.
    pub fn open(
        store: Store,
        registry: &Registry,
        node_id: &str,
        cfg: LogConfig,
    ) -> Result<EventLog, StoreError> {
        let dir = store.events_dir()?;
        let mut chunks = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let name = entry.map_err(io)?.file_name();
            let name = name.to_string_lossy();
            match parse_chunk_name(&name) {
                Some((first, meta)) => {
                    chunks.insert(first, meta);
                }
                // Left by a crash mid-write: never renamed into place, so never announced.
                None if name.ends_with(".tmp") => {
                    let _ = std::fs::remove_file(dir.join(&*name));
                }
                None => {
                    tracing::warn!(file = %name, "ignoring an unknown file in the event-log directory")
                }
            }
        }
        let persisted = chunks.values().map(|m| m.last).max().unwrap_or(0);
        let next_seq = registry.first_lseq().max(persisted + 1);
        let (live, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        let (alerts, alerts_rx) = tokio::sync::mpsc::channel(ALERT_QUEUE);
        let log = EventLog {
            inner: Arc::new(Inner {
                dir,
                source: format!("/twinhost/{node_id}"),
                node_id: Arc::from(node_id),
                cfg,
                state: Mutex::new(State {
                    next_seq: persisted + 1,
                    ring: VecDeque::with_capacity(cfg.tail.min(65_536)),
                    persisted,
                    chunks,
                    closing: false,
                    graveyard: Vec::new(),
                    live: Some(live),
                }),
                wake: Condvar::new(),
                subscribers: AtomicUsize::new(0),
                appended: AtomicU64::new(0),
                closed: tokio::sync::watch::channel(false).0,
                persister: Mutex::new(None),
                persisting: Mutex::new(()),
                alerts,
                alerts_dropped: AtomicU64::new(0),
            }),
        };
        // What the persisted tail lacks of the log's tail: the events of the changes a crash
        // caught between a commit and the next persist.
        let recovered: Vec<Event> = registry
            .take_recovered()
            .into_iter()
            .filter(|c| c.seq > persisted)
            .map(Event::from_change)
            .collect();
        let n = recovered.len();
        log.publish(recovered);
        {
            let mut st = log.inner.state.lock();
            st.next_seq = st.next_seq.max(next_seq);
        }
        if n > 0 {
            log.persist_once()?;
            tracing::info!(events = n, "re-created events from the write-ahead log");
        }
        // A checkpoint persists the tail before deleting the log segments it covers.
        let weak = Arc::downgrade(&log.inner);
        store.set_before_checkpoint(Arc::new(move |upto| match weak.upgrade() {
            Some(inner) => EventLog { inner }
                .persist_through(upto)
                .map_err(|e| e.to_string()),
            None => Ok(()),
        }));
        tokio::spawn(record_alerts(registry.clone(), alerts_rx));
        let me = log.clone();
        let handle = std::thread::Builder::new()
            .name("twinhost-events".into())
            .spawn(move || me.persist_loop())
            .map_err(|e| StoreError::Corrupt {
                key: "events".into(),
                reason: e.to_string(),
            })?;
        *log.inner.persister.lock() = Some(handle);
        tracing::info!(next_seq, persisted_events = persisted, "event log opened");
        Ok(log)
    }

    /// The CloudEvents `source` of this node's events.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Keep and fan out committed changes (the registry's change sink), numbered already.
    pub fn append_changes(&self, changes: Vec<Change>) {
        self.publish(changes.into_iter().map(Event::from_change).collect());
    }

    /// Raise alerts (`Event::new(EventType::Alert, …)` with a twin): the registry numbers
    /// and logs them like changes, and they arrive here through the change sink. When the
    /// queue to the registry is full they are dropped, counted and logged.
    pub fn raise(&self, alerts: Vec<Event>) {
        if alerts.is_empty() {
            return;
        }
        let n = alerts.len() as u64;
        if self.inner.alerts.try_send(alerts).is_err()
            && self
                .inner
                .alerts_dropped
                .fetch_add(n, Ordering::Relaxed)
                .is_multiple_of(1000)
        {
            tracing::warn!("alerts arrive faster than the write path takes them; dropping some");
        }
    }

    /// Alerts dropped because their queue was full.
    pub fn alerts_dropped(&self) -> u64 {
        self.inner.alerts_dropped.load(Ordering::Relaxed)
    }

    /// Keep and fan out numbered events, in increasing order.
    fn publish(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let n = events.len() as u64;
        let mut st = self.inner.state.lock();
        let now = std::time::Instant::now();
        for mut e in events {
            if e.seq < st.next_seq {
                tracing::error!(
                    seq = e.seq,
                    next = st.next_seq,
                    "an event number out of order; dropped"
                );
                continue;
            }
            e.appended = Some(now);
            st.next_seq = e.seq + 1;
            let e = Arc::new(e);
            if st.ring.len() >= self.inner.cfg.tail {
                if let Some(old) = st.ring.pop_front() {
                    // Freed by the persister, off the commit path (bounded: it runs every
                    // second; past this size, freed here).
                    if st.graveyard.len() < MAX_GRAVEYARD {
                        st.graveyard.push(old);
                    }
                }
            }
            st.ring.push_back(e.clone());
            // No receivers is fine: nobody is listening.
            if let Some(live) = &st.live {
                let _ = live.send(e);
            }
        }
        drop(st);
        self.inner.appended.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("twinhost_events_total").increment(n);
    }

    /// A receiver of live events from now on.
    pub(crate) fn live(&self) -> broadcast::Receiver<Arc<Event>> {
        match &self.inner.state.lock().live {
            Some(live) => live.subscribe(),
            // Shut down: a receiver that reports the end at once.
            None => broadcast::channel(1).1,
        }
    }

    pub(super) fn subscribers(&self) -> &AtomicUsize {
        &self.inner.subscribers
    }

    /// For a consumer that follows the log only while it has work: wait until `ready()`
    /// holds, re-checking whenever `wake` is notified. False once the log is shut down.
    pub async fn wait_for_work(
        &self,
        wake: &tokio::sync::Notify,
        ready: impl Fn() -> bool,
    ) -> bool {
        while !ready() {
            tokio::select! {
                _ = wake.notified() => {}
                _ = self.closed() => return false,
            }
        }
        true
    }

    /// Resolves once the log is shut down.
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Connected subscribers (SSE and WebSocket).
    pub fn subscriber_count(&self) -> usize {
        self.inner.subscribers.load(Ordering::Relaxed)
    }

    /// Events appended since start.
    pub fn appended(&self) -> u64 {
        self.inner.appended.load(Ordering::Relaxed)
    }

    /// The next sequence number to be handed out.
    pub fn next_seq(&self) -> u64 {
        self.inner.state.lock().next_seq
    }

    /// Up to `max` events with sequence numbers above `after`, from memory or the persisted
    /// tail.
    pub fn read_after(&self, after: u64, max: usize) -> Result<Read, StoreError> {
        let (mut events, ring_first, next_seq, persisted_first) = {
            let st = self.inner.state.lock();
            let ring_first = st.ring.front().map_or(st.next_seq, |e| e.seq);
            let mut events = Vec::new();
            if after + 1 >= ring_first {
                let skip = (after + 1 - ring_first) as usize;
                events.extend(st.ring.iter().skip(skip).take(max).cloned());
            }
            let persisted_first = st.chunks.keys().next().copied();
            (events, ring_first, st.next_seq, persisted_first)
        };
        let first_available = persisted_first.map_or(ring_first, |p| p.min(ring_first));
        if after + 1 < ring_first {
            events = self.read_persisted(after, max, ring_first)?;
            if events.len() < max {
                // Continue into the ring (which may have moved on; readers check for gaps).
                let st = self.inner.state.lock();
                let from = events.last().map_or(after, |e| e.seq);
                let room = max - events.len();
                events.extend(st.ring.iter().filter(|e| e.seq > from).take(room).cloned());
            }
        }
        Ok(Read {
            events,
            first_available,
            next_seq,
        })
    }

    fn read_persisted(
        &self,
        after: u64,
        max: usize,
        below: u64,
    ) -> Result<Vec<Arc<Event>>, StoreError> {
        let firsts: Vec<(u64, ChunkMeta)> = {
            let st = self.inner.state.lock();
            st.chunks
                .iter()
                .filter(|(_, m)| m.last > after)
                .map(|(f, m)| (*f, *m))
                .collect()
        };
        let mut out = Vec::new();
        for (first, meta) in firsts {
            let bytes = match std::fs::read(chunk_path(&self.inner.dir, first, meta)) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // trimmed meanwhile
                Err(e) => return Err(io(e)),
            };
            let chunk: Vec<Event> =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    key: format!("events/{first}"),
                    reason: e.to_string(),
                })?;
            for mut e in chunk {
                if e.seq > after && e.seq < below {
                    if e.origin.is_empty() {
                        // Persisted before events named their origin: it reads as this
                        // node's, as every change counted then.
                        e.origin = self.inner.node_id.clone();
                    }
                    out.push(Arc::new(e));
                    if out.len() >= max {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Write what is not yet persisted and stop the persister. Call after the registry has
    /// stopped.
    pub fn shutdown(&self) {
        self.inner.state.lock().closing = true;
        self.inner.wake.notify_all();
        let Some(h) = self.inner.persister.lock().take() else {
            return;
        };
        let _ = h.join();
        let mut st = self.inner.state.lock();
        // Subscriptions (clients, rules, behaviors) end once they have drained.
        st.live = None;
        self.inner.closed.send_replace(true);
    }

    /// Persist the tail now unless every event up to `upto` is persisted already (for a
    /// checkpoint about to drop the log segments those events could be re-created from).
    pub fn persist_through(&self, upto: u64) -> Result<(), StoreError> {
        if self.inner.state.lock().persisted >= upto {
            return Ok(());
        }
        self.persist_once()
    }

    fn persist_loop(&self) {
        let mut last_write = std::time::Instant::now();
        loop {
            let closing = {
                let mut st = self.inner.state.lock();
                if !st.closing {
                    self.inner.wake.wait_for(&mut st, TRIM_EVERY);
                }
                st.closing
            };
            // Writing waits for a checkpoint or PERSIST_EVERY; trimming by age is cheap and
            // keeps `--event-max-age` to the second.
            let write = closing || last_write.elapsed() >= PERSIST_EVERY;
            if write {
                last_write = std::time::Instant::now();
            }
            if let Err(e) = self.persist(write) {
                tracing::error!(error = %e, "cannot persist the event-log tail");
            }
            if closing {
                return;
            }
        }
    }

    /// Write the events appended since the last call (the newest `tail` of them) as one
    /// chunk, and drop persisted chunks beyond the count or age limit.
    fn persist_once(&self) -> Result<(), StoreError> {
        self.persist(true)
    }

    /// [`EventLog::persist_once`], or only its trimming when `write` is false.
    fn persist(&self, write: bool) -> Result<(), StoreError> {
        let _one_at_a_time = self.inner.persisting.lock();
        let fresh: Vec<Arc<Event>> = if !write {
            Vec::new()
        } else {
            let st = self.inner.state.lock();
            let n = st
                .ring
                .iter()
                .rev()
                .take_while(|e| e.seq > st.persisted)
                .count()
                .min(self.inner.cfg.tail);
            st.ring.iter().skip(st.ring.len() - n).cloned().collect()
        };
        let mut new_chunk = None;
        if let (Some(first), Some(last)) = (fresh.first(), fresh.last()) {
            let mut body = Vec::with_capacity(fresh.len() * 256);
            body.push(b'[');
            for (i, e) in fresh.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                // The compact form (no CloudEvents attributes: they are derived on read),
                // written straight into the chunk's buffer.
                serde_json::to_writer(&mut body, &**e).expect("events serialize");
            }
            body.push(b']');
            // Age by when the chunk was written: event times come from clients and may be
            // far in the past.
            let meta = ChunkMeta {
                last: last.seq,
                last_ts_ms: Utc::now().timestamp_millis(),
            };
            // Written aside and renamed into place: a chunk file is whole or absent.
            let path = chunk_path(&self.inner.dir, first.seq, meta);
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            std::io::Write::write_all(&mut f, &body).map_err(io)?;
            // Synced: a crash takes at most the last interval from the tail.
            f.sync_data().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            new_chunk = Some((first.seq, meta));
        }
        let mut st = self.inner.state.lock();
        if let Some((first, meta)) = new_chunk {
            st.chunks.insert(first, meta);
            st.persisted = meta.last;
        }
        // Trim: keep at most `tail` events (chunks hold contiguous numbers) and no chunk
        // written longer than `max_age` ago.
        let oldest_ok_ms = (Utc::now()
            - chrono::Duration::from_std(self.inner.cfg.max_age).unwrap_or(chrono::Duration::MAX))
        .timestamp_millis();
        // The tail stays contiguous: a chunk that does not end right below the next one
        // (events evicted from memory before a persist could write them) goes, with every
        // older one.
        let limit = self.inner.cfg.tail as u64;
        let mut held = 0u64;
        let mut doomed: Vec<(u64, ChunkMeta)> = Vec::new();
        let mut next_first: Option<u64> = None;
        let mut broken = false;
        for (first, m) in st.chunks.iter().rev() {
            broken |= next_first.is_some_and(|n| m.last + 1 != n);
            if broken || held >= limit || m.last_ts_ms < oldest_ok_ms {
                doomed.push((*first, *m));
            } else {
                held += m.last - first + 1;
            }
            next_first = Some(*first);
        }
        for (first, _) in &doomed {
            st.chunks.remove(first);
        }
        // Events evicted from the ring are freed here, not on the commit path.
        let dead = std::mem::take(&mut st.graveyard);
        drop(st);
        drop(dead);
        for (first, meta) in doomed {
            if let Err(e) = std::fs::remove_file(chunk_path(&self.inner.dir, first, meta)) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(io(e));
                }
            }
        }
        Ok(())
    }
}

/// Hand raised alerts to the registry, in the order they were raised, many per commit.
async fn record_alerts(registry: Registry, mut rx: tokio::sync::mpsc::Receiver<Vec<Event>>) {
    while let Some(first) = rx.recv().await {
        let mut batch: Vec<Change> = first.into_iter().filter_map(Event::into_alert).collect();
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(more) => batch.extend(more.into_iter().filter_map(Event::into_alert)),
                Err(_) => break,
            }
        }
        match registry.record_alerts(batch).await {
            Ok(()) => {}
            Err(crate::registry::RegistryError::Store(StoreError::Closed)) => return,
            Err(e) => tracing::error!(error = %e, "alerts could not be logged; dropped"),
        }
    }
}

#[cfg(test)]
#[path = "log_tests.rs"]
mod tests;
