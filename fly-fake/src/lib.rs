//! A fake of the Fly Machines API for tests of code that uses Firebrand's `FlyBackend`: it
//! validates every request against Fly's published OpenAPI spec (shipped in this crate) and
//! boots each "machine" as a local process, so a real runner dials back over real QUIC.
//!
//! Add it as a dev-dependency:
//!
//! ```toml
//! [dev-dependencies]
//! firebrand-fly-fake = "0.1"
//! ```
//!
//! ```no_run
//! use firebrand::backend::fly::FlyBackendBuilder;
//! use firebrand_fly_fake::FakeFly;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let fly = FakeFly::builder()
//!     .image("registry.fly.io/app:1", "target/debug/firebrand-runner")
//!     .start()
//!     .await?;
//! let backend = FlyBackendBuilder::from_vars(|_| None)
//!     .api_base(fly.url())
//!     .token(fly.token())
//!     .app(fly.app())
//!     .image("registry.fly.io/app:1")
//!     .region("ord")
//!     .private_ip("::1")
//!     .machine_id("parent")
//!     .build()?;
//! // ... run a pool on `backend`, then:
//! assert_eq!(fly.created(), fly.destroyed());
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub)]

mod server;
mod spec;
#[cfg(test)]
mod tests;
mod vm;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

pub use vm::MachineView;

/// How long the fake takes to bring a machine up, by how: Fly's published figures by default
/// ([`Latency::FLY`]), so that benchmarks are realistic; tests set small ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    /// From a create request to a running machine: an image pull and a cold boot.
    pub create: Duration,
    /// From a `start` of a stopped machine to its process running again.
    pub start: Duration,
    /// From a `start` of a suspended machine to its process going on.
    pub resume: Duration,
    /// From a `suspend` to the machine reading `suspended`: the snapshot. Fly's machines "can
    /// sit in `suspending` for many seconds".
    pub suspend: Duration,
}

impl Latency {
    /// Fly's documented figures: a create about 2 s, a start of a stopped machine about 1 s
    /// ("well under a second" to a second), a resume from suspend about 300 ms ("a few hundred
    /// milliseconds"), a suspend's snapshot about a second.
    pub const FLY: Latency = Latency {
        create: Duration::from_secs(2),
        start: Duration::from_secs(1),
        resume: Duration::from_millis(300),
        suspend: Duration::from_secs(1),
    };

    /// No added latency at all.
    pub const NONE: Latency = Latency {
        create: Duration::ZERO,
        start: Duration::ZERO,
        resume: Duration::ZERO,
        suspend: Duration::ZERO,
    };
}

impl Default for Latency {
    fn default() -> Self {
        Latency::FLY
    }
}

/// A running fake Machines API. Dropping it stops the server and kills every machine process.
pub struct FakeFly {
    addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeFly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeFly")
            .field("addr", &self.addr)
            .field("app", &self.state.app)
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

/// Builds a [`FakeFly`]. `Debug` does not show the token it accepts.
#[must_use = "a builder does nothing until `start` is called"]
pub struct FakeFlyBuilder {
    app: String,
    token: String,
    regions: Vec<String>,
    images: HashMap<String, PathBuf>,
    rate_limits: bool,
    latency: Latency,
}

impl std::fmt::Debug for FakeFlyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeFlyBuilder")
            .field("app", &self.app)
            .field("regions", &self.regions)
            .field("images", &self.images)
            .field("rate_limits", &self.rate_limits)
            .field("latency", &self.latency)
            .finish_non_exhaustive()
    }
}

/// Tallies a test can assert on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counts {
    /// Machines created.
    pub created: usize,
    /// Machines destroyed, by a DELETE or by `auto_destroy`.
    pub destroyed: usize,
    /// Create requests received, refused ones included.
    pub create_requests: usize,
    /// Requests answered 429.
    pub rate_limited: usize,
    /// Requests refused for not matching the spec (400) or making no sense (422).
    pub invalid: usize,
    /// Machines started (from stopped) or resumed (from suspended).
    pub starts: usize,
    /// Machines suspended.
    pub suspends: usize,
    /// Leases taken or renewed.
    pub leases: usize,
    /// Metadata keys set.
    pub metadata_updates: usize,
    /// Requests answered 401: no token, or not the one accepted.
    pub unauthorized: usize,
}

