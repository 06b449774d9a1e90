//! Plain types shared by every layer: twin ids, the twin record, lifecycle and clocks.
//!
//! These are the shapes API.md fixes (`id`, `entity_type`, `properties`, `version`, `vclock`,
//! `parent_id`, `children_ids`, `lifecycle`, `created_at`, `updated_at`). They carry no
//! behaviour beyond small helpers, so every subsystem can depend on them.

pub mod compact;
pub mod intern;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Who made a change when it was not a client: a behavior or a rule, and how many such
/// automatic steps led to it. Guards against behaviors re-triggering themselves without end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Cause {
    /// `behavior:<name>` or `rule:<name>` on the wire.
    #[schema(value_type = String, example = "rule:overheat")]
    pub by: Actor,
    /// 1 for a change made in response to a client's change, 2 for one made in response to
    /// that, and so on (at most [`MAX_CHAIN_DEPTH`]).
    pub depth: u8,
}

/// What makes automatic changes. Written `behavior:<name>` / `rule:<name>` in events and the
/// log (the [`std::fmt::Display`] and [`std::str::FromStr`] forms).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Actor {
    Behavior(String),
    Rule(String),
}

impl Actor {
    /// The rule's name, when a rule made the change.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Actor::Rule(n) => Some(n),
            Actor::Behavior(_) => None,
        }
    }

    /// The behavior's name, when a behavior made the change.
    pub fn behavior(&self) -> Option<&str> {
        match self {
            Actor::Behavior(n) => Some(n),
            Actor::Rule(_) => None,
        }
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Behavior(n) => write!(f, "behavior:{n}"),
            Actor::Rule(n) => write!(f, "rule:{n}"),
        }
    }
}

impl std::str::FromStr for Actor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("behavior", n)) => Ok(Actor::Behavior(n.to_owned())),
            Some(("rule", n)) => Ok(Actor::Rule(n.to_owned())),
            _ => Err(format!(
                "{s:?} names no actor (`behavior:<name>` or `rule:<name>`)"
            )),
        }
    }
}

impl From<Actor> for String {
    fn from(a: Actor) -> String {
        a.to_string()
    }
}

impl TryFrom<String> for Actor {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Longest chain of automatic changes (a behavior's or rule's patch triggering more of them)
/// that behaviors and rules still react to. Past it, a loop of automatic changes stops
/// instead of running forever; a client change starts a chain at depth 0.
pub const MAX_CHAIN_DEPTH: u8 = 8;

/// Which changes a behavior or rule reacts to, by the node they were made on (`"on"` in a
/// binding or a rule). Changes merged from other nodes are stored, evented and streamed to
/// subscribers either way; only the reactions are filtered. A value it does not know is
/// refused naming the field and both values (serde's own message would not say which field).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum ReactTo {
    /// Only changes made on this node (the default): a behavior or rule set up on every node
    /// of a synced group acts once per change, on the node where the change was made.
    #[default]
    Local,
    /// Changes made on this node and those merged from other nodes.
    All,
}

impl ReactTo {
    /// Every value, as written in bindings and rules (for error messages).
    pub const ALL: [ReactTo; 2] = [ReactTo::Local, ReactTo::All];

    /// The name as written in bindings and rules.
    pub fn as_str(self) -> &'static str {
        match self {
            ReactTo::Local => "local",
            ReactTo::All => "all",
        }
    }

    /// Whether a change of local origin (`local`) or from another node is reacted to.
    pub fn admits(self, local: bool) -> bool {
        local || self == ReactTo::All
    }
}

impl TryFrom<String> for ReactTo {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        ReactTo::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "on: {s:?} is neither \"local\" (react to changes made on this node) nor \"all\" (also to changes merged from other nodes)"
                )
            })
    }
}

/// How urgent an alert is. Rule actions carry one; alert events show it as a string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// For the record: a compute result, a routine condition.
    Info,
    /// Needs a look (the default for rule alerts).
    #[default]
    Warning,
    /// Needs action now.
    Critical,
}

impl Severity {
    /// Every severity, in rising order (for error messages).
    pub const ALL: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

    /// The name as written in rules and alerts.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// A property bag: JSON object of property name to value.
pub type Properties = serde_json::Map<String, serde_json::Value>;

/// Identifier of a twin. UUID v7 by default (time-ordered, so key scans follow creation order),
/// any UUID when the client supplies its own.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid)]
pub struct TwinId(pub Uuid);

impl TwinId {
    /// A fresh time-ordered id.
    pub fn new_v7() -> Self {
        TwinId(Uuid::now_v7())
    }
    /// The 16 raw bytes, as used in storage keys.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
    /// The smallest id: a cursor lower bound.
    pub const MIN: TwinId = TwinId(Uuid::nil());
}

impl fmt::Display for TwinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TwinId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(TwinId)
    }
}

