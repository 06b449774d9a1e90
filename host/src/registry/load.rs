//! Loading the registry at start: twins from their files (upgrading a directory of format 1-3,
//! which kept them in sled, on the way), models, relationships and tombstones, and the highest change number and clock
//! stored, above which the node continues.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rustc_hash::FxBuildHasher;

use super::{
    corrupt, feed, IndexBuilder, Indexes, Model, RegistryError, RelMap, Tombstone, TwinMap,
};
use crate::store::wal::from_slice_unbounded;
use crate::store::{keys, Store, Upgrade};
use crate::types::compact;
use crate::types::{hlc_at, Dot, Twin, TwinId};

/// A line of progress every this many twins loaded.
const PROGRESS_EVERY: usize = 1_000_000;

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
    let from = store.format();
    let mut index = IndexBuilder::with_capacity(if from < keys::TWIN_FILES_FORMAT {
        0
    } else {
        store.stored_twin_records()? as usize
    });
    // Each twin arrives as its compact blob with names interned, and is indexed from it. A
    // twin already loaded (from a newer record) is left as it is.
    let mut loaded = |id: TwinId, blob: Box<[u8]>, floors: &mut Floors| {
        let added = twins.insert_new(id, blob, |blob| {
            floors.lseq = floors.lseq.max(compact::lseq(blob));
            floors.hlc = floors.hlc.max(compact::hlc(blob));
            index.add_blob(id, blob);
        });
        if added && twins.len().is_multiple_of(PROGRESS_EVERY) {
            tracing::info!(twins = twins.len(), "loading twins");
        }
    };
    if from < keys::TWIN_FILES_FORMAT {
        // Formats 1-3: one sled key per twin (JSON, then compact), all written into the first
        // twin file by the upgrade.
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
            loaded(id, compact::encode(&t, compact::Names::Interned), floors);
        }
        tracing::info!(
            twins = twins.len(),
            next_change = floors.lseq + 1,
            "upgrading the data directory from format {from} to {}",
            keys::FORMAT_VERSION
        );
        store.finish_upgrade(
            Upgrade {
                lseq: floors.lseq,
                hlc: floors.hlc,
            },
            &*twins,
        )?;
        return Ok((twins, index.finish()));
    }
    // What an upgrade interrupted after its commit left of the old per-twin keys.
    if store.scan_prefix(&[keys::TWIN]).next().is_some() {
        store.remove_legacy_twin_keys()?;
    }
    // Newest record first: a twin already loaded, or deleted in a newer file, is skipped.
    // Records are compact with names spelled out: transcoded to interned names (through a
    // scratch buffer, so each blob is allocated once at its size), never decoded.
    let mut deleted: HashSet<TwinId, FxBuildHasher> = HashSet::default();
    let mut scratch = Vec::with_capacity(512);
    store.read_twins(|id, record| {
        if deleted.contains(&id) {
            return Ok(());
        }
        match record {
            None => {
                deleted.insert(id);
            }
            Some(r) => {
                scratch.clear();
                compact::transcode(r, compact::Names::Interned, &mut scratch)
                    .map_err(|e| corrupt(format!("twin {id}").as_bytes(), e))?;
                loaded(id, Box::from(&scratch[..]), floors);
            }
        }
        Ok(())
    })?;
    Ok((twins, index.finish()))
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

    /// Directories of format 2 (JSON records in sled) and 3 (compact records in sled) are
    /// upgraded: their twins move into the first twin file, the sled keys go, and the
    /// directory says the current format; writes after that survive a restart.
    #[tokio::test]
    async fn twin_records_of_formats_2_and_3_move_into_twin_files() {
        for (format, json) in [(2u64, true), (3, false)] {
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
            // Turn the directory into what that format wrote: a record per sled key, and
            // no twin files.
            let store = reopen(dir.path()).await;
            let record = if json {
                twin.to_record_bytes()
            } else {
                compact::encode(&twin, compact::Names::Inline).into_vec()
            };
            store.put_durable(&keys::twin(&twin.id), &record).unwrap();
            store.put_durable(keys::META_TWIN_FILES, b"").unwrap();
            store
                .put_durable(keys::META_FORMAT_VERSION, &format.to_be_bytes())
                .unwrap();
            drop(store);
            let store = reopen(dir.path()).await;
            assert!(store.needs_upgrade());
            let reg = Registry::open(&store, "node-a").unwrap();
            assert_eq!(store.format(), keys::FORMAT_VERSION);
            assert!(store.get(&keys::twin(&twin.id)).unwrap().is_none());
            assert_eq!(store.twin_files().files.len(), 1, "format {format}");
            assert_eq!(reg.get(&twin.id).unwrap(), twin, "format {format}");
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
            reg.shutdown();
        }
    }

    /// Every checkpoint adds a twin file of what changed; once the files hold more than twice
    /// the twins, one checkpoint writes them all into a single new file and the rest go. The
    /// newest record of each twin wins on open, a deletion included, and a file no manifest
    /// names (a crash mid-checkpoint) is removed.
    #[tokio::test]
    async fn checkpoints_add_twin_files_and_a_compaction_folds_them_into_one() {
        let dir = tempfile::tempdir().unwrap();
        let open = |dir: std::path::PathBuf| async move {
            let store = reopen(&dir).await.with_compact_slack(0);
            let reg = Registry::open(&store, "node-a").unwrap();
            (store, reg)
        };
        let (store, reg) = open(dir.path().into()).await;
        let mut ids = Vec::new();
        for i in 0..40 {
            let t = reg
                .create(NewTwin {
                    entity_type: "machine".into(),
                    properties: json!({"n": i}).as_object().unwrap().clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            ids.push(t.id);
        }
        reg.shutdown();
        drop((reg, store));
        let mut files_seen = Vec::new();
        let mut expected = std::collections::HashMap::new();
        for round in 1..=4 {
            let (store, reg) = open(dir.path().into()).await;
            files_seen.push(store.twin_files().files.len());
            for (i, id) in ids.iter().enumerate() {
                let n = round * 100 + i;
                reg.patch(Update::new(
                    *id,
                    json!({"n": n}).as_object().unwrap().clone(),
                ))
                .await
                .unwrap();
                expected.insert(*id, n);
            }
            if round == 2 {
                for id in ids.drain(30..) {
                    reg.delete(id, false).await.unwrap();
                    expected.remove(&id);
                }
            }
            reg.shutdown();
            drop((reg, store));
        }
        // 40 records, then +40 (80 ≤ 2 × 40: a second file); round 2 deletes 10 twins, so
        // its checkpoint finds 80 > 2 × 30 and compacts into one file of 30; +30 again.
        assert_eq!(files_seen, vec![1, 2, 1, 2]);
        std::fs::write(
            dir.path().join("twins/99999999-999999999999.twins"),
            b"junk",
        )
        .unwrap();
        let (store, reg) = open(dir.path().into()).await;
        assert_eq!(store.twin_files().files.len(), 3);
        assert!(!dir
            .path()
            .join("twins/99999999-999999999999.twins")
            .exists());
        assert_eq!(reg.twin_count(), 30);
        for (id, n) in &expected {
            assert_eq!(reg.get(id).unwrap().properties["n"], json!(n));
        }
        let on_disk = std::fs::read_dir(dir.path().join("twins")).unwrap().count();
        assert_eq!(on_disk, 3, "the files a compaction replaced are gone");
        reg.shutdown();
    }

    /// A twin file that does not read back whole stops the node from starting, naming it.
    #[tokio::test]
    async fn a_damaged_twin_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let reg = Registry::open(&store, "node-a").unwrap();
            reg.create(NewTwin {
                entity_type: "machine".into(),
                ..Default::default()
            })
            .await
            .unwrap();
            reg.shutdown();
        }
        let store = reopen(dir.path()).await;
        let manifest = store.get(keys::META_TWIN_FILES).unwrap().unwrap();
        let name = crate::store::twin_files::Manifest::decode(&manifest)
            .unwrap()
            .files
            .pop()
            .unwrap();
        let path = dir.path().join("twins").join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0xFF;
        std::fs::write(&path, bytes).unwrap();
        let err = Registry::open(&store, "node-a").err().unwrap().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("checksum"),
            "{err}"
        );
    }

    /// History samples go into the journal at each checkpoint: readable from memory, read
    /// back from the journal files after a restart, folded into history blocks (the journal
    /// files then go), and the samples of a twin deleted meanwhile are not folded.
    #[tokio::test]
    async fn history_goes_through_the_journal_into_sled() {
        use crate::history::{History, Retention};
        let dir = tempfile::tempdir().unwrap();
        let temp = |v: f64| json!({"temperature": v}).as_object().unwrap().clone();
        let open = |fold: std::time::Duration| {
            let dir = dir.path().to_path_buf();
            async move {
                let store = reopen(&dir).await.with_fold_every(fold);
                let reg = Registry::open(&store, "node-a").unwrap();
                (store, reg)
            }
        };
        let never = std::time::Duration::from_secs(3600);
        let (store, reg) = open(never).await;
        let mut ids = Vec::new();
        for _ in 0..2 {
            let t = reg
                .create(NewTwin {
                    entity_type: "machine".into(),
                    properties: temp(1.0),
                    ..Default::default()
                })
                .await
                .unwrap();
            ids.push(t.id);
        }
        for v in 2..=5 {
            for id in &ids {
                reg.patch(Update::new(*id, temp(v as f64))).await.unwrap();
            }
        }
        reg.shutdown();
        assert_eq!(
            store.journal_files().len(),
            1,
            "the final checkpoint's journal"
        );
        drop((reg, store));
        // Read back from the journal after a restart; a deletion; then every checkpoint folds.
        let (store, reg) = open(never).await;
        let h = History::new(store.clone(), Retention::default());
        assert_eq!(
            h.points(&ids[0], "temperature", None, None).unwrap().len(),
            5
        );
        reg.delete(ids[1], false).await.unwrap();
        reg.shutdown();
        drop((reg, store, h));
        let (store, reg) = open(std::time::Duration::ZERO).await;
        reg.patch(Update::new(ids[0], temp(6.0))).await.unwrap();
        reg.shutdown();
        assert!(store.journal_files().is_empty(), "folded");
        let files = std::fs::read_dir(dir.path().join("history"))
            .unwrap()
            .count();
        assert_eq!(files, 0);
        drop((reg, store));
        let (store, reg) = open(never).await;
        let h = History::new(store.clone(), Retention::default());
        let points = h.points(&ids[0], "temperature", None, None).unwrap();
        let values: Vec<f64> = points.iter().map(|p| p.value).collect();
        assert_eq!(values, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let gone = keys::history_twin_prefix(&ids[1]);
        assert_eq!(
            store.scan_prefix(&gone).count(),
            0,
            "a deleted twin's samples"
        );
        reg.shutdown();
    }
}
