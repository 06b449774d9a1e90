//! Bench phase `bulk`: provisioning twins over loopback HTTP through `POST /v1/twins/bulk`
//! (NDJSON bodies of `--bulk-batch` twins), against the baseline measured in the same run:
//! the same twins created one `POST /v1/twins` at a time by 8 keep-alive clients. Also the
//! same batches through the registry in process (no HTTP), to tell the API's share.
//!
//! The twins are the demo's machines (5 properties) under buildings of up to 1,000 machines;
//! each building is created in the same batch as its machines, before them (a parent made
//! earlier in the batch). Every measurement starts on a fresh node, and every twin counts once
//! it is durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{bench_node, cpu_percent, proc_sample, BenchArgs, Fleet};
use crate::api::{self, Limits};
use crate::registry::NewTwin;
use crate::types::TwinId;

/// Machines per building.
const MACHINES_PER_BUILDING: usize = 1_000;
/// Keep-alive clients of the one-at-a-time baseline.
const BASELINE_CLIENTS: usize = 8;
/// Longest the baseline runs: at a few thousand creates/s it needs no more to be stable.
const BASELINE_SECS: f64 = 5.0;

/// A fresh node with no twins, its API served in this process until this is dropped (so a
/// run's twins leave memory before the next run).
struct Served {
    url: String,
    server: tokio::task::JoinHandle<()>,
    fleet: Fleet,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn fresh_node() -> anyhow::Result<Fleet> {
    let dir = tempfile::tempdir()?;
    let node = bench_node(dir.path()).await?;
    Ok(Fleet {
        _dir: dir,
        node,
        ids: Vec::new(),
    })
}

async fn fresh() -> anyhow::Result<Served> {
    let fleet = fresh_node().await?;
    let app = api::router(fleet.node.state.clone(), Limits::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        let _ = axum::serve(api::nodelay(listener), app).await;
    });
    Ok(Served { url, server, fleet })
}

/// The demo's machine `i` (5 properties) under `building`.
fn machine(i: usize, building: TwinId) -> Value {
    json!({"entity_type": "machine", "parent_id": building,
           "properties": {"name": format!("Machine-{i:07}"), "type": "CNC", "status": "operational",
                          "temperature": 68.5 + (i % 20) as f64, "vibration_level": 0.2}})
}

/// `twins` items as NDJSON bodies of `batch` items: buildings among them, each before its
/// machines and in the same body (a body opens with a building), so bodies sent at once by
/// several clients do not depend on each other.
pub(super) fn bodies(twins: usize, batch: usize) -> Vec<bytes::Bytes> {
    let mut out = Vec::new();
    let mut body = String::new();
    let (mut building, mut in_body, mut in_building, mut machines) = (TwinId::new_v7(), 0, 0, 0);
    for k in 0..twins {
        let item = if in_body == 0 || in_building == MACHINES_PER_BUILDING {
            building = TwinId::new_v7();
            in_building = 0;
            json!({"id": building, "entity_type": "building",
                   "properties": {"name": format!("Building-{k}"), "area_sqft": 100000}})
        } else {
            machines += 1;
            in_building += 1;
            machine(machines, building)
        };
        body.push_str(&item.to_string());
        body.push('\n');
        in_body += 1;
        if in_body == batch {
            out.push(bytes::Bytes::from(std::mem::take(&mut body)));
            in_body = 0;
        }
    }
    if !body.is_empty() {
        out.push(bytes::Bytes::from(body));
    }
    out
}

