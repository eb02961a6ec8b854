//! `firebrand-runner`: the stock runner binary. A pool starts it with `FIREBRAND_PARENT` set.

use std::process::ExitCode;

fn main() -> ExitCode {
    firebrand_runner::init_logging();
    firebrand::run_if_child(&firebrand_runner::registry());
    eprintln!(
        "firebrand-runner serves jobs for a Firebrand pool, which starts it with {} set.\n\
         Point a pool at it with `LocalBackend::builder().command(\"{}\")`.",
        firebrand::runner::PARENT_ENV,
        std::env::args().next().unwrap_or_default()
    );
    ExitCode::from(2)
}
