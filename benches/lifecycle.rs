//! Lifecycle benchmarks: cold start against the process-start floor, many runners at once,
//! 10,000 queued calls, and the parent's memory per idle runner.
//!
//! ```sh
//! cargo bench --bench lifecycle && python3 benches/summary.py
//! ```

mod support;

use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use firebrand::{LocalBackend, Pool};
use firebrand_runner::{ByteBuf, ECHO_BYTES, SLEEP};
use support::{rss_bytes, RssSampler, RUNNER};

/// How the local backend starts each runner.
#[derive(Clone, Copy)]
enum Start {
    /// One `exec` per runner: the default.
    Exec,
    /// Forked from a template process (`LocalBackendBuilder::fork_server`).
    Fork,
}

impl Start {
    fn suffix(self) -> &'static str {
        match self {
            Start::Exec => "",
            Start::Fork => "_forked",
        }
    }
}

fn cold_pool(min: usize, start: Start) -> firebrand::PoolBuilder {
    let backend = LocalBackend::builder().command(RUNNER);
    let backend = match start {
        Start::Exec => backend,
        Start::Fork => backend.fork_server(),
    };
    Pool::builder()
        .registry(&firebrand_runner::registry())
        .backend(backend.build())
        .min(min)
        .max(min.max(1))
}

fn cold_start(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("cold_start");
    group
        .sample_size(20)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    // The floor: start the same binary and have it exit (without a token it prints and exits).
    group.bench_function("process_floor", |b| {
        b.iter(|| {
            let status = std::process::Command::new(RUNNER)
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert_eq!(status.code(), Some(2));
        })
    });
    for start in [Start::Exec, Start::Fork] {
        let suffix = start.suffix();
        group.bench_function(format!("first_result{suffix}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let started = Instant::now();
                        let pool = cold_pool(0, start).build().await.unwrap();
                        pool.call(&ECHO_BYTES, ByteBuf::from(vec![1; 64]))
                            .await
                            .unwrap();
                        total += started.elapsed();
                        pool.shutdown().await;
                    }
                    total
                })
            })
        });
        for runners in [1, 8] {
            group.bench_function(format!("{runners}_ready{suffix}"), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let started = Instant::now();
                            let pool = cold_pool(runners, start).build().await.unwrap();
                            total += started.elapsed();
                            pool.shutdown().await;
                        }
                        total
                    })
                })
            });
        }
    }
    group.finish();
}

const QUEUED_CALLS: usize = 10_000;

fn queued_pool() -> firebrand::PoolBuilder {
    Pool::builder()
        .registry(&firebrand_runner::registry())
        .backend(LocalBackend::builder().command(RUNNER).build())
        .min(4)
        .max(4)
        .max_concurrency(8)
        .queue_timeout(Duration::from_secs(300))
}

async fn queue_all(pool: &Pool) {
    let calls = (0..QUEUED_CALLS).map(|_| pool.call(&ECHO_BYTES, ByteBuf::from(vec![1; 64])));
    for result in futures_util::future::join_all(calls).await {
        assert_eq!(result.unwrap().len(), 64);
    }
}

fn queueing(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("queueing");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let pool = rt.block_on(queued_pool().build()).unwrap();
    group.bench_function("10k_calls_4x8", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    queue_all(&pool).await;
                }
                started.elapsed()
            })
        })
    });
    group.finish();
    rt.block_on(pool.shutdown());
}

/// Peak RSS growth of the parent while 10,000 calls queue on a warm pool, and RSS growth per
/// idle runner. Single measurements, not statistics: memory does not jitter like time.
fn memory(rt: &tokio::runtime::Runtime) {
    let queued = rt.block_on(async {
        let pool = queued_pool().build().await.unwrap();
        // The first round from a fresh pool is the honest peak; the second shows whether
        // memory is reused.
        let mut rounds = Vec::new();
        for _ in 0..2 {
            let before = rss_bytes();
            let sampler = RssSampler::start();
            let started = Instant::now();
            queue_all(&pool).await;
            let elapsed = started.elapsed();
            let peak = sampler.peak();
            rounds.push((elapsed, before, peak));
        }
        pool.shutdown().await;
        let mib = |b: u64| b as f64 / 1048576.0;
        let (first, second) = (rounds[0], rounds[1]);
        serde_json::json!({
            "calls": QUEUED_CALLS,
            "seconds": first.0.as_secs_f64(),
            "rss_before_mib": mib(first.1),
            "peak_growth_mib": mib(first.2.saturating_sub(first.1)),
            "second_round_peak_growth_mib": mib(second.2.saturating_sub(second.1)),
        })
    });
    println!("queueing memory: {queued}");

    const IDLE: usize = 32;
    let idle = rt.block_on(async {
        let pool = Pool::builder()
            .registry(&firebrand_runner::registry())
            .backend(LocalBackend::builder().command(RUNNER).build())
            .max(IDLE)
            .max_concurrency(1)
            .idle_shutdown_after(Duration::from_secs(600))
            .build()
            .await
            .unwrap();
        // One runner and one call first, so that the fixed costs are paid before measuring.
        pool.call(&SLEEP, 1).await.unwrap();
        let before = rss_bytes();
        let calls = (0..IDLE).map(|_| pool.call(&SLEEP, 300));
        for r in futures_util::future::join_all(calls).await {
            r.unwrap();
        }
        let stats = pool.stats();
        assert_eq!(stats.ready, IDLE, "{stats:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_bytes();
        pool.shutdown().await;
        let added = (IDLE - 1) as f64;
        serde_json::json!({
            "runners": IDLE,
            "growth_mib": after.saturating_sub(before) as f64 / 1048576.0,
            "per_runner_kib": after.saturating_sub(before) as f64 / 1024.0 / added,
        })
    });
    println!("idle runner memory: {idle}");
    support::write_results(
        "memory",
        &serde_json::json!({ "queueing": queued, "idle": idle }),
    );
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = Criterion::default().configure_from_args();
    cold_start(&mut c, &rt);
    queueing(&mut c, &rt);
    c.final_summary();
    // Not under `cargo bench --no-run` or a `--list`/`--test` pass.
    if !std::env::args().any(|a| a == "--list" || a == "--test") {
        memory(&rt);
    }
}
