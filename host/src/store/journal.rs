//! The history journal: each checkpoint writes the history samples it covers into one file
//! under `<data-dir>/history/` (a twin file's layout: one record per twin holding its
//! samples), and the samples stay readable in memory ([`super::PendingHistory`]). Every
//! [`FOLD_EVERY`], or once [`FOLD_SAMPLES`] samples are journaled, a thread of its own folds
//! them into sled's history blocks ([`super::blocks`]: each twin's samples of the whole span
//! in one record, 256 twins per key) and drops the journal files. Checkpoints go on during a
//! fold (a fold of 5M samples took 77 s, and checkpoints waiting for it stopped every write at
//! 8M pending samples); they wait for it only past [`MAX_JOURNALED`] samples, which bounds
//! the memory the journal holds. A clean stop gives a fold in progress two seconds, then
//! leaves the rest in the journal.
//!
//! Why: a checkpoint used to insert one sled key per series it covered, and sled's cost is
//! per key (it copies a 16-entry leaf on each insert). A fleet of 100K twins with 2 numeric
//! properties updated continuously cost 200K inserts every 2 s, more than half of the
//! checkpoint thread. Folded every 30 s, a hot series costs one insert per 30 s instead of one
//! per checkpoint.
//!
//! Journal files are named by a manifest in sled ([`super::keys::META_HISTORY_FILES`]),
//! committed with the checkpoint marker; a file no manifest names is removed on open. A crash
//! during a fold leaves some series chunks written and the journal still named: the next fold
//! writes those samples again, and readers return identical samples once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::batch::{Sample, SeriesMap};
use super::twin_files::{self, FileWriter, Manifest};
use super::StoreError;
use crate::types::TwinId;

/// The directory of the journal files, under the data directory.
pub const DIR: &str = "history";
/// The extension of journal files.
pub const EXT: &str = ".history";
/// Journaled samples are folded into sled at least this often…
pub const FOLD_EVERY: Duration = Duration::from_secs(30);
/// …or once this many are journaled (they are held in memory until then: ~40 bytes each).
pub const FOLD_SAMPLES: usize = 4_000_000;
/// Checkpoints wait for the fold once this many samples are journaled and not folded yet
/// (the fold runs beside the checkpoints and may fall behind a burst of new twins).
pub const MAX_JOURNALED: usize = 2 * FOLD_SAMPLES;

/// The name of journal file number `n`.
pub fn name(n: u64) -> String {
    format!("{n:012}{EXT}")
}

