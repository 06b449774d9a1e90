//! `/v1/workflows`: start a run of a workflow spec, read it, list runs, cancel one.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{Json, Path};
use super::{ApiError, AppState};
use crate::workflow::{Def, Spec, Status, WorkflowError};

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

#[derive(Deserialize)]
pub struct StartParams {
    #[serde(default)]
    wait: bool,
}

/// Start a run: 202 `{"id", "status": "running"}`, or with `?wait=true` 200 and the finished
/// run. A cycle → 409 naming it; unknown steps, modules or functions → 422 with every reason.
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
pub async fn get_one(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(s.workflows.get(&id)?).into_response())
}

/// Cancel a run in flight: steps running stop, steps not started are cancelled. 409 when it
/// has finished already.
pub async fn cancel(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(s.workflows.cancel(&id).await?).into_response())
}

#[derive(Deserialize)]
pub struct ListParams {
    status: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// Runs, newest first: `{"items": [summary…], "next_cursor"}`.
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

/// Store (or replace) a workflow definition: a spec, optionally `"every": "10m"`. 201 when
/// new, 200 when replaced; the checks of a run (409 for a cycle, 422 with every reason).
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

pub async fn get_def(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let def = s.workflows.get_def(&name)?;
    Ok(axum::Json(json!({"name": name, "definition": *def})).into_response())
}

pub async fn list_defs(State(s): State<AppState>) -> axum::Json<Value> {
    axum::Json(json!({"items": s.workflows.list_defs()}))
}

pub async fn delete_def(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.workflows.delete_def(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start a run of a stored definition; the body (optional) is `{"input": …}`, given to every
/// step as `parameters.input`. Answers like `POST /v1/workflows`.
pub async fn run_def(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<StartParams>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let input = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::InvalidJson(format!("the body: {e}")))?;
        match v {
            Value::Object(mut m) if m.keys().all(|k| k == "input") => m.remove("input"),
            _ => {
                return Err(ApiError::BadRequest(
                    "the body is {\"input\": …} or empty".into(),
                ))
            }
        }
    };
    let id = s.workflows.start_def(&name, input).await?;
    started(&s, id, p.wait).await
}
