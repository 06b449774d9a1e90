//! Alerts travel between nodes: an alert raised on the edge is listed on the cloud too.
//!
//! Alerts are events, not state: they live in each node's event log, not in the twins, so
//! the change feed does not carry them. Each side of a link forwards the alerts of its event
//! log from where the peer asked (`subscribe.alerts_after`, the position in this node's log
//! the peer has logged through, stored there with every batch it logs). Forwarded alerts
//! keep their `origin` and their number there (`origin_seq`); the receiver logs each once,
//! under a number of its own, and forwards it further (edge → cloud → edge), except back to
//! the node it came from.
//!
//! Deduplication: a node keeps, per origin, the highest `origin_seq` it has logged, stored in
//! the commit that logs it, and drops anything not above it. Every link sends a log in its
//! order, and a node logs an origin's alerts in that origin's order, so each node holds a
//! prefix of every origin's alerts and the two paths of a mesh cannot skip one.
//!
//! Bounded: the sender reads the event log (nothing per peer is queued), and a peer away
//! longer than the log's tail (`--event-tail`, age and count) misses the alerts trimmed
//! meanwhile; the sender logs how many positions it skipped.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::link::{send_counted, text, End, Out};
use super::protocol::Msg;
use super::{LinkStats, SyncCtx};
use crate::events::{Event, EventType};
use crate::registry::RemoteAlert;
use crate::store::{keys, KvOp, Store};

/// Events read from the log at a time; at most this many alerts go in one message.
pub const BATCH: usize = 512;
/// A sender that read past events without alerts tells the peer its position at most this
/// often (so a reconnect does not read them again), with an empty message.
const POSITION_EVERY: Duration = Duration::from_secs(5);

/// The key under which how far `peer`'s event log is logged here is kept.
pub fn cursor_key(peer: &str) -> Vec<u8> {
    let mut k = keys::META_PEER_ALERTS.to_vec();
    k.extend_from_slice(peer.as_bytes());
    k
}

/// The key under which the highest alert number logged here from `origin` is kept.
fn seen_key(origin: &str) -> Vec<u8> {
    let mut k = keys::META_ALERTS_SEEN.to_vec();
    k.extend_from_slice(origin.as_bytes());
    k
}

/// Per origin, the highest alert number logged here (read from the store at first use).
#[derive(Default)]
pub struct Seen(tokio::sync::Mutex<Option<HashMap<Arc<str>, u64>>>);

