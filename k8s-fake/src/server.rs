//! The HTTP side of the fake: routes, authentication, validation and faults, answering as the
//! Kubernetes API server does (errors as `Status` objects).

// Handlers answer early with a whole `Response`, as axum handlers do.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::schema::Kind;
use super::store::{self, FieldSelector, Pod, Selector};
use super::{kubelet, State};

type Shared = Extract<Arc<State>>;
type Pairs = Query<Vec<(String, String)>>;

/// How long a watch lasts when the request does not say, as the API server's default
/// `--min-request-timeout` (1800 s) does.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// The query parameters the fake understands, by kind of request. Anything else is
/// recorded as an invalid request, so that a client sending something unexpected shows.
const LIST_PARAMS: &[&str] = &[
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
const WRITE_PARAMS: &[&str] = &["fieldManager", "fieldValidation", "pretty", "dryRun"];
const DELETE_PARAMS: &[&str] = &[
    "gracePeriodSeconds",
    "propagationPolicy",
    "orphanDependents",
    "dryRun",
    "pretty",
];
const GET_PARAMS: &[&str] = &["pretty", "resourceVersion"];

pub(crate) fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/api", get(api_versions))
        .route("/apis", get(api_groups))
        .route("/api/v1", get(api_resources))
        .route(
            "/api/v1/namespaces/{namespace}/pods",
            get(list_pods).post(create_pod),
        )
        .route(
            "/api/v1/namespaces/{namespace}/pods/{name}",
            get(get_pod).delete(delete_pod),
        )
        .route(
            "/api/v1/namespaces/{namespace}/secrets",
            get(list_secrets).post(create_secret),
        )
        .route(
            "/api/v1/namespaces/{namespace}/secrets/{name}",
            get(get_secret).delete(delete_secret),
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

fn reply(code: StatusCode, body: &Value) -> Response {
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

fn status_body(code: StatusCode, reason: &str, message: &str) -> Value {
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
fn gate(
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
fn check_params(state: &State, what: &str, query: &[(String, String)], known: &[&str]) {
    for (name, _) in query {
        if !known.contains(&name.as_str()) {
            state.invalid(format!("{what}: unknown query parameter `{name}`"));
        }
    }
}

fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Parses and validates a body as `kind`; a refusal is a 400 (not JSON) or a 422 (invalid),
/// recorded either way.
fn parse_body(state: &State, kind: Kind, body: &[u8]) -> Result<Value, Response> {
    let value: Value = serde_json::from_slice(body).map_err(|error| {
        state.count(|c| c.invalid += 1);
        state.invalid(format!("{kind:?} body is not JSON: {error}"));
        status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("the body is not JSON: {error}"),
        )
    })?;
    if let Err(error) = state.schemas.check(kind, &value) {
        state.count(|c| c.invalid += 1);
        state.invalid(format!("{kind:?} body does not validate: {error}"));
        return Err(invalid(&format!("{kind:?} is invalid: {error}")));
    }
    Ok(value)
}

fn invalid(message: &str) -> Response {
    status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
}

/// What the schema cannot say: the checks the API server's validation makes on the fields a
/// pod backend sets.
fn check_metadata(object: &Value, namespace: &str) -> Result<(), String> {
    let metadata = &object["metadata"];
    let name = metadata["name"].as_str();
    let generate = metadata["generateName"].as_str();
    match (name, generate) {
        (None, None) => {
            return Err("metadata.name: Required value: name or generateName is required".into())
        }
        (Some(name), _) if !is_dns_label(name) => {
            return Err(format!("metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"));
        }
        _ => {}
    }
    if let Some(ns) = metadata["namespace"].as_str() {
        if ns != namespace {
            return Err(format!("metadata.namespace: Invalid value: \"{ns}\": does not match the namespace of the request, \"{namespace}\""));
        }
    }
    for (key, value) in metadata["labels"].as_object().into_iter().flatten() {
        let value = value.as_str().unwrap_or_default();
        let name = key.rsplit('/').next().unwrap_or(key);
        if !is_label_value(name) || name.is_empty() {
            return Err(format!("metadata.labels: Invalid value: \"{key}\": name part must be 63 characters or less, alphanumeric, '-', '_' or '.'"));
        }
        if !value.is_empty() && !is_label_value(value) {
            return Err(format!("metadata.labels: Invalid value: \"{value}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (63 characters at most)"));
        }
    }
    for owner in metadata["ownerReferences"].as_array().into_iter().flatten() {
        if owner["uid"].as_str().is_none_or(str::is_empty) {
            return Err(
                "metadata.ownerReferences.uid: Invalid value: \"\": uid must not be empty".into(),
            );
        }
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// The checks on a container's resources that the schema cannot make: extended resources
/// (GPUs) are whole numbers, and a request of one equals its limit.
fn check_resources(pod: &Value) -> Result<(), String> {
    for container in pod["spec"]["containers"].as_array().into_iter().flatten() {
        let resources = &container["resources"];
        for (name, limit) in resources["limits"].as_object().into_iter().flatten() {
            if name.contains('/') && !name.starts_with("kubernetes.io/") {
                let whole = match limit {
                    Value::String(s) => s.parse::<u64>().is_ok(),
                    Value::Number(n) => n.is_u64(),
                    _ => false,
                };
                if !whole {
                    return Err(format!("spec.containers[0].resources.limits[{name}]: Invalid value: {limit}: must be an integer"));
                }
                if let Some(request) = resources["requests"].get(name) {
                    if request != limit {
                        return Err(format!("spec.containers[0].resources.requests[{name}]: Invalid value: {request}: must be equal to {name} limit of {limit}"));
                    }
                }
            }
        }
    }
    Ok(())
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

async fn list_pods(
    Extract(state): Shared,
    Path(namespace): Path<String>,
    Query(query): Pairs,
    headers: HeaderMap,
) -> Response {
    let watching = param(&query, "watch").is_some_and(|w| w == "true" || w == "1");
    let verb = if watching { "watch" } else { "list" };
    if let Err(refusal) = gate(&state, &headers, verb, "pods", &namespace) {
        return refusal;
    }
    check_params(&state, "list pods", &query, LIST_PARAMS);
    let (labels, fields) = match selectors(&query) {
        Ok(selectors) => selectors,
        Err(refusal) => return refusal,
    };
    if state.faults.lock().pod_watches_down {
        state.count(|c| c.server_errors += 1);
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: etcdserver: leader changed",
        );
    }
    if watching {
        return watch(&state, namespace, &query, labels, fields);
    }
    state.count(|c| c.pod_lists += 1);
    // Pages as the API server gives them: at most `limit` items, then a `continue` token (here
    // the last name given) from which the next page starts.
    let limit = param(&query, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let after = param(&query, "continue").unwrap_or_default().to_owned();
    let store = state.store.lock();
    let mut matching = store.pods.iter().filter(|((ns, name), pod)| {
        *ns == namespace
            && (after.is_empty() || *name > after)
            && labels.matches(&pod.object)
            && fields.matches(&pod.object)
    });
    let page: Vec<(&String, Value)> = matching
        .by_ref()
        .take(limit)
        .map(|((_, name), pod)| (name, pod.object.clone()))
        .collect();
    let more = matching.next().is_some();
    let mut metadata = json!({"resourceVersion": store.resource_version.to_string()});
    if let (true, Some((last, _))) = (more, page.last()) {
        metadata["continue"] = json!(last);
    }
    let items: Vec<Value> = page.into_iter().map(|(_, object)| object).collect();
    state.count(|c| c.pages_beyond_first += usize::from(!after.is_empty()));
    let list = json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": metadata,
        "items": items,
    });
    drop(store);
    if wants_table(&headers) {
        return reply(StatusCode::OK, &table(&list));
    }
    reply(StatusCode::OK, &list)
}

fn selectors(query: &[(String, String)]) -> Result<(Selector, FieldSelector), Response> {
    let labels = Selector::parse(param(query, "labelSelector").unwrap_or_default())
        .map_err(|e| status(StatusCode::BAD_REQUEST, "BadRequest", &e))?;
    let fields = FieldSelector::parse(param(query, "fieldSelector").unwrap_or_default())
        .map_err(|e| status(StatusCode::BAD_REQUEST, "BadRequest", &e))?;
    Ok((labels, fields))
}

/// Whether the client asks for a `Table`, as `kubectl get` does.
fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=Table"))
}

/// A pod list as the `Table` that `kubectl get pods` prints.
fn table(list: &Value) -> Value {
    let rows: Vec<Value> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|pod| {
            let container = &pod["status"]["containerStatuses"][0];
            let ready = usize::from(container["ready"] == true);
            let shown = container["state"]["waiting"]["reason"]
                .as_str()
                .or_else(|| container["state"]["terminated"]["reason"].as_str())
                .or_else(|| pod["status"]["phase"].as_str())
                .unwrap_or("Unknown");
            json!({
                "cells": [pod["metadata"]["name"], format!("{ready}/1"), shown, container["restartCount"].as_i64().unwrap_or(0), pod["metadata"]["creationTimestamp"]],
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": pod["metadata"]},
            })
        })
        .collect();
    let column = |name: &str, kind: &str| json!({"name": name, "type": kind, "format": "", "description": "", "priority": 0});
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": list["metadata"]["resourceVersion"]},
        "columnDefinitions": [column("Name", "string"), column("Ready", "string"), column("Status", "string"), column("Restarts", "integer"), column("Age", "string")],
        "rows": rows,
    })
}

/// A watch: the events after `resourceVersion` (every object as `ADDED` when it is absent or
/// 0), then live ones, as JSON lines, until the timeout, a [`drop_watches`], or the client
/// goes. `410 Gone` when the history no longer reaches back that far.
///
/// [`drop_watches`]: super::FakeKube::drop_watches
fn watch(
    state: &Arc<State>,
    namespace: String,
    query: &[(String, String)],
    labels: Selector,
    fields: FieldSelector,
) -> Response {
    state.count(|c| c.watches += 1);
    let since = param(query, "resourceVersion").unwrap_or_default();
    let timeout = param(query, "timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let matches = move |namespace_of: &str, object: &Value| {
        namespace_of == namespace && labels.matches(object) && fields.matches(object)
    };
    let (tx, rx) = mpsc::channel::<Bytes>(store::EVENT_BUFFER);
    let line = |kind: &str, object: &Value| {
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("JSON");
        line.push(b'\n');
        Bytes::from(line)
    };
    let mut first = Vec::new();
    let (mut live, mut last) = {
        let store = state.store.lock();
        let live = state.events.subscribe();
        match since {
            "" | "0" => {
                for ((ns, _), pod) in &store.pods {
                    if matches(ns, &pod.object) {
                        first.push(line("ADDED", &pod.object));
                    }
                }
            }
            since => {
                let Ok(since) = since.parse::<u64>() else {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("invalid resourceVersion \"{since}\""),
                    );
                };
                if since < store.oldest {
                    state.count(|c| c.watches_expired += 1);
                    let gone = status_body(
                        StatusCode::GONE,
                        "Expired",
                        &format!("too old resource version: {since} ({})", store.oldest + 1),
                    );
                    first.push(line("ERROR", &gone));
                    let body = Body::from_stream(futures_util::stream::iter(
                        first.into_iter().map(Ok::<_, Infallible>),
                    ));
                    return (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                        .into_response();
                }
                for event in store.history.iter().filter(|e| e.resource_version > since) {
                    if matches(&event.namespace, &event.object) {
                        first.push(line(event.kind, &event.object));
                    }
                }
            }
        }
        (live, store.resource_version)
    };
    let mut ended = state.watch_generation.subscribe();
    tokio::spawn(async move {
        for item in first {
            if tx.send(item).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                event = live.recv() => {
                    // Lagging behind ends the watch; the client watches again.
                    let Ok(event) = event else { return };
                    if event.resource_version <= last || !matches(&event.namespace, &event.object) {
                        continue;
                    }
                    last = event.resource_version;
                    if tx.send(line(event.kind, &event.object)).await.is_err() {
                        return;
                    }
                }
                _ = ended.changed() => return,
                () = &mut deadline => return,
                () = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(bytes), rx))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn create_pod(
    Extract(state): Shared,
    Path(namespace): Path<String>,
    Query(query): Pairs,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = gate(&state, &headers, "create", "pods", &namespace) {
        return refusal;
    }
    check_params(&state, "create pod", &query, WRITE_PARAMS);
    let mut pod = match parse_body(&state, Kind::Pod, &body) {
        Ok(pod) => pod,
        Err(refusal) => return refusal,
    };
    if let Err(message) = check_metadata(&pod, &namespace).and_then(|()| check_resources(&pod)) {
        state.count(|c| c.invalid += 1);
        state.invalid(format!("pod: {message}"));
        return invalid(&format!("Pod is invalid: {message}"));
    }
    let (control, rx) = mpsc::unbounded_channel();
    let (name, object) = {
        let mut store = state.store.lock();
        let name = match pod["metadata"]["name"].as_str() {
            Some(name) => name.to_owned(),
            None => {
                let prefix = pod["metadata"]["generateName"].as_str().unwrap_or_default();
                format!(
                    "{prefix}{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..5]
                )
            }
        };
        let key = (namespace.clone(), name.clone());
        if store.pods.contains_key(&key) {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("pods \"{name}\" already exists"),
            );
        }
        let version = store.next_version();
        store::stamp(&mut pod, &namespace, &name, version);
        pod["apiVersion"] = json!("v1");
        pod["kind"] = json!("Pod");
        pod["status"] = json!({"phase": "Pending"});
        if let Err(error) = state.schemas.check(Kind::Pod, &pod) {
            state.invalid(format!("the fake's own pod {name} is invalid: {error}"));
        }
        let absent_owner = store::has_absent_owner(&store, &pod);
        store.pods.insert(
            key,
            Pod {
                object: pod.clone(),
                control: Some(control),
                pid: None,
                gpus: Vec::new(),
            },
        );
        store.publish(&state, "ADDED", &namespace, pod.clone());
        state.count(|c| c.pods_created += 1);
        if absent_owner {
            let (state, namespace, name) = (Arc::clone(&state), namespace.clone(), name.clone());
            tokio::spawn(async move {
                tracing::info!(pod = %name, "garbage collecting a pod created with an absent owner");
                state.count(|c| c.pods_collected += 1);
                store::delete_pod(&state, &namespace, &name, None);
            });
        }
        (name, pod)
    };
    tokio::spawn(kubelet::run(Arc::clone(&state), namespace, name, rx));
    reply(StatusCode::CREATED, &object)
}

async fn get_pod(
    Extract(state): Shared,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = gate(&state, &headers, "get", "pods", &namespace) {
        return refusal;
    }
    check_params(&state, "get pod", &query, GET_PARAMS);
    let store = state.store.lock();
    match store.pods.get(&(namespace, name.clone())) {
        Some(pod) => reply(StatusCode::OK, &pod.object),
        None => not_found("pods", &name),
    }
}

fn not_found(resource: &str, name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
    )
}

/// The grace period a delete asks for: its `DeleteOptions` body, else its query.
fn delete_grace(
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

async fn delete_pod(
    Extract(state): Shared,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = gate(&state, &headers, "delete", "pods", &namespace) {
        return refusal;
    }
    check_params(&state, "delete pod", &query, DELETE_PARAMS);
    let grace = match delete_grace(&state, &query, &body) {
        Ok(grace) => grace,
        Err(refusal) => return refusal,
    };
    match store::delete_pod(&state, &namespace, &name, grace) {
        Some(object) => reply(StatusCode::OK, &object),
        None => not_found("pods", &name),
    }
}

async fn create_secret(
    Extract(state): Shared,
    Path(namespace): Path<String>,
    Query(query): Pairs,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = gate(&state, &headers, "create", "secrets", &namespace) {
        return refusal;
    }
    check_params(&state, "create secret", &query, WRITE_PARAMS);
    let mut secret = match parse_body(&state, Kind::Secret, &body) {
        Ok(secret) => secret,
        Err(refusal) => return refusal,
    };
    let mut problem = check_metadata(&secret, &namespace).err();
    for (key, value) in secret["data"].as_object().into_iter().flatten() {
        let decodes = value
            .as_str()
            .is_some_and(|v| base64::engine::general_purpose::STANDARD.decode(v).is_ok());
        if !decodes {
            problem.get_or_insert(format!("data[{key}]: Invalid value: not base64"));
        }
    }
    if let Some(message) = problem {
        state.count(|c| c.invalid += 1);
        state.invalid(format!("secret: {message}"));
        return invalid(&format!("Secret is invalid: {message}"));
    }
    let mut store = state.store.lock();
    let Some(name) = secret["metadata"]["name"].as_str().map(str::to_owned) else {
        return invalid("Secret is invalid: metadata.name: Required value");
    };
    let key = (namespace.clone(), name.clone());
    if store.secrets.contains_key(&key) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("secrets \"{name}\" already exists"),
        );
    }
    let version = store.next_version();
    store::stamp(&mut secret, &namespace, &name, version);
    secret["apiVersion"] = json!("v1");
    secret["kind"] = json!("Secret");
    if store::has_absent_owner(&store, &secret) {
        // The collector deletes a dependent whose owner does not exist; here, before anyone
        // could read it.
        state.count(|c| {
            c.secrets_created += 1;
            c.secrets_deleted += 1;
        });
        return reply(StatusCode::CREATED, &secret);
    }
    store.secrets.insert(key, secret.clone());
    state.count(|c| c.secrets_created += 1);
    reply(StatusCode::CREATED, &secret)
}

