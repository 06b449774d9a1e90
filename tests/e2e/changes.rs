//! The replication-ready write path through the real server: per-property clocks shown with
//! `?meta=true`, the upgrade of a format-1 data directory made by the previous release, and
//! the node id a data directory keeps.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::common::Server;

const FIXTURE_NODE: &str = "edge-1";
const B: &str = "01900000-0000-7000-8000-00000000000b";
const M1: &str = "01900000-0000-7000-8000-000000000001";
const M2: &str = "01900000-0000-7000-8000-000000000002";
const M3: &str = "01900000-0000-7000-8000-000000000003";
const M4: &str = "01900000-0000-7000-8000-000000000004";
const D: &str = "01900000-0000-7000-8000-00000000000d";

/// Unpack `tests/fixtures/v1-data.tar.gz` (see `make-v1-data.sh`) into `dir`.
fn unpack_v1(dir: &Path) {
    let fixture = format!(
        "{}/../tests/fixtures/v1-data.tar.gz",
        env!("CARGO_MANIFEST_DIR")
    );
    let st = Command::new("tar")
        .args(["xzf", &fixture, "-C"])
        .arg(dir)
        .status()
        .expect("running tar");
    assert!(st.success(), "tar xzf {fixture}");
}

fn seqs(page: &Value) -> Vec<u64> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

