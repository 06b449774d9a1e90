//! `twinhost bench`: measure this build on this machine, with the seed's Python orchestrator
//! as the baseline in the same run.
//!
//! Phases (each on a fresh temporary data directory, every update durable before it counts):
//! 1. in-process updates through the registry's write path, as fast as they go;
//! 2. the operator's fleet: `--twins` × `--hz` updates/s of `--props` properties, paced,
//!    reporting achieved rate, commit latency p50/p99, CPU and RSS;
//! 3. HTTP NDJSON ingest over loopback;
//! 4. single PATCH latency p50/p99 at a fixed request rate;
//! 5. queries over `--query-twins` twins;
//! 6. the seed workload (10K twins, 100K updates, full-result queries) on both twinhost and
//!    `seed_bench.py`, printed as ratios;
//! 7. WebAssembly compute calls (`wasm`), behaviors (`behavior`), event delivery and
//!    subscribers (`events`) and rule evaluation (`rules`): see [`events`];
//! 8. sync between two nodes (`sync`): catch-up, latency, replicated updates/s and bytes on
//!    the wire: see [`sync`];
//! 9. bulk provisioning (`bulk`) against creates one at a time: see [`bulk`];
//! 10. periodic simulation and compute calls through the pool (`tick`): see [`tick`];
//! 11. a fleet of `--twins` on a server process of its own (`scale`, only when named in
//!     `--only`): memory and disk per twin, restart time, updates at that size: see [`scale`].

mod bulk;
mod events;
mod scale;
mod sync;
mod tick;
mod workflow;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::api::{self, Limits};
use crate::registry::{NewTwin, Query, Registry, Update};
use crate::types::{Properties, TwinId};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Twins in your fleet (for the paced fleet phase and the throughput phases).
    #[arg(long, default_value_t = 10_000)]
    pub twins: usize,
    /// Updates per second per twin in your fleet.
    #[arg(long, default_value_t = 10.0)]
    pub hz: f64,
    /// Properties per update.
    #[arg(long, default_value_t = 2)]
    pub props: usize,
    /// Seconds per timed phase.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Twins in the registry for the query phase.
    #[arg(long, default_value_t = 100_000)]
    pub query_twins: usize,
    /// Request rate of the PATCH latency phase.
    #[arg(long, default_value_t = 1000)]
    pub patch_rate: u64,
    /// Path of the seed's `seed_bench.py` (searched in ./shared/reference and ../shared/reference).
    #[arg(long)]
    pub seed_bench: Option<PathBuf>,
    /// Skip the seed baseline.
    #[arg(long)]
    pub no_seed: bool,
    /// Directory of the built guest components (for the wasm phase).
    #[arg(long, default_value = "guests/target/wasm32-wasip2/release")]
    pub guests: PathBuf,
    /// Twins node A holds before node B links with it (the sync phase's catch-up). Both nodes
    /// run in this process: each holds them all.
    #[arg(long, default_value_t = 100_000)]
    pub sync_twins: usize,
    /// Machines ticking at 1 Hz in the tick phase.
    #[arg(long, default_value_t = 10_000)]
    pub tick_twins: usize,
    /// Twins provisioned by each run of the bulk phase.
    #[arg(long, default_value_t = 100_000)]
    pub bulk_twins: usize,
    /// Twins per request of the bulk phase.
    #[arg(long, default_value_t = super::import::DEFAULT_IMPORT_BATCH)]
    pub bulk_batch: usize,
    /// Only run these phases (comma separated: inproc,fleet,http,patch,query,seed,wasm,behavior,events,rules,workflow,tick,sync,bulk,scale).
    /// `scale` runs only when named here.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// CPU seconds and resident memory of this process, from /proc.
#[derive(Clone, Copy)]
struct ProcSample {
    cpu_s: f64,
    at: Instant,
}

fn proc_sample() -> ProcSample {
    let cpu_s = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the command name.
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0);
    ProcSample {
        cpu_s,
        at: Instant::now(),
    }
}

