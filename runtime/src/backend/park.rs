//! Parking: a backend may keep the machine of a runner that idled out, stopped or suspended,
//! and boot a later runner by starting that machine again instead of making a new one.
//!
//! The pool decides *when* a runner parks (it idled out, nothing else) and admits the runner
//! again only for a claim it made; the backend decides *whether* it keeps the machine and
//! *how*, and keeps the parked set ([`ParkedSet`]). A backend that does not park has none, and
//! each idle runner's machine is terminated as before.

use std::time::Duration;

use futures_util::future::BoxFuture;
use rustls::pki_types::CertificateDer;

use super::Machine;
use crate::error::{BackendError, RunnerId};

/// A backend's parked machines, the one object through which a pool finds, counts and releases
/// them: see [`Backend::parked_set`](super::Backend::parked_set). A backend that parks keeps
/// one for all the pools that use it, each pool's machines apart by its [`PoolKey`].
pub trait ParkedSet: Send + Sync + 'static {
    /// How idle runners' machines park here, and for how long at most.
    fn parking(&self) -> Parking;

    /// A machine that `pool` parked, for a boot to claim before it makes a new one; `None`
    /// when none is left.
    fn take(self: std::sync::Arc<Self>, pool: PoolKey) -> Option<Box<dyn ParkedMachine>>;

    /// Destroys every machine `pool` parked, whatever state its claims left it in: the pool
    /// is shutting down, and no other pool can admit their runners.
    fn release(&self, pool: PoolKey) -> BoxFuture<'_, ()>;

    /// How many machines `pool` has parked now, for [`PoolStats`](crate::PoolStats).
    fn count(&self, pool: PoolKey) -> usize;
}

/// How a backend parks the machine of a runner that idled out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Park {
    /// The machine's memory is snapshotted and its process frozen; a claim resumes it where it
    /// stopped, and the runner dials its parent again. The fastest claim.
    Suspend,
    /// The runner's process exits and the machine stops; a claim starts it again from its
    /// config, and the runner dials back as a new boot does.
    Stop,
}

impl Park {
    /// The name used in logs and metrics: `suspend` or `stop`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Park::Suspend => "suspend",
            Park::Stop => "stop",
        }
    }
}

/// How a backend parks machines, and for how long: see [`ParkedSet::parking`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Parking {
    /// How idle runners park.
    pub mode: Park,
    /// The longest a machine stays parked before it is destroyed. The pool keeps each runner's
    /// credential valid this much longer than its boot timeout.
    pub ttl: Duration,
}

impl Parking {
    /// Parking in `mode`, for at most `ttl`.
    #[must_use]
    pub fn new(mode: Park, ttl: Duration) -> Self {
        Self { mode, ttl }
    }
}

/// Which pool parked a machine: only that pool can admit its runner again, since the runner's
/// credential chains to that pool's certificate authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKey(pub(crate) u128);

/// What the pool needs to admit a parked runner again, kept by the backend with the machine
/// it parked and handed back with it by [`ParkedSet::take`].
/// It holds no secret: a certificate is public.
#[derive(Clone)]
pub struct ParkTicket {
    pub(crate) pool: PoolKey,
    /// The id the runner dials back with: the one in its certificate.
    pub(crate) runner: RunnerId,
    /// The certificate the runner presents, which must match.
    pub(crate) cert: CertificateDer<'static>,
    /// The concurrency the runner was booted with.
    pub(crate) capacity: u32,
}

impl ParkTicket {
    /// The pool that parked the machine.
    #[must_use]
    pub fn pool(&self) -> PoolKey {
        self.pool
    }

    /// The runner that ran on the machine, and runs there again once it is claimed.
    #[must_use]
    pub fn runner(&self) -> RunnerId {
        self.runner
    }
}

impl std::fmt::Debug for ParkTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkTicket")
            .field("runner", &self.runner)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// How a boot got its machine: the `kind` of [`PoolEvent::RunnerUp`](crate::PoolEvent) and the
/// `outcome` of the `firebrand_boot_seconds` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BootKind {
    /// A new machine.
    Create,
    /// A stopped machine, started again: its runner process started afresh.
    Start,
    /// A suspended machine, resumed: its runner process went on where it stopped.
    Resume,
}

impl BootKind {
    /// The metric label: `create`, `start` or `resume`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            BootKind::Create => "create",
            BootKind::Start => "start",
            BootKind::Resume => "resume",
        }
    }
}

/// How a machine ended up when the pool asked to park it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Parked {
    /// Parked, in this mode (a refused suspend falls back to a stop).
    As(Park),
    /// Destroyed instead: the parked set was full, or parking failed.
    Destroyed,
}

/// A parked machine that a boot took from its backend to claim. Dropped unclaimed, it is
/// destroyed.
pub trait ParkedMachine: Send + 'static {
    /// What the pool gave the backend when it parked this machine.
    fn ticket(&self) -> &ParkTicket;

    /// A description for logs: a machine id.
    fn describe(&self) -> String;

    /// Wakes the machine: takes it for this parent (a lease) and starts or resumes it. The
    /// pool has already opened the claim its runner is admitted under.
    ///
    /// # Errors
    /// Why the claim failed (the machine is gone, someone else holds it); the pool then claims
    /// another or makes a new machine. A failed claim leaves nothing running.
    fn claim(self: Box<Self>) -> BoxFuture<'static, Result<Claimed, BackendError>>;
}

/// A claimed machine, running again.
#[must_use = "dropping a claimed machine destroys it"]
pub struct Claimed {
    /// The machine, now owned by the pool like a booted one.
    pub machine: Box<dyn Machine>,
    /// Whether it was started or resumed.
    pub kind: BootKind,
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("machine", &self.machine.describe())
            .field("kind", &self.kind)
            .finish()
    }
}
