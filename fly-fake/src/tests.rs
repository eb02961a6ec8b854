//! The fake answers as the Machines API does: checked over plain HTTP, as any client sees it.

use std::time::Duration;

use serde_json::{json, Value};

use super::{FakeFly, Latency};

const IMAGE: &str = "registry.fly.io/fake-app:1";

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.send_leased(method, path, body, None).await
    }

    /// [`send`](Self::send), with a lease's nonce when given.
    async fn send_leased(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        nonce: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}/v1/apps/fake-app{path}", self.base))
            .header("authorization", format!("FlyV1 {}", self.token));
        if let Some(nonce) = nonce {
            request = request.header("fly-machine-lease-nonce", nonce);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        assert!(response.headers().contains_key("fly-request-id"));
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

async fn fake() -> (FakeFly, Client) {
    // Each machine's `init.cmd` says what it runs.
    let fly = FakeFly::builder()
        .image(IMAGE, "/bin/true")
        .rate_limits(false)
        .latency(Latency::NONE)
        .start()
        .await
        .unwrap();
    let client = Client {
        http: reqwest::Client::new(),
        base: fly.url(),
        token: fly.token().to_owned(),
    };
    (fly, client)
}

fn machine(cmd: &str, auto_destroy: bool, policy: &str) -> Value {
    json!({
        "region": "ord",
        "config": {
            "image": IMAGE,
            "init": { "cmd": ["/bin/sh", "-c", cmd] },
            "auto_destroy": auto_destroy,
            "restart": { "policy": policy },
            "metadata": { "pool": "p" },
        }
    })
}

#[tokio::test]
async fn bodies_and_queries_that_break_the_spec_are_refused() {
    use reqwest::Method;
    let (fly, client) = fake().await;
    let bad_type = json!({"config": {"image": IMAGE, "guest": {"cpus": "2"}}});
    let (status, body) = client.send(Method::POST, "/machines", Some(bad_type)).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("/config/guest/cpus"),
        "{body}"
    );
    let (status, _) = client
        .send(Method::POST, "/machines", Some(json!([])))
        .await;
    assert_eq!(status, 400);
    let no_image = json!({"config": {"env": {"A": "b"}}});
    assert_eq!(
        client
            .send(Method::POST, "/machines", Some(no_image))
            .await
            .0,
        422
    );
    let gpus_alone = json!({"config": {"image": IMAGE, "guest": {"gpus": 1}}});
    assert_eq!(
        client
            .send(Method::POST, "/machines", Some(gpus_alone))
            .await
            .0,
        422
    );
    let (status, _) = client
        .send(Method::GET, "/machines?include_deleted=perhaps", None)
        .await;
    assert_eq!(status, 400);
    let (status, _) = client
        .send(Method::DELETE, "/machines/x?force=maybe", None)
        .await;
    assert_eq!(status, 400);
    assert_eq!(fly.counts().invalid, 6);
    assert_eq!(fly.created(), 0);
}

#[tokio::test]
async fn an_exited_machine_is_destroyed_or_restarted_as_configured() {
    use reqwest::Method;
    let (fly, client) = fake().await;
    let (status, created) = client
        .send(
            Method::POST,
            "/machines",
            Some(machine("exit 3", true, "no")),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap();
    let version = created["instance_id"].as_str().unwrap();
    let wait = format!("/machines/{id}/wait?state=destroyed&version={version}&timeout=10");
    assert_eq!(client.send(Method::GET, &wait, None).await.0, 200);
    let (_, shown) = client
        .send(Method::GET, &format!("/machines/{id}"), None)
        .await;
    let exit = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| e["request"].get("exit_event"))
        .unwrap()
        .clone();
    assert_eq!(exit["exit_code"], 3);
    assert_eq!(fly.destroyed(), 1);
    // Destroyed machines leave the list, and a second DELETE is a 404.
    let (_, listed) = client
        .send(Method::GET, "/machines?metadata.pool=p", None)
        .await;
    assert_eq!(listed, json!([]));
    let delete = format!("/machines/{id}?force=true");
    assert_eq!(client.send(Method::DELETE, &delete, None).await.0, 404);

    // on-failure with max_retries 2: three runs, then it stays stopped.
    let mut body = machine("exit 1", false, "on-failure");
    body["config"]["restart"]["max_retries"] = 2.into();
    let (_, created) = client.send(Method::POST, "/machines", Some(body)).await;
    let id = created["id"].as_str().unwrap();
    let wait = format!("/machines/{id}/wait?state=stopped&timeout=10");
    assert_eq!(client.send(Method::GET, &wait, None).await.0, 200);
    let (_, shown) = client
        .send(Method::GET, &format!("/machines/{id}"), None)
        .await;
    let exits = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "exit")
        .count();
    assert_eq!(exits, 3);
    assert_eq!(shown["state"], "stopped");
}

