//! Every value a builder accepts works, or the builder refuses it with a clear error: extreme
//! durations and sizes on every method, each run through a real pool and runner.

mod common;

use std::time::Duration;

use common::{local_backend, within};
use firebrand::{
    Limits, PoolBuilder, PoolError, MAX_CONCURRENCY, MAX_RUNNERS, MAX_SETTING_DURATION,
};
use firebrand_runner::{BLOBS, ECHO, STASH, STASH_LEN};
use futures_util::TryStreamExt as _;

const DURATIONS: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_nanos(1),
    MAX_SETTING_DURATION,
    Duration::from_secs(u64::MAX),
    Duration::MAX,
];

type Setting = (String, Box<dyn FnOnce(PoolBuilder) -> PoolBuilder>);

/// Every builder method with a duration or a size, at every extreme value.
fn settings() -> Vec<Setting> {
    let mut all: Vec<Setting> = Vec::new();
    macro_rules! each {
        ($method:ident, $values:expr) => {
            for value in $values {
                all.push((
                    format!("{}({value:?})", stringify!($method)),
                    Box::new(move |b: PoolBuilder| b.$method(value)),
                ));
            }
        };
    }
    each!(boot_timeout, DURATIONS);
    each!(timeout, DURATIONS);
    each!(queue_timeout, DURATIONS);
    each!(idle_shutdown_after, DURATIONS);
    each!(min_idle_shutdown_after, DURATIONS);
    each!(drain_grace, DURATIONS);
    each!(terminate_grace, DURATIONS);
    each!(boot_retry_after, DURATIONS);
    each!(connect_failsafe, DURATIONS);
    each!(peer_timeout, DURATIONS);
    each!(keep_alive, DURATIONS);
    each!(max_payload_len, [0, 1, 1024, u64::from(u32::MAX), u64::MAX]);
    each!(
        max_concurrency,
        [0, 1, MAX_CONCURRENCY, MAX_CONCURRENCY + 1, u32::MAX]
    );
    each!(boot_attempts, [0, 1, u32::MAX]);
    each!(max, [0, 1, MAX_RUNNERS, MAX_RUNNERS + 1, usize::MAX]);
    each!(min, [1, MAX_RUNNERS + 1, usize::MAX]);
    each!(max_queued, [0, 1, usize::MAX]);
    each!(
        prewarm_at,
        [0.0, f64::MIN_POSITIVE, 1.0, f64::MAX, f64::NAN]
    );
    all
}

