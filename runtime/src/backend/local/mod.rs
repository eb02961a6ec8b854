//! Runners as local processes.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use tokio::process::{Child, Command};

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Arc;

use crate::backend::gpu::{self, GpuLease, GpuSet, VISIBLE_DEVICES_ENV};
use crate::backend::output_relay::{relay_output, OutputTail};
use crate::backend::{Backend, BootRequest, Exit, Machine};
use crate::error::BackendError;
use crate::token::{PARENT_ENV, PARENT_FD, PARENT_FD_ENV};
#[cfg(target_os = "linux")]
use fork_server::client::ForkServers;

#[cfg(target_os = "linux")]
pub(crate) mod fork_server;

/// Firebrand's own variables (the boot token, the fork server's and relayed output's flags, a
/// parent's own `FIREBRAND_PARENT` if it is itself a runner) are never forwarded: each runner
/// gets its own.
const FIREBRAND_ENV_PREFIX: &str = "FIREBRAND_";

/// Boots runners as processes on this machine: by default the current executable, which
/// serves jobs through [`run_if_child`](crate::run_if_child) (embedded mode).
///
/// A runner sees its parent's environment, as a FLAME runner sees its machine's: by default it
/// gets every variable of the parent's but Firebrand's own (`FIREBRAND_*`) and those held back
/// with [`deny`](LocalBackendBuilder::deny), then the variables set with
/// [`env`](LocalBackendBuilder::env), then its boot token. So a job that reads `DATABASE_URL`
/// reads it locally as it does on Fly, where the parent forwards it.
/// [`forward_none`](LocalBackendBuilder::forward_none) makes it explicit instead: only the
/// variables named with [`forward`](LocalBackendBuilder::forward).
///
/// ```no_run
/// use firebrand::LocalBackend;
///
/// let backend = LocalBackend::builder()
///     .command("target/release/firebrand-runner")
///     .env("MODEL_DIR", "/srv/models")
///     .deny("AWS_SECRET_ACCESS_KEY")
///     .build();
/// ```
///
/// On a machine with GPUs, [`gpus_per_runner`](LocalBackendBuilder::gpus_per_runner) gives
/// each runner its own GPUs through `CUDA_VISIBLE_DEVICES`:
///
/// ```no_run
/// use firebrand::LocalBackend;
///
/// // Every GPU `nvidia-smi -L` lists, two per runner: a pool's `max` is capped to fit.
/// let backend = LocalBackend::builder().gpus_per_runner(2).build();
/// ```
///
/// `Debug` shows the names of the variables it sets, never their values.
#[derive(Clone)]
pub struct LocalBackend {
    program: Option<PathBuf>,
    args: Vec<OsString>,
    env: BTreeMap<String, String>,
    /// Whether every variable of the parent's not denied is forwarded.
    forward_all: bool,
    /// With `forward_all` off: the variables forwarded.
    forward: Vec<String>,
    /// Variables never forwarded.
    deny: Vec<String>,
    gpus_per_runner: usize,
    gpu_list: Option<Vec<String>>,
    gpus: Option<Arc<GpuSet>>,
    inherit_output: bool,
    #[cfg(target_os = "linux")]
    fork_server: Option<Arc<ForkServers>>,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("forward_all", &self.forward_all)
            .field("forward", &self.forward)
            .field("deny", &self.deny)
            .field("gpus_per_runner", &self.gpus_per_runner)
            .field("gpus", &self.gpus.as_ref().map(|g| g.len()))
            .field("inherit_output", &self.inherit_output)
            .field("fork_server", &self.forks_runners())
            .finish()
    }
}

/// Configures a [`LocalBackend`].
#[derive(Debug, Clone)]
#[must_use]
pub struct LocalBackendBuilder {
    backend: LocalBackend,
}

impl Default for LocalBackend {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl LocalBackend {
    /// A builder with the defaults: the current executable, no arguments, and the parent's
    /// environment but Firebrand's own variables forwarded.
    pub fn builder() -> LocalBackendBuilder {
        LocalBackendBuilder {
            backend: LocalBackend {
                program: None,
                args: Vec::new(),
                env: BTreeMap::new(),
                forward_all: true,
                forward: Vec::new(),
                deny: Vec::new(),
                gpus_per_runner: 0,
                gpu_list: None,
                gpus: None,
                inherit_output: false,
                #[cfg(target_os = "linux")]
                fork_server: None,
            },
        }
    }

