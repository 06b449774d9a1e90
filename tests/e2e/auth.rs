//! Tokens and roles: 401 without a valid bearer token, 403 for a role that may not do a call,
//! the admin token file, `--insecure-no-auth` (loopback only) and `twinhost token create`.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::common::{cli_ok, twinhost_command, Body, Server};

#[tokio::test]
async fn missing_or_wrong_token_is_401() {
    let s = Server::start();
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
    let s = Server::start();
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

#[cfg(unix)]
#[tokio::test]
async fn admin_token_file_is_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start();
    let meta = std::fs::metadata(s.data_path("admin.token")).expect("admin.token exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(s.data_path("admin.token")).unwrap();
    assert_eq!(text.trim(), s.token);
}

#[tokio::test]
async fn insecure_no_auth_refuses_a_non_loopback_address() {
    let tmp = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let mut child = twinhost_command()
        .arg("serve")
        .arg("--insecure-no-auth")
        .arg("--listen")
        .arg(format!("0.0.0.0:{port}"))
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`serve --insecure-no-auth --listen 0.0.0.0` kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "exit status {}", out.status);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("insecure"), "stderr: {err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}

#[tokio::test]
async fn insecure_no_auth_on_loopback_serves_without_token() {
    let s = Server::start_with(&["--insecure-no-auth"]);
    let r = s
        .send(
            Method::POST,
            "/v1/twins",
            None,
            Body::Json(&json!({"entity_type": "machine"})),
            &[],
        )
        .await;
    r.expect(201);
    let id = r.body["id"].as_str().unwrap().to_owned();
    s.send(
        Method::GET,
        &format!("/v1/twins/{id}"),
        None,
        Body::None,
        &[],
    )
    .await
    .expect(200);
    // Every request is admin.
    s.send(
        Method::PUT,
        "/v1/models/thing",
        None,
        Body::Json(&json!({})),
        &[],
    )
    .await
    .expect(201);
}

#[tokio::test]
async fn cli_token_create_prints_a_working_token() {
    let s = Server::start();
    let twin = s.create_twin_id(&json!({"entity_type": "machine"})).await;
    let out = s.cli(&["token", "create", "--role", "read"]);
    let token = cli_ok(&out).trim().to_owned();
    assert!(token.starts_with("th_"), "stdout: {token:?}");
    assert_eq!(token.lines().count(), 1);
    s.send(
        Method::GET,
        &format!("/v1/twins/{twin}"),
        Some(&token),
        Body::None,
        &[],
    )
    .await
    .expect(200);
    s.send(
        Method::POST,
        "/v1/twins",
        Some(&token),
        Body::Json(&json!({"entity_type": "machine"})),
        &[],
    )
    .await
    .expect_error(403, "forbidden");
}
