//! Property history: points and hourly buckets of patches, explicit time ranges, and no
//! history of a deleted twin coming back with a reused id.

use std::collections::BTreeMap;

use chrono::{DateTime, Timelike, Utc};
use serde_json::{json, Value};

use crate::common::{q, rfc3339, time, Server};

/// A deleted twin's history must not survive the delete: writes to a twin that race with its
/// delete (and land in the same group commit) must not leave history behind that a new twin
/// with the same client-supplied id would then show.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_twin_history_does_not_come_back_with_a_reused_id() {
    // Tombstones that expire at once: the id may be used again right after its delete.
    let server = Server::start_with(&["--tombstone-retention", "0s"]);
    let s = &server;
    let mut leaked = Vec::new();
    for _ in 0..30 {
        let id = uuid::Uuid::new_v4().to_string();
        s.create_twin(&json!({"id": id, "entity_type": "machine"}))
            .await;
        let mut writes = Vec::new();
        for k in 0..6 {
            let body = json!([{"twin_id": id, "properties": {"temperature": k}}]);
            writes.push(async move { s.post("/v1/ingest", &body).await });
        }
        let path = format!("/v1/twins/{id}");
        let (results, del) = tokio::join!(futures::future::join_all(writes), s.delete(&path));
        del.expect(204);
        for r in results {
            r.expect(200);
        }
        s.get(&path).await.expect_error(404, "not_found");
        s.create_twin(&json!({"id": id, "entity_type": "machine"}))
            .await;
        let r = s.get(&format!("{path}/history/temperature")).await;
        r.expect(200);
        let n = r.body["points"].as_array().map_or(0, Vec::len);
        if n > 0 {
            leaked.push((id, n));
        }
    }
    assert!(
        leaked.is_empty(),
        "re-created twins show history of the deleted twin with the same id: {leaked:?}"
    );
}

/// The same once the deleted twin's samples are folded into history blocks (which keep them
/// until retention): the new twin with its id shows none of them, also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folded_history_of_a_deleted_twin_does_not_come_back_with_a_reused_id() {
    let mut s = Server::start_with(&[
        "--tombstone-retention",
        "0s",
        "--checkpoint-every",
        "100ms",
        "--history-fold-every",
        "0s",
    ]);
    let id = uuid::Uuid::new_v4().to_string();
    let path = format!("/v1/twins/{id}");
    let history = format!("{path}/history/temperature");
    s.create_twin(&json!({"id": id, "entity_type": "machine", "properties": {"temperature": 1}}))
        .await;
    for t in 2..=4 {
        s.patch(&path, &json!({"temperature": t})).await.expect(200);
    }
    // Checkpoints every 100 ms fold at once: after a second the samples are in blocks and
    // the journal is empty.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let journal = s.data_dir.join("history");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_dir(&journal).unwrap().count() > 0 {
        assert!(std::time::Instant::now() < deadline, "never folded");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let points = |body: &Value| body["points"].as_array().map_or(0, Vec::len);
    assert_eq!(
        points(&s.get(&history).await.body),
        4,
        "read from the blocks"
    );
    s.delete(&path).await.expect(204);
    s.create_twin(&json!({"id": id, "entity_type": "machine"}))
        .await;
    assert_eq!(points(&s.get(&history).await.body), 0);
    s.patch(&path, &json!({"temperature": 9})).await.expect(200);
    assert_eq!(points(&s.get(&history).await.body), 1);
    s.stop().expect("clean stop");
    s.restart();
    let h = s.get(&history).await;
    assert_eq!(points(&h.body), 1, "{}", h.text);
    assert_eq!(h.body["points"][0]["value"], 9.0);
}

// ---- history ---------------------------------------------------------------------------

#[tokio::test]
async fn history_of_patches_points_and_hourly_buckets() {
    let s = Server::start();
    let id = s
        .create_twin_id(
            &json!({"entity_type": "machine", "properties": {"temperature": 60, "status": "ok"}}),
        )
        .await;
    let path = format!("/v1/twins/{id}");
    for v in [61.5, 62.0, 58.25] {
        s.patch(&path, &json!({"temperature": v})).await.expect(200);
    }
    // A patch without the property adds no point to its series.
    s.patch(&path, &json!({"status": "busy"})).await.expect(200);

    let r = s.get(&format!("{path}/history/temperature")).await;
    r.expect(200);
    let pts = r.body["points"].as_array().expect("points").clone();
    let values: Vec<f64> = pts.iter().map(|p| p["value"].as_f64().unwrap()).collect();
    assert_eq!(values, vec![60.0, 61.5, 62.0, 58.25], "{}", r.body);
    let times: Vec<DateTime<Utc>> = pts.iter().map(|p| time(&p["ts"])).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "not in time order: {times:?}"
    );

    // Hourly buckets: computed from the points (normally one bucket, two across an hour).
    let r = s.get(&format!("{path}/history/temperature?step=1h")).await;
    r.expect(200);
    let mut want: BTreeMap<DateTime<Utc>, Vec<f64>> = BTreeMap::new();
    for (t, v) in times.iter().zip(&values) {
        let hour = t
            .with_minute(0)
            .unwrap()
            .with_second(0)
            .unwrap()
            .with_nanosecond(0)
            .unwrap();
        want.entry(hour).or_default().push(*v);
    }
    let buckets = r.body["buckets"].as_array().expect("buckets");
    assert_eq!(buckets.len(), want.len(), "{}", r.body);
    for (b, (hour, vs)) in buckets.iter().zip(&want) {
        assert_eq!(time(&b["ts"]), *hour);
        assert_eq!(b["count"].as_u64().unwrap(), vs.len() as u64);
        assert_eq!(
            b["min"].as_f64().unwrap(),
            vs.iter().cloned().fold(f64::MAX, f64::min)
        );
        assert_eq!(
            b["max"].as_f64().unwrap(),
            vs.iter().cloned().fold(f64::MIN, f64::max)
        );
        let avg = vs.iter().sum::<f64>() / vs.len() as f64;
        assert!((b["avg"].as_f64().unwrap() - avg).abs() < 1e-9, "{b}");
    }
    if want.len() == 1 {
        assert_eq!(buckets[0]["count"], 4);
        assert_eq!(buckets[0]["min"], 58.25);
        assert_eq!(buckets[0]["max"], 62.0);
        assert_eq!(buckets[0]["avg"], 60.4375);
    }

    // `from` (inclusive) drops the earlier points.
    let from = pts[1]["ts"].as_str().unwrap();
    let r = s
        .get(&format!("{path}/history/temperature?from={}", q(from)))
        .await;
    r.expect(200);
    let got: Vec<f64> = r.body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    let expected: Vec<f64> = times
        .iter()
        .zip(&values)
        .filter(|(t, _)| **t >= time(&pts[1]["ts"]))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(got, expected);

    // Non-numeric and unknown properties have no points.
    let r = s.get(&format!("{path}/history/status")).await;
    assert_eq!(r.body, json!({"points": []}));
    let r = s.get(&format!("{path}/history/nothing?step=10s")).await;
    assert_eq!(r.body, json!({"buckets": []}));
    s.get(&format!(
        "/v1/twins/{}/history/temperature",
        uuid::Uuid::new_v4()
    ))
    .await
    .expect_error(404, "not_found");
}

