//! Booting one runner: certificate, token, machine, and the wait for its hello.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::handle::{supervise, RunnerHandle};
use super::hooks::{self, GrowEnd, GrowStart};
use super::listener::{Admitted, Expecting};
use super::Shared;
use crate::backend::{BootKind, BootRequest, Machine, Park, ParkTicket, ParkedMachine};
use crate::error::{BootError, Report, RunnerId};
use crate::tls::PARENT_SERVER_NAME;
use crate::token::{BootToken, PARENT_ENV};
use crate::wire::ClaimSecret;

/// How long past its boot timeout a runner certificate stays valid. It is checked once, at
/// the handshake, which the boot timeout already bounds.
const CERT_MARGIN: Duration = Duration::from_secs(3600);

/// Boots runner `id` in the background, as placement asked, and supervises it once it is
/// ready. `cancel` stops the boot when no call needs it any more.
pub(crate) fn spawn(shared: &Arc<Shared>, id: RunnerId, min: bool, cancel: CancellationToken) {
    let shared = Arc::clone(shared);
    let span = tracing::info_span!("runner", runner = %id, min);
    shared.tasks.clone().spawn(
        async move {
            let hooks = &shared.config.hooks;
            hooks::call(&hooks.grow_start, GrowStart { runner: id, min });
            shared
                .observer
                .emit(|| super::PoolEvent::RunnerBooting { runner: id });
            let started = Instant::now();
            let mut closing = shared.closing.clone();
            // Dropping `boot` drops the machine it made, which its backend then terminates.
            let booted = tokio::select! {
                booted = boot(&shared, id, min) => booted,
                _ = closing.wait_for(|closing| *closing) => Err(BootError::PoolClosed),
                () = cancel.cancelled() => Err(BootError::NotNeeded),
            };
            match booted {
                Ok(Booted {
                    handle,
                    machine,
                    control,
                    kind,
                }) => {
                    let boot_time = started.elapsed();
                    shared
                        .observer
                        .booted(id, &handle.machine, &Ok((boot_time, kind)));
                    hooks::call(
                        &hooks.grow_end,
                        GrowEnd {
                            runner: id,
                            outcome: Ok(boot_time),
                        },
                    );
                    tracing::info!(machine = %handle.machine, kind = kind.as_str(), "runner ready");
                    if shared.runner_ready(&handle) {
                        supervise(shared, handle, machine, control, closing).await;
                    } else {
                        handle
                            .connection
                            .close(crate::wire::close::DONE, b"pool closed");
                        let _ = machine.terminate(shared.config.terminate_grace).await;
                    }
                }
                Err(error) => {
                    if matches!(error, BootError::NotNeeded) {
                        tracing::info!(%error, "runner boot cancelled");
                    } else {
                        tracing::warn!(error = %Report(&error), "runner boot failed");
                    }
                    let error = Arc::new(error);
                    shared.observer.booted(id, "", &Err(Arc::clone(&error)));
                    hooks::call(
                        &hooks.grow_end,
                        GrowEnd {
                            runner: id,
                            outcome: Err(Arc::clone(&error)),
                        },
                    );
                    shared.boot_failed(id, error);
                }
            }
        }
        .instrument(span),
    );
}

/// A runner that booted and was admitted.
struct Booted {
    handle: Arc<RunnerHandle>,
    machine: Box<dyn Machine>,
    control: quinn::RecvStream,
    kind: BootKind,
}

/// Boots runner `id`: on a parked machine where the backend has one, else on a new machine.
async fn boot(shared: &Shared, id: RunnerId, min: bool) -> Result<Booted, BootError> {
    let deadline = Instant::now() + shared.config.boot_timeout;
    if let Some(set) = &shared.parked_set {
        // Once more after waiting for a machine being suspended: its snapshot and a resume
        // take less than a create.
        let mut waited = set.parking().mode != Park::Suspend;
        loop {
            while let Some(parked) = Arc::clone(set).take(shared.pool_key) {
                shared.parked_changed();
                if let Some(booted) = claim(shared, id, min, parked, deadline).await? {
                    return Ok(booted);
                }
            }
            // A claim that failed may have put its machine back.
            shared.parked_changed();
            if waited {
                break;
            }
            waited = true;
            let wait = set.wait_parking(shared.pool_key);
            match tokio::time::timeout_at(deadline, wait).await {
                Ok(true) => tracing::debug!("waited for a machine being parked, to claim it"),
                Ok(false) => break,
                Err(_) => return Err(BootError::Timeout(shared.config.boot_timeout)),
            }
        }
    }
    create(shared, id, min, deadline).await
}

