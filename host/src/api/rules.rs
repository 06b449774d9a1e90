//! `/v1/rules`: event-processing rules.

use axum::extract::State;
use axum::http::StatusCode;
use serde_json::json;

use super::error::ErrorBody;
use super::extract::{Json, Path};
use super::{ApiError, AppState};
use crate::events::rules::{self, RuleError, RuleInfo, RuleSpec};

impl From<RuleError> for ApiError {
    fn from(e: RuleError) -> Self {
        match e {
            RuleError::Invalid(reasons) => ApiError::Validation(
                format!("the rule is invalid: {}", reasons.join("; ")),
                json!({ "reasons": reasons }),
            ),
            RuleError::NotFound(_) => ApiError::NotFound(e.to_string()),
            RuleError::Store(s) => s.into(),
        }
    }
}

/// Create or replace a rule (its state restarts empty).
#[utoipa::path(put, path = "/v1/rules/{name}", tag = "rules", params(("name" = String, Path)), request_body = RuleSpec,
    responses((status = 201, body = RuleInfo, description = "created"), (status = 200, body = RuleInfo, description = "replaced"),
              (status = 422, body = ErrorBody, description = "invalid; `details.reasons` lists every problem")))]
pub async fn put(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Result<(StatusCode, axum::Json<RuleInfo>), ApiError> {
    // A body that is JSON but not a rule is a malformed rule: 422 with the reasons.
    let spec = rules::parse(body).map_err(RuleError::Invalid)?;
    let created = s.rules.put(&name, spec).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(s.rules.get(&name)?)))
}

#[utoipa::path(get, path = "/v1/rules", tag = "rules", responses((status = 200, body = Vec<RuleInfo>)))]
pub async fn list(State(s): State<AppState>) -> axum::Json<Vec<RuleInfo>> {
    axum::Json(s.rules.list())
}

#[utoipa::path(get, path = "/v1/rules/{name}", tag = "rules", params(("name" = String, Path)),
    responses((status = 200, body = RuleInfo), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<axum::Json<RuleInfo>, ApiError> {
    Ok(axum::Json(s.rules.get(&name)?))
}

#[utoipa::path(delete, path = "/v1/rules/{name}", tag = "rules", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.rules.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
