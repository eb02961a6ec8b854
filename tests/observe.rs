//! Observability: lifecycle events and metrics, from real runner processes.

mod common;

use std::time::Duration;

use common::next_matching;
use firebrand::{CallOutcome, PoolEvent};
use firebrand_runner::{HashArgs, HASH, PID, SLEEP};

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn events_follow_a_runner_and_its_calls_from_boot_to_idle_stop() {
    let pool = common::pool()
        .max(1)
        .max_concurrency(1)
        .idle_shutdown_after(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let mut events = pool.events();
    let (first, second) = tokio::join!(pool.call(&SLEEP, 100), pool.call(&SLEEP, 0));
    first.unwrap();
    second.unwrap();
    // The first call finds no runner: it queues, and that starts a boot.
    next_matching(&mut events, |e| {
        matches!(
            e,
            PoolEvent::CallQueued {
                job: "firebrand.sleep"
            }
        )
    })
    .await;
    let booting = next_matching(&mut events, |e| {
        matches!(e, PoolEvent::RunnerBooting { .. })
    })
    .await;
    let PoolEvent::RunnerBooting { runner } = booting else {
        unreachable!()
    };
    match next_matching(&mut events, |e| matches!(e, PoolEvent::RunnerUp { .. })).await {
        PoolEvent::RunnerUp {
            runner: up,
            boot_time,
            ..
        } => {
            assert_eq!(up, runner);
            assert!(boot_time > Duration::ZERO);
        }
        _ => unreachable!(),
    }
    for _ in 0..2 {
        next_matching(
            &mut events,
            |e| matches!(e, PoolEvent::CallStarted { runner: r, .. } if *r == runner),
        )
        .await;
        match next_matching(&mut events, |e| matches!(e, PoolEvent::CallFinished { .. })).await {
            PoolEvent::CallFinished { outcome, .. } => assert_eq!(outcome, CallOutcome::Ok),
            _ => unreachable!(),
        }
    }
    let stopped = next_matching(&mut events, |e| {
        matches!(
            e,
            PoolEvent::RunnerIdleStopped { .. }
                | PoolEvent::RunnerLost { .. }
                | PoolEvent::RunnerStopped { .. }
        )
    })
    .await;
    assert!(
        matches!(stopped, PoolEvent::RunnerIdleStopped { runner: r } if r == runner),
        "{stopped:?}"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn a_killed_runner_is_reported_lost_with_its_call() {
    let pool = common::pool().max(1).build().await.unwrap();
    let mut events = pool.events();
    let pid = pool.call(&PID, ()).await.unwrap();
    let sleeping = pool.call(&SLEEP, 30_000);
    let kill = async {
        next_matching(&mut events, |e| {
            matches!(
                e,
                PoolEvent::CallStarted {
                    job: "firebrand.sleep",
                    ..
                }
            )
        })
        .await;
        // SAFETY: kill(2) on a runner process this test started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    };
    let (result, ()) = tokio::join!(sleeping, kill);
    assert!(result.is_err());
    // Both are reported, in either order.
    let (mut call_lost, mut runner_lost) = (false, false);
    while !(call_lost && runner_lost) {
        match next_matching(&mut events, |e| {
            matches!(
                e,
                PoolEvent::CallFinished { .. } | PoolEvent::RunnerLost { .. }
            )
        })
        .await
        {
            PoolEvent::CallFinished { outcome, .. } => {
                assert_eq!(outcome, CallOutcome::RunnerLost);
                call_lost = true;
            }
            _ => runner_lost = true,
        }
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn a_dropped_call_finishes_as_cancelled() {
    let pool = common::pool().max(1).build().await.unwrap();
    pool.call(&PID, ()).await.unwrap();
    let mut events = pool.events();
    let call = pool.call(&SLEEP, 30_000);
    tokio::select! {
        _ = call => panic!("the sleep cannot finish first"),
        _ = next_matching(&mut events, |e| matches!(e, PoolEvent::CallStarted { .. })) => {}
    }
    let finished =
        next_matching(&mut events, |e| matches!(e, PoolEvent::CallFinished { .. })).await;
    assert!(
        matches!(
            finished,
            PoolEvent::CallFinished {
                outcome: CallOutcome::Cancelled,
                ..
            }
        ),
        "{finished:?}"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn metrics_count_calls_boots_and_runners() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this test binary");

    // Both runners booted before `build` returns: a boot still running when the calls end
    // would be missing from the snapshot.
    // Named apart from the other tests' pools, which record here too.
    let pool = common::pool()
        .name("metrics-a")
        .min(2)
        .max(2)
        .max_concurrency(1)
        .build()
        .await
        .unwrap();
    let other = common::pool().name("metrics-b").build().await.unwrap();
    let args = || HashArgs {
        seed: b"m".to_vec(),
        rounds: 1,
    };
    let (a, b) = tokio::join!(pool.call(&HASH, args()), pool.call(&HASH, args()));
    a.unwrap();
    b.unwrap();
    other.call(&HASH, args()).await.unwrap();
    let snapshot = snapshotter.snapshot().into_vec();
    let find = |name: &str, labels: &[(&str, &str)]| {
        snapshot
            .iter()
            .find(|(key, ..)| {
                let key = key.key();
                key.name() == name
                    && labels
                        .iter()
                        .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
            })
            .map(|(_, _, _, value)| value)
    };
    // Two pools in one process keep their series apart.
    for (pool_name, calls) in [("metrics-a", 2), ("metrics-b", 1)] {
        match find(
            "firebrand_calls_total",
            &[
                ("pool", pool_name),
                ("job", "firebrand.hash"),
                ("outcome", "ok"),
            ],
        ) {
            Some(DebugValue::Counter(n)) => assert_eq!(*n, calls, "{pool_name}"),
            other => panic!("calls_total of {pool_name}: {other:?}"),
        }
    }
    match find(
        "firebrand_call_seconds",
        &[("pool", "metrics-a"), ("job", "firebrand.hash")],
    ) {
        Some(DebugValue::Histogram(values)) => assert_eq!(values.len(), 2),
        other => panic!("call_seconds: {other:?}"),
    }
    // A boot's outcome says how it got its machine: every one here was a create.
    match find("firebrand_boots_total", &[("outcome", "create")]) {
        Some(DebugValue::Counter(n)) => assert!(*n >= 2, "{n}"),
        other => panic!("boots_total: {other:?}"),
    }
    assert!(
        matches!(find("firebrand_boot_seconds", &[("outcome", "create")]), Some(DebugValue::Histogram(v)) if !v.is_empty())
    );
    assert!(matches!(
        find("firebrand_runners", &[("state", "ready")]),
        Some(DebugValue::Gauge(_))
    ));
    assert!(find("firebrand_queue_wait_seconds", &[("job", "firebrand.hash")]).is_some());
    pool.shutdown().await;
    other.shutdown().await;
    let _ = SECOND;
}

#[tokio::test(flavor = "current_thread")]
async fn runner_log_lines_reach_the_parent_with_the_runner_id_and_the_call_s_trace_id() {
    let (captured, _guard) = common::CapturedLogs::install();
    let pool = common::pool().max(1).build().await.unwrap();
    let trace = firebrand::TraceId(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c);
    let error = pool
        .call(&firebrand_runner::PANIC, "boom-for-tracing".into())
        .trace_id(trace)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("boom-for-tracing"));
    let line = captured
        .line(|l| l.contains("boom-for-tracing") && l.contains(&trace.to_string()))
        .await;
    // Sent over the runner's connection as a `tracing` event, and logged again by the parent.
    assert!(line.contains("firebrand::runner:"), "{line}");
    assert!(line.contains("runner="), "{line}");
    assert!(line.contains(r#"job="firebrand.panic""#), "{line}");
    pool.shutdown().await;
}
