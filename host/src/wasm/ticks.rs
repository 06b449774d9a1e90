//! Periodic simulation: a behavior bound with `"every"` is also called once per interval for
//! each twin it matches, with a `tick` event (a twin's model advanced in time by its own code).
//!
//! One ticker per such behavior. At the start of each round it takes the ids of the twins the
//! binding matches (at most [`MAX_TICK_TWINS`]) and spreads their ticks evenly over the
//! interval ([`offset`]), so 10,000 twins at `1s` tick ten to a millisecond, not all at once.
//! A due tick goes to one of the behavior's tick workers, chosen by the twin (as its events
//! choose a lane), so one twin's ticks never overlap and run in order. A worker takes the
//! ticks due to it so far and runs them back to back on one compute slot, for at most
//! [`TICK_TURN`](super::behaviors::TICK_TURN) per turn, and it takes the slot only if the
//! compute pool has a free one at that moment ([`Caller::Tick`] never queues):
//! a tick that finds the pool busy is **skipped, not queued**, and so is one whose worker is
//! still behind on earlier ticks, or a twin beyond the cap. Every skip is counted on the
//! behavior (`ticks_skipped`) and in `/metrics`
//! (`twinhost_behavior_ticks_skipped_total{reason="busy"|"behind"|"capped"}`).
//!
//! The patches of the ticks go to one writer per behavior, which writes them in batches (one
//! commit for the patches of many ticks, in the order the ticks ended): a tick worker moves on
//! to its next tick without waiting for the commit, and at most [`PATCHES_IN_FLIGHT`] ticks'
//! patches wait to be written (more hold the workers back, and their ticks fall behind).
//!
//! Ticks run beside the twin's events, not in their order: a tick sees the twin as stored when
//! it starts. Only active twins tick. A tick is not logged: the guest's event has `seq` 0,
//! `changed` `{}`. The behavior's patches and alerts go through the write path like those of
//! any other call; its own patches do not trigger it again.
//!
//! Replacing or deleting the binding stops its ticker, as does the node stopping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::behaviors::{lane_of, Behaviors, Counters};
use crate::registry::Update;
use crate::types::{Lifecycle, SetOnDrop, Twin, TwinId};

/// Most twins one behavior ticks per round; the rest are skipped (counted as `capped`).
pub const MAX_TICK_TWINS: usize = 100_000;
/// Shortest interval a binding may ask for.
pub const MIN_EVERY: Duration = Duration::from_millis(100);
/// Longest interval a binding may ask for.
pub const MAX_EVERY: Duration = Duration::from_secs(24 * 3600);
/// Ticks waiting for one tick worker; more are skipped (counted as `behind`). The ticker
/// wakes about once a millisecond (the timer's resolution) or later under load, and then hands
/// out every tick due by then: the queue takes such bursts (at 10,000 ticks/s, tens of ms).
const QUEUE_PER_WORKER: usize = 256;
/// Ticks a worker takes for one turn on a slot.
const TICKS_PER_TURN: usize = 64;
/// Ticks whose patches wait for the behavior's patch writer.
pub const PATCHES_IN_FLIGHT: usize = 1024;

/// Parse and check a binding's `every`.
pub fn parse_every(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| {
        format!("every: {s:?} is not a duration ({e}); write it like \"1s\", \"500ms\" or \"10m\"")
    })?;
    if !(MIN_EVERY..=MAX_EVERY).contains(&d) {
        return Err(format!(
            "every: {s:?} is out of range: from {} to {}",
            humantime::format_duration(MIN_EVERY),
            humantime::format_duration(MAX_EVERY)
        ));
    }
    Ok(d)
}

/// When, after its round's start, the `i`-th of `n` twins ticks: evenly over `interval`.
pub fn offset(i: usize, n: usize, interval: Duration) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    let nanos = interval.as_nanos() * i as u128 / n as u128;
    Duration::from_nanos(nanos as u64)
}

/// Which twins a binding ticks.
#[derive(Clone, Debug)]
pub enum Target {
    Type(String),
    Twin(TwinId),
}

/// Count `n` skipped ticks.
fn skipped(counters: &Counters, reason: &'static str, n: usize) {
    counters
        .ticks_skipped
        .fetch_add(n as u64, Ordering::Relaxed);
    metrics::counter!("twinhost_behavior_ticks_skipped_total", "reason" => reason)
        .increment(n as u64);
}

