//! The terminator: the runner's bookkeeping of in-flight calls, and its reasons to stop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Counts of what this runner process has served, for diagnostics. See [`stats`](super::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunnerStats {
    /// Calls received.
    pub started: u64,
    /// Calls that returned `Ok`.
    pub succeeded: u64,
    /// Calls whose job returned an error, or whose argument or result did not decode or encode.
    pub failed: u64,
    /// Calls whose job panicked.
    pub panicked: u64,
    /// Calls that ran past their deadline and were aborted.
    pub timed_out: u64,
    /// Calls the parent cancelled; their jobs were aborted.
    pub cancelled: u64,
    /// Calls running now.
    pub in_flight: u64,
    /// The most calls that ran at once.
    pub peak_in_flight: u64,
    /// Resources held for the parent now, claimed or not yet.
    pub resources: u64,
}

pub(crate) static STATS: Counters = Counters::new();

pub(crate) struct Counters {
    started: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    timed_out: AtomicU64,
    cancelled: AtomicU64,
    in_flight: AtomicU64,
    peak: AtomicU64,
    pub(crate) resources: AtomicU64,
}

/// How one call ended, for the counters.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ending {
    Succeeded,
    Failed,
    Panicked,
    TimedOut,
    Cancelled,
}

impl Counters {
    const fn new() -> Self {
        Self {
            started: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            resources: AtomicU64::new(0),
        }
    }

    pub(crate) fn running(&self) {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn ended(&self, ending: Ending) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let counter = match ending {
            Ending::Succeeded => &self.succeeded,
            Ending::Failed => &self.failed,
            Ending::Panicked => &self.panicked,
            Ending::TimedOut => &self.timed_out,
            Ending::Cancelled => &self.cancelled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> RunnerStats {
        RunnerStats {
            started: self.started.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            panicked: self.panicked.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            peak_in_flight: self.peak.load(Ordering::Relaxed),
            resources: self.resources.load(Ordering::Relaxed),
        }
    }
}

/// The streams a runner is serving, and when it last became idle.
pub(crate) struct Terminator {
    streams: Mutex<(usize, Instant)>,
    changed: Notify,
}

/// Held while a stream is served; dropping it ends the stream's accounting.
pub(crate) struct StreamGuard(Arc<Terminator>);

impl Terminator {
    pub(crate) fn new() -> Self {
        Self {
            streams: Mutex::new((0, Instant::now())),
            changed: Notify::new(),
        }
    }

    pub(crate) fn stream_started(self: &Arc<Self>) -> StreamGuard {
        STATS.started.fetch_add(1, Ordering::Relaxed);
        self.hold()
    }

    /// Counts as a stream being served until the guard drops: the runner is not idle.
    pub(crate) fn hold(self: &Arc<Self>) -> StreamGuard {
        let mut streams = self.streams.lock();
        streams.0 += 1;
        // Only the edges between idle and busy matter to the waiters; notifying on every call
        // would wake the serve loop twice per call.
        if streams.0 == 1 {
            self.changed.notify_waiters();
        }
        drop(streams);
        StreamGuard(Arc::clone(self))
    }

    /// Resolves once no stream has been served for `idle_after`.
    pub(crate) async fn idle_for(&self, idle_after: Duration) {
        loop {
            let changed = self.changed.notified();
            let (count, since) = *self.streams.lock();
            if count == 0 {
                tokio::select! {
                    () = tokio::time::sleep_until(since + idle_after) => {
                        let (count, again) = *self.streams.lock();
                        if count == 0 && again == since {
                            return;
                        }
                    }
                    () = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }

    /// Resolves once no stream is being served.
    pub(crate) async fn drained(&self) {
        loop {
            let changed = self.changed.notified();
            if self.streams.lock().0 == 0 {
                return;
            }
            changed.await;
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self.0.streams.lock();
        streams.0 -= 1;
        if streams.0 == 0 {
            streams.1 = Instant::now();
            self.0.changed.notify_waiters();
        }
    }
}
