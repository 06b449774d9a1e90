//! Twin queries: the seed's `{"entity_type", "properties"}` equality shape plus `where`
//! conditions, hierarchy filters and cursor paging in id order.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::segment::Segment;
use crate::types::{Properties, Twin, TwinId};

/// Page size when a query gives no `limit`.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest page a query may ask for.
pub const MAX_LIMIT: usize = 10_000;
/// Most twins one page examines. A query that matches few twins stops here and returns the
/// matches so far with a cursor, so no request holds the index for long (writes wait on it).
pub const MAX_EXAMINED_PER_PAGE: usize = 100_000;
/// Most twins of an `ancestor_id` subtree gathered for one page; a bigger subtree is read by
/// checking the ancestors of every twin (of the entity type) instead.
pub const MAX_SUBTREE_GATHERED: usize = 10_000;
/// Most `where` conditions in one query.
pub const MAX_CONDITIONS: usize = 64;

/// Comparison operator of a `where` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(as = WhereOp)]
pub enum Op {
    #[serde(rename = "=")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "in")]
    In,
    #[serde(rename = "exists")]
    Exists,
}

/// One condition on a top-level property.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = WhereCondition)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub property: String,
    pub op: Op,
    /// Compared value (any JSON); an array for `in`; for `exists`, `false` asks for absence
    /// (default true).
    #[serde(default)]
    pub value: Value,
}

/// The body of `POST /v1/query`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Query {
    #[serde(default)]
    pub entity_type: Option<String>,
    /// Exact equality on each named property.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub properties: Properties,
    #[serde(default, rename = "where")]
    #[schema(max_items = 64)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub parent_id: Option<TwinId>,
    /// Matches twins anywhere below this one.
    #[serde(default)]
    pub ancestor_id: Option<TwinId>,
    /// Page size (default 100).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10_000)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page, as it was returned (a twin id, or a position in
    /// a range index for a query answered from one).
    #[serde(default)]
    pub cursor: Option<String>,
}

/// Where a page goes on from: after a twin id (a scan in id order) or after an entry of a
/// range index (a query answered from an index, in index order).
#[derive(Clone, Debug, PartialEq)]
pub enum Cursor {
    Id(TwinId),
    Index(super::range_index::Position),
}

/// One page of results: the matching twins' compact bytes, copied into a few buffers (one
/// run of them per part of the scan that found them), served straight from those bytes (no
/// decoded twin, no tree of JSON values). A copy is a consistent snapshot of each twin, costs
/// the registry nothing once made (no count on each twin's blob to raise and lower), and the
/// page is freed as a few buffers. Pages are joined by moving their chunks (nothing copied).
#[derive(Clone, Debug, Default, ToSchema)]
pub struct Page {
    #[schema(value_type = Vec<Twin>, rename = "items")]
    chunks: Vec<Chunk>,
    /// Twins in all the chunks.
    #[schema(ignore)]
    len: usize,
    pub next_cursor: Option<String>,
}

/// Twins of a [`Page`] found by one part of a scan.
#[derive(Clone, Debug, Default)]
struct Chunk {
    items: Vec<Item>,
    buffers: Vec<Vec<u8>>,
    /// The segment its twins are in, when they were found in one (not copied).
    segment: Option<Arc<Segment>>,
    /// The children of the twins that have any ([`Item::children`]).
    children: Vec<BTreeSet<TwinId>>,
}

/// A twin a scan found, to add to a page.
#[derive(Clone, Copy)]
pub(super) enum Found<'a> {
    /// Its compact bytes (copied into the page).
    Bytes(&'a [u8]),
    /// The twin at this position of this segment (the page refers to it).
    In(&'a Arc<Segment>, usize),
}

/// Where one twin of a [`Chunk`] is: 32 bytes (a page of 10,000 writes these and the twins'
/// bytes, and a full-result query was bound by those writes).
#[derive(Clone, Copy, Debug)]
struct Item {
    id: TwinId,
    /// Its bytes: `buffers[buffer][at..at + len]`, or the segment's twin at position `at`
    /// ([`IN_SEGMENT`]).
    at: u32,
    len: u32,
    buffer: u32,
    /// Its children: `children[children]`, or none ([`NO_CHILDREN`]).
    children: u32,
}

/// [`Item::buffer`] of a twin in the chunk's segment.
const IN_SEGMENT: u32 = u32::MAX;
/// [`Item::children`] of a twin without children.
const NO_CHILDREN: u32 = u32::MAX;
/// The largest buffer of a page (so that an offset in one fits in 32 bits).
const MAX_BUFFER: usize = 1 << 30;
/// No children, for the twins that have none.
static NONE: BTreeSet<TwinId> = BTreeSet::new();

/// A twin of a [`Page`]: its compact bytes (names interned) with its children, serialized
/// exactly like [`Twin`] straight from the bytes.
#[derive(Clone, Copy, Debug)]
pub struct TwinRef<'p> {
    pub id: TwinId,
    blob: &'p [u8],
    pub children_ids: &'p BTreeSet<TwinId>,
}

