//! Behaviors and resolvers through the real server: the thermal-monitor behavior alerts on
//! temperature > 85 and patches through the write path without re-triggering itself; a twin's
//! events run in log order; a failing or hanging behavior holds up no other; modules in use
//! refuse deletion; the max resolver merges in canonical order; the Python thermal-analysis
//! answers exactly as the Rust one; a trap in a turn of calls sharing an instance costs only
//! its own event.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{
    alerts_until, behavior_until, guest, guest_file, ids, twin_until, Body, Server,
};

#[tokio::test]
async fn thermal_monitor_alerts_patches_and_does_not_retrigger_itself() {
    let s = Server::start();
    let r = s
        .upload("thermal-monitor", &guest("thermal_monitor"), "")
        .await;
    r.expect(201);
    assert_eq!(r.body["world"], "behavior");
    s.put(
        "/v1/behaviors/overheat",
        &json!({"module": "thermal-monitor", "entity_type": "machine"}),
    )
    .await
    .expect(201);
    let hot = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 70}}))
        .await;
    let sensor = s
        .create_twin_id(&json!({"entity_type": "sensor", "properties": {"temperature": 99}}))
        .await;
    s.patch(&format!("/v1/twins/{hot}"), &json!({"temperature": 91.5}))
        .await
        .expect(200);
    let alerts = alerts_until(&s, &hot, |a| !a.is_empty()).await;
    let a = &alerts[0];
    assert_eq!(a["data"]["behavior"], "overheat");
    assert_eq!(a["data"]["severity"], "critical");
    assert_eq!(a["data"]["data"]["temperature"], 91.5);
    assert_eq!(a["cause"]["by"], "behavior:overheat");
    let t = twin_until(&s, &hot, |t| t["properties"]["overheated"] == true).await;
    assert_eq!(t["version"], 3, "one patch by the behavior: {t}");
    // Hotter again: a second alert, but no second patch (the mark is already set).
    s.patch(&format!("/v1/twins/{hot}"), &json!({"temperature": 95}))
        .await
        .expect(200);
    alerts_until(&s, &hot, |a| a.len() == 2).await;
    // Cooled down: the mark is cleared.
    s.patch(&format!("/v1/twins/{hot}"), &json!({"temperature": 60}))
        .await
        .expect(200);
    let t = twin_until(&s, &hot, |t| t["properties"]["overheated"] == false).await;
    // 1 create + 3 client patches + 2 behavior patches.
    assert_eq!(t["version"], 6, "{t}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let b = loop {
        let b = s.get("/v1/behaviors/overheat").await.body;
        // The patches are counted once their commit returns, which may be after the events
        // of the patches (and so the guard) were seen: wait for both.
        if (b["guarded"] == 2 && b["patches"] == 2) || Instant::now() > deadline {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The behavior's own two patches were guarded, never run.
    assert_eq!(b["guarded"], 2, "{b}");
    assert_eq!(b["runs"], 4, "{b}");
    assert_eq!(b["alerts"], 2, "{b}");
    assert_eq!(b["patches"], 2, "{b}");
    assert_eq!(b["errors"], 0, "{b}");
    // The sensor is not a machine: no alert, no mark.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = s.get(&format!("/v1/twins/{sensor}")).await.body;
    assert!(t["properties"].get("overheated").is_none(), "{t}");
    assert_eq!(
        s.get(&format!("/v1/events/log?types=alert&twin_id={sensor}"))
            .await
            .body["events"],
        json!([])
    );
    // Listed, and it survives a restart (the module loads from the artifact cache).
    let list = s.get("/v1/behaviors").await.body;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let mut s = s;
    s.stop().expect("clean stop");
    s.restart();
    s.patch(&format!("/v1/twins/{hot}"), &json!({"temperature": 99}))
        .await
        .expect(200);
    alerts_until(&s, &hot, |a| a.len() == 3).await;
}

/// A twin's events run through a behavior one at a time, in log order: a burst of
/// alternating hot/cold readings on 20 machines gives exactly one mark/clear patch per
/// reading and ends with every machine cleared. (Run concurrently, two calls of one twin see
/// the same `overheated` and patches are lost or doubled.)
#[tokio::test]
async fn a_twins_events_run_in_log_order() {
    let s = Server::start();
    s.upload("thermal-monitor", &guest("thermal_monitor"), "")
        .await
        .expect(201);
    s.put(
        "/v1/behaviors/overheat",
        &json!({"module": "thermal-monitor", "entity_type": "machine"}),
    )
    .await
    .expect(201);
    const TWINS: usize = 20;
    const ROUNDS: usize = 40;
    let mut ids = Vec::new();
    for _ in 0..TWINS {
        ids.push(
            s.create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 70}}))
                .await,
        );
    }
    let mut batch = Vec::new();
    // Each twin's readings back to back: concurrent calls would get the same twin.
    for id in &ids {
        for round in 0..ROUNDS {
            let t = if round % 2 == 0 { 90 } else { 70 };
            batch.push(json!({"twin_id": id, "properties": {"temperature": t}}));
        }
    }
    let r = s.post("/v1/ingest", &json!(batch)).await;
    r.expect(200);
    assert_eq!(r.body["applied"], TWINS * ROUNDS, "{}", r.text);
    let runs = (TWINS + TWINS * ROUNDS) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let b = loop {
        let b = s.get("/v1/behaviors/overheat").await.body;
        let done =
            b["runs"].as_u64() == Some(runs) && b["guarded"].as_u64() == b["patches"].as_u64();
        if done || Instant::now() > deadline {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // One patch per reading: mark on every hot one, clear on every cold one.
    let patches = (TWINS * ROUNDS) as u64;
    assert_eq!(b["runs"], runs, "{b}");
    assert_eq!(b["patches"], patches, "{b}");
    assert_eq!(b["guarded"], patches, "{b}");
    assert_eq!(b["alerts"], patches / 2, "{b}");
    assert_eq!(b["errors"], 0, "{b}");
    assert_eq!(b["dropped"], 0, "{b}");
    for id in &ids {
        let t = s.get(&format!("/v1/twins/{id}")).await.body;
        assert_eq!(t["properties"]["temperature"], 70, "{t}");
        assert_eq!(t["properties"]["overheated"], false, "{t}");
    }
}

/// A bulk ingest publishes its events all at once, more than the live buffer holds: rules and
/// behaviors catch up from the log and see every one of them.
#[tokio::test]
async fn a_bulk_ingest_reaches_every_rule_and_behavior() {
    let s = Server::start();
    s.upload("thermal-monitor", &guest("thermal_monitor"), "")
        .await
        .expect(201);
    let valve = s
        .create_twin_id(
            &json!({"entity_type": "valve", "properties": {"hot": 0, "temperature": 50}}),
        )
        .await;
    let other = s
        .create_twin_id(&json!({"entity_type": "pump", "properties": {"n": 0}}))
        .await;
    s.put(
        "/v1/rules/valve-hot",
        &json!({"kind": "threshold", "entity_type": "valve", "property": "hot", "op": ">",
                "value": 0.5, "actions": [{"type": "alert", "severity": "warning"}]}),
    )
    .await
    .expect(201);
    s.put(
        "/v1/behaviors/valve-temp",
        &json!({"module": "thermal-monitor", "twin_id": valve}),
    )
    .await
    .expect(201);
    // 20,000 updates; every 250th is the valve's, alternating cold and hot: 80 valve events,
    // 40 of them rising edges / over 85 degrees.
    const ITEMS: usize = 20_000;
    const EVERY: usize = 250;
    let batch: Vec<Value> = (0..ITEMS)
        .map(|i| {
            if i % EVERY == 0 {
                let hot = (i / EVERY) % 2;
                let t = if hot == 1 { 90 } else { 50 };
                json!({"twin_id": valve, "properties": {"hot": hot, "temperature": t}})
            } else {
                json!({"twin_id": other, "properties": {"n": i}})
            }
        })
        .collect();
    let r = s.post("/v1/ingest", &json!(batch)).await;
    r.expect(200);
    assert_eq!(r.body["applied"], ITEMS, "{}", r.text);
    let valve_events = (ITEMS / EVERY) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (rule, behavior) = loop {
        let rule = s.get("/v1/rules/valve-hot").await.body;
        let behavior = s.get("/v1/behaviors/valve-temp").await.body;
        let done = rule["stats"]["fired"].as_u64() >= Some(valve_events / 2)
            && behavior["runs"].as_u64() >= Some(valve_events);
        if done || Instant::now() > deadline {
            break (rule, behavior);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rule["stats"]["fired"], valve_events / 2, "{rule}");
    assert_eq!(behavior["runs"], valve_events, "{behavior}");
    assert_eq!(behavior["alerts"], valve_events / 2, "{behavior}");
    assert_eq!(behavior["dropped"], 0, "{behavior}");
    let m = s.get("/v1/metrics").await.body;
    assert_eq!(m["rules_events_missed"], 0, "{m}");
    assert_eq!(m["behaviors_events_missed"], 0, "{m}");
}

#[tokio::test]
async fn behavior_validation_failures_and_module_deletion() {
    let s = Server::start();
    s.upload("thermal-monitor", &guest("thermal_monitor"), "")
        .await
        .expect(201);
    s.upload("thermal-analysis", &guest("thermal_analysis"), "")
        .await
        .expect(201);
    let cases = [
        json!({"module": "thermal-analysis", "entity_type": "machine"}), // a compute module
        json!({"module": "missing", "entity_type": "machine"}),
        json!({"module": "thermal-monitor"}),
        json!({"module": "thermal-monitor", "entity_type": "machine", "twin_id": "0192e5f0-0000-7000-8000-000000000000"}),
        json!({"module": "thermal-monitor", "twin_id": "0192e5f0-0000-7000-8000-000000000000"}), // no such twin
    ];
    for body in cases {
        s.put("/v1/behaviors/b", &body)
            .await
            .expect_error(422, "validation_failed");
    }
    s.put(
        "/v1/behaviors/b",
        &json!({"module": "thermal-monitor", "entity_type": "machine", "extra": 1}),
    )
    .await
    .expect_error(400, "bad_request");
    // A module in use is not deleted without force.
    s.put(
        "/v1/behaviors/b",
        &json!({"module": "thermal-monitor", "entity_type": "machine"}),
    )
    .await
    .expect(201);
    let r = s.delete("/v1/modules/thermal-monitor").await;
    r.expect_error(409, "conflict");
    assert!(r.text.contains("behavior \\\"b\\\""), "{}", r.text);
    // Nor swapped for a component of another world, by upload or rollback, without force.
    let r = s
        .upload("thermal-monitor", &guest("thermal_analysis"), "")
        .await;
    r.expect_error(409, "conflict");
    assert!(r.text.contains("behavior module in use"), "{}", r.text);
    let m = s.get("/v1/modules/thermal-monitor").await.body;
    assert_eq!(m["active"], 1, "still the behavior version: {m}");
    // The same world is a hot swap, in use or not.
    s.upload("thermal-monitor", &guest("thermal_monitor"), "")
        .await
        .expect(201);
    // Another world with force (version 3), then rollback to the behavior version is fine,
    // and back to the compute one is refused.
    let r = s
        .call(
            Method::PUT,
            "/v1/modules/thermal-monitor?force=true",
            Body::Raw(&guest("thermal_analysis"), "application/wasm"),
        )
        .await;
    r.expect(201);
    assert_eq!(r.body["world"], "compute");
    s.post(
        "/v1/modules/thermal-monitor/rollback",
        &json!({"version": 2}),
    )
    .await
    .expect(200);
    s.post(
        "/v1/modules/thermal-monitor/rollback",
        &json!({"version": 3}),
    )
    .await
    .expect_error(409, "conflict");
    let r = s
        .post(
            "/v1/modules/thermal-monitor/rollback",
            &json!({"version": 9}),
        )
        .await;
    r.expect_error(404, "not_found");
    assert!(r.text.contains("has no version 9"), "{}", r.text);
    // A second behavior keeps working while the first one's module is force-deleted.
    s.upload("thermal-monitor-2", &guest("thermal_monitor"), "")
        .await
        .expect(201);
    s.put(
        "/v1/behaviors/good",
        &json!({"module": "thermal-monitor-2", "entity_type": "machine"}),
    )
    .await
    .expect(201);
    s.delete("/v1/modules/thermal-monitor?force=true")
        .await
        .expect(204);
    let m = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 20}}))
        .await;
    s.patch(&format!("/v1/twins/{m}"), &json!({"temperature": 90}))
        .await
        .expect(200);
    let alerts = alerts_until(&s, &m, |a| !a.is_empty()).await;
    assert_eq!(alerts[0]["data"]["behavior"], "good");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = s.get("/v1/behaviors/b").await.body;
        if b["errors"].as_u64().unwrap_or(0) >= 2 {
            assert!(
                b["last_error"].as_str().unwrap_or("").contains("not found"),
                "{b}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "failing behavior not counted: {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.delete("/v1/behaviors/b").await.expect(204);
    s.delete("/v1/behaviors/b").await.expect(404);
    assert!(s.get("/healthz").await.status == 200);
}

/// A behavior that hangs on every event backs up only its own queue: another behavior on the
/// same twins keeps up, and the hanging one's failures are counted.
#[tokio::test]
async fn a_hanging_behavior_holds_up_no_other() {
    let s = Server::start();
    s.call(
        Method::PUT,
        "/v1/modules/stuck?fuel=100000000000&timeout=500ms",
        Body::Raw(&guest("stuck_behavior"), "application/wasm"),
    )
    .await
    .expect(201);
    s.upload("thermal-monitor", &guest("thermal_monitor"), "")
        .await
        .expect(201);
    for (name, module) in [("stuck", "stuck"), ("overheat", "thermal-monitor")] {
        s.put(
            &format!("/v1/behaviors/{name}"),
            &json!({"module": module, "entity_type": "machine"}),
        )
        .await
        .expect(201);
    }
    let m = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 20}}))
        .await;
    for t in 0..10 {
        s.patch(&format!("/v1/twins/{m}"), &json!({"temperature": 90 + t}))
            .await
            .expect(200);
    }
    alerts_until(&s, &m, |a| a.len() == 10).await;
    // Each stuck call takes 500 ms and it may run 2 at once: when thermal-monitor is done
    // with all 10 hot readings, the stuck behavior is still working through its queue.
    let stuck = s.get("/v1/behaviors/stuck").await.body;
    assert!(
        stuck["runs"].as_u64().unwrap() < 8,
        "thermal-monitor waited for the stuck behavior: {stuck}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stuck = s.get("/v1/behaviors/stuck").await.body;
        if stuck["errors"].as_u64().unwrap_or(0) >= 3 {
            assert!(
                stuck["last_error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("deadline_exceeded"),
                "{stuck}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stuck calls not counted: {stuck}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.get("/v1/behaviors/overheat").await.body["errors"], 0);
}

#[tokio::test]
async fn max_resolver_merges_in_canonical_order() {
    let s = Server::start();
    let r = s.upload("max", &guest("max_resolver"), "").await;
    r.expect(201);
    assert_eq!(r.body["world"], "resolver");
    let a = json!({"value": 7.5, "hlc": 100, "origin": "edge-1"});
    let b = json!({"value": 3, "hlc": 200, "origin": "cloud"});
    for (x, y) in [(&a, &b), (&b, &a)] {
        let r = s
            .post(
                "/v1/modules/max/invoke",
                &json!({"resolve": {"property": "temperature", "a": x, "b": y}}),
            )
            .await;
        r.expect(200);
        assert_eq!(r.body["result"], 7.5, "{}", r.body);
    }
    // Non-numbers: the later write (higher clock) wins, whichever order they are given in.
    let a = json!({"value": "idle", "hlc": 100, "origin": "edge-1"});
    let b = json!({"value": "running", "hlc": 200, "origin": "cloud"});
    for (x, y) in [(&a, &b), (&b, &a)] {
        let r = s
            .post(
                "/v1/modules/max/invoke",
                &json!({"resolve": {"property": "mode", "a": x, "b": y}}),
            )
            .await;
        assert_eq!(r.body["result"], "running", "{}", r.body);
    }
    // A resolver is not a compute function.
    let t = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {}}))
        .await;
    let r = s
        .post("/v1/modules/max/invoke", &json!({"twin_ids": [t]}))
        .await;
    r.expect_error(422, "validation_failed");
    assert!(r.text.contains("is a resolver module"), "{}", r.text);
}