fn load_seen(store: &Store) -> HashMap<Arc<str>, u64> {
    let mut seen = HashMap::new();
    for kv in store.scan_prefix(keys::META_ALERTS_SEEN) {
        match kv {
            Ok((k, v)) => {
                let origin = String::from_utf8_lossy(&k[keys::META_ALERTS_SEEN.len()..]);
                if let Ok(b) = <[u8; 8]>::try_from(v.as_ref()) {
                    seen.insert(Arc::from(origin.as_ref()), u64::from_be_bytes(b));
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the alerts seen from peers"),
        }
    }
    seen
}

/// The alert an event of this node's log stands for, as it travels (`None`: not an alert).
fn remote(e: &Event) -> Option<RemoteAlert> {
    if e.kind != EventType::Alert {
        return None;
    }
    Some(RemoteAlert {
        origin: e.origin.clone(),
        origin_seq: e.origin_seq.unwrap_or(e.seq),
        twin_id: e.twin_id?,
        entity_type: e.entity_type.clone().unwrap_or_default(),
        parent_id: e.parent_id,
        ts: e.ts,
        data: e.data.clone().unwrap_or(serde_json::Value::Null),
    })
}

/// Log the alerts of a message from `peer` that are new here, and how far its log is read,
/// in one commit. Returns how many were logged.
pub(super) async fn record(
    ctx: &SyncCtx,
    peer: &str,
    stats: &LinkStats,
    items: Vec<RemoteAlert>,
    next: u64,
) -> anyhow::Result<usize> {
    let received = items.len();
    // One message at a time over every link: two paths may bring one alert at once.
    let mut gate = ctx.alerts_seen.0.lock().await;
    let seen = gate.get_or_insert_with(|| load_seen(&ctx.store));
    let mut raised: HashMap<Arc<str>, u64> = HashMap::new();
    let mut new = Vec::with_capacity(items.len());
    for a in items {
        if *a.origin == *ctx.node_id {
            continue;
        }
        let last = raised
            .get(&a.origin)
            .or_else(|| seen.get(&a.origin))
            .copied()
            .unwrap_or(0);
        if a.origin_seq > last {
            raised.insert(a.origin.clone(), a.origin_seq);
            new.push(a);
        }
    }
    let mut config = vec![KvOp::Put(cursor_key(peer), next.to_be_bytes().to_vec())];
    config.extend(
        raised
            .iter()
            .map(|(o, n)| KvOp::Put(seen_key(o), n.to_be_bytes().to_vec())),
    );
    let logged = new.len();
    ctx.registry.record_remote_alerts(new, config).await?;
    seen.extend(raised);
    drop(gate);
    stats.alerts_in.fetch_add(logged as u64, Ordering::Relaxed);
    metrics::counter!("twinhost_sync_alerts_total", "direction" => "in").increment(logged as u64);
    if received > logged {
        tracing::debug!(
            peer,
            received,
            logged,
            "alerts already logged here were dropped"
        );
    }
    Ok(logged)
}

/// Forward this node's alerts to `peer` from where it asked, as they are logged.
pub(super) async fn send(
    ctx: &SyncCtx,
    peer: &str,
    stats: &LinkStats,
    out: &mpsc::Sender<Out>,
    mut subscribed: watch::Receiver<Option<u64>>,
) -> End {
    let Some(log) = ctx.events.get().cloned() else {
        // A node without an event log (in-process tests) has no alerts to forward.
        return std::future::pending().await;
    };
    let mut pos = match subscribed.wait_for(Option::is_some).await {
        Ok(after) => (*after).expect("subscribed"),
        Err(_) => return End::ByPeer(None),
    };
    // Where the peer's stored position is: it moves with every message sent.
    let mut told = pos;
    let mut told_at = Instant::now();
    let mut live = log.live();
    loop {
        // A fresh receiver before reading: whatever is logged after the read wakes it.
        live = live.resubscribe();
        let reader = log.clone();
        let read = match tokio::task::spawn_blocking(move || reader.read_after(pos, BATCH)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return End::Failed(anyhow::anyhow!("reading the event log: {e}")),
            Err(e) => return End::Failed(anyhow::anyhow!("reading the event log: {e}")),
        };
        if pos > 0
            && read.first_available > pos + 1
            && read.events.first().is_some_and(|e| e.seq > pos + 1)
        {
            tracing::warn!(
                peer,
                from = pos + 1,
                to = read.first_available - 1,
                "the peer was away longer than the event log's tail: alerts trimmed meanwhile are not forwarded"
            );
        }
        let full = read.events.len() == BATCH;
        if let Some(last) = read.events.last() {
            pos = last.seq;
        }
        let items: Vec<RemoteAlert> = read
            .events
            .iter()
            .filter(|e| *e.origin != *peer)
            .filter_map(|e| remote(e))
            .collect();
        if !items.is_empty() || (pos > told && told_at.elapsed() >= POSITION_EVERY) {
            let n = items.len() as u64;
            let msg = text(&Msg::Alerts { items, next: pos });
            if let Err(end) = send_counted(ctx, stats, out, msg).await {
                return end;
            }
            stats.alerts_out.fetch_add(n, Ordering::Relaxed);
            metrics::counter!("twinhost_sync_alerts_total", "direction" => "out").increment(n);
            told = pos;
            told_at = Instant::now();
        }
        if full {
            continue;
        }
        // Caught up: wait for the next event (or the time to tell the peer how far this
        // read), then a flush window, so the alerts of that window go as one message.
        let tell_in = (pos > told).then(|| POSITION_EVERY.saturating_sub(told_at.elapsed()));
        tokio::select! {
            r = live.recv() => if let Err(tokio::sync::broadcast::error::RecvError::Closed) = r {
                return End::Cancelled;
            },
            () = async {
                match tell_in {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            } => {}
            r = subscribed.changed() => {
                if r.is_err() {
                    return End::ByPeer(None);
                }
                pos = subscribed.borrow_and_update().unwrap_or(pos);
                told = pos;
            }
        }
        tokio::time::sleep(ctx.flush()).await;
    }
}
