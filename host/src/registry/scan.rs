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
use std::ops::{Bound, ControlFlow};
use std::sync::{Arc, OnceLock};

use super::query::{Found, Page};
use super::segment::Segment;
use super::twins::TwinMap;
use crate::types::TwinId;

/// The smallest window of ids. The first holds the items the page needs (as if every id
/// matched) and one eighth more; later ones the ids it still needs at the match rate seen so
/// far, and one eighth more; while nothing has matched they double.
const FIRST_WINDOW: usize = 256;
/// The largest window (a split one is walked twice: once to find where its pieces end).
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

    /// Examine `id` (`matched`: the twin when it matches the query) as the next candidate of
    /// a page of `limit` items and `budget` examined twins; breaks when the part stops.
    pub(super) fn visit(
        &mut self,
        id: &TwinId,
        matched: Option<Found<'_>>,
        limit: usize,
        budget: usize,
        children: impl FnOnce(&TwinId) -> BTreeSet<TwinId>,
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

/// Match a window in up to [`PIECES`] pieces on the pool: `piece(i)` hands out the `i`th
/// (`None`: no more) while the pool matches those before it; their parts are joined in order
/// as one part of `limit` items.
fn in_pieces<P>(limit: usize, mut piece: impl FnMut(usize) -> Option<P>) -> Part
where
    P: FnOnce() -> Part + Send,
{
    let slots: Vec<OnceLock<Part>> = (0..PIECES).map(|_| OnceLock::new()).collect();
    rayon::in_place_scope(|s| {
        for (i, slot) in slots.iter().enumerate() {
            let Some(p) = piece(i) else { break };
            s.spawn(move |_| {
                let _ = slot.set(p());
            });
        }
    });
    let mut parts = slots.into_iter().map_while(OnceLock::into_inner);
    let first = parts.next().unwrap_or_else(|| Part::new(0));
    parts.fold(first, |a, b| a.then(b, limit))
}

/// One query's scan: how twins are matched and listed, and the page's bounds.
pub(super) struct Scan<'a> {
    pub(super) twins: &'a TwinMap,
    /// Whether a twin's compact bytes, whose properties begin at the offset given (0: not
    /// known), match the query.
    pub(super) matches: &'a (dyn Fn(&[u8], u16) -> bool + Sync),
    pub(super) children: &'a Children<'a>,
    pub(super) limit: usize,
    pub(super) budget: usize,
    /// Windows of at least this many ids are split in pieces matched on the pool's cores
    /// (`usize::MAX`: never).
    pub(super) split_from: usize,
}

