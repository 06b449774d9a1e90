//! The writer's contract: jobs run in the order they were queued, a job is acknowledged only
//! once its log frame is on disk (and a reopened store finds it), a full queue answers
//! `Overloaded` and a stopped one `Closed`, and a checkpoint folds raw key/value changes into
//! sled and lets the log go.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CommitHandle, Numbering, StateSource, QUEUE_CAPACITY};
use crate::store::{wal, Store, StoreError};
use crate::types::TwinId;

/// No twins: these tests write raw keys only.
pub(crate) struct NoTwins;

impl StateSource for NoTwins {
    fn twin_bytes(&self, _: &TwinId) -> Option<Vec<u8>> {
        None
    }
    fn contains(&self, _: &TwinId) -> bool {
        false
    }
    fn twin_count(&self) -> usize {
        0
    }
    fn twin_ids(&self) -> Vec<TwinId> {
        Vec::new()
    }
}

/// Open (or reopen) a store in `dir` and start its writer, as the registry does.
fn open(dir: &std::path::Path, checkpoint_every: Duration) -> (Store, CommitHandle) {
    let store = Store::open(dir)
        .expect("opening the store")
        .with_checkpoint_every(checkpoint_every);
    let last = store.recover().expect("recovering").last_segment;
    let commit = store
        .start_committer(Arc::new(NoTwins), last, None, Numbering::default())
        .expect("starting the writer");
    (store, commit)
}

/// Every `Put` of `key` in the log after the last checkpoint.
fn logged_puts(store: &Store, key: &[u8]) -> usize {
    let (entries, _) = wal::read_after(&store.wal_dir, 0).expect("reading the log");
    entries
        .iter()
        .filter(|e| matches!(e, wal::Entry::Put(k, _) if k == key))
        .count()
}

#[tokio::test]
async fn jobs_run_in_the_order_they_were_queued() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit) = open(dir.path(), Duration::from_secs(60));
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    // Queued back to back, so several are folded into one commit; the writer must still run
    // them in queue order. Each future sends its job on its first poll: poll them once, in
    // order, before waiting for all (unconstrained: tokio's cooperative budget would
    // otherwise make the 129th send yield and retry later, out of order).
    let mut jobs: Vec<_> = (0..200u32)
        .map(|i| {
            let seen = seen.clone();
            Box::pin(tokio::task::unconstrained(commit.run(move |b| {
                seen.lock().push(i);
                b.put(format!("k{i:03}").into_bytes(), vec![]);
                i
            })))
        })
        .collect();
    for job in &mut jobs {
        assert!(futures::poll!(job.as_mut()).is_pending(), "not yet durable");
    }
    let results = futures::future::join_all(jobs).await;
    let results: Vec<u32> = results.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(
        results,
        (0..200).collect::<Vec<_>>(),
        "each job gets its own output"
    );
    assert_eq!(*seen.lock(), (0..200).collect::<Vec<_>>());
    // The log holds their entries in the same order.
    let (entries, _) = wal::read_after(&store.wal_dir, 0).unwrap();
    let keys: Vec<Vec<u8>> = entries
        .into_iter()
        .filter_map(|e| match e {
            wal::Entry::Put(k, _) => Some(k),
            _ => None,
        })
        .collect();
    let want: Vec<Vec<u8>> = (0..200).map(|i| format!("k{i:03}").into_bytes()).collect();
    assert_eq!(keys, want);
    commit.shutdown();
}

#[tokio::test]
async fn a_job_is_acknowledged_after_its_frame_is_written_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit) = open(dir.path(), Duration::from_secs(60));
    let wal_dir = store.wal_dir.clone();
    // What the log holds when the writer calls back "durable", before the caller hears.
    let logged_at_ack = commit
        .run_then(
            |b| {
                b.put(b"k1".to_vec(), b"v1".to_vec());
                ((), ())
            },
            move |()| {
                let (entries, _) = wal::read_after(&wal_dir, 0).unwrap();
                assert!(
                    entries
                        .iter()
                        .any(|e| matches!(e, wal::Entry::Put(k, v) if k == b"k1" && v == b"v1")),
                    "the frame is in the log before the job is acknowledged"
                );
            },
        )
        .await;
    logged_at_ack.expect("the job is acknowledged");
    assert_eq!(logged_puts(&store, b"k1"), 1);
    commit.shutdown();
    drop(store);

    let (store, commit) = open(dir.path(), Duration::from_secs(60));
    assert_eq!(store.get(b"k1").unwrap().as_deref(), Some(&b"v1"[..]));
    commit.shutdown();
}

