//! The sandbox against guests that wait instead of compute, through the real server: every
//! way a guest can wait inside WASI ends at its deadline (or returns at once), a client that
//! goes away and a server that stops end the call too, behaviors included; and a component
//! that does not fit the host is refused before it is compiled.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{good_calls, guest, guest_file, Body, Server, REQUEST_TIMEOUT};

async fn invoke(s: &Server, module: &str, twin: &str, mode: &str) -> Value {
    let r = s
        .post(
            &format!("/v1/modules/{module}/invoke"),
            &json!({"twin_ids": [twin], "parameters": {"mode": mode}}),
        )
        .await;
    r.expect(200);
    r.body["results"][twin].clone()
}

/// Upload the hostile guest as `waiter` (plenty of fuel, the given deadline) and
/// thermal-analysis as `good`; create a twin for them.
async fn waiter_and_good(s: &Server, timeout: &str) -> String {
    s.upload(
        "waiter",
        &guest("hostile"),
        &format!("?fuel=100000000000&timeout={timeout}"),
    )
    .await
    .expect(201);
    s.upload("good", &guest("thermal_analysis"), "")
        .await
        .expect(201);
    s.create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 80}}))
        .await
}

/// Sleeping, polling and blocking on a clock, and spinning on `ready`, each end with
/// `deadline_exceeded` at the module's 1 s deadline, while good calls keep succeeding; every
/// other WASI import a guest can wait on answers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_wasi_wait_ends_at_the_deadline_or_at_once() {
    let s = Server::start();
    let twin = waiter_and_good(&s, "1s").await;
    let (stop, good) = good_calls(&s, &twin);

    for mode in ["sleep", "poll", "block", "ready-loop"] {
        let started = Instant::now();
        let r = invoke(&s, "waiter", &twin, mode).await;
        let took = started.elapsed();
        assert_eq!(r["error"]["code"], "deadline_exceeded", "{mode}: {r}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
            "{mode}: answered after {took:?} with a 1 s deadline"
        );
    }
    // Every compute slot (one per core) asleep at once: each ends at its deadline, the good
    // calls waiting for a slot get one within about a second, and the slots are free again.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = Instant::now();
    let sleepers: Vec<_> = (0..cores)
        .map(|_| {
            let (client, twin) = (s.client().clone(), twin.clone());
            tokio::spawn(async move {
                let r = client
                    .post(
                        "/v1/modules/waiter/invoke",
                        &json!({"twin_ids": [twin], "parameters": {"mode": "sleep"}}),
                    )
                    .await;
                (r.status, r.body)
            })
        })
        .collect();
    for t in sleepers {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["results"][&twin]["error"]["code"], "deadline_exceeded",
            "{body}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(invoke(&s, "good", &twin, "").await["count"], 1);

    // The rest answer at once: closed stdin, discarding stdout and stderr, no network, no
    // preopened directories, no environment.
    let at_once = [
        ("stdin", "stdin: Err(StreamError::Closed)"),
        ("stdout", "stdout: 2000 of 2000 writes ok"),
        ("stream-poll", "stream-poll: [0, 1]"),
        ("tcp", "tcp create: access-denied"),
        ("udp", "udp create: access-denied"),
        ("dns", "dns: permanent-resolver-failure"),
        ("fs", "fs: 0 preopened directories"),
        ("env", "env: 0 variables, 0 arguments"),
    ];
    let mut got = Vec::new();
    for (mode, _) in at_once {
        let started = Instant::now();
        let r = invoke(&s, "waiter", &twin, mode).await;
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{mode} took {:?}",
            started.elapsed()
        );
        got.push((mode, r["wasi"].as_str().unwrap_or_default().to_owned()));
    }
    let want: Vec<_> = at_once.iter().map(|(m, w)| (*m, w.to_string())).collect();
    assert_eq!(got, want);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(good.await.unwrap() > 0, "no good call completed meanwhile");
    let log = s.log();
    assert!(
        !log.contains("panicked"),
        "{}",
        crate::common::tail(&log, 40)
    );
}

