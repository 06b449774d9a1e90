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

/// A twin's compact blob as the map holds it, with where its properties begin, found once
/// when the blob is made instead of by every query that reads them (walking the head's
/// varints was a sixth of a full-result query). Derefs to the compact bytes. A change
/// replaces a twin's blob; a query copies the blobs it returns.
pub(crate) struct Blob(
    /// The property count's offset (u16 little-endian; 0: not kept, find it), then the
    /// compact bytes. Two bytes more do not change the allocation's size class for the
    /// demo's twin (121 bytes: 128).
    Box<[u8]>,
);

/// Bytes before the compact twin in a [`Blob`].
const PREFIX: usize = 2;

impl Blob {
    /// A blob of compact twin `b` (one allocation).
    pub(crate) fn new(b: &[u8]) -> Blob {
        let at = compact::props_offset(b)
            .ok()
            .and_then(|at| u16::try_from(at).ok())
            .unwrap_or(0);
        let mut bytes = Vec::with_capacity(PREFIX + b.len());
        bytes.extend_from_slice(&at.to_le_bytes());
        bytes.extend_from_slice(b);
        Blob(bytes.into_boxed_slice())
    }

    /// Where the twin's properties begin (0: not kept).
    #[inline]
    pub(crate) fn props_at(&self) -> u16 {
        u16::from_le_bytes([self.0[0], self.0[1]])
    }
}

/// The properties of compact twin `b`, which begin at `at` (0: not known, find them).
#[inline]
pub(crate) fn props_at(b: &[u8], at: u16) -> Option<compact::Props<'_>> {
    match at {
        0 => compact::Props::of(b).ok(),
        at => Some(compact::Props::at(b, at as usize)),
    }
}

impl std::ops::Deref for Blob {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        &self.0[PREFIX..]
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({} bytes)", self.len())
    }
}

/// Twins by id, each as its compact blob. Fx hashing: ids are UUIDs (uniform enough) and
/// this map is on every update.
pub(crate) struct TwinMap {
    map: DashMap<TwinId, Blob, FxBuildHasher>,
    /// Ordered indexes of the properties models mark `"indexed": true`, kept in step by
    /// [`TwinMap::changed`].
    pub(crate) ranges: RangeIndexes,
    /// Versions of the twins of each entity type (by [`super::segment::bucket`] of the type),
    /// raised by [`TwinMap::changed`] before a change of a twin of that type is written: a
    /// segment made at one version holds the type's twins as they are while it lasts (the
    /// twins added and removed, and so which have children, have a version of their own in
    /// the registry's indexes).
    pub(super) versions: [std::sync::atomic::AtomicU64; super::segment::VERSIONS],
    pub(super) segments: parking_lot::Mutex<super::segment::Segments>,
    /// How many segments there are (read without the lock by small queries).
    pub(super) segment_count: std::sync::atomic::AtomicUsize,
}

/// Ids read per locking of every shard in [`TwinMap::with_each`].
const SCAN_RUN: usize = 256;
/// Lookups made back to back in [`TwinMap::with_each`] before their twins are visited.
const LOOKUP_GROUP: usize = 16;

/// Ask the CPU to bring `blob` (its first bytes: the head, and the properties of a small
/// twin) into the cache, so that reading a group of blobs waits for their cache misses at
/// once instead of one after the other.
#[inline]
fn prefetch(blob: &Blob) {
    // Lines of 64 bytes: the head, and the properties of a small twin.
    let mut at = blob.0.as_ptr();
    let end = at.wrapping_add(blob.0.len());
    for _ in 0..3 {
        if at >= end {
            break;
        }
        prefetch_line(at);
        at = at.wrapping_add(64);
    }
}

/// Ask the CPU for the control bytes and the first bucket of the probe for `hash` in a
/// table of `buckets` whose data ends at `data_end` (the layout of hashbrown's table:
/// buckets downwards from there, control bytes upwards; a wrong guess only wastes a
/// prefetch).
#[inline]
fn prefetch_slot<T>(data_end: std::ptr::NonNull<T>, buckets: usize, hash: usize) {
    let pos = hash & (buckets - 1);
    let end = data_end.as_ptr().cast_const();
    prefetch_line(end.cast::<u8>().wrapping_add(pos));
    prefetch_line(end.wrapping_sub(pos + 1).cast::<u8>());
}

