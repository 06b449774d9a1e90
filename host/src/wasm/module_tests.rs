//! The module registry's rules, in process on a real node: what a delete removes, and that a
//! delete cannot race a binding.

use std::path::PathBuf;

use crate::cli::serve::{open_default_node, Node};
use crate::store::keys;
use crate::wasm::behaviors::Binding;
use crate::wasm::{CallError, Limits};

/// A Rust guest component built by `scripts/build-guests.sh`.
pub(super) fn guest(file: &str) -> Vec<u8> {
    guest_file(&format!("wasm32-wasip2/release/{file}"))
}

/// A file `scripts/build-guests.sh` built, by its path under `guests/target`.
pub(super) fn guest_file(rel: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../guests/target")
        .join(rel);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the guests first (scripts/build-guests.sh)",
            path.display()
        )
    })
}

async fn node(dir: &std::path::Path) -> Node {
    open_default_node(dir, "test", true).await.unwrap()
}

fn count(node: &Node, prefix: u8) -> usize {
    node.store.scan_prefix(&[prefix]).count()
}

fn binding(module: &str) -> Binding {
    Binding {
        module: module.into(),
        entity_type: Some("machine".into()),
        twin_id: None,
        on: crate::types::ReactTo::Local,
        every: None,
        created_at: chrono::Utc::now(),
    }
}

#[tokio::test]
async fn deleting_a_module_removes_its_bytes_and_artifacts_but_not_shared_ones() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let rt = node.state.runtime.clone();
    let (compute, behavior) = (
        guest("thermal_analysis.wasm"),
        guest("thermal_monitor.wasm"),
    );
    rt.upload("a", compute.clone(), Limits::default(), false)
        .await
        .unwrap();
    rt.upload("a", behavior, Limits::default(), true)
        .await
        .unwrap();
    // Module `b` shares `a`'s first component.
    rt.upload("b", compute, Limits::default(), false)
        .await
        .unwrap();
    assert_eq!(count(&node, keys::MODULE_BYTES), 2);
    assert_eq!(count(&node, keys::ARTIFACT), 2);

    rt.delete("a", false).await.unwrap();
    assert_eq!(count(&node, keys::MODULE_BYTES), 1, "b's bytes stay");
    assert_eq!(count(&node, keys::ARTIFACT), 1);
    rt.delete("b", false).await.unwrap();
    assert_eq!(count(&node, keys::MODULE_BYTES), 0);
    assert_eq!(count(&node, keys::ARTIFACT), 0);
    assert_eq!(count(&node, keys::MODULE), 0);
    node.registry.shutdown();
}

