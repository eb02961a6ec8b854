//! Placement: which runner serves a call, who waits, and when the pool grows or shrinks.
//!
//! A pure state machine, after quinn's split of `quinn-proto` and `quinn`. [`Scheduler`] holds
//! the runners by id, the waiting callers, the limits and the boots under way. Events go in as
//! method calls: a call arrives, a slot is freed, a runner is up, draining, dead or gone, a boot
//! failed, the limits change, time passes (the time is passed in). What must happen comes out as
//! [`Action`]s: grant a slot, fail a waiter, boot, cancel a boot, release a runner, wake me
//! later. The pool's driver (`driver.rs`) applies them after it lets go of the lock.
//!
//! Nothing in here touches QUIC, a lock, a clock or a backend, so the unit and property tests at
//! the bottom drive it directly, and `benches/placement.rs` measures it alone.
//!
//! Every decision is O(log runners) or better: the runners that can take a call are kept in a
//! set ordered by the placement policy, and every count [`PoolStats`] reports is kept as it
//! changes, so that neither a grant nor `stats()` walks the runners or the waiters.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::builder::Placement;
use super::resize::Limits;
use super::PoolStats;
use crate::backoff::Backoff;
use crate::error::{BootError, CallError, DeadlinePhase, RunnerId};

/// The weight of the newest sample in the boot-time and serve-interval estimates: about the
/// last eight count.
const ESTIMATE_WEIGHT: f64 = 0.125;

/// Call ends seen while callers waited after which the queue's pace counts as measured: about
/// what [`ESTIMATE_WEIGHT`] averages over.
pub(crate) const PACE_SAMPLES: u32 = 8;

/// Call ends missed in a row, at the measured pace, after which the pace is taken to be stale
/// and a boot for demand starts (but never sooner than a quarter of a boot's time).
const STALL_INTERVALS: u32 = 4;

/// How long after a failed boot the next one starts, at most: the delay doubles with each
/// failure in a row, up to 2^`MAX_BACKOFF_DOUBLINGS` times the pool's `boot_retry_after`.
const MAX_BACKOFF_DOUBLINGS: u32 = 5;

/// A waiting caller, as the scheduler sees it: it may have given up.
pub trait Waiter {
    /// Whether the caller is gone, so that a grant would be wasted on it.
    fn is_gone(&self) -> bool;
}

/// A waiting caller's place in the queue, to leave it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WaiterId(u64);

/// The pool settings placement follows, fixed when the pool is built.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Which runner a call goes to.
    pub placement: Placement,
    /// Each runner serves one call, then drains.
    pub single_use: bool,
    /// Boot a spare runner when this share of the slots is taken.
    pub prewarm_at: Option<f64>,
    /// Refuse a call when this many wait.
    pub max_queued: Option<usize>,
    /// Failed boots in a row, with nothing running, after which the waiting callers fail.
    pub boot_attempts: u32,
    /// The delay before a failed boot is retried, doubled with each failure in a row.
    pub boot_retry_after: Duration,
    /// The backend parks the machines of runners that idle out: a runner booted for nobody
    /// becomes a parked machine, supply for the next burst, so boots under way are not
    /// cancelled because the queue emptied (only because callers left).
    pub parks: bool,
}

/// What the driver must do, in order.
#[derive(Debug)]
pub enum Action<W, H> {
    /// Hand `waiter` the slot on `runner` that is now taken for it. If the waiter is gone by
    /// then, give the slot back with [`Scheduler::grant_returned`].
    Grant {
        /// The caller.
        waiter: W,
        /// Its runner.
        runner: H,
    },
    /// Fail a waiting caller.
    Fail {
        /// The caller.
        waiter: W,
        /// Why.
        error: CallError,
    },
    /// Boot a runner with this id; report the outcome with [`Scheduler::runner_up`] or
    /// [`Scheduler::boot_failed`].
    Boot {
        /// The runner to be.
        runner: RunnerId,
        /// Whether it is one of the pool's `min` runners.
        min: bool,
    },
    /// Cancel this boot: no caller needs it any more. Its end is still reported as a
    /// [`BootError::NotNeeded`] failure.
    CancelBoot(RunnerId),
    /// Release this runner: it takes no more calls and has none running.
    Release {
        /// The runner.
        runner: H,
        /// Why, for its log line.
        reason: &'static str,
    },
    /// Call [`Scheduler::tick`] once the pool's clock reads this.
    WakeAt(Duration),
    /// The pool is closed and no call runs any more.
    CallsDrained,
}

/// What became of a call that arrived.
#[derive(Debug)]
pub enum Arrival<H> {
    /// A slot on this runner is taken for it.
    Granted(H),
    /// It waits, with this place in the queue.
    Queued(WaiterId),
    /// It is refused.
    Refused(CallError),
}

