//! The twin registry: models, twins, hierarchy, relationships, lifecycle, queries — and the
//! one write path.
//!
//! Owns: the in-memory state of every twin (a sharded map), the secondary indexes (all ids,
//! entity type, parent → children), models and relationships, and the change feed.
//! Exposes: [`Registry`], whose mutating methods are *the* write path: each validates against
//! the model, merge-patches, bumps `version` and `vclock`, reserves a slot in the store's
//! group-commit queue *before* changing memory (so a full queue refuses with no change), and
//! returns only once the change is durable; then it publishes a [`Change`] on the feed.
//! Must never: call layers above it (events, wasm, sync, api) — they subscribe to the feed.
//!
//! Lock order: the index lock, then a twin's shard. Never take the index lock while holding a
//! twin guard (clone the twin, drop the guard, then fill `children_ids`). Models: the clocks
//! lock (`model_clocks`), then the models lock, for readers as for the writer.

mod bulk;
pub mod conflict;
#[cfg(test)]
mod conflict_tests;
#[cfg(test)]
pub(crate) mod convergence_tests;
pub mod digest;
mod error;
pub mod feed;
mod load;
pub mod model;
pub mod models_sync;
mod origin;
pub mod query;
pub mod range_index;
#[cfg(test)]
mod range_index_tests;
pub mod rels;
pub mod remote;
mod replay;
mod scan;
mod segment;
pub(crate) use segment::MAX_BYTES as SEGMENT_BYTES;
mod twins;
mod write;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

pub use bulk::ProvisionOutcome;
pub use error::RegistryError;
pub use feed::{FeedItem, Tombstone, DEFAULT_TOMBSTONE_RETENTION};
pub use model::Model;
pub use query::{Page, Query, TwinRef};
pub use remote::{RemoteChange, RemoteOutcome};
pub(crate) use twins::TwinMap;
pub use write::{check_patch, RemoteAlert};

use crate::store::{CommitHandle, Numbering, Store, StoreError};
use crate::types::{compact, Cause, Hlc, Lifecycle, Properties, Twin, TwinId};

/// Longest entity type, relationship or property name.
pub const MAX_NAME_LEN: usize = 128;
/// Most properties one twin may hold.
pub const MAX_PROPERTIES: usize = 4096;
/// Deepest nesting of arrays and objects inside one property value. Events, history and
/// the log embed values a few levels deeper, and every reader must be able to parse them back.
pub const MAX_VALUE_DEPTH: usize = 32;
/// Most ids a twin's JSON lists in `children_ids` (the first ones, in id order): a parent of
/// a million machines must not serialize a million ids with every read. All of them are
/// paged through with a query on `parent_id` (`POST /v1/query`).
pub const MAX_CHILDREN_LISTED: usize = 1_000;
/// Deepest hierarchy walked by ancestor queries (guards against corrupted parent chains).
pub const MAX_DEPTH: usize = 10_000;

/// One page of the change feed ([`Registry::changes`]).
pub struct ChangesPage {
    pub items: Vec<FeedItem>,
    /// The change number to ask after next: the last item's, or the one asked after when
    /// the page is empty.
    pub next: u64,
}

/// What kind of change a [`Change`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
    Lifecycle,
    /// An alert raised by a rule or behavior: numbered and logged like a change.
    Alert,
    /// A relationship put or deleted (`data` says which).
    Relationship,
    /// A model put or deleted (no twin; `data` says which).
    Model,
    /// Concurrent writes of a property met in a merge (`data` says which); numbered and
    /// logged like an alert.
    ConflictDetected,
    /// A property's concurrent writes gave way to a later write.
    ConflictResolved,
    /// A workflow run ended (no twin; `data` says how).
    WorkflowFinished,
}

/// A committed change, handed to the change sink after it is durable.
#[derive(Clone, Debug)]
pub struct Change {
    /// The node's change number: its place in the node's order (and its event's `seq`).
    pub seq: u64,
    /// The HLC the change was stamped with.
    pub hlc: u64,
    pub kind: ChangeKind,
    /// The twin changed (the relationship's source); `None` for a model change.
    pub twin_id: Option<TwinId>,
    pub entity_type: String,
    pub parent_id: Option<TwinId>,
    pub version: u64,
    /// The merge patch applied (all properties for `created`).
    pub changed: Properties,
    pub lifecycle: Lifecycle,
    pub ts: DateTime<Utc>,
    /// Who made the change when it was a behavior or a rule (the self-trigger guard).
    pub cause: Option<Arc<Cause>>,
    /// An alert's, relationship's or model's details (`None` for twin changes).
    pub data: Option<Value>,
    /// The node where the change was made: this node's id for its own writes, alerts,
    /// relationship and model changes; for a change merged from another node, the node that
    /// made it (the rule is in `registry/origin.rs`). Behaviors and rules react to changes of
    /// local origin unless they ask for all.
    pub origin: Arc<str>,
    /// For an alert raised on another node and forwarded here: its number there (the key
    /// by which every node keeps one copy of it). `None` for everything else.
    pub origin_seq: Option<u64>,
}

