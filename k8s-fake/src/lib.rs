//! A fake Kubernetes API server and test kubelet, for tests of code that uses Firebrand's
//! `KubernetesBackend`: it validates every Pod, Secret and DeleteOptions body against
//! Kubernetes 1.37's strict JSON Schemas (shipped in this crate; unknown properties are
//! errors) and runs each pod as a local process, so that a real runner dials back over real
//! QUIC.
//!
//! It serves what a pod backend uses, as the API server does: pods (create, get, list with
//! label selectors, watch from a `resourceVersion` with `ADDED`, `MODIFIED` and `DELETED`
//! events, delete with a grace period), secrets (create, get, list, delete), garbage collection
//! by `ownerReferences`, and enough discovery for `kubectl get pods` to work against it (see
//! [`FakeKube::kubeconfig`]). Its kubelet schedules pods onto one node with a number of GPUs
//! (`nvidia.com/gpu`), runs each pod's image as the program it was mapped to with the pod's
//! env (values, secret keys and downward-API fields), and moves it through `Pending`, `Running`
//! and `Succeeded` or `Failed` with container statuses, exit codes and `OOMKilled`.
//!
//! ```no_run
//! use firebrand_k8s_fake::FakeKube;
//!
//! # async fn run() -> std::io::Result<()> {
//! let kube = FakeKube::builder()
//!     .image("registry.example.com/app:1", "target/debug/firebrand-runner")
//!     .parent_pod("app-0")
//!     .start()
//!     .await?;
//! // Point a client at kube.url() with kube.token(), or at the file kube.kubeconfig().
//! // ... run a pool on a KubernetesBackend, then:
//! assert!(kube.live_pods().len() == 1); // only the parent pod is left
//! assert!(kube.invalid_requests().is_empty());
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub)]

mod kubelet;
mod schema;
mod server;
mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

pub use store::PodView;

/// The namespace a fake serves by default.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The name of the fake's one node.
pub const NODE_NAME: &str = "fake-node";
/// The IP every pod of the fake gets: its processes run on this machine, on loopback.
pub const POD_IP: &str = "127.0.0.1";
/// The service account of the parent pod.
pub const PARENT_SERVICE_ACCOUNT: &str = "firebrand-parent";
/// The extended resource the fake node's GPUs are exposed as, as NVIDIA's device plugin does.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// A running fake API server. Dropping it stops the server and kills every pod's process.
pub struct FakeKube {
    addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
    dir: PathBuf,
}

impl std::fmt::Debug for FakeKube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKube")
            .field("addr", &self.addr)
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

/// Builds a [`FakeKube`]. `Debug` does not show the token it accepts.
#[must_use = "a builder does nothing until `start` is called"]
pub struct FakeKubeBuilder {
    token: String,
    namespace: String,
    images: Vec<(String, PathBuf)>,
    parent: Option<String>,
    gpus: u32,
    anonymous_reads: bool,
}

impl std::fmt::Debug for FakeKubeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKubeBuilder")
            .field("namespace", &self.namespace)
            .field("images", &self.images)
            .field("parent", &self.parent)
            .field("gpus", &self.gpus)
            .field("anonymous_reads", &self.anonymous_reads)
            .finish_non_exhaustive()
    }
}

/// Tallies a test can assert on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counts {
    /// Pods created through the API.
    pub pods_created: usize,
    /// Pods removed, by a delete or by garbage collection.
    pub pods_deleted: usize,
    /// Pods removed by garbage collection: their owner was gone.
    pub pods_collected: usize,
    /// Secrets created through the API.
    pub secrets_created: usize,
    /// Secrets removed, by a delete or by garbage collection.
    pub secrets_deleted: usize,
    /// Requests refused for a body that does not validate, or that makes no sense (422).
    pub invalid: usize,
    /// Requests answered 429.
    pub rate_limited: usize,
    /// Requests answered 403: a verb denied with [`FakeKube::deny`].
    pub forbidden: usize,
    /// Requests answered 500 with [`FakeKube::fail_next_requests`].
    pub server_errors: usize,
    /// Requests answered 401: no token, or not the one accepted.
    pub unauthorized: usize,
    /// Watches opened.
    pub watches: usize,
    /// Watches answered with `410 Gone`: their `resourceVersion` was too old.
    pub watches_expired: usize,
    /// Lists of pods answered (not watches).
    pub pod_lists: usize,
    /// Pages of pod lists answered after a first, from a `continue` token.
    pub pages_beyond_first: usize,
}