/// A ready runner and its accounting.
#[derive(Debug)]
struct Slot<H> {
    handle: H,
    /// Its place in the order runners came up in: ties go to the oldest.
    seq: u64,
    /// The calls it was booted to run at once.
    capacity: u32,
    in_flight: u32,
    /// Slots held by resource handles: taken, but no call to wait for at shutdown.
    pinned: u32,
    min: bool,
    /// It takes no more calls.
    draining: bool,
    /// Why it drains, given when it is released.
    release_reason: &'static str,
    /// Its connection or process is gone: nothing may be placed on it, or released.
    dead: bool,
    /// A release was asked for already.
    released: bool,
}

/// What a slot adds to the pool's counts, so that a change is a subtraction and an addition.
#[derive(Clone, Copy, Default)]
struct Share {
    live: usize,
    live_min: usize,
    in_flight: usize,
    in_flight_live: usize,
    pinned: usize,
}

/// A boot under way.
#[derive(Debug, Clone, Copy)]
struct Booting {
    min: bool,
    /// When it started, on the pool's clock.
    started: Duration,
    /// It started while machines were parked: it will most likely claim one.
    claim: bool,
    /// Its place among the boots for demand, newest last; `None` for `min` and cancelled ones.
    demand: Option<u64>,
}

/// The pool's placement state: see the module docs of `pool/placement.rs`.
#[derive(Debug)]
pub struct Scheduler<W, H> {
    rules: Rules,
    limits: Limits,
    runners: HashMap<RunnerId, Slot<H>>,
    /// The runners that can take a call now, best first by [`Scheduler::rank`].
    free: BTreeSet<(u32, u64, RunnerId)>,
    next_seq: u64,
    booting: HashMap<RunnerId, Booting>,
    booting_min: usize,
    /// Boots for demand that may still be cancelled, oldest first.
    demand_boots: BTreeMap<u64, RunnerId>,
    /// The waiting callers in arrival order, with when each arrived on the pool's clock.
    waiters: VecDeque<(WaiterId, Duration, W)>,
    next_waiter: u64,
    live: usize,
    live_min: usize,
    in_flight: usize,
    in_flight_live: usize,
    pinned: usize,
    closed: bool,
    boot_failures: u32,
    last_boot_error: Option<Arc<BootError>>,
    /// When the retry of a failed boot is due, on the pool's clock.
    retry_at: Option<Duration>,
    /// The pool's clock, as of the last [`Scheduler::advance`].
    now: Duration,
    /// How long a boot takes, from the boots that came up; `None` before the first.
    boot_time: Option<Duration>,
    /// How long a call holds its slot, from the time between call ends while callers wait
    /// times the slots then busy (Little's law: the pool is saturated while callers wait).
    /// `None` before it was seen.
    call_time: Option<Duration>,
    /// When the last call ended, on the pool's clock.
    last_end: Option<Duration>,
    /// When callers last began to wait on an empty queue: the start of the stretch that
    /// `call_time` samples are taken in.
    queued_since: Duration,
    /// How many samples `call_time` has taken.
    serve_samples: u32,
    /// When the last runner came up, on the pool's clock.
    last_up: Duration,
    /// When a boot put off for demand is due to be reconsidered.
    demand_check_at: Option<Duration>,
    /// Machines the backend holds parked for this pool: a boot claims one before it creates.
    parked: usize,
    /// Boots under way that started while machines were parked.
    claims: usize,
    /// `min` runners idled out, and `min` is not kept until the next call.
    min_lapsed: bool,
    /// A boot failed for good (a refused config, a parent pod gone): nothing boots again, for
    /// `min` or for the callers already waiting, until a call arrives, a resize asks, or a boot
    /// already under way comes up.
    boots_refused: bool,
    actions: Vec<Action<W, H>>,
}

impl<W: Waiter, H: Clone> Scheduler<W, H> {
    /// An empty pool with these rules and limits. Nothing boots until the first event.
    pub fn new(rules: Rules, limits: Limits) -> Self {
        Self {
            rules,
            limits,
            runners: HashMap::new(),
            free: BTreeSet::new(),
            next_seq: 0,
            booting: HashMap::new(),
            booting_min: 0,
            demand_boots: BTreeMap::new(),
            waiters: VecDeque::new(),
            next_waiter: 0,
            live: 0,
            live_min: 0,
            in_flight: 0,
            in_flight_live: 0,
            pinned: 0,
            closed: false,
            boot_failures: 0,
            last_boot_error: None,
            retry_at: None,
            now: Duration::ZERO,
            boot_time: None,
            call_time: None,
            last_end: None,
            queued_since: Duration::ZERO,
            serve_samples: 0,
            last_up: Duration::ZERO,
            demand_check_at: None,
            parked: 0,
            claims: 0,
            min_lapsed: false,
            boots_refused: false,
            actions: Vec::new(),
        }
    }

