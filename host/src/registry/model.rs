//! Entity-type models: optional schemas that validate twin properties.
//!
//! A twin whose entity type has no model is accepted as it is (the seed's behaviour). With a
//! model, every property written is checked against its spec and `required` properties must
//! exist on create and can never be removed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::RegistryError;
use crate::types::Properties;

/// JSON type of a property.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PropType {
    Number,
    Integer,
    Boolean,
    String,
    Object,
    Array,
}

/// Constraints on one property.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PropertySpec {
    #[serde(rename = "type")]
    pub ty: PropType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, rename = "enum", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub allowed: Option<Vec<Value>>,
    /// Keep an ordered index of this property: `where` conditions on it (`=`, `<`, `<=`,
    /// `>`, `>=`, `in`) and `properties` equality in a query that names the entity type read
    /// the index instead of scanning. Number, integer, string and boolean properties only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub indexed: bool,
}

/// How concurrent writes from two nodes to one property are merged (used by sync).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    Lww,
    Version,
    Merge,
    Manual,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConflictPolicy {
    pub strategy: Strategy,
    /// Module name of a `resolver` component, for `merge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolver: Option<String>,
    /// The sha256 of the resolver's component (`GET /v1/modules/{name}` shows it), for
    /// `merge`: a node whose module has other code does not run it, so every node that
    /// merges runs the same code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// The schema of one entity type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Model {
    #[serde(default)]
    pub properties: BTreeMap<String, PropertySpec>,
    #[serde(default)]
    pub required: Vec<String>,
    #[serde(default = "yes")]
    pub additional_properties: bool,
    #[serde(default)]
    pub conflict: ConflictPolicy,
}

fn yes() -> bool {
    true
}

/// Most properties a model may declare.
pub const MAX_MODEL_PROPERTIES: usize = 1024;

impl Model {
    /// The properties marked `"indexed": true`, in name order.
    pub fn indexed(&self) -> Vec<&str> {
        self.properties
            .iter()
            .filter(|(_, s)| s.indexed)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Check that the model itself makes sense; every problem is reported at once.
    pub fn check(&self) -> Result<(), RegistryError> {
        let mut bad = BTreeMap::new();
        if self.properties.len() > MAX_MODEL_PROPERTIES {
            bad.insert(
                "properties".into(),
                format!("at most {MAX_MODEL_PROPERTIES} properties"),
            );
        }
        for (name, spec) in &self.properties {
            if let (Some(lo), Some(hi)) = (spec.min, spec.max) {
                if lo > hi {
                    bad.insert(name.clone(), format!("min {lo} is greater than max {hi}"));
                }
            }
            if (spec.min.is_some() || spec.max.is_some())
                && !matches!(spec.ty, PropType::Number | PropType::Integer)
            {
                bad.insert(
                    name.clone(),
                    "min/max apply only to number or integer".into(),
                );
            }
            if spec.indexed && matches!(spec.ty, PropType::Object | PropType::Array) {
                bad.insert(
                    name.clone(),
                    "indexed applies only to number, integer, string or boolean".into(),
                );
            }
            if let Some(vals) = &spec.allowed {
                if vals.is_empty() {
                    bad.insert(name.clone(), "enum must list at least one value".into());
                }
                for v in vals {
                    if let Err(e) = type_check(spec.ty, v) {
                        bad.insert(name.clone(), format!("enum value {v}: {e}"));
                    }
                }
            }
        }
        for r in &self.required {
            if !self.additional_properties && !self.properties.contains_key(r) {
                bad.insert(
                    r.clone(),
                    "required but not declared while additional_properties is false".into(),
                );
            }
        }
        if self.conflict.strategy == Strategy::Merge {
            if self.conflict.resolver.is_none() {
                bad.insert(
                    "conflict.resolver".into(),
                    "strategy merge needs a resolver module name".into(),
                );
            }
            match &self.conflict.sha256 {
                None => {
                    bad.insert(
                        "conflict.sha256".into(),
                        "strategy merge needs the resolver's sha256 (GET /v1/modules/{name} shows it), so that every node runs the same code".into(),
                    );
                }
                Some(h) if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    bad.insert(
                        "conflict.sha256".into(),
                        format!("{h:?} is not a sha256 (64 hex digits)"),
                    );
                }
                Some(_) => {}
            }
        } else if self.conflict.resolver.is_some() || self.conflict.sha256.is_some() {
            bad.insert(
                "conflict.resolver".into(),
                "a resolver is used only by strategy merge".into(),
            );
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(RegistryError::Validation(bad))
        }
    }

