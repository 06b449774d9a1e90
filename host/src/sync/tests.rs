//! A link between two in-process nodes (A served on loopback, B dialing it as `serve --peer`
//! does): what it sends shows in `/metrics` and `/v1/metrics` — bytes each way, entries sent
//! and the change numbers they covered (the coalescing ratio).

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::api::{self, Limits};
use crate::cli::serve::{open_default_node, Node};
use crate::registry::{NewTwin, Update};
use crate::types::Properties;

/// The body of `GET path` on `node` (opened without auth).
async fn get(node: &Node, path: &str) -> String {
    let router = api::router(node.state.clone(), Limits::default());
    let resp = router
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET {path}");
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn metrics_json(node: &Node) -> Value {
    serde_json::from_str(&get(node, "/v1/metrics").await).unwrap()
}

/// The value of the Prometheus sample `name` (with its labels, as rendered), 0 when absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn props(v: Value) -> Properties {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("an object"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_on_the_wire_and_the_coalescing_ratio_show_in_metrics_and_move() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open_default_node(dir_a.path(), "metrics-a", true)
        .await
        .unwrap();
    let b = open_default_node(dir_b.path(), "metrics-b", true)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = api::router(a.state.clone(), Limits::default());
    tokio::spawn(async move { axum::serve(api::nodelay(listener), app).await });

    // Before B links, A makes 10 twins and updates one of them 40 times: the feed holds one
    // entry per twin, so 50 changes travel as 10 entries.
    let mut ids = Vec::new();
    for i in 0..10 {
        let t = a
            .registry
            .create(NewTwin {
                entity_type: "machine".into(),
                properties: props(json!({"i": i})),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(t.id);
    }
    for k in 0..40 {
        a.registry
            .patch(Update::new(ids[0], props(json!({"temperature": k}))))
            .await
            .unwrap();
    }
    let prom_before = get(&a, "/metrics").await;
    let (a0, b0) = (metrics_json(&a).await, metrics_json(&b).await);
    assert_eq!(a0["sync_bytes_out"], 0, "{a0}");
    assert_eq!(a0["sync_entries_sent"], 0, "{a0}");
    assert_eq!(a0["sync_coalescing_ratio"], 1.0, "{a0}");
    assert_eq!(b0["sync_bytes_in"], 0, "{b0}");

    b.state
        .peers
        .add_cli_peer(crate::sync::PeerConfig { url, token: None })
        .unwrap();
    let started = Instant::now();
    while b
        .registry
        .get(&ids[0])
        .ok()
        .and_then(|t| t.properties.get("temperature").cloned())
        != Some(json!(39))
        || b.registry.twin_count() < 10
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "B never caught up with A"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The counters move as the batch is sent and merged; B's ack may still be in flight.
    let started = Instant::now();
    let (a1, b1) = loop {
        let (a1, b1) = (metrics_json(&a).await, metrics_json(&b).await);
        if a1["sync_bytes_in"].as_u64() > Some(0) || started.elapsed() > Duration::from_secs(10) {
            break (a1, b1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(a1["sync_entries_sent"], 10, "{a1}");
    assert_eq!(a1["sync_changes_covered"], 50, "{a1}");
    assert_eq!(a1["sync_coalescing_ratio"], 5.0, "{a1}");
    // The batch crossed A → B (and A's subscribe and B's ack the other way).
    let sent = a1["sync_bytes_out"].as_u64().unwrap();
    assert!(sent > 0, "{a1}");
    assert!(
        b1["sync_bytes_in"].as_u64().unwrap() >= sent,
        "{b1} vs {a1}"
    );
    assert!(b1["sync_bytes_out"].as_u64() > Some(0), "{b1}");
    assert!(a1["sync_bytes_in"].as_u64() > Some(0), "{a1}");

    // The same in Prometheus form (the recorder is the process's: other tests add to it,
    // so the counters are compared before and after).
    let prom = get(&a, "/metrics").await;
    for name in [
        "twinhost_sync_bytes_total{direction=\"in\"}",
        "twinhost_sync_bytes_total{direction=\"out\"}",
        "twinhost_sync_changes_covered_total",
        "twinhost_sync_ops_total{direction=\"out\"}",
    ] {
        assert!(
            sample(&prom, name) > sample(&prom_before, name),
            "{name} did not move:\n{prom}"
        );
    }
    // A gauge of the node the scrape asks (5 here, unless another test's scrape set it
    // in between: only its presence is asserted).
    assert!(
        prom.lines()
            .any(|l| l.starts_with("twinhost_sync_coalescing_ratio ")),
        "{prom}"
    );

    b.state.peers.stop();
    a.state.peers.stop();
    for n in [&a, &b] {
        n.registry.shutdown();
        n.events.shutdown();
    }
}
