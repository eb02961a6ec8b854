//! What crosses the wire: the hello, control messages, call heads and reply heads, and the
//! encoding of a whole call request.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use uuid::Uuid;

use super::{Chunks, WireError};
use crate::manifest::Manifest;

/// The runner's first message on the control stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The runner id from the boot token; it must match the runner's client certificate.
    pub runner_id: Uuid,
    /// The runner's job registry.
    pub manifest: Manifest,
    /// The runner's process id, for diagnostics.
    pub pid: u32,
    /// The secret of the claim that woke the runner's machine, when it was parked and its
    /// platform hands claims one (Fly: through the machine's metadata, read back over the
    /// machine-local API). A parent that opened a claim with a secret admits only a hello that
    /// carries it, so a copy of the boot token dialing from elsewhere cannot win the claim.
    pub claim: Option<ClaimSecret>,
}

/// The Fly machine metadata key a claim's secret is written under: the parent writes it there,
/// the machine's runner reads it back.
pub(crate) const FLY_CLAIM_KEY: &str = "firebrand_claim";

/// A claim's secret: random, made by the parent for one claim of a parked machine. `Debug`
/// does not show it.
#[derive(Clone, Serialize, Deserialize)]
pub struct ClaimSecret(String);

impl ClaimSecret {
    /// A fresh secret: 128 random bits, as 32 hex digits.
    ///
    /// # Panics
    /// If the system's random source fails, as `ring` reports it.
    #[must_use]
    pub fn random() -> Self {
        use ring::rand::SecureRandom as _;
        let mut bytes = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system's random source works");
        Self(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The secret as read back from where the parent put it.
    #[must_use]
    pub fn from_text(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The secret's text, to hand to the machine.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `other` is the same secret, compared in time that does not depend on where the
    /// two first differ.
    #[must_use]
    pub fn matches(&self, other: &ClaimSecret) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for ClaimSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClaimSecret(<redacted>)")
    }
}

/// The parent's answer to an accepted [`Hello`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum HelloReply {
    /// The runner is registered and may report ready.
    Accepted {
        /// When set, replaces the token's `idle_shutdown_after` for this connection: a parked
        /// runner claimed for a `min` slot idles as a `min` runner does, whatever its token
        /// says. `None` keeps the token's setting.
        idle_override: Option<Option<std::time::Duration>>,
    },
}

/// Messages from the runner on the control stream, after the hello.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ControlMessage {
    /// The runner wants to stop. It still serves the calls the parent already sent; the parent
    /// sends no more and closes the connection with [`close::DONE`](super::close::DONE) once they have finished.
    Draining {
        /// Why the runner is stopping.
        reason: DrainReason,
    },
    /// A line of the runner's log.
    Log(LogLine),
    /// The runner dropped this many lines of its log since it last said so, because they came
    /// faster than the connection took them.
    LogsDropped {
        /// How many.
        count: u64,
    },
}

/// One line of a runner's log, for its parent to log again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogLine {
    /// 1 (ERROR) to 5 (TRACE).
    pub level: u8,
    /// The event's target on the runner, or `stdout` or `stderr` for an output line.
    pub target: String,
    /// The message and its fields, as one line.
    pub message: String,
    /// The job of the call the event happened in.
    pub job: Option<String>,
    /// That call's trace id.
    pub trace_id: Option<String>,
}

/// Why a runner drains.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum DrainReason {
    /// It had no work for its idle shutdown period.
    Idle,
    /// It received SIGTERM.
    Terminated,
}

/// The head of a call stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallHead {
    /// The registered job name.
    pub job: String,
    /// The execution deadline, in milliseconds from when the runner reads this head; 0 for none.
    pub timeout_ms: u64,
    /// The call's trace id, which the runner's log lines for the call carry.
    pub trace_id: u128,
    /// The runner-side resource the call uses; 0 for none.
    pub resource: u64,
}

/// The head of a call's reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ReplyHead {
    /// A payload frame with the result follows.
    Ok,
    /// The job returned an error.
    Failed {
        /// The error's `Display` text.
        message: String,
        /// The error value, encoded, for a job whose error type serializes; `None` for one
        /// that crosses as text.
        encoded: Option<Vec<u8>>,
    },
    /// The job panicked; the runner keeps serving.
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The runner has no job of that name.
    UnknownJob,
    /// The argument did not decode as the job's argument type.
    BadArgs {
        /// The decoder's error.
        message: String,
    },
    /// The job's result did not encode.
    BadResult {
        /// The encoder's error.
        message: String,
    },
    /// The job ran past its deadline and was aborted.
    TimedOut,
    /// The request was malformed.
    Malformed {
        /// What was wrong.
        message: String,
    },
    /// A streaming job's item: a payload frame follows, then the next head.
    Item,
    /// A streaming job has yielded its last item.
    End,
}

/// [`CallHead`] as the parent encodes it, without copying the job name.
#[derive(Serialize)]
pub(crate) struct CallHeadRef<'a> {
    pub(crate) job: &'a str,
    pub(crate) timeout_ms: u64,
    pub(crate) trace_id: u128,
    pub(crate) resource: u64,
}

/// Encodes a whole call request, head and argument. An argument whose encoding is longer than
/// `max_payload_len` is refused here, before anything is sent, as the runner would refuse it.
pub(crate) fn encode_request<A: Serialize>(
    job: &str,
    timeout_ms: u64,
    trace_id: u128,
    resource: u64,
    args: &A,
    max_payload_len: usize,
) -> Result<SmallVec<[Bytes; 2]>, WireError> {
    let head = CallHeadRef {
        job,
        timeout_ms,
        trace_id,
        resource,
    };
    encode_request_into(Chunks::new(), &head, args, max_payload_len)?
        .ok_or_else(|| WireError::Encode("a request without a size bound spilled".into()))
}

/// [`encode_request`] for a call's request (no resource) that fits in the first 64 KiB; `None`,
/// having encoded at most that much, for one that does not, which is then worth encoding off
/// the caller's thread.
pub(crate) fn encode_small_request<A: Serialize>(
    head: &CallHeadRef<'_>,
    args: &A,
    max_payload_len: usize,
) -> Result<Option<SmallVec<[Bytes; 2]>>, WireError> {
    encode_request_into(Chunks::first_chunk_only(), head, args, max_payload_len)
}

/// The request in `chunks`, or `None` if they hold only a first chunk and it overflowed.
fn encode_request_into<A: Serialize>(
    mut chunks: Chunks,
    head: &CallHeadRef<'_>,
    args: &A,
    max_payload_len: usize,
) -> Result<Option<SmallVec<[Bytes; 2]>>, WireError> {
    chunks.push_frame(head)?;
    let head_len = chunks.len();
    match chunks.push_frame(args) {
        Ok(()) => {}
        Err(_) if chunks.spilled() => return Ok(None),
        Err(e) => return Err(e),
    }
    // Less the argument frame's 4-byte length prefix.
    let args_len = chunks.len() - head_len - 4;
    if args_len > max_payload_len {
        return Err(WireError::Encode(format!(
            "the argument is {args_len} bytes encoded, more than the pool's max_payload_len of \
             {max_payload_len} bytes"
        )));
    }
    Ok(Some(chunks.into_bytes()))
}
