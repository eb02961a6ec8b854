//! Settings for [`FlyBackend`], read from the machine's environment and overridden in code.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::time::Duration;

use super::api::RetryPolicy;
use super::{FlyBackend, FlyError};
use crate::backend::Park;

/// Metadata keys Firebrand sets on every machine it creates.
pub(crate) mod keys {
    pub(crate) const POOL: &str = "firebrand_pool";
    pub(crate) const PARENT: &str = "firebrand_parent";
    pub(crate) const INCARNATION: &str = "firebrand_parent_incarnation";
    pub(crate) const LAUNCH: &str = "firebrand_launch";
}

/// How many idle runners' machines a backend keeps parked at most, by default.
pub const DEFAULT_MAX_PARKED: usize = 8;

/// How long a machine stays parked at most, by default: an hour, long enough to carry a
/// service through the lulls between bursts, short enough that parked machines (billed for
/// storage) do not pile up.
pub const DEFAULT_PARK_TTL: Duration = Duration::from_secs(3600);

/// The most memory a Fly machine can be suspended with.
pub const MAX_SUSPEND_MEMORY_MB: u32 = 2048;

/// The default API: Fly's public endpoint. Inside Fly, `http://_api.internal:4280` works too.
pub const DEFAULT_API_BASE: &str = "https://api.machines.dev";

/// Signals a `stop_config` may name, as the spec lists them.
const SIGNALS: [&str; 7] = [
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGTERM",
];

/// The kind of CPU a runner machine gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CpuKind {
    /// Shared CPUs: 1, 2, 4, 6 or 8 of them, 256 to 2048 MiB each.
    Shared,
    /// Dedicated CPUs: 1, 2, 4, 8 or 16 of them, 2048 to 8192 MiB each.
    Performance,
}

impl CpuKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CpuKind::Shared => "shared",
            CpuKind::Performance => "performance",
        }
    }

    fn cpu_counts(self) -> &'static [u32] {
        match self {
            CpuKind::Shared => &[1, 2, 4, 6, 8],
            CpuKind::Performance => &[1, 2, 4, 8, 16],
        }
    }

    /// MiB per CPU, least and most.
    fn memory_per_cpu(self) -> (u32, u32) {
        match self {
            CpuKind::Shared => (256, 2048),
            CpuKind::Performance => (2048, 8192),
        }
    }
}

/// The size of each runner machine: Fly's `config.guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Guest {
    pub cpu_kind: CpuKind,
    pub cpus: u32,
    pub memory_mb: u32,
    pub gpu_kind: Option<String>,
    pub gpus: Option<u32>,
}

/// Where settings come from: the process environment, or a test's map.
use crate::backend::runner_spec::RunnerSpec;

/// Everything a built [`FlyBackend`] needs; checked once, in [`FlyBackendBuilder::build`].
#[derive(Debug, Clone)]
pub(crate) struct FlyConfig {
    pub api_base: String,
    pub app: String,
    pub image: String,
    pub region: Option<String>,
    pub fallback_regions: Vec<String>,
    pub private_ip: Option<Ipv6Addr>,
    pub machine_id: Option<String>,
    pub guest: Guest,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub stop_config: Option<(String, Duration)>,
    pub pool_name: String,
    pub incarnation: String,
    pub port: u16,
    pub create_interval: Duration,
    pub create_burst: u32,
    pub create_timeout: Duration,
    pub capacity_attempts: u32,
    pub retry: RetryPolicy,
    pub park: Option<Park>,
    pub max_parked: usize,
    pub park_ttl: Duration,
}

