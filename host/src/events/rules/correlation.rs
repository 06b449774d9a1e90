//! Correlation rules: at least `min_count` twins under one parent meet a condition within a
//! window.
//!
//! Owns: per parent, the twins whose latest value meets the condition and when, and
//! whether the parent's group is currently firing.
//! Exposes: [`Correlation`] (built by `spec::compile`) with `eval` and `forget`.
//! Must never: track more than `max_groups` parents, or keep a group with no twin in it.

use std::collections::BTreeSet;

use serde_json::json;

use super::spec::CorrelationRule;
use super::{Ctx, Firing, Map, RuleStats};
use crate::types::TwinId;

/// A compiled correlation rule and its state.
pub(super) struct Correlation {
    /// The rule as written.
    pub(super) spec: CorrelationRule,
    /// `within` (µs).
    within_us: i64,
    /// Most parents tracked at once; more are turned away and counted.
    max_groups: usize,
    /// Parent → its group.
    groups: Map<TwinId, Group>,
}

/// The twins under one parent.
#[derive(Default)]
struct Group {
    /// Twins whose latest value meets the condition → newest event time it did (µs).
    holding: Map<TwinId, i64>,
    /// The group reached `min_count` and has not dropped below since (no repeat firing).
    firing: bool,
}

impl Correlation {
    pub(super) fn new(spec: CorrelationRule, within_us: i64, max_groups: usize) -> Correlation {
        Correlation {
            spec,
            within_us,
            max_groups,
            groups: Map::default(),
        }
    }

    pub(super) fn eval(&mut self, cx: &Ctx, stats: &mut RuleStats, out: &mut Vec<Firing>) {
        let Some(cond) = self.spec.condition.eval(&cx.e.changed) else {
            return;
        };
        let Some(parent) = cx.e.parent_id else {
            return;
        };
        if !self.groups.contains_key(&parent) && self.groups.len() >= self.max_groups {
            stats.overflow += 1;
            return;
        }
        let group = self.groups.entry(parent).or_default();
        if cond {
            let t = group.holding.entry(cx.twin).or_insert(cx.ts);
            *t = (*t).max(cx.ts);
        } else {
            group.holding.remove(&cx.twin);
        }
        let since = cx.ts - self.within_us;
        group.holding.retain(|_, t| *t > since);
        let n = group.holding.len();
        if n < self.spec.min_count {
            group.firing = false;
            if group.holding.is_empty() {
                self.groups.remove(&parent);
            }
            return;
        }
        if group.firing {
            return;
        }
        group.firing = true;
        let twins: BTreeSet<TwinId> = group.holding.keys().copied().collect();
        stats.fired += 1;
        let r = &self.spec;
        out.push(cx.firing(json!({
            "parent_id": parent, "count": n, "min_count": r.min_count,
            "twins": twins, "condition": r.condition, "within": r.within,
        })));
    }

    /// `twin` (under `parent`) was deleted: it no longer counts, and a group it was the
    /// parent of is dropped.
    pub(super) fn forget(&mut self, twin: TwinId, parent: Option<TwinId>) {
        self.groups.remove(&twin);
        let Some(parent) = parent else {
            return;
        };
        let Some(group) = self.groups.get_mut(&parent) else {
            return;
        };
        group.holding.remove(&twin);
        if group.holding.len() < self.spec.min_count {
            group.firing = false;
        }
        if group.holding.is_empty() {
            self.groups.remove(&parent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use serde_json::json;

    #[test]
    fn correlation_needs_k_twins_under_one_parent_within_the_window() {
        let mut set = rules(
            "line-overheat",
            json!({"kind": "correlation", "condition": {"property": "temperature", "op": ">", "value": 85},
                   "min_count": 2, "within": "60s", "actions": [{"type": "alert"}]}),
        );
        let p = Some(100);
        let out = feed(
            &mut set,
            &[
                ev(1, 1, p, 0.0, "temperature", 90.0),
                ev(2, 9, Some(200), 1.0, "temperature", 90.0), // other line
                ev(3, 2, p, 10.0, "temperature", 91.0),        // fires: twins 1 and 2
                ev(4, 3, p, 11.0, "temperature", 92.0),        // still firing: no repeat
                ev(5, 1, p, 12.0, "temperature", 70.0),
                ev(6, 2, p, 13.0, "temperature", 70.0), // down to 1: re-arms
                ev(7, 1, p, 100.0, "temperature", 95.0), // 3's reading is 89 s old: only 1
                ev(8, 2, p, 101.0, "temperature", 96.0), // fires again
            ],
        );
        assert_eq!(
            out.iter().map(|f| f.trigger_seq).collect::<Vec<_>>(),
            [3, 8]
        );
        assert_eq!(out[0].details["twins"], json!([id(1), id(2)]));
        assert_eq!(out[1].details["count"], json!(2));
    }

    #[test]
    fn a_deleted_twin_no_longer_counts() {
        let mut set = rules(
            "line-overheat",
            json!({"kind": "correlation", "condition": {"property": "temperature", "op": ">", "value": 85},
                   "min_count": 2, "within": "60s", "actions": [{"type": "alert"}]}),
        );
        let p = Some(100);
        let mut gone = deleted(2, 1, 1.0);
        gone.parent_id = p.map(id);
        let out = feed(
            &mut set,
            &[
                ev(1, 1, p, 0.0, "temperature", 90.0),
                gone,
                ev(3, 2, p, 2.0, "temperature", 91.0), // only twin 2 holds: no firing
            ],
        );
        assert!(out.is_empty());
    }
}
