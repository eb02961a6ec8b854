//! A call: encoded once, placed on a runner, retried when that is allowed.

use std::borrow::Borrow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sync_wrapper::SyncWrapper;
use tracing::Instrument as _;

use tokio::time::Instant;

use super::deadline::Deadline;
use super::driver::Lease;
use super::handle::{CallStream, RunnerHandle};
use super::observe::CallOutcome;
use super::task::RemoteTask;
use super::Shared;
use crate::backoff::Backoff;
use crate::error::{CallError, DeadlinePhase, RemoteError, RunnerId};
use crate::job::{Job, JobDefaults, JobError, Payload};
use crate::trace::TraceId;
use crate::wire;

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
pub struct Call<A, R, E = RemoteError> {
    shared: Arc<Shared>,
    job: Job<A, R, E>,
    // Wrapped so that a `Call` is `Sync` whatever `A` is: both are only reached through
    // `&mut self`.
    args: SyncWrapper<Option<A>>,
    options: Options,
    retry: Retry,
    running: SyncWrapper<Option<futures_util::future::BoxFuture<'static, Result<R, CallError>>>>,
}

impl<A, R, E> std::fmt::Debug for Call<A, R, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("job", &self.job.name())
            .field("options", &self.options)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// The options every work shape takes: a call, a stream, a resource and a call on one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Options {
    /// The execution deadline; `None` for none.
    pub(super) timeout: Option<Duration>,
    /// How long a call may wait for a slot.
    pub(super) queue_timeout: Duration,
    /// The bound on the caller's whole wait; `None` for none.
    pub(super) deadline: Option<Duration>,
    /// The trace id; a new one per call when unset.
    pub(super) trace_id: Option<TraceId>,
}

impl Options {
    /// The pool's defaults.
    pub(super) fn of(shared: &Shared) -> Self {
        Self {
            timeout: shared.config.call_timeout,
            queue_timeout: shared.config.queue_timeout,
            deadline: shared.config.deadline,
            trace_id: None,
        }
    }

    /// These options with what a job declares in place of the pool's.
    pub(super) fn with(mut self, job: JobDefaults) -> Self {
        if let Some(timeout) = job.timeout {
            self.timeout = timeout;
        }
        if let Some(timeout) = job.queue_timeout {
            self.queue_timeout = timeout;
        }
        self
    }

    /// The trace id to send: the one set, or a new one.
    pub(super) fn trace_id(&self) -> TraceId {
        self.trace_id.unwrap_or_else(TraceId::next)
    }
}

/// The wait before a call's first retry; it doubles with each retry after.
const RETRY_FIRST_WAIT: Duration = Duration::from_millis(100);

/// The longest wait between a call's retries.
const RETRY_MAX_WAIT: Duration = Duration::from_secs(5);

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
            CallError::Job(_) | CallError::Panicked { .. } | CallError::Timeout { .. } => {
                self.job_errors
            }
            _ => false,
        }
    }

    /// The waits before each retry: doubling from [`RETRY_FIRST_WAIT`] up to
    /// [`RETRY_MAX_WAIT`], with jitter.
    fn delays(&self) -> impl Iterator<Item = Duration> {
        Backoff::jittered(RETRY_FIRST_WAIT, RETRY_MAX_WAIT).delays(self.retries as usize)
    }
}

// `Call` never pins its argument: it is moved out, encoded, on the first poll.
impl<A, R, E> Unpin for Call<A, R, E> {}

impl<A: Payload, R: Payload, E: JobError> Call<A, R, E> {
    pub(super) fn new(shared: Arc<Shared>, job: &Job<A, R, E>, args: A) -> Self {
        Call {
            options: Options::of(&shared).with(job.defaults()),
            shared,
            job: *job,
            args: SyncWrapper::new(Some(args)),
            retry: Retry {
                idempotent: job.is_idempotent(),
                retries: job.default_retries(),
                job_errors: false,
            },
            running: SyncWrapper::new(None),
        }
    }

