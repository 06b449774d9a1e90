//! Body limits: over `max_body_bytes` (JSON routes) or `max_ingest_bytes` (ingest) is 413
//! `payload_too_large` and changes nothing; the two limits are separate.

use serde_json::json;

use super::{App, Limits};

#[tokio::test]
async fn ingest_over_the_body_limit_is_413() {
    let s = App::with_limits(Limits {
        max_ingest_bytes: 1000,
        ..Limits::default()
    })
    .await;
    let a = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 1}}))
        .await;
    let line = format!(r#"{{"twin_id":"{a}","properties":{{"temperature":2}}}}"#);
    let mut body = String::new();
    while body.len() <= 2000 {
        body.push_str(&line);
        body.push('\n');
    }
    let r = s
        .post_raw("/v1/ingest", body.as_bytes(), "application/x-ndjson")
        .await;
    r.expect_error(413, "payload_too_large");
    let t = s.get(&format!("/v1/twins/{a}")).await.body;
    assert_eq!(t["version"], 1);
    assert_eq!(t["properties"]["temperature"], 1);
    // Under the limit it works; the JSON-body limit of other routes is not the ingest limit.
    let r = s
        .post_raw("/v1/ingest", line.as_bytes(), "application/x-ndjson")
        .await;
    r.expect(200);
    assert_eq!(r.body["applied"], 1);
    let big = json!({"entity_type": "machine", "properties": {"blob": "x".repeat(5000)}});
    s.post("/v1/twins", &big).await.expect(201);
}

#[tokio::test]
async fn json_bodies_over_the_limit_are_413_with_an_error_body() {
    let s = App::with_limits(Limits {
        max_body_bytes: 1000,
        ..Limits::default()
    })
    .await;
    let a = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 1}}))
        .await;
    let big = json!({"blob": "x".repeat(3000)});
    s.post(
        "/v1/twins",
        &json!({"entity_type": "machine", "properties": big}),
    )
    .await
    .expect_error(413, "payload_too_large");
    s.patch(&format!("/v1/twins/{a}"), &big)
        .await
        .expect_error(413, "payload_too_large");
    s.put(&format!("/v1/twins/{a}/relationships/self/{a}"), &big)
        .await
        .expect_error(413, "payload_too_large");
    s.put(
        "/v1/models/machine",
        &json!({"properties": {}, "required": ["x".repeat(3000)]}),
    )
    .await
    .expect_error(413, "payload_too_large");
    s.post("/v1/query", &json!({"properties": big}))
        .await
        .expect_error(413, "payload_too_large");
    // Nothing changed; the ingest limit (64 MiB by default) is separate.
    let t = s.get(&format!("/v1/twins/{a}")).await.body;
    assert_eq!(t["version"], 1);
    assert_eq!(
        s.get(&format!("/v1/twins/{a}/relationships")).await.body,
        json!([])
    );
    assert_eq!(s.get("/v1/models").await.body, json!({}));
    assert_eq!(s.twin_count().await, 1);
    let r = s
        .post(
            "/v1/ingest",
            &json!([{"twin_id": a, "properties": {"note": "y".repeat(3000)}}]),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["applied"], 1);
}
