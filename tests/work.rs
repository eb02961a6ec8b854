//! Real work on runners: jobs that compute or block without awaiting keep their runner, and a
//! cheap call still gets through while every core is busy.

mod common;

use std::time::Duration;

use common::{pool, within};
use firebrand::Pool;
use firebrand_runner::{ECHO, SPIN, SPIN_BLOCKING, THREAD_SLEEP};

/// Short enough that a runner whose connection starves is declared lost well within each job.
const PEER_TIMEOUT: Duration = Duration::from_secs(1);
/// Each job runs this long without awaiting: three peer timeouts.
const JOB_MS: u64 = 3 * PEER_TIMEOUT.as_millis() as u64;

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

async fn one_runner() -> Pool {
    pool()
        .max(1)
        .max_concurrency(64)
        .peer_timeout(PEER_TIMEOUT)
        .keep_alive(Duration::from_millis(200))
        .build()
        .await
        .unwrap()
}

/// Runs `count` calls of `job` at once on one runner and checks that every one succeeds.
async fn all_succeed<R: firebrand::Payload + std::fmt::Debug>(
    job: &firebrand::Job<u64, R>,
    count: usize,
) {
    let pool = one_runner().await;
    let calls: Vec<_> = (0..count)
        .map(|_| tokio::spawn(pool.call(job, JOB_MS)))
        .collect();
    for call in calls {
        let outcome = within(Duration::from_secs(60), call).await.unwrap();
        assert!(outcome.is_ok(), "{}: {outcome:?}", job.name());
    }
    assert_eq!(pool.stats().ready, 1, "the runner was replaced");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_bound_async_jobs_on_every_core_keep_their_runner() {
    all_succeed(&SPIN, cores() + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_sleep_in_async_jobs_keeps_the_runner() {
    all_succeed(&THREAD_SLEEP, cores() + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_jobs_on_every_core_keep_their_runner() {
    all_succeed(&SPIN_BLOCKING, cores() + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cheap_call_completes_while_every_core_is_busy() {
    let pool = one_runner().await;
    // Warm: the runner is up before the busy work starts.
    pool.call(&ECHO, vec![1]).await.unwrap();
    let busy: Vec<_> = (0..cores())
        .map(|_| tokio::spawn(pool.call(&SPIN_BLOCKING, JOB_MS)))
        .collect();
    // Started on the runner: its calls are in flight.
    let mut counts = pool.watch_runners();
    within(Duration::from_secs(10), async {
        while pool.stats().in_flight < cores() {
            let _ = tokio::time::timeout(Duration::from_millis(20), counts.changed()).await;
        }
    })
    .await;
    let echoed = within(Duration::from_secs(30), pool.call(&ECHO, vec![7; 100]))
        .await
        .unwrap();
    assert_eq!(echoed, vec![7; 100]);
    // The cheap call did not wait for the busy ones: they are all still running.
    assert!(
        busy.iter().all(|b| !b.is_finished()),
        "a busy job ended first"
    );
    for b in busy {
        within(Duration::from_secs(60), b).await.unwrap().unwrap();
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_prints_binary_and_huge_lines_keeps_printing() {
    use firebrand_runner::{ByteBuf, PID, PRINT};
    let pool = pool().max(1).build().await.unwrap();
    let pid = pool.call(&PID, ()).await.unwrap();
    let print = |bytes: Vec<u8>| pool.call(&PRINT, ByteBuf::from(bytes));
    // Not UTF-8, then a 10 MiB line with no newline in it.
    print(b"\xff\xfe\x00 binary \xc3\x28\n".to_vec())
        .await
        .unwrap();
    let mut huge = vec![b'y'; 10 << 20];
    huge.push(b'\n');
    print(huge).await.unwrap();
    // Ordinary prints still work: the relay kept the pipe open.
    for i in 0..10 {
        print(format!("line {i}\n").into_bytes()).await.unwrap();
    }
    // 100 MB more, a MiB per call: the relay keeps up, or these calls would stall.
    let mib: Vec<u8> = (0..1 << 20)
        .map(|i| if i % 100 == 99 { b'\n' } else { b'z' })
        .collect();
    for _ in 0..100 {
        within(Duration::from_secs(30), print(mib.clone()))
            .await
            .unwrap();
    }
    assert_eq!(
        pool.call(&PID, ()).await.unwrap(),
        pid,
        "the runner was replaced"
    );
    pool.shutdown().await;
}

/// A runner whose `main` is `#[tokio::main]` and calls `run_if_child` inside it.
const ASYNC_RUNNER: &str = env!("CARGO_BIN_EXE_firebrand-runner-async");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_if_child_inside_tokio_main_serves() {
    let pool = pool()
        .backend(
            firebrand::LocalBackend::builder()
                .command(ASYNC_RUNNER)
                .build(),
        )
        .max(1)
        .peer_timeout(PEER_TIMEOUT)
        .keep_alive(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    assert_eq!(pool.call(&ECHO, vec![4, 2]).await.unwrap(), vec![4, 2]);
    // Its jobs still cannot starve its connection.
    within(Duration::from_secs(30), pool.call(&SPIN, JOB_MS))
        .await
        .unwrap();
    pool.shutdown().await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_threaded_fork_template_is_refused_with_the_cause_in_the_boot_error() {
    let backend = firebrand::LocalBackend::builder()
        .command(ASYNC_RUNNER)
        .fork_server()
        .build();
    let message = common::min_boot_error(backend).await;
    assert!(message.contains("other thread"), "{message}");
    assert!(message.contains("run_if_child"), "{message}");
}

/// More non-yielding async jobs than cores, up to `max_concurrency`, run side by side: each
/// slot has a worker thread of its own, and the kernel shares the cores among them. With a
/// worker per core, the jobs past the cores waited for the first ones to end: eight 4 s jobs
/// on two cores took 16 s, and the later ones timed out at 12 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_to_max_concurrency_non_yielding_async_jobs_all_make_progress() {
    const JOBS: usize = 8;
    const SPIN_MS: u64 = 4_000;
    let pool = pool()
        .max(1)
        .max_concurrency(JOBS as u32)
        .timeout(Duration::from_millis(3 * SPIN_MS))
        .build()
        .await
        .unwrap();
    pool.call(&ECHO, vec![1]).await.unwrap();
    let calls: Vec<_> = (0..JOBS)
        .map(|_| tokio::spawn(pool.call(&SPIN, SPIN_MS)))
        .collect();
    for call in calls {
        let outcome = call.await.unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    assert_eq!(pool.stats().ready, 1, "one runner ran them all");
    pool.shutdown().await;
}

/// Runs `kept` calls that end soon and `dropped` calls that never end on one runner, drops the
/// `dropped` ones once the runner runs them all, and shuts the pool down at once. Returns how
/// long the shutdown took; the kept calls must have their results, and the runner must be gone.
async fn drop_calls_then_shut_down(
    never_ending: &firebrand::Job<u64, impl firebrand::Payload>,
    dropped: usize,
    kept: usize,
) -> Duration {
    use firebrand_runner::{PID, SLEEP, STATS};
    let pool = pool()
        .max(1)
        .max_concurrency(16)
        // Far past the bound below: a runner the parent has to kill shows as a slow shutdown.
        .terminate_grace(10 * Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let pid = pool.call(&PID, ()).await.unwrap();
    let never: Vec<_> = (0..dropped)
        .map(|_| tokio::spawn(pool.call(never_ending, 3_600_000)))
        .collect();
    let soon: Vec<_> = (0..kept)
        .map(|_| tokio::spawn(pool.call(&SLEEP, 200)))
        .collect();
    // Every call runs on the runner (the stats call counts itself).
    within(Duration::from_secs(10), async {
        while pool.call(&STATS, ()).await.unwrap().in_flight < (dropped + kept + 1) as u64 {}
    })
    .await;
    for call in &never {
        call.abort();
    }
    let started = std::time::Instant::now();
    pool.shutdown().await;
    let took = started.elapsed();
    for call in soon {
        call.await.unwrap().unwrap();
    }
    assert!(!common::alive(pid), "runner {pid} left running");
    took
}

/// Issue 25: a call dropped just before `shutdown()` made 1 shutdown in 10 to 30 take 5 s and
/// end in SIGKILL: the stream's reset did not reach the runner before the connection closed,
/// and the runner drained a job whose result nobody could receive. A runner released by its
/// parent now aborts its jobs and exits on its own. (On a multi-threaded runtime: there the
/// close overtook the reset in 1 round of 6 to 30 here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdowns_right_after_dropped_calls_end_at_once_and_kill_nothing() {
    use firebrand_runner::{SLEEP, SPIN, SPIN_BLOCKING};
    let bound = Duration::from_secs(1);
    for round in 0..100 {
        let took = drop_calls_then_shut_down(&SLEEP, 1, 0).await;
        assert!(took < bound, "round {round}: shutdown took {took:?}");
    }
    // Calls whose callers still wait are drained: they get their results.
    for round in 0..10 {
        let took = drop_calls_then_shut_down(&SLEEP, 4, 4).await;
        assert!(
            took < bound,
            "round {round} of 8 calls: shutdown took {took:?}"
        );
    }
    // Jobs that compute for an hour without awaiting, async or blocking, cannot be aborted:
    // they end with the runner's process, which exits after its wait for them (0.5 s), well
    // before the parent would kill it.
    for job in [&SPIN, &SPIN_BLOCKING] {
        for round in 0..3 {
            let took = drop_calls_then_shut_down(job, 2, 0).await;
            assert!(
                took < 3 * bound,
                "round {round} of {}: shutdown took {took:?}",
                job.name()
            );
        }
    }
}
