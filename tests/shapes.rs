//! Work shapes beyond a single call: spawn and map, on real runner processes.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::within;
use firebrand::{CallError, PoolEvent};
use firebrand_runner::{ECHO, FAIL, PANIC, PID, SLEEP};
use futures_util::StreamExt as _;
use parking_lot::Mutex;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_spawned_task_returns_its_result_and_holds_a_slot_while_it_runs() {
    let pool = common::pool().max(1).build().await.unwrap();
    let mut events = pool.events();
    let task = pool.call(&SLEEP, 300).spawn();
    common::next_matching(&mut events, |e| matches!(e, PoolEvent::CallStarted { .. })).await;
    assert_eq!(pool.stats().in_flight, 1, "the spawned job holds its slot");
    let pid = pool.call(&PID, ()).await.unwrap();
    assert!(!task.is_finished());
    within(5 * SECOND, task).await.unwrap();
    assert_eq!(pool.call(&PID, ()).await.unwrap(), pid, "same runner");
    pool.shutdown().await;
}

#[tokio::test]
async fn aborting_or_dropping_a_task_cancels_its_job_and_frees_the_slot() {
    // One runner with one slot: a job left running on either side would block the next call.
    let pool = common::pool()
        .max(1)
        .max_concurrency(1)
        .queue_timeout(5 * SECOND)
        .build()
        .await
        .unwrap();
    let mut events = pool.events();
    let task = pool.call(&SLEEP, 60_000).timeout(None).spawn();
    common::next_matching(&mut events, |e| matches!(e, PoolEvent::CallStarted { .. })).await;
    let queued = pool
        .call(&PID, ())
        .queue_timeout(Duration::from_millis(200))
        .await;
    assert!(
        matches!(queued, Err(CallError::QueueTimeout { .. })),
        "{queued:?}"
    );
    task.abort();
    assert!(matches!(task.await, Err(CallError::Aborted)));
    within(5 * SECOND, pool.call(&PID, ())).await.unwrap();

    let task = pool.call(&SLEEP, 60_000).timeout(None).spawn();
    common::next_matching(&mut events, |e| matches!(e, PoolEvent::CallStarted { .. })).await;
    drop(task);
    within(5 * SECOND, pool.call(&PID, ())).await.unwrap();
    pool.shutdown().await;
}

