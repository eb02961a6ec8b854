//! Spawned jobs: long-running work on a runner, behind a handle.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::{CallError, RemoteError};

/// A job running on a runner in the background, from [`Call::spawn`](super::Call::spawn).
///
/// Await it for the result, [`abort`](RemoteTask::abort) it, or [`detach`](RemoteTask::detach)
/// it. While it runs it holds one of its runner's slots, so the runner does not idle down.
/// **Dropping the handle aborts the task** (the job is cancelled on the runner) unless it was
/// detached.
///
/// ```no_run
/// # async fn f(pool: firebrand::Pool) -> Result<(), firebrand::CallError> {
/// # const TRAIN: firebrand::Job<u32, f64> = firebrand::Job::new("train");
/// let training = pool.call(&TRAIN, 10).spawn();
/// // ... other work ...
/// let loss = training.await?;
/// # Ok(()) }
/// ```
#[must_use = "dropping a RemoteTask aborts it; call `.detach()` to let it run"]
pub struct RemoteTask<R, E = RemoteError> {
    handle: tokio::task::JoinHandle<Result<R, CallError<E>>>,
    detached: bool,
}

impl<R, E> std::fmt::Debug for RemoteTask<R, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTask")
            .field("finished", &self.handle.is_finished())
            .field("detached", &self.detached)
            .finish()
    }
}

impl<R, E> RemoteTask<R, E> {
    pub(super) fn new(handle: tokio::task::JoinHandle<Result<R, CallError<E>>>) -> Self {
        Self {
            handle,
            detached: false,
        }
    }

    /// Cancels the job on its runner. Awaiting the task then gives [`CallError::Aborted`],
    /// unless it had already finished.
    pub fn abort(&self) {
        self.handle.abort();
    }

    /// Lets the task run to its end with nobody awaiting it; its result is dropped. It keeps
    /// its runner up until it ends, or until the parent is lost and the runner's drain grace
    /// passes.
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// Whether the task has ended.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

impl<R, E> Future for RemoteTask<R, E> {
    type Output = Result<R, CallError<E>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.handle)
            .poll(cx)
            .map(|joined| match joined {
                Ok(result) => result,
                Err(error) if error.is_cancelled() => Err(CallError::Aborted),
                Err(error) => Err(CallError::Protocol {
                    message: format!("the task driving the call panicked: {error}"),
                }),
            })
    }
}

impl<R, E> Drop for RemoteTask<R, E> {
    fn drop(&mut self) {
        if !self.detached {
            self.handle.abort();
        }
    }
}
