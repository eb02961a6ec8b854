//! Errors at the library's boundaries.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

/// A runner's id: the UUID its certificate is issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunnerId(pub Uuid);

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first group is enough to tell runners apart in logs.
        let text = self.0.simple().to_string();
        f.write_str(&text[..8])
    }
}

/// Why a call did not return a result.
///
/// `E` is the job's error type (see [`Job`](crate::Job)): a job's own error comes back as
/// [`CallError::Job`], typed, so a caller can match on it.
///
/// ```no_run
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, thiserror::Error)]
/// # enum ResizeError { #[error("too large")] TooLarge }
/// # async fn f(pool: firebrand::Pool) {
/// # const RESIZE: firebrand::Job<u32, u32, ResizeError> = firebrand::Job::new("resize");
/// use firebrand::CallError;
///
/// match pool.call(&RESIZE, 4096).await {
///     Ok(size) => println!("{size}"),
///     Err(CallError::Job(ResizeError::TooLarge)) => println!("pick a smaller size"),
///     Err(other) => println!("{other}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CallError<E = RemoteError> {
    /// No runner slot came free within the queue timeout.
    #[error(
        "no runner slot came free within {} (the queue timeout): raise the pool's `max` or \
         `max_concurrency`, or the call's `queue_timeout`",
        Shown(waited)
    )]
    QueueTimeout {
        /// How long the call waited.
        waited: Duration,
    },
    /// The queue was full (`max_queued` callers already waiting): refused at once.
    #[error(
        "the pool is overloaded: {queued} calls are already waiting (its `max_queued`); \
         retry later, or raise `max`, `max_concurrency` or `max_queued`"
    )]
    Overloaded {
        /// How many calls were waiting.
        queued: usize,
    },
    /// The job ran past its execution timeout; it was aborted on the runner.
    #[error(
        "the job did not finish within its timeout of {} and was aborted on its runner: give \
         it a longer `timeout` (on the job or the call), or `None` for no deadline",
        Shown(after)
    )]
    Timeout {
        /// The execution timeout.
        after: Duration,
    },
    /// The call's [`deadline`](crate::Call::deadline) passed. It bounds the caller's whole
    /// wait (queue, boot, sending and the job's run together); the call was cancelled, on its
    /// runner too.
    #[error("the call's deadline of {} passed {phase}", Shown(deadline))]
    DeadlinePassed {
        /// The deadline, as set.
        deadline: Duration,
        /// What the call was waiting for when it passed.
        phase: DeadlinePhase,
    },
    /// The runner was lost while the call ran. The job may or may not have run.
    #[error(
        "runner {runner} was lost mid-call ({reason}); the job may or may not have run: mark \
         the job `idempotent` with `retries` to run it again elsewhere"
    )]
    RunnerLost {
        /// The runner that was lost.
        runner: RunnerId,
        /// What the transport or backend reported.
        reason: String,
    },
    /// The job returned an error: the job's own error type, or its text ([`RemoteError`]).
    #[error("the job failed: {0}")]
    Job(E),
    /// The job panicked. The runner keeps serving.
    #[error("the job panicked on its runner: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// No job of that name is registered.
    #[error(
        "no job named `{job}` is registered on the runner: is the runner built from the same \
         code as the parent, with every `#[job]` linked in?"
    )]
    UnknownJob {
        /// The name called.
        job: String,
    },
    /// The argument (on the parent) or the result (on the runner) did not encode.
    #[error("the job's argument or result did not encode: {message}")]
    Encode {
        /// The encoder's error.
        message: String,
    },
    /// The result (on the parent) or the argument (on the runner) did not decode.
    #[error(
        "the job's result or argument did not decode: {message}; the parent and the runner must \
         be built from the same code"
    )]
    Decode {
        /// The decoder's error.
        message: String,
    },
    /// No runner could be booted to serve the call.
    #[error("no runner could be booted for the call: {0}")]
    BootFailed(Arc<BootError>),
    /// A peer broke the wire protocol.
    #[error("protocol error: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// Retries were asked of a call that is not marked idempotent.
    #[error(
        "job `{job}` is not marked idempotent, so its calls cannot be retried: mark it \
         `idempotent` if running it twice for one call is safe"
    )]
    NotIdempotent {
        /// The job called.
        job: String,
    },
    /// Every attempt of a retried call failed; the causes in order.
    #[error("{} attempts failed: {}", attempts.len(), list_attempts(attempts))]
    Attempts {
        /// Each attempt's error, first to last.
        attempts: Vec<CallError<E>>,
    },
    /// The pool is shut down or shutting down.
    #[error("the pool is shut down: make calls before `Pool::shutdown`")]
    Closed,
    /// A [`RemoteTask`](crate::RemoteTask) was aborted; its job was cancelled on the runner.
    #[error("the task was aborted, and its job cancelled on the runner")]
    Aborted,
}

