//! A runner's logs, sent to its parent over its own connection: its `tracing` events (through
//! [`log_layer`]) and, where the backend does not bring them to the parent already, the lines
//! of its stdout and stderr. The parent logs each again, with the runner's id and machine, and
//! the job and trace id of the call that caused it.
//!
//! Bounded: records wait in a queue of [`QUEUE_LEN`]; when the parent reads slowly and the queue
//! is full, a record is dropped and counted, never waited for, and the next record sent says
//! how many were dropped. A job's latency does not depend on how fast its logs leave.

use std::io::{BufRead as _, Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use super::relayed_output::Stream;
use crate::wire::LogLine;

/// Records that may wait to be sent; past that, new ones are dropped and counted. With
/// [`MAX_LOG_LINE`] it bounds the queue at 8 MiB, and a few hundred KiB for usual lines.
pub(crate) const QUEUE_LEN: usize = 1024;

/// The most lines a runner sends its parent a second, with bursts of [`LOG_BURST`]; past it,
/// lines are dropped and counted. Logs then take a bounded share of the connection and of both
/// ends' CPU, and calls keep their latency while a job logs in a tight loop.
pub const MAX_LOG_LINES_PER_SECOND: u32 = 10_000;

/// How many lines may go at once beyond the steady rate.
pub const LOG_BURST: u32 = 2_000;

/// The longest message forwarded; a longer one is cut there, and says so.
pub(crate) const MAX_LOG_LINE: usize = 8 << 10;

/// The queue, made on first use by whichever of the layer, the output capture and the sender
/// comes first.
struct Queue {
    tx: tokio::sync::mpsc::Sender<LogLine>,
    rx: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<LogLine>>>,
    dropped: AtomicU64,
    /// Whether output lines are forwarded: once the pool's filter is set, unless it is `off`.
    forward_output: AtomicBool,
}

/// The pool's filter for this runner's events (its `runner_log_level`), set once the boot
/// token is read. Until then nothing is kept: an app that adds the layer in a process that
/// never serves keeps nothing.
static FILTER: OnceLock<EnvFilter> = OnceLock::new();

static QUEUE: OnceLock<Queue> = OnceLock::new();

fn queue() -> &'static Queue {
    QUEUE.get_or_init(|| {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE_LEN);
        Queue {
            tx,
            rx: parking_lot::Mutex::new(Some(rx)),
            dropped: AtomicU64::new(0),
            forward_output: AtomicBool::new(false),
        }
    })
}

