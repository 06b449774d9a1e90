//! Workflows: DAGs of `aggregate`, `compute` and `sync` steps over the node's twins.
//!
//! A run is checked before anything runs (`spec`), then each step starts as soon as every
//! step it depends on succeeded, so independent steps run in parallel; a step's results go to
//! its dependents (`parameters.inputs`). Each step has a timeout and an optional retry policy;
//! a step that fails (for good) marks the steps depending on it `skipped` and the run
//! `failed`, while independent steps finish. A run and its steps' statuses, timestamps,
//! results and errors are stored at every transition (`f` + run id), so `GET` answers after
//! a restart; a run in flight when the server stopped is marked `failed` at the next start
//! (runs are not resumed: a step may have had effects, and running it twice is not safe to
//! assume). Bounded: runs at once ([`MAX_RUNNING`], then 429), steps per run (`spec`),
//! stored runs ([`MAX_STORED`], the oldest finished trimmed), a result's size.

pub mod defs;
pub mod spec;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Semaphore};

use crate::wasm::pool::Caller;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use defs::Def;
pub use spec::{Invalid, Spec, Step, StepKind};

use crate::registry::{ChangeKind, Query, Registry};
use crate::store::{KvOp, Store};
use crate::types::{Twin, TwinId};
use crate::wasm::Runtime;

/// Runs in flight at once; more are refused (429).
pub const MAX_RUNNING: usize = 64;
/// Runs kept in the store; past this the oldest finished ones are dropped.
pub const MAX_STORED: usize = 1000;
/// Largest result a step may keep (serialized); a larger one fails the step.
pub const MAX_RESULT_BYTES: usize = 4 << 20;
/// Key prefix of stored runs.
const RUN_PREFIX: u8 = b'f';

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = WorkflowStatus)]
pub enum Status {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Cancelled,
}

impl Status {
    pub fn parse(s: &str) -> Option<Status> {
        serde_json::from_value(Value::String(s.to_owned())).ok()
    }

    fn finished(self) -> bool {
        !matches!(self, Status::Pending | Status::Running)
    }

    fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
            Status::Cancelled => "cancelled",
        }
    }
}

/// One step of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = WorkflowStepRun)]
pub struct StepRun {
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Attempts made (more than one with a retry policy).
    #[serde(default)]
    pub attempts: u32,
    /// What the step gave: an aggregate's value(s), a compute step's result per twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A workflow run as `GET /v1/workflows/{id}` shows it and the store keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = WorkflowRun)]
pub struct Run {
    pub id: String,
    pub status: Status,
    /// The stored definition this is a run of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Why the run failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub steps: BTreeMap<String, StepRun>,
    pub spec: Spec,
}

impl Run {
    /// The run without its spec and results, for lists.
    pub fn summary(&self) -> Value {
        json!({
            "id": self.id,
            "status": self.status,
            "definition": self.definition,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "steps": self.step_statuses(),
        })
    }

