//! Typed job handles.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::RemoteError;

/// A value that can cross the wire as a job's argument or result.
///
/// Implemented for every `Serialize + DeserializeOwned + Send + 'static` type.
pub trait Payload: Serialize + DeserializeOwned + Send + 'static {}

impl<T: Serialize + DeserializeOwned + Send + 'static> Payload for T {}

/// A typed name for a remote job: the name it is registered under, its argument type `A`, its
/// result type `R` and its error type `E`, with the defaults its calls start from.
///
/// [`#[job]`](crate::job) declares one from a function; for jobs made at run time, declare one
/// by hand and give [`Registry::register`](crate::Registry::register) its body. Calling a job
/// with the wrong argument type is a compile error.
///
/// `E` is what the caller gets back in [`CallError::Job`](crate::CallError::Job): a
/// [`JobError`], either the job's own serializable error type or [`RemoteError`] (the error's
/// text), the default.
///
/// ```
/// use std::time::Duration;
/// use firebrand::Job;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct ResizeArgs { width: u32, height: u32 }
///
/// const RESIZE: Job<ResizeArgs, Vec<u8>> = Job::new("resize").timeout(Duration::from_secs(90));
/// assert_eq!(RESIZE.name(), "resize");
/// ```
pub struct Job<A, R, E = RemoteError> {
    name: &'static str,
    defaults: JobDefaults,
    // `fn(A) -> (R, E)` keeps the handle `Send + Sync + Copy` whatever the types are.
    types: PhantomData<fn(A) -> (R, E)>,
}

/// What a job declares for its calls; a call's own options override each.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct JobDefaults {
    pub(crate) idempotent: bool,
    pub(crate) retries: u32,
    /// `None`: the pool's; `Some(None)`: no execution deadline.
    pub(crate) timeout: Option<Option<Duration>>,
    /// `None`: the pool's.
    pub(crate) queue_timeout: Option<Duration>,
}

impl JobDefaults {
    const NONE: JobDefaults = JobDefaults {
        idempotent: false,
        retries: 0,
        timeout: None,
        queue_timeout: None,
    };
}

impl<A, R, E> Job<A, R, E> {
    /// Names a job. The name must be unique within a [`Registry`](crate::Registry).
    #[must_use]
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            defaults: JobDefaults::NONE,
            types: PhantomData,
        }
    }

    /// Marks the job safe to run more than once for one call, which [`retries`](Job::retries)
    /// requires.
    #[must_use]
    pub const fn idempotent(mut self) -> Self {
        self.defaults.idempotent = true;
        self
    }

    /// Retries a call this many times by default when its runner is lost or no runner boots,
    /// with exponential backoff and jitter. Only for [`idempotent`](Job::idempotent) jobs.
    ///
    /// ```
    /// use firebrand::Job;
    ///
    /// const THUMBNAIL: Job<String, Vec<u8>> = Job::new("thumbnail").idempotent().retries(3);
    /// assert_eq!(THUMBNAIL.default_retries(), 3);
    /// ```
    #[must_use]
    pub const fn retries(mut self, retries: u32) -> Self {
        self.defaults.retries = retries;
        self
    }

    /// The execution deadline of this job's calls: `.await`, [`spawn`](crate::Call::spawn) and
    /// [`map`](crate::Pool::map) alike. Default: the pool's
    /// [`timeout`](crate::PoolBuilder::timeout). A call's own
    /// [`timeout`](crate::Call::timeout) overrides it.
    #[must_use]
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.defaults.timeout = Some(Some(timeout));
        self
    }

    /// No execution deadline for this job's calls, whatever the pool's: for batch work that
    /// runs as long as it runs.
    #[must_use]
    pub const fn no_timeout(mut self) -> Self {
        self.defaults.timeout = Some(None);
        self
    }

    /// How long this job's calls may wait for a runner slot. Default: the pool's
    /// [`queue_timeout`](crate::PoolBuilder::queue_timeout).
    #[must_use]
    pub const fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.defaults.queue_timeout = Some(timeout);
        self
    }

    /// The name the job is registered under.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// Whether the job is marked idempotent.
    pub const fn is_idempotent(&self) -> bool {
        self.defaults.idempotent
    }

    /// How many times its calls are retried by default.
    pub const fn default_retries(&self) -> u32 {
        self.defaults.retries
    }

    /// The execution deadline the job declares: `None` where it declares none (its calls take
    /// the pool's), `Some(None)` for no deadline.
    pub const fn default_timeout(&self) -> Option<Option<Duration>> {
        self.defaults.timeout
    }

    pub(crate) const fn defaults(&self) -> JobDefaults {
        self.defaults
    }
}

