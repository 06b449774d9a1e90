//! Twins: the parent/child hierarchy with cascade delete, and the lifecycle (`retired` is
//! final). Create, patch, `If-Match` and the nesting limit are tested in-process
//! (`host/src/api/tests/twins.rs`).

use std::collections::BTreeSet;

use serde_json::json;

use crate::common::{id_set, ids, set, Server};

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
