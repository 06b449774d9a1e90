//! The remote-apply seam: changes stamped on another node (a peer's change feed), merged
//! here on the writer thread without re-stamping them.
//!
//! The merge is last-writer-wins per property by `(HLC, origin)`: each property keeps the
//! value of the write with the higher clock, wherever it was made, so every node that has seen
//! the same writes holds the same values whatever order they arrived in. A delete is a write
//! of every property at the delete's clock: a twin survives it only with the properties
//! written after it, or with none when only its lifecycle changed (or it was created) after
//! it, and then loses its tombstone but keeps the delete's clock (`deleted_hlc`, in its feed
//! entry too, for nodes that never saw the tombstone). The lifecycle is the one of the twin's
//! latest change (its HLC). Concurrent creates of one id agree on the first create's entity
//! type, parent and creation time. Version vectors merge pointwise.
//! Local models are not enforced on remote changes (the origin validated them); a change the
//! local model would refuse is applied and counted. Each merged change names the node that
//! made it as its origin (the rule is in [`super::origin`]).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::origin::{self, Before};
use super::write::{change, put_tombstone};
use super::{Change, ChangeKind, Registry, RegistryError, Tombstone};
use crate::store::{keys, Batch};
use crate::types::{Clocks, Lifecycle, PropClock, Properties, Twin, TwinId, VClock};

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
}

/// How far ahead of this node's host clock a change made elsewhere may be stamped. Beyond
/// that it is refused: one node whose clock runs in the future would otherwise drag every
/// node's clock along, and win every conflict until real time caught up.
pub const MAX_CLOCK_AHEAD: std::time::Duration = std::time::Duration::from_secs(300);

/// What [`Registry::apply_remote`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RemoteOutcome {
    /// Changes refused: stamped more than [`MAX_CLOCK_AHEAD`] ahead of this node's clock.
    pub refused: usize,
    /// Changes that changed something here.
    pub applied: usize,
    /// Changes already seen or outdated.
    pub unchanged: usize,
    /// Applied changes the local model would have refused.
    pub model_mismatches: usize,
}

