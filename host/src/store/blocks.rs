//! History blocks (store format 7): what a fold of the history journal writes into sled.
//!
//! A fold numbers itself (1, 2, …) and writes:
//! - its span, `i` + fold number → the first and last sample time in µs
//!   ([`super::keys::history_fold`]), before anything else, so retention finds even a fold a
//!   crash interrupted;
//! - blocks of up to [`BLOCK_TWINS`] twins in id order, `H` + fold number + the first twin's
//!   id → for each twin: its id, the length of its record, and the record: per series, the
//!   property name, the number of samples and the samples (time in µs, value), by time.
//!
//! Why: the fold used to write one sled key per series, and sled's memory and the time of each
//! insert grow with its keys. A fleet of 1M twins updated at 0.05 Hz wrote 2M keys per fold,
//! every 30 s: the node's RSS grew from 0.8 to 2.1 GB in 300 s and the folds took 73% of a core
//! (the same run with the folds' sled writes left out: flat at 0.6–0.95 GB, 48% CPU in all).
//! Blocks make that about 4K keys per fold.
//!
//! A read of one series looks in each fold whose span meets the time range: one sled lookup
//! for the block that would hold the twin (the last block whose first id is not above it).
//! Reads over long spans therefore cost a lookup per fold (a fold is at most every 30 s).

use super::batch::Sample;
use crate::types::TwinId;

/// Most twins in one block…
pub const BLOCK_TWINS: usize = 256;
/// …or about this many bytes, whichever comes first.
pub const BLOCK_BYTES: usize = 64 * 1024;