    /// Each step's status, by step id.
    fn step_statuses(&self) -> Map<String, Value> {
        self.steps
            .iter()
            .map(|(id, s)| (id.clone(), json!(s.status)))
            .collect()
    }
}

/// Why a run was refused or cannot be found.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error("the workflow is invalid: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("the dependencies form a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("{MAX_RUNNING} workflow runs are in flight; retry when one finishes")]
    Busy,
    #[error("no workflow run {0}")]
    NotFound(String),
    #[error("no workflow definition {0:?}")]
    NoDef(String),
    #[error("run {0} has already finished ({1})")]
    Finished(String, &'static str),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What the runs use.
#[derive(Clone)]
pub struct Deps {
    pub store: Store,
    pub registry: Registry,
    /// Runs the compute steps, on its compute pool (as `workflow:<run id>`).
    pub runtime: Arc<Runtime>,
    /// Links with peers (the `sync` step).
    pub peers: Option<crate::sync::SyncService>,
}

struct Live {
    run: Arc<Mutex<Run>>,
    cancel: CancellationToken,
    done: watch::Receiver<bool>,
}

struct Inner {
    deps: Deps,
    live: Mutex<HashMap<String, Live>>,
    running: Arc<Semaphore>,
    /// Serializes writes of runs, so a later state never lands before an earlier one.
    persist: tokio::sync::Mutex<()>,
    /// Stored definitions, by name.
    defs: parking_lot::RwLock<BTreeMap<String, Arc<Def>>>,
    /// When each scheduled definition is due next.
    schedule: Mutex<HashMap<String, Instant>>,
    /// Runs in the store (counted at open, then kept): a run's end trims only past
    /// [`MAX_STORED`], without scanning the store each time.
    stored: AtomicUsize,
}

/// The node's workflow runs.
#[derive(Clone)]
pub struct Workflows(Arc<Inner>);

fn run_key(id: &str) -> Vec<u8> {
    let mut k = vec![RUN_PREFIX];
    k.extend_from_slice(id.as_bytes());
    k
}

impl Workflows {
    /// Open the runs of `deps.store`: runs a stop caught in flight are marked failed.
    pub async fn open(deps: Deps) -> Result<Workflows, WorkflowError> {
        let mut stale = Vec::new();
        let mut stored = 0;
        for kv in deps.store.scan_prefix(&[RUN_PREFIX]) {
            let (_, v) = kv?;
            stored += 1;
            let Ok(mut run) = serde_json::from_slice::<Run>(&v) else {
                continue;
            };
            if run.status.finished() {
                continue;
            }
            let now = Utc::now();
            let why = "the server stopped while this run was in flight (runs are not resumed)";
            for s in run.steps.values_mut() {
                match s.status {
                    Some(Status::Running) => {
                        s.status = Some(Status::Failed);
                        s.error = Some(why.to_owned());
                        s.finished_at = Some(now);
                    }
                    Some(Status::Pending) | None => s.status = Some(Status::Skipped),
                    _ => {}
                }
            }
            run.status = Status::Failed;
            run.error = Some(why.to_owned());
            run.finished_at = Some(now);
            stale.push(run);
        }
        let deps_store = deps.store.clone();
        let w = Workflows(Arc::new(Inner {
            deps,
            live: Mutex::default(),
            running: Arc::new(Semaphore::new(MAX_RUNNING)),
            persist: tokio::sync::Mutex::new(()),
            defs: parking_lot::RwLock::new(defs::load(&deps_store)),
            schedule: Mutex::default(),
            stored: AtomicUsize::new(stored),
        }));
        for run in stale {
            tracing::warn!(run = %run.id, "a workflow run was in flight when the server stopped; marked failed");
            w.store_run(&run).await?;
        }
        // Holds the runs weakly: it ends once the node is dropped.
        tokio::spawn(defs::schedule_loop(Arc::downgrade(&w.0)));
        Ok(w)
    }

    /// Check `spec` and start a run of it. Returns the run's id.
    pub async fn start(&self, spec: Spec) -> Result<String, WorkflowError> {
        self.start_named(spec, None).await
    }

    /// Check `spec` and start a run of it, as a run of the definition `definition` if given.
    async fn start_named(
        &self,
        spec: Spec,
        definition: Option<String>,
    ) -> Result<String, WorkflowError> {
        match spec.check(&self.0.deps.runtime) {
            Err(Invalid::Reasons(r)) => return Err(WorkflowError::Invalid(r)),
            Err(Invalid::Cycle(c)) => return Err(WorkflowError::Cycle(c)),
            Ok(()) => {}
        }
        let permit = self
            .0
            .running
            .clone()
            .try_acquire_owned()
            .map_err(|_| WorkflowError::Busy)?;
        let id = uuid::Uuid::now_v7().to_string();
        let run = Run {
            id: id.clone(),
            status: Status::Running,
            definition,
            created_at: Utc::now(),
            finished_at: None,
            error: None,
            steps: spec
                .steps
                .iter()
                .map(|s| {
                    (
                        s.id.clone(),
                        StepRun {
                            status: Some(Status::Pending),
                            ..StepRun::default()
                        },
                    )
                })
                .collect(),
            spec,
        };
        self.store_run(&run).await?;
        self.0.stored.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done) = watch::channel(false);
        let cancel = CancellationToken::new();
        let run = Arc::new(Mutex::new(run));
        self.0.live.lock().insert(
            id.clone(),
            Live {
                run: run.clone(),
                cancel: cancel.clone(),
                done,
            },
        );
        metrics::gauge!("twinhost_workflows_running").increment(1.0);
        let me = self.clone();
        let run_id = id.clone();
        tokio::spawn(async move {
            me.execute(run, cancel).await;
            me.0.live.lock().remove(&run_id);
            metrics::gauge!("twinhost_workflows_running").decrement(1.0);
            drop(permit);
            let _ = done_tx.send(true);
        });
        Ok(id)
    }

    /// The run `id` (live or stored).
    pub fn get(&self, id: &str) -> Result<Run, WorkflowError> {
        if let Some(l) = self.0.live.lock().get(id) {
            return Ok(l.run.lock().clone());
        }
        let v = self
            .0
            .deps
            .store
            .get(&run_key(id))?
            .ok_or_else(|| WorkflowError::NotFound(id.to_owned()))?;
        serde_json::from_slice(&v).map_err(|e| {
            WorkflowError::Store(crate::store::StoreError::Corrupt {
                key: format!("workflow run {id}"),
                reason: e.to_string(),
            })
        })
    }

    /// Wait until the run `id` has finished (or `timeout`), then return it.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Run, WorkflowError> {
        let done = self.0.live.lock().get(id).map(|l| l.done.clone());
        if let Some(mut done) = done {
            let _ = tokio::time::timeout(timeout, done.wait_for(|d| *d)).await;
        }
        self.get(id)
    }

