//! A workflow's spec (the seed's shape: `steps` and `dependencies`) and its checks before
//! anything runs: unknown step references and malformed steps (422), a cycle (409, named).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::registry::Query;
use crate::types::TwinId;
use crate::wasm::{Runtime, World};

/// Most steps in one workflow.
pub const MAX_STEPS: usize = 64;
/// Most twins one step may name or match.
pub const MAX_STEP_TWINS: usize = 10_000;
/// A step's timeout when it names none.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest timeout a step may ask for.
pub const MAX_STEP_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most attempts a retry policy may ask for.
pub const MAX_ATTEMPTS: u32 = 10;

/// `POST /v1/workflows`: the seed's workflow spec.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = WorkflowSpec, example = json!({
    "steps": [
        {"id": "collect_temperatures", "type": "aggregate", "function": "collect_property",
         "query": {"entity_type": "machine"}, "parameters": {"property": "temperature"}},
        {"id": "hottest", "type": "aggregate", "function": "max",
         "query": {"entity_type": "machine"}, "parameters": {"property": "temperature"},
         "timeout": "10s", "retry": {"attempts": 2, "backoff": "100ms"}}],
    "dependencies": {"hottest": ["collect_temperatures"]}}))]
pub struct Spec {
    #[schema(min_items = 1, max_items = 64)]
    pub steps: Vec<Step>,
    /// Step id → the steps it waits for.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dependencies: BTreeMap<String, Vec<String>>,
    /// Given to every step as `parameters.input` (a rule's triggering twin, for instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = WorkflowStepKind)]
pub enum StepKind {
    /// A built-in function over the step's twins (`collect_property`, `count`, `sum`, `avg`,
    /// `min`, `max`).
    Aggregate,
    /// A compute component, called once per twin (or once with none when the step names none).
    Compute,
    /// Waits until every connected peer has acknowledged this node's changes so far.
    Sync,
}

/// One step: its twins come from `twin_ids`, a `query` or `input_twin` (one of them, or none
/// for a `compute` step called once with no twin).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = WorkflowStep)]
pub struct Step {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: StepKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_ids: Option<Vec<TwinId>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<Query>,
    /// The step runs on the twin the run was started for (`input.twin_id`: a rule's
    /// triggering twin), instead of `twin_ids` or a `query`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub input_twin: bool,
    /// The aggregate function or the compute module.
    #[serde(default)]
    pub function: String,
    /// For an aggregate: `property`, and optionally `group_by: "parent"`; for a compute step,
    /// given to the module (with `inputs`: the results of the steps it depends on).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// e.g. `"30s"` (default 30 s, at most 1 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// Try a failed step again: `attempts` in all (at most 10), `backoff` between them.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = WorkflowRetry)]
pub struct Retry {
    #[schema(minimum = 1, maximum = 10)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

/// The built-in aggregate functions.
pub const AGGREGATES: [&str; 6] = ["collect_property", "count", "sum", "avg", "min", "max"];

/// Why a spec cannot run.
#[derive(Debug)]
pub enum Invalid {
    /// Malformed steps, unknown references or modules: every reason.
    Reasons(Vec<String>),
    /// The dependencies loop: the step ids of one cycle, its first repeated at the end.
    Cycle(Vec<String>),
}

impl Step {
    pub fn timeout(&self) -> Duration {
        self.timeout
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
            .unwrap_or(DEFAULT_STEP_TIMEOUT)
    }

    pub fn attempts(&self) -> u32 {
        self.retry.as_ref().map_or(1, |r| r.attempts.max(1))
    }

    pub fn backoff(&self) -> Duration {
        self.retry
            .as_ref()
            .and_then(|r| r.backoff.as_deref())
            .and_then(|b| humantime::parse_duration(b).ok())
            .unwrap_or(Duration::from_millis(500))
    }
}

impl Spec {
    /// Check everything that can be checked before running: step ids, references, functions,
    /// modules and their worlds, limits; then cycles.
    pub fn check(&self, runtime: &Runtime) -> Result<(), Invalid> {
        let mut reasons = Vec::new();
        if self.steps.is_empty() {
            reasons.push("a workflow needs at least one step".to_owned());
        }
        if self.steps.len() > MAX_STEPS {
            reasons.push(format!("{} steps; at most {MAX_STEPS}", self.steps.len()));
        }
        let mut ids = BTreeSet::new();
        for s in &self.steps {
            if let Err(e) = crate::registry::check_name("step id", &s.id) {
                reasons.push(e.to_string());
            }
            if !ids.insert(s.id.as_str()) {
                reasons.push(format!("step id {:?} is used twice", s.id));
            }
            step_reasons(s, runtime, &mut reasons);
        }
        for (step, deps) in &self.dependencies {
            if !ids.contains(step.as_str()) {
                reasons.push(format!(
                    "dependencies name step {step:?}, which is not in steps"
                ));
            }
            for d in deps {
                if !ids.contains(d.as_str()) {
                    reasons.push(format!(
                        "step {step:?} depends on {d:?}, which is not in steps"
                    ));
                }
            }
        }
        if !reasons.is_empty() {
            return Err(Invalid::Reasons(reasons));
        }
        match self.cycle() {
            Some(c) => Err(Invalid::Cycle(c)),
            None => Ok(()),
        }
    }