    /// The parent's variables a runner gets.
    fn forwarded(&self) -> Vec<(OsString, OsString)> {
        let denied = |name: &std::ffi::OsStr| {
            name.to_str().is_some_and(|name| {
                name.starts_with(FIREBRAND_ENV_PREFIX) || self.deny.iter().any(|d| d == name)
            })
        };
        if self.forward_all {
            std::env::vars_os()
                .filter(|(name, _)| !denied(name))
                .collect()
        } else {
            self.forward
                .iter()
                .filter(|name| !denied(std::ffi::OsStr::new(name)))
                .filter_map(|name| Some((name.into(), std::env::var_os(name)?)))
                .collect()
        }
    }

    fn forks_runners(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.fork_server.is_some();
        #[cfg(not(target_os = "linux"))]
        false
    }

    /// The command with everything but the per-runner variables, and the program's name for
    /// errors.
    fn command(&self) -> Result<(Command, String), BackendError> {
        let program = match &self.program {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(|e| BackendError::Spawn {
                program: "<current executable>".into(),
                source: e,
            })?,
        };
        let mut command = Command::new(program);
        command
            .args(&self.args)
            .env_clear()
            .stdin(Stdio::null())
            // A process group of its own: Ctrl-C in a terminal signals the whole foreground
            // group, and a runner that died of it would fail its in-flight calls while the
            // parent drains. The parent decides a runner's end (SIGTERM, then SIGKILL), and a
            // runner whose parent is gone stops by itself.
            .process_group(0)
            .kill_on_drop(true);
        if !self.inherit_output {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
            // The lines are re-logged: escape codes would only garble them.
            command.env("NO_COLOR", "1");
            // The runner's output must outlive the pipes if the parent dies.
            command.env(crate::token::RELAYED_OUTPUT_ENV, "1");
        }
        for (name, value) in self.forwarded() {
            command.env(name, value);
        }
        command.envs(&self.env);
        let name = format!("{:?}", command.as_std().get_program());
        Ok((command, name))
    }
}

impl LocalBackendBuilder {
    /// Runs `program` instead of the current executable, e.g. a `firebrand-runner` binary.
    pub fn command(mut self, program: impl Into<PathBuf>) -> Self {
        self.backend.program = Some(program.into());
        self
    }

    /// Adds a command-line argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.backend.args.push(arg.into());
        self
    }

    /// Sets an environment variable for every runner.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.backend.env.insert(name.into(), value.into());
        self
    }

    /// Forwards the parent's value of `name`, when it has one: after
    /// [`forward_none`](Self::forward_none), which makes the environment explicit (the whole
    /// environment is forwarded by default).
    pub fn forward(mut self, name: impl Into<String>) -> Self {
        self.backend.forward.push(name.into());
        self
    }

    /// Forwards none of the parent's environment; only the variables named with
    /// [`forward`](Self::forward). Default: all of it, but Firebrand's own variables and
    /// those [`deny`](Self::deny) names.
    pub fn forward_none(mut self) -> Self {
        self.backend.forward_all = false;
        self.backend.forward.clear();
        self
    }

    /// Never forwards the parent's `name` (a credential a job must not see, say). Variables
    /// set with [`env`](Self::env) are still set.
    pub fn deny(mut self, name: impl Into<String>) -> Self {
        self.backend.deny.push(name.into());
        self
    }

    /// Lets runners write straight to the parent's stdout and stderr. Default: each line a
    /// runner writes is logged by the parent through `tracing` (target
    /// `firebrand::runner_output`), tagged with the runner's id and the stream.
    pub fn inherit_output(mut self) -> Self {
        self.backend.inherit_output = true;
        self
    }

    /// Starts runners by forking them from one template process, started from the same program
    /// on first use, instead of executing the program for each. A forked runner skips `exec`,
    /// the dynamic loader and the CPU feature probes, which makes bursts of runners start
    /// faster and cheaper (see `BENCHMARKS.md`). Linux only. Default: off, one `exec` per runner.
    ///
    /// What differs from the default:
    /// - code in `main` before [`run_if_child`](crate::run_if_child) runs once, in the
    ///   template, which must still be single-threaded there (no async runtime started yet);
    /// - forwarded variables are read when the template starts, not at each boot;
    /// - a rebuilt program is picked up only by a new template: one starts when a boot finds
    ///   none, after every runner of the last one has ended.
    ///
    /// The template lives while any runner it forked does, so a pool scaled to zero keeps no
    /// process behind; the next boot starts a new one. It also exits, killing its runners, when
    /// the parent process dies, and each runner dies with the template.
    ///
    /// ```no_run
    /// use firebrand::LocalBackend;
    ///
    /// let backend = LocalBackend::builder()
    ///     .command("target/release/firebrand-runner")
    ///     .fork_server()
    ///     .build();
    /// ```
    #[cfg(target_os = "linux")]
    #[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
    pub fn fork_server(mut self) -> Self {
        self.backend.fork_server = Some(Arc::default());
        self
    }

    /// Gives each runner `count` GPUs of its own, through `CUDA_VISIBLE_DEVICES`; a runner
    /// that ends gives them back. A pool's `max` is capped at the GPUs there are divided by
    /// `count`. Default: 0, no GPU assignment (runners see whatever the parent's env says).
    pub fn gpus_per_runner(mut self, count: usize) -> Self {
        self.backend.gpus_per_runner = count;
        self
    }

    /// The GPUs to hand out, as `CUDA_VISIBLE_DEVICES` names them (indices or UUIDs).
    /// Default: every GPU that `nvidia-smi -L` lists, or none.
    pub fn gpus<S: Into<String>>(mut self, gpus: impl IntoIterator<Item = S>) -> Self {
        self.backend.gpu_list = Some(gpus.into_iter().map(Into::into).collect());
        self
    }

    /// The backend. With [`gpus_per_runner`](Self::gpus_per_runner) and no GPU list, this
    /// runs `nvidia-smi -L` once.
    #[must_use]
    pub fn build(mut self) -> LocalBackend {
        let backend = &mut self.backend;
        if backend.gpus_per_runner > 0 {
            let list = backend.gpu_list.take().unwrap_or_else(gpu::detect);
            tracing::info!(gpus = ?list, per_runner = backend.gpus_per_runner, "local GPUs");
            backend.gpus = Some(Arc::new(GpuSet::new(list)));
        }
        self.backend
    }
}