/// A level as a number: 1 for ERROR up to 5 for TRACE.
pub(crate) fn level_number(level: Level) -> u8 {
    match level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

/// Keeps the events that `directive` (an `EnvFilter` directive, which the pool checked) lets
/// through, from now on. The first call wins: a runner serves one pool.
pub(crate) fn set_filter(directive: &str) {
    let filter = EnvFilter::builder().parse(directive).unwrap_or_else(|e| {
        eprintln!("firebrand runner: log filter `{directive}`: {e}; logging nothing");
        EnvFilter::new("off")
    });
    let forward_output = filter.max_level_hint() != Some(LevelFilter::OFF);
    if FILTER.set(filter).is_ok() {
        queue()
            .forward_output
            .store(forward_output, Ordering::Relaxed);
        // Callsites asked before the filter was set were told "sometimes"; the global
        // maximum level is computed again with it.
        tracing::callsite::rebuild_interest_cache();
    }
}

/// Queues `line` without waiting; a full queue drops it and counts it.
fn push(line: LogLine) {
    let queue = queue();
    if queue.tx.try_send(line).is_err() {
        queue.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// The records queued for the parent, and the count of those dropped since the last call. The
/// serve loop takes the receiver for a connection and gives it back when it ends.
pub(crate) fn take_receiver() -> Option<tokio::sync::mpsc::Receiver<LogLine>> {
    queue().rx.lock().take()
}

pub(crate) fn give_back(rx: tokio::sync::mpsc::Receiver<LogLine>) {
    *queue().rx.lock() = Some(rx);
}

/// How many records were dropped since the last call.
pub(crate) fn take_dropped() -> u64 {
    queue().dropped.swap(0, Ordering::Relaxed)
}

/// Counts a record dropped after it left the queue: past the sending rate.
pub(crate) fn count_dropped() {
    queue().dropped.fetch_add(1, Ordering::Relaxed);
}

/// The pace of sending: [`MAX_LOG_LINES_PER_SECOND`], bursts of [`LOG_BURST`].
pub(crate) fn pace() -> governor::DefaultDirectRateLimiter {
    let per_second =
        std::num::NonZeroU32::new(MAX_LOG_LINES_PER_SECOND).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = std::num::NonZeroU32::new(LOG_BURST).unwrap_or(std::num::NonZeroU32::MIN);
    governor::RateLimiter::direct(governor::Quota::per_second(per_second).allow_burst(burst))
}

/// A [`tracing_subscriber::Layer`] that sends a runner's `tracing` events to its parent, which
/// logs them again with the runner's id and machine and the call's job and trace id.
/// [`run_if_child`](crate::run_if_child) installs it when the app has no subscriber of its own;
/// an app that has one adds this layer to it.
///
/// Events of the QUIC and TLS stacks (`quinn`, `rustls`) are never sent: sending them would
/// make more of them.
///
/// ```no_run
/// use tracing_subscriber::layer::SubscriberExt as _;
///
/// let subscriber = tracing_subscriber::registry()
///     .with(firebrand::runner::log_layer())
///     .with(tracing_subscriber::fmt::layer());
/// tracing::subscriber::set_global_default(subscriber).unwrap();
/// ```
///
/// The layer filters for itself (a per-layer filter): what it does not send costs an atomic
/// load, and it does not enable anything for the subscriber's other layers.
#[must_use]
pub fn log_layer<S>() -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    let _ = queue();
    LogLayer.with_filter(RunnerFilter)
}

/// The subscriber [`run_if_child`](crate::run_if_child) installs when the app has none: the
/// events go to the parent and, when `machine_log` (the parent does not see this process's
/// output), to this process's stderr as well, compact, one line each, so that the machine's own
/// log (Fly's, `kubectl logs`) has them even when the parent is gone. They are written there as
/// they happen, from a descriptor taken before the output is captured, so none is forwarded
/// twice and none waits in the queue for a parent that may never read it.
pub(crate) fn default_subscriber(machine_log: bool) -> impl Subscriber + Send + Sync + 'static {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::Layer as _;
    let _ = queue();
    let stderr = machine_log
        .then(|| rustix::io::dup(std::io::stderr()))
        .and_then(|copy| match copy {
            Ok(copy) => Some(copy),
            Err(e) => {
                eprintln!("firebrand runner: cannot log to stderr: {e}");
                None
            }
        })
        .map(|copy| {
            tracing_subscriber::fmt::layer()
                .compact()
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(std::fs::File::from(copy)))
        });
    tracing_subscriber::registry().with(LogLayer.and_then(stderr).with_filter(RunnerFilter))
}

/// [`FILTER`], as a per-layer filter, and never the events of the QUIC and TLS stacks, whose
/// sending would make more of them.
struct RunnerFilter;

impl RunnerFilter {
    fn filter() -> Option<&'static EnvFilter> {
        FILTER.get()
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for RunnerFilter
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, metadata: &tracing::Metadata<'_>, cx: &Context<'_, S>) -> bool {
        let target = metadata.target();
        !target.starts_with("quinn")
            && !target.starts_with("rustls")
            && Self::filter().is_some_and(|f| Filter::<S>::enabled(f, metadata, cx))
    }

    fn callsite_enabled(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        match Self::filter() {
            Some(filter) => Filter::<S>::callsite_enabled(filter, metadata),
            // Asked again once the filter is set (`rebuild_interest_cache`).
            None => tracing::subscriber::Interest::sometimes(),
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Self::filter().and_then(|f| Filter::<S>::max_level_hint(f))
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        cx: Context<'_, S>,
    ) {
        if let Some(f) = Self::filter() {
            Filter::<S>::on_new_span(f, attrs, id, cx);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        cx: Context<'_, S>,
    ) {
        if let Some(f) = Self::filter() {
            Filter::<S>::on_record(f, id, values, cx);
        }
    }

    fn on_enter(&self, id: &tracing::span::Id, cx: Context<'_, S>) {
        if let Some(f) = Self::filter() {
            Filter::<S>::on_enter(f, id, cx);
        }
    }

    fn on_exit(&self, id: &tracing::span::Id, cx: Context<'_, S>) {
        if let Some(f) = Self::filter() {
            Filter::<S>::on_exit(f, id, cx);
        }
    }

    fn on_close(&self, id: tracing::span::Id, cx: Context<'_, S>) {
        if let Some(f) = Self::filter() {
            Filter::<S>::on_close(f, id, cx);
        }
    }
}

/// The layer [`log_layer`] filters.
struct LogLayer;

/// The job and trace id of a call, kept with its span.
#[derive(Default)]
struct CallFields {
    job: Option<String>,
    trace_id: Option<String>,
}

impl Visit for CallFields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "job" => self.job = Some(format!("{value:?}")),
            "trace_id" => self.trace_id = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

/// An event's message and fields, as one line: `message key=value ...`.
#[derive(Default)]
struct Message {
    message: Option<String>,
    fields: String,
}

impl Message {
    fn line(self) -> String {
        let mut line = self.message.unwrap_or_default();
        line.push_str(&self.fields);
        line
    }
}

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        if field.name() == "message" && self.message.is_none() {
            self.message = Some(format!("{value:?}"));
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for LogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        if attrs.metadata().name() != "call" {
            return;
        }
        let mut fields = CallFields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let metadata = event.metadata();
        let level = level_number(*metadata.level());
        let target = metadata.target();
        let mut message = Message::default();
        event.record(&mut message);
        let (mut job, mut trace_id) = (None, None);
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                if let Some(call) = span.extensions().get::<CallFields>() {
                    job.clone_from(&call.job);
                    trace_id.clone_from(&call.trace_id);
                    break;
                }
            }
        }
        push(LogLine {
            level,
            target: target.to_owned(),
            message: cut(message.line(), MAX_LOG_LINE),
            job,
            trace_id,
        });
    }
}

