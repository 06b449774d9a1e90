//! `/v1/events`: the event stream as Server-Sent Events and WebSocket, and the stored log.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use super::extract::Query;
use super::{ApiError, AppState};
use crate::events::subscribe::MAX_FILTER_TWINS;
use crate::events::{Filter, Item, Subscription};
use crate::types::TwinId;

/// Most subscribers (SSE and WebSocket together); more are answered 429.
pub const MAX_SUBSCRIBERS: usize = 20_000;
/// Most events one `GET /v1/events/log` returns.
pub const MAX_LOG_PAGE: usize = 10_000;
/// Keep-alive comment interval on idle streams.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Filters shared by every event route.
#[derive(Deserialize, IntoParams, Default)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Comma-separated twin ids.
    twin_id: Option<String>,
    entity_type: Option<String>,
    /// Comma-separated event types, e.g. `twin.updated,alert`.
    types: Option<String>,
    parent_id: Option<TwinId>,
    ancestor_id: Option<TwinId>,
    /// Resume after this sequence number (the `Last-Event-ID` header does the same for SSE).
    since: Option<u64>,
    /// `/v1/events/log` only: events after this sequence number (default 0: the oldest held).
    after: Option<u64>,
    /// `/v1/events/log` only: at most this many events (default 1000, at most 10000).
    limit: Option<usize>,
    /// The event streams only: the token, for clients that cannot set `Authorization`
    /// (a browser's `EventSource` or `WebSocket`). Checked by the auth layer.
    #[allow(dead_code)]
    access_token: Option<String>,
}

impl EventParams {
    fn filter(&self) -> Result<Filter, ApiError> {
        let mut twin_ids = Vec::new();
        for part in self.twin_id.iter().flat_map(|s| s.split(',')) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            twin_ids.push(
                part.parse::<TwinId>().map_err(|_| {
                    ApiError::BadRequest(format!("twin_id: {part:?} is not a UUID"))
                })?,
            );
        }
        if twin_ids.len() > MAX_FILTER_TWINS {
            return Err(ApiError::BadRequest(format!(
                "twin_id names at most {MAX_FILTER_TWINS} twins"
            )));
        }
        let types = match &self.types {
            Some(t) => Filter::parse_types(t).map_err(ApiError::BadRequest)?,
            None => 0,
        };
        Ok(Filter {
            twin_ids,
            entity_type: self.entity_type.clone(),
            types,
            parent_id: self.parent_id,
            ancestor_id: self.ancestor_id,
        })
    }
}

fn open(
    s: &AppState,
    p: &EventParams,
    last_event_id: Option<u64>,
) -> Result<Subscription, ApiError> {
    let filter = p.filter()?;
    if s.events.subscriber_count() >= MAX_SUBSCRIBERS {
        return Err(ApiError::Overloaded(format!(
            "{MAX_SUBSCRIBERS} subscribers are connected; try again later"
        )));
    }
    Ok(s.events
        .subscribe(s.registry.clone(), filter, last_event_id.or(p.since)))
}

/// The JSON of a lag notice.
fn lagged(from: u64, to: u64) -> String {
    json!({"type": "lagged", "from": from, "to": to, "missed": to - from + 1}).to_string()
}

/// Live events as Server-Sent Events; resumes after `Last-Event-ID` (or `since`).
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventParams),
    responses((status = 200, description = "text/event-stream of events; `id` is the sequence number; a `lagged` event names missed sequence numbers")))]