    /// Cancel the run `id`: steps in flight stop, steps not started are cancelled.
    pub async fn cancel(&self, id: &str) -> Result<Run, WorkflowError> {
        let live = self
            .0
            .live
            .lock()
            .get(id)
            .map(|l| (l.cancel.clone(), l.done.clone()));
        match live {
            Some((cancel, mut done)) => {
                cancel.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(10), done.wait_for(|d| *d)).await;
                self.get(id)
            }
            None => {
                let run = self.get(id)?;
                Err(WorkflowError::Finished(run.id, run.status.as_str()))
            }
        }
    }

    /// Stored runs, newest first, after `cursor` (a run id), with `status` if given.
    pub fn list(
        &self,
        status: Option<Status>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Value>, Option<String>), WorkflowError> {
        let end = match cursor {
            Some(c) => run_key(c),
            None => vec![RUN_PREFIX + 1],
        };
        let mut out = Vec::new();
        let mut last = None;
        for kv in self.0.deps.store.range(&[RUN_PREFIX], &end).rev() {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[1..]).into_owned();
            let run = match self.0.live.lock().get(&id) {
                Some(l) => l.run.lock().clone(),
                None => match serde_json::from_slice::<Run>(&v) {
                    Ok(r) => r,
                    Err(_) => continue,
                },
            };
            if status.is_some_and(|s| s != run.status) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, last));
            }
            last = Some(id);
            out.push(run.summary());
        }
        Ok((out, None))
    }

    /// Runs in flight now.
    pub fn running(&self) -> usize {
        self.0.live.lock().len()
    }

    async fn store_run(&self, run: &Run) -> Result<(), WorkflowError> {
        let bytes = serde_json::to_vec(run).expect("runs serialize");
        let _order = self.0.persist.lock().await;
        self.0
            .deps
            .store
            .write(vec![KvOp::Put(run_key(&run.id), bytes)])
            .await?;
        Ok(())
    }

    async fn save(&self, run: &Mutex<Run>) {
        let snapshot = run.lock().clone();
        if let Err(e) = self.store_run(&snapshot).await {
            tracing::error!(run = %snapshot.id, error = %e, "storing a workflow run");
        }
    }

    /// Run the steps in dependency order, independent ones at once, until every step has
    /// finished, or the run is cancelled.
    async fn execute(&self, run: Arc<Mutex<Run>>, cancel: CancellationToken) {
        let spec = Arc::new(run.lock().spec.clone());
        let run_id: Arc<str> = Arc::from(run.lock().id.as_str());
        let started = Instant::now();
        let mut pending: BTreeSet<String> = spec.steps.iter().map(|s| s.id.clone()).collect();
        let mut results: HashMap<String, Value> = HashMap::new();
        let mut tasks: JoinSet<(String, u32, Result<Value, String>)> = JoinSet::new();
        let mut cancelled = false;
        loop {
            // Start what is ready; skip what can no longer run. Repeat until nothing moves
            // (a skip may skip further steps).
            let mut moved = true;
            while moved {
                moved = false;
                for id in pending.clone() {
                    let deps = spec.deps(&id);
                    let st = |d: &String| run.lock().steps.get(d).and_then(|s| s.status);
                    if let Some(bad) = deps.iter().find(|d| {
                        matches!(
                            st(d),
                            Some(Status::Failed | Status::Skipped | Status::Cancelled)
                        )
                    }) {
                        let mut r = run.lock();
                        let s = r.steps.entry(id.clone()).or_default();
                        s.status = Some(Status::Skipped);
                        s.error = Some(format!("step {bad:?} did not succeed"));
                        pending.remove(&id);
                        moved = true;
                    } else if deps.iter().all(|d| st(d) == Some(Status::Succeeded)) {
                        let inputs: Map<String, Value> = deps
                            .iter()
                            .map(|d| (d.clone(), results.get(d).cloned().unwrap_or(Value::Null)))
                            .collect();
                        {
                            let mut r = run.lock();
                            let s = r.steps.entry(id.clone()).or_default();
                            s.status = Some(Status::Running);
                            s.started_at = Some(Utc::now());
                        }
                        let step = spec
                            .steps
                            .iter()
                            .find(|s| s.id == id)
                            .expect("a step of the spec")
                            .clone();
                        let me = self.clone();
                        let token = cancel.child_token();
                        let input = spec.input.clone();
                        let run_id = run_id.clone();
                        tasks.spawn(async move {
                            use futures::FutureExt;
                            let attempt = me.run_step(&run_id, &step, inputs, input, token);
                            match std::panic::AssertUnwindSafe(attempt).catch_unwind().await {
                                Ok((attempts, r)) => (step.id, attempts, r),
                                Err(_) => (
                                    step.id,
                                    1,
                                    Err("the step panicked (a bug; see the server log)".into()),
                                ),
                            }
                        });
                        pending.remove(&id);
                        moved = true;
                    }
                }
            }
            if tasks.is_empty() {
                // The last skips are stored with the run's end.
                break;
            }
            // Steps started (and any skipped) are stored before they can end.
            self.save(&run).await;
            tokio::select! {
                // A cancel wins over a step that ended at the same time (its attempt was cut).
                biased;
                () = cancel.cancelled() => {
                    cancelled = true;
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
                joined = tasks.join_next() => {
                    let Some(joined) = joined else { break };
                    let (id, attempts, outcome) = match joined {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::error!(error = %e, "a workflow step panicked");
                            continue;
                        }
                    };
                    let mut r = run.lock();
                    let s = r.steps.entry(id.clone()).or_default();
                    s.finished_at = Some(Utc::now());
                    s.attempts = attempts;
                    match outcome {
                        Ok(v) => {
                            s.status = Some(Status::Succeeded);
                            s.result = Some(v.clone());
                            results.insert(id, v);
                        }
                        Err(e) => {
                            s.status = Some(Status::Failed);
                            s.error = Some(e);
                        }
                    }
                }
            }
        }
        let (status, event) = {
            let mut r = run.lock();
            let now = Utc::now();
            if cancelled {
                for s in r.steps.values_mut() {
                    if !s.status.is_some_and(Status::finished) {
                        s.status = Some(Status::Cancelled);
                        s.finished_at = Some(now);
                    }
                }
                r.status = Status::Cancelled;
                r.error = Some("cancelled".into());
            } else if let Some((id, s)) = r
                .steps
                .iter()
                .find(|(_, s)| s.status == Some(Status::Failed))
            {
                let why = format!(
                    "step {id:?} failed: {}",
                    s.error.as_deref().unwrap_or("no reason given")
                );
                r.status = Status::Failed;
                r.error = Some(why);
            } else {
                r.status = Status::Succeeded;
            }
            r.finished_at = Some(now);
            let event = json!({
                "workflow_id": r.id,
                "definition": r.definition,
                "status": r.status,
                "error": r.error,
                "duration_ms": started.elapsed().as_millis() as u64,
                "steps": r.step_statuses(),
            });
            (r.status, event)
        };
        self.save(&run).await;
        metrics::counter!("twinhost_workflow_runs_total", "status" => status.as_str()).increment(1);
        metrics::histogram!("twinhost_workflow_run_seconds")
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = self
            .0
            .deps
            .registry
            .record_event(ChangeKind::WorkflowFinished, event)
            .await
        {
            tracing::warn!(error = %e, "logging workflow.finished");
        }
        self.trim().await;
    }

    /// Drop the oldest finished runs past [`MAX_STORED`].
    async fn trim(&self) {
        if self.0.stored.load(Ordering::Relaxed) <= MAX_STORED {
            return;
        }
        // Held from the scan on, so two run ends do not trim the same runs. The count is set
        // from what the scan saw: a run started meanwhile may be counted twice, which only
        // makes the next run end scan again (and set the count right).
        let _order = self.0.persist.lock().await;
        let keys: Vec<sled::IVec> = self
            .0
            .deps
            .store
            .scan_prefix(&[RUN_PREFIX])
            .filter_map(Result::ok)
            .map(|(k, _)| k)
            .collect();
        if keys.len() <= MAX_STORED {
            self.0.stored.store(keys.len(), Ordering::Relaxed);
            return;
        }
        let live: BTreeSet<Vec<u8>> = self.0.live.lock().keys().map(|id| run_key(id)).collect();
        let drop: Vec<KvOp> = keys
            .iter()
            .filter(|k| !live.contains(k.as_ref()))
            .take(keys.len() - MAX_STORED)
            .map(|k| KvOp::Delete(k.to_vec()))
            .collect();
        let n = drop.len();
        if let Err(e) = self.0.deps.store.write(drop).await {
            tracing::warn!(error = %e, "trimming stored workflow runs");
        } else {
            self.0.stored.store(keys.len() - n, Ordering::Relaxed);
            tracing::debug!(dropped = n, "trimmed the oldest workflow runs");
        }
    }

    /// One step, with its retries: (attempts made, result or why it failed).
    async fn run_step(
        &self,
        run_id: &str,
        step: &Step,
        inputs: Map<String, Value>,
        input: Option<Value>,
        cancel: CancellationToken,
    ) -> (u32, Result<Value, String>) {
        let attempts = step.attempts();
        let mut last = Err(String::new());
        for attempt in 1..=attempts {
            if attempt > 1 {
                tokio::select! {
                    () = tokio::time::sleep(step.backoff()) => {}
                    () = cancel.cancelled() => return (attempt - 1, last),
                }
            }
            let t0 = Instant::now();
            let token = cancel.child_token();
            let timeout = step.timeout();
            let r = tokio::select! {
                r = tokio::time::timeout(timeout, self.attempt(run_id, step, &inputs, input.as_ref(), &token)) => match r {
                    Ok(r) => r,
                    Err(_) => Err(format!("timed out after {}", humantime::format_duration(timeout))),
                },
                () = cancel.cancelled() => Err("cancelled".into()),
            };
            // Whatever is still running for this attempt (a guest call) stops.
            token.cancel();
            metrics::histogram!("twinhost_workflow_step_seconds", "type" => kind_str(step.kind))
                .record(t0.elapsed().as_secs_f64());
            let r = r.and_then(|v| {
                let n = serde_json::to_vec(&v).map_or(0, |b| b.len());
                if n > MAX_RESULT_BYTES {
                    Err(format!(
                        "the result holds {n} bytes; at most {MAX_RESULT_BYTES}"
                    ))
                } else {
                    Ok(v)
                }
            });
            match r {
                Ok(v) => return (attempt, Ok(v)),
                Err(e) => {
                    if attempt < attempts {
                        tracing::info!(step = %step.id, attempt, error = %e, "workflow step failed; retrying");
                    }
                    last = Err(e);
                }
            }
            if cancel.is_cancelled() {
                return (attempt, last);
            }
        }
        (attempts, last)
    }

    async fn attempt(
        &self,
        run_id: &str,
        step: &Step,
        inputs: &Map<String, Value>,
        input: Option<&Value>,
        token: &CancellationToken,
    ) -> Result<Value, String> {
        match step.kind {
            StepKind::Aggregate => {
                let twins = self.twins_of(step, input)?;
                aggregate(&step.function, &step.parameters, &twins)
            }
            StepKind::Compute => {
                let twins = self.twins_of(step, input)?;
                let mut params = match &step.parameters {
                    Value::Object(m) => m.clone(),
                    _ => Map::new(),
                };
                params.insert("inputs".into(), Value::Object(inputs.clone()));
                if let Some(i) = input {
                    params.insert("input".into(), i.clone());
                }
                let params = Value::Object(params);
                let rt = self.0.deps.runtime.clone();
                let caller = Caller::Workflow(run_id.to_owned());
                if twins.is_empty() {
                    let (name, token) = (step.function.clone(), token.clone());
                    return rt
                        .on_pool(&caller, move |rt| {
                            rt.call_compute(&name, &[], &params, Some(token))
                        })
                        .await
                        .map_err(|e| e.to_string());
                }
                let each = rt
                    .compute_each(
                        &caller,
                        &step.function,
                        twins,
                        params,
                        step.timeout(),
                        token.clone(),
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| "cancelled".to_owned())?;
                let mut out = Map::new();
                for (id, r) in each {
                    match r {
                        Ok(v) => {
                            out.insert(id.to_string(), v);
                        }
                        Err(f) => return Err(format!("twin {id}: {}: {}", f.kind, f.message)),
                    }
                }
                Ok(Value::Object(out))
            }
            StepKind::Sync => {
                let head = *self.0.deps.registry.watch_durable().borrow();
                let Some(peers) = &self.0.deps.peers else {
                    return Ok(json!({"peers": [], "note": "sync is not running on this node"}));
                };
                if peers.linked_count() == 0 {
                    return Ok(json!({"peers": [], "through": head,
                        "note": "no peer is connected: nothing to wait for"}));
                }
                loop {
                    let behind = peers.behind(head);
                    if behind.is_empty() {
                        return Ok(json!({"through": head, "peers_linked": peers.linked_count()}));
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                        () = token.cancelled() => return Err(format!("still waiting for {}", behind.join(", "))),
                    }
                }
            }
        }
    }

    /// The twins a step names or matches.
    fn twins_of(&self, step: &Step, input: Option<&Value>) -> Result<Vec<Twin>, String> {
        let reg = &self.0.deps.registry;
        if step.input_twin {
            let id = input
                .and_then(|i| i.get("twin_id"))
                .and_then(Value::as_str)
                .ok_or("input_twin: the run was started without input.twin_id")?;
            let id: TwinId = id
                .parse()
                .map_err(|_| format!("input_twin: {id:?} is not a twin id"))?;
            return reg.get(&id).map(|t| vec![t]).map_err(|e| e.to_string());
        }
        if let Some(ids) = &step.twin_ids {
            return ids
                .iter()
                .map(|id| reg.get(id).map_err(|e| e.to_string()))
                .collect();
        }
        let Some(q) = &step.query else {
            return Ok(Vec::new());
        };
        let mut q: Query = q.clone();
        let mut out = Vec::new();
        loop {
            q.limit = Some(
                q.limit
                    .unwrap_or(1000)
                    .min(spec::MAX_STEP_TWINS - out.len())
                    .max(1),
            );
            let page = reg.query(&q).map_err(|e| e.to_string())?;
            out.extend(page.twins());
            match page.next_cursor {
                Some(c) if out.len() < spec::MAX_STEP_TWINS => q.cursor = Some(c),
                Some(_) => {
                    return Err(format!(
                        "the query matches more than {} twins",
                        spec::MAX_STEP_TWINS
                    ))
                }
                None => return Ok(out),
            }
        }
    }
}

