//! The HTTP side of the fake: routes, authentication, validation and faults, answering as the
//! Machines API does.

// Handlers answer early with a whole `Response`, as axum handlers do.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State as Extract};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::spec;
use super::vm::{self, Control, FakeMachine, Lease, Stop};
use super::State;

type Shared = Extract<Arc<State>>;
type Pairs = Query<Vec<(String, String)>>;

/// How long a machine may take to stop after a signal when its config does not say.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The header a lease's holder sends its nonce in.
const LEASE_NONCE: &str = "fly-machine-lease-nonce";

/// How long a lease lasts when the request names no `ttl`, in seconds.
const DEFAULT_LEASE_TTL: u64 = 30;

/// The most memory a machine may have and still be suspended, by Fly's docs.
const MAX_SUSPEND_MEMORY_MB: u64 = 2048;

pub(crate) fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/v1/apps/{app}/machines", get(list).post(create))
        .route("/v1/apps/{app}/machines/{id}", get(show).delete(destroy))
        .route("/v1/apps/{app}/machines/{id}/wait", get(wait))
        .route(
            "/v1/apps/{app}/machines/{id}/stop",
            axum::routing::post(stop),
        )
        .route(
            "/v1/apps/{app}/machines/{id}/start",
            axum::routing::post(start),
        )
        .route(
            "/v1/apps/{app}/machines/{id}/suspend",
            axum::routing::post(suspend),
        )
        .route(
            "/v1/apps/{app}/machines/{id}/lease",
            axum::routing::post(lease).delete(release),
        )
        .route(
            "/v1/apps/{app}/machines/{id}/metadata/{key}",
            axum::routing::post(set_metadata),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not found", None) })
        .with_state(state)
}

fn reply(status: StatusCode, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    let id = uuid::Uuid::new_v4().simple().to_string();
    response.headers_mut().insert(
        "fly-request-id",
        HeaderValue::from_str(&format!("01{}", &id[..24].to_ascii_uppercase())).expect("ascii"),
    );
    response
}

fn error(status: StatusCode, message: &str, fly_status: Option<&str>) -> Response {
    let mut body = json!({ "error": message });
    if let Some(fly_status) = fly_status {
        body["status"] = fly_status.into();
    }
    reply(status, body)
}

fn invalid(state: &State, status: StatusCode, message: String) -> Response {
    tracing::warn!(%message, "fake Fly API refused an invalid request");
    state.count(|c| c.invalid += 1);
    state.errors.lock().push(message.clone());
    error(status, &message, Some("unknown"))
}

/// Authentication, the app, armed 429s and the query: what every request passes first.
fn admit(
    state: &State,
    headers: &HeaderMap,
    app: &str,
    operation: (&'static str, &'static str),
    query: &[(String, String)],
) -> Result<(), Response> {
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let (scheme, token) = authorization.split_once(' ').unwrap_or(("", ""));
    state.authorization_schemes.lock().push(scheme.to_owned());
    let accepted = state.token.lock().clone();
    let expected = accepted
        .split_once(' ')
        .map_or(accepted.as_str(), |(_, t)| t);
    if !matches!(scheme, "Bearer" | "FlyV1") || token != expected {
        state.count(|c| c.unauthorized += 1);
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "Authenticate: token validation error",
            None,
        ));
    }
    if app != state.app {
        return Err(error(StatusCode::NOT_FOUND, "app not found", None));
    }
    {
        let mut faults = state.faults.lock();
        if faults.rate_limit > 0 {
            faults.rate_limit -= 1;
            let retry_after = faults.retry_after;
            drop(faults);
            return Err(rate_limited(state, retry_after));
        }
    }
    state
        .spec
        .check_query(operation, query)
        .map_err(|e| invalid(state, StatusCode::BAD_REQUEST, e))
}

fn rate_limited(state: &State, retry_after: Option<Duration>) -> Response {
    state.count(|c| c.rate_limited += 1);
    let mut response = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded", None);
    if let Some(after) = retry_after {
        response.headers_mut().insert(
            "retry-after",
            HeaderValue::from_str(&after.as_secs().to_string()).expect("digits"),
        );
    }
    response
}

