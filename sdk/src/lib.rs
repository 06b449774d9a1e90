//! `twinhost-sdk`: write twinhost guest components in Rust with plain types.
//!
//! A compute function implements [`Compute`] and exports it with [`export_compute!`]:
//!
//! ```ignore
//! use twinhost_sdk::{Compute, Twin, Value};
//!
//! struct Average;
//!
//! impl Compute for Average {
//!     fn run(twins: Vec<Twin>, parameters: Value) -> Result<Value, String> {
//!         let temps: Vec<f64> = twins.iter().filter_map(|t| t.number("temperature")).collect();
//!         Ok(serde_json::json!({ "avg": temps.iter().sum::<f64>() / temps.len() as f64 }))
//!     }
//! }
//!
//! twinhost_sdk::export_compute!(Average);
//! ```
//!
//! A behavior implements [`Behavior`] (one event in, actions out) and exports it with
//! [`export_behavior!`]; a conflict resolver implements [`Resolver`] and exports it with
//! [`export_resolver!`]. One component exports one world.
//!
//! Build with `cargo build --release --target wasm32-wasip2` and upload the `.wasm` with
//! `twinhost module put NAME FILE`. The WIT bindings stay in [`bindings`]; a guest never needs
//! them. The host interface is re-exported as plain functions: [`log`], [`get_twin`],
//! [`query_twins`], [`now_ms`], [`emit_alert`] (resolvers get none of them: they must answer
//! from their arguments alone).
//!
//! The SDK refuses instead of guessing: a patch that is not a JSON object, or a twin the host
//! sent that does not parse, is an [`Error`] the guest sees, never an empty value.

#![deny(missing_docs)]

pub use serde_json::{self, Map, Value};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "compute",
        pub_export_macro: true,
        export_macro_name: "__export_compute_world",
        default_bindings_module: "twinhost_sdk::bindings",
    });
}

/// Bindings of the `behavior` world (sharing the `compute` bindings' types and host).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)] // generated lifting code
pub mod behavior_bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "behavior",
        pub_export_macro: true,
        export_macro_name: "__export_behavior_world",
        default_bindings_module: "twinhost_sdk::behavior_bindings",
        with: {
            "twinhost:platform/types@0.1.0": crate::bindings::twinhost::platform::types,
            "twinhost:platform/host@0.1.0": crate::bindings::twinhost::platform::host,
        },
    });
}

/// Bindings of the `resolver` world.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)] // generated lifting code
pub mod resolver_bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "resolver",
        pub_export_macro: true,
        export_macro_name: "__export_resolver_world",
        default_bindings_module: "twinhost_sdk::resolver_bindings",
        with: {
            "twinhost:platform/types@0.1.0": crate::bindings::twinhost::platform::types,
        },
    });
}

use bindings::twinhost::platform::{host, types};

