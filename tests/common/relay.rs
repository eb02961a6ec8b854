//! A network between a pool and its runners, in user space: a loopback UDP relay that delays
//! each direction, drops datagrams at random, limits the rate, caps the datagram size (an MTU)
//! and cuts the link on demand. This kernel has no netem, and a relay needs no privilege.
//!
//! Runners dial the relay instead of the parent ([`Relayed`] wraps a backend to say so); the
//! relay opens one upstream socket per runner, so the parent sees each runner at its own
//! address, and a cut can take existing runners off the network while new ones get through.
//! It runs on a thread of its own, so that a busy test runtime does not add to the delay.
//! Shared by `tests/` and `benches/` (which include this file by path).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use firebrand::backend::{BootRequest, Machine, ParkedSet};
use firebrand::{Backend, BackendError};
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the emulated link does to every datagram, each direction alike.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Added to each datagram in each direction: the round trip is twice this.
    pub one_way_delay: Duration,
    /// The share of datagrams dropped at random, 0 to 1.
    pub loss: f64,
    /// Bytes a second each direction carries; `None` for no limit.
    pub rate: Option<u64>,
    /// The most a datagram may queue for the rate limit before it is dropped (a router's
    /// buffer, in time).
    pub queue: Duration,
    /// The largest UDP payload that gets through; bigger ones are dropped, as a link with a
    /// smaller MTU than the path's does. `None` for no limit.
    pub max_payload: Option<usize>,
    /// The seed of the loss draws, so that a run can be repeated.
    pub seed: u64,
}

impl Link {
    /// A link with this round-trip time and nothing else.
    pub fn rtt(rtt: Duration) -> Self {
        Self {
            one_way_delay: rtt / 2,
            loss: 0.0,
            rate: None,
            queue: Duration::from_millis(100),
            max_payload: None,
            seed: 1,
        }
    }

    /// The same link, dropping this share of datagrams.
    pub fn loss(mut self, loss: f64) -> Self {
        self.loss = loss;
        self
    }

    /// The same link, carrying at most `bytes_per_second` each way.
    pub fn rate(mut self, bytes_per_second: u64) -> Self {
        self.rate = Some(bytes_per_second);
        self
    }

    /// The same link, with an MTU of `mtu` bytes: UDP payloads above `mtu` less the IPv6 and
    /// UDP headers (48 bytes) are dropped.
    pub fn mtu(mut self, mtu: usize) -> Self {
        self.max_payload = Some(mtu - 48);
        self
    }
}

/// Counts of what the relay did.
#[derive(Debug, Default)]
pub struct Counts {
    pub forwarded: AtomicU64,
    pub lost: AtomicU64,
    pub cut: AtomicU64,
    pub too_big: AtomicU64,
    pub overflowed: AtomicU64,
}

struct Shared {
    link: Link,
    upstream: Mutex<Option<SocketAddr>>,
    /// Everything is dropped, both ways, while set.
    cut_all: AtomicBool,
    /// Per flow (by the runner's address): cut for good.
    cut_flows: Mutex<HashMap<SocketAddr, Arc<AtomicBool>>>,
    counts: Counts,
    stop: AtomicBool,
}

