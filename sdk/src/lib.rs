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

/// A twin as a guest sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Twin {
    pub id: String,
    pub entity_type: String,
    pub properties: Map<String, Value>,
    pub version: u64,
    pub parent_id: Option<String>,
}

impl Twin {
    /// A numeric property.
    pub fn number(&self, name: &str) -> Option<f64> {
        self.properties.get(name).and_then(Value::as_f64)
    }

    fn from_wit(t: types::Twin) -> Result<Twin, String> {
        let properties = match serde_json::from_str(&t.properties) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(format!("twin {}: properties are not an object", t.id)),
            Err(e) => return Err(format!("twin {}: {e}", t.id)),
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
    fn run(twins: Vec<Twin>, parameters: Value) -> Result<Value, String>;
}

/// One change of one twin, as a behavior receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Position in the node's event log.
    pub seq: u64,
    /// `twin.created`, `twin.updated`, `twin.deleted` or `twin.lifecycle`.
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
    /// Merge-patch a twin's properties (`twin_id: None` = the event's twin).
    Patch {
        twin_id: Option<String>,
        properties: Map<String, Value>,
    },
    /// Raise an alert (`severity`: info, warning or critical).
    Alert {
        severity: String,
        message: String,
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

    /// A patch of the event's twin; `properties` must be a JSON object.
    pub fn patch(properties: Value) -> Action {
        Action::Patch {
            twin_id: None,
            properties: match properties {
                Value::Object(m) => m,
                _ => Map::new(),
            },
        }
    }
}

/// A behavior: runs on each event of the twins it is bound to.
pub trait Behavior {
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
    fn resolve(property: &str, a: Side, b: Side) -> Result<Value, String>;
}

/// Severity of a [`log`] line.
pub use host::Level;

/// Write a line to the host's log.
pub fn log(level: Level, message: &str) {
    host::log(level, message)
}

/// Read one twin by id.
pub fn get_twin(id: &str) -> Option<Twin> {
    host::get_twin(id).and_then(|t| Twin::from_wit(t).ok())
}

/// Run a query (the body of `POST /v1/query`); one page of twins.
pub fn query_twins(query: &Value) -> Result<Vec<Twin>, String> {
    host::query_twins(&query.to_string())?
        .into_iter()
        .map(Twin::from_wit)
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
