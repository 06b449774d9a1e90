//! Malformed requests: broken JSON (400 `invalid_json`), well-formed JSON of the wrong shape,
//! bad ids and query parameters (400 `bad_request`), unknown routes (404) and methods (405) —
//! each with the API.md error body, and nothing changes.

use serde_json::json;

use super::{assert_error_shape, App, Body, Method};

#[tokio::test]
async fn malformed_requests_get_error_bodies_and_change_nothing() {
    let s = App::start().await;
    let id = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 1}}))
        .await;
    let before = s.twin_count().await;
    let twin = s.get(&format!("/v1/twins/{id}")).await.body;

    let raw = |m: Method, path: String, body: &'static [u8]| {
        let s = &s;
        async move { s.call(m, &path, Body::Raw(body, "application/json")).await }
    };
    raw(Method::POST, "/v1/twins".into(), b"{not json")
        .await
        .expect_error(400, "invalid_json");
    raw(Method::POST, "/v1/twins".into(), b"{\"entity_type\": \"m\"")
        .await
        .expect_error(400, "invalid_json");
    raw(Method::POST, "/v1/twins".into(), b"")
        .await
        .expect_error(400, "invalid_json");
    raw(Method::POST, "/v1/twins".into(), b"\xff\xfe")
        .await
        .expect_error(400, "invalid_json");
    raw(
        Method::PATCH,
        format!("/v1/twins/{id}"),
        b"{\"temperature\": ",
    )
    .await
    .expect_error(400, "invalid_json");
    raw(Method::POST, "/v1/query".into(), b"[")
        .await
        .expect_error(400, "invalid_json");
    raw(Method::PUT, "/v1/models/machine".into(), b"{")
        .await
        .expect_error(400, "invalid_json");

    for body in [
        json!({"entity_type": 5}),
        json!({"entity_type": "machine", "properties": [1, 2]}),
        json!({"entity_type": "machine", "parent_id": "not-a-uuid"}),
        json!({"entity_type": "machine", "id": 7}),
        json!({"entity_type": "machine", "surprise": true}),
        json!({"properties": {}}),
        json!({"entity_type": "bad name!"}),
        json!({"entity_type": ""}),
        json!("machine"),
    ] {
        s.post("/v1/twins", &body)
            .await
            .expect_error(400, "bad_request");
    }
    // Well-formed JSON of the wrong shape for an enum: 400 (the server currently labels it
    // `invalid_json`, see the report; API.md allows either code for a 400).
    let r = s
        .put(&format!("/v1/twins/{id}/lifecycle"), &json!({"state": 1}))
        .await;
    r.expect(400);
    assert_error_shape(&r.body);

    for path in [
        "/v1/twins/not-a-uuid",
        "/v1/twins/1234",
        "/v1/twins/not-a-uuid/children",
        "/v1/twins/not-a-uuid/history/temperature",
    ] {
        s.get(path).await.expect_error(400, "bad_request");
    }
    s.patch("/v1/twins/not-a-uuid", &json!({"a": 1}))
        .await
        .expect_error(400, "bad_request");
    s.delete("/v1/twins/not-a-uuid")
        .await
        .expect_error(400, "bad_request");
    s.delete(&format!("/v1/twins/{id}?cascade=maybe"))
        .await
        .expect_error(400, "bad_request");

    // Still healthy, nothing changed.
    s.send(Method::GET, "/healthz", None, Body::None, &[])
        .await
        .expect(200);
    assert_eq!(s.twin_count().await, before);
    assert_eq!(s.get(&format!("/v1/twins/{id}")).await.body, twin);
    assert_eq!(s.get("/v1/models").await.body, json!({}));
    s.create_twin(&json!({"entity_type": "machine"})).await;
    assert_eq!(s.twin_count().await, before + 1);
}

/// A JSON body is parsed whatever its content type says (curl's `-d` sends a form type);
/// ingest reads NDJSON when the content type says so, and otherwise a JSON array or lines.
#[tokio::test]
async fn unknown_routes_and_methods_get_error_bodies() {
    let s = App::start().await;
    // Unknown routes and methods.
    for path in ["/v1/nope", "/nope", "/v1/twins/x/y/z/w"] {
        s.get(path).await.expect_error(404, "not_found");
    }
    let r = s.call(Method::DELETE, "/v1/query", Body::None).await;
    r.expect(405);
    assert_error_shape(&r.body);
    let r = s
        .call(Method::PUT, "/v1/twins", Body::Json(&json!({})))
        .await;
    r.expect(405);
    assert_error_shape(&r.body);
    let r = s
        .call(
            Method::POST,
            &format!("/v1/twins/{}", uuid::Uuid::new_v4()),
            Body::Json(&json!({})),
        )
        .await;
    r.expect(405);
    assert_error_shape(&r.body);
}

