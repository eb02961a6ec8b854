//! One runner machine, owned by the pool's runner handle.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::api::{MachineInfo, MachinesApi, MAX_WAIT};
use crate::backend::{Exit, Machine, ParkTicket, Parked};
use crate::error::BackendError;

/// How long after a create a 404 means "not visible yet" rather than "gone".
const NOT_FOUND_GRACE: Duration = Duration::from_secs(30);
const NOT_FOUND_POLL: Duration = Duration::from_millis(250);
/// The states in which a machine's process is no longer running.
pub(crate) const ENDED: [&str; 3] = ["stopped", "failed", "destroyed"];

/// One machine as the parked set knows it.
#[derive(Debug, Clone)]
pub(crate) struct MachineRef {
    pub id: String,
    pub version: String,
    pub region: String,
}

/// Where a machine goes when its runner idles out: the backend's parked set (`park.rs`),
/// seen from here only through this, so that a machine needs nothing of how the set works.
pub(crate) trait ParkInto: Send + Sync + 'static {
    /// Parks `machine`, whose runner was closed to be parked.
    fn park(
        self: Arc<Self>,
        machine: MachineRef,
        ticket: ParkTicket,
        grace: Duration,
    ) -> BoxFuture<'static, Result<Parked, BackendError>>;
}

pub(crate) struct FlyMachine {
    api: Arc<MachinesApi>,
    id: String,
    version: String,
    region: String,
    created: Instant,
    /// Where the machine goes when its runner idles out, if its backend parks machines.
    parked_set: Option<Arc<dyn ParkInto>>,
    /// Until `terminate` or `park` takes over, dropping this destroys the machine.
    armed: bool,
}

impl FlyMachine {
    pub(crate) fn new(
        api: Arc<MachinesApi>,
        info: MachineInfo,
        parked_set: Option<Arc<dyn ParkInto>>,
    ) -> Self {
        let machine = MachineRef {
            id: info.id,
            version: info.instance_id,
            region: info.region,
        };
        Self::claimed(api, machine, parked_set)
    }

    /// A parked machine, started again.
    pub(crate) fn claimed(
        api: Arc<MachinesApi>,
        machine: MachineRef,
        parked_set: Option<Arc<dyn ParkInto>>,
    ) -> Self {
        Self {
            api,
            id: machine.id,
            version: machine.version,
            region: machine.region,
            created: Instant::now(),
            parked_set,
            armed: true,
        }
    }
}

impl Machine for FlyMachine {
    fn describe(&self) -> String {
        format!("fly machine {} in {}", self.id, self.region)
    }

    fn exited(&mut self) -> BoxFuture<'_, Exit> {
        Box::pin(watch_exit(&self.api, &self.id, &self.version, self.created))
    }

    fn terminate(
        mut self: Box<Self>,
        grace: Duration,
    ) -> BoxFuture<'static, Result<(), BackendError>> {
        self.armed = false;
        let (api, id, version) = (Arc::clone(&self.api), self.id.clone(), self.version.clone());
        Box::pin(async move {
            if !grace.is_zero() {
                // The runner was told to exit; give it the grace to stop by itself.
                let _ = tokio::time::timeout(grace, api.wait(&id, &version, &ENDED, grace)).await;
            }
            api.retrying(|| api.destroy(&id)).await?;
            tracing::debug!(machine = %id, "destroyed");
            Ok(())
        })
    }

    fn park(
        mut self: Box<Self>,
        ticket: ParkTicket,
        grace: Duration,
    ) -> BoxFuture<'static, Result<Parked, BackendError>> {
        let Some(set) = self.parked_set.clone() else {
            let terminated = self.terminate(grace);
            return Box::pin(async move { terminated.await.map(|()| Parked::Destroyed) });
        };
        self.armed = false;
        let machine = MachineRef {
            id: self.id.clone(),
            version: self.version.clone(),
            region: self.region.clone(),
        };
        Box::pin(set.park(machine, ticket, grace))
    }
}

impl Drop for FlyMachine {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(machine = %self.id, "no runtime to destroy a dropped machine");
            return;
        };
        let (api, id) = (Arc::clone(&self.api), self.id.clone());
        runtime.spawn(async move {
            if let Err(error) = api.retrying(|| api.destroy(&id)).await {
                tracing::error!(machine = %id, %error, "cannot destroy a dropped machine");
            }
        });
    }
}

/// Long-polls `/wait` until the machine's process has ended, then reads why from its events.
async fn watch_exit(api: &MachinesApi, id: &str, version: &str, created: Instant) -> Exit {
    let mut delays = api.retry.delays();
    let mut waits = 0_u32;
    loop {
        waits += 1;
        match api.wait(id, version, &ENDED, MAX_WAIT).await {
            Ok(true) => {
                tracing::debug!(machine = id, waits, "the machine stopped");
                break;
            }
            Ok(false) => {}
            Err(error) if error.is_not_found() && created.elapsed() < NOT_FOUND_GRACE => {
                tokio::time::sleep(NOT_FOUND_POLL).await;
            }
            Err(error) if error.is_not_found() => {
                return Exit {
                    code: None,
                    description: format!("machine {id} is gone"),
                };
            }
            Err(error) => {
                let delay = delays.next().unwrap_or(api.retry.max_delay);
                tracing::warn!(machine = id, %error, ?delay, "waiting on a machine failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
    match api.retrying(|| api.get(id)).await {
        Ok(info) => {
            let (code, description) = info.exit();
            Exit { code, description }
        }
        Err(error) => Exit {
            code: None,
            description: format!("machine {id} stopped; its exit is unknown: {error}"),
        },
    }
}
