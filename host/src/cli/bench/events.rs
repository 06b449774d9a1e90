//! Bench phases for the event orchestrator and behaviors:
//! - `events`: update → in-process subscriber latency and update → SSE client latency at a
//!   paced rate, and many concurrent subscribers with their memory;
//! - `rules`: rule evaluation throughput with 100 threshold + window rules, in process;
//! - `behavior`: a behavior call through the host vs raw wasmtime, and events/s through
//!   `thermal-monitor` on all cores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::{bench_node, fleet, proc_sample, props_of, rss_mb, serve_in_process, BenchArgs, Fleet};
use crate::events::rules::{RuleSet, RuleSpec};
use crate::events::{Event, EventType, Filter, Item};
use crate::registry::{NewTwin, Registry, Update};
use crate::types::{Properties, TwinId};

pub(super) fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

pub(super) fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    (h.value_at_quantile(q) as f64 / 10.0).round() / 100.0
}

/// Paced producer: `rate` updates/s in 1 ms ticks for `secs`, each update carrying its send
/// time (`sent_us`). Returns how many were sent.
pub(super) async fn produce(
    registry: Registry,
    ids: Arc<Vec<TwinId>>,
    rate: u64,
    secs: f64,
) -> anyhow::Result<u64> {
    let per_tick = (rate / 1000).max(1) as usize;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut k = 0usize;
    while Instant::now() < end {
        tick.tick().await;
        let sent = now_us();
        let batch: Vec<Update> = (0..per_tick)
            .map(|i| {
                let mut p = Properties::new();
                p.insert("temperature".into(), json!(70 + (k + i) % 20));
                p.insert("sent_us".into(), json!(sent));
                Update::new(ids[(k + i) % ids.len()], p)
            })
            .collect();
        k += per_tick;
        registry.apply_batch(batch).await?;
    }
    Ok(k as u64)
}

/// Update → subscriber latency in process and over SSE, and many subscribers.
pub(super) async fn events_phase(args: &BenchArgs) -> anyhow::Result<Value> {
    let secs = args.seconds.min(5.0);
    let f = fleet(args.twins.min(10_000)).await?;
    let ids = Arc::new(f.ids.clone());
    let inproc = in_process_latency(&f, &ids, secs).await?;
    eprintln!("  in process: {inproc}");
    let url = serve_in_process(&f.node).await?;
    let sse = sse_latency(&f, &ids, &url, secs).await?;
    eprintln!("  SSE: {sse}");
    let many = many_subscribers(&f, &ids, secs).await?;
    eprintln!("  {SUBSCRIBERS} subscribers: {many}");
    let reg = f.node.registry.clone();
    let sse_many = sse_subscribers(&url, &reg, &ids, SUBSCRIBERS, secs.min(3.0)).await?;
    eprintln!("  SSE subscribers: {sse_many}");
    Ok(json!({"in_process": inproc, "sse": sse, "subscribers": many, "sse_subscribers": sse_many}))
}

/// Updates per second offered by the latency measurements.
const RATE: u64 = 10_000;
/// In-process subscribers of the "many subscribers" measurement, each following one twin.
const SUBSCRIBERS: usize = 10_000;

fn updated_filter() -> Filter {
    Filter {
        types: EventType::TwinUpdated.bit(),
        ..Filter::default()
    }
}

/// One in-process subscriber: latency from submit and from the durable append.
async fn in_process_latency(f: &Fleet, ids: &Arc<Vec<TwinId>>, secs: f64) -> anyhow::Result<Value> {
    let reg = f.node.registry.clone();
    let updated = updated_filter();
    let mut sub = f.node.events.subscribe(reg.clone(), updated.clone(), None);
    let consumer = tokio::spawn(async move {
        let mut from_submit = Histogram::<u64>::new(3).expect("histogram");
        let mut from_append = Histogram::<u64>::new(3).expect("histogram");
        let mut lagged = 0u64;
        while let Some(item) = sub.next().await {
            match item {
                Item::Event(e) => {
                    if let Some(sent) = e.changed.get("sent_us").and_then(Value::as_i64) {
                        let _ = from_submit.record((now_us() - sent).max(0) as u64);
                    }
                    if let Some(a) = e.appended {
                        let _ = from_append.record(a.elapsed().as_micros() as u64);
                    }
                    if e.changed.contains_key("stop") {
                        break;
                    }
                }
                Item::Lagged { from, to } => lagged += to - from + 1,
            }
        }
        (from_submit, from_append, lagged)
    });
    let sent = produce(reg.clone(), ids.clone(), RATE, secs).await?;
    stop(&reg, ids[0]).await?;
    let (submit, append, lagged) = consumer.await?;
    Ok(json!({
        "rate_per_s": RATE, "events": sent, "lagged": lagged,
        "submit_to_subscriber_p50_ms": ms(&submit, 0.5), "submit_to_subscriber_p99_ms": ms(&submit, 0.99),
        "durable_to_subscriber_p50_ms": ms(&append, 0.5), "durable_to_subscriber_p99_ms": ms(&append, 0.99),
        "durable_to_subscriber_max_ms": (append.max() as f64 / 10.0).round() / 100.0,
    }))
}

