//! Randomized convergence through the link code itself: three in-process nodes (each opened
//! as `serve` opens one) joined in a triangle by simulated links that carry the real
//! [`link::run`] protocol over in-memory pipes, each message delayed at random (a link keeps
//! its order, as a WebSocket does; links race each other). Seeded steps make concurrent
//! creates (of the same ids), patches, deletes, lifecycle changes and relationship edits on
//! random nodes, cut and heal links at random (a cut ends both sides' link, as a network
//! failure does) and restart nodes (a clean stop and a reopen of the same directory). Then
//! every link heals, and once the nodes are quiet every node must hold byte-identical twins
//! (`registry::convergence_tests::canonical`).
//!
//! The registry-level test (`registry::convergence_tests`) covers the conflict strategies
//! and the faults a link cannot show (dropped and duplicated pages); this one covers what
//! the registry test simulates: handshakes, resume points, acknowledgements, catch-up after a
//! cut or a restart, coalescing and the flush window. `TWINHOST_LINK_SEEDS=N` runs seeds
//! `0..N` (8 by default); `TWINHOST_LINK_SEED=k` replays seed `k` alone. A failing seed
//! names itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::link::{self, Out};
use super::protocol::Frame;
use crate::cli::serve::{open_default_node, Node};
use crate::registry::convergence_tests::{canonical, diff, pool, properties, Rng};
use crate::registry::{NewTwin, Update};
use crate::types::{Lifecycle, TwinId};

const NAMES: [&str; 3] = ["la", "lb", "lc"];
const STEPS: usize = 120;
const DEFAULT_SEEDS: u64 = 8;
/// How long the nodes have to agree after the last link heals.
const QUIET_WITHIN: Duration = Duration::from_secs(30);

/// One direction of a simulated link: what one side writes reaches the other in order, each
/// message after a random delay (below 3 ms), until the link is cut.
fn pipe(
    cut: CancellationToken,
    seed: u64,
) -> (
    impl futures::Sink<Out, Error = anyhow::Error> + Send + Unpin + 'static,
    impl futures::Stream<Item = anyhow::Result<Frame>> + Send + Unpin + 'static,
) {
    let (tx, mut from) = futures::channel::mpsc::unbounded::<Out>();
    let (to, rx) = futures::channel::mpsc::unbounded::<anyhow::Result<Frame>>();
    tokio::spawn(async move {
        let mut rng = Rng(seed);
        loop {
            let out = tokio::select! {
                o = from.next() => match o { Some(o) => o, None => return },
                () = cut.cancelled() => return,
            };
            if rng.percent(30) {
                tokio::time::sleep(Duration::from_micros(rng.below(3000) as u64)).await;
            }
            let frame = match out {
                Out::Text(t) => Frame::Text(t),
                Out::Binary(b) => Frame::Binary(b.into()),
                Out::Ping => Frame::Other,
                Out::Close(c) => Frame::Close(Some(c)),
            };
            if to.unbounded_send(Ok(frame)).is_err() {
                return;
            }
        }
    });
    (tx.sink_map_err(anyhow::Error::from), rx)
}

struct Sim {
    seed: u64,
    rng: Rng,
    dirs: Vec<tempfile::TempDir>,
    nodes: Vec<Option<Node>>,
    /// The cut token of each pair's link (`None`: cut).
    links: Vec<((usize, usize), Option<CancellationToken>)>,
    ids: Vec<TwinId>,
    trace: Vec<String>,
    tally: Tally,
}

/// What the runs did, so the test can show it exercised what it claims.
#[derive(Default, Debug)]
struct Tally {
    writes_ok: u64,
    cuts: u64,
    restarts: u64,
    /// Remote changes that changed something where they arrived.
    merged: u64,
    /// Twins on each node once settled, summed over the seeds.
    twins_at_end: usize,
}

