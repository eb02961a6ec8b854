//! The codec: bincode 2.0.1's format, serde API, standard configuration. Values are encoded by
//! bincode, and decoded by [`decoder`](super::decoder), which reads the same format but
//! checks every length it reads against the bytes left before it allocates or loops, which
//! bincode's decoder does not. This is the only file that names bincode, so that it could be
//! swapped for another codec without touching the rest.
//!
//! RUSTSEC-2025-0141 marks bincode unmaintained, not vulnerable; the project keeps 2.0.1 pinned
//! (see the README), and uses it only to encode.

use bincode::config::Configuration;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::buffers::{Chunks, Message};
use super::{decoder, WireError};

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

/// Decodes a frame body, bounded by what it holds (see `wire/decoder.rs`).
///
/// # Errors
/// [`WireError::Decode`] if `bytes` is not one value of type `T`, or claims more than it holds.
pub fn decode_payload<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let (value, rest) = decoder::decode::<T, _>(bytes).map_err(|e| WireError::Decode(e.0))?;
    if !rest.is_empty() {
        return Err(WireError::Decode(format!(
            "{} trailing bytes after the value",
            rest.len()
        )));
    }
    Ok(value)
}

impl Message {
    /// Decodes the whole message as one value, with the same bounds as [`decode_payload`].
    ///
    /// # Errors
    /// [`WireError::Decode`] if it is not one value of type `T`.
    pub fn decode<T: DeserializeOwned>(self) -> Result<T, WireError> {
        match self.remaining() {
            [] => return decode_payload(&[]),
            [only] => return decode_payload(only),
            _ => {}
        }
        let (value, rest) = decoder::decode::<T, _>(self).map_err(|e| WireError::Decode(e.0))?;
        if !rest.is_empty() {
            return Err(WireError::Decode(format!(
                "{} trailing bytes after the value",
                rest.len()
            )));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde::Deserialize;

    use super::*;

    /// Every shape serde has: what bincode encodes, the decoder must read back the same.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Unit,
        Newtype(i64),
        Tuple(u8, i8, char),
        Struct { a: u128, b: i128, c: Option<f64> },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Everything {
        flag: bool,
        small: (u16, i16, u32, i32),
        float: f32,
        text: String,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        list: Vec<u64>,
        map: BTreeMap<String, Vec<i32>>,
        shapes: Vec<Shape>,
        nested: Option<Box<Everything>>,
        unit: (),
    }

    fn shape() -> impl Strategy<Value = Shape> {
        prop_oneof![
            Just(Shape::Unit),
            any::<i64>().prop_map(Shape::Newtype),
            (any::<u8>(), any::<i8>(), any::<char>()).prop_map(|(a, b, c)| Shape::Tuple(a, b, c)),
            (any::<u128>(), any::<i128>(), any::<Option<f64>>())
                .prop_map(|(a, b, c)| Shape::Struct { a, b, c }),
        ]
    }

    fn everything() -> impl Strategy<Value = Everything> {
        let leaf = (
            any::<bool>(),
            any::<(u16, i16, u32, i32)>(),
            any::<f32>(),
            any::<String>(),
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(any::<u64>(), 0..20),
            proptest::collection::btree_map(
                any::<String>(),
                proptest::collection::vec(any::<i32>(), 0..4),
                0..4,
            ),
            proptest::collection::vec(shape(), 0..6),
        )
            .prop_map(
                |(flag, small, float, text, bytes, list, map, shapes)| Everything {
                    flag,
                    small,
                    float,
                    text,
                    bytes,
                    list,
                    map,
                    shapes,
                    nested: None,
                    unit: (),
                },
            );
        leaf.prop_recursive(3, 8, 1, |inner| {
            (inner.clone(), inner).prop_map(|(mut outer, nested)| {
                outer.nested = Some(Box::new(nested));
                outer
            })
        })
    }

    /// Floats compare by bits, so that a NaN equals itself.
    fn same(a: &Everything, b: &Everything) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    proptest! {
        #[test]
        fn what_bincode_encodes_decodes_as_bincode_decodes_it(value in everything()) {
            let bytes = encode_value(&value).unwrap();
            let ours: Everything = decode_payload(&bytes).unwrap();
            let (theirs, used): (Everything, usize) =
                bincode::serde::decode_from_slice(&bytes, config()).unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert!(same(&ours, &value), "{:?} != {:?}", ours, value);
            prop_assert!(same(&theirs, &value));
            // Split anywhere into chunks, as quinn delivers it, it decodes the same.
            let cut = bytes.len() / 3;
            let mut message = Message::default();
            message.push(bytes::Bytes::copy_from_slice(&bytes[..cut]));
            message.push(bytes::Bytes::copy_from_slice(&bytes[cut..]));
            let chunked: Everything = message.decode().unwrap();
            prop_assert!(same(&chunked, &value));
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_payload::<Everything>(&bytes);
        }
    }

    /// A byte string that claims `claim` bytes: the varint marker 0xFD, then a `u64`.
    fn claiming(claim: u64) -> Vec<u8> {
        let mut body = vec![0xFD];
        body.extend_from_slice(&claim.to_le_bytes());
        body
    }

    #[test]
    fn a_length_past_the_input_is_refused_before_anything_is_allocated() {
        for claim in [10, 1 << 20, 1 << 40, u64::MAX] {
            let hostile = claiming(claim);
            // Strings and byte strings: refused at the length.
            let error = decode_payload::<serde_bytes::ByteBuf>(&hostile).unwrap_err();
            assert!(error.to_string().contains("bytes left"), "{claim}: {error}");
            let error = decode_payload::<String>(&hostile).unwrap_err();
            assert!(error.to_string().contains("bytes left"), "{claim}: {error}");
            // Sequences: a count past the bytes left (beyond the slack for empty elements) is
            // refused at the count; under it, at the first element that is not there.
            for error in [
                decode_payload::<Vec<u8>>(&hostile).unwrap_err(),
                decode_payload::<Vec<Vec<u8>>>(&hostile).unwrap_err(),
            ] {
                let expected = if claim > decoder::MAX_EMPTY_ITEMS as u64 {
                    "bytes left"
                } else {
                    "short of a value"
                };
                assert!(error.to_string().contains(expected), "{claim}: {error}");
            }
        }
        // One byte short of the announced length.
        let mut short = vec![5];
        short.extend_from_slice(b"four");
        assert!(decode_payload::<String>(&short).is_err());
        short.push(b'!');
        assert_eq!(decode_payload::<String>(&short).unwrap(), "four!");
    }

    #[test]
    fn nesting_past_the_limit_is_refused_not_a_stack_overflow() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Tree(Vec<Tree>);
        // Each level: a one-element sequence holding the next.
        let deep = vec![1u8; 100_000];
        let error = decode_payload::<Tree>(&deep).unwrap_err();
        assert!(error.to_string().contains("nested deeper"), "{error}");
        // A level is two: the newtype and its sequence.
        let mut fine = vec![1u8; decoder::MAX_DEPTH / 2 - 1];
        fine.push(0);
        decode_payload::<Tree>(&fine).unwrap();
    }

    #[test]
    fn a_count_of_empty_elements_past_the_slack_is_refused() {
        let mut many = vec![0xFD];
        many.extend_from_slice(&u64::MAX.to_le_bytes());
        let error = decode_payload::<Vec<()>>(&many).unwrap_err();
        assert!(error.to_string().contains("bytes left"), "{error}");
        let honest = encode_value(&vec![(); 100]).unwrap();
        assert_eq!(decode_payload::<Vec<()>>(&honest).unwrap().len(), 100);
    }
}
