//! Bench phase `workflow`: the seed's workflow (`collect_temperatures` → `analyze_patterns`
//! over 100 machines) through the workflow engine, against the same work done by direct calls
//! in the same run (the baseline): runs/s one at a time and with 8 at once, and what the engine
//! adds per step.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::events::ms;
use super::{fleet, upload_guest, BenchArgs};
use crate::registry::Query;
use crate::wasm::pool::Caller;
use crate::workflow::{Spec, Status};

pub(super) async fn workflow_phase(args: &BenchArgs) -> anyhow::Result<Value> {
    const MACHINES: usize = 100;
    const RUNS: usize = 300;
    let f = fleet(MACHINES).await?;
    let rt = f.node.state.runtime.clone();
    upload_guest(&rt, args, "thermal-analysis", "thermal_analysis.wasm").await?;
    let building = f
        .node
        .registry
        .get(&f.ids[0])?
        .parent_id
        .expect("machines have a parent");
    let spec: Spec = serde_json::from_value(json!({
        "steps": [
            {"id": "collect_temperatures", "type": "aggregate", "function": "collect_property",
             "query": {"entity_type": "machine", "parent_id": building, "limit": 1000},
             "parameters": {"property": "temperature"}},
            {"id": "analyze_patterns", "type": "compute", "twin_ids": [building],
             "function": "thermal-analysis", "parameters": {"algorithm": "thermal_analysis"}}],
        "dependencies": {"analyze_patterns": ["collect_temperatures"]}
    }))?;

    // Baseline: the same two steps as direct calls (query + aggregate, then the compute call
    // on the pool with the first's result as input).
    let mut direct = Histogram::<u64>::new(3)?;
    let q = Query {
        entity_type: Some("machine".into()),
        parent_id: Some(building),
        limit: Some(1000),
        ..Default::default()
    };
    let building_twin = f.node.registry.get(&building)?;
    for _ in 0..RUNS {
        let t0 = Instant::now();
        let twins: Vec<_> = f.node.registry.query(&q)?.twins();
        let temps = crate::workflow::aggregate(
            "collect_property",
            &json!({"property": "temperature"}),
            &twins,
        )
        .map_err(anyhow::Error::msg)?;
        let params = json!({"algorithm": "thermal_analysis",
                            "inputs": {"collect_temperatures": temps}});
        let out = rt
            .compute_each(
                &Caller::Invoke,
                "thermal-analysis",
                vec![building_twin.clone()],
                params,
                Duration::from_secs(30),
                Default::default(),
            )
            .await?;
        anyhow::ensure!(out.is_some_and(|o| o.values().all(Result::is_ok)));
        direct.record(t0.elapsed().as_micros() as u64)?;
    }

    let wf = f.node.state.workflows.clone();
    let mut one = Histogram::<u64>::new(3)?;
    let mut steps = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    for _ in 0..RUNS {
        let t0 = Instant::now();
        let id = wf.start(spec.clone()).await?;
        let run = wf.wait(&id, Duration::from_secs(30)).await?;
        one.record(t0.elapsed().as_micros() as u64)?;
        anyhow::ensure!(
            run.status == Status::Succeeded,
            "a bench run failed: {:?}",
            run.error
        );
        for s in run.steps.values() {
            if let (Some(a), Some(b)) = (s.started_at, s.finished_at) {
                steps.record((b - a).num_microseconds().unwrap_or(0).max(0) as u64)?;
            }
        }
    }
    let sequential_rate = RUNS as f64 / started.elapsed().as_secs_f64();

    // Eight clients at once for a few seconds.
    let secs = args.seconds.min(5.0);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (wf, spec) = (wf.clone(), spec.clone());
        set.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let id = wf.start(spec.clone()).await?;
                wf.wait(&id, Duration::from_secs(30)).await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    let concurrent_rate = total as f64 / secs;
    let p50 = |h: &Histogram<u64>| ms(h, 0.5);
    let overhead_per_step = (p50(&one) - p50(&direct)) / 2.0;
    Ok(json!({
        "machines": MACHINES,
        "runs": RUNS,
        "direct_calls_p50_ms": p50(&direct),
        "run_p50_ms": p50(&one),
        "run_p99_ms": ms(&one, 0.99),
        "step_p50_ms": p50(&steps),
        "engine_overhead_per_step_ms": (overhead_per_step * 1000.0).round() / 1000.0,
        "runs_per_s_one_at_a_time": sequential_rate.round(),
        "runs_per_s_8_at_once": concurrent_rate.round(),
        "direct_per_s": (1000.0 / p50(&direct)).round(),
        "ratio_run_to_direct": (p50(&one) / p50(&direct) * 100.0).round() / 100.0,
    }))
}
