//! The settings of a [`KubernetesBackend`], read from the parent's own pod where they can be.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Toleration};

use super::api::KubeApi;
use super::pod::{labels, ParentPod, PodTemplate};
use super::{KubernetesBackend, KubernetesError};

/// The GPU resource runner pods ask for by default: NVIDIA's device plugin's.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";
/// The name of the runner's container in its pod.
pub const DEFAULT_CONTAINER_NAME: &str = "runner";
/// The pool name runner pods are labelled with, unless set.
pub const DEFAULT_POOL_NAME: &str = crate::backend::runner_spec::DEFAULT_POOL_NAME;
/// The annotation that names a pod's main container, as `kubectl logs` and `exec` read it.
const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";
/// Where a pod finds its own namespace when `POD_NAMESPACE` is not set.
const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

use crate::backend::runner_spec::{is_label_value, CheckedSpec, RunnerSpec};

/// Builds a [`KubernetesBackend`]. [`KubernetesBackend::builder`] starts from the downward-API
/// variables a pod is given (`POD_NAME`, `POD_NAMESPACE`, `POD_IP`); [`build`](Self::build)
/// then reads the parent's own pod for the rest: its uid, its image (pinned by digest), its
/// command, service account and image pull secrets. Each setter overrides one of them.
///
/// ```no_run
/// use firebrand::backend::kubernetes::KubernetesBackend;
///
/// # async fn run() -> Result<(), firebrand::backend::kubernetes::KubernetesError> {
/// let backend = KubernetesBackend::builder()
///     .cpu("4")
///     .memory("16Gi")
///     .gpus(1)
///     .node_selector("cloud.google.com/gke-accelerator", "nvidia-l4")
///     .forward_env(["DATABASE_URL"])
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct KubernetesBackendBuilder {
    runner: RunnerSpec,
    client: Option<kube::Client>,
    kubeconfig: Option<PathBuf>,
    namespace: Option<String>,
    pod_name: Option<String>,
    pod_ip: Option<String>,
    parent_container: Option<String>,
    image: Option<String>,
    command: Option<Vec<String>>,
    args: Option<Vec<String>>,
    container_name: String,
    service_account: Option<String>,
    api_token: bool,
    cpu: Option<String>,
    memory: Option<String>,
    gpus: u32,
    gpu_resource: String,
    node_selector: BTreeMap<String, String>,
    tolerations: Vec<Toleration>,
    priority_class: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    edit: Option<super::pod::PodEdit>,
    unschedulable_grace: Duration,
}

impl std::fmt::Debug for KubernetesBackendBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesBackendBuilder")
            .field("namespace", &self.namespace)
            .field("pod_name", &self.pod_name)
            .field("image", &self.image)
            .field("cpu", &self.cpu)
            .field("memory", &self.memory)
            .field("gpus", &self.gpus)
            .field("gpu_resource", &self.gpu_resource)
            .field("env", &self.runner.env.keys().collect::<Vec<_>>())
            .field("pool_name", &self.runner.pool_name)
            .finish_non_exhaustive()
    }
}

