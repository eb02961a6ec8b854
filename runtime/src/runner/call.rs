//! Serving one call stream on the runner.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use quinn::{RecvStream, SendStream};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::reply::{failure_head, finish, oversized, panic_message};
use super::stats::{Ending, STATS};
use super::terminator::StreamGuard;
use crate::registry::{ok_reply, Body, JobFailure, Registry};
use crate::wire::{self, CallHead, ReplyHead, WireError};

/// What a call stream needs from its runner.
pub(crate) struct CallContext {
    pub(crate) registry: Registry,
    pub(crate) resources: Arc<super::Resources>,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) max_payload_len: usize,
    /// Where calls are served and jobs run: never the connection's thread, which they could
    /// starve.
    pub(crate) jobs: Handle,
    /// Cancelled when the parent releases the runner: no result can reach anyone from then
    /// on, so every job still running is aborted rather than drained.
    pub(crate) released: CancellationToken,
}

/// Reads one request, runs its job, and writes the reply. `busy` counts the call as work for
/// the terminator while it is served; a blocking job takes it along, since it can outlive this.
pub(crate) async fn serve_call(
    cx: Arc<CallContext>,
    mut send: SendStream,
    mut recv: RecvStream,
    busy: StreamGuard,
) {
    let message = wire::read_message(&mut recv, wire::message_limit(cx.max_payload_len)).await;
    let (head, args) = match message.and_then(|m| parse_request(m, cx.max_payload_len)) {
        Ok(request) => request,
        Err(e) => {
            tracing::warn!(error = %e, "malformed call request");
            let _ = recv.stop(wire::stream::MALFORMED);
            let reply = ReplyHead::Malformed {
                message: e.to_string(),
            };
            let _ = finish(&mut send, &reply, None).await;
            return;
        }
    };
    // At ERROR level so that it is on whenever any of the call's log lines is: every line
    // carries the parent's trace id, whatever the filter.
    let span = tracing::error_span!(
        "call",
        job = %head.job,
        trace_id = %crate::trace::TraceId(head.trace_id)
    );
    async move {
        if head.job == wire::RELEASE_JOB {
            cx.resources.release(head.resource);
            let reply = ok_reply(&()).ok();
            let _ = finish(&mut send, &ReplyHead::Ok, reply).await;
            return;
        }
        let Some(body) = cx.registry.body(&head.job).cloned() else {
            tracing::warn!("unknown job");
            let _ = finish(&mut send, &ReplyHead::UnknownJob, None).await;
            return;
        };
        // The parent keeps within the runner's concurrency, so this wait is short; it exists so
        // that the limit holds even against a parent that does not. The permit goes with the
        // job, not this stream: a job that cannot be interrupted keeps its slot until it ends.
        let permit = tokio::select! {
            // The permit first: it is free at once on the warm path, where polling the token
            // first would register a waiter with it for nothing.
            biased;
            permit = Arc::clone(&cx.slots).acquire_owned() => permit,
            () = cx.released.cancelled() => return,
        };
        let Ok(permit) = permit else {
            return;
        };
        STATS.running();
        let deadline = (head.timeout_ms > 0).then(|| Duration::from_millis(head.timeout_ms));
        // The permit and `busy` go with the job: the runner does not idle down or exit its
        // drain while a job it gave up on still runs.
        if let Body::Stream(handler) = body {
            let _slot = (permit, busy);
            let served =
                super::stream::serve(&handler, args, deadline, cx.max_payload_len, &mut send);
            let ending = tokio::select! {
                ending = served => ending,
                () = cx.released.cancelled() => Ending::Cancelled,
            };
            STATS.ended(ending);
            return;
        }
        let job = start_job(&cx, body, args, head.resource, (permit, busy));
        let job = async move {
            match deadline {
                Some(limit) => tokio::time::timeout(limit, job).await.ok(),
                None => Some(job.await),
            }
        };
        tokio::pin!(job);
        let stopped = send.stopped();
        let released = cx.released.cancelled();
        tokio::pin!(released);
        let outcome = tokio::select! {
            // The job first: one that finishes at once never polls `stopped`, which takes the
            // connection's lock.
            biased;
            outcome = &mut job => outcome,
            stopped = stopped => match stopped {
                Ok(_) => {
                    // The parent reset its side: the caller gave up. Dropping the job aborts an
                    // async one at its next await; a blocking one runs on, its result discarded.
                    tracing::debug!("call cancelled by the parent");
                    STATS.ended(Ending::Cancelled);
                    return;
                }
                // The connection is gone. Unless the parent released the runner, let the job
                // finish within its deadline (the serve loop bounds the whole drain), though
                // its result has nowhere to go.
                Err(_) => tokio::select! {
                    biased;
                    outcome = &mut job => outcome,
                    () = &mut released => return abandoned(),
                },
            },
            // The parent released the runner: whoever called is no longer waiting. The
            // parent's reset of this stream may never have left it (a close overtakes it).
            () = &mut released => return abandoned(),
        };
        if let Some(Ok(Ok(Made {
            reply,
            resource: Some(id),
        }))) = outcome
        {
            STATS.ended(Ending::Succeeded);
            hand_over(&cx, &mut send, reply, id).await;
            return;
        }
        let (reply, payload, ending) = match outcome {
            None => (ReplyHead::TimedOut, None, Ending::TimedOut),
            Some(Ok(Ok(made))) => match oversized(&made.reply, cx.max_payload_len) {
                // Refused here rather than sent for the parent to refuse: the parent reads at
                // most `max_payload_len`, and the bytes would cross the link for nothing.
                Some(message) => (ReplyHead::BadResult { message }, None, Ending::Failed),
                None => (ReplyHead::Ok, Some(made.reply), Ending::Succeeded),
            },
            Some(Ok(Err(failure))) => (failure_head(failure), None, Ending::Failed),
            Some(Err(panic)) => {
                let message = panic_message(panic.as_ref());
                tracing::error!(panic = %message, "job panicked");
                (ReplyHead::Panicked { message }, None, Ending::Panicked)
            }
        };
        STATS.ended(ending);
        if let Err(e) = finish(&mut send, &reply, payload).await {
            tracing::debug!(error = %e, "reply not delivered");
        }
    }
    .instrument(span)
    .await;
}

