//! Behaviors: `behavior` modules bound to an entity type or one twin, run on each event of the
//! twins they match.
//!
//! One dispatcher follows the event log. For each twin event it finds the matching bindings
//! and hands the event to each one's bounded queue. Every behavior has its own worker with
//! one lane per slot of the compute pool; a twin's events always take the same lane and run
//! one after another, in log order, so a guest sees its earlier patches. A lane takes a slot
//! of the [compute pool](super::pool) under the behavior's own key (`behavior:<name>`),
//! served round-robin with every other caller, and runs its waiting events back to back on
//! it for a turn of at most [`EVENT_TURN`], one event per twin; the turn's patches are then
//! written in one batch before the twin's next event runs. It waits for a slot as long as
//! it takes: a behavior the pool cannot keep up with backs up its own queue, which then
//! drops that behavior's events (counted as `dropped`), as a slow or hanging guest does —
//! never another behavior's. An event whose call got no slot at all (the server is
//! stopping, or wasmtime's instance pool refused the instance) is counted as `dropped` too,
//! not as a run or an error. If the dispatcher falls behind the log's live buffer it is told
//! how many events it missed (counted per node, logged). A guest's patches go through the
//! registry's one write path, tagged with a [`Cause`]; its alerts become `alert` events.
//!
//! Guard against endless loops: a change made by a behavior never triggers that same
//! behavior, and a chain of behaviors (or rules) triggering each other stops at
//! [`MAX_CHAIN_DEPTH`].
//!
//! Periodic simulation: a binding with `"every": "1s"` is also called once per interval for
//! each twin it matches, with a `tick` event; see [`super::ticks`].
//!
//! Latency: each behavior keeps its last [`LATENCY_SAMPLES`] event latencies (from the
//! dispatcher handing it the event to the end of the call: queue, slot wait and call), shown
//! as p50/p99/max by `GET /v1/behaviors/{name}`; `/metrics` has the histogram of all of them
//! (`twinhost_behavior_latency_seconds`).
//!
//! Synced nodes: a binding runs on the changes made on this node only (its `on` is
//! [`ReactTo::Local`] unless it says `"on": "all"`), so a behavior bound on every node acts
//! once per reading, where the reading was made, and not again on each node it syncs to.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use utoipa::ToSchema;

use super::bindings::twinhost::platform::types as wit;
use super::host::to_wit;
use super::ticks;
use super::{CallError, Caller, GuestAlert, GuestPatch, Runtime, World};
use crate::events::{Event, EventLog, EventType, Filter, Follower, Wake};
use crate::registry::{check_name, Registry, Update};
use crate::store::{keys, KvOp, Store};
use crate::types::{Actor, Cause, Properties, ReactTo, SetOnDrop, Twin, TwinId};

pub use crate::types::MAX_CHAIN_DEPTH;
/// Most behaviors one node runs.
pub const MAX_BEHAVIORS: usize = 1000;
/// Events waiting for one behavior; more are dropped and counted.
pub const QUEUE_PER_BEHAVIOR: usize = 4096;
/// Events waiting in each of a behavior's lanes (one lane per compute slot).
const QUEUE_PER_LANE: usize = 512;
/// How long one compute slot runs ticks back to back before it is given back.
pub const TICK_TURN: Duration = Duration::from_millis(10);
/// How long one lane runs its waiting events back to back on one compute slot before it
/// gives the slot back (at least one call): short, so a freed slot soon goes round-robin to
/// the next caller; long enough to make a slot's hand-over rare next to calls of tens of µs.
pub const EVENT_TURN: Duration = Duration::from_millis(2);
/// Most events a lane takes from its queue at once.
const LANE_BATCH: usize = 256;
/// Event latencies each behavior keeps for its p50/p99.
pub const LATENCY_SAMPLES: usize = 1024;

/// An event on its way to a behavior, with when the dispatcher handed it over.
type Queued = (Arc<Event>, Instant);