impl TwinRef<'_> {
    /// The twin, decoded (with its children).
    pub fn twin(&self) -> Twin {
        let mut t = crate::types::compact::decode(self.id, self.blob)
            .expect("a twin blob encoded by this process decodes");
        t.children_ids = self.children_ids.clone();
        t
    }
}

impl Serialize for TwinRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        crate::types::compact::Served {
            id: self.id,
            blob: self.blob,
            children_ids: self.children_ids,
        }
        .serialize(s)
    }
}

impl Chunk {
    /// Copy `blob` into the last buffer (a full one is followed by one twice its size);
    /// returns where it is there.
    fn copy(&mut self, blob: &[u8]) -> usize {
        let room = self.buffers.last().map(|b| b.capacity() - b.len());
        if room.is_none_or(|room| room < blob.len()) {
            let size = match self.buffers.last() {
                // The first: for the twins the chunk has room for, at this one's size and
                // an eighth more, at most 16 MiB (room a scan of rare matches does not fill
                // is not touched, so it takes no memory).
                None => (self.items.capacity().max(1) * (blob.len() + blob.len() / 8)).min(1 << 24),
                Some(last) => last.capacity() * 2,
            };
            let size = size.min(MAX_BUFFER).max(blob.len());
            assert!(size <= MAX_BUFFER, "a twin of over 1 GiB");
            self.buffers.push(Vec::with_capacity(size));
        }
        let bytes = self.buffers.last_mut().expect("a buffer");
        let at = bytes.len();
        bytes.extend_from_slice(blob);
        at
    }

    fn twin_ref<'p>(&'p self, i: &'p Item) -> TwinRef<'p> {
        let at = i.at as usize;
        TwinRef {
            id: i.id,
            blob: match (i.buffer, &self.segment) {
                (IN_SEGMENT, Some(s)) => s.twin(at).0,
                (b, _) => &self.buffers[b as usize][at..at + i.len as usize],
            },
            children_ids: match i.children {
                NO_CHILDREN => &NONE,
                n => &self.children[n as usize],
            },
        }
    }
}

impl Page {
    /// An empty page with room for `capacity` twins.
    pub(super) fn with_capacity(capacity: usize) -> Page {
        if capacity == 0 {
            return Page::default();
        }
        Page {
            chunks: vec![Chunk {
                items: Vec::with_capacity(capacity),
                ..Chunk::default()
            }],
            ..Page::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The page's twins, in order.
    pub fn iter(&self) -> impl Iterator<Item = TwinRef<'_>> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.items.iter().map(|i| c.twin_ref(i)))
    }

    /// The `n`th twin.
    pub fn get(&self, mut n: usize) -> Option<TwinRef<'_>> {
        for c in &self.chunks {
            match c.items.get(n) {
                Some(i) => return Some(c.twin_ref(i)),
                None => n -= c.items.len(),
            }
        }
        None
    }

    /// The page's twins, decoded.
    pub fn twins(&self) -> Vec<Twin> {
        self.iter().map(|t| t.twin()).collect()
    }

    /// The id of the last twin.
    pub(super) fn last_id(&self) -> Option<TwinId> {
        self.chunks
            .iter()
            .rev()
            .find_map(|c| c.items.last())
            .map(|i| i.id)
    }

