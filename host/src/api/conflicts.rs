//! `/v1/conflicts`: concurrent writes the `manual` and `merge` strategies keep side by side
//! until a later write supersedes them.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::extract::{Json, Path, Query};
use super::{ApiError, AppState};
use crate::registry::conflict::MAX_CONFLICTS_PAGE;
use crate::types::{Properties, Twin};

/// Paging of `GET /v1/conflicts`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// At most this many (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page (a conflict id).
    #[serde(default)]
    cursor: Option<String>,
}

/// Open conflicts, in twin id then property order: `{"items": [conflict…], "next_cursor"}`.
/// Every node that has merged the same writes lists the same conflicts, with the same ids.
#[utoipa::path(get, path = "/v1/conflicts", tag = "sync", params(ListParams),
    responses((status = 200, description = "`{\"items\": [ConflictInfo…], \"next_cursor\": \"…\" | null}`", body = Object)))]
pub async fn list(
    State(s): State<AppState>,
    Query(p): Query<ListParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_CONFLICTS_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_CONFLICTS_PAGE}"
        )));
    }
    let (items, more) = s.registry.conflicts(p.cursor.as_deref(), limit);
    let next = more.then(|| items.last().map(|c| c.id.clone())).flatten();
    Ok(axum::Json(json!({"items": items, "next_cursor": next})))
}

/// The body of `POST /v1/conflicts/{id}/resolve`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConflictResolution {
    /// A merge patch of the twin; it must set the property in conflict (`null` removes it).
    #[schema(value_type = Object)]
    pub properties: Properties,
}

/// Resolve a conflict: write `properties` to its twin. The write supersedes every side of
/// the conflict; the record clears here at once and on every other node as the write
/// reaches it (`conflict.resolved` events). Answers the twin.
#[utoipa::path(post, path = "/v1/conflicts/{id}/resolve", tag = "sync", params(("id" = String, Path)),
    request_body = ConflictResolution,
    responses((status = 200, body = Twin), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn resolve(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<ConflictResolution>,
) -> Result<axum::Json<Twin>, ApiError> {
    crate::registry::check_patch(&body.properties)?;
    Ok(axum::Json(
        s.registry.resolve_conflict(&id, body.properties).await?,
    ))
}