/// The lane of a twin: its events always run on the same one, in order.
pub(super) fn lane_of(twin: &TwinId, lanes: usize) -> usize {
    let b = twin.as_bytes();
    let low = u64::from_le_bytes(b[8..16].try_into().expect("a UUID has 16 bytes"));
    (low % lanes as u64) as usize
}

/// What `PUT /v1/behaviors/{name}` takes: a behavior module and the twins it watches.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// Name of an uploaded module of the `behavior` world.
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,128}$", example = "thermal-monitor")]
    pub module: String,
    /// Run on the events of every twin of this entity type …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,128}$", example = "machine")]
    pub entity_type: Option<String>,
    /// … or of this one twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_id: Option<TwinId>,
    /// Which changes it runs on: `local` (the default) only those made on this node, `all`
    /// also those merged from other nodes.
    #[serde(default)]
    pub on: ReactTo,
    /// Also call the behavior once per this interval for each twin it matches, with a `tick`
    /// event (periodic simulation), from `100ms` to `24h`. Ticks are spread over the interval;
    /// one that finds the compute pool busy is skipped and counted, not queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "1s")]
    pub every: Option<String>,
    #[serde(default = "Utc::now")]
    pub created_at: DateTime<Utc>,
}

impl Binding {
    /// Whether the binding runs on `e`, whose change was made on this node when `local`.
    fn matches(&self, e: &Event, local: bool) -> bool {
        let twin = match (self.twin_id, &self.entity_type) {
            (Some(t), _) => e.twin_id == Some(t),
            (None, Some(et)) => e.entity_type.as_deref() == Some(et.as_str()),
            (None, None) => false,
        };
        twin && self.on.admits(local)
    }

    /// The tick interval, checked.
    fn every(&self) -> Result<Option<Duration>, String> {
        self.every.as_deref().map(ticks::parse_every).transpose()
    }

    fn tick_target(&self) -> ticks::Target {
        match (self.twin_id, &self.entity_type) {
            (Some(t), _) => ticks::Target::Twin(t),
            (None, et) => ticks::Target::Type(et.clone().unwrap_or_default()),
        }
    }
}

/// The last [`LATENCY_SAMPLES`] latencies of a behavior's event calls, in microseconds.
#[derive(Default)]
struct Latencies {
    ring: Mutex<(Vec<u32>, usize)>,
}

impl Latencies {
    fn record(&self, d: Duration) {
        metrics::histogram!("twinhost_behavior_latency_seconds").record(d.as_secs_f64());
        let us = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let mut ring = self.ring.lock();
        let (samples, next) = &mut *ring;
        if samples.len() < LATENCY_SAMPLES {
            samples.push(us);
        } else {
            samples[*next] = us;
        }
        *next = (*next + 1) % LATENCY_SAMPLES;
    }

    fn summary(&self) -> Option<Latency> {
        let mut v = self.ring.lock().0.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            f64::from(v[i]) / 1000.0
        };
        Some(Latency {
            samples: v.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        })
    }
}

