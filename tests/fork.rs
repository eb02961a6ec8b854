//! The local backend's fork server: runners forked from one template process serve like any
//! other, report how they end, and never outlive the template, the pool or the parent.

mod common;

use std::time::{Duration, Instant};

use common::{alive, parent_of, pool, sigkill, wait_dead, within, Recording, RUNNER};
use firebrand::{BootError, CallError, LocalBackend};
use firebrand_runner::{ECHO, ENV, PID};
use futures_util::StreamExt as _;

const SECOND: Duration = Duration::from_secs(1);

fn forking() -> firebrand::backend::LocalBackendBuilder {
    LocalBackend::builder().command(RUNNER).fork_server()
}

/// A pool of two forked runners, their pids and their template's.
async fn two_forked_runners() -> (firebrand::Pool, Recording, u32) {
    let backend = Recording::new(forking().env("FORK_TEST_VAR", "set-by-builder").build());
    let pool = pool()
        .backend(backend.clone())
        .min(2)
        .max(2)
        .build()
        .await
        .unwrap();
    let pids = backend.pids();
    assert_eq!(pids.len(), 2);
    let template = parent_of(pids[0]);
    (pool, backend, template)
}

#[tokio::test]
async fn forked_runners_serve_calls_streams_and_maps_as_children_of_one_template() {
    let (pool, backend, template) = two_forked_runners().await;
    let pids = backend.pids();
    assert_ne!(pids[0], pids[1]);
    assert_eq!(parent_of(pids[1]), template, "one template forks both");
    assert_ne!(template, std::process::id());
    assert_eq!(parent_of(template), std::process::id());

    // Each runner has the builder's variables, and neither its token nor the template's flag.
    let env = |name: &str| pool.call(&ENV, name.to_string());
    assert_eq!(
        env("FORK_TEST_VAR").await.unwrap().as_deref(),
        Some("set-by-builder")
    );
    assert_eq!(env("FIREBRAND_PARENT").await.unwrap(), None);
    assert_eq!(env("FIREBRAND_FORK_SERVER").await.unwrap(), None);

    assert_eq!(pool.call(&ECHO, vec![7; 100]).await.unwrap(), vec![7; 100]);
    let doubled: Vec<_> = pool
        .map(&ECHO, (0..50u8).map(|i| vec![i, i]))
        .outputs()
        .await
        .unwrap();
    assert_eq!(doubled.len(), 50);
    assert!(doubled.iter().enumerate().all(|(i, v)| v == &[i as u8; 2]));
    let blobs: Vec<_> = pool
        .stream(
            &firebrand_runner::BLOBS,
            firebrand_runner::BlobArgs {
                count: 5,
                bytes: 10,
                ..Default::default()
            },
        )
        .collect()
        .await;
    assert_eq!(blobs.len(), 5);
    assert!(blobs
        .iter()
        .all(|b| b.as_ref().is_ok_and(|b| b.len() == 10)));

    pool.shutdown().await;
    for pid in pids {
        wait_dead(pid, 10 * SECOND).await;
    }
}

#[tokio::test]
async fn a_forked_runner_killed_mid_call_is_reported_lost_with_its_signal_and_replaced() {
    // The template reports the exit: well before the QUIC idle timeout.
    common::killed_runner_is_lost_at_once_and_replaced(forking().build()).await;
}

#[tokio::test]
async fn dropping_a_forked_pool_kills_the_template_and_its_runners() {
    let (pool, backend, template) = two_forked_runners().await;
    drop(pool);
    wait_dead(template, 10 * SECOND).await;
    for pid in backend.pids() {
        wait_dead(pid, 10 * SECOND).await;
    }
}

#[tokio::test]
async fn shutdown_returns_once_the_template_and_its_runners_are_gone() {
    let (pool, backend, template) = two_forked_runners().await;
    pool.shutdown().await;
    // Not waited for: gone by the time shutdown returns.
    assert!(!alive(template), "the template outlived shutdown");
    for pid in backend.pids() {
        assert!(!alive(pid), "runner {pid} outlived shutdown");
    }
}

#[tokio::test]
async fn a_killed_template_takes_its_runners_and_the_next_boot_starts_a_new_one() {
    let (pool, backend, template) = two_forked_runners().await;
    let pids = backend.pids();
    let mut events = pool.events();
    sigkill(template);
    for &pid in &pids {
        wait_dead(pid, 10 * SECOND).await;
    }
    // The pool sees both runners end, and boots from a fresh template.
    let mut lost = 0;
    while lost < 2 {
        match within(10 * SECOND, events.next()).await {
            Some(firebrand::PoolEvent::RunnerLost { .. }) => lost += 1,
            Some(_) => {}
            None => panic!("events ended"),
        }
    }
    let pid = within(20 * SECOND, pool.call(&PID, ())).await.unwrap();
    assert!(!pids.contains(&pid));
    let new_template = parent_of(pid);
    assert_ne!(new_template, template);
    assert!(alive(new_template));
    pool.shutdown().await;
}

#[tokio::test]
async fn a_template_that_cannot_serve_fails_boots_fast_with_its_exit_status() {
    let pool = pool()
        .backend(
            LocalBackend::builder()
                .command("false")
                .fork_server()
                .build(),
        )
        .boot_attempts(1)
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    match within(10 * SECOND, pool.call(&PID, ())).await {
        Err(CallError::BootFailed(e)) => {
            let shown = e.to_string();
            assert!(matches!(&*e, BootError::Backend(_)), "{e:?}");
            assert!(
                shown.contains("fork server ended (exit status: 1)"),
                "{shown}"
            );
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
async fn forked_runners_get_gpus_of_their_own() {
    common::runners_get_gpus_of_their_own(forking()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_forked_runner_s_output_reaches_the_parent_s_log_with_its_runner_id() {
    let (captured, _guard) = common::CapturedLogs::install();
    let pool = pool()
        .backend(forking().build())
        .max(1)
        .build()
        .await
        .unwrap();
    let error = pool
        .call(&firebrand_runner::PANIC, "boom-from-a-fork".into())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("boom-from-a-fork"));
    let line = captured
        .line(|l| l.contains("boom-from-a-fork") && l.contains("firebrand::runner_output"))
        .await;
    assert!(line.contains("runner="), "{line}");
    assert!(
        !line.contains("fork-server"),
        "tagged with the runner, not the template: {line}"
    );
    assert!(line.contains("stream=\"stderr\""), "{line}");
    pool.shutdown().await;
}
