//! Typed job handles.

use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A value that can cross the wire as a job's argument or result.
///
/// Implemented for every `Serialize + DeserializeOwned + Send + 'static` type.
pub trait Payload: Serialize + DeserializeOwned + Send + 'static {}

impl<T: Serialize + DeserializeOwned + Send + 'static> Payload for T {}

/// A typed name for a remote job: the name it is registered under, its argument type `A` and
/// its result type `R`.
///
/// Declare one `const` per job in a module that both the parent and the runner compile, so that
/// calling a job with the wrong argument type is a compile error.
///
/// ```
/// use firebrand::Job;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct ResizeArgs { width: u32, height: u32 }
///
/// const RESIZE: Job<ResizeArgs, Vec<u8>> = Job::new("resize");
/// assert_eq!(RESIZE.name(), "resize");
/// ```
pub struct Job<A, R> {
    name: &'static str,
    idempotent: bool,
    retries: u32,
    // `fn(A) -> R` keeps the handle `Send + Sync + Copy` whatever `A` and `R` are.
    types: PhantomData<fn(A) -> R>,
}

impl<A, R> Job<A, R> {
    /// Names a job. The name must be unique within a [`Registry`](crate::Registry).
    #[must_use]
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            idempotent: false,
            retries: 0,
            types: PhantomData,
        }
    }

    /// Marks the job safe to run more than once for one call, which [`retries`](Job::retries)
    /// requires.
    #[must_use]
    pub const fn idempotent(mut self) -> Self {
        self.idempotent = true;
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
        self.retries = retries;
        self
    }

    /// The name the job is registered under.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// Whether the job is marked idempotent.
    pub const fn is_idempotent(&self) -> bool {
        self.idempotent
    }

    /// How many times its calls are retried by default.
    pub const fn default_retries(&self) -> u32 {
        self.retries
    }
}

impl<A, R> Clone for Job<A, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A, R> Copy for Job<A, R> {}

impl<A, R> fmt::Debug for Job<A, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("name", &self.name)
            .field("args", &std::any::type_name::<A>())
            .field("output", &std::any::type_name::<R>())
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
