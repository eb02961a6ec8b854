//! Pool configuration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, LocalBackend};
use crate::error::PoolError;
use crate::manifest::Manifest;
use crate::registry::Registry;
use crate::token::RunnerSettings;
use crate::transport::CongestionControl;

use super::Pool;
use crate::settings::{defaults, MAX_SETTING_DURATION};

/// A pool's settings, validated.
#[derive(Debug, Clone)]
pub(crate) struct PoolConfig {
    pub(crate) name: String,
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) max_concurrency: u32,
    pub(crate) idle_shutdown_after: Option<Duration>,
    pub(crate) min_idle_shutdown_after: Option<Duration>,
    pub(crate) boot_timeout: Duration,
    pub(crate) runner_log_level: String,
    pub(crate) call_timeout: Option<Duration>,
    pub(crate) queue_timeout: Duration,
    pub(crate) deadline: Option<Duration>,
    pub(crate) single_use: bool,
    pub(crate) drain_grace: Duration,
    pub(crate) terminate_grace: Duration,
    pub(crate) boot_retry_after: Duration,
    pub(crate) boot_attempts: u32,
    pub(crate) peer_timeout: Duration,
    pub(crate) keep_alive: Duration,
    pub(crate) congestion: CongestionControl,
    pub(crate) connect_failsafe: Duration,
    pub(crate) max_payload_len: u64,
    pub(crate) bind: Option<SocketAddr>,
    pub(crate) max_queued: Option<usize>,
    pub(crate) placement: Placement,
    pub(crate) prewarm_at: Option<f64>,
    pub(crate) hooks: super::hooks::Hooks,
}

/// Which runner with a free slot gets a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// The least-loaded runner: calls spread out, each finishes soonest. The default.
    #[default]
    Spread,
    /// The busiest runner that still has a free slot, the oldest on ties: spare runners get no
    /// work and idle down after a spike.
    Pack,
}

impl PoolConfig {
    pub(crate) fn runner_settings(&self, min: bool, max_concurrency: u32) -> RunnerSettings {
        RunnerSettings {
            max_concurrency,
            idle_shutdown_after: if min {
                self.min_idle_shutdown_after
            } else {
                self.idle_shutdown_after
            },
            connect_failsafe: self.connect_failsafe,
            drain_grace: self.drain_grace,
            max_payload_len: self.max_payload_len,
            peer_timeout: self.peer_timeout,
            keep_alive: self.keep_alive,
            congestion: self.congestion,
            log_filter: self.runner_log_level.clone(),
            forward_output: false,
        }
    }

    fn validate(&self) -> Result<(), PoolError> {
        let invalid = |why: String| Err(PoolError::InvalidConfig(why));
        super::resize::Limits {
            min: self.min,
            max: self.max,
            max_concurrency: self.max_concurrency,
        }
        .validate()?;
        if self.boot_attempts == 0 {
            return invalid("boot_attempts must be at least 1".into());
        }
        for (name, value, zero_allowed) in [
            ("boot_timeout", Some(self.boot_timeout), false),
            ("queue_timeout", Some(self.queue_timeout), false),
            ("timeout", self.call_timeout, false),
            ("deadline", self.deadline, false),
            ("idle_shutdown_after", self.idle_shutdown_after, false),
            (
                "min_idle_shutdown_after",
                self.min_idle_shutdown_after,
                false,
            ),
            ("peer_timeout", Some(self.peer_timeout), false),
            ("keep_alive", Some(self.keep_alive), false),
            ("connect_failsafe", Some(self.connect_failsafe), false),
            ("drain_grace", Some(self.drain_grace), true),
            ("terminate_grace", Some(self.terminate_grace), true),
            ("boot_retry_after", Some(self.boot_retry_after), true),
        ] {
            let Some(value) = value else { continue };
            if value.is_zero() && !zero_allowed {
                return invalid(format!("{name} must be longer than zero"));
            }
            if value > MAX_SETTING_DURATION {
                return invalid(format!(
                    "{name} ({value:?}) exceeds the longest setting, {MAX_SETTING_DURATION:?} \
                     (ten years); use `None` where the setting takes one, for no limit"
                ));
            }
        }
        if self.keep_alive >= self.peer_timeout {
            return invalid(format!(
                "keep_alive ({:?}) must be shorter than peer_timeout ({:?})",
                self.keep_alive, self.peer_timeout
            ));
        }
        if let Some(at) = self.prewarm_at {
            if !(at > 0.0 && at <= 1.0) {
                return invalid(format!("prewarm_at must be in (0, 1], not {at}"));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.runner_log_level) {
            return invalid(format!(
                "runner_log_level `{}` is not an EnvFilter directive: {e}",
                self.runner_log_level
            ));
        }
        if self.max_payload_len < 1024 || self.max_payload_len > u64::from(u32::MAX) {
            return invalid("max_payload_len must be between 1 KiB and 4 GiB".into());
        }
        Ok(())
    }
}

/// Configures and starts a [`Pool`]. Defaults follow FLAME's where it has them.
///
/// ```no_run
/// # async fn f(registry: firebrand::Registry) -> Result<(), firebrand::PoolError> {
/// use std::time::Duration;
/// use firebrand::{LocalBackend, Pool};
///
/// let pool = Pool::builder().registry(&registry)
///     .backend(LocalBackend::default())
///     .min(0)
///     .max(8)
///     .max_concurrency(4)
///     .idle_shutdown_after(Duration::from_secs(10))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until `build` is awaited"]
pub struct PoolBuilder {
    /// The jobs' manifest; `None`: the [`Registry::collected`] jobs'.
    manifest: Option<Manifest>,
    /// Whether `max` was set; if not, a backend's capacity is the pool's `max`.
    max_set: bool,
    backend: Option<Arc<dyn Backend>>,
    config: PoolConfig,
}

impl std::fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("jobs", &self.manifest.as_ref().map(|m| m.jobs().len()))
            .field(
                "backend",
                &self.backend.as_ref().map_or("local (default)", |_| "set"),
            )
            .field("config", &self.config)
            .finish()
    }
}