    /// The execution deadline for this call; `None` for none. Default: the job's
    /// [`timeout`](Job::timeout) if it declares one, else the pool's
    /// [`timeout`](crate::PoolBuilder::timeout).
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.options.timeout = timeout.into();
        self
    }

    /// How long this call may wait for a slot. Default: the job's
    /// [`queue_timeout`](Job::queue_timeout) if it declares one, else the pool's
    /// [`queue_timeout`](crate::PoolBuilder::queue_timeout).
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.options.queue_timeout = timeout;
        self
    }

    /// One bound on this call's whole wait: the queue, a boot, sending the request, the job's
    /// run and any retries together, from the first poll. When it passes, the call is
    /// cancelled (on its runner too) and fails with [`CallError::DeadlinePassed`], which says
    /// what it was waiting for. `timeout` and `queue_timeout` still bound their own phase.
    /// `None` for none. Default: the pool's [`deadline`](crate::PoolBuilder::deadline), none
    /// unless set.
    ///
    /// ```no_run
    /// # async fn f(pool: firebrand::Pool) -> Result<(), firebrand::CallError> {
    /// # const JOB: firebrand::Job<u32, u32> = firebrand::Job::new("job");
    /// use std::time::Duration;
    ///
    /// // Answer within 100 ms, or not at all, whether the pool is full, booting or slow.
    /// let out = pool.call(&JOB, 7).deadline(Duration::from_millis(100)).await?;
    /// # Ok(()) }
    /// ```
    pub fn deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        self.options.deadline = deadline.into();
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

    /// The trace id this call's span and the runner's log lines for it carry, e.g. one taken
    /// from an OpenTelemetry context. Default: a new one per call.
    pub fn trace_id(mut self, id: TraceId) -> Self {
        self.options.trace_id = Some(id);
        self
    }

    /// Runs this call in the background and returns a handle to await, abort or detach it.
    /// Dropping the handle aborts the job. The call's options apply as to `.await`: its
    /// execution deadline is the pool's [`timeout`](crate::PoolBuilder::timeout) unless set, so
    /// give a job that runs longer `.timeout(None)`.
    ///
    /// ```no_run
    /// # async fn f(pool: firebrand::Pool) -> Result<(), firebrand::CallError> {
    /// # const TRAIN: firebrand::Job<u32, f64> = firebrand::Job::new("train");
    /// let training = pool.call(&TRAIN, 10).timeout(None).spawn();
    /// // ... other work ...
    /// let loss = training.await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn spawn(self) -> RemoteTask<R, E> {
        let tasks = self.shared.tasks.clone();
        RemoteTask::new(tasks.spawn(self))
    }

    /// Runs this call in the background and discards its result; a failure is logged.
    ///
    /// # Errors
    /// Only what is known at once: [`CallError::UnknownJob`], [`CallError::NotIdempotent`],
    /// [`CallError::Encode`] (for an argument under 64 KiB encoded; a larger one is encoded in
    /// the background, and a failure to encode it is logged like any other),
    /// [`CallError::Closed`].
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn cast(mut self) -> Result<(), CallError<E>> {
        let prepared = self.prepare().map_err(CallError::typed)?;
        let shared = Arc::clone(&self.shared);
        let name = self.job.name();
        self.shared.tasks.spawn(async move {
            if let Err(error) = prepared.run(&shared).await {
                tracing::warn!(job = name, %error, "cast failed");
            }
        });
        Ok(())
    }

    fn prepare(&mut self) -> Result<Prepared<R>, CallError> {
        let name = self.job.name();
        let args = self.args.get_mut().take().ok_or(CallError::Protocol {
            message: "call polled after completion".into(),
        })?;
        check_callable(&self.shared, name)?;
        if self.retry.retries > 0 && !self.retry.idempotent {
            return Err(CallError::NotIdempotent { job: name.into() });
        }
        let trace_id = self.options.trace_id();
        let timeout = self.options.timeout;
        // A small argument is encoded here; a large one (64 KiB or more) on the blocking pool,
        // off the threads that drive the pool's connections, when the call runs.
        let (request, deferred) = match encode_small(&self.shared, name, timeout, trace_id, &args)?
        {
            Some(request) => (request, None),
            None => {
                let shared = Arc::clone(&self.shared);
                let encoding = tokio::task::spawn_blocking(move || {
                    encode(&shared, name, timeout, trace_id, 0, &args)
                });
                (Request::new(), Some(encoding))
            }
        };
        Ok(Prepared {
            job: name,
            request,
            deferred,
            timeout,
            queue_timeout: self.options.queue_timeout,
            deadline: Deadline::after(self.options.deadline),
            retry: self.retry,
            trace_id,
            output: std::marker::PhantomData,
        })
    }
}

/// A large argument being encoded on the blocking pool.
type DeferredEncoding = tokio::task::JoinHandle<Result<Request, CallError>>;

/// An encoded call, ready to place.
pub(super) struct Prepared<R> {
    job: &'static str,
    // Handed to quinn as is: its send buffer takes the chunks without copying them.
    request: Request,
    /// For a large argument: the encoding of `request` under way, awaited before the call is
    /// placed.
    deferred: Option<DeferredEncoding>,
    timeout: Option<Duration>,
    queue_timeout: Duration,
    deadline: Option<Deadline>,
    retry: Retry,
    trace_id: TraceId,
    output: std::marker::PhantomData<fn() -> R>,
}

