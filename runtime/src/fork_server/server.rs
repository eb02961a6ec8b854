//! The template: a runner process that, instead of serving jobs, forks runners on request.
//!
//! It stays single-threaded, which is what makes `fork` safe here: it runs before any async
//! runtime starts, and the forked child goes on to build its own.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};

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
    /// A signalfd that reads SIGCHLD, so that one `poll` waits for requests and exits alike.
    child_exits: OwnedFd,
    original_mask: libc::sigset_t,
    pid: libc::pid_t,
    runners: HashSet<libc::pid_t>,
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
        // SAFETY: F_DUPFD_CLOEXEC on fd 0 returns a new descriptor that this process owns.
        let control = check(unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) })?;
        // SAFETY: fcntl succeeded, so `control` is a fresh descriptor nothing else owns.
        let control = unsafe { OwnedFd::from_raw_fd(control) };
        redirect_to_dev_null(0)?;

        // SAFETY: sigset_t is plain data; the calls below initialise it before use.
        let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        let mut original_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: both sets are valid for the calls; this process has one thread.
        let child_exits = unsafe {
            libc::sigemptyset(&mut mask);
            libc::sigaddset(&mut mask, libc::SIGCHLD);
            check_errno(libc::pthread_sigmask(
                libc::SIG_BLOCK,
                &mask,
                &mut original_mask,
            ))?;
            check(libc::signalfd(
                -1,
                &mask,
                libc::SFD_CLOEXEC | libc::SFD_NONBLOCK,
            ))?
        };
        // SAFETY: signalfd succeeded, so this is a fresh descriptor nothing else owns.
        let child_exits = unsafe { OwnedFd::from_raw_fd(child_exits) };

        // Paid once here instead of in every runner: ring's CPU feature detection.
        let _ = ring::digest::digest(&ring::digest::SHA256, b"");
        let gro_keeper = gro_keeper();

        let template = Template {
            control,
            child_exits,
            original_mask,
            // SAFETY: getpid cannot fail.
            pid: unsafe { libc::getpid() },
            runners: HashSet::new(),
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
            let mut polls = [
                libc::pollfd {
                    fd: self.control.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.child_exits.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `polls` is a live array of two pollfds.
            if unsafe { libc::poll(polls.as_mut_ptr(), 2, -1) } < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.shut_down(&format!("poll failed: {error}"));
            }
            if polls[1].revents != 0 {
                self.drain_child_exits();
                self.reap(true);
            }
            if polls[0].revents == 0 {
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

    fn spawn(&mut self, env: Vec<(String, String)>, output: Vec<OwnedFd>) -> Forked {
        if !(output.is_empty() || output.len() == 2) {
            self.reply_or_exit(&Reply::SpawnFailed {
                error: format!("expected 0 or 2 descriptors, got {}", output.len()),
            });
            return Forked::Template;
        }
        // SAFETY: this process has one thread, so the child starts in a consistent state.
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
                    // SAFETY: _exit skips the template's atexit handlers, which are not ours.
                    unsafe { libc::_exit(exit_code::SETUP) };
                }
                Forked::Runner
            }
            pid => {
                self.runners.insert(pid);
                if let Some(bound) = drain_bound(&env) {
                    self.outlive_parent_for = self.outlive_parent_for.max(bound);
                }
                drop(output);
                self.reply_or_exit(&Reply::Spawned { pid });
                Forked::Template
            }
        }
    }

    /// In the forked child: undo what only the template needs and take the runner's
    /// environment and output.
    fn become_runner(&self, env: Vec<(String, String)>, output: Vec<OwnedFd>) -> io::Result<()> {
        // SAFETY: restores the mask saved at start; this process has one thread.
        check_errno(unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.original_mask, std::ptr::null_mut())
        })?;
        // A runner must not outlive the template: the template is what the parent can kill.
        // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
        check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) })?;
        // SAFETY: getppid cannot fail.
        if unsafe { libc::getppid() } != self.pid {
            return Err(io::Error::other("the fork server exited during the fork"));
        }
        for (fd, target) in output.iter().zip([1, 2]) {
            // SAFETY: dup2 onto stdout or stderr, from a descriptor this process owns.
            check(unsafe { libc::dup2(fd.as_raw_fd(), target) })?;
        }
        drop(output);
        for (name, value) in env {
            std::env::set_var(name, value);
        }
        Ok(())
    }

    fn kill(&self, pid: libc::pid_t) {
        // Only an unreaped runner of this template: its pid cannot have been reused.
        if self.runners.contains(&pid) {
            // SAFETY: kill takes a pid and a signal number.
            unsafe { libc::kill(pid, libc::SIGKILL) };
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
            let mut poll = libc::pollfd {
                fd: self.child_exits.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let millis = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: `poll` is one live pollfd.
            if unsafe { libc::poll(&mut poll, 1, millis) } > 0 {
                self.drain_child_exits();
                // Nobody to tell: only forget the runners that ended.
                self.reap(false);
            }
        }
        self.shut_down("the parent is gone")
    }

    fn drain_child_exits(&self) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: reads into a live buffer of its stated size, until the non-blocking
        // signalfd is empty.
        while unsafe {
            libc::read(
                self.child_exits.as_raw_fd(),
                info.as_mut_ptr().cast(),
                info.len(),
            )
        } > 0
        {}
    }

    /// Reaps every runner that has ended, and reports each to the parent if `report`. Signals
    /// coalesce, so this reaps until none is left.
    fn reap(&mut self, report: bool) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a live i32.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            if !self.runners.remove(&pid) || !report {
                continue;
            }
            let (code, signal) = if libc::WIFEXITED(status) {
                (Some(libc::WEXITSTATUS(status)), None)
            } else {
                (None, Some(libc::WTERMSIG(status)))
            };
            self.reply_or_exit(&Reply::Exited { pid, code, signal });
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
        for &pid in &self.runners {
            // SAFETY: as in `kill`: unreaped runners of this template.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for &pid in &self.runners {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a live i32.
            unsafe { libc::waitpid(pid, &mut status, 0) };
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
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a live local.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    (rc == 0).then_some(socket)
}

fn redirect_to_dev_null(target: i32) -> io::Result<()> {
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: dup2 from a descriptor this process owns onto a standard one.
    check(unsafe { libc::dup2(null.as_raw_fd(), target) })?;
    Ok(())
}

fn check(rc: i32) -> io::Result<i32> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// For the calls that return an error number instead of setting `errno`.
fn check_errno(rc: i32) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}
