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
//! by a payload frame (the encoded result) when the head is [`ReplyHead::Ok`]. A streaming job
//! answers with any number of [`ReplyHead::Item`] heads, each followed by a payload frame, then
//! [`ReplyHead::End`] or an error head. The parent cancels a call by resetting its stream with
//! [`stream::CANCELLED`].

use bincode::config::Configuration;
use bytes::{Buf as _, Bytes};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use uuid::Uuid;

use crate::registry::Manifest;

/// The protocol version, sent as the first two bytes of the control stream.
pub const PROTOCOL_VERSION: u16 = 3;

/// The TLS application protocol name. It carries no version: a version mismatch must reach the
/// parent, which refuses it with an error that names both versions.
pub const ALPN: &[u8] = b"firebrand";

/// The largest head frame ([`Hello`], [`CallHead`], [`ReplyHead`], [`ControlMessage`]).
pub const MAX_HEAD_LEN: usize = 1 << 20;

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
    /// The call's trace id, which the runner's log lines for the call carry.
    pub trace_id: u128,
    /// The runner-side resource the call uses; 0 for none.
    pub resource: u64,
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
    /// A streaming job's item: a payload frame follows, then the next head.
    Item,
    /// A streaming job has yielded its last item.
    End,
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
    bincode::serde::encode_into_writer(value, VecWriter(buf), config())
        .map_err(|e| WireError::Encode(e.to_string()))?;
    let len = u32::try_from(buf.len() - start - 4).map_err(|_| WireError::TooLarge {
        len: (buf.len() - start - 4) as u64,
        limit: u32::MAX.into(),
    })?;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Appends straight to a `Vec`: bincode's `std::io::Write` adapter costs a dynamic write per
/// primitive.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for VecWriter<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Frames encoded as a list of chunks for quinn to send without copying.
///
/// The first 64 KiB go into one growable buffer, which holds every frame's length prefix (a
/// frame must start there) and is all a small call ever needs. Past that, bytes go into 64 KiB
/// chunks: small enough for the allocator to recycle, where one large buffer would be a fresh
/// mapping whose every page faults when written.
#[derive(Debug, Default)]
pub struct Chunks {
    first: Vec<u8>,
    full: Vec<Bytes>,
    current: Vec<u8>,
    /// Set to refuse anything past the first 64 KiB: encoding stops there, with `spilled` set.
    first_only: bool,
    spilled: bool,
}

const CHUNK: usize = 64 << 10;

impl Chunks {
    /// An empty list with room for a small call.
    #[must_use]
    pub fn new() -> Self {
        Self {
            first: Vec::with_capacity(256),
            ..Self::default()
        }
    }

