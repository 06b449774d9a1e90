//! The `merge` conflict strategy's resolver calls: a resolver component from the WASM
//! runtime, run on the compute pool (never on the writer thread), only when the module here
//! is the code the model pins (its sha256), so every node that merges computes the same.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use crate::registry::conflict::{fold, ResolveRequest};
use crate::types::Sibling;
use crate::wasm::{Caller, ComputePool, Runtime, Write};

/// A sibling as the resolver sees one side.
pub fn write(s: &Sibling) -> Write {
    Write {
        value: s.value.clone(),
        hlc: s.clock.hlc,
        origin: s.clock.origin.to_string(),
    }
}

/// Answers a resolver call: the merged value, or why there is none.
pub type Resolver = Arc<
    dyn Fn(ResolveRequest) -> Pin<Box<dyn Future<Output = Result<Value, String>> + Send>>
        + Send
        + Sync,
>;

/// A resolver for nodes that run none (tests, tools): every call fails, so such conflicts
/// show the lww winner and stay listed.
pub fn none() -> Resolver {
    Arc::new(|req: ResolveRequest| {
        Box::pin(async move { Err(format!("no resolver runs here for {}", req.module)) })
    })
}

/// Resolver calls made by `runtime`, each holding one of the compute pool's `slots`.
pub fn wasm(runtime: Arc<Runtime>, slots: ComputePool) -> Resolver {
    Arc::new(move |req: ResolveRequest| {
        let (rt, slots) = (Arc::clone(&runtime), slots.clone());
        Box::pin(async move {
            let out = call(rt, slots, &req).await;
            if let Err(e) = &out {
                metrics::counter!("twinhost_resolver_failures_total").increment(1);
                tracing::warn!(module = %req.module, twin_id = %req.twin_id, property = %req.property, error = %e, "resolver call failed");
            }
            out
        })
    })
}

async fn call(rt: Arc<Runtime>, slots: ComputePool, req: &ResolveRequest) -> Result<Value, String> {
    let info = rt
        .info(&req.module)
        .map_err(|e| format!("resolver module {:?}: {e}", req.module))?;
    let active = info
        .versions
        .iter()
        .find(|v| v.version == info.active)
        .map(|v| v.sha256.clone())
        .unwrap_or_default();
    if let Some(pin) = &req.sha256 {
        if !active.eq_ignore_ascii_case(pin) {
            return Err(format!(
                "resolver module {:?} here is sha256 {active}; the model pins {pin}",
                req.module
            ));
        }
    }
    let permit = slots
        .acquire(&Caller::Resolver)
        .await
        .map_err(|busy| format!("busy: {busy}"))?;
    let (module, property, sides) = (req.module.clone(), req.property.clone(), req.sides.clone());
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        fold(&sides, |a, b| {
            rt.call_resolver(&module, &property, &write(a), &write(b))
                .map_err(|e| e.to_string())
        })
    })
    .await
    .map_err(|e| format!("resolver task: {e}"))?
}
