//! The decoder of the codec's format (bincode 2's standard configuration: varint integers,
//! little-endian floats, lengths before strings, byte strings, sequences and maps), as a serde
//! `Deserializer` that never trusts a length it reads.
//!
//! bincode's own decoder allocates a string's or byte string's announced length before it
//! reads the bytes, and bounds that only by a fixed limit, so a small frame could make the
//! receiver allocate many times its size. This one refuses, before allocating, a length longer
//! than what is left of the input; hints a sequence's or map's length to serde as at most the
//! bytes left (each element takes at least one); and refuses nesting deeper than
//! [`MAX_DEPTH`], which would otherwise overflow the stack on a recursive type. So what a
//! frame claims costs nothing until the bytes are there. (A decoded value may still be
//! larger in memory than on the wire, a `Vec<u64>` of small numbers eight times, say; that
//! grows element by element as the bytes are read.)
//!
//! Encoding stays with bincode (`codec.rs`); `codec.rs`'s tests check that every shape serde
//! has decodes here as bincode decodes it.

use serde::de::{self, DeserializeSeed, IntoDeserializer as _, Visitor};

use super::buffers::Message;

/// The deepest nesting of sequences, maps, structs, enums and options a value may have.
pub(crate) const MAX_DEPTH: usize = 128;

/// How many elements a sequence or map may announce beyond one per byte left: elements that
/// take no bytes at all (`()`) are rare, and past this a claimed count is refused before any
/// work, rather than looped over.
pub(crate) const MAX_EMPTY_ITEMS: usize = 4096;

/// Where the bytes come from: one slice, or the chunks of a [`Message`].
pub(super) trait Input {
    /// How many bytes are left.
    fn remaining(&self) -> usize;
    /// Fills `out` from the front; the caller checked that enough is left.
    fn take(&mut self, out: &mut [u8]);
    /// The next byte, if there is one: the hot path of every integer and sequence element.
    fn next_byte(&mut self) -> Option<u8>;
    /// The next `len` bytes as a buffer of their own; the caller checked that enough is left.
    fn take_vec(&mut self, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.take(&mut out);
        out
    }
}

impl Input for &[u8] {
    #[inline]
    fn remaining(&self) -> usize {
        self.len()
    }

    #[inline]
    fn take(&mut self, out: &mut [u8]) {
        let (front, rest) = self.split_at(out.len());
        out.copy_from_slice(front);
        *self = rest;
    }

    #[inline]
    fn next_byte(&mut self) -> Option<u8> {
        let (&byte, rest) = self.split_first()?;
        *self = rest;
        Some(byte)
    }

    fn take_vec(&mut self, len: usize) -> Vec<u8> {
        // Copied once, with no zeroing first.
        let (front, rest) = self.split_at(len);
        *self = rest;
        front.to_vec()
    }
}

impl Input for Message {
    #[inline]
    fn remaining(&self) -> usize {
        self.len()
    }

    #[inline]
    fn take(&mut self, out: &mut [u8]) {
        self.take_into(out);
    }

    #[inline]
    fn next_byte(&mut self) -> Option<u8> {
        if self.is_empty() {
            return None;
        }
        let mut byte = [0];
        self.take_into(&mut byte);
        Some(byte[0])
    }
}

/// The input ended `missing` bytes short of a value.
#[cold]
fn short(missing: usize) -> DecodeError {
    DecodeError(format!("the input ends {missing} bytes short of a value"))
}

#[cold]
fn out_of_range(value: impl std::fmt::Display) -> DecodeError {
    DecodeError(format!("integer {value} out of range"))
}

