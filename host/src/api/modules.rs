//! `/v1/modules`: upload, list, rollback, delete and invoke WebAssembly components.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::extract::{Json, Path, Query, RawBody};
use super::{ApiError, AppState};
use crate::registry::Query as TwinQuery;
use crate::types::TwinId;
use crate::wasm::{
    CallError, Caller, LimitError, Limits, ModuleInfo, VersionInfo, World, Write, MAX_FUEL,
    MAX_MEMORY_BYTES, MAX_TIMEOUT,
};

/// Most twins one invocation may name.
pub const MAX_INVOKE_TWINS: usize = 10_000;
/// Wall-clock budget of one invoke request over all its twins; twins it leaves get the error
/// `request_deadline`.
pub const INVOKE_BUDGET: Duration = Duration::from_secs(60);

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Invalid(m) => ApiError::Validation(m.clone(), json!({"module": m})),
            // In the words of the upload's query parameters.
            CallError::Limits(l) => {
                let m = match l {
                    LimitError::Fuel => format!("fuel must be between 1 and {MAX_FUEL}"),
                    LimitError::Memory => {
                        format!("memory_mb must be between 1 and {}", MAX_MEMORY_BYTES >> 20)
                    }
                    LimitError::Deadline => format!(
                        "timeout must be between 1 ms and {} s",
                        MAX_TIMEOUT.as_secs()
                    ),
                };
                ApiError::Validation(m.clone(), json!({"module": m}))
            }
            CallError::NotFound(_) | CallError::NoVersion(..) => ApiError::NotFound(e.to_string()),
            CallError::InUse(m) => ApiError::Conflict(format!("{m}, or pass ?force=true")),
            CallError::Guest { .. } => ApiError::Validation(e.to_string(), json!({})),
            // The server is stopping: not a load to retry against here.
            CallError::Busy(crate::wasm::pool::Busy::Stopped) => {
                ApiError::Unavailable("the server is stopping".into())
            }
            CallError::Busy(b) => {
                ApiError::Overloaded(format!("busy: {b}; retry after the Retry-After delay"))
            }
            CallError::Store(s) => s.into(),
            CallError::Internal(m) => ApiError::Internal(m),
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LimitParams {
    /// Fuel per call (default 1e9).
    #[param(minimum = 1, maximum = 100_000_000_000_u64)]
    fuel: Option<u64>,
    /// Memory per instance in MiB (default 64).
    #[param(minimum = 1, maximum = 512)]
    memory_mb: Option<u64>,
    /// Wall-clock deadline per call, e.g. `500ms`, `2s` (default 2s): from 1 ms to 30 s.
    #[param(pattern = r"^\s*([0-9]+\s*[a-zA-Z]+\s*)+$", example = "2s")]
    timeout: Option<String>,
    /// Accept a component of another world even while behaviors or rules use the module.
    #[serde(default)]
    force: bool,
}

/// Upload a component and make it the active version.
#[utoipa::path(put, path = "/v1/modules/{name}", tag = "modules", params(("name" = String, Path), LimitParams),
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses((status = 201, body = VersionInfo), (status = 409, description = "another world while behaviors or rules use the module", body = ErrorBody),
        (status = 422, description = "not a component, unknown world, missing exports, bad limits", body = ErrorBody)))]
pub async fn put(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<LimitParams>,
    RawBody(body): RawBody,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let d = Limits::default();
    let timeout_ms = match p.timeout.as_deref() {
        None => d.timeout_ms,
        Some(t) => humantime::parse_duration(t)
            .map_err(|e| ApiError::BadRequest(format!("timeout {t:?}: {e}")))?
            .as_millis() as u64,
    };
    let limits = Limits {
        fuel: p.fuel.unwrap_or(d.fuel),
        memory_bytes: p
            .memory_mb
            .map(|m| m.saturating_mul(1 << 20))
            .unwrap_or(d.memory_bytes),
        timeout_ms,
    };
    let info = s
        .runtime
        .upload(&name, Vec::from(body), limits, p.force)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(
            json!({"name": name, "version": info.version, "world": info.world,
                          "sha256": info.sha256, "size": info.size, "limits": info.limits}),
        ),
    ))
}

#[utoipa::path(get, path = "/v1/modules", tag = "modules", responses((status = 200, body = Vec<ModuleInfo>)))]
pub async fn list(State(s): State<AppState>) -> axum::Json<Vec<ModuleInfo>> {
    axum::Json(s.runtime.list())
}

