//! Sync over WebSocket links (`serve --peer URL --peer-token T`, `PUT /v1/peers`): real
//! servers on loopback converge, a node killed with `kill -9` resumes where it left off, two
//! nodes that dial each other keep one link and settle, a change travels A → B → C, writes
//! on both sides of a partition (a proxy cut between them) converge, and a wrong token or
//! protocol version is refused.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::Server;

/// Wait until `check` holds on what `path` answers on `s`, or fail with the last answer.
pub(crate) async fn eventually(s: &Server, path: &str, what: &str, check: impl Fn(&Value) -> bool) {
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

/// A node dialing `from` with a peer token of it.
async fn pulling_from(from: &Server, node_id: &str) -> Server {
    let token = from.create_token("peer").await;
    Server::start_from(
        |_| {},
        Some(node_id),
        &["--peer", &from.url, "--peer-token", &token],
    )
}

#[tokio::test]
async fn a_node_gets_a_peers_changes_and_resumes_after_kill_9() {
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
    // One row for A on B: the dialer (configured by URL) learned A's node id.
    let peers = b.get("/v1/peers").await.body;
    let items = peers["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{peers}");
    assert_eq!(items[0]["node_id"], "node-a", "{peers}");
    assert_eq!(items[0]["state"], "connected", "{peers}");
    assert_eq!(items[0]["configured"], "command line", "{peers}");
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
        .filter(|l| l.contains("asking a peer for its changes"))
        .collect();
    assert_eq!(starts.len(), 2, "{log}");
    assert!(starts[0].contains("after=0"), "{}", starts[0]);
    assert!(!starts[1].contains("after=0"), "{}", starts[1]);
    let r = b.get(&format!("/v1/twins/{gone}")).await;
    assert_eq!(r.status, 404, "the deleted twin on B: {}", r.text);
    // A merged change is readable before its commit returns and is counted: wait for the
    // count too.
    eventually(
        &b,
        "/v1/metrics",
        "sync_operations counting the 52 merged",
        |m| m["sync_operations"].as_u64().unwrap_or(0) >= 52,
    )
    .await;
    let m = b.get("/v1/metrics").await.body;
    assert_eq!(m["sync_errors"], 0, "{m}");
}

#[tokio::test]
async fn two_nodes_dialing_each_other_keep_one_link_merge_concurrent_writes_and_settle() {
    let a = Server::start_from(|_| {}, Some("node-a"), &[]);
    let b = pulling_from(&a, "node-b").await;
    // A dials B too (a restart of A with the peer arguments).
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
    // Both dialed; one link stays (the one the lower node id dialed), seen alike from both.
    for (s, other) in [(&a, "node-b"), (&b, "node-a")] {
        let peers = s.get("/v1/peers").await.body;
        let row = peers["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node_id"] == other)
            .unwrap_or_else(|| panic!("{other} in {peers}"))
            .clone();
        assert_eq!(row["state"], "connected", "{peers}");
        let expect = if other == "node-b" {
            "dialed"
        } else {
            "accepted"
        };
        assert_eq!(row["direction"], expect, "{peers}");
    }
}

#[tokio::test]
async fn a_wrong_peer_token_is_counted_and_logged() {
    let a = Server::start_from(|_| {}, Some("node-a"), &[]);
    let b = Server::start_from(
        |_| {},
        Some("node-b"),
        &["--peer", &a.url, "--peer-token", "th_wrong"],
    );
    eventually(&b, "/v1/metrics", "the failed dials counted", |m| {
        m["sync_errors"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    let log = std::fs::read_to_string(&b.log_path).unwrap();
    assert!(
        log.contains("cannot reach a peer") && log.contains("401") && log.contains("unknown token"),
        "{log}"
    );
    let peers = b.get("/v1/peers").await.body;
    let err = peers["items"][0]["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("401"), "{peers}");
}

/// Open a raw sync link to `s` with `token`, send `hello`, and return the close frame's
/// code and reason (or what came instead).
async fn close_after_hello(s: &Server, token: &str, hello: Value) -> (u16, String) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let url = format!("{}/v1/sync/ws", s.url.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("the upgrade");
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(c))))) => return (c.code.into(), c.reason.to_string()),
            Ok(Some(Ok(Message::Text(_)))) => continue, // the node's own hello
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    panic!("no close frame within 10 s");
}