#[tokio::test]
async fn python_thermal_analysis_answers_like_the_rust_one() {
    let s = Server::start();
    s.upload("ta-rs", &guest("thermal_analysis"), "")
        .await
        .expect(201);
    let started = Instant::now();
    let r = s
        .upload("ta-py", &guest_file("python/thermal_analysis_py.wasm"), "")
        .await;
    r.expect(201);
    assert_eq!(r.body["world"], "compute");
    eprintln!(
        "Python component ({} bytes) compiled in {:?}",
        r.body["size"],
        started.elapsed()
    );
    let twins = [
        json!({"temperature": 90, "temperatures": [70, 71, 72]}),
        json!({"temperature": 20.25, "temperatures": [20, 21, 19.5, 80, 20, 20.5, 21, 19]}),
        json!({"temperatures": [1, "x", true, null, 1e3]}),
        json!({"pressure": 1}),
    ];
    let mut ids = Vec::new();
    for p in twins {
        ids.push(
            s.create_twin_id(&json!({"entity_type": "machine", "properties": p}))
                .await,
        );
    }
    for params in [json!({}), json!({"z": 1.5, "threshold": 60})] {
        let body = json!({"twin_ids": ids, "parameters": params});
        let rs = s.post("/v1/modules/ta-rs/invoke", &body).await;
        let py = s.post("/v1/modules/ta-py/invoke", &body).await;
        rs.expect(200);
        py.expect(200);
        assert_eq!(rs.body, py.body, "Rust and Python differ for {params}");
        assert!(
            rs.body["results"][&ids[0]]["mean"].is_number(),
            "{}",
            rs.body
        );
        assert_eq!(
            rs.body["results"][&ids[3]]["error"]["code"], "guest_error",
            "{}",
            rs.body
        );
    }
}