    /// Add twin `id`: its bytes are copied into the last buffer (a full buffer is followed by
    /// one twice its size, nothing is moved), or a twin of a segment is referred to.
    pub(super) fn push(&mut self, id: TwinId, found: Found<'_>, children_ids: BTreeSet<TwinId>) {
        let segment = match found {
            Found::In(s, _) => Some(s),
            Found::Bytes(_) => None,
        };
        let same = |c: &Chunk| match (&c.segment, segment) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => c.items.is_empty() && c.buffers.is_empty(),
        };
        if !self.chunks.last().is_some_and(same) {
            self.chunks.push(Chunk::default());
        }
        let chunk = self.chunks.last_mut().expect("a chunk");
        let (at, len, buffer) = match found {
            Found::In(s, i) => {
                if chunk.segment.is_none() {
                    chunk.segment = Some(s.clone());
                }
                (i, 0, IN_SEGMENT)
            }
            Found::Bytes(blob) => {
                let at = chunk.copy(blob);
                (at, blob.len(), chunk.buffers.len() as u32 - 1)
            }
        };
        let children = if children_ids.is_empty() {
            NO_CHILDREN
        } else {
            chunk.children.push(children_ids);
            chunk.children.len() as u32 - 1
        };
        chunk.items.push(Item {
            id,
            at: at as u32,
            len: len as u32,
            buffer,
            children,
        });
        self.len += 1;
    }

    /// Drop the twins after the first `n` (and the chunks that held only those).
    pub(super) fn truncate(&mut self, n: usize) {
        let mut kept = 0;
        let mut chunks = 0;
        for c in &mut self.chunks {
            if kept == n {
                break;
            }
            c.items.truncate(n - kept);
            kept += c.items.len();
            chunks += 1;
        }
        self.chunks.truncate(chunks);
        self.len = kept;
    }

    /// Add `next`'s twins after this page's (its chunks are moved, nothing is copied).
    pub(super) fn append(&mut self, next: Page) {
        if next.is_empty() {
            return;
        }
        if self.is_empty() {
            self.chunks = next.chunks;
            self.len = next.len;
            return;
        }
        self.chunks.retain(|c| !c.items.is_empty());
        self.chunks
            .extend(next.chunks.into_iter().filter(|c| !c.items.is_empty()));
        self.len += next.len;
    }
}

impl Serialize for Page {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Items<'p>(&'p Page);
        impl Serialize for Items<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter())
            }
        }
        let mut st = s.serialize_struct("Page", 2)?;
        st.serialize_field("items", &Items(self))?;
        st.serialize_field("next_cursor", &self.next_cursor)?;
        st.end()
    }
}

impl Query {
    /// Shape checks that need no data; returns the parsed cursor and limit.
    pub fn check(&self) -> Result<(Option<Cursor>, usize), String> {
        if self.conditions.len() > MAX_CONDITIONS {
            return Err(format!("at most {MAX_CONDITIONS} where conditions"));
        }
        for c in &self.conditions {
            if c.op == Op::In && !c.value.is_array() {
                return Err(format!("`in` on {} needs an array value", c.property));
            }
            if c.op == Op::Exists && !(c.value.is_null() || c.value.is_boolean()) {
                return Err(format!(
                    "`exists` on {} takes true, false or nothing",
                    c.property
                ));
            }
        }
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(format!("limit must be between 1 and {MAX_LIMIT}"));
        }
        let cursor = match &self.cursor {
            None => None,
            Some(c) => match super::range_index::parse_cursor(c)? {
                Some(p) => Some(Cursor::Index(p)),
                None => {
                    Some(Cursor::Id(c.parse::<TwinId>().map_err(|_| {
                        "cursor is not one this server returned".to_string()
                    })?))
                }
            },
        };
        Ok((cursor, limit))
    }

    /// Whether a twin's own fields match (hierarchy filters are checked by the registry).
    pub fn matches(&self, t: &Twin) -> bool {
        self.matches_props(t)
            && self
                .entity_type
                .as_ref()
                .is_none_or(|et| &t.entity_type == et)
    }

    /// [`Query::matches`] without the entity-type check, for candidates that come from the
    /// entity-type index (the check would only repeat it).
    pub fn matches_props(&self, t: &Twin) -> bool {
        if let Some(p) = self.parent_id {
            if t.parent_id != Some(p) {
                return false;
            }
        }
        self.matches_props_of(&t.properties)
    }

    /// Whether `properties` satisfy the query's equalities and `where` conditions.
    pub fn matches_props_of(&self, properties: &Properties) -> bool {
        for (k, v) in &self.properties {
            if !properties.get(k).is_some_and(|x| json_eq(x, v)) {
                return false;
            }
        }
        self.conditions
            .iter()
            .all(|c| condition_holds(c, properties.get(&c.property)))
    }
}