#[tokio::test]
async fn a_wrong_protocol_version_or_own_node_id_is_refused_with_a_reason() {
    let a = Server::start_from(|_| {}, Some("node-a"), &[]);
    let token = a.create_token("peer").await;
    let (code, reason) = close_after_hello(
        &a,
        &token,
        json!({"type": "hello", "protocol": 99, "node_id": "node-x"}),
    )
    .await;
    assert_eq!(code, 4001, "{reason}");
    let ours = twinhost::sync::protocol::PROTOCOL_VERSION;
    assert!(
        reason.contains("version 99") && reason.contains(&format!("version {ours}")),
        "{reason}"
    );
    // A node of protocol 1 (changes as JSON text frames) is refused the same way.
    let (code, reason) = close_after_hello(
        &a,
        &token,
        json!({"type": "hello", "protocol": 1, "node_id": "node-x"}),
    )
    .await;
    assert_eq!(code, 4001, "a protocol 1 peer: {reason}");
    let (code, reason) = close_after_hello(
        &a,
        &token,
        json!({"type": "hello", "protocol": ours, "node_id": "node-a"}),
    )
    .await;
    assert_eq!(code, 4003, "{reason}");
    assert!(reason.contains("node-a"), "{reason}");
    // A peer token opens links and reads the feed, and nothing else.
    let r = a.client().with_token(&token).get("/v1/twins").await;
    assert_eq!(r.status, 403, "{}", r.text);
}

#[tokio::test]
async fn peers_are_added_listed_and_removed_through_the_api_and_the_cli() {
    let a = Server::start_from(|_| {}, Some("node-a"), &[]);
    let b = Server::start_from(|_| {}, Some("node-b"), &[]);
    let token = a.create_token("peer").await;
    // Refused before anything is stored.
    let r = b
        .put(
            "/v1/peers/node-a",
            &json!({"url": "ftp://x", "token": token}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    let r = b
        .put("/v1/peers/node-b", &json!({"url": a.url, "token": token}))
        .await;
    assert_eq!(r.status, 422, "own id: {}", r.text);

    let out = b.cli(&["peer", "add", "node-a", &a.url, "--peer-token", &token]);
    crate::common::cli_ok(&out);
    let id = a
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"t": 1}}))
        .await;
    eventually(&b, &format!("/v1/twins/{id}"), "the twin on B", |_| true).await;
    let listed = crate::common::cli_json(&b.cli(&["peer", "list"]));
    let row = &listed["items"][0];
    assert_eq!(row["node_id"], "node-a", "{listed}");
    assert_eq!(row["state"], "connected", "{listed}");
    assert_eq!(row["configured"], "api", "{listed}");
    assert!(row["ops_in"].as_u64().unwrap() >= 1, "{listed}");
    assert!(
        row.get("token").is_none(),
        "the token is never shown: {listed}"
    );
    // A sees the link from its side, with its change acknowledged.
    eventually(&a, "/v1/peers/node-b", "B's ack on A", |p| {
        p["state"] == "connected" && p["acked_through"].as_u64().unwrap_or(0) >= 1
    })
    .await;

    // Stored: the link comes back after a restart of B.
    let mut b = b;
    b.restart();
    a.patch(&format!("/v1/twins/{id}"), &json!({"t": 2}))
        .await
        .expect(200);
    eventually(
        &b,
        &format!("/v1/twins/{id}"),
        "the update after B's restart",
        |t| t["properties"]["t"] == 2,
    )
    .await;

    crate::common::cli_ok(&b.cli(&["peer", "remove", "node-a"]));
    eventually(&a, "/v1/peers/node-b", "the link closed on A", |p| {
        p["state"] != "connected"
    })
    .await;
    a.patch(&format!("/v1/twins/{id}"), &json!({"t": 3}))
        .await
        .expect(200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        b.get(&format!("/v1/twins/{id}")).await.body["properties"]["t"],
        2
    );
    assert_eq!(b.delete("/v1/peers/node-a").await.status, 404);
}

#[tokio::test]
async fn a_change_on_a_reaches_c_through_b() {
    // Hub and spoke: A and C both dial B; nothing links A and C.
    let b = Server::start_from(|_| {}, Some("node-b"), &[]);
    let a = pulling_from(&b, "node-a").await;
    let c = pulling_from(&b, "node-c").await;
    let id = a
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"from": "a"}}))
        .await;
    let path = format!("/v1/twins/{id}");
    eventually(&c, &path, "A's twin on C", |t| {
        t["properties"]["from"] == "a"
    })
    .await;
    c.patch(&path, &json!({"seen_by_c": true}))
        .await
        .expect(200);
    eventually(&a, &path, "C's write on A", |t| {
        t["properties"]["seen_by_c"] == true
    })
    .await;
    let meta = a.get(&format!("{path}?meta=true")).await.body;
    assert_eq!(
        meta["meta"]["properties"]["seen_by_c"]["origin"], "node-c",
        "{meta}"
    );
    assert_eq!(
        meta["meta"]["properties"]["from"]["origin"], "node-a",
        "{meta}"
    );
}

