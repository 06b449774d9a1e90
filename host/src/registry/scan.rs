//! A query's scan of candidate twins: ids read in id order, in windows sized to what the page
//! still needs at the match rate seen so far; a big window of a big page (a full-result
//! query over thousands of twins) is split in pieces matched on the cores at once, and the
//! pieces' results joined as if one scan had read them in order.
//!
//! Owns: the paging rules of a scan — at most `limit` items, at most `budget` twins examined,
//! and where the next page resumes ([`Stop`]). Exposes: [`Scan`] and [`Part`].
//! Must never: return a page that differs from reading the ids one by one (the unit tests
//! compare the two), or split a window when the page is likely full before its middle
//! (small pages stay on one core).

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::OnceLock;

use super::query::Page;
use super::twins::{Blob, TwinMap};
use crate::types::TwinId;

/// The smallest window of ids. The first holds the items the page needs (as if every id
/// matched) and one eighth more; later ones the ids it still needs at the match rate seen so
/// far, and one eighth more; while nothing has matched they double.
const FIRST_WINDOW: usize = 256;
/// The largest window (a split one's ids are copied out of the index: 16 bytes each).
const MAX_WINDOW: usize = 32_768;
/// A window of at least this many ids, for a page still missing at least half as many
/// items, is matched in [`PIECES`] pieces at once (each then takes tens of µs, against a
/// few for handing it to another core).
pub(super) const SPLIT_FROM: usize = 4_096;
/// How many pieces a window to split is matched in: more than the cores, so that a core
/// woken late still takes a share (in two halves, one core often did both).
const PIECES: usize = 8;

/// Why a scan stopped before its candidates ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// The page is full and another match follows its last item.
    Full,
    /// The budget ran out at this id, which was not examined.
    Budget(TwinId),
}

/// What scanning a run of ids found.
#[derive(Debug)]
pub(super) struct Part {
    /// The matches (the page without its cursor).
    pub(super) items: Page,
    /// Ids examined (found or not, matching or not).
    pub(super) examined: usize,
    pub(super) stop: Option<Stop>,
}

/// The children a twin's JSON lists (from the hierarchy index).
pub(super) type Children<'a> = dyn Fn(&TwinId) -> BTreeSet<TwinId> + Sync + 'a;

impl Part {
    pub(super) fn new(capacity: usize) -> Part {
        Part {
            items: Page::with_capacity(capacity),
            examined: 0,
            stop: None,
        }
    }

    /// Examine `id` (`matched`: its bytes when it matches the query) as the next candidate of
    /// a page of `limit` items and `budget` examined twins; breaks when the part stops.
    pub(super) fn visit(
        &mut self,
        id: &TwinId,
        matched: Option<&[u8]>,
        limit: usize,
        budget: usize,
        children: &Children<'_>,
    ) -> ControlFlow<()> {
        if self.examined == budget {
            self.stop = Some(Stop::Budget(*id));
            return ControlFlow::Break(());
        }
        self.examined += 1;
        let Some(b) = matched else {
            return ControlFlow::Continue(());
        };
        if self.items.len() == limit {
            self.stop = Some(Stop::Full);
            return ControlFlow::Break(());
        }
        self.items.push(*id, b, children(id));
        ControlFlow::Continue(())
    }

    /// This part followed by `next`, the part of the ids right after this one's, scanned
    /// with this part's budget left: the two as one scan with `limit` items would have found
    /// them. (`next` may hold up to `limit` items: its own limit did not know this part's.)
    fn then(mut self, next: Part, limit: usize) -> Part {
        if self.stop.is_some() {
            return self;
        }
        self.examined += next.examined;
        self.items.append(next.items);
        if self.items.len() > limit {
            self.items.truncate(limit);
            self.stop = Some(Stop::Full);
        } else {
            self.stop = next.stop;
        }
        self
    }
}

/// One query's scan: how twins are matched and listed, and the page's bounds.
pub(super) struct Scan<'a> {
    pub(super) twins: &'a TwinMap,
    pub(super) matches: &'a (dyn Fn(&Blob) -> bool + Sync),
    pub(super) children: &'a Children<'a>,
    pub(super) limit: usize,
    pub(super) budget: usize,
    /// Windows of at least this many ids are split in pieces matched on the pool's cores
    /// (`usize::MAX`: never).
    pub(super) split_from: usize,
}

