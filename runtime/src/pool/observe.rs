//! What a pool tells the world: lifecycle events for [`Pool::events`](super::Pool::events), and
//! metrics through the [`metrics`] facade. Both cost next to nothing when nobody listens.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `firebrand_runners` | gauge | `state`: `booting`, `ready`, `draining`, `parked` |
//! | `firebrand_calls_in_flight` | gauge | |
//! | `firebrand_calls_queued` | gauge | |
//! | `firebrand_boot_seconds` | histogram | `outcome`: `create`, `start`, `resume` |
//! | `firebrand_queue_wait_seconds` | histogram | `job` |
//! | `firebrand_call_seconds` | histogram | `job` |
//! | `firebrand_calls_total` | counter | `job`, `outcome` |
//! | `firebrand_boots_total` | counter | `outcome`: `create`, `start`, `resume`, `failed`, `cancelled` |
//! | `firebrand_parks_total` | counter | `outcome`: `suspend`, `stop`, `destroyed` |
//! | `firebrand_runners_lost_total` | counter | |
//! | `firebrand_runner_log_dropped_total` | counter | |

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::BoxStream;
use tokio::sync::broadcast;

use super::PoolStats;
use crate::backend::{BootKind, Park, Parked};
use crate::error::{BootError, CallError, RunnerId};

/// How many events a slow listener may fall behind before it misses some.
const BACKLOG: usize = 4096;

/// Something that happened in a pool, from [`Pool::events`](super::Pool::events).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PoolEvent {
    /// A runner started booting.
    RunnerBooting {
        /// The runner.
        runner: RunnerId,
    },
    /// A runner connected and takes calls.
    RunnerUp {
        /// The runner.
        runner: RunnerId,
        /// Its machine: a pid, a machine id.
        machine: String,
        /// From the boot request to the accepted hello.
        boot_time: Duration,
        /// Whether its machine was made for it, or a parked one was started or resumed.
        kind: BootKind,
    },
    /// A runner failed to boot.
    RunnerBootFailed {
        /// The runner.
        runner: RunnerId,
        /// Why.
        error: Arc<BootError>,
    },
    /// A runner stopped after being idle for `idle_shutdown_after`.
    RunnerIdleStopped {
        /// The runner.
        runner: RunnerId,
    },
    /// A runner idled out and its machine was parked, for a later boot to claim.
    RunnerParked {
        /// The runner.
        runner: RunnerId,
        /// Its machine.
        machine: String,
        /// Suspended or stopped.
        mode: Park,
    },
    /// A runner was lost: its connection dropped or its machine stopped unasked.
    RunnerLost {
        /// The runner.
        runner: RunnerId,
        /// What the transport or the backend said.
        reason: String,
    },
    /// The pool released a runner: the pool closed, a resize, a single-use runner done.
    RunnerStopped {
        /// The runner.
        runner: RunnerId,
        /// Why.
        reason: String,
    },
    /// A call found no free slot and waits in the queue.
    CallQueued {
        /// The job.
        job: &'static str,
    },
    /// A call was sent to a runner.
    CallStarted {
        /// The job.
        job: &'static str,
        /// The runner.
        runner: RunnerId,
        /// How long it waited for a slot.
        queued_for: Duration,
    },
    /// A call on a runner ended.
    CallFinished {
        /// The job.
        job: &'static str,
        /// The runner.
        runner: RunnerId,
        /// From sending it to its end.
        ran_for: Duration,
        /// How it ended.
        outcome: CallOutcome,
    },
    /// This listener fell behind and missed events.
    Lagged {
        /// How many.
        missed: u64,
    },
}

/// How a call ended on its runner; also the `outcome` label of `firebrand_calls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CallOutcome {
    /// It returned a result.
    Ok,
    /// The job returned an error or panicked.
    Failed,
    /// It ran past its execution timeout.
    TimedOut,
    /// Its runner was lost.
    RunnerLost,
    /// The caller dropped it, or its task was aborted.
    Cancelled,
    /// Anything else: an encoding or protocol error.
    Error,
}