/// One SSE client over loopback: latency from submit.
async fn sse_latency(
    f: &Fleet,
    ids: &Arc<Vec<TwinId>>,
    url: &str,
    secs: f64,
) -> anyhow::Result<Value> {
    let reg = f.node.registry.clone();
    let resp = reqwest::Client::new()
        .get(format!("{url}/v1/events?types=twin.updated"))
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "SSE: {}", resp.status());
    let sse = tokio::spawn(async move {
        let mut h = Histogram::<u64>::new(3).expect("histogram");
        let mut stream = resp.bytes_stream();
        let mut lines = crate::cli::client::SseData::default();
        'outer: while let Some(Ok(chunk)) = stream.next().await {
            for data in lines.push(&chunk) {
                let Ok(v) = serde_json::from_slice::<Value>(&data) else {
                    continue;
                };
                if let Some(sent) = v["changed"]["sent_us"].as_i64() {
                    let _ = h.record((now_us() - sent).max(0) as u64);
                }
                if v["changed"].get("stop").is_some() {
                    break 'outer;
                }
            }
        }
        h
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    produce(reg.clone(), ids.clone(), RATE, secs).await?;
    stop(&reg, ids[0]).await?;
    let h = tokio::time::timeout(Duration::from_secs(30), sse)
        .await
        .context("the SSE client did not finish")??;
    Ok(json!({"rate_per_s": RATE, "events": h.len(),
        "submit_to_sse_client_p50_ms": ms(&h, 0.5), "submit_to_sse_client_p99_ms": ms(&h, 0.99)}))
}

