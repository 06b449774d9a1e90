//! The rule documents (`PUT /v1/rules/{name}` bodies) and their checking.
//!
//! Owns: the [`RuleSpec`] types as clients write them, [`parse`] (JSON → spec, naming the
//! field a typed value such as a severity failed on) and `compile` (spec → the kind's
//! evaluator, listing every problem found, not just the first).
//! Exposes: the spec types, [`parse`], [`validate`].
//! Must never: hold evaluation state, or accept a rule whose state would be unbounded (every
//! span is capped by [`MAX_SPAN`], every group count by [`DEFAULT_MAX_GROUPS`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::actions::{self, Action};
use super::correlation::Correlation;
use super::sequence::Sequence;
use super::threshold::Threshold;
use super::window::Window;
use super::{Kind, DEFAULT_MAX_GROUPS, MAX_SPAN, MAX_WINDOWS_PER_GROUP};
use crate::registry::check_name;
use crate::types::{Properties, ReactTo, Severity, TwinId, World};

/// A comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Op {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    /// `==`, or `=` as in queries.
    #[serde(rename = "==", alias = "=")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
}

impl Op {
    /// The operator as written in a rule.
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }

    pub fn test(self, a: f64, b: f64) -> bool {
        match self {
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }
}

/// `property op value`, on a numeric property.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub property: String,
    pub op: Op,
    pub value: f64,
}

impl Condition {
    /// `Some(result)` when the event sets the property to a number.
    pub(super) fn eval(&self, changed: &Properties) -> Option<bool> {
        let v = changed.get(&self.property)?.as_f64()?;
        Some(self.op.test(v, self.value))
    }
}

/// How window aggregates are grouped, and sequences correlated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    #[default]
    Twin,
    Parent,
    /// Sequences only: the "then" happens on a target of the first twin's `relationship`.
    Relationship,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Agg {
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

/// A rule. `entity_type` / `twin_id` narrow the twins it watches (both optional).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuleSpec {
    Threshold(ThresholdRule),
    Window(WindowRule),
    Sequence(SequenceRule),
    Correlation(CorrelationRule),
}

/// Fires when `property op value` becomes true for a twin. It fires again only after the
/// value has gone back past `clear` (hysteresis; default: the bound itself) and `cooldown`
/// has passed since the last firing for that twin.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ThresholdRule {
    #[serde(default)]
    pub entity_type: Option<String>,
    #[serde(default)]
    pub twin_id: Option<TwinId>,
    pub property: String,
    pub op: Op,
    pub value: f64,
    #[serde(default)]
    pub clear: Option<f64>,
    /// e.g. `30s`.
    #[serde(default)]
    pub cooldown: Option<String>,
    /// Which changes the rule evaluates: `local` (the default) only those made on this node,
    /// `all` also those merged from other nodes.
    #[serde(default)]
    pub on: ReactTo,
    pub actions: Vec<Action>,
}

/// Aggregates `property` over event-time windows of `size` (tumbling), or of `size` every
/// `slide` (sliding). Fires when a window closes and its aggregate satisfies `op value`
/// (every window when no condition is given).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowRule {
    #[serde(default)]
    pub entity_type: Option<String>,
    #[serde(default)]
    pub twin_id: Option<TwinId>,
    pub property: String,
    pub agg: Agg,
    pub size: String,
    #[serde(default)]
    pub slide: Option<String>,
    #[serde(default)]
    pub group_by: GroupBy,
    #[serde(default)]
    pub op: Option<Op>,
    #[serde(default)]
    pub value: Option<f64>,
    /// How late (in event time) an update may arrive and still count (default 0).
    #[serde(default)]
    pub lateness: Option<String>,
    #[serde(default)]
    pub max_groups: Option<usize>,
    /// Which changes the rule evaluates: `local` (the default) only those made on this node,
    /// `all` also those merged from other nodes.
    #[serde(default)]
    pub on: ReactTo,
    pub actions: Vec<Action>,
}