/// Faults armed for the next requests.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub rate_limit: u32,
    pub retry_after: Option<Duration>,
    pub ambiguous_creates: u32,
    pub hidden_lookups: u32,
    pub slow_create: Option<Duration>,
    pub no_capacity: Vec<String>,
    pub crash_boots: Vec<i32>,
    pub stall_boots: u32,
    pub stall_resumes: u32,
    pub refuse_suspends: u32,
    pub refuse_gpus: bool,
    pub refusals: std::collections::VecDeque<(u16, String, Option<String>)>,
}

pub(crate) struct State {
    pub app: String,
    pub token: Mutex<String>,
    pub regions: Vec<String>,
    pub images: HashMap<String, PathBuf>,
    pub spec: spec::Spec,
    pub machines: Mutex<BTreeMap<String, vm::FakeMachine>>,
    pub faults: Mutex<Faults>,
    pub counts: watch::Sender<Counts>,
    pub create_times: Mutex<Vec<Instant>>,
    pub errors: Mutex<Vec<String>>,
    pub authorization_schemes: Mutex<Vec<String>>,
    pub create_limiter: Option<governor::DefaultDirectRateLimiter>,
    pub next_id: std::sync::atomic::AtomicU64,
    pub latency: Mutex<Latency>,
    /// Where each machine's machine-local API socket lives: removed with the fake.
    pub socket_dir: PathBuf,
    /// The tasks serving those sockets: aborted with the fake.
    pub local_apis: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl FakeFly {
    /// A builder: app `fake-app`, region `ord` (plus `ams` and `fra`), Fly's create rate
    /// limit on.
    pub fn builder() -> FakeFlyBuilder {
        FakeFlyBuilder {
            app: "fake-app".into(),
            token: "fm2_fake-token".into(),
            regions: vec!["ord".into(), "ams".into(), "fra".into()],
            images: HashMap::new(),
            rate_limits: true,
            latency: Latency::FLY,
        }
    }

    /// The base URL, for `FlyBackendBuilder::api_base`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The app the fake serves.
    pub fn app(&self) -> &str {
        &self.state.app
    }

    /// The token the fake accepts.
    pub fn token(&self) -> String {
        self.state.token.lock().clone()
    }

    /// Accepts `token` from now on, and answers 401 to the one before: a rotated token.
    pub fn set_token(&self, token: impl Into<String>) {
        *self.state.token.lock() = token.into();
    }

    /// The tallies so far.
    pub fn counts(&self) -> Counts {
        *self.state.counts.borrow()
    }

    /// Machines created so far.
    pub fn created(&self) -> usize {
        self.counts().created
    }

    /// Machines destroyed so far.
    pub fn destroyed(&self) -> usize {
        self.counts().destroyed
    }

    /// Waits until every machine created is destroyed, for at most `timeout`. Returns whether
    /// that happened.
    pub async fn all_destroyed(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |c| c.destroyed == c.created).await
    }

