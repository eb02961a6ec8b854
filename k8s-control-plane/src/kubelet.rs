//! The test kubelet: registers Node [`NODE_NAME`] (with [`NODE_GPUS`] `nvidia.com/gpu`), keeps
//! it Ready with a Lease, watches the pods the scheduler binds to it, and runs each pod's first
//! container as a local process: env from values, Secrets (read through the API) and the
//! downward API; status through `pods/status` (podIP, container states, exit codes,
//! `OOMKilled`); deletion honoured as a kubelet does (SIGTERM, the grace period, SIGKILL, then
//! the final delete with grace 0).
//!
//! What it does not do: containers after the first (reported in the first's state), images (each maps to a local program), volumes, probes, restarts,
//! cgroups (a memory limit is not enforced; a process that dies of a SIGKILL nobody sent is
//! reported `OOMKilled`, as the kernel's OOM killer would leave it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Container, Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::Images;

/// The Node the kubelet registers.
pub const NODE_NAME: &str = "firebrand-test-node";
/// How many `nvidia.com/gpu` the node has.
pub const NODE_GPUS: usize = 2;
/// A pod annotated with this (value `true`) is the test process itself (a parent pod): the
/// kubelet reports it Running and starts nothing.
pub const IN_PROCESS_ANNOTATION: &str = "test.firebrand.dev/in-process";

/// Every pod's IP, and the node's: its processes share the machine's loopback.
const POD_IP: &str = "127.0.0.1";
/// How often the node's Lease is renewed; the node controller marks a node NotReady when its
/// Lease is 40 s (`node-monitor-grace-period`, 50 s) old.
const LEASE_RENEW: Duration = Duration::from_secs(10);
/// How long a container that cannot be made yet (a missing Secret) waits before the next try.
const CONFIG_RETRY: Duration = Duration::from_millis(200);
/// How long an image pull's error stands before it becomes `ImagePullBackOff`.
const PULL_RETRY: Duration = Duration::from_millis(500);

/// What a pod's deletion asks of its task.
#[derive(Debug, Clone, Copy)]
enum Control {
    /// `deletionTimestamp` set: SIGTERM, SIGKILL after `grace`, then delete with grace 0.
    Terminate { grace: Duration },
    /// Gone from the API: SIGKILL, and report nothing.
    Kill,
}

/// The repository of an image reference: without its digest or tag.
pub(crate) fn repository(image: &str) -> &str {
    let name = image.split('@').next().unwrap_or(image);
    match name.rfind(':') {
        Some(colon) if colon > name.rfind('/').unwrap_or(0) => &name[..colon],
        _ => name,
    }
}

/// The digest the kubelet reports for an image: stable per repository.
fn digest(repository: &str) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, repository.as_bytes());
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{repository}@sha256:{hex}")
}

fn now() -> Value {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).expect("a time")
}

struct Kubelet {
    client: kube::Client,
    images: Images,
    logs: PathBuf,
    /// Which of the node's GPUs are in use.
    gpus: Mutex<[bool; NODE_GPUS]>,
    /// The task of each pod, by uid.
    pods: Mutex<HashMap<String, mpsc::UnboundedSender<Control>>>,
    processes: Processes,
}

/// The processes the kubelet runs now, by pod (namespace, name).
pub(crate) type Processes = Arc<Mutex<HashMap<(String, String), u32>>>;

/// Registers the node and starts the kubelet's tasks on the current runtime.
pub(crate) async fn start(
    client: kube::Client,
    images: Images,
    logs: PathBuf,
    processes: Processes,
) -> Result<(), kube::Error> {
    std::fs::create_dir_all(&logs).map_err(|e| kube::Error::Service(e.into()))?;
    register(&client).await?;
    let kubelet = Arc::new(Kubelet {
        client,
        images,
        logs,
        gpus: Mutex::new([false; NODE_GPUS]),
        pods: Mutex::new(HashMap::new()),
        processes,
    });
    tokio::spawn(renew_lease(kubelet.client.clone()));
    tokio::spawn(watch(kubelet));
    Ok(())
}

