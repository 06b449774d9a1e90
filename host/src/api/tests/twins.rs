//! Twins over the router: 201 with `Location` and `ETag`, 409 for a taken id, 404 for an
//! unknown parent, `If-Match` (412 on a stale version, 400 when malformed), merge-patch
//! shapes, and the nesting limit of values on every write path.

use chrono::Utc;
use serde_json::{json, Value};

use super::{time, App, Body, Method};

#[tokio::test]
async fn twin_create_get_with_location_and_etag() {
    let s = App::start().await;
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
    let s = App::start().await;
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
    let s = App::start().await;
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

/// `GET /v1/twins/{id}/children` pages (1,000 by default): `X-Next-Cursor` and `Link` lead
/// to the next page; a bad limit or cursor is a 400.
#[tokio::test]
async fn children_are_listed_in_pages_with_a_next_cursor() {
    let s = App::start().await;
    let parent = s.create_twin_id(&json!({"entity_type": "building"})).await;
    let mut body = String::new();
    for i in 0..1_005 {
        body.push_str(&format!(
            "{}\n",
            json!({"entity_type": "machine", "parent_id": parent, "properties": {"i": i}})
        ));
    }
    s.post_raw("/v1/twins/bulk", body.as_bytes(), "application/x-ndjson")
        .await
        .expect(200);

    let first = s.get(&format!("/v1/twins/{parent}/children")).await;
    first.expect(200);
    assert_eq!(first.body.as_array().unwrap().len(), 1_000);
    let next = first.header("x-next-cursor").expect("a next cursor");
    assert_eq!(first.body[999]["id"], next.as_str());
    assert_eq!(
        first.header("link"),
        Some(format!(
            "</v1/twins/{parent}/children?limit=1000&cursor={next}>; rel=\"next\""
        ))
    );
    let rest = s
        .get(&format!("/v1/twins/{parent}/children?cursor={next}"))
        .await;
    rest.expect(200);
    assert_eq!(rest.body.as_array().unwrap().len(), 5);
    assert_eq!(rest.header("x-next-cursor"), None);
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut all = ids(&first.body);
    all.extend(ids(&rest.body));
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!((all.len(), &all), (1_005, &sorted));

    let small = s.get(&format!("/v1/twins/{parent}/children?limit=2")).await;
    assert_eq!(small.body.as_array().unwrap().len(), 2);
    assert!(small.header("link").unwrap().contains("limit=2&"));
    for bad in ["limit=0", "limit=10001", "cursor=nope"] {
        s.get(&format!("/v1/twins/{parent}/children?{bad}"))
            .await
            .expect_error(400, "bad_request");
    }
}
