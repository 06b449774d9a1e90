//! Models replicate between nodes, last writer wins per entity type by `(HLC, origin)`: each
//! stored model carries the clock of its last put or delete, and a delete leaves a model
//! tombstone (the clock, no model) so that an older put arriving later does not bring it
//! back. Sync links send every model with its clock when they start and whenever a model
//! changes ([`Registry::models_version`]); a node merges them with
//! [`Registry::apply_remote_models`].
//!
//! Stored form: the value under `keys::model(entity_type)` is
//! `{"model": {…} | null, "hlc": …, "origin": "…"}`; a bare model (written before models
//! replicated) reads as one with clock 0, older than any put or delete.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::write::{model_change, model_data};
use super::{Model, Registry, RegistryError};
use crate::store::keys;

/// The clock of an entity type's last model put or delete.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelClock {
    pub hlc: u64,
    pub origin: Arc<str>,
}

impl ModelClock {
    fn key(&self) -> (u64, &str) {
        (self.hlc, &self.origin)
    }
}

/// A model (or its delete) as nodes exchange and store it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoteModel {
    pub entity_type: String,
    /// `None`: deleted.
    pub model: Option<Model>,
    pub hlc: u64,
    pub origin: Arc<str>,
}

/// The stored value of a model key.
#[derive(Serialize, Deserialize)]
struct Stored {
    model: Option<Model>,
    hlc: u64,
    origin: Arc<str>,
}

/// Read a stored model value: the model (`None` for a tombstone) and its clock.
pub(super) fn read_stored(v: &[u8]) -> Result<(Option<Model>, ModelClock), serde_json::Error> {
    let value: serde_json::Value = crate::store::wal::from_slice_unbounded(v)?;
    if value.get("hlc").is_some() && value.get("origin").is_some() {
        let s: Stored = serde_json::from_value(value)?;
        return Ok((
            s.model,
            ModelClock {
                hlc: s.hlc,
                origin: s.origin,
            },
        ));
    }
    Ok((Some(serde_json::from_value(value)?), ModelClock::default()))
}

/// The stored value of a model (or a tombstone) with its clock.
pub(super) fn stored(model: Option<&Model>, clock: &ModelClock) -> Vec<u8> {
    serde_json::to_vec(&json!({"model": model, "hlc": clock.hlc, "origin": &*clock.origin}))
        .expect("models serialize")
}

impl Registry {
    /// Counts every model put and delete, local or merged, once durable: a link sends the
    /// models again when it moved.
    pub fn models_version(&self) -> u64 {
        *self.inner.models_version.borrow()
    }

    /// Follows [`Registry::models_version`].
    pub fn watch_models(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.models_version.subscribe()
    }

    /// Count a durable model change.
    pub(super) fn models_changed(&self) {
        self.reindex_all(false);
        self.inner.models_version.send_modify(|v| *v += 1);
    }

    /// [`Registry::reindex`] every entity type that has a model or an index (a new index is
    /// built here, before the model's put returns; kept indexes cost nothing).
    /// `alone`: nothing else reads or writes twins yet (the load), so new indexes are built
    /// in one sorted pass ([`Registry::reindex`]).
    pub(super) fn reindex_all(&self, alone: bool) {
        let mut types: Vec<String> = self.inner.models.read().keys().cloned().collect();
        types.extend(self.inner.twins.ranges.types());
        types.sort();
        types.dedup();
        for et in types {
            self.reindex(&et, alone);
        }
    }

