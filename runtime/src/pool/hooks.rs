//! Growth hooks: user callbacks when the pool grows and shrinks.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{BootError, RunnerId};

/// A runner started booting.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GrowStart {
    /// The runner.
    pub runner: RunnerId,
    /// Whether it is one of the pool's `min` runners.
    pub min: bool,
}

/// A runner finished booting, or failed to.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GrowEnd {
    /// The runner.
    pub runner: RunnerId,
    /// How long the boot took, or why it failed.
    pub outcome: Result<Duration, Arc<BootError>>,
}

/// A ready runner left the pool.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Shrink {
    /// The runner.
    pub runner: RunnerId,
    /// Why: drained when idle, lost, or the pool closed.
    pub reason: String,
}

type Hook<E> = Arc<dyn Fn(&E) + Send + Sync>;

/// The hooks a pool calls. They run on the pool's tasks, outside its locks: keep them short.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) grow_start: Option<Hook<GrowStart>>,
    pub(crate) grow_end: Option<Hook<GrowEnd>>,
    pub(crate) shrink: Option<Hook<Shrink>>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("grow_start", &self.grow_start.is_some())
            .field("grow_end", &self.grow_end.is_some())
            .field("shrink", &self.shrink.is_some())
            .finish()
    }
}

/// Calls `hook` with `event`; a panicking hook is logged, never allowed to break the pool.
pub(crate) fn call<E>(hook: &Option<Hook<E>>, event: E) {
    if let Some(hook) = hook {
        if catch_unwind(AssertUnwindSafe(|| hook(&event))).is_err() {
            tracing::error!("a pool hook panicked");
        }
    }
}