impl Query {
    /// [`Query::matches`] for compact twins, ready to check many: the interned numbers of
    /// the names it compares are looked up once, not once per twin.
    pub fn matcher(&self) -> Matcher<'_> {
        use crate::types::intern;
        Matcher {
            q: self,
            entity_type: self
                .entity_type
                .as_deref()
                .map(|et| (et, intern::lookup(et))),
            equal: self
                .properties
                .iter()
                .map(|(k, v)| (k.as_str(), intern::lookup(k), v))
                .collect(),
            conditions: self
                .conditions
                .iter()
                .map(|c| (c, intern::lookup(&c.property)))
                .collect(),
        }
    }
}

/// A [`Query`]'s checks on compact twins, with names looked up once ([`Query::matcher`]).
pub struct Matcher<'q> {
    q: &'q Query,
    entity_type: Option<(&'q str, Option<u32>)>,
    /// `properties` equality: each name, its interned number and the value.
    equal: Vec<(&'q str, Option<u32>, &'q Value)>,
    /// `where` conditions, each with its property's interned number.
    conditions: Vec<(&'q Condition, Option<u32>)>,
}

impl Matcher<'_> {
    /// Whether compact twin `b` matches the query's filters, decoding only the properties
    /// the query names (its entity type only when `check_type`: a caller reading the type's
    /// index knows it already; without it, [`Query::matches_props`]).
    pub fn matches(&self, b: &[u8], check_type: bool) -> bool {
        self.matches_with(b, || crate::types::compact::Props::of(b).ok(), check_type)
    }

    /// [`Matcher::matches`] on a blob of the registry's map, which knows where its
    /// properties are.
    pub(crate) fn matches_blob(&self, b: &super::twins::Blob, check_type: bool) -> bool {
        self.matches_at(b, b.props_at(), check_type)
    }

    /// [`Matcher::matches`] on compact twin `b` whose properties begin at `props_at` (0: not
    /// known), as the map's blobs and segments keep it.
    pub(crate) fn matches_at(&self, b: &[u8], props_at: u16, check_type: bool) -> bool {
        self.matches_with(b, || super::twins::props_at(b, props_at), check_type)
    }

    fn matches_with<'b>(
        &self,
        b: &'b [u8],
        props: impl FnOnce() -> Option<crate::types::compact::Props<'b>>,
        check_type: bool,
    ) -> bool {
        use crate::types::compact;
        if let Some(p) = self.q.parent_id {
            if compact::parent_id(b) != Some(p) {
                return false;
            }
        }
        if let Some((et, number)) = self.entity_type.filter(|_| check_type) {
            if !compact::entity_type_is_numbered(b, et, number) {
                return false;
            }
        }
        if self.equal.is_empty() && self.conditions.is_empty() {
            return true;
        }
        let Some(props) = props() else {
            return false;
        };
        for &(k, number, v) in &self.equal {
            // Strings (the seed's query) compare as bytes in place; other scalars are read
            // in place; only arrays and objects are decoded.
            if let Value::String(want) = v {
                if let Some(equal) = props.str_is(k, number, want) {
                    if !equal {
                        return false;
                    }
                    continue;
                }
            }
            if !equals_on(&props, k, number, props.scalar_numbered(k, number), v) {
                return false;
            }
        }
        self.conditions
            .iter()
            .all(|&(c, number)| holds_on(c, number, &props))
    }
}

/// Whether property `name` (interned as `number`, read in place as `actual`) equals `v` as
/// the query's equality has it (`1` = `1.0`): scalars compared where they lie, arrays and
/// objects decoded. Serves `properties` equality and the `=`, `!=` and `in` conditions.
fn equals_on(
    props: &crate::types::compact::Props<'_>,
    name: &str,
    number: Option<u32>,
    actual: Option<crate::types::compact::Scalar<'_>>,
    v: &Value,
) -> bool {
    actual.is_some_and(|x| {
        x.eq_json(v).unwrap_or_else(|| {
            props
                .get_numbered(name, number)
                .is_some_and(|a| json_eq(&a, v))
        })
    })
}