fn rss_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn cpu_percent(a: ProcSample, b: ProcSample) -> f64 {
    100.0 * (b.cpu_s - a.cpu_s) / b.at.duration_since(a.at).as_secs_f64().max(1e-9)
}

/// Wait for the workers; return what they counted, the seconds since `p0`, and CPU percent.
async fn finish(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    done: &AtomicU64,
    p0: ProcSample,
) -> anyhow::Result<(f64, f64, f64)> {
    for t in tasks {
        t.await??;
    }
    let p1 = proc_sample();
    let secs = p1.at.duration_since(p0.at).as_secs_f64();
    Ok((
        done.load(Ordering::Relaxed) as f64,
        secs,
        cpu_percent(p0, p1),
    ))
}

pub(super) struct Fleet {
    _dir: tempfile::TempDir,
    node: super::serve::Node,
    ids: Vec<TwinId>,
}

impl Drop for Fleet {
    /// Stop the store's threads so the next phase starts with this one's memory released.
    fn drop(&mut self) {
        self.node.registry.shutdown();
        self.node.events.shutdown();
    }
}

/// A node on `dir` as the bench runs it: no auth, default retention and checkpoints.
async fn bench_node(dir: &std::path::Path) -> anyhow::Result<super::serve::Node> {
    super::serve::open_default_node(dir, "bench", true).await
}

async fn fleet(twins: usize) -> anyhow::Result<Fleet> {
    let dir = tempfile::tempdir()?;
    let node = bench_node(dir.path()).await?;
    let building = node
        .registry
        .create(NewTwin {
            entity_type: "building".into(),
            properties: props_of(
                json!({"name": "Factory A", "location": "Detroit", "area_sqft": 100000}),
            ),
            ..Default::default()
        })
        .await?;
    let mut ids = Vec::with_capacity(twins);
    for chunk_start in (0..twins).step_by(10_000) {
        let items = (chunk_start..twins.min(chunk_start + 10_000))
            .map(|i| NewTwin {
                entity_type: "machine".into(),
                parent_id: Some(building.id),
                properties: props_of(json!({"name": format!("Machine-{i:06}"), "type": "CNC",
                    "status": "operational", "temperature": 68.5, "vibration_level": 0.2})),
                ..Default::default()
            })
            .collect();
        for t in node.registry.create_many(items).await? {
            ids.push(t?.id);
        }
    }
    Ok(Fleet {
        _dir: dir,
        node,
        ids,
    })
}

fn props_of(v: Value) -> Properties {
    match v {
        Value::Object(m) => m,
        _ => Properties::new(),
    }
}

/// The k-th update of the workload: temperature and vibration as in the seed, then extra
/// numeric properties up to `nprops`.
fn update(ids: &[TwinId], k: usize, nprops: usize) -> Update {
    let mut p = Properties::new();
    p.insert("temperature".into(), json!(70 + (k % 20)));
    if nprops > 1 {
        p.insert(
            "vibration_level".into(),
            json!(0.1 + (k % 10) as f64 * 0.05),
        );
    }
    for j in 2..nprops {
        p.insert(format!("p{j}"), json!((k % 100) as f64));
    }
    Update {
        twin_id: ids[k % ids.len()],
        patch: p,
        ts: None,
        if_match: None,
        cause: None,
    }
}

fn ndjson_line(ids: &[TwinId], k: usize, nprops: usize) -> String {
    let u = update(ids, k, nprops);
    format!(
        "{{\"twin_id\":\"{}\",\"properties\":{}}}\n",
        u.twin_id,
        Value::Object(u.patch)
    )
}

