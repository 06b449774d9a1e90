//! Twins at rest (format 4): files of twin records under `<data-dir>/twins/`, written whole by
//! the checkpoint thread and listed by a manifest in sled.
//!
//! Each checkpoint writes one file holding the current record of every twin it covers (or a
//! "deleted" mark), fsyncs it, and only then commits the manifest that names it, in the same
//! sled batch as the checkpoint's marker. A file the manifest does not name is left over from
//! a crash and is removed on open. Reading at start goes through the files newest first: the
//! first record of a twin found is its current one.
//!
//! Why not one sled key per twin (formats 1-3): every checkpoint then inserted each dirty twin
//! into sled's tree, whose leaves hold 16 records and are copied on every insert; at a
//! million twins a checkpoint of the changed ones took ~100 µs per twin and a third of the
//! node's CPU, and a start read a million keys. Here a checkpoint is a sequential write.
//!
//! When the files hold more than twice the records the node has twins (plus
//! [`COMPACT_SLACK`]), or more than [`MAX_FILES`] files, the next checkpoint writes every twin
//! into one new file instead (a new generation), and the older files go once the manifest
//! naming only it is committed: disk use stays within about twice the live twins, and the
//! write amplification within two.
//!
//! File layout: `TWF1` magic, then records: `1` + 16-byte id + u32 LE length + the twin's
//! stored record (the compact form with names spelled out), or `2` + 16-byte id (deleted),
//! each followed by the u32 LE CRC-32 of the record; then `0xFF` + u64 LE record count +
//! u32 LE CRC-32 of everything before it. A record is checked before it is used.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::types::TwinId;

use super::StoreError;

/// The directory of the files, under the data directory.
pub const DIR: &str = "twins";
/// The extension of twin files.
pub const EXT: &str = ".twins";
const MAGIC: &[u8; 4] = b"TWF1";
const TWIN: u8 = 1;
const DELETED: u8 = 2;
const END: u8 = 0xFF;
/// Longest record read back (a twin's record is bounded far below this by the API's limits).
const MAX_RECORD: usize = 64 << 20;
/// Records beyond twice the twins a node holds before a checkpoint compacts.
pub const COMPACT_SLACK: u64 = 100_000;
/// Files at most before a checkpoint compacts (a small checkpoint every 2 s reaches this in
/// about an hour).
pub const MAX_FILES: usize = 2048;

