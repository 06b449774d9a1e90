//! Replay: re-apply the write-ahead log's tail on top of the checkpointed state after a
//! restart, and re-create the changes it numbered.
//!
//! Sled may hold a state newer than the checkpoint marker (a checkpoint reads live twins), so
//! updates and lifecycle changes apply only to the same twin (`born` matches its
//! `created_at`; an id can be deleted and created again) and only when newer than its
//! version; creates only when the twin is absent. History samples are re-derived from every
//! entry of the tail (no checkpoint wrote them), except those of twins the tail later
//! deletes. Every stamped entry (format 2) also becomes a [`Change`], numbered as it was,
//! whether or not sled already held its effect: the event log takes the ones its persisted
//! tail lacks.
//!
//! A re-created change names the node it came from as the live write did: this node for
//! everything but merged remote changes, whose origin [`super::origin`] works out again from
//! the twin before and after (a merged state against the state replayed before it; a delete
//! against the tombstone logged with it). When sled already holds a later state than a
//! merged one, the state before is unknown and every clock of the merged state counts.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::origin::{self, Before};
use super::write::{
    alert_change, bump, change, merge, model_change, model_data, points, rel_change, rel_data,
};
use super::{AlertRecord, Change, ChangeKind, Indexes, Tombstone, TwinMap};
use crate::store::wal::{Entry, Stamp};
use crate::store::{keys, Batch};
use crate::types::{hlc_at, Clocks, Dot, Lifecycle, Properties, Twin, TwinId, VClock};

/// What [`replay`] found besides the twins' state.
pub(super) struct Replayed {
    /// Highest change number and HLC seen.
    pub lseq: u64,
    pub hlc: u64,
    /// Twins created by a format-1 log tail, which carry no change number yet.
    pub unnumbered: Vec<TwinId>,
}

/// Re-apply `entries` (see the module doc) into `twins` and `index`, recording history and
/// dirty twins in `b` and the numbered changes in `recovered`.
pub(super) fn replay(
    twins: &TwinMap,
    index: &mut Indexes,
    origin: &Arc<str>,
    entries: Vec<Entry>,
    b: &mut Batch,
    recovered: &mut Vec<Change>,
) -> Replayed {
    let mut r = Replay {
        twins,
        index,
        origin,
        b,
        recovered,
        stamp: None,
        tombstone: None,
        found: Replayed {
            lseq: 0,
            hlc: 0,
            unnumbered: Vec::new(),
        },
    };
    for e in entries {
        r.entry(e);
    }
    r.found
}

/// The state of one replay.
struct Replay<'a> {
    twins: &'a TwinMap,
    index: &'a mut Indexes,
    origin: &'a Arc<str>,
    b: &'a mut Batch,
    recovered: &'a mut Vec<Change>,
    /// The stamp logged before the entry being replayed (format 2), taken by that entry.
    stamp: Option<Stamp>,
    /// The twin and version vector of the tombstone logged last: a delete logs its
    /// tombstone right before it, and the origin of a merged delete is read from the two.
    tombstone: Option<(TwinId, VClock)>,
    found: Replayed,
}

