//! Bounded inputs through the real binary: too many concurrent ingest requests are refused
//! with 429 and `Retry-After` rather than buffered without limit. Body size limits (413) are
//! tested in-process (`host/src/api/tests/limits.rs`).

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
