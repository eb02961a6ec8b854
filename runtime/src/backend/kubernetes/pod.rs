//! The runner pod and its credential's Secret as they are created, and what a pod's status
//! says about its runner.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, LocalObjectReference, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, Secret, SecretKeySelector, SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;

use super::KubernetesError;
use crate::error::RunnerId;
use crate::token::PARENT_ENV;

/// The labels every runner pod (and its Secret) carries. Values are at most 63 characters.
pub mod labels {
    /// `firebrand`, on everything the backend creates.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// The pool's name ([`pool_name`](super::super::KubernetesBackendBuilder::pool_name)).
    pub const POOL: &str = "firebrand.dev/pool";
    /// The uid of the parent pod.
    pub const PARENT_UID: &str = "firebrand.dev/parent-uid";
    /// The parent process's incarnation: a container restart keeps the pod's uid, not this.
    pub const INCARNATION: &str = "firebrand.dev/incarnation";
    /// One id per boot, to find what a create made when its answer was lost.
    pub const LAUNCH: &str = "firebrand.dev/launch";
    /// The runner's id.
    pub const RUNNER: &str = "firebrand.dev/runner";
}

/// The key of the runner's boot token in its Secret.
const TOKEN_KEY: &str = "boot-token";

/// Added to the drain grace for a pod's `terminationGracePeriodSeconds`: the runner exits
/// after its drain grace, and needs a moment to close its connection and flush its logs.
pub const TERMINATION_MARGIN: Duration = Duration::from_secs(5);

/// An edit to each runner pod before it is created.
pub(crate) type PodEdit = Arc<dyn Fn(&mut Pod) + Send + Sync>;

/// The parent pod, as the runner pods refer to it.
#[derive(Debug, Clone)]
pub(crate) struct ParentPod {
    pub name: String,
    pub uid: String,
}

/// Everything a runner pod is made from.
pub(crate) struct PodTemplate {
    pub namespace: String,
    pub parent: ParentPod,
    pub pool_name: String,
    pub incarnation: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    pub container_name: String,
    pub service_account: Option<String>,
    pub api_token: bool,
    pub image_pull_secrets: Vec<String>,
    /// The parent pod's `securityContext`, copied so that a namespace's Pod Security level that
    /// admits the parent admits its runners.
    pub pod_security: Option<PodSecurityContext>,
    /// The parent container's `securityContext`, for the same reason.
    pub container_security: Option<SecurityContext>,
    pub env: BTreeMap<String, String>,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub gpus: u32,
    pub gpu_resource: String,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub priority_class: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub edit: Option<PodEdit>,
}

impl PodTemplate {
    /// The selector of every runner pod of this pool, whatever its parent.
    pub(crate) fn pool_selector(&self) -> String {
        format!(
            "{}=firebrand,{}={}",
            labels::MANAGED_BY,
            labels::POOL,
            self.pool_name
        )
    }

    /// The selector of this parent process's runner pods: the ones its watch follows.
    pub(crate) fn own_selector(&self) -> String {
        format!(
            "{},{}={},{}={}",
            self.pool_selector(),
            labels::PARENT_UID,
            self.parent.uid,
            labels::INCARNATION,
            self.incarnation
        )
    }

    fn labels(&self, runner: RunnerId, launch: &str) -> BTreeMap<String, String> {
        let mut all = self.labels.clone();
        for (key, value) in [
            (labels::MANAGED_BY, "firebrand".to_owned()),
            (labels::POOL, self.pool_name.clone()),
            (labels::PARENT_UID, self.parent.uid.clone()),
            (labels::INCARNATION, self.incarnation.clone()),
            (labels::LAUNCH, launch.to_owned()),
            (labels::RUNNER, runner.0.simple().to_string()),
        ] {
            all.insert(key.to_owned(), value);
        }
        all
    }

    /// The name of runner `runner`'s pod, and of its Secret.
    pub(crate) fn pod_name(&self, runner: RunnerId) -> String {
        format!(
            "{}-runner-{}",
            self.pool_name,
            &runner.0.simple().to_string()[..12]
        )
    }

