//! One runner pod: its boot up to a running container, and its end. Pods are deleted by the
//! parent, never left to the runner or to garbage collection.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::api::KubeApi;
use super::pod::{progress, ParentPod, Progress, TERMINATION_MARGIN};
use super::watch::{Follower, PodWatch, Seen, WatchFailure};
use super::KubernetesError;
use crate::backend::{Exit, Machine};
use crate::error::{BackendError, BootError};

/// How long `terminate` waits for the pod to be gone after its grace period, before it
/// returns with the deletion under way.
const GONE_MARGIN: Duration = Duration::from_secs(10);

/// When a dropped boot's pod is deleted a second time, in case its create landed after the
/// first.
const SECOND_DELETE: Duration = Duration::from_secs(5);

pub(crate) struct RunnerPod {
    api: KubeApi,
    watch: Arc<PodWatch>,
    pub(crate) name: String,
    follower: Follower,
    /// The image, for an image pull's error.
    image: String,
    /// How long the pod may stay unschedulable while it boots.
    unschedulable_grace: Duration,
    /// The parent pod that owns it: when the pod is deleted while it boots, whether its
    /// parent is gone too tells a permanent failure from a passing one.
    parent: ParentPod,
    /// Until `terminate` takes over, dropping this deletes the pod.
    armed: bool,
}

impl RunnerPod {
    /// Follows pod `name` from before its create, so that no event is missed and a boot
    /// dropped at any point deletes what it made.
    pub(crate) fn new(
        api: KubeApi,
        watch: Arc<PodWatch>,
        name: String,
        image: String,
        unschedulable_grace: Duration,
        parent: ParentPod,
    ) -> Self {
        let follower = watch.follow(&name);
        Self {
            api,
            watch,
            name,
            follower,
            image,
            unschedulable_grace,
            parent,
            armed: true,
        }
    }

    /// Why the pod was deleted while it booted: with its parent pod, by the garbage collector
    /// (every pod this parent makes goes the same way, so it is permanent), or by someone else.
    async fn deleted(&self, pod: String) -> KubernetesError {
        match self.api.get_pod(&self.parent.name).await {
            Ok(found)
                if found.as_ref().and_then(|p| p.metadata.uid.as_deref())
                    != Some(self.parent.uid.as_str()) =>
            {
                KubernetesError::ParentGone {
                    pod,
                    parent: self.parent.name.clone(),
                }
            }
            // Alive, or unknown: a read that failed says nothing of the parent.
            _ => KubernetesError::Deleted { pod },
        }
    }

    /// Waits for a reason the pod will never run its runner, as the watch reports the pod: a
    /// pod that cannot run fails at once with the cluster's reason; one that no node can take
    /// waits up to `unschedulable_grace` (for a cluster autoscaler) first. A pod that runs is
    /// watched on, since its container may still end before its runner dials. While the watch
    /// is down this waits; the runner's hello is what admits it, not the watch.
    async fn boot_failure(&mut self) -> KubernetesError {
        let created = Instant::now();
        let pod = self.name.clone();
        loop {
            let seen = self.follower.seen.borrow_and_update().clone();
            let mut wake_at = None;
            match seen {
                Seen::NotYet => {}
                Seen::Gone(_) => return self.deleted(pod).await,
                Seen::Pod(state) => match progress(&state) {
                    Progress::Running | Progress::Waiting => {}
                    Progress::Unschedulable(message) => {
                        let until = created + self.unschedulable_grace;
                        if Instant::now() >= until {
                            return KubernetesError::Unschedulable { pod, message };
                        }
                        tracing::info!(%pod, %message, "runner pod unschedulable; waiting for a node");
                        wake_at = Some(until);
                    }
                    Progress::ImagePull(reason, message) => {
                        return KubernetesError::ImagePull {
                            pod,
                            image: self.image.clone(),
                            reason,
                            message,
                        }
                    }
                    Progress::Container(reason, message) => {
                        // The Secret is created just after the pod, and exists by now: a
                        // kubelet that looked in between says it is missing, and tries again.
                        let our_secret = message.contains(&format!("\"{}\"", self.name));
                        if reason == "CreateContainerConfigError" && our_secret {
                            tracing::debug!(%pod, "the kubelet looked before the Secret was made");
                        } else {
                            return KubernetesError::Container {
                                pod,
                                reason,
                                message,
                            };
                        }
                    }
                    Progress::Ended(_, exit) => return KubernetesError::Ended { pod, exit },
                },
            }
            let failure = self.follower.failure.borrow_and_update().clone();
            if let Some(failure) = failure.filter(WatchFailure::refusal_stands) {
                // An API server that has just restarted refuses with 403 until its RBAC caches
                // fill: only a refusal still given after the grace fails the boot (the watch
                // tries again every `REFUSAL_RETRY` meanwhile, and each try is a change here).
                return KubernetesError::from_forbidden(
                    failure.verb,
                    "pods",
                    &self.api.namespace,
                    failure.message,
                );
            }
            let wake = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.follower.seen.changed() => {
                    if changed.is_err() {
                        return self.deleted(pod).await;
                    }
                }
                _ = self.follower.failure.changed() => {}
                () = wake => {}
            }
        }
    }
}

