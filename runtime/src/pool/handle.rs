//! The parent's handle on one runner: its connection, its calls, and its machine's lifecycle.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use smallvec::SmallVec;

use quinn::{ConnectionError, ReadError, RecvStream, SendStream, WriteError};
use tokio::sync::watch;

use super::Shared;
use crate::backend::{Machine, Park, ParkTicket, Parked};
use crate::error::{CallError, RemoteError, Report, RunnerId};
use crate::wire::{self, close, ControlMessage, ReplyHead, WireError};

/// The largest frame the parent reads from a runner's control stream: a log line of
/// [`MAX_LOG_LINE`](crate::runner::MAX_LOG_LINE) with its target, job and trace id, with room
/// to spare. An honest runner never sends more; a runner that does is cut off from the
/// parent's log, and its connection carries on.
const MAX_CONTROL_FRAME: usize = 4 * crate::runner::MAX_LOG_LINE;

/// What the parent keeps of a log line's target (a module path).
const MAX_LOG_TARGET: usize = 256;

/// One connected runner.
pub(crate) struct RunnerHandle {
    pub(crate) id: RunnerId,
    pub(crate) connection: quinn::Connection,
    pub(crate) machine: String,
    /// The concurrency the runner was booted with: it takes no more at once.
    pub(crate) capacity: u32,
    /// What the pool needs to admit the runner again, should its machine be parked.
    pub(crate) ticket: ParkTicket,
    /// Set when the runner drained for being idle and its backend parks such machines.
    parks_as: OnceLock<Park>,
    max_payload_len: usize,
    /// How the machine ended, once it has: the best explanation for a lost call.
    exit: OnceLock<String>,
    /// Why the parent closed the connection, when it did.
    released: OnceLock<&'static str>,
}

/// A call's stream pair. Dropped before the reply is read, it cancels the call on the runner.
pub(crate) struct CallStream {
    send: SendStream,
    pub(crate) recv: RecvStream,
    /// Set once the reply has been read to its end: nothing to cancel.
    pub(crate) done: bool,
}

impl CallStream {
    /// Tells the runner that the parent holds a handle to the resource this call made, so the
    /// runner keeps it. Any other end of the stream drops the resource on the runner.
    pub(crate) fn claim(&mut self) {
        let _ = self.recv.stop(wire::stream::CLAIMED);
        self.done = true;
    }
}

impl Drop for CallStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.send.reset(wire::stream::CANCELLED);
            let _ = self.recv.stop(wire::stream::CANCELLED);
        }
    }
}

impl RunnerHandle {
    pub(crate) fn new(
        id: RunnerId,
        connection: quinn::Connection,
        machine: String,
        ticket: ParkTicket,
        max_payload_len: usize,
    ) -> Self {
        Self {
            id,
            connection,
            machine,
            capacity: ticket.capacity,
            ticket,
            parks_as: OnceLock::new(),
            max_payload_len,
            exit: OnceLock::new(),
            released: OnceLock::new(),
        }
    }

    /// Closes the connection: the runner has drained and the parent is done with it. A runner
    /// whose machine is to be suspended is told so, and stays up for it.
    pub(crate) fn release(&self, why: &'static str) {
        let _ = self.released.set(why);
        let code = match self.parks_as.get() {
            Some(Park::Suspend) => close::PARKED,
            _ => close::DONE,
        };
        self.connection.close(code, why.as_bytes());
    }

    /// Sends an encoded request and returns the encoded result, within `timeout`.
    pub(crate) async fn call(
        &self,
        request: SmallVec<[Bytes; 2]>,
        timeout: Option<Duration>,
    ) -> Result<Reply, CallError> {
        let stream = self.open(request).await.map_err(|e| self.wire_error(e))?;
        self.reply(stream, timeout).await
    }

    /// Opens a call's stream and sends its request.
    pub(crate) async fn open(
        &self,
        mut request: SmallVec<[Bytes; 2]>,
    ) -> Result<CallStream, WireError> {
        let (send, recv) = self.connection.open_bi().await?;
        let mut stream = CallStream {
            send,
            recv,
            done: false,
        };
        stream.send.write_all_chunks(&mut request).await?;
        let _ = stream.send.finish();
        Ok(stream)
    }