#[utoipa::path(get, path = "/v1/modules/{name}", tag = "modules", params(("name" = String, Path)),
    responses((status = 200, body = ModuleInfo), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<axum::Json<ModuleInfo>, ApiError> {
    Ok(axum::Json(s.runtime.info(&name)?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// A version `GET /v1/modules/{name}` lists (they count from 1).
    #[schema(minimum = 1)]
    version: u32,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ForceParams {
    /// Go ahead even while behaviors or rules use the module.
    #[serde(default)]
    force: bool,
}

#[utoipa::path(post, path = "/v1/modules/{name}/rollback", tag = "modules", params(("name" = String, Path), ForceParams), request_body = RollbackBody,
    responses((status = 200, body = VersionInfo), (status = 404, body = ErrorBody),
        (status = 409, description = "a version of another world while behaviors or rules use the module", body = ErrorBody)))]
pub async fn rollback(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<ForceParams>,
    Json(b): Json<RollbackBody>,
) -> Result<axum::Json<VersionInfo>, ApiError> {
    let info = s.runtime.rollback(&name, b.version, p.force).await?;
    Ok(axum::Json(info))
}

/// Delete a module. Refused with 409 while a behavior or rule uses it, unless `force=true`.
#[utoipa::path(delete, path = "/v1/modules/{name}", tag = "modules", params(("name" = String, Path), ForceParams),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<ForceParams>,
) -> Result<StatusCode, ApiError> {
    s.runtime.delete(&name, p.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvokeBody {
    /// Twins to compute over, one call each.
    #[serde(default)]
    twin_ids: Option<Vec<TwinId>>,
    /// Or a query (as `POST /v1/query`; one page).
    #[serde(default)]
    query: Option<TwinQuery>,
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: Value,
    /// For a `resolver` module instead: the conflict to merge.
    #[serde(default)]
    resolve: Option<ResolveBody>,
}

/// A conflict for a resolver module: a property and the two writes.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    property: String,
    a: SideBody,
    b: SideBody,
}

/// One write of a conflicting property.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SideBody {
    #[schema(value_type = Object)]
    value: Value,
    #[serde(default)]
    hlc: u64,
    #[serde(default)]
    origin: String,
}

/// Invoke a compute module once per twin; each twin gets its result or its own error.
#[utoipa::path(post, path = "/v1/modules/{name}/invoke", tag = "modules", params(("name" = String, Path)), request_body = InvokeBody,
    responses((status = 200, description = "`{\"results\": {\"<twin id>\": <json> | {\"error\": {…}}}}`"), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn invoke(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(b): Json<InvokeBody>,
) -> Result<axum::Json<Value>, ApiError> {
    let world = s
        .runtime
        .world_of(&name)
        .ok_or_else(|| CallError::NotFound(name.clone()))?;
    let (wanted, call) = if b.resolve.is_some() {
        (World::Resolver, "{\"resolve\": …}")
    } else {
        (World::Compute, "invoke with twins")
    };
    if world != wanted {
        return Err(ApiError::Validation(
            format!("module {name:?} is a {world} module; {call} calls a {wanted} module"),
            json!({"module": name, "world": world}),
        ));
    }
    match b.resolve {
        Some(r) => resolve(&s, name, r).await,
        None => compute(&s, name, b.twin_ids, b.query, b.parameters).await,
    }
}

/// `{"resolve": …}`: one resolver call.
async fn resolve(
    s: &AppState,
    name: String,
    r: ResolveBody,
) -> Result<axum::Json<Value>, ApiError> {
    let write = |side: SideBody| Write {
        value: side.value,
        hlc: side.hlc,
        origin: side.origin,
    };
    let (a, b) = (write(r.a), write(r.b));
    let merged = s
        .runtime
        .on_pool(&Caller::Invoke, move |rt| {
            rt.call_resolver(&name, &r.property, &a, &b)
        })
        .await;
    Ok(axum::Json(match merged {
        Ok(v) => json!({ "result": v }),
        Err(CallError::Guest { kind, message }) => {
            json!({"error": {"code": kind, "message": message}})
        }
        Err(e) => return Err(e.into()),
    }))
}

/// Invoke with `twin_ids` or a `query`: one compute call per twin.
async fn compute(
    s: &AppState,
    name: String,
    twin_ids: Option<Vec<TwinId>>,
    query: Option<TwinQuery>,
    parameters: Value,
) -> Result<axum::Json<Value>, ApiError> {
    let twins = match (twin_ids, query) {
        (Some(ids), None) => {
            if ids.len() > MAX_INVOKE_TWINS {
                return Err(ApiError::BadRequest(format!(
                    "at most {MAX_INVOKE_TWINS} twin_ids"
                )));
            }
            ids.iter()
                .map(|id| s.registry.get(id))
                .collect::<Result<Vec<_>, _>>()?
        }
        (None, Some(q)) => s.registry.query(&q)?.twins(),
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of twin_ids or query".into(),
            ))
        }
    };
    let parameters = if parameters.is_null() {
        json!({})
    } else {
        parameters
    };
    // Cancelled when the client goes away (this future is dropped): the guest call in flight
    // stops and the remaining twins are skipped.
    let gone = tokio_util::sync::CancellationToken::new();
    let _on_drop = gone.clone().drop_guard();
    let results = s
        .runtime
        .compute_each(
            &Caller::Invoke,
            &name,
            twins,
            parameters,
            INVOKE_BUDGET,
            gone,
        )
        .await?;
    // `None` only when the client is gone: nobody reads this answer.
    let results: BTreeMap<String, Value> = results
        .unwrap_or_default()
        .into_iter()
        .map(|(id, r)| {
            let v = r.unwrap_or_else(|f| json!({"error": {"code": f.kind, "message": f.message}}));
            (id.to_string(), v)
        })
        .collect();
    Ok(axum::Json(json!({ "results": results })))
}