/// The files the manifest names, oldest first, and what they hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    /// File names, oldest first.
    pub files: Vec<String>,
    /// Records in them (superseded ones included).
    pub records: u64,
    /// The generation of the newest compaction (its file starts the list).
    pub generation: u64,
    /// The number of the next file.
    pub next: u64,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.files.len() * 24);
        out.extend_from_slice(&self.records.to_be_bytes());
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&self.next.to_be_bytes());
        out.extend_from_slice(self.files.join("\n").as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, String> {
        if bytes.len() < 24 {
            return Err("a twin file manifest shorter than its header".into());
        }
        let n = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let names = std::str::from_utf8(&bytes[24..]).map_err(|e| e.to_string())?;
        Ok(Manifest {
            records: n(0),
            generation: n(8),
            next: n(16),
            files: names
                .split('\n')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }

    /// The manifest stored under `key` (empty when there is none).
    pub fn stored(db: &sled::Db, key: &[u8]) -> Result<Manifest, StoreError> {
        match db.get(key)? {
            Some(v) => Manifest::decode(&v).map_err(|reason| StoreError::Corrupt {
                key: String::from_utf8_lossy(key).into_owned(),
                reason,
            }),
            None => Ok(Manifest::default()),
        }
    }

    /// Whether the next checkpoint should write every twin into a new generation: the files
    /// hold more than twice the `twins` plus `slack` records, or too many files.
    pub fn wants_compaction(&self, twins: usize, slack: u64) -> bool {
        self.records > 2 * twins as u64 + slack || self.files.len() > MAX_FILES
    }

    /// The name of the next file (of generation `generation`).
    pub fn next_name(&self, generation: u64) -> String {
        format!("{generation:08}-{:012}{EXT}", self.next)
    }
}

/// Writes one file of twin records; [`FileWriter::finish`] makes it durable.
pub struct FileWriter {
    path: PathBuf,
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    records: u64,
}

impl FileWriter {
    pub fn create(dir: &Path, name: &str) -> Result<FileWriter, StoreError> {
        let path = dir.join(name);
        let file = File::create(&path).map_err(StoreError::io(format!(
            "creating the twin file {}",
            path.display()
        )))?;
        let mut w = FileWriter {
            path,
            out: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            records: 0,
        };
        w.write(MAGIC)?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.crc.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(StoreError::io(format!("writing {}", self.path.display())))
    }

    /// Add a twin's stored record, or (`None`) the mark that it was deleted.
    pub fn push(&mut self, id: &TwinId, record: Option<&[u8]>) -> Result<(), StoreError> {
        let mut head = [0u8; 21];
        head[0] = if record.is_some() { TWIN } else { DELETED };
        head[1..17].copy_from_slice(id.as_bytes());
        let head = match record {
            Some(r) => {
                head[17..].copy_from_slice(&(r.len() as u32).to_le_bytes());
                &head[..]
            }
            None => &head[..17],
        };
        let mut crc = crc32fast::Hasher::new();
        crc.update(head);
        crc.update(record.unwrap_or_default());
        self.write(head)?;
        if let Some(r) = record {
            self.write(r)?;
        }
        self.write(&crc.finalize().to_le_bytes())?;
        self.records += 1;
        Ok(())
    }

    /// Add the current record of each of `ids` that `source` still holds (a compaction, an
    /// upgrade: every twin).
    pub fn push_all(
        &mut self,
        source: &dyn super::StateSource,
        ids: impl IntoIterator<Item = TwinId>,
    ) -> Result<(), StoreError> {
        for id in ids {
            if let Some(rec) = source.twin_bytes(&id) {
                self.push(&id, Some(&rec))?;
            }
        }
        Ok(())
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// Write the trailer and fsync the file and its directory.
    pub fn finish(mut self) -> Result<u64, StoreError> {
        self.write(&[END])?;
        let records = self.records;
        self.write(&records.to_le_bytes())?;
        let crc = self.crc.clone().finalize();
        let what = format!("writing {}", self.path.display());
        self.out
            .write_all(&crc.to_le_bytes())
            .map_err(StoreError::io(what.clone()))?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| StoreError::io(what.clone())(e.into_error()))?;
        file.sync_all().map_err(StoreError::io(what.clone()))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(StoreError::io(what))?;
        }
        Ok(records)
    }

    /// Give up on the file (a failed checkpoint): remove it.
    pub fn abandon(self) {
        let path = self.path.clone();
        drop(self);
        let _ = std::fs::remove_file(path);
    }
}

/// Read one file, calling `f` with each record in file order (`None`: deleted). Checks the
/// trailer's count and checksum; returns the number of records.
pub fn read_file(
    path: &Path,
    mut f: impl FnMut(TwinId, Option<&[u8]>) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        key: path.display().to_string(),
        reason: reason.to_owned(),
    };
    let what = format!("reading the twin file {}", path.display());
    let file = File::open(path).map_err(StoreError::io(what.clone()))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut crc = crc32fast::Hasher::new();
    let mut read = |buf: &mut [u8], crc: &mut crc32fast::Hasher| -> Result<(), StoreError> {
        r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                corrupt("the file ends before its trailer")
            } else {
                StoreError::io(what.clone())(e)
            }
        })?;
        crc.update(buf);
        Ok(())
    };
    let mut magic = [0u8; 4];
    read(&mut magic, &mut crc)?;
    if &magic != MAGIC {
        return Err(corrupt("not a twin file"));
    }
    let mut records = 0u64;
    let mut record = Vec::new();
    loop {
        let mut tag = [0u8; 1];
        read(&mut tag, &mut crc)?;
        match tag[0] {
            TWIN | DELETED => {
                let mut own = crc32fast::Hasher::new();
                own.update(&tag);
                let mut id = [0u8; 16];
                read(&mut id, &mut crc)?;
                own.update(&id);
                let id = TwinId(uuid::Uuid::from_bytes(id));
                let twin = tag[0] == TWIN;
                if twin {
                    let mut len = [0u8; 4];
                    read(&mut len, &mut crc)?;
                    own.update(&len);
                    let len = u32::from_le_bytes(len) as usize;
                    if len > MAX_RECORD {
                        return Err(corrupt("a record longer than any twin"));
                    }
                    record.resize(len, 0);
                    read(&mut record, &mut crc)?;
                    own.update(&record);
                }
                let mut sum = [0u8; 4];
                read(&mut sum, &mut crc)?;
                if u32::from_le_bytes(sum) != own.finalize() {
                    return Err(corrupt(&format!(
                        "record {} (twin {id}) does not match its checksum",
                        records + 1
                    )));
                }
                f(id, twin.then_some(&record[..]))?;
                records += 1;
            }
            END => {
                let mut count = [0u8; 8];
                read(&mut count, &mut crc)?;
                let expected = crc.clone().finalize();
                let mut sum = [0u8; 4];
                read(&mut sum, &mut crc)?;
                if u64::from_le_bytes(count) != records || u32::from_le_bytes(sum) != expected {
                    return Err(corrupt("its trailer does not match its records"));
                }
                return Ok(records);
            }
            _ => return Err(corrupt("an unknown record tag")),
        }
    }
}

