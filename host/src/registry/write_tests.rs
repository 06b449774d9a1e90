//! The write path's numbering: create, update and delete each take the node's next change
//! number and a later HLC, in the order they were acknowledged; a refused update writes
//! nothing (no change, no number, no log entry, nothing after a reopen).

use std::sync::Arc;

use serde_json::{json, Value};

use crate::registry::{Change, ChangeKind, NewTwin, Registry, RegistryError, Update};
use crate::store::Store;
use crate::types::{Properties, TwinId};

/// A registry on `dir` whose changes are collected, as the event log would receive them.
fn open(dir: &std::path::Path) -> (Registry, Arc<parking_lot::Mutex<Vec<Change>>>) {
    let store = Store::open(dir).expect("opening the store");
    let registry = Registry::open(&store, "node-test").expect("opening the registry");
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = seen.clone();
    registry.set_change_sink(Arc::new(move |changes| sink.lock().extend(changes)));
    (registry, seen)
}

fn props(v: Value) -> Properties {
    v.as_object().expect("an object").clone()
}

fn new_twin(properties: Value) -> NewTwin {
    NewTwin {
        id: None,
        entity_type: "machine".into(),
        properties: props(properties),
        parent_id: None,
    }
}

#[tokio::test]
async fn create_update_delete_take_consecutive_numbers_and_increasing_clocks() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, seen) = open(dir.path());
    let a = reg.create(new_twin(json!({"t": 1}))).await.unwrap();
    let b = reg.create(new_twin(json!({}))).await.unwrap();
    let a2 = reg
        .patch(Update::new(a.id, props(json!({"t": 2}))))
        .await
        .unwrap();
    assert_eq!(reg.delete(b.id, false).await.unwrap(), 1);

    let seen = seen.lock().clone();
    let kinds: Vec<(ChangeKind, Option<TwinId>)> =
        seen.iter().map(|c| (c.kind, c.twin_id)).collect();
    assert_eq!(
        kinds,
        vec![
            (ChangeKind::Created, Some(a.id)),
            (ChangeKind::Created, Some(b.id)),
            (ChangeKind::Updated, Some(a.id)),
            (ChangeKind::Deleted, Some(b.id)),
        ]
    );
    let first = seen[0].seq;
    assert!(first >= 1);
    let seqs: Vec<u64> = seen.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (first..first + 4).collect::<Vec<_>>(), "consecutive");
    for w in seen.windows(2) {
        assert!(
            w[0].hlc < w[1].hlc,
            "HLCs increase: {} then {}",
            w[0].hlc,
            w[1].hlc
        );
    }
    // The twin carries the number and clock of its last change.
    assert_eq!((a.lseq, a.hlc), (seen[0].seq, seen[0].hlc));
    assert_eq!((a2.lseq, a2.hlc), (seen[2].seq, seen[2].hlc));
    assert_eq!(a2.version, 2);
    assert_eq!(seen[2].changed, props(json!({"t": 2})));
    reg.shutdown();
}

#[tokio::test]
async fn a_refused_update_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, seen) = open(dir.path());
    let a = reg.create(new_twin(json!({"t": 1}))).await.unwrap();
    let stats = reg.commit_stats();
    let log_bytes = stats.log_bytes.load(std::sync::atomic::Ordering::Relaxed);

    // A stale If-Match, a patch that is not a valid value, an unknown twin.
    let stale = Update {
        if_match: Some(7),
        ..Update::new(a.id, props(json!({"t": 99})))
    };
    let r = reg.patch(stale).await;
    assert!(
        matches!(
            r,
            Err(RegistryError::VersionMismatch {
                expected: 7,
                current: 1
            })
        ),
        "{r:?}"
    );
    let mut deep = json!(1);
    for _ in 0..40 {
        deep = json!([deep]);
    }
    let r = reg
        .patch(Update::new(a.id, props(json!({"t": deep}))))
        .await;
    assert!(r.is_err(), "a value nested 40 deep is refused");
    let r = reg
        .patch(Update::new(TwinId::new_v7(), props(json!({"t": 3}))))
        .await;
    assert!(matches!(r, Err(RegistryError::NotFound(_))), "{r:?}");

    assert_eq!(seen.lock().len(), 1, "only the create was published");
    assert_eq!(
        stats.log_bytes.load(std::sync::atomic::Ordering::Relaxed),
        log_bytes,
        "nothing was logged"
    );
    let now = reg.get(&a.id).unwrap();
    assert_eq!((now.version, now.lseq, now.hlc), (1, a.lseq, a.hlc));
    assert_eq!(now.properties, props(json!({"t": 1})));
    // The next accepted change takes the next number: none was used up by the refusals.
    let next = reg
        .patch(Update::new(a.id, props(json!({"t": 4}))))
        .await
        .unwrap();
    assert_eq!(next.lseq, a.lseq + 1);
    reg.shutdown();
    drop(reg);

    let (reg, _) = open(dir.path());
    let t = reg.get(&a.id).unwrap();
    assert_eq!(t.version, 2);
    assert_eq!(t.properties, props(json!({"t": 4})));
    reg.shutdown();
}