/// The ticker of behavior `name`: runs until the returned task is aborted (the binding was
/// replaced or deleted) or the node stops.
pub(super) fn start(
    behaviors: Behaviors,
    name: String,
    module: String,
    target: Target,
    every: Duration,
    counters: Arc<Counters>,
) -> tokio::task::JoinHandle<()> {
    let ended = Arc::new(AtomicBool::new(false));
    let (patch_tx, mut patch_rx) = mpsc::channel::<Vec<Update>>(PATCHES_IN_FLIGHT);
    {
        let (b, name, counters) = (behaviors.clone(), name.clone(), counters.clone());
        tokio::spawn(async move {
            let mut batch = Vec::new();
            // Ends once every worker is gone and their patches are written.
            while patch_rx.recv_many(&mut batch, PATCHES_IN_FLIGHT).await > 0 {
                let updates: Vec<Update> = batch.drain(..).flatten().collect();
                b.write_patches(&name, &counters, updates).await;
            }
        });
    }
    let workers: Vec<mpsc::Sender<TwinId>> = (0..behaviors.per_behavior())
        .map(|_| {
            let (tx, mut rx) = mpsc::channel::<TwinId>(QUEUE_PER_WORKER);
            let (b, name, module, counters, ended, patches) = (
                behaviors.clone(),
                name.clone(),
                module.clone(),
                counters.clone(),
                ended.clone(),
                patch_tx.clone(),
            );
            tokio::spawn(async move {
                let mut ids = Vec::with_capacity(TICKS_PER_TURN);
                while rx.recv_many(&mut ids, TICKS_PER_TURN).await > 0 {
                    if ended.load(Ordering::Relaxed) {
                        return;
                    }
                    // The due ticks of this worker, run back to back on one slot.
                    let mut left: Vec<Twin> = ids
                        .drain(..)
                        .filter_map(|id| b.registry().get(&id).ok())
                        .filter(|t| t.lifecycle == Lifecycle::Active)
                        .collect();
                    while !left.is_empty() {
                        let (updates, rest, busy) =
                            match b.run_ticks(&name, &module, &counters, left).await {
                                Ok((updates, rest)) => (updates, rest, false),
                                Err((updates, not_run)) => {
                                    skipped(&counters, "busy", not_run.len());
                                    (updates, Vec::new(), true)
                                }
                            };
                        if !updates.is_empty() && patches.send(updates).await.is_err() {
                            return;
                        }
                        if busy {
                            break;
                        }
                        left = rest;
                    }
                }
            });
            tx
        })
        .collect();
    tokio::spawn(async move {
        // Aborting this task drops the flag's guard: the workers then stop at their next tick.
        let _ended = SetOnDrop(ended);
        let log = behaviors.log().clone();
        let mut warned = false;
        loop {
            let start = Instant::now();
            let ids = match &target {
                Target::Twin(id) => vec![*id],
                Target::Type(et) => {
                    let (ids, all) = behaviors.registry().ids_of_type(et, MAX_TICK_TWINS);
                    let over = all - ids.len();
                    if over > 0 {
                        skipped(&counters, "capped", over);
                        if !warned {
                            warned = true;
                            tracing::warn!(
                                behavior = %name,
                                "{over} twins of type {et} are not ticked: a behavior ticks at most {MAX_TICK_TWINS} twins"
                            );
                        }
                    }
                    ids
                }
            };
            let n = ids.len();
            for (i, id) in ids.into_iter().enumerate() {
                let due = start + offset(i, n, every);
                if due > Instant::now() + Duration::from_millis(1) {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = log.closed() => return,
                    }
                }
                match workers[lane_of(&id, workers.len())].try_send(id) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => skipped(&counters, "behind", 1),
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(start + every) => {}
                _ = log.closed() => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_spread_evenly_over_the_interval() {
        let every = Duration::from_secs(1);
        assert_eq!(offset(0, 4, every), Duration::ZERO);
        assert_eq!(offset(1, 4, every), Duration::from_millis(250));
        assert_eq!(offset(3, 4, every), Duration::from_millis(750));
        // 10,000 twins: ten per millisecond, the last one just before the next round.
        assert_eq!(offset(10, 10_000, every), Duration::from_millis(1));
        assert_eq!(offset(9_999, 10_000, every), Duration::from_micros(999_900));
        assert_eq!(offset(0, 0, every), Duration::ZERO);
    }

    #[test]
    fn every_is_checked() {
        assert_eq!(parse_every("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_every("250ms"), Ok(Duration::from_millis(250)));
        let e = parse_every("10ms").unwrap_err();
        assert!(e.contains("out of range") && e.contains("100ms"), "{e}");
        let e = parse_every("soon").unwrap_err();
        assert!(e.contains("not a duration"), "{e}");
        assert!(parse_every("2days").is_err());
    }
}