/// Lifecycle state of a twin. `retired` is terminal: it refuses property updates and further
/// lifecycle changes (it can still be read and deleted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    #[default]
    Active,
    Suspended,
    Retired,
}

/// A version vector: node id → number of changes that node made to the twin.
pub type VClock = BTreeMap<String, u64>;

/// Bits of a hybrid logical clock below the physical milliseconds (the WIT's encoding:
/// `physical ms << 16 | counter`).
pub const HLC_COUNTER_BITS: u32 = 16;

/// A hybrid logical clock value for a physical time (counter 0).
pub fn hlc_at(t: DateTime<Utc>) -> u64 {
    (t.timestamp_millis().max(0) as u64) << HLC_COUNTER_BITS
}

/// A node's hybrid logical clock: every tick is above every earlier tick and every clock it
/// has seen, and follows the physical clock when that is ahead. A physical clock that jumps
/// back is ridden out on the counter (ticks stay monotonic; they catch up with real time
/// once it passes them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hlc {
    last: u64,
}

impl Hlc {
    /// A clock that ticks above `floor` (the highest clock stored).
    pub fn above(floor: u64) -> Hlc {
        Hlc { last: floor }
    }

    /// The next clock value for a local change at physical time `now_ms`.
    pub fn tick(&mut self, now_ms: i64) -> u64 {
        let physical = (now_ms.max(0) as u64) << HLC_COUNTER_BITS;
        self.last = physical.max(self.last + 1);
        self.last
    }

    /// Take in a clock seen elsewhere (a remote change): later ticks are above it.
    pub fn observe(&mut self, seen: u64) {
        self.last = self.last.max(seen);
    }

    /// The highest value handed out or observed.
    pub fn last(&self) -> u64 {
        self.last
    }
}

/// The clock of the last write of one property: its HLC and the node it was made on. Kept for
/// removed properties too (a removal is a write that a replica must be able to order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropClock {
    pub hlc: u64,
    pub origin: std::sync::Arc<str>,
    /// The write's place among its origin's changes to the twin: the origin's entry of the
    /// twin's version vector once the write was made. A replica whose version vector counts
    /// at least `n` changes by `origin` has seen the write. 0 for writes recorded before
    /// these were kept (taken as seen by every replica).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub n: u64,
    /// The twin's version where the write was made: the sum of its version vector then (how
    /// many changes to the twin that node had seen). The `version` conflict strategy orders
    /// concurrent writes by it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub v: u64,
}

impl PropClock {
    /// The order of last-writer-wins: HLC, then node id.
    pub fn lww_key(&self) -> (u64, &str) {
        (self.hlc, &self.origin)
    }

    /// Whether a replica whose version vector is `vclock` has seen this write. A write with
    /// no place recorded (`n` 0) counts as seen.
    pub fn seen_by(&self, vclock: &VClock) -> bool {
        vclock.get(&*self.origin).copied().unwrap_or(0) >= self.n
    }
}

/// Where a write sits in a twin's history, for its [`PropClock`]: `n` and `v` once the
/// writing node's change is counted in `vclock`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dot {
    pub n: u64,
    pub v: u64,
}

impl Dot {
    /// The dot of a change `node` made, read from the version vector that counts it.
    pub fn of(vclock: &VClock, node: &str) -> Dot {
        Dot {
            n: vclock.get(node).copied().unwrap_or(0),
            v: vclock.values().sum(),
        }
    }

    /// The dot of the next change `node` makes, before `vclock` counts it.
    pub fn next(vclock: &VClock, node: &str) -> Dot {
        let d = Dot::of(vclock, node);
        Dot {
            n: d.n + 1,
            v: d.v + 1,
        }
    }
}

/// One of the concurrent writes of a property a twin keeps side by side (conflict
/// strategies `merge` and `manual`): its value (`null` for a removal) and clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sibling {
    pub value: serde_json::Value,
    #[serde(flatten)]
    pub clock: PropClock,
}

/// Properties in conflict: name → every concurrent write not yet superseded, in
/// last-writer-wins order (at least two). Boxed: most twins have none.
pub type Siblings = Option<Box<BTreeMap<String, Vec<Sibling>>>>;

/// Per-property clocks of a twin: one small vector sorted by property name, the names shared
/// between twins — one allocation per twin instead of a tree node and a string per property.
/// Serialized as a JSON object of name to clock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Clocks(Vec<(std::sync::Arc<str>, PropClock)>);

