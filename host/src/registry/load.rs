//! Loading the registry from sled at start: twins (upgrading a format-1 directory on the
//! way), models, relationships and tombstones, and the highest change number and clock
//! stored, above which the node continues.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;

use super::{corrupt, feed, Indexes, Model, RegistryError, RelMap, Tombstone, TwinMap};
use crate::store::wal::from_slice_unbounded;
use crate::store::{keys, Store, Upgrade};
use crate::types::{hlc_at, Dot, Twin};

/// Twin records rewritten per sled batch by the upgrade from format 1 (bounds its memory).
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

/// Load every twin and index it; a format-1 directory is upgraded in chunks as it loads.
fn load_twins(
    store: &Store,
    origin: &Arc<str>,
    floors: &mut Floors,
) -> Result<(Arc<TwinMap>, Indexes), RegistryError> {
    let twins = Arc::new(TwinMap(DashMap::with_hasher(rustc_hash::FxBuildHasher)));
    let mut index = Indexes::default();
    let upgrading = store.needs_upgrade();
    let mut upgraded = Vec::new();
    if upgrading {
        // Format 1 handed out event numbers below a reservation: continue above it.
        floors.lseq = floors.lseq.max(
            store
                .get_u64(keys::META_EVENT_SEQ_RESERVED)?
                .saturating_sub(1),
        );
    }
    for kv in store.scan_prefix(&[keys::TWIN]) {
        let (k, v) = kv?;
        let mut t: Twin = from_slice_unbounded(&v).map_err(|e| corrupt(&k, e))?;
        if upgrading {
            upgrade_twin(&mut t, origin, floors);
            upgraded.push((k.to_vec(), t.to_record_bytes()));
            if upgraded.len() == UPGRADE_CHUNK {
                store.upgrade_twins(std::mem::take(&mut upgraded))?;
                if twins.0.len() % (UPGRADE_CHUNK * 20) < UPGRADE_CHUNK {
                    tracing::info!(
                        twins = twins.0.len(),
                        "upgrading from format 1: twins rewritten"
                    );
                }
            }
        }
        // One shared origin string for this node's writes instead of one per property.
        for c in t.clocks.values_mut() {
            if *c.origin == **origin {
                c.origin = origin.clone();
            }
        }
        floors.lseq = floors.lseq.max(t.lseq);
        floors.hlc = floors.hlc.max(t.hlc);
        index.insert(&t);
        twins.0.insert(t.id, Arc::new(t));
    }
    if upgrading {
        tracing::info!(
            twins = twins.0.len(),
            next_change = floors.lseq + 1,
            "upgrading the data directory from format 1 to {}",
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
