//! The runner side: a process that dials its parent and serves jobs.
//!
//! `dial.rs` reaches the parent; `call.rs` and `stream.rs` serve each call on the jobs'
//! runtime; the terminator (`terminator.rs`) decides when the runner stops.
//!
//! An app embeds the runner with one call at the top of `main`:
//!
//! ```no_run
//! # fn registry() -> firebrand::Registry { firebrand::Registry::new() }
//! fn main() {
//!     let registry = registry();
//!     // Serves jobs and exits when started by a pool; returns at once otherwise.
//!     firebrand::run_if_child_with(&registry);
//!     // ... the app's own main, which may build a pool with the same registry ...
//! }
//! ```

mod call;
mod claim;
mod dial;
mod logs;
mod park;
mod relayed_output;
mod reply;
mod resources;
mod stats;
mod stream;
mod terminator;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

pub use crate::token::{TokenError, PARENT_ENV, PARENT_FD_ENV};
pub use claim::FLY_API_SOCKET_ENV;
pub(crate) use logs::{cut as cut_log_text, pace as log_pace, MAX_LOG_LINE};
pub use logs::{log_layer, LOG_BURST, MAX_LOG_LINES_PER_SECOND};
pub use stats::RunnerStats;

use crate::registry::Registry;
use crate::token::BootToken;
use crate::wire::{self, close, ControlMessage, DrainReason};
use call::{serve_call, CallContext};
pub(crate) use resources::Resources;
use stats::STATS;
use terminator::{Stop, Terminator};

/// How long a runner its parent released waits for the jobs it aborted to unwind. An async job
/// is dropped at its next await, which one that computes without awaiting may not reach for a
/// long time; a blocking one cannot be stopped at all. Either ends with the process. Well
/// under the parent's `terminate_grace` (5 s by default), so that the runner exits on its own.
const ABORT_WAIT: Duration = Duration::from_millis(500);

/// Process exit codes of a runner.
pub mod exit_code {
    pub use crate::exit_codes::*;
}

/// Why a runner stopped serving.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServeExit {
    /// The parent closed the connection: it is done with this runner.
    Released,
    /// The parent disappeared; in-flight calls were drained for at most the grace period.
    ParentLost(String),
}

/// Why a runner could not serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The boot token was missing or malformed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// No parent address answered before the connect failsafe.
    #[error("parent not reached within {failsafe:?}: {last_error}")]
    Unreachable {
        /// The failsafe period.
        failsafe: Duration,
        /// The last connection error.
        last_error: String,
    },
    /// The parent refused this runner.
    #[error("parent refused this runner: {0}")]
    Refused(String),
    /// Local set-up failed.
    #[error("runner set-up failed: {0}")]
    Setup(String),
}

impl ServeError {
    /// The process exit code for this error.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        match self {
            ServeError::Token(_) => exit_code::BAD_TOKEN,
            ServeError::Unreachable { .. } => exit_code::UNREACHABLE,
            ServeError::Refused(_) => exit_code::REFUSED,
            ServeError::Setup(_) => exit_code::SETUP,
        }
    }
}

/// Counts of what this runner process has served so far.
#[must_use]
pub fn stats() -> RunnerStats {
    STATS.snapshot()
}

/// Serves every [`#[job]`](crate::job) linked into the binary and exits the process if
/// [`FIREBRAND_PARENT`](PARENT_ENV) or [`FIREBRAND_PARENT_FD`](PARENT_FD_ENV) is set; returns at
/// once otherwise. [`run_if_child_with`] serves a [`Registry`] built at run time instead.
///
/// ```no_run
/// #[firebrand::job]
/// async fn double(n: u64) -> u64 {
///     n * 2
/// }
///
/// fn main() {
///     firebrand::run_if_child(); // a runner serves here and exits; the parent goes on
///     // ... the app, which builds a `Pool` ...
/// }
/// ```
///
/// Two collected jobs with one name make a runner print both functions and exit (see
/// [`Registry::collected`]); the parent's `Pool::build` fails with the same error.
pub fn run_if_child() {
    if !is_child() {
        return;
    }
    match Registry::collected() {
        Ok(registry) => run_if_child_with(&registry),
        Err(e) => {
            eprintln!("firebrand runner: {e}");
            std::process::exit(exit_code::SETUP);
        }
    }
}