/// The body as JSON, checked against the named schema of the spec; a 400 if it is not.
/// [`checked_body`] for an optional body: an empty one means `{}`.
fn checked_optional_body(state: &State, body: &[u8], schema: &str) -> Result<Value, Response> {
    checked_body(state, if body.is_empty() { b"{}" } else { body }, schema)
}

fn checked_body(state: &State, body: &[u8], schema: &str) -> Result<Value, Response> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(state, StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))?;
    state
        .spec
        .check_body(schema, &body)
        .map_err(|e| invalid(state, StatusCode::BAD_REQUEST, e))?;
    Ok(body)
}

macro_rules! admit {
    ($state:expr, $headers:expr, $app:expr, $operation:expr, $query:expr) => {
        if let Err(response) = admit(&$state, &$headers, &$app, $operation, &$query) {
            return response;
        }
    };
}

async fn create(
    Extract(state): Shared,
    Path(app): Path<String>,
    Query(query): Pairs,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.create_times.lock().push(Instant::now());
    state.count(|c| c.create_requests += 1);
    admit!(state, headers, app, spec::CREATE, query);
    if let Some(limiter) = &state.create_limiter {
        if limiter.check().is_err() {
            return rate_limited(&state, None);
        }
    }
    let body = match checked_body(&state, &body, "CreateMachineRequest") {
        Ok(body) => body,
        Err(response) => return response,
    };
    let config = body["config"].clone();
    let region = body["region"]
        .as_str()
        .unwrap_or(&state.regions[0])
        .to_owned();
    if let Err(response) = check_create(&state, &body, &config, &region) {
        return response;
    }
    let (ambiguous, delay, hidden) = {
        let mut faults = state.faults.lock();
        let ambiguous = faults.ambiguous_creates > 0;
        if ambiguous {
            faults.ambiguous_creates -= 1;
        }
        (ambiguous, faults.slow_create, faults.hidden_lookups)
    };
    let name = body["name"].as_str().map(str::to_owned);
    let mut machine = FakeMachine::new(&state, String::new(), region, config, hidden);
    machine.name = name.unwrap_or_else(|| format!("machine-{}", machine.id));
    let id = machine.id.clone();
    state.machines.lock().insert(id.clone(), machine);
    state.count(|c| c.created += 1);
    // The image pull and the cold boot.
    let latency = state.latency.lock().create;
    tokio::time::sleep(latency).await;
    boot(&state, &id);
    // The machine exists from here on, whether or not the client hears of it.
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    if ambiguous {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream request timed out",
            None,
        );
    }
    let machine = state.machines.lock().get(&id).map(FakeMachine::json);
    reply(StatusCode::OK, machine.unwrap_or(Value::Null))
}

/// What Fly refuses about a create beyond the schema.
fn check_create(state: &State, body: &Value, config: &Value, region: &str) -> Result<(), Response> {
    let unprocessable =
        |message: String| Err(invalid(state, StatusCode::UNPROCESSABLE_ENTITY, message));
    let Some(image) = config["image"].as_str() else {
        return unprocessable("config.image is required".into());
    };
    if !state.images.contains_key(image) {
        return unprocessable(format!("failed to resolve image `{image}`: not found"));
    }
    if !state.regions.iter().any(|r| r == region) {
        return unprocessable(format!("region `{region}` not found"));
    }
    let guest = &config["guest"];
    if guest.get("gpus").is_some() && guest.get("gpu_kind").is_none() {
        return unprocessable("guest.gpus requires guest.gpu_kind".into());
    }
    if let Some(name) = body["name"].as_str() {
        let taken = state
            .machines
            .lock()
            .values()
            .any(|m| m.name == name && m.current() != "destroyed");
        if taken {
            return Err(error(
                StatusCode::CONFLICT,
                &format!("a machine named `{name}` already exists"),
                Some("name_taken"),
            ));
        }
    }
    let mut faults = state.faults.lock();
    if let Some((status, message, fly_status)) = faults.refusals.pop_front() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        return Err(error(status, &message, fly_status.as_deref()));
    }
    if faults.refuse_gpus && guest.get("gpu_kind").is_some() {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "GPU machines are no longer available: Fly.io GPUs were discontinued on 2026-08-01",
            Some("unknown"),
        ));
    }
    if faults.no_capacity.iter().any(|r| r == region) {
        return Err(error(
            StatusCode::PRECONDITION_FAILED,
            "insufficient resources available to fulfill request: could not reserve resource for machine",
            Some("insufficient_capacity"),
        ));
    }
    Ok(())
}

