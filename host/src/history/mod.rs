//! Time-series history of numeric twin properties.
//!
//! Owns: reading history — sled's history blocks (a record per twin per fold of the history
//! journal, see `store::blocks`), the older layout's chunks (one per series per fold, formats
//! 1-6) and the samples not folded yet, merged — with optional bucketing, and the retention
//! sweep.
//! Exposes: [`History`]. Must never: write twin state; samples are recorded by the registry's
//! write path alongside the change they come from.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::{blocks, keys, Store, StoreError};
use crate::types::TwinId;

/// Retention of history: a bound on age and on points per series, so it cannot grow without
/// limit. Enforced by [`History::sweep`], which `serve` runs periodically.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub max_age: Duration,
    pub max_points_per_series: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_points_per_series: 100_000,
        }
    }
}

/// Most points one history read returns (raw points; buckets are bounded by the same number).
pub const MAX_POINTS_PER_READ: usize = 100_000;

/// One stored sample.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, ToSchema)]
pub struct Sample {
    pub ts: DateTime<Utc>,
    pub value: f64,
}

/// An aggregate over one `step`-long bucket.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, ToSchema)]
pub struct Bucket {
    /// Start of the bucket.
    pub ts: DateTime<Utc>,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
}

/// Reads and maintenance of history.
#[derive(Clone)]
pub struct History {
    store: Store,
    retention: Retention,
}

fn decode_chunk(v: &[u8]) -> impl Iterator<Item = (i64, f64)> + '_ {
    v.chunks_exact(16).map(|c| {
        let ts = i64::from_le_bytes(c[..8].try_into().expect("chunk of 16"));
        let val = f64::from_le_bytes(c[8..].try_into().expect("chunk of 16"));
        (ts, val)
    })
}

fn micros_to_time(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us).single().unwrap_or_default()
}

