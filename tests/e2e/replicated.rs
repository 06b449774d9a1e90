//! What replicates with the twins: relationships (with their source twin, last writer wins
//! per relationship, deletes as tombstones). Models replicate too (see [`crate::conflicts`]).

use serde_json::json;

use crate::common::Server;
use crate::sync::eventually;

#[tokio::test]
async fn relationships_replicate_and_their_deletes_spread() {
    let a = Server::start_from(|_| {}, Some("node-a"), &[]);
    let token = a.create_token("peer").await;
    let b = Server::start_from(
        |_| {},
        Some("node-b"),
        &["--peer", &a.url, "--peer-token", &token],
    );
    let pump = a.create_twin_id(&json!({"entity_type": "pump"})).await;
    let tank = a.create_twin_id(&json!({"entity_type": "tank"})).await;
    let rel = format!("/v1/twins/{pump}/relationships/feeds/{tank}");
    a.put(&rel, &json!({"flow": 3})).await.expect(201);
    let list = format!("/v1/twins/{pump}/relationships");
    eventually(&b, &list, "A's relationship on B", |r| {
        r[0]["target_id"] == tank.as_str() && r[0]["properties"]["flow"] == 3
    })
    .await;
    // The event is published when B's commit returns, which can come after the
    // relationship is readable (failed once in a fresh-clone CI run).
    eventually(
        &b,
        "/v1/events/log?types=relationship.changed",
        "the relationship's event on B, from node-a",
        |l| l["events"][0]["origin"] == "node-a",
    )
    .await;

    // Replaced on B, then deleted on B: both reach A.
    b.put(&rel, &json!({"flow": 5})).await.expect(200);
    eventually(&a, &list, "B's replacement on A", |r| {
        r[0]["properties"]["flow"] == 5
    })
    .await;
    b.delete(&rel).await.expect(204);
    eventually(&a, &list, "B's delete on A", |r| *r == json!([])).await;

    // A relationship to a deleted twin is no longer listed, on either node.
    a.put(&rel, &json!({})).await.expect(201);
    eventually(&b, &list, "the relationship again on B", |r| {
        r.as_array().is_some_and(|i| i.len() == 1)
    })
    .await;
    a.delete(&format!("/v1/twins/{tank}")).await.expect(204);
    for s in [&a, &b] {
        eventually(s, &list, "no relationship to a deleted twin", |r| {
            *r == json!([])
        })
        .await;
    }
}

/// The alerts in `s`'s event log.
async fn alerts(s: &Server) -> Vec<serde_json::Value> {
    let r = s.get("/v1/events/log?types=alert&limit=1000").await;
    r.expect(200);
    r.body["events"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn alerts_travel_to_every_node_once_through_a_mesh_and_after_a_kill_9() {
    // A triangle: A and C dial B, and C dials A too, so A's alerts reach C by two paths.
    let b = Server::start_from(|_| {}, Some("node-b"), &[]);
    let b_token = b.create_token("peer").await;
    let a = Server::start_from(
        |_| {},
        Some("node-a"),
        &["--peer", &b.url, "--peer-token", &b_token],
    );
    let a_token = a.create_token("peer").await;
    let mut c = Server::start_from(
        |_| {},
        Some("node-c"),
        &["--peer", &b.url, "--peer-token", &b_token],
    );
    c.put("/v1/peers/node-a", &json!({"url": a.url, "token": a_token}))
        .await
        .expect(201);
    // The same rule on A and C (rules stay per node): C must not raise its own alert for a
    // change made on A (rules react to local changes), only list A's.
    let rule = json!({"kind": "threshold", "entity_type": "machine", "property": "temperature",
                      "op": ">", "value": 85, "clear": 80,
                      "actions": [{"type": "alert", "severity": "critical", "message": "too hot"}]});
    a.put("/v1/rules/overheat", &rule).await.expect(201);
    c.put("/v1/rules/overheat", &rule).await.expect(201);
    let m = a
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 70}}))
        .await;
    let path = format!("/v1/twins/{m}");
    eventually(&c, &path, "A's twin on C", |_| true).await;
    a.patch(&path, &json!({"temperature": 90}))
        .await
        .expect(200);
    let first = loop {
        let on_a = alerts(&a).await;
        if let Some(x) = on_a.first() {
            break x.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(first["origin"], "node-a", "{first}");
    for (s, name) in [(&b, "B"), (&c, "C")] {
        eventually(
            s,
            "/v1/events/log?types=alert",
            &format!("A's alert on {name}"),
            |l| l["events"].as_array().is_some_and(|e| !e.is_empty()),
        )
        .await;
    }
    // Give a second copy (C's other path, an echo to A) time to show, then count.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for (s, name) in [(&a, "A"), (&b, "B"), (&c, "C")] {
        let l = alerts(s).await;
        assert_eq!(l.len(), 1, "one alert on {name}: {l:?}");
        assert_eq!(l[0]["origin"], "node-a", "on {name}: {l:?}");
        assert_eq!(l[0]["twin_id"], m.as_str(), "on {name}: {l:?}");
        assert_eq!(l[0]["data"], first["data"], "on {name}: {l:?}");
    }
    let on_c = alerts(&c).await;
    assert_eq!(on_c[0]["origin_seq"], first["seq"], "{on_c:?}");

    // C dies; A raises another alert; C comes back and gets it, once.
    c.kill9();
    a.patch(&path, &json!({"temperature": 75}))
        .await
        .expect(200);
    a.patch(&path, &json!({"temperature": 95}))
        .await
        .expect(200);
    c.restart();
    eventually(
        &c,
        "/v1/events/log?types=alert",
        "the alert raised while C was down",
        |l| l["events"].as_array().is_some_and(|e| e.len() >= 2),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let on_a = alerts(&a).await;
    let on_c = alerts(&c).await;
    assert_eq!(on_a.len(), 2, "{on_a:?}");
    assert_eq!(on_c.len(), 2, "two alerts on C, none twice: {on_c:?}");
    let seqs = |l: &[serde_json::Value]| -> Vec<u64> {
        l.iter()
            .map(|e| e["origin_seq"].as_u64().or(e["seq"].as_u64()).unwrap())
            .collect()
    };
    assert_eq!(seqs(&on_c), seqs(&on_a), "C lists A's alerts in A's order");
    assert_eq!(on_c[1]["data"]["details"]["value"], 95.0, "{on_c:?}");
    let peers = c.get("/v1/peers").await.body;
    let logged: u64 = peers["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["alerts_in"].as_u64().unwrap_or(0))
        .sum();
    assert!(logged >= 1, "alerts counted per peer: {peers}");
}
