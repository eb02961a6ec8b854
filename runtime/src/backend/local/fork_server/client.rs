//! The parent side: starts a template and asks it for runners.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};

use super::{recv, send, socket_pair, Reply, Request, MAX_MESSAGE, PROTOCOL};
use crate::backend::gpu::GpuLease;
use crate::backend::output_relay::{relay_output, OutputTail};
use crate::backend::{Exit, Machine};
use crate::error::BackendError;
use crate::token::FORK_SERVER_ENV;

/// The template a backend forks its runners from. It is started on a boot that finds none, and
/// lives while any runner it forked does: a pool scaled to zero keeps no template behind.
#[derive(Default)]
pub(crate) struct ForkServers {
    current: Mutex<Current>,
}

/// The latest template, and whether its process has ended.
#[derive(Default)]
struct Current {
    server: std::sync::Weak<ForkServer>,
    exited: Option<watch::Receiver<bool>>,
}

/// How long [`ForkServers::wait_stopped`] waits for a template whose last runner has gone.
const STOP_WAIT: Duration = Duration::from_secs(5);

impl ForkServers {
    /// The running template, or a new one started from `command`.
    pub(crate) fn get_or_start(
        &self,
        command: impl FnOnce() -> Result<(Command, String), BackendError>,
    ) -> Result<Arc<ForkServer>, BackendError> {
        let mut current = self.current.lock();
        if let Some(server) = current.server.upgrade().filter(|s| s.ended().is_none()) {
            return Ok(server);
        }
        let (command, program) = command()?;
        let (server, exited) =
            ForkServer::start(command).map_err(|source| BackendError::Spawn { program, source })?;
        *current = Current {
            server: Arc::downgrade(&server),
            exited: Some(exited),
        };
        Ok(server)
    }

    /// Waits (for at most [`STOP_WAIT`]) until the latest template has exited, when no runner
    /// holds it any more; returns at once while one does (another pool sharing the backend).
    pub(crate) async fn wait_stopped(&self) {
        let exited = {
            let current = self.current.lock();
            if current.server.strong_count() > 0 {
                return;
            }
            current.exited.clone()
        };
        if let Some(mut exited) = exited {
            let _ = tokio::time::timeout(STOP_WAIT, exited.wait_for(|exited| *exited)).await;
        }
    }
}

/// One template process. Dropping the last handle kills it, and with it every runner it forked.
pub(crate) struct ForkServer {
    requests: mpsc::UnboundedSender<Outgoing>,
    state: Arc<Mutex<State>>,
    /// Dropped with the last handle, which tells the driver (which owns the template process)
    /// to kill it and wait for its exit.
    _stop: oneshot::Sender<()>,
}

struct Outgoing {
    request: Request,
    fds: Vec<OwnedFd>,
}

type Spawned = Result<(i32, watch::Receiver<Option<Exit>>), String>;

#[derive(Default)]
struct State {
    /// Answers owed, oldest first: the template answers spawns in order.
    spawns: VecDeque<oneshot::Sender<Spawned>>,
    runners: HashMap<i32, watch::Sender<Option<Exit>>>,
    ended: Option<String>,
}

