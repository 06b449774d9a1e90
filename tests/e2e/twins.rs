//! Twins: create and read (Location, ETag), patch as a JSON merge patch with `If-Match`,
//! delete, the nesting limit of values, the parent/child hierarchy with cascade delete, and the
//! lifecycle (`retired` is final).

use std::collections::BTreeSet;

use chrono::Utc;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{id_set, ids, set, time, Body, Server};

#[tokio::test]
async fn twin_create_get_with_location_and_etag() {
    let s = Server::start();
    let before = Utc::now() - chrono::Duration::seconds(5);
    let r = s
        .post(
            "/v1/twins",
            &json!({"entity_type": "machine", "properties": {"temperature": 68.5, "status": "operational"}}),
        )
        .await;
    r.expect(201);
    let id = r.body["id"].as_str().expect("id").to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    assert_eq!(r.header("location"), Some(format!("/v1/twins/{id}")));
    assert_eq!(r.header("etag").as_deref(), Some("\"1\""));
    let t = &r.body;
    assert_eq!(t["entity_type"], "machine");
    assert_eq!(
        t["properties"],
        json!({"temperature": 68.5, "status": "operational"})
    );
    assert_eq!(t["version"], 1);
    assert_eq!(t["vclock"], json!({"node-test": 1}));
    assert_eq!(t["parent_id"], Value::Null);
    assert_eq!(t["children_ids"], json!([]));
    assert_eq!(t["lifecycle"], "active");
    assert!(time(&t["created_at"]) >= before);
    assert_eq!(t["created_at"], t["updated_at"]);

    let g = s.get(&format!("/v1/twins/{id}")).await;
    g.expect(200);
    assert_eq!(g.header("etag").as_deref(), Some("\"1\""));
    assert_eq!(&g.body, t);

    // A client-supplied id (any UUID), then the same id again.
    let mine = uuid::Uuid::new_v4().to_string();
    let r = s
        .post("/v1/twins", &json!({"id": mine, "entity_type": "machine"}))
        .await;
    r.expect(201);
    assert_eq!(r.body["id"], mine.as_str());
    assert_eq!(r.body["properties"], json!({}));
    assert_eq!(r.header("location"), Some(format!("/v1/twins/{mine}")));
    s.post("/v1/twins", &json!({"id": mine, "entity_type": "other"}))
        .await
        .expect_error(409, "conflict");
    assert_eq!(
        s.get(&format!("/v1/twins/{mine}")).await.body["entity_type"],
        "machine"
    );

    // Unknown parent.
    let r = s
        .post(
            "/v1/twins",
            &json!({"entity_type": "machine", "parent_id": uuid::Uuid::new_v4().to_string()}),
        )
        .await;
    r.expect_error(404, "not_found");
    s.get(&format!("/v1/twins/{}", uuid::Uuid::new_v4()))
        .await
        .expect_error(404, "not_found");
    assert_eq!(s.twin_count().await, 2);
}

#[tokio::test]
async fn twin_patch_merge_if_match_and_delete() {
    let s = Server::start();
    let id = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {
            "temperature": 68.5, "status": "operational", "old": true,
            "config": {"a": 1, "b": {"c": 2}}}}))
        .await;
    let path = format!("/v1/twins/{id}");

    let r = s
        .patch(&path, &json!({"temperature": 70, "old": null, "config": {"a": null, "b": {"d": 3}}, "new": "x"}))
        .await;
    r.expect(200);
    assert_eq!(r.header("etag").as_deref(), Some("\"2\""));
    assert_eq!(r.body["version"], 2);
    assert_eq!(r.body["vclock"], json!({"node-test": 2}));
    assert_eq!(
        r.body["properties"],
        json!({"temperature": 70, "status": "operational", "config": {"b": {"c": 2, "d": 3}}, "new": "x"})
    );
    assert!(time(&r.body["updated_at"]) >= time(&r.body["created_at"]));
    let g = s.get(&path).await;
    assert_eq!(g.body["properties"], r.body["properties"]);
    assert_eq!(g.header("etag").as_deref(), Some("\"2\""));
    // An empty patch changes nothing: same version, no event.
    let r = s.patch(&path, &json!({})).await;
    r.expect(200);
    assert_eq!(r.body["version"], 2);
    let log = s.get(&format!("/v1/events/log?twin_id={id}")).await;
    assert_eq!(
        log.body["events"].as_array().unwrap().len(),
        2,
        "{}",
        log.text
    );

    // If-Match that does not name the current version → 412, no change.
    let r = s
        .send(
            Method::PATCH,
            &path,
            Some(&s.token),
            Body::Json(&json!({"temperature": 1})),
            &[("if-match", "\"1\"")],
        )
        .await;
    r.expect_error(412, "version_mismatch");
    let g = s.get(&path).await;
    assert_eq!(g.body["version"], 2);
    assert_eq!(g.body["properties"]["temperature"], 70);

    // Matching If-Match → 200.
    let r = s
        .send(
            Method::PATCH,
            &path,
            Some(&s.token),
            Body::Json(&json!({"temperature": 72})),
            &[("if-match", "\"2\"")],
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["version"], 3);
    assert_eq!(r.body["properties"]["temperature"], 72);
    s.send(
        Method::PATCH,
        &path,
        Some(&s.token),
        Body::Json(&json!({"x": 1})),
        &[("if-match", "nope")],
    )
    .await
    .expect_error(400, "bad_request");

    // A patch must be an object.
    s.patch(&path, &json!([1, 2]))
        .await
        .expect_error(400, "bad_request");
    assert_eq!(s.get(&path).await.body["version"], 3);

    s.delete(&path).await.expect(204);
    s.get(&path).await.expect_error(404, "not_found");
    s.delete(&path).await.expect_error(404, "not_found");
    s.patch(&path, &json!({"a": 1}))
        .await
        .expect_error(404, "not_found");
    assert_eq!(s.twin_count().await, 0);
}

