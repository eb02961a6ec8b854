//! The boot policy under a steady stream (issue 22): a web server's pattern, one ready runner
//! with room for a second (`max(2)`, `max_concurrency(2)`) and sub-millisecond calls from four
//! clients, against the same stream on a pool that cannot grow (`max(1)`), same run. It counts
//! the boots the stream starts and sets the throughput against the one-runner pool's.
//!
//! ```sh
//! cargo bench --bench boot_policy
//! ```

mod support;

use std::time::{Duration, Instant};

use firebrand::{LocalBackend, Pool, PoolEvent};
use firebrand_runner::ECHO;
use futures_util::StreamExt as _;
use serde_json::json;

const CLIENTS: usize = 4;
const SPAN: Duration = Duration::from_secs(5);

async fn pool(max: usize) -> Pool {
    let pool = Pool::builder()
        .registry(&firebrand_runner::registry())
        .backend(LocalBackend::builder().command(support::RUNNER).build())
        .max(max)
        .max_concurrency(2)
        .build()
        .await
        .expect("a pool");
    pool.call(&ECHO, vec![1]).await.unwrap();
    pool
}

/// Calls a second from [`CLIENTS`] callers over [`SPAN`], and the boots started meanwhile.
async fn stream(pool: &Pool) -> (f64, usize) {
    let mut events = pool.events();
    let boots = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = tokio::spawn({
        let boots = std::sync::Arc::clone(&boots);
        async move {
            while let Some(event) = events.next().await {
                if matches!(event, PoolEvent::RunnerBooting { .. }) {
                    boots.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    });
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut calls = 0u64;
                while started.elapsed() < SPAN {
                    pool.call(&ECHO, vec![7; 32]).await.unwrap();
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let mut calls = 0;
    for client in clients {
        calls += client.await.unwrap();
    }
    let rate = calls as f64 / started.elapsed().as_secs_f64();
    pool.shutdown().await;
    counter.abort();
    (rate, boots.load(std::sync::atomic::Ordering::Relaxed))
}

fn main() {
    support::run_peer_if_asked();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rows = Vec::new();
        // Interleaved, twice: the one-runner pool, then the pool with room for a second.
        for round in 0..2 {
            let (fixed, _) = stream(&pool(1).await).await;
            let (growing, boots) = stream(&pool(2).await).await;
            println!(
                "round {round}: max(1) {fixed:>7.0} calls/s; max(2) {growing:>7.0} calls/s \
                 ({:.2}x), {boots} boots started in {SPAN:?}",
                growing / fixed
            );
            rows.push(json!({
                "max1_calls_per_s": fixed, "max2_calls_per_s": growing,
                "ratio": growing / fixed, "boots": boots,
            }));
        }
        support::write_results("boot_policy", &json!(rows));
    });
}
