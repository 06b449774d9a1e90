//! Resuming a stream: exactly once after `Last-Event-ID` / `since`, across a clean restart,
//! and a slow subscriber that gets one lag notice while the others keep up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{create, last_seq, log_page, patch, rss_bytes, seq};
use crate::common::Server;

// ---- 3. resume exactly once ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_exactly_once() {
    let s = Server::start();
    let a = create(&s, "machine", None, json!({"n": 0})).await;
    let b = create(&s, "sensor", None, json!({"n": 0})).await;

    // Receive a few events, then drop the connection remembering the last id.
    let mut sub = s.sse("", &[]).await;
    for i in 1..=3 {
        patch(&s, &a, json!({"n": i})).await;
    }
    let first = sub.take(3, "before the drop").await;
    let last_id = seq(&first[2]);
    drop(sub);

    // N = 50 changes while disconnected (two twins, interleaved).
    for i in 0..50 {
        let (id, n) = if i % 2 == 0 {
            (&a, 10 + i)
        } else {
            (&b, 10 + i)
        };
        patch(&s, id, json!({"n": n})).await;
    }

    // Reconnect with Last-Event-ID: exactly those 50, contiguous, then live.
    let last = last_id.to_string();
    let mut sub = s.sse("", &[("Last-Event-ID", &last)]).await;
    let replay = sub.take(50, "replay after Last-Event-ID").await;
    let seqs: Vec<u64> = replay.iter().map(seq).collect();
    assert_eq!(
        seqs,
        ((last_id + 1)..=(last_id + 50)).collect::<Vec<_>>(),
        "exactly the 50 missed events, in order"
    );
    for (i, e) in replay.iter().enumerate() {
        let (id, n) = if i % 2 == 0 {
            (&a, 10 + i)
        } else {
            (&b, 10 + i)
        };
        assert_eq!(e["twin_id"], id.as_str(), "{e}");
        assert_eq!(e["changed"], json!({"n": n}), "{e}");
    }
    sub.expect_quiet("after the replay").await;
    patch(&s, &a, json!({"n": "live"})).await;
    let live = sub.take(1, "live after the replay").await;
    assert_eq!(seq(&live[0]), last_id + 51);
    assert_eq!(live[0]["changed"], json!({"n": "live"}));
    sub.expect_quiet("after the live event").await;
    drop(sub);

    // `?since=` does the same as the header, with a filter applied to the replay.
    let mut sub = s.sse(&format!("since={last_id}&twin_id={b}"), &[]).await;
    let replay = sub.take(25, "replay after since with twin_id").await;
    assert!(replay.iter().all(|e| e["twin_id"] == b.as_str()));
    let seqs: Vec<u64> = replay.iter().map(seq).collect();
    assert_eq!(
        seqs,
        (0..25).map(|i| last_id + 2 + 2 * i).collect::<Vec<_>>(),
        "b's updates after since"
    );
    sub.expect_quiet("after the filtered replay").await;
    drop(sub);

    // The hand-over from replay to live while changes keep coming: resume in the middle
    // of a stream of writes; every number is delivered once, none is missing.
    let start = last_seq(&s).await;
    let writer_stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, path) = (s.client().clone(), format!("/v1/twins/{a}"));
        let stop = writer_stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while n < 3000 && !stop.load(Ordering::Relaxed) {
                client.patch(&path, &json!({"w": n})).await.expect(200);
                n += 1;
            }
            n
        })
    };
    // Let some writes land, then resume from `start` while they continue.
    let t0 = Instant::now();
    while last_seq(&s).await < start + 30 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the writer makes progress"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let from = start.to_string();
    let mut sub = s.sse("", &[("Last-Event-ID", &from)]).await;
    let mut got: Vec<u64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 300 {
        let m = sub
            .next_until(deadline)
            .await
            .expect("events keep coming during the hand-over");
        assert!(!m.is_lagged(), "no lag notice: {m:?}");
        got.push(m.id.as_deref().unwrap().parse().unwrap());
    }
    writer_stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    let end = start + written;
    while *got.last().unwrap() < end {
        let m = sub.next_until(deadline).await.unwrap_or_else(|| {
            panic!("missing events: got up to {} of {end}", got.last().unwrap())
        });
        got.push(m.id.as_deref().unwrap().parse().unwrap());
    }
    sub.expect_quiet("after the hand-over").await;
    assert_eq!(
        got,
        ((start + 1)..=end).collect::<Vec<_>>(),
        "every number exactly once across the replay/live hand-over"
    );
}

