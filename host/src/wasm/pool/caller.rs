//! Who asks the compute pool for a slot ([`Caller`], its [`Class`]), how long each waits
//! ([`Caller::patience`]), why one gets none ([`Busy`]) and how big the pool is
//! ([`PoolConfig`]).

use std::time::Duration;

use serde::Serialize;

/// Calls one caller key may have waiting; more are refused as busy at once. Large enough
/// for a burst of invoke requests, small enough that a flood is refused rather than queued
/// for minutes.
pub const DEFAULT_QUEUE_PER_CALLER: usize = 256;
/// How long an HTTP invoke waits for a slot before it is answered 429.
pub const INVOKE_PATIENCE: Duration = Duration::from_secs(2);
/// How long a rule's `invoke` action waits for a slot before it fails as busy (counted on
/// the rule, reported in its alert).
pub const RULE_PATIENCE: Duration = Duration::from_secs(5);
/// How long a resolver call waits; a busy one leaves the conflict listed with the lww
/// winner showing, as any resolver failure does.
pub const RESOLVER_PATIENCE: Duration = Duration::from_secs(30);

/// The histogram of waits for a slot, in seconds, labelled by `class`.
pub const WAIT_METRIC: &str = "twinhost_compute_wait_seconds";
/// Its buckets: from a free slot (well under a millisecond) to the longest patience.
pub const WAIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// Who asks for a slot: the key of its queue, and its class (for metrics and patience).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Caller {
    /// `POST /v1/modules/{name}/invoke`; every request shares one queue.
    Invoke,
    /// A behavior, by its binding's name.
    Behavior(String),
    /// A rule's `invoke` action, by the rule's name.
    Rule(String),
    /// The `merge` conflict strategy's resolver calls.
    Resolver,
    /// A workflow run's compute steps, by the run's id.
    Workflow(String),
    /// A behavior's periodic ticks (`"every"`), by the binding's name: a tick takes a free
    /// slot or is skipped, never queued.
    Tick(String),
}

/// The kinds of callers, for metrics and limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Invoke,
    Behavior,
    Rule,
    Resolver,
    Workflow,
    Tick,
}

impl Class {
    pub const ALL: [Class; 6] = [
        Class::Invoke,
        Class::Behavior,
        Class::Rule,
        Class::Resolver,
        Class::Workflow,
        Class::Tick,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Invoke => "invoke",
            Class::Behavior => "behavior",
            Class::Rule => "rule",
            Class::Resolver => "resolver",
            Class::Workflow => "workflow",
            Class::Tick => "tick",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

impl Caller {
    pub fn class(&self) -> Class {
        match self {
            Caller::Invoke => Class::Invoke,
            Caller::Behavior(_) => Class::Behavior,
            Caller::Rule(_) => Class::Rule,
            Caller::Resolver => Class::Resolver,
            Caller::Workflow(_) => Class::Workflow,
            Caller::Tick(_) => Class::Tick,
        }
    }

    /// The key of the caller's queue: `invoke`, `behavior:<name>`, `rule:<name>`, `resolver`,
    /// `workflow:<run>`, `tick:<name>`.
    pub fn key(&self) -> String {
        match self {
            Caller::Invoke => "invoke".into(),
            Caller::Behavior(n) => format!("behavior:{n}"),
            Caller::Rule(n) => format!("rule:{n}"),
            Caller::Resolver => "resolver".into(),
            Caller::Workflow(run) => format!("workflow:{run}"),
            Caller::Tick(n) => format!("tick:{n}"),
        }
    }

    /// How long a call of this caller waits for a slot before it is told busy. `None`:
    /// as long as it takes — a behavior's lanes wait, its own bounded event queue fills and
    /// then drops events (counted as `dropped`), which is the behavior's backpressure.
    pub fn patience(&self) -> Option<Duration> {
        match self {
            Caller::Invoke => Some(INVOKE_PATIENCE),
            Caller::Behavior(_) => None,
            Caller::Rule(_) => Some(RULE_PATIENCE),
            Caller::Resolver => Some(RESOLVER_PATIENCE),
            // Bounded by the step's own timeout.
            Caller::Workflow(_) => None,
            // Skipped (and counted) when no slot is free: the next tick comes soon enough.
            Caller::Tick(_) => Some(Duration::ZERO),
        }
    }
}

/// Why a caller got no slot. Never a guest failure: the call did not run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    /// The caller's queue already holds `bound` waiting calls.
    #[error("the compute pool's queue for {key} is full ({bound} calls waiting)")]
    QueueFull { key: String, bound: usize },
    /// No slot freed up within the caller's patience.
    #[error("no compute slot freed up within {} ms", .waited.as_millis())]
    NoSlot { waited: Duration },
    /// The server is stopping.
    #[error("the compute pool is stopped (the server is stopping)")]
    Stopped,
    /// wasmtime's instance pool refused the instantiation (a component that needs more
    /// memories, tables or core instances than a slot's share).
    #[error("the instance pool is exhausted: {0}")]
    Instances(String),
}

impl Busy {
    /// The `reason` label of `twinhost_compute_busy_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Busy::QueueFull { .. } => "queue_full",
            Busy::NoSlot { .. } => "no_slot",
            Busy::Stopped => "stopped",
            Busy::Instances(_) => "instances",
        }
    }
}

/// How big the pool is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Guest calls at once (`--compute-slots`); `None`: one per core. Capped by the
    /// instance pool's capacity.
    pub slots: Option<usize>,
    /// Calls one caller key may have waiting.
    pub queue_per_caller: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            slots: None,
            queue_per_caller: DEFAULT_QUEUE_PER_CALLER,
        }
    }
}

impl PoolConfig {
    /// The pool's size on a host whose instance pool holds `capacity` instances.
    pub fn size(&self, capacity: usize) -> usize {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        self.slots.unwrap_or(cores).clamp(1, capacity.max(1))
    }
}
