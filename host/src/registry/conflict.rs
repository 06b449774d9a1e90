//! Conflicts between concurrent writes of one property, made on different nodes.
//!
//! Two writes are concurrent when neither node had seen the other's when it wrote: each
//! property clock carries the write's place in its origin's changes to the twin (`n`), so a
//! replica has seen it when its version vector counts that many changes by that origin.
//! What happens to concurrent writes is the entity type's `conflict.strategy`:
//!
//! - `lww`: the higher `(HLC, node id)` wins;
//! - `version`: the write made at the higher twin version wins (how many changes to the twin
//!   its node had seen: a causally newer write always has the higher one), then lww;
//! - `manual` and `merge`: the twin keeps every concurrent write not yet superseded side by
//!   side (its *siblings*, a multi-value register), so every replica holds the same set
//!   whatever order the writes arrive in. The property shows the lww winner (`manual`, a
//!   provisional value) or what the model's resolver component makes of the siblings
//!   (`merge`, folded in `(HLC, node id)` order, so every node computes the same value).
//!   A later write made where every sibling had been seen — a client's write, or
//!   `POST /v1/conflicts/{id}/resolve` — supersedes them all, on every node it reaches.
//!
//! Each node records a `conflict.detected` event when it merges concurrent writes, and a
//! `conflict.resolved` event when the siblings of a property give way to a later write.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use utoipa::ToSchema;

use super::model::{ConflictPolicy, Strategy};
use super::{Registry, RegistryError};
use crate::types::{PropClock, Properties, Sibling, Siblings, Twin, TwinId};

/// The id of the conflict on `property` of `twin`: the same on every node.
pub fn conflict_id(twin: &TwinId, property: &str) -> String {
    let mut h = Sha256::new();
    h.update(twin.as_bytes());
    h.update(property.as_bytes());
    let d = h.finalize();
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Drop the siblings of `names` (a local write supersedes every write the node has seen).
/// Returns the properties whose conflict that ended.
pub(super) fn supersede<'a>(
    siblings: &mut Siblings,
    names: impl IntoIterator<Item = &'a String>,
) -> Vec<String> {
    let Some(map) = siblings else {
        return Vec::new();
    };
    let mut ended = Vec::new();
    for n in names {
        if map.remove(n).is_some() {
            ended.push(n.clone());
        }
    }
    if map.is_empty() {
        *siblings = None;
    }
    ended
}

/// A resolver call the merge of a remote change needs before it can be applied: the
/// resolver module and the sibling writes of one property, in canonical order.
#[derive(Clone, Debug)]
pub struct ResolveRequest {
    pub twin_id: TwinId,
    pub property: String,
    /// The resolver module and the sha256 the model pins.
    pub module: String,
    pub sha256: Option<String>,
    pub sides: Vec<Sibling>,
}

impl ResolveRequest {
    pub(super) fn key(&self) -> ResolveKey {
        key(self.twin_id, &self.property, &self.sides)
    }
}

/// What a resolution answers: one property's set of sibling writes.
pub type ResolveKey = (TwinId, String, Vec<(u64, Arc<str>)>);

pub(super) fn key(twin_id: TwinId, property: &str, sides: &[Sibling]) -> ResolveKey {
    (
        twin_id,
        property.to_owned(),
        sides
            .iter()
            .map(|s| (s.clock.hlc, s.clock.origin.clone()))
            .collect(),
    )
}

/// Merge `sides` (in `(hlc, origin)` order) two at a time with `resolve(a, b)`, left to
/// right: the running result carries the clock of the last side folded in, so it stays the
/// lower side of the next call and every node asks the same questions in the same order.
///
/// # Errors
/// The first error of `resolve`, or none for fewer than one side.
pub fn fold(
    sides: &[Sibling],
    mut resolve: impl FnMut(&Sibling, &Sibling) -> Result<Value, String>,
) -> Result<Value, String> {
    let (first, rest) = sides.split_first().ok_or("no sides to merge")?;
    let mut acc = first.clone();
    for next in rest {
        acc = Sibling {
            value: resolve(&acc, next)?,
            clock: next.clock.clone(),
        };
    }
    Ok(acc.value)
}

/// Resolver answers, ready for a merge to use on the writer thread.
pub type Resolutions = HashMap<ResolveKey, Result<Value, String>>;

/// A conflict event to record once the merge that found it is applied.
#[derive(Debug)]
pub(super) enum Note {
    Detected {
        property: String,
        strategy: Strategy,
        sides: Vec<Sibling>,
        value: Value,
        error: Option<String>,
    },
    Resolved {
        property: String,
        value: Value,
    },
}

