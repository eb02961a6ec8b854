//! Resource handles: something a job made on a runner, kept there while the parent holds it.

use std::future::IntoFuture;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sync_wrapper::SyncWrapper;

use super::call::{check_callable, encode, exchange, place, Options, Placed, Running};
use super::deadline::Deadline;
use super::driver::Lease;
use super::handle::RunnerHandle;
use super::observe::CallOutcome;
use super::{Pool, Shared};
use crate::error::{CallError, DeadlinePhase, RemoteError, RunnerId};
use crate::job::{JobError, Payload, ResourceJob, UsingJob};
use crate::trace::TraceId;
use crate::wire;

/// How long a release may take before the slot is freed anyway.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// A handle to a `T` that a [`ResourceJob`] made on one runner (FLAME's `track_resources`).
///
/// While the handle lives, the resource stays on its runner, the runner stays up, and the
/// handle holds one of the runner's slots. [`call`](Resource::call) runs a
/// [`UsingJob`](crate::UsingJob) of `T` (a [`#[job]`](crate::job) whose first parameter is `&T`)
/// on that runner, with the resource. Dropping the handle releases the resource and the slot.
///
/// ```no_run
/// # async fn f(pool: firebrand::Pool) -> Result<(), firebrand::CallError> {
/// # struct Model;
/// # const LOAD: firebrand::ResourceJob<String, Model> = firebrand::ResourceJob::new("load");
/// # const INFER: firebrand::UsingJob<Model, String, String> = firebrand::UsingJob::new("infer");
/// let model = pool.resource(&LOAD, "llama-8b".into()).await?;
/// let answer = model.call(&INFER, "Why is the sky blue?".into()).await?;
/// drop(model); // unloaded on the runner
/// # Ok(()) }
/// ```
#[must_use = "dropping a Resource releases it at once"]
pub struct Resource<T> {
    id: u64,
    runner: Arc<RunnerHandle>,
    shared: Arc<Shared>,
    lease: Option<Lease<Arc<Shared>>>,
    kind: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Resource<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource")
            .field("id", &self.id)
            .field("runner", &self.runner.id)
            .field("kind", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Runs the resource `job` on a runner; awaiting the [`MakeResource`] gives a handle to
    /// what it made there. It takes the same options as a [`Call`](crate::Call).
    pub fn resource<A: Payload, T>(&self, job: &ResourceJob<A, T>, args: A) -> MakeResource<A, T> {
        let shared = Arc::clone(&self.inner.shared);
        MakeResource {
            options: Options::of(&shared),
            shared,
            job: job.name(),
            args: SyncWrapper::new(args),
            kind: PhantomData,
        }
    }
}

/// A resource job about to run, from [`Pool::resource`]: set its options, then `.await` it.
#[must_use = "a resource is made only when awaited"]
pub struct MakeResource<A, T> {
    shared: Arc<Shared>,
    job: &'static str,
    // Wrapped so that this is `Sync` whatever `A` is: it is only moved, never shared.
    args: SyncWrapper<A>,
    options: Options,
    kind: PhantomData<fn() -> T>,
}

impl<A, T> std::fmt::Debug for MakeResource<A, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MakeResource")
            .field("job", &self.job)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<A: Payload, T: 'static> MakeResource<A, T> {
    /// The execution deadline for the job that makes the resource; `None` for none. Default:
    /// the pool's [`timeout`](crate::PoolBuilder::timeout).
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.options.timeout = timeout.into();
        self
    }

    /// How long it may wait for a slot. Default: the pool's
    /// [`queue_timeout`](crate::PoolBuilder::queue_timeout).
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.options.queue_timeout = timeout;
        self
    }

    /// One bound on the whole wait for the resource: queue, boot and the job that makes it,
    /// as [`Call::deadline`](crate::Call::deadline). Default: the pool's
    /// [`deadline`](crate::PoolBuilder::deadline).
    pub fn deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        self.options.deadline = deadline.into();
        self
    }

    /// The trace id the runner's log lines for the job carry. Default: a new one.
    pub fn trace_id(mut self, id: TraceId) -> Self {
        self.options.trace_id = Some(id);
        self
    }

    async fn make(self) -> Result<Resource<T>, CallError> {
        let Self {
            shared,
            job: name,
            args,
            options,
            ..
        } = self;
        check_callable(&shared, name)?;
        let deadline = Deadline::after(options.deadline);
        let deadline = deadline.as_ref();
        let request = encode(
            &shared,
            name,
            options.timeout,
            options.trace_id(),
            0,
            &args.into_inner(),
        )?;
        let Placed {
            lease,
            mut stream,
            queued_for,
        } = place(&shared, name, options.queue_timeout, deadline, &request).await?;
        let lease = lease.into_owned(Arc::clone(&shared));
        let runner = Arc::clone(lease.runner());
        let mut running = Running::start(&*shared, name, runner.id, queued_for);
        let started = running.started;
        let made = Deadline::bound(
            deadline,
            runner.resource_reply(&mut stream, options.timeout),
            || DeadlinePhase::Running {
                runner: runner.id,
                ran_for: started.elapsed(),
            },
        )
        .await;
        running.outcome = CallOutcome::of(&made.as_ref().map(|_| ()));
        drop(running);
        let id = made?;
        shared.drive(|state| state.scheduler.pin(runner.id, true));
        tracing::debug!(resource = id, runner = %runner.id, job = name, "resource made");
        let resource = Resource {
            id,
            runner,
            shared,
            lease: Some(lease),
            kind: PhantomData,
        };
        // Only now, with a handle that releases it on drop: from here on nothing can cancel
        // between the runner keeping the resource and the parent holding it.
        stream.claim();
        Ok(resource)
    }
}