impl Change {
    /// A relationship or model change (`kind` says which) described by `data`, made on
    /// `origin` (this node: relationships and models are not synced).
    pub(crate) fn config(
        kind: ChangeKind,
        twin_id: Option<TwinId>,
        entity_type: String,
        data: Value,
        stamp: &crate::store::wal::Stamp,
        origin: &Arc<str>,
    ) -> Change {
        Change {
            seq: stamp.lseq,
            hlc: stamp.hlc,
            kind,
            twin_id,
            entity_type,
            parent_id: None,
            version: 0,
            changed: Properties::new(),
            lifecycle: Lifecycle::Active,
            ts: Utc::now(),
            cause: None,
            data: Some(data),
            origin: origin.clone(),
            origin_seq: None,
        }
    }
}

/// An alert as the write-ahead log keeps it.
#[derive(Serialize, Deserialize)]
struct AlertRecord {
    /// `None` for an event about no twin (`workflow.finished`).
    #[serde(default)]
    twin_id: Option<TwinId>,
    entity_type: String,
    parent_id: Option<TwinId>,
    ts: DateTime<Utc>,
    data: Value,
    /// What the record stands for when it is not an alert (a conflict event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<ChangeKind>,
    /// An alert forwarded from another node: the node that raised it and its number there.
    /// `None`: raised here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<(Arc<str>, u64)>,
}

impl Change {
    /// An alert about `twin_id`, to be numbered by [`Registry::record_alerts`] (which also
    /// gives it this node as its origin; alerts forwarded by peers keep theirs, see
    /// [`Registry::record_remote_alerts`]).
    pub fn alert(
        twin_id: TwinId,
        entity_type: String,
        parent_id: Option<TwinId>,
        ts: DateTime<Utc>,
        data: Value,
        cause: Option<Arc<Cause>>,
    ) -> Change {
        Change {
            seq: 0,
            hlc: 0,
            kind: ChangeKind::Alert,
            twin_id: Some(twin_id),
            entity_type,
            parent_id,
            version: 0,
            changed: Properties::new(),
            lifecycle: Lifecycle::Active,
            ts,
            cause,
            data: Some(data),
            origin: Arc::from(""),
            origin_seq: None,
        }
    }
}

/// Receives every committed change, in commit order, on the store's sync thread right after
/// the change is durable. Must be quick and must not call back into the registry's writes.
pub type ChangeSink = Arc<dyn Fn(Vec<Change>) + Send + Sync>;

/// A property update: a JSON merge patch of `properties`.
#[derive(Clone, Debug)]
pub struct Update {
    pub twin_id: TwinId,
    pub patch: Properties,
    /// Time of the measurement (history timestamp); now when absent.
    pub ts: Option<DateTime<Utc>>,
    /// Refuse unless the twin is at this version.
    pub if_match: Option<u64>,
    /// Set when a behavior or rule makes the change.
    pub cause: Option<Arc<Cause>>,
}

impl Update {
    /// A plain merge patch of `twin_id`, timestamped now, unconditional.
    pub fn new(twin_id: TwinId, patch: Properties) -> Update {
        Update {
            twin_id,
            patch,
            ts: None,
            if_match: None,
            cause: None,
        }
    }
}

/// A twin to create.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTwin {
    /// The twin's id, any UUID; a UUID v7 is made when absent.
    #[serde(default)]
    pub id: Option<TwinId>,
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,128}$", example = "machine")]
    pub entity_type: String,
    /// Any JSON values (a property set to `null` is left out), checked against the entity
    /// type's model when it has one.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub properties: Properties,
    /// An existing twin (404 otherwise) that is not retired.
    #[serde(default)]
    pub parent_id: Option<TwinId>,
}

/// A relationship from one twin to another.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Relationship {
    pub name: String,
    pub target_id: TwinId,
    #[schema(value_type = Object)]
    pub properties: Value,
}

/// Result of a batch of updates: how many were applied, and why the others were not.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub applied: usize,
    pub rejected: Vec<(usize, RegistryError)>,
}

/// The [`Indexes`] of a load, gathered in lists and sorted once at the end: ten million
/// inserts into ordered sets, each a walk down a tree that no longer fits in the cache, were
/// a fifth of a restart's time.
#[derive(Default)]
struct IndexBuilder {
    all: Vec<TwinId>,
    by_type: HashMap<String, Vec<TwinId>>,
    children: HashMap<TwinId, Vec<TwinId>, rustc_hash::FxBuildHasher>,
}

impl IndexBuilder {
    /// Room for `twins` ids in the list of all (the others are per type and parent).
    fn with_capacity(twins: usize) -> IndexBuilder {
        IndexBuilder {
            all: Vec::with_capacity(twins),
            ..Default::default()
        }
    }

