//! `/v1/peers` (the nodes this one syncs with) and `/v1/sync/ws` (a peer's link).

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{json, Value};

use super::error::ErrorBody;
use super::extract::{Json, Path};
use super::{ApiError, AppState};
use crate::sync::{PeerConfig, PeerError};

impl From<PeerError> for ApiError {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::Invalid(m) => ApiError::Validation(m.clone(), json!({"peer": m})),
            PeerError::NotFound(m) => ApiError::NotFound(m),
            PeerError::Store(s) => s.into(),
        }
    }
}

/// The peers this node dials or was dialed by: for each its state, how far this node's feed
/// was sent and acknowledged, how far the peer's feed is merged here, lag in changes and in
/// ms, entries and bytes each way, the coalescing ratio, and the last error.
#[utoipa::path(get, path = "/v1/peers", tag = "sync",
    responses((status = 200, description = "`{\"node_id\", \"head\", \"items\": [peer…]}`", body = Object)))]
pub async fn list(State(s): State<AppState>) -> axum::Json<Value> {
    axum::Json(s.peers.peers_json())
}

/// One peer, as in the list.
#[utoipa::path(get, path = "/v1/peers/{node_id}", tag = "sync", params(("node_id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(s): State<AppState>,
    Path(node_id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    peer_row(&s, &node_id)
        .map(axum::Json)
        .ok_or_else(|| ApiError::NotFound(format!("no peer {node_id:?}")))
}

fn peer_row(s: &AppState, node_id: &str) -> Option<Value> {
    let all = s.peers.peers_json();
    all["items"]
        .as_array()?
        .iter()
        .find(|p| p["node_id"] == node_id)
        .cloned()
}

/// Add or replace a peer: `{"url": "http://10.0.0.2:7878", "token": "<peer token there>"}`.
/// Stored, and dialed from now on (and after restarts).
#[utoipa::path(put, path = "/v1/peers/{node_id}", tag = "sync", params(("node_id" = String, Path)),
    request_body = PeerConfig,
    responses((status = 201, body = Object, description = "added"), (status = 200, body = Object, description = "replaced"),
              (status = 422, body = ErrorBody)))]
pub async fn put(
    State(s): State<AppState>,
    Path(node_id): Path<String>,
    Json(config): Json<PeerConfig>,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let created = s.peers.put_peer(&node_id, config).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let row = peer_row(&s, &node_id).unwrap_or_else(|| json!({"node_id": node_id}));
    Ok((status, axum::Json(row)))
}

/// Remove a peer: stop dialing it and close its link.
#[utoipa::path(delete, path = "/v1/peers/{node_id}", tag = "sync", params(("node_id" = String, Path)),
    responses((status = 204, description = "removed"), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(s): State<AppState>,
    Path(node_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.peers.remove_peer(&node_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A peer's link (WebSocket; `peer` or admin token). The protocol is in `sync::protocol`.
#[utoipa::path(get, path = "/v1/sync/ws", tag = "sync",
    responses((status = 101, description = "a sync link"), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn ws(
    State(s): State<AppState>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<axum::response::Response, ApiError> {
    let upgrade = upgrade
        .map_err(|e| ApiError::BadRequest(format!("this route speaks WebSocket only: {e}")))?;
    let peers = s.peers.clone();
    Ok(upgrade
        .max_message_size(crate::sync::protocol::MAX_MESSAGE_BYTES)
        .max_frame_size(crate::sync::protocol::MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| async move { peers.accept(socket).await }))
}