/// [`condition_holds`] on a compact twin's properties: scalars compared where they lie,
/// only arrays and objects decoded.
fn holds_on(c: &Condition, number: Option<u32>, props: &crate::types::compact::Props<'_>) -> bool {
    use crate::types::compact::Scalar;
    let actual = props.scalar_numbered(&c.property, number);
    let equal = |v: &Value| equals_on(props, &c.property, number, actual, v);
    match c.op {
        Op::Exists => actual.is_some() != (c.value == Value::Bool(false)),
        Op::Eq => equal(&c.value),
        Op::Ne => !equal(&c.value),
        Op::In => c.value.as_array().is_some_and(|vs| vs.iter().any(equal)),
        Op::Lt | Op::Le | Op::Gt | Op::Ge => {
            let ord = match (actual, &c.value) {
                (Some(Scalar::Num(a)), Value::Number(b)) => {
                    b.as_f64().and_then(|b| a.partial_cmp(&b))
                }
                (Some(Scalar::Str(a)), Value::String(b)) => Some(a.cmp(b.as_str())),
                _ => None,
            };
            ord.is_some_and(|ord| ordered(c.op, ord))
        }
    }
}

fn condition_holds(c: &Condition, actual: Option<&Value>) -> bool {
    match c.op {
        Op::Exists => actual.is_some() != (c.value == Value::Bool(false)),
        Op::In => {
            let Some(a) = actual else { return false };
            c.value
                .as_array()
                .is_some_and(|vs| vs.iter().any(|v| json_eq(a, v)))
        }
        Op::Eq => actual.is_some_and(|a| json_eq(a, &c.value)),
        Op::Ne => !actual.is_some_and(|a| json_eq(a, &c.value)),
        Op::Lt | Op::Le | Op::Gt | Op::Ge => actual
            .and_then(|a| compare(a, &c.value))
            .is_some_and(|ord| ordered(c.op, ord)),
    }
}

/// Whether `ord` (the twin's value against the condition's) satisfies ordering `op`.
fn ordered(op: Op, ord: Ordering) -> bool {
    match op {
        Op::Lt => ord == Ordering::Less,
        Op::Le => ord != Ordering::Greater,
        Op::Gt => ord == Ordering::Greater,
        _ => ord != Ordering::Less,
    }
}