    // ---- queries ----

    /// The pool's runners and calls now.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            ready: self.live,
            booting: self.booting.len(),
            draining: self.runners.len() - self.live,
            in_flight: self.in_flight,
            queued: self.waiters.len(),
            parked: 0,
            min_lapsed: self.min_lapsed,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether any call runs: a slot a resource handle holds is not a call.
    pub fn calls_running(&self) -> bool {
        self.in_flight > self.pinned
    }

    /// The last boot failure, until a runner comes up.
    pub fn last_boot_error(&self) -> Option<Arc<BootError>> {
        self.last_boot_error.clone()
    }

    /// Every runner's handle, draining and dead ones included.
    pub fn handles(&self) -> impl Iterator<Item = &H> {
        self.runners.values().map(|slot| &slot.handle)
    }

    /// What a caller that waited `waited` in vain is told: the boot failure, when nothing ever
    /// came up, or that it timed out.
    pub fn queue_timeout_error(&self, waited: Duration) -> CallError {
        match &self.last_boot_error {
            Some(error) if self.runners.is_empty() => CallError::BootFailed(Arc::clone(error)),
            _ => CallError::QueueTimeout { waited },
        }
    }

    /// What waiting caller `id` waits for: a boot, when no runner is up and one boots (the
    /// one that started first), else its turn, behind the living callers ahead of it.
    pub fn queued_phase(&self, id: WaiterId) -> DeadlinePhase {
        if self.live == 0 {
            let first = self.booting.iter().min_by_key(|(_, boot)| boot.started);
            if let Some((runner, _)) = first {
                return DeadlinePhase::Booting { runner: *runner };
            }
        }
        let behind = self
            .waiters
            .iter()
            .take_while(|(waiter, _, _)| *waiter != id)
            .filter(|(_, _, waiter)| !waiter.is_gone())
            .count();
        DeadlinePhase::Queued { behind }
    }

    /// Moves the actions the last events produced into `into`.
    pub fn drain_actions<E: Extend<Action<W, H>>>(&mut self, into: &mut E) {
        into.extend(self.actions.drain(..));
    }

    // ---- events ----

    /// The pool's clock reads `now`: the time every later event happened at. Never goes back.
    pub fn advance(&mut self, now: Duration) {
        self.now = self.now.max(now);
    }

    /// The backend holds `count` parked machines for this pool, which boots claim first.
    pub fn set_parked(&mut self, count: usize) {
        self.parked = count;
    }

    /// A call arrives. It takes a slot at once when nobody waits and one is free; otherwise it
    /// waits as `waiter()` (boots may follow), or is refused.
    pub fn call_arrived(&mut self, waiter: impl FnOnce() -> W) -> Arrival<H> {
        if self.closed {
            return Arrival::Refused(CallError::Closed);
        }
        if self.min_lapsed || self.boots_refused {
            // Demand is back: `min` is kept again from now on, and a refused boot is tried
            // again for it.
            self.min_lapsed = false;
            self.boots_refused = false;
            self.plan_boots();
        }
        while self.waiters.front().is_some_and(|(_, _, w)| w.is_gone()) {
            self.waiters.pop_front();
        }
        // Only when nobody waits: a free slot goes to the oldest caller first.
        if self.waiters.is_empty() {
            if let Some(runner) = self.take_best() {
                if self.rules.prewarm_at.is_some() {
                    self.plan_boots();
                }
                return Arrival::Granted(runner);
            }
        }
        if let Some(max) = self.rules.max_queued {
            if self.waiters.len() >= max {
                // Callers who gave up may still hold places; count only the living.
                self.waiters.retain(|(_, _, w)| !w.is_gone());
                if self.waiters.len() >= max {
                    return Arrival::Refused(CallError::Overloaded {
                        queued: self.waiters.len(),
                    });
                }
            }
        }
        let id = WaiterId(self.next_waiter);
        self.next_waiter += 1;
        if self.waiters.is_empty() {
            self.queued_since = self.now;
        }
        self.waiters.push_back((id, self.now, waiter()));
        self.plan_boots();
        Arrival::Queued(id)
    }

    /// A waiting caller gave up (timed out, or was dropped). A no-op if it was served already.
    pub fn waiter_left(&mut self, id: WaiterId) {
        // Places are handed out in increasing order, so the queue is sorted by them.
        if let Ok(at) = self.waiters.binary_search_by_key(&id, |(w, _, _)| *w) {
            self.waiters.remove(at);
            // Boots no remaining caller needs are cancelled now, not at the next dispatch: on
            // Fly a boot for nobody is a billed machine until it idles out.
            self.cancel_unneeded_boots(true);
        }
    }