/// Remove the files of `dir` ending in `ext` that `keep` does not name (left over from a
/// crash or a compaction), ignoring other files.
pub fn remove_unlisted(dir: &Path, ext: &str, keep: &[String]) -> Result<usize, StoreError> {
    let what = format!("listing {}", dir.display());
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).map_err(StoreError::io(what.clone()))? {
        let entry = entry.map_err(StoreError::io(what.clone()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(ext) && !keep.contains(&name) {
            std::fs::remove_file(entry.path()).map_err(StoreError::io(format!(
                "removing {}",
                entry.path().display()
            )))?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> TwinId {
        TwinId(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn a_file_reads_back_its_records_in_order_and_checks_its_trailer() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = FileWriter::create(dir.path(), "a.twins").unwrap();
        w.push(&id(1), Some(b"one")).unwrap();
        w.push(&id(2), None).unwrap();
        w.push(&id(3), Some(&[7u8; 70_000])).unwrap();
        assert_eq!(w.finish().unwrap(), 3);
        let mut seen = Vec::new();
        let n = read_file(&dir.path().join("a.twins"), |id, r| {
            seen.push((id, r.map(<[u8]>::to_vec)));
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            seen,
            vec![
                (id(1), Some(b"one".to_vec())),
                (id(2), None),
                (id(3), Some(vec![7u8; 70_000]))
            ]
        );

        // A flipped byte in a record, in the trailer, or a cut file is refused.
        let path = dir.path().join("a.twins");
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[10] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let err = read_file(&path, |_, _| Ok(())).unwrap_err().to_string();
        assert!(err.contains("record 1 (twin"), "{err}");
        let mut bad = good.clone();
        let count_at = bad.len() - 12;
        bad[count_at] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let err = read_file(&path, |_, _| Ok(())).unwrap_err().to_string();
        assert!(err.contains("trailer does not match"), "{err}");
        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        let err = read_file(&path, |_, _| Ok(())).unwrap_err().to_string();
        assert!(err.contains("ends before its trailer"), "{err}");
    }

    #[test]
    fn the_manifest_round_trips_and_asks_for_compaction_past_twice_the_twins() {
        let mut m = Manifest {
            files: vec!["00000001-000000000001.twins".into()],
            records: 10,
            generation: 1,
            next: 2,
        };
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.next_name(1), "00000001-000000000002.twins");
        assert!(!m.wants_compaction(0, COMPACT_SLACK));
        assert!(m.wants_compaction(0, 0));
        m.records = 2 * 1_000_000 + COMPACT_SLACK;
        assert!(!m.wants_compaction(1_000_000, COMPACT_SLACK));
        m.records += 1;
        assert!(m.wants_compaction(1_000_000, COMPACT_SLACK));
        m.records = 0;
        m.files = vec![String::new(); MAX_FILES + 1];
        assert!(m.wants_compaction(1_000_000, COMPACT_SLACK));
        assert!(Manifest::decode(b"short").is_err());
    }

    #[test]
    fn unlisted_files_are_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["a.twins", "b.twins", "notes.txt"] {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        assert_eq!(
            remove_unlisted(dir.path(), EXT, &["a.twins".into()]).unwrap(),
            1
        );
        assert!(dir.path().join("a.twins").exists());
        assert!(!dir.path().join("b.twins").exists());
        assert!(dir.path().join("notes.txt").exists());
    }
}
