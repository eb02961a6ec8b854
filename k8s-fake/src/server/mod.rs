//! The HTTP side of the fake: routes, authentication, faults and the replies, answering as the
//! Kubernetes API server does (errors as `Status` objects). What the schemas cannot check is
//! `validation.rs`; a list of pods and its watch, `watch.rs`; the handlers, `pods.rs` and
//! `secrets.rs`, but for the one `get` both share, here.

// Handlers answer early with a whole `Response`, as axum handlers do.
#![allow(clippy::result_large_err)]

mod pods;
mod secrets;
mod validation;
mod watch;

use std::sync::Arc;

use axum::extract::{Path, Query, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use super::schema::Kind;
use super::State;
use validation::parse_body;

type Shared = Extract<Arc<State>>;
type Pairs = Query<Vec<(String, String)>>;

/// The query parameters the fake understands, by kind of request. Anything else is
/// recorded as an invalid request, so that a client sending something unexpected shows.
pub(super) const LIST_PARAMS: &[&str] = &[
    "labelSelector",
    "fieldSelector",
    "limit",
    "continue",
    "resourceVersion",
    "resourceVersionMatch",
    "watch",
    "allowWatchBookmarks",
    "timeoutSeconds",
    "sendInitialEvents",
    "pretty",
];

pub(super) const WRITE_PARAMS: &[&str] = &["fieldManager", "fieldValidation", "pretty", "dryRun"];

pub(super) const DELETE_PARAMS: &[&str] = &[
    "gracePeriodSeconds",
    "propagationPolicy",
    "orphanDependents",
    "dryRun",
    "pretty",
];

pub(super) const GET_PARAMS: &[&str] = &["pretty", "resourceVersion"];

/// The resources the fake serves.
#[derive(Debug, Clone, Copy)]
enum Resource {
    Pods,
    Secrets,
}

impl Resource {
    fn name(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Secrets => "secrets",
        }
    }
}

pub(crate) fn router(state: Arc<State>) -> Router {
    let getter = |resource: Resource| {
        move |state: Shared, path: Path<(String, String)>, query: Pairs, headers: HeaderMap| {
            get_object(state, path, query, headers, resource)
        }
    };
    Router::new()
        .route("/version", get(version))
        .route("/api", get(api_versions))
        .route("/apis", get(api_groups))
        .route("/api/v1", get(api_resources))
        .route(
            "/api/v1/namespaces/{namespace}/pods",
            get(pods::list).post(pods::create),
        )
        .route(
            "/api/v1/namespaces/{namespace}/pods/{name}",
            get(getter(Resource::Pods)).delete(pods::delete),
        )
        .route(
            "/api/v1/namespaces/{namespace}/secrets",
            get(secrets::list).post(secrets::create),
        )
        .route(
            "/api/v1/namespaces/{namespace}/secrets/{name}",
            get(getter(Resource::Secrets)).delete(secrets::delete),
        )
        .fallback(|| async {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )
        })
        .with_state(state)
}

/// `GET` of one pod or secret.
async fn get_object(
    Extract(state): Shared,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
    resource: Resource,
) -> Response {
    if let Err(refusal) = gate(&state, &headers, "get", resource.name(), &namespace) {
        return refusal;
    }
    check_params(
        &state,
        &format!("get {}", resource.name()),
        &query,
        GET_PARAMS,
    );
    let store = state.store.lock();
    let key = (namespace, name.clone());
    let found = match resource {
        Resource::Pods => store.pods.get(&key).map(|pod| &pod.object),
        Resource::Secrets => store.secrets.get(&key),
    };
    match found {
        Some(object) => reply(StatusCode::OK, object),
        None => not_found(resource.name(), &name),
    }
}

pub(super) fn reply(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(body).expect("JSON"),
    )
        .into_response()
}

/// An error, as the API server sends one: a `Status` object.
pub(crate) fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    reply(code, &status_body(code, reason, message))
}

