//! `POST /v1/ingest`: JSON arrays and NDJSON applied in order. Rejection of bad items by
//! index is tested in-process (`host/src/api/tests/ingest.rs`).

use serde_json::json;

use crate::common::Server;

#[tokio::test]
async fn ingest_json_array_and_ndjson() {
    let s = Server::start();
    let a = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 1}}))
        .await;
    let b = s.create_twin_id(&json!({"entity_type": "machine"})).await;

    let r = s
        .post(
            "/v1/ingest",
            &json!([
                {"twin_id": a, "properties": {"temperature": 10}},
                {"twin_id": b, "properties": {"temperature": 20, "status": "ok"}},
                {"twin_id": a, "properties": {"temperature": 11}}
            ]),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body, json!({"applied": 3, "rejected": []}));
    let ta = s.get(&format!("/v1/twins/{a}")).await.body;
    assert_eq!(ta["properties"]["temperature"], 11);
    assert_eq!(ta["version"], 3);
    let tb = s.get(&format!("/v1/twins/{b}")).await.body;
    assert_eq!(tb["properties"], json!({"temperature": 20, "status": "ok"}));

    let nd = format!(
        "{{\"twin_id\":\"{a}\",\"properties\":{{\"temperature\":30}}}}\n\n{{\"twin_id\":\"{b}\",\"properties\":{{\"status\":null}}}}\n"
    );
    let r = s
        .post_raw("/v1/ingest", nd.as_bytes(), "application/x-ndjson")
        .await;
    r.expect(200);
    assert_eq!(r.body, json!({"applied": 2, "rejected": []}));
    assert_eq!(
        s.get(&format!("/v1/twins/{a}")).await.body["properties"]["temperature"],
        30
    );
    assert_eq!(
        s.get(&format!("/v1/twins/{b}")).await.body["properties"],
        json!({"temperature": 20})
    );
}
