//! Window rules: aggregates over tumbling or sliding event-time windows.
//!
//! Owns: the open windows of each group (a twin or a parent), their accumulators, and the
//! watermark (newest event time minus `lateness`) that closes them.
//! Exposes: [`Window`] (built by `spec::compile`) with `eval` and `forget`.
//! Must never: hold more than `max_groups` groups or more than
//! [`MAX_WINDOWS_PER_GROUP`](super::MAX_WINDOWS_PER_GROUP) windows per group (validation
//! bounds `(size + lateness) / slide`), or add an update to a window that already closed
//! (it is counted as `late`).

use std::collections::{hash_map::Entry, BTreeMap};

use serde_json::json;

use super::spec::{Agg, GroupBy, WindowRule};
use super::{ts_of, Ctx, Firing, Map, RuleStats};
use crate::types::TwinId;

/// A compiled window rule and its state.
pub(super) struct Window {
    /// The rule as written.
    pub(super) spec: WindowRule,
    /// Window length (µs).
    size_us: i64,
    /// Distance between window starts (µs); `size_us` for tumbling windows.
    slide_us: i64,
    /// How far behind the newest event time the watermark trails (µs).
    lateness_us: i64,
    /// Most groups tracked at once; more are turned away and counted.
    max_groups: usize,
    /// Open windows by group.
    groups: Map<TwinId, Group>,
    /// Open windows by end time, to close them in order as the watermark passes.
    open: BTreeMap<i64, Vec<WindowKey>>,
    /// Windows ending at or before this event time (µs) are closed.
    watermark: i64,
}

/// The open windows of one group.
struct Group {
    /// Window start (µs) → what has been added to it.
    windows: BTreeMap<i64, Acc>,
    /// The twin an alert names: the group's twin, or the latest to report in a parent group.
    twin: TwinId,
    /// That twin's entity type when the group opened.
    entity_type: Option<String>,
    /// That twin's parent when the group opened.
    parent_id: Option<TwinId>,
}

/// One window of one group.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct WindowKey {
    /// The group's twin or parent.
    group: TwinId,
    /// Window start (µs).
    start: i64,
}

/// A running aggregate.
#[derive(Default)]
struct Acc {
    /// Values added.
    count: u64,
    /// Their sum (for sum and avg).
    sum: f64,
    /// Smallest value (valid once `count > 0`).
    min: f64,
    /// Largest value (valid once `count > 0`).
    max: f64,
}

impl Acc {
    fn add(&mut self, v: f64) {
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count += 1;
        self.sum += v;
    }

    fn get(&self, agg: Agg) -> f64 {
        match agg {
            Agg::Count => self.count as f64,
            Agg::Sum => self.sum,
            Agg::Avg => self.sum / self.count.max(1) as f64,
            Agg::Min => self.min,
            Agg::Max => self.max,
        }
    }
}

/// What became of an update.
enum Added {
    Counted,
    /// Every window it belongs to has closed.
    Late,
    /// Its group is new and the rule tracks `max_groups` already.
    Overflow,
}

impl Window {
    pub(super) fn new(
        spec: WindowRule,
        size_us: i64,
        slide_us: i64,
        lateness_us: i64,
        max_groups: usize,
    ) -> Window {
        Window {
            spec,
            size_us,
            slide_us,
            lateness_us,
            max_groups,
            groups: Map::default(),
            open: BTreeMap::new(),
            watermark: i64::MIN,
        }
    }

    pub(super) fn eval(&mut self, cx: &Ctx, stats: &mut RuleStats, out: &mut Vec<Firing>) {
        let Some(v) = cx.number(&self.spec.property) else {
            return;
        };
        let group = match self.spec.group_by {
            // (validation refuses `relationship` for windows)
            GroupBy::Twin | GroupBy::Relationship => cx.twin,
            GroupBy::Parent => match cx.e.parent_id {
                Some(p) => p,
                None => return,
            },
        };
        match self.add(cx, group, v) {
            Added::Late => stats.late += 1,
            Added::Overflow => stats.overflow += 1,
            Added::Counted => {
                self.watermark = self.watermark.max(cx.ts - self.lateness_us);
                self.close(cx, stats, out);
            }
        }
    }

