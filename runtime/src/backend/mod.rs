//! Backends boot and terminate the machines that runners run on.

#[cfg(feature = "fly")]
#[cfg_attr(docsrs, doc(cfg(feature = "fly")))]
pub mod fly;
pub(crate) mod gpu;
#[cfg(feature = "kubernetes")]
#[cfg_attr(docsrs, doc(cfg(feature = "kubernetes")))]
pub mod kubernetes;
pub(crate) mod local;
pub(crate) mod output_relay;
pub(crate) mod park;
#[cfg(any(feature = "fly", feature = "kubernetes"))]
pub(crate) mod runner_spec;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::future::BoxFuture;

pub use gpu::VISIBLE_DEVICES_ENV;
pub use local::{LocalBackend, LocalBackendBuilder};
pub use park::{
    BootKind, Claimed, Park, ParkTicket, Parked, ParkedMachine, ParkedSet, Parking, PoolKey,
};

use crate::error::{BackendError, BootError, RunnerId};

/// What a backend needs to start one runner. `Debug` shows the variable names only.
#[non_exhaustive]
pub struct BootRequest {
    /// The runner's id.
    pub runner_id: RunnerId,
    /// Environment the runner must receive, on top of the backend's own: at least
    /// [`PARENT_ENV`](crate::token::PARENT_ENV) with the boot token. It holds a private key:
    /// never log it.
    pub env: Vec<(String, String)>,
    /// How long the runner lets its calls finish after it is told to stop (SIGTERM, a lost
    /// parent): the pool's [`drain_grace`](crate::PoolBuilder::drain_grace). A backend whose
    /// platform kills a stopping machine after a grace period of its own (a pod's
    /// `terminationGracePeriodSeconds`) gives it at least this.
    pub drain_grace: std::time::Duration,
    /// How long the pool waits for this runner's hello, counted from the call to
    /// [`Backend::boot`]: the pool's [`boot_timeout`](crate::PoolBuilder::boot_timeout). A
    /// backend that waits for capacity (a namespace's quota) gives up within it, so that the
    /// boot fails with its reason rather than a bare timeout.
    pub boot_timeout: std::time::Duration,
}

impl BootRequest {
    /// A request to boot runner `runner_id` with `env`, and the default drain grace: for
    /// driving a backend directly, as its own tests do. A pool makes these itself.
    pub fn new(runner_id: RunnerId, env: Vec<(String, String)>) -> Self {
        Self {
            runner_id,
            env,
            drain_grace: crate::settings::defaults::DRAIN_GRACE,
            boot_timeout: crate::settings::defaults::BOOT_TIMEOUT,
        }
    }
}

impl std::fmt::Debug for BootRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootRequest")
            .field("runner_id", &self.runner_id)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("drain_grace", &self.drain_grace)
            .field("boot_timeout", &self.boot_timeout)
            .finish()
    }
}

/// This process's incarnation: a random id made once per process, which a backend records
/// on every machine it boots, so that a parent restarted in place (a container restart keeps
/// its pod, a Fly machine its id) knows the machines of its earlier runs from its own.
#[cfg_attr(not(any(feature = "fly", feature = "kubernetes")), allow(dead_code))]
pub(crate) fn process_incarnation() -> String {
    static INCARNATION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INCARNATION
        .get_or_init(|| uuid::Uuid::new_v4().simple().to_string())
        .clone()
}

/// How long a pool's start waits for a backend's sweep of orphan machines.
#[cfg_attr(not(any(feature = "fly", feature = "kubernetes")), allow(dead_code))]
const SWEEP_AT_START: Duration = Duration::from_secs(15);

/// Runs a backend's sweep of what earlier parents left behind, as [`Backend::start`] does:
/// bounded by [`SWEEP_AT_START`] and logged, never failing the pool's start, since housekeeping
/// must not hold a pool hostage to a slow or failing API. `what` names the machines
/// (`machines`, `runner pods`) and `again` how to sweep later.
#[cfg_attr(not(any(feature = "fly", feature = "kubernetes")), allow(dead_code))]
pub(crate) async fn sweep_at_start<E: std::fmt::Display>(
    what: &str,
    again: &str,
    sweep: impl std::future::Future<Output = Result<Vec<String>, E>>,
) {
    match tokio::time::timeout(SWEEP_AT_START, sweep).await {
        Ok(Ok(swept)) if swept.is_empty() => {}
        Ok(Ok(swept)) => tracing::info!(count = swept.len(), "removed orphan {what}"),
        Ok(Err(error)) => tracing::warn!(%error, "could not remove orphan {what}"),
        Err(_) => tracing::warn!(
            after = ?SWEEP_AT_START,
            "removing orphan {what} took too long; call {again} later"
        ),
    }
}

/// How a machine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, where there is one.
    pub code: Option<i32>,
    /// A description: the status, a signal, an OOM kill.
    pub description: String,
}

