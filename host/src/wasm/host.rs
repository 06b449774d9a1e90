//! The host side of a guest call: the store's data, and the `host` interface guests import.

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{
    Deterministic, HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView,
};

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

/// Everything one guest call can reach.
pub struct HostState {
    pub module: String,
    pub registry: Registry,
    pub limits: StoreLimits,
    wasi: WasiCtx,
    table: ResourceTable,
    host_calls: u32,
    /// Alerts raised with `emit-alert` during the call.
    pub alerts: Vec<types::Alert>,
}

impl HostState {
    pub fn new(module: &str, registry: Registry, limits: &Limits) -> Self {
        HostState {
            module: module.to_owned(),
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
        properties: serde_json::Value::Object(t.properties.clone()).to_string(),
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
            Ok(page) => Ok(page.items.iter().map(|t| to_wit(&t.twin)).collect()),
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
