//! A parked runner: its parent closed the connection with
//! [`close::PARKED`](crate::wire::close::PARKED) and is suspending its machine. The process stays
//! as it is, to be frozen with the machine's memory, and dials its parent again once it is
//! resumed.
//!
//! A frozen process cannot tell that it was frozen until it runs again, so the wait ticks and
//! looks at the clocks: a tick that comes far later than asked (the monotonic clock went on
//! while the process was stopped), or a wall clock that moved apart from the monotonic one (a
//! VM resumed from a snapshot, its clock stepped by NTP), means a resume; so does SIGCONT, which
//! a process frozen with SIGSTOP gets when it is let go on (as the fake Machines API does it).
//! Where none of these shows, a dial every [`UNNOTICED_RESUME_DIAL`] is the backstop: the
//! parent refuses it until it opens a claim for this runner, which it does before it resumes
//! the machine.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::terminator::after;

/// How often a parked runner looks at its clocks.
const TICK: Duration = Duration::from_millis(50);

/// How much later than asked a tick may come, or how far the wall clock may move apart from
/// the monotonic one, before the runner takes it for a resume. Far above a busy host's
/// scheduling delay; far below any suspend.
const FROZEN_GAP: Duration = Duration::from_millis(500);

/// How often a parked runner dials its parent anyway, in case it was resumed without noticing.
/// It bounds the extra latency of such a resume; each dial before the claim costs the parent
/// one refused handshake.
pub(super) const UNNOTICED_RESUME_DIAL: Duration = Duration::from_secs(1);

/// SIGCONT, watched from the start: a runner frozen before it saw its parent park it (the
/// parent suspends at once) gets the signal before it waits, and must still see it then.
pub(super) struct Continued(Option<tokio::signal::unix::Signal>);

impl Continued {
    /// Starts watching; a runner that cannot, relies on its clocks and the backstop dial.
    pub(super) fn watch() -> Self {
        let kind =
            tokio::signal::unix::SignalKind::from_raw(rustix::process::Signal::CONT.as_raw());
        Self(tokio::signal::unix::signal(kind).ok())
    }

    async fn recv(&mut self) {
        match &mut self.0 {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// Why a parked runner woke up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    /// Its clocks say it was frozen and resumed: dial now.
    Resumed,
    /// Time for a backstop dial.
    Backstop,
    /// It was not frozen before `deadline`: its parent is gone, or gave up suspending it and
    /// did not stop it either. Exit, which leaves a stopped machine to start or destroy.
    NeverFrozen,
    /// SIGTERM: the machine is being stopped (a suspend that failed falls back to a stop).
    Terminated,
}

/// Waits for the next reason to dial again or to exit: a resume, the next backstop dial, or
/// `deadline` passing without either.
pub(super) async fn wait(
    deadline: Instant,
    sigterm: &mut super::terminator::Sigterm,
    continued: &mut Continued,
) -> Wake {
    let backstop = after(UNNOTICED_RESUME_DIAL);
    loop {
        let (asked, wall) = (Instant::now(), SystemTime::now());
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = sigterm.recv() => return Wake::Terminated,
            () = continued.recv() => {
                tracing::info!("continued (SIGCONT): dialing the parent");
                return Wake::Resumed;
            }
        }
        let slept = asked.elapsed();
        let late = slept.saturating_sub(TICK);
        let wall_moved = SystemTime::now()
            .duration_since(wall)
            .unwrap_or_else(|backwards| backwards.duration());
        let drift = wall_moved.abs_diff(slept);
        // Looked at before the deadline: a runner frozen across it was parked as asked.
        if late > FROZEN_GAP || drift > FROZEN_GAP {
            tracing::info!(?late, ?drift, "resumed: dialing the parent");
            return Wake::Resumed;
        }
        if Instant::now() >= deadline {
            return Wake::NeverFrozen;
        }
        if Instant::now() >= backstop {
            return Wake::Backstop;
        }
    }
}