    /// Add `v` to every open window of `group` that contains the event's time.
    fn add(&mut self, cx: &Ctx, group: TwinId, v: f64) -> Added {
        let (ts, size) = (cx.ts, self.size_us);
        // Windows containing ts: starts s = k*slide with s <= ts < s + size; the newest
        // of them is still open unless the update is late.
        let last_start = ts.div_euclid(self.slide_us) * self.slide_us;
        if last_start + size <= self.watermark {
            return Added::Late;
        }
        let tracked = self.groups.len();
        let g = match self.groups.entry(group) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(_) if tracked >= self.max_groups => return Added::Overflow,
            Entry::Vacant(slot) => slot.insert(Group {
                windows: BTreeMap::new(),
                twin: cx.twin,
                entity_type: cx.e.entity_type.clone(),
                parent_id: cx.e.parent_id,
            }),
        };
        // Alerts of a parent group name the latest twin that reported.
        g.twin = cx.twin;
        let mut start = last_start;
        while start > ts - size && start + size > self.watermark {
            let open = &mut self.open;
            g.windows
                .entry(start)
                .or_insert_with(|| {
                    open.entry(start + size)
                        .or_default()
                        .push(WindowKey { group, start });
                    Acc::default()
                })
                .add(v);
            start -= self.slide_us;
        }
        Added::Counted
    }

    /// Close every window that ended at or before the watermark; fire for those whose
    /// aggregate meets the condition.
    fn close(&mut self, cx: &Ctx, stats: &mut RuleStats, out: &mut Vec<Firing>) {
        let mut closing = Vec::new();
        while let Some(entry) = self.open.first_entry() {
            if *entry.key() > self.watermark {
                break;
            }
            let end = *entry.key();
            let mut keys = entry.remove();
            keys.sort_unstable(); // deterministic order within one end time
            closing.extend(keys.into_iter().map(|k| (end, k)));
        }
        for (end, key) in closing {
            let Some(g) = self.groups.get_mut(&key.group) else {
                continue; // forgotten (deleted) since it opened
            };
            let Some(acc) = g.windows.remove(&key.start) else {
                continue;
            };
            let (twin, entity_type, parent_id) = if g.windows.is_empty() {
                let g = self.groups.remove(&key.group).expect("looked up above");
                (g.twin, g.entity_type, g.parent_id)
            } else {
                (g.twin, g.entity_type.clone(), g.parent_id)
            };
            let value = acc.get(self.spec.agg);
            let hit = match (self.spec.op, self.spec.value) {
                (Some(op), Some(b)) => op.test(value, b),
                _ => true,
            };
            if !hit {
                continue;
            }
            stats.fired += 1;
            let r = &self.spec;
            out.push(Firing {
                twin_id: if r.group_by == GroupBy::Twin {
                    key.group
                } else {
                    twin
                },
                entity_type,
                parent_id,
                ts: ts_of(end),
                ..cx.firing(json!({
                    "property": r.property, "agg": r.agg, "value": value,
                    "count": acc.count, "group_by": r.group_by, "group": key.group,
                    "window": {"start": ts_of(key.start), "end": ts_of(end)},
                }))
            });
        }
    }

    /// `twin` was deleted: drop the windows of its group (its own, or those of the twins
    /// under it when it is a parent). Their entries in `open` are skipped when they close.
    pub(super) fn forget(&mut self, twin: TwinId) {
        self.groups.remove(&twin);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::types::TwinId;
    use serde_json::json;

    #[test]
    fn tumbling_window_averages_per_twin_and_handles_lateness() {
        let mut set = rules(
            "avg",
            json!({"kind": "window", "property": "temperature", "agg": "avg", "size": "10s",
                   "lateness": "5s", "op": ">", "value": 0, "actions": [{"type": "alert"}]}),
        );
        let out = feed(
            &mut set,
            &[
                ev(1, 1, None, 1.0, "temperature", 10.0),
                ev(2, 1, None, 12.0, "temperature", 30.0), // watermark 7: [0,10) stays open
                ev(3, 1, None, 8.0, "temperature", 20.0),  // out of order, within lateness
                ev(4, 2, None, 9.0, "temperature", 100.0), // another twin, same window
            ],
        );
        assert!(
            out.is_empty(),
            "nothing closes before the watermark passes 10 s"
        );
        let out = feed(&mut set, &[ev(5, 1, None, 16.0, "temperature", 40.0)]);
        // Watermark 11 closes [0,10) for both twins.
        let mut got: Vec<(TwinId, f64, u64)> = out
            .iter()
            .map(|f| {
                (
                    f.twin_id,
                    f.details["value"].as_f64().unwrap(),
                    f.details["count"].as_u64().unwrap(),
                )
            })
            .collect();
        got.sort_by_key(|g| g.0);
        assert_eq!(got, [(id(1), 15.0, 2), (id(2), 100.0, 1)]);
        assert_eq!(out[0].details["window"]["start"], json!(ts_of(0)));
        assert_eq!(out[0].details["window"]["end"], json!(ts_of(10_000_000)));
        // An update for a closed window is late: counted, not added.
        let out = feed(&mut set, &[ev(6, 1, None, 3.0, "temperature", 1000.0)]);
        assert!(out.is_empty());
        assert_eq!(set.stats("avg").unwrap().late, 1);
        // [10,20) for twin 1 holds 30 and 40 (the late 1000 did not land anywhere).
        let out = feed(&mut set, &[ev(7, 1, None, 26.0, "temperature", 0.0)]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].details["value"], json!(35.0));
    }

    #[test]
    fn sliding_window_by_parent_with_condition() {
        // Max over 10 s every 5 s, per parent, firing when the max passes 50.
        let mut set = rules(
            "peak",
            json!({"kind": "window", "property": "load", "agg": "max", "size": "10s", "slide": "5s",
                   "group_by": "parent", "op": ">", "value": 50, "actions": [{"type": "alert"}]}),
        );
        let out = feed(
            &mut set,
            &[
                ev(1, 1, Some(100), 1.0, "load", 60.0), // windows [-5,5) and [0,10)
                ev(2, 2, Some(100), 6.0, "load", 40.0), // [0,10) and [5,15); closes [-5,5)
                ev(3, 3, Some(200), 7.0, "load", 70.0), // other parent
                ev(4, 1, Some(100), 21.0, "load", 10.0), // closes [0,10), [5,15) and [10,20)
                ev(5, 9, None, 22.0, "load", 99.0),     // no parent: not grouped
            ],
        );
        let got: Vec<(String, i64, f64)> = out
            .iter()
            .map(|f| {
                (
                    f.details["group"].as_str().unwrap().to_owned(),
                    chrono::DateTime::parse_from_rfc3339(
                        f.details["window"]["start"].as_str().unwrap(),
                    )
                    .unwrap()
                    .timestamp(),
                    f.details["value"].as_f64().unwrap(),
                )
            })
            .collect();
        let p100 = id(100).to_string();
        let p200 = id(200).to_string();
        // [-5,5) max 60 (p100); [0,10) max 60 (p100) and 70 (p200); [5,15) max 70 (p200);
        // p100's [5,15) holds only 40 and does not fire.
        assert_eq!(
            got,
            [
                (p100.clone(), -5, 60.0),
                (p100, 0, 60.0),
                (p200.clone(), 0, 70.0),
                (p200, 5, 70.0),
            ]
        );
    }

    #[test]
    fn state_is_bounded_and_overflow_is_counted() {
        let mut set = rules(
            "tiny",
            json!({"kind": "window", "property": "x", "agg": "count", "size": "1h",
                   "max_groups": 2, "actions": [{"type": "alert"}]}),
        );
        let out = feed(
            &mut set,
            &(1..=5)
                .map(|i| ev(i, i as u128, None, 1.0, "x", 1.0))
                .collect::<Vec<_>>(),
        );
        assert!(out.is_empty());
        assert_eq!(set.stats("tiny").unwrap().overflow, 3);
        // A deleted twin's group makes room for another.
        let out = feed(
            &mut set,
            &[deleted(6, 1, 2.0), ev(7, 6, None, 2.0, "x", 1.0)],
        );
        assert!(out.is_empty());
        assert_eq!(set.stats("tiny").unwrap().overflow, 3);
    }
}
