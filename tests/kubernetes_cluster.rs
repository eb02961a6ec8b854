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
use common::{boot_failure, within};
use firebrand::backend::kubernetes::k8s_openapi::api::core::v1::ResourceQuota;
use firebrand::backend::kubernetes::kube::api::{Api, DeleteParams, PostParams};
use firebrand::backend::kubernetes::{labels, KubernetesError};
use firebrand::CallError;
use firebrand_runner::{ENV, SLEEP};
use serde_json::json;

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
        let parent = json!({
            "metadata": {
                "name": PARENT_POD,
                "annotations": {"kubectl.kubernetes.io/default-container": "app"},
            },
            "spec": spec,
        });
        cluster.plane.in_process_pod(namespace, parent).await;
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
        assert_eq!(
            spec.node_name.as_deref(),
            Some(firebrand_k8s_control_plane::NODE_NAME)
        );
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("Pod", PARENT_POD)
        );
    }
    within(
        30 * SECOND,
        counts.wait_for(|c| c.ready == 0 && c.draining == 0),
    )
    .await
    .unwrap();
    cluster.assert_cleaned_up(30 * SECOND).await;
    drop(counts);
    pool.shutdown().await;
    cluster.assert_cleaned_up(30 * SECOND).await;
}

#[tokio::test]
async fn a_role_missing_one_verb_fails_naming_it() {
    let Some(cluster) = cluster("role_missing_a_verb").await else {
        return;
    };
    let Cluster {
        admin, namespace, ..
    } = &cluster;
    // The documented Role less `create` on secrets: the pod is made, its credential cannot be.
    let rules = json!([
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "watch", "delete"]},
    ]);
    service_account(admin, namespace, "app", rules).await;
    // Less `get` on pods: the backend cannot read its own parent pod.
    let rules = json!([
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "list", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]);
    service_account(admin, namespace, "no-get", rules).await;
    parent_pod(cluster.plane, namespace, parent_spec()).await;

    let no_get = cluster
        .plane
        .service_account_kubeconfig(namespace, "no-get")
        .await;
    let error = backend(namespace, no_get).build().await.unwrap_err();
    assert!(
        matches!(
            error,
            KubernetesError::Forbidden {
                verb: "get",
                resource: "pods",
                ..
            }
        ),
        "{error:?}"
    );
    let shown = error.to_string();
    assert!(shown.contains("RBAC denied `get` on `pods`"), "{shown}");
    assert!(
        shown.contains("cannot get resource \"pods\""),
        "the server's own words: {shown}"
    );

    let kubeconfig = cluster
        .plane
        .service_account_kubeconfig(namespace, "app")
        .await;
    let pool = pool(backend(namespace, kubeconfig).build().await.unwrap())
        .build()
        .await
        .unwrap();
    let error = pool.call(&SLEEP, 1).await.unwrap_err();
    let shown = boot_failure(&error);
    assert!(
        shown.contains("RBAC denied `create` on `secrets`"),
        "{shown}"
    );
    pool.shutdown().await;
    cluster.assert_cleaned_up(30 * SECOND).await;
}

/// The restricted profile's settings, as a hardened Deployment sets them.
fn restricted_spec() -> serde_json::Value {
    let mut spec = parent_spec();
    spec["securityContext"] = json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    });
    spec["containers"][0]["securityContext"] = json!({
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
    });
    spec
}

#[tokio::test]
async fn a_restricted_namespace_admits_runner_pods_that_copy_the_parents_security_context() {
    let enforce = [("pod-security.kubernetes.io/enforce", "restricted")];
    let Some(cluster) = cluster_with("pod_security_restricted", &enforce).await else {
        return;
    };
    let kubeconfig = cluster.parent(restricted_spec()).await;
    let pool = pool(
        backend(&cluster.namespace, kubeconfig.clone())
            .build()
            .await
            .unwrap(),
    )
    .build()
    .await
    .unwrap();
    pool.call(&SLEEP, 1).await.unwrap();
    let runner = &cluster.runner_pods().await[0];
    let spec = runner.spec.as_ref().unwrap();
    let pod_context = spec.security_context.as_ref().unwrap();
    assert_eq!(pod_context.run_as_non_root, Some(true));
    assert_eq!(pod_context.run_as_user, Some(65532));
    let container_context = spec.containers[0].security_context.as_ref().unwrap();
    assert_eq!(container_context.allow_privilege_escalation, Some(false));
    pool.shutdown().await;

    // A runner pod stripped of them is refused, and the error says Pod Security, not RBAC.
    let stripped = backend(&cluster.namespace, kubeconfig)
        .pool_name("stripped")
        .edit_pod(|pod| {
            let spec = pod.spec.as_mut().unwrap();
            spec.security_context = None;
            spec.containers[0].security_context = None;
        })
        .build()
        .await
        .unwrap();
    let refused = common::cluster::pool(stripped).build().await.unwrap();
    let error = refused.call(&SLEEP, 1).await.unwrap_err();
    let shown = boot_failure(&error);
    assert!(shown.contains("Pod Security admission"), "{shown}");
    assert!(
        shown.contains("violates PodSecurity \"restricted:latest\""),
        "{shown}"
    );
    assert!(
        shown.contains("securityContext") && !shown.contains("RBAC"),
        "{shown}"
    );
    refused.shutdown().await;
    cluster.assert_cleaned_up(30 * SECOND).await;
}

