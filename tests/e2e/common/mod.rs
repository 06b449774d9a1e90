//! What the end-to-end tests share: start the real `twinhost` binary on a temporary data
//! directory and a free port, talk to it over HTTP, stop / kill / restart it; the built guest
//! components; and small data helpers (a model, id lists, times).
#![allow(dead_code)]

pub mod stream;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_twinhost");
/// How long a server may take to print its "listening" line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERM'd server may take to exit before `stop` reports a failure.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The node id every test server runs with.
pub const NODE_ID: &str = "node-test";

/// Environment variables of the binary that must not leak from the test environment.
const TWINHOST_ENV: &[&str] = &[
    "TWINHOST_DATA_DIR",
    "TWINHOST_LISTEN",
    "TWINHOST_NODE_ID",
    "TWINHOST_INSECURE_NO_AUTH",
    "TWINHOST_MAX_BODY_BYTES",
    "TWINHOST_MAX_INGEST_BYTES",
    "TWINHOST_HISTORY_MAX_AGE",
    "TWINHOST_HISTORY_MAX_POINTS",
    "TWINHOST_URL",
    "TWINHOST_TOKEN",
];
const PROXY_ENV: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// A command for the binary with a clean environment (no `TWINHOST_*`, no proxies).
pub fn twinhost_command() -> Command {
    let mut c = Command::new(BIN);
    for v in TWINHOST_ENV.iter().chain(PROXY_ENV) {
        c.env_remove(v);
    }
    c.env("NO_PROXY", "127.0.0.1,localhost");
    c
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A client that ignores proxies. A new one is made on restart so no pooled connection
/// to the previous process is reused.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("building the HTTP client")
}

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
}

/// A running `twinhost serve` on its own temporary data directory.
pub struct Server {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    pub port: u16,
    /// The admin token (from `<data-dir>/admin.token`; empty with `--insecure-no-auth`
    /// if the file is missing).
    pub token: String,
    /// `--data-dir` of the server.
    pub data_dir: PathBuf,
    /// Extra `serve` arguments, reused on restart.
    pub extra_args: Vec<String>,
    /// `--node-id`, when given.
    pub node_id: Option<String>,
    /// Stdout and stderr of the server (appended across restarts).
    pub log_path: PathBuf,
    pub http: reqwest::Client,
    child: Option<Child>,
    // Last: the directory is removed after the child is killed.
    _tmp: tempfile::TempDir,
}

impl Server {
    /// Start a server with default options.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Start a server with extra `serve` arguments (e.g. `["--max-ingest-bytes", "1000"]`).
    pub fn start_with(extra: &[&str]) -> Server {
        Server::start_from(|_| {}, Some(NODE_ID), extra)
    }