/// Many in-process subscribers, each following one twin: memory and CPU.
async fn many_subscribers(f: &Fleet, ids: &Arc<Vec<TwinId>>, secs: f64) -> anyhow::Result<Value> {
    let reg = f.node.registry.clone();
    let updated = updated_filter();
    let rss0 = rss_mb("VmRSS:");
    let delivered = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::with_capacity(SUBSCRIBERS);
    for i in 0..SUBSCRIBERS {
        let filter = Filter {
            twin_ids: vec![ids[i % ids.len()]],
            ..updated.clone()
        };
        let mut sub = f.node.events.subscribe(reg.clone(), filter, None);
        let d = delivered.clone();
        subs.push(tokio::spawn(async move {
            while let Some(item) = sub.next().await {
                if let Item::Event(e) = item {
                    if e.changed.contains_key("stop") {
                        break;
                    }
                    d.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let rss_connected = rss_mb("VmRSS:");
    let p0 = proc_sample();
    let sent = produce(reg.clone(), ids.clone(), RATE / 10, secs.min(3.0)).await?;
    let rss_after = rss_mb("VmRSS:");
    let cpu = super::cpu_percent(p0, proc_sample());
    for id in ids.iter().take(SUBSCRIBERS.min(ids.len())) {
        stop(&reg, *id).await?;
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(subs)).await;
    let expected = sent * SUBSCRIBERS.div_ceil(ids.len()) as u64;
    Ok(json!({
        "subscribers": SUBSCRIBERS, "rate_per_s": RATE / 10, "events": sent,
        "delivered": delivered.load(Ordering::Relaxed), "expected_deliveries": expected,
        "rss_before_mb": rss0.round(), "rss_with_subscribers_mb": rss_connected.round(),
        "rss_after_run_mb": rss_after.round(),
        "per_subscriber_kb": (((rss_connected - rss0) * 1024.0 / SUBSCRIBERS as f64) * 10.0).round() / 10.0,
        "cpu_percent": cpu.round(),
    }))
}

/// Raise the open-file limit to its hard maximum; returns the new soft limit.
fn raise_nofile() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

/// `want` SSE connections over loopback, each following one twin, with the process's RSS
/// (client and server sides both live in this process).
async fn sse_subscribers(
    url: &str,
    reg: &Registry,
    ids: &Arc<Vec<TwinId>>,
    want: usize,
    secs: f64,
) -> anyhow::Result<Value> {
    // Two descriptors per connection (client and server ends) plus headroom.
    let n = want.min((raise_nofile().saturating_sub(200) / 2) as usize);
    let rss0 = rss_mb("VmRSS:");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let delivered = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let target = format!(
            "{url}/v1/events?types=twin.updated&twin_id={}",
            ids[i % ids.len()]
        );
        let (d, c, http) = (delivered.clone(), connected.clone(), http.clone());
        tasks.push(tokio::spawn(async move {
            // A burst of connects can overflow the listen backlog: retry a few times.
            let mut resp = None;
            for attempt in 0..5u64 {
                match http.get(&target).send().await {
                    Ok(r) => {
                        resp = Some(r);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await,
                }
            }
            let Some(resp) = resp else { return };
            c.fetch_add(1, Ordering::Relaxed);
            let mut stream = resp.bytes_stream();
            while let Some(Ok(chunk)) = stream.next().await {
                let text = String::from_utf8_lossy(&chunk);
                if text.contains("\"stop\"") {
                    return;
                }
                d.fetch_add(
                    text.matches("\ndata: ").count() as u64 + u64::from(text.starts_with("data: ")),
                    Ordering::Relaxed,
                );
            }
        }));
        if i % 500 == 499 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (connected.load(Ordering::Relaxed) as usize) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_connected = rss_mb("VmRSS:");
    let p0 = proc_sample();
    let sent = produce(reg.clone(), ids.clone(), 1000, secs).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = super::cpu_percent(p0, proc_sample());
    let rss_after = rss_mb("VmRSS:");
    let got = delivered.load(Ordering::Relaxed);
    for id in ids.iter().take(n.min(ids.len())) {
        stop(reg, *id).await?;
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(tasks)).await;
    let c = connected.load(Ordering::Relaxed);
    Ok(json!({
        "connections": c, "rate_per_s": 1000, "events": sent, "delivered": got,
        "expected_deliveries": sent * (n as u64).div_ceil(ids.len() as u64),
        "rss_before_mb": rss0.round(), "rss_connected_mb": rss_connected.round(),
        "rss_after_run_mb": rss_after.round(),
        "per_connection_kb": (((rss_connected - rss0) * 1024.0 / c.max(1) as f64) * 10.0).round() / 10.0,
        "cpu_percent": cpu.round(),
    }))
}

/// An update that tells the consumers to stop.
pub(super) async fn stop(reg: &Registry, id: TwinId) -> anyhow::Result<()> {
    let mut p = Properties::new();
    p.insert("stop".into(), json!(true));
    reg.patch(Update::new(id, p)).await?;
    Ok(())
}

/// Rule evaluation throughput: 50 threshold and 50 tumbling-window rules over 10 properties.
pub(super) fn rules_phase(args: &BenchArgs) -> anyhow::Result<Value> {
    const PROPS: usize = 10;
    const EVENTS: usize = 1_000_000;
    // As the live engine does: rules spread over one shard per core, each shard evaluating
    // every event on its own thread.
    let shards = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let mut specs: Vec<(String, RuleSpec)> = Vec::new();
    for i in 0..50 {
        let property = format!("p{}", i % PROPS);
        specs.push((
            format!("t{i}"),
            serde_json::from_value(json!({"kind": "threshold", "entity_type": "machine",
                "property": property, "op": ">", "value": 90 + i % 10, "clear": 80,
                "actions": [{"type": "alert"}]}))?,
        ));
        specs.push((
            format!("w{i}"),
            serde_json::from_value(json!({"kind": "window", "entity_type": "machine",
                "property": property, "agg": "avg", "size": "10s", "op": ">", "value": 95,
                "actions": [{"type": "alert"}]}))?,
        ));
    }
    // The same rules on one thread, and spread over the shards (each with fresh state).
    let mut single = RuleSet::default();
    let mut sets: Vec<RuleSet> = (0..shards).map(|_| RuleSet::default()).collect();
    for (name, spec) in &specs {
        for set in [
            &mut single,
            &mut sets[crate::events::rules::shard_of(name, shards)],
        ] {
            set.put(name, spec.clone(), &|_| None)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
    }
    let twins: Vec<TwinId> = (0..args.twins.clamp(1, 10_000))
        .map(|_| TwinId::new_v7())
        .collect();
    let props: Vec<String> = (0..PROPS).map(|i| format!("p{i}")).collect();
    let t0 = chrono::Utc::now();
    let events: Vec<Event> = (0..EVENTS)
        .map(|k| {
            let mut e = Event::new(
                EventType::TwinUpdated,
                t0 + chrono::Duration::microseconds(k as i64 * 100),
            );
            e.seq = k as u64 + 1;
            e.twin_id = Some(twins[k % twins.len()]);
            e.entity_type = Some("machine".into());
            // Mostly normal readings (60-84), one in 50 over every threshold.
            let v = if k.is_multiple_of(50) {
                100
            } else {
                60 + (k * 7) % 25
            };
            e.changed.insert(props[k % PROPS].clone(), json!(v));
            e
        })
        .collect();
    let events = Arc::new(events);
    let run = |set: &mut RuleSet, events: &[Event]| {
        let mut out = Vec::new();
        let mut fired = 0usize;
        for e in events {
            set.on_event(e, &mut out);
            fired += out.len();
            out.clear();
        }
        fired
    };
    // All rules on one thread, then the shards in parallel.
    let started = Instant::now();
    let fired_single = run(&mut single, &events);
    let single_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let fired: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = sets
            .iter_mut()
            .map(|set| {
                let events = events.clone();
                scope.spawn(move || run(set, &events))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        fired == fired_single,
        "sharded and single evaluation disagree"
    );
    Ok(json!({
        "rules": specs.len(), "threshold_rules": 50, "window_rules": 50, "properties": PROPS,
        "rules_per_event": 100 / PROPS, "twins": twins.len(), "events": EVENTS,
        "shards": shards,
        "events_per_s": (EVENTS as f64 / secs).round(),
        "events_per_s_one_thread": (EVENTS as f64 / single_secs).round(),
        "firings": fired,
    }))
}

/// A behavior call through the host vs raw wasmtime, and events/s through thermal-monitor.
pub(super) async fn behavior_phase(args: &BenchArgs) -> anyhow::Result<Value> {
    const CALLS: u32 = 2000;
    let bytes = super::read_guest(args, "thermal_monitor.wasm")?;
    let dir = tempfile::tempdir()?;
    let node = bench_node(dir.path()).await?;
    let rt = node.state.runtime.clone();
    rt.upload(
        "thermal-monitor",
        bytes.clone(),
        crate::wasm::Limits::default(),
        false,
    )
    .await?;
    let mut ids = Vec::new();
    for _ in 0..1000 {
        ids.push(
            node.registry
                .create(NewTwin {
                    entity_type: "machine".into(),
                    properties: props_of(json!({"temperature": 70})),
                    ..Default::default()
                })
                .await?
                .id,
        );
    }
    let twin = node.registry.get(&ids[0])?;
    let changed = json!({"temperature": 91});
    let (rt2, t2, c2) = (rt.clone(), twin.clone(), changed.clone());
    let host_us = tokio::task::spawn_blocking(move || {
        rt2.behavior_call_micros("thermal-monitor", &t2, &c2, CALLS)
    })
    .await??;
    let (rt2, t2, c2) = (rt.clone(), twin.clone(), changed.clone());
    let turn_us = tokio::task::spawn_blocking(move || {
        rt2.behavior_turn_call_micros(
            "thermal-monitor",
            &t2,
            &c2,
            CALLS,
            crate::wasm::behaviors::EVENT_TURN,
        )
    })
    .await??;
    let raw_us =
        crate::wasm::measure::raw_behavior_micros(&bytes, &node.registry, &twin, &changed, CALLS)?;
    node.state
        .behaviors
        .put(
            "overheat",
            crate::wasm::behaviors::Binding {
                module: "thermal-monitor".into(),
                entity_type: Some("machine".into()),
                twin_id: None,
                on: crate::types::ReactTo::Local,
                every: None,
                created_at: chrono::Utc::now(),
            },
        )
        .await?;
    // Feed updates, keeping at most a few thousand events ahead of the behavior.
    // Events run or dropped (a full queue) so far.
    let runs = || {
        node.state
            .behaviors
            .get("overheat")
            .map(|b| b.runs + b.dropped)
            .unwrap_or(0)
    };
    let secs = args.seconds.min(5.0);
    let p0 = proc_sample();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    let mut k = 0usize;
    while Instant::now() < end {
        if sent.saturating_sub(runs()) > 3000 {
            tokio::time::sleep(Duration::from_micros(200)).await;
            continue;
        }
        let batch: Vec<Update> = (0..500)
            .map(|i| {
                let mut p = Properties::new();
                // Every other reading is over 85: an alert, and the mark toggles.
                p.insert(
                    "temperature".into(),
                    json!(if (k + i).is_multiple_of(2) { 80 } else { 90 }),
                );
                Update::new(ids[(k + i) % ids.len()], p)
            })
            .collect();
        k += 500;
        sent += 500;
        node.registry.apply_batch(batch).await?;
    }
    let drain_end = Instant::now() + Duration::from_secs(10);
    while runs() < sent && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let p1 = proc_sample();
    let elapsed = p1.at.duration_since(p0.at).as_secs_f64();
    let info = node.state.behaviors.get("overheat")?;
    let python = python_behavior(args, &rt, &twin).await?;
    node.registry.shutdown();
    node.events.shutdown();
    let events_per_s = info.runs as f64 / elapsed;
    // What the call allows: every core doing nothing but calls, one after another.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    let of_bound = |call_us: f64| (events_per_s / (cores * 1e6 / call_us) * 100.0).round() / 100.0;
    Ok(json!({
        "component_bytes": bytes.len(),
        "host_behavior_call_us": (host_us * 10.0).round() / 10.0,
        "raw_wasmtime_behavior_call_us": (raw_us * 10.0).round() / 10.0,
        "host_over_raw": ((host_us / raw_us) * 100.0).round() / 100.0,
        "host_behavior_call_in_turn_us": (turn_us * 10.0).round() / 10.0,
        "updates": sent, "behavior_runs": info.runs, "alerts": info.alerts,
        "patches": info.patches, "guarded": info.guarded, "errors": info.errors,
        "missed": node.state.behaviors.missed(), "dropped": info.dropped,
        "events_per_s": events_per_s.round(),
        "of_what_a_call_allows": of_bound(host_us),
        "of_what_a_call_in_turn_allows": of_bound(turn_us),
        "cpu_percent": super::cpu_percent(p0, p1).round(),
        "python_turn_monitor": python,
    }))
}

/// A fresh call and a call inside turns (as the engine runs them) of the Python behavior
/// `turn-monitor` (CPython in the component), when scripts/build-guests.sh has built it.
async fn python_behavior(
    args: &BenchArgs,
    rt: &std::sync::Arc<crate::wasm::Runtime>,
    twin: &crate::types::Twin,
) -> anyhow::Result<Value> {
    const CALLS: u32 = 200;
    let path = args.guests.join("../../python/turn_monitor_py.wasm");
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(json!(format!(
            "{} not found: build the guests with scripts/build-guests.sh",
            path.display()
        )));
    };
    rt.upload(
        "turn-monitor-py",
        bytes,
        crate::wasm::Limits::default(),
        false,
    )
    .await?;
    let (rt, twin) = (rt.clone(), twin.clone());
    let (fresh, in_turn) = tokio::task::spawn_blocking(move || {
        let changed = json!({"temperature": 91});
        anyhow::Ok((
            rt.behavior_call_micros("turn-monitor-py", &twin, &changed, CALLS)?,
            rt.behavior_turn_call_micros(
                "turn-monitor-py",
                &twin,
                &changed,
                CALLS,
                crate::wasm::behaviors::EVENT_TURN,
            )?,
        ))
    })
    .await??;
    Ok(json!({
        "host_behavior_call_us": fresh.round(),
        "host_behavior_call_in_turn_us": (in_turn * 10.0).round() / 10.0,
    }))
}