fn kind_str(k: StepKind) -> &'static str {
    match k {
        StepKind::Aggregate => "aggregate",
        StepKind::Compute => "compute",
        StepKind::Sync => "sync",
    }
}

/// The numeric values of `property` among `twins`.
fn numbers<'a>(twins: &'a [&'a Twin], property: &'a str) -> impl Iterator<Item = f64> + 'a {
    twins
        .iter()
        .filter_map(move |t| t.properties.get(property)?.as_f64())
}

/// A built-in aggregate over `twins`: `collect_property` maps each twin's id to the
/// property's value (twins without it left out); `count`, `sum`, `avg`, `min`, `max` of a
/// numeric property (non-numeric values left out; `count` of twins when no property is
/// named). With `"group_by": "parent"`, one value per parent id (`"none"` for roots).
pub fn aggregate(function: &str, params: &Value, twins: &[Twin]) -> Result<Value, String> {
    let property = params.get("property").and_then(Value::as_str);
    let group = params.get("group_by").and_then(Value::as_str) == Some("parent");
    let mut groups: BTreeMap<String, Vec<&Twin>> = BTreeMap::new();
    for t in twins {
        let key = if group {
            t.parent_id
                .map_or_else(|| "none".to_owned(), |p| p.to_string())
        } else {
            String::new()
        };
        groups.entry(key).or_default().push(t);
    }
    let one = |ts: &[&Twin]| -> Result<Value, String> {
        Ok(match function {
            "collect_property" => {
                let p = property.ok_or("collect_property needs parameters.property")?;
                Value::Object(
                    ts.iter()
                        .filter_map(|t| Some((t.id.to_string(), t.properties.get(p)?.clone())))
                        .collect(),
                )
            }
            "count" => match property {
                Some(p) => json!(numbers(ts, p).count()),
                None => json!(ts.len()),
            },
            f @ ("sum" | "avg" | "min" | "max") => {
                let p = property.ok_or_else(|| format!("{f} needs parameters.property"))?;
                let v: Vec<f64> = numbers(ts, p).collect();
                if v.is_empty() {
                    Value::Null
                } else {
                    let x = match f {
                        "sum" => v.iter().sum(),
                        "avg" => v.iter().sum::<f64>() / v.len() as f64,
                        "min" => v.iter().copied().fold(f64::INFINITY, f64::min),
                        _ => v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    };
                    json!(x)
                }
            }
            other => return Err(format!("unknown aggregate function {other:?}")),
        })
    };
    if group {
        let mut out = Map::new();
        for (k, ts) in &groups {
            out.insert(k.clone(), one(ts)?);
        }
        Ok(Value::Object(out))
    } else {
        let all: Vec<&Twin> = twins.iter().collect();
        one(&all)
    }
}

#[cfg(test)]
mod tests;