impl Sim {
    async fn new(seed: u64) -> Sim {
        let mut dirs = Vec::new();
        let mut nodes = Vec::new();
        for name in NAMES {
            let dir = tempfile::tempdir().unwrap();
            nodes.push(Some(
                open_default_node(dir.path(), name, true).await.unwrap(),
            ));
            dirs.push(dir);
        }
        let mut sim = Sim {
            seed,
            rng: Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5EED),
            dirs,
            nodes,
            links: vec![((0, 1), None), ((0, 2), None), ((1, 2), None)],
            ids: pool(),
            trace: Vec::new(),
            tally: Tally::default(),
        };
        for l in 0..sim.links.len() {
            sim.link(l);
        }
        sim
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("the node is open")
    }

    /// Join a pair with a fresh link (the lower node dials, as a dialing pair settles).
    fn link(&mut self, l: usize) {
        let ((a, b), _) = self.links[l];
        let cut = CancellationToken::new();
        let (a_tx, b_rx) = pipe(cut.clone(), self.rng.next());
        let (b_tx, a_rx) = pipe(cut.clone(), self.rng.next());
        let (ctx_a, ctx_b) = (
            Arc::clone(&self.node(a).state.peers.0),
            Arc::clone(&self.node(b).state.peers.0),
        );
        tokio::spawn(link::run(
            ctx_a,
            Box::pin(a_tx),
            Box::pin(a_rx),
            true,
            Some(NAMES[b].to_owned()),
            |_| {},
        ));
        tokio::spawn(link::run(
            ctx_b,
            Box::pin(b_tx),
            Box::pin(b_rx),
            false,
            None,
            |_| {},
        ));
        self.links[l].1 = Some(cut);
    }

    fn cut(&mut self, l: usize) {
        if let Some(c) = self.links[l].1.take() {
            c.cancel();
            self.tally.cuts += 1;
        }
    }

    async fn restart(&mut self, i: usize) {
        for l in 0..self.links.len() {
            let (a, b) = self.links[l].0;
            if a == i || b == i {
                self.cut(l);
            }
        }
        let node = self.nodes[i].take().expect("the node is open");
        self.tally.merged += applied(&node);
        self.tally.restarts += 1;
        node.state.peers.stop();
        node.state.runtime.stop();
        node.registry.shutdown();
        node.events.shutdown();
        drop(node);
        // sled lets go of its directory a moment after its last handle is dropped.
        let mut tries = 0;
        let node = loop {
            match open_default_node(self.dirs[i].path(), NAMES[i], true).await {
                Ok(n) => break n,
                Err(_) if tries < 300 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("reopening {}: {e:#}", NAMES[i]),
            }
        };
        self.nodes[i] = Some(node);
    }

    async fn step(&mut self) {
        let i = self.rng.below(NAMES.len());
        let id = *self.rng.pick(&self.ids);
        let reg = self.node(i).registry.clone();
        let what = match self.rng.below(20) {
            0..=3 => {
                let r = reg
                    .create(NewTwin {
                        id: Some(id),
                        entity_type: "machine".into(),
                        properties: properties(&mut self.rng, 3),
                        ..Default::default()
                    })
                    .await;
                format!("create {id}: {}", r.is_ok())
            }
            4..=10 => {
                let mut p = properties(&mut self.rng, 3);
                p.insert("n".into(), json!(self.rng.below(1000)));
                let r = reg.patch(Update::new(id, p)).await;
                format!("patch {id}: {}", r.is_ok())
            }
            11 => format!("delete {id}: {}", reg.delete(id, true).await.is_ok()),
            12 => {
                let s =
                    *self
                        .rng
                        .pick(&[Lifecycle::Active, Lifecycle::Suspended, Lifecycle::Retired]);
                format!(
                    "lifecycle {id} {s:?}: {}",
                    reg.set_lifecycle(id, s).await.is_ok()
                )
            }
            13 => {
                let target = *self.rng.pick(&self.ids);
                let r = reg
                    .put_relationship(id, "feeds", target, json!({"k": self.rng.below(9)}))
                    .await;
                format!("relate {id} -> {target}: {}", r.is_ok())
            }
            14 => {
                let target = *self.rng.pick(&self.ids);
                let r = reg.delete_relationship(id, "feeds", target).await;
                format!("unrelate {id} -> {target}: {}", r.is_ok())
            }
            15..=17 => {
                let l = self.rng.below(self.links.len());
                if self.links[l].1.is_some() {
                    self.cut(l);
                    format!("cut {:?}", self.links[l].0)
                } else {
                    self.link(l);
                    format!("heal {:?}", self.links[l].0)
                }
            }
            18 => {
                self.restart(i).await;
                format!("restart {}", NAMES[i])
            }
            _ => {
                let ms = self.rng.below(20) as u64;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                format!("wait {ms} ms")
            }
        };
        if what.ends_with(": true") {
            self.tally.writes_ok += 1;
        }
        self.trace.push(format!("{} {what}", NAMES[i]));
    }

    /// Heal every link, then wait until every node holds the same state.
    async fn settle(&mut self) {
        for l in 0..self.links.len() {
            if self.links[l].1.is_none() {
                self.link(l);
            }
        }
        let started = Instant::now();
        loop {
            let states: Vec<_> = (0..NAMES.len())
                .map(|i| canonical(&self.node(i).registry, &self.ids))
                .collect();
            let same = states
                .iter()
                .all(|s| serde_json::to_vec(s).unwrap() == serde_json::to_vec(&states[0]).unwrap());
            if same {
                self.tally.twins_at_end += self.node(0).registry.twin_count();
                return;
            }
            if started.elapsed() > QUIET_WITHIN {
                let mut report = String::new();
                diff(&states, &mut report);
                panic!(
                    "seed {}: the nodes did not converge within {QUIET_WITHIN:?} after healing \
                     (replay: TWINHOST_LINK_SEED={} cargo test --release -p twinhost --lib \
                     sync::link_convergence_tests)\nlast steps:\n  {}\ndifferences:\n{report}",
                    self.seed,
                    self.seed,
                    self.trace[self.trace.len().saturating_sub(30)..].join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(mut self) -> Tally {
        for l in 0..self.links.len() {
            self.cut(l);
        }
        for n in self.nodes.iter_mut().filter_map(Option::take) {
            self.tally.merged += applied(&n);
            n.state.peers.stop();
            n.state.runtime.stop();
            n.registry.shutdown();
            n.events.shutdown();
        }
        self.tally
    }
}

/// Remote changes a node merged that changed something there.
fn applied(n: &Node) -> u64 {
    n.state
        .peers
        .0
        .stats
        .applied
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_linked_through_the_link_code_converge() {
    let seeds: Vec<u64> = match env_u64("TWINHOST_LINK_SEED") {
        Some(k) => vec![k],
        None => (0..env_u64("TWINHOST_LINK_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect(),
    };
    let started = Instant::now();
    let mut all = Tally::default();
    for seed in &seeds {
        let mut sim = Sim::new(*seed).await;
        for _ in 0..STEPS {
            sim.step().await;
        }
        sim.settle().await;
        let t = sim.stop();
        all.writes_ok += t.writes_ok;
        all.cuts += t.cuts;
        all.restarts += t.restarts;
        all.merged += t.merged;
        all.twins_at_end += t.twins_at_end;
    }
    eprintln!(
        "{} seeds converged through the link code in {:.1} s: {all:?}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    // The runs did what the test claims: writes landed and travelled, links were cut and
    // nodes restarted, and twins were left to compare.
    assert!(all.writes_ok > 0 && all.merged > 0, "{all:?}");
    if seeds.len() >= 4 {
        assert!(
            all.cuts > 0 && all.restarts > 0 && all.twins_at_end > 0,
            "{all:?}"
        );
    }
}
