//! The pool: places calls on runners, queues them, and grows and shrinks.

mod boot;
mod builder;
mod call;
mod deadline;
mod driver;
mod handle;
mod hooks;
mod listener;
mod map;
mod observe;
pub(crate) mod placement;
mod resize;
mod resource;
mod stream;
mod task;

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio_util::task::TaskTracker;

pub use builder::{Placement, PoolBuilder};
pub use call::Call;
pub use hooks::{GrowEnd, GrowStart, Shrink};
pub use map::{Map, Progress};
pub use observe::{CallOutcome, PoolEvent};
pub use resize::Limits;
pub use resource::{MakeResource, Resource, ResourceCall};
pub use stream::RemoteStream;
pub use task::RemoteTask;

use crate::backend::{Backend, ParkedSet, Parking, PoolKey};
use crate::error::{BootError, PoolError};
use crate::job::{Job, JobError, Payload, StreamJob};
use crate::manifest::Manifest;
use crate::tls::{self, PoolCa};
use crate::{transport, wire};
use builder::PoolConfig;
use driver::State;
use listener::Listener;
use placement::{Rules, Scheduler};

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
    /// Idle runners' machines parked by the backend, to be claimed by later boots: see
    /// [`Backend::parked_set`](crate::Backend::parked_set).
    pub parked: usize,
    /// The `min` runners idled out (`min_idle_shutdown_after`) and are not replaced until the
    /// next call: a pool idle by choice, not one failing to boot.
    pub min_lapsed: bool,
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
/// let pool = Pool::builder().registry(&registry).max(4).build().await?;
/// let four = pool.call(&DOUBLE, 2).await?;
/// assert_eq!(four, 4);
/// pool.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = &self.inner.shared;
        let state = shared.state.lock();
        f.debug_struct("Pool")
            .field("name", &shared.config.name)
            .field("limits", &state.scheduler.limits())
            .field("stats", &state.scheduler.stats())
            .finish_non_exhaustive()
    }
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
    observer: observe::Observer,
    /// Mirrors `State::closed` for the call path, which then needs no lock to refuse a call.
    closed: std::sync::atomic::AtomicBool,
    /// This value's own `Arc`, for grants made where only `&self` is at hand.
    me: std::sync::Weak<Shared>,
    /// The start of the pool's clock, which placement reads as time since then.
    clock: tokio::time::Instant,
    /// This pool among those that park machines on one backend.
    pool_key: PoolKey,
    /// How the backend parks idle runners' machines, if it does.
    parking: Option<Parking>,
    /// The machines it parked, if it parks.
    parked_set: Option<Arc<dyn ParkedSet>>,
}

