//! Workflows through the real server: dependency order and results flowing to dependents,
//! built-in aggregates, independent steps overlapping, failing and timing-out steps skipping
//! their dependents, retry, checks before anything runs (cycle → 409, unknown references or
//! modules → 422), cancel, a run caught by `kill -9`, the list and the `workflow.finished`
//! event.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::common::{guest, Server};

/// A building with machines at `temps`; returns (building, machines).
async fn plant(s: &Server, temps: &[f64]) -> (String, Vec<String>) {
    let b = s.create_twin_id(&json!({"entity_type": "building"})).await;
    let mut ms = Vec::new();
    for t in temps {
        ms.push(
            s.create_twin_id(&json!({"entity_type": "machine", "parent_id": b,
                                     "properties": {"temperature": t}}))
                .await,
        );
    }
    (b, ms)
}

async fn run_and_wait(s: &Server, spec: &Value) -> Value {
    let r = s.post("/v1/workflows?wait=true", spec).await;
    r.expect(200);
    r.body
}

fn at(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .unwrap_or_else(|| panic!("a timestamp: {v}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn steps_run_in_dependency_order_and_pass_their_results_on() {
    let s = Server::start();
    s.upload("thermal-analysis", &guest("thermal_analysis"), "")
        .await
        .expect(201);
    let (b, ms) = plant(&s, &[70.0, 80.0, 90.0]).await;
    let spec = json!({
        "steps": [
            {"id": "analyze", "type": "compute", "twin_ids": [ms[2]], "function": "thermal-analysis",
             "parameters": {"threshold": 85}},
            {"id": "collect", "type": "aggregate", "query": {"parent_id": b},
             "function": "collect_property", "parameters": {"property": "temperature"}},
            {"id": "avg", "type": "aggregate", "twin_ids": ms, "function": "avg",
             "parameters": {"property": "temperature", "group_by": "parent"}},
            {"id": "max", "type": "aggregate", "twin_ids": ms, "function": "max",
             "parameters": {"property": "temperature"}},
            {"id": "replicate", "type": "sync"}
        ],
        "dependencies": {"analyze": ["collect", "avg"], "replicate": ["analyze"]}
    });
    let run = run_and_wait(&s, &spec).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let steps = &run["steps"];
    for (id, t) in ms.iter().zip([70.0, 80.0, 90.0]) {
        assert_eq!(steps["collect"]["result"][id], t, "{run}");
    }
    assert_eq!(steps["avg"]["result"][&b], 80.0, "{run}");
    assert_eq!(steps["max"]["result"], 90.0, "{run}");
    // The compute step ran after both its dependencies, got their results, and answered:
    // thermal-analysis reads its twin (90) and its inputs (70, 80, 90 collected; 80 the
    // average) as readings.
    let analyze = &steps["analyze"];
    assert_eq!(analyze["result"][&ms[2]]["count"], 5, "{run}");
    assert_eq!(analyze["result"][&ms[2]]["over_threshold"], 2, "{run}");
    for dep in ["collect", "avg"] {
        assert!(
            at(&steps[dep]["finished_at"]) <= at(&analyze["started_at"]),
            "{dep} finished before analyze started: {run}"
        );
    }
    assert!(at(&analyze["finished_at"]) <= at(&steps["replicate"]["started_at"]));
    // A single node: the sync step succeeds at once and says why.
    assert!(
        steps["replicate"]["result"]["note"]
            .as_str()
            .is_some_and(|n| n.contains("no peer")),
        "{run}"
    );

    // Stored: the run reads back, and is listed; the log has its workflow.finished event.
    let id = run["id"].as_str().unwrap();
    let got = s.get(&format!("/v1/workflows/{id}")).await;
    got.expect(200);
    assert_eq!(got.body["steps"], run["steps"]);
    let list = s.get("/v1/workflows?status=succeeded").await.body;
    assert_eq!(list["items"][0]["id"], id, "{list}");
    let log = s.get("/v1/events/log?types=workflow.finished").await.body;
    assert_eq!(log["events"][0]["data"]["workflow_id"], id, "{log}");
    assert_eq!(log["events"][0]["data"]["status"], "succeeded", "{log}");
    s.get("/v1/workflows/nope").await.expect(404);

    // The CLI: run a spec file and wait, get, list, and a cancel of a finished run refused.
    let file = s.data_dir.join("wf.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    let out = s.cli(&["workflow", "run", file.to_str().unwrap(), "--wait"]);
    assert!(out.status.success(), "{out:?}");
    let ran: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ran["status"], "succeeded", "{ran}");
    let cli_id = ran["id"].as_str().unwrap();
    let out = s.cli(&["workflow", "get", cli_id]);
    assert!(out.status.success(), "{out:?}");
    let out = s.cli(&["workflow", "list", "--status", "succeeded"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["items"][0]["id"], cli_id, "newest first: {listed}");
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    let out = s.cli(&["workflow", "cancel", cli_id]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already finished"),
        "{out:?}"
    );
}

#[tokio::test]
async fn failures_and_timeouts_skip_dependents_while_independent_steps_overlap_and_retry() {
    let s = Server::start();
    s.upload("spin", &guest("hostile"), "?fuel=100000000000&timeout=30s")
        .await
        .expect(201);
    let (_, ms) = plant(&s, &[70.0]).await;
    let spin = |id: &str| {
        json!({"id": id, "type": "compute", "twin_ids": [ms[0]], "function": "spin",
               "parameters": {"mode": "loop"}, "timeout": "700ms"})
    };
    let spec = json!({
        "steps": [
            spin("spin_a"), spin("spin_b"),
            {"id": "after_a", "type": "aggregate", "twin_ids": ms, "function": "count"},
            {"id": "after_after_a", "type": "aggregate", "twin_ids": ms, "function": "count"},
            {"id": "panics", "type": "compute", "twin_ids": [ms[0]], "function": "spin",
             "parameters": {"mode": "panic"}, "retry": {"attempts": 3, "backoff": "10ms"}},
            {"id": "fine", "type": "aggregate", "twin_ids": ms, "function": "count"}
        ],
        "dependencies": {"after_a": ["spin_a"], "after_after_a": ["after_a"]}
    });
    let run = run_and_wait(&s, &spec).await;
    let steps = &run["steps"];
    assert_eq!(run["status"], "failed", "{run}");
    for id in ["spin_a", "spin_b"] {
        assert_eq!(steps[id]["status"], "failed", "{run}");
        assert!(
            steps[id]["error"]
                .as_str()
                .is_some_and(|e| e.contains("timed out")),
            "{run}"
        );
    }
    // Independent steps ran at once: each started before the other finished.
    assert!(at(&steps["spin_b"]["started_at"]) < at(&steps["spin_a"]["finished_at"]));
    assert!(at(&steps["spin_a"]["started_at"]) < at(&steps["spin_b"]["finished_at"]));
    for id in ["after_a", "after_after_a"] {
        assert_eq!(steps[id]["status"], "skipped", "{run}");
        assert!(steps[id].get("started_at").is_none(), "{run}");
    }
    assert_eq!(steps["panics"]["status"], "failed", "{run}");
    assert_eq!(steps["panics"]["attempts"], 3, "{run}");
    assert!(
        steps["panics"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("trap")),
        "{run}"
    );
    assert_eq!(steps["fine"]["status"], "succeeded", "{run}");
    assert_eq!(steps["fine"]["result"], 1, "{run}");
    assert!(
        run["error"].as_str().is_some_and(|e| e.contains("failed")),
        "{run}"
    );
}

#[tokio::test]
async fn bad_workflows_are_refused_before_anything_runs() {
    let s = Server::start();
    s.upload("max-resolver", &guest("max_resolver"), "")
        .await
        .expect(201);
    let count =
        |id: &str| json!({"id": id, "type": "aggregate", "twin_ids": [], "function": "count"});
    // A cycle: 409, naming it.
    let r = s
        .post(
            "/v1/workflows",
            &json!({"steps": [count("a"), count("b"), count("c"), count("d")],
                    "dependencies": {"b": ["a", "c"], "c": ["b"], "d": ["c"]}}),
        )
        .await;
    r.expect_error(409, "conflict");
    assert!(
        r.text.contains("b -> c -> b") || r.text.contains("c -> b -> c"),
        "{}",
        r.text
    );
    // Unknown references, functions and modules, a module of another world: 422, every
    // reason listed.
    let r = s
        .post(
            "/v1/workflows",
            &json!({"steps": [
                        count("a"),
                        {"id": "x", "type": "compute", "function": "nope"},
                        {"id": "y", "type": "compute", "function": "max-resolver"},
                        {"id": "z", "type": "aggregate", "twin_ids": [], "function": "median",
                         "parameters": {"property": "t"}}],
                    "dependencies": {"a": ["ghost"], "phantom": ["a"]}}),
        )
        .await;
    r.expect_error(422, "validation_failed");
    let reasons = r.body["error"]["details"]["reasons"].to_string();
    for needle in [
        "\\\"ghost\\\"",
        "\\\"phantom\\\"",
        "\\\"nope\\\"",
        "resolver module",
        "median",
    ] {
        assert!(reasons.contains(needle), "{needle} in {reasons}");
    }
    let r = s.post("/v1/workflows", &json!({"steps": []})).await;
    r.expect_error(422, "validation_failed");
    // Nothing ran.
    let list = s.get("/v1/workflows").await.body;
    assert_eq!(list["items"], json!([]), "{list}");
}

#[tokio::test]
async fn a_run_is_cancelled_and_a_run_caught_by_kill_9_reads_back_failed() {
    let mut s = Server::start();
    s.upload(
        "spin",
        &guest("hostile"),
        "?fuel=100000000000&timeout=200ms",
    )
    .await
    .expect(201);
    let (_, ms) = plant(&s, &[70.0]).await;
    // Fails its first attempt, then waits a minute before the next: in flight for long.
    let slow = json!({"steps": [
        {"id": "spin", "type": "compute", "twin_ids": [ms[0]], "function": "spin",
         "parameters": {"mode": "loop"}, "retry": {"attempts": 5, "backoff": "60s"}},
        {"id": "then", "type": "aggregate", "twin_ids": ms, "function": "count"}],
        "dependencies": {"then": ["spin"]}});
    let r = s.post("/v1/workflows", &slow).await;
    r.expect(202);
    assert_eq!(r.body["status"], "running");
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = s.get(&format!("/v1/workflows/{id}")).await;
    assert_eq!(r.body["status"], "running", "{}", r.text);
    let running = s.get("/v1/workflows?status=running").await.body;
    assert_eq!(running["items"][0]["id"], id.as_str(), "{running}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = s
        .post(&format!("/v1/workflows/{id}/cancel"), &json!({}))
        .await;
    r.expect(200);
    assert_eq!(r.body["status"], "cancelled", "{}", r.text);
    assert_eq!(r.body["steps"]["spin"]["status"], "cancelled", "{}", r.text);
    assert_eq!(r.body["steps"]["then"]["status"], "cancelled", "{}", r.text);
    // Once finished, a cancel is refused.
    s.post(&format!("/v1/workflows/{id}/cancel"), &json!({}))
        .await
        .expect_error(409, "conflict");

    // A run in flight when the server dies reads back as failed, with the reason.
    let r = s.post("/v1/workflows", &slow).await;
    r.expect(202);
    let id = r.body["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.kill9();
    s.restart();
    let r = s.get(&format!("/v1/workflows/{id}")).await;
    r.expect(200);
    assert_eq!(r.body["status"], "failed", "{}", r.text);
    assert!(
        r.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("stopped")),
        "{}",
        r.text
    );
    assert_eq!(r.body["steps"]["then"]["status"], "skipped", "{}", r.text);
    assert_eq!(r.body["steps"]["spin"]["status"], "failed", "{}", r.text);
}

/// Runs of the definition `name` in the list, newest first.
async fn runs_of(s: &Server, name: &str) -> Vec<Value> {
    let list = s.get("/v1/workflows?limit=1000").await.body;
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["definition"] == name)
        .cloned()
        .collect()
}

#[tokio::test]
async fn stored_definitions_start_by_name_from_a_rule_and_on_a_schedule() {
    let s = Server::start();
    let (_, ms) = plant(&s, &[70.0]).await;
    // A definition whose step runs on the twin the run was started for.
    let def = json!({"steps": [{"id": "temp", "type": "aggregate", "input_twin": true,
                                "function": "max", "parameters": {"property": "temperature"}}]});
    s.put("/v1/workflow-defs/check-hot", &def).await.expect(201);
    s.put("/v1/workflow-defs/check-hot", &def).await.expect(200);
    let got = s.get("/v1/workflow-defs/check-hot").await;
    got.expect(200);
    assert_eq!(
        got.body["definition"]["steps"][0]["id"], "temp",
        "{}",
        got.text
    );
    // Refused like runs: a bad schedule and an unknown function (422), a cycle (409).
    let r = s
        .put(
            "/v1/workflow-defs/bad",
            &json!({"steps": [{"id": "a", "type": "aggregate", "twin_ids": [], "function": "mode"}],
                    "every": "1ms"}),
        )
        .await;
    r.expect_error(422, "validation_failed");
    assert!(
        r.text.contains("every") && r.text.contains("mode"),
        "{}",
        r.text
    );
    let count =
        |id: &str| json!({"id": id, "type": "aggregate", "twin_ids": [], "function": "count"});
    s.put(
        "/v1/workflow-defs/loop",
        &json!({"steps": [count("a"), count("b")], "dependencies": {"a": ["b"], "b": ["a"]}}),
    )
    .await
    .expect_error(409, "conflict");

    // By name, with an input.
    let r = s
        .post(
            "/v1/workflow-defs/check-hot/run?wait=true",
            &json!({"input": {"twin_id": ms[0]}}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["definition"], "check-hot", "{}", r.text);
    assert_eq!(r.body["steps"]["temp"]["result"], 70.0, "{}", r.text);
    // Without the input its step fails, saying why.
    let r = s
        .post("/v1/workflow-defs/check-hot/run?wait=true", &json!({}))
        .await;
    assert_eq!(r.body["status"], "failed", "{}", r.text);
    assert!(r.text.contains("input.twin_id"), "{}", r.text);
    s.post("/v1/workflow-defs/ghost/run", &json!({}))
        .await
        .expect_error(404, "not_found");

    // A rule's workflow action starts it with the triggering twin; a rule naming a missing
    // definition counts the failure on the rule.
    s.put(
        "/v1/rules/hot",
        &json!({"kind": "threshold", "entity_type": "machine", "property": "temperature",
                "op": ">", "value": 85, "actions": [{"type": "workflow", "workflow": "check-hot"},
                                                    {"type": "workflow", "workflow": "ghost"}]}),
    )
    .await
    .expect(201);
    s.patch(&format!("/v1/twins/{}", ms[0]), &json!({"temperature": 95}))
        .await
        .expect(200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let run = loop {
        let runs = runs_of(&s, "check-hot").await;
        if let Some(r) = runs
            .first()
            .filter(|r| r["status"] == "succeeded" && runs.len() >= 3)
        {
            let id = r["id"].as_str().unwrap();
            break s.get(&format!("/v1/workflows/{id}")).await.body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no run from the rule: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(run["steps"]["temp"]["result"], 95.0, "{run}");
    assert_eq!(run["spec"]["input"]["rule"], "hot", "{run}");
    assert_eq!(run["spec"]["input"]["twin_id"], ms[0].as_str(), "{run}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rule = s.get("/v1/rules/hot").await.body;
        if rule.to_string().contains("ghost") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{rule}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A schedule: every second, until the definition is deleted.
    s.put(
        "/v1/workflow-defs/tick",
        &json!({"steps": [count("n")], "every": "1s"}),
    )
    .await
    .expect(201);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let runs = loop {
        let runs = runs_of(&s, "tick").await;
        if runs.len() >= 2 {
            break runs;
        }
        assert!(std::time::Instant::now() < deadline, "{runs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A second apart (the list is newest first).
    let gap = at(&runs[0]["created_at"]) - at(&runs[1]["created_at"]);
    assert!(
        gap.num_milliseconds() >= 900,
        "{gap:?} between scheduled runs"
    );
    s.delete("/v1/workflow-defs/tick").await.expect(204);
    let n = runs_of(&s, "tick").await.len();
    s.get("/v1/workflow-defs/tick").await.expect(404);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        runs_of(&s, "tick").await.len(),
        n,
        "no run after the delete"
    );
    let defs = s.get("/v1/workflow-defs").await.body;
    assert_eq!(defs["items"][0]["name"], "check-hot", "{defs}");
}