impl Backend for LocalBackend {
    // Its pipes are relayed, or its output inherited: the parent has it either way.
    fn brings_output(&self) -> bool {
        true
    }

    fn bind_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn parent_addrs(&self, bound: SocketAddr) -> Vec<String> {
        vec![bound.to_string()]
    }

    fn max_runners(&self) -> Option<usize> {
        let gpus = self.gpus.as_ref()?;
        Some(gpus.len() / self.gpus_per_runner)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async move {
            #[cfg(target_os = "linux")]
            if let Some(servers) = &self.fork_server {
                servers.wait_stopped().await;
            }
        }
        .boxed()
    }

    fn boot(&self, request: BootRequest) -> BoxFuture<'_, Result<Box<dyn Machine>, BackendError>> {
        async move {
            // Waits, within the boot timeout, for an ending runner to give its GPUs back.
            let gpus = match &self.gpus {
                Some(set) => Some(set.take(self.gpus_per_runner).await),
                None => None,
            };
            let mut env = request.env;
            if let Some(lease) = &gpus {
                env.push((VISIBLE_DEVICES_ENV.into(), lease.visible_devices()));
            }
            #[cfg(target_os = "linux")]
            if let Some(servers) = &self.fork_server {
                return self.fork(servers, request.runner_id, env, gpus).await;
            }
            let (mut command, program) = self.command()?;
            // The token goes through a pipe, not the environment (see `PARENT_FD_ENV`).
            let token = take_token(&mut env);
            let _token_pipe = match &token {
                Some(token) => Some(hand_over_token(&mut command, token)?),
                None => None,
            };
            command.envs(env);
            let mut child = command
                .spawn()
                .map_err(|source| BackendError::Spawn { program, source })?;
            let pid = child.id().unwrap_or_default();
            let runner = request.runner_id;
            let tail = OutputTail::default();
            if let Some(stdout) = child.stdout.take() {
                tokio::spawn(relay_output(stdout, runner, "stdout", None));
            }
            if let Some(stderr) = child.stderr.take() {
                tokio::spawn(relay_output(stderr, runner, "stderr", Some(tail.clone())));
            }
            tracing::debug!(%runner, pid, gpus = gpus.as_ref().map(GpuLease::visible_devices), "runner process spawned");
            Ok(Box::new(LocalProcess {
                child,
                pid,
                tail,
                _gpus: gpus,
            }) as Box<dyn Machine>)
        }
        .boxed()
    }
}

#[cfg(target_os = "linux")]
impl LocalBackend {
    async fn fork(
        &self,
        servers: &ForkServers,
        runner: crate::error::RunnerId,
        env: Vec<(String, String)>,
        gpus: Option<GpuLease>,
    ) -> Result<Box<dyn Machine>, BackendError> {
        let server = servers.get_or_start(|| self.command())?;
        let output = if self.inherit_output {
            None
        } else {
            let (stdout, stdout_writer) = output_pipe()?;
            let (stderr, stderr_writer) = output_pipe()?;
            tokio::spawn(relay_output(stdout, runner, "stdout", None));
            tokio::spawn(relay_output(stderr, runner, "stderr", None));
            Some((stdout_writer, stderr_writer))
        };
        let visible = gpus.as_ref().map(GpuLease::visible_devices);
        let forked = server
            .spawn(env, output, gpus)
            .await
            .map_err(|why| BackendError::Other {
                message: format!("the fork server could not fork a runner: {why}"),
                source: None,
            })?;
        tracing::debug!(%runner, pid = forked.pid(), gpus = visible, "runner process forked");
        Ok(Box::new(forked))
    }
}