impl ForkServer {
    fn start(mut command: Command) -> io::Result<(Arc<Self>, watch::Receiver<bool>)> {
        let (ours, theirs) = socket_pair()?;
        set_nonblocking(ours.as_fd())?;
        let template = command
            .env(FORK_SERVER_ENV, "1")
            .stdin(Stdio::from(theirs))
            .kill_on_drop(true)
            .spawn()?;
        let (template, tail) = relay_template_output(template);
        // SAFETY: `ours` is an open socket that the AsyncFd owns, and so keeps open, for its
        // whole life.
        let socket = unsafe { AsyncFd::register(ours) }?;
        let (requests, outgoing) = mpsc::unbounded_channel();
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, stopped) = oneshot::channel();
        let (exited_tx, exited) = watch::channel(false);
        let driving = drive(
            template,
            tail,
            socket,
            outgoing,
            requests.clone(),
            Arc::clone(&state),
            stopped,
        );
        tokio::spawn(async move {
            driving.await;
            exited_tx.send_replace(true);
        });
        Ok((
            Arc::new(ForkServer {
                requests,
                state,
                _stop: stop,
            }),
            exited,
        ))
    }

    /// Why the template ended, if it has.
    fn ended(&self) -> Option<String> {
        self.state.lock().ended.clone()
    }

    /// Forks a runner with `env` added to the template's environment, and `output` as its
    /// stdout and stderr (or the template's own).
    pub(crate) async fn spawn(
        self: &Arc<Self>,
        env: Vec<(String, String)>,
        output: Option<(OwnedFd, OwnedFd)>,
        gpus: Option<GpuLease>,
    ) -> Result<ForkedRunner, String> {
        let (answer, answered) = oneshot::channel();
        {
            // Queued and sent under one lock, so the answers line up with the requests.
            let mut state = self.state.lock();
            if let Some(reason) = &state.ended {
                return Err(reason.clone());
            }
            state.spawns.push_back(answer);
            let fds = output.map(|(out, err)| vec![out, err]).unwrap_or_default();
            let _ = self.requests.send(Outgoing {
                request: Request::Spawn { env },
                fds,
            });
        }
        let (pid, exit) = answered
            .await
            .map_err(|_| "the fork server ended".to_string())??;
        Ok(ForkedRunner {
            pid,
            exit,
            server: Arc::clone(self),
            _gpus: gpus,
        })
    }

    fn kill(&self, pid: i32) {
        let _ = self.requests.send(Outgoing {
            request: Request::Kill { pid },
            fds: Vec::new(),
        });
    }
}

/// How long an ended template's exit status is waited for, to put it in the error.
const EXIT_STATUS_WAIT: Duration = Duration::from_secs(1);

/// Sends requests and reads replies until the template goes away, then fails whatever waits;
/// or, once the last handle is dropped (`stop`), kills the template and waits for its exit.
/// Its runners die with it (PR_SET_PDEATHSIG). Should the runtime drop this task first, the
/// template is killed all the same (`kill_on_drop`).
async fn drive(
    mut template: Child,
    tail: OutputTail,
    socket: AsyncFd<OwnedFd>,
    outgoing: mpsc::UnboundedReceiver<Outgoing>,
    requests: mpsc::UnboundedSender<Outgoing>,
    state: Arc<Mutex<State>>,
    stop: oneshot::Receiver<()>,
) {
    let error = tokio::select! {
        result = exchange(&socket, outgoing, &requests, &state) => result.unwrap_err(),
        _ = stop => {
            let _ = template.start_kill();
            let _ = template.wait().await;
            state.lock().ended = Some("the fork server was stopped".into());
            return;
        }
    };
    let status = match tokio::time::timeout(EXIT_STATUS_WAIT, template.wait()).await {
        Ok(Ok(status)) => format!(" ({status})"),
        _ => String::new(),
    };
    let reason = tail
        .explain(format!("the fork server ended{status}: {error}"))
        .await;
    tracing::warn!(%reason, "fork server lost");
    let mut state = state.lock();
    for answer in state.spawns.drain(..) {
        let _ = answer.send(Err(reason.clone()));
    }
    for (_, exit) in state.runners.drain() {
        let _ = exit.send(Some(Exit {
            code: None,
            description: reason.clone(),
        }));
    }
    state.ended = Some(reason);
}

