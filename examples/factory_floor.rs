//! The seed's factory floor, played against a running twinhost over HTTP.
//!
//! A building, 100 CNC machines under it (temperature, vibration, status), a model that
//! validates them, the `thermal-monitor` behavior (WebAssembly) and a correlation rule
//! watching them, a live alert subscriber (Server-Sent Events), a stream of sensor updates
//! through bulk ingest and PATCH, a query for machines over 85 degrees, the history of one
//! machine, and the `thermal-analysis` compute module in Rust and in Python.
//!
//! Run by `scripts/demo.sh`, or by hand against a server:
//! `cargo run --release --example factory_floor -- --url http://127.0.0.1:7878 --data-dir twinhost-data`

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

const MACHINES: usize = 100;
const ROUNDS: usize = 20;

struct Api {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<Value> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some((ct, b)) = body {
            rb = rb.header("content-type", ct).body(b);
        }
        let resp = rb
            .send()
            .await
            .with_context(|| format!("reaching {}", self.url))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{path}: {status}: {text}");
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        self.call(
            method,
            path,
            Some(("application/json", serde_json::to_vec(&body)?)),
        )
        .await
    }
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

/// Temperature of machine `i` in round `r`: the seed's 70 + (i % 20), warming a little each
/// round, so a handful of machines cross 85.
fn temperature(i: usize, r: usize) -> f64 {
    70.0 + (i % 20) as f64 + r as f64 * 0.1
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = arg("--url", "http://127.0.0.1:7878");
    let data_dir = arg("--data-dir", "twinhost-data");
    let token_file = format!("{data_dir}/admin.token");
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading the admin token {token_file}"))?
        .trim()
        .to_owned();
    let api = Api {
        http: reqwest::Client::new(),
        url,
        token,
    };
    use reqwest::Method;

    println!("== model: machines are validated (temperature in degF, status from a fixed set)");
    api.json(
        Method::PUT,
        "/v1/models/machine",
        json!({
            "properties": {
                "temperature": {"type": "number", "unit": "degF", "min": -40, "max": 500},
                "vibration_level": {"type": "number", "min": 0},
                "status": {"type": "string", "enum": ["operational", "maintenance", "fault"]},
                "overheated": {"type": "boolean"}
            },
            "required": ["status"]
        }),
    )
    .await?;

    println!("== twins: one building, {MACHINES} CNC machines under it");
    let building = api
        .json(
            Method::POST,
            "/v1/twins",
            json!({"entity_type": "building",
        "properties": {"name": "Factory A", "location": "Detroit", "area_sqft": 100000}}),
        )
        .await?;
    let building_id = building["id"].as_str().context("building id")?.to_owned();
    let mut ids = Vec::new();
    for i in 0..MACHINES {
        let m = api.json(Method::POST, "/v1/twins", json!({"entity_type": "machine", "parent_id": building_id,
            "properties": {"name": format!("Machine-{i:03}"), "type": "CNC", "status": "operational",
                           "temperature": 68.5, "vibration_level": 0.2}})).await?;
        ids.push(m["id"].as_str().context("machine id")?.to_owned());
    }
    println!(
        "   building {building_id} with {} children",
        api.call(
            Method::GET,
            &format!("/v1/twins/{building_id}/children"),
            None
        )
        .await?
        .as_array()
        .map_or(0, Vec::len)
    );

    println!("== a bad reading is refused with the reason (the model says min -40)");
    let bad = api
        .json(
            Method::PATCH,
            &format!("/v1/twins/{}", ids[0]),
            json!({"temperature": -500}),
        )
        .await;
    println!(
        "   {}",
        bad.err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "unexpectedly accepted".into())
    );

    let guests = arg("--guests", "guests/target/wasm32-wasip2/release");
    let names: std::collections::HashMap<String, String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), format!("Machine-{i:03}")))
        .collect();
    let monitor_path = format!("{guests}/thermal_monitor.wasm");
    match std::fs::read(&monitor_path) {
        Err(e) => {
            println!("== (skipping the behavior: {monitor_path}: {e}; run scripts/build-guests.sh)")
        }
        Ok(wasm) => {
            println!("== behavior: upload thermal-monitor (WebAssembly, behavior world) and bind it to every machine");
            let m = api
                .call(
                    Method::PUT,
                    "/v1/modules/thermal-monitor",
                    Some(("application/wasm", wasm)),
                )
                .await?;
            println!(
                "   module {} version {} ({} bytes)",
                m["name"], m["version"], m["size"]
            );
            api.json(
                Method::PUT,
                "/v1/behaviors/overheat",
                json!({"module": "thermal-monitor", "entity_type": "machine"}),
            )
            .await?;
            println!("   behavior overheat: thermal-monitor on entity type machine (alert and mark overheated above 85 degF)");
        }
    }
    println!("== rule: 5 or more machines of one building over 85 degF within a minute → critical alert, flag the building");
    api.json(Method::PUT, "/v1/rules/building-overheating", json!({
        "kind": "correlation", "entity_type": "machine",
        "condition": {"property": "temperature", "op": ">", "value": 85},
        "min_count": 5, "within": "1m",
        "actions": [
            {"type": "alert", "severity": "critical", "message": "5 or more machines over 85 degF in one building"},
            {"type": "patch", "target": "parent", "properties": {"heat_alarm": true}}
        ]})).await?;

    println!("== live alerts: subscribed to GET /v1/events?types=alert (Server-Sent Events)");
    let resp = api
        .http
        .get(format!("{}/v1/events?types=alert", api.url))
        .bearer_auth(&api.token)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("subscribing to events: {}", resp.status());
    }
    let alerts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let subscriber = {
        let alerts = alerts.clone();
        let names = names.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut stream = resp.bytes_stream();
            let mut buf = Vec::new();
            while let Some(Ok(chunk)) = stream.next().await {
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let Some(data) = line.strip_prefix(b"data: ") else {
                        continue;
                    };
                    let Ok(e) = serde_json::from_slice::<Value>(data) else {
                        continue;
                    };
                    let mut all = alerts.lock().expect("alerts");
                    if all.len() < 8 {
                        let who = e["twin_id"]
                            .as_str()
                            .and_then(|t| names.get(t))
                            .cloned()
                            .unwrap_or_else(|| e["twin_id"].as_str().unwrap_or("?").to_owned());
                        let by = e["data"]["behavior"]
                            .as_str()
                            .map(|b| format!("behavior {b}"))
                            .or_else(|| e["data"]["rule"].as_str().map(|r| format!("rule {r}")))
                            .unwrap_or_default();
                        println!(
                            "   ALERT #{} [{by}] {} {who}: {}",
                            e["seq"],
                            e["data"]["severity"].as_str().unwrap_or(""),
                            e["data"]["message"].as_str().unwrap_or("")
                        );
                    }
                    all.push(e);
                }
            }
        })
    };

    println!("== sensor stream: {ROUNDS} rounds × {MACHINES} machines through /v1/ingest (NDJSON)");
    let started = Instant::now();
    // Readings are one second apart, starting now (device time; ingest takes a `ts`).
    let base = chrono::Utc::now();
    let mut applied = 0;
    for r in 0..ROUNDS {
        let ts = base + chrono::Duration::seconds(r as i64);
        let mut body = String::new();
        for (i, id) in ids.iter().enumerate() {
            body.push_str(
                &json!({"twin_id": id, "ts": ts.to_rfc3339(), "properties": {
                "temperature": temperature(i, r), "vibration_level": 0.1 + (i % 10) as f64 * 0.05}})
                .to_string(),
            );
            body.push('\n');
        }
        let out = api
            .call(
                Method::POST,
                "/v1/ingest",
                Some(("application/x-ndjson", body.into_bytes())),
            )
            .await?;
        applied += out["applied"].as_u64().unwrap_or(0);
    }
    println!(
        "   {applied} durable updates in {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );

    // Give the behaviors and rules a moment to finish the last round.
    tokio::time::sleep(Duration::from_millis(500)).await;
    subscriber.abort();
    {
        let all = alerts.lock().expect("alerts");
        let from_behavior = all
            .iter()
            .filter(|e| e["data"]["source"] == "behavior")
            .count();
        let from_rule = all.iter().filter(|e| e["data"]["source"] == "rule").count();
        let machines: std::collections::BTreeSet<&str> =
            all.iter().filter_map(|e| e["twin_id"].as_str()).collect();
        println!("   {} alerts received live ({from_behavior} from the thermal-monitor behavior, {from_rule} from the rule) on {} twins",
            all.len(), machines.len());
    }
    let marked = api
        .json(
            Method::POST,
            "/v1/query",
            json!({"entity_type": "machine",
        "properties": {"overheated": true}, "limit": 1000}),
        )
        .await?;
    let b = api
        .call(Method::GET, &format!("/v1/twins/{building_id}"), None)
        .await?;
    println!(
        "   machines marked overheated by the behavior: {}; building heat_alarm: {}",
        marked["items"].as_array().map_or(0, Vec::len),
        b["properties"]["heat_alarm"]
    );
    let bh = api
        .call(Method::GET, "/v1/behaviors/overheat", None)
        .await
        .unwrap_or(Value::Null);
    if !bh.is_null() {
        println!("   behavior overheat: {} runs, {} alerts, {} patches, {} own changes not re-run, {} errors",
            bh["runs"], bh["alerts"], bh["patches"], bh["guarded"], bh["errors"]);
    }

    println!("== one machine goes into maintenance (PATCH with If-Match)");
    let m5 = api
        .call(Method::GET, &format!("/v1/twins/{}", ids[5]), None)
        .await?;
    let patched = api
        .http
        .patch(format!("{}/v1/twins/{}", api.url, ids[5]))
        .bearer_auth(&api.token)
        .header("if-match", format!("\"{}\"", m5["version"]))
        .json(&json!({"status": "maintenance"}))
        .send()
        .await?;
    println!(
        "   {} → version {}",
        patched.status(),
        patched.json::<Value>().await?["version"]
    );

    println!("== query: machines over 85 degrees");
    let hot = api
        .json(
            Method::POST,
            "/v1/query",
            json!({"entity_type": "machine",
        "where": [{"property": "temperature", "op": ">", "value": 85}], "limit": 1000}),
        )
        .await?;
    let items = hot["items"].as_array().cloned().unwrap_or_default();
    println!("   {} machines over 85:", items.len());
    for t in items.iter().take(10) {
        println!(
            "   ALERT: High temperature on {} ({}): {:.1} degF",
            t["properties"]["name"].as_str().unwrap_or("?"),
            t["id"].as_str().unwrap_or("?"),
            t["properties"]["temperature"].as_f64().unwrap_or(0.0)
        );
    }
    if items.len() > 10 {
        println!("   … and {} more", items.len() - 10);
    }
    let operational = api.json(Method::POST, "/v1/query", json!({"entity_type": "machine", "properties": {"status": "operational"}, "limit": 1000})).await?;
    println!(
        "   operational machines (the seed's query): {}",
        operational["items"].as_array().map_or(0, Vec::len)
    );

    let hottest = &ids[19];
    println!("== history of Machine-019 ({hottest})");
    let h = api
        .call(
            Method::GET,
            &format!("/v1/twins/{hottest}/history/temperature"),
            None,
        )
        .await?;
    let pts = h["points"].as_array().cloned().unwrap_or_default();
    println!(
        "   {} points, first {} last {}",
        pts.len(),
        pts.first().map_or(Value::Null, |p| p["value"].clone()),
        pts.last().map_or(Value::Null, |p| p["value"].clone())
    );
    let b = api
        .call(
            Method::GET,
            &format!("/v1/twins/{hottest}/history/temperature?step=5s"),
            None,
        )
        .await?;
    for bucket in b["buckets"].as_array().into_iter().flatten() {
        println!(
            "   {}  count {:>2}  min {:.1}  max {:.1}  avg {:.2}",
            bucket["ts"].as_str().unwrap_or(""),
            bucket["count"],
            bucket["min"].as_f64().unwrap_or(0.0),
            bucket["max"].as_f64().unwrap_or(0.0),
            bucket["avg"].as_f64().unwrap_or(0.0)
        );
    }

    let wasm_path = format!("{guests}/thermal_analysis.wasm");
    match std::fs::read(&wasm_path) {
        Err(e) => println!(
            "== (skipping the WebAssembly analysis: {wasm_path}: {e}; run scripts/build-guests.sh)"
        ),
        Ok(wasm) => {
            println!("== upload the thermal-analysis component (WebAssembly, compute world) and run it on the hot machines");
            let m = api
                .call(
                    Method::PUT,
                    "/v1/modules/thermal-analysis?timeout=1s",
                    Some(("application/wasm", wasm)),
                )
                .await?;
            println!(
                "   module {} version {} ({} bytes, sha256 {}…)",
                m["name"],
                m["version"],
                m["size"],
                &m["sha256"].as_str().unwrap_or("")[..12]
            );
            let out = api.json(Method::POST, "/v1/modules/thermal-analysis/invoke", json!({
                "query": {"entity_type": "machine", "where": [{"property": "temperature", "op": ">", "value": 85}], "limit": 5},
                "parameters": {"threshold": 85}})).await?;
            for (id, r) in out["results"].as_object().into_iter().flatten() {
                println!(
                    "   {}: mean {:.1} max {:.1}, {} reading(s) over 85",
                    names.get(id).unwrap_or(id),
                    r["mean"].as_f64().unwrap_or(0.0),
                    r["max"].as_f64().unwrap_or(0.0),
                    r["over_threshold"]
                );
            }
            let py_path = format!("{guests}/../../python/thermal_analysis_py.wasm");
            if let Ok(py) = std::fs::read(&py_path) {
                println!(
                    "== the same analysis written in Python (componentize-py, {} MB component)",
                    py.len() >> 20
                );
                let started = Instant::now();
                api.call(
                    Method::PUT,
                    "/v1/modules/thermal-analysis-py?timeout=1s",
                    Some(("application/wasm", py)),
                )
                .await?;
                println!(
                    "   uploaded and compiled in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                let py_out = api.json(Method::POST, "/v1/modules/thermal-analysis-py/invoke", json!({
                    "query": {"entity_type": "machine", "where": [{"property": "temperature", "op": ">", "value": 85}], "limit": 5},
                    "parameters": {"threshold": 85}})).await?;
                println!("   Python and Rust results identical: {}", py_out == out);
            }
        }
    }

    tokio::time::sleep(Duration::from_millis(10)).await;
    let m = api.call(Method::GET, "/v1/metrics", None).await?;
    println!("== metrics: {} twins, {} durable commits ({:.1} writes per commit, {:.2} ms per fsync), {} KiB of log",
        m["active_twins"], m["commits"], m["avg_jobs_per_commit"].as_f64().unwrap_or(0.0),
        m["avg_commit_ms"].as_f64().unwrap_or(0.0), m["log_bytes"].as_u64().unwrap_or(0) / 1024);
    Ok(())
}