    /// Every model and model tombstone with its clock, for a peer.
    pub fn models_state(&self) -> Vec<RemoteModel> {
        // Lock order: clocks, then models, as the writer takes them (a put, a merge).
        let clocks = self.inner.model_clocks.read();
        let models = self.inner.models.read();
        let mut out: Vec<RemoteModel> = clocks
            .iter()
            .map(|(et, c)| RemoteModel {
                entity_type: et.clone(),
                model: models.get(et).map(|m| (**m).clone()),
                hlc: c.hlc,
                origin: c.origin.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.entity_type.cmp(&b.entity_type));
        out
    }

    /// Merge models from a peer: each put or delete with a later `(HLC, origin)` than the one
    /// here replaces it (a `model.changed` event with the writing node as its origin). Models
    /// are not checked again (the origin did). Returns how many changed something.
    ///
    /// # Errors
    /// The store's (overload, shutdown).
    pub async fn apply_remote_models(
        &self,
        items: Vec<RemoteModel>,
    ) -> Result<usize, RegistryError> {
        self.write(move |this, b, changes| {
            let mut applied = 0;
            for rm in items {
                if super::check_name("entity type", &rm.entity_type).is_err() {
                    continue;
                }
                let clock = ModelClock {
                    hlc: rm.hlc,
                    origin: rm.origin.clone(),
                };
                let mut clocks = this.inner.model_clocks.write();
                if clocks
                    .get(&rm.entity_type)
                    .is_some_and(|c| c.key() >= clock.key())
                {
                    continue;
                }
                b.observe(rm.hlc);
                let stamp = b.stamp(None);
                b.put(
                    keys::model(&rm.entity_type),
                    stored(rm.model.as_ref(), &clock),
                );
                if this.wants_changes() {
                    let data = model_data(&rm.entity_type, rm.model.as_ref());
                    changes.push(model_change(&rm.entity_type, data, &stamp, &rm.origin));
                }
                let mut models = this.inner.models.write();
                match rm.model {
                    Some(m) => models.insert(rm.entity_type.clone(), Arc::new(m)),
                    None => models.remove(&rm.entity_type),
                };
                clocks.insert(rm.entity_type, clock);
                applied += 1;
            }
            applied
        })
        .await
        .inspect(|&n| {
            if n > 0 {
                self.models_changed();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use serde_json::json;

    fn model(strategy: &str) -> Model {
        serde_json::from_value(json!({"conflict": {"strategy": strategy}})).unwrap()
    }

    fn remote(et: &str, m: Option<Model>, hlc: u64, origin: &str) -> RemoteModel {
        RemoteModel {
            entity_type: et.into(),
            model: m,
            hlc,
            origin: Arc::from(origin),
        }
    }

    /// Last writer wins per entity type; a delete leaves a tombstone an older put cannot
    /// undo; the clocks survive a restart, and a bare model stored before models replicated
    /// reads as the oldest write.
    #[test]
    fn models_merge_last_writer_wins_and_keep_their_clocks() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            // A model as stored before models replicated: the bare model.
            store
                .put_cache(
                    &keys::model("legacy"),
                    &serde_json::to_vec(&model("manual")).unwrap(),
                )
                .unwrap();
            let r = Registry::open(&store, "here").unwrap();
            rt.block_on(async {
                assert_eq!(
                    r.model("legacy").unwrap().conflict.strategy,
                    super::super::model::Strategy::Manual
                );
                r.put_model("machine", model("manual")).await.unwrap();
                let mine = r.models_state();
                let here = mine
                    .iter()
                    .find(|m| m.entity_type == "machine")
                    .unwrap()
                    .hlc;
                let v0 = r.models_version();
                // Older than this node's put: refused. Newer: taken.
                let old = remote("machine", Some(model("version")), here - 1, "zz");
                assert_eq!(r.apply_remote_models(vec![old]).await.unwrap(), 0);
                assert_eq!(r.models_version(), v0);
                let new = remote("machine", Some(model("version")), here + 1, "peer");
                assert_eq!(r.apply_remote_models(vec![new.clone()]).await.unwrap(), 1);
                assert!(r.models_version() > v0);
                assert_eq!(
                    r.model("machine").unwrap().conflict.strategy,
                    super::super::model::Strategy::Version
                );
                // Again: nothing changes.
                assert_eq!(r.apply_remote_models(vec![new]).await.unwrap(), 0);
                // A remote delete, then an older put: the model stays deleted.
                let del = remote("machine", None, here + 5, "peer");
                assert_eq!(r.apply_remote_models(vec![del]).await.unwrap(), 1);
                assert!(r.model("machine").is_err());
                let late = remote("machine", Some(model("lww")), here + 3, "other");
                assert_eq!(r.apply_remote_models(vec![late]).await.unwrap(), 0);
                assert!(r.model("machine").is_err());
                // The legacy model loses to any put.
                let legacy = remote("legacy", Some(model("lww")), 1, "peer");
                assert_eq!(r.apply_remote_models(vec![legacy]).await.unwrap(), 1);
            });
            r.shutdown();
        }
        let store = Store::open(dir.path()).unwrap();
        let r = Registry::open(&store, "here").unwrap();
        let state = r.models_state();
        let machine = state.iter().find(|m| m.entity_type == "machine").unwrap();
        assert_eq!((machine.model.is_none(), &*machine.origin), (true, "peer"));
        assert_eq!(
            r.model("legacy").unwrap().conflict.strategy,
            super::super::model::Strategy::Lww
        );
        r.shutdown();
    }

    /// `models_state` (a peer link's send loop) and merging a peer's models (the writer) take
    /// the model and clock locks in the same order: in opposite orders they deadlocked, and
    /// with the writer queued for the model lock every reader of models (`GET /v1/models`)
    /// hung too (seen as a whole node going silent in an end-to-end test).
    #[test]
    fn reading_the_models_state_while_peers_models_merge_does_not_deadlock() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r = Registry::open(&store, "here").unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (r, stop) = (r.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = r.models_state();
                    }
                })
            })
            .collect();
        let merged = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(30), async {
                for hlc in 1..=3000u64 {
                    let m = remote("machine", Some(model("lww")), hlc << 16, "peer");
                    r.apply_remote_models(vec![m]).await.unwrap();
                }
            })
            .await
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(
            merged.is_ok(),
            "merging models deadlocked with models_state"
        );
        for t in readers {
            t.join().unwrap();
        }
        r.shutdown();
    }
}