    /// Index a twin by its compact blob (read in place, not decoded).
    fn add_blob(&mut self, id: TwinId, blob: &[u8]) {
        self.all.push(id);
        let et = compact::entity_type_ref(blob);
        match self.by_type.get_mut(et) {
            Some(ids) => ids.push(id),
            None => {
                self.by_type.insert(et.to_owned(), vec![id]);
            }
        }
        if let Some(p) = compact::parent_id(blob) {
            self.children.entry(p).or_default().push(id);
        }
    }

    fn finish(self) -> Indexes {
        // `BTreeSet::from_iter` sorts, then builds the tree bottom-up.
        Indexes {
            all: self.all.into_iter().collect(),
            by_type: self
                .by_type
                .into_iter()
                .map(|(k, v)| (k, v.into_iter().collect()))
                .collect(),
            children: self
                .children
                .into_iter()
                .map(|(k, v)| (k, v.into_iter().collect()))
                .collect(),
            version: 0,
        }
    }
}

#[derive(Default)]
struct Indexes {
    all: BTreeSet<TwinId>,
    by_type: HashMap<String, BTreeSet<TwinId>>,
    /// Fx hashing: looked up for every twin a query returns (its `children_ids`).
    children: HashMap<TwinId, BTreeSet<TwinId>, rustc_hash::FxBuildHasher>,
    /// Raised by every twin added or removed: a segment (`registry::segment`) made at one
    /// version lists the twins of its type and knows which have children while it lasts.
    version: u64,
}

impl Indexes {
    /// The children a twin's JSON lists: at most [`MAX_CHILDREN_LISTED`], in id order.
    fn listed_children(&self, id: &TwinId) -> BTreeSet<TwinId> {
        self.children.get(id).map_or_else(Default::default, |k| {
            k.iter().take(MAX_CHILDREN_LISTED).copied().collect()
        })
    }

    fn insert(&mut self, t: &Twin) {
        self.version += 1;
        self.all.insert(t.id);
        self.by_type
            .entry(t.entity_type.clone())
            .or_default()
            .insert(t.id);
        if let Some(p) = t.parent_id {
            self.children.entry(p).or_default().insert(t.id);
        }
    }

    fn remove(&mut self, t: &Twin) {
        self.version += 1;
        self.all.remove(&t.id);
        if let Some(set) = self.by_type.get_mut(&t.entity_type) {
            set.remove(&t.id);
            if set.is_empty() {
                self.by_type.remove(&t.entity_type);
            }
        }
        if let Some(p) = t.parent_id {
            if let Some(set) = self.children.get_mut(&p) {
                set.remove(&t.id);
                if set.is_empty() {
                    self.children.remove(&p);
                }
            }
        }
        // Its own children stay listed under its id while they exist: a delete made
        // elsewhere removes a parent without them (each child's own delete, if any, comes
        // separately), and a twin that comes back finds its children again.
    }

    /// `new` is `old` with another entity type or parent (a merge of concurrent creates).
    fn reidentify(&mut self, old: &Twin, new: &Twin) {
        self.remove(old);
        self.insert(new);
    }

    /// Visit `root`'s subtree children before their parents, `root` last, until `visit`
    /// returns false. Memory is the depth of the tree, not its size.
    fn walk_leaves_first(&self, root: TwinId, mut visit: impl FnMut(TwinId) -> bool) {
        let kids = |id: &TwinId| self.children.get(id).map(|k| k.iter());
        let mut stack = vec![(root, kids(&root))];
        while let Some((id, next)) = stack.last_mut() {
            match next.as_mut().and_then(Iterator::next) {
                Some(k) => stack.push((*k, kids(k))),
                None => {
                    if !visit(*id) {
                        return;
                    }
                    stack.pop();
                }
            }
        }
    }

    /// Up to `max` twins of `root`'s subtree, children before their parents, `root` last
    /// when the whole subtree fits.
    fn leaves_first(&self, root: TwinId, max: usize) -> Vec<TwinId> {
        let mut out = Vec::new();
        if max == 0 {
            return out;
        }
        self.walk_leaves_first(root, |id| {
            out.push(id);
            out.len() < max
        });
        out
    }

    /// How many twins are under `root` (counted, not collected).
    fn count_descendants(&self, root: TwinId) -> usize {
        let mut n = 0;
        self.walk_leaves_first(root, |_| {
            n += 1;
            true
        });
        n - 1
    }

    /// The twins under `root`, or `None` when there are more than `max`.
    fn descendants_upto(&self, root: TwinId, max: usize) -> Option<Vec<TwinId>> {
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            if let Some(kids) = self.children.get(&id) {
                if out.len() + kids.len() > max {
                    return None;
                }
                for k in kids {
                    out.push(*k);
                    stack.push(*k);
                }
            }
        }
        Some(out)
    }
}

/// Source → (name, target) → the relationship (or its tombstone), with its clock.
type RelMap = BTreeMap<TwinId, BTreeMap<(String, TwinId), rels::RelState>>;

