//! The remote-apply seam: changes stamped on another node (a peer's change feed), merged
//! here on the writer thread without re-stamping them.
//!
//! Each property merges on its own: a write the other side had seen when it wrote gives way
//! to the later one; concurrent writes (neither side had seen the other's) go to the entity
//! type's conflict strategy ([`super::conflict`]; last-writer-wins by `(HLC, origin)` by
//! default), so every node that has seen the same writes holds the same values whatever
//! order they arrived in. A delete is a write of every property at the delete's clock: a twin
//! survives it only with the properties written after it, or with none when only its
//! lifecycle changed (or it was created) after it, and then loses its tombstone but keeps the
//! delete's clock (`deleted_hlc`, in its feed entry too, for nodes that never saw the
//! tombstone). The lifecycle is the one of the twin's latest change (its HLC). Concurrent
//! creates of one id agree on the first create's entity type, parent and creation time.
//! Version vectors merge pointwise.
//! Local models are not enforced on remote changes (the origin validated them); a change the
//! local model would refuse is applied and counted. Each merged change names the node that
//! made it as its origin (the rule is in [`super::origin`]).
//!
//! A `merge` strategy's resolver runs off the writer thread: a change whose merge needs a
//! resolver answer not given yet is left out of the commit and handed back with the calls it
//! needs ([`Registry::apply_remote_resolving`] makes them and merges it again).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::conflict::{self, Merged, Note, Resolutions, ResolveRequest};
use super::model::{ConflictPolicy, Strategy};
use super::origin::{self, Before};
use super::rels::{self, RelRecord};
use super::write::{change, put_tombstone};
use super::{Change, ChangeKind, Registry, RegistryError, Tombstone};
use crate::store::{keys, Batch, KvOp};
use crate::types::{Clocks, Lifecycle, PropClock, Properties, Sibling, Twin, TwinId, VClock};

/// A change made on another node, as its change feed shows it (`GET /v1/changes` items
/// deserialize into this).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoteChange {
    pub twin_id: TwinId,
    pub entity_type: String,
    #[serde(default)]
    pub parent_id: Option<TwinId>,
    /// A delete (a tombstone on the other node).
    #[serde(default)]
    pub deleted: bool,
    pub vclock: VClock,
    /// HLC of the twin's last change there (of the delete, for a tombstone).
    pub hlc: u64,
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// Current values (a removed property is absent, its clock still in `clocks`).
    #[serde(default)]
    pub properties: Properties,
    /// Clock and origin of the last write of each property.
    #[serde(default)]
    pub clocks: Clocks,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    /// The clock of the latest delete the twin outlived there (0: none). Carried because the
    /// delete's tombstone is gone from that node's feed once a later write brought the twin
    /// back: a node that never saw the tombstone learns the delete from here.
    #[serde(default)]
    pub deleted_hlc: u64,
    /// Properties in conflict there, with every concurrent write (`manual`, `merge`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub siblings: BTreeMap<String, Vec<Sibling>>,
    /// The twin's relationships there, tombstones included, with their clocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relationships: Vec<RelRecord>,
}

/// What a merge does to a twin's relationships: puts and tombstones newer than this node's,
/// and this node's that a delete the twin outlived takes.
#[derive(Default)]
struct RelMerge {
    set: Vec<RelRecord>,
    drop: Vec<(String, TwinId)>,
}

impl RelMerge {
    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.drop.is_empty()
    }
}

/// How far ahead of this node's host clock a change made elsewhere may be stamped. Beyond
/// that it is refused: one node whose clock runs in the future would otherwise drag every
/// node's clock along, and win every conflict until real time caught up.
pub const MAX_CLOCK_AHEAD: std::time::Duration = std::time::Duration::from_secs(300);

/// Rounds of resolver calls [`Registry::apply_remote_resolving`] makes for one batch: local
/// writes landing on a property while its resolver runs need another round. Past them the
/// property shows the lww winner, as when a resolver fails.
const MAX_RESOLVE_ROUNDS: usize = 4;

/// What [`Registry::apply_remote`] did.
#[derive(Debug, Default)]
pub struct RemoteOutcome {
    /// Changes refused: stamped more than [`MAX_CLOCK_AHEAD`] ahead of this node's clock.
    pub refused: usize,
    /// Changes that changed something here.
    pub applied: usize,
    /// Changes already seen or outdated.
    pub unchanged: usize,
    /// Applied changes the local model would have refused.
    pub model_mismatches: usize,
    /// Changes left out, with the resolver calls their merge needs first.
    pub pending: Vec<(RemoteChange, Vec<ResolveRequest>)>,
    /// Configuration writes not made because changes are pending (they go with the last).
    pub config_left: Vec<KvOp>,
}

/// What merging one remote change did.
enum Step {
    Changed,
    Unchanged,
    Pending(Vec<ResolveRequest>),
}

