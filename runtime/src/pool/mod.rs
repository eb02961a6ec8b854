//! The pool: places calls on runners, queues them, and grows and shrinks.

mod boot;
mod builder;
mod hooks;
mod listener;
mod placement;
mod runner;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

pub use builder::{Placement, PoolBuilder};
pub use hooks::{GrowEnd, GrowStart, Shrink};

use crate::backend::Backend;
use crate::error::{BootError, CallError, PoolError};
use crate::job::{Job, Payload};
use crate::registry::{Manifest, Registry};
use crate::tls::{self, PoolCa};
use crate::{transport, wire};
use builder::PoolConfig;
use listener::Listener;
use placement::State;

/// A snapshot of a pool's runners and calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Runners connected and taking calls.
    pub ready: usize,
    /// Runners booting.
    pub booting: usize,
    /// Runners finishing their calls before they stop.
    pub draining: usize,
    /// Calls running on runners.
    pub in_flight: usize,
    /// Calls waiting for a slot.
    pub queued: usize,
}

/// A pool of runners that execute jobs.
///
/// Cheap to clone; every clone drives the same pool. When the last clone is dropped, every
/// runner is released and its machine terminated; [`shutdown`](Pool::shutdown) does the same
/// after letting running calls finish.
///
/// ```no_run
/// # async fn f(registry: firebrand::Registry) -> Result<(), Box<dyn std::error::Error>> {
/// use firebrand::{Job, Pool};
///
/// const DOUBLE: Job<u64, u64> = Job::new("double");
///
/// let pool = Pool::builder(&registry).max(4).build().await?;
/// let four = pool.call(&DOUBLE, 2).await?;
/// assert_eq!(four, 4);
/// pool.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

/// Owned by the user's handles only; its drop tells every task to wind down.
struct PoolInner {
    shared: Arc<Shared>,
    closing: watch::Sender<bool>,
}

/// What the pool's tasks share.
pub(crate) struct Shared {
    config: PoolConfig,
    manifest: Manifest,
    backend: Arc<dyn Backend>,
    ca: PoolCa,
    listener: Listener,
    parent_addrs: Vec<String>,
    state: Mutex<State>,
    tasks: TaskTracker,
    closing: watch::Receiver<bool>,
    runner_counts: watch::Sender<PoolStats>,
    calls_drained: Notify,
    /// Mirrors `State::closed` for the call path, which then needs no lock to refuse a call.
    closed: std::sync::atomic::AtomicBool,
    /// This value's own `Arc`, for grants made where only `&self` is at hand.
    me: std::sync::Weak<Shared>,
}

impl Shared {
    fn runner_settings(&self, min: bool) -> crate::token::RunnerSettings {
        self.config.runner_settings(min)
    }
}

impl Pool {
    /// A builder for a pool whose runners serve `registry`'s jobs. Runners must be built with
    /// the same registry: one that differs is refused when it connects.
    pub fn builder(registry: &Registry) -> PoolBuilder {
        PoolBuilder::new(registry.manifest())
    }

    async fn start(
        config: PoolConfig,
        manifest: Manifest,
        backend: Arc<dyn Backend>,
    ) -> Result<Pool, PoolError> {
        let ca = PoolCa::generate(&config.name)?;
        let server = ca.issue_server()?;
        let crypto = tls::server_crypto(ca.cert(), &server)?;
        // Runners open one control stream each; calls go the other way.
        let transport = transport::transport_config(config.peer_timeout, config.keep_alive, 1);
        let bind = config.bind.unwrap_or_else(|| backend.bind_addr());
        let endpoint = transport::server_endpoint(bind, crypto, transport)
            .map_err(|source| PoolError::Bind { addr: bind, source })?;
        let listener = Listener::start(endpoint, Arc::new(manifest.clone()));
        let bound = listener
            .local_addr()
            .map_err(|source| PoolError::Bind { addr: bind, source })?;
        let parent_addrs = backend.parent_addrs(bound);
        tracing::info!(pool = %config.name, %bound, "pool listening");
        let (closing_tx, closing) = watch::channel(false);
        let shared = Arc::new_cyclic(|me| Shared {
            config,
            manifest,
            backend,
            ca,
            listener,
            parent_addrs,
            state: Mutex::new(State::default()),
            tasks: TaskTracker::new(),
            closing,
            runner_counts: watch::channel(PoolStats::default()).0,
            calls_drained: Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            me: me.clone(),
        });
        let pool = Pool {
            inner: Arc::new(PoolInner {
                shared: Arc::clone(&shared),
                closing: closing_tx,
            }),
        };
        pool.await_min().await?;
        Ok(pool)
    }