/// Equality where `1` and `1.0` are the same number.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Order numbers by value and strings lexically; anything else does not compare.
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn twin(props: Value) -> Twin {
        Twin {
            id: TwinId::new_v7(),
            entity_type: "machine".into(),
            properties: props.as_object().unwrap().clone(),
            version: 1,
            vclock: Default::default(),
            parent_id: None,
            children_ids: Default::default(),
            lifecycle: Default::default(),
            created_at: Default::default(),
            updated_at: Default::default(),
            hlc: 0,
            lseq: 0,
            clocks: Default::default(),
            deleted_hlc: 0,
            siblings: None,
        }
    }

    fn q(v: Value) -> Query {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn every_operator() {
        let t = twin(json!({"temperature": 90, "status": "operational"}));
        let yes = [
            json!({"property": "temperature", "op": ">", "value": 85}),
            json!({"property": "temperature", "op": ">=", "value": 90.0}),
            json!({"property": "temperature", "op": "<=", "value": 90}),
            json!({"property": "temperature", "op": "=", "value": 90.0}),
            json!({"property": "status", "op": "!=", "value": "fault"}),
            json!({"property": "status", "op": "in", "value": ["fault", "operational"]}),
            json!({"property": "status", "op": "exists"}),
            json!({"property": "missing", "op": "exists", "value": false}),
            json!({"property": "missing", "op": "!=", "value": 1}),
        ];
        for c in yes {
            assert!(q(json!({"where": [c.clone()]})).matches(&t), "{c}");
        }
        let no = [
            json!({"property": "temperature", "op": "<", "value": 85}),
            json!({"property": "temperature", "op": ">", "value": "85"}),
            json!({"property": "missing", "op": ">", "value": 1}),
            json!({"property": "status", "op": "in", "value": ["fault"]}),
            json!({"property": "missing", "op": "exists"}),
        ];
        for c in no {
            assert!(!q(json!({"where": [c.clone()]})).matches(&t), "{c}");
        }
    }

    /// The matcher on compact blobs (scalars compared in place) answers every condition as
    /// the check on decoded twins does.
    #[test]
    fn conditions_on_blobs_agree_with_decoded_twins() {
        use crate::types::compact::{self, Names};
        let values = [
            json!(90),
            json!(90.0),
            json!(90.5),
            json!(0.1),
            json!(-2.5),
            json!(-3),
            json!(u64::MAX),
            json!(0),
            json!("operational"),
            json!("fault"),
            json!(""),
            json!("long ".repeat(40)),
            json!(true),
            json!(false),
            json!(null),
            json!([1, "a"]),
            json!({"a": 1}),
        ];
        let ops = ["=", "!=", "<", "<=", ">", ">=", "in", "exists"];
        let mut compared = 0;
        for actual in values.iter().map(Some).chain([None]) {
            let mut props = json!({"other": 1});
            if let Some(a) = actual {
                props["p"] = a.clone();
            }
            let t = twin(props);
            let blob = compact::encode(&t, Names::Interned);
            // As the registry's map holds it: with where its properties begin.
            let held = super::super::twins::Blob::new(&blob);
            for op in ops {
                let wanted: Vec<Value> = match op {
                    "in" => vec![json!([90, "fault"]), json!([[1, "a"]]), json!([])],
                    "exists" => vec![json!(null), json!(true), json!(false)],
                    _ => values.to_vec(),
                };
                for v in wanted {
                    let query = q(json!({"where": [{"property": "p", "op": op, "value": v}]}));
                    let want = query.matches(&t);
                    assert_eq!(
                        query.matcher().matches(&blob, true),
                        want,
                        "{actual:?} {op} {v}"
                    );
                    assert_eq!(query.matcher().matches_blob(&held, true), want);
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 18 * (6 * 17 + 3 + 3));
    }

    /// A page serves each twin as it was added (bytes and children), across the buffers
    /// it grows into, after another page is appended, and after truncation.
    #[test]
    fn a_page_serves_each_twin_as_it_was_added() {
        use crate::types::compact::{self, Names};
        // Room for one twin at first: the others go to new buffers.
        let (mut a, mut b) = (Page::with_capacity(1), Page::with_capacity(2));
        let mut want = Vec::new();
        for i in 0..9 {
            let mut t = twin(json!({"i": i, "s": "x".repeat(i * 40)}));
            let kids: BTreeSet<TwinId> = (0..i % 3).map(|_| TwinId::new_v7()).collect();
            let blob = compact::encode(&t, Names::Interned);
            let page = if i < 4 { &mut a } else { &mut b };
            page.push(t.id, Found::Bytes(&blob), kids.clone());
            t.children_ids = kids;
            want.push(t);
        }
        assert!(a.chunks[0].buffers.len() > 1 && b.chunks[0].buffers.len() > 1);
        a.append(Page::default());
        a.append(b);
        assert_eq!((a.len(), a.chunks.len()), (9, 2));
        assert_eq!(a.twins(), want);
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            json!({"items": want, "next_cursor": null})
        );
        a.truncate(5);
        assert_eq!(a.twins(), want[..5]);
        assert_eq!(a.get(4).map(|t| t.id), Some(want[4].id));
        assert!(a.get(5).is_none());
        // A cut at the end of a chunk drops the chunks after it.
        a.truncate(4);
        assert_eq!((a.len(), a.chunks.len()), (4, 1));
        assert_eq!(a.last_id(), Some(want[3].id));
        a.truncate(0);
        assert!(a.is_empty() && a.iter().next().is_none() && a.last_id().is_none());
        a.push(
            want[8].id,
            Found::Bytes(&compact::encode(&want[8], Names::Interned)),
            BTreeSet::new(),
        );
        assert_eq!((a.len(), a.get(0).map(|t| t.id)), (1, Some(want[8].id)));
    }

    #[test]
    fn seed_shape_is_equality() {
        let t = twin(json!({"status": "operational"}));
        assert!(
            q(json!({"entity_type": "machine", "properties": {"status": "operational"}}))
                .matches(&t)
        );
        assert!(!q(json!({"entity_type": "building"})).matches(&t));
        assert!(!q(json!({"properties": {"status": "fault"}})).matches(&t));
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(q(json!({"limit": 0})).check().is_err());
        assert!(q(json!({"cursor": "nope"})).check().is_err());
        assert!(
            q(json!({"where": [{"property": "a", "op": "in", "value": 3}]}))
                .check()
                .is_err()
        );
        assert!(
            serde_json::from_value::<Query>(json!({"where": [{"property": "a", "op": "~"}]}))
                .is_err()
        );
    }
}
