//! `/v1/workflows`: start a run of a workflow spec, read it, list runs, cancel one.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::extract::{Json, Path};
use super::{ApiError, AppState};
use crate::workflow::{Def, Run, Spec, Status, WorkflowError};

/// How long `?wait=true` waits for a run before answering with it as it stands.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Largest page of `GET /v1/workflows`.
const MAX_PAGE: usize = 1000;

impl From<WorkflowError> for ApiError {
    fn from(e: WorkflowError) -> Self {
        match e {
            WorkflowError::Invalid(ref reasons) => {
                ApiError::Validation(e.to_string(), json!({ "reasons": reasons }))
            }
            WorkflowError::Cycle(_) => ApiError::Conflict(e.to_string()),
            WorkflowError::Busy => ApiError::Overloaded(e.to_string()),
            WorkflowError::NotFound(_) | WorkflowError::NoDef(_) => {
                ApiError::NotFound(e.to_string())
            }
            WorkflowError::Finished(..) => ApiError::Conflict(e.to_string()),
            WorkflowError::Store(s) => s.into(),
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StartParams {
    /// Answer once the run has finished (200 with the run; at most 5 minutes, then the run as
    /// it stands), instead of at once (202).
    #[serde(default)]
    wait: bool,
}

/// What `POST /v1/workflows` answers without `?wait=true`.
#[derive(ToSchema)]
#[allow(dead_code)] // documents a `json!` answer
pub struct Started {
    id: String,
    status: Status,
}

/// Start a run: 202 `{"id", "status": "running"}`, or with `?wait=true` 200 and the finished
/// run. A cycle → 409 naming it; unknown steps, modules or functions → 422 with every reason.
#[utoipa::path(post, path = "/v1/workflows", tag = "workflows", params(StartParams), request_body = Spec,
    responses((status = 202, body = Started, description = "started"),
              (status = 200, body = Run, description = "finished (`?wait=true`)"),
              (status = 409, body = ErrorBody, description = "the dependencies have a cycle, named"),
              (status = 422, body = ErrorBody, description = "unknown steps, modules or functions: every reason"),
              (status = 429, body = ErrorBody, description = "too many runs at once")))]
pub async fn start(
    State(s): State<AppState>,
    Query(p): Query<StartParams>,
    Json(spec): Json<Spec>,
) -> Result<Response, ApiError> {
    let id = s.workflows.start(spec).await?;
    started(&s, id, p.wait).await
}

/// A run just started: 202 `{"id", "status": "running"}`, or when `wait`, 200 with the run
/// once finished (or as it stands after [`MAX_WAIT`]).
async fn started(s: &AppState, id: String, wait: bool) -> Result<Response, ApiError> {
    if wait {
        let run = s.workflows.wait(&id, MAX_WAIT).await?;
        return Ok((StatusCode::OK, axum::Json(run)).into_response());
    }
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"id": id, "status": "running"})),
    )
        .into_response())
}

/// One run: its status, and each step's status, timestamps, attempts, result or error.
#[utoipa::path(get, path = "/v1/workflows/{id}", tag = "workflows", params(("id" = String, Path)),
    responses((status = 200, body = Run), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(s.workflows.get(&id)?).into_response())
}

/// Cancel a run in flight: steps running stop, steps not started are cancelled. 409 when it
/// has finished already.
#[utoipa::path(post, path = "/v1/workflows/{id}/cancel", tag = "workflows", params(("id" = String, Path)),
    responses((status = 200, body = Run), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(s.workflows.cancel(&id).await?).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only runs in this state.
    #[param(value_type = Option<Status>)]
    status: Option<String>,
    /// `next_cursor` of the previous page (a run id).
    cursor: Option<String>,
    /// At most this many (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// Runs, newest first: `{"items": [summary…], "next_cursor"}`.
#[utoipa::path(get, path = "/v1/workflows", tag = "workflows", params(ListParams),
    responses((status = 200, description = "`{\"items\": [run without its spec and results…], \"next_cursor\": \"…\" | null}`", body = Object),
              (status = 400, body = ErrorBody)))]
pub async fn list(
    State(s): State<AppState>,
    Query(p): Query<ListParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let status = match p.status.as_deref() {
        None => None,
        Some(st) => Some(Status::parse(st).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "unknown status {st:?}; one of pending, running, succeeded, failed, cancelled"
            ))
        })?),
    };
    let limit = p.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let (items, next) = s.workflows.list(status, p.cursor.as_deref(), limit)?;
    Ok(axum::Json(json!({"items": items, "next_cursor": next})))
}

/// What the definition routes answer.
#[derive(ToSchema)]
#[allow(dead_code)] // documents a `json!` answer
pub struct NamedDef {
    name: String,
    definition: Def,
}

/// Store (or replace) a workflow definition: a spec, optionally `"every": "10m"`. 201 when
/// new, 200 when replaced; the checks of a run (409 for a cycle, 422 with every reason).
#[utoipa::path(put, path = "/v1/workflow-defs/{name}", tag = "workflows", params(("name" = String, Path)), request_body = Def,
    responses((status = 201, body = NamedDef, description = "created"), (status = 200, body = NamedDef, description = "replaced"),
              (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn put_def(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(def): Json<Def>,
) -> Result<Response, ApiError> {
    let created = s.workflows.put_def(&name, def).await?;
    let def = s.workflows.get_def(&name)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        axum::Json(json!({"name": name, "definition": *def})),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/workflow-defs/{name}", tag = "workflows", params(("name" = String, Path)),
    responses((status = 200, body = NamedDef), (status = 404, body = ErrorBody)))]
pub async fn get_def(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let def = s.workflows.get_def(&name)?;
    Ok(axum::Json(json!({"name": name, "definition": *def})).into_response())
}

#[utoipa::path(get, path = "/v1/workflow-defs", tag = "workflows",
    responses((status = 200, description = "`{\"items\": [{\"name\", \"definition\"}…]}`", body = Object)))]
pub async fn list_defs(State(s): State<AppState>) -> axum::Json<Value> {
    axum::Json(json!({"items": s.workflows.list_defs()}))
}

#[utoipa::path(delete, path = "/v1/workflow-defs/{name}", tag = "workflows", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_def(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.workflows.delete_def(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The optional body of `POST /v1/workflow-defs/{name}/run`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunInput {
    /// Given to every step as `parameters.input`.
    #[serde(default)]
    #[schema(value_type = Object)]
    input: Option<Value>,
}

/// Start a run of a stored definition; the body (optional: empty or `null` will do) is
/// `{"input": …}`, given to every step as `parameters.input`. Answers like `POST /v1/workflows`.
#[utoipa::path(post, path = "/v1/workflow-defs/{name}/run", tag = "workflows", params(("name" = String, Path), StartParams),
    request_body(content = Option<RunInput>, description = "optional"),
    responses((status = 202, body = Started, description = "started"),
              (status = 200, body = Run, description = "finished (`?wait=true`)"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn run_def(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<StartParams>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let input = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice::<Option<RunInput>>(&body)
            .map_err(|e| {
                ApiError::BadRequest(format!("the body is {{\"input\": …}} or empty: {e}"))
            })?
            .and_then(|b| b.input)
    };
    let id = s.workflows.start_def(&name, input).await?;
    started(&s, id, p.wait).await
}
