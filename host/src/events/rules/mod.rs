//! Rules: declarative complex event processing over the event log.
//!
//! Four kinds, each a JSON document (`PUT /v1/rules/{name}`):
//! - `threshold`: a property crosses a bound; fires on the rising edge, per twin, with
//!   hysteresis (`clear`) and a `cooldown` against alert storms;
//! - `window`: count/sum/avg/min/max of a property over tumbling or sliding event-time
//!   windows, grouped by twin or parent, optionally with a condition on the aggregate;
//! - `sequence`: "A then B within T", on one twin or across twins under the same parent;
//! - `correlation`: at least `min_count` twins under one parent satisfy a condition within
//!   a window.
//!
//! Event time is the update's timestamp. Windows close on a watermark (the newest event time
//! seen minus `lateness`), so out-of-order updates within the lateness bound land in their
//! own window; later ones are counted as `late` and dropped. Sequences match pairs in either
//! arrival order. Every rule's state is bounded (`max_groups`, [`MAX_PENDING`]); what a bound
//! turns away is counted, never silently lost.
//!
//! [`RuleSet::on_event`] is pure evaluation (events in, firings out) so tests feed synthetic
//! streams with known answers; [`Rules`] runs it on the live log and carries out the actions.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::log::{Event, EventLog, EventType};
use super::subscribe::{Filter, Follower, Wake};
use crate::registry::{check_name, Registry, Update};
use crate::store::{keys, Store, StoreError};
use crate::types::{Cause, Properties, TwinId};

/// Most rules one node holds.
pub const MAX_RULES: usize = 1000;
/// Default (and largest allowed) number of groups (twins or parents) one rule tracks.
pub const DEFAULT_MAX_GROUPS: usize = 100_000;
/// Most pending partial matches one sequence rule holds (each side).
pub const MAX_PENDING: usize = 100_000;
/// Most open windows per group (size / slide + lateness / slide).
pub const MAX_WINDOWS_PER_GROUP: u64 = 1000;
/// Longest window, sequence span or lateness.
pub const MAX_SPAN: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most relationship targets one sequence match is kept for.
pub const MAX_RELATED: usize = 64;
/// Longest chain of automatic changes a rule still reacts to.
pub const MAX_CHAIN_DEPTH: u8 = 8;

// ---- the rule documents ---------------------------------------------------------------------

/// A comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Op {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    /// `==`, or `=` as in queries.
    #[serde(rename = "==", alias = "=")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
}

impl Op {
    /// The operator as written in a rule.
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }

    pub fn test(self, a: f64, b: f64) -> bool {
        match self {
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }
}

/// `property op value`, on a numeric property.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub property: String,
    pub op: Op,
    pub value: f64,
}

impl Condition {
    /// `Some(result)` when the event sets the property to a number.
    fn eval(&self, changed: &Properties) -> Option<bool> {
        let v = changed.get(&self.property)?.as_f64()?;
        Some(self.op.test(v, self.value))
    }
}

/// What a rule does when it fires.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Emit an `alert` event.
    Alert {
        #[serde(default = "default_severity")]
        severity: String,
        #[serde(default)]
        message: Option<String>,
    },
    /// Merge-patch the twin that triggered the rule (`target: "twin"`, the default) or its
    /// parent (`"parent"`), through the registry's write path.
    Patch {
        #[serde(default)]
        target: Target,
        #[schema(value_type = Object)]
        properties: Properties,
    },
    /// Invoke a compute module on the twin (or its parent); the result is an `alert` event
    /// of severity `info` carrying it.
    Invoke {
        module: String,
        #[serde(default)]
        target: Target,
        #[serde(default)]
        #[schema(value_type = Object)]
        parameters: Value,
    },
    /// Start a workflow (not yet available on this node; refused at validation).
    Workflow {
        #[schema(value_type = Object)]
        workflow: Value,
    },
}

fn default_severity() -> String {
    "warning".into()
}

/// Which twin an action applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    #[default]
    Twin,
    Parent,
}

/// How window aggregates are grouped, and sequences correlated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    #[default]
    Twin,
    Parent,
    /// Sequences only: the "then" happens on a target of the first twin's `relationship`.
    Relationship,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Agg {
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

/// A rule. `entity_type` / `twin_id` narrow the twins it watches (both optional).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuleSpec {
    Threshold(ThresholdRule),
    Window(WindowRule),
    Sequence(SequenceRule),
    Correlation(CorrelationRule),
}

/// Fires when `property op value` becomes true for a twin. It fires again only after the
/// value has gone back past `clear` (hysteresis; default: the bound itself) and `cooldown`
/// has passed since the last firing for that twin.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ThresholdRule {
    #[serde(default)]
    pub entity_type: Option<String>,
    #[serde(default)]
    pub twin_id: Option<TwinId>,
    pub property: String,
    pub op: Op,
    pub value: f64,
    #[serde(default)]
    pub clear: Option<f64>,
    /// e.g. `30s`.
    #[serde(default)]
    pub cooldown: Option<String>,
    pub actions: Vec<Action>,
}

/// Aggregates `property` over event-time windows of `size` (tumbling), or of `size` every
/// `slide` (sliding). Fires when a window closes and its aggregate satisfies `op value`
/// (every window when no condition is given).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowRule {
    #[serde(default)]
    pub entity_type: Option<String>,
    #[serde(default)]
    pub twin_id: Option<TwinId>,
    pub property: String,
    pub agg: Agg,
    pub size: String,
    #[serde(default)]
    pub slide: Option<String>,
    #[serde(default)]
    pub group_by: GroupBy,
    #[serde(default)]
    pub op: Option<Op>,
    #[serde(default)]
    pub value: Option<f64>,
    /// How late (in event time) an update may arrive and still count (default 0).
    #[serde(default)]
    pub lateness: Option<String>,
    #[serde(default)]
    pub max_groups: Option<usize>,
    pub actions: Vec<Action>,
}

/// Fires when `first` holds and then `then` holds within `within`, on one twin
/// (`correlate: "twin"`), on twins under the same parent (`"parent"`), or first on a twin and
/// then on a target of its `relationship` (`"relationship"`, e.g. a pump that `feeds` a tank).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SequenceRule {
    #[serde(default)]
    pub entity_type: Option<String>,
    #[serde(default)]
    pub twin_id: Option<TwinId>,
    pub first: Condition,
    pub then: Condition,
    pub within: String,
    #[serde(default)]
    pub correlate: GroupBy,
    /// With `correlate: "relationship"`: the relationship's name.
    #[serde(default)]
    pub relationship: Option<String>,
    pub actions: Vec<Action>,
}

/// Fires when at least `min_count` twins under one parent have satisfied `condition` (their
/// latest value) within the last `within`; again only after the count has dropped below.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CorrelationRule {
    #[serde(default)]
    pub entity_type: Option<String>,
    pub condition: Condition,
    pub min_count: usize,
    pub within: String,
    #[serde(default)]
    pub max_groups: Option<usize>,
    pub actions: Vec<Action>,
}

impl RuleSpec {
    fn actions(&self) -> &[Action] {
        match self {
            RuleSpec::Threshold(r) => &r.actions,
            RuleSpec::Window(r) => &r.actions,
            RuleSpec::Sequence(r) => &r.actions,
            RuleSpec::Correlation(r) => &r.actions,
        }
    }

    fn scope(&self) -> (Option<&str>, Option<TwinId>) {
        match self {
            RuleSpec::Threshold(r) => (r.entity_type.as_deref(), r.twin_id),
            RuleSpec::Window(r) => (r.entity_type.as_deref(), r.twin_id),
            RuleSpec::Sequence(r) => (r.entity_type.as_deref(), r.twin_id),
            RuleSpec::Correlation(r) => (r.entity_type.as_deref(), None),
        }
    }

    /// Properties whose changes the rule looks at.
    fn properties(&self) -> Vec<&str> {
        match self {
            RuleSpec::Threshold(r) => vec![&r.property],
            RuleSpec::Window(r) => vec![&r.property],
            RuleSpec::Sequence(r) => {
                let mut v = vec![r.first.property.as_str()];
                if r.then.property != r.first.property {
                    v.push(&r.then.property);
                }
                v
            }
            RuleSpec::Correlation(r) => vec![&r.condition.property],
        }
    }

