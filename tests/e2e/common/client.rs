//! The one HTTP client of the end-to-end tests.
//!
//! A [`Client`] knows a server's address and the token to send; a [`Server`](super::Server)
//! derefs to its client, so a test writes `s.get("/v1/twins")`. It is cheap to clone, so a
//! spawned task takes `s.client().clone()`. Every request goes through [`Client::try_send`];
//! the event streams open through [`Client::open_stream`] and are read by the SSE and
//! WebSocket readers in [`super::stream`].

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

use super::stream::{Sse, Ws, WsOpen};

/// How long one ordinary request may take in all (connect, send, read the body).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting may take. Streams have no total timeout: they stay open for as long
/// as a test reads them.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP response as a test sees it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    /// The body parsed as JSON (`Value::Null` when empty or not JSON).
    pub body: Value,
    /// The raw body.
    pub text: String,
}

impl Resp {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// `error.code` of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// Assert the status, with the body in the message.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Self {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.text
        );
        self
    }

    /// Assert status and the API.md error shape `{"error": {"code", "message"}}` with `code`.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> &Self {
        self.expect(status);
        assert_error_shape(&self.body);
        assert_eq!(self.code(), code, "error code; body: {}", self.text);
        self
    }
}

/// Assert that a body is `{"error": {"code": "<snake_case>", "message": "<non-empty>", "details"?}}`.
#[track_caller]
pub fn assert_error_shape(body: &Value) {
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("error body is not an object: {body}"));
    assert_eq!(obj.len(), 1, "error body has only `error`: {body}");
    let e = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("`error` is not an object: {body}"));
    let code = e["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code: {body}"));
    assert!(
        !code.is_empty() && code.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
        "error.code is snake_case: {body}"
    );
    let msg = e["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message: {body}"));
    assert!(!msg.is_empty(), "error.message is not empty: {body}");
    for k in e.keys() {
        assert!(
            matches!(k.as_str(), "code" | "message" | "details"),
            "unexpected key {k} in error: {body}"
        );
    }
}

/// A body to send.
pub enum Body<'a> {
    None,
    Json(&'a Value),
    /// Raw bytes with a content type.
    Raw(&'a [u8], &'a str),
    /// Owned bytes with a content type (for a request moved into a task).
    Bytes(Vec<u8>, &'a str),
    /// A streamed body with a content type (e.g. one that trickles in).
    Stream(reqwest::Body, &'a str),
}

/// A client of one server: its address and the token it sends.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    pub port: u16,
    /// The token [`Client::call`] and its shorthands send (the server's admin token).
    pub token: String,
}

impl Client {
    /// A client of `127.0.0.1:<port>` that ignores proxies and has its own connection pool
    /// (a restarted server gets a new client, so no connection to the old process is reused).
    pub fn new(port: u16, token: &str) -> Client {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .expect("building the HTTP client");
        Client {
            http,
            url: format!("http://127.0.0.1:{port}"),
            port,
            token: token.to_owned(),
        }
    }

    /// The same client sending another token.
    pub fn with_token(&self, token: &str) -> Client {
        Client {
            token: token.to_owned(),
            ..self.clone()
        }
    }

    /// Send a request with an explicit token (`None`: no `Authorization` header), extra
    /// headers and a total timeout. Transport errors (refused, reset, timed out) are returned.
    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Body<'_>,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Resp, reqwest::Error> {
        let resp = self
            .request(method, path, token, body, headers)
            .timeout(timeout)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Resp {
            status,
            headers,
            body,
            text,
        })
    }

    /// [`Client::try_send`] within [`REQUEST_TIMEOUT`], panicking on a transport error.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Body<'_>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let what = format!("{method} {path}");
        self.try_send(method, path, token, body, headers, REQUEST_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// Send a request and return once the response head arrives, leaving the body unread:
    /// for streams, whose body does not end.
    pub async fn open_stream(
        &self,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let rb = self.request(Method::GET, path, token, Body::None, headers);
        tokio::time::timeout(Duration::from_secs(10), rb.send())
            .await
            .unwrap_or_else(|_| panic!("the response head of GET {path} within 10 s"))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Body<'_>,
        headers: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        match body {
            Body::None => rb,
            Body::Json(v) => rb.json(v),
            Body::Raw(b, ct) => rb.header("content-type", ct).body(b.to_vec()),
            Body::Bytes(b, ct) => rb.header("content-type", ct).body(b),
            Body::Stream(b, ct) => rb.header("content-type", ct).body(b),
        }
    }

    /// A request with this client's token.
    pub async fn call(&self, method: Method, path: &str, body: Body<'_>) -> Resp {
        self.send(method, path, Some(&self.token), body, &[]).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call(Method::GET, path, Body::None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Resp {
        self.call(Method::POST, path, Body::Json(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Resp {
        self.call(Method::PUT, path, Body::Json(body)).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Resp {
        self.call(Method::PATCH, path, Body::Json(body)).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.call(Method::DELETE, path, Body::None).await
    }

    /// POST raw bytes with a content type.
    pub async fn post_raw(&self, path: &str, bytes: &[u8], content_type: &str) -> Resp {
        self.call(Method::POST, path, Body::Raw(bytes, content_type))
            .await
    }

    // ---- conveniences -----------------------------------------------------------------

    /// Create a twin and return it (asserts 201).
    pub async fn create_twin(&self, body: &Value) -> Value {
        let r = self.post("/v1/twins", body).await;
        r.expect(201);
        r.body
    }

    /// The id of a created twin.
    pub async fn create_twin_id(&self, body: &Value) -> String {
        self.create_twin(body).await["id"]
            .as_str()
            .expect("twin id")
            .to_owned()
    }

    /// Create a token with a role (asserts 201) and return it.
    pub async fn create_token(&self, role: &str) -> String {
        let r = self.post("/v1/tokens", &json!({ "role": role })).await;
        r.expect(201);
        r.body["token"].as_str().expect("token").to_owned()
    }

    /// `active_twins` of `/v1/metrics`.
    pub async fn twin_count(&self) -> u64 {
        let r = self.get("/v1/metrics").await;
        r.expect(200);
        r.body["active_twins"].as_u64().expect("active_twins")
    }

    /// `PUT /v1/modules/<name><query>` with a component (`query` is `""` or `?…`).
    pub async fn upload(&self, name: &str, bytes: &[u8], query: &str) -> Resp {
        self.call(
            Method::PUT,
            &format!("/v1/modules/{name}{query}"),
            Body::Raw(bytes, "application/wasm"),
        )
        .await
    }

    // ---- event streams ----------------------------------------------------------------

    /// `GET /v1/events?<query>` as Server-Sent Events (asserts 200 and `text/event-stream`).
    pub async fn sse(&self, query: &str, headers: &[(&str, &str)]) -> Sse {
        let path = format!("/v1/events?{query}");
        Sse::new(self.open_stream(&path, Some(&self.token), headers).await)
    }

    /// The WebSocket upgrade of `/v1/events/ws?<query>` over a raw socket: open, or the
    /// refusal's status and body.
    pub async fn ws_connect(&self, query: &str) -> WsOpen {
        Ws::connect(self.port, &self.token, query).await
    }

    /// An open WebSocket of `/v1/events/ws?<query>` (panics if refused).
    pub async fn ws(&self, query: &str) -> Ws {
        match self.ws_connect(query).await {
            WsOpen::Open(w) => w,
            WsOpen::Refused(st, body) => {
                panic!("WebSocket /v1/events/ws?{query} refused: {st} {body}")
            }
        }
    }
}
