//! Serving a streaming job: items go out as fast as the parent reads them, and no faster.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt as _};
use quinn::SendStream;

use super::reply::{failure_head, finish, oversized, panic_message};
use super::stats::Ending;
use crate::registry::{ItemStream, StreamHandler};
use crate::wire::{self, ReplyHead};

/// Runs a streaming job to its end, its deadline, or the parent's cancellation.
pub(super) async fn serve(
    handler: &StreamHandler,
    args: wire::Message,
    deadline: Option<Duration>,
    max_payload_len: usize,
    send: &mut SendStream,
) -> Ending {
    let items = match AssertUnwindSafe(async { handler(args) })
        .catch_unwind()
        .await
    {
        Ok(Ok(items)) => items,
        Ok(Err(failure)) => {
            let _ = finish(send, &failure_head(failure), None).await;
            return Ending::Failed;
        }
        Err(panic) => return panicked(send, panic_message(panic.as_ref())).await,
    };
    let pumped = match deadline {
        Some(limit) => tokio::time::timeout(limit, pump(items, max_payload_len, send))
            .await
            .ok(),
        None => Some(pump(items, max_payload_len, send).await),
    };
    match pumped {
        Some(ending) => ending,
        None => {
            let _ = finish(send, &ReplyHead::TimedOut, None).await;
            Ending::TimedOut
        }
    }
}

/// Sends each item as it comes. A write waits while the parent's receive window is full, so a
/// slow reader holds the job back instead of letting items pile up here.
async fn pump(mut items: ItemStream, max_payload_len: usize, send: &mut SendStream) -> Ending {
    loop {
        let next = tokio::select! {
            biased;
            next = AssertUnwindSafe(items.next()).catch_unwind() => next,
            _ = send.stopped() => {
                tracing::debug!("stream cancelled by the parent");
                return Ending::Cancelled;
            }
        };
        match next {
            Ok(Some(Ok(frames))) => {
                // Refused here rather than sent for the parent to refuse.
                if let Some(message) = oversized(&frames, max_payload_len) {
                    let _ = finish(send, &ReplyHead::BadResult { message }, None).await;
                    return Ending::Failed;
                }
                if send
                    .write_all_chunks(&mut frames.into_bytes())
                    .await
                    .is_err()
                {
                    // The parent stopped reading, or the connection is gone.
                    return Ending::Cancelled;
                }
            }
            Ok(Some(Err(failure))) => {
                let _ = finish(send, &failure_head(failure), None).await;
                return Ending::Failed;
            }
            Ok(None) => {
                let _ = finish(send, &ReplyHead::End, None).await;
                return Ending::Succeeded;
            }
            Err(panic) => return panicked(send, panic_message(panic.as_ref())).await,
        }
    }
}

/// Reports a panic in the job as the stream's end.
async fn panicked(send: &mut SendStream, message: String) -> Ending {
    tracing::error!(panic = %message, "job panicked");
    let _ = finish(send, &ReplyHead::Panicked { message }, None).await;
    Ending::Panicked
}
