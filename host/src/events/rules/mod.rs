//! Rules: declarative complex event processing over the event log.
//!
//! Four kinds, each a JSON document (`PUT /v1/rules/{name}`), each in its own file with its
//! own state: [`threshold`] (a property crosses a bound; rising edge, hysteresis, cooldown),
//! [`window`] (count/sum/avg/min/max over tumbling or sliding event-time windows, by twin or
//! parent), [`sequence`] ("A then B within T", on one twin, under one parent or along a
//! relationship) and [`correlation`] (at least `min_count` twins under one parent within a
//! window). [`spec`] holds the documents and their checks, [`actions`] what a firing does.
//!
//! Event time is the update's timestamp. Windows close on a watermark (the newest event time
//! seen minus `lateness`), so out-of-order updates within the lateness bound land in their
//! own window; later ones are counted as `late` and dropped. Sequences match pairs in either
//! arrival order. Every rule's state is bounded (`max_groups`, [`MAX_PENDING`]) and shrinks
//! again: expired partial matches, cooled-down twins and deleted twins leave it. What a bound
//! turns away is counted, never silently lost.
//!
//! Owns: the [`RuleSet`] (pure evaluation: events in, firings out, so tests feed synthetic
//! streams with known answers) and [`Rules`], the node's service that persists rules, shards
//! them over cores, follows the live log and carries out the firings.
//! Exposes: [`Rules`], [`RuleSet`], the spec types, [`Firing`], [`RuleStats`], [`shard_of`].
//! Must never: change twins except through the registry's write path, store a rule it then
//! refuses, or hold unbounded state.

mod actions;
mod correlation;
mod sequence;
mod spec;
mod threshold;
mod window;

#[cfg(test)]
mod testing;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

pub use actions::{Action, Invoker, Target, MAX_ACTIONS};
pub use spec::{
    parse, validate, Agg, Condition, CorrelationRule, GroupBy, Op, RuleSpec, SequenceRule,
    ThresholdRule, WindowRule,
};

use super::log::{Event, EventLog, EventType};
use super::subscribe::{Filter, Follower, Wake};
use crate::registry::{check_name, Registry};
use crate::store::{keys, Store, StoreError};
use crate::types::{TwinId, MAX_CHAIN_DEPTH};
use correlation::Correlation;
use sequence::Sequence;
use spec::Scope;
use threshold::Threshold;
use window::Window;

/// Most rules one node holds.
pub const MAX_RULES: usize = 1000;
/// Default (and largest allowed) number of groups (twins or parents) one rule tracks.
pub const DEFAULT_MAX_GROUPS: usize = 100_000;
/// Most pending partial matches one sequence rule holds on each side ("first"s waiting for
/// a "then", and "then"s waiting for an earlier "first").
pub const MAX_PENDING: usize = 100_000;
/// Most open windows per group (size / slide + lateness / slide).
pub const MAX_WINDOWS_PER_GROUP: u64 = 1000;
/// Longest window, sequence span or lateness.
pub const MAX_SPAN: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most relationship targets one sequence match is kept for.
pub const MAX_RELATED: usize = 64;

type Map<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

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

pub(super) fn ts_of(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us).single().unwrap_or_default()
}

/// What every kind's `eval` is told about the event at hand.
pub(super) struct Ctx<'a> {
    /// The rule's name (for firings).
    rule: &'a str,
    e: &'a Event,
    /// The event's twin.
    twin: TwinId,
    /// The event's time (µs).
    ts: i64,
    /// How many automatic changes led to the event.
    depth: u8,
    /// Targets of a twin's relationships of a name.
    related: &'a dyn Fn(TwinId, &str) -> Vec<TwinId>,
}

impl Ctx<'_> {
    /// The numeric value the event sets `property` to, if it does.
    fn number(&self, property: &str) -> Option<f64> {
        self.e.changed.get(property).and_then(Value::as_f64)
    }

    /// A firing on the event's twin at the event's time.
    fn firing(&self, details: Value) -> Firing {
        Firing {
            rule: self.rule.to_owned(),
            twin_id: self.twin,
            entity_type: self.e.entity_type.clone(),
            parent_id: self.e.parent_id,
            ts: self.e.ts,
            trigger_seq: self.e.seq,
            details,
            depth: self.depth,
        }
    }
}

/// A compiled rule: each variant carries its spec, its bounds and its state.
pub(crate) enum Kind {
    Threshold(Threshold),
    Window(Window),
    Sequence(Sequence),
    Correlation(Correlation),
}

impl Kind {
    fn eval(&mut self, cx: &Ctx, stats: &mut RuleStats, out: &mut Vec<Firing>) {
        match self {
            Kind::Threshold(k) => k.eval(cx, stats, out),
            Kind::Window(k) => k.eval(cx, stats, out),
            Kind::Sequence(k) => k.eval(cx, stats, out),
            Kind::Correlation(k) => k.eval(cx, stats, out),
        }
    }

