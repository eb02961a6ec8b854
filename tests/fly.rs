//! The Fly backend end to end: real runner processes booted by the fake Machines API, which
//! validates every request against Fly's OpenAPI spec, dialing back over real QUIC.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fly::{backend, fake, pool, shut_down_clean, IMAGE, PARENT, SECOND};
use common::{boot_failure, within, RUNNER};
use firebrand::backend::fly::{FlyBackend, FlyBackendBuilder, FlyError};
use firebrand::backend::BootRequest;
use firebrand::{Backend, RunnerId};
use firebrand_fly_fake::{FakeFly, Latency};
use firebrand_runner::{ENV, PID, SLEEP};

#[tokio::test]
async fn a_pool_on_fly_grows_runs_jobs_idles_down_and_destroys_every_machine() {
    let fly = fake().await;
    let pool = pool(backend(&fly).build().unwrap())
        .max(3)
        .max_concurrency(1)
        .idle_shutdown_after(SECOND)
        .build()
        .await
        .unwrap();
    common::concurrent_sleeps(&pool, 6, 400).await;
    assert_eq!(fly.created(), 3);
    // Each call ran inside a fake machine: its env is the machine's.
    let machine_id = pool.call(&ENV, "FLY_MACHINE_ID".into()).await.unwrap();
    let machines = fly.machines();
    assert!(machines.iter().any(|m| Some(&m.id) == machine_id.as_ref()));
    for machine in &machines {
        let config = &machine.config;
        assert!(
            machine.name.starts_with("fake-app-firebrand-"),
            "{}",
            machine.name
        );
        assert_eq!(machine.region, "ord");
        assert_eq!(config["image"], IMAGE);
        assert_eq!(config["auto_destroy"], true);
        assert_eq!(config["restart"]["policy"], "no");
        assert!(config.get("services").is_none());
        assert!(config["env"]["FIREBRAND_PARENT"].is_string());
        assert!(config["env"].get("FLY_API_TOKEN").is_none());
        assert_eq!(config["metadata"]["firebrand_pool"], "firebrand");
        assert_eq!(config["metadata"]["firebrand_parent"], PARENT);
        assert!(config["metadata"]["firebrand_launch"].is_string());
    }
    let mut counts = pool.watch_runners();
    within(
        10 * SECOND,
        counts.wait_for(|c| c.ready == 0 && c.draining == 0),
    )
    .await
    .unwrap();
    assert!(
        fly.all_destroyed(10 * SECOND).await,
        "idle runners' machines are destroyed"
    );
    shut_down_clean(pool, &fly).await;
    assert_eq!(fly.counts().destroyed, 3);
}

