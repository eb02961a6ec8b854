//! The parent's QUIC endpoint: it admits each expected runner once, and refuses everything else.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;
use tokio::sync::oneshot;

use crate::error::{BootError, Report, RunnerId};
use crate::manifest::Manifest;
use crate::wire::{self, close, ClaimSecret, Hello, HelloReply};

/// How long a connecting runner has to finish its handshake and hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How many admitted or abandoned runner ids are remembered, to explain a late or replayed dial.
const RETIRED_MEMORY: usize = 4096;

/// A runner that passed the handshake and the hello.
pub(crate) struct Admitted {
    pub(crate) connection: quinn::Connection,
    pub(crate) control: quinn::RecvStream,
    pub(crate) pid: u32,
}

type AdmitSender = oneshot::Sender<Result<Admitted, BootError>>;

struct Expected {
    cert: CertificateDer<'static>,
    /// A claim's secret: only a hello that carries it is admitted.
    claim: Option<ClaimSecret>,
    admit: AdmitSender,
    idle_override: Option<Option<Duration>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Retired {
    Admitted,
    Abandoned,
    /// Parked, with no claim open: it dials now and then to find out whether it was resumed.
    Parked,
}

#[derive(Default)]
struct Table {
    expected: HashMap<RunnerId, Expected>,
    retired: VecDeque<(RunnerId, Retired)>,
}

impl Table {
    fn retire(&mut self, id: RunnerId, how: Retired) {
        if self.retired.len() == RETIRED_MEMORY {
            self.retired.pop_front();
        }
        self.retired.push_back((id, how));
    }
}

/// A runner the listener expects; dropped, the listener stops expecting it, and refuses it
/// if it dials later.
pub(crate) struct Expecting<'a> {
    listener: &'a Listener,
    id: RunnerId,
    admitted: oneshot::Receiver<Result<Admitted, BootError>>,
}

impl Expecting<'_> {
    /// Resolves when the runner is admitted or refused. Cancel-safe.
    pub(crate) async fn admitted(&mut self) -> Result<Admitted, BootError> {
        (&mut self.admitted)
            .await
            .unwrap_or(Err(BootError::PoolClosed))
    }
}

impl Drop for Expecting<'_> {
    fn drop(&mut self) {
        // A no-op once the runner was admitted: it is expected no longer.
        self.listener.abandon(self.id);
    }
}

/// The runners a pool expects, and the task that admits them.
pub(crate) struct Listener {
    endpoint: quinn::Endpoint,
    table: Arc<Mutex<Table>>,
}

impl Listener {
    /// Starts admitting runners on `endpoint` whose manifest equals `manifest`.
    pub(crate) fn start(endpoint: quinn::Endpoint, manifest: Arc<Manifest>) -> Self {
        let table = Arc::new(Mutex::new(Table::default()));
        let accepting = endpoint.clone();
        let admissions = Arc::clone(&table);
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let table = Arc::clone(&admissions);
                let manifest = Arc::clone(&manifest);
                tokio::spawn(async move {
                    match tokio::time::timeout(HELLO_TIMEOUT, admit(incoming, &table, &manifest))
                        .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::debug!(error = %Report(&e), "connection attempt failed")
                        }
                        Err(_) => tracing::warn!("connecting runner did not say hello in time"),
                    }
                });
            }
        });
        Self { endpoint, table }
    }

    pub(crate) fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Expects runner `id` presenting `cert`, once, until the returned expectation is dropped;
    /// it resolves when the runner is admitted or refused. A claim of a parked runner passes
    /// the idle setting the runner is to use, and the claim's secret, which the runner's hello
    /// must carry.
    pub(crate) fn expect(
        &self,
        id: RunnerId,
        cert: CertificateDer<'static>,
        idle_override: Option<Option<Duration>>,
        claim: Option<ClaimSecret>,
    ) -> Expecting<'_> {
        let (admit, admitted) = oneshot::channel();
        self.table.lock().expected.insert(
            id,
            Expected {
                cert,
                claim,
                admit,
                idle_override,
            },
        );
        Expecting {
            listener: self,
            id,
            admitted,
        }
    }

    /// Notes that runner `id` is parked: until a claim expects it again, its dials are refused
    /// as those of a parked runner, quietly, since it makes them on purpose.
    pub(crate) fn parked(&self, id: RunnerId) {
        self.table.lock().retire(id, Retired::Parked);
    }

    /// Stops expecting runner `id`: a later dial with its certificate is refused.
    pub(crate) fn abandon(&self, id: RunnerId) {
        let mut table = self.table.lock();
        if table.expected.remove(&id).is_some() {
            table.retire(id, Retired::Abandoned);
        }
    }

    pub(crate) fn close(&self) {
        self.endpoint.close(close::DONE, b"pool closed");
    }
}