    /// A call on `runner` ended: its slot goes to the oldest waiting caller, and a draining
    /// runner with no call left is released.
    pub fn slot_freed(&mut self, runner: RunnerId) {
        if !self.waiters.is_empty() {
            // A sample is the time between two ends while callers waited all along and no
            // runner came up: every slot busy, and as many of them. An end before the queue
            // formed (the last call of an earlier burst, seconds ago) or before a runner came
            // up measures idle or boot time, not a call's.
            let since = self.queued_since.max(self.last_up);
            if let Some(last) = self.last_end.filter(|&last| last >= since) {
                let busy = u32::try_from(self.in_flight_live.max(1)).unwrap_or(u32::MAX);
                let sample = self.now.saturating_sub(last).saturating_mul(busy);
                self.call_time = Some(estimate(self.call_time, sample));
                self.serve_samples = self.serve_samples.saturating_add(1);
            }
        }
        self.last_end = Some(self.now);
        self.update(runner, |slot| {
            slot.in_flight = slot.in_flight.saturating_sub(1)
        });
        self.release_if_drained(runner);
        self.dispatch();
        if self.closed && !self.calls_running() {
            self.actions.push(Action::CallsDrained);
        }
    }

    /// A [`Action::Grant`] found its waiter gone: the slot is free again, and a single-use
    /// runner that served nothing may serve the next caller.
    pub fn grant_returned(&mut self, runner: RunnerId) {
        let single_use = self.rules.single_use;
        self.update(runner, |slot| {
            if single_use && !slot.dead {
                slot.draining = false;
            }
        });
        self.slot_freed(runner);
    }

    /// Counts a taken slot on `runner` as held by a resource handle, or no longer.
    pub fn pin(&mut self, runner: RunnerId, pinned: bool) {
        self.update(runner, |slot| {
            slot.pinned = if pinned {
                slot.pinned + 1
            } else {
                slot.pinned.saturating_sub(1)
            };
        });
    }

    /// A booted runner is ready, able to run `capacity` calls at once. Returns `false` when the
    /// pool closed meanwhile: the driver then lets the runner go.
    pub fn runner_up(&mut self, runner: RunnerId, handle: H, capacity: u32) -> bool {
        let boot = self.boot_ended(runner);
        if let Some(boot) = boot {
            let took = self.now.saturating_sub(boot.started);
            self.boot_time = Some(estimate(self.boot_time, took));
        }
        let min = boot.is_some_and(|boot| boot.min);
        self.last_up = self.now;
        if self.closed {
            return false;
        }
        self.boot_failures = 0;
        self.last_boot_error = None;
        self.boots_refused = false;
        let slot = Slot {
            handle,
            seq: self.next_seq,
            capacity,
            in_flight: 0,
            pinned: 0,
            min,
            draining: false,
            release_reason: "drained",
            dead: false,
            released: false,
        };
        self.next_seq += 1;
        self.add_share(share(&slot));
        if let Some(key) = self.free_key(runner, &slot) {
            self.free.insert(key);
        }
        self.runners.insert(runner, slot);
        // The limits may have been lowered while it booted.
        self.trim();
        self.dispatch();
        // A boot works again: what an earlier failure left unmet (a `min` runner) boots now.
        self.plan_boots();
        true
    }

    /// A boot failed, at `now` on the pool's clock. It is retried after a delay that doubles
    /// with each failure in a row, while callers wait or `min` is unmet. After `boot_attempts`
    /// failures with nothing running, the waiting callers fail instead of waiting out their
    /// timeout. A permanent failure (a refused config or token) fails them at once and is not
    /// retried: only new demand boots again.
    pub fn boot_failed(&mut self, runner: RunnerId, error: Arc<BootError>, now: Duration) {
        self.boot_ended(runner);
        if matches!(*error, BootError::NotNeeded) {
            // Not a failure: nobody to tell. Demand that arrived since may need a boot.
            self.plan_boots();
            return;
        }
        self.boot_failures = self.boot_failures.saturating_add(1);
        self.last_boot_error = Some(Arc::clone(&error));
        let permanent = error.is_permanent();
        let given_up = self.boot_failures >= self.rules.boot_attempts || permanent;
        if given_up && self.runners.is_empty() && self.booting.is_empty() {
            let failed = CallError::BootFailed(Arc::clone(&error));
            for (_, _, waiter) in self.waiters.drain(..) {
                self.actions.push(Action::Fail {
                    waiter,
                    error: failed.clone(),
                });
            }
        }
        if permanent {
            // Not retried, whatever else was pending: every later event (a runner gone, a
            // tick) would otherwise boot `min` into the same refusal again, forever.
            self.boots_refused = true;
            self.retry_at = None;
            return;
        }
        if self.closed || self.retry_at.is_some() {
            return;
        }
        let first = self.rules.boot_retry_after;
        let backoff = Backoff::steady(first, first.saturating_mul(1 << MAX_BACKOFF_DOUBLINGS));
        let delay = backoff.nth(self.boot_failures - 1);
        let at = now.saturating_add(delay);
        self.retry_at = Some(at);
        self.actions.push(Action::WakeAt(at));
    }

