//! Sync between nodes: one WebSocket per pair of nodes (`GET /v1/sync/ws`), either side may
//! dial, each side sending its durable change feed to the other and merging what it gets with
//! [`Registry::apply_remote_resolving`] (per-property merge by the conflict strategy, deletes by tombstone,
//! version vectors merged).
//!
//! Owns: the links (at most one per peer node: when both sides dial, the link the lower node
//! id dialed stays), the dialers of the configured peers (`serve --peer URL`, or
//! `PUT /v1/peers/{node_id}`, stored), and each peer's counters. How far each peer's feed is
//! merged is stored with each merge (one commit), so a link that breaks resumes there, and a
//! peer away for a week is caught up page by page from the durable feed.
//! Exposes: [`SyncService`], [`PeerConfig`], [`SyncStats`], the [`protocol`].
//! Must never: change twins except through `apply_remote_resolving`, or hold per peer more than
//! a bounded number of unacknowledged batches (see [`link`]).
//!
//! Anti-entropy: every `--anti-entropy-every` each side of a link sends a digest of its
//! state per bucket of twin ids; the other answers with its entries of every bucket that
//! differs (see [`link`] and `registry::digest`).
//!
//! What travels: twins (the feed), their relationships (in their source twin's entry), models
//! (`models` messages, last writer wins per entity type). Concurrent writes go to the model's
//! conflict strategy (`registry::conflict`); a `merge` strategy's resolver runs here, on the
//! compute pool ([`resolve`]). Alert events are not replicated (each node's rules and
//! behaviors raise their own).

pub mod alerts;
pub mod link;
#[cfg(test)]
mod link_convergence_tests;
pub mod protocol;
pub mod resolve;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::store::{keys, KvOp, Store};
use protocol::{Close, Frame};

/// Default flush window (`serve --sync-flush`): changes made within it travel as one batch.
pub const DEFAULT_FLUSH: Duration = Duration::from_millis(5);
/// Default period of anti-entropy (`serve --anti-entropy-every`).
pub const DEFAULT_ANTI_ENTROPY: Duration = Duration::from_secs(60);
/// First wait after a failed dial; doubles up to [`MAX_BACKOFF`].
pub const RETRY_AFTER: Duration = Duration::from_millis(500);
/// Longest wait between attempts at a peer that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Most peers configured at once (`PUT /v1/peers`).
pub const MAX_PEERS: usize = 256;
/// Most peers whose counters are kept (linked now or before).
const MAX_KNOWN: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters of every link of a node, for `/v1/metrics`.
#[derive(Debug, Default)]
pub struct SyncStats {
    /// Changes received from peers.
    pub received: AtomicU64,
    /// Of those, the ones that changed something here.
    pub applied: AtomicU64,
    /// Links that failed (network, refused, protocol).
    pub errors: AtomicU64,
    /// Entries anti-entropy repaired here (sent again by a peer, and changing something).
    pub repaired: AtomicU64,
    /// Bytes of link messages received and sent (as they travel: bulk messages compressed).
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Feed entries sent to peers, and the change numbers their batches covered: over
    /// `entries_sent`, how many updates one entry carried (the coalescing ratio).
    pub entries_sent: AtomicU64,
    pub changes_covered: AtomicU64,
}

impl SyncStats {
    /// Change numbers per feed entry sent, over every link since start (1 before any).
    pub fn coalescing_ratio(&self) -> f64 {
        let sent = self.entries_sent.load(Ordering::Relaxed);
        if sent == 0 {
            1.0
        } else {
            self.changes_covered.load(Ordering::Relaxed) as f64 / sent as f64
        }
    }
}

