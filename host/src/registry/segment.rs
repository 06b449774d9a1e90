//! Segments: read-optimized copies of one entity type's twins, for the big queries that
//! read them all again and again (the seed's full-result query, a dashboard's listing).
//!
//! A segment holds the type's twins' compact bytes back to back in id order, with their ids
//! and where each one's properties begin in arrays beside them: a scan reads it front to
//! back (no hash probe, no tree walk, no blob behind a pointer per twin) and a page refers
//! to its twins instead of copying them (the page keeps the segment alive).
//!
//! Owns: the segments of the [`TwinMap`] and when they are made and dropped. A segment is
//! used only while no twin of its type has changed since it was made (the type's version in
//! the map, raised by every change of a twin of the type before the change is written; the
//! types share [`VERSIONS`] versions by a hash of their names) and no twin was added or
//! removed (the registry's indexes' version: the twins of the type and which of them have
//! children, read under the indexes' read lock with the segment): a query reading one sees
//! the twins as they all were at its start. One is made by a big query that finds the type
//! unchanged since the previous big query over it (a type whose twins change between such
//! queries never pays for one: those queries read the map), one at a time; every stale one
//! is dropped by the next big query by type. Together they hold at most the budget
//! ([`MAX_BYTES`] unless `serve --segment-mb` says otherwise); a type that does not fit is
//! not tried again at the same versions.
//! Must never: serve a twin from a segment made before a change of the map; hold more than
//! its budget.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::twins::TwinMap;
use crate::types::TwinId;

/// How many versions the map keeps for the entity types ([`bucket`]): a change of a twin
/// makes stale the segments of the types in its bucket (its own, and the few that share it).
pub(crate) const VERSIONS: usize = 64;

/// The map's version that the twins of `entity_type` share.
#[inline]
pub(crate) fn bucket(entity_type: &str) -> usize {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(entity_type) as usize % VERSIONS
}

/// The most bytes all segments hold together (twins' bytes, ids and spans) unless the
/// server is told otherwise (`serve --segment-mb`).
pub(crate) const MAX_BYTES: usize = 256 << 20;
/// A type with fewer twins gets no segment (its scans are short anyway).
pub(crate) const MIN_TWINS: usize = 4_096;

/// One entity type's twins as they were at one version of the map.
pub(crate) struct Segment {
    /// Its type's version in the map ([`bucket`]), and that version when it was made.
    bucket: usize,
    version: u64,
    /// The version of the registry's indexes (twins added and removed, children) it was
    /// made at.
    structure: u64,
    ids: Vec<TwinId>,
    spans: Vec<Span>,
    bytes: Vec<u8>,
    /// A bit per twin: set for those that have children (the others' JSON lists none, and a
    /// scan does not look them up: a child added or removed raises the indexes' version).
    parents: Vec<u64>,
}

/// Where one twin of a [`Segment`] is.
#[derive(Clone, Copy)]
struct Span {
    at: u32,
    len: u32,
    /// Where its properties begin (as the map's blob keeps it; 0: find them).
    props: u16,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Segment({} twins, {} bytes, version {})",
            self.len(),
            self.bytes.len(),
            self.version
        )
    }
}

impl Segment {
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// The id of the twin at position `i`.
    #[inline]
    pub(crate) fn id(&self, i: usize) -> &TwinId {
        &self.ids[i]
    }

    /// The compact bytes of the twin at position `i` and where its properties begin.
    #[inline]
    pub(crate) fn twin(&self, i: usize) -> (&[u8], u16) {
        let s = self.spans[i];
        let at = s.at as usize;
        (&self.bytes[at..at + s.len as usize], s.props)
    }

    /// Whether the twin at position `i` has children.
    #[inline]
    pub(crate) fn has_children(&self, i: usize) -> bool {
        self.parents[i / 64] & (1 << (i % 64)) != 0
    }

    /// The position of the first twin after `lower`.
    pub(crate) fn position(&self, lower: Bound<TwinId>) -> usize {
        match lower {
            Bound::Unbounded => 0,
            Bound::Included(id) => self.ids.partition_point(|x| *x < id),
            Bound::Excluded(id) => self.ids.partition_point(|x| *x <= id),
        }
    }

