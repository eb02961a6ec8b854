//! What can go wrong talking to the Fly Machines API.

use std::time::Duration;

/// The alternatives to name when Fly refuses a GPU machine.
pub(crate) const GPU_ALTERNATIVES: &str = "Fly.io discontinued GPU machines after 2026-08-01. \
    Run GPU jobs as Kubernetes pods with `KubernetesBackend` (feature `kubernetes`, \
    docs/kubernetes.md), on a GPU host with `LocalBackend`, or implement `firebrand::Backend` \
    for another provider that offers GPUs";

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
    /// Whether Fly said it has no room for the machine: worth another region, or a retry.
    ///
    /// Only a real capacity refusal: Fly's `status` says so (`insufficient_capacity`,
    /// `volume_placement_capacity`), or a 409, 412 or 422 without a `status` says so in its
    /// message. A 422 for a config Fly does not accept (a bad guest, a GPU kind that no longer
    /// exists) is not: retrying it can only cost more requests.
    pub fn is_capacity(&self) -> bool {
        match self.fly_status.as_deref() {
            Some("insufficient_capacity" | "volume_placement_capacity") => true,
            Some(status) if status != "unknown" => false,
            _ => {
                let said = self.error.to_ascii_lowercase();
                matches!(self.status, 409 | 412 | 422)
                    && (said.contains("capacity") || said.contains("insufficient resources"))
            }
        }
    }

    /// Whether no retry of this request can succeed: a refusal that is neither transient nor
    /// for capacity (400, 401, 403, 404, a 422 for the config, a name taken).
    pub fn is_permanent(&self) -> bool {
        !self.is_transient() && !self.is_capacity()
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
    /// Fly refused the token (401) and again once it was resolved anew.
    #[error(
        "the Fly API refused the token {origin}, also after resolving it again ({last}). Mint \
         one with `fly tokens create deploy` and give it to the parent with \
         `fly secrets set FLY_API_TOKEN=...`, or log in again with `fly auth login`"
    )]
    Unauthorized {
        /// Where the token came from: `from FLY_API_TOKEN`, `from ~/.fly/config.yml`.
        origin: String,
        /// Fly's last answer.
        last: Box<ApiError>,
    },
    /// The app's [`TokenSource`](super::TokenSource) failed.
    #[error("cannot get a Fly API token {origin}: {reason}")]
    Token {
        /// The source, named.
        origin: String,
        /// Its error.
        reason: String,
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
    /// Whether booting again cannot help: the configuration, the token or the request is
    /// refused as such (a GPU refusal, 400, 401, 403, a 422 for the config). A pool fails its
    /// waiting callers at once on such an error, instead of spending a create per boot attempt.
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        match self {
            FlyError::Config(_) | FlyError::GpuRefused(_) | FlyError::Unauthorized { .. } => true,
            FlyError::Api(api) => api.is_permanent(),
            _ => false,
        }
    }

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
            FlyError::Api(api) | FlyError::Unauthorized { last: api, .. } => Some(api),
            _ => None,
        }
    }

    pub(crate) fn is_not_found(&self) -> bool {
        self.api().is_some_and(|api| api.status == 404)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(status: u16, error: &str, fly_status: Option<&str>) -> ApiError {
        ApiError {
            method: "POST",
            path: "/v1/apps/a/machines".into(),
            status,
            error: error.into(),
            fly_status: fly_status.map(Into::into),
            request_id: None,
            retry_after: None,
        }
    }

    #[test]
    fn only_real_capacity_refusals_are_capacity() {
        let capacity = [
            refusal(
                412,
                "could not reserve resource",
                Some("insufficient_capacity"),
            ),
            refusal(422, "no room", Some("volume_placement_capacity")),
            refusal(
                409,
                "insufficient resources available to fulfill request",
                None,
            ),
            refusal(412, "not enough capacity in ord", Some("unknown")),
        ];
        for r in &capacity {
            assert!(r.is_capacity() && !r.is_permanent(), "{r}");
        }
        let permanent = [
            refusal(422, "invalid guest: memory_mb", Some("unknown")),
            refusal(422, "GPU machines are no longer available", None),
            refusal(409, "a machine named x already exists", Some("name_taken")),
            refusal(400, "bad request", None),
            refusal(401, "Authenticate: token validation error", None),
            refusal(403, "forbidden", None),
        ];
        for r in &permanent {
            assert!(!r.is_capacity() && r.is_permanent(), "{r}");
        }
        for transient in [refusal(429, "", None), refusal(503, "", None)] {
            assert!(!transient.is_permanent(), "{transient}");
        }
    }
}
