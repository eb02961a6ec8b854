//! Runners as [Fly.io Machines](https://fly.io/docs/machines/), booted from the app's own image.
//!
//! A parent deployed on Fly creates one machine per runner through the Machines API, in its
//! own region, with the boot token in the machine's env. The runner dials back over QUIC on the
//! private network (6PN); no `services` are needed. Every machine that the pool gives up on is
//! destroyed with `DELETE ?force=true`; `auto_destroy` is only the second line of defence, and
//! [`FlyBackend::reap_orphans`] clears what an earlier run of the parent left behind.
//!
//! ```no_run
//! use firebrand::backend::fly::FlyBackend;
//! use firebrand::{Pool, Registry};
//!
//! # async fn run(registry: Registry) -> Result<(), Box<dyn std::error::Error>> {
//! let pool = Pool::builder().registry(&registry)
//!     .backend(FlyBackend::from_env()?)
//!     .max(10)
//!     .build()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! See `docs/fly.md` for deploying, sizing and rate limits.

mod api;
mod builder;
mod credentials;
mod error;
mod launch;
mod machine;
mod park;
mod token;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{json, Map, Value};

pub use crate::backend::Park;
pub use builder::{
    CpuKind, FlyBackendBuilder, DEFAULT_API_BASE, DEFAULT_MAX_PARKED, DEFAULT_PARK_TTL,
    MAX_SUSPEND_MEMORY_MB,
};
pub use credentials::TokenSource;
pub use error::{ApiError, FlyError};
pub use launch::FULL_REGION_COOLDOWN;
pub use token::FlyToken;

use self::api::MachinesApi;
use self::builder::{keys, FlyConfig};
use super::{Backend, BootRequest, Machine, ParkedSet};
use crate::error::{BackendError, ProviderError, RunnerId};

/// A [`Backend`] that boots each runner as a Fly Machine. Cheap to clone.
#[derive(Clone)]
pub struct FlyBackend {
    inner: Arc<Inner>,
}

struct Inner {
    config: FlyConfig,
    api: Arc<MachinesApi>,
    pacer: launch::Pacer,
    /// Regions that refused for capacity lately, which later boots try last.
    full_regions: launch::FullRegions,
    /// The idle runners' machines parked for later boots, when parking is on.
    parked: Option<Arc<park::FlyParkedSet>>,
}

impl std::fmt::Debug for FlyBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let config = &self.inner.config;
        f.debug_struct("FlyBackend")
            .field("app", &config.app)
            .field("image", &config.image)
            .field("region", &config.region)
            .field("guest", &config.guest)
            .field("env", &config.env.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl FlyBackend {
    /// A builder seeded from the `FLY_*` variables Fly sets in every machine; the token is
    /// found as flyctl finds it (see [`FlyBackendBuilder::token`]), usually `FLY_API_TOKEN`,
    /// which the app gets as a secret.
    pub fn builder() -> FlyBackendBuilder {
        FlyBackendBuilder::from_vars(|name| std::env::var(name).ok())
    }

    /// A backend with every setting read from the environment and the documented defaults.
    ///
    /// # Errors
    /// [`FlyError::Config`] when a setting is missing or invalid.
    pub fn from_env() -> Result<Self, FlyError> {
        Self::builder().build()
    }

    fn new(config: FlyConfig, credentials: credentials::Credentials) -> Result<Self, FlyError> {
        let api = MachinesApi::new(&config.api_base, &config.app, credentials, config.retry)?;
        let pacer = launch::Pacer::new(config.create_interval, config.create_burst);
        let api = Arc::new(api);
        let parked = config.park.map(|mode| {
            Arc::new(park::FlyParkedSet::new(
                Arc::new(park::FlyMachines {
                    api: Arc::clone(&api),
                }),
                mode,
                config.max_parked,
                config.park_ttl,
            ))
        });
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                api,
                pacer,
                full_regions: launch::FullRegions::default(),
                parked,
            }),
        })
    }

    /// Destroys this pool's machines whose parent is gone, or that this parent left in an
    /// earlier run (another incarnation), and parked machines of an image that is not this
    /// backend's (a deploy happened). Runs when a pool starts; call it again at will. Returns
    /// the ids of the machines destroyed.
    ///
    /// Parked machines of a gone parent are destroyed, not adopted: their runners' credentials
    /// chain to that parent's certificate authority, which lived in its memory only, and they
    /// would dial the old parent's address.
    ///
    /// # Errors
    /// The API error that stopped the sweep; machines destroyed before it stay destroyed.
    pub async fn reap_orphans(&self) -> Result<Vec<String>, FlyError> {
        let Inner { config, api, .. } = &*self.inner;
        let ours = api
            .retrying(|| api.list(Some((keys::POOL, &config.pool_name))))
            .await?;
        let mut live_parents = None;
        let mut reaped = Vec::new();
        for machine in ours.iter().filter(|m| !is_gone(&m.state)) {
            let parent = machine.metadata(keys::PARENT).unwrap_or_default();
            let stale_parked = is_parked(&machine.state) && machine.image() != config.image;
            let orphan = if stale_parked {
                true
            } else if parent == config.parent_id() {
                machine.metadata(keys::INCARNATION) != Some(&config.incarnation)
            } else {
                if live_parents.is_none() {
                    let all = api.retrying(|| api.list(None)).await?;
                    live_parents = Some(
                        all.into_iter()
                            .filter(|m| !is_gone(&m.state) && m.state != "stopped")
                            .map(|m| m.id)
                            .collect::<std::collections::HashSet<_>>(),
                    );
                }
                let live = live_parents.as_ref().expect("listed above");
                // A parent outside Fly has no machine to look for: leave its runners alone.
                !parent.starts_with("ip:") && !live.contains(parent)
            };
            if orphan {
                tracing::info!(machine = %machine.id, parent, "reaping an orphan runner machine");
                api.retrying(|| api.destroy(&machine.id)).await?;
                reaped.push(machine.id.clone());
            }
        }
        Ok(reaped)
    }
}

