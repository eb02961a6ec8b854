//! What the benchmarks share: the baseline echo peers (raw QUIC with mTLS, and TCP), pools of
//! stock runners, per-call latency recording, RSS sampling, and result files for
//! `benches/summary.py`.
#![allow(dead_code)]

pub mod grpc;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use firebrand::internals::tls::{self, PoolCa, PARENT_SERVER_NAME};
use firebrand::internals::token::{BootToken, RunnerSettings};
use firebrand::internals::transport;
use firebrand::{LocalBackend, Pool};
use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;

/// The stock runner, built by `cargo bench`.
pub const RUNNER: &str = env!("CARGO_BIN_EXE_firebrand-runner");

const PEER_ENV: &str = "FIREBRAND_BENCH_PEER";
const PEER_ARG_ENV: &str = "FIREBRAND_BENCH_PEER_ARG";

/// The transport both Firebrand and baseline A use.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
pub const CONCURRENCY: u32 = 256;

/// The congestion controller of every connection in the benches, Firebrand's and baseline A's
/// alike: the default (BBR), or `FIREBRAND_BENCH_CONGESTION=cubic` (or `newreno`), to compare
/// them in the same bench.
pub fn congestion() -> firebrand::CongestionControl {
    match std::env::var("FIREBRAND_BENCH_CONGESTION").as_deref() {
        Ok("cubic") => firebrand::CongestionControl::Cubic,
        Ok("newreno") => firebrand::CongestionControl::NewReno,
        Ok("bbr") | Err(_) => firebrand::CongestionControl::Bbr,
        Ok(other) => panic!("FIREBRAND_BENCH_CONGESTION={other}: bbr, cubic or newreno"),
    }
}

/// If this process was started as a baseline peer, serves as one and exits.
pub fn run_peer_if_asked() {
    let Ok(kind) = std::env::var(PEER_ENV) else {
        return;
    };
    let arg = std::env::var(PEER_ARG_ENV).expect("peer argument");
    match kind.as_str() {
        "quic" => tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(quic_peer(BootToken::decode(&arg).unwrap())),
        "tcp" => tcp_peer(&arg),
        "grpc" => tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(grpc::serve(arg.parse().unwrap())),
        other => panic!("unknown peer kind {other}"),
    }
    std::process::exit(0);
}

fn spawn_peer(kind: &str, arg: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .env(PEER_ENV, kind)
        .env(PEER_ARG_ENV, arg)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn a baseline peer")
}

/// Kills the peer process when the baseline is dropped.
struct Peer(std::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A raw parent endpoint with Firebrand's settings, and a boot token for one peer to dial it.
fn test_parent() -> (quinn::Endpoint, BootToken) {
    let ca = PoolCa::generate("bench").unwrap();
    let server = ca.issue_server().unwrap();
    let endpoint = transport::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        tls::server_crypto(ca.cert(), &server).unwrap(),
        transport::transport_config(PEER_TIMEOUT, KEEP_ALIVE, 1, congestion()),
    )
    .unwrap();
    let id = uuid::Uuid::new_v4();
    let token = BootToken::new(
        vec![endpoint.local_addr().unwrap().to_string()],
        PARENT_SERVER_NAME.into(),
        ca.cert(),
        &ca.issue_runner(id, Duration::from_secs(3600)).unwrap(),
        id,
        RunnerSettings {
            max_concurrency: CONCURRENCY,
            idle_shutdown_after: None,
            connect_failsafe: Duration::from_secs(20),
            drain_grace: Duration::from_secs(1),
            max_payload_len: 1 << 30,
            peer_timeout: PEER_TIMEOUT,
            keep_alive: KEEP_ALIVE,
            congestion: Default::default(),
            // The raw parent reads no control stream.
            log_filter: "off".into(),
            forward_output: false,
        },
    );
    (endpoint, token)
}

