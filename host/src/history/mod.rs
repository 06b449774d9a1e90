//! Time-series history of numeric twin properties.
//!
//! Owns: reading history — sled's chunks (one packed chunk per series per checkpoint, keyed
//! by series then time, written by the store's checkpoint thread) merged with the samples not
//! yet checkpointed — with optional bucketing, and the retention sweep.
//! Exposes: [`History`]. Must never: write twin state; samples are recorded by the registry's
//! write path alongside the change they come from.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::{keys, Store, StoreError};
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
        let mut out: Vec<(i64, f64)> = self.store.pending_history().lock().samples(*id, property);
        out.retain(|(t, _)| *t >= lo && *t <= hi);
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
        let mut removed = 0u64;
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
}
