//! `map`: one job over many inputs, a bounded number in flight.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::stream::{BoxStream, Stream, StreamExt as _};
use std::time::Duration;

use sync_wrapper::SyncWrapper;

use super::Pool;
use crate::error::{CallError, RemoteError};
use crate::job::{Job, JobError, Payload};

/// How far a [`Map`] has got, passed to its [`on_progress`](Map::on_progress) hook after each
/// result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Results so far, failures included.
    pub done: usize,
    /// Failures so far.
    pub failed: usize,
    /// How many inputs there are, when the input iterator says exactly.
    pub total: Option<usize>,
}

type Hook = Box<dyn FnMut(Progress) + Send>;

/// The results of a running map, each with its input's index.
type Results<R, E> = BoxStream<'static, (usize, Result<R, CallError<E>>)>;

/// A job mapped over inputs, from [`Pool::map`]. A [`Stream`] of `(input index, result)`.
///
/// - Results come in input order; [`unordered`](Map::unordered) yields them as they finish.
/// - At most [`in_flight`](Map::in_flight) calls run at once. The default is the pool's `max`
///   times `max_concurrency`, so the pool grows to meet the load.
/// - Every input gets its own result, failures included; [`stop_on_error`](Map::stop_on_error)
///   ends the stream after the first failure instead, cancelling the calls still running.
/// - Dropping it cancels the calls in flight.
///
/// ```no_run
/// # async fn f(pool: firebrand::Pool) -> Result<(), firebrand::CallError> {
/// # const SQUARE: firebrand::Job<u64, u64> = firebrand::Job::new("square");
/// let results = pool
///     .map(&SQUARE, 0..10_000)
///     .in_flight(64)
///     .on_progress(|p| eprintln!("{} of {:?}", p.done, p.total))
///     .results()
///     .await;
/// assert_eq!(results.len(), 10_000);
/// # Ok(()) }
/// ```
#[must_use = "a map does nothing unless polled or collected"]
pub struct Map<A, R, E = RemoteError> {
    pool: Pool,
    job: Job<A, R, E>,
    // Wrapped so that a `Map` is `Sync`: they are only ever reached through `&mut self`.
    inputs: SyncWrapper<Option<(BoxStream<'static, A>, Option<usize>)>>,
    ordered: bool,
    in_flight: Option<usize>,
    stop_on_error: bool,
    /// Each input's call's deadline, when set.
    deadline: Option<Option<Duration>>,
    progress: SyncWrapper<Option<Hook>>,
    running: SyncWrapper<Option<Results<R, E>>>,
    stopped: bool,
}

impl<A, R, E> std::fmt::Debug for Map<A, R, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map")
            .field("job", &self.job.name())
            .field("ordered", &self.ordered)
            .field("in_flight", &self.in_flight)
            .field("stop_on_error", &self.stop_on_error)
            .finish_non_exhaustive()
    }
}

impl<A: Payload, R: Payload, E: JobError> Map<A, R, E> {
    pub(super) fn new(
        pool: Pool,
        job: Job<A, R, E>,
        inputs: impl Stream<Item = A> + Send + 'static,
    ) -> Self {
        let total = match inputs.size_hint() {
            (lower, Some(upper)) if lower == upper => Some(lower),
            _ => None,
        };
        Self {
            pool,
            job,
            inputs: SyncWrapper::new(Some((inputs.boxed(), total))),
            ordered: true,
            in_flight: None,
            stop_on_error: false,
            deadline: None,
            progress: SyncWrapper::new(None),
            running: SyncWrapper::new(None),
            stopped: false,
        }
    }

    /// Yields results as they finish rather than in input order.
    pub fn unordered(mut self) -> Self {
        self.ordered = false;
        self
    }

    /// The most calls running at once. Default: the pool's `max × max_concurrency`.
    pub fn in_flight(mut self, n: usize) -> Self {
        self.in_flight = Some(n.max(1));
        self
    }

    /// Each input's call's [`deadline`](crate::Call::deadline), from when that call starts
    /// (not from the map's start): an input that waits behind the map's own `in_flight` limit
    /// has not started. Default: the pool's [`deadline`](crate::PoolBuilder::deadline).
    pub fn deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        self.deadline = Some(deadline.into());
        self
    }

    /// Ends the stream after the first failure, which it yields; calls still running are
    /// cancelled. Default: every input gets a result.
    pub fn stop_on_error(mut self) -> Self {
        self.stop_on_error = true;
        self
    }

    /// Calls `hook` after each result, with the counts so far.
    pub fn on_progress(mut self, hook: impl FnMut(Progress) + Send + 'static) -> Self {
        self.progress = SyncWrapper::new(Some(Box::new(hook)));
        self
    }

    /// Every input's result, in input order.
    pub async fn results(self) -> Vec<Result<R, CallError<E>>> {
        let mut all: Vec<(usize, Result<R, CallError<E>>)> = self.collect().await;
        all.sort_unstable_by_key(|(index, _)| *index);
        all.into_iter().map(|(_, result)| result).collect()
    }

    /// Every output in input order, or the first failure (which cancels the rest).
    ///
    /// # Errors
    /// The first input's error, in the order results arrived.
    pub async fn outputs(self) -> Result<Vec<R>, CallError<E>> {
        let mut all = Vec::new();
        let mut stream = self.stop_on_error();
        while let Some((index, result)) = stream.next().await {
            all.push((index, result?));
        }
        all.sort_unstable_by_key(|(index, _)| *index);
        Ok(all.into_iter().map(|(_, output)| output).collect())
    }

    fn start(&mut self) -> Results<R, E> {
        let (inputs, total) = self.inputs.get_mut().take().expect("started once");
        let pool = self.pool.clone();
        let job = self.job;
        let deadline = self.deadline;
        let calls = inputs.enumerate().map(move |(index, args)| {
            let mut call = pool.call(&job, args);
            if let Some(deadline) = deadline {
                call = call.deadline(deadline);
            }
            async move { (index, call.await) }
        });
        let limit = self.in_flight.unwrap_or_else(|| self.pool.slots()).max(1);
        let results = if self.ordered {
            calls.buffered(limit).boxed()
        } else {
            calls.buffer_unordered(limit).boxed()
        };
        let mut hook = self.progress.get_mut().take();
        let mut progress = Progress {
            done: 0,
            failed: 0,
            total,
        };
        results
            .inspect(move |(_, result)| {
                progress.done += 1;
                progress.failed += usize::from(result.is_err());
                if let Some(hook) = hook.as_mut() {
                    hook(progress);
                }
            })
            .boxed()
    }
}

impl<A: Payload, R: Payload, E: JobError> Stream for Map<A, R, E> {
    type Item = (usize, Result<R, CallError<E>>);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.stopped {
            return Poll::Ready(None);
        }
        if self.running.get_mut().is_none() {
            let running = self.start();
            *self.running.get_mut() = Some(running);
        }
        let next = self
            .running
            .get_mut()
            .as_mut()
            .expect("set above")
            .poll_next_unpin(cx);
        if let Poll::Ready(Some((_, Err(_)))) = &next {
            if self.stop_on_error {
                // Dropping the calls in flight cancels them now, not when the map is dropped.
                *self.running.get_mut() = None;
                self.stopped = true;
            }
        }
        next
    }
}

// Nothing in a `Map` is pinned in place: its streams are boxed.
impl<A, R, E> Unpin for Map<A, R, E> {}
