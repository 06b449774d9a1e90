//! `GET /v1/changes`: the node's durable change feed, for peers catching up.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::IntoParams;

use super::error::ErrorBody;
use super::extract::Query;
use super::{ApiError, AppState};
use crate::registry::feed::{DEFAULT_FEED_PAGE, MAX_FEED_PAGE};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ChangesParams {
    /// Entries with change numbers above this (default 0: from the start).
    #[serde(default)]
    pub after: u64,
    /// Entries per page (default 1,000, at most 10,000).
    #[param(minimum = 1, maximum = 10_000)]
    pub limit: Option<usize>,
}

/// The change feed after `after`: one entry per twin that changed since (its current values
/// with every clock) or tombstone, in change-number order; `next` is the `after` of the next
/// page (the same number when nothing is left). Admin or peer tokens.
#[utoipa::path(get, path = "/v1/changes", tag = "sync", params(ChangesParams),
    responses((status = 200, description = "`{\"items\": [change…], \"next\": N}`", body = Object),
              (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn changes(
    State(s): State<AppState>,
    Query(p): Query<ChangesParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let limit = p.limit.unwrap_or(DEFAULT_FEED_PAGE);
    if limit == 0 || limit > MAX_FEED_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_FEED_PAGE}"
        )));
    }
    let crate::registry::ChangesPage { items, next } = s.registry.changes(p.after, limit);
    let items: Vec<Value> = items.iter().map(|i| i.to_json()).collect();
    Ok(axum::Json(json!({"items": items, "next": next})))
}