    /// Compute modules the rule's actions invoke.
    pub fn modules(&self) -> Vec<&str> {
        self.actions()
            .iter()
            .filter_map(|a| match a {
                Action::Invoke { module, .. } => Some(module.as_str()),
                _ => None,
            })
            .collect()
    }
}

// ---- validation -----------------------------------------------------------------------------

fn span(field: &str, s: &str, errors: &mut Vec<String>) -> u64 {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => {
            errors.push(format!("{field}: must be more than zero"));
            0
        }
        Ok(d) if d > MAX_SPAN => {
            errors.push(format!(
                "{field}: at most {}",
                humantime::format_duration(MAX_SPAN)
            ));
            0
        }
        Ok(d) => d.as_micros() as u64,
        Err(e) => {
            errors.push(format!(
                "{field}: {s:?} is not a duration like 30s or 5m ({e})"
            ));
            0
        }
    }
}

fn check_prop(field: &str, p: &str, errors: &mut Vec<String>) {
    if let Err(e) = check_name(field, p) {
        errors.push(e.to_string());
    }
}

fn check_value(field: &str, v: f64, errors: &mut Vec<String>) {
    if !v.is_finite() {
        errors.push(format!("{field}: must be a finite number"));
    }
}

/// A rule checked and compiled into what evaluation needs.
struct Compiled {
    spec: RuleSpec,
    kind: Kind,
}

enum Kind {
    Threshold {
        cooldown_us: i64,
    },
    Window {
        size_us: i64,
        slide_us: i64,
        lateness_us: i64,
        max_groups: usize,
    },
    Sequence {
        within_us: i64,
    },
    Correlation {
        within_us: i64,
        max_groups: usize,
    },
}

/// Check a rule; every problem is listed (→ 422 with the list).
pub fn validate(
    spec: &RuleSpec,
    modules: &dyn Fn(&str) -> Option<String>,
) -> Result<(), Vec<String>> {
    compile(spec.clone(), modules).map(|_| ())
}

fn compile(
    spec: RuleSpec,
    modules: &dyn Fn(&str) -> Option<String>,
) -> Result<Compiled, Vec<String>> {
    let mut errors = Vec::new();
    let (et, _) = spec.scope();
    if let Some(et) = et {
        if let Err(e) = check_name("entity_type", et) {
            errors.push(e.to_string());
        }
    }
    let kind = match &spec {
        RuleSpec::Threshold(r) => {
            check_prop("property", &r.property, &mut errors);
            check_value("value", r.value, &mut errors);
            if let Some(c) = r.clear {
                check_value("clear", c, &mut errors);
                let ok = match r.op {
                    Op::Gt | Op::Ge => c <= r.value,
                    Op::Lt | Op::Le => c >= r.value,
                    Op::Eq | Op::Ne => false,
                };
                if !ok {
                    errors.push(format!(
                        "clear: for op {} the clear level must be on the other side of value {} (or use no clear with == and !=)",
                        r.op.symbol(), r.value
                    ));
                }
            }
            let cooldown_us =
                r.cooldown
                    .as_deref()
                    .map_or(0, |c| span("cooldown", c, &mut errors)) as i64;
            Kind::Threshold { cooldown_us }
        }
        RuleSpec::Window(r) => {
            check_prop("property", &r.property, &mut errors);
            let size = span("size", &r.size, &mut errors) as i64;
            let slide =
                r.slide
                    .as_deref()
                    .map_or(size as u64, |s| span("slide", s, &mut errors)) as i64;
            let lateness = r
                .lateness
                .as_deref()
                .map_or(0, |s| span("lateness", s, &mut errors)) as i64;
            if size > 0 && slide > 0 {
                if slide > size {
                    errors.push("slide: must not be longer than size".into());
                } else if size % slide != 0 {
                    errors.push("slide: size must be a whole multiple of slide".into());
                } else if (size + lateness) / slide > MAX_WINDOWS_PER_GROUP as i64 {
                    errors.push(format!(
                        "slide: (size + lateness) / slide must be at most {MAX_WINDOWS_PER_GROUP}"
                    ));
                }
            }
            match (r.op, r.value) {
                (Some(_), Some(v)) => check_value("value", v, &mut errors),
                (None, None) => {}
                _ => errors.push("op and value: give both or neither".into()),
            }
            let max_groups = r.max_groups.unwrap_or(DEFAULT_MAX_GROUPS);
            if max_groups == 0 || max_groups > DEFAULT_MAX_GROUPS {
                errors.push(format!("max_groups: between 1 and {DEFAULT_MAX_GROUPS}"));
            }
            if r.group_by == GroupBy::Relationship {
                errors.push("group_by: twin or parent".into());
            }
            Kind::Window {
                size_us: size,
                slide_us: slide,
                lateness_us: lateness,
                max_groups,
            }
        }
        RuleSpec::Sequence(r) => {
            check_prop("first.property", &r.first.property, &mut errors);
            check_prop("then.property", &r.then.property, &mut errors);
            check_value("first.value", r.first.value, &mut errors);
            check_value("then.value", r.then.value, &mut errors);
            let within_us = span("within", &r.within, &mut errors) as i64;
            match (r.correlate, &r.relationship) {
                (GroupBy::Relationship, Some(name)) => {
                    check_prop("relationship", name, &mut errors)
                }
                (GroupBy::Relationship, None) => {
                    errors.push("relationship: name the relationship to correlate by".into())
                }
                (_, Some(_)) => {
                    errors.push("relationship: only with correlate \"relationship\"".into())
                }
                _ => {}
            }
            Kind::Sequence { within_us }
        }
        RuleSpec::Correlation(r) => {
            check_prop("condition.property", &r.condition.property, &mut errors);
            check_value("condition.value", r.condition.value, &mut errors);
            if r.min_count < 2 {
                errors.push("min_count: at least 2 (use a threshold rule for one twin)".into());
            }
            let within_us = span("within", &r.within, &mut errors) as i64;
            let max_groups = r.max_groups.unwrap_or(DEFAULT_MAX_GROUPS);
            if max_groups == 0 || max_groups > DEFAULT_MAX_GROUPS {
                errors.push(format!("max_groups: between 1 and {DEFAULT_MAX_GROUPS}"));
            }
            Kind::Correlation {
                within_us,
                max_groups,
            }
        }
    };
    if spec.actions().is_empty() {
        errors.push("actions: give at least one action".into());
    }
    if spec.actions().len() > 16 {
        errors.push("actions: at most 16".into());
    }
    for (i, a) in spec.actions().iter().enumerate() {
        match a {
            Action::Alert { severity, .. } => {
                if !matches!(severity.as_str(), "info" | "warning" | "critical") {
                    errors.push(format!(
                        "actions[{i}].severity: one of info, warning, critical"
                    ));
                }
            }
            Action::Patch { properties, .. } => {
                if properties.is_empty() {
                    errors.push(format!("actions[{i}].properties: an empty patch"));
                }
                if let Err(e) = crate::registry::check_patch(properties) {
                    errors.push(format!("actions[{i}].properties: {e}"));
                }
            }
            Action::Invoke { module, .. } => match modules(module) {
                None => errors.push(format!("actions[{i}].module: {module:?} is not uploaded")),
                Some(w) if w != "compute" => errors.push(format!(
                    "actions[{i}].module: {module:?} implements the {w} world, not compute"
                )),
                Some(_) => {}
            },
            Action::Workflow { .. } => errors.push(format!(
                "actions[{i}]: workflow actions are not available on this node yet"
            )),
        }
    }
    if errors.is_empty() {
        Ok(Compiled { spec, kind })
    } else {
        Err(errors)
    }
}

// ---- evaluation -----------------------------------------------------------------------------

/// A rule fired: what for, and on which twin its actions act.
#[derive(Clone, Debug, PartialEq)]
pub struct Firing {
    pub rule: String,
    /// The twin whose event fired the rule.
    pub twin_id: TwinId,
    pub entity_type: Option<String>,
    pub parent_id: Option<TwinId>,
    /// Event time of the firing.
    pub ts: DateTime<Utc>,
    /// The sequence number of the event that fired it.
    pub trigger_seq: u64,
    /// Details for the alert (value, window, twins, …).
    pub details: Value,
    pub depth: u8,
}