    /// The twins of `ids` as `map` holds them now.
    #[cfg(test)]
    pub(crate) fn of(
        map: &TwinMap,
        ids: &BTreeSet<TwinId>,
        has_children: &dyn Fn(&TwinId) -> bool,
    ) -> Self {
        Segment::make(map, ids, has_children, (0, 0), usize::MAX).expect("no budget")
    }

    /// Bytes it holds.
    fn size(&self) -> usize {
        self.bytes.capacity()
            + self.ids.capacity() * size_of::<TwinId>()
            + self.spans.capacity() * size_of::<Span>()
            + self.parents.capacity() * size_of::<u64>()
    }

    /// The twins of `ids` as `map` holds them (`has_children`: whether one has any), or
    /// `None` when they would take over `budget` bytes or 4 GiB.
    fn make(
        map: &TwinMap,
        ids: &BTreeSet<TwinId>,
        has_children: &dyn Fn(&TwinId) -> bool,
        (version, structure): (u64, u64),
        budget: usize,
    ) -> Option<Self> {
        let mut s = Segment {
            bucket: 0,
            version,
            structure,
            ids: Vec::with_capacity(ids.len()),
            spans: Vec::with_capacity(ids.len()),
            bytes: Vec::new(),
            parents: vec![0; ids.len().div_ceil(64)],
        };
        let mut fits = true;
        map.with_each(ids.iter(), |id, blob| {
            let Some(b) = blob else {
                return std::ops::ControlFlow::Continue(());
            };
            if s.bytes.is_empty() {
                // Every twin at the first one's size: give up early on a type that will not
                // fit; else room for them all and an eighth more.
                fits = ids.len().saturating_mul(b.len()) <= budget;
                if !fits {
                    return std::ops::ControlFlow::Break(());
                }
                s.bytes
                    .reserve((ids.len() * (b.len() + b.len() / 8)).min(budget));
            }
            let at = s.bytes.len();
            fits = at + b.len() <= budget.min(u32::MAX as usize);
            if !fits {
                return std::ops::ControlFlow::Break(());
            }
            s.bytes.extend_from_slice(b);
            if has_children(id) {
                let i = s.ids.len();
                s.parents[i / 64] |= 1 << (i % 64);
            }
            s.ids.push(*id);
            s.spans.push(Span {
                at: at as u32,
                len: b.len() as u32,
                props: b.props_at(),
            });
            std::ops::ControlFlow::Continue(())
        });
        s.bytes.shrink_to_fit();
        (fits && s.size() <= budget).then_some(s)
    }
}

/// The segments of a [`TwinMap`], by entity type.
pub(crate) struct Segments {
    by_type: HashMap<String, Arc<Segment>>,
    /// By type: its versions (twins, indexes) when a big query over it last found no
    /// segment, and whether a segment made at those versions did not fit.
    asked: HashMap<String, ((u64, u64), bool)>,
    /// Bytes the segments hold.
    bytes: usize,
    /// The most they may hold ([`MAX_BYTES`]).
    max_bytes: usize,
    /// Whether a segment is being made (one at a time: each may take the whole budget).
    making: bool,
    /// Segments begun (for tests).
    begun: u64,
}

impl Default for Segments {
    fn default() -> Self {
        Segments {
            by_type: HashMap::new(),
            asked: HashMap::new(),
            bytes: 0,
            max_bytes: MAX_BYTES,
            making: false,
            begun: 0,
        }
    }
}

/// Clears [`Segments::making`] if the making ends without doing so (a panic).
struct Making<'a> {
    segments: &'a parking_lot::Mutex<Segments>,
    armed: bool,
}

impl Drop for Making<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.segments.lock().making = false;
        }
    }
}