impl Note {
    /// The event's kind and `data`.
    pub(super) fn into_event(self, twin: &TwinId) -> (super::ChangeKind, Value) {
        match self {
            Note::Detected {
                property,
                strategy,
                sides,
                value,
                error,
            } => {
                let mut data = json!({
                    "conflict_id": conflict_id(twin, &property),
                    "property": property,
                    "strategy": strategy,
                    "sides": sides.iter().map(side_json).collect::<Vec<_>>(),
                    "value": value,
                });
                if let Some(e) = error {
                    data["resolver_error"] = Value::String(e);
                }
                (super::ChangeKind::ConflictDetected, data)
            }
            Note::Resolved { property, value } => (
                super::ChangeKind::ConflictResolved,
                json!({
                    "conflict_id": conflict_id(twin, &property),
                    "property": property,
                    "value": value,
                }),
            ),
        }
    }
}

fn side_json(s: &Sibling) -> Value {
    json!({"value": s.value, "hlc": s.clock.hlc, "origin": &*s.clock.origin})
}

/// The writes of `k` a twin holds: its siblings, or its one write.
pub(super) fn writes_of(
    properties: &Properties,
    clocks: &crate::types::Clocks,
    siblings: Option<&BTreeMap<String, Vec<Sibling>>>,
    k: &str,
) -> Vec<Sibling> {
    if let Some(s) = siblings.and_then(|m| m.get(k)) {
        return s.clone();
    }
    clocks
        .get(k)
        .map(|c| Sibling {
            value: properties.get(k).cloned().unwrap_or(Value::Null),
            clock: c.clone(),
        })
        .into_iter()
        .collect()
}

fn lww(s: &Sibling) -> (u64, &str) {
    s.clock.lww_key()
}

fn version(s: &Sibling) -> (u64, u64, &str) {
    (s.clock.v, s.clock.hlc, &s.clock.origin)
}

/// Whether some write of `ours` and some of `theirs` are concurrent: different, and neither
/// side had seen the other's (`our_vclock`, `their_vclock`: the version vectors before the
/// merge).
fn concurrent(
    ours: &[Sibling],
    theirs: &[Sibling],
    our_vclock: &crate::types::VClock,
    their_vclock: &crate::types::VClock,
) -> bool {
    let unseen = |w: &Sibling, other: &[Sibling], vclock| {
        !other.iter().any(|o| o.clock == w.clock) && !w.clock.seen_by(vclock)
    };
    ours.iter().any(|w| unseen(w, theirs, their_vclock))
        && theirs.iter().any(|w| unseen(w, ours, our_vclock))
}

/// The outcome of merging one property's writes from both sides.
pub(super) enum Merged {
    /// One write stands.
    One(Sibling),
    /// Several concurrent writes stand side by side (`manual`, `merge`), in lww order.
    Many(Vec<Sibling>),
}

/// Merge the writes of one property: `ours` (this replica's, whose version vector was
/// `our_vclock`) and `theirs` (the remote's, `their_vclock`). `None`: nothing to merge.
/// Also says whether concurrent writes met.
pub(super) fn merge_writes(
    strategy: Strategy,
    ours: Vec<Sibling>,
    theirs: Vec<Sibling>,
    our_vclock: &crate::types::VClock,
    their_vclock: &crate::types::VClock,
) -> Option<(Merged, bool)> {
    if theirs.is_empty() {
        return None;
    }
    let met = concurrent(&ours, &theirs, our_vclock, their_vclock);
    let all = || ours.iter().chain(theirs.iter());
    let merged = match strategy {
        Strategy::Lww => Merged::One(all().max_by(|a, b| lww(a).cmp(&lww(b)))?.clone()),
        Strategy::Version => Merged::One(all().max_by(|a, b| version(a).cmp(&version(b)))?.clone()),
        Strategy::Manual | Strategy::Merge => {
            // A write stays unless the other side has seen it and no longer holds it.
            let mut keep: Vec<Sibling> = ours
                .iter()
                .filter(|w| {
                    theirs.iter().any(|t| t.clock == w.clock) || !w.clock.seen_by(their_vclock)
                })
                .chain(theirs.iter().filter(|w| {
                    !ours.iter().any(|o| o.clock == w.clock) && !w.clock.seen_by(our_vclock)
                }))
                .cloned()
                .collect();
            keep.sort_by(|a, b| lww(a).cmp(&lww(b)));
            keep.dedup_by(|a, b| a.clock.lww_key() == b.clock.lww_key());
            match keep.len() {
                // Each side has seen the other's writes and holds neither (clocks recorded
                // before writes had places, or a replica restored from an old backup): the
                // lww order decides.
                0 => Merged::One(all().max_by(|a, b| lww(a).cmp(&lww(b)))?.clone()),
                1 => Merged::One(keep.pop()?),
                _ => Merged::Many(keep),
            }
        }
    };
    Some((merged, met))
}

