//! Ordered indexes of the model properties marked `"indexed": true`.
//!
//! Owns: per entity type, per indexed property, ordered sets of `(value, twin id)`, one per
//! kind of value (numbers as order-preserving `u64` bits: 24 bytes an entry).
//! Exposes: [`RangeIndexes::update`] (called by the twin map on every change of a twin, while
//! it holds the twin's shard), [`RangeIndexes::plan`] (which `where` condition of a query an
//! index can answer) and [`RangeIndexes::scan`] (the next entries of a plan, in index order).
//! Must never: take a twin's shard while holding one of its own locks. The twin map calls in
//! while holding a shard; queries copy a chunk of entries out and release the lock before they
//! read twins. So the order is always shard → index, and the two cannot deadlock.
//!
//! Values order as the query's comparisons do: numbers by value (`1` and `1.0` are one key),
//! strings by their bytes. Booleans are indexed for `=` and `in`. Objects, arrays and `null`
//! are not indexed: no condition that could match them is answered from an index.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde_json::Value;
use uuid::Uuid;

use super::query::{Condition, Op, Query};
use crate::types::TwinId;

/// A number as an index key: never NaN (JSON has none), `-0` stored as `0`.
#[derive(Clone, Copy, Debug)]
pub struct Num(f64);

impl PartialEq for Num {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}
impl Eq for Num {}
impl PartialOrd for Num {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Num {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// An indexed value. The variants' order (booleans, numbers, strings) only separates them:
/// no condition spans two of them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Bool(bool),
    Num(Num),
    Str(Box<str>),
}

impl Key {
    /// The key of a value, or `None` for one that is not indexed.
    pub fn of(v: &Value) -> Option<Key> {
        match v {
            Value::Bool(b) => Some(Key::Bool(*b)),
            Value::Number(n) => n.as_f64().map(|x| Key::Num(Num(x + 0.0))),
            Value::String(s) => Some(Key::Str(s.as_str().into())),
            _ => None,
        }
    }

    fn lowest_of_kind(&self) -> Key {
        match self {
            Key::Bool(_) => Key::Bool(false),
            Key::Num(_) => Key::Num(Num(f64::NEG_INFINITY)),
            Key::Str(_) => Key::Str("".into()),
        }
    }

