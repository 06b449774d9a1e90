//! Stored runs stay bounded: past [`MAX_STORED`], the oldest finished runs are trimmed.

use serde_json::json;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_finished_runs_are_trimmed_past_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let node = crate::cli::serve::open_default_node(dir.path(), "node-test", true)
        .await
        .unwrap();
    let w = &node.state.workflows;
    let spec: Spec = serde_json::from_value(json!({"steps": [
        {"id": "count", "type": "aggregate", "function": "count",
         "query": {"entity_type": "machine"}}]}))
    .unwrap();
    let extra = 7;
    let mut ids = Vec::new();
    // In waves below the bound on runs in flight.
    for wave in (0..MAX_STORED + extra)
        .collect::<Vec<_>>()
        .chunks(MAX_RUNNING / 2)
    {
        let mut started = Vec::new();
        for _ in wave {
            started.push(w.start(spec.clone()).await.unwrap());
        }
        for id in &started {
            let run = w.wait(id, Duration::from_secs(30)).await.unwrap();
            assert_eq!(run.status, Status::Succeeded, "{run:?}");
        }
        ids.extend(started);
    }
    let stored = node.store.scan_prefix(&[RUN_PREFIX]).count();
    assert_eq!(stored, MAX_STORED);
    assert_eq!(w.0.stored.load(Ordering::Relaxed), MAX_STORED);
    // Run ids order by time: the first ones went, the last ones stay.
    for id in &ids[..extra] {
        assert!(matches!(w.get(id), Err(WorkflowError::NotFound(_))), "{id}");
    }
    for id in &ids[extra..] {
        w.get(id).unwrap();
    }
    node.registry.shutdown();
}