impl<A: Payload, T: 'static> IntoFuture for MakeResource<A, T> {
    type Output = Result<Resource<T>, CallError>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    /// # Errors
    /// As for a call: the job's own error, a lost runner, a full queue.
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.make())
    }
}

impl<T> Resource<T> {
    /// Calls `job` on the resource's runner, with the resource; set the call's options, then
    /// `.await` it. The call does not queue for a pool slot (the handle holds one); the
    /// runner's own concurrency limit applies.
    pub fn call<A: Payload, R: Payload, E: JobError>(
        &self,
        job: &UsingJob<T, A, R, E>,
        args: A,
    ) -> ResourceCall<'_, A, R, E> {
        ResourceCall {
            resource_id: self.id,
            runner: &self.runner,
            shared: &self.shared,
            job: job.name(),
            args: SyncWrapper::new(args),
            options: Options::of(&self.shared).with(job.job().defaults()),
            output: PhantomData,
        }
    }

    /// The runner that holds the resource.
    pub fn runner(&self) -> RunnerId {
        self.runner.id
    }
}

impl<T> Drop for Resource<T> {
    fn drop(&mut self) {
        let (runner, lease, id) = (Arc::clone(&self.runner), self.lease.take(), self.id);
        let Ok(request) = wire::encode_request(wire::RELEASE_JOB, 0, 0, id, &(), usize::MAX) else {
            return;
        };
        self.shared
            .drive(|state| state.scheduler.pin(runner.id, false));
        if tokio::runtime::Handle::try_current().is_err() {
            // No runtime to send a release on: the runner drops the resource with its
            // connection, when the pool ends.
            return;
        }
        // The slot stays taken until the runner has let go of the resource.
        self.shared.tasks.spawn(async move {
            if let Err(error) = runner.call(request, Some(RELEASE_TIMEOUT)).await {
                tracing::debug!(resource = id, %error, "releasing a resource failed");
            }
            drop(lease);
        });
    }
}

/// A call on a resource, from [`Resource::call`]: set its options, then `.await` it.
#[must_use = "a call does nothing unless awaited"]
pub struct ResourceCall<'a, A, R, E = RemoteError> {
    resource_id: u64,
    runner: &'a Arc<RunnerHandle>,
    shared: &'a Arc<Shared>,
    job: &'static str,
    // Wrapped so that this is `Sync` whatever `A` is: it is only moved, never shared.
    args: SyncWrapper<A>,
    options: Options,
    output: PhantomData<fn() -> (R, E)>,
}

impl<A, R, E> std::fmt::Debug for ResourceCall<'_, A, R, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceCall")
            .field("job", &self.job)
            .field("resource", &self.resource_id)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<'a, A: Payload, R: Payload, E: JobError> ResourceCall<'a, A, R, E> {
    /// The execution deadline; `None` for none. Default: the job's, else the pool's
    /// [`timeout`](crate::PoolBuilder::timeout).
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.options.timeout = timeout.into();
        self
    }

    /// One bound on the call's whole wait, sending and the job's run, as
    /// [`Call::deadline`](crate::Call::deadline) (a call on a resource never queues: the
    /// resource holds its slot). Default: the pool's [`deadline`](crate::PoolBuilder::deadline).
    pub fn deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        self.options.deadline = deadline.into();
        self
    }

    /// The trace id the runner's log lines for the call carry. Default: a new one.
    pub fn trace_id(mut self, id: TraceId) -> Self {
        self.options.trace_id = Some(id);
        self
    }

    async fn run(self) -> Result<R, CallError> {
        let name = self.job;
        check_callable(self.shared, name)?;
        let deadline = Deadline::after(self.options.deadline);
        let deadline = deadline.as_ref();
        let request = encode(
            self.shared,
            name,
            self.options.timeout,
            self.options.trace_id(),
            self.resource_id,
            &self.args.into_inner(),
        )?;
        // No placement: the resource lives on this runner, and the handle holds its slot.
        let runner = self.runner;
        let opened = async { runner.open(request).await.map_err(|e| runner.wire_error(e)) };
        let stream = Deadline::bound(deadline, opened, || DeadlinePhase::Sending).await?;
        exchange(
            self.shared,
            &**runner,
            stream,
            name,
            Duration::ZERO,
            self.options.timeout,
            deadline,
        )
        .await
    }
}

impl<'a, A: Payload, R: Payload, E: JobError> IntoFuture for ResourceCall<'a, A, R, E> {
    type Output = Result<R, CallError<E>>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    /// # Errors
    /// As for [`Pool::call`].
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.run().await.map_err(CallError::typed) })
    }
}
