//! Key layout of the one sled tree. Every record kind has a one-byte prefix so a single
//! atomic `apply_batch` can cover twins, history, models, relationships and tokens at once.

use crate::types::TwinId;

/// Twins, formats 1-3: `t` + 16-byte id → the twin's record (JSON, then compact). Format 4
/// keeps twins in files (`store::twin_files`); an upgrade reads these and removes them.
pub const TWIN: u8 = b't';
/// Models: `m` + entity type → JSON model.
pub const MODEL: u8 = b'm';
/// Relationships: `r` + source id + target id + name → JSON properties.
pub const REL: u8 = b'r';
/// API tokens: `k` + sha256(token) hex → JSON token record.
pub const TOKEN: u8 = b'k';
/// History chunks, formats 1-6: `h` + series + time + commit sequence → packed points. Still
/// read (and swept) in format 7, which writes [`HISTORY_BLOCK`]s instead.
pub const HISTORY: u8 = b'h';
/// History blocks, format 7: `H` + fold number (8 bytes BE) + first twin id → the samples of
/// up to 256 twins of one fold of the history journal (`store::blocks`).
pub const HISTORY_BLOCK: u8 = b'H';
/// History folds, format 7: `i` + fold number (8 bytes BE) → the first and last time of its
/// samples (`store::blocks`).
pub const HISTORY_FOLD: u8 = b'i';
/// History cuts, format 7: `j` + twin id → the time (µs, 8 bytes BE) the twin was deleted.
/// History blocks keep a deleted twin's samples until retention drops their fold; reads
/// skip those at or before the cut, so a new twin with the same id starts afresh.
pub const HISTORY_CUT: u8 = b'j';
/// Module metadata: `w` + module name → JSON (versions, active version, limits).
pub const MODULE: u8 = b'w';
/// Module bytes as uploaded: `b` + sha256 hex → the component.
pub const MODULE_BYTES: u8 = b'b';
/// Compiled modules: `c` + sha256 hex + `/` + engine hash → serialized artifact.
pub const ARTIFACT: u8 = b'c';
/// Event rules: `u` + rule name → JSON rule.
pub const RULE: u8 = b'u';
/// Behavior bindings: `v` + behavior name → JSON binding.
pub const BEHAVIOR: u8 = b'v';
/// Metadata: `x` + name.
pub const META: u8 = b'x';
/// Tombstones of deleted twins: `d` + 16-byte id → JSON tombstone (format 2).
pub const TOMBSTONE: u8 = b'd';

/// The format version of the data directory; bumped when the layout changes so a newer
/// release can migrate and an older one refuses instead of misreading.
///
/// 2: twin records carry their HLC, change number and per-property clocks; every committed
/// change has a change number in the write-ahead log (which numbers the events); the
/// checkpoint records the highest change number and HLC it covers. Format 1 (no clocks, event
/// numbers from a reservation) is upgraded in place on open.
///
/// 3: twin records are the compact binary form (`types::compact`, names spelled out) instead
/// of JSON. Formats 1 and 2 are upgraded in place on open (the log's records stay JSON).
///
/// 4: twins at rest are files of records under `<data-dir>/twins/` named by a manifest
/// ([`META_TWIN_FILES`]), not one sled key each. Formats 1-3 are upgraded on open.
///
/// 5: the write-ahead log's create and state entries hold the twin's compact form instead of
/// JSON. A format-4 directory is marked 5 on open: nothing is rewritten (its log tail's JSON
/// entries still replay), and a format-4 build then refuses it rather than misread the log.
///
/// 6: twins are written with two more compact-form flags (`types::compact`): the updated time
/// in one varint when it shares the created time's nanoseconds, and clocks without names when
/// they follow the properties. The demo's machine fits in 128 bytes instead of 131 (the
/// allocator's 128-byte class instead of 160). Blobs without the flags still read, so a
/// format-4 or -5 directory is marked 6 on open and nothing is rewritten; earlier builds then
/// refuse it rather than misread the new twins.
///
/// 7: a fold of the history journal writes blocks of twins (`store::blocks`), one sled key
/// per 256 twins, instead of one key per series. Chunks of the older layout still read and
/// are swept as before, so a format-4 to -6 directory is marked 7 on open; earlier builds then
/// refuse it rather than miss the history in blocks.
pub const FORMAT_VERSION: u64 = 7;
/// The first format with twins at rest in files (older ones keep a sled key per twin).
pub const TWIN_FILES_FORMAT: u64 = 4;
pub const META_FORMAT_VERSION: &[u8] = b"xformat_version";
pub const META_NODE_ID: &[u8] = b"xnode_id";
/// Number of the last write-ahead-log segment whose changes are all in sled.
pub const META_WAL_CHECKPOINT: &[u8] = b"xwal_checkpoint";
/// Format 1 only: event sequence numbers below this may have been handed out. The upgrade to
/// format 2 continues the change numbers above it.
pub const META_EVENT_SEQ_RESERVED: &[u8] = b"xevent_seq_reserved";
/// The highest change number the last checkpoint covers (8 bytes BE).
pub const META_LSEQ: &[u8] = b"xlseq";
/// Format 4: the twin files at rest and what they hold (`store::twin_files::Manifest`),
/// written with each checkpoint's marker.
pub const META_TWIN_FILES: &[u8] = b"xtwin_files";
/// Format 4: the history journal's files (`store::journal`), in the same manifest form,
/// written with each checkpoint's marker.
pub const META_HISTORY_FILES: &[u8] = b"xhistory_files";
/// The highest HLC the last checkpoint covers (8 bytes BE).
pub const META_HLC: &[u8] = b"xhlc";
/// Prefix of the change number of each peer's feed merged through here, by its node id.
pub const META_PEER_CURSOR: &[u8] = b"xpeer_cursor/";
/// Prefix of the peers added with `PUT /v1/peers/{node_id}` (JSON: url and token).
pub const META_PEER: &[u8] = b"xpeer/";
/// `xpeer_alerts/<node id>` → u64 BE: how far that peer's event log is read here for alerts.
pub const META_PEER_ALERTS: &[u8] = b"xpeer_alerts/";
/// `xalerts_seen/<node id>` → u64 BE: the highest number of an alert raised there and
/// logged here (forwarded alerts are logged once).
pub const META_ALERTS_SEEN: &[u8] = b"xalerts_seen/";

