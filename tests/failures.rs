//! Losing runners, losing the parent, and dropping the pool: nothing hangs and nothing leaks.

mod common;

use std::io::BufRead as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{alive, local_backend, parent_of, pool, sigkill, wait_dead, within, Recording};
use firebrand::CallError;
use firebrand_runner::{PID, SLEEP};

const SECOND: Duration = Duration::from_secs(1);
const HELPER_ENV: &str = "FIREBRAND_TEST_PARENT_HELPER";

#[tokio::test]
async fn runner_killed_mid_call_is_reported_promptly_and_replaced() {
    common::killed_runner_is_lost_at_once_and_replaced(local_backend()).await;
}

/// Set for the parent helper: its runners are forked from a template.
const FORK_ENV: &str = "FIREBRAND_TEST_FORK";

/// A pool with two ready runners, and the backend that knows their pids.
async fn two_runners(builder: firebrand::PoolBuilder) -> (firebrand::Pool, Recording) {
    let backend = if std::env::var_os(FORK_ENV).is_some() {
        firebrand::LocalBackend::builder()
            .command(common::RUNNER)
            .fork_server()
            .build()
    } else {
        local_backend()
    };
    let backend = Recording::new(backend);
    let pool = builder
        .backend(backend.clone())
        .min(2)
        .max(2)
        .build()
        .await
        .unwrap();
    pool.call(&PID, ()).await.unwrap();
    (pool, backend)
}

#[tokio::test]
async fn dropping_the_pool_leaves_no_runner_behind() {
    let (pool, backend) = two_runners(pool()).await;
    let pids = backend.pids();
    assert_eq!(pids.len(), 2);
    drop(pool);
    for pid in pids {
        wait_dead(pid, 10 * SECOND).await;
    }
}

/// The runners' drain grace in the parent helper: long enough to tell a runner that waits it
/// out from one killed at once.
const HELPER_DRAIN_GRACE: Duration = Duration::from_secs(4);
/// The helper's peer timeout, and a keep-alive as long as it may be (a third of it): the
/// keep-alive a runner sends after the parent's last packet must not add to the bound.
const HELPER_PEER_TIMEOUT: Duration = Duration::from_millis(1_500);
const HELPER_KEEP_ALIVE: Duration = Duration::from_millis(500);
/// Set for the parent helper to boot its runners on the fake Fly API at this address (with
/// its token and app after spaces), which the test process runs and which outlives the helper.
const FLY_ENV: &str = "FIREBRAND_TEST_FLY";

/// The parent in `parent_killed_*`: a pool with two runners, one of them running a detached
/// spawn that outlives everything, whose pids it prints before waiting to be killed. Runs only
/// as those tests' child process.
#[test]
#[ignore = "helper process, started by the parent_killed_* tests"]
fn parent_helper() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let builder = pool()
            .peer_timeout(HELPER_PEER_TIMEOUT)
            .keep_alive(HELPER_KEEP_ALIVE)
            .drain_grace(HELPER_DRAIN_GRACE)
            // Pack puts the round trip below on the runner with the spawn, over the same
            // connection; Spread would send it to the other runner, proving nothing.
            .placement(firebrand::Placement::Pack);
        let pool = match std::env::var(FLY_ENV) {
            Ok(fly) => {
                let mut fly = fly.split(' ');
                let mut next = || fly.next().unwrap().to_owned();
                let backend = common::fly::backend_at(next(), next(), next());
                let pool = builder
                    .backend(backend)
                    .min(2)
                    .max(2)
                    .build()
                    .await
                    .unwrap();
                pool.call(&PID, ()).await.unwrap();
                pool
            }
            Err(_) => {
                let (pool, backend) = two_runners(builder).await;
                for pid in backend.pids() {
                    println!("RUNNER_PID {pid}");
                }
                pool
            }
        };
        use futures_util::StreamExt as _;
        let mut events = pool.events();
        pool.call(&SLEEP, 600_000).timeout(None).spawn().detach();
        // Started means its request was handed to QUIC; a round trip after it on the same
        // connection means the connection has sent it, so the runner has it even if this
        // process dies now.
        while !matches!(
            events.next().await,
            Some(firebrand::PoolEvent::CallStarted { .. })
        ) {}
        pool.call(&PID, ()).await.unwrap();
        println!("READY");
        std::future::pending::<()>().await;
    });
}