impl Drop for Listener {
    // The accept task holds its own handle on the endpoint: closing it is what ends that task.
    fn drop(&mut self) {
        self.close();
    }
}

#[derive(Debug, thiserror::Error)]
enum AdmitError {
    #[error("handshake failed")]
    Handshake(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("refused: {0}")]
    Refused(String),
}

async fn admit(
    incoming: quinn::Incoming,
    table: &Mutex<Table>,
    manifest: &Manifest,
) -> Result<(), AdmitError> {
    // rustls has already required a client certificate chaining to the pool CA.
    let connection = incoming.await?;
    let Some(cert) = peer_certificate(&connection) else {
        return Err(refuse(&connection, "no client certificate".into()));
    };
    let (control_send, mut control) = connection.accept_bi().await?;
    let mut version = [0; 2];
    control
        .read_exact(&mut version)
        .await
        .map_err(wire::WireError::from)?;
    let version = u16::from_be_bytes(version);
    if version != wire::PROTOCOL_VERSION {
        return Err(refuse(
            &connection,
            format!(
                "protocol version mismatch: the parent speaks {}, the runner {version}",
                wire::PROTOCOL_VERSION
            ),
        ));
    }
    let hello: Hello = wire::read_head(&mut control).await?;
    let id = RunnerId(hello.runner_id);
    let expected = {
        let mut table = table.lock();
        match table.expected.get(&id) {
            Some(e) if e.cert != cert => None,
            // Refused without ending the claim: the machine's own runner may still dial.
            Some(Expected {
                claim: Some(secret),
                ..
            }) if !hello
                .claim
                .as_ref()
                .is_some_and(|sent| secret.matches(sent)) =>
            {
                drop(table);
                let why =
                    format!(
                    "runner {id}'s claim is open, but this dial {} its secret: it did not come \
                     from the claimed machine",
                    if hello.claim.is_some() { "has the wrong" } else { "lacks" }
                );
                return Err(refuse(&connection, why));
            }
            Some(_) => {
                table.retire(id, Retired::Admitted);
                table.expected.remove(&id)
            }
            None => {
                let retired = table.retired.iter().rev().find(|(r, _)| *r == id);
                let retired = retired.map(|(_, how)| *how);
                drop(table);
                let why = match retired {
                    Some(Retired::Admitted) => format!("runner {id} has already connected"),
                    Some(Retired::Abandoned) => {
                        format!("runner {id} was given up on (its boot timed out or failed)")
                    }
                    Some(Retired::Parked) => {
                        format!("runner {id} is parked and no claim for it is open")
                    }
                    None => format!("unknown runner id {id}"),
                };
                if retired == Some(Retired::Parked) {
                    tracing::debug!(reason = %why, "parked runner refused");
                    return Err(close_refused(&connection, why));
                }
                return Err(refuse(&connection, why));
            }
        }
    };
    let Some(expected) = expected else {
        return Err(refuse(
            &connection,
            format!("the client certificate was not issued to runner {id}"),
        ));
    };
    let differences = manifest.differences(&hello.manifest);
    if !differences.is_empty() {
        let why = format!("job registries differ: {}", differences.join("; "));
        let _ = expected
            .admit
            .send(Err(BootError::Incompatible(why.clone())));
        return Err(refuse(&connection, why));
    }
    let mut control_send = control_send;
    let reply = HelloReply::Accepted {
        idle_override: expected.idle_override,
    };
    wire::write_frame(&mut control_send, &reply).await?;
    // Nothing more goes from the parent to the runner on the control stream.
    let _ = control_send.finish();
    let admitted = Admitted {
        connection: connection.clone(),
        control,
        pid: hello.pid,
    };
    if expected.admit.send(Ok(admitted)).is_err() {
        // The boot was given up on between the lookup and now.
        connection.close(close::DONE, b"boot abandoned");
    }
    Ok(())
}

fn peer_certificate(connection: &quinn::Connection) -> Option<CertificateDer<'static>> {
    connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

fn refuse(connection: &quinn::Connection, why: String) -> AdmitError {
    tracing::warn!(reason = %why, remote = %connection.remote_address(), "runner refused");
    close_refused(connection, why)
}

fn close_refused(connection: &quinn::Connection, why: String) -> AdmitError {
    // QUIC caps the close reason to what fits in one packet.
    let mut reason = why.clone().into_bytes();
    reason.truncate(1000);
    connection.close(close::REFUSED, &reason);
    AdmitError::Refused(why)
}
