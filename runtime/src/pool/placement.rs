//! Placement: which runner serves a call, who waits, and when the pool grows.
//!
//! All decisions happen under one short `parking_lot` lock on [`State`]. A call takes a
//! [`Lease`] on a runner slot; dropping the lease frees the slot and hands it straight to the
//! oldest waiting caller.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::builder::Placement;
use super::resize::Limits;
use super::runner::RunnerHandle;
use super::{PoolStats, Shared};
use crate::error::{BootError, CallError, RunnerId};

/// A waiting caller. It is sent a grant of the slot it now holds.
type Waiter = oneshot::Sender<Result<Grant, CallError>>;

/// A slot handed to a waiting caller. If the caller is gone before it takes the grant (its
/// future dropped with the grant still in the channel), dropping the grant gives the slot back.
pub(crate) struct Grant {
    shared: Arc<Shared>,
    runner: Option<Arc<RunnerHandle>>,
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some(runner) = self.runner.take() {
            self.shared.release(runner.id);
        }
    }
}

/// A ready runner and its parent-side accounting.
pub(crate) struct Slot {
    pub(crate) handle: Arc<RunnerHandle>,
    in_flight: u32,
    draining: bool,
    /// Why it drains, given when it is released.
    release_reason: &'static str,
    /// Slots held by resource handles: taken, but no call to wait for at shutdown.
    pinned: u32,
    min: bool,
    /// Its connection or process is gone: no call may be placed on it, and nothing released.
    dead: bool,
}

/// The pool's mutable state.
pub(crate) struct State {
    pub(crate) limits: Limits,
    runners: Vec<Slot>,
    booting: usize,
    booting_min: usize,
    waiters: VecDeque<Waiter>,
    pub(crate) closed: bool,
    boot_failures: u32,
    last_boot_error: Option<Arc<BootError>>,
    retry_scheduled: bool,
    /// Boots under way that are not for `min`, oldest first, with what cancels each.
    demand_boots: Vec<(RunnerId, CancellationToken)>,
}

impl State {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            runners: Vec::new(),
            booting: 0,
            booting_min: 0,
            waiters: VecDeque::new(),
            closed: false,
            boot_failures: 0,
            last_boot_error: None,
            retry_scheduled: false,
            demand_boots: Vec::new(),
        }
    }

    pub(crate) fn stats(&self) -> PoolStats {
        PoolStats {
            ready: self.runners.iter().filter(|s| !s.draining).count(),
            booting: self.booting,
            draining: self.runners.iter().filter(|s| s.draining).count(),
            in_flight: self.runners.iter().map(|s| s.in_flight as usize).sum(),
            queued: self.waiters.iter().filter(|w| !w.is_closed()).count(),
        }
    }

    /// Whether any call runs: a slot a resource handle holds is not a call.
    pub(crate) fn calls_running(&self) -> bool {
        self.runners.iter().any(|s| s.in_flight > s.pinned)
    }

    /// Counts a taken slot on `runner` as held by a resource handle, or no longer.
    pub(crate) fn pin(&mut self, runner: RunnerId, pinned: bool) {
        if let Some(slot) = self.runners.iter_mut().find(|s| s.handle.id == runner) {
            if pinned {
                slot.pinned += 1;
            } else {
                slot.pinned = slot.pinned.saturating_sub(1);
            }
        }
    }

    pub(crate) fn handles(&self) -> Vec<Arc<RunnerHandle>> {
        self.runners.iter().map(|s| Arc::clone(&s.handle)).collect()
    }

    pub(crate) fn last_boot_error(&self) -> Option<Arc<BootError>> {
        self.last_boot_error.clone()
    }

    /// Fails every waiting caller with `error`.
    pub(crate) fn fail_waiters(&mut self, error: &CallError) {
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Err(error.clone()));
        }
    }
}