fn merge_vclock(into: &mut VClock, from: &VClock) {
    for (node, n) in from {
        let e = into.entry(node.clone()).or_insert(0);
        *e = (*e).max(*n);
    }
}

impl Registry {
    /// Merge changes made elsewhere (see the module doc). Each that changes something gets a
    /// change number here, is logged as the twin's whole state (or a delete) and becomes an
    /// event; clocks and origins are kept as they came. A `merge` strategy's resolver is not
    /// called: such conflicts show the lww winner (see [`Registry::apply_remote_resolving`]).
    ///
    /// # Errors
    /// Only the store's: overload or shutdown.
    pub async fn apply_remote(
        &self,
        changes: Vec<RemoteChange>,
    ) -> Result<RemoteOutcome, RegistryError> {
        self.apply_remote_resolving(changes, Vec::new(), |_| async {
            Err("no resolver runs here".to_owned())
        })
        .await
    }

    /// [`Registry::apply_remote`], with configuration writes (`config`) in the commit that
    /// completes the merge (a peer link stores how far it has merged together with the merge
    /// itself), and `resolve` to call a `merge` strategy's resolver (off the writer thread:
    /// the merge is retried with the answers).
    ///
    /// # Errors
    /// Only the store's: overload or shutdown.
    pub async fn apply_remote_resolving<F, Fut>(
        &self,
        changes: Vec<RemoteChange>,
        config: Vec<KvOp>,
        resolve: F,
    ) -> Result<RemoteOutcome, RegistryError>
    where
        F: Fn(ResolveRequest) -> Fut,
        Fut: Future<Output = Result<Value, String>>,
    {
        let mut resolutions = Resolutions::new();
        let mut total = RemoteOutcome::default();
        let (mut todo, mut config) = (changes, config);
        for round in 1..=MAX_RESOLVE_ROUNDS {
            let last = round == MAX_RESOLVE_ROUNDS;
            let res = Arc::new(std::mem::take(&mut resolutions));
            let out = self
                .merge_round(todo, config, Arc::clone(&res), last)
                .await?;
            resolutions = Arc::try_unwrap(res).unwrap_or_else(|r| (*r).clone());
            total.refused += out.refused;
            total.applied += out.applied;
            total.unchanged += out.unchanged;
            total.model_mismatches += out.model_mismatches;
            if out.pending.is_empty() {
                return Ok(total);
            }
            config = out.config_left;
            todo = Vec::with_capacity(out.pending.len());
            for (rc, requests) in out.pending {
                for req in requests {
                    if let std::collections::hash_map::Entry::Vacant(e) =
                        resolutions.entry(req.key())
                    {
                        e.insert(resolve(req).await);
                    }
                }
                todo.push(rc);
            }
        }
        unreachable!("the last round leaves nothing pending")
    }

    /// One commit of [`Registry::apply_remote_resolving`]. With `last`, a missing resolver
    /// answer counts as a failure (the lww winner shows) instead of leaving the change out.
    async fn merge_round(
        &self,
        changes: Vec<RemoteChange>,
        config: Vec<KvOp>,
        resolutions: Arc<Resolutions>,
        last: bool,
    ) -> Result<RemoteOutcome, RegistryError> {
        self.write(move |this, b, out| {
            let mut outcome = RemoteOutcome::default();
            let limit = ((Utc::now().timestamp_millis().max(0) as u64)
                + MAX_CLOCK_AHEAD.as_millis() as u64)
                << crate::types::HLC_COUNTER_BITS;
            for rc in changes {
                if rc.hlc > limit || rc.clocks.values().any(|c| c.hlc > limit) {
                    tracing::warn!(twin_id = %rc.twin_id, hlc = rc.hlc, "refused a remote change stamped more than {MAX_CLOCK_AHEAD:?} ahead of this node's clock");
                    outcome.refused += 1;
                    continue;
                }
                b.observe(rc.hlc);
                for c in rc.clocks.values() {
                    b.observe(c.hlc);
                }
                let step = if rc.deleted {
                    this.remote_delete(&rc, b, out, &resolutions, last)
                } else {
                    this.remote_write(&rc, b, out, &mut outcome, &resolutions, last)
                };
                match step {
                    Step::Changed => outcome.applied += 1,
                    Step::Unchanged => outcome.unchanged += 1,
                    Step::Pending(requests) => {
                        outcome.pending.push((rc, requests));
                    }
                }
            }
            if outcome.pending.is_empty() {
                for op in config {
                    b.config(op);
                }
            } else {
                outcome.config_left = config;
            }
            if outcome.model_mismatches > 0 {
                this.inner
                    .remote_model_mismatches
                    .fetch_add(outcome.model_mismatches as u64, Ordering::Relaxed);
                tracing::warn!(
                    count = outcome.model_mismatches,
                    "applied remote changes that the local model would refuse"
                );
            }
            outcome
        })
        .await
    }

