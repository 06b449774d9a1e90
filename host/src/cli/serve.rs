//! `twinhost serve`: open the store, load the registry, serve HTTP until SIGINT/SIGTERM,
//! then drain requests, flush and exit 0.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::api::{self, auth::Auth, AppStateInner, Limits};
use crate::history::{History, Retention};
use crate::registry::Registry;
use crate::store::{keys, Store};

/// How often the history retention sweep runs.
const RETENTION_SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Data directory (created if missing).
    #[arg(long, env = "TWINHOST_DATA_DIR", default_value = super::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "TWINHOST_LISTEN", default_value = super::DEFAULT_LISTEN, value_parser = super::parse_listen)]
    pub listen: SocketAddr,
    /// This node's id (kept in the data directory; generated on first start if not given).
    #[arg(long, env = "TWINHOST_NODE_ID")]
    pub node_id: Option<String>,
    /// Serve without tokens. Refused unless the listen address is loopback.
    #[arg(long, env = "TWINHOST_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Largest JSON body, in bytes.
    #[arg(long, env = "TWINHOST_MAX_BODY_BYTES", default_value_t = api::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Largest ingest body, in bytes.
    #[arg(long, env = "TWINHOST_MAX_INGEST_BYTES", default_value_t = api::DEFAULT_MAX_INGEST_BYTES)]
    pub max_ingest_bytes: usize,
    /// Ingest requests processed at once; more are answered 429.
    #[arg(long, env = "TWINHOST_MAX_CONCURRENT_INGEST", default_value_t = api::DEFAULT_MAX_CONCURRENT_INGEST)]
    pub max_concurrent_ingest: usize,
    /// Items per `POST /v1/twins/bulk` request; more are answered 413.
    #[arg(long, env = "TWINHOST_MAX_BULK_ITEMS", default_value_t = api::DEFAULT_MAX_BULK_ITEMS)]
    pub max_bulk_items: usize,
    /// Drop history older than this (e.g. `7d`, `12h`).
    #[arg(long, env = "TWINHOST_HISTORY_MAX_AGE", default_value = "7d", value_parser = humantime::parse_duration)]
    pub history_max_age: Duration,
    /// Fold the write-ahead log into the store at most this often (bounds replay time after a
    /// crash); under load each checkpoint waits at least twice as long as the last one took.
    #[arg(long, env = "TWINHOST_CHECKPOINT_EVERY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub checkpoint_every: Duration,
    /// Keep at most this many points per property series (history written before store
    /// format 7; newer history is bounded by `--history-max-age`).
    #[arg(long, env = "TWINHOST_HISTORY_MAX_POINTS", default_value_t = 100_000)]
    pub history_max_points: u64,
    /// Fold the history journal into the store's history blocks at least this often (and
    /// whenever 4M samples wait); until then its samples are held in memory.
    #[arg(long, env = "TWINHOST_HISTORY_FOLD_EVERY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub history_fold_every: Duration,
    /// Events kept for resumption (in memory and persisted).
    #[arg(long, env = "TWINHOST_EVENT_TAIL", default_value_t = crate::events::log::DEFAULT_TAIL)]
    pub event_tail: usize,
    /// Drop persisted events older than this.
    #[arg(long, env = "TWINHOST_EVENT_MAX_AGE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub event_max_age: Duration,
    /// A node to sync with (repeatable; comma-separated in the environment), e.g.
    /// `http://10.0.0.2:7878`: this node dials it and keeps one WebSocket link, both ways.
    /// Peers can also be added at run time: `PUT /v1/peers/{node_id}`.
    #[arg(long = "peer", env = "TWINHOST_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Changes made within this window travel to peers as one batch (coalesced).
    #[arg(long, env = "TWINHOST_SYNC_FLUSH", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub sync_flush: Duration,
    /// How often linked nodes compare digests of their twins and repair what differs (what
    /// the change feed could not deliver, e.g. after a restore from an older backup).
    #[arg(long, env = "TWINHOST_ANTI_ENTROPY_EVERY", default_value = "1m", value_parser = humantime::parse_duration)]
    pub anti_entropy_every: Duration,
    /// A token of the `peer` role on the peers (`twinhost token create --role peer` there).
    #[arg(long, env = "TWINHOST_PEER_TOKEN")]
    pub peer_token: Option<String>,
    /// How long a deleted twin's tombstone lasts (in the change feed, and refusing its id).
    #[arg(long, env = "TWINHOST_TOMBSTONE_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub tombstone_retention: Duration,
    /// Guest calls that run at once (the compute pool's slots), shared fairly by invokes,
    /// behaviors, rules and resolvers; default: one per core. Capped at the instance pool's
    /// capacity (64).
    #[arg(long, env = "TWINHOST_COMPUTE_SLOTS", value_parser = clap::value_parser!(u32).range(1..))]
    pub compute_slots: Option<u32>,
    /// Guest calls one caller (the invoke requests together, one behavior, one rule, the
    /// resolvers) may have waiting for a slot; more are refused as busy at once (HTTP 429).
    #[arg(long, env = "TWINHOST_COMPUTE_QUEUE", default_value_t = crate::wasm::pool::DEFAULT_QUEUE_PER_CALLER, value_parser = parse_positive)]
    pub compute_queue: usize,
    /// sled's page cache, in MiB: what the store keeps of its files in memory beyond the
    /// twins themselves (which are always in memory, compact).
    #[arg(long, env = "TWINHOST_CACHE_MB", default_value_t = DEFAULT_CACHE_MB)]
    pub cache_mb: u64,
    /// What the query segments may hold together, in MiB: read-optimized copies of the
    /// twins of unchanged entity types for big queries (see the README); 0: none.
    #[arg(long, env = "TWINHOST_SEGMENT_MB", default_value_t = (crate::registry::SEGMENT_BYTES >> 20) as u64)]
    pub segment_mb: u64,
}

