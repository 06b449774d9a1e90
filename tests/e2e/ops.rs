//! Operating the server: the public health and metrics routes, and a prompt clean exit on
//! SIGTERM.

use std::time::{Duration, Instant};

use crate::common::{Body, Server};
use reqwest::Method;
use serde_json::{json, Value};

// ---- operations ------------------------------------------------------------------------

#[tokio::test]
async fn healthz_metrics_and_openapi() {
    let s = Server::start();

    // Public routes need no token.
    let r = s.send(Method::GET, "/healthz", None, Body::None, &[]).await;
    r.expect(200);
    assert_eq!(r.body, json!({"status": "ok"}));

    s.create_twin(&json!({"entity_type": "machine", "properties": {"temperature": 70}}))
        .await;

    let r = s.send(Method::GET, "/metrics", None, Body::None, &[]).await;
    r.expect(200);
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("text/plain"),
        "{:?}",
        r.headers
    );
    assert!(
        r.text.contains("twinhost_http_requests_total"),
        "{}",
        r.text
    );

    let r = s.get("/v1/metrics").await;
    r.expect(200);
    for k in [
        "active_twins",
        "sync_operations",
        "compute_operations",
        "queue_depth",
        "avg_sync_latency_ms",
        "active_subscriptions",
    ] {
        assert!(
            r.body.get(k).is_some_and(Value::is_number),
            "{k} missing in {}",
            r.body
        );
    }
    assert_eq!(r.body["active_twins"], 1);

    let r = s
        .send(Method::GET, "/v1/openapi.json", None, Body::None, &[])
        .await;
    r.expect(200);
    assert!(
        r.body["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with('3')),
        "not an OpenAPI 3 doc: {}",
        r.text
    );
    let paths = r.body["paths"].as_object().expect("paths");
    for p in [
        "/v1/twins",
        "/v1/twins/{id}",
        "/v1/ingest",
        "/v1/query",
        "/v1/models/{entity_type}",
    ] {
        assert!(
            paths.contains_key(p),
            "{p} not in the OpenAPI paths: {:?}",
            paths.keys()
        );
    }
    // What validators require: unique operation ids, and path parameters only for the
    // path's own `{…}` segments (query parameters in the query).
    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap_or_default().to_owned();
            assert!(
                ids.insert(id.clone()),
                "operation id {id:?} twice ({method} {path})"
            );
            for param in op["parameters"].as_array().into_iter().flatten() {
                let name = param["name"].as_str().unwrap();
                if param["in"] == "path" {
                    assert!(
                        path.contains(&format!("{{{name}}}")),
                        "{method} {path}: {param}"
                    );
                }
            }
        }
    }
    let changes = &paths["/v1/changes"]["get"]["parameters"];
    assert!(
        changes
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["in"] == "query"),
        "{changes}"
    );
}

#[tokio::test]
async fn sigterm_exits_zero_promptly() {
    let mut s = Server::start();
    s.create_twin(&json!({"entity_type": "machine"})).await;
    let started = Instant::now();
    let status = s.stop().expect("the server exits after SIGTERM");
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        crate::common::tail(&s.log(), 20)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