    /// Remote changes applied although the local model would refuse them, since start.
    pub fn remote_model_mismatches(&self) -> u64 {
        self.inner.remote_model_mismatches.load(Ordering::Relaxed)
    }

    /// The conflict policy of `entity_type` here (lww without a model).
    fn policy_for(&self, entity_type: &str) -> ConflictPolicy {
        self.model_for(entity_type)
            .map(|m| m.conflict.clone())
            .unwrap_or_default()
    }

    /// A remote delete.
    fn remote_delete(
        &self,
        rc: &RemoteChange,
        b: &mut Batch,
        out: &mut Vec<Change>,
        res: &Resolutions,
        last: bool,
    ) -> Step {
        let id = rc.twin_id;
        let mut tombstones = self.inner.tombstones.write();
        if let Some(d) = tombstones.get(&id) {
            // Deleted here too: keep the later delete's clock and entity type (which differ
            // only after concurrent creates of one id; on equal clocks the larger type, so
            // that both nodes keep the same), merge what both saw.
            let mut vclock = d.vclock.clone();
            merge_vclock(&mut vclock, &rc.vclock);
            let (hlc, entity_type) = (d.hlc, &d.entity_type).max((rc.hlc, &rc.entity_type));
            if vclock == d.vclock && hlc == d.hlc && *entity_type == d.entity_type {
                return Step::Unchanged;
            }
            let stamp = b.stamp(None);
            let tomb = Tombstone {
                hlc,
                entity_type: entity_type.clone(),
                vclock,
                lseq: stamp.lseq,
                ..(**d).clone()
            };
            put_tombstone(b, &mut tombstones, tomb);
            return Step::Changed;
        }
        let Some(t) = self.inner.twins.get(&id) else {
            // Never seen here: remember the delete, so an older write arriving later does
            // not bring the twin back.
            let stamp = b.stamp(None);
            let tomb = Tombstone {
                id,
                entity_type: rc.entity_type.clone(),
                hlc: rc.hlc,
                vclock: rc.vclock.clone(),
                deleted_at: Utc::now(),
                lseq: stamp.lseq,
            };
            put_tombstone(b, &mut tombstones, tomb);
            return Step::Changed;
        };
        // Changed after the delete, the twin survives it, with the properties written after it
        // (none when only its lifecycle changed, or it was created, after it: the twin's clock
        // is its latest change's).
        let survives = t.hlc > rc.hlc || t.clocks.iter().any(|(_, c)| c.hlc > rc.hlc);
        let mut vclock = t.vclock.clone();
        merge_vclock(&mut vclock, &rc.vclock);
        if rc.hlc <= t.deleted_hlc && vclock == t.vclock {
            // A delete this twin has outlived already.
            return Step::Unchanged;
        }
        if !survives {
            let mut idx = self.inner.index.write();
            let stamp = b.stamp(None);
            self.inner.twins.remove(&id);
            self.inner.conflicted.remove(&id);
            self.inner.rels.write().remove(&id);
            idx.remove(&t);
            let tomb = Tombstone {
                id,
                // The delete's, as every node that keeps this delete's tombstone has it
                // (the twin here may have been taken for another type by a concurrent create).
                entity_type: rc.entity_type.clone(),
                hlc: rc.hlc,
                vclock: vclock.clone(),
                deleted_at: Utc::now(),
                lseq: stamp.lseq,
            };
            put_tombstone(b, &mut tombstones, tomb);
            b.delete(id);
            b.delete_history(&id, Utc::now());
            b.delete_prefix(keys::rel_prefix(&id));
            if self.wants_changes() {
                let before = Before {
                    clocks: &t.clocks,
                    vclock: &t.vclock,
                };
                let by = origin::merged(Some(before), &Clocks::new(), &vclock, &self.inner.origin);
                out.push(change(
                    ChangeKind::Deleted,
                    &t,
                    Properties::new(),
                    Utc::now(),
                    &stamp,
                    &by,
                ));
            }
            return Step::Changed;
        }
        drop(tombstones);
        let mut nt = t.clone();
        let mut patch = Properties::new();
        outlive_delete(&mut nt, rc.hlc, &mut patch);
        let policy = self.policy_for(&nt.entity_type);
        let mut notes = Vec::new();
        let was = t.siblings.as_deref();
        if let Err(requests) = settle(&mut nt, was, &policy, res, last, &mut patch, &mut notes) {
            return Step::Pending(requests);
        }
        nt.vclock = vclock;
        let rel_merge = self.merge_rels(id, &[], 0, nt.deleted_hlc);
        let stamp = b.stamp(None);
        self.finish_remote(nt, Some(&t), patch, notes, b, out, &stamp);
        self.apply_rels(id, rel_merge, b, out);
        Step::Changed
    }

