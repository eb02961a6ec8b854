//! The control plane's processes: each started from one long-lived thread with
//! `PR_SET_PDEATHSIG`, so that it dies with the test process however that ends, its output in a
//! log file of the run's folder.

use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Spawn = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `command` from the spawner thread. The parent-death signal fires when the *thread*
/// that forked a child ends, not the process: a child forked from a test's thread would die
/// with that test. The spawner thread lives as long as the process.
fn spawn(command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Spawn>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Spawn>();
        std::thread::Builder::new()
            .name("control-plane-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("a thread");
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .expect("the spawner lock")
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// Makes `command` die with SIGKILL when the thread that spawns it ends.
pub(crate) fn die_with_parent(command: &mut Command) {
    // SAFETY: between fork and exec only prctl(2) runs, which is async-signal-safe and
    // touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
}

/// One process of the control plane, killed when dropped.
pub(crate) struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts `program` with `args`, its output appended to `{dir}/{name}.log`.
    pub(crate) fn spawn(
        dir: &Path,
        name: &str,
        program: &Path,
        args: &[String],
    ) -> std::io::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.join(format!("{name}.log")))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut command);
        let child = spawn(command)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", program.display())))?;
        Ok(Self { child })
    }

    /// How the process ended, if it has.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills the process and reaps it.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh folder for one control plane, readable by this user alone (it holds keys and
/// tokens), under `target/k8s-control-plane/run`. Folders that earlier test processes left
/// (their processes are dead) are removed, but for the last one that failed to start.
pub(crate) fn run_dir() -> std::io::Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is in the workspace");
    let root = workspace.join("target/k8s-control-plane/run");
    std::fs::create_dir_all(&root)?;
    for entry in std::fs::read_dir(&root)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().and_then(|p| p.parse::<i32>().ok());
        let alive = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = root.join(format!(
        "{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// A free TCP port on 127.0.0.1, as the kernel picks one.
pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Writes `contents` to a new `file` readable by this user alone.
pub(crate) fn write_private(file: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    // Written aside and renamed into place: tests that write the same file at once (an admin
    // kubeconfig) each see a whole file, and none finds the other's half-made one in its way.
    let mut aside = file.as_os_str().to_owned();
    aside.push(format!(".{}", uuid::Uuid::new_v4().simple()));
    let aside = PathBuf::from(aside);
    std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&aside)?
        .write_all(contents)?;
    std::fs::rename(&aside, file)
}
