//! The fake's machines: a local process each, with Fly's states, events and exit handling.

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::State;

/// A machine as a test sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MachineView {
    /// The machine id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its region.
    pub region: String,
    /// Its state: `started`, `stopped`, `destroyed`, ...
    pub state: String,
    /// The config it was created with, as sent.
    pub config: Value,
    /// The exit code of its process's last run.
    pub exit_code: Option<i32>,
    /// The pid of its process, while it has one (a frozen one included).
    pub pid: Option<u32>,
}

/// How a machine's process is asked to end.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stop {
    /// A signal, then a kill after the stop timeout.
    Signal(i32, Duration),
    /// Killed at once, as `DELETE ?force=true` does.
    Kill,
}

/// What the API asks of a machine's running process.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Control {
    /// End it.
    Stop(Stop),
    /// Freeze it (SIGSTOP): the fake's stand-in for Fly's memory snapshot.
    Suspend,
    /// Let it go on (SIGCONT): a resume from the snapshot.
    Resume,
}

/// A lease on a machine: who may change it until when.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub nonce: String,
    pub description: String,
    pub expires: tokio::time::Instant,
}

pub(crate) struct FakeMachine {
    pub id: String,
    pub name: String,
    pub region: String,
    pub instance_id: String,
    pub private_ip: String,
    pub config: Value,
    pub state: watch::Sender<&'static str>,
    pub events: Vec<Value>,
    pub hidden_lookups: u32,
    pub exit_code: Option<i32>,
    pub restarts: u32,
    pub destroy_requested: bool,
    /// The lease on it, if one was taken (it may have expired).
    pub lease: Option<Lease>,
    pub pid: Option<u32>,
    control: Option<mpsc::UnboundedSender<Control>>,
}

impl FakeMachine {
    pub(crate) fn new(
        state: &State,
        name: String,
        region: String,
        config: Value,
        hidden: u32,
    ) -> Self {
        let n = state.next_id.fetch_add(1, Ordering::Relaxed);
        Self {
            id: format!("{:014x}", 0x1d8e_0000_0000_u64 + n),
            name,
            region,
            instance_id: format!("01J{:023X}", uuid::Uuid::new_v4().as_u128() >> 13)[..26]
                .to_owned(),
            private_ip: format!("fdaa:0:1:a7b:1::{n:x}"),
            config,
            state: watch::channel("created").0,
            events: Vec::new(),
            hidden_lookups: hidden,
            exit_code: None,
            restarts: 0,
            destroy_requested: false,
            lease: None,
            pid: None,
            control: None,
        }
    }

    pub(crate) fn parent(id: &str, region: &str) -> Self {
        let mut machine = Self {
            id: id.to_owned(),
            name: id.to_owned(),
            region: region.to_owned(),
            instance_id: "01JPARENT0000000000000000".into(),
            private_ip: "fdaa:0:1:a7b:1::1".into(),
            config: json!({"image": "parent"}),
            state: watch::channel("started").0,
            events: Vec::new(),
            hidden_lookups: 0,
            exit_code: None,
            restarts: 0,
            destroy_requested: false,
            lease: None,
            pid: None,
            control: None,
        };
        machine.event("start", "started", None);
        machine
    }