#[tokio::test]
async fn a_boot_over_quota_waits_for_quota_and_its_error_names_the_quota() {
    let Some(cluster) = cluster("over_quota").await else {
        return;
    };
    let kubeconfig = cluster.parent(parent_spec()).await;
    // Room for the parent and one runner.
    let quotas = Api::<ResourceQuota>::namespaced(cluster.admin.clone(), &cluster.namespace);
    let quota: ResourceQuota = serde_json::from_value(
        json!({"metadata": {"name": "two-pods"}, "spec": {"hard": {"pods": "2"}}}),
    )
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    // Quota admission counts from the status the controller manager fills in.
    let deadline = std::time::Instant::now() + 30 * SECOND;
    while quotas
        .get("two-pods")
        .await
        .unwrap()
        .status
        .and_then(|s| s.used)
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "quota status never filled in"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // One pool holds the only runner pod the quota allows.
    let holder = pool(
        backend(&cluster.namespace, kubeconfig.clone())
            .pool_name("holder")
            .build()
            .await
            .unwrap(),
    )
    .min(1)
    .build()
    .await
    .unwrap();
    let mut counts = holder.watch_runners();
    within(60 * SECOND, counts.wait_for(|c| c.ready == 1))
        .await
        .unwrap();
    drop(counts);

    // A boot with a short timeout fails with the quota's message.
    let short = pool(
        backend(&cluster.namespace, kubeconfig.clone())
            .build()
            .await
            .unwrap(),
    )
    .boot_timeout(6 * SECOND)
    .build()
    .await
    .unwrap();
    let error = short.call(&SLEEP, 1).await.unwrap_err();
    let shown = boot_failure(&error);
    assert!(
        shown.contains("ResourceQuota") && shown.contains("two-pods"),
        "{shown}"
    );
    assert!(!shown.contains("RBAC"), "{shown}");
    match &error {
        CallError::BootFailed(boot) => assert!(!boot.is_permanent(), "quota frees up"),
        other => panic!("{other:?}"),
    }
    short.shutdown().await;

    // A boot with time to wait gets the quota the holder frees.
    let waiting = pool(
        backend(&cluster.namespace, kubeconfig)
            .build()
            .await
            .unwrap(),
    )
    .boot_timeout(60 * SECOND)
    .build()
    .await
    .unwrap();
    let call = {
        let waiting = waiting.clone();
        tokio::spawn(async move { waiting.call(&SLEEP, 1).await })
    };
    // Refused by the quota (at once, before this change), the boot waits instead of failing.
    tokio::time::sleep(2 * SECOND).await;
    assert!(!call.is_finished(), "the boot waits for quota");
    holder.shutdown().await;
    within(60 * SECOND, call).await.unwrap().unwrap();
    waiting.shutdown().await;
    cluster.assert_cleaned_up(30 * SECOND).await;
}

