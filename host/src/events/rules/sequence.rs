//! Sequence rules: "A then B within T", in either arrival order.
//!
//! Owns: the pending partial matches — "first"s waiting for their "then", and "then"s that
//! arrived before the "first" that happened earlier — each side keyed so that a match finds
//! its partner (by twin, by parent, or by relationship target).
//! Exposes: [`Sequence`] (built by `spec::compile`) with `eval` and `forget`.
//! Must never: hold more than `max_pending` partial matches on a side (the count is exact:
//! expired and matched entries leave it), or keep an entry older than `within` behind the
//! newest event time.

use std::collections::{BTreeSet, VecDeque};

use serde_json::json;

use super::spec::{GroupBy, SequenceRule};
use super::{ts_of, Ctx, Firing, Map, RuleStats, MAX_PENDING, MAX_RELATED};
use crate::types::TwinId;

/// A compiled sequence rule and its state.
pub(super) struct Sequence {
    /// The rule as written.
    pub(super) spec: SequenceRule,
    /// `within` (µs).
    within_us: i64,
    /// Most partial matches each side holds ([`MAX_PENDING`]; a test sets a small one).
    max_pending: usize,
    /// "first"s waiting for a "then".
    firsts: Side,
    /// "then"s waiting for a "first" that happened earlier but has not arrived yet.
    seconds: Side,
    /// Newest event time seen (µs): entries older than it minus `within` expire.
    newest: i64,
}

/// One side's pending matches.
#[derive(Default)]
struct Side {
    /// Key → entries in arrival order (a match takes the oldest that fits).
    queues: Map<TwinId, VecDeque<Pending>>,
    /// Every entry by event time, to expire them in time order across keys; its length is
    /// the side's exact count.
    by_time: BTreeSet<(i64, u64, TwinId)>,
}

/// A partial match: the event that satisfied one half.
#[derive(Clone, Copy)]
struct Pending {
    /// Event time (µs).
    ts: i64,
    /// The twin it happened on (named in the firing).
    twin: TwinId,
    /// Its sequence number: names it in the firing and in `Side::by_time`.
    seq: u64,
}

impl Side {
    fn len(&self) -> usize {
        self.by_time.len()
    }

    /// Drop every entry older than `horizon`.
    fn expire(&mut self, horizon: i64) {
        while let Some(&(ts, seq, key)) = self.by_time.first() {
            if ts >= horizon {
                break;
            }
            self.by_time.pop_first();
            self.unqueue(key, seq);
        }
    }

    /// Take the oldest entry under `key` that `fits`.
    fn take(&mut self, key: TwinId, fits: impl Fn(&Pending) -> bool) -> Option<Pending> {
        let q = self.queues.get_mut(&key)?;
        let p = q.remove(q.iter().position(fits)?)?;
        if q.is_empty() {
            self.queues.remove(&key);
        }
        self.by_time.remove(&(p.ts, p.seq, key));
        Some(p)
    }

    /// Add an entry; at the bound, the oldest of the same key makes room, or (none) the new
    /// one is turned away. Either way it counts as overflow.
    fn push(&mut self, key: TwinId, p: Pending, max: usize, stats: &mut RuleStats) {
        if self.len() >= max {
            stats.overflow += 1;
            let Some(old) = self.queues.get_mut(&key).and_then(VecDeque::pop_front) else {
                return;
            };
            self.by_time.remove(&(old.ts, old.seq, key));
        }
        self.queues.entry(key).or_default().push_back(p);
        self.by_time.insert((p.ts, p.seq, key));
    }

    /// Remove the entry of event `seq` from `key`'s queue (it is gone from `by_time`).
    fn unqueue(&mut self, key: TwinId, seq: u64) {
        let Some(q) = self.queues.get_mut(&key) else {
            return;
        };
        if let Some(i) = q.iter().position(|p| p.seq == seq) {
            q.remove(i);
        }
        if q.is_empty() {
            self.queues.remove(&key);
        }
    }

    /// Drop everything pending under `key`.
    fn forget(&mut self, key: TwinId) {
        for p in self.queues.remove(&key).unwrap_or_default() {
            self.by_time.remove(&(p.ts, p.seq, key));
        }
    }
}

impl Sequence {
    pub(super) fn new(spec: SequenceRule, within_us: i64) -> Sequence {
        Sequence {
            spec,
            within_us,
            max_pending: MAX_PENDING,
            firsts: Side::default(),
            seconds: Side::default(),
            newest: i64::MIN,
        }
    }

