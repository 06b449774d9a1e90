//! The messages of a link between two nodes (`GET /v1/sync/ws`) and how they are framed.
//!
//! ```text
//! dialer                                   acceptor
//!   hello {protocol, node_id}      ──▶
//!                                  ◀──     hello {protocol, node_id}   (or close 4001/4003/4009)
//!   subscribe {after}              ──▶     "send me your feed after N"
//!                                  ◀──     subscribe {after}
//!   changes {items, next}         ◀─▶      a batch of the sender's feed, coalesced
//!   ack {through}                 ◀─▶      merged and durable through `next`
//!   digest {buckets}              ◀─▶      anti-entropy: the sender's state, per id bucket
//!   repair {items}                ◀─▶      the entries of the buckets that differ
//! ```
//!
//! After the hellos the link is symmetric: each side sends its own change feed from where the
//! other subscribed, and acknowledges what it merged. `after` is the position in the other
//! node's feed this node has merged through (stored with each merge), so a link that breaks
//! resumes where it stopped, whoever dials again.
//!
//! Framing (protocol 2): the small messages (hello, subscribe, ack, digest) are JSON text
//! frames, tagged by `type`, so a node of any version reads a hello and can refuse another
//! version with close code 4001. The bulk messages (changes, repair) are binary frames: one
//! kind byte ([`Bulk`]), then one zstd frame (with its content size) of the message's JSON
//! without the `type` tag, e.g. `{"items": [...], "next": 42}`, each item a feed entry as
//! `GET /v1/changes` serves it. JSON keeps the encoding derived from the serde types (a field
//! added to [`RemoteChange`] and the feed entry travels without a wire change); zstd takes
//! out its repetition (field names, node ids, timestamps), a batch being thousands of
//! entries alike. Protocol 1 sent every message as a tagged JSON text frame.

use serde::{Deserialize, Serialize};

use crate::registry::models_sync::RemoteModel;
use crate::registry::{FeedItem, RemoteAlert, RemoteChange};

/// The protocol version this build speaks. A peer that speaks another is refused with
/// [`Close::UNSUPPORTED`]. 2: changes and repairs in binary frames (zstd of JSON); models
/// travel (`models`).
/// 3: alerts travel (`alerts`, `subscribe.alerts_after`).
pub const PROTOCOL_VERSION: u32 = 3;

/// Longest message accepted (a batch of feed entries), as it travels and once decompressed;
/// larger ones close the link.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// zstd level of bulk messages: 1, the fastest standard level (the link is CPU-bound on a
/// small box; other levels were not measured).
pub const ZSTD_LEVEL: i32 = 1;

/// What one side sends. Changes and repairs travel as binary frames ([`Encoder`],
/// [`Decoder`]), the others as JSON text frames of this enum.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// The first message of each side.
    Hello { protocol: u32, node_id: String },
    /// "Send me your change feed after change number `after`", and (when set) "your event
    /// log's alerts after event number `alerts_after`".
    Subscribe {
        after: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        alerts_after: Option<u64>,
    },
    /// Entries of the sender's feed up to `next` (entries the receiver made itself may be
    /// left out; `next` still moves past them).
    Changes { items: Vec<RemoteChange>, next: u64 },
    /// The receiver merged the sender's feed through `through`, durably.
    Ack { through: u64 },
    /// Anti-entropy: a digest of the sender's replicated state per bucket of twin ids
    /// (`registry::digest`). The receiver answers with the entries of the buckets where its
    /// own digest differs.
    Digest { buckets: Vec<u64> },
    /// Entries sent by anti-entropy: merged like feed entries; no feed position moves.
    Repair { items: Vec<RemoteChange> },
    /// Every model and model tombstone of the sender, with their clocks: sent when the link
    /// starts and whenever a model changed there (last writer wins per entity type).
    Models { items: Vec<RemoteModel> },
    /// Alerts of the sender's event log (raised there or forwarded to it) up to event
    /// number `next`, each with its origin and its number there (`sync::alerts`).
    Alerts { items: Vec<RemoteAlert>, next: u64 },
}