/// What a call was waiting for when its deadline passed: the phase
/// [`CallError::DeadlinePassed`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadlinePhase {
    /// Waiting for a slot, with `behind` calls ahead of it in the queue.
    Queued {
        /// How many calls were ahead of it.
        behind: usize,
    },
    /// Waiting for a slot while `runner` booted, with no runner up to serve it.
    Booting {
        /// The runner booting (the one that started first, if several were).
        runner: RunnerId,
    },
    /// Its request being sent: a large argument encoded, the request written.
    Sending,
    /// Its job running on `runner`, for `ran_for`.
    Running {
        /// The runner the job ran on.
        runner: RunnerId,
        /// How long the job had run.
        ran_for: Duration,
    },
    /// Waiting to retry, after `attempts` attempts failed.
    Retrying {
        /// How many attempts had failed.
        attempts: usize,
    },
}

impl fmt::Display for DeadlinePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadlinePhase::Queued { behind: 0 } => f.write_str("while queued, first in line"),
            DeadlinePhase::Queued { behind: 1 } => f.write_str("while queued behind 1 call"),
            DeadlinePhase::Queued { behind } => write!(f, "while queued behind {behind} calls"),
            DeadlinePhase::Booting { runner } => write!(f, "while runner {runner} booted"),
            DeadlinePhase::Sending => f.write_str("while its request was sent"),
            DeadlinePhase::Running { runner, ran_for } => write!(
                f,
                "while the job ran for {} on runner {runner}",
                Shown(ran_for)
            ),
            DeadlinePhase::Retrying { attempts } => {
                write!(f, "while waiting to retry after {attempts} failed attempts")
            }
        }
    }
}

/// A duration as people read it: `250ms`, `30s`, `1.5s`, never `0ns`.
struct Shown<'a>(&'a Duration);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = *self.0;
        if d >= Duration::from_secs(1) {
            let secs = d.as_secs_f64();
            if d.subsec_millis() == 0 {
                write!(f, "{}s", d.as_secs())
            } else {
                write!(f, "{secs:.1}s")
            }
        } else if d >= Duration::from_millis(1) {
            write!(f, "{}ms", d.as_millis())
        } else {
            // Under a millisecond only when a setting was that small.
            write!(f, "under 1ms")
        }
    }
}

/// A job's error as its `Display` text: the error type of jobs whose error does not
/// serialize (`anyhow::Error`, `std::io::Error`), and of jobs declared without one.
#[derive(Clone)]
pub struct RemoteError {
    message: String,
    /// The error as the runner encoded it, for a job whose error type is typed: kept until the
    /// call's end decodes it as that type.
    encoded: Option<Vec<u8>>,
}

impl RemoteError {
    /// An error with this text.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            encoded: None,
        }
    }

    /// An error as a runner sent it: its text, and its encoding if the job's error is typed.
    pub(crate) fn from_runner(message: String, encoded: Option<Vec<u8>>) -> Self {
        Self { message, encoded }
    }

    /// The error's `Display` text, as the job's runner wrote it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RemoteError").field(&self.message).finish()
    }
}

impl PartialEq for RemoteError {
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message
    }
}

impl Eq for RemoteError {}

impl std::error::Error for RemoteError {}

impl From<std::convert::Infallible> for RemoteError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