/// Builds the pool `setting` makes; if it is accepted, runs a call, a stream and a resource on
/// it, resizes it, and shuts it down, all without a panic anywhere.
async fn accepted_or_refused(name: &str, setting: Box<dyn FnOnce(PoolBuilder) -> PoolBuilder>) {
    let builder = firebrand::Pool::builder()
        .registry(&firebrand_runner::registry())
        .backend(local_backend())
        .boot_timeout(Duration::from_secs(20))
        .queue_timeout(Duration::from_secs(20));
    let built = within(Duration::from_secs(60), setting(builder).build()).await;
    let pool = match built {
        Ok(pool) => pool,
        Err(PoolError::InvalidConfig(why)) => {
            assert!(!why.is_empty(), "{name}: refused without a reason");
            return;
        }
        // A setting that makes every boot fail (a 1 ns boot timeout) is refused at start by
        // the `min` runner's boot, which is a clear error too.
        Err(PoolError::Boot(error)) => {
            assert!(!error.to_string().is_empty(), "{name}");
            return;
        }
        Err(other) => panic!("{name}: unexpected error {other:?}"),
    };
    let outcome = within(Duration::from_secs(60), async {
        let echoed = pool.call(&ECHO, vec![1, 2, 3]).await?;
        // Per-call options at their extremes too.
        for limit in DURATIONS {
            let _ = pool
                .call(&ECHO, vec![1])
                .timeout(limit)
                .queue_timeout(limit)
                .await;
        }
        assert_eq!(echoed, vec![1, 2, 3], "{name}");
        // A stream under a tiny timeout ends with its error as its last item; one that ends
        // without an error must have brought every item.
        let items: Vec<_> = pool
            .stream(
                &BLOBS,
                firebrand_runner::BlobArgs {
                    count: 2,
                    bytes: 8,
                    ..Default::default()
                },
            )
            .try_collect()
            .await?;
        assert_eq!(items.len(), 2, "{name}");
        let stash = pool.resource(&STASH, vec![0; 16]).await?;
        assert_eq!(stash.call(&STASH_LEN, ()).await?.0, 16, "{name}");
        Ok::<_, firebrand::CallError>(())
    })
    .await;
    // A setting may make calls fail (a 1 ns timeout, a tiny payload limit), but clearly.
    if let Err(error) = outcome {
        assert!(!error.to_string().is_empty(), "{name}");
    }
    let mut limits: Limits = pool.limits();
    limits.max = limits.max.saturating_add(1);
    let _ = pool.resize(limits);
    within(Duration::from_secs(60), pool.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_extreme_setting_works_or_is_refused_with_a_reason() {
    common::init_tracing();
    for (name, setting) in settings() {
        // Each with one `min` runner, so that boots, drains and idle shutdowns all run.
        let with_min: Box<dyn FnOnce(PoolBuilder) -> PoolBuilder> = if name.starts_with("min(") {
            setting
        } else {
            Box::new(move |b: PoolBuilder| setting(b.min(1).max(2)))
        };
        let started = std::time::Instant::now();
        accepted_or_refused(&name, with_min).await;
        println!("{name}: {:?}", started.elapsed());
    }
}

#[test]
fn settings_beyond_the_limits_are_refused_by_name() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for (method, builder) in [
        (
            "boot_timeout",
            firebrand::Pool::builder()
                .registry(&firebrand_runner::registry())
                .boot_timeout(Duration::MAX),
        ),
        (
            "drain_grace",
            firebrand::Pool::builder()
                .registry(&firebrand_runner::registry())
                .drain_grace(Duration::MAX),
        ),
        (
            "max",
            firebrand::Pool::builder()
                .registry(&firebrand_runner::registry())
                .max(usize::MAX),
        ),
        (
            "runner_log_level",
            firebrand::Pool::builder()
                .registry(&firebrand_runner::registry())
                .runner_log_level("info,my_app=loud"),
        ),
    ] {
        let error = runtime.block_on(builder.build()).unwrap_err();
        assert!(
            matches!(&error, PoolError::InvalidConfig(why) if why.contains(method)),
            "{method}: {error:?}"
        );
    }
}

/// The README's table of defaults says what `firebrand::defaults` holds.
#[test]
fn the_readme_lists_the_defaults_the_builder_uses() {
    use firebrand::defaults as d;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md beside the workspace");
    let secs = |t: Duration| format!("{} s", t.as_secs());
    let mib = |n: u64| format!("{} MiB", n >> 20);
    let rows = [
        ("`min` / `max`", format!("{} / {}", d::MIN, d::MAX)),
        ("`max_concurrency`", d::MAX_CONCURRENCY.to_string()),
        ("`idle_shutdown_after`", secs(d::IDLE_SHUTDOWN_AFTER)),
        ("`boot_timeout`", secs(d::BOOT_TIMEOUT)),
        ("`timeout`", secs(d::TIMEOUT)),
        ("`queue_timeout`", secs(d::QUEUE_TIMEOUT)),
        ("`deadline`", d::DEADLINE.map_or("none".to_owned(), secs)),
        ("`drain_grace`", secs(d::DRAIN_GRACE)),
        (
            "`boot_retry_after` / `boot_attempts`",
            format!("{} / {}", secs(d::BOOT_RETRY_AFTER), d::BOOT_ATTEMPTS),
        ),
        (
            "`peer_timeout` / `keep_alive`",
            format!("{} / {}", secs(d::PEER_TIMEOUT), secs(d::KEEP_ALIVE)),
        ),
        ("`connect_failsafe`", secs(d::CONNECT_FAILSAFE)),
        ("`max_payload_len`", mib(d::MAX_PAYLOAD_LEN)),
    ];
    for (setting, default) in rows {
        let row = format!("| {setting} | {default} |");
        assert!(readme.contains(&row), "README.md lacks the row `{row}`");
    }
}
