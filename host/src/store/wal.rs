//! The write-ahead log: numbered segment files of checksummed frames, one frame per group
//! commit.
//!
//! A frame is `len: u32 LE | crc32(payload): u32 LE | payload`; the payload is a sequence of
//! [`Entry`]s. Reading stops at the first short or corrupt frame (a write torn by a crash,
//! never acknowledged) and truncates the segment there, so later appends start clean.
//! Segments are named `<number>.wal` (20 digits) and deleted once a checkpoint has made
//! everything in them durable in sled.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeZone, Utc};

use crate::types::{compact, Cause, Lifecycle, Properties, Twin, TwinId};

/// The place of a committed change in the node's order: its change number, its HLC, and who
/// made it when it was a behavior or a rule. Logged right before the entry it numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stamp {
    pub lseq: u64,
    pub hlc: u64,
    pub cause: Option<Cause>,
}

/// One logged operation, replayed in order on restart.
#[derive(Debug)]
pub enum Entry {
    /// A merge patch that produced `version`.
    Update {
        id: TwinId,
        /// `created_at` of the twin the update was for: an id deleted and created again is
        /// another twin, and replay must not apply one's updates to the other.
        born: DateTime<Utc>,
        version: u64,
        now: DateTime<Utc>,
        ts: DateTime<Utc>,
        patch: Properties,
    },
    /// A new twin, in full.
    Create(Box<Twin>),
    Delete(TwinId),
    Lifecycle {
        id: TwinId,
        born: DateTime<Utc>,
        version: u64,
        now: DateTime<Utc>,
        state: Lifecycle,
    },
    Put(Vec<u8>, Vec<u8>),
    DeleteKey(Vec<u8>),
    DeletePrefix(Vec<u8>),
    /// The stamp of the entry that follows (format 2).
    Stamp(Stamp),
    /// An alert raised by a rule or behavior, numbered like a change: the registry's
    /// serialized record (format 2).
    Alert {
        stamp: Stamp,
        record: Vec<u8>,
    },
    /// A twin's whole state after a change made elsewhere was merged in (format 2).
    State(Box<Twin>),
}

const T_UPDATE: u8 = b'U';
const T_CREATE: u8 = b'C';
const T_DELETE: u8 = b'D';
const T_LIFECYCLE: u8 = b'L';
const T_PUT: u8 = b'P';
const T_DELETE_KEY: u8 = b'X';
const T_DELETE_PREFIX: u8 = b'Z';
const T_STAMP: u8 = b'S';
const T_ALERT: u8 = b'A';
const T_STATE: u8 = b'T';
/// Format 5: a create and a state carry the twin's id and its compact form (names spelled
/// out) instead of JSON, which was most of the writer's time for bulk creates and merges.
/// `T_CREATE` and `T_STATE` (JSON) are still read: a format-4 log tail replays.
const T_CREATE_COMPACT: u8 = b'c';
const T_STATE_COMPACT: u8 = b't';

fn micros(t: DateTime<Utc>) -> [u8; 8] {
    t.timestamp_micros().to_le_bytes()
}

/// Change times keep full precision (they are served back as `updated_at`); the
/// nanosecond range ends in 2262, so the server's own clock always fits.
fn nanos(t: DateTime<Utc>) -> [u8; 8] {
    t.timestamp_nanos_opt().unwrap_or(i64::MAX).to_le_bytes()
}

fn lifecycle_byte(l: Lifecycle) -> u8 {
    match l {
        Lifecycle::Active => 0,
        Lifecycle::Suspended => 1,
        Lifecycle::Retired => 2,
    }
}

/// Append-only encoders for the entries of one frame.
pub mod encode {
    use super::*;

    fn bytes(buf: &mut Vec<u8>, b: &[u8]) {
        buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
        buf.extend_from_slice(b);
    }