#[derive(Default)]
struct Acc {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Acc {
    fn add(&mut self, v: f64) {
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count += 1;
        self.sum += v;
    }

    fn get(&self, agg: Agg) -> f64 {
        match agg {
            Agg::Count => self.count as f64,
            Agg::Sum => self.sum,
            Agg::Avg => self.sum / self.count.max(1) as f64,
            Agg::Min => self.min,
            Agg::Max => self.max,
        }
    }
}

/// Counters of one rule.
#[derive(Default, Debug, Serialize, ToSchema, Clone)]
pub struct RuleStats {
    /// Times the rule fired.
    pub fired: u64,
    /// Updates that arrived after their window closed.
    pub late: u64,
    /// Groups or partial matches turned away or evicted by the rule's bounds.
    pub overflow: u64,
    /// Firings whose alert was held back by the cooldown.
    pub suppressed: u64,
    /// Actions that failed: a patch the write path refused, a `parent` target on a twin
    /// without one, an invoke that failed.
    pub errors: u64,
    /// The newest of those failures.
    pub last_error: Option<String>,
}

type Map<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

#[derive(Default)]
struct State {
    // threshold: twin → (armed-off?, last firing)
    active: Map<TwinId, (bool, i64)>,
    // window: group → window start → accumulator; open windows by end
    windows: Map<TwinId, BTreeMap<i64, Acc>>,
    /// Open windows by end time: (group, start).
    open: BTreeMap<i64, Vec<(TwinId, i64)>>,
    group_twin: Map<TwinId, (TwinId, Option<String>, Option<TwinId>)>,
    watermark: i64,
    // sequence: key → pending firsts / seconds (ts, twin, seq)
    firsts: Map<TwinId, VecDeque<(i64, TwinId, u64)>>,
    seconds: Map<TwinId, VecDeque<(i64, TwinId, u64)>>,
    pending: usize,
    newest: i64,
    // correlation: group → twin → last time the condition held; groups above min_count
    holding: Map<TwinId, Map<TwinId, i64>>,
    firing_groups: BTreeSet<TwinId>,
}

struct Rule {
    name: String,
    c: Compiled,
    state: State,
    stats: RuleStats,
}

/// Targets of a twin's relationships of a name (for sequences correlated by relationship).
pub type Related = Arc<dyn Fn(TwinId, &str) -> Vec<TwinId> + Send + Sync>;

/// A set of rules and their state: events in, firings out. Deterministic.
#[derive(Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// property → indexes of the rules that look at it.
    by_property: Map<String, Vec<usize>>,
    related: Option<Related>,
}

fn ts_of(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us).single().unwrap_or_default()
}

impl RuleSet {
    /// Add or replace a rule (its state starts empty).
    pub fn put(
        &mut self,
        name: &str,
        spec: RuleSpec,
        modules: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), Vec<String>> {
        let c = compile(spec, modules)?;
        self.rules.retain(|r| r.name != name);
        self.rules.push(Rule {
            name: name.to_owned(),
            c,
            state: State::default(),
            stats: RuleStats::default(),
        });
        self.reindex();
        Ok(())
    }

    /// Install the relationship lookup (the registry's, in the live engine).
    pub fn set_related(&mut self, f: Related) {
        self.related = Some(f);
    }

    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.rules.len();
        self.rules.retain(|r| r.name != name);
        self.reindex();
        before != self.rules.len()
    }

    pub fn stats(&self, name: &str) -> Option<RuleStats> {
        self.rules
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.stats.clone())
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn reindex(&mut self) {
        self.by_property.clear();
        for (i, r) in self.rules.iter().enumerate() {
            for p in r.c.spec.properties() {
                self.by_property.entry(p.to_owned()).or_default().push(i);
            }
        }
    }

    /// Evaluate one event; append what fired to `out`.
    pub fn on_event(&mut self, e: &Event, out: &mut Vec<Firing>) {
        if !matches!(e.kind, EventType::TwinUpdated | EventType::TwinCreated) {
            return;
        }
        let Some(twin) = e.twin_id else { return };
        let depth = e.cause.as_ref().map_or(0, |c| c.depth);
        if depth >= MAX_CHAIN_DEPTH {
            return;
        }
        let ts = e.ts_micros();
        // Rules interested in any changed property; each rule once per event.
        let mut seen: u128 = 0;
        let mut extra: Vec<usize> = Vec::new();
        for p in e.changed.keys() {
            let Some(idx) = self.by_property.get(p) else {
                continue;
            };
            for &i in idx {
                if i < 128 {
                    if seen & (1 << i) != 0 {
                        continue;
                    }
                    seen |= 1 << i;
                } else if extra.contains(&i) {
                    continue;
                } else {
                    extra.push(i);
                }
                let rule = &mut self.rules[i];
                if e.cause
                    .as_ref()
                    .is_some_and(|c| c.by.strip_prefix("rule:") == Some(&rule.name))
                {
                    continue;
                }
                let (et, tid) = rule.c.spec.scope();
                if tid.is_some_and(|t| t != twin) {
                    continue;
                }
                if let Some(et) = et {
                    if e.entity_type.as_deref() != Some(et) {
                        continue;
                    }
                }
                let related = |src: TwinId, name: &str| match &self.related {
                    Some(f) => f(src, name),
                    None => Vec::new(),
                };
                rule.eval(e, twin, ts, depth, &related, out);
            }
        }
    }
}

