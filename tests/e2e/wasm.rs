//! WebAssembly compute modules through the real server: upload, validation, invoke,
//! versions and rollback, restart from cached artifacts, and hostile guests that fail only
//! their own call while good calls keep succeeding.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{good_calls, guest, Body, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_invoke_version_rollback_and_restart_without_recompiling() {
    let mut s = Server::start();
    let wasm = guest("thermal_analysis");
    let r = s.upload("thermal-analysis", &wasm, "").await;
    r.expect(201);
    assert_eq!(r.body["name"], "thermal-analysis");
    assert_eq!(r.body["version"], 1);
    assert_eq!(r.body["world"], "compute");
    assert_eq!(r.body["size"], wasm.len());
    assert_eq!(r.body["sha256"].as_str().unwrap().len(), 64);

    let hot = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 91, "temperatures": [70, 71, 72, 99]}}))
        .await;
    let cool = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 70}}))
        .await;
    let bare = s.create_twin_id(&json!({"entity_type": "machine"})).await;
    let r = s
        .post(
            "/v1/modules/thermal-analysis/invoke",
            &json!({"twin_ids": [hot, cool, bare], "parameters": {"threshold": 85}}),
        )
        .await;
    r.expect(200);
    let res = &r.body["results"];
    assert_eq!(res[&hot]["count"], 5);
    assert_eq!(res[&hot]["max"], 99.0);
    assert_eq!(res[&hot]["mean"], 80.6);
    assert_eq!(res[&hot]["over_threshold"], 2);
    assert_eq!(res[&cool]["count"], 1);
    assert_eq!(res[&cool]["anomalies"], json!([]));
    // A twin without readings gets its own error; the others are unaffected.
    assert_eq!(res[&bare]["error"]["code"], "guest_error", "{res}");

    // By query instead of ids.
    let r = s
        .post(
            "/v1/modules/thermal-analysis/invoke",
            &json!({"query": {"entity_type": "machine", "where": [{"property": "temperature", "op": ">", "value": 85}]}}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["results"].as_object().unwrap().len(), 1);

    // A second version, then rollback to the first.
    let r = s
        .upload(
            "thermal-analysis",
            &guest("hostile"),
            "?fuel=5000000&timeout=500ms&memory_mb=16",
        )
        .await;
    r.expect(201);
    assert_eq!(r.body["version"], 2);
    assert_eq!(r.body["limits"]["timeout_ms"], 500);
    let r = s
        .post(
            "/v1/modules/thermal-analysis/invoke",
            &json!({"twin_ids": [cool]}),
        )
        .await;
    assert_eq!(
        r.body["results"][&cool],
        json!({"ok": true}),
        "version 2 answers"
    );
    let r = s
        .post(
            "/v1/modules/thermal-analysis/rollback",
            &json!({"version": 1}),
        )
        .await;
    r.expect(200);
    let r = s
        .post(
            "/v1/modules/thermal-analysis/invoke",
            &json!({"twin_ids": [cool]}),
        )
        .await;
    assert_eq!(
        r.body["results"][&cool]["count"], 1,
        "version 1 answers again"
    );
    let m = s.get("/v1/modules/thermal-analysis").await;
    m.expect(200);
    assert_eq!(m.body["active"], 1);
    assert_eq!(m.body["versions"].as_array().unwrap().len(), 2);
    assert!(m.body["calls"].as_u64().unwrap() >= 5, "{}", m.body);
    assert!(m.body["errors"].as_u64().unwrap() >= 1, "{}", m.body);
    s.post(
        "/v1/modules/thermal-analysis/rollback",
        &json!({"version": 9}),
    )
    .await
    .expect_error(404, "not_found");

    // Restart: modules come back from cached artifacts, with no compilation.
    s.stop().expect("clean stop");
    s.restart();
    let r = s
        .post(
            "/v1/modules/thermal-analysis/invoke",
            &json!({"twin_ids": [hot]}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["results"][&hot]["max"], 99.0);
    let metrics = s.get("/v1/metrics").await.body;
    assert_eq!(metrics["modules_compiled"], 0, "{metrics}");
    assert_eq!(metrics["modules_loaded_from_cache"], 1, "{metrics}");
    assert_eq!(metrics["compute_operations"], 1, "{metrics}");

    s.delete("/v1/modules/thermal-analysis").await;
    s.get("/v1/modules/thermal-analysis")
        .await
        .expect_error(404, "not_found");
}

#[tokio::test]
async fn bad_uploads_are_422_with_the_reason() {
    let s = Server::start();
    let r = s.upload("x", b"definitely not wasm", "").await;
    r.expect_error(422, "validation_failed");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not a WebAssembly binary"));
    let core = b"\0asm\x01\0\0\0";
    let r = s.upload("x", core, "").await;
    r.expect_error(422, "validation_failed");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("core WebAssembly module"));
    // A component header with a broken body.
    let r = s.upload("x", b"\0asm\x0d\0\x01\0garbage", "").await;
    r.expect_error(422, "validation_failed");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not a valid component"));
    // Over the 32 MiB upload limit: a JSON 413 like every other error.
    let r = s.upload("x", &vec![0u8; (32 << 20) + 1], "").await;
    r.expect_error(413, "payload_too_large");
    // A valid component, but of a world this host does not run.
    let r = s.upload("x", &guest("other_world"), "").await;
    r.expect_error(422, "validation_failed");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("matches no world") && msg.contains("greet"),
        "{msg}"
    );
    let r = s.upload("x", &guest("thermal_analysis"), "?fuel=0").await;
    r.expect_error(422, "validation_failed");
    s.upload("x", &guest("thermal_analysis"), "?timeout=soon")
        .await
        .expect_error(400, "bad_request");
    s.upload("bad name!", &guest("thermal_analysis"), "")
        .await
        .expect_error(422, "validation_failed");
    s.get("/v1/modules/x").await.expect_error(404, "not_found");
    s.post("/v1/modules/x/invoke", &json!({"twin_ids": []}))
        .await
        .expect_error(404, "not_found");
    // Invoking a module of another world is the request's error, not each twin's.
    s.upload("mon", &guest("thermal_monitor"), "")
        .await
        .expect(201);
    let r = s
        .post("/v1/modules/mon/invoke", &json!({"twin_ids": []}))
        .await;
    r.expect_error(422, "validation_failed");
    assert!(r.text.contains("is a behavior module"), "{}", r.text);
    let side = json!({"value": 1, "hlc": 1, "origin": "a"});
    s.post(
        "/v1/modules/mon/invoke",
        &json!({"resolve": {"property": "p", "a": side, "b": side}}),
    )
    .await
    .expect_error(422, "validation_failed");
    // Modules need the admin role.
    let write = s.create_token("write").await;
    let r = s
        .send(
            Method::PUT,
            "/v1/modules/y",
            Some(&write),
            Body::Raw(&guest("hostile"), "application/wasm"),
            &[],
        )
        .await;
    r.expect_error(403, "forbidden");
}

