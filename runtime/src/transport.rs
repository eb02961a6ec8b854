//! QUIC endpoints and transport settings, set on purpose rather than left at quinn's defaults.
//!
//! Public so that tools and benchmarks can build a raw QUIC peer with exactly the settings a
//! pool and its runners use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};

/// Stream credit per call slot. A call's stream keeps its credit for about two round trips while
/// the call itself takes one: the runner frees the stream once the parent has acknowledged the
/// reply (one round trip after the call arrived, plus the peer's ack delay), and the credit it
/// hands back takes half a round trip to arrive. With one credit per slot, the parent could keep
/// only about half the slots busy at 50 ms (measured: 0.60 of `max_concurrency / RTT`); with
/// three, every slot stays busy at any RTT. The runner enforces `max_concurrency` itself (its
/// calls wait for a slot), so the credit bounds only stream state, not work.
const STREAMS_PER_SLOT: u32 = 3;
/// Streams beyond that: the parent's control stream and the odd late close.
const STREAM_SLACK: u32 = 16;
// Large enough to keep a loopback or datacenter link busy with one stream; these are limits on
// buffering, not allocations.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
/// UDP socket buffers. The kernel's default (about 208 KiB) overflows during a large transfer,
/// and every dropped datagram shrinks the congestion window. The kernel caps the request at
/// `net.core.rmem_max` / `wmem_max`.
const SOCKET_BUFFER: usize = 4 << 20;
/// The largest UDP payload path-MTU discovery may try. Fly's private network is WireGuard,
/// which costs 60 bytes a packet; 1350 fits it and most other tunnels with room to spare.
pub const MAX_UDP_PAYLOAD: u16 = 1350;

/// How a connection paces what it sends: the congestion controller both ends of a runner
/// connection use, chosen with
/// [`PoolBuilder::congestion_control`](crate::PoolBuilder::congestion_control).
///
/// Loss-based controllers (CUBIC, NewReno) read every lost packet as congestion and halve
/// their window: on a link that drops packets at random (Wi-Fi, a lossy long-haul path, an
/// overloaded tunnel) a large argument or result crawls. BBR models the path's bandwidth and
/// round trip instead, and keeps sending at that rate through random loss. Pick CUBIC where
/// runner traffic shares a congested link with other flows and fairness to them matters more
/// than speed through loss. Measured across the test relay at 50 ms and 1 % loss, and on
/// loopback, in `BENCHMARKS.md` (`cargo bench --bench network`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum CongestionControl {
    /// BBR, the default: across 50 ms and 1 % random loss a 16 MiB echo took 2.1 s against
    /// 103-108 s with CUBIC, and on loopback it moved as much (279 against 272 MB/s).
    /// Quinn calls its BBR experimental; it shares a congested bottleneck less politely than
    /// CUBIC does with loss-based flows.
    #[default]
    Bbr,
    /// CUBIC (RFC 9438), quinn's default and Linux TCP's: the fairest to other flows on a
    /// congested shared link, but each random loss halves its window.
    Cubic,
    /// NewReno (RFC 9002's reference controller): as slow through loss as CUBIC.
    NewReno,
}

impl CongestionControl {
    fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
        match self {
            CongestionControl::Cubic => Arc::new(CubicConfig::default()),
            CongestionControl::NewReno => Arc::new(NewRenoConfig::default()),
            CongestionControl::Bbr => Arc::new(BbrConfig::default()),
        }
    }
}

/// The transport both ends of a runner connection use.
///
/// `incoming_bidi` is how many calls the *peer* may run at once: the runner's concurrency on the
/// runner, and one control stream on the parent. The peer may open
/// three times that (`STREAMS_PER_SLOT`), plus slack.
pub fn transport_config(
    peer_timeout: Duration,
    keep_alive: Duration,
    incoming_bidi: u32,
    congestion: CongestionControl,
) -> Arc<TransportConfig> {
    let mut config = TransportConfig::default();
    config
        .congestion_controller_factory(congestion.factory())
        // QUIC restarts the idle timer when an endpoint sends its first ack-eliciting packet after
        // receiving one (RFC 9000, 10.1): a keep-alive sent after the peer's last packet does,
        // so a silent peer is noticed between `peer_timeout` and `peer_timeout + keep_alive`
        // after its last packet. Not shortened to make that exact: at 50 ms RTT, the probes
        // of a connection in a 3 s cut back off to gaps that a 4 s idle timeout does not ride
        // out. The runner's drain on parent loss allows for the keep-alive instead.
        .max_idle_timeout(IdleTimeout::try_from(peer_timeout).ok())
        .keep_alive_interval(Some(keep_alive))
        .max_concurrent_bidi_streams(VarInt::from_u32(
            incoming_bidi
                .saturating_mul(STREAMS_PER_SLOT)
                .saturating_add(STREAM_SLACK),
        ))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .mtu_discovery_config(Some({
            let mut mtu = quinn::MtuDiscoveryConfig::default();
            mtu.upper_bound(MAX_UDP_PAYLOAD);
            mtu
        }));
    Arc::new(config)
}

/// The runner's client endpoint, bound to the wildcard address of `target`'s family.
///
/// # Errors
/// The OS error if the UDP socket cannot be bound.
pub fn client_endpoint(
    target: SocketAddr,
    crypto: Arc<quinn::crypto::rustls::QuicClientConfig>,
    transport: Arc<TransportConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if target.is_ipv6() {
        "[::]:0".parse().expect("valid address")
    } else {
        "0.0.0.0:0".parse().expect("valid address")
    };
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        udp_socket(bind)?,
        Arc::new(quinn::TokioRuntime),
    )?;
    let mut config = quinn::ClientConfig::new(crypto);
    config.transport_config(transport);
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// The parent's server endpoint.
///
/// # Errors
/// The OS error if the UDP socket cannot be bound.
pub fn server_endpoint(
    bind: SocketAddr,
    crypto: quinn::crypto::rustls::QuicServerConfig,
    transport: Arc<TransportConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport);
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        udp_socket(bind)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// A UDP socket bound to `addr`, with large buffers. A wildcard IPv6 socket also takes IPv4.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Best effort: some systems do not allow dual-stack sockets.
        let _ = socket.set_only_v6(false);
    }
    // Best effort too: a smaller buffer is slower, not wrong.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
