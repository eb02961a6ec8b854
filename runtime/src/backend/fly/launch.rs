//! Creating one runner machine: pacing, retries, fallback regions, and never two machines for
//! one boot.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::api::{retry_delay, MachineInfo, MachinesApi};
use super::builder::keys;
use super::error::{ApiError, FlyError};
use super::Inner;
use crate::error::RunnerId;

/// Client-side pacing of creates, so that a pool growing fast stays inside Fly's limit.
pub(crate) struct Pacer {
    limiter: DefaultDirectRateLimiter,
    clock: DefaultClock,
}

impl Pacer {
    pub(crate) fn new(interval: Duration, burst: u32) -> Self {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(interval)
            .expect("the builder checks the interval is not zero")
            .allow_burst(burst);
        Self {
            limiter: RateLimiter::direct(quota),
            clock: DefaultClock::default(),
        }
    }

    /// Waits for the next free slot. Cancel-safe: a slot is taken only when this returns.
    pub(crate) async fn ready(&self) {
        while let Err(not_until) = self.limiter.check() {
            tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
        }
    }
}

/// Creates the machine for `runner`, trying each region in turn.
pub(crate) async fn launch(
    inner: &Inner,
    runner: RunnerId,
    runner_env: &[(String, String)],
) -> Result<MachineInfo, FlyError> {
    let config = &inner.config;
    let api = &inner.api;
    let launch_id = uuid::Uuid::new_v4().simple().to_string();
    // Dropped unfinished (a boot timeout, a closing pool), it destroys what the create made.
    let mut guard = LaunchGuard {
        api: Arc::clone(api),
        launch_id: launch_id.clone(),
        armed: true,
    };
    let wants_gpu = config.guest.gpu_kind.is_some();
    let all_regions: Vec<Option<&str>> = match &config.region {
        Some(region) => std::iter::once(Some(region.as_str()))
            .chain(config.fallback_regions.iter().map(|r| Some(r.as_str())))
            .collect(),
        None => vec![None],
    };
    // Regions that refused for capacity lately go last: trying them first would cost a create
    // (and a backoff) per boot while they stay full.
    let (mut regions, cooling): (Vec<_>, Vec<_>) = all_regions
        .iter()
        .partition(|region| !inner.full_regions.is_cooling(region.unwrap_or("")));
    regions.extend(cooling);
    let mut transient_delays = api.retry.delays();
    let mut attempts = 0;
    let mut last_refusal: Option<Box<ApiError>> = None;
    for (index, region) in regions.iter().enumerate() {
        let body = config.create_body(*region, &launch_id, runner, runner_env);
        let last_region = index + 1 == regions.len();
        let mut capacity_tries = 0;
        loop {
            inner.pacer.ready().await;
            attempts += 1;
            let error = match api.create(&body, config.create_timeout).await {
                Ok(machine) => {
                    guard.armed = false;
                    return Ok(machine);
                }
                Err(error) => error,
            };
            match &error {
                FlyError::Api(refusal) if wants_gpu && is_gpu_refusal(refusal) => {
                    return Err(FlyError::GpuRefused(refusal.clone()));
                }
                FlyError::Api(refusal) if refusal.is_capacity() => {
                    capacity_tries += 1;
                    tracing::warn!(region = region.unwrap_or("default"), %refusal, "no capacity");
                    inner.full_regions.refused(region.unwrap_or(""));
                    last_refusal = Some(refusal.clone());
                    // With another region to go to, go at once; retry only the last one.
                    if !last_region || capacity_tries >= config.capacity_attempts {
                        break;
                    }
                    let delay = transient_delays.next().unwrap_or(api.retry.max_delay);
                    tokio::time::sleep(delay).await;
                    continue;
                }
                _ if !error.is_transient() => return Err(error),
                _ => {}
            }
            if error.is_ambiguous() {
                if let Some(machine) = find_launched(api, &launch_id).await? {
                    tracing::info!(machine = %machine.id, %error, "adopted a machine made by a create that seemed to fail");
                    guard.armed = false;
                    return Ok(machine);
                }
            }
            let Some(delay) = transient_delays.next() else {
                return Err(FlyError::RetriesExhausted {
                    attempts,
                    last: Box::new(error),
                });
            };
            let delay = retry_delay(&error, delay);
            tracing::debug!(%error, ?delay, "retrying a create");
            tokio::time::sleep(delay).await;
        }
    }
    Err(FlyError::NoCapacity {
        regions: all_regions
            .iter()
            .map(|r| r.unwrap_or("default").to_owned())
            .collect(),
        last: last_refusal.expect("a region was given up on for lack of capacity"),
    })
}

