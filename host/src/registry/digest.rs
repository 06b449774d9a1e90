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
    /// The twins of the buckets `wanted` says, decoded one at a time, each with its
    /// relationships (no lock is held while they are hashed or encoded).
    fn replicated_twins(&self, wanted: &[bool], mut each: impl FnMut(FeedItem)) {
        let ids = self.inner.twins.ids_where(|id, _| wanted[bucket_of(id)]);
        for id in ids {
            let Some(t) = self.inner.twins.get(&id) else {
                continue;
            };
            let r = super::rels::records(self.inner.rels.read().get(&id));
            each(FeedItem::Twin(Arc::new(t), r));
        }
    }

    /// The tombstones of the buckets `wanted` says. Those whose delete is older than half
    /// the retention are left out: each node drops them at its own time, and comparing them
    /// would only send them back and forth.
    fn replicated_tombstones(&self, wanted: &[bool]) -> Vec<FeedItem> {
        let half = self.tombstone_retention().as_millis() as u64 / 2;
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let cutoff = now_ms.saturating_sub(half) << crate::types::HLC_COUNTER_BITS;
        self.inner
            .tombstones
            .read()
            .values()
            .filter(|d| d.hlc >= cutoff && wanted[bucket_of(&d.id)])
            .map(|d| FeedItem::Tombstone(Arc::clone(d)))
            .collect()
    }

    /// The digest of the replicated state per bucket ([`BUCKETS`] of them). CPU-bound
    /// (a decode and a hash per twin): run it off the async threads. Twins are decoded one
    /// at a time, so it holds no copy of the state.
    pub fn digest(&self) -> Vec<u64> {
        let all = [true; BUCKETS];
        let mut out = vec![0u64; BUCKETS];
        let mut add = |item: FeedItem| {
            let (id, d) = item_digest(&item);
            let sum = &mut out[bucket_of(&id)];
            *sum = sum.wrapping_add(d);
        };
        self.replicated_twins(&all, &mut add);
        for item in self.replicated_tombstones(&all) {
            add(item);
        }
        out
    }

    /// The twins and tombstones of every bucket whose digest differs from `theirs` (one
    /// list per bucket, empty where they agree): a caller encodes and sends one bucket at a
    /// time. Only the differing buckets' twins are held.
    pub fn differing_buckets(&self, theirs: &[u64]) -> Vec<Vec<FeedItem>> {
        let ours = self.digest();
        let mut wanted = [false; BUCKETS];
        for (i, w) in wanted.iter_mut().enumerate() {
            *w = theirs.get(i) != Some(&ours[i]);
        }
        let mut out: Vec<Vec<FeedItem>> = (0..BUCKETS).map(|_| Vec::new()).collect();
        let mut put = |item: FeedItem| {
            let id = item_id(&item);
            out[bucket_of(&id)].push(item);
        };
        self.replicated_twins(&wanted, &mut put);
        for item in self.replicated_tombstones(&wanted) {
            put(item);
        }
        out
    }
}

fn item_id(item: &FeedItem) -> TwinId {
    match item {
        FeedItem::Twin(t, _) => t.id,
        FeedItem::Tombstone(t) => t.id,
    }
}

fn item_digest(item: &FeedItem) -> (TwinId, u64) {
    match item {
        FeedItem::Twin(t, rels) => (t.id, twin_digest(t, rels)),
        FeedItem::Tombstone(t) => (t.id, tombstone_digest(t)),
    }
}
