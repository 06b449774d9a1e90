//! Calls into guests: one fresh store per call, within the module's limits (fuel, memory,
//! wall-clock deadline, host calls), ended by its deadline, its caller or the server stopping.
//!
//! Owns: instantiating the active version of a module for one call and classifying how a
//! guest failed. Exposes: [`Runtime::call_compute`], [`Runtime::call_behavior`],
//! [`Runtime::call_resolver`], [`Runtime::stop`] and [`measure`] (for `twinhost bench`).
//! These are blocking and take no slot: the server calls them only inside a slot of the
//! compute pool (`pooled`: [`Runtime::on_pool`], [`Runtime::compute_each`]).
//! Must never: let a guest's failure escape its own call.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use wasmtime::component::Component;
use wasmtime::{Store as WasmStore, Trap, UpdateDeadline};

use super::bindings::behavior::{Behavior, BehaviorPre};
use super::bindings::twinhost::platform::types;
use super::host::{to_wit, Cancelled, HostState, Interrupt};
use super::modules::{internal, Active, Counters, Pre, Runtime};
use super::pool::Busy;
use super::{Limits, World, MAX_RESULT_BYTES};
use crate::types::{Severity, Twin};

/// One write of a property in a conflict a resolver merges.
#[derive(Clone, Debug)]
pub struct Write {
    pub value: Value,
    pub hlc: u64,
    /// The node that made the write.
    pub origin: String,
}

/// How one guest call failed (its twin's result in [`Runtime::compute_each`]).
#[derive(Clone, Debug)]
pub struct GuestFailure {
    /// `fuel_exhausted`, `deadline_exceeded`, `trap`, … (the error codes of API.md).
    pub kind: &'static str,
    pub message: String,
}

use super::modules::{BehaviorOutput, CallError, GuestAlert, GuestPatch};

impl Runtime {
    /// Call `run` of the active version of `name` with `twins` and `parameters`, within the
    /// module's limits; cancelling `caller` stops the call. Blocking: run it on a blocking
    /// thread.
    pub fn call_compute(
        &self,
        name: &str,
        twins: &[Twin],
        parameters: &Value,
        caller: Option<CancellationToken>,
    ) -> Result<Value, CallError> {
        self.call(name, caller, |store, pre| {
            let Pre::Compute(pre) = pre else {
                return Err(wrong_world(name, World::Compute));
            };
            let bindings = pre.instantiate(&mut *store).map_err(guest_error)?;
            let wit_twins: Vec<_> = twins.iter().map(to_wit).collect();
            let out = bindings
                .call_run(&mut *store, &wit_twins, &parameters.to_string())
                .map_err(guest_error)?;
            json_result(out)
        })
    }

    /// Call `on-event` of the behavior module `name` once, on a fresh instance (a turn of
    /// one call). Blocking.
    pub fn call_behavior(
        &self,
        name: &str,
        event: &types::Event,
    ) -> Result<BehaviorOutput, CallError> {
        self.call_behaviors(name, std::slice::from_ref(event), Duration::ZERO)
            .pop()
            .expect("a turn makes at least one call")
    }

    /// Call `on-event` of the active version of `name` with `events` one after another, for
    /// at most `turn` (at least one event), stopping after a call the instance pool refused.
    /// One answer per call made, in order. Blocking.
    ///
    /// Each event is a call of its own (its own fuel, wall-clock deadline, host-call budget
    /// and alerts, counted as a call), but the calls of a turn share one instance while it
    /// stays sound: an instance serves the next event only when its last call returned (with
    /// actions or the guest's own error). After a trap (fuel, deadline, memory, a panic, the
    /// host-call limit) the next event gets a fresh instance. Instantiating and tearing down
    /// an instance is most of what a fresh call costs, so a busy behavior pays it once a turn
    /// instead of once an event. A guest can therefore see global state left by its previous
    /// event of the same turn; behaviors must not rely on it either way.
    pub fn call_behaviors(
        &self,
        name: &str,
        events: &[types::Event],
        turn: Duration,
    ) -> Vec<Result<BehaviorOutput, CallError>> {
        let started = Instant::now();
        let mut outs = Vec::with_capacity(events.len());
        let (active, counters) = match self.active(name) {
            Ok(a) => a,
            Err(e) => return vec![Err(e)],
        };
        let Pre::Behavior(pre) = &active.pre else {
            return vec![Err(wrong_world(name, World::Behavior))];
        };
        // The store and instance serving the turn's events while they stay sound.
        let mut live = None;
        for event in events {
            if !outs.is_empty() && started.elapsed() >= turn {
                break;
            }
            let call_started = Instant::now();
            let result = self.turn_call(name, pre, &active.info.limits, &mut live, event);
            self.count(name, active.info.version, &counters, call_started, &result);
            let busy = matches!(result, Err(CallError::Busy(_)));
            outs.push(result);
            if busy {
                break;
            }
        }
        outs
    }