/// Baseline A: a raw quinn + rustls mTLS echo in another process, dialled in the same direction
/// as a runner dials its parent, with the same transport settings, one stream per request.
pub struct QuicEcho {
    connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
    _peer: Peer,
}

impl QuicEcho {
    pub async fn start() -> Self {
        let (endpoint, token) = test_parent();
        let peer = Peer(spawn_peer("quic", &token.encode()));
        let connection = endpoint.accept().await.unwrap().await.unwrap();
        Self {
            connection,
            _endpoint: endpoint,
            _peer: peer,
        }
    }

    /// The peer process's pid.
    pub fn pid(&self) -> u32 {
        self._peer.0.id()
    }

    pub async fn echo(&self, payload: &[u8]) -> Vec<u8> {
        let (mut send, mut recv) = self.connection.open_bi().await.unwrap();
        send.write_all(payload).await.unwrap();
        send.finish().unwrap();
        recv.read_to_end(1 << 30).await.unwrap()
    }
}

async fn quic_peer(token: BootToken) {
    let ca = CertificateDer::from(token.ca_cert.clone());
    let crypto = Arc::new(tls::client_crypto(&ca, &token.runner_identity()).unwrap());
    let target = token.parent_addrs[0].parse().unwrap();
    let endpoint = transport::client_endpoint(
        target,
        crypto,
        transport::transport_config(PEER_TIMEOUT, KEEP_ALIVE, CONCURRENCY, congestion()),
    )
    .unwrap();
    let connection = endpoint
        .connect(target, &token.server_name)
        .unwrap()
        .await
        .unwrap();
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        tokio::spawn(async move {
            let Ok(data) = recv.read_to_end(1 << 30).await else {
                return;
            };
            if send.write_all(&data).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}

/// Baseline C: tonic gRPC unary echo, plaintext, to a peer process (see [`grpc`]).
pub struct GrpcEcho {
    pub client: grpc::GrpcClient,
    _peer: Peer,
}

impl GrpcEcho {
    pub async fn start() -> Self {
        // A free port for the peer to bind: taken here and let go at once.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let peer = Peer(spawn_peer("grpc", &addr.to_string()));
        Self {
            client: grpc::GrpcClient::connect(addr).await,
            _peer: peer,
        }
    }

    /// The peer process's pid.
    pub fn pid(&self) -> u32 {
        self._peer.0.id()
    }
}

/// Baseline B: a TCP ping-pong with `TCP_NODELAY`, to a peer process.
pub struct TcpEcho {
    stream: std::net::TcpStream,
    _peer: Peer,
}

impl TcpEcho {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = Peer(spawn_peer(
            "tcp",
            &listener.local_addr().unwrap().to_string(),
        ));
        let (stream, _) = listener.accept().unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            _peer: peer,
        }
    }

    pub fn echo(&mut self, payload: &[u8], reply: &mut [u8]) {
        self.stream.write_all(payload).unwrap();
        self.stream.read_exact(reply).unwrap();
    }
}

fn tcp_peer(addr: &str) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut buf = [0u8; 64];
    while stream.read_exact(&mut buf).is_ok() {
        if stream.write_all(&buf).is_err() {
            break;
        }
    }
}

/// A pool of `runners` warm stock runners.
pub async fn warm_pool(runners: usize) -> Pool {
    Pool::builder()
        .registry(&firebrand_runner::registry())
        .backend(LocalBackend::builder().command(RUNNER).build())
        .min(runners)
        .max(runners)
        .max_concurrency(CONCURRENCY)
        .min_idle_shutdown_after(None)
        .peer_timeout(PEER_TIMEOUT)
        .keep_alive(KEEP_ALIVE)
        .congestion_control(congestion())
        .max_payload_len(1 << 30)
        .build()
        .await
        .expect("a pool of stock runners")
}

/// Per-call latencies, recorded inside criterion's own iterations.
#[derive(Default, Clone)]
pub struct Latencies(Arc<Mutex<BTreeMap<String, Vec<u64>>>>);