pub(super) fn status_body(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

/// Authentication, then the armed faults, then RBAC, as a request meets them.
pub(super) fn gate(
    state: &State,
    headers: &HeaderMap,
    verb: &str,
    resource: &str,
    namespace: &str,
) -> Result<(), Response> {
    let expected = format!("Bearer {}", state.token);
    let credentials = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let authorized = match credentials {
        Some(credentials) => credentials == expected,
        None => state.anonymous_reads && matches!(verb, "get" | "list" | "watch"),
    };
    if !authorized {
        state.count(|c| c.unauthorized += 1);
        return Err(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
        ));
    }
    let mut faults = state.faults.lock();
    if faults.server_errors > 0 {
        faults.server_errors -= 1;
        drop(faults);
        state.count(|c| c.server_errors += 1);
        return Err(status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: etcdserver: request timed out",
        ));
    }
    if faults.rate_limit > 0 {
        faults.rate_limit -= 1;
        let retry_after = faults.retry_after;
        drop(faults);
        state.count(|c| c.rate_limited += 1);
        let mut response = status(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            "Too many requests, please try again later.",
        );
        if let Some(after) = retry_after {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(after.as_secs().max(1)),
            );
        }
        return Err(response);
    }
    if faults
        .denied
        .iter()
        .any(|(v, r)| v == verb && r == resource)
    {
        drop(faults);
        state.count(|c| c.forbidden += 1);
        let message = format!(
            "{resource} is forbidden: User \"system:serviceaccount:{namespace}:{}\" cannot {verb} resource \"{resource}\" in API group \"\" in the namespace \"{namespace}\"",
            super::PARENT_SERVICE_ACCOUNT
        );
        return Err(status(StatusCode::FORBIDDEN, "Forbidden", &message));
    }
    Ok(())
}

/// Records query parameters the fake does not know for this kind of request.
pub(super) fn check_params(state: &State, what: &str, query: &[(String, String)], known: &[&str]) {
    for (name, _) in query {
        if !known.contains(&name.as_str()) {
            state.invalid(format!("{what}: unknown query parameter `{name}`"));
        }
    }
}

pub(super) fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

pub(super) fn not_found(resource: &str, name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
    )
}

/// The grace period a delete asks for: its `DeleteOptions` body, else its query.
pub(super) fn delete_grace(
    state: &State,
    query: &[(String, String)],
    body: &[u8],
) -> Result<Option<i64>, Response> {
    let mut grace = param(query, "gracePeriodSeconds").and_then(|g| g.parse().ok());
    if !body.is_empty() {
        let options = parse_body(state, Kind::DeleteOptions, body)?;
        if let Some(g) = options["gracePeriodSeconds"].as_i64() {
            grace = Some(g);
        }
    }
    Ok(grace)
}

async fn version() -> Response {
    reply(
        StatusCode::OK,
        &json!({
            "major": "1", "minor": "37", "gitVersion": "v1.37.0-fake", "gitCommit": "fake",
            "gitTreeState": "clean", "buildDate": "2026-11-01T00:00:00Z", "goVersion": "go1.25",
            "compiler": "gc", "platform": "linux/amd64",
        }),
    )
}

async fn api_versions() -> Response {
    reply(
        StatusCode::OK,
        &json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
        }),
    )
}

async fn api_groups() -> Response {
    reply(
        StatusCode::OK,
        &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
    )
}

async fn api_resources() -> Response {
    let resource = |name: &str, kind: &str, short: &[&str]| {
        json!({
            "name": name, "singularName": "", "namespaced": true, "kind": kind,
            "verbs": ["create", "delete", "get", "list", "watch"],
            "shortNames": short,
        })
    };
    reply(
        StatusCode::OK,
        &json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [resource("pods", "Pod", &["po"]), resource("secrets", "Secret", &[])],
        }),
    )
}
