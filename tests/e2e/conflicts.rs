//! Conflict strategies between real servers (`conflict.strategy` of the model): writes to one
//! property on both sides of a partition are merged by the `max-resolver` component on every
//! node (`merge`), or kept side by side as a conflict that every node lists with the same id
//! until it is resolved on any one of them (`manual`). Models replicate with the twins.

use serde_json::{json, Value};

use crate::common::{guest, proxy::Proxy, Server};
use crate::sync::eventually;

/// Model `machine` on `s` with `conflict`.
async fn model_with(s: &Server, conflict: Value) {
    s.put("/v1/models/machine", &json!({"conflict": conflict}))
        .await
        .expect(201);
}

/// Upload `max-resolver` to `s`; returns its sha256.
async fn upload_resolver(s: &Server) -> String {
    let r = s.upload("max-resolver", &guest("max_resolver"), "").await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body["sha256"].as_str().expect("a sha256").to_owned()
}

/// A node B dialing `a` through a proxy that can cut the link.
async fn behind_proxy(a: &Server, node_id: &str) -> (Server, Proxy) {
    let proxy = Proxy::start(&a.url).await;
    let token = a.create_token("peer").await;
    let b = Server::start_from(
        |_| {},
        Some(node_id),
        &["--peer", &proxy.url, "--peer-token", &token],
    );
    (b, proxy)
}

