//! The fake's scheduler and kubelet: one node, GPUs as `nvidia.com/gpu`, and each pod's one
//! container run as a local process, with the phases and container states a real kubelet
//! reports.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::store::{self, now, Control};
use super::{State, GPU_RESOURCE, NODE_NAME, POD_IP};

/// How long a failed image pull waits before reporting `ImagePullBackOff`, and a missing
/// secret before the kubelet looks again.
const PULL_RETRY: Duration = Duration::from_millis(100);
const CONFIG_RETRY: Duration = Duration::from_millis(10);

/// Runs pod `name` through scheduling, pulling, creating and running its container.
pub(crate) async fn run(
    state: Arc<State>,
    namespace: String,
    name: String,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let pod = Pod {
        state: &state,
        namespace: &namespace,
        name: &name,
    };
    let Some(object) = pod.object() else { return };
    let container = object["spec"]["containers"][0].clone();
    let image = container["image"].as_str().unwrap_or_default().to_owned();

    // Scheduling: wait for GPUs to free up, as the scheduler retries an unschedulable pod.
    let mut reported = false;
    loop {
        let freed = state.rescheduled.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        match pod.schedule(&container) {
            Some(Ok(())) => break,
            Some(Err(message)) => {
                if !reported {
                    reported = true;
                    pod.update(|o| {
                        o["status"] = json!({
                            "phase": "Pending",
                            "conditions": [{
                                "type": "PodScheduled",
                                "status": "False",
                                "reason": "Unschedulable",
                                "message": message,
                                "lastTransitionTime": now(),
                            }],
                        });
                    });
                }
                tokio::select! {
                    () = &mut freed => continue,
                    _ = control.recv() => return,
                }
            }
            None => return,
        }
    }
    let (crash, oom, stall) = {
        let mut faults = state.faults.lock();
        let crash = (!faults.crash_pods.is_empty()).then(|| faults.crash_pods.remove(0));
        let oom = crash.is_none() && faults.oom_kill_pods > 0;
        if oom {
            faults.oom_kill_pods -= 1;
        }
        let stall = crash.is_none() && !oom && faults.stall_pods > 0;
        if stall {
            faults.stall_pods -= 1;
        }
        (crash, oom, stall)
    };
    if stall {
        let _ = control.recv().await;
        return;
    }

    // The image, as a pull would find it.
    let Some(program) = state.images.get(&image).cloned() else {
        loop {
            for (reason, message, wait) in [
                (
                    "ErrImagePull",
                    format!("failed to pull and unpack image \"{image}\": failed to resolve reference \"{image}\": not found"),
                    PULL_RETRY,
                ),
                (
                    "ImagePullBackOff",
                    format!("Back-off pulling image \"{image}\""),
                    PULL_RETRY * 10,
                ),
            ] {
                pod.waiting(reason, Some(&message));
                if tokio::time::timeout(wait, control.recv()).await.is_ok() {
                    return;
                }
            }
        }
    };

    // The env, with secret keys and downward-API fields resolved; a missing secret holds the
    // container back, as it does in a real kubelet, until it appears.
    let env = loop {
        match pod.env(&container) {
            Some(Ok(env)) => break env,
            Some(Err(message)) => {
                pod.waiting("CreateContainerConfigError", Some(&message));
                if tokio::time::timeout(CONFIG_RETRY, control.recv())
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            None => return,
        }
    };

    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (program, args) = if let Some(code) = crash {
        ("/bin/sh".into(), vec!["-c".into(), format!("exit {code}")])
    } else {
        let mut command = strings(&container["command"]);
        let args = strings(&container["args"]);
        if command.is_empty() {
            (program.to_string_lossy().into_owned(), args)
        } else {
            let program = command.remove(0);
            command.extend(args);
            (program, command)
        }
    };
    let mut command = tokio::process::Command::new(&program);
    command
        .args(&args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOSTNAME", &name)
        .envs(env)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let gpus = pod.gpus();
    if !gpus.is_empty() {
        // NVIDIA's device plugin names the container's GPUs by UUID.
        let uuids: Vec<String> = gpus.iter().map(|i| gpu_uuid(*i)).collect();
        command.env("NVIDIA_VISIBLE_DEVICES", uuids.join(","));
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let message = format!("failed to create containerd task: exec: \"{program}\": {error}");
            pod.terminated(128, "StartError", Some(&message));
            return;
        }
    };
    let pid = child.id();
    let image_id = if image.contains("@sha256:") {
        image.clone()
    } else {
        state.digests.get(&image).cloned().unwrap_or_default()
    };
    {
        let mut store = state.store.lock();
        let key = (namespace.clone(), name.clone());
        let Some(entry) = store.pods.get_mut(&key) else {
            return;
        };
        entry.pid = pid;
        let started = now();
        store.update_pod(&state, &namespace, &name, |o| {
            let status = &mut o["status"];
            status["phase"] = json!("Running");
            status["conditions"] = json!([
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": "True"},
            ]);
            status["containerStatuses"] = json!([{
                "name": container["name"],
                "image": image,
                "imageID": image_id,
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": started}},
            }]);
        });
    }
    let signal = |child: &tokio::process::Child, signal: i32| {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    };
    if oom {
        signal(&child, libc::SIGKILL);
    }
    let status = tokio::select! {
        status = child.wait() => status.ok(),
        Some(control) = control.recv() => match control {
            Control::Kill => {
                let _ = child.kill().await;
                return;
            }
            Control::Terminate { grace } => {
                signal(&child, libc::SIGTERM);
                match tokio::time::timeout(grace, child.wait()).await {
                    Ok(status) => status.ok(),
                    Err(_) => {
                        let _ = child.kill().await;
                        child.wait().await.ok()
                    }
                }
            }
        },
    };
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .map(|s| s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9)))
        .unwrap_or(137);
    let reason = if oom {
        "OOMKilled"
    } else if code == 0 {
        "Completed"
    } else {
        "Error"
    };
    pod.terminated(code, reason, None);
}