/// Encode one twin's samples: repeated (u16 LE name length, name, i64 LE time in µs,
/// f64 LE value).
pub fn encode(samples: &[Sample], out: &mut Vec<u8>) {
    out.clear();
    for (name, ts, v) in samples {
        let n = name.as_bytes();
        let len = n.len().min(u16::MAX as usize);
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.extend_from_slice(&n[..len]);
        out.extend_from_slice(&ts.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Decode what [`encode`] wrote, with names shared through `names`.
fn decode(
    mut b: &[u8],
    names: &mut HashMap<String, Arc<str>>,
    out: &mut Vec<Sample>,
) -> Result<(), String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err("a history journal record ends early".into());
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    while !b.is_empty() {
        let len = u16::from_le_bytes(take(&mut b, 2)?.try_into().expect("2 bytes")) as usize;
        let name = std::str::from_utf8(take(&mut b, len)?).map_err(|e| e.to_string())?;
        let ts = i64::from_le_bytes(take(&mut b, 8)?.try_into().expect("8 bytes"));
        let v = f64::from_le_bytes(take(&mut b, 8)?.try_into().expect("8 bytes"));
        let name = match names.get(name) {
            Some(n) => n.clone(),
            None => {
                let n: Arc<str> = Arc::from(name);
                names.insert(name.to_owned(), n.clone());
                n
            }
        };
        out.push((name, ts, v));
    }
    Ok(())
}

/// Write the samples of `maps` (of twins `keep` accepts) into journal file `name` in `dir`;
/// `None` when there are none. The caller finishes the writer (fsync) before committing a
/// manifest that names it.
pub fn write(
    dir: &Path,
    name: &str,
    maps: &[Arc<SeriesMap>],
    keep: impl Fn(&TwinId) -> bool,
) -> Result<Option<(FileWriter, u64)>, StoreError> {
    if maps.iter().all(|m| m.is_empty()) {
        return Ok(None);
    }
    let mut w = FileWriter::create(dir, name)?;
    let mut buf = Vec::new();
    let mut samples = 0u64;
    let written = (|| {
        for map in maps {
            for (id, s) in map.iter() {
                if s.is_empty() || !keep(id) {
                    continue;
                }
                encode(s, &mut buf);
                w.push(id, Some(&buf))?;
                samples += s.len() as u64;
            }
        }
        Ok::<_, StoreError>(())
    })();
    if let Err(e) = written {
        w.abandon();
        return Err(e);
    }
    Ok(Some((w, samples)))
}

/// Read the journal files `manifest` names (removing unlisted ones first): their samples, one
/// map per file, oldest first, and how many samples.
pub fn read(dir: &Path, manifest: &Manifest) -> Result<(Vec<Arc<SeriesMap>>, usize), StoreError> {
    let removed = twin_files::remove_unlisted(dir, EXT, &manifest.files)?;
    if removed > 0 {
        tracing::info!(
            files = removed,
            "removed history journal files left over from an interrupted checkpoint"
        );
    }
    let mut names = HashMap::new();
    let mut maps = Vec::with_capacity(manifest.files.len());
    let mut total = 0;
    for file in &manifest.files {
        let path = dir.join(file);
        let mut map = SeriesMap::default();
        twin_files::read_file(&path, |id, record| {
            let entry = map.entry(id).or_default();
            let before = entry.len();
            decode(record.unwrap_or_default(), &mut names, entry).map_err(|reason| {
                StoreError::Corrupt {
                    key: format!("{} (twin {id})", path.display()),
                    reason,
                }
            })?;
            total += entry.len() - before;
            Ok(())
        })?;
        maps.push(Arc::new(map));
    }
    Ok((maps, total))
}

/// The twins with samples in `maps`, each once, in id order (the order of history blocks).
pub fn twins_in_order(maps: &[Arc<SeriesMap>]) -> Vec<TwinId> {
    let mut ids: Vec<TwinId> = maps.iter().flat_map(|m| m.keys().copied()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_file_reads_back_its_samples() {
        let dir = tempfile::tempdir().unwrap();
        let a = TwinId(uuid::Uuid::from_u128(1));
        let b = TwinId(uuid::Uuid::from_u128(2));
        let t: Arc<str> = Arc::from("temperature");
        let mut m = SeriesMap::default();
        m.insert(a, vec![(t.clone(), 10, 1.5), (Arc::from("rpm"), 11, -2.0)]);
        m.insert(b, vec![(t.clone(), 12, f64::MAX)]);
        let (w, n) = write(dir.path(), &name(1), &[Arc::new(m.clone())], |id| *id == a)
            .unwrap()
            .unwrap();
        assert_eq!(n, 2, "only the twins kept");
        w.finish().unwrap();
        let manifest = Manifest {
            files: vec![name(1)],
            ..Default::default()
        };
        std::fs::write(dir.path().join(name(2)), b"left over").unwrap();
        let (maps, total) = read(dir.path(), &manifest).unwrap();
        assert_eq!(total, 2);
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0][&a], m[&a]);
        assert!(!maps[0].contains_key(&b));
        assert!(!dir.path().join(name(2)).exists());
        assert_eq!(twins_in_order(&maps), vec![a]);
        assert!(write(dir.path(), &name(3), &[], |_| true)
            .unwrap()
            .is_none());
    }
}
