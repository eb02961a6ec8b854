//! Parked machines: idle runners' machines kept suspended or stopped, and claimed by later
//! boots with a lease and a `start` instead of a create.
//!
//! The parked set lives in the parent's memory, and only the pool that parked a machine can
//! claim it: its runner's credential chains to that pool's certificate authority, which lives
//! in the parent's memory too. So a parked machine outlives its parent only as an orphan, which
//! the next parent's start-up sweep destroys (see [`FlyBackend::reap_orphans`]).
//!
//! [`FlyBackend::reap_orphans`]: super::FlyBackend::reap_orphans

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::api::MachinesApi;
use super::machine::{FlyMachine, MachineRef, ParkInto, ENDED};
use crate::backend::{
    BootKind, Claimed, Park, ParkTicket, Parked, ParkedMachine, ParkedSet, Parking, PoolKey,
};
use crate::error::BackendError;

/// How long a claim's lease lasts: it covers the `start`, after which it is released.
const CLAIM_LEASE_TTL: Duration = Duration::from_secs(30);

/// How long a suspend may take before the machine is stopped instead. Fly documents that a
/// machine can sit in `suspending` for many seconds.
const SUSPEND_WAIT: Duration = Duration::from_secs(30);

/// How long past its stop timeout a machine may take to be reported stopped.
const STOP_SLACK: Duration = Duration::from_secs(10);

/// How long a parked machine whose lease someone else held is passed over by claims: about a
/// lease's usual life.
const CONTENDED_FOR: Duration = Duration::from_secs(30);

/// A parked machine, waiting in the set.
struct Entry {
    machine: MachineRef,
    ticket: ParkTicket,
    mode: Park,
    /// Destroys the machine at the park time-to-live; aborted when it is taken.
    expiry: tokio::task::AbortHandle,
    /// Claims pass it over until then: someone else held its lease.
    contended_until: Option<Instant>,
}

/// The machines one backend has parked, for all the pools that use it.
pub(crate) struct FlyParkedSet {
    api: Arc<MachinesApi>,
    pub(crate) mode: Park,
    max: usize,
    pub(crate) ttl: Duration,
    entries: Mutex<Vec<Entry>>,
}

impl FlyParkedSet {
    pub(crate) fn new(api: Arc<MachinesApi>, mode: Park, max: usize, ttl: Duration) -> Self {
        Self {
            api,
            mode,
            max,
            ttl,
            entries: Mutex::new(Vec::new()),
        }
    }

    /// Destroys every machine `pool` parked.
    pub(crate) async fn release(&self, pool: PoolKey) {
        let released: Vec<Entry> = {
            let mut entries = self.entries.lock();
            let (released, kept) = entries.drain(..).partition(|e| e.ticket.pool() == pool);
            *entries = kept;
            released
        };
        let api = &self.api;
        let destroys = released.iter().map(|entry| async move {
            entry.expiry.abort();
            let id = entry.machine.id.as_str();
            if let Err(error) = api.retrying(|| api.destroy(id)).await {
                tracing::error!(machine = id, %error, "cannot destroy a parked machine");
            }
        });
        futures_util::future::join_all(destroys).await;
    }

    /// How many machines `pool` has parked.
    pub(crate) fn count(&self, pool: PoolKey) -> usize {
        self.entries
            .lock()
            .iter()
            .filter(|e| e.ticket.pool() == pool)
            .count()
    }

    fn is_full(&self) -> bool {
        self.entries.lock().len() >= self.max
    }

    /// The machine `pool` parked last, whose snapshot is the freshest, to claim.
    pub(crate) fn take(self: &Arc<Self>, pool: PoolKey) -> Option<Box<dyn ParkedMachine>> {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        let index = entries.iter().rposition(|e| {
            e.ticket.pool() == pool && e.contended_until.is_none_or(|until| until <= now)
        })?;
        let entry = entries.remove(index);
        entry.expiry.abort();
        Some(Box::new(ParkedFly {
            set: Arc::clone(self),
            machine: entry.machine,
            ticket: entry.ticket,
            mode: entry.mode,
            armed: true,
        }))
    }