/// Phase 1: unpaced updates from several concurrent producers.
async fn inproc_max(
    reg: &Registry,
    ids: &[TwinId],
    nprops: usize,
    secs: f64,
) -> anyhow::Result<Value> {
    // Enough producers in flight that the writer always has the next batch ready while the
    // previous one is being fsynced.
    const WORKERS: usize = 8;
    const BATCH: usize = 2000;
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let p0 = proc_sample();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (reg, ids, done) = (reg.clone(), ids.to_vec(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = w * 1_000_003;
            while Instant::now() < deadline {
                let batch: Vec<Update> = (0..BATCH).map(|i| update(&ids, k + i, nprops)).collect();
                k += BATCH;
                let out = reg.apply_batch(batch).await?;
                done.fetch_add(out.applied as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let (n, s, cpu) = finish(tasks, &done, p0).await?;
    Ok(
        json!({"updates_per_s": (n / s).round(), "property_values_per_s": (n * nprops as f64 / s).round(),
              "cpu_percent": cpu.round(), "updates": n}),
    )
}

/// Phase 2: the operator's fleet at its own rate, paced in 10 ms ticks.
async fn fleet_paced(
    reg: &Registry,
    ids: &[TwinId],
    hz: f64,
    nprops: usize,
    secs: f64,
) -> anyhow::Result<Value> {
    const TICK: Duration = Duration::from_millis(10);
    // Most updates waiting on the node at once. A fleet offering more than the node takes
    // would otherwise pile its batches up in this process without end (1M twins at 10 Hz
    // grew it past 23 GB until the kernel killed it); past this a tick's updates are shed
    // and counted, as a gateway with a bounded buffer would drop them.
    const MAX_WAITING: usize = 500_000;
    let rate = ids.len() as f64 * hz;
    let per_tick = rate * TICK.as_secs_f64();
    let mut hist = Histogram::<u64>::new(3)?;
    let p0 = proc_sample();
    let start = Instant::now();
    let (mut sent, mut owed, mut k) = (0u64, 0.0f64, 0usize);
    let (mut waiting, mut shed) = (0usize, 0u64);
    let (mut rss_mb_max, mut ticks) = (0.0f64, 0u64);
    // RSS every 10 s, to show whether it stays flat over a long run (`--seconds`).
    let mut rss_every_10s = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    type Done = (
        Result<crate::registry::BatchOutcome, crate::registry::RegistryError>,
        Duration,
        usize,
    );
    let mut inflight = tokio::task::JoinSet::<Done>::new();
    while start.elapsed().as_secs_f64() < secs {
        let scheduled = tick.tick().await;
        owed += per_tick;
        let n = owed.floor() as usize;
        owed -= n as f64;
        if n == 0 {
            continue;
        }
        while let Some(done) = inflight.try_join_next() {
            let (r, lat, m) = done?;
            r?;
            waiting -= m;
            hist.record(lat.as_micros() as u64)?;
        }
        ticks += 1;
        if ticks % 100 == 0 {
            // Once a second: the peak, to show whether memory stays flat under the load.
            let rss = rss_mb("VmRSS:");
            rss_mb_max = rss_mb_max.max(rss);
            if ticks % 1000 == 0 {
                rss_every_10s.push(rss.round());
            }
        }
        if waiting + n > MAX_WAITING {
            shed += n as u64;
            continue;
        }
        let batch: Vec<Update> = (0..n).map(|i| update(ids, k + i, nprops)).collect();
        k += n;
        sent += n as u64;
        waiting += n;
        let reg = reg.clone();
        inflight.spawn(async move {
            let r = reg.apply_batch(batch).await;
            (r, scheduled.elapsed(), n)
        });
    }
    while let Some(done) = inflight.join_next().await {
        let (r, lat, _) = done?;
        r?;
        hist.record(lat.as_micros() as u64)?;
    }
    let p1 = proc_sample();
    let s = p1.at.duration_since(p0.at).as_secs_f64();
    let rss_end = rss_mb("VmRSS:");
    Ok(
        json!({"offered_updates_per_s": rate.round(), "achieved_updates_per_s": (sent as f64 / s).round(),
              "shed_updates": shed,
              "durable_latency_p50_ms": hist.value_at_quantile(0.5) as f64 / 1000.0,
              "durable_latency_p99_ms": hist.value_at_quantile(0.99) as f64 / 1000.0,
              "cpu_percent": cpu_percent(p0, p1).round(), "rss_mb": rss_end.round(),
              "rss_mb_max": rss_mb_max.max(rss_end).round(), "rss_mb_every_10s": rss_every_10s}),
    )
}

async fn serve_in_process(node: &super::serve::Node) -> anyhow::Result<String> {
    let app = api::router(
        node.state.clone(),
        Limits {
            max_body_bytes: 1 << 20,
            max_ingest_bytes: 256 << 20,
            ..Limits::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(api::nodelay(listener), app).await });
    Ok(format!("http://{addr}"))
}

/// Phase 3: NDJSON bodies of 10K updates from concurrent clients over loopback.
async fn http_ingest(url: &str, ids: &[TwinId], nprops: usize, secs: f64) -> anyhow::Result<Value> {
    const CLIENTS: usize = 3;
    const LINES: usize = 10_000;
    let bodies: Arc<Vec<bytes::Bytes>> = Arc::new(
        (0..16)
            .map(|b| {
                let mut s = String::with_capacity(LINES * 80);
                for i in 0..LINES {
                    s.push_str(&ndjson_line(ids, b * LINES + i, nprops));
                }
                bytes::Bytes::from(s)
            })
            .collect(),
    );
    let client = reqwest::Client::new();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let p0 = proc_sample();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, bodies, done, url) =
            (client.clone(), bodies.clone(), done.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while Instant::now() < deadline {
                let r = client
                    .post(format!("{url}/v1/ingest"))
                    .header("content-type", "application/x-ndjson")
                    .body(bodies[i % bodies.len()].clone())
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "ingest answered {}", r.status());
                let v: Value = r.json().await?;
                done.fetch_add(v["applied"].as_u64().unwrap_or(0), Ordering::Relaxed);
                i += CLIENTS;
            }
            anyhow::Ok(())
        }));
    }
    let (n, s, cpu) = finish(tasks, &done, p0).await?;
    Ok(json!({"updates_per_s": (n / s).round(), "cpu_percent": cpu.round()}))
}

