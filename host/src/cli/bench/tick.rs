//! Bench phase `tick`: periodic simulation and compute calls through the pool.
//!
//! - `--tick-twins` machines (default 10,000) ticking at 1 Hz with `machine-sim`, each tick a
//!   real patch through the write path (the machines never reach their target): ticks/s
//!   achieved against the 10,000/s asked for, ticks skipped, CPU.
//! - Compute calls (`thermal-analysis` on one twin) through the compute pool, the way every
//!   guest call is made: one caller at a time (one slot busy: the one-core rate) against eight
//!   callers at once (every slot busy), in the same run, and their ratio.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{bench_node, cpu_percent, proc_sample, props_of, upload_guest, BenchArgs};
use crate::registry::NewTwin;
use crate::wasm::behaviors::Binding;
use crate::wasm::pool::Caller;

pub(super) async fn tick_phase(args: &BenchArgs) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let node = bench_node(dir.path()).await?;
    let rt = node.state.runtime.clone();
    upload_guest(&rt, args, "machine-sim", "machine_sim.wasm").await?;
    upload_guest(&rt, args, "thermal-analysis", "thermal_analysis.wasm").await?;
    let twins = args.tick_twins;
    let mut first = None;
    for chunk in 0..twins.div_ceil(1000) {
        let n = (twins - chunk * 1000).min(1000);
        // Targets far out of reach: every tick writes a new temperature.
        let made = node
            .registry
            .create_many(
                (0..n)
                    .map(|_| NewTwin {
                        entity_type: "machine".into(),
                        properties: props_of(
                            json!({"temperature": 20.0, "target_temperature": 1.0e9}),
                        ),
                        ..Default::default()
                    })
                    .collect(),
            )
            .await?;
        for t in made {
            first.get_or_insert(t?);
        }
    }
    let twin = first.ok_or_else(|| anyhow::anyhow!("--tick-twins must be at least 1"))?;

    // Compute calls through the pool: one caller, then eight.
    let secs = args.seconds.min(3.0);
    let one = pool_calls(&rt, &twin, 1, secs).await?;
    let eight = pool_calls(&rt, &twin, 8, secs).await?;

    let behaviors = &node.state.behaviors;
    behaviors
        .put(
            "sim",
            Binding {
                module: "machine-sim".into(),
                entity_type: Some("machine".into()),
                twin_id: None,
                on: crate::types::ReactTo::Local,
                every: Some("1s".into()),
                created_at: chrono::Utc::now(),
            },
        )
        .await?;
    // One round to settle, then measure whole rounds.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rounds = args.seconds.max(3.0).round();
    let b0 = behaviors.get("sim")?;
    let p0 = proc_sample();
    tokio::time::sleep(Duration::from_secs_f64(rounds)).await;
    let b1 = behaviors.get("sim")?;
    let p1 = proc_sample();
    let elapsed = p1.at.duration_since(p0.at).as_secs_f64();
    behaviors.delete("sim").await?;
    node.registry.shutdown();
    node.events.shutdown();
    let per_s = |a: u64, b: u64| ((b - a) as f64 / elapsed).round();
    Ok(json!({
        "pool_slots": rt.pool().size(),
        "pool_calls_per_s_one_caller": one.round(),
        "pool_calls_per_s_eight_callers": eight.round(),
        "pool_scaling": ((eight / one) * 100.0).round() / 100.0,
        "tick_twins": twins, "every": "1s",
        "ticks_per_s_asked": twins,
        "ticks_per_s": per_s(b0.ticks, b1.ticks),
        "ticks_skipped_per_s": per_s(b0.ticks_skipped, b1.ticks_skipped),
        "tick_patches_per_s": per_s(b0.patches, b1.patches),
        "errors": b1.errors, "last_error": b1.last_error,
        "cpu_percent": cpu_percent(p0, p1).round(),
    }))
}

/// Compute calls per second made through the pool by `callers` concurrent callers for `secs`.
async fn pool_calls(
    rt: &Arc<crate::wasm::Runtime>,
    twin: &crate::types::Twin,
    callers: usize,
    secs: f64,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (rt, twin, done) = (rt.clone(), twin.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let t = twin.clone();
                    rt.on_pool(&Caller::Invoke, move |rt| {
                        rt.call_compute(
                            "thermal-analysis",
                            std::slice::from_ref(&t),
                            &json!({"threshold": 85}),
                            None,
                        )
                    })
                    .await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}
