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

use super::api::MachinesApi;
use super::machine::{FlyMachine, MachineRef, ParkInto, ENDED};
use crate::backend::park::{ClaimRefused, ParkPlatform, ParkedMachines};
use crate::backend::{Machine, Park, ParkTicket, Parked};
use crate::error::BackendError;
use crate::wire::ClaimSecret;
use crate::wire::FLY_CLAIM_KEY;

/// How long a claim's lease lasts: it covers the `start`, after which it is released.
const CLAIM_LEASE_TTL: Duration = Duration::from_secs(30);

/// How long a suspend may take before the machine is stopped instead. Fly documents that a
/// machine can sit in `suspending` for many seconds.
const SUSPEND_WAIT: Duration = Duration::from_secs(30);

/// How long past its stop timeout a machine may take to be reported stopped.
const STOP_SLACK: Duration = Duration::from_secs(10);

/// The Fly backend's parked set: the generic bookkeeping over Fly's Machines API.
pub(crate) type FlyParkedSet = ParkedMachines<FlyMachines>;

/// What parking asks of Fly: suspend or stop, lease and start, destroy.
pub(crate) struct FlyMachines {
    pub(crate) api: Arc<MachinesApi>,
}

impl FlyMachines {
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
    async fn stopped(&self, machine: &MachineRef, grace: Duration, exits_by_itself: bool) -> bool {
        let api = &self.api;
        let (id, version) = (machine.id.as_str(), machine.version.as_str());
        let stopped_by_itself = exits_by_itself
            && tokio::time::timeout(grace, api.wait(id, version, &ENDED, grace))
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
}

impl ParkPlatform for FlyMachines {
    type Machine = MachineRef;

    fn id(machine: &MachineRef) -> &str {
        &machine.id
    }

    fn describe(machine: &MachineRef, mode: Park) -> String {
        format!(
            "fly machine {} in {} ({})",
            machine.id,
            machine.region,
            match mode {
                Park::Suspend => "suspended",
                Park::Stop => "stopped",
            }
        )
    }

    fn destroy<'a>(&'a self, machine: &'a MachineRef) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let api = &self.api;
            api.retrying(|| api.destroy(&machine.id)).await?;
            Ok(())
        })
    }

    /// A refused suspend falls back to a stop, and a failed stop to a destroy.
    fn park<'a>(
        &'a self,
        machine: &'a MachineRef,
        mode: Park,
        grace: Duration,
    ) -> BoxFuture<'a, Option<Park>> {
        Box::pin(async move {
            let id = &machine.id;
            let mut mode = mode;
            // A runner closed to be stopped exits within `grace` by itself; one closed to be
            // suspended stays up, waiting to be frozen, so a refused suspend stops it at once.
            let mut exits_by_itself = true;
            if mode == Park::Suspend {
                if let Err(error) = self.suspend(machine).await {
                    tracing::warn!(machine = id, %error, "suspend failed: stopping the machine instead");
                    mode = Park::Stop;
                    exits_by_itself = false;
                }
            }
            if mode == Park::Stop && !self.stopped(machine, grace, exits_by_itself).await {
                tracing::warn!(machine = id, "the machine did not stop: destroying it");
                return None;
            }
            Some(mode)
        })
    }

    /// A lease, the claim's secret in the machine's metadata (its runner reads it back through
    /// the machine-local API), then `start`.
    fn claim(
        &self,
        machine: MachineRef,
        secret: ClaimSecret,
        set: Arc<FlyParkedSet>,
    ) -> BoxFuture<'static, Result<Box<dyn Machine>, ClaimRefused>> {
        let api = Arc::clone(&self.api);
        Box::pin(async move {
            let id = machine.id.clone();
            // The lease keeps anyone else from starting, stopping or claiming it meanwhile.
            let nonce = match api.lease(&id, CLAIM_LEASE_TTL).await {
                Ok(nonce) => nonce,
                Err(error) if error.is_not_found() => return Err(ClaimRefused::Gone(error.into())),
                Err(error) if error.api().is_some_and(|api| api.status == 409) => {
                    return Err(ClaimRefused::Contended(error.into()))
                }
                Err(error) => return Err(ClaimRefused::Failed(error.into())),
            };
            // Written before the start, so the runner finds it as soon as it runs again.
            let handed = api
                .set_metadata(&id, FLY_CLAIM_KEY, secret.expose(), &nonce)
                .await;
            let started = match handed {
                Ok(()) => api.start(&id, &nonce).await,
                Err(error) => Err(error),
            };
            if let Err(error) = api.release_lease(&id, &nonce).await {
                tracing::debug!(machine = %id, %error, "could not release the claim's lease; it expires");
            }
            // A failed start leaves a machine in an unknown state: it is destroyed.
            started.map_err(|error| ClaimRefused::Failed(error.into()))?;
            let parks_into: Arc<dyn ParkInto> = set;
            Ok(Box::new(FlyMachine::claimed(api, machine, Some(parks_into))) as Box<dyn Machine>)
        })
    }
}

impl ParkInto for FlyParkedSet {
    fn park(
        self: Arc<Self>,
        machine: MachineRef,
        ticket: ParkTicket,
        grace: Duration,
    ) -> BoxFuture<'static, Result<Parked, BackendError>> {
        Box::pin(ParkedMachines::park(self, machine, ticket, grace))
    }
}
