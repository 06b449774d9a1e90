//! Live streams: a write's event is in the log when it is acknowledged, filters over SSE and
//! WebSocket, bad parameters refused on every event route, and streams that end on SIGTERM.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use super::{
    assert_envelope, assert_increasing, create, ev, last_seq, log_all, log_page, patch, seq,
    summary,
};
use crate::common::stream::WsOpen;
use crate::common::{assert_error_shape, Body, Server};

// ---- 1. filters over SSE ---------------------------------------------------------------

/// A write's event is in the log by the time the write is acknowledged: a client that reads
/// the log right after its 2xx finds it (the event log is appended before the ack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_write_is_already_in_the_log() {
    let s = Server::start();
    let id = create(&s, "machine", None, json!({"n": 0})).await;
    let other = create(&s, "machine", None, json!({"n": 0})).await;
    // Load in the same commits: big ingests whose thousands of events are published in the
    // same commit as the patch (the race this guards against only shows under load).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (client, stop) = (s.client().clone(), stop.clone());
        tokio::spawn(async move {
            let batch: Value = (0..5000)
                .map(|i| json!({"twin_id": other, "properties": {"n": i}}))
                .collect();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client.post("/v1/ingest", &batch).await.expect(200);
            }
        })
    };
    let mut after = last_seq(&s).await;
    for i in 1..=100u64 {
        patch(&s, &id, json!({"n": i})).await;
        let page = log_page(&s, &format!("twin_id={id}&after={after}&limit=10")).await;
        let evs = page["events"].as_array().unwrap();
        assert_eq!(
            evs.len(),
            1,
            "patch {i}: its event right after the 200: {page}"
        );
        assert_eq!(evs[0]["changed"], json!({"n": i}));
        after = seq(&evs[0]);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_filters() {
    let s = Server::start();
    let building = create(&s, "building", None, json!({"name": "B1"})).await;
    let line = create(&s, "line", Some(&building), json!({"name": "L1"})).await;
    let machine = create(&s, "machine", Some(&line), json!({"temperature": 70})).await;
    let sensor = create(&s, "sensor", Some(&line), json!({"value": 1})).await;
    // A machine outside the hierarchy.
    let other = create(&s, "machine", None, json!({"temperature": 1})).await;

    let mut by_type = s.sse("entity_type=machine&types=twin.updated", &[]).await;
    let mut by_ids = s.sse(&format!("twin_id={sensor},{other}"), &[]).await;
    let mut by_parent = s.sse(&format!("parent_id={line}"), &[]).await;
    let mut by_ancestor = s.sse(&format!("ancestor_id={building}"), &[]).await;
    let mut by_types = s.sse("types=twin.created,twin.deleted", &[]).await;
    let mut all = s.sse("", &[]).await;

    patch(&s, &building, json!({"floors": 3})).await;
    patch(&s, &line, json!({"speed": 2})).await;
    patch(&s, &sensor, json!({"value": 2})).await;
    patch(&s, &machine, json!({"temperature": 71})).await;
    patch(&s, &other, json!({"temperature": 5})).await;
    let machine2 = create(&s, "machine", Some(&line), json!({"temperature": 20})).await;
    let r = s.delete(&format!("/v1/twins/{machine2}")).await;
    assert!(r.status / 100 == 2, "deleting: {} {}", r.status, r.text);
    patch(&s, &machine, json!({"temperature": 72, "status": "ok"})).await;

    // Unfiltered: every change, in commit order.
    let everything = all.take(8, "unfiltered").await;
    all.expect_quiet("unfiltered").await;
    assert_increasing(&everything, "unfiltered");
    assert_eq!(
        summary(&everything),
        vec![
            ev("twin.updated", &building, 2),
            ev("twin.updated", &line, 2),
            ev("twin.updated", &sensor, 2),
            ev("twin.updated", &machine, 2),
            ev("twin.updated", &other, 2),
            ev("twin.created", &machine2, 1),
            ev("twin.deleted", &machine2, 1),
            ev("twin.updated", &machine, 3),
        ]
    );
    for w in everything.windows(2) {
        assert_eq!(
            seq(&w[0]) + 1,
            seq(&w[1]),
            "consecutive changes get consecutive seqs"
        );
    }

    // entity_type=machine&types=twin.updated: only machine updates (not the sensor's, not
    // machine2's creation or deletion).
    let got = by_type.take(3, "entity_type+types").await;
    by_type.expect_quiet("entity_type+types").await;
    assert_eq!(
        summary(&got),
        vec![
            ev("twin.updated", &machine, 2),
            ev("twin.updated", &other, 2),
            ev("twin.updated", &machine, 3),
        ]
    );
    assert_envelope(
        &got[0],
        "twin.updated",
        &machine,
        "machine",
        2,
        &json!({"temperature": 71}),
    );
    assert_envelope(
        &got[2],
        "twin.updated",
        &machine,
        "machine",
        3,
        &json!({"temperature": 72, "status": "ok"}),
    );
    assert_eq!(got[0]["parent_id"], line.as_str(), "{}", got[0]);
    // The same event from every stream and from the stored log is the same document.
    assert_eq!(got[0], everything[3]);
    let stored = log_page(&s, &format!("after={}&limit=1", seq(&got[0]) - 1)).await;
    assert_eq!(
        stored["events"][0], got[0],
        "the log holds the same envelope"
    );

    // twin_id=a,b.
    let got = by_ids.take(2, "twin_id list").await;
    by_ids.expect_quiet("twin_id list").await;
    assert_eq!(
        summary(&got),
        vec![
            ev("twin.updated", &sensor, 2),
            ev("twin.updated", &other, 2)
        ]
    );
    assert_envelope(
        &got[0],
        "twin.updated",
        &sensor,
        "sensor",
        2,
        &json!({"value": 2}),
    );

    // parent_id=line: the line's children only.
    let got = by_parent.take(5, "parent_id").await;
    by_parent.expect_quiet("parent_id").await;
    assert_eq!(
        summary(&got),
        vec![
            ev("twin.updated", &sensor, 2),
            ev("twin.updated", &machine, 2),
            ev("twin.created", &machine2, 1),
            ev("twin.deleted", &machine2, 1),
            ev("twin.updated", &machine, 3),
        ]
    );
    assert_envelope(
        &got[2],
        "twin.created",
        &machine2,
        "machine",
        1,
        &json!({"temperature": 20}),
    );

    // ancestor_id=building: everything below the building (the line, its children,
    // the machine two levels down), not the building itself nor the outside machine.
    let got = by_ancestor.take(6, "ancestor_id").await;
    by_ancestor.expect_quiet("ancestor_id").await;
    assert_eq!(
        summary(&got),
        vec![
            ev("twin.updated", &line, 2),
            ev("twin.updated", &sensor, 2),
            ev("twin.updated", &machine, 2),
            ev("twin.created", &machine2, 1),
            ev("twin.deleted", &machine2, 1),
            ev("twin.updated", &machine, 3),
        ]
    );

    // types=a,b.
    let got = by_types.take(2, "types list").await;
    by_types.expect_quiet("types list").await;
    assert_eq!(
        summary(&got),
        vec![
            ev("twin.created", &machine2, 1),
            ev("twin.deleted", &machine2, 1)
        ]
    );
    assert_eq!(got[1]["subject"], machine2.as_str());
    assert_eq!(got[1]["specversion"], "1.0");

    // /v1/events/log takes the same filters.
    let stored = log_all(&s, 0, &format!("ancestor_id={building}&types=twin.updated")).await;
    assert_eq!(
        summary(&stored),
        vec![
            ev("twin.updated", &line, 2),
            ev("twin.updated", &sensor, 2),
            ev("twin.updated", &machine, 2),
            ev("twin.updated", &machine, 3),
        ]
    );
    let stored = log_all(&s, 0, "types=twin.created").await;
    assert_eq!(stored.len(), 6, "six twins were created: {stored:?}");
    assert_eq!(
        seq(&stored[0]),
        1,
        "the first event of a fresh node is seq 1"
    );
}

// ---- 2. WebSocket ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_filters_and_since() {
    let s = Server::start();
    let building = create(&s, "building", None, json!({})).await;
    let line = create(&s, "line", Some(&building), json!({})).await;
    let machine = create(&s, "machine", Some(&line), json!({"temperature": 70})).await;
    let sensor = create(&s, "sensor", Some(&line), json!({"value": 1})).await;

    let mut by_type = s.ws("entity_type=machine&types=twin.updated").await;
    let mut by_ids = s.ws(&format!("twin_id={sensor}")).await;
    let mut by_ancestor = s.ws(&format!("ancestor_id={building}")).await;
    let mut all = s.ws("").await;

    patch(&s, &building, json!({"floors": 1})).await;
    patch(&s, &sensor, json!({"value": 2})).await;
    patch(&s, &machine, json!({"temperature": 71})).await;
    let machine2 = create(&s, "machine", None, json!({"temperature": 5})).await;
    patch(&s, &machine, json!({"temperature": 72})).await;

    let everything = all.take(5, "ws unfiltered").await;
    all.expect_quiet("ws unfiltered").await;
    assert_eq!(
        summary(&everything),
        vec![
            ev("twin.updated", &building, 2),
            ev("twin.updated", &sensor, 2),
            ev("twin.updated", &machine, 2),
            ev("twin.created", &machine2, 1),
            ev("twin.updated", &machine, 3),
        ]
    );
    assert_increasing(&everything, "ws unfiltered");

    let got = by_type.take(2, "ws entity_type+types").await;
    by_type.expect_quiet("ws entity_type+types").await;
    assert_eq!(
        summary(&got),
        vec![
            ev("twin.updated", &machine, 2),
            ev("twin.updated", &machine, 3)
        ]
    );
    assert_envelope(
        &got[0],
        "twin.updated",
        &machine,
        "machine",
        2,
        &json!({"temperature": 71}),
    );
    assert_eq!(got[0], everything[2], "the same document over every stream");

    let got = by_ids.take(1, "ws twin_id").await;
    by_ids.expect_quiet("ws twin_id").await;
    assert_eq!(summary(&got), vec![ev("twin.updated", &sensor, 2)]);
    assert_envelope(
        &got[0],
        "twin.updated",
        &sensor,
        "sensor",
        2,
        &json!({"value": 2}),
    );

    let got = by_ancestor.take(3, "ws ancestor_id").await;
    by_ancestor.expect_quiet("ws ancestor_id").await;
    assert_eq!(
        summary(&got),
        vec![
            ev("twin.updated", &sensor, 2),
            ev("twin.updated", &machine, 2),
            ev("twin.updated", &machine, 3),
        ]
    );

    // since=N replays the stored events after N that match, exactly once, then goes live.
    let k = seq(&everything[2]); // the machine's first update
    let mut resumed = s.ws(&format!("since={}&twin_id={machine}", k - 1)).await;
    let got = resumed.take(2, "ws since replay").await;
    assert_eq!(
        summary(&got),
        vec![
            ev("twin.updated", &machine, 2),
            ev("twin.updated", &machine, 3)
        ]
    );
    assert_eq!(seq(&got[0]), k);
    resumed.expect_quiet("ws since replay").await;
    patch(&s, &machine, json!({"temperature": 73})).await;
    let live = resumed.take(1, "ws since live").await;
    assert_eq!(summary(&live), vec![ev("twin.updated", &machine, 4)]);
    assert_eq!(seq(&live[0]), seq(&got[1]) + 1, "nothing in between");
    resumed.expect_quiet("ws since live").await;

    // since=0 with a type filter: the whole stored history of that type, oldest first.
    let mut created = s.ws("since=0&types=twin.created").await;
    let got = created.take(5, "ws since=0").await;
    created.expect_quiet("ws since=0").await;
    assert_eq!(
        summary(&got),
        vec![
            ev("twin.created", &building, 1),
            ev("twin.created", &line, 1),
            ev("twin.created", &machine, 1),
            ev("twin.created", &sensor, 1),
            ev("twin.created", &machine2, 1),
        ]
    );
    assert_eq!(seq(&got[0]), 1);

    // since = the newest seq: nothing replayed, live only.
    let newest = last_seq(&s).await;
    let mut tail = s.ws(&format!("since={newest}")).await;
    tail.expect_quiet("ws since=newest").await;
    patch(&s, &sensor, json!({"value": 3})).await;
    let got = tail.take(1, "ws since=newest live").await;
    assert_eq!(seq(&got[0]), newest + 1);
    assert_eq!(summary(&got), vec![ev("twin.updated", &sensor, 3)]);
}

