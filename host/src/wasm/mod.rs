//! The WebAssembly runtime: user logic as components, sandboxed, versioned, hot-swapped.
//!
//! Owns: the wasmtime engine (Cranelift, fuel, epoch interruption, pooling allocator), the
//! module registry (upload → validate against the WIT worlds → compile → version; compiled
//! artifacts cached in the store by content hash and engine so a restart does not recompile),
//! and calls into guests with per-call fuel, memory and wall-clock limits. A call ends at its
//! deadline, when its caller goes away, or when the server stops — whether the guest is running
//! its own code (checked every epoch tick) or waiting inside WASI (every WASI wait goes through
//! the call's interrupt). Uploads are checked against the WIT contract on their types before
//! they are compiled.
//! Exposes: [`Runtime`]. Must never: give a guest a capability beyond the `host` interface
//! (no preopened directories, environment, network or inherited stdio), or let a guest's
//! failure escape its own call.
//!
//! Every guest call takes a slot of the one [`pool::ComputePool`] first (through
//! [`Runtime::on_pool`] or [`Runtime::compute_each`]): it bounds the calls in flight by what
//! the instance pool holds and shares the slots fairly between callers; a call that gets none
//! is [`CallError::Busy`], never a guest failure.
//!
//! Worlds: `compute` (invoked over HTTP and by rules), `behavior` (run by [`behaviors`] on the
//! events of the twins it is bound to) and `resolver` (merges conflicting writes for sync).

pub mod behaviors;
mod calls;
mod contract;
mod host;
#[cfg(test)]
mod module_tests;
mod modules;
pub mod pool;
mod pooled;
pub mod ticks;
#[cfg(test)]
mod turn_tests;

pub use crate::types::World;
pub use calls::{measure, GuestFailure, Write};
pub use modules::{
    BehaviorOutput, CallError, GuestAlert, GuestPatch, ModuleInfo, Runtime, VersionInfo,
    POOL_INSTANCES,
};
pub use pool::{Busy, Caller, ComputePool, PoolConfig};
pub use pooled::{EachResult, TURN};

/// Generated bindings of the three worlds; nothing outside this module sees them. The
/// `behavior` and `resolver` bindings reuse the `compute` bindings' `types` and `host`, so
/// the host interface is implemented once.
mod bindings {
    // Host functions return `wasmtime::Result`, so a guest that passes the host-call limit
    // is stopped with a trap instead of looping on refused calls until its deadline.
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "compute",
        imports: { default: trappable },
    });

    pub mod behavior {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "behavior",
            with: {
                "twinhost:platform/types": super::twinhost::platform::types,
                "twinhost:platform/host": super::twinhost::platform::host,
            },
        });
    }

    pub mod resolver {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "resolver",
            with: {
                "twinhost:platform/types": super::twinhost::platform::types,
            },
        });
    }
}

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Default fuel per call: roughly a billion simple instructions.
pub const DEFAULT_FUEL: u64 = 1_000_000_000;
/// Largest fuel a module may ask for.
pub const MAX_FUEL: u64 = 100_000_000_000;
/// Default linear-memory limit per instance.
pub const DEFAULT_MEMORY_BYTES: u64 = 64 * 1024 * 1024;
/// Largest memory limit a module may ask for (also the pooling allocator's slot size).
pub const MAX_MEMORY_BYTES: u64 = 512 * 1024 * 1024;
/// Default wall-clock deadline per call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest deadline a module may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30);
/// Epoch tick: the resolution of wall-clock deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Largest component accepted by `PUT /v1/modules/{name}`.
pub const MAX_MODULE_BYTES: usize = 32 * 1024 * 1024;
/// Largest result (JSON text) a guest may return.
pub const MAX_RESULT_BYTES: usize = 4 * 1024 * 1024;
/// Most host calls (log, get-twin, query-twins, now-ms) one guest call may make.
pub const MAX_HOST_CALLS: u32 = 10_000;
/// Most alerts (returned or emitted) and patches one guest call may produce.
pub const MAX_ACTIONS_PER_CALL: usize = 100;

/// Something bound to a module by name (a behavior, a rule's `invoke` action).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleUser {
    /// `behavior` or `rule`, for messages.
    pub kind: &'static str,
    pub name: String,
    /// The world the user calls, which the module must keep.
    pub needs: World,
}

impl std::fmt::Display for ModuleUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}", self.kind, self.name)
    }
}

/// A subsystem whose configuration binds modules (behaviors, rules). The runtime asks each
/// before a module changes world or is deleted, while holding the store's configuration
/// lock, which binding a module also takes: a check and a binding cannot interleave.
pub trait ModuleUsers: Send + Sync {
    /// This subsystem's users of module `module`.
    fn users_of(&self, module: &str) -> Vec<ModuleUser>;
}

/// Per-module limits, chosen at upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    /// Fuel per call.
    pub fuel: u64,
    /// Linear memory per instance, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock deadline per call, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: DEFAULT_FUEL,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            timeout_ms: DEFAULT_TIMEOUT.as_millis() as u64,
        }
    }
}

/// Which of a module's [`Limits`] is out of the host's range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("the fuel per call must be between 1 and {MAX_FUEL}")]
    Fuel,
    #[error("the memory limit must be between 1 and {} MiB", MAX_MEMORY_BYTES >> 20)]
    Memory,
    #[error("the deadline must be between 1 ms and {} s", MAX_TIMEOUT.as_secs())]
    Deadline,
}

impl Limits {
    /// Check the limits against the host's maxima.
    ///
    /// # Errors
    /// The first limit out of range.
    pub fn check(&self) -> Result<(), LimitError> {
        if self.fuel == 0 || self.fuel > MAX_FUEL {
            return Err(LimitError::Fuel);
        }
        if self.memory_bytes < 64 * 1024 || self.memory_bytes > MAX_MEMORY_BYTES {
            return Err(LimitError::Memory);
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT.as_millis() as u64 {
            return Err(LimitError::Deadline);
        }
        Ok(())
    }
}

/// Rules bind compute modules by name in their `invoke` actions.
impl ModuleUsers for crate::events::Rules {
    fn users_of(&self, module: &str) -> Vec<ModuleUser> {
        self.using_module(module)
            .into_iter()
            .map(|name| ModuleUser {
                kind: "rule",
                name,
                needs: World::Compute,
            })
            .collect()
    }
}
