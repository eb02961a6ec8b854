//! The stock Firebrand runner's jobs: diagnostics for tests, benchmarks and health checks.
//!
//! A dedicated runner binary for an application looks like `main.rs` beside this file: build a
//! [`Registry`] with the application's jobs, then call [`firebrand::run_if_child`].

use std::time::Duration;

use firebrand::runner::RunnerStats;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use firebrand::{job, Job, Registry, ResourceJob, StreamJob, UsingJob};
use serde::{Deserialize, Serialize};
pub use serde_bytes::ByteBuf;

/// Returns its argument.
pub const ECHO: Job<Vec<u8>, Vec<u8>> = Job::new("firebrand.echo");
/// Returns its argument, encoded as one byte string: the fast path for bulk data.
pub const ECHO_BYTES: Job<ByteBuf, ByteBuf> = Job::new("firebrand.echo_bytes");
/// Sleeps for the given milliseconds.
pub const SLEEP: Job<u64, ()> = Job::new("firebrand.sleep");
/// Fails with the given message.
pub const FAIL: Job<String, ()> = Job::new("firebrand.fail");
/// Panics with the given message.
pub const PANIC: Job<String, ()> = Job::new("firebrand.panic");
/// Chains SHA-256 over a seed: CPU-bound work.
pub const HASH: Job<HashArgs, String> = Job::new("firebrand.hash");
/// Spins the CPU for the given milliseconds without awaiting: an async job that computes.
pub const SPIN: Job<u64, u64> = Job::new("firebrand.spin");
/// Calls `std::thread::sleep` for the given milliseconds inside an async job: one that blocks.
pub const THREAD_SLEEP: Job<u64, ()> = Job::new("firebrand.thread_sleep");
/// Spins the CPU for the given milliseconds, registered with `register_blocking`.
pub const SPIN_BLOCKING: Job<u64, u64> = Job::new("firebrand.spin_blocking");
/// Writes the given bytes to stdout as they are, then flushes.
pub const PRINT: Job<ByteBuf, ()> = Job::new("firebrand.print");
/// The runner's process id.
pub const PID: Job<(), u32> = Job::new("firebrand.pid");
/// Logs `count` lines at INFO with `tracing`, each with the fields `line` (its number) and
/// `answer = 42`, the message `text`.
pub const LOG: Job<(String, u64), ()> = Job::new("firebrand.log");
/// The runner's value of an environment variable.
pub const ENV: Job<String, Option<String>> = Job::new("firebrand.env");
/// What the runner has served so far.
pub const STATS: Job<(), RunnerStats> = Job::new("firebrand.stats");
/// Streams `count` items of `bytes` bytes each, `delay_ms` apart, failing at `fail_at` if set.
pub const BLOBS: StreamJob<BlobArgs, ByteBuf> = StreamJob::new("firebrand.blobs");
/// How many items [`BLOBS`] has produced in this runner, read by the stream so far.
pub const PRODUCED: Job<(), u64> = Job::new("firebrand.produced");

/// Returns that many bytes: a result far larger than its argument.
pub const BYTES: Job<u32, ByteBuf> = Job::new("firebrand.bytes");

/// Keeps its argument on the runner as a resource.
pub const STASH: ResourceJob<Vec<u8>, Vec<u8>> = ResourceJob::new("firebrand.stash");
/// The length of a [`STASH`] resource, and the runner's pid.
pub const STASH_LEN: UsingJob<Vec<u8>, (), (usize, u32)> = UsingJob::new("firebrand.stash_len");

/// Items [`BLOBS`] has handed to the runtime to send.
static PRODUCED_ITEMS: AtomicU64 = AtomicU64::new(0);

/// The argument of [`BLOBS`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BlobArgs {
    /// How many items.
    pub count: u64,
    /// Bytes per item; each byte is the item's index, truncated.
    pub bytes: u32,
    /// Milliseconds between items.
    pub delay_ms: u64,
    /// The index at which the stream fails instead of yielding.
    pub fail_at: Option<u64>,
    /// Waits between items with `std::thread::sleep`, blocking its thread, instead of awaiting.
    pub block: bool,
}

/// The argument of [`HASH`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HashArgs {
    /// The bytes to start from.
    pub seed: Vec<u8>,
    /// How many times to hash.
    pub rounds: u32,
}

