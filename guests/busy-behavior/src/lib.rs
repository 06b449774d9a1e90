//! `busy-behavior`: a test behavior that computes for the twin's `work_ms` milliseconds (by
//! the host's clock) on every event and ticks, then answers with no action. It stands for a
//! behavior whose model is expensive, for the tests of the compute pool's fairness. The fuel it
//! burns grows with the CPU's speed: upload it with a large `fuel` (the tests give it the most).

use twinhost_sdk::{now_ms, Action, Behavior, Event};

/// Longest computation one event asks for.
const MAX_WORK_MS: u64 = 1000;

struct Busy;

impl Behavior for Busy {
    fn on_event(event: Event) -> Result<Vec<Action>, String> {
        let work = event.twin.number("work_ms").unwrap_or(0.0).max(0.0) as u64;
        let until = now_ms() + work.min(MAX_WORK_MS);
        let mut x: u64 = event.seq;
        while now_ms() < until {
            // About 0.1 ms between clock reads: far under the host-call limit per call.
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        std::hint::black_box(x);
        Ok(Vec::new())
    }
}

twinhost_sdk::export_behavior!(Busy);
