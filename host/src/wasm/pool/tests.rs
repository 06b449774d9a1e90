//! The compute pool's promises: round-robin between caller keys (FIFO within one), bounded
//! queues and patience answered with `Busy`, and no slot lost to a panic, a cancellation, a
//! stop or a waiter that gave up just as it was served.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::*;

fn behavior(n: &str) -> Caller {
    Caller::Behavior(n.into())
}

/// Wait until `n` calls are queued (the tasks that queue them run concurrently).
async fn until_queued(pool: &ComputePool, n: usize) {
    let started = Instant::now();
    while pool.stats().queued != n {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{} queued, waiting for {n}",
            pool.stats().queued
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Queue one waiter for `caller` that records `label` when it gets its slot and then gives
/// it back; returns once it is queued.
async fn queue_one(
    pool: &ComputePool,
    caller: Caller,
    label: String,
    order: &Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    let before = pool.stats().queued;
    let (pool2, order) = (pool.clone(), order.clone());
    let h = tokio::spawn(async move {
        let slot = pool2.acquire_within(&caller, None).await.unwrap();
        order.lock().push(label);
        tokio::task::yield_now().await;
        drop(slot);
    });
    until_queued(pool, before + 1).await;
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_key_takes_turns_with_another_key_each_in_fifo_order() {
    let pool = ComputePool::new(1, 1000);
    let holder = pool.acquire(&Caller::Invoke).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..50 {
        tasks.push(queue_one(&pool, Caller::Invoke, format!("invoke{i}"), &order).await);
    }
    for i in 0..3 {
        tasks.push(queue_one(&pool, behavior("b"), format!("b{i}"), &order).await);
    }
    assert_eq!(pool.stats().by_class[&Class::Invoke].queued, 50);
    assert_eq!(pool.stats().by_class[&Class::Behavior].queued, 3);
    drop(holder);
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().clone();
    // The behavior's three calls were queued behind fifty invokes, yet each waited for one
    // invoke only; both keys kept their own order.
    let mut want: Vec<String> = vec!["invoke0", "b0", "invoke1", "b1", "invoke2", "b2"]
        .into_iter()
        .map(String::from)
        .collect();
    want.extend((3..50).map(|i| format!("invoke{i}")));
    assert_eq!(order, want);
    let s = pool.stats();
    assert_eq!((s.in_use, s.queued), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_behavior_cannot_starve_another() {
    let pool = ComputePool::new(1, 1000);
    let holder = pool.acquire(&behavior("noisy")).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..20 {
        tasks.push(queue_one(&pool, behavior("noisy"), format!("noisy{i}"), &order).await);
    }
    tasks.push(queue_one(&pool, behavior("quiet"), "quiet".into(), &order).await);
    tasks.push(queue_one(&pool, Caller::Rule("r".into()), "rule".into(), &order).await);
    drop(holder);
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().clone();
    assert_eq!(&order[..3], ["noisy0", "quiet", "rule"], "{order:?}");
}

/// Hold a slot for `hold` (as a guest call would), `n` times, returning each wait.
async fn calls(pool: ComputePool, caller: Caller, n: usize, hold: Duration) -> Vec<Duration> {
    let mut waits = Vec::with_capacity(n);
    for _ in 0..n {
        let asked = Instant::now();
        let slot = pool.acquire_within(&caller, None).await.unwrap();
        waits.push(asked.elapsed());
        tokio::time::sleep(hold).await;
        drop(slot);
    }
    waits
}

/// The same workload on a FIFO semaphore (what HTTP invokes used before the pool): the
/// baseline the pool's fairness is measured against.
async fn fifo_calls(sem: Arc<tokio::sync::Semaphore>, n: usize, hold: Duration) -> Vec<Duration> {
    let mut waits = Vec::with_capacity(n);
    for _ in 0..n {
        let asked = Instant::now();
        let permit = sem.acquire().await.unwrap();
        waits.push(asked.elapsed());
        tokio::time::sleep(hold).await;
        drop(permit);
    }
    waits
}

fn max_ms(w: &[Duration]) -> f64 {
    w.iter().max().copied().unwrap_or_default().as_secs_f64() * 1000.0
}

fn mean_ms(w: &[Duration]) -> f64 {
    w.iter().sum::<Duration>().as_secs_f64() * 1000.0 / w.len().max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_behavior_is_served_promptly_while_an_invoke_flood_saturates_the_pool() {
    const FLOOD: usize = 64;
    const HOLD: Duration = Duration::from_millis(2);
    let pool = ComputePool::new(2, 1000);
    let flood: Vec<_> = (0..FLOOD)
        .map(|_| tokio::spawn(calls(pool.clone(), Caller::Invoke, 10, HOLD)))
        .collect();
    until_queued(&pool, FLOOD - 2).await;
    let quiet = calls(pool.clone(), behavior("b"), 20, HOLD).await;
    let mut invoke_waits = Vec::new();
    for f in flood {
        invoke_waits.extend(f.await.unwrap());
    }

    let sem = Arc::new(tokio::sync::Semaphore::new(2));
    let flood: Vec<_> = (0..FLOOD)
        .map(|_| tokio::spawn(fifo_calls(sem.clone(), 10, HOLD)))
        .collect();
    while sem.available_permits() > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let fifo_quiet = fifo_calls(sem.clone(), 20, HOLD).await;
    for f in flood {
        f.await.unwrap();
    }
    eprintln!(
        "behavior wait under a {FLOOD}-caller invoke flood on 2 slots ({HOLD:?} calls): pool \
         mean {:.2} ms max {:.2} ms; FIFO semaphore mean {:.2} ms max {:.2} ms; the invokes' \
         mean wait {:.2} ms",
        mean_ms(&quiet),
        max_ms(&quiet),
        mean_ms(&fifo_quiet),
        max_ms(&fifo_quiet),
        mean_ms(&invoke_waits)
    );
    // Round-robin: the behavior waits for about one call per slot, whatever the flood.
    assert!(
        max_ms(&quiet) < 25.0,
        "the behavior waited up to {:.1} ms",
        max_ms(&quiet)
    );
    assert!(
        mean_ms(&fifo_quiet) > 4.0 * mean_ms(&quiet),
        "FIFO {:.2} ms vs pool {:.2} ms: the pool should be far fairer",
        mean_ms(&fifo_quiet),
        mean_ms(&quiet)
    );
    let s = pool.stats();
    assert_eq!((s.in_use, s.queued, s.busy), (0, 0, 0));
    assert_eq!(s.by_class[&Class::Behavior].granted, 20);
    assert_eq!(s.by_class[&Class::Invoke].granted, (FLOOD * 10) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_busy_at_once_for_that_key_only() {
    let pool = ComputePool::new(1, 2);
    let _holder = pool.acquire(&Caller::Invoke).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let _a = queue_one(&pool, Caller::Invoke, "a".into(), &order).await;
    let _b = queue_one(&pool, Caller::Invoke, "b".into(), &order).await;
    let started = Instant::now();
    let third = pool.acquire(&Caller::Invoke).await;
    assert!(started.elapsed() < Duration::from_millis(100));
    match third {
        Err(Busy::QueueFull { key, bound }) => assert_eq!((key.as_str(), bound), ("invoke", 2)),
        Err(other) => panic!("expected a full queue, got {other}"),
        Ok(_) => panic!("expected a full queue, got a slot"),
    }
    // Another key has its own queue.
    let _r = queue_one(&pool, Caller::Rule("r".into()), "r".into(), &order).await;
    let s = pool.stats();
    assert_eq!(s.queued, 3);
    assert_eq!(s.by_class[&Class::Invoke].busy, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_work_taking_another_turn_is_not_refused_by_a_full_queue() {
    let pool = ComputePool::new(1, 1);
    let holder = pool.acquire(&Caller::Invoke).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let fresh = queue_one(&pool, Caller::Invoke, "fresh".into(), &order).await;
    assert!(matches!(
        pool.acquire(&Caller::Invoke).await,
        Err(Busy::QueueFull { .. })
    ));
    let p = pool.clone();
    let again = tokio::spawn(async move { p.acquire_again(&Caller::Invoke).await.is_ok() });
    until_queued(&pool, 2).await;
    // Still full for new work; the next turn waits in FIFO order behind it.
    assert!(matches!(
        pool.acquire(&Caller::Invoke).await,
        Err(Busy::QueueFull { .. })
    ));
    drop(holder);
    fresh.await.unwrap();
    assert!(again.await.unwrap());
    assert_eq!(*order.lock(), ["fresh"]);
    let s = pool.stats();
    assert_eq!((s.in_use, s.queued), (0, 0));
}

#[tokio::test]
async fn a_caller_out_of_patience_is_busy_and_leaves_the_queue() {
    let pool = ComputePool::new(1, 8);
    let holder = pool.acquire(&Caller::Invoke).await.unwrap();
    let started = Instant::now();
    let r = pool
        .acquire_within(&Caller::Resolver, Some(Duration::from_millis(50)))
        .await;
    let took = started.elapsed();
    match r {
        Err(Busy::NoSlot { waited }) => assert!(waited >= Duration::from_millis(50)),
        Err(other) => panic!("expected no slot, got {other}"),
        Ok(_) => panic!("expected no slot, got one"),
    }
    assert!(took < Duration::from_millis(500), "{took:?}");
    let s = pool.stats();
    assert_eq!((s.in_use, s.queued, s.busy), (1, 0, 1));
    assert_eq!(s.by_class[&Class::Resolver].busy, 1);
    // The slot goes back to the pool, not to the caller that gave up.
    drop(holder);
    assert_eq!(pool.stats().in_use, 0);
    let _again = pool
        .acquire_within(&Caller::Resolver, Some(Duration::ZERO))
        .await
        .unwrap();
}

#[tokio::test]
async fn zero_patience_takes_a_free_slot_or_is_busy_without_queueing() {
    let pool = ComputePool::new(1, 8);
    let holder = pool
        .acquire_within(&Caller::Invoke, Some(Duration::ZERO))
        .await
        .unwrap();
    let r = pool
        .acquire_within(&behavior("tick"), Some(Duration::ZERO))
        .await;
    assert!(matches!(r, Err(Busy::NoSlot { waited }) if waited == Duration::ZERO));
    assert_eq!(pool.stats().queued, 0);
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_comes_back_after_a_panic_a_cancel_or_an_abandoned_wait() {
    let pool = ComputePool::new(1, 8);
    let free_now = |pool: &ComputePool| {
        let pool = pool.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(2), pool.acquire(&Caller::Invoke))
                .await
                .expect("a slot within 2 s")
                .expect("a slot")
        }
    };
    // A holder that panics on a blocking thread (as a guest call would run).
    let slot = pool.acquire(&Caller::Invoke).await.unwrap();
    let panicked = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        panic!("the call panics");
    })
    .await;
    assert!(panicked.is_err());
    assert_eq!(pool.stats().in_use, 0);
    // A holder whose task is aborted mid-call.
    let p = pool.clone();
    let held = tokio::spawn(async move {
        let _slot = p.acquire(&Caller::Invoke).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    while pool.stats().in_use == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // A waiter behind it whose caller goes away.
    let p = pool.clone();
    let waiter = tokio::spawn(async move {
        let _slot = p.acquire_within(&behavior("gone"), None).await;
        unreachable!("aborted before it is served");
    });
    until_queued(&pool, 1).await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    assert_eq!(pool.stats().queued, 0);
    held.abort();
    let _ = held.await;
    assert_eq!(pool.stats().in_use, 0);
    let slot = free_now(&pool).await;
    assert_eq!(pool.stats().in_use, 1);
    drop(slot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_slot_is_lost_when_waiters_give_up_as_slots_free() {
    let pool = ComputePool::new(2, 10_000);
    let tasks: Vec<_> = (0..400u64)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let caller = if i % 3 == 0 {
                    Caller::Invoke
                } else {
                    Caller::Behavior(format!("b{}", i % 7))
                };
                let patience = Duration::from_micros(200 * (i % 5));
                if let Ok(slot) = pool.acquire_within(&caller, Some(patience)).await {
                    tokio::time::sleep(Duration::from_micros(300)).await;
                    drop(slot);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let s = pool.stats();
    assert_eq!((s.in_use, s.queued), (0, 0), "{s:?}");
    let granted: u64 = s.by_class.values().map(|c| c.granted).sum();
    assert_eq!(granted + s.busy, 400, "{s:?}");
    let a = pool.acquire(&Caller::Invoke).await.unwrap();
    let b = pool.acquire(&Caller::Invoke).await.unwrap();
    assert_eq!(pool.stats().in_use, 2);
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_refuses_waiters_and_newcomers_and_lets_holders_finish() {
    let pool = ComputePool::new(1, 8);
    let holder = pool.acquire(&Caller::Invoke).await.unwrap();
    let p = pool.clone();
    let waiter = tokio::spawn(async move { p.acquire_within(&behavior("b"), None).await });
    until_queued(&pool, 1).await;
    pool.stop();
    assert!(matches!(waiter.await.unwrap(), Err(Busy::Stopped)));
    assert!(matches!(
        pool.acquire(&Caller::Invoke).await,
        Err(Busy::Stopped)
    ));
    assert_eq!(pool.stats().in_use, 1);
    drop(holder);
    assert_eq!(pool.stats().in_use, 0);
}

#[test]
fn the_pool_never_outgrows_the_instance_pool() {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let sized = |slots| PoolConfig {
        slots,
        queue_per_caller: 8,
    };
    assert_eq!(sized(None).size(64), cores.min(64));
    assert_eq!(sized(Some(100)).size(64), 64);
    assert_eq!(sized(Some(3)).size(64), 3);
    assert_eq!(sized(Some(0)).size(64), 1);
    assert_eq!(ComputePool::new(0, 0).size(), 1);
}

#[test]
fn caller_keys_and_classes() {
    assert_eq!(Caller::Invoke.key(), "invoke");
    assert_eq!(behavior("m").key(), "behavior:m");
    assert_eq!(Caller::Rule("r".into()).key(), "rule:r");
    assert_eq!(Caller::Resolver.key(), "resolver");
    assert_eq!(behavior("m").class(), Class::Behavior);
    assert_eq!(behavior("m").patience(), None);
    assert_eq!(Caller::Invoke.patience(), Some(INVOKE_PATIENCE));
}