/// Phase 4: open-loop PATCHes at a fixed rate; latency from send to response.
async fn patch_latency(url: &str, ids: &[TwinId], rate: u64, secs: f64) -> anyhow::Result<Value> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let total = (rate as f64 * secs) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let (client, url, id) = (client.clone(), url.to_owned(), ids[i as usize % ids.len()]);
        set.spawn(async move {
            let t0 = Instant::now();
            let r = client
                .patch(format!("{url}/v1/twins/{id}"))
                .body(format!("{{\"temperature\": {}}}", 70 + i % 20))
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "PATCH answered {}", r.status());
            r.bytes().await?;
            anyhow::Ok(t0.elapsed())
        });
    }
    let mut hist = Histogram::<u64>::new(3)?;
    while let Some(r) = set.join_next().await {
        hist.record(r??.as_micros() as u64)?;
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    Ok(
        json!({"rate": rate, "achieved_per_s": achieved.round(), "requests": total,
              "p50_ms": hist.value_at_quantile(0.5) as f64 / 1000.0,
              "p99_ms": hist.value_at_quantile(0.99) as f64 / 1000.0,
              "max_ms": hist.max() as f64 / 1000.0}),
    )
}

/// Queries/s of `q` in process, for `secs`.
fn query_rate(reg: &Registry, q: &Query, secs: f64) -> anyhow::Result<(f64, usize)> {
    let start = Instant::now();
    let (mut n, mut hits) = (0u64, 0usize);
    while start.elapsed().as_secs_f64() < secs {
        hits = reg.query(q)?.len();
        n += 1;
    }
    Ok((n as f64 / start.elapsed().as_secs_f64(), hits))
}

async fn query_http_rate(url: &str, q: &Query, secs: f64) -> anyhow::Result<f64> {
    let client = reqwest::Client::new();
    let body = serde_json::to_vec(q)?;
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let p0 = proc_sample();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, body, done, url) =
            (client.clone(), body.clone(), done.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let r = client
                    .post(format!("{url}/v1/query"))
                    .body(body.clone())
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "query answered {}", r.status());
                r.bytes().await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let (n, s, _) = finish(tasks, &done, p0).await?;
    Ok(n / s)
}