/// Removes the boot token from a runner's environment, and returns it.
fn take_token(env: &mut Vec<(String, String)>) -> Option<String> {
    let at = env.iter().position(|(name, _)| name == PARENT_ENV)?;
    Some(env.remove(at).1)
}

/// Arranges for the runner `command` starts to read `token` from an inherited pipe, at
/// descriptor [`PARENT_FD`], named by [`PARENT_FD_ENV`]. The token is written (it fits in the
/// pipe's buffer) and the write end closed before the runner starts. Returns the read end,
/// which the caller keeps open until the runner has been spawned.
fn hand_over_token(command: &mut Command, token: &str) -> Result<OwnedFd, BackendError> {
    use std::io::Write as _;
    let fail = |e: std::io::Error| BackendError::other("cannot hand over the boot token", e);
    let (read, write) = cloexec_pipe().map_err(fail)?;
    std::fs::File::from(write)
        .write_all(token.as_bytes())
        .map_err(fail)?;
    let source = read.as_raw_fd();
    command.env(PARENT_FD_ENV, PARENT_FD.to_string());
    // SAFETY: the closure runs in the forked child before exec, and calls only dup2 and fcntl,
    // which are async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            if source == PARENT_FD {
                // Already in place: only clear close-on-exec, which dup2 would have cleared.
                if libc::fcntl(PARENT_FD, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(source, PARENT_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(read)
}

/// A pipe whose two ends are closed on exec.
fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    // Both ends are close-on-exec from the start, so no process another thread starts
    // meanwhile gets them.
    #[cfg(target_os = "linux")]
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    // Without pipe2 (macOS), the ends are made close-on-exec just after.
    #[cfg(not(target_os = "linux"))]
    let (read, write) = {
        let (read, write) = rustix::pipe::pipe()?;
        for fd in [&read, &write] {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
        }
        (read, write)
    };
    Ok((read, write))
}

/// A pipe for a forked runner's output: the parent's end, to relay, and the runner's.
#[cfg(target_os = "linux")]
fn output_pipe() -> Result<(tokio::net::unix::pipe::Receiver, std::os::fd::OwnedFd), BackendError> {
    let pipe = || -> std::io::Result<_> {
        let (read, write) = fork_server::pipe()?;
        Ok((
            tokio::net::unix::pipe::Receiver::from_owned_fd(read)?,
            write,
        ))
    };
    pipe().map_err(|e| BackendError::other("cannot make an output pipe", e))
}

/// A runner process. Dropping it kills the process and gives its GPUs back.
struct LocalProcess {
    child: Child,
    pid: u32,
    tail: OutputTail,
    // Declared after `child`: dropped after the kill.
    _gpus: Option<GpuLease>,
}

fn describe_status(status: std::process::ExitStatus) -> Exit {
    let signal = std::os::unix::process::ExitStatusExt::signal(&status);
    Exit::process(status.code(), signal)
}

impl Machine for LocalProcess {
    fn describe(&self) -> String {
        format!("pid {}", self.pid)
    }

    fn exited(&mut self) -> BoxFuture<'_, Exit> {
        async move {
            match self.child.wait().await {
                Ok(status) => {
                    let exit = describe_status(status);
                    Exit {
                        description: self.tail.explain(exit.description).await,
                        ..exit
                    }
                }
                Err(e) => Exit {
                    code: None,
                    description: format!("cannot wait for the process: {e}"),
                },
            }
        }
        .boxed()
    }

    fn terminate(
        mut self: Box<Self>,
        grace: Duration,
    ) -> BoxFuture<'static, Result<(), BackendError>> {
        async move {
            if tokio::time::timeout(grace, self.child.wait())
                .await
                .is_err()
            {
                tracing::debug!(
                    pid = self.pid,
                    "runner did not exit within its grace; killing"
                );
                self.child
                    .kill()
                    .await
                    .map_err(|e| BackendError::other(format!("cannot kill pid {}", self.pid), e))?;
            }
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_names_not_values() {
        let backend = LocalBackend::builder().env("API_KEY", "hunter2").build();
        let shown = format!("{backend:?}");
        assert!(
            shown.contains("API_KEY") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
