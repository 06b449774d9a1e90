//! The conflict strategies, one deterministic case each: two nodes write a property while
//! apart, then exchange their feeds (as a sync link does) in both directions.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::conflict::ResolveRequest;
use super::{ChangeKind, Model, NewTwin, Registry, RemoteChange, Update};
use crate::store::Store;
use crate::types::{Properties, TwinId};

fn open(node: &str) -> (Registry, tempfile::TempDir, Arc<Mutex<Vec<ChangeKind>>>) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(dir.path()).expect("opening a store");
    let r = Registry::open(&store, node).expect("opening a registry");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    r.set_change_sink(Arc::new(move |changes| {
        s.lock().unwrap().extend(changes.iter().map(|c| c.kind));
    }));
    (r, dir, seen)
}

fn props(v: Value) -> Properties {
    v.as_object().expect("an object").clone()
}

/// Everything in `from`'s feed, merged into `to` (resolver calls answered by `resolve`).
async fn pull(
    from: &Registry,
    to: &Registry,
    resolve: impl Fn(&ResolveRequest) -> Result<Value, String>,
) {
    let page = from.changes(0, 1000);
    let items: Vec<RemoteChange> = page
        .items
        .iter()
        .map(|i| serde_json::from_value(i.to_json()).expect("a feed item reads back"))
        .collect();
    to.apply_remote_resolving(items, Vec::new(), |req| {
        let answer = resolve(&req);
        async move { answer }
    })
    .await
    .expect("merge");
}

async fn both_ways(
    a: &Registry,
    b: &Registry,
    resolve: impl Fn(&ResolveRequest) -> Result<Value, String> + Copy,
) {
    pull(a, b, resolve).await;
    pull(b, a, resolve).await;
}

fn no_resolver(_: &ResolveRequest) -> Result<Value, String> {
    Err("no resolver".into())
}

/// A twin created on A and known to B, with `strategy` on both; then B writes `other`
/// `b_writes` times (raising the twin's version there), and both write `p` apart: A last.
/// Also returns what B's change sink got (B merges the concurrent writes first).
async fn apart(
    strategy: Value,
    b_writes: usize,
) -> (
    Registry,
    Registry,
    TwinId,
    Vec<tempfile::TempDir>,
    Arc<Mutex<Vec<ChangeKind>>>,
) {
    let (a, da, _) = open("a");
    let (b, db, seen_b) = open("b");
    let model: Model = serde_json::from_value(json!({"conflict": strategy})).unwrap();
    a.put_model("machine", model.clone()).await.unwrap();
    b.put_model("machine", model).await.unwrap();
    let t = a
        .create(NewTwin {
            entity_type: "machine".into(),
            properties: props(json!({"p": 0})),
            ..Default::default()
        })
        .await
        .unwrap();
    both_ways(&a, &b, no_resolver).await;
    for k in 0..b_writes {
        b.patch(Update::new(t.id, props(json!({"other": k}))))
            .await
            .unwrap();
    }
    b.patch(Update::new(t.id, props(json!({"p": "b"}))))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    a.patch(Update::new(t.id, props(json!({"p": "a"}))))
        .await
        .unwrap();
    (a, b, t.id, vec![da, db], seen_b)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn p_of(r: &Registry, id: &TwinId) -> Value {
    r.get(id)
        .unwrap()
        .properties
        .get("p")
        .cloned()
        .unwrap_or(Value::Null)
}

/// `lww` keeps A's later write; `version` keeps B's, made where more changes to the twin
/// had been seen, although A wrote later. Both record the conflict and keep no siblings.
#[test]
fn lww_takes_the_later_write_and_version_the_better_informed_one() {
    rt().block_on(async {
        for (strategy, want) in [("lww", "a"), ("version", "b")] {
            let (a, b, id, _dirs, seen) = apart(json!({"strategy": strategy}), 3).await;
            both_ways(&a, &b, no_resolver).await;
            assert_eq!(p_of(&a, &id), want, "{strategy} on A");
            assert_eq!(p_of(&b, &id), want, "{strategy} on B");
            assert_eq!(
                a.get(&id).unwrap().properties["other"],
                2,
                "one side's write merges"
            );
            assert!(a.get(&id).unwrap().siblings.is_none());
            assert!(a.conflicts(None, 10).0.is_empty());
            assert!(
                seen.lock().unwrap().contains(&ChangeKind::ConflictDetected),
                "{strategy}"
            );
            a.shutdown();
            b.shutdown();
        }
    });
}

/// `merge` asks the resolver once per set of sides, in `(hlc, origin)` order, and shows its
/// answer on both nodes; a failing resolver leaves the lww winner showing, conflict listed.
#[test]
fn merge_shows_the_resolvers_answer_in_canonical_order_or_the_lww_winner_when_it_fails() {
    rt().block_on(async {
        let strategy = json!({"strategy": "merge", "resolver": "r", "sha256": "0".repeat(64)});
        let (a, b, id, _dirs, _) = apart(strategy.clone(), 0).await;
        let concat = |req: &ResolveRequest| {
            let order: Vec<String> = req.sides.iter().map(|s| s.value.to_string()).collect();
            Ok(json!(order.join("+")))
        };
        both_ways(&a, &b, concat).await;
        // B wrote first, so its write is the lower side.
        assert_eq!(p_of(&a, &id), json!("\"b\"+\"a\""));
        assert_eq!(p_of(&b, &id), p_of(&a, &id));
        let listed = a.conflicts(None, 10).0;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, b.conflicts(None, 10).0[0].id);
        a.shutdown();
        b.shutdown();

        let (a, b, id, _dirs, _) = apart(strategy, 0).await;
        both_ways(&a, &b, no_resolver).await;
        assert_eq!(p_of(&a, &id), "a", "the lww winner");
        assert_eq!(p_of(&b, &id), "a");
        assert_eq!(a.conflicts(None, 10).0.len(), 1);
        a.shutdown();
        b.shutdown();
    });
}

/// `manual` shows the lww winner provisionally and lists the conflict on both nodes; a
/// client write of the property on one node supersedes both sides, and the other node
/// clears it when the write arrives (a `conflict.resolved` event on each).
#[test]
fn a_manual_conflict_clears_on_both_nodes_after_one_write() {
    rt().block_on(async {
        let (a, b, id, _dirs, seen_b) = apart(json!({"strategy": "manual"}), 0).await;
        both_ways(&a, &b, no_resolver).await;
        assert_eq!(p_of(&a, &id), "a");
        assert_eq!(p_of(&b, &id), "a");
        let c = a.conflicts(None, 10).0;
        assert_eq!(c.len(), 1);
        let sides: Vec<&Value> = c[0].sides.iter().map(|s| &s["value"]).collect();
        assert_eq!(sides, [&json!("b"), &json!("a")]);
        b.resolve_conflict(&c[0].id, props(json!({"p": "settled"})))
            .await
            .unwrap();
        assert!(b.conflicts(None, 10).0.is_empty());
        both_ways(&a, &b, no_resolver).await;
        assert!(a.conflicts(None, 10).0.is_empty());
        assert_eq!(p_of(&a, &id), "settled");
        assert!(seen_b
            .lock()
            .unwrap()
            .contains(&ChangeKind::ConflictResolved));
        // A resolution must set the property in conflict, and names an open conflict.
        assert!(a
            .resolve_conflict(&c[0].id, props(json!({"p": 1})))
            .await
            .is_err());
        a.shutdown();
        b.shutdown();
    });
}