    pub(crate) fn current(&self) -> &'static str {
        *self.state.borrow()
    }

    /// The API's `Machine` object.
    pub(crate) fn json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "region": self.region,
            "state": self.current(),
            "instance_id": self.instance_id,
            "private_ip": self.private_ip,
            "config": self.config,
            "events": self.events,
            "host_status": "ok",
            "created_at": "2026-11-21T00:00:00Z",
            "updated_at": "2026-11-21T00:00:00Z",
        })
    }

    pub(crate) fn view(&self) -> MachineView {
        MachineView {
            id: self.id.clone(),
            name: self.name.clone(),
            region: self.region.clone(),
            state: self.current().to_owned(),
            config: self.config.clone(),
            exit_code: self.exit_code,
            pid: self.pid,
        }
    }

    pub(crate) fn metadata(&self, key: &str) -> Option<&str> {
        self.config.get("metadata")?.get(key)?.as_str()
    }

    pub(crate) fn kill(&mut self) {
        self.send_stop(Stop::Kill);
    }

    /// Asks the process to end; false when there is none.
    pub(crate) fn send_stop(&self, stop: Stop) -> bool {
        self.send_control(Control::Stop(stop))
    }

    /// Sends the process `control`; false when there is none.
    pub(crate) fn send_control(&self, control: Control) -> bool {
        self.control
            .as_ref()
            .is_some_and(|tx| tx.send(control).is_ok())
    }

    /// The lease on it that has not expired.
    pub(crate) fn live_lease(&self) -> Option<&Lease> {
        self.lease
            .as_ref()
            .filter(|lease| lease.expires > tokio::time::Instant::now())
    }

    /// Records an event of `kind` with `status`, as Fly lists them.
    pub(crate) fn record(&mut self, kind: &str, status: &str) {
        self.event(kind, status, None);
    }

    fn event(&mut self, kind: &str, status: &str, request: Option<Value>) {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut event = json!({
            "id": format!("01E{:023X}", uuid::Uuid::new_v4().as_u128() >> 13)[..26].to_owned(),
            "type": kind,
            "status": status,
            "source": "flyd",
            "timestamp": timestamp + self.events.len() as u64,
        });
        if let Some(request) = request {
            event["request"] = request;
        }
        self.events.push(event);
    }
}

/// Starts (or restarts) the machine's process: the image's program, or a fault's stand-in.
/// `local_api` is where the machine's process finds its machine-local API socket.
pub(crate) fn boot(state: &Arc<State>, id: &str, local_api: Option<&std::path::Path>) {
    let (crash, stall) = {
        let mut faults = state.faults.lock();
        let crash = (!faults.crash_boots.is_empty()).then(|| faults.crash_boots.remove(0));
        let stall = crash.is_none() && faults.stall_boots > 0;
        if stall {
            faults.stall_boots -= 1;
        }
        (crash, stall)
    };
    let mut machines = state.machines.lock();
    let Some(machine) = machines.get_mut(id) else {
        return;
    };
    let config = &machine.config;
    let init = &config["init"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let image_program = config["image"]
        .as_str()
        .and_then(|image| state.images.get(image))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (program, args) = if let Some(code) = crash {
        (
            "/bin/sh".to_owned(),
            vec!["-c".into(), format!("exit {code}")],
        )
    } else if stall {
        (
            "/bin/sh".to_owned(),
            vec!["-c".into(), "exec sleep 3600".into()],
        )
    } else {
        let mut command = strings(&init["entrypoint"]);
        command.extend(strings(&init["cmd"]));
        if command.is_empty() {
            (image_program, Vec::new())
        } else {
            let program = command.remove(0);
            (program, command)
        }
    };
    let mut command = tokio::process::Command::new(&program);
    command
        .args(&args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("FLY_APP_NAME", &state.app)
        .env("FLY_MACHINE_ID", &machine.id)
        .env("FLY_REGION", &machine.region)
        .env("FLY_PRIVATE_IP", &machine.private_ip)
        .env("FLY_MACHINE_VERSION", &machine.instance_id)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(image) = config["image"].as_str() {
        command.env("FLY_IMAGE_REF", image);
    }
    if let Some(socket) = local_api {
        command.env("FIREBRAND_FLY_API_SOCKET", socket);
    }
    if let Some(memory) = config["guest"]["memory_mb"].as_u64() {
        command.env("FLY_VM_MEMORY_MB", memory.to_string());
    }
    if let Some(env) = config["env"].as_object() {
        for (key, value) in env {
            command.env(key, value.as_str().unwrap_or_default());
        }
    }
    let child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            tracing::warn!(machine = id, %program, %error, "fake machine failed to start");
            machine.event("launch", "failed", None);
            machine.state.send_replace("failed");
            return;
        }
    };
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    machine.control = Some(control_tx);
    machine.pid = child.id();
    machine.event("start", "started", None);
    machine.state.send_replace("started");
    tokio::spawn(supervise(
        Arc::clone(state),
        id.to_owned(),
        child,
        control_rx,
    ));
}