async fn exchange(
    socket: &AsyncFd<OwnedFd>,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    requests: &mpsc::UnboundedSender<Outgoing>,
    state: &Mutex<State>,
) -> io::Result<()> {
    let mut buffer = vec![0; MAX_MESSAGE];
    loop {
        tokio::select! {
            ready = socket.readable() => {
                let mut ready = ready?;
                let Ok(received) = ready.try_io(|s| recv::<Reply>(s.as_fd(), &mut buffer)) else {
                    continue;
                };
                let Some((reply, _)) = received? else {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "it closed the socket"));
                };
                handle(reply, requests, state)?;
            }
            Some(message) = outgoing.recv() => {
                let fds: Vec<BorrowedFd<'_>> = message.fds.iter().map(|fd| fd.as_fd()).collect();
                loop {
                    let mut ready = socket.writable().await?;
                    if let Ok(sent) = ready.try_io(|s| send(s.as_fd(), &message.request, &fds)) {
                        sent?;
                        break;
                    }
                }
                // The runner holds its own copies now.
                drop(message.fds);
            }
        }
    }
}

fn handle(
    reply: Reply,
    requests: &mpsc::UnboundedSender<Outgoing>,
    state: &Mutex<State>,
) -> io::Result<()> {
    let mut state = state.lock();
    match reply {
        Reply::Ready { protocol } if protocol == PROTOCOL => {}
        Reply::Ready { protocol } => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("it speaks protocol {protocol}, this parent {PROTOCOL}"),
            ))
        }
        Reply::Spawned { pid } => {
            let (exit, exited) = watch::channel(None);
            state.runners.insert(pid, exit);
            let delivered = state
                .spawns
                .pop_front()
                .is_some_and(|answer| answer.send(Ok((pid, exited))).is_ok());
            if !delivered {
                // Nobody waits for this runner any more: its boot was cancelled.
                let _ = requests.send(Outgoing {
                    request: Request::Kill { pid },
                    fds: Vec::new(),
                });
            }
        }
        Reply::SpawnFailed { error } => {
            if let Some(answer) = state.spawns.pop_front() {
                let _ = answer.send(Err(error));
            }
        }
        Reply::Exited { pid, code, signal } => {
            if let Some(exit) = state.runners.remove(&pid) {
                let _ = exit.send(Some(Exit::process(code, signal)));
            }
        }
    }
    Ok(())
}

fn relay_template_output(mut template: Child) -> (Child, OutputTail) {
    let pid = template.id().unwrap_or_default();
    tracing::debug!(pid, "fork server started");
    let label = format!("fork-server-{pid}");
    let tail = OutputTail::default();
    if let Some(stdout) = template.stdout.take() {
        tokio::spawn(relay_output(stdout, label.clone(), "stdout", None));
    }
    if let Some(stderr) = template.stderr.take() {
        tokio::spawn(relay_output(stderr, label, "stderr", Some(tail.clone())));
    }
    (template, tail)
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::io::ioctl_fionbio(fd, true)?)
}

/// A runner forked by a template. Dropping it kills the runner and gives its GPUs back.
pub(crate) struct ForkedRunner {
    pid: i32,
    exit: watch::Receiver<Option<Exit>>,
    server: Arc<ForkServer>,
    _gpus: Option<GpuLease>,
}

impl ForkedRunner {
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    async fn wait(&mut self) -> Exit {
        loop {
            if let Some(exit) = self.exit.borrow_and_update().clone() {
                return exit;
            }
            if self.exit.changed().await.is_err() {
                return Exit {
                    code: None,
                    description: "the fork server ended".into(),
                };
            }
        }
    }
}

impl Machine for ForkedRunner {
    fn describe(&self) -> String {
        format!("pid {} (forked)", self.pid)
    }

    fn exited(&mut self) -> BoxFuture<'_, Exit> {
        self.wait().boxed()
    }

    fn terminate(
        mut self: Box<Self>,
        grace: Duration,
    ) -> BoxFuture<'static, Result<(), BackendError>> {
        async move {
            if tokio::time::timeout(grace, self.wait()).await.is_err() {
                tracing::debug!(
                    pid = self.pid,
                    "runner did not exit within its grace; killing"
                );
                self.server.kill(self.pid);
                self.wait().await;
            }
            Ok(())
        }
        .boxed()
    }
}

impl Drop for ForkedRunner {
    fn drop(&mut self) {
        if self.exit.borrow().is_none() {
            self.server.kill(self.pid);
        }
    }
}