async fn get_secret(
    Extract(state): Shared,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = gate(&state, &headers, "get", "secrets", &namespace) {
        return refusal;
    }
    check_params(&state, "get secret", &query, GET_PARAMS);
    let store = state.store.lock();
    match store.secrets.get(&(namespace, name.clone())) {
        Some(secret) => reply(StatusCode::OK, secret),
        None => not_found("secrets", &name),
    }
}

async fn list_secrets(
    Extract(state): Shared,
    Path(namespace): Path<String>,
    Query(query): Pairs,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = gate(&state, &headers, "list", "secrets", &namespace) {
        return refusal;
    }
    check_params(&state, "list secrets", &query, LIST_PARAMS);
    let (labels, fields) = match selectors(&query) {
        Ok(selectors) => selectors,
        Err(refusal) => return refusal,
    };
    let store = state.store.lock();
    let items: Vec<&Value> = store
        .secrets
        .iter()
        .filter(|((ns, _), s)| *ns == namespace && labels.matches(s) && fields.matches(s))
        .map(|(_, s)| s)
        .collect();
    reply(
        StatusCode::OK,
        &json!({
            "kind": "SecretList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": store.resource_version.to_string()},
            "items": items,
        }),
    )
}

async fn delete_secret(
    Extract(state): Shared,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = gate(&state, &headers, "delete", "secrets", &namespace) {
        return refusal;
    }
    check_params(&state, "delete secret", &query, DELETE_PARAMS);
    if let Err(refusal) = delete_grace(&state, &query, &body) {
        return refusal;
    }
    let removed = state
        .store
        .lock()
        .secrets
        .remove(&(namespace, name.clone()));
    match removed {
        Some(secret) => {
            state.count(|c| c.secrets_deleted += 1);
            reply(StatusCode::OK, &secret)
        }
        None => not_found("secrets", &name),
    }
}
