//! The module registry: upload, versions, rollback and delete of components, and the engine
//! they are compiled with.
//!
//! Owns: the wasmtime engine and linker, every module's versions (bytes, compiled artifacts
//! and the version list, written through the store's commit queue), the active version of
//! each, and the rules a module change must keep: the world its users call, and no delete
//! while something is bound to it ([`super::ModuleUsers`], checked under the store's
//! configuration lock). Exposes: [`Runtime`]. Must never: compile a component before its
//! types fit the WIT contract, or activate a version before it is durable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Bytes at the start of each pooled linear memory that are reset in place rather than
/// returned to the kernel: enough for a Rust guest's stack (its first MiB) with its data and a
/// small heap above it. With PAGEMAP_SCAN only pages a call dirtied are reset, and only pages
/// a guest touched are resident, so this costs memory only in slots whose guests use it.
/// Measured on 2 cores (`bench --only wasm,behavior`): compute calls on all cores 25–28K/s
/// (256 KiB, no scan) → 110–114K/s; thermal-monitor events 13.2K/s → 66K/s; a call 28.7 µs
/// → 10.9 µs. With 256 KiB and the scan: 67K calls/s.
const KEEP_RESIDENT: usize = 4 << 20;

use super::bindings::behavior::BehaviorPre;
use super::bindings::resolver::ResolverPre;
use super::bindings::{Compute, ComputePre};
use super::host::HostState;
use super::pool::{ComputePool, PoolConfig};
use super::{Limits, ModuleUser, ModuleUsers, World, EPOCH_TICK, MAX_MEMORY_BYTES};
use crate::registry::{check_name, Registry};
use crate::store::{keys, KvOp, Store, StoreError};

/// Instances the pooling allocator keeps slots for (concurrent guest calls). The compute
/// pool ([`super::pool`]) has at most this many slots, so calls never ask for more.
pub const POOL_INSTANCES: u32 = 64;

/// Why a module upload or call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Not a component, unknown world, missing exports, bad limits (422).
    #[error("{0}")]
    Invalid(String),
    /// A limit out of the host's range (422).
    #[error(transparent)]
    Limits(#[from] super::LimitError),
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
    /// No compute slot for the call (429 over HTTP); the guest did not run.
    #[error("busy: {0}")]
    Busy(#[from] super::pool::Busy),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

/// One uploaded version of a module.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionInfo {
    pub version: u32,
    pub world: World,
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
pub(super) struct ModuleMeta {
    active: u32,
    versions: Vec<VersionInfo>,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) calls: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) micros: AtomicU64,
}

/// The active version of a module, ready to instantiate. Calls hold an `Arc` of it, so a swap
/// never disturbs a call in flight.
pub(super) struct Active {
    pub(super) info: VersionInfo,
    pub(super) pre: Pre,
}

/// A pre-instantiated component of one of the worlds.
pub(super) enum Pre {
    Compute(ComputePre<HostState>),
    Behavior(BehaviorPre<HostState>),
    Resolver(ResolverPre<HostState>),
}

/// What a behavior call produced: its actions, and the alerts it raised through the host.
#[derive(Debug, Default)]
pub struct BehaviorOutput {
    pub patches: Vec<GuestPatch>,
    pub alerts: Vec<GuestAlert>,
}

/// A merge patch a behavior asked for.
#[derive(Debug)]
pub struct GuestPatch {
    /// The twin to patch (`None`: the event's twin), as the guest wrote it.
    pub twin_id: Option<String>,
    /// The patch, JSON text as the guest wrote it.
    pub properties: String,
}

/// An alert a behavior raised (returned or emitted through the host).
#[derive(Debug)]
pub struct GuestAlert {
    pub severity: crate::types::Severity,
    pub message: String,
    /// JSON text as the guest wrote it.
    pub data: String,
}

pub(super) struct Entry {
    pub(super) meta: ModuleMeta,
    pub(super) active: Arc<Active>,
    pub(super) counters: Arc<Counters>,
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
    pub(super) engine: Engine,
    engine_hash: String,
    linker: Linker<HostState>,
    store: Store,
    pub(super) registry: Registry,
    pub(super) modules: RwLock<HashMap<String, Entry>>,
    pub stats: Arc<RuntimeStats>,
    /// Cancelled by [`Runtime::stop`]: every call in flight ends, and no new one starts.
    pub(super) stop: CancellationToken,
    /// Where every guest call takes its slot.
    pub(super) pool: ComputePool,
    /// The WIT contract uploads are checked against before they are compiled.
    contract: super::contract::Contract,
    /// Subsystems that bind modules by name, asked before a module changes or goes. Weak:
    /// behaviors hold the runtime, and the node owns both.
    users: RwLock<Vec<std::sync::Weak<dyn ModuleUsers>>>,
}

