//! `/v1/twins`, `/v1/query`: twins, hierarchy, lifecycle, relationships and history.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::extract::{Json, Path, Query};
use super::{ApiError, AppState};
use crate::registry::{NewTwin, Page, Query as TwinQuery, Relationship, Update};
use crate::types::{Lifecycle, Twin, TwinId};

pub use super::ingest::ingest;

fn with_etag(status: StatusCode, t: Twin) -> Response {
    let etag = HeaderValue::from_str(&format!("\"{}\"", t.version)).expect("digits are valid");
    let mut r = (status, axum::Json(t)).into_response();
    r.headers_mut().insert(header::ETAG, etag);
    r
}

/// Create a twin.
#[utoipa::path(post, path = "/v1/twins", tag = "twins", request_body = NewTwin,
    responses((status = 201, body = Twin), (status = 404, description = "unknown parent", body = ErrorBody),
              (status = 409, description = "duplicate id", body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(s): State<AppState>,
    Json(new): Json<NewTwin>,
) -> Result<Response, ApiError> {
    let t = s.registry.create(new).await?;
    let loc =
        HeaderValue::from_str(&format!("/v1/twins/{}", t.id)).expect("uuid is a valid header");
    let mut r = with_etag(StatusCode::CREATED, t);
    r.headers_mut().insert(header::LOCATION, loc);
    Ok(r)
}

/// `?meta=true` on `GET /v1/twins/{id}`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct GetParams {
    /// Add `meta`: the change number and HLC of the twin's last change, and per property
    /// the HLC and origin node of its last write (removed properties included), and the
    /// concurrent writes of properties in conflict (`conflicts`).
    #[serde(default)]
    pub meta: bool,
}

