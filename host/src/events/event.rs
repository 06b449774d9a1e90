//! One event of the node's log: its type, its envelope, and how a committed change or an
//! alert becomes one. The JSON text of an event is built once and shared by every
//! subscriber. Every event names its `origin`, the node where its change was made.

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::registry::{Change, ChangeKind};
use crate::types::{Cause, Lifecycle, Properties, TwinId};

/// The type of an event (`type` in the envelope; also its CloudEvents type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventType {
    #[serde(rename = "twin.created")]
    TwinCreated,
    #[serde(rename = "twin.updated")]
    TwinUpdated,
    #[serde(rename = "twin.deleted")]
    TwinDeleted,
    #[serde(rename = "twin.lifecycle")]
    TwinLifecycle,
    #[serde(rename = "alert")]
    Alert,
    #[serde(rename = "workflow.finished")]
    WorkflowFinished,
    #[serde(rename = "conflict.detected")]
    ConflictDetected,
    /// A conflict's concurrent writes gave way to a later write.
    #[serde(rename = "conflict.resolved")]
    ConflictResolved,
    /// A relationship put or deleted; `twin_id` is its source, `data` names it.
    #[serde(rename = "relationship.changed")]
    RelationshipChanged,
    /// A model put or deleted; `data` names the entity type.
    #[serde(rename = "model.changed")]
    ModelChanged,
}

impl EventType {
    pub const ALL: [EventType; 10] = [
        EventType::TwinCreated,
        EventType::TwinUpdated,
        EventType::TwinDeleted,
        EventType::TwinLifecycle,
        EventType::Alert,
        EventType::WorkflowFinished,
        EventType::ConflictDetected,
        EventType::ConflictResolved,
        EventType::RelationshipChanged,
        EventType::ModelChanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::TwinCreated => "twin.created",
            EventType::TwinUpdated => "twin.updated",
            EventType::TwinDeleted => "twin.deleted",
            EventType::TwinLifecycle => "twin.lifecycle",
            EventType::Alert => "alert",
            EventType::WorkflowFinished => "workflow.finished",
            EventType::ConflictDetected => "conflict.detected",
            EventType::ConflictResolved => "conflict.resolved",
            EventType::RelationshipChanged => "relationship.changed",
            EventType::ModelChanged => "model.changed",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// A bit for filter masks.
    pub fn bit(self) -> u16 {
        1 << (self as u8)
    }
}

impl From<ChangeKind> for EventType {
    fn from(k: ChangeKind) -> Self {
        match k {
            ChangeKind::Created => EventType::TwinCreated,
            ChangeKind::Updated => EventType::TwinUpdated,
            ChangeKind::Deleted => EventType::TwinDeleted,
            ChangeKind::Lifecycle => EventType::TwinLifecycle,
            ChangeKind::Alert => EventType::Alert,
            ChangeKind::Relationship => EventType::RelationshipChanged,
            ChangeKind::Model => EventType::ModelChanged,
            ChangeKind::ConflictDetected => EventType::ConflictDetected,
            ChangeKind::ConflictResolved => EventType::ConflictResolved,
            ChangeKind::WorkflowFinished => EventType::WorkflowFinished,
        }
    }
}

/// One event: API.md's envelope plus the CloudEvents 1.0 attributes (`specversion`, `id`,
/// `source`, `type`, `time`, `subject`) so CloudEvents tooling reads it as is.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_id: Option<TwinId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<TwinId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The merge patch applied (every property for `twin.created`).
    #[serde(default, skip_serializing_if = "Properties::is_empty")]
    #[schema(value_type = Object)]
    pub changed: Properties,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    /// Event time: the update's timestamp.
    pub ts: DateTime<Utc>,
    /// Details of an alert (rule, severity, message, values, window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Set when a behavior or rule made the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// The node where the change was made: this node for its own writes, alerts,
    /// relationship and model changes; the writing node for a change merged from a peer.
    /// Behaviors and rules react only to this node's own changes unless they say
    /// `"on": "all"`. (Empty until the event is logged; events persisted before origins were
    /// recorded read back with this node's id.)
    #[serde(default)]
    #[schema(value_type = String, example = "edge-1")]
    pub origin: Arc<str>,
    /// For an alert forwarded from another node: its `seq` there (every node keeps one copy
    /// of an alert, keyed by `origin` and this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_seq: Option<u64>,
    /// The serialized envelope, made once and shared by every subscriber.
    #[serde(skip)]
    json: OnceLock<Box<str>>,
    /// When the event entered the log (for delivery-latency measurements).
    #[serde(skip)]
    pub appended: Option<std::time::Instant>,
}

/// The envelope on the wire: the event's fields and the CloudEvents attributes.
#[derive(Serialize)]
struct Wire<'a> {
    specversion: &'static str,
    id: String,
    source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    time: &'a DateTime<Utc>,
    datacontenttype: &'static str,
    #[serde(flatten)]
    event: &'a Event,
}

impl Event {
    /// An event not yet numbered (`seq` is set by [`EventLog::append`]).
    pub fn new(kind: EventType, ts: DateTime<Utc>) -> Event {
        Event {
            seq: 0,
            kind,
            twin_id: None,
            entity_type: None,
            parent_id: None,
            version: None,
            changed: Properties::new(),
            lifecycle: None,
            ts,
            data: None,
            cause: None,
            origin: Arc::from(""),
            origin_seq: None,
            json: OnceLock::new(),
            appended: None,
        }
    }

    pub(super) fn from_change(c: Change) -> Event {
        let twin_change = matches!(
            c.kind,
            ChangeKind::Created | ChangeKind::Updated | ChangeKind::Deleted | ChangeKind::Lifecycle
        );
        Event {
            seq: c.seq,
            kind: c.kind.into(),
            twin_id: c.twin_id,
            entity_type: (!c.entity_type.is_empty()).then_some(c.entity_type),
            parent_id: c.parent_id,
            version: twin_change.then_some(c.version),
            changed: c.changed,
            lifecycle: twin_change.then_some(c.lifecycle),
            ts: c.ts,
            data: c.data,
            cause: c.cause.map(|a| (*a).clone()),
            origin: c.origin,
            origin_seq: c.origin_seq,
            json: OnceLock::new(),
            appended: None,
        }
    }

    /// The alert this event stands for, for the registry to number (alerts only).
    pub(super) fn into_alert(self) -> Option<Change> {
        Some(Change::alert(
            self.twin_id?,
            self.entity_type.unwrap_or_default(),
            self.parent_id,
            self.ts,
            self.data.unwrap_or(Value::Null),
            self.cause.map(Arc::new),
        ))
    }

    /// Whether the event's change was made on the node `local` (the one running the
    /// reaction).
    pub fn is_local(&self, local: &str) -> bool {
        *self.origin == *local
    }

    /// Event time in microseconds since the epoch.
    pub fn ts_micros(&self) -> i64 {
        self.ts.timestamp_micros()
    }

    /// The JSON envelope (serialized once).
    pub fn json(&self, source: &str) -> &str {
        self.json.get_or_init(|| {
            serde_json::to_string(&Wire {
                specversion: "1.0",
                id: self.seq.to_string(),
                source,
                subject: self.twin_id.map(|t| t.to_string()),
                time: &self.ts,
                datacontenttype: "application/json",
                event: self,
            })
            .expect("events serialize")
            .into_boxed_str()
        })
    }
}