impl CallError<RemoteError> {
    /// This error with the job's error, if any, decoded as `E`.
    pub(crate) fn typed<E: crate::job::JobError>(self) -> CallError<E> {
        use CallError as C;
        match self {
            C::Job(RemoteError { message, encoded }) => match E::from_runner(message, encoded) {
                Ok(error) => C::Job(error),
                Err(message) => C::Decode { message },
            },
            C::Attempts { attempts } => C::Attempts {
                attempts: attempts.into_iter().map(CallError::typed).collect(),
            },
            C::QueueTimeout { waited } => C::QueueTimeout { waited },
            C::Overloaded { queued } => C::Overloaded { queued },
            C::Timeout { after } => C::Timeout { after },
            C::DeadlinePassed { deadline, phase } => C::DeadlinePassed { deadline, phase },
            C::RunnerLost { runner, reason } => C::RunnerLost { runner, reason },
            C::Panicked { message } => C::Panicked { message },
            C::UnknownJob { job } => C::UnknownJob { job },
            C::Encode { message } => C::Encode { message },
            C::Decode { message } => C::Decode { message },
            C::BootFailed(error) => C::BootFailed(error),
            C::Protocol { message } => C::Protocol { message },
            C::NotIdempotent { job } => C::NotIdempotent { job },
            C::Closed => C::Closed,
            C::Aborted => C::Aborted,
        }
    }
}

fn list_attempts<E: fmt::Display>(attempts: &[CallError<E>]) -> String {
    attempts
        .iter()
        .enumerate()
        .map(|(i, e)| format!("{}) {e}", i + 1))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a runner did not boot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// The runner did not connect and say hello within the boot timeout. Its machine was
    /// terminated.
    #[error("runner did not connect within the boot timeout of {0:?}")]
    Timeout(Duration),
    /// The runner's machine stopped before the runner connected.
    #[error("runner exited before connecting: {0}")]
    Exited(String),
    /// The runner connected, but its job registry or protocol differs from the parent's.
    #[error("runner is incompatible with its parent: {0}")]
    Incompatible(String),
    /// The backend could not start a machine.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A certificate for the runner could not be issued.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The pool closed while the runner booted.
    #[error("pool closed during boot")]
    PoolClosed,
    /// No call waited for the runner any more (they ran elsewhere), and `min` did not need it:
    /// the boot was cancelled and its machine terminated, rather than left to serve nothing.
    #[error("boot cancelled: no call needs the runner any more")]
    NotNeeded,
}

impl BootError {
    /// Whether booting again cannot help, so the pool does not retry: the backend refused the
    /// configuration or the credentials (see [`BackendError::is_permanent`]).
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        matches!(self, BootError::Backend(error) if error.is_permanent())
    }
}

/// An error from a [`Backend`](crate::Backend).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The runner process could not be spawned.
    #[error("cannot spawn runner `{program}`")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The backend's configuration is invalid.
    #[error("invalid backend configuration: {0}")]
    Config(String),
    /// The API the backend drives (Fly's Machines API, a Kubernetes API server) refused or
    /// failed. [`BackendError::provider_error`] gives the error back as its own type, such as
    /// [`FlyError`](crate::backend::fly::FlyError).
    #[error("{0}")]
    Provider(Box<dyn ProviderError>),
    /// Any other backend failure: what the backend was doing, and the error that stopped it,
    /// if another error says why. Build one with [`BackendError::other`].
    #[error("{message}")]
    Other {
        /// What failed.
        message: String,
        /// Why.
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
}

