//! Origins over the router: every event names the node its change was made on — this node for
//! its own writes, the writing node for a change merged from a peer — in the log and after a
//! restart; behaviors and rules react to changes of local origin unless they say
//! `"on": "all"`, while a merged change is stored and evented either way.
//!
//! Merged changes enter through `Registry::apply_remote`, the one function sync feeds, built
//! from JSON as a peer's change feed (`GET /v1/changes`) writes its items.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};

use super::{App, Body, Method, NODE_ID};
use crate::registry::RemoteChange;
use crate::types::{hlc_at, HLC_COUNTER_BITS};

/// The peer the merged changes come from.
const PEER: &str = "edge-2";

/// A clock a second ahead of now, and a millisecond past the last one handed out: newer than
/// anything written here so far (a merge pulls this node's clock up to the clocks it sees,
/// so the writes after it count up from there), and well within what a remote clock may be
/// ahead of this node's.
fn peer_clock() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let ahead = hlc_at(Utc::now() + chrono::Duration::seconds(1));
    let step = 1 << HLC_COUNTER_BITS;
    let prev = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(ahead.max(last + step))
        })
        .expect("the update always succeeds");
    ahead.max(prev + step)
}

/// `properties` written on the peer to twin `id` (created there when it is new here), as the
/// peer's feed would show it after its `n`-th change of the twin.
fn peer_write(id: &str, n: u64, properties: Value) -> RemoteChange {
    let hlc = peer_clock();
    let clocks: serde_json::Map<String, Value> = properties
        .as_object()
        .expect("properties are an object")
        .keys()
        .map(|k| (k.clone(), json!({"hlc": hlc, "origin": PEER})))
        .collect();
    serde_json::from_value(json!({
        "twin_id": id, "entity_type": "machine", "deleted": false,
        "vclock": {PEER: n}, "hlc": hlc, "lifecycle": "active",
        "properties": properties, "clocks": clocks,
    }))
    .expect("a feed item")
}

/// Merge changes from the peer; each must change something here.
async fn merge(app: &App, changes: Vec<RemoteChange>) {
    let n = changes.len();
    let out = app
        .node
        .registry
        .apply_remote(changes)
        .await
        .expect("merging");
    assert_eq!(out.applied, n, "{out:?}");
}

/// The stored event log, oldest first.
async fn log(app: &App) -> Vec<Value> {
    let r = app.get("/v1/events/log?limit=10000").await;
    r.expect(200);
    r.body["events"].as_array().expect("events").clone()
}

/// The log once `ready` holds on it (behaviors and rules act asynchronously).
async fn log_when(app: &App, what: &str, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let events = log(app).await;
        if ready(&events) {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not in the log: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sequence number of the event of `kind` about twin `id` (the first one).
fn seq_of(events: &[Value], kind: &str, id: &str) -> u64 {
    seq_where(events, |e| e["type"] == kind && e["twin_id"] == id)
}

/// The sequence number of the first event that `which` picks.
fn seq_where(events: &[Value], which: impl Fn(&Value) -> bool) -> u64 {
    events
        .iter()
        .find(|e| which(e))
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or_else(|| panic!("no such event in {events:#?}"))
}

/// A guest component built by `scripts/build-guests.sh`.
fn guest(file: &str) -> Vec<u8> {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../guests/target/wasm32-wasip2/release")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the guests first (scripts/build-guests.sh)",
            path.display()
        )
    })
}

/// The sequence numbers of the events that triggered the alerts in the log.
fn alert_triggers(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["type"] == "alert")
        .filter_map(|e| e["data"]["trigger_seq"].as_u64())
        .collect()
}

#[tokio::test]
async fn every_event_names_its_origin_and_keeps_it_across_a_restart() {
    let app = App::start().await;
    let local = app
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 60}}))
        .await;
    app.patch(&format!("/v1/twins/{local}"), &json!({"temperature": 61}))
        .await
        .expect(200);
    // The peer writes the local twin's `status` and creates a twin of its own, then deletes
    // it (a delete brings no property clock: its version vector names the peer).
    let remote = uuid::Uuid::now_v7().to_string();
    merge(
        &app,
        vec![
            peer_write(&local, 1, json!({"status": "ok"})),
            peer_write(&remote, 1, json!({"temperature": 70})),
        ],
    )
    .await;
    let delete: RemoteChange = serde_json::from_value(json!({
        "twin_id": remote, "entity_type": "machine", "deleted": true,
        "vclock": {PEER: 2}, "hlc": peer_clock(),
    }))
    .expect("a feed tombstone");
    merge(&app, vec![delete]).await;
    // A relationship is this node's own change.
    app.put(
        &format!("/v1/twins/{local}/relationships/feeds/{local}"),
        &json!({}),
    )
    .await
    .expect(201);

    let events = log(&app).await;
    let origins: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            let origin = e["origin"]
                .as_str()
                .unwrap_or_else(|| panic!("an event without its origin: {e}"));
            let twin = if e["twin_id"] == local.as_str() {
                "local"
            } else {
                "remote"
            };
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                twin.to_owned(),
                origin.to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = [
        ("twin.created", "local", NODE_ID),
        ("twin.updated", "local", NODE_ID),
        ("twin.updated", "local", PEER),
        ("twin.created", "remote", PEER),
        ("twin.deleted", "remote", PEER),
        ("relationship.changed", "local", NODE_ID),
    ]
    .iter()
    .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
    .collect();
    assert_eq!(origins, want);
    // The merged write is stored as the peer's, and evented with what it changed.
    let merged = events
        .iter()
        .find(|e| e["origin"] == PEER && e["twin_id"] == local.as_str())
        .expect("the merged update");
    assert_eq!(merged["changed"], json!({"status": "ok"}));

    // Shut down (the event tail is persisted) and start again: the log reads the same.
    let app = app.restart().await;
    assert_eq!(log(&app).await, events);
}

