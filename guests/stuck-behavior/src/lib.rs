//! `stuck-behavior`: a behavior that spins on every event until the host stops it, for the
//! test that a hanging behavior holds up no other behavior.

use twinhost_sdk::{Action, Behavior, Event};

struct Stuck;

impl Behavior for Stuck {
    fn on_event(_event: Event) -> Result<Vec<Action>, String> {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
}

twinhost_sdk::export_behavior!(Stuck);