impl Pool {
    /// A builder for a pool whose runners serve every [`#[job]`](crate::job) linked into the
    /// binary; [`registry`](PoolBuilder::registry) gives it a [`Registry`](crate::Registry) built at run time
    /// instead.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::new()
    }

    async fn start(
        config: PoolConfig,
        manifest: Manifest,
        backend: Arc<dyn Backend>,
    ) -> Result<Pool, PoolError> {
        backend.start().await;
        let ca = PoolCa::generate(&config.name)?;
        let server = ca.issue_server()?;
        let crypto = tls::server_crypto(ca.cert(), &server)?;
        // Runners open one control stream each; calls go the other way.
        let transport = transport::transport_config(
            config.peer_timeout,
            config.keep_alive,
            1,
            config.congestion,
        );
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
        let limits = resize::cap(
            resize::Limits {
                min: config.min,
                max: config.max,
                max_concurrency: config.max_concurrency,
            },
            backend.max_runners(),
        )?;
        let observer = observe::Observer::new(&config.name);
        let parked_set = backend.parked_set();
        let parking = parked_set.as_ref().map(|set| set.parking());
        let rules = Rules {
            placement: config.placement,
            single_use: config.single_use,
            prewarm_at: config.prewarm_at,
            max_queued: config.max_queued,
            boot_attempts: config.boot_attempts,
            boot_retry_after: config.boot_retry_after,
            parks: parked_set.is_some(),
        };
        let shared = Arc::new_cyclic(|me| Shared {
            config,
            manifest,
            backend,
            ca,
            listener,
            parent_addrs,
            state: Mutex::new(State::new(Scheduler::new(rules, limits))),
            tasks: TaskTracker::new(),
            closing,
            runner_counts: watch::channel(PoolStats::default()).0,
            calls_drained: Notify::new(),
            observer,
            closed: std::sync::atomic::AtomicBool::new(false),
            me: me.clone(),
            clock: tokio::time::Instant::now(),
            pool_key: PoolKey(uuid::Uuid::new_v4().as_u128()),
            parking,
            parked_set,
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
        let min = shared.state.lock().scheduler.limits().min;
        if min == 0 {
            return Ok(());
        }
        let mut counts = shared.runner_counts.subscribe();
        shared.drive(|state| state.scheduler.grow());
        // Never lock the state while borrowing the watch: `publish` takes them the other way.
        let failed = loop {
            let ready = counts.borrow_and_update().ready;
            if ready >= min {
                return Ok(());
            }
            if let Some(error) = shared.state.lock().scheduler.last_boot_error() {
                break error;
            }
            if counts.changed().await.is_err() {
                break Arc::new(BootError::PoolClosed);
            }
        };
        self.shutdown().await;
        Err(PoolError::Boot(failed))
    }

    /// Calls `job` with `args` on a runner. The [`Call`] takes per-call options (timeout, queue
    /// timeout, retries, trace id), then ends in one of three ways:
    ///
    /// - `.await` for the result; dropping the future cancels the call, aborting the job on its
    ///   runner;
    /// - [`.spawn()`](Call::spawn) for a [`RemoteTask`] to await, abort or detach;
    /// - [`.cast()`](Call::cast) to fire and forget, with failures logged.
    ///
    /// ```no_run
    /// # async fn f(pool: firebrand::Pool) -> Result<(), firebrand::CallError> {
    /// # const JOB: firebrand::Job<u32, u32> = firebrand::Job::new("job");
    /// use std::time::Duration;
    ///
    /// let out = pool.call(&JOB, 1).timeout(Duration::from_secs(5)).await?;
    /// let task = pool.call(&JOB, 2).spawn();
    /// pool.call(&JOB, 3).cast()?;
    /// # Ok(()) }
    /// ```
    pub fn call<A: Payload, R: Payload, E: JobError>(
        &self,
        job: &Job<A, R, E>,
        args: A,
    ) -> Call<A, R, E> {
        Call::new(Arc::clone(&self.inner.shared), job, args)
    }

    /// Starts the streaming `job` and returns its items as a [`RemoteStream`], with
    /// backpressure: the runner produces only as fast as the stream is read. Dropping the
    /// stream cancels the job. It takes the same options as a [`Call`]: a timeout (the pool's
    /// by default) bounds the whole stream.
    pub fn stream<A: Payload, T: Payload>(
        &self,
        job: &StreamJob<A, T>,
        args: A,
    ) -> RemoteStream<T> {
        stream::start(Arc::clone(&self.inner.shared), job, args)
    }

    /// Runs `job` over every input, a bounded number at a time, and yields each result with
    /// its input's index: in input order by default. See [`Map`] for the options.
    ///
    /// ```no_run
    /// # async fn f(pool: firebrand::Pool) -> Result<(), firebrand::CallError> {
    /// # const SQUARE: firebrand::Job<u64, u64> = firebrand::Job::new("square");
    /// let squares: Vec<u64> = pool.map(&SQUARE, 0..10_000).outputs().await?;
    /// # Ok(()) }
    /// ```
    pub fn map<A: Payload, R: Payload, E: JobError, I>(
        &self,
        job: &Job<A, R, E>,
        inputs: I,
    ) -> Map<A, R, E>
    where
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'static,
    {
        Map::new(self.clone(), *job, futures_util::stream::iter(inputs))
    }

    /// [`map`](Pool::map) over a stream of inputs, read as slots come free.
    pub fn map_stream<A: Payload, R: Payload, E: JobError, S>(
        &self,
        job: &Job<A, R, E>,
        inputs: S,
    ) -> Map<A, R, E>
    where
        S: futures_util::Stream<Item = A> + Send + 'static,
    {
        Map::new(self.clone(), *job, inputs)
    }

    /// A stream of the pool's lifecycle events: runners booting, up, lost and stopped; calls
    /// queued, started and finished. Events from before the call are not seen. A listener that
    /// falls more than 4096 events behind gets [`PoolEvent::Lagged`].
    ///
    /// ```no_run
    /// # async fn f(pool: firebrand::Pool) {
    /// use futures_util::StreamExt as _;
    ///
    /// let mut events = pool.events();
    /// while let Some(event) = events.next().await {
    ///     println!("{event:?}");
    /// }
    /// # }
    /// ```
    pub fn events(&self) -> futures_util::stream::BoxStream<'static, PoolEvent> {
        self.inner.shared.observer.subscribe()
    }

    /// How many calls the pool can run at once when fully grown: `max × max_concurrency`.
    pub(crate) fn slots(&self) -> usize {
        let limits = self.limits();
        limits.max.saturating_mul(limits.max_concurrency as usize)
    }

    /// The pool's runners and calls now.
    #[must_use]
    pub fn stats(&self) -> PoolStats {
        let shared = &self.inner.shared;
        let stats = shared.state.lock().scheduler.stats();
        shared.with_parked(stats)
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
        let busy = shared.close();
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
        shared.destroy_parked().await;
        shared.backend.shutdown().await;
        shared.listener.close();
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        self.shared.close();
        // Releasing the runners now lets them exit cleanly; the tasks then terminate the
        // machines. If the runtime is going away too, dropping the machines kills them.
        let handles: Vec<_> = self
            .shared
            .state
            .lock()
            .scheduler
            .handles()
            .cloned()
            .collect();
        for handle in handles {
            handle.connection.close(wire::close::DONE, b"pool dropped");
        }
        // No shutdown to wait for them: the parked machines are destroyed in the background.
        if let (Some(set), Ok(runtime)) = (
            self.shared.parked_set.clone(),
            tokio::runtime::Handle::try_current(),
        ) {
            let pool = self.shared.pool_key;
            runtime.spawn(async move { set.release(pool).await });
        }
        self.closing.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_and_sync<T: Send + Sync>() {}

    #[test]
    fn work_shapes_are_send_and_sync_whatever_their_payloads() {
        // `Cell` is `Send` but not `Sync`: the shapes must not depend on their payloads' `Sync`.
        type NotSync = std::cell::Cell<u8>;
        send_and_sync::<Call<NotSync, NotSync>>();
        send_and_sync::<Map<NotSync, NotSync>>();
        send_and_sync::<RemoteStream<NotSync>>();
        send_and_sync::<Pool>();
        send_and_sync::<PoolBuilder>();
    }
}
