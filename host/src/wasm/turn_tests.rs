//! The calls of one behavior turn ([`Runtime::call_behaviors`]) share an instance, yet each
//! event is a call of its own: its own fuel, deadline, host-call budget and alerts, and a
//! trap leaves the next event a fresh instance. Uses the `turn-behavior` test guest.

use std::time::Duration;

use serde_json::{json, Value};

use super::bindings::twinhost::platform::types as wit;
use super::host::to_wit;
use super::{BehaviorOutput, CallError, Limits, Runtime};
use crate::cli::serve::{open_default_node, Node};
use crate::registry::NewTwin;
use crate::types::Twin;

/// Long enough that every test's events run in one turn.
const WHOLE: Duration = Duration::from_secs(60);

/// A node with the Rust `turn-behavior` uploaded as `turn`, and a machine.
async fn setup(dir: &std::path::Path, limits: Limits) -> (Node, Twin) {
    setup_with(
        dir,
        super::module_tests::guest("turn_behavior.wasm"),
        limits,
    )
    .await
}

/// A node with the behavior component `bytes` uploaded as `turn`, and a machine.
async fn setup_with(dir: &std::path::Path, bytes: Vec<u8>, limits: Limits) -> (Node, Twin) {
    let node = open_default_node(dir, "test", true).await.unwrap();
    node.state
        .runtime
        .upload("turn", bytes, limits, false)
        .await
        .unwrap();
    let twin = node
        .registry
        .create(NewTwin {
            entity_type: "machine".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    (node, twin)
}

/// One `twin.updated` event of `twin` per change.
fn events(twin: &Twin, changes: &[Value]) -> Vec<wit::Event> {
    changes
        .iter()
        .enumerate()
        .map(|(i, c)| wit::Event {
            seq: i as u64 + 1,
            kind: "twin.updated".into(),
            twin: to_wit(twin),
            changed: c.to_string(),
            ts_ms: 0,
        })
        .collect()
}

/// Run `changes` as one turn on a blocking thread.
async fn turn(
    rt: &std::sync::Arc<Runtime>,
    twin: &Twin,
    changes: &[Value],
    limit: Duration,
) -> Vec<Result<BehaviorOutput, CallError>> {
    let (rt, events) = (rt.clone(), events(twin, changes));
    tokio::task::spawn_blocking(move || rt.call_behaviors("turn", &events, limit))
        .await
        .unwrap()
}

/// The `seen` count of a call's answer: how many events its instance had handled.
fn seen(out: &Result<BehaviorOutput, CallError>) -> u64 {
    let out = out
        .as_ref()
        .unwrap_or_else(|e| panic!("the call failed: {e}"));
    let answer = out
        .alerts
        .iter()
        .find(|a| a.message == "seen")
        .expect("the guest answers with a `seen` alert");
    serde_json::from_str::<Value>(&answer.data).unwrap()["seen"]
        .as_u64()
        .unwrap()
}

fn kind(out: &Result<BehaviorOutput, CallError>) -> &'static str {
    match out {
        Err(CallError::Guest { kind, .. }) => kind,
        other => panic!("expected a guest failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_turn_shares_an_instance_until_a_call_traps() {
    let dir = tempfile::tempdir().unwrap();
    let (node, twin) = setup(dir.path(), Limits::default()).await;
    let rt = node.state.runtime.clone();
    shares_until_a_trap(&rt, &twin).await;
    let e = json!({});
    // Every event was a call, and the two failures count as errors.
    let info = rt.info("turn").unwrap();
    assert_eq!((info.calls, info.errors), (7, 2));
    // A fresh call (outside a turn) always starts on a fresh instance.
    let one = events(&twin, std::slice::from_ref(&e));
    let rt2 = rt.clone();
    let single = tokio::task::spawn_blocking(move || rt2.call_behavior("turn", &one[0]))
        .await
        .unwrap();
    assert_eq!(seen(&single), 1);
    // A turn ends after its time is up, having made at least one call.
    let outs = turn(&rt, &twin, &[e.clone(), e.clone(), e], Duration::ZERO).await;
    assert_eq!(outs.len(), 1);
    assert_eq!(seen(&outs[0]), 1);
}

#[tokio::test]
async fn every_call_of_a_turn_gets_its_own_fuel_host_calls_and_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let fuel = 60_000_000;
    let (node, twin) = setup(
        dir.path(),
        Limits {
            fuel,
            ..Limits::default()
        },
    )
    .await;
    let rt = node.state.runtime.clone();
    // One event burning `burn` rounds fits in the fuel, twenty of them do not: a call costs
    // more than a twentieth of the fuel.
    let burn = 1_000_000u64;
    let outs = turn(
        &rt,
        &twin,
        &[json!({"burn": burn}), json!({"burn": 20 * burn})],
        WHOLE,
    )
    .await;
    assert_eq!(seen(&outs[0]), 1);
    assert_eq!(kind(&outs[1]), "fuel_exhausted");
    // So twenty such events on one instance only pass if each call gets the fuel anew.
    let outs = turn(&rt, &twin, &vec![json!({"burn": burn}); 20], WHOLE).await;
    let counts: Vec<u64> = outs.iter().map(seen).collect();
    assert_eq!(counts, (1..=20).collect::<Vec<_>>());
    // The host-call limit is per call too: three calls of 60% of it each pass.
    let n = super::MAX_HOST_CALLS as u64 * 6 / 10;
    let outs = turn(&rt, &twin, &vec![json!({"host_calls": n}); 3], WHOLE).await;
    assert_eq!(outs.iter().map(seen).collect::<Vec<_>>(), [1, 2, 3]);
    let outs = turn(
        &rt,
        &twin,
        &[json!({"host_calls": super::MAX_HOST_CALLS + 1})],
        WHOLE,
    )
    .await;
    assert_eq!(kind(&outs[0]), "host_call_limit");
    // Alerts raised through the host belong to the call that raised them.
    let outs = turn(&rt, &twin, &vec![json!({"emit": 3}); 3], WHOLE).await;
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.as_ref().unwrap().alerts.len(), 4, "call {i}");
        assert_eq!(seen(out), i as u64 + 1);
    }
}