/// One call's claim on one runner slot. Dropping it frees the slot. `S` is how it reaches the
/// pool: borrowed for a call, owned (an `Arc`) for a stream that outlives its creator's borrow.
pub(crate) struct Lease<S: std::ops::Deref<Target = Shared> = &'static Shared> {
    shared: S,
    runner: Arc<RunnerHandle>,
}

impl<S: std::ops::Deref<Target = Shared>> Lease<S> {
    pub(crate) fn runner(&self) -> &Arc<RunnerHandle> {
        &self.runner
    }
}

impl<S: std::ops::Deref<Target = Shared>> std::borrow::Borrow<RunnerHandle> for Lease<S> {
    fn borrow(&self) -> &RunnerHandle {
        &self.runner
    }
}

impl Lease<&Shared> {
    /// The same claim, holding the pool by `Arc`.
    pub(crate) fn into_owned(self, shared: Arc<Shared>) -> Lease<Arc<Shared>> {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again: its runner is moved out exactly once.
        let runner = unsafe { std::ptr::read(&this.runner) };
        Lease { shared, runner }
    }
}

impl<S: std::ops::Deref<Target = Shared>> Drop for Lease<S> {
    fn drop(&mut self) {
        self.shared.release(self.runner.id);
    }
}

impl Shared {
    /// Takes a slot on the least-loaded runner, waiting in FIFO order for at most `queue_timeout`.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        job: &'static str,
        queue_timeout: Duration,
    ) -> Result<Lease<&Self>, CallError> {
        let queued = {
            let mut state = self.state.lock();
            if state.closed {
                return Err(CallError::Closed);
            }
            while state.waiters.front().is_some_and(|w| w.is_closed()) {
                state.waiters.pop_front();
            }
            // Only when nobody waits: a free slot goes to the oldest caller first.
            if state.waiters.is_empty() {
                if let Some(runner) = self.take_slot(&mut state) {
                    if self.config.prewarm_at.is_some() {
                        let boots = self.plan_boots(&mut state);
                        drop(state);
                        self.start_boots(boots);
                    }
                    return Ok(Lease {
                        shared: &**self,
                        runner,
                    });
                }
            }
            if let Some(max) = self.config.max_queued {
                if state.waiters.len() >= max {
                    // Callers who gave up may still hold places; count only the living.
                    state.waiters.retain(|w| !w.is_closed());
                    if state.waiters.len() >= max {
                        return Err(CallError::Overloaded {
                            queued: state.waiters.len(),
                        });
                    }
                }
            }
            let (waiter, queued) = oneshot::channel();
            state.waiters.push_back(waiter);
            self.observer.queue_length(state.waiters.len());
            let boots = self.plan_boots(&mut state);
            drop(state);
            self.observer.emit(|| super::PoolEvent::CallQueued { job });
            self.start_boots(boots);
            queued
        };
        // Bound first, so that the receiver is dropped (and the waiter seen as gone) before the
        // state is locked below.
        let outcome = tokio::time::timeout(queue_timeout, queued).await;
        match outcome {
            Ok(Ok(granted)) => granted.map(|mut grant| Lease {
                shared: &**self,
                runner: grant
                    .runner
                    .take()
                    .expect("a grant holds its runner until taken"),
            }),
            Ok(Err(_)) => Err(CallError::Closed),
            Err(_) => {
                let state = self.state.lock();
                let booted_nothing = state.runners.is_empty();
                match &state.last_boot_error {
                    Some(error) if booted_nothing => Err(CallError::BootFailed(Arc::clone(error))),
                    _ => Err(CallError::QueueTimeout {
                        waited: queue_timeout,
                    }),
                }
            }
        }
    }

    /// Takes a slot on a runner that has one free, chosen by the placement policy. Ties go to
    /// the oldest runner.
    fn take_slot(&self, state: &mut State) -> Option<Arc<RunnerHandle>> {
        let max = state.limits.max_concurrency;
        let free = state
            .runners
            .iter_mut()
            .filter(|s| !s.draining && s.in_flight < s.handle.capacity.min(max));
        let slot = match self.config.placement {
            Placement::Spread => free.min_by_key(|s| s.in_flight),
            // `max_by_key` keeps the last of equals; the fold keeps the first.
            Placement::Pack => free.fold(None::<&mut Slot>, |best, s| match best {
                Some(b) if b.in_flight >= s.in_flight => Some(b),
                _ => Some(s),
            }),
        }?;
        slot.in_flight += 1;
        if self.config.single_use {
            slot.draining = true;
        }
        Some(Arc::clone(&slot.handle))
    }

    /// A boot task started: returns what cancels it, when it is for demand, not `min`.
    pub(crate) fn boot_started(&self, runner: RunnerId, min: bool) -> CancellationToken {
        let cancel = CancellationToken::new();
        if !min {
            let mut state = self.state.lock();
            state.demand_boots.push((runner, cancel.clone()));
        }
        cancel
    }

    /// Cancels the newest boots for demand beyond what the waiting callers still need: their
    /// calls were served by runners that freed up, so the boots would only make runners that
    /// serve nothing (and, on Fly, bill for it until they idle down). `min` boots stay.
    fn cancel_unneeded_boots(&self, state: &mut State) {
        let demand_booting = state.booting - state.booting_min;
        if demand_booting == 0 || state.closed {
            return;
        }
        let per_runner = state.limits.max_concurrency as usize;
        // Callers who gave up may still be counted: that can only keep a boot, never cancel one
        // that is needed. A pool that pre-warms keeps one boot for the spare.
        let mut wanted = state.waiters.len().div_ceil(per_runner);
        if self.config.prewarm_at.is_some() {
            wanted = wanted.max(1);
        }
        for _ in 0..demand_booting.saturating_sub(wanted) {
            let Some((runner, cancel)) = state.demand_boots.pop() else {
                break;
            };
            tracing::info!(%runner, "cancelling a boot no call needs any more");
            cancel.cancel();
        }
    }

    /// Hands free slots to waiting callers, oldest first.
    fn dispatch(&self, state: &mut State) {
        if state.waiters.is_empty() {
            self.cancel_unneeded_boots(state);
            return;
        }
        // Only while the pool is being dropped can this fail; nobody is left to serve then.
        let Some(shared) = self.me.upgrade() else {
            return;
        };
        while let Some(waiter) = state.waiters.pop_front() {
            if waiter.is_closed() {
                continue;
            }
            let Some(runner) = self.take_slot(state) else {
                state.waiters.push_front(waiter);
                break;
            };
            self.observer.queue_length(state.waiters.len());
            let grant = Grant {
                shared: Arc::clone(&shared),
                runner: Some(runner),
            };
            if let Err(Ok(mut grant)) = waiter.send(Ok(grant)) {
                // The caller left between the check and the send. Undo here: dropping an armed
                // grant would take the lock this function runs under.
                let runner = grant.runner.take().expect("not yet taken");
                if let Some(slot) = state.runners.iter_mut().find(|s| s.handle.id == runner.id) {
                    slot.in_flight -= 1;
                    if self.config.single_use && !slot.dead {
                        slot.draining = false;
                    }
                }
            }
        }
        self.cancel_unneeded_boots(state);
    }

    fn release(&self, runner: RunnerId) {
        let mut state = self.state.lock();
        self.free_slot(&mut state, runner);
        self.dispatch(&mut state);
        if state.closed && !state.calls_running() {
            self.calls_drained.notify_waiters();
        }
    }

    fn free_slot(&self, state: &mut State, runner: RunnerId) {
        let Some(slot) = state.runners.iter_mut().find(|s| s.handle.id == runner) else {
            return;
        };
        slot.in_flight -= 1;
        if slot.draining && slot.in_flight == 0 && !slot.dead {
            slot.handle.release(slot.release_reason);
        }
    }

    /// The runner's connection or process is gone: from now on no call is placed on it, and
    /// the slots its failing calls free go to other runners. Called before its calls are
    /// failed, so that none of those releases can hand a waiter a slot on it.
    pub(crate) fn runner_dead(&self, runner: RunnerId) {
        let mut state = self.state.lock();
        if let Some(slot) = state.runners.iter_mut().find(|s| s.handle.id == runner) {
            if !slot.dead {
                slot.dead = true;
                slot.draining = true;
                self.publish(&state);
            }
        }
    }

    /// The runner announced that it is draining: place nothing more on it.
    pub(crate) fn runner_draining(&self, runner: RunnerId) {
        let mut state = self.state.lock();
        if let Some(slot) = state.runners.iter_mut().find(|s| s.handle.id == runner) {
            slot.draining = true;
            if slot.in_flight == 0 && !slot.dead {
                slot.handle.release("drained");
            }
        }
        self.publish(&state);
    }

    /// How many runners to boot now, and which of them are `min` runners. Counts them as booting.
    fn plan_boots(&self, state: &mut State) -> Vec<bool> {
        if state.closed {
            return Vec::new();
        }
        let config = &self.config;
        let limits = state.limits;
        let per_runner = limits.max_concurrency as usize;
        let min_up = state
            .runners
            .iter()
            .filter(|s| s.min && !s.draining)
            .count();
        let min_missing = limits.min.saturating_sub(min_up + state.booting_min);
        // Callers who gave up may still be counted until dispatch reaches them; that can only
        // bring a boot forward, never past `max`.
        let waiting = state.waiters.len();
        let absorbed = state.booting * per_runner;
        let for_demand = waiting.saturating_sub(absorbed).div_ceil(per_runner);
        // Draining runners count too: the pool never runs more than `max` at once.
        let room = limits
            .max
            .saturating_sub(state.runners.len() + state.booting);
        let prewarm = match config.prewarm_at {
            // One runner at a time: the next crossing boots the next.
            Some(at) if state.booting == 0 => {
                let ready = state.runners.iter().filter(|s| !s.draining);
                let (slots, used) = ready.fold((0, 0), |(slots, used), s| {
                    (slots + per_runner, used + s.in_flight as usize)
                });
                usize::from(slots > 0 && (used + waiting) as f64 >= at * slots as f64)
            }
            _ => 0,
        };
        let total = min_missing.max(for_demand).max(prewarm).min(room);
        let mins = min_missing.min(total);
        state.booting += total;
        state.booting_min += mins;
        if total > 0 {
            self.publish(state);
        }
        (0..total).map(|i| i < mins).collect()
    }

    fn start_boots(self: &Arc<Self>, plan: Vec<bool>) {
        for min in plan {
            super::boot::spawn(self, min);
        }
    }

    /// Hands out slots a resize freed, and boots what it calls for.
    pub(crate) fn after_resize(self: &Arc<Self>) {
        let mut state = self.state.lock();
        self.dispatch(&mut state);
        let plan = self.plan_boots(&mut state);
        drop(state);
        self.start_boots(plan);
    }

    /// Plans and starts whatever boots the current state calls for.
    pub(crate) fn grow(self: &Arc<Self>) {
        let plan = self.plan_boots(&mut self.state.lock());
        self.start_boots(plan);
    }

    /// A booted runner is ready. Returns `false` if the pool closed meanwhile.
    pub(crate) fn runner_ready(self: &Arc<Self>, handle: Arc<RunnerHandle>, min: bool) -> bool {
        let mut state = self.state.lock();
        state.demand_boots.retain(|(id, _)| *id != handle.id);
        state.booting -= 1;
        if min {
            state.booting_min -= 1;
        }
        if state.closed {
            return false;
        }
        state.boot_failures = 0;
        state.last_boot_error = None;
        state.runners.push(Slot {
            handle,
            in_flight: 0,
            draining: false,
            release_reason: "drained",
            pinned: 0,
            min,
            dead: false,
        });
        // A resize may have lowered the limits while it booted.
        self.trim(&mut state);
        self.dispatch(&mut state);
        self.publish(&state);
        true
    }

    /// A boot failed: retry after a debounce that doubles with each failure in a row, while
    /// callers wait or `min` is unmet; after `boot_attempts` failures with nothing running, fail
    /// the waiting callers instead of letting them wait out their timeout. A permanent failure
    /// (a refused config or token) fails them at once and is not retried.
    pub(crate) fn boot_failed(
        self: &Arc<Self>,
        runner: RunnerId,
        min: bool,
        error: Arc<BootError>,
    ) {
        let mut state = self.state.lock();
        state.demand_boots.retain(|(id, _)| *id != runner);
        state.booting -= 1;
        if min {
            state.booting_min -= 1;
        }
        if matches!(*error, BootError::NotNeeded) {
            // Not a failure: nothing to retry, and no caller to tell.
            self.publish(&state);
            return;
        }
        state.boot_failures += 1;
        state.last_boot_error = Some(Arc::clone(&error));
        let failures = state.boot_failures;
        let permanent = error.is_permanent();
        let given_up = failures >= self.config.boot_attempts || permanent;
        if given_up && state.runners.is_empty() && state.booting == 0 {
            state.fail_waiters(&CallError::BootFailed(Arc::clone(&error)));
        }
        self.publish(&state);
        if permanent {
            // Another boot would be refused the same way; only new demand tries again.
            tracing::error!(%error, "boot refused for good: not retrying");
            return;
        }
        if state.closed || state.retry_scheduled {
            return;
        }
        state.retry_scheduled = true;
        drop(state);
        let delay = self
            .config
            .boot_retry_after
            .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(5)));
        let shared = Arc::clone(self);
        let mut closing = self.closing.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = closing.wait_for(|closing| *closing) => return,
            }
            shared.state.lock().retry_scheduled = false;
            shared.grow();
        });
    }

    /// A runner is gone: forget it, and boot replacements that `min` or waiting callers need.
    pub(crate) fn runner_gone(self: &Arc<Self>, runner: RunnerId) {
        let mut state = self.state.lock();
        state.runners.retain(|s| s.handle.id != runner);
        self.publish(&state);
        if state.closed && !state.calls_running() {
            self.calls_drained.notify_waiters();
        }
        let plan = self.plan_boots(&mut state);
        drop(state);
        self.start_boots(plan);
    }

    /// Drains runners beyond `max`, and `min` runners beyond `min`, least busy first. A busy
    /// runner finishes its calls before it is released.
    pub(crate) fn trim(&self, state: &mut State) {
        let limits = state.limits;
        let live = |s: &Slot| !s.draining;
        let excess = state
            .runners
            .iter()
            .filter(|s| live(s))
            .count()
            .saturating_sub(limits.max);
        let excess_min = state
            .runners
            .iter()
            .filter(|s| live(s) && s.min)
            .count()
            .saturating_sub(limits.min);
        for (count, only_min) in [(excess_min, true), (excess, false)] {
            for _ in 0..count {
                let candidate = state
                    .runners
                    .iter_mut()
                    .filter(|s| live(s) && (s.min || !only_min))
                    .min_by_key(|s| s.in_flight);
                let Some(slot) = candidate else { break };
                slot.draining = true;
                slot.release_reason = "resized";
                if slot.in_flight == 0 {
                    slot.handle.release("resized");
                }
            }
        }
        self.publish(state);
    }

    /// Publishes runner counts. Called under the state lock, so it takes the watch's lock
    /// second; nothing may take them in the other order.
    fn publish(&self, state: &State) {
        let stats = state.stats();
        self.observer.runner_counts(&stats);
        self.runner_counts.send_if_modified(|old| {
            let changed = (old.ready, old.booting, old.draining)
                != (stats.ready, stats.booting, stats.draining);
            *old = stats;
            changed
        });
    }
}