#[tokio::test]
async fn parent_killed_runners_drain_then_exit() {
    parent_killed_runners_exit(Runners::Exec).await;
}

#[tokio::test]
async fn parent_killed_forked_runners_drain_then_exit_and_so_does_their_template() {
    parent_killed_runners_exit(Runners::Forked).await;
}

#[tokio::test]
async fn parent_killed_fly_runners_drain_then_exit() {
    parent_killed_runners_exit(Runners::Fly).await;
}

#[derive(PartialEq)]
enum Runners {
    Exec,
    Forked,
    Fly,
}

/// One rule on every backend: after its parent is killed, a runner lets the calls it runs go on
/// for the drain grace, then exits; the idle one exits once it sees the parent gone. Neither
/// outlives the parent by more than `peer_timeout + drain_grace`, the bound the README states.
async fn parent_killed_runners_exit(runners: Runners) {
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap());
    helper
        .args([
            "parent_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .stdout(std::process::Stdio::piped());
    let fly = match runners {
        Runners::Exec => None,
        Runners::Forked => {
            helper.env(FORK_ENV, "1");
            None
        }
        Runners::Fly => {
            let fly = common::fly::fake().await;
            helper.env(
                FLY_ENV,
                format!("{} {} {}", fly.url(), fly.token(), fly.app()),
            );
            Some(fly)
        }
    };
    let mut parent = KillOnDrop(helper.spawn().unwrap());
    let stdout = parent.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut pids = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            // libtest may print its own `test parent_helper ... ` at the start of a line.
            if let Some((_, pid)) = line.split_once("RUNNER_PID ") {
                pids.push(pid.trim().parse::<u32>().unwrap());
            } else if line.ends_with("READY") {
                let _ = tx.send(pids);
                return;
            }
        }
    });
    // Waited for off the runtime's thread: the fake Fly API runs on it.
    let pids = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)));
    let mut pids = pids.await.unwrap().expect("parent helper became ready");
    if let Some(fly) = &fly {
        pids = fly.machines().iter().filter_map(|m| m.pid).collect();
    }
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| alive(*p)));
    // A forked runner's parent is the template, which must go too.
    let template = (runners == Runners::Forked).then(|| parent_of(pids[0]));
    if let Some(template) = template {
        assert_ne!(template, parent.0.id());
    }
    sigkill(parent.0.id());
    parent.0.wait().unwrap();
    let killed = Instant::now();
    let mut lifetimes = Vec::new();
    for pid in pids.iter().copied().chain(template) {
        wait_dead(pid, 30 * SECOND).await;
        lifetimes.push(killed.elapsed());
    }
    println!("runners (then template) exited {lifetimes:?} after their parent was killed");
    // The runner with the spawn drained it for the whole grace: it cannot have exited sooner.
    let longest = lifetimes.iter().max().unwrap();
    assert!(
        *longest >= HELPER_DRAIN_GRACE,
        "no runner waited out the drain grace for its running call: {lifetimes:?}"
    );
    // The bound, with room for the exit itself and for the 50 ms polls that see it.
    let bound = HELPER_PEER_TIMEOUT + HELPER_DRAIN_GRACE;
    assert!(
        *longest <= bound + Duration::from_millis(400),
        "a runner outlived its parent by more than peer_timeout + drain_grace ({bound:?}): \
         {lifetimes:?}"
    );
}