impl TwinMap {
    /// The current segment of `entity_type`'s twins (`ids`, from the type index), if there is
    /// one (for a query of any size); for a `big` query, one is made when the type has not
    /// changed since the previous big query over it found none. `has_children` (whether a
    /// twin has any) and `structure` (the indexes' version) come from the registry's
    /// indexes, read-locked by the caller while it makes or reads the segment.
    pub(crate) fn segment(
        &self,
        entity_type: &str,
        ids: &BTreeSet<TwinId>,
        has_children: &dyn Fn(&TwinId) -> bool,
        structure: u64,
        big: bool,
    ) -> Option<Arc<Segment>> {
        if !big && self.segment_count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let versions = &self.versions[bucket(entity_type)];
        let now = (versions.load(Ordering::SeqCst), structure);
        let current = |s: &Segment| {
            (self.versions[s.bucket].load(Ordering::SeqCst), structure) == (s.version, s.structure)
        };
        let (stale, budget) = {
            let mut segs = self.segments.lock();
            if let Some(s) = segs.by_type.get(entity_type).filter(|s| current(s)) {
                return Some(s.clone());
            }
            if !big {
                return None;
            }
            // Stale segments are never read again: a big query drops them all (freed outside
            // the lock; a page may still hold one).
            let stale: Vec<Arc<Segment>> = (segs.by_type)
                .extract_if(|_, s| !current(s))
                .map(|(_, s)| s)
                .collect();
            segs.bytes -= stale.iter().map(|s| s.size()).sum::<usize>();
            self.segment_count
                .store(segs.by_type.len(), Ordering::Relaxed);
            let make = match segs.asked.get(entity_type) {
                _ if ids.len() < MIN_TWINS || segs.making || segs.max_bytes == 0 => false,
                // Asked at these versions before: made now, unless it did not fit then.
                Some(&(at, refused)) if at == now => !refused,
                _ => {
                    segs.asked.insert(entity_type.to_owned(), (now, false));
                    false
                }
            };
            if make {
                segs.making = true;
                segs.begun += 1;
            }
            (
                stale,
                make.then(|| segs.max_bytes.saturating_sub(segs.bytes)),
            )
        };
        drop(stale);
        let budget = budget?;
        let mut making = Making {
            segments: &self.segments,
            armed: true,
        };
        let made = Segment::make(self, ids, has_children, now, budget);
        let mut segs = self.segments.lock();
        // Cleared under the lock the segment is added under: no other is begun meanwhile.
        segs.making = false;
        making.armed = false;
        let Some(mut s) = made.filter(|s| segs.bytes + s.size() <= segs.max_bytes) else {
            segs.asked.insert(entity_type.to_owned(), (now, true));
            return None;
        };
        // A change while it was made (the version is raised before a change is written):
        // it may hold that twin as it was before.
        if versions.load(Ordering::SeqCst) != now.0 {
            return None;
        }
        s.bucket = bucket(entity_type);
        let s = Arc::new(s);
        segs.bytes += s.size();
        let old = segs.by_type.insert(entity_type.to_owned(), s.clone());
        if let Some(old) = &old {
            segs.bytes -= old.size();
        }
        self.segment_count
            .store(segs.by_type.len(), Ordering::Relaxed);
        drop(segs);
        drop(old);
        Some(s)
    }

    /// What the segments may hold together, in bytes (0: none); the segments held now are
    /// dropped (a smaller budget might not hold them).
    pub(crate) fn set_segment_budget(&self, bytes: usize) {
        let mut segs = self.segments.lock();
        segs.max_bytes = bytes;
        segs.bytes = 0;
        segs.asked.clear();
        let held = std::mem::take(&mut segs.by_type);
        self.segment_count.store(0, Ordering::Relaxed);
        drop(segs);
        drop(held);
    }

