//! Warm Fly machines: idle runners parked as suspended or stopped machines, and later boots
//! that claim them with a lease and a `start` instead of a create. Real runner processes on
//! the fake Machines API (suspend is SIGSTOP there, a resume SIGCONT), real QUIC.

mod common;

use std::io::BufRead as _;
use std::time::{Duration, Instant};

use common::fly::{backend, fake, pool, shut_down_clean, IMAGE, SECOND};
use common::{next_matching, within};
use firebrand::backend::fly::{FlyBackend, FlyError, Park};
use firebrand::backend::BootKind;
use firebrand::{Pool, PoolEvent, PoolStats};
use firebrand_fly_fake::FakeFly;

/// How long a runner idles before it parks, in these tests.
const IDLE: Duration = Duration::from_millis(600);

fn parking_backend(fly: &FakeFly, mode: Park) -> FlyBackend {
    backend(fly).park(mode).build().unwrap()
}

async fn parking_pool(backend: FlyBackend, max: usize) -> Pool {
    pool(backend)
        .max(max)
        .max_concurrency(1)
        .idle_shutdown_after(IDLE)
        .build()
        .await
        .unwrap()
}

/// Runs `n` calls at once, so that `n` runners are up.
async fn busy(pool: &Pool, n: usize) {
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let pool = pool.clone();
            // Long enough that every call needs a runner of its own.
            tokio::spawn(async move { pool.call(&firebrand_runner::SLEEP, 300).await.unwrap() })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
}

/// [`busy`], then the pids of the runners' processes.
async fn pids_of(pool: &Pool, fly: &FakeFly, n: usize) -> Vec<u32> {
    busy(pool, n).await;
    let mut pids: Vec<u32> = live_machines(fly)
        .into_iter()
        .filter(|m| m.state == "started")
        .filter_map(|m| m.pid)
        .collect();
    pids.sort_unstable();
    assert_eq!(pids.len(), n, "{:?}", fly.machines());
    pids
}

/// Waits until no runner is up and `parked` machines are parked.
async fn parked(pool: &Pool, parked: usize) {
    let mut stats = pool.watch_runners();
    let wanted =
        |s: &PoolStats| s.ready == 0 && s.booting == 0 && s.draining == 0 && s.parked == parked;
    within(20 * SECOND, stats.wait_for(|s| wanted(s)))
        .await
        .unwrap_or_else(|_| panic!("never {parked} parked: {:?}", pool.stats()));
}

/// The process state letter in `/proc/<pid>/stat`: `T` for a stopped (frozen) process.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

fn live_machines(fly: &FakeFly) -> Vec<firebrand_fly_fake::MachineView> {
    fly.machines()
        .into_iter()
        .filter(|m| m.state != "destroyed")
        .collect()
}