impl Replay<'_> {
    fn entry(&mut self, e: Entry) {
        match e {
            Entry::Stamp(s) => {
                self.seen(&s);
                self.stamp = Some(s);
            }
            Entry::Alert { stamp, record } => self.alert(&stamp, &record),
            Entry::Update {
                id,
                born,
                version,
                now,
                ts,
                patch,
            } => self.update(id, born, version, now, ts, patch),
            Entry::Create(t) => self.create(*t),
            Entry::Delete(id) => self.delete(id),
            Entry::Lifecycle {
                id,
                born,
                version,
                now,
                state,
            } => self.lifecycle(id, born, version, now, state),
            Entry::State(t) => self.state(*t),
            // A numbered relationship or model change (other raw entries carry no number:
            // a pending stamp belongs to the twin entry after them).
            Entry::Put(k, v) => {
                if k.first() == Some(&keys::TOMBSTONE) {
                    self.tombstone = serde_json::from_slice::<Tombstone>(&v)
                        .ok()
                        .map(|d| (d.id, d.vclock));
                }
                self.config(&k, Some(&v))
            }
            Entry::DeleteKey(k) => self.config(&k, None),
            Entry::DeletePrefix(_) => {}
        }
    }

    fn seen(&mut self, s: &Stamp) {
        self.found.lseq = self.found.lseq.max(s.lseq);
        self.found.hlc = self.found.hlc.max(s.hlc);
        self.b.note_replayed(s.lseq, s.hlc);
    }

    fn alert(&mut self, s: &Stamp, record: &[u8]) {
        self.seen(s);
        match serde_json::from_slice::<AlertRecord>(record) {
            Ok(r) => self.recovered.push(alert_change(r, s, self.origin)),
            Err(e) => {
                tracing::warn!(lseq = s.lseq, error = %e, "skipping an unreadable alert in the log")
            }
        }
    }

    /// The pending stamp's clock and number; format 1 logged none: the write's own time
    /// stands in for the clock.
    fn clock_of(st: Option<&Stamp>, now: DateTime<Utc>) -> (u64, u64) {
        (
            st.map_or_else(|| hlc_at(now), |s| s.hlc),
            st.map_or(0, |s| s.lseq),
        )
    }

    fn update(
        &mut self,
        id: TwinId,
        born: DateTime<Utc>,
        version: u64,
        now: DateTime<Utc>,
        ts: DateTime<Utc>,
        patch: Properties,
    ) {
        let st = self.stamp.take();
        let (hlc, lseq) = Self::clock_of(st.as_ref(), now);
        let origin = self.origin.clone();
        let applied = replay_change(self.twins, id, born, version, now, &origin, |t| {
            merge(&mut t.properties, &patch);
            let dot = Dot::next(&t.vclock, &origin);
            t.clocks.stamp(patch.keys(), hlc, &origin, dot);
            super::conflict::supersede(&mut t.siblings, patch.keys());
            t.hlc = hlc;
            t.lseq = t.lseq.max(lseq);
        });
        if applied {
            points(self.b, id, &patch, ts);
            self.b.mark_dirty(id);
        }
        if let Some(s) = st {
            let c = self.twins.get(&id).map(|t| {
                let mut c = change(ChangeKind::Updated, &t, patch, ts, &s, &origin);
                c.version = version;
                c
            });
            self.recovered.extend(c);
        }
    }

    fn create(&mut self, mut t: Twin) {
        let st = self.stamp.take();
        points(self.b, t.id, &t.properties, t.created_at);
        self.b.mark_dirty(t.id);
        if let Some(s) = &st {
            let mut c = change(
                ChangeKind::Created,
                &t,
                t.properties.clone(),
                t.created_at,
                s,
                self.origin,
            );
            c.version = 1;
            self.recovered.push(c);
        }
        if self.twins.contains(&t.id) {
            return;
        }
        if t.hlc == 0 {
            // A format-1 create: no clocks, no change number yet.
            t.hlc = hlc_at(t.created_at);
            let dot = Dot::of(&t.vclock, self.origin);
            t.clocks.stamp(t.properties.keys(), t.hlc, self.origin, dot);
            self.found.unnumbered.push(t.id);
        }
        self.index.insert(&t);
        self.twins.insert(&t);
    }

    fn delete(&mut self, id: TwinId) {
        let st = self.stamp.take();
        let tomb = self.tombstone.take().filter(|(t, _)| *t == id);
        let gone = self.twins.remove(&id);
        if let (Some(s), Some(t)) = (&st, &gone) {
            // Without its tombstone (a log older than tombstones) the delete was local.
            let by = match &tomb {
                Some((_, vclock)) => {
                    let before = Before {
                        clocks: &t.clocks,
                        vclock: &t.vclock,
                    };
                    origin::merged(Some(before), &Clocks::new(), vclock, self.origin)
                }
                None => self.origin.clone(),
            };
            self.recovered.push(change(
                ChangeKind::Deleted,
                t,
                Properties::new(),
                t.updated_at,
                s,
                &by,
            ));
        }
        if let Some(t) = gone {
            self.index.remove(&t);
        }
        self.b.forget_points(id);
        self.b.mark_dirty(id);
    }

    fn lifecycle(
        &mut self,
        id: TwinId,
        born: DateTime<Utc>,
        version: u64,
        now: DateTime<Utc>,
        state: Lifecycle,
    ) {
        let st = self.stamp.take();
        let (hlc, lseq) = Self::clock_of(st.as_ref(), now);
        if replay_change(self.twins, id, born, version, now, self.origin, |t| {
            t.lifecycle = state;
            t.hlc = hlc;
            t.lseq = t.lseq.max(lseq);
        }) {
            self.b.mark_dirty(id);
        }
        if let Some(s) = st {
            let c = self.twins.get(&id).map(|t| {
                let mut c = change(
                    ChangeKind::Lifecycle,
                    &t,
                    Properties::new(),
                    now,
                    &s,
                    self.origin,
                );
                c.version = version;
                c.lifecycle = state;
                c
            });
            self.recovered.extend(c);
        }
    }

    /// A merged remote change: the whole state, newer than what sled holds unless a
    /// checkpoint already wrote a later one.
    fn state(&mut self, t: Twin) {
        let cur = self.twins.get(&t.id);
        if let Some(s) = self.stamp.take() {
            let kind = if t.version == 1 {
                ChangeKind::Created
            } else {
                ChangeKind::Updated
            };
            let before = cur.as_ref().filter(|c| c.lseq < t.lseq).map(|c| Before {
                clocks: &c.clocks,
                vclock: &c.vclock,
            });
            let by = origin::merged(before, &t.clocks, &t.vclock, self.origin);
            let mut c = change(kind, &t, t.properties.clone(), t.updated_at, &s, &by);
            c.version = t.version;
            self.recovered.push(c);
        }
        let newer = cur.is_none_or(|cur| cur.lseq < t.lseq);
        if newer {
            self.b.mark_dirty(t.id);
            if !self.twins.contains(&t.id) {
                self.index.insert(&t);
            }
            self.twins.insert(&t);
        }
    }

    /// A numbered relationship or model entry (`value` `None`: a delete) becomes the change
    /// it stands for, taking the pending stamp; other keys carry no number.
    fn config(&mut self, key: &[u8], value: Option<&[u8]>) {
        let c = match key.first() {
            Some(&keys::REL) => keys::parse_rel(key).and_then(|(src, dst, name)| {
                let s = self.stamp.take()?;
                let props = value.and_then(|v| super::rels::decode(v).ok()?.props);
                let data = rel_data(&name, dst, props.as_ref());
                Some(rel_change(self.twins, src, data, &s, self.origin))
            }),
            Some(&keys::MODEL) => self.stamp.take().map(|s| {
                let et = String::from_utf8_lossy(&key[1..]).into_owned();
                let model = value.and_then(|v| super::models_sync::read_stored(v).ok());
                let data = model_data(&et, model.and_then(|(m, _)| m).as_ref());
                model_change(&et, data, &s, self.origin)
            }),
            _ => None,
        };
        self.recovered.extend(c);
    }
}

