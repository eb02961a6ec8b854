//! Runners as Kubernetes pods, made from the parent pod's own image, through
//! [kube-rs](https://kube.rs).
//!
//! A parent running in a pod creates one pod per runner in its own namespace: owned by the
//! parent pod (so that deleting the parent deletes them), never restarted, with its GPUs as a
//! limit on `nvidia.com/gpu`. The runner's boot token holds its private key, so it goes in a
//! Secret owned by the runner pod (deleted with it) rather than in the pod spec. The runner
//! dials the parent's pod IP on the pool's port; no Service is needed. One watch follows every
//! runner pod of the parent: a pod that cannot run fails its boot at once with the cluster's
//! reason, and the parent deletes every pod it is done with, with the grace the pool gives;
//! the start-up sweep deletes the runner pods of parents that are gone and of this parent's
//! earlier incarnations (a container restart keeps the pod, so garbage collection never
//! fires for them).
//!
//! ```no_run
//! use firebrand::backend::kubernetes::KubernetesBackend;
//! use firebrand::{Pool, Registry};
//!
//! # async fn run(registry: Registry) -> Result<(), Box<dyn std::error::Error>> {
//! let pool = Pool::builder().registry(&registry)
//!     .backend(KubernetesBackend::from_env().await?)
//!     .max(10)
//!     .build()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! See `docs/kubernetes.md` for the Deployment, RBAC and GPU node pools.

mod api;
mod builder;
mod error;
mod machine;
mod pod;
mod watch;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

pub use builder::{
    KubernetesBackendBuilder, DEFAULT_CONTAINER_NAME, DEFAULT_GPU_RESOURCE, DEFAULT_POOL_NAME,
};
pub use error::KubernetesError;
/// The Kubernetes types this backend's API takes (`Pod` for
/// [`edit_pod`](KubernetesBackendBuilder::edit_pod), `Toleration`), at the version it was
/// built with (`v1_37`), so that an app needs no dependency of its own to name them.
pub use k8s_openapi;
/// The kube-rs client this backend runs on, for [`client`](KubernetesBackendBuilder::client).
pub use kube;
pub use pod::{labels, TERMINATION_MARGIN};

use self::api::KubeApi;
use self::pod::PodTemplate;
use super::{Backend, BootRequest, Machine};
use crate::error::{BackendError, ProviderError};
use crate::token::PARENT_ENV;

/// A [`Backend`] that boots each runner as a Kubernetes pod. Cheap to clone.
#[derive(Clone)]
pub struct KubernetesBackend {
    inner: Arc<Inner>,
}

struct Inner {
    api: KubeApi,
    template: PodTemplate,
    watch: Arc<watch::PodWatch>,
    pod_ip: IpAddr,
    port: u16,
    unschedulable_grace: Duration,
}

impl std::fmt::Debug for KubernetesBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let template = &self.inner.template;
        f.debug_struct("KubernetesBackend")
            .field("namespace", &template.namespace)
            .field("parent", &template.parent.name)
            .field("image", &template.image)
            .field("gpus", &template.gpus)
            .field("pod_ip", &self.inner.pod_ip)
            .field("env", &template.env.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl KubernetesBackend {
    /// A builder seeded from the downward-API variables of the parent's pod (`POD_NAME`,
    /// `POD_NAMESPACE`, `POD_IP`); see [`KubernetesBackendBuilder`].
    pub fn builder() -> KubernetesBackendBuilder {
        KubernetesBackendBuilder::from_vars(|name| std::env::var(name).ok())
    }

    /// A backend for a parent running in a pod: the default client (kubeconfig, then
    /// in-cluster), the pod read through `POD_NAME` and `POD_NAMESPACE`, and the documented
    /// defaults.
    ///
    /// # Errors
    /// As [`KubernetesBackendBuilder::build`].
    pub async fn from_env() -> Result<Self, KubernetesError> {
        Self::builder().build().await
    }

    fn new(
        api: KubeApi,
        template: PodTemplate,
        pod_ip: IpAddr,
        port: u16,
        unschedulable_grace: Duration,
    ) -> Self {
        let watch = watch::PodWatch::new(api.pods().clone(), template.own_selector());
        Self {
            inner: Arc::new(Inner {
                api,
                template,
                watch,
                pod_ip,
                port,
                unschedulable_grace,
            }),
        }
    }

    /// The namespace runner pods are made in: the parent pod's.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.inner.template.namespace
    }

    /// The image runner pods run.
    #[must_use]
    pub fn image(&self) -> &str {
        &self.inner.template.image
    }

    /// Deletes this pool's runner pods whose parent pod is gone, or that this parent pod left
    /// in an earlier incarnation (its container restarted), each with its own grace period
    /// (`drain_grace` and a margin), so that calls it is running may finish. Runs when a pool
    /// starts; call it again at will. Returns the names of the pods deleted; their Secrets go
    /// with them.
    ///
    /// # Errors
    /// The API error that stopped the sweep; pods deleted before it stay deleted.
    pub async fn reap_orphans(&self) -> Result<Vec<String>, KubernetesError> {
        let Inner { api, template, .. } = &*self.inner;
        let pods = api.list_pods(&template.pool_selector()).await?;
        let mut parents: std::collections::HashMap<String, bool> = Default::default();
        let mut reaped = Vec::new();
        for runner in &pods {
            let Some(name) = runner.metadata.name.clone() else {
                continue;
            };
            let parent_uid = pod::label(runner, labels::PARENT_UID).unwrap_or_default();
            let orphan = if parent_uid == template.parent.uid {
                pod::label(runner, labels::INCARNATION) != Some(template.incarnation.as_str())
            } else {
                let owner = runner
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .find(|o| o.kind == "Pod" && o.uid == parent_uid);
                match owner {
                    // Not made by a Firebrand parent as we know them: leave it alone.
                    None => false,
                    Some(owner) => {
                        let alive = match parents.get(&owner.uid) {
                            Some(alive) => *alive,
                            None => {
                                let found = api.get_pod(&owner.name).await?;
                                let alive = found.is_some_and(|p| {
                                    p.metadata.uid.as_deref() == Some(owner.uid.as_str())
                                });
                                parents.insert(owner.uid.clone(), alive);
                                alive
                            }
                        };
                        !alive
                    }
                }
            };
            if orphan {
                tracing::info!(pod = %name, parent_uid, "deleting an orphan runner pod");
                // With its own grace period: its runner drains the calls it is running, as a
                // runner that lost its parent does, rather than being cut off mid-job.
                api.delete_pod(&name, None).await?;
                reaped.push(name);
            }
        }
        Ok(reaped)
    }
}

