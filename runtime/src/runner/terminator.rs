//! The terminator: the runner's whole stop policy. It counts the streams being served, and
//! decides when the runner stops:
//!
//! - **idle:** no stream for `idle_shutdown_after`: drain, then exit if the parent does not
//!   release the runner within `drain_grace` plus `peer_timeout`;
//! - **SIGTERM:** drain, then exit after `drain_grace`;
//! - **parent lost:** the serve loop sees the connection end; the terminator then lets running
//!   calls finish for at most `drain_grace` less one `keep_alive`, so that the runner exits by
//!   `peer_timeout + drain_grace` after the parent's last packet (QUIC notices the loss up to
//!   one keep-alive after `peer_timeout`);
//! - **never connected:** dialling gives up at the `connect_failsafe`;
//! - **parked:** the parent parked the runner to be suspended (`park.rs`): it waits to be
//!   frozen and dials again once resumed, under a new terminator; it exits on SIGTERM, or if it
//!   is neither frozen nor claimed within the `connect_failsafe`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::stats::STATS;
use crate::token::RunnerSettings;
use crate::wire::DrainReason;

/// What stands for "never" where a token's setting is too large to add to now: a century.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The instant `wait` from now, or a century from now if that cannot be represented: a token's
/// settings are not trusted to keep `Instant + Duration` from overflowing.
pub(super) fn after(wait: Duration) -> Instant {
    later(Instant::now(), wait)
}

/// `start + wait`, or a century after `start` if that cannot be represented.
fn later(start: Instant, wait: Duration) -> Instant {
    start.checked_add(wait).unwrap_or_else(|| start + NEVER)
}

/// What the serve loop must do next, as the terminator decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Tell the parent the runner drains, for this reason; it should release the runner.
    Drain(DrainReason),
    /// The parent never released the draining runner: exit.
    Exit,
}

/// The stop settings from the boot token.
#[derive(Debug, Clone, Copy)]
struct Policy {
    idle_shutdown_after: Option<Duration>,
    drain_grace: Duration,
    peer_timeout: Duration,
    keep_alive: Duration,
    connect_failsafe: Duration,
}

/// The streams a runner is serving, when it last became idle, and its stop policy.
pub(crate) struct Terminator {
    streams: Mutex<(usize, Instant)>,
    changed: Notify,
    policy: Policy,
    /// When the runner started, for the connect failsafe.
    started: Instant,
}

/// The terminator's reasons to stop, in the order they come: see [`Terminator::stops`].
pub(crate) struct Stops<'a> {
    terminator: &'a Terminator,
    sigterm: &'a mut Sigterm,
    /// Once draining, the parent should release the runner when its calls finish; this bounds
    /// the wait for a parent that never does.
    exit_at: Option<Instant>,
}

/// Held while a stream is served; dropping it ends the stream's accounting.
pub(crate) struct StreamGuard(Arc<Terminator>);

impl Terminator {
    pub(crate) fn new(settings: &RunnerSettings) -> Self {
        let now = Instant::now();
        Self {
            streams: Mutex::new((0, now)),
            changed: Notify::new(),
            policy: Policy {
                idle_shutdown_after: settings.idle_shutdown_after,
                drain_grace: settings.drain_grace,
                peer_timeout: settings.peer_timeout,
                keep_alive: settings.keep_alive,
                connect_failsafe: settings.connect_failsafe,
            },
            started: now,
        }
    }

    /// When dialling the parent gives up.
    pub(crate) fn connect_failsafe(&self) -> Instant {
        later(self.started, self.policy.connect_failsafe)
    }

    /// Idles as the parent asked at admission, instead of as the token says.
    pub(crate) fn override_idle(&mut self, idle_shutdown_after: Option<Duration>) {
        self.policy.idle_shutdown_after = idle_shutdown_after;
    }

    /// The stops to come, for the serve loop to await one at a time. `sigterm` is the
    /// runner's one SIGTERM listener, kept across sessions: a SIGTERM delivered while no
    /// listener exists is lost (a parked runner stopped just after its connection closed).
    pub(super) fn stops<'a>(&'a self, sigterm: &'a mut Sigterm) -> Stops<'a> {
        Stops {
            terminator: self,
            sigterm,
            exit_at: None,
        }
    }

    /// Lets the calls still running finish, for at most the drain grace: less one keep-alive
    /// when the parent was lost, since the loss was noticed up to one keep-alive late.
    pub(crate) async fn drain_calls(&self, parent_lost: bool) {
        let grace = if parent_lost {
            self.policy
                .drain_grace
                .saturating_sub(self.policy.keep_alive)
        } else {
            self.policy.drain_grace
        };
        if tokio::time::timeout(grace, self.drained()).await.is_err() {
            tracing::warn!(
                in_flight = STATS.snapshot().in_flight,
                "drain grace over; abandoning calls"
            );
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
    async fn idle_for(&self, idle_after: Duration) {
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
    async fn drained(&self) {
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

impl Stops<'_> {
    /// The next stop: idle or SIGTERM while serving, then the exit deadline while draining.
    /// Cancel-safe: the serve loop drops it whenever a stream arrives first.
    pub(crate) async fn next(&mut self) -> Stop {
        let policy = self.terminator.policy;
        if let Some(at) = self.exit_at {
            tokio::time::sleep_until(at).await;
            tracing::warn!("parent did not release the draining runner; exiting");
            return Stop::Exit;
        }
        let idle = async {
            match policy.idle_shutdown_after {
                Some(after) => self.terminator.idle_for(after).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = idle => {
                tracing::info!("idle: draining");
                self.exit_at = Some(after(policy.drain_grace.saturating_add(policy.peer_timeout)));
                Stop::Drain(DrainReason::Idle)
            }
            () = self.sigterm.recv() => {
                tracing::info!("SIGTERM: draining");
                self.exit_at = Some(after(policy.drain_grace));
                Stop::Drain(DrainReason::Terminated)
            }
        }
    }
}

/// SIGTERM, or nothing if it cannot be watched.
pub(super) fn sigterm() -> Sigterm {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => Sigterm(Some(signal)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            Sigterm(None)
        }
    }
}

pub(super) struct Sigterm(Option<tokio::signal::unix::Signal>);

impl Sigterm {
    pub(super) async fn recv(&mut self) {
        if let Some(signal) = &mut self.0 {
            if signal.recv().await.is_some() {
                return;
            }
        }
        std::future::pending().await
    }
}
