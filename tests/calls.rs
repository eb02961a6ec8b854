//! Calls on one runner: results, errors, panics, deadlines, cancellation and concurrency.

mod common;

use std::time::Duration;

use common::{pool, within};
use firebrand::runner::RunnerStats;
use firebrand::{CallError, Job, Pool};
use firebrand_runner::{HashArgs, ECHO, FAIL, HASH, PANIC, PID, SLEEP, STATS};

const SECOND: Duration = Duration::from_secs(1);

async fn one_runner(max_concurrency: u32) -> Pool {
    pool()
        .min(1)
        .max(1)
        .max_concurrency(max_concurrency)
        .build()
        .await
        .expect("pool starts")
}

/// Polls the runner's own counters until `done` holds; the stats call itself is in flight.
async fn stats_until(pool: &Pool, done: impl Fn(&RunnerStats) -> bool) -> RunnerStats {
    let deadline = tokio::time::Instant::now() + 5 * SECOND;
    loop {
        let stats = pool.call(&STATS, ()).await.unwrap();
        if done(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "runner stats stuck at {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn typed_round_trip() {
    let pool = one_runner(4).await;
    let bytes: Vec<u8> = (0..=255).collect();
    assert_eq!(pool.call(&ECHO, bytes.clone()).await.unwrap(), bytes);
    let args = HashArgs {
        seed: b"firebrand".to_vec(),
        rounds: 1000,
    };
    let expected = firebrand_runner::hash(&args);
    assert_eq!(pool.call(&HASH, args).await.unwrap(), expected);
    let pid = pool.call(&PID, ()).await.unwrap();
    assert_ne!(pid, std::process::id(), "the job ran in another process");
    pool.shutdown().await;
    common::wait_dead(pid, 5 * SECOND).await;
}

#[tokio::test]
async fn job_errors_and_unknown_jobs_are_distinct() {
    let pool = one_runner(4).await;
    match pool.call(&FAIL, "disk full".into()).await {
        Err(CallError::Job(error)) => assert_eq!(error.message(), "disk full"),
        other => panic!("expected the job's error, got {other:?}"),
    }
    const MISSING: Job<(), ()> = Job::new("not.registered");
    match pool.call(&MISSING, ()).await {
        Err(CallError::UnknownJob { job }) => assert_eq!(job, "not.registered"),
        other => panic!("expected UnknownJob, got {other:?}"),
    }
    pool.shutdown().await;
    assert!(matches!(pool.call(&PID, ()).await, Err(CallError::Closed)));
}

#[tokio::test]
async fn a_panicking_job_is_an_error_and_the_runner_keeps_serving() {
    let pool = one_runner(4).await;
    let pid = pool.call(&PID, ()).await.unwrap();
    match pool.call(&PANIC, "boom at item 7".into()).await {
        Err(CallError::Panicked { message }) => assert_eq!(message, "boom at item 7"),
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(
        pool.call(&PID, ()).await.unwrap(),
        pid,
        "same runner still serving"
    );
    assert_eq!(pool.call(&STATS, ()).await.unwrap().panicked, 1);
    pool.shutdown().await;
}

#[tokio::test]
async fn execution_timeout_aborts_the_remote_job() {
    let pool = one_runner(4).await;
    let started = std::time::Instant::now();
    let result = pool
        .call(&SLEEP, 60_000)
        .timeout(Duration::from_millis(300))
        .await;
    assert!(
        matches!(result, Err(CallError::Timeout { after }) if after == Duration::from_millis(300)),
        "{result:?}"
    );
    assert!(started.elapsed() < 5 * SECOND);
    // Only the stats call itself is left running: the sleep was aborted, not left behind.
    let stats = stats_until(&pool, |s| s.in_flight == 1).await;
    assert_eq!(stats.timed_out + stats.cancelled, 1, "{stats:?}");
    assert_eq!(stats.succeeded, stats.started - 2, "{stats:?}");
    pool.shutdown().await;
}

#[tokio::test]
async fn dropping_a_call_cancels_it_on_the_runner() {
    let pool = one_runner(4).await;
    let caller = tokio::spawn({
        let pool = pool.clone();
        async move { pool.call(&SLEEP, 60_000).timeout(None).await }
    });
    stats_until(&pool, |s| s.in_flight == 2).await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    let stats = stats_until(&pool, |s| s.in_flight == 1).await;
    assert_eq!(stats.cancelled, 1, "{stats:?}");
    pool.shutdown().await;
}

#[tokio::test]
async fn concurrency_limit_is_respected_per_runner() {
    let pool = one_runner(3).await;
    let calls: Vec<_> = (0..9)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.call(&SLEEP, 200).await })
        })
        .collect();
    let mut peak_queued = 0;
    for call in calls {
        peak_queued = peak_queued.max(pool.stats().queued);
        within(20 * SECOND, call).await.unwrap().unwrap();
    }
    let stats = pool.call(&STATS, ()).await.unwrap();
    assert_eq!(stats.peak_in_flight, 3, "{stats:?}");
    assert!(
        peak_queued > 0,
        "calls beyond the limit waited on the parent"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn cast_runs_in_the_background() {
    let pool = one_runner(4).await;
    pool.call(&SLEEP, 10).cast().unwrap();
    pool.call(&SLEEP, 10).cast().unwrap();
    let stats = stats_until(&pool, |s| s.succeeded >= 2).await;
    assert_eq!(stats.failed, 0);
    const MISSING: Job<(), ()> = Job::new("not.registered");
    assert!(matches!(
        pool.call(&MISSING, ()).cast(),
        Err(CallError::UnknownJob { .. })
    ));
    pool.shutdown().await;
}

#[tokio::test]
async fn waiting_callers_are_served_in_arrival_order() {
    let pool = one_runner(1).await;
    let blocker = tokio::spawn({
        let pool = pool.clone();
        async move { pool.call(&SLEEP, 300).await }
    });
    while pool.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..5u8 {
        let caller = pool.clone();
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            caller.call(&ECHO, vec![i]).await.unwrap();
            done_tx.send(i).unwrap();
        });
        // Each caller is queued before the next one arrives.
        while pool.stats().queued <= usize::from(i) {
            tokio::task::yield_now().await;
        }
    }
    drop(done_tx);
    blocker.await.unwrap().unwrap();
    let mut order = Vec::new();
    while let Some(i) = done_rx.recv().await {
        order.push(i);
    }
    assert_eq!(order, vec![0, 1, 2, 3, 4]);
    pool.shutdown().await;
}

