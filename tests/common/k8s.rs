//! The Kubernetes backend's test set-up: a backend on the fake API server, configured as a
//! parent pod would be, and the check that a test left no pod or secret and sent no invalid
//! body.

use std::time::Duration;

use firebrand::backend::kubernetes::{KubernetesBackend, KubernetesBackendBuilder};
use firebrand::{Pool, PoolBuilder};
use firebrand_k8s_fake::FakeKube;

use super::RUNNER;

pub const IMAGE: &str = "registry.example.com/team/app:v1";
/// An image of a process that only sleeps: a pod that runs but never dials anyone.
pub const SLEEPER: &str = "registry.example.com/sleeper:1";
pub const PARENT_POD: &str = "app-7d9f8c-x2k4q";
pub const SECOND: Duration = Duration::from_secs(1);

pub async fn fake() -> FakeKube {
    fake_with_gpus(0).await
}

pub async fn fake_with_gpus(gpus: u32) -> FakeKube {
    super::init_tracing();
    FakeKube::builder()
        .image(IMAGE, RUNNER)
        .image(SLEEPER, "/bin/sleep")
        .parent_pod(PARENT_POD)
        .gpus(gpus)
        .start()
        .await
        .expect("the fake binds")
}

/// A backend on the fake, as a parent pod would configure it from its downward-API env.
pub fn backend(kube: &FakeKube) -> KubernetesBackendBuilder {
    let namespace = kube.namespace();
    KubernetesBackendBuilder::from_vars(move |name| match name {
        "POD_NAME" => Some(PARENT_POD.to_owned()),
        "POD_NAMESPACE" => Some(namespace.clone()),
        "RUST_LOG" => Some("warn".to_owned()),
        _ => None,
    })
    .kubeconfig(kube.kubeconfig())
}

pub fn pool(backend: KubernetesBackend) -> PoolBuilder {
    Pool::builder()
        .registry(&firebrand_runner::registry())
        .backend(backend)
        .boot_timeout(20 * SECOND)
        .queue_timeout(30 * SECOND)
        .timeout(20 * SECOND)
}

/// Shuts the pool down and checks that no runner pod and no secret is left, and that every
/// body sent was valid.
pub async fn shut_down_clean(pool: Pool, kube: &FakeKube) {
    pool.shutdown().await;
    assert_cleaned_up(kube).await;
}

pub async fn assert_cleaned_up(kube: &FakeKube) {
    assert!(
        kube.all_cleaned_up(20 * SECOND).await,
        "left: pods {:?}, secrets {:?}",
        kube.runner_pods()
            .iter()
            .map(|p| (&p.name, &p.phase))
            .collect::<Vec<_>>(),
        kube.live_secrets()
    );
    assert_eq!(kube.invalid_requests(), Vec::<String>::new());
}

/// The only runner pod, once its process runs: a boot returns when the pod is made, before
/// the kubelet has started it.
pub async fn running_runner_pod(kube: &FakeKube) -> firebrand_k8s_fake::PodView {
    let deadline = std::time::Instant::now() + 20 * SECOND;
    loop {
        if let Some(pod) = kube.runner_pods().into_iter().find(|p| p.pid.is_some()) {
            return pod;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no runner pod runs: {:?}",
            kube.runner_pods()
                .iter()
                .map(|p| (&p.name, &p.phase))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
