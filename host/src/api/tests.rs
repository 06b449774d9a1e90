//! In-process tests of the HTTP API: the [`router`](super::router) built on a node in a temporary
//! data directory (as `twinhost serve` builds it, through `open_node`), driven with
//! `tower::ServiceExt::oneshot` — no socket, no process.
//!
//! They cover how requests are parsed and how errors map to statuses and the API.md error body:
//! tokens and roles, malformed bodies and parameters, body limits, validation details,
//! conflicts and `If-Match`. What needs a process (restart, kill -9, signals, streams, guests,
//! the CLI) is tested end to end in `tests/e2e/`.
//!
//! [`App`] mirrors the end-to-end tests' client (`send`, `get`, `post`, ..., `expect_error`),
//! so a test reads the same in both places.

mod auth;
mod errors;
mod health;
mod ingest;
mod limits;
mod models;
mod origin;
mod twins;

use std::time::Duration;

use axum::body::Body as HttpBody;
use axum::http::{HeaderMap, Method, Request};
use axum::Router;
use chrono::{DateTime, SecondsFormat, Utc};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::Limits;
use crate::cli::serve::{open_default_node, Node};

/// The node id of every in-process app.
const NODE_ID: &str = "node-test";

/// A router on its own node and temporary data directory.
struct App {
    router: Router,
    /// The admin token.
    token: String,
    node: Node,
    // Last: removed after the node is shut down.
    _tmp: tempfile::TempDir,
}

impl App {
    /// An app with the default limits.
    async fn start() -> App {
        App::with_limits(Limits::default()).await
    }

    async fn with_limits(limits: Limits) -> App {
        let tmp = tempfile::Builder::new()
            .prefix("twinhost-api-")
            .tempdir()
            .expect("creating a temp dir");
        let node = open_default_node(tmp.path(), NODE_ID, false)
            .await
            .expect("opening the node");
        App::on(node, tmp, limits)
    }

