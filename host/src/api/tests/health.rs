//! `/healthz` and a store that can no longer write its log.

use super::*;

#[tokio::test]
async fn a_failed_log_write_shows_in_healthz_and_refuses_writes() {
    let app = App::start().await;
    let r = app
        .send(Method::GET, "/healthz", None, Body::None, &[])
        .await;
    r.expect(200);
    assert_eq!(r.body, json!({"status": "ok"}));
    app.create_twin(&json!({"entity_type": "machine"})).await;

    // The log segments a checkpoint rotates to next are a device that refuses every write
    // (ENOSPC), as a full disk would.
    for n in 2..=6u64 {
        let seg = app._tmp.path().join(format!("wal/{n:020}.wal"));
        std::os::unix::fs::symlink("/dev/full", seg).unwrap();
    }
    let started = std::time::Instant::now();
    let refused = loop {
        let r = app
            .post("/v1/twins", &json!({"entity_type": "machine"}))
            .await;
        if r.status != 201 {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no checkpoint rotated onto the failing segment"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    refused.expect_error(503, "unavailable");
    let msg = refused.body["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains("restart"), "{msg}");

    let h = app
        .send(Method::GET, "/healthz", None, Body::None, &[])
        .await;
    h.expect(503);
    assert_eq!(h.body["status"], "failing", "{}", h.body);
    assert!(
        h.body["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("space"),
        "{}",
        h.body
    );
    // Later writes are refused at once; reads keep working.
    app.post("/v1/twins", &json!({"entity_type": "machine"}))
        .await
        .expect_error(503, "unavailable");
    app.get("/v1/twins").await.expect(200);
}