#[tokio::test]
async fn a_call_that_finds_no_slot_in_time_gets_a_queue_timeout() {
    let pool = one_runner(1).await;
    let blocker = tokio::spawn({
        let pool = pool.clone();
        async move { pool.call(&SLEEP, 2_000).await }
    });
    while pool.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    let waited = Duration::from_millis(200);
    match pool.call(&PID, ()).queue_timeout(waited).await {
        Err(CallError::QueueTimeout { waited: w }) => assert_eq!(w, waited),
        other => panic!("expected QueueTimeout, got {other:?}"),
    }
    assert_eq!(
        pool.stats().queued,
        0,
        "the timed-out caller left the queue"
    );
    blocker.await.unwrap().unwrap();
    pool.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_running_calls_finish() {
    let pool = one_runner(2).await;
    let pid = pool.call(&PID, ()).await.unwrap();
    let running = tokio::spawn({
        let pool = pool.clone();
        async move { pool.call(&SLEEP, 500).await }
    });
    while pool.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    within(10 * SECOND, pool.shutdown()).await;
    running
        .await
        .unwrap()
        .expect("the running call completed during the drain");
    assert!(
        !common::alive(pid),
        "shutdown returns once runners are gone"
    );
}

#[tokio::test]
async fn runners_get_the_parents_environment_but_firebrands_own_and_the_denied() {
    use firebrand_runner::ENV;
    // Cargo sets these for test binaries; setting variables here would race with the other
    // tests' threads.
    let backend = firebrand::LocalBackend::builder()
        .command(common::RUNNER)
        .env("FIREBRAND_TEST_SET", "set-value")
        .deny("CARGO_PKG_VERSION")
        .build();
    let pool = pool().backend(backend).build().await.unwrap();
    let get = |name: &str| pool.call(&ENV, name.to_string());
    assert_eq!(
        get("FIREBRAND_TEST_SET").await.unwrap().as_deref(),
        Some("set-value"),
        "set with env"
    );
    assert_eq!(
        get("CARGO_MANIFEST_DIR").await.unwrap().as_deref(),
        Some(env!("CARGO_MANIFEST_DIR")),
        "forwarded by default"
    );
    assert_eq!(get("CARGO_PKG_VERSION").await.unwrap(), None, "denied");
    assert_eq!(
        get(firebrand::internals::token::PARENT_ENV).await.unwrap(),
        None,
        "the boot token is removed from the runner's environment"
    );
    pool.shutdown().await;

    let explicit = firebrand::LocalBackend::builder()
        .command(common::RUNNER)
        .forward_none()
        .forward("CARGO_PKG_NAME")
        .build();
    let pool = pool_with(explicit).await;
    let get = |name: &str| pool.call(&ENV, name.to_string());
    assert_eq!(
        get("CARGO_PKG_NAME").await.unwrap().as_deref(),
        Some(env!("CARGO_PKG_NAME"))
    );
    assert_eq!(get("CARGO_MANIFEST_DIR").await.unwrap(), None, "not named");
    pool.shutdown().await;
}

async fn pool_with(backend: firebrand::LocalBackend) -> Pool {
    pool().backend(backend).build().await.unwrap()
}

#[tokio::test]
async fn a_caller_dropped_after_being_granted_a_slot_gives_it_back() {
    let pool = one_runner(1).await;
    let blocker = pool.call(&SLEEP, 300);
    let blocker = tokio::spawn(blocker);
    while pool.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    // Polled once: queued behind the blocker. Never polled again.
    let mut queued = Box::pin(pool.call(&PID, ()));
    assert!(futures_util::poll!(&mut queued).is_pending());
    assert_eq!(pool.stats().queued, 1);
    // The blocker's slot goes to the queued call the moment the blocker finishes...
    blocker.await.unwrap().unwrap();
    // ...and that call is dropped before it ever sees it.
    drop(queued);
    assert_eq!(pool.stats().in_flight, 0, "the granted slot was given back");
    within(5 * SECOND, pool.call(&PID, ())).await.unwrap();
    pool.shutdown().await;
}

#[tokio::test]
async fn an_argument_over_max_payload_len_is_refused_before_it_is_sent() {
    let pool = pool().max(1).max_payload_len(1024).build().await.unwrap();
    let error = pool.call(&ECHO, vec![0; 4096]).await.unwrap_err();
    assert!(
        matches!(&error, CallError::Encode { message } if message.contains("1024")),
        "{error:?}"
    );
    // Refused on the parent: no runner was booted for it, and a call within the limit works.
    assert_eq!(pool.stats().ready + pool.stats().booting, 0);
    assert_eq!(pool.call(&ECHO, vec![1; 100]).await.unwrap(), vec![1; 100]);
    pool.shutdown().await;
}

#[tokio::test]
async fn a_result_over_max_payload_len_is_refused_by_the_runner_before_it_is_sent() {
    use futures_util::StreamExt as _;
    let pool = pool().max(1).max_payload_len(1024).build().await.unwrap();
    let error = pool.call(&firebrand_runner::BYTES, 4096).await.unwrap_err();
    assert!(
        matches!(&error, CallError::Encode { message } if message.contains("max_payload_len of 1024")),
        "{error:?}"
    );
    // A stream's item likewise, and the stream ends there.
    let args = firebrand_runner::BlobArgs {
        count: 3,
        bytes: 4096,
        ..Default::default()
    };
    let items: Vec<_> = pool.stream(&firebrand_runner::BLOBS, args).collect().await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert!(
        matches!(&items[0], Err(CallError::Encode { message }) if message.contains("max_payload_len")),
        "{items:?}"
    );
    // The runner serves on: results within the limit come back.
    assert_eq!(
        pool.call(&firebrand_runner::BYTES, 1000)
            .await
            .unwrap()
            .len(),
        1000
    );
    assert_eq!(pool.stats().ready, 1);
    pool.shutdown().await;
}

/// The threads that encoded a [`Recorded`] argument, in order.
static ENCODED_ON: parking_lot::Mutex<Vec<std::thread::ThreadId>> =
    parking_lot::Mutex::new(Vec::new());

/// Bytes that encode as a `Vec<u8>` does, and note the thread that encoded them.
#[derive(serde::Deserialize)]
struct Recorded(Vec<u8>);

impl serde::Serialize for Recorded {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ENCODED_ON.lock().push(std::thread::current().id());
        self.0.serialize(serializer)
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_large_argument_is_encoded_off_the_caller_s_thread() {
    const ECHO_RECORDED: Job<Recorded, Vec<u8>> = Job::new("firebrand.echo");
    let pool = pool().max(1).build().await.unwrap();
    let here = std::thread::current().id();
    assert_eq!(
        pool.call(&ECHO_RECORDED, Recorded(vec![1; 100]))
            .await
            .unwrap()
            .len(),
        100
    );
    assert_eq!(
        *ENCODED_ON.lock(),
        vec![here],
        "a small argument is encoded in place"
    );
    ENCODED_ON.lock().clear();
    let big = pool
        .call(&ECHO_RECORDED, Recorded(vec![2; 1 << 20]))
        .await
        .unwrap();
    assert_eq!(big.len(), 1 << 20);
    // The caller's thread stopped at the first 64 KiB; the blocking pool encoded it all.
    let threads = ENCODED_ON.lock().clone();
    assert_eq!(threads.len(), 2, "{threads:?}");
    assert_eq!(threads[0], here);
    assert_ne!(
        threads[1], here,
        "the large argument was encoded on the caller's thread"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn every_public_handle_has_a_useful_debug() {
    let builder = pool().max(1).name("debugged");
    assert!(format!("{builder:?}").contains("debugged"));
    let pool = builder.build().await.unwrap();
    assert!(format!("{pool:?}").contains("debugged"));
    let call = pool.call(&ECHO, vec![1]).timeout(Duration::from_secs(3));
    let shown = format!("{call:?}");
    assert!(
        shown.contains("firebrand.echo") && shown.contains("3s"),
        "{shown}"
    );
    assert_eq!(call.await.unwrap(), vec![1]);
    let task = pool.call(&ECHO, vec![2]).spawn();
    assert!(format!("{task:?}").starts_with("RemoteTask"));
    assert_eq!(task.await.unwrap(), vec![2]);
    let map = pool.map(&ECHO, vec![vec![3]]);
    assert!(format!("{map:?}").contains("firebrand.echo"));
    drop(map);
    let stream = pool.stream(&firebrand_runner::BLOBS, Default::default());
    assert!(format!("{stream:?}").starts_with("RemoteStream"));
    drop(stream);
    let stash = pool
        .resource(&firebrand_runner::STASH, vec![4])
        .await
        .unwrap();
    assert!(format!("{stash:?}").contains(&stash.runner().to_string()));
    drop(stash);
    pool.shutdown().await;
}

#[tokio::test]
async fn a_job_declared_with_the_attribute_gives_its_error_back_typed() {
    use firebrand_runner::{divide, parse, DivideError};
    let pool = one_runner(4).await;
    assert_eq!(pool.call(&divide, (7, 2)).await.unwrap(), 3);
    match pool.call(&divide, (7, 0)).await {
        Err(CallError::Job(DivideError::ByZero(7))) => {}
        other => panic!("expected the job's own error, got {other:?}"),
    }
    // Retried attempts carry the typed error too.
    let attempts = pool
        .call(&divide, (9, 0))
        .idempotent()
        .retries(1)
        .retry_job_errors()
        .await
        .unwrap_err();
    match attempts {
        CallError::Attempts { attempts } => assert!(
            attempts
                .iter()
                .all(|e| matches!(e, CallError::Job(DivideError::ByZero(9)))),
            "{attempts:?}"
        ),
        other => panic!("expected every attempt, got {other:?}"),
    }
    // An error that does not serialize crosses as its text.
    assert_eq!(pool.call(&parse, " 42 ".into()).await.unwrap(), 42);
    match pool.call(&parse, "forty-two".into()).await {
        Err(CallError::Job(error)) => {
            assert_eq!(error.message(), "invalid digit found in string")
        }
        other => panic!("expected the error's text, got {other:?}"),
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn a_jobs_declared_timeout_bounds_await_spawn_and_map_and_a_call_overrides_it() {
    use firebrand_runner::sleep_bounded;
    let pool = one_runner(4).await;
    let declared = Duration::from_millis(300);
    let timed_out = |result: Result<(), CallError>| match result {
        Err(CallError::Timeout { after }) => {
            assert_eq!(after, declared);
            let text = CallError::<firebrand::RemoteError>::Timeout { after }.to_string();
            assert!(text.contains("300ms"), "{text}");
        }
        other => panic!("expected the job's 300 ms timeout, got {other:?}"),
    };
    timed_out(pool.call(&sleep_bounded, 3_000).await);
    timed_out(pool.call(&sleep_bounded, 3_000).spawn().await);
    for result in pool.map(&sleep_bounded, [3_000, 3_000]).results().await {
        timed_out(result);
    }
    pool.call(&sleep_bounded, 0).await.unwrap();
    within(
        20 * SECOND,
        pool.call(&sleep_bounded, 600).timeout(10 * SECOND),
    )
    .await
    .expect("the call's own timeout overrides the job's");
    pool.shutdown().await;
}

#[tokio::test]
async fn a_resource_job_and_a_job_using_it_declared_with_the_attribute() {
    use firebrand_runner::{square_at, squares};
    let pool = one_runner(4).await;
    let table = pool.resource(&squares, 100).await.unwrap();
    assert_eq!(table.call(&square_at, 9).await.unwrap(), Some(81));
    assert_eq!(table.call(&square_at, 100).await.unwrap(), None);
    drop(table);
    pool.shutdown().await;
}

/// The phase a call's deadline passed in, or a panic naming what the call got instead.
fn deadline_phase<T: std::fmt::Debug>(
    result: Result<T, CallError>,
    deadline: Duration,
) -> firebrand::DeadlinePhase {
    match result {
        Err(CallError::DeadlinePassed {
            deadline: set,
            phase,
        }) => {
            assert_eq!(set, deadline);
            phase
        }
        other => panic!("expected DeadlinePassed, got {other:?}"),
    }
}

/// Issue 25: `.timeout(100 ms)` on a full pool waited in the queue for seconds and then
/// succeeded. A deadline bounds the queue too, and says how many calls were ahead.
#[tokio::test]
async fn a_deadline_passes_in_the_queue_and_names_the_calls_ahead() {
    let pool = one_runner(1).await;
    let ahead = common::spawn_sleeps(&pool, 5, 1_000);
    // One runs; four wait.
    let mut stats = pool.watch_runners();
    let _ = stats.borrow_and_update();
    while pool.stats().queued < 4 {
        tokio::task::yield_now().await;
    }
    let deadline = Duration::from_millis(100);
    let started = std::time::Instant::now();
    let result = pool.call(&PID, ()).deadline(deadline).await;
    assert_eq!(
        deadline_phase(result, deadline),
        firebrand::DeadlinePhase::Queued { behind: 4 }
    );
    // The queue timeout (20 s here) is not what ended it.
    assert!(started.elapsed() < 5 * SECOND, "{:?}", started.elapsed());
    assert_eq!(pool.stats().queued, 4, "it left the queue");
    for call in ahead {
        call.await.unwrap().unwrap();
    }
    pool.shutdown().await;
}

/// A deadline that passes while the job runs cancels it on the runner, and says for how long
/// it ran; the same through `spawn`, `map` and a stream, and as the pool's default.
#[tokio::test]
async fn a_deadline_passes_while_the_job_runs_and_cancels_it_everywhere() {
    let deadline = Duration::from_millis(300);
    let pool = one_runner(4).await;
    let result = pool
        .call(&SLEEP, 60_000)
        .timeout(None)
        .deadline(deadline)
        .await;
    match deadline_phase(result, deadline) {
        // It ran from its placement on: all but the moment it took to place it.
        firebrand::DeadlinePhase::Running { ran_for, .. } => {
            assert!(ran_for > deadline / 2, "{ran_for:?}")
        }
        other => panic!("{other:?}"),
    }
    let stats = stats_until(&pool, |s| s.in_flight == 1).await;
    assert_eq!(stats.cancelled, 1, "aborted on the runner: {stats:?}");

    let spawned = pool.call(&SLEEP, 60_000).deadline(deadline).spawn();
    assert!(matches!(
        deadline_phase(spawned.await, deadline),
        firebrand::DeadlinePhase::Running { .. }
    ));
    let results = pool
        .map(&SLEEP, [60_000, 10])
        .deadline(deadline)
        .results()
        .await;
    assert!(matches!(
        deadline_phase(results[0].clone(), deadline),
        firebrand::DeadlinePhase::Running { .. }
    ));
    results[1].clone().unwrap();
    let args = firebrand_runner::BlobArgs {
        count: 1_000,
        bytes: 4,
        delay_ms: 50,
        fail_at: None,
        block: false,
    };
    let items: Vec<_> = futures_util::StreamExt::collect(
        pool.stream(&firebrand_runner::BLOBS, args)
            .deadline(deadline),
    )
    .await;
    let (last, before) = items.split_last().unwrap();
    assert!(before.iter().all(Result::is_ok) && !before.is_empty());
    assert!(matches!(
        deadline_phase(last.clone(), deadline),
        firebrand::DeadlinePhase::Running { .. }
    ));
    let stats = stats_until(&pool, |s| s.in_flight == 1).await;
    assert_eq!(stats.cancelled, 4, "{stats:?}");
    pool.shutdown().await;

    let pool = common::pool()
        .max(1)
        .deadline(deadline)
        .build()
        .await
        .unwrap();
    let result = pool.call(&SLEEP, 60_000).await;
    assert!(matches!(
        deadline_phase(result, deadline),
        firebrand::DeadlinePhase::Running { .. }
    ));
    // A call can lift it.
    pool.call(&SLEEP, 400).deadline(None).await.unwrap();
    pool.shutdown().await;
}

/// A deadline that passes between retries says so, with the attempts made.
#[tokio::test]
async fn a_deadline_passes_while_a_call_waits_to_retry() {
    let pool = one_runner(1).await;
    let deadline = Duration::from_millis(250);
    let result = pool
        .call(&FAIL, "again".into())
        .idempotent()
        .retries(10)
        .retry_job_errors()
        .deadline(deadline)
        .await;
    match deadline_phase(result, deadline) {
        firebrand::DeadlinePhase::Retrying { attempts } => assert!(attempts >= 1),
        other => panic!("{other:?}"),
    }
    pool.shutdown().await;
}
