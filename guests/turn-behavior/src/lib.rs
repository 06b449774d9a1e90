//! `turn-behavior`: a test behavior for the calls of one turn, which may share an instance.
//! Every event answers with an `info` alert whose data is `{"seen": N}`, N being the events
//! this instance has handled (1 on a fresh instance). What the event's change asks for first:
//! - `panic`: panic (a trap), before counting;
//! - `burn: N`: N rounds of arithmetic (fuel grows with N);
//! - `host_calls: N`: N calls of the host's clock;
//! - `emit: N`: N alerts raised through the host's `emit-alert`;
//! - `spin_ms: N`: compute for N milliseconds by the host's clock;
//! - `fail`: answer with the guest's own error (after counting).

use std::sync::atomic::{AtomicU64, Ordering};

use twinhost_sdk::{emit_alert, now_ms, Action, Behavior, Event};

/// Events this instance has handled.
static SEEN: AtomicU64 = AtomicU64::new(0);

struct Turn;

impl Behavior for Turn {
    fn on_event(event: Event) -> Result<Vec<Action>, String> {
        if event.changed.contains_key("panic") {
            panic!("asked to panic");
        }
        let seen = SEEN.fetch_add(1, Ordering::Relaxed) + 1;
        let burn = event.changed_number("burn").unwrap_or(0.0) as u64;
        let mut x: u64 = event.seq;
        for _ in 0..burn {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        std::hint::black_box(x);
        for _ in 0..event.changed_number("host_calls").unwrap_or(0.0) as u64 {
            std::hint::black_box(now_ms());
        }
        for _ in 0..event.changed_number("emit").unwrap_or(0.0) as u64 {
            emit_alert("info", "emitted", &twinhost_sdk::Value::Null);
        }
        let until = now_ms() + event.changed_number("spin_ms").unwrap_or(0.0) as u64;
        while now_ms() < until {
            // About 0.1 ms between clock reads: far under the host-call limit per call.
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        if event.changed.contains_key("fail") {
            return Err(format!("asked to fail (event {seen} of this instance)"));
        }
        Ok(vec![Action::alert(
            "info",
            "seen",
            twinhost_sdk::serde_json::json!({ "seen": seen }),
        )])
    }
}

twinhost_sdk::export_behavior!(Turn);