/// Values nested deeper than 32 levels are refused on every write path (the event log, history
/// and every reader must parse them back); 32 levels are stored and read back from the log.
#[tokio::test]
async fn deeply_nested_values_are_refused_and_the_log_stays_readable() {
    let s = Server::start();
    fn nested(levels: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!([v]);
        }
        v
    }
    let id = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"a": 1}}))
        .await;
    let r = s
        .patch(&format!("/v1/twins/{id}"), &json!({"deep": nested(33)}))
        .await;
    r.expect_error(400, "bad_request");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("32 levels"),
        "{}",
        r.text
    );
    s.post(
        "/v1/twins",
        &json!({"entity_type": "machine", "properties": {"deep": nested(40)}}),
    )
    .await
    .expect_error(400, "bad_request");
    let r = s
        .post(
            "/v1/ingest",
            &json!([{"twin_id": id, "properties": {"deep": nested(100)}},
                                    {"twin_id": id, "properties": {"a": 2}}]),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["applied"], 1, "{}", r.text);
    assert_eq!(r.body["rejected"][0]["index"], 0, "{}", r.text);
    let other = s.create_twin_id(&json!({"entity_type": "machine"})).await;
    s.put(
        &format!("/v1/twins/{id}/relationships/feeds/{other}"),
        &json!({"deep": nested(40)}),
    )
    .await
    .expect_error(400, "bad_request");
    // The deepest allowed value is stored, evented and read back from the log.
    s.patch(&format!("/v1/twins/{id}"), &json!({"deep": nested(32)}))
        .await
        .expect(200);
    let t = s.get(&format!("/v1/twins/{id}")).await;
    t.expect(200);
    assert_eq!(t.body["properties"]["deep"], nested(32));
    let log = s.get(&format!("/v1/events/log?twin_id={id}")).await;
    log.expect(200);
    let evs = log.body["events"].as_array().unwrap();
    assert_eq!(
        evs.last().unwrap()["changed"]["deep"],
        nested(32),
        "{}",
        log.text
    );
    assert_eq!(evs.len(), 3, "created, a=2, deep: {}", log.text);
}