    /// Reads the reply to a call whose request was sent on `stream`, the job's run bounded by
    /// `timeout` (see [`within`](Self::within)).
    pub(crate) async fn reply(
        &self,
        mut stream: CallStream,
        timeout: Option<Duration>,
    ) -> Result<Reply, CallError> {
        let CallStream { send, recv, .. } = &mut stream;
        let first = self
            .within(timeout, send, async {
                Ok(recv.read_chunk(usize::MAX, true).await?)
            })
            .await?;
        // The reply is on its way: its transfer is not the job's time.
        self.read_reply(&mut stream, first)
            .await
            .map_err(|failure| self.failure_error(failure, timeout))
    }

    /// Reads the reply to a resource call, within `timeout`: the new resource's id. The runner
    /// holds the resource unclaimed until [`CallStream::claim`].
    pub(crate) async fn resource_reply(
        &self,
        stream: &mut CallStream,
        timeout: Option<Duration>,
    ) -> Result<u64, CallError> {
        let CallStream { send, recv, .. } = stream;
        let read = async {
            let head: ReplyHead = wire::read_head(recv).await?;
            match head {
                ReplyHead::Ok => {
                    let id = wire::read_frame(recv, wire::MAX_HEAD_LEN).await?;
                    Ok(id.decode::<u64>()?)
                }
                other => Err(Failure::Reply(other)),
            }
        };
        self.within(timeout, send, read).await
    }

    /// Runs `read`, the wait for a reply to start, with the call's `timeout` on the job's run.
    ///
    /// The runner enforces the timeout from the moment it has the whole argument, and answers
    /// [`ReplyHead::TimedOut`] when it passes; this is the parent's backstop. Time the argument
    /// spends in transit is not the job's: when `timeout` passes before the runner has
    /// acknowledged all of the argument (a large one on a slow or lossy link), the wait goes on
    /// until it has, and then for `timeout` more. A link that carries nothing at all is caught
    /// by `peer_timeout` instead.
    async fn within<T>(
        &self,
        timeout: Option<Duration>,
        send: &SendStream,
        read: impl std::future::Future<Output = Result<T, Failure>>,
    ) -> Result<T, CallError> {
        let outcome = match timeout {
            None => read.await,
            Some(after) => {
                tokio::pin!(read);
                match tokio::time::timeout(after, &mut read).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        // Looked at only now, not on every call: waiting on `stopped` costs a
                        // wake-up when the acknowledgement comes.
                        let delivered = send.stopped();
                        tokio::pin!(delivered);
                        let in_transit =
                            futures_util::FutureExt::now_or_never(&mut delivered).is_none();
                        if in_transit {
                            tracing::debug!(
                                timeout = ?after,
                                "the argument is still in transit at the call timeout"
                            );
                            tokio::select! {
                                outcome = &mut read => return self.outcome(outcome, timeout),
                                _ = delivered => {}
                            }
                            tokio::time::timeout(after, &mut read)
                                .await
                                .map_err(|_| CallError::Timeout { after })?
                        } else {
                            return Err(CallError::Timeout { after });
                        }
                    }
                }
            }
        };
        self.outcome(outcome, timeout)
    }

    fn outcome<T>(
        &self,
        outcome: Result<T, Failure>,
        timeout: Option<Duration>,
    ) -> Result<T, CallError> {
        outcome.map_err(|failure| self.failure_error(failure, timeout))
    }

    fn failure_error(&self, failure: Failure, timeout: Option<Duration>) -> CallError {
        match failure {
            Failure::Reply(ReplyHead::TimedOut) => CallError::Timeout {
                after: timeout.unwrap_or_default(),
            },
            Failure::Reply(head) => reply_error(head),
            Failure::Wire(e) => self.wire_error(e),
        }
    }

    pub(crate) fn max_payload_len(&self) -> usize {
        self.max_payload_len
    }

    /// Reads the rest of a reply whose first chunk is `first`.
    async fn read_reply(
        &self,
        stream: &mut CallStream,
        first: Option<quinn::Chunk>,
    ) -> Result<Reply, Failure> {
        let limit = wire::message_limit(self.max_payload_len);
        let mut reply = wire::read_message_after(first, &mut stream.recv, limit).await?;
        stream.done = true;
        match reply
            .split_frame(wire::MAX_HEAD_LEN)?
            .decode::<ReplyHead>()?
        {
            ReplyHead::Ok => Ok(reply.split_frame(self.max_payload_len)?),
            other => Err(Failure::Reply(other)),
        }
    }

    pub(crate) fn wire_error(&self, error: WireError) -> CallError {
        match error {
            WireError::Read(ReadError::ConnectionLost(e))
            | WireError::Write(WriteError::ConnectionLost(e))
            | WireError::Connection(e) => self.lost(&e),
            e => match self.connection.close_reason() {
                Some(reason) => self.lost(&reason),
                None => CallError::Protocol {
                    message: e.to_string(),
                },
            },
        }
    }

    fn lost(&self, error: &ConnectionError) -> CallError {
        let reason = match self.exit.get() {
            Some(exit) => format!("runner process ({}) exited: {exit}", self.machine),
            None => error.to_string(),
        };
        CallError::RunnerLost {
            runner: self.id,
            reason,
        }
    }
}

