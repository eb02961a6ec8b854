//! Resource handles: something a job made on a runner, kept there while the parent holds it.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use super::call::{encode, exchange, place, Placed, Running};
use super::driver::Lease;
use super::handle::RunnerHandle;
use super::observe::CallOutcome;
use super::{Pool, Shared};
use crate::error::{CallError, RunnerId};
use crate::job::{Job, Payload, ResourceJob};
use crate::trace::TraceId;
use crate::wire;

/// How long a release may take before the slot is freed anyway.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// A handle to a `T` that a [`ResourceJob`] made on one runner (FLAME's `track_resources`).
///
/// While the handle lives, the resource stays on its runner, the runner stays up, and the
/// handle holds one of the runner's slots. [`call`](Resource::call) runs jobs registered with
/// [`Registry::register_using`](crate::Registry::register_using) on that runner, with the
/// resource. Dropping the handle releases the resource and the slot.
///
/// ```no_run
/// # async fn f(pool: firebrand::Pool) -> Result<(), firebrand::CallError> {
/// # struct Model;
/// # const LOAD: firebrand::ResourceJob<String, Model> = firebrand::ResourceJob::new("load");
/// # const INFER: firebrand::Job<String, String> = firebrand::Job::new("infer");
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
    /// Runs the resource `job` on a runner and returns a handle to what it made there.
    ///
    /// # Errors
    /// As for a call: the job's own error, a lost runner, a full queue.
    pub async fn resource<A: Payload, T>(
        &self,
        job: &ResourceJob<A, T>,
        args: A,
    ) -> Result<Resource<T>, CallError> {
        let shared = Arc::clone(&self.inner.shared);
        let name = job.name();
        if !shared.manifest.contains(name) {
            return Err(CallError::UnknownJob { job: name.into() });
        }
        let request = encode(
            &shared,
            name,
            shared.config.call_timeout,
            TraceId::next(),
            0,
            &args,
        )?;
        let Placed {
            lease,
            mut stream,
            queued_for,
        } = place(&shared, name, shared.config.queue_timeout, &request).await?;
        let lease = lease.into_owned(Arc::clone(&shared));
        let runner = Arc::clone(lease.runner());
        let mut running = Running::start(&*shared, name, runner.id, queued_for);
        let made = runner
            .resource_reply(&mut stream, shared.config.call_timeout)
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

impl<T> Resource<T> {
    /// Calls `job` on the resource's runner, with the resource. The call does not queue for a
    /// pool slot (the handle holds one); the runner's own concurrency limit applies.
    ///
    /// # Errors
    /// As for [`Pool::call`].
    pub async fn call<A: Payload, R: Payload>(
        &self,
        job: &Job<A, R>,
        args: A,
    ) -> Result<R, CallError> {
        let name = job.name();
        if !self.shared.manifest.contains(name) {
            return Err(CallError::UnknownJob { job: name.into() });
        }
        let request = encode(
            &self.shared,
            name,
            self.shared.config.call_timeout,
            TraceId::next(),
            self.id,
            &args,
        )?;
        let timeout = self.shared.config.call_timeout;
        // No placement: the resource lives on this runner, and the handle holds its slot.
        let runner = &self.runner;
        let stream = runner
            .open(request)
            .await
            .map_err(|e| runner.wire_error(e))?;
        exchange(
            &self.shared,
            &**runner,
            stream,
            name,
            Duration::ZERO,
            timeout,
        )
        .await
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