struct Inner {
    node_id: String,
    /// The node id as the origin of local writes (shared by every property clock).
    origin: Arc<str>,
    /// The first change number of this run.
    first_lseq: u64,
    /// Stamped changes replayed from the log at open, for the event log to take.
    recovered: parking_lot::Mutex<Vec<Change>>,
    /// Deleted twins' tombstones, while they last.
    tombstones: RwLock<feed::Tombstones>,
    /// How long a tombstone lasts, in milliseconds.
    tombstone_retention_ms: std::sync::atomic::AtomicU64,
    /// The change feed's index.
    feed: parking_lot::Mutex<feed::Feed>,
    /// The highest change number of the feed that is durable: the feed shows nothing above
    /// it (a peer must not merge a change this node could still lose in a crash, and then
    /// skip the different change that takes its number after the restart).
    durable: Arc<tokio::sync::watch::Sender<u64>>,
    /// Remote changes applied although the local model would refuse them.
    remote_model_mismatches: std::sync::atomic::AtomicU64,
    /// Twins holding siblings (open conflicts).
    conflicted: dashmap::DashSet<TwinId>,
    twins: Arc<TwinMap>,
    index: RwLock<Indexes>,
    models: RwLock<HashMap<String, Arc<Model>>>,
    /// The clock of every model and model tombstone (models replicate, lww).
    model_clocks: RwLock<HashMap<String, models_sync::ModelClock>>,
    /// Counts model puts and deletes, local or merged, once durable.
    models_version: tokio::sync::watch::Sender<u64>,
    rels: RwLock<RelMap>,
    commit: CommitHandle,
    sink: std::sync::OnceLock<ChangeSink>,
}

/// The registry. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

/// [`check_name`]'s rule as a regular expression: the OpenAPI document states it on every
/// name the server checks (a test keeps the two in step).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_.:-]{1,128}$";

/// Check an entity type or relationship name.
pub fn check_name(what: &str, name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadRequest(format!(
            "{what} {name:?} must be 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 _ - . :"
        )))
    }
}

fn corrupt(key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    }
}

impl Registry {
    /// Load every twin, model and relationship from the store, rebuild the indexes and start
    /// the group-commit writer.
    pub fn open(store: &Store, node_id: &str) -> Result<Self, RegistryError> {
        // Raw key/value entries of the log tail land in sled first, so models and
        // relationships load complete; twin entries are replayed into memory below.
        let crate::store::Recovered {
            entries,
            last_segment,
        } = store.recover()?;
        let origin: Arc<str> = Arc::from(node_id);
        let load::Loaded {
            twins,
            mut index,
            models,
            model_clocks,
            rels,
            tombstones,
            floors,
        } = load::load(store, &origin)?;
        let (mut lseq_floor, mut hlc_floor) = (floors.lseq, floors.hlc);
        let mut recovered = Vec::new();
        let replayed = (!entries.is_empty()).then(|| {
            let mut batch = crate::store::Batch::new();
            let r = replay::replay(
                &twins,
                &mut index,
                &origin,
                entries,
                &mut batch,
                &mut recovered,
            );
            lseq_floor = lseq_floor.max(r.lseq);
            hlc_floor = hlc_floor.max(r.hlc);
            // Twins a format-1 log tail created get their number now (the first checkpoint
            // writes them, dirty from the replay).
            for id in r.unnumbered {
                if let Some(mut t) = twins.get_mut(&id).filter(|t| t.lseq == 0) {
                    lseq_floor += 1;
                    t.lseq = lseq_floor;
                }
            }
            batch
        });
        let numbering = Numbering {
            next_lseq: lseq_floor + 1,
            hlc: Hlc::above(hlc_floor),
        };
        let feed = feed::Feed::build(
            twins
                .numbered()
                .into_iter()
                .chain(tombstones.values().map(|d| (d.lseq, d.id)))
                .collect(),
        );
        let commit = store.start_committer(twins.clone(), last_segment, replayed, numbering)?;
        let reg = Registry {
            inner: Arc::new(Inner {
                node_id: node_id.to_owned(),
                origin,
                first_lseq: lseq_floor + 1,
                recovered: parking_lot::Mutex::new(recovered),
                tombstones: RwLock::new(tombstones),
                tombstone_retention_ms: (DEFAULT_TOMBSTONE_RETENTION.as_millis() as u64).into(),
                feed: parking_lot::Mutex::new(feed),
                durable: Arc::new(tokio::sync::watch::Sender::new(lseq_floor)),
                remote_model_mismatches: Default::default(),
                conflicted: twins
                    .ids_where(|_, b| crate::types::compact::has_siblings(b))
                    .into_iter()
                    .collect(),
                twins,
                index: RwLock::new(index),
                models: RwLock::new(models),
                model_clocks: RwLock::new(model_clocks),
                models_version: tokio::sync::watch::Sender::new(0),
                rels: RwLock::new(rels),
                commit,
                sink: std::sync::OnceLock::new(),
            }),
        };
        reg.reindex_all(true);
        tracing::info!(
            twins = reg.twin_count(),
            models = reg.inner.models.read().len(),
            "registry loaded"
        );
        Ok(reg)
    }