/// Creates the Node and reports it Ready with its capacity.
async fn register(client: &kube::Client) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": NODE_NAME,
            "labels": {
                "kubernetes.io/hostname": NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
    }))
    .expect("a Node");
    nodes.create(&PostParams::default(), &node).await?;
    let capacity = json!({
        "cpu": "16",
        "memory": "64Gi",
        "pods": "110",
        "ephemeral-storage": "100Gi",
        "nvidia.com/gpu": NODE_GPUS.to_string(),
    });
    let condition = |kind: &str, status: &str, reason: &str| {
        json!({
            "type": kind,
            "status": status,
            "reason": reason,
            "message": "test kubelet",
            "lastHeartbeatTime": now(),
            "lastTransitionTime": now(),
        })
    };
    let status = json!({"status": {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            condition("Ready", "True", "KubeletReady"),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": POD_IP},
            {"type": "Hostname", "address": NODE_NAME},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": "firebrand-test",
            "systemUUID": "firebrand-test",
            "bootID": uuid::Uuid::new_v4().to_string(),
            "kernelVersion": "test",
            "osImage": "test",
            "containerRuntimeVersion": "test://1",
            "kubeletVersion": super::KUBERNETES_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    }});
    nodes
        .patch_status(NODE_NAME, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Keeps the node's Lease in `kube-node-lease` fresh, as a kubelet's heartbeat.
async fn renew_lease(client: kube::Client) {
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": NODE_NAME},
            "spec": {
                "holderIdentity": NODE_NAME,
                "leaseDurationSeconds": 40,
                "renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now()),
            },
        }))
        .expect("a Lease");
        let renewed = match leases.get_opt(NODE_NAME).await {
            Ok(Some(old)) => {
                let mut lease = lease;
                lease.metadata.resource_version = old.metadata.resource_version;
                leases
                    .replace(NODE_NAME, &PostParams::default(), &lease)
                    .await
                    .map(drop)
            }
            Ok(None) => leases
                .create(&PostParams::default(), &lease)
                .await
                .map(drop),
            Err(error) => Err(error),
        };
        if let Err(error) = renewed {
            // The namespace comes a moment after the API server, and the API server may be
            // restarting: the next renewal tries again.
            tracing::debug!(%error, "test kubelet: lease not renewed");
        }
        tokio::time::sleep(LEASE_RENEW).await;
    }
}

/// Follows the pods bound to the node.
async fn watch(kubelet: Arc<Kubelet>) {
    let pods: Api<Pod> = Api::all(kubelet.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={NODE_NAME}"));
    let mut stream = Box::pin(watcher::watcher(pods, config).default_backoff());
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Apply(pod) | Event::InitApply(pod)) => kubelet.seen(pod),
            Ok(Event::Delete(pod)) => {
                let uid = pod.metadata.uid.unwrap_or_default();
                if let Some(task) = kubelet.pods.lock().remove(&uid) {
                    let _ = task.send(Control::Kill);
                }
            }
            Ok(Event::Init | Event::InitDone) => {}
            Err(error) => tracing::debug!(%error, "test kubelet: watch failed; retrying"),
        }
    }
}

impl Kubelet {
    fn seen(self: &Arc<Self>, pod: Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let mut pods = self.pods.lock();
        if pod.metadata.deletion_timestamp.is_some() {
            let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30);
            let grace = Duration::from_secs(u64::try_from(grace).unwrap_or(0));
            match pods.get(&uid) {
                Some(task) => {
                    let _ = task.send(Control::Terminate { grace });
                }
                None => {
                    // Never started here: nothing to stop.
                    let api = Api::namespaced(self.client.clone(), &namespace);
                    tokio::spawn(async move { confirm_deletion(&api, &name, &uid).await });
                }
            }
            return;
        }
        let ended = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
        if pods.contains_key(&uid) || ended {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        pods.insert(uid, tx);
        let kubelet = Arc::clone(self);
        tokio::spawn(async move { kubelet.run(pod, rx).await });
    }