/// A peer to dial, as `PUT /v1/peers/{node_id}` gives it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's base URL, e.g. `http://10.0.0.2:7878` (`ws://` works too).
    #[schema(example = "http://10.0.0.2:7878")]
    pub url: String,
    /// A token of the `peer` (or admin) role on that node. Stored here; never shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl PeerConfig {
    /// The link's WebSocket URL, or why `url` cannot be one.
    pub fn ws_url(&self) -> Result<String, String> {
        let u = self.url.trim_end_matches('/');
        let rest = if let Some(r) = u.strip_prefix("http://") {
            r
        } else if let Some(r) = u.strip_prefix("ws://") {
            r
        } else {
            return Err(format!(
                "peer url {:?} must start with http:// or ws:// (this build has no TLS client; put a TLS proxy in front if the link needs one)",
                self.url
            ));
        };
        if rest.is_empty() || rest.contains(char::is_whitespace) {
            return Err(format!("peer url {:?} names no host", self.url));
        }
        let base = rest.split('/').next().unwrap_or(rest);
        Ok(format!("ws://{base}/v1/sync/ws"))
    }
}

/// What is known of one peer: its link's counters (kept across reconnects).
#[derive(Debug, Default)]
pub struct LinkStats {
    /// A link is up now.
    pub up: AtomicBool,
    /// This node dialed the current (or last) link.
    pub dialed: AtomicBool,
    pub connected_at: Mutex<Option<DateTime<Utc>>>,
    /// This node's feed sent through this change number …
    pub sent: AtomicU64,
    /// … and acknowledged by the peer (merged and durable there) through this one.
    pub acked: AtomicU64,
    /// The peer's feed merged here through this change number.
    pub received_through: AtomicU64,
    /// Feed entries sent and received.
    pub ops_out: AtomicU64,
    pub ops_in: AtomicU64,
    /// Bytes of messages sent and received.
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Change numbers the sent batches covered (over `ops_out`: how many changes one entry
    /// stood for, the coalescing ratio).
    pub covered: AtomicU64,
    /// From a write on the peer to durable here, for the last batch that changed something.
    pub lag_ms: AtomicU64,
    /// Anti-entropy: entries sent to the peer because digests differed, and entries from it
    /// that changed something here.
    pub repairs_sent: AtomicU64,
    pub repaired: AtomicU64,
    /// Alerts forwarded to the peer, and alerts from it logged here (new here).
    pub alerts_out: AtomicU64,
    pub alerts_in: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// For rates: the last reading.
    rate: Mutex<Option<RateReading>>,
}

/// A reading of a link's entry counters, and the rates worked out then.
#[derive(Clone, Copy, Debug)]
struct RateReading {
    at: Instant,
    ops_in: u64,
    ops_out: u64,
    rate_in: f64,
    rate_out: f64,
}

impl LinkStats {
    /// Entries per second in and out since the previous reading (at least a second ago).
    fn rates(&self) -> (f64, f64) {
        let (i, o) = (
            self.ops_in.load(Ordering::Relaxed),
            self.ops_out.load(Ordering::Relaxed),
        );
        let mut r = self.rate.lock();
        match *r {
            Some(p) if p.at.elapsed() < Duration::from_secs(1) => (p.rate_in, p.rate_out),
            prev => {
                let (rate_in, rate_out) = prev.map_or((0.0, 0.0), |p| {
                    let s = p.at.elapsed().as_secs_f64();
                    ((i - p.ops_in) as f64 / s, (o - p.ops_out) as f64 / s)
                });
                *r = Some(RateReading {
                    at: Instant::now(),
                    ops_in: i,
                    ops_out: o,
                    rate_in,
                    rate_out,
                });
                (rate_in, rate_out)
            }
        }
    }
}

/// A live link.
struct Live {
    id: u64,
    dialed: bool,
    cancel: CancellationToken,
}

/// A configured peer's dialer.
struct Dialer {
    config: PeerConfig,
    /// `None` for `serve --peer URL` until its first handshake.
    node_id: Mutex<Option<String>>,
    /// Added through the API (stored) rather than on the command line.
    stored: bool,
    state: Mutex<&'static str>,
    last_error: Mutex<Option<String>>,
    cancel: CancellationToken,
}

/// Everything the links of a node share.
pub struct SyncCtx {
    pub node_id: String,
    pub registry: Registry,
    pub store: Store,
    pub stats: Arc<SyncStats>,
    /// Calls the `merge` strategy's resolvers.
    pub resolver: resolve::Resolver,
    /// The node's event log, whose alerts links forward (none: no alerts travel).
    pub events: std::sync::OnceLock<crate::events::EventLog>,
    /// Per origin, the newest alert logged here (forwarded alerts are logged once).
    alerts_seen: alerts::Seen,
    /// The flush window, in microseconds.
    flush_us: AtomicU64,
    /// The anti-entropy period, in milliseconds.
    anti_entropy_ms: AtomicU64,
    links: Mutex<HashMap<String, Live>>,
    known: Mutex<HashMap<String, Arc<LinkStats>>>,
    /// Dialers by node id (API) or `url:` + URL (command line).
    dialers: Mutex<BTreeMap<String, Arc<Dialer>>>,
    next_id: AtomicU64,
    stopping: CancellationToken,
}

/// A link admitted by [`SyncCtx::admit`]; leaves the table when dropped.
pub struct Admitted {
    ctx: Arc<SyncCtx>,
    peer: String,
    id: u64,
    pub cancel: CancellationToken,
    pub stats: Arc<LinkStats>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut links = self.ctx.links.lock();
        if links.get(&self.peer).is_some_and(|l| l.id == self.id) {
            links.remove(&self.peer);
            self.stats.up.store(false, Ordering::Relaxed);
        }
    }
}