/// How a pod ended, from the watch's last sight of it.
fn exit_of(name: &str, seen: &Seen) -> Option<Exit> {
    match seen {
        Seen::Pod(pod) => match progress(pod) {
            Progress::Ended(code, description) => Some(Exit { code, description }),
            _ => None,
        },
        Seen::Gone(last) => Some(
            last.as_deref()
                .and_then(|pod| match progress(pod) {
                    Progress::Ended(code, description) => Some(Exit { code, description }),
                    _ => None,
                })
                .unwrap_or_else(|| Exit {
                    code: None,
                    description: format!("pod {name} was deleted"),
                }),
        ),
        Seen::NotYet => None,
    }
}

impl Machine for RunnerPod {
    fn describe(&self) -> String {
        format!("pod {}/{}", self.api.namespace, self.name)
    }

    fn exited(&mut self) -> BoxFuture<'_, Exit> {
        Box::pin(async move {
            loop {
                if let Some(exit) = exit_of(&self.name, &self.follower.seen.borrow_and_update()) {
                    return exit;
                }
                if self.follower.seen.changed().await.is_err() {
                    return Exit {
                        code: None,
                        description: format!("pod {} is no longer watched", self.name),
                    };
                }
            }
        })
    }

    fn boot_failed(&mut self) -> BoxFuture<'_, BootError> {
        Box::pin(async move { BootError::Backend(self.boot_failure().await.into()) })
    }

    fn terminate(
        mut self: Box<Self>,
        grace: Duration,
    ) -> BoxFuture<'static, Result<(), BackendError>> {
        self.armed = false;
        Box::pin(async move {
            let deleted = self.api.delete_pod(&self.name, Some(grace)).await;
            // With no grace the API server removes the pod as it answers; with some, the pod is
            // gone once its process has ended, within the grace period.
            if matches!(deleted, Ok(true)) && !grace.is_zero() {
                let limit = grace
                    .saturating_add(TERMINATION_MARGIN)
                    .saturating_add(GONE_MARGIN);
                let gone = self
                    .follower
                    .seen
                    .wait_for(|seen| matches!(seen, Seen::Gone(_)));
                if tokio::time::timeout(limit, gone).await.is_err() {
                    tracing::warn!(pod = %self.name, "runner pod still terminating; its deletion is under way");
                }
            }
            self.watch.forget(&self.name);
            if deleted? {
                tracing::debug!(pod = %self.name, "deleted");
            }
            Ok(())
        })
    }
}

impl Drop for RunnerPod {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.watch.forget(&self.name);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(pod = %self.name, "no runtime to delete a dropped runner pod");
            return;
        };
        let (api, name) = (self.api.clone(), self.name.clone());
        runtime.spawn(async move {
            // A create cut off in flight may still land after the first delete: look twice.
            for delay in [Duration::ZERO, SECOND_DELETE] {
                tokio::time::sleep(delay).await;
                if let Err(error) = api.delete_pod(&name, Some(Duration::ZERO)).await {
                    tracing::error!(pod = %name, %error, "cannot delete a dropped runner pod");
                }
            }
        });
    }
}
