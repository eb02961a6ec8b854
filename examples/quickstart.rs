//! Quickstart: a pool of local runner processes grows to meet a batch of jobs, runs them, and
//! shrinks again once idle.
//!
//! ```sh
//! cargo run --release --example quickstart
//! ```
//!
//! This binary is both the parent and its runners (embedded mode): the pool starts copies of it
//! with a boot token, and `run_if_child` turns those copies into runners. The job is a plain
//! `fn` that computes without awaiting, so it runs on the runner's blocking threads: cheap calls
//! and the runner's connection never wait behind it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use firebrand::{job, Pool};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Crunched {
    item: u32,
    pid: u32,
    digest: String,
}

/// Hashes a seed many times: a stand-in for real CPU-bound work.
#[job]
fn crunch(item: u32, rounds: u32) -> Crunched {
    let mut d = ring::digest::digest(&ring::digest::SHA256, &item.to_le_bytes());
    for _ in 1..rounds {
        d = ring::digest::digest(&ring::digest::SHA256, d.as_ref());
    }
    let digest = d.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect();
    Crunched {
        item,
        pid: std::process::id(),
        digest,
    }
}

fn main() -> anyhow::Result<()> {
    // A runner serves here and exits; the parent carries on.
    firebrand::run_if_child();

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tokio::runtime::Runtime::new()?.block_on(parent())
}

async fn parent() -> anyhow::Result<()> {
    let pool = Pool::builder()
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
        async move { pool.call(&crunch, (item, 200_000)).await }
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
