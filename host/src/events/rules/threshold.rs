//! Threshold rules: a property crosses a bound.
//!
//! Owns: per-twin arming state (rising-edge detection, hysteresis, cooldown).
//! Exposes: [`Threshold`] (built by `spec::compile`) with `eval` and `forget`.
//! Must never: keep a twin's state longer than it matters — a twin is tracked from its first
//! firing until it is re-armed and its cooldown has passed (or it is deleted), so the
//! [`DEFAULT_MAX_GROUPS`] bound counts only twins that are firing or cooling down.

use std::collections::{hash_map::Entry, BTreeSet};

use serde_json::json;

use super::spec::ThresholdRule;
use super::{Ctx, Firing, Map, RuleStats, DEFAULT_MAX_GROUPS};
use crate::types::TwinId;

/// A compiled threshold rule and its state.
pub(super) struct Threshold {
    /// The rule as written.
    pub(super) spec: ThresholdRule,
    /// `cooldown` in microseconds; 0 without one.
    cooldown_us: i64,
    /// Twins that fired and are still active or cooling down.
    twins: Map<TwinId, Armed>,
    /// Re-armed twins still in their cooldown, by the event time it ends: what to forget as
    /// event time passes (at most one entry per tracked twin, see [`Armed::queued`]).
    cooling: BTreeSet<(i64, TwinId)>,
    /// Newest event time seen (µs): cooldowns end against it.
    newest: i64,
}

/// One tracked twin.
struct Armed {
    /// The condition held at the last firing and has not cleared since (no new firing until
    /// it does).
    active: bool,
    /// Event time of the last firing (µs), for the cooldown.
    last_fired: i64,
    /// The twin has an entry in [`Threshold::cooling`] (so re-arming does not add another).
    queued: bool,
}

impl Threshold {
    pub(super) fn new(spec: ThresholdRule, cooldown_us: i64) -> Threshold {
        Threshold {
            spec,
            cooldown_us,
            twins: Map::default(),
            cooling: BTreeSet::new(),
            newest: i64::MIN,
        }
    }

    pub(super) fn eval(&mut self, cx: &Ctx, stats: &mut RuleStats, out: &mut Vec<Firing>) {
        let Some(v) = cx.number(&self.spec.property) else {
            return;
        };
        self.newest = self.newest.max(cx.ts);
        self.forget_cooled_down();
        let cond = self.spec.op.test(v, self.spec.value);
        let tracked = self.twins.len();
        let armed = match self.twins.entry(cx.twin) {
            // A twin is tracked only from its first firing on.
            Entry::Vacant(_) if !cond => return,
            Entry::Vacant(_) if tracked >= DEFAULT_MAX_GROUPS => {
                stats.overflow += 1;
                return;
            }
            Entry::Vacant(slot) => slot.insert(Armed {
                active: false,
                last_fired: i64::MIN,
                queued: false,
            }),
            Entry::Occupied(o) => o.into_mut(),
        };
        if !armed.active && cond {
            armed.active = true;
            if armed.last_fired != i64::MIN && cx.ts - armed.last_fired < self.cooldown_us {
                stats.suppressed += 1;
                return;
            }
            armed.last_fired = cx.ts;
            stats.fired += 1;
            let s = &self.spec;
            out.push(cx.firing(
                json!({"property": s.property, "value": v, "op": s.op, "threshold": s.value}),
            ));
        } else if armed.active {
            let rearm = match self.spec.clear {
                Some(c) => !self.spec.op.test(v, c),
                None => !cond,
            };
            if rearm {
                self.rearm(cx.twin, cx.ts);
            }
        }
    }

    /// The condition has cleared for `twin`: forget it now if its cooldown is over, or queue
    /// it to be forgotten when it is.
    fn rearm(&mut self, twin: TwinId, ts: i64) {
        let Some(armed) = self.twins.get_mut(&twin) else {
            return;
        };
        armed.active = false;
        if ts - armed.last_fired >= self.cooldown_us {
            self.twins.remove(&twin);
        } else if !armed.queued {
            armed.queued = true;
            self.cooling
                .insert((armed.last_fired + self.cooldown_us, twin));
        }
    }

    /// Forget the re-armed twins whose cooldown has ended by the newest event time.
    fn forget_cooled_down(&mut self) {
        while let Some(&(end, twin)) = self.cooling.first() {
            if end > self.newest {
                break;
            }
            self.cooling.pop_first();
            let Some(armed) = self.twins.get_mut(&twin) else {
                continue; // deleted meanwhile
            };
            armed.queued = false;
            if armed.active {
                continue; // its next re-arm decides
            }
            let ends = armed.last_fired + self.cooldown_us;
            if ends <= self.newest {
                self.twins.remove(&twin);
            } else {
                // It fired again (and re-armed) after being queued: wait for the new end.
                armed.queued = true;
                self.cooling.insert((ends, twin));
            }
        }
    }

