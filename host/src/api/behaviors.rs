//! `/v1/behaviors`: bind behavior modules to entity types or twins.

use axum::extract::State;
use axum::http::StatusCode;
use serde_json::json;

use super::error::ErrorBody;
use super::extract::{Json, Path};
use super::{ApiError, AppState};
use crate::wasm::behaviors::{BehaviorError, BehaviorInfo, Binding};

impl From<BehaviorError> for ApiError {
    fn from(e: BehaviorError) -> Self {
        match e {
            BehaviorError::Invalid(m) => ApiError::Validation(m.clone(), json!({"behavior": m})),
            BehaviorError::NotFound(_) => ApiError::NotFound(e.to_string()),
            BehaviorError::Store(s) => s.into(),
        }
    }
}

/// Create or replace a behavior: `{"module": "thermal-monitor", "entity_type": "machine"}`
/// (or `"twin_id"`).
#[utoipa::path(put, path = "/v1/behaviors/{name}", tag = "behaviors", params(("name" = String, Path)), request_body = Binding,
    responses((status = 201, body = BehaviorInfo, description = "created"), (status = 200, body = BehaviorInfo, description = "replaced"),
              (status = 422, body = ErrorBody)))]
pub async fn put(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(b): Json<Binding>,
) -> Result<(StatusCode, axum::Json<BehaviorInfo>), ApiError> {
    let created = s.behaviors.put(&name, b).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(s.behaviors.get(&name)?)))
}

#[utoipa::path(get, path = "/v1/behaviors", tag = "behaviors", responses((status = 200, body = Vec<BehaviorInfo>)))]
pub async fn list(State(s): State<AppState>) -> axum::Json<Vec<BehaviorInfo>> {
    axum::Json(s.behaviors.list())
}

#[utoipa::path(get, path = "/v1/behaviors/{name}", tag = "behaviors", params(("name" = String, Path)),
    responses((status = 200, body = BehaviorInfo), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<axum::Json<BehaviorInfo>, ApiError> {
    Ok(axum::Json(s.behaviors.get(&name)?))
}

#[utoipa::path(delete, path = "/v1/behaviors/{name}", tag = "behaviors", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.behaviors.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
