//! The one write path. Every mutating method sends a job to the store's writer thread, which
//! runs jobs one at a time: validate, change memory, append the log entries and history
//! samples to the commit's batch. The method returns once the batch is durable, then
//! publishes the changes on the feed. [`super::replay`] re-applies a log tail after a crash.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::feed::Tombstones;
use super::models_sync::{stored, ModelClock};
use super::rels::{self, RelState};
use super::{
    check_name, AlertRecord, BatchOutcome, Change, ChangeKind, Model, NewTwin, Registry,
    RegistryError, Tombstone, TwinMap, Update, MAX_PROPERTIES, MAX_VALUE_DEPTH,
};
use crate::store::wal::Stamp;
use crate::store::{keys, Batch, KvOp};
use crate::types::{Dot, Lifecycle, Properties, Twin, TwinId, VClock};

/// Twins a cascading delete removes per durable commit.
pub const DELETE_CHUNK: usize = 10_000;

/// Record a history sample for each numeric property of `props`.
pub(super) fn points(batch: &mut Batch, id: TwinId, props: &Properties, ts: DateTime<Utc>) {
    let us = ts.timestamp_micros();
    for (name, v) in props {
        if let Some(x) = v.as_f64() {
            batch.point(id, name, us, x);
        }
    }
}

pub(super) fn bump(vclock: &mut VClock, node: &str) {
    match vclock.get_mut(node) {
        Some(n) => *n += 1,
        None => {
            vclock.insert(node.to_owned(), 1);
        }
    }
}

/// Merge-patch `props` (RFC 7396 per property; `null` removes).
pub(super) fn merge(props: &mut Properties, patch: &Properties) {
    for (k, v) in patch {
        if v.is_null() {
            props.remove(k);
        } else if let Some(cur) = props.get_mut(k) {
            json_patch::merge(cur, v);
        } else {
            let mut fresh = Value::Null;
            json_patch::merge(&mut fresh, v);
            props.insert(k.clone(), fresh);
        }
    }
}

/// The change of `t` that `stamp` numbers, made on `origin`.
pub(super) fn change(
    kind: ChangeKind,
    t: &Twin,
    changed: Properties,
    ts: DateTime<Utc>,
    stamp: &Stamp,
    origin: &Arc<str>,
) -> Change {
    Change {
        seq: stamp.lseq,
        hlc: stamp.hlc,
        kind,
        twin_id: Some(t.id),
        entity_type: t.entity_type.clone(),
        parent_id: t.parent_id,
        version: t.version,
        changed,
        lifecycle: t.lifecycle,
        ts,
        cause: stamp.cause.clone().map(Arc::new),
        data: None,
        origin: origin.clone(),
        origin_seq: None,
    }
}

impl Registry {
    fn is_retired(&self, id: &TwinId) -> bool {
        self.inner.twins.lifecycle(id) == Some(Lifecycle::Retired)
    }
}

/// The limits every patch meets: property count and value nesting depth.
pub fn check_patch(patch: &Properties) -> Result<(), RegistryError> {
    if patch.len() > MAX_PROPERTIES {
        return Err(RegistryError::BadRequest(format!(
            "a patch names at most {MAX_PROPERTIES} properties"
        )));
    }
    check_depth(patch)
}

