//! Lists of pods as `kubectl` reads them (a `Table`), selectors, and the watch: the events
//! after a `resourceVersion`, then live ones.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{param, status, status_body};
use crate::store::{self, FieldSelector, Selector};
use crate::State;

/// How long a watch lasts when the request does not say, as the API server's default
/// `--min-request-timeout` (1800 s) does.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

pub(super) fn selectors(query: &[(String, String)]) -> Result<(Selector, FieldSelector), Response> {
    let labels = Selector::parse(param(query, "labelSelector").unwrap_or_default())
        .map_err(|e| status(StatusCode::BAD_REQUEST, "BadRequest", &e))?;
    let fields = FieldSelector::parse(param(query, "fieldSelector").unwrap_or_default())
        .map_err(|e| status(StatusCode::BAD_REQUEST, "BadRequest", &e))?;
    Ok((labels, fields))
}

/// Whether the client asks for a `Table`, as `kubectl get` does.
pub(super) fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=Table"))
}

/// A pod list as the `Table` that `kubectl get pods` prints.
pub(super) fn table(list: &Value) -> Value {
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
pub(super) fn watch(
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
