//! The API server's objects: pods and secrets with resource versions, the event history that
//! watches replay, label selectors, deletion with a grace period, and garbage collection.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{labels_of, State, NODE_NAME, PARENT_SERVICE_ACCOUNT, POD_IP};

/// What a delete asks of a pod's kubelet.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Control {
    /// SIGTERM, then SIGKILL after `grace`; the pod is removed once its process ended.
    Terminate { grace: std::time::Duration },
    /// The pod is gone from the API already: SIGKILL, and report nothing.
    Kill,
}

/// Events kept for watches that start from an older `resourceVersion`.
const HISTORY: usize = 10_000;
/// Events buffered for each open watch before it is ended as too slow.
pub(crate) const EVENT_BUFFER: usize = 4096;

/// One change to a pod, as a watch sends it.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub resource_version: u64,
    pub namespace: String,
    pub kind: &'static str,
    pub object: Value,
}

/// A pod as a test sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PodView {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its phase: `Pending`, `Running`, `Succeeded` or `Failed`.
    pub phase: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The whole object, as a get would return it.
    pub object: Value,
    /// The pid of its container's process, while it has one.
    pub pid: Option<u32>,
    /// The GPUs the kubelet gave it, by index on the node.
    pub gpus: Vec<u32>,
}

pub(crate) struct Pod {
    pub object: Value,
    pub control: Option<mpsc::UnboundedSender<Control>>,
    pub pid: Option<u32>,
    pub gpus: Vec<u32>,
}

pub(crate) struct Store {
    pub namespace: String,
    pub parent: Option<String>,
    pub resource_version: u64,
    /// The oldest `resourceVersion` a watch may start after.
    pub oldest: u64,
    pub pods: BTreeMap<(String, String), Pod>,
    pub secrets: BTreeMap<(String, String), Value>,
    pub history: VecDeque<Event>,
    pub gpus_free: BTreeSet<u32>,
    pub gpus_total: u32,
}

impl Store {
    pub(crate) fn new(namespace: String, gpus: u32) -> Self {
        Self {
            namespace,
            parent: None,
            resource_version: 1,
            oldest: 0,
            pods: BTreeMap::new(),
            secrets: BTreeMap::new(),
            history: VecDeque::new(),
            gpus_free: (0..gpus).collect(),
            gpus_total: gpus,
        }
    }

    pub(crate) fn next_version(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    /// Records an event for watches: into the history, and to the open ones.
    pub(crate) fn publish(
        &mut self,
        state: &State,
        kind: &'static str,
        namespace: &str,
        object: Value,
    ) {
        let resource_version = object["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.resource_version);
        let event = Event {
            resource_version,
            namespace: namespace.to_owned(),
            kind,
            object,
        };
        if self.history.len() == HISTORY {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest = dropped.resource_version;
            }
        }
        self.history.push_back(event.clone());
        let _ = state.events.send(event);
    }

    /// Changes pod `name` with `change`, gives it a new `resourceVersion` and publishes the
    /// change. Returns the new object, or `None` when there is no such pod.
    pub(crate) fn update_pod(
        &mut self,
        state: &State,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        let version = self.next_version();
        let pod = self
            .pods
            .get_mut(&(namespace.to_owned(), name.to_owned()))?;
        change(&mut pod.object);
        pod.object["metadata"]["resourceVersion"] = json!(version.to_string());
        let object = pod.object.clone();
        if let Err(error) = state.schemas.check(super::schema::Kind::Pod, &object) {
            state.invalid(format!("the fake's own pod {name} is invalid: {error}"));
        }
        self.publish(state, "MODIFIED", namespace, object.clone());
        Some(object)
    }

    /// Forgets every event: a watch from any version seen so far is too old.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.oldest = self.next_version();
    }

