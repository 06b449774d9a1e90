//! What the end-to-end tests share: start the real `twinhost` binary on a temporary data
//! directory and a free port, talk to it over HTTP, stop / kill / restart it; the built guest
//! components; and small data helpers (a model, id lists, times).
#![allow(dead_code)]

pub mod client;
pub mod proxy;
pub mod stream;

pub use client::{assert_error_shape, Body, Client, REQUEST_TIMEOUT};

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
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
    "TWINHOST_MAX_BULK_ITEMS",
    "TWINHOST_HISTORY_MAX_AGE",
    "TWINHOST_HISTORY_MAX_POINTS",
    "TWINHOST_URL",
    "TWINHOST_TOKEN",
    "TWINHOST_PEERS",
    "TWINHOST_PEER_TOKEN",
    "TWINHOST_SYNC_FLUSH",
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

/// A running `twinhost serve` on its own temporary data directory.
///
/// It derefs to its [`Client`], which sends the admin token (read from
/// `<data-dir>/admin.token`; empty with `--insecure-no-auth` if the file is missing).
pub struct Server {
    client: Client,
    /// `--data-dir` of the server.
    pub data_dir: PathBuf,
    /// Extra `serve` arguments, reused on restart.
    pub extra_args: Vec<String>,
    /// `--node-id`, when given.
    pub node_id: Option<String>,
    /// Stdout and stderr of the server (appended across restarts).
    pub log_path: PathBuf,
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
            client: Client::new(0, ""),
            data_dir,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            node_id: node_id.map(str::to_owned),
            log_path,
            child: None,
            _tmp: tmp,
        };
        // The port was free when picked; another process may grab it first — retry then.
        let mut last_err = String::new();
        for _ in 0..5 {
            srv.client = Client::new(free_port(), "");
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
        let listen = format!("127.0.0.1:{}", self.client.port);
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
            self.client.token = t.trim().to_owned();
        }
    }

    /// The client of this server (with the admin token); clone it into a spawned task.
    pub fn client(&self) -> &Client {
        &self.client
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
        // A new client: no pooled connection to the previous process is reused.
        self.client = Client::new(self.client.port, &self.client.token);
        self.read_token();
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

    /// Run a client subcommand to completion with `input` on its stdin.
    pub fn cli_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .cli_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the CLI");
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(input).expect("writing the CLI's stdin");
        drop(stdin);
        child.wait_with_output().expect("running the CLI")
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

impl std::ops::Deref for Server {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A failing test shows what each of its servers logged last (the data directory,
        // and the log with it, goes away with the server).
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of the server at {} ---\n{}",
                self.url,
                tail(&self.log(), 40)
            );
        }
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
    let (client, twin) = (s.client().clone(), twin.to_owned());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let task = tokio::spawn(async move {
        let mut ok = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let r = client
                .post("/v1/modules/good/invoke", &json!({"twin_ids": [twin]}))
                .await;
            assert_eq!(r.status, 200, "a good call failed meanwhile: {}", r.text);
            assert_eq!(r.body["results"][&twin]["count"], 1, "{}", r.text);
            ok += 1;
        }
        ok
    });
    (stop, task)
}

// ---- data shared by several subjects ---------------------------------------------------

/// A model of machines: bounded temperature, an enum status (required), a non-negative rpm.
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

/// The `id`s of a list of twins, in order.
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

/// An RFC 3339 time of a body.
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

/// Poll `GET path` every 50 ms until `pred` holds for its body (or fail after `within`).
async fn poll_until(
    s: &Server,
    path: &str,
    within: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let body = s.get(path).await.body;
        if pred(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} never matched: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll the behavior `name` until `pred` holds for it (or fail after 30 s).
pub async fn behavior_until(s: &Server, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
    poll_until(
        s,
        &format!("/v1/behaviors/{name}"),
        Duration::from_secs(30),
        pred,
    )
    .await
}

/// Poll `twin` until `pred` holds for it (or fail after 10 s).
pub async fn twin_until(s: &Server, twin: &str, pred: impl Fn(&Value) -> bool) -> Value {
    poll_until(
        s,
        &format!("/v1/twins/{twin}"),
        Duration::from_secs(10),
        pred,
    )
    .await
}
