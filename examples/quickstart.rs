//! Quickstart: a pool of local runner processes grows to meet a batch of jobs, runs them, and
//! shrinks again once idle.
//!
//! ```sh
//! cargo run --release --example quickstart
//! ```
//!
//! This binary is both the parent and its runners (embedded mode): the pool starts copies of it
//! with a boot token, and `run_if_child` turns those copies into runners. The job computes
//! without awaiting, so it is registered with `register_blocking`: it runs on the runner's
//! blocking pool, and cheap calls and the runner's connection never wait behind it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use firebrand::{Job, Pool, Registry};
use serde::{Deserialize, Serialize};

/// Hash a seed many times: a stand-in for real CPU-bound work.
const CRUNCH: Job<Crunch, Crunched> = Job::new("quickstart.crunch");

#[derive(Serialize, Deserialize)]
struct Crunch {
    item: u32,
    rounds: u32,
}

#[derive(Serialize, Deserialize)]
struct Crunched {
    item: u32,
    pid: u32,
    digest: String,
}

fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register_blocking(&CRUNCH, |job: Crunch| {
            let mut d = ring::digest::digest(&ring::digest::SHA256, &job.item.to_le_bytes());
            for _ in 1..job.rounds {
                d = ring::digest::digest(&ring::digest::SHA256, d.as_ref());
            }
            let digest = d.as_ref()[..6]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>();
            Ok::<_, std::convert::Infallible>(Crunched {
                item: job.item,
                pid: std::process::id(),
                digest,
            })
        })
        .expect("unique job names");
    registry
}

fn main() -> anyhow::Result<()> {
    let registry = registry();
    // A runner serves here and exits; the parent carries on.
    firebrand::run_if_child_with(&registry);

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    tokio::runtime::Runtime::new()?.block_on(parent(registry))
}

async fn parent(registry: Registry) -> anyhow::Result<()> {
    let pool = Pool::builder()
        .registry(&registry)
        .min(0)
        .max(4)
        .max_concurrency(2)
        .idle_shutdown_after(Duration::from_secs(2))
        .build()
        .await?;
    println!("pool started: {:?}", pool.stats());

    let started = Instant::now();
    let calls = (0..24).map(|item| {
        let pool = pool.clone();
        async move {
            pool.call(
                &CRUNCH,
                Crunch {
                    item,
                    rounds: 200_000,
                },
            )
            .await
        }
    });
    let results = futures::future::try_join_all(calls).await?;
    println!(
        "ran {} jobs in {:.2?}; the pool grew to {:?}",
        results.len(),
        started.elapsed(),
        pool.stats()
    );
    let mut by_runner: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for r in &results {
        by_runner.entry(r.pid).or_default().push(r.item);
    }
    for (pid, items) in &by_runner {
        println!("  runner pid {pid:>7}: items {items:?}");
    }
    println!("  item 0 digest: {}", results[0].digest);

    println!("waiting for idle runners to shut down (idle_shutdown_after = 2s)...");
    let idle_started = Instant::now();
    let mut runners = pool.watch_runners();
    runners
        .wait_for(|s| s.ready == 0 && s.draining == 0 && s.booting == 0)
        .await?;
    println!(
        "pool shrank to {:?} after {:.1?}",
        pool.stats(),
        idle_started.elapsed()
    );
    pool.shutdown().await;
    Ok(())
}