/// What the fixture holds, as the previous release served it.
async fn check_fixture_twins(s: &Server) {
    let m1 = s.get(&format!("/v1/twins/{M1}")).await;
    m1.expect(200);
    assert_eq!(m1.body["properties"]["temperature"], 74, "{}", m1.text);
    assert_eq!(m1.body["version"], 5);
    assert_eq!(m1.body["vclock"], json!({FIXTURE_NODE: 5}));
    // Only the write-ahead log held these (the old server was killed with -9).
    let m2 = s.get(&format!("/v1/twins/{M2}")).await.body;
    assert_eq!(m2["properties"]["temperature"], 99, "{m2}");
    s.get(&format!("/v1/twins/{M4}")).await.expect(200);
    let m3 = s.get(&format!("/v1/twins/{M3}")).await.body;
    assert_eq!(m3["lifecycle"], "suspended");
    s.get(&format!("/v1/twins/{D}"))
        .await
        .expect_error(404, "not_found");
    let b = s.get(&format!("/v1/twins/{B}")).await.body;
    assert_eq!(b["children_ids"].as_array().unwrap().len(), 4, "{b}");
    let rels = s.get(&format!("/v1/twins/{M1}/relationships")).await;
    assert_eq!(rels.body[0]["name"], "feeds", "{}", rels.text);
    assert_eq!(rels.body[0]["properties"], json!({"belt": "A"}));
    s.get("/v1/models/machine").await.expect(200);
    let h = s
        .get(&format!("/v1/twins/{M1}/history/temperature"))
        .await
        .body;
    let points: Vec<f64> = h["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    assert_eq!(points, vec![70.0, 71.0, 72.0, 73.0, 74.0]);
    let rule = s.get("/v1/rules/hot").await;
    rule.expect(200);
}

/// A data directory written by the previous release (format 1) is upgraded in place and
/// serves the same twins, history, relationships, models, rules and tokens; every twin gets
/// clocks from its stored data; the old event tail keeps its numbers and new changes are
/// numbered above every number the old release may have handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_directory_is_upgraded_in_place() {
    let mut s = Server::start_from(unpack_v1, Some(FIXTURE_NODE), &[]);
    assert!(
        s.log()
            .contains("upgrading the data directory from format 1 to 7"),
        "{}",
        crate::common::tail(&s.log(), 20)
    );
    check_fixture_twins(&s).await;
    // The fixture's read token still works.
    let read = std::fs::read_to_string(s.data_dir.join("read.token")).unwrap();
    s.with_token(read.trim())
        .get(&format!("/v1/twins/{M1}"))
        .await
        .expect(200);
    // Clocks derived from the stored data: every property last written at the twin's last
    // update, on the node that wrote it.
    let m1 = s.get(&format!("/v1/twins/{M1}?meta=true")).await.body;
    let meta = &m1["meta"];
    let updated = chrono::DateTime::parse_from_rfc3339(m1["updated_at"].as_str().unwrap())
        .unwrap()
        .timestamp_millis() as u64;
    assert_eq!(meta["hlc"], updated << 16, "{m1}");
    for p in ["temperature", "status"] {
        assert_eq!(meta["properties"][p]["origin"], FIXTURE_NODE, "{m1}");
        assert_eq!(meta["properties"][p]["hlc"], updated << 16, "{m1}");
    }
    // The old tail (events 1..=11, persisted by the old release) keeps its numbers.
    let old = s.get("/v1/events/log?after=0&limit=100").await.body;
    let old_seqs = seqs(&old);
    assert_eq!(old_seqs[..11], (1..=11).collect::<Vec<_>>()[..], "{old}");
    assert_eq!(old["events"][0]["type"], "twin.created");
    assert_eq!(old["events"][0]["twin_id"], B);
    // The change feed pages through every upgraded twin: each got a number of its own.
    let feed = s.get("/v1/changes?after=0").await.body;
    let items = feed["items"].as_array().unwrap();
    assert_eq!(items.len(), 5, "{feed}");
    for w in items.windows(2) {
        assert!(w[0]["lseq"].as_u64() < w[1]["lseq"].as_u64(), "{feed}");
    }
    assert!(items[0]["lseq"].as_u64().unwrap() > 11, "{feed}");
    // New changes are numbered above the old release's reservation, without reuse.
    let r = s
        .patch(&format!("/v1/twins/{M1}"), &json!({"temperature": 80}))
        .await;
    r.expect(200);
    let page = s.get("/v1/events/log?after=11&limit=100").await.body;
    let new = seqs(&page);
    assert_eq!(new.len(), 1, "{page}");
    assert!(new[0] > 11, "{page}");
    let m1 = s.get(&format!("/v1/twins/{M1}?meta=true")).await.body;
    assert_eq!(m1["meta"]["lseq"], new[0], "{m1}");
    assert!(m1["meta"]["properties"]["temperature"]["hlc"].as_u64() > Some(updated << 16));
    assert_eq!(
        m1["meta"]["properties"]["status"]["hlc"],
        updated << 16,
        "an untouched property keeps its clock: {m1}"
    );

    // A clean restart reads format 2 as it is: no second upgrade, the same twins.
    s.stop().expect("clean stop");
    s.restart();
    let upgrades = s
        .log()
        .matches("upgrading the data directory from format 1")
        .count();
    assert_eq!(upgrades, 1, "{}", crate::common::tail(&s.log(), 20));
    let m1 = s.get(&format!("/v1/twins/{M1}?meta=true")).await.body;
    assert_eq!(m1["properties"]["temperature"], 80);
    assert_eq!(m1["meta"]["lseq"], new[0]);
}

/// A data directory keeps the node id it was created with: another `--node-id` is refused
/// with a clear message, and leaving it out uses the stored one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_id_is_refused() {
    let mut s = Server::start();
    s.stop().expect("clean stop");
    let out = crate::common::twinhost_command()
        .arg("serve")
        .arg("--data-dir")
        .arg(&s.data_dir)
        .args(["--listen", "127.0.0.1:0", "--node-id", "someone-else"])
        .output()
        .expect("running serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("differs from") && err.contains(crate::common::NODE_ID),
        "{err}"
    );
    s.node_id = None;
    s.restart();
    let m = s.get("/v1/metrics").await.body;
    assert_eq!(m["node_id"], crate::common::NODE_ID);
}

