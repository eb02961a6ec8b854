//! The pool's defaults and limits: a leaf that the pool, the backends and the runner all read,
//! re-exported at the crate's root (`firebrand::defaults`, `firebrand::MAX_RUNNERS`).

use std::time::Duration;

/// The longest duration any setting accepts: ten years. Longer ones are refused rather than
/// left to overflow a deadline (`Instant + Duration`) on the parent or a runner.
pub const MAX_SETTING_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The most runners a pool may have (`min` and `max`).
pub const MAX_RUNNERS: usize = 100_000;

/// The highest `max_concurrency`. Each call is a QUIC stream, and the runner's connection keeps
/// state for every stream the parent may open at once, so the limit bounds that memory.
pub const MAX_CONCURRENCY: u32 = 10_000;

/// The pool settings' defaults, each used by [`PoolBuilder`](crate::PoolBuilder), named in its docs and listed in
/// the README.
pub mod defaults {
    use std::time::Duration;

    /// [`name`](crate::PoolBuilder::name): the name in logs and metrics.
    pub const NAME: &str = "firebrand";
    /// [`min`](crate::PoolBuilder::min): no runner kept up.
    pub const MIN: usize = 0;
    /// [`max`](crate::PoolBuilder::max): one runner.
    pub const MAX: usize = 1;
    /// [`max_concurrency`](crate::PoolBuilder::max_concurrency): calls one runner serves at once.
    pub const MAX_CONCURRENCY: u32 = 100;
    /// [`idle_shutdown_after`](crate::PoolBuilder::idle_shutdown_after), as in FLAME.
    pub const IDLE_SHUTDOWN_AFTER: Duration = Duration::from_secs(30);
    /// [`boot_timeout`](crate::PoolBuilder::boot_timeout), as in FLAME.
    pub const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
    /// [`timeout`](crate::PoolBuilder::timeout): a call's execution deadline, as in FLAME.
    pub const TIMEOUT: Duration = Duration::from_secs(30);
    /// [`queue_timeout`](crate::PoolBuilder::queue_timeout).
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
    /// A call's default [`deadline`](crate::PoolBuilder::deadline): none.
    pub const DEADLINE: Option<Duration> = None;
    /// [`drain_grace`](crate::PoolBuilder::drain_grace).
    pub const DRAIN_GRACE: Duration = Duration::from_secs(30);
    /// [`terminate_grace`](crate::PoolBuilder::terminate_grace).
    pub const TERMINATE_GRACE: Duration = Duration::from_secs(5);
    /// [`boot_retry_after`](crate::PoolBuilder::boot_retry_after).
    pub const BOOT_RETRY_AFTER: Duration = Duration::from_secs(1);
    /// [`boot_attempts`](crate::PoolBuilder::boot_attempts).
    pub const BOOT_ATTEMPTS: u32 = 3;
    /// [`peer_timeout`](crate::PoolBuilder::peer_timeout).
    pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);
    /// [`keep_alive`](crate::PoolBuilder::keep_alive).
    pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
    /// [`connect_failsafe`](crate::PoolBuilder::connect_failsafe).
    pub const CONNECT_FAILSAFE: Duration = Duration::from_secs(20);
    /// [`max_payload_len`](crate::PoolBuilder::max_payload_len): 128 MiB.
    pub const MAX_PAYLOAD_LEN: u64 = 128 << 20;
    /// [`runner_log_level`](crate::PoolBuilder::runner_log_level).
    pub const RUNNER_LOG_LEVEL: &str = "info";
}
