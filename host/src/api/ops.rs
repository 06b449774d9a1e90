//! Operations: health, Prometheus metrics, the JSON metrics of API.md, the OpenAPI
//! document, and token creation.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{OpenApi, ToSchema};

mod doc;

use super::extract::Json;
use super::{ApiError, AppState};
use crate::types::Role;

/// `{"status": "ok"}`, or 503 `{"status": "failing", "reason": …}` once the store refuses
/// writes after a failed write of its log (restart the server once the disk is fixed).
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()), responses(
    (status = 200, description = "`{\"status\": \"ok\"}`"),
    (status = 503, description = "`{\"status\": \"failing\", \"reason\": \"…\"}`: the store refuses writes")))]
pub async fn healthz(State(s): State<AppState>) -> (StatusCode, axum::Json<Value>) {
    match s.store.poisoned() {
        None => (StatusCode::OK, axum::Json(json!({"status": "ok"}))),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "failing", "reason": reason})),
        ),
    }
}

/// Record request counts and latency per route for `/metrics`, and log internal errors.
pub async fn count_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    if let Some(super::error::InternalError(m)) = resp.extensions().get() {
        tracing::error!(%method, %route, message = %m, "internal error");
    }
    let status = resp.status().as_u16().to_string();
    metrics::counter!("twinhost_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("twinhost_http_request_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}

fn refresh_gauges(s: &AppState) {
    metrics::gauge!("twinhost_active_twins").set(s.registry.twin_count() as f64);
    metrics::gauge!("twinhost_commit_queue_depth").set(s.registry.queue_depth() as f64);
    let c = s.registry.commit_stats();
    metrics::gauge!("twinhost_commits").set(c.commits.load(Ordering::Relaxed) as f64);
    metrics::gauge!("twinhost_history_points_written").set(c.points.load(Ordering::Relaxed) as f64);
    // Node-wide since start; the counters of the ratio are `twinhost_sync_changes_covered_total`
    // over `twinhost_sync_ops_total{direction="out"}`.
    metrics::gauge!("twinhost_sync_coalescing_ratio").set(s.sync.coalescing_ratio());
    metrics::gauge!("twinhost_sync_conflicts_open").set(s.registry.open_conflict_twins() as f64);
    s.runtime.pool().stats().record_gauges();
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub async fn metrics_prometheus(State(s): State<AppState>) -> impl IntoResponse {
    refresh_gauges(&s);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.prometheus.render(),
    )
}