/// `?meta=true` shows the change number, the twin's HLC and version vector, and each
/// property's clock and origin, removed properties included; the plain twin shows none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_shows_clocks_per_property() {
    let s = Server::start();
    let id = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"a": 1, "b": 2}}))
        .await;
    let t0 = s.get(&format!("/v1/twins/{id}?meta=true")).await.body;
    let m0 = &t0["meta"];
    assert_eq!(m0["properties"]["a"], m0["properties"]["b"]);
    assert_eq!(m0["properties"]["a"]["origin"], crate::common::NODE_ID);
    assert_eq!(m0["properties"]["a"]["hlc"], m0["hlc"]);
    s.patch(&format!("/v1/twins/{id}"), &json!({"a": 5, "b": null}))
        .await
        .expect(200);
    let t1 = s.get(&format!("/v1/twins/{id}?meta=true")).await;
    t1.expect(200);
    assert_eq!(t1.header("etag").as_deref(), Some("\"2\""));
    let m1 = &t1.body["meta"];
    assert!(m1["hlc"].as_u64() > m0["hlc"].as_u64(), "{m1}");
    assert!(m1["lseq"].as_u64() > m0["lseq"].as_u64(), "{m1}");
    assert_eq!(m1["properties"]["a"]["hlc"], m1["hlc"]);
    // The removal of b is a write with its own clock.
    assert_eq!(m1["properties"]["b"]["hlc"], m1["hlc"]);
    assert_eq!(m1["vclock"], json!({crate::common::NODE_ID: 2}));
    assert_eq!(t1.body["properties"], json!({"a": 5}));
    let plain = s.get(&format!("/v1/twins/{id}")).await.body;
    assert!(
        plain.get("meta").is_none() && plain.get("clocks").is_none(),
        "{plain}"
    );
    s.get(&format!("/v1/twins/{id}?meta=yes"))
        .await
        .expect_error(400, "bad_request");
}

async fn changes(s: &Server, query: &str) -> Value {
    let r = s.get(&format!("/v1/changes?{query}")).await;
    r.expect(200);
    r.body
}

fn feed_ids(page: &Value) -> Vec<(String, bool)> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["twin_id"].as_str().unwrap().to_owned(),
                i["deleted"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// A delete leaves a tombstone: the twin stays 404, the change feed shows the tombstone
/// (with its clock, version vector and change number), its id is refused until it expires
/// and free again afterwards — across a crash too. The feed pages in change-number order with
/// one entry per twin, and only admin and peer tokens read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_and_the_change_feed() {
    let mut s = Server::start_with(&["--tombstone-retention", "3s"]);
    let x = "01900000-0000-7000-8000-0000000000aa";
    s.create_twin(&json!({"id": x, "entity_type": "machine", "properties": {"t": 1}}))
        .await;
    let y = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"t": 2}}))
        .await;
    for t in 3..6 {
        s.patch(&format!("/v1/twins/{y}"), &json!({"t": t}))
            .await
            .expect(200);
    }
    s.delete(&format!("/v1/twins/{x}")).await.expect(204);
    s.get(&format!("/v1/twins/{x}"))
        .await
        .expect_error(404, "not_found");

    // One entry per twin, in change-number order: y (last patched), then x's tombstone.
    let all = changes(&s, "after=0").await;
    assert_eq!(
        feed_ids(&all),
        vec![(y.clone(), false), (x.to_owned(), true)],
        "{all}"
    );
    let (ey, ex) = (&all["items"][0], &all["items"][1]);
    assert_eq!(ey["properties"], json!({"t": 5}));
    assert_eq!(ey["version"], 4);
    assert_eq!(ey["clocks"]["t"]["origin"], crate::common::NODE_ID);
    assert_eq!(ey["clocks"]["t"]["hlc"], ey["hlc"]);
    assert_eq!(ex["entity_type"], "machine");
    assert_eq!(ex["vclock"], json!({crate::common::NODE_ID: 2}));
    assert!(ex["hlc"].as_u64() > ey["hlc"].as_u64(), "{all}");
    assert!(ex["lseq"].as_u64() > ey["lseq"].as_u64(), "{all}");
    assert_eq!(all["next"], ex["lseq"]);
    // Paging.
    let p1 = changes(&s, "after=0&limit=1").await;
    assert_eq!(feed_ids(&p1), vec![(y.clone(), false)]);
    let p2 = changes(&s, &format!("after={}&limit=1", p1["next"])).await;
    assert_eq!(feed_ids(&p2), vec![(x.to_owned(), true)]);
    let p3 = changes(&s, &format!("after={}", p2["next"])).await;
    assert_eq!(feed_ids(&p3), vec![]);
    assert_eq!(p3["next"], p2["next"], "an empty page keeps the cursor");

    // The id is refused while the tombstone lasts, across a crash too.
    let r = s
        .post("/v1/twins", &json!({"id": x, "entity_type": "machine"}))
        .await;
    r.expect_error(409, "conflict");
    assert!(r.text.contains("tombstone"), "{}", r.text);
    s.kill9();
    s.restart();
    assert_eq!(
        feed_ids(&changes(&s, "after=0").await),
        vec![(y.clone(), false), (x.to_owned(), true)]
    );
    s.post("/v1/twins", &json!({"id": x, "entity_type": "machine"}))
        .await
        .expect_error(409, "conflict");
    // Expired: the id is free, the tombstone leaves the feed and the twin takes its place.
    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    s.post("/v1/twins", &json!({"id": x, "entity_type": "machine"}))
        .await
        .expect(201);
    assert_eq!(
        feed_ids(&changes(&s, "after=0").await),
        vec![(y.clone(), false), (x.to_owned(), false)]
    );

    // Who may read it.
    let peer = s.create_token("peer").await;
    let read = s.create_token("read").await;
    let (peer, read) = (s.with_token(&peer), s.with_token(&read));
    peer.get("/v1/changes").await.expect(200);
    peer.get("/v1/twins").await.expect(403);
    read.get("/v1/changes").await.expect(403);
    s.get("/v1/changes?limit=0")
        .await
        .expect_error(400, "bad_request");
    s.get("/v1/changes?after=x")
        .await
        .expect_error(400, "bad_request");
}

