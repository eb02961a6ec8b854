//! What the schemas cannot say: the checks the API server's validation makes on the fields a
//! pod backend sets, and the parsing of a body against its schema.

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;

use super::status;
use crate::schema::Kind;
use crate::State;

/// Parses and validates a body as `kind`; a refusal is a 400 (not JSON) or a 422 (invalid),
/// recorded either way.
pub(super) fn parse_body(state: &State, kind: Kind, body: &[u8]) -> Result<Value, Response> {
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

pub(super) fn invalid(message: &str) -> Response {
    status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
}

/// What the schema cannot say: the checks the API server's validation makes on the fields a
/// pod backend sets.
pub(super) fn check_metadata(object: &Value, namespace: &str) -> Result<(), String> {
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
pub(super) fn check_resources(pod: &Value) -> Result<(), String> {
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
