//! The messages of a link between two nodes (`GET /v1/sync/ws`), one JSON text message each.
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

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::registry::models_sync::RemoteModel;
use crate::registry::RemoteChange;

/// The protocol version this build speaks. A peer that speaks another is refused with
/// [`Close::UNSUPPORTED`]. 2: models travel (`models`).
pub const PROTOCOL_VERSION: u32 = 2;

/// Longest message accepted (a batch of feed entries); larger ones close the link.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// What one side sends.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// The first message of each side.
    Hello { protocol: u32, node_id: String },
    /// "Send me your change feed after change number `after`."
    Subscribe { after: u64 },
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
}

/// A batch as the sender writes it: feed entries already in their wire form (the JSON of
/// `GET /v1/changes` items), so it is encoded once.
#[derive(Serialize)]
#[serde(tag = "type", rename = "changes")]
pub struct ChangesOut<'a> {
    pub items: &'a [Value],
    pub next: u64,
}

/// A repair as the sender writes it (entries already in their wire form).
#[derive(Serialize)]
#[serde(tag = "type", rename = "repair")]
pub struct RepairOut<'a> {
    pub items: &'a [Value],
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
    Close(Option<Close>),
    /// Pings, pongs and binary frames: nothing to act on.
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
    }
}