/// The key under which how far `peer`'s feed is merged here is kept.
pub fn cursor_key(peer: &str) -> Vec<u8> {
    let mut k = keys::META_PEER_CURSOR.to_vec();
    k.extend_from_slice(peer.as_bytes());
    k
}

fn peer_key(node_id: &str) -> Vec<u8> {
    let mut k = keys::META_PEER.to_vec();
    k.extend_from_slice(node_id.as_bytes());
    k
}

impl SyncCtx {
    /// The flush window: a link waits this long after a change before it sends, so the
    /// changes of the window go as one batch.
    pub fn flush(&self) -> Duration {
        Duration::from_micros(self.flush_us.load(Ordering::Relaxed))
    }

    /// How often a link sends a digest of this node's state (anti-entropy).
    pub fn anti_entropy_every(&self) -> Duration {
        Duration::from_millis(self.anti_entropy_ms.load(Ordering::Relaxed).max(100))
    }

    /// The change number of `peer`'s feed merged here through (0: nothing yet).
    pub fn cursor(&self, peer: &str) -> u64 {
        self.store.get_u64(&cursor_key(peer)).unwrap_or(0)
    }

    /// Let a link with `peer` in, or say why not. Two links with one peer: the one the lower
    /// node id dialed stays (both sides decide alike); a newer link dialed the same way
    /// replaces the older (which is probably dead).
    pub fn admit(self: &Arc<Self>, peer: &str, dialed: bool) -> Result<Admitted, Close> {
        let mut links = self.links.lock();
        if let Some(l) = links.get(peer) {
            let lower_dials = if self.node_id.as_str() < peer {
                dialed
            } else {
                !dialed
            };
            if l.dialed != dialed && !lower_dials {
                return Err(Close::new(
                    Close::DUPLICATE,
                    format!(
                        "{} and {peer} are linked already (the link {} dialed stays)",
                        self.node_id,
                        self.node_id.as_str().min(peer)
                    ),
                ));
            }
            l.cancel.cancel();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = self.stopping.child_token();
        links.insert(
            peer.to_owned(),
            Live {
                id,
                dialed,
                cancel: cancel.clone(),
            },
        );
        drop(links);
        let stats = {
            let mut known = self.known.lock();
            if known.len() >= MAX_KNOWN && !known.contains_key(peer) {
                known.retain(|_, s| s.up.load(Ordering::Relaxed));
            }
            Arc::clone(known.entry(peer.to_owned()).or_default())
        };
        stats.up.store(true, Ordering::Relaxed);
        stats.dialed.store(dialed, Ordering::Relaxed);
        *stats.connected_at.lock() = Some(Utc::now());
        Ok(Admitted {
            ctx: Arc::clone(self),
            peer: peer.to_owned(),
            id,
            cancel,
            stats,
        })
    }

    fn linked(&self, peer: &str) -> bool {
        self.links.lock().contains_key(peer)
    }
}

/// The sync side of a node: its links, dialers and counters.
#[derive(Clone)]
pub struct SyncService(Arc<SyncCtx>);

impl SyncService {
    /// The service of a node; dials nothing until peers are added.
    pub fn new(
        registry: Registry,
        store: Store,
        stats: Arc<SyncStats>,
        resolver: resolve::Resolver,
    ) -> Self {
        SyncService(Arc::new(SyncCtx {
            node_id: registry.node_id().to_owned(),
            registry,
            store,
            stats,
            resolver,
            events: std::sync::OnceLock::new(),
            alerts_seen: alerts::Seen::default(),
            flush_us: AtomicU64::new(DEFAULT_FLUSH.as_micros() as u64),
            anti_entropy_ms: AtomicU64::new(DEFAULT_ANTI_ENTROPY.as_millis() as u64),
            links: Mutex::default(),
            known: Mutex::default(),
            dialers: Mutex::default(),
            next_id: AtomicU64::new(1),
            stopping: CancellationToken::new(),
        }))
    }

