//! The event log: reading after a sequence number, the bounded in-memory tail, and the
//! persisted tail a reopened log serves with its numbering continuing.

use std::sync::Arc;

use serde_json::json;

use super::{EventLog, EventType, LogConfig};
use crate::registry::{NewTwin, Registry, Update};
use crate::store::Store;
use crate::types::TwinId;

/// Store, registry and event log wired as `serve` wires them.
struct Node {
    registry: Registry,
    events: EventLog,
}

impl Node {
    fn open(dir: &std::path::Path, cfg: LogConfig) -> Node {
        let store = Store::open(dir).expect("opening the store");
        let registry = Registry::open(&store, "node-test").expect("opening the registry");
        let events = EventLog::open(store, &registry, "node-test", cfg).expect("opening the log");
        let sink = events.clone();
        registry.set_change_sink(Arc::new(move |c| sink.append_changes(c)));
        Node { registry, events }
    }

    /// A twin and `patches` updates of it: `1 + patches` events.
    async fn write(&self, patches: u64) -> TwinId {
        let new = NewTwin {
            id: None,
            entity_type: "machine".into(),
            properties: Default::default(),
            parent_id: None,
        };
        let id = self.registry.create(new).await.unwrap().id;
        for n in 0..patches {
            let patch = json!({"n": n}).as_object().unwrap().clone();
            self.registry.patch(Update::new(id, patch)).await.unwrap();
        }
        id
    }

    fn seqs_after(&self, after: u64, max: usize) -> Vec<u64> {
        let r = self.events.read_after(after, max).unwrap();
        r.events.iter().map(|e| e.seq).collect()
    }

    fn shutdown(self) {
        self.registry.shutdown();
        self.events.shutdown();
    }
}

#[tokio::test]
async fn read_after_returns_the_events_above_a_sequence_number() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), LogConfig::default());
    let id = node.write(9).await;
    let all = node.events.read_after(0, 100).unwrap();
    assert_eq!(all.events.len(), 10);
    let first = all.events[0].seq;
    assert_eq!(all.events[0].kind, EventType::TwinCreated);
    assert!(all.events.iter().all(|e| e.twin_id == Some(id)));
    assert_eq!(all.next_seq, first + 10);
    assert_eq!(all.first_available, first);

    assert_eq!(
        node.seqs_after(first + 2, 4),
        (first + 3..first + 7).collect::<Vec<_>>()
    );
    assert_eq!(
        node.seqs_after(first + 9, 5),
        Vec::<u64>::new(),
        "nothing after the last"
    );
    let last = node.events.read_after(first + 8, 5).unwrap();
    assert_eq!(last.events[0].version, Some(10));
    assert_eq!(
        last.events[0].changed,
        *json!({"n": 8}).as_object().unwrap()
    );
    node.shutdown();
}

#[tokio::test]
async fn memory_holds_only_the_newest_tail_events() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        tail: 5,
        ..LogConfig::default()
    };
    let node = Node::open(dir.path(), cfg);
    node.write(19).await;
    // Nothing persisted yet (the persister writes every PERSIST_EVERY): only the ring.
    let r = node.events.read_after(0, 100).unwrap();
    let seqs: Vec<u64> = r.events.iter().map(|e| e.seq).collect();
    let next = r.next_seq;
    assert_eq!(seqs, (next - 5..next).collect::<Vec<_>>(), "the newest 5");
    assert_eq!(r.first_available, next - 5);
    assert_eq!(node.events.appended(), 20);
    node.shutdown();
}

#[tokio::test]
async fn a_reopened_log_serves_the_persisted_tail_and_numbers_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), LogConfig::default());
    let id = node.write(9).await;
    let before = node.events.read_after(0, 100).unwrap();
    let next = before.next_seq;
    node.shutdown();

    let node = Node::open(dir.path(), LogConfig::default());
    let after = node.events.read_after(0, 100).unwrap();
    assert_eq!(after.next_seq, next);
    let key = |e: &Arc<super::Event>| (e.seq, e.kind, e.twin_id, e.version, e.changed.clone());
    assert_eq!(
        after.events.iter().map(key).collect::<Vec<_>>(),
        before.events.iter().map(key).collect::<Vec<_>>(),
        "the same events after the reopen"
    );
    node.write(0).await;
    assert_eq!(
        node.seqs_after(next - 1, 10),
        vec![next],
        "numbering continues"
    );
    assert!(after.events.iter().all(|e| e.twin_id == Some(id)));
    node.shutdown();
}

#[tokio::test]
async fn events_persisted_before_origins_read_back_as_this_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), LogConfig::default());
    node.write(2).await;
    node.shutdown();
    // Rewrite the persisted chunks as a server before origins wrote them.
    let events_dir = dir.path().join("events");
    let mut rewritten = 0;
    for entry in std::fs::read_dir(&events_dir).unwrap() {
        let path = entry.unwrap().path();
        let mut chunk: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for e in &mut chunk {
            assert_eq!(e["origin"], "node-test", "persisted with its origin: {e}");
            e.as_object_mut().unwrap().remove("origin");
            rewritten += 1;
        }
        std::fs::write(&path, serde_json::to_vec(&chunk).unwrap()).unwrap();
    }
    assert_eq!(rewritten, 3);

    let node = Node::open(dir.path(), LogConfig::default());
    let read = node.events.read_after(0, 100).unwrap();
    assert_eq!(read.events.len(), 3);
    for e in &read.events {
        assert_eq!(&*e.origin, "node-test");
        let wire: serde_json::Value = serde_json::from_str(e.json(node.events.source())).unwrap();
        assert_eq!(wire["origin"], "node-test");
    }
    node.shutdown();
}