/// A behavior's event latency over its last calls: from the dispatcher handing it the event
/// to the end of the call (waiting in its queue, for a compute slot, and the call).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Latency {
    /// Calls measured (the last 1024 at most).
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Default)]
pub(super) struct Counters {
    runs: AtomicU64,
    errors: AtomicU64,
    /// Events skipped by the self-trigger guard or the chain-depth limit.
    guarded: AtomicU64,
    patches: AtomicU64,
    alerts: AtomicU64,
    /// Events dropped because the behavior's queue was full.
    dropped: AtomicU64,
    /// Calls made for ticks (also counted in `runs`).
    ticks: AtomicU64,
    /// Ticks skipped: no free compute slot, the behavior behind on earlier ticks, or the twin
    /// beyond the cap.
    pub(super) ticks_skipped: AtomicU64,
    latency: Latencies,
    last_error: RwLock<Option<String>>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Entry {
    binding: Binding,
    counters: Arc<Counters>,
    /// The behavior's worker; dropping it (delete, replace) ends the worker once drained.
    queue: mpsc::Sender<Queued>,
    /// The ticker of a binding with `every`; dropping it stops the ticks.
    _ticker: Option<AbortOnDrop>,
}

/// What `GET /v1/behaviors` shows for each behavior.
#[derive(Debug, Serialize, ToSchema)]
pub struct BehaviorInfo {
    pub name: String,
    #[serde(flatten)]
    pub binding: Binding,
    pub runs: u64,
    pub errors: u64,
    pub guarded: u64,
    pub patches: u64,
    pub alerts: u64,
    pub dropped: u64,
    /// Calls made for ticks (a binding with `every`; also counted in `runs`).
    pub ticks: u64,
    /// Ticks skipped because the compute pool had no free slot, the behavior was still behind
    /// on earlier ticks, or the twin was beyond the cap of 100,000 per behavior.
    pub ticks_skipped: u64,
    /// Event latency over the last calls; absent before the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    pub last_error: Option<String>,
}

/// Why a behavior could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum BehaviorError {
    #[error("{0}")]
    Invalid(String),
    #[error("behavior {0:?} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

struct Inner {
    store: Store,
    registry: Registry,
    runtime: Arc<Runtime>,
    log: EventLog,
    entries: RwLock<BTreeMap<String, Entry>>,
    /// Calls one behavior may run at once.
    per_behavior: usize,
    /// Events the dispatcher could not look at because it fell behind.
    missed: AtomicU64,
    /// Wakes the dispatcher when the first behavior arrives (with none it does not follow
    /// the log).
    wake: Wake,
}

/// The behaviors of a node. Cheap to clone.
#[derive(Clone)]
pub struct Behaviors {
    inner: Arc<Inner>,
}

impl Behaviors {
    /// Load the bindings and start the dispatcher (on the current tokio runtime).
    pub fn open(
        store: Store,
        registry: Registry,
        runtime: Arc<Runtime>,
        log: EventLog,
        pool_size: usize,
    ) -> Result<Behaviors, BehaviorError> {
        let mut stored = Vec::new();
        for kv in store.scan_prefix(&[keys::BEHAVIOR]) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            match serde_json::from_slice::<Binding>(&v) {
                Ok(binding) => stored.push((name, binding)),
                Err(e) => {
                    tracing::error!(behavior = %name, error = %e, "unreadable behavior; skipped")
                }
            }
        }
        let b = Behaviors {
            inner: Arc::new(Inner {
                store,
                registry,
                runtime,
                log,
                entries: RwLock::new(BTreeMap::new()),
                per_behavior: pool_size.max(1),
                missed: AtomicU64::new(0),
                wake: Wake::default(),
            }),
        };
        {
            let mut entries = b.inner.entries.write();
            for (name, binding) in stored {
                let entry = b.start(&name, binding, Arc::default());
                entries.insert(name, entry);
            }
        }
        let me = b.clone();
        tokio::spawn(async move { me.dispatch().await });
        Ok(b)
    }

    /// The worker (and ticker, with `every`) of behavior `name`, counting on `counters`.
    fn start(&self, name: &str, binding: Binding, counters: Arc<Counters>) -> Entry {
        let queue = self.start_worker(name, &binding.module, counters.clone());
        let ticker = match binding.every() {
            Ok(Some(every)) => Some(AbortOnDrop(ticks::start(
                self.clone(),
                name.to_owned(),
                binding.module.clone(),
                binding.tick_target(),
                every,
                counters.clone(),
            ))),
            Ok(None) => None,
            Err(e) => {
                tracing::error!(behavior = %name, error = %e, "the stored binding's every is invalid; it does not tick");
                None
            }
        };
        Entry {
            binding,
            counters,
            queue,
            _ticker: ticker,
        }
    }