impl BackendError {
    /// A [`BackendError::Other`]: `message` says what failed, `source` why. Its `Display` is
    /// `message` alone; the cause is its [`source`](std::error::Error::source).
    ///
    /// ```
    /// use firebrand::BackendError;
    ///
    /// let error = BackendError::other("cannot create the pod", "quota exceeded");
    /// assert_eq!(error.to_string(), "cannot create the pod");
    /// assert_eq!(std::error::Error::source(&error).unwrap().to_string(), "quota exceeded");
    /// ```
    pub fn other(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        BackendError::Other {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A [`BackendError::Provider`] holding `error`.
    pub fn provider(error: impl ProviderError) -> Self {
        BackendError::Provider(Box::new(error))
    }

    /// The provider's error as its own type `E`, when it is one.
    ///
    /// ```no_run
    /// # fn f(error: firebrand::BackendError) {
    /// use firebrand::backend::fly::FlyError;
    ///
    /// if let Some(FlyError::NoCapacity { regions, .. }) = error.provider_error::<FlyError>() {
    ///     eprintln!("no room in {regions:?}");
    /// }
    /// # }
    /// ```
    #[must_use]
    pub fn provider_error<E: ProviderError>(&self) -> Option<&E> {
        match self {
            BackendError::Provider(error) => {
                let error: &(dyn std::error::Error + 'static) = &**error;
                error.downcast_ref::<E>()
            }
            _ => None,
        }
    }

    /// Whether booting again cannot help: the backend's configuration is invalid, or its
    /// provider refused the request as such (on Fly: a GPU refusal, 400, 401, 403, a 422 for
    /// the config). Spawn errors and everything else may pass, and are retried.
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        match self {
            BackendError::Config(_) => true,
            BackendError::Provider(error) => error.is_permanent(),
            _ => false,
        }
    }
}

/// An error from the API a backend drives, which says whether booting again can help. The Fly
/// backend's [`FlyError`](crate::backend::fly::FlyError) is one; a backend of your own can
/// bring its own.
pub trait ProviderError: std::error::Error + Send + Sync + 'static {
    /// Whether booting again cannot help: the provider refused the request as such (a bad
    /// config, a refused token), rather than failing in a way that may pass.
    fn is_permanent(&self) -> bool;
}

/// Why a pool could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// A builder setting is invalid.
    #[error("invalid pool configuration: {0}")]
    InvalidConfig(String),
    /// The QUIC endpoint could not bind.
    #[error("cannot bind the pool's endpoint on {addr}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The pool's CA or server certificate could not be made.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A `min` runner failed to boot at start.
    #[error("a min runner failed to boot: {0}")]
    Boot(Arc<BootError>),
    /// The collected jobs do not make a registry: two share a name.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

/// An error with its chain of causes, `error: cause: cause`, for log lines: the errors here
/// print their own message only and return their cause from `source()`.
pub(crate) struct Report<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them_and_never_as_0ns() {
        let shown = |d: Duration| Shown(&d).to_string();
        assert_eq!(shown(Duration::from_millis(300)), "300ms");
        assert_eq!(shown(Duration::from_secs(30)), "30s");
        assert_eq!(shown(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(shown(Duration::ZERO), "under 1ms");
        let timeout = CallError::<RemoteError>::Timeout {
            after: Duration::ZERO,
        };
        assert!(!timeout.to_string().contains("0ns"), "{timeout}");
    }

    #[test]
    fn each_call_error_says_what_happened_and_what_to_change() {
        let runner = RunnerId(Uuid::nil());
        let cases: Vec<(CallError, &str)> = vec![
            (
                CallError::QueueTimeout {
                    waited: Duration::from_secs(5),
                },
                "raise the pool's `max`",
            ),
            (CallError::Overloaded { queued: 9 }, "raise `max`"),
            (
                CallError::DeadlinePassed {
                    deadline: Duration::from_millis(100),
                    phase: DeadlinePhase::Queued { behind: 4 },
                },
                "the call's deadline of 100ms passed while queued behind 4 calls",
            ),
            (
                CallError::DeadlinePassed {
                    deadline: Duration::from_millis(100),
                    phase: DeadlinePhase::Running {
                        runner,
                        ran_for: Duration::from_millis(80),
                    },
                },
                "passed while the job ran for 80ms on runner 00000000",
            ),
            (
                CallError::Timeout {
                    after: Duration::from_secs(30),
                },
                "give it a longer `timeout`",
            ),
            (
                CallError::RunnerLost {
                    runner,
                    reason: "connection lost".into(),
                },
                "mark the job `idempotent`",
            ),
            (
                CallError::UnknownJob {
                    job: "resize".into(),
                },
                "no job named `resize` is registered on the runner",
            ),
            (
                CallError::Decode {
                    message: "bad".into(),
                },
                "built from the same code",
            ),
            (
                CallError::NotIdempotent {
                    job: "resize".into(),
                },
                "mark it `idempotent`",
            ),
            (CallError::Closed, "before `Pool::shutdown`"),
            (
                CallError::Job(RemoteError::new("disk full")),
                "the job failed: disk full",
            ),
        ];
        for (error, says) in cases {
            assert!(error.to_string().contains(says), "{error}");
        }
    }

    #[test]
    fn a_typed_error_that_arrives_as_text_only_is_a_decode_error_naming_its_type() {
        let error = CallError::Job(RemoteError::from_runner("disk full".into(), None));
        match error.typed::<String>() {
            CallError::Decode { message } => {
                assert!(message.contains("as text only"), "{message}");
                assert!(message.contains("alloc::string::String"), "{message}");
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
    }
}
