//! The module registry's rules, in process on a real node: what a delete removes, and that a
//! delete cannot race a binding.

use std::path::PathBuf;

use crate::cli::serve::{open_default_node, Node};
use crate::store::keys;
use crate::wasm::behaviors::Binding;
use crate::wasm::{CallError, Limits};

/// A guest component built by `scripts/build-guests.sh`.
fn guest(file: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../guests/target/wasm32-wasip2/release")
        .join(file);
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