/// The twin's clocks, as `?meta=true` shows them.
fn meta_json(t: &Twin) -> Value {
    let props: serde_json::Map<String, Value> = t
        .clocks
        .iter()
        .map(|(k, c)| (k.to_owned(), json!({"hlc": c.hlc, "origin": &*c.origin})))
        .collect();
    let mut meta = json!({"lseq": t.lseq, "hlc": t.hlc, "vclock": t.vclock, "properties": props});
    if let Some(s) = &t.siblings {
        meta["conflicts"] = s
            .iter()
            .map(|(k, sides)| {
                let sides: Vec<Value> = sides
                    .iter()
                    .map(|w| json!({"value": w.value, "hlc": w.clock.hlc, "origin": &*w.clock.origin}))
                    .collect();
                (k.clone(), Value::Array(sides))
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    meta
}

#[utoipa::path(get, path = "/v1/twins/{id}", tag = "twins", params(("id" = uuid::Uuid, Path), GetParams),
    responses((status = 200, body = Twin, headers(("ETag" = String))), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(s): State<AppState>,
    Path(id): Path<TwinId>,
    Query(p): Query<GetParams>,
) -> Result<Response, ApiError> {
    let t = s.registry.get(&id)?;
    if !p.meta {
        return Ok(with_etag(StatusCode::OK, t));
    }
    let etag = HeaderValue::from_str(&format!("\"{}\"", t.version)).expect("digits are valid");
    let meta = meta_json(&t);
    let mut body = serde_json::to_value(&t).map_err(|e| ApiError::Internal(e.to_string()))?;
    body["meta"] = meta;
    let mut r = (StatusCode::OK, axum::Json(body)).into_response();
    r.headers_mut().insert(header::ETAG, etag);
    Ok(r)
}

/// Parse `If-Match`: `"3"`, `W/"3"`, `3`, or `*` (any version).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| ApiError::BadRequest("If-Match is not text".into()))?
        .trim();
    if s == "*" {
        return Ok(None);
    }
    let s = s.trim_start_matches("W/").trim_matches('"');
    s.parse().map(Some).map_err(|_| {
        ApiError::BadRequest(format!(
            "If-Match must be a twin version like \"3\", got {s:?}"
        ))
    })
}

/// Apply a JSON merge patch (RFC 7396) to the twin's properties.
#[utoipa::path(patch, path = "/v1/twins/{id}", tag = "twins", params(("id" = uuid::Uuid, Path), ("If-Match" = Option<String>, Header)),
    request_body(content = Object, description = "merge patch of properties; null removes"),
    responses((status = 200, body = Twin), (status = 409, description = "retired", body = ErrorBody),
              (status = 412, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn patch(
    State(s): State<AppState>,
    Path(id): Path<TwinId>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    let Value::Object(patch) = body else {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object (a merge patch of properties)".into(),
        ));
    };
    let t = s
        .registry
        .patch(Update {
            twin_id: id,
            patch,
            ts: None,
            if_match: if_match(&headers)?,
            cause: None,
        })
        .await?;
    Ok(with_etag(StatusCode::OK, t))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteParams {
    /// Delete the whole subtree.
    #[serde(default)]
    cascade: bool,
}

#[utoipa::path(delete, path = "/v1/twins/{id}", tag = "twins", params(("id" = uuid::Uuid, Path), DeleteParams),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, description = "has children", body = ErrorBody)))]
pub async fn delete(
    State(s): State<AppState>,
    Path(id): Path<TwinId>,
    Query(p): Query<DeleteParams>,
) -> Result<StatusCode, ApiError> {
    s.registry.delete(id, p.cascade).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LifecycleBody {
    state: Lifecycle,
}

#[utoipa::path(put, path = "/v1/twins/{id}/lifecycle", tag = "twins", params(("id" = uuid::Uuid, Path)), request_body = LifecycleBody,
    responses((status = 200, body = Twin), (status = 409, description = "retired is final", body = ErrorBody)))]
pub async fn lifecycle(
    State(s): State<AppState>,
    Path(id): Path<TwinId>,
    Json(b): Json<LifecycleBody>,
) -> Result<Response, ApiError> {
    Ok(with_etag(
        StatusCode::OK,
        s.registry.set_lifecycle(id, b.state).await?,
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChildrenParams {
    /// Page size (default 1,000).
    #[param(minimum = 1, maximum = 10_000)]
    limit: Option<usize>,
    /// The `X-Next-Cursor` of the previous page (a child's id).
    #[param(format = Uuid)]
    cursor: Option<TwinId>,
}

/// Children of a twin, in id order, one page at a time: when there are more, the
/// `X-Next-Cursor` header holds the `cursor` of the next page and `Link` its URL.
#[utoipa::path(get, path = "/v1/twins/{id}/children", tag = "twins", params(("id" = uuid::Uuid, Path), ChildrenParams),
    responses((status = 200, body = Vec<Twin>, headers(("X-Next-Cursor" = String, description = "cursor of the next page, when there is one"))),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn children(
    State(s): State<AppState>,
    Path(id): Path<TwinId>,
    Query(p): Query<ChildrenParams>,
) -> Result<Response, ApiError> {
    let limit = p.limit.unwrap_or(crate::registry::MAX_CHILDREN_LISTED);
    if !(1..=crate::registry::query::MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1..={}",
            crate::registry::query::MAX_LIMIT
        )));
    }
    let (page, next) = s.registry.children(&id, p.cursor, limit)?;
    let mut r = axum::Json(page).into_response();
    if let Some(next) = next {
        let h = r.headers_mut();
        h.insert(
            "x-next-cursor",
            HeaderValue::from_str(&next.to_string()).expect("a uuid is a valid header"),
        );
        h.insert(
            header::LINK,
            HeaderValue::from_str(&format!(
                "</v1/twins/{id}/children?limit={limit}&cursor={next}>; rel=\"next\""
            ))
            .expect("a path of uuids is a valid header"),
        );
    }
    Ok(r)
}

/// Ancestors, nearest first.
#[utoipa::path(get, path = "/v1/twins/{id}/ancestors", tag = "twins", params(("id" = uuid::Uuid, Path)),
    responses((status = 200, body = Vec<Twin>), (status = 404, body = ErrorBody)))]
pub async fn ancestors(
    State(s): State<AppState>,
    Path(id): Path<TwinId>,
) -> Result<axum::Json<Vec<Twin>>, ApiError> {
    Ok(axum::Json(s.registry.ancestors(&id)?))
}

#[utoipa::path(get, path = "/v1/twins/{id}/relationships", tag = "twins", params(("id" = uuid::Uuid, Path)),
    responses((status = 200, body = Vec<Relationship>), (status = 404, body = ErrorBody)))]
pub async fn relationships(
    State(s): State<AppState>,
    Path(id): Path<TwinId>,
) -> Result<axum::Json<Vec<Relationship>>, ApiError> {
    Ok(axum::Json(s.registry.relationships(&id)?))
}

#[utoipa::path(put, path = "/v1/twins/{id}/relationships/{name}/{target_id}", tag = "twins",
    params(("id" = uuid::Uuid, Path), ("name" = String, Path), ("target_id" = uuid::Uuid, Path)),
    request_body(content = Option<Object>, description = "optional relationship properties"),
    responses((status = 201, body = Relationship), (status = 200, body = Relationship), (status = 404, body = ErrorBody)))]