    /// Validate a full property set for a new twin.
    pub fn validate_new(&self, props: &Properties) -> Result<(), RegistryError> {
        let mut bad = BTreeMap::new();
        for r in &self.required {
            if props.get(r).is_none_or(Value::is_null) {
                bad.insert(r.clone(), "required property is missing".into());
            }
        }
        self.check_values(props, &mut bad);
        if bad.is_empty() {
            Ok(())
        } else {
            Err(RegistryError::Validation(bad))
        }
    }

    /// Validate a merge patch: `null` removes (refused for required properties), anything
    /// else must satisfy the property's spec.
    pub fn validate_patch(&self, patch: &Properties) -> Result<(), RegistryError> {
        let mut bad = BTreeMap::new();
        for (k, v) in patch {
            if v.is_null() && self.required.iter().any(|r| r == k) {
                bad.insert(k.clone(), "required property cannot be removed".into());
            }
        }
        self.check_values(patch, &mut bad);
        if bad.is_empty() {
            Ok(())
        } else {
            Err(RegistryError::Validation(bad))
        }
    }

    fn check_values(&self, props: &Properties, bad: &mut BTreeMap<String, String>) {
        for (k, v) in props {
            if v.is_null() {
                continue;
            }
            match self.properties.get(k) {
                Some(spec) => {
                    if let Err(e) = check_spec(spec, v) {
                        bad.insert(k.clone(), e);
                    }
                }
                None if !self.additional_properties => {
                    bad.insert(
                        k.clone(),
                        "not declared by the model (additional_properties is false)".into(),
                    );
                }
                None => {}
            }
        }
    }
}

fn type_check(ty: PropType, v: &Value) -> Result<(), String> {
    let ok = match ty {
        PropType::Number => v.is_number(),
        PropType::Integer => v.is_i64() || v.is_u64(),
        PropType::Boolean => v.is_boolean(),
        PropType::String => v.is_string(),
        PropType::Object => v.is_object(),
        PropType::Array => v.is_array(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("expected {}, got {}", type_name(ty), json_kind(v)))
    }
}

fn check_spec(spec: &PropertySpec, v: &Value) -> Result<(), String> {
    type_check(spec.ty, v)?;
    if let Some(x) = v.as_f64() {
        if let Some(lo) = spec.min {
            if x < lo {
                return Err(format!("{x} is below the minimum {lo}"));
            }
        }
        if let Some(hi) = spec.max {
            if x > hi {
                return Err(format!("{x} is above the maximum {hi}"));
            }
        }
    }
    if let Some(allowed) = &spec.allowed {
        if !allowed.contains(v) {
            let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
            return Err(format!("{v} is not one of {}", list.join(", ")));
        }
    }
    Ok(())
}

fn type_name(t: PropType) -> &'static str {
    match t {
        PropType::Number => "number",
        PropType::Integer => "integer",
        PropType::Boolean => "boolean",
        PropType::String => "string",
        PropType::Object => "object",
        PropType::Array => "array",
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn machine() -> Model {
        serde_json::from_value(json!({
            "properties": {
                "temperature": {"type": "number", "unit": "degF", "min": -40, "max": 500},
                "status": {"type": "string", "enum": ["operational", "maintenance", "fault"]}
            },
            "required": ["status"],
            "additional_properties": false
        }))
        .unwrap()
    }

    fn props(v: Value) -> Properties {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn names_every_failing_property() {
        let err = machine()
            .validate_new(&props(json!({"temperature": 900, "extra": 1})))
            .unwrap_err();
        let RegistryError::Validation(d) = err else {
            panic!("{err:?}")
        };
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d["temperature"].contains("above the maximum"));
        assert!(d["status"].contains("missing"));
        assert!(d["extra"].contains("not declared"));
    }

    #[test]
    fn patch_cannot_remove_required_or_break_enum() {
        let m = machine();
        assert!(m
            .validate_patch(&props(json!({"temperature": 70.5})))
            .is_ok());
        let RegistryError::Validation(d) = m
            .validate_patch(&props(json!({"status": null, "temperature": "hot"})))
            .unwrap_err()
        else {
            panic!()
        };
        assert!(d["status"].contains("cannot be removed"));
        assert!(d["temperature"].contains("expected number, got string"));
        assert!(m
            .validate_patch(&props(json!({"status": "broken"})))
            .is_err());
    }

    #[test]
    fn rejects_nonsense_models() {
        let m: Model = serde_json::from_value(json!({
            "properties": {"t": {"type": "string", "min": 1}, "n": {"type": "number", "min": 5, "max": 1}},
            "conflict": {"strategy": "merge"}
        }))
        .unwrap();
        let RegistryError::Validation(d) = m.check().unwrap_err() else {
            panic!()
        };
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(d["conflict.sha256"].contains("sha256"), "{d:?}");
    }
}
