//! A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler built from their Go modules (`build.sh` beside this crate), started on
//! loopback with certificates and tokens of their own, and a test [kubelet](Kubelet) that
//! registers a Node and runs the pods bound to it as local processes.
//!
//! Only the kubelet is ours. Validation, defaulting, admission (Pod Security, ResourceQuota,
//! ServiceAccount), RBAC, watches (bookmarks, 410s), scheduling and garbage collection are
//! Kubernetes' own, at v1.37.2.
//!
//! ```no_run
//! # async fn run() {
//! use firebrand_k8s_control_plane::ControlPlane;
//!
//! let Some(plane) = ControlPlane::shared("my_test") else { return };
//! let namespace = plane.namespace("my-test").await;
//! let kubeconfig = plane.admin_kubeconfig(&namespace);
//! # }
//! ```
//!
//! Every process it starts dies with the test process (`PR_SET_PDEATHSIG`), also when a test
//! panics or the harness is killed; a [`ControlPlane::start`]ed one stops its processes when
//! dropped.

mod certs;
mod kubelet;
mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use parking_lot::Mutex;
use serde_json::json;

pub use kubelet::{IN_PROCESS_ANNOTATION, NODE_GPUS, NODE_NAME};

use process::Daemon;

/// Set (to anything but `0`) to make a control plane that cannot be built or started a test
/// failure rather than a skip. `.ci/run` sets it.
pub const REQUIRE_ENV: &str = "FIREBRAND_REQUIRE_CONTROL_PLANE";

/// The Kubernetes version built, as the API server reports it.
pub const KUBERNETES_VERSION: &str = "v1.37.2";

/// How long the API server and the controllers get to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a control plane is not there.
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// Whether [`REQUIRE_ENV`] is set.
#[must_use]
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The built binaries' folder: builds them with `build.sh` on first use (once per process,
/// and reused across processes while the pinned versions are unchanged).
///
/// # Errors
/// `go` is not on the PATH, or the build failed (its output went to stderr).
pub fn binaries() -> Result<&'static Path, Unavailable> {
    static BUILT: OnceLock<Result<PathBuf, Unavailable>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let go = std::process::Command::new("go").arg("version").output();
            if !go.is_ok_and(|o| o.status.success()) {
                return Err(Unavailable("`go` is not on the PATH".into()));
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build.sh");
            let started = Instant::now();
            let output = std::process::Command::new("bash")
                .arg(&script)
                .stderr(std::process::Stdio::inherit())
                .output()
                .map_err(|e| Unavailable(format!("cannot run {}: {e}", script.display())))?;
            if !output.status.success() {
                return Err(Unavailable(format!(
                    "{} failed ({}); its output is above",
                    script.display(),
                    output.status
                )));
            }
            let stdout = String::from_utf8_lossy(&output.stdout);
            let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
            say(&format!(
                "k8s control plane: binaries in {} ({:.1} s to check or build)",
                dir.display(),
                started.elapsed().as_secs_f64()
            ));
            Ok(dir)
        })
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(Clone::clone)
}

/// What a [`ControlPlane`]'s kubelet runs: images by repository (tag and digest ignored), each
/// a local program.
#[derive(Debug, Clone, Default)]
pub struct Images(BTreeMap<String, PathBuf>);

impl Images {
    /// No images.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Pods whose image is `image` (any tag or digest of its repository) run `program`.
    #[must_use]
    pub fn image(mut self, image: &str, program: impl Into<PathBuf>) -> Self {
        self.0
            .insert(kubelet::repository(image).to_owned(), program.into());
        self
    }
}

