//! The requests the backend makes, each mapped to a [`KubernetesError`] that names its verb
//! and resource, and retried where a retry can help.
//!
//! Two layers retry, each for what it can see: kube-rs's client retries 429, 503 and 504
//! itself, honouring `Retry-After` (which its errors do not carry out); this module retries
//! 500, 502 and requests that got no answer, with the crate's one backoff.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::Api;

use super::KubernetesError;
use crate::backoff::Backoff;

/// Retries of a request that failed with 500, 502 or no answer: the first wait, the longest,
/// and how many. About 30 s in all, inside a default boot timeout's worth.
const RETRY: Backoff = Backoff::jittered(Duration::from_millis(250), Duration::from_secs(8));
const RETRIES: usize = 6;

/// How long a request that RBAC refuses (403) is tried again before the refusal stands: a
/// kube-apiserver that has just restarted refuses every request RBAC decides until its caches
/// of Roles and bindings fill, about a second after it reports ready. A refusal that lasts
/// this long is a missing permission.
pub(crate) const REFUSAL_GRACE: Duration = Duration::from_secs(5);

/// The wait between tries of a request that RBAC refused.
pub(crate) const REFUSAL_RETRY: Duration = Duration::from_millis(500);

/// Waits between creates that a namespace's quota refused: quota frees up when a pod ends and
/// the controller manager recounts, within a second or so.
const QUOTA_RETRY: Backoff = Backoff::jittered(Duration::from_millis(250), Duration::from_secs(2));

/// How many pods one page of the sweep's list holds: a namespace with thousands of runner
/// pods is read a page at a time rather than in one unbounded answer.
pub(crate) const LIST_PAGE: u32 = 100;

/// The pods and secrets of one namespace.
#[derive(Clone)]
pub(crate) struct KubeApi {
    pub(crate) namespace: String,
    pods: Api<Pod>,
    secrets: Api<Secret>,
}

