//! What replicates with the twins: relationships (with their source twin, last writer wins
//! per relationship, deletes as tombstones). Models replicate too (see [`crate::conflicts`]).

use serde_json::json;

use crate::common::Server;
use crate::sync::eventually;

#[tokio::test]
async fn relationships_replicate_and_their_deletes_spread() {
    let a = Server::start_from(|_| {}, Some("node-a"), &[]);
    let token = a.create_token("peer").await;
    let b = Server::start_from(
        |_| {},
        Some("node-b"),
        &["--peer", &a.url, "--peer-token", &token],
    );
    let pump = a.create_twin_id(&json!({"entity_type": "pump"})).await;
    let tank = a.create_twin_id(&json!({"entity_type": "tank"})).await;
    let rel = format!("/v1/twins/{pump}/relationships/feeds/{tank}");
    a.put(&rel, &json!({"flow": 3})).await.expect(201);
    let list = format!("/v1/twins/{pump}/relationships");
    eventually(&b, &list, "A's relationship on B", |r| {
        r[0]["target_id"] == tank.as_str() && r[0]["properties"]["flow"] == 3
    })
    .await;
    let log = b.get("/v1/events/log?types=relationship.changed").await;
    assert_eq!(log.body["events"][0]["origin"], "node-a", "{}", log.text);

    // Replaced on B, then deleted on B: both reach A.
    b.put(&rel, &json!({"flow": 5})).await.expect(200);
    eventually(&a, &list, "B's replacement on A", |r| {
        r[0]["properties"]["flow"] == 5
    })
    .await;
    b.delete(&rel).await.expect(204);
    eventually(&a, &list, "B's delete on A", |r| *r == json!([])).await;

    // A relationship to a deleted twin is no longer listed, on either node.
    a.put(&rel, &json!({})).await.expect(201);
    eventually(&b, &list, "the relationship again on B", |r| {
        r.as_array().is_some_and(|i| i.len() == 1)
    })
    .await;
    a.delete(&format!("/v1/twins/{tank}")).await.expect(204);
    for s in [&a, &b] {
        eventually(s, &list, "no relationship to a deleted twin", |r| {
            *r == json!([])
        })
        .await;
    }
}