/// `text` cut to at most `max` bytes, on a character boundary, saying that it was.
pub(crate) fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" [cut]");
    }
    text
}

/// Sends this process's stdout and stderr lines to the parent too, for a backend that does not
/// bring them there: each descriptor becomes a pipe that a thread reads, writing every line on
/// to where the descriptor pointed before (the machine's own log) and queueing it. Lines that
/// are not UTF-8 are sent lossily. [`OutputCapture::finish`] puts the descriptors back and waits
/// for the last lines, so that nothing written before the process exits is lost.
pub(crate) fn capture_output() -> OutputCapture {
    let mut captured = Vec::new();
    for stream in Stream::BOTH {
        match capture(stream) {
            Ok(one) => captured.push(one),
            Err(e) => {
                tracing::warn!(stream = stream.name(), error = %e, "cannot forward the runner's output")
            }
        }
    }
    OutputCapture(captured)
}

/// The captured descriptors, and the threads that read them.
pub(crate) struct OutputCapture(Vec<Captured>);

struct Captured {
    stream: Stream,
    /// A copy of where `stream` pointed before, to point it back.
    original: OwnedFd,
    reader: std::thread::JoinHandle<()>,
}

/// How long the exit waits for the readers to write the last lines on.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

impl OutputCapture {
    /// Points stdout and stderr back where they were, which closes the pipes' last write
    /// ends, and waits (at most [`FLUSH_WAIT`]) until the readers have written every line on.
    pub(crate) fn finish(self) {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let deadline = std::time::Instant::now() + FLUSH_WAIT;
        for captured in self.0 {
            if let Err(error) = captured.stream.point_at(&captured.original) {
                // The pipe stays open, so its reader never sees its end: the wait below runs
                // to its deadline, and the lines written so far are on their way all the same.
                eprintln!(
                    "firebrand runner: cannot point {} back: {error}",
                    captured.stream.name()
                );
            }
            while !captured.reader.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

fn capture(stream: Stream) -> std::io::Result<Captured> {
    let (read, write) = rustix::pipe::pipe()?;
    let original = rustix::io::dup(stream.fd())?;
    let tee = rustix::io::dup(stream.fd())?;
    stream.point_at(&write)?;
    drop(write);
    let reader = std::thread::Builder::new()
        .name(format!("firebrand-{}", stream.name()))
        .spawn(move || forward_lines(std::fs::File::from(read), tee, stream.name()))?;
    Ok(Captured {
        stream,
        original,
        reader,
    })
}

fn forward_lines(read: std::fs::File, original: OwnedFd, stream: &'static str) {
    let mut original = std::fs::File::from(original);
    let mut reader = std::io::BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Bounded: a line longer than the limit is sent in pieces.
        match (&mut reader)
            .take(MAX_LOG_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let _ = original.write_all(&line);
        if !queue().forward_output.load(Ordering::Relaxed) {
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        push(LogLine {
            level: level_number(Level::INFO),
            target: stream.to_owned(),
            message: text.trim_end_matches(['\n', '\r']).to_owned(),
            job: None,
            trace_id: None,
        });
    }
}
