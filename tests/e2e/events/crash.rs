//! Crashes (`kill -9`) while events are written: no committed event is lost, the log stays
//! contiguous, and numbering continues after the last committed event.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use super::{create, log_all, log_page, patch, seq};
use crate::common::{Body, Server, REQUEST_TIMEOUT};

/// `kill -9` in the middle of a 10-second ingest, with a live SSE subscriber: after the
/// restart every acknowledged update is in the twins, the event log has no hole from its
/// first to its last event, and a subscriber resuming from the last event the first one saw
/// gets every later change exactly once — no lag notice, the numbering continuing without a
/// jump.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_during_ingest_loses_no_committed_event() {
    let mut s = Server::start();
    let mut twins = Vec::new();
    for _ in 0..50 {
        twins.push(create(&s, "machine", None, json!({"n": 0})).await);
    }
    // The live subscriber, from the start of the log.
    let mut live = s.sse("since=0", &[]).await;
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<u64>::new()));
    let seen2 = seen.clone();
    let reader = tokio::spawn(async move {
        // Until the kill ends the stream.
        while let Some(m) = live.next_or_end(Duration::from_secs(20)).await {
            assert!(!m.is_lagged(), "the live subscriber lagged: {}", m.data);
            seen2.lock().push(seq(&m.json()));
        }
    });
    // Ingest for 10 s in batches of 250; each 200 makes its batch durable.
    let acked = std::sync::Arc::new(parking_lot::Mutex::new(vec![0u64; twins.len()]));
    let (client, ids, acked2) = (s.client().clone(), twins.clone(), acked.clone());
    let ingest = tokio::spawn(async move {
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < Duration::from_secs(10) {
            n += 1;
            let mut body = String::new();
            for _ in 0..5 {
                for id in &ids {
                    body.push_str(&format!(
                        "{{\"twin_id\":\"{id}\",\"properties\":{{\"n\":{n}}}}}\n"
                    ));
                }
            }
            let body = Body::Bytes(body.into_bytes(), "application/x-ndjson");
            let r = client
                .try_send(
                    Method::POST,
                    "/v1/ingest",
                    Some(&client.token),
                    body,
                    &[],
                    REQUEST_TIMEOUT,
                )
                .await;
            // The kill ends the request: what was not acknowledged may be lost.
            match r {
                Ok(r) if r.status == 200 => acked2.lock().iter_mut().for_each(|a| *a = n),
                _ => return n,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        n
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.kill9();
    let batches = ingest.await.unwrap();
    let _ = reader.await;
    let seen = seen.lock().clone();
    let acked = acked.lock().clone();
    assert!(
        acked[0] > 5,
        "ingest made progress before the kill: {batches} batches"
    );
    assert!(!seen.is_empty(), "the live subscriber saw events");
    for w in seen.windows(2) {
        assert_eq!(w[0] + 1, w[1], "the live stream has no hole");
    }
    s.restart();

    // Every acknowledged update is in the twins.
    for (id, want) in twins.iter().zip(&acked) {
        let t = s.get(&format!("/v1/twins/{id}")).await.body;
        let n = t["properties"]["n"].as_u64().unwrap();
        assert!(n >= *want, "twin {id}: n = {n}, acknowledged {want}");
    }
    // The log holds every event from the first to the last, once each.
    let all = log_all(&s, 0, "").await;
    let seqs: Vec<u64> = all.iter().map(seq).collect();
    assert_eq!(seqs.first(), Some(&1), "the log starts at 1");
    for w in seqs.windows(2) {
        assert_eq!(w[0] + 1, w[1], "a hole in the log after the crash");
    }
    let last = *seqs.last().unwrap();
    // Each acknowledged update has its event: 50 creates, then 250 updates per batch.
    let updates = all.iter().filter(|e| e["type"] == "twin.updated").count() as u64;
    assert!(
        updates >= acked[0] * 250,
        "{updates} update events for {} acknowledged batches",
        acked[0]
    );
    // A subscriber resuming from the last event the live one saw gets the rest exactly once.
    let from = *seen.last().unwrap();
    let mut resumed = s.sse("", &[("Last-Event-ID", &from.to_string())]).await;
    let rest = resumed
        .take((last - from) as usize, "resuming across the crash")
        .await;
    let rest: Vec<u64> = rest.iter().map(seq).collect();
    assert_eq!(rest, ((from + 1)..=last).collect::<Vec<_>>());
    resumed.expect_quiet("nothing after the last").await;
    // New changes continue the numbering without a jump.
    patch(&s, &twins[0], json!({"n": 1_000_000})).await;
    let p = log_page(&s, &format!("after={last}")).await;
    assert_eq!(seq(&p["events"][0]), last + 1, "{p}");
    eprintln!(
        "kill -9 after {batches} batches: {} events seen live, {last} in the log",
        seen.len()
    );
}

/// A crash right after a burst larger than the in-memory tail: the persisted log afterwards
/// holds exactly the newest `--event-tail` events, contiguous, and the next number follows
/// the last committed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_burst_keeps_the_newest_tail_contiguous() {
    let mut s = Server::start_with(&["--event-tail", "1000"]);
    let a = create(&s, "machine", None, json!({"n": 0})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // the create is persisted
    let mut body = String::new();
    for i in 1..=5000 {
        body.push_str(&format!(
            "{{\"twin_id\":\"{a}\",\"properties\":{{\"n\":{i}}}}}\n"
        ));
    }
    s.post_raw("/v1/ingest", body.as_bytes(), "application/x-ndjson")
        .await
        .expect(200);
    s.kill9();
    s.restart();
    let stored: Vec<Value> = log_all(&s, 0, "").await;
    let seqs: Vec<u64> = stored.iter().map(seq).collect();
    assert!(
        seqs == (4002..=5001).collect::<Vec<_>>(),
        "the newest 1000 of 5001 events, got {} from {:?} to {:?}",
        seqs.len(),
        seqs.first(),
        seqs.last()
    );
    assert_eq!(stored.last().unwrap()["changed"], json!({"n": 5000}));
    patch(&s, &a, json!({"n": 5001})).await;
    let p = log_page(&s, "after=5001").await;
    assert_eq!(seq(&p["events"][0]), 5002, "{p}");
    // And the same after a clean restart: nothing renumbered, nothing twice.
    s.stop().expect("clean stop");
    s.restart();
    let again: Vec<u64> = log_all(&s, 0, "").await.iter().map(seq).collect();
    // (The tail is trimmed by whole chunks: it may hold a few more than 1000.)
    assert!(
        again.ends_with(&(4003..=5002).collect::<Vec<_>>()) && again[0] >= 4002,
        "{:?}..{:?}",
        again.first(),
        again.last()
    );
    for w in again.windows(2) {
        assert_eq!(w[0] + 1, w[1], "contiguous");
    }
}