/// Property names are shared through the interner (one copy of each name for all twins).
fn shared_name(name: &str) -> std::sync::Arc<str> {
    intern::shared(name)
}

impl Clocks {
    pub fn new() -> Clocks {
        Clocks(Vec::new())
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| (**n).cmp(name))
    }

    pub fn get(&self, name: &str) -> Option<&PropClock> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut PropClock> {
        self.find(name).ok().map(|i| &mut self.0[i].1)
    }

    /// Set the clock of `name`; returns the one it replaces.
    pub fn insert(&mut self, name: &str, clock: PropClock) -> Option<PropClock> {
        match self.find(name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, clock)),
            Err(i) => {
                self.0.insert(i, (shared_name(name), clock));
                None
            }
        }
    }

    /// Record a write of `names` at `hlc` from `origin`, at `dot` in the twin's history.
    pub fn stamp<'a>(
        &mut self,
        names: impl IntoIterator<Item = &'a String>,
        hlc: u64,
        origin: &std::sync::Arc<str>,
        dot: Dot,
    ) {
        for n in names {
            match self.get_mut(n) {
                Some(c) => {
                    c.hlc = hlc;
                    c.n = dot.n;
                    c.v = dot.v;
                    // Usually the very same shared string: compare pointers before bytes.
                    if !std::sync::Arc::ptr_eq(&c.origin, origin) && c.origin != *origin {
                        c.origin = origin.clone();
                    }
                }
                None => {
                    self.insert(
                        n,
                        PropClock {
                            hlc,
                            origin: origin.clone(),
                            n: dot.n,
                            v: dot.v,
                        },
                    );
                }
            }
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<PropClock> {
        self.find(name).ok().map(|i| self.0.remove(i).1)
    }

    /// `(name, clock)` in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &PropClock)> {
        self.0.iter().map(|(n, c)| (&**n, c))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| &**n)
    }

    pub fn values(&self) -> impl Iterator<Item = &PropClock> {
        self.0.iter().map(|(_, c)| c)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut PropClock> {
        self.0.iter_mut().map(|(_, c)| c)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<S: AsRef<str>, const N: usize> From<[(S, PropClock); N]> for Clocks {
    fn from(items: [(S, PropClock); N]) -> Clocks {
        let mut c = Clocks::new();
        for (n, clock) in items {
            c.insert(n.as_ref(), clock);
        }
        c
    }
}

impl std::ops::Index<&str> for Clocks {
    type Output = PropClock;
    fn index(&self, name: &str) -> &PropClock {
        self.get(name)
            .unwrap_or_else(|| panic!("no clock for property {name:?}"))
    }
}

impl Serialize for Clocks {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Clocks {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Clocks, D::Error> {
        let m = BTreeMap::<String, PropClock>::deserialize(d)?;
        Ok(Clocks(
            m.into_iter().map(|(n, c)| (shared_name(&n), c)).collect(),
        ))
    }
}

/// A twin as stored and served.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Twin {
    pub id: TwinId,
    pub entity_type: String,
    #[schema(value_type = Object)]
    pub properties: Properties,
    /// Incremented by every change; the `ETag` of the twin.
    pub version: u64,
    #[schema(value_type = Object)]
    pub vclock: VClock,
    pub parent_id: Option<TwinId>,
    /// Derived from the children's `parent_id` (never persisted, rebuilt on load).
    #[serde(default, skip_deserializing)]
    #[schema(value_type = Vec<String>)]
    pub children_ids: BTreeSet<TwinId>,
    pub lifecycle: Lifecycle,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// HLC of the twin's last change (stored, not served: `?meta=true` shows it).
    #[serde(default, skip_serializing)]
    pub hlc: u64,
    /// The node's change number of the twin's last change.
    #[serde(default, skip_serializing)]
    pub lseq: u64,
    /// Clock and origin of the last write of each property (removed ones included).
    #[serde(default, skip_serializing)]
    pub clocks: Clocks,
    /// The clock of the latest delete this twin outlived (a write made elsewhere after a
    /// delete brought it back): writes at or below it are older than the delete and ignored.
    #[serde(default, skip_serializing)]
    pub deleted_hlc: u64,
    /// Properties in conflict, with each concurrent write (stored, not served: `?meta=true`
    /// and `GET /v1/conflicts` show them).
    #[serde(default, skip_serializing)]
    pub siblings: Siblings,
}

/// The JSON record of a twin that formats 1 and 2 kept in sled and formats up to 4 wrote in
/// the log (still read; the tests make such records): the served form without the derived
/// `children_ids`, with the clocks.
#[cfg(test)]
#[derive(Serialize)]
pub(crate) struct TwinRecord<'a> {
    pub id: TwinId,
    pub entity_type: &'a str,
    pub properties: &'a Properties,
    pub version: u64,
    pub vclock: &'a VClock,
    pub parent_id: Option<TwinId>,
    pub lifecycle: Lifecycle,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub hlc: u64,
    pub lseq: u64,
    pub clocks: &'a Clocks,
    #[serde(skip_serializing_if = "is_zero")]
    pub deleted_hlc: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub siblings: &'a Siblings,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
impl Twin {
    /// Serialize the persisted fields (children are derived on load): the JSON record of
    /// the older formats ([`TwinRecord`]).
    pub(crate) fn to_record_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        self.write_record(&mut out);
        out
    }

    /// [`Twin::to_record_bytes`] appended to `out`.
    pub(crate) fn write_record(&self, out: &mut Vec<u8>) {
        let rec = TwinRecord {
            id: self.id,
            entity_type: &self.entity_type,
            properties: &self.properties,
            version: self.version,
            vclock: &self.vclock,
            parent_id: self.parent_id,
            lifecycle: self.lifecycle,
            created_at: self.created_at,
            updated_at: self.updated_at,
            hlc: self.hlc,
            lseq: self.lseq,
            clocks: &self.clocks,
            deleted_hlc: self.deleted_hlc,
            siblings: &self.siblings,
        };
        serde_json::to_writer(out, &rec).expect("a twin always serializes: keys are strings")
    }
}

/// Role carried by an API token. `read` < `write` < `admin`, each including the ones below;
/// `peer` stands apart: it may only sync (the change feed), and `admin` may do that too.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    ToSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Read,
    Write,
    Admin,
    Peer,
}