/// Each hostile mode fails only its own call, with its own error code and within its
/// deadline, while a stream of good calls keeps succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_guests_fail_alone_within_their_limits() {
    let s = Server::start();
    s.upload(
        "hostile",
        &guest("hostile"),
        "?fuel=200000000&timeout=1s&memory_mb=32",
    )
    .await
    .expect(201);
    s.upload("good", &guest("thermal_analysis"), "")
        .await
        .expect(201);
    let twin = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 80}}))
        .await;

    // Good calls in the background for the whole test.
    let (stop, good) = good_calls(&s, &twin);

    let cases = [
        ("loop", "fuel_exhausted"),
        ("alloc", "out_of_memory"),
        ("recurse", "stack_overflow"),
        ("panic", "trap"),
        ("huge", "output_too_large"),
        ("garbage", "bad_output"),
        ("spam", "host_call_limit"),
    ];
    for (mode, want) in cases {
        let started = Instant::now();
        let r = s
            .post(
                "/v1/modules/hostile/invoke",
                &json!({"twin_ids": [twin], "parameters": {"mode": mode}}),
            )
            .await;
        r.expect(200);
        let err = &r.body["results"][&twin]["error"];
        let code = err["code"]
            .as_str()
            .unwrap_or_else(|| panic!("{mode}: no error in {}", r.body));
        assert_eq!(code, want, "{mode}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{mode} took {:?}",
            started.elapsed()
        );
    }
    // WASI's clock gives a guest nothing: it stands still at the epoch (time is `now-ms`).
    let r = s
        .post(
            "/v1/modules/hostile/invoke",
            &json!({"twin_ids": [twin], "parameters": {"mode": "clock"}}),
        )
        .await;
    assert_eq!(r.body["results"][&twin], 0, "{}", r.body);
    // An infinite loop with plenty of fuel is stopped by the wall-clock deadline.
    s.upload(
        "spinner",
        &guest("hostile"),
        "?fuel=100000000000&timeout=300ms",
    )
    .await
    .expect(201);
    let started = Instant::now();
    let r = s
        .post(
            "/v1/modules/spinner/invoke",
            &json!({"twin_ids": [twin], "parameters": {"mode": "loop"}}),
        )
        .await;
    assert_eq!(
        r.body["results"][&twin]["error"]["code"], "deadline_exceeded",
        "{}",
        r.body
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "deadline took {:?}",
        started.elapsed()
    );

    // A client that gives up stops the rest of its request: 10 twins of 300 ms each, the
    // client leaves after 700 ms, and the calls stop within one more.
    let mut many = Vec::new();
    for _ in 0..10 {
        many.push(
            s.create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 1}}))
                .await,
        );
    }
    let calls = |v: &Value| v["calls"].as_u64().unwrap();
    let before = calls(&s.get("/v1/modules/spinner").await.body);
    let body = json!({"twin_ids": many, "parameters": {"mode": "loop"}});
    let r = s
        .try_send(
            Method::POST,
            "/v1/modules/spinner/invoke",
            Some(&s.token),
            Body::Json(&body),
            &[],
            Duration::from_millis(700),
        )
        .await;
    assert!(r.is_err(), "the client timed out");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let after = calls(&s.get("/v1/modules/spinner").await.body);
    assert!(
        after - before <= 4,
        "{} calls after the client left at 700 ms (10 without the stop)",
        after - before
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ok = good.await.unwrap();
    assert!(ok > 0, "no good call completed while hostile guests ran");
    s.get("/healthz").await.expect(200);
    let h = s.get("/v1/modules/hostile").await;
    assert_eq!(h.body["errors"], 7, "{}", h.body);
}

