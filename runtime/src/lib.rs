//! Firebrand: elastic remote execution for Rust, in the style of Elixir's FLAME.
//!
//! Application code calls `pool.call(&JOB, args).await`. The [`Pool`] boots runners on demand
//! through a [`Backend`] (local processes by default), each of which dials back over QUIC with
//! mutual TLS and serves the jobs declared with [`#[job]`](job). Runners stop themselves when idle, when their
//! parent is lost, and when they never reach it.
//!
//! ```no_run
//! use firebrand::{job, Pool};
//!
//! #[job]
//! async fn square(n: u64) -> u64 {
//!     n * n
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // In a runner process this serves jobs and exits; in the parent it returns at once.
//!     firebrand::run_if_child();
//!
//!     tokio::runtime::Runtime::new()?.block_on(async {
//!         let pool = Pool::builder().max(2).build().await?;
//!         assert_eq!(pool.call(&square, 7).await?, 49);
//!         pool.shutdown().await;
//!         Ok(())
//!     })
//! }
//! ```
//!
//! [`#[job]`](job) declares each job once; a [`Registry`] holds jobs made at run time.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub)]

#[cfg(not(unix))]
compile_error!("Firebrand supports Unix-like systems (Linux, macOS) only");

pub mod backend;
mod backoff;
mod error;
mod exit_codes;
mod job;
mod manifest;
mod pool;
mod registry;
pub mod runner;
mod settings;
mod tls;
mod token;
mod trace;
mod transport;
mod wire;

#[cfg(feature = "fly")]
#[cfg_attr(docsrs, doc(cfg(feature = "fly")))]
pub use backend::fly::FlyBackend;
#[cfg(feature = "kubernetes")]
#[cfg_attr(docsrs, doc(cfg(feature = "kubernetes")))]
pub use backend::kubernetes::KubernetesBackend;
pub use backend::{Backend, LocalBackend};
pub use error::{
    BackendError, BootError, CallError, DeadlinePhase, PoolError, ProviderError, RemoteError,
    RunnerId,
};
pub use job::{
    IntoJobError, Job, JobError, Payload, ResourceJob, StreamJob, TypedJobError, UsingJob,
};
pub use manifest::{JobSignature, Manifest};
pub use pool::{
    Call, CallOutcome, GrowEnd, GrowStart, Limits, MakeResource, Map, Placement, Pool, PoolBuilder,
    PoolEvent, PoolStats, Progress, RemoteStream, RemoteTask, Resource, ResourceCall, Shrink,
};
pub use registry::{Registry, RegistryError};
pub use runner::{run_if_child, run_if_child_with};
pub use settings::{defaults, MAX_CONCURRENCY, MAX_RUNNERS, MAX_SETTING_DURATION};
pub use trace::TraceId;
pub use transport::CongestionControl;

#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
#[doc = include_str!("job_attribute.md")]
pub use firebrand_macros::job;

/// Not public API: what `#[job]` expands to names these.
#[doc(hidden)]
pub mod __private {
    pub use crate::registry::CollectedJob;
    pub use inventory;
}

/// Not public API: what the project's own tests and benches reach inside for. It may change in
/// any release.
#[doc(hidden)]
pub mod internals {
    pub use crate::pool::placement::{Action, Arrival, Rules, Scheduler, Waiter, WaiterId};

    /// The pool's certificates and TLS configurations.
    pub mod tls {
        pub use crate::tls::*;
    }

    /// The boot token a runner is started with.
    pub mod token {
        pub use crate::token::*;
    }

    /// QUIC endpoints and transport settings.
    pub mod transport {
        pub use crate::transport::*;
    }

    /// The wire protocol.
    pub mod wire {
        pub use crate::wire::*;
    }
}
