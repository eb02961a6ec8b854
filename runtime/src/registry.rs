//! The registry of named jobs, and its manifest.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::{self, Display};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::{BoxStream, Stream, StreamExt as _};
use serde::Serialize;

use crate::job::{IntoJobError, Job, Payload, ResourceJob, StreamJob, UsingJob};
use crate::manifest::{JobSignature, Manifest};
use crate::wire;

/// What a job handler produces: an encoded result frame, or a failure to report.
pub(crate) type HandlerFuture =
    Pin<Box<dyn Future<Output = Result<wire::Chunks, JobFailure>> + Send>>;
pub(crate) type Handler = Arc<dyn Fn(wire::Message) -> HandlerFuture + Send + Sync>;
/// What a streaming job handler produces: encoded item frames (head and payload), or a failure.
pub(crate) type ItemStream = BoxStream<'static, Result<wire::Chunks, JobFailure>>;
pub(crate) type StreamHandler =
    Arc<dyn Fn(wire::Message) -> Result<ItemStream, JobFailure> + Send + Sync>;

/// A value a resource job made, as the runner keeps it.
pub(crate) type AnyResource = Arc<dyn Any + Send + Sync>;
/// A resource job: makes its value, which the runner then keeps.
pub(crate) type ResourceHandler = Arc<
    dyn Fn(wire::Message) -> Pin<Box<dyn Future<Output = Result<AnyResource, JobFailure>> + Send>>
        + Send
        + Sync,
>;
pub(crate) type UsingHandler =
    Arc<dyn Fn(AnyResource, wire::Message) -> HandlerFuture + Send + Sync>;
/// A synchronous job: decodes, runs and encodes on a blocking thread.
pub(crate) type BlockingHandler =
    Arc<dyn Fn(wire::Message) -> Result<wire::Chunks, JobFailure> + Send + Sync>;

/// How a registered job answers.
#[derive(Clone)]
pub(crate) enum Body {
    /// With one result.
    Call(Handler),
    /// With a stream of items.
    Stream(StreamHandler),
    /// By making a resource that stays on the runner, and answering with its id.
    Resource(ResourceHandler),
    /// With one result, from a resource the call names.
    Using(UsingHandler),
    /// With one result, computed by a synchronous closure on a blocking thread.
    Blocking(BlockingHandler),
}

/// Why a registered job did not produce a result.
#[derive(Debug)]
pub(crate) enum JobFailure {
    /// The argument bytes did not decode as the job's argument type.
    BadArgs(String),
    /// The job returned an error: its text and, for a typed error, its encoding.
    Failed {
        message: String,
        encoded: Option<Vec<u8>>,
    },
    /// The job's result did not encode.
    BadResult(String),
}

impl JobFailure {
    /// A failure that crosses as text.
    pub(crate) fn text(message: impl fmt::Display) -> Self {
        JobFailure::Failed {
            message: message.to_string(),
            encoded: None,
        }
    }

    /// A job's own error, as its job's error type `E` sends it.
    fn of<E, H: IntoJobError<E>>(error: H) -> Self {
        let (message, encoded) = error.into_runner_error();
        JobFailure::Failed { message, encoded }
    }
}

/// An error building a [`Registry`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// Two jobs were registered under one name.
    #[error("job `{name}` is registered twice")]
    Duplicate {
        /// The name registered twice.
        name: String,
    },
    /// Two `#[job]` functions declare one name.
    #[error(
        "two jobs are named `{name}`: `{first}` and `{second}`; rename one, or give it \
         `#[job(name = \"...\")]`"
    )]
    DuplicateFunction {
        /// The name declared twice.
        name: String,
        /// One function, by its path.
        first: String,
        /// The other.
        second: String,
    },
    /// A job name was empty or longer than 256 bytes.
    #[error("job name `{name}` is invalid: it must be 1 to 256 bytes long")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
}