impl PoolBuilder {
    pub(crate) fn new() -> Self {
        Self {
            manifest: None,
            max_set: false,
            backend: None,
            config: PoolConfig {
                name: defaults::NAME.into(),
                min: defaults::MIN,
                max: defaults::MAX,
                max_concurrency: defaults::MAX_CONCURRENCY,
                idle_shutdown_after: Some(defaults::IDLE_SHUTDOWN_AFTER),
                min_idle_shutdown_after: None,
                boot_timeout: defaults::BOOT_TIMEOUT,
                call_timeout: Some(defaults::TIMEOUT),
                queue_timeout: defaults::QUEUE_TIMEOUT,
                deadline: defaults::DEADLINE,
                single_use: false,
                drain_grace: defaults::DRAIN_GRACE,
                terminate_grace: defaults::TERMINATE_GRACE,
                boot_retry_after: defaults::BOOT_RETRY_AFTER,
                boot_attempts: defaults::BOOT_ATTEMPTS,
                peer_timeout: defaults::PEER_TIMEOUT,
                keep_alive: defaults::KEEP_ALIVE,
                congestion: CongestionControl::default(),
                runner_log_level: defaults::RUNNER_LOG_LEVEL.to_owned(),
                connect_failsafe: defaults::CONNECT_FAILSAFE,
                max_payload_len: defaults::MAX_PAYLOAD_LEN,
                bind: None,
                max_queued: None,
                placement: Placement::Spread,
                prewarm_at: None,
                hooks: super::hooks::Hooks::default(),
            },
        }
    }

    /// Where runners boot. Default: [`LocalBackend::default()`], the current executable.
    pub fn backend(mut self, backend: impl Backend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// A name for logs and metrics. Default: [`defaults::NAME`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Runners booted at start and kept up: one that dies is replaced. Default: [`defaults::MIN`], none.
    pub fn min(mut self, min: usize) -> Self {
        self.config.min = min;
        self
    }

    /// The jobs this pool's runners serve: `registry`'s, for a registry built at run time.
    /// Runners must serve the same jobs: one whose registry differs is refused when it
    /// connects. Default: every [`#[job]`](crate::job) linked into the binary
    /// ([`Registry::collected`]).
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.manifest = Some(registry.manifest());
        self
    }

    /// The most runners, booted and booting. Default: the backend's capacity when it reports
    /// one ([`Backend::max_runners`](crate::Backend::max_runners): a GPU machine's GPUs, one
    /// runner each), else [`defaults::MAX`], one.
    pub fn max(mut self, max: usize) -> Self {
        self.max_set = true;
        self.config.max = max;
        self
    }

    /// Calls one runner serves at once. Default: [`defaults::MAX_CONCURRENCY`], 100.
    pub fn max_concurrency(mut self, n: u32) -> Self {
        self.config.max_concurrency = n;
        self
    }

    /// A runner with no calls for this long stops; `None` never. Default: [`defaults::IDLE_SHUTDOWN_AFTER`], 30 s.
    pub fn idle_shutdown_after(mut self, after: impl Into<Option<Duration>>) -> Self {
        self.config.idle_shutdown_after = after.into();
        self
    }