/// Refuse values nested deeper than [`MAX_VALUE_DEPTH`].
fn check_depth(props: &Properties) -> Result<(), RegistryError> {
    fn depth(v: &Value) -> usize {
        match v {
            Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    for (name, v) in props {
        if depth(v) > MAX_VALUE_DEPTH {
            return Err(RegistryError::BadRequest(format!(
                "property {name:?} nests arrays and objects more than {MAX_VALUE_DEPTH} levels deep"
            )));
        }
    }
    Ok(())
}

impl Registry {
    /// Run `f` on the writer thread; wait until what it logged is durable; publish its changes.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry, &mut Batch, &mut Vec<Change>) -> T + Send + 'static,
    ) -> Result<T, RegistryError> {
        let this = self.clone();
        let sink = self.inner.sink.get().cloned();
        let durable = self.inner.durable.clone();
        let out = self
            .inner
            .commit
            .run_then(
                move |b| {
                    let mut changes = Vec::new();
                    let out = f(&this, b, &mut changes);
                    // The job's twins take their new places in the change feed at once (one
                    // lock per job, not per change).
                    let numbered = b.take_numbered();
                    let top = numbered.last().map(|&(lseq, _)| lseq);
                    if !numbered.is_empty() {
                        this.inner.feed.lock().extend(numbered);
                    }
                    this.compact_feed();
                    (out, (changes, top))
                },
                move |(changes, top)| {
                    // Numbers are handed out and made durable in order: everything up to
                    // `top` is durable now, and the feed may show it to peers.
                    if let Some(top) = top {
                        durable.send_if_modified(|d| {
                            let moved = top > *d;
                            *d = (*d).max(top);
                            moved
                        });
                    }
                    if let (Some(sink), false) = (sink, changes.is_empty()) {
                        sink(changes);
                    }
                },
            )
            .await?;
        Ok(out)
    }

    /// Drop the feed's stale entries once they outnumber the live ones. On the writer
    /// thread, between jobs (no twin is held).
    fn compact_feed(&self) {
        if self.inner.feed.lock().len() <= 1 << 16 {
            return;
        }
        let live = self.inner.twins.len() + self.inner.tombstones.read().len();
        let mut feed = self.inner.feed.lock();
        if !feed.wants_compaction(live) {
            return;
        }
        let tombstones = self.inner.tombstones.read();
        feed.compact(|lseq, id| {
            self.inner.twins.lseq(&id) == Some(lseq)
                || tombstones.get(&id).is_some_and(|d| d.lseq == lseq)
        });
    }

    /// Drop expired tombstones (their ids may be used again). Returns how many went.
    pub async fn sweep_tombstones(&self) -> Result<usize, RegistryError> {
        let retention = self.tombstone_retention();
        self.write(move |this, b, _| {
            let now = Utc::now();
            let mut tombstones = this.inner.tombstones.write();
            let before = tombstones.len();
            tombstones.retain(|id, d| {
                let keep = !d.expired(retention, now);
                if !keep {
                    b.delete_key(keys::tombstone(id).to_vec());
                }
                keep
            });
            before - tombstones.len()
        })
        .await
    }

    // ---- models -------------------------------------------------------------------------

    /// Create or replace the model of an entity type. Returns true when it is new.
    pub async fn put_model(&self, entity_type: &str, model: Model) -> Result<bool, RegistryError> {
        check_name("entity type", entity_type)?;
        model.check()?;
        let (et, model) = (entity_type.to_owned(), Arc::new(model));
        self.write(move |this, b, changes| {
            let stamp = b.stamp(None);
            let clock = ModelClock {
                hlc: stamp.hlc,
                origin: this.inner.origin.clone(),
            };
            b.put(keys::model(&et), stored(Some(&model), &clock));
            if this.wants_changes() {
                let data = model_data(&et, Some(&model));
                changes.push(model_change(&et, data, &stamp, &this.inner.origin));
            }
            this.inner.model_clocks.write().insert(et.clone(), clock);
            this.inner.models.write().insert(et, model).is_none()
        })
        .await
        .inspect(|_| self.models_changed())
    }

    pub async fn delete_model(&self, entity_type: &str) -> Result<(), RegistryError> {
        let et = entity_type.to_owned();
        self.write(move |this, b, changes| {
            if this.inner.models.write().remove(&et).is_none() {
                return Err(RegistryError::NotFound(format!("model {et:?}")));
            }
            let stamp = b.stamp(None);
            // A tombstone with the delete's clock: an older put from a peer stays deleted.
            let clock = ModelClock {
                hlc: stamp.hlc,
                origin: this.inner.origin.clone(),
            };
            b.put(keys::model(&et), stored(None, &clock));
            if this.wants_changes() {
                let data = model_data(&et, None);
                changes.push(model_change(&et, data, &stamp, &this.inner.origin));
            }
            this.inner.model_clocks.write().insert(et, clock);
            Ok(())
        })
        .await??;
        self.models_changed();
        Ok(())
    }

    // ---- twins --------------------------------------------------------------------------

    /// Create one twin.
    pub async fn create(&self, new: NewTwin) -> Result<Twin, RegistryError> {
        let mut r = self.create_many(vec![new]).await?;
        r.pop().expect("one result per input")
    }

    /// Create several twins with one durable commit; each succeeds or fails on its own.
    pub async fn create_many(
        &self,
        items: Vec<NewTwin>,
    ) -> Result<Vec<Result<Twin, RegistryError>>, RegistryError> {
        self.write(move |this, b, changes| {
            let now = Utc::now();
            items
                .into_iter()
                .map(|n| this.create_one(n, now, b, changes))
                .collect()
        })
        .await
    }

    /// Validate and create one twin in memory, logging it. Runs on the writer thread. A
    /// parent created earlier in the same job counts as existing.
    pub(super) fn create_one(
        &self,
        mut n: NewTwin,
        now: DateTime<Utc>,
        b: &mut Batch,
        changes: &mut Vec<Change>,
    ) -> Result<Twin, RegistryError> {
        check_name("entity type", &n.entity_type)?;
        n.properties.retain(|_, v| !v.is_null());
        if n.properties.len() > MAX_PROPERTIES {
            return Err(RegistryError::BadRequest(format!(
                "a twin holds at most {MAX_PROPERTIES} properties"
            )));
        }
        check_depth(&n.properties)?;
        if let Some(m) = self.model_for(&n.entity_type) {
            m.validate_new(&n.properties)?;
        }
        let mut idx = self.inner.index.write();
        let id = n.id.unwrap_or_else(TwinId::new_v7);
        if idx.all.contains(&id) {
            return Err(RegistryError::Conflict(format!("twin {id} already exists")));
        }
        if let Some(d) = self.tombstone(&id) {
            return Err(RegistryError::Conflict(format!(
                "twin {id} was deleted at {}; its tombstone keeps the id until {}",
                d.deleted_at.to_rfc3339(),
                (d.deleted_at
                    + chrono::Duration::from_std(self.tombstone_retention())
                        .unwrap_or(chrono::Duration::MAX))
                .to_rfc3339()
            )));
        }
        if self.inner.tombstones.write().remove(&id).is_some() {
            // An expired tombstone not swept yet: the id is free again.
            b.delete_key(keys::tombstone(&id).to_vec());
        }
        if let Some(p) = n.parent_id {
            if !idx.all.contains(&p) {
                return Err(RegistryError::NotFound(format!("parent twin {p}")));
            }
            if self.is_retired(&p) {
                return Err(RegistryError::Conflict(format!(
                    "parent twin {p} is retired and takes no new children"
                )));
            }
        }
        let stamp = b.stamp(None);
        let mut twin = Twin {
            id,
            entity_type: n.entity_type,
            properties: n.properties,
            version: 1,
            vclock: BTreeMap::from([(self.inner.node_id.clone(), 1)]),
            parent_id: n.parent_id,
            children_ids: BTreeSet::new(),
            lifecycle: Lifecycle::Active,
            created_at: now,
            updated_at: now,
            hlc: stamp.hlc,
            lseq: stamp.lseq,
            clocks: Default::default(),
            deleted_hlc: 0,
            siblings: None,
        };
        let dot = Dot::of(&twin.vclock, &self.inner.node_id);
        twin.clocks
            .stamp(twin.properties.keys(), stamp.hlc, &self.inner.origin, dot);
        idx.insert(&twin);
        b.numbered(stamp.lseq, id);
        b.create(&twin);
        points(b, id, &twin.properties, now);
        if self.wants_changes() {
            changes.push(change(
                ChangeKind::Created,
                &twin,
                twin.properties.clone(),
                now,
                &stamp,
                &self.inner.origin,
            ));
        }
        self.inner.twins.insert(&twin);
        Ok(twin)
    }

    /// Apply one merge patch and return the updated twin.
    pub async fn patch(&self, update: Update) -> Result<Twin, RegistryError> {
        self.patch_settling(update, false).await
    }

    /// [`Registry::patch`]; with `settling` (a conflict's resolution) a retired twin takes it
    /// too: it settles what the twin was written before it retired.
    pub(super) async fn patch_settling(
        &self,
        update: Update,
        settling: bool,
    ) -> Result<Twin, RegistryError> {
        check_patch(&update.patch)?;
        let t = self
            .write(move |this, b, changes| {
                let mut update = update;
                this.apply_one(&mut update, Utc::now(), b, changes, true, settling)
            })
            .await??;
        Ok(self.with_children(t.expect("asked for the twin")))
    }

    /// Apply many updates with one durable commit. Rejected items do not stop the rest.
    pub async fn apply_batch(&self, updates: Vec<Update>) -> Result<BatchOutcome, RegistryError> {
        self.write(move |this, b, changes| {
            let now = Utc::now();
            let mut out = BatchOutcome::default();
            for (i, mut u) in updates.into_iter().enumerate() {
                match check_patch(&u.patch)
                    .and_then(|()| this.apply_one(&mut u, now, b, changes, false, false))
                {
                    Ok(_) => out.applied += 1,
                    Err(e) => out.rejected.push((i, e)),
                }
            }
            metrics::counter!("twinhost_updates_total").increment(out.applied as u64);
            out
        })
        .await
    }

    /// Validate and apply one update in memory, logging it. Runs on the writer thread.
    pub(super) fn apply_one(
        &self,
        u: &mut Update,
        now: DateTime<Utc>,
        b: &mut Batch,
        changes: &mut Vec<Change>,
        want_twin: bool,
        settling: bool,
    ) -> Result<Option<Twin>, RegistryError> {
        let mut entry = self
            .inner
            .twins
            .get_mut(&u.twin_id)
            .ok_or_else(|| RegistryError::twin_not_found(u.twin_id))?;
        if entry.lifecycle == Lifecycle::Retired && !settling {
            return Err(RegistryError::Conflict(format!(
                "twin {} is retired and refuses updates",
                u.twin_id
            )));
        }
        if let Some(expected) = u.if_match.filter(|e| *e != entry.version) {
            return Err(RegistryError::VersionMismatch {
                expected,
                current: entry.version,
            });
        }
        if u.patch.is_empty() {
            // `{}` changes nothing: no new version, no event.
            return Ok(want_twin.then(|| entry.clone()));
        }
        // Borrowed mutably from here: the guard re-encodes the twin when it goes.
        let t = &mut *entry;
        if let Some(m) = self.model_for(&t.entity_type) {
            m.validate_patch(&u.patch)?;
        }
        let added = u
            .patch
            .iter()
            .filter(|(k, v)| !v.is_null() && !t.properties.contains_key(*k))
            .count();
        if t.properties.len() + added > MAX_PROPERTIES {
            return Err(RegistryError::BadRequest(format!(
                "a twin holds at most {MAX_PROPERTIES} properties"
            )));
        }
        let stamp = b.stamp(u.cause.as_deref());
        merge(&mut t.properties, &u.patch);
        t.version += 1;
        bump(&mut t.vclock, &self.inner.node_id);
        let dot = Dot::of(&t.vclock, &self.inner.node_id);
        t.clocks
            .stamp(u.patch.keys(), stamp.hlc, &self.inner.origin, dot);
        let settled = super::conflict::supersede(&mut t.siblings, u.patch.keys());
        t.updated_at = now;
        t.hlc = stamp.hlc;
        t.lseq = stamp.lseq;
        b.numbered(stamp.lseq, u.twin_id);
        let ts = u.ts.unwrap_or(now);
        b.update(u.twin_id, t.created_at, t.version, now, ts, &u.patch);
        points(b, u.twin_id, &u.patch, ts);
        if self.wants_changes() {
            // The patch is logged and applied: the change takes it rather than a copy.
            let mut c = change(
                ChangeKind::Updated,
                t,
                std::mem::take(&mut u.patch),
                ts,
                &stamp,
                &self.inner.origin,
            );
            c.cause = u.cause.take();
            changes.push(c);
        }
        if !settled.is_empty() {
            let notes = settled
                .into_iter()
                .map(|property| super::conflict::Note::Resolved {
                    value: t.properties.get(&property).cloned().unwrap_or(Value::Null),
                    property,
                })
                .collect();
            self.index_conflicts(t);
            self.conflict_events(b, changes, t, notes);
        }
        Ok(want_twin.then(|| t.clone()))
    }

    /// Delete a twin; with `cascade`, its whole subtree. Returns how many twins were removed.
    ///
    /// A subtree is deleted leaves first, [`DELETE_CHUNK`] twins per durable commit, so a
    /// parent of a million children costs a chunk's memory at a time, not the subtree's. A
    /// crash between chunks leaves the rest of the subtree whole (a parent goes only after
    /// its children); deleting it again finishes the job.
    pub async fn delete(&self, id: TwinId, cascade: bool) -> Result<usize, RegistryError> {
        let mut removed = 0;
        loop {
            let first = removed == 0;
            let (n, done) = self
                .write(move |this, b, changes| {
                    let now = Utc::now();
                    let mut idx = this.inner.index.write();
                    if !idx.all.contains(&id) {
                        // Gone meanwhile (another delete) once this one has begun.
                        return if first {
                            Err(RegistryError::twin_not_found(id))
                        } else {
                            Ok((0, true))
                        };
                    }
                    if !cascade && idx.children.get(&id).is_some_and(|k| !k.is_empty()) {
                        return Err(RegistryError::HasDescendants {
                            id,
                            count: idx.count_descendants(id),
                        });
                    }
                    let doomed = idx.leaves_first(id, DELETE_CHUNK);
                    let done = doomed.last() == Some(&id);
                    let mut gone = 0;
                    for d in &doomed {
                        let stamp = b.stamp(None);
                        if let Some(t) = this.inner.twins.remove(d) {
                            gone += 1;
                            idx.remove(&t);
                            this.inner.conflicted.remove(d);
                            let mut vclock = t.vclock.clone();
                            bump(&mut vclock, &this.inner.node_id);
                            let tomb = Tombstone {
                                id: *d,
                                entity_type: t.entity_type.clone(),
                                hlc: stamp.hlc,
                                vclock,
                                deleted_at: now,
                                lseq: stamp.lseq,
                            };
                            put_tombstone(b, &mut this.inner.tombstones.write(), tomb);
                            if this.wants_changes() {
                                changes.push(change(
                                    ChangeKind::Deleted,
                                    &t,
                                    Properties::new(),
                                    now,
                                    &stamp,
                                    &this.inner.origin,
                                ));
                            }
                        }
                        b.delete(*d);
                        b.delete_history(d, now);
                        b.delete_prefix(keys::rel_prefix(d));
                    }
                    // Their relationships go with them (those pointing at them stay with
                    // their sources, unlisted: see `rels`).
                    let mut rels = this.inner.rels.write();
                    for d in &doomed {
                        rels.remove(d);
                    }
                    if gone == 0 && !done {
                        // Listed as children but not held: the same chunk would come again.
                        tracing::error!(%id, "a cascading delete found only twins the index lists but the registry does not hold; stopped");
                        return Ok((0, true));
                    }
                    Ok((gone, done))
                })
                .await??;
            removed += n;
            if done {
                return Ok(removed);
            }
        }
    }

    /// Change the lifecycle state. `retired` is final.
    pub async fn set_lifecycle(&self, id: TwinId, state: Lifecycle) -> Result<Twin, RegistryError> {
        let t = self
            .write(move |this, b, changes| {
                let mut entry = this
                    .inner
                    .twins
                    .get_mut(&id)
                    .ok_or_else(|| RegistryError::twin_not_found(id))?;
                if entry.lifecycle == state {
                    return Ok(entry.clone());
                }
                if entry.lifecycle == Lifecycle::Retired {
                    return Err(RegistryError::Conflict(format!(
                        "twin {id} is retired; retirement is final"
                    )));
                }
                let t = &mut *entry;
                let now = Utc::now();
                let stamp = b.stamp(None);
                t.lifecycle = state;
                t.version += 1;
                bump(&mut t.vclock, &this.inner.node_id);
                t.updated_at = now;
                t.hlc = stamp.hlc;
                t.lseq = stamp.lseq;
                b.numbered(stamp.lseq, id);
                b.lifecycle(id, t.created_at, t.version, now, state);
                if this.wants_changes() {
                    changes.push(change(
                        ChangeKind::Lifecycle,
                        t,
                        Properties::new(),
                        now,
                        &stamp,
                        &this.inner.origin,
                    ));
                }
                Ok(t.clone())
            })
            .await??;
        Ok(self.with_children(t))
    }

    // ---- alerts -------------------------------------------------------------------------

    /// Number and log alerts (built with [`Change::alert`]) like changes: once durable they
    /// reach the change sink in order with every other change, and a restart after a crash
    /// re-creates them from the log.
    pub async fn record_alerts(&self, alerts: Vec<Change>) -> Result<(), RegistryError> {
        self.write(move |this, b, changes| {
            for mut a in alerts {
                let Some(twin_id) = a.twin_id else { continue };
                let record = AlertRecord {
                    twin_id: Some(twin_id),
                    entity_type: std::mem::take(&mut a.entity_type),
                    parent_id: a.parent_id,
                    ts: a.ts,
                    data: a.data.take().unwrap_or(Value::Null),
                    kind: None,
                    origin: None,
                };
                log_record(b, changes, record, a.cause.as_deref(), &this.inner.origin);
            }
        })
        .await
    }

    /// Number and log an event about no twin (`kind` says which, e.g. a workflow run that
    /// ended), like an alert.
    pub async fn record_event(&self, kind: ChangeKind, data: Value) -> Result<(), RegistryError> {
        self.write(move |this, b, changes| {
            let record = AlertRecord {
                twin_id: None,
                entity_type: String::new(),
                parent_id: None,
                ts: Utc::now(),
                data,
                kind: Some(kind),
                origin: None,
            };
            log_record(b, changes, record, None, &this.inner.origin);
        })
        .await
    }

    /// Log alerts forwarded by a peer, each under its origin and its number there, with
    /// `config` (the link's position and what it has seen) in the same commit. The caller
    /// keeps out what this node has already (see `sync::alerts`).
    pub async fn record_remote_alerts(
        &self,
        alerts: Vec<RemoteAlert>,
        config: Vec<KvOp>,
    ) -> Result<(), RegistryError> {
        self.write(move |this, b, changes| {
            for a in alerts {
                let record = AlertRecord {
                    twin_id: Some(a.twin_id),
                    entity_type: a.entity_type,
                    parent_id: a.parent_id,
                    ts: a.ts,
                    data: a.data,
                    kind: None,
                    origin: Some((a.origin, a.origin_seq)),
                };
                log_record(b, changes, record, None, &this.inner.origin);
            }
            for op in config {
                b.config(op);
            }
        })
        .await
    }

    /// Number and log conflict events about `t` (its merge or write is in the same batch).
    pub(super) fn conflict_events(
        &self,
        b: &mut Batch,
        changes: &mut Vec<Change>,
        t: &Twin,
        notes: Vec<super::conflict::Note>,
    ) {
        for n in notes {
            let (kind, data) = n.into_event(&t.id);
            match kind {
                ChangeKind::ConflictDetected => {
                    let strategy = data["strategy"].as_str().unwrap_or("lww").to_owned();
                    metrics::counter!("twinhost_sync_conflicts_total", "strategy" => strategy)
                        .increment(1);
                }
                _ => metrics::counter!("twinhost_sync_conflicts_resolved_total").increment(1),
            }
            let record = AlertRecord {
                twin_id: Some(t.id),
                entity_type: t.entity_type.clone(),
                parent_id: t.parent_id,
                ts: Utc::now(),
                data,
                kind: Some(kind),
                origin: None,
            };
            log_record(b, changes, record, None, &self.inner.origin);
        }
    }

    // ---- relationships ------------------------------------------------------------------

    /// Create or replace a relationship. Returns true when it is new.
    pub async fn put_relationship(
        &self,
        src: TwinId,
        name: &str,
        target: TwinId,
        props: Value,
    ) -> Result<bool, RegistryError> {
        check_name("relationship name", name)?;
        let props = match props {
            Value::Null => Value::Object(Default::default()),
            Value::Object(m) => {
                check_patch(&m)?;
                Value::Object(m)
            }
            _ => {
                return Err(RegistryError::BadRequest(
                    "relationship properties must be a JSON object".into(),
                ))
            }
        };
        let name = name.to_owned();
        self.write(move |this, b, changes| {
            let idx = this.inner.index.read();
            for end in [src, target] {
                if !idx.all.contains(&end) {
                    return Err(RegistryError::twin_not_found(end));
                }
            }
            if this.is_retired(&src) {
                return Err(RegistryError::Conflict(format!(
                    "twin {src} is retired and refuses updates"
                )));
            }
            drop(idx);
            let stamp = b.stamp(None);
            if this.wants_changes() {
                let data = rel_data(&name, target, Some(&props));
                changes.push(rel_change(
                    &this.inner.twins,
                    src,
                    data,
                    &stamp,
                    &this.inner.origin,
                ));
            }
            let state = RelState {
                props: Some(props),
                hlc: stamp.hlc,
                origin: this.inner.origin.clone(),
            };
            let before = this.set_relationship(b, &stamp, src, name, target, state);
            Ok(before.and_then(|s| s.props).is_none())
        })
        .await?
    }

    /// Store a relationship (or its tombstone) of `src` and give `src` its new place in the
    /// change feed (`stamp`'s number), where its entry carries its relationships. Returns
    /// what it replaces.
    pub(super) fn set_relationship(
        &self,
        b: &mut Batch,
        stamp: &Stamp,
        src: TwinId,
        name: String,
        target: TwinId,
        state: RelState,
    ) -> Option<RelState> {
        b.put(keys::rel(&src, &target, &name), rels::encode(&state));
        if let Some(mut entry) = self.inner.twins.get_mut(&src) {
            let t = &mut *entry;
            t.lseq = stamp.lseq;
            b.state(t);
            b.numbered(stamp.lseq, src);
        }
        self.inner
            .rels
            .write()
            .entry(src)
            .or_default()
            .insert((name, target), state)
    }

    /// Forget every relationship of `src` (a twin that is gone), here only. Returns how many.
    pub(super) async fn drop_relationships_of(&self, src: TwinId) -> Result<usize, RegistryError> {
        self.write(move |this, b, _| {
            b.delete_prefix(keys::rel_prefix(&src));
            this.inner.rels.write().remove(&src).map_or(0, |m| m.len())
        })
        .await
    }

    pub async fn delete_relationship(
        &self,
        src: TwinId,
        name: &str,
        target: TwinId,
    ) -> Result<(), RegistryError> {
        let name = name.to_owned();
        self.write(move |this, b, changes| {
            let live = this
                .inner
                .rels
                .read()
                .get(&src)
                .and_then(|m| m.get(&(name.clone(), target)))
                .is_some_and(|s| s.props.is_some());
            if !live || this.get(&src).is_err() {
                return Err(RegistryError::NotFound(format!(
                    "relationship {name:?} from {src} to {target}"
                )));
            }
            let stamp = b.stamp(None);
            // A tombstone with the delete's clock: an older put from a peer stays deleted.
            let state = RelState {
                props: None,
                hlc: stamp.hlc,
                origin: this.inner.origin.clone(),
            };
            this.set_relationship(b, &stamp, src, name.clone(), target, state);
            if this.wants_changes() {
                let data = rel_data(&name, target, None);
                changes.push(rel_change(
                    &this.inner.twins,
                    src,
                    data,
                    &stamp,
                    &this.inner.origin,
                ));
            }
            Ok(())
        })
        .await?
    }
}

/// Number and log `record` (an alert, a conflict or workflow event) in `b`, and add the
/// change it stands for.
fn log_record(
    b: &mut Batch,
    changes: &mut Vec<Change>,
    record: AlertRecord,
    cause: Option<&crate::types::Cause>,
    origin: &Arc<str>,
) {
    let bytes = serde_json::to_vec(&record).expect("alerts serialize");
    let stamp = b.alert(cause, &bytes);
    changes.push(alert_change(record, &stamp, origin));
}

/// An alert as it travels between nodes: raised on `origin`, numbered `origin_seq` there.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoteAlert {
    pub origin: Arc<str>,
    pub origin_seq: u64,
    pub twin_id: TwinId,
    pub entity_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<TwinId>,
    pub ts: DateTime<Utc>,
    pub data: Value,
}