/// Relationship and model changes are numbered like twin changes: each is an event
/// (`relationship.changed`, `model.changed`) in the same contiguous order, and a crash right
/// after them loses none (they are re-created from the write-ahead log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relationship_and_model_changes_are_numbered_events() {
    let mut s = Server::start();
    s.put(
        "/v1/models/machine",
        &json!({"properties": {"t": {"type": "number"}}}),
    )
    .await
    .expect(201);
    let a = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"t": 1}}))
        .await;
    let b = s.create_twin_id(&json!({"entity_type": "machine"})).await;
    s.put(
        &format!("/v1/twins/{a}/relationships/feeds/{b}"),
        &json!({"belt": 1}),
    )
    .await
    .expect(201);
    s.delete(&format!("/v1/twins/{a}/relationships/feeds/{b}"))
        .await
        .expect(204);
    s.delete("/v1/models/machine").await.expect(204);
    s.kill9();
    s.restart();
    let log = s.get("/v1/events/log?after=0&limit=100").await.body;
    let events = log["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        vec![
            "model.changed",
            "twin.created",
            "twin.created",
            "relationship.changed",
            "relationship.changed",
            "model.changed"
        ],
        "{log}"
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
    assert_eq!(events[0]["entity_type"], "machine");
    assert_eq!(
        events[0]["data"]["model"]["properties"]["t"]["type"],
        "number"
    );
    assert_eq!(events[3]["twin_id"], a.as_str());
    assert_eq!(
        events[3]["data"],
        json!({"name": "feeds", "target_id": b, "properties": {"belt": 1}})
    );
    assert_eq!(events[4]["data"]["deleted"], true);
    assert_eq!(
        events[5]["data"],
        json!({"entity_type": "machine", "deleted": true})
    );
    // Filters see them by type.
    let only = s
        .get("/v1/events/log?after=0&types=relationship.changed")
        .await
        .body;
    assert_eq!(only["events"].as_array().unwrap().len(), 2, "{only}");
}

/// Unpack `tests/fixtures/v2-data.tar.gz` (see `make-v2-data.sh`) into `dir`.
fn unpack_v2(dir: &Path) {
    unpack("v2-data.tar.gz", dir);
}

/// The format-3 fixture: the same steps as the format-2 one (`make-v3-data.sh`), written by
/// the last build of format 3.
fn unpack_v3(dir: &Path) {
    unpack("v3-data.tar.gz", dir);
}

/// The format-4 fixture (`make-v4-data.sh`): the same steps, written by the last build of
/// format 4.
fn unpack_v4(dir: &Path) {
    unpack("v4-data.tar.gz", dir);
}