/// The value a property shows for its siblings, with the resolver's error if it failed: the
/// lww winner, or for `merge` the resolver's answer from `resolutions`. Without an answer,
/// the resolver call to make first; or, on the `last` round, the lww winner.
pub(super) fn shown_value(
    twin_id: TwinId,
    property: &str,
    policy: &ConflictPolicy,
    sides: &[Sibling],
    resolutions: &Resolutions,
    last: bool,
) -> Result<(Value, Option<String>), ResolveRequest> {
    let main = sides.last().map(|s| s.value.clone()).unwrap_or(Value::Null);
    match (policy.strategy, &policy.resolver) {
        (Strategy::Merge, Some(module)) => match resolutions.get(&key(twin_id, property, sides)) {
            Some(Ok(v)) => Ok((v.clone(), None)),
            Some(Err(e)) => Ok((main, Some(e.clone()))),
            None if last => Ok((
                main,
                Some("local writes kept changing the property while its resolver ran".into()),
            )),
            None => Err(ResolveRequest {
                twin_id,
                property: property.to_owned(),
                module: module.clone(),
                sha256: policy.sha256.clone(),
                sides: sides.to_vec(),
            }),
        },
        _ => Ok((main, None)),
    }
}

/// One open conflict, as `GET /v1/conflicts` lists it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConflictInfo {
    /// The same on every node (`POST /v1/conflicts/{id}/resolve`).
    pub id: String,
    pub twin_id: TwinId,
    pub entity_type: String,
    pub property: String,
    /// The entity type's strategy on this node (`manual`, or `merge`).
    #[schema(value_type = String)]
    pub strategy: Strategy,
    /// The value the property shows meanwhile: the lww winner (`manual`) or the resolver's
    /// merge (`merge`).
    #[schema(value_type = Object)]
    pub value: Value,
    /// Every concurrent write, in `(hlc, origin)` order: `{"value", "hlc", "origin"}`.
    #[schema(value_type = Vec<Object>)]
    pub sides: Vec<Value>,
}

/// Most conflicts one `GET /v1/conflicts` page lists.
pub const MAX_CONFLICTS_PAGE: usize = 1000;

impl Registry {
    /// Open conflicts, by twin id then property, after `(twin, property)` `after`.
    pub fn conflicts(&self, after: Option<&str>, limit: usize) -> (Vec<ConflictInfo>, bool) {
        let limit = limit.clamp(1, MAX_CONFLICTS_PAGE);
        let mut ids: Vec<TwinId> = self.inner.conflicted.iter().map(|e| *e).collect();
        ids.sort();
        let mut out = Vec::new();
        let mut past = after.is_none();
        for id in ids {
            // The stored twin, decoded (no children to look up).
            let Some(t) = self.inner.twins.get(&id) else {
                continue;
            };
            let Some(map) = &t.siblings else { continue };
            let strategy = self
                .model_for(&t.entity_type)
                .map(|m| m.conflict.strategy)
                .unwrap_or_default();
            for (p, sides) in map.iter() {
                let cid = conflict_id(&id, p);
                if !past {
                    past = Some(cid.as_str()) == after;
                    continue;
                }
                if out.len() == limit {
                    return (out, true);
                }
                out.push(ConflictInfo {
                    id: cid,
                    twin_id: id,
                    entity_type: t.entity_type.clone(),
                    property: p.clone(),
                    strategy,
                    value: t.properties.get(p).cloned().unwrap_or(Value::Null),
                    sides: sides.iter().map(side_json).collect(),
                });
            }
        }
        (out, false)
    }

    /// How many twins hold open conflicts.
    pub fn open_conflict_twins(&self) -> usize {
        self.inner.conflicted.len()
    }

    /// The twin and property of an open conflict.
    pub fn find_conflict(&self, id: &str) -> Option<(Arc<Twin>, String)> {
        self.inner.conflicted.iter().find_map(|e| {
            let t = Arc::new(self.inner.twins.get(&e)?);
            let p = t
                .siblings
                .as_ref()?
                .keys()
                .find(|p| conflict_id(&t.id, p) == id)?
                .clone();
            Some((t, p))
        })
    }

    /// Resolve the open conflict `id` by writing `properties` to its twin (they must include
    /// the property in conflict): the write supersedes every side, here and on every node it
    /// reaches. A retired twin takes it too.
    ///
    /// # Errors
    /// `NotFound` for no such open conflict, `BadRequest` when `properties` leaves out the
    /// property in conflict, and every error of [`Registry::patch`].
    pub async fn resolve_conflict(
        &self,
        id: &str,
        properties: Properties,
    ) -> Result<Twin, RegistryError> {
        let (t, property) = self
            .find_conflict(id)
            .ok_or_else(|| RegistryError::NotFound(format!("open conflict {id}")))?;
        if !properties.contains_key(&property) {
            return Err(RegistryError::BadRequest(format!(
                "the conflict is on property {property:?}: `properties` must set it (or null to remove it)"
            )));
        }
        self.patch_settling(super::Update::new(t.id, properties), true)
            .await
    }

    /// Note that `twin` holds siblings or no longer does.
    pub(super) fn index_conflicts(&self, twin: &Twin) {
        if twin.siblings.is_some() {
            self.inner.conflicted.insert(twin.id);
        } else {
            self.inner.conflicted.remove(&twin.id);
        }
    }
}

/// The clock of the write `sides` shows first: the lww winner.
pub(super) fn main_clock(sides: &[Sibling]) -> Option<&PropClock> {
    sides.last().map(|s| &s.clock)
}
