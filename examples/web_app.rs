//! A web app that offloads a CPU-bound route to a pool of runners, and shuts down cleanly.
//!
//! ```sh
//! cargo run --release --example web_app            # listens on 127.0.0.1:3000
//! curl http://127.0.0.1:3000/fib/40
//! ```
//!
//! An axum server under `#[tokio::main]`: `GET /fib/{n}` runs on a runner process, so a slow
//! request never holds the server's threads. On Ctrl-C (SIGINT) or SIGTERM it stops accepting
//! connections, lets the requests in flight finish (their calls included), then shuts the pool
//! down, which stops every runner. Runners sit in a process group of their own, so a terminal's
//! Ctrl-C reaches only this parent, which decides when they stop.
//!
//! `GET /stats` shows the pool's runners and calls. `--addr 127.0.0.1:0` picks a free port; the
//! first line printed says which.

use std::net::SocketAddr;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use firebrand::{job, CallError, Pool};

/// The `n`th Fibonacci number, the slow way: CPU work that never awaits, so a plain `fn`.
#[job]
fn fib(n: u32) -> u64 {
    fn slow(n: u32) -> u64 {
        if n < 2 {
            n.into()
        } else {
            slow(n - 1) + slow(n - 2)
        }
    }
    slow(n)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A runner serves here and exits; inside `#[tokio::main]` it serves on threads of its own.
    firebrand::run_if_child();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let addr: SocketAddr = match std::env::args().skip_while(|a| a != "--addr").nth(1) {
        Some(addr) => addr.parse()?,
        None => "127.0.0.1:3000".parse()?,
    };

    // CPU-bound work: two calls per runner, on a two-core machine one per core.
    let pool = Pool::builder().max(2).max_concurrency(2).build().await?;
    let app = Router::new()
        .route("/fib/{n}", get(fib_route))
        .route("/stats", get(stats_route))
        .with_state(pool.clone());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_signal())
        .await?;
    // Every request has been answered; now the runners may go.
    pool.shutdown().await;
    println!("shut down cleanly");
    Ok(())
}

async fn fib_route(State(pool): State<Pool>, Path(n): Path<u32>) -> Result<String, StatusCode> {
    if n > 45 {
        return Err(StatusCode::UNPROCESSABLE_ENTITY);
    }
    println!("computing fib({n})");
    match pool.call(&fib, n).await {
        Ok(value) => Ok(value.to_string()),
        Err(CallError::Overloaded { .. } | CallError::QueueTimeout { .. }) => {
            Err(StatusCode::SERVICE_UNAVAILABLE)
        }
        Err(error) => {
            eprintln!("fib({n}) failed: {error}");
            Err(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

/// The pool's state, for a health check: `ready=2 in_flight=4 queued=0`.
async fn stats_route(State(pool): State<Pool>) -> String {
    let stats = pool.stats();
    format!(
        "ready={} in_flight={} queued={}",
        stats.ready, stats.in_flight, stats.queued
    )
}

/// Resolves on the first SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).expect("a SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let name = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    println!("{name}: finishing the requests in flight");
}