/// The format-5 fixture (`make-v5-data.sh`): the same steps, written by the last build of
/// format 5 (twins in the compact layout before format 6's short updated time and unnamed
/// clocks, in twin files and in the log tail).
fn unpack_v5(dir: &Path) {
    unpack("v5-data.tar.gz", dir);
}

/// The format-6 fixture (`make-v6-data.sh`): the same steps, written by the last build of
/// format 6.
fn unpack_v6(dir: &Path) {
    unpack("v6-data.tar.gz", dir);
}

fn unpack(name: &str, dir: &Path) {
    let fixture = format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let st = Command::new("tar")
        .args(["xzf", &fixture, "-C"])
        .arg(dir)
        .status()
        .expect("running tar");
    assert!(st.success(), "tar xzf {fixture}");
}

/// What the format-2 fixture holds, as the release that wrote it served it.
async fn check_v2_twins(s: &Server) {
    let m1 = s.get(&format!("/v1/twins/{M1}")).await;
    m1.expect(200);
    assert_eq!(m1.body["properties"]["temperature"], 74, "{}", m1.text);
    assert_eq!(m1.body["version"], 5);
    assert_eq!(m1.body["vclock"], json!({"edge-2": 5}));
    // Numbers keep their kind: a float, and an integer above i64::MAX.
    let m2 = s.get(&format!("/v1/twins/{M2}")).await.body;
    assert_eq!(m2["properties"]["counter"], json!(u64::MAX), "{m2}");
    // Only the write-ahead log held these (the old server was killed with -9).
    assert_eq!(m2["properties"]["temperature"], 99, "{m2}");
    s.get(&format!("/v1/twins/{M4}")).await.expect(200);
    let m3 = s.get(&format!("/v1/twins/{M3}")).await.body;
    assert_eq!(m3["lifecycle"], "suspended");
    s.get(&format!("/v1/twins/{D}"))
        .await
        .expect_error(404, "not_found");
    let b = s.get(&format!("/v1/twins/{B}")).await.body;
    let mut kids: Vec<&str> = b["children_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    kids.sort();
    assert_eq!(kids, [M1, M2, M3, M4], "{b}");
    assert_eq!(
        b["properties"]["site"],
        json!({"floors": [1, 2.5, "roof"], "open": true, "manager": null}),
        "{b}"
    );
    assert!(b["properties"]["site"]["floors"][1].is_f64());
    let rels = s.get(&format!("/v1/twins/{M1}/relationships")).await;
    assert_eq!(rels.body[0]["name"], "feeds", "{}", rels.text);
    assert_eq!(rels.body[0]["target_id"], M2);
    assert_eq!(rels.body[0]["properties"], json!({"belt": "A"}));
    s.get("/v1/models/machine").await.expect(200);
    let h = s
        .get(&format!("/v1/twins/{M1}/history/temperature"))
        .await
        .body;
    let points: Vec<f64> = h["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    assert_eq!(points, vec![70.0, 71.0, 72.5, 73.0, 74.0]);
    s.get("/v1/rules/hot").await.expect(200);
}

/// A data directory of format 2 (twin records as JSON in sled) opens with this build: the
/// same twins, values, versions, children and relationships, the log tail the old server left
/// replayed; its twins move into twin files once, and writes and a restart work as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_2_directory_with_json_records_still_opens() {
    an_older_directory_opens(2, unpack_v2).await;
}

/// The same for format 3 (compact twin records, one sled key each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_3_directory_with_a_sled_key_per_twin_still_opens() {
    an_older_directory_opens(3, unpack_v3).await;
}

/// The same for format 4 (twin files; the log tail's created twin is JSON, which format 5
/// and later write compact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_4_directory_with_a_json_log_tail_still_opens() {
    an_older_directory_opens(4, unpack_v4).await;
}

/// The same for format 5 (compact twins without format 6's flags, at rest and in the log
/// tail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_5_directory_with_the_older_compact_layout_still_opens() {
    an_older_directory_opens(5, unpack_v5).await;
}

