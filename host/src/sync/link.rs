//! One live link with another node, whichever side dialed: the handshake, then two loops —
//! one sends this node's change feed from where the peer subscribed (coalesced per flush
//! window, a bounded number of batches unacknowledged), one merges the peer's batches and
//! acknowledges them.
//!
//! Coalescing comes from the feed itself: it holds one entry per twin, its state now with
//! every property's clock, so the updates a twin had during a flush window travel as one
//! entry carrying all of them, and none is lost. A slow peer only slows its own link: the
//! sender reads the durable feed, never a queue the local writer fills, so a peer that falls
//! behind is simply further back in the feed (catch-up), and nothing per peer grows.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, SinkExt, Stream, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::protocol::{self, ChangesOut, Close, Frame, Msg, PROTOCOL_VERSION};
use super::{LinkStats, SyncCtx};
use crate::registry::FeedItem;
use crate::store::KvOp;

/// Feed entries per batch at most.
pub const BATCH: usize = 2000;
/// Batches sent and not yet acknowledged at most; then the sender waits (its peer is slow).
pub const MAX_IN_FLIGHT: usize = 8;
/// The hello must arrive within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A ping goes out this often; a link that hears nothing for [`IDLE_TIMEOUT`] is dead.
const PING_EVERY: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(35);

/// What the link's writer sends.
#[derive(Debug)]
pub enum Out {
    Text(String),
    Ping,
    Close(Close),
}

