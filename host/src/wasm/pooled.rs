//! Guest calls on the compute pool: the async entry points every caller in the server uses.
//!
//! Owns: taking a [`Slot`](super::pool::Slot) for a caller, running the blocking call on a
//! blocking thread while holding it, and splitting an invoke over many twins into turns.
//! Exposes: [`Runtime::on_pool`], [`Runtime::compute_each`], [`Runtime::pool`] and the
//! rules' [`Invoker`](crate::events::rules::Invoker). Must never: run a guest without a slot.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::calls::GuestFailure;
use super::modules::{internal, CallError, Runtime};
use super::pool::{Caller, Class, ComputePool};
use super::World;
use crate::types::{Twin, TwinId};

/// How long one turn of [`Runtime::compute_each`] keeps its compute slot before it queues
/// again: long enough that calls of a few tens of microseconds share one slot acquisition,
/// short enough that callers waiting behind a request over many twins get a turn.
pub const TURN: Duration = Duration::from_millis(10);

/// Each twin's result of [`Runtime::compute_each`].
pub type EachResult = BTreeMap<TwinId, Result<Value, GuestFailure>>;

impl Runtime {
    /// Call `run` of compute module `name` once per twin, in order, each with its own
    /// result or guest error, on the compute pool as `caller`. The twins run in turns: each
    /// turn takes a slot and runs twins on a blocking thread until [`TURN`] has passed, then
    /// gives the slot back, so a request over many twins queues again behind other callers
    /// instead of holding a slot for its whole budget (a later turn is not refused by a full
    /// queue: [`ComputePool::acquire_again`]). Twins left when `budget` runs out get
    /// `request_deadline`; twins left when a later turn gets no slot in time get `busy`;
    /// cancelling `caller_gone` stops the call in flight and skips the rest (`None`).
    ///
    /// # Errors
    /// Not a twin's failure but the request's: [`CallError::Busy`] when the first turn gets
    /// no slot (nothing ran), the module is gone or of another world.
    pub async fn compute_each(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        twins: Vec<Twin>,
        parameters: Value,
        budget: Duration,
        caller_gone: CancellationToken,
    ) -> Result<Option<EachResult>, CallError> {
        let ends = Instant::now() + budget;
        let class = caller.class();
        let parameters = Arc::new(parameters);
        let mut left: VecDeque<Twin> = twins.into();
        let mut out = BTreeMap::new();
        let mut first = true;
        while !left.is_empty() {
            if caller_gone.is_cancelled() {
                return Ok(None);
            }
            if Instant::now() >= ends {
                let message = format!(
                    "not run: the request's {} s budget was spent on the twins before",
                    budget.as_secs()
                );
                fail_all(&mut out, left, "request_deadline", &message);
                break;
            }
            let next = if first {
                self.pool.acquire(caller).await
            } else {
                self.pool.acquire_again(caller).await
            };
            let slot = match next {
                Ok(slot) => slot,
                Err(busy) if first => {
                    return Err(CallError::Busy(busy));
                }
                Err(busy) => {
                    fail_all(&mut out, left, "busy", &format!("not run: {busy}"));
                    break;
                }
            };
            first = false;
            let (me, name, parameters, gone) = (
                self.clone(),
                name.to_owned(),
                parameters.clone(),
                caller_gone.clone(),
            );
            let turn = tokio::task::spawn_blocking(move || {
                let _slot = slot;
                me.compute_turn(class, &name, left, &parameters, ends, gone)
            })
            .await
            .map_err(|e| internal(format!("compute task: {e}")))?;
            let (done, rest) = turn?;
            out.extend(done);
            left = rest;
        }
        if caller_gone.is_cancelled() {
            return Ok(None);
        }
        Ok(Some(out))
    }

    /// One turn of [`Runtime::compute_each`] (holding a slot): twins from `left` until
    /// [`TURN`] has passed, the budget ends or the caller goes; the twins not run are
    /// returned. Blocking.
    fn compute_turn(
        &self,
        class: Class,
        name: &str,
        mut left: VecDeque<Twin>,
        parameters: &Value,
        ends: Instant,
        gone: CancellationToken,
    ) -> Result<(EachResult, VecDeque<Twin>), CallError> {
        let started = Instant::now();
        let mut done = BTreeMap::new();
        while started.elapsed() < TURN && Instant::now() < ends && !gone.is_cancelled() {
            let Some(t) = left.pop_front() else { break };
            let one = std::slice::from_ref(&t);
            let r = match self.call_compute(name, one, parameters, Some(gone.clone())) {
                Ok(v) => Ok(v),
                Err(CallError::Guest { kind, message }) => Err(GuestFailure { kind, message }),
                Err(CallError::Busy(busy)) => {
                    // The instance pool refused it (as `on_pool` counts it).
                    self.pool.count_busy(class, &busy);
                    Err(GuestFailure {
                        kind: "busy",
                        message: busy.to_string(),
                    })
                }
                Err(e) => return Err(e),
            };
            done.insert(t.id, r);
        }
        Ok((done, left))
    }

    /// Run `f` on a blocking thread holding a compute slot taken for `caller` (waiting as
    /// its [`Caller::patience`] says). The slot is given back when `f` ends, also by a
    /// panic; dropping the returned future does not stop `f`, whose slot stays taken until
    /// it returns (pass a cancellation token into the call to stop it).
    ///
    /// # Errors
    /// [`CallError::Busy`] when no slot is given (also when the instance pool refused the
    /// instantiation), and `f`'s errors.
    pub async fn on_pool<R: Send + 'static>(
        self: &Arc<Self>,
        caller: &Caller,
        f: impl FnOnce(&Runtime) -> Result<R, CallError> + Send + 'static,
    ) -> Result<R, CallError> {
        let slot = self.pool.acquire(caller).await?;
        let me = self.clone();
        let out = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            f(&me)
        })
        .await
        .map_err(|e| internal(format!("guest call task: {e}")))?;
        if let Err(CallError::Busy(busy)) = &out {
            self.pool.count_busy(caller.class(), busy);
        }
        out
    }

    /// The compute pool every guest call takes a slot from.
    pub fn pool(&self) -> &ComputePool {
        &self.pool
    }
}

/// Give every twin of `left` the error `kind`.
fn fail_all(out: &mut EachResult, left: VecDeque<Twin>, kind: &'static str, message: &str) {
    for t in left {
        out.insert(
            t.id,
            Err(GuestFailure {
                kind,
                message: message.to_owned(),
            }),
        );
    }
}

impl crate::events::rules::Invoker for Runtime {
    fn world_of(&self, name: &str) -> Option<World> {
        Runtime::world_of(self, name)
    }

    fn invoke(
        self: Arc<Self>,
        rule: &str,
        name: &str,
        twin: TwinId,
        parameters: Value,
    ) -> crate::events::rules::InvokeFuture {
        let caller = Caller::Rule(rule.to_owned());
        let name = name.to_owned();
        Box::pin(async move {
            let t = self.registry.get(&twin).map_err(|e| e.to_string())?;
            self.on_pool(&caller, move |rt| {
                rt.call_compute(&name, std::slice::from_ref(&t), &parameters, None)
            })
            .await
            .map_err(|e| e.to_string())
        })
    }
}