    /// A remote write, merged property by property.
    fn remote_write(
        &self,
        rc: &RemoteChange,
        b: &mut Batch,
        out: &mut Vec<Change>,
        outcome: &mut RemoteOutcome,
        res: &Resolutions,
        last: bool,
    ) -> Step {
        let id = rc.twin_id;
        let mut tombstones = self.inner.tombstones.write();
        let tomb = tombstones.get(&id).cloned();
        let tomb_hlc = tomb.as_ref().map(|d| d.hlc);
        let current = self.inner.twins.get(&id);
        // Only writes after every delete seen here or there count: against a tombstone, or a
        // twin that outlived a delete.
        let floor = tomb_hlc
            .unwrap_or(0)
            .max(current.as_ref().map_or(0, |t| t.deleted_hlc))
            .max(rc.deleted_hlc);
        let after_delete = |c: &PropClock| c.hlc > floor;
        let mut nt = match &current {
            Some(t) => t.clone(),
            None => {
                if let Some(d) = tomb.as_ref().filter(|_| {
                    rc.hlc <= floor
                        && !rc.clocks.values().any(after_delete)
                        && !rc
                            .siblings
                            .values()
                            .flatten()
                            .any(|s| after_delete(&s.clock))
                }) {
                    // Written before the delete: nothing comes back, but the tombstone
                    // learns what the write saw.
                    let mut vclock = d.vclock.clone();
                    merge_vclock(&mut vclock, &rc.vclock);
                    if vclock == d.vclock {
                        return Step::Unchanged;
                    }
                    let stamp = b.stamp(None);
                    let merged = Tombstone {
                        vclock,
                        lseq: stamp.lseq,
                        ..(**d).clone()
                    };
                    put_tombstone(b, &mut tombstones, merged);
                    return Step::Changed;
                }
                fresh_twin(rc, tomb.as_deref())
            }
        };
        let local_vclock = nt.vclock.clone();
        // A delete the twin outlived there and this node never saw (its tombstone gave way to
        // the twin on every node this one hears from) takes what was written before it here too.
        let mut patch = Properties::new();
        outlive_delete(&mut nt, rc.deleted_hlc, &mut patch);
        let identity_changed = current.is_some() && merge_identity(&mut nt, rc);
        let policy = self.policy_for(&nt.entity_type);
        let mut notes = Vec::new();
        merge_properties(
            &mut nt,
            rc,
            floor,
            &policy,
            &local_vclock,
            &mut patch,
            &mut notes,
        );
        let was = current.as_ref().and_then(|t| t.siblings.as_deref());
        if let Err(requests) = settle(&mut nt, was, &policy, res, last, &mut patch, &mut notes) {
            return Step::Pending(requests);
        }
        let mut vclock = nt.vclock.clone();
        merge_vclock(&mut vclock, &rc.vclock);
        // The lifecycle of the later change wins; on equal clocks (two nodes may stamp the
        // same one) the later state in the lifecycle's order, so that both nodes pick it.
        let lifecycle_changed = rc.lifecycle != nt.lifecycle
            && (rc.hlc, rc.lifecycle as u8) > (nt.hlc, nt.lifecycle as u8);
        if lifecycle_changed {
            nt.lifecycle = rc.lifecycle;
        }
        let clocks_changed = current.as_ref().is_none_or(|t| {
            t.clocks != nt.clocks || t.deleted_hlc != nt.deleted_hlc || t.siblings != nt.siblings
        });
        let rel_merge = self.merge_rels(id, &rc.relationships, floor, nt.deleted_hlc);
        if !clocks_changed
            && !lifecycle_changed
            && !identity_changed
            && vclock == nt.vclock
            && rel_merge.is_empty()
        {
            return Step::Unchanged;
        }
        nt.vclock = vclock;
        nt.hlc = nt.hlc.max(rc.hlc);
        if let Some(m) = self.model_for(&nt.entity_type) {
            if m.validate_new(&nt.properties).is_err() {
                outcome.model_mismatches += 1;
            }
        }
        if tombstones.remove(&id).is_some() {
            b.delete_key(keys::tombstone(&id).to_vec());
        }
        drop(tombstones);
        let stamp = b.stamp(None);
        match &current {
            None => self.inner.index.write().insert(&nt),
            Some(t) if identity_changed => self.inner.index.write().reidentify(t, &nt),
            Some(_) => {}
        }
        self.finish_remote(nt, current.as_ref(), patch, notes, b, out, &stamp);
        self.apply_rels(id, rel_merge, b, out);
        Step::Changed
    }

