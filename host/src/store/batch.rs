//! What one commit writes: the [`Batch`] a job fills on the writer thread (log entries,
//! dirty twins, raw key/value changes, history samples, configuration), the writer's
//! [`Numbering`], and the history samples waiting for a checkpoint.
//!
//! Owns: encoding a job's changes into the commit's log frame and numbering them. Must
//! never: touch the disk (the syncer and the checkpoint thread do).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rustc_hash::FxBuildHasher;

use super::wal::{encode, Stamp};
use crate::types::{Cause, Hlc, Lifecycle, Properties, Twin, TwinId};

/// A raw key/value change (models, relationships, cleanup of deleted twins).
#[derive(Debug, Clone)]
pub enum KvOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Remove every key under a prefix.
    DeletePrefix(Vec<u8>),
}

impl KvOp {
    pub(super) fn raw(&self) -> RawOp<'_> {
        match self {
            KvOp::Put(k, v) => RawOp::Put(k, v),
            KvOp::Delete(k) => RawOp::Delete(k),
            KvOp::DeletePrefix(p) => RawOp::DeletePrefix(p),
        }
    }
}

/// A raw change as a [`KvOp`] or a log entry holds it, to write to sled at once: the
/// syncer's configuration writes and the replay of a log tail apply them the same way.
#[derive(Clone, Copy, Debug)]
pub(super) enum RawOp<'a> {
    Put(&'a [u8], &'a [u8]),
    Delete(&'a [u8]),
    DeletePrefix(&'a [u8]),
}

impl RawOp<'_> {
    /// Write to sled now (not flushed).
    pub(super) fn apply(self, db: &sled::Db) -> Result<(), sled::Error> {
        match self {
            RawOp::Put(k, v) => {
                db.insert(k, v)?;
            }
            RawOp::Delete(k) => {
                db.remove(k)?;
            }
            RawOp::DeletePrefix(p) => {
                for k in db.scan_prefix(p).keys() {
                    db.remove(k?)?;
                }
            }
        }
        Ok(())
    }
}

/// Samples per twin: (property, time in µs, value). Keyed by twin with a fast hasher; the
/// few properties of one twin are told apart by a scan.
pub(super) type SeriesMap = HashMap<TwinId, Vec<Sample>, FxBuildHasher>;
/// One history sample: property, time in µs, value.
pub(super) type Sample = (Arc<str>, i64, f64);

/// History samples not yet checkpointed; readers merge them with what sled holds.
#[derive(Default)]
pub struct PendingHistory {
    pub(super) current: SeriesMap,
    pub(super) current_samples: usize,
    /// Samples handed to a checkpoint that has not succeeded yet (more than one after a
    /// failed checkpoint, whose samples are carried into the next).
    pub(super) checkpointing: Vec<Arc<SeriesMap>>,
    /// Samples in the history journal, not yet folded into history blocks
    /// ([`super::journal`]), oldest first.
    pub(super) journaled: Vec<Arc<SeriesMap>>,
    pub(super) journaled_samples: usize,
    /// When the oldest journaled samples were journaled (or loaded).
    pub(super) journaled_since: Option<std::time::Instant>,
    /// Twins deleted since their samples were journaled: those samples are not read or folded.
    pub(super) journal_deleted: std::collections::HashSet<TwinId, FxBuildHasher>,
    /// The folds in sled's history blocks ([`super::blocks`]), by number: the first and last
    /// time of their samples (µs).
    pub(crate) folds: std::collections::BTreeMap<u64, (i64, i64)>,
    /// The next fold's number: above every fold ever numbered in this process, also those
    /// retention has removed since (a number is never used twice).
    pub(super) next_fold: u64,
}