    /// Time passed: `now` on the pool's clock. A boot retry that is due starts.
    pub fn tick(&mut self, now: Duration) {
        self.advance(now);
        if self.retry_at.is_some_and(|at| at <= now) {
            self.retry_at = None;
            self.plan_boots();
        }
        if self.demand_check_at.is_some_and(|at| at <= now) {
            self.demand_check_at = None;
            self.plan_boots();
        }
    }

    /// Whether `min` lapsed: its runners idled out, and none is booted until a call arrives.
    pub fn min_lapsed(&self) -> bool {
        self.min_lapsed
    }

    /// Boots what `min` and the waiting callers need now: at build, and after a retry.
    pub fn grow(&mut self) {
        self.plan_boots();
    }

    /// The runner said it drains: nothing more is placed on it. A `min` runner that drains
    /// because it idled out (`min_idle_shutdown_after`) lapses `min`: it is not replaced, nor
    /// any other `min` runner, until the next call arrives.
    pub fn runner_draining(&mut self, runner: RunnerId, idle: bool) {
        let min = self.update(runner, |slot| {
            slot.draining = true;
            slot.min
        });
        if idle && min == Some(true) {
            self.min_lapsed = true;
        }
        self.release_if_drained(runner);
    }

    /// The runner's connection or process is gone: from now on nothing is placed on it, and the
    /// slots its failing calls free go to other runners. The driver reports this before it
    /// fails its calls, so that none of their ends can hand a waiter a slot on it.
    pub fn runner_dead(&mut self, runner: RunnerId) {
        self.update(runner, |slot| {
            slot.dead = true;
            slot.draining = true;
        });
    }

    /// The runner is gone for good: it is forgotten, and replacements that `min` or the waiting
    /// callers need are booted.
    pub fn runner_gone(&mut self, runner: RunnerId) {
        if let Some(slot) = self.runners.remove(&runner) {
            if let Some(key) = self.free_key(runner, &slot) {
                self.free.remove(&key);
            }
            self.sub_share(share(&slot));
        }
        if self.closed && !self.calls_running() {
            self.actions.push(Action::CallsDrained);
        }
        self.plan_boots();
    }

    /// New limits. Shrinking drains runners, least busy first; growing boots what is needed. A
    /// lower `max_concurrency` applies to every runner at once.
    pub fn resize(&mut self, limits: Limits) {
        self.boots_refused = false;
        let concurrency_changed = limits.max_concurrency != self.limits.max_concurrency;
        self.limits = limits;
        if concurrency_changed {
            self.free.clear();
            for (id, slot) in &self.runners {
                if let Some(key) = self.free_key(*id, slot) {
                    self.free.insert(key);
                }
            }
        }
        self.trim();
        self.dispatch();
        self.plan_boots();
    }

    /// The pool closes: every waiting caller fails, and nothing boots any more. Returns whether
    /// calls still run; [`Action::CallsDrained`] follows when the last one ends.
    pub fn close(&mut self) -> bool {
        self.closed = true;
        self.retry_at = None;
        for (_, _, waiter) in self.waiters.drain(..) {
            self.actions.push(Action::Fail {
                waiter,
                error: CallError::Closed,
            });
        }
        self.calls_running()
    }

    // ---- internals ----

    /// The slot's key in `free`, if it can take a call.
    fn free_key(&self, id: RunnerId, slot: &Slot<H>) -> Option<(u32, u64, RunnerId)> {
        free_key(self.rules.placement, self.limits.max_concurrency, id, slot)
    }

    fn add_share(&mut self, share: Share) {
        self.live += share.live;
        self.live_min += share.live_min;
        self.in_flight += share.in_flight;
        self.in_flight_live += share.in_flight_live;
        self.pinned += share.pinned;
    }

    fn sub_share(&mut self, share: Share) {
        self.live -= share.live;
        self.live_min -= share.live_min;
        self.in_flight -= share.in_flight;
        self.in_flight_live -= share.in_flight_live;
        self.pinned -= share.pinned;
    }

    /// Changes one runner's slot, keeping `free` and the counts in step. A no-op for a runner
    /// that is gone.
    fn update<R>(&mut self, id: RunnerId, change: impl FnOnce(&mut Slot<H>) -> R) -> Option<R> {
        self.update_listed(id, true, change)
    }