#[tokio::test]
async fn a_module_delete_and_a_binding_to_it_do_not_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let rt = node.state.runtime.clone();
    let behaviors = node.state.behaviors.clone();
    let bytes = guest("thermal_monitor.wasm");
    for round in 0..20 {
        let module = format!("m{round}");
        rt.upload(&module, bytes.clone(), Limits::default(), false)
            .await
            .unwrap();
        let (b, r, m) = (behaviors.clone(), rt.clone(), module.clone());
        let bind = tokio::spawn(async move { b.put(&format!("b{round}"), binding(&m)).await });
        let m = module.clone();
        let delete = tokio::spawn(async move { r.delete(&m, false).await });
        let (bound, deleted) = (bind.await.unwrap(), delete.await.unwrap());
        // Exactly one wins: a bound behavior keeps its module, a deleted module has no user.
        match (bound, deleted) {
            (Ok(_), Err(CallError::InUse(_))) => {
                assert!(rt.world_of(&module).is_some());
            }
            (Err(_), Ok(())) => {
                assert!(behaviors.using(&module).is_empty());
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
    node.registry.shutdown();
}

#[tokio::test]
async fn a_node_that_was_shut_down_and_dropped_releases_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let rt = node.state.runtime.clone();
    rt.upload("m", guest("thermal_monitor.wasm"), Limits::default(), false)
        .await
        .unwrap();
    node.state.behaviors.put("b", binding("m")).await.unwrap();
    node.registry.shutdown();
    node.events.shutdown();
    drop((rt, node));
    // The behavior and rule tasks end once the event log is closed, and with them the last
    // holders of the store: no reference cycle keeps sled open (in process, as the bench's
    // restart and an embedding application do).
    let started = std::time::Instant::now();
    let again = loop {
        match open_default_node(dir.path(), "test", true).await {
            Ok(n) => break n,
            Err(e) if started.elapsed() > std::time::Duration::from_secs(5) => {
                panic!("the directory is still held: {e:#}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    assert_eq!(again.state.behaviors.using("m"), vec!["b".to_owned()]);
    again.registry.shutdown();
}

/// An instantiation wasmtime's instance pool refuses is `busy`, never the guest's `trap`;
/// and through the compute pool (never larger than the instance pool) the same two calls
/// both run, the second after the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_pool_refusal_is_busy_and_the_compute_pool_keeps_calls_under_it() {
    use crate::wasm::{Busy, Caller, PoolConfig, Runtime};
    use serde_json::json;

    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    // Room for one component instance; a compute pool asked for 8 slots gets one.
    let config = PoolConfig {
        slots: Some(8),
        queue_per_caller: 8,
    };
    let rt = Runtime::open_sized(node.store.clone(), node.registry.clone(), config, 1).unwrap();
    assert_eq!(rt.pool().size(), 1);
    let slow = Limits {
        fuel: crate::wasm::MAX_FUEL,
        timeout_ms: 500,
        ..Limits::default()
    };
    rt.upload("waiter", guest("hostile.wasm"), slow, false)
        .await
        .unwrap();
    rt.upload(
        "good",
        guest("thermal_analysis.wasm"),
        Limits::default(),
        false,
    )
    .await
    .unwrap();
    let new = json!({"entity_type": "machine", "properties": {"temperature": 80}});
    let twin = node
        .registry
        .create(serde_json::from_value(new).unwrap())
        .await
        .unwrap();
    let sleep = json!({"mode": "sleep"});

    // Around the compute pool (nothing in the server calls this way): the second instance
    // is refused, and that is `busy`.
    let (r, t, p) = (rt.clone(), twin.clone(), sleep.clone());
    let sleeper = std::thread::spawn(move || r.call_compute("waiter", &[t], &p, None));
    std::thread::sleep(std::time::Duration::from_millis(150));
    let refused = rt.call_compute("good", std::slice::from_ref(&twin), &json!({}), None);
    assert!(
        matches!(refused, Err(CallError::Busy(Busy::Instances(_)))),
        "{refused:?}"
    );
    let slept = sleeper.join().unwrap();
    assert!(
        matches!(
            slept,
            Err(CallError::Guest {
                kind: "deadline_exceeded",
                ..
            })
        ),
        "{slept:?}"
    );
    assert_eq!(
        rt.info("good").unwrap().errors,
        0,
        "busy is not the guest's error"
    );

    // Through the pool: the rule's call waits for the invoke's slot, and both run.
    let (t1, t2) = (twin.clone(), twin.clone());
    let rule = Caller::Rule("r".into());
    let first = rt.on_pool(&Caller::Invoke, move |rt| {
        rt.call_compute("waiter", &[t1], &sleep, None)
    });
    let second = rt.on_pool(&rule, move |rt| {
        rt.call_compute("good", &[t2], &json!({}), None)
    });
    let (first, second) = tokio::join!(first, second);
    assert!(
        matches!(
            first,
            Err(CallError::Guest {
                kind: "deadline_exceeded",
                ..
            })
        ),
        "{first:?}"
    );
    assert!(second.is_ok(), "{second:?}");
    let rule = &rt.pool().stats().by_class[&crate::wasm::pool::Class::Rule];
    assert!(
        rule.avg_wait_ms >= 300.0,
        "the rule waited {} ms",
        rule.avg_wait_ms
    );
    node.registry.shutdown();
}

/// A rule's `invoke` action runs on the compute pool under the rule's own key, and one that
/// gets no slot fails as `busy`, not as the guest's failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_invoke_takes_a_slot_under_its_rule_and_fails_busy_without_one() {
    use crate::events::rules::Invoker;
    use crate::wasm::pool::Class;
    use serde_json::json;

    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let rt = node.state.runtime.clone();
    rt.upload(
        "good",
        guest("thermal_analysis.wasm"),
        Limits::default(),
        false,
    )
    .await
    .unwrap();
    let new = json!({"entity_type": "machine", "properties": {"temperature": 80}});
    let twin = node
        .registry
        .create(serde_json::from_value(new).unwrap())
        .await
        .unwrap();
    let out = rt
        .clone()
        .invoke("hot", "good", twin.id, json!({}))
        .await
        .unwrap();
    assert_eq!(out["count"], 1, "{out}");
    assert_eq!(rt.pool().stats().by_class[&Class::Rule].granted, 1);

    rt.pool().stop();
    let refused = rt
        .clone()
        .invoke("hot", "good", twin.id, json!({}))
        .await
        .unwrap_err();
    assert!(refused.starts_with("busy:"), "{refused}");
    assert_eq!(rt.pool().stats().by_class[&Class::Rule].busy, 1);
    assert_eq!(rt.info("good").unwrap().errors, 0);
    node.registry.shutdown();
}
