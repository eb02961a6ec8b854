//! Warm-path benchmarks: latency, throughput and payload, each against its baselines in the same
//! run. Runners and baseline peers are separate processes.
//!
//! ```sh
//! cargo bench --bench calls && python3 benches/summary.py
//! ```

mod support;

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use firebrand_runner::{ByteBuf, ECHO_BYTES, LOG, SPIN_BLOCKING};
use support::{run_in_flight, warm_pool, GrpcEcho, Latencies, QuicEcho, TcpEcho};

fn latency(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let latencies = Latencies::default();
    let payload = vec![7u8; 64];
    let mut group = c.benchmark_group("latency");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    let pool = rt.block_on(warm_pool(1));
    group.bench_function("firebrand", |b| {
        b.iter_custom(|iters| {
            rt.block_on(one_at_a_time(&latencies, "firebrand", iters, || async {
                let reply = pool.call(&ECHO_BYTES, ByteBuf::from(payload.clone())).await;
                reply.unwrap().len()
            }))
        })
    });
    rt.block_on(pool.shutdown());

    let quic = rt.block_on(QuicEcho::start());
    group.bench_function("baseline_quic", |b| {
        b.iter_custom(|iters| {
            rt.block_on(one_at_a_time(
                &latencies,
                "baseline_quic",
                iters,
                || async { quic.echo(&payload).await.len() },
            ))
        })
    });
    drop(quic);

    let grpc = rt.block_on(GrpcEcho::start());
    let bytes = bytes::Bytes::from(payload.clone());
    group.bench_function("baseline_grpc", |b| {
        b.iter_custom(|iters| {
            rt.block_on(one_at_a_time(
                &latencies,
                "baseline_grpc",
                iters,
                || async { grpc.client.echo(bytes.clone()).await.len() },
            ))
        })
    });
    drop(grpc);

    let mut tcp = TcpEcho::start();
    let mut reply = [0u8; 64];
    group.bench_function("baseline_tcp", |b| {
        b.iter_custom(|iters| {
            let mut nanos = Vec::with_capacity(iters as usize);
            for _ in 0..iters {
                let started = Instant::now();
                tcp.echo(&payload, &mut reply);
                nanos.push(started.elapsed().as_nanos() as u64);
            }
            latencies.record("baseline_tcp", nanos.clone());
            Duration::from_nanos(nanos.iter().sum())
        })
    });
    group.finish();
    support::write_results("latency", &latencies.summary());
}

/// `iters` 64-byte echoes by `call` (which returns the reply's length), one at a time: their
/// total time, with each one's recorded under `name`.
async fn one_at_a_time<F, Fut>(latencies: &Latencies, name: &str, iters: u64, call: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let mut nanos = Vec::with_capacity(iters as usize);
    for _ in 0..iters {
        let started = Instant::now();
        let len = call().await;
        nanos.push(started.elapsed().as_nanos() as u64);
        assert_eq!(len, 64);
    }
    latencies.record(name, nanos.clone());
    Duration::from_nanos(nanos.iter().sum())
}

/// `iters` echoes of `size` bytes by `call` (which returns the reply's length), one after the
/// other: their total time.
async fn echoes<F, Fut>(iters: u64, size: usize, call: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let started = Instant::now();
    for _ in 0..iters {
        assert_eq!(call().await, size);
    }
    started.elapsed()
}