    /// [`update`](Self::update), for a slot whose key is still in `free` if `listed`, or was
    /// taken out of it already.
    fn update_listed<R>(
        &mut self,
        id: RunnerId,
        listed: bool,
        change: impl FnOnce(&mut Slot<H>) -> R,
    ) -> Option<R> {
        let (placement, concurrency) = (self.rules.placement, self.limits.max_concurrency);
        let slot = self.runners.get_mut(&id)?;
        let (before, old_key) = (share(slot), free_key(placement, concurrency, id, slot));
        let out = change(slot);
        let (after, new_key) = (share(slot), free_key(placement, concurrency, id, slot));
        if old_key != new_key || !listed {
            if let Some(key) = old_key.filter(|_| listed) {
                self.free.remove(&key);
            }
            if let Some(key) = new_key {
                self.free.insert(key);
            }
        }
        self.sub_share(before);
        self.add_share(after);
        Some(out)
    }

    /// Takes a slot on the best free runner, if any.
    fn take_best(&mut self) -> Option<H> {
        // Popped rather than looked up and removed: the best is always the first.
        let (_, _, id) = self.free.pop_first()?;
        let single_use = self.rules.single_use;
        self.update_listed(id, false, |slot| {
            slot.in_flight += 1;
            if single_use {
                slot.draining = true;
            }
            slot.handle.clone()
        })
    }

    /// Releases `runner` if it drains and has no call left.
    fn release_if_drained(&mut self, runner: RunnerId) {
        let Some(slot) = self.runners.get_mut(&runner) else {
            return;
        };
        if slot.draining && slot.in_flight == 0 && !slot.dead && !slot.released {
            slot.released = true;
            self.actions.push(Action::Release {
                runner: slot.handle.clone(),
                reason: slot.release_reason,
            });
        }
    }

    /// Hands free slots to waiting callers, oldest first, then cancels boots nobody needs.
    fn dispatch(&mut self) {
        while let Some((_, _, waiter)) = self.waiters.front() {
            if waiter.is_gone() {
                self.waiters.pop_front();
                continue;
            }
            let Some(runner) = self.take_best() else {
                break;
            };
            let (_, _, waiter) = self.waiters.pop_front().expect("looked at above");
            self.actions.push(Action::Grant { waiter, runner });
        }
        self.cancel_unneeded_boots(false);
    }

    /// Cancels the newest boots for demand beyond what the waiting callers still need: their
    /// callers left (`left`), or their calls were served by runners that freed up, so the boots
    /// would only make runners that serve nothing (and, on Fly, bill for it until they idle
    /// down). `min` boots stay.
    ///
    /// When callers leave, at once. After a dispatch, only before the pool has measured a boot
    /// and the queue's pace ([`PACE_SAMPLES`] call ends while callers waited: a first burst),
    /// only while a ready runner has a free slot, and only if the backend does not park (a
    /// runner that comes up for nobody then parks, and a cancelled create is a wasted one):
    /// once it has, boots start only for demand that lasts (see
    /// [`demand_boots_now`](Self::demand_boots_now)), and a boot that started for it is kept,
    /// though the queue empties for a moment between one call and the next. Cancelling those
    /// is what made a steady stream of calls start and cancel a boot for every momentary
    /// queue, and it bounds the boots that serve nobody: after the first measurements, only
    /// callers that leave cancel boots.
    fn cancel_unneeded_boots(&mut self, left: bool) {
        if self.demand_boots.is_empty() || self.closed {
            return;
        }
        let measured = self.boot_time.is_some() && self.serve_samples >= PACE_SAMPLES;
        debug_assert!(self.serve_samples == 0 || self.call_time.is_some());
        if !left && (measured || self.free.is_empty() || self.rules.parks) {
            return;
        }
        let per_runner = self.limits.max_concurrency as usize;
        // Callers who gave up may still be counted: that can only keep a boot, never cancel one
        // that is needed. A pool that pre-warms keeps one boot for the spare.
        let mut wanted = self.waiters.len().div_ceil(per_runner);
        if self.rules.prewarm_at.is_some() {
            wanted = wanted.max(1);
        }
        while self.demand_boots.len() > wanted {
            let (_, runner) = self.demand_boots.pop_last().expect("not empty");
            if let Some(boot) = self.booting.get_mut(&runner) {
                boot.demand = None;
            }
            self.actions.push(Action::CancelBoot(runner));
        }
    }

    /// Forgets a boot that ended, either way.
    fn boot_ended(&mut self, runner: RunnerId) -> Option<Booting> {
        let boot = self.booting.remove(&runner)?;
        if boot.min {
            self.booting_min -= 1;
        }
        if boot.claim {
            self.claims -= 1;
        }
        if let Some(order) = boot.demand {
            self.demand_boots.remove(&order);
        }
        Some(boot)
    }