/// Whether this process was started as a runner or a fork server template.
fn is_child() -> bool {
    [PARENT_ENV, PARENT_FD_ENV, crate::token::FORK_SERVER_ENV]
        .iter()
        .any(|name| std::env::var_os(name).is_some())
}

/// Serves `registry` and exits the process if [`FIREBRAND_PARENT`](PARENT_ENV) or
/// [`FIREBRAND_PARENT_FD`](PARENT_FD_ENV) is set; returns at once otherwise.
///
/// Call it first thing in `main`: when it serves, it builds a runtime of its own for the jobs,
/// and the connection gets a thread of its own. Inside a running runtime (`#[tokio::main]`) it
/// still works, serving on new threads while the app's runtime idles; but a
/// [fork server](crate::backend::LocalBackendBuilder::fork_server) template must reach it with
/// no other thread running, and refuses to start otherwise. A malformed token prints the reason
/// to stderr and exits non-zero (see [`exit_code`]); the parent's boot error quotes it.
///
/// Started as the template of a [fork server](crate::backend::LocalBackendBuilder::fork_server),
/// it forks runners on its parent's request instead, and returns from here only in each forked
/// runner, to serve as above.
pub fn run_if_child_with(registry: &Registry) {
    #[cfg(target_os = "linux")]
    if std::env::var_os(crate::token::FORK_SERVER_ENV).is_some() {
        std::env::remove_var(crate::token::FORK_SERVER_ENV);
        // Returns only in a runner forked from this template, with its token set.
        crate::backend::local::fork_server::server::serve();
    }
    if std::env::var_os(PARENT_ENV).is_none() && std::env::var_os(PARENT_FD_ENV).is_none() {
        return;
    }
    let token = take_token();
    if std::env::var_os(crate::token::RELAYED_OUTPUT_ENV).is_some() {
        std::env::remove_var(crate::token::RELAYED_OUTPUT_ENV);
        relayed_output::outlive_the_relay();
    }
    if let Ok(token) = &token {
        logs::set_filter(&token.settings.log_filter);
    }
    if !tracing::dispatcher::has_been_set() {
        // No subscriber of the app's own: the runner's events go to its parent, and to the
        // machine's log where the parent does not see this process's output.
        let machine_log = token.as_ref().is_ok_and(|t| t.settings.forward_output);
        let _ = tracing::subscriber::set_global_default(logs::default_subscriber(machine_log));
    }
    let captured = token
        .as_ref()
        .is_ok_and(|t| t.settings.forward_output)
        .then(logs::capture_output);
    let code = match token {
        Err(e) => {
            eprintln!("firebrand runner: {e}");
            exit_code::BAD_TOKEN
        }
        Ok(token) => {
            let serve_here = || serve_on_own_runtime(token, registry);
            if tokio::runtime::Handle::try_current().is_ok() {
                // Called inside the app's runtime (`#[tokio::main]`), where no runtime can be
                // started: the runner gets threads of its own, and the app's runtime idles.
                std::thread::scope(|scope| {
                    std::thread::Builder::new()
                        .name("firebrand-runner".into())
                        .spawn_scoped(scope, serve_here)
                        .map(|serving| match serving.join() {
                            Ok(code) => code,
                            Err(panic) => std::panic::resume_unwind(panic),
                        })
                        .unwrap_or_else(|e| {
                            eprintln!("firebrand runner: cannot start a thread to serve on: {e}");
                            exit_code::SETUP
                        })
                })
            } else {
                serve_here()
            }
        }
    };
    // The last lines (the error that ends a runner, say) must reach the machine's log.
    if let Some(captured) = captured {
        captured.finish();
    }
    std::process::exit(code)
}