    /// Bytes the segments hold (for tests).
    #[cfg(test)]
    pub(crate) fn segment_bytes(&self) -> usize {
        self.segments.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn machines(m: &TwinMap, n: usize) -> BTreeSet<TwinId> {
        (0..n)
            .map(|i| {
                let mut t = crate::registry::twins::tests::twin();
                t.properties = json!({"i": i}).as_object().unwrap().clone();
                m.insert(&t);
                t.id
            })
            .collect()
    }

    #[test]
    fn a_segment_is_made_on_the_second_quiet_big_query_and_used_until_a_change() {
        let m = TwinMap::new();
        let ids = machines(&m, MIN_TWINS);
        let none = |_: &TwinId| false;
        // Small queries never make one; the first big one only notes the version.
        assert!(m.segment("machine", &ids, &none, 0, false).is_none());
        assert!(m.segment("machine", &ids, &none, 0, true).is_none());
        let s = m
            .segment("machine", &ids, &none, 0, true)
            .expect("made on the second");
        assert_eq!(s.len(), ids.len());
        assert!(ids.iter().enumerate().all(|(i, id)| s.id(i) == id));
        for (i, id) in ids.iter().enumerate().step_by(97) {
            let (bytes, props) = s.twin(i);
            assert_eq!(
                m.with_blob(id, |b| (b.to_vec(), b.props_at())),
                Some((bytes.to_vec(), props))
            );
        }
        assert_eq!(m.segment_bytes(), s.size());
        // Small queries use it too.
        assert!(m
            .segment("machine", &ids, &none, 0, false)
            .is_some_and(|x| Arc::ptr_eq(&x, &s)));
        // A change of a twin of a type that does not share the machines' version leaves it
        // current.
        let other = ["building", "site", "pump"]
            .into_iter()
            .find(|t| bucket(t) != bucket("machine"))
            .unwrap();
        let mut b = crate::registry::twins::tests::twin();
        b.entity_type = other.into();
        m.insert(&b);
        assert!(m
            .segment("machine", &ids, &none, 0, true)
            .is_some_and(|x| Arc::ptr_eq(&x, &s)));
        // A change of any twin: no longer used; the next big query drops it, the one after
        // makes a new one that holds the change.
        let first = *ids.first().unwrap();
        let mut t = m.get(&first).unwrap();
        t.properties.insert("i".into(), json!(-1));
        m.insert(&t);
        assert!(m.segment("machine", &ids, &none, 0, false).is_none());
        assert!(m.segment("machine", &ids, &none, 0, true).is_none());
        assert_eq!(m.segment_bytes(), 0);
        let s = m
            .segment("machine", &ids, &none, 0, true)
            .expect("made again");
        assert_eq!(s.twin(0).0, &m.with(&first, |b| b.to_vec()).unwrap()[..]);
        // A type too small gets none.
        let few: BTreeSet<TwinId> = ids.iter().take(MIN_TWINS - 1).copied().collect();
        assert!(m.segment("building", &few, &none, 0, true).is_none());
        assert!(m.segment("building", &few, &none, 0, true).is_none());
    }

    #[test]
    fn a_type_that_does_not_fit_is_not_tried_again_until_it_changes() {
        let m = TwinMap::new();
        let ids = machines(&m, MIN_TWINS);
        let none = |_: &TwinId| false;
        m.segments.lock().max_bytes = 1_000;
        let begun = || m.segments.lock().begun;
        assert!(m.segment("machine", &ids, &none, 0, true).is_none());
        assert_eq!(begun(), 0, "the first big query only notes the versions");
        assert!(m.segment("machine", &ids, &none, 0, true).is_none());
        assert_eq!(begun(), 1, "the second tries");
        assert!(m.segment("machine", &ids, &none, 0, true).is_none());
        assert_eq!(begun(), 1, "not again at the same versions");
        // Room again, but the same versions: still not tried.
        m.segments.lock().max_bytes = MAX_BYTES;
        assert!(m.segment("machine", &ids, &none, 0, true).is_none());
        assert_eq!(begun(), 1);
        // New versions (a twin added: the indexes' version): asked, then made.
        assert!(m.segment("machine", &ids, &none, 1, true).is_none());
        assert!(m.segment("machine", &ids, &none, 1, true).is_some());
        assert_eq!(begun(), 2);
        // Stale (the indexes changed again): dropped by any type's big query.
        assert!(m
            .segment("pump", &BTreeSet::new(), &none, 2, true)
            .is_none());
        assert_eq!(
            (m.segment_bytes(), m.segment_count.load(Ordering::Relaxed)),
            (0, 0)
        );
        // No budget (`serve --segment-mb 0`): none is tried.
        m.set_segment_budget(0);
        for _ in 0..3 {
            assert!(m.segment("machine", &ids, &none, 2, true).is_none());
        }
        assert_eq!(begun(), 2);
    }

    #[test]
    fn a_segment_over_the_budget_is_not_made() {
        let m = TwinMap::new();
        let ids = machines(&m, 100);
        let v = 0;
        let tenth = *ids.iter().nth(10).unwrap();
        let parent = |id: &TwinId| *id == tenth;
        assert!(Segment::make(&m, &ids, &parent, (v, 0), 1_000).is_none());
        let s = Segment::make(&m, &ids, &parent, (v, 0), 1 << 20).expect("fits");
        assert!((0..100).all(|i| s.has_children(i) == (i == 10)));
        assert_eq!(
            (s.len(), s.position(Bound::Excluded(*ids.last().unwrap()))),
            (100, 100)
        );
        assert_eq!(s.position(Bound::Excluded(tenth)), 11);
        assert_eq!(s.position(Bound::Included(tenth)), 10);
    }
}