/// Builds a [`FlyBackend`]. [`FlyBackend::builder`] starts from the `FLY_*` variables that Fly
/// sets in every machine; each setter overrides one of them.
///
/// ```no_run
/// use firebrand::backend::fly::{CpuKind, FlyBackend};
///
/// let backend = FlyBackend::builder()
///     .cpu_kind(CpuKind::Performance)
///     .cpus(2)
///     .memory_mb(4096)
///     .fallback_regions(["ams", "fra"])
///     .forward_env(["DATABASE_URL"])
///     .build()?;
/// # Ok::<(), firebrand::backend::fly::FlyError>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct FlyBackendBuilder {
    token: Option<String>,
    token_source: Option<std::sync::Arc<dyn super::TokenSource>>,
    app: Option<String>,
    image: Option<String>,
    region: Option<String>,
    private_ip: Option<String>,
    machine_id: Option<String>,
    api_base: String,
    fallback_regions: Vec<String>,
    cpu_kind: CpuKind,
    cpus: u32,
    memory_mb: u32,
    gpu_kind: Option<String>,
    gpus: Option<u32>,
    cmd: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    runner: RunnerSpec,
    metadata: BTreeMap<String, String>,
    stop_config: Option<(String, Duration)>,
    create_interval: Duration,
    create_burst: u32,
    create_timeout: Duration,
    capacity_attempts: u32,
    retry: RetryPolicy,
    park: Option<Park>,
    max_parked: usize,
    park_ttl: Duration,
}

impl std::fmt::Debug for FlyBackendBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlyBackendBuilder")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "token_source",
                &self.token_source.as_ref().map(|s| s.name()),
            )
            .field("app", &self.app)
            .field("image", &self.image)
            .field("region", &self.region)
            .field("api_base", &self.api_base)
            .field("env", &self.runner.env.keys().collect::<Vec<_>>())
            .field("park", &self.park)
            .finish_non_exhaustive()
    }
}