#[tokio::test]
async fn json_bodies_are_read_whatever_the_content_type() {
    let s = App::start().await;
    let body = br#"{"entity_type": "machine"}"#;
    for ct in [
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
    ] {
        s.call(Method::POST, "/v1/twins", Body::Raw(body, ct))
            .await
            .expect(201);
    }
    s.call(Method::POST, "/v1/twins", Body::Raw(b"{", "text/plain"))
        .await
        .expect_error(400, "invalid_json");
    assert_eq!(s.twin_count().await, 3);

    let id = s.create_twin_id(&json!({"entity_type": "machine"})).await;
    let array = format!(r#"[{{"twin_id":"{id}","properties":{{"a":1}}}}]"#);
    let r = s
        .post_raw("/v1/ingest", array.as_bytes(), "application/json")
        .await;
    r.expect(200);
    assert_eq!(r.body["applied"], 1, "{}", r.text);
    // Under an NDJSON content type the same bytes are one line, and not an item.
    let r = s
        .post_raw("/v1/ingest", array.as_bytes(), "application/x-ndjson")
        .await;
    r.expect(200);
    assert_eq!(r.body["applied"], 0, "{}", r.text);
    assert_eq!(r.body["rejected"][0]["index"], 0, "{}", r.text);
    let t = s.get(&format!("/v1/twins/{id}")).await;
    assert_eq!(t.body["properties"], json!({"a": 1}));
}

/// Query parameters are typed: a value that does not parse is 400 `bad_request` naming the
/// parameter's problem, and a good one is applied.
#[tokio::test]
async fn query_parameters_are_parsed_and_checked() {
    let s = App::start().await;
    let id = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"t": 1}}))
        .await;
    for path in [
        format!("/v1/twins/{id}?meta=maybe"),
        format!("/v1/twins/{id}/history/t?from=yesterday"),
        format!("/v1/twins/{id}/history/t?to=2024-13-01T00:00:00Z"),
        "/v1/twins?limit=-1".to_owned(),
        "/v1/twins?parent_id=not-a-uuid".to_owned(),
        "/v1/changes?after=x".to_owned(),
        "/v1/changes?limit=0".to_owned(),
        "/v1/events/log?after=-1".to_owned(),
        "/v1/events/log?types=bogus".to_owned(),
    ] {
        s.get(&path).await.expect_error(400, "bad_request");
    }
    for q in ["limit=0", "limit=10001"] {
        let r = s.get(&format!("/v1/events/log?{q}")).await;
        r.expect_error(400, "bad_request");
        assert!(r.text.contains("between 1 and 10000"), "{}", r.text);
    }
    // Good values work.
    let r = s.get(&format!("/v1/twins/{id}?meta=true")).await;
    r.expect(200);
    assert!(r.body["meta"].is_object(), "{}", r.text);
    let r = s.get("/v1/twins?entity_type=machine&limit=1").await;
    r.expect(200);
    let r = s.get(&format!("/v1/events/log?twin_id={id}&limit=1")).await;
    r.expect(200);
    assert_eq!(
        r.body["events"].as_array().map(Vec::len),
        Some(1),
        "{}",
        r.text
    );
}

#[tokio::test]
async fn module_limits_out_of_range_name_the_query_parameter() {
    let s = App::start().await;
    for (query, param) in [
        ("fuel=0", "fuel must be between"),
        ("memory_mb=100000", "memory_mb must be between 1 and 512"),
        ("timeout=1h", "timeout must be between 1 ms and 30 s"),
    ] {
        let r = s
            .call(
                Method::PUT,
                &format!("/v1/modules/m?{query}"),
                Body::Raw(b"\0asm\x0d\0\x01\0", "application/wasm"),
            )
            .await;
        r.expect_error(422, "validation_failed");
        let msg = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.starts_with(param), "{query}: {msg}");
    }
}
