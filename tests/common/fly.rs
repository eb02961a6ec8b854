//! The Fly backend's test set-up: a backend on the fake Machines API, configured as a parent
//! on Fly would be, and the check that a test left no machine and sent no invalid request.

use std::time::Duration;

use firebrand::backend::fly::{FlyBackend, FlyBackendBuilder};
use firebrand::{Pool, PoolBuilder};
use firebrand_fly_fake::{FakeFly, Latency};

use super::RUNNER;

pub const IMAGE: &str = "registry.fly.io/fake-app:deployment-01";
pub const PARENT: &str = "148e21ea0d2089";
pub const SECOND: Duration = Duration::from_secs(1);

pub async fn fake() -> FakeFly {
    super::init_tracing();
    FakeFly::builder()
        .image(IMAGE, RUNNER)
        .latency(Latency::NONE)
        .start()
        .await
        .expect("the fake binds")
}

/// A backend on the fake, as a parent on Fly would configure it from its env.
pub fn backend(fly: &FakeFly) -> FlyBackendBuilder {
    builder_at(fly.url(), fly.token(), fly.app().to_owned())
}

/// A backend on a fake that another process runs, at `url`.
pub fn backend_at(url: String, token: String, app: String) -> FlyBackend {
    builder_at(url, token, app).build().unwrap()
}

fn builder_at(url: String, token: String, app: String) -> FlyBackendBuilder {
    FlyBackendBuilder::from_vars(|_| None)
        .api_base(url)
        .token(token)
        .app(app)
        .image(IMAGE)
        .region("ord")
        .private_ip("::1")
        .machine_id(PARENT)
        .retries(8, Duration::from_millis(50), SECOND)
}

pub fn pool(backend: FlyBackend) -> PoolBuilder {
    Pool::builder()
        .registry(&firebrand_runner::registry())
        .backend(backend)
        .boot_timeout(20 * SECOND)
        .queue_timeout(30 * SECOND)
        .timeout(20 * SECOND)
}

/// Shuts the pool down and checks that every machine the fake made was destroyed, and that
/// no request broke the spec.
pub async fn shut_down_clean(pool: Pool, fly: &FakeFly) {
    pool.shutdown().await;
    assert!(
        fly.all_destroyed(20 * SECOND).await,
        "machines left: {:?}",
        fly.machines()
            .iter()
            .filter(|m| m.state != "destroyed")
            .map(|m| (&m.id, &m.state))
            .collect::<Vec<_>>()
    );
    assert_eq!(fly.invalid_requests(), Vec::<String>::new());
}
