//! The Kubernetes backend end to end: real runner processes run as pods by the fake API
//! server's kubelet, which validates every Pod, Secret and DeleteOptions body against
//! Kubernetes 1.37's strict schemas, dialing back over real QUIC.

mod common;

use std::time::Instant;

use common::k8s::{
    assert_cleaned_up, backend, fake, fake_with_gpus, pool, running_runner_pod, shut_down_clean,
    IMAGE, PARENT_POD, SECOND, SLEEPER,
};
use common::{boot_failure, within};
use firebrand::backend::kubernetes::{labels, KubernetesError};
use firebrand::internals::token::PARENT_ENV;
use firebrand::CallError;
use firebrand_runner::{ENV, SLEEP};

#[tokio::test]
async fn a_pool_on_kubernetes_grows_runs_jobs_idles_down_and_deletes_every_pod() {
    let kube = fake().await;
    let backend = backend(&kube).build().await.unwrap();
    let digest = kube.digest_of(IMAGE).unwrap();
    assert_eq!(
        backend.image(),
        digest,
        "runners run the parent's image, pinned"
    );
    let pool = pool(backend)
        .max(3)
        .max_concurrency(1)
        .drain_grace(10 * SECOND)
        .idle_shutdown_after(SECOND)
        .build()
        .await
        .unwrap();
    common::concurrent_sleeps(&pool, 6, 400).await;
    assert_eq!(kube.counts().pods_created, 3);
    assert_eq!(kube.counts().secrets_created, 3);
    // Each call ran inside a pod: its hostname is the pod's name.
    let hostname = pool.call(&ENV, "HOSTNAME".into()).await.unwrap().unwrap();
    let pods = kube.runner_pods();
    assert!(pods.iter().any(|p| p.name == hostname), "{hostname}");
    let parent_uid = kube
        .live_pods()
        .into_iter()
        .find(|p| p.name == PARENT_POD)
        .unwrap()
        .object["metadata"]["uid"]
        .clone();
    for pod in &pods {
        let object = &pod.object;
        let spec = &object["spec"];
        assert!(pod.name.starts_with("firebrand-runner-"), "{}", pod.name);
        assert_eq!(spec["restartPolicy"], "Never");
        assert_eq!(
            spec["automountServiceAccountToken"], false,
            "no API rights for jobs"
        );
        assert_eq!(
            spec["terminationGracePeriodSeconds"], 15,
            "drain grace + margin"
        );
        assert_eq!(
            spec["serviceAccountName"],
            firebrand_k8s_fake::PARENT_SERVICE_ACCOUNT
        );
        let container = &spec["containers"][0];
        assert_eq!(container["image"], digest.as_str());
        let owner = &object["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["name"]),
            (&"Pod".into(), &PARENT_POD.into())
        );
        assert_eq!(owner["uid"], parent_uid);
        assert_eq!(pod.labels[labels::PARENT_UID], parent_uid.as_str().unwrap());
        assert_eq!(pod.labels[labels::POOL], "firebrand");
        // The boot token is read from the pod's own Secret, never written in its spec.
        let token = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == PARENT_ENV)
            .unwrap();
        assert!(token.get("value").is_none(), "{token}");
        assert_eq!(
            token["valueFrom"]["secretKeyRef"]["name"],
            pod.name.as_str()
        );
        assert!(kube.live_secrets().contains(&pod.name));
        let forwarded = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "RUST_LOG");
        assert!(forwarded, "RUST_LOG is forwarded");
    }
    let mut counts = pool.watch_runners();
    within(
        10 * SECOND,
        counts.wait_for(|c| c.ready == 0 && c.draining == 0),
    )
    .await
    .unwrap();
    assert!(
        kube.all_cleaned_up(10 * SECOND).await,
        "idle runners' pods are deleted"
    );
    assert_eq!(kube.counts().pods_deleted, 3);
    assert_eq!(
        kube.counts().secrets_deleted,
        3,
        "each Secret went with its pod"
    );
    assert_eq!(
        kube.counts().pods_collected,
        0,
        "the parent deleted them, not the collector"
    );
    shut_down_clean(pool, &kube).await;
}

/// One boot, on a fake armed by `arm`: why it failed, after checking nothing was left.
async fn single_boot_failure(arm: impl FnOnce(&firebrand_k8s_fake::FakeKube)) -> String {
    let kube = fake().await;
    arm(&kube);
    let pool = pool(backend(&kube).build().await.unwrap())
        .boot_attempts(1)
        .build()
        .await
        .unwrap();
    let error = pool.call(&SLEEP, 1).await.unwrap_err();
    shut_down_clean(pool, &kube).await;
    boot_failure(&error)
}