    /// One call of a turn on `live`'s instance, or on a fresh one when there is none; `live`
    /// keeps the instance afterwards only if the call returned.
    fn turn_call(
        &self,
        name: &str,
        pre: &BehaviorPre<HostState>,
        limits: &Limits,
        live: &mut Option<(WasmStore<HostState>, Behavior)>,
        event: &types::Event,
    ) -> Result<BehaviorOutput, CallError> {
        let deadline = Instant::now() + Duration::from_millis(limits.timeout_ms);
        let (mut store, bindings) = match live.take() {
            Some((mut store, bindings)) => {
                store.data_mut().begin_call(deadline);
                store.set_epoch_deadline(1);
                (store, Some(bindings))
            }
            None => (self.new_store(name, limits, deadline, None), None),
        };
        start(&mut store, limits)?;
        let bindings = match bindings {
            Some(b) => b,
            None => pre.instantiate(&mut store).map_err(guest_error)?,
        };
        let (result, returned) = on_event(&mut store, &bindings, event);
        if returned {
            *live = Some((store, bindings));
        }
        result
    }

    /// Call `resolve` of the resolver module `name`. `a` and `b` are `(value, hlc, origin)`;
    /// they are passed in canonical order (lower `(hlc, origin)` first) whatever order they
    /// are given in. Blocking.
    pub fn call_resolver(
        &self,
        name: &str,
        property: &str,
        a: &Write,
        b: &Write,
    ) -> Result<Value, CallError> {
        // Canonical order, so every node asks the same question.
        let (a, b) = if (a.hlc, &a.origin) <= (b.hlc, &b.origin) {
            (a, b)
        } else {
            (b, a)
        };
        let side = |s: &Write| types::Side {
            value: s.value.to_string(),
            hlc: s.hlc,
            origin: s.origin.clone(),
        };
        self.call(name, None, |store, pre| {
            let Pre::Resolver(pre) = pre else {
                return Err(wrong_world(name, World::Resolver));
            };
            let bindings = pre.instantiate(&mut *store).map_err(guest_error)?;
            let out = bindings
                .call_resolve(&mut *store, property, &side(a), &side(b))
                .map_err(guest_error)?;
            json_result(out)
        })
    }

    /// Stop every guest call in flight (they fail with `cancelled`) and refuse new ones: the
    /// server is stopping.
    pub fn stop(&self) {
        self.stop.cancel();
        self.pool.stop();
    }

    /// Run `f` on a fresh store for the active version of `name`, within its limits,
    /// counting the call and its failure. The call ends at its deadline, when the runtime
    /// stops, or when `caller` is cancelled, whether the guest is running its own code or
    /// waiting in WASI.
    fn call<R>(
        &self,
        name: &str,
        caller: Option<CancellationToken>,
        f: impl FnOnce(&mut WasmStore<HostState>, &Pre) -> Result<R, CallError>,
    ) -> Result<R, CallError> {
        let (active, counters) = self.active(name)?;
        let started = Instant::now();
        let limits = active.info.limits;
        let deadline = started + Duration::from_millis(limits.timeout_ms);
        let mut store = self.new_store(name, &limits, deadline, caller);
        let result = start(&mut store, &limits).and_then(|()| f(&mut store, &active.pre));
        self.count(name, active.info.version, &counters, started, &result);
        result
    }

    /// The active version of `name` and its counters.
    fn active(&self, name: &str) -> Result<(Arc<Active>, Arc<Counters>), CallError> {
        let modules = self.modules.read();
        let e = modules
            .get(name)
            .ok_or_else(|| CallError::NotFound(name.to_owned()))?;
        Ok((e.active.clone(), e.counters.clone()))
    }

