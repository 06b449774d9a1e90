//! The compute pool: the one admission point of every guest call, bounded by what the
//! instance pool can hold and fair between the callers that share it.
//!
//! Every guest call (an HTTP invoke, a behavior's event, a rule's `invoke` action, a sync
//! resolver) first takes a [`Slot`] from the [`ComputePool`] and holds it while its guest
//! runs; dropping the slot (on return, panic or cancellation) hands it on. The pool has
//! `min(--compute-slots, instance-pool capacity)` slots, so wasmtime's pooling allocator is
//! never asked for more instances than it keeps, and the cores are shared instead of
//! oversubscribed.
//!
//! Fairness: each caller key ([`Caller::key`]: `invoke`, `behavior:<name>`, `rule:<name>`,
//! `resolver`, `workflow:<run>`; `tick:<name>` never queues) has its own FIFO queue, bounded by `queue_per_caller`; a freed slot goes to the
//! head of the next key's queue in round-robin order. A flood from one key therefore costs
//! every other key at most one call's wait per round: invokes cannot starve behaviors, nor one
//! behavior the others. A full queue answers [`Busy::QueueFull`] at once; a caller that waits
//! past its class's patience ([`Caller::patience`]) gets [`Busy::NoSlot`]. Busy is never a
//! guest failure: HTTP answers 429 with `Retry-After`.
//!
//! To add a caller: a [`Caller`] variant and its [`Class`], with the patience that fits
//! (`Some(Duration::ZERO)` for "skip, do not queue", as ticks do).
//!
//! Metrics: `twinhost_compute_pool_slots`, `twinhost_compute_pool_in_use`,
//! `twinhost_compute_queue_depth` (total) and `twinhost_compute_class_queue_depth{class}`
//! (gauges, from [`PoolStats::record_gauges`]), `twinhost_compute_wait_seconds{class}`
//! (histogram) and `twinhost_compute_busy_total{class,reason}` (counter).

mod caller;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

pub use caller::{
    Busy, Caller, Class, PoolConfig, DEFAULT_QUEUE_PER_CALLER, INVOKE_PATIENCE, RESOLVER_PATIENCE,
    RULE_PATIENCE, WAIT_BUCKETS, WAIT_METRIC,
};
pub use stats::{ClassStats, PoolStats};

struct Waiter {
    id: u64,
    /// New work (counted against the queue bound), not the next turn of admitted work.
    fresh: bool,
    tx: oneshot::Sender<Slot>,
}

struct Queue {
    class: Class,
    waiters: VecDeque<Waiter>,
    /// Waiters that are new work; at most `queue_per_caller`.
    fresh: usize,
}

#[derive(Default)]
struct State {
    in_use: usize,
    /// Each key with waiters has a queue here, and appears once in `ring`.
    queues: HashMap<String, Queue>,
    /// Keys with waiters, in the order they are served.
    ring: VecDeque<String>,
    queued: [usize; Class::ALL.len()],
    stopped: bool,
    next_id: u64,
}

impl State {
    /// The next waiter in round-robin order: the head of the first key's queue; the key
    /// goes to the back of the ring if it still has waiters.
    fn pop_next(&mut self) -> Option<Waiter> {
        let key = self.ring.pop_front()?;
        let q = self
            .queues
            .get_mut(&key)
            .expect("a key in the ring has a queue");
        let w = q
            .waiters
            .pop_front()
            .expect("a queue in the ring is not empty");
        self.queued[q.class.index()] -= 1;
        q.fresh -= usize::from(w.fresh);
        if q.waiters.is_empty() {
            self.queues.remove(&key);
        } else {
            self.ring.push_back(key);
        }
        Some(w)
    }

    /// Take waiter `id` of `key` out of its queue (it stopped waiting); false if it is not
    /// there (it was served).
    fn remove(&mut self, key: &str, id: u64) -> bool {
        let Some(q) = self.queues.get_mut(key) else {
            return false;
        };
        let Some(at) = q.waiters.iter().position(|w| w.id == id) else {
            return false;
        };
        if q.waiters.remove(at).is_some_and(|w| w.fresh) {
            q.fresh -= 1;
        }
        self.queued[q.class.index()] -= 1;
        if q.waiters.is_empty() {
            self.queues.remove(key);
            self.ring.retain(|k| k != key);
        }
        true
    }
}

#[derive(Default)]
struct Counters {
    granted: [AtomicU64; Class::ALL.len()],
    busy: [AtomicU64; Class::ALL.len()],
    wait_micros: [AtomicU64; Class::ALL.len()],
}