/// Kills the helper parent if the test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn sigterm_drains_the_runner_and_min_replaces_it() {
    let pool = pool().min(1).max(1).build().await.unwrap();
    let pid = pool.call(&PID, ()).await.unwrap();
    let running = tokio::spawn({
        let pool = pool.clone();
        async move { pool.call(&SLEEP, 700).await }
    });
    while pool.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    running
        .await
        .unwrap()
        .expect("the running call finished during the drain");
    wait_dead(pid, 10 * SECOND).await;
    let mut counts = pool.watch_runners();
    within(20 * SECOND, counts.wait_for(|c| c.ready == 1))
        .await
        .unwrap();
    assert_ne!(pool.call(&PID, ()).await.unwrap(), pid);
    pool.shutdown().await;
}

/// Plays a parent on its own runtime, sends one sleep call, then vanishes without a close (the
/// runtime is dropped), and returns the runner's exit code and the time from the call to its exit.
fn vanish_during_a_call(sleep_ms: u64, drain_grace: Duration) -> (Option<i32>, Duration) {
    let (code, elapsed, _) = vanish_during_a_call_with(sleep_ms, drain_grace, false);
    (code, elapsed)
}

/// [`vanish_during_a_call`], on a backend whose runners' output the parent does not see when
/// `machine_log`; also returns what the runner wrote to its stderr.
fn vanish_during_a_call_with(
    sleep_ms: u64,
    drain_grace: Duration,
    machine_log: bool,
) -> (Option<i32>, Duration, String) {
    let parent_runtime = tokio::runtime::Runtime::new().unwrap();
    let waiting = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let settings = firebrand::internals::token::RunnerSettings {
        peer_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_millis(300),
        drain_grace,
        log_filter: "info".into(),
        forward_output: machine_log,
        ..common::raw_settings()
    };
    let parent = parent_runtime.block_on(async { common::RawParent::new() });
    let token = parent.token(settings);
    let mut runner = waiting.block_on(async { common::spawn_runner(&token.encode()) });
    let (connection, control, streams) = parent_runtime.block_on(async {
        let (connection, control) = parent.admit().await;
        let (send, reply) = common::raw_request(&connection, SLEEP.name(), 0, &sleep_ms).await;
        // Resolves once the runner has read the whole request: the job is then running.
        send.stopped().await.unwrap();
        (connection, control, (send, reply))
    });
    let started = Instant::now();
    // Gone without a word: the handles are leaked so that no close is queued, and the runtime
    // that drives the endpoint stops.
    std::mem::forget((connection, control, streams, parent));
    parent_runtime.shutdown_background();
    let (status, stderr) = waiting.block_on(async {
        use tokio::io::AsyncReadExt as _;
        let mut stderr = String::new();
        let mut pipe = runner.stderr.take().unwrap();
        // Read while it runs, so that a full pipe never holds it up.
        let (status, _) = tokio::join!(
            within(30 * SECOND, runner.wait()),
            pipe.read_to_string(&mut stderr)
        );
        (status.unwrap(), stderr)
    });
    (status.code(), started.elapsed(), stderr)
}

#[test]
fn a_runner_cut_off_from_its_parent_leaves_its_last_lines_in_its_own_stderr() {
    common::init_tracing();
    // The call outlasts the 1 s peer timeout; the drain ends when it does.
    let (code, _, stderr) = vanish_during_a_call_with(2_000, Duration::from_secs(10), true);
    assert_eq!(code, Some(firebrand::runner::exit_code::PARENT_LOST));
    // One compact line per event, as the machine's log (Fly's, `kubectl logs`) shows it.
    let lost = stderr
        .lines()
        .find(|line| line.contains("parent lost: draining"))
        .unwrap_or_else(|| panic!("no parent-lost line in the runner's stderr:\n{stderr}"));
    assert!(lost.contains("WARN"), "{lost}");
    assert!(lost.contains("reason="), "{lost}");
    assert!(
        stderr
            .lines()
            .any(|line| line.contains("connected to parent")),
        "{stderr}"
    );
    // Where the parent brings the runner's output itself (the local backend), the events go
    // over the connection only: its stderr is the parent's log, and would show them twice.
    let (code, _, stderr) = vanish_during_a_call_with(2_000, Duration::from_secs(10), false);
    assert_eq!(code, Some(firebrand::runner::exit_code::PARENT_LOST));
    assert!(!stderr.contains("parent lost"), "{stderr}");
}