/// Maps job names to async closures. The parent and its runners must build the same registry:
/// a runner whose [`Manifest`] differs is refused when it connects.
///
/// ```
/// use firebrand::{Job, Registry};
///
/// const DOUBLE: Job<u64, u64> = Job::new("double");
///
/// let mut registry = Registry::new();
/// registry.register(&DOUBLE, |n: u64| async move { Ok::<_, String>(n * 2) })?;
/// assert!(registry.register(&DOUBLE, |n: u64| async move { Ok::<_, String>(n) }).is_err());
/// # Ok::<(), firebrand::RegistryError>(())
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    jobs: BTreeMap<&'static str, Entry>,
}

#[derive(Clone)]
struct Entry {
    signature: JobSignature,
    body: Body,
}

impl Registry {
    /// An empty registry.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` as the body of `job`: for jobs made at run time, where
    /// [`#[job]`](crate::job) cannot declare them.
    ///
    /// The handler gets the decoded argument and returns `Result<R, H>`. An `Err` reaches the
    /// caller as [`CallError::Job`](crate::CallError::Job): the error itself when the job's
    /// error type `E` is typed (then `H` is `E`), its `Display` text as a
    /// [`RemoteError`](crate::RemoteError) when `E` is that.
    ///
    /// # Errors
    /// [`RegistryError::Duplicate`] if the name is taken; a name is never silently overwritten.
    pub fn register<A, R, E, H, F, Fut>(
        &mut self,
        job: &Job<A, R, E>,
        handler: F,
    ) -> Result<&mut Self, RegistryError>
    where
        A: Payload,
        R: Payload,
        H: IntoJobError<E>,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, H>> + Send + 'static,
    {
        let name = job.name();
        self.check_name(name)?;
        let handler: Handler = Arc::new(move |args| run_decoded::<A, R, E, H, Fut>(args, &handler));
        let output = std::any::type_name::<R>().into();
        self.insert(
            name,
            std::any::type_name::<A>(),
            output,
            Body::Call(handler),
        );
        Ok(self)
    }

    /// Registers the synchronous `handler` as the body of `job`: for work that computes or
    /// blocks without awaiting (hashing, image resizing, inference, a blocking client).
    ///
    /// The handler runs on the runner's blocking thread pool (tokio's `spawn_blocking`), under
    /// the same concurrency limit as async jobs, so it never holds a thread that async jobs or
    /// the connection need. Its argument is decoded and its result encoded on that thread too.
    ///
    /// A blocking job cannot be interrupted. When its caller cancels it, or its deadline
    /// passes, the caller gets its answer at once ([`CallError::Timeout`](crate::CallError::Timeout)
    /// at the deadline), but the closure runs on to its end and its result is discarded; until
    /// then it keeps its concurrency slot, and the runner does not idle down. Check a
    /// deadline yourself in long loops if stopping early matters.
    ///
    /// ```
    /// use firebrand::{Job, Registry};
    ///
    /// const FIB: Job<u32, u64> = Job::new("fib");
    ///
    /// fn fib(n: u32) -> u64 {
    ///     if n < 2 { n.into() } else { fib(n - 1) + fib(n - 2) }
    /// }
    ///
    /// let mut registry = Registry::new();
    /// registry.register_blocking(&FIB, |n: u32| Ok::<_, String>(fib(n)))?;
    /// # Ok::<(), firebrand::RegistryError>(())
    /// ```
    ///
    /// # Errors
    /// [`RegistryError::Duplicate`] if the name is taken.
    pub fn register_blocking<A, R, E, H, F>(
        &mut self,
        job: &Job<A, R, E>,
        handler: F,
    ) -> Result<&mut Self, RegistryError>
    where
        A: Payload,
        R: Payload,
        H: IntoJobError<E>,
        F: Fn(A) -> Result<R, H> + Send + Sync + 'static,
    {
        let name = job.name();
        self.check_name(name)?;
        let handler: BlockingHandler = Arc::new(move |args: wire::Message| {
            let args = args
                .decode::<A>()
                .map_err(|e| JobFailure::BadArgs(e.to_string()))?;
            let output = handler(args).map_err(JobFailure::of::<E, H>)?;
            ok_reply(&output)
        });
        self.insert(
            name,
            std::any::type_name::<A>(),
            std::any::type_name::<R>().into(),
            Body::Blocking(handler),
        );
        Ok(self)
    }

