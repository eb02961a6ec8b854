//! What can go wrong creating and watching runner pods.

/// An error from the Kubernetes backend: a setting, the API server's answer, or the reason a
/// runner pod could not run, as the cluster gave it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubernetesError {
    /// A missing or invalid setting.
    #[error("invalid Kubernetes backend configuration: {0}")]
    Config(String),
    /// No client could be made: no kubeconfig and not in a pod, or a config that does not load.
    #[error("cannot make a Kubernetes client: {0}")]
    Client(String),
    /// RBAC refused a request: the parent's service account needs a Role that allows `verb`
    /// on `resource` (see `docs/kubernetes.md`).
    #[error(
        "RBAC denied `{verb}` on `{resource}` in namespace `{namespace}`; grant it in the parent's \
         Role (docs/kubernetes.md): {message}"
    )]
    Forbidden {
        /// The verb denied: `create`, `get`, `list`, `watch`, `delete`.
        verb: &'static str,
        /// The resource: `pods` or `secrets`.
        resource: &'static str,
        /// The namespace of the request.
        namespace: String,
        /// The API server's message.
        message: String,
    },
    /// The namespace's Pod Security admission refused the runner pod: the namespace enforces a
    /// level (`pod-security.kubernetes.io/enforce`) that the pod does not meet. Runner pods
    /// copy the parent pod's `securityContext` and its container's, so a parent that meets the
    /// level gives runners that do.
    #[error(
        "Pod Security admission in namespace `{namespace}` refused the runner pod; runner pods \
         copy the parent pod's and container's securityContext, so make the parent meet the \
         namespace's enforced level, or set one with edit_pod (docs/kubernetes.md): {message}"
    )]
    PodSecurity {
        /// The namespace of the request.
        namespace: String,
        /// The API server's message, naming the level and each violation.
        message: String,
    },
    /// A ResourceQuota of the namespace had no room for the runner's pod or Secret, and none
    /// freed up before the boot timeout. Not permanent: quota frees up as pods end.
    #[error(
        "a ResourceQuota in namespace `{namespace}` has no room for the runner's {resource} \
         (waited up to the boot timeout); raise the quota, or lower the pool's max to fit it: \
         {message}"
    )]
    QuotaExceeded {
        /// The resource refused: `pods` or `secrets`.
        resource: &'static str,
        /// The namespace of the request.
        namespace: String,
        /// The API server's message, naming the quota and its use.
        message: String,
    },
    /// The API server refused an object as invalid (422), with its message.
    #[error("the API server refused the {resource} as invalid: {message}")]
    Invalid {
        /// The resource: `pods` or `secrets`.
        resource: &'static str,
        /// The API server's message, naming the field.
        message: String,
    },
    /// Any other error answer from the API server, after retries where it is transient.
    #[error("`{verb}` on `{resource}` failed: {code} {reason}: {message}")]
    Api {
        /// The verb of the request.
        verb: &'static str,
        /// The resource of the request.
        resource: &'static str,
        /// The HTTP status.
        code: u16,
        /// The `Status` reason: `TooManyRequests`, `InternalError`, ...
        reason: String,
        /// The API server's message.
        message: String,
    },
    /// The request did not get an answer: a connection refused or cut, a timeout.
    #[error("`{verb}` on `{resource}` got no answer from the API server: {source}")]
    Unreachable {
        /// The verb of the request.
        verb: &'static str,
        /// The resource of the request.
        resource: &'static str,
        /// What kube-rs reported.
        #[source]
        source: Box<kube::Error>,
    },
    /// No node can take the runner pod: the scheduler's message says why (no node with a free
    /// GPU, a node selector nothing matches, a taint it does not tolerate).
    #[error("runner pod {pod} is unschedulable: {message}")]
    Unschedulable {
        /// The pod.
        pod: String,
        /// The scheduler's message, such as `0/3 nodes are available: 3 Insufficient
        /// nvidia.com/gpu.`
        message: String,
    },
    /// The runner image cannot be pulled.
    #[error("runner pod {pod} cannot pull image {image}: {reason}: {message}")]
    ImagePull {
        /// The pod.
        pod: String,
        /// The image.
        image: String,
        /// `ErrImagePull`, `ImagePullBackOff`, `InvalidImageName`, ...
        reason: String,
        /// The kubelet's message.
        message: String,
    },
    /// The kubelet cannot create the container from its spec (a missing secret or key, a bad
    /// volume), with its reason and message.
    #[error("runner pod {pod} cannot start its container: {reason}: {message}")]
    Container {
        /// The pod.
        pod: String,
        /// `CreateContainerConfigError`, `CreateContainerError`, `CrashLoopBackOff`, ...
        reason: String,
        /// The kubelet's message.
        message: String,
    },
    /// The runner's container ended before it ever dialled its parent.
    #[error("runner pod {pod} ended while booting: {exit}")]
    Ended {
        /// The pod.
        pod: String,
        /// How: `exit code 3 (Error)`, `exit code 137 (OOMKilled)`.
        exit: String,
    },
    /// The runner pod was deleted while it booted because its parent pod is gone: Kubernetes'
    /// garbage collector takes every pod the parent makes. Permanent: the pool boots no more.
    #[error(
        "runner pod {pod} was deleted while it booted: its parent pod {parent} is gone, and \
         the garbage collector takes every runner pod it owns; this parent's container is \
         being stopped"
    )]
    ParentGone {
        /// The pod.
        pod: String,
        /// The parent pod's name.
        parent: String,
    },
    /// The runner pod was deleted while it booted, by someone other than this backend.
    #[error("runner pod {pod} was deleted while it booted")]
    Deleted {
        /// The pod.
        pod: String,
    },
}

