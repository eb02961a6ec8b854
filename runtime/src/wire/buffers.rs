//! The buffers frames are written into and read from: [`Chunks`] to send without copying,
//! [`Message`] for what was received, kept as the chunks quinn delivered.

use bytes::{Buf as _, Bytes};
use smallvec::SmallVec;

use super::WireError;

/// The size of each chunk past the first.
pub(super) const CHUNK: usize = 64 << 10;

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

    /// Starts a frame: reserves its length prefix, to be filled by [`Chunks::end_frame`], and
    /// returns where it is. A frame must start within the first 64 KiB (only the last frame of
    /// a message may be large), where the prefix can be written back in place.
    pub(super) fn start_frame(&mut self, prefix_len: usize) -> Result<usize, WireError> {
        if !self.full.is_empty() || !self.current.is_empty() {
            return Err(WireError::Encode(
                "a frame must start within the first 64 KiB of a message".into(),
            ));
        }
        let start = self.first.len();
        self.first.resize(start + prefix_len, 0);
        Ok(start)
    }

    /// Fills in the prefix of the frame that [`Chunks::start_frame`] started at `start`.
    pub(super) fn end_frame(&mut self, start: usize, prefix: &[u8]) {
        self.first[start..start + prefix.len()].copy_from_slice(prefix);
    }

    /// A list that refuses to grow past its first 64 KiB: a frame that would is cut short, with
    /// [`spilled`](Chunks::spilled) set.
    pub(crate) fn first_chunk_only() -> Self {
        Self {
            first_only: true,
            ..Self::new()
        }
    }

    /// Whether a frame was cut short at the end of the first 64 KiB.
    pub(crate) fn spilled(&self) -> bool {
        self.spilled
    }

    /// Appends encoded bytes. Fails only for a first-chunk-only list that would grow past it.
    pub(super) fn write(&mut self, mut bytes: &[u8]) -> Result<(), Spilled> {
        if self.full.is_empty() && self.current.is_empty() {
            let n = CHUNK.saturating_sub(self.first.len()).min(bytes.len());
            self.first.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        if self.first_only && !bytes.is_empty() {
            self.spilled = true;
            return Err(Spilled);
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

/// A first-chunk-only [`Chunks`] was asked to grow past its first chunk.
#[derive(Debug)]
pub(super) struct Spilled;

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

    /// Appends a chunk received.
    pub(super) fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        self.chunks.push(chunk);
    }

    /// The chunks not yet taken.
    pub(super) fn remaining(&self) -> &[Bytes] {
        &self.chunks[self.next..]
    }

    /// Takes the first `len` bytes off the message, as a message of their own; `len` is at
    /// most [`Message::len`].
    pub(super) fn split_to(&mut self, len: usize) -> Message {
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
        body
    }

    /// Fills `out` from the front of the message, which holds at least that much.
    pub(super) fn take_into(&mut self, out: &mut [u8]) {
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