/// Serves on a runtime of its own for the jobs, and returns the process's exit code.
fn serve_on_own_runtime(token: BootToken, registry: &Registry) -> i32 {
    // The jobs' runtime, and tokio's blocking pool for blocking jobs. The connection gets a
    // thread of its own in `serve`.
    let workers = job_workers(token.settings.max_concurrency);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("firebrand-job")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("firebrand runner: cannot start the async runtime: {e}");
            return exit_code::SETUP;
        }
    };
    let result = runtime.block_on(serve_token(token, registry.clone()));
    runtime.shutdown_timeout(Duration::from_millis(200));
    exit_code_of(&result)
}

/// The most worker threads a runner's jobs' runtime gets, whatever its `max_concurrency`.
///
/// An async job that computes without awaiting holds its worker until it ends. With one worker
/// per core, a third such job on two cores waited for the first to end (16 s, and then its
/// timeout). With a worker per concurrency slot the kernel shares the cores among them, as the
/// BEAM's scheduler shares them among FLAME's processes. Past this many, an idle worker costs
/// more than the rare job that needs it: a runner with a higher `max_concurrency` runs its
/// jobs beyond the 16th non-yielding one as before, each on the next free worker. The cap was 64
/// at first: with 4 runners of `max_concurrency(256)` on two cores (256 workers) throughput at
/// 256 in flight fell to 0.36x the QUIC floor, from 0.50x; at 16 it is 0.56x (BENCHMARKS.md).
pub const MAX_JOB_WORKERS: usize = 16;

/// Worker threads for a runner serving `max_concurrency` calls at once: one per slot, at least
/// one per core, at most [`MAX_JOB_WORKERS`].
fn job_workers(max_concurrency: u32) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (max_concurrency as usize).clamp(cores.min(MAX_JOB_WORKERS), MAX_JOB_WORKERS)
}

/// The exit code for how [`serve`] ended.
#[must_use]
pub fn exit_code_of(result: &Result<ServeExit, ServeError>) -> i32 {
    match result {
        Ok(ServeExit::Released) => exit_code::CLEAN,
        Ok(ServeExit::ParentLost(_)) => exit_code::PARENT_LOST,
        Err(e) => {
            eprintln!("firebrand runner: {e}");
            e.exit_code()
        }
    }
}

/// Serves `registry` for the parent whose boot token this process was started with (from
/// [`FIREBRAND_PARENT_FD`](PARENT_FD_ENV) or [`FIREBRAND_PARENT`](PARENT_ENV), both removed
/// from the environment once read), until the parent releases the runner or is lost, then
/// drains in-flight calls. [`run_if_child`] does this and exits; call `serve` instead to serve
/// on a runtime of the app's own, and pass its outcome to [`exit_code_of`].
///
/// Jobs run on the runtime this is awaited on. The QUIC connection runs on a thread of its own
/// (`firebrand-io`, with a single-threaded runtime), which no job can occupy: a job that
/// computes for minutes without awaiting, or calls `std::thread::sleep`, delays other async
/// jobs on its worker but never the keep-alives, so the parent never declares the runner lost
/// for it.
///
/// # Errors
/// [`ServeError::Token`] if the process has no valid boot token; another [`ServeError`] if the
/// parent is never reached or refuses the runner.
pub async fn serve(registry: Registry) -> Result<ServeExit, ServeError> {
    serve_token(take_token()?, registry).await
}

/// Reads this process's boot token, and removes what names it from the environment: the token
/// holds a private key, to be kept from the processes this one starts.
fn take_token() -> Result<BootToken, TokenError> {
    let token = BootToken::from_env();
    std::env::remove_var(PARENT_ENV);
    std::env::remove_var(PARENT_FD_ENV);
    token
}