#[tokio::test]
async fn cli_module_put_list_rollback_and_invoke() {
    let s = Server::start();
    let path = format!(
        "{}/../guests/target/wasm32-wasip2/release/thermal_analysis.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    guest("thermal_analysis");
    let v = crate::common::cli_json(&s.cli(&[
        "module",
        "put",
        "ta",
        &path,
        "--timeout",
        "1s",
        "--fuel",
        "300000000",
    ]));
    assert_eq!(
        (v["version"].as_u64(), v["world"].as_str()),
        (Some(1), Some("compute"))
    );
    assert_eq!(v["limits"]["fuel"], 300_000_000);
    crate::common::cli_json(&s.cli(&["module", "put", "ta", &path]));
    let list = crate::common::cli_json(&s.cli(&["module", "list"]));
    assert_eq!(list[0]["name"], "ta");
    assert_eq!(list[0]["active"], 2);
    let v = crate::common::cli_json(&s.cli(&["module", "rollback", "ta", "1"]));
    assert_eq!(v["version"], 1);
    let id = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 88}}))
        .await;
    let v = crate::common::cli_json(&s.cli(&[
        "invoke",
        "ta",
        "--twin",
        &id,
        "--parameters",
        r#"{"threshold": 85}"#,
    ]));
    assert_eq!(v["results"][&id]["over_threshold"], 1, "{v}");
    let v = crate::common::cli_json(&s.cli(&[
        "invoke",
        "ta",
        "--query",
        r#"{"entity_type": "machine"}"#,
    ]));
    assert_eq!(v["results"][&id]["max"], 88.0, "{v}");
    let out = s.cli(&["invoke", "ta"]);
    assert!(!out.status.success(), "invoke without twins must fail");
}