    /// Drop what the rule holds about a deleted twin.
    fn forget(&mut self, twin: TwinId, parent: Option<TwinId>) {
        match self {
            Kind::Threshold(k) => k.forget(twin),
            Kind::Window(k) => k.forget(twin),
            Kind::Sequence(k) => k.forget(twin),
            Kind::Correlation(k) => k.forget(twin, parent),
        }
    }

    fn scope(&self) -> Scope<'_> {
        let (entity_type, twin_id) = match self {
            Kind::Threshold(k) => (&k.spec.entity_type, k.spec.twin_id),
            Kind::Window(k) => (&k.spec.entity_type, k.spec.twin_id),
            Kind::Sequence(k) => (&k.spec.entity_type, k.spec.twin_id),
            Kind::Correlation(k) => (&k.spec.entity_type, None),
        };
        Scope {
            entity_type: entity_type.as_deref(),
            twin_id,
        }
    }

    /// Properties whose changes the rule looks at.
    fn properties(&self) -> Vec<&str> {
        match self {
            Kind::Threshold(k) => vec![&k.spec.property],
            Kind::Window(k) => vec![&k.spec.property],
            Kind::Sequence(k) if k.spec.then.property != k.spec.first.property => {
                vec![&k.spec.first.property, &k.spec.then.property]
            }
            Kind::Sequence(k) => vec![&k.spec.first.property],
            Kind::Correlation(k) => vec![&k.spec.condition.property],
        }
    }
}

struct Rule {
    name: String,
    kind: Kind,
    stats: RuleStats,
}

impl Rule {
    /// Whether the event is one this rule looks at (beyond its properties).
    fn watches(&self, e: &Event, twin: TwinId) -> bool {
        // A rule does not react to its own changes.
        if e.cause
            .as_ref()
            .is_some_and(|c| c.by.strip_prefix("rule:") == Some(&self.name))
        {
            return false;
        }
        let scope = self.kind.scope();
        scope.twin_id.is_none_or(|t| t == twin)
            && scope
                .entity_type
                .is_none_or(|et| e.entity_type.as_deref() == Some(et))
    }
}

/// Targets of a twin's relationships of a name (for sequences correlated by relationship).
pub type Related = Arc<dyn Fn(TwinId, &str) -> Vec<TwinId> + Send + Sync>;

/// A set of rules and their state: events in, firings out. Deterministic.
#[derive(Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// property → indexes of the rules that look at it.
    by_property: Map<String, Vec<usize>>,
    /// The relationship lookup for sequences correlated by relationship.
    related: Option<Related>,
}

impl RuleSet {
    /// Add or replace a rule (its state starts empty).
    pub fn put(
        &mut self,
        name: &str,
        spec: RuleSpec,
        modules: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), Vec<String>> {
        let kind = spec::compile(spec, modules)?;
        self.insert(name, kind);
        Ok(())
    }

    /// Add or replace a compiled rule (cannot fail: checking is done).
    fn insert(&mut self, name: &str, kind: Kind) {
        self.rules.retain(|r| r.name != name);
        self.rules.push(Rule {
            name: name.to_owned(),
            kind,
            stats: RuleStats::default(),
        });
        self.reindex();
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
            for p in r.kind.properties() {
                self.by_property.entry(p.to_owned()).or_default().push(i);
            }
        }
    }

    /// Evaluate one event; append what fired to `out`. A deletion reaches every rule,
    /// whatever it watches, so none keeps state for a twin that is gone.
    pub fn on_event(&mut self, e: &Event, out: &mut Vec<Firing>) {
        let Some(twin) = e.twin_id else { return };
        match e.kind {
            EventType::TwinDeleted => {
                for r in &mut self.rules {
                    r.kind.forget(twin, e.parent_id);
                }
            }
            EventType::TwinUpdated | EventType::TwinCreated => self.evaluate(e, twin, out),
            _ => {}
        }
    }

    fn evaluate(&mut self, e: &Event, twin: TwinId, out: &mut Vec<Firing>) {
        let depth = e.cause.as_ref().map_or(0, |c| c.depth);
        if depth >= MAX_CHAIN_DEPTH {
            return;
        }
        let related = |src: TwinId, name: &str| match &self.related {
            Some(f) => f(src, name),
            None => Vec::new(),
        };
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
                if !rule.watches(e, twin) {
                    continue;
                }
                let cx = Ctx {
                    rule: &rule.name,
                    e,
                    twin,
                    ts: e.ts_micros(),
                    depth,
                    related: &related,
                };
                rule.kind.eval(&cx, &mut rule.stats, out);
            }
        }
    }
}