#[tokio::test]
async fn a_crash_at_boot_fails_fast_with_the_exit_code() {
    let fly = fake().await;
    // The crash is seen through `/wait`, even while the new machine is not yet visible.
    fly.hide_new_machines(2);
    fly.crash_next_boot(17);
    let pool = pool(backend(&fly).build().unwrap())
        .boot_timeout(60 * SECOND)
        .boot_attempts(1)
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let error = pool.call(&PID, ()).await.unwrap_err();
    let elapsed = started.elapsed();
    let message = boot_failure(&error);
    assert!(message.contains("exit code 17"), "{message}");
    assert!(
        elapsed < 10 * SECOND,
        "took {elapsed:?} of a 60 s boot timeout"
    );
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn a_machine_that_never_dials_back_is_destroyed_at_the_boot_timeout() {
    let fly = fake().await;
    fly.stall_next_boot();
    let pool = pool(backend(&fly).build().unwrap())
        .boot_timeout(2 * SECOND)
        .boot_attempts(1)
        .build()
        .await
        .unwrap();
    let error = pool.call(&PID, ()).await.unwrap_err();
    assert!(boot_failure(&error).contains("boot timeout"), "{error}");
    assert!(
        fly.all_destroyed(10 * SECOND).await,
        "FLAME leaves this machine running; Firebrand destroys it"
    );
    // The next boot works.
    pool.call(&PID, ()).await.unwrap();
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn a_429_burst_is_retried_after_retry_after() {
    let fly = fake().await;
    let pool = pool(backend(&fly).build().unwrap()).build().await.unwrap();
    fly.rate_limit_burst(2, Some(SECOND));
    pool.call(&PID, ()).await.unwrap();
    let counts = fly.counts();
    assert_eq!(counts.rate_limited, 2);
    assert_eq!(counts.created, 1);
    let times = fly.create_times();
    assert_eq!(times.len(), 3, "two refused creates, then one that worked");
    assert!(
        times[2] >= Duration::from_millis(1900),
        "Retry-After was not honoured: {times:?}"
    );
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn creates_are_paced_by_the_client_within_fly_s_limit() {
    let fly = fake().await;
    let pool = pool(backend(&fly).build().unwrap())
        .max(6)
        .max_concurrency(1)
        .build()
        .await
        .unwrap();
    // Each call outlasts every create (the sixth waits about 3 s for its turn), so no boot is
    // cancelled for a call that ran elsewhere.
    common::concurrent_sleeps(&pool, 6, 5_000).await;
    assert_eq!(fly.created(), 6);
    let times = fly.create_times();
    // A token bucket of 1/s with bursts of 3 allows at most 3 + t creates in any t seconds.
    for (i, first) in times.iter().enumerate() {
        for (j, last) in times.iter().enumerate().skip(i) {
            let allowed = 3.0 + (*last - *first).as_secs_f64() + 0.2;
            assert!(
                ((j - i + 1) as f64) <= allowed,
                "creates too fast: {times:?}"
            );
        }
    }
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn an_ambiguous_create_is_adopted_not_repeated() {
    let fly = fake().await;
    fly.fail_next_create_after_launch();
    let pool = pool(backend(&fly).build().unwrap()).build().await.unwrap();
    pool.call(&PID, ()).await.unwrap();
    let counts = fly.counts();
    assert_eq!(counts.create_requests, 1, "no second create after the 503");
    assert_eq!(counts.created, 1);
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn a_create_cut_off_by_the_boot_timeout_leaves_no_machine() {
    let fly = fake().await;
    fly.slow_creates(4 * SECOND);
    let pool = pool(backend(&fly).build().unwrap())
        .boot_timeout(SECOND)
        .boot_attempts(1)
        .build()
        .await
        .unwrap();
    let error = pool.call(&PID, ()).await.unwrap_err();
    assert!(boot_failure(&error).contains("boot timeout"), "{error}");
    assert_eq!(fly.created(), 1, "the create went through on Fly's side");
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn capacity_errors_move_to_the_fallback_regions() {
    let fly = fake().await;
    fly.no_capacity_in("ord");
    let backend = backend(&fly)
        .fallback_regions(["ams"])
        .capacity_attempts(2)
        .build()
        .unwrap();
    let pool = pool(backend).build().await.unwrap();
    pool.call(&PID, ()).await.unwrap();
    assert_eq!(
        fly.counts().create_requests,
        2,
        "one refusal in ord, then at once ams"
    );
    let machines = fly.machines();
    assert_eq!(machines.len(), 1);
    assert_eq!(machines[0].region, "ams");
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn no_capacity_anywhere_is_a_clear_error() {
    let fly = fake().await;
    fly.no_capacity_in("ord");
    fly.no_capacity_in("ams");
    let backend = backend(&fly)
        .fallback_regions(["ams"])
        .capacity_attempts(1)
        .build()
        .unwrap();
    let pool = pool(backend).boot_attempts(1).build().await.unwrap();
    let message = boot_failure(&pool.call(&PID, ()).await.unwrap_err());
    assert!(
        message.contains(r#"no capacity for the machine in ["ord", "ams"]"#),
        "{message}"
    );
    assert!(message.contains("insufficient_capacity"), "{message}");
    assert!(message.contains("fly-request-id: 01"), "{message}");
    assert_eq!(fly.created(), 0);
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn a_gpu_refusal_quotes_fly_and_names_the_alternatives() {
    let fly = fake().await;
    fly.refuse_gpus();
    let backend = backend(&fly)
        .cpu_kind(firebrand::backend::fly::CpuKind::Performance)
        .cpus(8)
        .memory_mb(32768)
        .gpu_kind("a100-pcie-40gb")
        .build()
        .unwrap();
    let request = BootRequest::new(RunnerId(uuid::Uuid::new_v4()), Vec::new());
    let error = match backend.boot(request).await {
        Err(error) if matches!(error.provider_error(), Some(FlyError::GpuRefused(_))) => {
            error.to_string()
        }
        Err(other) => panic!("expected a GPU refusal, got {other}"),
        Ok(_) => panic!("a refused GPU machine must not look booted"),
    };
    assert!(
        error.contains("GPU machines are no longer available"),
        "Fly's words: {error}"
    );
    assert!(
        error.contains("discontinued GPU machines after 2026-08-01"),
        "{error}"
    );
    assert!(error.contains("LocalBackend"), "{error}");
    assert_eq!(fly.counts().create_requests, 1, "a refusal is not retried");
    assert_eq!(fly.created(), 0);
}

/// Boots a machine that never dials back, and forgets it, as a parent that dies would.
async fn leave_behind(backend: &FlyBackend, fly: &FakeFly) {
    fly.stall_next_boot();
    let request = BootRequest::new(RunnerId(uuid::Uuid::new_v4()), Vec::new());
    let machine = backend.boot(request).await.unwrap();
    std::mem::forget(machine);
}

#[tokio::test]
async fn a_restarted_parent_reaps_what_its_predecessor_and_dead_parents_left() {
    let fly = fake().await;
    fly.add_parent_machine(PARENT);
    fly.add_parent_machine("live0other0parent");
    let before_restart = backend(&fly).incarnation("first-run").build().unwrap();
    leave_behind(&before_restart, &fly).await;
    leave_behind(&before_restart, &fly).await;
    let live_parent = backend(&fly)
        .machine_id("live0other0parent")
        .build()
        .unwrap();
    leave_behind(&live_parent, &fly).await;
    let dead_parent = backend(&fly).machine_id("dead0parent").build().unwrap();
    leave_behind(&dead_parent, &fly).await;
    assert_eq!(fly.created(), 4);

    // The parent restarts: its new pool reaps at start.
    let after_restart = backend(&fly).incarnation("second-run").build().unwrap();
    let pool = pool(after_restart.clone()).build().await.unwrap();
    assert!(fly.wait_for(10 * SECOND, |c| c.destroyed >= 3).await);
    let remaining: Vec<_> = fly
        .machines()
        .into_iter()
        .filter(|m| m.state != "destroyed" && m.config["metadata"]["firebrand_pool"].is_string())
        .collect();
    assert_eq!(remaining.len(), 1, "{remaining:?}");
    assert_eq!(
        remaining[0].config["metadata"]["firebrand_parent"], "live0other0parent",
        "a live parent's runner is left alone"
    );
    assert_eq!(
        after_restart.reap_orphans().await.unwrap(),
        Vec::<String>::new()
    );
    pool.shutdown().await;
    assert_eq!(fly.invalid_requests(), Vec::<String>::new());
}

#[tokio::test]
async fn tokens_go_with_their_scheme() {
    for (token, scheme) in [
        ("fm2_macaroon", "FlyV1"),
        ("FlyV1 fm2_macaroon", "FlyV1"),
        ("oauth", "Bearer"),
    ] {
        let fly = FakeFly::builder()
            .token(token)
            .latency(Latency::NONE)
            .start()
            .await
            .unwrap();
        let backend = backend(&fly).token(token).build().unwrap();
        backend.reap_orphans().await.unwrap();
        assert_eq!(fly.authorization_schemes(), vec![scheme.to_owned()]);
    }
}

#[tokio::test]
async fn api_errors_carry_fly_s_status_and_request_id() {
    let fly = fake().await;
    let wrong_app = backend(&fly).app("no-such-app").build().unwrap();
    match wrong_app.reap_orphans().await {
        Err(FlyError::Api(api)) => {
            assert_eq!(api.status, 404);
            assert_eq!(api.error, "app not found");
            assert!(api.request_id.is_some_and(|id| id.starts_with("01")));
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    let wrong_token = backend(&fly).token("fm2_wrong").build().unwrap();
    let error = wrong_token.reap_orphans().await.unwrap_err();
    // Refused, resolved again to the same token, and not sent again: the error says where the
    // token came from and what to do.
    match &error {
        FlyError::Unauthorized { origin, last } => {
            assert_eq!(origin, "from .token()");
            assert_eq!(last.status, 401);
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    let text = error.to_string();
    assert!(
        text.contains("from .token()") && text.contains("fly tokens create deploy"),
        "{text}"
    );
    assert!(error.is_permanent());
    assert_eq!(
        fly.counts().unauthorized,
        1,
        "the token read again is the refused one: no repeat"
    );
}

/// A temporary `$HOME` with flyctl's `config.yml` holding `token`.
struct FlyctlHome(std::path::PathBuf);

impl FlyctlHome {
    fn new(token: &str) -> Self {
        let home = std::env::temp_dir().join(format!("firebrand-home-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(home.join(".fly")).unwrap();
        std::fs::write(
            home.join(".fly/config.yml"),
            format!("access_token: {token}\nlast_login: 2026-12-01T00:00:00Z\n"),
        )
        .unwrap();
        Self(home)
    }
}

impl Drop for FlyctlHome {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A backend whose settings come from `vars` alone, as from a parent's environment.
fn backend_from(fly: &FakeFly, vars: Vec<(&'static str, String)>) -> FlyBackendBuilder {
    let url = fly.url();
    FlyBackendBuilder::from_vars(move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    })
    .api_base(url)
    .app(fly.app())
    .image(IMAGE)
    .region("ord")
    .private_ip("::1")
    .machine_id(PARENT)
}

#[tokio::test]
async fn the_token_is_found_where_flyctl_finds_it_and_its_source_is_logged() {
    let (logs, _guard) = common::CapturedLogs::install();
    let fly = fake().await;
    let good = fly.token();
    let home = FlyctlHome::new(&good);
    let home_var = ("HOME", home.0.display().to_string());

    // flyctl's config file, when the environment has no token.
    let from_file = backend_from(&fly, vec![home_var.clone()]).build().unwrap();
    from_file.reap_orphans().await.unwrap();
    let line = logs.line(|l| l.contains("Fly API token resolved")).await;
    assert!(
        line.contains(&format!(
            "from {}",
            home.0.join(".fly/config.yml").display()
        )),
        "{line}"
    );

    // FLY_API_TOKEN over the file, FLY_ACCESS_TOKEN over both.
    let stale = FlyctlHome::new("fm2_stale");
    let vars = |extra: Vec<(&'static str, String)>| {
        let mut vars = vec![("HOME", stale.0.display().to_string())];
        vars.extend(extra);
        vars
    };
    backend_from(&fly, vars(vec![("FLY_API_TOKEN", good.clone())]))
        .build()
        .unwrap()
        .reap_orphans()
        .await
        .unwrap();
    backend_from(
        &fly,
        vars(vec![
            ("FLY_ACCESS_TOKEN", good.clone()),
            ("FLY_API_TOKEN", "fm2_stale".into()),
        ]),
    )
    .build()
    .unwrap()
    .reap_orphans()
    .await
    .unwrap();
    logs.line(|l| l.contains("Fly API token resolved") && l.contains("from FLY_ACCESS_TOKEN"))
        .await;
    assert_eq!(fly.counts().unauthorized, 0);
    assert!(!logs.text().contains(&good), "a token in the log");

    // None anywhere: a build error that says where tokens are looked for.
    let error = backend_from(&fly, vec![]).build().unwrap_err().to_string();
    assert!(
        error.contains("FLY_API_TOKEN") && error.contains("fly auth login"),
        "{error}"
    );
}

/// A token source that hands out `fm2_rotated-1`, `fm2_rotated-2`, ...: a new one per fetch.
#[derive(Debug, Default, Clone)]
struct Rotating {
    fetches: Arc<std::sync::atomic::AtomicUsize>,
}

impl firebrand::backend::fly::TokenSource for Rotating {
    fn name(&self) -> String {
        "the rotating test vault".into()
    }

    fn fetch(
        &self,
    ) -> futures_util::future::BoxFuture<'_, Result<String, Box<dyn std::error::Error + Send + Sync>>>
    {
        let n = self
            .fetches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        Box::pin(async move { Ok(format!("fm2_rotated-{n}")) })
    }
}

#[tokio::test]
async fn a_rotated_token_is_resolved_once_for_twenty_concurrent_boots() {
    const BOOTS: usize = 20;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let fly = FakeFly::builder()
        .token("fm2_rotated-1")
        .image(IMAGE, RUNNER)
        .latency(Latency::NONE)
        .rate_limits(false)
        .start()
        .await
        .unwrap();
    let source = Rotating::default();
    let backend = backend_from(&fly, vec![])
        .token_source(source.clone())
        .create_pacing(Duration::from_millis(1), BOOTS as u32)
        .build()
        .unwrap();
    let pool = pool(backend)
        .max(BOOTS)
        .max_concurrency(1)
        .build()
        .await
        .unwrap();
    assert_eq!(source.fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The token is rotated: the old one is refused from now on.
    fly.set_token("fm2_rotated-2");
    let calls = (0..BOOTS).map(|_| pool.call(&SLEEP, 1500));
    for result in futures_util::future::join_all(calls).await {
        result.unwrap();
    }
    assert_eq!(fly.created(), BOOTS, "every call had a runner of its own");
    assert_eq!(
        source.fetches.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one refresh for every boot that met the 401"
    );
    let refused = fly.counts().unauthorized;
    println!("requests refused with the old token: {refused}");
    assert!(refused >= 2, "the boots met the 401 together: {refused}");
    shut_down_clean(pool, &fly).await;
    let logs = String::from_utf8_lossy(&captured.0.lock()).into_owned();
    assert!(
        logs.contains("from the rotating test vault"),
        "the source is logged"
    );
    assert!(!logs.contains("fm2_rotated"), "a token in a TRACE log line");
}

/// Captures every log line, at every level, of everything on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_token_never_reaches_a_log_line_an_error_or_debug_output() {
    const SECRET: &str = "fm2_VERY-SECRET-MACAROON";
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let fly = FakeFly::builder()
        .token(SECRET)
        .image(IMAGE, RUNNER)
        .latency(Latency::NONE)
        .start()
        .await
        .unwrap();
    let mut shown = Vec::new();
    shown.push(format!("{:?}", backend(&fly).token(SECRET)));
    let fly_backend = backend(&fly).token(SECRET).build().unwrap();
    shown.push(format!("{fly_backend:?}"));
    fly.rate_limit_burst(1, None);
    fly.crash_next_boot(3);
    let pool = pool(fly_backend).boot_attempts(1).build().await.unwrap();
    let error = pool.call(&PID, ()).await.unwrap_err();
    shown.push(format!("{error} {error:?}"));
    pool.call(&SLEEP, 10).await.unwrap();
    pool.shutdown().await;
    let refused = backend(&fly)
        .token("fm2_VERY-SECRET-BUT-WRONG")
        .build()
        .unwrap();
    let error = refused.reap_orphans().await.unwrap_err();
    shown.push(format!("{error} {error:?}"));
    let logs = String::from_utf8_lossy(&captured.0.lock()).into_owned();
    assert!(
        logs.contains("Fly API request failed"),
        "the failures were logged"
    );
    for text in shown.iter().chain([&logs]) {
        assert!(!text.contains("VERY-SECRET"), "token leaked: {text}");
    }
}

#[tokio::test]
async fn every_work_shape_runs_on_fly_machines_too() {
    use futures_util::StreamExt as _;
    let fly = fake().await;
    let pool = pool(backend(&fly).build().unwrap())
        .max(2)
        .build()
        .await
        .unwrap();
    let pids = pool.map(&PID, vec![(); 20]).outputs().await.unwrap();
    assert_eq!(pids.len(), 20);
    let args = firebrand_runner::BlobArgs {
        count: 50,
        bytes: 10,
        ..Default::default()
    };
    let items: Vec<_> = pool.stream(&firebrand_runner::BLOBS, args).collect().await;
    assert_eq!(items.len(), 50);
    assert!(items.iter().all(Result::is_ok));
    pool.call(&SLEEP, 50).spawn().await.unwrap();
    let stash = pool
        .resource(&firebrand_runner::STASH, vec![1, 2, 3])
        .await
        .unwrap();
    let (len, _) = stash.call(&firebrand_runner::STASH_LEN, ()).await.unwrap();
    assert_eq!(len, 3);
    drop(stash);
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn an_unreachable_api_fails_boots_clearly_but_not_the_pool_start() {
    common::init_tracing();
    // Nothing listens on port 9 of loopback: every request is refused at once.
    let backend = FlyBackendBuilder::from_vars(|_| None)
        .api_base("http://127.0.0.1:9")
        .token("fm2_x")
        .app("app")
        .image(IMAGE)
        .private_ip("::1")
        .retries(2, Duration::from_millis(10), Duration::from_millis(10))
        .build()
        .unwrap();
    let pool = within(10 * SECOND, pool(backend).boot_attempts(1).build())
        .await
        .unwrap();
    let message = boot_failure(&pool.call(&PID, ()).await.unwrap_err());
    assert!(
        message.contains("cannot reach the Fly Machines API"),
        "{message}"
    );
    assert!(message.contains("gave up after 2 attempts"), "{message}");
    pool.shutdown().await;
}

#[tokio::test]
async fn a_lost_runner_s_machine_ends_destroyed_and_destroys_are_retried_through_429s() {
    let fly = fake().await;
    let pool = pool(backend(&fly).build().unwrap())
        .max(2)
        .max_concurrency(1)
        .build()
        .await
        .unwrap();
    common::concurrent_sleeps(&pool, 2, 200).await;
    assert_eq!(fly.created(), 2);
    // Kill one runner's process: its machine stops, and the pool gives it up.
    let pid = pool.call(&PID, ()).await.unwrap();
    let mut events = pool.events();
    // SAFETY: kill(2) on a runner process the fake started for this test.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    common::next_matching(&mut events, |e| {
        matches!(e, firebrand::PoolEvent::RunnerLost { .. })
    })
    .await;
    assert!(fly.wait_for(10 * SECOND, |c| c.destroyed >= 1).await);
    // The remaining machine's destroy meets 429s at shutdown, and is retried.
    fly.rate_limit_burst(3, None);
    shut_down_clean(pool, &fly).await;
    assert!(fly.counts().rate_limited >= 3);
    assert_eq!(fly.counts().destroyed, 2);
}

/// Create requests the fake answered other than with its own rate limit: each backend paces
/// itself, but several built in a row can still meet the fake's limit.
fn answered_creates(fly: &FakeFly) -> usize {
    let counts = fly.counts();
    counts.create_requests - counts.rate_limited
}

#[tokio::test]
async fn refusals_that_cannot_change_fail_the_call_after_one_create() {
    let fly = fake().await;
    let refusals: [(u16, &str, Option<&str>); 3] = [
        (400, "invalid machine config: bad init.cmd", Some("unknown")),
        (
            403,
            "unauthorized: the token lacks the machines:write scope",
            None,
        ),
        (
            422,
            "invalid guest: memory_mb must be a multiple of 256",
            Some("unknown"),
        ),
    ];
    for (status, message, fly_status) in refusals {
        fly.refuse_next_create(status, message, fly_status);
        let before = answered_creates(&fly);
        let pool = pool(backend(&fly).build().unwrap())
            .boot_attempts(3)
            .boot_retry_after(Duration::from_millis(50))
            .build()
            .await
            .unwrap();
        let error = within(10 * SECOND, pool.call(&PID, ())).await.unwrap_err();
        assert!(boot_failure(&error).contains(message), "{error}");
        assert_eq!(answered_creates(&fly) - before, 1, "{status} was retried");
        pool.shutdown().await;
    }
    // A token Fly does not accept: 401.
    let before = answered_creates(&fly);
    let wrong_token = backend(&fly).token("fm2_not-the-token").build().unwrap();
    let pool = self::pool(wrong_token)
        .boot_attempts(3)
        .build()
        .await
        .unwrap();
    let error = within(10 * SECOND, pool.call(&PID, ())).await.unwrap_err();
    assert!(boot_failure(&error).contains("401"), "{error}");
    // No repeat (the token read again is the same), and no boot retry.
    assert_eq!(answered_creates(&fly) - before, 1);
    pool.shutdown().await;
    // A GPU refusal through a pool, too.
    fly.refuse_gpus();
    let before = answered_creates(&fly);
    let gpu = backend(&fly)
        .cpu_kind(firebrand::backend::fly::CpuKind::Performance)
        .cpus(8)
        .memory_mb(32768)
        .gpu_kind("a100-pcie-40gb")
        .build()
        .unwrap();
    let pool = self::pool(gpu).boot_attempts(3).build().await.unwrap();
    let error = within(10 * SECOND, pool.call(&PID, ())).await.unwrap_err();
    assert!(boot_failure(&error).contains("GPU"), "{error}");
    assert_eq!(answered_creates(&fly) - before, 1);
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn a_full_region_is_skipped_by_later_boots() {
    let fly = fake().await;
    fly.no_capacity_in("ord");
    let backend = backend(&fly).fallback_regions(["ams"]).build().unwrap();
    let pool = pool(backend.clone())
        .max(3)
        .max_concurrency(1)
        .build()
        .await
        .unwrap();
    // Each call outlasts the paced creates, so that no boot is cancelled with its create still
    // in flight (which would land after the count below).
    let calls: Vec<_> = (0..3).map(|_| pool.call(&SLEEP, 5_000)).collect();
    for outcome in futures_util::future::join_all(calls).await {
        outcome.unwrap();
    }
    let three = answered_creates(&fly);
    // Each boot at most once in ord (those started before the first refusal), once in ams.
    assert!(three <= 6, "{three} creates for 3 machines");
    pool.shutdown().await;
    // A boot after the refusal goes straight to ams.
    let pool = self::pool(backend).build().await.unwrap();
    pool.call(&PID, ()).await.unwrap();
    assert_eq!(
        answered_creates(&fly) - three,
        1,
        "the later boot tried ord again"
    );
    assert!(fly.machines().iter().all(|m| m.region == "ams"));
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn a_boot_no_call_needs_any_more_is_cancelled_and_its_machine_destroyed() {
    use futures_util::StreamExt as _;
    let fly = fake().await;
    let pool = pool(backend(&fly).build().unwrap())
        .min(1)
        .max(2)
        .max_concurrency(1)
        // Far beyond the test: only the cancellation can end the stalled boot in time.
        .boot_timeout(120 * SECOND)
        .build()
        .await
        .unwrap();
    let first = pool.call(&PID, ()).await.unwrap();
    let mut events = pool.events();
    fly.stall_next_boot();
    let busy = tokio::spawn(pool.call(&SLEEP, 1_000));
    // The next call waits, and a second machine boots for it, which never dials back.
    let waiting = tokio::spawn(pool.call(&PID, ()));
    loop {
        match within(10 * SECOND, events.next()).await {
            Some(firebrand::PoolEvent::RunnerBooting { .. }) => break,
            Some(_) => {}
            None => panic!("events ended"),
        }
    }
    // The busy call ends, the waiting one runs on the first runner: the boot is not needed.
    busy.await.unwrap().unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), first);
    assert!(
        fly.wait_for(20 * SECOND, |c| c.destroyed >= 1).await,
        "the unneeded machine was not destroyed"
    );
    assert_eq!(pool.stats().booting, 0);
    shut_down_clean(pool, &fly).await;
}

#[tokio::test]
async fn every_machines_api_request_is_traced_and_counted() {
    use metrics_util::debugging::DebuggingRecorder;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this test binary");
    let (logs, _guard) = common::CapturedLogs::install_at(tracing::Level::DEBUG);
    let fly = fake().await;
    // The start-up sweep's first request is refused once: its retry is attempt 2.
    fly.rate_limit_burst(1, None);
    let pool = pool(backend(&fly).build().unwrap()).build().await.unwrap();
    pool.call(&PID, ()).await.unwrap();
    let create = logs
        .line(|l| l.contains(r#"fly_request{op="create""#) && l.contains("request done"))
        .await;
    for field in [
        r#"path="/v1/apps/{app_name}/machines""#,
        "attempt=1",
        r#"status="200""#,
        "duration_ms=",
        "fly_request_id=",
    ] {
        assert!(create.contains(field), "{field} in {create}");
    }
    let retried = logs
        .line(|l| {
            l.contains(r#"fly_request{op="list""#)
                && l.contains("attempt=2")
                && l.contains("request done")
        })
        .await;
    assert!(retried.contains(r#"status="200""#), "{retried}");
    logs.line(|l| l.contains("wait started")).await;
    shut_down_clean(pool, &fly).await;
    // The path is a template: no machine id in any request's span.
    let id = &fly.machines()[0].id;
    let text = logs.text();
    let with_id = text.lines().find(|l| {
        l.contains("fly_request{")
            && l.split("fly_request{").nth(1).is_some_and(|span| {
                span.split('}')
                    .next()
                    .is_some_and(|fields| fields.contains(id.as_str()))
            })
    });
    assert_eq!(with_id, None, "a machine id in a request span's fields");

    let snapshot = snapshotter.snapshot().into_vec();
    let count = |op: &str, status: &str| {
        let labels = [("op", op), ("status", status)];
        common::counter(&snapshot, "firebrand_fly_requests_total", &labels)
    };
    assert!(count("create", "200") >= 1);
    assert!(count("list", "429") >= 1);
    // A machine that auto-destroyed as its runner exited answers its DELETE 404.
    assert!(count("destroy", "200") + count("destroy", "404") >= 1);
    assert!(snapshot.iter().any(|(key, ..)| {
        let key = key.key();
        key.name() == "firebrand_fly_request_seconds"
            && key.labels().any(|l| l.key() == "op" && l.value() == "wait")
    }));
}

/// Issue 25: a deadline that passes while the only runner boots names that runner, and the
/// boot nobody waits for any more is cancelled: its machine never serves.
#[tokio::test]
async fn a_deadline_passes_while_the_runner_boots_and_names_it() {
    let fly = fake().await;
    fly.slow_creates(3 * SECOND);
    let pool = pool(backend(&fly).build().unwrap()).build().await.unwrap();
    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    let result = pool.call(&PID, ()).deadline(deadline).await;
    match &result {
        Err(
            error @ firebrand::CallError::DeadlinePassed {
                phase: firebrand::DeadlinePhase::Booting { runner },
                ..
            },
        ) => {
            let shown = error.to_string();
            assert!(
                shown.contains(&format!("passed while runner {runner} booted")),
                "{shown}"
            );
        }
        other => panic!("expected a deadline while booting, got {other:?}"),
    }
    assert!(started.elapsed() < 3 * SECOND, "{:?}", started.elapsed());
    // The create answers at 3 s; its machine is destroyed then, with no runner ever up on it.
    assert!(fly.wait_for(10 * SECOND, |c| c.created == 1).await);
    assert!(fly.all_destroyed(10 * SECOND).await, "{:?}", fly.machines());
    assert_eq!(pool.stats().ready, 0);
    shut_down_clean(pool, &fly).await;
}