fn throughput(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    const CALLS: u64 = 2_000;
    let payload = vec![7u8; 64];
    let mut group = c.benchmark_group("throughput");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(CALLS));
    // Everything starts first, so that each level measures Firebrand and its baseline back to
    // back: drift on this shared machine then moves both alike.
    let pools = [
        (1, rt.block_on(warm_pool(1))),
        (4, rt.block_on(warm_pool(4))),
    ];
    let quic = rt.block_on(QuicEcho::start());
    let grpc = rt.block_on(GrpcEcho::start());
    let bytes = bytes::Bytes::from(payload.clone());
    let raw = rt.block_on(support::RawParent::start());
    let mut raw_request = firebrand::internals::wire::Chunks::new();
    raw_request
        .push_frame(&firebrand::internals::wire::CallHead {
            job: ECHO_BYTES.name().into(),
            timeout_ms: 30_000,
            trace_id: 0,
            resource: 0,
        })
        .unwrap();
    raw_request
        .push_frame(&ByteBuf::from(payload.clone()))
        .unwrap();
    let raw_request = raw_request.into_bytes().concat();
    for in_flight in [1, 8, 64, 256] {
        group.bench_with_input(
            BenchmarkId::new("baseline_quic", in_flight),
            &in_flight,
            |b, &k| {
                b.iter_custom(|iters| {
                    rt.block_on(run_in_flight(iters * CALLS, k, || async {
                        assert_eq!(quic.echo(&payload).await.len(), 64);
                    }))
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("baseline_grpc", in_flight),
            &in_flight,
            |b, &k| {
                b.iter_custom(|iters| {
                    rt.block_on(run_in_flight(iters * CALLS, k, || async {
                        assert_eq!(grpc.client.echo(bytes.clone()).await.len(), 64);
                    }))
                })
            },
        );
        for (runners, pool) in &pools {
            let id = BenchmarkId::new(format!("firebrand_{runners}_runners"), in_flight);
            group.bench_with_input(id, &in_flight, |b, &k| {
                b.iter_custom(|iters| {
                    rt.block_on(run_in_flight(iters * CALLS, k, || async {
                        let reply = pool.call(&ECHO_BYTES, ByteBuf::from(payload.clone())).await;
                        assert_eq!(reply.unwrap().len(), 64);
                    }))
                })
            });
        }
        if in_flight == 64 {
            // Diagnostic: the stock runner driven by a raw client with a pre-encoded request,
            // which splits a call's cost between the pool and the runner.
            let id = BenchmarkId::new("raw_client_firebrand_runner", in_flight);
            group.bench_with_input(id, &in_flight, |b, &k| {
                b.iter_custom(|iters| {
                    rt.block_on(run_in_flight(iters * CALLS, k, || async {
                        assert!(raw.call(&raw_request).await.len() > 64);
                    }))
                })
            });
        }
    }
    group.finish();
    for (_, pool) in pools {
        rt.block_on(pool.shutdown());
    }
}

fn payload(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("payload");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let pool = rt.block_on(warm_pool(1));
    let quic = rt.block_on(QuicEcho::start());
    let grpc = rt.block_on(GrpcEcho::start());
    for size in [1usize << 20, 16 << 20, 64 << 20] {
        let data = vec![0x5Au8; size];
        // The argument goes out and the result comes back: both directions count.
        group.throughput(Throughput::Bytes(2 * size as u64));
        group.bench_with_input(
            BenchmarkId::new("baseline_grpc", size >> 20),
            &size,
            |b, _| {
                b.iter_custom(|iters| {
                    // As the Firebrand caller does: its own copy of the data each time.
                    rt.block_on(echoes(iters, size, || async {
                        let sent = bytes::Bytes::from(data.clone());
                        grpc.client.echo(sent).await.len()
                    }))
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("baseline_quic", size >> 20),
            &size,
            |b, _| {
                b.iter_custom(|iters| {
                    rt.block_on(echoes(iters, size, || async {
                        quic.echo(&data).await.len()
                    }))
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("firebrand", size >> 20), &size, |b, _| {
            b.iter_custom(|iters| {
                rt.block_on(echoes(iters, size, || async {
                    let reply = pool.call(&ECHO_BYTES, ByteBuf::from(data.clone())).await;
                    reply.unwrap().len()
                }))
            })
        });
    }
    group.finish();
    rt.block_on(pool.shutdown());
}

/// CPU per call on each side, at 64 in flight: steadier than throughput on a shared machine.
fn cpu_per_call(rt: &tokio::runtime::Runtime) {
    let results = std::sync::Mutex::new(serde_json::Map::new());
    const CALLS: u64 = 200_000;
    let payload = vec![7u8; 64];
    let measure = |name: &str, child: &str, run: &dyn Fn()| {
        run();
        let (own, other, main) = (
            support::own_cpu(),
            support::cpu_of(child),
            support::main_thread_cpu(),
        );
        let started = Instant::now();
        run();
        let wall = started.elapsed();
        let own = (support::own_cpu() - own).as_nanos() as f64 / CALLS as f64 / 1e3;
        let other = (support::cpu_of(child) - other).as_nanos() as f64 / CALLS as f64 / 1e3;
        let main = (support::main_thread_cpu() - main).as_nanos() as f64 / CALLS as f64 / 1e3;
        let rate = CALLS as f64 / wall.as_secs_f64();
        println!("{name:>12}: parent {own:.2} µs/call (calling thread {main:.2}), child {other:.2} µs/call, {rate:.0} calls/s");
        results.lock().unwrap().insert(
            name.to_string(),
            serde_json::json!({ "parent_us": own, "calling_thread_us": main, "child_us": other }),
        );
    };
    let pool = rt.block_on(warm_pool(1));
    measure("firebrand", "firebrand-runne", &|| {
        rt.block_on(run_in_flight(CALLS, 64, || async {
            pool.call(&ECHO_BYTES, ByteBuf::from(payload.clone()))
                .await
                .unwrap();
        }));
    });
    rt.block_on(pool.shutdown());
    let quic = rt.block_on(QuicEcho::start());
    let me = std::env::current_exe().unwrap();
    let me = me.file_name().unwrap().to_string_lossy();
    measure("baseline_quic", &me[..me.len().min(15)], &|| {
        rt.block_on(run_in_flight(CALLS, 64, || async {
            quic.echo(&payload).await;
        }));
    });
    let results = serde_json::Value::Object(results.into_inner().unwrap());
    support::write_results("cpu", &results);
}

/// Wake-ups per warm call: how often each side's threads block and are woken again, for
/// 64-byte echo calls one at a time, on Firebrand, the raw QUIC floor and tonic, in the same run.
/// On this VM a blocked thread whose vCPU halts costs tens of µs to wake: the count is where
/// the warm path's time beyond the floor goes.
fn wakeups_per_call(rt: &tokio::runtime::Runtime) {
    const CALLS: u64 = 5_000;
    let payload = vec![7u8; 64];
    let me = std::process::id();
    let mut results = serde_json::Map::new();
    let mut measure = |name: &str, peer: u32, run: &dyn Fn()| {
        run();
        let (parent, child) = (support::blocks_of(me), support::blocks_of(peer));
        run();
        let parent = (support::blocks_of(me) - parent) as f64 / CALLS as f64;
        let child = (support::blocks_of(peer) - child) as f64 / CALLS as f64;
        println!("{name:>14}: wake-ups per call: parent {parent:.2}, peer {child:.2}");
        results.insert(
            name.to_string(),
            serde_json::json!({ "parent": parent, "peer": child }),
        );
    };
    let pool = rt.block_on(warm_pool(1));
    let runner = rt.block_on(pool.call(&firebrand_runner::PID, ())).unwrap();
    measure("firebrand", runner, &|| {
        rt.block_on(async {
            for _ in 0..CALLS {
                let reply = pool.call(&ECHO_BYTES, ByteBuf::from(payload.clone())).await;
                assert_eq!(reply.unwrap().len(), 64);
            }
        })
    });
    rt.block_on(pool.shutdown());
    let quic = rt.block_on(QuicEcho::start());
    measure("baseline_quic", quic.pid(), &|| {
        rt.block_on(async {
            for _ in 0..CALLS {
                assert_eq!(quic.echo(&payload).await.len(), 64);
            }
        })
    });
    drop(quic);
    let grpc = rt.block_on(GrpcEcho::start());
    let bytes = bytes::Bytes::from(payload.clone());
    measure("baseline_grpc", grpc.pid(), &|| {
        rt.block_on(async {
            for _ in 0..CALLS {
                assert_eq!(grpc.client.echo(bytes.clone()).await.len(), 64);
            }
        })
    });
    support::write_results("wakeups", &serde_json::Value::Object(results));
}

/// The median time of `calls` 64-byte echo calls, one at a time, in µs.
fn echo_p50(rt: &tokio::runtime::Runtime, pool: &firebrand::Pool, calls: usize) -> f64 {
    let payload = vec![7u8; 64];
    rt.block_on(async {
        let mut nanos = Vec::with_capacity(calls);
        for _ in 0..calls {
            let started = Instant::now();
            let reply = pool.call(&ECHO_BYTES, ByteBuf::from(payload.clone())).await;
            nanos.push(started.elapsed().as_nanos() as u64);
            assert_eq!(reply.unwrap().len(), 64);
        }
        nanos.sort_unstable();
        nanos[nanos.len() / 2] as f64 / 1e3
    })
}

/// Warm-call latency on a runner whose every core is busy with CPU-bound (`register_blocking`)
/// jobs, against the same call on the same runner idle, in the same run.
fn busy_runner(rt: &tokio::runtime::Runtime) {
    const CALLS: usize = 1_000;
    const SPIN_MS: u64 = 4_000;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pool = rt.block_on(warm_pool(1));
    let sample = |pool: &firebrand::Pool| echo_p50(rt, pool, CALLS);
    sample(&pool);
    let idle = sample(&pool);
    let spins: Vec<_> = (0..cores)
        .map(|_| rt.spawn(pool.call(&SPIN_BLOCKING, SPIN_MS)))
        .collect();
    rt.block_on(async {
        while pool.stats().in_flight < cores {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let busy = sample(&pool);
    let still_busy = spins.iter().all(|s| !s.is_finished());
    for spin in spins {
        rt.block_on(spin).unwrap().unwrap();
    }
    rt.block_on(pool.shutdown());
    let ratio = busy / idle;
    println!("busy runner: warm call p50 {busy:.1} µs with {cores} cores spinning, {idle:.1} µs idle: {ratio:.2}x (all busy throughout: {still_busy})");
    support::write_results(
        "busy",
        &serde_json::json!({
            "idle_p50_us": idle, "busy_p50_us": busy, "ratio": ratio, "cores": cores,
            "busy_throughout": still_busy,
        }),
    );
}

/// Warm-call latency on a runner that logs as fast as it can (a job emitting five million
/// `tracing` events, each sent to the parent over the same connection), against the same
/// call on the same runner idle, in the same run. The parent here has no subscriber, so it
/// takes the lines as fast as they come: the most log traffic the connection can carry.
fn logging_runner(rt: &tokio::runtime::Runtime) {
    const CALLS: usize = 1_000;
    const LINES: u64 = 5_000_000;
    let pool = rt.block_on(warm_pool(1));
    let sample = |pool: &firebrand::Pool| echo_p50(rt, pool, CALLS);
    sample(&pool);
    let idle = sample(&pool);
    let flood = rt.spawn(
        pool.call(
            &LOG,
            ("a line of the flood, as a job might log it".into(), LINES),
        )
        .timeout(None),
    );
    rt.block_on(async {
        while pool.stats().in_flight < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let logging = sample(&pool);
    let still_logging = !flood.is_finished();
    rt.block_on(flood).unwrap().unwrap();
    rt.block_on(pool.shutdown());
    let ratio = logging / idle;
    println!("logging runner: warm call p50 {logging:.1} µs while it logs, {idle:.1} µs idle: {ratio:.2}x (logging throughout: {still_logging})");
    support::write_results(
        "logging",
        &serde_json::json!({
            "idle_p50_us": idle, "logging_p50_us": logging, "ratio": ratio,
            "logging_throughout": still_logging,
        }),
    );
}

fn main() {
    support::run_peer_if_asked();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = Criterion::default().configure_from_args();
    latency(&mut c, &rt);
    throughput(&mut c, &rt);
    payload(&mut c, &rt);
    c.final_summary();
    // Not on `--list` or the `--test` pass that `cargo test --benches` makes.
    if !std::env::args().any(|a| a == "--list" || a == "--test") {
        wakeups_per_call(&rt);
        cpu_per_call(&rt);
        busy_runner(&rt);
        logging_runner(&rt);
    }
}