fn seed_query(limit: usize) -> Query {
    serde_json::from_value(
        json!({"entity_type": "machine", "properties": {"status": "operational"}, "limit": limit}),
    )
    .expect("a valid query")
}

fn find_seed_bench(given: &Option<PathBuf>) -> Option<PathBuf> {
    if let Some(p) = given {
        return Some(p.clone());
    }
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .flat_map(|d| {
            [
                d.join("shared/reference/seed_bench.py"),
                d.join("../shared/reference/seed_bench.py"),
            ]
        })
        .find(|p| p.exists())
}

/// Phase 6: the seed's own workload on twinhost (durable) and on the seed (in memory).
async fn seed_comparison(args: &BenchArgs) -> anyhow::Result<Value> {
    const TWINS: usize = 10_000;
    const UPDATES: usize = 100_000;
    let f = fleet(TWINS).await?;
    let reg = &f.node.registry;
    // The seed's 100K updates, round-robin over the machines, from concurrent producers.
    // 100K updates take a fraction of a second here, so the best of three runs is reported.
    let mut ours_updates = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for chunk in (0..UPDATES).collect::<Vec<_>>().chunks(2000) {
            let (reg, batch) = (
                reg.clone(),
                chunk.iter().map(|k| update(&f.ids, *k, 2)).collect(),
            );
            tasks.push(tokio::spawn(async move { reg.apply_batch(batch).await }));
        }
        for t in tasks {
            t.await??;
        }
        ours_updates = ours_updates.max(UPDATES as f64 / start.elapsed().as_secs_f64());
    }
    let (ours_queries, hits) = query_rate(reg, &seed_query(TWINS), 2.0)?;
    anyhow::ensure!(
        hits == TWINS,
        "the full-result query found {hits} of {TWINS} machines"
    );
    // The same on one core: a scan splits big windows over the cores (see registry::scan).
    let one_core = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let (one_core_queries, _) = one_core.install(|| query_rate(reg, &seed_query(TWINS), 2.0))?;
    // The same while 100 updates a millisecond at most go on: a query that finds the
    // machines changed reads the map, and a segment is made again between bursts when two
    // queries in a row find them unchanged (see registry::segment).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let updater = {
        let (reg, ids, stop) = (reg.clone(), f.ids.clone(), stop.clone());
        tokio::spawn(async move {
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                let batch = (k..k + 100).map(|k| update(&ids, k, 2)).collect();
                reg.apply_batch(batch).await?;
                k += 100;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            anyhow::Ok(k)
        })
    };
    let start = Instant::now();
    let (busy_queries, _) = query_rate(reg, &seed_query(TWINS), 2.0)?;
    stop.store(true, Ordering::Relaxed);
    let busy_updates = updater.await?? as f64 / start.elapsed().as_secs_f64();
    let mut out = json!({"twinhost": {
        "updates_per_s": ours_updates.round(),
        "full_result_queries_per_s": ours_queries.round(),
        "full_result_queries_per_s_one_core": one_core_queries.round(),
        "full_result_queries_per_s_while_updating": busy_queries.round(),
        "updates_per_s_meanwhile": busy_updates.round(),
    }});
    if args.no_seed {
        return Ok(out);
    }
    let Some(script) = find_seed_bench(&args.seed_bench) else {
        out["seed"] = json!("seed_bench.py not found (give --seed-bench PATH)");
        return Ok(out);
    };
    eprintln!("  running the seed baseline {} …", script.display());
    let o = std::process::Command::new("python3")
        .arg(&script)
        .args([
            "--twins",
            "10000",
            "--updates",
            "100000",
            "--subs",
            "1000",
            "--queries",
            "10",
        ])
        .output();
    match o {
        Ok(o) if o.status.success() => {
            let seed: Value =
                serde_json::from_slice(&o.stdout).context("seed_bench.py printed no JSON")?;
            let su = seed["updates_per_s"].as_f64().unwrap_or(f64::NAN);
            let sq = seed["queries_per_s"].as_f64().unwrap_or(f64::NAN);
            out["seed"] = seed;
            out["ratio_updates"] = json!(((ours_updates / su) * 10.0).round() / 10.0);
            out["ratio_full_result_queries"] = json!(((ours_queries / sq) * 10.0).round() / 10.0);
            out["ratio_full_result_queries_one_core"] =
                json!(((one_core_queries / sq) * 10.0).round() / 10.0);
            out["ratio_full_result_queries_while_updating"] =
                json!(((busy_queries / sq) * 10.0).round() / 10.0);
        }
        Ok(o) => {
            out["seed"] = json!(format!(
                "seed_bench.py failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ))
        }
        Err(e) => out["seed"] = json!(format!("python3 not runnable: {e}")),
    }
    Ok(out)
}

/// A built guest component from `--guests`.
fn read_guest(args: &BenchArgs, file: &str) -> anyhow::Result<Vec<u8>> {
    let path = args.guests.join(file);
    std::fs::read(&path).with_context(|| {
        format!(
            "{}: build the guests with scripts/build-guests.sh",
            path.display()
        )
    })
}

/// Upload the built guest `file` from `--guests` as module `name`, with default limits.
async fn upload_guest(
    rt: &Arc<crate::wasm::Runtime>,
    args: &BenchArgs,
    name: &str,
    file: &str,
) -> anyhow::Result<()> {
    rt.upload(
        name,
        read_guest(args, file)?,
        crate::wasm::Limits::default(),
        false,
    )
    .await?;
    Ok(())
}

/// Calls through the host vs a raw wasmtime call, instantiation from `InstancePre` with
/// pooling, restart with 20 cached modules vs compiling them, and calls/s on all cores.
async fn wasm_phase(args: &BenchArgs) -> anyhow::Result<Value> {
    const MODULES: usize = 20;
    const CALLS: u32 = 2000;
    let bytes = read_guest(args, "thermal_analysis.wasm")?;
    let dir = tempfile::tempdir()?;
    let node = bench_node(dir.path()).await?;
    let twin = node
        .registry
        .create(NewTwin {
            entity_type: "machine".into(),
            properties: props_of(
                json!({"temperature": 91.5, "temperatures": [70, 71, 72, 88, 99]}),
            ),
            ..Default::default()
        })
        .await?;
    let rt = node.state.runtime.clone();
    for i in 0..MODULES {
        rt.upload(
            &format!("ta{i}"),
            bytes.clone(),
            crate::wasm::Limits::default(),
            false,
        )
        .await?;
    }
    let params = json!({"threshold": 85});
    let (rt2, t2, p2) = (rt.clone(), twin.clone(), params.clone());
    let host_us = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let started = Instant::now();
        for _ in 0..CALLS {
            rt2.call_compute("ta0", std::slice::from_ref(&t2), &p2, None)?;
        }
        Ok(started.elapsed().as_micros() as f64 / CALLS as f64)
    })
    .await??;
    let raw_us =
        crate::wasm::measure::raw_call_micros(&bytes, &node.registry, &twin, &params, CALLS)?;
    let inst_us = rt.instantiate_micros("ta0", CALLS)?;
    let compile_ms = rt.compile_millis(&bytes, MODULES as u32)?;
    node.registry.shutdown();
    node.events.shutdown();
    drop((rt, node));
    // The rule and behavior tasks end once the event log is closed and release the store.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Restart: open the same data directory; every module loads from its cached artifact.
    let started = Instant::now();
    let node = bench_node(dir.path()).await?;
    let restart_ms = started.elapsed().as_secs_f64() * 1000.0;
    let loaded = node
        .state
        .runtime
        .stats
        .loaded_from_cache
        .load(Ordering::Relaxed);
    let compiled = node.state.runtime.stats.compiled.load(Ordering::Relaxed);
    // Calls/s with one caller per core.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds.min(3.0));
    let p0 = proc_sample();
    let mut tasks = Vec::new();
    for c in 0..cores {
        let (rt, t, p, done) = (
            node.state.runtime.clone(),
            twin.clone(),
            params.clone(),
            done.clone(),
        );
        tasks.push(tokio::task::spawn_blocking(
            move || -> anyhow::Result<()> {
                while Instant::now() < deadline {
                    rt.call_compute(
                        &format!("ta{}", c % MODULES),
                        std::slice::from_ref(&t),
                        &p,
                        None,
                    )?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            },
        ));
    }
    let (n, s, cpu) = finish(tasks, &done, p0).await?;
    node.registry.shutdown();
    node.events.shutdown();
    Ok(json!({
        "component_bytes": bytes.len(),
        "host_call_us": (host_us * 10.0).round() / 10.0,
        "raw_wasmtime_call_us": (raw_us * 10.0).round() / 10.0,
        "host_over_raw": ((host_us / raw_us) * 100.0).round() / 100.0,
        "instantiate_pooled_us": (inst_us * 10.0).round() / 10.0,
        "compile_20_modules_ms": compile_ms.round(),
        "restart_with_20_cached_modules_ms": restart_ms.round(),
        "restart_speedup": ((compile_ms / restart_ms) * 10.0).round() / 10.0,
        "restart_loaded_from_cache": loaded, "restart_compiled": compiled,
        "calls_per_s_all_cores": (n / s).round(), "cpu_percent": cpu.round(),
    }))
}