#[tokio::test]
async fn a_detached_task_keeps_its_runner_up_until_it_ends() {
    let pool = common::pool()
        .max(1)
        .idle_shutdown_after(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    pool.call(&PID, ()).await.unwrap();
    let detached_at = Instant::now();
    pool.call(&SLEEP, 1_500).spawn().detach();
    let mut runners = pool.watch_runners();
    within(
        10 * SECOND,
        runners.wait_for(|c| c.ready == 0 && c.draining == 0),
    )
    .await
    .unwrap();
    let lived = detached_at.elapsed();
    assert!(
        lived >= Duration::from_millis(1_500),
        "the runner idled down after {lived:?}"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn map_over_ten_thousand_inputs_returns_every_result_in_order() {
    let pool = common::pool()
        .max(2)
        .max_concurrency(32)
        .build()
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook_seen = Arc::clone(&seen);
    let inputs = (0u32..10_000).map(|i| i.to_le_bytes().to_vec());
    let results = pool
        .map(&ECHO, inputs)
        .on_progress(move |p| hook_seen.lock().push(p))
        .results()
        .await;
    assert_eq!(results.len(), 10_000);
    for (i, result) in results.into_iter().enumerate() {
        let bytes = result.unwrap();
        assert_eq!(bytes, (i as u32).to_le_bytes(), "result {i}");
    }
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 10_000);
    assert_eq!(
        seen.last().map(|p| (p.done, p.failed, p.total)),
        Some((10_000, 0, Some(10_000)))
    );
    assert!(seen.windows(2).all(|w| w[1].done == w[0].done + 1));
    pool.shutdown().await;
}

#[tokio::test]
async fn map_yields_in_input_order_or_as_finished() {
    let pool = common::pool().max(1).build().await.unwrap();
    // Later inputs finish first.
    let delays = vec![400u64, 200, 0];
    let ordered: Vec<usize> = pool
        .map(&SLEEP, delays.clone())
        .map(|(index, result)| {
            result.unwrap();
            index
        })
        .collect()
        .await;
    assert_eq!(ordered, [0, 1, 2]);
    let finished: Vec<usize> = pool
        .map(&SLEEP, delays)
        .unordered()
        .map(|(index, _)| index)
        .collect()
        .await;
    assert_eq!(finished, [2, 1, 0]);
    pool.shutdown().await;
}

#[tokio::test]
async fn map_collects_every_failure_or_stops_at_the_first() {
    let pool = common::pool().max(1).build().await.unwrap();
    let inputs = || ["", "boom", "", "bang", ""].map(String::from);
    let results = pool.map(&PANIC, inputs()).results().await;
    let failed: Vec<bool> = results.iter().map(Result::is_err).collect();
    assert_eq!(failed, [false, true, false, true, false]);

    let error = pool.map(&PANIC, inputs()).outputs().await.unwrap_err();
    assert!(error.to_string().contains("boom"), "{error}");

    let mut progress = Vec::new();
    let mut stream = pool
        .map(&FAIL, (0..100).map(|i| format!("no {i}")))
        .in_flight(2)
        .stop_on_error();
    while let Some((_, result)) = stream.next().await {
        progress.push(result.is_err());
        assert_eq!(
            pool.stats().in_flight,
            0,
            "the other call was cancelled at once"
        );
    }
    assert_eq!(progress, [true], "the stream ends after the first failure");
    // With the map still alive, nothing holds a slot: shutdown does not wait out a drain.
    within(5 * SECOND, pool.shutdown()).await;
    drop(stream);
}

#[tokio::test]
async fn map_keeps_enough_calls_in_flight_for_the_pool_to_grow() {
    let pool = common::pool()
        .max(3)
        .max_concurrency(1)
        .build()
        .await
        .unwrap();
    let outputs = pool.map(&SLEEP, vec![300u64; 6]).outputs().await.unwrap();
    assert_eq!(outputs.len(), 6);
    assert_eq!(
        pool.stats().ready,
        3,
        "six inputs over three one-slot runners"
    );
    pool.shutdown().await;
}

fn blobs(count: u64, bytes: u32) -> firebrand_runner::BlobArgs {
    firebrand_runner::BlobArgs {
        count,
        bytes,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_stream_yields_every_item_in_order_then_ends() {
    let pool = common::pool().max(1).build().await.unwrap();
    let items: Vec<_> = pool
        .stream(&firebrand_runner::BLOBS, blobs(1_000, 3))
        .collect()
        .await;
    assert_eq!(items.len(), 1_000);
    for (i, item) in items.into_iter().enumerate() {
        assert_eq!(item.unwrap().into_vec(), vec![i as u8; 3]);
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_fails_yields_its_items_then_the_error_then_ends() {
    let pool = common::pool().max(1).build().await.unwrap();
    let args = firebrand_runner::BlobArgs {
        fail_at: Some(5),
        ..blobs(10, 1)
    };
    let items: Vec<_> = pool.stream(&firebrand_runner::BLOBS, args).collect().await;
    assert_eq!(items.len(), 6);
    assert!(items[..5].iter().all(Result::is_ok));
    assert!(
        matches!(&items[5], Err(CallError::Job(error)) if error.message() == "failed at item 5"),
        "{:?}",
        items[5]
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn dropping_a_stream_cancels_its_job() {
    // One slot on one runner: a job still streaming would block the next call.
    let pool = common::pool()
        .max(1)
        .max_concurrency(1)
        .timeout(None)
        .build()
        .await
        .unwrap();
    let args = firebrand_runner::BlobArgs {
        delay_ms: 5,
        ..blobs(u64::MAX, 8)
    };
    let mut stream = pool.stream(&firebrand_runner::BLOBS, args);
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);
    within(5 * SECOND, pool.call(&PID, ())).await.unwrap();
    let stats = pool.call(&firebrand_runner::STATS, ()).await.unwrap();
    assert_eq!(stats.cancelled, 1, "{stats:?}");
    pool.shutdown().await;
}

#[tokio::test]
async fn a_slow_reader_holds_the_producer_back() {
    const ITEM: u32 = 64 << 10;
    let pool = common::pool()
        .max(1)
        .max_concurrency(2)
        .timeout(None)
        .build()
        .await
        .unwrap();
    // 20,000 items of 64 KiB: 1.25 GiB if the producer ran ahead of its reader.
    let mut stream = pool.stream(&firebrand_runner::BLOBS, blobs(20_000, ITEM));
    stream.next().await.unwrap().unwrap();
    // Not a synchronisation: the window in which an unchecked producer would run far ahead.
    tokio::time::sleep(SECOND).await;
    let produced = pool.call(&firebrand_runner::PRODUCED, ()).await.unwrap();
    let ahead = produced * u64::from(ITEM);
    eprintln!(
        "with one item read, the producer is {produced} items ({} MiB) ahead",
        ahead >> 20
    );
    assert!(
        ahead <= 48 << 20,
        "the producer ran {} MiB ahead of its reader",
        ahead >> 20
    );
    // Reading on lets it go on.
    for _ in 0..1_000 {
        stream.next().await.unwrap().unwrap();
    }
    let later = pool.call(&firebrand_runner::PRODUCED, ()).await.unwrap();
    assert!(later > produced);
    drop(stream);
    pool.shutdown().await;
}

#[tokio::test]
async fn a_resource_stays_on_its_runner_while_held_and_is_released_on_drop() {
    use firebrand_runner::{STASH, STASH_LEN};
    let pool = common::pool()
        .max(2)
        .max_concurrency(1)
        .idle_shutdown_after(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let mut events = pool.events();
    let stash = pool.resource(&STASH, vec![7; 1000]).await.unwrap();
    let (len, stash_pid) = stash.call(&STASH_LEN, ()).await.unwrap();
    assert_eq!(len, 1000);
    assert_eq!(pool.stats().in_flight, 1, "the handle holds its slot");
    // That runner's only slot is taken: another call goes to another runner.
    let other_pid = pool.call(&PID, ()).await.unwrap();
    assert_ne!(other_pid, stash_pid);
    // The other runner idles down; the resource's runner does not.
    let stopped = common::next_matching(&mut events, |e| {
        matches!(
            e,
            PoolEvent::RunnerIdleStopped { .. } | PoolEvent::RunnerStopped { .. }
        )
    })
    .await;
    assert!(
        !matches!(stopped, PoolEvent::RunnerIdleStopped { runner } if runner == stash.runner())
    );
    let (_, pid) = stash.call(&STASH_LEN, ()).await.unwrap();
    assert_eq!(pid, stash_pid, "still up, still the same runner");

    let held_on = stash.runner();
    drop(stash);
    let stopped = common::next_matching(
        &mut events,
        |e| matches!(e, PoolEvent::RunnerIdleStopped { runner } if *runner == held_on),
    )
    .await;
    assert!(matches!(stopped, PoolEvent::RunnerIdleStopped { .. }));
    assert_eq!(pool.stats().in_flight, 0);
    pool.shutdown().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_on_a_held_resource() {
    let pool = common::pool().max(1).build().await.unwrap();
    let stash = pool
        .resource(&firebrand_runner::STASH, vec![1])
        .await
        .unwrap();
    within(5 * SECOND, pool.shutdown()).await;
    drop(stash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_runner_stops_sending_times_out_on_the_parent() {
    let pool = common::pool()
        .max(1)
        .timeout(Duration::from_secs(1))
        .terminate_grace(Duration::ZERO)
        .build()
        .await
        .unwrap();
    // The job blocks its thread between items, so the runner's own deadline cannot fire, while
    // its connection's keep-alives still flow.
    let args = firebrand_runner::BlobArgs {
        count: 2,
        bytes: 8,
        delay_ms: 60_000,
        block: true,
        ..Default::default()
    };
    let mut stream = pool.stream(&firebrand_runner::BLOBS, args);
    let first = within(Duration::from_secs(15), stream.next()).await;
    assert!(
        matches!(first, Some(Err(CallError::Timeout { .. }))),
        "{first:?}"
    );
    assert!(within(Duration::from_secs(5), stream.next())
        .await
        .is_none());
    pool.shutdown().await;
}

/// Plays the parent of one runner that idles down after 300 ms, asks it for a [`STASH`]
/// resource, reads the reply, then ends the stream with `code`. Returns the connection, the
/// resource's id, and the runner's control stream.
async fn make_a_raw_resource(
    parent: &common::RawParent,
    code: quinn::VarInt,
) -> (
    quinn::Connection,
    u64,
    quinn::RecvStream,
    tokio::process::Child,
) {
    use firebrand::internals::wire::{self, ReplyHead};
    let settings = firebrand::internals::token::RunnerSettings {
        idle_shutdown_after: Some(Duration::from_millis(300)),
        ..common::raw_settings()
    };
    let runner = common::spawn_runner(&parent.token(settings).encode());
    let (connection, _send, control) = parent.admit_with_control().await;
    let (_request, mut reply) = common::raw_request(
        &connection,
        firebrand_runner::STASH.name(),
        0,
        &vec![7u8; 64],
    )
    .await;
    let head: ReplyHead = wire::read_head(&mut reply).await.unwrap();
    assert!(matches!(head, ReplyHead::Ok), "{head:?}");
    let id: u64 = wire::read_frame(&mut reply, 64)
        .await
        .unwrap()
        .decode()
        .unwrap();
    reply.stop(code).unwrap();
    (connection, id, control, runner)
}

#[tokio::test]
async fn a_resource_whose_caller_left_after_it_was_made_is_dropped_and_the_runner_idles() {
    use firebrand::internals::wire::{self, ControlMessage, DrainReason};
    common::init_tracing();
    let parent = common::RawParent::new();
    // What a caller dropped just after the reply arrived does: its stream is stopped.
    let (_connection, _id, mut control, _runner) =
        make_a_raw_resource(&parent, firebrand::internals::wire::stream::CANCELLED).await;
    let message: ControlMessage = within(Duration::from_secs(10), wire::read_head(&mut control))
        .await
        .unwrap();
    assert!(
        matches!(
            message,
            ControlMessage::Draining {
                reason: DrainReason::Idle
            }
        ),
        "{message:?}"
    );
}

#[tokio::test]
async fn a_claimed_resource_stays_on_its_runner() {
    use firebrand::internals::wire::{self, CallHead, ReplyHead};
    common::init_tracing();
    let parent = common::RawParent::new();
    let (connection, id, _control, _runner) =
        make_a_raw_resource(&parent, firebrand::internals::wire::stream::CLAIMED).await;
    // Well past the idle timeout, the resource is still there to use.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (mut send, mut reply) = connection.open_bi().await.unwrap();
    let mut request = wire::Chunks::new();
    request
        .push_frame(&CallHead {
            job: firebrand_runner::STASH_LEN.name().into(),
            timeout_ms: 0,
            trace_id: 0,
            resource: id,
        })
        .unwrap();
    request.push_frame(&()).unwrap();
    send.write_all(&request.into_bytes().concat())
        .await
        .unwrap();
    send.finish().unwrap();
    let head: ReplyHead = within(Duration::from_secs(10), wire::read_head(&mut reply))
        .await
        .unwrap();
    assert!(matches!(head, ReplyHead::Ok), "{head:?}");
    let (len, _pid): (usize, u32) = wire::read_frame(&mut reply, 64)
        .await
        .unwrap()
        .decode()
        .unwrap();
    assert_eq!(len, 64);
}

/// Polls a future until its `n`th wait, then drops it: cancels it at exactly that await point.
struct CancelAt<F> {
    future: std::pin::Pin<Box<F>>,
    waits_left: usize,
}

impl<F: std::future::Future> std::future::Future for CancelAt<F> {
    type Output = Option<F::Output>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.future.as_mut().poll(cx) {
            std::task::Poll::Ready(output) => std::task::Poll::Ready(Some(output)),
            std::task::Poll::Pending if self.waits_left == 0 => std::task::Poll::Ready(None),
            std::task::Poll::Pending => {
                self.waits_left -= 1;
                std::task::Poll::Pending
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_pool_resource_at_every_point_leaks_nothing_and_the_runner_idles_down() {
    let pool = common::pool()
        .max(1)
        .idle_shutdown_after(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let mut events = pool.events();
    let mut completed = 0;
    // Cancel at the first wait, then the second, and so on, until the call completes on its
    // own several times in a row: every await point of the exchange is hit.
    for waits in 0..200 {
        let making = CancelAt {
            future: Box::pin(std::future::IntoFuture::into_future(
                pool.resource(&firebrand_runner::STASH, vec![1; 32]),
            )),
            waits_left: waits,
        };
        match within(Duration::from_secs(30), making).await {
            None => {}
            Some(made) => {
                drop(made.unwrap());
                completed += 1;
                if completed == 5 {
                    break;
                }
            }
        }
    }
    assert_eq!(completed, 5, "the resource call never completed");
    // Nothing was left on the runner, so it idles down on its own.
    loop {
        match within(Duration::from_secs(20), events.next()).await {
            Some(PoolEvent::RunnerIdleStopped { .. }) => break,
            Some(_) => {}
            None => panic!("events ended"),
        }
    }
    pool.shutdown().await;
}

/// Every work shape ends with the options a call takes, and none hard-codes its own: a spawned
/// call runs under the pool's timeout unless told otherwise, and a stream, a resource and a
/// spawn each take a timeout and a queue timeout of their own.
#[tokio::test]
async fn every_work_shape_takes_the_call_options() {
    const POOL_TIMEOUT: Duration = Duration::from_millis(400);
    let pool = common::pool()
        .max(1)
        .max_concurrency(1)
        .timeout(POOL_TIMEOUT)
        .build()
        .await
        .unwrap();
    let timed_out = |result: Result<_, CallError>, after: Duration| match result {
        Err(CallError::Timeout { after: a }) => assert_eq!(a, after),
        other => panic!("expected a timeout after {after:?}, got {other:?}"),
    };
    // Spawn: the pool's timeout by default, its own when set.
    let spawned = pool.call(&SLEEP, 60_000).spawn();
    timed_out(within(10 * SECOND, spawned).await.map(|_| ()), POOL_TIMEOUT);
    let own = Duration::from_millis(150);
    let spawned = pool.call(&SLEEP, 60_000).timeout(own).spawn();
    timed_out(within(10 * SECOND, spawned).await.map(|_| ()), own);
    // A stream that yields slower than its deadline allows.
    let slow = firebrand_runner::BlobArgs {
        count: 1_000,
        bytes: 8,
        delay_ms: 100,
        ..Default::default()
    };
    let items: Vec<_> = within(
        10 * SECOND,
        pool.stream(&firebrand_runner::BLOBS, slow.clone())
            .timeout(own)
            .collect::<Vec<_>>(),
    )
    .await;
    timed_out(items.last().cloned().unwrap().map(|_| ()), own);
    assert!(items.len() < 10, "{} items in {own:?}", items.len());

    // With the one slot taken, each shape waits only its own queue timeout.
    let blocker = pool.call(&SLEEP, 60_000).timeout(None).spawn();
    while pool.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    let waited = Duration::from_millis(100);
    let queue_timed_out = |result: Result<(), CallError>| match result {
        Err(CallError::QueueTimeout { waited: w }) => assert_eq!(w, waited),
        other => panic!("expected a queue timeout, got {other:?}"),
    };
    queue_timed_out(
        pool.call(&PID, ())
            .queue_timeout(waited)
            .spawn()
            .await
            .map(|_| ()),
    );
    let mut stream = pool
        .stream(&firebrand_runner::BLOBS, slow)
        .queue_timeout(waited);
    queue_timed_out(stream.next().await.unwrap().map(|_| ()));
    queue_timed_out(
        pool.resource(&firebrand_runner::STASH, vec![1])
            .queue_timeout(waited)
            .await
            .map(|_| ()),
    );
    blocker.abort();
    // Once free, a resource takes its options too, and a call on it runs.
    let stash = pool
        .resource(&firebrand_runner::STASH, vec![0; 8])
        .timeout(5 * SECOND)
        .trace_id(firebrand::TraceId(7))
        .await
        .unwrap();
    let (len, _) = stash
        .call(&firebrand_runner::STASH_LEN, ())
        .timeout(5 * SECOND)
        .trace_id(firebrand::TraceId(8))
        .await
        .unwrap();
    assert_eq!(len, 8);
    drop(stash);
    pool.shutdown().await;
}
