//! Bench phase `scale` (only when asked for: `--only scale --twins N`): a fleet of `--twins`
//! machines (the demo's shape, 5 properties) under buildings of 1,000, created through
//! `POST /v1/twins/bulk` on a `twinhost serve` started as a child process on a temporary data
//! directory, so its memory is measured alone. Reports creates/s, the server's resident
//! memory per twin live and after a restart, disk bytes per twin, the restart time (process
//! start until a twin is served), update throughput and PATCH latency at that size, PATCH
//! latency while a big checkpoint runs, and the range query `temperature > 85` (page of 100)
//! scanning, then from the index once the model marks the temperature indexed (with the
//! index's build time). `TWINHOST_SCALE_SERVER` names another
//! `twinhost` binary to serve (an earlier build: the baseline of the same run).
//! `TWINHOST_SCALE_KEEP=1` keeps the data directory (its path is printed), to time or profile
//! more restarts of it with `twinhost serve --data-dir`.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{patch_latency, query_http_rate, BenchArgs};
use crate::registry::query::{Condition, Op};
use crate::registry::Query;
use crate::types::TwinId;

/// Twins per bulk request.
const BATCH: usize = 10_000;
/// Concurrent bulk clients (one per core).
const CLIENTS: usize = 2;
/// Concurrent clients of the unpaced update phase.
const UPDATE_CLIENTS: usize = 8;
/// Most twins rewritten by the upsert that makes the "checkpoint running" window's
/// checkpoint big.
const CHECKPOINT_TWINS: usize = 200_000;
/// How long to wait for the server to answer after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// A `twinhost serve` child on a data directory of its own.
struct Server {
    child: Child,
    url: String,
    port: u16,
    dir: std::path::PathBuf,
}

impl Server {
    fn spawn(dir: &std::path::Path, port: u16) -> anyhow::Result<Child> {
        let exe = match std::env::var_os("TWINHOST_SCALE_SERVER") {
            Some(p) => std::path::PathBuf::from(p),
            None => std::env::current_exe()?,
        };
        Ok(Command::new(exe)
            .args(["serve", "--insecure-no-auth", "--node-id", "bench-scale"])
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    }

    /// Start the server; returns it and the seconds until `probe` (a path) answered 200.
    async fn start(dir: &std::path::Path, port: u16, probe: &str) -> anyhow::Result<(Server, f64)> {
        let t0 = Instant::now();
        let child = Self::spawn(dir, port)?;
        let s = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
            dir: dir.to_owned(),
        };
        let client = reqwest::Client::new();
        loop {
            anyhow::ensure!(t0.elapsed() < START_TIMEOUT, "the server did not start");
            if let Ok(r) = client.get(format!("{}{probe}", s.url)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok((s, t0.elapsed().as_secs_f64()))
    }

    /// Resident memory of the server, in bytes.
    fn rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(0)
            * 1024
    }

    /// Clean stop (SIGTERM, then wait).
    fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill takes no pointers; the pid is our own child's.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => n += dir_bytes(&e.path()),
                Ok(m) => n += m.len(),
                Err(_) => {}
            }
        }
    }
    n
}

/// Create `twins` twins (buildings among them) through the bulk endpoint from [`CLIENTS`]
/// clients, printing progress; returns the machines' ids and creates/s.
async fn provision(url: &str, twins: usize) -> anyhow::Result<(Vec<TwinId>, f64)> {
    let bodies = super::bulk::bodies(twins, BATCH);
    let client = reqwest::Client::new();
    let created = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let mine: Vec<bytes::Bytes> = bodies.iter().skip(c).step_by(CLIENTS).cloned().collect();
        let (client, url, created) = (client.clone(), url.to_owned(), created.clone());
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for body in mine {
                let v = super::bulk::post_bulk(&client, &url, "", body.clone()).await?;
                let n = v["created"].as_u64().unwrap_or(0);
                // The machines' ids (the ids come in the order of the body's lines; a
                // building per 1,000 machines is left out: the later phases write machines).
                let lines = std::str::from_utf8(&body)?.lines();
                ids.extend(
                    v["ids"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .zip(lines)
                        .filter(|(_, line)| !line.contains(r#""entity_type":"building""#))
                        .filter_map(|(i, _)| i.as_str()?.parse::<TwinId>().ok()),
                );
                let before = created.fetch_add(n, Ordering::Relaxed);
                if (before + n) / 100_000 > before / 100_000 {
                    eprintln!(
                        "  created {} twins ({:.0}/s)",
                        before + n,
                        (before + n) as f64 / t0.elapsed().as_secs_f64()
                    );
                }
            }
            anyhow::Ok(ids)
        });
    }
    let mut ids = Vec::new();
    while let Some(r) = tasks.join_next().await {
        ids.extend(r??);
    }
    let n = created.load(Ordering::Relaxed) as f64;
    Ok((ids, n / t0.elapsed().as_secs_f64()))
}