    /// The peers linked now that have not acknowledged this node's feed through `through`.
    pub fn behind(&self, through: u64) -> Vec<String> {
        self.0
            .known
            .lock()
            .iter()
            .filter(|(_, s)| {
                s.up.load(Ordering::Relaxed) && s.acked.load(Ordering::Relaxed) < through
            })
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// How many peers are linked now.
    pub fn linked_count(&self) -> usize {
        self.0
            .known
            .lock()
            .values()
            .filter(|s| s.up.load(Ordering::Relaxed))
            .count()
    }

    /// Forward the alerts of `events` over every link (and log the peers' alerts there).
    pub fn set_event_log(&self, events: crate::events::EventLog) {
        let _ = self.0.events.set(events);
    }

    /// Dial the peers stored with `PUT /v1/peers` (at start).
    pub fn start_stored(&self) -> anyhow::Result<()> {
        for kv in self.0.store.scan_prefix(keys::META_PEER) {
            let (k, v) = kv?;
            let node_id = String::from_utf8_lossy(&k[keys::META_PEER.len()..]).into_owned();
            match serde_json::from_slice::<PeerConfig>(&v) {
                Ok(config) => self.spawn_dialer(node_id.clone(), Some(node_id), config, true),
                Err(e) => {
                    tracing::error!(peer = %node_id, error = %e, "unreadable stored peer; remove it with DELETE /v1/peers/{node_id}")
                }
            }
        }
        Ok(())
    }

    /// Dial `url` (`serve --peer`), whichever node answers there.
    pub fn add_cli_peer(&self, config: PeerConfig) -> anyhow::Result<()> {
        config.ws_url().map_err(anyhow::Error::msg)?;
        self.spawn_dialer(format!("url:{}", config.url), None, config, false);
        Ok(())
    }

    /// Add or replace the peer `node_id` (stored; dialed from now on).
    pub async fn put_peer(&self, node_id: &str, config: PeerConfig) -> Result<bool, PeerError> {
        crate::registry::check_name("node id", node_id)
            .map_err(|e| PeerError::Invalid(e.to_string()))?;
        if node_id == self.0.node_id {
            return Err(PeerError::Invalid(format!(
                "{node_id:?} is this node's own id: a node cannot be its own peer"
            )));
        }
        config.ws_url().map_err(PeerError::Invalid)?;
        let _lock = self.0.store.lock_config().await;
        let existed = self.0.dialers.lock().contains_key(node_id);
        if !existed && self.0.dialers.lock().len() >= MAX_PEERS {
            return Err(PeerError::Invalid(format!(
                "at most {MAX_PEERS} peers; remove one first"
            )));
        }
        let bytes = serde_json::to_vec(&config).expect("json");
        self.0
            .store
            .write(vec![KvOp::Put(peer_key(node_id), bytes)])
            .await
            .map_err(PeerError::Store)?;
        self.spawn_dialer(node_id.to_owned(), Some(node_id.to_owned()), config, true);
        Ok(!existed)
    }

    /// Remove the peer `node_id`: stop dialing it and end its link.
    pub async fn remove_peer(&self, node_id: &str) -> Result<(), PeerError> {
        let _lock = self.0.store.lock_config().await;
        let Some(d) = self.0.dialers.lock().remove(node_id) else {
            return Err(PeerError::NotFound(format!("no peer {node_id:?}")));
        };
        d.cancel.cancel();
        if let Some(l) = self.0.links.lock().get(node_id) {
            l.cancel.cancel();
        }
        if d.stored {
            self.0
                .store
                .write(vec![KvOp::Delete(peer_key(node_id))])
                .await
                .map_err(PeerError::Store)?;
        }
        Ok(())
    }

    fn spawn_dialer(&self, key: String, node_id: Option<String>, config: PeerConfig, stored: bool) {
        let dialer = Arc::new(Dialer {
            config,
            node_id: Mutex::new(node_id),
            stored,
            state: Mutex::new("connecting"),
            last_error: Mutex::new(None),
            cancel: self.0.stopping.child_token(),
        });
        if let Some(old) = self.0.dialers.lock().insert(key, Arc::clone(&dialer)) {
            old.cancel.cancel();
        }
        let ctx = Arc::clone(&self.0);
        tokio::spawn(async move {
            let cancel = dialer.cancel.clone();
            tokio::select! {
                () = dial_loop(&ctx, &dialer) => {}
                () = cancel.cancelled() => {}
            }
        });
    }

    /// Accept a link a peer dialed (`GET /v1/sync/ws`).
    pub async fn accept(&self, socket: axum::extract::ws::WebSocket) {
        use axum::extract::ws::{CloseFrame, Message};
        let (tx, rx) = socket.split();
        let tx = tx
            .sink_map_err(anyhow::Error::from)
            .with(|o: link::Out| async move {
                Ok::<_, anyhow::Error>(match o {
                    link::Out::Text(t) => Message::Text(t.into()),
                    link::Out::Binary(b) => Message::Binary(b.into()),
                    link::Out::Ping => Message::Ping(Default::default()),
                    link::Out::Close(c) => Message::Close(Some(CloseFrame {
                        code: c.code,
                        reason: c.reason.into(),
                    })),
                })
            });
        let rx = rx.map(|m| {
            Ok(match m? {
                Message::Text(t) => Frame::Text(t.to_string()),
                Message::Binary(b) => Frame::Binary(b),
                Message::Close(c) => Frame::Close(c.map(|c| Close::new(c.code, c.reason.as_str()))),
                _ => Frame::Other,
            })
        });
        let (peer, end) = link::run(
            Arc::clone(&self.0),
            Box::pin(tx),
            Box::pin(rx),
            false,
            None,
            |_| {},
        )
        .await;
        log_end(&self.0, peer.as_deref().unwrap_or("?"), &end);
    }

    /// Set the flush window (`serve --sync-flush`).
    pub fn set_flush(&self, window: Duration) {
        self.0
            .flush_us
            .store(window.as_micros() as u64, Ordering::Relaxed);
    }

    /// Set the anti-entropy period (`serve --anti-entropy-every`).
    pub fn set_anti_entropy_every(&self, every: Duration) {
        self.0
            .anti_entropy_ms
            .store(every.as_millis() as u64, Ordering::Relaxed);
    }

    /// Stop every link and dialer (the node is stopping).
    pub fn stop(&self) {
        self.0.stopping.cancel();
    }

    pub fn node_id(&self) -> &str {
        &self.0.node_id
    }

    /// The counters of the link with `peer` (linked now or before).
    pub fn link_stats(&self, peer: &str) -> Option<Arc<LinkStats>> {
        self.0.known.lock().get(peer).cloned()
    }

    /// `GET /v1/peers`: every configured or linked peer.
    pub fn peers_json(&self) -> Value {
        let head = *self.0.registry.watch_durable().borrow();
        let mut rows: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
        for (key, d) in self.0.dialers.lock().iter() {
            let node = d.node_id.lock().clone();
            let mut row = serde_json::Map::new();
            row.insert("node_id".into(), json!(node));
            row.insert("url".into(), json!(d.config.url));
            row.insert(
                "configured".into(),
                json!(if d.stored { "api" } else { "command line" }),
            );
            row.insert("state".into(), json!(*d.state.lock()));
            row.insert("last_error".into(), json!(*d.last_error.lock()));
            rows.insert(node.unwrap_or_else(|| key.clone()), row);
        }
        for (peer, s) in self.0.known.lock().iter() {
            let row = rows.entry(peer.clone()).or_insert_with(|| {
                let mut r = serde_json::Map::new();
                r.insert("node_id".into(), json!(peer));
                r.insert("url".into(), Value::Null);
                r.insert("configured".into(), Value::Null);
                r
            });
            let up = s.up.load(Ordering::Relaxed);
            let acked = s.acked.load(Ordering::Relaxed);
            let (rate_in, rate_out) = s.rates();
            let ops_out = s.ops_out.load(Ordering::Relaxed);
            let covered = s.covered.load(Ordering::Relaxed);
            row.insert(
                "state".into(),
                json!(if up {
                    "connected"
                } else {
                    row.get("state")
                        .and_then(Value::as_str)
                        .unwrap_or("disconnected")
                }),
            );
            row.insert(
                "direction".into(),
                json!(if s.dialed.load(Ordering::Relaxed) {
                    "dialed"
                } else {
                    "accepted"
                }),
            );
            row.insert("connected_at".into(), json!(*s.connected_at.lock()));
            row.insert("sent_through".into(), json!(s.sent.load(Ordering::Relaxed)));
            row.insert("acked_through".into(), json!(acked));
            row.insert(
                "received_through".into(),
                json!(s.received_through.load(Ordering::Relaxed)),
            );
            row.insert("lag_changes".into(), json!(head.saturating_sub(acked)));
            row.insert("lag_ms".into(), json!(s.lag_ms.load(Ordering::Relaxed)));
            row.insert("ops_out".into(), json!(ops_out));
            row.insert("ops_in".into(), json!(s.ops_in.load(Ordering::Relaxed)));
            row.insert("ops_per_s_out".into(), json!(rate_out.round()));
            row.insert("ops_per_s_in".into(), json!(rate_in.round()));
            row.insert(
                "bytes_out".into(),
                json!(s.bytes_out.load(Ordering::Relaxed)),
            );
            row.insert("bytes_in".into(), json!(s.bytes_in.load(Ordering::Relaxed)));
            row.insert(
                "repairs_sent".into(),
                json!(s.repairs_sent.load(Ordering::Relaxed)),
            );
            row.insert("repaired".into(), json!(s.repaired.load(Ordering::Relaxed)));
            row.insert(
                "alerts_out".into(),
                json!(s.alerts_out.load(Ordering::Relaxed)),
            );
            row.insert(
                "alerts_in".into(),
                json!(s.alerts_in.load(Ordering::Relaxed)),
            );
            row.insert(
                "coalescing_ratio".into(),
                json!(if ops_out == 0 {
                    1.0
                } else {
                    covered as f64 / ops_out as f64
                }),
            );
            let err = s.last_error.lock().clone();
            if err.is_some() || !row.contains_key("last_error") {
                row.insert("last_error".into(), json!(err));
            }
        }
        json!({
            "node_id": self.0.node_id,
            "head": head,
            "items": rows.into_values().map(Value::Object).collect::<Vec<_>>(),
        })
    }
}

/// Why a peer change was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(crate::store::StoreError),
}

fn log_end(ctx: &SyncCtx, peer: &str, end: &link::End) {
    match end {
        link::End::Cancelled => tracing::info!(peer, "sync link stopped"),
        e => {
            ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer, reason = %e, "sync link ended");
        }
    }
}