pub async fn put_relationship(
    State(s): State<AppState>,
    Path((id, name, target)): Path<(TwinId, String, TwinId)>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let body = super::extract::body_bytes(req, &()).await?; // over the limit → JSON 413
    let props: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        super::extract::parse_json(&body)?
    };
    let created = s
        .registry
        .put_relationship(id, &name, target, props.clone())
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let properties = if props.is_null() { json!({}) } else { props };
    Ok((
        status,
        axum::Json(Relationship {
            name,
            target_id: target,
            properties,
        }),
    )
        .into_response())
}

#[utoipa::path(delete, path = "/v1/twins/{id}/relationships/{name}/{target_id}", tag = "twins",
    params(("id" = uuid::Uuid, Path), ("name" = String, Path), ("target_id" = uuid::Uuid, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_relationship(
    State(s): State<AppState>,
    Path((id, name, target)): Path<(TwinId, String, TwinId)>,
) -> Result<StatusCode, ApiError> {
    s.registry.delete_relationship(id, &name, target).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query twins (the seed's shape plus `where`, hierarchy filters and paging).
#[utoipa::path(post, path = "/v1/query", tag = "twins", request_body = TwinQuery,
    responses((status = 200, body = Page), (status = 400, body = ErrorBody)))]
pub async fn query(
    State(s): State<AppState>,
    Json(q): Json<TwinQuery>,
) -> Result<axum::Json<Page>, ApiError> {
    Ok(axum::Json(s.registry.query(&q)?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    entity_type: Option<String>,
    parent_id: Option<TwinId>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 10_000)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page (a twin id).
    #[param(format = Uuid)]
    cursor: Option<String>,
}

/// List twins in id (creation) order, one page at a time.
#[utoipa::path(get, path = "/v1/twins", tag = "twins", params(ListParams),
    responses((status = 200, body = Page), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(s): State<AppState>,
    Query(p): Query<ListParams>,
) -> Result<axum::Json<Page>, ApiError> {
    let q = TwinQuery {
        entity_type: p.entity_type,
        parent_id: p.parent_id,
        limit: p.limit,
        cursor: p.cursor,
        ..Default::default()
    };
    Ok(axum::Json(s.registry.query(&q)?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// RFC 3339 start (inclusive).
    from: Option<DateTime<Utc>>,
    /// RFC 3339 end (inclusive).
    to: Option<DateTime<Utc>>,
    /// Bucket width such as `10s`, `5m`, `1h` (at least 1 ms); without it raw points are
    /// returned.
    #[param(pattern = r"^\s*([0-9]+\s*[a-zA-Z]+\s*)+$", example = "10s")]
    step: Option<String>,
}

/// Smallest bucket width.
const MIN_STEP: Duration = Duration::from_millis(1);

/// History of a numeric property: raw points, or buckets with `step`.
#[utoipa::path(get, path = "/v1/twins/{id}/history/{property}", tag = "history",
    params(("id" = uuid::Uuid, Path), ("property" = String, Path), HistoryParams),
    responses((status = 200, description = "`{\"points\": [...]}` or `{\"buckets\": [...]}`"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn history(
    State(s): State<AppState>,
    Path((id, property)): Path<(TwinId, String)>,
    Query(p): Query<HistoryParams>,
) -> Result<axum::Json<Value>, ApiError> {
    s.registry.get(&id)?;
    if let (Some(f), Some(t)) = (p.from, p.to) {
        if f > t {
            return Err(ApiError::BadRequest("`from` is after `to`".into()));
        }
    }
    let h = s.history.clone();
    let step = match p.step.as_deref() {
        None => None,
        Some(st) => {
            let d = humantime::parse_duration(st)
                .map_err(|e| ApiError::BadRequest(format!("step {st:?}: {e} (try 10s, 5m, 1h)")))?;
            if d < MIN_STEP {
                return Err(ApiError::BadRequest("step must be at least 1ms".into()));
            }
            Some(d)
        }
    };
    let body = tokio::task::spawn_blocking(move || match step {
        None => h
            .points(&id, &property, p.from, p.to)
            .map(|pts| json!({ "points": pts })),
        Some(d) => h
            .buckets(&id, &property, p.from, p.to, d)
            .map(|b| json!({ "buckets": b })),
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(axum::Json(body))
}
