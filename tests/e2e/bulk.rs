//! `POST /v1/twins/bulk` and `twinhost twin import`: many twins with one durable commit per
//! request; bad items refused by index while the rest is committed; `upsert=true`; parents
//! created earlier in the same body; NDJSON; the bounds on items and bytes.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{machine_model, Server};

/// The `ids` of a bulk answer as strings (`None` for a rejected item).
fn ids(body: &Value) -> Vec<Option<String>> {
    body["ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no ids: {body}"))
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// `(index, error code)` of each rejected item.
fn rejected(body: &Value) -> Vec<(u64, String)> {
    body["rejected"]
        .as_array()
        .unwrap_or_else(|| panic!("no rejected: {body}"))
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["error"]["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The `twin.created` events of the log, polled until there are `n` (or 10 s pass).
async fn created_events(s: &Server, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = s.get("/v1/events/log?types=twin.created&limit=1000").await;
        r.expect(200);
        let events = r.body["events"].as_array().cloned().unwrap_or_default();
        if events.len() >= n || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn bad_items_are_rejected_by_index_and_the_rest_committed() {
    let s = Server::start();
    s.put("/v1/models/machine", &machine_model())
        .await
        .expect(201);
    let given = uuid::Uuid::now_v7().to_string();
    let body = json!([
        {"id": given, "entity_type": "machine", "properties": {"status": "operational", "temperature": 70}}, // 0
        {"entity_type": "machine", "properties": {"status": "operational", "temperature": 900}}, // 1 model
        5,                                                                                        // 2 shape
        {"id": given, "entity_type": "machine", "properties": {"status": "fault"}},              // 3 duplicate
        {"entity_type": "machine", "parent_id": uuid::Uuid::now_v7(), "properties": {"status": "fault"}}, // 4 parent
        {"entity_type": "machine", "properties": {"status": "maintenance", "rpm": 1200}},        // 5
        {"entity_type": "bad name!", "properties": {}},                                          // 6 name
        {"entity_type": "machine", "properties": {"status": "operational"}, "colour": "red"},    // 7 field
    ]);
    let r = s.post("/v1/twins/bulk", &body).await;
    r.expect(200);
    assert_eq!(r.body["created"], 2, "{}", r.text);
    assert_eq!(r.body["updated"], 0, "{}", r.text);
    let want: Vec<(u64, String)> = [
        (1, "validation_failed"),
        (2, "bad_request"),
        (3, "conflict"),
        (4, "not_found"),
        (6, "bad_request"),
        (7, "bad_request"),
    ]
    .map(|(i, c)| (i, c.to_owned()))
    .into();
    assert_eq!(rejected(&r.body), want, "{}", r.text);
    // The model's complaint is the one a single create would get, details included.
    assert!(
        r.body["rejected"][0]["error"]["details"]["temperature"].is_string(),
        "{}",
        r.text
    );
    let ids = ids(&r.body);
    assert_eq!(ids.len(), 8);
    assert_eq!(ids[0].as_deref(), Some(given.as_str()));
    assert!(ids
        .iter()
        .enumerate()
        .all(|(i, id)| id.is_some() == (i == 0 || i == 5)));
    let made = ids[5].clone().unwrap();
    let t = s.get(&format!("/v1/twins/{made}")).await;
    t.expect(200);
    assert_eq!(
        t.body["properties"],
        json!({"status": "maintenance", "rpm": 1200})
    );
    assert_eq!(t.body["version"], 1);
    assert_eq!(s.twin_count().await, 2);
    // Like any create: an event each, and history of the numeric properties.
    let events = created_events(&s, 2).await;
    let twins: Vec<&str> = events
        .iter()
        .map(|e| e["twin_id"].as_str().unwrap())
        .collect();
    assert_eq!(twins, [given.as_str(), made.as_str()]);
    let h = s
        .get(&format!("/v1/twins/{given}/history/temperature"))
        .await;
    assert_eq!(h.body["points"][0]["value"], 70.0, "{}", h.text);

    // Role `write` may provision; `read` may not.
    let reader = s.with_token(&s.create_token("read").await);
    let one = json!([{"entity_type": "machine", "properties": {"status": "fault"}}]);
    reader
        .post("/v1/twins/bulk", &one)
        .await
        .expect_error(403, "forbidden");
    let writer = s.with_token(&s.create_token("write").await);
    writer.post("/v1/twins/bulk", &one).await.expect(200);
    // A body that is no list of items changes nothing.
    s.post_raw("/v1/twins/bulk", b"[{\"entity_type\":", "application/json")
        .await
        .expect_error(400, "invalid_json");
    s.post_raw("/v1/twins/bulk", b"  \n", "application/x-ndjson")
        .await
        .expect_error(400, "bad_request");
    assert_eq!(s.twin_count().await, 3);
}

#[tokio::test]
async fn items_may_name_parents_created_earlier_in_the_same_body() {
    let s = Server::start();
    let building = uuid::Uuid::now_v7().to_string();
    let floor = uuid::Uuid::now_v7().to_string();
    let late = uuid::Uuid::now_v7().to_string();
    let body = json!([
        {"id": building, "entity_type": "building", "properties": {"name": "Factory A"}},
        {"id": floor, "entity_type": "floor", "parent_id": building},
        {"entity_type": "machine", "parent_id": floor, "properties": {"temperature": 70}},
        {"entity_type": "machine", "parent_id": floor, "properties": {"temperature": 71}},
        // Order matters: a parent that comes later in the body does not exist yet.
        {"entity_type": "machine", "parent_id": late},
        {"id": late, "entity_type": "floor", "parent_id": building},
    ]);
    let r = s.post("/v1/twins/bulk", &body).await;
    r.expect(200);
    assert_eq!(r.body["created"], 5, "{}", r.text);
    assert_eq!(rejected(&r.body), [(4, "not_found".to_owned())]);
    let kids = s.get(&format!("/v1/twins/{floor}/children")).await;
    assert_eq!(kids.body.as_array().unwrap().len(), 2, "{}", kids.text);
    let b = s.get(&format!("/v1/twins/{building}")).await.body;
    assert_eq!(b["children_ids"].as_array().unwrap().len(), 2, "{b}");
    let machine = ids(&r.body)[2].clone().unwrap();
    let up = s.get(&format!("/v1/twins/{machine}/ancestors")).await.body;
    let up: Vec<&str> = up
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(up, [floor.as_str(), building.as_str()]);
}

#[tokio::test]
async fn upsert_updates_existing_twins_and_creates_the_others() {
    let s = Server::start();
    let a = s
        .create_twin_id(
            &json!({"entity_type": "machine", "properties": {"temperature": 1, "status": "ok"}}),
        )
        .await;
    let b = uuid::Uuid::now_v7().to_string();
    let items = json!([
        {"id": a, "entity_type": "machine", "properties": {"temperature": 2, "status": null, "rpm": 5}},
        {"id": b, "entity_type": "machine", "properties": {"temperature": 3}},
    ]);
    // Without upsert an existing id is a duplicate; the new one is created.
    let r = s.post("/v1/twins/bulk", &items).await;
    r.expect(200);
    assert_eq!(
        (r.body["created"].clone(), r.body["updated"].clone()),
        (json!(1), json!(0))
    );
    assert_eq!(rejected(&r.body), [(0, "conflict".to_owned())]);
    assert_eq!(s.get(&format!("/v1/twins/{a}")).await.body["version"], 1);

    let items = json!([
        {"id": a, "entity_type": "machine", "properties": {"temperature": 2, "status": null, "rpm": 5}},
        {"id": b, "entity_type": "machine", "properties": {"temperature": 4}},
        {"entity_type": "machine", "properties": {"temperature": 5}},
        {"id": a, "entity_type": "pump", "properties": {}},
        {"id": a, "entity_type": "machine", "parent_id": b},
    ]);
    let r = s.post("/v1/twins/bulk?upsert=true", &items).await;
    r.expect(200);
    assert_eq!(r.body["created"], 1, "{}", r.text);
    assert_eq!(r.body["updated"], 2, "{}", r.text);
    assert_eq!(
        rejected(&r.body),
        [(3, "conflict".to_owned()), (4, "conflict".to_owned())]
    );
    let ta = s.get(&format!("/v1/twins/{a}")).await.body;
    assert_eq!(ta["properties"], json!({"temperature": 2, "rpm": 5}));
    assert_eq!(ta["version"], 2);
    let tb = s.get(&format!("/v1/twins/{b}")).await.body;
    assert_eq!(tb["properties"], json!({"temperature": 4}));
    assert_eq!(tb["version"], 2);
    assert_eq!(ids(&r.body)[0].as_deref(), Some(a.as_str()));
    assert_eq!(s.twin_count().await, 3);
    s.post("/v1/twins/bulk?upsert=maybe", &items)
        .await
        .expect_error(400, "bad_request");
}

#[tokio::test]
async fn ndjson_bodies_and_commits_that_survive_a_kill() {
    let mut s = Server::start();
    let building = uuid::Uuid::now_v7();
    let mut nd = format!("{{\"id\":\"{building}\",\"entity_type\":\"building\"}}\n\n");
    for i in 0..500 {
        nd.push_str(&format!(
            "{{\"entity_type\":\"machine\",\"parent_id\":\"{building}\",\"properties\":{{\"temperature\":{i}}}}}\n"
        ));
    }
    nd.push_str("not json\n");
    let r = s
        .post_raw("/v1/twins/bulk", nd.as_bytes(), "application/x-ndjson")
        .await;
    r.expect(200);
    assert_eq!(r.body["created"], 501, "{}", r.text);
    // Blank lines are not items: the bad line is the 502nd item.
    assert_eq!(rejected(&r.body), [(501, "invalid_json".to_owned())]);
    let last = ids(&r.body)[500].clone().unwrap();
    // A 200 means durable: the twins are there after kill -9.
    s.kill9();
    s.restart();
    assert_eq!(s.twin_count().await, 501);
    let t = s.get(&format!("/v1/twins/{last}")).await;
    t.expect(200);
    assert_eq!(t.body["properties"]["temperature"], 499);
    assert_eq!(t.body["parent_id"], json!(building));
}

#[tokio::test]
async fn too_many_items_or_bytes_is_413_and_changes_nothing() {
    let s = Server::start_with(&["--max-bulk-items", "3", "--max-ingest-bytes", "2000"]);
    let item = json!({"entity_type": "machine", "properties": {"temperature": 1}});
    let r = s
        .post("/v1/twins/bulk", &json!([item, item, item, item]))
        .await;
    r.expect_error(413, "payload_too_large");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 3"),
        "{}",
        r.text
    );
    let nd = format!("{item}\n{item}\n{item}\n{item}\n");
    s.post_raw("/v1/twins/bulk", nd.as_bytes(), "application/x-ndjson")
        .await
        .expect_error(413, "payload_too_large");
    let big = json!([{"entity_type": "machine", "properties": {"blob": "x".repeat(3000)}}]);
    s.post("/v1/twins/bulk", &big)
        .await
        .expect_error(413, "payload_too_large");
    assert_eq!(s.twin_count().await, 0);
    let r = s.post("/v1/twins/bulk", &json!([item, item, item])).await;
    r.expect(200);
    assert_eq!(r.body["created"], 3);
}

#[tokio::test]
async fn cli_import_sends_batches_and_reports_created_updated_and_failed() {
    let s = Server::start();
    let building = uuid::Uuid::now_v7();
    let mut nd = format!("{{\"id\":\"{building}\",\"entity_type\":\"building\"}}\n");
    let mut machines = Vec::new();
    for i in 0..9 {
        let id = uuid::Uuid::now_v7();
        machines.push(id);
        nd.push_str(&format!(
            "{{\"id\":\"{id}\",\"entity_type\":\"machine\",\"parent_id\":\"{building}\",\"properties\":{{\"temperature\":{i}}}}}\n"
        ));
    }
    // Item 10: a parent that does not exist.
    nd.push_str(&format!(
        "{{\"entity_type\":\"machine\",\"parent_id\":\"{}\"}}\n",
        uuid::Uuid::now_v7()
    ));
    let file = s.tmp_dir().join("twins.ndjson");
    std::fs::write(&file, &nd).unwrap();
    let out = s.cli(&["twin", "import", file.to_str().unwrap(), "--batch", "3"]);
    // The refused item makes the exit status 1; the others are committed.
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("item 10: "), "{err}");
    assert!(err.contains("1 of 11 items were refused"), "{err}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("the summary on stdout");
    assert_eq!(
        (
            v["created"].clone(),
            v["updated"].clone(),
            v["failed"].clone()
        ),
        (json!(10), json!(0), json!(1)),
        "{v}"
    );
    let b = s.get(&format!("/v1/twins/{building}")).await.body;
    assert_eq!(b["children_ids"].as_array().unwrap().len(), 9, "{b}");

    // A JSON array with --upsert: existing twins are patched, new ones created.
    let arr = json!([
        {"id": machines[0], "entity_type": "machine", "properties": {"temperature": 100}},
        {"id": machines[8], "entity_type": "machine", "properties": {"status": "fault"}},
        {"entity_type": "machine", "parent_id": building},
    ]);
    let file = s.tmp_dir().join("twins.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&arr).unwrap()).unwrap();
    let out = s.cli(&[
        "twin",
        "import",
        file.to_str().unwrap(),
        "--upsert",
        "--batch",
        "2",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("the summary on stdout");
    assert_eq!(
        (
            v["created"].clone(),
            v["updated"].clone(),
            v["failed"].clone()
        ),
        (json!(1), json!(2), json!(0)),
        "{v}"
    );
    let t = s.get(&format!("/v1/twins/{}", machines[0])).await.body;
    assert_eq!(t["properties"]["temperature"], 100);
    let t = s.get(&format!("/v1/twins/{}", machines[8])).await.body;
    assert_eq!(
        t["properties"],
        json!({"temperature": 8, "status": "fault"})
    );
    assert_eq!(s.twin_count().await, 11);

    // `-` reads stdin.
    let nd = format!("{{\"entity_type\":\"machine\",\"parent_id\":\"{building}\"}}\n").repeat(4);
    let out = s.cli_with_stdin(&["twin", "import", "-"], nd.as_bytes());
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("the summary on stdout");
    assert_eq!(v["created"], 4, "{v}");
    assert_eq!(s.twin_count().await, 15);
}