#[tokio::test]
async fn hierarchy_children_ancestors_and_cascade_delete() {
    let s = Server::start();
    let site = s.create_twin_id(&json!({"entity_type": "site"})).await;
    let building = s
        .create_twin_id(&json!({"entity_type": "building", "parent_id": site}))
        .await;
    let m1 = s
        .create_twin_id(&json!({"entity_type": "machine", "parent_id": building}))
        .await;
    let m2 = s
        .create_twin_id(&json!({"entity_type": "machine", "parent_id": building}))
        .await;

    let r = s.get(&format!("/v1/twins/{site}")).await;
    assert_eq!(r.body["children_ids"], json!([building]));
    let r = s.get(&format!("/v1/twins/{building}")).await;
    assert_eq!(r.body["parent_id"], site.as_str());
    let kids: BTreeSet<String> = r.body["children_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kids, set(&[&m1, &m2]));

    let r = s.get(&format!("/v1/twins/{building}/children")).await;
    r.expect(200);
    assert_eq!(id_set(&r.body), set(&[&m1, &m2]));
    let r = s.get(&format!("/v1/twins/{m1}/children")).await;
    r.expect(200);
    assert_eq!(r.body, json!([]));

    let r = s.get(&format!("/v1/twins/{m1}/ancestors")).await;
    r.expect(200);
    assert_eq!(
        ids(&r.body),
        vec![building.clone(), site.clone()],
        "nearest first"
    );
    assert_eq!(r.body[1]["children_ids"], json!([building]));
    let r = s.get(&format!("/v1/twins/{site}/ancestors")).await;
    assert_eq!(r.body, json!([]));
    s.get(&format!("/v1/twins/{}/children", uuid::Uuid::new_v4()))
        .await
        .expect_error(404, "not_found");

    // A twin with children is not deleted without cascade.
    s.delete(&format!("/v1/twins/{building}"))
        .await
        .expect_error(409, "conflict");
    s.delete(&format!("/v1/twins/{site}"))
        .await
        .expect_error(409, "conflict");
    assert_eq!(s.twin_count().await, 4);

    s.delete(&format!("/v1/twins/{building}?cascade=true"))
        .await
        .expect(204);
    for gone in [&building, &m1, &m2] {
        s.get(&format!("/v1/twins/{gone}"))
            .await
            .expect_error(404, "not_found");
    }
    let r = s.get(&format!("/v1/twins/{site}")).await;
    r.expect(200);
    assert_eq!(r.body["children_ids"], json!([]));
    assert_eq!(s.twin_count().await, 1);
    // Now a leaf: deletable without cascade.
    s.delete(&format!("/v1/twins/{site}")).await.expect(204);
}

#[tokio::test]
async fn lifecycle_retired_is_final() {
    let s = Server::start();
    let id = s
        .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": 60}}))
        .await;
    let lc = format!("/v1/twins/{id}/lifecycle");

    let r = s.put(&lc, &json!({"state": "suspended"})).await;
    r.expect(200);
    assert_eq!(r.body["lifecycle"], "suspended");
    assert_eq!(r.body["version"], 2);
    // A suspended twin still takes updates.
    s.patch(&format!("/v1/twins/{id}"), &json!({"temperature": 61}))
        .await
        .expect(200);

    let r = s.put(&lc, &json!({"state": "retired"})).await;
    r.expect(200);
    assert_eq!(r.body["lifecycle"], "retired");
    let version = r.body["version"].as_u64().unwrap();

    s.patch(&format!("/v1/twins/{id}"), &json!({"temperature": 62}))
        .await
        .expect_error(409, "conflict");
    s.put(&lc, &json!({"state": "active"}))
        .await
        .expect_error(409, "conflict");
    s.put(&lc, &json!({"state": "suspended"}))
        .await
        .expect_error(409, "conflict");
    // Ingest to a retired twin is rejected per item.
    let r = s
        .post(
            "/v1/ingest",
            &json!([{"twin_id": id, "properties": {"temperature": 63}}]),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["applied"], 0);
    assert_eq!(r.body["rejected"][0]["index"], 0);
    assert_eq!(r.body["rejected"][0]["error"]["code"], "conflict");

    s.put(&lc, &json!({"state": "gone"}))
        .await
        .expect_error(400, "bad_request");

    let r = s.get(&format!("/v1/twins/{id}")).await;
    r.expect(200);
    assert_eq!(r.body["lifecycle"], "retired");
    assert_eq!(r.body["version"], version);
    assert_eq!(r.body["properties"]["temperature"], 61);
    // It takes no new children and no new relationships of its own; others may still point
    // at it.
    s.post(
        "/v1/twins",
        &json!({"entity_type": "machine", "parent_id": id}),
    )
    .await
    .expect_error(409, "conflict");
    let other = s.create_twin_id(&json!({"entity_type": "machine"})).await;
    s.put(
        &format!("/v1/twins/{id}/relationships/feeds/{other}"),
        &json!({}),
    )
    .await
    .expect_error(409, "conflict");
    s.put(
        &format!("/v1/twins/{other}/relationships/replaces/{id}"),
        &json!({}),
    )
    .await
    .expect(201);
    // A retired twin can still be deleted (its relationships go with it).
    s.delete(&format!("/v1/twins/{id}")).await.expect(204);
}