struct Shared {
    size: usize,
    queue_per_caller: usize,
    state: Mutex<State>,
    counters: Counters,
}

/// The compute pool. Cheap to clone.
#[derive(Clone)]
pub struct ComputePool {
    shared: Arc<Shared>,
}

/// The right to run one guest call. Dropping it (however the holder ends: return, panic,
/// cancellation) gives the slot to the next waiter.
pub struct Slot {
    shared: Option<Arc<Shared>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            release(&shared);
        }
    }
}

/// Hand a freed slot to the next waiter, or put it back.
fn release(shared: &Arc<Shared>) {
    loop {
        let next = {
            let mut st = shared.state.lock();
            match st.pop_next() {
                Some(w) => w,
                None => {
                    st.in_use -= 1;
                    return;
                }
            }
        };
        // Sent outside the lock. A waiter that gave up in between gets nothing: the slot
        // comes back here, disarmed, and goes to the next one.
        match next.tx.send(Slot {
            shared: Some(shared.clone()),
        }) {
            Ok(()) => return,
            Err(mut back) => {
                back.shared = None;
            }
        }
    }
}

enum Admission {
    Granted(Slot),
    Waiting(u64, oneshot::Receiver<Slot>),
}

impl ComputePool {
    /// A pool of `size` slots (at least one).
    pub fn new(size: usize, queue_per_caller: usize) -> ComputePool {
        ComputePool {
            shared: Arc::new(Shared {
                size: size.max(1),
                queue_per_caller: queue_per_caller.max(1),
                state: Mutex::default(),
                counters: Counters::default(),
            }),
        }
    }

    /// Slots in the pool.
    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// A slot for `caller`, waiting at most its class's [`Caller::patience`].
    ///
    /// # Errors
    /// [`Busy`] when the caller's queue is full, no slot frees up in time, or the pool is
    /// stopped.
    pub async fn acquire(&self, caller: &Caller) -> Result<Slot, Busy> {
        self.acquire_within(caller, caller.patience()).await
    }

    /// A slot for `caller`, waiting at most `patience` (`None`: until one frees up or the
    /// pool stops; `Some(ZERO)`: only a free slot, never a place in the queue). Waiting
    /// callers are served in round-robin order of their keys, each key's calls in FIFO
    /// order. Dropping the future gives up the place in the queue.
    ///
    /// # Errors
    /// As [`ComputePool::acquire`].
    pub async fn acquire_within(
        &self,
        caller: &Caller,
        patience: Option<Duration>,
    ) -> Result<Slot, Busy> {
        self.take(caller, patience, true).await
    }

    /// The next slot of work already admitted, which gave its slot back so that others get
    /// a turn (the next turn of an invoke over many twins): queued and served like any
    /// other call of `caller`, waiting its patience, but not counted against the queue
    /// bound, which limits new work only — a request the pool took on is not cut short
    /// because new requests filled its queue.
    ///
    /// # Errors
    /// [`Busy::NoSlot`] when no slot frees up in time, [`Busy::Stopped`].
    pub async fn acquire_again(&self, caller: &Caller) -> Result<Slot, Busy> {
        self.take(caller, caller.patience(), false).await
    }

    async fn take(
        &self,
        caller: &Caller,
        patience: Option<Duration>,
        fresh: bool,
    ) -> Result<Slot, Busy> {
        let started = Instant::now();
        let class = caller.class();
        let key = caller.key();
        let no_queue = patience == Some(Duration::ZERO);
        let result = match self.admit(&key, class, no_queue, fresh) {
            Err(busy) => Err(busy),
            Ok(Admission::Granted(slot)) => Ok(slot),
            Ok(Admission::Waiting(id, rx)) => self.wait(&key, id, rx, patience, started).await,
        };
        let c = &self.shared.counters;
        match &result {
            Ok(_) => {
                let waited = started.elapsed();
                c.granted[class.index()].fetch_add(1, Ordering::Relaxed);
                c.wait_micros[class.index()]
                    .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
                metrics::histogram!(WAIT_METRIC, "class" => class.as_str())
                    .record(waited.as_secs_f64());
            }
            Err(busy) => self.count_busy(class, busy),
        }
        result
    }

    /// Count a caller of `class` turned away (also for instance-pool refusals found after
    /// the slot was granted).
    pub fn count_busy(&self, class: Class, busy: &Busy) {
        self.shared.counters.busy[class.index()].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("twinhost_compute_busy_total", "class" => class.as_str(), "reason" => busy.reason())
            .increment(1);
    }