    /// A fresh store for a call of `name` within `limits`, ending at `deadline`, when the
    /// runtime stops or when `caller` is cancelled.
    fn new_store(
        &self,
        name: &str,
        limits: &Limits,
        deadline: Instant,
        caller: Option<CancellationToken>,
    ) -> WasmStore<HostState> {
        let interrupt = Interrupt {
            deadline,
            stop: self.stop.clone(),
            caller,
        };
        let mut store = WasmStore::new(
            &self.engine,
            HostState::new(name, self.registry.clone(), limits, interrupt),
        );
        store.limiter(|s| &mut s.limits);
        // Every epoch tick while the guest runs its own code: stop it at its deadline or
        // when it is cancelled (waits inside WASI are bounded by the same `Interrupt`).
        store.epoch_deadline_callback(|ctx| {
            ctx.data().interrupt.check()?;
            Ok(UpdateDeadline::Continue(1))
        });
        store.set_epoch_deadline(1);
        store
    }

    /// Count a call of `name` that started at `started`, and its failure.
    fn count<R>(
        &self,
        name: &str,
        version: u32,
        counters: &Counters,
        started: Instant,
        result: &Result<R, CallError>,
    ) {
        counters.calls.fetch_add(1, Ordering::Relaxed);
        counters
            .micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        match result {
            // Not the guest's failure: the instance pool had no room (counted by the pool).
            Err(e @ CallError::Busy(_)) => {
                tracing::warn!(module = name, version, error = %e, "guest call not run");
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(module = name, version, error = %e, "guest call failed");
            }
            Ok(_) => {}
        }
    }
}

/// Before a call on `store`: refuse it if it is already interrupted (its deadline passed,
/// the runtime stopping, its caller gone), then give it the call's fuel.
fn start(store: &mut WasmStore<HostState>, limits: &Limits) -> Result<(), CallError> {
    store.data().interrupt.check().map_err(guest_error)?;
    store.set_fuel(limits.fuel).map_err(internal)
}

/// Call `on-event` on a behavior instance and check its actions. The flag tells whether the
/// guest returned (with actions or its own error), so that its instance may serve another
/// call; after a trap it may not.
fn on_event(
    store: &mut WasmStore<HostState>,
    bindings: &Behavior,
    event: &types::Event,
) -> (Result<BehaviorOutput, CallError>, bool) {
    let actions = match bindings.call_on_event(&mut *store, event) {
        Err(e) => return (Err(guest_error(e)), false),
        Ok(Err(m)) => {
            return (
                Err(CallError::Guest {
                    kind: "guest_error",
                    message: m.chars().take(4096).collect(),
                }),
                true,
            )
        }
        Ok(Ok(actions)) => actions,
    };
    let emitted = std::mem::take(&mut store.data_mut().alerts);
    (behavior_output(actions, emitted), true)
}

/// A behavior call's actions and the alerts it raised through the host, checked against the
/// limits on a call's output.
fn behavior_output(
    actions: Vec<types::Action>,
    emitted: Vec<types::Alert>,
) -> Result<BehaviorOutput, CallError> {
    if actions.len() + emitted.len() > super::MAX_ACTIONS_PER_CALL {
        return Err(CallError::Guest {
            kind: "output_too_large",
            message: format!(
                "{} actions; at most {}",
                actions.len() + emitted.len(),
                super::MAX_ACTIONS_PER_CALL
            ),
        });
    }
    let mut out = BehaviorOutput::default();
    let mut bytes = 0;
    for a in actions {
        match a {
            types::Action::Patch(p) => {
                bytes += p.properties.len();
                out.patches.push(GuestPatch {
                    twin_id: p.twin_id,
                    properties: p.properties,
                });
            }
            types::Action::Alert(a) => {
                bytes += a.message.len() + a.data.len();
                out.alerts.push(guest_alert(a)?);
            }
        }
    }
    for a in emitted {
        bytes += a.message.len() + a.data.len();
        out.alerts.push(guest_alert(a)?);
    }
    if bytes > MAX_RESULT_BYTES {
        return Err(CallError::Guest {
            kind: "output_too_large",
            message: format!("the actions hold {bytes} bytes; at most {MAX_RESULT_BYTES}"),
        });
    }
    Ok(out)
}

fn wrong_world(name: &str, want: World) -> CallError {
    CallError::Invalid(format!(
        "module {name:?} does not implement the {want} world"
    ))
}

/// An alert as a guest wrote it, its severity checked (the WIT names three).
fn guest_alert(a: types::Alert) -> Result<GuestAlert, CallError> {
    let severity = Severity::ALL
        .into_iter()
        .find(|s| s.as_str() == a.severity)
        .ok_or_else(|| CallError::Guest {
            kind: "bad_output",
            message: format!(
                "an alert's severity is {:?}; one of info, warning, critical",
                a.severity.chars().take(64).collect::<String>()
            ),
        })?;
    Ok(GuestAlert {
        severity,
        message: a.message,
        data: a.data,
    })
}