/// Send `bodies` from `clients` concurrent clients (client `c` sends bodies `c`, `c +
/// clients`, …, one after another); returns twins created/s and CPU percent.
async fn bulk_http(url: &str, bodies: &[bytes::Bytes], clients: usize) -> anyhow::Result<Value> {
    let client = reqwest::Client::new();
    let created = Arc::new(AtomicU64::new(0));
    let p0 = proc_sample();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let mine: Vec<bytes::Bytes> = bodies.iter().skip(c).step_by(clients).cloned().collect();
        let (client, url, created) = (client.clone(), url.to_owned(), created.clone());
        tasks.spawn(async move {
            for body in mine {
                let v = post_bulk(&client, &url, "", body).await?;
                created.fetch_add(v["created"].as_u64().unwrap_or(0), Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let p1 = proc_sample();
    let secs = p1.at.duration_since(p0.at).as_secs_f64();
    let n = created.load(Ordering::Relaxed) as f64;
    Ok(
        json!({"clients": clients, "twins": n, "seconds": (secs * 1000.0).round() / 1000.0,
              "creates_per_s": (n / secs).round(), "cpu_percent": cpu_percent(p0, p1).round()}),
    )
}

/// The baseline: machines created one `POST /v1/twins` at a time by [`BASELINE_CLIENTS`]
/// keep-alive clients for `secs`.
async fn one_by_one(url: &str, building: TwinId, secs: f64) -> anyhow::Result<Value> {
    let client = reqwest::Client::new();
    let created = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let p0 = proc_sample();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..BASELINE_CLIENTS {
        let (client, url, created) = (client.clone(), url.to_owned(), created.clone());
        tasks.spawn(async move {
            let mut i = c;
            while Instant::now() < deadline {
                let r = client
                    .post(format!("{url}/v1/twins"))
                    .body(machine(i, building).to_string())
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "create answered {}", r.status());
                r.bytes().await?;
                created.fetch_add(1, Ordering::Relaxed);
                i += BASELINE_CLIENTS;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let p1 = proc_sample();
    let s = p1.at.duration_since(p0.at).as_secs_f64();
    let n = created.load(Ordering::Relaxed) as f64;
    Ok(
        json!({"clients": BASELINE_CLIENTS, "twins": n, "creates_per_s": (n / s).round(),
              "cpu_percent": cpu_percent(p0, p1).round()}),
    )
}

/// The same batches through [`crate::registry::Registry::provision`] in process, one after
/// another: what the write path costs without HTTP and JSON.
async fn in_process(bodies: &[bytes::Bytes]) -> anyhow::Result<Value> {
    let batches: Vec<Vec<NewTwin>> = bodies
        .iter()
        .map(|b| {
            b.split(|c| *c == b'\n')
                .filter(|l| !l.is_empty())
                .map(serde_json::from_slice)
                .collect::<Result<_, _>>()
        })
        .collect::<Result<_, _>>()?;
    let f = fresh_node().await?;
    let started = Instant::now();
    let mut n = 0;
    for batch in batches {
        let out = f.node.registry.provision(batch, false).await?;
        anyhow::ensure!(out.rejected.is_empty(), "refused: {:?}", out.rejected);
        n += out.created;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(json!({"twins": n, "creates_per_s": (n as f64 / secs).round()}))
}

pub(super) async fn bulk_phase(args: &BenchArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(
        args.bulk_twins > 0 && args.bulk_batch > 0,
        "--bulk-twins and --bulk-batch must be positive"
    );
    let bodies = bodies(args.bulk_twins, args.bulk_batch);

    let baseline = {
        let s = fresh().await?;
        let building = s
            .fleet
            .node
            .registry
            .create(NewTwin {
                entity_type: "building".into(),
                ..Default::default()
            })
            .await?
            .id;
        one_by_one(&s.url, building, args.seconds.min(BASELINE_SECS)).await?
    };
    eprintln!("  one at a time: {baseline}");
    let base = baseline["creates_per_s"].as_f64().unwrap_or(f64::NAN);
    let mut runs = Vec::new();
    for clients in [1, 2] {
        let s = fresh().await?;
        let r = bulk_http(&s.url, &bodies, clients).await?;
        let n = s.fleet.node.registry.twin_count();
        anyhow::ensure!(
            n == args.bulk_twins,
            "{n} twins after the bulk run, not {}",
            args.bulk_twins
        );
        eprintln!("  bulk: {r}");
        runs.push(r);
    }
    let inproc = in_process(&bodies).await?;
    let best = runs
        .iter()
        .filter_map(|r| r["creates_per_s"].as_f64())
        .fold(0.0, f64::max);
    Ok(json!({
        "twins": args.bulk_twins,
        "batch": args.bulk_batch,
        "one_at_a_time": baseline,
        "bulk_http": runs,
        "bulk_in_process": inproc,
        "ratio_bulk_to_one_at_a_time": ((best / base) * 10.0).round() / 10.0,
    }))
}

/// Send one NDJSON body to `POST /v1/twins/bulk` (with `query`, e.g. `?upsert=true`); its
/// answer, once every item was accepted.
pub(super) async fn post_bulk(
    client: &reqwest::Client,
    url: &str,
    query: &str,
    body: impl Into<reqwest::Body>,
) -> anyhow::Result<Value> {
    let r = client
        .post(format!("{url}/v1/twins/bulk{query}"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "bulk answered {}", r.status());
    let v: Value = r.json().await?;
    anyhow::ensure!(
        v["rejected"].as_array().is_some_and(Vec::is_empty),
        "bulk refused items: {}",
        v["rejected"]
    );
    Ok(v)
}