/// Boots runner `id` on a new machine.
async fn create(
    shared: &Shared,
    id: RunnerId,
    min: bool,
    deadline: Instant,
) -> Result<Booted, BootError> {
    let config = &shared.config;
    // A parked runner dials back with the certificate it was booted with, up to the parking
    // time-to-live later.
    let parked_for = shared.parking.map_or(Duration::ZERO, |p| p.ttl);
    let cert = shared
        .ca
        .issue_runner(id.0, config.boot_timeout + CERT_MARGIN + parked_for)?;
    // Resizes apply to runners booted from now on.
    let capacity = shared.state.lock().scheduler.limits().max_concurrency;
    let ticket = ParkTicket {
        pool: shared.pool_key,
        runner: id,
        cert: cert.cert.clone(),
        capacity,
    };
    let admitted = shared.listener.expect(id, cert.cert.clone(), None, None);
    let mut settings = config.runner_settings(min, capacity);
    settings.forward_output = !shared.backend.brings_output();
    let token = BootToken::new(
        shared.parent_addrs.clone(),
        PARENT_SERVER_NAME.into(),
        shared.ca.cert(),
        &cert,
        id.0,
        settings,
    );
    let request = BootRequest {
        runner_id: id,
        env: vec![(PARENT_ENV.to_string(), token.encode())],
        drain_grace: config.drain_grace,
        boot_timeout: config.boot_timeout,
    };
    let machine = tokio::time::timeout_at(deadline, shared.backend.boot(request))
        .await
        .map_err(|_| BootError::Timeout(config.boot_timeout))??;
    admit(
        shared,
        id,
        ticket,
        machine,
        BootKind::Create,
        admitted,
        deadline,
    )
    .await
}

/// Boots runner `id` on a parked machine: opens the claim its runner is admitted under, then
/// wakes the machine. `Ok(None)` when the claim failed and the boot should try another.
async fn claim(
    shared: &Shared,
    id: RunnerId,
    min: bool,
    parked: Box<dyn ParkedMachine>,
    deadline: Instant,
) -> Result<Option<Booted>, BootError> {
    let ticket = parked.ticket().clone();
    let described = parked.describe();
    // The claim: the parked runner is admitted once, with its own certificate, until the
    // boot's deadline, and idles as the slot it fills would.
    let idle = shared
        .config
        .runner_settings(min, ticket.capacity)
        .idle_shutdown_after;
    // The secret ties the claim to the machine: the backend hands it to the machine, and a
    // copy of the runner's boot token dialing from elsewhere does not have it.
    let secret = ClaimSecret::random();
    let admitted = shared.listener.expect(
        ticket.runner,
        ticket.cert.clone(),
        Some(idle),
        Some(secret.clone()),
    );
    tracing::info!(machine = %described, parked_runner = %ticket.runner, "claiming a parked machine");
    let claimed = match tokio::time::timeout_at(deadline, parked.claim(secret)).await {
        Ok(Ok(claimed)) => claimed,
        Ok(Err(e)) => {
            tracing::info!(machine = %described, error = %Report(&e), "claim failed; trying the next");
            return Ok(None);
        }
        Err(_) => return Err(BootError::Timeout(shared.config.boot_timeout)),
    };
    let booted = admit(
        shared,
        id,
        ticket,
        claimed.machine,
        claimed.kind,
        admitted,
        deadline,
    );
    booted.await.map(Some)
}

/// Waits until the runner on `machine` is admitted, its machine exits, or `deadline` passes.
/// A runner that is not admitted has its machine terminated.
async fn admit(
    shared: &Shared,
    id: RunnerId,
    ticket: ParkTicket,
    mut machine: Box<dyn Machine>,
    kind: BootKind,
    mut expecting: Expecting<'_>,
    deadline: Instant,
) -> Result<Booted, BootError> {
    let config = &shared.config;
    let outcome = tokio::select! {
        // A refusal reaches `admitted` before the refused runner exits: look there first.
        biased;
        admitted = expecting.admitted() => admitted,
        error = machine.boot_failed() => Err(error),
        () = tokio::time::sleep_until(deadline) => Err(BootError::Timeout(config.boot_timeout)),
    };
    match outcome {
        Ok(Admitted {
            connection,
            control,
            pid,
        }) => {
            tracing::debug!(pid, kind = kind.as_str(), "runner admitted");
            let handle = RunnerHandle::new(
                id,
                connection,
                machine.describe(),
                ticket,
                usize::try_from(config.max_payload_len).unwrap_or(usize::MAX),
            );
            Ok(Booted {
                handle: Arc::new(handle),
                machine,
                control,
                kind,
            })
        }
        Err(error) => {
            drop(expecting);
            // It never served a call: nothing to drain. A claimed machine whose runner did not
            // come back is destroyed, not parked again.
            if let Err(e) = machine.terminate(Duration::ZERO).await {
                tracing::error!(error = %Report(&e), "terminating a failed boot failed");
            }
            Err(error)
        }
    }
}
