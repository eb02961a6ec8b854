//! A small client for the Machines API calls a pool needs: create, get, list, wait, destroy,
//! and for parking, suspend, stop, start and leases.
//! Each method sends one request; [`MachinesApi::retrying`] repeats the safe ones.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use reqwest::header::{HeaderMap, AUTHORIZATION, RETRY_AFTER};
use reqwest::Method;
use serde::Deserialize;
use tracing::Instrument as _;

use super::credentials::{Credentials, Lent};
use super::error::{ApiError, FlyError};
use crate::backoff::Backoff;

/// The longest a `/wait` may block, as Fly caps it.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(60);
/// The header that proves a request comes from the holder of the machine's lease.
const LEASE_NONCE: &str = "fly-machine-lease-nonce";
/// How long a request may take beyond what the server is asked to block for.
const REQUEST_SLACK: Duration = Duration::from_secs(15);

/// How often and how patiently to repeat a request that failed in a transient way.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    /// Requests in all, the first included.
    pub attempts: u32,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The waits between attempts: doubling, with jitter.
    pub(crate) fn delays(&self) -> impl Iterator<Item = Duration> {
        Backoff::jittered(self.min_delay, self.max_delay)
            .delays(self.attempts.saturating_sub(1) as usize)
    }
}

/// A machine as the API describes it; only the fields Firebrand reads.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct MachineInfo {
    pub id: String,
    #[serde(default)]
    pub instance_id: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub config: Option<ConfigInfo>,
    #[serde(default)]
    pub events: Vec<EventInfo>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ConfigInfo {
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub image: String,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct EventInfo {
    #[serde(default)]
    pub request: Option<serde_json::Value>,
    #[serde(default)]
    pub timestamp: i64,
}

impl MachineInfo {
    /// The image the machine runs.
    pub(crate) fn image(&self) -> &str {
        self.config.as_ref().map_or("", |c| c.image.as_str())
    }

    pub(crate) fn metadata(&self, key: &str) -> Option<&str> {
        self.config.as_ref()?.metadata.get(key).map(String::as_str)
    }

    /// How the machine's process ended, from its newest exit event: `exit code 3`, `OOM killed`.
    pub(crate) fn exit(&self) -> (Option<i32>, String) {
        let exit = self
            .events
            .iter()
            .filter_map(|e| Some((e.timestamp, e.request.as_ref()?.get("exit_event")?)))
            .max_by_key(|(timestamp, _)| *timestamp)
            .map(|(_, exit)| exit);
        let Some(exit) = exit else {
            return (None, format!("machine {} is {}", self.id, self.state));
        };
        let code = exit
            .get("exit_code")
            .and_then(serde_json::Value::as_i64)
            .and_then(|c| i32::try_from(c).ok());
        let flag = |name: &str| exit.get(name).and_then(serde_json::Value::as_bool) == Some(true);
        let mut description = match code {
            Some(code) => format!("machine {} exited with exit code {code}", self.id),
            None => format!("machine {} exited", self.id),
        };
        if flag("oom_killed") {
            description.push_str(", OOM killed");
        }
        if flag("requested_stop") {
            description.push_str(", as requested");
        }
        (code, description)
    }
}

/// The Machines API of one app.
pub(crate) struct MachinesApi {
    http: reqwest::Client,
    base: String,
    app: String,
    credentials: Credentials,
    pub(crate) retry: RetryPolicy,
}

impl MachinesApi {
    pub(crate) fn new(
        base: &str,
        app: &str,
        credentials: Credentials,
        retry: RetryPolicy,
    ) -> Result<Self, FlyError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("firebrand/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FlyError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            app: app.to_owned(),
            credentials,
            retry,
        })
    }

    pub(crate) async fn create(
        &self,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<MachineInfo, FlyError> {
        let path = format!("/v1/apps/{}/machines", self.app);
        self.json(Request::new(Op::Create, &path, timeout).body(body))
            .await
    }

    pub(crate) async fn get(&self, id: &str) -> Result<MachineInfo, FlyError> {
        let path = format!("/v1/apps/{}/machines/{id}", self.app);
        self.json(Request::new(Op::Get, &path, REQUEST_SLACK)).await
    }

    /// The app's machines, or those whose metadata has `key` set to `value`.
    pub(crate) async fn list(
        &self,
        metadata: Option<(&str, &str)>,
    ) -> Result<Vec<MachineInfo>, FlyError> {
        let path = format!("/v1/apps/{}/machines", self.app);
        let query: Vec<(String, String)> = metadata
            .iter()
            .map(|(k, v)| (format!("metadata.{k}"), (*v).to_owned()))
            .collect();
        self.json(Request::new(Op::List, &path, REQUEST_SLACK).query(&query))
            .await
    }

    /// Blocks up to `timeout` (at most a minute) until the machine is in one of `states`.
    /// `Ok(false)` when the wait timed out.
    pub(crate) async fn wait(
        &self,
        id: &str,
        version: &str,
        states: &[&str],
        timeout: Duration,
    ) -> Result<bool, FlyError> {
        let path = format!("/v1/apps/{}/machines/{id}/wait", self.app);
        let timeout = timeout.clamp(Duration::from_secs(1), MAX_WAIT);
        let mut query: Vec<(String, String)> = states
            .iter()
            .map(|s| ("state".to_owned(), (*s).to_owned()))
            .collect();
        if !version.is_empty() {
            query.push(("version".into(), version.to_owned()));
        }
        query.push(("timeout".into(), timeout.as_secs().to_string()));
        tracing::debug!(machine = id, ?states, ?timeout, "wait started");
        match self
            .send(Request::new(Op::Wait, &path, timeout + REQUEST_SLACK).query(&query))
            .await
        {
            Ok(_) => {
                tracing::debug!(machine = id, ?states, "wait ended: state reached");
                Ok(true)
            }
            Err(FlyError::Api(api)) if api.status == 408 => {
                tracing::debug!(machine = id, ?states, ?timeout, "wait timed out");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// `DELETE ?force=true`. A machine that is already gone counts as destroyed.
    pub(crate) async fn destroy(&self, id: &str) -> Result<(), FlyError> {
        let path = format!("/v1/apps/{}/machines/{id}", self.app);
        let query = [("force".to_owned(), "true".to_owned())];
        match self
            .send(Request::new(Op::Destroy, &path, REQUEST_SLACK).query(&query))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `POST .../lease`: takes the machine's lease for `ttl`, and returns its nonce. A 409 means
    /// someone else holds it.
    pub(crate) async fn lease(&self, id: &str, ttl: Duration) -> Result<String, FlyError> {
        #[derive(Deserialize)]
        struct Lease {
            nonce: Option<String>,
            data: Option<Box<Lease>>,
        }
        let path = format!("/v1/apps/{}/machines/{id}/lease", self.app);
        let body = serde_json::json!({
            "description": "firebrand: claiming a parked runner",
            "ttl": ttl.as_secs().max(1),
        });
        let reply = self
            .send(Request::new(Op::Lease, &path, REQUEST_SLACK).body(&body))
            .await?;
        // Fly documents the lease itself; it answers with it wrapped in `data`.
        let lease: Lease = serde_json::from_slice(&reply).map_err(|e| FlyError::Reply {
            method: "POST",
            path: path.clone(),
            reason: e.to_string(),
        })?;
        lease
            .nonce
            .or_else(|| lease.data.and_then(|d| d.nonce))
            .ok_or_else(|| FlyError::Reply {
                method: "POST",
                path,
                reason: "the lease has no nonce".into(),
            })
    }

    /// `DELETE .../lease`, as the holder of `nonce`.
    pub(crate) async fn release_lease(&self, id: &str, nonce: &str) -> Result<(), FlyError> {
        let path = format!("/v1/apps/{}/machines/{id}/lease", self.app);
        let request = Request::new(Op::ReleaseLease, &path, REQUEST_SLACK).lease(nonce);
        self.send(request).await.map(drop)
    }

    /// `POST .../start`: starts a stopped machine, or resumes a suspended one.
    pub(crate) async fn start(&self, id: &str, nonce: &str) -> Result<(), FlyError> {
        let path = format!("/v1/apps/{}/machines/{id}/start", self.app);
        let request = Request::new(Op::Start, &path, REQUEST_SLACK).lease(nonce);
        self.send(request).await.map(drop)
    }

    /// `POST .../metadata/{key}`: sets one metadata key, as the holder of lease `nonce`.
    pub(crate) async fn set_metadata(
        &self,
        id: &str,
        key: &str,
        value: &str,
        nonce: &str,
    ) -> Result<(), FlyError> {
        let path = format!("/v1/apps/{}/machines/{id}/metadata/{key}", self.app);
        let body = serde_json::json!({ "value": value });
        let request = Request::new(Op::SetMetadata, &path, REQUEST_SLACK)
            .body(&body)
            .lease(nonce);
        self.send(request).await.map(drop)
    }

    /// `POST .../suspend`.
    pub(crate) async fn suspend(&self, id: &str) -> Result<(), FlyError> {
        let path = format!("/v1/apps/{}/machines/{id}/suspend", self.app);
        let request = Request::new(Op::Suspend, &path, REQUEST_SLACK);
        self.send(request).await.map(drop)
    }

    /// `POST .../stop` with SIGTERM, killed after `timeout`.
    pub(crate) async fn stop(&self, id: &str, timeout: Duration) -> Result<(), FlyError> {
        let path = format!("/v1/apps/{}/machines/{id}/stop", self.app);
        let body = serde_json::json!({
            "signal": "SIGTERM",
            "timeout": format!("{}s", timeout.as_secs().max(1)),
        });
        let request = Request::new(Op::Stop, &path, REQUEST_SLACK).body(&body);
        self.send(request).await.map(drop)
    }

    /// Repeats `request` while it fails in a transient way, backing off with jitter and
    /// honouring `Retry-After`. Only for requests that are safe to repeat.
    pub(crate) async fn retrying<T, F, Fut>(&self, mut request: F) -> Result<T, FlyError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, FlyError>>,
    {
        let mut delays = self.retry.delays();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match ATTEMPT.scope(attempts, request()).await {
                Ok(value) => return Ok(value),
                Err(error) if !error.is_transient() => return Err(error),
                Err(error) => error,
            };
            let Some(delay) = delays.next() else {
                return Err(FlyError::RetriesExhausted {
                    attempts,
                    last: Box::new(error),
                });
            };
            let delay = retry_delay(&error, delay);
            tracing::debug!(%error, ?delay, "retrying a Fly API request");
            tokio::time::sleep(delay).await;
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        request: Request<'_>,
    ) -> Result<T, FlyError> {
        let (method, path) = (request.op.method_name(), request.path);
        let bytes = self.send(request).await?;
        serde_json::from_slice(&bytes).map_err(|e| FlyError::Reply {
            method,
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Sends one request, in a span of its own (`fly_request`: the operation, its path
    /// template, the attempt, the status, the duration and `fly-request-id`), and counts it in
    /// `firebrand_fly_requests_total{op,status}` and `firebrand_fly_request_seconds{op}`.
    async fn send(&self, request: Request<'_>) -> Result<bytes::Bytes, FlyError> {
        let op = request.op;
        let span = tracing::debug_span!(
            "fly_request",
            op = op.name(),
            path = op.template(),
            attempt = ATTEMPT.try_with(|a| *a).unwrap_or(1),
            status = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
            fly_request_id = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let result = self
            .send_authorized(&request)
            .instrument(span.clone())
            .await;
        let elapsed = started.elapsed();
        let (status, request_id) = match &result {
            Ok((status, id, _)) => (status.to_string(), id.as_deref()),
            Err(FlyError::Api(api)) => (api.status.to_string(), api.request_id.as_deref()),
            Err(_) => ("error".to_owned(), None),
        };
        span.record("status", status.as_str());
        span.record("duration_ms", elapsed.as_secs_f64() * 1e3);
        if let Some(id) = request_id {
            span.record("fly_request_id", id);
        }
        span.in_scope(|| tracing::debug!(status = %status, "Fly API request done"));
        metrics::counter!("firebrand_fly_requests_total", "op" => op.name(), "status" => status)
            .increment(1);
        metrics::histogram!("firebrand_fly_request_seconds", "op" => op.name())
            .record(elapsed.as_secs_f64());
        result.map(|(_, _, bytes)| bytes)
    }

    /// [`send`](Self::send) without the telemetry: a success's status, request id and body.
    /// A 401 resolves the token again (once for all the requests it refused) and repeats the
    /// request once, if the token read again differs; a second 401, or the same token, is
    /// [`FlyError::Unauthorized`]: repeating a request with a token Fly just refused would
    /// only spend the rate limit.
    async fn send_authorized(
        &self,
        request: &Request<'_>,
    ) -> Result<(u16, Option<String>, bytes::Bytes), FlyError> {
        let token = self.credentials.token().await?;
        let first = match self.send_once(&token, request).await {
            Err(FlyError::Api(api)) if api.status == 401 => api,
            done => return done,
        };
        tracing::warn!(source = %token.origin(), "the Fly API refused the token (401): resolving it again");
        let refused = token;
        let token = self.credentials.refresh(&refused).await?;
        if token.token().same_as(refused.token()) {
            return Err(FlyError::Unauthorized {
                origin: token.origin().to_string(),
                last: first,
            });
        }
        match self.send_once(&token, request).await {
            Err(FlyError::Api(api)) if api.status == 401 => Err(FlyError::Unauthorized {
                origin: token.origin().to_string(),
                last: api,
            }),
            done => done,
        }
    }

    async fn send_once(
        &self,
        token: &Lent,
        request: &Request<'_>,
    ) -> Result<(u16, Option<String>, bytes::Bytes), FlyError> {
        let Request {
            op,
            path,
            query,
            body,
            lease_nonce,
            timeout,
        } = *request;
        let method_name = op.method_name();
        let connection = |e: reqwest::Error| FlyError::Connection {
            method: method_name,
            path: path.to_owned(),
            reason: error_chain(&e.without_url()),
        };
        let mut request = self
            .http
            .request(op.method(), format!("{}{path}", self.base))
            .header(AUTHORIZATION, token.token().header())
            .query(query)
            .timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(nonce) = lease_nonce {
            request = request.header(LEASE_NONCE, nonce);
        }
        let response = request.send().await.map_err(connection)?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(connection)?;
        if status.is_success() {
            let request_id = headers
                .get("fly-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Ok((status.as_u16(), request_id, bytes));
        }
        let error = api_error(method_name, path, status.as_u16(), &headers, &bytes);
        tracing::debug!(
            status = error.status,
            fly_request_id = error.request_id.as_deref().unwrap_or("none"),
            error = %error.error,
            "Fly API request failed"
        );
        Err(FlyError::Api(Box::new(error)))
    }
}

/// One Machines API request: its operation, path, query, body, lease nonce and timeout.
#[derive(Clone, Copy)]
struct Request<'a> {
    op: Op,
    path: &'a str,
    query: &'a [(String, String)],
    body: Option<&'a serde_json::Value>,
    lease_nonce: Option<&'a str>,
    timeout: Duration,
}

impl<'a> Request<'a> {
    fn new(op: Op, path: &'a str, timeout: Duration) -> Self {
        Self {
            op,
            path,
            query: &[],
            body: None,
            lease_nonce: None,
            timeout,
        }
    }

    fn query(mut self, query: &'a [(String, String)]) -> Self {
        self.query = query;
        self
    }

    fn body(mut self, body: &'a serde_json::Value) -> Self {
        self.body = Some(body);
        self
    }

    /// Sent as the holder of the machine's lease.
    fn lease(mut self, nonce: &'a str) -> Self {
        self.lease_nonce = Some(nonce);
        self
    }
}

tokio::task_local! {
    /// The attempt a request is, within [`MachinesApi::retrying`]: 1 outside it.
    static ATTEMPT: u32;
}

/// One kind of Machines API request: its name in metrics and spans, its method, and its path
/// template (ids left out, so that spans and metrics do not grow a series per machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Create,
    Get,
    List,
    Wait,
    Destroy,
    Lease,
    ReleaseLease,
    Start,
    Suspend,
    Stop,
    SetMetadata,
}

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Get => "get",
            Op::List => "list",
            Op::Wait => "wait",
            Op::Destroy => "destroy",
            Op::Lease => "lease",
            Op::ReleaseLease => "release_lease",
            Op::Start => "start",
            Op::Suspend => "suspend",
            Op::Stop => "stop",
            Op::SetMetadata => "set_metadata",
        }
    }

    fn method(self) -> Method {
        match self {
            Op::Get | Op::List | Op::Wait => Method::GET,
            Op::Destroy | Op::ReleaseLease => Method::DELETE,
            Op::Create | Op::Lease | Op::Start | Op::Suspend | Op::Stop | Op::SetMetadata => {
                Method::POST
            }
        }
    }

    fn method_name(self) -> &'static str {
        match self.method() {
            Method::GET => "GET",
            Method::DELETE => "DELETE",
            _ => "POST",
        }
    }

    fn template(self) -> &'static str {
        match self {
            Op::Create | Op::List => "/v1/apps/{app_name}/machines",
            Op::Get | Op::Destroy => "/v1/apps/{app_name}/machines/{machine_id}",
            Op::Wait => "/v1/apps/{app_name}/machines/{machine_id}/wait",
            Op::Lease | Op::ReleaseLease => "/v1/apps/{app_name}/machines/{machine_id}/lease",
            Op::Start => "/v1/apps/{app_name}/machines/{machine_id}/start",
            Op::Suspend => "/v1/apps/{app_name}/machines/{machine_id}/suspend",
            Op::Stop => "/v1/apps/{app_name}/machines/{machine_id}/stop",
            Op::SetMetadata => "/v1/apps/{app_name}/machines/{machine_id}/metadata/{key}",
        }
    }
}

/// The wait before the next try: Fly's `Retry-After` when it sent one, else the backoff.
pub(crate) fn retry_delay(error: &FlyError, backoff: Duration) -> Duration {
    error
        .api()
        .and_then(|api| api.retry_after)
        .map_or(backoff, |after| after.max(backoff / 2))
}

fn api_error(
    method: &'static str,
    path: &str,
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiError {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: Option<String>,
        message: Option<String>,
        status: Option<String>,
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (error, fly_status) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => (
            parsed.error.or(parsed.message).unwrap_or_default(),
            parsed.status,
        ),
        Err(_) => (String::from_utf8_lossy(body).trim().to_owned(), None),
    };
    ApiError {
        method,
        path: path.to_owned(),
        status,
        error,
        fly_status,
        request_id: header("fly-request-id"),
        retry_after: header(RETRY_AFTER.as_str())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