#[tokio::test]
async fn wait_times_out_with_408_and_destroy_needs_force() {
    use reqwest::Method;
    let (fly, client) = fake().await;
    let (_, created) = client
        .send(
            Method::POST,
            "/machines",
            Some(machine("exec sleep 30", true, "no")),
        )
        .await;
    let id = created["id"].as_str().unwrap();
    let wait = format!("/machines/{id}/wait?state=stopped&timeout=1");
    assert_eq!(client.send(Method::GET, &wait, None).await.0, 408);
    let wrong_version = format!("/machines/{id}/wait?state=stopped&version=01WRONG");
    assert_eq!(client.send(Method::GET, &wrong_version, None).await.0, 400);
    assert_eq!(
        client
            .send(Method::DELETE, &format!("/machines/{id}"), None)
            .await
            .0,
        412
    );
    let force = format!("/machines/{id}?force=true");
    assert_eq!(client.send(Method::DELETE, &force, None).await.0, 200);
    assert!(fly.all_destroyed(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn stop_takes_an_object_and_sends_the_signal() {
    use reqwest::Method;
    let (fly, client) = fake().await;
    let (_, created) = client
        .send(
            Method::POST,
            "/machines",
            Some(machine("exec sleep 30", false, "no")),
        )
        .await;
    let id = created["id"].as_str().unwrap();
    let stop = format!("/machines/{id}/stop");
    assert_eq!(
        client.send(Method::POST, &stop, Some(json!([]))).await.0,
        400
    );
    let sigterm = json!({"signal": "SIGTERM", "timeout": "5s"});
    assert_eq!(client.send(Method::POST, &stop, Some(sigterm)).await.0, 200);
    let wait = format!("/machines/{id}/wait?state=stopped&timeout=10");
    assert_eq!(client.send(Method::GET, &wait, None).await.0, 200);
    let view = fly.machines().into_iter().next().unwrap();
    assert_eq!(view.state, "stopped");
    assert_eq!(view.exit_code, None, "killed by SIGTERM, not exited");
}

#[tokio::test]
async fn a_wrong_token_is_401() {
    let (_fly, mut client) = fake().await;
    client.token = "fm2_other".into();
    assert_eq!(
        client.send(reqwest::Method::GET, "/machines", None).await.0,
        401
    );
}

/// The pid of the one process whose environment holds `marker`, once there is one.
async fn pid_of(marker: &str) -> u32 {
    let found = async {
        loop {
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                if String::from_utf8_lossy(&environ).contains(marker) {
                    return pid;
                }
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), found)
        .await
        .expect("the machine's process started")
}

/// Waits until the process is frozen (`T` in `/proc/<pid>/stat`) or not, as `frozen` says.
async fn frozen(pid: u32, frozen: bool) {
    let state = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the command name in parentheses.
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
    };
    let reached = async {
        while (state() == Some('T')) != frozen {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reached)
        .await
        .unwrap_or_else(|_| panic!("process {pid} frozen: {frozen}; state {:?}", state()));
}

#[tokio::test]
async fn suspend_freezes_the_process_start_resumes_it_and_stop_then_start_runs_it_again() {
    use reqwest::Method;
    let (fly, client) = fake().await;
    let marker = format!("fake-suspend-{}", uuid::Uuid::new_v4().simple());
    let mut body = machine("exec sleep 3600", false, "no");
    body["config"]["guest"] = json!({"cpu_kind": "shared", "cpus": 1, "memory_mb": 512});
    body["config"]["env"] = json!({ "FAKE_TEST_MARKER": marker });
    let (status, created) = client.send(Method::POST, "/machines", Some(body)).await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let machine_path = format!("/machines/{id}");
    let pid = pid_of(&marker).await;

    // Suspend: the process is frozen, not ended; start resumes the same process.
    let (status, _) = client
        .send(Method::POST, &format!("{machine_path}/suspend"), None)
        .await;
    assert_eq!(status, 200);
    frozen(pid, true).await;
    // `suspending` until the snapshot is taken, as on Fly.
    let wait = format!("{machine_path}/wait?state=suspended&timeout=10");
    let (status, waited) = client.send(Method::GET, &wait, None).await;
    assert_eq!(
        (status, &waited["state"]),
        (200, &json!("suspended")),
        "{waited}"
    );
    let (status, started) = client
        .send(Method::POST, &format!("{machine_path}/start"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(started["previous_state"], "suspended");
    frozen(pid, false).await;
    assert_eq!(pid_of(&marker).await, pid, "resumed, not restarted");

    // Stop from suspended discards the snapshot: the process ends.
    client
        .send(Method::POST, &format!("{machine_path}/suspend"), None)
        .await;
    frozen(pid, true).await;
    let (status, _) = client
        .send(Method::POST, &format!("{machine_path}/stop"), None)
        .await;
    assert_eq!(status, 200);
    let wait = format!("{machine_path}/wait?state=stopped&timeout=10");
    assert_eq!(client.send(Method::GET, &wait, None).await.0, 200);

    // Start from stopped runs the process again from the config: a new process.
    let (status, started) = client
        .send(Method::POST, &format!("{machine_path}/start"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(started["previous_state"], "stopped");
    let again = pid_of(&marker).await;
    assert_ne!(again, pid);
    let delete = format!("{machine_path}?force=true");
    assert_eq!(client.send(Method::DELETE, &delete, None).await.0, 200);
    assert_eq!(fly.counts().starts, 2);
    assert_eq!(fly.counts().suspends, 2);
    assert_eq!(fly.counts().invalid, 0);
}

#[tokio::test]
async fn a_suspend_fly_would_refuse_is_refused() {
    use reqwest::Method;
    let (fly, client) = fake().await;
    let mut body = machine("exec sleep 3600", false, "no");
    body["config"]["guest"] = json!({"cpu_kind": "shared", "cpus": 1, "memory_mb": 4096});
    let (_, created) = client.send(Method::POST, "/machines", Some(body)).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let wait = format!("/machines/{id}/wait?state=started&timeout=10");
    assert_eq!(client.send(Method::GET, &wait, None).await.0, 200);
    let (status, refused) = client
        .send(Method::POST, &format!("/machines/{id}/suspend"), None)
        .await;
    assert_eq!(status, 400);
    assert!(
        refused["error"].as_str().unwrap().contains("4096 MB"),
        "{refused}"
    );
    let delete = format!("/machines/{id}?force=true");
    assert_eq!(client.send(Method::DELETE, &delete, None).await.0, 200);
    assert_eq!(fly.counts().suspends, 0);
}

#[tokio::test]
async fn a_lease_keeps_a_machine_to_its_holder_until_released() {
    use reqwest::Method;
    let (fly, client) = fake().await;
    let (_, created) = client
        .send(
            Method::POST,
            "/machines",
            Some(machine("exec sleep 3600", false, "no")),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let lease_path = format!("/machines/{id}/lease");
    let (status, leased) = client
        .send(
            Method::POST,
            &lease_path,
            Some(json!({"description": "claim by pool p", "ttl": 30})),
        )
        .await;
    assert_eq!(status, 201, "{leased}");
    assert_eq!(leased["status"], "success");
    let nonce = leased["data"]["nonce"].as_str().unwrap().to_owned();
    // Someone else: no lease, no stop.
    let (status, _) = client
        .send(Method::POST, &lease_path, Some(json!({})))
        .await;
    assert_eq!(status, 409);
    let (status, _) = client
        .send(Method::POST, &format!("/machines/{id}/stop"), None)
        .await;
    assert_eq!(status, 409);
    // The holder may.
    let (status, _) = client
        .send_leased(
            Method::POST,
            &format!("/machines/{id}/stop"),
            None,
            Some(&nonce),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = client
        .send_leased(Method::DELETE, &lease_path, None, Some("not-the-nonce"))
        .await;
    assert_eq!(status, 409);
    let (status, _) = client
        .send_leased(Method::DELETE, &lease_path, None, Some(&nonce))
        .await;
    assert_eq!(status, 200);
    // Released: the next claim gets it.
    let (status, _) = client
        .send(Method::POST, &lease_path, Some(json!({"ttl": 5})))
        .await;
    assert_eq!(status, 201);
    let (status, _) = client
        .send(Method::POST, &lease_path, Some(json!({"ttl": "5"})))
        .await;
    assert_eq!(status, 400, "a ttl that breaks the spec");
    let delete = format!("/machines/{id}?force=true");
    assert_eq!(client.send(Method::DELETE, &delete, None).await.0, 200);
    assert_eq!(fly.counts().leases, 2);
    assert_eq!(fly.counts().invalid, 1);
}
