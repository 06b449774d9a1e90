//! Twins in memory: one compact blob per twin ([`crate::types::compact`]), in a sharded map.
//!
//! Owns: the blobs. Exposes: [`TwinMap`], whose readers decode a copy of a twin
//! ([`TwinMap::get`]) or read one field of the blob without decoding the rest
//! ([`TwinMap::lseq`], [`TwinMap::parent_id`], [`TwinMap::props`] …), and whose only
//! mutations are [`TwinMap::insert`], [`TwinMap::remove`] and the guard of
//! [`TwinMap::get_mut`], which re-encodes the twin when it is dropped, if it changed.
//! Every change of a twin in memory therefore passes through [`TwinMap::changed`]: the one
//! place where an index of property values (range queries) would be kept in step.
//! Must never: be written to from outside the registry's write path (the writer thread, and
//! the load and replay at open).
//!
//! A guard holds its shard's write lock like the `RefMut` it wraps, so the write path keeps
//! one writer per twin; see the lock order in the registry's module doc.

use dashmap::mapref::one::RefMut;
use dashmap::DashMap;
use rustc_hash::FxBuildHasher;

use super::range_index::{Lookup, RangeIndexes};
use crate::store::StateSource;
use crate::types::compact::{self, Names};
use crate::types::{Lifecycle, Twin, TwinId};

/// Twins by id, each as its compact blob. Fx hashing: ids are UUIDs (uniform enough) and
/// this map is on every update.
pub(crate) struct TwinMap {
    map: DashMap<TwinId, Box<[u8]>, FxBuildHasher>,
    /// Ordered indexes of the properties models mark `"indexed": true`, kept in step by
    /// [`TwinMap::changed`].
    pub(crate) ranges: RangeIndexes,
}

/// A blob this map encoded: decoding it cannot fail short of a bug.
fn decode(id: TwinId, b: &[u8]) -> Twin {
    compact::decode(id, b).expect("a twin blob encoded by this process decodes")
}

impl TwinMap {
    pub(crate) fn new() -> TwinMap {
        TwinMap {
            map: DashMap::with_hasher(FxBuildHasher),
            ranges: RangeIndexes::default(),
        }
    }

    /// The one place every change of a twin in memory passes: `old` is the blob before
    /// (`None` for a new twin), `new` the blob after (`None` for a removal). Called with the
    /// twin's shard locked, so changes of one twin arrive here in order: the range indexes
    /// are kept up to date here.
    fn changed(&self, id: &TwinId, old: Option<&[u8]>, new: Option<&[u8]>) {
        if self.ranges.is_empty() {
            return;
        }
        let (ot, nt) = (
            old.map(compact::entity_type_ref),
            new.map(compact::entity_type_ref),
        );
        let (op, np) = (
            old.and_then(|b| compact::Props::of(b).ok()),
            new.and_then(|b| compact::Props::of(b).ok()),
        );
        let (ol, nl) = (
            op.map(|p| move |k: &str| p.get(k)),
            np.map(|p| move |k: &str| p.get(k)),
        );
        self.ranges.update(
            *id,
            ot.zip(ol.as_ref().map(|f| f as Lookup)),
            nt.zip(nl.as_ref().map(|f| f as Lookup)),
        );
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn contains(&self, id: &TwinId) -> bool {
        self.map.contains_key(id)
    }

    /// A decoded copy of the twin (without `children_ids`).
    pub(crate) fn get(&self, id: &TwinId) -> Option<Twin> {
        self.map.get(id).map(|b| decode(*id, &b))
    }

    /// Run `f` on the twin's blob, under its shard's read lock (keep `f` short).
    pub(crate) fn with<R>(&self, id: &TwinId, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        self.map.get(id).map(|b| f(&b))
    }

    /// Call `f` with every twin's id and blob, in the map's order (memory order: no lookup
    /// per twin). Each shard is read-locked while it is walked.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&TwinId, &[u8])) {
        for e in self.map.iter() {
            f(e.key(), e.value());
        }
    }

    /// The change number of the twin's last change.
    pub(crate) fn lseq(&self, id: &TwinId) -> Option<u64> {
        self.with(id, compact::lseq)
    }

    /// The twin's parent (`Some(None)`: the twin exists and has none).
    pub(crate) fn parent_id(&self, id: &TwinId) -> Option<Option<TwinId>> {
        self.with(id, compact::parent_id)
    }

    pub(crate) fn lifecycle(&self, id: &TwinId) -> Option<Lifecycle> {
        self.with(id, compact::lifecycle)
    }

    pub(crate) fn entity_type(&self, id: &TwinId) -> Option<String> {
        self.with(id, compact::entity_type)
    }

