//! Durability through the real binary: every acknowledged update survives `kill -9`, and the
//! group commit keeps concurrent writers' updates.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{id_set, ids, machine_model, Body, Server, REQUEST_TIMEOUT};

/// Writers own disjoint twins and send increasing counters, one request at a time, recording
/// the last value the server acknowledged. The server is killed with SIGKILL mid-stream; after
/// a restart every twin holds at least its last acknowledged counter. With the default
/// checkpoint interval the restart replays the write-ahead log alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_updates_survive_sigkill() {
    crash_and_check(&[]).await;
}

/// The same with a checkpoint every 50 ms, so the kill lands among checkpoints that wrote
/// twins newer than their log position: the restart combines sled's state with the log tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_updates_survive_sigkill_between_checkpoints() {
    crash_and_check(&["--checkpoint-every", "50ms"]).await;
}

async fn crash_and_check(args: &[&str]) {
    let mut srv = Server::start_with(args);
    const INGEST_WRITERS: usize = 4;
    const PATCH_WRITERS: usize = 2;
    const TWINS_PER_WRITER: usize = 50;
    let mut owned: Vec<Vec<String>> = Vec::new();
    for w in 0..INGEST_WRITERS + PATCH_WRITERS {
        let mut ids = Vec::new();
        for i in 0..TWINS_PER_WRITER {
            ids.push(
                srv.create_twin_id(
                    &json!({"entity_type": "machine", "properties": {"writer": w, "i": i, "n": 0}}),
                )
                .await,
            );
        }
        owned.push(ids);
    }
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let mut tasks = Vec::new();
    for (w, ids) in owned.iter().cloned().enumerate() {
        let (client, acked) = (srv.client().clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for n in 1u64.. {
                if w < INGEST_WRITERS {
                    let body: String = ids
                        .iter()
                        .map(|id| format!("{}\n", json!({"twin_id": id, "properties": {"n": n, "temperature": n as f64}})))
                        .collect();
                    let body = Body::Bytes(body.into_bytes(), "application/x-ndjson");
                    let r = client.try_send(Method::POST, "/v1/ingest", Some(&client.token), body, &[], REQUEST_TIMEOUT).await;
                    // The kill ends the request: what was not acknowledged may be lost.
                    let Ok(r) = r else { return n };
                    if r.status != 200 {
                        return n;
                    }
                    assert_eq!(r.body["applied"], ids.len(), "{}", r.text);
                    let mut a = acked.lock().unwrap();
                    for id in &ids {
                        a.insert(id.clone(), n);
                    }
                } else {
                    let id = &ids[n as usize % ids.len()];
                    let body = json!({"n": n});
                    let r = client.try_send(Method::PATCH, &format!("/v1/twins/{id}"), Some(&client.token), Body::Json(&body), &[], REQUEST_TIMEOUT).await;
                    let Ok(r) = r else { return n };
                    if r.status != 200 {
                        return n;
                    }
                    acked.lock().unwrap().insert(id.clone(), n);
                }
            }
            unreachable!()
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    srv.kill9();
    for t in tasks {
        t.await.expect("writer task");
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= (INGEST_WRITERS + PATCH_WRITERS) * 10,
        "too few acknowledged updates before the kill to prove anything: {}",
        acked.len()
    );
    srv.restart();
    let mut checked = 0;
    for (id, n) in &acked {
        let r = srv.get(&format!("/v1/twins/{id}")).await;
        r.expect(200);
        let got = r.body["properties"]["n"].as_u64().unwrap();
        assert!(
            got >= *n,
            "twin {id}: acknowledged n={n} but after the crash n={got}"
        );
        // Replay must not apply an update twice: each update bumps the version once and
        // carries a larger n than the one before it.
        let version = r.body["version"].as_u64().unwrap();
        assert!(
            version <= 1 + got,
            "twin {id}: n={got} but version {version}"
        );
        checked += 1;
    }
    // Ingested temperatures are history: the last acknowledged point survived too.
    let (id, n) = acked
        .iter()
        .find(|(id, _)| owned[0].contains(id))
        .expect("an ingest writer's twin");
    let h = srv
        .get(&format!("/v1/twins/{id}/history/temperature"))
        .await;
    h.expect(200);
    let pts = h.body["points"].as_array().unwrap();
    assert!(
        pts.iter().any(|p| p["value"].as_f64() == Some(*n as f64)),
        "history lost the acknowledged point {n}: {} points",
        pts.len()
    );
    eprintln!("checked {checked} twins after SIGKILL");
}

/// Many concurrent single PATCHes to one twin are all applied (group commit batches them,
/// never drops one): the final version counts every acknowledged update.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_patches_are_all_applied() {
    let srv = Server::start();
    let id = srv
        .create_twin_id(&json!({"entity_type": "counter", "properties": {}}))
        .await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (client, id) = (srv.client().clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                client
                    .patch(&format!("/v1/twins/{id}"), &json!({format!("w{w}"): i}))
                    .await
                    .expect(200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let t = srv.get(&format!("/v1/twins/{id}")).await;
    assert_eq!(t.body["version"], 1 + 8 * 25, "{}", t.body);
    for w in 0..8 {
        assert_eq!(t.body["properties"][format!("w{w}")], 24);
    }
    let m = srv.get("/v1/metrics").await;
    assert!(m.body["commits"].as_u64().unwrap() > 0);
}

// ---- shutdown and restart --------------------------------------------------------------

/// What `seed` created, to check after a restart.
struct Seeded {
    site: String,
    hall: String,
    machines: Vec<String>,
    twins: BTreeMap<String, Value>,
    read_token: String,
}

async fn seed(s: &Server) -> Seeded {
    s.put("/v1/models/machine", &machine_model())
        .await
        .expect(201);
    let site = s
        .create_twin_id(&json!({"entity_type": "site", "properties": {"name": "plant"}}))
        .await;
    let hall = s
        .create_twin_id(&json!({"entity_type": "building", "parent_id": site}))
        .await;
    let mut machines = Vec::new();
    for i in 0..4 {
        let parent = if i < 3 { json!(hall) } else { Value::Null };
        machines.push(
            s.create_twin_id(&json!({"entity_type": "machine", "parent_id": parent,
                                    "properties": {"status": "operational", "temperature": 60 + i}}))
                .await,
        );
    }
    s.patch(
        &format!("/v1/twins/{}", machines[0]),
        &json!({"temperature": 99, "rpm": 10}),
    )
    .await
    .expect(200);
    s.put(
        &format!("/v1/twins/{}/lifecycle", machines[3]),
        &json!({"state": "retired"}),
    )
    .await
    .expect(200);
    s.put(
        &format!(
            "/v1/twins/{}/relationships/feeds/{}",
            machines[0], machines[1]
        ),
        &json!({"rate": 3}),
    )
    .await
    .expect(201);
    let read_token = s.create_token("read").await;
    let mut twins = BTreeMap::new();
    for id in [&site, &hall].into_iter().chain(&machines) {
        twins.insert(id.clone(), s.get(&format!("/v1/twins/{id}")).await.body);
    }
    Seeded {
        site,
        hall,
        machines,
        twins,
        read_token,
    }
}

async fn check_seeded(s: &Server, d: &Seeded) {
    s.send(Method::GET, "/healthz", None, Body::None, &[])
        .await
        .expect(200);
    assert_eq!(s.twin_count().await, d.twins.len() as u64);
    for (id, t) in &d.twins {
        let r = s.get(&format!("/v1/twins/{id}")).await;
        r.expect(200);
        assert_eq!(&r.body, t, "twin {id} after restart");
        assert_eq!(r.header("etag"), Some(format!("\"{}\"", t["version"])));
    }
    let r = s.get("/v1/models/machine").await;
    r.expect(200);
    assert_eq!(r.body["required"], json!(["status"]));
    // The model still validates.
    s.patch(
        &format!("/v1/twins/{}", d.machines[1]),
        &json!({"temperature": 9000}),
    )
    .await
    .expect_error(422, "validation_failed");
    let r = s
        .get(&format!("/v1/twins/{}/relationships", d.machines[0]))
        .await;
    assert_eq!(
        r.body,
        json!([{"name": "feeds", "target_id": d.machines[1], "properties": {"rate": 3}}])
    );
    // Lifecycle survived: still retired.
    s.patch(
        &format!("/v1/twins/{}", d.machines[3]),
        &json!({"temperature": 61}),
    )
    .await
    .expect_error(409, "conflict");
    // Tokens survived.
    let rt = &d.read_token;
    s.send(
        Method::GET,
        &format!("/v1/twins/{}", d.site),
        Some(rt),
        Body::None,
        &[],
    )
    .await
    .expect(200);
    s.send(
        Method::POST,
        "/v1/twins",
        Some(rt),
        Body::Json(&json!({"entity_type": "x"})),
        &[],
    )
    .await
    .expect_error(403, "forbidden");
    // Indexes were rebuilt.
    let r = s
        .post("/v1/query", &json!({"entity_type": "machine"}))
        .await;
    assert_eq!(
        id_set(&r.body["items"]),
        d.machines.iter().cloned().collect()
    );
    let r = s.post("/v1/query", &json!({"parent_id": d.hall})).await;
    assert_eq!(
        id_set(&r.body["items"]),
        d.machines[..3].iter().cloned().collect()
    );
    let r = s.post("/v1/query", &json!({"ancestor_id": d.site, "where": [{"property": "temperature", "op": ">", "value": 90}]})).await;
    assert_eq!(ids(&r.body["items"]), vec![d.machines[0].clone()]);
    let r = s
        .get(&format!("/v1/twins/{}/ancestors", d.machines[0]))
        .await;
    assert_eq!(ids(&r.body), vec![d.hall.clone(), d.site.clone()]);
    s.delete(&format!("/v1/twins/{}", d.hall))
        .await
        .expect_error(409, "conflict");
    // History survived.
    let r = s
        .get(&format!("/v1/twins/{}/history/temperature", d.machines[0]))
        .await;
    let vals: Vec<f64> = r.body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    assert_eq!(vals, vec![60.0, 99.0]);
    // And the node keeps working.
    let r = s
        .post("/v1/twins", &json!({"entity_type": "machine", "parent_id": d.hall, "properties": {"status": "fault"}}))
        .await;
    r.expect(201);
    assert_eq!(r.body["vclock"], json!({"node-test": 1}));
}

#[tokio::test]
async fn restart_after_sigterm_keeps_everything() {
    let mut s = Server::start();
    let d = seed(&s).await;
    let admin = s.token.clone();
    let status = s.stop().expect("the server exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
    s.restart();
    assert_eq!(s.token, admin, "the admin token is not replaced");
    check_seeded(&s, &d).await;
}

#[tokio::test]
async fn restart_after_kill9_keeps_everything() {
    let mut s = Server::start();
    let d = seed(&s).await;
    s.kill9();
    s.restart();
    check_seeded(&s, &d).await;
}