    /// Waits until the tallies satisfy `done`, for at most `timeout`. Returns whether they did.
    pub async fn wait_for(&self, timeout: Duration, done: impl FnMut(&Counts) -> bool) -> bool {
        let mut counts = self.state.counts.subscribe();
        tokio::time::timeout(timeout, counts.wait_for(done))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Every machine, destroyed ones included.
    pub fn machines(&self) -> Vec<MachineView> {
        self.state
            .machines
            .lock()
            .values()
            .map(vm::FakeMachine::view)
            .collect()
    }

    /// When each create request arrived, relative to the first.
    pub fn create_times(&self) -> Vec<Duration> {
        let times = self.state.create_times.lock();
        let first = times.first().copied();
        times
            .iter()
            .map(|t| t.duration_since(first.unwrap_or(*t)))
            .collect()
    }

    /// The error messages of requests refused as invalid.
    pub fn invalid_requests(&self) -> Vec<String> {
        self.state.errors.lock().clone()
    }

    /// The `Authorization` scheme of each request (`FlyV1`, `Bearer`), never the token.
    pub fn authorization_schemes(&self) -> Vec<String> {
        self.state.authorization_schemes.lock().clone()
    }

    /// Answers the next `count` requests with 429, with `Retry-After` when given.
    pub fn rate_limit_burst(&self, count: u32, retry_after: Option<Duration>) {
        let mut faults = self.state.faults.lock();
        faults.rate_limit = count;
        faults.retry_after = retry_after;
    }

    /// The next create makes its machine, then answers 503 as if it had failed.
    pub fn fail_next_create_after_launch(&self) {
        self.state.faults.lock().ambiguous_creates += 1;
    }

    /// Each new machine answers 404 to its first `count` gets and waits, as Fly does for a
    /// moment after a create.
    pub fn hide_new_machines(&self, count: u32) {
        self.state.faults.lock().hidden_lookups = count;
    }

    /// Each create takes `delay` before it answers.
    pub fn slow_creates(&self, delay: Duration) {
        self.state.faults.lock().slow_create = Some(delay);
    }

    /// Creates in `region` fail with `insufficient_capacity`.
    pub fn no_capacity_in(&self, region: &str) {
        self.state.faults.lock().no_capacity.push(region.to_owned());
    }

    /// The next machine's process exits with `code` at once.
    pub fn crash_next_boot(&self, code: i32) {
        self.state.faults.lock().crash_boots.push(code);
    }

    /// The next machine's process runs but never dials back.
    pub fn stall_next_boot(&self) {
        self.state.faults.lock().stall_boots += 1;
    }

    /// The next resume of a suspended machine reports it started but leaves its process
    /// frozen: a runner that never dials back after a claim.
    pub fn stall_next_resume(&self) {
        self.state.faults.lock().stall_resumes += 1;
    }

    /// The next suspend is refused with 400, as Fly refuses one it cannot snapshot.
    pub fn refuse_next_suspend(&self) {
        self.state.faults.lock().refuse_suspends += 1;
    }

    /// Creates that ask for a GPU are refused, as Fly refuses them since 2026-08-01.
    pub fn refuse_gpus(&self) {
        self.state.faults.lock().refuse_gpus = true;
    }

    /// Refuses the next create with `status`, Fly's `error` message and its `status` field, as
    /// Fly answers a config it does not accept (400, 422) or a token without the scope (403).
    pub fn refuse_next_create(&self, status: u16, error: &str, fly_status: Option<&str>) {
        self.state.faults.lock().refusals.push_back((
            status,
            error.to_owned(),
            fly_status.map(str::to_owned),
        ));
    }

    /// Changes the latency model from the next request on.
    pub fn set_latency(&self, latency: Latency) {
        *self.state.latency.lock() = latency;
    }

    /// Takes the lease of machine `id` as someone else would (another parent, `flyctl`), for
    /// `ttl`: until it expires, changes to the machine without its nonce answer 409. Returns
    /// whether the machine was there to lease.
    pub fn hold_lease(&self, id: &str, ttl: Duration) -> bool {
        let mut machines = self.state.machines.lock();
        let Some(machine) = machines.get_mut(id) else {
            return false;
        };
        machine.lease = Some(vm::Lease {
            nonce: uuid::Uuid::new_v4().simple().to_string(),
            description: "held by a test".into(),
            expires: Instant::now() + ttl,
        });
        true
    }

    /// Destroys machine `id` behind its owner's back, as `fly machine destroy --force` would,
    /// and returns once it is destroyed; false when there was no live machine to destroy.
    pub async fn destroy_behind_the_back(&self, id: &str) -> bool {
        let mut destroyed = {
            let mut machines = self.state.machines.lock();
            let Some(machine) = machines.get_mut(id).filter(|m| m.current() != "destroyed") else {
                return false;
            };
            machine.destroy_requested = true;
            if !machine.send_stop(vm::Stop::Kill) {
                machine.state.send_replace("destroyed");
                drop(machines);
                self.state.count(|c| c.destroyed += 1);
                return true;
            }
            machine.state.send_replace("destroying");
            machine.state.subscribe()
        };
        // The process's exit marks the machine destroyed.
        let done = destroyed.wait_for(|s| *s == "destroyed").await.is_ok();
        done
    }

    /// Adds a started machine with no process: a parent, for reaping tests.
    pub fn add_parent_machine(&self, id: &str) {
        let machine = vm::FakeMachine::parent(id, &self.state.regions[0]);
        self.state.machines.lock().insert(id.to_owned(), machine);
    }
}

impl Drop for FakeFly {
    fn drop(&mut self) {
        self.server.abort();
        for machine in self.state.machines.lock().values_mut() {
            machine.kill();
        }
        for serving in self.state.local_apis.lock().drain(..) {
            serving.abort();
        }
        let _ = std::fs::remove_dir_all(&self.state.socket_dir);
    }
}

/// A fresh directory, readable by this user only, for the machines' API sockets. Short, since
/// a socket's path must fit in 108 bytes.
fn socket_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("fbfly-{}-{n}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

impl FakeFlyBuilder {
    /// The app served. Default: `fake-app`.
    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = app.into();
        self
    }

    /// The token accepted, with either scheme. Default: `fm2_fake-token`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = token.into();
        self
    }