/// The kind byte that starts a binary frame: which bulk message its body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Bulk {
    /// [`Msg::Changes`].
    Changes = 1,
    /// [`Msg::Repair`].
    Repair = 2,
}

/// A batch as the sender writes it: feed entries serialized straight from the twins.
#[derive(Serialize)]
struct ChangesOut<'a> {
    items: &'a [&'a FeedItem],
    next: u64,
}

/// A repair as the sender writes it.
#[derive(Serialize)]
struct RepairOut<'a> {
    items: &'a [FeedItem],
}

/// A batch as the receiver reads it: the entries deserialize straight into the unit of
/// replication (no intermediate JSON tree, no buffering for a tag).
#[derive(Deserialize)]
struct ChangesIn {
    items: Vec<RemoteChange>,
    next: u64,
}

#[derive(Deserialize)]
struct RepairIn {
    items: Vec<RemoteChange>,
}

/// Largest JSON buffer an [`Encoder`] keeps between messages (a batch of [`super::link::BATCH`]
/// entries of a few properties is well under it); a repair of a huge bucket should not pin
/// its size for the life of the link.
const KEEP_BUFFER_BYTES: usize = 4 << 20;

/// Writes the binary frames of one side of a link (keeps its zstd context and buffer).
pub struct Encoder {
    zstd: zstd::bulk::Compressor<'static>,
    json: Vec<u8>,
}

impl Encoder {
    pub fn new() -> anyhow::Result<Encoder> {
        Ok(Encoder {
            zstd: zstd::bulk::Compressor::new(ZSTD_LEVEL)
                .map_err(|e| anyhow::anyhow!("starting a zstd compressor: {e}"))?,
            json: Vec::new(),
        })
    }

    /// The frame of a [`Msg::Changes`].
    pub fn changes(&mut self, items: &[&FeedItem], next: u64) -> anyhow::Result<Vec<u8>> {
        self.encode(Bulk::Changes, &ChangesOut { items, next })
    }

    /// The frame of a [`Msg::Repair`].
    pub fn repair(&mut self, items: &[FeedItem]) -> anyhow::Result<Vec<u8>> {
        self.encode(Bulk::Repair, &RepairOut { items })
    }

    fn encode(&mut self, kind: Bulk, body: &impl Serialize) -> anyhow::Result<Vec<u8>> {
        self.json.clear();
        serde_json::to_writer(&mut self.json, body)
            .map_err(|e| anyhow::anyhow!("encoding a sync message: {e}"))?;
        let packed = self
            .zstd
            .compress(&self.json)
            .map_err(|e| anyhow::anyhow!("compressing a sync message: {e}"))?;
        let mut frame = Vec::with_capacity(1 + packed.len());
        frame.push(kind as u8);
        frame.extend_from_slice(&packed);
        if self.json.capacity() > KEEP_BUFFER_BYTES {
            self.json = Vec::new();
        }
        Ok(frame)
    }
}

/// Reads the binary frames of one side of a link (keeps its zstd context).
pub struct Decoder {
    zstd: zstd::bulk::Decompressor<'static>,
}

impl Decoder {
    pub fn new() -> anyhow::Result<Decoder> {
        Ok(Decoder {
            zstd: zstd::bulk::Decompressor::new()
                .map_err(|e| anyhow::anyhow!("starting a zstd decompressor: {e}"))?,
        })
    }

