//! Framing: a big-endian `u32` length, then the body. The one frame writer is
//! [`Chunks::push_frame`]; the one frame reader is [`read_frame`] for a stream still open and
//! [`Message::split_frame`] for one read to its end, both checking the length with
//! [`body_len`].

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::buffers::{Chunks, Message};
use super::{codec, WireError, MAX_HEAD_LEN};

/// The length prefix's size.
const PREFIX_LEN: usize = 4;

/// The body length a prefix announces, refused above `limit` before anything is allocated.
fn body_len(prefix: [u8; PREFIX_LEN], limit: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > limit {
        return Err(WireError::TooLarge {
            len: len as u64,
            limit: limit as u64,
        });
    }
    Ok(len)
}

/// The prefix for a body of `len` bytes.
fn prefix(len: usize) -> Result<[u8; PREFIX_LEN], WireError> {
    let len = u32::try_from(len).map_err(|_| WireError::TooLarge {
        len: len as u64,
        limit: u32::MAX.into(),
    })?;
    Ok(len.to_be_bytes())
}

impl Chunks {
    /// Appends one frame holding `value`.
    ///
    /// # Errors
    /// [`WireError::Encode`] if `value` does not encode, or if the frame would start past the
    /// first 64 KiB (only the last frame of a message may be large).
    pub fn push_frame<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), WireError> {
        let start = self.start_frame(PREFIX_LEN)?;
        codec::encode(value, &mut *self)?;
        let body = self.len() - start - PREFIX_LEN;
        self.end_frame(start, &prefix(body)?);
        Ok(())
    }
}

impl Message {
    /// Takes the first frame off the message and returns its body, of at most `limit` bytes.
    ///
    /// # Errors
    /// [`WireError::Truncated`] if the message ends inside the frame, [`WireError::TooLarge`]
    /// if its prefix announces more than `limit`.
    pub fn split_frame(&mut self, limit: usize) -> Result<Message, WireError> {
        if self.len() < PREFIX_LEN {
            return Err(WireError::Truncated);
        }
        let mut prefix = [0; PREFIX_LEN];
        self.take_into(&mut prefix);
        let len = body_len(prefix, limit)?;
        if len > self.len() {
            return Err(WireError::Truncated);
        }
        Ok(self.split_to(len))
    }
}

/// One frame holding `value`, as one buffer.
pub fn encode_frame<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, WireError> {
    let mut chunks = Chunks::new();
    chunks.push_frame(value)?;
    let mut parts = chunks.into_bytes();
    Ok(if parts.len() == 1 {
        parts.remove(0)
    } else {
        Bytes::from(parts.concat())
    })
}

/// Reads a whole message, up to the peer's FIN, of at most `limit` bytes.
///
/// Reading to the end, rather than frame by frame, spares the stream a STOP_SENDING frame that
/// quinn would otherwise send when a half-read stream is dropped.
pub async fn read_message(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Message, WireError> {
    let first = recv.read_chunk(usize::MAX, true).await?;
    read_message_after(first, recv, limit).await
}

/// [`read_message`], for a message whose first chunk was read already (`None`: the stream
/// ended before any).
pub async fn read_message_after(
    first: Option<quinn::Chunk>,
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Message, WireError> {
    let mut message = Message::default();
    let mut next = first;
    while let Some(chunk) = next {
        if message.len() + chunk.bytes.len() > limit {
            return Err(WireError::TooLarge {
                len: (message.len() + chunk.bytes.len()) as u64,
                limit: limit as u64,
            });
        }
        message.push(chunk.bytes);
        next = recv.read_chunk(usize::MAX, true).await?;
    }
    Ok(message)
}

/// The longest message that holds a head frame and a payload frame of at most `max_payload`.
#[must_use]
pub fn message_limit(max_payload: usize) -> usize {
    MAX_HEAD_LEN
        .saturating_add(max_payload)
        .saturating_add(2 * PREFIX_LEN)
}

/// Reads one frame of at most `limit` bytes from a stream that stays open, and returns its
/// body as the chunks quinn delivered.
pub async fn read_frame(recv: &mut quinn::RecvStream, limit: usize) -> Result<Message, WireError> {
    let mut prefix = [0; PREFIX_LEN];
    recv.read_exact(&mut prefix).await?;
    let len = body_len(prefix, limit)?;
    let mut body = Message::default();
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await? {
            Some(chunk) => body.push(chunk.bytes),
            None => return Err(WireError::Truncated),
        }
    }
    Ok(body)
}

/// Reads and decodes one head frame.
pub async fn read_head<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<T, WireError> {
    read_frame(recv, MAX_HEAD_LEN).await?.decode()
}

/// Encodes and writes one frame.
pub async fn write_frame<T: Serialize + ?Sized>(
    send: &mut quinn::SendStream,
    value: &T,
) -> Result<(), WireError> {
    send.write_all(&encode_frame(value)?).await?;
    Ok(())
}