#[tokio::test]
async fn history_ranges_and_buckets_with_explicit_times() {
    let s = Server::start();
    let id = s.create_twin_id(&json!({"entity_type": "machine"})).await;
    let now = Utc::now();
    let base = now
        .with_minute(0)
        .unwrap()
        .with_second(0)
        .unwrap()
        .with_nanosecond(0)
        .unwrap()
        - chrono::Duration::hours(2);
    let at = |secs: i64| base + chrono::Duration::seconds(secs);
    let samples = [(0, 10.0), (5, 20.0), (12, 30.0), (25, 40.0), (3601, 50.0)];
    // Sent out of order: history is ordered by time, not arrival.
    let items: Vec<Value> = samples
        .iter()
        .rev()
        .map(|(t, v)| json!({"twin_id": id, "properties": {"temperature": v}, "ts": rfc3339(at(*t))}))
        .collect();
    let r = s.post("/v1/ingest", &Value::Array(items)).await;
    r.expect(200);
    assert_eq!(r.body["applied"], 5);

    let hist = format!("/v1/twins/{id}/history/temperature");
    let r = s.get(&hist).await;
    r.expect(200);
    let got: Vec<(DateTime<Utc>, f64)> = r.body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (time(&p["ts"]), p["value"].as_f64().unwrap()))
        .collect();
    let want: Vec<(DateTime<Utc>, f64)> = samples.iter().map(|(t, v)| (at(*t), *v)).collect();
    assert_eq!(got, want);

    // from/to, both inclusive.
    let r = s
        .get(&format!(
            "{hist}?from={}&to={}",
            q(&rfc3339(at(5))),
            q(&rfc3339(at(25)))
        ))
        .await;
    r.expect(200);
    let vals: Vec<f64> = r.body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    assert_eq!(vals, vec![20.0, 30.0, 40.0]);
    let r = s.get(&format!("{hist}?to={}", q(&rfc3339(at(4))))).await;
    let vals: Vec<f64> = r.body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    assert_eq!(vals, vec![10.0]);

    // 10 s buckets aligned to the epoch; empty ones omitted.
    let r = s.get(&format!("{hist}?step=10s")).await;
    r.expect(200);
    let b = r.body["buckets"].as_array().unwrap();
    let summary: Vec<(DateTime<Utc>, u64, f64, f64, f64)> = b
        .iter()
        .map(|x| {
            (
                time(&x["ts"]),
                x["count"].as_u64().unwrap(),
                x["min"].as_f64().unwrap(),
                x["max"].as_f64().unwrap(),
                x["avg"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (at(0), 2, 10.0, 20.0, 15.0),
            (at(10), 1, 30.0, 30.0, 30.0),
            (at(20), 1, 40.0, 40.0, 40.0),
            (at(3600), 1, 50.0, 50.0, 50.0),
        ]
    );
    let r = s.get(&format!("{hist}?step=1h")).await;
    let b = &r.body["buckets"];
    assert_eq!(b.as_array().unwrap().len(), 2, "{b}");
    assert_eq!(time(&b[0]["ts"]), base);
    assert_eq!(
        (
            b[0]["count"].as_u64(),
            b[0]["min"].as_f64(),
            b[0]["max"].as_f64(),
            b[0]["avg"].as_f64()
        ),
        (Some(4), Some(10.0), Some(40.0), Some(25.0))
    );
    assert_eq!(b[1]["count"], 1);
    let r = s
        .get(&format!("{hist}?step=1h&from={}", q(&rfc3339(at(1)))))
        .await;
    assert_eq!(r.body["buckets"][0]["count"], 3);

    // Bad parameters.
    s.get(&format!(
        "{hist}?from={}&to={}",
        q(&rfc3339(at(30))),
        q(&rfc3339(at(10)))
    ))
    .await
    .expect_error(400, "bad_request");
    for bad in ["step=abc", "step=0s", "step=-5s", "from=yesterday", "to=12"] {
        s.get(&format!("{hist}?{bad}"))
            .await
            .expect_error(400, "bad_request");
    }
}
