//! Relationships between twins: put (create / replace), list, delete, unknown ends, and
//! relationships that go away with their target.

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{Body, Server};

#[tokio::test]
async fn relationships_put_list_delete() {
    let s = Server::start();
    let a = s.create_twin_id(&json!({"entity_type": "pump"})).await;
    let b = s.create_twin_id(&json!({"entity_type": "tank"})).await;
    let c = s.create_twin_id(&json!({"entity_type": "tank"})).await;

    let r = s
        .put(
            &format!("/v1/twins/{a}/relationships/feeds/{b}"),
            &json!({"rate": 5}),
        )
        .await;
    r.expect(201);
    assert_eq!(
        r.body,
        json!({"name": "feeds", "target_id": b, "properties": {"rate": 5}})
    );
    let r = s
        .put(
            &format!("/v1/twins/{a}/relationships/feeds/{b}"),
            &json!({"rate": 6}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["properties"], json!({"rate": 6}));
    // No body: empty properties.
    let r = s
        .call(
            Method::PUT,
            &format!("/v1/twins/{a}/relationships/feeds/{c}"),
            Body::None,
        )
        .await;
    r.expect(201);
    assert_eq!(r.body["properties"], json!({}));

    let r = s.get(&format!("/v1/twins/{a}/relationships")).await;
    r.expect(200);
    let mut got: Vec<(String, String, Value)> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["name"].as_str().unwrap().to_owned(),
                x["target_id"].as_str().unwrap().to_owned(),
                x["properties"].clone(),
            )
        })
        .collect();
    got.sort_by(|x, y| x.1.cmp(&y.1));
    let mut want = vec![
        ("feeds".to_owned(), b.clone(), json!({"rate": 6})),
        ("feeds".to_owned(), c.clone(), json!({})),
    ];
    want.sort_by(|x, y| x.1.cmp(&y.1));
    assert_eq!(got, want);
    assert_eq!(
        s.get(&format!("/v1/twins/{b}/relationships")).await.body,
        json!([])
    );

    s.delete(&format!("/v1/twins/{a}/relationships/feeds/{b}"))
        .await
        .expect(204);
    s.delete(&format!("/v1/twins/{a}/relationships/feeds/{b}"))
        .await
        .expect_error(404, "not_found");
    let r = s.get(&format!("/v1/twins/{a}/relationships")).await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);

    // Unknown target or source.
    let ghost = uuid::Uuid::new_v4();
    s.put(
        &format!("/v1/twins/{a}/relationships/feeds/{ghost}"),
        &json!({}),
    )
    .await
    .expect_error(404, "not_found");
    s.put(
        &format!("/v1/twins/{ghost}/relationships/feeds/{a}"),
        &json!({}),
    )
    .await
    .expect_error(404, "not_found");
    s.get(&format!("/v1/twins/{ghost}/relationships"))
        .await
        .expect_error(404, "not_found");
    // Properties must be an object.
    s.put(
        &format!("/v1/twins/{a}/relationships/feeds/{b}"),
        &json!([1]),
    )
    .await
    .expect_error(400, "bad_request");

    // Deleting the target removes relationships that point at it.
    s.delete(&format!("/v1/twins/{c}")).await.expect(204);
    assert_eq!(
        s.get(&format!("/v1/twins/{a}/relationships")).await.body,
        json!([])
    );
}
