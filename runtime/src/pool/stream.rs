//! Streaming calls: a job's items, read as the caller asks for them.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{BoxStream, Stream, StreamExt as _};
use sync_wrapper::SyncWrapper;
use tokio::time::Instant;

use super::call::{check_callable, encode, place, Options, Request, Running};
use super::deadline::Deadline;
use super::driver::Lease;
use super::handle::{reply_error, CallStream};
use super::observe::CallOutcome;
use super::Shared;
use crate::error::{CallError, DeadlinePhase};
use crate::job::{Payload, StreamJob};
use crate::trace::TraceId;
use crate::wire::{self, ReplyHead};

/// The items of a streaming job, from [`Pool::stream`](super::Pool::stream): a [`Stream`] of
/// `Result<T, CallError>` that ends after the job's last item, or after its one error.
///
/// It takes a runner slot on its first poll and holds it until the job ends. The runner sends
/// items only as fast as they are read: a slow reader slows the job, and memory stays bounded
/// on both sides by QUIC's flow-control windows. Dropping it cancels the job on the runner.
///
/// ```no_run
/// # async fn f(pool: firebrand::Pool) -> Result<(), firebrand::CallError> {
/// use futures_util::StreamExt as _;
/// # const TOKENS: firebrand::StreamJob<String, String> = firebrand::StreamJob::new("generate");
///
/// let mut tokens = pool.stream(&TOKENS, "Once upon a time".into());
/// while let Some(token) = tokens.next().await {
///     print!("{}", token?);
/// }
/// # Ok(()) }
/// ```
#[must_use = "a stream does nothing unless polled"]
pub struct RemoteStream<T> {
    // Both wrapped so that a `RemoteStream` is `Sync`: they are only reached through
    // `&mut self`.
    /// Until the first poll: what starts the stream, its options still settable.
    pending: SyncWrapper<Option<Pending>>,
    items: SyncWrapper<Option<BoxStream<'static, Result<T, CallError>>>>,
}

/// Encodes a stream's request with its final options.
type EncodeRequest = Box<dyn FnOnce(&Shared, Options) -> Result<Request, CallError> + Send>;

/// A stream not yet started.
struct Pending {
    shared: Arc<Shared>,
    job: &'static str,
    options: Options,
    /// Encodes the request once the options are final: its head carries the timeout.
    encode: EncodeRequest,
}

impl<T: Payload> RemoteStream<T> {
    /// The deadline for the whole stream, from when it starts to its last item; `None` for
    /// none. Default: the pool's [`timeout`](crate::PoolBuilder::timeout). Set it before the
    /// first poll, as the other options.
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        if let Some(pending) = self.pending.get_mut() {
            pending.options.timeout = timeout.into();
        }
        self
    }

    /// How long the stream may wait for a slot. Default: the pool's
    /// [`queue_timeout`](crate::PoolBuilder::queue_timeout).
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        if let Some(pending) = self.pending.get_mut() {
            pending.options.queue_timeout = timeout;
        }
        self
    }

    /// One bound on the whole stream, from its first poll to its last item: queue, boot and
    /// the job's run together, as [`Call::deadline`](crate::Call::deadline). When it passes,
    /// the stream yields [`CallError::DeadlinePassed`] and ends, and the job is cancelled.
    /// Default: the pool's [`deadline`](crate::PoolBuilder::deadline).
    pub fn deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        if let Some(pending) = self.pending.get_mut() {
            pending.options.deadline = deadline.into();
        }
        self
    }

    /// The trace id the runner's log lines for this stream carry. Default: a new one.
    pub fn trace_id(mut self, id: TraceId) -> Self {
        if let Some(pending) = self.pending.get_mut() {
            pending.options.trace_id = Some(id);
        }
        self
    }

    fn start(pending: Pending) -> BoxStream<'static, Result<T, CallError>> {
        let request = check_callable(&pending.shared, pending.job)
            .and_then(|()| (pending.encode)(&pending.shared, pending.options));
        let start = Start {
            timeout: pending.options.timeout,
            queue_timeout: pending.options.queue_timeout,
            deadline: Deadline::after(pending.options.deadline),
            shared: pending.shared,
            job: pending.job,
            request,
        };
        futures_util::stream::unfold(Step::Start(start), |step| async move {
            let open = match step {
                Step::Done => return None,
                Step::Open(open) => open,
                Step::Start(start) => match start.open().await {
                    Ok(open) => open,
                    Err(error) => return Some((Err(error), Step::Done)),
                },
            };
            next_item(open).await
        })
        .boxed()
    }
}

impl<T> std::fmt::Debug for RemoteStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStream")
            .field("item", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

impl<T: Payload> Stream for RemoteStream<T> {
    type Item = Result<T, CallError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let items = match this.items.get_mut() {
            Some(items) => items,
            None => {
                let Some(pending) = this.pending.get_mut().take() else {
                    return Poll::Ready(None);
                };
                this.items.get_mut().insert(Self::start(pending))
            }
        };
        items.poll_next_unpin(cx)
    }
}

/// Where a stream is.
enum Step {
    Start(Start),
    Open(Open),
    Done,
}