/// The shard a rule lives in (stable for a name).
pub fn shard_of(name: &str, shards: usize) -> usize {
    use std::hash::BuildHasher;
    (rustc_hash::FxBuildHasher.hash_one(name) % shards.max(1) as u64) as usize
}

// ---- the live engine ------------------------------------------------------------------------

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

/// Failed actions of one rule (cleared when the rule is replaced).
#[derive(Default)]
struct Failures {
    count: u64,
    newest: String,
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
    /// The stored rules as written, for the API and for carrying out firings.
    specs: RwLock<BTreeMap<String, RuleSpec>>,
    /// Serializes `put` and `delete`, so the store and memory agree on the last writer of a
    /// name and [`MAX_RULES`] is checked against a count nobody changes meanwhile.
    writing: Mutex<()>,
    invoker: OnceLock<Arc<dyn Invoker>>,
    /// Events the engine missed because it fell behind the log.
    missed: AtomicU64,
    failures: Mutex<HashMap<String, Failures>>,
}

/// The node's rules, evaluated on the live event log. Cheap to clone.
#[derive(Clone)]
pub struct Rules {
    inner: Arc<Inner>,
}

/// The registry's relationship lookup, for sequences correlated by relationship.
fn related_in(registry: &Registry) -> Related {
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
}

/// Read the stored rules into `sets`; a rule that no longer reads or checks is skipped.
fn load(store: &Store, sets: &mut [RuleSet]) -> Result<BTreeMap<String, RuleSpec>, StoreError> {
    let mut specs = BTreeMap::new();
    for kv in store.scan_prefix(&[keys::RULE]) {
        let (k, v) = kv?;
        let name = String::from_utf8_lossy(&k[1..]).into_owned();
        let spec = match serde_json::from_slice::<RuleSpec>(&v) {
            Ok(spec) => spec,
            Err(e) => {
                tracing::error!(rule = %name, error = %e, "unreadable rule; skipped");
                continue;
            }
        };
        // Modules are checked at PUT; a module deleted since fails at run time.
        let set = &mut sets[shard_of(&name, sets.len())];
        match set.put(&name, spec.clone(), &|_| Some("compute".into())) {
            Ok(()) => {
                specs.insert(name, spec);
            }
            Err(e) => {
                tracing::error!(rule = %name, errors = ?e, "stored rule no longer valid; skipped")
            }
        }
    }
    Ok(specs)
}