    /// The worker of one behavior: `per_behavior` lanes, each running its events one after
    /// another. A twin's events always go to the same lane, so they run in log order and
    /// each call sees the patches of the calls before it; different twins run in parallel.
    fn start_worker(
        &self,
        name: &str,
        module: &str,
        counters: Arc<Counters>,
    ) -> mpsc::Sender<Queued> {
        let (tx, mut rx) = mpsc::channel::<Queued>(QUEUE_PER_BEHAVIOR);
        // Set when the router ends (the behavior was deleted or replaced, or the log shut
        // down): the lanes then drop what they still hold instead of running it.
        let ended = Arc::new(AtomicBool::new(false));
        let lanes: Vec<mpsc::Sender<Queued>> = (0..self.inner.per_behavior)
            .map(|_| {
                let (lane_tx, mut lane_rx) = mpsc::channel::<Queued>(QUEUE_PER_LANE);
                let (me, name, module, counters, ended) = (
                    self.clone(),
                    name.to_owned(),
                    module.to_owned(),
                    counters.clone(),
                    ended.clone(),
                );
                tokio::spawn(async move {
                    let mut waiting = Vec::with_capacity(LANE_BATCH);
                    while lane_rx.recv_many(&mut waiting, LANE_BATCH).await > 0 {
                        while !waiting.is_empty() {
                            if ended.load(Ordering::Relaxed) {
                                return;
                            }
                            me.run_turn(&name, &module, &counters, &mut waiting).await;
                        }
                    }
                });
                lane_tx
            })
            .collect();
        let me = self.clone();
        tokio::spawn(async move {
            let _ended = SetOnDrop(ended);
            loop {
                // Ends when the behavior is deleted or replaced, or the log shuts down.
                let e = tokio::select! {
                    e = rx.recv() => match e {
                        Some(e) => e,
                        None => return,
                    },
                    _ = me.inner.log.closed() => return,
                };
                let lane = e.0.twin_id.map_or(0, |t| lane_of(&t, lanes.len()));
                // A full lane (one slow twin) holds the rest back here, and then the
                // behavior's queue fills and drops: bounded either way.
                if lanes[lane].send(e).await.is_err() {
                    return;
                }
            }
        });
        tx
    }