#[tokio::test]
async fn a_stopped_writer_answers_closed_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit) = open(dir.path(), Duration::from_secs(60));
    commit
        .run(|b| b.put(b"a".to_vec(), b"1".to_vec()))
        .await
        .unwrap();
    commit.shutdown();
    let r = commit.run(|b| b.put(b"b".to_vec(), b"2".to_vec())).await;
    assert!(matches!(r, Err(StoreError::Closed)), "{r:?}");
    drop(commit);
    drop(store);
    let (store, commit) = open(dir.path(), Duration::from_secs(60));
    assert!(store.get(b"a").unwrap().is_some());
    assert!(
        store.get(b"b").unwrap().is_none(),
        "a refused job wrote nothing"
    );
    commit.shutdown();
}

/// With the writer held inside a job and the queue full, a producer waits
/// `ENQUEUE_TIMEOUT` (virtual time here) and gets `Overloaded`; once the writer moves on,
/// everything queued commits.
#[tokio::test(start_paused = true)]
async fn a_full_queue_answers_overloaded() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, commit) = open(dir.path(), Duration::from_secs(60));
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let blocker = {
        let commit = commit.clone();
        tokio::spawn(async move {
            commit
                .run(move |_| {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                })
                .await
        })
    };
    tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
        .await
        .unwrap();
    let queued: Vec<_> = (0..QUEUE_CAPACITY)
        .map(|_| {
            let commit = commit.clone();
            tokio::spawn(async move { commit.run(|_| ()).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while commit.queue_depth() < QUEUE_CAPACITY {
        assert!(
            Instant::now() < deadline,
            "queue at {}",
            commit.queue_depth()
        );
        tokio::task::yield_now().await;
    }
    let r = commit.run(|_| ()).await;
    assert!(matches!(r, Err(StoreError::Overloaded)), "{r:?}");

    release_tx.send(()).unwrap();
    blocker.await.unwrap().unwrap();
    for q in queued {
        q.await
            .unwrap()
            .expect("queued jobs commit once the writer moves on");
    }
    commit.shutdown();
}

#[tokio::test]
async fn a_checkpoint_folds_raw_changes_into_sled_and_drops_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit) = open(dir.path(), Duration::from_millis(50));
    commit
        .run(|b| {
            b.put(b"m/keep".to_vec(), b"1".to_vec());
            b.put(b"m/gone".to_vec(), b"2".to_vec());
            b.put(b"p/x".to_vec(), b"3".to_vec());
            b.put(b"p/y".to_vec(), b"4".to_vec());
        })
        .await
        .unwrap();
    commit
        .run(|b| {
            b.delete_key(b"m/gone".to_vec());
            b.delete_prefix(b"p/".to_vec());
        })
        .await
        .unwrap();
    // The raw changes are in the log; a time-based checkpoint writes them to sled, and is
    // counted once it has finished (a moment after its writes are visible).
    let deadline = Instant::now() + Duration::from_secs(10);
    let counted = || {
        commit
            .stats
            .checkpoints
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    };
    while store.get(b"m/keep").unwrap().is_none() || !counted() {
        assert!(Instant::now() < deadline, "no checkpoint within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        commit
            .stats
            .checkpoints
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(store.get(b"m/keep").unwrap().as_deref(), Some(&b"1"[..]));
    assert!(store.get(b"m/gone").unwrap().is_none());
    assert!(store.get(b"p/x").unwrap().is_none() && store.get(b"p/y").unwrap().is_none());
    // The covered segments are gone: the log after the marker no longer holds the put.
    let marker = store.checkpoint_marker().unwrap();
    assert!(marker >= 1, "checkpoint marker {marker}");
    let (entries, _) = wal::read_after(&store.wal_dir, marker).unwrap();
    assert!(
        !entries
            .iter()
            .any(|e| matches!(e, wal::Entry::Put(k, _) if k == b"m/keep")),
        "the checkpointed put is still in the log"
    );
    commit.shutdown();
}