/// Queries over `--query-twins` twins: the seed's shape, a parent index, a full scan, and
/// the seed's shape over HTTP.
async fn query_phase(args: &BenchArgs) -> anyhow::Result<Value> {
    let f = fleet(args.query_twins).await?;
    let secs = args.seconds.min(3.0);
    let (seed_shape, hits) = query_rate(&f.node.registry, &seed_query(100), secs)?;
    // A full page out of many more matches: the scan must not read (or split) far past it.
    let (full_page, _) = query_rate(
        &f.node.registry,
        &seed_query(crate::registry::query::MAX_LIMIT),
        secs,
    )?;
    let hot: Query = serde_json::from_value(json!({"entity_type": "machine",
        "where": [{"property": "temperature", "op": ">", "value": 85}], "limit": 100}))?;
    let (scan, _) = query_rate(&f.node.registry, &hot, secs)?;
    let building = f.node.registry.get(&f.ids[0])?.parent_id;
    let by_parent: Query = serde_json::from_value(json!({"parent_id": building, "limit": 100}))?;
    let (parent, _) = query_rate(&f.node.registry, &by_parent, secs)?;
    let url = serve_in_process(&f.node).await?;
    let http = query_http_rate(&url, &seed_query(100), secs).await?;
    Ok(
        json!({"twins": args.query_twins, "page": 100, "hits_per_page": hits,
        "seed_shape_per_s": seed_shape.round(), "parent_index_per_s": parent.round(),
        "seed_shape_page_10000_per_s": full_page.round(),
        "where_temperature_gt_85_full_scan_per_s": scan.round(), "seed_shape_http_per_s": http.round()}),
    )
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.twins > 0 && args.props > 0 && args.hz > 0.0 && args.seconds > 0.0,
        "--twins, --props, --hz and --seconds must be positive"
    );
    let want = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    let mut report = serde_json::Map::new();
    eprintln!(
        "twinhost bench: {} twins × {} Hz × {} properties, {} s per phase",
        args.twins, args.hz, args.props, args.seconds
    );
    if want("inproc") || want("fleet") {
        let f = fleet(args.twins).await?;
        if want("inproc") {
            eprintln!("phase: in-process durable updates (unpaced)");
            let r = inproc_max(&f.node.registry, &f.ids, args.props, args.seconds).await?;
            eprintln!("  {r}");
            report.insert("inproc".into(), r);
        }
        if want("fleet") {
            eprintln!(
                "phase: your fleet, paced at {} updates/s",
                args.twins as f64 * args.hz
            );
            let r =
                fleet_paced(&f.node.registry, &f.ids, args.hz, args.props, args.seconds).await?;
            eprintln!("  {r}");
            report.insert("fleet".into(), r);
        }
    }
    if want("http") || want("patch") {
        let f = fleet(args.twins).await?;
        let url = serve_in_process(&f.node).await?;
        if want("http") {
            eprintln!("phase: HTTP NDJSON ingest over loopback");
            let r = http_ingest(&url, &f.ids, args.props, args.seconds).await?;
            eprintln!("  {r}");
            report.insert("http_ingest".into(), r);
        }
        if want("patch") {
            eprintln!("phase: single PATCH latency at {} req/s", args.patch_rate);
            let r = patch_latency(&url, &f.ids, args.patch_rate, args.seconds).await?;
            eprintln!("  {r}");
            report.insert("patch".into(), r);
        }
    }
    if want("query") {
        eprintln!("phase: queries over {} twins", args.query_twins);
        let r = query_phase(&args).await?;
        eprintln!("  {r}");
        report.insert("query".into(), r);
    }
    if want("seed") {
        eprintln!(
            "phase: the seed's workload (10K twins, 100K updates) on twinhost and on the seed"
        );
        let r = seed_comparison(&args).await?;
        eprintln!("  {r}");
        report.insert("seed_comparison".into(), r);
    }
    if want("wasm") {
        eprintln!("phase: WebAssembly compute calls (thermal-analysis)");
        let r = wasm_phase(&args).await?;
        eprintln!("  {r}");
        report.insert("wasm".into(), r);
    }
    if want("behavior") {
        eprintln!("phase: behaviors (thermal-monitor)");
        let r = events::behavior_phase(&args).await?;
        eprintln!("  {r}");
        report.insert("behavior".into(), r);
    }
    if want("rules") {
        eprintln!("phase: rule evaluation (100 threshold + window rules, in process)");
        let r = events::rules_phase(&args)?;
        eprintln!("  {r}");
        report.insert("rules".into(), r);
    }
    if want("events") {
        eprintln!("phase: event delivery (in process, SSE) and 10K subscribers");
        let r = events::events_phase(&args).await?;
        report.insert("events".into(), r);
    }
    if want("workflow") {
        eprintln!(
            "phase: the seed's workflow (aggregate + compute over 100 machines) vs direct calls"
        );
        let r = workflow::workflow_phase(&args).await?;
        eprintln!("  {r}");
        report.insert("workflow".into(), r);
    }
    if want("tick") {
        eprintln!(
            "phase: {} machines simulated at 1 Hz (machine-sim ticks), compute calls through the pool",
            args.tick_twins
        );
        let r = tick::tick_phase(&args).await?;
        eprintln!("  {r}");
        report.insert("tick".into(), r);
    }
    if want("bulk") {
        eprintln!(
            "phase: bulk provisioning of {} twins over loopback vs one POST at a time",
            args.bulk_twins
        );
        let r = bulk::bulk_phase(&args).await?;
        eprintln!("  {r}");
        report.insert("bulk".into(), r);
    }
    if args.only.iter().any(|o| o == "scale") {
        eprintln!(
            "phase: scale: {} twins on a server process of its own",
            args.twins
        );
        let r = scale::scale_phase(&args).await?;
        eprintln!("  {r}");
        report.insert("scale".into(), r);
    }
    if want("sync") {
        eprintln!("phase: sync between two nodes over loopback WebSocket");
        let r = sync::sync_phase(&args).await?;
        eprintln!("  {r}");
        report.insert("sync".into(), r);
    }
    report.insert("peak_rss_mb".into(), json!(rss_mb("VmHWM:").round()));
    report.insert(
        "cores".into(),
        json!(std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)),
    );
    println!("{}", serde_json::to_string_pretty(&Value::Object(report))?);
    Ok(())
}