    pub(crate) fn pod_views(&self) -> Vec<PodView> {
        self.pods
            .iter()
            .map(|((namespace, name), pod)| PodView {
                name: name.clone(),
                namespace: namespace.clone(),
                phase: pod.object["status"]["phase"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                labels: labels_of(&pod.object),
                object: pod.object.clone(),
                pid: pod.pid,
                gpus: pod.gpus.clone(),
            })
            .collect()
    }

    pub(crate) fn kill_all(&mut self) {
        for pod in self.pods.values() {
            if let Some(control) = &pod.control {
                let _ = control.send(Control::Kill);
            }
        }
    }

    fn uid_exists(&self, uid: &str) -> bool {
        self.pods
            .values()
            .any(|pod| pod.object["metadata"]["uid"] == uid)
    }
}

/// Stamps a new object's server-set metadata.
pub(crate) fn stamp(object: &mut Value, namespace: &str, name: &str, version: u64) {
    let metadata = &mut object["metadata"];
    metadata["name"] = json!(name);
    metadata["namespace"] = json!(namespace);
    metadata["uid"] = json!(uuid::Uuid::new_v4().to_string());
    metadata["resourceVersion"] = json!(version.to_string());
    metadata["creationTimestamp"] = json!(now());
}

/// The time now, as the API writes times.
pub(crate) fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Adds the pod that stands for the parent.
pub(crate) fn add_parent(state: &State, name: &str, image: &str, digest: &str) {
    let mut store = state.store.lock();
    let namespace = store.namespace.clone();
    let version = store.next_version();
    let mut object = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"labels": {"app": "firebrand-parent"}},
        "spec": {
            "containers": [{"name": "app", "image": image}],
            "serviceAccountName": PARENT_SERVICE_ACCOUNT,
            "nodeName": NODE_NAME,
            "restartPolicy": "Always",
        },
        "status": {
            "phase": "Running",
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "hostIP": POD_IP,
            "startTime": now(),
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True"},
            ],
            "containerStatuses": [{
                "name": "app",
                "image": image,
                "imageID": digest,
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": now()}},
            }],
        },
    });
    stamp(&mut object, &namespace, name, version);
    store.parent = Some(name.to_owned());
    store.pods.insert(
        (namespace.clone(), name.to_owned()),
        Pod {
            object: object.clone(),
            control: None,
            pid: None,
            gpus: Vec::new(),
        },
    );
    store.publish(state, "ADDED", &namespace, object);
}