impl Role {
    /// Whether a token of this role may make a call that needs `need`.
    pub fn allows(self, need: Role) -> bool {
        match (self, need) {
            (Role::Peer, need) => need == Role::Peer,
            (Role::Admin, _) => true,
            (_, Role::Peer) => false,
            (have, need) => have >= need,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
            Role::Peer => "peer",
        })
    }
}

/// Sets its flag when dropped: tells work on other threads that its owner is gone (a client
/// that disconnected, a behavior that was deleted).
pub struct SetOnDrop(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Ticks strictly increase whatever the physical clock does (jumps back included),
        /// follow it when it is ahead, and stay above every clock observed.
        #[test]
        fn hlc_ticks_are_monotonic(
            steps in proptest::collection::vec((0i64..2_000_000_000_000, proptest::option::of(0u64..u64::MAX >> 2)), 1..200),
            floor in 0u64..u64::MAX >> 2,
        ) {
            let mut c = Hlc::above(floor);
            let mut last = floor;
            for (now_ms, seen) in steps {
                if let Some(seen) = seen {
                    c.observe(seen);
                    last = last.max(seen);
                }
                let t = c.tick(now_ms);
                prop_assert!(t > last, "tick {t} not above {last}");
                prop_assert!(t >= (now_ms as u64) << HLC_COUNTER_BITS);
                last = t;
            }
        }

        /// A clock restarted above the highest value stored never hands out a smaller one,
        /// even with the physical clock set back.
        #[test]
        fn hlc_survives_a_restart(before in proptest::collection::vec(0i64..2_000_000_000_000, 1..50), back in 0i64..1_000_000) {
            let mut c = Hlc::default();
            let mut last = 0;
            let mut latest_ms = 0;
            for ms in before {
                last = c.tick(ms);
                latest_ms = latest_ms.max(ms);
            }
            let mut again = Hlc::above(c.last());
            prop_assert!(again.tick(latest_ms - back) > last);
        }
    }
}

/// The worlds of `wit/platform.wit` a component can implement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum World {
    /// Exports `run`: invoked on twins over HTTP and by rules.
    Compute,
    /// Exports `on-event`: runs on the events of the twins it is bound to.
    Behavior,
    /// Exports `resolve`: merges two conflicting writes of a property for sync.
    Resolver,
}

impl World {
    /// Every world, in the order an upload's exports are matched against them.
    pub const ALL: [World; 3] = [World::Compute, World::Behavior, World::Resolver];

    /// The world's name in `wit/platform.wit`.
    pub fn as_str(self) -> &'static str {
        match self {
            World::Compute => "compute",
            World::Behavior => "behavior",
            World::Resolver => "resolver",
        }
    }

    /// The one function the world exports.
    pub fn export(self) -> &'static str {
        match self {
            World::Compute => "run",
            World::Behavior => "on-event",
            World::Resolver => "resolve",
        }
    }
}

impl std::fmt::Display for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
