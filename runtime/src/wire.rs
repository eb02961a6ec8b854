//! The wire protocol between a parent and its runners.
//!
//! Every message is a *frame*: a big-endian `u32` length, then that many bytes of bincode 2
//! (serde API, standard configuration). A length above the reader's limit is refused before
//! anything is allocated, and every decode is bounded (see [`decode_payload`]).
//!
//! One connection per runner. The runner dials the parent and opens the *control stream*: it
//! sends the two-byte [`PROTOCOL_VERSION`] and a [`Hello`] frame, and waits for a [`HelloReply`].
//! A parent that refuses closes the connection with [`close::REFUSED`] and the reason as the
//! close reason. The control stream then carries [`ControlMessage`]s from the runner.
//!
//! Each call is one bidirectional stream opened by the parent: a [`CallHead`] frame and a payload
//! frame (the encoded argument), then FIN. The runner answers with a [`ReplyHead`] frame, followed
//! by a payload frame (the encoded result) when the head is [`ReplyHead::Ok`]. The parent cancels a
//! call by resetting its stream with [`stream::CANCELLED`].

use bincode::config::Configuration;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::registry::Manifest;

/// The protocol version, sent as the first two bytes of the control stream.
pub const PROTOCOL_VERSION: u16 = 1;

/// The TLS application protocol name. It carries no version: a version mismatch must reach the
/// parent, which refuses it with an error that names both versions.
pub const ALPN: &[u8] = b"firebrand";

/// The largest head frame ([`Hello`], [`CallHead`], [`ReplyHead`], [`ControlMessage`]).
pub const MAX_HEAD_LEN: usize = 1 << 20;

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
}

/// QUIC stream error codes.
pub mod stream {
    use quinn::VarInt;
    /// The caller gave up on the call; the runner aborts the job.
    pub const CANCELLED: VarInt = VarInt::from_u32(1);
    /// The peer sent a malformed frame on this stream.
    pub const MALFORMED: VarInt = VarInt::from_u32(2);
}

/// The runner's first message on the control stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The runner id from the boot token; it must match the runner's client certificate.
    pub runner_id: Uuid,
    /// The runner's job registry.
    pub manifest: Manifest,
    /// The runner's process id, for diagnostics.
    pub pid: u32,
}

/// The parent's answer to an accepted [`Hello`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum HelloReply {
    /// The runner is registered and may report ready.
    Accepted,
}

/// Messages from the runner on the control stream, after the hello.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ControlMessage {
    /// The runner wants to stop. It still serves the calls the parent already sent; the parent
    /// sends no more and closes the connection with [`close::DONE`] once they have finished.
    Draining {
        /// Why the runner is stopping.
        reason: DrainReason,
    },
}

/// Why a runner drains.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum DrainReason {
    /// It had no work for its idle shutdown period.
    Idle,
    /// It received SIGTERM.
    Terminated,
}

/// The head of a call stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallHead {
    /// The registered job name.
    pub job: String,
    /// The execution deadline, in milliseconds from when the runner reads this head; 0 for none.
    pub timeout_ms: u64,
}

/// The head of a call's reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ReplyHead {
    /// A payload frame with the result follows.
    Ok,
    /// The job returned an error.
    Failed {
        /// The error's `Display` text.
        message: String,
    },
    /// The job panicked; the runner keeps serving.
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The runner has no job of that name.
    UnknownJob,
    /// The argument did not decode as the job's argument type.
    BadArgs {
        /// The decoder's error.
        message: String,
    },
    /// The job's result did not encode.
    BadResult {
        /// The encoder's error.
        message: String,
    },
    /// The job ran past its deadline and was aborted.
    TimedOut,
    /// The request was malformed.
    Malformed {
        /// What was wrong.
        message: String,
    },
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

fn config() -> Configuration {
    bincode::config::standard()
}

/// Appends one frame holding `value` to `buf`, encoding straight into it.
pub fn encode_frame_into<T: Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    value: &T,
) -> Result<(), WireError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    bincode::serde::encode_into_std_write(value, buf, config())
        .map_err(|e| WireError::Encode(e.to_string()))?;
    let len = u32::try_from(buf.len() - start - 4).map_err(|_| WireError::TooLarge {
        len: (buf.len() - start - 4) as u64,
        limit: u32::MAX.into(),
    })?;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// One frame holding `value`, as its own buffer.
pub fn encode_payload_frame<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, WireError> {
    let mut buf = Vec::new();
    encode_frame_into(&mut buf, value)?;
    Ok(buf)
}

/// Decodes a frame body.
///
/// Bincode allocates a string's or byte buffer's announced length before it reads it, so an
/// unbounded decode of a hostile length aborts the process. Every decode here carries a limit on
/// what it may claim. Bincode claims `size_of::<T>()` for each primitive it decodes, which is up
/// to 16 times its varint encoding (a small `u128`), so the limit is the smallest power of 16 (at
/// least 64 KiB) not below 16 times the body's length: valid data always fits, and a hostile
/// length can claim at most 256 times the bytes actually received.
pub fn decode_payload<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    const MIB: usize = 1 << 20;
    match bytes.len().saturating_mul(16) {
        0..=65_536 => decode_limited::<T, { 64 << 10 }>(bytes),
        65_537..=1_048_576 => decode_limited::<T, MIB>(bytes),
        1_048_577..=16_777_216 => decode_limited::<T, { 16 * MIB }>(bytes),
        16_777_217..=268_435_456 => decode_limited::<T, { 256 * MIB }>(bytes),
        268_435_457..=4_294_967_296 => decode_limited::<T, { 4096 * MIB }>(bytes),
        _ => decode_limited::<T, { usize::MAX }>(bytes),
    }
}

