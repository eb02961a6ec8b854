//! The codec: bincode 2.0.1, serde API, standard configuration. This is the only file that
//! names bincode, so that it could be swapped for another codec without touching the rest.
//!
//! RUSTSEC-2025-0141 marks bincode unmaintained, not vulnerable; the project keeps 2.0.1 pinned
//! (see the README) and every decode bounded here.

use bincode::config::Configuration;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::buffers::{Chunks, Message};
use super::WireError;

fn config() -> Configuration {
    bincode::config::standard()
}

/// Encodes `value` onto the end of `chunks`.
pub(super) fn encode<T: Serialize + ?Sized>(
    value: &T,
    chunks: &mut Chunks,
) -> Result<(), WireError> {
    bincode::serde::encode_into_writer(value, ChunksWriter(chunks), config())
        .map_err(|e| WireError::Encode(e.to_string()))
}

struct ChunksWriter<'a>(&'a mut Chunks);

impl bincode::enc::write::Writer for ChunksWriter<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0
            .write(bytes)
            .map_err(|_| bincode::error::EncodeError::Other("past the first chunk"))
    }
}

/// Encodes `value` into a buffer of its own, unframed: for messages with their own framing (a
/// fork-server datagram, a boot token).
pub(crate) fn encode_value<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, WireError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| WireError::Encode(e.to_string()))
}

/// Decodes a frame body.
///
/// Bincode allocates a string's or byte buffer's announced length before it reads it, so an
/// unbounded decode of a hostile length aborts the process. Every decode here carries a limit on
/// what it may claim. Bincode claims `size_of::<T>()` for each primitive it decodes, which is up
/// to 16 times its varint encoding (a small `u128`), so the limit is the smallest power of 16 (at
/// least 64 KiB) not below 16 times the body's length: valid data always fits, and a hostile
/// length can claim at most 256 times the bytes actually received. A body too long for any
/// limit (over 4 GiB, which no frame can be) is refused.
pub fn decode_payload<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let mut reader = bincode::de::read::SliceReader::new(bytes);
    let value = decode_bounded::<T, _>(&mut reader, bytes.len())?;
    // A slice reader does not say what is left; peek past the value instead.
    if bincode::de::read::Reader::peek_read(&mut reader, 1).is_some() {
        return Err(WireError::Decode("trailing bytes after the value".into()));
    }
    Ok(value)
}

impl Message {
    /// Decodes the whole message as one value, with the same bounds as [`decode_payload`].
    ///
    /// # Errors
    /// [`WireError::Decode`] if it is not one value of type `T`.
    pub fn decode<T: DeserializeOwned>(self) -> Result<T, WireError> {
        decode_message(self)
    }
}

/// Decodes a whole message as one value, straight from its chunks.
fn decode_message<T: DeserializeOwned>(mut message: Message) -> Result<T, WireError> {
    match message.remaining() {
        [] => return decode_payload(&[]),
        [only] => return decode_payload(only),
        _ => {}
    }
    let len = message.len();
    let value = decode_bounded::<T, _>(MessageReader(&mut message), len)?;
    if !message.is_empty() {
        return Err(WireError::Decode(format!(
            "{} trailing bytes after the value",
            message.len()
        )));
    }
    Ok(value)
}

struct MessageReader<'a>(&'a mut Message);

impl bincode::de::read::Reader for MessageReader<'_> {
    fn read(&mut self, bytes: &mut [u8]) -> Result<(), bincode::error::DecodeError> {
        if bytes.len() > self.0.len() {
            return Err(bincode::error::DecodeError::UnexpectedEnd {
                additional: bytes.len() - self.0.len(),
            });
        }
        self.0.take_into(bytes);
        Ok(())
    }
}

/// Decodes one value of an input of `len` bytes, with the claim limit for that length.
fn decode_bounded<T: DeserializeOwned, R: bincode::de::read::Reader>(
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
        4_294_967_297..=68_719_476_736 => decode_limited::<T, R, { 65_536 * MIB }>(reader),
        _ => Err(WireError::TooLarge {
            len: len as u64,
            limit: u32::MAX.into(),
        }),
    }
}

fn decode_limited<T: DeserializeOwned, R: bincode::de::read::Reader, const LIMIT: usize>(
    reader: R,
) -> Result<T, WireError> {
    bincode::serde::decode_from_reader(reader, config().with_limit::<LIMIT>())
        .map_err(|e| WireError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte string that claims `claim` bytes: bincode's varint tag 0xFD, then a `u64`.
    fn claiming(claim: u64) -> Vec<u8> {
        let mut body = vec![0xFD];
        body.extend_from_slice(&claim.to_le_bytes());
        body
    }

    #[test]
    fn a_claim_past_a_large_body_s_limit_is_refused() {
        // Bodies over 256 MiB used to decode with no limit at all. Their limit is now 16 times
        // their length, rounded up to a power of 16: a claim past it is refused, not allocated.
        for len in [300usize << 20, 4 << 30] {
            let hostile = claiming(1 << 40);
            let reader = bincode::de::read::SliceReader::new(&hostile);
            let error = decode_bounded::<Vec<u8>, _>(reader, len).unwrap_err();
            assert!(matches!(error, WireError::Decode(_)), "{len}: {error}");
        }
    }

    #[test]
    fn a_body_longer_than_any_frame_is_refused_before_decoding() {
        let hostile = claiming(1 << 20);
        let reader = bincode::de::read::SliceReader::new(&hostile);
        let error = decode_bounded::<Vec<u8>, _>(reader, 5 << 30).unwrap_err();
        assert!(matches!(error, WireError::TooLarge { .. }), "{error}");
    }
}