    /// The steps `id` waits for.
    pub fn deps(&self, id: &str) -> &[String] {
        self.dependencies.get(id).map_or(&[], Vec::as_slice)
    }

    /// One cycle of the dependency graph, if any (depth-first, in step order, so the same
    /// spec names the same cycle).
    fn cycle(&self) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let mut mark: BTreeMap<&str, Mark> = self
            .steps
            .iter()
            .map(|s| (s.id.as_str(), Mark::New))
            .collect();
        fn visit<'a>(
            spec: &'a Spec,
            id: &'a str,
            mark: &mut BTreeMap<&'a str, Mark>,
            path: &mut Vec<&'a str>,
        ) -> Option<Vec<String>> {
            match mark.get(id).copied() {
                Some(Mark::Done) | None => return None,
                Some(Mark::OnPath) => {
                    let from = path.iter().position(|p| *p == id).unwrap_or(0);
                    let mut c: Vec<String> = path[from..].iter().map(|s| s.to_string()).collect();
                    c.push(id.to_owned());
                    return Some(c);
                }
                Some(Mark::New) => {}
            }
            mark.insert(id, Mark::OnPath);
            path.push(id);
            for d in spec.deps(id) {
                if let Some(c) = visit(spec, d, mark, path) {
                    return Some(c);
                }
            }
            path.pop();
            mark.insert(id, Mark::Done);
            None
        }
        for s in &self.steps {
            let mut path = Vec::new();
            if let Some(mut c) = visit(self, &s.id, &mut mark, &mut path) {
                // Walked along "depends on": name it in running order.
                c.reverse();
                return Some(c);
            }
        }
        None
    }
}

fn step_reasons(s: &Step, runtime: &Runtime, reasons: &mut Vec<String>) {
    let id = &s.id;
    let sources = [s.twin_ids.is_some(), s.query.is_some(), s.input_twin];
    if sources.iter().filter(|x| **x).count() > 1 {
        reasons.push(format!(
            "step {id:?}: give one of twin_ids, query and input_twin"
        ));
    }
    if s.twin_ids
        .as_ref()
        .is_some_and(|t| t.len() > MAX_STEP_TWINS)
    {
        reasons.push(format!("step {id:?}: at most {MAX_STEP_TWINS} twin_ids"));
    }
    if let Some(t) = &s.timeout {
        match humantime::parse_duration(t) {
            Ok(d) if d.is_zero() || d > MAX_STEP_TIMEOUT => reasons.push(format!(
                "step {id:?}: timeout {t:?} must be above 0 and at most 1h"
            )),
            Ok(_) => {}
            Err(e) => reasons.push(format!("step {id:?}: timeout {t:?}: {e}")),
        }
    }
    if let Some(r) = &s.retry {
        if r.attempts == 0 || r.attempts > MAX_ATTEMPTS {
            reasons.push(format!(
                "step {id:?}: retry.attempts must be 1 to {MAX_ATTEMPTS}"
            ));
        }
        if let Some(b) = &r.backoff {
            if let Err(e) = humantime::parse_duration(b) {
                reasons.push(format!("step {id:?}: retry.backoff {b:?}: {e}"));
            }
        }
    }
    if !(s.parameters.is_null() || s.parameters.is_object()) {
        reasons.push(format!("step {id:?}: parameters must be an object"));
    }
    match s.kind {
        StepKind::Aggregate => {
            if !AGGREGATES.contains(&s.function.as_str()) {
                reasons.push(format!(
                    "step {id:?}: unknown aggregate function {:?}; one of {}",
                    s.function,
                    AGGREGATES.join(", ")
                ));
            } else if s.function != "count"
                && !s.parameters.get("property").is_some_and(Value::is_string)
            {
                reasons.push(format!(
                    "step {id:?}: {} needs parameters.property",
                    s.function
                ));
            }
            if let Some(g) = s.parameters.get("group_by") {
                if g != "parent" {
                    reasons.push(format!("step {id:?}: group_by may only be \"parent\""));
                }
            }
            if !sources.contains(&true) {
                reasons.push(format!(
                    "step {id:?}: an aggregate needs twin_ids, a query or input_twin"
                ));
            }
        }
        StepKind::Compute => match runtime.world_of(&s.function) {
            None => reasons.push(format!("step {id:?}: no module named {:?}", s.function)),
            Some(World::Compute) => {}
            Some(w) => reasons.push(format!(
                "step {id:?}: module {:?} is a {w} module; a compute step calls a compute module",
                s.function
            )),
        },
        StepKind::Sync => {}
    }
}
