//! QUIC endpoints and transport settings, set on purpose rather than left at quinn's defaults.
//!
//! Public so that tools and benchmarks can build a raw QUIC peer with exactly the settings a
//! pool and its runners use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};

/// Streams a parent may open beyond a runner's concurrency: slack for calls whose slot has been
/// released on the parent while the runner has not yet seen the stream fully closed.
const STREAM_SLACK: u32 = 16;
// Large enough to keep a loopback or datacenter link busy with one stream; these are limits on
// buffering, not allocations.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;

/// The transport both ends of a runner connection use.
///
/// `incoming_bidi` is how many streams the *peer* may open at once: the runner's concurrency plus
/// slack on the runner, and one control stream (plus slack) on the parent.
pub fn transport_config(
    peer_timeout: Duration,
    keep_alive: Duration,
    incoming_bidi: u32,
) -> Arc<TransportConfig> {
    let mut config = TransportConfig::default();
    config
        .max_idle_timeout(IdleTimeout::try_from(peer_timeout).ok())
        .keep_alive_interval(Some(keep_alive))
        .max_concurrent_bidi_streams(VarInt::from_u32(incoming_bidi.saturating_add(STREAM_SLACK)))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW));
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
    let mut endpoint = quinn::Endpoint::client(bind)?;
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
    quinn::Endpoint::server(config, bind)
}