#[tokio::test]
async fn deleting_the_parent_pod_lets_the_garbage_collector_take_its_runners() {
    let Some(cluster) = cluster("parent_deleted").await else {
        return;
    };
    let kubeconfig = cluster.parent(parent_spec()).await;
    let pool = cluster.ready_pool(kubeconfig, 2).await;
    let processes = cluster.plane.processes(&cluster.namespace);
    assert_eq!(processes.len(), 2, "{processes:?}");
    cluster
        .pods()
        .delete(PARENT_POD, &DeleteParams::default())
        .await
        .unwrap();
    // Nobody but the garbage collector deletes them: the pool is still up.
    cluster.assert_cleaned_up(60 * SECOND).await;
    for (_, pid) in processes {
        assert!(!common::alive(pid), "runner process {pid} exited");
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn a_restarted_parent_container_deletes_the_runners_of_its_last_incarnation() {
    let Some(cluster) = cluster("parent_restarted").await else {
        return;
    };
    let kubeconfig = cluster.parent(parent_spec()).await;
    // The last incarnation made a runner pod, then its container died without deleting it.
    let earlier = backend(&cluster.namespace, kubeconfig.clone())
        .incarnation("before-the-restart")
        .image(SLEEPER)
        .args(["600"])
        .build()
        .await
        .unwrap();
    common::leave_behind(&earlier).await;
    // Running before the restart: its process is up.
    let deadline = std::time::Instant::now() + 60 * SECOND;
    while cluster.plane.processes(&cluster.namespace).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stale runner never ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(earlier);
    let stale = cluster.runner_pods().await;
    assert_eq!(stale.len(), 1);
    let labels_of = stale[0].metadata.labels.as_ref().unwrap();
    assert_eq!(labels_of[labels::INCARNATION], "before-the-restart");

    // The new incarnation sweeps it as its pool starts, and works.
    let pool = pool(
        backend(&cluster.namespace, kubeconfig)
            .build()
            .await
            .unwrap(),
    )
    .build()
    .await
    .unwrap();
    pool.call(&SLEEP, 1).await.unwrap();
    pool.shutdown().await;
    cluster.assert_cleaned_up(60 * SECOND).await;
}

#[tokio::test]
async fn a_pod_asking_for_more_gpus_than_any_node_has_fails_at_once_with_the_schedulers_reason() {
    let Some(cluster) = cluster("too_many_gpus").await else {
        return;
    };
    let kubeconfig = cluster.parent(parent_spec()).await;
    let backend = backend(&cluster.namespace, kubeconfig)
        .gpus(firebrand_k8s_control_plane::NODE_GPUS as u32 + 1)
        .build()
        .await
        .unwrap();
    let pool = pool(backend)
        .boot_timeout(120 * SECOND)
        .build()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let error = pool.call(&SLEEP, 1).await.unwrap_err();
    let shown = boot_failure(&error);
    assert!(shown.contains("unschedulable"), "{shown}");
    assert!(
        shown.contains("Insufficient nvidia.com/gpu"),
        "the scheduler's words: {shown}"
    );
    assert!(
        started.elapsed() < 60 * SECOND,
        "failed as the scheduler said so, not at the boot timeout: {:?}",
        started.elapsed()
    );
    match &error {
        CallError::BootFailed(boot) => assert!(boot.is_permanent()),
        other => panic!("{other:?}"),
    }
    pool.shutdown().await;
    cluster.assert_cleaned_up(30 * SECOND).await;
}

#[tokio::test]
async fn kubectl_lists_runner_pods_by_the_backends_labels() {
    let Some(cluster) = cluster("kubectl").await else {
        return;
    };
    let kubeconfig = cluster.parent(parent_spec()).await;
    let pool = cluster.ready_pool(kubeconfig, 1).await;
    let runner = cluster.runner_pods().await[0]
        .metadata
        .name
        .clone()
        .unwrap();
    let listed = cluster
        .plane
        .kubectl(&cluster.namespace, &["get", "pods", "-l", RUNNER_SELECTOR])
        .await
        .unwrap();
    assert!(
        listed.contains(&runner) && listed.contains("Running"),
        "{listed}"
    );
    assert!(
        !listed.contains(&format!("\n{PARENT_POD} ")),
        "the selector applies: {listed}"
    );
    let fields = cluster
        .plane
        .kubectl(
            &cluster.namespace,
            &[
                "get",
                "pod",
                &runner,
                "-o",
                "jsonpath={.status.phase} {.spec.restartPolicy} {.metadata.labels.firebrand\\.dev/pool}",
            ],
        )
        .await
        .unwrap();
    assert_eq!(fields, "Running Never firebrand");
    pool.shutdown().await;
    cluster.assert_cleaned_up(30 * SECOND).await;
}

#[tokio::test]
async fn calls_go_on_and_boots_complete_while_the_api_server_restarts() {
    let Some((plane, namespace, admin)) = private_cluster("api_server_restart").await else {
        return;
    };
    service_account(&admin, &namespace, "app", documented_role()).await;
    parent_pod(&plane, &namespace, parent_spec()).await;
    let kubeconfig = plane.service_account_kubeconfig(&namespace, "app").await;
    let pool = pool(backend(&namespace, kubeconfig).build().await.unwrap())
        .max(3)
        .max_concurrency(1)
        .idle_shutdown_after(120 * SECOND)
        .build()
        .await
        .unwrap();
    pool.call(&SLEEP, 1).await.unwrap();
    // A call in flight on the runner that is up, long enough that the two calls after it
    // need runners of their own: their creates are retried until the API server is back.
    let long = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call(&SLEEP, 20_000).await })
    };
    plane.kill_apiserver();
    let more = common::spawn_sleeps(&pool, 2, 500);
    // The API server is down for a while: the creates of the new boots are refused meanwhile.
    tokio::time::sleep(3 * SECOND).await;
    plane.start_apiserver().await;
    within(60 * SECOND, long).await.unwrap().unwrap();
    for call in more {
        within(60 * SECOND, call).await.unwrap().unwrap();
    }
    // One pod per runner, none twice (a create retried after an answer that never came must
    // not make a second pod for its runner). The two short calls needed one runner at least;
    // the second may have found the first free before its own pod was made, and that boot
    // was then given up.
    let pods = runner_pods(&admin, &namespace).await;
    let names: Vec<_> = pods.iter().map(|p| &p.metadata.name).collect();
    let mut runners: Vec<&String> = pods
        .iter()
        .map(|p| &p.metadata.labels.as_ref().unwrap()[labels::RUNNER])
        .collect();
    runners.sort();
    runners.dedup();
    assert_eq!(
        runners.len(),
        pods.len(),
        "a runner with two pods: {names:?}"
    );
    assert!((2..=3).contains(&pods.len()), "{names:?}");
    pool.shutdown().await;
    common::cluster::assert_cleaned_up(&plane, &admin, &namespace, 60 * SECOND).await;
}
