//! The durable change feed: "what changed after change number N", one entry per changed twin
//! (its current state with clocks) or tombstone, in change-number order — what a peer catches
//! up from, so nothing per peer grows while it is away.
//!
//! The feed is an append-only list of `(change number, twin id)` pairs, appended on the writer
//! thread whenever a twin gets a new number. An entry whose twin has moved on to a later
//! number is stale and skipped by readers; when stale entries outnumber live ones the list is
//! compacted, so it holds at most about two entries per twin or tombstone. It is rebuilt from
//! the twins' and tombstones' stored numbers at open: the twins and tombstones are the durable
//! state, the list only an index over them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::types::{Twin, TwinId, VClock};

/// Default for how long a tombstone keeps a deleted twin's id (`serve --tombstone-retention`).
pub const DEFAULT_TOMBSTONE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most entries one page of the feed returns.
pub const MAX_FEED_PAGE: usize = 10_000;
/// Entries of one page when the caller does not say.
pub const DEFAULT_FEED_PAGE: usize = 1000;

/// What a delete leaves: enough for a replica to tell "deleted here" from "never seen here",
/// and to order the delete against concurrent writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tombstone {
    pub id: TwinId,
    pub entity_type: String,
    /// HLC of the delete.
    pub hlc: u64,
    /// The twin's version vector with the delete counted.
    pub vclock: VClock,
    pub deleted_at: DateTime<Utc>,
    /// The delete's change number.
    pub lseq: u64,
}

impl Tombstone {
    /// Whether the tombstone has outlived `retention` at `now`.
    pub fn expired(&self, retention: Duration, now: DateTime<Utc>) -> bool {
        chrono::Duration::from_std(retention).is_ok_and(|r| self.deleted_at + r <= now)
    }
}

/// Tombstones by twin id.
pub(super) type Tombstones = HashMap<TwinId, Arc<Tombstone>, rustc_hash::FxBuildHasher>;

/// The index of the feed: `(change number, twin id)` in increasing number order, stale
/// entries included until the next compaction.
#[derive(Default)]
pub(super) struct Feed {
    entries: Vec<(u64, TwinId)>,
}

impl Feed {
    /// Build from the current numbers of every twin and tombstone.
    pub fn build(mut entries: Vec<(u64, TwinId)>) -> Feed {
        entries.sort_unstable();
        Feed { entries }
    }

    /// Entries held, stale ones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Twins got these change numbers (in increasing order, above every earlier one).
    pub fn extend(&mut self, numbered: Vec<(u64, TwinId)>) {
        self.entries.extend(numbered);
    }

    /// Whether stale entries outnumber `live` ones enough to compact (and are many enough
    /// that compacting is not a constant cost of small nodes).
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.entries.len() > 2 * live + (1 << 16)
    }

    /// Keep only the entries `current` says are the twin's latest.
    pub fn compact(&mut self, current: impl Fn(u64, TwinId) -> bool) {
        self.entries.retain(|(l, id)| current(*l, *id));
    }

    /// Up to `max` entries numbered above `after`, stale ones included.
    pub fn candidates(&self, after: u64, max: usize) -> Vec<(u64, TwinId)> {
        let start = self.entries.partition_point(|(l, _)| *l <= after);
        self.entries[start..].iter().take(max).copied().collect()
    }
}

/// One entry of `GET /v1/changes`.
pub enum FeedItem {
    /// A twin's current state (it changed after the asked number).
    Twin(Arc<Twin>, Vec<super::rels::RelRecord>),
    /// A delete, while its tombstone lasts.
    Tombstone(Arc<Tombstone>),
}

impl FeedItem {
    pub fn lseq(&self) -> u64 {
        match self {
            FeedItem::Twin(t, _) => t.lseq,
            FeedItem::Tombstone(t) => t.lseq,
        }
    }

    /// The JSON of the entry: the state with every clock a replica needs.
    pub fn to_json(&self) -> Value {
        match self {
            FeedItem::Twin(t, rels) => {
                let mut item = json!({
                    "lseq": t.lseq, "twin_id": t.id, "deleted": false,
                    "entity_type": t.entity_type, "parent_id": t.parent_id,
                    "version": t.version, "vclock": t.vclock, "hlc": t.hlc,
                    "lifecycle": t.lifecycle, "properties": t.properties, "clocks": t.clocks,
                    "created_at": t.created_at, "updated_at": t.updated_at,
                    "deleted_hlc": t.deleted_hlc,
                });
                if let Some(s) = &t.siblings {
                    item["siblings"] = json!(s);
                }
                if !rels.is_empty() {
                    item["relationships"] = json!(rels);
                }
                item
            }
            FeedItem::Tombstone(d) => json!({
                "lseq": d.lseq, "twin_id": d.id, "deleted": true,
                "entity_type": d.entity_type, "vclock": d.vclock, "hlc": d.hlc,
                "deleted_at": d.deleted_at,
            }),
        }
    }
}