    /// A free slot now, or a place in `key`'s queue (for `fresh` work, if the queue has
    /// room).
    fn admit(
        &self,
        key: &str,
        class: Class,
        no_queue: bool,
        fresh: bool,
    ) -> Result<Admission, Busy> {
        let mut st = self.shared.state.lock();
        if st.stopped {
            return Err(Busy::Stopped);
        }
        if st.in_use < self.shared.size && st.ring.is_empty() {
            st.in_use += 1;
            return Ok(Admission::Granted(Slot {
                shared: Some(self.shared.clone()),
            }));
        }
        if no_queue {
            return Err(Busy::NoSlot {
                waited: Duration::ZERO,
            });
        }
        let bound = self.shared.queue_per_caller;
        if fresh && st.queues.get(key).is_some_and(|q| q.fresh >= bound) {
            return Err(Busy::QueueFull {
                key: key.to_owned(),
                bound,
            });
        }
        let id = st.next_id;
        st.next_id += 1;
        let (tx, rx) = oneshot::channel();
        if !st.queues.contains_key(key) {
            st.ring.push_back(key.to_owned());
        }
        let q = st.queues.entry(key.to_owned()).or_insert_with(|| Queue {
            class,
            waiters: VecDeque::new(),
            fresh: 0,
        });
        q.fresh += usize::from(fresh);
        q.waiters.push_back(Waiter { id, fresh, tx });
        st.queued[class.index()] += 1;
        Ok(Admission::Waiting(id, rx))
    }

    async fn wait(
        &self,
        key: &str,
        id: u64,
        mut rx: oneshot::Receiver<Slot>,
        patience: Option<Duration>,
        started: Instant,
    ) -> Result<Slot, Busy> {
        // Leaves the queue if this future is dropped while waiting (the caller went away).
        let mut leave = Leave {
            pool: self,
            key,
            id,
            armed: true,
        };
        let got = match patience {
            None => (&mut rx).await.ok(),
            Some(p) => tokio::select! {
                r = &mut rx => r.ok(),
                () = tokio::time::sleep(p) => None,
            },
        };
        leave.armed = false;
        if let Some(slot) = got {
            return Ok(slot);
        }
        if self.shared.state.lock().remove(key, id) {
            // Still queued: out of patience (the pool's stop drains every queue).
            return Err(Busy::NoSlot {
                waited: started.elapsed(),
            });
        }
        // Served just as patience ran out: take the slot if it arrived; if it had not, the
        // closed channel sends it back to the pool.
        rx.close();
        match rx.try_recv() {
            Ok(slot) => Ok(slot),
            Err(_) if self.shared.state.lock().stopped => Err(Busy::Stopped),
            Err(_) => Err(Busy::NoSlot {
                waited: started.elapsed(),
            }),
        }
    }

    /// Refuse every waiting and future caller ([`Busy::Stopped`]); slots in use finish.
    pub fn stop(&self) {
        let drained: Vec<Waiter> = {
            let mut st = self.shared.state.lock();
            st.stopped = true;
            st.ring.clear();
            st.queued = [0; Class::ALL.len()];
            st.queues.drain().flat_map(|(_, q)| q.waiters).collect()
        };
        // Dropping the senders wakes the waiters with an error.
        drop(drained);
    }

    /// A snapshot for `/metrics` and `/v1/metrics`.
    pub fn stats(&self) -> PoolStats {
        let (in_use, queued) = {
            let st = self.shared.state.lock();
            (st.in_use, st.queued)
        };
        let c = &self.shared.counters;
        let load = |a: &[AtomicU64; Class::ALL.len()], class: Class| {
            a[class.index()].load(Ordering::Relaxed)
        };
        let mut by_class = BTreeMap::new();
        for class in Class::ALL {
            let granted = load(&c.granted, class);
            let micros = load(&c.wait_micros, class);
            by_class.insert(
                class,
                ClassStats {
                    queued: queued[class.index()],
                    granted,
                    busy: load(&c.busy, class),
                    avg_wait_ms: if granted == 0 {
                        0.0
                    } else {
                        micros as f64 / granted as f64 / 1000.0
                    },
                },
            );
        }
        PoolStats {
            slots: self.shared.size,
            in_use,
            queued: queued.iter().sum(),
            busy: by_class.values().map(|c| c.busy).sum(),
            by_class,
        }
    }
}

/// Takes a waiter out of its queue when its wait is abandoned.
struct Leave<'a> {
    pool: &'a ComputePool,
    key: &'a str,
    id: u64,
    armed: bool,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.shared.state.lock().remove(self.key, self.id);
        }
    }
}
