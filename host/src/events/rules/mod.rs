//! Rules: declarative complex event processing over the event log.
//!
//! Four kinds, each a JSON document (`PUT /v1/rules/{name}`), each in its own file with its
//! own state: [`threshold`] (a property crosses a bound; rising edge, hysteresis, cooldown),
//! [`window`] (count/sum/avg/min/max over tumbling or sliding event-time windows, by twin or
//! parent), [`sequence`] ("A then B within T", on one twin, under one parent or along a
//! relationship) and [`correlation`] (at least `min_count` twins under one parent within a
//! window). [`spec`] holds the documents and their checks, [`actions`] what a firing does,
//! `kind` the compiled rule that ties a kind's spec to its state.
//!
//! On synced nodes a rule evaluates only the changes made on its own node unless its spec
//! says `"on": "all"` ([`ReactTo`](crate::types::ReactTo)): a rule set up on every node fires
//! once per reading. Deletions reach every rule whatever their origin (they only drop state).
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
mod kind;
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
use utoipa::ToSchema;

pub use actions::{Action, InvokeFuture, Invoker, Starter, Target, MAX_ACTIONS};
pub use spec::{
    parse, validate, Agg, Condition, CorrelationRule, GroupBy, Op, RuleSpec, SequenceRule,
    ThresholdRule, WindowRule,
};

use super::log::{Event, EventLog, EventType};
use super::subscribe::{Filter, Follower, Wake};
use crate::registry::{check_name, Registry};
use crate::store::{keys, KvOp, Store, StoreError};
use crate::types::{TwinId, World, MAX_CHAIN_DEPTH};
use kind::{Ctx, Kind, Rule};
pub use kind::{Firing, RuleStats};

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

pub(super) fn ts_of(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us).single().unwrap_or_default()
}

/// Targets of a twin's relationships of a name (for sequences correlated by relationship).
pub type Related = Arc<dyn Fn(TwinId, &str) -> Vec<TwinId> + Send + Sync>;

/// A set of rules and their state: events in, firings out. Deterministic.
#[derive(Default)]
pub struct RuleSet {
    /// In insertion order; `by_property` holds indexes into it.
    rules: Vec<Rule>,
    /// property → indexes of the rules that look at it.
    by_property: Map<String, Vec<usize>>,
    /// The relationship lookup for sequences correlated by relationship.
    related: Option<Related>,
    /// This node's id: events of another origin reach only the rules that ask for all.
    /// `None` (tests, the bench): every event counts as local.
    node_id: Option<Arc<str>>,
}