    /// The same for the `min` runners. Default: `None`, never.
    ///
    /// A `min` runner that idles out is not replaced while the pool stays idle: `min` lapses
    /// (see [`PoolStats::min_lapsed`](crate::PoolStats::min_lapsed)) until the next call, which
    /// boots the `min` runners again; from then on `min` is kept until they idle out again.
    /// A `min` runner lost for any other reason is replaced at once, as always.
    pub fn min_idle_shutdown_after(mut self, after: impl Into<Option<Duration>>) -> Self {
        self.config.min_idle_shutdown_after = after.into();
        self
    }

    /// How long a runner has from the backend's boot request to its accepted hello. A runner
    /// that misses it is terminated and can no longer connect. Default: [`defaults::BOOT_TIMEOUT`], 30 s.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.config.boot_timeout = timeout;
        self
    }

    /// The execution deadline of a call, enforced on the parent and the runner; `None` for
    /// none. Default: [`defaults::TIMEOUT`], 30 s. It bounds the job's run: from when the
    /// runner has the whole argument until its reply starts back. Queue time does not count
    /// against it, and neither does the transfer of the argument or the result, which on a
    /// slow or lossy link can take longer than the job (a link that stops carrying anything is
    /// caught by [`peer_timeout`](Self::peer_timeout)).
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.config.call_timeout = timeout.into();
        self
    }

    /// How long a call may wait for a free runner slot. Default: [`defaults::QUEUE_TIMEOUT`], 30 s.
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.config.queue_timeout = timeout;
        self
    }

    /// The default [`deadline`](crate::Call::deadline) of every call, stream and resource:
    /// one bound on the caller's whole wait (queue, boot, sending, the job's run and retries
    /// together); `None` for none. Default: [`defaults::DEADLINE`], none: `queue_timeout` and
    /// `timeout` bound their own phases. See `docs/lifecycle.md` for how the three compare
    /// with FLAME's `timeout` and a gRPC deadline.
    pub fn deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        self.config.deadline = deadline.into();
        self
    }

    /// Stop each runner after its first call. Default: `false`.
    pub fn single_use(mut self, single_use: bool) -> Self {
        self.config.single_use = single_use;
        self
    }

    /// How long in-flight calls may run on when the pool shuts down, or on a runner that lost its
    /// parent or got SIGTERM. Default: [`defaults::DRAIN_GRACE`], 30 s.
    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.config.drain_grace = grace;
        self
    }

    /// How long a released runner has to exit before it is killed. Default: [`defaults::TERMINATE_GRACE`], 5 s.
    pub fn terminate_grace(mut self, grace: Duration) -> Self {
        self.config.terminate_grace = grace;
        self
    }

    /// The debounce before a failed boot is retried; it doubles with each failure in a row, up
    /// to 32 times. Default: [`defaults::BOOT_RETRY_AFTER`], 1 s.
    pub fn boot_retry_after(mut self, after: Duration) -> Self {
        self.config.boot_retry_after = after;
        self
    }

    /// Boot failures in a row, with no runner up, after which waiting callers fail with
    /// [`CallError::BootFailed`](crate::CallError::BootFailed). Default: [`defaults::BOOT_ATTEMPTS`], 3.
    pub fn boot_attempts(mut self, attempts: u32) -> Self {
        self.config.boot_attempts = attempts;
        self
    }

    /// A peer silent for this long is lost (the QUIC idle timeout): a runner whose parent
    /// died, or a parent whose runner was cut off, notices between `peer_timeout` and
    /// `peer_timeout + keep_alive` after the peer's last packet. A busy runner outlives a
    /// parent that died without closing by at most `peer_timeout + drain_grace`. Default:
    /// [`defaults::PEER_TIMEOUT`], 5 s.
    pub fn peer_timeout(mut self, timeout: Duration) -> Self {
        self.config.peer_timeout = timeout;
        self
    }

    /// Which of its `tracing` events a runner sends to the parent, which logs them again with
    /// target `firebrand::runner`, the runner's id and machine, and the call's job and trace
    /// id: a level (`LevelFilter::DEBUG`, `"debug"`) or any `EnvFilter` directive
    /// (`"info,my_app::jobs=trace"`). On a backend whose runners' output the parent does not
    /// see (Fly, Kubernetes), the runner also writes them to its own stderr, the machine's log.
    /// `"off"` sends none. A directive that does not parse fails [`build`](Self::build) with
    /// [`PoolError::InvalidConfig`]. Default: [`defaults::RUNNER_LOG_LEVEL`], `"info"`.
    ///
    /// ```
    /// # fn f(registry: &firebrand::Registry) {
    /// let builder = firebrand::Pool::builder().registry(registry)
    ///     .runner_log_level("warn,my_app::jobs=debug");
    /// # }
    /// ```
    pub fn runner_log_level(mut self, filter: impl std::fmt::Display) -> Self {
        self.config.runner_log_level = filter.to_string();
        self
    }

    /// The congestion controller of every runner connection, both ways: see
    /// [`CongestionControl`] for when to pick which. Default: [`CongestionControl::Bbr`].
    ///
    /// ```
    /// # fn f(registry: &firebrand::Registry) {
    /// // Runner traffic shares a congested link: CUBIC is fairer to the other flows.
    /// let builder = firebrand::Pool::builder().registry(registry)
    ///     .congestion_control(firebrand::CongestionControl::Cubic);
    /// # }
    /// ```
    pub fn congestion_control(mut self, controller: CongestionControl) -> Self {
        self.config.congestion = controller;
        self
    }

    /// The QUIC keep-alive interval; below `peer_timeout`. Default: [`defaults::KEEP_ALIVE`], 1 s.
    pub fn keep_alive(mut self, interval: Duration) -> Self {
        self.config.keep_alive = interval;
        self
    }

    /// A runner that has not been accepted by its parent this long after starting exits.
    /// Default: [`defaults::CONNECT_FAILSAFE`], 20 s.
    pub fn connect_failsafe(mut self, failsafe: Duration) -> Self {
        self.config.connect_failsafe = failsafe;
        self
    }

    /// The largest encoded argument or result, in bytes. Default: [`defaults::MAX_PAYLOAD_LEN`], 128 MiB.
    pub fn max_payload_len(mut self, len: u64) -> Self {
        self.config.max_payload_len = len;
        self
    }

    /// The most calls that may wait for a slot; past it a call fails at once with
    /// [`CallError::Overloaded`](crate::CallError::Overloaded). `None` for no bound. Default:
    /// `None`, as in FLAME.
    pub fn max_queued(mut self, max: impl Into<Option<usize>>) -> Self {
        self.config.max_queued = max.into();
        self
    }

    /// Which runner gets a call. Default: [`Placement::Spread`].
    pub fn placement(mut self, placement: Placement) -> Self {
        self.config.placement = placement;
        self
    }

    /// Boots one more runner (up to `max`) when this share of the ready runners' slots is in use,
    /// so that the next callers need not queue. `None` to boot only for callers already waiting.
    /// Default: `None`, as in FLAME; `Some(0.8)` boots at 80% load.
    pub fn prewarm_at(mut self, share: impl Into<Option<f64>>) -> Self {
        self.config.prewarm_at = share.into();
        self
    }

    /// Called when a runner starts booting.
    pub fn on_grow_start(
        mut self,
        hook: impl Fn(&super::GrowStart) + Send + Sync + 'static,
    ) -> Self {
        self.config.hooks.grow_start = Some(Arc::new(hook));
        self
    }

    /// Called when a boot ends, with its duration or its error.
    pub fn on_grow_end(mut self, hook: impl Fn(&super::GrowEnd) + Send + Sync + 'static) -> Self {
        self.config.hooks.grow_end = Some(Arc::new(hook));
        self
    }

    /// Called when a ready runner leaves the pool, with the reason.
    pub fn on_shrink(mut self, hook: impl Fn(&super::Shrink) + Send + Sync + 'static) -> Self {
        self.config.hooks.shrink = Some(Arc::new(hook));
        self
    }

    /// Where the pool's endpoint binds. Default: the backend's choice (loopback for
    /// [`LocalBackend`]).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.config.bind = Some(addr);
        self
    }

    /// Starts the pool: binds its endpoint, and boots the `min` runners and waits for them.
    ///
    /// # Errors
    /// [`PoolError::InvalidConfig`] for a bad setting, before anything starts;
    /// [`PoolError::Boot`] if a `min` runner fails to boot (nothing is left running);
    /// [`PoolError::Registry`] if two collected jobs share a name.
    pub async fn build(mut self) -> Result<Pool, PoolError> {
        let manifest = match self.manifest.take() {
            Some(manifest) => manifest,
            None => Registry::collected()?.manifest(),
        };
        let backend = self
            .backend
            .unwrap_or_else(|| Arc::new(LocalBackend::default()));
        if !self.max_set {
            if let Some(capacity) = backend.max_runners().filter(|n| *n > 0) {
                self.config.max = capacity;
            }
        }
        self.config.validate()?;
        Pool::start(self.config, manifest, backend).await
    }
}