#[tokio::test]
async fn a_rule_evaluates_remote_changes_only_when_it_says_on_all() {
    let app = App::start().await;
    let rule = json!({"kind": "threshold", "entity_type": "machine", "property": "temperature",
                      "op": ">", "value": 85, "actions": [{"type": "alert"}]});
    app.put("/v1/rules/hot", &rule).await.expect(201);
    let shown = app.get("/v1/rules/hot").await;
    assert_eq!(shown.body["spec"]["on"], "local", "{}", shown.text);

    // A hot reading merged from the peer, then one made here: only the local one fires (the
    // rule sees events in log order, so once the local alert is there the remote event was
    // evaluated too).
    let remote = uuid::Uuid::now_v7().to_string();
    merge(
        &app,
        vec![peer_write(&remote, 1, json!({"temperature": 91}))],
    )
    .await;
    let local = app
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 91}}))
        .await;
    let events = log_when(&app, "the local alert", |ev| !alert_triggers(ev).is_empty()).await;
    assert_eq!(
        alert_triggers(&events),
        vec![seq_of(&events, "twin.created", &local)],
        "only the local reading fired"
    );
    // The remote reading is stored and evented all the same.
    app.get(&format!("/v1/twins/{remote}")).await.expect(200);
    seq_of(&events, "twin.created", &remote);

    // The same rule with `"on": "all"` fires on a reading merged from the peer.
    let mut all = rule.clone();
    all["on"] = json!("all");
    app.put("/v1/rules/hot", &all).await.expect(200);
    assert_eq!(app.get("/v1/rules/hot").await.body["spec"]["on"], "all");
    let again = uuid::Uuid::now_v7().to_string();
    merge(
        &app,
        vec![peer_write(&again, 1, json!({"temperature": 95}))],
    )
    .await;
    let events = log_when(&app, "the alert on the merged reading", |ev| {
        alert_triggers(ev).len() == 2
    })
    .await;
    let seq = seq_of(&events, "twin.created", &again);
    assert_eq!(alert_triggers(&events)[1], seq);
    // The alert is this node's: it was raised here.
    let alert = events.iter().rfind(|e| e["type"] == "alert").unwrap();
    assert_eq!(alert["origin"], NODE_ID);

    // A value `on` does not know is refused, and named by its field.
    let mut bad = rule;
    bad["on"] = json!("remote");
    let r = app.put("/v1/rules/odd", &bad).await;
    r.expect_error(422, "validation_failed");
    assert!(
        r.text.contains(r#"on: \"remote\" is neither \"local\""#),
        "{}",
        r.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_behavior_runs_on_remote_changes_only_when_bound_on_all() {
    let app = App::start().await;
    let wasm = guest("thermal_monitor.wasm");
    app.call(
        Method::PUT,
        "/v1/modules/thermal-monitor",
        Body::Raw(&wasm, "application/wasm"),
    )
    .await
    .expect(201);
    let binding = json!({"module": "thermal-monitor", "entity_type": "machine"});
    let r = app.put("/v1/behaviors/overheat", &binding).await;
    r.expect(201);
    assert_eq!(r.body["on"], "local", "{}", r.text);

    // One twin, so every event runs in the behavior's same lane, in log order: a hot reading
    // merged from the peer, then one made here. Only the local one runs the behavior (once
    // its alert is in the log, the remote event was dispatched before it).
    let id = app
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 60}}))
        .await;
    merge(&app, vec![peer_write(&id, 1, json!({"temperature": 91}))]).await;
    app.patch(&format!("/v1/twins/{id}"), &json!({"temperature": 92}))
        .await
        .expect(200);
    let events = log_when(&app, "the behavior's alert", |ev| {
        !alert_triggers(ev).is_empty()
    })
    .await;
    let local = seq_where(&events, |e| e["changed"]["temperature"] == 92);
    assert_eq!(alert_triggers(&events), vec![local]);
    let remote = seq_where(&events, |e| e["changed"]["temperature"] == 91);
    assert_eq!(events[0]["origin"], NODE_ID);
    assert_eq!(
        events.iter().find(|e| e["seq"] == remote).unwrap()["origin"],
        PEER
    );
    // The creation and the local reading ran it; the merged reading did not.
    assert_eq!(app.get("/v1/behaviors/overheat").await.body["runs"], 2);

    // Bound with `"on": "all"`, it runs on a reading merged from the peer too.
    let mut all = binding.clone();
    all["on"] = json!("all");
    let r = app.put("/v1/behaviors/overheat", &all).await;
    r.expect(200);
    assert_eq!(r.body["on"], "all");
    merge(&app, vec![peer_write(&id, 2, json!({"temperature": 95}))]).await;
    let events = log_when(&app, "the alert on the merged reading", |ev| {
        alert_triggers(ev).len() == 2
    })
    .await;
    let merged = seq_where(&events, |e| e["changed"]["temperature"] == 95);
    assert_eq!(alert_triggers(&events), vec![local, merged]);

    // A value `on` does not know is refused, and named by its field.
    let mut bad = binding;
    bad["on"] = json!("remote");
    let r = app.put("/v1/behaviors/odd", &bad).await;
    r.expect_error(400, "bad_request");
    assert!(
        r.text.contains(r#"on: \"remote\" is neither"#),
        "{}",
        r.text
    );
}