impl Rule {
    fn eval(
        &mut self,
        e: &Event,
        twin: TwinId,
        ts: i64,
        depth: u8,
        related: &dyn Fn(TwinId, &str) -> Vec<TwinId>,
        out: &mut Vec<Firing>,
    ) {
        // Built only when the rule fires.
        let name = &self.name;
        let base = || Firing {
            rule: name.clone(),
            twin_id: twin,
            entity_type: e.entity_type.clone(),
            parent_id: e.parent_id,
            ts: e.ts,
            trigger_seq: e.seq,
            details: Value::Null,
            depth,
        };
        let st = &mut self.state;
        match (&self.c.spec, &self.c.kind) {
            (RuleSpec::Threshold(r), Kind::Threshold { cooldown_us }) => {
                let Some(v) = e.changed.get(&r.property).and_then(Value::as_f64) else {
                    return;
                };
                let cond = r.op.test(v, r.value);
                let tracked = st.active.len();
                let (active, last) = match st.active.entry(twin) {
                    // A twin is tracked only from its first firing on.
                    std::collections::hash_map::Entry::Vacant(_) if !cond => return,
                    std::collections::hash_map::Entry::Vacant(_)
                        if tracked >= DEFAULT_MAX_GROUPS =>
                    {
                        self.stats.overflow += 1;
                        return;
                    }
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert((false, i64::MIN))
                    }
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                };
                if !*active && cond {
                    *active = true;
                    if *last != i64::MIN && ts - *last < *cooldown_us {
                        self.stats.suppressed += 1;
                        return;
                    }
                    *last = ts;
                    self.stats.fired += 1;
                    out.push(Firing {
                        details: json!({"property": r.property, "value": v, "op": r.op, "threshold": r.value}),
                        ..base()
                    });
                } else if *active {
                    let rearm = match r.clear {
                        Some(c) => !r.op.test(v, c),
                        None => !cond,
                    };
                    if rearm {
                        *active = false;
                        if *cooldown_us == 0 {
                            // Nothing left to remember about this twin.
                            st.active.remove(&twin);
                        }
                    }
                }
            }
            (
                RuleSpec::Window(r),
                Kind::Window {
                    size_us,
                    slide_us,
                    lateness_us,
                    max_groups,
                },
            ) => {
                let Some(v) = e.changed.get(&r.property).and_then(Value::as_f64) else {
                    return;
                };
                let group = match r.group_by {
                    // (validation refuses `relationship` for windows)
                    GroupBy::Twin | GroupBy::Relationship => twin,
                    GroupBy::Parent => match e.parent_id {
                        Some(p) => p,
                        None => return,
                    },
                };
                // Windows containing ts: starts s = k*slide with s <= ts < s + size.
                let last_start = ts.div_euclid(*slide_us) * slide_us;
                if last_start + size_us <= st.watermark {
                    self.stats.late += 1;
                    return;
                }
                let groups = st.windows.len();
                let wins = match st.windows.entry(group) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(_) if groups >= *max_groups => {
                        self.stats.overflow += 1;
                        return;
                    }
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        st.group_twin
                            .insert(group, (twin, e.entity_type.clone(), e.parent_id));
                        slot.insert(BTreeMap::new())
                    }
                };
                let mut accepted = false;
                let mut s = last_start;
                while s > ts - size_us {
                    let end = s + size_us;
                    if end <= st.watermark {
                        break; // this and older windows are closed
                    }
                    let acc = wins.entry(s).or_insert_with(|| {
                        st.open.entry(end).or_default().push((group, s));
                        Acc::default()
                    });
                    acc.add(v);
                    accepted = true;
                    s -= slide_us;
                }
                if !accepted {
                    self.stats.late += 1;
                    return;
                }
                if r.group_by == GroupBy::Parent {
                    // Alerts of a parent group name the latest twin that reported.
                    if let Some(g) = st.group_twin.get_mut(&group) {
                        g.0 = twin;
                    }
                }
                st.watermark = st.watermark.max(ts - lateness_us);
                // Close every window that ended at or before the watermark.
                let mut closing = Vec::new();
                while let Some(entry) = st.open.first_entry() {
                    if *entry.key() > st.watermark {
                        break;
                    }
                    let end = *entry.key();
                    let mut ws = entry.remove();
                    ws.sort_unstable(); // deterministic order within one end time
                    closing.extend(ws.into_iter().map(|(g, start)| (end, g, start)));
                }
                for (end, g, start) in closing {
                    let Some(wins) = st.windows.get_mut(&g) else {
                        continue;
                    };
                    let Some(acc) = wins.remove(&start) else {
                        continue;
                    };
                    if wins.is_empty() {
                        st.windows.remove(&g);
                    }
                    let value = acc.get(r.agg);
                    let hit = match (r.op, r.value) {
                        (Some(op), Some(b)) => op.test(value, b),
                        _ => true,
                    };
                    let (gt, get, gparent) =
                        st.group_twin.get(&g).cloned().unwrap_or((twin, None, None));
                    if !st.windows.contains_key(&g) {
                        st.group_twin.remove(&g);
                    }
                    if hit {
                        self.stats.fired += 1;
                        out.push(Firing {
                            twin_id: if r.group_by == GroupBy::Twin { g } else { gt },
                            entity_type: get,
                            parent_id: gparent,
                            ts: ts_of(end),
                            details: json!({
                                "property": r.property, "agg": r.agg, "value": value,
                                "count": acc.count, "group_by": r.group_by, "group": g,
                                "window": {"start": ts_of(start), "end": ts_of(end)},
                            }),
                            ..base()
                        });
                    }
                }
            }
            (RuleSpec::Sequence(r), Kind::Sequence { within_us }) => {
                // Pending matches are keyed so that a "then" finds its "first": by the twin,
                // by the parent, or (relationship) under each target of the first twin's
                // relationship, which is the twin the "then" happens on.
                let own_key = match r.correlate {
                    GroupBy::Twin | GroupBy::Relationship => twin,
                    GroupBy::Parent => match e.parent_id {
                        Some(p) => p,
                        None => return,
                    },
                };
                st.newest = st.newest.max(ts);
                let horizon = st.newest - within_us;
                let is_first = r.first.eval(&e.changed) == Some(true);
                let is_then = r.then.eval(&e.changed) == Some(true);
                // A "then" matches the oldest earlier "first" within the span.
                if is_then {
                    if let Some(q) = st.firsts.get_mut(&own_key) {
                        q.retain(|(t, _, _)| *t >= horizon);
                        if let Some(pos) = q
                            .iter()
                            .position(|(t, _, _)| *t <= ts && ts - t <= *within_us)
                        {
                            let (t0, first_twin, first_seq) = q.remove(pos).expect("found");
                            st.pending -= 1;
                            self.stats.fired += 1;
                            out.push(Firing {
                                details: json!({
                                    "first": {"twin_id": first_twin, "ts": ts_of(t0), "seq": first_seq},
                                    "then": {"twin_id": twin, "ts": e.ts, "seq": e.seq},
                                    "within": r.within, "correlate": r.correlate,
                                }),
                                ..base()
                            });
                            return;
                        }
                    }
                }
                if is_first {
                    let keys: Vec<TwinId> = match (r.correlate, &r.relationship) {
                        (GroupBy::Relationship, Some(name)) => {
                            let mut k = related(twin, name);
                            k.truncate(MAX_RELATED);
                            k
                        }
                        _ => vec![own_key],
                    };
                    // Out of order: a "then" that arrived earlier but happened later.
                    for key in &keys {
                        let Some(q) = st.seconds.get_mut(key) else {
                            continue;
                        };
                        q.retain(|(t, _, _)| *t >= horizon);
                        if let Some(pos) = q
                            .iter()
                            .position(|(t, _, _)| *t >= ts && t - ts <= *within_us)
                        {
                            let (t1, then_twin, then_seq) = q.remove(pos).expect("found");
                            st.pending -= 1;
                            self.stats.fired += 1;
                            out.push(Firing {
                                twin_id: then_twin,
                                ts: ts_of(t1),
                                details: json!({
                                    "first": {"twin_id": twin, "ts": e.ts, "seq": e.seq},
                                    "then": {"twin_id": then_twin, "ts": ts_of(t1), "seq": then_seq},
                                    "within": r.within, "correlate": r.correlate,
                                }),
                                ..base()
                            });
                            return;
                        }
                    }
                    for key in keys {
                        push_pending(st, true, key, (ts, twin, e.seq), &mut self.stats);
                    }
                } else if is_then {
                    push_pending(st, false, own_key, (ts, twin, e.seq), &mut self.stats);
                }
            }
            (
                RuleSpec::Correlation(r),
                Kind::Correlation {
                    within_us,
                    max_groups,
                },
            ) => {
                let Some(cond) = r.condition.eval(&e.changed) else {
                    return;
                };
                let Some(group) = e.parent_id else { return };
                if !st.holding.contains_key(&group) && st.holding.len() >= *max_groups {
                    self.stats.overflow += 1;
                    return;
                }
                let members = st.holding.entry(group).or_default();
                if cond {
                    let t = members.entry(twin).or_insert(ts);
                    *t = (*t).max(ts);
                } else {
                    members.remove(&twin);
                }
                members.retain(|_, t| *t > ts - within_us);
                let n = members.len();
                if n >= r.min_count {
                    if st.firing_groups.insert(group) {
                        let twins: BTreeSet<TwinId> = members.keys().copied().collect();
                        self.stats.fired += 1;
                        out.push(Firing {
                            details: json!({
                                "parent_id": group, "count": n, "min_count": r.min_count,
                                "twins": twins, "condition": r.condition, "within": r.within,
                            }),
                            ..base()
                        });
                    }
                } else {
                    st.firing_groups.remove(&group);
                    if members.is_empty() {
                        st.holding.remove(&group);
                    }
                }
            }
            _ => unreachable!("a rule's kind matches its spec"),
        }
    }
}

fn push_pending(
    st: &mut State,
    first: bool,
    key: TwinId,
    item: (i64, TwinId, u64),
    stats: &mut RuleStats,
) {
    let map = if first {
        &mut st.firsts
    } else {
        &mut st.seconds
    };
    if st.pending >= MAX_PENDING {
        // Evict the oldest entry of this key, if any; otherwise turn the new one away.
        match map.get_mut(&key).and_then(|q| q.pop_front()) {
            Some(_) => st.pending -= 1,
            None => {
                stats.overflow += 1;
                return;
            }
        }
        stats.overflow += 1;
    }
    map.entry(key).or_default().push_back(item);
    st.pending += 1;
}

// ---- the live engine ------------------------------------------------------------------------

