//! One live link with another node, whichever side dialed: the handshake, then two loops —
//! one sends this node's change feed from where the peer subscribed (coalesced per flush
//! window, a bounded number of batches unacknowledged), one merges the peer's batches. The
//! merging loop only reads: acks and anti-entropy repairs go out from loops of their own
//! (see `receive` for why).
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
use tokio::sync::{mpsc, watch};

use super::protocol::{self, Close, Frame, Msg, PROTOCOL_VERSION};
use super::{LinkStats, SyncCtx, SyncStats};
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
    Binary(Vec<u8>),
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
    let msg = match tokio::time::timeout(HANDSHAKE_TIMEOUT, next_msg(rx, None, None)).await {
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

/// The next protocol message (its bytes counted in `stats` and the node's counters when
/// given); a close or a broken socket ends the link. Binary frames (changes, repairs) need
/// `decoder`: before the handshake there is none, and one is refused.
async fn next_msg<Rx>(
    rx: &mut Rx,
    stats: Option<(&LinkStats, &SyncStats)>,
    decoder: Option<&mut protocol::Decoder>,
) -> Result<Msg, End>
where
    Rx: Stream<Item = anyhow::Result<Frame>> + Unpin,
{
    let count = |n: usize| {
        if let Some((link, node)) = stats {
            link.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            node.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            metrics::counter!("twinhost_sync_bytes_total", "direction" => "in").increment(n as u64);
        }
    };
    let mut decoder = decoder;
    loop {
        match rx.next().await {
            None => return Err(End::ByPeer(None)),
            Some(Err(e)) => return Err(End::Failed(e)),
            Some(Ok(Frame::Close(c))) => return Err(End::ByPeer(c)),
            Some(Ok(Frame::Other)) => continue,
            Some(Ok(Frame::Text(t))) => {
                count(t.len());
                let msg: Msg = serde_json::from_str(&t).map_err(|e| {
                    End::Closed(Close::new(
                        Close::PROTOCOL,
                        format!("not a sync message: {e}"),
                    ))
                })?;
                if matches!(msg, Msg::Changes { .. } | Msg::Repair { .. }) {
                    return Err(End::Closed(Close::new(
                        Close::PROTOCOL,
                        format!(
                            "a {} message in a text frame: protocol {PROTOCOL_VERSION} sends them as binary frames",
                            protocol::kind(&msg)
                        ),
                    )));
                }
                return Ok(msg);
            }
            Some(Ok(Frame::Binary(b))) => {
                count(b.len());
                return match decoder.as_deref_mut() {
                    Some(d) => d.decode(&b).map_err(End::Closed),
                    None => Err(End::Closed(Close::new(
                        Close::PROTOCOL,
                        "a binary message before the handshake",
                    ))),
                };
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
    // Alerts only when this node keeps an event log to log them in.
    let alerts_after = ctx.events.get().map(|_| {
        ctx.store
            .get_u64(&super::alerts::cursor_key(peer))
            .unwrap_or(0)
    });
    let subscribe = Msg::Subscribe {
        after: merged,
        alerts_after,
    };
    if let Err(end) = send_counted(ctx, stats, out, text(&subscribe)).await {
        return end;
    }
    // What the receiving loop hands over: it never waits on the socket's outgoing side (see
    // `receive`), so each of these keeps only the latest value.
    let (subscribed, sub_rx) = watch::channel(None::<u64>);
    let (alerts_subscribed, alerts_sub_rx) = watch::channel(None::<u64>);
    let (acked, acked_rx) = watch::channel(0u64);
    let (to_ack, to_ack_rx) = watch::channel(0u64);
    let (digests, digests_rx) = watch::channel(None::<Vec<u64>>);
    let inbound = Inbound {
        subscribed: &subscribed,
        alerts_subscribed: &alerts_subscribed,
        acked: &acked,
        merged: &to_ack,
        digests: &digests,
    };
    tokio::select! {
        end = receive(ctx, peer, stats, rx, inbound) => end,
        end = send(ctx, peer, stats, out, sub_rx, acked_rx) => end,
        end = super::alerts::send(ctx, peer, stats, out, alerts_sub_rx) => end,
        end = send_acks(ctx, stats, out, to_ack_rx) => end,
        end = answer_digests(ctx, stats, out, digests_rx) => end,
        () = ping(out) => End::ByPeer(None),
        end = send_digests(ctx, stats, out) => end,
    }
}

/// Where the receiving loop puts what the rest of the link acts on.
#[derive(Clone, Copy)]
struct Inbound<'a> {
    /// The peer's subscription (where to send this node's feed from).
    subscribed: &'a watch::Sender<Option<u64>>,
    /// Where to forward this node's alerts from (none: the peer wants none).
    alerts_subscribed: &'a watch::Sender<Option<u64>>,
    /// How far the peer has acknowledged this node's feed.
    acked: &'a watch::Sender<u64>,
    /// How far this node has merged the peer's feed (to acknowledge).
    merged: &'a watch::Sender<u64>,
    /// The peer's latest digest (to answer with repairs).
    digests: &'a watch::Sender<Option<Vec<u64>>>,
}

/// Acknowledge the peer's batches as they are merged. Acks are cumulative: when several
/// merges finish while one ack waits for the socket, the next ack covers them all.
async fn send_acks(
    ctx: &SyncCtx,
    stats: &LinkStats,
    out: &mpsc::Sender<Out>,
    mut merged: watch::Receiver<u64>,
) -> End {
    loop {
        if merged.changed().await.is_err() {
            return End::ByPeer(None);
        }
        let through = *merged.borrow_and_update();
        if let Err(end) = send_counted(ctx, stats, out, text(&Msg::Ack { through })).await {
            return end;
        }
    }
}

/// Answer the peer's digests with repairs, the latest digest first (one that arrives while
/// a repair is being sent replaces any older one still waiting).
async fn answer_digests(
    ctx: &SyncCtx,
    stats: &LinkStats,
    out: &mpsc::Sender<Out>,
    mut digests: watch::Receiver<Option<Vec<u64>>>,
) -> End {
    loop {
        if digests.changed().await.is_err() {
            return End::ByPeer(None);
        }
        let Some(theirs) = digests.borrow_and_update().clone() else {
            continue;
        };
        if let Err(end) = repair(ctx, stats, out, theirs).await {
            return end;
        }
    }
}

/// A message of the protocol as a text frame.
pub(super) fn text(msg: &Msg) -> Out {
    Out::Text(serde_json::to_string(msg).expect("a sync message serializes"))
}

/// Hand a message of the admitted link to its writer, its bytes counted (for the link, the
/// node, and `/metrics`).
pub(super) async fn send_counted(
    ctx: &SyncCtx,
    stats: &LinkStats,
    out: &mpsc::Sender<Out>,
    msg: Out,
) -> Result<(), End> {
    let n = match &msg {
        Out::Text(t) => t.len(),
        Out::Binary(b) => b.len(),
        Out::Ping | Out::Close(_) => 0,
    } as u64;
    stats.bytes_out.fetch_add(n, Ordering::Relaxed);
    ctx.stats.bytes_out.fetch_add(n, Ordering::Relaxed);
    metrics::counter!("twinhost_sync_bytes_total", "direction" => "out").increment(n);
    out.send(msg).await.map_err(|_| End::ByPeer(None))
}

/// Anti-entropy: send a digest of this node's state every period (the first one a period
/// after the link comes up, when the feed has caught the peer up).
async fn send_digests(ctx: &SyncCtx, stats: &LinkStats, out: &mpsc::Sender<Out>) -> End {
    loop {
        tokio::time::sleep(ctx.anti_entropy_every()).await;
        let registry = ctx.registry.clone();
        let buckets = match tokio::task::spawn_blocking(move || registry.digest()).await {
            Ok(b) => b,
            Err(e) => return End::Failed(anyhow::anyhow!("computing a digest: {e}")),
        };
        if let Err(end) = send_counted(ctx, stats, out, text(&Msg::Digest { buckets })).await {
            return end;
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
    let mut encoder = protocol::Encoder::new().map_err(End::Failed)?;
    // One page of a bucket encoded at a time: memory stays at a page's worth.
    for bucket in buckets.iter().filter(|b| !b.is_empty()) {
        for page in bucket.chunks(BATCH) {
            let frame = encoder.repair(page).map_err(End::Failed)?;
            send_counted(ctx, stats, out, Out::Binary(frame)).await?;
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

/// Merge what the peer sends, and hand over what the other loops act on (acks to send,
/// acks received, digests to answer).
///
/// This loop never waits to send: the peer's receiving loop may be waiting for this node to
/// read its socket (its outgoing buffers full of this node's acks or changes) while this
/// node's outgoing queue is full of batches the peer has not read — if this loop waited
/// there too, neither side would read again (it happened: both directions busy, a link
/// stalled for good with megabytes in both sockets' queues).
async fn receive<Rx>(
    ctx: &SyncCtx,
    peer: &str,
    stats: &LinkStats,
    rx: &mut Rx,
    inbound: Inbound<'_>,
) -> End
where
    Rx: Stream<Item = anyhow::Result<Frame>> + Unpin,
{
    let mut decoder = match protocol::Decoder::new() {
        Ok(d) => d,
        Err(e) => return End::Failed(e),
    };
    loop {
        let next = next_msg(rx, Some((stats, &ctx.stats)), Some(&mut decoder));
        let msg = match tokio::time::timeout(IDLE_TIMEOUT, next).await {
            Err(_) => {
                return End::Failed(anyhow::anyhow!(
                    "nothing heard from the peer for {IDLE_TIMEOUT:?}"
                ))
            }
            Ok(Err(end)) => return end,
            Ok(Ok(m)) => m,
        };
        match msg {
            Msg::Subscribe {
                after,
                alerts_after,
            } => {
                inbound.subscribed.send_replace(Some(after));
                if alerts_after.is_some() {
                    inbound.alerts_subscribed.send_replace(alerts_after);
                }
            }
            Msg::Alerts { items, next } => {
                if let Err(e) = super::alerts::record(ctx, peer, stats, items, next).await {
                    return End::Failed(e);
                }
            }
            Msg::Ack { through } => {
                stats.acked.fetch_max(through, Ordering::Relaxed);
                inbound.acked.send_if_modified(|a| {
                    let moved = through > *a;
                    *a = (*a).max(through);
                    moved
                });
            }
            Msg::Changes { items, next } => {
                if let Err(e) = merge(ctx, peer, stats, items, next).await {
                    return End::Failed(e);
                }
                inbound.merged.send_replace(next);
            }
            Msg::Models { items } => match ctx.registry.apply_remote_models(items).await {
                Ok(n) if n > 0 => tracing::info!(peer, models = n, "merged models from the peer"),
                Ok(_) => {}
                Err(e) => return End::Failed(e.into()),
            },
            Msg::Digest { buckets } => {
                inbound.digests.send_replace(Some(buckets));
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
    let mut encoder = match protocol::Encoder::new() {
        Ok(e) => e,
        Err(e) => return End::Failed(e),
    };
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
            let models = text(&Msg::Models {
                items: ctx.registry.models_state(),
            });
            if let Err(end) = send_counted(ctx, stats, out, models).await {
                return end;
            }
            models_sent = Some(version);
        }
        let page = ctx.registry.changes(pos, BATCH);
        let full = page.items.len() == BATCH;
        if page.next != pos {
            let items: Vec<&FeedItem> = page.items.iter().filter(|i| !made_by(i, peer)).collect();
            let frame = match encoder.changes(&items, page.next) {
                Ok(f) => f,
                Err(e) => return End::Failed(e),
            };
            let (sent, covered) = (items.len() as u64, page.next - pos);
            stats.ops_out.fetch_add(sent, Ordering::Relaxed);
            stats.covered.fetch_add(covered, Ordering::Relaxed);
            ctx.stats.entries_sent.fetch_add(sent, Ordering::Relaxed);
            ctx.stats
                .changes_covered
                .fetch_add(covered, Ordering::Relaxed);
            metrics::counter!("twinhost_sync_ops_total", "direction" => "out").increment(sent);
            metrics::counter!("twinhost_sync_changes_covered_total").increment(covered);
            if let Err(end) = send_counted(ctx, stats, out, Out::Binary(frame)).await {
                return end;
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