/// Check a guest's JSON text result.
fn json_result(out: Result<String, String>) -> Result<Value, CallError> {
    let text = out.map_err(|m| CallError::Guest {
        kind: "guest_error",
        message: m.chars().take(4096).collect(),
    })?;
    if text.len() > MAX_RESULT_BYTES {
        return Err(CallError::Guest {
            kind: "output_too_large",
            message: format!(
                "the result is {} bytes; at most {MAX_RESULT_BYTES}",
                text.len()
            ),
        });
    }
    serde_json::from_str(&text).map_err(|e| CallError::Guest {
        kind: "bad_output",
        message: format!("the result is not JSON: {e}"),
    })
}

/// Classify a failure inside the guest. An instantiation the instance pool refused is no
/// failure of the guest: the call is [`CallError::Busy`] (429 over HTTP), never a `trap`.
fn guest_error(e: wasmtime::Error) -> CallError {
    if e.chain()
        .any(|c| c.is::<wasmtime::PoolConcurrencyLimitError>())
    {
        return CallError::Busy(Busy::Instances(format!("{e:#}")));
    }
    let (kind, message) = match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => ("fuel_exhausted", "the call ran out of fuel".to_owned()),
        Some(Trap::Interrupt) => (
            "deadline_exceeded",
            "the call passed its wall-clock deadline".to_owned(),
        ),
        Some(Trap::StackOverflow) => (
            "stack_overflow",
            "the guest overflowed its stack".to_owned(),
        ),
        Some(t) => ("trap", format!("the guest trapped: {t}")),
        None if e.downcast_ref::<Cancelled>().is_some() => (
            "cancelled",
            e.downcast_ref::<Cancelled>()
                .map(ToString::to_string)
                .unwrap_or_default(),
        ),
        None if e.downcast_ref::<super::host::HostCallLimit>().is_some() => (
            "host_call_limit",
            e.downcast_ref::<super::host::HostCallLimit>()
                .map(ToString::to_string)
                .unwrap_or_default(),
        ),
        // `StoreLimits` refuses growth past the module's memory limit with this trap.
        None if format!("{e:#}").contains("memory") => (
            "out_of_memory",
            "the guest tried to grow its memory past the module's limit".to_owned(),
        ),
        None => ("trap", format!("{e:#}")),
    };
    CallError::Guest { kind, message }
}

/// Measurements for `twinhost bench` (same engine and bindings as real calls).
pub mod measure {
    use wasmtime::component::Linker;
    use wasmtime::{Config, Engine};

    use super::*;
    use crate::registry::Registry;
    use crate::wasm::bindings::behavior::BehaviorPre;
    use crate::wasm::bindings::{Compute, ComputePre};
    use crate::wasm::Limits;

    /// Microseconds per call of `run` on a plain wasmtime setup: default engine (no fuel, no
    /// epoch deadline, on-demand allocation), no store limits, no counters — the baseline
    /// the host's own calls are compared with.
    pub fn raw_call_micros(
        bytes: &[u8],
        registry: &Registry,
        twin: &Twin,
        params: &Value,
        n: u32,
    ) -> Result<f64, CallError> {
        let (engine, pre) = raw_pre(bytes)?;
        let pre = ComputePre::new(pre).map_err(internal)?;
        let wit = vec![to_wit(twin)];
        let p = params.to_string();
        time_raw(&engine, registry, n, |store| {
            let b = pre.instantiate(&mut *store)?;
            b.call_run(&mut *store, &wit, &p)?
                .map(drop)
                .map_err(wasmtime::Error::msg)
        })
    }

    /// An interrupt that never fires (for measurements outside the server).
    fn unbounded() -> Interrupt {
        Interrupt {
            deadline: Instant::now() + Duration::from_secs(3600),
            stop: CancellationToken::new(),
            caller: None,
        }
    }

    /// Microseconds per call of `call` on a fresh store of a plain setup, over `n` calls.
    fn time_raw(
        engine: &Engine,
        registry: &Registry,
        n: u32,
        mut call: impl FnMut(&mut WasmStore<HostState>) -> wasmtime::Result<()>,
    ) -> Result<f64, CallError> {
        let started = Instant::now();
        for _ in 0..n {
            let mut store = WasmStore::new(
                engine,
                HostState::new("raw", registry.clone(), &Limits::default(), unbounded()),
            );
            call(&mut store).map_err(internal)?;
        }
        Ok(started.elapsed().as_micros() as f64 / n as f64)
    }

