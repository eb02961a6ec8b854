//! Hostile frames from an authenticated peer, with the receiver's memory measured: what a
//! frame claims costs nothing until its bytes are there, on either side.
//!
//! One test, so that nothing else in this process allocates while the parent's side is
//! measured. Each side's peak is read from `/proc/<pid>/status` (`VmHWM`, resident, and
//! `VmPeak`, mapped: an allocation of a claimed length maps memory even before it is touched).

mod common;

use std::time::Duration;

use common::within;
use firebrand::internals::tls;
use firebrand::internals::wire::{self, Hello, HelloReply, ReplyHead};
use firebrand::CallError;
use firebrand_runner::{ECHO_BYTES, FAIL, LOG};
use serde_bytes::ByteBuf;

const SECOND: Duration = Duration::from_secs(1);
const MIB: u64 = 1 << 20;

/// How many log lines the hostile runner sends at once.
const FLOOD: u64 = 20_000;

/// The big frame's size: the default `max_payload_len`.
const BIG: usize = 128 << 20;

/// A field of `/proc/<pid>/status`, in bytes.
fn status(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        * 1024
}

/// Memory from a mark on: the resident peak (reset at the mark, through `clear_refs`) over
/// what was resident then, and the mapped peak over the one at the mark. The mapped peak
/// cannot be reset, so a mark is taken after the process has done honest work of the size
/// measured.
struct Mark {
    pid: u32,
    resident: u64,
    mapped: u64,
}

impl Mark {
    fn now(pid: u32) -> Self {
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
        Self {
            pid,
            resident: status(pid, "VmRSS:"),
            mapped: status(pid, "VmPeak:"),
        }
    }

    /// (resident, mapped) growth since the mark, in bytes.
    fn growth(&self) -> (u64, u64) {
        (
            status(self.pid, "VmHWM:").saturating_sub(self.resident),
            status(self.pid, "VmPeak:").saturating_sub(self.mapped),
        )
    }
}

/// A body that claims a string or byte string of `claim` bytes (the varint marker 0xFD, then
/// a `u64`), padded with `fill` bytes that are there.
fn claiming(claim: u64, fill: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(9 + fill);
    body.push(0xFD);
    body.extend_from_slice(&claim.to_le_bytes());
    body.resize(9 + fill, 0);
    body
}

/// A call of `job` whose argument frame's body is `body`, as raw bytes.
fn request_with_body(job: &str, body: &[u8]) -> Vec<u8> {
    let mut request = wire::encode_frame(&wire::CallHead {
        job: job.into(),
        timeout_ms: 0,
        trace_id: 0,
        resource: 0,
    })
    .unwrap()
    .to_vec();
    request.extend_from_slice(&(body.len() as u32).to_be_bytes());
    request.extend_from_slice(body);
    request
}

async fn reply_to(connection: &quinn::Connection, request: &[u8]) -> ReplyHead {
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(request).await.unwrap();
    send.finish().unwrap();
    within(60 * SECOND, wire::read_head::<ReplyHead>(&mut recv))
        .await
        .unwrap()
}

#[test]
fn hostile_frames_cost_a_receiver_no_more_than_their_bytes() {
    common::init_tracing();
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this test binary");
    // One thread, so that the parent's log lines are all captured (the capture is this
    // thread's).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (logs, _guard) = common::CapturedLogs::install();
    let reading = runtime.block_on(async {
        a_runner_s_memory_is_bounded_by_what_it_receives().await;
        a_parent_s_memory_is_bounded_by_what_it_receives(&logs).await
    });
    // Of the flood, the parent logged no more than its pace lets through in the time it
    // had; the rest were dropped, and counted.
    let snapshot = snapshotter.snapshot().into_vec();
    let dropped = common::counter(&snapshot, "firebrand_runner_log_dropped_total", &[]);
    let logged = logs
        .text()
        .lines()
        .filter(|l| l.contains("runner_target=hostile"))
        .count() as u64;
    assert_eq!(logged + dropped, FLOOD, "every line logged or counted");
    let allowed = u64::from(firebrand::runner::LOG_BURST)
        + (f64::from(firebrand::runner::MAX_LOG_LINES_PER_SECOND) * reading.as_secs_f64()) as u64;
    println!("parent: of {FLOOD} lines sent at once, logged {logged} in at most {reading:?}");
    assert!(
        logged <= allowed,
        "{logged} logged, {allowed} allowed in {reading:?}"
    );
}

