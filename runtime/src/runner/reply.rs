//! Replies: how a call's or a stream's end is written back to the parent. Shared by
//! `call.rs` and `stream.rs`.

use quinn::SendStream;

use crate::registry::JobFailure;
use crate::wire::{self, ReplyHead, WireError};

/// The reply head for a job's failure.
pub(super) fn failure_head(failure: JobFailure) -> ReplyHead {
    match failure {
        JobFailure::Failed { message, encoded } => ReplyHead::Failed { message, encoded },
        JobFailure::BadArgs(message) => ReplyHead::BadArgs { message },
        JobFailure::BadResult(message) => ReplyHead::BadResult { message },
    }
}

/// Why a reply (its `Ok` or `Item` head, then the result's frame) is too large to send, if
/// it is: the result's frame is longer than the pool's `max_payload_len`, which the parent reads at most.
pub(super) fn oversized(reply: &wire::Chunks, max_payload_len: usize) -> Option<String> {
    let result_len = reply.len().saturating_sub(wire::RESULT_OFFSET);
    (result_len > max_payload_len).then(|| {
        format!(
            "the result encodes to {result_len} bytes, over the pool's max_payload_len of \
             {max_payload_len}"
        )
    })
}

/// A panic's message, from its payload.
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
        None => smallvec::smallvec![wire::encode_frame(head)?],
    };
    send.write_all_chunks(&mut chunks).await?;
    let _ = send.finish();
    Ok(())
}
