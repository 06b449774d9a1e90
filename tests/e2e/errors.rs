//! Malformed requests (bad JSON, wrong shapes, bad ids and query parameters, unknown routes and
//! methods) get the API.md error body and change nothing.

use reqwest::Method;
use serde_json::json;

use crate::common::{assert_error_shape, Body, Server};

// ---- malformed requests ----------------------------------------------------------------

#[tokio::test]
async fn malformed_requests_get_error_bodies_and_change_nothing() {
    let s = Server::start();
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
            &format!("/v1/twins/{id}"),
            Body::Json(&json!({})),
        )
        .await;
    r.expect(405);
    assert_error_shape(&r.body);

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