/// A call's encoded result, as the chunks it arrived in.
pub(crate) type Reply = wire::Message;

enum Failure {
    Reply(ReplyHead),
    Wire(WireError),
}

impl<E: Into<WireError>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Wire(e.into())
    }
}

/// `error` with the job it names set to `job`: a runner's reply does not repeat the name.
pub(crate) fn named(error: CallError, job: &str) -> CallError {
    match error {
        CallError::UnknownJob { .. } => CallError::UnknownJob { job: job.into() },
        other => other,
    }
}

pub(crate) fn reply_error(head: ReplyHead) -> CallError {
    match head {
        ReplyHead::Failed { message, encoded } => {
            CallError::Job(RemoteError::from_runner(message, encoded))
        }
        ReplyHead::Panicked { message } => CallError::Panicked { message },
        // The caller names the job: see `named`.
        ReplyHead::UnknownJob => CallError::UnknownJob { job: String::new() },
        ReplyHead::BadArgs { message } => CallError::Decode { message },
        ReplyHead::BadResult { message } => CallError::Encode { message },
        ReplyHead::Malformed { message } => CallError::Protocol { message },
        ReplyHead::Item | ReplyHead::End => CallError::Protocol {
            message: "a call was answered as a stream: is the job registered as a stream job?"
                .into(),
        },
        ReplyHead::Ok | ReplyHead::TimedOut => unreachable!("handled by the caller"),
    }
}

/// Reads one message of a runner's control stream, of at most [`MAX_CONTROL_FRAME`].
async fn read_control(control: &mut RecvStream) -> Result<ControlMessage, WireError> {
    wire::read_frame(control, MAX_CONTROL_FRAME).await?.decode()
}

