//! `POST /v1/query`: filters on entity type, properties and the hierarchy, and paging.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::common::{id_set, ids, set, Server};

#[tokio::test]
async fn query_filters_hierarchy_and_paging() {
    let s = Server::start();
    let site = s.create_twin_id(&json!({"entity_type": "site"})).await;
    let hall = s
        .create_twin_id(&json!({"entity_type": "building", "parent_id": site}))
        .await;
    let mut operational = BTreeMap::new();
    for (i, t) in [60, 80, 90, 100, 70].into_iter().enumerate() {
        let mut props = json!({"status": "operational", "temperature": t});
        if i == 0 {
            props["alarm"] = json!(true);
        }
        let parent = if i < 3 { json!(hall) } else { Value::Null };
        let id = s
            .create_twin_id(
                &json!({"entity_type": "machine", "properties": props, "parent_id": parent}),
            )
            .await;
        operational.insert(t, id);
    }
    let mut faulty = Vec::new();
    for t in [95, 50] {
        faulty.push(
            s.create_twin_id(&json!({"entity_type": "machine", "properties": {"status": "fault", "temperature": t}}))
                .await,
        );
    }
    // Same properties, another entity type.
    s.create_twin(&json!({"entity_type": "sensor", "properties": {"status": "operational", "temperature": 99}}))
        .await;

    let query = |body: Value| {
        let s = &s;
        async move {
            let r = s.post("/v1/query", &body).await;
            r.expect(200);
            r.body
        }
    };

    // The seed's shape.
    let r = query(json!({"entity_type": "machine", "properties": {"status": "operational"}})).await;
    assert_eq!(id_set(&r["items"]), operational.values().cloned().collect());
    assert_eq!(r["next_cursor"], Value::Null);

    let r = query(json!({"entity_type": "machine", "where": [{"property": "temperature", "op": ">", "value": 85}]})).await;
    assert_eq!(
        id_set(&r["items"]),
        set(&[&operational[&90], &operational[&100], &faulty[0]])
    );
    let r = query(
        json!({"entity_type": "machine", "properties": {"status": "operational"},
                         "where": [{"property": "temperature", "op": ">", "value": 85}]}),
    )
    .await;
    assert_eq!(
        id_set(&r["items"]),
        set(&[&operational[&90], &operational[&100]])
    );
    let r = query(
        json!({"where": [{"property": "status", "op": "in", "value": ["fault", "maintenance"]}]}),
    )
    .await;
    assert_eq!(id_set(&r["items"]), set(&[&faulty[0], &faulty[1]]));
    let r = query(json!({"where": [{"property": "alarm", "op": "exists"}]})).await;
    assert_eq!(id_set(&r["items"]), set(&[&operational[&60]]));
    let r = query(json!({"entity_type": "machine",
                         "where": [{"property": "temperature", "op": "<=", "value": 70},
                                   {"property": "status", "op": "!=", "value": "fault"}]}))
    .await;
    assert_eq!(
        id_set(&r["items"]),
        set(&[&operational[&60], &operational[&70]])
    );

    // Hierarchy: direct children, then anything below (grandchildren).
    let r = query(json!({"parent_id": hall})).await;
    let under_hall = set(&[&operational[&60], &operational[&80], &operational[&90]]);
    assert_eq!(id_set(&r["items"]), under_hall);
    let r = query(json!({"parent_id": site})).await;
    assert_eq!(id_set(&r["items"]), set(&[&hall]));
    let r = query(json!({"ancestor_id": site})).await;
    let mut below_site = under_hall.clone();
    below_site.insert(hall.clone());
    assert_eq!(id_set(&r["items"]), below_site);
    let r = query(json!({"ancestor_id": site, "entity_type": "machine",
                         "where": [{"property": "temperature", "op": ">=", "value": 80}]}))
    .await;
    assert_eq!(
        id_set(&r["items"]),
        set(&[&operational[&80], &operational[&90]])
    );
    // Items carry children_ids.
    let r = query(json!({"entity_type": "building"})).await;
    assert_eq!(r["items"][0]["children_ids"].as_array().unwrap().len(), 3);

    // Paging: limit 2 walks all 7 machines with no duplicates.
    let mut seen = Vec::new();
    let mut cursor = Value::Null;
    let mut pages = 0;
    loop {
        let r = query(json!({"entity_type": "machine", "limit": 2, "cursor": cursor})).await;
        let page = ids(&r["items"]);
        assert!(page.len() <= 2 && !page.is_empty(), "{r}");
        seen.extend(page);
        pages += 1;
        assert!(pages <= 10, "paging does not end");
        cursor = r["next_cursor"].clone();
        if cursor.is_null() {
            break;
        }
        assert!(cursor.is_string(), "{r}");
    }
    assert_eq!(pages, 4);
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "duplicates across pages: {seen:?}"
    );
    let mut all_machines: BTreeSet<String> = operational.values().cloned().collect();
    all_machines.extend(faulty.iter().cloned());
    assert_eq!(unique, all_machines);

    // GET /v1/twins lists with the same paging.
    let r = s.get("/v1/twins?entity_type=machine&limit=5").await;
    r.expect(200);
    let first = ids(&r.body["items"]);
    assert_eq!(first.len(), 5);
    let cur = r.body["next_cursor"]
        .as_str()
        .expect("next_cursor")
        .to_owned();
    let r = s
        .get(&format!(
            "/v1/twins?entity_type=machine&limit=5&cursor={cur}"
        ))
        .await;
    r.expect(200);
    let second = ids(&r.body["items"]);
    assert_eq!(second.len(), 2);
    assert_eq!(r.body["next_cursor"], Value::Null);
    let listed: BTreeSet<String> = first.into_iter().chain(second).collect();
    assert_eq!(listed, all_machines);
    let r = s.get(&format!("/v1/twins?parent_id={hall}")).await;
    assert_eq!(id_set(&r.body["items"]), under_hall);
    let r = s.get("/v1/twins").await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 10);

    // Bad queries.
    let bad = [
        json!({"where": [{"property": "temperature", "op": "~", "value": 1}]}),
        json!({"where": [{"property": "status", "op": "in", "value": "fault"}]}),
        json!({"limit": 0}),
        json!({"cursor": "not-a-cursor"}),
        json!({"entity_type": 5}),
        json!({"unknown_field": true}),
    ];
    for b in bad {
        s.post("/v1/query", &b)
            .await
            .expect_error(400, "bad_request");
    }
    s.get("/v1/twins?limit=abc")
        .await
        .expect_error(400, "bad_request");
    s.get("/v1/twins?parent_id=nope")
        .await
        .expect_error(400, "bad_request");
}

