//! One watch per backend on its runner pods, fanned out to each pod's boot and machine: the
//! API server streams every change once, however many runners there are, and nobody polls.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::Api;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::api::{REFUSAL_GRACE, REFUSAL_RETRY};
use crate::backoff::Backoff;

/// What the watch last saw of one pod.
#[derive(Debug, Clone)]
pub(crate) enum Seen {
    /// Nothing yet: the create's event has not arrived.
    NotYet,
    /// The pod as it is now.
    Pod(Arc<Pod>),
    /// The pod is gone from the API; its last state, when the watch saw it go.
    Gone(Option<Arc<Pod>>),
}

/// Why the watch is failing now, for boots that wait on it.
#[derive(Debug, Clone)]
pub(crate) struct WatchFailure {
    /// What failed: the `list` that starts a watch, or the `watch` itself.
    pub verb: &'static str,
    /// The HTTP status of the error answer, if it was one.
    pub code: Option<u16>,
    pub message: String,
    /// When the watch first failed with this status, in the run of failures it is part of.
    pub since: tokio::time::Instant,
    /// When it last failed so: a refusal stands only once it is still given after
    /// [`REFUSAL_GRACE`] from `since`, not merely because that long has gone by while the
    /// watch waited to try again.
    pub latest: tokio::time::Instant,
}

impl WatchFailure {
    /// Whether this is an RBAC refusal that has outlasted [`REFUSAL_GRACE`].
    pub(crate) fn refusal_stands(&self) -> bool {
        self.code == Some(403) && self.latest >= self.since + REFUSAL_GRACE
    }
}

pub(crate) struct PodWatch {
    api: Api<Pod>,
    selector: String,
    pods: Mutex<HashMap<String, watch::Sender<Seen>>>,
    failure: watch::Sender<Option<WatchFailure>>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
    }
}

/// One pod's view of the watch.
pub(crate) struct Follower {
    pub seen: watch::Receiver<Seen>,
    pub failure: watch::Receiver<Option<WatchFailure>>,
}

impl PodWatch {
    /// A watch on the pods `selector` matches, started by the first [`follow`](Self::follow).
    pub(crate) fn new(api: Api<Pod>, selector: String) -> Arc<Self> {
        Arc::new(Self {
            api,
            selector,
            pods: Mutex::new(HashMap::new()),
            failure: watch::channel(None).0,
            task: Mutex::new(None),
        })
    }

    /// Follows pod `name`, from before it is created.
    pub(crate) fn follow(self: &Arc<Self>, name: &str) -> Follower {
        self.start();
        let seen = self
            .pods
            .lock()
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(Seen::NotYet).0)
            .subscribe();
        Follower {
            seen,
            failure: self.failure.subscribe(),
        }
    }

    /// Stops following pod `name`.
    pub(crate) fn forget(&self, name: &str) {
        self.pods.lock().remove(name);
    }

    fn start(self: &Arc<Self>) {
        let mut task = self.task.lock();
        if task.is_some() {
            return;
        }
        let this = Arc::downgrade(self);
        let (api, selector) = (self.api.clone(), self.selector.clone());
        *task = Some(tokio::spawn(run(this, api, selector)).abort_handle());
    }

    fn update(&self, pod: Pod, gone: bool) {
        let Some(name) = pod.metadata.name.clone() else {
            return;
        };
        let pods = self.pods.lock();
        if let Some(sender) = pods.get(&name) {
            let pod = Arc::new(pod);
            sender.send_replace(if gone {
                Seen::Gone(Some(pod))
            } else {
                Seen::Pod(pod)
            });
        }
    }
}

/// The waits between failed attempts to list or watch (an API server restarting, an etcd
/// leader election), from the first failure after a success. Short, since a boot never waits
/// on the watch to succeed, but the watch is how a boot learns that its pod cannot run.
const WATCH_RETRY: Backoff = Backoff::jittered(Duration::from_millis(200), Duration::from_secs(5));

/// The watch's loop: kube-runtime's watcher, which lists, watches from the list's
/// `resourceVersion` and re-lists after a 410, driven here without kube-runtime's backoff: a
/// 410 (the `resourceVersion` is too old) is no failure of the server, so the re-list goes out
/// at once, as does the re-watch after a watch the server ended; other failures wait
/// [`WATCH_RETRY`].
async fn run(this: Weak<PodWatch>, api: Api<Pod>, selector: String) {
    let config = watcher::Config::default().labels(&selector);
    let stream = watcher::watcher(api.clone(), config.clone());
    let mut stream = Box::pin(stream);
    let mut waits = WATCH_RETRY.unbounded();
    // The pods a fresh list has shown so far, while one is under way.
    let mut listed: Option<HashSet<String>> = None;
    while let Some(item) = stream.next().await {
        let Some(this) = this.upgrade() else { return };
        let event = match item {
            Ok(event) => {
                // `Init` comes before the list is even sent: only what follows shows that the
                // API server answers again.
                if !matches!(event, Event::Init) {
                    this.failure.send_if_modified(|f| f.take().is_some());
                    waits = WATCH_RETRY.unbounded();
                }
                event
            }
            Err(error) => {
                let mut failure = failure_of(&error);
                if let Some(last) = &*this.failure.borrow() {
                    if last.code == failure.code {
                        failure.since = last.since;
                    }
                }
                let gone = failure.code == Some(410);
                // A refusal is tried again soon while it may be RBAC still loading, so that a
                // boot waiting on the watch sees it lift (or stand) within the grace.
                let refused_lately = failure.code == Some(403) && !failure.refusal_stands();
                this.failure.send_replace(Some(failure));
                drop(this);
                if gone {
                    tracing::debug!(%error, "runner pod watch expired; listing again");
                    // A watch refused with 410 at its start would be retried from the same
                    // stale version: start over from a list.
                    if matches!(error, watcher::Error::WatchStartFailed(_)) {
                        stream = Box::pin(watcher::watcher(api.clone(), config.clone()));
                    }
                } else if refused_lately {
                    tracing::debug!(%error, "runner pod watch refused; trying again in case RBAC is still loading");
                    tokio::time::sleep(REFUSAL_RETRY).await;
                } else {
                    let wait = waits.next().unwrap_or(WATCH_RETRY.max);
                    tracing::warn!(%error, ?wait, "watching runner pods failed; the watch retries");
                    tokio::time::sleep(wait).await;
                }
                continue;
            }
        };
        match event {
            Event::Apply(pod) => this.update(pod, false),
            Event::Delete(pod) => this.update(pod, true),
            Event::Init => listed = Some(HashSet::new()),
            Event::InitApply(pod) => {
                if let (Some(listed), Some(name)) = (&mut listed, &pod.metadata.name) {
                    listed.insert(name.clone());
                }
                this.update(pod, false);
            }
            Event::InitDone => {
                // A pod seen before this list and missing from it went while the watch was
                // down: its DELETED event is lost for good.
                let listed = listed.take().unwrap_or_default();
                for (name, sender) in this.pods.lock().iter() {
                    let was_there = matches!(*sender.borrow(), Seen::Pod(_));
                    if was_there && !listed.contains(name) {
                        sender.send_replace(Seen::Gone(None));
                    }
                }
            }
        }
    }
}

fn failure_of(error: &watcher::Error) -> WatchFailure {
    let code = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.code),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    };
    let verb = match error {
        watcher::Error::InitialListFailed(_) => "list",
        _ => "watch",
    };
    let now = tokio::time::Instant::now();
    WatchFailure {
        verb,
        code,
        message: error.to_string(),
        since: now,
        latest: now,
    }
}
