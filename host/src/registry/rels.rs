//! Relationships replicate with their source twin: each relationship `(source, name,
//! target)` is a last-writer-wins register by `(HLC, origin)`, its delete a tombstone kept
//! with the source, and the source twin's change-feed entry carries all of them. A put or
//! delete gives the source twin a new place in the feed (not a new version: relationships
//! are not part of the twin's `version`).
//!
//! A relationship whose target is deleted is no longer listed, but stays in its source's
//! state: no node changes another twin's relationships when it deletes a twin, so nodes
//! that see the delete and the relationship in different orders hold the same. It goes when
//! its source goes, and comes back into view if the target id comes back (a sync merge).
//! A delete that a twin outlives takes the relationships written before it, like its
//! properties.
//!
//! Stored form under `keys::rel(source, target, name)`: [`STORED_V2`] then
//! `{"properties": {…} | null, "hlc": …, "origin": "…"}`; a bare JSON object (written before
//! relationships replicated) reads as a put with clock 0, older than any write since.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::types::TwinId;

/// First byte of a stored relationship with its clock (not the start of any JSON text).
pub const STORED_V2: u8 = 2;

/// One relationship of a twin as this node holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct RelState {
    /// `None`: deleted (a tombstone).
    pub props: Option<Value>,
    pub hlc: u64,
    pub origin: Arc<str>,
}

impl RelState {
    pub(super) fn key(&self) -> (u64, &str) {
        (self.hlc, &self.origin)
    }
}

/// A relationship (or its delete) in a twin's change-feed entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelRecord {
    pub name: String,
    pub target_id: TwinId,
    /// `null`: deleted.
    pub properties: Option<Value>,
    pub hlc: u64,
    pub origin: Arc<str>,
}

impl RelRecord {
    pub(super) fn state(&self) -> RelState {
        RelState {
            props: self.properties.clone(),
            hlc: self.hlc,
            origin: self.origin.clone(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Stored<'a> {
    properties: Option<std::borrow::Cow<'a, Value>>,
    hlc: u64,
    origin: Arc<str>,
}

/// The stored value of a relationship.
pub(super) fn encode(s: &RelState) -> Vec<u8> {
    let mut v = vec![STORED_V2];
    serde_json::to_writer(
        &mut v,
        &Stored {
            properties: s.props.as_ref().map(std::borrow::Cow::Borrowed),
            hlc: s.hlc,
            origin: s.origin.clone(),
        },
    )
    .expect("relationships serialize");
    v
}

/// Read a stored relationship.
pub(super) fn decode(v: &[u8]) -> Result<RelState, serde_json::Error> {
    match v.split_first() {
        Some((&STORED_V2, rest)) => {
            let s: Stored = crate::store::wal::from_slice_unbounded(rest)?;
            Ok(RelState {
                props: s.properties.map(std::borrow::Cow::into_owned),
                hlc: s.hlc,
                origin: s.origin,
            })
        }
        _ => Ok(RelState {
            props: Some(crate::store::wal::from_slice_unbounded(v)?),
            hlc: 0,
            origin: Arc::from(""),
        }),
    }
}

/// The records of one twin's relationships, for its feed entry.
pub(super) fn records(
    m: Option<&std::collections::BTreeMap<(String, TwinId), RelState>>,
) -> Vec<RelRecord> {
    m.into_iter()
        .flatten()
        .map(|((name, target), s)| RelRecord {
            name: name.clone(),
            target_id: *target,
            properties: s.props.clone(),
            hlc: s.hlc,
            origin: s.origin.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The stored form keeps properties, clock and origin, tombstones included; a bare JSON
    /// object (stored before relationships had clocks) reads as a put with clock 0.
    #[test]
    fn stored_relationships_read_back_and_legacy_ones_read_as_the_oldest_put() {
        for props in [Some(json!({"flow": 3})), None] {
            let s = RelState {
                props,
                hlc: 42,
                origin: Arc::from("edge-1"),
            };
            let bytes = encode(&s);
            assert_eq!(bytes[0], STORED_V2);
            assert_eq!(decode(&bytes).unwrap(), s);
        }
        let legacy = decode(br#"{"hlc": 7, "origin": "x"}"#).unwrap();
        assert_eq!(legacy.props, Some(json!({"hlc": 7, "origin": "x"})));
        assert_eq!((legacy.hlc, &*legacy.origin), (0, ""));
    }
}