impl PendingHistory {
    /// The folds with samples in `[lo, hi]` (µs), oldest first.
    pub fn folds_within(&self, lo: i64, hi: i64) -> Vec<u64> {
        self.folds
            .iter()
            .filter(|(_, (first, last))| *first <= hi && *last >= lo)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Forget fold `n` (retention removed it).
    pub fn forget_fold(&mut self, n: u64) {
        self.folds.remove(&n);
    }

    /// Samples not folded into sled yet, of one series (unordered).
    pub fn samples(&self, id: TwinId, property: &str) -> Vec<(i64, f64)> {
        let journaled = (!self.journal_deleted.contains(&id))
            .then_some(self.journaled.iter())
            .into_iter()
            .flatten();
        let maps = std::iter::once(&self.current)
            .chain(self.checkpointing.iter().map(|m| &**m))
            .chain(journaled.map(|m| &**m));
        maps.filter_map(|m| m.get(&id))
            .flatten()
            .filter(|(name, _, _)| &**name == property)
            .map(|(_, ts, v)| (*ts, *v))
            .collect()
    }
}

/// The writer's numbering: the node's next change number and its hybrid logical clock. Only
/// the writer thread ticks them, so change numbers follow the commit order exactly.
#[derive(Clone, Copy, Debug, Default)]
pub struct Numbering {
    pub next_lseq: u64,
    pub hlc: Hlc,
}

/// What one commit's jobs write. Handed to each job by the writer thread.
#[derive(Default)]
pub struct Batch {
    pub(super) numbering: Numbering,
    /// The host clock in ms, read once per job (stamps within a job share it; the HLC's
    /// counter keeps them apart).
    pub(super) now_ms: i64,
    /// Twins numbered by the current job: `(change number, id)`.
    pub(super) numbered: Vec<(u64, TwinId)>,
    /// Highest change number and HLC stamped in (or replayed into) this batch.
    pub(super) max_lseq: u64,
    pub(super) max_hlc: u64,
    pub(super) frame: Vec<u8>,
    pub(super) dirty: Vec<TwinId>,
    pub(super) kv: Vec<KvOp>,
    /// Configuration changes (rules, behaviors, modules, tokens): written to sled as soon as
    /// their frame is durable, before the job is acknowledged, so a reader finds them at once.
    pub(super) direct: Vec<KvOp>,
    pub(super) points: Vec<(TwinId, Arc<str>, i64, f64)>,
    pub(super) deleted: Vec<TwinId>,
    pub(super) names: HashMap<Box<str>, Arc<str>, FxBuildHasher>,
}

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }

    /// Number the change whose entries follow: the node's next change number and a tick of
    /// its clock, logged in this frame (so the number is as durable as the change).
    pub fn stamp(&mut self, cause: Option<&Cause>) -> Stamp {
        let s = self.next_stamp(cause);
        encode::stamp(&mut self.frame, &s);
        s
    }

    /// Number and log an alert (`record` is the registry's serialized alert).
    pub fn alert(&mut self, cause: Option<&Cause>, record: &[u8]) -> Stamp {
        let s = self.next_stamp(cause);
        encode::alert(&mut self.frame, &s, record);
        s
    }

    fn next_stamp(&mut self, cause: Option<&Cause>) -> Stamp {
        let lseq = self.numbering.next_lseq;
        self.numbering.next_lseq += 1;
        let hlc = self.numbering.hlc.tick(self.now_ms);
        self.max_lseq = lseq;
        self.max_hlc = hlc;
        Stamp {
            lseq,
            hlc,
            cause: cause.cloned(),
        }
    }

    /// Note that twin `id` now has change number `lseq` (for the registry's change feed,
    /// which takes them after each job).
    pub fn numbered(&mut self, lseq: u64, id: TwinId) {
        self.numbered.push((lseq, id));
    }

    /// The twins numbered since the last call.
    pub fn take_numbered(&mut self) -> Vec<(u64, TwinId)> {
        std::mem::take(&mut self.numbered)
    }

    /// Read the host clock for the next job's stamps.
    pub(super) fn start_job(&mut self) {
        self.now_ms = Utc::now().timestamp_millis();
    }

    /// A change number and clock met during replay: the first checkpoint records them.
    pub fn note_replayed(&mut self, lseq: u64, hlc: u64) {
        self.max_lseq = self.max_lseq.max(lseq);
        self.max_hlc = self.max_hlc.max(hlc);
    }

    /// A merge patch applied to the twin created at `born`, producing `version`.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        id: TwinId,
        born: DateTime<Utc>,
        version: u64,
        now: DateTime<Utc>,
        ts: DateTime<Utc>,
        patch: &Properties,
    ) {
        encode::update(&mut self.frame, &id, born, version, now, ts, patch);
        self.dirty.push(id);
    }

    pub fn create(&mut self, twin: &Twin) {
        encode::create(&mut self.frame, twin);
        self.dirty.push(twin.id);
    }

    /// A twin's whole state after merging a change made elsewhere.
    pub fn state(&mut self, twin: &Twin) {
        encode::state(&mut self.frame, twin);
        self.dirty.push(twin.id);
    }

    /// A clock seen on a change made elsewhere: later stamps are above it.
    pub fn observe(&mut self, hlc: u64) {
        self.numbering.hlc.observe(hlc);
    }

    /// A twin removed; its pending history is dropped with it.
    pub fn delete(&mut self, id: TwinId) {
        encode::delete(&mut self.frame, &id);
        self.dirty.push(id);
        self.deleted.push(id);
        self.points.retain(|p| p.0 != id);
    }

    pub fn lifecycle(
        &mut self,
        id: TwinId,
        born: DateTime<Utc>,
        version: u64,
        now: DateTime<Utc>,
        state: Lifecycle,
    ) {
        encode::lifecycle(&mut self.frame, &id, born, version, now, state);
        self.dirty.push(id);
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        encode::put(&mut self.frame, &key, &value);
        self.kv.push(KvOp::Put(key, value));
    }

    pub fn delete_key(&mut self, key: Vec<u8>) {
        encode::delete_key(&mut self.frame, &key);
        self.kv.push(KvOp::Delete(key));
    }

    /// Delete twin `id`'s history: its chunks of the older layout at the checkpoint, and a
    /// cut at `at` (written to sled once the frame is durable, before the delete is
    /// acknowledged) that hides its samples in history blocks from then on.
    pub fn delete_history(&mut self, id: &TwinId, at: chrono::DateTime<chrono::Utc>) {
        self.delete_prefix(super::keys::history_twin_prefix(id));
        let at = at.timestamp_micros().to_be_bytes().to_vec();
        self.config(KvOp::Put(super::keys::history_cut(id), at));
    }

    pub fn delete_prefix(&mut self, prefix: Vec<u8>) {
        encode::delete_prefix(&mut self.frame, &prefix);
        self.kv.push(KvOp::DeletePrefix(prefix));
    }

    /// A configuration change: logged in this frame like [`Batch::put`], and written to
    /// sled right after the frame is durable (not at the next checkpoint), so it can be read
    /// back as soon as the job is acknowledged. Replay after a crash applies it again.
    pub fn config(&mut self, op: KvOp) {
        match &op {
            KvOp::Put(k, v) => encode::put(&mut self.frame, k, v),
            KvOp::Delete(k) => encode::delete_key(&mut self.frame, k),
            KvOp::DeletePrefix(p) => encode::delete_prefix(&mut self.frame, p),
        }
        self.direct.push(op);
    }

    /// A history sample (derived from logged entries, so not logged itself).
    pub fn point(&mut self, id: TwinId, property: &str, ts_micros: i64, value: f64) {
        let name = match self.names.get(property) {
            Some(n) => n.clone(),
            None => {
                let n: Arc<str> = Arc::from(property);
                self.names.insert(property.into(), n.clone());
                n
            }
        };
        self.points.push((id, name, ts_micros, value));
    }

    /// Drop the samples this batch holds for a twin (replay of a delete).
    pub fn forget_points(&mut self, id: TwinId) {
        self.points.retain(|p| p.0 != id);
    }

    /// Mark a twin dirty without logging (state rebuilt by replay).
    pub fn mark_dirty(&mut self, id: TwinId) {
        self.dirty.push(id);
    }
}
