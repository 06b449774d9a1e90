//! Digests of the replicated state, for anti-entropy between nodes: what the change feed
//! could not deliver (a node restored from an old backup, a lost feed position) shows up as a
//! bucket whose digest differs, and the twins of that bucket are sent again.
//!
//! A twin's digest covers exactly what replicas converge on (entity type, parent, lifecycle,
//! values, property clocks, version vector, the delete it outlived); a tombstone's its delete
//! clock and version vector. Per-node fields (version, change number, timestamps) are left
//! out. Buckets are the last byte of the id; a bucket's digest is the wrapping sum of its
//! entries', so it does not depend on the order they are visited in.

use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::{FeedItem, Registry};
use crate::types::{Twin, TwinId};

/// Buckets of a digest.
pub const BUCKETS: usize = 256;

/// The bucket of a twin id.
pub fn bucket_of(id: &TwinId) -> usize {
    id.0.as_bytes()[15] as usize
}

fn first_u64(h: Sha256) -> u64 {
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

fn twin_digest(t: &Twin, rels: &[super::rels::RelRecord]) -> u64 {
    let mut h = Sha256::new();
    h.update(b"twin\0");
    h.update(t.id.0.as_bytes());
    h.update(t.entity_type.as_bytes());
    h.update(b"\0");
    h.update(t.parent_id.map(|p| *p.0.as_bytes()).unwrap_or_default());
    h.update([t.lifecycle as u8]);
    // serde_json's map is ordered by key: the same values give the same bytes everywhere.
    h.update(serde_json::to_vec(&t.properties).unwrap_or_default());
    for (name, c) in t.clocks.iter() {
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update(c.hlc.to_be_bytes());
        h.update(c.origin.as_bytes());
        h.update(b"\0");
        h.update(c.n.to_be_bytes());
        h.update(c.v.to_be_bytes());
    }
    if let Some(s) = &t.siblings {
        h.update(b"siblings\0");
        h.update(serde_json::to_vec(s).unwrap_or_default());
    }
    if !rels.is_empty() {
        h.update(b"relationships\0");
        h.update(serde_json::to_vec(rels).unwrap_or_default());
    }
    for (node, n) in &t.vclock {
        h.update(node.as_bytes());
        h.update(b"\0");
        h.update(n.to_be_bytes());
    }
    h.update(t.deleted_hlc.to_be_bytes());
    first_u64(h)
}

fn tombstone_digest(d: &super::Tombstone) -> u64 {
    let mut h = Sha256::new();
    h.update(b"tombstone\0");
    h.update(d.id.0.as_bytes());
    h.update(d.hlc.to_be_bytes());
    for (node, n) in &d.vclock {
        h.update(node.as_bytes());
        h.update(b"\0");
        h.update(n.to_be_bytes());
    }
    first_u64(h)
}

impl Registry {
    /// Every twin and tombstone, copied out of the maps (no lock is held while they are
    /// hashed or encoded). Tombstones whose delete is older than half the retention are left
    /// out: each node drops them at its own time, and comparing them would only send them
    /// back and forth.
    fn replicated(&self) -> Vec<FeedItem> {
        let twins: Vec<Arc<crate::types::Twin>> = self
            .inner
            .twins
            .0
            .iter()
            .map(|t| Arc::clone(t.value()))
            .collect();
        let rels = self.inner.rels.read();
        let mut out: Vec<FeedItem> = twins
            .into_iter()
            .map(|t| {
                let r = super::rels::records(rels.get(&t.id));
                FeedItem::Twin(t, r)
            })
            .collect();
        drop(rels);
        let half = self.tombstone_retention().as_millis() as u64 / 2;
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let cutoff = now_ms.saturating_sub(half) << crate::types::HLC_COUNTER_BITS;
        out.extend(
            self.inner
                .tombstones
                .read()
                .values()
                .filter(|d| d.hlc >= cutoff)
                .map(|d| FeedItem::Tombstone(Arc::clone(d))),
        );
        out
    }

    /// The digest of the replicated state per bucket ([`BUCKETS`] of them). CPU-bound
    /// (a hash per twin): run it off the async threads.
    pub fn digest(&self) -> Vec<u64> {
        self.buckets().into_iter().map(|(d, _)| d).collect()
    }

    /// The twins and tombstones of every bucket whose digest differs from `theirs` (one
    /// list per bucket, empty where they agree), in one pass over the state: a caller
    /// encodes and sends one bucket at a time.
    pub fn differing_buckets(&self, theirs: &[u64]) -> Vec<Vec<FeedItem>> {
        self.buckets()
            .into_iter()
            .zip(theirs)
            .map(|((ours, items), t)| if ours == *t { Vec::new() } else { items })
            .collect()
    }

    /// Each bucket's digest and entries.
    fn buckets(&self) -> Vec<(u64, Vec<FeedItem>)> {
        let mut out: Vec<(u64, Vec<FeedItem>)> = (0..BUCKETS).map(|_| (0, Vec::new())).collect();
        for item in self.replicated() {
            let (id, d) = match &item {
                FeedItem::Twin(t, rels) => (t.id, twin_digest(t, rels)),
                FeedItem::Tombstone(t) => (t.id, tombstone_digest(t)),
            };
            let (sum, items) = &mut out[bucket_of(&id)];
            *sum = sum.wrapping_add(d);
            items.push(item);
        }
        out
    }
}
