//! A call's deadline: one bound on the caller's whole wait, which each phase of a call (the
//! queue, sending, the job's run, a retry's wait) is held to.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{CallError, DeadlinePhase};

/// When a call's [`deadline`](crate::Call::deadline) passes, from its first poll.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    at: Instant,
    /// As set, for the error.
    length: Duration,
}

impl Deadline {
    /// The deadline `length` from now; `None` for none, or for one too far off to represent.
    pub(super) fn after(length: Option<Duration>) -> Option<Self> {
        let length = length?;
        Some(Self {
            at: Instant::now().checked_add(length)?,
            length,
        })
    }

    /// When it passes.
    pub(super) fn at(&self) -> Instant {
        self.at
    }

    /// The error of a call whose deadline passed in `phase`.
    pub(super) fn passed(&self, phase: DeadlinePhase) -> CallError {
        CallError::DeadlinePassed {
            deadline: self.length,
            phase,
        }
    }

    /// `future`, unless `deadline` passes first; then the error for `phase`.
    pub(super) async fn bound<T>(
        deadline: Option<&Deadline>,
        future: impl Future<Output = Result<T, CallError>>,
        phase: impl FnOnce() -> DeadlinePhase,
    ) -> Result<T, CallError> {
        match deadline {
            None => future.await,
            Some(deadline) => tokio::time::timeout_at(deadline.at, future)
                .await
                .unwrap_or_else(|_| Err(deadline.passed(phase()))),
        }
    }
}