    /// The relationship changes merging `theirs` (the relationships of twin `id` there) makes
    /// here: each of theirs written after every delete seen (`floor`, `deleted_hlc`) and newer
    /// than ours; and ours written before the delete the twin outlived (`deleted_hlc`), except
    /// those stored before relationships had clocks.
    fn merge_rels(
        &self,
        id: TwinId,
        theirs: &[RelRecord],
        floor: u64,
        deleted_hlc: u64,
    ) -> RelMerge {
        let all = self.inner.rels.read();
        let ours = all.get(&id);
        let mut m = RelMerge::default();
        for ((name, target), s) in ours.into_iter().flatten() {
            if s.hlc > 0 && s.hlc <= deleted_hlc {
                m.drop.push((name.clone(), *target));
            }
        }
        for r in theirs {
            if r.hlc <= floor.max(deleted_hlc) {
                continue;
            }
            let newer = ours
                .and_then(|o| o.get(&(r.name.clone(), r.target_id)))
                .is_none_or(|s| (r.hlc, &*r.origin) > s.key());
            if newer {
                m.set.push(r.clone());
            }
        }
        m
    }

    /// Store what [`Registry::merge_rels`] found (the twin's feed entry is renumbered by the
    /// merge itself), with a `relationship.changed` event per change made elsewhere.
    fn apply_rels(&self, id: TwinId, m: RelMerge, b: &mut Batch, out: &mut Vec<Change>) {
        if m.is_empty() {
            return;
        }
        let mut all = self.inner.rels.write();
        for (name, target) in m.drop {
            b.delete_key(keys::rel(&id, &target, &name));
            if let Some(mine) = all.get_mut(&id) {
                mine.remove(&(name, target));
            }
        }
        for r in m.set {
            let state = r.state();
            b.put(keys::rel(&id, &r.target_id, &r.name), rels::encode(&state));
            if self.wants_changes() {
                let stamp = b.stamp(None);
                let data = super::write::rel_data(&r.name, r.target_id, r.properties.as_ref());
                out.push(super::write::rel_change(
                    &self.inner.twins,
                    id,
                    data,
                    &stamp,
                    &r.origin,
                ));
            }
            all.entry(id)
                .or_default()
                .insert((r.name, r.target_id), state);
        }
        if all.get(&id).is_some_and(|m| m.is_empty()) {
            all.remove(&id);
        }
    }

    /// Store a merged twin: new version and change number, logged whole, evented with the
    /// origin the merge names (`before`: the twin here before the merge), followed by the
    /// conflict events of the merge.
    #[allow(clippy::too_many_arguments)]
    fn finish_remote(
        &self,
        mut nt: Twin,
        before: Option<&Twin>,
        patch: Properties,
        notes: Vec<Note>,
        b: &mut Batch,
        out: &mut Vec<Change>,
        stamp: &crate::store::wal::Stamp,
    ) {
        let created = nt.version == 0;
        nt.version += 1;
        nt.lseq = stamp.lseq;
        nt.updated_at = Utc::now();
        b.state(&nt);
        b.numbered(stamp.lseq, nt.id);
        if self.wants_changes() {
            let (kind, changed) = if created {
                (ChangeKind::Created, nt.properties.clone())
            } else {
                (ChangeKind::Updated, patch)
            };
            let before = before.map(|t| Before {
                clocks: &t.clocks,
                vclock: &t.vclock,
            });
            let by = origin::merged(before, &nt.clocks, &nt.vclock, &self.inner.origin);
            out.push(change(kind, &nt, changed, nt.updated_at, stamp, &by));
        }
        self.index_conflicts(&nt);
        if !notes.is_empty() {
            self.conflict_events(b, out, &nt, notes);
        }
        self.inner.twins.insert(&nt);
    }
}

/// A twin first seen in a remote write (or back from a delete, keeping what it saw).
fn fresh_twin(rc: &RemoteChange, tomb: Option<&Tombstone>) -> Twin {
    Twin {
        id: rc.twin_id,
        entity_type: rc.entity_type.clone(),
        properties: Properties::new(),
        version: 0,
        vclock: tomb.map(|d| d.vclock.clone()).unwrap_or_default(),
        parent_id: rc.parent_id,
        children_ids: BTreeSet::new(),
        lifecycle: rc.lifecycle,
        created_at: rc.created_at.unwrap_or_else(Utc::now),
        updated_at: Utc::now(),
        hlc: 0,
        lseq: 0,
        clocks: Clocks::new(),
        deleted_hlc: tomb.map_or(0, |d| d.hlc).max(rc.deleted_hlc),
        siblings: None,
    }
}

/// Concurrent creates of one id (each on a node that had not seen the other) may disagree on
/// what the twin is: the first create wins (the earlier `created_at`; on a tie the smaller
/// entity type, then parent), on every node whatever the order the creates arrive in. Returns
/// whether `nt` took the remote identity.
fn merge_identity(nt: &mut Twin, rc: &RemoteChange) -> bool {
    let Some(created_at) = rc.created_at else {
        return false;
    };
    if (created_at, &rc.entity_type, rc.parent_id) >= (nt.created_at, &nt.entity_type, nt.parent_id)
    {
        return false;
    }
    nt.created_at = created_at;
    nt.entity_type.clone_from(&rc.entity_type);
    nt.parent_id = rc.parent_id;
    true
}

