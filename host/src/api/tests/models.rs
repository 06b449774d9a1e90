//! Models: put / get / list / delete with the status of each outcome, and validation failures
//! as 422 `validation_failed` with a reason per failing property in `details`.

use std::collections::BTreeSet;

use serde_json::json;

use super::{machine_model, App};

#[tokio::test]
async fn models_put_get_list_delete() {
    let s = App::start().await;
    let m = machine_model();
    let r = s.put("/v1/models/machine", &m).await;
    r.expect(201);
    assert_eq!(r.body["properties"]["temperature"]["max"], 500.0);
    assert_eq!(r.body["required"], json!(["status"]));

    // Replace: 200.
    let mut m2 = m.clone();
    m2["properties"]["temperature"]["max"] = json!(600);
    let r = s.put("/v1/models/machine", &m2).await;
    r.expect(200);
    assert_eq!(r.body["properties"]["temperature"]["max"], 600.0);

    let r = s.get("/v1/models/machine").await;
    r.expect(200);
    assert_eq!(r.body["properties"]["temperature"]["max"], 600.0);
    assert_eq!(
        r.body["properties"]["status"]["enum"],
        json!(["operational", "maintenance", "fault"])
    );
    assert_eq!(r.body["additional_properties"], false);
    assert_eq!(r.body["conflict"]["strategy"], "lww");

    s.put(
        "/v1/models/sensor",
        &json!({"properties": {"v": {"type": "number"}}}),
    )
    .await
    .expect(201);
    let r = s.get("/v1/models").await;
    r.expect(200);
    let names: BTreeSet<&String> = r.body.as_object().expect("object").keys().collect();
    assert_eq!(names.len(), 2, "{}", r.body);
    assert!(
        r.body.get("machine").is_some() && r.body.get("sensor").is_some(),
        "{}",
        r.body
    );

    // Nonsense models are refused with a reason per property.
    let r = s
        .put(
            "/v1/models/bad",
            &json!({"properties": {"t": {"type": "number", "min": 10, "max": 1}}}),
        )
        .await;
    r.expect_error(422, "validation_failed");
    assert!(r.body["error"]["details"]["t"].is_string(), "{}", r.body);
    s.put(
        "/v1/models/bad",
        &json!({"properties": {"t": {"type": "float"}}}),
    )
    .await
    .expect_error(400, "bad_request");
    s.put("/v1/models/bad%20name", &json!({}))
        .await
        .expect_error(400, "bad_request");
    s.get("/v1/models/bad").await.expect_error(404, "not_found");

    s.delete("/v1/models/sensor").await.expect(204);
    s.get("/v1/models/sensor")
        .await
        .expect_error(404, "not_found");
    s.delete("/v1/models/sensor")
        .await
        .expect_error(404, "not_found");
}

#[tokio::test]
async fn model_violations_name_every_failing_property() {
    let s = App::start().await;
    s.put("/v1/models/machine", &machine_model())
        .await
        .expect(201);

    // temperature over max, rpm of the wrong type, an undeclared property, status missing.
    let r = s
        .post(
            "/v1/twins",
            &json!({"entity_type": "machine",
                    "properties": {"temperature": 900, "rpm": "fast", "colour": "red"}}),
        )
        .await;
    r.expect_error(422, "validation_failed");
    let details = r.body["error"]["details"]
        .as_object()
        .expect("details object");
    let names: BTreeSet<&str> = details.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["temperature", "rpm", "colour", "status"]),
        "{}",
        r.body
    );
    for (k, v) in details {
        assert!(
            v.as_str().is_some_and(|m| !m.is_empty()),
            "reason for {k}: {}",
            r.body
        );
    }
    // A bad enum value.
    let r = s
        .post(
            "/v1/twins",
            &json!({"entity_type": "machine", "properties": {"status": "broken"}}),
        )
        .await;
    r.expect_error(422, "validation_failed");
    assert!(
        r.body["error"]["details"]["status"].is_string(),
        "{}",
        r.body
    );
    assert_eq!(s.twin_count().await, 0, "refused twins were not created");

    // A valid twin; then patches that violate the model change nothing.
    let t = s
        .create_twin(&json!({"entity_type": "machine",
                             "properties": {"status": "operational", "temperature": 70.5}}))
        .await;
    let id = t["id"].as_str().unwrap();
    let r = s
        .patch(
            &format!("/v1/twins/{id}"),
            &json!({"temperature": -100, "rpm": 1.5}),
        )
        .await;
    r.expect_error(422, "validation_failed");
    let names: BTreeSet<&str> = r.body["error"]["details"]
        .as_object()
        .expect("details")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(names, BTreeSet::from(["temperature", "rpm"]), "{}", r.body);
    let r = s
        .patch(&format!("/v1/twins/{id}"), &json!({"status": null}))
        .await;
    r.expect_error(422, "validation_failed");
    assert!(
        r.body["error"]["details"]["status"].is_string(),
        "{}",
        r.body
    );

    let r = s.get(&format!("/v1/twins/{id}")).await;
    r.expect(200);
    assert_eq!(r.body["version"], 1);
    assert_eq!(
        r.body["properties"],
        json!({"status": "operational", "temperature": 70.5})
    );

    // A valid patch is applied.
    s.patch(
        &format!("/v1/twins/{id}"),
        &json!({"temperature": 71, "rpm": 1200}),
    )
    .await
    .expect(200);

    // Entity types without a model are accepted as they are.
    s.create_twin(&json!({"entity_type": "building", "properties": {"anything": [1, "x"]}}))
        .await;
}