/// SIGTERM with subscribers connected: their streams end (WebSocket with a 1001 close frame),
/// and the server drains and exits at once instead of waiting for the clients to leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_and_exits() {
    let s = Server::start();
    let id = create(&s, "machine", None, json!({"n": 0})).await;
    let mut sse = s.sse("types=twin.updated", &[]).await;
    let mut ws = s.ws("types=twin.updated").await;
    patch(&s, &id, json!({"n": 1})).await;
    sse.take(1, "the live update over SSE").await;
    ws.take(1, "the live update over WebSocket").await;
    let stopper = tokio::task::spawn_blocking(move || {
        let mut s = s;
        let started = Instant::now();
        let r = s.stop_within(Duration::from_secs(5));
        (s, r, started.elapsed())
    });
    let close = ws.close_frame(Duration::from_secs(5)).await;
    let (_s, r, took) = stopper.await.unwrap();
    let status = r.expect("the server exits within 5 s of SIGTERM with streams open");
    assert!(status.success(), "exit status {status}");
    eprintln!("stopped in {took:?} with an SSE and a WebSocket subscriber connected");
    let close = close.expect("a close frame on the WebSocket");
    assert_eq!(close[..2], 1001u16.to_be_bytes(), "going away: {close:?}");
    // The SSE stream has ended too.
    assert!(
        sse.ended_within(Duration::from_secs(2)).await,
        "the SSE stream is still open after the server stopped"
    );
}

