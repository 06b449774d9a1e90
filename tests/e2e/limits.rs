//! Bounded inputs through the real binary: too many concurrent ingest requests are refused
//! with 429 and `Retry-After` rather than buffered without limit.

use serde_json::json;

use crate::common::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ingest_beyond_the_limit_gets_429() {
    let srv = Server::start_with(&["--max-concurrent-ingest", "1"]);
    let id = srv
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"n": 0}}))
        .await;
    // Big enough that requests overlap: each takes tens of milliseconds to parse and apply.
    let body: String = (0..50_000)
        .map(|i| format!("{}\n", json!({"twin_id": id, "properties": {"n": i}})))
        .collect();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (client, body) = (srv.client().clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .post_raw("/v1/ingest", body.as_bytes(), "application/x-ndjson")
                .await;
            (r.status, r.header("retry-after"), r.body)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (status, retry_after, v) = t.await.unwrap();
        match status {
            200 => {
                assert_eq!(v["applied"], 50_000, "{v}");
                ok += 1;
            }
            429 => {
                assert_eq!(v["error"]["code"], "overloaded", "{v}");
                assert!(retry_after.is_some(), "429 without Retry-After");
                refused += 1;
            }
            other => panic!("unexpected status {other}: {v}"),
        }
    }
    assert!(ok >= 1, "no ingest went through");
    assert!(
        refused >= 1,
        "six concurrent ingests with a limit of one were all admitted"
    );
    // What was admitted was applied in full: the version counts every applied update.
    let t = srv.get(&format!("/v1/twins/{id}")).await;
    assert_eq!(t.body["version"], 1 + 50_000 * ok, "{}", t.body);
    srv.get("/healthz").await.expect(200);
}

#[tokio::test]
async fn ingest_over_the_body_limit_is_413() {
    let s = Server::start_with(&["--max-ingest-bytes", "1000"]);
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
    let s = Server::start_with(&["--max-body-bytes", "1000"]);
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
