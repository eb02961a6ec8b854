//! Runners' logs in the parent's log: a job's `tracing` events and a runner's output lines go
//! to the parent over the runner's own connection, on the local backend and on (fake) Fly
//! machines, with the call's job and trace id; bounded when the parent reads slowly.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fly::{backend, fake, pool as fly_pool, shut_down_clean};
use common::{within, CapturedLogs};
use firebrand::TraceId;
use firebrand_runner::{ByteBuf, LOG, PID, PRINT};

const SECOND: Duration = Duration::from_secs(1);
const TRACE: TraceId = TraceId(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);

/// Checks the parent's line for the job's event: target, fields, job and trace id.
fn assert_forwarded(line: &str) {
    assert!(line.contains("firebrand::runner:"), "{line}");
    for field in [
        "line=0",
        "answer=42",
        r#"job="firebrand.log""#,
        &format!(r#"trace_id="{TRACE}""#),
        "runner=",
        "machine=",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_job_s_event_reaches_the_parent_log_with_its_trace_id_on_the_local_backend() {
    let (logs, _guard) = CapturedLogs::install();
    let pool = common::pool().max(1).build().await.unwrap();
    pool.call(&LOG, ("hello from the job".into(), 1))
        .trace_id(TRACE)
        .await
        .unwrap();
    let line = logs.line(|l| l.contains("hello from the job")).await;
    assert_forwarded(&line);
    // The local backend relays the runner's pipes: an output line is logged once, by the
    // relay, not a second time over the connection.
    pool.call(&PRINT, ByteBuf::from(b"printed-once\n".to_vec()))
        .await
        .unwrap();
    logs.line(|l| l.contains("printed-once")).await;
    pool.call(&PID, ()).await.unwrap();
    pool.shutdown().await;
    let copies = logs.text().matches("printed-once").count();
    assert_eq!(copies, 1, "{}", logs.text());
}

#[tokio::test(flavor = "current_thread")]
async fn a_fly_runner_s_events_and_output_reach_the_parent_log() {
    let (logs, _guard) = CapturedLogs::install();
    let fly = fake().await;
    let pool = fly_pool(backend(&fly).build().unwrap())
        .max(1)
        .build()
        .await
        .unwrap();
    pool.call(&LOG, ("hello from a fly machine".into(), 1))
        .trace_id(TRACE)
        .await
        .unwrap();
    let line = logs.line(|l| l.contains("hello from a fly machine")).await;
    assert_forwarded(&line);
    let machine = &fly.machines()[0].id;
    assert!(line.contains(machine.as_str()), "the machine id: {line}");
    // No pipe reaches the parent from a Fly machine: output lines come over the connection,
    // bytes that are not UTF-8 included.
    let mut bytes = b"binary \xff\xfe output".to_vec();
    bytes.push(b'\n');
    pool.call(&PRINT, ByteBuf::from(bytes)).await.unwrap();
    let line = logs
        .line(|l| l.contains("output") && l.contains("binary"))
        .await;
    assert!(line.contains("runner_target=stdout"), "{line}");
    assert!(line.contains("binary \u{fffd}\u{fffd} output"), "{line}");
    shut_down_clean(pool, &fly).await;
}

/// A log writer that takes `delay` for every line: a parent that reads its runners' logs
/// slowly, since it reads them where it logs them.
#[derive(Clone)]
struct SlowWriter {
    delay: Duration,
    text: Arc<parking_lot::Mutex<String>>,
}

impl std::io::Write for SlowWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::thread::sleep(self.delay);
        self.text.lock().push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_lines_is_bounded_counted_and_does_not_stop_calls() {
    const LINES: u64 = 100_000;
    let writer = SlowWriter {
        delay: Duration::from_micros(50),
        text: Arc::default(),
    };
    let text = Arc::clone(&writer.text);
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // On this thread, where the pool's tasks run and log what they read.
    let _guard = tracing::subscriber::set_default(subscriber);
    let pool = common::pool()
        .max(1)
        .max_concurrency(4)
        .build()
        .await
        .unwrap();
    let flood = tokio::spawn({
        let pool = pool.clone();
        // A kilobyte a line: the control stream's flow-control window (16 MiB) holds a
        // sixth of them, and the runner must drop the rest of what the parent cannot take.
        async move {
            pool.call(&LOG, (format!("flood-line {}", "x".repeat(1000)), LINES))
                .await
        }
    });
    // Calls go on while the runner floods its connection with lines.
    for _ in 0..20 {
        within(10 * SECOND, pool.call(&PID, ())).await.unwrap();
    }
    within(60 * SECOND, flood).await.unwrap().unwrap();
    // Lines after the flood, until one gets through: each waits in the runner's queue only if
    // there is room, and the count of the dropped ones goes with the next line sent.
    let mut after = 0;
    while !text.lock().contains("after-the-flood") {
        assert!(after < 300, "no line got through after the flood");
        pool.call(&LOG, ("after-the-flood".into(), 1))
            .await
            .unwrap();
        after += 1;
        // The writer is a plain sink with no signal to await: look again shortly.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pool.shutdown().await;
    let text = text.lock().clone();
    let received =
        text.matches("flood-line").count() as u64 + text.matches("after-the-flood").count() as u64;
    let dropped: u64 = text
        .lines()
        .filter_map(|l| l.split("dropped=").nth(1))
        .filter_map(|n| n.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    let sent = LINES + after;
    println!("{received} lines logged, {dropped} dropped and counted, of {sent}");
    assert!(dropped > 0, "a slow parent makes the runner drop lines");
    assert!(received > 0);
    // Every line is logged or counted as dropped (a few of the runner's own lines may be among
    // the dropped, and the last lines' drops may not have been reported yet).
    assert!(
        received + dropped + 10 >= sent && received + dropped <= sent + 10,
        "{received} + {dropped} of {sent}"
    );
}