impl<R: Payload> Prepared<R> {
    pub(super) async fn run(mut self, shared: &Arc<Shared>) -> Result<R, CallError> {
        if let Some(encoding) = self.deferred.take() {
            let encoded = async {
                encoding.await.unwrap_or_else(|e| {
                    Err(CallError::Encode {
                        message: format!("encoding the argument failed: {e}"),
                    })
                })
            };
            self.request =
                Deadline::bound(self.deadline.as_ref(), encoded, || DeadlinePhase::Sending).await?;
        }
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
                    let attempts = failures.len();
                    let wait = async {
                        tokio::time::sleep(delay).await;
                        Ok(())
                    };
                    Deadline::bound(self.deadline.as_ref(), wait, || DeadlinePhase::Retrying {
                        attempts,
                    })
                    .await?;
                }
                None if failures.len() == 1 => return Err(failures.remove(0)),
                None => return Err(CallError::Attempts { attempts: failures }),
            }
        }
    }

    async fn attempt(&self, shared: &Arc<Shared>, request: Request) -> Result<R, CallError> {
        let deadline = self.deadline.as_ref();
        let placed = place(shared, self.job, self.queue_timeout, deadline, &request).await?;
        drop(request);
        let span = tracing::debug_span!(
            "call",
            job = self.job,
            runner = %placed.lease.runner().id,
            trace_id = %self.trace_id,
            queued_ms = placed.queued_for.as_millis() as u64,
            ran_ms = tracing::field::Empty,
        );
        let Placed {
            lease,
            stream,
            queued_for,
        } = placed;
        exchange(
            shared,
            lease,
            stream,
            self.job,
            queued_for,
            self.timeout,
            deadline,
        )
        .instrument(span)
        .await
    }
}

/// How many times one call is placed again because its runner turned out to be dead before the
/// request left. Each placement marks that runner dead, so each goes to another runner; the
/// bound only stops a pool whose every new runner dies at once from looping.
const MAX_PLACEMENTS: u32 = 16;

/// A call's request, sent on a runner: the slot it holds, its stream, and how long it queued.
pub(super) struct Placed<S: std::ops::Deref<Target = Shared>> {
    pub(super) lease: Lease<S>,
    pub(super) stream: CallStream,
    pub(super) queued_for: Duration,
}

/// Takes a slot and sends `request` on it. A runner whose connection is found gone before the
/// request left never received the call: it is marked dead (no call is placed on it again)
/// and the call is placed anew, on another runner or one that boots for it. Only a call the
/// runner may have received fails with [`CallError::RunnerLost`]. `deadline` bounds it all.
pub(super) async fn place<'a>(
    shared: &'a Arc<Shared>,
    job: &'static str,
    queue_timeout: Duration,
    deadline: Option<&Deadline>,
    request: &Request,
) -> Result<Placed<&'a Shared>, CallError> {
    let queued_at = Instant::now();
    let mut placements = 0;
    loop {
        let lease = shared.acquire(job, queue_timeout, deadline).await?;
        let runner = Arc::clone(lease.runner());
        let opened = async { Ok(runner.open(request.clone()).await) };
        let opened = Deadline::bound(deadline, opened, || DeadlinePhase::Sending).await?;
        let error = match opened {
            Ok(stream) => {
                return Ok(Placed {
                    lease,
                    stream,
                    queued_for: queued_at.elapsed(),
                })
            }
            Err(e) => runner.wire_error(e),
        };
        placements += 1;
        if !matches!(error, CallError::RunnerLost { .. }) || placements >= MAX_PLACEMENTS {
            return Err(error);
        }
        // Before the lease goes: its release must not hand a waiter a slot on this runner.
        shared.drive(|state| state.scheduler.runner_dead(runner.id));
        tracing::debug!(job, runner = %runner.id, %error, "runner gone before the request left; placing the call again");
    }
}

/// An encoded request.
pub(super) type Request = smallvec::SmallVec<[bytes::Bytes; 2]>;

/// Refuses a call the pool cannot take: it is closed, or it knows no such job.
pub(super) fn check_callable(shared: &Shared, name: &str) -> Result<(), CallError> {
    if shared.closed.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(CallError::Closed);
    }
    if !shared.manifest.contains(name) {
        return Err(CallError::UnknownJob { job: name.into() });
    }
    Ok(())
}

/// [`encode`] for a call's argument under 64 KiB encoded; `None` for a larger one, of which at
/// most 64 KiB was encoded here.
fn encode_small<A: Payload>(
    shared: &Shared,
    name: &str,
    timeout: Option<Duration>,
    trace_id: TraceId,
    args: &A,
) -> Result<Option<Request>, CallError> {
    let head = wire::CallHeadRef {
        job: name,
        timeout_ms: timeout_ms(timeout),
        trace_id: trace_id.0,
        resource: 0,
    };
    wire::encode_small_request(&head, args, payload_limit(shared)).map_err(encode_error)
}