#[test]
fn a_runner_that_loses_its_parent_drains_its_calls_within_the_grace() {
    common::init_tracing();
    // The call outlives the 1 s peer timeout: the runner waits for it, then exits.
    let (code, elapsed) = vanish_during_a_call(3_000, Duration::from_secs(10));
    assert_eq!(code, Some(firebrand::runner::exit_code::PARENT_LOST));
    assert!(
        elapsed >= Duration::from_millis(2_700),
        "exited before the call ended: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
    // A call longer than the grace is abandoned when the grace ends.
    let (code, elapsed) = vanish_during_a_call(60_000, Duration::from_millis(500));
    assert_eq!(code, Some(firebrand::runner::exit_code::PARENT_LOST));
    assert!(
        elapsed < Duration::from_secs(6),
        "waited past the grace: {elapsed:?}"
    );
}

#[tokio::test]
async fn a_retried_call_survives_its_runner_dying_and_runs_on_another() {
    let backend = Recording::new(local_backend());
    let pool = pool()
        .backend(backend.clone())
        .min(1)
        .max(2)
        .max_concurrency(1)
        .peer_timeout(Duration::from_secs(30))
        .keep_alive(Duration::from_secs(10))
        .build()
        .await
        .unwrap();
    let first = pool.call(&PID, ()).await.unwrap();
    let call = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.call(&SLEEP, 500)
                .idempotent()
                .retries(3)
                .timeout(None)
                .await
        }
    });
    while pool.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    sigkill(first);
    within(30 * SECOND, call)
        .await
        .unwrap()
        .expect("the retry ran on another runner");
    assert!(backend.boots() >= 2, "a second runner served the retry");
    assert_ne!(pool.call(&PID, ()).await.unwrap(), first);
    pool.shutdown().await;
}