/// Fires when `first` holds and then `then` holds within `within`, on one twin
/// (`correlate: "twin"`), on twins under the same parent (`"parent"`), or first on a twin and
/// then on a target of its `relationship` (`"relationship"`, e.g. a pump that `feeds` a tank).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SequenceRule {
    #[serde(default)]
    pub entity_type: Option<String>,
    #[serde(default)]
    pub twin_id: Option<TwinId>,
    pub first: Condition,
    pub then: Condition,
    pub within: String,
    #[serde(default)]
    pub correlate: GroupBy,
    /// With `correlate: "relationship"`: the relationship's name.
    #[serde(default)]
    pub relationship: Option<String>,
    /// Which changes the rule evaluates: `local` (the default) only those made on this node,
    /// `all` also those merged from other nodes.
    #[serde(default)]
    pub on: ReactTo,
    pub actions: Vec<Action>,
}

/// Fires when at least `min_count` twins under one parent have satisfied `condition` (their
/// latest value) within the last `within`; again only after the count has dropped below.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CorrelationRule {
    #[serde(default)]
    pub entity_type: Option<String>,
    pub condition: Condition,
    pub min_count: usize,
    pub within: String,
    #[serde(default)]
    pub max_groups: Option<usize>,
    /// Which changes the rule evaluates: `local` (the default) only those made on this node,
    /// `all` also those merged from other nodes.
    #[serde(default)]
    pub on: ReactTo,
    pub actions: Vec<Action>,
}

/// The twins and changes a rule watches: events of other twins, and changes from other
/// nodes unless it asks for them, never reach its evaluation.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Scope<'a> {
    /// Only twins of this entity type.
    pub entity_type: Option<&'a str>,
    /// Only this twin.
    pub twin_id: Option<TwinId>,
    /// Changes of local origin only, or all.
    pub on: ReactTo,
}

impl RuleSpec {
    pub(super) fn actions(&self) -> &[Action] {
        match self {
            RuleSpec::Threshold(r) => &r.actions,
            RuleSpec::Window(r) => &r.actions,
            RuleSpec::Sequence(r) => &r.actions,
            RuleSpec::Correlation(r) => &r.actions,
        }
    }

    fn entity_type(&self) -> Option<&str> {
        match self {
            RuleSpec::Threshold(r) => r.entity_type.as_deref(),
            RuleSpec::Window(r) => r.entity_type.as_deref(),
            RuleSpec::Sequence(r) => r.entity_type.as_deref(),
            RuleSpec::Correlation(r) => r.entity_type.as_deref(),
        }
    }