    /// The upper end of this key's kind (strings have none: they sort last).
    fn highest_of_kind(&self) -> Bound<Key> {
        match self {
            Key::Bool(_) => Bound::Included(Key::Bool(true)),
            Key::Num(_) => Bound::Included(Key::Num(Num(f64::INFINITY))),
            Key::Str(_) => Bound::Unbounded,
        }
    }
}

/// A position in an index: a key and the twin after which to go on.
pub type Position = (Key, TwinId);

const NIL: TwinId = TwinId(Uuid::nil());
const MAX: TwinId = TwinId(Uuid::max());

/// Prefix of a cursor that points into an index (plain cursors are twin ids).
const CURSOR_PREFIX: &str = "ix1.";

/// The cursor of a page that stopped at `p`.
pub fn cursor_of(p: &Position) -> String {
    let (kind, payload) = match &p.0 {
        Key::Bool(b) => ('b', u8::from(*b).to_string()),
        Key::Num(n) => ('n', format!("{:016x}", n.0.to_bits())),
        Key::Str(s) => ('s', hex(s.as_bytes())),
    };
    format!("{CURSOR_PREFIX}{kind}{payload}.{}", p.1 .0)
}

/// A cursor made by [`cursor_of`]; `None` for a plain (twin id) cursor; `Err` for one that
/// looks like an index cursor but is damaged.
pub fn parse_cursor(c: &str) -> Result<Option<Position>, String> {
    let Some(rest) = c.strip_prefix(CURSOR_PREFIX) else {
        return Ok(None);
    };
    let bad = || "cursor is not one this server returned".to_string();
    let (key, id) = rest.rsplit_once('.').ok_or_else(bad)?;
    let id = TwinId(id.parse().map_err(|_| bad())?);
    let mut chars = key.chars();
    let kind = chars.next().ok_or_else(bad)?;
    let payload = chars.as_str();
    let key = match kind {
        'b' => Key::Bool(payload == "1"),
        'n' => {
            let x = f64::from_bits(u64::from_str_radix(payload, 16).map_err(|_| bad())?);
            if x.is_nan() {
                return Err(bad());
            }
            Key::Num(Num(x))
        }
        's' => Key::Str(
            String::from_utf8(unhex(payload).ok_or_else(bad)?)
                .map_err(|_| bad())?
                .into(),
        ),
        _ => return Err(bad()),
    };
    Ok(Some((key, id)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A number's key as a `u64` that orders as [`Num`] does (`f64::total_cmp`): the sign bit
/// flipped for positives, every bit for negatives.
fn num_bits(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 1 {
        !b
    } else {
        b | 1 << 63
    }
}

/// The number [`num_bits`] made `u`.
fn bits_num(u: u64) -> f64 {
    f64::from_bits(if u >> 63 == 1 { u & !(1 << 63) } else { !u })
}

/// The entries of one index, a set per kind of key. A number's entry is then 24 bytes (its
/// ordered bits and the id) where a `(Key, TwinId)` took 40: 160 MB less for an index of ten
/// million twins.
#[derive(Default)]
pub struct Entries {
    bools: BTreeSet<(bool, TwinId)>,
    nums: BTreeSet<(u64, TwinId)>,
    strs: BTreeSet<(Box<str>, TwinId)>,
}

/// The kinds of key in index order, as [`Key`]'s variants order.
const BOOL: u8 = 0;
const NUM: u8 = 1;
const STR: u8 = 2;

fn kind(k: &Key) -> u8 {
    match k {
        Key::Bool(_) => BOOL,
        Key::Num(_) => NUM,
        Key::Str(_) => STR,
    }
}

/// `b`, a bound of a range over every key, as a bound within the set of `kind`: `None` when
/// no key of that kind is in the range (`lower` says which end `b` is).
fn within<T>(
    b: &Bound<Position>,
    lower: bool,
    k: u8,
    conv: impl Fn(&Key, TwinId) -> T,
) -> Option<Bound<T>> {
    let (Bound::Included(p) | Bound::Excluded(p)) = b else {
        return Some(Bound::Unbounded);
    };
    match (kind(&p.0).cmp(&k), lower) {
        (std::cmp::Ordering::Less, true) | (std::cmp::Ordering::Greater, false) => {
            Some(Bound::Unbounded)
        }
        (std::cmp::Ordering::Greater, true) | (std::cmp::Ordering::Less, false) => None,
        _ => Some(match b {
            Bound::Included(p) => Bound::Included(conv(&p.0, p.1)),
            _ => Bound::Excluded(conv(&p.0, p.1)),
        }),
    }
}

/// Push the entries of `set` within `(lo, hi)` to `out` (as positions) until it holds `n`;
/// `false` once it does.
fn push_range<T: Ord>(
    set: &BTreeSet<(T, TwinId)>,
    k: u8,
    (lo, hi): (&Bound<Position>, &Bound<Position>),
    conv: impl Fn(&Key, TwinId) -> (T, TwinId),
    back: impl Fn(&T) -> Key,
    out: &mut Vec<Position>,
    n: usize,
) -> bool {
    let (Some(lo), Some(hi)) = (within(lo, true, k, &conv), within(hi, false, k, &conv)) else {
        return true;
    };
    // `BTreeSet::range` panics on a range that ends before it starts.
    let empty = match (&lo, &hi) {
        (Bound::Included(l), Bound::Included(h)) => l > h,
        (Bound::Included(l) | Bound::Excluded(l), Bound::Included(h) | Bound::Excluded(h)) => {
            l >= h
        }
        _ => false,
    };
    if empty {
        return true;
    }
    for (t, id) in set.range((lo, hi)) {
        if out.len() == n {
            return false;
        }
        out.push((back(t), *id));
    }
    true
}

impl Entries {
    fn insert(&mut self, (k, id): Position) {
        match k {
            Key::Bool(b) => self.bools.insert((b, id)),
            Key::Num(x) => self.nums.insert((num_bits(x.0), id)),
            Key::Str(s) => self.strs.insert((s, id)),
        };
    }

    fn remove(&mut self, k: &Key, id: TwinId) {
        match k {
            Key::Bool(b) => self.bools.remove(&(*b, id)),
            Key::Num(x) => self.nums.remove(&(num_bits(x.0), id)),
            Key::Str(s) => self.strs.remove(&(s.clone(), id)),
        };
    }

    fn len(&self) -> usize {
        self.bools.len() + self.nums.len() + self.strs.len()
    }

    /// Up to `n` entries within `(lo, hi)` appended to `out`, in index order; `false` once
    /// `out` holds `n`.
    fn scan(
        &self,
        lo: &Bound<Position>,
        hi: &Bound<Position>,
        out: &mut Vec<Position>,
        n: usize,
    ) -> bool {
        push_range(
            &self.bools,
            BOOL,
            (lo, hi),
            |k, id| (matches!(k, Key::Bool(true)), id),
            |b| Key::Bool(*b),
            out,
            n,
        ) && push_range(
            &self.nums,
            NUM,
            (lo, hi),
            |k, id| {
                (
                    match k {
                        Key::Num(x) => num_bits(x.0),
                        _ => 0,
                    },
                    id,
                )
            },
            |u| Key::Num(Num(bits_num(*u))),
            out,
            n,
        ) && push_range(
            &self.strs,
            STR,
            (lo, hi),
            |k, id| {
                (
                    match k {
                        Key::Str(s) => s.clone(),
                        _ => Box::from(""),
                    },
                    id,
                )
            },
            |s| Key::Str(s.clone()),
            out,
            n,
        )
    }
}

/// Entries gathered for a new index at open, by kind, to be sorted once.
#[derive(Default)]
pub struct Gathered {
    bools: Vec<(bool, TwinId)>,
    nums: Vec<(u64, TwinId)>,
    strs: Vec<(Box<str>, TwinId)>,
}

impl Gathered {
    /// Room for `n` numbers (the usual kind of an indexed property).
    pub fn with_capacity(n: usize) -> Gathered {
        Gathered {
            nums: Vec::with_capacity(n),
            ..Default::default()
        }
    }

    pub fn push(&mut self, (k, id): Position) {
        match k {
            Key::Bool(b) => self.bools.push((b, id)),
            Key::Num(x) => self.nums.push((num_bits(x.0), id)),
            Key::Str(s) => self.strs.push((s, id)),
        }
    }

    fn is_empty(&self) -> bool {
        self.bools.is_empty() && self.nums.is_empty() && self.strs.is_empty()
    }
}

/// One indexed property of one entity type.
struct PropIndex {
    name: Arc<str>,
    entries: RwLock<Entries>,
    /// Set once every existing twin has been added: queries use the index only then.
    ready: AtomicBool,
}

/// The indexes of one entity type.
#[derive(Default)]
struct TypeIndexes {
    props: Vec<Arc<PropIndex>>,
}

impl TypeIndexes {
    fn get(&self, prop: &str) -> Option<&Arc<PropIndex>> {
        self.props.iter().find(|p| &*p.name == prop)
    }
}

/// Which index answers a query, and the key ranges it reads, in index order.
#[derive(Clone)]
pub struct Plan {
    prop: Arc<PropIndex>,
    ranges: Vec<(Bound<Key>, Bound<Key>)>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("property", &self.prop.name)
            .field("ranges", &self.ranges)
            .finish()
    }
}

impl Plan {
    /// The indexed property.
    pub fn property(&self) -> &str {
        &self.prop.name
    }

    /// Up to `n` entries after `after` (from the start when `None`), in index order.
    pub fn scan(&self, after: Option<&Position>, n: usize) -> Vec<Position> {
        let entries = self.prop.entries.read();
        let mut out = Vec::with_capacity(n.min(1024));
        for (lo, hi) in &self.ranges {
            let lo = match lo {
                Bound::Included(k) => Bound::Included((k.clone(), NIL)),
                Bound::Excluded(k) => Bound::Excluded((k.clone(), MAX)),
                Bound::Unbounded => Bound::Unbounded,
            };
            let hi = match hi {
                Bound::Included(k) => Bound::Included((k.clone(), MAX)),
                Bound::Excluded(k) => Bound::Excluded((k.clone(), NIL)),
                Bound::Unbounded => Bound::Unbounded,
            };
            // Start after the cursor when it lies in or past this range's start.
            let lo = match (after, &lo) {
                (Some(a), Bound::Included(l)) if a >= l => Bound::Excluded(a.clone()),
                (Some(a), Bound::Excluded(l)) if a > l => Bound::Excluded(a.clone()),
                (Some(a), Bound::Unbounded) => Bound::Excluded(a.clone()),
                _ => lo,
            };
            if !entries.scan(&lo, &hi, &mut out, n) {
                return out;
            }
        }
        out
    }
}

/// Entries read from an index per lock taken by [`Plan::page`].
const CHUNK: usize = 256;

impl Plan {
    /// One page of a query answered by this plan: entries after `after` in index order, each
    /// turned into a result by `check` (which reads the twin and checks every condition of the
    /// query, `None` when it does not match: the index may be a moment behind the twin). At
    /// most `budget` entries are examined. Returns the results and, when there may be more,
    /// the cursor to go on from.
    pub fn page<T>(
        &self,
        mut after: Option<Position>,
        limit: usize,
        budget: usize,
        mut check: impl FnMut(TwinId) -> Option<T>,
    ) -> (Vec<T>, Option<String>) {
        let mut items = Vec::with_capacity(limit.min(1024));
        let mut examined = 0;
        loop {
            // The index lock is held only while the chunk is copied out: `check` reads twins.
            let chunk = self.scan(after.as_ref(), CHUNK);
            let last_chunk = chunk.len() < CHUNK;
            for e in chunk {
                if examined == budget {
                    // Everything up to `after` has been examined.
                    return (items, after.as_ref().map(cursor_of));
                }
                examined += 1;
                if let Some(item) = check(e.1) {
                    if items.len() == limit {
                        // A match past the page: the page ends at the previous one.
                        return (items, after.as_ref().map(cursor_of));
                    }
                    items.push(item);
                }
                after = Some(e);
            }
            if last_chunk {
                return (items, None);
            }
        }
    }
}

/// Every range index of the node.
#[derive(Default)]
pub struct RangeIndexes {
    types: RwLock<HashMap<Arc<str>, Arc<TypeIndexes>>>,
    /// Whether `types` holds anything.
    any: AtomicBool,
}

/// Reads one property of a twin (its value, `None` when absent).
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<Value>;

impl RangeIndexes {
    /// The index of `entity_type`'s `prop`, ready or not.
    fn prop_index(&self, entity_type: &str, prop: &str) -> Option<Arc<PropIndex>> {
        self.types.read().get(entity_type)?.get(prop).cloned()
    }

    /// The entity types that have an index.
    pub fn types(&self) -> Vec<String> {
        self.types.read().keys().map(|t| t.to_string()).collect()
    }

    /// Whether any entity type has an index (a quick check for every write).
    pub fn is_empty(&self) -> bool {
        !self.any.load(AtomicOrdering::Acquire)
    }

    /// Record a change of one twin: `old` and `new` are its entity type and a reader of its
    /// properties before and after (`None`: it did not exist / no longer exists). Call with
    /// the twin's shard held.
    pub fn update(&self, id: TwinId, old: Option<(&str, Lookup)>, new: Option<(&str, Lookup)>) {
        let types = self.types.read();
        if types.is_empty() {
            return;
        }
        let of = |et: Option<&str>| et.and_then(|et| types.get(et).cloned());
        let (ot, nt) = (of(old.map(|o| o.0)), of(new.map(|n| n.0)));
        drop(types);
        let same = matches!((&ot, &nt), (Some(a), Some(b)) if Arc::ptr_eq(a, b));
        if same {
            let (old, new) = (old.map(|o| o.1), new.map(|n| n.1));
            for p in &nt.as_ref().expect("same type").props {
                let ko = old.and_then(|o| o(&p.name)).as_ref().and_then(Key::of);
                let kn = new.and_then(|n| n(&p.name)).as_ref().and_then(Key::of);
                if ko != kn {
                    let mut e = p.entries.write();
                    if let Some(k) = ko {
                        e.remove(&k, id);
                    }
                    if let Some(k) = kn {
                        e.insert((k, id));
                    }
                }
            }
            return;
        }
        if let (Some(t), Some((_, props))) = (ot, old) {
            for p in &t.props {
                if let Some(k) = props(&p.name).as_ref().and_then(Key::of) {
                    p.entries.write().remove(&k, id);
                }
            }
        }
        if let (Some(t), Some((_, props))) = (nt, new) {
            for p in &t.props {
                if let Some(k) = props(&p.name).as_ref().and_then(Key::of) {
                    p.entries.write().insert((k, id));
                }
            }
        }
    }

    /// Make `props` the indexed properties of `entity_type`. Indexes of properties still
    /// listed are kept; the others are dropped. Returns the properties whose index is new and
    /// empty: fill each with [`RangeIndexes::fill`] for every twin of the type, then
    /// [`RangeIndexes::mark_ready`].
    pub fn set_indexed(&self, entity_type: &str, props: &[&str]) -> Vec<Arc<str>> {
        let mut types = self.types.write();
        let old = types.get(entity_type).cloned();
        let mut fresh = Vec::new();
        let kept: Vec<Arc<PropIndex>> = props
            .iter()
            .map(|name| match old.as_ref().and_then(|t| t.get(name)) {
                Some(p) => p.clone(),
                None => {
                    let name: Arc<str> = Arc::from(*name);
                    fresh.push(name.clone());
                    Arc::new(PropIndex {
                        name,
                        entries: RwLock::new(Entries::default()),
                        ready: AtomicBool::new(false),
                    })
                }
            })
            .collect();
        if kept.is_empty() {
            types.remove(entity_type);
        } else {
            types.insert(entity_type.into(), Arc::new(TypeIndexes { props: kept }));
        }
        self.any.store(!types.is_empty(), AtomicOrdering::Release);
        fresh
    }

    /// Add one existing twin to a new index of its type. Call with the twin's shard held, so
    /// no write of the twin runs between reading its value and adding it (a write after the
    /// index was made maintains it through [`RangeIndexes::update`]; adding twice is harmless).
    pub fn fill(&self, entity_type: &str, prop: &str, id: TwinId, value: Option<&Value>) {
        if let (Some(p), Some(k)) = (self.prop_index(entity_type, prop), value.and_then(Key::of)) {
            p.entries.write().insert((k, id));
        }
    }

    /// Add many twins to a new index of its type at once (sorted, then built bottom-up when
    /// the index is empty). Only while nothing writes twins: unlike [`RangeIndexes::fill`],
    /// a value read earlier could be out of date by now.
    pub fn fill_all(&self, entity_type: &str, prop: &str, gathered: Gathered) {
        if gathered.is_empty() {
            return;
        }
        if let Some(p) = self.prop_index(entity_type, prop) {
            let mut e = p.entries.write();
            // `BTreeSet::from_iter` sorts, then builds the tree bottom-up (dense nodes).
            fn merge<T: Ord>(set: &mut BTreeSet<T>, all: Vec<T>) {
                if set.is_empty() {
                    *set = all.into_iter().collect();
                } else {
                    set.extend(all);
                }
            }
            merge(&mut e.bools, gathered.bools);
            merge(&mut e.nums, gathered.nums);
            merge(&mut e.strs, gathered.strs);
        }
    }

    /// Let queries use the index of `entity_type`'s `prop` (every twin has been added).
    pub fn mark_ready(&self, entity_type: &str, prop: &str) {
        if let Some(p) = self.prop_index(entity_type, prop) {
            p.ready.store(true, AtomicOrdering::Release);
        }
    }

    /// How many entries the index of `entity_type`'s `prop` holds (for metrics and tests).
    pub fn entries(&self, entity_type: &str, prop: &str) -> Option<usize> {
        let n = self.prop_index(entity_type, prop)?.entries.read().len();
        Some(n)
    }

    /// The index that answers `q`, if any: the query names an entity type, and one of its
    /// conditions (`properties` equality or a `where` of `=`, `<`, `<=`, `>`, `>=`, `in`) is on
    /// an indexed property of that type whose index is ready, with values that are indexed.
    /// Equality is preferred to a range (it reads fewer entries).
    pub fn plan(&self, q: &Query) -> Option<Plan> {
        let et = q.entity_type.as_deref()?;
        let t = self.types.read().get(et).cloned()?;
        let ready = |name: &str| {
            t.get(name)
                .filter(|p| p.ready.load(AtomicOrdering::Acquire))
                .cloned()
        };
        // Exact equality first: the seed's `properties` shape, then `=` and `in`.
        for (name, v) in &q.properties {
            if let (Some(p), Some(ranges)) = (ready(name), point(v)) {
                return Some(Plan { prop: p, ranges });
            }
        }
        let mut best: Option<Plan> = None;
        for c in &q.conditions {
            let Some(p) = ready(&c.property) else {
                continue;
            };
            let Some(ranges) = ranges_of(c) else { continue };
            let exact = matches!(c.op, Op::Eq | Op::In);
            if exact {
                return Some(Plan { prop: p, ranges });
            }
            best.get_or_insert(Plan { prop: p, ranges });
        }
        best
    }
}

/// The one key range of the values equal to `v` (`None`: `v` is not indexed).
fn point(v: &Value) -> Option<Vec<(Bound<Key>, Bound<Key>)>> {
    let k = Key::of(v)?;
    Some(vec![(Bound::Included(k.clone()), Bound::Included(k))])
}

/// The key ranges that hold every value satisfying `c`, in index order; `None` when the
/// index cannot answer `c` (an operator it does not serve, or a value it does not index).
fn ranges_of(c: &Condition) -> Option<Vec<(Bound<Key>, Bound<Key>)>> {
    match c.op {
        Op::Eq => point(&c.value),
        Op::In => {
            let mut keys = c
                .value
                .as_array()?
                .iter()
                .map(Key::of)
                .collect::<Option<Vec<_>>>()?;
            keys.sort();
            keys.dedup();
            Some(
                keys.into_iter()
                    .map(|k| (Bound::Included(k.clone()), Bound::Included(k)))
                    .collect(),
            )
        }
        Op::Lt | Op::Le | Op::Gt | Op::Ge => {
            let k = Key::of(&c.value)?;
            // Booleans do not order: no twin satisfies the condition.
            if matches!(k, Key::Bool(_)) {
                return Some(Vec::new());
            }
            let range = match c.op {
                Op::Lt => (Bound::Included(k.lowest_of_kind()), Bound::Excluded(k)),
                Op::Le => (Bound::Included(k.lowest_of_kind()), Bound::Included(k)),
                Op::Gt => (Bound::Excluded(k.clone()), k.highest_of_kind()),
                _ => (Bound::Included(k.clone()), k.highest_of_kind()),
            };
            Some(vec![range])
        }
        Op::Ne | Op::Exists => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props(v: Value) -> crate::types::Properties {
        v.as_object().unwrap().clone()
    }

    /// `update` with plain property maps.
    fn upd(
        ix: &RangeIndexes,
        id: TwinId,
        old: Option<(&str, &crate::types::Properties)>,
        new: Option<(&str, &crate::types::Properties)>,
    ) {
        let (o, n) = (
            old.map(|(_, p)| move |k: &str| p.get(k).cloned()),
            new.map(|(_, p)| move |k: &str| p.get(k).cloned()),
        );
        ix.update(
            id,
            old.map(|o| o.0).zip(o.as_ref().map(|f| f as Lookup)),
            new.map(|n| n.0).zip(n.as_ref().map(|f| f as Lookup)),
        );
    }

    fn q(v: Value) -> Query {
        serde_json::from_value(v).unwrap()
    }

    /// Twins with the given temperatures, all indexed and ready.
    fn indexed(temps: &[Value]) -> (RangeIndexes, Vec<TwinId>) {
        let ix = RangeIndexes::default();
        let ids: Vec<TwinId> = temps.iter().map(|_| TwinId::new_v7()).collect();
        for (id, t) in ids.iter().zip(temps) {
            upd(
                &ix,
                *id,
                None,
                Some(("m", &props(json!({"temperature": t})))),
            );
        }
        for p in ix.set_indexed("m", &["temperature"]) {
            for (id, t) in ids.iter().zip(temps) {
                ix.fill("m", &p, *id, Some(t));
            }
            ix.mark_ready("m", &p);
        }
        (ix, ids)
    }

    /// Every entry of a plan, paged `n` at a time through cursors.
    fn all(plan: &Plan, n: usize) -> Vec<Position> {
        let (mut out, mut after) = (Vec::new(), None::<Position>);
        loop {
            let page = plan.scan(after.as_ref(), n);
            if page.is_empty() {
                return out;
            }
            let c = cursor_of(page.last().unwrap());
            after = parse_cursor(&c).unwrap();
            out.extend(page);
        }
    }

    #[test]
    fn ranges_hold_what_the_scan_would_match() {
        let temps: Vec<Value> = vec![
            json!(70),
            json!(85),
            json!(85.0),
            json!(86.5),
            json!(-0.0),
            json!(0),
            json!(99),
            json!("hot"),
            json!("85"),
            json!(true),
            json!(null),
            json!([90]),
            json!(1e300),
        ];
        let (ix, ids) = indexed(&temps);
        let conds = [
            json!({"property": "temperature", "op": ">", "value": 85}),
            json!({"property": "temperature", "op": ">=", "value": 85}),
            json!({"property": "temperature", "op": "<", "value": 85.0}),
            json!({"property": "temperature", "op": "<=", "value": 0}),
            json!({"property": "temperature", "op": "=", "value": 0.0}),
            json!({"property": "temperature", "op": "in", "value": [99, "hot", true, 99.0]}),
            json!({"property": "temperature", "op": ">", "value": "a"}),
            json!({"property": "temperature", "op": "<", "value": "a"}),
            json!({"property": "temperature", "op": ">", "value": true}),
        ];
        for c in conds {
            let query = q(json!({"entity_type": "m", "where": [c.clone()]}));
            let plan = ix.plan(&query).expect("indexed");
            for n in [1, 2, 100] {
                let mut got: Vec<TwinId> = all(&plan, n).into_iter().map(|e| e.1).collect();
                got.sort();
                let mut want: Vec<TwinId> = ids
                    .iter()
                    .zip(&temps)
                    .filter(|(_, t)| query.matches_props_of(&props(json!({"temperature": t}))))
                    .map(|(id, _)| *id)
                    .collect();
                want.sort();
                assert_eq!(got, want, "{c} paged by {n}");
            }
        }
    }

    #[test]
    fn updates_move_entries_and_other_types_are_apart() {
        let (ix, ids) = indexed(&[json!(90), json!(10)]);
        let hot = q(
            json!({"entity_type": "m", "where": [{"property": "temperature", "op": ">", "value": 85}]}),
        );
        let count = |ix: &RangeIndexes| all(&ix.plan(&hot).unwrap(), 10).len();
        assert_eq!(count(&ix), 1);
        let (a, b) = (
            props(json!({"temperature": 10})),
            props(json!({"temperature": 95})),
        );
        upd(&ix, ids[1], Some(("m", &a)), Some(("m", &b)));
        assert_eq!(count(&ix), 2);
        // Moved to another type (a merge of concurrent creates), then deleted.
        upd(&ix, ids[1], Some(("m", &b)), Some(("other", &b)));
        assert_eq!(count(&ix), 1);
        upd(
            &ix,
            ids[0],
            Some(("m", &props(json!({"temperature": 90})))),
            None,
        );
        assert_eq!(count(&ix), 0);
        assert_eq!(ix.entries("m", "temperature"), Some(0));
        // A twin of a type without indexes changes nothing.
        upd(&ix, TwinId::new_v7(), None, Some(("other", &b)));
        assert_eq!(ix.entries("m", "temperature"), Some(0));
    }

    #[test]
    fn an_index_serves_only_once_ready_and_only_its_type() {
        let ix = RangeIndexes::default();
        let hot = q(
            json!({"entity_type": "m", "where": [{"property": "temperature", "op": ">", "value": 85}]}),
        );
        assert!(ix.plan(&hot).is_none());
        assert_eq!(
            ix.set_indexed("m", &["temperature"]),
            vec![Arc::from("temperature")]
        );
        assert!(ix.plan(&hot).is_none(), "not filled yet");
        ix.mark_ready("m", "temperature");
        assert!(ix.plan(&hot).is_some());
        assert!(ix
            .plan(&q(
                json!({"where": [{"property": "temperature", "op": ">", "value": 85}]})
            ))
            .is_none());
        assert!(ix.plan(&q(json!({"entity_type": "m", "where": [{"property": "temperature", "op": "!=", "value": 85}]}))).is_none());
        assert!(ix.plan(&q(json!({"entity_type": "m", "where": [{"property": "temperature", "op": "=", "value": {"a": 1}}]}))).is_none());
        // Kept when the model is put again with the same index; dropped when it is gone.
        assert!(ix.set_indexed("m", &["temperature", "status"]).len() == 1);
        assert!(ix.plan(&hot).is_some());
        ix.set_indexed("m", &[]);
        assert!(ix.plan(&hot).is_none());
        // Equality is chosen over a range.
        ix.set_indexed("m", &["temperature", "status"]);
        ix.mark_ready("m", "temperature");
        ix.mark_ready("m", "status");
        let both = q(
            json!({"entity_type": "m", "properties": {"status": "ok"}, "where": [{"property": "temperature", "op": ">", "value": 85}]}),
        );
        assert_eq!(ix.plan(&both).unwrap().property(), "status");
    }

    #[test]
    fn pages_stop_at_the_limit_and_the_budget_and_go_on_from_their_cursor() {
        let temps: Vec<Value> = (0..1000).map(|i| json!(i % 100)).collect();
        let (ix, ids) = indexed(&temps);
        let plan = ix
            .plan(&q(json!({"entity_type": "m", "where": [{"property": "temperature", "op": ">=", "value": 50}]})))
            .unwrap();
        // Every third twin "matches"; pages of 7; at most 40 entries examined per page.
        let matching: std::collections::HashSet<TwinId> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 100 >= 50 && i % 3 == 0)
            .map(|(_, id)| *id)
            .collect();
        let mut seen = std::collections::HashSet::new();
        let (mut examined, mut pages, mut cursor) = (0usize, 0usize, None::<String>);
        loop {
            let after = cursor.as_deref().map(|c| parse_cursor(c).unwrap().unwrap());
            let (items, next) = plan.page(after, 7, 40, |id| {
                examined += 1;
                matching.contains(&id).then_some(id)
            });
            assert!(items.len() <= 7);
            for id in items {
                assert!(seen.insert(id), "a twin came twice");
            }
            pages += 1;
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, matching);
        // Each entry is examined once, but for the match that ends a full page (examined
        // again by the next page).
        assert!(
            examined <= 500 + pages,
            "{examined} examined in {pages} pages"
        );
    }

    #[test]
    fn cursors_round_trip_and_damaged_ones_are_refused() {
        let id = TwinId::new_v7();
        for k in [
            Key::Bool(true),
            Key::Num(Num(-85.25)),
            Key::Str("a.b ü".into()),
            Key::Str("".into()),
        ] {
            let c = cursor_of(&(k.clone(), id));
            assert_eq!(parse_cursor(&c).unwrap(), Some((k, id)));
        }
        assert_eq!(parse_cursor(&id.to_string()).unwrap(), None);
        for bad in [
            "ix1.",
            "ix1.n12.x",
            "ix1.q1.0190",
            "ix1.s0g.00000000-0000-0000-0000-000000000000",
            "ix1.s0",
        ] {
            assert!(parse_cursor(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// A number's stored bits order as the numbers do and give the number back.
        #[test]
        fn number_bits_order_as_the_numbers(a in proptest::num::f64::ANY, b in proptest::num::f64::ANY) {
            proptest::prop_assume!(!a.is_nan() && !b.is_nan());
            proptest::prop_assert_eq!(num_bits(a).cmp(&num_bits(b)), a.total_cmp(&b));
            proptest::prop_assert_eq!(bits_num(num_bits(a)).to_bits(), a.to_bits());
        }
    }

    /// Booleans, numbers and strings of one property live in separate sets; a scan over
    /// every key still reads them in [`Key`] order, and a range of one kind reads only it.
    #[test]
    fn keys_of_every_kind_scan_in_key_order() {
        let mut e = Entries::default();
        let id = TwinId::new_v7();
        let keys = [
            Key::Bool(false),
            Key::Bool(true),
            Key::Num(Num(f64::NEG_INFINITY)),
            Key::Num(Num(-2.5)),
            Key::Num(Num(0.0)),
            Key::Num(Num(1e300)),
            Key::Str("".into()),
            Key::Str("a".into()),
            Key::Str("b".into()),
        ];
        for k in keys.iter().rev() {
            e.insert((k.clone(), id));
        }
        assert_eq!(e.len(), keys.len());
        let mut out = Vec::new();
        assert!(e.scan(&Bound::Unbounded, &Bound::Unbounded, &mut out, 100));
        assert_eq!(out.iter().map(|p| p.0.clone()).collect::<Vec<_>>(), keys);
        let (lo, hi) = (
            Bound::Excluded((Key::Num(Num(-2.5)), MAX)),
            Bound::Included((Key::Num(Num(f64::INFINITY)), MAX)),
        );
        out.clear();
        assert!(e.scan(&lo, &hi, &mut out, 100));
        assert_eq!(
            out.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
            keys[4..6]
        );
        out.clear();
        assert!(!e.scan(&Bound::Unbounded, &Bound::Unbounded, &mut out, 4));
        assert_eq!(out.len(), 4);
        e.remove(&Key::Str("a".into()), id);
        e.remove(&Key::Num(Num(0.0)), id);
        assert_eq!(e.len(), keys.len() - 2);
    }
}