    /// Runs one pod to its end.
    async fn run(self: Arc<Self>, pod: Pod, mut control: mpsc::UnboundedReceiver<Control>) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let spec = pod.spec.clone().unwrap_or_default();
        let Some(container) = spec.containers.first().cloned() else {
            return;
        };
        let image = container.image.clone().unwrap_or_default();
        let repository = repository(&image).to_owned();
        let in_process = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(IN_PROCESS_ANNOTATION))
            .is_some_and(|v| v == "true");
        let containers: Vec<(String, String)> = spec
            .containers
            .iter()
            .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
            .collect();
        let status = Status {
            api: &api,
            name: &name,
            containers: &containers,
        };
        if in_process {
            status.running().await;
            if let Some(Control::Terminate { .. }) = control.recv().await {
                confirm_deletion(&api, &name, &uid).await;
            }
            return;
        }
        status.waiting("ContainerCreating", "").await;

        // The image, as a pull would find it.
        let program = loop {
            if let Some(program) = self.images.0.get(&repository) {
                break program.clone();
            }
            for (reason, message) in [
                (
                    "ErrImagePull",
                    format!("failed to pull and unpack image \"{image}\": not found"),
                ),
                (
                    "ImagePullBackOff",
                    format!("Back-off pulling image \"{image}\""),
                ),
            ] {
                status.waiting(reason, &message).await;
                if let Ok(got) = tokio::time::timeout(PULL_RETRY, control.recv()).await {
                    if let Some(Control::Terminate { .. }) = got {
                        confirm_deletion(&api, &name, &uid).await;
                    }
                    return;
                }
            }
        };
        // The env; a missing Secret holds the container back until it appears.
        let env = loop {
            match self.env(&pod, &container, &namespace).await {
                Ok(env) => break env,
                Err(message) => {
                    status.waiting("CreateContainerConfigError", &message).await;
                    if let Ok(got) = tokio::time::timeout(CONFIG_RETRY, control.recv()).await {
                        if let Some(Control::Terminate { .. }) = got {
                            confirm_deletion(&api, &name, &uid).await;
                        }
                        return;
                    }
                }
            }
        };
        let gpus = self.take_gpus(&container);
        let outcome = self
            .run_container(&pod, &container, program, env, &gpus, &status, &mut control)
            .await;
        self.release_gpus(&gpus);
        match outcome {
            Ended::Exited { code, reason } => {
                status.terminated(code, reason).await;
            }
            Ended::Stopped { code, reason } => {
                status.terminated(code, reason).await;
                confirm_deletion(&api, &name, &uid).await;
            }
            Ended::Gone => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_container(
        &self,
        pod: &Pod,
        container: &Container,
        program: PathBuf,
        env: Vec<(String, String)>,
        gpus: &[usize],
        status: &Status<'_>,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Ended {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let mut argv = container.command.clone().unwrap_or_default();
        argv.extend(container.args.clone().unwrap_or_default());
        let program = if container.command.as_ref().is_some_and(|c| !c.is_empty()) {
            PathBuf::from(argv.remove(0))
        } else {
            program
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{namespace}_{name}.log")));
        let (stdout, stderr) = match log.and_then(|log| Ok((log.try_clone()?, log))) {
            Ok((out, err)) => (Stdio::from(out), Stdio::from(err)),
            Err(_) => (Stdio::null(), Stdio::null()),
        };
        let mut command = std::process::Command::new(&program);
        command
            .args(&argv)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOSTNAME", &name)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if !gpus.is_empty() {
            // NVIDIA's device plugin names the container's GPUs by UUID.
            let uuids: Vec<String> = gpus
                .iter()
                .map(|i| format!("GPU-00000000-0000-0000-0000-{i:012}"))
                .collect();
            command.env("NVIDIA_VISIBLE_DEVICES", uuids.join(","));
        }
        super::process::die_with_parent(&mut command);
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                let message = format!(
                    "failed to create containerd task: exec: \"{}\": {error}",
                    program.display()
                );
                status.waiting("RunContainerError", &message).await;
                return Ended::Exited {
                    code: 128,
                    reason: "StartError",
                };
            }
        };
        let key = (namespace.clone(), name.clone());
        if let Some(pid) = child.id() {
            self.processes.lock().insert(key.clone(), pid);
        }
        let _forget = Forget(&self.processes, key);
        status.running().await;
        let signal = |child: &tokio::process::Child, signal: rustix::process::Signal| {
            if let Some(pid) = child
                .id()
                .and_then(|p| rustix::process::Pid::from_raw(p as i32))
            {
                let _ = rustix::process::kill_process(pid, signal);
            }
        };
        use std::os::unix::process::ExitStatusExt as _;
        let code_of = |status: std::process::ExitStatus| {
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(9))
        };
        tokio::select! {
            exited = child.wait() => {
                let status = exited.ok();
                let killed = status.and_then(|s| s.signal()) == Some(9);
                let code = status.map_or(137, code_of);
                let reason = if killed {
                    // A SIGKILL that this kubelet did not send: the kernel's OOM killer.
                    "OOMKilled"
                } else if code == 0 {
                    "Completed"
                } else {
                    "Error"
                };
                Ended::Exited { code, reason }
            }
            Some(control) = control.recv() => match control {
                Control::Kill => {
                    let _ = child.kill().await;
                    Ended::Gone
                }
                Control::Terminate { grace } => {
                    signal(&child, rustix::process::Signal::TERM);
                    let status = match tokio::time::timeout(grace, child.wait()).await {
                        Ok(status) => status.ok(),
                        Err(_) => {
                            let _ = child.kill().await;
                            child.wait().await.ok()
                        }
                    };
                    let code = status.map_or(137, code_of);
                    Ended::Stopped { code, reason: if code == 0 { "Completed" } else { "Error" } }
                }
            },
        }
    }

    /// The container's env: values, Secret keys, downward-API fields.
    async fn env(
        &self,
        pod: &Pod,
        container: &Container,
        namespace: &str,
    ) -> Result<Vec<(String, String)>, String> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let mut env = Vec::new();
        for var in container.env.iter().flatten() {
            let value = if let Some(value) = &var.value {
                value.clone()
            } else if let Some(from) = &var.value_from {
                if let Some(key) = &from.secret_key_ref {
                    let secret = secrets
                        .get_opt(&key.name)
                        .await
                        .map_err(|e| format!("cannot read secret \"{}\": {e}", key.name))?
                        .ok_or_else(|| format!("secret \"{}\" not found", key.name))?;
                    let data = secret
                        .data
                        .as_ref()
                        .and_then(|d| d.get(&key.key))
                        .ok_or_else(|| {
                            format!(
                                "couldn't find key {} in Secret {namespace}/{}",
                                key.key, key.name
                            )
                        })?;
                    String::from_utf8_lossy(&data.0).into_owned()
                } else if let Some(field) = &from.field_ref {
                    let meta = &pod.metadata;
                    let spec = pod.spec.as_ref();
                    match field.field_path.as_str() {
                        "metadata.name" => meta.name.clone().unwrap_or_default(),
                        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
                        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
                        "spec.nodeName" => NODE_NAME.to_owned(),
                        "spec.serviceAccountName" => spec
                            .and_then(|s| s.service_account_name.clone())
                            .unwrap_or_default(),
                        "status.podIP" | "status.hostIP" => POD_IP.to_owned(),
                        other => return Err(format!("unsupported fieldRef {other}")),
                    }
                } else {
                    return Err(format!("unsupported valueFrom for {}", var.name));
                }
            } else {
                String::new()
            };
            env.push((var.name.clone(), value));
        }
        Ok(env)
    }

    fn take_gpus(&self, container: &Container) -> Vec<usize> {
        let wanted = container
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("nvidia.com/gpu"))
            .and_then(|q| q.0.parse::<usize>().ok())
            .unwrap_or(0);
        let mut gpus = self.gpus.lock();
        let mut taken = Vec::new();
        for (index, used) in gpus.iter_mut().enumerate() {
            if taken.len() == wanted {
                break;
            }
            if !*used {
                *used = true;
                taken.push(index);
            }
        }
        taken
    }

    fn release_gpus(&self, taken: &[usize]) {
        let mut gpus = self.gpus.lock();
        for index in taken {
            gpus[*index] = false;
        }
    }
}