/// [`serve`] with the token already read.
async fn serve_token(token: BootToken, registry: Registry) -> Result<ServeExit, ServeError> {
    let jobs = tokio::runtime::Handle::current();
    let span = tracing::info_span!("runner", runner = %token.runner_id);
    let (mut done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("firebrand-io".into())
        .spawn(move || {
            let io = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let io = match io {
                Ok(io) => io,
                Err(e) => {
                    let _ = done.send(Err(ServeError::Setup(format!(
                        "cannot start the connection's runtime: {e}"
                    ))));
                    return;
                }
            };
            let serving = serve_in_span(token, registry, jobs).instrument(span);
            let outcome = io.block_on(async {
                tokio::select! {
                    outcome = serving => Some(outcome),
                    // Whoever awaited `serve` dropped it: stop serving too.
                    () = done.closed() => None,
                }
            });
            if let Some(outcome) = outcome {
                let _ = done.send(outcome);
            }
            io.shutdown_timeout(Duration::from_millis(100));
        })
        .map_err(|e| ServeError::Setup(format!("cannot start the connection's thread: {e}")))?;
    result.await.unwrap_or_else(|_| {
        Err(ServeError::Setup(
            "the connection's thread ended without an outcome".into(),
        ))
    })
}

async fn serve_in_span(
    token: BootToken,
    registry: Registry,
    jobs: tokio::runtime::Handle,
) -> Result<ServeExit, ServeError> {
    logs::set_filter(&token.settings.log_filter);
    let mut terminator = Terminator::new(&token.settings);
    let mut continued = park::Continued::watch();
    // One listener for the runner's life: see `Terminator::stops`.
    let mut sigterm = terminator::sigterm();
    let mut connected = dial::connect(&token, &registry, terminator.connect_failsafe()).await?;
    loop {
        tracing::info!("connected to parent");
        if let Some(idle) = connected.idle_override {
            terminator.override_idle(idle);
        }
        let end = serve_connection(
            &token,
            &registry,
            &jobs,
            Arc::new(terminator),
            connected,
            &mut sigterm,
        );
        match end.await {
            Session::Ended(exit) => return Ok(exit),
            Session::Parked => tracing::info!("parked: waiting to be suspended"),
        }
        match wait_parked(&token, &registry, &mut continued, &mut sigterm).await {
            Some((resumed, again)) => (terminator, connected) = (resumed, again),
            None => return Ok(ServeExit::Released),
        }
    }
}

/// How one connection to the parent ended.
enum Session {
    /// The runner is done: exit.
    Ended(ServeExit),
    /// The parent parked the runner, to be suspended.
    Parked,
}

/// Serves calls on `connected` until the parent releases, parks or loses the runner, or the
/// terminator stops it.
async fn serve_connection(
    token: &BootToken,
    registry: &Registry,
    jobs: &tokio::runtime::Handle,
    terminator: Arc<Terminator>,
    connected: dial::Connected,
    sigterm: &mut terminator::Sigterm,
) -> Session {
    let dial::Connected {
        endpoint,
        connection,
        control,
        ..
    } = connected;
    // One writer for the control stream: drain notices first, then log lines.
    let (drains, drain_notices) = tokio::sync::mpsc::unbounded_channel();
    let writer = tokio::spawn(write_control(control, drain_notices));
    let settings = &token.settings;
    let cx = Arc::new(CallContext {
        resources: Arc::new(Resources::new(Arc::clone(&terminator))),
        registry: registry.clone(),
        slots: Arc::new(Semaphore::new(settings.max_concurrency as usize)),
        max_payload_len: usize::try_from(settings.max_payload_len).unwrap_or(usize::MAX),
        jobs: jobs.clone(),
        released: CancellationToken::new(),
    });
    // The tasks serving calls, to wait for once their jobs are aborted.
    let serving = TaskTracker::new();
    let mut released = false;
    let mut stops = terminator.stops(sigterm);
    let exit = loop {
        tokio::select! {
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let guard = terminator.stream_started();
                    let served = Arc::clone(&cx);
                    // Served on the jobs' runtime: this thread only drives the connection.
                    serving.spawn_on(serve_call(served, send, recv, guard).in_current_span(), &cx.jobs);
                }
                Err(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == close::DONE => {
                    released = true;
                    break ServeExit::Released;
                }
                Err(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == close::PARKED => {
                    // The parent parks only a runner that drained: no call is left, unless one
                    // whose reset the close overtook.
                    cx.released.cancel();
                    cx.resources.clear();
                    drop(drains);
                    let _ = writer.await;
                    return Session::Parked;
                }
                Err(e) => break ServeExit::ParentLost(e.to_string()),
            },
            stop = stops.next() => match stop {
                Stop::Drain(reason) => {
                    let _ = drains.send(reason);
                }
                Stop::Exit => break ServeExit::Released,
            },
        }
    };
    drop(drains);
    let _ = writer.await;
    match &exit {
        ServeExit::Released => tracing::info!("released by parent"),
        ServeExit::ParentLost(why) => tracing::warn!(reason = %why, "parent lost: draining"),
    }
    // Nobody can use them any more; calls still running keep theirs until they end.
    cx.resources.clear();
    if released {
        // The parent released the runner once its callers had their results: a job still
        // running is one whose caller gave up (its stream's reset can arrive after the close,
        // or never), and nobody can take its result. It is aborted, not drained. A blocking
        // job cannot be: it is left to end with the process.
        cx.released.cancel();
        serving.close();
        if tokio::time::timeout(ABORT_WAIT, serving.wait())
            .await
            .is_err()
        {
            tracing::warn!("jobs still run after their abort; exiting");
        }
    } else {
        terminator
            .drain_calls(matches!(exit, ServeExit::ParentLost(_)))
            .await;
    }
    connection.close(close::RUNNER_EXIT, b"runner exiting");
    // Give the close frame a moment to leave; the parent also sees the process exit.
    let _ = tokio::time::timeout(Duration::from_millis(100), endpoint.wait_idle()).await;
    Session::Ended(exit)
}

/// Waits, parked, until the runner is resumed and its parent admits it again: the new
/// connection, under a new terminator. `None` when the runner should exit instead.
async fn wait_parked(
    token: &BootToken,
    registry: &Registry,
    continued: &mut park::Continued,
    sigterm: &mut terminator::Sigterm,
) -> Option<(Terminator, dial::Connected)> {
    let mut deadline = terminator::after(token.settings.connect_failsafe);
    loop {
        // A backstop dial is one quick try; a resume gets the whole failsafe.
        let failsafe = match park::wait(deadline, sigterm, continued).await {
            park::Wake::Resumed => {
                deadline = terminator::after(token.settings.connect_failsafe);
                deadline
            }
            park::Wake::Backstop => terminator::after(park::UNNOTICED_RESUME_DIAL),
            park::Wake::NeverFrozen => {
                tracing::warn!("parked but never suspended: exiting");
                return None;
            }
            park::Wake::Terminated => {
                tracing::info!("SIGTERM while parked: exiting");
                return None;
            }
        };
        let terminator = Terminator::new(&token.settings);
        match dial::connect(token, registry, failsafe.min(terminator.connect_failsafe())).await {
            Ok(connected) => return Some((terminator, connected)),
            // Not claimed yet, or no longer: keep waiting, within the deadline.
            Err(e) => tracing::debug!(error = %e, "not admitted while parked"),
        }
    }
}

/// Writes the control stream: each drain notice from `drain_notices`, first, and the log lines
/// queued for the parent. Ends when the notices' sender is dropped or the stream fails, and
/// gives the log queue back for the next connection.
async fn write_control(
    mut control: quinn::SendStream,
    mut drain_notices: tokio::sync::mpsc::UnboundedReceiver<DrainReason>,
) {
    let mut lines = logs::take_receiver();
    // Call replies go before log lines when both wait to be sent.
    let _ = control.set_priority(-1);
    let pace = logs::pace();
    loop {
        let next_line = async {
            match &mut lines {
                Some(lines) => lines.recv().await,
                None => std::future::pending().await,
            }
        };
        let message = tokio::select! {
            biased;
            notice = drain_notices.recv() => match notice {
                Some(reason) => ControlMessage::Draining { reason },
                None => break,
            },
            Some(line) = next_line => {
                if pace.check().is_err() {
                    logs::count_dropped();
                    continue;
                }
                let count = logs::take_dropped();
                if count > 0 {
                    let dropped = ControlMessage::LogsDropped { count };
                    if wire::write_frame(&mut control, &dropped).await.is_err() {
                        break;
                    }
                }
                ControlMessage::Log(line)
            }
        };
        if let Err(e) = wire::write_frame(&mut control, &message).await {
            tracing::debug!(error = %e, "the control stream is closed");
            break;
        }
    }
    if let Some(lines) = lines {
        logs::give_back(lines);
    }
}
