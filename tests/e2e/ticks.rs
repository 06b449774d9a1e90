//! Periodic simulation through the real server: a behavior bound with `"every"` is called once
//! per interval for each twin it matches, with a `tick` event; the ticks are spread over the
//! interval; a tick that finds the compute pool busy is skipped and counted; the binding
//! survives a restart, and deleting it stops the ticks.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{guest, Server};

const MACHINES: usize = 10;

async fn machines(s: &Server, props: Value) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..MACHINES {
        ids.push(
            s.create_twin_id(&json!({"entity_type": "machine", "properties": props}))
                .await,
        );
    }
    ids
}

async fn temperatures(s: &Server, ids: &[String]) -> Vec<f64> {
    let mut out = Vec::new();
    for id in ids {
        let t = s.get(&format!("/v1/twins/{id}")).await.body;
        out.push(
            t["properties"]["temperature"]
                .as_f64()
                .expect("temperature"),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_run_at_the_interval_spread_over_it_and_survive_a_restart() {
    let mut s = Server::start();
    s.upload("sim", &guest("machine_sim"), "").await.expect(201);
    let ids = machines(&s, json!({"temperature": 20.0, "target_temperature": 70.0})).await;

    // A bad interval is refused with the reason.
    for (every, says) in [("10ms", "out of range"), ("soon", "not a duration")] {
        let r = s
            .put(
                "/v1/behaviors/warm",
                &json!({"module": "sim", "entity_type": "machine", "every": every}),
            )
            .await;
        r.expect(422);
        assert!(r.text.contains(says), "{}", r.text);
    }

    let r = s
        .put(
            "/v1/behaviors/warm",
            &json!({"module": "sim", "entity_type": "machine", "every": "200ms"}),
        )
        .await;
    r.expect(201);
    assert_eq!(r.body["every"], "200ms", "{}", r.text);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let b = s.get("/v1/behaviors/warm").await.body;
    let ticks = b["ticks"].as_u64().unwrap();
    // Ten machines, a round every 200 ms for 2.1 s: 11 rounds begun, 100 to 110 ticks.
    assert!((80..=120).contains(&ticks), "ticks after 2.1 s: {b}");
    assert_eq!(b["ticks_skipped"], 0, "{b}");
    assert_eq!(b["errors"], 0, "{b}");
    // Its own patches never trigger it again: every run was a tick.
    assert_eq!(b["runs"], b["ticks"], "{b}");
    let temps = temperatures(&s, &ids).await;
    assert!(
        temps.iter().all(|t| *t > 40.0 && *t < 70.0),
        "every machine warms toward 70: {temps:?}"
    );

    // The first round's ticks are spread over its 200 ms, not made all at once.
    let log = s
        .get("/v1/events/log?types=twin.updated&limit=100")
        .await
        .body;
    let first_round: Vec<i64> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cause"]["by"] == "behavior:warm")
        .take(MACHINES)
        .map(|e| crate::common::time(&e["ts"]).timestamp_millis())
        .collect();
    assert_eq!(first_round.len(), MACHINES, "{log}");
    let span = first_round.iter().max().unwrap() - first_round.iter().min().unwrap();
    assert!(
        (120..=260).contains(&span),
        "the first round's ten ticks span {span} ms (evenly over 200 ms: 180 ms)"
    );

    // The binding is stored: after a restart the machines go on warming.
    s.restart();
    let b = s.get("/v1/behaviors/warm").await.body;
    assert_eq!(b["every"], "200ms", "{b}");
    let before = temperatures(&s, &ids).await;
    for (id, was) in ids.iter().zip(before) {
        crate::common::twin_until(&s, id, |t| {
            t["properties"]["temperature"].as_f64() > Some(was)
        })
        .await;
    }

    // Deleting the binding stops its ticks.
    s.patch(
        &format!("/v1/twins/{}", ids[0]),
        &json!({"target_temperature": 20.0}),
    )
    .await
    .expect(200);
    s.delete("/v1/behaviors/warm").await.expect(204);
    let at_delete = temperatures(&s, &ids[..1]).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        temperatures(&s, &ids[..1]).await,
        at_delete,
        "a deleted behavior still ticks"
    );
    let m = s.get("/metrics").await.text;
    assert!(
        m.contains("twinhost_behavior_ticks_total"),
        "no tick metric"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_that_finds_the_pool_busy_is_skipped_and_counted() {
    let s = Server::start_with(&["--compute-slots", "1"]);
    s.upload("sim", &guest("machine_sim"), "").await.expect(201);
    s.upload("busy", &guest("busy_behavior"), crate::pool::BUSY_FUEL)
        .await
        .expect(201);
    let ids = machines(&s, json!({"temperature": 20.0, "target_temperature": 90.0})).await;
    let load = s
        .create_twin_id(&json!({"entity_type": "load", "properties": {"work_ms": 50}}))
        .await;
    s.put(
        "/v1/behaviors/hog",
        &json!({"module": "busy", "twin_id": load}),
    )
    .await
    .expect(201);
    s.put(
        "/v1/behaviors/warm",
        &json!({"module": "sim", "entity_type": "machine", "every": "100ms"}),
    )
    .await
    .expect(201);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Forty events of 50 ms each keep the one slot taken, with the next call waiting for it,
    // for about two seconds.
    for i in 0..40 {
        s.patch(&format!("/v1/twins/{load}"), &json!({"n": i}))
            .await
            .expect(200);
    }
    let hog = loop {
        let hog = s.get("/v1/behaviors/hog").await.body;
        if hog["runs"].as_u64() >= Some(40) {
            break hog;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(hog["errors"], 0, "{hog}");
    let during = s.get("/v1/behaviors/warm").await.body;
    let skipped = during["ticks_skipped"].as_u64().unwrap();
    // About twenty rounds of ten went by while the slot was taken.
    assert!(
        skipped >= 50,
        "ticks skipped while the pool was full: {during}"
    );
    assert_eq!(during["errors"], 0, "{during}");

    // Once the load is over the ticks run again, and none is skipped.
    let ticks = during["ticks"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = s.get("/v1/behaviors/warm").await.body;
    assert!(
        after["ticks"].as_u64().unwrap() >= ticks + 30,
        "ticks did not resume: {during} then {after}"
    );
    assert_eq!(after["ticks_skipped"], during["ticks_skipped"], "{after}");
    let temps = temperatures(&s, &ids).await;
    assert!(temps.iter().all(|t| *t > 20.0), "{temps:?}");

    let p = s.get("/v1/metrics").await.body["compute_pool"].clone();
    assert!(p["by_class"]["tick"]["busy"].as_u64() >= Some(50), "{p}");
    let m = s.get("/metrics").await.text;
    assert!(
        m.contains("twinhost_behavior_ticks_skipped_total{reason=\"busy\"}"),
        "no skipped-tick metric"
    );
}
