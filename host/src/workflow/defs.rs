//! Stored workflow definitions (`/v1/workflow-defs/{name}`): started by name over HTTP, by a
//! rule's `workflow` action (with the triggering twin as input) and on a schedule (`every`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::spec::{Invalid, Spec, Step};
use super::{WorkflowError, Workflows};
use crate::store::KvOp;

/// Most stored definitions.
pub const MAX_DEFS: usize = 1000;
/// Shortest and longest schedule.
pub const MIN_EVERY: Duration = Duration::from_secs(1);
pub const MAX_EVERY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Key prefix of stored definitions.
pub(super) const DEF_PREFIX: u8 = b'g';
/// How often the scheduler looks for definitions that are due.
const SCHEDULE_TICK: Duration = Duration::from_millis(250);

/// A stored workflow: a spec, and optionally how often to start it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = WorkflowDef, example = json!({
    "steps": [{"id": "count", "type": "aggregate", "function": "count",
               "query": {"entity_type": "machine"}}],
    "every": "10m"}))]
pub struct Def {
    #[schema(min_items = 1, max_items = 64)]
    pub steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dependencies: BTreeMap<String, Vec<String>>,
    /// Start a run this often (`"10m"`; 1 s to 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
}

impl Def {
    pub fn spec(&self, input: Option<Value>) -> Spec {
        Spec {
            steps: self.steps.clone(),
            dependencies: self.dependencies.clone(),
            input,
        }
    }

    fn every(&self) -> Option<Duration> {
        humantime::parse_duration(self.every.as_deref()?).ok()
    }
}

pub(super) fn def_key(name: &str) -> Vec<u8> {
    let mut k = vec![DEF_PREFIX];
    k.extend_from_slice(name.as_bytes());
    k
}

/// The definitions in the store (at open).
pub(super) fn load(store: &crate::store::Store) -> BTreeMap<String, Arc<Def>> {
    let mut out = BTreeMap::new();
    for kv in store.scan_prefix(&[DEF_PREFIX]) {
        let Ok((k, v)) = kv else { continue };
        let name = String::from_utf8_lossy(&k[1..]).into_owned();
        match serde_json::from_slice::<Def>(&v) {
            Ok(d) => {
                out.insert(name, Arc::new(d));
            }
            Err(e) => {
                tracing::error!(definition = %name, error = %e, "unreadable workflow definition; skipped")
            }
        }
    }
    out
}

impl Workflows {
    /// Store (or replace) the definition `name` after the checks a run gets. True when new.
    pub async fn put_def(&self, name: &str, def: Def) -> Result<bool, WorkflowError> {
        let mut reasons = Vec::new();
        if let Err(e) = crate::registry::check_name("workflow name", name) {
            reasons.push(e.to_string());
        }
        if let Some(e) = &def.every {
            match humantime::parse_duration(e) {
                Ok(d) if (MIN_EVERY..=MAX_EVERY).contains(&d) => {}
                Ok(_) => reasons.push(format!("every {e:?}: between 1s and 30days")),
                Err(err) => reasons.push(format!("every {e:?}: {err}")),
            }
        }
        match def.spec(None).check(&self.0.deps.runtime) {
            Ok(()) => {}
            Err(Invalid::Reasons(r)) => reasons.extend(r),
            Err(Invalid::Cycle(c)) if reasons.is_empty() => return Err(WorkflowError::Cycle(c)),
            Err(Invalid::Cycle(_)) => {}
        }
        if !reasons.is_empty() {
            return Err(WorkflowError::Invalid(reasons));
        }
        let _lock = self.0.deps.store.lock_config().await;
        let existed = self.0.defs.read().contains_key(name);
        if !existed && self.0.defs.read().len() >= MAX_DEFS {
            return Err(WorkflowError::Invalid(vec![format!(
                "at most {MAX_DEFS} workflow definitions; delete one first"
            )]));
        }
        let bytes = serde_json::to_vec(&def).expect("definitions serialize");
        self.0
            .deps
            .store
            .write(vec![KvOp::Put(def_key(name), bytes)])
            .await?;
        self.0.defs.write().insert(name.to_owned(), Arc::new(def));
        // A new schedule starts counting now.
        self.0.schedule.lock().remove(name);
        Ok(!existed)
    }

    pub fn get_def(&self, name: &str) -> Result<Arc<Def>, WorkflowError> {
        self.0
            .defs
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| WorkflowError::NoDef(name.to_owned()))
    }

    pub fn list_defs(&self) -> Value {
        let defs = self.0.defs.read();
        Value::Array(
            defs.iter()
                .map(|(n, d)| json!({"name": n, "steps": d.steps.len(), "every": d.every}))
                .collect(),
        )
    }

    pub async fn delete_def(&self, name: &str) -> Result<(), WorkflowError> {
        let _lock = self.0.deps.store.lock_config().await;
        if !self.0.defs.read().contains_key(name) {
            return Err(WorkflowError::NoDef(name.to_owned()));
        }
        self.0
            .deps
            .store
            .write(vec![KvOp::Delete(def_key(name))])
            .await?;
        self.0.defs.write().remove(name);
        self.0.schedule.lock().remove(name);
        Ok(())
    }

    /// Start a run of the definition `name` with `input` (checked again: a module it calls
    /// may have gone since it was stored).
    pub async fn start_def(
        &self,
        name: &str,
        input: Option<Value>,
    ) -> Result<String, WorkflowError> {
        let def = self.get_def(name)?;
        self.start_named(def.spec(input), Some(name.to_owned()))
            .await
    }
}

/// Start the definitions whose schedule is due, until the node is dropped. A definition whose
/// previous scheduled run is still in flight, or that meets a full node, skips its turn
/// (counted and logged).
pub(super) async fn schedule_loop(weak: std::sync::Weak<super::Inner>) {
    let mut tick = tokio::time::interval(SCHEDULE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: HashMap<String, String> = HashMap::new();
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        let this = Workflows(inner);
        let now = Instant::now();
        let due: Vec<String> = {
            let defs = this.0.defs.read();
            let mut sched = this.0.schedule.lock();
            sched.retain(|n, _| defs.contains_key(n));
            defs.iter()
                .filter_map(|(n, d)| {
                    let every = d.every()?;
                    let next = sched.entry(n.clone()).or_insert(now + every);
                    if now < *next {
                        return None;
                    }
                    *next = now + every;
                    Some(n.clone())
                })
                .collect()
        };
        for name in due {
            if let Some(prev) = last.get(&name) {
                if this.0.live.lock().contains_key(prev) {
                    metrics::counter!("twinhost_workflow_schedule_skipped_total").increment(1);
                    tracing::warn!(definition = %name, run = %prev, "the previous scheduled run is still in flight; skipping this turn");
                    continue;
                }
            }
            match this.start_def(&name, Some(json!({"schedule": name}))).await {
                Ok(id) => {
                    last.insert(name, id);
                }
                Err(e) => {
                    metrics::counter!("twinhost_workflow_schedule_skipped_total").increment(1);
                    tracing::warn!(definition = %name, error = %e, "a scheduled workflow did not start");
                }
            }
        }
    }
}

impl crate::events::rules::Starter for Workflows {
    fn start(
        &self,
        definition: String,
        input: Value,
    ) -> crate::events::rules::InvokeFuture<String> {
        let me = self.clone();
        Box::pin(async move {
            me.start_def(&definition, Some(input))
                .await
                .map_err(|e| e.to_string())
        })
    }
}
