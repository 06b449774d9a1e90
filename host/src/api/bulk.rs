//! `POST /v1/twins/bulk`: provisioning many twins with one durable commit per request.
//!
//! The body is a JSON array, or NDJSON, of twins shaped like the body of `POST /v1/twins`
//! (`id` optional). Items are parsed one by one and applied in order by
//! [`crate::registry::Registry::provision`], so an item may name as its parent a twin created
//! by an earlier item of the same body; a bad item is rejected by its index, as on
//! `POST /v1/ingest`, and the rest is committed. Bulk bodies share ingest's body limit and
//! its bound on requests at once; the number of items is bounded too ([`MaxItems`]).

use axum::extract::{Request, State};
use axum::Extension;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::extract::{body_bytes, Query};
use super::ingest::{is_ndjson, parse_items, parse_off_thread, Rejected};
use super::{ApiError, AppState};
use crate::registry::NewTwin;
use crate::types::TwinId;

/// Default bound on the items of one bulk request (`--max-bulk-items`). A request is one job
/// of the single writer: at the bulk path's ~100–200K twins/s this keeps one request from
/// holding every other write back for more than about 0.1 s. The CLI's `twin import` sends
/// 5,000 per request.
pub const DEFAULT_MAX_BULK_ITEMS: usize = 10_000;

/// The bound on items per bulk request, handed to the handler by the router.
#[derive(Clone, Copy, Debug)]
pub struct MaxItems(pub usize);

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct BulkParams {
    /// An item whose `id` names an existing twin updates it (its `properties` are a merge
    /// patch, as `PATCH`; `null` removes) instead of being refused as a duplicate. Its
    /// `entity_type` must be the twin's, and its `parent_id`, when given, the twin's parent.
    #[serde(default)]
    pub upsert: bool,
}

/// What became of a bulk request.
#[derive(Serialize, ToSchema)]
pub struct BulkResult {
    /// Twins created.
    pub created: usize,
    /// Existing twins updated (with `upsert=true`).
    pub updated: usize,
    /// The twin each item created or updated, by the item's index (`null` for a rejected
    /// item): the ids the server made for items that gave none.
    pub ids: Vec<Option<TwinId>>,
    /// The items refused, by index, with the error a single request would have had.
    pub rejected: Vec<Rejected>,
}

/// Create (or with `upsert=true`, update) many twins. A 200 means every item not listed in
/// `rejected` is durable. Items are applied in order: an item may name as its parent a twin
/// created by an earlier item of the same body.
#[utoipa::path(post, path = "/v1/twins/bulk", tag = "twins", params(BulkParams),
    request_body(content = Vec<NewTwin>, description = "JSON array, or NDJSON with Content-Type application/x-ndjson, of twins as for POST /v1/twins"),
    responses((status = 200, body = BulkResult), (status = 400, body = ErrorBody),
              (status = 413, description = "body over the ingest limit, or too many items", body = ErrorBody),
              (status = 429, body = ErrorBody)))]
pub async fn create(
    State(s): State<AppState>,
    Extension(MaxItems(max)): Extension<MaxItems>,
    Query(p): Query<BulkParams>,
    req: Request,
) -> Result<axum::Json<BulkResult>, ApiError> {
    let ndjson = is_ndjson(req.headers());
    let body = body_bytes(req, &()).await?;
    let (items, mut rejected) = parse_off_thread(body, move |b| {
        let (mut items, bad) = parse_items::<NewTwin>(b, ndjson, max)?;
        // Ids are made here, beside the parsing, rather than one at a time on the single
        // writer (each takes the OS's randomness).
        for (_, n) in &mut items {
            n.id.get_or_insert_with(TwinId::new_v7);
        }
        Ok((items, bad))
    })
    .await?;
    let total = items.len() + rejected.len();
    let (index, twins): (Vec<usize>, Vec<NewTwin>) = items.into_iter().unzip();
    let outcome = s.registry.provision(twins, p.upsert).await?;
    let mut ids = vec![None; total];
    for (i, id) in index.iter().zip(outcome.ids) {
        ids[*i] = id;
    }
    rejected.extend(outcome.rejected.into_iter().map(|(i, e)| Rejected {
        index: index[i],
        error: ApiError::from(e).body()["error"].clone(),
    }));
    rejected.sort_by_key(|r| r.index);
    Ok(axum::Json(BulkResult {
        created: outcome.created,
        updated: outcome.updated,
        ids,
        rejected,
    }))
}