impl Exit {
    /// How a process ended, in the one wording every local backend uses: `exit status: N`, or
    /// `killed by signal N`.
    ///
    /// ```
    /// use firebrand::backend::Exit;
    ///
    /// assert_eq!(Exit::process(Some(1), None).description, "exit status: 1");
    /// assert_eq!(Exit::process(None, Some(9)).description, "killed by signal 9");
    /// ```
    #[must_use]
    pub fn process(code: Option<i32>, signal: Option<i32>) -> Self {
        match (code, signal) {
            (_, Some(signal)) => Exit {
                code: None,
                description: format!("killed by signal {signal}"),
            },
            (code, None) => Exit {
                code,
                description: match code {
                    Some(code) => format!("exit status: {code}"),
                    None => "exited".into(),
                },
            },
        }
    }
}

/// Boots runner machines for a [`Pool`](crate::Pool).
///
/// Implementations must leave nothing running that the pool has given up on: a machine whose
/// [`Machine::terminate`] returned, a machine dropped without being terminated, and a
/// [`boot`](Backend::boot) future dropped before it finished.
pub trait Backend: Send + Sync + 'static {
    /// Where the pool's QUIC endpoint binds.
    fn bind_addr(&self) -> SocketAddr;

    /// The addresses a runner dials, given the endpoint's bound address, tried in order.
    fn parent_addrs(&self, bound: SocketAddr) -> Vec<String>;

    /// Called once when a pool starts, before its first boot: housekeeping such as reaping the
    /// machines an earlier run of the parent left behind. It cannot fail the pool; problems are
    /// logged. The default does nothing.
    fn start(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// The most runners this backend can run at once, when it has a limit (GPUs to share out,
    /// say). A pool caps its `max` at this. The default: no limit.
    fn max_runners(&self) -> Option<usize> {
        None
    }

    /// Called at the end of [`Pool::shutdown`](crate::Pool::shutdown), once every machine of the
    /// pool has been terminated: waits for what the backend itself runs for those machines (a
    /// fork-server template) to end, so that nothing outlives the shutdown. The default does
    /// nothing.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Starts a machine running a runner with `request.env`. It may return as soon as the
    /// machine is made: the pool admits the runner when its hello arrives, and meanwhile
    /// watches [`Machine::boot_failed`] for a reason it never will.
    fn boot(&self, request: BootRequest) -> BoxFuture<'_, Result<Box<dyn Machine>, BackendError>>;

    /// Whether this backend brings each runner's stdout and stderr to the parent itself (the
    /// local backend relays its pipes). When not, the runner sends its output lines over its
    /// connection, and the parent logs them. The default: it does not.
    fn brings_output(&self) -> bool {
        false
    }

    /// The machines this backend has parked, if it parks the machines of runners that idle
    /// out (see [`Machine::park`]): the one object through which a pool claims, counts and
    /// releases them. The default: it does not park, and they are terminated.
    fn parked_set(&self) -> Option<std::sync::Arc<dyn ParkedSet>> {
        None
    }
}

/// One booted machine, owned by the pool's runner handle.
pub trait Machine: Send + 'static {
    /// A description for logs: a process id, a machine id.
    fn describe(&self) -> String;

    /// Resolves when the machine stops by itself. Cancel-safe.
    fn exited(&mut self) -> BoxFuture<'_, Exit>;

    /// Resolves when the machine will never bring its runner up, while the pool waits for the
    /// runner's hello: with the backend's reason where it knows one (a pod no node can take,
    /// an image that cannot be pulled), else with how the machine exited. Never resolves while
    /// the runner may still dial; the runner's hello wins over it whatever the backend's view
    /// of the machine is. Cancel-safe. The default: how [`exited`](Machine::exited) says the
    /// machine ended.
    fn boot_failed(&mut self) -> BoxFuture<'_, BootError> {
        Box::pin(async move { BootError::Exited(self.exited().await.description) })
    }

    /// Stops the machine, waiting up to `grace` for it to stop by itself first (its runner was
    /// already told to exit), then forcing it.
    fn terminate(self: Box<Self>, grace: Duration) -> BoxFuture<'static, Result<(), BackendError>>;

    /// Parks the machine instead of terminating it: its runner idled out, and the pool closed
    /// its connection as the backend's [`Parking`] mode asks (to be suspended, the runner stays
    /// up; to be stopped, it exits within `grace`). The backend keeps `ticket` with the machine
    /// and hands it back from [`ParkedSet::take`]. The default terminates the machine.
    ///
    /// # Errors
    /// Why the machine could be neither parked nor destroyed.
    fn park(
        self: Box<Self>,
        ticket: ParkTicket,
        grace: Duration,
    ) -> BoxFuture<'static, Result<Parked, BackendError>> {
        let _ = ticket;
        let terminated = self.terminate(grace);
        Box::pin(async move { terminated.await.map(|()| Parked::Destroyed) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_request_debug_hides_values() {
        let request = BootRequest {
            runner_id: RunnerId(uuid::Uuid::nil()),
            env: vec![("FIREBRAND_PARENT".into(), "fb1.SECRET-KEY-MATERIAL".into())],
            drain_grace: Duration::from_secs(30),
            boot_timeout: Duration::from_secs(30),
        };
        let shown = format!("{request:?}");
        assert!(shown.contains("FIREBRAND_PARENT"));
        assert!(!shown.contains("SECRET"), "{shown}");
    }
}
