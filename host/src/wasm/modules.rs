//! The module registry and guest calls.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store as WasmStore, Trap,
    UpdateDeadline,
};

use super::bindings::behavior::BehaviorPre;
use super::bindings::resolver::ResolverPre;
use super::bindings::twinhost::platform::types;
use super::bindings::{Compute, ComputePre};
use super::host::{to_wit, Cancelled, HostState, Interrupt};
use super::{Limits, EPOCH_TICK, MAX_MEMORY_BYTES, MAX_RESULT_BYTES};
use crate::registry::{check_name, Registry};
use crate::store::{keys, Store, StoreError};
use crate::types::Twin;

/// Instances the pooling allocator keeps slots for (concurrent guest calls).
const POOL_INSTANCES: u32 = 64;

/// Why a module upload or call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Not a component, unknown world, missing exports, bad limits (422).
    #[error("{0}")]
    Invalid(String),
    #[error("module {0:?} not found")]
    NotFound(String),
    #[error("module {0:?} has no version {1}")]
    NoVersion(String, u32),
    /// The change would break the module's users (409).
    #[error("{0}")]
    InUse(String),
    /// The guest failed: trap, fuel, memory, deadline, bad output. Only this call fails.
    #[error("{kind}: {message}")]
    Guest { kind: &'static str, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

/// One uploaded version of a module.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionInfo {
    pub version: u32,
    pub world: String,
    pub sha256: String,
    pub size: u64,
    pub limits: Limits,
    pub created_at: DateTime<Utc>,
}

/// What `GET /v1/modules/{name}` shows.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ModuleInfo {
    pub name: String,
    pub active: u32,
    pub versions: Vec<VersionInfo>,
    pub calls: u64,
    pub errors: u64,
    pub total_call_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ModuleMeta {
    active: u32,
    versions: Vec<VersionInfo>,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    errors: AtomicU64,
    micros: AtomicU64,
}

/// The active version of a module, ready to instantiate. Calls hold an `Arc` of it, so a swap
/// never disturbs a call in flight.
struct Active {
    info: VersionInfo,
    pre: Pre,
}

/// A pre-instantiated component of one of the worlds.
enum Pre {
    Compute(ComputePre<HostState>),
    Behavior(BehaviorPre<HostState>),
    Resolver(ResolverPre<HostState>),
}

/// What a behavior call produced: its actions, and the alerts it raised through the host.
#[derive(Debug, Default)]
pub struct BehaviorOutput {
    pub patches: Vec<(Option<String>, String)>,
    pub alerts: Vec<(String, String, String)>,
}

struct Entry {
    meta: ModuleMeta,
    active: Arc<Active>,
    counters: Arc<Counters>,
}

/// Runtime counters, for metrics and the restart check.
#[derive(Default, Debug)]
pub struct RuntimeStats {
    pub compiled: AtomicU64,
    pub loaded_from_cache: AtomicU64,
    pub calls: AtomicU64,
}

/// The engine, the linker and every module.
pub struct Runtime {
    engine: Engine,
    engine_hash: String,
    linker: Linker<HostState>,
    store: Store,
    registry: Registry,
    modules: RwLock<HashMap<String, Entry>>,
    pub stats: Arc<RuntimeStats>,
    /// Cancelled by [`Runtime::stop`]: every call in flight ends, and no new one starts.
    stop: CancellationToken,
    /// The WIT contract uploads are checked against before they are compiled.
    contract: super::contract::Contract,
}

/// Refuse a version of another world than the one the module's users need.
fn check_world(name: &str, keep_world: Option<&str>, world: &str) -> Result<(), CallError> {
    match keep_world {
        Some(keep) if keep != world => Err(CallError::InUse(format!(
            "module {name:?} is a {keep} module in use, and this version is a {world} module; \
             unbind its users first, or pass ?force=true"
        ))),
        _ => Ok(()),
    }
}