    /// Start a server on a data directory that `prepare` fills first (e.g. from a fixture),
    /// with `--node-id` when given.
    pub fn start_from(
        prepare: impl FnOnce(&Path),
        node_id: Option<&str>,
        extra: &[&str],
    ) -> Server {
        let tmp = tempfile::Builder::new()
            .prefix("twinhost-e2e-")
            .tempdir()
            .expect("creating a temp dir");
        let data_dir = tmp.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("creating the data dir");
        prepare(&data_dir);
        let log_path = tmp.path().join("server.log");
        let mut srv = Server {
            url: String::new(),
            port: 0,
            token: String::new(),
            data_dir,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            node_id: node_id.map(str::to_owned),
            log_path,
            http: http_client(),
            child: None,
            _tmp: tmp,
        };
        // The port was free when picked; another process may grab it first — retry then.
        let mut last_err = String::new();
        for _ in 0..5 {
            srv.port = free_port();
            srv.url = format!("http://127.0.0.1:{}", srv.port);
            match srv.spawn() {
                Ok(()) => {
                    srv.read_token();
                    return srv;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("the server did not start: {last_err}");
    }

    /// Start the process on `self.port` and wait for its "listening" line.
    fn spawn(&mut self) -> Result<(), String> {
        let listen = format!("127.0.0.1:{}", self.port);
        let mut cmd = twinhost_command();
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(&listen)
            .args(self.node_id.iter().flat_map(|n| ["--node-id", n.as_str()]))
            .args(&self.extra_args)
            .env("RUST_LOG", "info,sled=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| e.to_string())?;
        cmd.stderr(Stdio::from(log.try_clone().map_err(|e| e.to_string())?));
        let mut child = cmd.spawn().map_err(|e| format!("spawning {BIN}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        // Copy stdout to the log and report the "listening" line; keeps draining afterwards
        // so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            use std::io::Write;
            let mut log = log;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "[stdout] {line}");
                if line.starts_with("twinhost listening on") {
                    let _ = tx.send(line);
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(_) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Stdout closed: the process is exiting; `try_wait` below reports it.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "exited with {status} before listening:\n{}",
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "not listening after {START_TIMEOUT:?}:\n{}",
                    self.log()
                ));
            }
        }
        // The line is printed after bind; be sure the port answers.
        let addr: SocketAddr = listen.parse().expect("valid addr");
        if TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{listen} does not accept connections:\n{}",
                self.log()
            ));
        }
        self.child = Some(child);
        Ok(())
    }

    fn read_token(&mut self) {
        if let Ok(t) = std::fs::read_to_string(self.data_dir.join("admin.token")) {
            self.token = t.trim().to_owned();
        }
    }

    /// Everything the server printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Send SIGTERM and wait up to `timeout` for the exit status. On timeout the process is
    /// killed with SIGKILL and an error is returned.
    pub fn stop_within(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let mut child = self.child.take().ok_or("the server is not running")?;
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .map_err(|e| format!("running kill: {e}"))?;
        if !ok.success() {
            return Err(format!("kill -TERM {} failed: {ok}", child.id()));
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the server did not exit within {timeout:?} of SIGTERM (killed it); log:\n{}",
                    tail(&self.log(), 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, waiting up to [`STOP_TIMEOUT`].
    pub fn stop(&mut self) -> Result<ExitStatus, String> {
        self.stop_within(STOP_TIMEOUT)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same data directory, port and arguments (after `stop` or `kill9`;
    /// a running server is killed first).
    pub fn restart(&mut self) {
        self.kill9();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.spawn() {
                Ok(()) => break,
                // The port or the store's file lock may linger for a moment.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart attempt failed, retrying: {}", tail(&e, 5));
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("restart failed: {e}"),
            }
        }
        self.read_token();
        self.http = http_client();
    }

    // ---- HTTP -------------------------------------------------------------------------

    /// Send a request with an explicit token (`None`: no `Authorization` header) and
    /// extra headers.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Body<'_>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut rb = self
            .http
            .request(method.clone(), format!("{}{path}", self.url));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        rb = match body {
            Body::None => rb,
            Body::Json(v) => rb.json(v),
            Body::Raw(b, ct) => rb.header("content-type", ct).body(b.to_vec()),
        };
        let resp = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    /// A request with the admin token.
    pub async fn call(&self, method: Method, path: &str, body: Body<'_>) -> Resp {
        let t = self.token.clone();
        self.send(method, path, Some(&t), body, &[]).await
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

    /// POST raw bytes with a content type (admin token).
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
        let r = self
            .post("/v1/tokens", &serde_json::json!({ "role": role }))
            .await;
        r.expect(201);
        r.body["token"].as_str().expect("token").to_owned()
    }

    /// `active_twins` of `/v1/metrics`.
    pub async fn twin_count(&self) -> u64 {
        let r = self.get("/v1/metrics").await;
        r.expect(200);
        r.body["active_twins"].as_u64().expect("active_twins")
    }

    /// A client subcommand of the binary against this server (`--url`, `--data-dir`
    /// appended).
    fn cli_command(&self, args: &[&str]) -> Command {
        let mut c = twinhost_command();
        c.args(args)
            .arg("--url")
            .arg(&self.url)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::null());
        c
    }

    /// Run a client subcommand to completion.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().expect("running the CLI")
    }

    /// Start a client subcommand with stdout and stderr piped, for reading as it runs.
    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        self.cli_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the CLI")
    }

    pub fn data_path(&self, name: &str) -> PathBuf {
        self.data_dir.join(name)
    }

    /// The temporary directory that holds the data directory and the log.
    pub fn tmp_dir(&self) -> &Path {
        self._tmp.path()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last `n` lines of a text.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Stdout of a CLI run, asserting it succeeded.
#[track_caller]
pub fn cli_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "CLI failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Parse CLI stdout as JSON.
#[track_caller]
pub fn cli_json(out: &Output) -> Value {
    let s = cli_ok(out);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("CLI stdout is not JSON ({e}): {s}"))
}

/// A built guest component, by its path under `guests/target/` (e.g.
/// `python/thermal_analysis_py.wasm`).
pub fn guest_file(rel: &str) -> Vec<u8> {
    let path = format!("{}/../guests/target/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!("{path}: {e}; build the guests first with scripts/build-guests.sh (scripts/test.sh does)")
    })
}

/// A Rust guest component by crate name (`thermal_analysis`).
pub fn guest(name: &str) -> Vec<u8> {
    guest_file(&format!("wasm32-wasip2/release/{name}.wasm"))
}

/// Calls of the module `good` (thermal-analysis) on `twin` in the background until the returned
/// flag is set; the task returns how many succeeded (and fails on the first that does not).
pub fn good_calls(
    s: &Server,
    twin: &str,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<u32>,
) {
    let (client, url, token, twin) = (
        s.http.clone(),
        s.url.clone(),
        s.token.clone(),
        twin.to_owned(),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let task = tokio::spawn(async move {
        let mut ok = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let r = client
                .post(format!("{url}/v1/modules/good/invoke"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"twin_ids": [twin]}))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(status, 200, "a good call failed meanwhile: {v}");
            assert_eq!(v["results"][&twin]["count"], 1, "{v}");
            ok += 1;
        }
        ok
    });
    (stop, task)
}

// ---- data shared by several subjects ---------------------------------------------------

pub fn machine_model() -> Value {
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

pub fn ids(items: &Value) -> Vec<String> {
    items
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {items}"))
        .iter()
        .map(|t| t["id"].as_str().expect("id").to_owned())
        .collect()
}

pub fn id_set(items: &Value) -> BTreeSet<String> {
    ids(items).into_iter().collect()
}

pub fn set(v: &[&String]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap_or_else(|e| panic!("{v} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Percent-encode the few characters of an RFC 3339 time that matter in a query string.
pub fn q(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

pub async fn upload(s: &Server, name: &str, bytes: &[u8]) -> Resp {
    s.call(
        Method::PUT,
        &format!("/v1/modules/{name}"),
        Body::Raw(bytes, "application/wasm"),
    )
    .await
}

/// Poll the event log until `pred` holds for the alerts of `twin` (or fail after 10 s).
pub async fn alerts_until(s: &Server, twin: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = s
            .get(&format!("/v1/events/log?types=alert&twin_id={twin}"))
            .await;
        r.expect(200);
        let alerts = r.body["events"].as_array().cloned().unwrap_or_default();
        if pred(&alerts) {
            return alerts;
        }
        assert!(
            Instant::now() < deadline,
            "condition never held; alerts: {alerts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn twin_until(s: &Server, twin: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = s.get(&format!("/v1/twins/{twin}")).await.body;
        if pred(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "twin never matched: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