/// How a link ended.
#[derive(Debug)]
pub enum End {
    /// Refused or closed by this side with a reason (sent to the peer).
    Closed(Close),
    /// Closed by the peer.
    ByPeer(Option<Close>),
    /// The node is stopping or the link was replaced or removed.
    Cancelled,
    /// Network, store or protocol failure.
    Failed(anyhow::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed(c) => write!(f, "{c}"),
            End::ByPeer(Some(c)) => write!(f, "the peer {c}"),
            End::ByPeer(None) => write!(f, "the peer closed the link"),
            End::Cancelled => write!(f, "stopped"),
            End::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

/// Run a link over a WebSocket (its two halves in this module's terms) until it ends.
/// `dialed`: this node opened it. `expect`: the node id the dialer was told to find there.
/// `identified` is told the peer's node id once the handshake passes.
pub async fn run<Tx, Rx>(
    ctx: Arc<SyncCtx>,
    tx: Tx,
    mut rx: Rx,
    dialed: bool,
    expect: Option<String>,
    identified: impl FnOnce(&str),
) -> (Option<String>, End)
where
    Tx: Sink<Out, Error = anyhow::Error> + Send + Unpin + 'static,
    Rx: Stream<Item = anyhow::Result<Frame>> + Send + Unpin,
{
    let (out, out_rx) = mpsc::channel::<Out>(4);
    let writer = tokio::spawn(write_loop(tx, out_rx));
    let hello = Msg::Hello {
        protocol: PROTOCOL_VERSION,
        node_id: ctx.node_id.clone(),
    };
    let _ = out
        .send(Out::Text(serde_json::to_string(&hello).expect("a hello")))
        .await;
    let (peer, end) = match handshake(&ctx, &mut rx, expect.as_deref()).await {
        Err(end) => (None, end),
        Ok(peer) => {
            identified(&peer);
            let end = match ctx.admit(&peer, dialed) {
                Err(close) => End::Closed(close),
                Ok(admitted) => {
                    let stats = Arc::clone(&admitted.stats);
                    tracing::info!(peer = %peer, dialed, "sync link up");
                    let end = tokio::select! {
                        end = serve(&ctx, &peer, &stats, &out, &mut rx) => end,
                        () = admitted.cancel.cancelled() => End::Cancelled,
                    };
                    *stats.last_error.lock() = match &end {
                        End::Cancelled => None,
                        e => Some(e.to_string()),
                    };
                    end
                }
            };
            (Some(peer), end)
        }
    };
    let close = match &end {
        End::Closed(c) => Some(c.clone()),
        End::Cancelled => Some(Close::new(Close::GOING_AWAY, "the link was stopped")),
        End::Failed(e) => Some(Close::new(Close::PROTOCOL, format!("{e:#}"))),
        End::ByPeer(_) => None,
    };
    if let Some(c) = close {
        let _ = out.send(Out::Close(c)).await;
    }
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    (peer, end)
}

/// Read and check the peer's hello.
async fn handshake<Rx>(ctx: &SyncCtx, rx: &mut Rx, expect: Option<&str>) -> Result<String, End>
where
    Rx: Stream<Item = anyhow::Result<Frame>> + Unpin,
{
    let msg = match tokio::time::timeout(HANDSHAKE_TIMEOUT, next_msg(rx, None)).await {
        Err(_) => {
            return Err(End::Closed(Close::new(
                Close::PROTOCOL,
                "no hello within 10 s",
            )))
        }
        Ok(r) => r?,
    };
    let peer = protocol::check_hello(msg, &ctx.node_id).map_err(End::Closed)?;
    if let Some(e) = expect.filter(|e| *e != peer) {
        return Err(End::Closed(Close::new(
            Close::PROTOCOL,
            format!("expected node {e:?} at this address, found {peer:?}"),
        )));
    }
    Ok(peer)
}

/// The next protocol message (its bytes counted in `stats` when given); a close or a broken
/// socket ends the link.
async fn next_msg<Rx>(rx: &mut Rx, stats: Option<&LinkStats>) -> Result<Msg, End>
where
    Rx: Stream<Item = anyhow::Result<Frame>> + Unpin,
{
    loop {
        match rx.next().await {
            None => return Err(End::ByPeer(None)),
            Some(Err(e)) => return Err(End::Failed(e)),
            Some(Ok(Frame::Close(c))) => return Err(End::ByPeer(c)),
            Some(Ok(Frame::Other)) => continue,
            Some(Ok(Frame::Text(t))) => {
                if let Some(s) = stats {
                    s.bytes_in.fetch_add(t.len() as u64, Ordering::Relaxed);
                }
                return serde_json::from_str(&t).map_err(|e| {
                    End::Closed(Close::new(
                        Close::PROTOCOL,
                        format!("not a sync message: {e}"),
                    ))
                });
            }
        }
    }
}

/// The admitted link: subscribe, then send and receive until something ends it.
async fn serve<Rx>(
    ctx: &SyncCtx,
    peer: &str,
    stats: &LinkStats,
    out: &mpsc::Sender<Out>,
    rx: &mut Rx,
) -> End
where
    Rx: Stream<Item = anyhow::Result<Frame>> + Unpin,
{
    let merged = ctx.cursor(peer);
    stats.received_through.store(merged, Ordering::Relaxed);
    tracing::info!(peer, after = merged, "asking a peer for its changes");
    let sub = Msg::Subscribe { after: merged };
    if out
        .send(Out::Text(serde_json::to_string(&sub).expect("json")))
        .await
        .is_err()
    {
        return End::ByPeer(None);
    }
    let (subscribed, sub_rx) = watch::channel(None::<u64>);
    let (acked, acked_rx) = watch::channel(0u64);
    tokio::select! {
        end = receive(ctx, peer, stats, out, rx, &subscribed, &acked) => end,
        end = send(ctx, peer, stats, out, sub_rx, acked_rx) => end,
        () = ping(out) => End::ByPeer(None),
        () = send_digests(ctx, out) => End::ByPeer(None),
    }
}

/// Anti-entropy: send a digest of this node's state every period (the first one a period
/// after the link comes up, when the feed has caught the peer up).
async fn send_digests(ctx: &SyncCtx, out: &mpsc::Sender<Out>) {
    loop {
        tokio::time::sleep(ctx.anti_entropy_every()).await;
        let registry = ctx.registry.clone();
        let Ok(buckets) = tokio::task::spawn_blocking(move || registry.digest()).await else {
            return;
        };
        let msg = Msg::Digest { buckets };
        if out
            .send(Out::Text(serde_json::to_string(&msg).expect("json")))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Answer a peer's digest: send the entries of every bucket where this node's differs.
async fn repair(
    ctx: &SyncCtx,
    stats: &LinkStats,
    out: &mpsc::Sender<Out>,
    theirs: Vec<u64>,
) -> Result<(), End> {
    if theirs.len() != crate::registry::digest::BUCKETS {
        return Err(End::Closed(Close::new(
            Close::PROTOCOL,
            format!(
                "a digest has {} buckets, not {}",
                theirs.len(),
                crate::registry::digest::BUCKETS
            ),
        )));
    }
    let registry = ctx.registry.clone();
    let buckets = tokio::task::spawn_blocking(move || registry.differing_buckets(&theirs))
        .await
        .map_err(|e| End::Failed(e.into()))?;
    let total: usize = buckets.iter().map(Vec::len).sum();
    if total == 0 {
        return Ok(());
    }
    tracing::info!(
        entries = total,
        buckets = buckets.iter().filter(|b| !b.is_empty()).count(),
        "anti-entropy: digests differ; sending the entries of the buckets that differ"
    );
    stats
        .repairs_sent
        .fetch_add(total as u64, Ordering::Relaxed);
    // One bucket's entries encoded at a time: memory stays at a bucket's worth.
    for bucket in buckets.iter().filter(|b| !b.is_empty()) {
        for page in bucket.chunks(BATCH) {
            let items: Vec<Value> = page.iter().map(FeedItem::to_json).collect();
            let text = serde_json::to_string(&protocol::RepairOut { items: &items }).expect("json");
            stats
                .bytes_out
                .fetch_add(text.len() as u64, Ordering::Relaxed);
            if out.send(Out::Text(text)).await.is_err() {
                return Err(End::ByPeer(None));
            }
        }
    }
    Ok(())
}

async fn ping(out: &mpsc::Sender<Out>) {
    let mut every = tokio::time::interval(PING_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        if out.send(Out::Ping).await.is_err() {
            return;
        }
    }
}

/// Merge what the peer sends; acknowledge it once durable.
async fn receive<Rx>(
    ctx: &SyncCtx,
    peer: &str,
    stats: &LinkStats,
    out: &mpsc::Sender<Out>,
    rx: &mut Rx,
    subscribed: &watch::Sender<Option<u64>>,
    acked: &watch::Sender<u64>,
) -> End
where
    Rx: Stream<Item = anyhow::Result<Frame>> + Unpin,
{
    loop {
        let msg = match tokio::time::timeout(IDLE_TIMEOUT, next_msg(rx, Some(stats))).await {
            Err(_) => {
                return End::Failed(anyhow::anyhow!(
                    "nothing heard from the peer for {IDLE_TIMEOUT:?}"
                ))
            }
            Ok(Err(end)) => return end,
            Ok(Ok(m)) => m,
        };
        match msg {
            Msg::Subscribe { after } => {
                subscribed.send_replace(Some(after));
            }
            Msg::Ack { through } => {
                stats.acked.fetch_max(through, Ordering::Relaxed);
                acked.send_if_modified(|a| {
                    let moved = through > *a;
                    *a = (*a).max(through);
                    moved
                });
            }
            Msg::Changes { items, next } => {
                if let Err(e) = merge(ctx, peer, stats, items, next).await {
                    return End::Failed(e);
                }
                let ack = Msg::Ack { through: next };
                if out
                    .send(Out::Text(serde_json::to_string(&ack).expect("json")))
                    .await
                    .is_err()
                {
                    return End::ByPeer(None);
                }
            }
            Msg::Models { items } => match ctx.registry.apply_remote_models(items).await {
                Ok(n) if n > 0 => tracing::info!(peer, models = n, "merged models from the peer"),
                Ok(_) => {}
                Err(e) => return End::Failed(e.into()),
            },
            Msg::Digest { buckets } => {
                if let Err(end) = repair(ctx, stats, out, buckets).await {
                    return end;
                }
            }
            Msg::Repair { items } => {
                let n = items.len() as u64;
                match ctx
                    .registry
                    .apply_remote_resolving(items, Vec::new(), &*ctx.resolver)
                    .await
                {
                    Ok(o) => {
                        stats
                            .repaired
                            .fetch_add(o.applied as u64, Ordering::Relaxed);
                        ctx.stats
                            .repaired
                            .fetch_add(o.applied as u64, Ordering::Relaxed);
                        metrics::counter!("twinhost_sync_repairs_total")
                            .increment(o.applied as u64);
                        if o.applied > 0 {
                            tracing::warn!(
                                peer,
                                received = n,
                                repaired = o.applied,
                                "anti-entropy repaired entries the change feed had not delivered"
                            );
                        }
                    }
                    Err(e) => return End::Failed(e.into()),
                }
            }
            other @ Msg::Hello { .. } => {
                return End::Closed(Close::new(
                    Close::PROTOCOL,
                    format!("unexpected {} after the handshake", protocol::kind(&other)),
                ))
            }
        }
    }
}

/// Merge one batch and store how far the peer's feed is merged, in one commit.
async fn merge(
    ctx: &SyncCtx,
    peer: &str,
    stats: &LinkStats,
    items: Vec<crate::registry::RemoteChange>,
    next: u64,
) -> anyhow::Result<()> {
    let n = items.len() as u64;
    let newest = items.iter().map(|c| c.hlc).max();
    let cursor = KvOp::Put(super::cursor_key(peer), next.to_be_bytes().to_vec());
    let outcome = ctx
        .registry
        .apply_remote_resolving(items, vec![cursor], &*ctx.resolver)
        .await?;
    stats.received_through.store(next, Ordering::Relaxed);
    stats.ops_in.fetch_add(n, Ordering::Relaxed);
    ctx.stats.received.fetch_add(n, Ordering::Relaxed);
    ctx.stats
        .applied
        .fetch_add(outcome.applied as u64, Ordering::Relaxed);
    if let Some(hlc) = newest.filter(|_| outcome.applied > 0) {
        // From the write there to durable here (the nodes' clocks are assumed close, as the
        // HLC assumes them).
        let made_ms = hlc >> crate::types::HLC_COUNTER_BITS;
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let lag = now_ms.saturating_sub(made_ms);
        stats.lag_ms.store(lag, Ordering::Relaxed);
        metrics::histogram!("twinhost_sync_latency_seconds").record(lag as f64 / 1000.0);
    }
    metrics::counter!("twinhost_sync_ops_total", "direction" => "in").increment(n);
    if outcome.refused > 0 {
        tracing::warn!(
            peer,
            refused = outcome.refused,
            "refused changes from a peer"
        );
    }
    Ok(())
}

/// Send this node's feed from where the peer subscribed, a flush window at a time.
async fn send(
    ctx: &SyncCtx,
    peer: &str,
    stats: &LinkStats,
    out: &mpsc::Sender<Out>,
    mut subscribed: watch::Receiver<Option<u64>>,
    mut acked: watch::Receiver<u64>,
) -> End {
    let mut pos = match subscribed.wait_for(Option::is_some).await {
        Ok(after) => (*after).expect("subscribed"),
        Err(_) => return End::ByPeer(None),
    };
    pos = start_at(ctx, peer, pos);
    let mut durable = ctx.registry.watch_durable();
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let mut models = ctx.registry.watch_models();
    let mut models_sent = None;
    loop {
        if subscribed.has_changed().unwrap_or(false) {
            // The peer asked again (e.g. to repair): start over from there.
            pos = subscribed.borrow_and_update().unwrap_or(pos);
            pos = start_at(ctx, peer, pos);
            in_flight.clear();
        }
        // A bounded number of batches in flight: a slow peer waits here, in the feed.
        loop {
            let a = *acked.borrow_and_update();
            while in_flight.front().is_some_and(|&n| n <= a) {
                in_flight.pop_front();
            }
            if in_flight.len() < MAX_IN_FLIGHT {
                break;
            }
            if acked.changed().await.is_err() {
                return End::ByPeer(None);
            }
        }
        durable.borrow_and_update();
        let version = *models.borrow_and_update();
        if models_sent != Some(version) {
            let msg = Msg::Models {
                items: ctx.registry.models_state(),
            };
            let text = serde_json::to_string(&msg).expect("json");
            stats
                .bytes_out
                .fetch_add(text.len() as u64, Ordering::Relaxed);
            if out.send(Out::Text(text)).await.is_err() {
                return End::ByPeer(None);
            }
            models_sent = Some(version);
        }
        let page = ctx.registry.changes(pos, BATCH);
        let full = page.items.len() == BATCH;
        if page.next != pos {
            let items: Vec<Value> = page
                .items
                .iter()
                .filter(|i| !made_by(i, peer))
                .map(FeedItem::to_json)
                .collect();
            let text = serde_json::to_string(&ChangesOut {
                items: &items,
                next: page.next,
            })
            .expect("json");
            stats
                .bytes_out
                .fetch_add(text.len() as u64, Ordering::Relaxed);
            stats
                .ops_out
                .fetch_add(items.len() as u64, Ordering::Relaxed);
            stats.covered.fetch_add(page.next - pos, Ordering::Relaxed);
            metrics::counter!("twinhost_sync_ops_total", "direction" => "out")
                .increment(items.len() as u64);
            if out.send(Out::Text(text)).await.is_err() {
                return End::ByPeer(None);
            }
            pos = page.next;
            stats.sent.store(pos, Ordering::Relaxed);
            in_flight.push_back(pos);
        }
        if !full {
            // Caught up: wait for the next durable change, then a flush window, so the
            // writes of that window go as one batch.
            tokio::select! {
                r = durable.changed() => if r.is_err() { return End::Cancelled },
                r = models.changed() => if r.is_err() { return End::Cancelled },
                r = subscribed.changed() => if r.is_err() { return End::ByPeer(None) },
            }
            tokio::time::sleep(ctx.flush()).await;
        }
    }
}

/// Where to send from when `peer` asks for changes after `after`. A position past this
/// node's feed means the feed was lost or restored from an older backup (its numbers now
/// name other changes): then the whole feed is sent.
fn start_at(ctx: &SyncCtx, peer: &str, after: u64) -> u64 {
    let head = *ctx.registry.watch_durable().borrow();
    if after <= head {
        return after;
    }
    tracing::warn!(peer, after, head, "the peer asks for changes after a position past this node's feed (restored from an older backup?): sending the whole feed");
    0
}

/// Whether everything in a feed entry came from `peer` (it has it, or something newer).
fn made_by(item: &FeedItem, peer: &str) -> bool {
    match item {
        FeedItem::Twin(t, rels) => {
            t.vclock.keys().all(|n| n == peer)
                && t.clocks.values().all(|c| &*c.origin == peer)
                && rels.iter().all(|r| &*r.origin == peer)
        }
        FeedItem::Tombstone(d) => d.vclock.keys().all(|n| n == peer),
    }
}

/// Send what the link hands over until the channel closes (after a close frame).
async fn write_loop<Tx>(mut tx: Tx, mut rx: mpsc::Receiver<Out>)
where
    Tx: Sink<Out, Error = anyhow::Error> + Unpin,
{
    while let Some(m) = rx.recv().await {
        let closing = matches!(m, Out::Close(_));
        if tx.send(m).await.is_err() || closing {
            break;
        }
    }
    let _ = tx.close().await;
}
