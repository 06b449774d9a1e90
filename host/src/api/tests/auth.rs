//! Tokens and roles: 401 without a valid bearer token (with `WWW-Authenticate`), 403 for a
//! role that may not make a call.

use serde_json::json;

use super::{App, Body, Method};

#[tokio::test]
async fn missing_or_wrong_token_is_401() {
    let s = App::start().await;
    assert!(s.token.starts_with("th_"), "admin token {:?}", s.token);

    let r = s
        .send(Method::GET, "/v1/twins", None, Body::None, &[])
        .await;
    r.expect_error(401, "unauthorized");
    assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));

    let body = json!({"entity_type": "machine"});
    s.send(Method::POST, "/v1/twins", None, Body::Json(&body), &[])
        .await
        .expect_error(401, "unauthorized");
    s.send(
        Method::POST,
        "/v1/twins",
        Some("th_not_a_real_token"),
        Body::Json(&body),
        &[],
    )
    .await
    .expect_error(401, "unauthorized");
    s.send(Method::GET, "/v1/metrics", Some("wrong"), Body::None, &[])
        .await
        .expect_error(401, "unauthorized");
    // Not a bearer scheme.
    let basic = format!("Basic {}", s.token);
    s.send(
        Method::GET,
        "/v1/twins",
        None,
        Body::None,
        &[("authorization", &basic)],
    )
    .await
    .expect_error(401, "unauthorized");

    // Nothing was created by the refused calls.
    assert_eq!(s.twin_count().await, 0);
}

#[tokio::test]
async fn token_roles_are_enforced() {
    let s = App::start().await;
    let twin = s.create_twin_id(&json!({"entity_type": "machine"})).await;

    let r = s.post("/v1/tokens", &json!({"role": "read"})).await;
    r.expect(201);
    assert_eq!(r.body["role"], "read");
    let read = r.body["token"].as_str().expect("token").to_owned();
    assert!(!read.is_empty() && read != s.token);
    let write = s.create_token("write").await;

    // read: GET and query yes, writes no.
    s.send(
        Method::GET,
        &format!("/v1/twins/{twin}"),
        Some(&read),
        Body::None,
        &[],
    )
    .await
    .expect(200);
    s.send(Method::GET, "/v1/twins", Some(&read), Body::None, &[])
        .await
        .expect(200);
    s.send(
        Method::POST,
        "/v1/query",
        Some(&read),
        Body::Json(&json!({})),
        &[],
    )
    .await
    .expect(200);
    s.send(
        Method::POST,
        "/v1/twins",
        Some(&read),
        Body::Json(&json!({"entity_type": "machine"})),
        &[],
    )
    .await
    .expect_error(403, "forbidden");
    s.send(
        Method::PATCH,
        &format!("/v1/twins/{twin}"),
        Some(&read),
        Body::Json(&json!({"a": 1})),
        &[],
    )
    .await
    .expect_error(403, "forbidden");
    s.send(
        Method::DELETE,
        &format!("/v1/twins/{twin}"),
        Some(&read),
        Body::None,
        &[],
    )
    .await
    .expect_error(403, "forbidden");
    s.send(
        Method::POST,
        "/v1/tokens",
        Some(&read),
        Body::Json(&json!({"role": "admin"})),
        &[],
    )
    .await
    .expect_error(403, "forbidden");

    // write: twins yes, models and tokens no.
    s.send(
        Method::POST,
        "/v1/twins",
        Some(&write),
        Body::Json(&json!({"entity_type": "machine"})),
        &[],
    )
    .await
    .expect(201);
    s.send(
        Method::PUT,
        "/v1/models/x",
        Some(&write),
        Body::Json(&json!({"properties": {}})),
        &[],
    )
    .await
    .expect_error(403, "forbidden");
    s.send(
        Method::POST,
        "/v1/tokens",
        Some(&write),
        Body::Json(&json!({"role": "read"})),
        &[],
    )
    .await
    .expect_error(403, "forbidden");
    // write manages rules (API.md) and may invoke compute modules, but not upload them.
    let rule = json!({"kind": "threshold", "property": "t", "op": ">", "value": 1,
                      "actions": [{"type": "alert"}]});
    s.send(
        Method::PUT,
        "/v1/rules/r",
        Some(&write),
        Body::Json(&rule),
        &[],
    )
    .await
    .expect(201);
    s.send(
        Method::PUT,
        "/v1/rules/r2",
        Some(&read),
        Body::Json(&rule),
        &[],
    )
    .await
    .expect_error(403, "forbidden");
    s.send(Method::DELETE, "/v1/rules/r", Some(&write), Body::None, &[])
        .await
        .expect(204);
    s.send(
        Method::POST,
        "/v1/modules/none/invoke",
        Some(&write),
        Body::Json(&json!({"twin_ids": []})),
        &[],
    )
    .await
    .expect_error(404, "not_found");
    s.send(
        Method::PUT,
        "/v1/modules/none",
        Some(&write),
        Body::Raw(b"\0asm", "application/wasm"),
        &[],
    )
    .await
    .expect_error(403, "forbidden");
    // A read token may read models.
    s.send(Method::GET, "/v1/models", Some(&read), Body::None, &[])
        .await
        .expect(200);
    s.get("/v1/models/x").await.expect_error(404, "not_found");

    // Bad role.
    s.post("/v1/tokens", &json!({"role": "root"}))
        .await
        .expect_error(400, "bad_request");
    assert_eq!(s.twin_count().await, 2);
}
