//! The template: a runner process that, instead of serving jobs, forks runners on request.
//!
//! It stays single-threaded, which is what makes `fork` safe here: it runs before any async
//! runtime starts, and the forked child goes on to build its own.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd as _, OwnedFd};

use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, WaitOptions};

use std::time::Duration;

use super::{recv, send, Reply, Request, MAX_MESSAGE, PROTOCOL};
use crate::exit_codes as exit_code;
use crate::token::{BootToken, PARENT_ENV};

/// Serves fork requests on stdin until the parent closes it, then waits for its runners to
/// drain and exit (killing those left after their bound), and exits.
/// Returns only in a forked runner, whose environment then holds its boot token.
pub(crate) fn serve() {
    // fork() copies only the calling thread: another thread's locks (the allocator's, an async
    // runtime's) would stay held forever in every runner.
    if let Some(threads) = other_threads() {
        eprintln!(
            "firebrand fork server: the template has {threads} other thread(s) running, and \
             forking it would leave their locks held in every runner. Call \
             firebrand::run_if_child first thing in main, before any thread or async runtime \
             starts (not inside #[tokio::main]), or boot runners without fork_server()."
        );
        std::process::exit(exit_code::SETUP);
    }
    let mut template = match Template::start() {
        Ok(template) => template,
        Err(e) => {
            eprintln!("firebrand fork server: cannot start: {e}");
            std::process::exit(exit_code::SETUP);
        }
    };
    template.run();
}

struct Template {
    control: OwnedFd,
    pid: Pid,
    /// Each runner not yet reaped, by pid, with its pidfd. The pidfd turns readable when the
    /// runner exits, so one `poll` waits for requests and exits alike; and it is the only way
    /// the template signals a runner, so a reused pid is never signalled.
    runners: HashMap<i32, OwnedFd>,
    /// How long its runners may take to exit by themselves once the parent is gone: the
    /// longest `peer_timeout + drain_grace` among their tokens, plus a margin.
    outlive_parent_for: Duration,
    /// See [`gro_keeper`].
    _gro_keeper: Option<std::net::UdpSocket>,
}

impl Template {
    fn start() -> io::Result<Self> {
        // The control socket moves off fd 0 so that a forked runner can close it and still
        // have a stdin.
        let control = rustix::io::fcntl_dupfd_cloexec(std::io::stdin().as_fd(), 3)?;
        let null = std::fs::File::open("/dev/null")?;
        rustix::stdio::dup2_stdin(&null)?;

        // Paid once here instead of in every runner: ring's CPU feature detection.
        let _ = ring::digest::digest(&ring::digest::SHA256, b"");
        let gro_keeper = gro_keeper();

        let template = Template {
            control,
            pid: rustix::process::getpid(),
            runners: HashMap::new(),
            outlive_parent_for: Duration::ZERO,
            _gro_keeper: gro_keeper,
        };
        template.reply(&Reply::Ready { protocol: PROTOCOL })?;
        Ok(template)
    }

