//! `stuck-behavior`: a behavior that never returns until the host stops it, for the tests that
//! a hanging behavior holds up no other behavior. On an event whose change sets `sleep` it
//! sleeps (ten minutes, inside WASI); on any other event it spins.

use twinhost_sdk::{Action, Behavior, Event};

struct Stuck;

impl Behavior for Stuck {
    fn on_event(event: Event) -> Result<Vec<Action>, String> {
        if event.changed.contains_key("sleep") {
            std::thread::sleep(std::time::Duration::from_secs(600));
            return Err("slept ten minutes: the host did not stop the call".into());
        }
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
}

twinhost_sdk::export_behavior!(Stuck);