    pub fn update(
        buf: &mut Vec<u8>,
        id: &TwinId,
        born: DateTime<Utc>,
        version: u64,
        now: DateTime<Utc>,
        ts: DateTime<Utc>,
        patch: &Properties,
    ) {
        buf.push(T_UPDATE);
        buf.extend_from_slice(id.as_bytes());
        buf.extend_from_slice(&nanos(born));
        buf.extend_from_slice(&version.to_le_bytes());
        buf.extend_from_slice(&nanos(now));
        buf.extend_from_slice(&micros(ts));
        let len_at = buf.len();
        buf.extend_from_slice(&[0; 4]);
        serde_json::to_writer(&mut *buf, patch).expect("writing JSON to a Vec cannot fail");
        let len = (buf.len() - len_at - 4) as u32;
        buf[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
    }

    pub fn create(buf: &mut Vec<u8>, twin: &Twin) {
        buf.push(T_CREATE_COMPACT);
        record(buf, twin);
    }

    pub fn state(buf: &mut Vec<u8>, twin: &Twin) {
        buf.push(T_STATE_COMPACT);
        record(buf, twin);
    }

    /// A twin's id, then its compact form (names spelled out) with its length before it,
    /// written in place.
    fn record(buf: &mut Vec<u8>, twin: &Twin) {
        buf.extend_from_slice(twin.id.as_bytes());
        let len_at = buf.len();
        buf.extend_from_slice(&[0; 4]);
        compact::encode_into(twin, buf, compact::Names::Inline);
        let len = (buf.len() - len_at - 4) as u32;
        buf[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
    }

    pub fn delete(buf: &mut Vec<u8>, id: &TwinId) {
        buf.push(T_DELETE);
        buf.extend_from_slice(id.as_bytes());
    }

    pub fn lifecycle(
        buf: &mut Vec<u8>,
        id: &TwinId,
        born: DateTime<Utc>,
        version: u64,
        now: DateTime<Utc>,
        state: Lifecycle,
    ) {
        buf.push(T_LIFECYCLE);
        buf.extend_from_slice(id.as_bytes());
        buf.extend_from_slice(&nanos(born));
        buf.extend_from_slice(&version.to_le_bytes());
        buf.extend_from_slice(&nanos(now));
        buf.push(lifecycle_byte(state));
    }

    pub fn put(buf: &mut Vec<u8>, k: &[u8], v: &[u8]) {
        buf.push(T_PUT);
        bytes(buf, k);
        bytes(buf, v);
    }

    pub fn delete_key(buf: &mut Vec<u8>, k: &[u8]) {
        buf.push(T_DELETE_KEY);
        bytes(buf, k);
    }

    pub fn delete_prefix(buf: &mut Vec<u8>, p: &[u8]) {
        buf.push(T_DELETE_PREFIX);
        bytes(buf, p);
    }

    fn stamp_fields(buf: &mut Vec<u8>, s: &Stamp) {
        buf.extend_from_slice(&s.lseq.to_le_bytes());
        buf.extend_from_slice(&s.hlc.to_le_bytes());
        match &s.cause {
            Some(c) => {
                buf.push(c.depth);
                bytes(buf, c.by.to_string().as_bytes());
            }
            None => {
                buf.push(0);
                bytes(buf, b"");
            }
        }
    }

    pub fn stamp(buf: &mut Vec<u8>, s: &Stamp) {
        buf.push(T_STAMP);
        stamp_fields(buf, s);
    }

    pub fn alert(buf: &mut Vec<u8>, s: &Stamp, record: &[u8]) {
        buf.push(T_ALERT);
        stamp_fields(buf, s);
        bytes(buf, record);
    }
}

/// A cursor over one frame's payload.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn time(&mut self) -> Option<DateTime<Utc>> {
        let us = i64::from_le_bytes(self.take(8)?.try_into().ok()?);
        Utc.timestamp_micros(us).single()
    }
    fn time_nanos(&mut self) -> Option<DateTime<Utc>> {
        Some(Utc.timestamp_nanos(i64::from_le_bytes(self.take(8)?.try_into().ok()?)))
    }
    fn id(&mut self) -> Option<TwinId> {
        uuid::Uuid::from_slice(self.take(16)?).ok().map(TwinId)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(n)
    }
    /// A twin as [`encode::create`] writes it: its id, then its compact form.
    fn twin(&mut self) -> Option<Twin> {
        let id = self.id()?;
        compact::decode(id, self.bytes()?).ok()
    }

