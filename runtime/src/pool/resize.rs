//! Changing a pool's size while it runs.

use super::Pool;
use crate::error::PoolError;

/// A pool's size: [`Pool::limits`] reads it, [`Pool::resize`] changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Runners kept up.
    pub min: usize,
    /// Most runners, booting ones included.
    pub max: usize,
    /// Calls per runner at once.
    pub max_concurrency: u32,
}

impl Limits {
    /// `min` runners kept up, at most `max`, each running up to `max_concurrency` calls at
    /// once. [`Pool::resize`] checks them.
    ///
    /// ```
    /// let limits = firebrand::Limits::new(1, 8, 4);
    /// assert_eq!(limits.max, 8);
    /// ```
    #[must_use]
    pub fn new(min: usize, max: usize, max_concurrency: u32) -> Self {
        Self {
            min,
            max,
            max_concurrency,
        }
    }
}

impl Pool {
    /// The pool's size now.
    #[must_use]
    pub fn limits(&self) -> Limits {
        self.inner.shared.state.lock().scheduler.limits()
    }

    /// Changes `min`, `max` and `max_concurrency` while the pool runs.
    ///
    /// - Growing boots what the new `min` or the waiting callers need.
    /// - Shrinking drains runners, least busy first: a runner with calls finishes them before
    ///   it stops. No call is lost.
    /// - `max` is capped at what the backend can run, as at build.
    /// - A lower `max_concurrency` applies at once; a higher one applies to runners booted from
    ///   now on, since each runner enforces the concurrency it was booted with.
    ///
    /// ```no_run
    /// # fn f(pool: firebrand::Pool) -> Result<(), firebrand::PoolError> {
    /// let mut limits = pool.limits();
    /// limits.max = 16;
    /// pool.resize(limits)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`PoolError::InvalidConfig`] when `max` or `max_concurrency` is 0 or `min` exceeds `max`;
    /// the pool is unchanged then.
    pub fn resize(&self, limits: Limits) -> Result<(), PoolError> {
        limits.validate()?;
        let shared = &self.inner.shared;
        let limits = cap(limits, shared.backend.max_runners())?;
        shared.drive(|state| {
            let from = state.scheduler.limits();
            tracing::info!(?from, to = ?limits, "resizing the pool");
            state.scheduler.resize(limits);
        });
        Ok(())
    }
}

impl Limits {
    /// Refuses limits no pool can run with: the one check for the builder and for resizes.
    pub(super) fn validate(&self) -> Result<(), PoolError> {
        let invalid = |why: String| Err(PoolError::InvalidConfig(why));
        if self.max == 0 {
            return invalid("max must be at least 1".into());
        }
        if self.min > self.max {
            return invalid(format!("min ({}) exceeds max ({})", self.min, self.max));
        }
        if self.max > crate::settings::MAX_RUNNERS {
            return invalid(format!(
                "max ({}) exceeds the limit of {} runners",
                self.max,
                crate::settings::MAX_RUNNERS
            ));
        }
        if self.max_concurrency == 0 || self.max_concurrency > crate::settings::MAX_CONCURRENCY {
            return invalid(format!(
                "max_concurrency ({}) must be between 1 and {}",
                self.max_concurrency,
                crate::settings::MAX_CONCURRENCY
            ));
        }
        Ok(())
    }
}

/// `limits` within what the backend can run at once: `max`, and `min` with it, are lowered to
/// fit, with a warning.
pub(super) fn cap(mut limits: Limits, backend_max: Option<usize>) -> Result<Limits, PoolError> {
    let Some(most) = backend_max else {
        return Ok(limits);
    };
    if most == 0 {
        return Err(PoolError::InvalidConfig(
            "the backend can run no runner at all (are there GPUs for `gpus_per_runner`?)".into(),
        ));
    }
    if limits.max > most {
        tracing::warn!(
            max = limits.max,
            capped = most,
            "the backend runs at most {most} runners: capping max"
        );
        limits.max = most;
        limits.min = limits.min.min(most);
    }
    Ok(limits)
}