    /// Create or replace a behavior. Returns true when it is new.
    ///
    /// # Errors
    /// [`BehaviorError::Invalid`] for a binding that does not fit (its twin or module
    /// missing, a module of another world, too many behaviors); the store's errors.
    pub async fn put(&self, name: &str, binding: Binding) -> Result<bool, BehaviorError> {
        check_name("behavior name", name).map_err(|e| BehaviorError::Invalid(e.to_string()))?;
        match (&binding.entity_type, binding.twin_id) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(BehaviorError::Invalid(
                    "give exactly one of entity_type and twin_id".into(),
                ))
            }
            (Some(et), None) => {
                check_name("entity type", et).map_err(|e| BehaviorError::Invalid(e.to_string()))?
            }
            (None, Some(t)) => {
                if self.inner.registry.get(&t).is_err() {
                    return Err(BehaviorError::Invalid(format!("twin {t} does not exist")));
                }
            }
        }
        // Held from the module check to the write: a module delete cannot slip in between.
        let _config = self.inner.store.lock_config().await;
        match self.inner.runtime.world_of(&binding.module) {
            None => {
                return Err(BehaviorError::Invalid(format!(
                    "module {:?} is not uploaded",
                    binding.module
                )))
            }
            Some(w) if w != World::Behavior => {
                return Err(BehaviorError::Invalid(format!(
                    "module {:?} implements the {w} world; a behavior needs the behavior world (export `on-event`)",
                    binding.module
                )))
            }
            Some(_) => {}
        }
        binding.every().map_err(BehaviorError::Invalid)?;
        {
            let entries = self.inner.entries.read();
            if !entries.contains_key(name) && entries.len() >= MAX_BEHAVIORS {
                return Err(BehaviorError::Invalid(format!(
                    "a node runs at most {MAX_BEHAVIORS} behaviors"
                )));
            }
        }
        let bytes = serde_json::to_vec(&binding).expect("bindings serialize");
        self.inner
            .store
            .write(vec![KvOp::Put(keys::behavior(name), bytes)])
            .await?;
        let mut entries = self.inner.entries.write();
        let counters = entries
            .get(name)
            .map(|e| e.counters.clone())
            .unwrap_or_default();
        let entry = self.start(name, binding, counters);
        let fresh = entries.insert(name.to_owned(), entry).is_none();
        self.inner.wake.wake(&self.inner.log);
        Ok(fresh)
    }

    /// Delete a behavior; its calls in flight finish, no new one starts.
    ///
    /// # Errors
    /// [`BehaviorError::NotFound`]; the store's errors.
    pub async fn delete(&self, name: &str) -> Result<(), BehaviorError> {
        let _config = self.inner.store.lock_config().await;
        if !self.inner.entries.read().contains_key(name) {
            return Err(BehaviorError::NotFound(name.to_owned()));
        }
        self.inner
            .store
            .write(vec![KvOp::Delete(keys::behavior(name))])
            .await?;
        self.inner.entries.write().remove(name);
        Ok(())
    }

    pub fn list(&self) -> Vec<BehaviorInfo> {
        self.inner
            .entries
            .read()
            .iter()
            .map(|(n, e)| info(n, e))
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<BehaviorInfo, BehaviorError> {
        let entries = self.inner.entries.read();
        let e = entries
            .get(name)
            .ok_or_else(|| BehaviorError::NotFound(name.to_owned()))?;
        Ok(info(name, e))
    }

    /// How many behaviors the node runs.
    pub fn count(&self) -> usize {
        self.inner.entries.read().len()
    }

    /// Names of the behaviors that run `module`.
    pub fn using(&self, module: &str) -> Vec<String> {
        self.inner
            .entries
            .read()
            .iter()
            .filter(|(_, e)| e.binding.module == module)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Calls one behavior may run at once (its lanes, and its tick workers).
    pub(super) fn per_behavior(&self) -> usize {
        self.inner.per_behavior
    }

    pub(super) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub(super) fn log(&self) -> &EventLog {
        &self.inner.log
    }

    /// Events the dispatcher missed because it fell behind.
    pub fn missed(&self) -> u64 {
        self.inner.missed.load(Ordering::Relaxed)
    }

    async fn dispatch(self) {
        let filter = Filter {
            types: EventType::TwinCreated.bit()
                | EventType::TwinUpdated.bit()
                | EventType::TwinDeleted.bit()
                | EventType::TwinLifecycle.bit(),
            ..Filter::default()
        };
        let inner = &self.inner;
        let has_behaviors = || !inner.entries.read().is_empty();
        inner
            .log
            .follow(
                &inner.registry,
                &filter,
                Follower {
                    name: "behaviors",
                    wake: &inner.wake,
                    missed: &inner.missed,
                },
                has_behaviors,
                |e| {
                    let local = e.is_local(inner.registry.node_id());
                    let depth = e.cause.as_ref().map_or(0, |c| c.depth);
                    let by = e.cause.as_ref().and_then(|c| c.by.behavior());
                    // Handed over under the read lock (a queue's `try_send` does not wait):
                    // nothing is cloned per behavior but the event's `Arc`.
                    let entries = inner.entries.read();
                    if entries.is_empty() {
                        return false;
                    }
                    let now = Instant::now();
                    for (name, en) in entries.iter() {
                        if !en.binding.matches(&e, local) {
                            continue;
                        }
                        let counters = &en.counters;
                        if by == Some(name.as_str()) || depth >= MAX_CHAIN_DEPTH {
                            counters.guarded.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if let Err(mpsc::error::TrySendError::Full(_)) =
                            en.queue.try_send((e.clone(), now))
                        {
                            if counters.dropped.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
                                tracing::warn!(
                                    behavior = %name,
                                    "the behavior cannot keep up; its queue of {QUEUE_PER_BEHAVIOR} events is full and events are dropped"
                                );
                            }
                        }
                    }
                    true
                },
            )
            .await;
    }

    /// Run the first of `waiting` (a lane's events, in log order) back to back on one
    /// compute slot for at most [`EVENT_TURN`], one event per twin: a twin's next event
    /// waits for the next turn, which begins once this turn's patches are written, so every
    /// call sees the patches of the calls before it. Their patches go in one batch. What
    /// ran is removed from `waiting`.
    async fn run_turn(
        &self,
        name: &str,
        module: &str,
        counters: &Counters,
        waiting: &mut Vec<Queued>,
    ) {
        let mut seen = std::collections::HashSet::with_capacity(waiting.len());
        let mut events = Vec::new();
        let mut i = 0;
        while i < waiting.len() {
            let Some(twin_id) = waiting[i].0.twin_id else {
                waiting.remove(i);
                continue;
            };
            if !seen.insert(twin_id) {
                break;
            }
            events.push(self.wit_event(&waiting[i].0, twin_id));
            i += 1;
        }
        let n = events.len();
        if n == 0 {
            return;
        }
        let outs = self
            .turn(
                &Caller::Behavior(name.to_owned()),
                module,
                events,
                EVENT_TURN,
            )
            .await;
        let outs = match outs {
            Ok(outs) => outs,
            Err(e) => {
                // No slot at all (the server is stopping), or the task running the calls
                // failed: none of them ran.
                waiting.drain(..n);
                match e {
                    CallError::Busy(busy) => {
                        counters.dropped.fetch_add(n as u64, Ordering::Relaxed);
                        tracing::debug!(
                            behavior = name,
                            reason = busy.reason(),
                            "behavior events dropped: no compute slot"
                        );
                    }
                    e => self.failed(name, counters, format!("{n} calls not made: {e}")),
                }
                return;
            }
        };
        let ran = outs.len();
        let mut updates = Vec::new();
        for ((e, queued), out) in waiting.drain(..ran).zip(outs) {
            if let Err(CallError::Busy(busy)) = &out {
                // Refused before it ran (the instance pool): shed like an event that found
                // the behavior's queue full.
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    behavior = name,
                    reason = busy.reason(),
                    "behavior event dropped: no compute slot"
                );
                continue;
            }
            counters.latency.record(queued.elapsed());
            let trigger = Trigger {
                twin_id: e.twin_id.expect("only events with a twin are called"),
                entity_type: e.entity_type.clone(),
                parent_id: e.parent_id,
                seq: Some(e.seq),
                depth: e.cause.as_ref().map_or(0, |c| c.depth),
            };
            updates.extend(self.outcome(name, counters, &trigger, out));
        }
        self.write_patches(name, counters, updates).await;
    }

    /// Call behavior `name` with a `tick` event for each of `twins`, one after another on one
    /// compute slot taken only if one is free now, for at most [`TICK_TURN`] (at least one
    /// tick). Returns the patches the ticks ask for (for the caller to write with those of
    /// other ticks; their alerts are raised here) and the twins whose turn did not come.
    /// `Err((patches, twins))` when the pool had no free slot, or refused a call in the turn:
    /// the twins from there on did not run (the caller counts them skipped).
    pub(super) async fn run_ticks(
        &self,
        name: &str,
        module: &str,
        counters: &Counters,
        twins: Vec<Twin>,
    ) -> Result<(Vec<Update>, Vec<Twin>), (Vec<Update>, Vec<Twin>)> {
        let now = Utc::now().timestamp_millis().max(0) as u64;
        let events: Vec<wit::Event> = twins
            .iter()
            .map(|twin| wit::Event {
                seq: 0,
                kind: "tick".to_owned(),
                twin: to_wit(twin),
                changed: "{}".to_owned(),
                ts_ms: now,
            })
            .collect();
        let outs = self
            .turn(&Caller::Tick(name.to_owned()), module, events, TICK_TURN)
            .await;
        let outs = match outs {
            Ok(outs) => outs,
            // No slot (busy), or the task running the calls failed: none of them ran.
            Err(_) => return Err((Vec::new(), twins)),
        };
        let mut twins = twins.into_iter();
        let mut updates = Vec::new();
        for out in outs {
            let twin = twins.next().expect("one result per tick made");
            if let Err(CallError::Busy(busy)) = &out {
                // Refused before it ran (the instance pool is full, or the server stops):
                // this tick and the rest of the turn are skipped, not errors.
                tracing::debug!(behavior = name, reason = busy.reason(), "ticks skipped");
                let mut not_run = vec![twin];
                not_run.extend(twins);
                return Err((updates, not_run));
            }
            counters.ticks.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("twinhost_behavior_ticks_total").increment(1);
            let trigger = Trigger {
                twin_id: twin.id,
                entity_type: Some(twin.entity_type),
                parent_id: twin.parent_id,
                seq: None,
                depth: 0,
            };
            updates.extend(self.outcome(name, counters, &trigger, out));
        }
        Ok((updates, twins.collect()))
    }

    /// Call `module` with `events` one after another on one compute slot taken as `caller`,
    /// for at most `turn` (at least one call), stopping after a call the instance pool
    /// refused; the calls share an instance while it stays sound
    /// ([`Runtime::call_behaviors`]). One answer per call made, in order.
    async fn turn(
        &self,
        caller: &Caller,
        module: &str,
        events: Vec<wit::Event>,
        turn: Duration,
    ) -> Result<Vec<Result<super::BehaviorOutput, CallError>>, CallError> {
        let module = module.to_owned();
        self.inner
            .runtime
            .on_pool(caller, move |rt| {
                Ok(rt.call_behaviors(&module, &events, turn))
            })
            .await
    }

    /// Count a call that ran, raise its alerts and return its patches as updates (none when
    /// it failed or asked for something invalid, counted as an error).
    fn outcome(
        &self,
        name: &str,
        counters: &Counters,
        trigger: &Trigger,
        out: Result<super::BehaviorOutput, CallError>,
    ) -> Vec<Update> {
        counters.runs.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("twinhost_behavior_runs_total").increment(1);
        let out = match out {
            Ok(out) => out,
            Err(err) => {
                self.failed(name, counters, err.to_string());
                return Vec::new();
            }
        };
        let twin_id = trigger.twin_id;
        let cause = Arc::new(Cause {
            by: Actor::Behavior(name.to_owned()),
            depth: trigger.depth + 1,
        });
        let mut alerts = Vec::new();
        for GuestAlert {
            severity,
            message,
            data,
        } in out.alerts
        {
            let data: Value = serde_json::from_str(&data).unwrap_or(Value::String(data));
            let mut a = Event::new(EventType::Alert, Utc::now());
            a.twin_id = Some(twin_id);
            a.entity_type = trigger.entity_type.clone();
            a.parent_id = trigger.parent_id;
            a.cause = Some((*cause).clone());
            let mut details = json!({
                "source": "behavior", "behavior": name, "severity": severity,
                "message": message, "data": data,
            });
            match trigger.seq {
                Some(seq) => details["trigger_seq"] = json!(seq),
                None => details["tick"] = json!(true),
            }
            a.data = Some(details);
            alerts.push(a);
        }
        counters
            .alerts
            .fetch_add(alerts.len() as u64, Ordering::Relaxed);
        self.inner.log.raise(alerts);
        let mut updates = Vec::new();
        for GuestPatch {
            twin_id: target,
            properties: props,
        } in out.patches
        {
            let target = match target.as_deref().map(str::parse::<TwinId>) {
                None => twin_id,
                Some(Ok(t)) => t,
                Some(Err(_)) => {
                    self.failed(
                        name,
                        counters,
                        format!("patch names twin {target:?}, which is not a UUID"),
                    );
                    return Vec::new();
                }
            };
            let patch: Properties = match serde_json::from_str(&props) {
                Ok(Value::Object(m)) => m,
                _ => {
                    self.failed(
                        name,
                        counters,
                        "a patch's properties must be a JSON object".into(),
                    );
                    return Vec::new();
                }
            };
            updates.push(Update {
                cause: Some(cause.clone()),
                ..Update::new(target, patch)
            });
        }
        updates
    }

    /// Write a behavior's patches in one batch, counting them (and any refused).
    pub(super) async fn write_patches(
        &self,
        name: &str,
        counters: &Counters,
        updates: Vec<Update>,
    ) {
        if updates.is_empty() {
            return;
        }
        let n = updates.len() as u64;
        match self.inner.registry.apply_batch(updates).await {
            Ok(outcome) => {
                counters
                    .patches
                    .fetch_add(outcome.applied as u64, Ordering::Relaxed);
                if let Some((_, err)) = outcome.rejected.first() {
                    self.failed(
                        name,
                        counters,
                        format!("{} of {n} patches refused: {err}", outcome.rejected.len()),
                    );
                }
            }
            Err(err) => self.failed(name, counters, format!("patch failed: {err}")),
        }
    }

    /// The event as the guest gets it, the twin read from its blob as it is now.
    fn wit_event(&self, e: &Event, twin_id: TwinId) -> wit::Event {
        use crate::types::compact;
        let twin = self
            .inner
            .registry
            .with_blob(&twin_id, |b| {
                compact::outline(b).ok().map(|o| wit::Twin {
                    id: twin_id.to_string(),
                    entity_type: o.entity_type.to_owned(),
                    properties: o.properties_json,
                    version: o.version,
                    parent_id: o.parent_id.map(|p| p.to_string()),
                })
            })
            .flatten()
            .unwrap_or_else(|| wit::Twin {
                id: twin_id.to_string(),
                entity_type: e.entity_type.clone().unwrap_or_default(),
                properties: "{}".into(),
                version: e.version.unwrap_or(0),
                parent_id: e.parent_id.map(|p| p.to_string()),
            });
        wit::Event {
            seq: e.seq,
            kind: e.kind.as_str().to_owned(),
            twin,
            changed: serde_json::to_string(&e.changed).expect("a JSON map serializes"),
            ts_ms: e.ts.timestamp_millis().max(0) as u64,
        }
    }

    fn failed(&self, name: &str, counters: &Counters, message: String) {
        counters.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("twinhost_behavior_errors_total").increment(1);
        tracing::warn!(behavior = name, error = %message, "behavior failed");
        *counters.last_error.write() = Some(message);
    }
}

