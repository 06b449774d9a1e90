//! The HTTP API (axum): routes of API.md, auth, errors, limits and the OpenAPI document.
//!
//! Owns: translating HTTP to calls on the registry and history — nothing else. Exposes:
//! [`router`] and [`AppState`]. Must never: hold storage keys, validation rules or query
//! logic; those belong to the subsystems.

pub mod auth;
mod behaviors;
mod bulk;
mod changes;
mod conflicts;
pub mod error;
mod events;
pub mod extract;
mod ingest;
mod models;
mod modules;
mod ops;
mod peers;
mod rules;
mod twins;
mod workflows;

#[cfg(test)]
mod openapi_tests;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post, put};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::trace::TraceLayer;

pub use error::ApiError;

use crate::history::History;
use crate::registry::Registry;
use crate::store::Store;

/// Default body limit of JSON calls (`--max-body-bytes`).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default body limit of `POST /v1/ingest` (`--max-ingest-bytes`).
pub const DEFAULT_MAX_INGEST_BYTES: usize = 64 * 1024 * 1024;
/// Default number of ingest requests processed at once (`--max-concurrent-ingest`). Each
/// holds its whole body and parsed items in memory, so this bounds ingest memory to about
/// this many times the body limit; more requests are answered 429 at once.
pub const DEFAULT_MAX_CONCURRENT_INGEST: usize = 8;

pub use bulk::DEFAULT_MAX_BULK_ITEMS;

/// Limits the API enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Body limit of the bulk routes (`POST /v1/ingest`, `POST /v1/twins/bulk`).
    pub max_ingest_bytes: usize,
    /// Bulk requests (ingest and bulk provisioning together) processed at once.
    pub max_concurrent_ingest: usize,
    /// Items per `POST /v1/twins/bulk` request.
    pub max_bulk_items: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_ingest_bytes: DEFAULT_MAX_INGEST_BYTES,
            max_concurrent_ingest: DEFAULT_MAX_CONCURRENT_INGEST,
            max_bulk_items: DEFAULT_MAX_BULK_ITEMS,
        }
    }
}

/// Everything a handler may use.
pub struct AppStateInner {
    pub registry: Registry,
    pub history: History,
    pub auth: auth::Auth,
    pub store: Store,
    pub prometheus: PrometheusHandle,
    pub started: Instant,
    pub runtime: Arc<crate::wasm::Runtime>,
    pub events: crate::events::EventLog,
    pub rules: crate::events::Rules,
    pub behaviors: crate::wasm::behaviors::Behaviors,
    /// What binds modules (behaviors, rules), which the runtime asks through weak
    /// references before a module changes or goes; owned here.
    pub module_users: Vec<Arc<dyn crate::wasm::ModuleUsers>>,
    /// Counters of the links with peers.
    pub sync: Arc<crate::sync::SyncStats>,
    /// Links with peers, and the peers to dial.
    pub peers: crate::sync::SyncService,
    /// Workflow runs.
    pub workflows: crate::workflow::Workflows,
    /// Set when the server begins to stop: event streams end so connections can drain.
    pub stopping: tokio::sync::watch::Sender<bool>,
}

impl AppStateInner {
    /// Resolves once the server begins to stop.
    pub async fn stopping(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

pub type AppState = Arc<AppStateInner>;

/// The listener with `TCP_NODELAY` on every connection: events and small responses go out
/// at once instead of waiting for Nagle's algorithm to batch them.
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    })
}

/// Assemble every route.
pub fn router(state: AppState, limits: Limits) -> Router {
    let v1 = Router::new()
        .route("/twins", post(twins::create).get(twins::list))
        .route(
            "/twins/{id}",
            get(twins::get_one)
                .patch(twins::patch)
                .delete(twins::delete),
        )
        .route("/twins/{id}/lifecycle", put(twins::lifecycle))
        .route("/twins/{id}/children", get(twins::children))
        .route("/twins/{id}/ancestors", get(twins::ancestors))
        .route("/twins/{id}/relationships", get(twins::relationships))
        .route(
            "/twins/{id}/relationships/{name}/{target_id}",
            put(twins::put_relationship).delete(twins::delete_relationship),
        )
        .route("/twins/{id}/history/{property}", get(twins::history))
        .route("/query", post(twins::query))
        .route(
            "/models/{entity_type}",
            put(models::put).get(models::get_one).delete(models::delete),
        )
        .route("/models", get(models::list))
        .route("/rules", get(rules::list))
        .route(
            "/rules/{name}",
            put(rules::put).get(rules::get_one).delete(rules::delete),
        )
        .route("/behaviors", get(behaviors::list))
        .route(
            "/behaviors/{name}",
            put(behaviors::put)
                .get(behaviors::get_one)
                .delete(behaviors::delete),
        )
        .route("/events", get(events::sse))
        .route("/events/ws", get(events::ws))
        .route("/events/log", get(events::log))
        .route("/changes", get(changes::changes))
        .route("/sync/ws", get(peers::ws))
        .route("/peers", get(peers::list))
        .route("/conflicts", get(conflicts::list))
        .route("/conflicts/{id}/resolve", post(conflicts::resolve))
        .route("/workflows", post(workflows::start).get(workflows::list))
        .route("/workflows/{id}", get(workflows::get_one))
        .route("/workflows/{id}/cancel", post(workflows::cancel))
        .route("/workflow-defs", get(workflows::list_defs))
        .route(
            "/workflow-defs/{name}",
            put(workflows::put_def)
                .get(workflows::get_def)
                .delete(workflows::delete_def),
        )
        .route("/workflow-defs/{name}/run", post(workflows::run_def))
        .route(
            "/peers/{node_id}",
            put(peers::put).get(peers::get_one).delete(peers::delete),
        )
        .route("/tokens", post(ops::create_token))
        .route("/metrics", get(ops::metrics_json))
        .route("/openapi.json", get(ops::openapi))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .merge(
            Router::new()
                .route(
                    "/modules/{name}",
                    put(modules::put)
                        .get(modules::get_one)
                        .delete(modules::delete),
                )
                .layer(DefaultBodyLimit::max(crate::wasm::MAX_MODULE_BYTES)),
        )
        .route("/modules", get(modules::list))
        .route("/modules/{name}/rollback", post(modules::rollback))
        .route("/modules/{name}/invoke", post(modules::invoke))
        .merge(
            Router::new()
                .route("/ingest", post(twins::ingest))
                .route("/twins/bulk", post(bulk::create))
                .layer(axum::Extension(bulk::MaxItems(
                    limits.max_bulk_items.max(1),
                )))
                .layer(DefaultBodyLimit::max(limits.max_ingest_bytes))
                .layer(axum::middleware::from_fn_with_state(
                    Arc::new(tokio::sync::Semaphore::new(
                        limits.max_concurrent_ingest.max(1),
                    )),
                    ingest::admit,
                )),
        );
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics_prometheus))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ))
        .layer(axum::middleware::from_fn(ops::count_requests))
        // Spans name the path, not the query: `?access_token=` must not reach the logs.
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                tracing::debug_span!("request", method = %req.method(), path = req.uri().path())
            }),
        )
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

#[cfg(test)]
mod tests;
