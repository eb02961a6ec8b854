//! What can go wrong talking to the Fly Machines API.

use std::time::Duration;

/// The alternatives to name when Fly refuses a GPU machine.
pub(crate) const GPU_ALTERNATIVES: &str = "Fly.io discontinued GPU machines after 2026-08-01. \
    Run GPU jobs on a GPU host with `LocalBackend`, or implement `firebrand::Backend` for a \
    provider that still offers GPUs";

/// An error answer from the Machines API, with what Fly said about it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiError {
    /// The request's method.
    pub method: &'static str,
    /// The request's path, without the host or query.
    pub path: String,
    /// The HTTP status.
    pub status: u16,
    /// Fly's `error` (or `message`) field, or the raw body when it is not JSON.
    pub error: String,
    /// Fly's `status` field: `unknown`, `insufficient_capacity`, `name_taken`, ...
    pub fly_status: Option<String>,
    /// The `fly-request-id` response header, to quote to Fly's support.
    pub request_id: Option<String>,
    /// The `Retry-After` header, on a 429.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} answered {}", self.method, self.path, self.status)?;
        if !self.error.is_empty() {
            write!(f, ": {}", self.error)?;
        }
        if let Some(status) = &self.fly_status {
            write!(f, " (status {status})")?;
        }
        write!(
            f,
            " [fly-request-id: {}]",
            self.request_id.as_deref().unwrap_or("none")
        )
    }
}

impl ApiError {
    /// Whether Fly said it has no room for the machine: worth a retry, then another region.
    pub fn is_capacity(&self) -> bool {
        self.fly_status.as_deref() == Some("insufficient_capacity")
            || (matches!(self.status, 409 | 412 | 422) && !self.is_name_taken())
    }

    fn is_name_taken(&self) -> bool {
        self.fly_status.as_deref() == Some("name_taken")
    }

    /// Whether repeating the same request may succeed: 408, 429 and 5xx.
    pub fn is_transient(&self) -> bool {
        matches!(self.status, 408 | 429) || self.status >= 500
    }
}

/// An error from [`FlyBackend`](super::FlyBackend).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlyError {
    /// A setting is missing or contradicts another. Raised before any request.
    #[error("invalid Fly backend configuration: {0}")]
    Config(String),
    /// The API answered with an error.
    #[error("Fly Machines API: {0}")]
    Api(Box<ApiError>),
    /// The API could not be reached, or the connection dropped.
    #[error("cannot reach the Fly Machines API for {method} {path}: {reason}")]
    Connection {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// What went wrong, from the HTTP client.
        reason: String,
    },
    /// The API answered 2xx with a body this client cannot read.
    #[error("unexpected reply from the Fly Machines API to {method} {path}: {reason}")]
    Reply {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// What was wrong with it.
        reason: String,
    },
    /// Fly refused a machine with a GPU.
    #[error("Fly refused a GPU machine: {0}. {GPU_ALTERNATIVES}")]
    GpuRefused(Box<ApiError>),
    /// No region had capacity, after retries in each.
    #[error("no capacity for the machine in {regions:?}; last answer: {last}")]
    NoCapacity {
        /// The regions tried, in order.
        regions: Vec<String>,
        /// The last refusal.
        last: Box<ApiError>,
    },
    /// A transient error persisted through every retry.
    #[error("gave up after {attempts} attempts; last error: {last}")]
    RetriesExhausted {
        /// How many requests were sent.
        attempts: u32,
        /// The last error.
        last: Box<FlyError>,
    },
}

impl FlyError {
    /// Whether repeating the request may succeed.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            FlyError::Api(api) => api.is_transient(),
            FlyError::Connection { .. } => true,
            _ => false,
        }
    }

    /// Whether a create that failed this way may still have made a machine.
    pub(crate) fn is_ambiguous(&self) -> bool {
        match self {
            FlyError::Api(api) => api.status == 408 || api.status >= 500,
            FlyError::Connection { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn api(&self) -> Option<&ApiError> {
        match self {
            FlyError::Api(api) => Some(api),
            _ => None,
        }
    }

    pub(crate) fn is_not_found(&self) -> bool {
        self.api().is_some_and(|api| api.status == 404)
    }
}