pub async fn sse(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(p): Query<EventParams>,
) -> Result<Response, ApiError> {
    let last = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest("Last-Event-ID must be a sequence number".into())
                })?,
        ),
        None => None,
    };
    let sub = open(&s, &p, last)?;
    let source = s.events.clone();
    let stream = futures::stream::unfold(sub, move |mut sub| {
        let source = source.clone();
        async move {
            let item = sub.next().await?;
            let ev = match item {
                Item::Event(e) => SseEvent::default()
                    .id(e.seq.to_string())
                    .data(e.json(source.source())),
                Item::Lagged { from, to } => {
                    SseEvent::default().event("lagged").data(lagged(from, to))
                }
            };
            Some((Ok::<_, Infallible>(ev), sub))
        }
    });
    // The stream ends when the server stops, so the connection can drain.
    let stopping = s.clone();
    let stream =
        futures::StreamExt::take_until(stream, Box::pin(async move { stopping.stopping().await }));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// The same stream over WebSocket: one text message per event (or lag notice).
#[utoipa::path(get, path = "/v1/events/ws", tag = "events", params(EventParams),
    responses((status = 101, description = "WebSocket of events")))]
pub async fn ws(
    State(s): State<AppState>,
    Query(p): Query<EventParams>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade
        .map_err(|e| ApiError::BadRequest(format!("this route speaks WebSocket only: {e}")))?;
    let sub = open(&s, &p, None)?;
    Ok(upgrade.on_upgrade(move |socket| pump(socket, sub, s)))
}

async fn pump(mut socket: WebSocket, mut sub: Subscription, s: AppState) {
    let log = s.events.clone();
    loop {
        tokio::select! {
            _ = s.stopping() => {
                // A close frame ("going away"), so the client knows to reconnect elsewhere
                // or later, resuming with `since`.
                let _ = socket
                    .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                        code: 1001,
                        reason: "server stopping".into(),
                    })))
                    .await;
                break;
            }
            item = sub.next() => {
                let text = match item {
                    Some(Item::Event(e)) => e.json(log.source()).to_owned(),
                    Some(Item::Lagged { from, to }) => lagged(from, to),
                    None => break,
                };
                if socket.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// One page of `GET /v1/events/log`, each event's JSON written out as it was made for the
/// streams (no re-parsing).
#[derive(Serialize, ToSchema)]
pub struct EventPage {
    /// The matching events, oldest first.
    #[schema(value_type = Vec<crate::events::Event>)]
    events: Vec<Box<serde_json::value::RawValue>>,
    /// Where to continue: pass it as `after`.
    next_after: u64,
    /// The oldest sequence number still held (in memory or persisted).
    first_available: Option<u64>,
    /// The next sequence number to be handed out.
    next_seq: u64,
}

/// Read the stored event log: the in-memory tail, then the persisted tail.
#[utoipa::path(get, path = "/v1/events/log", tag = "events", params(EventParams),
    responses((status = 200, body = EventPage)))]
pub async fn log(
    State(s): State<AppState>,
    Query(p): Query<EventParams>,
) -> Result<Response, ApiError> {
    let limit = p.limit.unwrap_or(1000);
    if !(1..=MAX_LOG_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LOG_PAGE}"
        )));
    }
    let filter = p.filter()?;
    let events = s.events.clone();
    let registry = s.registry.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut after = p.after.unwrap_or(0);
        let mut first_available = None;
        let mut next_seq = 0;
        // Examine at most a few pages so a sparse filter cannot turn one call into a full scan.
        for _ in 0..8 {
            let r = events.read_after(after, MAX_LOG_PAGE)?;
            first_available.get_or_insert(r.first_available);
            next_seq = r.next_seq;
            let Some(last) = r.events.last().map(|e| e.seq) else {
                break;
            };
            for e in r.events {
                if out.len() >= limit {
                    break;
                }
                after = e.seq;
                if filter.matches(&e, &registry) {
                    out.push(serde_json::value::RawValue::from_string(
                        e.json(events.source()).to_owned(),
                    )?);
                }
            }
            if out.len() >= limit || after < last {
                break;
            }
        }
        Ok::<_, anyhow::Error>(
            axum::Json(EventPage {
                events: out,
                next_after: after,
                first_available,
                next_seq,
            })
            .into_response(),
        )
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(e.to_string()))
}
