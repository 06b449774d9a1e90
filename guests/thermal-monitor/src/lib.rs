//! `thermal-monitor`: the seed's `temperature > 85` subscription as a behavior.
//!
//! On each event that sets `temperature` above 85 it raises a `critical` alert and marks the
//! twin `overheated: true`; when the temperature is back at or below 85 it clears the mark.
//! The mark is written only when it changes, and a behavior's own patch never re-triggers it.

use twinhost_sdk::serde_json::json;
use twinhost_sdk::{Action, Behavior, Event};

/// Degrees above which a machine is overheated.
const LIMIT: f64 = 85.0;

struct ThermalMonitor;

impl Behavior for ThermalMonitor {
    fn on_event(event: Event) -> Result<Vec<Action>, String> {
        let Some(t) = event.changed_number("temperature") else {
            return Ok(Vec::new());
        };
        let marked = event.twin.properties.get("overheated") == Some(&json!(true));
        let mut actions = Vec::new();
        if t > LIMIT {
            actions.push(Action::alert(
                "critical",
                format!("{} {} at {t} degrees (limit {LIMIT})", event.twin.entity_type, event.twin.id),
                json!({"temperature": t, "limit": LIMIT, "twin_id": event.twin.id}),
            ));
            if !marked {
                actions.push(Action::patch(json!({"overheated": true}))?);
            }
        } else if marked {
            actions.push(Action::patch(json!({"overheated": false}))?);
        }
        Ok(actions)
    }
}

twinhost_sdk::export_behavior!(ThermalMonitor);
