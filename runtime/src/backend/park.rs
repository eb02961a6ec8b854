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
use crate::wire::ClaimSecret;

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

    /// Waits until a machine of `pool` that is being parked now (its runner idled out a moment
    /// ago) has been parked, or could not be: `true` then, for a boot to try [`take`](Self::take)
    /// again. `false` at once when none of `pool`'s machines is being parked. A boot waits
    /// only where parking suspends, since the snapshot and a resume take less than a create.
    /// The default: none ever is.
    fn wait_parking(&self, pool: PoolKey) -> BoxFuture<'_, bool> {
        let _ = pool;
        Box::pin(std::future::ready(false))
    }
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

    /// Wakes the machine: takes it for this parent (a lease), hands it `secret` where only its
    /// own runner can read it (its runner sends it in its hello), and starts or resumes it. The
    /// pool has already opened the claim its runner is admitted under, which admits only a
    /// runner that sends `secret`.
    ///
    /// # Errors
    /// Why the claim failed (the machine is gone, someone else holds it); the pool then claims
    /// another or makes a new machine. A failed claim leaves nothing running.
    fn claim(
        self: Box<Self>,
        secret: ClaimSecret,
    ) -> BoxFuture<'static, Result<Claimed, BackendError>>;
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

/// What a backend does to its own machines for a [`ParkedMachines`] set: the set's bookkeeping
/// (a set per backend for all its pools, each pool's machines by its key, expiry at the time to
/// live, a full set, machines passed over while someone else holds them, release at a pool's
/// shutdown) is here, and the platform's calls (Fly's Machines API) are the backend's.
#[cfg_attr(not(feature = "fly"), allow(dead_code))]
pub(crate) trait ParkPlatform: Send + Sync + Sized + 'static {
    /// One parked machine as the set knows it.
    type Machine: Clone + Send + Sync + 'static;

    /// Its id, for logs and to find it again.
    fn id(machine: &Self::Machine) -> &str;

    /// A description for logs: `fly machine <id> in <region> (suspended)`.
    fn describe(machine: &Self::Machine, mode: Park) -> String;

    /// Destroys it.
    fn destroy<'a>(&'a self, machine: &'a Self::Machine)
        -> BoxFuture<'a, Result<(), BackendError>>;

    /// Parks it as `mode` asks (its runner was closed so), and says how it is parked: a refused
    /// suspend may fall back to a stop. `None` when it could be neither; the set destroys it.
    fn park<'a>(
        &'a self,
        machine: &'a Self::Machine,
        mode: Park,
        grace: Duration,
    ) -> BoxFuture<'a, Option<Park>>;

    /// Takes the machine for this parent, hands it `secret` (see [`ParkedMachine::claim`]),
    /// and starts or resumes it; `set` is where the running machine parks again.
    fn claim(
        &self,
        machine: Self::Machine,
        secret: ClaimSecret,
        set: std::sync::Arc<ParkedMachines<Self>>,
    ) -> BoxFuture<'static, Result<Box<dyn Machine>, ClaimRefused>>;
}

/// Why a claim did not start its machine.
#[cfg_attr(not(feature = "fly"), allow(dead_code))]
pub(crate) enum ClaimRefused {
    /// The machine is gone: nothing to destroy.
    Gone(BackendError),
    /// Someone else holds it for now (a lease): it goes back, passed over for a while.
    Contended(BackendError),
    /// Its state is unknown: it is destroyed.
    Failed(BackendError),
}

/// How long a parked machine that someone else held is passed over by claims: about a
/// lease's usual life.
const CONTENDED_FOR: Duration = Duration::from_secs(30);

/// A parked machine, waiting in the set.
struct Entry<M> {
    machine: M,
    ticket: ParkTicket,
    mode: Park,
    /// Destroys the machine at the time to live; aborted when it is taken.
    expiry: tokio::task::AbortHandle,
    /// Claims pass it over until then: someone else held it.
    contended_until: Option<tokio::time::Instant>,
}

/// The machines one backend has parked, for all the pools that use it: the [`ParkedSet`] a
/// backend hands its pools, over a [`ParkPlatform`].
#[cfg_attr(not(feature = "fly"), allow(dead_code))]
pub(crate) struct ParkedMachines<P: ParkPlatform> {
    platform: std::sync::Arc<P>,
    mode: Park,
    max: usize,
    ttl: Duration,
    entries: parking_lot::Mutex<Vec<Entry<P::Machine>>>,
    /// Machines being parked now, by pool.
    parking_now: parking_lot::Mutex<std::collections::HashMap<PoolKey, usize>>,
    /// Bumped whenever a park ends, either way.
    park_ended: tokio::sync::watch::Sender<u64>,
}