/// Logs to stderr at the level `RUST_LOG` sets (default `warn`), as both stock runner binaries
/// do: the parent relays a local runner's stderr into its own log.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The stock runner's jobs.
///
/// # Panics
/// Never: the names are unique.
#[must_use]
pub fn registry() -> Registry {
    // The `#[job]` functions below, then the jobs declared by hand.
    let mut registry = Registry::collected().expect("stock job names are unique");
    registry
        .register(&ECHO, |bytes: Vec<u8>| async move { ok(bytes) })
        .and_then(|r| r.register(&ECHO_BYTES, |bytes: ByteBuf| async move { ok(bytes) }))
        .and_then(|r| {
            r.register(&SLEEP, |ms: u64| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                ok(())
            })
        })
        .and_then(|r| {
            r.register(
                &FAIL,
                |message: String| async move { Err::<(), _>(message) },
            )
        })
        .and_then(|r| {
            r.register(&PANIC, |message: String| async move {
                if !message.is_empty() {
                    panic!("{message}");
                }
                ok(())
            })
        })
        .and_then(|r| r.register(&HASH, |args: HashArgs| async move { ok(hash(&args)) }))
        .and_then(|r| r.register(&SPIN, |ms: u64| async move { ok(spin(ms)) }))
        .and_then(|r| {
            r.register(&THREAD_SLEEP, |ms: u64| async move {
                std::thread::sleep(Duration::from_millis(ms));
                ok(())
            })
        })
        .and_then(|r| r.register_blocking(&SPIN_BLOCKING, |ms: u64| ok(spin(ms))))
        .and_then(|r| {
            r.register(&PRINT, |bytes: ByteBuf| async move {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)
                    .and_then(|()| out.flush())
                    .map_err(|e| e.to_string())
            })
        })
        .and_then(|r| r.register(&PID, |()| async { ok(std::process::id()) }))
        .and_then(|r| {
            r.register(&LOG, |(text, count): (String, u64)| async move {
                for line in 0..count {
                    tracing::info!(line, answer = 42, "{text}");
                }
                ok(())
            })
        })
        .and_then(|r| {
            r.register(
                &ENV,
                |name: String| async move { ok(std::env::var(name).ok()) },
            )
        })
        .and_then(|r| r.register(&STATS, |()| async { ok(firebrand::runner::stats()) }))
        .and_then(|r| r.register_stream(&BLOBS, blobs))
        .and_then(|r| r.register_resource(&STASH, |bytes: Vec<u8>| async move { ok(bytes) }))
        .and_then(|r| {
            r.register_using(&STASH_LEN, |bytes: Arc<Vec<u8>>, ()| async move {
                ok((bytes.len(), std::process::id()))
            })
        })
        .and_then(|r| {
            r.register(&BYTES, |n: u32| async move {
                ok(ByteBuf::from(vec![7; n as usize]))
            })
        })
        .and_then(|r| {
            r.register(&PRODUCED, |()| async {
                ok(PRODUCED_ITEMS.load(Ordering::Relaxed))
            })
        })
        .expect("stock job names are unique");
    registry
}

/// Why [`divide`] refused: a typed job error, which its caller gets back as itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DivideError {
    /// The divisor was zero.
    #[error("cannot divide {0} by zero")]
    ByZero(u64),
}

/// Divides the first number by the second: a `#[job]` whose error comes back typed.
#[job(name = "firebrand.divide")]
pub async fn divide(dividend: u64, divisor: u64) -> Result<u64, DivideError> {
    dividend
        .checked_div(divisor)
        .ok_or(DivideError::ByZero(dividend))
}

/// Parses a number: a blocking `#[job]` whose error (`ParseIntError`, which does not
/// serialize) crosses as text.
#[job(name = "firebrand.parse", error = text)]
pub fn parse(text: String) -> Result<u64, std::num::ParseIntError> {
    text.trim().parse()
}

/// Spins the CPU for the given milliseconds without awaiting, as [`SPIN`] does: a `#[job]`
/// with no deadline of its own (`timeout = "none"`) that cannot fail.
#[job(name = "firebrand.spin_unbounded", timeout = "none")]
pub async fn spin_unbounded(ms: u64) -> u64 {
    spin(ms)
}

/// Sleeps for the given milliseconds under a declared 300 ms deadline: a `#[job]` whose
/// timeout applies to every way of calling it.
#[job(name = "firebrand.sleep_300ms", timeout = "300ms")]
pub async fn sleep_bounded(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// A table of squares, kept on a runner by [`squares`].
#[derive(Debug)]
pub struct Squares(pub Vec<u64>);

/// Makes a table of `n` squares that stays on the runner: a `#[job(resource)]`.
#[job(name = "firebrand.squares", resource)]
pub async fn squares(n: u64) -> Squares {
    Squares((0..n).map(|i| i * i).collect())
}

/// Reads one entry of a [`squares`] table: a `#[job]` that runs with its resource.
#[job(name = "firebrand.square_at")]
pub async fn square_at(table: &Squares, index: usize) -> Option<u64> {
    table.0.get(index).copied()
}

fn ok<T>(value: T) -> Result<T, String> {
    Ok(value)
}

/// The work of [`HASH`], as a hex digest.
#[must_use]
pub fn hash(args: &HashArgs) -> String {
    let mut digest = ring::digest::digest(&ring::digest::SHA256, &args.seed);
    for _ in 1..args.rounds {
        digest = ring::digest::digest(&ring::digest::SHA256, digest.as_ref());
    }
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Keeps one core busy for `ms` milliseconds; returns how many rounds it ran.
#[must_use]
pub fn spin(ms: u64) -> u64 {
    let until = std::time::Instant::now() + Duration::from_millis(ms);
    let mut rounds = 0u64;
    while std::time::Instant::now() < until {
        for _ in 0..1000 {
            rounds = std::hint::black_box(rounds.wrapping_add(1));
        }
    }
    rounds
}

fn blobs(args: BlobArgs) -> impl futures_util::Stream<Item = Result<ByteBuf, String>> {
    futures_util::stream::unfold(0u64, move |index| {
        let args = args.clone();
        async move {
            if index >= args.count {
                return None;
            }
            if args.delay_ms > 0 && args.block {
                std::thread::sleep(Duration::from_millis(args.delay_ms));
            } else if args.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(args.delay_ms)).await;
            }
            if args.fail_at == Some(index) {
                return Some((Err(format!("failed at item {index}")), u64::MAX));
            }
            PRODUCED_ITEMS.fetch_add(1, Ordering::Relaxed);
            let item = ByteBuf::from(vec![index as u8; args.bytes as usize]);
            Some((Ok(item), index + 1))
        }
    })
}