    /// Parks `machine`, whose runner was closed as `self.mode` asks: suspends it, or waits for
    /// it to stop. A refused suspend falls back to a stop, and a failed stop to a destroy.
    pub(crate) async fn park(
        self: Arc<Self>,
        machine: MachineRef,
        ticket: ParkTicket,
        grace: Duration,
    ) -> Result<Parked, BackendError> {
        let api = &self.api;
        let id = &machine.id.clone();
        if self.is_full() {
            tracing::info!(machine = id, max = self.max, "parked set full: destroying");
            api.retrying(|| api.destroy(id)).await?;
            return Ok(Parked::Destroyed);
        }
        let mut mode = self.mode;
        if mode == Park::Suspend {
            match self.suspend(&machine).await {
                Ok(()) => {}
                Err(error) => {
                    tracing::warn!(machine = id, %error, "suspend failed: stopping the machine instead");
                    mode = Park::Stop;
                }
            }
        }
        if mode == Park::Stop && !self.stopped(&machine, grace).await {
            tracing::warn!(machine = id, "the machine did not stop: destroying it");
            api.retrying(|| api.destroy(id)).await?;
            return Ok(Parked::Destroyed);
        }
        let expiry = tokio::spawn(expire(Arc::downgrade(&self), machine.id.clone(), self.ttl));
        let full = {
            let mut entries = self.entries.lock();
            let full = entries.len() >= self.max;
            if !full {
                entries.push(Entry {
                    machine,
                    ticket,
                    mode,
                    expiry: expiry.abort_handle(),
                    contended_until: None,
                });
            }
            full
        };
        if full {
            expiry.abort();
            api.retrying(|| api.destroy(id)).await?;
            return Ok(Parked::Destroyed);
        }
        Ok(Parked::As(mode))
    }

    async fn suspend(&self, machine: &MachineRef) -> Result<(), super::FlyError> {
        let api = &self.api;
        api.retrying(|| api.suspend(&machine.id)).await?;
        let suspended = api
            .wait(&machine.id, &machine.version, &["suspended"], SUSPEND_WAIT)
            .await?;
        if suspended {
            Ok(())
        } else {
            Err(super::FlyError::Config(format!(
                "still not suspended after {SUSPEND_WAIT:?}"
            )))
        }
    }

    /// Whether the machine stopped: its runner exits by itself when parked to be stopped, and
    /// is stopped (SIGTERM) when it does not within `grace`.
    async fn stopped(&self, machine: &MachineRef, grace: Duration) -> bool {
        let api = &self.api;
        let (id, version) = (machine.id.as_str(), machine.version.as_str());
        let stopped_by_itself = tokio::time::timeout(grace, api.wait(id, version, &ENDED, grace))
            .await
            .is_ok_and(|waited| waited.unwrap_or(false));
        if stopped_by_itself {
            return self.is_stopped(id).await;
        }
        if let Err(error) = api.retrying(|| api.stop(id, grace)).await {
            tracing::warn!(machine = id, %error, "stop failed");
            return false;
        }
        let limit = grace + STOP_SLACK;
        let waited = tokio::time::timeout(limit, api.wait(id, version, &ENDED, limit)).await;
        waited.is_ok_and(|w| w.unwrap_or(false)) && self.is_stopped(id).await
    }

    /// Whether the machine is stopped, rather than failed or gone.
    async fn is_stopped(&self, id: &str) -> bool {
        let api = &self.api;
        api.retrying(|| api.get(id))
            .await
            .is_ok_and(|info| info.state == "stopped")
    }

    /// Puts back a machine whose claim found its lease held by someone else, passed over by
    /// claims for a while.
    fn put_back_contended(self: &Arc<Self>, parked: &mut ParkedFly) {
        let expiry = tokio::spawn(expire(
            Arc::downgrade(self),
            parked.machine.id.clone(),
            self.ttl,
        ));
        parked.armed = false;
        self.entries.lock().insert(
            0,
            Entry {
                machine: parked.machine.clone(),
                ticket: parked.ticket.clone(),
                mode: parked.mode,
                expiry: expiry.abort_handle(),
                contended_until: Some(Instant::now() + CONTENDED_FOR),
            },
        );
    }
}

impl ParkedSet for FlyParkedSet {
    fn parking(&self) -> Parking {
        Parking::new(self.mode, self.ttl)
    }

