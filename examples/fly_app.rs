//! A Fly.io app whose parent boots runner machines from its own image.
//!
//! On Fly (see `docs/fly.md`), with `FLY_API_TOKEN` set as a secret:
//!
//! ```sh
//! fly deploy            # the Dockerfile builds this example as the app's binary
//! ```
//!
//! Here, against the fake Machines API, which boots each "machine" as a local copy of this
//! binary and validates every request against Fly's OpenAPI spec:
//!
//! ```sh
//! cargo run --example fly_app -- --fake
//! ```

use std::time::{Duration, Instant};

use firebrand::backend::fly::{FlyBackend, FlyBackendBuilder};
use firebrand::{job, Pool};

/// Count the primes below a bound: stand-in CPU work for a runner machine.
#[job(idempotent)]
fn count_primes(below: u64) -> (u64, String) {
    let count = (2..below)
        .filter(|n| (2..).take_while(|d| d * d <= *n).all(|d| n % d != 0))
        .count() as u64;
    // Which machine did the work: Fly sets FLY_MACHINE_ID in every machine.
    let machine = std::env::var("FLY_MACHINE_ID").unwrap_or_else(|_| "unknown".into());
    (count, machine)
}

fn main() -> anyhow::Result<()> {
    // In a runner machine this serves jobs and exits: the image's command is this binary.
    firebrand::run_if_child();

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let fake = std::env::args().any(|arg| arg == "--fake");
    tokio::runtime::Runtime::new()?.block_on(parent(fake))
}

async fn parent(fake: bool) -> anyhow::Result<()> {
    // Keep the fake alive as long as the pool.
    let (backend, fly) = if fake {
        let (builder, fly) = fake_fly().await?;
        (builder.build()?, Some(fly))
    } else {
        (FlyBackend::from_env()?, None)
    };
    let pool = Pool::builder()
        .backend(backend)
        .max(3)
        .max_concurrency(2)
        .boot_timeout(Duration::from_secs(60))
        .idle_shutdown_after(Duration::from_secs(10))
        .build()
        .await?;

    let started = Instant::now();
    let calls = (1..=12).map(|i| pool.call(&count_primes, 20_000 * i));
    for result in futures_util::future::try_join_all(calls).await? {
        println!("{:>6} primes, counted on machine {}", result.0, result.1);
    }
    println!("12 jobs in {:.1?} on {:?}", started.elapsed(), pool.stats());
    pool.shutdown().await;

    if let Some(fly) = fly {
        let all_gone = fly.all_destroyed(Duration::from_secs(10)).await;
        let counts = fly.counts();
        println!(
            "fake Fly: {} machines created, {} destroyed, {} invalid requests",
            counts.created, counts.destroyed, counts.invalid
        );
        anyhow::ensure!(
            all_gone && counts.invalid == 0,
            "the fake saw a leak or a bad request"
        );
    }
    Ok(())
}

/// A fake Machines API whose image is this very binary, and a backend pointed at it as a
/// parent on Fly would be by its environment.
async fn fake_fly() -> anyhow::Result<(FlyBackendBuilder, firebrand_fly_fake::FakeFly)> {
    use firebrand_fly_fake::FakeFly;
    const IMAGE: &str = "registry.fly.io/fly-app-example:deployment-01";
    let fly = FakeFly::builder()
        .app("fly-app-example")
        .image(IMAGE, std::env::current_exe()?)
        .start()
        .await?;
    let (url, token, app) = (fly.url(), fly.token().to_owned(), fly.app().to_owned());
    let builder = FlyBackendBuilder::from_vars(move |name| {
        Some(match name {
            "FLY_API_TOKEN" => token.clone(),
            "FLY_APP_NAME" => app.clone(),
            "FLY_IMAGE_REF" => IMAGE.to_owned(),
            "FLY_REGION" => "ord".to_owned(),
            "FLY_PRIVATE_IP" => "::1".to_owned(),
            "FLY_MACHINE_ID" => "parent0machine".to_owned(),
            "RUST_LOG" => std::env::var("RUST_LOG").ok()?,
            _ => return None,
        })
    })
    .api_base(url);
    Ok((builder, fly))
}
