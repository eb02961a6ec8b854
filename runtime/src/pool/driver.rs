//! The driver of placement: it feeds the pool's events to the [`Scheduler`] under the pool's
//! lock, and applies the actions that come out once the lock is let go. Closing a runner's
//! connection, spawning a boot and waking a caller all happen here, never inside the scheduler.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::deadline::Deadline;
use super::handle::RunnerHandle;
use super::placement::{Action, Arrival, Scheduler, Waiter, WaiterId};
use super::{PoolStats, Shared};
use crate::error::{BootError, CallError, Report, RunnerId};

/// A waiting caller's end of its grant.
pub(crate) type WaiterTx = oneshot::Sender<Result<Grant, CallError>>;

impl<T> Waiter for oneshot::Sender<T> {
    fn is_gone(&self) -> bool {
        self.is_closed()
    }
}

/// The scheduler the pool runs.
pub(crate) type PoolScheduler = Scheduler<WaiterTx, Arc<RunnerHandle>>;

type Actions = SmallVec<[Action<WaiterTx, Arc<RunnerHandle>>; 4]>;

/// What the pool's lock guards: the scheduler, and what its boot actions need.
pub(crate) struct State {
    pub(crate) scheduler: PoolScheduler,
    /// What cancels each boot under way.
    boot_cancels: HashMap<RunnerId, CancellationToken>,
    /// The counts last published, to publish only changes.
    published: PoolStats,
    /// The backend's count of machines this pool parked, as last read: it changes only when a
    /// machine is parked, claimed or expires, never on a call's events.
    parked: usize,
}

impl State {
    pub(crate) fn new(scheduler: PoolScheduler) -> Self {
        Self {
            scheduler,
            boot_cancels: HashMap::new(),
            published: PoolStats::default(),
            parked: 0,
        }
    }
}

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

/// One call's claim on one runner slot. Dropping it frees the slot. `S` is how it reaches the
/// pool: borrowed for a call, owned (an `Arc`) for a stream that outlives its creator's borrow.
pub(crate) struct Lease<S: std::ops::Deref<Target = Shared> = &'static Shared> {
    shared: S,
    runner: Arc<RunnerHandle>,
    /// Whether dropping it frees the slot: not once the claim moved to another lease.
    armed: bool,
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
        let mut this = self;
        this.armed = false;
        Lease {
            shared,
            runner: Arc::clone(&this.runner),
            armed: true,
        }
    }
}

impl<S: std::ops::Deref<Target = Shared>> Drop for Lease<S> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.release(self.runner.id);
        }
    }
}

/// A caller's place in the queue: however its wait ends, it leaves.
struct QueuePlace<'a> {
    shared: &'a Shared,
    id: WaiterId,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.shared
            .drive(|state| state.scheduler.waiter_left(self.id));
    }
}

impl Shared {
    /// Runs one event on the scheduler under the lock, publishes the counts it changed, and
    /// applies its actions after letting go of the lock.
    pub(crate) fn drive<T>(&self, event: impl FnOnce(&mut State) -> T) -> T {
        let mut actions = Actions::new();
        let mut boots = SmallVec::<[CancellationToken; 2]>::new();
        let out = {
            let mut state = self.state.lock();
            // Placement measures boots and the queue's pace on the pool's clock.
            state.scheduler.advance(self.now());
            let out = event(&mut state);
            state.scheduler.drain_actions(&mut actions);
            // Boots are registered and cancelled under the lock, so that a cancel can never
            // miss the boot it is for.
            for action in &actions {
                match action {
                    Action::Boot { runner, .. } => {
                        let cancel = CancellationToken::new();
                        state.boot_cancels.insert(*runner, cancel.clone());
                        boots.push(cancel);
                    }
                    Action::CancelBoot(runner) => {
                        if let Some(cancel) = state.boot_cancels.get(runner) {
                            tracing::info!(%runner, "cancelling a boot no call needs any more");
                            cancel.cancel();
                        }
                    }
                    _ => {}
                }
            }
            self.publish(&mut state);
            out
        };
        if !actions.is_empty() {
            self.apply(actions, boots);
        }
        out
    }

    fn apply(&self, actions: Actions, boots: SmallVec<[CancellationToken; 2]>) {
        let mut boots = boots.into_iter();
        for action in actions {
            match action {
                Action::Grant { waiter, runner } => {
                    // Only while the pool is being dropped can this fail; dropping the waiter
                    // tells the caller the pool closed.
                    let Some(shared) = self.me.upgrade() else {
                        continue;
                    };
                    let grant = Grant {
                        shared,
                        runner: Some(runner),
                    };
                    if let Err(Ok(mut grant)) = waiter.send(Ok(grant)) {
                        // The caller left between the grant and the send.
                        let runner = grant.runner.take().expect("not yet taken");
                        self.drive(|state| state.scheduler.grant_returned(runner.id));
                    }
                }
                Action::Fail { waiter, error } => {
                    let _ = waiter.send(Err(error));
                }
                Action::Boot { runner, min } => {
                    let cancel = boots.next().expect("one token per boot");
                    if let Some(shared) = self.me.upgrade() {
                        super::boot::spawn(&shared, runner, min, cancel);
                    }
                }
                Action::CancelBoot(_) => {}
                Action::Release { runner, reason } => runner.release(reason),
                Action::WakeAt(at) => self.wake_at(at),
                Action::CallsDrained => self.calls_drained.notify_waiters(),
            }
        }
    }