/// Unpaced PATCHes of one property from [`UPDATE_CLIENTS`] clients for `secs`: updates/s.
async fn update_rate(url: &str, ids: &[TwinId], secs: f64) -> anyhow::Result<f64> {
    let client = reqwest::Client::new();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let ids = Arc::new(ids.to_vec());
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..UPDATE_CLIENTS {
        let (client, url, done, ids) = (client.clone(), url.to_owned(), done.clone(), ids.clone());
        tasks.spawn(async move {
            let mut i = c * 7919;
            while Instant::now() < deadline {
                let id = ids[i % ids.len()];
                let r = client
                    .patch(format!("{url}/v1/twins/{id}"))
                    .body(format!("{{\"temperature\": {}}}", 60 + i % 40))
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "PATCH answered {}", r.status());
                r.bytes().await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 104_729;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

/// Rewrite the temperature of up to [`CHECKPOINT_TWINS`] machines with bulk upserts, so the
/// next checkpoint writes them all. Returns how many.
async fn dirty_many(url: &str, ids: &[TwinId]) -> anyhow::Result<usize> {
    let client = reqwest::Client::new();
    let n = ids.len().min(CHECKPOINT_TWINS);
    for chunk in ids[..n].chunks(BATCH) {
        let mut body = String::new();
        for id in chunk {
            body.push_str(
                &json!({"id": id, "entity_type": "machine", "properties": {"temperature": 90.5}})
                    .to_string(),
            );
            body.push('\n');
        }
        super::bulk::post_bulk(&client, url, "?upsert=true", body).await?;
    }
    Ok(n)
}

pub(super) async fn scale_phase(args: &BenchArgs) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let (server, _) = Server::start(dir.path(), port, "/healthz").await?;
    let empty_rss = server.rss();
    let t0 = Instant::now();
    let (ids, creates_per_s) = provision(&server.url, args.twins).await?;
    anyhow::ensure!(!ids.is_empty(), "no machines created");
    eprintln!(
        "  {} twins in {:.1} s ({creates_per_s:.0}/s)",
        args.twins,
        t0.elapsed().as_secs_f64()
    );
    // Let the checkpoints of the load finish before memory is read.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_live = server.rss();
    eprintln!("  server RSS {} MB", rss_live >> 20);

    let secs = args.seconds;
    eprintln!("  scan query, updates and PATCH latency");
    let scan = Query {
        entity_type: Some("machine".into()),
        conditions: vec![Condition {
            property: "temperature".into(),
            op: Op::Gt,
            value: json!(85),
        }],
        limit: Some(100),
        ..Default::default()
    };
    let scan_per_s = query_http_rate(&server.url, &scan, secs).await?;
    // The same query once the model marks the temperature indexed (the PUT returns when the
    // index is built).
    eprintln!("  indexing the temperature");
    let rss_before_index = server.rss();
    let t_index = Instant::now();
    let r = reqwest::Client::new()
        .put(format!("{}/v1/models/machine", server.url))
        .json(&json!({"properties": {"temperature": {"type": "number", "indexed": true}}}))
        .send()
        .await?;
    // A baseline build (TWINHOST_SCALE_SERVER) may not know `indexed`: reported as null.
    let (indexed_per_s, index_build_s) = if r.status().is_success() {
        let built = t_index.elapsed().as_secs_f64();
        eprintln!(
            "  index built in {built:.2} s; server RSS {} -> {} MB",
            rss_before_index >> 20,
            server.rss() >> 20
        );
        let rate = query_http_rate(&server.url, &scan, secs).await?;
        (json!(rate.round()), json!((built * 100.0).round() / 100.0))
    } else {
        let why = format!("the model put answered {}: {}", r.status(), r.text().await?);
        (Value::Null, json!(why))
    };
    let updates_per_s = update_rate(&server.url, &ids, secs).await?;
    // Let the updates' checkpoint pass: the quiet window has only small ones.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet = patch_latency(&server.url, &ids, args.patch_rate, secs).await?;
    eprintln!("  making the next checkpoint big");
    let dirty = dirty_many(&server.url, &ids).await?;
    let during = patch_latency(&server.url, &ids, args.patch_rate, secs.max(3.0)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after_updates = server.rss();

    eprintln!("  restart");
    let port = server.port;
    let dir_path = server.dir.clone();
    server.stop()?;
    let disk = dir_bytes(dir.path());
    let probe = format!("/v1/twins/{}", ids[ids.len() / 2]);
    let (server, restart_s) = Server::start(&dir_path, port, &probe).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_restarted = server.rss();
    server.stop()?;
    if std::env::var_os("TWINHOST_SCALE_KEEP").is_some_and(|v| v == "1") {
        eprintln!("  kept the data directory: {}", dir.keep().display());
    }

    let n = args.twins as f64;
    let per_twin = |b: u64| (b as f64 / n).round();
    Ok(json!({
        "twins": args.twins,
        "creates_per_s": creates_per_s.round(),
        "rss_empty_mb": empty_rss >> 20,
        "rss_live_mb": rss_live >> 20,
        "rss_live_bytes_per_twin": per_twin(rss_live),
        "rss_after_updates_mb": rss_after_updates >> 20,
        "rss_after_restart_mb": rss_restarted >> 20,
        "rss_after_restart_bytes_per_twin": per_twin(rss_restarted),
        "disk_bytes": disk,
        "disk_bytes_per_twin": per_twin(disk),
        "restart_s": (restart_s * 100.0).round() / 100.0,
        "updates_per_s": updates_per_s.round(),
        "patch": quiet,
        "patch_during_checkpoint": during,
        "checkpoint_twins": dirty,
        "scan_range_queries_per_s": scan_per_s.round(),
        "indexed_range_queries_per_s": indexed_per_s,
        "index_build_s": index_build_s,
    }))
}