fn decode_limited<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<T, WireError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config().with_limit::<LIMIT>())
        .map_err(|e| WireError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(WireError::Decode(format!(
            "{} trailing bytes after the value",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// Splits the first frame off `bytes`: its body, and what follows it. The body may be at most
/// `limit` bytes.
pub fn split_frame(bytes: &[u8], limit: usize) -> Result<(&[u8], &[u8]), WireError> {
    let Some((prefix, rest)) = bytes.split_first_chunk::<4>() else {
        return Err(WireError::Truncated);
    };
    let len = u32::from_be_bytes(*prefix) as usize;
    if len > limit {
        return Err(WireError::TooLarge {
            len: len as u64,
            limit: limit as u64,
        });
    }
    if len > rest.len() {
        return Err(WireError::Truncated);
    }
    Ok(rest.split_at(len))
}

/// Reads a whole message, up to the peer's FIN, of at most `limit` bytes.
///
/// Reading to the end, rather than frame by frame, spares the stream a STOP_SENDING frame that
/// quinn would otherwise send when a half-read stream is dropped.
pub async fn read_message(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Vec<u8>, WireError> {
    recv.read_to_end(limit).await.map_err(|e| match e {
        quinn::ReadToEndError::TooLong => WireError::TooLarge {
            len: limit as u64 + 1,
            limit: limit as u64,
        },
        quinn::ReadToEndError::Read(e) => WireError::Read(e),
    })
}

/// The longest message that holds a head frame and a payload frame of at most `max_payload`.
#[must_use]
pub fn message_limit(max_payload: usize) -> usize {
    MAX_HEAD_LEN.saturating_add(max_payload).saturating_add(8)
}

/// Reads one frame body of at most `limit` bytes.
pub async fn read_frame(recv: &mut quinn::RecvStream, limit: usize) -> Result<Vec<u8>, WireError> {
    let mut prefix = [0; 4];
    recv.read_exact(&mut prefix).await?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > limit {
        return Err(WireError::TooLarge {
            len: len as u64,
            limit: limit as u64,
        });
    }
    let mut body = vec![0; len];
    recv.read_exact(&mut body).await?;
    Ok(body)
}

/// Reads and decodes one head frame.
pub async fn read_head<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<T, WireError> {
    decode_payload(&read_frame(recv, MAX_HEAD_LEN).await?)
}

/// Encodes and writes one frame.
pub async fn write_frame<T: Serialize + ?Sized>(
    send: &mut quinn::SendStream,
    value: &T,
) -> Result<(), WireError> {
    send.write_all(&encode_payload_frame(value)?).await?;
    Ok(())
}

/// Encodes a whole call request, head and argument, into one buffer.
pub(crate) fn encode_request<A: Serialize>(
    job: &str,
    timeout_ms: u64,
    args: &A,
) -> Result<Vec<u8>, WireError> {
    let mut buf = Vec::with_capacity(64 + job.len());
    encode_frame_into(
        &mut buf,
        &CallHead {
            job: job.into(),
            timeout_ms,
        },
    )?;
    encode_frame_into(&mut buf, args)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let buf = encode_payload_frame(&("hello", 42u64, vec![1u8, 2, 3])).unwrap();
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 4);
        let back: (String, u64, Vec<u8>) = decode_payload(&buf[4..]).unwrap();
        assert_eq!(back, ("hello".into(), 42, vec![1, 2, 3]));
    }

    #[test]
    fn hostile_inner_length_is_an_error_not_an_allocation() {
        // A string that claims u64::MAX / 2 bytes: varint tag 0xFD then a u64.
        let mut body = vec![0xFD];
        body.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        let err = decode_payload::<String>(&body).unwrap_err();
        assert!(matches!(err, WireError::Decode(_)), "{err}");
        // The same within a large frame: the claim is still bounded by the frame's size class.
        let mut big = vec![0xFD];
        big.extend_from_slice(&(3u64 << 30).to_le_bytes());
        big.resize(100_000, 0);
        assert!(decode_payload::<Vec<u8>>(&big).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut buf = encode_payload_frame(&7u32).unwrap();
        buf.push(0);
        assert!(matches!(
            decode_payload::<u32>(&buf[4..]),
            Err(WireError::Decode(_))
        ));
    }

    #[test]
    fn large_valid_payloads_fit_their_size_class() {
        for len in [4090, 4096, 70_000, 1 << 20, (1 << 20) + 1] {
            let data = vec![7u8; len];
            let buf = encode_payload_frame(&data).unwrap();
            let back: Vec<u8> = decode_payload(&buf[4..]).unwrap();
            assert_eq!(back.len(), len);
        }
        // Small u128s take one byte each on the wire but claim sixteen.
        let wide = vec![0u128; 300_000];
        let buf = encode_payload_frame(&wide).unwrap();
        assert_eq!(decode_payload::<Vec<u128>>(&buf[4..]).unwrap(), wide);
    }
}