    /// `stats` with the count of machines the backend has parked for this pool, which the
    /// scheduler does not know.
    pub(crate) fn with_parked(&self, mut stats: PoolStats) -> PoolStats {
        if let Some(set) = &self.parked_set {
            stats.parked = set.count(self.pool_key);
        }
        stats
    }

    /// Destroys every machine this pool parked, at its shutdown: no other pool can admit their
    /// runners.
    pub(crate) async fn destroy_parked(&self) {
        if let Some(set) = &self.parked_set {
            set.release(self.pool_key).await;
            self.parked_changed();
        }
    }

    /// Reads the parked count again and publishes it: a change no scheduler event makes.
    pub(crate) fn parked_changed(&self) {
        let parked = self.with_parked(PoolStats::default()).parked;
        let mut state = self.state.lock();
        state.parked = parked;
        state.scheduler.set_parked(parked);
        self.publish(&mut state);
    }

    /// The pool's clock, as the scheduler reads it: time since the pool started.
    pub(crate) fn now(&self) -> Duration {
        self.clock.elapsed()
    }

    /// Ticks the scheduler once the pool's clock reads `at`, unless the pool closes first.
    fn wake_at(&self, at: Duration) {
        let Some(shared) = self.me.upgrade() else {
            return;
        };
        let deadline = self.clock + at;
        let mut closing = self.closing.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                _ = closing.wait_for(|closing| *closing) => return,
            }
            let now = shared.now();
            shared.drive(|state| state.scheduler.tick(now));
        });
    }

    /// Publishes the counts that changed. Called under the state lock, so it takes the watch's
    /// lock second; nothing may take them in the other order.
    fn publish(&self, state: &mut State) {
        let stats = PoolStats {
            parked: state.parked,
            ..state.scheduler.stats()
        };
        let old = state.published;
        if stats.queued != old.queued {
            self.observer.queue_length(stats.queued);
        }
        let runners = |s: &PoolStats| (s.ready, s.booting, s.draining, s.parked, s.min_lapsed);
        if runners(&stats) != runners(&old) {
            self.observer.runner_counts(&stats);
            self.runner_counts.send_replace(stats);
        }
        state.published = stats;
    }

    /// Takes a slot on a runner chosen by the placement policy, waiting in FIFO order for at
    /// most `queue_timeout`.
    pub(crate) async fn acquire(
        &self,
        job: &'static str,
        queue_timeout: Duration,
        deadline: Option<&Deadline>,
    ) -> Result<Lease<&Self>, CallError> {
        let mut receiver = None;
        let arrival = self.drive(|state| {
            state.scheduler.call_arrived(|| {
                let (waiter, queued) = oneshot::channel();
                receiver = Some(queued);
                waiter
            })
        });
        let id = match arrival {
            Arrival::Granted(runner) => {
                return Ok(Lease {
                    shared: self,
                    runner,
                    armed: true,
                })
            }
            Arrival::Refused(error) => return Err(error),
            Arrival::Queued(id) => id,
        };
        let queued = receiver.expect("made for the queue");
        self.observer.emit(|| super::PoolEvent::CallQueued { job });
        let place = QueuePlace { shared: self, id };
        // Whichever comes first: the queue timeout, or the call's deadline.
        let queue_ends = Instant::now().checked_add(queue_timeout);
        let by_deadline = deadline.filter(|d| queue_ends.is_none_or(|ends| d.at() < ends));
        let ends = by_deadline.map(Deadline::at).or(queue_ends);
        // The receiver is dropped with the timeout future, before the state is locked below.
        let outcome = match ends {
            Some(ends) => tokio::time::timeout_at(ends, queued).await,
            None => Ok(queued.await),
        };
        match outcome {
            Ok(Ok(granted)) => {
                // Served: it left the queue when it was granted.
                std::mem::forget(place);
                granted.map(|mut grant| Lease {
                    shared: self,
                    runner: grant
                        .runner
                        .take()
                        .expect("a grant holds its runner until taken"),
                    armed: true,
                })
            }
            Ok(Err(_)) => Err(CallError::Closed),
            Err(_) => {
                std::mem::forget(place);
                Err(self.drive(|state| {
                    let error = match by_deadline {
                        Some(deadline) => deadline.passed(state.scheduler.queued_phase(id)),
                        None => state.scheduler.queue_timeout_error(queue_timeout),
                    };
                    state.scheduler.waiter_left(id);
                    error
                }))
            }
        }
    }

    fn release(&self, runner: RunnerId) {
        self.drive(|state| state.scheduler.slot_freed(runner));
    }

    /// A booted runner is ready. Returns `false` if the pool closed meanwhile.
    pub(crate) fn runner_ready(&self, handle: &Arc<RunnerHandle>) -> bool {
        self.drive(|state| {
            state.boot_cancels.remove(&handle.id);
            state
                .scheduler
                .runner_up(handle.id, Arc::clone(handle), handle.capacity)
        })
    }

    /// A boot failed or was cancelled.
    pub(crate) fn boot_failed(&self, runner: RunnerId, error: Arc<BootError>) {
        let now = self.now();
        self.drive(|state| {
            state.boot_cancels.remove(&runner);
            if error.is_permanent() {
                // Another boot would be refused the same way; only new demand tries again.
                tracing::error!(error = %Report(&*error), "boot refused for good: not retrying");
            }
            state.scheduler.boot_failed(runner, error, now);
        });
    }

    /// Closes the pool: no call is taken any more, and every waiting caller fails. Returns
    /// whether calls still run. The one close path, for `shutdown` and for the last drop.
    pub(crate) fn close(&self) -> bool {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.drive(|state| state.scheduler.close())
    }
}