    fn stamp(&mut self) -> Option<Stamp> {
        let lseq = self.u64()?;
        let hlc = self.u64()?;
        let depth = self.u8()?;
        let by = std::str::from_utf8(self.bytes()?).ok()?;
        // Empty: a client's change. An actor this build does not know cannot come from a
        // log it wrote; such an entry is unreadable.
        let cause = match by {
            "" => None,
            by => Some(Cause {
                by: by.parse().ok()?,
                depth,
            }),
        };
        Some(Stamp { lseq, hlc, cause })
    }
}

/// Decode a frame's entries; `None` if the payload is malformed.
fn decode(payload: &[u8], out: &mut Vec<Entry>) -> Option<()> {
    let mut c = Cur(payload);
    while !c.0.is_empty() {
        let e = match c.u8()? {
            T_UPDATE => Entry::Update {
                id: c.id()?,
                born: c.time_nanos()?,
                version: c.u64()?,
                now: c.time_nanos()?,
                ts: c.time()?,
                patch: from_slice_unbounded(c.bytes()?).ok()?,
            },
            T_CREATE_COMPACT => Entry::Create(Box::new(c.twin()?)),
            T_STATE_COMPACT => Entry::State(Box::new(c.twin()?)),
            T_CREATE => Entry::Create(Box::new(from_slice_unbounded(c.bytes()?).ok()?)),
            T_STATE => Entry::State(Box::new(from_slice_unbounded(c.bytes()?).ok()?)),
            T_DELETE => Entry::Delete(c.id()?),
            T_LIFECYCLE => Entry::Lifecycle {
                id: c.id()?,
                born: c.time_nanos()?,
                version: c.u64()?,
                now: c.time_nanos()?,
                state: match c.u8()? {
                    0 => Lifecycle::Active,
                    1 => Lifecycle::Suspended,
                    2 => Lifecycle::Retired,
                    _ => return None,
                },
            },
            T_PUT => Entry::Put(c.bytes()?.to_vec(), c.bytes()?.to_vec()),
            T_DELETE_KEY => Entry::DeleteKey(c.bytes()?.to_vec()),
            T_DELETE_PREFIX => Entry::DeletePrefix(c.bytes()?.to_vec()),
            T_STAMP => Entry::Stamp(c.stamp()?),
            T_ALERT => Entry::Alert {
                stamp: c.stamp()?,
                record: c.bytes()?.to_vec(),
            },
            _ => return None,
        };
        out.push(e);
    }
    Some(())
}

/// Parse JSON written by this server without serde_json's nesting limit: what was accepted
/// once must always load again (a record nests a request's values one or two levels deeper).
pub fn from_slice_unbounded<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.disable_recursion_limit();
    let v = T::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.wal"))
}