pub(super) fn internal(e: impl std::fmt::Display) -> CallError {
    CallError::Internal(e.to_string())
}

/// Refuse what is not a component before looking further.
fn check_header(bytes: &[u8]) -> Result<(), CallError> {
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
    Ok(())
}

/// Run CPU-heavy work (checking, compiling) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CallError> + Send + 'static,
) -> Result<T, CallError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(format!("compiling: {e}")))?
}

fn encode_meta(meta: &ModuleMeta) -> Result<Vec<u8>, CallError> {
    serde_json::to_vec(meta).map_err(internal)
}

/// `behavior "a", rule "b"`.
fn list(users: &[ModuleUser]) -> String {
    let names: Vec<String> = users.iter().map(ToString::to_string).collect();
    names.join(", ")
}

impl Runtime {
    /// Build the engine and load every module from the store (from cached artifacts), with
    /// the default compute pool (one slot per core).
    pub fn open(store: Store, registry: Registry) -> Result<Arc<Runtime>, CallError> {
        Runtime::open_with(store, registry, PoolConfig::default())
    }

    /// As [`Runtime::open`], with a compute pool of `pool` (capped at [`POOL_INSTANCES`]).
    pub fn open_with(
        store: Store,
        registry: Registry,
        pool: PoolConfig,
    ) -> Result<Arc<Runtime>, CallError> {
        Runtime::open_sized(store, registry, pool, POOL_INSTANCES)
    }

