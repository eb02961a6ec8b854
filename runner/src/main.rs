//! `firebrand-runner`: the stock runner binary. A pool starts it with `FIREBRAND_PARENT` set.

use std::process::ExitCode;

fn main() -> ExitCode {
    // First: started by a pool, the runner sends its logs to the parent, and installs that
    // itself when no subscriber is set.
    firebrand::run_if_child_with(&firebrand_runner::registry());
    firebrand_runner::init_logging();
    eprintln!(
        "firebrand-runner serves jobs for a Firebrand pool, which starts it with {} set.\n\
         Point a pool at it with `LocalBackend::builder().command(\"{}\")`.",
        firebrand::runner::PARENT_ENV,
        std::env::args().next().unwrap_or_default()
    );
    ExitCode::from(2)
}