/// A parent, played here, sends a runner frames whose lengths lie.
async fn a_runner_s_memory_is_bounded_by_what_it_receives() {
    let parent = common::RawParent::new();
    let settings = firebrand::internals::token::RunnerSettings {
        max_payload_len: 2 * BIG as u64,
        ..common::raw_settings()
    };
    let mut runner = common::spawn_runner(&parent.token(settings).encode());
    let pid = runner.id().unwrap();
    let (connection, _control) = parent.admit().await;
    // An honest call of the big frame's size first, so that the runner's buffers and
    // allocator arenas are what a busy runner's are.
    let honest = ByteBuf::from(vec![7u8; BIG]);
    let body = wire::encode_frame(&honest).unwrap();
    let reply = reply_to(
        &connection,
        &request_with_body(ECHO_BYTES.name(), &body[4..]),
    )
    .await;
    assert_eq!(reply, ReplyHead::Ok);
    let mark = Mark::now(pid);

    // 1 KiB that claims 1 TiB, as a byte string and as a string.
    for job in [ECHO_BYTES.name(), FAIL.name()] {
        let reply = reply_to(
            &connection,
            &request_with_body(job, &claiming(1 << 40, 1015)),
        )
        .await;
        assert!(
            matches!(&reply, ReplyHead::BadArgs { message } if message.contains("bytes left")),
            "{reply:?}"
        );
    }
    // 128 MiB that claims 3 GiB: allowed by the old claim limit (16 times the body, rounded up
    // to a power of 16), which mapped the 3 GiB before finding the bytes missing.
    let reply = reply_to(
        &connection,
        &request_with_body(ECHO_BYTES.name(), &claiming(3 << 30, BIG - 9)),
    )
    .await;
    assert!(matches!(&reply, ReplyHead::BadArgs { .. }), "{reply:?}");
    // 128 MiB of claims: a tuple whose string claims just past what is left.
    let mut claims = claiming(BIG as u64, BIG - 9);
    claims[1..9].copy_from_slice(&(BIG as u64 - 8).to_le_bytes());
    let reply = reply_to(&connection, &request_with_body(LOG.name(), &claims)).await;
    assert!(matches!(&reply, ReplyHead::BadArgs { .. }), "{reply:?}");

    let (resident, mapped) = mark.growth();
    println!(
        "runner: peak resident +{} MiB, peak mapped +{} MiB (after an honest {} MiB call)",
        resident / MIB,
        mapped / MIB,
        BIG >> 20
    );
    // A request is read whole (128 MiB) before it is decoded; nothing more may come of it.
    let bound = BIG as u64 + 64 * MIB;
    assert!(resident <= bound, "resident grew {} MiB", resident / MIB);
    assert!(mapped <= bound, "mapped grew {} MiB", mapped / MIB);

    // And it still serves.
    let reply = reply_to(
        &connection,
        &request_with_body(
            ECHO_BYTES.name(),
            &wire::encode_frame(&ByteBuf::from(vec![1, 2, 3])).unwrap()[4..],
        ),
    )
    .await;
    assert_eq!(reply, ReplyHead::Ok);
    connection.close(wire::close::DONE, b"done");
    within(10 * SECOND, runner.wait()).await.unwrap();
}