/// Why a value did not decode.
#[derive(Debug)]
pub(super) struct DecodeError(pub(super) String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

impl de::Error for DecodeError {
    fn custom<T: std::fmt::Display>(message: T) -> Self {
        Self(message.to_string())
    }
}

type Result<T> = std::result::Result<T, DecodeError>;

/// Decodes one value from `input`, and returns what is left of it.
pub(super) fn decode<T: de::DeserializeOwned, I: Input>(input: I) -> Result<(T, I)> {
    let mut decoder = Decoder { input, depth: 0 };
    let value = T::deserialize(&mut decoder)?;
    Ok((value, decoder.input))
}

struct Decoder<I> {
    input: I,
    depth: usize,
}

impl<I: Input> Decoder<I> {
    #[inline]
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let left = self.input.remaining();
        if left < N {
            return Err(short(N - left));
        }
        let mut out = [0; N];
        self.input.take(&mut out);
        Ok(out)
    }

    #[inline]
    fn byte(&mut self) -> Result<u8> {
        self.input.next_byte().ok_or_else(|| short(1))
    }

    /// A varint: one byte up to 250, else a marker (251 to 253) and a little-endian u16, u32 or
    /// u64. `max` is the widest marker the type allows.
    #[inline]
    fn varint(&mut self, max: u8) -> Result<u64> {
        let first = self.byte()?;
        if first <= 250 {
            return Ok(first.into());
        }
        self.wide_varint(first, max)
    }

    #[inline]
    fn wide_varint(&mut self, first: u8, max: u8) -> Result<u64> {
        Ok(match first {
            251 if max >= 251 => u16::from_le_bytes(self.bytes()?).into(),
            252 if max >= 252 => u32::from_le_bytes(self.bytes()?).into(),
            253 if max >= 253 => u64::from_le_bytes(self.bytes()?),
            _ => return Err(DecodeError(format!("invalid integer marker {first}"))),
        })
    }

    /// A u128 varint: as [`varint`](Self::varint), or the marker 254 and a u128.
    fn varint_u128(&mut self) -> Result<u128> {
        let first = self.byte()?;
        match first {
            0..=250 => Ok(first.into()),
            254 => Ok(u128::from_le_bytes(self.bytes()?)),
            _ => self.wide_varint(first, 253).map(u128::from),
        }
    }

    #[inline]
    fn unsigned<T: TryFrom<u64>>(&mut self, max: u8) -> Result<T> {
        let value = self.varint(max)?;
        T::try_from(value).map_err(|_| out_of_range(value))
    }

    /// Zigzag: 0, -1, 1, -2, ... as 0, 1, 2, 3, ...
    #[inline]
    fn signed(&mut self, max: u8) -> Result<i64> {
        let n = self.varint(max)?;
        Ok(if n % 2 == 0 {
            (n / 2) as i64
        } else {
            !((n / 2) as i64)
        })
    }

    /// A length, refused when longer than what is left (plus `slack`): nothing it claims is
    /// allocated, or looped over, before it is checked against the bytes that are there.
    fn len(&mut self, slack: usize) -> Result<usize> {
        let len: u64 = self.unsigned(253)?;
        let left = self.input.remaining();
        match usize::try_from(len) {
            Ok(len) if len <= left.saturating_add(slack) => Ok(len),
            _ => Err(DecodeError(format!(
                "a length of {len} in an input with {left} bytes left"
            ))),
        }
    }

    /// The bytes of a string or byte string: its length, then that many bytes.
    fn byte_buf(&mut self) -> Result<Vec<u8>> {
        let len = self.len(0)?;
        Ok(self.input.take_vec(len))
    }

    #[inline]
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.depth == MAX_DEPTH {
            return Err(DecodeError(format!(
                "nested deeper than {MAX_DEPTH} levels"
            )));
        }
        self.depth += 1;
        let result = f(self);
        self.depth -= 1;
        result
    }
}

macro_rules! unsigned {
    ($method:ident, $visit:ident, $type:ty, $max:expr) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
            visitor.$visit(self.unsigned::<$type>($max)?)
        }
    };
}

macro_rules! signed {
    ($method:ident, $visit:ident, $type:ty, $max:expr) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
            let value = self.signed($max)?;
            let value = <$type>::try_from(value).map_err(|_| out_of_range(value))?;
            visitor.$visit(value)
        }
    };
}