    /// The twin for changing in place: the guard decodes it, and re-encodes it when dropped
    /// if it was borrowed mutably and its bytes changed.
    pub(crate) fn get_mut(&self, id: &TwinId) -> Option<TwinGuard<'_>> {
        let entry = self.map.get_mut(id)?;
        let twin = decode(*id, &entry);
        Some(TwinGuard {
            map: self,
            entry,
            twin,
            touched: false,
        })
    }

    /// Add or replace a twin.
    pub(crate) fn insert(&self, t: &Twin) {
        let new = compact::encode(t, Names::Interned);
        self.insert_blob(t.id, new);
    }

    /// Add a twin by its compact blob (names interned) unless the id is here already (one
    /// look-up); `added` sees the blob first. Returns whether it was added.
    pub(crate) fn insert_new(&self, id: TwinId, new: Box<[u8]>, added: impl FnOnce(&[u8])) -> bool {
        match self.map.entry(id) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(e) => {
                added(&new);
                self.insert_vacant(e, new);
                true
            }
        }
    }

    /// Put a new twin in its vacant place, telling [`TwinMap::changed`].
    fn insert_vacant(&self, e: dashmap::VacantEntry<'_, TwinId, Box<[u8]>>, new: Box<[u8]>) {
        self.changed(e.key(), None, Some(&new[..]));
        e.insert(new);
    }

    /// Add or replace a twin by its compact blob (names interned).
    pub(crate) fn insert_blob(&self, id: TwinId, new: Box<[u8]>) {
        match self.map.entry(id) {
            dashmap::Entry::Occupied(mut e) => {
                self.changed(&id, Some(&e.get()[..]), Some(&new[..]));
                e.insert(new);
            }
            dashmap::Entry::Vacant(e) => self.insert_vacant(e, new),
        }
    }

    /// Remove a twin, returning it decoded.
    pub(crate) fn remove(&self, id: &TwinId) -> Option<Twin> {
        let (_, old) = self.map.remove_if(id, |id, old| {
            self.changed(id, Some(&old[..]), None);
            true
        })?;
        Some(decode(*id, &old))
    }

    /// Every twin's `(change number, id)`, for the change feed's index.
    pub(crate) fn numbered(&self) -> Vec<(u64, TwinId)> {
        self.map
            .iter()
            .map(|e| (compact::lseq(e.value()), *e.key()))
            .collect()
    }

    /// The ids of the twins whose blob satisfies `keep` (read without decoding).
    pub(crate) fn ids_where(&self, mut keep: impl FnMut(&TwinId, &[u8]) -> bool) -> Vec<TwinId> {
        self.map
            .iter()
            .filter(|e| keep(e.key(), e.value()))
            .map(|e| *e.key())
            .collect()
    }
}

impl StateSource for TwinMap {
    fn twin_bytes(&self, id: &TwinId) -> Option<Vec<u8>> {
        // Copied out under the shard's lock, transcoded outside it: the checkpoint thread runs
        // at a lower priority, and the writer must never wait for it on a twin of the same
        // shard. On disk names are spelled out (interned numbers belong to this process).
        let blob = self.map.get(id).map(|b| b.to_vec())?;
        let mut out = Vec::with_capacity(blob.len() + 64);
        compact::transcode(&blob, Names::Inline, &mut out)
            .unwrap_or_else(|e| panic!("twin {id} in memory: {e}"));
        Some(out)
    }

    fn contains(&self, id: &TwinId) -> bool {
        self.map.contains_key(id)
    }

    fn twin_count(&self) -> usize {
        self.map.len()
    }

    fn twin_ids(&self) -> Vec<TwinId> {
        self.ids_where(|_, _| true)
    }
}

/// A twin being changed in place (see [`TwinMap::get_mut`]). Holds the twin's shard locked.
pub(crate) struct TwinGuard<'a> {
    map: &'a TwinMap,
    entry: RefMut<'a, TwinId, Box<[u8]>>,
    twin: Twin,
    touched: bool,
}

impl std::ops::Deref for TwinGuard<'_> {
    type Target = Twin;
    fn deref(&self) -> &Twin {
        &self.twin
    }
}

impl std::ops::DerefMut for TwinGuard<'_> {
    fn deref_mut(&mut self) -> &mut Twin {
        self.touched = true;
        &mut self.twin
    }
}

impl Drop for TwinGuard<'_> {
    fn drop(&mut self) {
        if !self.touched {
            return;
        }
        let new = compact::encode(&self.twin, Names::Interned);
        if new[..] != self.entry[..] {
            self.map
                .changed(&self.twin.id, Some(&self.entry[..]), Some(&new[..]));
            *self.entry = new;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn twin() -> Twin {
        let now = chrono::Utc::now();
        Twin {
            id: TwinId::new_v7(),
            entity_type: "machine".into(),
            properties: json!({"temperature": 70}).as_object().unwrap().clone(),
            version: 1,
            vclock: Default::default(),
            parent_id: None,
            children_ids: Default::default(),
            lifecycle: Lifecycle::Active,
            created_at: now,
            updated_at: now,
            hlc: 5,
            lseq: 7,
            clocks: Default::default(),
            deleted_hlc: 0,
            siblings: None,
        }
    }

    #[test]
    fn a_guard_writes_back_what_changed_and_only_that() {
        let m = TwinMap::new();
        let t = twin();
        m.insert(&t);
        assert_eq!(m.get(&t.id).as_ref(), Some(&t));
        assert_eq!(m.lseq(&t.id), Some(7));
        assert_eq!(m.entity_type(&t.id).as_deref(), Some("machine"));
        {
            let g = m.get_mut(&t.id).unwrap();
            assert_eq!(g.version, 1);
        }
        {
            let mut g = m.get_mut(&t.id).unwrap();
            g.version = 2;
            g.lseq = 9;
            g.properties.insert("temperature".into(), json!(71.5));
        }
        let back = m.get(&t.id).unwrap();
        assert_eq!((back.version, back.lseq), (2, 9));
        assert_eq!(back.properties["temperature"], json!(71.5));
        assert_eq!(m.numbered(), vec![(9, t.id)]);
        assert_eq!(m.remove(&t.id).map(|t| t.version), Some(2));
        assert!(!m.contains(&t.id));
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn the_checkpoint_reads_names_spelled_out() {
        let m = TwinMap::new();
        let t = twin();
        m.insert(&t);
        let disk = m.twin_bytes(&t.id).unwrap();
        assert_eq!(disk[0], compact::TAG);
        assert!(disk.windows(7).any(|w| w == b"machine"));
        assert_eq!(compact::decode_stored(t.id, &disk).unwrap(), t);
    }
}
