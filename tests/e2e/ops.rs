//! Operating the server: the public health and metrics routes, and a prompt clean exit on
//! SIGTERM.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{Body, Server};

// ---- operations ------------------------------------------------------------------------

#[tokio::test]
async fn healthz_and_metrics() {
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