/// Encodes a request for `name`, with its execution deadline for the runner. An argument
/// above the pool's `max_payload_len` is refused here, before it is sent.
pub(super) fn encode<A: Payload>(
    shared: &Shared,
    name: &str,
    timeout: Option<Duration>,
    trace_id: TraceId,
    resource: u64,
    args: &A,
) -> Result<Request, CallError> {
    let limit = payload_limit(shared);
    wire::encode_request(name, timeout_ms(timeout), trace_id.0, resource, args, limit)
        .map_err(encode_error)
}

/// A call's execution deadline as the runner reads it: 0 for none, at least 1 ms otherwise.
fn timeout_ms(timeout: Option<Duration>) -> u64 {
    timeout.map_or(0, |t| {
        u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

fn payload_limit(shared: &Shared) -> usize {
    usize::try_from(shared.config.max_payload_len).unwrap_or(usize::MAX)
}

fn encode_error(error: wire::WireError) -> CallError {
    CallError::Encode {
        message: error.to_string(),
    }
}

/// Reads the reply to a request sent on `stream` to the runner `slot` reaches, reporting the
/// call started and finished, and decodes its result. The slot (a lease, or a plain reference)
/// is let go as soon as the reply is in, before decoding. The current span's `ran_ms` field,
/// where it has one, gets the run time. When `deadline` passes first, the stream is dropped,
/// which cancels the job on the runner.
pub(super) async fn exchange<R: Payload>(
    shared: &Shared,
    slot: impl Borrow<RunnerHandle>,
    stream: CallStream,
    job: &'static str,
    queued_for: Duration,
    timeout: Option<Duration>,
    deadline: Option<&Deadline>,
) -> Result<R, CallError> {
    let runner = slot.borrow();
    let mut running = Running::start(shared, job, runner.id, queued_for);
    let started = running.started;
    let reply = Deadline::bound(deadline, runner.reply(stream, timeout), || {
        DeadlinePhase::Running {
            runner: runner.id,
            ran_for: started.elapsed(),
        }
    })
    .await
    .map_err(|e| super::handle::named(e, job));
    drop(slot);
    let output = match reply {
        Ok(reply) => decode_reply(reply).await,
        Err(e) => Err(e),
    };
    running.outcome = CallOutcome::of(&output.as_ref().map(|_| ()));
    tracing::Span::current().record("ran_ms", running.started.elapsed().as_millis() as u64);
    output
}

/// Results at least this large are decoded on the blocking pool, off the threads that drive
/// the pool's connections. Below it, decoding takes less than the hand-off would.
pub(super) const OFFLOAD_DECODE_LEN: usize = 64 << 10;

/// Decodes a call's result: a large one on the blocking pool.
pub(super) async fn decode_reply<R: Payload>(reply: super::handle::Reply) -> Result<R, CallError> {
    let offload = reply.len() >= OFFLOAD_DECODE_LEN;
    let decode = move || {
        reply.decode().map_err(|e| CallError::Decode {
            message: e.to_string(),
        })
    };
    if offload {
        tokio::task::spawn_blocking(decode)
            .await
            .unwrap_or_else(|e| {
                Err(CallError::Decode {
                    message: format!("decoding the result failed: {e}"),
                })
            })
    } else {
        decode()
    }
}

/// A call on its runner. Dropped, it reports the call finished, as cancelled unless told
/// otherwise: a caller that drops its future cancels the call.
pub(super) struct Running<S: std::ops::Deref<Target = Shared>> {
    shared: S,
    pub(super) job: &'static str,
    runner: RunnerId,
    pub(super) started: Instant,
    pub(super) outcome: CallOutcome,
}

impl<S: std::ops::Deref<Target = Shared>> Running<S> {
    pub(super) fn start(
        shared: S,
        job: &'static str,
        runner: RunnerId,
        queued_for: Duration,
    ) -> Self {
        shared.observer.call_started(job, runner, queued_for);
        Self {
            shared,
            job,
            runner,
            started: Instant::now(),
            outcome: CallOutcome::Cancelled,
        }
    }
}

impl<S: std::ops::Deref<Target = Shared>> Drop for Running<S> {
    fn drop(&mut self) {
        let ran_for = self.started.elapsed();
        self.shared
            .observer
            .call_finished(self.job, self.runner, ran_for, self.outcome);
    }
}

impl<A: Payload, R: Payload, E: JobError> Future for Call<A, R, E> {
    type Output = Result<R, CallError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.running.get_mut().is_none() {
            let prepared = this.prepare();
            let shared = Arc::clone(&this.shared);
            *this.running.get_mut() = Some(Box::pin(async move { prepared?.run(&shared).await }));
        }
        this.running
            .get_mut()
            .as_mut()
            .expect("set above")
            .as_mut()
            .poll(cx)
            .map_err(CallError::typed)
    }
}