// ---- 4. a slow subscriber lags; the others don't ---------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_subscriber_lagged() {
    const TOTAL: u64 = 60_000;
    const BATCH: u64 = 1_000;
    let s = Server::start();
    let pid = s.pid().expect("server pid");
    let twins: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(create(&s, "machine", None, json!({"i": i})).await);
        }
        v
    };
    let base = last_seq(&s).await;

    // The slow subscriber: the response head is read, the body is not (yet).
    let mut slow = s.sse("", &[]).await;

    // The fast subscriber reads continuously and checks that seqs are contiguous.
    let fast_count = Arc::new(AtomicU64::new(0));
    let fast = {
        let mut sub = s.sse("", &[]).await;
        let count = fast_count.clone();
        tokio::spawn(async move {
            let mut expect = base + 1;
            let deadline = Instant::now() + Duration::from_secs(120);
            while expect <= base + TOTAL {
                let m = sub
                    .next_until(deadline)
                    .await
                    .unwrap_or_else(|| panic!("fast subscriber: nothing after {}", expect - 1));
                assert!(
                    !m.is_lagged(),
                    "the fast subscriber must not lag: {}",
                    m.data
                );
                let id: u64 = m.id.as_deref().expect("id").parse().expect("numeric id");
                assert_eq!(id, expect, "fast subscriber: contiguous seqs");
                expect += 1;
                count.fetch_add(1, Ordering::Relaxed);
            }
            // And nothing more.
            sub.expect_quiet("fast subscriber").await;
        })
    };

    // RSS sampler.
    let max_rss = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (max_rss, sampling) = (max_rss.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(r) = rss_bytes(pid) {
                    max_rss.fetch_max(r, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // Ingest TOTAL updates in batches, never letting the fast reader fall more than a few
    // thousand behind (it reads; the point is that the slow one does not).
    let pad = "x".repeat(200);
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < TOTAL {
        let mut body = String::with_capacity((BATCH as usize) * 300);
        for i in sent..sent + BATCH {
            let t = &twins[(i % twins.len() as u64) as usize];
            body.push_str(&format!(
                "{{\"twin_id\":\"{t}\",\"properties\":{{\"v\":{i},\"pad\":\"{pad}\"}}}}\n"
            ));
        }
        let r = s
            .post_raw("/v1/ingest", body.as_bytes(), "application/x-ndjson")
            .await;
        r.expect(200);
        assert_eq!(r.body["applied"], BATCH, "{}", r.text);
        sent += BATCH;
        let wait = Instant::now();
        while fast_count.load(Ordering::Relaxed) + 3 * BATCH < sent {
            assert!(
                wait.elapsed() < Duration::from_secs(30),
                "the fast subscriber stalls at {} of {sent}",
                fast_count.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let ingest_time = t0.elapsed();
    tokio::time::timeout(Duration::from_secs(60), fast)
        .await
        .expect("the fast subscriber finishes")
        .expect("the fast subscriber saw every update, contiguously, without a lag notice");
    let last = base + TOTAL;
    assert_eq!(last_seq(&s).await, last);

    // Now read the slow one: events up to some point, one lag notice naming the exact
    // range it missed, then the newer events up to the last.
    let mut expect = base + 1;
    let mut lags: Vec<(u64, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while expect <= last {
        let m = slow
            .next_until(deadline)
            .await
            .unwrap_or_else(|| panic!("slow subscriber: nothing after {}", expect - 1));
        if m.is_lagged() {
            let v = m.json();
            assert_eq!(v["type"], "lagged", "{v}");
            let (from, to) = (v["from"].as_u64().unwrap(), v["to"].as_u64().unwrap());
            assert_eq!(
                from, expect,
                "the lag starts right after the last delivered event: {v}"
            );
            assert!(
                to >= from && to < last,
                "lag range within what was written: {v}"
            );
            assert_eq!(v["missed"].as_u64().unwrap(), to - from + 1, "{v}");
            assert!(
                m.id.is_none(),
                "a lag notice carries no id (Last-Event-ID stays valid)"
            );
            lags.push((from, to));
            expect = to + 1;
        } else {
            let id: u64 = m.id.as_deref().expect("id").parse().unwrap();
            assert_eq!(
                id, expect,
                "slow subscriber: contiguous around the lag notice"
            );
            expect += 1;
        }
    }
    slow.expect_quiet("slow subscriber").await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let max_rss = max_rss.load(Ordering::Relaxed);
    eprintln!(
        "ingest of {TOTAL} took {ingest_time:?}; lag notices {lags:?}; max server RSS {} MiB",
        max_rss >> 20
    );
    assert_eq!(lags.len(), 1, "exactly one lag notice: {lags:?}");
    let (from, to) = lags[0];
    assert!(
        to - from + 1 >= TOTAL / 4,
        "the slow subscriber missed a large range (more than the buffer): {from}..={to}"
    );
    assert!(
        to + 1 >= last - 8192,
        "it resumes within the live buffer: {from}..={to}"
    );
    assert!(
        max_rss > 0 && max_rss < 1_500_000_000,
        "server RSS {max_rss} bytes"
    );

    // The missed range is still in the log (default tail 100K).
    let p = log_page(&s, &format!("after={}&limit=5", from - 1)).await;
    assert_eq!(seq(&p["events"][0]), from, "{}", p["events"][0]);
    assert_eq!(seq(&p["events"][4]), from + 4);
    let p = log_page(&s, &format!("after={}&limit=2", to - 1)).await;
    assert_eq!(seq(&p["events"][0]), to);
    assert_eq!(seq(&p["events"][1]), to + 1);
    assert_eq!(p["next_after"], to + 1);
    assert!(p["first_available"].as_u64().unwrap() <= 1);
    assert_eq!(p["next_seq"], last + 1);

    // A resume from inside the missed range replays it from the log.
    let mut again = s.sse(&format!("since={}", to - 3), &[]).await;
    let got = again.take(4, "resume inside the missed range").await;
    assert_eq!(
        got.iter().map(seq).collect::<Vec<_>>(),
        vec![to - 2, to - 1, to, to + 1]
    );
}

/// A subscriber that resumes across a *clean* restart missed nothing; it was once told it
/// missed ~1 048 565 events (numbers that were never handed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_clean_restart_has_no_phantom_gap() {
    let mut s = Server::start();
    let a = create(&s, "machine", None, json!({"n": 0})).await;
    patch(&s, &a, json!({"n": 1})).await;
    let last = last_seq(&s).await;
    s.stop().expect("clean stop");
    s.restart();
    let mut sub = s.sse(&format!("since={last}"), &[]).await;
    patch(&s, &a, json!({"n": 2})).await;
    let m = sub.expect_next("the first event after the restart").await;
    assert!(
        !m.is_lagged(),
        "nothing was missed across a clean restart, yet: {}",
        m.data
    );
    assert_eq!(m.json()["changed"], json!({"n": 2}));
}