impl RuleSet {
    /// Add or replace a rule (its state starts empty).
    pub fn put(
        &mut self,
        name: &str,
        spec: RuleSpec,
        modules: &dyn Fn(&str) -> Option<World>,
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

    /// Name the node the rules run on: events whose change was made elsewhere reach only the
    /// rules that say `"on": "all"`.
    pub fn set_node_id(&mut self, node_id: &str) {
        self.node_id = Some(Arc::from(node_id));
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
        let local = self.node_id.as_deref().is_none_or(|n| e.is_local(n));
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
                if !rule.watches(e, twin, local) {
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
    /// The name in `/v1/rules/{name}`.
    pub name: String,
    /// The rule as stored.
    pub spec: RuleSpec,
    /// Counters since the rule was last put (or the node started).
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
    /// Failed actions.
    count: u64,
    /// The newest failure's message.
    newest: String,
}

struct Inner {
    /// Where rules persist (see `Rules::persist`).
    store: Store,
    /// The write path for patch actions and the relationship lookup.
    registry: Registry,
    /// What the shards follow, and where alerts are raised.
    log: EventLog,
    /// Rules are independent, so they are spread over shards evaluated in parallel (one per
    /// core); every shard sees every event.
    shards: Vec<Mutex<RuleSet>>,
    /// Wakes a shard's task when it gets a rule (an empty shard does not follow the log).
    wake: Vec<Wake>,
    /// The stored rules as written, for the API and for carrying out firings.
    specs: RwLock<BTreeMap<String, RuleSpec>>,
    /// Runs `invoke` actions and answers module worlds; installed once the runtime is up.
    invoker: OnceLock<Arc<dyn Invoker>>,
    starter: OnceLock<Arc<dyn Starter>>,
    /// Events the engine missed because it fell behind the log.
    missed: AtomicU64,
    /// Failed actions by rule; actions fail off the shard's lock, so they are kept here.
    failures: Mutex<HashMap<String, Failures>>,
}

/// The node's rules, evaluated on the live event log. Cheap to clone.
#[derive(Clone)]
pub struct Rules {
    /// Shared by clones, the shard tasks and the action tasks.
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
        match set.put(&name, spec.clone(), &|_| Some(World::Compute)) {
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
                set.set_node_id(registry.node_id());
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
                invoker: OnceLock::new(),
                starter: OnceLock::new(),
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

    /// Install what starts `workflow` actions' runs.
    pub fn set_starter(&self, starter: Arc<dyn Starter>) {
        let _ = self.inner.starter.set(starter);
    }

    /// Install what runs `invoke` actions.
    pub fn set_invoker(&self, invoker: Arc<dyn Invoker>) {
        let _ = self.inner.invoker.set(invoker);
    }

    fn module_world(&self, name: &str) -> Option<World> {
        self.inner.invoker.get().and_then(|i| i.world_of(name))
    }

    /// Create or replace a rule (its state restarts). Returns true when it is new. Every
    /// check runs before anything is written: a refused rule is neither stored nor loaded.
    ///
    /// # Errors
    /// [`RuleError::Invalid`] with every reason the rule is refused; the store's errors.
    pub async fn put(&self, name: &str, spec: RuleSpec) -> Result<bool, RuleError> {
        check_name("rule name", name).map_err(|e| RuleError::Invalid(vec![e.to_string()]))?;
        // Held from the checks to the install: the rule count, the stored copy and the
        // modules it invokes (a module delete takes the same lock) cannot change meanwhile.
        let _config = self.inner.store.lock_config().await;
        let fresh = !self.inner.specs.read().contains_key(name);
        if fresh && self.inner.specs.read().len() >= MAX_RULES {
            return Err(RuleError::Invalid(vec![format!(
                "a node holds at most {MAX_RULES} rules"
            )]));
        }
        // Compiled once: what is stored is exactly what was checked.
        let kind =
            spec::compile(spec.clone(), &|m| self.module_world(m)).map_err(RuleError::Invalid)?;
        self.persist(name, Some(&spec)).await?;
        self.shard(name).lock().insert(name, kind);
        self.inner.wake[shard_of(name, self.inner.shards.len())].wake(&self.inner.log);
        self.inner.failures.lock().remove(name);
        self.inner.specs.write().insert(name.to_owned(), spec);
        Ok(fresh)
    }

    /// Delete a rule and its state.
    ///
    /// # Errors
    /// [`RuleError::NotFound`]; the store's errors.
    pub async fn delete(&self, name: &str) -> Result<(), RuleError> {
        let _config = self.inner.store.lock_config().await;
        if !self.inner.specs.read().contains_key(name) {
            return Err(RuleError::NotFound(name.to_owned()));
        }
        // Gone from the store first: a failure leaves the rule running and stored, not
        // running now and back after a restart.
        self.persist(name, None).await?;
        self.inner.specs.write().remove(name);
        self.shard(name).lock().remove(name);
        self.inner.failures.lock().remove(name);
        Ok(())
    }

    /// Make a rule durable (`Some`) or remove it (`None`) through the store's commit
    /// queue. The one place rules are written; called with no shard lock held.
    async fn persist(&self, name: &str, spec: Option<&RuleSpec>) -> Result<(), StoreError> {
        let key = keys::rule(name);
        let op = match spec {
            Some(spec) => KvOp::Put(key, serde_json::to_vec(spec).expect("rules serialize")),
            None => KvOp::Delete(key),
        };
        self.inner.store.write(vec![op]).await
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
mod tests;
