//! Warm Fly machines: the time from `pool.call` to the first result when a boot claims a
//! parked machine (suspended or stopped), against a cold create, for 1 and for 8 runners at
//! once, all in the same run, against the fake Machines API with its default latency model
//! (Fly's published figures: create 2 s, start 1 s, resume 300 ms).
//!
//! ```sh
//! cargo bench --bench warm && python3 benches/summary.py
//! ```

mod support;

use std::time::Duration;

use firebrand::backend::fly::{FlyBackend, FlyBackendBuilder, Park};
use firebrand::{Pool, PoolEvent};
use firebrand_fly_fake::{FakeFly, Latency};
use firebrand_runner::SLEEP;
use support::RUNNER;

const IMAGE: &str = "registry.fly.io/bench-app:deployment-01";

/// How long runners idle before they park (or, cold, are destroyed): short, to keep the run
/// short; it is not part of any measurement.
const IDLE: Duration = Duration::from_millis(500);

/// Samples per case: fewer where each costs seconds of creates.
fn samples(runners: usize, mode: Option<Park>) -> usize {
    match (mode, runners) {
        (None, 1) => 5,
        (None, _) => 3,
        (Some(_), _) => 9,
    }
}

fn backend(fly: &FakeFly, mode: Option<Park>) -> FlyBackend {
    let builder = FlyBackendBuilder::from_vars(|_| None)
        .api_base(fly.url())
        .token(fly.token())
        .app(fly.app())
        .image(IMAGE)
        .region("ord")
        .private_ip("::1")
        .machine_id("148e21ea0d2089");
    match mode {
        Some(mode) => builder.park(mode),
        None => builder,
    }
    .build()
    .unwrap()
}

/// `runners` calls at once on a pool with no runner up, each holding its runner for `hold`
/// so that every call needs a runner of its own: the time until every call had its runner
/// (could return its first result), and until the first did. From each call's queue wait.
async fn burst(pool: &Pool, runners: usize, hold: Duration) -> (Duration, Duration) {
    use futures_util::StreamExt as _;
    let mut events = pool.events();
    let hold_ms = u64::try_from(hold.as_millis()).unwrap();
    let calls = (0..runners).map(|_| async {
        pool.call(&SLEEP, hold_ms).timeout(None).await.unwrap();
    });
    let calls = futures_util::future::join_all(calls);
    let waits = async {
        let mut waits = Vec::new();
        while waits.len() < runners {
            if let Some(PoolEvent::CallStarted { queued_for, .. }) = events.next().await {
                waits.push(queued_for);
            }
        }
        waits
    };
    let (_, waits) = tokio::join!(calls, waits);
    let all = waits.iter().max().copied().unwrap_or_default();
    let first = waits.iter().min().copied().unwrap_or_default();
    (all, first)
}

/// Waits until no runner is up and `parked` machines are parked.
async fn settled(pool: &Pool, parked: usize) {
    let mut stats = pool.watch_runners();
    let settled =
        stats.wait_for(|s| s.ready == 0 && s.booting == 0 && s.draining == 0 && s.parked == parked);
    tokio::time::timeout(Duration::from_secs(60), settled)
        .await
        .expect("the pool settles")
        .unwrap();
}

/// Medians over the samples of one case: every result, and the first result.
async fn case(fly: &FakeFly, runners: usize, mode: Option<Park>) -> serde_json::Value {
    let pool = Pool::builder()
        .registry(&firebrand_runner::registry())
        .backend(backend(fly, mode))
        .max(runners)
        .max_concurrency(1)
        .idle_shutdown_after(IDLE)
        .boot_timeout(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let parked = if mode.is_some() { runners } else { 0 };
    // Long enough for every create of a burst: they are paced at 1 a second, bursts of 3.
    let creates = Duration::from_secs(2 + runners as u64);
    if mode.is_some() {
        // The first burst creates the machines that every sample then claims.
        burst(&pool, runners, creates).await;
        settled(&pool, parked).await;
    }
    let hold = if mode.is_some() {
        Duration::from_secs(2)
    } else {
        creates
    };
    let mut all = Vec::new();
    let mut first = Vec::new();
    for _ in 0..samples(runners, mode) {
        let (every, one) = burst(&pool, runners, hold).await;
        all.push(every);
        first.push(one);
        settled(&pool, parked).await;
        if mode.is_none() {
            // Creates are paced at 1 a second: let the bucket refill between samples.
            assert!(fly.all_destroyed(Duration::from_secs(30)).await);
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }
    pool.shutdown().await;
    let median = |mut v: Vec<Duration>| {
        v.sort_unstable();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    serde_json::json!({ "all_ms": median(all), "first_ms": median(first) })
}

fn main() {
    // `cargo bench` passes criterion-style flags; this harness takes none.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let results = rt.block_on(async {
        let fly = FakeFly::builder()
            .image(IMAGE, RUNNER)
            .latency(Latency::FLY)
            .start()
            .await
            .unwrap();
        let mut results = serde_json::Map::new();
        for (name, mode) in [
            ("create", None),
            ("suspend", Some(Park::Suspend)),
            ("stop", Some(Park::Stop)),
        ] {
            for runners in [1, 8] {
                let result = case(&fly, runners, mode).await;
                println!("{name}, {runners} at once: {result}");
                results.insert(format!("{name}_{runners}"), result);
            }
        }
        assert!(fly.all_destroyed(Duration::from_secs(30)).await);
        assert_eq!(fly.invalid_requests(), Vec::<String>::new());
        let latency = Latency::FLY;
        results.insert(
            "latency_ms".into(),
            serde_json::json!({
                "create": latency.create.as_secs_f64() * 1e3,
                "start": latency.start.as_secs_f64() * 1e3,
                "resume": latency.resume.as_secs_f64() * 1e3,
            }),
        );
        serde_json::Value::Object(results)
    });
    support::write_results("warm", &results);
}