/// The effect of a delete at `hlc` on a twin that outlives it (by what was written after
/// it): everything written before goes, clocks and siblings too, so that a node that saw the
/// delete first and the later writes after it holds exactly the same. Removed values are
/// noted in `patch`. Siblings left alone are settled by [`settle`].
fn outlive_delete(nt: &mut Twin, hlc: u64, patch: &mut Properties) {
    if hlc <= nt.deleted_hlc {
        return;
    }
    let gone: Vec<String> = nt
        .clocks
        .iter()
        .filter(|(_, c)| c.hlc <= hlc)
        .map(|(k, _)| k.to_owned())
        .collect();
    for k in gone {
        if nt.properties.remove(&k).is_some() {
            patch.insert(k.clone(), Value::Null);
        }
        nt.clocks.remove(&k);
    }
    if let Some(map) = nt.siblings.as_mut() {
        for sides in map.values_mut() {
            sides.retain(|s| s.clock.hlc > hlc);
        }
    }
    nt.deleted_hlc = hlc;
}

/// Make `w` the one write of `k`.
fn set_write(nt: &mut Twin, k: &str, w: Sibling, patch: &mut Properties) {
    show(nt, k, w.value, patch);
    nt.clocks.insert(k, w.clock);
    if let Some(map) = nt.siblings.as_mut() {
        map.remove(k);
        if map.is_empty() {
            nt.siblings = None;
        }
    }
}

/// Show `value` as `k` (`null`: absent), noting a change in `patch`.
fn show(nt: &mut Twin, k: &str, value: Value, patch: &mut Properties) {
    if value.is_null() {
        if nt.properties.remove(k).is_some() {
            patch.insert(k.to_owned(), Value::Null);
        }
    } else if nt.properties.get(k) != Some(&value) {
        patch.insert(k.to_owned(), value.clone());
        nt.properties.insert(k.to_owned(), value);
    }
}

/// Merge each remote property (its write, or its siblings) written after every delete seen
/// here (`floor`) with ours (made where the version vector was `local_vclock`), by the
/// strategy. Siblings it leaves get their value in [`settle`].
fn merge_properties(
    nt: &mut Twin,
    rc: &RemoteChange,
    floor: u64,
    policy: &ConflictPolicy,
    local_vclock: &VClock,
    patch: &mut Properties,
    notes: &mut Vec<Note>,
) {
    let names: BTreeSet<&str> = rc
        .clocks
        .keys()
        .chain(rc.siblings.keys().map(String::as_str))
        .collect();
    for k in names {
        let mut theirs = conflict::writes_of(&rc.properties, &rc.clocks, Some(&rc.siblings), k);
        theirs.retain(|w| w.clock.hlc > floor);
        let ours = conflict::writes_of(&nt.properties, &nt.clocks, nt.siblings.as_deref(), k);
        let strategy = policy.strategy;
        let sides = || {
            let mut all: Vec<Sibling> = ours.iter().chain(theirs.iter()).cloned().collect();
            all.sort_by(|a, b| a.clock.lww_key().cmp(&b.clock.lww_key()));
            all.dedup_by(|a, b| a.clock == b.clock);
            all
        };
        let Some((merged, met)) = conflict::merge_writes(
            strategy,
            ours.clone(),
            theirs.clone(),
            local_vclock,
            &rc.vclock,
        ) else {
            continue;
        };
        match merged {
            Merged::One(w) => {
                if met && matches!(strategy, Strategy::Lww | Strategy::Version) {
                    notes.push(Note::Detected {
                        property: k.to_owned(),
                        strategy,
                        sides: sides(),
                        value: w.value.clone(),
                        error: None,
                    });
                }
                set_write(nt, k, w, patch);
            }
            // The property's clock and value follow in `settle`.
            Merged::Many(all) => {
                nt.siblings
                    .get_or_insert_with(Default::default)
                    .insert(k.to_owned(), all);
            }
        }
    }
}