/// Deletes a pod with `grace` seconds (the pod's own `terminationGracePeriodSeconds` when
/// `None`): at once when zero or when nothing runs, else after its process ends. Returns the
/// object as the delete answers it, or `None` when there was no such pod.
pub(crate) fn delete_pod(
    state: &Arc<State>,
    namespace: &str,
    name: &str,
    grace: Option<i64>,
) -> Option<Value> {
    let mut store = state.store.lock();
    let key = (namespace.to_owned(), name.to_owned());
    let pod = store.pods.get(&key)?;
    let grace = grace
        .or_else(|| pod.object["spec"]["terminationGracePeriodSeconds"].as_i64())
        .unwrap_or(30)
        .max(0);
    let running = pod.control.is_some() && pod.pid.is_some();
    if grace == 0 || !running {
        return Some(remove_pod(state, &mut store, namespace, name));
    }
    if pod.object["metadata"]["deletionTimestamp"].is_string() {
        return Some(pod.object.clone());
    }
    let control = pod.control.clone();
    let object = store.update_pod(state, namespace, name, |pod| {
        pod["metadata"]["deletionTimestamp"] = json!(now());
        pod["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
    });
    if let Some(control) = control {
        let _ = control.send(Control::Terminate {
            grace: std::time::Duration::from_secs(grace as u64),
        });
    }
    object
}

/// Removes a pod from the API at once (its process, if any, is killed), frees its GPUs, and
/// collects its dependents. Returns the object as it was last.
pub(crate) fn remove_pod(
    state: &Arc<State>,
    store: &mut Store,
    namespace: &str,
    name: &str,
) -> Value {
    let key = (namespace.to_owned(), name.to_owned());
    let Some(pod) = store.pods.remove(&key) else {
        return Value::Null;
    };
    if let Some(control) = &pod.control {
        let _ = control.send(Control::Kill);
    }
    if !pod.gpus.is_empty() {
        store.gpus_free.extend(pod.gpus.iter().copied());
        state.rescheduled.notify_waiters();
    }
    let mut object = pod.object;
    let version = store.next_version();
    object["metadata"]["resourceVersion"] = json!(version.to_string());
    store.publish(state, "DELETED", namespace, object.clone());
    state.count(|c| c.pods_deleted += 1);
    if let Some(uid) = object["metadata"]["uid"].as_str() {
        collect_dependents(state, store, uid);
    }
    object
}

/// Garbage collection: what `ownerReferences` name `uid` goes with it. Secrets at once; pods
/// with their own grace period, as background cascading deletion does.
fn collect_dependents(state: &Arc<State>, store: &mut Store, uid: &str) {
    if state.faults.lock().hold_collection {
        return;
    }
    let owned_by = |object: &Value| {
        object["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|owners| owners.iter().any(|o| o["uid"] == uid))
    };
    let secrets: Vec<_> = store
        .secrets
        .iter()
        .filter(|(_, secret)| owned_by(secret))
        .map(|(key, _)| key.clone())
        .collect();
    for key in secrets {
        store.secrets.remove(&key);
        state.count(|c| c.secrets_deleted += 1);
    }
    let pods: Vec<_> = store
        .pods
        .iter()
        .filter(|(_, pod)| owned_by(&pod.object))
        .map(|(key, _)| key.clone())
        .collect();
    for (namespace, name) in pods {
        tracing::info!(pod = %name, owner = uid, "garbage collecting a pod whose owner is gone");
        state.count(|c| c.pods_collected += 1);
        let state = Arc::clone(state);
        // Not under this lock: a graceful delete publishes and signals.
        tokio::spawn(async move {
            delete_pod(&state, &namespace, &name, None);
        });
    }
}

/// A full pass of the collector: every pod and secret whose owner is gone is deleted.
pub(crate) fn collect_orphans(state: &Arc<State>, store: &mut Store) {
    let secrets: Vec<_> = store
        .secrets
        .iter()
        .filter(|(_, secret)| has_absent_owner(store, secret))
        .map(|(key, _)| key.clone())
        .collect();
    for key in secrets {
        store.secrets.remove(&key);
        state.count(|c| c.secrets_deleted += 1);
    }
    let pods: Vec<_> = store
        .pods
        .iter()
        .filter(|(_, pod)| has_absent_owner(store, &pod.object))
        .map(|(key, _)| key.clone())
        .collect();
    for (namespace, name) in pods {
        state.count(|c| c.pods_collected += 1);
        let state = Arc::clone(state);
        tokio::spawn(async move {
            delete_pod(&state, &namespace, &name, None);
        });
    }
}

/// Garbage collection of an object created with an owner that does not exist: the real
/// collector deletes such dependents.
pub(crate) fn has_absent_owner(store: &Store, object: &Value) -> bool {
    object["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|owners| {
            owners
                .iter()
                .any(|o| !o["uid"].as_str().is_some_and(|uid| store.uid_exists(uid)))
        })
}

/// A parsed label selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`,
/// joined by commas.
#[derive(Debug, Default)]
pub(crate) struct Selector(Vec<Requirement>);

#[derive(Debug)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selector {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        let mut rest = text.trim();
        while !rest.is_empty() {
            // A set's commas are inside its parentheses.
            let end = match (rest.find('('), rest.find(',')) {
                (Some(open), Some(comma)) if open < comma => rest[open..]
                    .find(')')
                    .map(|close| open + close + 1)
                    .ok_or_else(|| format!("unclosed set in label selector `{text}`"))?,
                (_, Some(comma)) => comma,
                (_, None) => rest.len(),
            };
            let part = rest[..end].trim();
            rest = rest[end..].trim_start_matches(',').trim();
            if part.is_empty() {
                continue;
            }
            let set = |keyword: &str| -> Option<(String, Vec<String>)> {
                let (key, values) = part.split_once(keyword)?;
                let values = values.trim().strip_prefix('(')?.strip_suffix(')')?;
                Some((
                    key.trim().to_owned(),
                    values.split(',').map(|v| v.trim().to_owned()).collect(),
                ))
            };
            let requirement = if let Some((key, values)) = set(" notin ") {
                Requirement::NotIn(key, values)
            } else if let Some((key, values)) = set(" in ") {
                Requirement::In(key, values)
            } else if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(key.trim().into(), value.trim().into())
            } else if let Some((key, value)) = part.split_once("==") {
                Requirement::Equals(key.trim().into(), value.trim().into())
            } else if let Some((key, value)) = part.split_once('=') {
                Requirement::Equals(key.trim().into(), value.trim().into())
            } else if let Some(key) = part.strip_prefix('!') {
                Requirement::Absent(key.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        let labels = labels_of(object);
        self.0.iter().all(|requirement| match requirement {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => !labels.get(k).is_some_and(|v| vs.contains(v)),
        })
    }
}

/// A parsed field selector: only `metadata.name=` and `metadata.namespace=`, which is what
/// the API server supports on every resource.
#[derive(Debug, Default)]
pub(crate) struct FieldSelector(Vec<(String, String)>);

impl FieldSelector {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut fields = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, value) = part
                .split_once("==")
                .or_else(|| part.split_once('='))
                .ok_or_else(|| format!("invalid field selector `{part}`"))?;
            if !matches!(field, "metadata.name" | "metadata.namespace") {
                return Err(format!("field label not supported: {field}"));
            }
            fields.push((field.to_owned(), value.to_owned()));
        }
        Ok(Self(fields))
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, value)| {
            let key = field.trim_start_matches("metadata.");
            object["metadata"][key] == value.as_str()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_as_the_api_server_does() {
        let pod = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        for (selector, expected) in [
            ("a=1", true),
            ("a==1,b=2", true),
            ("a=1,b=3", false),
            ("a!=2", true),
            ("c", false),
            ("!c", true),
            ("a in (1,3),b", true),
            ("a notin (1),b", false),
            ("", true),
        ] {
            let parsed = Selector::parse(selector).unwrap();
            assert_eq!(parsed.matches(&pod), expected, "{selector}");
        }
    }

    #[test]
    fn times_are_rfc3339() {
        let now = now();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'), "{now}");
    }
}
