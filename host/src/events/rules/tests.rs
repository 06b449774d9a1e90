//! Tests of the rule set as a whole and of the `Rules` service (persistence, deletes).

use std::sync::atomic::AtomicBool;

use serde_json::{json, Value};

use super::testing::*;
use super::*;
use crate::types::{Actor, Cause};

#[test]
fn a_rule_ignores_its_own_changes_and_deep_chains() {
    let mut set = rules(
        "hot",
        json!({"kind": "threshold", "property": "t", "op": ">", "value": 1,
               "actions": [{"type": "patch", "properties": {"t": 5}}]}),
    );
    let mut own = ev(1, 1, None, 0.0, "t", 5.0);
    own.cause = Some(Cause {
        by: Actor::Rule("hot".into()),
        depth: 1,
    });
    let mut deep = ev(2, 2, None, 0.0, "t", 5.0);
    deep.cause = Some(Cause {
        by: Actor::Behavior("x".into()),
        depth: MAX_CHAIN_DEPTH,
    });
    let mut other = ev(3, 3, None, 0.0, "t", 5.0);
    other.cause = Some(Cause {
        by: Actor::Behavior("x".into()),
        depth: 1,
    });
    let out = feed(&mut set, &[own, deep, other]);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].trigger_seq, out[0].depth), (3, 1));
}

#[test]
fn a_rule_evaluates_changes_of_other_nodes_only_when_it_says_on_all() {
    let spec = |on: Option<&str>| {
        let mut s = json!({"kind": "threshold", "property": "t", "op": ">", "value": 1,
                           "actions": [{"type": "alert"}]});
        if let Some(on) = on {
            s["on"] = json!(on);
        }
        s
    };
    let from = |mut e: Event, origin: &str| {
        e.origin = Arc::from(origin);
        e
    };
    for (on, fired) in [
        (None, vec![1]),
        (Some("local"), vec![1]),
        (Some("all"), vec![1, 2]),
    ] {
        let mut set = rules("hot", spec(on));
        set.set_node_id("here");
        let out = feed(
            &mut set,
            &[
                from(ev(1, 1, None, 0.0, "t", 5.0), "here"),
                from(ev(2, 2, None, 0.0, "t", 5.0), "edge"),
            ],
        );
        let seqs: Vec<u64> = out.iter().map(|f| f.trigger_seq).collect();
        assert_eq!(seqs, fired, "on: {on:?}");
    }
    // A deletion made elsewhere still drops what a local rule holds about the twin: the
    // twin's next local reading is a rising edge again.
    let mut set = rules("hot", spec(None));
    set.set_node_id("here");
    let out = feed(
        &mut set,
        &[
            from(ev(1, 1, None, 0.0, "t", 5.0), "here"),
            from(ev(2, 1, None, 1.0, "t", 6.0), "here"),
            from(deleted(3, 1, 2.0), "edge"),
            from(ev(4, 1, None, 3.0, "t", 5.0), "here"),
        ],
    );
    let seqs: Vec<u64> = out.iter().map(|f| f.trigger_seq).collect();
    assert_eq!(seqs, [1, 4]);
    // Every kind takes `on`, shown as stored (`local` when not given).
    for kind in [
        json!({"kind": "window", "property": "t", "agg": "avg", "size": "10s"}),
        json!({"kind": "sequence", "first": {"property": "t", "op": ">", "value": 1},
               "then": {"property": "u", "op": ">", "value": 1}, "within": "10s"}),
        json!({"kind": "correlation", "min_count": 2, "within": "10s",
               "condition": {"property": "t", "op": ">", "value": 1}}),
    ] {
        let mut body = kind.clone();
        body["actions"] = json!([{"type": "alert"}]);
        let shown = serde_json::to_value(parse(body.clone()).unwrap()).unwrap();
        assert_eq!(shown["on"], "local", "{kind}");
        body["on"] = json!("all");
        let shown = serde_json::to_value(parse(body).unwrap()).unwrap();
        assert_eq!(shown["on"], "all", "{kind}");
    }
}

#[test]
fn rules_forget_deleted_twins() {
    // The rule watches machines; a deletion reaches it whatever the event's type says.
    let mut set = rules(
        "hot",
        json!({"kind": "threshold", "entity_type": "machine", "property": "t", "op": ">",
               "value": 10, "actions": [{"type": "alert"}]}),
    );
    let mut out = Vec::new();
    let n = DEFAULT_MAX_GROUPS as u128;
    for twin in 1..=n {
        set.on_event(&ev(twin as u64, twin, None, 1.0, "t", 20.0), &mut out);
    }
    assert_eq!(out.len(), n as usize);
    for twin in 1..=n {
        let mut gone = deleted(n as u64 + twin as u64, twin, 2.0);
        gone.entity_type = None;
        set.on_event(&gone, &mut out);
    }
    let out = feed(&mut set, &[ev(3 * n as u64, n + 1, None, 3.0, "t", 20.0)]);
    assert_eq!(out.len(), 1, "{:?}", set.stats("hot"));
    assert_eq!(set.stats("hot").unwrap().overflow, 0);
}

/// An invoker whose module answers as compute once and then is gone, as when the module
/// is deleted while a rule using it is being stored.
struct Vanishing(AtomicBool);

impl Invoker for Vanishing {
    fn world_of(&self, _name: &str) -> Option<World> {
        (!self.0.swap(true, Ordering::SeqCst)).then_some(World::Compute)
    }
    fn invoke(self: Arc<Self>, _: &str, _: &str, _: TwinId, _: Value) -> InvokeFuture {
        Box::pin(async { Err("not in this test".into()) })
    }
}

/// Rules on `store`, with what the live engine needs.
fn open_rules(store: &Store) -> Rules {
    let registry = Registry::open(store, "test").unwrap();
    let log = EventLog::open(store.clone(), &registry, "test", Default::default()).unwrap();
    Rules::open(store.clone(), registry, log).unwrap()
}

/// The rules a restart would load from the same store.
fn reopened(rules: &Rules) -> Rules {
    let i = &rules.inner;
    Rules::open(i.store.clone(), i.registry.clone(), i.log.clone()).unwrap()
}

fn invoking(module: &str) -> RuleSpec {
    serde_json::from_value(json!({"kind": "threshold", "property": "t", "op": ">",
        "value": 1, "actions": [{"type": "invoke", "module": module}]}))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_refused_put_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rules = open_rules(&store);
    rules.set_invoker(Arc::new(Vanishing(AtomicBool::new(false))));
    let stored = rules.put("r", invoking("m")).await.is_ok();
    // What a restart loads agrees with what the client was told.
    assert_eq!(
        reopened(&rules).get("r").is_ok(),
        stored,
        "put answered ok={stored}"
    );
    assert_eq!(rules.get("r").is_ok(), stored);
    // A module that is not there: refused, and not there after a restart either.
    let err = rules.put("r2", invoking("gone")).await.unwrap_err();
    assert!(err.to_string().contains("not uploaded"), "{err}");
    assert!(reopened(&rules).get("r2").is_err());
}
