//! Growth, shrinkage, and boots that fail.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{alive, local_backend, pool, within, Recording};
use firebrand::{BootError, CallError, LocalBackend, PoolError, PoolStats};
use firebrand_runner::PID;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn grows_to_max_under_load_and_no_further() {
    let backend = Recording::new(local_backend());
    let pool = pool()
        .backend(backend.clone())
        .max(3)
        .max_concurrency(2)
        .build()
        .await
        .unwrap();
    let mut counts = pool.watch_runners();
    let peak = Arc::new(parking_lot::Mutex::new(PoolStats::default()));
    let watcher = tokio::spawn({
        let peak = Arc::clone(&peak);
        async move {
            while counts.changed().await.is_ok() {
                let now = *counts.borrow_and_update();
                let mut peak = peak.lock();
                peak.ready = peak.ready.max(now.ready);
                peak.booting = peak.booting.max(now.ready + now.booting + now.draining);
            }
        }
    });
    common::concurrent_sleeps(&pool, 12, 400).await;
    assert_eq!(backend.boots(), 3, "exactly max runners were booted");
    let peak = *peak.lock();
    assert_eq!(peak.ready, 3, "all of max came up");
    assert!(peak.booting <= 3, "never more than max at once: {peak:?}");
    pool.shutdown().await;
    watcher.abort();
    for pid in backend.pids() {
        assert!(!alive(pid), "runner {pid} left running after shutdown");
    }
}

#[tokio::test]
async fn idle_runners_shut_down_while_min_runners_stay() {
    let backend = Recording::new(local_backend());
    let pool = pool()
        .backend(backend.clone())
        .min(1)
        .max(3)
        .max_concurrency(1)
        .idle_shutdown_after(SECOND)
        .build()
        .await
        .unwrap();
    let min_pid = pool.call(&PID, ()).await.unwrap();
    common::concurrent_sleeps(&pool, 3, 500).await;
    assert_eq!(backend.boots(), 3);
    let mut counts = pool.watch_runners();
    within(
        10 * SECOND,
        counts.wait_for(|c| c.ready == 1 && c.draining == 0),
    )
    .await
    .unwrap();
    for pid in backend.pids().into_iter().filter(|p| *p != min_pid) {
        common::wait_dead(pid, 5 * SECOND).await;
    }
    // The min runner outlives several idle periods.
    let shrank = tokio::time::timeout(3 * SECOND, counts.wait_for(|c| c.ready == 0)).await;
    assert!(shrank.is_err(), "the min runner stopped");
    assert_eq!(pool.call(&PID, ()).await.unwrap(), min_pid);
    pool.shutdown().await;
    common::wait_dead(min_pid, 5 * SECOND).await;
}

