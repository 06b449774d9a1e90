//! Auth that needs a process: the admin token file (mode 0600), `--insecure-no-auth`
//! (refused off loopback, every request admin on it) and `twinhost token create`. 401/403
//! for tokens and roles are tested in-process (`host/src/api/tests/auth.rs`).

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::common::{cli_ok, twinhost_command, Body, Server};

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