    /// Returns only in a forked runner.
    fn run(&mut self) {
        let mut buffer = vec![0; MAX_MESSAGE];
        loop {
            let (control_ready, exited) = match self.wait(true, None) {
                Ok(ready) => ready,
                Err(error) => self.shut_down(&format!("poll failed: {error}")),
            };
            if !exited.is_empty() {
                self.reap(&exited, true);
            }
            if !control_ready {
                continue;
            }
            match recv::<Request>(self.control.as_fd(), &mut buffer) {
                Ok(Some((Request::Spawn { env }, fds))) => {
                    if self.spawn(env, fds) == Forked::Runner {
                        return;
                    }
                }
                Ok(Some((Request::Kill { pid }, _))) => self.kill(pid),
                Ok(None) => self.outlive_parent(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.shut_down(&format!("bad request: {e}")),
            }
        }
    }

    /// Waits, for at most `timeout`, until runners exit or (with `control`) a request
    /// arrives: whether the control socket is readable, and the pids of the runners that
    /// exited. An interrupted wait returns nothing ready.
    fn wait(&self, control: bool, timeout: Option<Duration>) -> io::Result<(bool, Vec<i32>)> {
        use rustix::event::{PollFd, PollFlags};
        let pids: Vec<i32> = self.runners.keys().copied().collect();
        let mut polls: Vec<PollFd<'_>> = control
            .then_some(&self.control)
            .into_iter()
            .chain(pids.iter().map(|pid| &self.runners[pid]))
            .map(|fd| PollFd::new(fd, PollFlags::IN))
            .collect();
        let timeout = timeout.map(|t| rustix::event::Timespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        match rustix::event::poll(&mut polls, timeout.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok((false, Vec::new())),
            Err(error) => return Err(error.into()),
        }
        let (control_poll, runner_polls) = polls.split_at(usize::from(control));
        let control_ready = control_poll.iter().any(|poll| !poll.revents().is_empty());
        let exited = pids
            .iter()
            .zip(runner_polls)
            .filter(|(_, poll)| !poll.revents().is_empty())
            .map(|(pid, _)| *pid)
            .collect();
        Ok((control_ready, exited))
    }

    fn spawn(&mut self, env: Vec<(String, String)>, output: Vec<OwnedFd>) -> Forked {
        if !(output.is_empty() || output.len() == 2) {
            self.reply_or_exit(&Reply::SpawnFailed {
                error: format!("expected 0 or 2 descriptors, got {}", output.len()),
            });
            return Forked::Template;
        }
        // SAFETY: this process has one thread (checked at start, and nothing here starts
        // one), so the child starts in a consistent state.
        match unsafe { libc::fork() } {
            -1 => {
                let error = io::Error::last_os_error();
                self.reply_or_exit(&Reply::SpawnFailed {
                    error: format!("fork failed: {error}"),
                });
                Forked::Template
            }
            0 => {
                if let Err(e) = self.become_runner(env, output) {
                    eprintln!("firebrand fork server: cannot set up a forked runner: {e}");
                    // SAFETY: in the child of the fork above: _exit skips the template's
                    // atexit handlers and its buffered output, which are not the runner's.
                    unsafe { libc::_exit(exit_code::SETUP) };
                }
                Forked::Runner
            }
            pid => {
                let pidfd = Pid::from_raw(pid)
                    .ok_or(rustix::io::Errno::SRCH)
                    .and_then(|p| rustix::process::pidfd_open(p, PidfdFlags::empty()));
                let pidfd = match pidfd {
                    Ok(pidfd) => pidfd,
                    Err(error) => {
                        // Without its pidfd the runner could be neither watched nor killed
                        // safely: end it now (it has not been reaped, so the pid is its own).
                        if let Some(child) = Pid::from_raw(pid) {
                            let _ = rustix::process::kill_process(child, Signal::KILL);
                            let _ = rustix::process::waitpid(Some(child), WaitOptions::empty());
                        }
                        self.reply_or_exit(&Reply::SpawnFailed {
                            error: format!(
                                "pidfd_open failed (Linux 5.3 or later is needed): {error}"
                            ),
                        });
                        return Forked::Template;
                    }
                };
                self.runners.insert(pid, pidfd);
                if let Some(bound) = drain_bound(&env) {
                    self.outlive_parent_for = self.outlive_parent_for.max(bound);
                }
                drop(output);
                self.reply_or_exit(&Reply::Spawned { pid });
                Forked::Template
            }
        }
    }

    /// In the forked child: let go of what only the template needs and take the runner's
    /// environment and output.
    fn become_runner(
        &mut self,
        env: Vec<(String, String)>,
        output: Vec<OwnedFd>,
    ) -> io::Result<()> {
        // Its siblings' pidfds are the template's, not this runner's.
        self.runners.clear();
        // A runner must not outlive the template: the template is what the parent can kill.
        rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
        if rustix::process::getppid() != Some(self.pid) {
            return Err(io::Error::other("the fork server exited during the fork"));
        }
        if let [stdout, stderr] = &output[..] {
            rustix::stdio::dup2_stdout(stdout)?;
            rustix::stdio::dup2_stderr(stderr)?;
        }
        drop(output);
        for (name, value) in env {
            std::env::set_var(name, value);
        }
        Ok(())
    }

    fn kill(&self, pid: i32) {
        // Only through the pidfd of an unreaped runner of this template.
        if let Some(pidfd) = self.runners.get(&pid) {
            let _ = rustix::process::pidfd_send_signal(pidfd, Signal::KILL);
        }
    }

    /// The parent is gone (it closed the control socket, or died). Fork nothing more, and
    /// let each runner find out through its connection and drain its calls exactly as an
    /// executed runner does; kill only what is left once every runner's bound has passed.
    fn outlive_parent(&mut self) -> ! {
        let now = std::time::Instant::now();
        // Bounded by what a parent's validated settings allow; a token beyond that waits a year.
        let deadline = now
            .checked_add(self.outlive_parent_for)
            .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
        tracing::debug!(runners = self.runners.len(), bound = ?self.outlive_parent_for, "parent gone: waiting for runners to drain");
        while !self.runners.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            // Not the control socket: at its end, it reads as ready for ever.
            match self.wait(false, Some(left)) {
                // Nobody to tell: only forget the runners that ended.
                Ok((_, exited)) => self.reap(&exited, false),
                Err(_) => break,
            }
        }
        self.shut_down("the parent is gone")
    }

    /// Reaps the runners in `exited` whose pidfds said so, and reports each to the parent if
    /// `report`.
    fn reap(&mut self, exited: &[i32], report: bool) {
        for &pid in exited {
            let Some(pidfd) = self.runners.get(&pid) else {
                continue;
            };
            let status = rustix::process::waitid(
                WaitId::PidFd(pidfd.as_fd()),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
            );
            let (code, signal) = match status {
                // Not ended after all (a spurious wake-up): keep watching it.
                Ok(None) => continue,
                Ok(Some(status)) => (status.exit_status(), status.terminating_signal()),
                // Reaped by someone else, or gone: nothing more can be learnt.
                Err(_) => (None, None),
            };
            self.runners.remove(&pid);
            if report {
                self.reply_or_exit(&Reply::Exited { pid, code, signal });
            }
        }
    }

    fn reply(&self, reply: &Reply) -> io::Result<()> {
        loop {
            match send(self.control.as_fd(), reply, &[]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                result => return result,
            }
        }
    }

    fn reply_or_exit(&mut self, reply: &Reply) {
        if let Err(e) = self.reply(reply) {
            self.shut_down(&format!("cannot reach the parent: {e}"));
        }
    }

    /// Kills every runner, waits for each, and exits.
    fn shut_down(&mut self, why: &str) -> ! {
        tracing::debug!(why, runners = self.runners.len(), "fork server exiting");
        for pidfd in self.runners.values() {
            let _ = rustix::process::pidfd_send_signal(pidfd, Signal::KILL);
        }
        for pidfd in self.runners.values() {
            let _ = rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED);
        }
        std::process::exit(exit_code::CLEAN);
    }
}