/// Runs compute modules for `invoke` actions (installed by the WebAssembly layer).
pub trait Invoker: Send + Sync {
    /// The world of module `name`, if uploaded.
    fn world_of(&self, name: &str) -> Option<String>;
    /// Invoke compute module `name` on one twin. Blocking.
    fn invoke(&self, name: &str, twin: TwinId, parameters: &Value) -> Result<Value, String>;
}

/// A stored rule as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RuleInfo {
    pub name: String,
    pub spec: RuleSpec,
    pub stats: RuleStats,
}

/// Why a rule could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("the rule is invalid: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("rule {0:?} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Inner {
    store: Store,
    registry: Registry,
    log: EventLog,
    /// Rules are independent, so they are spread over shards evaluated in parallel (one per
    /// core); every shard sees every event.
    shards: Vec<Mutex<RuleSet>>,
    /// Wakes a shard's task when it gets a rule (an empty shard does not follow the log).
    wake: Vec<Wake>,
    specs: RwLock<BTreeMap<String, RuleSpec>>,
    invoker: OnceLock<Arc<dyn Invoker>>,
    missed: AtomicU64,
    /// Failed actions per rule: count and newest message (cleared when the rule is replaced).
    failures: Mutex<HashMap<String, (u64, String)>>,
}

/// The node's rules, evaluated on the live event log. Cheap to clone.
#[derive(Clone)]
pub struct Rules {
    inner: Arc<Inner>,
}

impl Rules {
    /// Load the stored rules and start evaluating (on the current tokio runtime).
    pub fn open(store: Store, registry: Registry, log: EventLog) -> Result<Rules, StoreError> {
        let mut specs = BTreeMap::new();
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let related: Related = {
            let registry = registry.clone();
            Arc::new(move |src: TwinId, name: &str| {
                registry
                    .relationships(&src)
                    .map(|rels| {
                        rels.into_iter()
                            .filter(|r| r.name == name)
                            .map(|r| r.target_id)
                            .collect()
                    })
                    .unwrap_or_default()
            })
        };
        let mut sets: Vec<RuleSet> = (0..n)
            .map(|_| {
                let mut set = RuleSet::default();
                set.set_related(related.clone());
                set
            })
            .collect();
        for kv in store.scan_prefix(&[keys::RULE]) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            match serde_json::from_slice::<RuleSpec>(&v) {
                // Modules are checked at PUT; a module deleted since fails at run time.
                Ok(spec) => match sets[shard_of(&name, n)]
                    .put(&name, spec.clone(), &|_| Some("compute".into()))
                {
                    Ok(()) => {
                        specs.insert(name, spec);
                    }
                    Err(e) => {
                        tracing::error!(rule = %name, errors = ?e, "stored rule no longer valid; skipped")
                    }
                },
                Err(e) => tracing::error!(rule = %name, error = %e, "unreadable rule; skipped"),
            }
        }
        let rules = Rules {
            inner: Arc::new(Inner {
                store,
                registry,
                log,
                wake: (0..sets.len()).map(|_| Wake::default()).collect(),
                shards: sets.into_iter().map(Mutex::new).collect(),
                specs: RwLock::new(specs),
                invoker: OnceLock::new(),
                missed: AtomicU64::new(0),
                failures: Mutex::new(HashMap::new()),
            }),
        };
        for shard in 0..n {
            let me = rules.clone();
            tokio::spawn(async move { me.run(shard).await });
        }
        Ok(rules)
    }

    /// Install what runs `invoke` actions.
    pub fn set_invoker(&self, invoker: Arc<dyn Invoker>) {
        let _ = self.inner.invoker.set(invoker);
    }

    fn module_world(&self, name: &str) -> Option<String> {
        self.inner.invoker.get().and_then(|i| i.world_of(name))
    }

    /// Create or replace a rule (its state restarts). Returns true when it is new.
    pub fn put(&self, name: &str, spec: RuleSpec) -> Result<bool, RuleError> {
        check_name("rule name", name).map_err(|e| RuleError::Invalid(vec![e.to_string()]))?;
        let fresh = !self.inner.specs.read().contains_key(name);
        if fresh && self.inner.specs.read().len() >= MAX_RULES {
            return Err(RuleError::Invalid(vec![format!(
                "a node holds at most {MAX_RULES} rules"
            )]));
        }
        validate(&spec, &|m| self.module_world(m)).map_err(RuleError::Invalid)?;
        let bytes = serde_json::to_vec(&spec).expect("rules serialize");
        self.inner.store.put_durable(&keys::rule(name), &bytes)?;
        self.shard(name)
            .lock()
            .put(name, spec.clone(), &|m| self.module_world(m))
            .map_err(RuleError::Invalid)?;
        self.inner.wake[shard_of(name, self.inner.shards.len())].wake(&self.inner.log);
        self.inner.failures.lock().remove(name);
        self.inner.specs.write().insert(name.to_owned(), spec);
        Ok(fresh)
    }

    pub fn delete(&self, name: &str) -> Result<(), RuleError> {
        if self.inner.specs.write().remove(name).is_none() {
            return Err(RuleError::NotFound(name.to_owned()));
        }
        self.shard(name).lock().remove(name);
        self.inner.failures.lock().remove(name);
        self.inner
            .store
            .remove_keys([sled::IVec::from(keys::rule(name))])?;
        self.inner.store.flush()?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<RuleInfo, RuleError> {
        let spec = self
            .inner
            .specs
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| RuleError::NotFound(name.to_owned()))?;
        let stats = self.stats_of(name);
        Ok(RuleInfo {
            name: name.to_owned(),
            spec,
            stats,
        })
    }

    pub fn list(&self) -> Vec<RuleInfo> {
        let names: Vec<String> = self.inner.specs.read().keys().cloned().collect();
        names.iter().filter_map(|n| self.get(n).ok()).collect()
    }

    /// How many rules the node holds.
    pub fn count(&self) -> usize {
        self.inner.specs.read().len()
    }

    /// Names of the rules whose actions invoke `module`.
    pub fn using_module(&self, module: &str) -> Vec<String> {
        self.inner
            .specs
            .read()
            .iter()
            .filter(|(_, s)| s.modules().contains(&module))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Events the engine missed because it fell behind the log.
    pub fn missed(&self) -> u64 {
        self.inner.missed.load(Ordering::Relaxed)
    }

    fn shard(&self, name: &str) -> &Mutex<RuleSet> {
        &self.inner.shards[shard_of(name, self.inner.shards.len())]
    }

    /// Follow the log while the shard has rules; an empty shard costs nothing per event.
    async fn run(self, shard: usize) {
        let filter = Filter {
            types: EventType::TwinCreated.bit() | EventType::TwinUpdated.bit(),
            ..Filter::default()
        };
        let mut fired = Vec::new();
        let inner = &self.inner;
        let has_rules = || !inner.shards[shard].lock().is_empty();
        inner
            .log
            .follow(
                &inner.registry,
                &filter,
                Follower {
                    name: "rules",
                    wake: &inner.wake[shard],
                    missed: &inner.missed,
                },
                has_rules,
                |e| {
                    {
                        let mut set = inner.shards[shard].lock();
                        if set.is_empty() {
                            return false;
                        }
                        set.on_event(&e, &mut fired);
                    }
                    for f in fired.drain(..) {
                        self.act(f);
                    }
                    true
                },
            )
            .await;
    }

    /// Count a failed action of `rule`.
    fn failed(&self, rule: &str, message: String) {
        let mut failures = self.inner.failures.lock();
        let e = failures.entry(rule.to_owned()).or_default();
        e.0 += 1;
        e.1 = message;
    }

    /// A rule's counters, with its failed actions.
    fn stats_of(&self, name: &str) -> RuleStats {
        let mut stats = self.shard(name).lock().stats(name).unwrap_or_default();
        if let Some((n, last)) = self.inner.failures.lock().get(name) {
            stats.errors = *n;
            stats.last_error = Some(last.clone());
        }
        stats
    }

    /// Carry out a firing's actions.
    fn act(&self, f: Firing) {
        let Some(spec) = self.inner.specs.read().get(&f.rule).cloned() else {
            return;
        };
        let cause = Arc::new(Cause {
            by: format!("rule:{}", f.rule),
            depth: f.depth + 1,
        });
        for a in spec.actions() {
            let target = |t: &Target| match t {
                Target::Twin => Some(f.twin_id),
                Target::Parent => {
                    if f.parent_id.is_none() {
                        self.failed(
                            &f.rule,
                            format!("twin {} has no parent to act on", f.twin_id),
                        );
                    }
                    f.parent_id
                }
            };
            match a {
                Action::Alert { severity, message } => {
                    let message = message
                        .clone()
                        .unwrap_or_else(|| format!("rule {} fired on twin {}", f.rule, f.twin_id));
                    self.inner.log.raise(vec![alert(
                        &f,
                        &cause,
                        json!({"source": "rule", "rule": f.rule, "severity": severity,
                               "message": message, "details": f.details, "trigger_seq": f.trigger_seq}),
                    )]);
                }
                Action::Patch {
                    target: t,
                    properties,
                } => {
                    let Some(id) = target(t) else { continue };
                    let update = Update {
                        cause: Some(cause.clone()),
                        ..Update::new(id, properties.clone())
                    };
                    let me = self.clone();
                    let rule = f.rule.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.inner.registry.patch(update).await {
                            tracing::warn!(rule, error = %e, "rule patch failed");
                            me.failed(&rule, format!("patch of twin {id} failed: {e}"));
                        }
                    });
                }
                Action::Invoke {
                    module,
                    target: t,
                    parameters,
                } => {
                    let (Some(id), Some(inv)) = (target(t), self.inner.invoker.get().cloned())
                    else {
                        continue;
                    };
                    let (me, module, params, f2, cause) = (
                        self.clone(),
                        module.clone(),
                        parameters.clone(),
                        f.clone(),
                        cause.clone(),
                    );
                    tokio::task::spawn_blocking(move || {
                        let params = if params.is_null() { json!({}) } else { params };
                        let result = inv.invoke(&module, id, &params);
                        let (key, value, severity) = match result {
                            Ok(v) => ("result", v, "info"),
                            Err(e) => {
                                me.failed(&f2.rule, format!("invoke of {module} failed: {e}"));
                                ("error", Value::String(e), "warning")
                            }
                        };
                        me.inner.log.raise(vec![alert(
                            &f2,
                            &cause,
                            json!({"source": "rule", "rule": f2.rule, "severity": severity,
                                   "message": format!("rule {} invoked {module}", f2.rule),
                                   "module": module, "twin_id": id, key: value,
                                   "trigger_seq": f2.trigger_seq}),
                        )]);
                    });
                }
                Action::Workflow { .. } => {}
            }
        }
    }
}