impl FlyBackendBuilder {
    /// A builder that reads `FLY_*` settings and forwarded variables through `lookup` instead
    /// of the process environment: for tests, and for configuration from elsewhere.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        let runner = RunnerSpec::new(std::sync::Arc::new(lookup));
        let var = |name: &str| runner.var(name);
        Self {
            token: None,
            token_source: None,
            app: var("FLY_APP_NAME"),
            image: var("FLY_IMAGE_REF"),
            region: var("FLY_REGION"),
            private_ip: var("FLY_PRIVATE_IP"),
            machine_id: var("FLY_MACHINE_ID"),
            api_base: DEFAULT_API_BASE.into(),
            fallback_regions: Vec::new(),
            cpu_kind: CpuKind::Shared,
            cpus: 1,
            memory_mb: 1024,
            gpu_kind: None,
            gpus: None,
            cmd: None,
            entrypoint: None,
            metadata: BTreeMap::new(),
            stop_config: None,
            create_interval: Duration::from_secs(1),
            create_burst: 3,
            create_timeout: Duration::from_secs(60),
            capacity_attempts: 3,
            retry: RetryPolicy {
                attempts: 8,
                min_delay: Duration::from_millis(250),
                max_delay: Duration::from_secs(8),
            },
            park: None,
            max_parked: DEFAULT_MAX_PARKED,
            park_ttl: DEFAULT_PARK_TTL,
            runner,
        }
    }

    /// The API token, used before any other source. Without it, the token is looked for as
    /// flyctl looks: `FLY_ACCESS_TOKEN`, then `FLY_API_TOKEN`, then the `access_token` of
    /// `~/.fly/config.yml` (written by `fly auth login`), then the
    /// [`token_source`](Self::token_source). Macaroons (`fm1r_`, `fm1a_`, `fm2_`) are sent as
    /// `FlyV1`, other tokens as `Bearer`; a scheme already in the string is accepted. After a
    /// 401 the token is looked for again, once, and the request repeated if it changed.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The app the runner machines belong to. Default: `FLY_APP_NAME`.
    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = Some(app.into());
        self
    }

    /// The image runners boot from. Default: `FLY_IMAGE_REF`, the parent's own image.
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// The region runners start in. Default: `FLY_REGION`, the parent's own.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Regions to try, in order, when the first has no capacity. Default: none.
    pub fn fallback_regions<S: Into<String>>(
        mut self,
        regions: impl IntoIterator<Item = S>,
    ) -> Self {
        self.fallback_regions = regions.into_iter().map(Into::into).collect();
        self
    }

    /// The parent's 6PN address, which runners dial. Default: `FLY_PRIVATE_IP`.
    pub fn private_ip(mut self, ip: impl Into<String>) -> Self {
        self.private_ip = Some(ip.into());
        self
    }

    /// The parent's machine id: recorded on runners for reaping, and the stable fallback
    /// address `<id>.vm.<app>.internal`. Default: `FLY_MACHINE_ID`.
    pub fn machine_id(mut self, id: impl Into<String>) -> Self {
        self.machine_id = Some(id.into());
        self
    }

    /// The Machines API's base URL. Default: `https://api.machines.dev`.
    pub fn api_base(mut self, url: impl Into<String>) -> Self {
        self.api_base = url.into();
        self
    }

    /// The CPU kind. Default: [`CpuKind::Shared`].
    pub fn cpu_kind(mut self, kind: CpuKind) -> Self {
        self.cpu_kind = kind;
        self
    }

    /// CPUs per runner. Default: 1.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Memory per runner in MiB, a multiple of 256 within the CPU kind's limits. Default: 1024.
    pub fn memory_mb(mut self, memory_mb: u32) -> Self {
        self.memory_mb = memory_mb;
        self
    }

    /// The GPU kind, e.g. `a100-pcie-40gb`, `a100-sxm4-80gb`, `l40s`, `a10`. Default: none.
    /// Fly discontinued GPU machines after 2026-08-01, so expect a refusal.
    pub fn gpu_kind(mut self, kind: impl Into<String>) -> Self {
        self.gpu_kind = Some(kind.into());
        self
    }

    /// GPUs per runner; needs [`gpu_kind`](Self::gpu_kind). Default: 1 with a GPU kind.
    pub fn gpus(mut self, gpus: u32) -> Self {
        self.gpus = Some(gpus);
        self
    }

    /// `init.cmd`: the command runners start with. Default: the image's own command, which
    /// suits an app that embeds the runner with [`run_if_child`](crate::run_if_child).
    pub fn cmd<S: Into<String>>(mut self, cmd: impl IntoIterator<Item = S>) -> Self {
        self.cmd = Some(cmd.into_iter().map(Into::into).collect());
        self
    }

    /// `init.entrypoint`. Default: the image's own.
    pub fn entrypoint<S: Into<String>>(mut self, entrypoint: impl IntoIterator<Item = S>) -> Self {
        self.entrypoint = Some(entrypoint.into_iter().map(Into::into).collect());
        self
    }

    crate::backend::runner_spec::runner_spec_setters! {
        forward_env: "App secrets reach every machine of the app without this.",
        pool_name: "It is recorded on machines, which [`FlyBackend::reap_orphans`] lists by: \
            give each pool in an app its own.",
        incarnation: "Machines that carry this parent's machine id but another incarnation \
            are left from an earlier run, and are reaped.",
        port: "It is bound on `[::]`, and runners dial it over the app's private network.",
    }

    /// Extra machine metadata. Keys starting with `firebrand_` are reserved.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// `stop_config`: the signal Fly sends a runner machine on stop, and how long it waits
    /// before killing it. Default: Fly's (SIGINT, 5 s). Firebrand runners drain on SIGTERM.
    pub fn stop_config(mut self, signal: impl Into<String>, timeout: Duration) -> Self {
        self.stop_config = Some((signal.into(), timeout));
        self
    }

    /// Client-side pacing of creates: one per `interval`, with bursts of `burst`. Default: one
    /// a second, bursts of 3, as Fly limits each app.
    pub fn create_pacing(mut self, interval: Duration, burst: u32) -> Self {
        self.create_interval = interval;
        self.create_burst = burst;
        self
    }

    /// How long one create request may take. Default: 60 s.
    pub fn create_timeout(mut self, timeout: Duration) -> Self {
        self.create_timeout = timeout;
        self
    }

    /// Creates that may fail for lack of capacity in the last region to try, before the boot
    /// fails with [`FlyError::NoCapacity`](super::FlyError::NoCapacity). A capacity refusal in
    /// any other region moves to the next one at once, and puts the region last for later
    /// boots for [`FULL_REGION_COOLDOWN`](super::FULL_REGION_COOLDOWN) (60 s). Default: 3.
    pub fn capacity_attempts(mut self, attempts: u32) -> Self {
        self.capacity_attempts = attempts;
        self
    }

    /// Retries of transient failures (408, 429, 5xx, connection errors): `attempts` requests in
    /// all, backing off exponentially with jitter from `min_delay` up to `max_delay`, or as
    /// long as Fly's `Retry-After` says. Default: 8 attempts, 250 ms to 8 s.
    pub fn retries(mut self, attempts: u32, min_delay: Duration, max_delay: Duration) -> Self {
        self.retry = RetryPolicy {
            attempts,
            min_delay,
            max_delay,
        };
        self
    }

    /// Parks the machines of runners that idle out instead of destroying them, and boots later
    /// runners by claiming a parked machine (a lease, then `start`) before creating one. With
    /// [`Park::Suspend`] a claim resumes the runner from a memory snapshot (a few hundred ms
    /// on Fly); with [`Park::Stop`] it starts the machine again (about a second), and the
    /// runner process starts afresh. A machine whose runner was lost, failed or timed out is
    /// never parked. Parked machines are billed for storage only; see `docs/fly.md` to choose.
    ///
    /// Fly suspends only machines with at most 2 GB of memory
    /// ([`MAX_SUSPEND_MEMORY_MB`]), no swap and no GPU: [`build`](Self::build) refuses
    /// `Park::Suspend` for any other machine. Default: off, every idle machine is destroyed.
    ///
    /// ```
    /// use std::time::Duration;
    /// use firebrand::backend::fly::{FlyBackendBuilder, Park};
    ///
    /// let backend = FlyBackendBuilder::from_vars(|_| None)
    ///     .token("fm2_x")
    ///     .app("app")
    ///     .image("registry.fly.io/app:v1")
    ///     .machine_id("148e21ea0d2089")
    ///     .park(Park::Suspend)
    ///     .max_parked(4)
    ///     .park_ttl(Duration::from_secs(600))
    ///     .build()?;
    /// # Ok::<(), firebrand::backend::fly::FlyError>(())
    /// ```
    pub fn park(mut self, mode: Park) -> Self {
        self.park = Some(mode);
        self
    }

    /// The most machines kept parked; an idle runner's machine past that is destroyed.
    /// Default: [`DEFAULT_MAX_PARKED`], 8.
    pub fn max_parked(mut self, max: usize) -> Self {
        self.max_parked = max;
        self
    }

    /// How long a machine stays parked before it is destroyed. Default: [`DEFAULT_PARK_TTL`],
    /// an hour.
    pub fn park_ttl(mut self, ttl: Duration) -> Self {
        self.park_ttl = ttl;
        self
    }

    /// A source of tokens of the app's own (a vault, a database), asked when no other place
    /// holds a token, and again after Fly answers 401. Firebrand never runs `flyctl` itself.
    pub fn token_source(mut self, source: impl super::TokenSource) -> Self {
        self.token_source = Some(std::sync::Arc::new(source));
        self
    }

    /// Checks the settings and builds the backend. Sends no request.
    ///
    /// # Errors
    /// [`FlyError::Config`] naming the first missing or contradictory setting.
    pub fn build(self) -> Result<FlyBackend, FlyError> {
        let chain = super::credentials::TokenChain {
            explicit: self.token.clone(),
            lookup: std::sync::Arc::clone(&self.runner.lookup),
            source: self.token_source.clone(),
        };
        // Looked for now, so that a parent without any token fails at build; a source may
        // still supply one when the first request needs it.
        let resolved = chain.resolve_local()?;
        if resolved.is_none() && chain.source.is_none() {
            return Err(config(super::credentials::NO_TOKEN));
        }
        let config = self.into_config()?;
        FlyBackend::new(
            config,
            super::credentials::Credentials::new(chain, resolved),
        )
    }

    fn into_config(self) -> Result<FlyConfig, FlyError> {
        let app = self
            .app
            .ok_or_else(|| config("no app name: set FLY_APP_NAME or call .app()"))?;
        let image = self
            .image
            .ok_or_else(|| config("no image: set FLY_IMAGE_REF or call .image()"))?;
        if !(self.api_base.starts_with("https://") || self.api_base.starts_with("http://")) {
            return Err(config(format!(
                "api_base `{}` is not an http(s) URL",
                self.api_base
            )));
        }
        let private_ip = self
            .private_ip
            .map(|ip| {
                ip.parse::<Ipv6Addr>()
                    .map_err(|_| config(format!("private_ip `{ip}` is not an IPv6 address")))
            })
            .transpose()?;
        if private_ip.is_none() && self.machine_id.is_none() {
            return Err(config(
                "runners cannot reach the parent: set FLY_PRIVATE_IP or FLY_MACHINE_ID",
            ));
        }
        let guest = guest(
            self.cpu_kind,
            self.cpus,
            self.memory_mb,
            self.gpu_kind,
            self.gpus,
        )?;
        let runner = self.runner.check().map_err(config)?;
        if let Some(key) = self.metadata.keys().find(|k| k.starts_with("firebrand_")) {
            return Err(config(format!("metadata key `{key}` is reserved")));
        }
        if let Some((signal, _)) = &self.stop_config {
            if !SIGNALS.contains(&signal.as_str()) {
                return Err(config(format!(
                    "stop signal `{signal}` is not one of {SIGNALS:?}"
                )));
            }
        }
        if self.create_interval.is_zero() || self.create_burst == 0 {
            return Err(config("create pacing needs a non-zero interval and burst"));
        }
        if self.capacity_attempts == 0 || self.retry.attempts == 0 {
            return Err(config("attempts must be at least 1"));
        }
        if self.park.is_some() && (self.max_parked == 0 || self.park_ttl.is_zero()) {
            return Err(config(
                "parking needs max_parked and park_ttl above zero; to park nothing, leave park unset",
            ));
        }
        if self.park_ttl > crate::settings::MAX_SETTING_DURATION {
            return Err(config(format!(
                "park_ttl {:?} is more than the {:?} any setting may be",
                self.park_ttl,
                crate::settings::MAX_SETTING_DURATION
            )));
        }
        if self.park == Some(Park::Suspend) {
            let why_not = if guest.memory_mb > MAX_SUSPEND_MEMORY_MB {
                Some(format!(
                    "{} MB of memory (Fly suspends at most {MAX_SUSPEND_MEMORY_MB} MB)",
                    guest.memory_mb
                ))
            } else if guest.gpu_kind.is_some() {
                Some("a GPU".to_owned())
            } else {
                None
            };
            if let Some(why) = why_not {
                return Err(config(format!(
                    "Fly cannot suspend a machine with {why}: park with Park::Stop, or make \
                     the machines suspendable"
                )));
            }
        }
        Ok(FlyConfig {
            api_base: self.api_base,
            app,
            image,
            region: self.region,
            fallback_regions: self.fallback_regions,
            private_ip,
            machine_id: self.machine_id,
            guest,
            cmd: self.cmd,
            entrypoint: self.entrypoint,
            env: runner.env,
            metadata: self.metadata,
            stop_config: self.stop_config,
            pool_name: runner.pool_name,
            incarnation: runner.incarnation,
            port: runner.port,
            create_interval: self.create_interval,
            create_burst: self.create_burst,
            create_timeout: self.create_timeout,
            capacity_attempts: self.capacity_attempts,
            retry: self.retry,
            park: self.park,
            max_parked: self.max_parked,
            park_ttl: self.park_ttl,
        })
    }
}

