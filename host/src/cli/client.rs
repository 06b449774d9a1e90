//! Client subcommands: thin wrappers over the HTTP API that print JSON.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Subcommand;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::Conn;
use crate::types::Role;

#[derive(Subcommand, Debug)]
pub enum TwinCmd {
    /// Create a twin.
    Create {
        #[arg(long)]
        entity_type: String,
        /// Properties as a JSON object (inline or @file).
        #[arg(long, default_value = "{}")]
        properties: String,
        #[arg(long)]
        parent: Option<String>,
        /// Use this id instead of a generated one.
        #[arg(long)]
        id: Option<String>,
    },
    /// Show a twin.
    Get {
        id: String,
        /// Also show its change number, clocks and the origin of each property's last write.
        #[arg(long)]
        meta: bool,
    },
    /// Merge-patch a twin's properties (JSON object, inline or @file).
    Patch {
        id: String,
        patch: String,
        /// Only apply if the twin is at this version.
        #[arg(long)]
        if_match: Option<u64>,
    },
    /// Delete a twin.
    Delete {
        id: String,
        /// Also delete everything below it.
        #[arg(long)]
        cascade: bool,
    },
    /// Create many twins from a JSON array or NDJSON file (`-`: stdin) of bodies as for
    /// `twin create` (`entity_type`, `properties`, optional `id` and `parent_id`), in
    /// batches (POST /v1/twins/bulk), with a progress bar. Items are applied in order: an item
    /// may name as its parent a twin of an earlier item.
    Import {
        file: PathBuf,
        /// Items per request (each request is one durable commit).
        #[arg(long, default_value_t = super::import::DEFAULT_IMPORT_BATCH)]
        batch: usize,
        /// Update twins whose id exists (their properties merged as a PATCH) instead of
        /// refusing them.
        #[arg(long)]
        upsert: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ModelCmd {
    /// Create or replace the model of an entity type from a JSON file.
    Put { entity_type: String, file: PathBuf },
    /// Show one model, or all.
    Get { entity_type: Option<String> },
}

#[derive(Subcommand, Debug)]
pub enum ModuleCmd {
    /// Upload a component (.wasm) as the new active version of NAME.
    Put {
        name: String,
        file: PathBuf,
        /// Fuel per call.
        #[arg(long)]
        fuel: Option<u64>,
        /// Memory per instance, in MiB.
        #[arg(long)]
        memory: Option<u64>,
        /// Wall-clock deadline per call, e.g. 500ms or 2s.
        #[arg(long)]
        timeout: Option<String>,
        /// Accept a component of another world while behaviors or rules use NAME.
        #[arg(long)]
        force: bool,
    },
    /// List modules with their versions and call counts.
    List,
    /// Make an earlier version active again.
    Rollback {
        name: String,
        version: u32,
        /// Accept a version of another world while behaviors or rules use NAME.
        #[arg(long)]
        force: bool,
    },
    /// Delete a module (refused while behaviors or rules use it, unless --force).
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum BehaviorCmd {
    /// Bind a behavior module to an entity type or one twin.
    Put {
        name: String,
        /// The behavior module (uploaded with `module put`).
        #[arg(long)]
        module: String,
        #[arg(long, required_unless_present = "twin_id", conflicts_with = "twin_id")]
        entity_type: Option<String>,
        #[arg(long)]
        twin_id: Option<String>,
    },
    /// List behaviors with their run, error and guard counters.
    List,
    /// Delete a behavior.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
pub enum PeerCmd {
    /// Sync with another node: dial it at URL and keep a link (stored; survives restarts).
    Add {
        /// The other node's id (its `serve --node-id`).
        node_id: String,
        /// Its base URL, e.g. http://10.0.0.2:7878.
        #[arg(value_name = "URL")]
        address: String,
        /// A token of the `peer` role on that node (`twinhost token create --role peer` there).
        #[arg(long, env = "TWINHOST_PEER_TOKEN")]
        peer_token: Option<String>,
    },
    /// The peers with their link state, lag and counters.
    List,
    /// Stop syncing with a peer added with `peer add`.
    Remove { node_id: String },
}

#[derive(Subcommand, Debug)]
pub enum WorkflowCmd {
    /// Start a run of the workflow spec in FILE (JSON: `steps`, `dependencies`).
    Run {
        file: PathBuf,
        /// Wait for the run to finish and print it (else print its id at once).
        #[arg(long)]
        wait: bool,
    },
    /// Show a run: its status and each step's.
    Get { id: String },
    /// Runs, newest first.
    List {
        /// Only runs with this status (running, succeeded, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Cancel a run in flight.
    Cancel { id: String },
}

#[derive(Subcommand, Debug)]
pub enum RuleCmd {
    /// Create or replace a rule from a JSON file.
    Put { name: String, file: PathBuf },
    /// List rules with their counters.
    List,
    /// Show one rule.
    Get { name: String },
    /// Delete a rule.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
pub enum EventsCmd {
    /// Print events as they happen, one JSON object per line (SSE under the hood).
    Tail {
        /// Event types, e.g. `--type alert --type twin.updated`.
        #[arg(long = "type")]
        types: Vec<String>,
        /// Only events of these twins.
        #[arg(long = "twin")]
        twins: Vec<String>,
        #[arg(long)]
        entity_type: Option<String>,
        #[arg(long)]
        parent_id: Option<String>,
        #[arg(long)]
        ancestor_id: Option<String>,
        /// Replay stored events after this sequence number first.
        #[arg(long)]
        since: Option<u64>,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

/// An HTTP client bound to one server and token.
pub struct Client {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

/// Read the token: `--token`, else `<data-dir>/admin.token`.
pub fn resolve_token(conn: &Conn) -> Option<String> {
    conn.token
        .clone()
        .or_else(|| read_token_file(&conn.data_dir))
}

pub fn read_token_file(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join(crate::api::auth::ADMIN_TOKEN_FILE))
        .ok()
        .map(|s| s.trim().to_owned())
}

impl Client {
    pub fn new(conn: &Conn) -> Self {
        Client {
            http: reqwest::Client::new(),
            url: conn.url.trim_end_matches('/').to_owned(),
            token: resolve_token(conn),
        }
    }

    /// Send a request; non-2xx becomes an error carrying the server's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        ctype: &str,
    ) -> anyhow::Result<Value> {
        let mut rb = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.header("content-type", ctype).body(b);
        }
        let resp = rb
            .send()
            .await
            .with_context(|| format!("cannot reach {} (is `twinhost serve` running?)", self.url))?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let v: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        if !status.is_success() {
            let msg = v["error"]["message"].as_str().unwrap_or("no message");
            let hint = if status == StatusCode::UNAUTHORIZED {
                " (pass --token or --data-dir pointing at the server's data directory)"
            } else {
                ""
            };
            let details = if v["error"]["details"].is_null() {
                String::new()
            } else {
                format!("\n{:#}", v["error"]["details"])
            };
            bail!("{status}: {msg}{hint}{details}");
        }
        Ok(v)
    }

    pub async fn json(&self, method: Method, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call(
            method,
            path,
            Some(serde_json::to_vec(body)?),
            "application/json",
        )
        .await
    }
}

/// `{…}` inline, or `@path` to read a file.
fn json_arg(s: &str) -> anyhow::Result<Value> {
    let text = match s.strip_prefix('@') {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {p}"))?,
        None => s.to_owned(),
    };
    serde_json::from_str(&text).with_context(|| format!("not valid JSON: {s}"))
}

fn print(v: &Value) {
    if !v.is_null() {
        println!("{v:#}");
    }
}

pub async fn twin(conn: Conn, cmd: TwinCmd) -> anyhow::Result<()> {
    let c = Client::new(&conn);
    let v = match cmd {
        TwinCmd::Create {
            entity_type,
            properties,
            parent,
            id,
        } => {
            let body = json!({"entity_type": entity_type, "properties": json_arg(&properties)?, "parent_id": parent, "id": id});
            c.json(Method::POST, "/v1/twins", &body).await?
        }
        TwinCmd::Get { id, meta } => {
            let q = if meta { "?meta=true" } else { "" };
            c.call(Method::GET, &format!("/v1/twins/{id}{q}"), None, "")
                .await?
        }
        TwinCmd::Patch {
            id,
            patch,
            if_match,
        } => {
            let mut rb = c
                .http
                .patch(format!("{}/v1/twins/{id}", c.url))
                .json(&json_arg(&patch)?);
            if let Some(t) = &c.token {
                rb = rb.bearer_auth(t);
            }
            if let Some(v) = if_match {
                rb = rb.header("if-match", format!("\"{v}\""));
            }
            let resp = rb
                .send()
                .await
                .with_context(|| format!("cannot reach {}", c.url))?;
            let status = resp.status();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                bail!(
                    "{status}: {}",
                    v["error"]["message"].as_str().unwrap_or("no message")
                );
            }
            v
        }
        TwinCmd::Delete { id, cascade } => {
            c.call(
                Method::DELETE,
                &format!("/v1/twins/{id}?cascade={cascade}"),
                None,
                "",
            )
            .await?;
            eprintln!("deleted {id}");
            Value::Null
        }
        TwinCmd::Import {
            file,
            batch,
            upsert,
        } => {
            super::import::import(&c, &file, batch, upsert).await?;
            Value::Null
        }
    };
    print(&v);
    Ok(())
}

pub async fn query(conn: Conn, q: String) -> anyhow::Result<()> {
    let c = Client::new(&conn);
    print(&c.json(Method::POST, "/v1/query", &json_arg(&q)?).await?);
    Ok(())
}

pub async fn model(conn: Conn, cmd: ModelCmd) -> anyhow::Result<()> {
    let c = Client::new(&conn);
    let v = match cmd {
        ModelCmd::Put { entity_type, file } => {
            let body = json_arg(&format!("@{}", file.display()))?;
            c.json(Method::PUT, &format!("/v1/models/{entity_type}"), &body)
                .await?
        }
        ModelCmd::Get {
            entity_type: Some(t),
        } => {
            c.call(Method::GET, &format!("/v1/models/{t}"), None, "")
                .await?
        }
        ModelCmd::Get { entity_type: None } => c.call(Method::GET, "/v1/models", None, "").await?,
    };
    print(&v);
    Ok(())
}

pub async fn module(conn: Conn, cmd: ModuleCmd) -> anyhow::Result<()> {
    let c = Client::new(&conn);
    let v = match cmd {
        ModuleCmd::Put {
            name,
            file,
            fuel,
            memory,
            timeout,
            force,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut q = Vec::new();
            if let Some(f) = fuel {
                q.push(format!("fuel={f}"));
            }
            if let Some(m) = memory {
                q.push(format!("memory_mb={m}"));
            }
            if let Some(t) = timeout {
                q.push(format!("timeout={t}"));
            }
            if force {
                q.push("force=true".into());
            }
            let query = if q.is_empty() {
                String::new()
            } else {
                format!("?{}", q.join("&"))
            };
            c.call(
                Method::PUT,
                &format!("/v1/modules/{name}{query}"),
                Some(bytes),
                "application/wasm",
            )
            .await?
        }
        ModuleCmd::List => c.call(Method::GET, "/v1/modules", None, "").await?,
        ModuleCmd::Rollback {
            name,
            version,
            force,
        } => {
            let q = if force { "?force=true" } else { "" };
            c.json(
                Method::POST,
                &format!("/v1/modules/{name}/rollback{q}"),
                &json!({"version": version}),
            )
            .await?
        }
        ModuleCmd::Delete { name, force } => {
            let q = if force { "?force=true" } else { "" };
            c.call(Method::DELETE, &format!("/v1/modules/{name}{q}"), None, "")
                .await?;
            eprintln!("deleted module {name}");
            Value::Null
        }
    };
    print(&v);
    Ok(())
}

pub async fn behavior(conn: Conn, cmd: BehaviorCmd) -> anyhow::Result<()> {
    let c = Client::new(&conn);
    let v = match cmd {
        BehaviorCmd::Put {
            name,
            module,
            entity_type,
            twin_id,
        } => {
            let mut body = json!({ "module": module });
            if let Some(et) = entity_type {
                body["entity_type"] = json!(et);
            }
            if let Some(t) = twin_id {
                body["twin_id"] = json!(t);
            }
            c.json(Method::PUT, &format!("/v1/behaviors/{name}"), &body)
                .await?
        }
        BehaviorCmd::List => c.call(Method::GET, "/v1/behaviors", None, "").await?,
        BehaviorCmd::Delete { name } => {
            c.call(Method::DELETE, &format!("/v1/behaviors/{name}"), None, "")
                .await?;
            eprintln!("deleted behavior {name}");
            Value::Null
        }
    };
    print(&v);
    Ok(())
}

pub async fn peer(conn: Conn, cmd: PeerCmd) -> anyhow::Result<()> {
    let c = Client::new(&conn);
    let v = match cmd {
        PeerCmd::Add {
            node_id,
            address,
            peer_token,
        } => {
            let mut body = json!({ "url": address });
            if let Some(t) = peer_token {
                body["token"] = json!(t);
            }
            c.json(Method::PUT, &format!("/v1/peers/{node_id}"), &body)
                .await?
        }
        PeerCmd::List => c.call(Method::GET, "/v1/peers", None, "").await?,
        PeerCmd::Remove { node_id } => {
            c.call(Method::DELETE, &format!("/v1/peers/{node_id}"), None, "")
                .await?;
            eprintln!("removed peer {node_id}");
            Value::Null
        }
    };
    print(&v);
    Ok(())
}

pub async fn workflow(conn: Conn, cmd: WorkflowCmd) -> anyhow::Result<()> {
    let c = Client::new(&conn);
    let v = match cmd {
        WorkflowCmd::Run { file, wait } => {
            let body = json_arg(&format!("@{}", file.display()))?;
            let path = if wait {
                "/v1/workflows?wait=true"
            } else {
                "/v1/workflows"
            };
            c.json(Method::POST, path, &body).await?
        }
        WorkflowCmd::Get { id } => {
            c.call(Method::GET, &format!("/v1/workflows/{id}"), None, "")
                .await?
        }
        WorkflowCmd::List { status, limit } => {
            let mut path = format!("/v1/workflows?limit={limit}");
            if let Some(s) = status {
                path.push_str(&format!("&status={s}"));
            }
            c.call(Method::GET, &path, None, "").await?
        }
        WorkflowCmd::Cancel { id } => {
            c.json(
                Method::POST,
                &format!("/v1/workflows/{id}/cancel"),
                &json!({}),
            )
            .await?
        }
    };
    print(&v);
    Ok(())
}

pub async fn rule(conn: Conn, cmd: RuleCmd) -> anyhow::Result<()> {
    let c = Client::new(&conn);
    let v = match cmd {
        RuleCmd::Put { name, file } => {
            let body = json_arg(&format!("@{}", file.display()))?;
            c.json(Method::PUT, &format!("/v1/rules/{name}"), &body)
                .await?
        }
        RuleCmd::List => c.call(Method::GET, "/v1/rules", None, "").await?,
        RuleCmd::Get { name } => {
            c.call(Method::GET, &format!("/v1/rules/{name}"), None, "")
                .await?
        }
        RuleCmd::Delete { name } => {
            c.call(Method::DELETE, &format!("/v1/rules/{name}"), None, "")
                .await?;
            eprintln!("deleted rule {name}");
            Value::Null
        }
    };
    print(&v);
    Ok(())
}

/// `events tail`: follow `GET /v1/events` and print each event's JSON on its own line.
pub async fn events(conn: Conn, cmd: EventsCmd) -> anyhow::Result<()> {
    use futures::StreamExt;
    let EventsCmd::Tail {
        types,
        twins,
        entity_type,
        parent_id,
        ancestor_id,
        since,
        count,
    } = cmd;
    let c = Client::new(&conn);
    let mut q: Vec<(&str, String)> = Vec::new();
    if !types.is_empty() {
        q.push(("types", types.join(",")));
    }
    if !twins.is_empty() {
        q.push(("twin_id", twins.join(",")));
    }
    for (k, v) in [
        ("entity_type", entity_type),
        ("parent_id", parent_id),
        ("ancestor_id", ancestor_id),
    ] {
        if let Some(v) = v {
            q.push((k, v));
        }
    }
    if let Some(s) = since {
        q.push(("since", s.to_string()));
    }
    let mut rb = c.http.get(format!("{}/v1/events", c.url)).query(&q);
    if let Some(t) = &c.token {
        rb = rb.bearer_auth(t);
    }
    let resp = rb
        .send()
        .await
        .with_context(|| format!("cannot reach {} (is `twinhost serve` running?)", c.url))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        bail!(
            "{status}: {}",
            v["error"]["message"].as_str().unwrap_or("no message")
        );
    }
    let mut stream = resp.bytes_stream();
    let mut lines = SseData::default();
    let mut seen = 0u64;
    while let Some(chunk) = stream.next().await {
        for data in lines.push(&chunk?) {
            println!("{}", String::from_utf8_lossy(&data));
            seen += 1;
            if count.is_some_and(|n| seen >= n) {
                return Ok(());
            }
        }
    }
    bail!("the server closed the event stream")
}

/// Splits a Server-Sent Events body, as it arrives in chunks, into the payloads of its
/// `data:` lines.
#[derive(Default)]
pub struct SseData {
    buf: Vec<u8>,
}

impl SseData {
    /// Add a chunk; return the `data:` payloads it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = line.trim_ascii_end();
            if let Some(data) = line.strip_prefix(b"data:") {
                out.push(data.trim_ascii_start().to_vec());
            }
        }
        out
    }
}

pub async fn invoke(
    conn: Conn,
    module: String,
    twins: Vec<String>,
    query: Option<String>,
    parameters: String,
) -> anyhow::Result<()> {
    let c = Client::new(&conn);
    let mut body = json!({"parameters": json_arg(&parameters)?});
    match query {
        Some(q) => body["query"] = json_arg(&q)?,
        None if twins.is_empty() => bail!("give --twin ID… or --query JSON"),
        None => body["twin_ids"] = json!(twins),
    }
    print(
        &c.json(Method::POST, &format!("/v1/modules/{module}/invoke"), &body)
            .await?,
    );
    Ok(())
}

pub async fn token_create(conn: Conn, role: Role) -> anyhow::Result<()> {
    let c = Client::new(&conn);
    let v = c
        .json(Method::POST, "/v1/tokens", &json!({"role": role}))
        .await?;
    println!("{}", v["token"].as_str().unwrap_or_default());
    eprintln!("created a {role} token; it is shown only once");
    Ok(())
}

/// Ingest a file (or stdin, `-`) in batches: NDJSON streams line by line; a JSON array is
/// split into items.
pub async fn ingest(conn: Conn, file: PathBuf, batch: usize) -> anyhow::Result<()> {
    let c = Client::new(&conn);
    let (batches, size) = super::batches::open(&file, batch)?;
    let bar = super::batches::progress_bar(size);
    let started = Instant::now();
    let (mut applied, mut offset) = (0u64, 0usize);
    let mut rejected: Vec<Value> = Vec::new();
    for b in batches {
        let super::batches::Chunk {
            body,
            items: n,
            bytes,
        } = b?;
        let v = c
            .call(
                Method::POST,
                "/v1/ingest",
                Some(body),
                "application/x-ndjson",
            )
            .await?;
        applied += v["applied"].as_u64().unwrap_or(0);
        super::batches::collect_rejected(&v, offset, &mut rejected);
        offset += n;
        bar.inc(bytes);
        bar.set_message(format!("{applied} applied, {} rejected", rejected.len()));
    }
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    super::batches::print_rejected(&rejected);
    println!(
        "{}",
        json!({"applied": applied, "rejected": rejected.len(), "seconds": (secs * 1000.0).round() / 1000.0,
               "updates_per_s": (applied as f64 / secs).round()})
    );
    if !rejected.is_empty() {
        // The rest is applied and durable; the exit status still tells a script.
        bail!(
            "{} of {} items were rejected",
            rejected.len(),
            rejected.len() as u64 + applied
        );
    }
    Ok(())
}