/// A client that disconnects ends the guest call it was waiting for, even one sleeping
/// inside WASI with a 30 s deadline: the call is counted as ended within a second and its
/// compute slot serves the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disconnected_client_ends_a_sleeping_call() {
    let s = Server::start();
    let twin = waiter_and_good(&s, "30s").await;
    // More sleepers than compute slots, each given up by its client after 500 ms.
    let started = Instant::now();
    for _ in 0..4 {
        let body = json!({"twin_ids": [twin], "parameters": {"mode": "sleep"}});
        let r = s
            .try_send(
                Method::POST,
                "/v1/modules/waiter/invoke",
                Some(&s.token),
                Body::Json(&body),
                &[],
                Duration::from_millis(500),
            )
            .await;
        assert!(r.is_err(), "the client gave up");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = s.get("/v1/modules/waiter").await.body;
        if m["calls"].as_u64().unwrap() >= 2 {
            assert_eq!(m["calls"], m["errors"], "{m}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sleeping calls still running: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(invoke(&s, "good", &twin, "").await["count"], 1);
    assert!(
        s.log().contains("the caller went away"),
        "{}",
        crate::common::tail(&s.log(), 20)
    );
}

/// A behavior that sleeps inside WASI ends at its deadline with `deadline_exceeded` and does
/// not hold up another behavior on the same twin.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sleeping_behavior_ends_at_its_deadline() {
    let s = Server::start();
    s.upload(
        "sleepy",
        &guest("stuck_behavior"),
        "?fuel=100000000000&timeout=500ms",
    )
    .await
    .expect(201);
    s.upload("thermal-monitor", &guest("thermal_monitor"), "")
        .await
        .expect(201);
    for (name, module) in [("sleepy", "sleepy"), ("overheat", "thermal-monitor")] {
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
    let started = Instant::now();
    for t in 0..4 {
        s.patch(
            &format!("/v1/twins/{m}"),
            &json!({"temperature": 90 + t, "sleep": t}),
        )
        .await
        .expect(200);
    }
    // thermal-monitor marks the machine at once, while the sleeper is still asleep.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = s.get(&format!("/v1/twins/{m}")).await.body;
        if t["properties"]["overheated"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "thermal-monitor did not run: {t}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Six events (create, 4 patches, thermal-monitor's mark); each call, asleep or spinning,
    // ends at 500 ms.
    loop {
        let b = s.get("/v1/behaviors/sleepy").await.body;
        if b["errors"].as_u64().unwrap_or(0) >= 6 {
            assert!(
                b["last_error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("deadline_exceeded"),
                "{b}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "sleeping calls not ended: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 6 calls of 500 ms on one twin's lane, one after another: about 3 s, not an hour.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

/// SIGTERM while guests sleep (an invoke with a 30 s deadline and a behavior): the calls are
/// cancelled, the server exits 0 promptly, and nothing panics on the way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_cancels_sleeping_calls_without_panics() {
    let mut s = Server::start();
    s.upload(
        "waiter",
        &guest("hostile"),
        "?fuel=100000000000&timeout=30s",
    )
    .await
    .expect(201);
    s.upload("sleepy", &guest("stuck_behavior"), "?timeout=30s")
        .await
        .expect(201);
    s.put(
        "/v1/behaviors/sleepy",
        &json!({"module": "sleepy", "entity_type": "machine"}),
    )
    .await
    .expect(201);
    let twin = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"sleep": 1}}))
        .await;
    let mut calls = Vec::new();
    for mode in ["sleep", "poll"] {
        let (client, twin) = (s.client().clone(), twin.clone());
        calls.push(tokio::spawn(async move {
            let body = json!({"twin_ids": [twin], "parameters": {"mode": mode}});
            let r = client
                .try_send(
                    Method::POST,
                    "/v1/modules/waiter/invoke",
                    Some(&client.token),
                    Body::Json(&body),
                    &[],
                    REQUEST_TIMEOUT,
                )
                .await;
            // The stop may cut the call off before it answers.
            r.ok().map(|r| r.body).filter(|b| !b.is_null())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let status = s.stop_within(Duration::from_secs(20)).unwrap();
    let took = started.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    for c in calls {
        // An answer, if it came, names the cancellation (a call still waiting for a compute
        // slot is told the server is stopping).
        if let Some(body) = c.await.unwrap() {
            if body["error"]["code"] == "unavailable" {
                continue;
            }
            assert_eq!(
                body["results"][&twin]["error"]["code"], "cancelled",
                "{body}"
            );
        }
    }
    let log = s.log();
    assert!(
        !log.contains("panicked"),
        "{}",
        crate::common::tail(&log, 40)
    );
    assert!(
        log.contains("stopped cleanly"),
        "{}",
        crate::common::tail(&log, 40)
    );
    assert!(
        log.contains("the server is stopping"),
        "{}",
        crate::common::tail(&log, 40)
    );
    // Logs written to a file carry no colour codes.
    assert!(!log.contains("\u{1b}["), "ANSI codes in the log");
}

/// A component that does not fit is refused from its types alone: the 18 MB Python component
/// uploaded over a behavior module (another world) is a 409, the greeter of an unknown world
/// and a `run` of another signature are 422s, each without a compile (`modules_compiled`
/// stays put) and in well under a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_misfit_component_is_refused_without_compiling() {
    let s = Server::start();
    s.upload("monitor", &guest("thermal_monitor"), "")
        .await
        .expect(201);
    s.put(
        "/v1/behaviors/b",
        &json!({"module": "monitor", "entity_type": "machine"}),
    )
    .await
    .expect(201);
    let compiled = |m: &Value| m["modules_compiled"].as_u64().unwrap();
    let before = compiled(&s.get("/v1/metrics").await.body);
    let python = guest_file("python/thermal_analysis_py.wasm");
    let started = Instant::now();
    s.upload("monitor", &python, "")
        .await
        .expect_error(409, "conflict");
    let took_python = started.elapsed();
    let started = Instant::now();
    let r = s.upload("greeter", &guest("other_world"), "").await;
    r.expect(422);
    let took_greeter = started.elapsed();
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("matches no world this host runs"),
        "{}",
        r.body
    );
    // `run` with another signature than the compute world's.
    let r = s.upload("almost", &guest("bad_signature"), "").await;
    r.expect(422);
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains(
            "is `func(u32) -> u32`, but world compute needs `func(list<record {id: string"
        ),
        "{}",
        r.body
    );
    eprintln!(
        "refused: Python component ({} bytes) in {took_python:?}, greeter in {took_greeter:?}",
        python.len()
    );
    assert_eq!(compiled(&s.get("/v1/metrics").await.body), before);
    assert!(took_python < Duration::from_secs(1), "{took_python:?}");
    assert!(took_greeter < Duration::from_secs(1), "{took_greeter:?}");
}