struct Start {
    shared: Arc<Shared>,
    job: &'static str,
    request: Result<Request, CallError>,
    timeout: Option<Duration>,
    queue_timeout: Duration,
    deadline: Option<Deadline>,
}

struct Open {
    // Field order is drop order: the stream resets (cancelling the job) before the slot frees.
    stream: CallStream,
    running: Running<Arc<Shared>>,
    lease: Lease<Arc<Shared>>,
    timeout: Option<Duration>,
    /// When the whole stream must have ended, enforced here as well as on the runner: a runner
    /// that stops sending while its connection stays up (a job that blocks its thread) must
    /// not hang the reader.
    deadline: Option<Instant>,
    /// The caller's [`deadline`](RemoteStream::deadline) for the whole stream.
    call_deadline: Option<Deadline>,
}

pub(super) fn start<A: Payload, T: Payload>(
    shared: Arc<Shared>,
    job: &StreamJob<A, T>,
    args: A,
) -> RemoteStream<T> {
    let name = job.name();
    let pending = Pending {
        options: Options::of(&shared),
        shared,
        job: name,
        encode: Box::new(move |shared, options| {
            encode(shared, name, options.timeout, options.trace_id(), 0, &args)
        }),
    };
    RemoteStream {
        pending: SyncWrapper::new(Some(pending)),
        items: SyncWrapper::new(None),
    }
}

impl Start {
    async fn open(self) -> Result<Open, CallError> {
        let request = self.request?;
        let deadline = self.deadline.as_ref();
        let placed = place(
            &self.shared,
            self.job,
            self.queue_timeout,
            deadline,
            &request,
        )
        .await?;
        drop(request);
        let lease = placed.lease.into_owned(Arc::clone(&self.shared));
        let runner = Arc::clone(lease.runner());
        let running = Running::start(
            Arc::clone(&self.shared),
            self.job,
            runner.id,
            placed.queued_for,
        );
        let stream = placed.stream;
        Ok(Open {
            stream,
            running,
            lease,
            timeout: self.timeout,
            deadline: self.timeout.and_then(|t| Instant::now().checked_add(t)),
            call_deadline: self.deadline,
        })
    }
}

/// Reads the next item, or the stream's end or error, by the stream's deadline.
async fn next_item<T: Payload>(mut open: Open) -> Option<(Result<T, CallError>, Step)> {
    let timeout = open.timeout.unwrap_or_default();
    let call_deadline = open.call_deadline;
    let runner = open.lease.runner().id;
    let started = open.running.started;
    // The earlier of the two: the stream's execution timeout, or the caller's deadline.
    let ends = match (open.deadline, call_deadline) {
        (Some(at), Some(deadline)) if deadline.at() < at => Some((deadline.at(), call_deadline)),
        (Some(at), _) => Some((at, None)),
        (None, Some(deadline)) => Some((deadline.at(), call_deadline)),
        (None, None) => None,
    };
    let read = read_item::<T>(&mut open);
    let read = match ends {
        None => read.await,
        Some((at, by_deadline)) => tokio::time::timeout_at(at, read).await.unwrap_or_else(|_| {
            Read::Failed(match by_deadline {
                Some(deadline) => deadline.passed(DeadlinePhase::Running {
                    runner,
                    ran_for: started.elapsed(),
                }),
                None => CallError::Timeout { after: timeout },
            })
        }),
    };
    match read {
        Read::Item(item) => Some((Ok(item), Step::Open(open))),
        Read::End => {
            open.stream.done = true;
            open.running.outcome = CallOutcome::Ok;
            None
        }
        // Dropping the stream (still not done on a timeout) cancels the job on the runner.
        Read::Failed(failure) => {
            open.running.outcome = CallOutcome::of(&Err(&failure));
            Some((Err(failure), Step::Done))
        }
    }
}

/// What one read from a stream found.
enum Read<T> {
    Item(T),
    End,
    Failed(CallError),
}

/// Reads the next item, or the stream's end or error.
async fn read_item<T: Payload>(open: &mut Open) -> Read<T> {
    let runner = Arc::clone(open.lease.runner());
    let head = match wire::read_head::<ReplyHead>(&mut open.stream.recv).await {
        Ok(head) => head,
        Err(error) => return Read::Failed(runner.wire_error(error)),
    };
    let failure = match head {
        ReplyHead::Item => {
            let item = wire::read_frame(&mut open.stream.recv, runner.max_payload_len())
                .await
                .and_then(wire::Message::decode::<T>);
            return match item {
                Ok(item) => Read::Item(item),
                Err(wire::WireError::Decode(message)) => {
                    Read::Failed(CallError::Decode { message })
                }
                Err(error) => Read::Failed(runner.wire_error(error)),
            };
        }
        ReplyHead::End => return Read::End,
        ReplyHead::TimedOut => CallError::Timeout {
            after: open.timeout.unwrap_or_default(),
        },
        ReplyHead::Ok => CallError::Protocol {
            message: "a stream was answered as a call: is the job registered as a call?".into(),
        },
        other => super::handle::named(reply_error(other), open.running.job),
    };
    open.stream.done = true;
    Read::Failed(failure)
}