    /// Boots what `min`, the waiting callers and pre-warming need, within `max`.
    fn plan_boots(&mut self) {
        if self.closed || self.boots_refused {
            return;
        }
        let limits = self.limits;
        let per_runner = limits.max_concurrency as usize;
        let min_missing = if self.min_lapsed {
            0
        } else {
            limits.min.saturating_sub(self.live_min + self.booting_min)
        };
        // Callers who gave up may still be counted until dispatch reaches them; that can only
        // bring a boot forward, never past `max`. A cancelled boot serves nobody.
        let serving_boots = self.booting_min + self.demand_boots.len();
        let absorbed = serving_boots.saturating_mul(per_runner);
        let for_demand = self
            .waiters
            .len()
            .saturating_sub(absorbed)
            .div_ceil(per_runner);
        // Draining runners and cancelled boots count too: the pool never runs more than `max`
        // machines at once.
        let room = limits
            .max
            .saturating_sub(self.runners.len() + self.booting.len());
        let prewarm = match self.rules.prewarm_at {
            // One runner at a time: the next crossing boots the next.
            Some(at) if self.booting.is_empty() => {
                let slots = self.live.saturating_mul(per_runner);
                let used = self.in_flight_live + self.waiters.len();
                usize::from(slots > 0 && used as f64 >= at * slots as f64)
            }
            _ => 0,
        };
        let for_demand = if for_demand > 0 {
            self.demand_boots_now(for_demand)
        } else {
            0
        };
        let total = min_missing.max(for_demand).max(prewarm).min(room);
        let mins = min_missing.min(total);
        let mut claims_left = self.parked.saturating_sub(self.claims);
        for i in 0..total {
            let runner = RunnerId(Uuid::new_v4());
            let min = i < mins;
            let demand = (!min).then(|| {
                let order = self.next_seq;
                self.next_seq += 1;
                self.demand_boots.insert(order, runner);
                order
            });
            let claim = claims_left > 0;
            claims_left = claims_left.saturating_sub(1);
            self.claims += usize::from(claim);
            self.booting.insert(
                runner,
                Booting {
                    min,
                    started: self.now,
                    claim,
                    demand,
                },
            );
            if min {
                self.booting_min += 1;
            }
            self.actions.push(Action::Boot { runner, min });
        }
    }

    /// How many of the `wanted` boots for demand start now. All of them, unless the pool has
    /// seen enough to tell that they would serve nobody:
    ///
    /// - **parked machines first:** boots claim parked machines before they create; while
    ///   machines are parked, no more boots start than there are parked machines, and what
    ///   the claimed runners cannot serve once up is decided then;
    /// - **hysteresis:** while ready runners work off the queue faster than a boot takes (the
    ///   queue's length times the time between call ends, against the boot time, both
    ///   measured), no boot starts; it starts once the oldest caller has waited a boot's time,
    ///   or once no call has ended for [`STALL_INTERVALS`] times the measured pace (at least a
    ///   quarter of a boot's time). Sub-millisecond calls that queue for a moment boot nothing;
    ///   a burst of long calls boots at once on a pool that has not measured a pace, and within
    ///   a quarter of a boot's time on one that measured a faster one.
    fn demand_boots_now(&mut self, wanted: usize) -> usize {
        if self.parked > 0 {
            return wanted.min(self.parked.saturating_sub(self.claims));
        }
        if self.live == 0 {
            // Claims come up soon, and their runner's arrival decides again.
            return if self.claims > 0 { 0 } else { wanted };
        }
        let (Some(boot_time), Some(call_time)) = (self.boot_time, self.call_time) else {
            return wanted;
        };
        // The time between call ends at the pool's size now.
        let slots = self
            .live
            .saturating_mul(self.limits.max_concurrency as usize);
        let interval = call_time / u32::try_from(slots.max(1)).unwrap_or(u32::MAX);
        let Some(&(_, oldest, _)) = self.waiters.front() else {
            return wanted;
        };
        let waited = self.now.saturating_sub(oldest);
        let queued = u32::try_from(self.waiters.len()).unwrap_or(u32::MAX);
        let drains_in = interval.saturating_mul(queued);
        // The pace is stale when no call has ended for several intervals: calls slower than
        // the ones it was measured on (a burst of long calls after short ones).
        let stall = interval.saturating_mul(STALL_INTERVALS).max(boot_time / 4);
        // Counted only while callers wait and runners serve: an idle pool has not stalled,
        // and neither has one whose runner just came up.
        let last_end = self
            .last_end
            .map_or(oldest, |end| end.max(oldest))
            .max(self.last_up);
        let stalled = self.now.saturating_sub(last_end) >= stall;
        if waited >= boot_time || drains_in >= boot_time || stalled {
            return wanted;
        }
        let at = oldest
            .saturating_add(boot_time)
            .min(last_end.saturating_add(stall));
        if self.demand_check_at.is_none_or(|due| due > at) {
            self.demand_check_at = Some(at);
            self.actions.push(Action::WakeAt(at));
        }
        0
    }