impl<A, R, E> Clone for Job<A, R, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A, R, E> Copy for Job<A, R, E> {}

impl<A, R, E> fmt::Debug for Job<A, R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("name", &self.name)
            .field("args", &std::any::type_name::<A>())
            .field("output", &std::any::type_name::<R>())
            .field("error", &std::any::type_name::<E>())
            .field("defaults", &self.defaults)
            .finish()
    }
}

/// A typed name for a job that runs with a resource of type `T` on its runner (a loaded model,
/// a cache), made by a [`ResourceJob`]: call it with
/// [`Resource::call`](crate::Resource::call). It has no `Pool::call`, and a
/// [`Resource`](crate::Resource) of another type does not take it, so both mistakes fail to
/// compile. [`#[job]`](crate::job) declares one from an `async fn` whose first parameter is
/// `&T`.
///
/// ```
/// use firebrand::UsingJob;
///
/// struct Model { weights: Vec<f32> }
///
/// const INFER: UsingJob<Model, String, String> = UsingJob::new("infer");
/// assert_eq!(INFER.name(), "infer");
/// ```
pub struct UsingJob<T, A, R, E = RemoteError> {
    job: Job<A, R, E>,
    resource: PhantomData<fn(&T)>,
}

impl<T, A, R, E> UsingJob<T, A, R, E> {
    /// Names the job. The name must be unique within a [`Registry`](crate::Registry).
    #[must_use]
    pub const fn new(name: &'static str) -> Self {
        Self {
            job: Job::new(name),
            resource: PhantomData,
        }
    }

    /// The execution deadline of this job's calls. Default: the pool's.
    #[must_use]
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.job = self.job.timeout(timeout);
        self
    }

    /// No execution deadline for this job's calls, whatever the pool's.
    #[must_use]
    pub const fn no_timeout(mut self) -> Self {
        self.job = self.job.no_timeout();
        self
    }

    /// The name the job is registered under.
    pub const fn name(&self) -> &'static str {
        self.job.name()
    }

    /// The job as its calls see it: name, types and defaults.
    pub(crate) const fn job(&self) -> &Job<A, R, E> {
        &self.job
    }
}

impl<T, A, R, E> Clone for UsingJob<T, A, R, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, A, R, E> Copy for UsingJob<T, A, R, E> {}

impl<T, A, R, E> fmt::Debug for UsingJob<T, A, R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsingJob")
            .field("resource", &std::any::type_name::<T>())
            .field("job", &self.job)
            .finish()
    }
}

/// Defines a typed job name with only a name: the struct, `new`, `name`, `Clone`, `Copy` and
/// `Debug` (which shows its type parameters under `args` and `$output`).
macro_rules! job_name {
    ($(#[$doc:meta])* $name:ident, $output:literal) => {
        $(#[$doc])*
        pub struct $name<A, T> {
            name: &'static str,
            types: PhantomData<fn(A) -> T>,
        }

        impl<A, T> $name<A, T> {
            /// Names the job. The name must be unique within a [`Registry`](crate::Registry).
            #[must_use]
            pub const fn new(name: &'static str) -> Self {
                Self {
                    name,
                    types: PhantomData,
                }
            }

            /// The name the job is registered under.
            pub const fn name(&self) -> &'static str {
                self.name
            }
        }

        impl<A, T> Clone for $name<A, T> {
            fn clone(&self) -> Self {
                *self
            }
        }

        impl<A, T> Copy for $name<A, T> {}

        impl<A, T> fmt::Debug for $name<A, T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("name", &self.name)
                    .field("args", &std::any::type_name::<A>())
                    .field($output, &std::any::type_name::<T>())
                    .finish()
            }
        }
    };
}

job_name! {
    /// A typed name for a streaming job: it takes an `A` and yields `T`s, which the caller
    /// reads as a [`RemoteStream`](crate::RemoteStream) from [`Pool::stream`](crate::Pool::stream).
    ///
    /// ```
    /// use firebrand::StreamJob;
    ///
    /// const TOKENS: StreamJob<String, String> = StreamJob::new("generate");
    /// assert_eq!(TOKENS.name(), "generate");
    /// ```
    StreamJob, "items"
}