/// Watches a ready runner until it ends, then forgets it and terminates its machine.
pub(crate) async fn supervise(
    shared: Arc<Shared>,
    handle: Arc<RunnerHandle>,
    mut machine: Box<dyn Machine>,
    mut control: RecvStream,
    mut closing: watch::Receiver<bool>,
) {
    let mut control_open = true;
    let mut drained_idle = false;
    let mut lost = false;
    let mut park = false;
    let log_pace = crate::runner::log_pace();
    let mut refused_lines = 0_u64;
    let ended = loop {
        tokio::select! {
            message = read_control(&mut control), if control_open => match message {
                Ok(ControlMessage::Draining { reason }) => {
                    tracing::info!(?reason, "runner draining");
                    drained_idle = reason == wire::DrainReason::Idle;
                    // Before placement hears of the drain: its release closes the connection
                    // as parking asks.
                    if let (true, Some(parking)) = (drained_idle, shared.parking) {
                        let _ = handle.parks_as.set(parking.mode);
                    }
                    shared.drive(|state| state.scheduler.runner_draining(handle.id, drained_idle));
                }
                Ok(ControlMessage::Log(mut line)) => {
                    // The runner paces its lines and cuts long ones; the parent holds each
                    // runner to that too, so that one that does not (a bug, an attacker with
                    // a runner's credential) cannot flood the parent's log.
                    if log_pace.check().is_err() {
                        refused_lines += 1;
                        continue;
                    }
                    if refused_lines > 0 {
                        shared.observer.runner_logs_dropped(handle.id, &handle.machine, refused_lines, true);
                        refused_lines = 0;
                    }
                    line.message = crate::runner::cut_log_text(line.message, crate::runner::MAX_LOG_LINE);
                    line.target = crate::runner::cut_log_text(line.target, MAX_LOG_TARGET);
                    shared.observer.runner_log(handle.id, &handle.machine, &line);
                }
                Ok(ControlMessage::LogsDropped { count }) => {
                    shared.observer.runner_logs_dropped(handle.id, &handle.machine, count, false);
                }
                Err(error) => {
                    if let WireError::TooLarge { len, limit } = error {
                        tracing::warn!(len, limit, "runner sent a control frame over the limit: its logs are no longer read");
                    }
                    // Otherwise the connection is ending; its own branch says why.
                    control_open = false;
                    if refused_lines > 0 {
                        shared.observer.runner_logs_dropped(handle.id, &handle.machine, refused_lines, true);
                        refused_lines = 0;
                    }
                }
            },
            error = handle.connection.closed() => break match handle.released.get() {
                Some(why) => {
                    park = handle.parks_as.get().is_some();
                    (*why).to_string()
                }
                None => {
                    shared.drive(|state| state.scheduler.runner_dead(handle.id));
                    lost = true;
                    format!("connection lost: {error}")
                }
            },
            exit = machine.exited() => {
                // First, so that the calls failed below free no slot on it for a waiter.
                shared.drive(|state| state.scheduler.runner_dead(handle.id));
                let _ = handle.exit.set(exit.description.clone());
                // Fail this runner's calls now rather than at the QUIC idle timeout.
                handle.connection.close(close::RUNNER_EXIT, b"runner process exited");
                lost = true;
                break format!("process exited: {}", exit.description);
            }
            _ = closing.wait_for(|closing| *closing) => {
                handle.connection.close(close::DONE, b"pool closed");
                break "pool closed".to_string();
            }
        }
    };
    if lost {
        tracing::warn!(reason = %ended, "runner ended");
    } else {
        tracing::info!(reason = %ended, "runner ended");
    }
    shared.drive(|state| state.scheduler.runner_gone(handle.id));
    let runner = handle.id;
    if park {
        park_machine(&shared, &handle, machine).await;
        return;
    }
    if lost {
        shared.observer.runner_lost(runner, &ended);
    } else if drained_idle {
        shared
            .observer
            .emit(|| super::PoolEvent::RunnerIdleStopped { runner });
    } else {
        let reason = ended.clone();
        shared
            .observer
            .emit(|| super::PoolEvent::RunnerStopped { runner, reason });
    }
    super::hooks::call(
        &shared.config.hooks.shrink,
        super::Shrink {
            runner: handle.id,
            reason: ended,
        },
    );
    if let Err(e) = machine.terminate(shared.config.terminate_grace).await {
        tracing::error!(error = %Report(&e), machine = %handle.machine, "terminating the runner failed");
    }
}

/// Parks the machine of a runner that idled out, as its backend parks them.
async fn park_machine(shared: &Shared, handle: &RunnerHandle, machine: Box<dyn Machine>) {
    let ticket = handle.ticket.clone();
    // From now on its dials are refused, quietly, until a claim expects it again.
    shared.listener.parked(ticket.runner);
    let parked = match machine.park(ticket, shared.config.terminate_grace).await {
        Ok(parked) => parked,
        Err(e) => {
            tracing::error!(error = %Report(&e), machine = %handle.machine, "parking the runner failed");
            Parked::Destroyed
        }
    };
    tracing::info!(?parked, machine = %handle.machine, "runner parked");
    shared
        .observer
        .runner_parked(handle.id, &handle.machine, parked);
    shared.parked_changed();
    if let (Parked::As(_), Some(parking)) = (parked, shared.parking) {
        // The backend destroys the machine at its time-to-live unless a boot claims it first;
        // either way the count changes without a pool event. Not a pool task: shutdown does
        // not wait for it.
        let shared = shared.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(parking.ttl).await;
            if let Some(shared) = shared.upgrade() {
                shared.parked_changed();
            }
        });
    }
    super::hooks::call(
        &shared.config.hooks.shrink,
        super::Shrink {
            runner: handle.id,
            reason: "parked".into(),
        },
    );
}
