//! The origin of a change: the node where it was made, as its event and the reactions to it
//! (behaviors, rules) see it.
//!
//! A change written here (a client's, a behavior's or a rule's; an alert; a relationship or
//! model change) has this node as its origin. A change merged from another node
//! ([`Registry::apply_remote`](super::Registry::apply_remote)) names the node that made the
//! write, worked out from the twin before and after the merge, so the same rule serves the
//! live merge and the replay of a merge from the write-ahead log after a crash
//! ([`super::replay`]), which logs the merged state and not the feed entry it came from:
//!
//! 1. the origin of the newest property clock the merge set, in the merge's own order
//!    `(hlc, origin)` — the node whose write made the newest value visible here, also when
//!    the entry was relayed by a third node (clocks keep their origin);
//! 2. otherwise (a delete, a lifecycle change, a merge of version vectors alone), the first
//!    node, by id, whose version-vector entry the merge raised — every change bumps the entry
//!    of the node that made it, so this is the node that made a change this one had not seen
//!    (exactly it when the two were in step before; the lowest id when several were missed);
//! 3. otherwise the first node of the merged version vector other than this one — a merge
//!    that raised nothing still came from elsewhere;
//! 4. this node only when nothing names another.
//!
//! Exposes: [`merged`], to the remote-apply seam and the replay.
//! Must never: name this node for a change that came from another one unless its clocks and
//! version vector say nothing else (step 4).

use std::sync::Arc;

use crate::types::{Clocks, VClock};

/// What a twin held before a merge: its property clocks and version vector.
pub(super) struct Before<'a> {
    pub clocks: &'a Clocks,
    pub vclock: &'a VClock,
}

/// The origin of a merged remote change (see the module doc): the twin `before` the merge
/// (`None` for a twin that was not here) and its clocks and version vector after it (no
/// clocks for a delete, which leaves only the tombstone's version vector).
pub(super) fn merged(
    before: Option<Before<'_>>,
    clocks: &Clocks,
    vclock: &VClock,
    local: &Arc<str>,
) -> Arc<str> {
    let newest = clocks
        .iter()
        .filter(|(name, c)| {
            before
                .as_ref()
                .is_none_or(|b| b.clocks.get(name) != Some(*c))
        })
        .map(|(_, c)| c)
        .max_by(|a, b| (a.hlc, &*a.origin).cmp(&(b.hlc, &*b.origin)));
    if let Some(c) = newest {
        return c.origin.clone();
    }
    let empty = VClock::new();
    let seen = before.as_ref().map_or(&empty, |b| b.vclock);
    let raised = vclock
        .iter()
        .find(|(node, n)| seen.get(*node).is_none_or(|m| m < n))
        .map(|(node, _)| node);
    let other = || vclock.keys().find(|node| **node != **local);
    match raised.or_else(other) {
        Some(node) if **node == **local => local.clone(),
        Some(node) => Arc::from(node.as_str()),
        None => local.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::PropClock;

    fn clock(hlc: u64, origin: &str) -> PropClock {
        PropClock {
            hlc,
            origin: Arc::from(origin),
            n: 0,
            v: 0,
        }
    }

    fn vclock(entries: &[(&str, u64)]) -> VClock {
        entries.iter().map(|(n, c)| ((*n).to_owned(), *c)).collect()
    }

    #[test]
    fn the_newest_clock_the_merge_set_names_the_origin() {
        let local: Arc<str> = Arc::from("here");
        let old = Clocks::from([("a", clock(5, "here")), ("b", clock(9, "here"))]);
        // `a` newly written on `edge` (and relayed by `relay`); `b`, newer, unchanged here.
        let new = Clocks::from([("a", clock(7, "edge")), ("b", clock(9, "here"))]);
        let before = Before {
            clocks: &old,
            vclock: &vclock(&[("here", 2)]),
        };
        let after = vclock(&[("edge", 1), ("here", 2), ("relay", 3)]);
        assert_eq!(&*merged(Some(before), &new, &after, &local), "edge");
        // Ties on the clock go by origin, as last-writer-wins orders them.
        let tie = Clocks::from([("a", clock(7, "b-node")), ("b", clock(7, "c-node"))]);
        assert_eq!(&*merged(None, &tie, &after, &local), "c-node");
    }

    #[test]
    fn without_a_new_clock_the_raised_version_vector_entry_names_it() {
        let local: Arc<str> = Arc::from("here");
        let clocks = Clocks::from([("a", clock(5, "here"))]);
        let seen = vclock(&[("edge", 1), ("here", 2)]);
        let before = || Before {
            clocks: &clocks,
            vclock: &seen,
        };
        // A delete made on `edge`: its entry rose, the clocks are gone.
        let deleted = vclock(&[("edge", 2), ("here", 2)]);
        assert_eq!(
            &*merged(Some(before()), &Clocks::new(), &deleted, &local),
            "edge"
        );
        // A local delete (its own entry bumped) is local.
        let own = vclock(&[("edge", 1), ("here", 3)]);
        assert_eq!(
            &*merged(Some(before()), &Clocks::new(), &own, &local),
            "here"
        );
        // Nothing raised: still not this node while another one is named.
        assert_eq!(&*merged(Some(before()), &clocks, &seen, &local), "edge");
        let only_here = vclock(&[("here", 2)]);
        assert_eq!(&*merged(None, &Clocks::new(), &only_here, &local), "here");
    }
}