/// Forgets a pod's process when its container ends.
struct Forget<'a>(&'a Processes, (String, String));

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

/// How a container ended.
enum Ended {
    /// By itself.
    Exited { code: i32, reason: &'static str },
    /// Stopped for its pod's deletion.
    Stopped { code: i32, reason: &'static str },
    /// Its pod is gone from the API.
    Gone,
}

/// Reports one pod's status.
struct Status<'a> {
    api: &'a Api<Pod>,
    name: &'a str,
    /// Each container's name and image. The first runs; the others are reported as it is.
    containers: &'a [(String, String)],
}

impl Status<'_> {
    async fn patch(&self, status: Value) {
        let patch = json!({ "status": status });
        if let Err(error) = self
            .api
            .patch_status(self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::debug!(pod = self.name, %error, "test kubelet: status not reported");
        }
    }

    fn container(&self, state: Value, ready: bool) -> Value {
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|(name, image)| {
                json!({
                    "name": name,
                    "image": image,
                    "imageID": digest(repository(image)),
                    "ready": ready,
                    "started": ready,
                    "restartCount": 0,
                    "state": state,
                })
            })
            .collect();
        Value::Array(statuses)
    }

    async fn waiting(&self, reason: &str, message: &str) {
        let mut waiting = json!({ "reason": reason });
        if !message.is_empty() {
            waiting["message"] = json!(message);
        }
        self.patch(json!({
            "phase": "Pending",
            "hostIP": POD_IP,
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": now(),
            "containerStatuses": self.container(json!({ "waiting": waiting }), false),
        }))
        .await;
    }

    async fn running(&self) {
        let condition =
            |kind: &str| json!({"type": kind, "status": "True", "lastTransitionTime": now()});
        self.patch(json!({
            "phase": "Running",
            "hostIP": POD_IP,
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": now(),
            "conditions": [
                condition("PodScheduled"),
                condition("Initialized"),
                condition("ContainersReady"),
                condition("Ready"),
            ],
            "containerStatuses": self.container(json!({"running": {"startedAt": now()}}), true),
        }))
        .await;
    }

    async fn terminated(&self, code: i32, reason: &str) {
        let phase = if code == 0 { "Succeeded" } else { "Failed" };
        self.patch(json!({
            "phase": phase,
            "containerStatuses": self.container(
                json!({"terminated": {
                    "exitCode": code,
                    "reason": reason,
                    "startedAt": now(),
                    "finishedAt": now(),
                }}),
                false,
            ),
        }))
        .await;
    }
}

/// The kubelet's last word on a deleted pod: its containers have stopped, so the API server
/// may remove it.
async fn confirm_deletion(api: &Api<Pod>, name: &str, uid: &str) {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    if let Err(error) = api.delete(name, &params).await {
        tracing::debug!(pod = name, %error, "test kubelet: final delete failed");
    }
}