#[cfg_attr(not(feature = "fly"), allow(dead_code))]
impl<P: ParkPlatform> ParkedMachines<P> {
    pub(crate) fn new(platform: std::sync::Arc<P>, mode: Park, max: usize, ttl: Duration) -> Self {
        Self {
            platform,
            mode,
            max,
            ttl,
            entries: parking_lot::Mutex::new(Vec::new()),
            parking_now: parking_lot::Mutex::new(std::collections::HashMap::new()),
            park_ended: tokio::sync::watch::channel(0).0,
        }
    }

    fn is_full(&self) -> bool {
        self.entries.lock().len() >= self.max
    }

    async fn destroy(&self, machine: &P::Machine, why: &str) {
        if let Err(error) = self.platform.destroy(machine).await {
            tracing::error!(machine = P::id(machine), %error, "cannot destroy {why}");
        }
    }

    /// Parks `machine`, whose runner was closed as the set's mode asks; a machine that cannot
    /// be parked, or finds the set full, is destroyed.
    pub(crate) async fn park(
        self: std::sync::Arc<Self>,
        machine: P::Machine,
        ticket: ParkTicket,
        grace: Duration,
    ) -> Result<Parked, BackendError> {
        let id = P::id(&machine).to_owned();
        // Counted until this returns, by when the machine is in the set or gone.
        let _parking = ParkingNow::start(&self, ticket.pool);
        if self.is_full() {
            tracing::info!(machine = %id, max = self.max, "parked set full: destroying");
            self.platform.destroy(&machine).await?;
            return Ok(Parked::Destroyed);
        }
        let Some(mode) = self.platform.park(&machine, self.mode, grace).await else {
            self.platform.destroy(&machine).await?;
            return Ok(Parked::Destroyed);
        };
        let expiry = tokio::spawn(expire(std::sync::Arc::downgrade(&self), id, self.ttl));
        // Full by now (other parks went first): the machine is handed back to destroy.
        let refused = {
            let mut entries = self.entries.lock();
            if entries.len() >= self.max {
                Some(machine)
            } else {
                entries.push(Entry {
                    machine,
                    ticket,
                    mode,
                    expiry: expiry.abort_handle(),
                    contended_until: None,
                });
                None
            }
        };
        if let Some(machine) = refused {
            expiry.abort();
            self.platform.destroy(&machine).await?;
            return Ok(Parked::Destroyed);
        }
        Ok(Parked::As(mode))
    }

    /// Puts back a machine whose claim found someone else holding it, passed over by claims
    /// for a while.
    fn put_back_contended(
        self: &std::sync::Arc<Self>,
        machine: P::Machine,
        ticket: ParkTicket,
        mode: Park,
    ) {
        let id = P::id(&machine).to_owned();
        let expiry = tokio::spawn(expire(std::sync::Arc::downgrade(self), id, self.ttl));
        self.entries.lock().insert(
            0,
            Entry {
                machine,
                ticket,
                mode,
                expiry: expiry.abort_handle(),
                contended_until: Some(tokio::time::Instant::now() + CONTENDED_FOR),
            },
        );
    }
}

/// One machine of a pool being parked: counted while it lives, and a wake-up for the boots
/// waiting on it when it goes.
struct ParkingNow<'a, P: ParkPlatform> {
    set: &'a ParkedMachines<P>,
    pool: PoolKey,
}

impl<'a, P: ParkPlatform> ParkingNow<'a, P> {
    fn start(set: &'a ParkedMachines<P>, pool: PoolKey) -> Self {
        *set.parking_now.lock().entry(pool).or_insert(0) += 1;
        Self { set, pool }
    }
}

impl<P: ParkPlatform> Drop for ParkingNow<'_, P> {
    fn drop(&mut self) {
        let mut parking = self.set.parking_now.lock();
        if let Some(count) = parking.get_mut(&self.pool) {
            *count -= 1;
            if *count == 0 {
                parking.remove(&self.pool);
            }
        }
        drop(parking);
        self.set.park_ended.send_modify(|ended| *ended += 1);
    }
}