/// The UUID the fake's device plugin gives GPU `index`.
pub(crate) fn gpu_uuid(index: u32) -> String {
    format!("GPU-fa4e0000-0000-0000-0000-{index:012}")
}

/// One pod, as its kubelet reads and writes it.
struct Pod<'a> {
    state: &'a Arc<State>,
    namespace: &'a str,
    name: &'a str,
}

impl Pod<'_> {
    fn key(&self) -> (String, String) {
        (self.namespace.to_owned(), self.name.to_owned())
    }

    fn object(&self) -> Option<Value> {
        let store = self.state.store.lock();
        store.pods.get(&self.key()).map(|p| p.object.clone())
    }

    fn gpus(&self) -> Vec<u32> {
        let store = self.state.store.lock();
        store
            .pods
            .get(&self.key())
            .map(|p| p.gpus.clone())
            .unwrap_or_default()
    }

    fn update(&self, change: impl FnOnce(&mut Value)) {
        let mut store = self.state.store.lock();
        store.update_pod(self.state, self.namespace, self.name, change);
    }

    /// Binds the pod to the node when it fits: `None` when it is gone, `Err` with the
    /// scheduler's message when it does not fit.
    fn schedule(&self, container: &Value) -> Option<Result<(), String>> {
        let mut store = self.state.store.lock();
        let object = store.pods.get(&self.key())?.object.clone();
        let selector = object["spec"]["nodeSelector"].as_object().cloned();
        let node_labels = [
            ("kubernetes.io/hostname", NODE_NAME),
            ("kubernetes.io/os", "linux"),
        ];
        if let Some(selector) = selector {
            let fits = selector.iter().all(|(k, v)| {
                node_labels
                    .iter()
                    .any(|(nk, nv)| nk == k && v.as_str() == Some(*nv))
            });
            if !fits {
                return Some(Err("0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.".into()));
            }
        }
        let wanted = quantity(&container["resources"]["limits"][GPU_RESOURCE]);
        if wanted > u64::from(store.gpus_total) || wanted > store.gpus_free.len() as u64 {
            return Some(Err(format!(
                "0/1 nodes are available: 1 Insufficient {GPU_RESOURCE}. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."
            )));
        }
        let taken: Vec<u32> = store
            .gpus_free
            .iter()
            .copied()
            .take(wanted as usize)
            .collect();
        for gpu in &taken {
            store.gpus_free.remove(gpu);
        }
        if let Some(entry) = store.pods.get_mut(&self.key()) {
            entry.gpus = taken;
        }
        let image = container["image"].clone();
        let name = container["name"].clone();
        store.update_pod(self.state, self.namespace, self.name, |o| {
            o["spec"]["nodeName"] = json!(NODE_NAME);
            o["status"] = json!({
                "phase": "Pending",
                "hostIP": POD_IP,
                "podIP": POD_IP,
                "podIPs": [{"ip": POD_IP}],
                "startTime": now(),
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [{
                    "name": name,
                    "image": image,
                    "imageID": "",
                    "ready": false,
                    "started": false,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ContainerCreating"}},
                }],
            });
        });
        Some(Ok(()))
    }

    fn waiting(&self, reason: &str, message: Option<&str>) {
        self.update(|o| {
            let mut waiting = json!({"reason": reason});
            if let Some(message) = message {
                waiting["message"] = json!(message);
            }
            o["status"]["containerStatuses"][0]["state"] = json!({"waiting": waiting});
        });
    }

    /// The container ended: its state, the pod's phase; its GPUs go back to the node, and a
    /// pod being deleted is removed.
    fn terminated(&self, code: i32, reason: &str, message: Option<&str>) {
        let mut store = self.state.store.lock();
        let Some(entry) = store.pods.get_mut(&self.key()) else {
            return;
        };
        entry.pid = None;
        entry.control = None;
        let gpus = std::mem::take(&mut entry.gpus);
        if !gpus.is_empty() {
            store.gpus_free.extend(gpus);
            self.state.rescheduled.notify_waiters();
        }
        let object = store.update_pod(self.state, self.namespace, self.name, |o| {
            let status = &mut o["status"];
            status["phase"] = json!(if code == 0 { "Succeeded" } else { "Failed" });
            status["conditions"] = json!([
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "False", "reason": "PodCompleted"},
            ]);
            let container = &mut status["containerStatuses"][0];
            let started = container["state"]["running"]["startedAt"].clone();
            let mut terminated = json!({
                "exitCode": code,
                "reason": reason,
                "finishedAt": now(),
            });
            if started.is_string() {
                terminated["startedAt"] = started;
            }
            if let Some(message) = message {
                terminated["message"] = json!(message);
            }
            container["state"] = json!({"terminated": terminated});
            container["ready"] = json!(false);
            container["started"] = json!(false);
        });
        let deleting = object.is_some_and(|o| o["metadata"]["deletionTimestamp"].is_string());
        if deleting {
            store::remove_pod(self.state, &mut store, self.namespace, self.name);
        }
    }

    /// The container's env: `None` when the pod is gone, `Err` with the kubelet's message when
    /// a secret or key it names is missing.
    fn env(&self, container: &Value) -> Option<Result<Vec<(String, String)>, String>> {
        let store = self.state.store.lock();
        let object = &store.pods.get(&self.key())?.object;
        let mut env = Vec::new();
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap_or_default().to_owned();
            if let Some(value) = var["value"].as_str() {
                env.push((name, value.to_owned()));
                continue;
            }
            let from = &var["valueFrom"];
            if let Some(secret) = from["secretKeyRef"].as_object() {
                let secret_name = secret["name"].as_str().unwrap_or_default();
                let key = secret["key"].as_str().unwrap_or_default();
                let found = store
                    .secrets
                    .get(&(self.namespace.to_owned(), secret_name.to_owned()));
                let Some(found) = found else {
                    return Some(Err(format!("secret \"{secret_name}\" not found")));
                };
                let value = found["data"][key]
                    .as_str()
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .or_else(|| {
                        found["stringData"][key]
                            .as_str()
                            .map(|s| s.as_bytes().to_vec())
                    });
                let Some(value) = value else {
                    return Some(Err(format!(
                        "couldn't find key {key} in Secret {}/{secret_name}",
                        self.namespace
                    )));
                };
                env.push((name, String::from_utf8_lossy(&value).into_owned()));
            } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
                let value = match path {
                    "metadata.name" => object["metadata"]["name"].clone(),
                    "metadata.namespace" => object["metadata"]["namespace"].clone(),
                    "metadata.uid" => object["metadata"]["uid"].clone(),
                    "spec.nodeName" => json!(NODE_NAME),
                    "spec.serviceAccountName" => object["spec"]["serviceAccountName"].clone(),
                    "status.podIP" | "status.hostIP" => json!(POD_IP),
                    _ => Value::Null,
                };
                env.push((name, value.as_str().unwrap_or_default().to_owned()));
            }
        }
        Some(Ok(env))
    }
}

/// A whole-number quantity (`"2"`, `2`); zero when absent.
fn quantity(value: &Value) -> u64 {
    match value {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}