    /// The message of a binary frame, or why it is not one. The decompressed size is read
    /// from the zstd frame header and checked against [`MAX_MESSAGE_BYTES`] before anything
    /// is allocated.
    pub fn decode(&mut self, frame: &[u8]) -> Result<Msg, Close> {
        let bad = |what: String| Close::new(Close::PROTOCOL, format!("not a sync message: {what}"));
        let (&kind, packed) = frame
            .split_first()
            .ok_or_else(|| bad("an empty binary frame".into()))?;
        let size = match zstd::zstd_safe::get_frame_content_size(packed) {
            Ok(Some(n)) => n,
            Ok(None) => return Err(bad("a zstd frame without its content size".into())),
            Err(e) => return Err(bad(format!("not a zstd frame ({e})"))),
        };
        if size > MAX_MESSAGE_BYTES as u64 {
            return Err(bad(format!(
                "{size} bytes once decompressed; at most {MAX_MESSAGE_BYTES} are accepted"
            )));
        }
        let mut json = Vec::with_capacity(size as usize);
        self.zstd
            .decompress_to_buffer(packed, &mut json)
            .map_err(|e| bad(format!("zstd: {e}")))?;
        let parsed = if kind == Bulk::Changes as u8 {
            serde_json::from_slice::<ChangesIn>(&json).map(|c| Msg::Changes {
                items: c.items,
                next: c.next,
            })
        } else if kind == Bulk::Repair as u8 {
            serde_json::from_slice::<RepairIn>(&json).map(|r| Msg::Repair { items: r.items })
        } else {
            return Err(bad(format!("unknown binary message kind {kind}")));
        };
        parsed.map_err(|e| bad(e.to_string()))
    }
}

/// Why a link was closed: a WebSocket close code and a reason for the other side's logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

impl Close {
    /// The other side speaks another protocol version.
    pub const UNSUPPORTED: u16 = 4001;
    /// A message that is not this protocol, or out of place.
    pub const PROTOCOL: u16 = 4002;
    /// The other side claims this node's own id.
    pub const SAME_NODE: u16 = 4003;
    /// A link with that node exists already (the one the lower node id dialed stays).
    pub const DUPLICATE: u16 = 4009;
    /// The node is stopping, or the peer was removed.
    pub const GOING_AWAY: u16 = 1001;