/// Faults armed for the next requests or pods.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub rate_limit: u32,
    pub retry_after: Option<Duration>,
    pub server_errors: u32,
    pub denied: Vec<(String, String)>,
    pub crash_pods: Vec<i32>,
    pub oom_kill_pods: u32,
    pub stall_pods: u32,
    /// The garbage collector is behind: owners' deletions collect nothing until released.
    pub hold_collection: bool,
    /// Every list and watch of pods answers 500, as during an etcd leader election.
    pub pod_watches_down: bool,
}

pub(crate) struct State {
    pub token: String,
    pub anonymous_reads: bool,
    pub schemas: schema::Schemas,
    pub images: HashMap<String, PathBuf>,
    /// The digest reference of each image given by tag.
    pub digests: HashMap<String, String>,
    pub store: Mutex<store::Store>,
    pub events: broadcast::Sender<store::Event>,
    pub faults: Mutex<Faults>,
    pub counts: watch::Sender<Counts>,
    pub errors: Mutex<Vec<String>>,
    /// Bumped to end every open watch.
    pub watch_generation: watch::Sender<u64>,
    /// Told when GPUs are freed, so that unschedulable pods are tried again.
    pub rescheduled: tokio::sync::Notify,
}

impl State {
    pub(crate) fn count(&self, update: impl FnOnce(&mut Counts)) {
        self.counts.send_modify(update);
    }

    /// Records a request the fake refused as invalid, or a reply of its own that did not
    /// validate (a bug in the fake).
    pub(crate) fn invalid(&self, what: String) {
        tracing::warn!(%what, "invalid");
        self.errors.lock().push(what);
    }
}

impl FakeKube {
    /// A builder: namespace `default`, token `fake-service-account-token`, no images, no
    /// parent pod, no GPUs.
    pub fn builder() -> FakeKubeBuilder {
        FakeKubeBuilder {
            token: "fake-service-account-token".into(),
            namespace: DEFAULT_NAMESPACE.into(),
            images: Vec::new(),
            parent: None,
            gpus: 0,
            anonymous_reads: false,
        }
    }

    /// The API server's base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bearer token the fake accepts.
    pub fn token(&self) -> String {
        self.state.token.clone()
    }

    /// The namespace the fake was built with, where its parent pod is.
    pub fn namespace(&self) -> String {
        self.state.store.lock().namespace.clone()
    }

    /// A kubeconfig file for this fake, with its URL and token, in a folder that is removed
    /// with the fake: for `KUBECONFIG`, and for `kubectl --kubeconfig`.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The digest reference the fake reports as the `imageID` of a container of `image`
    /// (`repo@sha256:...`); the kubelet runs it as it runs `image`.
    pub fn digest_of(&self, image: &str) -> Option<String> {
        self.state.digests.get(image).cloned()
    }

    /// The tallies so far.
    pub fn counts(&self) -> Counts {
        *self.state.counts.borrow()
    }