fn guest(
    cpu_kind: CpuKind,
    cpus: u32,
    memory_mb: u32,
    gpu_kind: Option<String>,
    gpus: Option<u32>,
) -> Result<Guest, FlyError> {
    if !cpu_kind.cpu_counts().contains(&cpus) {
        return Err(config(format!(
            "{} CPUs come in counts of {:?}, not {cpus}",
            cpu_kind.as_str(),
            cpu_kind.cpu_counts()
        )));
    }
    let (least, most) = cpu_kind.memory_per_cpu();
    if memory_mb % 256 != 0 || memory_mb < least * cpus || memory_mb > most * cpus {
        return Err(config(format!(
            "memory_mb {memory_mb} is outside what {cpus} {} CPU(s) allow: a multiple of 256 \
             from {} to {}",
            cpu_kind.as_str(),
            least * cpus,
            most * cpus
        )));
    }
    let gpus = match (&gpu_kind, gpus) {
        (None, Some(_)) => return Err(config("gpus is set without gpu_kind")),
        (Some(kind), _) if kind.trim().is_empty() => return Err(config("gpu_kind is empty")),
        (Some(_), Some(0)) => return Err(config("gpus must be at least 1 with a gpu_kind")),
        (Some(_), None) => Some(1),
        (_, gpus) => gpus,
    };
    Ok(Guest {
        cpu_kind,
        cpus,
        memory_mb,
        gpu_kind,
        gpus,
    })
}