#[tokio::test]
async fn every_call_of_a_turn_gets_its_own_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (node, twin) = setup(
        dir.path(),
        Limits {
            fuel: super::MAX_FUEL,
            timeout_ms: 400,
            ..Limits::default()
        },
    )
    .await;
    let rt = node.state.runtime.clone();
    // Three calls of 250 ms on one instance: 750 ms in all, each within its 400 ms.
    let spin = json!({"spin_ms": 250});
    let outs = turn(
        &rt,
        &twin,
        &[
            spin.clone(),
            spin.clone(),
            spin,
            json!({"spin_ms": 5000}),
            json!({}),
        ],
        WHOLE,
    )
    .await;
    assert_eq!(outs.iter().take(3).map(seen).collect::<Vec<_>>(), [1, 2, 3]);
    // A call past its own deadline is stopped, and its instance is not used again.
    assert_eq!(kind(&outs[3]), "deadline_exceeded");
    assert_eq!(seen(&outs[4]), 1);
}

/// The same with a guest whose runtime nobody here wrote: componentize-py's CPython keeps its
/// module globals between the calls of a turn, the guest's own `Err` keeps the instance, and
/// an uncaught exception (a trap) gives the next event a fresh interpreter.
#[tokio::test]
async fn a_python_behavior_shares_its_instance_within_a_turn_too() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = super::module_tests::guest_file("python/turn_monitor_py.wasm");
    let (node, twin) = setup_with(dir.path(), bytes, Limits::default()).await;
    shares_until_a_trap(&node.state.runtime, &twin).await;
}

/// One turn of `{}`, `{}`, `fail`, `{}`, `panic`, `{}`, `{}`: the instance is shared, kept
/// after the guest's own error and replaced after the trap.
async fn shares_until_a_trap(rt: &std::sync::Arc<Runtime>, twin: &Twin) {
    let e = json!({});
    let outs = turn(
        rt,
        twin,
        &[
            e.clone(),
            e.clone(),
            json!({"fail": true}),
            e.clone(),
            json!({"panic": true}),
            e.clone(),
            e.clone(),
        ],
        WHOLE,
    )
    .await;
    assert_eq!(outs.len(), 7);
    assert_eq!((seen(&outs[0]), seen(&outs[1])), (1, 2));
    // The guest's own error is an answer: its instance serves the next event.
    assert_eq!(kind(&outs[2]), "guest_error");
    assert_eq!(seen(&outs[3]), 4);
    // A trap ends the instance: the next event gets a fresh one.
    assert_eq!(kind(&outs[4]), "trap");
    assert_eq!((seen(&outs[5]), seen(&outs[6])), (1, 2));
}
