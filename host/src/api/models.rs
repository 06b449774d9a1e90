//! `/v1/models`: entity-type schemas.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::extract::{Json, Path};
use super::{ApiError, AppState};
use crate::registry::Model;

/// Create or replace the model of an entity type.
#[utoipa::path(put, path = "/v1/models/{entity_type}", tag = "models",
    params(("entity_type" = String, Path)), request_body = Model,
    responses((status = 201, body = Model, description = "created"), (status = 200, body = Model, description = "replaced"),
              (status = 422, body = super::error::ErrorBody)))]
pub async fn put(
    State(s): State<AppState>,
    Path(entity_type): Path<String>,
    Json(model): Json<Model>,
) -> Result<impl IntoResponse, ApiError> {
    model.check()?;
    check_resolver(&s, &model)?;
    let created = s.registry.put_model(&entity_type, model.clone()).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(model)))
}

/// A `merge` model's resolver must be a resolver module here whose active version is the
/// code the model pins.
fn check_resolver(s: &AppState, model: &Model) -> Result<(), ApiError> {
    let (Some(name), Some(pin)) = (&model.conflict.resolver, &model.conflict.sha256) else {
        return Ok(());
    };
    let refuse =
        |m: String| ApiError::Validation(m.clone(), serde_json::json!({"conflict.resolver": m}));
    let info = s.runtime.info(name).map_err(|_| {
        refuse(format!(
            "no module {name:?} here: upload the resolver first"
        ))
    })?;
    let active = info.versions.iter().find(|v| v.version == info.active);
    match active {
        Some(v) if v.world != crate::types::World::Resolver => Err(refuse(format!(
            "module {name:?} is a {} component, not a resolver",
            v.world
        ))),
        Some(v) if !v.sha256.eq_ignore_ascii_case(pin) => Err(refuse(format!(
            "the active version of {name:?} is sha256 {}, not {pin}",
            v.sha256
        ))),
        Some(_) => Ok(()),
        None => Err(refuse(format!("module {name:?} has no active version"))),
    }
}

#[utoipa::path(get, path = "/v1/models/{entity_type}", tag = "models",
    params(("entity_type" = String, Path)),
    responses((status = 200, body = Model), (status = 404, body = super::error::ErrorBody)))]
pub async fn get_one(
    State(s): State<AppState>,
    Path(entity_type): Path<String>,
) -> Result<axum::Json<Model>, ApiError> {
    Ok(axum::Json((*s.registry.model(&entity_type)?).clone()))
}

#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses((status = 200, description = "entity type → model", body = BTreeMap<String, Model>)))]
pub async fn list(State(s): State<AppState>) -> axum::Json<BTreeMap<String, Model>> {
    axum::Json(
        s.registry
            .models()
            .into_iter()
            .map(|(k, v)| (k, (*v).clone()))
            .collect(),
    )
}

#[utoipa::path(delete, path = "/v1/models/{entity_type}", tag = "models",
    params(("entity_type" = String, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)))]
pub async fn delete(
    State(s): State<AppState>,
    Path(entity_type): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.registry.delete_model(&entity_type).await?;
    Ok(StatusCode::NO_CONTENT)
}