/// A running control plane and its kubelet. See the [crate] docs.
pub struct ControlPlane {
    dir: PathBuf,
    url: String,
    ca: PathBuf,
    admin_token: String,
    apiserver_args: Vec<String>,
    binaries: PathBuf,
    apiserver: Mutex<Option<Daemon>>,
    /// etcd, the controller manager and the scheduler: killed when dropped.
    daemons: Vec<Daemon>,
    runtime: Option<tokio::runtime::Runtime>,
    processes: kubelet::Processes,
    /// Whether the run's folder goes with it: not while it is starting, so that the logs of a
    /// start that failed stay for the reader.
    remove_dir: bool,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The kubelet first, which kills the pods' processes as its tasks are dropped.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        if let Some(mut apiserver) = self.apiserver.lock().take() {
            apiserver.kill();
        }
        for daemon in &mut self.daemons {
            daemon.kill();
        }
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl ControlPlane {
    /// The control plane this test process shares between its tests (each in a namespace of
    /// its own), started on first use with `images`; `None`, after printing why the test
    /// `test` is skipped, when it is unavailable and [`REQUIRE_ENV`] is not set.
    ///
    /// # Panics
    /// When it is unavailable and [`REQUIRE_ENV`] is set.
    pub fn shared_with(test: &str, images: impl FnOnce() -> Images) -> Option<&'static Self> {
        static SHARED: OnceLock<Result<ControlPlane, Unavailable>> = OnceLock::new();
        match SHARED.get_or_init(|| Self::start(images())) {
            Ok(plane) => Some(plane),
            Err(why) => skip(test, why),
        }
    }

    /// [`shared_with`](Self::shared_with) no images: for tests that run only in-process pods.
    pub fn shared(test: &str) -> Option<&'static Self> {
        Self::shared_with(test, Images::new)
    }

    /// A control plane of its own, for a test that disrupts it (restarts the API server):
    /// `None` as [`shared_with`](Self::shared_with).
    ///
    /// # Panics
    /// When it is unavailable and [`REQUIRE_ENV`] is set.
    pub fn private(test: &str, images: Images) -> Option<Self> {
        match Self::start(images) {
            Ok(plane) => Some(plane),
            Err(why) => skip(test, &why),
        }
    }

    /// Builds the binaries if needed, starts etcd, kube-apiserver, kube-controller-manager,
    /// kube-scheduler and the kubelet, and waits until they are ready. Blocks; callable from
    /// inside an async test.
    ///
    /// # Errors
    /// What could not be built or started, and where its log is.
    pub fn start(images: Images) -> Result<Self, Unavailable> {
        let binaries = binaries()?.to_path_buf();
        // Its own thread: the runtime that will run the kubelet cannot be entered from the
        // caller's.
        std::thread::spawn(move || Self::start_blocking(&binaries, images))
            .join()
            .map_err(|_| Unavailable("starting the control plane panicked".into()))?
    }

    fn start_blocking(binaries: &Path, images: Images) -> Result<Self, Unavailable> {
        let started = Instant::now();
        let dir = process::run_dir().map_err(|e| Unavailable(format!("run dir: {e}")))?;
        let fail = |what: &str, e: &dyn std::fmt::Display| Unavailable(format!("{what}: {e}"));
        let certs = certs::write(&dir).map_err(|e| fail("certificates", &e))?;
        let tokens = certs::Tokens::new();
        tokens
            .write(&dir.join("tokens.csv"))
            .map_err(|e| fail("tokens", &e))?;
        let etcd_port = process::free_port().map_err(|e| fail("port", &e))?;
        let peer_port = process::free_port().map_err(|e| fail("port", &e))?;
        let api_port = process::free_port().map_err(|e| fail("port", &e))?;
        let url = format!("https://127.0.0.1:{api_port}");
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let path = |p: &Path| p.display().to_string();
        let etcd = Daemon::spawn(
            &dir,
            "etcd",
            &binaries.join("etcd"),
            &[
                "--name=default".into(),
                format!("--data-dir={}", path(&dir.join("etcd"))),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--log-level=warn".into(),
                // Nothing in a test outlives it: no need to sync every write to disk.
                "--unsafe-no-fsync".into(),
            ],
        )
        .map_err(|e| fail("etcd", &e))?;
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            // The endpoint reconciler refuses a loopback advertise address.
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", path(&certs.server_cert)),
            format!("--tls-private-key-file={}", path(&certs.server_key)),
            format!("--client-ca-file={}", path(&certs.ca_cert)),
            format!("--token-auth-file={}", path(&dir.join("tokens.csv"))),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!(
                "--service-account-key-file={}",
                path(&certs.service_account_public_key)
            ),
            format!(
                "--service-account-signing-key-file={}",
                path(&certs.service_account_key)
            ),
            // Configuration only: nothing routes there, and nothing is sent there.
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--authorization-mode=Node,RBAC".into(),
        ];
        let apiserver = Daemon::spawn(
            &dir,
            "kube-apiserver",
            &binaries.join("kube-apiserver"),
            &apiserver_args,
        )
        .map_err(|e| fail("kube-apiserver", &e))?;
        let plane_kubeconfig = |name: &str, token: &str| {
            let file = dir.join(format!("{name}.kubeconfig"));
            write_kubeconfig(&file, &url, &certs.ca_cert, token, "default")
                .map(|()| path(&file))
                .map_err(|e| fail("kubeconfig", &e))
        };
        let cm_config = plane_kubeconfig("kube-controller-manager", &tokens.controller_manager)?;
        let scheduler_config = plane_kubeconfig("kube-scheduler", &tokens.scheduler)?;
        let admin_config = plane_kubeconfig("admin", &tokens.admin)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-kubelet")
            .enable_all()
            .build()
            .map_err(|e| fail("runtime", &e))?;
        let mut plane = ControlPlane {
            dir: dir.clone(),
            url: url.clone(),
            ca: certs.ca_cert.clone(),
            admin_token: tokens.admin.clone(),
            apiserver_args,
            binaries: binaries.to_path_buf(),
            apiserver: Mutex::new(Some(apiserver)),
            daemons: vec![etcd],
            runtime: None,
            processes: Default::default(),
            remove_dir: false,
        };
        runtime.block_on(plane.wait_ready())?;
        let cm_port = process::free_port().map_err(|e| fail("port", &e))?;
        let controller_manager = Daemon::spawn(
            &dir,
            "kube-controller-manager",
            &binaries.join("kube-controller-manager"),
            &[
                format!("--kubeconfig={cm_config}"),
                format!("--authentication-kubeconfig={cm_config}"),
                format!("--authorization-kubeconfig={cm_config}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={cm_port}"),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=true".into(),
                format!(
                    "--service-account-private-key-file={}",
                    path(&certs.service_account_key)
                ),
                format!("--root-ca-file={}", path(&certs.ca_cert)),
                format!("--cluster-signing-cert-file={}", path(&certs.ca_cert)),
                format!("--cluster-signing-key-file={}", path(&certs.ca_key)),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
            ],
        )
        .map_err(|e| fail("kube-controller-manager", &e))?;
        plane.daemons.push(controller_manager);
        let scheduler_port = process::free_port().map_err(|e| fail("port", &e))?;
        let scheduler = Daemon::spawn(
            &dir,
            "kube-scheduler",
            &binaries.join("kube-scheduler"),
            &[
                format!("--kubeconfig={scheduler_config}"),
                format!("--authentication-kubeconfig={scheduler_config}"),
                format!("--authorization-kubeconfig={scheduler_config}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={scheduler_port}"),
                "--leader-elect=false".into(),
            ],
        )
        .map_err(|e| fail("kube-scheduler", &e))?;
        plane.daemons.push(scheduler);
        let kubelet_client = runtime
            .block_on(client_from(Path::new(&admin_config)))
            .map_err(|e| fail("kubelet client", &e))?;
        runtime
            .block_on(kubelet::start(
                kubelet_client,
                images,
                dir.join("pods"),
                Arc::clone(&plane.processes),
            ))
            .map_err(|e| fail("kubelet", &e))?;
        plane.runtime = Some(runtime);
        plane.remove_dir = true;
        say(&format!(
            "k8s control plane: {url} ready in {:.1} s; logs in {}",
            started.elapsed().as_secs_f64(),
            dir.display()
        ));
        Ok(plane)
    }

    /// Waits for the API server's `/readyz`.
    async fn wait_ready(&self) -> Result<(), Unavailable> {
        let client = client_from(&self.write_admin_kubeconfig("default"))
            .await
            .map_err(|e| Unavailable(format!("admin client: {e}")))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a valid request");
            let exited = self.apiserver.lock().as_mut().and_then(Daemon::exited);
            if let Some(status) = exited {
                return Err(Unavailable(format!(
                    "kube-apiserver exited ({status}); see {}",
                    self.dir.join("kube-apiserver.log").display()
                )));
            }
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(Unavailable(format!(
                        "kube-apiserver not ready after {READY_TIMEOUT:?}; see {}",
                        self.dir.join("kube-apiserver.log").display()
                    )))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The processes the kubelet runs now for pods of `namespace`: (pod name, pid).
    #[must_use]
    pub fn processes(&self, namespace: &str) -> Vec<(String, u32)> {
        self.processes
            .lock()
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, name), pid)| (name.clone(), *pid))
            .collect()
    }

    /// The API server's URL.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where the components' logs and the pods' output are.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_admin_kubeconfig(&self, namespace: &str) -> PathBuf {
        let file = self.dir.join(format!("admin-{namespace}.kubeconfig"));
        write_kubeconfig(&file, &self.url, &self.ca, &self.admin_token, namespace)
            .expect("the run dir is writable");
        file
    }

    /// A kubeconfig for a cluster admin (`system:masters`), `namespace` its default.
    #[must_use]
    pub fn admin_kubeconfig(&self, namespace: &str) -> PathBuf {
        self.write_admin_kubeconfig(namespace)
    }

    /// A client for a cluster admin, made on the caller's runtime.
    ///
    /// # Panics
    /// When the client cannot be made.
    pub async fn admin(&self) -> kube::Client {
        client_from(&self.write_admin_kubeconfig("default"))
            .await
            .expect("an admin client")
    }

    /// Makes namespace `name` with `labels`, and waits for its `default` ServiceAccount (the
    /// controller manager's), which pods need.
    ///
    /// # Panics
    /// When the API refuses, or the ServiceAccount does not come.
    pub async fn namespace_with(&self, name: &str, labels: &[(&str, &str)]) -> String {
        let client = self.admin().await;
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
        }))
        .expect("a Namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        let accounts = Api::<ServiceAccount>::namespaced(client, name);
        let deadline = Instant::now() + READY_TIMEOUT;
        while accounts.get_opt("default").await.ok().flatten().is_none() {
            assert!(
                Instant::now() < deadline,
                "no default ServiceAccount in {name}: is kube-controller-manager up? {}",
                self.dir.join("kube-controller-manager.log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        name.to_owned()
    }

    /// [`namespace_with`](Self::namespace_with) no labels.
    pub async fn namespace(&self, name: &str) -> String {
        self.namespace_with(name, &[]).await
    }

    /// Makes `pod` (a Pod as JSON) in `namespace`, annotated as the test process itself (a
    /// parent pod: the kubelet starts nothing for it), and waits until the scheduler has bound
    /// it and the kubelet reports it Running with its IP; the pod as it then is.
    ///
    /// # Panics
    /// When the API refuses the pod, or it is not running within a minute.
    pub async fn in_process_pod(
        &self,
        namespace: &str,
        mut pod: serde_json::Value,
    ) -> k8s_openapi::api::core::v1::Pod {
        use k8s_openapi::api::core::v1::Pod;
        pod["metadata"]["annotations"][IN_PROCESS_ANNOTATION] = json!("true");
        let pod: Pod = serde_json::from_value(pod).expect("a Pod");
        let name = pod.metadata.name.clone().expect("a named pod");
        let name = name.as_str();
        let pods = Api::<Pod>::namespaced(self.admin().await, namespace);
        pods.create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let pod = pods.get(name).await.expect("read the pod");
            let status = pod.status.as_ref();
            let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
            if running && status.and_then(|s| s.pod_ip.as_deref()).is_some() {
                return pod;
            }
            assert!(
                Instant::now() < deadline,
                "pod {name} is not running: {:?}; see {}",
                pod.status,
                self.dir.join("kube-scheduler.log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A kubeconfig that authenticates as ServiceAccount `account` of `namespace`, with a
    /// token from the TokenRequest API, as a pod's projected token does.
    ///
    /// # Panics
    /// When the API refuses.
    pub async fn service_account_kubeconfig(&self, namespace: &str, account: &str) -> PathBuf {
        let client = self.admin().await;
        let accounts = Api::<ServiceAccount>::namespaced(client, namespace);
        let request = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        });
        let answer: serde_json::Value = accounts
            .create_subresource("token", account, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("a token for {namespace}/{account}: {e}"));
        let token = answer["status"]["token"]
            .as_str()
            .expect("a token in the TokenRequest's status");
        let file = self
            .dir
            .join(format!("sa-{namespace}-{account}.kubeconfig"));
        write_kubeconfig(&file, &self.url, &self.ca, token, namespace)
            .expect("the run dir is writable");
        file
    }

    /// Kills kube-apiserver (SIGKILL, as a crashed or evicted API server) and waits for it to
    /// be gone. Everything else keeps running; clients see connections refused.
    pub fn kill_apiserver(&self) {
        if let Some(mut apiserver) = self.apiserver.lock().take() {
            apiserver.kill();
        }
    }

    /// Starts kube-apiserver again on the same port and etcd, and waits until it is ready.
    ///
    /// # Panics
    /// When it does not start or become ready.
    pub async fn start_apiserver(&self) {
        let apiserver = Daemon::spawn(
            &self.dir,
            "kube-apiserver",
            &self.binaries.join("kube-apiserver"),
            &self.apiserver_args,
        )
        .expect("kube-apiserver starts again");
        *self.apiserver.lock() = Some(apiserver);
        self.wait_ready().await.expect("kube-apiserver ready again");
    }

    /// Runs kubectl (built with the control plane) with `args` against the API server as a
    /// cluster admin in `namespace`: its stdout, or its stderr as the error.
    ///
    /// # Errors
    /// kubectl's stderr when it fails.
    pub async fn kubectl(&self, namespace: &str, args: &[&str]) -> Result<String, String> {
        let output = tokio::process::Command::new(self.binaries.join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.write_admin_kubeconfig(namespace))
            .args(args)
            .output()
            .await
            .map_err(|e| format!("cannot run kubectl: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }
}

/// Prints that `test` is skipped and why (past the test harness's capture), and gives `None`.
/// The test harness names each test's thread after the test: that name is used when there is
/// one.
///
/// # Panics
/// When the control plane is [`required`].
pub fn skip<T>(test: &str, why: &Unavailable) -> Option<T> {
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or(test);
    assert!(
        !required(),
        "{test}: the Kubernetes control plane is required ({REQUIRE_ENV} is set) but unavailable: {why}"
    );
    say(&format!(
        "skipped: {test}: no Kubernetes control plane ({why}); set {REQUIRE_ENV}=1 to require one"
    ));
    None
}

/// Writes `line` to stderr past the test harness's capture (which takes `eprintln!` only), so
/// that a skip or a build shows in a `cargo test` run whatever its outcome.
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A kube-rs client from a kubeconfig file.
async fn client_from(kubeconfig: &Path) -> Result<kube::Client, String> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?;
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .map_err(|e| e.to_string())?;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// Writes a kubeconfig for `server` (its CA in `ca`) with a bearer `token`, readable by this
/// user alone: it holds a credential.
fn write_kubeconfig(
    file: &Path,
    server: &str,
    ca: &Path,
    token: &str,
    namespace: &str,
) -> std::io::Result<()> {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "test", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}],
        "current-context": "test",
    });
    // JSON is YAML: kubectl and kube-rs read it as a kubeconfig.
    process::write_private(file, config.to_string().as_bytes())
}