/// `--cache-mb` when not given.
pub const DEFAULT_CACHE_MB: u64 = crate::store::DEFAULT_CACHE_BYTES >> 20;

/// How the store is opened: how often it checkpoints and how much of it sled caches.
#[derive(Clone, Copy, Debug)]
pub struct StoreConfig {
    pub checkpoint_every: Duration,
    pub cache_bytes: u64,
    /// How often the history journal is folded (`--history-fold-every`).
    pub fold_every: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            checkpoint_every: crate::store::commit::CHECKPOINT_EVERY,
            cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            fold_every: crate::store::journal::FOLD_EVERY,
        }
    }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

/// The process-wide Prometheus recorder (installed once).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Other histograms render as summaries; the compute pool's wait is a real
            // histogram, so waits can be summed over nodes and read against a bound.
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(crate::wasm::pool::WAIT_METRIC.into()),
                    crate::wasm::pool::WAIT_BUCKETS,
                )
                .expect("the wait buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. in-process tests); keep ours local then.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// A running node: the pieces `serve` and the in-process benchmark share.
pub struct Node {
    pub store: Store,
    pub registry: Registry,
    pub events: crate::events::EventLog,
    pub state: api::AppState,
    pub admin_token_file: PathBuf,
}

/// Open the data directory and build the node.
pub async fn open_node(
    data_dir: &std::path::Path,
    node_id: Option<&str>,
    insecure: bool,
    retention: Retention,
    store_config: StoreConfig,
    event_log: crate::events::LogConfig,
    compute: crate::wasm::PoolConfig,
) -> anyhow::Result<Node> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let store = Store::open_with_cache(data_dir, store_config.cache_bytes)
        .with_context(|| {
            format!(
                "opening the store in {} (is another twinhost using it?)",
                data_dir.display()
            )
        })?
        .with_checkpoint_every(store_config.checkpoint_every)
        .with_fold_every(store_config.fold_every);
    let node_id = resolve_node_id(&store, node_id)?;
    let registry = Registry::open(&store, &node_id)?;
    let events = crate::events::EventLog::open(store.clone(), &registry, &node_id, event_log)?;
    {
        let events = events.clone();
        registry.set_change_sink(Arc::new(move |changes| events.append_changes(changes)));
    }
    let repaired = registry.repair().await?;
    if repaired > 0 {
        tracing::warn!(repaired, "finished an interrupted cascade delete");
    }
    let (auth, created) = Auth::open(store.clone(), data_dir, insecure).await?;
    let admin_token_file = data_dir.join(api::auth::ADMIN_TOKEN_FILE);
    if let Some(p) = &created {
        eprintln!("created the admin token: {}", p.display());
    }
    let runtime = crate::wasm::Runtime::open_with(store.clone(), registry.clone(), compute)
        .map_err(|e| anyhow::anyhow!("starting the WebAssembly runtime: {e}"))?;
    let rules = crate::events::Rules::open(store.clone(), registry.clone(), events.clone())?;
    rules.set_invoker(runtime.clone());
    let behaviors = crate::wasm::behaviors::Behaviors::open(
        store.clone(),
        registry.clone(),
        runtime.clone(),
        events.clone(),
        runtime.pool().size(),
    )?;
    let module_users: Vec<Arc<dyn crate::wasm::ModuleUsers>> =
        vec![Arc::new(behaviors.clone()), Arc::new(rules.clone())];
    for u in &module_users {
        runtime.add_users(u);
    }
    let sync_stats: Arc<crate::sync::SyncStats> = Arc::default();
    let resolver = crate::sync::resolve::wasm(runtime.clone(), runtime.pool().clone());
    let peers = crate::sync::SyncService::new(
        registry.clone(),
        store.clone(),
        sync_stats.clone(),
        resolver,
    );
    peers.set_event_log(events.clone());
    let workflows = crate::workflow::Workflows::open(crate::workflow::Deps {
        store: store.clone(),
        registry: registry.clone(),
        runtime: runtime.clone(),
        peers: Some(peers.clone()),
    })
    .await
    .context("opening the workflow runs")?;
    rules.set_starter(Arc::new(workflows.clone()));
    let state = Arc::new(AppStateInner {
        registry: registry.clone(),
        history: History::new(store.clone(), retention),
        auth,
        store: store.clone(),
        prometheus: prometheus(),
        started: Instant::now(),
        runtime,
        events: events.clone(),
        rules,
        behaviors,
        module_users,
        sync: sync_stats.clone(),
        peers,
        workflows,
        stopping: tokio::sync::watch::channel(false).0,
    });
    Ok(Node {
        store,
        registry,
        events,
        state,
        admin_token_file,
    })
}

