//! `bench --only sync`: two nodes in one process, B linked to A over a loopback WebSocket as
//! `serve --peer` links them.
//!
//! - catch-up: A holds `--sync-twins` twins before B links; time until B holds them all;
//! - latency: A takes 1,000 updates/s (each carrying its send time); the time until B's
//!   event stream shows each one, p50/p99;
//! - throughput: A takes updates as fast as it can for `--seconds`; updates replicated per
//!   second (A's updates over the time until B has merged all of them, coalescing included;
//!   bounded by A's own write rate, shown beside it),
//!   and bytes on the wire per update against one JSON message per update.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::events::{ms, now_us, produce, stop};
use super::BenchArgs;
use crate::events::{EventType, Filter, Item};
use crate::sync::{LinkStats, PeerConfig};

/// Updates per second of the latency measurement (the goal is stated at this rate).
const RATE: u64 = 1000;
/// How long B may take to catch up before the phase gives up.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(600);

/// Wait until `done` holds, polling; fail after `limit`.
async fn until(what: &str, limit: Duration, done: impl Fn() -> bool) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    while !done() {
        anyhow::ensure!(t0.elapsed() < limit, "{what}: not done after {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(t0.elapsed())
}

pub(super) async fn sync_phase(args: &BenchArgs) -> anyhow::Result<Value> {
    eprintln!("  A: creating {} twins", args.sync_twins);
    let a = super::fleet(args.sync_twins).await?;
    let url = super::serve_in_process(&a.node).await?;
    let dir_b = tempfile::tempdir()?;
    let b = super::super::serve::open_default_node(dir_b.path(), "bench-b", true).await?;
    let (reg_a, reg_b) = (a.node.registry.clone(), b.registry.clone());
    let ids = Arc::new(a.ids.clone());
    // A folds its fleet into its store first, as a node that has been running would have:
    // the catch-up is B's work and A's sending, not A's own load.
    settle(&[&reg_a], ids[0]).await?;

    let t0 = Instant::now();
    b.state
        .peers
        .add_cli_peer(PeerConfig { url, token: None })?;
    let n = reg_a.twin_count();
    until("B's catch-up", CATCH_UP_LIMIT, || reg_b.twin_count() >= n).await?;
    let catch_up = t0.elapsed().as_secs_f64();
    eprintln!("  catch-up: {n} twins in {catch_up:.2} s");
    let link = b
        .state
        .peers
        .link_stats("bench")
        .ok_or_else(|| anyhow::anyhow!("B has no link with A"))?;

    // Both nodes now fold the catch-up into their stores (checkpoints of every twin); the
    // live latency is measured once that disk work is done, not against it.
    settle(&[&reg_a, &reg_b], ids[0]).await?;

    // Latency at 1K updates/s: from the write on A to the event on B.
    let mut sub = b.events.subscribe(
        reg_b.clone(),
        Filter {
            types: EventType::TwinUpdated.bit(),
            ..Filter::default()
        },
        None,
    );
    let consumer = tokio::spawn(async move {
        let mut h = Histogram::<u64>::new(3).expect("histogram");
        while let Some(item) = sub.next().await {
            if let Item::Event(e) = item {
                if let Some(sent) = e.changed.get("sent_us").and_then(Value::as_i64) {
                    let _ = h.record((now_us() - sent).max(0) as u64);
                }
                if e.changed.contains_key("stop") {
                    break;
                }
            }
        }
        h
    });
    let sent = produce(reg_a.clone(), ids.clone(), RATE, args.seconds).await?;
    stop(&reg_a, ids[0]).await?;
    let lat = tokio::time::timeout(Duration::from_secs(60), consumer).await??;
    eprintln!(
        "  latency at {RATE}/s: p50 {} ms, p99 {} ms ({} of {sent} updates seen)",
        ms(&lat, 0.5),
        ms(&lat, 0.99),
        lat.len()
    );

    // Throughput: A as fast as it goes; B merges with coalescing.
    let link_a = a
        .node
        .state
        .peers
        .link_stats("bench-b")
        .ok_or_else(|| anyhow::anyhow!("A has no link with B"))?;
    let bytes0 = link_a.bytes_out.load(std::sync::atomic::Ordering::Relaxed);
    let ops0 = link_a.ops_out.load(std::sync::atomic::Ordering::Relaxed);
    let t1 = Instant::now();
    let made = super::inproc_max(&reg_a, &ids, args.props, args.seconds).await?;
    let updates = made["updates"].as_f64().unwrap_or(0.0);
    // The bound of the replicated rate: A's own write rate while B merges beside it.
    let written = made["updates_per_s"].as_f64().unwrap_or(0.0);
    let head = *reg_a.watch_durable().borrow();
    until("B merging A's updates", CATCH_UP_LIMIT, || {
        merged_through(&link) >= head
    })
    .await?;
    let secs = t1.elapsed().as_secs_f64();
    let bytes = link_a.bytes_out.load(std::sync::atomic::Ordering::Relaxed) - bytes0;
    let entries = link_a.ops_out.load(std::sync::atomic::Ordering::Relaxed) - ops0;
    let json_per_update = (0..1000)
        .map(|k| super::ndjson_line(&ids, k, args.props).len())
        .sum::<usize>() as f64
        / 1000.0;
    let replicated = (updates / secs).round();
    eprintln!(
        "  replicated {replicated} updates/s of {written} written/s on A ({updates} updates as {entries} entries, {:.1} bytes/update on the wire vs {json_per_update:.1} for one JSON message per update)",
        bytes as f64 / updates.max(1.0)
    );
    let out = json!({
        "catch_up": {"twins": n, "seconds": (catch_up * 100.0).round() / 100.0,
                     "twins_per_s": (n as f64 / catch_up).round()},
        "latency": {"rate_per_s": RATE, "updates": sent, "seen": lat.len(),
                    "p50_ms": ms(&lat, 0.5), "p99_ms": ms(&lat, 0.99),
                    "max_ms": (lat.max() as f64 / 10.0).round() / 100.0},
        "throughput": {"updates_on_a": updates, "seconds_until_b_merged": (secs * 100.0).round() / 100.0,
                       "replicated_updates_per_s": replicated, "written_updates_per_s_on_a": written,
                       "entries_sent": entries,
                       "updates_per_entry": (updates / (entries.max(1) as f64) * 10.0).round() / 10.0,
                       "wire_bytes_per_update": (bytes as f64 / updates.max(1.0) * 10.0).round() / 10.0,
                       "json_message_bytes_per_update": (json_per_update * 10.0).round() / 10.0},
    });
    b.state.peers.stop();
    a.node.state.peers.stop();
    reg_b.shutdown();
    b.events.shutdown();
    Ok(out)
}

/// Wait (at most two minutes) until a durable write on each node has taken under 20 ms for
/// three seconds in a row (longer than a checkpoint period, so the catch-up's checkpoints
/// are done).
async fn settle(
    nodes: &[&crate::registry::Registry],
    probe: crate::types::TwinId,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut quick = 0;
    let write = |k: u64| {
        let mut p = crate::types::Properties::new();
        p.insert("settle".into(), json!(k));
        crate::registry::Update::new(probe, p)
    };
    let mut k = 0;
    while quick < 15 && t0.elapsed() < Duration::from_secs(120) {
        let t = Instant::now();
        k += 1;
        for n in nodes {
            n.patch(write(k)).await?;
        }
        quick = if t.elapsed() < Duration::from_millis(20) {
            quick + 1
        } else {
            0
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("  settled in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn merged_through(link: &LinkStats) -> u64 {
    link.received_through
        .load(std::sync::atomic::Ordering::Relaxed)
}