impl History {
    pub fn new(store: Store, retention: Retention) -> Self {
        History { store, retention }
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Samples of one series in `[from, to]`, ordered by time, at most [`MAX_POINTS_PER_READ`]
    /// (the newest ones are kept when there are more). Identical (time, value) samples are
    /// returned once.
    pub fn points(
        &self,
        id: &TwinId,
        property: &str,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<Sample>, StoreError> {
        let lo = from.map(|t| t.timestamp_micros()).unwrap_or(i64::MIN);
        let hi = to.map(|t| t.timestamp_micros()).unwrap_or(i64::MAX);
        let prefix = keys::history_series(id, property);
        // Samples still waiting for a checkpoint, read before sled: a checkpoint finishing
        // between the two reads then shows a sample twice (merged below), never not at all.
        let (mut out, folds) = {
            let p = self.store.pending_history().lock();
            (p.samples(*id, property), p.folds_within(lo, hi))
        };
        out.retain(|(t, _)| *t >= lo && *t <= hi);
        // History blocks: in each fold that may hold samples in range, the block that would
        // hold this twin (the last one starting at or below its id), after its cut (a twin
        // deleted before with the same id).
        let cut =
            match self.store.get(&keys::history_cut(id))? {
                Some(v) => v.as_ref().try_into().map(i64::from_be_bytes).map_err(|_| {
                    StoreError::Corrupt {
                        key: format!("history cut of {id}"),
                        reason: "not 8 bytes".into(),
                    }
                })?,
                None => i64::MIN,
            };
        let lo_blocks = lo.max(cut.saturating_add(1));
        let folds = if lo_blocks > hi { Vec::new() } else { folds };
        for fold in folds {
            let start = keys::history_fold_blocks(fold);
            let mut end = keys::history_block(fold, id);
            end.push(0);
            let Some(kv) = self.store.range(&start, &end).next_back() else {
                continue;
            };
            let (k, block) = kv?;
            let corrupt = |reason: String| StoreError::Corrupt {
                key: format!("history block {k:?}"),
                reason,
            };
            if let Some(record) = blocks::find(&block, id).map_err(corrupt)? {
                blocks::samples_of(record, property, |t, v| {
                    if t >= lo_blocks && t <= hi {
                        out.push((t, v));
                    }
                })
                .map_err(corrupt)?;
            }
        }
        // Chunks are keyed by their first sample, so a chunk that starts after `hi` holds
        // nothing in range; earlier chunks may still reach into it.
        let mut end = prefix.clone();
        end.extend_from_slice(&keys::ts_bytes(hi.saturating_add(1)));
        for kv in self.store.range(&prefix, &end) {
            let (_, v) = kv?;
            out.extend(decode_chunk(&v).filter(|(t, _)| *t >= lo && *t <= hi));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        out.dedup();
        // Keep the newest samples when there are more than one read returns.
        if out.len() > MAX_POINTS_PER_READ {
            out.drain(..out.len() - MAX_POINTS_PER_READ);
        }
        Ok(out
            .into_iter()
            .map(|(t, value)| Sample {
                ts: micros_to_time(t),
                value,
            })
            .collect())
    }

    /// Samples aggregated into `step`-long buckets aligned to the Unix epoch; empty buckets
    /// are omitted.
    pub fn buckets(
        &self,
        id: &TwinId,
        property: &str,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        step: Duration,
    ) -> Result<Vec<Bucket>, StoreError> {
        let step_us = (step.as_micros() as i64).max(1);
        let mut out: Vec<Bucket> = Vec::new();
        let mut cur: Option<(i64, u64, f64, f64, f64)> = None;
        for s in self.points(id, property, from, to)? {
            let t = s.ts.timestamp_micros();
            let start = t.div_euclid(step_us) * step_us;
            match &mut cur {
                Some((b, n, mn, mx, sum)) if *b == start => {
                    *n += 1;
                    *mn = mn.min(s.value);
                    *mx = mx.max(s.value);
                    *sum += s.value;
                }
                _ => {
                    if let Some(done) = cur.take() {
                        out.push(bucket(done));
                    }
                    cur = Some((start, 1, s.value, s.value, s.value));
                }
            }
        }
        if let Some(done) = cur {
            out.push(bucket(done));
        }
        Ok(out)
    }

    /// Enforce retention: drop chunks whose newest sample is older than `max_age`, and the
    /// oldest chunks of any series holding more than `max_points_per_series`. Returns how many
    /// chunks were removed.
    pub fn sweep(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let cutoff = now.timestamp_micros() - self.retention.max_age.as_micros() as i64;
        let mut removed = self.sweep_folds(cutoff)?;
        let mut doomed = Vec::new();
        // Walk series by series (keys sort by series, then time).
        let mut series: Option<Vec<u8>> = None;
        let mut chunks: Vec<(sled::IVec, u64, i64)> = Vec::new();
        let flush = |chunks: &mut Vec<(sled::IVec, u64, i64)>, doomed: &mut Vec<sled::IVec>| {
            let total: u64 = chunks.iter().map(|c| c.1).sum();
            let mut excess = total.saturating_sub(self.retention.max_points_per_series);
            for (k, n, newest) in chunks.drain(..) {
                if newest < cutoff || excess > 0 {
                    excess = excess.saturating_sub(n);
                    doomed.push(k);
                }
            }
        };
        for kv in self.store.scan_prefix(&[keys::HISTORY]) {
            let (k, v) = kv?;
            let series_len = k.len().saturating_sub(16);
            let this = &k[..series_len];
            if series.as_deref() != Some(this) {
                flush(&mut chunks, &mut doomed);
                series = Some(this.to_vec());
            }
            let newest = decode_chunk(&v).map(|p| p.0).max().unwrap_or(i64::MIN);
            chunks.push((k.clone(), (v.len() / 16) as u64, newest));
            if doomed.len() >= 10_000 {
                removed += doomed.len() as u64;
                self.store.remove_keys(doomed.drain(..))?;
            }
        }
        flush(&mut chunks, &mut doomed);
        removed += doomed.len() as u64;
        self.store.remove_keys(doomed)?;
        Ok(removed)
    }
}

impl History {
    /// Retention of history blocks: a fold whose newest sample is older than `cutoff` goes
    /// whole (its blocks, then its span). Returns how many blocks were removed. The bound on
    /// points per series applies to the older layout's chunks only: a block holds a fold's
    /// samples of many series, so the age bound is what limits them.
    fn sweep_folds(&self, cutoff: i64) -> Result<u64, StoreError> {
        let mut removed = 0u64;
        let old: Vec<u64> = {
            let p = self.store.pending_history().lock();
            p.folds
                .iter()
                .filter(|(_, (_, last))| *last < cutoff)
                .map(|(n, _)| *n)
                .collect()
        };
        for n in old {
            // Its blocks go in batches, then its span, and only then is it forgotten: a sweep
            // stopped half way finds it again (readers meanwhile see what is left of it).
            let mut doomed = Vec::new();
            for kv in self.store.scan_prefix(&keys::history_fold_blocks(n)) {
                doomed.push(kv?.0);
                if doomed.len() >= 10_000 {
                    removed += doomed.len() as u64;
                    self.store.remove_keys(doomed.drain(..))?;
                }
            }
            removed += doomed.len() as u64;
            doomed.push(keys::history_fold(n).into());
            self.store.remove_keys(doomed)?;
            self.store.pending_history().lock().forget_fold(n);
        }
        // A cut older than every fold left hides nothing any more. One newer than the age
        // bound is kept in any case: a fold may be about to write the samples it hides.
        let oldest = self
            .store
            .pending_history()
            .lock()
            .folds
            .values()
            .map(|(first, _)| *first)
            .min()
            .unwrap_or(i64::MAX);
        let mut cuts = Vec::new();
        for kv in self.store.scan_prefix(&[keys::HISTORY_CUT]) {
            let (k, v) = kv?;
            let at = v
                .as_ref()
                .try_into()
                .map(i64::from_be_bytes)
                .unwrap_or(i64::MAX);
            if at < oldest.min(cutoff) {
                cuts.push(k);
            }
        }
        self.store.remove_keys(cuts)?;
        Ok(removed)
    }
}

fn bucket((start, n, mn, mx, sum): (i64, u64, f64, f64, f64)) -> Bucket {
    Bucket {
        ts: micros_to_time(start),
        count: n,
        min: mn,
        max: mx,
        avg: sum / n as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Write one chunk of `n` samples starting at `t0` (µs), one per second.
    fn chunk(store: &Store, id: &TwinId, prop: &str, t0: i64, n: usize, seq: u64) {
        let mut key = keys::history_series(id, prop);
        key.extend_from_slice(&keys::ts_bytes(t0));
        key.extend_from_slice(&seq.to_be_bytes());
        let mut val = Vec::new();
        for i in 0..n {
            val.extend_from_slice(&(t0 + i as i64 * 1_000_000).to_le_bytes());
            val.extend_from_slice(&(i as f64).to_le_bytes());
        }
        store.put_durable(&key, &val).unwrap();
    }

    #[test]
    fn sweep_enforces_age_and_points_per_series() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = Utc::now();
        let us = now.timestamp_micros();
        let hour = 3_600_000_000i64;
        let (a, b) = (TwinId::new_v7(), TwinId::new_v7());
        // Series a: one chunk two days old, three recent chunks of 10 points.
        chunk(&store, &a, "t", us - 48 * hour, 10, 1);
        for (i, seq) in (2..5).enumerate() {
            chunk(&store, &a, "t", us - (3 - i as i64) * hour, 10, seq);
        }
        // Series b: recent and small, untouched.
        chunk(&store, &b, "t", us - hour, 5, 9);
        let h = History::new(
            store,
            Retention {
                max_age: Duration::from_secs(24 * 3600),
                max_points_per_series: 15,
            },
        );
        assert_eq!(h.points(&a, "t", None, None).unwrap().len(), 40);
        // The old chunk goes by age; of the 30 recent points, the oldest chunks go until at
        // most 15 remain (whole chunks: 10 are kept).
        assert_eq!(h.sweep(now).unwrap(), 3);
        let left = h.points(&a, "t", None, None).unwrap();
        assert_eq!(left.len(), 10);
        assert!(left[0].ts.timestamp_micros() >= us - hour);
        assert_eq!(h.points(&b, "t", None, None).unwrap().len(), 5);
        // Buckets over what is left: one per hour-aligned step.
        let buckets = h
            .buckets(&a, "t", None, None, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 10);
        assert_eq!(buckets[0].min, 0.0);
        assert_eq!(buckets.last().unwrap().max, 9.0);
    }

    /// History blocks and the older layout's chunks are read together; a fold's blocks go
    /// whole once its newest sample is past the age bound.
    #[test]
    fn blocks_and_older_chunks_read_together_and_old_folds_are_swept() {
        use crate::store::blocks::{encode_span, BlockWriter};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now();
        let us = now.timestamp_micros();
        let hour = 3_600_000_000i64;
        let t: Arc<str> = Arc::from("t");
        let mut ids: Vec<TwinId> = (0..600).map(|_| TwinId::new_v7()).collect();
        ids.sort();
        let (a, b) = (ids[0], ids[599]);
        {
            let store = Store::open(dir.path()).unwrap();
            // The older layout: a chunk of a, 3 hours old.
            chunk(&store, &a, "t", us - 3 * hour, 2, 1);
            // Fold 1, two days old, and fold 2, an hour old: 600 twins in 3 blocks each.
            for (fold, at) in [(1u64, us - 48 * hour), (2, us - hour)] {
                let mut w = BlockWriter::default();
                let mut keys_written = 0;
                for (i, id) in ids.iter().enumerate() {
                    let s = [(t.clone(), at, i as f64), (t.clone(), at + 1, -(i as f64))];
                    w.push(id, &s.iter().collect::<Vec<_>>());
                    if w.full() || i == ids.len() - 1 {
                        let (first, bytes) = w.take().unwrap();
                        store
                            .put_durable(&keys::history_block(fold, &first), &bytes)
                            .unwrap();
                        keys_written += 1;
                    }
                }
                assert_eq!(keys_written, 3);
                store
                    .put_durable(&keys::history_fold(fold), &encode_span((at, at + 1)))
                    .unwrap();
            }
            // Twin 2 was deleted (and its id used again) at fold 2's first sample; twin 3 long
            // before every fold.
            // Twin 4 two hours ago: older than every fold the sweep leaves, but within the
            // age bound, so kept.
            for (i, at) in [(2, us - hour), (3, us - 72 * hour), (4, us - 2 * hour)] {
                store
                    .put_durable(&keys::history_cut(&ids[i]), &at.to_be_bytes())
                    .unwrap();
            }
        }
        // Reopened (once the first handle's threads have let go of the directory: sled's
        // lock outlives the handle by a moment): the folds are known from their spans.
        let store = (0..500)
            .find_map(|_| {
                Store::open(dir.path()).ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    None
                })
            })
            .expect("the store stays locked");
        let h = History::new(store, Retention::default());
        let values = |id: &TwinId, from: Option<i64>| -> Vec<f64> {
            h.points(id, "t", from.map(micros_to_time), None)
                .unwrap()
                .iter()
                .map(|s| s.value)
                .collect()
        };
        // a: fold 1, the older chunk, fold 2 (in time order); b: the last twin of a block.
        assert_eq!(values(&a, None), vec![0.0, -0.0, 0.0, 1.0, 0.0, -0.0]);
        assert_eq!(values(&b, None), vec![599.0, -599.0, 599.0, -599.0]);
        assert_eq!(values(&ids[300], Some(us - 2 * hour)), vec![300.0, -300.0]);
        assert!(
            values(&TwinId::new_v7(), None).is_empty(),
            "a twin no block holds"
        );
        assert!(h.points(&a, "other", None, None).unwrap().is_empty());
        assert_eq!(
            values(&ids[2], None),
            vec![-2.0],
            "only what follows its cut"
        );
        assert_eq!(values(&ids[3], None), vec![3.0, -3.0, 3.0, -3.0]);
        assert_eq!(values(&ids[4], None), vec![4.0, -4.0]);
        // A day's retention: fold 1's three blocks go, the rest stays.
        let h = History::new(
            h.store.clone(),
            Retention {
                max_age: Duration::from_secs(24 * 3600),
                max_points_per_series: 100,
            },
        );
        assert_eq!(h.sweep(now).unwrap(), 3);
        assert_eq!(values(&a, None), vec![0.0, 1.0, 0.0, -0.0]);
        assert_eq!(values(&b, None), vec![599.0, -599.0]);
        assert_eq!(h.store.scan_prefix(&[keys::HISTORY_FOLD]).count(), 1);
        // The cut older than every fold left and the age bound is gone; the others stay.
        assert_eq!(h.store.scan_prefix(&[keys::HISTORY_CUT]).count(), 2);
        assert_eq!(values(&ids[4], None), vec![4.0, -4.0]);
        assert_eq!(values(&ids[2], None), vec![-2.0]);
    }
}
