//! Decoding alone: the wire's decoder (`runtime/src/wire/decoder.rs`, which checks every length
//! against the bytes left) against bincode 2.0.1's own serde decoder, on the same bytes, in the
//! same run. Values are a call's head, a 1 KiB string, 64 KiB as a `Vec<u8>` (a sequence of
//! bytes), 1 MiB as a byte string, and 10,000 `u64`s.
//!
//! ```sh
//! cargo bench --bench codec && python3 benches/summary.py
//! ```

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use firebrand::internals::wire::{self, CallHead};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_bytes::ByteBuf;

fn compare<T: Serialize + DeserializeOwned>(c: &mut Criterion, name: &str, value: &T) {
    let bytes = wire::encode_frame(value).unwrap();
    let body = &bytes[4..];
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function(BenchmarkId::new("firebrand", name), |b| {
        b.iter(|| black_box(wire::decode_payload::<T>(black_box(body)).unwrap()))
    });
    group.bench_function(BenchmarkId::new("bincode", name), |b| {
        b.iter(|| {
            let config = bincode::config::standard().with_limit::<{ 1 << 30 }>();
            black_box(bincode::serde::decode_from_slice::<T, _>(black_box(body), config).unwrap())
        })
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let head = CallHead {
        job: "app.jobs.resize_image".into(),
        timeout_ms: 30_000,
        trace_id: 0x1234_5678_9abc_def0_1234_5678_9abc_def0,
        resource: 0,
    };
    compare(&mut c, "head", &head);
    compare(&mut c, "string_1k", &"x".repeat(1024));
    compare(&mut c, "vec_u8_64k", &vec![7u8; 64 << 10]);
    compare(&mut c, "bytes_1m", &ByteBuf::from(vec![7u8; 1 << 20]));
    compare(
        &mut c,
        "u64s_10k",
        &(0..10_000u64).map(|n| n * 977).collect::<Vec<_>>(),
    );
    c.final_summary();
}
