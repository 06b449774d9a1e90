//! `POST /v1/ingest`: bulk property updates as a JSON array or NDJSON, applied with one
//! durable commit per request. Items are parsed one by one so a bad item is rejected by index
//! without stopping the rest. The parsing and the admission of bulk requests are shared with
//! `POST /v1/twins/bulk` ([`super::bulk`]).

use axum::extract::{Request, State};
use axum::http::header;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use utoipa::ToSchema;

use super::error::ErrorBody;
use super::extract::{body_bytes, json_error};
use super::{ApiError, AppState};
use crate::registry::Update;
use crate::types::{Properties, TwinId};

/// One ingest item.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestItem {
    pub twin_id: TwinId,
    #[schema(value_type = Object)]
    pub properties: Properties,
    #[serde(default, deserialize_with = "rfc3339")]
    pub ts: Option<DateTime<Utc>>,
}

/// How far an item's `ts` may be ahead of this server's clock. Event time drives history and
/// the rules' windows: one reading dated next year would close every window until then.
pub const MAX_TS_AHEAD: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// `ts` as an RFC 3339 time no more than [`MAX_TS_AHEAD`] in the future, with an error that
/// names the field and the expected form.
fn rfc3339<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    use serde::de::Error;
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    let ts = DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            D::Error::custom(format!(
                "ts {text:?} is not an RFC 3339 time like 2026-11-25T12:00:00Z ({e})"
            ))
        })?;
    if ts > Utc::now() + MAX_TS_AHEAD {
        return Err(D::Error::custom(format!(
            "ts {text:?} is more than {} minutes ahead of this server's clock",
            MAX_TS_AHEAD.num_minutes()
        )));
    }
    Ok(Some(ts))
}

#[derive(Serialize, ToSchema)]
pub struct Rejected {
    pub index: usize,
    #[schema(value_type = Object)]
    pub error: Value,
}

#[derive(Serialize, ToSchema)]
pub struct IngestResult {
    pub applied: usize,
    pub rejected: Vec<Rejected>,
}

/// Admit a bulk request (ingest or bulk provisioning) only while fewer than the configured
/// number are running;
/// otherwise answer 429 with `Retry-After` without parsing or applying anything.
pub async fn admit(
    State(slots): State<std::sync::Arc<tokio::sync::Semaphore>>,
    req: Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    match slots.try_acquire() {
        Ok(_permit) => Ok(next.run(req).await),
        Err(_) => {
            // Read and drop the body (up to the default ingest limit) before answering, so a
            // client still sending it gets the 429 rather than a broken pipe.
            let mut body = req.into_body().into_data_stream();
            let mut seen = 0usize;
            while let Some(Ok(chunk)) = futures::StreamExt::next(&mut body).await {
                seen += chunk.len();
                if seen > super::DEFAULT_MAX_INGEST_BYTES {
                    break;
                }
            }
            Err(ApiError::Overloaded(
                "too many bulk requests (ingest, twins/bulk) at once; retry after the Retry-After delay"
                    .into(),
            ))
        }
    }
}

/// Bodies above this size are parsed on the blocking pool so they don't stall other requests.
const PARSE_INLINE_MAX: usize = 256 * 1024;

/// Parsed items with their index in the body, and the items that did not parse.
pub type Parsed<T> = (Vec<(usize, T)>, Vec<Rejected>);

/// Whether the request says its body is NDJSON (else a JSON array is expected, though a body
/// that does not start with `[` is read as NDJSON all the same).
pub fn is_ndjson(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("ndjson") || ct.contains("jsonlines"))
}

/// Parse a body of items — a JSON array, or NDJSON (one item per line, blank lines skipped)
/// — one item at a time, so a bad item is rejected by its index without stopping the rest.
/// A body without items is a 400; one with more than `max_items` a 413.
pub fn parse_items<T: DeserializeOwned>(
    body: &[u8],
    ndjson: bool,
    max_items: usize,
) -> Result<Parsed<T>, ApiError> {
    let too_many = || {
        ApiError::PayloadTooLarge(format!(
            "the body holds more than {max_items} items; send at most {max_items} per request"
        ))
    };
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    let mut take = |i: usize, text: &[u8], r: Result<T, serde_json::Error>| match r {
        Ok(it) => ok.push((i, it)),
        Err(e) => bad.push(Rejected {
            index: i,
            error: json_error(text, e, "invalid item").body()["error"].clone(),
        }),
    };
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if !ndjson && first == Some(&b'[') {
        let items: Vec<&RawValue> = serde_json::from_slice(body)
            .map_err(|e| ApiError::InvalidJson(format!("malformed JSON array: {e}")))?;
        if items.len() > max_items {
            return Err(too_many());
        }
        for (i, raw) in items.into_iter().enumerate() {
            take(i, raw.get().as_bytes(), serde_json::from_str(raw.get()));
        }
    } else {
        let mut i = 0;
        for line in body.split(|b| *b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if i == max_items {
                return Err(too_many());
            }
            take(i, line, serde_json::from_slice(line));
            i += 1;
        }
    }
    if ok.is_empty() && bad.is_empty() {
        return Err(ApiError::BadRequest("the body holds no items".into()));
    }
    Ok((ok, bad))
}