    /// Drains runners beyond `max`, and `min` runners beyond `min`, least busy first. A busy
    /// runner finishes its calls before it is released.
    fn trim(&mut self) {
        let excess_min = self.live_min.saturating_sub(self.limits.min);
        let excess = self.live.saturating_sub(self.limits.max);
        if excess_min == 0 && excess == 0 {
            return;
        }
        for (count, only_min) in [(excess_min, true), (excess, false)] {
            let mut candidates: Vec<(u32, u64, RunnerId)> = self
                .runners
                .iter()
                .filter(|(_, s)| !s.draining && (s.min || !only_min))
                .map(|(id, s)| (s.in_flight, s.seq, *id))
                .collect();
            candidates.sort_unstable();
            for (_, _, runner) in candidates.into_iter().take(count) {
                self.update(runner, |slot| {
                    slot.draining = true;
                    slot.release_reason = "resized";
                });
                self.release_if_drained(runner);
            }
        }
    }
}

/// An exponentially weighted average: `sample` weighs [`ESTIMATE_WEIGHT`].
fn estimate(previous: Option<Duration>, sample: Duration) -> Duration {
    match previous {
        None => sample,
        Some(previous) => previous.mul_f64(1.0 - ESTIMATE_WEIGHT) + sample.mul_f64(ESTIMATE_WEIGHT),
    }
}

/// Where a slot ranks among the free ones: Spread prefers the least loaded runner, Pack the most
/// loaded one that still has room. Ties go to the oldest runner (lowest `seq`). `None` when it
/// can take no call.
fn free_key<H>(
    placement: Placement,
    max_concurrency: u32,
    id: RunnerId,
    slot: &Slot<H>,
) -> Option<(u32, u64, RunnerId)> {
    let room = slot.capacity.min(max_concurrency);
    if slot.draining || slot.in_flight >= room {
        return None;
    }
    let rank = match placement {
        Placement::Spread => slot.in_flight,
        Placement::Pack => u32::MAX - slot.in_flight,
    };
    Some((rank, slot.seq, id))
}

/// What a slot adds to the pool's counts.
fn share<H>(slot: &Slot<H>) -> Share {
    let live = !slot.draining;
    Share {
        live: usize::from(live),
        live_min: usize::from(live && slot.min),
        in_flight: slot.in_flight as usize,
        in_flight_live: if live { slot.in_flight as usize } else { 0 },
        pinned: slot.pinned as usize,
    }
}

#[cfg(test)]
impl<W: Waiter, H: Clone> Scheduler<W, H> {
    /// Recomputes every count, the free set and the boot books from scratch, and panics where
    /// the kept ones differ.
    fn check_invariants(&self) {
        let mut total = Share::default();
        let mut free = BTreeSet::new();
        for (id, slot) in &self.runners {
            let s = share(slot);
            total.live += s.live;
            total.live_min += s.live_min;
            total.in_flight += s.in_flight;
            total.in_flight_live += s.in_flight_live;
            total.pinned += s.pinned;
            free.extend(self.free_key(*id, slot));
            assert!(!slot.dead || slot.draining, "a dead runner drains");
        }
        assert_eq!(
            (
                total.live,
                total.live_min,
                total.in_flight,
                total.in_flight_live,
                total.pinned
            ),
            (
                self.live,
                self.live_min,
                self.in_flight,
                self.in_flight_live,
                self.pinned
            ),
            "kept counts"
        );
        assert_eq!(free, self.free, "free set");
        let booting_min = self.booting.values().filter(|b| b.min).count();
        assert_eq!(booting_min, self.booting_min, "min boots");
        for (order, runner) in &self.demand_boots {
            assert_eq!(
                self.booting[runner].demand,
                Some(*order),
                "demand boot books"
            );
        }
        let claims = self.booting.values().filter(|b| b.claim).count();
        assert_eq!(claims, self.claims, "claims");
        let with_demand = self.booting.values().filter(|b| b.demand.is_some()).count();
        assert_eq!(with_demand, self.demand_boots.len(), "demand boots");
        assert!(
            self.waiters
                .iter()
                .zip(self.waiters.iter().skip(1))
                .all(|(a, b)| a.0 < b.0),
            "the queue is in arrival order"
        );
    }
}

#[cfg(test)]
mod tests;