/// Ask the CPU to bring the cache line at `at` in (any address: nothing is read back).
#[inline]
fn prefetch_line(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and reads nothing back.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(at.cast());
    }
}

thread_local! {
    /// Where this thread encodes a twin before its blob is made ([`with_encoded`]).
    static ENCODED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` on `t` encoded (names interned) in this thread's buffer: a change makes one
/// allocation, its blob, where encoding into a fresh vector, fitting it and copying it
/// into the blob took three. `f` must not encode again.
fn with_encoded<R>(t: &Twin, f: impl FnOnce(&[u8]) -> R) -> R {
    ENCODED.with_borrow_mut(|buf| {
        buf.clear();
        compact::encode_into(t, buf, Names::Interned);
        let r = f(buf);
        // A huge twin's room is not kept.
        if buf.capacity() > 1 << 16 {
            *buf = Vec::new();
        }
        r
    })
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
            versions: std::array::from_fn(|_| Default::default()),
            segments: Default::default(),
            segment_count: Default::default(),
        }
    }

    /// The one place every change of a twin in memory passes: `old` is the blob before
    /// (`None` for a new twin), `new` the blob after (`None` for a removal). Called with the
    /// twin's shard locked, so changes of one twin arrive here in order: the range indexes
    /// are kept up to date here, and the versions of the twin's entity types raised (before
    /// the change is written, so that a segment made meanwhile is known stale).
    fn changed(&self, id: &TwinId, old: Option<&[u8]>, new: Option<&[u8]>) {
        let (ot, nt) = (
            old.map(compact::entity_type_ref),
            new.map(compact::entity_type_ref),
        );
        let (ob, nb) = (
            ot.map(super::segment::bucket),
            nt.map(super::segment::bucket),
        );
        for k in [ob, nb.filter(|k| Some(*k) != ob)].into_iter().flatten() {
            self.versions[k].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        if self.ranges.is_empty() {
            return;
        }
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

    /// Run `f` on the twin's blob (which knows where its properties are), under its shard's
    /// read lock (keep `f` short).
    pub(crate) fn with_blob<R>(&self, id: &TwinId, f: impl FnOnce(&Blob) -> R) -> Option<R> {
        self.map.get(id).map(|b| f(&b))
    }

    /// Call `f` with each of `ids` and its blob (`None`: no such twin), in the order given,
    /// until it breaks. Runs of [`SCAN_RUN`] ids are read with every shard read-locked once
    /// for the run instead of once per twin: a lock and an unlock are two locked atomic
    /// instructions, each a full barrier on x86 that keeps the next twin's cache misses from
    /// overlapping this one's. A run finding a shard write-locked (or a writer waiting on it)
    /// reads its twins one lock at a time instead, so a scan never waits for all the shards
    /// at once; a writer waits for at most one run. `f` must not read this map (a nested read
    /// lock waits behind a waiting writer, which waits for this one).
    pub(crate) fn with_each<'i>(
        &self,
        ids: impl Iterator<Item = &'i TwinId>,
        mut f: impl FnMut(&TwinId, Option<&Blob>) -> std::ops::ControlFlow<()>,
    ) {
        let mut ids = ids.peekable();
        while ids.peek().is_some() {
            let shards: Option<Vec<_>> = self.map.shards().iter().map(|s| s.try_read()).collect();
            match shards {
                Some(shards) => {
                    let mut left = SCAN_RUN;
                    let mut group: [(Option<&TwinId>, Option<&Blob>); LOOKUP_GROUP] =
                        [(None, None); LOOKUP_GROUP];
                    let mut hashes = [0usize; LOOKUP_GROUP];
                    while left > 0 && ids.peek().is_some() {
                        // A group's slots in the table are asked for first (their control
                        // bytes and the bucket their probe starts at), then the lookups run
                        // back to back and ask for the blobs, so that the cache misses of a
                        // group overlap, before `f` sees any of them.
                        for (slot, hash) in group.iter_mut().zip(hashes.iter_mut()) {
                            *slot = (ids.next_if(|_| left > 0), None);
                            let Some(id) = slot.0 else { break };
                            left -= 1;
                            *hash = self.map.hash_usize(id);
                            let table = &*shards[self.map.determine_shard(*hash)];
                            prefetch_slot(table.data_end(), table.buckets(), *hash);
                        }
                        for (slot, &hash) in group.iter_mut().zip(hashes.iter()) {
                            let Some(id) = slot.0 else { break };
                            let shard = &shards[self.map.determine_shard(hash)];
                            slot.1 = shard.find(hash as u64, |(k, _)| k == id).map(|b| {
                                // SAFETY: the bucket was just found in this shard, which
                                // stays read-locked (nothing can remove or move it) until
                                // the run ends.
                                let (_, v) = unsafe { b.as_ref() };
                                let v = v.get();
                                prefetch(v);
                                v
                            });
                        }
                        for (id, blob) in group {
                            let Some(id) = id else { break };
                            if f(id, blob).is_break() {
                                return;
                            }
                        }
                    }
                }
                None => {
                    for id in ids.by_ref().take(SCAN_RUN) {
                        let r = self.map.get(id);
                        if f(id, r.as_deref()).is_break() {
                            return;
                        }
                    }
                }
            }
        }
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
        with_encoded(t, |new| self.insert_blob(t.id, new));
    }

    /// Add a twin by its compact blob (names interned) unless the id is here already (one
    /// look-up); `added` sees the blob first. Returns whether it was added.
    pub(crate) fn insert_new(&self, id: TwinId, new: Box<[u8]>, added: impl FnOnce(&[u8])) -> bool {
        match self.map.entry(id) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(e) => {
                added(&new);
                self.insert_vacant(e, &new);
                true
            }
        }
    }

    /// Put a new twin in its vacant place, telling [`TwinMap::changed`].
    fn insert_vacant(&self, e: dashmap::VacantEntry<'_, TwinId, Blob>, new: &[u8]) {
        self.changed(e.key(), None, Some(new));
        e.insert(Blob::new(new));
    }

    /// Add or replace a twin by its compact blob (names interned).
    fn insert_blob(&self, id: TwinId, new: &[u8]) {
        match self.map.entry(id) {
            dashmap::Entry::Occupied(mut e) => {
                self.changed(&id, Some(&e.get()[..]), Some(new));
                e.insert(Blob::new(new));
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
    entry: RefMut<'a, TwinId, Blob>,
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
        let (map, entry) = (self.map, &mut self.entry);
        with_encoded(&self.twin, |new| {
            if new != &entry[..] {
                map.changed(&self.twin.id, Some(&entry[..]), Some(new));
                **entry = Blob::new(new);
            }
        });
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::json;

    /// A machine with a temperature (fresh id).
    pub(in crate::registry) fn twin() -> Twin {
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

    /// The blobs [`TwinMap::with_each`] hands over for `ids`, until `stop_after` of them.
    fn each(m: &TwinMap, ids: &[TwinId], stop_after: usize) -> Vec<(TwinId, Option<Box<[u8]>>)> {
        let mut seen = Vec::new();
        m.with_each(ids.iter(), |id, blob| {
            seen.push((*id, blob.map(|b| Box::from(&b[..]))));
            if seen.len() == stop_after {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        });
        seen
    }

    #[test]
    fn with_each_reads_every_id_in_order_with_the_lock_free_runs_and_without() {
        let m = TwinMap::new();
        // More than a run of ids, a missing one every seventh, none a multiple of a group.
        let n = SCAN_RUN * 2 + LOOKUP_GROUP + 3;
        let ids: Vec<TwinId> = (0..n)
            .map(|i| {
                let mut t = twin();
                t.properties.insert("i".into(), json!(i));
                if i % 7 != 3 {
                    m.insert(&t);
                }
                t.id
            })
            .collect();
        let expect = |upto: usize| -> Vec<(TwinId, Option<Box<[u8]>>)> {
            ids[..upto]
                .iter()
                .map(|id| (*id, m.with(id, |b| Box::<[u8]>::from(b))))
                .collect()
        };
        assert_eq!(each(&m, &ids, usize::MAX), expect(n));
        assert_eq!(each(&m, &ids, 5), expect(5));
        assert_eq!(each(&m, &ids, SCAN_RUN + 1), expect(SCAN_RUN + 1));
        // A writer holding a shard: the scan reads one twin at a time instead, waits for the
        // writer only on that shard's twins, and still answers the same.
        let held = ids[0];
        let writer = &m;
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel();
            scope.spawn(move || {
                let mut g = writer.get_mut(&held).unwrap();
                g.version = 2;
                tx.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(50));
            });
            rx.recv().unwrap();
            let got = each(&m, &ids, usize::MAX);
            assert_eq!(m.get(&held).unwrap().version, 2, "read after the writer");
            assert_eq!(got, expect(n));
        });
    }
}