#[tokio::test]
async fn boot_timeout_terminates_the_runner() {
    // `sleep` never dials back: the pool must give up on it and kill it.
    let backend = Recording::new(LocalBackend::builder().command("sleep").arg("600").build());
    let pool = pool()
        .backend(backend.clone())
        .boot_timeout(Duration::from_millis(700))
        .boot_attempts(1)
        .build()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    match within(10 * SECOND, pool.call(&PID, ())).await {
        Err(CallError::BootFailed(e)) => {
            assert!(
                matches!(*e, BootError::Timeout(t) if t == Duration::from_millis(700)),
                "{e}"
            )
        }
        other => panic!("expected a boot timeout, got {other:?}"),
    }
    assert!(started.elapsed() < 5 * SECOND);
    let pids = backend.pids();
    assert_eq!(pids.len(), 1);
    assert!(
        !alive(pids[0]),
        "the timed-out machine was terminated before the error"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn a_runner_that_crashes_at_boot_fails_fast_with_its_exit_status() {
    let pool = pool()
        .backend(LocalBackend::builder().command("false").build())
        .boot_attempts(1)
        .build()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    match within(10 * SECOND, pool.call(&PID, ())).await {
        Err(CallError::BootFailed(e)) => {
            assert!(
                matches!(&*e, BootError::Exited(s) if s.contains("exit status: 1")),
                "{e}"
            )
        }
        other => panic!("expected a boot failure, got {other:?}"),
    }
    assert!(
        started.elapsed() < 5 * SECOND,
        "failed fast, not at the boot timeout"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn a_failed_boot_is_retried_while_callers_wait() {
    // The first boot spawns a missing program; later ones work.
    let pool = pool()
        .backend(FirstBootFails::default())
        .boot_retry_after(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    within(10 * SECOND, pool.call(&PID, ())).await.unwrap();
    pool.shutdown().await;
}

#[tokio::test]
async fn a_bad_config_is_refused_before_anything_starts() {
    let err = pool().min(3).max(2).build().await.err().unwrap();
    assert!(
        matches!(&err, PoolError::InvalidConfig(why) if why.contains("min (3) exceeds max (2)"))
    );
    let err = pool().max_concurrency(0).build().await.err().unwrap();
    assert!(matches!(err, PoolError::InvalidConfig(_)));
    let err = pool()
        .backend(
            LocalBackend::builder()
                .command("/nonexistent/runner")
                .build(),
        )
        .min(1)
        .build()
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, PoolError::Boot(e) if e.to_string().contains("cannot spawn runner")),
        "{err}"
    );
}

#[derive(Default)]
struct FirstBootFails {
    booted: std::sync::atomic::AtomicBool,
}

impl firebrand::Backend for FirstBootFails {
    fn bind_addr(&self) -> std::net::SocketAddr {
        local_backend().bind_addr()
    }

    fn parent_addrs(&self, bound: std::net::SocketAddr) -> Vec<String> {
        local_backend().parent_addrs(bound)
    }

    fn boot(
        &self,
        request: firebrand::backend::BootRequest,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<Box<dyn firebrand::backend::Machine>, firebrand::BackendError>,
    > {
        let first = !self.booted.swap(true, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if first {
                LocalBackend::builder()
                    .command("/nonexistent/runner")
                    .build()
                    .boot(request)
                    .await
            } else {
                local_backend().boot(request).await
            }
        })
    }
}

#[tokio::test]
async fn single_use_runners_serve_one_call_each() {
    let pool = pool().single_use(true).build().await.unwrap();
    let mut pids = Vec::new();
    for _ in 0..3 {
        let pid = pool.call(&PID, ()).await.unwrap();
        assert!(!pids.contains(&pid), "a runner served twice");
        common::wait_dead(pid, 5 * SECOND).await;
        pids.push(pid);
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn shutdown_during_a_boot_retry_backoff_returns_promptly() {
    let pool = pool()
        .backend(LocalBackend::builder().command("false").build())
        .boot_retry_after(Duration::from_secs(30))
        .boot_attempts(1)
        .build()
        .await
        .unwrap();
    assert!(matches!(
        pool.call(&PID, ()).await,
        Err(CallError::BootFailed(_))
    ));
    within(5 * SECOND, pool.shutdown()).await;
}

#[tokio::test]
async fn past_max_queued_calls_fail_at_once_with_overloaded() {
    let pool = pool()
        .max_concurrency(1)
        .max_queued(2)
        .build()
        .await
        .unwrap();
    let blocker = tokio::spawn({
        let pool = pool.clone();
        async move { pool.call(&firebrand_runner::SLEEP, 500).await }
    });
    while pool.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    let mut queued = Vec::new();
    for _ in 0..2 {
        let mut call = Box::pin(pool.call(&PID, ()));
        assert!(futures_util::poll!(&mut call).is_pending());
        queued.push(call);
    }
    let started = std::time::Instant::now();
    match pool.call(&PID, ()).await {
        Err(CallError::Overloaded { queued }) => assert_eq!(queued, 2),
        other => panic!("expected Overloaded, got {other:?}"),
    }
    assert!(
        started.elapsed() < SECOND,
        "refused at once, not after waiting"
    );
    // A caller that gave up frees its place.
    queued.pop();
    let mut again = Box::pin(pool.call(&PID, ()));
    assert!(futures_util::poll!(&mut again).is_pending());
    blocker.await.unwrap().unwrap();
    within(10 * SECOND, queued.pop().unwrap()).await.unwrap();
    within(10 * SECOND, again).await.unwrap();
    pool.shutdown().await;
}

/// Grows a pool of `placement` to two runners, then keeps two calls running at a time for a few
/// seconds, and reports the fewest ready runners seen while that load ran.
async fn fewest_ready_under_steady_load(placement: firebrand::Placement) -> usize {
    let pool = pool()
        .max(2)
        .max_concurrency(4)
        .idle_shutdown_after(Duration::from_millis(700))
        .placement(placement)
        .build()
        .await
        .unwrap();
    common::concurrent_sleeps(&pool, 8, 300).await;
    assert_eq!(pool.stats().ready, 2, "the spike grew the pool to max");
    let counts = pool.watch_runners();
    let mut fewest = usize::MAX;
    let until = std::time::Instant::now() + Duration::from_millis(2_500);
    while std::time::Instant::now() < until {
        common::concurrent_sleeps(&pool, 2, 50).await;
        fewest = fewest.min(counts.borrow().ready);
    }
    pool.shutdown().await;
    fewest
}

#[tokio::test]
async fn pack_placement_lets_spare_runners_idle_down() {
    use firebrand::Placement;
    let (pack, spread) = tokio::join!(
        fewest_ready_under_steady_load(Placement::Pack),
        fewest_ready_under_steady_load(Placement::Spread)
    );
    assert_eq!(
        pack, 1,
        "under pack the spare runner idled down during the load"
    );
    assert_eq!(spread, 2, "under spread both runners kept getting work");
}

#[tokio::test]
async fn growth_hooks_see_each_boot_and_each_shrink() {
    #[derive(Default)]
    struct Seen {
        started: Vec<firebrand::RunnerId>,
        ended: Vec<Result<Duration, String>>,
        shrunk: Vec<String>,
    }
    let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
    let (a, b, c) = (seen.clone(), seen.clone(), seen.clone());
    let pool = pool()
        .max(2)
        .max_concurrency(1)
        .idle_shutdown_after(Duration::from_millis(500))
        .on_grow_start(move |e| a.lock().started.push(e.runner))
        .on_grow_end(move |e| {
            let outcome = e.outcome.clone().map_err(|err| err.to_string());
            b.lock().ended.push(outcome)
        })
        .on_shrink(move |e| c.lock().shrunk.push(e.reason.clone()))
        .build()
        .await
        .unwrap();
    common::concurrent_sleeps(&pool, 2, 200).await;
    let mut counts = pool.watch_runners();
    within(
        10 * SECOND,
        counts.wait_for(|c| c.ready == 0 && c.draining == 0),
    )
    .await
    .unwrap();
    pool.shutdown().await;
    {
        let seen = seen.lock();
        assert_eq!(seen.started.len(), 2);
        assert_eq!(seen.ended.len(), 2);
        assert!(seen
            .ended
            .iter()
            .all(|o| matches!(o, Ok(d) if *d > Duration::ZERO)));
        assert_eq!(
            seen.shrunk,
            vec!["drained".to_string(); 2],
            "both idled down"
        );
    }

    // A failed boot ends with its error.
    let ended = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = ended.clone();
    let failing = common::pool()
        .backend(LocalBackend::builder().command("false").build())
        .boot_attempts(1)
        .on_grow_end(move |e| sink.lock().push(e.outcome.is_err()))
        .build()
        .await
        .unwrap();
    assert!(failing.call(&PID, ()).await.is_err());
    failing.shutdown().await;
    assert_eq!(ended.lock().first(), Some(&true));
}

#[tokio::test]
async fn prewarm_boots_a_runner_before_any_caller_queues() {
    // Three of four slots busy: with pre-warm at 75% a second runner boots though nobody waits.
    async fn boots_under_load(prewarm: Option<f64>) -> (usize, usize) {
        let backend = Recording::new(local_backend());
        let pool = pool()
            .backend(backend.clone())
            .min(1)
            .max(2)
            .max_concurrency(4)
            .prewarm_at(prewarm)
            .build()
            .await
            .unwrap();
        let mut counts = pool.watch_runners();
        let calls = tokio::spawn({
            let pool = pool.clone();
            async move { common::concurrent_sleeps(&pool, 3, 1_500).await }
        });
        if prewarm.is_some() {
            within(10 * SECOND, counts.wait_for(|c| c.ready == 2))
                .await
                .unwrap();
        }
        // Three calls fit the first runner's four slots: none can have queued.
        let queued_when_warm = pool.stats().queued;
        calls.await.unwrap();
        let boots = backend.boots();
        pool.shutdown().await;
        (boots, queued_when_warm)
    }
    let (with, queued) = boots_under_load(Some(0.75)).await;
    assert_eq!(
        (with, queued),
        (2, 0),
        "pre-warmed a second runner, nobody queued"
    );
    let (without, _) = boots_under_load(None).await;
    assert_eq!(
        without, 1,
        "without pre-warm the same load boots nothing more"
    );
    let err = pool().prewarm_at(1.5).build().await.err().unwrap();
    assert!(matches!(err, PoolError::InvalidConfig(_)));
}

#[tokio::test]
async fn resizing_up_grows_the_pool_for_waiting_calls() {
    let pool = common::pool()
        .max(1)
        .max_concurrency(1)
        .build()
        .await
        .unwrap();
    let calls = common::spawn_sleeps(&pool, 3, 1_000);
    let mut limits = pool.limits();
    limits.max = 3;
    pool.resize(limits).unwrap();
    let mut counts = pool.watch_runners();
    within(10 * SECOND, counts.wait_for(|c| c.ready == 3))
        .await
        .unwrap();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn resizing_down_while_busy_drains_runners_and_loses_no_call() {
    use firebrand::PoolEvent;
    let pool = common::pool()
        .max(3)
        .max_concurrency(1)
        .build()
        .await
        .unwrap();
    common::concurrent_sleeps(&pool, 3, 10).await;
    assert_eq!(pool.stats().ready, 3);
    let mut events = pool.events();
    let calls = common::spawn_sleeps(&pool, 3, 800);
    for _ in 0..3 {
        common::next_matching(&mut events, |e| matches!(e, PoolEvent::CallStarted { .. })).await;
    }
    let mut limits = pool.limits();
    limits.max = 1;
    pool.resize(limits).unwrap();
    assert_eq!(
        pool.stats().draining,
        2,
        "two busy runners drain; none is killed"
    );
    for call in calls {
        call.await.unwrap().expect("no call is lost");
    }
    for _ in 0..2 {
        let stopped = common::next_matching(&mut events, |e| {
            matches!(
                e,
                PoolEvent::RunnerStopped { .. } | PoolEvent::RunnerLost { .. }
            )
        })
        .await;
        assert!(
            matches!(&stopped, PoolEvent::RunnerStopped { reason, .. } if reason == "resized"),
            "{stopped:?}"
        );
    }
    let mut counts = pool.watch_runners();
    within(
        10 * SECOND,
        counts.wait_for(|c| c.ready == 1 && c.draining == 0),
    )
    .await
    .unwrap();
    pool.call(&PID, ()).await.unwrap();
    pool.shutdown().await;
}

#[tokio::test]
async fn resizing_min_boots_runners_and_bad_limits_are_refused() {
    let pool = common::pool().max(2).build().await.unwrap();
    let mut limits = pool.limits();
    limits.min = 3;
    assert!(pool.resize(limits).is_err(), "min above max");
    limits.max = 0;
    assert!(pool.resize(limits).is_err());
    assert_eq!(pool.limits().max, 2, "a refused resize changes nothing");
    let mut limits = pool.limits();
    limits.min = 2;
    pool.resize(limits).unwrap();
    let mut counts = pool.watch_runners();
    within(10 * SECOND, counts.wait_for(|c| c.ready == 2))
        .await
        .unwrap();
    pool.shutdown().await;
}

#[tokio::test]
async fn local_runners_get_gpus_of_their_own_and_max_is_capped_to_fit() {
    common::runners_get_gpus_of_their_own(LocalBackend::builder().command(common::RUNNER)).await;
}

#[tokio::test]
async fn a_gpu_backend_without_gpus_is_refused_at_build() {
    let backend = LocalBackend::builder()
        .command(common::RUNNER)
        .gpus(Vec::<String>::new())
        .gpus_per_runner(1)
        .build();
    let error = pool().backend(backend).build().await.expect_err("refused");
    assert!(error.to_string().contains("GPUs"), "{error}");
}

/// Issue 25: `min_idle_shutdown_after` once turned an idle pool into a boot loop (4 boots and 3
/// idle stops in 2 s, for as long as it stayed idle). A min runner that idles out stays out
/// until a call comes, and then `min` is kept again.
#[tokio::test]
async fn min_runners_that_idle_out_stay_out_until_a_call() {
    for min in [1usize, 3] {
        let backend = Recording::new(local_backend());
        let pool = pool()
            .backend(backend.clone())
            .min(min)
            .max(min)
            .min_idle_shutdown_after(Duration::from_millis(500))
            .build()
            .await
            .unwrap();
        let mut stats = pool.watch_runners();
        within(
            10 * SECOND,
            stats.wait_for(|s| s.min_lapsed && s.ready == 0 && s.draining == 0),
        )
        .await
        .unwrap();
        // Idle on: nothing boots (the loop booted again within 500 ms of each stop).
        tokio::time::sleep(5 * SECOND).await;
        assert_eq!(backend.boots(), min, "boots while idle, min({min})");
        assert_eq!(pool.stats().ready + pool.stats().booting, 0);
        // A call boots `min` again, is served, and the runners stay as min runners.
        pool.call(&PID, ()).await.unwrap();
        assert_eq!(backend.boots(), 2 * min, "min({min}) after the call");
        within(10 * SECOND, stats.wait_for(|s| s.ready == min))
            .await
            .unwrap();
        assert!(!pool.stats().min_lapsed);
        pool.shutdown().await;
    }
}