/// What the SDK refuses. Converts into the `String` error of [`Compute::run`],
/// [`Behavior::on_event`] and [`Resolver::resolve`], so `?` passes it on to the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// A value that must be a JSON object is not (`what` names it, e.g. "patch properties").
    NotAnObject {
        /// The value's role.
        what: String,
        /// Its JSON type (`array`, `string`, …).
        found: &'static str,
    },
    /// A twin from the host whose properties do not parse as a JSON object.
    BadTwin {
        /// The twin's id.
        id: String,
        /// What is wrong with its properties.
        reason: String,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NotAnObject { what, found } => {
                write!(f, "{what} must be a JSON object, got {found}")
            }
            Error::BadTwin { id, reason } => {
                write!(f, "twin {id} from the host does not parse: {reason}")
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<Error> for String {
    fn from(e: Error) -> String {
        e.to_string()
    }
}

/// The JSON type of a value, for error messages.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A twin as a guest sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Twin {
    /// The twin's id (a UUID).
    pub id: String,
    /// Its entity type, e.g. `machine`.
    pub entity_type: String,
    /// Its properties.
    pub properties: Map<String, Value>,
    /// Its version: 1 at creation, one more at each change.
    pub version: u64,
    /// The parent twin's id, if it has a parent.
    pub parent_id: Option<String>,
}

impl Twin {
    /// A numeric property.
    pub fn number(&self, name: &str) -> Option<f64> {
        self.properties.get(name).and_then(Value::as_f64)
    }

    fn from_wit(t: types::Twin) -> Result<Twin, Error> {
        let bad = |reason: String| Error::BadTwin {
            id: t.id.clone(),
            reason,
        };
        let properties = match serde_json::from_str(&t.properties) {
            Ok(Value::Object(m)) => m,
            Ok(v) => {
                return Err(bad(format!(
                    "properties are a JSON {}, not an object",
                    json_type(&v)
                )))
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        Ok(Twin {
            id: t.id,
            entity_type: t.entity_type,
            properties,
            version: t.version,
            parent_id: t.parent_id,
        })
    }
}

/// A compute function: twins and parameters in, a JSON value (or an error message) out.
pub trait Compute {
    /// Compute over `twins` (one per call when invoked through `POST /v1/modules/{name}/invoke`)
    /// with the request's `parameters` (`{}` when none were given). An `Err` is reported as
    /// this twin's error.
    fn run(twins: Vec<Twin>, parameters: Value) -> Result<Value, String>;
}

/// One change of one twin, as a behavior receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Position in the node's event log.
    pub seq: u64,
    /// `twin.created`, `twin.updated`, `twin.deleted`, `twin.lifecycle`, or `tick` (a binding with
    /// `every`: the periodic call, `seq` 0 and `changed` empty).
    pub kind: String,
    /// The twin after the change.
    pub twin: Twin,
    /// The merge patch the change applied.
    pub changed: Map<String, Value>,
    /// Event time in milliseconds since the Unix epoch.
    pub ts_ms: u64,
}

impl Event {
    /// A number the change set (not the twin's whole state).
    pub fn changed_number(&self, name: &str) -> Option<f64> {
        self.changed.get(name).and_then(Value::as_f64)
    }
}

/// What a behavior asks the host to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Merge-patch a twin's properties (RFC 7396: `null` removes a property).
    Patch {
        /// The twin to patch; `None` is the event's twin.
        twin_id: Option<String>,
        /// The merge patch.
        properties: Map<String, Value>,
    },
    /// Raise an alert.
    Alert {
        /// `info`, `warning` or `critical`.
        severity: String,
        /// A sentence for people.
        message: String,
        /// Details for programs (any JSON).
        data: Value,
    },
}

impl Action {
    /// An alert with details.
    pub fn alert(severity: &str, message: impl Into<String>, data: Value) -> Action {
        Action::Alert {
            severity: severity.to_owned(),
            message: message.into(),
            data,
        }
    }

    /// A merge patch of the event's twin, e.g. `Action::patch(json!({"overheated": true}))?`.
    /// Anything but a JSON object is an [`Error::NotAnObject`] (a patch of `[]` or `5` has no
    /// meaning; it is not turned into an empty patch). To patch another twin, build
    /// [`Action::Patch`] with its `twin_id`.
    pub fn patch(properties: Value) -> Result<Action, Error> {
        match properties {
            Value::Object(m) => Ok(Action::Patch {
                twin_id: None,
                properties: m,
            }),
            v => Err(Error::NotAnObject {
                what: "patch properties".into(),
                found: json_type(&v),
            }),
        }
    }
}

/// A behavior: runs on each event of the twins it is bound to.
pub trait Behavior {
    /// Handle one event; the actions run in order after the call returns. An `Err` is
    /// counted as the behavior's error and its actions are dropped.
    fn on_event(event: Event) -> Result<Vec<Action>, String>;
}

/// One side of a conflicting write, for a [`Resolver`].
#[derive(Clone, Debug, PartialEq)]
pub struct Side {
    /// The value written (`Value::Null` when the property was removed).
    pub value: Value,
    /// Hybrid logical clock of the write.
    pub hlc: u64,
    /// Node id that made the write.
    pub origin: String,
}

/// A conflict resolver: merges two concurrent writes of one property. `a` is the side with
/// the lower `(hlc, origin)`. It must be deterministic.
pub trait Resolver {
    /// The merged value of `property` (`Value::Null` removes it).
    fn resolve(property: &str, a: Side, b: Side) -> Result<Value, String>;
}

/// Severity of a [`log`] line.
pub use host::Level;

/// Write a line to the host's log.
pub fn log(level: Level, message: &str) {
    host::log(level, message)
}

/// Read one twin by id: `Ok(None)` when it does not exist, an [`Error::BadTwin`] when the
/// host's answer does not parse (not an absent twin, and not an empty one).
pub fn get_twin(id: &str) -> Result<Option<Twin>, Error> {
    host::get_twin(id).map(Twin::from_wit).transpose()
}

/// Run a query (the body of `POST /v1/query`); one page of twins.
pub fn query_twins(query: &Value) -> Result<Vec<Twin>, String> {
    host::query_twins(&query.to_string())?
        .into_iter()
        .map(|t| Twin::from_wit(t).map_err(String::from))
        .collect()
}

/// Milliseconds since the Unix epoch, from the host's clock.
pub fn now_ms() -> u64 {
    host::now_ms()
}

/// Raise an alert now (an `alert` event tagged with the module).
pub fn emit_alert(severity: &str, message: &str, data: &Value) {
    host::emit_alert(&types::Alert {
        severity: severity.to_owned(),
        message: message.to_owned(),
        data: data.to_string(),
    })
}

fn object(what: &str, text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(format!("{what} is not a JSON object")),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

#[doc(hidden)]
pub fn __on_event<B: Behavior>(e: types::Event) -> Result<Vec<types::Action>, String> {
    let event = Event {
        seq: e.seq,
        kind: e.kind,
        twin: Twin::from_wit(e.twin)?,
        changed: object("changed", &e.changed)?,
        ts_ms: e.ts_ms,
    };
    Ok(B::on_event(event)?
        .into_iter()
        .map(|a| match a {
            Action::Patch {
                twin_id,
                properties,
            } => types::Action::Patch(types::Patch {
                twin_id,
                properties: Value::Object(properties).to_string(),
            }),
            Action::Alert {
                severity,
                message,
                data,
            } => types::Action::Alert(types::Alert {
                severity,
                message,
                data: data.to_string(),
            }),
        })
        .collect())
}

#[doc(hidden)]
pub fn __resolve<R: Resolver>(
    property: String,
    a: types::Side,
    b: types::Side,
) -> Result<String, String> {
    let side = |s: types::Side| -> Result<Side, String> {
        Ok(Side {
            value: serde_json::from_str(&s.value).map_err(|e| format!("value: {e}"))?,
            hlc: s.hlc,
            origin: s.origin,
        })
    };
    R::resolve(&property, side(a)?, side(b)?).map(|v| v.to_string())
}

#[doc(hidden)]
pub fn __run_compute<C: Compute>(
    twins: Vec<types::Twin>,
    parameters: String,
) -> Result<String, String> {
    let twins = twins
        .into_iter()
        .map(Twin::from_wit)
        .collect::<Result<Vec<_>, _>>()?;
    let parameters: Value =
        serde_json::from_str(&parameters).map_err(|e| format!("parameters: {e}"))?;
    C::run(twins, parameters).map(|v| v.to_string())
}

/// Export a [`Compute`] implementation as the component's `compute` world.
#[macro_export]
macro_rules! export_compute {
    ($t:ty) => {
        const _: () = {
            struct __TwinhostCompute;
            impl $crate::bindings::Guest for __TwinhostCompute {
                fn run(
                    twins: ::std::vec::Vec<$crate::bindings::twinhost::platform::types::Twin>,
                    parameters: ::std::string::String,
                ) -> ::std::result::Result<::std::string::String, ::std::string::String> {
                    $crate::__run_compute::<$t>(twins, parameters)
                }
            }
            $crate::bindings::__export_compute_world!(__TwinhostCompute with_types_in $crate::bindings);
        };
    };
}

/// Export a [`Behavior`] implementation as the component's `behavior` world.
#[macro_export]
macro_rules! export_behavior {
    ($t:ty) => {
        const _: () = {
            struct __TwinhostBehavior;
            impl $crate::behavior_bindings::Guest for __TwinhostBehavior {
                fn on_event(
                    event: $crate::bindings::twinhost::platform::types::Event,
                ) -> ::std::result::Result<
                    ::std::vec::Vec<$crate::bindings::twinhost::platform::types::Action>,
                    ::std::string::String,
                > {
                    $crate::__on_event::<$t>(event)
                }
            }
            $crate::behavior_bindings::__export_behavior_world!(__TwinhostBehavior with_types_in $crate::behavior_bindings);
        };
    };
}

/// Export a [`Resolver`] implementation as the component's `resolver` world.
#[macro_export]
macro_rules! export_resolver {
    ($t:ty) => {
        const _: () = {
            struct __TwinhostResolver;
            impl $crate::resolver_bindings::Guest for __TwinhostResolver {
                fn resolve(
                    property: ::std::string::String,
                    a: $crate::bindings::twinhost::platform::types::Side,
                    b: $crate::bindings::twinhost::platform::types::Side,
                ) -> ::std::result::Result<::std::string::String, ::std::string::String> {
                    $crate::__resolve::<$t>(property, a, b)
                }
            }
            $crate::resolver_bindings::__export_resolver_world!(__TwinhostResolver with_types_in $crate::resolver_bindings);
        };
    };
}

// Runs on the host target too (`cargo test --manifest-path sdk/Cargo.toml`): the bindings
// compile there, and only calling an import (a host function) would fail.
#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wit_twin(properties: &str) -> types::Twin {
        types::Twin {
            id: "0193e0a0-0000-7000-8000-000000000000".into(),
            entity_type: "machine".into(),
            properties: properties.into(),
            version: 3,
            parent_id: None,
        }
    }

    #[test]
    fn patch_takes_an_object_and_refuses_anything_else() {
        let a = Action::patch(json!({"overheated": true})).unwrap();
        assert_eq!(
            a,
            Action::Patch {
                twin_id: None,
                properties: json!({"overheated": true}).as_object().unwrap().clone(),
            }
        );
        for (v, found) in [
            (json!([1]), "array"),
            (json!(5), "number"),
            (json!(null), "null"),
            (json!("x"), "string"),
        ] {
            let e = Action::patch(v).unwrap_err();
            assert_eq!(
                e,
                Error::NotAnObject {
                    what: "patch properties".into(),
                    found
                }
            );
            // What the host records as the behavior's error.
            let s: String = e.into();
            assert_eq!(
                s,
                format!("patch properties must be a JSON object, got {found}")
            );
        }
    }

    #[test]
    fn a_twin_that_does_not_parse_is_an_error_not_an_empty_twin() {
        let t = Twin::from_wit(wit_twin(r#"{"temperature": 70}"#)).unwrap();
        assert_eq!(t.number("temperature"), Some(70.0));
        assert_eq!(t.version, 3);
        for bad in ["{", "[]", "7", ""] {
            match Twin::from_wit(wit_twin(bad)) {
                Err(Error::BadTwin { id, .. }) => {
                    assert_eq!(id, "0193e0a0-0000-7000-8000-000000000000")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_behavior_sees_a_bad_patch_as_its_error() {
        struct Patcher;
        impl Behavior for Patcher {
            fn on_event(e: Event) -> Result<Vec<Action>, String> {
                Ok(vec![Action::patch(e.changed["patch"].clone())?])
            }
        }
        let event = |changed: Value| types::Event {
            seq: 1,
            kind: "twin.updated".into(),
            twin: wit_twin("{}"),
            changed: changed.to_string(),
            ts_ms: 0,
        };
        let ok = __on_event::<Patcher>(event(json!({"patch": {"a": 1}}))).unwrap();
        assert_eq!(ok.len(), 1);
        let err = __on_event::<Patcher>(event(json!({"patch": [1]}))).unwrap_err();
        assert_eq!(err, "patch properties must be a JSON object, got array");
        let err = __on_event::<Patcher>(types::Event {
            twin: wit_twin("not json"),
            ..event(json!({}))
        })
        .unwrap_err();
        assert!(err.starts_with("twin 0193e0a0"), "{err}");
    }
}