    /// Registers `handler` as the body of the streaming `job`: it gets the decoded argument and
    /// returns a stream of `Result<T, E>`. Each `Ok` reaches the caller as an item; the first
    /// `Err` ends the stream with [`CallError::Job`](crate::CallError::Job). The stream
    /// is polled only as fast as the caller reads: a slow reader slows the job down.
    ///
    /// ```
    /// use firebrand::{Registry, StreamJob};
    ///
    /// const COUNT: StreamJob<u32, u32> = StreamJob::new("count");
    ///
    /// let mut registry = Registry::new();
    /// registry.register_stream(&COUNT, |n: u32| {
    ///     futures_util::stream::iter((0..n).map(Ok::<_, String>))
    /// })?;
    /// # Ok::<(), firebrand::RegistryError>(())
    /// ```
    ///
    /// # Errors
    /// [`RegistryError::Duplicate`] if the name is taken.
    pub fn register_stream<A, T, E, F, S>(
        &mut self,
        job: &StreamJob<A, T>,
        handler: F,
    ) -> Result<&mut Self, RegistryError>
    where
        A: Payload,
        T: Payload,
        E: Display,
        F: Fn(A) -> S + Send + Sync + 'static,
        S: Stream<Item = Result<T, E>> + Send + 'static,
    {
        let name = job.name();
        self.check_name(name)?;
        let handler: StreamHandler = Arc::new(move |args: wire::Message| {
            let args = args
                .decode::<A>()
                .map_err(|e| JobFailure::BadArgs(e.to_string()))?;
            let items = handler(args).map(|item| {
                let item = item.map_err(JobFailure::text)?;
                let mut frames = wire::Chunks::new();
                frames
                    .push_frame(&wire::ReplyHead::Item)
                    .and_then(|()| frames.push_frame(&item))
                    .map_err(|e| JobFailure::BadResult(e.to_string()))?;
                Ok(frames)
            });
            Ok(items.boxed())
        });
        let output = format!("stream of {}", std::any::type_name::<T>());
        self.insert(
            name,
            std::any::type_name::<A>(),
            output,
            Body::Stream(handler),
        );
        Ok(self)
    }