impl Rules {
    /// Load the stored rules and start evaluating (on the current tokio runtime).
    pub fn open(store: Store, registry: Registry, log: EventLog) -> Result<Rules, StoreError> {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let related = related_in(&registry);
        let mut sets: Vec<RuleSet> = (0..n)
            .map(|_| {
                let mut set = RuleSet::default();
                set.set_related(related.clone());
                set
            })
            .collect();
        let specs = load(&store, &mut sets)?;
        let rules = Rules {
            inner: Arc::new(Inner {
                store,
                registry,
                log,
                wake: (0..n).map(|_| Wake::default()).collect(),
                shards: sets.into_iter().map(Mutex::new).collect(),
                specs: RwLock::new(specs),
                writing: Mutex::new(()),
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

    /// Create or replace a rule (its state restarts). Returns true when it is new. Every
    /// check runs before anything is written: a refused rule is neither stored nor loaded.
    pub fn put(&self, name: &str, spec: RuleSpec) -> Result<bool, RuleError> {
        check_name("rule name", name).map_err(|e| RuleError::Invalid(vec![e.to_string()]))?;
        let _writing = self.inner.writing.lock();
        let fresh = !self.inner.specs.read().contains_key(name);
        if fresh && self.inner.specs.read().len() >= MAX_RULES {
            return Err(RuleError::Invalid(vec![format!(
                "a node holds at most {MAX_RULES} rules"
            )]));
        }
        // Compiled once: what is stored is exactly what was checked.
        let kind =
            spec::compile(spec.clone(), &|m| self.module_world(m)).map_err(RuleError::Invalid)?;
        self.persist(name, Some(&spec))?;
        self.shard(name).lock().insert(name, kind);
        self.inner.wake[shard_of(name, self.inner.shards.len())].wake(&self.inner.log);
        self.inner.failures.lock().remove(name);
        self.inner.specs.write().insert(name.to_owned(), spec);
        Ok(fresh)
    }

    pub fn delete(&self, name: &str) -> Result<(), RuleError> {
        let _writing = self.inner.writing.lock();
        if !self.inner.specs.read().contains_key(name) {
            return Err(RuleError::NotFound(name.to_owned()));
        }
        // Gone from the store first: a failure leaves the rule running and stored, not
        // running now and back after a restart.
        self.persist(name, None)?;
        self.inner.specs.write().remove(name);
        self.shard(name).lock().remove(name);
        self.inner.failures.lock().remove(name);
        Ok(())
    }

    /// Make a rule durable (`Some`) or remove it (`None`). The one place rules are written;
    /// called with no shard lock held.
    fn persist(&self, name: &str, spec: Option<&RuleSpec>) -> Result<(), StoreError> {
        let key = keys::rule(name);
        match spec {
            Some(spec) => {
                let bytes = serde_json::to_vec(spec).expect("rules serialize");
                self.inner.store.put_durable(&key, &bytes)
            }
            None => {
                self.inner.store.remove_keys([sled::IVec::from(key)])?;
                self.inner.store.flush()
            }
        }
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
    /// Deletions are followed too, whatever the rules watch, so they can drop the twin.
    async fn run(self, shard: usize) {
        let filter = Filter {
            types: EventType::TwinCreated.bit()
                | EventType::TwinUpdated.bit()
                | EventType::TwinDeleted.bit(),
            ..Filter::default()
        };
        let mut fired = Vec::new();
        let inner = &self.inner;
        let has_rules = || !inner.shards[shard].lock().is_empty();
        let who = Follower {
            name: "rules",
            wake: &inner.wake[shard],
            missed: &inner.missed,
        };
        let on_event = |e: Arc<Event>| {
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
        };
        inner
            .log
            .follow(&inner.registry, &filter, who, has_rules, on_event)
            .await;
    }

    /// Count a failed action of `rule`.
    fn failed(&self, rule: &str, message: String) {
        let mut failures = self.inner.failures.lock();
        let f = failures.entry(rule.to_owned()).or_default();
        f.count += 1;
        f.newest = message;
    }

    /// A rule's counters, with its failed actions.
    fn stats_of(&self, name: &str) -> RuleStats {
        let mut stats = self.shard(name).lock().stats(name).unwrap_or_default();
        if let Some(f) = self.inner.failures.lock().get(name) {
            stats.errors = f.count;
            stats.last_error = Some(f.newest.clone());
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use serde_json::json;

    use super::testing::*;
    use super::*;
    use crate::types::Cause;

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
    fn rules_forget_deleted_twins() {
        // The rule watches machines; a deletion reaches it whatever the event's type says.
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
            let mut gone = deleted(n as u64 + twin as u64, twin, 2.0);
            gone.entity_type = None;
            set.on_event(&gone, &mut out);
        }
        let out = feed(&mut set, &[ev(3 * n as u64, n + 1, None, 3.0, "t", 20.0)]);
        assert_eq!(out.len(), 1, "{:?}", set.stats("hot"));
        assert_eq!(set.stats("hot").unwrap().overflow, 0);
    }

    /// An invoker whose module answers as compute once and then is gone, as when the module
    /// is deleted while a rule using it is being stored.
    struct Vanishing(AtomicBool);

    impl Invoker for Vanishing {
        fn world_of(&self, _name: &str) -> Option<String> {
            (!self.0.swap(true, Ordering::SeqCst)).then(|| "compute".into())
        }
        fn invoke(&self, _: &str, _: TwinId, _: &Value) -> Result<Value, String> {
            Err("not in this test".into())
        }
    }

    /// Rules on `store`, with what the live engine needs.
    fn open_rules(store: &Store) -> Rules {
        let registry = Registry::open(store, "test").unwrap();
        let log = EventLog::open(store.clone(), &registry, "test", Default::default()).unwrap();
        Rules::open(store.clone(), registry, log).unwrap()
    }

    /// The rules a restart would load from the same store.
    fn reopened(rules: &Rules) -> Rules {
        let i = &rules.inner;
        Rules::open(i.store.clone(), i.registry.clone(), i.log.clone()).unwrap()
    }

    fn invoking(module: &str) -> RuleSpec {
        serde_json::from_value(json!({"kind": "threshold", "property": "t", "op": ">",
            "value": 1, "actions": [{"type": "invoke", "module": module}]}))
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_refused_put_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rules = open_rules(&store);
        rules.set_invoker(Arc::new(Vanishing(AtomicBool::new(false))));
        let stored = rules.put("r", invoking("m")).is_ok();
        // What a restart loads agrees with what the client was told.
        assert_eq!(
            reopened(&rules).get("r").is_ok(),
            stored,
            "put answered ok={stored}"
        );
        assert_eq!(rules.get("r").is_ok(), stored);
        // A module that is not there: refused, and not there after a restart either.
        let err = rules.put("r2", invoking("gone")).unwrap_err();
        assert!(err.to_string().contains("not uploaded"), "{err}");
        assert!(reopened(&rules).get("r2").is_err());
    }
}
