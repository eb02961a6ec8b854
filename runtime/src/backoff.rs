//! The one backoff every retry uses: exponential, doubling from a first wait up to a cap, with
//! or without jitter, on backon. Call retries, Fly API retries, a runner dialling its parent and
//! the pool retrying failed boots all build one of these.

use std::time::Duration;

use backon::BackoffBuilder as _;

/// Waits that double from `first` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// The first wait.
    pub(crate) first: Duration,
    /// The longest wait.
    pub(crate) max: Duration,
    /// Whether each wait is spread randomly (up to double), so that many clients retrying at
    /// once do not retry in step.
    pub(crate) jitter: bool,
}

impl Backoff {
    /// Doubling from `first` to `max`, with jitter.
    pub(crate) const fn jittered(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            jitter: true,
        }
    }

    /// Doubling from `first` to `max`, the same every time.
    pub(crate) const fn steady(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            jitter: false,
        }
    }

    /// The waits before each retry, at most `retries` of them.
    pub(crate) fn delays(&self, retries: usize) -> impl Iterator<Item = Duration> {
        self.builder()
            .with_max_times(retries)
            .build()
            .map(to_micros)
    }

    /// The waits before each retry, for as long as the caller retries.
    pub(crate) fn unbounded(&self) -> impl Iterator<Item = Duration> {
        self.builder().without_max_times().build().map(to_micros)
    }

    /// The wait before retry number `n` (from 0), for a caller that keeps a count rather than
    /// an iterator. Without jitter, the same `n` always gives the same wait.
    pub(crate) fn nth(&self, n: u32) -> Duration {
        // Past 64 doublings every wait is `max`; no need to walk further.
        let n = n.min(64) as usize;
        self.unbounded().nth(n).unwrap_or(self.max)
    }

    fn builder(&self) -> backon::ExponentialBuilder {
        let builder = backon::ExponentialBuilder::new()
            .with_min_delay(self.first)
            .with_max_delay(self.max.max(self.first))
            .with_factor(2.0);
        if self.jitter {
            builder.with_jitter()
        } else {
            builder
        }
    }
}

/// `wait` to the nearest microsecond: backon multiplies in `f32`, which leaves 800 ms as
/// 800.000012 ms.
fn to_micros(wait: Duration) -> Duration {
    let micros = wait.as_nanos().saturating_add(500) / 1000;
    u64::try_from(micros).map_or(Duration::MAX, Duration::from_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap() {
        let backoff = Backoff::steady(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<u64> = backoff.delays(6).map(|d| d.as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.nth(0), Duration::from_millis(100));
        assert_eq!(backoff.nth(3), Duration::from_millis(800));
        assert_eq!(backoff.nth(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_double_each_wait() {
        let backoff = Backoff::jittered(Duration::from_millis(100), Duration::from_secs(5));
        for (i, wait) in backoff.delays(5).enumerate() {
            let base = Duration::from_millis(100) * 2u32.pow(i as u32);
            let slack = Duration::from_micros(1);
            assert!(
                wait + slack >= base && wait <= base * 2 + slack,
                "{i}: {wait:?}"
            );
        }
    }

    #[test]
    fn huge_settings_saturate() {
        let backoff = Backoff::steady(Duration::MAX / 2, Duration::MAX);
        assert!(backoff.nth(10) >= Duration::MAX / 2);
    }
}