    fn take(self: Arc<Self>, pool: PoolKey) -> Option<Box<dyn ParkedMachine>> {
        FlyParkedSet::take(&self, pool)
    }

    fn release(&self, pool: PoolKey) -> BoxFuture<'_, ()> {
        Box::pin(FlyParkedSet::release(self, pool))
    }

    fn count(&self, pool: PoolKey) -> usize {
        FlyParkedSet::count(self, pool)
    }
}

impl ParkInto for FlyParkedSet {
    fn park(
        self: Arc<Self>,
        machine: MachineRef,
        ticket: ParkTicket,
        grace: Duration,
    ) -> BoxFuture<'static, Result<Parked, BackendError>> {
        Box::pin(FlyParkedSet::park(self, machine, ticket, grace))
    }
}

/// Destroys machine `id` once it has been parked for `ttl`, unless a claim took it first.
async fn expire(set: std::sync::Weak<FlyParkedSet>, id: String, ttl: Duration) {
    tokio::time::sleep(ttl).await;
    let Some(set) = set.upgrade() else {
        return;
    };
    let taken = {
        let mut entries = set.entries.lock();
        let index = entries.iter().position(|e| e.machine.id == id);
        index.map(|i| entries.remove(i))
    };
    if taken.is_some() {
        tracing::info!(machine = %id, after = ?ttl, "parked too long: destroying");
        let api = &set.api;
        if let Err(error) = api.retrying(|| api.destroy(&id)).await {
            tracing::error!(machine = %id, %error, "cannot destroy an expired parked machine");
        }
    }
}

/// A parked machine a boot took to claim. Dropped unclaimed, it is destroyed.
struct ParkedFly {
    set: Arc<FlyParkedSet>,
    machine: MachineRef,
    ticket: ParkTicket,
    mode: Park,
    armed: bool,
}

impl ParkedMachine for ParkedFly {
    fn ticket(&self) -> &ParkTicket {
        &self.ticket
    }

    fn describe(&self) -> String {
        format!(
            "fly machine {} in {} ({})",
            self.machine.id,
            self.machine.region,
            match self.mode {
                Park::Suspend => "suspended",
                Park::Stop => "stopped",
            }
        )
    }

    fn claim(mut self: Box<Self>) -> BoxFuture<'static, Result<Claimed, BackendError>> {
        Box::pin(async move {
            let api = Arc::clone(&self.set.api);
            let id = self.machine.id.clone();
            // The lease keeps anyone else from starting, stopping or claiming it meanwhile.
            let nonce = match api.lease(&id, CLAIM_LEASE_TTL).await {
                Ok(nonce) => nonce,
                Err(error) if error.is_not_found() => {
                    // Gone behind the pool's back: nothing to destroy.
                    self.armed = false;
                    return Err(error.into());
                }
                Err(error) if error.api().is_some_and(|api| api.status == 409) => {
                    tracing::info!(machine = %id, "someone else holds its lease: passing it over");
                    let set = Arc::clone(&self.set);
                    set.put_back_contended(&mut self);
                    return Err(error.into());
                }
                // Dropping `self` destroys it.
                Err(error) => return Err(error.into()),
            };
            let started = api.start(&id, &nonce).await;
            if let Err(error) = api.release_lease(&id, &nonce).await {
                tracing::debug!(machine = %id, %error, "could not release the claim's lease; it expires");
            }
            // A failed start leaves a machine in an unknown state: dropping `self` destroys it.
            started?;
            self.armed = false;
            let kind = match self.mode {
                Park::Suspend => BootKind::Resume,
                Park::Stop => BootKind::Start,
            };
            let machine =
                FlyMachine::claimed(api, self.machine.clone(), Some(Arc::clone(&self.set) as _));
            Ok(Claimed {
                machine: Box::new(machine),
                kind,
            })
        })
    }
}

impl Drop for ParkedFly {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(machine = %self.machine.id, "no runtime to destroy a dropped parked machine");
            return;
        };
        let (api, id) = (Arc::clone(&self.set.api), self.machine.id.clone());
        runtime.spawn(async move {
            if let Err(error) = api.retrying(|| api.destroy(&id)).await {
                tracing::error!(machine = %id, %error, "cannot destroy a dropped parked machine");
            }
        });
    }
}