    /// Boots the `min` runners and waits until they are ready, or one fails.
    async fn await_min(&self) -> Result<(), PoolError> {
        let shared = &self.inner.shared;
        let min = shared.config.min;
        if min == 0 {
            return Ok(());
        }
        let mut counts = shared.runner_counts.subscribe();
        shared.grow();
        // Never lock the state while borrowing the watch: `publish` takes them the other way.
        let failed = loop {
            let ready = counts.borrow_and_update().ready;
            if ready >= min {
                return Ok(());
            }
            if let Some(error) = shared.state.lock().last_boot_error() {
                break error;
            }
            if counts.changed().await.is_err() {
                break Arc::new(BootError::PoolClosed);
            }
        };
        self.shutdown().await;
        Err(PoolError::Boot(failed))
    }

    /// Calls `job` with `args` on a runner and returns its result. Await the returned [`Call`],
    /// or set per-call options on it first.
    ///
    /// Dropping the future cancels the call: the job is aborted on its runner.
    pub fn call<A: Payload, R: Payload>(&self, job: &Job<A, R>, args: A) -> Call<A, R> {
        let config = &self.inner.shared.config;
        Call {
            shared: Arc::clone(&self.inner.shared),
            job: *job,
            args: Some(args),
            timeout: config.call_timeout,
            queue_timeout: config.queue_timeout,
            retry: Retry {
                idempotent: job.is_idempotent(),
                retries: job.default_retries(),
                job_errors: false,
            },
            running: None,
        }
    }

    /// Calls `job` in the background, discarding its result; failures are logged.
    ///
    /// # Errors
    /// Only what is known at once: [`CallError::UnknownJob`], [`CallError::Encode`],
    /// [`CallError::Closed`].
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn cast<A: Payload, R: Payload>(&self, job: &Job<A, R>, args: A) -> Result<(), CallError> {
        let mut call = self.call(job, args);
        let prepared = call.prepare()?;
        let shared = Arc::clone(&call.shared);
        let name = job.name();
        self.inner.shared.tasks.spawn(async move {
            if let Err(error) = prepared.run(&shared).await {
                tracing::warn!(job = name, %error, "cast failed");
            }
        });
        Ok(())
    }

    /// The pool's runners and calls now.
    #[must_use]
    pub fn stats(&self) -> PoolStats {
        self.inner.shared.state.lock().stats()
    }

    /// A receiver that sees the runner counts of [`PoolStats`] change: runners booting, ready
    /// and draining. Call counts in it are as of the last runner change.
    #[must_use]
    pub fn watch_runners(&self) -> watch::Receiver<PoolStats> {
        self.inner.shared.runner_counts.subscribe()
    }

    /// Stops taking calls, lets running calls finish for at most the drain grace, then releases
    /// every runner and waits until every machine is terminated.
    pub async fn shutdown(&self) {
        let shared = &self.inner.shared;
        let drained = shared.calls_drained.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();
        let busy = {
            let mut state = shared.state.lock();
            state.closed = true;
            shared
                .closed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            state.fail_waiters(&CallError::Closed);
            state.stats().in_flight > 0
        };
        if busy
            && tokio::time::timeout(shared.config.drain_grace, drained)
                .await
                .is_err()
        {
            tracing::warn!("drain grace over; abandoning running calls");
        }
        self.inner.closing.send_replace(true);
        shared.tasks.close();
        shared.tasks.wait().await;
        shared.listener.close();
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock();
        state.closed = true;
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        state.fail_waiters(&CallError::Closed);
        // Releasing the runners now lets them exit cleanly; the tasks then terminate the
        // machines. If the runtime is going away too, dropping the machines kills them.
        for handle in state.handles() {
            handle.connection.close(wire::close::DONE, b"pool dropped");
        }
        drop(state);
        self.closing.send_replace(true);
    }
}

/// A call: a future of the job's result. Set per-call options before awaiting it.
///
/// ```no_run
/// # async fn f(pool: firebrand::Pool) -> Result<(), firebrand::CallError> {
/// # const JOB: firebrand::Job<u32, u32> = firebrand::Job::new("job");
/// use std::time::Duration;
///
/// let out = pool.call(&JOB, 7).timeout(Duration::from_secs(5)).await?;
/// let all = futures_util::future::try_join_all((0..4).map(|n| pool.call(&JOB, n))).await?;
/// # Ok(()) }
/// ```
#[must_use = "a call does nothing unless awaited"]
pub struct Call<A, R> {
    shared: Arc<Shared>,
    job: Job<A, R>,
    args: Option<A>,
    timeout: Option<Duration>,
    queue_timeout: Duration,
    retry: Retry,
    running: Option<futures_util::future::BoxFuture<'static, Result<R, CallError>>>,
}

/// A call's retry settings.
#[derive(Debug, Clone, Copy)]
struct Retry {
    idempotent: bool,
    retries: u32,
    job_errors: bool,
}

impl Retry {
    /// Whether another attempt may fix `error`.
    fn covers(&self, error: &CallError) -> bool {
        match error {
            CallError::RunnerLost { .. } | CallError::BootFailed(_) => true,
            CallError::Failed { .. } | CallError::Panicked { .. } | CallError::Timeout { .. } => {
                self.job_errors
            }
            _ => false,
        }
    }