#[tokio::test]
async fn idle_runners_park_suspended_and_the_next_calls_resume_the_same_processes() {
    let fly = fake().await;
    let pool = parking_pool(parking_backend(&fly, Park::Suspend), 2).await;
    let mut events = pool.events();
    let first = pids_of(&pool, &fly, 2).await;
    assert_eq!(fly.created(), 2);
    parked(&pool, 2).await;
    let machines = live_machines(&fly);
    assert_eq!(machines.len(), 2);
    assert!(
        machines.iter().all(|m| m.state == "suspended"),
        "{machines:?}"
    );
    for pid in &first {
        assert_eq!(process_state(*pid), Some('T'), "runner {pid} is frozen");
    }
    for machine in &machines {
        assert_eq!(
            machine.config["auto_destroy"], false,
            "parked machines must stay"
        );
    }

    // The same processes go on: no create, two resumes.
    let again = pids_of(&pool, &fly, 2).await;
    assert_eq!(
        again, first,
        "the resumed runners are the processes that were frozen"
    );
    assert_eq!(fly.created(), 2);
    assert_eq!(fly.counts().starts, 2);
    assert!(fly.counts().leases >= 2, "every claim takes a lease");
    next_matching(&mut events, |e| {
        matches!(
            e,
            PoolEvent::RunnerUp {
                kind: BootKind::Resume,
                ..
            }
        )
    })
    .await;
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn idle_runners_park_stopped_and_the_next_calls_start_them_afresh() {
    let fly = fake().await;
    let pool = parking_pool(parking_backend(&fly, Park::Stop), 2).await;
    let mut events = pool.events();
    let first = pids_of(&pool, &fly, 2).await;
    parked(&pool, 2).await;
    let machines = live_machines(&fly);
    assert!(
        machines.iter().all(|m| m.state == "stopped"),
        "{machines:?}"
    );
    assert!(
        machines.iter().all(|m| m.exit_code == Some(0)),
        "the runners exited cleanly"
    );

    let again = pids_of(&pool, &fly, 2).await;
    assert!(
        again.iter().all(|pid| !first.contains(pid)),
        "restarted: new processes"
    );
    assert_eq!(fly.created(), 2);
    assert_eq!(fly.counts().starts, 2);
    next_matching(&mut events, |e| {
        matches!(
            e,
            PoolEvent::RunnerUp {
                kind: BootKind::Start,
                ..
            }
        )
    })
    .await;
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn a_min_runner_draws_on_a_parked_machine_and_idles_as_a_min_runner() {
    let fly = fake().await;
    let pool = parking_pool(parking_backend(&fly, Park::Suspend), 2).await;
    let mut events = pool.events();
    pids_of(&pool, &fly, 1).await;
    parked(&pool, 1).await;
    pool.resize(firebrand::Limits::new(1, 2, 1)).unwrap();
    next_matching(&mut events, |e| {
        matches!(
            e,
            PoolEvent::RunnerUp {
                kind: BootKind::Resume,
                ..
            }
        )
    })
    .await;
    assert_eq!(fly.created(), 1, "the min runner was the parked one");
    // Its token says it idles out; the claim told it not to, as a min runner does not.
    tokio::time::sleep(4 * IDLE).await;
    let stats = pool.stats();
    assert_eq!((stats.ready, stats.parked), (1, 0), "{stats:?}");
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn a_refused_suspend_parks_the_machine_stopped() {
    let fly = fake().await;
    let pool = parking_pool(parking_backend(&fly, Park::Suspend), 1).await;
    let mut events = pool.events();
    fly.refuse_next_suspend();
    let first = pids_of(&pool, &fly, 1).await;
    let idle_from = std::time::Instant::now();
    let parked_as = next_matching(&mut events, |e| matches!(e, PoolEvent::RunnerParked { .. }));
    let parked_as = parked_as.await;
    // Stopped at once: the runner, closed to be suspended, waits to be frozen and would never
    // exit by itself within the 5 s stop grace that a refused suspend once waited out.
    let took = idle_from.elapsed();
    assert!(
        took < IDLE + 2 * SECOND,
        "parked as stopped {took:?} after the last call (idle after {IDLE:?})"
    );
    assert!(
        matches!(
            parked_as,
            PoolEvent::RunnerParked {
                mode: Park::Stop,
                ..
            }
        ),
        "a refused suspend falls back to a stop"
    );
    parked(&pool, 1).await;
    let machine = live_machines(&fly).remove(0);
    assert_eq!(machine.state, "stopped");
    assert_eq!(
        machine.exit_code,
        Some(0),
        "the parked runner exited at the stop's SIGTERM"
    );
    // Claimed, it starts afresh.
    let again = pids_of(&pool, &fly, 1).await;
    assert_ne!(again, first);
    next_matching(&mut events, |e| {
        matches!(
            e,
            PoolEvent::RunnerUp {
                kind: BootKind::Start,
                ..
            }
        )
    })
    .await;
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn a_parked_machine_destroyed_behind_the_pool_s_back_is_replaced_by_a_create() {
    let fly = fake().await;
    let pool = parking_pool(parking_backend(&fly, Park::Suspend), 1).await;
    pids_of(&pool, &fly, 1).await;
    parked(&pool, 1).await;
    let machine = live_machines(&fly).remove(0);
    assert!(fly.destroy_behind_the_back(&machine.id).await);
    // The claim's lease answers 404: the boot creates a machine instead.
    pids_of(&pool, &fly, 1).await;
    assert_eq!(fly.created(), 2);
    assert_eq!(fly.counts().starts, 0);
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn a_lease_held_by_someone_else_moves_the_claim_to_the_next_machine() {
    let fly = fake().await;
    let pool = parking_pool(parking_backend(&fly, Park::Suspend), 2).await;
    let mut events = pool.events();
    pids_of(&pool, &fly, 2).await;
    // Claims take the machine parked last first: lease that one away.
    let mut last = String::new();
    for _ in 0..2 {
        if let PoolEvent::RunnerParked { machine, .. } =
            next_matching(&mut events, |e| matches!(e, PoolEvent::RunnerParked { .. })).await
        {
            last = machine;
        }
    }
    parked(&pool, 2).await;
    let leased = live_machines(&fly)
        .into_iter()
        .find(|m| last.contains(&m.id))
        .expect("the machine parked last");
    assert!(fly.hold_lease(&leased.id, 60 * SECOND));

    // The claim of the leased machine gets 409 and moves on to the other parked machine.
    pids_of(&pool, &fly, 1).await;
    assert_eq!(
        fly.created(),
        2,
        "no create: the other parked machine served"
    );
    assert_eq!(fly.counts().starts, 1);
    let states: Vec<_> = live_machines(&fly)
        .into_iter()
        .map(|m| (m.id == leased.id, m.state))
        .collect();
    assert!(states.contains(&(true, "suspended".into())), "{states:?}");

    // With the only parked machine still leased, the next boot creates.
    parked(&pool, 2).await;
    let other = live_machines(&fly)
        .into_iter()
        .find(|m| m.id != leased.id)
        .unwrap();
    assert!(fly.hold_lease(&other.id, 60 * SECOND));
    pids_of(&pool, &fly, 1).await;
    assert_eq!(fly.created(), 3);
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn a_resumed_runner_that_never_dials_back_is_destroyed_at_the_boot_timeout() {
    let fly = fake().await;
    let pool = pool(parking_backend(&fly, Park::Suspend))
        .max(1)
        .max_concurrency(1)
        .idle_shutdown_after(IDLE)
        .boot_timeout(3 * SECOND)
        .build()
        .await
        .unwrap();
    pids_of(&pool, &fly, 1).await;
    parked(&pool, 1).await;
    let stuck = live_machines(&fly).remove(0);
    fly.stall_next_resume();
    let started = Instant::now();
    // The claim times out; the boot's retry creates a machine, which serves the call.
    pids_of(&pool, &fly, 1).await;
    assert!(
        started.elapsed() >= 3 * SECOND,
        "the claim had its boot timeout"
    );
    assert_eq!(fly.created(), 2);
    let state = fly
        .machines()
        .into_iter()
        .find(|m| m.id == stuck.id)
        .unwrap()
        .state;
    assert_eq!(state, "destroyed", "destroyed, not parked again");
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn a_deploy_s_new_image_destroys_parked_machines_of_the_old_one() {
    const NEW_IMAGE: &str = "registry.fly.io/fake-app:deployment-02";
    common::init_tracing();
    let fly = firebrand_fly_fake::FakeFly::builder()
        .image(IMAGE, common::RUNNER)
        .image(NEW_IMAGE, common::RUNNER)
        .latency(firebrand_fly_fake::Latency::NONE)
        .start()
        .await
        .unwrap();
    let old = parking_pool(parking_backend(&fly, Park::Suspend), 1).await;
    pids_of(&old, &fly, 1).await;
    parked(&old, 1).await;
    let parked_machine = live_machines(&fly).remove(0);

    // A pool on the new image sweeps at start: the old image's parked machine goes.
    let new = parking_pool(
        backend(&fly)
            .image(NEW_IMAGE)
            .park(Park::Suspend)
            .build()
            .unwrap(),
        1,
    )
    .await;
    let gone = fly.wait_for(10 * SECOND, |c| c.destroyed >= 1).await;
    assert!(gone, "the old image's parked machine is destroyed");
    assert!(fly
        .machines()
        .iter()
        .any(|m| m.id == parked_machine.id && m.state == "destroyed"));
    // The old pool's claim finds it gone, and creates.
    pids_of(&old, &fly, 1).await;
    assert_eq!(fly.created(), 2);
    assert_eq!(fly.counts().starts, 0, "never claimed");
    new.shutdown().await;
    shut_down_clean(old, &fly).await;
}

#[tokio::test]
async fn max_parked_destroys_the_surplus_and_park_ttl_the_rest() {
    let fly = fake().await;
    let backend = backend(&fly)
        .park(Park::Stop)
        .max_parked(1)
        .park_ttl(2 * SECOND)
        .build()
        .unwrap();
    let pool = parking_pool(backend, 2).await;
    pids_of(&pool, &fly, 2).await;
    parked(&pool, 1).await;
    assert!(fly.wait_for(10 * SECOND, |c| c.destroyed == 1).await);
    assert_eq!(
        live_machines(&fly).len(),
        1,
        "one parked, the other destroyed"
    );
    // Past its time-to-live the parked machine goes too.
    parked(&pool, 0).await;
    assert!(fly.all_destroyed(10 * SECOND).await);
    shut_down_clean(pool, &fly).await;
}

#[test]
fn a_park_mode_fly_would_refuse_is_refused_at_build() {
    let base = || {
        firebrand::backend::fly::FlyBackendBuilder::from_vars(|_| None)
            .token("fm2_x")
            .app("app")
            .image(IMAGE)
            .machine_id("parent")
    };
    let refused = |builder: firebrand::backend::fly::FlyBackendBuilder| match builder.build() {
        Err(FlyError::Config(why)) => why,
        other => panic!("expected a config error, got {other:?}"),
    };
    let big = refused(base().cpus(2).memory_mb(4096).park(Park::Suspend));
    assert!(
        big.contains("4096 MB") && big.contains("Park::Stop"),
        "{big}"
    );
    let gpu = refused(
        base()
            .gpu_kind("l40s")
            .cpus(8)
            .memory_mb(2048)
            .park(Park::Suspend),
    );
    assert!(gpu.contains("GPU"), "{gpu}");
    let zero = refused(base().park(Park::Stop).max_parked(0));
    assert!(zero.contains("max_parked"), "{zero}");
    // The same machines park stopped.
    base()
        .cpus(2)
        .memory_mb(4096)
        .park(Park::Stop)
        .build()
        .unwrap();
}

/// The boot token of the fake's one live machine: anyone who can read the machine's config
/// can read it.
fn stolen_boot_token(fly: &FakeFly) -> String {
    let machine = live_machines(fly).remove(0);
    machine.config["env"]["FIREBRAND_PARENT"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_stolen_boot_token_is_refused_while_parked_and_after_its_claim() {
    let fly = fake().await;
    let pool = parking_pool(parking_backend(&fly, Park::Stop), 1).await;
    pids_of(&pool, &fly, 1).await;
    parked(&pool, 1).await;
    let stolen = stolen_boot_token(&fly);
    let replay = || async {
        let output = within(
            30 * SECOND,
            common::spawn_runner(&stolen).wait_with_output(),
        )
        .await
        .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = replay().await;
    assert_eq!(
        code,
        Some(firebrand::runner::exit_code::REFUSED),
        "{stderr}"
    );
    assert!(stderr.contains("no claim for it is open"), "{stderr}");

    // A claim admits the machine's own runner once; the copy is refused after it.
    pids_of(&pool, &fly, 1).await;
    assert_eq!(fly.counts().starts, 1);
    let (code, stderr) = replay().await;
    assert_eq!(
        code,
        Some(firebrand::runner::exit_code::REFUSED),
        "{stderr}"
    );
    assert!(stderr.contains("already connected"), "{stderr}");
    shut_down_clean(pool, &fly).await;
}

/// A copy of a parked runner's boot token that dials while a claim is open (the machine is
/// still starting) is refused, because it lacks the claim's secret, and the claim goes on to
/// admit the machine's own runner: stopped and suspended machines alike.
#[tokio::test]
async fn a_stolen_boot_token_cannot_win_a_claim() {
    for mode in [Park::Stop, Park::Suspend] {
        let fly = fake().await;
        let pool = parking_pool(parking_backend(&fly, mode), 1).await;
        pids_of(&pool, &fly, 1).await;
        parked(&pool, 1).await;
        let stolen = stolen_boot_token(&fly);
        // A slow start holds the claim open long enough for the copy to dial inside it.
        fly.set_latency(firebrand_fly_fake::Latency {
            start: 3 * SECOND,
            resume: 3 * SECOND,
            ..firebrand_fly_fake::Latency::NONE
        });
        let leases = fly.counts().leases;
        let caller = pool.clone();
        let call = tokio::spawn(async move { caller.call(&firebrand_runner::PID, ()).await });
        // The lease comes after the claim is open and before the start.
        assert!(fly.wait_for(10 * SECOND, |c| c.leases > leases).await);
        let output = within(
            30 * SECOND,
            common::spawn_runner(&stolen).wait_with_output(),
        )
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(firebrand::runner::exit_code::REFUSED),
            "{mode:?}: {stderr}"
        );
        assert!(
            stderr.contains("claim is open") && stderr.contains("secret"),
            "{mode:?}: {stderr}"
        );
        let served_by = within(30 * SECOND, call).await.unwrap().unwrap();
        let machine_pid = live_machines(&fly).remove(0).pid;
        assert_eq!(
            Some(served_by),
            machine_pid,
            "{mode:?}: the machine's own runner"
        );
        assert_eq!(fly.created(), 1, "{mode:?}: claimed, not created");
        fly.set_latency(firebrand_fly_fake::Latency::NONE);
        shut_down_clean(pool, &fly).await;
    }
}

/// Set for the parent helper, with the fake's URL.
const HELPER_ENV: &str = "FIREBRAND_TEST_PARKING_PARENT";

/// The parent in the SIGKILL test: a pool that parks two suspended runners on the fake whose
/// URL it is given, says so, and waits to be killed. Runs only as that test's child process.
#[test]
#[ignore = "helper process, started by a_killed_parent_s_parked_machines_are_reaped_by_the_next"]
fn parking_parent_helper() {
    let Some(url) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let url = url.into_string().unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let backend = firebrand::backend::fly::FlyBackendBuilder::from_vars(|_| None)
            .api_base(url)
            .token("fm2_fake-token")
            .app("fake-app")
            .image(IMAGE)
            .region("ord")
            .private_ip("::1")
            .machine_id(common::fly::PARENT)
            .park(Park::Suspend)
            .build()
            .unwrap();
        let pool = parking_pool(backend, 2).await;
        busy(&pool, 2).await;
        parked(&pool, 2).await;
        println!("PARKED");
        std::future::pending::<()>().await;
    });
}

#[tokio::test]
async fn a_killed_parent_s_parked_machines_are_reaped_by_the_next() {
    let fly = fake().await;
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "parking_parent_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, fly.url())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = helper.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.ends_with("PARKED"))
    });
    let ready = within(60 * SECOND, ready).await.unwrap();
    common::sigkill(helper.id());
    let _ = helper.wait();
    assert!(ready, "the helper parked its runners");
    let parked: Vec<_> = live_machines(&fly);
    assert_eq!(parked.len(), 2);
    assert!(parked.iter().all(|m| m.state == "suspended"), "{parked:?}");

    // The parent comes back (another incarnation): its start-up sweep destroys them.
    let pool = parking_pool(parking_backend(&fly, Park::Suspend), 2).await;
    assert!(
        fly.all_destroyed(10 * SECOND).await,
        "{:?}",
        live_machines(&fly)
    );
    assert_eq!(fly.counts().starts, 0, "not adopted");
    shut_down_clean(pool, &fly).await;
}

/// Counts the runners that came up on a created machine, from the pool's events, until the
/// returned handle is asked.
fn count_created_runners(pool: &Pool) -> tokio::task::JoinHandle<usize> {
    use futures_util::StreamExt as _;
    let mut events = pool.events();
    tokio::spawn(async move {
        let mut created = 0;
        while let Some(event) = events.next().await {
            if let PoolEvent::RunnerUp {
                kind: BootKind::Create,
                ..
            } = event
            {
                created += 1;
            }
        }
        created
    })
}

/// Issue 22: three callers that gave up while the only boot's create was in flight once left
/// that machine to boot for nobody, idle out and be destroyed 6.1 s later.
#[tokio::test]
async fn callers_that_give_up_cancel_the_boot_and_its_machine_never_serves() {
    let fly = fake().await;
    fly.slow_creates(3 * SECOND);
    let pool = pool(backend(&fly).build().unwrap())
        .max(1)
        .queue_timeout(SECOND)
        .idle_shutdown_after(30 * SECOND)
        .build()
        .await
        .unwrap();
    let created = count_created_runners(&pool);
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.call(&firebrand_runner::PID, ()).await })
        })
        .collect();
    for call in calls {
        let outcome = within(10 * SECOND, call).await.unwrap();
        assert!(
            matches!(outcome, Err(firebrand::CallError::QueueTimeout { .. })),
            "{outcome:?}"
        );
    }
    // The create answers at 3 s; its machine is destroyed then, with no runner ever up on it
    // (without the cancel it would serve nobody until its 30 s idle timeout).
    assert!(fly.all_destroyed(10 * SECOND).await, "{:?}", fly.machines());
    assert_eq!(fly.created(), 1);
    assert_eq!(pool.stats().ready, 0);
    shut_down_clean(pool, &fly).await;
    assert_eq!(created.await.unwrap(), 0, "no runner came up for nobody");
}

/// Issue 22: bursts that parked machines can serve once also created machines that were
/// destroyed 0.6 s later, unused, and later 2-4 machines more that booted for a burst the
/// parked ones would have served sooner. The first burst creates `max`; the later ones claim
/// parked machines and create nothing.
#[tokio::test]
async fn bursts_that_parked_machines_serve_create_nothing() {
    let fly = fake().await;
    // Fly's pace: a create takes 2 s, a resume 300 ms. Three machines stay parked of five.
    fly.set_latency(firebrand_fly_fake::Latency::FLY);
    let backend = backend(&fly)
        .park(Park::Suspend)
        .max_parked(3)
        .build()
        .unwrap();
    let pool = parking_pool(backend, 5).await;
    let created = count_created_runners(&pool);
    let mut parked_after = Vec::new();
    let mut created_after = Vec::new();
    for _ in 0..3 {
        let calls: Vec<_> = (0..10)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.call(&firebrand_runner::SLEEP, 100).await })
            })
            .collect();
        for call in calls {
            within(30 * SECOND, call).await.unwrap().unwrap();
        }
        let mut stats = pool.watch_runners();
        within(
            20 * SECOND,
            stats.wait_for(|s| s.ready == 0 && s.booting == 0 && s.draining == 0 && s.parked > 0),
        )
        .await
        .unwrap();
        // And every park under way has ended (the fake reports no event for it).
        within(20 * SECOND, async {
            while fly.machines().iter().any(|m| m.state == "suspending") {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        parked_after.push(pool.stats().parked);
        created_after.push(fly.created());
    }
    let machines = fly.created();
    shut_down_clean(pool, &fly).await;
    let booted = created.await.unwrap();
    println!(
        "created {machines} machines, {booted} booted a runner; created after each burst: \
         {created_after:?}; parked after each: {parked_after:?}"
    );
    assert_eq!(machines, booted, "a created machine never booted a runner");
    assert_eq!(created_after, [5, 5, 5], "only the first burst creates");
}

/// Issue 22: a call that arrived while its runner's machine was being suspended paid a whole
/// create. It now waits for the suspend and resumes the machine.
#[tokio::test]
async fn a_call_during_a_suspend_waits_for_it_and_resumes_the_machine() {
    let fly = fake().await;
    fly.set_latency(firebrand_fly_fake::Latency {
        create: 2 * SECOND,
        start: SECOND,
        resume: Duration::from_millis(300),
        suspend: SECOND,
    });
    let pool = parking_pool(parking_backend(&fly, Park::Suspend), 1).await;
    let mut events = pool.events();
    let first = pids_of(&pool, &fly, 1).await;
    // The runner idles out and its machine starts to suspend: a call arrives then.
    assert!(fly.wait_for(20 * SECOND, |c| c.suspends == 1).await);
    let pid = within(20 * SECOND, pool.call(&firebrand_runner::PID, ()))
        .await
        .unwrap();
    assert_eq!(vec![pid], first, "the same process, resumed");
    assert_eq!(
        fly.created(),
        1,
        "no create for a call that a suspend could serve"
    );
    next_matching(&mut events, |e| {
        matches!(
            e,
            PoolEvent::RunnerUp {
                kind: BootKind::Resume,
                ..
            }
        )
    })
    .await;
    shut_down_clean(pool, &fly).await;
}