/// A running relay; it stops when dropped.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stopper: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay on the loopback address of the family `v6` names.
    pub fn start(link: Link, v6: bool) -> Relay {
        let shared = Arc::new(Shared {
            link,
            upstream: Mutex::new(None),
            cut_all: AtomicBool::new(false),
            cut_flows: Mutex::new(HashMap::new()),
            counts: Counts::default(),
            stop: AtomicBool::new(false),
        });
        let bind: SocketAddr = if v6 { "[::1]:0" } else { "127.0.0.1:0" }.parse().unwrap();
        let socket = std::net::UdpSocket::bind(bind).expect("bind the relay");
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let (stopper, stopped) = tokio::sync::oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(async move {
                        let socket = Arc::new(UdpSocket::from_std(socket).unwrap());
                        tokio::select! {
                            () = serve(socket, thread_shared) => {}
                            _ = stopped => {}
                        }
                    })
            })
            .unwrap();
        Relay {
            addr,
            shared,
            stopper: Some(stopper),
            thread: Some(thread),
        }
    }

    /// Where runners dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the relay forwards to: the parent's endpoint.
    pub fn set_upstream(&self, parent: SocketAddr) {
        *self.shared.upstream.lock() = Some(parent);
    }

    /// Drops everything, both ways, until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.shared.cut_all.store(true, Ordering::SeqCst);
    }

    /// Ends a [`cut`](Self::cut).
    pub fn heal(&self) {
        self.shared.cut_all.store(false, Ordering::SeqCst);
    }

    /// Cuts every runner connected now, for good; runners that dial later get through.
    pub fn cut_existing(&self) {
        for flag in self.shared.cut_flows.lock().values() {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// How many runners (source addresses) have used the relay.
    pub fn flows(&self) -> usize {
        self.shared.cut_flows.lock().len()
    }

    pub fn counts(&self) -> &Counts {
        &self.shared.counts
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(stopper) = self.stopper.take() {
            let _ = stopper.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One direction of the link: the rate limit's clock and the loss draws, then a task that
/// delivers each datagram when its time comes (in order: every datagram's time is later than
/// the one before it).
struct Pipe {
    shared: Arc<Shared>,
    rng: fastrand::Rng,
    /// When the rate limit lets the next datagram start.
    free_at: Instant,
    deliver: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
}

impl Pipe {
    fn new(shared: Arc<Shared>, seed: u64, socket: Arc<UdpSocket>, to: SocketAddr) -> Pipe {
        let (deliver, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        tokio::spawn(async move {
            while let Some((at, datagram)) = due.recv().await {
                // Tokio's timer fires on the first millisecond tick at or after its deadline:
                // aiming half a tick early makes the delay right on average, not 0.5 ms long.
                tokio::time::sleep_until(at - Duration::from_micros(500)).await;
                let _ = socket.send_to(&datagram, to).await;
            }
        });
        Pipe {
            rng: fastrand::Rng::with_seed(seed),
            free_at: Instant::now(),
            shared,
            deliver,
        }
    }

    /// Sends `datagram` down the link, unless the link drops it.
    fn send(&mut self, datagram: &[u8], flow_cut: &AtomicBool) {
        let link = self.shared.link;
        let counts = &self.shared.counts;
        if self.shared.cut_all.load(Ordering::Relaxed) || flow_cut.load(Ordering::Relaxed) {
            counts.cut.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if link.max_payload.is_some_and(|max| datagram.len() > max) {
            counts.too_big.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if link.loss > 0.0 && self.rng.f64() < link.loss {
            counts.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        let mut sent_at = now;
        if let Some(rate) = link.rate {
            let start = self.free_at.max(now);
            if start - now > link.queue {
                counts.overflowed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let serialise = Duration::from_secs_f64(datagram.len() as f64 / rate as f64);
            self.free_at = start + serialise;
            sent_at = self.free_at;
        }
        counts.forwarded.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .deliver
            .send((sent_at + link.one_way_delay, datagram.to_vec()));
    }
}

struct Flow {
    up: Pipe,
    cut: Arc<AtomicBool>,
}

/// Reads what runners send, opening a flow (an upstream socket and a task for the way back)
/// for each new runner address.
async fn serve(listen: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    let mut seed = shared.link.seed;
    loop {
        let Ok((len, from)) = listen.recv_from(&mut buf).await else {
            continue;
        };
        let Some(parent) = *shared.upstream.lock() else {
            continue;
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = flows.entry(from) {
            let bind: SocketAddr = if parent.is_ipv6() {
                "[::1]:0"
            } else {
                "127.0.0.1:0"
            }
            .parse()
            .unwrap();
            let Ok(upstream) = UdpSocket::bind(bind).await else {
                continue;
            };
            let upstream = Arc::new(upstream);
            let cut = Arc::new(AtomicBool::new(false));
            shared.cut_flows.lock().insert(from, Arc::clone(&cut));
            seed = seed.wrapping_add(2);
            let up = Pipe::new(Arc::clone(&shared), seed, Arc::clone(&upstream), parent);
            let mut down = Pipe::new(Arc::clone(&shared), seed + 1, Arc::clone(&listen), from);
            let down_cut = Arc::clone(&cut);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok(len) = upstream.recv(&mut buf).await {
                    down.send(&buf[..len], &down_cut);
                }
            });
            slot.insert(Flow { up, cut });
        }
        let flow = flows.get_mut(&from).expect("inserted above");
        let cut = Arc::clone(&flow.cut);
        flow.up.send(&buf[..len], &cut);
    }
}

/// A backend whose runners reach the parent through a [`Relay`]; everything else is `inner`'s.
pub struct Relayed<B> {
    pub inner: B,
    pub relay: Arc<Relay>,
}

impl<B: Backend> Relayed<B> {
    pub fn new(inner: B, relay: Arc<Relay>) -> Self {
        Self { inner, relay }
    }
}

impl<B: Backend> Backend for Relayed<B> {
    fn bind_addr(&self) -> SocketAddr {
        if self.relay.addr().is_ipv6() {
            "[::1]:0".parse().unwrap()
        } else {
            self.inner.bind_addr()
        }
    }

    fn parent_addrs(&self, bound: SocketAddr) -> Vec<String> {
        self.relay.set_upstream(bound);
        vec![self.relay.addr().to_string()]
    }

    fn start(&self) -> BoxFuture<'_, ()> {
        self.inner.start()
    }

    fn max_runners(&self) -> Option<usize> {
        self.inner.max_runners()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.inner.shutdown()
    }

    fn boot(&self, request: BootRequest) -> BoxFuture<'_, Result<Box<dyn Machine>, BackendError>> {
        self.inner.boot(request)
    }

    fn brings_output(&self) -> bool {
        self.inner.brings_output()
    }

    fn parked_set(&self) -> Option<Arc<dyn ParkedSet>> {
        self.inner.parked_set()
    }
}
