//! The command line: `serve`, client subcommands for the common calls, `token`, and `bench`.
//!
//! Owns: argument parsing (clap; every flag also a `TWINHOST_*` variable) and turning
//! commands into either a server run or HTTP calls. Must never: reach into the store of a
//! running server — client commands go through the HTTP API like any other client.

mod batches;
mod bench;
mod client;
mod import;
pub(crate) mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::types::Role;

/// Default listen address: loopback only, so a first start exposes nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "twinhost-data";

#[derive(Parser, Debug)]
#[command(
    name = "twinhost",
    version,
    about = "Digital twin host: registry, durable store, history and WebAssembly logic"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server on its embedded store.
    Serve(serve::ServeArgs),
    /// Create, read, patch and delete twins.
    Twin {
        #[command(subcommand)]
        cmd: client::TwinCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a query (a JSON body as for POST /v1/query, inline or @file).
    Query {
        query: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage entity-type models.
    Model {
        #[command(subcommand)]
        cmd: client::ModelCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage WebAssembly modules.
    Module {
        #[command(subcommand)]
        cmd: client::ModuleCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Bind behavior modules to entity types or twins.
    Behavior {
        #[command(subcommand)]
        cmd: client::BehaviorCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Workflow runs: start one from a spec file, read, list, cancel.
    Workflow {
        #[command(subcommand)]
        cmd: client::WorkflowCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// The nodes this one syncs with.
    Peer {
        #[command(subcommand)]
        cmd: client::PeerCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage event-processing rules.
    Rule {
        #[command(subcommand)]
        cmd: client::RuleCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Follow the event stream.
    Events {
        #[command(subcommand)]
        cmd: client::EventsCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Invoke a compute module on twins (by id, or all twins matching a query).
    Invoke {
        module: String,
        /// Twin ids.
        #[arg(long = "twin", num_args = 1..)]
        twins: Vec<String>,
        /// A query (JSON as for POST /v1/query, inline or @file) instead of ids.
        #[arg(long, conflicts_with = "twins")]
        query: Option<String>,
        /// Parameters (a JSON object, inline or @file).
        #[arg(long, default_value = "{}")]
        parameters: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Bulk-ingest a JSON array or NDJSON file (`-`: stdin) of updates, with a progress bar.
    Ingest {
        file: PathBuf,
        /// Items per request (each request is one durable commit).
        #[arg(long, default_value_t = 20_000)]
        batch: usize,
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Measure throughput and latency on this machine (in process and over HTTP), with the
    /// seed's Python orchestrator as the baseline when python3 is present.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token with a role (needs the admin token).
    Create {
        #[arg(long, value_enum)]
        role: Role,
    },
}

/// How a client command reaches the server.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Server URL.
    #[arg(
        long,
        env = "TWINHOST_URL",
        default_value = "http://127.0.0.1:7878",
        global = true
    )]
    pub url: String,
    /// API token; by default the admin token in the data directory.
    #[arg(long, env = "TWINHOST_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory holding `admin.token`.
    #[arg(long, env = "TWINHOST_DATA_DIR", default_value = DEFAULT_DATA_DIR, global = true)]
    pub data_dir: PathBuf,
}

/// Parse the command line and run it.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        // A client command piped into `head` ends quietly when the pipe closes, like any Unix
        // tool, instead of panicking in println!. (The server keeps Rust's ignored SIGPIPE:
        // a closed socket is an error to handle, not a reason to die.)
        // SAFETY: setting a signal's disposition to the default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => {
            init_tracing("info,tower_http=info,sled=warn");
            let r = rt.block_on(serve::run(args));
            // Writes are drained and flushed by now; a guest call still running on a
            // blocking thread (past the drain timeout) is not waited for.
            rt.shutdown_timeout(std::time::Duration::from_millis(500));
            r
        }
        Command::Bench(args) => {
            // Quiet by default (the bench prints its own progress); RUST_LOG shows the
            // nodes' logs, e.g. `RUST_LOG=twinhost::store=debug` for checkpoint times.
            init_tracing("warn");
            rt.block_on(bench::run(args))
        }
        Command::Twin { cmd, conn } => rt.block_on(client::twin(conn, cmd)),
        Command::Query { query, conn } => rt.block_on(client::query(conn, query)),
        Command::Model { cmd, conn } => rt.block_on(client::model(conn, cmd)),
        Command::Module { cmd, conn } => rt.block_on(client::module(conn, cmd)),
        Command::Behavior { cmd, conn } => rt.block_on(client::behavior(conn, cmd)),
        Command::Rule { cmd, conn } => rt.block_on(client::rule(conn, cmd)),
        Command::Peer { cmd, conn } => rt.block_on(client::peer(conn, cmd)),
        Command::Workflow { cmd, conn } => rt.block_on(client::workflow(conn, cmd)),
        Command::Events { cmd, conn } => rt.block_on(client::events(conn, cmd)),
        Command::Invoke {
            module,
            twins,
            query,
            parameters,
            conn,
        } => rt.block_on(client::invoke(conn, module, twins, query, parameters)),
        Command::Ingest { file, batch, conn } => rt.block_on(client::ingest(conn, file, batch)),
        Command::Token {
            cmd: TokenCmd::Create { role },
            conn,
        } => rt.block_on(client::token_create(conn, role)),
    }
}

/// Log to stderr, filtered by `RUST_LOG` or else by `default`.
fn init_tracing(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Parse a listen address with a clear error.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address like 127.0.0.1:7878"))
}