impl CallOutcome {
    pub(crate) fn of(result: &Result<(), &CallError>) -> Self {
        match result {
            Ok(()) => CallOutcome::Ok,
            Err(CallError::Job(_) | CallError::Panicked { .. }) => CallOutcome::Failed,
            Err(CallError::Timeout { .. }) => CallOutcome::TimedOut,
            Err(CallError::RunnerLost { .. }) => CallOutcome::RunnerLost,
            Err(_) => CallOutcome::Error,
        }
    }

    fn label(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Failed => "failed",
            CallOutcome::TimedOut => "timed_out",
            CallOutcome::RunnerLost => "runner_lost",
            CallOutcome::Cancelled => "cancelled",
            CallOutcome::Error => "error",
        }
    }
}

/// The pool's event channel.
pub(crate) struct Observer {
    /// The pool's name: the `pool` label on every metric, so two pools keep their series apart.
    pool: metrics::SharedString,
    events: broadcast::Sender<PoolEvent>,
    /// Live event streams. Read on every call: an atomic load, where asking the channel for
    /// its receiver count would take its lock.
    listeners: Arc<AtomicUsize>,
}

/// Counts one event stream while it lives.
struct Listening(Arc<AtomicUsize>);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Observer {
    pub(crate) fn new(pool: &str) -> Self {
        Self {
            pool: metrics::SharedString::from(pool.to_owned()),
            events: broadcast::channel(BACKLOG).0,
            listeners: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub(crate) fn subscribe(&self) -> BoxStream<'static, PoolEvent> {
        use broadcast::error::RecvError;
        let receiver = self.events.subscribe();
        self.listeners.fetch_add(1, Ordering::Relaxed);
        let listening = Listening(Arc::clone(&self.listeners));
        Box::pin(futures_util::stream::unfold(
            (receiver, listening),
            |(mut receiver, listening)| async move {
                let event = match receiver.recv().await {
                    Ok(event) => event,
                    Err(RecvError::Lagged(missed)) => PoolEvent::Lagged { missed },
                    Err(RecvError::Closed) => return None,
                };
                Some((event, (receiver, listening)))
            },
        ))
    }

    /// Sends the event made by `event`, made only when someone listens.
    pub(crate) fn emit(&self, event: impl FnOnce() -> PoolEvent) {
        if self.listeners.load(Ordering::Relaxed) > 0 {
            let _ = self.events.send(event());
        }
    }

    pub(crate) fn runner_counts(&self, stats: &PoolStats) {
        metrics::gauge!("firebrand_runners", "pool" => self.pool.clone(), "state" => "booting")
            .set(stats.booting as f64);
        metrics::gauge!("firebrand_runners", "pool" => self.pool.clone(), "state" => "ready")
            .set(stats.ready as f64);
        metrics::gauge!("firebrand_runners", "pool" => self.pool.clone(), "state" => "draining")
            .set(stats.draining as f64);
        metrics::gauge!("firebrand_runners", "pool" => self.pool.clone(), "state" => "parked")
            .set(stats.parked as f64);
    }

    pub(crate) fn queue_length(&self, queued: usize) {
        metrics::gauge!("firebrand_calls_queued", "pool" => self.pool.clone()).set(queued as f64);
    }

    pub(crate) fn booted(
        &self,
        runner: RunnerId,
        machine: &str,
        outcome: &Result<(Duration, BootKind), Arc<BootError>>,
    ) {
        match outcome {
            Ok((boot_time, kind)) => {
                let label = kind.as_str();
                metrics::histogram!("firebrand_boot_seconds", "pool" => self.pool.clone(), "outcome" => label)
                    .record(boot_time.as_secs_f64());
                metrics::counter!("firebrand_boots_total", "pool" => self.pool.clone(), "outcome" => label).increment(1);
                self.emit(|| PoolEvent::RunnerUp {
                    runner,
                    machine: machine.to_owned(),
                    boot_time: *boot_time,
                    kind: *kind,
                });
            }
            Err(error) => {
                let outcome = match **error {
                    BootError::NotNeeded => "cancelled",
                    _ => "failed",
                };
                metrics::counter!("firebrand_boots_total", "pool" => self.pool.clone(), "outcome" => outcome).increment(1);
                self.emit(|| PoolEvent::RunnerBootFailed {
                    runner,
                    error: Arc::clone(error),
                });
            }
        }
    }

    /// A runner idled out, and its machine was parked or, when the backend would not keep it,
    /// destroyed.
    pub(crate) fn runner_parked(&self, runner: RunnerId, machine: &str, parked: Parked) {
        let outcome = match parked {
            Parked::As(mode) => mode.as_str(),
            Parked::Destroyed => "destroyed",
        };
        metrics::counter!("firebrand_parks_total", "pool" => self.pool.clone(), "outcome" => outcome).increment(1);
        match parked {
            Parked::As(mode) => self.emit(|| PoolEvent::RunnerParked {
                runner,
                machine: machine.to_owned(),
                mode,
            }),
            Parked::Destroyed => self.emit(|| PoolEvent::RunnerIdleStopped { runner }),
        }
    }

    /// Logs a line of a runner's log again, in the parent, with target `firebrand::runner`.
    pub(crate) fn runner_log(&self, runner: RunnerId, machine: &str, line: &crate::wire::LogLine) {
        macro_rules! emit {
            ($level:expr) => {
                tracing::event!(
                    target: "firebrand::runner",
                    $level,
                    %runner,
                    machine,
                    job = line.job.as_deref(),
                    trace_id = line.trace_id.as_deref(),
                    runner_target = %line.target,
                    "{}",
                    line.message
                )
            };
        }
        match line.level {
            1 => emit!(tracing::Level::ERROR),
            2 => emit!(tracing::Level::WARN),
            3 => emit!(tracing::Level::INFO),
            4 => emit!(tracing::Level::DEBUG),
            _ => emit!(tracing::Level::TRACE),
        }
    }

    /// `count` lines of a runner's log were dropped: by the runner (`by_parent` false), which
    /// logged faster than its connection took them, or by the parent, past the pace it holds
    /// each runner to ([`MAX_LOG_LINES_PER_SECOND`](crate::runner::MAX_LOG_LINES_PER_SECOND)).
    pub(crate) fn runner_logs_dropped(
        &self,
        runner: RunnerId,
        machine: &str,
        count: u64,
        by_parent: bool,
    ) {
        metrics::counter!("firebrand_runner_log_dropped_total", "pool" => self.pool.clone())
            .increment(count);
        let why = if by_parent {
            "the runner sent them faster than the parent takes them"
        } else {
            "the runner logged faster than its connection took them"
        };
        tracing::warn!(
            target: "firebrand::runner",
            %runner,
            machine,
            dropped = count,
            "{count} log lines dropped: {why}"
        );
    }

    pub(crate) fn runner_lost(&self, runner: RunnerId, reason: &str) {
        metrics::counter!("firebrand_runners_lost_total", "pool" => self.pool.clone()).increment(1);
        self.emit(|| PoolEvent::RunnerLost {
            runner,
            reason: reason.to_owned(),
        });
    }

    pub(crate) fn call_started(&self, job: &'static str, runner: RunnerId, queued_for: Duration) {
        metrics::gauge!("firebrand_calls_in_flight", "pool" => self.pool.clone()).increment(1.0);
        metrics::histogram!("firebrand_queue_wait_seconds", "pool" => self.pool.clone(), "job" => job)
            .record(queued_for.as_secs_f64());
        self.emit(|| PoolEvent::CallStarted {
            job,
            runner,
            queued_for,
        });
    }

    pub(crate) fn call_finished(
        &self,
        job: &'static str,
        runner: RunnerId,
        ran_for: Duration,
        outcome: CallOutcome,
    ) {
        metrics::gauge!("firebrand_calls_in_flight", "pool" => self.pool.clone()).decrement(1.0);
        metrics::histogram!("firebrand_call_seconds", "pool" => self.pool.clone(), "job" => job)
            .record(ran_for.as_secs_f64());
        metrics::counter!("firebrand_calls_total", "pool" => self.pool.clone(), "job" => job, "outcome" => outcome.label())
            .increment(1);
        self.emit(|| PoolEvent::CallFinished {
            job,
            runner,
            ran_for,
            outcome,
        });
    }
}