/// Numbers of the segments in `dir`, ascending.
pub fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".wal").and_then(|s| s.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Read every entry of segments numbered above `after`, in order. Returns the entries and
/// the highest segment number seen.
///
/// Only the newest segment may end in a torn frame (short, or failing its checksum): that is
/// a write a crash interrupted, never acknowledged, and it is cut off. Damage anywhere else,
/// or a frame whose checksum holds but whose entries do not decode, is refused: skipping it
/// would silently drop acknowledged changes.
pub fn read_after(dir: &Path, after: u64) -> io::Result<(Vec<Entry>, u64)> {
    let mut entries = Vec::new();
    let all = segments(dir)?;
    let last = all.last().copied().unwrap_or(0).max(after);
    let newest = all.last().copied();
    for n in all.into_iter().filter(|n| *n > after) {
        let path = segment_path(dir, n);
        let mut data = Vec::new();
        File::open(&path)?.read_to_end(&mut data)?;
        let mut pos = 0;
        let mut torn = false;
        while pos < data.len() {
            let Some(head) = data.get(pos..pos + 8) else {
                torn = true;
                break;
            };
            let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
            let Some(payload) = data.get(pos + 8..pos + 8 + len) else {
                torn = true;
                break;
            };
            if crc32fast::hash(payload) != crc {
                torn = true;
                break;
            }
            if decode(payload, &mut entries).is_none() {
                return Err(corrupt(
                    &path,
                    pos,
                    "a frame with a valid checksum does not decode",
                ));
            }
            pos += 8 + len;
        }
        if torn {
            if Some(n) != newest {
                return Err(corrupt(
                    &path,
                    pos,
                    "damaged frame before the newest segment",
                ));
            }
            tracing::warn!(
                segment = n,
                valid = pos,
                size = data.len(),
                "truncating a torn write-ahead log tail"
            );
            OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(pos as u64)?;
        }
    }
    Ok((entries, last))
}

fn corrupt(path: &Path, pos: usize, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} at byte {pos}: {what}; refusing to start rather than drop acknowledged changes \
             (restore the data directory from a backup, or move this segment away to accept the loss)",
            path.display()
        ),
    )
}

/// The segment being appended to.
pub struct Segment {
    dir: PathBuf,
    pub number: u64,
    file: File,
    pub bytes: u64,
}

impl Segment {
    /// Create segment `number` (empty) and make its directory entry durable.
    pub fn create(dir: &Path, number: u64) -> io::Result<Segment> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, number))?;
        File::open(dir)?.sync_all()?;
        Ok(Segment {
            dir: dir.to_owned(),
            number,
            file,
            bytes: 0,
        })
    }

    /// Append one frame and make it durable (fdatasync).
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "a log frame larger than 4 GiB")
        })?;
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4..].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        self.file.write_all(&head)?;
        self.file.write_all(payload)?;
        self.file.sync_data()?;
        self.bytes += 8 + payload.len() as u64;
        Ok(())
    }

    /// Start the next segment.
    pub fn rotate(&mut self) -> io::Result<()> {
        *self = Segment::create(&self.dir, self.number + 1)?;
        Ok(())
    }
}

