//! What the Kubernetes backend adds to a cold boot: the time from `pool.call` to the moment
//! every call of a burst had a runner, for 1 and for 8 runners at once, against the local
//! backend starting the same runner binary, in the same run. Twice: on the fake API server
//! (whose kubelet starts a pod's process at once), and on the real control plane
//! (kube-apiserver with etcd, kube-scheduler binding each pod, kube-controller-manager, and the
//! test kubelet starting the process once it sees the binding), when `go` can build it. The
//! difference is the backend's own work per boot (the pod's create, its Secret's create) and,
//! on the real one, admission, scheduling and the kubelet's watch.
//!
//! ```sh
//! cargo bench --bench kubernetes && python3 benches/summary.py
//! ```

mod support;

use std::time::Duration;

use firebrand::backend::kubernetes::{KubernetesBackend, KubernetesBackendBuilder};
use firebrand::{Backend, LocalBackend, Pool, PoolEvent};
use firebrand_k8s_fake::FakeKube;
use firebrand_runner::SLEEP;
use support::RUNNER;

const IMAGE: &str = "registry.example.com/bench-app:v1";
const PARENT: &str = "bench-app-0";
const SAMPLES: usize = 7;

/// `runners` calls at once on a pool with no runner up, each holding its runner, so that each
/// needs a runner of its own: the longest queue wait, which is when the last had its runner.
async fn burst(pool: &Pool, runners: usize) -> Duration {
    use futures_util::StreamExt as _;
    let mut events = pool.events();
    let calls = (0..runners).map(|_| async {
        pool.call(&SLEEP, 300).await.unwrap();
    });
    let calls = futures_util::future::join_all(calls);
    let waits = async {
        let mut longest = Duration::ZERO;
        let mut seen = 0;
        while seen < runners {
            if let Some(PoolEvent::CallStarted { queued_for, .. }) = events.next().await {
                longest = longest.max(queued_for);
                seen += 1;
            }
        }
        longest
    };
    tokio::join!(calls, waits).1
}

/// The median over the samples of `runners` at once on `backend`, each from no runner up.
async fn case(backend: impl Backend, runners: usize) -> f64 {
    let pool = Pool::builder()
        .registry(&firebrand_runner::registry())
        .backend(backend)
        .max(runners)
        .max_concurrency(1)
        .idle_shutdown_after(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let mut samples = Vec::new();
    for _ in 0..SAMPLES {
        samples.push(burst(&pool, runners).await);
        let mut stats = pool.watch_runners();
        let idle = stats.wait_for(|s| s.ready == 0 && s.booting == 0 && s.draining == 0);
        tokio::time::timeout(Duration::from_secs(60), idle)
            .await
            .expect("the pool idles down")
            .unwrap();
    }
    pool.shutdown().await;
    samples.sort_unstable();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

/// A backend for parent pod [`PARENT`] in `namespace`, through `kubeconfig`.
async fn backend(namespace: String, kubeconfig: std::path::PathBuf) -> KubernetesBackend {
    KubernetesBackendBuilder::from_vars(move |name| match name {
        "POD_NAME" => Some(PARENT.to_owned()),
        "POD_NAMESPACE" => Some(namespace.clone()),
        _ => None,
    })
    .kubeconfig(kubeconfig)
    .build()
    .await
    .unwrap()
}

/// The cases on the real control plane, when it can be built here.
async fn real_control_plane(results: &mut serde_json::Map<String, serde_json::Value>) {
    use firebrand_k8s_control_plane::{ControlPlane, Images};
    let images = Images::new().image(IMAGE, RUNNER);
    let Some(plane) = ControlPlane::private("benches/kubernetes.rs", images) else {
        return;
    };
    let namespace = plane.namespace("bench").await;
    let parent = serde_json::json!({
        "metadata": {"name": PARENT},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": IMAGE}],
        },
    });
    plane.in_process_pod(&namespace, parent).await;
    for runners in [1, 8] {
        let local = case(LocalBackend::builder().command(RUNNER).build(), runners).await;
        let kubeconfig = plane.admin_kubeconfig(&namespace);
        let pods = case(backend(namespace.clone(), kubeconfig).await, runners).await;
        let result = serde_json::json!({ "local_ms": local, "kubernetes_ms": pods });
        println!("{runners} at once, real control plane: {result}");
        results.insert(format!("cold_{runners}_control_plane"), result);
    }
}

fn main() {
    // `cargo bench` passes criterion-style flags; this harness takes none.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let results = rt.block_on(async {
        let kube = FakeKube::builder()
            .image(IMAGE, RUNNER)
            .parent_pod(PARENT)
            .start()
            .await
            .unwrap();
        let namespace = kube.namespace();
        let mut results = serde_json::Map::new();
        for runners in [1, 8] {
            let local = case(LocalBackend::builder().command(RUNNER).build(), runners).await;
            let backend = backend(namespace.clone(), kube.kubeconfig()).await;
            let pods = case(backend, runners).await;
            let result = serde_json::json!({ "local_ms": local, "kubernetes_ms": pods });
            println!("{runners} at once: {result}");
            results.insert(format!("cold_{runners}"), result);
        }
        assert!(kube.all_cleaned_up(Duration::from_secs(30)).await);
        assert_eq!(kube.invalid_requests(), Vec::<String>::new());
        real_control_plane(&mut results).await;
        serde_json::Value::Object(results)
    });
    support::write_results("kubernetes", &results);
}
