//! The event stream (API.md "Events"): the envelope and its CloudEvents attributes, filters
//! over SSE and WebSocket, resume after `Last-Event-ID` / `since` exactly once, lag notices for
//! a slow subscriber, the stored log (`/v1/events/log`), the persisted tail across restarts and
//! sequence numbers that never repeat (also after kill -9).
//!
//! This file holds what the event tests share; the tests are in the submodules.

mod crash;
mod log;
mod resume;
mod stream;

use chrono::Utc;
use serde_json::{json, Value};

use crate::common::{time, Server, NODE_ID};

// ---- helpers ---------------------------------------------------------------------------

async fn create(s: &Server, entity_type: &str, parent: Option<&str>, props: Value) -> String {
    let mut body = json!({"entity_type": entity_type, "properties": props});
    if let Some(p) = parent {
        body["parent_id"] = json!(p);
    }
    s.create_twin_id(&body).await
}

async fn patch(s: &Server, id: &str, props: Value) {
    s.patch(&format!("/v1/twins/{id}"), &props)
        .await
        .expect(200);
}

/// (type, twin_id, version) of events, for comparing lists.
fn summary(events: &[Value]) -> Vec<(String, String, u64)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("?").to_owned(),
                e["twin_id"].as_str().unwrap_or("?").to_owned(),
                e["version"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn ev(ty: &str, id: &str, version: u64) -> (String, String, u64) {
    (ty.to_owned(), id.to_owned(), version)
}

fn seq(e: &Value) -> u64 {
    e["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {e}"))
}

/// Sequence numbers strictly increase along a stream.
#[track_caller]
fn assert_increasing(events: &[Value], what: &str) {
    for w in events.windows(2) {
        assert!(
            seq(&w[0]) < seq(&w[1]),
            "{what}: seqs out of order: {} then {}",
            w[0],
            w[1]
        );
    }
}

/// The API.md envelope plus the CloudEvents 1.0 attributes of a twin event.
#[track_caller]
fn assert_envelope(
    e: &Value,
    ty: &str,
    twin: &str,
    entity_type: &str,
    version: u64,
    changed: &Value,
) {
    let s = seq(e);
    assert!(s > 0, "seq > 0: {e}");
    assert_eq!(e["type"], ty, "{e}");
    assert_eq!(e["twin_id"], twin, "{e}");
    assert_eq!(e["entity_type"], entity_type, "{e}");
    assert_eq!(e["version"], version, "{e}");
    assert_eq!(&e["changed"], changed, "{e}");
    let ts = time(&e["ts"]);
    assert!(
        (Utc::now() - ts).num_seconds().abs() < 120,
        "ts is about now: {e}"
    );
    // CloudEvents 1.0.
    assert_eq!(e["specversion"], "1.0", "{e}");
    assert_eq!(
        e["id"],
        s.to_string(),
        "CloudEvents id is the seq as a string: {e}"
    );
    assert_eq!(e["source"], format!("/twinhost/{NODE_ID}"), "{e}");
    assert_eq!(
        time(&e["time"]),
        ts,
        "CloudEvents time is the event time: {e}"
    );
    assert_eq!(e["subject"], twin, "CloudEvents subject is the twin: {e}");
}

/// `GET /v1/events/log` (asserts 200).
async fn log_page(s: &Server, query: &str) -> Value {
    let r = s.get(&format!("/v1/events/log?{query}")).await;
    r.expect(200);
    for k in ["events", "next_after", "first_available", "next_seq"] {
        assert!(!r.body[k].is_null(), "{k} in the log page: {}", r.text);
    }
    r.body
}

/// Every stored event after `after` (following `next_after`).
async fn log_all(s: &Server, after: u64, filter: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = after;
    for _ in 0..1000 {
        let p = log_page(s, &format!("after={after}&limit=10000&{filter}")).await;
        let evs = p["events"].as_array().unwrap().clone();
        let next = p["next_after"].as_u64().unwrap();
        let done = next == after || next + 1 >= p["next_seq"].as_u64().unwrap();
        out.extend(evs);
        after = next;
        if done {
            return out;
        }
    }
    panic!("the log did not end");
}

/// The highest seq handed out so far (`next_seq - 1` of the log).
async fn last_seq(s: &Server) -> u64 {
    log_page(s, "after=0&limit=1").await["next_seq"]
        .as_u64()
        .unwrap()
        - 1
}

/// Resident memory of a process in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = st.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
