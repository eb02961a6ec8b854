//! The pod handlers: list (and watch), create (which starts the pod's kubelet) and delete.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State as Extract};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::validation::{check_metadata, check_resources, invalid, parse_body};
use super::watch::{selectors, table, wants_table, watch};
use super::{
    check_params, delete_grace, gate, not_found, param, reply, status, Pairs, Shared,
    DELETE_PARAMS, LIST_PARAMS, WRITE_PARAMS,
};
use crate::kubelet;
use crate::schema::Kind;
use crate::store::{self, Pod};

pub(super) async fn list(
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

pub(super) async fn create(
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

pub(super) async fn delete(
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