/// Delete segments numbered `upto` and below (after a checkpoint).
pub fn remove_upto(dir: &Path, upto: u64) -> io::Result<()> {
    for n in segments(dir)? {
        if n <= upto {
            std::fs::remove_file(segment_path(dir, n))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Creates and states are written compact (format 5) and read back whole; the JSON
    /// entries of a format-4 log still read.
    #[test]
    fn twins_in_the_log_round_trip_compact_and_old_json_entries_still_read() {
        let now = Utc.timestamp_nanos(1_780_000_000_123_456_789);
        let origin: std::sync::Arc<str> = "edge-1".into();
        let mut t = Twin {
            id: TwinId::new_v7(),
            entity_type: "machine".into(),
            properties: json!({"temperature": 70.5, "big": u64::MAX, "nested": {"a": [1, -2]}})
                .as_object()
                .unwrap()
                .clone(),
            version: 3,
            vclock: [("edge-1".to_owned(), 3)].into(),
            parent_id: Some(TwinId::new_v7()),
            children_ids: Default::default(),
            lifecycle: Lifecycle::Suspended,
            created_at: now,
            updated_at: now + chrono::Duration::milliseconds(42),
            hlc: 1 << 40,
            lseq: 7,
            clocks: crate::types::Clocks::new(),
            deleted_hlc: 0,
            siblings: None,
        };
        let names: Vec<String> = t.properties.keys().cloned().collect();
        t.clocks
            .stamp(&names, t.hlc, &origin, crate::types::Dot { n: 3, v: 3 });
        let mut buf = Vec::new();
        encode::create(&mut buf, &t);
        encode::state(&mut buf, &t);
        assert_eq!(buf[0], T_CREATE_COMPACT);
        // The old entries, as format 4 wrote them.
        for tag in [T_CREATE, T_STATE] {
            buf.push(tag);
            let mut json = Vec::new();
            t.write_record(&mut json);
            buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
            buf.extend_from_slice(&json);
        }
        let mut out = Vec::new();
        decode(&buf, &mut out).expect("entries decode");
        assert_eq!(out.len(), 4);
        for (i, e) in out.iter().enumerate() {
            match e {
                Entry::Create(back) | Entry::State(back) => assert_eq!(**back, t, "entry {i}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(out[1], Entry::State(_)) && matches!(out[3], Entry::State(_)));
        // A truncated compact twin is a malformed frame, not a panic.
        let mut cut = Vec::new();
        encode::create(&mut cut, &t);
        cut.truncate(cut.len() - 3);
        assert!(decode(&cut, &mut Vec::new()).is_none());
    }

    #[test]
    fn frames_round_trip_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), 1).unwrap();
        let id = TwinId::new_v7();
        let now = Utc.timestamp_nanos(1_700_000_000_123_456_789);
        let mut buf = Vec::new();
        let patch = json!({"t": 1.5}).as_object().unwrap().clone();
        encode::update(&mut buf, &id, now, 2, now, now, &patch);
        encode::put(&mut buf, b"mx", b"{}");
        seg.append(&buf).unwrap();
        buf.clear();
        encode::delete(&mut buf, &id);
        seg.append(&buf).unwrap();
        // A torn third frame: header promises more than was written.
        let path = segment_path(dir.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 9]).unwrap();
        let (entries, last) = read_after(dir.path(), 0).unwrap();
        assert_eq!(last, 1);
        assert_eq!(entries.len(), 3);
        match &entries[0] {
            Entry::Update {
                version,
                patch: p,
                now: t,
                ..
            } => {
                assert_eq!((*version, p, *t), (2, &patch, now));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&entries[2], Entry::Delete(d) if *d == id));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), seg.bytes);
        // Segments at or below a checkpoint are skipped.
        assert!(read_after(dir.path(), 1).unwrap().0.is_empty());
    }

    #[test]
    fn stamps_and_alerts_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), 1).unwrap();
        let plain = Stamp {
            lseq: 7,
            hlc: 42 << 16 | 3,
            cause: None,
        };
        let caused = Stamp {
            lseq: 8,
            hlc: 43 << 16,
            cause: Some(Cause {
                by: crate::types::Actor::Rule("hot".into()),
                depth: 2,
            }),
        };
        let mut buf = Vec::new();
        encode::stamp(&mut buf, &plain);
        encode::delete(&mut buf, &TwinId::new_v7());
        encode::alert(&mut buf, &caused, b"{\"a\":1}");
        seg.append(&buf).unwrap();
        let (entries, _) = read_after(dir.path(), 0).unwrap();
        assert!(matches!(&entries[0], Entry::Stamp(s) if *s == plain));
        assert!(matches!(&entries[1], Entry::Delete(_)));
        match &entries[2] {
            Entry::Alert { stamp, record } => {
                assert_eq!((stamp, record.as_slice()), (&caused, &b"{\"a\":1}"[..]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn damage_before_the_newest_segment_is_refused_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), 1).unwrap();
        let mut buf = Vec::new();
        encode::delete(&mut buf, &TwinId::new_v7());
        seg.append(&buf).unwrap();
        seg.append(&buf).unwrap();
        seg.rotate().unwrap();
        seg.append(&buf).unwrap();
        // Flip a byte inside the first frame of segment 1 (not the newest).
        let path = segment_path(dir.path(), 1);
        let mut data = std::fs::read(&path).unwrap();
        data[10] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        let err = read_after(dir.path(), 0).unwrap_err();
        assert!(err.to_string().contains("refusing to start"), "{err}");
        // Nothing was cut off.
        assert_eq!(std::fs::read(&path).unwrap().len(), data.len());
    }

    #[test]
    fn a_checksummed_frame_that_does_not_decode_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), 1).unwrap();
        seg.append(b"?not an entry").unwrap();
        assert!(read_after(dir.path(), 0).is_err());
    }
}