/// A request still running 10 s after SIGTERM does not hold the server up: its connection is
/// dropped, queued writes drain, and the server exits 0. (Guest calls in flight are cancelled
/// at once, see sandbox.rs; this request is slow on the client's side: its body trickles.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_long_request_past_the_drain_timeout() {
    let s = Server::start();
    // One byte a second of a 60-byte body: the request is in flight for a minute.
    let body = futures::stream::unfold(0u32, |n| async move {
        if n == 60 {
            return None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from_static(b" ")),
            n + 1,
        ))
    });
    let client = s.client().clone();
    let call = tokio::spawn(async move {
        let body = Body::Stream(reqwest::Body::wrap_stream(body), "application/json");
        client
            .try_send(
                Method::POST,
                "/v1/ingest",
                Some(&client.token),
                body,
                &[],
                Duration::from_secs(120),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (r, took) = tokio::task::spawn_blocking(move || {
        let mut s = s;
        let started = Instant::now();
        let r = s.stop_within(Duration::from_secs(25));
        (r, started.elapsed())
    })
    .await
    .unwrap();
    let status = r.expect("exits well before the body ends");
    assert!(status.success(), "{status}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(15),
        "stopped after {took:?}; the drain timeout is 10 s"
    );
    assert!(call.await.unwrap().is_err(), "the long request was cut off");
}

/// Hot swap under load: a client invokes continuously while the module is replaced 20 times;
/// no call fails and results of both versions are observed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_swap_under_load_fails_no_call() {
    let s = Server::start();
    let (thermal, hostile) = (guest("thermal_analysis"), guest("hostile"));
    s.upload("swap", &thermal, "").await.expect(201);
    let twin = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 80}}))
        .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (client, t, stop) = (s.client().clone(), twin.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let (mut v1, mut v2, mut failed) = (0, 0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client
                    .post("/v1/modules/swap/invoke", &json!({"twin_ids": [t]}))
                    .await;
                let (status, body) = (r.status, r.body);
                let res = &body["results"][&t];
                if status != 200 || !res["error"].is_null() {
                    failed.push(body.clone());
                } else if res["count"] == 1 {
                    v1 += 1;
                } else if res["ok"] == true {
                    v2 += 1;
                } else {
                    failed.push(body.clone());
                }
            }
            (v1, v2, failed)
        }));
    }
    for i in 0..20 {
        let bytes = if i % 2 == 0 { &hostile } else { &thermal };
        let r = s.upload("swap", bytes, "").await;
        r.expect(201);
        assert_eq!(r.body["version"], i + 2);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut v1, mut v2) = (0, 0);
    for c in clients {
        let (a, b, failed) = c.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed calls during hot swap: {failed:?}"
        );
        v1 += a;
        v2 += b;
    }
    assert!(
        v1 > 0 && v2 > 0,
        "results of both versions: v1={v1} v2={v2}"
    );
    let m = s.get("/v1/modules/swap").await;
    assert_eq!(m.body["versions"].as_array().unwrap().len(), 21);
    assert_eq!(m.body["errors"], 0, "{}", m.body);
    eprintln!("hot swap: {v1} calls answered by thermal-analysis, {v2} by the other version");
}