    /// Registers `handler` as the body of the resource `job`: it makes a `T` that stays on the
    /// runner while the parent holds its [`Resource`](crate::Resource) handle.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use firebrand::{Registry, ResourceJob, UsingJob};
    ///
    /// struct Cache(Vec<u64>);
    /// const BUILD: ResourceJob<u64, Cache> = ResourceJob::new("cache.build");
    /// const LOOKUP: UsingJob<Cache, usize, u64> = UsingJob::new("cache.lookup");
    ///
    /// let mut registry = Registry::new();
    /// registry
    ///     .register_resource(&BUILD, |n: u64| async move {
    ///         Ok::<_, String>(Cache((0..n).map(|i| i * i).collect()))
    ///     })?
    ///     .register_using(&LOOKUP, |cache: Arc<Cache>, i: usize| async move {
    ///         cache.0.get(i).copied().ok_or("out of range")
    ///     })?;
    /// # Ok::<(), firebrand::RegistryError>(())
    /// ```
    ///
    /// # Errors
    /// [`RegistryError::Duplicate`] if the name is taken.
    pub fn register_resource<A, T, E, F, Fut>(
        &mut self,
        job: &ResourceJob<A, T>,
        handler: F,
    ) -> Result<&mut Self, RegistryError>
    where
        A: Payload,
        T: Send + Sync + 'static,
        E: Display,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let name = job.name();
        self.check_name(name)?;
        let handler: ResourceHandler =
            Arc::new(move |args: wire::Message| match args.decode::<A>() {
                Ok(args) => {
                    let made = handler(args);
                    Box::pin(async move {
                        let value = made.await.map_err(JobFailure::text)?;
                        Ok(Arc::new(value) as AnyResource)
                    })
                }
                Err(e) => Box::pin(std::future::ready(Err(JobFailure::BadArgs(e.to_string())))),
            });
        self.insert(
            name,
            std::any::type_name::<A>(),
            format!("resource {}", std::any::type_name::<T>()),
            Body::Resource(handler),
        );
        Ok(self)
    }

    /// Registers `handler` as the body of `job`, which runs with the `T` that a
    /// [`ResourceJob`] made on the same runner: call it with
    /// [`Resource::call`](crate::Resource::call), which takes only a `Resource<T>`.
    ///
    /// # Errors
    /// [`RegistryError::Duplicate`] if the name is taken.
    pub fn register_using<A, R, T, E, H, F, Fut>(
        &mut self,
        job: &UsingJob<T, A, R, E>,
        handler: F,
    ) -> Result<&mut Self, RegistryError>
    where
        A: Payload,
        R: Payload,
        T: Send + Sync + 'static,
        H: IntoJobError<E>,
        F: Fn(Arc<T>, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, H>> + Send + 'static,
    {
        let name = job.name();
        self.check_name(name)?;
        let handler: UsingHandler = Arc::new(move |resource: AnyResource, args| {
            let Ok(resource) = resource.downcast::<T>() else {
                let message = format!("the resource is not a `{}`", std::any::type_name::<T>());
                return Box::pin(std::future::ready(Err(JobFailure::text(message))));
            };
            run_decoded::<A, R, E, H, Fut>(args, |args| handler(resource, args))
        });
        let args = format!(
            "{} using {}",
            std::any::type_name::<A>(),
            std::any::type_name::<T>()
        );
        self.insert(
            name,
            &args,
            std::any::type_name::<R>().into(),
            Body::Using(handler),
        );
        Ok(self)
    }

    fn insert(&mut self, name: &'static str, args: &str, output: String, body: Body) {
        let signature = JobSignature {
            name: name.into(),
            args: args.into(),
            output,
        };
        self.jobs.insert(name, Entry { signature, body });
    }

    fn check_name(&self, name: &str) -> Result<(), RegistryError> {
        if name == wire::RELEASE_JOB {
            return Err(RegistryError::InvalidName { name: name.into() });
        }
        if name.is_empty() || name.len() > wire::MAX_JOB_NAME_LEN {
            return Err(RegistryError::InvalidName { name: name.into() });
        }
        if self.jobs.contains_key(name) {
            return Err(RegistryError::Duplicate { name: name.into() });
        }
        Ok(())
    }

    /// The names and types of every registered job.
    #[must_use]
    pub fn manifest(&self) -> Manifest {
        // The registry's map is sorted by name, as a manifest's jobs are.
        Manifest::from_sorted(self.jobs.values().map(|e| e.signature.clone()).collect())
    }

    pub(crate) fn body(&self, name: &str) -> Option<&Body> {
        self.jobs.get(name).map(|e| &e.body)
    }
}

/// A `#[job]` function, as the attribute submits it for [`Registry::collected`].
#[doc(hidden)]
#[derive(Debug)]
pub struct CollectedJob {
    /// The job's name on the wire.
    pub name: &'static str,
    /// The function's path, for errors.
    pub function: &'static str,
    /// Registers the job's body.
    pub register: fn(&mut Registry) -> Result<(), RegistryError>,
}

inventory::collect!(CollectedJob);

/// The registry of every `#[job]` in the binary, built once.
static COLLECTED: std::sync::OnceLock<Result<Registry, RegistryError>> = std::sync::OnceLock::new();