// ---- 6. bad parameters -----------------------------------------------------------------

#[tokio::test]
async fn bad_params() {
    let s = Server::start();
    for q in [
        "types=bogus",
        "types=twin.updated,nope",
        "twin_id=not-a-uuid",
        "since=abc",
        "parent_id=x",
    ] {
        let r = s.get(&format!("/v1/events?{q}")).await;
        r.expect_error(400, "bad_request");
        let r = s.get(&format!("/v1/events/log?{q}")).await;
        r.expect_error(400, "bad_request");
        match s.ws_connect(q).await {
            WsOpen::Open(_) => panic!("WebSocket with {q} was upgraded"),
            WsOpen::Refused(st, body) => {
                assert_eq!(st, 400, "WebSocket with {q}: {body}");
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                assert_error_shape(&v);
                assert_eq!(v["error"]["code"], "bad_request", "{body}");
            }
        }
    }
    let r = s.get("/v1/events?types=bogus").await;
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bogus"),
        "the message names the bad type: {}",
        r.text
    );
    for q in ["limit=0", "limit=10001"] {
        let r = s.get(&format!("/v1/events/log?{q}")).await;
        r.expect_error(400, "bad_request");
        assert!(r.text.contains("between 1 and 10000"), "{}", r.text);
    }
    for bad in ["abc", "-1", "1.5", "12abc"] {
        let r = s
            .send(
                Method::GET,
                "/v1/events",
                Some(&s.token),
                Body::None,
                &[("Last-Event-ID", bad)],
            )
            .await;
        r.expect_error(400, "bad_request");
    }
    // Without a token: 401, on every event route.
    for p in ["/v1/events", "/v1/events/log"] {
        let r = s.send(Method::GET, p, None, Body::None, &[]).await;
        r.expect(401);
    }
    // A valid request still works afterwards.
    let _ok = s
        .sse("types=twin.updated,alert", &[("Last-Event-ID", "0")])
        .await;
    // Browsers cannot set headers on EventSource / WebSocket: the streams take
    // `?access_token=` instead (a read token is enough); no other route does.
    let read = s.create_token("read").await;
    // Only the head is read: a stream's body does not end.
    for (path, status) in [
        (format!("/v1/events?types=alert&access_token={read}"), 200),
        ("/v1/events?access_token=th_wrong".into(), 401),
        // Only the streams take a token in the URL.
        (format!("/v1/events/log?access_token={read}"), 401),
        (format!("/v1/twins?access_token={}", s.token), 401),
    ] {
        let r = s.open_stream(&path, None, &[]).await;
        assert_eq!(r.status(), status, "GET {path}");
    }
}
