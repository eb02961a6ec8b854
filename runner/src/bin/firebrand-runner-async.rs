//! The stock runner as an app with an async `main` embeds it: `run_if_child` is called inside
//! `#[tokio::main]`. It serves on threads of its own; the app's runtime idles meanwhile. Such a
//! binary cannot be a fork-server template, which must be single-threaded: the template refuses,
//! and the boot error says why.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    // First: started by a pool, the runner sends its logs to the parent, and installs that
    // itself when no subscriber is set.
    firebrand::run_if_child_with(&firebrand_runner::registry());
    firebrand_runner::init_logging();
    eprintln!("firebrand-runner-async serves jobs for a Firebrand pool");
    ExitCode::from(2)
}
