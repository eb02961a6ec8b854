//! Resources that jobs made and that stay on the runner while the parent holds their handles.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::stats::STATS;
use super::terminator::{StreamGuard, Terminator};
use crate::registry::AnyResource;

/// The runner's resources, by id.
pub(crate) struct Resources {
    next: AtomicU64,
    held: Mutex<HashMap<u64, Held>>,
    terminator: Arc<Terminator>,
}

struct Held {
    value: AnyResource,
    // A held resource counts as work: the runner does not idle down under it.
    _busy: StreamGuard,
}

impl Drop for Held {
    fn drop(&mut self) {
        STATS.resources.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Resources {
    pub(crate) fn new(terminator: Arc<Terminator>) -> Self {
        Self {
            next: AtomicU64::new(1),
            held: Mutex::new(HashMap::new()),
            terminator,
        }
    }

    /// Keeps `value` and returns its id, never 0.
    pub(crate) fn insert(&self, value: AnyResource) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let busy = self.terminator.hold();
        STATS.resources.fetch_add(1, Ordering::Relaxed);
        self.held.lock().insert(id, Held { value, _busy: busy });
        tracing::debug!(resource = id, "resource made");
        id
    }

    pub(crate) fn get(&self, id: u64) -> Option<AnyResource> {
        self.held
            .lock()
            .get(&id)
            .map(|held| Arc::clone(&held.value))
    }

    /// Drops every resource: the parent that held them is gone.
    pub(crate) fn clear(&self) {
        let held = std::mem::take(&mut *self.held.lock());
        if !held.is_empty() {
            tracing::debug!(count = held.len(), "resources dropped with the connection");
        }
    }

    /// Drops the resource; calls still using it keep it alive until they end.
    pub(crate) fn release(&self, id: u64) -> bool {
        let released = self.held.lock().remove(&id).is_some();
        tracing::debug!(resource = id, released, "resource released");
        released
    }
}