/// A node in `dir` with every default setting, opened in process (the bench and the
/// in-process tests); `insecure` as `--insecure-no-auth`.
pub async fn open_default_node(
    dir: &std::path::Path,
    node_id: &str,
    insecure: bool,
) -> anyhow::Result<Node> {
    open_node(
        dir,
        Some(node_id),
        insecure,
        Retention::default(),
        StoreConfig::default(),
        crate::events::LogConfig::default(),
        crate::wasm::PoolConfig::default(),
    )
    .await
}

fn resolve_node_id(store: &Store, given: Option<&str>) -> anyhow::Result<String> {
    let stored = store
        .get(keys::META_NODE_ID)?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    let id = match (given, stored) {
        // Every change this node made carries its id (clocks, origins, version vectors):
        // another id would make them someone else's.
        (Some(g), Some(s)) if g != s => bail!(
            "--node-id {g:?} differs from {s:?}, the node id this data directory was created with; \
             omit --node-id to use the stored one, or use another --data-dir for a new node"
        ),
        (Some(g), _) => g.to_owned(),
        (None, Some(s)) => return Ok(s),
        (None, None) => format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
    };
    crate::registry::check_name("node id", &id)?;
    store.put_durable(keys::META_NODE_ID, id.as_bytes())?;
    Ok(id)
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.insecure_no_auth && !args.listen.ip().is_loopback() {
        bail!(
            "--insecure-no-auth is refused on {}: without tokens anyone who reaches the port \
             controls the node. Listen on 127.0.0.1 or drop the flag.",
            args.listen
        );
    }
    let retention = Retention {
        max_age: args.history_max_age,
        max_points_per_series: args.history_max_points,
    };
    let node = open_node(
        &args.data_dir,
        args.node_id.as_deref(),
        args.insecure_no_auth,
        retention,
        StoreConfig {
            checkpoint_every: args.checkpoint_every,
            cache_bytes: args.cache_mb.saturating_mul(1 << 20),
            fold_every: args.history_fold_every,
        },
        crate::events::LogConfig {
            tail: args.event_tail,
            max_age: args.event_max_age,
        },
        crate::wasm::PoolConfig {
            slots: args.compute_slots.map(|n| n as usize),
            queue_per_caller: args.compute_queue,
        },
    )
    .await?;
    node.registry
        .set_tombstone_retention(args.tombstone_retention);
    node.registry.set_segment_budget(
        usize::try_from(args.segment_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
    );
    spawn_sweeps(&node);
    node.state.peers.set_flush(args.sync_flush);
    node.state
        .peers
        .set_anti_entropy_every(args.anti_entropy_every);
    for url in &args.peers {
        node.state.peers.add_cli_peer(crate::sync::PeerConfig {
            url: url.clone(),
            token: args.peer_token.clone().filter(|t| !t.trim().is_empty()),
        })?;
    }
    node.state.peers.start_stored()?;
    let app = api::router(
        node.state.clone(),
        Limits {
            max_body_bytes: args.max_body_bytes,
            max_ingest_bytes: args.max_ingest_bytes,
            max_concurrent_ingest: args.max_concurrent_ingest,
            max_bulk_items: args.max_bulk_items,
        },
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, node_id = node.registry.node_id(), twins = node.registry.twin_count(), "listening");
    if args.insecure_no_auth {
        eprintln!("WARNING: --insecure-no-auth: every request is treated as admin");
    } else {
        eprintln!("admin token: {}", node.admin_token_file.display());
    }
    // Printed on stdout so scripts and tests can wait for it.
    println!("twinhost listening on http://{addr}");
    let state = node.state.clone();
    let stopping = node.state.clone();
    let server = axum::serve(api::nodelay(listener), app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            // End SSE and WebSocket streams, or their connections would hold the drain open
            // for as long as the clients stay.
            state.stopping.send_replace(true);
            // Peer links close with "going away"; dialers stop.
            state.peers.stop();
            // Guest calls in flight end now (`cancelled`), even one waiting in WASI.
            state.runtime.stop();
        })
        .into_future();

    // Requests in flight get DRAIN_TIMEOUT to finish; then their connections are dropped
    // (an invoke stops between twins) and the writes already queued are drained below.
    let drain_deadline = async move {
        stopping.stopping().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        r = server => r?,
        _ = drain_deadline => {
            tracing::warn!("requests still open {DRAIN_TIMEOUT:?} after the stop signal; closing them");
        }
    }
    tracing::info!("draining writes");
    node.registry.shutdown();
    node.events.shutdown();
    node.store.flush()?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Expire tombstones and history past their retention, every [`RETENTION_SWEEP_EVERY`].
fn spawn_sweeps(node: &Node) {
    let registry = node.registry.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RETENTION_SWEEP_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            match registry.sweep_tombstones().await {
                Ok(n) if n > 0 => tracing::info!(tombstones = n, "expired tombstones removed"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "tombstone sweep failed"),
            }
        }
    });
    let history = node.state.history.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RETENTION_SWEEP_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            let h = history.clone();
            match tokio::task::spawn_blocking(move || h.sweep(chrono::Utc::now())).await {
                Ok(Ok(n)) if n > 0 => {
                    tracing::info!(chunks = n, "history retention removed old chunks")
                }
                Ok(Err(e)) => tracing::error!(error = %e, "history retention sweep failed"),
                _ => {}
            }
        }
    });
}

/// How long requests in flight may take to finish once the server is asked to stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}