    /// The waits before each retry: exponential from 100 ms, doubling up to 5 s, with jitter.
    fn delays(&self) -> impl Iterator<Item = Duration> {
        use backon::BackoffBuilder as _;
        backon::ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.retries as usize)
            .build()
    }
}

// `Call` never pins its argument: it is moved out, encoded, on the first poll.
impl<A, R> Unpin for Call<A, R> {}

impl<A: Payload, R: Payload> Call<A, R> {
    /// The execution deadline for this call; `None` for none. Default: the pool's
    /// [`timeout`](PoolBuilder::timeout).
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.timeout = timeout.into();
        self
    }

    /// How long this call may wait for a slot. Default: the pool's
    /// [`queue_timeout`](PoolBuilder::queue_timeout).
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = timeout;
        self
    }

    /// Marks this call safe to run more than once, which [`retries`](Call::retries) requires.
    pub fn idempotent(mut self) -> Self {
        self.retry.idempotent = true;
        self
    }

    /// Retries this call up to `retries` times when its runner is lost or no runner boots, with
    /// exponential backoff (100 ms doubling to 5 s) and jitter. Default: the job's
    /// [`default_retries`](Job::default_retries). Needs an idempotent call; otherwise the call
    /// fails with [`CallError::NotIdempotent`]. When more than one attempt was made, the error is
    /// [`CallError::Attempts`] with every attempt's cause.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retry.retries = retries;
        self
    }

    /// Also retries the job's own failures: an error, a panic, an execution timeout.
    pub fn retry_job_errors(mut self) -> Self {
        self.retry.job_errors = true;
        self
    }

    fn prepare(&mut self) -> Result<Prepared<R>, CallError> {
        let name = self.job.name();
        let args = self.args.take().ok_or(CallError::Protocol {
            message: "call polled after completion".into(),
        })?;
        if self
            .shared
            .closed
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(CallError::Closed);
        }
        if !self.shared.manifest.contains(name) {
            return Err(CallError::UnknownJob { job: name.into() });
        }
        if self.retry.retries > 0 && !self.retry.idempotent {
            return Err(CallError::NotIdempotent { job: name.into() });
        }
        let timeout_ms = self.timeout.map_or(0, |t| {
            u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        let request =
            wire::encode_request(name, timeout_ms, &args).map_err(|e| CallError::Encode {
                message: e.to_string(),
            })?;
        Ok(Prepared {
            job: name,
            request,
            timeout: self.timeout,
            queue_timeout: self.queue_timeout,
            retry: self.retry,
            output: std::marker::PhantomData,
        })
    }
}

/// An encoded call, ready to place.
struct Prepared<R> {
    job: &'static str,
    // Handed to quinn as is: its send buffer takes the chunks without copying them.
    request: smallvec::SmallVec<[bytes::Bytes; 2]>,
    timeout: Option<Duration>,
    queue_timeout: Duration,
    retry: Retry,
    output: std::marker::PhantomData<fn() -> R>,
}

impl<R: Payload> Prepared<R> {
    async fn run(mut self, shared: &Arc<Shared>) -> Result<R, CallError> {
        if self.retry.retries == 0 {
            let request = std::mem::take(&mut self.request);
            return self.attempt(shared, request).await;
        }
        let mut delays = self.retry.delays();
        let mut failures = Vec::new();
        loop {
            let error = match self.attempt(shared, self.request.clone()).await {
                Ok(output) => return Ok(output),
                Err(error) => error,
            };
            let next = if self.retry.covers(&error) {
                delays.next()
            } else {
                None
            };
            failures.push(error);
            match next {
                Some(delay) => {
                    tracing::debug!(job = self.job, attempt = failures.len(), ?delay, error = %failures[failures.len() - 1], "retrying");
                    tokio::time::sleep(delay).await;
                }
                None if failures.len() == 1 => return Err(failures.remove(0)),
                None => return Err(CallError::Attempts { attempts: failures }),
            }
        }
    }

    async fn attempt(
        &self,
        shared: &Arc<Shared>,
        request: smallvec::SmallVec<[bytes::Bytes; 2]>,
    ) -> Result<R, CallError> {
        let lease = shared.acquire(self.queue_timeout).await?;
        let runner = lease.runner();
        let span = tracing::debug_span!("call", job = self.job, runner = %runner.id);
        let reply = runner.call(request, self.timeout).instrument(span).await;
        drop(lease);
        reply?.decode().map_err(|e| CallError::Decode {
            message: e.to_string(),
        })
    }
}

impl<A: Payload, R: Payload> Future for Call<A, R> {
    type Output = Result<R, CallError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.running.is_none() {
            let prepared = this.prepare();
            let shared = Arc::clone(&this.shared);
            this.running = Some(Box::pin(async move { prepared?.run(&shared).await }));
        }
        this.running.as_mut().expect("set above").as_mut().poll(cx)
    }
}