/// The change an alert record stands for (raised on `origin`, this node, unless the record
/// names the node it was forwarded from).
pub(super) fn alert_change(r: AlertRecord, stamp: &Stamp, origin: &Arc<str>) -> Change {
    let kind = r.kind.unwrap_or(ChangeKind::Alert);
    let mut c = Change::config(kind, r.twin_id, r.entity_type, r.data, stamp, origin);
    c.parent_id = r.parent_id;
    c.ts = r.ts;
    c.cause = stamp.cause.clone().map(Arc::new);
    if let Some((node, seq)) = r.origin {
        c.origin = node;
        c.origin_seq = Some(seq);
    }
    c
}

/// The `data` of a model change: the model put, or `None` for a delete.
pub(super) fn model_data(entity_type: &str, model: Option<&Model>) -> Value {
    match model {
        Some(m) => json!({"entity_type": entity_type, "model": m}),
        None => json!({"entity_type": entity_type, "deleted": true}),
    }
}

/// The `data` of a relationship change: its properties, or `None` for a delete.
pub(super) fn rel_data(name: &str, target: TwinId, properties: Option<&Value>) -> Value {
    match properties {
        Some(p) => json!({"name": name, "target_id": target, "properties": p}),
        None => json!({"name": name, "target_id": target, "deleted": true}),
    }
}

