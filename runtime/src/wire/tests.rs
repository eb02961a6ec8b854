//! The wire format's own tests: frames, chunk lists, messages and bounded decodes.

use bytes::Bytes;

use super::buffers::CHUNK;
use super::*;

/// `values` as consecutive frames in one buffer, as the one frame writer writes them.
fn frames(values: &[&dyn erased::Frame]) -> Vec<u8> {
    let mut chunks = Chunks::new();
    for value in values {
        value.push_onto(&mut chunks);
    }
    chunks.into_bytes().concat()
}

mod erased {
    /// A value that pushes itself as a frame, so that `frames` takes a mix of types.
    pub(super) trait Frame {
        fn push_onto(&self, chunks: &mut super::Chunks);
    }
    impl<T: serde::Serialize> Frame for T {
        fn push_onto(&self, chunks: &mut super::Chunks) {
            chunks.push_frame(self).unwrap();
        }
    }
}

#[test]
fn the_borrowed_head_encodes_like_the_owned_one() {
    let owned = encode_frame(&CallHead {
        job: "x.y".into(),
        timeout_ms: 99,
        trace_id: 7,
        resource: 3,
    })
    .unwrap();
    let borrowed = encode_frame(&CallHeadRef {
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
        let mut contiguous = encode_frame(&head).unwrap().to_vec();
        contiguous.extend_from_slice(&encode_frame(&payload).unwrap());
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
    let buf = encode_frame(&("hello", 42u64, vec![1u8, 2, 3])).unwrap();
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
    // The same within a large frame: a claim past the bytes the frame holds is refused.
    let mut big = vec![0xFD];
    big.extend_from_slice(&(3u64 << 30).to_le_bytes());
    big.resize(100_000, 0);
    assert!(decode_payload::<Vec<u8>>(&big).is_err());
}

#[test]
fn trailing_bytes_are_refused() {
    let mut buf = encode_frame(&7u32).unwrap().to_vec();
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
        let buf = encode_frame(&data).unwrap();
        let back: Vec<u8> = decode_payload(&buf[4..]).unwrap();
        assert_eq!(back.len(), len);
    }
    // Small u128s take one byte each on the wire but claim sixteen.
    let wide = vec![0u128; 300_000];
    let buf = encode_frame(&wide).unwrap();
    assert_eq!(decode_payload::<Vec<u128>>(&buf[4..]).unwrap(), wide);
}

/// A message cut into chunks of `size` bytes, as quinn might deliver it.
fn chunked(bytes: &[u8], size: usize) -> Message {
    let mut message = Message::default();
    for chunk in bytes.chunks(size) {
        message.push(Bytes::copy_from_slice(chunk));
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
    let bytes = frames(&[&head, &payload]);
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
    let mut trailing = encode_frame(&7u32).unwrap()[4..].to_vec();
    trailing.push(0);
    assert!(matches!(
        chunked(&trailing, 1).decode::<u32>(),
        Err(WireError::Decode(_))
    ));
}

#[test]
fn a_successful_reply_holds_result_offset_bytes_before_its_result() {
    let mut reply = Chunks::new();
    reply.push_frame(&ReplyHead::Ok).unwrap();
    reply.push_frame(&[7u8; 100][..]).unwrap();
    let result = encode_value(&[7u8; 100][..]).unwrap();
    assert_eq!(reply.len() - result.len(), super::RESULT_OFFSET);
}
