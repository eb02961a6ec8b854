//! The secret handlers: list, create and delete.

use axum::body::Bytes;
use axum::extract::{Path, Query, State as Extract};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use serde_json::{json, Value};

use super::validation::{check_metadata, invalid, parse_body};
use super::watch::selectors;
use super::{
    check_params, delete_grace, gate, not_found, reply, status, Pairs, Shared, DELETE_PARAMS,
    LIST_PARAMS, WRITE_PARAMS,
};
use crate::schema::Kind;
use crate::store;

pub(super) async fn create(
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

pub(super) async fn list(
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

pub(super) async fn delete(
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
