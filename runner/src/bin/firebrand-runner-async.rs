//! The stock runner as an app with an async `main` embeds it: `run_if_child` is called inside
//! `#[tokio::main]`. It serves on threads of its own; the app's runtime idles meanwhile. Such a
//! binary cannot be a fork-server template, which must be single-threaded: the template refuses,
//! and the boot error says why.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    firebrand::run_if_child(&firebrand_runner::registry());
    eprintln!("firebrand-runner-async serves jobs for a Firebrand pool");
    ExitCode::from(2)
}