/// Ends a call whose job is dropped because the parent released the runner: an async job is
/// aborted at its next await, a blocking one runs on with nobody to take its result.
fn abandoned() {
    tracing::debug!("call abandoned: the parent released the runner");
    STATS.ended(Ending::Cancelled);
}

/// What a job's task returns: its result, or the payload of its panic.
type JobOutput = Result<Result<Made, JobFailure>, Box<dyn std::any::Any + Send>>;

/// A job's encoded reply, and the resource it made, if it is a resource job.
struct Made {
    reply: wire::Chunks,
    resource: Option<u64>,
}

impl From<wire::Chunks> for Made {
    fn from(reply: wire::Chunks) -> Self {
        Made {
            reply,
            resource: None,
        }
    }
}

/// The job, as a future that holds `slot` until the job really ends. An async job runs in
/// this future, in its call's task on the jobs' runtime, and is aborted when it is dropped; a
/// blocking one runs on the blocking pool, and runs on to its end if this future is dropped.
/// Either way its argument is decoded and its result encoded on the jobs' threads, never on
/// the connection's.
fn start_job<S: Send + 'static>(
    cx: &CallContext,
    body: Body,
    args: wire::Message,
    resource: u64,
    slot: S,
) -> impl std::future::Future<Output = JobOutput> + Send + 'static {
    use futures_util::future::Either;
    if let Body::Blocking(handler) = body {
        let span = tracing::Span::current();
        let running = cx.jobs.spawn_blocking(move || {
            let _slot = slot;
            let _entered = span.enter();
            std::panic::catch_unwind(AssertUnwindSafe(|| handler(args).map(Made::from)))
        });
        return Either::Left(async move {
            running.await.unwrap_or_else(|ended| {
                Err(Box::new(format!("the job's thread ended: {ended}")) as Box<_>)
            })
        });
    }
    let resources = Arc::clone(&cx.resources);
    // The handler is called inside the guarded future: a panic before its first await is
    // caught like any other.
    let run = async move {
        let _slot = slot;
        match body {
            Body::Call(handler) => handler(args).await.map(Made::from),
            Body::Using(handler) => match resources.get(resource) {
                Some(resource) => handler(resource, args).await.map(Made::from),
                None => Err(JobFailure::text(format!(
                    "resource {resource} is not held on this runner"
                ))),
            },
            Body::Resource(handler) => {
                let id = resources.insert(handler(args).await?);
                match ok_reply(&id) {
                    Ok(reply) => Ok(Made {
                        reply,
                        resource: Some(id),
                    }),
                    Err(failure) => {
                        resources.release(id);
                        Err(failure)
                    }
                }
            }
            Body::Blocking(_) | Body::Stream(_) => unreachable!("served elsewhere"),
        }
    };
    Either::Right(AssertUnwindSafe(run).catch_unwind())
}

/// Sends a new resource's id and keeps the resource only once the parent claims it. Until
/// then it is unclaimed: if the parent's side of the stream ends any other way (the caller
/// gave up after the job had made it, or the connection went), it is dropped at once, and a
/// runner that held nothing else can idle down.
async fn hand_over(cx: &CallContext, send: &mut SendStream, reply: wire::Chunks, id: u64) {
    // Not finished: the parent reads the two frames, not to the stream's end, then claims.
    let sent = send.write_all_chunks(&mut reply.into_bytes()).await;
    let claimed = match sent {
        Ok(()) => matches!(send.stopped().await, Ok(Some(code)) if code == wire::stream::CLAIMED),
        Err(_) => false,
    };
    if !claimed {
        tracing::debug!(resource = id, "resource not claimed by the parent: dropped");
        cx.resources.release(id);
    }
}

/// A request's head and its argument frame's body.
fn parse_request(
    mut message: wire::Message,
    max_payload_len: usize,
) -> Result<(CallHead, wire::Message), WireError> {
    let head: CallHead = message.split_frame(wire::MAX_HEAD_LEN)?.decode()?;
    let args = message.split_frame(max_payload_len)?;
    if !message.is_empty() {
        return Err(WireError::Decode(format!(
            "{} bytes after the request",
            message.len()
        )));
    }
    Ok((head, args))
}