impl KubeApi {
    pub(crate) fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            pods: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client, namespace),
        }
    }

    pub(crate) fn pods(&self) -> &Api<Pod> {
        &self.pods
    }

    /// Runs `request` (`verb` on `resource`) until it succeeds, fails for good, or the
    /// retries are spent. An RBAC refusal stands once it has lasted [`REFUSAL_GRACE`]. Each attempt has a span of its own (`kubernetes_request`: the verb,
    /// the resource, the attempt, the status: `ok`, an error answer's HTTP status, or `none`
    /// when no answer came; the duration) and is counted in
    /// `firebrand_kubernetes_requests_total{verb,resource,status}` and
    /// `firebrand_kubernetes_request_seconds{verb,resource}`. (The watch, kube-runtime's, logs
    /// its failures instead.)
    async fn retrying<T, F>(
        &self,
        verb: &'static str,
        resource: &'static str,
        mut request: impl FnMut() -> F,
    ) -> Result<T, KubernetesError>
    where
        F: std::future::Future<Output = Result<T, kube::Error>>,
    {
        let mut delays = RETRY.delays(RETRIES);
        let mut first_refusal = None;
        for attempt in 1.. {
            let span = tracing::debug_span!(
                "kubernetes_request",
                verb,
                resource,
                attempt,
                status = tracing::field::Empty,
                duration_ms = tracing::field::Empty,
            );
            let started = std::time::Instant::now();
            let result = tracing::Instrument::instrument(request(), span.clone()).await;
            let elapsed = started.elapsed();
            let result =
                result.map_err(|e| KubernetesError::from_kube(verb, resource, &self.namespace, e));
            let status = match &result {
                // kube-rs hands back the object, not the status line.
                Ok(_) => "ok".to_owned(),
                Err(error) => error
                    .code()
                    .map_or_else(|| "none".to_owned(), |c| c.to_string()),
            };
            span.record("status", status.as_str());
            span.record("duration_ms", elapsed.as_millis() as u64);
            span.in_scope(|| tracing::debug!(%status, "Kubernetes API request done"));
            metrics::counter!(
                "firebrand_kubernetes_requests_total",
                "verb" => verb,
                "resource" => resource,
                "status" => status
            )
            .increment(1);
            metrics::histogram!(
                "firebrand_kubernetes_request_seconds",
                "verb" => verb,
                "resource" => resource
            )
            .record(elapsed.as_secs_f64());
            let error = match result {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            if matches!(error, KubernetesError::Forbidden { .. }) {
                let first = *first_refusal.get_or_insert_with(std::time::Instant::now);
                if first.elapsed() < REFUSAL_GRACE {
                    tracing::debug!(verb, resource, %error, "refused; trying again in case RBAC is still loading");
                    tokio::time::sleep(REFUSAL_RETRY).await;
                    continue;
                }
            }
            match delays.next() {
                Some(delay) if error.is_transient() => {
                    tracing::debug!(verb, resource, %error, ?delay, "retrying a Kubernetes request");
                    tokio::time::sleep(delay).await;
                }
                _ => return Err(error),
            }
        }
        unreachable!("the attempts go on until one returns")
    }

    /// Creates `pod`. A create retried after an answer that never came may find its own pod
    /// made: a 409 for a pod of the same launch returns that pod. A create that a quota
    /// refuses is tried again until `give_up`, since quota frees up as pods end; then the
    /// quota's refusal is the error.
    pub(crate) async fn create_pod(
        &self,
        pod: &Pod,
        launch: &str,
        give_up: tokio::time::Instant,
    ) -> Result<Pod, KubernetesError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let params = PostParams::default();
        let mut waits = QUOTA_RETRY.unbounded();
        let created = loop {
            let created = self
                .retrying("create", "pods", || self.pods.create(&params, pod))
                .await;
            match created {
                Err(error @ KubernetesError::QuotaExceeded { .. }) => {
                    let wait = waits.next().unwrap_or(QUOTA_RETRY.max);
                    if tokio::time::Instant::now() + wait >= give_up {
                        break Err(error);
                    }
                    tracing::info!(pod = %name, %error, "waiting for quota");
                    tokio::time::sleep(wait).await;
                }
                other => break other,
            }
        };
        match created {
            Err(error) if error.code() == Some(409) => {
                let existing = self.get_pod(&name).await?;
                match existing {
                    Some(existing) if super::pod::launch_of(&existing) == Some(launch) => {
                        Ok(existing)
                    }
                    _ => Err(error),
                }
            }
            other => other,
        }
    }

    /// The pod named `name`, or `None` when there is none.
    pub(crate) async fn get_pod(&self, name: &str) -> Result<Option<Pod>, KubernetesError> {
        self.retrying("get", "pods", || self.pods.get_opt(name))
            .await
    }

    /// The pods that `selector` matches, read [`LIST_PAGE`] at a time.
    pub(crate) async fn list_pods(&self, selector: &str) -> Result<Vec<Pod>, KubernetesError> {
        let mut params = ListParams::default().labels(selector).limit(LIST_PAGE);
        let mut pods = Vec::new();
        loop {
            let page = self
                .retrying("list", "pods", || self.pods.list(&params))
                .await?;
            pods.extend(page.items);
            match page.metadata.continue_.filter(|token| !token.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(pods),
            }
        }
    }

    /// Deletes pod `name` with `grace`, or with its own `terminationGracePeriodSeconds` when
    /// `None`: whether there was one to delete (a pod already gone, or never made, is not an
    /// error).
    pub(crate) async fn delete_pod(
        &self,
        name: &str,
        grace: Option<Duration>,
    ) -> Result<bool, KubernetesError> {
        let params = match grace {
            Some(grace) => DeleteParams::default()
                .grace_period(u32::try_from(super::pod::whole_seconds(grace)).unwrap_or(u32::MAX)),
            None => DeleteParams::default(),
        };
        match self
            .retrying("delete", "pods", || self.pods.delete(name, &params))
            .await
        {
            Ok(_) => Ok(true),
            Err(error) if error.code() == Some(404) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Creates `secret`. Its name is its pod's, unique to one runner: a 409 after a retry is
    /// the secret this create made.
    pub(crate) async fn create_secret(&self, secret: &Secret) -> Result<(), KubernetesError> {
        let params = PostParams::default();
        match self
            .retrying("create", "secrets", || self.secrets.create(&params, secret))
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if error.code() == Some(409) => Ok(()),
            Err(error) => Err(error),
        }
    }
}