/// Replay one change to the twin `id` born at `born`: apply `f` and the version bookkeeping
/// when the change is newer than the twin. Returns false when the twin is absent or another
/// incarnation of the id (the entry is then skipped entirely).
fn replay_change(
    twins: &TwinMap,
    id: TwinId,
    born: DateTime<Utc>,
    version: u64,
    now: DateTime<Utc>,
    origin: &str,
    f: impl FnOnce(&mut Twin),
) -> bool {
    let Some(mut entry) = twins.get_mut(&id) else {
        return false;
    };
    if entry.created_at != born {
        return false;
    }
    let t = &mut *entry;
    if t.version < version {
        f(t);
        t.version = version;
        bump(&mut t.vclock, origin);
        t.updated_at = now;
    }
    true
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::registry::{NewTwin, Registry, RemoteChange, Update};
    use crate::store::{wal, Store};

    /// A feed item of twin `id` at `hlc` with version vector `vclock` and nothing else yet.
    fn item(id: TwinId, hlc: u64, vclock: serde_json::Value) -> serde_json::Value {
        json!({"twin_id": id, "entity_type": "machine", "vclock": vclock, "hlc": hlc})
    }

    fn parse(v: serde_json::Value) -> RemoteChange {
        serde_json::from_value(v).unwrap()
    }

    /// A crash before the event log persisted its tail: the changes the replay re-creates
    /// from the write-ahead log name the origins the live changes named — this node for its
    /// own, the writing node for merged ones (a property write, a relayed lifecycle change,
    /// a delete).
    #[tokio::test]
    async fn replayed_changes_name_the_origins_of_the_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let reg = Registry::open(&store, "here").unwrap();
        let live = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = live.clone();
        reg.set_change_sink(Arc::new(move |c| sink.lock().extend(c)));

        let new = |props: serde_json::Value| NewTwin {
            entity_type: "machine".into(),
            properties: props.as_object().unwrap().clone(),
            ..Default::default()
        };
        let mine = reg.create(new(json!({"a": 1}))).await.unwrap().id;
        let patch = json!({"a": 2}).as_object().unwrap().clone();
        reg.patch(Update::new(mine, patch)).await.unwrap();
        let h = hlc_at(Utc::now() + chrono::Duration::seconds(1));
        // `edge` writes `b` of this twin and creates one of its own.
        let mut w = item(mine, h, json!({"here": 2, "edge": 1}));
        w["properties"] = json!({"b": 1});
        w["clocks"] = json!({"b": {"hlc": h, "origin": "edge"}});
        let theirs = TwinId::new_v7();
        let mut c = item(theirs, h, json!({"edge": 1}));
        c["properties"] = json!({"t": 1});
        c["clocks"] = json!({"t": {"hlc": h, "origin": "edge"}});
        reg.apply_remote(vec![parse(w), parse(c)]).await.unwrap();
        // `far` suspends this twin (relayed by edge: no property clock is new); edge deletes
        // its own twin.
        let mut l = item(mine, h + 1, json!({"here": 2, "edge": 1, "far": 1}));
        l["lifecycle"] = json!("suspended");
        l["clocks"] = json!({"b": {"hlc": h, "origin": "edge"}});
        let mut d = item(theirs, h + 2, json!({"edge": 2}));
        d["deleted"] = json!(true);
        reg.apply_remote(vec![parse(l), parse(d)]).await.unwrap();
        reg.delete(mine, false).await.unwrap();

        let live: Vec<(u64, ChangeKind, String)> = live
            .lock()
            .iter()
            .map(|c| (c.seq, c.kind, c.origin.to_string()))
            .collect();
        let origins: Vec<&str> = live.iter().map(|(_, _, o)| o.as_str()).collect();
        assert_eq!(
            origins,
            ["here", "here", "edge", "edge", "far", "edge", "here"]
        );

        // What a restart after `kill -9` replays: the whole log, onto nothing checkpointed.
        let (entries, _) = wal::read_after(&dir.path().join("wal"), 0).unwrap();
        let mut recovered = Vec::new();
        replay(
            &TwinMap::new(),
            &mut Indexes::default(),
            &Arc::from("here"),
            entries,
            &mut Batch::new(),
            &mut recovered,
        );
        let replayed: Vec<(u64, ChangeKind, String)> = recovered
            .iter()
            .map(|c| (c.seq, c.kind, c.origin.to_string()))
            .collect();
        assert_eq!(replayed, live);
        reg.shutdown();
    }
}
