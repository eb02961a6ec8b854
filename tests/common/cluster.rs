//! The Kubernetes backend's set-up on a real control plane (kube-apiserver, kube-scheduler,
//! kube-controller-manager, and the test kubelet): a namespace per test, the parent pod as a
//! Deployment would make it (the test process is its container), its ServiceAccount bound to
//! the Role that `docs/kubernetes.md` documents, and the check that nothing was left.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use firebrand::backend::kubernetes::k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use firebrand::backend::kubernetes::k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use firebrand::backend::kubernetes::kube::api::{Api, ListParams, PostParams};
use firebrand::backend::kubernetes::kube::{self};
use firebrand::backend::kubernetes::{KubernetesBackend, KubernetesBackendBuilder};
use firebrand::{Pool, PoolBuilder};
use firebrand_k8s_control_plane::{ControlPlane, Images};
use serde_json::{json, Value};

use super::RUNNER;

pub const IMAGE: &str = "registry.example.com/team/app:v1";
/// An image of a process that only sleeps: a pod that runs but never dials anyone.
pub const SLEEPER: &str = "registry.example.com/sleeper:1";
/// The parent pod's name in each test's namespace.
pub const PARENT_POD: &str = "app";
/// The parent's ServiceAccount, bound to the documented Role.
pub const SERVICE_ACCOUNT: &str = "app";
pub const SECOND: Duration = Duration::from_secs(1);
/// Runner pods' selector, as the docs give it for kubectl.
pub const RUNNER_SELECTOR: &str = "app.kubernetes.io/managed-by=firebrand";

/// The Role of `docs/kubernetes.md`'s RBAC section, rule for rule.
pub fn documented_role() -> Value {
    json!([
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ])
}

/// One test's namespace on the shared control plane.
pub struct Cluster {
    pub plane: &'static ControlPlane,
    pub namespace: String,
    pub admin: kube::Client,
}

fn images() -> Images {
    Images::new()
        .image(IMAGE, RUNNER)
        .image(SLEEPER, "/bin/sleep")
}

/// The shared control plane and a fresh namespace named after `test` (with `labels`); `None`
/// when the control plane is unavailable and not required (the skip is printed).
pub async fn cluster_with(test: &str, labels: &[(&str, &str)]) -> Option<Cluster> {
    super::init_tracing();
    let plane = ControlPlane::shared_with(test, images)?;
    let namespace = test.replace('_', "-");
    let namespace = namespace[..namespace.len().min(63)].trim_end_matches('-');
    let namespace = plane.namespace_with(namespace, labels).await;
    Some(Cluster {
        plane,
        admin: plane.admin().await,
        namespace,
    })
}

pub async fn cluster(test: &str) -> Option<Cluster> {
    cluster_with(test, &[]).await
}

/// A control plane of the test's own, for a test that restarts the API server.
pub async fn private_cluster(test: &str) -> Option<(ControlPlane, String, kube::Client)> {
    super::init_tracing();
    let plane = ControlPlane::private(test, images())?;
    let namespace = plane.namespace("private").await;
    let admin = plane.admin().await;
    Some((plane, namespace, admin))
}

/// The parent pod's spec: one container `app` running [`IMAGE`], no API token mounted.
pub fn parent_spec() -> Value {
    json!({
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": false,
        "containers": [{"name": "app", "image": IMAGE}],
    })
}