    /// `twin` was deleted.
    pub(super) fn forget(&mut self, twin: TwinId) {
        // A stale `cooling` entry finds no state and is skipped.
        self.twins.remove(&twin);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::DEFAULT_MAX_GROUPS;
    use crate::events::Event;
    use serde_json::json;

    #[test]
    fn threshold_fires_on_rising_edges_with_hysteresis_and_cooldown() {
        let mut set = rules(
            "hot",
            json!({"kind": "threshold", "entity_type": "machine", "property": "temperature",
                   "op": ">", "value": 85, "clear": 80, "cooldown": "10s",
                   "actions": [{"type": "alert"}]}),
        );
        let temps = [
            (0.0, 70.0),
            (1.0, 90.0), // fires
            (2.0, 91.0),
            (3.0, 82.0), // still above clear: stays armed-off
            (4.0, 86.0),
            (5.0, 79.0), // re-arms
            (6.0, 88.0), // rising edge within the cooldown: suppressed
            (7.0, 70.0),
            (20.0, 95.0), // fires
        ];
        let events: Vec<Event> = temps
            .iter()
            .enumerate()
            .map(|(i, (t, v))| ev(i as u64 + 1, 1, None, *t, "temperature", *v))
            .collect();
        let out = feed(&mut set, &events);
        assert_eq!(
            out.iter().map(|f| f.trigger_seq).collect::<Vec<_>>(),
            [2, 9]
        );
        assert!(out.iter().all(|f| f.twin_id == id(1)));
        assert_eq!(out[0].details["value"], json!(90.0));
        let stats = set.stats("hot").unwrap();
        assert_eq!((stats.fired, stats.suppressed), (2, 1));
        // Other entity types and other properties are ignored; each twin has its own state.
        let mut other = ev(20, 2, None, 30.0, "temperature", 99.0);
        other.entity_type = Some("sensor".into());
        let out = feed(
            &mut set,
            &[
                other,
                ev(21, 3, None, 30.0, "pressure", 99.0),
                ev(22, 3, None, 31.0, "temperature", 99.0),
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].twin_id, id(3));
    }

    #[test]
    fn threshold_with_cooldown_forgets_twins_once_rearmed_and_cooled_down() {
        let mut set = rules(
            "hot",
            json!({"kind": "threshold", "property": "t", "op": ">", "value": 10,
                   "cooldown": "1s", "actions": [{"type": "alert"}]}),
        );
        let mut out = Vec::new();
        let n = DEFAULT_MAX_GROUPS as u128;
        for twin in 1..=n {
            let t = twin as f64 * 0.001;
            set.on_event(&ev(2 * twin as u64, twin, None, t, "t", 20.0), &mut out);
            set.on_event(&ev(2 * twin as u64 + 1, twin, None, t, "t", 0.0), &mut out);
        }
        assert_eq!(out.len(), n as usize);
        // Long after every cooldown has passed, a new twin's crossing fires.
        let later = n as f64 * 0.001 + 10.0;
        let out = feed(
            &mut set,
            &[ev(10 * n as u64, n + 1, None, later, "t", 20.0)],
        );
        assert_eq!(out.len(), 1, "{:?}", set.stats("hot"));
        assert_eq!(set.stats("hot").unwrap().overflow, 0);
    }

    #[test]
    fn a_cooling_twin_is_remembered_until_its_cooldown_ends() {
        let mut set = rules(
            "hot",
            json!({"kind": "threshold", "property": "t", "op": ">", "value": 10,
                   "cooldown": "10s", "actions": [{"type": "alert"}]}),
        );
        let out = feed(
            &mut set,
            &[
                ev(1, 1, None, 0.0, "t", 20.0), // fires
                ev(2, 1, None, 1.0, "t", 0.0),  // re-arms, cooling until 10 s
                ev(3, 2, None, 5.0, "t", 0.0),  // time passes on another twin
                ev(4, 1, None, 6.0, "t", 20.0), // still cooling: suppressed
                ev(5, 1, None, 7.0, "t", 0.0),
                ev(6, 2, None, 30.0, "t", 0.0), // the cooldown ended: twin 1 forgotten
                ev(7, 1, None, 31.0, "t", 20.0), // fires
            ],
        );
        assert_eq!(
            out.iter().map(|f| f.trigger_seq).collect::<Vec<_>>(),
            [1, 7]
        );
        assert_eq!(set.stats("hot").unwrap().suppressed, 1);
    }
}