/// The machine, or the 404 Fly gives for an unknown one or one not visible yet.
fn lookup<T>(
    state: &State,
    id: &str,
    read: impl FnOnce(&mut FakeMachine) -> T,
) -> Result<T, Response> {
    let mut machines = state.machines.lock();
    match machines.get_mut(id) {
        Some(machine) if machine.hidden_lookups > 0 => {
            machine.hidden_lookups -= 1;
            Err(error(StatusCode::NOT_FOUND, "machine not found", None))
        }
        Some(machine) => Ok(read(machine)),
        None => Err(error(StatusCode::NOT_FOUND, "machine not found", None)),
    }
}

async fn show(
    Extract(state): Shared,
    Path((app, id)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
) -> Response {
    admit!(state, headers, app, spec::SHOW, query);
    match lookup(&state, &id, |m| m.json()) {
        Ok(machine) => reply(StatusCode::OK, machine),
        Err(response) => response,
    }
}

async fn list(
    Extract(state): Shared,
    Path(app): Path<String>,
    Query(query): Pairs,
    headers: HeaderMap,
) -> Response {
    admit!(state, headers, app, spec::LIST, query);
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let include_deleted = param("include_deleted") == Some("true");
    let states: Option<Vec<&str>> = param("state").map(|s| s.split(',').collect());
    let filters: Vec<(&str, &str)> = query
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("metadata.")?, v.as_str())))
        .collect();
    let machines: Vec<Value> = state
        .machines
        .lock()
        .values()
        .filter(|m| include_deleted || m.current() != "destroyed")
        .filter(|m| states.as_ref().is_none_or(|s| s.contains(&m.current())))
        .filter(|m| filters.iter().all(|(k, v)| m.metadata(k) == Some(v)))
        .map(FakeMachine::json)
        .collect();
    reply(StatusCode::OK, Value::Array(machines))
}

