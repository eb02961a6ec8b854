//! Helpers shared by the integration tests. Every test uses real `firebrand-runner` processes.
#![allow(dead_code)]

pub mod cluster;
pub mod fly;
pub mod k8s;
pub mod relay;

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use firebrand::backend::{BootRequest, Exit, Machine};
use firebrand::internals::token::{BootToken, PARENT_ENV};
use firebrand::{Backend, BackendError, LocalBackend, Pool, PoolBuilder};
use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use parking_lot::Mutex;

/// The stock runner binary that Cargo built for these tests.
pub const RUNNER: &str = env!("CARGO_BIN_EXE_firebrand-runner");

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub fn local_backend() -> LocalBackend {
    LocalBackend::builder().command(RUNNER).build()
}

/// A pool of stock runners, with short timeouts suited to tests.
pub fn pool() -> PoolBuilder {
    init_tracing();
    Pool::builder()
        .registry(&firebrand_runner::registry())
        .backend(local_backend())
        .boot_timeout(Duration::from_secs(20))
        .queue_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(20))
}

/// The boot error a call failed with, as text; panics on any other error.
pub fn boot_failure(error: &firebrand::CallError) -> String {
    match error {
        firebrand::CallError::BootFailed(boot) => boot.to_string(),
        other => panic!("expected a boot failure, got {other:?}"),
    }
}

/// Boots one runner machine on `backend` with a token no parent admits, and forgets the
/// machine without terminating it: what a parent that died leaves behind.
pub async fn leave_behind(backend: &impl Backend) {
    let request = BootRequest::new(
        firebrand::RunnerId(uuid::Uuid::new_v4()),
        vec![(PARENT_ENV.to_owned(), "fb1.stale".to_owned())],
    );
    std::mem::forget(backend.boot(request).await.unwrap());
}

/// Fails the test if `future` takes longer than `limit`.
pub async fn within<T>(limit: Duration, future: impl IntoFuture<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

/// Starts `n` calls of the stock sleep job, each on its own task.
pub fn spawn_sleeps(
    pool: &Pool,
    n: usize,
    ms: u64,
) -> Vec<tokio::task::JoinHandle<Result<(), firebrand::CallError>>> {
    (0..n)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.call(&firebrand_runner::SLEEP, ms).await })
        })
        .collect()
}

/// Runs `n` calls of the stock sleep job at once and waits for all of them to succeed.
pub async fn concurrent_sleeps(pool: &Pool, n: usize, ms: u64) {
    let calls = spawn_sleeps(pool, n, ms);
    for call in calls {
        within(Duration::from_secs(30), call)
            .await
            .unwrap()
            .unwrap();
    }
}

/// Whether a process is running (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => !matches!(
            stat.rsplit(')')
                .next()
                .and_then(|s| s.trim().chars().next()),
            Some('Z') | Some('X') | None
        ),
        Err(_) => false,
    }
}

/// The parent of `pid`, from `/proc`.
pub fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the parenthesised command name: state, then ppid.
    let after = stat.rsplit_once(')').unwrap().1;
    after.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends SIGKILL to `pid`.
pub fn sigkill(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill {pid}");
}