fn config(message: impl Into<String>) -> FlyError {
    FlyError::Config(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::PARENT_ENV;

    fn builder() -> FlyBackendBuilder {
        FlyBackendBuilder::from_vars(|name| {
            let value = match name {
                "FLY_API_TOKEN" => "fm2_SECRET",
                "FLY_APP_NAME" => "app",
                "FLY_IMAGE_REF" => "registry.fly.io/app:1",
                "FLY_REGION" => "ord",
                "FLY_PRIVATE_IP" => "fdaa::3",
                "FLY_MACHINE_ID" => "148e",
                "RUST_LOG" => "debug",
                _ => return None,
            };
            Some(value.to_owned())
        })
    }

    fn refusal(builder: FlyBackendBuilder) -> String {
        match builder.into_config() {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn reads_the_fly_environment_and_forwards_rust_log() {
        let config = builder().into_config().unwrap();
        assert_eq!(config.app, "app");
        assert_eq!(config.region.as_deref(), Some("ord"));
        assert_eq!(config.private_ip, Some("fdaa::3".parse().unwrap()));
        assert_eq!(
            config.env.get("RUST_LOG").map(String::as_str),
            Some("debug")
        );
        assert!(!config.env.contains_key("FLY_API_TOKEN"));
    }

    #[test]
    fn contradictions_are_refused_before_any_request() {
        let cases = [
            (builder().gpus(2), "gpus is set without gpu_kind"),
            (builder().memory_mb(128), "memory_mb 128"),
            (builder().memory_mb(1000), "multiple of 256"),
            (builder().cpu_kind(CpuKind::Performance), "memory_mb 1024"),
            (builder().cpus(3), "not 3"),
            (
                builder().stop_config("SIGFOO", Duration::from_secs(1)),
                "SIGFOO",
            ),
            (builder().metadata("firebrand_pool", "x"), "reserved"),
            (builder().env(PARENT_ENV, "x"), PARENT_ENV),
            (builder().api_base("ftp://x"), "not an http(s) URL"),
            (builder().private_ip("10.0.0.1"), "not an IPv6 address"),
        ];
        for (builder, expected) in cases {
            let error = refusal(builder);
            assert!(error.contains(expected), "{error} lacks {expected}");
        }
        let none = FlyBackendBuilder::from_vars(|_| None);
        assert!(refusal(none).contains("no app name"));
        let error = FlyBackendBuilder::from_vars(|_| None).build().unwrap_err();
        assert!(error.to_string().contains("no Fly API token"), "{error}");
        let no_image = FlyBackendBuilder::from_vars(|_| None).app("a");
        assert!(refusal(no_image).contains("no image"));
    }

    #[test]
    fn a_gpu_kind_alone_means_one_gpu() {
        let config = builder()
            .cpu_kind(CpuKind::Performance)
            .cpus(8)
            .memory_mb(32768)
            .gpu_kind("a100-pcie-40gb")
            .into_config()
            .unwrap();
        assert_eq!(config.guest.gpus, Some(1));
    }

    #[test]
    fn debug_hides_the_token() {
        let shown = format!("{:?}", builder());
        assert!(!shown.contains("SECRET"), "{shown}");
    }
}