impl KubernetesBackendBuilder {
    /// A builder that reads `POD_NAME`, `POD_NAMESPACE`, `POD_IP` and forwarded variables
    /// through `lookup` instead of the process environment: for tests, and for configuration
    /// from elsewhere.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        Self {
            runner: RunnerSpec::new(Arc::new(lookup)),
            client: None,
            kubeconfig: None,
            namespace: None,
            pod_name: None,
            pod_ip: None,
            parent_container: None,
            image: None,
            command: None,
            args: None,
            container_name: DEFAULT_CONTAINER_NAME.into(),
            service_account: None,
            api_token: false,
            cpu: None,
            memory: None,
            gpus: 0,
            gpu_resource: DEFAULT_GPU_RESOURCE.into(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            priority_class: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            edit: None,
            unschedulable_grace: Duration::ZERO,
        }
    }

    /// The client to use. Default: kube-rs's `Client::try_default()`, which reads a kubeconfig
    /// (`KUBECONFIG`, `~/.kube/config`) first, then the in-cluster config of a pod.
    pub fn client(mut self, client: kube::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// A kubeconfig file to make the client from, with its current context, instead of the
    /// default lookup.
    pub fn kubeconfig(mut self, path: impl Into<PathBuf>) -> Self {
        self.kubeconfig = Some(path.into());
        self
    }

    /// The parent pod's namespace, where runner pods are made (an owner reference cannot
    /// cross namespaces). Default: `POD_NAMESPACE`, then the pod's service-account namespace
    /// file, then the client's default namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The parent pod's name. Default: `POD_NAME`, then `HOSTNAME` (a pod's hostname is its
    /// name unless its spec says otherwise).
    pub fn pod_name(mut self, name: impl Into<String>) -> Self {
        self.pod_name = Some(name.into());
        self
    }

    /// The IP runners dial. Default: `POD_IP`, then the parent pod's `status.podIP`.
    pub fn pod_ip(mut self, ip: impl Into<String>) -> Self {
        self.pod_ip = Some(ip.into());
        self
    }

    /// Which of the parent pod's containers is the app, whose image, command, args and
    /// `securityContext` runners get. Default: the one the pod's
    /// `kubectl.kubernetes.io/default-container` annotation names (a pod with a service mesh's
    /// sidecar), else the first.
    pub fn parent_container(mut self, name: impl Into<String>) -> Self {
        self.parent_container = Some(name.into());
        self
    }

    /// The runner image. Default: the parent container's, pinned to the digest in its status
    /// (`imageID`) where it has one, so that runners run exactly the parent's build even when
    /// its tag moves.
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// The runner container's `command`. Default: the parent container's.
    pub fn command<S: Into<String>>(mut self, command: impl IntoIterator<Item = S>) -> Self {
        self.command = Some(command.into_iter().map(Into::into).collect());
        self
    }

    /// The runner container's `args`. Default: the parent container's.
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// The runner's container name in its pod. Default: [`DEFAULT_CONTAINER_NAME`].
    pub fn container_name(mut self, name: impl Into<String>) -> Self {
        self.container_name = name.into();
        self
    }

    /// The runner pods' service account. Default: the parent pod's, so that runners reach
    /// what the app reaches (a cloud's workload identity included).
    pub fn service_account(mut self, name: impl Into<String>) -> Self {
        self.service_account = Some(name.into());
        self
    }

    /// Whether runner pods get their service account's Kubernetes API token mounted. Default:
    /// false: the parent's account may create and delete pods, and a job needs none of that.
    /// Cloud workload identity (GKE, EKS, AKS) does not come through this token and works
    /// either way; turn it on for jobs that call the Kubernetes API themselves.
    pub fn api_token(mut self, mounted: bool) -> Self {
        self.api_token = mounted;
        self
    }

    /// The CPU each runner pod requests (a quantity: `"2"`, `"500m"`). Default: none set, the
    /// namespace's default. CPU gets no limit: throttling a job helps nobody.
    pub fn cpu(mut self, cpu: impl Into<String>) -> Self {
        self.cpu = Some(cpu.into());
        self
    }

    /// The memory each runner pod requests and is limited to (`"4Gi"`). Default: none set.
    pub fn memory(mut self, memory: impl Into<String>) -> Self {
        self.memory = Some(memory.into());
        self
    }

    /// GPUs per runner pod, as a limit on the GPU resource (`nvidia.com/gpu` unless
    /// [`gpu_resource`](Self::gpu_resource) says otherwise). The device plugin gives each pod
    /// its own, never shared. Default: 0.
    pub fn gpus(mut self, gpus: u32) -> Self {
        self.gpus = gpus;
        self
    }

    /// The extended resource GPUs are asked for as: `amd.com/gpu`, `gpu.intel.com/i915`.
    /// Default: [`DEFAULT_GPU_RESOURCE`].
    pub fn gpu_resource(mut self, resource: impl Into<String>) -> Self {
        self.gpu_resource = resource.into();
        self
    }

    /// Adds a node selector label that runner pods' nodes must carry (a GPU type, a pool).
    pub fn node_selector(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.node_selector.insert(key.into(), value.into());
        self
    }

    /// Adds a toleration to runner pods, for tainted nodes such as GPU node pools.
    pub fn toleration(mut self, toleration: Toleration) -> Self {
        self.tolerations.push(toleration);
        self
    }

    /// The runner pods' priority class.
    pub fn priority_class(mut self, name: impl Into<String>) -> Self {
        self.priority_class = Some(name.into());
        self
    }

    /// Adds a label to runner pods. Keys under `firebrand.dev/` and
    /// `app.kubernetes.io/managed-by` are the backend's own.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Adds an annotation to runner pods.
    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Edits each runner pod before it is created: the escape hatch for what no setter covers
    /// (volumes, affinity, security context, sidecars). The backend's labels and
    /// `restartPolicy: Never` are set again afterwards; the rest is yours.
    pub fn edit_pod(mut self, edit: impl Fn(&mut Pod) + Send + Sync + 'static) -> Self {
        self.edit = Some(Arc::new(edit));
        self
    }

    crate::backend::runner_spec::runner_spec_setters! {
        forward_env: "A forwarded value is written into the pod spec: forward no secret; give \
            runners secrets through the pod (an [`edit_pod`](Self::edit_pod) that adds an \
            `envFrom`) instead.",
        pool_name: "It is in runner pods' names and labels: parents that share a namespace \
            and a name sweep each other's orphans.",
        incarnation: "The start-up sweep deletes the runner pods of this parent pod's other \
            incarnations, so that a restarted container sweeps its predecessor's runners.",
        port: "It is bound on the pod IP; set one where a NetworkPolicy must name it.",
    }

    /// How long a runner pod that no node can take may wait for one (a cluster autoscaler
    /// adding a node), within the pool's boot timeout. Default: zero, the boot fails at once
    /// with the scheduler's message.
    pub fn unschedulable_grace(mut self, grace: Duration) -> Self {
        self.unschedulable_grace = grace;
        self
    }

    /// Checks the settings, makes the client and reads the parent pod.
    ///
    /// # Errors
    /// [`KubernetesError::Config`] naming the first missing or invalid setting,
    /// [`KubernetesError::Client`] when no client can be made, and the API's error when the
    /// parent pod cannot be read.
    pub async fn build(self) -> Result<KubernetesBackend, KubernetesError> {
        let runner = self.check()?;
        let var = |name: &str| self.runner.var(name);
        let client = match (&self.client, &self.kubeconfig) {
            (Some(client), _) => client.clone(),
            (None, Some(path)) => {
                let config = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| KubernetesError::Client(format!("{}: {e}", path.display())))?;
                let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
                    .await
                    .map_err(|e| KubernetesError::Client(format!("{}: {e}", path.display())))?;
                kube::Client::try_from(config)
                    .map_err(|e| KubernetesError::Client(e.to_string()))?
            }
            (None, None) => kube::Client::try_default()
                .await
                .map_err(|e| KubernetesError::Client(e.to_string()))?,
        };
        let namespace = self
            .namespace
            .clone()
            .or_else(|| var("POD_NAMESPACE"))
            .or_else(|| {
                std::fs::read_to_string(NAMESPACE_FILE)
                    .ok()
                    .map(|n| n.trim().to_owned())
            })
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let pod_name = self
            .pod_name
            .clone()
            .or_else(|| var("POD_NAME"))
            .or_else(|| var("HOSTNAME"))
            .ok_or_else(|| {
                config("the parent pod's name is unknown: set POD_NAME through the downward API, or call .pod_name()")
            })?;
        let api = KubeApi::new(client, &namespace);
        let parent = api.get_pod(&pod_name).await?.ok_or_else(|| {
            config(format!(
                "parent pod `{pod_name}` not found in namespace `{namespace}`: a KubernetesBackend runs in a pod (see docs/kubernetes.md)"
            ))
        })?;
        let uid = parent
            .metadata
            .uid
            .clone()
            .ok_or_else(|| config("the parent pod has no uid"))?;
        let spec = parent.spec.clone().unwrap_or_default();
        // A pod with sidecars (a service mesh's proxy) names its main container, as kubectl
        // reads it; without the annotation the app is the first container.
        let default_container = parent
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DEFAULT_CONTAINER_ANNOTATION));
        let container = match self.parent_container.as_ref().or(default_container) {
            Some(name) => spec
                .containers
                .iter()
                .find(|c| &c.name == name)
                .ok_or_else(|| config(format!("the parent pod has no container `{name}`")))?,
            None => spec
                .containers
                .first()
                .ok_or_else(|| config("the parent pod has no container"))?,
        };
        let image = match &self.image {
            Some(image) => image.clone(),
            None => pinned_image(&parent, &container.name)
                .or_else(|| container.image.clone())
                .ok_or_else(|| config("the parent container has no image: call .image()"))?,
        };
        let pod_ip = self
            .pod_ip
            .clone()
            .or_else(|| var("POD_IP"))
            .or_else(|| parent.status.as_ref().and_then(|s| s.pod_ip.clone()))
            .ok_or_else(|| config("the parent pod has no IP yet: set POD_IP, or call .pod_ip()"))?;
        let pod_ip: IpAddr = pod_ip
            .parse()
            .map_err(|_| config(format!("pod IP `{pod_ip}` is not an IP address")))?;
        let template = PodTemplate {
            namespace: namespace.clone(),
            parent: ParentPod {
                name: pod_name,
                uid,
            },
            pool_name: runner.pool_name,
            incarnation: runner.incarnation,
            image,
            command: self.command.or_else(|| container.command.clone()),
            args: self.args.or_else(|| container.args.clone()),
            container_name: self.container_name,
            service_account: self
                .service_account
                .or_else(|| spec.service_account_name.clone()),
            api_token: self.api_token,
            image_pull_secrets: spec
                .image_pull_secrets
                .iter()
                .flatten()
                .map(|s| s.name.clone())
                .collect(),
            pod_security: spec.security_context.clone(),
            container_security: container.security_context.clone(),
            env: runner.env,
            cpu: self.cpu,
            memory: self.memory,
            gpus: self.gpus,
            gpu_resource: self.gpu_resource,
            node_selector: self.node_selector,
            tolerations: self.tolerations,
            priority_class: self.priority_class,
            labels: self.labels,
            annotations: self.annotations,
            edit: self.edit,
        };
        Ok(KubernetesBackend::new(
            api,
            template,
            pod_ip,
            runner.port,
            self.unschedulable_grace,
        ))
    }

    /// Checks the settings that need no API request; the runners' env on success.
    fn check(&self) -> Result<CheckedSpec, KubernetesError> {
        let runner = self.runner.check().map_err(config)?;
        for key in self.labels.keys() {
            if key.starts_with("firebrand.dev/") || key == labels::MANAGED_BY {
                return Err(config(format!("label `{key}` is reserved")));
            }
        }
        for (key, value) in &self.labels {
            if !is_label_value(value) && !value.is_empty() {
                return Err(config(format!(
                    "label `{key}`: `{value}` is not a valid label value"
                )));
            }
        }
        if !self.gpu_resource.contains('/') {
            return Err(config(format!(
                "GPU resource `{}` is not an extended resource name such as nvidia.com/gpu",
                self.gpu_resource
            )));
        }
        if self.unschedulable_grace > crate::settings::MAX_SETTING_DURATION {
            return Err(config(format!(
                "unschedulable_grace {:?} is more than the {:?} any setting may be",
                self.unschedulable_grace,
                crate::settings::MAX_SETTING_DURATION
            )));
        }
        Ok(runner)
    }
}