#[tokio::test]
async fn job_errors_are_retried_only_when_the_caller_opts_in() {
    use firebrand_runner::{FAIL, STATS};
    // A job marked idempotent, with retries by default.
    const FLAKY: firebrand::Job<String, ()> = FAIL.idempotent().retries(2);
    let pool = pool().min(1).max(1).build().await.unwrap();
    match pool.call(&FLAKY, "no".into()).await {
        Err(CallError::Job(error)) => assert_eq!(error.message(), "no"),
        other => panic!("a job error is not retried by default: {other:?}"),
    }
    assert_eq!(pool.call(&STATS, ()).await.unwrap().failed, 1);
    match pool.call(&FLAKY, "again".into()).retry_job_errors().await {
        Err(CallError::Attempts { attempts }) => {
            assert_eq!(attempts.len(), 3, "{attempts:?}");
            assert!(attempts
                .iter()
                .all(|e| matches!(e, CallError::Job(error) if error.message() == "again")));
        }
        other => panic!("expected every attempt's cause, got {other:?}"),
    }
    assert_eq!(pool.call(&STATS, ()).await.unwrap().failed, 4);
    // Retries need an idempotent call.
    match pool.call(&FAIL, "x".into()).retries(1).await {
        Err(CallError::NotIdempotent { job }) => assert_eq!(job, FAIL.name()),
        other => panic!("expected NotIdempotent, got {other:?}"),
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_queued_behind_a_killed_runner_run_on_a_new_one() {
    calls_queued_behind_a_lost_runner_run_on_a_new_one(libc::SIGKILL).await;
}

/// A stopped runner is lost at the peer timeout, when its calls and its supervisor all learn
/// of it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_queued_behind_a_stopped_runner_run_on_a_new_one() {
    calls_queued_behind_a_lost_runner_run_on_a_new_one(libc::SIGSTOP).await;
}

/// With one runner busy and calls queued behind it, `signal` takes the runner away: only the
/// calls it was running fail.
async fn calls_queued_behind_a_lost_runner_run_on_a_new_one(signal: libc::c_int) {
    const IN_FLIGHT: usize = 4;
    const QUEUED: usize = 32;
    let pool = pool()
        .max(1)
        .max_concurrency(IN_FLIGHT as u32)
        .terminate_grace(Duration::ZERO)
        .peer_timeout(SECOND)
        .keep_alive(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let pid = pool.call(&PID, ()).await.unwrap();
    let running = common::spawn_sleeps(&pool, IN_FLIGHT, 60_000);
    let mut counts = pool.watch_runners();
    within(10 * SECOND, async {
        while pool.stats().in_flight < IN_FLIGHT {
            let _ = tokio::time::timeout(Duration::from_millis(20), counts.changed()).await;
        }
    })
    .await;
    let queued: Vec<_> = (0..QUEUED)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.call(&PID, ()).await })
        })
        .collect();
    within(10 * SECOND, async {
        while pool.stats().queued < QUEUED {
            let _ = tokio::time::timeout(Duration::from_millis(20), counts.changed()).await;
        }
    })
    .await;
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0);
    for call in running {
        let outcome = within(30 * SECOND, call).await.unwrap();
        assert!(
            matches!(outcome, Err(CallError::RunnerLost { .. })),
            "{outcome:?}"
        );
    }
    for call in queued {
        let new_pid = within(30 * SECOND, call).await.unwrap().unwrap();
        assert_ne!(new_pid, pid, "a queued call ran on the killed runner");
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn a_runner_that_exits_at_boot_has_its_last_words_in_the_boot_error() {
    let backend = firebrand::LocalBackend::builder()
        .command("sh")
        .arg("-c")
        .arg("echo starting; echo 'MODEL_DIR is not set' >&2; exit 7")
        .build();
    let message = common::min_boot_error(backend).await;
    assert!(message.contains("exit status: 7"), "{message}");
    assert!(message.contains("MODEL_DIR is not set"), "{message}");
}

/// A bounded soak: calls keep 64 in flight on up to 4 runners × 16 while a random live runner
/// is killed every 300 ms. Each kill may fail only the calls its runner had: at most 16.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_runners_under_load_fails_only_their_own_calls() {
    const KILLS: usize = 8;
    let backend = Recording::new(local_backend());
    let pool = pool()
        .backend(backend.clone())
        .max(4)
        .max_concurrency(16)
        .terminate_grace(Duration::ZERO)
        .build()
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes = Arc::new(parking_lot::Mutex::new((
        0usize,
        0usize,
        Vec::<String>::new(),
    )));
    let callers: Vec<_> = (0..64)
        .map(|_| {
            let (pool, stop, outcomes) = (pool.clone(), Arc::clone(&stop), Arc::clone(&outcomes));
            tokio::spawn(async move {
                // Bounded in count as well as by the stop flag.
                for _ in 0..2_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let outcome = pool.call(&SLEEP, 5).await;
                    let mut outcomes = outcomes.lock();
                    match outcome {
                        Ok(()) => outcomes.0 += 1,
                        Err(CallError::RunnerLost { .. }) => outcomes.1 += 1,
                        Err(other) => outcomes.2.push(other.to_string()),
                    }
                }
            })
        })
        .collect();
    let mut killed = std::collections::HashSet::new();
    let mut kills = 0;
    let mut ticks = tokio::time::interval(Duration::from_millis(300));
    ticks.tick().await;
    while kills < KILLS {
        ticks.tick().await;
        let live: Vec<u32> = backend
            .pids()
            .into_iter()
            .filter(|p| !killed.contains(p) && alive(*p))
            .collect();
        if let Some(&pid) = live.get(kills % live.len().max(1)) {
            sigkill(pid);
            killed.insert(pid);
            kills += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for caller in callers {
        within(60 * SECOND, caller).await.unwrap();
    }
    let (succeeded, lost, others) = outcomes.lock().clone();
    println!("{succeeded} succeeded, {lost} lost to {kills} kills, other errors: {others:?}");
    assert!(others.is_empty(), "{others:?}");
    assert!(succeeded > 0);
    assert!(
        lost <= kills * 16,
        "{lost} calls failed with RunnerLost for {kills} kills of runners that held 16 each"
    );
    pool.shutdown().await;
}