    /// The regions that exist; the first is where a create without one lands. Default: `ord`,
    /// `ams`, `fra`.
    pub fn regions<S: Into<String>>(mut self, regions: impl IntoIterator<Item = S>) -> Self {
        self.regions = regions.into_iter().map(Into::into).collect();
        self
    }

    /// Maps an image reference to the local program a machine of that image runs: the image's
    /// default command. A machine's `init.entrypoint` and `init.cmd` replace it, as in Docker:
    /// their first element is then the program, a local path.
    pub fn image(mut self, image: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        self.images.insert(image.into(), program.into());
        self
    }

    /// Whether creates are limited as Fly limits them: 1 a second, bursts of 3. Default: on.
    pub fn rate_limits(mut self, on: bool) -> Self {
        self.rate_limits = on;
        self
    }

    /// How long machines take to come up. Default: [`Latency::FLY`], Fly's published figures.
    pub fn latency(mut self, latency: Latency) -> Self {
        self.latency = latency;
        self
    }

    /// Binds a loopback port and serves.
    ///
    /// # Errors
    /// The OS error if the port cannot be bound.
    pub async fn start(self) -> std::io::Result<FakeFly> {
        use governor::{Quota, RateLimiter};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let quota = Quota::per_second(std::num::NonZeroU32::MIN)
            .allow_burst(std::num::NonZeroU32::new(3).expect("not zero"));
        let state = Arc::new(State {
            app: self.app,
            token: Mutex::new(self.token),
            regions: self.regions,
            images: self.images,
            spec: spec::Spec::load(),
            machines: Mutex::default(),
            faults: Mutex::default(),
            counts: watch::channel(Counts::default()).0,
            create_times: Mutex::default(),
            errors: Mutex::default(),
            authorization_schemes: Mutex::default(),
            create_limiter: self.rate_limits.then(|| RateLimiter::direct(quota)),
            next_id: std::sync::atomic::AtomicU64::new(1),
            latency: Mutex::new(self.latency),
            socket_dir: socket_dir()?,
            local_apis: Mutex::default(),
        });
        let router = server::router(Arc::clone(&state));
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::error!(%error, "fake Fly API stopped");
            }
        });
        Ok(FakeFly {
            addr,
            state,
            server,
        })
    }
}

/// Checks a create body against `CreateMachineRequest` in Fly's spec, as the fake checks every
/// request it serves.
///
/// # Errors
/// Each way the body breaks the schema, in one message.
pub fn check_create_body(body: &serde_json::Value) -> Result<(), String> {
    spec::Spec::load().check_body("CreateMachineRequest", body)
}

impl State {
    pub(crate) fn count(&self, update: impl FnOnce(&mut Counts)) {
        self.counts.send_modify(update);
    }
}
