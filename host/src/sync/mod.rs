//! Sync between nodes — this release: catch-up by pulling each peer's change feed.
//!
//! Owns: for every `serve --peer URL`, one task that pages `GET {URL}/v1/changes?after=N`
//! (with a token of the `peer` role on that node), merges each page with
//! [`Registry::apply_remote`] (per-property last writer wins, deletes by tombstone, version
//! vectors merged), and only then stores `N` — the peer's change number merged through — as
//! configuration, so a restart resumes there. A page merged twice (a crash between the two
//! writes) changes nothing the second time. Two nodes that pull from each other converge and
//! stop: a merge that changes nothing is not numbered, so nothing echoes back.
//! Exposes: [`Peer`], [`spawn_pull`], [`SyncStats`].
//! Must never: change twins except through `apply_remote`, or hold more than one page per
//! peer in memory (a peer away for a week is caught up page by page from its durable feed).
//!
//! Not yet (issue 12): the WebSocket transport with live push, coalescing, anti-entropy and
//! the conflict strategies other than last writer wins.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use crate::registry::{Registry, RemoteChange};
use crate::store::{KvOp, Store};

/// Changes asked for per page.
pub const PAGE: usize = 1000;
/// How long a caught-up puller waits before asking again (the replication delay on a quiet
/// link is at most this plus a round trip).
pub const POLL_EVERY: Duration = Duration::from_millis(50);
/// First wait after a failed pull; doubles up to [`MAX_BACKOFF`].
pub const RETRY_AFTER: Duration = Duration::from_millis(500);
/// Longest wait between attempts at a peer that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// One request's deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A node this one pulls from.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Base URL, e.g. `http://10.0.0.2:7878`.
    pub url: String,
    /// A token of the `peer` role (or admin) on that node.
    pub token: Option<String>,
}

/// Counters of every puller of a node, for `/v1/metrics`.
#[derive(Debug, Default)]
pub struct SyncStats {
    /// Changes received from peers.
    pub received: AtomicU64,
    /// Of those, the ones that changed something here.
    pub applied: AtomicU64,
    /// Pull requests that failed (network, status, body).
    pub errors: AtomicU64,
}

/// One page of a peer's feed, as `GET /v1/changes` answers.
#[derive(Deserialize)]
struct FeedPage {
    items: Vec<RemoteChange>,
    next: u64,
}

/// The key under which the change number merged through from `url` is kept.
fn cursor_key(url: &str) -> Vec<u8> {
    let mut k = crate::store::keys::META_PEER_CURSOR.to_vec();
    k.extend_from_slice(url.as_bytes());
    k
}

/// Start pulling from `peer` until `stopping` turns true.
pub fn spawn_pull(
    registry: Registry,
    store: Store,
    peer: Peer,
    stats: Arc<SyncStats>,
    mut stopping: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let puller = Puller {
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .expect("an HTTP client"),
            registry,
            store,
            peer,
            stats,
        };
        tokio::select! {
            () = puller.run() => {}
            _ = stopping.wait_for(|s| *s) => {}
        }
    })
}

struct Puller {
    http: reqwest::Client,
    registry: Registry,
    store: Store,
    peer: Peer,
    stats: Arc<SyncStats>,
}

impl Puller {
    async fn run(&self) {
        let key = cursor_key(&self.peer.url);
        let mut after = self.store.get_u64(&key).unwrap_or(0);
        tracing::info!(peer = %self.peer.url, after, "pulling changes from a peer");
        let mut backoff = RETRY_AFTER;
        loop {
            match self.pull_once(after, &key).await {
                Ok((next, full)) => {
                    backoff = RETRY_AFTER;
                    after = next;
                    if !full {
                        tokio::time::sleep(POLL_EVERY).await;
                    }
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %self.peer.url, error = %e, retry_in = ?backoff, "pulling from a peer failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Fetch and merge one page after `after`; store the new position. Returns it, and
    /// whether the page was full (more may be waiting).
    async fn pull_once(&self, after: u64, key: &[u8]) -> anyhow::Result<(u64, bool)> {
        let url = format!(
            "{}/v1/changes?after={after}&limit={PAGE}",
            self.peer.url.trim_end_matches('/')
        );
        let mut req = self.http.get(&url);
        if let Some(t) = &self.peer.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            anyhow::bail!(
                "{url}: {status}: {}",
                body.chars().take(300).collect::<String>()
            );
        }
        let page: FeedPage = resp.json().await?;
        let n = page.items.len();
        if n > 0 {
            let outcome = self.registry.apply_remote(page.items).await?;
            self.stats.received.fetch_add(n as u64, Ordering::Relaxed);
            self.stats
                .applied
                .fetch_add(outcome.applied as u64, Ordering::Relaxed);
            tracing::debug!(peer = %self.peer.url, received = n, applied = outcome.applied,
                refused = outcome.refused, next = page.next, "merged a page from a peer");
        }
        if page.next != after {
            // Only once the page is merged and durable: a crash in between merges it again,
            // which changes nothing.
            self.store
                .write(vec![KvOp::Put(
                    key.to_vec(),
                    page.next.to_be_bytes().to_vec(),
                )])
                .await?;
        }
        Ok((page.next, n == PAGE))
    }
}
