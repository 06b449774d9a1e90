//! End-to-end tests: each test starts the real `twinhost` binary on a free port with its own
//! temporary data directory and talks to it over HTTP (or runs the client CLI against it).
//!
//! One test binary, one module per subject. Run one subject with a filter, e.g.
//! `cargo test -p twinhost --test e2e twins::` or `--test e2e events::resume::`.
//!
//! - [`common`]: starting, stopping, killing and restarting a server; the HTTP client and
//!   the streaming (SSE, WebSocket) clients; guest components; shared data helpers.
//! - API subjects: [`auth`], [`twins`], [`bulk`], [`relationships`], [`query`], [`ingest`],
//!   [`history`], [`limits`], [`changes`].
//! - Events: [`events`] (live streams, resume, the stored log, crashes).
//! - Guests: [`wasm`] (compute modules), [`sandbox`] (guests that wait), [`behaviors`],
//!   [`rules`], [`pool`] (the compute pool under an invoke flood), [`ticks`] (periodic
//!   simulation).
//! - Sync: [`sync`] (links, catch-up, relay, partitions, anti-entropy), [`conflicts`] (the
//!   conflict strategies between real servers).
//! - The process: [`ops`] (health, metrics, SIGTERM), [`durability`] (restart and kill -9
//!   keep every acknowledged write), [`cli`] (the client commands).
//!
//! Request parsing and error mapping that need no process are tested in-process, next to the
//! router, in `host/src/api/tests.rs`.

mod common;

mod auth;
mod behaviors;
mod bulk;
mod changes;
mod cli;
mod conflicts;
mod durability;
mod events;
mod history;
mod ingest;
mod limits;
mod ops;
mod pool;
mod query;
mod relationships;
mod replicated;
mod rules;
mod sandbox;
mod sync;
mod ticks;
mod twins;
mod wasm;
mod workflows;
