//! Tokens and roles: 401 without a valid bearer token (with `WWW-Authenticate`), 403 for a
//! role that may not make a call.

use serde_json::{json, Value};

use super::{assert_error_shape, App, Body, Method};

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

    let rule = json!({"kind": "threshold", "property": "t", "op": ">", "value": 1,
                      "actions": [{"type": "alert"}]});
    let machine = json!({"entity_type": "machine"});
    let (twin_path, none) = (format!("/v1/twins/{twin}"), json!({}));
    // (token, method, path, body, status), in order: each runs on the state the ones before
    // it left.
    let cases: [(&str, Method, &str, Option<&Value>, u16); 17] = [
        // read: GET and query yes, writes no.
        (&read, Method::GET, &twin_path, None, 200),
        (&read, Method::GET, "/v1/twins", None, 200),
        (&read, Method::POST, "/v1/query", Some(&none), 200),
        (&read, Method::POST, "/v1/twins", Some(&machine), 403),
        (
            &read,
            Method::PATCH,
            &twin_path,
            Some(&json!({"a": 1})),
            403,
        ),
        (&read, Method::DELETE, &twin_path, None, 403),
        (
            &read,
            Method::POST,
            "/v1/tokens",
            Some(&json!({"role": "admin"})),
            403,
        ),
        // A read token may read models.
        (&read, Method::GET, "/v1/models", None, 200),
        // write: twins yes, models and tokens no.
        (&write, Method::POST, "/v1/twins", Some(&machine), 201),
        (
            &write,
            Method::PUT,
            "/v1/models/x",
            Some(&json!({"properties": {}})),
            403,
        ),
        (
            &write,
            Method::POST,
            "/v1/tokens",
            Some(&json!({"role": "read"})),
            403,
        ),
        // write manages rules (API.md) and may invoke compute modules, but not upload them.
        (&write, Method::PUT, "/v1/rules/r", Some(&rule), 201),
        (&read, Method::PUT, "/v1/rules/r2", Some(&rule), 403),
        (&write, Method::DELETE, "/v1/rules/r", None, 204),
        (
            &write,
            Method::POST,
            "/v1/modules/none/invoke",
            Some(&json!({"twin_ids": []})),
            404,
        ),
        (&s.token, Method::GET, "/v1/models/x", None, 404),
        (
            &s.token,
            Method::POST,
            "/v1/tokens",
            Some(&json!({"role": "root"})),
            400,
        ),
    ];
    for (token, method, path, body, status) in cases {
        let body = body.map_or(Body::None, Body::Json);
        let r = s.send(method.clone(), path, Some(token), body, &[]).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.text);
        if status >= 400 {
            assert_error_shape(&r.body);
        }
    }
    s.send(
        Method::PUT,
        "/v1/modules/none",
        Some(&write),
        Body::Raw(b"\0asm", "application/wasm"),
        &[],
    )
    .await
    .expect_error(403, "forbidden");
    assert_eq!(s.twin_count().await, 2);
}
