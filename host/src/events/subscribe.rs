//! Subscriptions: a filtered, resumable view of the event log.
//!
//! A subscription first replays the log after the given sequence number (memory, then the
//! persisted tail), then follows live events. Its live buffer is the log's shared broadcast
//! ring ([`SUBSCRIBER_BUFFER`](super::log::SUBSCRIBER_BUFFER) events): a subscriber that falls
//! further behind is handed a [`Item::Lagged`] naming the exact range it missed, and goes on
//! with the newest events; it can fetch the range from the log. Every number is delivered at
//! most once and in order.
//!
//! The node's own consumers (rule shards, the behavior dispatcher) do that themselves: when
//! they fall behind the live buffer — a 10K-item ingest publishes 10K events at once — they
//! go back to reading the log from where they were, and only what the log no longer holds is
//! reported as lagged.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::broadcast::{self, error::RecvError};

use super::log::{Event, EventLog, EventType};
use crate::registry::Registry;
use crate::types::TwinId;

/// Most twin ids one filter may name.
pub const MAX_FILTER_TWINS: usize = 1000;
/// Events fetched from the log per step of a replay.
const REPLAY_STEP: usize = 1024;

/// Which events a subscriber wants. Empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub twin_ids: Vec<TwinId>,
    pub entity_type: Option<String>,
    /// Bit mask of [`EventType::bit`]; 0 = every type.
    pub types: u16,
    pub parent_id: Option<TwinId>,
    pub ancestor_id: Option<TwinId>,
}

impl Filter {
    /// Parse a comma-separated list of event types.
    pub fn parse_types(list: &str) -> Result<u16, String> {
        let mut mask = 0;
        for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let ty = EventType::parse(t).ok_or_else(|| {
                format!(
                    "unknown event type {t:?}; known: {}",
                    EventType::ALL.map(EventType::as_str).join(", ")
                )
            })?;
            mask |= ty.bit();
        }
        Ok(mask)
    }

    pub fn matches(&self, e: &Event, registry: &Registry) -> bool {
        if self.types != 0 && self.types & e.kind.bit() == 0 {
            return false;
        }
        if !self.twin_ids.is_empty() && !e.twin_id.is_some_and(|t| self.twin_ids.contains(&t)) {
            return false;
        }
        if let Some(et) = &self.entity_type {
            if e.entity_type.as_deref() != Some(et) {
                return false;
            }
        }
        if let Some(p) = self.parent_id {
            if e.parent_id != Some(p) {
                return false;
            }
        }
        if let Some(a) = self.ancestor_id {
            if !registry.is_under(e.parent_id, a) {
                return false;
            }
        }
        true
    }
}

/// What a subscription yields.
pub enum Item {
    Event(Arc<Event>),
    /// Events `from..=to` were not delivered: the subscriber fell behind the live buffer, or
    /// the log no longer holds them. Fetch them with [`EventLog::read_after`] while the tail
    /// still has them.
    Lagged {
        from: u64,
        to: u64,
    },
}

/// A live, filtered, resumable stream of events.
pub struct Subscription {
    log: EventLog,
    registry: Registry,
    filter: Filter,
    rx: broadcast::Receiver<Arc<Event>>,
    /// Highest sequence number delivered or passed over.
    cursor: u64,
    replay: std::collections::VecDeque<Arc<Event>>,
    replaying: bool,
    /// An event received live that follows a gap, to deliver after the `Lagged` notice.
    held: Option<Arc<Event>>,
    /// Counted as a client subscription.
    counted: bool,
    /// On falling behind the live buffer, read the log from the cursor instead of skipping.
    catch_up: bool,
}

impl EventLog {
    /// Subscribe from after `after` (`None`: only events from now on). Counted in
    /// [`EventLog::subscriber_count`]; the node's own consumers (rules, behaviors) use
    /// [`EventLog::subscribe_internal`].
    pub fn subscribe(
        &self,
        registry: Registry,
        filter: Filter,
        after: Option<u64>,
    ) -> Subscription {
        self.subscribers().fetch_add(1, Ordering::Relaxed);
        let mut sub = self.subscribe_internal(registry, filter, after);
        sub.counted = true;
        sub.catch_up = false;
        sub
    }

    /// A subscription that is not counted as a client, and that catches up from the log when
    /// it falls behind the live buffer (it reports [`Item::Lagged`] only for events the log
    /// no longer holds).
    pub fn subscribe_internal(
        &self,
        registry: Registry,
        filter: Filter,
        after: Option<u64>,
    ) -> Subscription {
        // Receive live events first, so nothing falls between the replay and the live feed.
        let rx = self.live();
        // A number above any handed out cannot be a real position: follow from now.
        let now = self.next_seq().saturating_sub(1);
        let cursor = after.map_or(now, |a| a.min(now));
        Subscription {
            log: self.clone(),
            registry,
            filter,
            rx,
            cursor,
            replay: Default::default(),
            replaying: after.is_some(),
            held: None,
            counted: false,
            catch_up: true,
        }
    }
}

/// Wakes an idle follower of the log and tells it where to start: the log's position when
/// it was given work, so the events right after (a new rule's first ones) are not missed
/// while its task gets going.
pub struct Wake {
    notify: tokio::sync::Notify,
    /// The lowest position recorded since the follower last started (`u64::MAX`: none).
    after: std::sync::atomic::AtomicU64,
}