pub fn rule(name: &str) -> Vec<u8> {
    prefixed(RULE, name.as_bytes())
}

pub fn behavior(name: &str) -> Vec<u8> {
    prefixed(BEHAVIOR, name.as_bytes())
}

pub fn twin(id: &TwinId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = TWIN;
    k[1..].copy_from_slice(id.as_bytes());
    k
}

/// The id of a twin record's key.
pub fn parse_twin(key: &[u8]) -> Option<TwinId> {
    match key {
        [TWIN, id @ ..] => uuid::Uuid::from_slice(id).ok().map(TwinId),
        _ => None,
    }
}

pub fn tombstone(id: &TwinId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = TOMBSTONE;
    k[1..].copy_from_slice(id.as_bytes());
    k
}

pub fn model(entity_type: &str) -> Vec<u8> {
    prefixed(MODEL, entity_type.as_bytes())
}

pub fn module(name: &str) -> Vec<u8> {
    prefixed(MODULE, name.as_bytes())
}

pub fn module_bytes(sha256_hex: &str) -> Vec<u8> {
    prefixed(MODULE_BYTES, sha256_hex.as_bytes())
}

pub fn artifact(sha256_hex: &str, engine_hash: &str) -> Vec<u8> {
    prefixed(ARTIFACT, format!("{sha256_hex}/{engine_hash}").as_bytes())
}

/// Prefix of the compiled artifacts of one component, for every engine.
pub fn artifacts_of(sha256_hex: &str) -> Vec<u8> {
    prefixed(ARTIFACT, format!("{sha256_hex}/").as_bytes())
}

pub fn token(hash_hex: &str) -> Vec<u8> {
    prefixed(TOKEN, hash_hex.as_bytes())
}

/// Prefix of every relationship whose source is `src`.
pub fn rel_prefix(src: &TwinId) -> Vec<u8> {
    prefixed(REL, src.as_bytes())
}

pub fn rel(src: &TwinId, target: &TwinId, name: &str) -> Vec<u8> {
    let mut k = rel_prefix(src);
    k.extend_from_slice(target.as_bytes());
    k.extend_from_slice(name.as_bytes());
    k
}

/// Split a relationship key back into (source, target, name).
pub fn parse_rel(key: &[u8]) -> Option<(TwinId, TwinId, String)> {
    if key.len() < 33 || key[0] != REL {
        return None;
    }
    let src = uuid::Uuid::from_slice(&key[1..17]).ok()?;
    let dst = uuid::Uuid::from_slice(&key[17..33]).ok()?;
    let name = std::str::from_utf8(&key[33..]).ok()?.to_owned();
    Some((TwinId(src), TwinId(dst), name))
}

/// The key of the history block of fold `fold` that starts with twin `first`.
pub fn history_block(fold: u64, first: &TwinId) -> Vec<u8> {
    let mut k = history_fold_blocks(fold);
    k.extend_from_slice(first.as_bytes());
    k
}

/// Prefix of every history block of fold `fold`.
pub fn history_fold_blocks(fold: u64) -> Vec<u8> {
    prefixed(HISTORY_BLOCK, &fold.to_be_bytes())
}

/// The key of twin `id`'s history cut.
pub fn history_cut(id: &TwinId) -> Vec<u8> {
    prefixed(HISTORY_CUT, id.as_bytes())
}

/// The key of fold `fold`'s span.
pub fn history_fold(fold: u64) -> Vec<u8> {
    prefixed(HISTORY_FOLD, &fold.to_be_bytes())
}

/// Prefix of every history series of one twin.
pub fn history_twin_prefix(id: &TwinId) -> Vec<u8> {
    prefixed(HISTORY, id.as_bytes())
}

/// Prefix of one series: twin id, then the property name with its length so that one
/// name is never a prefix of another's keys.
pub fn history_series(id: &TwinId, property: &str) -> Vec<u8> {
    let name = property.as_bytes();
    let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
    let mut k = history_twin_prefix(id);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(&name[..len as usize]);
    k
}

/// Time in microseconds as big-endian bytes that sort like the signed value.
pub fn ts_bytes(ts_micros: i64) -> [u8; 8] {
    ((ts_micros as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn ts_from_bytes(b: [u8; 8]) -> i64 {
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

fn prefixed(p: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(p);
    k.extend_from_slice(rest);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ts_bytes_sort_like_signed_times() {
        let times = [-5_000_000i64, -1, 0, 1, 1_700_000_000_000_000];
        for w in times.windows(2) {
            assert!(ts_bytes(w[0]) < ts_bytes(w[1]));
            assert_eq!(ts_from_bytes(ts_bytes(w[0])), w[0]);
        }
    }

    #[test]
    fn series_prefix_is_not_shared_between_names() {
        let id = TwinId::new_v7();
        let a = history_series(&id, "temp");
        let b = history_series(&id, "temperature");
        assert!(!b.starts_with(&a));
    }

    #[test]
    fn rel_keys_round_trip() {
        let (a, b) = (TwinId::new_v7(), TwinId::new_v7());
        assert_eq!(
            parse_rel(&rel(&a, &b, "feeds")),
            Some((a, b, "feeds".into()))
        );
    }
}