async fn supervise(
    state: Arc<State>,
    id: String,
    mut child: tokio::process::Child,
    mut control_rx: mpsc::UnboundedReceiver<Control>,
) {
    let signal = |child: &tokio::process::Child, signal: i32| {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    };
    let stop = loop {
        tokio::select! {
            status = child.wait() => {
                exited(&state, &id, status.ok(), false);
                return;
            }
            Some(control) = control_rx.recv() => match control {
                Control::Suspend => {
                    signal(&child, libc::SIGSTOP);
                    // Suspended once the snapshot is taken: here, once the process is frozen.
                    if let Some(pid) = child.id() {
                        frozen(pid).await;
                    }
                    let snapshot = state.latency.lock().suspend;
                    tokio::time::sleep(snapshot).await;
                    let mut machines = state.machines.lock();
                    if let Some(machine) = machines.get_mut(&id) {
                        if machine.current() == "suspending" {
                            machine.record("suspend", "suspended");
                            machine.state.send_replace("suspended");
                        }
                    }
                }
                Control::Resume => signal(&child, libc::SIGCONT),
                Control::Stop(stop) => break stop,
            },
        }
    };
    if let Stop::Signal(number, timeout) = stop {
        signal(&child, number);
        if let Ok(status) = tokio::time::timeout(timeout, child.wait()).await {
            exited(&state, &id, status.ok(), true);
            return;
        }
    }
    let _ = child.kill().await;
    let status = child.wait().await;
    exited(&state, &id, status.ok(), true);
}

/// Waits until process `pid` is stopped, for at most a second: a signal takes effect when
/// the kernel next schedules its target, and nothing tells its sender when that was.
async fn frozen(pid: u32) {
    let stopped = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| Some(stat.rsplit_once(") ")?.1.starts_with(['T', 't'])))
            .unwrap_or(true)
    };
    for _ in 0..1000 {
        if stopped() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What Fly does when a machine's process ends: record the exit, then restart, destroy or stop
/// the machine as its config says.
fn exited(
    state: &Arc<State>,
    id: &str,
    status: Option<std::process::ExitStatus>,
    requested_stop: bool,
) {
    use std::os::unix::process::ExitStatusExt as _;
    let restart = {
        let mut machines = state.machines.lock();
        let Some(machine) = machines.get_mut(id) else {
            return;
        };
        machine.control = None;
        machine.pid = None;
        let code = status.and_then(|s| s.code());
        let signal = status.and_then(|s| s.signal());
        machine.exit_code = code;
        let restart = &machine.config["restart"];
        let policy = restart["policy"].as_str().unwrap_or("on-failure");
        let max_retries = restart["max_retries"].as_u64().unwrap_or(10);
        let again = !requested_stop
            && !machine.destroy_requested
            && (policy == "always"
                || (policy == "on-failure"
                    && code != Some(0)
                    && u64::from(machine.restarts) < max_retries));
        let exit_event = json!({
            "exit_code": code.unwrap_or(-1),
            "signal": signal.unwrap_or(-1),
            "oom_killed": false,
            "guest_exit_code": code.unwrap_or(-1),
            "guest_signal": signal.unwrap_or(-1),
            "requested_stop": requested_stop,
            "restarting": again,
            "exited_at": "2026-11-21T00:00:00Z",
        });
        machine.event("exit", "stopped", Some(json!({ "exit_event": exit_event })));
        if again {
            machine.restarts += 1;
        } else if machine.destroy_requested || machine.config["auto_destroy"] == true {
            machine.event("destroy", "destroyed", None);
            machine.state.send_replace("destroyed");
            state.count(|c| c.destroyed += 1);
        } else {
            machine.state.send_replace("stopped");
        }
        again
    };
    if restart {
        // A restart keeps the socket its first boot was served.
        let local_api = state.socket_dir.join(id);
        boot(state, id, local_api.exists().then_some(local_api.as_path()));
    }
}
