//! The Kubernetes backend against a real control plane: kube-apiserver (validation, defaulting,
//! admission with Pod Security and ResourceQuota, RBAC, watches), kube-scheduler and
//! kube-controller-manager (garbage collector, quota, service accounts) built from Kubernetes
//! v1.37.2's source, and the test kubelet that runs each pod as a local `firebrand-runner`
//! process dialing back over real QUIC. Each test has a namespace of its own and ends with no
//! runner pod, Secret or process left.
//!
//! Without `go` these tests print a skip line each; with `FIREBRAND_REQUIRE_CONTROL_PLANE=1`
//! (as `.ci/run` sets it) a missing control plane fails them.

mod common;

use common::cluster::{
    backend, cluster, cluster_with, documented_role, parent_pod, parent_spec, pool,
    private_cluster, runner_pods, service_account, Cluster, IMAGE, PARENT_POD, RUNNER_SELECTOR,
    SECOND, SLEEPER,
};
use common::within;
use firebrand::backend::kubernetes::k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use firebrand::backend::kubernetes::kube::api::{Api, DeleteParams, PostParams};
use firebrand::backend::kubernetes::{labels, KubernetesError};
use firebrand::backend::BootRequest;
use firebrand::internals::token::PARENT_ENV;
use firebrand::{Backend, CallError, RunnerId};
use firebrand_runner::{ENV, SLEEP};
use serde_json::json;

fn boot_failure(error: &CallError) -> String {
    match error {
        CallError::BootFailed(boot) => boot.to_string(),
        other => panic!("expected a boot failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_pool_grows_to_several_runner_pods_and_idles_down_under_the_documented_role() {
    let Some(cluster) = cluster("grows_and_idles_down").await else {
        return;
    };
    // A sidecar first, as a service mesh injects it: the annotation names the app's container.
    let mut spec = parent_spec();
    spec["containers"] = json!([
        {"name": "mesh-proxy", "image": "registry.example.com/mesh/proxy:1"},
        {"name": "app", "image": IMAGE},
    ]);
    let kubeconfig = {
        let Cluster {
            admin, namespace, ..
        } = &cluster;
        service_account(admin, namespace, "app", documented_role()).await;
        let pods = Api::<Pod>::namespaced(admin.clone(), namespace);
        let mut parent: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": PARENT_POD,
                "annotations": {
                    firebrand_k8s_control_plane::IN_PROCESS_ANNOTATION: "true",
                    "kubectl.kubernetes.io/default-container": "app",
                },
            },
            "spec": spec,
        }))
        .unwrap();
        parent.metadata.namespace = Some(namespace.clone());
        pods.create(&PostParams::default(), &parent).await.unwrap();
        wait_running(&pods, PARENT_POD).await;
        cluster
            .plane
            .service_account_kubeconfig(namespace, "app")
            .await
    };
    let backend = backend(&cluster.namespace, kubeconfig)
        .build()
        .await
        .unwrap();
    assert!(
        backend.image().starts_with("registry.example.com/team/app@sha256:"),
        "the app container's image, pinned by the digest the kubelet reported, not the sidecar's: {}",
        backend.image()
    );
    let pool = pool(backend)
        .max(3)
        .max_concurrency(1)
        .drain_grace(10 * SECOND)
        .idle_shutdown_after(SECOND)
        .build()
        .await
        .unwrap();
    let calls = common::spawn_sleeps(&pool, 6, 1500);
    let mut counts = pool.watch_runners();
    within(60 * SECOND, counts.wait_for(|c| c.ready == 3))
        .await
        .unwrap();
    let pods = cluster.runner_pods().await;
    assert_eq!(pods.len(), 3, "one pod per runner");
    for call in calls {
        within(60 * SECOND, call).await.unwrap().unwrap();
    }
    let hostname = pool.call(&ENV, "HOSTNAME".into()).await.unwrap().unwrap();
    assert!(
        pods.iter()
            .any(|p| p.metadata.name.as_deref() == Some(hostname.as_str())),
        "each call ran in a runner pod: {hostname}"
    );
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.node_name.as_deref(), Some(firebrand_k8s_control_plane::NODE_NAME));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("Pod", PARENT_POD));
    }
    within(30 * SECOND, counts.wait_for(|c| c.ready == 0 && c.draining == 0))
        .await
        .unwrap();
    cluster.assert_cleaned_up(30 * SECOND).await;
    drop(counts);
    pool.shutdown().await;
    cluster.assert_cleaned_up(30 * SECOND).await;
}

async fn wait_running(pods: &Api<Pod>, name: &str) {
    let deadline = std::time::Instant::now() + 60 * SECOND;
    loop {
        let pod = pods.get(name).await.unwrap();
        if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{name} is not running: {:?}", pod.status);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