/// Makes ServiceAccount `account`, bound to a Role with `rules`.
pub async fn service_account(admin: &kube::Client, namespace: &str, account: &str, rules: Value) {
    let create = PostParams::default();
    fn object<T: serde::de::DeserializeOwned>(value: Value) -> T {
        serde_json::from_value(value).expect("a valid object")
    }
    let account_object: ServiceAccount = object(json!({"metadata": {"name": account}}));
    Api::<ServiceAccount>::namespaced(admin.clone(), namespace)
        .create(&create, &account_object)
        .await
        .expect("create the ServiceAccount");
    let role: Role = object(json!({"metadata": {"name": account}, "rules": rules}));
    Api::<Role>::namespaced(admin.clone(), namespace)
        .create(&create, &role)
        .await
        .expect("create the Role");
    let binding: RoleBinding = object(json!({
        "metadata": {"name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
    }));
    Api::<RoleBinding>::namespaced(admin.clone(), namespace)
        .create(&create, &binding)
        .await
        .expect("create the RoleBinding");
}

/// Makes the parent pod with `spec` and waits until it runs.
pub async fn parent_pod(plane: &ControlPlane, namespace: &str, spec: Value) -> Pod {
    let pod = json!({"metadata": {"name": PARENT_POD}, "spec": spec});
    plane.in_process_pod(namespace, pod).await
}

impl Cluster {
    /// The ServiceAccount bound to the documented Role, the parent pod with `spec`, and a
    /// kubeconfig holding the ServiceAccount's token.
    pub async fn parent(&self, spec: Value) -> PathBuf {
        service_account(
            &self.admin,
            &self.namespace,
            SERVICE_ACCOUNT,
            documented_role(),
        )
        .await;
        parent_pod(self.plane, &self.namespace, spec).await;
        self.plane
            .service_account_kubeconfig(&self.namespace, SERVICE_ACCOUNT)
            .await
    }

    /// A pool that keeps `runners` runners up (its `min` and `max`), once they are ready.
    pub async fn ready_pool(&self, kubeconfig: PathBuf, runners: usize) -> Pool {
        let backend = backend(&self.namespace, kubeconfig).build().await.unwrap();
        let pool = pool(backend)
            .min(runners)
            .max(runners)
            .build()
            .await
            .unwrap();
        let mut counts = pool.watch_runners();
        super::within(60 * SECOND, counts.wait_for(|c| c.ready == runners))
            .await
            .unwrap();
        pool
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.admin.clone(), &self.namespace)
    }

    /// The runner pods there are now.
    pub async fn runner_pods(&self) -> Vec<Pod> {
        runner_pods(&self.admin, &self.namespace).await
    }

    /// Waits up to `limit` until no runner pod, no runner Secret and no pod process is left.
    pub async fn assert_cleaned_up(&self, limit: Duration) {
        assert_cleaned_up(self.plane, &self.admin, &self.namespace, limit).await;
    }
}

pub async fn runner_pods(admin: &kube::Client, namespace: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(admin.clone(), namespace)
        .list(&ListParams::default().labels(RUNNER_SELECTOR))
        .await
        .expect("list runner pods")
        .items
}

pub async fn assert_cleaned_up(
    plane: &ControlPlane,
    admin: &kube::Client,
    namespace: &str,
    limit: Duration,
) {
    let secrets = Api::<Secret>::namespaced(admin.clone(), namespace);
    let deadline = Instant::now() + limit;
    loop {
        let pods: Vec<String> = runner_pods(admin, namespace)
            .await
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        let left: Vec<String> = secrets
            .list(&ListParams::default().labels(RUNNER_SELECTOR))
            .await
            .expect("list runner secrets")
            .items
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect();
        let processes = plane.processes(namespace);
        if pods.is_empty() && left.is_empty() && processes.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left after {limit:?}: pods {pods:?}, secrets {left:?}, processes {processes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A backend as the parent pod configures it from its downward-API env, authenticated by
/// `kubeconfig`.
pub fn backend(namespace: &str, kubeconfig: PathBuf) -> KubernetesBackendBuilder {
    let namespace = namespace.to_owned();
    KubernetesBackendBuilder::from_vars(move |name| match name {
        "POD_NAME" => Some(PARENT_POD.to_owned()),
        "POD_NAMESPACE" => Some(namespace.clone()),
        "RUST_LOG" => Some("warn".to_owned()),
        _ => None,
    })
    .kubeconfig(kubeconfig)
}

pub fn pool(backend: KubernetesBackend) -> PoolBuilder {
    Pool::builder()
        .registry(&firebrand_runner::registry())
        .backend(backend)
        .boot_timeout(30 * SECOND)
        .queue_timeout(60 * SECOND)
        .timeout(30 * SECOND)
}
