//! Booting one runner: certificate, token, machine, and the wait for its hello.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::handle::{supervise, RunnerHandle};
use super::hooks::{self, GrowEnd, GrowStart};
use super::listener::Admitted;
use super::Shared;
use crate::backend::{BootRequest, Machine};
use crate::error::{BootError, Report, RunnerId};
use crate::tls::PARENT_SERVER_NAME;
use crate::token::{BootToken, PARENT_ENV};

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
                Ok((handle, machine, control)) => {
                    let outcome = Ok(started.elapsed());
                    shared.observer.booted(id, &handle.machine, &outcome);
                    hooks::call(
                        &hooks.grow_end,
                        GrowEnd {
                            runner: id,
                            outcome,
                        },
                    );
                    tracing::info!(machine = %handle.machine, "runner ready");
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
                    shared.listener.abandon(id);
                    if matches!(error, BootError::NotNeeded) {
                        tracing::info!(%error, "runner boot cancelled");
                    } else {
                        tracing::warn!(error = %Report(&error), "runner boot failed");
                    }
                    let error = Arc::new(error);
                    let outcome = Err(Arc::clone(&error));
                    shared.observer.booted(id, "", &outcome);
                    hooks::call(
                        &hooks.grow_end,
                        GrowEnd {
                            runner: id,
                            outcome,
                        },
                    );
                    shared.boot_failed(id, error);
                }
            }
        }
        .instrument(span),
    );
}

type Booted = (Arc<RunnerHandle>, Box<dyn Machine>, quinn::RecvStream);

async fn boot(shared: &Shared, id: RunnerId, min: bool) -> Result<Booted, BootError> {
    let started = Instant::now();
    let config = &shared.config;
    let deadline = started + config.boot_timeout;
    let cert = shared
        .ca
        .issue_runner(id.0, config.boot_timeout + CERT_MARGIN)?;
    let mut admitted = shared.listener.expect(id, cert.cert.clone());
    // Resizes apply to runners booted from now on.
    let capacity = shared.state.lock().scheduler.limits().max_concurrency;
    let token = BootToken::new(
        shared.parent_addrs.clone(),
        PARENT_SERVER_NAME.into(),
        shared.ca.cert(),
        &cert,
        id.0,
        shared.config.runner_settings(min, capacity),
    );
    let request = BootRequest {
        runner_id: id,
        env: vec![(PARENT_ENV.to_string(), token.encode())],
    };
    let mut machine = tokio::time::timeout_at(deadline, shared.backend.boot(request))
        .await
        .map_err(|_| BootError::Timeout(config.boot_timeout))??;
    let outcome = tokio::select! {
        // A refusal reaches `admitted` before the refused runner exits: look there first.
        biased;
        admitted = &mut admitted => admitted.unwrap_or(Err(BootError::PoolClosed)),
        exit = machine.exited() => Err(BootError::Exited(exit.description)),
        () = tokio::time::sleep_until(deadline) => Err(BootError::Timeout(config.boot_timeout)),
    };
    match outcome {
        Ok(Admitted {
            connection,
            control,
            pid,
        }) => {
            tracing::debug!(pid, elapsed = ?started.elapsed(), "runner admitted");
            let handle = RunnerHandle::new(
                id,
                connection,
                machine.describe(),
                capacity,
                usize::try_from(config.max_payload_len).unwrap_or(usize::MAX),
            );
            Ok((Arc::new(handle), machine, control))
        }
        Err(error) => {
            shared.listener.abandon(id);
            // It never served a call: nothing to drain.
            if let Err(e) = machine.terminate(Duration::ZERO).await {
                tracing::error!(error = %Report(&e), "terminating a failed boot failed");
            }
            Err(error)
        }
    }
}
