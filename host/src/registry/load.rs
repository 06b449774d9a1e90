//! Loading the registry from sled at start: twins (upgrading a format-1 directory on the
//! way), models, relationships and tombstones, and the highest change number and clock
//! stored, above which the node continues.

use std::collections::HashMap;
use std::sync::Arc;

use super::{corrupt, feed, Indexes, Model, RegistryError, RelMap, Tombstone, TwinMap};
use crate::store::wal::from_slice_unbounded;
use crate::store::{keys, Store, Upgrade};
use crate::types::compact::{self, Names};
use crate::types::{hlc_at, Dot, Twin};

/// Twin records rewritten per sled batch by the upgrade from format 1 or 2 (bounds its memory).
const UPGRADE_CHUNK: usize = 10_000;

/// The highest change number and HLC found so far.
#[derive(Clone, Copy, Default)]
pub(super) struct Floors {
    pub lseq: u64,
    pub hlc: u64,
}

/// Everything sled holds for the registry.
pub(super) struct Loaded {
    pub twins: Arc<TwinMap>,
    pub index: Indexes,
    pub models: HashMap<String, Arc<Model>>,
    /// The clock of every model and model tombstone.
    pub model_clocks: HashMap<String, super::models_sync::ModelClock>,
    pub rels: RelMap,
    pub tombstones: feed::Tombstones,
    pub floors: Floors,
}

/// Load the registry's state from `store` (see the module doc).
pub(super) fn load(store: &Store, origin: &Arc<str>) -> Result<Loaded, RegistryError> {
    let mut floors = Floors {
        lseq: store.get_u64(keys::META_LSEQ)?,
        hlc: store.get_u64(keys::META_HLC)?,
    };
    let (twins, index) = load_twins(store, origin, &mut floors)?;
    let mut models = HashMap::new();
    let mut model_clocks = HashMap::new();
    for kv in store.scan_prefix(&[keys::MODEL]) {
        let (k, v) = kv?;
        let (m, clock) = super::models_sync::read_stored(&v).map_err(|e| corrupt(&k, e))?;
        let et = String::from_utf8_lossy(&k[1..]).into_owned();
        floors.hlc = floors.hlc.max(clock.hlc);
        if let Some(m) = m {
            models.insert(et.clone(), Arc::new(m));
        }
        model_clocks.insert(et, clock);
    }
    let mut rels: RelMap = Default::default();
    for kv in store.scan_prefix(&[keys::REL]) {
        let (k, v) = kv?;
        let (src, dst, name) = keys::parse_rel(&k).ok_or_else(|| corrupt(&k, "bad key"))?;
        let state = super::rels::decode(&v).map_err(|e| corrupt(&k, e))?;
        floors.hlc = floors.hlc.max(state.hlc);
        rels.entry(src).or_default().insert((name, dst), state);
    }
    let mut tombstones = feed::Tombstones::default();
    for kv in store.scan_prefix(&[keys::TOMBSTONE]) {
        let (k, v) = kv?;
        let d: Tombstone = from_slice_unbounded(&v).map_err(|e| corrupt(&k, e))?;
        floors.lseq = floors.lseq.max(d.lseq);
        floors.hlc = floors.hlc.max(d.hlc);
        tombstones.insert(d.id, Arc::new(d));
    }
    Ok(Loaded {
        twins,
        index,
        models,
        model_clocks,
        rels,
        tombstones,
        floors,
    })
}