/// Polls for a process to end; no event reports the end of a process that is not our child.
pub async fn wait_dead(pid: u32, limit: Duration) -> Duration {
    let started = std::time::Instant::now();
    while alive(pid) {
        assert!(
            started.elapsed() < limit,
            "process {pid} still alive after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// What a [`Recording`] backend saw.
#[derive(Default)]
pub struct Seen {
    pub tokens: Vec<String>,
    pub machines: Vec<String>,
}

/// Wraps a backend and records each boot's token and machine. With `spawn` off it starts
/// nothing, and its machines never exit by themselves: a runner that never dials back.
#[derive(Clone)]
pub struct Recording {
    inner: LocalBackend,
    spawn: bool,
    pub seen: Arc<Mutex<Seen>>,
}

impl Recording {
    pub fn new(inner: LocalBackend) -> Self {
        Self {
            inner,
            spawn: true,
            seen: Arc::default(),
        }
    }

    pub fn silent() -> Self {
        Self {
            spawn: false,
            ..Self::new(local_backend())
        }
    }

    pub fn boots(&self) -> usize {
        self.seen.lock().tokens.len()
    }

    pub fn token(&self, i: usize) -> BootToken {
        BootToken::decode(&self.seen.lock().tokens[i]).unwrap()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.seen
            .lock()
            .machines
            .iter()
            // "pid 123", or "pid 123 (forked)".
            .filter_map(|m| m.strip_prefix("pid ")?.split(' ').next()?.parse().ok())
            .collect()
    }
}

impl Backend for Recording {
    fn bind_addr(&self) -> std::net::SocketAddr {
        self.inner.bind_addr()
    }

    fn parent_addrs(&self, bound: std::net::SocketAddr) -> Vec<String> {
        self.inner.parent_addrs(bound)
    }

    fn brings_output(&self) -> bool {
        self.inner.brings_output()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.inner.shutdown()
    }

    fn boot(&self, request: BootRequest) -> BoxFuture<'_, Result<Box<dyn Machine>, BackendError>> {
        let token = request
            .env
            .iter()
            .find(|(k, _)| k == PARENT_ENV)
            .map(|(_, v)| v.clone())
            .expect("the pool always sends a token");
        self.seen.lock().tokens.push(token);
        if !self.spawn {
            return async { Ok(Box::new(NeverDials) as Box<dyn Machine>) }.boxed();
        }
        async move {
            let machine = self.inner.boot(request).await?;
            self.seen.lock().machines.push(machine.describe());
            Ok(machine)
        }
        .boxed()
    }
}

/// A machine whose runner never starts.
struct NeverDials;

impl Machine for NeverDials {
    fn describe(&self) -> String {
        "never-dials".into()
    }

    fn exited(&mut self) -> BoxFuture<'_, Exit> {
        std::future::pending().boxed()
    }

    fn terminate(
        self: Box<Self>,
        _grace: Duration,
    ) -> BoxFuture<'static, Result<(), BackendError>> {
        async { Ok(()) }.boxed()
    }
}

/// Runs the stock runner with `token`, capturing its output.
pub fn spawn_runner(token: &str) -> tokio::process::Child {
    tokio::process::Command::new(RUNNER)
        .env(PARENT_ENV, token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn firebrand-runner")
}

/// Runner settings for tests that play the parent themselves.
pub fn raw_settings() -> firebrand::internals::token::RunnerSettings {
    firebrand::internals::token::RunnerSettings {
        max_concurrency: 4,
        idle_shutdown_after: None,
        connect_failsafe: Duration::from_secs(20),
        drain_grace: Duration::from_secs(5),
        max_payload_len: 1 << 20,
        peer_timeout: Duration::from_secs(10),
        keep_alive: Duration::from_secs(1),
        congestion: Default::default(),
        log_filter: "off".into(),
        forward_output: false,
    }
}

/// A test playing the parent over raw QUIC, so that it can send what no pool would and vanish
/// the way no pool does.
pub struct RawParent {
    pub endpoint: quinn::Endpoint,
    ca: firebrand::internals::tls::PoolCa,
}

impl RawParent {
    /// Listens on loopback. Call within a Tokio runtime.
    pub fn new() -> Self {
        let ca = firebrand::internals::tls::PoolCa::generate("raw-parent").unwrap();
        let server = ca.issue_server().unwrap();
        let crypto = firebrand::internals::tls::server_crypto(ca.cert(), &server).unwrap();
        let endpoint = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        Self { endpoint, ca }
    }

    /// A token for a new runner with `settings`.
    pub fn token(&self, settings: firebrand::internals::token::RunnerSettings) -> BootToken {
        let id = uuid::Uuid::new_v4();
        BootToken::new(
            vec![self.endpoint.local_addr().unwrap().to_string()],
            firebrand::internals::tls::PARENT_SERVER_NAME.into(),
            self.ca.cert(),
            &self.ca.issue_runner(id, Duration::from_secs(600)).unwrap(),
            id,
            settings,
        )
    }

    /// Accepts the next runner and its hello, and admits it.
    pub async fn admit(&self) -> (quinn::Connection, quinn::SendStream) {
        let (connection, send, _) = self.admit_with_control().await;
        (connection, send)
    }

    /// [`admit`](Self::admit), keeping the runner's side of the control stream too, on which it
    /// announces that it drains.
    pub async fn admit_with_control(
        &self,
    ) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
        use firebrand::internals::wire::{self, Hello, HelloReply};
        let connection = within(Duration::from_secs(20), async {
            self.endpoint.accept().await.unwrap().await.unwrap()
        })
        .await;
        let (mut send, mut recv) = connection.accept_bi().await.unwrap();
        let mut version = [0; 2];
        recv.read_exact(&mut version).await.unwrap();
        let _: Hello = wire::read_head(&mut recv).await.unwrap();
        let reply = HelloReply::Accepted {
            idle_override: None,
        };
        wire::write_frame(&mut send, &reply).await.unwrap();
        (connection, send, recv)
    }
}

