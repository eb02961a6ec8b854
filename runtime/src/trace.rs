//! Trace ids: each call has one, and the runner's log lines for the call carry it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A call's 128-bit trace id, shown as 32 hex digits (the W3C trace-context format), so that
/// an id taken from an OpenTelemetry context can be passed on with
/// [`Call::trace_id`](crate::Call::trace_id).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub u128);

impl TraceId {
    /// A new id, unique within this process and unlikely to repeat across processes. Costs an
    /// atomic increment, not a system call.
    pub fn next() -> Self {
        static BASE: OnceLock<u128> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = *BASE.get_or_init(|| uuid::Uuid::new_v4().as_u128());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // An odd multiplier is a bijection: distinct counts give distinct ids.
        TraceId(base ^ u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_print_as_32_hex_digits() {
        let ids: std::collections::HashSet<u128> = (0..10_000).map(|_| TraceId::next().0).collect();
        assert_eq!(ids.len(), 10_000);
        assert_eq!(TraceId(0xab).to_string(), format!("{:032x}", 0xab));
    }
}