#[tokio::test]
async fn a_pod_that_crashes_at_start_fails_its_boot_with_the_exit_code() {
    let shown = single_boot_failure(|kube| kube.crash_next_pod(17)).await;
    assert!(shown.contains("exit code 17 (Error)"), "{shown}");
}

#[tokio::test]
async fn a_pod_killed_for_memory_says_oomkilled() {
    let shown = single_boot_failure(|kube| kube.oom_kill_next_pod()).await;
    assert!(shown.contains("exit code 137 (OOMKilled)"), "{shown}");
}

#[tokio::test]
async fn a_pod_no_node_can_take_fails_at_once_with_the_schedulers_message() {
    let kube = fake().await;
    let pool = pool(backend(&kube).gpus(1).build().await.unwrap())
        .boot_timeout(60 * SECOND)
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let error = pool.call(&SLEEP, 1).await.unwrap_err();
    let shown = boot_failure(&error);
    assert!(shown.contains("unschedulable"), "{shown}");
    assert!(shown.contains("Insufficient nvidia.com/gpu"), "{shown}");
    // Failed for good on the first try, not after the boot timeout or a retry.
    assert!(started.elapsed() < 20 * SECOND, "{:?}", started.elapsed());
    assert_eq!(kube.counts().pods_created, 1);
    let CallError::BootFailed(boot) = &error else {
        unreachable!()
    };
    assert!(boot.is_permanent());
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_fails_the_boot() {
    let kube = fake().await;
    let missing = "registry.example.com/team/app:does-not-exist";
    let pool = pool(backend(&kube).image(missing).build().await.unwrap())
        .build()
        .await
        .unwrap();
    let error = pool.call(&SLEEP, 1).await.unwrap_err();
    let shown = boot_failure(&error);
    assert!(
        shown.contains(&format!("cannot pull image {missing}: ErrImagePull")),
        "{shown}"
    );
    assert_eq!(
        kube.counts().pods_created,
        1,
        "not retried: it would fail the same way"
    );
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn a_boot_timeout_deletes_its_pod() {
    let kube = fake().await;
    kube.stall_next_pod();
    let pool = pool(backend(&kube).build().await.unwrap())
        .boot_timeout(2 * SECOND)
        .boot_attempts(1)
        .build()
        .await
        .unwrap();
    let error = pool.call(&SLEEP, 1).await.unwrap_err();
    assert!(
        boot_failure(&error).contains("did not connect within the boot timeout"),
        "{error}"
    );
    // Deleted by the parent, at once: not left Pending for the collector.
    assert_cleaned_up(&kube).await;
    assert_eq!(kube.counts().pods_deleted, 1);
    assert_eq!(kube.counts().pods_collected, 0);
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn deleting_the_parent_pod_takes_its_runners_along() {
    let kube = fake().await;
    let pool = pool(backend(&kube).build().await.unwrap())
        .min(2)
        .max(2)
        .build()
        .await
        .unwrap();
    let mut counts = pool.watch_runners();
    within(20 * SECOND, counts.wait_for(|c| c.ready == 2))
        .await
        .unwrap();
    let pids: Vec<u32> = kube.runner_pods().iter().filter_map(|p| p.pid).collect();
    assert_eq!(pids.len(), 2);
    assert!(kube.delete_pod(PARENT_POD));
    assert!(
        kube.wait_for(20 * SECOND, |c| c.pods_collected == 2).await,
        "{:?}",
        kube.counts()
    );
    for pid in pids {
        common::wait_dead(pid, 20 * SECOND).await;
    }
    drop(counts);
    pool.shutdown().await;
    assert_cleaned_up(&kube).await;
}

#[tokio::test]
async fn a_restarted_parent_container_deletes_the_runners_of_its_last_incarnation() {
    let kube = fake().await;
    // The parent's last incarnation made a runner pod, then its container died without
    // deleting it: the pod and its uid stay, so the garbage collector never takes the runner.
    let earlier = backend(&kube)
        .incarnation("before-the-restart")
        .image(SLEEPER)
        .args(["600"])
        .build()
        .await
        .unwrap();
    common::leave_behind(&earlier).await;
    drop(earlier);
    running_runner_pod(&kube).await;
    let stale = kube.runner_pods();
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].labels[labels::INCARNATION], "before-the-restart");
    let stale_pid = stale[0].pid.unwrap();
    kube.restart_parent_container();

    // The new incarnation's pool sweeps it at start, and works.
    let pool = pool(backend(&kube).build().await.unwrap())
        .build()
        .await
        .unwrap();
    assert!(kube.wait_for(10 * SECOND, |c| c.pods_deleted == 1).await);
    common::wait_dead(stale_pid, 10 * SECOND).await;
    assert!(
        !kube.live_secrets().contains(&stale[0].name),
        "its Secret went with it"
    );
    pool.call(&SLEEP, 1).await.unwrap();
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried() {
    let kube = fake().await;
    let pool = pool(backend(&kube).build().await.unwrap())
        .max(3)
        .max_concurrency(1)
        .build()
        .await
        .unwrap();
    kube.rate_limit_next(2, Some(SECOND));
    let armed = Instant::now();
    pool.call(&SLEEP, 1).await.unwrap();
    assert_eq!(kube.counts().rate_limited, 2);
    // Each refused request waited the second it was told to (two may have waited at once).
    assert!(
        armed.elapsed() >= SECOND,
        "Retry-After honoured: {:?}",
        armed.elapsed()
    );
    let before = kube.counts().pods_created;
    kube.fail_next_requests(2);
    // Long enough that the second call's runner is still needed after the retries.
    common::concurrent_sleeps(&pool, 2, 3000).await;
    assert_eq!(kube.counts().server_errors, 2);
    assert!(kube.counts().pods_created > before);
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn an_rbac_refusal_names_the_verb_and_the_resource() {
    let kube = fake().await;
    kube.deny("get", "pods");
    let error = backend(&kube).build().await.unwrap_err();
    assert!(
        matches!(
            error,
            KubernetesError::Forbidden {
                verb: "get",
                resource: "pods",
                ..
            }
        ),
        "{error}"
    );
    kube.allow_all();

    kube.deny("create", "secrets");
    let pool = pool(backend(&kube).build().await.unwrap())
        .build()
        .await
        .unwrap();
    let error = pool.call(&SLEEP, 1).await.unwrap_err();
    let shown = boot_failure(&error);
    assert!(
        shown.contains("RBAC denied `create` on `secrets` in namespace `default`"),
        "{shown}"
    );
    assert!(
        shown.contains("cannot create resource \"secrets\""),
        "{shown}"
    );
    let CallError::BootFailed(boot) = &error else {
        unreachable!()
    };
    assert!(boot.is_permanent());
    let firebrand::BootError::Backend(backend) = &**boot else {
        panic!("{boot:?}")
    };
    let refusal: &KubernetesError = backend.provider_error().unwrap();
    assert!(matches!(
        refusal,
        KubernetesError::Forbidden {
            verb: "create",
            resource: "secrets",
            ..
        }
    ));
    // Each request was tried again for a few seconds (a restarted API server refuses until
    // its RBAC caches fill), not for the whole boot: a handful of refusals each. The pod made
    // before the Secret's refusal was deleted: `shut_down_clean` finds no pod.
    let refusals = kube.counts().forbidden;
    assert!((4..=30).contains(&refusals), "{refusals}");
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn boots_go_on_through_dropped_and_expired_watches() {
    let kube = fake().await;
    let pool = pool(backend(&kube).build().await.unwrap())
        .max(3)
        .max_concurrency(1)
        .build()
        .await
        .unwrap();
    pool.call(&SLEEP, 1).await.unwrap();
    let watches = kube.counts().watches;
    kube.drop_watches();
    common::concurrent_sleeps(&pool, 2, 300).await;
    kube.compact();
    common::concurrent_sleeps(&pool, 3, 300).await;
    let counts = kube.counts();
    assert!(counts.watches > watches + 1, "{counts:?}");
    assert!(counts.watches_expired >= 1, "{counts:?}");
    assert_eq!(counts.pods_created, 3);
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn runner_pods_get_gpus_of_their_own() {
    let kube = fake_with_gpus(2).await;
    let pool = pool(backend(&kube).gpus(1).build().await.unwrap())
        .max(2)
        .max_concurrency(1)
        .build()
        .await
        .unwrap();
    // The first pod's runner is held by a long call, so that the second call needs the
    // second pod.
    pool.call(&SLEEP, 1).await.unwrap();
    let long = hold_the_runner(&pool, 3_000).await;
    let seen = pool
        .call(&ENV, "NVIDIA_VISIBLE_DEVICES".into())
        .await
        .unwrap()
        .expect("the device plugin's variable is set");
    assert!(seen.starts_with("GPU-"), "{seen}");
    long.await.unwrap().unwrap();
    let pods = kube.runner_pods();
    let mut gpus: Vec<u32> = pods.iter().flat_map(|p| p.gpus.clone()).collect();
    gpus.sort_unstable();
    assert_eq!(gpus, [0, 1], "one GPU each, none shared");
    for pod in &pods {
        assert_eq!(
            pod.object["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
            "1"
        );
    }
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn kubectl_reads_the_fakes_pods() {
    // kubectl is built with the test control plane (k8s-control-plane/build.sh).
    let test = "kubectl_reads_the_fakes_pods";
    let built = firebrand_k8s_control_plane::binaries();
    let Some(binaries) =
        built.map_or_else(|why| firebrand_k8s_control_plane::skip(test, &why), Some)
    else {
        return;
    };
    let kubectl = binaries.join("kubectl");
    common::init_tracing();
    // kubectl sends no token to a server on plain HTTP: it reads as an anonymous user.
    let kube = firebrand_k8s_fake::FakeKube::builder()
        .image(IMAGE, common::RUNNER)
        .parent_pod(PARENT_POD)
        .anonymous_reads(true)
        .start()
        .await
        .unwrap();
    let pool = pool(backend(&kube).build().await.unwrap())
        .min(1)
        .build()
        .await
        .unwrap();
    let mut counts = pool.watch_runners();
    within(20 * SECOND, counts.wait_for(|c| c.ready == 1))
        .await
        .unwrap();
    let runner = kube.runner_pods()[0].name.clone();
    let output = tokio::process::Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(kube.kubeconfig())
        .args([
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/managed-by=firebrand",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stdout.contains(&runner) && stdout.contains("Running"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(PARENT_POD),
        "the selector applies: {stdout}"
    );
    let output = tokio::process::Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(kube.kubeconfig())
        .args([
            "get",
            "pod",
            &runner,
            "-o",
            "jsonpath={.status.phase} {.spec.restartPolicy}",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "Running Never",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    drop(counts);
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn an_invalid_pod_is_refused_with_the_api_servers_message() {
    use firebrand::backend::kubernetes::k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let kube = fake_with_gpus(2).await;
    // An edit that asks for more GPUs than the limit: the API server refuses the pod.
    let backend = backend(&kube)
        .gpus(1)
        .edit_pod(|pod| {
            let container = &mut pod.spec.as_mut().unwrap().containers[0];
            let resources = container.resources.get_or_insert_with(Default::default);
            resources
                .requests
                .get_or_insert_with(Default::default)
                .insert("nvidia.com/gpu".into(), Quantity("2".into()));
        })
        .build()
        .await
        .unwrap();
    let pool = pool(backend).build().await.unwrap();
    let error = pool.call(&SLEEP, 1).await.unwrap_err();
    let shown = boot_failure(&error);
    assert!(
        shown.contains("the API server refused the pods as invalid"),
        "{shown}"
    );
    assert!(
        shown.contains("must be equal to nvidia.com/gpu limit"),
        "{shown}"
    );
    assert_eq!(kube.counts().invalid, 1, "refused once: not retried");
    assert_eq!(kube.counts().pods_created, 0);
    pool.shutdown().await;
    assert!(kube.all_cleaned_up(10 * SECOND).await);
    // The one invalid body is the test's own doing.
    assert_eq!(kube.invalid_requests().len(), 1);
}

#[tokio::test]
async fn the_sweep_deletes_the_runners_of_a_parent_pod_that_is_gone() {
    let kube = fake().await;
    // The parent made a runner pod, then its pod was replaced by one of the same name (a
    // StatefulSet's) while the garbage collector was behind: the runner's owner is gone, and
    // nothing has deleted it.
    let before = backend(&kube)
        .image(SLEEPER)
        .args(["600"])
        .build()
        .await
        .unwrap();
    common::leave_behind(&before).await;
    drop(before);
    let stale = running_runner_pod(&kube).await;
    kube.hold_garbage_collection();
    kube.replace_parent_pod();
    assert!(kube.runner_pods().iter().any(|p| p.name == stale.name));

    // The new parent pod's pool sweeps it at start.
    let pool = pool(backend(&kube).build().await.unwrap())
        .build()
        .await
        .unwrap();
    assert!(
        kube.wait_for(10 * SECOND, |c| c.pods_deleted == 2).await,
        "the old parent pod and its runner: {:?}",
        kube.counts()
    );
    assert!(kube.runner_pods().is_empty());
    assert_eq!(
        kube.counts().pods_collected,
        0,
        "the sweep did it, not the collector"
    );
    common::wait_dead(stale.pid.unwrap(), 10 * SECOND).await;
    // The collector, once back, takes the Secret its pod left.
    kube.release_garbage_collection();
    pool.call(&SLEEP, 1).await.unwrap();
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn every_api_request_is_traced_and_counted() {
    use metrics_util::debugging::DebuggingRecorder;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this test binary");
    let (logs, _guard) = common::CapturedLogs::install_at(tracing::Level::DEBUG);
    let kube = fake().await;
    let pool = pool(backend(&kube).build().await.unwrap())
        .idle_shutdown_after(SECOND / 5)
        .build()
        .await
        .unwrap();
    pool.call(&SLEEP, 1).await.unwrap();
    // Once the watch is up and the runner idled down, the next request is the next pod's
    // create: it gets the one 500.
    let mut counts = pool.watch_runners();
    within(
        10 * SECOND,
        counts.wait_for(|c| c.ready == 0 && c.draining == 0),
    )
    .await
    .unwrap();
    assert!(kube.all_cleaned_up(10 * SECOND).await);
    kube.fail_next_requests(1);
    pool.call(&SLEEP, 1).await.unwrap();
    drop(counts);
    let create = logs
        .line(|l| {
            l.contains(r#"kubernetes_request{verb="create" resource="pods""#)
                && l.contains("request done")
        })
        .await;
    assert!(create.contains("duration_ms="), "{create}");
    shut_down_clean(pool, &kube).await;

    let snapshot = snapshotter.snapshot().into_vec();
    let count = |verb: &str, resource: &str, status: &str| {
        let labels = [("verb", verb), ("resource", resource), ("status", status)];
        common::counter(&snapshot, "firebrand_kubernetes_requests_total", &labels)
    };
    // The recorder is the whole test binary's: other tests running at once count too, so
    // these are floors.
    assert!(count("create", "pods", "500") >= 1);
    assert!(count("create", "pods", "ok") >= 2);
    assert!(count("create", "secrets", "ok") >= 2);
    assert!(count("delete", "pods", "ok") >= 2);
    assert!(
        count("get", "pods", "ok") >= 1,
        "the parent pod, read at build"
    );
    assert!(snapshot
        .iter()
        .any(|(key, ..)| key.key().name() == "firebrand_kubernetes_request_seconds"));
}

#[tokio::test]
async fn a_watch_that_rbac_denies_fails_the_boot_naming_it() {
    let kube = fake().await;
    kube.deny("list", "pods");
    // A pod whose runner never dials: only the watch could say why (a runner that says hello
    // is admitted whatever the watch is doing).
    kube.stall_next_pod();
    let pool = pool(backend(&kube).build().await.unwrap())
        .boot_timeout(60 * SECOND)
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let error = pool.call(&SLEEP, 1).await.unwrap_err();
    let shown = boot_failure(&error);
    assert!(shown.contains("RBAC denied `list` on `pods`"), "{shown}");
    assert!(
        started.elapsed() < 20 * SECOND,
        "not left to the boot timeout"
    );
    kube.allow_all();
    shut_down_clean(pool, &kube).await;
}

/// A pool of up to two runners of one call each, its first runner up.
async fn two_runner_pool(kube: &firebrand_k8s_fake::FakeKube) -> firebrand::Pool {
    let pool = pool(backend(kube).build().await.unwrap())
        .max(2)
        .max_concurrency(1)
        .build()
        .await
        .unwrap();
    pool.call(&SLEEP, 1).await.unwrap();
    pool
}

/// A call of `ms` that holds the pool's one runner, once it is running there.
async fn hold_the_runner(
    pool: &firebrand::Pool,
    ms: u64,
) -> tokio::task::JoinHandle<Result<(), CallError>> {
    let long = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call(&SLEEP, ms).await })
    };
    let placed = Instant::now();
    while pool.stats().in_flight == 0 {
        assert!(
            placed.elapsed() < 10 * SECOND,
            "the long call never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    long
}

#[tokio::test]
async fn a_watch_refused_while_rbac_loads_is_tried_again_within_the_grace() {
    let kube = fake().await;
    let pool = two_runner_pool(&kube).await;
    // Failures in a row grow the watch's backoff to seconds, as while an API server restarts.
    kube.fail_pod_watches(true);
    assert!(
        kube.wait_for(60 * SECOND, |c| c.server_errors >= 5).await,
        "{:?}",
        kube.counts()
    );
    // Back, but refusing while its RBAC caches fill: a few seconds, under the grace.
    kube.deny("list", "pods");
    kube.deny("watch", "pods");
    let forbidden = kube.counts().forbidden;
    kube.fail_pod_watches(false);
    assert!(
        kube.wait_for(60 * SECOND, |c| c.forbidden > forbidden)
            .await,
        "the watch was refused: {:?}",
        kube.counts()
    );
    let refused = Instant::now();
    tokio::time::sleep(3 * SECOND).await;
    let watches = kube.counts().watches;
    kube.allow_all();
    // The refusal is retried every half second, not after the backoff the failures grew.
    assert!(
        kube.wait_for(3 * SECOND, |c| c.watches > watches).await,
        "the watch came back soon after RBAC did: {:?}",
        kube.counts()
    );
    // Past the grace from the first refusal: a boot now is not failed by a refusal that the
    // watch has not tried again since.
    tokio::time::sleep((6 * SECOND).saturating_sub(refused.elapsed())).await;
    let long = hold_the_runner(&pool, 3_000).await;
    pool.call(&SLEEP, 1).await.unwrap();
    long.await.unwrap().unwrap();
    assert_eq!(kube.counts().pods_created, 2);
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn a_boot_completes_while_the_pod_watch_is_down() {
    let kube = fake().await;
    let pool = two_runner_pool(&kube).await;
    // Every list and watch of pods fails from here on, as while etcd elects a leader.
    kube.fail_pod_watches(true);
    // A long call holds the one runner; a second call needs a runner booted while the watch
    // is down. Its boot is admitted when its runner says hello (the watch would only bring a
    // reason to fail), so it finishes first.
    let long = hold_the_runner(&pool, 10_000).await;
    pool.call(&SLEEP, 1).await.unwrap();
    assert!(
        !long.is_finished(),
        "the second call ran on a runner of its own"
    );
    let counts = kube.counts();
    assert_eq!(counts.pods_created, 2, "{counts:?}");
    assert!(counts.server_errors > 0, "the watch was down: {counts:?}");
    kube.fail_pod_watches(false);
    long.await.unwrap().unwrap();
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn an_expired_watch_lists_again_at_once_after_earlier_failures() {
    let kube = fake().await;
    let pool = pool(backend(&kube).build().await.unwrap())
        .build()
        .await
        .unwrap();
    pool.call(&SLEEP, 1).await.unwrap();
    // Failures in a row, which grow the watch's backoff.
    kube.fail_pod_watches(true);
    assert!(
        kube.wait_for(60 * SECOND, |c| c.server_errors >= 4).await,
        "{:?}",
        kube.counts()
    );
    let watches = kube.counts().watches;
    kube.fail_pod_watches(false);
    assert!(
        kube.wait_for(60 * SECOND, |c| c.watches > watches).await,
        "the watch came back: {:?}",
        kube.counts()
    );
    // A 410 is no failure of the server: the re-list goes out at once, not after the backoff
    // the failures grew (seconds by now).
    let lists = kube.counts().pod_lists;
    kube.compact();
    assert!(
        kube.wait_for(2 * SECOND, |c| c.pod_lists > lists).await,
        "re-listed after the 410: {:?}",
        kube.counts()
    );
    assert!(kube.counts().watches_expired >= 1);
    shut_down_clean(pool, &kube).await;
}

#[tokio::test]
async fn the_sweep_reads_runner_pods_a_page_at_a_time() {
    let kube = fake().await;
    // More runner pods of an earlier incarnation than one page (100) holds; their image cannot
    // be pulled, so that none runs a process.
    let earlier = backend(&kube)
        .incarnation("before-the-restart")
        .image("registry.example.com/gone:1")
        .build()
        .await
        .unwrap();
    let stale = 101;
    for _ in 0..stale {
        common::leave_behind(&earlier).await;
    }
    drop(earlier);
    assert_eq!(kube.runner_pods().len(), stale);
    let pages = kube.counts().pages_beyond_first;
    let pool = pool(backend(&kube).build().await.unwrap())
        .build()
        .await
        .unwrap();
    assert!(
        kube.wait_for(30 * SECOND, |c| c.pods_deleted == stale)
            .await,
        "{:?}",
        kube.counts()
    );
    assert!(
        kube.counts().pages_beyond_first > pages,
        "the sweep read a second page: {:?}",
        kube.counts()
    );
    shut_down_clean(pool, &kube).await;
}
