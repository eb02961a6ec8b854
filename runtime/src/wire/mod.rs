//! The wire protocol between a parent and its runners.
//!
//! Every message is a *frame*: a big-endian `u32` length, then that many bytes of bincode 2's
//! format (serde API, standard configuration). A length above the reader's limit is refused
//! before anything is allocated, and a decode allocates nothing a frame claims until the
//! frame holds it (`decoder.rs`).
//!
//! The module is split by job: `messages.rs` holds what crosses the wire, `framing.rs` the one
//! frame reader and the one frame writer, `buffers.rs` the chunk lists they read into and
//! write from, `codec.rs` the codec: the only file that names bincode, so that it could be
//! swapped for another without touching the rest, and `decoder.rs` the decoder of its format.
//!
//! One connection per runner. The runner dials the parent and opens the *control stream*: it
//! sends the two-byte [`PROTOCOL_VERSION`] and a [`Hello`] frame, and waits for a [`HelloReply`].
//! A parent that refuses closes the connection with [`close::REFUSED`] and the reason as the
//! close reason. The control stream then carries [`ControlMessage`]s from the runner.
//!
//! Each call is one bidirectional stream opened by the parent: a [`CallHead`] frame and a payload
//! frame (the encoded argument), then FIN. The runner answers with a [`ReplyHead`] frame, followed
//! by a payload frame (the encoded result) when the head is [`ReplyHead::Ok`]. A streaming job
//! answers with any number of [`ReplyHead::Item`] heads, each followed by a payload frame, then
//! [`ReplyHead::End`] or an error head. The parent cancels a call by resetting its stream with
//! [`stream::CANCELLED`].

mod buffers;
mod codec;
mod decoder;
mod framing;
mod messages;

pub use buffers::{Chunks, Message};
pub use codec::decode_payload;
pub(crate) use codec::encode_value;
pub use framing::{
    encode_frame, message_limit, read_frame, read_head, read_message, read_message_after,
    write_frame,
};
pub(crate) use messages::{encode_request, encode_small_request, CallHeadRef, FLY_CLAIM_KEY};
pub use messages::{
    CallHead, ClaimSecret, ControlMessage, DrainReason, Hello, HelloReply, LogLine, ReplyHead,
};

/// The protocol version, sent as the first two bytes of the control stream.
pub const PROTOCOL_VERSION: u16 = 6;

/// The TLS application protocol name. It carries no version: a version mismatch must reach the
/// parent, which refuses it with an error that names both versions.
pub const ALPN: &[u8] = b"firebrand";

/// The largest head frame ([`Hello`], [`CallHead`], [`ReplyHead`], [`ControlMessage`]).
pub const MAX_HEAD_LEN: usize = 1 << 20;

/// The bytes before a result in a successful reply or a stream's item: the [`ReplyHead::Ok`]
/// or [`ReplyHead::Item`] frame (a prefix and one byte) and the result frame's prefix. A result longer than a pool's `max_payload_len`
/// is refused by the runner before it is sent.
pub(crate) const RESULT_OFFSET: usize = 9;

/// The reserved job name of a request that releases the resource its head names.
pub const RELEASE_JOB: &str = "firebrand:release";

/// The longest job name.
pub const MAX_JOB_NAME_LEN: usize = 256;

/// QUIC application close codes.
pub mod close {
    use quinn::VarInt;
    /// The parent is done with the runner (drained, or the pool shut down). Not an error.
    pub const DONE: VarInt = VarInt::from_u32(0);
    /// The parent refused the runner at connect; the close reason says why.
    pub const REFUSED: VarInt = VarInt::from_u32(1);
    /// A peer broke the protocol.
    pub const PROTOCOL: VarInt = VarInt::from_u32(2);
    /// The runner is exiting.
    pub const RUNNER_EXIT: VarInt = VarInt::from_u32(3);
    /// The parent is done with the runner for now and parks its machine suspended: the runner
    /// stays up to be frozen, and dials its parent again once it is resumed.
    pub const PARKED: VarInt = VarInt::from_u32(4);
}

/// QUIC stream error codes.
pub mod stream {
    use quinn::VarInt;
    /// The caller gave up on the call; the runner aborts the job.
    pub const CANCELLED: VarInt = VarInt::from_u32(1);
    /// The peer sent a malformed frame on this stream.
    pub const MALFORMED: VarInt = VarInt::from_u32(2);
    /// The parent read a new resource's id and holds a handle to it: the runner keeps it.
    /// Until the parent says so, a resource is unclaimed, and the runner drops it if the
    /// stream ends any other way (the caller gave up after the runner made it).
    pub const CLAIMED: VarInt = VarInt::from_u32(3);
}

/// An error reading or writing a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A length prefix above the reader's limit.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The reader's limit.
        limit: u64,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The bytes are not a valid encoding of the expected type.
    #[error("malformed frame: {0}")]
    Decode(String),
    /// The value could not be encoded.
    #[error("value does not encode: {0}")]
    Encode(String),
    /// The connection failed while opening a stream.
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    /// The stream failed while reading.
    #[error(transparent)]
    Read(#[from] quinn::ReadError),
    /// The stream failed while writing.
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
}

impl From<quinn::ReadExactError> for WireError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::FinishedEarly(_) => WireError::Truncated,
            quinn::ReadExactError::ReadError(e) => WireError::Read(e),
        }
    }
}

#[cfg(test)]
mod tests;