impl<'de, I: Input> de::Deserializer<'de> for &mut Decoder<I> {
    type Error = DecodeError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value> {
        Err(DecodeError(
            "the format does not describe itself: a type must say what it expects".into(),
        ))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.byte()? {
            0 => visitor.visit_bool(false),
            1 => visitor.visit_bool(true),
            other => Err(DecodeError(format!("invalid bool {other}"))),
        }
    }

    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_u8(self.byte()?)
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_i8(self.byte()? as i8)
    }

    unsigned!(deserialize_u16, visit_u16, u16, 251);
    unsigned!(deserialize_u32, visit_u32, u32, 252);
    unsigned!(deserialize_u64, visit_u64, u64, 253);

    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_u128(self.varint_u128()?)
    }
    signed!(deserialize_i16, visit_i16, i16, 251);
    signed!(deserialize_i32, visit_i32, i32, 252);
    signed!(deserialize_i64, visit_i64, i64, 253);

    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let n = self.varint_u128()?;
        visitor.visit_i128(if n % 2 == 0 {
            (n / 2) as i128
        } else {
            !((n / 2) as i128)
        })
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_f32(f32::from_le_bytes(self.bytes()?))
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_f64(f64::from_le_bytes(self.bytes()?))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        // UTF-8, one to four bytes, its width told by the first.
        let mut utf8 = [self.byte()?, 0, 0, 0];
        let width = match utf8[0] {
            0x00..=0x7F => 1,
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            other => return Err(DecodeError(format!("invalid char byte {other:#x}"))),
        };
        for byte in &mut utf8[1..width] {
            *byte = self.byte()?;
        }
        let char = std::str::from_utf8(&utf8[..width])
            .ok()
            .and_then(|s| s.chars().next())
            .ok_or_else(|| DecodeError(format!("invalid char {:?}", &utf8[..width])))?;
        visitor.visit_char(char)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let bytes = self.byte_buf()?;
        let string = String::from_utf8(bytes).map_err(|e| DecodeError(e.to_string()))?;
        visitor.visit_string(string)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_byte_buf(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_byte_buf(self.byte_buf()?)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.byte()? {
            0 => visitor.visit_none(),
            1 => self.nested(|this| visitor.visit_some(this)),
            other => Err(DecodeError(format!("invalid option tag {other}"))),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        self.nested(|this| visitor.visit_newtype_struct(this))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let len = self.len(MAX_EMPTY_ITEMS)?;
        self.nested(|this| visitor.visit_seq(Items { decoder: this, len }))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value> {
        self.nested(|this| visitor.visit_seq(Items { decoder: this, len }))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value> {
        self.deserialize_tuple(len, visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let len = self.len(MAX_EMPTY_ITEMS)?;
        self.nested(|this| visitor.visit_map(Items { decoder: this, len }))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        self.deserialize_tuple(fields.len(), visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        self.nested(|this| visitor.visit_enum(this))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_u32(self.unsigned(252)?)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value> {
        Err(DecodeError(
            "the format cannot skip a value it is not told the type of".into(),
        ))
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// The elements of a sequence, tuple or struct, or the entries of a map: `len` of them.
struct Items<'a, I> {
    decoder: &'a mut Decoder<I>,
    len: usize,
}

impl<'de, I: Input> de::SeqAccess<'de> for Items<'_, I> {
    type Error = DecodeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        if self.len == 0 {
            return Ok(None);
        }
        self.len -= 1;
        seed.deserialize(&mut *self.decoder).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        // What serde preallocates: never more elements than bytes are left.
        Some(self.len.min(self.decoder.input.remaining()))
    }
}

impl<'de, I: Input> de::MapAccess<'de> for Items<'_, I> {
    type Error = DecodeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        if self.len == 0 {
            return Ok(None);
        }
        self.len -= 1;
        seed.deserialize(&mut *self.decoder).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        seed.deserialize(&mut *self.decoder)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.len.min(self.decoder.input.remaining()))
    }
}

impl<'de, I: Input> de::EnumAccess<'de> for &mut Decoder<I> {
    type Error = DecodeError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self)> {
        let index: u32 = self.unsigned(252)?;
        let value = seed.deserialize(index.into_deserializer())?;
        Ok((value, self))
    }
}

impl<'de, I: Input> de::VariantAccess<'de> for &mut Decoder<I> {
    type Error = DecodeError;

    fn unit_variant(self) -> Result<()> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value> {
        de::Deserializer::deserialize_tuple(self, len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        de::Deserializer::deserialize_tuple(self, fields.len(), visitor)
    }
}
