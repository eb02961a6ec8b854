//! A Kubernetes app whose parent pod boots runner pods from its own image.
//!
//! In a cluster (see `docs/kubernetes.md` for the Deployment, its downward-API env and RBAC):
//!
//! ```sh
//! kubectl apply -f deploy.yaml   # the Dockerfile builds this example as the app's binary
//! ```
//!
//! Here, against the fake API server, whose kubelet runs each pod as a local copy of this
//! binary and which validates every Pod, Secret and DeleteOptions body against Kubernetes
//! 1.37's strict schemas:
//!
//! ```sh
//! cargo run --example k8s_app -- --fake
//! ```

use std::time::{Duration, Instant};

use firebrand::backend::kubernetes::{KubernetesBackend, KubernetesBackendBuilder};
use firebrand::{job, Pool};

/// Count the primes below a bound: stand-in CPU work for a runner pod.
#[job(idempotent)]
fn count_primes(below: u64) -> (u64, String) {
    let count = (2..below)
        .filter(|n| (2..).take_while(|d| d * d <= *n).all(|d| n % d != 0))
        .count() as u64;
    // Which pod did the work: a pod's hostname is its name.
    let pod = std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into());
    (count, pod)
}

fn main() -> anyhow::Result<()> {
    // In a runner pod this serves jobs and exits: the pod runs this binary, as its parent does.
    firebrand::run_if_child();

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let fake = std::env::args().any(|arg| arg == "--fake");
    tokio::runtime::Runtime::new()?.block_on(parent(fake))
}

async fn parent(fake: bool) -> anyhow::Result<()> {
    // Keep the fake alive as long as the pool.
    let (backend, kube) = if fake {
        let (builder, kube) = fake_cluster().await?;
        (builder.build().await?, Some(kube))
    } else {
        (KubernetesBackend::from_env().await?, None)
    };
    println!(
        "runner pods in namespace {} from image {}",
        backend.namespace(),
        backend.image()
    );
    let pool = Pool::builder()
        .backend(backend)
        .max(3)
        .max_concurrency(2)
        .boot_timeout(Duration::from_secs(120))
        .idle_shutdown_after(Duration::from_secs(10))
        .build()
        .await?;

    let started = Instant::now();
    let calls = (1..=12).map(|i| pool.call(&count_primes, 20_000 * i));
    for result in futures_util::future::try_join_all(calls).await? {
        println!("{:>6} primes, counted in pod {}", result.0, result.1);
    }
    println!("12 jobs in {:.1?} on {:?}", started.elapsed(), pool.stats());
    pool.shutdown().await;

    if let Some(kube) = kube {
        let all_gone = kube.all_cleaned_up(Duration::from_secs(10)).await;
        let counts = kube.counts();
        println!(
            "fake cluster: {} pods created, {} deleted, {} secrets created, {} deleted, {} invalid requests",
            counts.pods_created,
            counts.pods_deleted,
            counts.secrets_created,
            counts.secrets_deleted,
            counts.invalid
        );
        anyhow::ensure!(
            all_gone && kube.invalid_requests().is_empty(),
            "the fake saw a leak or a bad request: {:?}",
            kube.invalid_requests()
        );
    }
    Ok(())
}

/// A fake API server whose image is this very binary, with a pod standing for this parent,
/// and a backend pointed at it as a parent pod would be by its downward-API env.
async fn fake_cluster() -> anyhow::Result<(KubernetesBackendBuilder, firebrand_k8s_fake::FakeKube)>
{
    use firebrand_k8s_fake::FakeKube;
    const IMAGE: &str = "registry.example.com/k8s-app-example:v1";
    const POD: &str = "k8s-app-example-5d8f7c9b4-x2k4q";
    let kube = FakeKube::builder()
        .image(IMAGE, std::env::current_exe()?)
        .parent_pod(POD)
        .start()
        .await?;
    let namespace = kube.namespace();
    let builder = KubernetesBackendBuilder::from_vars(move |name| {
        Some(match name {
            "POD_NAME" => POD.to_owned(),
            "POD_NAMESPACE" => namespace.clone(),
            "RUST_LOG" => std::env::var("RUST_LOG").ok()?,
            _ => return None,
        })
    })
    .kubeconfig(kube.kubeconfig());
    Ok((builder, kube))
}
