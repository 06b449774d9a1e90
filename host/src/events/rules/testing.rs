//! Helpers for the rule engine's unit tests: synthetic events and a rule set to feed them to.

use serde_json::{json, Value};

pub(super) use super::ts_of;
use super::{Firing, RuleSet, RuleSpec};
use crate::events::log::{Event, EventType};
use crate::types::{TwinId, World};

pub(super) fn id(n: u128) -> TwinId {
    TwinId(uuid::Uuid::from_u128(n))
}

/// An update of `twin` (under `parent`) at `t` seconds setting `prop` to `v`.
pub(super) fn ev(seq: u64, twin: u128, parent: Option<u128>, t: f64, prop: &str, v: f64) -> Event {
    let mut e = Event::new(EventType::TwinUpdated, ts_of((t * 1e6) as i64));
    e.seq = seq;
    e.twin_id = Some(id(twin));
    e.entity_type = Some("machine".into());
    e.parent_id = parent.map(id);
    e.changed.insert(prop.into(), json!(v));
    e
}

/// A deletion of `twin` at `t` seconds.
pub(super) fn deleted(seq: u64, twin: u128, t: f64) -> Event {
    let mut e = Event::new(EventType::TwinDeleted, ts_of((t * 1e6) as i64));
    e.seq = seq;
    e.twin_id = Some(id(twin));
    e.entity_type = Some("machine".into());
    e
}

/// A rule set holding one rule.
pub(super) fn rules(name: &str, spec: Value) -> RuleSet {
    let mut set = RuleSet::default();
    let spec: RuleSpec = serde_json::from_value(spec).expect("rule parses");
    set.put(name, spec, &|_| Some(World::Compute))
        .expect("rule is valid");
    set
}

pub(super) fn feed(set: &mut RuleSet, events: &[Event]) -> Vec<Firing> {
    let mut out = Vec::new();
    for e in events {
        set.on_event(e, &mut out);
    }
    out
}

/// (first, then) sequence numbers of sequence-rule firings.
pub(super) fn seq_pairs(out: &[Firing]) -> Vec<(u64, u64)> {
    out.iter()
        .map(|f| {
            (
                f.details["first"]["seq"].as_u64().unwrap(),
                f.details["then"]["seq"].as_u64().unwrap(),
            )
        })
        .collect()
}