    /// The runner pod: in the parent's namespace, owned by the parent pod, never restarted,
    /// its boot token read from its Secret. Env holds no secret.
    pub(crate) fn runner_pod(
        &self,
        runner: RunnerId,
        launch: &str,
        runner_env: &[(String, String)],
        drain_grace: Duration,
    ) -> Pod {
        let name = self.pod_name(runner);
        let mut env: Vec<EnvVar> = self
            .env
            .iter()
            .map(|(name, value)| EnvVar {
                name: name.clone(),
                value: Some(value.clone()),
                ..EnvVar::default()
            })
            .collect();
        for (key, value) in runner_env {
            let var = if key == PARENT_ENV {
                // The boot token holds the runner's private key: it goes in a Secret, where
                // reading it takes `get secrets`, not in the pod spec anyone who may `get
                // pods` reads.
                EnvVar {
                    name: key.clone(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: name.clone(),
                            key: TOKEN_KEY.into(),
                            optional: Some(false),
                        }),
                        ..EnvVarSource::default()
                    }),
                    ..EnvVar::default()
                }
            } else {
                EnvVar {
                    name: key.clone(),
                    value: Some(value.clone()),
                    ..EnvVar::default()
                }
            };
            env.retain(|v| v.name != var.name);
            env.push(var);
        }
        let mut limits = BTreeMap::new();
        let mut requests = BTreeMap::new();
        if let Some(cpu) = &self.cpu {
            requests.insert("cpu".to_owned(), Quantity(cpu.clone()));
        }
        if let Some(memory) = &self.memory {
            // Memory is not compressible: the limit is the request, so that a runner is
            // OOM-killed at what it was promised rather than evicted at random.
            requests.insert("memory".to_owned(), Quantity(memory.clone()));
            limits.insert("memory".to_owned(), Quantity(memory.clone()));
        }
        if self.gpus > 0 {
            // Extended resources are set as limits only; the request defaults to it.
            limits.insert(self.gpu_resource.clone(), Quantity(self.gpus.to_string()));
        }
        let resources = ResourceRequirements {
            limits: (!limits.is_empty()).then_some(limits),
            requests: (!requests.is_empty()).then_some(requests),
            ..ResourceRequirements::default()
        };
        let grace = drain_grace.saturating_add(TERMINATION_MARGIN);
        let mut pod = Pod {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(self.namespace.clone()),
                labels: Some(self.labels(runner, launch)),
                annotations: (!self.annotations.is_empty()).then(|| self.annotations.clone()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Pod".into(),
                    name: self.parent.name.clone(),
                    uid: self.parent.uid.clone(),
                    ..OwnerReference::default()
                }]),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                restart_policy: Some("Never".into()),
                termination_grace_period_seconds: Some(
                    i64::try_from(whole_seconds(grace)).unwrap_or(i64::MAX),
                ),
                service_account_name: self.service_account.clone(),
                // The parent's account may create and delete pods: a runner gets none of that
                // unless asked for. (Cloud workload identity comes through its own projected
                // token or the metadata server, not this one.)
                automount_service_account_token: Some(self.api_token),
                image_pull_secrets: (!self.image_pull_secrets.is_empty()).then(|| {
                    self.image_pull_secrets
                        .iter()
                        .map(|name| LocalObjectReference { name: name.clone() })
                        .collect()
                }),
                node_selector: (!self.node_selector.is_empty()).then(|| self.node_selector.clone()),
                tolerations: (!self.tolerations.is_empty()).then(|| self.tolerations.clone()),
                priority_class_name: self.priority_class.clone(),
                security_context: self.pod_security.clone(),
                // Service links put every Service of the namespace in the env; a runner needs
                // none of them.
                enable_service_links: Some(false),
                containers: vec![Container {
                    name: self.container_name.clone(),
                    image: Some(self.image.clone()),
                    command: self.command.clone(),
                    args: self.args.clone(),
                    env: Some(env),
                    resources: Some(resources),
                    security_context: self.container_security.clone(),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: None,
        };
        if let Some(edit) = &self.edit {
            edit(&mut pod);
            // What the backend relies on cannot be edited away: the labels its sweep and
            // watch select by, and a pod that is never restarted.
            let ours = self.labels(runner, launch);
            pod.metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .extend(ours);
            if let Some(spec) = &mut pod.spec {
                spec.restart_policy = Some("Never".into());
            }
        }
        pod
    }

    /// The Secret that holds runner `pod`'s boot token, owned by the pod so that it goes with
    /// it: deleted by the garbage collector when the pod is, whoever deletes the pod.
    pub(crate) fn runner_secret(&self, pod: &Pod, token: &str) -> Result<Secret, KubernetesError> {
        let owner = kube::Resource::owner_ref(pod, &()).ok_or_else(|| {
            KubernetesError::Config("the API server returned a pod without a name or uid".into())
        })?;
        Ok(Secret {
            metadata: ObjectMeta {
                name: pod.metadata.name.clone(),
                namespace: Some(self.namespace.clone()),
                labels: pod.metadata.labels.clone(),
                owner_references: Some(vec![owner]),
                ..ObjectMeta::default()
            },
            immutable: Some(true),
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                TOKEN_KEY.to_owned(),
                ByteString(token.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        })
    }
}

