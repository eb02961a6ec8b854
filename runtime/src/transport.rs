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

/// The transport both ends of a runner connection use.
///
/// `incoming_bidi` is how many calls the *peer* may run at once: the runner's concurrency on the
/// runner, and one control stream on the parent. The peer may open
/// [`STREAMS_PER_SLOT`] times that, plus slack.
pub fn transport_config(
    peer_timeout: Duration,
    keep_alive: Duration,
    incoming_bidi: u32,
) -> Arc<TransportConfig> {
    let mut config = TransportConfig::default();
    config
        .max_idle_timeout(IdleTimeout::try_from(idle_timeout(peer_timeout, keep_alive)).ok())
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

/// The QUIC idle timeout that makes a silent peer lost within `peer_timeout` of its last packet.
///
/// QUIC restarts the idle timer when an endpoint sends its first ack-eliciting packet after
/// receiving one (RFC 9000, 10.1), and the keep-alive sent up to `keep_alive` after the peer's
/// last packet is such a packet: with an idle timeout of `peer_timeout`, a dead peer was noticed
/// up to `peer_timeout + keep_alive` after it fell silent (measured: 6 s for 5 s). Less one
/// keep-alive, it is noticed between `peer_timeout - keep_alive` and `peer_timeout`. The pool
/// keeps `keep_alive` at most a third of `peer_timeout`, so that two keep-alives fit in it.
pub fn idle_timeout(peer_timeout: Duration, keep_alive: Duration) -> Duration {
    peer_timeout.saturating_sub(keep_alive).max(keep_alive)
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