fn newer(a: &PropClock, b: Option<&PropClock>) -> bool {
    b.is_none_or(|b| (a.hlc, &*a.origin) > (b.hlc, &*b.origin))
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
    /// event; clocks and origins are kept as they came.
    ///
    /// # Errors
    /// Only the store's: overload or shutdown.
    pub async fn apply_remote(
        &self,
        changes: Vec<RemoteChange>,
    ) -> Result<RemoteOutcome, RegistryError> {
        self.apply_remote_with(changes, Vec::new()).await
    }

    /// [`Registry::apply_remote`], with configuration writes (`config`) in the same commit:
    /// a peer link stores how far it has merged together with the merge itself.
    ///
    /// # Errors
    /// Only the store's: overload or shutdown.
    pub async fn apply_remote_with(
        &self,
        changes: Vec<RemoteChange>,
        config: Vec<crate::store::KvOp>,
    ) -> Result<RemoteOutcome, RegistryError> {
        self.write(move |this, b, out| {
            for op in config {
                b.config(op);
            }
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
                let changed = if rc.deleted {
                    this.remote_delete(&rc, b, out)
                } else {
                    this.remote_write(rc, b, out, &mut outcome)
                };
                if changed {
                    outcome.applied += 1;
                } else {
                    outcome.unchanged += 1;
                }
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

    /// A remote delete. Returns whether anything changed here.
    fn remote_delete(&self, rc: &RemoteChange, b: &mut Batch, out: &mut Vec<Change>) -> bool {
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
                return false;
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
            return true;
        }
        let mut idx = self.inner.index.write();
        let Some(t) = self.inner.twins.0.get(&id).map(|t| Arc::clone(&t)) else {
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
            return true;
        };
        // Changed after the delete, the twin survives it, with the properties written after it
        // (none when only its lifecycle changed, or it was created, after it: the twin's clock
        // is its latest change's).
        let survives = t.hlc > rc.hlc || t.clocks.iter().any(|(_, c)| c.hlc > rc.hlc);
        let mut vclock = t.vclock.clone();
        merge_vclock(&mut vclock, &rc.vclock);
        if rc.hlc <= t.deleted_hlc && vclock == t.vclock {
            // A delete this twin has outlived already.
            return false;
        }
        let stamp = b.stamp(None);
        if !survives {
            self.inner.twins.0.remove(&id);
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
            b.delete_prefix(keys::history_twin_prefix(&id));
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
            return true;
        }
        let mut nt = (*t).clone();
        let mut patch = Properties::new();
        outlive_delete(&mut nt, rc.hlc, &mut patch);
        nt.vclock = vclock;
        self.finish_remote(nt, Some(&t), patch, b, out, &stamp);
        true
    }

    /// A remote write: per-property last-writer-wins. Returns whether anything changed.
    fn remote_write(
        &self,
        rc: RemoteChange,
        b: &mut Batch,
        out: &mut Vec<Change>,
        outcome: &mut RemoteOutcome,
    ) -> bool {
        let id = rc.twin_id;
        let mut tombstones = self.inner.tombstones.write();
        let tomb = tombstones.get(&id).cloned();
        let tomb_hlc = tomb.as_ref().map(|d| d.hlc);
        let current = self.inner.twins.0.get(&id).map(|t| Arc::clone(&t));
        // Only writes after every delete seen here or there count: against a tombstone, or a
        // twin that outlived a delete.
        let floor = tomb_hlc
            .unwrap_or(0)
            .max(current.as_ref().map_or(0, |t| t.deleted_hlc))
            .max(rc.deleted_hlc);
        let after_delete = |c: &PropClock| c.hlc > floor;
        let mut nt = match &current {
            Some(t) => (**t).clone(),
            None => {
                if let Some(d) = tomb
                    .as_ref()
                    .filter(|_| rc.hlc <= floor && !rc.clocks.values().any(after_delete))
                {
                    // Written before the delete: nothing comes back, but the tombstone
                    // learns what the write saw.
                    let mut vclock = d.vclock.clone();
                    merge_vclock(&mut vclock, &rc.vclock);
                    if vclock == d.vclock {
                        return false;
                    }
                    let stamp = b.stamp(None);
                    let merged = Tombstone {
                        vclock,
                        lseq: stamp.lseq,
                        ..(**d).clone()
                    };
                    put_tombstone(b, &mut tombstones, merged);
                    return true;
                }
                fresh_twin(&rc, tomb.as_deref())
            }
        };
        // A delete the twin outlived there and this node never saw (its tombstone gave way to
        // the twin on every node this one hears from) takes what was written before it here too.
        let mut patch = Properties::new();
        outlive_delete(&mut nt, rc.deleted_hlc, &mut patch);
        patch.extend(merge_properties(&mut nt, &rc, floor));
        let mut vclock = nt.vclock.clone();
        merge_vclock(&mut vclock, &rc.vclock);
        // The lifecycle of the later change wins; on equal clocks (two nodes may stamp the
        // same one) the later state in the lifecycle's order, so that both nodes pick it.
        let lifecycle_changed = rc.lifecycle != nt.lifecycle
            && (rc.hlc, rc.lifecycle as u8) > (nt.hlc, nt.lifecycle as u8);
        if lifecycle_changed {
            nt.lifecycle = rc.lifecycle;
        }
        let identity_changed = current.is_some() && merge_identity(&mut nt, &rc);
        let clocks_changed = current
            .as_ref()
            .is_none_or(|t| t.clocks != nt.clocks || t.deleted_hlc != nt.deleted_hlc);
        if !clocks_changed && !lifecycle_changed && !identity_changed && vclock == nt.vclock {
            return false;
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
        self.finish_remote(nt, current.as_deref(), patch, b, out, &stamp);
        true
    }

    /// Store a merged twin: new version and change number, logged whole, evented with the
    /// origin the merge names (`before`: the twin here before the merge).
    fn finish_remote(
        &self,
        mut nt: Twin,
        before: Option<&Twin>,
        patch: Properties,
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
        self.inner.twins.0.insert(nt.id, Arc::new(nt));
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
/// it): everything written before goes, clocks too, so that a node that saw the delete first
/// and the later writes after it holds exactly the same. Removed values are noted in `patch`.
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
    nt.deleted_hlc = hlc;
}

/// Per-property last-writer-wins: take each remote property (or its removal) whose clock is
/// newer than ours and later than every delete seen here (`floor`). Returns the merge patch
/// of what changed.
fn merge_properties(nt: &mut Twin, rc: &RemoteChange, floor: u64) -> Properties {
    let mut patch = Properties::new();
    for (k, c) in rc.clocks.iter() {
        if c.hlc <= floor || !newer(c, nt.clocks.get(k)) {
            continue;
        }
        match rc.properties.get(k) {
            Some(v) => {
                if nt.properties.get(k) != Some(v) {
                    patch.insert(k.to_owned(), v.clone());
                }
                nt.properties.insert(k.to_owned(), v.clone());
            }
            None => {
                if nt.properties.remove(k).is_some() {
                    patch.insert(k.to_owned(), Value::Null);
                }
            }
        }
        nt.clocks.insert(k, c.clone());
    }
    patch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use proptest::prelude::*;
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
                            },
                        ),
                        (
                            "b",
                            PropClock {
                                hlc: 1,
                                origin: Arc::from("edge"),
                            },
                        ),
                    ]),
                    created_at: None,
                    deleted_hlc: 0,
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
