//! The fake against its own contract: what it refuses, and a pod's life through the kubelet.

use std::time::Duration;

use serde_json::{json, Value};

use super::FakeKube;

async fn fake() -> FakeKube {
    FakeKube::builder()
        .image("registry.example.com/sleeper:1", "/bin/sleep")
        .parent_pod("parent-0")
        .start()
        .await
        .unwrap()
}

fn client(kube: &FakeKube) -> (reqwest::Client, String, String) {
    let base = format!("{}/api/v1/namespaces/default", kube.url());
    (
        reqwest::Client::new(),
        base,
        format!("Bearer {}", kube.token()),
    )
}

fn sleeper(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "sleeper"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "registry.example.com/sleeper:1", "args": ["60"]}],
        },
    })
}

#[tokio::test]
async fn unknown_properties_and_bad_values_are_refused() {
    let kube = fake().await;
    let (http, base, auth) = client(&kube);
    let mut pod = sleeper("typo");
    pod["spec"]["containers"][0]["imagePullPolcy"] = json!("Always");
    let response = http
        .post(format!("{base}/pods"))
        .header("authorization", &auth)
        .json(&pod)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["reason"], "Invalid");
    assert!(
        body["message"].as_str().unwrap().contains("imagePullPolcy"),
        "{body}"
    );

    let mut pod = sleeper("gpus");
    pod["spec"]["containers"][0]["resources"] =
        json!({"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "2"}});
    let response = http
        .post(format!("{base}/pods"))
        .header("authorization", &auth)
        .json(&pod)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);

    let response = http.get(format!("{base}/pods")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(kube.counts().invalid, 2);
    assert_eq!(kube.counts().pods_created, 0);
}

#[tokio::test]
async fn a_pod_runs_is_deleted_and_takes_its_secret_along() {
    let kube = fake().await;
    let (http, base, auth) = client(&kube);
    let response = http
        .post(format!("{base}/pods"))
        .header("authorization", &auth)
        .json(&sleeper("one"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let uid = created["metadata"]["uid"].as_str().unwrap().to_owned();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "one", "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "one", "uid": uid}]},
        "data": {"token": "c2VjcmV0"},
    });
    let response = http
        .post(format!("{base}/secrets"))
        .header("authorization", &auth)
        .json(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert!(kube.wait_for(Duration::from_secs(10), |_| true).await);
    let running = async {
        loop {
            if kube
                .runner_pods()
                .iter()
                .any(|p| p.phase == "Running" && p.pid.is_some())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the pod runs");
    let response = http
        .delete(format!("{base}/pods/one"))
        .header("authorization", &auth)
        .json(&json!({"gracePeriodSeconds": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(kube.all_cleaned_up(Duration::from_secs(10)).await);
    assert_eq!(kube.counts().secrets_deleted, 1);
    assert!(
        kube.invalid_requests().is_empty(),
        "{:?}",
        kube.invalid_requests()
    );
}