    pub(super) fn eval(&mut self, cx: &Ctx, stats: &mut RuleStats, out: &mut Vec<Firing>) {
        // Pending matches are keyed so that a "then" finds its "first": by the twin, by the
        // parent, or (relationship) under each target of the first twin's relationship,
        // which is the twin the "then" happens on.
        let own_key = match self.spec.correlate {
            GroupBy::Twin | GroupBy::Relationship => cx.twin,
            GroupBy::Parent => match cx.e.parent_id {
                Some(p) => p,
                None => return,
            },
        };
        self.newest = self.newest.max(cx.ts);
        let horizon = self.newest.saturating_sub(self.within_us);
        self.firsts.expire(horizon);
        self.seconds.expire(horizon);
        let is_first = self.spec.first.eval(&cx.e.changed) == Some(true);
        let is_then = self.spec.then.eval(&cx.e.changed) == Some(true);
        let me = Pending {
            ts: cx.ts,
            twin: cx.twin,
            seq: cx.e.seq,
        };
        if is_then && self.match_then(cx, own_key, stats, out) {
            return;
        }
        if is_first {
            let keys = self.keys_of_first(cx, own_key);
            if self.match_first(cx, &keys, stats, out) {
                return;
            }
            for key in keys {
                self.firsts.push(key, me, self.max_pending, stats);
            }
        } else if is_then {
            self.seconds.push(own_key, me, self.max_pending, stats);
        }
    }

    /// Where a "first" waits: under its own key, or under each target of its relationship.
    fn keys_of_first(&self, cx: &Ctx, own_key: TwinId) -> Vec<TwinId> {
        match (self.spec.correlate, &self.spec.relationship) {
            (GroupBy::Relationship, Some(name)) => {
                let mut k = (cx.related)(cx.twin, name);
                k.truncate(MAX_RELATED);
                k
            }
            _ => vec![own_key],
        }
    }

    /// A "then": match the oldest earlier "first" within the span.
    fn match_then(
        &mut self,
        cx: &Ctx,
        key: TwinId,
        stats: &mut RuleStats,
        out: &mut Vec<Firing>,
    ) -> bool {
        let (ts, within) = (cx.ts, self.within_us);
        let Some(first) = self.firsts.take(key, |p| p.ts <= ts && ts - p.ts <= within) else {
            return false;
        };
        stats.fired += 1;
        let r = &self.spec;
        out.push(cx.firing(json!({
            "first": {"twin_id": first.twin, "ts": ts_of(first.ts), "seq": first.seq},
            "then": {"twin_id": cx.twin, "ts": cx.e.ts, "seq": cx.e.seq},
            "within": r.within, "correlate": r.correlate,
        })));
        true
    }

    /// A "first" arriving late: match a "then" that arrived earlier but happened after it.
    fn match_first(
        &mut self,
        cx: &Ctx,
        keys: &[TwinId],
        stats: &mut RuleStats,
        out: &mut Vec<Firing>,
    ) -> bool {
        let (ts, within) = (cx.ts, self.within_us);
        let found = keys.iter().find_map(|&key| {
            self.seconds
                .take(key, |p| p.ts >= ts && p.ts - ts <= within)
        });
        let Some(then) = found else {
            return false;
        };
        stats.fired += 1;
        let r = &self.spec;
        out.push(Firing {
            twin_id: then.twin,
            ts: ts_of(then.ts),
            ..cx.firing(json!({
                "first": {"twin_id": cx.twin, "ts": cx.e.ts, "seq": cx.e.seq},
                "then": {"twin_id": then.twin, "ts": ts_of(then.ts), "seq": then.seq},
                "within": r.within, "correlate": r.correlate,
            }))
        });
        true
    }