    /// Finish work a crash interrupted: twins whose parent no longer exists (a cascade
    /// delete) and relationships whose ends are gone are removed through the write path.
    /// Run once after [`Registry::open`]. Returns how many records were removed.
    pub async fn repair(&self) -> Result<usize, RegistryError> {
        let orphans: Vec<TwinId> = {
            let idx = self.inner.index.read();
            self.inner.twins.ids_where(|_, b| {
                crate::types::compact::parent_id(b).is_some_and(|p| !idx.all.contains(&p))
            })
        };
        let mut n = 0;
        for id in orphans {
            tracing::warn!(twin_id = %id, "removing twin whose parent is gone (interrupted cascade delete)");
            n += self.delete(id, true).await?;
        }
        // Relationships go with their source (those to a deleted target stay, unlisted: see
        // `rels`); a source gone without them is a crash between the two.
        let orphaned: Vec<TwinId> = {
            let idx = self.inner.index.read();
            self.inner
                .rels
                .read()
                .keys()
                .filter(|src| !idx.all.contains(src))
                .copied()
                .collect()
        };
        for src in orphaned {
            tracing::warn!(source = %src, "removing the relationships of a twin that is gone");
            n += self.drop_relationships_of(src).await?;
        }
        Ok(n)
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The first change number this run hands out (every earlier one is in the log or was
    /// never acknowledged).
    pub fn first_lseq(&self) -> u64 {
        self.inner.first_lseq
    }

    /// What the query segments may hold together, in bytes (`serve --segment-mb`; 0: none).
    pub fn set_segment_budget(&self, bytes: usize) {
        self.inner.twins.set_segment_budget(bytes);
    }

    /// How long a delete's tombstone keeps the twin's id (`serve --tombstone-retention`).
    pub fn set_tombstone_retention(&self, retention: std::time::Duration) {
        self.inner.tombstone_retention_ms.store(
            retention.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn tombstone_retention(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.inner
                .tombstone_retention_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// The tombstone of a deleted twin, while it lasts.
    pub fn tombstone(&self, id: &TwinId) -> Option<Arc<Tombstone>> {
        let retention = self.tombstone_retention();
        self.inner
            .tombstones
            .read()
            .get(id)
            .filter(|d| !d.expired(retention, Utc::now()))
            .cloned()
    }

    /// The change feed after change number `after`: up to `limit` entries, one per twin that
    /// changed (its current state) or tombstone, in change-number order, durable ones only;
    /// and the number to ask after next (past stale entries too, so a page of them is not
    /// read again; `after` when there is nothing new).
    pub fn changes(&self, after: u64, limit: usize) -> ChangesPage {
        let limit = limit.clamp(1, feed::MAX_FEED_PAGE);
        let durable = *self.inner.durable.borrow();
        let mut out = Vec::with_capacity(limit.min(1024));
        // Every entry up to here has been looked at: shown, or stale (its twin has a later
        // entry, or its tombstone expired), so the next page starts after it.
        let mut scanned = after;
        'pages: while out.len() < limit && scanned < durable {
            // Candidates are copied out of the index: no twin is looked at under its lock,
            // since the writer takes that lock while holding a twin.
            let batch = self.inner.feed.lock().candidates(scanned, limit.max(256));
            if batch.is_empty() {
                break;
            }
            for (lseq, id) in batch {
                if out.len() == limit || lseq > durable {
                    break 'pages;
                }
                let twin = self
                    .inner
                    .twins
                    .with(&id, |b| {
                        (crate::types::compact::lseq(b) == lseq)
                            .then(|| crate::types::compact::decode(id, b))
                    })
                    .flatten()
                    .transpose()
                    .expect("a twin blob encoded by this process decodes");
                if let Some(t) = twin {
                    let rels = self.relationship_records(&id);
                    out.push(FeedItem::Twin(Arc::new(t), rels));
                } else if let Some(d) = self.tombstone(&id).filter(|d| d.lseq == lseq) {
                    out.push(FeedItem::Tombstone(d));
                }
                scanned = lseq;
            }
        }
        let next = scanned;
        ChangesPage { items: out, next }
    }

    /// Follows the highest durable change number (what [`Registry::changes`] shows up to):
    /// a peer link waits on it for new changes to send.
    pub fn watch_durable(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.durable.subscribe()
    }

    /// The stamped changes the log replay found at open (once; empty afterwards): the event
    /// log re-creates the events a crash kept from its persisted tail.
    pub fn take_recovered(&self) -> Vec<Change> {
        std::mem::take(&mut *self.inner.recovered.lock())
    }

    pub fn twin_count(&self) -> usize {
        self.inner.twins.len()
    }

    /// Requests waiting for the group-commit writer.
    pub fn queue_depth(&self) -> usize {
        self.inner.commit.queue_depth()
    }

    pub fn commit_stats(&self) -> &crate::store::CommitStats {
        &self.inner.commit.stats
    }

    /// Install the receiver of committed changes (the event log). Once per registry; until
    /// then changes are not collected at all.
    pub fn set_change_sink(&self, sink: ChangeSink) {
        if self.inner.sink.set(sink).is_err() {
            tracing::warn!("change sink already installed; keeping the first");
        }
    }

    /// Stop the writer after it has drained and flushed.
    pub fn shutdown(&self) {
        self.inner.commit.shutdown();
    }

    fn wants_changes(&self) -> bool {
        self.inner.sink.get().is_some()
    }

    fn model_for(&self, entity_type: &str) -> Option<Arc<Model>> {
        let models = self.inner.models.read();
        if models.is_empty() {
            return None;
        }
        models.get(entity_type).cloned()
    }

    fn with_children(&self, mut t: Twin) -> Twin {
        t.children_ids = self.inner.index.read().listed_children(&t.id);
        t
    }

    // ---- models -------------------------------------------------------------------------

    pub fn model(&self, entity_type: &str) -> Result<Arc<Model>, RegistryError> {
        self.inner
            .models
            .read()
            .get(entity_type)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("model {entity_type:?}")))
    }

    pub fn models(&self) -> BTreeMap<String, Arc<Model>> {
        self.inner
            .models
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    // ---- twins --------------------------------------------------------------------------

    pub fn get(&self, id: &TwinId) -> Result<Twin, RegistryError> {
        let t = self
            .inner
            .twins
            .get(id)
            .ok_or_else(|| RegistryError::twin_not_found(id))?;
        Ok(self.with_children(t))
    }

    /// Run `f` on the twin's compact blob (no decoding; keep `f` short: its shard is
    /// read-locked meanwhile); `None` when the twin does not exist.
    pub(crate) fn with_blob<R>(&self, id: &TwinId, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        self.inner.twins.with(id, f)
    }

    /// Up to `limit` children of `id` in id order, after the child `after`, and the last
    /// one's id when there are more (the next page's cursor).
    pub fn children(
        &self,
        id: &TwinId,
        after: Option<TwinId>,
        limit: usize,
    ) -> Result<(Vec<Twin>, Option<TwinId>), RegistryError> {
        if !self.inner.twins.contains(id) {
            return Err(RegistryError::twin_not_found(id));
        }
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        // Every child, not only the ones a twin's `children_ids` lists; the index lock is
        // held while the page's ids are copied.
        let (ids, more) = self
            .inner
            .index
            .read()
            .children
            .get(id)
            .map(|kids| {
                let mut page = kids.range((lower, Bound::Unbounded));
                let ids: Vec<TwinId> = page.by_ref().take(limit).copied().collect();
                (ids, page.next().is_some())
            })
            .unwrap_or_default();
        let next = ids.last().copied().filter(|_| more);
        Ok((ids.iter().filter_map(|c| self.get(c).ok()).collect(), next))
    }

    /// Ancestors, nearest first.
    pub fn ancestors(&self, id: &TwinId) -> Result<Vec<Twin>, RegistryError> {
        let mut cur = self.get(id)?.parent_id;
        let mut out = Vec::new();
        while let Some(p) = cur {
            if out.len() >= MAX_DEPTH {
                break;
            }
            let Ok(t) = self.get(&p) else { break };
            cur = t.parent_id;
            out.push(t);
        }
        Ok(out)
    }

    // ---- relationships ------------------------------------------------------------------

    /// The relationships of `src` whose target exists.
    pub fn relationships(&self, src: &TwinId) -> Result<Vec<Relationship>, RegistryError> {
        self.get(src)?;
        let idx = self.inner.index.read();
        Ok(self
            .inner
            .rels
            .read()
            .get(src)
            .map(|m| {
                m.iter()
                    .filter(|((_, dst), _)| idx.all.contains(dst))
                    .filter_map(|((name, dst), s)| {
                        Some(Relationship {
                            name: name.clone(),
                            target_id: *dst,
                            properties: s.props.clone()?,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The relationships of `src` with their clocks, tombstones included (its feed entry).
    pub(crate) fn relationship_records(&self, src: &TwinId) -> Vec<rels::RelRecord> {
        rels::records(self.inner.rels.read().get(src))
    }

    // ---- queries ------------------------------------------------------------------------

    /// The ids of up to `limit` twins of `entity_type`, in id order (a copy of the index's
    /// ids: the index lock is held only while copying), and how many twins of that type there
    /// are in all.
    pub fn ids_of_type(&self, entity_type: &str, limit: usize) -> (Vec<TwinId>, usize) {
        let idx = self.inner.index.read();
        idx.by_type.get(entity_type).map_or((Vec::new(), 0), |ids| {
            (ids.iter().take(limit).copied().collect(), ids.len())
        })
    }

    /// Run a query. Candidates come from the most selective index (parent, ancestor, entity
    /// type, else all twins), in id order starting after the cursor.
    pub fn query(&self, q: &Query) -> Result<Page, RegistryError> {
        let (cursor, limit) = q.check().map_err(RegistryError::BadRequest)?;
        let plan = self.inner.twins.ranges.plan(q);
        let cursor = match (cursor, &plan) {
            (Some(query::Cursor::Index(p)), Some(plan)) => {
                return Ok(self.query_indexed(q, plan, Some(p), limit));
            }
            (None, Some(plan)) => return Ok(self.query_indexed(q, plan, None, limit)),
            (Some(query::Cursor::Id(id)), _) => Some(id),
            (None, None) => None,
            (Some(query::Cursor::Index(_)), None) => {
                return Err(RegistryError::BadRequest(
                    "the cursor points into a range index this query no longer uses (the model changed): start again without a cursor".into(),
                ))
            }
        };
        let idx = self.inner.index.read();
        let lower = cursor.map_or(Bound::Unbounded, Bound::Excluded);
        let empty = BTreeSet::new();
        let descendants: BTreeSet<TwinId>;
        // A small subtree is gathered and read in id order; a big one (a building of a
        // million machines) is not copied for every page: the candidates are then every
        // twin (of the type), each checked by walking up from it.
        let subtree = q
            .ancestor_id
            .filter(|_| q.parent_id.is_none())
            .map(|a| idx.descendants_upto(a, query::MAX_SUBTREE_GATHERED));
        let big_subtree = matches!(subtree, Some(None));
        let source: &BTreeSet<TwinId> = if let Some(p) = q.parent_id {
            idx.children.get(&p).unwrap_or(&empty)
        } else if let Some(Some(d)) = subtree {
            descendants = d.into_iter().collect();
            &descendants
        } else if let Some(et) = &q.entity_type {
            idx.by_type.get(et).unwrap_or(&empty)
        } else {
            &idx.all
        };
        let from_type_index =
            q.parent_id.is_none() && q.ancestor_id.is_none() && q.entity_type.is_some();
        // With both filters the source is the parent's children, and for a big subtree every
        // twin: check the ancestor by walking up.
        let walk_to = q
            .ancestor_id
            .filter(|_| q.parent_id.is_some() || big_subtree);
        let matcher = q.matcher();
        let matches = |b: &[u8], props_at: u16| matcher.matches_at(b, props_at, !from_type_index);
        // Each twin is matched on its blob (only the properties asked about are decoded); a
        // match's bytes are copied into the page and served from there (a segment's twins
        // are referred to instead).
        let children = |id: &TwinId| idx.listed_children(id);
        let budget = query::MAX_EXAMINED_PER_PAGE;
        let found = match walk_to {
            // Walking up reads other twins: one lock per twin, none held while walking (a
            // match's bytes are copied out first).
            Some(a) => {
                let mut part = scan::Part::new(limit.min(1024));
                for id in source.range((lower, Bound::Unbounded)) {
                    let matched = self
                        .inner
                        .twins
                        .with_blob(id, |b| matches(b, b.props_at()).then(|| b.to_vec()))
                        .flatten()
                        .filter(|b| self.is_under(compact::parent_id(b), a));
                    let found = matched.as_deref().map(query::Found::Bytes);
                    if part.visit(id, found, limit, budget, children).is_break() {
                        break;
                    }
                }
                part
            }
            None => {
                let scan = scan::Scan {
                    twins: &self.inner.twins,
                    matches: &matches,
                    children: &children,
                    limit,
                    budget,
                    split_from: scan::SPLIT_FROM,
                };
                // A type's twins are read from its segment while the map has not changed
                // since it was made (see registry::segment); a big page over them makes one.
                let segment = q
                    .entity_type
                    .as_ref()
                    .filter(|_| from_type_index)
                    .and_then(|et| {
                        let big = limit >= scan::SPLIT_FROM / 2;
                        let has_children = |id: &TwinId| idx.children.contains_key(id);
                        let twins = &self.inner.twins;
                        twins.segment(et, source, &has_children, idx.version, big)
                    });
                match segment {
                    Some(seg) => scan.run_segment(&seg, seg.position(lower)),
                    None => scan.run(source, lower),
                }
            }
        };
        let mut page = found.items;
        let next_cursor = found.stop.map(|stop| match stop {
            scan::Stop::Full => page.last_id().expect("a full page has items"),
            // The budget stopped the scan at `id` before examining it: resume just before it.
            scan::Stop::Budget(id) => source
                .range((lower, Bound::Excluded(id)))
                .next_back()
                .copied()
                .unwrap_or(id),
        });
        page.next_cursor = next_cursor.map(|id| id.to_string());
        Ok(page)
    }
}

impl Registry {
    /// A query answered from a range index (`plan`), in index order, from `after`.
    fn query_indexed(
        &self,
        q: &Query,
        plan: &range_index::Plan,
        after: Option<range_index::Position>,
        limit: usize,
    ) -> Page {
        let idx = self.inner.index.read();
        let matcher = q.matcher();
        let mut page = Page::with_capacity(limit.min(1024));
        let (_, next_cursor) = plan.page(after, limit, query::MAX_EXAMINED_PER_PAGE, |id| {
            // Every condition is checked on the twin itself: the index entry may be a moment
            // older than the twin, and other conditions narrow the match further. A match
            // is copied into the page under its shard's lock, or its parent read there when
            // the ancestor is to be checked (which reads other twins: no lock held).
            let Some(a) = q.ancestor_id else {
                let pushed = self.inner.twins.with_blob(&id, |b| {
                    matcher.matches_blob(b, true) && {
                        page.push(id, query::Found::Bytes(b), idx.listed_children(&id));
                        true
                    }
                });
                return pushed.filter(|p| *p).map(|_| ());
            };
            let blob = self
                .inner
                .twins
                .with_blob(&id, |b| matcher.matches_blob(b, true).then(|| b.to_vec()))??;
            if !self.is_under(crate::types::compact::parent_id(&blob), a) {
                return None;
            }
            page.push(id, query::Found::Bytes(&blob), idx.listed_children(&id));
            Some(())
        });
        // The match that showed the page full was added too: not the page's.
        page.truncate(limit);
        page.next_cursor = next_cursor;
        page
    }

    /// Bring the range indexes of `entity_type` in line with its model: an index for each
    /// property marked `"indexed": true`, built from the twins of that type (queries use it
    /// once built), and none for the others. Writes made meanwhile keep it up to date.
    ///
    /// `alone`: nothing else writes twins (the load at open), so the new indexes' entries
    /// are gathered, sorted once and built bottom-up instead of added one at a time (10M
    /// inserts into an ordered set took 8 s, and the build at open is part of a restart).
    pub(crate) fn reindex(&self, entity_type: &str, alone: bool) {
        let wanted: Vec<String> = self
            .inner
            .models
            .read()
            .get(entity_type)
            .map(|m| m.indexed().into_iter().map(str::to_owned).collect())
            .unwrap_or_default();
        let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let ranges = &self.inner.twins.ranges;
        let fresh = ranges.set_indexed(entity_type, &wanted);
        if fresh.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        // The properties of `b` when it is a twin of `entity_type`.
        fn typed<'b>(b: &'b [u8], et: &str) -> Option<crate::types::compact::Props<'b>> {
            use crate::types::compact;
            compact::entity_type_is(b, et)
                .then(|| compact::Props::of(b).ok())
                .flatten()
        }
        let mut twins = 0;
        if alone {
            // Every twin in the map's memory order (a lookup per id, in id order, missed the
            // cache each time: 11 s at 10M twins), gathered and sorted once.
            let room = self.inner.twins.len();
            let mut gathered: Vec<range_index::Gathered> = (0..fresh.len())
                .map(|_| range_index::Gathered::with_capacity(room))
                .collect();
            self.inner.twins.for_each(|id, b| {
                let Some(props) = typed(b, entity_type) else {
                    return;
                };
                twins += 1;
                for (p, all) in fresh.iter().zip(&mut gathered) {
                    if let Some(k) = props.get(p).as_ref().and_then(range_index::Key::of) {
                        all.push((k, *id));
                    }
                }
            });
            for (p, all) in fresh.iter().zip(gathered) {
                ranges.fill_all(entity_type, p, all);
            }
        } else {
            let ids: Vec<TwinId> = self
                .inner
                .index
                .read()
                .by_type
                .get(entity_type)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            for id in &ids {
                // Read and added under the twin's shard lock, so no write of it comes
                // between.
                self.inner.twins.with(id, |b| {
                    let Some(props) = typed(b, entity_type) else {
                        return;
                    };
                    twins += 1;
                    for p in &fresh {
                        ranges.fill(entity_type, p, *id, props.get(p).as_ref());
                    }
                });
            }
        }
        for p in &fresh {
            ranges.mark_ready(entity_type, p);
        }
        tracing::info!(
            entity_type,
            properties = ?fresh,
            twins,
            ms = started.elapsed().as_millis() as u64,
            "range index built"
        );
    }

    /// Whether `a` is `parent` or above it in the hierarchy (for a twin whose parent is
    /// `parent`). Reads only twin shards, never the index lock.
    pub fn is_under(&self, parent: Option<TwinId>, a: TwinId) -> bool {
        let mut cur = parent;
        for _ in 0..MAX_DEPTH {
            match cur {
                Some(p) if p == a => return true,
                Some(p) => cur = self.inner.twins.parent_id(&p).flatten(),
                None => return false,
            }
        }
        false
    }
}