/// The same for format 6 (history folded into a sled key per series; this directory's
/// history is in its journal, which format 7 folds into blocks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_6_directory_opens_and_its_history_folds_into_blocks() {
    an_older_directory_opens(6, unpack_v6).await;
    // Folded at every checkpoint: the journal's samples go into history blocks, and are read
    // from there, before and after a restart.
    let mut s = Server::start_from(unpack_v6, Some("edge-2"), &["--history-fold-every", "0s"]);
    let journal = s.data_dir.join("history");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_dir(&journal).unwrap().count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the journal was not folded: {}",
            crate::common::tail(&s.log(), 20)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let temperatures = |h: &serde_json::Value| -> Vec<f64> {
        h["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["value"].as_f64().unwrap())
            .collect()
    };
    let path = format!("/v1/twins/{M1}/history/temperature");
    assert_eq!(
        temperatures(&s.get(&path).await.body),
        vec![70.0, 71.0, 72.5, 73.0, 74.0]
    );
    s.patch(&format!("/v1/twins/{M1}"), &json!({"temperature": 75}))
        .await
        .expect(200);
    s.stop().expect("clean stop");
    s.restart();
    assert_eq!(
        temperatures(&s.get(&path).await.body),
        vec![70.0, 71.0, 72.5, 73.0, 74.0, 75.0]
    );
    let two = s
        .get(&format!(
            "{path}?from=1970-01-01T00:00:00Z&to=2100-01-01T00:00:00Z"
        ))
        .await;
    assert_eq!(temperatures(&two.body).len(), 6, "{}", two.text);
}

async fn an_older_directory_opens(format: u64, unpack: fn(&Path)) {
    let mut s = Server::start_from(unpack, Some("edge-2"), &[]);
    assert!(
        s.log().contains(&format!(
            "upgrading the data directory from format {format} to 7"
        )),
        "{}",
        crate::common::tail(&s.log(), 20)
    );
    let files = std::fs::read_dir(s.data_dir.join("twins")).unwrap().count();
    // The upgrade's file of every twin, and soon the first checkpoint's of the replayed tail.
    assert!((1..=2).contains(&files), "{files} twin files");
    check_v2_twins(&s).await;
    let read = std::fs::read_to_string(s.data_dir.join("read.token")).unwrap();
    s.with_token(read.trim())
        .get(&format!("/v1/twins/{M1}"))
        .await
        .expect(200);
    let m1 = s.get(&format!("/v1/twins/{M1}?meta=true")).await.body;
    assert_eq!(m1["meta"]["properties"]["temperature"]["origin"], "edge-2");
    // Writes after the upgrade, then a clean restart and a crash.
    s.patch(&format!("/v1/twins/{M1}"), &json!({"temperature": 80.25}))
        .await
        .expect(200);
    let m5 = s
        .create_twin_id(&json!({"entity_type": "machine", "parent_id": B,
                                "properties": {"status": "operational", "temperature": 61}}))
        .await;
    s.stop().expect("clean stop");
    s.restart();
    assert_eq!(
        s.log()
            .matches(&format!(
                "upgrading the data directory from format {format}"
            ))
            .count(),
        1,
        "{}",
        crate::common::tail(&s.log(), 20)
    );
    let m1 = s.get(&format!("/v1/twins/{M1}")).await;
    assert_eq!(m1.body["properties"]["temperature"], 80.25, "{}", m1.text);
    assert_eq!(m1.body["version"], 6);
    let b = s.get(&format!("/v1/twins/{B}")).await.body;
    assert_eq!(b["children_ids"].as_array().unwrap().len(), 5, "{b}");
    s.patch(&format!("/v1/twins/{m5}"), &json!({"temperature": 62}))
        .await
        .expect(200);
    s.kill9();
    s.restart();
    let m5 = s.get(&format!("/v1/twins/{m5}")).await.body;
    assert_eq!(m5["properties"]["temperature"], 62, "{m5}");
    assert_eq!(m5["version"], 2);
    let m2 = s.get(&format!("/v1/twins/{M2}")).await.body;
    assert_eq!(m2["properties"]["counter"], json!(u64::MAX), "{m2}");
}