/// The metrics of API.md as JSON.
#[utoipa::path(get, path = "/v1/metrics", tag = "operations", responses((status = 200, description = "active_twins, sync_operations, compute_operations, queue_depth, avg_sync_latency_ms, active_subscriptions, …")))]
pub async fn metrics_json(State(s): State<AppState>) -> axum::Json<Value> {
    let c = s.registry.commit_stats();
    let commits = c.commits.load(Ordering::Relaxed);
    let requests = c.jobs.load(Ordering::Relaxed);
    let checkpoints = c.checkpoints.load(Ordering::Relaxed);
    let micros = c.commit_micros.load(Ordering::Relaxed);
    let per = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    axum::Json(json!({
        "node_id": s.registry.node_id(),
        "active_twins": s.registry.twin_count(),
        // Changes received from peers (`serve --peer`), and those that changed something.
        "sync_operations": s.sync.received.load(Ordering::Relaxed),
        "sync_applied": s.sync.applied.load(Ordering::Relaxed),
        "sync_errors": s.sync.errors.load(Ordering::Relaxed),
        "sync_repaired": s.sync.repaired.load(Ordering::Relaxed),
        // Bytes of link messages each way, as they travel (bulk messages compressed).
        "sync_bytes_in": s.sync.bytes_in.load(Ordering::Relaxed),
        "sync_bytes_out": s.sync.bytes_out.load(Ordering::Relaxed),
        // Feed entries sent to peers, the change numbers they covered, and the ratio: how
        // many updates one entry carried.
        "sync_entries_sent": s.sync.entries_sent.load(Ordering::Relaxed),
        "sync_changes_covered": s.sync.changes_covered.load(Ordering::Relaxed),
        "sync_coalescing_ratio": s.sync.coalescing_ratio(),
        "compute_operations": s.runtime.stats.calls.load(Ordering::Relaxed),
        // Slots, slots in use, calls waiting and callers turned away as busy, in all and
        // per class (`invoke`, `behavior`, `rule`, `resolver`) with their mean wait.
        "compute_pool": s.runtime.pool().stats(),
        "modules": s.runtime.module_count(),
        "modules_compiled": s.runtime.stats.compiled.load(Ordering::Relaxed),
        "modules_loaded_from_cache": s.runtime.stats.loaded_from_cache.load(Ordering::Relaxed),
        "avg_sync_latency_ms": 0.0,
        "queue_depth": s.registry.queue_depth(),
        "active_subscriptions": s.events.subscriber_count(),
        "events_appended": s.events.appended(),
        "alerts_dropped": s.events.alerts_dropped(),
        "remote_model_mismatches": s.registry.remote_model_mismatches(),
        "conflicted_twins": s.registry.open_conflict_twins(),
        "event_next_seq": s.events.next_seq(),
        "rules": s.rules.count(),
        "rules_events_missed": s.rules.missed(),
        "behaviors": s.behaviors.count(),
        "behaviors_events_missed": s.behaviors.missed(),
        "commits": commits,
        "commit_jobs": requests,
        "avg_jobs_per_commit": per(requests, commits),
        "avg_commit_ms": per(micros, commits) / 1000.0,
        "log_bytes": c.log_bytes.load(Ordering::Relaxed),
        "checkpoints": checkpoints,
        "avg_checkpoint_ms": per(c.checkpoint_micros.load(Ordering::Relaxed), checkpoints) / 1000.0,
        "twin_writes": c.twin_writes.load(Ordering::Relaxed),
        "history_points_written": c.points.load(Ordering::Relaxed),
        "store_bytes": s.store.size_on_disk(),
        "uptime_s": s.started.elapsed().as_secs(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub role: Role,
}

#[derive(Serialize, ToSchema)]
pub struct TokenResponse {
    /// Shown once; only its hash is stored.
    pub token: String,
    pub role: Role,
}

/// Create an API token (admin).
#[utoipa::path(post, path = "/v1/tokens", tag = "operations", request_body = TokenRequest,
    responses((status = 201, body = TokenResponse), (status = 403, body = super::error::ErrorBody)))]
pub async fn create_token(
    State(s): State<AppState>,
    Json(r): Json<TokenRequest>,
) -> Result<(StatusCode, axum::Json<TokenResponse>), ApiError> {
    let token = s.auth.create(r.role).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(TokenResponse {
            token,
            role: r.role,
        }),
    ))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "twinhost", description = "Digital twin host: the v1 HTTP API (see API.md)."),
    paths(
        super::twins::create, super::twins::list, super::twins::get_one, super::twins::patch,
        super::twins::delete, super::twins::lifecycle, super::twins::children,
        super::twins::ancestors, super::twins::relationships, super::twins::put_relationship,
        super::twins::delete_relationship, super::twins::history, super::twins::query,
        super::ingest::ingest, super::bulk::create, super::models::put, super::models::get_one, super::models::list,
        super::models::delete, super::modules::put, super::modules::list, super::modules::get_one,
        super::modules::rollback, super::modules::delete, super::modules::invoke,
        super::behaviors::put, super::behaviors::list, super::behaviors::get_one, super::behaviors::delete,
        super::rules::put, super::rules::list, super::rules::get_one, super::rules::delete,
        super::events::sse, super::events::ws, super::events::log, super::changes::changes,
        super::peers::list, super::peers::get_one, super::peers::put, super::peers::delete, super::peers::ws,
        super::conflicts::list, super::conflicts::resolve,
        super::workflows::start, super::workflows::list, super::workflows::get_one, super::workflows::cancel,
        super::workflows::put_def, super::workflows::list_defs, super::workflows::get_def, super::workflows::delete_def,
        super::workflows::run_def,
        create_token, metrics_json, metrics_prometheus, healthz,
    ),
    components(schemas(super::error::ErrorBody, crate::types::Twin, crate::registry::Model, crate::registry::conflict::ConflictInfo)),
    modifiers(&BearerAuth, &UniqueOperationIds),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let comps = doc.components.get_or_insert_with(Default::default);
        comps.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Operation ids from method and path (`get_v1_models_entity_type`): the handlers' names
/// repeat between modules (`list`, `get_one`, `put`, `delete`), and OpenAPI wants every
/// operation id unique.
struct UniqueOperationIds;

impl utoipa::Modify for UniqueOperationIds {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            let slug: String = path
                .split(|c: char| !c.is_ascii_alphanumeric())
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("_");
            let ops = [
                ("get", &mut item.get),
                ("put", &mut item.put),
                ("post", &mut item.post),
                ("delete", &mut item.delete),
                ("patch", &mut item.patch),
                ("head", &mut item.head),
            ];
            for (method, op) in ops {
                if let Some(op) = op {
                    op.operation_id = Some(format!("{method}_{slug}"));
                }
            }
        }
    }
}

/// The OpenAPI 3.1 document of this API, generated from the handlers and the core types
/// (see `ops/doc.rs` for what is corrected after generation).
pub async fn openapi() -> axum::Json<Value> {
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    axum::Json(DOC.get_or_init(document).clone())
}

pub use doc::document;