/// Opens a call stream and sends a request for `job` with `args`; returns its two halves.
/// The send half's `stopped()` resolves once the runner has read the whole request.
pub async fn raw_request<A: serde::Serialize>(
    connection: &quinn::Connection,
    job: &str,
    timeout_ms: u64,
    args: &A,
) -> (quinn::SendStream, quinn::RecvStream) {
    use firebrand::internals::wire::{self, CallHead};
    let (mut send, recv) = connection.open_bi().await.unwrap();
    let mut request = wire::Chunks::new();
    request
        .push_frame(&CallHead {
            job: job.into(),
            timeout_ms,
            trace_id: 0,
            resource: 0,
        })
        .unwrap();
    request.push_frame(args).unwrap();
    send.write_all(&request.into_bytes().concat())
        .await
        .unwrap();
    send.finish().unwrap();
    (send, recv)
}

/// Waits for the next event that `wanted` accepts, for at most 20 s, and returns it.
pub async fn next_matching(
    events: &mut futures_util::stream::BoxStream<'static, firebrand::PoolEvent>,
    wanted: impl Fn(&firebrand::PoolEvent) -> bool,
) -> firebrand::PoolEvent {
    use futures_util::StreamExt as _;
    within(Duration::from_secs(20), async {
        loop {
            let event = events.next().await.expect("the pool is open");
            if wanted(&event) {
                return event;
            }
        }
    })
    .await
}

/// Kills the runner of a `min 1, max 1` pool on `backend` mid-call, and checks that the caller
/// gets `RunnerLost` with the signal well before the QUIC idle timeout, and that the `min`
/// runner is replaced.
pub async fn killed_runner_is_lost_at_once_and_replaced(backend: impl Backend) {
    const SECOND: Duration = Duration::from_secs(1);
    let pool = pool()
        .backend(backend)
        .min(1)
        .max(1)
        .peer_timeout(Duration::from_secs(30))
        .keep_alive(Duration::from_secs(10))
        .build()
        .await
        .unwrap();
    let pid = pool.call(&firebrand_runner::PID, ()).await.unwrap();
    let call = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.call(&firebrand_runner::SLEEP, 60_000)
                .timeout(None)
                .await
        }
    });
    let mut counts = pool.watch_runners();
    // Wait until the call is on the runner before killing it.
    while pool.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    let killed = std::time::Instant::now();
    sigkill(pid);
    // Well under the 30 s QUIC idle timeout set above: the backend saw the process exit.
    match within(2 * SECOND, call).await.unwrap() {
        Err(firebrand::CallError::RunnerLost { reason, .. }) => {
            assert!(reason.contains("signal 9"), "{reason}")
        }
        other => panic!("expected RunnerLost, got {other:?}"),
    }
    assert!(killed.elapsed() < 2 * SECOND);
    // The min runner is replaced.
    within(
        20 * SECOND,
        counts.wait_for(|c| c.ready == 1 && c.booting == 0),
    )
    .await
    .unwrap();
    let replacement = pool.call(&firebrand_runner::PID, ()).await.unwrap();
    assert_ne!(replacement, pid);
    pool.shutdown().await;
}

