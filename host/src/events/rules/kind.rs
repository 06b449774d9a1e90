//! The compiled rule and what its kinds share.
//!
//! Owns: [`Kind`] (one variant per rule kind, each carrying its spec, bounds and state, so
//! every match over it is total), [`Rule`] (a kind with its name and counters) and [`Ctx`]
//! (what an evaluation is told about the event at hand), and what evaluation yields:
//! [`Firing`]s and [`RuleStats`].
//! Exposes: those, to the rule set and the kinds.
//! Must never: hold state of its own; a kind's state lives in its variant.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::correlation::Correlation;
use super::sequence::Sequence;
use super::spec::Scope;
use super::threshold::Threshold;
use super::window::Window;
use crate::events::log::Event;
use crate::types::TwinId;

/// A rule fired: what for, and on which twin its actions act.
#[derive(Clone, Debug, PartialEq)]
pub struct Firing {
    /// The rule's name: which actions to carry out.
    pub rule: String,
    /// The twin whose event fired the rule.
    pub twin_id: TwinId,
    /// The twin's entity type, for the alert event.
    pub entity_type: Option<String>,
    /// The twin's parent, for the alert and `parent` targets.
    pub parent_id: Option<TwinId>,
    /// Event time of the firing.
    pub ts: DateTime<Utc>,
    /// The sequence number of the event that fired it.
    pub trigger_seq: u64,
    /// Details for the alert (value, window, twins, …).
    pub details: Value,
    /// Automatic changes that led to the triggering event; the actions' changes are one deeper.
    pub depth: u8,
}

/// Counters of one rule.
#[derive(Default, Debug, Serialize, ToSchema, Clone)]
pub struct RuleStats {
    /// Times the rule fired.
    pub fired: u64,
    /// Updates that arrived after their window closed.
    pub late: u64,
    /// Groups or partial matches turned away or evicted by the rule's bounds.
    pub overflow: u64,
    /// Firings whose alert was held back by the cooldown.
    pub suppressed: u64,
    /// Actions that failed: a patch the write path refused, a `parent` target on a twin
    /// without one, an invoke that failed.
    pub errors: u64,
    /// The newest of those failures.
    pub last_error: Option<String>,
}

/// What every kind's `eval` is told about the event at hand.
pub(super) struct Ctx<'a> {
    /// The rule's name (for firings).
    pub(super) rule: &'a str,
    /// The event itself (changed properties, parent, sequence number).
    pub(super) e: &'a Event,
    /// The event's twin.
    pub(super) twin: TwinId,
    /// The event's time (µs).
    pub(super) ts: i64,
    /// How many automatic changes led to the event.
    pub(super) depth: u8,
    /// Targets of a twin's relationships of a name.
    pub(super) related: &'a dyn Fn(TwinId, &str) -> Vec<TwinId>,
}

impl Ctx<'_> {
    /// The numeric value the event sets `property` to, if it does.
    pub(super) fn number(&self, property: &str) -> Option<f64> {
        self.e.changed.get(property).and_then(Value::as_f64)
    }

    /// A firing on the event's twin at the event's time.
    pub(super) fn firing(&self, details: Value) -> Firing {
        Firing {
            rule: self.rule.to_owned(),
            twin_id: self.twin,
            entity_type: self.e.entity_type.clone(),
            parent_id: self.e.parent_id,
            ts: self.e.ts,
            trigger_seq: self.e.seq,
            details,
            depth: self.depth,
        }
    }
}

/// A compiled rule: each variant carries its spec, its bounds and its state.
pub(super) enum Kind {
    Threshold(Threshold),
    Window(Window),
    Sequence(Sequence),
    Correlation(Correlation),
}

impl Kind {
    pub(super) fn eval(&mut self, cx: &Ctx, stats: &mut RuleStats, out: &mut Vec<Firing>) {
        match self {
            Kind::Threshold(k) => k.eval(cx, stats, out),
            Kind::Window(k) => k.eval(cx, stats, out),
            Kind::Sequence(k) => k.eval(cx, stats, out),
            Kind::Correlation(k) => k.eval(cx, stats, out),
        }
    }

    /// Drop what the rule holds about a deleted twin.
    pub(super) fn forget(&mut self, twin: TwinId, parent: Option<TwinId>) {
        match self {
            Kind::Threshold(k) => k.forget(twin),
            Kind::Window(k) => k.forget(twin),
            Kind::Sequence(k) => k.forget(twin),
            Kind::Correlation(k) => k.forget(twin, parent),
        }
    }

    pub(super) fn scope(&self) -> Scope<'_> {
        let (entity_type, twin_id, on) = match self {
            Kind::Threshold(k) => (&k.spec.entity_type, k.spec.twin_id, k.spec.on),
            Kind::Window(k) => (&k.spec.entity_type, k.spec.twin_id, k.spec.on),
            Kind::Sequence(k) => (&k.spec.entity_type, k.spec.twin_id, k.spec.on),
            Kind::Correlation(k) => (&k.spec.entity_type, None, k.spec.on),
        };
        Scope {
            entity_type: entity_type.as_deref(),
            twin_id,
            on,
        }
    }

    /// Properties whose changes the rule looks at.
    pub(super) fn properties(&self) -> Vec<&str> {
        match self {
            Kind::Threshold(k) => vec![&k.spec.property],
            Kind::Window(k) => vec![&k.spec.property],
            Kind::Sequence(k) if k.spec.then.property != k.spec.first.property => {
                vec![&k.spec.first.property, &k.spec.then.property]
            }
            Kind::Sequence(k) => vec![&k.spec.first.property],
            Kind::Correlation(k) => vec![&k.spec.condition.property],
        }
    }
}

pub(super) struct Rule {
    /// The name the rule was stored under; firings and stats are keyed by it.
    pub(super) name: String,
    /// What to evaluate, with its state.
    pub(super) kind: Kind,
    /// What evaluation counted (action failures are counted by the service).
    pub(super) stats: RuleStats,
}

impl Rule {
    /// Whether the event is one this rule looks at (beyond its properties); `local`: its
    /// change was made on this node.
    pub(super) fn watches(&self, e: &Event, twin: TwinId, local: bool) -> bool {
        // A rule does not react to its own changes.
        if e.cause
            .as_ref()
            .is_some_and(|c| c.by.rule() == Some(&self.name))
        {
            return false;
        }
        let scope = self.kind.scope();
        scope.on.admits(local)
            && scope.twin_id.is_none_or(|t| t == twin)
            && scope
                .entity_type
                .is_none_or(|et| e.entity_type.as_deref() == Some(et))
    }
}
