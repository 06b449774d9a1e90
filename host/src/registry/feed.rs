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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::types::{Clocks, Lifecycle, Properties, Sibling, Twin, TwinId, VClock};

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

    /// The JSON of the entry (`GET /v1/changes`): the state with every clock a replica needs,
    /// as [`FeedItem`]'s `Serialize` writes it.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a feed entry serializes: its maps have string keys")
    }
}

/// A feed entry is written straight from the twin or tombstone it holds (no intermediate
/// JSON tree): the sync link encodes whole batches of them, and this is its hot path. The
/// fields are what [`super::RemoteChange`] reads back; a field added there is added here.
impl Serialize for FeedItem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            FeedItem::Twin(t, rels) => TwinEntry {
                lseq: t.lseq,
                twin_id: t.id,
                deleted: false,
                entity_type: &t.entity_type,
                parent_id: t.parent_id,
                version: t.version,
                vclock: &t.vclock,
                hlc: t.hlc,
                lifecycle: t.lifecycle,
                properties: &t.properties,
                clocks: &t.clocks,
                created_at: t.created_at,
                updated_at: t.updated_at,
                deleted_hlc: t.deleted_hlc,
                siblings: t.siblings.as_deref(),
                relationships: rels,
            }
            .serialize(s),
            FeedItem::Tombstone(d) => TombstoneEntry {
                lseq: d.lseq,
                twin_id: d.id,
                deleted: true,
                entity_type: &d.entity_type,
                vclock: &d.vclock,
                hlc: d.hlc,
                deleted_at: d.deleted_at,
            }
            .serialize(s),
        }
    }
}

/// The feed entry of a twin, borrowed from it.
#[derive(Serialize)]
struct TwinEntry<'a> {
    lseq: u64,
    twin_id: TwinId,
    deleted: bool,
    entity_type: &'a str,
    parent_id: Option<TwinId>,
    version: u64,
    vclock: &'a VClock,
    hlc: u64,
    lifecycle: Lifecycle,
    properties: &'a Properties,
    clocks: &'a Clocks,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    deleted_hlc: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    siblings: Option<&'a BTreeMap<String, Vec<Sibling>>>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    relationships: &'a [super::rels::RelRecord],
}

/// The feed entry of a delete, borrowed from its tombstone.
#[derive(Serialize)]
struct TombstoneEntry<'a> {
    lseq: u64,
    twin_id: TwinId,
    deleted: bool,
    entity_type: &'a str,
    vclock: &'a VClock,
    hlc: u64,
    deleted_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RemoteChange;
    use crate::types::PropClock;
    use serde_json::json;

    fn clock(hlc: u64, origin: &str) -> PropClock {
        PropClock {
            hlc,
            origin: origin.into(),
            n: 1,
            v: 2,
        }
    }

    /// The entry written straight from a twin is the JSON the feed always served (the
    /// fields of `GET /v1/changes`), and reads back as the `RemoteChange` a replica merges.
    #[test]
    fn a_twin_entry_is_the_served_json_and_reads_back_as_a_remote_change() {
        let at: DateTime<Utc> = "2025-01-02T03:04:05.678Z".parse().unwrap();
        let mut properties = Properties::new();
        properties.insert("temperature".into(), json!(71.5));
        let siblings = BTreeMap::from([(
            "temperature".to_owned(),
            vec![
                Sibling {
                    value: json!(71.5),
                    clock: clock(9 << 16, "a"),
                },
                Sibling {
                    value: json!(70),
                    clock: clock(8 << 16, "b"),
                },
            ],
        )]);
        let twin = Twin {
            id: TwinId::new_v7(),
            entity_type: "machine".into(),
            properties,
            version: 3,
            vclock: VClock::from([("a".to_owned(), 2), ("b".to_owned(), 1)]),
            parent_id: Some(TwinId::new_v7()),
            children_ids: Default::default(),
            lifecycle: Lifecycle::Suspended,
            created_at: at,
            updated_at: at,
            hlc: 9 << 16,
            lseq: 42,
            clocks: Clocks::from([("temperature", clock(9 << 16, "a"))]),
            deleted_hlc: 5,
            siblings: Some(Box::new(siblings.clone())),
        };
        let item = FeedItem::Twin(Arc::new(twin.clone()), Vec::new());
        let v = item.to_json();
        assert_eq!(
            v,
            json!({
                "lseq": 42, "twin_id": twin.id, "deleted": false, "entity_type": "machine",
                "parent_id": twin.parent_id, "version": 3, "vclock": {"a": 2, "b": 1},
                "hlc": 9u64 << 16, "lifecycle": "suspended",
                "properties": {"temperature": 71.5},
                "clocks": {"temperature": {"hlc": 9u64 << 16, "origin": "a", "n": 1, "v": 2}},
                "created_at": at, "updated_at": at, "deleted_hlc": 5,
                "siblings": {"temperature": [
                    {"value": 71.5, "hlc": 9u64 << 16, "origin": "a", "n": 1, "v": 2},
                    {"value": 70, "hlc": 8u64 << 16, "origin": "b", "n": 1, "v": 2},
                ]},
            })
        );
        // The bytes a link sends are the same JSON.
        let bytes = serde_json::to_vec(&item).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), v);
        let change: RemoteChange = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(change.twin_id, twin.id);
        assert_eq!(change.properties, twin.properties);
        assert_eq!(change.clocks, twin.clocks);
        assert_eq!(change.siblings, siblings);
        assert_eq!(change.deleted_hlc, 5);
        assert!(!change.deleted);

        // No siblings: no key.
        let plain = FeedItem::Twin(
            Arc::new(Twin {
                siblings: None,
                ..twin
            }),
            Vec::new(),
        );
        assert!(plain.to_json().get("siblings").is_none());
    }

    #[test]
    fn a_tombstone_entry_is_the_served_json_and_reads_back_as_a_delete() {
        let at: DateTime<Utc> = "2025-01-02T03:04:05Z".parse().unwrap();
        let d = Tombstone {
            id: TwinId::new_v7(),
            entity_type: "machine".into(),
            hlc: 7 << 16,
            vclock: VClock::from([("a".to_owned(), 4)]),
            deleted_at: at,
            lseq: 9,
        };
        let item = FeedItem::Tombstone(Arc::new(d.clone()));
        assert_eq!(
            item.to_json(),
            json!({"lseq": 9, "twin_id": d.id, "deleted": true, "entity_type": "machine",
                   "vclock": {"a": 4}, "hlc": 7u64 << 16, "deleted_at": at})
        );
        let change: RemoteChange =
            serde_json::from_slice(&serde_json::to_vec(&item).unwrap()).unwrap();
        assert!(change.deleted);
        assert_eq!((change.twin_id, change.hlc), (d.id, d.hlc));
    }
}