/// A model marks the temperature indexed: the same range queries give the same twins, page
/// by page in index order with index cursors, after updates and after a restart (the index
/// is rebuilt from the stored twins); a model the index cannot serve is refused.
#[tokio::test]
async fn an_indexed_property_answers_range_queries_like_the_scan() {
    let mut s = Server::start();
    let mut temps = BTreeMap::new();
    for i in 0..60 {
        let t = 50.0 + (i * 7 % 60) as f64 / 2.0;
        let id = s
            .create_twin_id(&json!({"entity_type": "machine", "properties": {"temperature": t}}))
            .await;
        temps.insert(id, t);
    }
    let hot = |temps: &BTreeMap<String, f64>| -> BTreeSet<String> {
        temps
            .iter()
            .filter(|(_, t)| **t > 65.0)
            .map(|(id, _)| id.clone())
            .collect()
    };
    let (scanned, indexed) = pages(&s).await;
    assert!(!indexed);
    assert_eq!(scanned, hot(&temps));

    // Objects are not indexed: refused with the reason.
    let r = s
        .put(
            "/v1/models/machine",
            &json!({"properties": {"temperature": {"type": "object", "indexed": true}}}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(r.text.contains("indexed applies only to"), "{}", r.text);
    let r = s
        .put(
            "/v1/models/machine",
            &json!({"properties": {"temperature": {"type": "number", "indexed": true}}}),
        )
        .await;
    assert!(r.status == 200 || r.status == 201, "{}", r.text);
    let r = s.get("/v1/models/machine").await;
    assert_eq!(
        r.body["properties"]["temperature"]["indexed"], true,
        "{}",
        r.text
    );
    let (got, indexed) = pages(&s).await;
    assert!(indexed, "the pages did not come from the index");
    assert_eq!(got, scanned);

    // Updates move twins in and out of the range.
    for (k, (id, t)) in temps.iter_mut().enumerate().filter(|(k, _)| k % 4 == 0) {
        *t = if k % 8 == 0 { 90.0 } else { 10.0 };
        s.patch(&format!("/v1/twins/{id}"), &json!({"temperature": *t}))
            .await
            .expect(200);
    }
    assert_eq!(pages(&s).await.0, hot(&temps));
    s.restart();
    let (got, indexed) = pages(&s).await;
    assert!(indexed, "the index was not rebuilt at restart");
    assert_eq!(got, hot(&temps));
}

/// Every twin of `temperature > 65`, 7 per page; and whether the cursors pointed into an index.
async fn pages(s: &Server) -> (BTreeSet<String>, bool) {
    let (mut got, mut cursor, mut indexed) = (BTreeSet::new(), Value::Null, false);
    loop {
        let r = s
            .post(
                "/v1/query",
                &json!({"entity_type": "machine", "limit": 7, "cursor": cursor,
                        "where": [{"property": "temperature", "op": ">", "value": 65}]}),
            )
            .await;
        r.expect(200);
        for t in r.body["items"].as_array().unwrap() {
            assert!(got.insert(t["id"].as_str().unwrap().to_owned()));
        }
        cursor = r.body["next_cursor"].clone();
        match cursor.as_str() {
            None => return (got, indexed),
            Some(c) => indexed |= c.starts_with("ix1."),
        }
    }
}
