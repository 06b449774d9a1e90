//! What the compute pool shows: a [`PoolStats`] snapshot for `/v1/metrics`, and the gauges
//! of `/metrics` set from it.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Class;

/// The pool at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct PoolStats {
    pub slots: usize,
    pub in_use: usize,
    /// Calls waiting for a slot, all classes.
    pub queued: usize,
    /// Callers turned away as busy since start.
    pub busy: u64,
    pub by_class: BTreeMap<Class, ClassStats>,
}

/// One class of callers since start (`queued` now).
#[derive(Clone, Debug, Serialize)]
pub struct ClassStats {
    pub queued: usize,
    pub granted: u64,
    pub busy: u64,
    /// Mean wait for a slot of the calls that got one.
    pub avg_wait_ms: f64,
}

impl PoolStats {
    /// Set the pool's gauges (the histogram and counter are recorded as calls happen).
    pub fn record_gauges(&self) {
        metrics::gauge!("twinhost_compute_pool_slots").set(self.slots as f64);
        metrics::gauge!("twinhost_compute_pool_in_use").set(self.in_use as f64);
        metrics::gauge!("twinhost_compute_queue_depth").set(self.queued as f64);
        for (class, s) in &self.by_class {
            metrics::gauge!("twinhost_compute_class_queue_depth", "class" => class.as_str())
                .set(s.queued as f64);
        }
    }
}