    /// `twin` was deleted: drop what waits under it as a key (its own partial matches, or
    /// those of its children when it is a parent, or those aimed at it as a relationship
    /// target). Its entries under other keys expire with `within`.
    pub(super) fn forget(&mut self, twin: TwinId) {
        self.firsts.forget(twin);
        self.seconds.forget(twin);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::testing::*;
    use super::super::{validate, Kind, RuleSpec, MAX_PENDING};
    use crate::types::TwinId;
    use serde_json::json;

    #[test]
    fn sequence_matches_in_order_and_out_of_order_within_the_span() {
        let mut set = rules(
            "hot-then-shake",
            json!({"kind": "sequence", "first": {"property": "temperature", "op": ">", "value": 85},
                   "then": {"property": "vibration", "op": ">", "value": 5}, "within": "10s",
                   "actions": [{"type": "alert"}]}),
        );
        let out = feed(
            &mut set,
            &[
                ev(1, 1, None, 0.0, "temperature", 90.0),
                ev(2, 1, None, 4.0, "vibration", 7.0), // fires (1 then 2)
                ev(3, 1, None, 5.0, "vibration", 7.0), // no pending first
                ev(4, 2, None, 10.0, "temperature", 90.0),
                ev(5, 2, None, 21.0, "vibration", 9.0), // 11 s later: too late
                ev(6, 3, None, 30.0, "vibration", 9.0), // arrives first …
                ev(7, 3, None, 28.0, "temperature", 99.0), // … but happened 2 s later: fires
                ev(8, 4, None, 40.0, "temperature", 99.0),
                ev(9, 5, None, 41.0, "vibration", 99.0), // another twin: not correlated
            ],
        );
        let pairs = seq_pairs(&out);
        assert_eq!(pairs, [(1, 2), (7, 6)]);
    }

    #[test]
    fn sequence_correlates_twins_by_parent() {
        let mut set = rules(
            "door-then-motion",
            json!({"kind": "sequence", "correlate": "parent",
                   "first": {"property": "door_open", "op": "==", "value": 1},
                   "then": {"property": "motion", "op": ">", "value": 0}, "within": "30s",
                   "actions": [{"type": "alert"}]}),
        );
        let out = feed(
            &mut set,
            &[
                ev(1, 1, Some(100), 0.0, "door_open", 1.0),
                ev(2, 2, Some(200), 1.0, "motion", 1.0), // other room
                ev(3, 3, Some(100), 2.0, "motion", 1.0), // same room, other twin: fires
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].details["first"]["twin_id"], json!(id(1)));
        assert_eq!(out[0].details["then"]["twin_id"], json!(id(3)));
    }

    #[test]
    fn sequence_correlates_along_a_relationship() {
        // Pump 1 feeds tank 10; pump 2 feeds tank 20.
        let mut set = rules(
            "pump-then-tank",
            json!({"kind": "sequence", "correlate": "relationship", "relationship": "feeds",
                   "first": {"property": "pressure", "op": ">", "value": 8},
                   "then": {"property": "level", "op": ">", "value": 90}, "within": "1m",
                   "actions": [{"type": "alert"}]}),
        );
        set.set_related(Arc::new(|src: TwinId, name: &str| {
            assert_eq!(name, "feeds");
            match src {
                s if s == id(1) => vec![id(10)],
                s if s == id(2) => vec![id(20)],
                _ => vec![],
            }
        }));
        let out = feed(
            &mut set,
            &[
                ev(1, 1, None, 0.0, "pressure", 9.0),
                ev(2, 20, None, 1.0, "level", 95.0), // tank 20 is not fed by pump 1
                ev(3, 10, None, 2.0, "level", 95.0), // fires
                ev(4, 20, None, 10.0, "level", 99.0), // arrives before …
                ev(5, 2, None, 5.0, "pressure", 9.5), // … the pump event that preceded it: fires
            ],
        );
        let pairs = seq_pairs(&out);
        assert_eq!(pairs, [(1, 3), (5, 4)]);
        let bad: RuleSpec = serde_json::from_value(json!({"kind": "sequence", "correlate": "relationship",
            "first": {"property": "a", "op": ">", "value": 1}, "then": {"property": "b", "op": ">", "value": 1},
            "within": "1m", "actions": [{"type": "alert"}]})).unwrap();
        assert!(validate(&bad, &|_| None).unwrap_err()[0].contains("relationship"));
    }

    #[test]
    fn sequence_keeps_firing_after_many_partial_matches_expired() {
        // Every "first" expires unmatched (its "then" comes too late) and so does every
        // "then"; the rule must still match a fresh pair afterwards.
        let mut set = rules(
            "a-then-b",
            json!({"kind": "sequence", "first": {"property": "a", "op": ">", "value": 0},
                   "then": {"property": "b", "op": ">", "value": 0}, "within": "1s",
                   "actions": [{"type": "alert"}]}),
        );
        let mut out = Vec::new();
        let rounds = MAX_PENDING as u64 / 2 + 1;
        for i in 0..rounds {
            let t = 2.0 * i as f64;
            set.on_event(&ev(2 * i + 1, 1, None, t, "a", 1.0), &mut out);
            set.on_event(&ev(2 * i + 2, 1, None, t + 1.5, "b", 1.0), &mut out);
        }
        assert!(out.is_empty(), "no pair was within 1 s");
        let t = 2.0 * rounds as f64 + 10.0;
        let seq = 2 * rounds + 1;
        let out = feed(
            &mut set,
            &[
                ev(seq, 1, None, t, "a", 1.0),
                ev(seq + 1, 1, None, t + 0.5, "b", 1.0),
            ],
        );
        assert_eq!(seq_pairs(&out), [(seq, seq + 1)]);
        assert_eq!(set.stats("a-then-b").unwrap().overflow, 0);
    }

    #[test]
    fn the_pending_bound_is_per_side() {
        let mut set = rules(
            "a-then-b",
            json!({"kind": "sequence", "first": {"property": "a", "op": ">", "value": 0},
                   "then": {"property": "b", "op": ">", "value": 0}, "within": "1h",
                   "actions": [{"type": "alert"}]}),
        );
        for r in set.rules.iter_mut() {
            if let Kind::Sequence(s) = &mut r.kind {
                s.max_pending = 3;
            }
        }
        // Three "first"s on three twins fill the "first" side …
        let mut events: Vec<_> = (1..=3)
            .map(|i| ev(i, i as u128, None, 0.0, "a", 1.0))
            .collect();
        // … and a fourth twin's is turned away (no older entry of its own to evict).
        events.push(ev(4, 4, None, 0.0, "a", 1.0));
        // "then"s that arrive first still have room on their own side.
        events.push(ev(5, 5, None, 2.0, "b", 1.0));
        events.push(ev(6, 5, None, 1.0, "a", 1.0)); // matches the waiting "then": fires
        events.push(ev(7, 1, None, 3.0, "b", 1.0)); // matches twin 1's "first": fires
        let out = feed(&mut set, &events);
        assert_eq!(seq_pairs(&out), [(6, 5), (1, 7)]);
        assert_eq!(set.stats("a-then-b").unwrap().overflow, 1);
    }
}
