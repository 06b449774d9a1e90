//! twinhost: a digital twin host.
//!
//! Layers, from the bottom (a layer never imports one above it):
//! 1. [`store`] (sled, group commit) and [`types`] (twin, ids, clocks);
//! 2. [`registry`] (models, the one write path, indexes, queries) and [`history`];
//! 3. [`events`] (event log, subscriptions, rules);
//! 4. [`wasm`] (modules, compute, behaviors) and [`sync`] (pulling peers' change feeds);
//! 5. [`api`] and [`cli`] — the only places that know HTTP or the command line.

pub mod api;
pub mod cli;
pub mod events;
pub mod history;
pub mod registry;
pub mod store;
pub mod sync;
pub mod types;
pub mod wasm;
pub mod workflow;
