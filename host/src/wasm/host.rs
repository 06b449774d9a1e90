//! The host side of a guest call: the store's data, and the `host` interface guests import.

use std::future::Future;
use std::sync::LazyLock;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use wasmtime::component::{HasData, Resource, ResourceTable};
use wasmtime::{StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::p2::bindings::sync::io::poll as sync_poll;
use wasmtime_wasi::{
    Deterministic, HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView,
};
use wasmtime_wasi_io::bindings::wasi::io::poll as async_poll;
use wasmtime_wasi_io::poll::DynPollable;

use super::bindings::twinhost::platform::{host, types};
use super::{Limits, MAX_ACTIONS_PER_CALL, MAX_HOST_CALLS};
use crate::registry::{Query, Registry};
use crate::types::{Twin as RegTwin, TwinId};

/// The "random" bytes WASI hands a guest, cycled.
const DETERMINISTIC_BYTES: [u8; 8] = [0x9e, 0x37, 0x79, 0xb9, 0x7f, 0x4a, 0x7c, 0x15];

/// A WASI clock that always reads zero.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(1)
    }
    fn now(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The trap raised when a guest passes [`MAX_HOST_CALLS`] in one call.
#[derive(Debug)]
pub struct HostCallLimit;

impl std::fmt::Display for HostCallLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "more than {MAX_HOST_CALLS} host calls in one guest call")
    }
}

impl std::error::Error for HostCallLimit {}

/// Why a guest call was stopped before its deadline.
#[derive(Debug)]
pub struct Cancelled(pub &'static str);

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the call was cancelled: {}", self.0)
    }
}

impl std::error::Error for Cancelled {}

/// What ends a guest call early, wherever the guest is: running its own code (checked on every
/// epoch tick) or waiting inside a WASI call (every wait goes through [`Interrupt::wait`]).
#[derive(Clone, Debug)]
pub struct Interrupt {
    /// The call's wall-clock deadline: past it the call fails with `deadline_exceeded`.
    pub deadline: Instant,
    /// Cancelled when the server stops: no guest call outlives it.
    pub stop: CancellationToken,
    /// Cancelled when whoever asked for the call no longer wants it (an HTTP client that
    /// disconnected).
    pub caller: Option<CancellationToken>,
}

impl Interrupt {
    /// Stop the guest if its time is up or nobody wants its answer any more.
    pub fn check(&self) -> wasmtime::Result<()> {
        if self.stop.is_cancelled() {
            return Err(Cancelled("the server is stopping").into());
        }
        if self.caller.as_ref().is_some_and(|c| c.is_cancelled()) {
            return Err(Cancelled("the caller went away").into());
        }
        if Instant::now() >= self.deadline {
            return Err(Trap::Interrupt.into());
        }
        Ok(())
    }

    /// Wait for `fut` (a WASI wait: a clock subscription, stream readiness) at most until the
    /// call is interrupted. The wait runs on [`guest_io`], never on the server's runtime, so
    /// it neither blocks the server's workers nor touches a runtime that is shutting down.
    pub fn wait<R>(&self, fut: impl Future<Output = wasmtime::Result<R>>) -> wasmtime::Result<R> {
        self.check()?;
        guest_io().block_on(async {
            let caller = async {
                match &self.caller {
                    Some(c) => c.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => Err(Cancelled("the server is stopping").into()),
                _ = caller => Err(Cancelled("the caller went away").into()),
                _ = tokio::time::sleep_until(self.deadline.into()) => Err(Trap::Interrupt.into()),
                r = fut => r,
            }
        })
    }
}

/// The runtime that drives guests' WASI waits (timers). Its own, so that a guest waiting
/// during shutdown never polls a timer of the server's runtime while it is torn down, and
/// never started from a server worker (guest calls run on blocking threads).
fn guest_io() -> &'static tokio::runtime::Runtime {
    static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("twinhost-guest-io")
            .enable_all()
            .build()
            .expect("starting the guest I/O runtime")
    });
    &RT
}

/// `wasi:io/poll` bounded by the call's [`Interrupt`]: every way a guest can wait in WASI
/// ends in `poll`, `pollable.block` or `pollable.ready` (a sleep is a clock subscription and
/// a `poll`; blocking stream calls on the streams a guest has — closed stdin, discarding
/// stdout and stderr — return at once). Linked over wasmtime-wasi's own `poll`, which would
/// wait on the server's runtime with no deadline.
pub struct BoundedPoll<'a> {
    table: &'a mut ResourceTable,
    interrupt: &'a Interrupt,
}

impl sync_poll::Host for BoundedPoll<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        let table = &mut *self.table;
        self.interrupt
            .wait(async_poll::Host::poll(table, pollables))
    }
}

impl sync_poll::HostPollable for BoundedPoll<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        let table = &mut *self.table;
        self.interrupt
            .wait(async_poll::HostPollable::ready(table, pollable))
    }
    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        let table = &mut *self.table;
        self.interrupt
            .wait(async_poll::HostPollable::block(table, pollable))
    }
    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.table, pollable)
    }
}