/// Encode one twin's samples, sorted by (name, time), as a block record: per series, u16 LE
/// name length, name, u32 LE count, then (i64 LE time, f64 LE value) each.
pub fn encode_record(samples: &[&Sample], out: &mut Vec<u8>) {
    for group in samples.chunk_by(|a, b| a.0 == b.0) {
        let name = group[0].0.as_bytes();
        let len = name.len().min(u16::MAX as usize);
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.extend_from_slice(&name[..len]);
        out.extend_from_slice(&(group.len() as u32).to_le_bytes());
        for (_, ts, v) in group {
            out.extend_from_slice(&ts.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Builds one block at a time.
#[derive(Default)]
pub struct BlockWriter {
    first: Option<TwinId>,
    twins: usize,
    buf: Vec<u8>,
    record: Vec<u8>,
}

impl BlockWriter {
    /// Add twin `id` (above every twin added before) with its samples sorted by (name, time).
    pub fn push(&mut self, id: &TwinId, samples: &[&Sample]) {
        self.record.clear();
        encode_record(samples, &mut self.record);
        self.first.get_or_insert(*id);
        self.twins += 1;
        self.buf.extend_from_slice(id.as_bytes());
        self.buf
            .extend_from_slice(&(self.record.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&self.record);
    }

    /// Whether the block is as big as blocks get.
    pub fn full(&self) -> bool {
        self.twins >= BLOCK_TWINS || self.buf.len() >= BLOCK_BYTES
    }

    /// The block so far (its first twin and its bytes), leaving the writer empty.
    pub fn take(&mut self) -> Option<(TwinId, Vec<u8>)> {
        self.twins = 0;
        let first = self.first.take()?;
        Some((first, std::mem::take(&mut self.buf)))
    }
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if b.len() < n {
        return Err("a history block ends early".into());
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

/// The record of twin `id` in `block`, if it holds one.
pub fn find<'a>(mut block: &'a [u8], id: &TwinId) -> Result<Option<&'a [u8]>, String> {
    while !block.is_empty() {
        let this = take(&mut block, 16)?;
        let len = u32::from_le_bytes(take(&mut block, 4)?.try_into().expect("4 bytes")) as usize;
        let record = take(&mut block, len)?;
        match this.cmp(id.as_bytes().as_slice()) {
            std::cmp::Ordering::Less => continue,
            std::cmp::Ordering::Equal => return Ok(Some(record)),
            // Twins are in id order: it is not in this block.
            std::cmp::Ordering::Greater => return Ok(None),
        }
    }
    Ok(None)
}

/// Call `f` with (time, value) of each sample of series `property` in `record`.
pub fn samples_of(
    mut record: &[u8],
    property: &str,
    mut f: impl FnMut(i64, f64),
) -> Result<(), String> {
    while !record.is_empty() {
        let len = u16::from_le_bytes(take(&mut record, 2)?.try_into().expect("2 bytes")) as usize;
        let name = take(&mut record, len)?;
        let n = u32::from_le_bytes(take(&mut record, 4)?.try_into().expect("4 bytes")) as usize;
        let points = take(&mut record, n.checked_mul(16).ok_or("a series too long")?)?;
        if name == property.as_bytes() {
            for c in points.chunks_exact(16) {
                let ts = i64::from_le_bytes(c[..8].try_into().expect("chunk of 16"));
                let v = f64::from_le_bytes(c[8..].try_into().expect("chunk of 16"));
                f(ts, v);
            }
        }
    }
    Ok(())
}

/// A fold's span as stored: first and last sample time in µs.
pub fn encode_span((first, last): (i64, i64)) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&first.to_be_bytes());
    out[8..].copy_from_slice(&last.to_be_bytes());
    out
}

/// What [`encode_span`] wrote.
pub fn decode_span(b: &[u8]) -> Option<(i64, i64)> {
    let first = i64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    let last = i64::from_be_bytes(b.get(8..16)?.try_into().ok()?);
    Some((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_block_finds_each_twin_and_reads_one_series() {
        let (t, r): (Arc<str>, Arc<str>) = (Arc::from("temperature"), Arc::from("rpm"));
        let mut ids: Vec<TwinId> = (0..5).map(|_| TwinId::new_v7()).collect();
        ids.sort();
        let mut w = BlockWriter::default();
        let samples: Vec<Vec<Sample>> = (0..4)
            .map(|i| {
                vec![
                    (r.clone(), 5, -1.0),
                    (t.clone(), 10, i as f64),
                    (t.clone(), 20, i as f64 + 0.5),
                ]
            })
            .collect();
        // Twins 0..4, not the last one.
        for (id, s) in ids.iter().zip(&samples) {
            w.push(id, &s.iter().collect::<Vec<_>>());
        }
        assert!(!w.full());
        let (first, block) = w.take().unwrap();
        assert_eq!(first, ids[0]);
        assert!(w.take().is_none(), "empty once taken");
        for (i, id) in ids.iter().enumerate().take(4) {
            let rec = find(&block, id).unwrap().expect("held");
            let mut got = Vec::new();
            samples_of(rec, "temperature", |ts, v| got.push((ts, v))).unwrap();
            assert_eq!(got, vec![(10, i as f64), (20, i as f64 + 0.5)]);
            let mut rpm = Vec::new();
            samples_of(rec, "rpm", |ts, v| rpm.push((ts, v))).unwrap();
            assert_eq!(rpm, vec![(5, -1.0)]);
            let mut none = 0;
            samples_of(rec, "temp", |_, _| none += 1).unwrap();
            assert_eq!(
                none, 0,
                "a name that is a prefix of another's is its own series"
            );
        }
        assert_eq!(find(&block, &ids[4]).unwrap(), None);
        assert!(
            find(&block[..block.len() - 3], &ids[3]).is_err(),
            "cut short"
        );
        assert_eq!(decode_span(&encode_span((-7, 9))), Some((-7, 9)));
    }

    #[test]
    fn a_block_is_full_at_its_twin_count_or_size() {
        let t: Arc<str> = Arc::from("t");
        let one = [(t.clone(), 1, 1.0)];
        let one: Vec<&Sample> = one.iter().collect();
        let mut w = BlockWriter::default();
        for _ in 0..BLOCK_TWINS - 1 {
            w.push(&TwinId::new_v7(), &one);
        }
        assert!(!w.full());
        w.push(&TwinId::new_v7(), &one);
        assert!(w.full());
        w.take();
        let many: Vec<Sample> = (0..BLOCK_BYTES as i64 / 16)
            .map(|i| (t.clone(), i, 0.0))
            .collect();
        w.push(&TwinId::new_v7(), &many.iter().collect::<Vec<_>>());
        assert!(w.full(), "one twin of many samples fills a block");
    }
}
