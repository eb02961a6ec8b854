//! Dialling the parent: the runner tries each of the token's addresses in turn, with backoff,
//! until one accepts it, refuses it, or the terminator's connect failsafe passes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::terminator::after;
use super::ServeError;
use crate::backoff::Backoff;
use crate::registry::Registry;
use crate::token::BootToken;
use crate::wire::{self, close, Hello, HelloReply};
use crate::{tls, transport};

/// The first wait between rounds of dialling every address; it doubles up to
/// [`MAX_DIAL_BACKOFF`].
const FIRST_DIAL_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait between rounds: a parent that comes up late is found within a second.
const MAX_DIAL_BACKOFF: Duration = Duration::from_secs(1);

/// A runner the parent admitted.
pub(super) struct Connected {
    pub(super) endpoint: quinn::Endpoint,
    pub(super) connection: quinn::Connection,
    /// The runner's side of the control stream, on which it announces that it drains.
    pub(super) control: quinn::SendStream,
    /// The idle setting the parent wants for this connection, when not the token's.
    pub(super) idle_override: Option<Option<Duration>>,
}

/// Dials the parent's addresses in turn until one accepts the runner, or `failsafe` passes.
pub(super) async fn connect(
    token: &BootToken,
    registry: &Registry,
    failsafe: Instant,
) -> Result<Connected, ServeError> {
    let settings = &token.settings;
    tracing::debug!(parent = ?token.parent_addrs, "dialing parent");
    let ca = rustls::pki_types::CertificateDer::from(token.ca_cert.clone());
    let crypto = Arc::new(
        tls::client_crypto(&ca, &token.runner_identity())
            .map_err(|e| ServeError::Setup(e.to_string()))?,
    );
    let transport = transport::transport_config(
        settings.peer_timeout,
        settings.keep_alive,
        settings.max_concurrency,
        settings.congestion,
    );
    let hello = Hello {
        runner_id: token.runner_id,
        manifest: registry.manifest(),
        pid: std::process::id(),
        // Read at each connect: a resumed runner finds the secret of the claim that woke it.
        claim: super::claim::read().await,
    };
    let mut endpoints: Vec<(bool, quinn::Endpoint)> = Vec::new();
    let mut backoffs = Backoff::steady(FIRST_DIAL_BACKOFF, MAX_DIAL_BACKOFF).unbounded();
    let mut last_error = String::from("no address resolved");
    loop {
        for addr in &token.parent_addrs {
            let resolved = match resolve(addr).await {
                Ok(found) => found,
                Err(e) => {
                    last_error = format!("cannot resolve {addr}: {e}");
                    continue;
                }
            };
            for target in resolved {
                let endpoint = match endpoints.iter().find(|(v6, _)| *v6 == target.is_ipv6()) {
                    Some((_, e)) => e.clone(),
                    None => {
                        let e =
                            transport::client_endpoint(target, crypto.clone(), transport.clone())
                                .map_err(|e| {
                                ServeError::Setup(format!("cannot bind a UDP socket: {e}"))
                            })?;
                        endpoints.push((target.is_ipv6(), e.clone()));
                        e
                    }
                };
                tracing::debug!(%target, "endpoint ready; connecting");
                let attempt = handshake(&endpoint, target, &token.server_name, &hello);
                match tokio::time::timeout_at(failsafe, attempt).await {
                    Ok(Ok((connection, control, idle_override))) => {
                        return Ok(Connected {
                            endpoint,
                            connection,
                            control,
                            idle_override,
                        })
                    }
                    Ok(Err(Attempt::Refused(reason))) => return Err(ServeError::Refused(reason)),
                    Ok(Err(Attempt::Failed(e))) => {
                        tracing::debug!(%target, error = %e, "parent not reached");
                        last_error = format!("{target}: {e}");
                    }
                    Err(_) => {
                        last_error = format!("{target}: handshake still running at the failsafe")
                    }
                }
            }
        }
        let backoff = backoffs.next().unwrap_or(MAX_DIAL_BACKOFF);
        if after(backoff) >= failsafe {
            return Err(ServeError::Unreachable {
                failsafe: settings.connect_failsafe,
                last_error,
            });
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Resolves `host:port`. A literal address needs no resolver, whose thread would cost a cold
/// start a millisecond.
async fn resolve(addr: &str) -> std::io::Result<Vec<SocketAddr>> {
    match addr.parse::<SocketAddr>() {
        Ok(literal) => Ok(vec![literal]),
        Err(_) => Ok(tokio::net::lookup_host(addr).await?.collect()),
    }
}

enum Attempt {
    Refused(String),
    Failed(String),
}

async fn handshake(
    endpoint: &quinn::Endpoint,
    target: SocketAddr,
    server_name: &str,
    hello: &Hello,
) -> Result<
    (
        quinn::Connection,
        quinn::SendStream,
        Option<Option<Duration>>,
    ),
    Attempt,
> {
    let connection = endpoint
        .connect(target, server_name)
        .map_err(|e| Attempt::Failed(e.to_string()))?
        .await
        .map_err(|e| classify(&e))?;
    // With TLS 1.3 the client finishes its handshake before the server has checked its
    // certificate: only the parent's reply proves that it accepted us.
    let exchange = async {
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&wire::PROTOCOL_VERSION.to_be_bytes())
            .await?;
        wire::write_frame(&mut send, hello).await?;
        let reply: HelloReply = wire::read_head(&mut recv).await?;
        Ok::<_, wire::WireError>((reply, send))
    };
    match exchange.await {
        Ok((HelloReply::Accepted { idle_override }, send)) => Ok((connection, send, idle_override)),
        Err(e) => Err(match connection.close_reason() {
            Some(reason) => classify(&reason),
            None => Attempt::Failed(e.to_string()),
        }),
    }
}

fn classify(error: &quinn::ConnectionError) -> Attempt {
    match error {
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close::REFUSED => {
            Attempt::Refused(String::from_utf8_lossy(&c.reason).into_owned())
        }
        e => Attempt::Failed(e.to_string()),
    }
}
