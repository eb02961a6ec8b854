//! `map` over 10,000 inputs with a progress bar: the pool grows to meet the load, results come
//! back in input order, and every one is checked.
//!
//! ```sh
//! cargo run --release --example map_progress
//! ```

use std::time::{Duration, Instant};

use firebrand::{job, Pool};
use indicatif::{ProgressBar, ProgressStyle};

/// Collatz steps to reach 1: a small, checkable piece of CPU work.
#[job(idempotent)]
async fn collatz(n: u64) -> u32 {
    collatz_steps(n)
}

fn collatz_steps(mut n: u64) -> u32 {
    let mut steps = 0;
    while n > 1 {
        n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
        steps += 1;
    }
    steps
}

fn main() -> anyhow::Result<()> {
    firebrand::run_if_child();
    tokio::runtime::Runtime::new()?.block_on(async {
        const INPUTS: u64 = 10_000;
        let pool = Pool::builder()
            .max(4)
            .max_concurrency(32)
            .idle_shutdown_after(Duration::from_secs(2))
            .build()
            .await?;
        let bar = ProgressBar::new(INPUTS).with_style(ProgressStyle::with_template(
            "{bar:40} {pos}/{len} calls, {per_sec}, {elapsed}",
        )?);
        let hook_bar = bar.clone();
        let started = Instant::now();
        let steps = pool
            .map(&collatz, 1..=INPUTS)
            .on_progress(move |p| hook_bar.set_position(p.done as u64))
            .outputs()
            .await?;
        bar.finish();
        for (n, steps) in (1..=INPUTS).zip(&steps) {
            anyhow::ensure!(*steps == collatz_steps(n), "wrong result for {n}");
        }
        let (longest, most) = (1..=INPUTS).zip(&steps).max_by_key(|(_, s)| **s).unwrap();
        println!(
            "{} results in order and correct in {:.2?}; {longest} takes the most steps ({most}); \
             the pool grew to {} runners",
            steps.len(),
            started.elapsed(),
            pool.stats().ready
        );
        pool.shutdown().await;
        Ok(())
    })
}