    /// As [`Runtime::open_with`], with an instance pool of `instances` component instances
    /// (tests shrink it to reach its limit).
    pub(super) fn open_sized(
        store: Store,
        registry: Registry,
        pool_config: PoolConfig,
        instances: u32,
    ) -> Result<Arc<Runtime>, CallError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.consume_fuel(true);
        config.epoch_interruption(true);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances);
        pool.total_core_instances(instances * 4);
        pool.total_memories(instances * 2);
        pool.total_tables(instances * 4);
        pool.max_memory_size(MAX_MEMORY_BYTES as usize);
        // Reset the first pages of a memory (and of a table) by overwriting them instead of
        // returning them to the kernel, and (Linux 6.7+, PAGEMAP_SCAN) only the pages a call
        // dirtied: calls then neither fault pages back in nor make the kernel flush every
        // core's TLB (profiled: 20% of the CPU of `bench --only behavior` went to those
        // shootdowns). See [`KEEP_RESIDENT`] for what was measured.
        pool.linear_memory_keep_resident(KEEP_RESIDENT);
        pool.pagemap_scan(wasmtime::Enabled::Auto);
        pool.table_keep_resident(64 << 10);
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
            pool: ComputePool::new(
                pool_config.size(instances as usize),
                pool_config.queue_per_caller,
            ),
            contract: super::contract::Contract::load().map_err(internal)?,
            users: RwLock::default(),
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
            let (active, art) = self.prepare(&info)?;
            if let Some(art) = art {
                // A rebuildable cache: written directly, losing it costs a recompile.
                self.store
                    .put_cache(&keys::artifact(&info.sha256, &self.engine_hash), &art)?;
            }
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
    /// stored bytes, with the new artifact for the caller to store.
    fn prepare(&self, info: &VersionInfo) -> Result<(Active, Option<Vec<u8>>), CallError> {
        let akey = keys::artifact(&info.sha256, &self.engine_hash);
        let component = match self.store.get(&akey)? {
            // SAFETY: artifacts are written only by this server, under a key that includes the
            // engine's compatibility hash, into its own data directory.
            Some(bytes) => match unsafe { Component::deserialize(&self.engine, &bytes) } {
                Ok(c) => {
                    self.stats.loaded_from_cache.fetch_add(1, Ordering::Relaxed);
                    (c, None)
                }
                Err(e) => {
                    tracing::warn!(error = %e, sha256 = %info.sha256, "cached artifact unusable; recompiling");
                    self.compile_stored(&info.sha256)?
                }
            },
            None => self.compile_stored(&info.sha256)?,
        };
        let pre = self.instantiate_pre(&component.0)?;
        let active = Active {
            info: info.clone(),
            pre,
        };
        Ok((active, component.1))
    }

    /// Compile a version from its stored bytes; also its artifact.
    fn compile_stored(&self, sha: &str) -> Result<(Component, Option<Vec<u8>>), CallError> {
        let bytes = self
            .store
            .get(&keys::module_bytes(sha))?
            .ok_or_else(|| internal(format!("module bytes {sha} missing from the store")))?;
        let c = self.compile(&bytes)?;
        let art = c.serialize().map_err(internal)?;
        Ok((c, Some(art)))
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
            World::Compute => Pre::Compute(ComputePre::new(pre).map_err(wrong)?),
            World::Behavior => Pre::Behavior(BehaviorPre::new(pre).map_err(wrong)?),
            World::Resolver => Pre::Resolver(ResolverPre::new(pre).map_err(wrong)?),
        })
    }

    /// Check, compile, store and activate a new version of `name`. Unless `force`, a
    /// component of another world than the active version's is refused while something
    /// calls that world (its users would break).
    ///
    /// # Errors
    /// [`CallError::Invalid`] for a name, limits or component that do not fit,
    /// [`CallError::InUse`] as above, and the store's errors.
    pub async fn upload(
        self: &Arc<Self>,
        name: &str,
        bytes: Vec<u8>,
        limits: Limits,
        force: bool,
    ) -> Result<VersionInfo, CallError> {
        check_name("module name", name).map_err(|e| CallError::Invalid(e.to_string()))?;
        limits.check()?;
        check_header(&bytes)?;
        let _config = self.store.lock_config().await;
        let me = self.clone();
        let module = name.to_owned();
        let (world, pre, art, bytes) = blocking(move || {
            // The world, exports and imports are checked on the component's types first: a
            // refusal costs milliseconds, not a Cranelift compile of the guest's code.
            let started = Instant::now();
            let world = me.contract.check(&bytes)?;
            tracing::debug!(module, size = bytes.len(), ms = started.elapsed().as_millis() as u64,
                %world, "component types checked");
            if !force {
                me.check_users(&module, world)?;
            }
            let component = me.compile(&bytes)?;
            let pre = me.instantiate_pre(&component)?;
            let art = component.serialize().map_err(internal)?;
            Ok((world, pre, art, bytes))
        })
        .await?;
        let sha = hex::encode(Sha256::digest(&bytes));
        let mut meta = self.meta_of(name).unwrap_or_default();
        let info = VersionInfo {
            version: meta.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1,
            world,
            sha256: sha.clone(),
            size: bytes.len() as u64,
            limits,
            created_at: Utc::now(),
        };
        meta.versions.push(info.clone());
        meta.active = info.version;
        self.store
            .write(vec![
                KvOp::Put(keys::module_bytes(&sha), bytes),
                KvOp::Put(keys::artifact(&sha, &self.engine_hash), art),
                KvOp::Put(keys::module(name), encode_meta(&meta)?),
            ])
            .await?;
        self.activate(
            name,
            meta,
            Active {
                info: info.clone(),
                pre,
            },
        );
        tracing::info!(module = name, version = info.version, sha256 = %info.sha256, "module activated");
        Ok(info)
    }

    /// Make an earlier version active again (`force` as in [`Runtime::upload`]).
    ///
    /// # Errors
    /// [`CallError::NotFound`], [`CallError::NoVersion`], [`CallError::InUse`], and the
    /// store's errors.
    pub async fn rollback(
        self: &Arc<Self>,
        name: &str,
        version: u32,
        force: bool,
    ) -> Result<VersionInfo, CallError> {
        let _config = self.store.lock_config().await;
        let mut meta = self
            .meta_of(name)
            .ok_or_else(|| CallError::NotFound(name.to_owned()))?;
        let info = meta
            .versions
            .iter()
            .find(|v| v.version == version)
            .cloned()
            .ok_or_else(|| CallError::NoVersion(name.to_owned(), version))?;
        if !force {
            self.check_users(name, info.world)?;
        }
        let me = self.clone();
        let wanted = info.clone();
        let (active, art) = blocking(move || me.prepare(&wanted)).await?;
        meta.active = version;
        let mut ops = vec![KvOp::Put(keys::module(name), encode_meta(&meta)?)];
        if let Some(art) = art {
            ops.push(KvOp::Put(
                keys::artifact(&info.sha256, &self.engine_hash),
                art,
            ));
        }
        self.store.write(ops).await?;
        self.activate(name, meta, active);
        Ok(info)
    }

    /// Delete a module with every version's bytes and compiled artifacts (those no other
    /// module shares). Unless `force`, refused with [`CallError::InUse`] while a behavior or
    /// rule uses it.
    ///
    /// # Errors
    /// [`CallError::NotFound`], [`CallError::InUse`], and the store's errors.
    pub async fn delete(&self, name: &str, force: bool) -> Result<(), CallError> {
        let _config = self.store.lock_config().await;
        let meta = self
            .meta_of(name)
            .ok_or_else(|| CallError::NotFound(name.to_owned()))?;
        let users = self.users(name);
        if !users.is_empty() && !force {
            return Err(CallError::InUse(format!(
                "module {name:?} is used by {}; delete or rebind them first",
                list(&users)
            )));
        }
        let shared: HashSet<String> = self
            .modules
            .read()
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .flat_map(|(_, e)| e.meta.versions.iter().map(|v| v.sha256.clone()))
            .collect();
        let mut ops = vec![KvOp::Delete(keys::module(name))];
        for v in meta.versions.iter().filter(|v| !shared.contains(&v.sha256)) {
            ops.push(KvOp::Delete(keys::module_bytes(&v.sha256)));
            ops.push(KvOp::DeletePrefix(keys::artifacts_of(&v.sha256)));
        }
        self.store.write(ops).await?;
        self.modules.write().remove(name);
        tracing::info!(module = name, "module deleted");
        Ok(())
    }

    /// Register a subsystem whose configuration binds modules (asked by upload, rollback
    /// and delete). The runtime keeps it weakly: the caller keeps it alive.
    pub fn add_users(&self, users: &Arc<dyn ModuleUsers>) {
        self.users.write().push(Arc::downgrade(users));
    }

    /// Everything bound to module `name`.
    pub fn users(&self, name: &str) -> Vec<ModuleUser> {
        self.users
            .read()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .flat_map(|u| u.users_of(name))
            .collect()
    }

    /// Refuse to make a version of `world` active while something calls the active
    /// version's world (another one).
    fn check_users(&self, name: &str, world: World) -> Result<(), CallError> {
        let Some(active) = self.world_of(name).filter(|&a| a != world) else {
            return Ok(());
        };
        let broken: Vec<ModuleUser> = self
            .users(name)
            .into_iter()
            .filter(|u| u.needs == active)
            .collect();
        if broken.is_empty() {
            return Ok(());
        }
        Err(CallError::InUse(format!(
            "module {name:?} is a {active} module in use by {}, and this version is a {world} \
             module; unbind its users first",
            list(&broken)
        )))
    }

    fn meta_of(&self, name: &str) -> Option<ModuleMeta> {
        self.modules.read().get(name).map(|e| e.meta.clone())
    }

    /// Make `active` the version calls use (calls in flight keep theirs).
    fn activate(&self, name: &str, meta: ModuleMeta, active: Active) {
        let mut modules = self.modules.write();
        let counters = modules
            .get(name)
            .map(|e| e.counters.clone())
            .unwrap_or_default();
        modules.insert(
            name.to_owned(),
            Entry {
                meta,
                active: Arc::new(active),
                counters,
            },
        );
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
    pub fn world_of(&self, name: &str) -> Option<World> {
        self.modules.read().get(name).map(|e| e.active.info.world)
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

/// Which of the host's worlds a component implements, from its exports.
fn component_world(c: &Component, engine: &Engine) -> Result<World, CallError> {
    let exports: Vec<String> = c
        .component_type()
        .exports(engine)
        .map(|(n, _)| n.to_owned())
        .collect();
    match World::ALL
        .into_iter()
        .find(|w| exports.iter().any(|e| e == w.export()))
    {
        Some(w) => Ok(w),
        None => Err(CallError::Invalid(format!(
            "the component exports [{}], which matches no world this host runs (compute exports `run`, behavior `on-event`, resolver `resolve`)",
            exports.join(", ")
        ))),
    }
}