/// `duration` in whole seconds, rounded up, as Kubernetes takes grace periods: a grace is never
/// cut short by its rounding.
pub(crate) fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// The launch id a pod was created with.
pub(crate) fn launch_of(pod: &Pod) -> Option<&str> {
    label(pod, labels::LAUNCH)
}

pub(crate) fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

/// Where a runner pod is, as its status says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Not running yet, for no reason that says it never will.
    Waiting,
    /// Its container runs.
    Running,
    /// No node can take it: the scheduler's message.
    Unschedulable(String),
    /// Its image cannot be pulled: the reason and message.
    ImagePull(String, String),
    /// Its container cannot be created: the reason and message.
    Container(String, String),
    /// Its container ended: the exit code, and how it is described.
    Ended(Option<i32>, String),
}

/// Reads `pod`'s status.
pub(crate) fn progress(pod: &Pod) -> Progress {
    let Some(status) = &pod.status else {
        return Progress::Waiting;
    };
    let container = status
        .container_statuses
        .as_ref()
        .and_then(|statuses| statuses.first());
    if let Some(state) = container.and_then(|c| c.state.as_ref()) {
        if let Some(terminated) = &state.terminated {
            let reason = terminated.reason.as_deref().unwrap_or("Error");
            let mut description = format!("exit code {} ({reason})", terminated.exit_code);
            if let Some(message) = terminated.message.as_deref().filter(|m| !m.is_empty()) {
                description.push_str(": ");
                description.push_str(message);
            }
            return Progress::Ended(Some(terminated.exit_code), description);
        }
        if state.running.is_some() {
            return Progress::Running;
        }
        if let Some(waiting) = &state.waiting {
            let reason = waiting.reason.clone().unwrap_or_default();
            let message = waiting.message.clone().unwrap_or_default();
            match reason.as_str() {
                "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => {
                    return Progress::ImagePull(reason, message)
                }
                "CreateContainerConfigError"
                | "CreateContainerError"
                | "CrashLoopBackOff"
                | "RunContainerError" => return Progress::Container(reason, message),
                _ => {}
            }
        }
    }
    match status.phase.as_deref() {
        Some("Succeeded" | "Failed") => {
            let reason = status.reason.as_deref().unwrap_or("ended");
            let message = status.message.as_deref().unwrap_or_default();
            return Progress::Ended(None, format!("{reason} {message}").trim().to_owned());
        }
        Some("Running") => return Progress::Running,
        _ => {}
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(condition) = unschedulable {
        return Progress::Unschedulable(condition.message.clone().unwrap_or_default());
    }
    Progress::Waiting
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn template() -> PodTemplate {
        PodTemplate {
            namespace: "ml".into(),
            parent: ParentPod {
                name: "app-7d9f".into(),
                uid: "2f1c7a55-8f1e-4a0e-9d43-0c7f6a1b2c3d".into(),
            },
            pool_name: "firebrand".into(),
            incarnation: "0123456789abcdef0123456789abcdef".into(),
            image: "registry.example.com/app@sha256:abc".into(),
            command: Some(vec!["/app/server".into()]),
            args: None,
            container_name: "runner".into(),
            service_account: Some("app".into()),
            api_token: false,
            image_pull_secrets: vec!["registry".into()],
            pod_security: None,
            container_security: None,
            env: BTreeMap::from([("RUST_LOG".into(), "info".into())]),
            cpu: Some("2".into()),
            memory: Some("4Gi".into()),
            gpus: 1,
            gpu_resource: "nvidia.com/gpu".into(),
            node_selector: BTreeMap::from([("gpu".into(), "h100".into())]),
            tolerations: vec![],
            priority_class: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            edit: None,
        }
    }

    #[test]
    fn the_boot_token_is_not_in_the_pod_spec() {
        let template = template();
        let runner = RunnerId(uuid::Uuid::nil());
        let env = [(PARENT_ENV.to_owned(), "fb1.PRIVATE-KEY".to_owned())];
        let pod = template.runner_pod(runner, "launch", &env, Duration::from_secs(30));
        let text = serde_json::to_string(&pod).unwrap();
        assert!(!text.contains("PRIVATE-KEY"), "{text}");
        assert!(text.contains("secretKeyRef"), "{text}");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.termination_grace_period_seconds, Some(35));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let limits = spec.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap();
        assert_eq!(limits["nvidia.com/gpu"], Quantity("1".into()));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.uid, template.parent.uid);
        assert!(template.pod_name(runner).len() <= 63);
    }
}