/// How many threads besides this one the process runs, when there are any.
fn other_threads() -> Option<usize> {
    let threads = std::fs::read_dir("/proc/self/task").ok()?.count();
    (threads > 1).then(|| threads - 1)
}

/// A margin over a runner's own bound, for its exit after the bound.
const EXIT_MARGIN: Duration = Duration::from_secs(5);

/// How long after its parent's death the runner whose environment is `env` may still run:
/// `peer_timeout` to notice, `drain_grace` for its calls, and a margin.
fn drain_bound(env: &[(String, String)]) -> Option<Duration> {
    let (_, token) = env.iter().find(|(name, _)| name == PARENT_ENV)?;
    let settings = BootToken::decode(token).ok()?.settings;
    Some(
        settings
            .peer_timeout
            .saturating_add(settings.drain_grace)
            .saturating_add(EXIT_MARGIN),
    )
}

#[derive(Debug, PartialEq, Eq)]
enum Forked {
    Template,
    Runner,
}

/// An IPv6 UDP socket with `UDP_GRO` on, held for the template's life.
///
/// Each QUIC endpoint probes for GRO (quinn-udp binds `[::]:0` and sets `UDP_GRO`). When no
/// such socket is open anywhere on the machine, the kernel enables, and on close disables, a
/// static key for UDP encapsulation, and each switch patches kernel text with an interrupt to
/// every CPU, serialised machine-wide. With this socket open the count never drops to zero
/// while runners start, so their probes are plain counter updates.
fn gro_keeper() -> Option<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind("[::]:0").ok()?;
    // quinn-udp sets `UDP_GRO` on a socket it prepares, as each endpoint's probe does.
    quinn::udp::UdpSocketState::new((&socket).into()).ok()?;
    Some(socket)
}