impl Scan<'_> {
    /// Scan the ids of `source` after `lower` (in id order) until the page is full, the
    /// budget runs out or the ids do.
    pub(super) fn run(&self, source: &BTreeSet<TwinId>, lower: Bound<TwinId>) -> Part {
        let mut pos = lower;
        let mut acc = Part::new(0);
        let mut size = FIRST_WINDOW;
        while acc.stop.is_none() {
            let mut ids = source.range((pos, Bound::Unbounded)).peekable();
            if ids.peek().is_none() {
                break;
            }
            let (need, budget, take) = self.window(&acc, size);
            let split = self.splits(take, need);
            let part = if split {
                // Each piece is scanned as if the ones before it examined every id (the
                // join ignores what follows a piece that stopped). This thread walks the
                // index to where each piece ends (a walk of its nodes, nothing copied: a
                // copy of the ids cost a fifth of matching them) and hands the piece, a
                // range of the index, to the pool while the pool matches those before it.
                let piece = take.div_ceil(PIECES);
                in_pieces(need, |i| {
                    let n = piece.min(take - (i * piece).min(take));
                    let last = ids.by_ref().take(n).last().copied()?;
                    let range = source.range((pos, Bound::Included(last)));
                    pos = Bound::Excluded(last);
                    let budget = budget.saturating_sub(i * piece);
                    Some(move || self.part(range, need, budget, need.min(n)))
                })
            } else {
                let mut last = None;
                let part = self.part(
                    ids.take(take).inspect(|id| last = Some(**id)),
                    need,
                    budget,
                    need.min(take),
                );
                match last {
                    Some(id) => pos = Bound::Excluded(id),
                    None => break,
                }
                part
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
            let matched = blob.filter(|b| (self.matches)(b, b.props_at()));
            let found = matched.map(|b| Found::Bytes(b));
            part.visit(id, found, limit, budget, self.children)
        });
        part
    }

    /// Scan the twins of segment `seg` from position `from` until the page is full, the
    /// budget runs out or the twins do: [`Scan::run`] on the segment's ids, with windows and
    /// pieces found by position (the page refers to the twins instead of copying them).
    pub(super) fn run_segment(&self, seg: &Arc<Segment>, from: usize) -> Part {
        let mut pos = from;
        let mut acc = Part::new(0);
        let mut size = FIRST_WINDOW;
        while acc.stop.is_none() && pos < seg.len() {
            let (need, budget, take) = self.window(&acc, size);
            let take = take.min(seg.len() - pos);
            let part = if self.splits(take, need) {
                let piece = take.div_ceil(PIECES);
                in_pieces(need, |i| {
                    let start = pos + (i * piece).min(take);
                    let end = pos + ((i + 1) * piece).min(take);
                    let budget = budget.saturating_sub(i * piece);
                    (start < end)
                        .then_some(move || self.segment_part(seg, start..end, need, budget))
                })
            } else {
                self.segment_part(seg, pos..pos + take, need, budget)
            };
            pos += take;
            acc = acc.then(part, self.limit);
            size = take.saturating_mul(2);
        }
        acc
    }

    /// Scan the segment's twins at `range` as a page of `limit` items and `budget` examined
    /// twins.
    fn segment_part(
        &self,
        seg: &Arc<Segment>,
        range: std::ops::Range<usize>,
        limit: usize,
        budget: usize,
    ) -> Part {
        let mut part = Part::new(limit.min(range.len()));
        for i in range {
            let (b, props) = seg.twin(i);
            let found = (self.matches)(b, props).then_some(Found::In(seg, i));
            // Only a twin with children has them looked up.
            let children = |id: &TwinId| match seg.has_children(i) {
                true => (self.children)(id),
                false => BTreeSet::new(),
            };
            if part
                .visit(seg.id(i), found, limit, budget, children)
                .is_break()
            {
                break;
            }
        }
        part
    }

    /// The next window of a scan that has found `acc`, after one of `size`: the items the
    /// page still needs, the budget left and how many candidates to read.
    fn window(&self, acc: &Part, size: usize) -> (usize, usize, usize) {
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
        (need, budget, take)
    }

    /// Whether a window of `take` candidates for a page still missing `need` items is
    /// matched in pieces. A page still missing few items stays on one core: a rare match's
    /// scan measured slower split (the halves gain little here).
    fn splits(&self, take: usize, need: usize) -> bool {
        take >= self.split_from && need >= self.split_from / 2 && rayon::current_num_threads() > 1
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
        matches: &dyn Fn(&[u8], u16) -> bool,
        limit: usize,
        budget: usize,
    ) -> (Vec<TwinId>, Option<Stop>) {
        let (mut items, mut examined) = (Vec::new(), 0);
        for id in ids {
            if examined == budget {
                return (items, Some(Stop::Budget(*id)));
            }
            examined += 1;
            if m.with_blob(id, |b| matches(b, b.props_at())) == Some(true) {
                if items.len() == limit {
                    return (items, Some(Stop::Full));
                }
                items.push(*id);
            }
        }
        (items, None)
    }

    /// The ids and stop of a part, after checking that each item's bytes are its twin's.
    fn got(m: &TwinMap, part: Part) -> (Vec<TwinId>, Option<Stop>) {
        for t in part.items.iter() {
            let mut want = m.get(&t.id).expect("a twin of the map");
            want.children_ids = Default::default();
            assert_eq!(t.twin(), want);
        }
        (part.items.iter().map(|t| t.id).collect(), part.stop)
    }

    /// Every paging case of a scan of the map's ids, and of a segment of its twins, against
    /// reading them one by one.
    #[test]
    fn a_scan_in_windows_and_split_halves_pages_exactly_as_one_by_one() {
        let n = 3_000;
        let (m, ids) = twins(n, 7);
        let source: BTreeSet<TwinId> = ids.iter().copied().collect();
        let ids: Vec<TwinId> = source.iter().copied().collect();
        // A segment holds the twins there are (an id the map lacks is not examined there).
        let segment = Arc::new(Segment::of(&m, &source, &|_| false));
        let present: Vec<TwinId> = ids.iter().copied().filter(|id| m.contains(id)).collect();
        assert_eq!(segment.len(), present.len());
        let every = |k: u64| {
            move |b: &[u8], at: u16| {
                crate::registry::twins::props_at(b, at)
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
                    // From the first id, and after the 1,000th (a cursor).
                    for from in [0, 1_000] {
                        let lower = match from {
                            0 => Bound::Unbounded,
                            n => Bound::Excluded(ids[n - 1]),
                        };
                        let after = |id: &&TwinId| from == 0 || **id > ids[from - 1];
                        let want = one_by_one(&m, &ids[from..], &matches, limit, budget);
                        let in_segment: Vec<TwinId> =
                            present.iter().filter(after).copied().collect();
                        let want_segment = one_by_one(&m, &in_segment, &matches, limit, budget);
                        // Split from 64 ids: every window of a page still missing 32 items
                        // or more splits.
                        for split_from in [usize::MAX, 64, 300] {
                            let scan = Scan {
                                twins: &m,
                                matches: &matches,
                                children: &no_children,
                                limit,
                                budget,
                                split_from,
                            };
                            let case = format!(
                                "every {k}, limit {limit}, budget {budget}, from {from}, split from {split_from}"
                            );
                            let part = pool.install(|| scan.run(&source, lower));
                            assert_eq!(got(&m, part), want, "{case}");
                            let at = segment.position(lower);
                            let part = pool.install(|| scan.run_segment(&segment, at));
                            assert_eq!(got(&m, part), want_segment, "segment: {case}");
                            compared += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(compared, 5 * 8 * 8 * 2 * 3);
    }

    #[test]
    fn a_part_after_a_stopped_one_adds_nothing() {
        let (m, ids) = twins(10, usize::MAX);
        let all = |_: &[u8], _: u16| true;
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