    /// How many bytes it holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.first.len() + self.full.iter().map(Bytes::len).sum::<usize>() + self.current.len()
    }

    /// Whether it holds nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends one frame holding `value`.
    ///
    /// # Errors
    /// [`WireError::Encode`] if `value` does not encode, or if the frame would start past the
    /// first 64 KiB (only the last frame of a message may be large).
    pub fn push_frame<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), WireError> {
        if !self.full.is_empty() || !self.current.is_empty() {
            return Err(WireError::Encode(
                "a frame must start within the first 64 KiB of a message".into(),
            ));
        }
        let start = self.first.len();
        self.first.extend_from_slice(&[0; 4]);
        bincode::serde::encode_into_writer(value, &mut *self, config())
            .map_err(|e| WireError::Encode(e.to_string()))?;
        let body = self.len() - start - 4;
        let len = u32::try_from(body).map_err(|_| WireError::TooLarge {
            len: body as u64,
            limit: u32::MAX.into(),
        })?;
        self.first[start..start + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// The chunks, in order.
    #[must_use]
    pub fn into_bytes(self) -> SmallVec<[Bytes; 2]> {
        let mut out = SmallVec::with_capacity(self.full.len() + 2);
        // An exact-size buffer becomes `Bytes` without a separate reference-count allocation.
        out.push(Bytes::from(self.first.into_boxed_slice()));
        out.extend(self.full);
        if !self.current.is_empty() {
            out.push(Bytes::from(self.current));
        }
        out
    }
}

impl bincode::enc::write::Writer for &mut Chunks {
    fn write(&mut self, mut bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        if self.full.is_empty() && self.current.is_empty() {
            let n = CHUNK.saturating_sub(self.first.len()).min(bytes.len());
            self.first.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        if self.first_only && !bytes.is_empty() {
            self.spilled = true;
            return Err(bincode::error::EncodeError::Other("past the first chunk"));
        }
        while !bytes.is_empty() {
            if self.current.len() == CHUNK {
                let full = std::mem::replace(&mut self.current, Vec::with_capacity(CHUNK));
                self.full.push(Bytes::from(full));
            }
            if self.current.capacity() == 0 {
                self.current.reserve_exact(CHUNK);
            }
            let n = (CHUNK - self.current.len()).min(bytes.len());
            self.current.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        Ok(())
    }
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
    let mut reader = bincode::de::read::SliceReader::new(bytes);
    let value = decode_ladder::<T, _>(&mut reader, bytes.len())?;
    // A slice reader does not say what is left; peek past the value instead.
    if bincode::de::read::Reader::peek_read(&mut reader, 1).is_some() {
        return Err(WireError::Decode("trailing bytes after the value".into()));
    }
    Ok(value)
}

/// Decodes one value of an input of `len` bytes, with the claim limit for that length.
fn decode_ladder<T: DeserializeOwned, R: bincode::de::read::Reader>(
    reader: R,
    len: usize,
) -> Result<T, WireError> {
    const MIB: usize = 1 << 20;
    match len.saturating_mul(16) {
        0..=65_536 => decode_limited::<T, R, { 64 << 10 }>(reader),
        65_537..=1_048_576 => decode_limited::<T, R, MIB>(reader),
        1_048_577..=16_777_216 => decode_limited::<T, R, { 16 * MIB }>(reader),
        16_777_217..=268_435_456 => decode_limited::<T, R, { 256 * MIB }>(reader),
        268_435_457..=4_294_967_296 => decode_limited::<T, R, { 4096 * MIB }>(reader),
        _ => decode_limited::<T, R, { usize::MAX }>(reader),
    }
}

fn decode_limited<T: DeserializeOwned, R: bincode::de::read::Reader, const LIMIT: usize>(
    reader: R,
) -> Result<T, WireError> {
    bincode::serde::decode_from_reader(reader, config().with_limit::<LIMIT>())
        .map_err(|e| WireError::Decode(e.to_string()))
}

/// A message read to its end, kept as the chunks quinn delivered: large payloads are decoded
/// straight from them, never gathered into one buffer first.
#[derive(Debug, Default)]
pub struct Message {
    // Most messages arrive in one or two chunks: those need no allocation. Consumed chunks are
    // skipped with a cursor rather than shifted out.
    chunks: SmallVec<[Bytes; 2]>,
    next: usize,
    len: usize,
}

impl Message {
    /// Its length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is left.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes the first frame off the message and returns its body, of at most `limit` bytes.
    pub fn split_frame(&mut self, limit: usize) -> Result<Message, WireError> {
        if self.len < 4 {
            return Err(WireError::Truncated);
        }
        let mut prefix = [0; 4];
        self.take_into(&mut prefix);
        let len = u32::from_be_bytes(prefix) as usize;
        if len > limit {
            return Err(WireError::TooLarge {
                len: len as u64,
                limit: limit as u64,
            });
        }
        if len > self.len {
            return Err(WireError::Truncated);
        }
        let mut body = Message::default();
        while body.len < len {
            let front = &mut self.chunks[self.next];
            let piece = front.split_to(front.len().min(len - body.len));
            if front.is_empty() {
                self.next += 1;
            }
            body.len += piece.len();
            body.chunks.push(piece);
        }
        self.len -= len;
        Ok(body)
    }

    /// Decodes the whole message as one value, with the same bounds as [`decode_payload`].
    pub fn decode<T: DeserializeOwned>(mut self) -> Result<T, WireError> {
        match &self.chunks[self.next..] {
            [] => return decode_payload(&[]),
            [only] => return decode_payload(only),
            _ => {}
        }
        let len = self.len;
        let value = decode_ladder::<T, _>(&mut self, len)?;
        if !self.is_empty() {
            return Err(WireError::Decode(format!(
                "{} trailing bytes after the value",
                self.len
            )));
        }
        Ok(value)
    }

    fn take_into(&mut self, out: &mut [u8]) {
        let mut filled = 0;
        while filled < out.len() {
            let front = &mut self.chunks[self.next];
            let n = front.len().min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                self.next += 1;
            }
            filled += n;
        }
        self.len -= out.len();
    }
}

impl bincode::de::read::Reader for Message {
    fn read(&mut self, bytes: &mut [u8]) -> Result<(), bincode::error::DecodeError> {
        if bytes.len() > self.len {
            return Err(bincode::error::DecodeError::UnexpectedEnd {
                additional: bytes.len() - self.len,
            });
        }
        self.take_into(bytes);
        Ok(())
    }
}

/// Reads a whole message, up to the peer's FIN, of at most `limit` bytes.
///
/// Reading to the end, rather than frame by frame, spares the stream a STOP_SENDING frame that
/// quinn would otherwise send when a half-read stream is dropped.
pub async fn read_message(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Message, WireError> {
    let mut message = Message::default();
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        message.len += chunk.bytes.len();
        if message.len > limit {
            return Err(WireError::TooLarge {
                len: message.len as u64,
                limit: limit as u64,
            });
        }
        message.chunks.push(chunk.bytes);
    }
    Ok(message)
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

/// [`CallHead`] as the parent encodes it, without copying the job name.
#[derive(Serialize)]
pub(crate) struct CallHeadRef<'a> {
    pub(crate) job: &'a str,
    pub(crate) timeout_ms: u64,
    pub(crate) trace_id: u128,
    pub(crate) resource: u64,
}

/// Encodes a whole call request, head and argument. An argument whose encoding is longer than
/// `max_payload_len` is refused here, before anything is sent, as the runner would refuse it.
pub(crate) fn encode_request<A: Serialize>(
    job: &str,
    timeout_ms: u64,
    trace_id: u128,
    resource: u64,
    args: &A,
    max_payload_len: usize,
) -> Result<SmallVec<[Bytes; 2]>, WireError> {
    let head = CallHeadRef {
        job,
        timeout_ms,
        trace_id,
        resource,
    };
    encode_request_into(Chunks::new(), &head, args, max_payload_len)?
        .ok_or_else(|| WireError::Encode("a request without a size bound spilled".into()))
}

/// [`encode_request`] for a call's request (no resource) that fits in the first 64 KiB; `None`,
/// having encoded at most that much, for one that does not, which is then worth encoding off
/// the caller's thread.
pub(crate) fn encode_small_request<A: Serialize>(
    head: &CallHeadRef<'_>,
    args: &A,
    max_payload_len: usize,
) -> Result<Option<SmallVec<[Bytes; 2]>>, WireError> {
    let chunks = Chunks {
        first_only: true,
        ..Chunks::new()
    };
    encode_request_into(chunks, head, args, max_payload_len)
}

/// The request in `chunks`, or `None` if they hold only a first chunk and it overflowed.
fn encode_request_into<A: Serialize>(
    mut chunks: Chunks,
    head: &CallHeadRef<'_>,
    args: &A,
    max_payload_len: usize,
) -> Result<Option<SmallVec<[Bytes; 2]>>, WireError> {
    chunks.push_frame(head)?;
    let head_len = chunks.len();
    match chunks.push_frame(args) {
        Ok(()) => {}
        Err(_) if chunks.spilled => return Ok(None),
        Err(e) => return Err(e),
    }
    // Less the argument frame's 4-byte length prefix.
    let args_len = chunks.len() - head_len - 4;
    if args_len > max_payload_len {
        return Err(WireError::Encode(format!(
            "the argument is {args_len} bytes encoded, more than the pool's max_payload_len of \
             {max_payload_len} bytes"
        )));
    }
    Ok(Some(chunks.into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_borrowed_head_encodes_like_the_owned_one() {
        let owned = encode_payload_frame(&CallHead {
            job: "x.y".into(),
            timeout_ms: 99,
            trace_id: 7,
            resource: 3,
        })
        .unwrap();
        let borrowed = encode_payload_frame(&CallHeadRef {
            job: "x.y",
            timeout_ms: 99,
            trace_id: 7,
            resource: 3,
        })
        .unwrap();
        assert_eq!(owned, borrowed);
    }

    #[test]
    fn chunked_frames_match_contiguous_ones() {
        for len in [0, 10, CHUNK - 20, CHUNK, 3 * CHUNK + 17] {
            let head = CallHead {
                job: "j".into(),
                timeout_ms: 5,
                trace_id: 1,
                resource: 0,
            };
            let payload = serde_bytes::ByteBuf::from(vec![3u8; len]);
            let mut chunks = Chunks::new();
            chunks.push_frame(&head).unwrap();
            chunks.push_frame(&payload).unwrap();
            let mut contiguous = encode_payload_frame(&head).unwrap();
            encode_frame_into(&mut contiguous, &payload).unwrap();
            assert_eq!(chunks.len(), contiguous.len());
            let joined: Vec<u8> = chunks.into_bytes().concat();
            assert_eq!(joined, contiguous, "payload of {len} bytes");
        }
        let mut large = Chunks::new();
        large
            .push_frame(&serde_bytes::ByteBuf::from(vec![0u8; 2 * CHUNK]))
            .unwrap();
        assert!(matches!(large.push_frame(&1u8), Err(WireError::Encode(_))));
    }

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

    /// A message cut into chunks of `size` bytes, as quinn might deliver it.
    fn chunked(bytes: &[u8], size: usize) -> Message {
        let mut message = Message::default();
        for chunk in bytes.chunks(size) {
            message.len += chunk.len();
            message.chunks.push(Bytes::copy_from_slice(chunk));
        }
        message
    }

    #[test]
    fn messages_split_and_decode_across_chunk_boundaries() {
        let head = CallHead {
            job: "a.job".into(),
            timeout_ms: 1234,
            trace_id: u128::MAX,
            resource: u64::MAX,
        };
        let payload = serde_bytes::ByteBuf::from((0..5000u32).map(|i| i as u8).collect::<Vec<_>>());
        let mut bytes = encode_payload_frame(&head).unwrap();
        encode_frame_into(&mut bytes, &payload).unwrap();
        for size in [1, 3, 7, 1200, bytes.len()] {
            let mut message = chunked(&bytes, size);
            let back: CallHead = message.split_frame(MAX_HEAD_LEN).unwrap().decode().unwrap();
            assert_eq!((back.job.as_str(), back.timeout_ms), ("a.job", 1234));
            let body = message.split_frame(1 << 20).unwrap();
            assert!(message.is_empty());
            let back: serde_bytes::ByteBuf = body.decode().unwrap();
            assert_eq!(back, payload, "chunks of {size}");
        }
    }

    #[test]
    fn chunked_messages_refuse_hostile_and_short_frames() {
        let mut huge = chunked(&u32::MAX.to_be_bytes(), 1);
        assert!(matches!(
            huge.split_frame(1 << 20),
            Err(WireError::TooLarge { .. })
        ));
        let mut short = chunked(&[0, 0, 0, 9, 1, 2], 2);
        assert!(matches!(short.split_frame(100), Err(WireError::Truncated)));
        // A string claiming an absurd length, spread over chunks.
        let mut body = vec![0xFD];
        body.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(matches!(
            chunked(&body, 2).decode::<String>(),
            Err(WireError::Decode(_))
        ));
        let mut trailing = encode_payload_frame(&7u32).unwrap()[4..].to_vec();
        trailing.push(0);
        assert!(matches!(
            chunked(&trailing, 1).decode::<u32>(),
            Err(WireError::Decode(_))
        ));
    }
}