    /// The same data directory served again after a clean shutdown, as a restart of `serve`
    /// would (the admin token stays; limits are the defaults).
    async fn restart(mut self) -> App {
        let tmp = std::mem::replace(
            &mut self._tmp,
            tempfile::tempdir().expect("creating a temp dir"),
        );
        // Shuts the node down; its behavior and rule tasks then let go of the store.
        drop(self);
        let started = std::time::Instant::now();
        let node = loop {
            match open_default_node(tmp.path(), NODE_ID, false).await {
                Ok(node) => break node,
                Err(e) if started.elapsed() > Duration::from_secs(5) => {
                    panic!("the data directory is still held: {e:#}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        App::on(node, tmp, Limits::default())
    }

    fn on(node: Node, tmp: tempfile::TempDir, limits: Limits) -> App {
        let token = std::fs::read_to_string(&node.admin_token_file)
            .expect("the admin token file")
            .trim()
            .to_owned();
        App {
            router: super::router(node.state.clone(), limits),
            token,
            node,
            _tmp: tmp,
        }
    }

    /// Send a request with an explicit token (`None`: no `Authorization` header) and extra
    /// headers.
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Body<'_>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Body::None => req.body(HttpBody::empty()),
            Body::Json(v) => req
                .header("content-type", "application/json")
                .body(HttpBody::from(serde_json::to_vec(v).expect("JSON"))),
            Body::Raw(b, ct) => req
                .header("content-type", ct)
                .body(HttpBody::from(b.to_vec())),
        }
        .expect("a valid request");
        let resp = self
            .router
            .clone()
            .oneshot(req)
            .await
            .expect("the router is infallible");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("reading the body")
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    /// A request with the admin token.
    async fn call(&self, method: Method, path: &str, body: Body<'_>) -> Resp {
        self.send(method, path, Some(&self.token), body, &[]).await
    }

    async fn get(&self, path: &str) -> Resp {
        self.call(Method::GET, path, Body::None).await
    }

    async fn post(&self, path: &str, body: &Value) -> Resp {
        self.call(Method::POST, path, Body::Json(body)).await
    }

    async fn put(&self, path: &str, body: &Value) -> Resp {
        self.call(Method::PUT, path, Body::Json(body)).await
    }

    async fn patch(&self, path: &str, body: &Value) -> Resp {
        self.call(Method::PATCH, path, Body::Json(body)).await
    }

    async fn delete(&self, path: &str) -> Resp {
        self.call(Method::DELETE, path, Body::None).await
    }

    async fn post_raw(&self, path: &str, bytes: &[u8], content_type: &str) -> Resp {
        self.call(Method::POST, path, Body::Raw(bytes, content_type))
            .await
    }

    /// Create a twin and return it (asserts 201).
    async fn create_twin(&self, body: &Value) -> Value {
        let r = self.post("/v1/twins", body).await;
        r.expect(201);
        r.body
    }

    async fn create_twin_id(&self, body: &Value) -> String {
        self.create_twin(body).await["id"]
            .as_str()
            .expect("twin id")
            .to_owned()
    }

    /// Create a token with a role (asserts 201) and return it.
    async fn create_token(&self, role: &str) -> String {
        let r = self.post("/v1/tokens", &json!({ "role": role })).await;
        r.expect(201);
        r.body["token"].as_str().expect("token").to_owned()
    }

    /// `active_twins` of `/v1/metrics`.
    async fn twin_count(&self) -> u64 {
        let r = self.get("/v1/metrics").await;
        r.expect(200);
        r.body["active_twins"].as_u64().expect("active_twins")
    }
}

impl Drop for App {
    fn drop(&mut self) {
        // Stop the commit and event-log threads before the directory goes.
        self.node.registry.shutdown();
        self.node.events.shutdown();
    }
}

/// A body to send.
enum Body<'a> {
    None,
    Json(&'a Value),
    /// Raw bytes with a content type.
    Raw(&'a [u8], &'a str),
}

/// A response as a test sees it.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: HeaderMap,
    /// The body as JSON (`Value::Null` when empty or not JSON).
    body: Value,
    text: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    #[track_caller]
    fn expect(&self, status: u16) -> &Self {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.text
        );
        self
    }

    /// Assert the status and the API.md error body with `code`.
    #[track_caller]
    fn expect_error(&self, status: u16, code: &str) -> &Self {
        self.expect(status);
        assert_error_shape(&self.body);
        assert_eq!(
            self.body["error"]["code"], code,
            "error code; body: {}",
            self.text
        );
        self
    }
}

/// Assert that a body is `{"error": {"code": "<snake_case>", "message": "<non-empty>", "details"?}}`.
#[track_caller]
fn assert_error_shape(body: &Value) {
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("error body is not an object: {body}"));
    assert_eq!(obj.len(), 1, "error body has only `error`: {body}");
    let e = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("`error` is not an object: {body}"));
    let code = e["code"].as_str().unwrap_or_default();
    assert!(
        !code.is_empty() && code.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
        "error.code is snake_case: {body}"
    );
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message is not empty: {body}"
    );
    for k in e.keys() {
        assert!(
            matches!(k.as_str(), "code" | "message" | "details"),
            "unexpected key {k} in error: {body}"
        );
    }
}

/// A model of machines: bounded temperature, an enum status (required), a non-negative rpm.
fn machine_model() -> Value {
    json!({
        "properties": {
            "temperature": {"type": "number", "unit": "degF", "min": -40, "max": 500},
            "status": {"type": "string", "enum": ["operational", "maintenance", "fault"]},
            "rpm": {"type": "integer", "min": 0}
        },
        "required": ["status"],
        "additional_properties": false,
        "conflict": {"strategy": "lww"}
    })
}

/// An RFC 3339 time of a body.
fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap_or_else(|e| panic!("{v} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}