fn internal(e: impl std::fmt::Display) -> CallError {
    CallError::Internal(e.to_string())
}

impl Runtime {
    /// Build the engine and load every module from the store (from cached artifacts).
    pub fn open(store: Store, registry: Registry) -> Result<Arc<Runtime>, CallError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.consume_fuel(true);
        config.epoch_interruption(true);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES);
        pool.total_core_instances(POOL_INSTANCES * 4);
        pool.total_memories(POOL_INSTANCES * 2);
        pool.total_tables(POOL_INSTANCES * 4);
        pool.max_memory_size(MAX_MEMORY_BYTES as usize);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(internal)?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_hash = format!("{:016x}", h.finish());
        let mut linker = Linker::new(&engine);
        super::host::add_wasi(&mut linker).map_err(internal)?;
        Compute::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(internal)?;
        // Deadlines: a ticker advances the engine's epoch; each call's deadline is counted in
        // ticks. The thread ends when the engine is dropped.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("twinhost-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(e) => e.increment_epoch(),
                    None => return,
                }
            })
            .map_err(internal)?;
        let rt = Runtime {
            engine,
            engine_hash,
            linker,
            store,
            registry,
            modules: RwLock::new(HashMap::new()),
            stats: Arc::default(),
            stop: CancellationToken::new(),
            contract: super::contract::Contract::load().map_err(internal)?,
        };
        rt.load_all()?;
        Ok(Arc::new(rt))
    }

    fn load_all(&self) -> Result<(), CallError> {
        for kv in self.store.scan_prefix(&[keys::MODULE]) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            let meta: ModuleMeta = serde_json::from_slice(&v).map_err(internal)?;
            let Some(info) = meta
                .versions
                .iter()
                .find(|i| i.version == meta.active)
                .cloned()
            else {
                continue;
            };
            let active = self.prepare(&info)?;
            self.modules.write().insert(
                name,
                Entry {
                    meta,
                    active: Arc::new(active),
                    counters: Arc::default(),
                },
            );
        }
        Ok(())
    }

    /// The compiled component of a version: from the artifact cache, else compiled from the
    /// stored bytes (and cached).
    fn prepare(&self, info: &VersionInfo) -> Result<Active, CallError> {
        let akey = keys::artifact(&info.sha256, &self.engine_hash);
        let component = match self.store.get(&akey)? {
            // SAFETY: artifacts are written only by this server, under a key that includes the
            // engine's compatibility hash, into its own data directory.
            Some(bytes) => match unsafe { Component::deserialize(&self.engine, &bytes) } {
                Ok(c) => {
                    self.stats.loaded_from_cache.fetch_add(1, Ordering::Relaxed);
                    c
                }
                Err(e) => {
                    tracing::warn!(error = %e, sha256 = %info.sha256, "cached artifact unusable; recompiling");
                    self.compile_stored(&info.sha256)?
                }
            },
            None => self.compile_stored(&info.sha256)?,
        };
        let pre = self.instantiate_pre(&component)?;
        Ok(Active {
            info: info.clone(),
            pre,
        })
    }

    fn compile_stored(&self, sha: &str) -> Result<Component, CallError> {
        let bytes = self
            .store
            .get(&keys::module_bytes(sha))?
            .ok_or_else(|| internal(format!("module bytes {sha} missing from the store")))?;
        let c = self.compile(&bytes)?;
        let art = c.serialize().map_err(internal)?;
        self.store
            .put_durable(&keys::artifact(sha, &self.engine_hash), &art)?;
        Ok(c)
    }

    fn compile(&self, bytes: &[u8]) -> Result<Component, CallError> {
        let c = Component::new(&self.engine, bytes)
            .map_err(|e| CallError::Invalid(format!("not a valid component: {e:#}")))?;
        self.stats.compiled.fetch_add(1, Ordering::Relaxed);
        Ok(c)
    }

    fn instantiate_pre(&self, component: &Component) -> Result<Pre, CallError> {
        let world = component_world(component, &self.engine)?;
        let pre = self.linker.instantiate_pre(component).map_err(|e| {
            CallError::Invalid(format!(
                "the component needs imports the host does not provide (only twinhost:platform/host@0.1.0 and WASI without capabilities): {e:#}"
            ))
        })?;
        let wrong = |e: wasmtime::Error| {
            CallError::Invalid(format!(
                "the component does not implement world {world} as this host defines it: {e:#}"
            ))
        };
        Ok(match world {
            "compute" => Pre::Compute(ComputePre::new(pre).map_err(wrong)?),
            "behavior" => Pre::Behavior(BehaviorPre::new(pre).map_err(wrong)?),
            _ => Pre::Resolver(ResolverPre::new(pre).map_err(wrong)?),
        })
    }

    /// Validate, compile and activate a new version of `name`.
    /// Compile, store and activate a new version. With `keep_world`, a component of another
    /// world is refused with [`CallError::InUse`] (its users need that world).
    pub fn upload(
        &self,
        name: &str,
        bytes: &[u8],
        limits: Limits,
        keep_world: Option<&str>,
    ) -> Result<VersionInfo, CallError> {
        check_name("module name", name).map_err(|e| CallError::Invalid(e.to_string()))?;
        limits.check().map_err(CallError::Invalid)?;
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(CallError::Invalid(
                "not a WebAssembly binary (no \\0asm header)".into(),
            ));
        }
        if bytes[6..8] == [0, 0] {
            return Err(CallError::Invalid(
                "this is a core WebAssembly module, not a component; build for wasm32-wasip2 or wrap it with `wasm-tools component new`".into(),
            ));
        }
        // The world, exports and imports are checked on the component's types first: a
        // refusal costs milliseconds, not a Cranelift compile of the guest's code.
        let started = Instant::now();
        let world = self.contract.check(bytes)?;
        tracing::debug!(
            module = name,
            size = bytes.len(),
            ms = started.elapsed().as_millis() as u64,
            world,
            "component types checked"
        );
        check_world(name, keep_world, world)?;
        let component = self.compile(bytes)?;
        let pre = self.instantiate_pre(&component)?;
        let sha = hex::encode(Sha256::digest(bytes));
        self.store.put_durable(&keys::module_bytes(&sha), bytes)?;
        let art = component.serialize().map_err(internal)?;
        self.store
            .put_durable(&keys::artifact(&sha, &self.engine_hash), &art)?;
        let mut modules = self.modules.write();
        let mut meta = modules
            .get(name)
            .map(|e| e.meta.clone())
            .unwrap_or_default();
        let info = VersionInfo {
            version: meta.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1,
            world: world.to_owned(),
            sha256: sha,
            size: bytes.len() as u64,
            limits,
            created_at: Utc::now(),
        };
        meta.versions.push(info.clone());
        meta.active = info.version;
        self.store.put_durable(
            &keys::module(name),
            &serde_json::to_vec(&meta).map_err(internal)?,
        )?;
        let counters = modules
            .get(name)
            .map(|e| e.counters.clone())
            .unwrap_or_default();
        let active = Arc::new(Active {
            info: info.clone(),
            pre,
        });
        modules.insert(
            name.to_owned(),
            Entry {
                meta,
                active,
                counters,
            },
        );
        tracing::info!(module = name, version = info.version, sha256 = %info.sha256, "module activated");
        Ok(info)
    }

    /// Make an earlier version active again.
    /// Make an earlier version active again (`keep_world` as in [`Runtime::upload`]).
    pub fn rollback(
        &self,
        name: &str,
        version: u32,
        keep_world: Option<&str>,
    ) -> Result<VersionInfo, CallError> {
        let info = {
            let modules = self.modules.read();
            let e = modules
                .get(name)
                .ok_or_else(|| CallError::NotFound(name.to_owned()))?;
            e.meta
                .versions
                .iter()
                .find(|v| v.version == version)
                .cloned()
                .ok_or_else(|| CallError::NoVersion(name.to_owned(), version))?
        };
        check_world(name, keep_world, &info.world)?;
        let active = Arc::new(self.prepare(&info)?);
        let mut modules = self.modules.write();
        let e = modules
            .get_mut(name)
            .ok_or_else(|| CallError::NotFound(name.to_owned()))?;
        e.meta.active = version;
        self.store.put_durable(
            &keys::module(name),
            &serde_json::to_vec(&e.meta).map_err(internal)?,
        )?;
        e.active = active;
        Ok(info)
    }

    pub fn delete(&self, name: &str) -> Result<(), CallError> {
        let mut modules = self.modules.write();
        if modules.remove(name).is_none() {
            return Err(CallError::NotFound(name.to_owned()));
        }
        self.store
            .remove_keys([sled::IVec::from(keys::module(name))])?;
        self.store.flush()?;
        Ok(())
    }

    pub fn info(&self, name: &str) -> Result<ModuleInfo, CallError> {
        let modules = self.modules.read();
        let e = modules
            .get(name)
            .ok_or_else(|| CallError::NotFound(name.to_owned()))?;
        Ok(module_info(name, e))
    }

    pub fn list(&self) -> Vec<ModuleInfo> {
        let modules = self.modules.read();
        let sorted: BTreeMap<_, _> = modules.iter().collect();
        sorted.into_iter().map(|(n, e)| module_info(n, e)).collect()
    }

    /// The world of the active version of `name`.
    pub fn world_of(&self, name: &str) -> Option<String> {
        self.modules
            .read()
            .get(name)
            .map(|e| e.active.info.world.clone())
    }

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
                return Err(wrong_world(name, "compute"));
            };
            let bindings = pre.instantiate(&mut *store).map_err(guest_error)?;
            let wit_twins: Vec<_> = twins.iter().map(to_wit).collect();
            let out = bindings
                .call_run(&mut *store, &wit_twins, &parameters.to_string())
                .map_err(guest_error)?;
            json_result(out)
        })
    }

    /// Call `on-event` of the behavior module `name`. Blocking.
    pub fn call_behavior(
        &self,
        name: &str,
        event: &types::Event,
    ) -> Result<BehaviorOutput, CallError> {
        self.call(name, None, |store, pre| {
            let Pre::Behavior(pre) = pre else {
                return Err(wrong_world(name, "behavior"));
            };
            let bindings = pre.instantiate(&mut *store).map_err(guest_error)?;
            let actions = bindings
                .call_on_event(&mut *store, event)
                .map_err(guest_error)?
                .map_err(|m| CallError::Guest {
                    kind: "guest_error",
                    message: m.chars().take(4096).collect(),
                })?;
            let emitted = std::mem::take(&mut store.data_mut().alerts);
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
                        out.patches.push((p.twin_id, p.properties));
                    }
                    types::Action::Alert(a) => {
                        bytes += a.message.len() + a.data.len();
                        out.alerts.push((a.severity, a.message, a.data));
                    }
                }
            }
            for a in emitted {
                bytes += a.message.len() + a.data.len();
                out.alerts.push((a.severity, a.message, a.data));
            }
            if bytes > MAX_RESULT_BYTES {
                return Err(CallError::Guest {
                    kind: "output_too_large",
                    message: format!("the actions hold {bytes} bytes; at most {MAX_RESULT_BYTES}"),
                });
            }
            Ok(out)
        })
    }

    /// Call `resolve` of the resolver module `name`. `a` and `b` are `(value, hlc, origin)`;
    /// they are passed in canonical order (lower `(hlc, origin)` first) whatever order they
    /// are given in. Blocking.
    pub fn call_resolver(
        &self,
        name: &str,
        property: &str,
        a: (&Value, u64, &str),
        b: (&Value, u64, &str),
    ) -> Result<Value, CallError> {
        let (a, b) = if (a.1, a.2) <= (b.1, b.2) {
            (a, b)
        } else {
            (b, a)
        };
        let side = |s: (&Value, u64, &str)| types::Side {
            value: s.0.to_string(),
            hlc: s.1,
            origin: s.2.to_owned(),
        };
        self.call(name, None, |store, pre| {
            let Pre::Resolver(pre) = pre else {
                return Err(wrong_world(name, "resolver"));
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
        let (active, counters) = {
            let modules = self.modules.read();
            let e = modules
                .get(name)
                .ok_or_else(|| CallError::NotFound(name.to_owned()))?;
            (e.active.clone(), e.counters.clone())
        };
        let started = Instant::now();
        let limits = active.info.limits;
        let interrupt = Interrupt {
            deadline: started + Duration::from_millis(limits.timeout_ms),
            stop: self.stop.clone(),
            caller,
        };
        let mut store = WasmStore::new(
            &self.engine,
            HostState::new(name, self.registry.clone(), &limits, interrupt),
        );
        store.limiter(|s| &mut s.limits);
        // Every epoch tick while the guest runs its own code: stop it at its deadline or
        // when it is cancelled (waits inside WASI are bounded by the same `Interrupt`).
        store.epoch_deadline_callback(|ctx| {
            ctx.data().interrupt.check()?;
            Ok(UpdateDeadline::Continue(1))
        });
        store.set_epoch_deadline(1);
        let result = match store.data().interrupt.check() {
            Err(e) => Err(guest_error(e)),
            Ok(()) => store
                .set_fuel(limits.fuel)
                .map_err(internal)
                .and_then(|()| f(&mut store, &active.pre)),
        };
        counters.calls.fetch_add(1, Ordering::Relaxed);
        counters
            .micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &result {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(module = name, version = active.info.version, error = %e, "guest call failed");
        }
        result
    }

    pub fn module_count(&self) -> usize {
        self.modules.read().len()
    }
}

fn module_info(name: &str, e: &Entry) -> ModuleInfo {
    ModuleInfo {
        name: name.to_owned(),
        active: e.meta.active,
        versions: e.meta.versions.clone(),
        calls: e.counters.calls.load(Ordering::Relaxed),
        errors: e.counters.errors.load(Ordering::Relaxed),
        total_call_ms: e.counters.micros.load(Ordering::Relaxed) as f64 / 1000.0,
    }
}

fn wrong_world(name: &str, want: &str) -> CallError {
    CallError::Invalid(format!(
        "module {name:?} does not implement the {want} world"
    ))
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

/// Which of the host's worlds a component implements, from its exports.
fn component_world(c: &Component, engine: &Engine) -> Result<&'static str, CallError> {
    let exports: Vec<String> = c
        .component_type()
        .exports(engine)
        .map(|(n, _)| n.to_owned())
        .collect();
    let has = |n: &str| exports.iter().any(|e| e == n);
    if has("run") {
        Ok("compute")
    } else if has("on-event") {
        Ok("behavior")
    } else if has("resolve") {
        Ok("resolver")
    } else {
        Err(CallError::Invalid(format!(
            "the component exports [{}], which matches no world this host runs (compute exports `run`, behavior `on-event`, resolver `resolve`)",
            exports.join(", ")
        )))
    }
}

/// Classify a failure inside the guest.
fn guest_error(e: wasmtime::Error) -> CallError {
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
    use super::*;

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

impl crate::events::rules::Invoker for Runtime {
    fn world_of(&self, name: &str) -> Option<String> {
        Runtime::world_of(self, name)
    }

    fn invoke(
        &self,
        name: &str,
        twin: crate::types::TwinId,
        parameters: &Value,
    ) -> Result<Value, String> {
        let t = self.registry.get(&twin).map_err(|e| e.to_string())?;
        self.call_compute(name, std::slice::from_ref(&t), parameters, None)
            .map_err(|e| e.to_string())
    }
}
