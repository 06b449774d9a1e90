//! `machine-sim`: a machine's thermal model advanced in time by its own code (the seed's
//! "distributed twin simulation"). Bind it with `"every": "1s"`; on each `tick` event the
//! machine's `temperature` moves a tenth of the way toward its `target_temperature` (at least
//! 0.1 degree, never past it), rounded to a tenth of a degree. A machine at its target, or
//! without a target, is left alone: a tick writes only when the temperature changes. Every
//! other event is ignored.

use twinhost_sdk::serde_json::json;
use twinhost_sdk::{Action, Behavior, Event};

/// The share of the gap to the target closed on each tick.
const RATE: f64 = 0.1;
/// The smallest step, so that a machine reaches its target instead of closing in forever.
const MIN_STEP: f64 = 0.1;

struct MachineSim;

/// The temperature after one tick, or none when it stays.
fn step(temperature: f64, target: f64) -> Option<f64> {
    let gap = target - temperature;
    if gap.abs() < 1e-9 {
        return None;
    }
    let step = (gap * RATE).abs().max(MIN_STEP).min(gap.abs()).copysign(gap);
    let next = ((temperature + step) * 10.0).round() / 10.0;
    // Rounding may not move it, or may overshoot: land on the target then.
    let next = if (next - temperature).abs() < 1e-9 || (target - next) * gap < 0.0 {
        target
    } else {
        next
    };
    Some(next)
}

impl Behavior for MachineSim {
    fn on_event(event: Event) -> Result<Vec<Action>, String> {
        if event.kind != "tick" {
            return Ok(Vec::new());
        }
        let (Some(t), Some(target)) = (
            event.twin.number("temperature"),
            event.twin.number("target_temperature"),
        ) else {
            return Ok(Vec::new());
        };
        match step(t, target) {
            Some(next) => Ok(vec![Action::patch(json!({ "temperature": next }))?]),
            None => Ok(Vec::new()),
        }
    }
}

twinhost_sdk::export_behavior!(MachineSim);

#[cfg(test)]
mod tests {
    use super::step;

    #[test]
    fn warms_toward_the_target_and_stops_there() {
        let mut t = 20.0;
        let mut ticks = 0;
        while let Some(next) = step(t, 70.0) {
            assert!(next > t && next <= 70.0, "{t} -> {next}");
            t = next;
            ticks += 1;
            assert!(ticks < 200, "never reached the target");
        }
        assert_eq!(t, 70.0);
        assert_eq!(step(80.0, 70.0), Some(79.0));
    }
}
