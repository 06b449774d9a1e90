//! `POST /v1/ingest` parsing: each bad item is rejected by index with its own error code
//! while the rest is applied; bodies with no items are refused whole.

use chrono::Utc;
use serde_json::json;

use super::{machine_model, rfc3339, App};

#[tokio::test]
async fn ingest_rejects_bad_items_by_index_and_applies_the_rest() {
    let s = App::start().await;
    s.put("/v1/models/machine", &machine_model())
        .await
        .expect(201);
    let a = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"status": "operational", "temperature": 50}}))
        .await;
    let b = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"status": "operational", "temperature": 60}}))
        .await;
    let ghost = uuid::Uuid::new_v4();

    let lines = [
        format!(r#"{{"twin_id":"{a}","properties":{{"temperature":51}}}}"#), // 0 good
        "this is not json".to_owned(),                                       // 1 bad line
        format!(r#"{{"twin_id":"{ghost}","properties":{{"temperature":1}}}}"#), // 2 unknown twin
        format!(r#"{{"twin_id":"{b}","properties":{{"temperature":900}}}}"#), // 3 violates the model
        format!(r#"{{"twin_id":"{b}","properties":{{"temperature":61,"status":"maintenance"}}}}"#), // 4 good
        r#"{"twin_id":"not-a-uuid","properties":{}}"#.to_owned(), // 5 bad id
        format!(r#"{{"twin_id":"{a}","properties":{{"rpm":-5}}}}"#), // 6 violates the model
        format!(
            r#"{{"twin_id":"{a}","properties":{{"rpm":1500}},"ts":"{}"}}"#,
            rfc3339(Utc::now())
        ), // 7 good
        format!(r#"{{"twin_id":"{a}","properties":{{"rpm":1}},"ts":"yesterday"}}"#), // 8 bad ts
        format!(r#"{{"twin_id":"{a}","properties":{{"rpm":1}},"ts":"2100-01-01T00:00:00Z"}}"#), // 9 future
    ];
    let body = lines.join("\n");
    let r = s
        .post_raw("/v1/ingest", body.as_bytes(), "application/x-ndjson")
        .await;
    r.expect(200);
    assert_eq!(r.body["applied"], 3, "{}", r.body);
    let rejected = r.body["rejected"].as_array().expect("rejected");
    let idx: Vec<u64> = rejected
        .iter()
        .map(|x| x["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![1, 2, 3, 5, 6, 8, 9], "{}", r.body);
    let codes: Vec<&str> = rejected
        .iter()
        .map(|x| x["error"]["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        vec![
            "invalid_json",
            "not_found",
            "validation_failed",
            "bad_request",
            "validation_failed",
            "bad_request",
            "bad_request"
        ]
    );
    assert!(
        rejected[6]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than 5 minutes ahead"),
        "{}",
        r.body
    );
    assert!(
        rejected[5]["error"]["message"]
            .as_str()
            .unwrap()
            .contains(r#"ts "yesterday" is not an RFC 3339 time"#),
        "{}",
        r.body
    );
    for x in rejected {
        assert!(
            x["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{x}"
        );
    }
    assert!(
        rejected[2]["error"]["details"]["temperature"].is_string(),
        "{}",
        r.body
    );

    let ta = s.get(&format!("/v1/twins/{a}")).await.body;
    assert_eq!(
        ta["properties"],
        json!({"status": "operational", "temperature": 51, "rpm": 1500})
    );
    let tb = s.get(&format!("/v1/twins/{b}")).await.body;
    assert_eq!(
        tb["properties"],
        json!({"status": "maintenance", "temperature": 61})
    );
    assert_eq!(
        tb["version"], 2,
        "the rejected item did not bump the version"
    );

    // Bodies that hold no items at all.
    s.post_raw("/v1/ingest", b"[1, 2", "application/json")
        .await
        .expect_error(400, "invalid_json");
    s.post_raw("/v1/ingest", b"  \n ", "application/x-ndjson")
        .await
        .expect_error(400, "bad_request");
}

#[tokio::test]
async fn a_json_array_is_ingested_like_ndjson() {
    let s = App::start().await;
    let a = s.create_twin_id(&json!({"entity_type": "machine"})).await;
    let ghost = uuid::Uuid::new_v4();
    // The same in a JSON array, with a non-object item.
    let r = s
        .post(
            "/v1/ingest",
            &json!([{"twin_id": a, "properties": {"temperature": 52}}, 5, {"twin_id": ghost, "properties": {}}]),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["applied"], 1);
    let idx: Vec<u64> = r.body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![1, 2]);
    assert_eq!(r.body["rejected"][0]["error"]["code"], "bad_request");
    assert_eq!(r.body["rejected"][1]["error"]["code"], "not_found");
    assert_eq!(
        s.get(&format!("/v1/twins/{a}")).await.body["properties"]["temperature"],
        52
    );
}