    pub fn new(code: u16, reason: impl Into<String>) -> Close {
        Close {
            code,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Close {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "closed ({}): {}", self.code, self.reason)
    }
}

/// A message of a link in either WebSocket library's terms.
#[derive(Debug)]
pub enum Frame {
    Text(String),
    Binary(bytes::Bytes),
    Close(Option<Close>),
    /// Pings and pongs: nothing to act on.
    Other,
}

/// Check the other side's hello against this node's.
pub fn check_hello(msg: Msg, own_id: &str) -> Result<String, Close> {
    match msg {
        Msg::Hello { protocol, node_id } => {
            if protocol != PROTOCOL_VERSION {
                return Err(Close::new(
                    Close::UNSUPPORTED,
                    format!(
                        "sync protocol version {protocol} is not supported here; this node speaks version {PROTOCOL_VERSION}"
                    ),
                ));
            }
            if node_id == own_id {
                return Err(Close::new(
                    Close::SAME_NODE,
                    format!("both ends of this link call themselves {own_id:?}: a node cannot sync with itself, and two nodes need different --node-id"),
                ));
            }
            crate::registry::check_name("node id", &node_id)
                .map_err(|e| Close::new(Close::PROTOCOL, e.to_string()))?;
            Ok(node_id)
        }
        other => Err(Close::new(
            Close::PROTOCOL,
            format!("expected a hello, got {}", kind(&other)),
        )),
    }
}

/// The type of a message, for errors.
pub fn kind(m: &Msg) -> &'static str {
    match m {
        Msg::Hello { .. } => "hello",
        Msg::Subscribe { .. } => "subscribe",
        Msg::Changes { .. } => "changes",
        Msg::Ack { .. } => "ack",
        Msg::Digest { .. } => "digest",
        Msg::Repair { .. } => "repair",
        Msg::Models { .. } => "models",
        Msg::Alerts { .. } => "alerts",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::registry::Tombstone;
    use crate::types::VClock;

    fn tombstone(lseq: u64) -> FeedItem {
        FeedItem::Tombstone(Arc::new(Tombstone {
            id: crate::types::TwinId::new_v7(),
            entity_type: "machine".into(),
            hlc: lseq << 16,
            vclock: VClock::from([("node-a".to_owned(), lseq)]),
            deleted_at: chrono::Utc::now(),
            lseq,
        }))
    }

    #[test]
    fn changes_and_repairs_round_trip_through_binary_frames() {
        let items: Vec<FeedItem> = (1..=50).map(tombstone).collect();
        let refs: Vec<&FeedItem> = items.iter().collect();
        let mut enc = Encoder::new().unwrap();
        let mut dec = Decoder::new().unwrap();

        let frame = enc.changes(&refs, 77).unwrap();
        assert_eq!(frame[0], Bulk::Changes as u8);
        let json = serde_json::to_vec(&ChangesOut {
            items: &refs,
            next: 77,
        })
        .unwrap();
        assert!(
            frame.len() * 3 < json.len(),
            "entries alike compress: {} bytes for {} of JSON",
            frame.len(),
            json.len()
        );
        match dec.decode(&frame).unwrap() {
            Msg::Changes { items: got, next } => {
                assert_eq!(next, 77);
                assert_eq!(got.len(), 50);
                assert!(got.iter().all(|c| c.deleted));
                assert_eq!(got[49].hlc, 50 << 16);
            }
            other => panic!("expected changes, got {}", kind(&other)),
        }

        let frame = enc.repair(&items[..3]).unwrap();
        match dec.decode(&frame).unwrap() {
            Msg::Repair { items: got } => assert_eq!(got.len(), 3),
            other => panic!("expected a repair, got {}", kind(&other)),
        }
    }

    #[test]
    fn a_binary_frame_that_is_not_a_message_closes_the_link_with_a_reason() {
        let mut dec = Decoder::new().unwrap();
        let refused = |frame: &[u8], dec: &mut Decoder| {
            let c = dec.decode(frame).expect_err("refused");
            assert_eq!(c.code, Close::PROTOCOL, "{c}");
            c.reason
        };
        assert!(refused(&[], &mut dec).contains("empty"));
        assert!(refused(&[1, 2, 3, 4], &mut dec).contains("zstd"));
        let json = br#"{"items": [], "next": 1}"#;
        let mut frame = vec![9];
        frame.extend(zstd::bulk::compress(json, 1).unwrap());
        assert!(refused(&frame, &mut dec).contains("kind 9"));
        frame[0] = Bulk::Changes as u8;
        assert!(matches!(
            dec.decode(&frame),
            Ok(Msg::Changes { next: 1, .. })
        ));
        // Not the body of a changes message.
        let mut frame = vec![Bulk::Changes as u8];
        frame.extend(zstd::bulk::compress(br#"{"next": "x"}"#, 1).unwrap());
        assert!(refused(&frame, &mut dec).contains("not a sync message"));
        // Larger than accepted once decompressed: refused from the header, before allocating.
        let zeros = vec![b' '; MAX_MESSAGE_BYTES + 1];
        let mut frame = vec![Bulk::Changes as u8];
        frame.extend(zstd::bulk::compress(&zeros, 1).unwrap());
        assert!(frame.len() < 1 << 20);
        assert!(refused(&frame, &mut dec).contains("at most"));
    }

    #[test]
    fn a_hello_of_another_version_is_refused_with_4001() {
        let hello = |protocol| Msg::Hello {
            protocol,
            node_id: "node-b".into(),
        };
        assert_eq!(
            check_hello(hello(PROTOCOL_VERSION), "node-a").unwrap(),
            "node-b"
        );
        // A node of protocol 2 (no alerts) is refused, as 1 was.
        for old in [1, 2] {
            let c = check_hello(hello(old), "node-a").unwrap_err();
            assert_eq!(c.code, Close::UNSUPPORTED);
            assert!(
                c.reason.contains(&format!("version {old}")) && c.reason.contains("version 3"),
                "{c}"
            );
        }
        let c = check_hello(hello(PROTOCOL_VERSION), "node-b").unwrap_err();
        assert_eq!(c.code, Close::SAME_NODE);
    }
}