/// The change of the model of `entity_type` described by `data`.
pub(super) fn model_change(
    entity_type: &str,
    data: Value,
    stamp: &Stamp,
    origin: &Arc<str>,
) -> Change {
    Change::config(
        ChangeKind::Model,
        None,
        entity_type.to_owned(),
        data,
        stamp,
        origin,
    )
}

/// Keep `tomb` (in memory and logged) and give its id its place in the change feed.
pub(super) fn put_tombstone(b: &mut Batch, tombstones: &mut Tombstones, tomb: Tombstone) {
    b.put(
        keys::tombstone(&tomb.id).to_vec(),
        serde_json::to_vec(&tomb).expect("tombstones serialize"),
    );
    b.numbered(tomb.lseq, tomb.id);
    tombstones.insert(tomb.id, Arc::new(tomb));
}

/// The change of a relationship from `src` described by `data`.
pub(super) fn rel_change(
    twins: &TwinMap,
    src: TwinId,
    data: Value,
    stamp: &Stamp,
    origin: &Arc<str>,
) -> Change {
    let et = twins.entity_type(&src);
    Change::config(
        ChangeKind::Relationship,
        Some(src),
        et.unwrap_or_default(),
        data,
        stamp,
        origin,
    )
}

#[cfg(test)]
#[path = "write_tests.rs"]
mod tests;
