//! Across an emulated network (the user-space UDP relay of `tests/common/relay.rs`): windows at
//! high latency, large payloads on a lossy link with each congestion controller, and the same
//! payloads on loopback, every figure against its bound or baseline in the same run.
//!
//! ```sh
//! cargo bench --bench network
//! ```
//!
//! `FIREBRAND_BENCH_QUICK=1` runs each case once, with a 4 MiB payload: a smoke run.

#[path = "../tests/common/relay.rs"]
mod relay;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use firebrand::{CongestionControl, LocalBackend, Pool};
use firebrand_runner::{ByteBuf, ECHO, ECHO_BYTES};
use relay::{Link, Relay, Relayed};
use serde_json::json;

const CONTROLLERS: [CongestionControl; 3] = [
    CongestionControl::Cubic,
    CongestionControl::NewReno,
    CongestionControl::Bbr,
];

fn quick() -> bool {
    std::env::var_os("FIREBRAND_BENCH_QUICK").is_some()
}

async fn pool_across(
    relay: Option<&Arc<Relay>>,
    concurrency: u32,
    congestion: CongestionControl,
) -> Pool {
    let local = LocalBackend::builder().command(support::RUNNER).build();
    let builder = Pool::builder()
        .registry(&firebrand_runner::registry())
        .max(1)
        .max_concurrency(concurrency)
        .congestion_control(congestion)
        .max_payload_len(1 << 30)
        .timeout(None)
        .queue_timeout(Duration::from_secs(600));
    let builder = match relay {
        Some(relay) => builder.backend(Relayed::new(local, Arc::clone(relay))),
        None => builder.backend(local),
    };
    let pool = builder.build().await.expect("a pool");
    pool.call(&ECHO, vec![1]).await.unwrap();
    pool
}

/// The median warm call, over `n`.
async fn warm_call(pool: &Pool, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        pool.call(&ECHO, vec![1; 64]).await.unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    times[n / 2]
}

/// Calls a second with `in_flight` callers, over a window past the ramp-up.
async fn rate(pool: &Pool, in_flight: usize, window: Duration) -> f64 {
    let warm_up = Duration::from_millis(500);
    let started = Instant::now();
    let clients: Vec<_> = (0..in_flight)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut counted = 0u64;
                while started.elapsed() < warm_up + window {
                    pool.call(&ECHO, vec![7; 32]).await.unwrap();
                    let at = started.elapsed();
                    counted += u64::from(at >= warm_up && at < warm_up + window);
                }
                counted
            })
        })
        .collect();
    let mut calls = 0;
    for client in clients {
        calls += client.await.unwrap();
    }
    calls as f64 / window.as_secs_f64()
}

async fn windows() -> serde_json::Value {
    let mut rows = Vec::new();
    for rtt_ms in [50u64, 200] {
        for concurrency in [64u32, 256] {
            let relay = Arc::new(Relay::start(
                Link::rtt(Duration::from_millis(rtt_ms)),
                false,
            ));
            let pool = pool_across(Some(&relay), concurrency, CongestionControl::default()).await;
            let round_trip = warm_call(&pool, 20).await;
            let window = Duration::from_secs(if quick() { 2 } else { 5 });
            let rate = rate(&pool, concurrency as usize, window).await;
            let bound = f64::from(concurrency) / round_trip.as_secs_f64();
            println!(
                "window  rtt {rtt_ms:>3} ms  max_concurrency {concurrency:>3} in flight: \
                 {rate:>7.0} calls/s, {:.2} of C / RTT ({bound:.0}; warm call {round_trip:?})",
                rate / bound
            );
            rows.push(json!({
                "rtt_ms": rtt_ms, "max_concurrency": concurrency, "calls_per_s": rate,
                "bound": bound, "ratio": rate / bound, "warm_call_ms": round_trip.as_secs_f64() * 1e3,
            }));
            pool.shutdown().await;
        }
    }
    json!(rows)
}

/// One echo of `len` bytes: the seconds it took, both ways.
async fn echo_time(pool: &Pool, len: usize) -> f64 {
    let payload = ByteBuf::from(vec![0x5a; len]);
    let started = Instant::now();
    let reply = pool.call(&ECHO_BYTES, payload).await.unwrap();
    assert_eq!(reply.len(), len);
    started.elapsed().as_secs_f64()
}

fn name(controller: CongestionControl) -> &'static str {
    match controller {
        CongestionControl::Cubic => "cubic",
        CongestionControl::NewReno => "newreno",
        _ => "bbr",
    }
}

/// A large echo across 50 ms and 1 % random loss, each controller in turn, interleaved rounds.
async fn lossy() -> serde_json::Value {
    let len = if quick() { 4 << 20 } else { 16 << 20 };
    let rounds = if quick() { 1 } else { 2 };
    let mut results = serde_json::Map::new();
    for round in 0..rounds {
        for controller in CONTROLLERS {
            let link = Link::rtt(Duration::from_millis(50)).loss(0.01);
            let relay = Arc::new(Relay::start(
                relay::Link {
                    seed: 7 + round,
                    ..link
                },
                false,
            ));
            let pool = pool_across(Some(&relay), 4, controller).await;
            let seconds = echo_time(&pool, len).await;
            // Both ways: the argument out and the result back.
            let mb_per_s = 2.0 * len as f64 / seconds / 1e6;
            println!(
                "lossy   50 ms, 1 % loss, {} MiB echo, {:<7}: {seconds:>6.1} s, {mb_per_s:>6.2} MB/s",
                len >> 20,
                name(controller)
            );
            results
                .entry(name(controller))
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .unwrap()
                .push(json!({ "seconds": seconds, "mb_per_s": mb_per_s }));
            pool.shutdown().await;
        }
    }
    serde_json::Value::Object(results)
}

/// The same echo on loopback, where a controller must not cost throughput: median of rounds.
async fn loopback() -> serde_json::Value {
    let len = 16 << 20;
    let rounds = if quick() { 1 } else { 5 };
    let mut results = serde_json::Map::new();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); CONTROLLERS.len()];
    let pools: Vec<Pool> = {
        let mut pools = Vec::new();
        for controller in CONTROLLERS {
            pools.push(pool_across(None, 4, controller).await);
        }
        pools
    };
    for _ in 0..rounds {
        for (i, pool) in pools.iter().enumerate() {
            times[i].push(echo_time(pool, len).await);
        }
    }
    for (i, controller) in CONTROLLERS.into_iter().enumerate() {
        times[i].sort_by(f64::total_cmp);
        let median = times[i][times[i].len() / 2];
        let mb_per_s = 2.0 * len as f64 / median / 1e6;
        println!(
            "loopback {} MiB echo, {:<7}: {:>6.1} ms, {mb_per_s:>6.0} MB/s (median of {rounds})",
            len >> 20,
            name(controller),
            median * 1e3
        );
        results.insert(
            name(controller).into(),
            json!({ "seconds": median, "mb_per_s": mb_per_s }),
        );
    }
    for pool in pools {
        pool.shutdown().await;
    }
    serde_json::Value::Object(results)
}

fn main() {
    support::run_peer_if_asked();
    // `cargo bench` passes `--bench`; filters are not supported: every case runs.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let windows = windows().await;
        let loopback = loopback().await;
        let lossy = lossy().await;
        support::write_results(
            "network",
            &json!({ "windows": windows, "loopback": loopback, "lossy": lossy }),
        );
    });
}