impl Backend for KubernetesBackend {
    fn bind_addr(&self) -> SocketAddr {
        let any = match self.inner.pod_ip {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        SocketAddr::new(any, self.inner.port)
    }

    fn parent_addrs(&self, bound: SocketAddr) -> Vec<String> {
        vec![SocketAddr::new(self.inner.pod_ip, bound.port()).to_string()]
    }

    fn start(&self) -> BoxFuture<'_, ()> {
        Box::pin(super::sweep_at_start(
            "runner pods",
            "reap_orphans()",
            self.reap_orphans(),
        ))
    }

    fn boot(&self, request: BootRequest) -> BoxFuture<'_, Result<Box<dyn Machine>, BackendError>> {
        Box::pin(async move {
            let Inner {
                api,
                template,
                watch,
                unschedulable_grace,
                ..
            } = &*self.inner;
            let launch = uuid::Uuid::new_v4().simple().to_string();
            let spec = template.runner_pod(
                request.runner_id,
                &launch,
                &request.env,
                request.drain_grace,
            );
            let token = request
                .env
                .iter()
                .find(|(key, _)| key == PARENT_ENV)
                .map(|(_, value)| value.as_str())
                .unwrap_or_default();
            // Made before the create, so that a boot dropped at any point (a boot timeout)
            // deletes whatever the create made.
            let runner = machine::RunnerPod::new(
                api.clone(),
                Arc::clone(watch),
                template.pod_name(request.runner_id),
                template.image.clone(),
                *unschedulable_grace,
                template.parent.clone(),
            );
            // The machine is made once its pod and Secret are: the pool admits the runner when
            // it says hello, and the watch only brings the reasons it never will.
            let give_up = quota_deadline(request.boot_timeout);
            let made = async {
                let pod = api.create_pod(&spec, &launch, give_up).await?;
                api.create_secret(&template.runner_secret(&pod, token)?)
                    .await?;
                tracing::info!(pod = %runner.name, "created a runner pod");
                Ok::<_, KubernetesError>(())
            };
            match made.await {
                Ok(()) => Ok(Box::new(runner) as Box<dyn Machine>),
                Err(error) => {
                    tracing::warn!(pod = %runner.name, %error, "runner pod failed to boot; deleting it");
                    if let Err(e) = Box::new(runner).terminate(Duration::ZERO).await {
                        tracing::error!(error = %e, "cannot delete a runner pod that failed to boot");
                    }
                    Err(error.into())
                }
            }
        })
    }
}

/// How far before the pool's boot timeout a create refused by a namespace's quota stops
/// waiting for quota, so that the boot fails with the quota's message rather than a bare
/// timeout: at most this, and at most half the boot timeout.
const QUOTA_MARGIN: Duration = Duration::from_secs(2);

/// When a boot with `boot_timeout` stops waiting for quota.
fn quota_deadline(boot_timeout: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + boot_timeout.saturating_sub(QUOTA_MARGIN.min(boot_timeout / 2))
}

impl From<KubernetesError> for BackendError {
    fn from(error: KubernetesError) -> Self {
        BackendError::provider(error)
    }
}

impl ProviderError for KubernetesError {
    fn is_permanent(&self) -> bool {
        KubernetesError::is_permanent(self)
    }
}