impl Registry {
    /// Every job that a [`#[job]`](crate::job) function linked into this binary declares:
    /// what [`run_if_child`](crate::run_if_child) serves and [`Pool::builder`](crate::Pool::builder)
    /// calls, unless given a registry of their own. Built once, on first use.
    ///
    /// # Errors
    /// [`RegistryError::DuplicateFunction`] naming both functions when two declare one name;
    /// [`RegistryError::InvalidName`] for a name over 256 bytes.
    pub fn collected() -> Result<Registry, RegistryError> {
        COLLECTED
            .get_or_init(|| {
                let mut jobs: Vec<&CollectedJob> = inventory::iter::<CollectedJob>().collect();
                // Link order is not defined: sort, so that the error names the same pair
                // every time.
                jobs.sort_by_key(|job| (job.name, job.function));
                if let Some(pair) = jobs.windows(2).find(|pair| pair[0].name == pair[1].name) {
                    return Err(RegistryError::DuplicateFunction {
                        name: pair[0].name.into(),
                        first: pair[0].function.into(),
                        second: pair[1].function.into(),
                    });
                }
                let mut registry = Registry::new();
                for job in jobs {
                    (job.register)(&mut registry)?;
                }
                Ok(registry)
            })
            .clone()
    }
}

/// Decodes the argument and starts the job with it, or fails with `BadArgs`. The job's output
/// becomes the `Ok` reply; its error, a `Failed` one.
fn run_decoded<A, R, E, H, Fut>(args: wire::Message, start: impl FnOnce(A) -> Fut) -> HandlerFuture
where
    A: Payload,
    R: Serialize + Send + 'static,
    H: IntoJobError<E>,
    Fut: Future<Output = Result<R, H>> + Send + 'static,
{
    match args.decode::<A>() {
        Ok(args) => {
            let run = start(args);
            Box::pin(async move {
                let output = run.await.map_err(JobFailure::of::<E, H>)?;
                ok_reply(&output)
            })
        }
        Err(e) => Box::pin(std::future::ready(Err(JobFailure::BadArgs(e.to_string())))),
    }
}

/// The `Ok` head and `output`, encoded.
pub(crate) fn ok_reply<T: Serialize + ?Sized>(output: &T) -> Result<wire::Chunks, JobFailure> {
    let mut reply = wire::Chunks::new();
    reply
        .push_frame(&wire::ReplyHead::Ok)
        .and_then(|()| reply.push_frame(output))
        .map_err(|e| JobFailure::BadResult(e.to_string()))?;
    Ok(reply)
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.jobs.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Job<u32, u32> = Job::new("a");
    const B: Job<String, ()> = Job::new("b");
    const A_STRING: Job<String, u32> = Job::new("a");

    fn ok<T>(v: T) -> std::future::Ready<Result<T, String>> {
        std::future::ready(Ok(v))
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut r = Registry::new();
        r.register(&A, ok).unwrap();
        let err = r.register(&A_STRING, |_s: String| ok(1)).unwrap_err();
        assert_eq!(err, RegistryError::Duplicate { name: "a".into() });
    }

    #[test]
    fn manifest_differences_name_each_job() {
        let mut parent = Registry::new();
        parent
            .register(&A, ok)
            .unwrap()
            .register(&B, |_| ok(()))
            .unwrap();
        let mut runner = Registry::new();
        runner.register(&A_STRING, |_s: String| ok(1)).unwrap();
        let (p, r) = (parent.manifest(), runner.manifest());
        assert_ne!(p.fingerprint(), r.fingerprint());
        let diff = p.differences(&r);
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(diff[0]
            .contains("`a` is `u32 -> u32` on the parent but `alloc::string::String -> u32`"));
        assert!(diff[1].contains("`b` is missing on the runner"));
        assert!(p.differences(&p.clone()).is_empty());
        assert!(p.contains("b") && !p.contains("c"));
    }
}