/// The shard a rule lives in (stable for a name).
pub fn shard_of(name: &str, shards: usize) -> usize {
    use std::hash::BuildHasher;
    (rustc_hash::FxBuildHasher.hash_one(name) % shards.max(1) as u64) as usize
}

fn alert(f: &Firing, cause: &Cause, data: Value) -> Event {
    let mut a = Event::new(EventType::Alert, f.ts);
    a.twin_id = Some(f.twin_id);
    a.entity_type = f.entity_type.clone();
    a.parent_id = f.parent_id;
    a.cause = Some(cause.clone());
    a.data = Some(data);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> TwinId {
        TwinId(uuid::Uuid::from_u128(n))
    }

    /// An update of `twin` (under `parent`) at `t` seconds setting `prop` to `v`.
    fn ev(seq: u64, twin: u128, parent: Option<u128>, t: f64, prop: &str, v: f64) -> Event {
        let mut e = Event::new(EventType::TwinUpdated, ts_of((t * 1e6) as i64));
        e.seq = seq;
        e.twin_id = Some(id(twin));
        e.entity_type = Some("machine".into());
        e.parent_id = parent.map(id);
        e.changed.insert(prop.into(), json!(v));
        e
    }

    fn rules(name: &str, spec: Value) -> RuleSet {
        let mut set = RuleSet::default();
        let spec: RuleSpec = serde_json::from_value(spec).expect("rule parses");
        set.put(name, spec, &|_| Some("compute".into()))
            .expect("rule is valid");
        set
    }

    fn feed(set: &mut RuleSet, events: &[Event]) -> Vec<Firing> {
        let mut out = Vec::new();
        for e in events {
            set.on_event(e, &mut out);
        }
        out
    }

    #[test]
    fn threshold_fires_on_rising_edges_with_hysteresis_and_cooldown() {
        let mut set = rules(
            "hot",
            json!({"kind": "threshold", "entity_type": "machine", "property": "temperature",
                   "op": ">", "value": 85, "clear": 80, "cooldown": "10s",
                   "actions": [{"type": "alert"}]}),
        );
        let temps = [
            (0.0, 70.0),
            (1.0, 90.0), // fires
            (2.0, 91.0),
            (3.0, 82.0), // still above clear: stays armed-off
            (4.0, 86.0),
            (5.0, 79.0), // re-arms
            (6.0, 88.0), // rising edge within the cooldown: suppressed
            (7.0, 70.0),
            (20.0, 95.0), // fires
        ];
        let events: Vec<Event> = temps
            .iter()
            .enumerate()
            .map(|(i, (t, v))| ev(i as u64 + 1, 1, None, *t, "temperature", *v))
            .collect();
        let out = feed(&mut set, &events);
        assert_eq!(
            out.iter().map(|f| f.trigger_seq).collect::<Vec<_>>(),
            [2, 9]
        );
        assert!(out.iter().all(|f| f.twin_id == id(1)));
        assert_eq!(out[0].details["value"], json!(90.0));
        let stats = set.stats("hot").unwrap();
        assert_eq!((stats.fired, stats.suppressed), (2, 1));
        // Other entity types and other properties are ignored; each twin has its own state.
        let mut other = ev(20, 2, None, 30.0, "temperature", 99.0);
        other.entity_type = Some("sensor".into());
        let out = feed(
            &mut set,
            &[
                other,
                ev(21, 3, None, 30.0, "pressure", 99.0),
                ev(22, 3, None, 31.0, "temperature", 99.0),
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].twin_id, id(3));
    }

    #[test]
    fn tumbling_window_averages_per_twin_and_handles_lateness() {
        let mut set = rules(
            "avg",
            json!({"kind": "window", "property": "temperature", "agg": "avg", "size": "10s",
                   "lateness": "5s", "op": ">", "value": 0, "actions": [{"type": "alert"}]}),
        );
        let out = feed(
            &mut set,
            &[
                ev(1, 1, None, 1.0, "temperature", 10.0),
                ev(2, 1, None, 12.0, "temperature", 30.0), // watermark 7: [0,10) stays open
                ev(3, 1, None, 8.0, "temperature", 20.0),  // out of order, within lateness
                ev(4, 2, None, 9.0, "temperature", 100.0), // another twin, same window
            ],
        );
        assert!(
            out.is_empty(),
            "nothing closes before the watermark passes 10 s"
        );
        let out = feed(&mut set, &[ev(5, 1, None, 16.0, "temperature", 40.0)]);
        // Watermark 11 closes [0,10) for both twins.
        let mut got: Vec<(TwinId, f64, u64)> = out
            .iter()
            .map(|f| {
                (
                    f.twin_id,
                    f.details["value"].as_f64().unwrap(),
                    f.details["count"].as_u64().unwrap(),
                )
            })
            .collect();
        got.sort_by_key(|g| g.0);
        assert_eq!(got, [(id(1), 15.0, 2), (id(2), 100.0, 1)]);
        assert_eq!(out[0].details["window"]["start"], json!(ts_of(0)));
        assert_eq!(out[0].details["window"]["end"], json!(ts_of(10_000_000)));
        // An update for a closed window is late: counted, not added.
        let out = feed(&mut set, &[ev(6, 1, None, 3.0, "temperature", 1000.0)]);
        assert!(out.is_empty());
        assert_eq!(set.stats("avg").unwrap().late, 1);
        // [10,20) for twin 1 holds 30 and 40 (the late 1000 did not land anywhere).
        let out = feed(&mut set, &[ev(7, 1, None, 26.0, "temperature", 0.0)]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].details["value"], json!(35.0));
    }

    #[test]
    fn sliding_window_by_parent_with_condition() {
        // Max over 10 s every 5 s, per parent, firing when the max passes 50.
        let mut set = rules(
            "peak",
            json!({"kind": "window", "property": "load", "agg": "max", "size": "10s", "slide": "5s",
                   "group_by": "parent", "op": ">", "value": 50, "actions": [{"type": "alert"}]}),
        );
        let out = feed(
            &mut set,
            &[
                ev(1, 1, Some(100), 1.0, "load", 60.0), // windows [-5,5) and [0,10)
                ev(2, 2, Some(100), 6.0, "load", 40.0), // [0,10) and [5,15); closes [-5,5)
                ev(3, 3, Some(200), 7.0, "load", 70.0), // other parent
                ev(4, 1, Some(100), 21.0, "load", 10.0), // closes [0,10), [5,15) and [10,20)
                ev(5, 9, None, 22.0, "load", 99.0),     // no parent: not grouped
            ],
        );
        let got: Vec<(String, i64, f64)> = out
            .iter()
            .map(|f| {
                (
                    f.details["group"].as_str().unwrap().to_owned(),
                    chrono::DateTime::parse_from_rfc3339(
                        f.details["window"]["start"].as_str().unwrap(),
                    )
                    .unwrap()
                    .timestamp(),
                    f.details["value"].as_f64().unwrap(),
                )
            })
            .collect();
        let p100 = id(100).to_string();
        let p200 = id(200).to_string();
        // [-5,5) max 60 (p100); [0,10) max 60 (p100) and 70 (p200); [5,15) max 70 (p200);
        // p100's [5,15) holds only 40 and does not fire.
        assert_eq!(
            got,
            [
                (p100.clone(), -5, 60.0),
                (p100, 0, 60.0),
                (p200.clone(), 0, 70.0),
                (p200, 5, 70.0),
            ]
        );
    }

    #[test]
    fn sequence_matches_in_order_and_out_of_order_within_the_span() {
        let mut set = rules(
            "hot-then-shake",
            json!({"kind": "sequence", "first": {"property": "temperature", "op": ">", "value": 85},
                   "then": {"property": "vibration", "op": ">", "value": 5}, "within": "10s",
                   "actions": [{"type": "alert"}]}),
        );
        let out = feed(
            &mut set,
            &[
                ev(1, 1, None, 0.0, "temperature", 90.0),
                ev(2, 1, None, 4.0, "vibration", 7.0), // fires (1 then 2)
                ev(3, 1, None, 5.0, "vibration", 7.0), // no pending first
                ev(4, 2, None, 10.0, "temperature", 90.0),
                ev(5, 2, None, 21.0, "vibration", 9.0), // 11 s later: too late
                ev(6, 3, None, 30.0, "vibration", 9.0), // arrives first …
                ev(7, 3, None, 28.0, "temperature", 99.0), // … but happened 2 s later: fires
                ev(8, 4, None, 40.0, "temperature", 99.0),
                ev(9, 5, None, 41.0, "vibration", 99.0), // another twin: not correlated
            ],
        );
        let pairs = seq_pairs(&out);
        assert_eq!(pairs, [(1, 2), (7, 6)]);
    }

    /// (first, then) sequence numbers of sequence-rule firings.
    fn seq_pairs(out: &[Firing]) -> Vec<(u64, u64)> {
        out.iter()
            .map(|f| {
                (
                    f.details["first"]["seq"].as_u64().unwrap(),
                    f.details["then"]["seq"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn sequence_correlates_twins_by_parent() {
        let mut set = rules(
            "door-then-motion",
            json!({"kind": "sequence", "correlate": "parent",
                   "first": {"property": "door_open", "op": "==", "value": 1},
                   "then": {"property": "motion", "op": ">", "value": 0}, "within": "30s",
                   "actions": [{"type": "alert"}]}),
        );
        let out = feed(
            &mut set,
            &[
                ev(1, 1, Some(100), 0.0, "door_open", 1.0),
                ev(2, 2, Some(200), 1.0, "motion", 1.0), // other room
                ev(3, 3, Some(100), 2.0, "motion", 1.0), // same room, other twin: fires
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].details["first"]["twin_id"], json!(id(1)));
        assert_eq!(out[0].details["then"]["twin_id"], json!(id(3)));
    }

    #[test]
    fn sequence_correlates_along_a_relationship() {
        // Pump 1 feeds tank 10; pump 2 feeds tank 20.
        let mut set = rules(
            "pump-then-tank",
            json!({"kind": "sequence", "correlate": "relationship", "relationship": "feeds",
                   "first": {"property": "pressure", "op": ">", "value": 8},
                   "then": {"property": "level", "op": ">", "value": 90}, "within": "1m",
                   "actions": [{"type": "alert"}]}),
        );
        set.set_related(Arc::new(|src: TwinId, name: &str| {
            assert_eq!(name, "feeds");
            match src {
                s if s == id(1) => vec![id(10)],
                s if s == id(2) => vec![id(20)],
                _ => vec![],
            }
        }));
        let out = feed(
            &mut set,
            &[
                ev(1, 1, None, 0.0, "pressure", 9.0),
                ev(2, 20, None, 1.0, "level", 95.0), // tank 20 is not fed by pump 1
                ev(3, 10, None, 2.0, "level", 95.0), // fires
                ev(4, 20, None, 10.0, "level", 99.0), // arrives before …
                ev(5, 2, None, 5.0, "pressure", 9.5), // … the pump event that preceded it: fires
            ],
        );
        let pairs = seq_pairs(&out);
        assert_eq!(pairs, [(1, 3), (5, 4)]);
        let bad: RuleSpec = serde_json::from_value(json!({"kind": "sequence", "correlate": "relationship",
            "first": {"property": "a", "op": ">", "value": 1}, "then": {"property": "b", "op": ">", "value": 1},
            "within": "1m", "actions": [{"type": "alert"}]})).unwrap();
        assert!(validate(&bad, &|_| None).unwrap_err()[0].contains("relationship"));
    }

    #[test]
    fn correlation_needs_k_twins_under_one_parent_within_the_window() {
        let mut set = rules(
            "line-overheat",
            json!({"kind": "correlation", "condition": {"property": "temperature", "op": ">", "value": 85},
                   "min_count": 2, "within": "60s", "actions": [{"type": "alert"}]}),
        );
        let p = Some(100);
        let out = feed(
            &mut set,
            &[
                ev(1, 1, p, 0.0, "temperature", 90.0),
                ev(2, 9, Some(200), 1.0, "temperature", 90.0), // other line
                ev(3, 2, p, 10.0, "temperature", 91.0),        // fires: twins 1 and 2
                ev(4, 3, p, 11.0, "temperature", 92.0),        // still firing: no repeat
                ev(5, 1, p, 12.0, "temperature", 70.0),
                ev(6, 2, p, 13.0, "temperature", 70.0), // down to 1: re-arms
                ev(7, 1, p, 100.0, "temperature", 95.0), // 3's reading is 89 s old: only 1
                ev(8, 2, p, 101.0, "temperature", 96.0), // fires again
            ],
        );
        assert_eq!(
            out.iter().map(|f| f.trigger_seq).collect::<Vec<_>>(),
            [3, 8]
        );
        assert_eq!(out[0].details["twins"], json!([id(1), id(2)]));
        assert_eq!(out[1].details["count"], json!(2));
    }

    #[test]
    fn state_is_bounded_and_overflow_is_counted() {
        let mut set = rules(
            "tiny",
            json!({"kind": "window", "property": "x", "agg": "count", "size": "1h",
                   "max_groups": 2, "actions": [{"type": "alert"}]}),
        );
        let out = feed(
            &mut set,
            &(1..=5)
                .map(|i| ev(i, i as u128, None, 1.0, "x", 1.0))
                .collect::<Vec<_>>(),
        );
        assert!(out.is_empty());
        assert_eq!(set.stats("tiny").unwrap().overflow, 3);
    }

    #[test]
    fn a_rule_ignores_its_own_changes_and_deep_chains() {
        let mut set = rules(
            "hot",
            json!({"kind": "threshold", "property": "t", "op": ">", "value": 1,
                   "actions": [{"type": "patch", "properties": {"t": 5}}]}),
        );
        let mut own = ev(1, 1, None, 0.0, "t", 5.0);
        own.cause = Some(Cause {
            by: "rule:hot".into(),
            depth: 1,
        });
        let mut deep = ev(2, 2, None, 0.0, "t", 5.0);
        deep.cause = Some(Cause {
            by: "behavior:x".into(),
            depth: MAX_CHAIN_DEPTH,
        });
        let mut other = ev(3, 3, None, 0.0, "t", 5.0);
        other.cause = Some(Cause {
            by: "behavior:x".into(),
            depth: 1,
        });
        let out = feed(&mut set, &[own, deep, other]);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].trigger_seq, out[0].depth), (3, 1));
    }

    #[test]
    fn malformed_rules_list_every_reason() {
        let bad: RuleSpec = serde_json::from_value(json!({
            "kind": "window", "property": "bad name!", "agg": "avg", "size": "soon",
            "slide": "3s", "op": ">", "actions": [
                {"type": "alert", "severity": "apocalyptic"},
                {"type": "invoke", "module": "nope"},
                {"type": "workflow", "workflow": {}}]
        }))
        .unwrap();
        let errors = validate(&bad, &|_| None).unwrap_err();
        for want in [
            "property",
            "size",
            "op and value",
            "severity",
            "\"nope\" is not uploaded",
            "workflow",
        ] {
            assert!(
                errors.iter().any(|e| e.contains(want)),
                "no error about {want}: {errors:?}"
            );
        }
        let sliding: RuleSpec = serde_json::from_value(json!({
            "kind": "window", "property": "x", "agg": "sum", "size": "10s", "slide": "3s",
            "actions": [{"type": "alert"}]}))
        .unwrap();
        assert!(validate(&sliding, &|_| None).unwrap_err()[0].contains("whole multiple"));
        let hysteresis: RuleSpec = serde_json::from_value(json!({
            "kind": "threshold", "property": "x", "op": ">", "value": 10, "clear": 20,
            "actions": [{"type": "alert"}]}))
        .unwrap();
        let errors = validate(&hysteresis, &|_| None).unwrap_err();
        assert!(errors[0].contains("clear: for op > "), "{errors:?}");
        // `=` (as in queries) is `==`.
        let eq: RuleSpec = serde_json::from_value(json!({
            "kind": "threshold", "property": "x", "op": "=", "value": 1,
            "actions": [{"type": "alert"}]}))
        .unwrap();
        assert!(matches!(eq, RuleSpec::Threshold(ref t) if t.op == Op::Eq));
        // Unknown fields and kinds are refused by the parser.
        assert!(serde_json::from_value::<RuleSpec>(json!({"kind": "threshold", "property": "x", "op": ">", "value": 1, "actions": [], "bogus": 1})).is_err());
        assert!(serde_json::from_value::<RuleSpec>(json!({"kind": "magic"})).is_err());
    }

    /// A deletion of `twin` at `t` seconds.
    fn deleted(seq: u64, twin: u128, t: f64) -> Event {
        let mut e = Event::new(EventType::TwinDeleted, ts_of((t * 1e6) as i64));
        e.seq = seq;
        e.twin_id = Some(id(twin));
        e.entity_type = Some("machine".into());
        e
    }

    #[test]
    fn sequence_keeps_firing_after_many_partial_matches_expired() {
        // Every "first" expires unmatched (its "then" comes too late) and so does every
        // "then"; the rule must still match a fresh pair afterwards.
        let mut set = rules(
            "a-then-b",
            json!({"kind": "sequence", "first": {"property": "a", "op": ">", "value": 0},
                   "then": {"property": "b", "op": ">", "value": 0}, "within": "1s",
                   "actions": [{"type": "alert"}]}),
        );
        let mut out = Vec::new();
        let rounds = MAX_PENDING as u64 / 2 + 1;
        for i in 0..rounds {
            let t = 2.0 * i as f64;
            set.on_event(&ev(2 * i + 1, 1, None, t, "a", 1.0), &mut out);
            set.on_event(&ev(2 * i + 2, 1, None, t + 1.5, "b", 1.0), &mut out);
        }
        assert!(out.is_empty(), "no pair was within 1 s");
        let t = 2.0 * rounds as f64 + 10.0;
        let seq = 2 * rounds + 1;
        let out = feed(
            &mut set,
            &[
                ev(seq, 1, None, t, "a", 1.0),
                ev(seq + 1, 1, None, t + 0.5, "b", 1.0),
            ],
        );
        assert_eq!(seq_pairs(&out), [(seq, seq + 1)]);
        assert_eq!(set.stats("a-then-b").unwrap().overflow, 0);
    }

    #[test]
    fn threshold_with_cooldown_forgets_twins_once_rearmed_and_cooled_down() {
        let mut set = rules(
            "hot",
            json!({"kind": "threshold", "property": "t", "op": ">", "value": 10,
                   "cooldown": "1s", "actions": [{"type": "alert"}]}),
        );
        let mut out = Vec::new();
        let n = DEFAULT_MAX_GROUPS as u128;
        for twin in 1..=n {
            let t = twin as f64 * 0.001;
            set.on_event(&ev(2 * twin as u64, twin, None, t, "t", 20.0), &mut out);
            set.on_event(&ev(2 * twin as u64 + 1, twin, None, t, "t", 0.0), &mut out);
        }
        assert_eq!(out.len(), n as usize);
        // Long after every cooldown has passed, a new twin's crossing fires.
        let later = n as f64 * 0.001 + 10.0;
        let out = feed(
            &mut set,
            &[ev(10 * n as u64, n + 1, None, later, "t", 20.0)],
        );
        assert_eq!(out.len(), 1, "{:?}", set.stats("hot"));
        assert_eq!(set.stats("hot").unwrap().overflow, 0);
    }

    #[test]
    fn rules_forget_deleted_twins() {
        let mut set = rules(
            "hot",
            json!({"kind": "threshold", "entity_type": "machine", "property": "t", "op": ">",
                   "value": 10, "actions": [{"type": "alert"}]}),
        );
        let mut out = Vec::new();
        let n = DEFAULT_MAX_GROUPS as u128;
        for twin in 1..=n {
            set.on_event(&ev(twin as u64, twin, None, 1.0, "t", 20.0), &mut out);
        }
        assert_eq!(out.len(), n as usize);
        for twin in 1..=n {
            set.on_event(&deleted(n as u64 + twin as u64, twin, 2.0), &mut out);
        }
        let out = feed(&mut set, &[ev(3 * n as u64, n + 1, None, 3.0, "t", 20.0)]);
        assert_eq!(out.len(), 1, "{:?}", set.stats("hot"));
        assert_eq!(set.stats("hot").unwrap().overflow, 0);
    }

    /// An invoker whose module answers as compute once and then is gone, as when the module
    /// is deleted while a rule using it is being stored.
    struct Vanishing(std::sync::atomic::AtomicBool);

    impl Invoker for Vanishing {
        fn world_of(&self, _name: &str) -> Option<String> {
            (!self.0.swap(true, Ordering::SeqCst)).then(|| "compute".into())
        }
        fn invoke(&self, _: &str, _: TwinId, _: &Value) -> Result<Value, String> {
            Err("not in this test".into())
        }
    }

    /// Rules on a fresh store, with what the live engine needs.
    async fn open_rules(store: &Store) -> Rules {
        let registry = Registry::open(store, "test").unwrap();
        let log = EventLog::open(store.clone(), &registry, "test", Default::default()).unwrap();
        Rules::open(store.clone(), registry, log).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_refused_put_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rules = open_rules(&store).await;
        rules.set_invoker(Arc::new(Vanishing(Default::default())));
        let spec: RuleSpec = serde_json::from_value(json!({"kind": "threshold", "property": "t",
            "op": ">", "value": 1, "actions": [{"type": "invoke", "module": "m"}]}))
        .unwrap();
        let stored = rules.put("r", spec).is_ok();
        // What a restart loads agrees with what the client was told.
        let reopened = Rules::open(
            store.clone(),
            rules.inner.registry.clone(),
            rules.inner.log.clone(),
        )
        .unwrap();
        assert_eq!(
            reopened.get("r").is_ok(),
            stored,
            "put answered ok={stored}"
        );
        assert_eq!(rules.get("r").is_ok(), stored);
    }
}