fn is_gone(state: &str) -> bool {
    matches!(state, "destroyed" | "destroying")
}

/// The states of a parked machine.
fn is_parked(state: &str) -> bool {
    matches!(state, "stopped" | "suspended" | "suspending")
}

impl FlyConfig {
    /// Who the parent is, as recorded on its runners.
    fn parent_id(&self) -> String {
        match (&self.machine_id, self.private_ip) {
            (Some(id), _) => id.clone(),
            (None, Some(ip)) => format!("ip:{ip}"),
            (None, None) => unreachable!("the builder requires one of them"),
        }
    }

    /// The body of `POST /v1/apps/{app}/machines`: a `CreateMachineRequest`.
    fn create_body(
        &self,
        region: Option<&str>,
        launch_id: &str,
        runner: RunnerId,
        runner_env: &[(String, String)],
    ) -> Value {
        let mut env: Map<String, Value> = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        env.extend(
            runner_env
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.as_str()))),
        );
        let mut metadata: Map<String, Value> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        for (key, value) in [
            (keys::POOL, self.pool_name.clone()),
            (keys::PARENT, self.parent_id()),
            (keys::INCARNATION, self.incarnation.clone()),
            (keys::LAUNCH, launch_id.to_owned()),
        ] {
            metadata.insert(key.into(), value.into());
        }
        let mut guest = json!({
            "cpu_kind": self.guest.cpu_kind.as_str(),
            "cpus": self.guest.cpus,
            "memory_mb": self.guest.memory_mb,
        });
        if let (Some(kind), Some(gpus)) = (&self.guest.gpu_kind, self.guest.gpus) {
            guest["gpu_kind"] = kind.as_str().into();
            guest["gpus"] = gpus.into();
        }
        let mut config = json!({
            "image": self.image,
            "env": env,
            "guest": guest,
            // A parked machine's runner exits, or is stopped, and the machine must stay; every
            // machine is destroyed by the parent when it is done with it in any case.
            "auto_destroy": self.park.is_none(),
            "restart": { "policy": "no" },
            "metadata": metadata,
        });
        let mut init = Map::new();
        if let Some(cmd) = &self.cmd {
            init.insert("cmd".into(), cmd.clone().into());
        }
        if let Some(entrypoint) = &self.entrypoint {
            init.insert("entrypoint".into(), entrypoint.clone().into());
        }
        if !init.is_empty() {
            config["init"] = init.into();
        }
        if let Some((signal, timeout)) = &self.stop_config {
            config["stop_config"] = json!({
                "signal": signal,
                "timeout": format!("{}s", timeout.as_secs().max(1)),
            });
        }
        let short = &runner.0.simple().to_string()[..12];
        let mut body = json!({
            "name": format!("{}-firebrand-{short}", self.app),
            "config": config,
        });
        if let Some(region) = region {
            body["region"] = region.into();
        }
        body
    }
}