/// Give each property whose siblings changed in this merge (against `was`, the twin's
/// siblings here before it) its value: the lww winner (`manual`, and `merge` when its resolver failed) or
/// the resolver's answer from `res`. A property left with one write (or none) is no longer
/// in conflict. Notes the conflicts found and ended. Without an answer it needs (unless
/// `last`), returns the resolver calls to make first.
fn settle(
    nt: &mut Twin,
    was: Option<&BTreeMap<String, Vec<Sibling>>>,
    policy: &ConflictPolicy,
    res: &Resolutions,
    last: bool,
    patch: &mut Properties,
    notes: &mut Vec<Note>,
) -> Result<(), Vec<ResolveRequest>> {
    let mut pending = Vec::new();
    let names: Vec<String> = nt
        .siblings
        .as_deref()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    for k in names {
        let sides = nt
            .siblings
            .as_deref()
            .and_then(|m| m.get(&k))
            .cloned()
            .unwrap_or_default();
        if was.and_then(|m| m.get(&k)) == Some(&sides) {
            continue;
        }
        if sides.len() < 2 {
            match sides.into_iter().next() {
                Some(w) => set_write(nt, &k, w, patch),
                None => {
                    if let Some(map) = nt.siblings.as_mut() {
                        map.remove(&k);
                    }
                }
            }
            continue;
        }
        if let Some(c) = conflict::main_clock(&sides) {
            nt.clocks.insert(&k, c.clone());
        }
        let (value, error) = match conflict::shown_value(nt.id, &k, policy, &sides, res, last) {
            Ok(shown) => shown,
            Err(req) => {
                pending.push(req);
                continue;
            }
        };
        if let Some(e) = &error {
            tracing::warn!(twin_id = %nt.id, property = %k, error = %e, "conflict resolver failed; the property shows the last writer's value");
        }
        show(nt, &k, value.clone(), patch);
        notes.push(Note::Detected {
            property: k,
            strategy: policy.strategy,
            sides,
            value,
            error,
        });
    }
    if nt.siblings.as_deref().is_some_and(BTreeMap::is_empty) {
        nt.siblings = None;
    }
    if !pending.is_empty() {
        return Err(pending);
    }
    if let Some(was) = was {
        for k in was.keys() {
            if nt.siblings.as_deref().is_none_or(|m| !m.contains_key(k)) {
                notes.push(Note::Resolved {
                    property: k.clone(),
                    value: nt.properties.get(k).cloned().unwrap_or(Value::Null),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use proptest::prelude::*;
    use proptest::strategy::Strategy;
    use serde_json::json;

    const ORIGINS: [&str; 3] = ["a", "b", "c"];
    const IDS: [&str; 2] = [
        "01900000-0000-7000-8000-000000000001",
        "01900000-0000-7000-8000-000000000002",
    ];

    /// A registry on a fresh data directory.
    fn open(node: &str) -> (Registry, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (Registry::open(&store, node).unwrap(), dir)
    }

    /// A remote change: a write of some properties or a delete of one of two twins. A
    /// property's value (or its removal) follows from its clock, as it does in a real
    /// system where `(hlc, origin)` names one write.
    fn remote_change() -> impl Strategy<Value = RemoteChange> {
        (
            0..IDS.len(),
            prop::bool::weighted(0.25),
            1u64..30,
            0..ORIGINS.len(),
            prop::collection::btree_map(0..3usize, (1u64..30, 0..ORIGINS.len()), 0..3),
        )
            .prop_map(|(t, deleted, hlc, o, props)| {
                let mut rc = RemoteChange {
                    twin_id: IDS[t].parse().unwrap(),
                    entity_type: "machine".into(),
                    parent_id: None,
                    deleted,
                    vclock: VClock::from([(ORIGINS[o].to_owned(), hlc)]),
                    hlc,
                    lifecycle: Lifecycle::Active,
                    properties: Properties::new(),
                    clocks: Clocks::new(),
                    created_at: None,
                    deleted_hlc: 0,
                    siblings: Default::default(),
                    relationships: Vec::new(),
                };
                if deleted {
                    return rc;
                }
                for (p, (h, po)) in props {
                    let name = format!("p{p}");
                    if !(h + po as u64).is_multiple_of(5) {
                        rc.properties
                            .insert(name.clone(), json!(format!("{name}@{h}@{po}")));
                    }
                    rc.clocks.insert(
                        &name,
                        PropClock {
                            hlc: h,
                            origin: Arc::from(ORIGINS[po]),
                            n: 0,
                            v: 0,
                        },
                    );
                    rc.hlc = rc.hlc.max(h);
                }
                rc
            })
    }

    /// What must agree between replicas: existence, values, clocks, version vectors, the
    /// twin's clock (its lifecycle's order), and a tombstone's clock and version vector.
    fn state(r: &Registry) -> Vec<String> {
        IDS.iter()
            .map(|id| {
                let id: TwinId = id.parse().unwrap();
                match (r.get(&id), r.inner.tombstones.read().get(&id)) {
                    (Ok(t), _) => format!(
                        "twin {} {:?} {:?} at {} after delete {}",
                        Value::Object(t.properties.clone()),
                        t.clocks,
                        t.vclock,
                        t.hlc,
                        t.deleted_hlc
                    ),
                    (Err(_), Some(d)) => format!("tombstone {} {:?}", d.hlc, d.vclock),
                    (Err(_), None) => "absent".into(),
                }
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Last-writer-wins converges: the same remote changes applied one by one in two
        /// different orders leave two replicas identical, and applying them all again
        /// changes nothing.
        #[test]
        fn lww_is_independent_of_the_order_of_application(
            changes in prop::collection::vec(remote_change(), 1..10),
            order in Just(()).prop_perturb(|_, mut rng| rng.random::<u64>()),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (one, _d1) = open("x");
            let (two, _d2) = open("y");
            let mut shuffled = changes.clone();
            // A permutation from the seed (Fisher-Yates).
            let mut seed = order;
            for i in (1..shuffled.len()).rev() {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (seed >> 33) as usize % (i + 1));
            }
            let (s1, s2, again) = rt.block_on(async {
                for c in &changes {
                    one.apply_remote(vec![c.clone()]).await.unwrap();
                }
                for c in &shuffled {
                    two.apply_remote(vec![c.clone()]).await.unwrap();
                }
                let again = two.apply_remote(changes.clone()).await.unwrap();
                (state(&one), state(&two), again)
            });
            one.shutdown();
            two.shutdown();
            prop_assert_eq!(s1, s2);
            prop_assert_eq!(again.applied, 0);
        }
    }

    /// A merged remote change keeps its clocks and origin (no re-stamping), takes only the
    /// properties it wrote last, merges version vectors, and survives a restart; the local
    /// clock continues above the highest clock seen.
    #[test]
    fn apply_remote_keeps_remote_clocks_and_survives_restart() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Four minutes ahead: within what a remote clock may be ahead of this one.
        let far = (Utc::now().timestamp_millis() as u64 + 240_000) << 16;
        let id: TwinId = IDS[0].parse().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let r = Registry::open(&store, "local").unwrap();
            rt.block_on(async {
                let t = r
                    .create(super::super::NewTwin {
                        id: Some(id),
                        entity_type: "machine".into(),
                        properties: json!({"a": 1, "b": 1}).as_object().unwrap().clone(),
                        parent_id: None,
                    })
                    .await
                    .unwrap();
                let rc = RemoteChange {
                    twin_id: id,
                    entity_type: "machine".into(),
                    parent_id: None,
                    deleted: false,
                    vclock: VClock::from([("edge".to_owned(), 7)]),
                    hlc: far,
                    lifecycle: Lifecycle::Active,
                    properties: json!({"a": 2, "b": 2}).as_object().unwrap().clone(),
                    // `a` written later there, `b` earlier than here.
                    clocks: Clocks::from([
                        (
                            "a",
                            PropClock {
                                hlc: far,
                                origin: Arc::from("edge"),
                                n: 0,
                                v: 0,
                            },
                        ),
                        (
                            "b",
                            PropClock {
                                hlc: 1,
                                origin: Arc::from("edge"),
                                n: 0,
                                v: 0,
                            },
                        ),
                    ]),
                    created_at: None,
                    deleted_hlc: 0,
                    siblings: Default::default(),
                    relationships: Vec::new(),
                };
                let out = r.apply_remote(vec![rc.clone()]).await.unwrap();
                assert_eq!(out.applied, 1);
                let t2 = r.get(&id).unwrap();
                assert_eq!(
                    Value::Object(t2.properties.clone()),
                    json!({"a": 2, "b": 1})
                );
                assert_eq!(t2.clocks["a"].hlc, far);
                assert_eq!(&*t2.clocks["a"].origin, "edge");
                assert_eq!(t2.clocks["b"], t.clocks["b"]);
                assert_eq!(
                    t2.vclock,
                    VClock::from([("edge".into(), 7), ("local".into(), 1)])
                );
                assert_eq!(r.apply_remote(vec![rc.clone()]).await.unwrap().unchanged, 1);
                // A clock ten minutes ahead of this node's is refused.
                let ahead = (Utc::now().timestamp_millis() as u64 + 600_000) << 16;
                let mut too_far = rc;
                too_far.hlc = ahead;
                let out = r.apply_remote(vec![too_far]).await.unwrap();
                assert_eq!((out.refused, out.applied), (1, 0));
            });
            r.shutdown();
        }
        // Tasks of the first registry left on the runtime could still hold the store (the
        // suite once failed here under load with sled's lock taken): a fresh runtime.
        drop(rt);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r = Registry::open(&store, "local").unwrap();
        let t = r.get(&id).unwrap();
        assert_eq!(Value::Object(t.properties.clone()), json!({"a": 2, "b": 1}));
        assert_eq!(&*t.clocks["a"].origin, "edge");
        // The local clock continues above the remote clock it saw (minutes ahead).
        let t3 = rt
            .block_on(r.patch(super::super::Update::new(
                id,
                json!({"b": 3}).as_object().unwrap().clone(),
            )))
            .unwrap();
        assert!(t3.clocks["b"].hlc > far, "{} <= {far}", t3.clocks["b"].hlc);
        r.shutdown();
    }
}
