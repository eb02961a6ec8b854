//! What a runner process has served: counters kept with relaxed atomics, read by `stats()`.

use std::sync::atomic::{AtomicU64, Ordering};

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
    pub(crate) started: AtomicU64,
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