    /// Waits until `done` holds for the tallies, for at most `timeout`; whether it did.
    pub async fn wait_for(&self, timeout: Duration, done: impl FnMut(&Counts) -> bool) -> bool {
        let mut counts = self.state.counts.subscribe();
        tokio::time::timeout(timeout, counts.wait_for(done))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Every pod the API server holds now, the parent pod included.
    pub fn live_pods(&self) -> Vec<PodView> {
        self.state.store.lock().pod_views()
    }

    /// The runner pods: every live pod but the parent.
    pub fn runner_pods(&self) -> Vec<PodView> {
        let parent = self.state.store.lock().parent.clone();
        self.live_pods()
            .into_iter()
            .filter(|pod| Some(&pod.name) != parent.as_ref())
            .collect()
    }

    /// The names of every secret the API server holds now.
    pub fn live_secrets(&self) -> Vec<String> {
        self.state
            .store
            .lock()
            .secrets
            .keys()
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// Waits until no pod but the parent and no secret is left, for at most `timeout`; whether
    /// that happened.
    pub async fn all_cleaned_up(&self, timeout: Duration) -> bool {
        let mut counts = self.state.counts.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            counts.mark_unchanged();
            if self.runner_pods().is_empty() && self.live_secrets().is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, counts.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// The error messages of requests refused as invalid, and of replies of the fake's own
    /// that failed validation (which would be a bug in the fake).
    pub fn invalid_requests(&self) -> Vec<String> {
        self.state.errors.lock().clone()
    }

    /// Answers the next `count` requests with `429 TooManyRequests`, with `Retry-After` (in
    /// whole seconds) when given.
    pub fn rate_limit_next(&self, count: u32, retry_after: Option<Duration>) {
        let mut faults = self.state.faults.lock();
        faults.rate_limit = count;
        faults.retry_after = retry_after;
    }

    /// Answers the next `count` requests with `500 InternalError`.
    pub fn fail_next_requests(&self, count: u32) {
        self.state.faults.lock().server_errors = count;
    }

    /// Refuses `verb` (`create`, `get`, `list`, `watch`, `delete`) on `resource` (`pods`,
    /// `secrets`) with `403 Forbidden`, as RBAC does without a rule for it, until
    /// [`allow_all`](Self::allow_all).
    pub fn deny(&self, verb: &str, resource: &str) {
        self.state
            .faults
            .lock()
            .denied
            .push((verb.to_owned(), resource.to_owned()));
    }

    /// Lifts every [`deny`](Self::deny).
    pub fn allow_all(&self) {
        self.state.faults.lock().denied.clear();
    }

    /// The next pod's container exits with `code` as soon as it starts.
    pub fn crash_next_pod(&self, code: i32) {
        self.state.faults.lock().crash_pods.push(code);
    }

    /// The next pod's container is killed as it starts, as the kernel's OOM killer does to a
    /// container over its memory limit: `OOMKilled`, exit code 137.
    pub fn oom_kill_next_pod(&self) {
        self.state.faults.lock().oom_kill_pods += 1;
    }

    /// The next pod is scheduled but its container is never created: it stays `Pending`
    /// (`ContainerCreating`) until deleted.
    pub fn stall_next_pod(&self) {
        self.state.faults.lock().stall_pods += 1;
    }

    /// Ends every open watch now, as an API server restart or a load balancer's idle timeout
    /// does. Clients watch again from the last `resourceVersion` they saw.
    pub fn drop_watches(&self) {
        self.state.watch_generation.send_modify(|g| *g += 1);
    }

    /// From `down` on, every list and watch of pods answers `500 InternalError` and open
    /// watches end, as while etcd elects a leader or an API server restarts behind a load
    /// balancer; other requests go on. Until `fail_pod_watches(false)`.
    pub fn fail_pod_watches(&self, down: bool) {
        self.state.faults.lock().pod_watches_down = down;
        if down {
            self.drop_watches();
        }
    }

    /// Forgets the event history (as etcd's compaction does) and ends every open watch: a
    /// client that watches again from a `resourceVersion` it saw gets `410 Gone` and must list
    /// again.
    pub fn compact(&self) {
        self.state.store.lock().compact();
        self.drop_watches();
    }

    /// Deletes pod `name` in the fake's namespace, with the pod's own grace period, as
    /// `kubectl delete pod` does; its dependents are garbage collected. Whether it existed.
    pub fn delete_pod(&self, name: &str) -> bool {
        let namespace = self.namespace();
        store::delete_pod(&self.state, &namespace, name, None).is_some()
    }

    /// Holds the garbage collector back, as a busy or lagging controller manager does: a pod
    /// deleted from now on leaves its dependents in place until
    /// [`release_garbage_collection`](Self::release_garbage_collection).
    pub fn hold_garbage_collection(&self) {
        self.state.faults.lock().hold_collection = true;
    }

    /// Lets the garbage collector go again: it deletes every object whose owner is gone.
    pub fn release_garbage_collection(&self) {
        self.state.faults.lock().hold_collection = false;
        let mut store = self.state.store.lock();
        store::collect_orphans(&self.state, &mut store);
    }

    /// Deletes the parent pod and makes a new one of the same name, with a new uid, as a
    /// StatefulSet does when its pod is deleted: the old parent's runners' owner is gone,
    /// though a pod of its name exists.
    pub fn replace_parent_pod(&self) {
        let (namespace, parent, image, digest) = {
            let store = self.state.store.lock();
            let Some(parent) = store.parent.clone() else {
                return;
            };
            let object = &store.pods[&(store.namespace.clone(), parent.clone())].object;
            let status = &object["status"]["containerStatuses"][0];
            (
                store.namespace.clone(),
                parent,
                status["image"].as_str().unwrap_or_default().to_owned(),
                status["imageID"].as_str().unwrap_or_default().to_owned(),
            )
        };
        {
            let mut store = self.state.store.lock();
            store::remove_pod(&self.state, &mut store, &namespace, &parent);
        }
        store::add_parent(&self.state, &parent, &image, &digest);
    }

    /// Records a restart of the parent pod's container: its `restartCount` goes up, and its
    /// name and uid stay, as they do in a real cluster (so garbage collection does not fire).
    pub fn restart_parent_container(&self) {
        let mut store = self.state.store.lock();
        let Some(parent) = store.parent.clone() else {
            return;
        };
        let namespace = store.namespace.clone();
        store.update_pod(&self.state, &namespace, &parent, |pod| {
            let status = &mut pod["status"]["containerStatuses"][0];
            let restarts = status["restartCount"].as_i64().unwrap_or(0);
            status["restartCount"] = json!(restarts + 1);
        });
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.server.abort();
        self.state.store.lock().kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl FakeKubeBuilder {
    /// The token the fake accepts (default `fake-service-account-token`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = token.into();
        self
    }

    /// The namespace of the parent pod and of the kubeconfig's context (default `default`).
    /// Pods may be made in any namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Runs pods of `image` (and of its digest reference, see [`FakeKube::digest_of`]) as
    /// `program`, unless the pod's container names a `command`. An image with no program fails
    /// to pull (`ErrImagePull`, then `ImagePullBackOff`).
    pub fn image(mut self, image: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        self.images.push((image.into(), program.into()));
        self
    }

    /// A pod named `name` that stands for the parent: `Running`, with the first image's
    /// container (named `app`) and its digest as `imageID`, pod IP 127.0.0.1, service account
    /// `firebrand-parent`. Its kubelet runs nothing: the test process is the parent.
    pub fn parent_pod(mut self, name: impl Into<String>) -> Self {
        self.parent = Some(name.into());
        self
    }

    /// GPUs on the fake's node, exposed as `nvidia.com/gpu` (default 0: a pod that asks for a
    /// GPU is unschedulable).
    pub fn gpus(mut self, gpus: u32) -> Self {
        self.gpus = gpus;
        self
    }

    /// Lets requests without credentials `get`, `list` and `watch` (as `system:anonymous` with
    /// a read-only role): for `kubectl`, which sends no token to a server on plain HTTP.
    /// Default: off, every request needs the token.
    pub fn anonymous_reads(mut self, allowed: bool) -> Self {
        self.anonymous_reads = allowed;
        self
    }

    /// Binds to a loopback port and starts serving.
    ///
    /// # Errors
    /// The error binding the listener or writing the kubeconfig.
    pub async fn start(self) -> std::io::Result<FakeKube> {
        let mut images = HashMap::new();
        let mut digests = HashMap::new();
        let mut first_image = None;
        for (image, program) in &self.images {
            let digest = format!(
                "{}@sha256:{}{}",
                repository(image),
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            images.insert(image.clone(), program.clone());
            images.insert(digest.clone(), program.clone());
            digests.insert(image.clone(), digest.clone());
            first_image.get_or_insert((image.clone(), digest));
        }
        let (events, _) = broadcast::channel(store::EVENT_BUFFER);
        let state = Arc::new(State {
            token: self.token,
            anonymous_reads: self.anonymous_reads,
            schemas: schema::Schemas::load(),
            images,
            digests,
            store: Mutex::new(store::Store::new(self.namespace.clone(), self.gpus)),
            events,
            faults: Mutex::new(Faults::default()),
            counts: watch::channel(Counts::default()).0,
            errors: Mutex::new(Vec::new()),
            watch_generation: watch::channel(0).0,
            rescheduled: tokio::sync::Notify::new(),
        });
        if let Some(name) = &self.parent {
            let (image, digest) = first_image.clone().unwrap_or_default();
            store::add_parent(&state, name, &image, &digest);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let dir = std::env::temp_dir().join(format!(
            "firebrand-k8s-fake-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        write_kubeconfig(&dir.join("kubeconfig"), addr, &state.token, &self.namespace)?;
        let router = server::router(Arc::clone(&state));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(FakeKube {
            addr,
            state,
            server,
            dir,
        })
    }
}

/// An image reference without its tag or digest: `registry.example.com/app`.
fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rsplit_once(':') {
        // A colon after the last slash is a tag; one before it is a registry's port.
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => image,
    }
}

fn write_kubeconfig(
    path: &Path,
    addr: SocketAddr,
    token: &str,
    namespace: &str,
) -> std::io::Result<()> {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": format!("http://{addr}")}}],
        "users": [{"name": "fake", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        "current-context": "fake",
    });
    // JSON is YAML: kubectl and kube-rs read either.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    use std::io::Write as _;
    options
        .open(path)?
        .write_all(serde_json::to_string_pretty(&config)?.as_bytes())
}

/// Labels as a map, from an object's `metadata.labels`.
pub(crate) fn labels_of(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}