/// What a call answered to: the twin, and the event that triggered it (none for a tick).
struct Trigger {
    twin_id: TwinId,
    entity_type: Option<String>,
    parent_id: Option<TwinId>,
    seq: Option<u64>,
    /// The chain depth of the triggering change.
    depth: u8,
}

fn info(name: &str, e: &Entry) -> BehaviorInfo {
    let c = &e.counters;
    BehaviorInfo {
        name: name.to_owned(),
        binding: e.binding.clone(),
        runs: c.runs.load(Ordering::Relaxed),
        errors: c.errors.load(Ordering::Relaxed),
        guarded: c.guarded.load(Ordering::Relaxed),
        patches: c.patches.load(Ordering::Relaxed),
        alerts: c.alerts.load(Ordering::Relaxed),
        dropped: c.dropped.load(Ordering::Relaxed),
        ticks: c.ticks.load(Ordering::Relaxed),
        ticks_skipped: c.ticks_skipped.load(Ordering::Relaxed),
        latency: c.latency.summary(),
        last_error: c.last_error.read().clone(),
    }
}

impl From<CallError> for BehaviorError {
    fn from(e: CallError) -> Self {
        BehaviorError::Invalid(e.to_string())
    }
}

impl super::ModuleUsers for Behaviors {
    fn users_of(&self, module: &str) -> Vec<super::ModuleUser> {
        self.using(module)
            .into_iter()
            .map(|name| super::ModuleUser {
                kind: "behavior",
                name,
                needs: World::Behavior,
            })
            .collect()
    }
}