/// The parent container's image pinned by digest: `repo@sha256:...` from its status's
/// `imageID` (which runtimes write as `repo@sha256:...`, `docker-pullable://repo@sha256:...`,
/// or a bare `sha256:...` for a local image, which pins nothing pullable).
fn pinned_image(pod: &Pod, container: &str) -> Option<String> {
    let status = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == container)?;
    let id = status.image_id.trim_start_matches("docker-pullable://");
    let (_, digest) = id.split_once("@sha256:")?;
    let spec_image = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == container)?
        .image
        .clone()?;
    let repository = spec_image.split('@').next().unwrap_or(&spec_image);
    let repository = match repository.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => repository,
    };
    Some(format!("{repository}@sha256:{digest}"))
}

fn config(message: impl Into<String>) -> KubernetesError {
    KubernetesError::Config(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::PARENT_ENV;

    #[test]
    fn the_image_is_pinned_to_the_running_digest() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "app-0"},
            "spec": {"containers": [{"name": "app", "image": "registry.example.com:5000/team/app:v3"}]},
            "status": {"containerStatuses": [{
                "name": "app", "image": "registry.example.com:5000/team/app:v3",
                "imageID": "docker-pullable://registry.example.com:5000/team/app@sha256:0f3c",
                "ready": true, "restartCount": 0,
            }]},
        }))
        .unwrap();
        assert_eq!(
            pinned_image(&pod, "app").as_deref(),
            Some("registry.example.com:5000/team/app@sha256:0f3c")
        );
        assert_eq!(pinned_image(&pod, "other"), None);
    }

    #[test]
    fn bad_settings_are_named() {
        let builder = || KubernetesBackendBuilder::from_vars(|_| None);
        for (builder, expected) in [
            (builder().pool_name("Web_Pool"), "pool name"),
            (builder().label("firebrand.dev/pool", "x"), "reserved"),
            (builder().env(PARENT_ENV, "x"), "cannot be set"),
            (builder().gpu_resource("gpu"), "extended resource"),
        ] {
            let error = builder.check().unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
    }
}
