//! Events: the node's ordered event log, live subscriptions, and the rule engine.
//!
//! Owns: the event log (sequence numbers, the in-memory and persisted tails, live fan-out),
//! subscriptions (filters, resume, lag notices) and the rules (declarative event processing
//! with bounded state).
//! Exposes: [`EventLog`] (installed as the registry's change sink, so every committed change
//! becomes an event in commit order), [`Subscription`], and [`rules::Rules`].
//! Must never: change twins except through the registry's write path, or hold unbounded
//! state for a subscriber or a rule.

mod event;
pub mod log;
pub mod rules;
pub mod subscribe;

pub use log::{Event, EventLog, EventType, LogConfig};
pub use rules::Rules;
pub use subscribe::{Filter, Follower, Item, Subscription, Wake};