impl Default for Wake {
    fn default() -> Self {
        Wake {
            notify: tokio::sync::Notify::new(),
            after: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }
}

impl Wake {
    /// The follower has work from now on.
    pub fn wake(&self, log: &EventLog) {
        self.after
            .fetch_min(log.next_seq().saturating_sub(1), Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Where to start following: after the position recorded by the first `wake` since the
    /// last start, or from now.
    fn take_start(&self) -> Option<u64> {
        let after = self.after.swap(u64::MAX, Ordering::SeqCst);
        (after != u64::MAX).then_some(after)
    }
}

/// One of the node's own consumers of the log (a rule shard, the behavior dispatcher).
pub struct Follower<'a> {
    /// Named in the warning when it falls behind what the log holds.
    pub name: &'a str,
    /// Woken when the consumer may have work again.
    pub wake: &'a Wake,
    /// Events the log no longer held when the consumer came to them.
    pub missed: &'a std::sync::atomic::AtomicU64,
}

impl EventLog {
    /// Follow the log as `who`, only while it has work: wait until `ready()` holds
    /// (re-checked when `who.wake` is woken), then — from where the wake said, or from now —
    /// hand every event matching `filter` to
    /// `on_event`, which answers whether the consumer still has work (false: stop following
    /// until woken). Events the log no longer holds are added to `who.missed` and logged.
    /// Returns when the log shuts down.
    pub async fn follow(
        &self,
        registry: &Registry,
        filter: &Filter,
        who: Follower<'_>,
        ready: impl Fn() -> bool,
        mut on_event: impl FnMut(Arc<Event>) -> bool,
    ) {
        let consumer = who.name;
        loop {
            if !self.wait_for_work(&who.wake.notify, &ready).await {
                return;
            }
            let after = who.wake.take_start();
            let mut sub = self.subscribe_internal(registry.clone(), filter.clone(), after);
            loop {
                let Some(item) = sub.next().await else {
                    return; // the log is closed
                };
                match item {
                    Item::Event(e) => {
                        if !on_event(e) {
                            // Going idle: forget the wakes seen while following, then look
                            // once more, so work given in between goes on from here.
                            who.wake.after.store(u64::MAX, Ordering::SeqCst);
                            if !ready() {
                                break;
                            }
                        }
                    }
                    Item::Lagged { from, to } => {
                        who.missed.fetch_add(to - from + 1, Ordering::Relaxed);
                        tracing::warn!(
                            from,
                            to,
                            "{consumer} fell behind the event log; these events were not seen"
                        );
                    }
                }
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.counted {
            self.log.subscribers().fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Subscription {
    /// The next matching event (or lag notice). `None` when the log is gone.
    pub async fn next(&mut self) -> Option<Item> {
        loop {
            let e = match self.step().await? {
                Step::Event(e) => e,
                Step::Lagged(from, to) => return Some(Item::Lagged { from, to }),
            };
            if self.filter.matches(&e, &self.registry) {
                return Some(Item::Event(e));
            }
        }
    }

    /// The highest sequence number delivered or passed over.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    async fn step(&mut self) -> Option<Step> {
        if let Some(e) = self.held.take() {
            self.cursor = e.seq;
            return Some(Step::Event(e));
        }
        loop {
            while self.replaying {
                if let Some(e) = self.replay.pop_front() {
                    if e.seq <= self.cursor {
                        continue;
                    }
                    return Some(self.accept(e));
                }
                match self.log.read_after(self.cursor, REPLAY_STEP) {
                    Ok(r) if r.events.is_empty() => {
                        // Nothing more stored: a gap up to the next number means it was trimmed.
                        self.replaying = false;
                        if r.next_seq > self.cursor + 1 {
                            let (from, to) = (self.cursor + 1, r.next_seq - 1);
                            self.cursor = to;
                            return Some(Step::Lagged(from, to));
                        }
                    }
                    Ok(r) => self.replay.extend(r.events),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the event log; following live events");
                        self.replaying = false;
                    }
                }
            }
            loop {
                match self.rx.recv().await {
                    Ok(e) if e.seq <= self.cursor => continue,
                    Ok(e) if self.catch_up && e.seq > self.cursor + 1 => {
                        // Behind: the log still holds what the live buffer dropped.
                        self.replaying = true;
                        break;
                    }
                    Ok(e) => return Some(self.accept(e)),
                    Err(RecvError::Lagged(_)) if self.catch_up => {
                        self.replaying = true;
                        break;
                    }
                    // The next receive says where the buffer resumes; `accept` reports the gap.
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    }

    /// Deliver `e`, or first report the gap before it.
    fn accept(&mut self, e: Arc<Event>) -> Step {
        if e.seq > self.cursor + 1 {
            let (from, to) = (self.cursor + 1, e.seq - 1);
            self.cursor = to;
            self.held = Some(e);
            metrics::counter!("twinhost_subscriber_lagged_total").increment(1);
            return Step::Lagged(from, to);
        }
        self.cursor = e.seq;
        Step::Event(e)
    }
}

enum Step {
    Event(Arc<Event>),
    Lagged(u64, u64),
}