impl<P: ParkPlatform> ParkedSet for ParkedMachines<P> {
    fn wait_parking(&self, pool: PoolKey) -> BoxFuture<'_, bool> {
        // Subscribed before the count is read, so that a park ending in between is not missed.
        let mut ended = self.park_ended.subscribe();
        let parking = self.parking_now.lock().contains_key(&pool);
        Box::pin(async move { parking && ended.changed().await.is_ok() })
    }

    fn parking(&self) -> Parking {
        Parking::new(self.mode, self.ttl)
    }

    /// The machine `pool` parked last, whose snapshot is the freshest.
    fn take(self: std::sync::Arc<Self>, pool: PoolKey) -> Option<Box<dyn ParkedMachine>> {
        let now = tokio::time::Instant::now();
        let entry = {
            let mut entries = self.entries.lock();
            let index = entries.iter().rposition(|e| {
                e.ticket.pool() == pool && e.contended_until.is_none_or(|until| until <= now)
            })?;
            entries.remove(index)
        };
        entry.expiry.abort();
        Some(Box::new(TakenMachine {
            set: self,
            machine: Some(entry.machine),
            ticket: entry.ticket,
            mode: entry.mode,
        }))
    }

    fn release(&self, pool: PoolKey) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let released: Vec<Entry<P::Machine>> = {
                let mut entries = self.entries.lock();
                let (released, kept) = entries.drain(..).partition(|e| e.ticket.pool() == pool);
                *entries = kept;
                released
            };
            let destroys = released.iter().map(|entry| {
                entry.expiry.abort();
                self.destroy(&entry.machine, "a parked machine")
            });
            futures_util::future::join_all(destroys).await;
        })
    }

    fn count(&self, pool: PoolKey) -> usize {
        self.entries
            .lock()
            .iter()
            .filter(|e| e.ticket.pool() == pool)
            .count()
    }
}

/// Destroys machine `id` once it has been parked for `ttl`, unless a claim took it first.
async fn expire<P: ParkPlatform>(
    set: std::sync::Weak<ParkedMachines<P>>,
    id: String,
    ttl: Duration,
) {
    tokio::time::sleep(ttl).await;
    let Some(set) = set.upgrade() else {
        return;
    };
    let taken = {
        let mut entries = set.entries.lock();
        let index = entries.iter().position(|e| P::id(&e.machine) == id);
        index.map(|i| entries.remove(i))
    };
    if let Some(entry) = taken {
        tracing::info!(machine = %id, after = ?ttl, "parked too long: destroying");
        set.destroy(&entry.machine, "an expired parked machine")
            .await;
    }
}

/// A parked machine a boot took to claim. Dropped unclaimed, it is destroyed.
struct TakenMachine<P: ParkPlatform> {
    set: std::sync::Arc<ParkedMachines<P>>,
    /// `None` once the claim has dealt with it.
    machine: Option<P::Machine>,
    ticket: ParkTicket,
    mode: Park,
}

impl<P: ParkPlatform> ParkedMachine for TakenMachine<P> {
    fn ticket(&self) -> &ParkTicket {
        &self.ticket
    }

    fn describe(&self) -> String {
        self.machine
            .as_ref()
            .map_or_else(String::new, |m| P::describe(m, self.mode))
    }

    fn claim(
        mut self: Box<Self>,
        secret: ClaimSecret,
    ) -> BoxFuture<'static, Result<Claimed, BackendError>> {
        Box::pin(async move {
            let machine = self
                .machine
                .clone()
                .expect("a taken machine is claimed once");
            let set = std::sync::Arc::clone(&self.set);
            match set
                .platform
                .claim(machine.clone(), secret, std::sync::Arc::clone(&set))
                .await
            {
                Ok(running) => {
                    self.machine = None;
                    let kind = match self.mode {
                        Park::Suspend => BootKind::Resume,
                        Park::Stop => BootKind::Start,
                    };
                    Ok(Claimed {
                        machine: running,
                        kind,
                    })
                }
                Err(ClaimRefused::Gone(error)) => {
                    // Gone behind the pool's back: nothing to destroy.
                    self.machine = None;
                    Err(error)
                }
                Err(ClaimRefused::Contended(error)) => {
                    tracing::info!(
                        machine = P::id(&machine),
                        "someone else holds it: passing it over"
                    );
                    self.machine = None;
                    set.put_back_contended(machine, self.ticket.clone(), self.mode);
                    Err(error)
                }
                // Dropping `self` destroys it.
                Err(ClaimRefused::Failed(error)) => Err(error),
            }
        })
    }
}

impl<P: ParkPlatform> Drop for TakenMachine<P> {
    fn drop(&mut self) {
        let Some(machine) = self.machine.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                machine = P::id(&machine),
                "no runtime to destroy a dropped parked machine"
            );
            return;
        };
        let set = std::sync::Arc::clone(&self.set);
        runtime.spawn(async move { set.destroy(&machine, "a dropped parked machine").await });
    }
}