/// Load every twin and index it. Records of format 1 and 2 (JSON) are rewritten in the
/// compact form of format 3 in chunks as they load (format 1's also get their clocks and
/// change numbers); the directory says format 3 once all are.
fn load_twins(
    store: &Store,
    origin: &Arc<str>,
    floors: &mut Floors,
) -> Result<(Arc<TwinMap>, Indexes), RegistryError> {
    let twins = Arc::new(TwinMap::new());
    let mut index = Indexes::default();
    let from = store.format();
    let upgrading = from < keys::FORMAT_VERSION;
    let mut upgraded = Vec::new();
    let mut rewritten = 0usize;
    if from == 1 {
        // Format 1 handed out event numbers below a reservation: continue above it.
        floors.lseq = floors.lseq.max(
            store
                .get_u64(keys::META_EVENT_SEQ_RESERVED)?
                .saturating_sub(1),
        );
    }
    for kv in store.scan_prefix(&[keys::TWIN]) {
        let (k, v) = kv?;
        let id = keys::parse_twin(&k).ok_or_else(|| corrupt(&k, "bad key"))?;
        let mut t = compact::decode_stored(id, &v).map_err(|e| corrupt(&k, e))?;
        if from == 1 {
            upgrade_twin(&mut t, origin, floors);
        }
        if upgrading && v.first() != Some(&compact::TAG) {
            upgraded.push((k.to_vec(), compact::encode(&t, Names::Inline).into_vec()));
            if upgraded.len() == UPGRADE_CHUNK {
                rewritten += UPGRADE_CHUNK;
                store.upgrade_twins(std::mem::take(&mut upgraded))?;
                if rewritten.is_multiple_of(UPGRADE_CHUNK * 20) {
                    tracing::info!(
                        twins = rewritten,
                        "upgrading from format {from}: twins rewritten"
                    );
                }
            }
        }
        floors.lseq = floors.lseq.max(t.lseq);
        floors.hlc = floors.hlc.max(t.hlc);
        index.insert(&t);
        twins.insert(&t);
    }
    if upgrading {
        tracing::info!(
            twins = twins.len(),
            next_change = floors.lseq + 1,
            "upgrading the data directory from format {from} to {}",
            keys::FORMAT_VERSION
        );
        store.upgrade_twins(upgraded)?;
        store.finish_upgrade(Upgrade {
            lseq: floors.lseq,
            hlc: floors.hlc,
        })?;
    }
    Ok((twins, index))
}

/// Format 1 kept no clocks: every property was last written at the twin's last update, on
/// this node. Each twin gets a change number of its own (above every number format 1 handed
/// out), so the change feed can page through them.
fn upgrade_twin(t: &mut Twin, origin: &Arc<str>, floors: &mut Floors) {
    t.hlc = hlc_at(t.updated_at);
    let dot = Dot::of(&t.vclock, origin);
    t.clocks.stamp(t.properties.keys(), t.hlc, origin, dot);
    floors.lseq += 1;
    t.lseq = floors.lseq;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::registry::{NewTwin, Registry, Update};
    use crate::store::{keys, Store};
    use crate::types::compact;

    /// Open the store once the last run's threads have let go of it.
    async fn reopen(dir: &std::path::Path) -> Store {
        for _ in 0..500 {
            if let Ok(s) = Store::open(dir) {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the store stays locked")
    }

    /// A format-2 directory's JSON twin records are read, rewritten in the compact form and
    /// the directory marked format 3; a checkpoint after a write keeps the compact form.
    #[tokio::test]
    async fn json_records_of_format_2_are_rewritten_compact() {
        let dir = tempfile::tempdir().unwrap();
        let twin = {
            let store = Store::open(dir.path()).unwrap();
            let reg = Registry::open(&store, "node-a").unwrap();
            let props = json!({"temperature": 70.5, "big": u64::MAX, "nested": {"a": [1, -2]}});
            let t = reg
                .create(NewTwin {
                    entity_type: "machine".into(),
                    properties: props.as_object().unwrap().clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            reg.shutdown();
            t
        };
        // Turn the directory into what format 2 wrote: JSON records.
        let store = reopen(dir.path()).await;
        store
            .put_durable(&keys::twin(&twin.id), &twin.to_record_bytes())
            .unwrap();
        store
            .put_durable(keys::META_FORMAT_VERSION, &2u64.to_be_bytes())
            .unwrap();
        drop(store);
        let store = reopen(dir.path()).await;
        assert!(store.needs_upgrade());
        let reg = Registry::open(&store, "node-a").unwrap();
        assert_eq!(store.format(), keys::FORMAT_VERSION);
        let rec = store.get(&keys::twin(&twin.id)).unwrap().unwrap();
        assert_eq!(rec[0], compact::TAG);
        let back = reg.get(&twin.id).unwrap();
        assert_eq!(back, twin);
        reg.patch(Update::new(
            twin.id,
            json!({"temperature": 71}).as_object().unwrap().clone(),
        ))
        .await
        .unwrap();
        reg.shutdown();
        drop((reg, store));
        let store = reopen(dir.path()).await;
        assert!(!store.needs_upgrade());
        let reg = Registry::open(&store, "node-a").unwrap();
        let t = reg.get(&twin.id).unwrap();
        assert_eq!(t.properties["temperature"], json!(71));
        assert_eq!(t.properties["big"], json!(u64::MAX));
        assert_eq!(t.version, 2);
    }
}