/// Parse a body into updates, collecting per-item errors.
pub fn parse(body: &[u8], ndjson: bool) -> Result<Parsed<Update>, ApiError> {
    let (ok, bad) = parse_items::<IngestItem>(body, ndjson, usize::MAX)?;
    let ok = ok
        .into_iter()
        .map(|(i, it)| {
            let u = Update {
                twin_id: it.twin_id,
                patch: it.properties,
                ts: it.ts,
                if_match: None,
                cause: None,
            };
            (i, u)
        })
        .collect();
    Ok((ok, bad))
}

/// Run `parse` on `body`: inline when it is small, else on the blocking pool so a large body
/// does not stall other requests.
pub async fn parse_off_thread<R: Send + 'static>(
    body: axum::body::Bytes,
    parse: impl FnOnce(&[u8]) -> Result<R, ApiError> + Send + 'static,
) -> Result<R, ApiError> {
    if body.len() <= PARSE_INLINE_MAX {
        return parse(&body);
    }
    tokio::task::spawn_blocking(move || parse(&body))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
}

/// Bulk ingest. A 200 means every applied update is durable.
#[utoipa::path(post, path = "/v1/ingest", tag = "twins",
    request_body(content = Vec<IngestItem>, description = "JSON array, or NDJSON with Content-Type application/x-ndjson"),
    responses((status = 200, body = IngestResult), (status = 400, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn ingest(
    State(s): State<AppState>,
    req: Request,
) -> Result<axum::Json<IngestResult>, ApiError> {
    let ndjson = is_ndjson(req.headers());
    let body = body_bytes(req, &()).await?;
    let (items, mut rejected) = parse_off_thread(body, move |b| parse(b, ndjson)).await?;
    let (index, updates): (Vec<usize>, Vec<Update>) = items.into_iter().unzip();
    let outcome = s.registry.apply_batch(updates).await?;
    rejected.extend(outcome.rejected.into_iter().map(|(i, e)| Rejected {
        index: index[i],
        error: ApiError::from(e).body()["error"].clone(),
    }));
    rejected.sort_by_key(|r| r.index);
    Ok(axum::Json(IngestResult {
        applied: outcome.applied,
        rejected,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_items_are_rejected_by_index() {
        let id = TwinId::new_v7();
        let body = format!(
            "{{\"twin_id\":\"{id}\",\"properties\":{{\"t\":1}}}}\n\nnot json\n{{\"twin_id\":\"nope\",\"properties\":{{}}}}\n{{\"twin_id\":\"{id}\",\"properties\":{{\"t\":2}}}}\n"
        );
        let (ok, bad) = parse(body.as_bytes(), true).unwrap();
        assert_eq!(ok.iter().map(|o| o.0).collect::<Vec<_>>(), vec![0, 3]);
        assert_eq!(bad.iter().map(|b| b.index).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(bad[0].error["code"], "invalid_json");
        assert_eq!(bad[1].error["code"], "bad_request");
    }

    #[test]
    fn json_array_items() {
        let id = TwinId::new_v7();
        let body = format!("[{{\"twin_id\":\"{id}\",\"properties\":{{}}}}, 5]");
        let (ok, bad) = parse(body.as_bytes(), false).unwrap();
        assert_eq!((ok.len(), bad.len(), bad[0].index), (1, 1, 1));
        assert!(parse(b"[1,", false).is_err());
        assert!(parse(b"   ", false).is_err());
    }

    #[test]
    fn more_items_than_the_bound_is_413_before_any_is_parsed() {
        let code = |body: &[u8], ndjson| {
            parse_items::<Value>(body, ndjson, 2)
                .map(|(ok, bad)| (ok.len(), bad.len()))
                .map_err(|e| e.code())
        };
        assert_eq!(code(b"1\n\n2\n", true), Ok((2, 0)));
        assert_eq!(code(b"1\n2\n{bad", true), Err("payload_too_large"));
        assert_eq!(code(b"[1, 2]", false), Ok((2, 0)));
        assert_eq!(code(b"[1, 2, 3]", false), Err("payload_too_large"));
    }
}