/// Cut the link, let `writes` happen on each side (node, property values), heal.
async fn write_apart(proxy: &Proxy, a: &Server, path: &str, writes: &[(&Server, Value)]) {
    proxy.cut();
    eventually(a, "/v1/peers", "the link down", |p| {
        p["items"]
            .as_array()
            .is_some_and(|l| l.iter().all(|p| p["state"] != "connected"))
    })
    .await;
    for (s, props) in writes {
        s.patch(path, props).await.expect(200);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    proxy.heal();
}

fn event_types(s: &Value) -> Vec<String> {
    s["events"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|e| e["type"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn concurrent_writes_are_merged_by_the_resolver_component_on_every_node() {
    let a = Server::start_from(|_| {}, Some("node-a"), &[]);
    let (b, proxy) = behind_proxy(&a, "node-b").await;
    // Modules stay per node: each node has the resolver. The model, put on A, replicates.
    let sha256 = upload_resolver(&a).await;
    assert_eq!(upload_resolver(&b).await, sha256);
    model_with(
        &a,
        json!({"strategy": "merge", "resolver": "max-resolver", "sha256": sha256}),
    )
    .await;
    eventually(&b, "/v1/models/machine", "A's model on B", |m| {
        m["conflict"]["strategy"] == "merge"
    })
    .await;
    let id = a
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 0}}))
        .await;
    let path = format!("/v1/twins/{id}");
    eventually(&b, &path, "the twin on B", |_| true).await;

    // A writes the larger value first; B writes last, so last-writer-wins would keep B's.
    write_apart(
        &proxy,
        &a,
        &path,
        &[
            (&a, json!({"temperature": 90, "only_a": 1})),
            (&b, json!({"temperature": 70})),
        ],
    )
    .await;
    let merged = json!({"temperature": 90, "only_a": 1});
    for s in [&a, &b] {
        // (A shows 90 before the merge too: wait for the conflict itself.)
        eventually(s, "/v1/conflicts", "the conflict listed", |c| {
            c["items"].as_array().is_some_and(|i| i.len() == 1)
        })
        .await;
        eventually(s, &path, "the resolver's merge", |t| {
            t["properties"] == merged
        })
        .await;
        let c = s.get("/v1/conflicts").await;
        let items = c.body["items"].as_array().expect("items").clone();
        assert_eq!(items.len(), 1, "{}", c.text);
        assert_eq!(items[0]["strategy"], "merge");
        assert_eq!(items[0]["value"], 90);
        let sides: Vec<&Value> = items[0]["sides"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| &s["value"])
            .collect();
        assert_eq!(sides, [&json!(90), &json!(70)], "in (hlc, origin) order");
        eventually(
            s,
            "/v1/events/log?types=conflict.detected",
            "a conflict.detected event",
            |log| event_types(log).contains(&"conflict.detected".to_owned()),
        )
        .await;
    }
    assert_eq!(
        a.get("/v1/conflicts").await.body["items"][0]["id"],
        b.get("/v1/conflicts").await.body["items"][0]["id"],
        "the same conflict id on both nodes"
    );

    // A later write supersedes both sides, on both nodes.
    a.patch(&path, &json!({"temperature": 50}))
        .await
        .expect(200);
    for s in [&a, &b] {
        eventually(s, &path, "the later write", |t| {
            t["properties"]["temperature"] == 50
        })
        .await;
        eventually(s, "/v1/conflicts", "no open conflict", |c| {
            c["items"] == json!([])
        })
        .await;
        // (The event follows once the merge is durable.)
        eventually(
            s,
            "/v1/events/log?types=conflict.resolved",
            "one conflict.resolved event",
            |log| event_types(log) == ["conflict.resolved"],
        )
        .await;
    }
    let m = a.get("/metrics").await.text;
    assert!(
        m.contains("twinhost_sync_conflicts_total{strategy=\"merge\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn a_manual_conflict_resolved_on_one_node_clears_on_every_node() {
    let a = Server::start_from(|_| {}, Some("node-a"), &[]);
    let (b, proxy) = behind_proxy(&a, "node-b").await;
    // C hangs off B: it learns of A's write only through B.
    let token = b.create_token("peer").await;
    let c = Server::start_from(
        |_| {},
        Some("node-c"),
        &["--peer", &b.url, "--peer-token", &token],
    );
    // Models replicate: put on A, the model reaches C through B.
    model_with(&a, json!({"strategy": "manual"})).await;
    for s in [&b, &c] {
        eventually(s, "/v1/models/machine", "A's model", |m| {
            m["conflict"]["strategy"] == "manual"
        })
        .await;
    }
    let id = a
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"status": "new"}}))
        .await;
    let path = format!("/v1/twins/{id}");
    eventually(&c, &path, "the twin on C", |_| true).await;

    write_apart(
        &proxy,
        &a,
        &path,
        &[
            (&a, json!({"status": "stopped"})),
            (&b, json!({"status": "running"})),
        ],
    )
    .await;
    // Every node lists the same conflict, with B's later write shown meanwhile.
    let mut ids = Vec::new();
    for s in [&a, &b, &c] {
        eventually(s, "/v1/conflicts", "the conflict listed", |c| {
            c["items"].as_array().is_some_and(|i| i.len() == 1)
        })
        .await;
        let item = s.get("/v1/conflicts").await.body["items"][0].clone();
        assert_eq!(item["strategy"], "manual");
        assert_eq!(item["property"], "status");
        assert_eq!(item["value"], "running");
        assert_eq!(item["sides"].as_array().unwrap().len(), 2);
        ids.push(item["id"].as_str().unwrap().to_owned());
        eventually(s, &path, "the provisional value", |t| {
            t["properties"]["status"] == "running"
        })
        .await;
        let meta = s.get(&format!("{path}?meta=true")).await;
        assert_eq!(
            meta.body["meta"]["conflicts"]["status"]
                .as_array()
                .map(Vec::len),
            Some(2),
            "{}",
            meta.text
        );
    }
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert_eq!(c.get("/v1/metrics").await.body["conflicted_twins"], 1);
    assert!(c
        .get("/metrics")
        .await
        .text
        .contains("twinhost_sync_conflicts_open 1"));

    // Bad resolutions are refused with a reason.
    let resolve = format!("/v1/conflicts/{}/resolve", ids[0]);
    c.post(&resolve, &json!({"properties": {"other": 1}}))
        .await
        .expect_error(400, "bad_request");
    c.post(
        "/v1/conflicts/0000000000000000/resolve",
        &json!({"properties": {"status": "x"}}),
    )
    .await
    .expect_error(404, "not_found");

    // Resolved on C, it clears on every node.
    let r = c
        .post(&resolve, &json!({"properties": {"status": "checked"}}))
        .await;
    r.expect(200);
    assert_eq!(r.body["properties"]["status"], "checked");
    for s in [&a, &b, &c] {
        eventually(s, "/v1/conflicts", "the conflict cleared", |c| {
            c["items"] == json!([])
        })
        .await;
        eventually(s, &path, "the resolution", |t| {
            t["properties"]["status"] == "checked"
        })
        .await;
        eventually(
            s,
            "/v1/events/log?types=conflict.detected,conflict.resolved",
            "a conflict.resolved event",
            |log| event_types(log).contains(&"conflict.resolved".to_owned()),
        )
        .await;
    }

    eventually(&c, "/v1/metrics", "no conflicted twin", |m| {
        m["conflicted_twins"] == 0
    })
    .await;

    // A model deleted on C is deleted everywhere.
    c.delete("/v1/models/machine").await.expect(204);
    for s in [&a, &b] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while s.get("/v1/models/machine").await.status != 404 {
            assert!(
                std::time::Instant::now() < deadline,
                "the model delete did not spread"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