/// A runner, played here with a genuine token, answers its parent with frames whose lengths
/// lie, and floods its control stream.
/// Returns how long the parent had to read the flood of log lines, at most.
async fn a_parent_s_memory_is_bounded_by_what_it_receives(logs: &common::CapturedLogs) -> Duration {
    let backend = common::Recording::silent();
    let pool = common::pool()
        .backend(backend.clone())
        .max(1)
        .max_payload_len(2 * BIG as u64)
        .build()
        .await
        .unwrap();
    let call = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call(&ECHO_BYTES, ByteBuf::from(vec![1u8; 16])).await })
    };
    while backend.boots() < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let token = backend.token(0);
    let ca = rustls::pki_types::CertificateDer::from(token.ca_cert.clone());
    let crypto = tls::client_crypto(&ca, &token.runner_identity()).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connection = endpoint
        .connect_with(
            quinn::ClientConfig::new(std::sync::Arc::new(crypto)),
            token.parent_addrs[0].parse().unwrap(),
            &token.server_name,
        )
        .unwrap()
        .await
        .unwrap();
    let (mut control, mut hello_reply) = connection.open_bi().await.unwrap();
    control
        .write_all(&wire::PROTOCOL_VERSION.to_be_bytes())
        .await
        .unwrap();
    let hello = Hello {
        runner_id: token.runner_id,
        manifest: firebrand_runner::registry().manifest(),
        pid: std::process::id(),
        claim: None,
    };
    wire::write_frame(&mut control, &hello).await.unwrap();
    let accepted: HelloReply = wire::read_head(&mut hello_reply).await.unwrap();
    assert!(
        matches!(accepted, HelloReply::Accepted { .. }),
        "{accepted:?}"
    );

    // The mapped peak already holds the runner side's honest 128 MiB call (its buffers here).
    let mark = Mark::now(std::process::id());
    // The waiting call arrives; its reply claims 3 GiB in 128 MiB.
    let (mut send, mut recv) = within(10 * SECOND, connection.accept_bi()).await.unwrap();
    let _request = recv.read_to_end(1 << 20).await.unwrap();
    let mut reply = wire::encode_frame(&ReplyHead::Ok).unwrap().to_vec();
    let body = claiming(3 << 30, BIG - 9);
    reply.extend_from_slice(&(body.len() as u32).to_be_bytes());
    send.write_all(&reply).await.unwrap();
    send.write_all(&body).await.unwrap();
    send.finish().unwrap();
    drop(body);
    match within(60 * SECOND, call).await.unwrap() {
        Err(CallError::Decode { message }) => assert!(message.contains("bytes left"), "{message}"),
        other => panic!("expected a decode error, got {other:?}"),
    }
    let (resident, mapped) = mark.growth();
    println!(
        "parent: peak resident +{} MiB, peak mapped +{} MiB for a {} MiB reply claiming 3 GiB",
        resident / MIB,
        mapped / MIB,
        BIG >> 20
    );
    // This side also held the reply it wrote (128 MiB) while the parent read it (128 MiB).
    let bound = 2 * BIG as u64 + 64 * MIB;
    assert!(resident <= bound, "resident grew {} MiB", resident / MIB);
    assert!(
        mapped <= bound + 256 * MIB,
        "mapped grew {} MiB",
        mapped / MIB
    );

    // The control stream: a frame far over any log line, after lines faster than the pace.
    let line = wire::LogLine {
        level: 3,
        target: "hostile".into(),
        message: "x".repeat(100),
        job: None,
        trace_id: None,
    };
    let mut flood = wire::Chunks::new();
    for _ in 0..20 {
        flood
            .push_frame(&wire::ControlMessage::Log(line.clone()))
            .unwrap();
    }
    let flood = flood.into_bytes().concat();
    let flooded = std::time::Instant::now();
    for _ in 0..1_000 {
        control.write_all(&flood).await.unwrap();
    }
    control
        .write_all(&(64u32 << 20).to_be_bytes())
        .await
        .unwrap();
    control.write_all(&[0; 1024]).await.unwrap();
    // The parent has read the whole flood once it meets the oversized frame after it.
    logs.line(|l| l.contains("control frame over the limit"))
        .await;
    let reading = flooded.elapsed();
    // The runner is still served: a call goes through it.
    let call = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call(&ECHO_BYTES, ByteBuf::from(vec![2u8; 8])).await })
    };
    let (mut send, mut recv) = within(10 * SECOND, connection.accept_bi()).await.unwrap();
    let _request = recv.read_to_end(1 << 20).await.unwrap();
    let mut reply = wire::Chunks::new();
    reply.push_frame(&ReplyHead::Ok).unwrap();
    reply.push_frame(&ByteBuf::from(vec![9u8; 4])).unwrap();
    send.write_all(&reply.into_bytes().concat()).await.unwrap();
    send.finish().unwrap();
    assert_eq!(
        within(10 * SECOND, call).await.unwrap().unwrap().into_vec(),
        vec![9u8; 4]
    );
    connection.close(wire::close::DONE, b"done");
    pool.shutdown().await;
    reading
}