impl KubernetesError {
    /// Whether another boot would fail the same way, so that the pool stops retrying until new
    /// demand: configuration, RBAC, Pod Security, an invalid pod, an unschedulable pod, an
    /// image that cannot be pulled, a container that cannot be created, expired or wrong
    /// credentials (401), and other refusals (403 from an admission webhook or policy). A full
    /// quota is not: it frees up as pods end.
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        match self {
            KubernetesError::Config(_)
            | KubernetesError::Client(_)
            | KubernetesError::Forbidden { .. }
            | KubernetesError::PodSecurity { .. }
            | KubernetesError::Invalid { .. }
            | KubernetesError::Unschedulable { .. }
            | KubernetesError::ImagePull { .. }
            | KubernetesError::Container { .. }
            | KubernetesError::ParentGone { .. } => true,
            // 401: expired or wrong credentials; 403 from neither RBAC, Pod Security nor quota:
            // an admission webhook or policy, which refuses the next pod the same way.
            KubernetesError::Api { code, .. } => matches!(code, 401 | 403),
            KubernetesError::QuotaExceeded { .. }
            | KubernetesError::Unreachable { .. }
            | KubernetesError::Ended { .. }
            | KubernetesError::Deleted { .. } => false,
        }
    }

    /// Whether a retry may succeed where this failed: an answer of 500 or 502, or none at all.
    /// (429, 503 and 504 are retried inside the client, honouring `Retry-After`.)
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            KubernetesError::Api { code, .. } => matches!(code, 500 | 502),
            KubernetesError::Unreachable { .. } => true,
            _ => false,
        }
    }

    /// Maps what kube-rs returned for `verb` on `resource` in `namespace`.
    pub(crate) fn from_kube(
        verb: &'static str,
        resource: &'static str,
        namespace: &str,
        error: kube::Error,
    ) -> Self {
        match error {
            kube::Error::Api(status) => match status.code {
                403 => Self::from_forbidden(verb, resource, namespace, status.message),
                422 => KubernetesError::Invalid {
                    resource,
                    message: status.message,
                },
                code => KubernetesError::Api {
                    verb,
                    resource,
                    code,
                    reason: status.reason,
                    message: status.message,
                },
            },
            other => KubernetesError::Unreachable {
                verb,
                resource,
                source: Box::new(other),
            },
        }
    }

    /// Tells a 403 apart by the `Status` message, since RBAC, Pod Security and quota all
    /// answer `Forbidden`: RBAC says `cannot <verb> resource`, Pod Security `violates
    /// PodSecurity`, quota `exceeded quota`; anything else is kept verbatim.
    pub(crate) fn from_forbidden(
        verb: &'static str,
        resource: &'static str,
        namespace: &str,
        message: String,
    ) -> Self {
        let namespace = namespace.to_owned();
        if message.contains("violates PodSecurity") {
            KubernetesError::PodSecurity { namespace, message }
        } else if message.contains("exceeded quota") {
            KubernetesError::QuotaExceeded {
                resource,
                namespace,
                message,
            }
        } else if message.contains(&format!("cannot {verb} resource")) {
            KubernetesError::Forbidden {
                verb,
                resource,
                namespace,
                message,
            }
        } else {
            KubernetesError::Api {
                verb,
                resource,
                code: 403,
                reason: "Forbidden".into(),
                message,
            }
        }
    }

    /// The HTTP status of an error answer, if this is one.
    pub(crate) fn code(&self) -> Option<u16> {
        match self {
            KubernetesError::Api { code, .. } => Some(*code),
            KubernetesError::Forbidden { .. }
            | KubernetesError::PodSecurity { .. }
            | KubernetesError::QuotaExceeded { .. } => Some(403),
            KubernetesError::Invalid { .. } => Some(422),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbac_refusals_name_the_verb_and_resource() {
        let status = kube::core::Status::failure(
            "pods is forbidden: User \"system:serviceaccount:ml:app\" cannot create resource \"pods\"",
            "Forbidden",
        )
        .with_code(403);
        let error =
            KubernetesError::from_kube("create", "pods", "ml", kube::Error::Api(status.boxed()));
        let shown = error.to_string();
        assert!(
            shown.contains("RBAC denied `create` on `pods` in namespace `ml`"),
            "{shown}"
        );
        assert!(shown.contains("cannot create resource"), "{shown}");
        assert!(error.is_permanent());
    }

    /// The texts a real kube-apiserver 1.37 answers with (`shared/k8s/NOTES.md`), each told apart
    /// though all are `403 Forbidden`.
    #[test]
    fn forbidden_answers_are_told_apart_by_their_message() {
        let refused = |verb, resource, message: &str| {
            let status = kube::core::Status::failure(message, "Forbidden").with_code(403);
            KubernetesError::from_kube(verb, resource, "rb", kube::Error::Api(status.boxed()))
        };
        let rbac = refused(
            "create",
            "secrets",
            "secrets is forbidden: User \"alice\" cannot create resource \"secrets\" in API group \"\" in the namespace \"rb\"",
        );
        assert!(
            matches!(
                rbac,
                KubernetesError::Forbidden {
                    verb: "create",
                    resource: "secrets",
                    ..
                }
            ),
            "{rbac:?}"
        );
        assert!(rbac.is_permanent());
        let pod_security = refused(
            "create",
            "pods",
            "pods \"plain\" is forbidden: violates PodSecurity \"restricted:latest\": allowPrivilegeEscalation != false",
        );
        assert!(
            matches!(pod_security, KubernetesError::PodSecurity { .. }),
            "{pod_security:?}"
        );
        assert!(pod_security.is_permanent());
        let shown = pod_security.to_string();
        assert!(
            shown.contains("securityContext") && !shown.contains("RBAC"),
            "{shown}"
        );
        let quota = refused(
            "create",
            "pods",
            "pods \"p3\" is forbidden: exceeded quota: pods2, requested: pods=1, used: pods=2, limited: pods=2",
        );
        assert!(
            matches!(
                quota,
                KubernetesError::QuotaExceeded {
                    resource: "pods",
                    ..
                }
            ),
            "{quota:?}"
        );
        assert!(!quota.is_permanent(), "quota frees up as pods end");
        let shown = quota.to_string();
        assert!(
            shown.contains("pods2") && !shown.contains("RBAC"),
            "{shown}"
        );
        let webhook = refused(
            "create",
            "pods",
            "admission webhook \"policy.example.com\" denied the request",
        );
        assert!(
            matches!(webhook, KubernetesError::Api { code: 403, .. }),
            "{webhook:?}"
        );
        assert!(webhook.to_string().contains("policy.example.com"));
        assert!(webhook.is_permanent());
    }

    #[test]
    fn busy_servers_are_transient() {
        let busy = kube::core::Status::failure("etcd timeout", "InternalError").with_code(500);
        let error =
            KubernetesError::from_kube("list", "pods", "ml", kube::Error::Api(busy.boxed()));
        assert!(error.is_transient() && !error.is_permanent());
    }
}
