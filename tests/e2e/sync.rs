//! Sync by pulling a peer's change feed (`serve --peer URL --peer-token T`): two real
//! servers on loopback converge, a restarted node resumes where it left off, and two nodes
//! that pull from each other merge concurrent writes without echoing them back and forth.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::Server;

/// Wait until `check` holds on what `path` answers on `s`, or fail with the last answer.
async fn eventually(s: &Server, path: &str, what: &str, check: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = s.get(path).await;
        if r.status == 200 && check(&r.body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {} {}",
            r.status,
            r.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node pulling from `from` with a peer token of it.
async fn pulling_from(from: &Server, node_id: &str) -> Server {
    let token = from.create_token("peer").await;
    Server::start_from(
        |_| {},
        Some(node_id),
        &["--peer", &from.url, "--peer-token", &token],
    )
}

#[tokio::test]
async fn a_node_pulls_a_peers_changes_and_resumes_after_kill_9() {
    let a = Server::start_from(|_| {}, Some("node-a"), &[]);
    let id = a
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 70}}))
        .await;
    let mut b = pulling_from(&a, "node-b").await;
    let path = format!("/v1/twins/{id}");
    eventually(&b, &path, "the twin on B", |t| {
        t["properties"]["temperature"] == 70
    })
    .await;

    a.patch(&path, &json!({"temperature": 71, "status": "ok"}))
        .await
        .expect(200);
    eventually(&b, &path, "the update on B", |t| {
        t["properties"] == json!({"temperature": 71, "status": "ok"})
    })
    .await;
    // The clocks came along: B shows A's writes as A's.
    let meta = b.get(&format!("{path}?meta=true")).await.body;
    assert_eq!(
        meta["meta"]["properties"]["temperature"]["origin"], "node-a",
        "{meta}"
    );

    // B dies; A goes on writing (and deletes a twin); B comes back and catches up.
    b.kill9();
    a.patch(&path, &json!({"temperature": 75}))
        .await
        .expect(200);
    let gone = a.create_twin_id(&json!({"entity_type": "machine"})).await;
    let more: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..50 {
            v.push(
                a.create_twin_id(&json!({"entity_type": "sensor", "properties": {"i": i}}))
                    .await,
            );
        }
        v
    };
    a.delete(&format!("/v1/twins/{gone}")).await.expect(204);
    b.restart();
    eventually(&b, &path, "the update made while B was down", |t| {
        t["properties"]["temperature"] == 75
    })
    .await;
    for m in &more {
        eventually(
            &b,
            &format!("/v1/twins/{m}"),
            "a twin made while B was down",
            |_| true,
        )
        .await;
    }
    // It resumed from the change number it had merged through, not from the start.
    let log = std::fs::read_to_string(&b.log_path).unwrap();
    let starts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("pulling changes from a peer"))
        .collect();
    assert_eq!(starts.len(), 2, "{log}");
    assert!(starts[0].contains("after=0"), "{}", starts[0]);
    assert!(!starts[1].contains("after=0"), "{}", starts[1]);
    let r = b.get(&format!("/v1/twins/{gone}")).await;
    assert_eq!(r.status, 404, "the deleted twin on B: {}", r.text);
    let m = b.get("/v1/metrics").await.body;
    assert!(m["sync_operations"].as_u64().unwrap_or(0) >= 52, "{m}");
    assert_eq!(m["sync_errors"], 0, "{m}");
}

#[tokio::test]
async fn two_nodes_pulling_from_each_other_merge_concurrent_writes_and_settle() {
    let a = Server::start_from(|_| {}, Some("node-a"), &[]);
    let b = pulling_from(&a, "node-b").await;
    // A pulls from B too (a restart of A with the peer arguments).
    let b_token = b.create_token("peer").await;
    let mut a = a;
    a.extra_args = vec![
        "--peer".into(),
        b.url.clone(),
        "--peer-token".into(),
        b_token,
    ];
    a.restart();

    let id = a
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"x": 0}}))
        .await;
    let path = format!("/v1/twins/{id}");
    eventually(&b, &path, "the twin on B", |_| true).await;
    // Different properties written on each side: both survive on both nodes.
    a.patch(&path, &json!({"from_a": 1})).await.expect(200);
    b.patch(&path, &json!({"from_b": 2})).await.expect(200);
    let both = |t: &Value| t["properties"]["from_a"] == 1 && t["properties"]["from_b"] == 2;
    eventually(&a, &path, "both writes on A", both).await;
    eventually(&b, &path, "both writes on B", both).await;
    // The same property on both: one value wins on both nodes (last writer by clock).
    a.patch(&path, &json!({"x": "a"})).await.expect(200);
    b.patch(&path, &json!({"x": "b"})).await.expect(200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ta, tb) = (a.get(&path).await.body, b.get(&path).await.body);
        if ta["properties"] == tb["properties"] {
            assert!(ta["properties"]["x"] == "a" || ta["properties"]["x"] == "b");
            break;
        }
        assert!(Instant::now() < deadline, "no convergence: {ta} vs {tb}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Settled: no change keeps travelling back and forth.
    let count = |m: &Value| m["sync_applied"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = (
        count(&a.get("/v1/metrics").await.body),
        count(&b.get("/v1/metrics").await.body),
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = (
        count(&a.get("/v1/metrics").await.body),
        count(&b.get("/v1/metrics").await.body),
    );
    assert_eq!(before, after, "changes still echo between the nodes");
}

#[tokio::test]
async fn a_wrong_peer_token_is_counted_and_logged() {
    let a = Server::start_from(|_| {}, Some("node-a"), &[]);
    let b = Server::start_from(
        |_| {},
        Some("node-b"),
        &["--peer", &a.url, "--peer-token", "th_wrong"],
    );
    eventually(&b, "/v1/metrics", "the failed pulls counted", |m| {
        m["sync_errors"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    let log = std::fs::read_to_string(&b.log_path).unwrap();
    assert!(
        log.contains("pulling from a peer failed") && log.contains("401"),
        "{log}"
    );
}