/// Checks that runners from `backend` (4 GPUs, 2 per runner) get disjoint GPUs, that `max` is
/// capped to fit, and that single-use runners give their GPUs back for the next ones.
pub async fn runners_get_gpus_of_their_own(backend: firebrand::backend::LocalBackendBuilder) {
    use firebrand_runner::ENV;
    let backend = backend
        .gpus(["0", "1", "2", "3"])
        .gpus_per_runner(2)
        .build();
    let pool = pool()
        .backend(backend)
        .max(8)
        .max_concurrency(1)
        .single_use(true)
        .build()
        .await
        .unwrap();
    assert_eq!(pool.limits().max, 2, "4 GPUs, 2 per runner");
    let visible = || pool.call(&ENV, "CUDA_VISIBLE_DEVICES".to_string());
    // Two runners at once: disjoint GPUs.
    let (a, b) = tokio::join!(visible(), visible());
    let mut pair = [a.unwrap().unwrap(), b.unwrap().unwrap()];
    pair.sort();
    assert_eq!(pair, ["0,1".to_string(), "2,3".to_string()]);
    // Single-use runners end after each call: their GPUs come back for the next runners.
    let more = futures_util::future::join_all((0..6).map(|_| visible())).await;
    for gpus in more {
        let gpus = gpus.unwrap().unwrap();
        assert!(gpus == "0,1" || gpus == "2,3", "{gpus}");
    }
    pool.shutdown().await;
}

/// Every log line written on this thread while its guard lives, and a signal on each write.
#[derive(Clone, Default)]
pub struct CapturedLogs {
    text: Arc<Mutex<String>>,
    written: Arc<tokio::sync::Notify>,
}

impl CapturedLogs {
    /// Captures INFO and above, without colours, on this thread until the guard drops.
    pub fn install() -> (Self, tracing::subscriber::DefaultGuard) {
        Self::install_at(tracing::Level::INFO)
    }

    /// [`install`](Self::install) at `level` and above.
    pub fn install_at(level: tracing::Level) -> (Self, tracing::subscriber::DefaultGuard) {
        let captured = Self::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        self.text.lock().clone()
    }

    /// Waits up to 10 s for a line that `matches` accepts, and returns it.
    pub async fn line(&self, matches: impl Fn(&str) -> bool) -> String {
        within(Duration::from_secs(10), async {
            loop {
                let written = self.written.notified();
                let found = self
                    .text
                    .lock()
                    .lines()
                    .find(|l| matches(l))
                    .map(str::to_owned);
                if let Some(line) = found {
                    return line;
                }
                written.await;
            }
        })
        .await
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.lock().push_str(&String::from_utf8_lossy(buf));
        self.written.notify_waiters();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The message of the error a pool with one `min` runner of `backend` fails to start with.
pub async fn min_boot_error(backend: LocalBackend) -> String {
    pool()
        .backend(backend)
        .min(1)
        .boot_attempts(1)
        .build()
        .await
        .expect_err("the min runner cannot boot")
        .to_string()
}

/// One entry of a `metrics_util` debugging recorder's snapshot.
pub type MetricEntry = (
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    metrics_util::debugging::DebugValue,
);

/// Counter `name`, summed over every series that carries all of `labels`.
pub fn counter(snapshot: &[MetricEntry], name: &str, labels: &[(&str, &str)]) -> u64 {
    snapshot
        .iter()
        .filter(|(key, ..)| {
            let key = key.key();
            key.name() == name
                && labels
                    .iter()
                    .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
        })
        .map(|(_, _, _, value)| match value {
            metrics_util::debugging::DebugValue::Counter(n) => *n,
            _ => 0,
        })
        .sum()
}
