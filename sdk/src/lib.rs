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
//! Build with `cargo build --release --target wasm32-wasip2` and upload the `.wasm` with
//! `twinhost module put NAME FILE`. The WIT bindings stay in [`bindings`]; a guest never needs
//! them. The host interface is re-exported as plain functions: [`log`], [`get_twin`],
//! [`query_twins`], [`now_ms`].

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