impl Backend for FlyBackend {
    fn bind_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), self.inner.config.port)
    }

    fn parent_addrs(&self, bound: SocketAddr) -> Vec<String> {
        let config = &self.inner.config;
        let port = bound.port();
        let mut addrs = Vec::new();
        if let Some(ip) = config.private_ip {
            addrs.push(SocketAddr::new(IpAddr::V6(ip), port).to_string());
        }
        if let Some(id) = &config.machine_id {
            addrs.push(format!("{id}.vm.{}.internal:{port}", config.app));
        }
        addrs
    }

    fn start(&self) -> BoxFuture<'_, ()> {
        Box::pin(super::sweep_at_start(
            "machines",
            "reap_orphans()",
            self.reap_orphans(),
        ))
    }

    fn boot(&self, request: BootRequest) -> BoxFuture<'_, Result<Box<dyn Machine>, BackendError>> {
        Box::pin(async move {
            let info = launch::launch(&self.inner, request.runner_id, &request.env).await?;
            tracing::info!(machine = %info.id, region = %info.region, "created a runner machine");
            let machine = machine::FlyMachine::new(
                Arc::clone(&self.inner.api),
                info,
                self.inner.parked.clone().map(|set| set as _),
            );
            Ok(Box::new(machine) as Box<dyn Machine>)
        })
    }

    fn parked_set(&self) -> Option<Arc<dyn ParkedSet>> {
        self.inner.parked.clone().map(|set| set as _)
    }
}

impl From<FlyError> for BackendError {
    fn from(error: FlyError) -> Self {
        BackendError::provider(error)
    }
}

impl ProviderError for FlyError {
    fn is_permanent(&self) -> bool {
        FlyError::is_permanent(self)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn backend() -> FlyBackend {
        FlyBackendBuilder::from_vars(|_| None)
            .token("fm2_x")
            .app("app")
            .image("registry.fly.io/app:1")
            .region("ord")
            .private_ip("fdaa:0:1:a7b::3")
            .machine_id("148e21ea0d2089")
            .cpu_kind(CpuKind::Performance)
            .cpus(8)
            .memory_mb(32768)
            .gpu_kind("l40s")
            .gpus(2)
            .cmd(["/app/runner", "--serve"])
            .entrypoint(["/bin/tini", "--"])
            .env("MODE", "runner")
            .metadata("team", "ml")
            .stop_config("SIGTERM", Duration::from_secs(30))
            .build()
            .unwrap()
    }

    #[test]
    fn runners_dial_the_6pn_address_then_the_stable_name() {
        let backend = backend();
        assert_eq!(backend.bind_addr().to_string(), "[::]:0");
        let bound = "[::]:4370".parse().unwrap();
        assert_eq!(
            backend.parent_addrs(bound),
            [
                "[fdaa:0:1:a7b::3]:4370",
                "148e21ea0d2089.vm.app.internal:4370"
            ]
        );
    }

    #[test]
    fn the_create_body_carries_every_setting() {
        let backend = backend();
        let runner = RunnerId(uuid::Uuid::nil());
        let env = [("FIREBRAND_PARENT".to_owned(), "fb1.token".to_owned())];
        let body = backend
            .inner
            .config
            .create_body(Some("ams"), "launch-1", runner, &env);
        assert_eq!(body["name"], "app-firebrand-000000000000");
        assert_eq!(body["region"], "ams");
        let config = &body["config"];
        assert_eq!(config["guest"]["gpu_kind"], "l40s");
        assert_eq!(config["guest"]["gpus"], 2);
        assert_eq!(config["init"]["entrypoint"], json!(["/bin/tini", "--"]));
        assert_eq!(
            config["stop_config"],
            json!({"signal": "SIGTERM", "timeout": "30s"})
        );
        assert_eq!(config["env"]["MODE"], "runner");
        assert_eq!(config["env"]["FIREBRAND_PARENT"], "fb1.token");
        assert_eq!(config["metadata"]["team"], "ml");
        assert_eq!(config["metadata"]["firebrand_launch"], "launch-1");
        assert_eq!(config["metadata"]["firebrand_parent"], "148e21ea0d2089");
        assert!(config.get("services").is_none());
        firebrand_fly_fake::check_create_body(&body).expect("valid against the spec");
    }
}