/// Dial a configured peer, link, and dial again when the link ends (with backoff).
async fn dial_loop(ctx: &Arc<SyncCtx>, d: &Dialer) {
    let mut backoff = RETRY_AFTER;
    loop {
        let known = d.node_id.lock().clone();
        if known.as_deref().is_some_and(|n| ctx.linked(n)) {
            // Linked already (it dialed us): nothing to do while that link lasts.
            *d.state.lock() = "linked by the peer";
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        *d.state.lock() = "connecting";
        let started = Instant::now();
        let outcome = match connect(&d.config).await {
            Ok((tx, rx)) => {
                let (_, end) = link::run(Arc::clone(ctx), tx, rx, true, known, |p| {
                    let mut n = d.node_id.lock();
                    if n.is_none() {
                        tracing::info!(url = %d.config.url, peer = %p, "peer identified");
                    }
                    *n = Some(p.to_owned());
                })
                .await;
                log_end(
                    ctx,
                    d.node_id.lock().as_deref().unwrap_or(&d.config.url),
                    &end,
                );
                match end {
                    link::End::Cancelled => None,
                    e => Some(e.to_string()),
                }
            }
            Err(e) => {
                ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(url = %d.config.url, error = %format!("{e:#}"), retry_in = ?backoff, "cannot reach a peer");
                Some(format!("{e:#}"))
            }
        };
        if started.elapsed() > Duration::from_secs(10) {
            backoff = RETRY_AFTER;
        }
        *d.last_error.lock() = outcome.clone();
        if outcome.is_none() {
            // Replaced by a link the peer dialed, or stopped: look again soon.
            tokio::time::sleep(RETRY_AFTER).await;
            continue;
        }
        *d.state.lock() = "retrying";
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

type DialedTx = std::pin::Pin<Box<dyn futures::Sink<link::Out, Error = anyhow::Error> + Send>>;
type DialedRx = std::pin::Pin<Box<dyn futures::Stream<Item = anyhow::Result<Frame>> + Send>>;

/// Open the WebSocket of a link to `config`'s node.
async fn connect(config: &PeerConfig) -> anyhow::Result<(DialedTx, DialedRx)> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
    use tokio_tungstenite::tungstenite::{Error as WsError, Message};
    let url = config.ws_url().map_err(anyhow::Error::msg)?;
    let mut req = url.as_str().into_client_request()?;
    if let Some(t) = &config.token {
        req.headers_mut().insert(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {t}").parse()?,
        );
    }
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(protocol::MAX_MESSAGE_BYTES))
        .max_frame_size(Some(protocol::MAX_MESSAGE_BYTES));
    let connecting = tokio_tungstenite::connect_async_with_config(req, Some(ws_config), true);
    let (ws, _) = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => anyhow::bail!("{url}: no answer within {CONNECT_TIMEOUT:?}"),
        Ok(Err(WsError::Http(resp))) => {
            let body = resp
                .body()
                .as_deref()
                .map(|b| {
                    String::from_utf8_lossy(b)
                        .chars()
                        .take(300)
                        .collect::<String>()
                })
                .unwrap_or_default();
            anyhow::bail!("{url}: refused: {} {body}", resp.status());
        }
        Ok(Err(e)) => anyhow::bail!("{url}: {e}"),
        Ok(Ok(ws)) => ws,
    };
    let (tx, rx) = ws.split();
    let tx = tx
        .sink_map_err(anyhow::Error::from)
        .with(|o: link::Out| async move {
            Ok::<_, anyhow::Error>(match o {
                link::Out::Text(t) => Message::Text(t.into()),
                link::Out::Binary(b) => Message::Binary(b.into()),
                link::Out::Ping => Message::Ping(Default::default()),
                link::Out::Close(c) => Message::Close(Some(CloseFrame {
                    code: CloseCode::from(c.code),
                    reason: c.reason.into(),
                })),
            })
        });
    let rx = rx.map(|m| {
        Ok(match m? {
            Message::Text(t) => Frame::Text(t.to_string()),
            Message::Binary(b) => Frame::Binary(b),
            Message::Close(c) => {
                Frame::Close(c.map(|c| Close::new(u16::from(c.code), c.reason.as_str())))
            }
            _ => Frame::Other,
        })
    });
    Ok((Box::pin(tx), Box::pin(rx)))
}