async fn wait(
    Extract(state): Shared,
    Path((app, id)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
) -> Response {
    admit!(state, headers, app, spec::WAIT, query);
    let mut wanted: Vec<String> = query
        .iter()
        .filter(|(k, _)| k == "state")
        .flat_map(|(_, v)| v.split(',').map(str::to_owned))
        .collect();
    if wanted.is_empty() {
        wanted.push("started".into());
    }
    let timeout = query
        .iter()
        .find(|(k, _)| k == "timeout")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .unwrap_or(60)
        .min(60);
    let version = query
        .iter()
        .find(|(k, _)| k == "version" || k == "instance_id")
        .map(|(_, v)| v.clone());
    let found = lookup(&state, &id, |m| {
        (m.instance_id.clone(), m.state.subscribe())
    });
    let (instance_id, mut states) = match found {
        Ok(found) => found,
        Err(response) => return response,
    };
    if version.is_some_and(|v| v != instance_id) {
        return invalid(
            &state,
            StatusCode::BAD_REQUEST,
            "machine version mismatch".into(),
        );
    }
    let reached = tokio::time::timeout(
        Duration::from_secs(timeout),
        states.wait_for(|s| wanted.iter().any(|w| w == s)),
    )
    .await;
    match reached {
        Ok(Ok(reached)) => reply(
            StatusCode::OK,
            json!({ "ok": true, "state": *reached, "version": instance_id }),
        ),
        _ => error(
            StatusCode::REQUEST_TIMEOUT,
            &format!(
                "deadline_exceeded: timeout waiting for machine to be {}",
                wanted.join(",")
            ),
            None,
        ),
    }
}

async fn destroy(
    Extract(state): Shared,
    Path((app, id)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
) -> Response {
    admit!(state, headers, app, spec::DELETE, query);
    let force = query.iter().any(|(k, v)| k == "force" && v == "true");
    let mut machines = state.machines.lock();
    let Some(machine) = machines.get_mut(&id).filter(|m| m.current() != "destroyed") else {
        return error(StatusCode::NOT_FOUND, "machine not found", None);
    };
    if matches!(machine.current(), "started" | "stopping" | "destroying") && !force {
        return error(
            StatusCode::PRECONDITION_FAILED,
            "failed to destroy VM: unable to destroy machine, not currently stopped",
            None,
        );
    }
    // A running or frozen (suspended) process is killed; the machine is destroyed once it
    // has exited.
    machine.destroy_requested = true;
    if machine.send_stop(Stop::Kill) {
        machine.state.send_replace("destroying");
        return reply(StatusCode::OK, json!({ "ok": true }));
    }
    machine.state.send_replace("destroyed");
    drop(machines);
    state.count(|c| c.destroyed += 1);
    reply(StatusCode::OK, json!({ "ok": true }))
}

async fn stop(
    Extract(state): Shared,
    Path((app, id)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    admit!(state, headers, app, spec::STOP, query);
    let body = match checked_optional_body(&state, &body, "StopRequest") {
        Ok(body) => body,
        Err(response) => return response,
    };
    let stopped = lookup_leased(&state, &id, &headers, |machine| {
        if matches!(machine.current(), "suspended" | "suspending") {
            // Stopping a suspended machine discards its snapshot.
            if machine.send_stop(Stop::Kill) {
                machine.state.send_replace("stopping");
            }
            return Ok(());
        }
        let configured = &machine.config["stop_config"];
        let signal = body["signal"]
            .as_str()
            .or(configured["signal"].as_str())
            .unwrap_or("SIGINT");
        let timeout = body["timeout"]
            .as_str()
            .or(configured["timeout"].as_str())
            .and_then(parse_seconds)
            .unwrap_or(DEFAULT_STOP_TIMEOUT);
        let sent = machine.send_stop(Stop::Signal(signal_number(signal), timeout));
        if sent {
            machine.state.send_replace("stopping");
        }
        Ok(())
    });
    match stopped {
        Ok(()) => reply(StatusCode::OK, json!({ "ok": true })),
        Err(response) => response,
    }
}

/// [`lookup`] for a change to the machine: refused while someone else holds its lease.
fn lookup_leased<T>(
    state: &State,
    id: &str,
    headers: &HeaderMap,
    change: impl FnOnce(&mut FakeMachine) -> Result<T, Response>,
) -> Result<T, Response> {
    lookup(state, id, |machine| {
        match machine.current() {
            "destroyed" => return Err(error(StatusCode::NOT_FOUND, "machine not found", None)),
            "destroying" => {
                return Err(error(
                    StatusCode::PRECONDITION_FAILED,
                    &format!("machine {} is being destroyed", machine.id),
                    None,
                ))
            }
            _ => {}
        }
        leased_by_other(machine, headers)?;
        change(machine)
    })?
}

/// Refuses a change to a machine that someone else holds a lease on: the holder sends its
/// nonce, anyone else is told the machine is leased.
fn leased_by_other(machine: &FakeMachine, headers: &HeaderMap) -> Result<(), Response> {
    let Some(lease) = machine.live_lease() else {
        return Ok(());
    };
    let sent = headers.get(LEASE_NONCE).and_then(|v| v.to_str().ok());
    if sent == Some(lease.nonce.as_str()) {
        Ok(())
    } else {
        Err(error(
            StatusCode::CONFLICT,
            &format!(
                "machine {} is leased by another: send its lease nonce",
                machine.id
            ),
            None,
        ))
    }
}

/// `POST .../metadata/{key}`: sets one key of the machine's metadata (its `config.metadata`, as
/// Fly keeps it), refused while someone else holds the machine's lease.
async fn set_metadata(
    Extract(state): Shared,
    Path((app, id, key)): Path<(String, String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    admit!(state, headers, app, spec::SET_METADATA, query);
    let body = match checked_body(&state, &body, "upsertMetadataKeyRequest") {
        Ok(body) => body,
        Err(response) => return response,
    };
    let Some(value) = body["value"].as_str().map(str::to_owned) else {
        return invalid(&state, StatusCode::BAD_REQUEST, "no metadata value".into());
    };
    let set = lookup_leased(&state, &id, &headers, |machine| {
        if !machine.config["metadata"].is_object() {
            machine.config["metadata"] = json!({});
        }
        machine.config["metadata"][key.as_str()] = Value::String(value);
        Ok(())
    });
    if let Err(response) = set {
        return response;
    }
    state.count(|c| c.metadata_updates += 1);
    StatusCode::NO_CONTENT.into_response()
}

/// Starts (or restarts) machine `id`'s process, with its machine-local API served.
fn boot(state: &Arc<State>, id: &str) {
    let local_api = match machine_local_api(state, id) {
        Ok(socket) => Some(socket),
        Err(error) => {
            tracing::warn!(machine = id, %error, "no machine-local API socket");
            None
        }
    };
    vm::boot(state, id, local_api.as_deref());
}

/// The machine-local API socket of machine `id`, served from its first boot on.
fn machine_local_api(state: &Arc<State>, id: &str) -> std::io::Result<std::path::PathBuf> {
    let path = state.socket_dir.join(id);
    if path.exists() {
        return Ok(path);
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    let router = machine_local_router(Arc::clone(state), id.to_owned());
    let serving = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    state.local_apis.lock().push(serving);
    Ok(path)
}

/// The machine-local API of machine `id`, as Fly serves it on `/.fly/api` inside the machine:
/// no token, and only that machine's own metadata.
fn machine_local_router(state: Arc<State>, id: String) -> Router {
    Router::new()
        .route(
            "/v1/apps/{app}/machines/{machine}/metadata/{key}",
            get(
                move |Extract(state): Shared,
                      Path((app, machine, key)): Path<(String, String, String)>| async move {
                    if app != state.app || machine != id {
                        return error(StatusCode::FORBIDDEN, "not this machine", None);
                    }
                    let value = lookup(&state, &machine, |m| m.metadata(&key).map(str::to_owned));
                    match value {
                        Ok(Some(value)) => reply(StatusCode::OK, json!({ "value": value })),
                        Ok(None) => error(StatusCode::NOT_FOUND, "metadata key not found", None),
                        Err(response) => response,
                    }
                },
            ),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not found", None) })
        .with_state(state)
}

/// `start`: runs a stopped machine's process again from its config, or resumes a suspended one
/// from where it was frozen.
async fn start(
    Extract(state): Shared,
    Path((app, id)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
) -> Response {
    admit!(state, headers, app, spec::START, query);
    let checked =
        lookup_leased(&state, &id, &headers, |machine| match machine.current() {
            previous @ ("stopped" | "created" | "suspended" | "suspending" | "started"
            | "starting") => Ok(previous),
            other => Err(error(
                StatusCode::PRECONDITION_FAILED,
                &format!("machine {} is {other}: it cannot be started", machine.id),
                None,
            )),
        });
    let previous = match checked {
        Ok(previous) => previous,
        Err(response) => return response,
    };
    let latency = *state.latency.lock();
    match previous {
        "stopped" | "created" => {
            tokio::time::sleep(latency.start).await;
            boot(&state, &id);
        }
        "suspended" | "suspending" => {
            tokio::time::sleep(latency.resume).await;
            let stall = take_fault(&mut state.faults.lock().stall_resumes);
            let resumed = lookup(&state, &id, |machine| {
                if matches!(machine.current(), "suspended" | "suspending") {
                    if !stall {
                        machine.send_control(Control::Resume);
                    }
                    machine.record("start", "started");
                    machine.state.send_replace("started");
                }
            });
            if let Err(response) = resumed {
                return response;
            }
        }
        _ => {}
    }
    state.count(|c| c.starts += 1);
    reply(
        StatusCode::OK,
        json!({ "ok": true, "previous_state": previous }),
    )
}

/// `suspend`: freezes the machine's process, as Fly snapshots its memory. Refused, as Fly
/// refuses it, for a machine with more than 2 GB of memory, with swap, or with a GPU.
async fn suspend(
    Extract(state): Shared,
    Path((app, id)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
) -> Response {
    admit!(state, headers, app, spec::SUSPEND, query);
    let suspended = lookup_leased(&state, &id, &headers, |machine| {
        let guest = &machine.config["guest"];
        let memory = guest["memory_mb"].as_u64().unwrap_or(256);
        let refused = take_fault(&mut state.faults.lock().refuse_suspends);
        let why_not = if refused {
            Some("this machine: its snapshot failed".to_owned())
        } else if memory > MAX_SUSPEND_MEMORY_MB {
            Some(format!(
                "{memory} MB of memory is more than {MAX_SUSPEND_MEMORY_MB} MB"
            ))
        } else if guest["gpus"].as_u64().unwrap_or(0) > 0 || guest["gpu_kind"].is_string() {
            Some("a machine with a GPU".into())
        } else if machine.config["swap_size_mb"].as_u64().unwrap_or(0) > 0 {
            Some("a machine with swap".into())
        } else {
            None
        };
        if let Some(why) = why_not {
            return Err(error(
                StatusCode::BAD_REQUEST,
                &format!("cannot suspend {why}"),
                None,
            ));
        }
        if machine.current() != "started" || !machine.send_control(Control::Suspend) {
            return Err(error(
                StatusCode::PRECONDITION_FAILED,
                &format!(
                    "machine {} is {}: only a started machine suspends",
                    machine.id,
                    machine.current()
                ),
                None,
            ));
        }
        // The process freezes, then the machine reads `suspended`.
        machine.state.send_replace("suspending");
        Ok(())
    });
    match suspended {
        Ok(()) => {
            state.count(|c| c.suspends += 1);
            reply(StatusCode::OK, json!({ "ok": true }))
        }
        Err(response) => response,
    }
}

/// `POST .../lease`: takes the machine's lease, or renews it for its holder; 409 while someone
/// else holds it.
async fn lease(
    Extract(state): Shared,
    Path((app, id)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    admit!(state, headers, app, spec::LEASE, query);
    let body = match checked_optional_body(&state, &body, "CreateLeaseRequest") {
        Ok(body) => body,
        Err(response) => return response,
    };
    let leased = lookup_leased(&state, &id, &headers, |machine| {
        let ttl = body["ttl"].as_u64().unwrap_or(DEFAULT_LEASE_TTL);
        let lease = Lease {
            nonce: uuid::Uuid::new_v4().simple().to_string(),
            description: body["description"].as_str().unwrap_or_default().to_owned(),
            expires: Instant::now() + Duration::from_secs(ttl),
        };
        let expires_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + ttl;
        let data = json!({
            "nonce": lease.nonce,
            "expires_at": expires_at,
            "owner": "fake@firebrand.invalid",
            "description": lease.description,
            "version": machine.instance_id,
        });
        machine.lease = Some(lease);
        Ok(data)
    });
    match leased {
        Ok(data) => {
            state.count(|c| c.leases += 1);
            reply(
                StatusCode::CREATED,
                json!({ "status": "success", "data": data }),
            )
        }
        Err(response) => response,
    }
}

/// `DELETE .../lease`: its holder lets it go.
async fn release(
    Extract(state): Shared,
    Path((app, id)): Path<(String, String)>,
    Query(query): Pairs,
    headers: HeaderMap,
) -> Response {
    admit!(state, headers, app, spec::RELEASE, query);
    let released = lookup(&state, &id, |machine| {
        if machine.live_lease().is_none() {
            return Err(error(
                StatusCode::NOT_FOUND,
                "no lease on this machine",
                None,
            ));
        }
        leased_by_other(machine, &headers)?;
        machine.lease = None;
        Ok(())
    });
    match released.and_then(|outcome| outcome) {
        Ok(()) => reply(StatusCode::OK, json!({ "status": "success" })),
        Err(response) => response,
    }
}

/// Uses up one of a fault's armed requests: whether it applies to this one.
fn take_fault(armed: &mut u32) -> bool {
    let applies = *armed > 0;
    *armed = armed.saturating_sub(1);
    applies
}

fn parse_seconds(text: &str) -> Option<Duration> {
    text.strip_suffix('s')?
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

fn signal_number(name: &str) -> i32 {
    match name {
        "SIGHUP" => libc::SIGHUP,
        "SIGQUIT" => libc::SIGQUIT,
        "SIGKILL" => libc::SIGKILL,
        "SIGUSR1" => libc::SIGUSR1,
        "SIGUSR2" => libc::SIGUSR2,
        "SIGTERM" => libc::SIGTERM,
        _ => libc::SIGINT,
    }
}