/// [`HasData`] for linking [`BoundedPoll`].
pub struct WasiPoll;

impl HasData for WasiPoll {
    type Data<'a> = BoundedPoll<'a>;
}

/// Link WASI (without capabilities) and the bounded `wasi:io/poll` over it.
pub fn add_wasi(linker: &mut wasmtime::component::Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    sync_poll::add_to_linker::<HostState, WasiPoll>(linker, |s| BoundedPoll {
        table: &mut s.table,
        interrupt: &s.interrupt,
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Everything one guest call can reach.
pub struct HostState {
    pub module: String,
    /// When the call must stop.
    pub interrupt: Interrupt,
    pub registry: Registry,
    pub limits: StoreLimits,
    wasi: WasiCtx,
    table: ResourceTable,
    host_calls: u32,
    /// Alerts raised with `emit-alert` during the call.
    pub alerts: Vec<types::Alert>,
}

impl HostState {
    pub fn new(module: &str, registry: Registry, limits: &Limits, interrupt: Interrupt) -> Self {
        HostState {
            module: module.to_owned(),
            interrupt,
            registry,
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes as usize)
                .instances(16)
                .tables(64)
                .memories(4)
                .trap_on_grow_failure(true)
                .build(),
            // No preopened directories, no environment, no arguments, no network, no stdio:
            // the WASI imports a standard library needs exist but reach nothing. Clocks stand
            // still at the Unix epoch and "random" bytes are a fixed cycle, so the only time
            // a guest sees is the host interface's `now-ms`, and the same inputs give the
            // same outputs (what a resolver needs to converge).
            wasi: WasiCtx::builder()
                .wall_clock(FrozenClock)
                .monotonic_clock(FrozenClock)
                .secure_random(Deterministic::new(DETERMINISTIC_BYTES.to_vec()))
                .insecure_random(Deterministic::new(DETERMINISTIC_BYTES.to_vec()))
                .insecure_random_seed(0)
                .build(),
            table: ResourceTable::new(),
            host_calls: 0,
            alerts: Vec::new(),
        }
    }

    /// Start another call on this store (an instance serving several events of a turn):
    /// its own deadline, host-call budget and alerts.
    pub fn begin_call(&mut self, deadline: Instant) {
        self.interrupt.deadline = deadline;
        self.host_calls = 0;
        self.alerts.clear();
    }

    /// Count a host call; a guest spamming the host is stopped with a trap.
    fn charge(&mut self) -> wasmtime::Result<()> {
        self.host_calls += 1;
        if self.host_calls > MAX_HOST_CALLS {
            return Err(HostCallLimit.into());
        }
        Ok(())
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The registry's twin in the WIT shape (properties as JSON text).
pub fn to_wit(t: &RegTwin) -> types::Twin {
    types::Twin {
        id: t.id.to_string(),
        entity_type: t.entity_type.clone(),
        properties: serde_json::to_string(&t.properties).expect("a JSON map serializes"),
        version: t.version,
        parent_id: t.parent_id.map(|p| p.to_string()),
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: host::Level, message: String) -> wasmtime::Result<()> {
        self.charge()?;
        let message: String = message.chars().take(4096).collect();
        let module = self.module.as_str();
        match level {
            host::Level::Debug => tracing::debug!(module, "{message}"),
            host::Level::Info => tracing::info!(module, "{message}"),
            host::Level::Warn => tracing::warn!(module, "{message}"),
            host::Level::Error => tracing::error!(module, "{message}"),
        }
        Ok(())
    }

    fn get_twin(&mut self, id: String) -> wasmtime::Result<Option<types::Twin>> {
        self.charge()?;
        let Ok(id) = id.parse::<TwinId>() else {
            return Ok(None);
        };
        Ok(self.registry.get(&id).ok().map(|t| to_wit(&t)))
    }

    fn query_twins(&mut self, query: String) -> wasmtime::Result<Result<Vec<types::Twin>, String>> {
        self.charge()?;
        let q: Query = match serde_json::from_str(&query) {
            Ok(q) => q,
            Err(e) => return Ok(Err(format!("query: {e}"))),
        };
        Ok(match self.registry.query(&q) {
            Ok(page) => Ok(page.iter().map(|t| to_wit(&t.twin())).collect()),
            Err(e) => Err(e.to_string()),
        })
    }

    fn emit_alert(&mut self, alert: types::Alert) -> wasmtime::Result<()> {
        self.charge()?;
        if self.alerts.len() >= MAX_ACTIONS_PER_CALL {
            tracing::warn!(module = %self.module, "more than {MAX_ACTIONS_PER_CALL} alerts in one call; dropping the rest");
            return Ok(());
        }
        self.alerts.push(alert);
        Ok(())
    }

    fn now_ms(&mut self) -> wasmtime::Result<u64> {
        self.charge()?;
        Ok(chrono::Utc::now().timestamp_millis().max(0) as u64)
    }
}