impl Scan<'_> {
    /// Scan `ids` (in id order) until the page is full, the budget runs out or the ids do.
    pub(super) fn run<'i>(&self, ids: impl Iterator<Item = &'i TwinId>) -> Part {
        let mut ids = ids.peekable();
        let mut acc = Part::new(0);
        let mut size = FIRST_WINDOW;
        while acc.stop.is_none() && ids.peek().is_some() {
            let need = self.limit - acc.items.len();
            let budget = self.budget - acc.examined;
            // Sized to fill the page, not more: a split window's last pieces are then needed
            // (a dense match would otherwise fill the page in the first ones and waste the
            // others). One id past the budget, so that a scan stopped by it says where.
            let expected = match acc.items.len() {
                0 => size.max(need),
                found => need.saturating_mul(acc.examined) / found,
            };
            let take = (expected + expected / 8)
                .clamp(FIRST_WINDOW, MAX_WINDOW)
                .min(budget + 1);
            // Only a window to split is copied out; a smaller one is read as it comes. A page
            // still missing few items stays on one core: a rare match's scan measured slower
            // split (the halves gain little here, and the ids are copied out for them).
            let split = take >= self.split_from
                && need >= self.split_from / 2
                && rayon::current_num_threads() > 1;
            let part = if split {
                // Each piece is scanned as if the ones before it examined every id (the
                // join ignores what follows a piece that stopped). This thread copies the
                // pieces' ids out of the index (a walk of its nodes, a fifth of the time of
                // matching them) while the pool matches the pieces already copied.
                let piece = take.div_ceil(PIECES);
                let slots: Vec<OnceLock<Part>> = (0..PIECES).map(|_| OnceLock::new()).collect();
                rayon::in_place_scope(|s| {
                    for (i, slot) in slots.iter().enumerate() {
                        let n = piece.min(take - (i * piece).min(take));
                        let ids: Vec<TwinId> = ids.by_ref().take(n).copied().collect();
                        if ids.is_empty() {
                            break;
                        }
                        let budget = budget.saturating_sub(i * piece);
                        s.spawn(move |_| {
                            let part = self.part(ids.iter(), need, budget, need.min(ids.len()));
                            let _ = slot.set(part);
                        });
                    }
                });
                let mut parts = slots.into_iter().map_while(OnceLock::into_inner);
                let mut first = parts.next().unwrap_or_else(|| Part::new(0));
                let parts: Vec<Part> = parts.collect();
                first
                    .items
                    .reserve(parts.iter().map(|p| p.items.len()).sum());
                parts.into_iter().fold(first, |a, b| a.then(b, need))
            } else {
                self.part(ids.by_ref().take(take), need, budget, need.min(take))
            };
            acc = acc.then(part, self.limit);
            size = take.saturating_mul(2);
        }
        acc
    }

    /// Scan `ids` as a page of `limit` items and `budget` examined twins, with room for
    /// `capacity` items.
    fn part<'i>(
        &self,
        ids: impl Iterator<Item = &'i TwinId>,
        limit: usize,
        budget: usize,
        capacity: usize,
    ) -> Part {
        let mut part = Part::new(capacity);
        self.twins.with_each(ids, |id, blob| {
            let matched = blob.filter(|b| (self.matches)(b));
            part.visit(id, matched.map(|b| &b[..]), limit, budget, self.children)
        });
        part
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `n` twins with property `i` = 0..n, and every id (every `missing_every`th missing
    /// from the map).
    fn twins(n: usize, missing_every: usize) -> (TwinMap, Vec<TwinId>) {
        let m = TwinMap::new();
        let ids = (0..n)
            .map(|i| {
                let mut t = crate::registry::twins::tests::twin();
                t.properties = json!({"i": i}).as_object().unwrap().clone();
                if i % missing_every != missing_every - 1 {
                    m.insert(&t);
                }
                t.id
            })
            .collect();
        (m, ids)
    }

    /// The page as reading the ids one by one gives it: item ids and the stop.
    fn one_by_one(
        m: &TwinMap,
        ids: &[TwinId],
        matches: &dyn Fn(&Blob) -> bool,
        limit: usize,
        budget: usize,
    ) -> (Vec<TwinId>, Option<Stop>) {
        let (mut items, mut examined) = (Vec::new(), 0);
        for id in ids {
            if examined == budget {
                return (items, Some(Stop::Budget(*id)));
            }
            examined += 1;
            if m.with_blob(id, matches) == Some(true) {
                if items.len() == limit {
                    return (items, Some(Stop::Full));
                }
                items.push(*id);
            }
        }
        (items, None)
    }

    #[test]
    fn a_scan_in_windows_and_split_halves_pages_exactly_as_one_by_one() {
        let n = 3_000;
        let (m, ids) = twins(n, 7);
        let every = |k: u64| {
            move |b: &Blob| {
                b.props()
                    .and_then(|p| p.get("i"))
                    .and_then(|v| v.as_u64())
                    .is_some_and(|i| i % k == 0)
            }
        };
        let no_children = |_: &TwinId| BTreeSet::new();
        // Two threads whatever the machine has, so that the windows do split.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut compared = 0;
        for k in [1, 3, 50, 2_000, 10_000] {
            let matches = every(k);
            for limit in [1, 2, 10, 100, 999, 1_000, 2_571, 10_000] {
                for budget in [0, 1, 5, 300, 1_500, 2_999, 3_000, 100_000] {
                    let want = one_by_one(&m, &ids, &matches, limit, budget);
                    // Split from 64 ids: every window of a page still missing 32 items or more splits.
                    for split_from in [usize::MAX, 64, 300] {
                        let scan = Scan {
                            twins: &m,
                            matches: &matches,
                            children: &no_children,
                            limit,
                            budget,
                            split_from,
                        };
                        let got = pool.install(|| scan.run(ids.iter()));
                        let got_ids: Vec<TwinId> = got.items.iter().map(|t| t.id).collect();
                        // Each item's bytes are its twin's.
                        for t in got.items.iter() {
                            assert_eq!(
                                Some(t.twin()),
                                m.get(&t.id).map(|mut x| {
                                    x.children_ids = Default::default();
                                    x
                                })
                            );
                        }
                        assert_eq!(
                            (got_ids, got.stop),
                            want,
                            "every {k}, limit {limit}, budget {budget}, split from {split_from}"
                        );
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, 5 * 8 * 8 * 3);
    }

    #[test]
    fn a_part_after_a_stopped_one_adds_nothing() {
        let (m, ids) = twins(10, usize::MAX);
        let all = |_: &Blob| true;
        let no_children = |_: &TwinId| BTreeSet::new();
        let scan = Scan {
            twins: &m,
            matches: &all,
            children: &no_children,
            limit: 3,
            budget: 100,
            split_from: usize::MAX,
        };
        let first = scan.part(ids[..5].iter(), 3, 100, 3);
        assert_eq!((first.items.len(), first.stop), (3, Some(Stop::Full)));
        let joined = first.then(scan.part(ids[5..].iter(), 3, 95, 3), 3);
        assert_eq!(joined.items.len(), 3);
        assert_eq!(joined.items.get(2).map(|t| t.id), Some(ids[2]));
    }
}