    /// A plain wasmtime setup for the baselines: default engine (no fuel, no epoch deadline,
    /// on-demand allocation) and the same imports.
    fn raw_pre(
        bytes: &[u8],
    ) -> Result<(Engine, wasmtime::component::InstancePre<HostState>), CallError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(internal)?;
        let component = Component::new(&engine, bytes).map_err(internal)?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(internal)?;
        Compute::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(internal)?;
        let pre = linker.instantiate_pre(&component).map_err(internal)?;
        Ok((engine, pre))
    }

    /// The WIT event a behavior gets for an update of `twin` setting `changed`.
    fn bench_event(twin: &Twin, changed: &Value) -> types::Event {
        types::Event {
            seq: 1,
            kind: "twin.updated".into(),
            twin: to_wit(twin),
            changed: changed.to_string(),
            ts_ms: 0,
        }
    }

    /// Microseconds per `on-event` call of a behavior component on a plain wasmtime setup
    /// (as [`raw_call_micros`] for compute).
    pub fn raw_behavior_micros(
        bytes: &[u8],
        registry: &Registry,
        twin: &Twin,
        changed: &Value,
        n: u32,
    ) -> Result<f64, CallError> {
        let (engine, pre) = raw_pre(bytes)?;
        let pre = BehaviorPre::new(pre).map_err(internal)?;
        let event = bench_event(twin, changed);
        time_raw(&engine, registry, n, |store| {
            let b = pre.instantiate(&mut *store)?;
            b.call_on_event(&mut *store, &event)?
                .map(drop)
                .map_err(wasmtime::Error::msg)
        })
    }

    impl Runtime {
        /// Microseconds per behavior call through the host (limits, counters, actions).
        pub fn behavior_call_micros(
            &self,
            name: &str,
            twin: &Twin,
            changed: &Value,
            n: u32,
        ) -> Result<f64, CallError> {
            let event = bench_event(twin, changed);
            let started = Instant::now();
            for _ in 0..n {
                self.call_behavior(name, &event)?;
            }
            Ok(started.elapsed().as_micros() as f64 / n as f64)
        }

        /// Microseconds per behavior call inside turns of at most `turn` (as the behavior
        /// engine runs them: the calls of a turn share an instance), over `n` calls.
        pub fn behavior_turn_call_micros(
            &self,
            name: &str,
            twin: &Twin,
            changed: &Value,
            n: u32,
            turn: Duration,
        ) -> Result<f64, CallError> {
            let events = vec![bench_event(twin, changed); n as usize];
            let started = Instant::now();
            let mut left = &events[..];
            while !left.is_empty() {
                let outs = self.call_behaviors(name, left, turn);
                let made = outs.len();
                if let Some(e) = outs.into_iter().find_map(Result::err) {
                    return Err(e);
                }
                left = &left[made..];
            }
            Ok(started.elapsed().as_micros() as f64 / n as f64)
        }

        /// Microseconds to instantiate the active version of `name` from its `InstancePre`
        /// with the pooling allocator (no call).
        pub fn instantiate_micros(&self, name: &str, n: u32) -> Result<f64, CallError> {
            let active = self
                .modules
                .read()
                .get(name)
                .map(|e| e.active.clone())
                .ok_or_else(|| CallError::NotFound(name.to_owned()))?;
            let started = Instant::now();
            for _ in 0..n {
                let mut store = WasmStore::new(
                    &self.engine,
                    HostState::new(
                        name,
                        self.registry.clone(),
                        &active.info.limits,
                        unbounded(),
                    ),
                );
                store.limiter(|s| &mut s.limits);
                store.set_fuel(active.info.limits.fuel).map_err(internal)?;
                store.set_epoch_deadline(1000);
                match &active.pre {
                    Pre::Compute(p) => p.instantiate(&mut store).map(drop),
                    Pre::Behavior(p) => p.instantiate(&mut store).map(drop),
                    Pre::Resolver(p) => p.instantiate(&mut store).map(drop),
                }
                .map_err(guest_error)?;
            }
            Ok(started.elapsed().as_micros() as f64 / n as f64)
        }

        /// Milliseconds to compile `bytes` `n` times (what a restart would cost without the
        /// artifact cache).
        pub fn compile_millis(&self, bytes: &[u8], n: u32) -> Result<f64, CallError> {
            let started = Instant::now();
            for _ in 0..n {
                Component::new(&self.engine, bytes).map_err(internal)?;
            }
            Ok(started.elapsed().as_secs_f64() * 1000.0)
        }
    }
}