    /// Compute modules the rule's actions invoke.
    pub fn modules(&self) -> Vec<&str> {
        self.actions()
            .iter()
            .filter_map(|a| match a {
                Action::Invoke { module, .. } => Some(module.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// Read a rule document. A value of the wrong type fails here, before [`validate`]; a bad
/// severity is named by its field (serde's own message would not say which action).
pub fn parse(body: Value) -> Result<RuleSpec, Vec<String>> {
    let bad = bad_severities(&body);
    if !bad.is_empty() {
        return Err(bad);
    }
    serde_json::from_value(body).map_err(|e| vec![e.to_string()])
}

fn bad_severities(body: &Value) -> Vec<String> {
    let Some(list) = body.get("actions").and_then(Value::as_array) else {
        return Vec::new();
    };
    let names = Severity::ALL.map(Severity::as_str).join(", ");
    list.iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let s = a.get("severity")?;
            serde_json::from_value::<Severity>(s.clone())
                .is_err()
                .then(|| format!("actions[{i}].severity: one of {names}, not {s}"))
        })
        .collect()
}

/// Check a rule; every problem is listed (→ 422 with the list). `modules` answers the world
/// of an uploaded module (`None`: not uploaded).
pub fn validate(
    spec: &RuleSpec,
    modules: &dyn Fn(&str) -> Option<World>,
) -> Result<(), Vec<String>> {
    compile(spec.clone(), modules).map(|_| ())
}

/// Check a rule and build its evaluator (with empty state).
pub(super) fn compile(
    spec: RuleSpec,
    modules: &dyn Fn(&str) -> Option<World>,
) -> Result<Kind, Vec<String>> {
    let mut errors = Vec::new();
    if let Some(et) = spec.entity_type() {
        if let Err(e) = check_name("entity_type", et) {
            errors.push(e.to_string());
        }
    }
    actions::check(spec.actions(), modules, &mut errors);
    let kind = match spec {
        RuleSpec::Threshold(r) => Kind::Threshold(threshold(r, &mut errors)),
        RuleSpec::Window(r) => Kind::Window(window(r, &mut errors)),
        RuleSpec::Sequence(r) => Kind::Sequence(sequence(r, &mut errors)),
        RuleSpec::Correlation(r) => Kind::Correlation(correlation(r, &mut errors)),
    };
    if errors.is_empty() {
        Ok(kind)
    } else {
        Err(errors)
    }
}

fn threshold(r: ThresholdRule, errors: &mut Vec<String>) -> Threshold {
    check_prop("property", &r.property, errors);
    check_value("value", r.value, errors);
    if let Some(c) = r.clear {
        check_value("clear", c, errors);
        let ok = match r.op {
            Op::Gt | Op::Ge => c <= r.value,
            Op::Lt | Op::Le => c >= r.value,
            Op::Eq | Op::Ne => false,
        };
        if !ok {
            errors.push(format!(
                "clear: for op {} the clear level must be on the other side of value {} (or use no clear with == and !=)",
                r.op.symbol(), r.value
            ));
        }
    }
    let cooldown_us = r
        .cooldown
        .as_deref()
        .map_or(0, |c| span("cooldown", c, errors));
    Threshold::new(r, cooldown_us)
}

fn window(r: WindowRule, errors: &mut Vec<String>) -> Window {
    check_prop("property", &r.property, errors);
    let size = span("size", &r.size, errors);
    let slide = r
        .slide
        .as_deref()
        .map_or(size, |s| span("slide", s, errors));
    let lateness = r
        .lateness
        .as_deref()
        .map_or(0, |s| span("lateness", s, errors));
    if size > 0 && slide > 0 {
        if slide > size {
            errors.push("slide: must not be longer than size".into());
        } else if size % slide != 0 {
            errors.push("slide: size must be a whole multiple of slide".into());
        } else if (size + lateness) / slide > MAX_WINDOWS_PER_GROUP as i64 {
            errors.push(format!(
                "slide: (size + lateness) / slide must be at most {MAX_WINDOWS_PER_GROUP}"
            ));
        }
    }
    match (r.op, r.value) {
        (Some(_), Some(v)) => check_value("value", v, errors),
        (None, None) => {}
        _ => errors.push("op and value: give both or neither".into()),
    }
    let max_groups = max_groups(r.max_groups, errors);
    if r.group_by == GroupBy::Relationship {
        errors.push("group_by: twin or parent".into());
    }
    Window::new(r, size, slide, lateness, max_groups)
}

fn sequence(r: SequenceRule, errors: &mut Vec<String>) -> Sequence {
    check_prop("first.property", &r.first.property, errors);
    check_prop("then.property", &r.then.property, errors);
    check_value("first.value", r.first.value, errors);
    check_value("then.value", r.then.value, errors);
    let within_us = span("within", &r.within, errors);
    match (r.correlate, &r.relationship) {
        (GroupBy::Relationship, Some(name)) => check_prop("relationship", name, errors),
        (GroupBy::Relationship, None) => {
            errors.push("relationship: name the relationship to correlate by".into())
        }
        (_, Some(_)) => errors.push("relationship: only with correlate \"relationship\"".into()),
        _ => {}
    }
    Sequence::new(r, within_us)
}

fn correlation(r: CorrelationRule, errors: &mut Vec<String>) -> Correlation {
    check_prop("condition.property", &r.condition.property, errors);
    check_value("condition.value", r.condition.value, errors);
    if r.min_count < 2 {
        errors.push("min_count: at least 2 (use a threshold rule for one twin)".into());
    }
    let within_us = span("within", &r.within, errors);
    let max_groups = max_groups(r.max_groups, errors);
    Correlation::new(r, within_us, max_groups)
}

/// A duration field in microseconds (0 after an error, which is listed).
fn span(field: &str, s: &str, errors: &mut Vec<String>) -> i64 {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => {
            errors.push(format!("{field}: must be more than zero"));
            0
        }
        Ok(d) if d > MAX_SPAN => {
            errors.push(format!(
                "{field}: at most {}",
                humantime::format_duration(MAX_SPAN)
            ));
            0
        }
        // At most MAX_SPAN, so it fits.
        Ok(d) => d.as_micros() as i64,
        Err(e) => {
            errors.push(format!(
                "{field}: {s:?} is not a duration like 30s or 5m ({e})"
            ));
            0
        }
    }
}

fn max_groups(given: Option<usize>, errors: &mut Vec<String>) -> usize {
    let n = given.unwrap_or(DEFAULT_MAX_GROUPS);
    if n == 0 || n > DEFAULT_MAX_GROUPS {
        errors.push(format!("max_groups: between 1 and {DEFAULT_MAX_GROUPS}"));
    }
    n
}

fn check_prop(field: &str, p: &str, errors: &mut Vec<String>) {
    if let Err(e) = check_name(field, p) {
        errors.push(e.to_string());
    }
}

fn check_value(field: &str, v: f64, errors: &mut Vec<String>) {
    if !v.is_finite() {
        errors.push(format!("{field}: must be a finite number"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn malformed_rules_list_every_reason() {
        let bad: RuleSpec = serde_json::from_value(json!({
            "kind": "window", "property": "bad name!", "agg": "avg", "size": "soon",
            "slide": "3s", "op": ">", "actions": [
                {"type": "alert", "severity": "critical"},
                {"type": "invoke", "module": "nope"},
                {"type": "workflow", "workflow": "bad name!"}]
        }))
        .unwrap();
        let errors = validate(&bad, &|_| None).unwrap_err();
        for want in [
            "property",
            "size",
            "op and value",
            "\"nope\" is not uploaded",
            "workflow",
        ] {
            assert!(
                errors.iter().any(|e| e.contains(want)),
                "no error about {want}: {errors:?}"
            );
        }
        let sliding: RuleSpec = serde_json::from_value(json!({
            "kind": "window", "property": "x", "agg": "sum", "size": "10s", "slide": "3s",
            "actions": [{"type": "alert"}]}))
        .unwrap();
        assert!(validate(&sliding, &|_| None).unwrap_err()[0].contains("whole multiple"));
        let hysteresis: RuleSpec = serde_json::from_value(json!({
            "kind": "threshold", "property": "x", "op": ">", "value": 10, "clear": 20,
            "actions": [{"type": "alert"}]}))
        .unwrap();
        let errors = validate(&hysteresis, &|_| None).unwrap_err();
        assert!(errors[0].contains("clear: for op > "), "{errors:?}");
        // `=` (as in queries) is `==`.
        let eq: RuleSpec = serde_json::from_value(json!({
            "kind": "threshold", "property": "x", "op": "=", "value": 1,
            "actions": [{"type": "alert"}]}))
        .unwrap();
        assert!(matches!(eq, RuleSpec::Threshold(ref t) if t.op == Op::Eq));
        // Unknown fields and kinds are refused by the parser.
        assert!(serde_json::from_value::<RuleSpec>(json!({"kind": "threshold", "property": "x", "op": ">", "value": 1, "actions": [], "bogus": 1})).is_err());
        assert!(serde_json::from_value::<RuleSpec>(json!({"kind": "magic"})).is_err());
    }

    #[test]
    fn severities_are_typed_and_a_bad_one_is_named_by_its_field() {
        let errors = parse(
            json!({"kind": "threshold", "property": "x", "op": ">", "value": 1,
            "actions": [{"type": "alert"}, {"type": "alert", "severity": "apocalyptic"}]}),
        )
        .unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("actions[1].severity: one of info, warning, critical"));
        let spec = parse(
            json!({"kind": "threshold", "property": "x", "op": ">", "value": 1,
            "actions": [{"type": "alert"}, {"type": "alert", "severity": "critical"}]}),
        )
        .unwrap();
        let severities: Vec<Severity> = spec
            .actions()
            .iter()
            .filter_map(|a| match a {
                Action::Alert { severity, .. } => Some(*severity),
                _ => None,
            })
            .collect();
        assert_eq!(severities, [Severity::Warning, Severity::Critical]);
    }
}