#[tokio::test]
async fn writes_on_both_sides_of_a_partition_converge_when_it_heals() {
    let a = Server::start_from(|_| {}, Some("node-a"), &[]);
    let proxy = crate::common::proxy::Proxy::start(&a.url).await;
    let token = a.create_token("peer").await;
    let b = Server::start_from(
        |_| {},
        Some("node-b"),
        &["--peer", &proxy.url, "--peer-token", &token],
    );
    let id = a
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"x": 0}}))
        .await;
    let path = format!("/v1/twins/{id}");
    eventually(&b, &path, "the twin on B", |_| true).await;

    proxy.cut();
    eventually(&a, "/v1/peers/node-b", "the link down on A", |p| {
        p["state"] != "connected"
    })
    .await;
    // Both write x (and one property of their own) while apart; B writes last.
    a.patch(&path, &json!({"x": "a", "only_a": 1}))
        .await
        .expect(200);
    tokio::time::sleep(Duration::from_millis(20)).await;
    b.patch(&path, &json!({"x": "b", "only_b": 2}))
        .await
        .expect(200);
    let gone = a.create_twin_id(&json!({"entity_type": "machine"})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        b.get(&path).await.body["properties"]
            .get("only_a")
            .is_none(),
        "the partition leaked"
    );

    proxy.heal();
    let merged = json!({"x": "b", "only_a": 1, "only_b": 2});
    eventually(&a, &path, "the merge on A", |t| t["properties"] == merged).await;
    eventually(&b, &path, "the merge on B", |t| t["properties"] == merged).await;
    eventually(
        &b,
        &format!("/v1/twins/{gone}"),
        "A's twin made during the partition",
        |_| true,
    )
    .await;
}

/// Copy a directory tree (a backup of a stopped node's data directory).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

#[tokio::test]
async fn a_node_restored_from_an_old_backup_is_repaired_by_anti_entropy() {
    let a = Server::start_from(|_| {}, Some("node-a"), &["--anti-entropy-every", "1s"]);
    let token = a.create_token("peer").await;
    let linked: Vec<String> = [
        "--peer",
        &a.url,
        "--peer-token",
        &token,
        "--anti-entropy-every",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut b = Server::start_from(|_| {}, Some("node-b"), &[]);
    b.extra_args = linked.clone();
    b.restart();
    let first = b.create_twin_id(&json!({"entity_type": "machine"})).await;
    eventually(
        &a,
        &format!("/v1/twins/{first}"),
        "B's first twin on A",
        |_| true,
    )
    .await;

    // A backup of B, then changes B makes after it (A gets them).
    b.stop().expect("B stops");
    let backup = b.tmp_dir().join("backup");
    copy_dir(&b.data_dir, &backup);
    b.restart();
    let mut after_backup = Vec::new();
    for i in 0..4 {
        after_backup.push(
            b.create_twin_id(&json!({"entity_type": "machine", "properties": {"i": i}}))
                .await,
        );
    }
    for id in &after_backup {
        eventually(
            &a,
            &format!("/v1/twins/{id}"),
            "B's later twins on A",
            |_| true,
        )
        .await;
    }

    // B is restored from the backup and, unlinked, makes more changes than it lost: its
    // feed numbers now name other changes than the ones A has merged through.
    b.stop().expect("B stops");
    std::fs::remove_dir_all(&b.data_dir).unwrap();
    std::fs::rename(&backup, &b.data_dir).unwrap();
    b.extra_args = vec![];
    b.restart();
    let mut unseen = Vec::new();
    for i in 0..6 {
        unseen.push(
            b.create_twin_id(&json!({"entity_type": "sensor", "properties": {"i": i}}))
                .await,
        );
    }
    b.extra_args = linked;
    b.restart();
    // The feed alone cannot bring them together; the digests can.
    for id in &unseen {
        eventually(
            &a,
            &format!("/v1/twins/{id}"),
            "B's post-restore twins on A",
            |_| true,
        )
        .await;
    }
    for id in &after_backup {
        eventually(
            &b,
            &format!("/v1/twins/{id}"),
            "the twins B lost, back on B",
            |_| true,
        )
        .await;
    }
    let repaired = |m: &Value| m["sync_repaired"].as_u64().unwrap_or(0);
    assert!(repaired(&a.get("/v1/metrics").await.body) >= 1);
    assert!(repaired(&b.get("/v1/metrics").await.body) >= 1);
}