/// How long a region that refused a machine for capacity goes to the back of the list of
/// regions later boots try. Long enough to spare a burst of boots the full region, short
/// enough to use it again once Fly has room.
pub const FULL_REGION_COOLDOWN: Duration = Duration::from_secs(60);

/// Regions that refused for capacity, and when: shared by every boot of one backend.
#[derive(Default)]
pub(crate) struct FullRegions {
    refused: parking_lot::Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
}

impl FullRegions {
    fn refused(&self, region: &str) {
        self.refused
            .lock()
            .insert(region.to_owned(), tokio::time::Instant::now());
    }

    fn is_cooling(&self, region: &str) -> bool {
        let mut refused = self.refused.lock();
        match refused.get(region) {
            Some(at) if at.elapsed() < FULL_REGION_COOLDOWN => true,
            Some(_) => {
                refused.remove(region);
                false
            }
            None => false,
        }
    }
}

/// Fly refuses GPU machines since it discontinued them; tell that apart from a capacity error.
fn is_gpu_refusal(refusal: &ApiError) -> bool {
    (400..500).contains(&refusal.status)
        && !matches!(refusal.status, 408 | 429)
        && refusal.error.to_ascii_lowercase().contains("gpu")
}

/// The live machine a create with `launch_id` made, if any. More than one cannot happen; if
/// it did, the extras are destroyed.
async fn find_launched(
    api: &MachinesApi,
    launch_id: &str,
) -> Result<Option<MachineInfo>, FlyError> {
    let found = api
        .retrying(|| api.list(Some((keys::LAUNCH, launch_id))))
        .await?;
    let mut live = found
        .into_iter()
        .filter(|m| !matches!(m.state.as_str(), "destroyed" | "destroying"));
    let first = live.next();
    for extra in live {
        tracing::warn!(machine = %extra.id, "destroying a duplicate machine of one launch");
        api.retrying(|| api.destroy(&extra.id)).await?;
    }
    Ok(first)
}

struct LaunchGuard {
    api: Arc<MachinesApi>,
    launch_id: String,
    armed: bool,
}

impl Drop for LaunchGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(launch = %self.launch_id, "no runtime to clean up an abandoned create");
            return;
        };
        let api = Arc::clone(&self.api);
        let launch_id = std::mem::take(&mut self.launch_id);
        runtime.spawn(async move {
            // A create cut off in flight may still finish on Fly's side: look twice.
            for delay in [Duration::ZERO, SECOND_SWEEP] {
                tokio::time::sleep(delay).await;
                destroy_launched(&api, &launch_id).await;
            }
        });
    }
}

/// When the sweep for an abandoned create looks again.
const SECOND_SWEEP: Duration = Duration::from_secs(5);

async fn destroy_launched(api: &MachinesApi, launch_id: &str) {
    match api
        .retrying(|| api.list(Some((keys::LAUNCH, launch_id))))
        .await
    {
        Ok(machines) => {
            for machine in machines.iter().filter(|m| m.state != "destroyed") {
                tracing::info!(machine = %machine.id, "destroying the machine of an abandoned create");
                if let Err(error) = api.retrying(|| api.destroy(&machine.id)).await {
                    tracing::error!(machine = %machine.id, %error, "cannot destroy an abandoned machine");
                }
            }
        }
        Err(error) => {
            tracing::error!(launch = %launch_id, %error, "cannot list an abandoned create's machines");
        }
    }
}