job_name! {
    /// A typed name for a job that makes a resource on its runner: something that stays there,
    /// such as a loaded model, a temp file or a cache. [`Pool::resource`](crate::Pool::resource)
    /// returns a [`Resource`](crate::Resource) handle to it; jobs registered with
    /// [`Registry::register_using`](crate::Registry::register_using) use it.
    ///
    /// `T` never crosses the wire, so it needs no `Serialize`.
    ///
    /// ```
    /// use firebrand::ResourceJob;
    ///
    /// struct Model { weights: Vec<f32> }
    ///
    /// const LOAD_MODEL: ResourceJob<String, Model> = ResourceJob::new("load_model");
    /// assert_eq!(LOAD_MODEL.name(), "load_model");
    /// ```
    ResourceJob, "resource"
}

/// A job's error type, as its caller gets it back in [`CallError::Job`](crate::CallError::Job).
///
/// Implemented for every type that is `Serialize + Deserialize + Display + Debug + Send + Sync
/// + 'static` (it crosses the wire and arrives as itself: match on its variants), and for
/// [`RemoteError`], an error's `Display` text, for errors that do not serialize.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a job's error type",
    label = "a job's error comes back to its caller, so it must serialize",
    note = "derive `serde::Serialize` and `serde::Deserialize` on `{Self}` (and implement \
            `Display` and `Debug`) to get it back typed, or write `#[job(error = text)]` to \
            send only its `Display` text (for `anyhow::Error`, `std::io::Error` and the like)"
)]
pub trait JobError: fmt::Display + fmt::Debug + Send + Sync + Sized + 'static {
    /// The error from what the runner sent: its text and, for a typed error, its encoding.
    #[doc(hidden)]
    fn from_runner(message: String, encoded: Option<Vec<u8>>) -> Result<Self, String>;
}

/// An error type that crosses the wire as itself.
pub trait TypedJobError:
    Serialize + DeserializeOwned + fmt::Display + fmt::Debug + Send + Sync + 'static
{
}

impl<T> TypedJobError for T where
    T: Serialize + DeserializeOwned + fmt::Display + fmt::Debug + Send + Sync + 'static
{
}

impl<T: TypedJobError> JobError for T {
    fn from_runner(message: String, encoded: Option<Vec<u8>>) -> Result<Self, String> {
        let Some(encoded) = encoded else {
            return Err(format!(
                "the runner sent the error as text only (\"{message}\"), not as a `{}`: are \
                 the parent and the runner built from the same code?",
                std::any::type_name::<T>()
            ));
        };
        crate::wire::decode_payload(&encoded).map_err(|e| {
            format!(
                "the job's error did not decode as a `{}`: {e}",
                std::any::type_name::<T>()
            )
        })
    }
}

impl JobError for RemoteError {
    fn from_runner(message: String, _encoded: Option<Vec<u8>>) -> Result<Self, String> {
        Ok(RemoteError::new(message))
    }
}

/// What a job body's error becomes on the runner, for a job whose error type is `E`: `E`
/// itself, encoded, when `E` is typed; the `Display` text of any error when `E` is
/// [`RemoteError`].
#[diagnostic::on_unimplemented(
    message = "the job returns `{Self}`, but its handle declares the error type `{E}`",
    label = "return the declared error type",
    note = "a job with a typed error returns exactly that type; a job declared with \
            `RemoteError` (the default, or `#[job(error = text)]`) may return any `Display` error"
)]
pub trait IntoJobError<E> {
    /// The error's text and, for a typed error, its encoding.
    #[doc(hidden)]
    fn into_runner_error(self) -> (String, Option<Vec<u8>>);
}

impl<E: TypedJobError> IntoJobError<E> for E {
    fn into_runner_error(self) -> (String, Option<Vec<u8>>) {
        let message = self.to_string();
        // An error value that does not encode still reaches the caller as its text, which the
        // parent then reports as a decode failure naming the type.
        let encoded = crate::wire::encode_value(&self).ok();
        (message, encoded)
    }
}

impl<D: fmt::Display> IntoJobError<RemoteError> for D {
    fn into_runner_error(self) -> (String, Option<Vec<u8>>) {
        (self.to_string(), None)
    }
}