impl Latencies {
    pub fn record(&self, name: &str, nanos: Vec<u64>) {
        self.0.lock().entry(name.into()).or_default().extend(nanos);
    }

    /// `{name: {p50_us, p99_us, samples}}`.
    pub fn summary(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (name, samples) in self.0.lock().iter_mut() {
            samples.sort_unstable();
            let at =
                |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
            out.insert(
                name.clone(),
                serde_json::json!({ "p50_us": at(0.50), "p99_us": at(0.99), "samples": samples.len() }),
            );
        }
        serde_json::Value::Object(out)
    }
}

/// The resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// Samples RSS every millisecond until dropped; `peak()` is the highest seen.
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start() -> Self {
        let peak = Arc::new(AtomicU64::new(rss_bytes()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        Self {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    pub fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed).max(rss_bytes())
    }
}

/// `target/firebrand-bench/`, beside criterion's own output.
pub fn results_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<bench> -> target/
    let target = exe.ancestors().nth(3).unwrap().to_path_buf();
    let dir = target.join("firebrand-bench");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn write_results(name: &str, value: &serde_json::Value) {
    let path = results_dir().join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(value).unwrap()).unwrap();
    println!("wrote {}", path.display());
}

/// Times `calls` calls of `call`, `in_flight` at a time.
pub async fn run_in_flight<F, Fut>(calls: u64, in_flight: usize, call: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures_util::StreamExt as _;
    let started = Instant::now();
    futures_util::stream::iter(0..calls)
        .map(|_| call())
        .buffer_unordered(in_flight)
        .for_each(|()| async {})
        .await;
    started.elapsed()
}

/// Diagnostic: a raw QUIC parent that speaks the wire protocol to a real stock runner, with
/// the request encoded once. Splits the cost of a call between the pool and the runner.
pub struct RawParent {
    connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
    _runner: tokio::process::Child,
    _control: (quinn::SendStream, quinn::RecvStream),
}

impl RawParent {
    pub async fn start() -> Self {
        use firebrand::internals::wire::{self, Hello, HelloReply};
        let (endpoint, token) = test_parent();
        let runner = tokio::process::Command::new(RUNNER)
            .env(firebrand::internals::token::PARENT_ENV, token.encode())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let connection = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = connection.accept_bi().await.unwrap();
        let mut version = [0; 2];
        recv.read_exact(&mut version).await.unwrap();
        let _: Hello = wire::read_head(&mut recv).await.unwrap();
        let reply = HelloReply::Accepted {
            idle_override: None,
        };
        wire::write_frame(&mut send, &reply).await.unwrap();
        Self {
            connection,
            _endpoint: endpoint,
            _runner: runner,
            _control: (send, recv),
        }
    }

    pub async fn call(&self, request: &[u8]) -> Vec<u8> {
        let (mut send, mut recv) = self.connection.open_bi().await.unwrap();
        send.write_all(request).await.unwrap();
        send.finish().unwrap();
        recv.read_to_end(1 << 30).await.unwrap()
    }
}

/// How many times the threads of process `pid` have blocked so far (voluntary context
/// switches, from /proc): each is a sleep that a later wake-up ends.
pub fn blocks_of(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .sum()
}

/// CPU time (user + system) of this process so far.
pub fn own_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU time (user + system) of the processes named `name`, from /proc.
pub fn cpu_of(name: &str) -> Duration {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.ends_with(&format!("({name}")) {
            continue;
        }
        if entry.file_name().to_string_lossy() == std::process::id().to_string() {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
        total += fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    }
    Duration::from_nanos(total * 1_000_000_000 / ticks)
}

/// CPU time of this process's main thread, which polls the benchmark's calls.
pub fn main_thread_cpu() -> Duration {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let pid = std::process::id();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let total = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_nanos(total * 1_000_000_000 / ticks)
}
