//! Serving one call stream on the runner.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use quinn::{RecvStream, SendStream};
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use super::terminator::{Ending, STATS};
use crate::registry::{ok_reply, Body, JobFailure, Registry};
use crate::wire::{self, CallHead, ReplyHead, WireError};

/// What a call stream needs from its runner.
pub(crate) struct CallContext {
    pub(crate) registry: Registry,
    pub(crate) resources: Arc<super::Resources>,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) max_payload_len: usize,
}

/// Reads one request, runs its job, and writes the reply.
pub(crate) async fn serve_call(cx: Arc<CallContext>, mut send: SendStream, mut recv: RecvStream) {
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
        let Some(body) = cx.registry.body(&head.job) else {
            tracing::warn!("unknown job");
            let _ = finish(&mut send, &ReplyHead::UnknownJob, None).await;
            return;
        };
        // The parent keeps within the runner's concurrency, so this wait is short; it exists so
        // that the limit holds even against a parent that does not.
        let Ok(_slot) = cx.slots.acquire().await else {
            return;
        };
        STATS.running();
        let deadline = (head.timeout_ms > 0).then(|| Duration::from_millis(head.timeout_ms));
        if let Body::Stream(handler) = body {
            let ending = super::stream::serve(handler, args, deadline, &mut send).await;
            STATS.ended(ending);
            return;
        }
        let resources = &cx.resources;
        // The handler is called inside the guarded future: a panic before its first await is
        // caught like any other.
        let job = AssertUnwindSafe(async move {
            match body {
                Body::Call(handler) => handler(args).await,
                Body::Resource(handler) => handler(args, Arc::clone(resources)).await,
                Body::Using(handler) => match resources.get(head.resource) {
                    Some(resource) => handler(resource, args).await,
                    None => Err(JobFailure::Failed(format!(
                        "resource {} is not held on this runner",
                        head.resource
                    ))),
                },
                Body::Stream(_) => unreachable!("served above"),
            }
        })
        .catch_unwind();
        let job = async move {
            match deadline {
                Some(limit) => tokio::time::timeout(limit, job).await.ok(),
                None => Some(job.await),
            }
        };
        tokio::pin!(job);
        let stopped = send.stopped();
        let outcome = tokio::select! {
            // The job first: one that finishes at once never polls `stopped`, which takes the
            // connection's lock.
            biased;
            outcome = &mut job => outcome,
            stopped = stopped => match stopped {
                Ok(_) => {
                    // The parent reset its side: the caller gave up. Dropping the job aborts it.
                    tracing::debug!("call cancelled by the parent");
                    STATS.ended(Ending::Cancelled);
                    return;
                }
                // The connection is gone. Let the job finish within its deadline (the serve
                // loop bounds the whole drain), though its result has nowhere to go.
                Err(_) => job.await,
            },
        };
        let (reply, payload, ending) = match outcome {
            None => (ReplyHead::TimedOut, None, Ending::TimedOut),
            Some(Ok(Ok(frame))) => (ReplyHead::Ok, Some(frame), Ending::Succeeded),
            Some(Ok(Err(failure))) => (failure_head(failure), None, Ending::Failed),
            Some(Err(panic)) => {
                let message = panic_message(panic.as_ref());
                tracing::error!(%message, "job panicked");
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

pub(super) fn failure_head(failure: JobFailure) -> ReplyHead {
    match failure {
        JobFailure::Failed(message) => ReplyHead::Failed { message },
        JobFailure::BadArgs(message) => ReplyHead::BadArgs { message },
        JobFailure::BadResult(message) => ReplyHead::BadResult { message },
    }
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Writes the reply (a head alone, or the handler's `Ok` head and result), then finishes.
pub(super) async fn finish(
    send: &mut SendStream,
    head: &ReplyHead,
    encoded: Option<wire::Chunks>,
) -> Result<(), WireError> {
    let mut chunks = match encoded {
        Some(encoded) => encoded.into_bytes(),
        None => smallvec::smallvec![Bytes::from(wire::encode_payload_frame(head)?)],
    };
    send.write_all_chunks(&mut chunks).await?;
    let _ = send.finish();
    Ok(())
}