#[tokio::test]
async fn cli_behavior_rule_and_events_tail() {
    let s = Server::start();
    let wasm = format!(
        "{}/../guests/target/wasm32-wasip2/release/thermal_monitor.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    crate::common::cli_ok(&s.cli(&["module", "put", "thermal-monitor", &wasm]));
    let b = crate::common::cli_json(&s.cli(&[
        "behavior",
        "put",
        "overheat",
        "--module",
        "thermal-monitor",
        "--entity-type",
        "machine",
    ]));
    assert_eq!(b["module"], "thermal-monitor");
    let rule = s.tmp_dir().join("rule.json");
    std::fs::write(
        &rule,
        json!({"kind": "threshold", "property": "temperature", "op": ">", "value": 85,
               "actions": [{"type": "alert", "message": "from the rule"}]})
        .to_string(),
    )
    .unwrap();
    crate::common::cli_ok(&s.cli(&["rule", "put", "hot", rule.to_str().unwrap()]));
    let rules = crate::common::cli_json(&s.cli(&["rule", "list"]));
    assert_eq!(rules[0]["name"], "hot");
    let bad = s.tmp_dir().join("bad.json");
    std::fs::write(&bad, r#"{"kind": "threshold"}"#).unwrap();
    let out = s.cli(&["rule", "put", "bad", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("422"));

    // `events tail` prints alerts as they come: one from the rule, one from the behavior.
    let tail = s.cli_spawn(&["events", "tail", "--type", "alert", "--count", "2"]);
    // Wait until the subscription is open before changing anything.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.get("/v1/metrics").await.body["active_subscriptions"]
        .as_u64()
        .unwrap_or(0)
        < 1
    {
        assert!(Instant::now() < deadline, "events tail never subscribed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 99}}))
        .await;
    let out = tokio::task::spawn_blocking(move || tail.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines
        .iter()
        .all(|e| e["type"] == "alert" && e["twin_id"] == m.as_str()));
    let mut sources: Vec<&str> = lines
        .iter()
        .map(|e| e["data"]["source"].as_str().unwrap())
        .collect();
    sources.sort();
    assert_eq!(sources, ["behavior", "rule"]);
}

/// Through the real server, a behavior's calls share an instance within a turn and a trap in
/// one call costs only that event: 400 probes updated in one ingest, every tenth update
/// asking the guest to panic, give 360 answers and 40 errors (an instance reused after its
/// trap would refuse every later call of the turn), and some answers come from an instance
/// that had already handled earlier events of its turn.
#[tokio::test]
async fn a_trap_in_a_turn_costs_only_its_own_event() {
    let s = Server::start();
    s.upload("turn", &guest("turn_behavior"), "")
        .await
        .expect(201);
    s.put(
        "/v1/behaviors/probe",
        &json!({"module": "turn", "entity_type": "probe"}),
    )
    .await
    .expect(201);
    const PROBES: usize = 400;
    let items: Vec<Value> = (0..PROBES)
        .map(|i| json!({"entity_type": "probe", "properties": {"n": i}}))
        .collect();
    s.post("/v1/twins/bulk", &json!(items)).await.expect(200);
    let r = s
        .post("/v1/query", &json!({"entity_type": "probe", "limit": 1000}))
        .await;
    r.expect(200);
    let probes = ids(&r.body["items"]);
    assert_eq!(probes.len(), PROBES, "{}", r.text);
    // The creations ran the behavior too: wait for them before the burst.
    let runs = |b: &Value| b["runs"].as_u64().unwrap_or(0) as usize;
    behavior_until(&s, "probe", |b| runs(b) >= PROBES).await;
    // The burst's events come after this number.
    let start = s.get("/v1/events/log?limit=1").await.body["next_seq"]
        .as_u64()
        .expect("the log tells its next number");
    let batch: Vec<Value> = probes
        .iter()
        .enumerate()
        .map(|(i, id)| {
            if i % 10 == 0 {
                json!({"twin_id": id, "properties": {"panic": true}})
            } else {
                json!({"twin_id": id, "properties": {"n": i + 1}})
            }
        })
        .collect();
    s.post("/v1/ingest", &json!(batch)).await.expect(200);
    let b = behavior_until(&s, "probe", |b| runs(b) >= 2 * PROBES).await;
    assert_eq!(runs(&b), 2 * PROBES, "{b}");
    assert_eq!(b["errors"], PROBES / 10, "{b}");
    assert_eq!(b["alerts"], 2 * PROBES - PROBES / 10, "{b}");
    assert_eq!(b["dropped"], 0, "{b}");
    assert!(
        b["last_error"].as_str().unwrap_or("").contains("trap"),
        "{b}"
    );
    // The burst's answers: how many events each one's instance had handled.
    let expected = PROBES - PROBES / 10;
    let mut seen = Vec::new();
    let mut after = start;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < expected && Instant::now() < deadline {
        let page = s
            .get(&format!(
                "/v1/events/log?types=alert&after={after}&limit=1000"
            ))
            .await
            .body;
        for e in page["events"].as_array().into_iter().flatten() {
            if e["data"]["trigger_seq"].as_u64() >= Some(start) {
                seen.push(e["data"]["data"]["seen"].as_u64().unwrap_or(0));
            }
        }
        let next = page["next_after"]
            .as_u64()
            .expect("a page tells where to go on");
        if next == after {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        after = next;
    }
    assert_eq!(seen.len(), PROBES - PROBES / 10, "{seen:?}");
    assert!(seen.iter().all(|&n| n >= 1), "{seen:?}");
    assert!(
        seen.iter().any(|&n| n > 1),
        "no call shared its instance with an earlier one of its turn: {seen:?}"
    );
}
