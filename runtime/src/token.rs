//! The boot token: everything a runner needs to reach its parent, in one environment variable.

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tls::IssuedCert;
use crate::wire;

/// The environment variable that carries a runner's [`BootToken`].
pub const PARENT_ENV: &str = "FIREBRAND_PARENT";

/// The environment variable that names an inherited file descriptor to read a runner's
/// [`BootToken`] from, instead of [`PARENT_ENV`]. The local backend hands tokens over this way:
/// a process's initial environment stays readable in `/proc/<pid>/environ` for its whole life,
/// whatever the process does to its copy, and the token holds the runner's private key.
pub const PARENT_FD_ENV: &str = "FIREBRAND_PARENT_FD";

/// The descriptor number the local backend gives the token pipe in a runner it executes.
pub(crate) const PARENT_FD: i32 = 3;

/// Set by the local backend when it relays a runner's stdout and stderr through pipes that the
/// parent reads: the runner then keeps writing when that parent is gone.
pub(crate) const RELAYED_OUTPUT_ENV: &str = "FIREBRAND_RELAYED_OUTPUT";

/// Set in a fork server template's environment: [`run_if_child`](crate::run_if_child) then
/// serves as a fork server instead of as a runner.
pub(crate) const FORK_SERVER_ENV: &str = "FIREBRAND_FORK_SERVER";

const PREFIX: &str = "fb1.";
const MAX_TOKEN_LEN: usize = 64 * 1024;

/// How a runner behaves; chosen by the parent's pool and carried in the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerSettings {
    /// Calls served at once; more wait for a slot.
    pub max_concurrency: u32,
    /// Drain and stop after this long without calls; `None` never.
    pub idle_shutdown_after: Option<Duration>,
    /// Give up and exit if the parent has not accepted the runner by then.
    pub connect_failsafe: Duration,
    /// How long in-flight calls may run on once the parent is lost or SIGTERM arrives.
    pub drain_grace: Duration,
    /// The largest argument frame the runner accepts.
    pub max_payload_len: u64,
    /// The QUIC idle timeout: a silent peer is declared lost after this long.
    pub peer_timeout: Duration,
    /// The QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// The congestion controller, the same as the parent's.
    pub congestion: crate::transport::CongestionControl,
    /// Which of its `tracing` events the runner sends its parent (and writes to its own
    /// stderr where the parent does not see it): an `EnvFilter` directive, checked by the
    /// pool; `off` for none.
    pub log_filter: String,
    /// Whether the runner sends its stdout and stderr lines to its parent too: on backends
    /// that do not bring them there themselves.
    pub forward_output: bool,
}

/// A runner's ticket home: the parent's addresses and server name, the pool CA, the runner's own
/// single-use certificate and key, its id, and its settings.
///
/// Encoded as `fb1.` followed by unpadded URL-safe base64 of its bincode encoding. `Debug` never
/// shows the key.
#[derive(Clone, Serialize, Deserialize)]
pub struct BootToken {
    /// Where the parent listens, as `host:port`, tried in order.
    pub parent_addrs: Vec<String>,
    /// The name on the parent's server certificate.
    pub server_name: String,
    /// The pool CA certificate, DER.
    pub ca_cert: Vec<u8>,
    /// The runner's client certificate, DER.
    pub runner_cert: Vec<u8>,
    runner_key: Vec<u8>,
    /// The runner's id, bound to its certificate by the parent.
    pub runner_id: Uuid,
    /// How the runner behaves.
    pub settings: RunnerSettings,
}

/// Why a boot token could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The environment variable is not set.
    #[error("{PARENT_ENV} is not set")]
    Missing,
    /// The token does not start with a known version prefix.
    #[error("unsupported boot token version (expected the prefix `{PREFIX}`); parent and runner must run the same Firebrand version")]
    UnsupportedVersion,
    /// The token is longer than any valid one.
    #[error("boot token is {0} bytes, more than the {MAX_TOKEN_LEN} allowed")]
    TooLong(usize),
    /// The token is not valid base64.
    #[error("boot token is not valid base64: {0}")]
    Base64(String),
    /// The decoded bytes are not a token.
    #[error("boot token is malformed: {0}")]
    Malformed(String),
}

impl BootToken {
    /// Builds a token.
    #[must_use]
    pub fn new(
        parent_addrs: Vec<String>,
        server_name: String,
        ca_cert: &CertificateDer<'_>,
        runner: &IssuedCert,
        runner_id: Uuid,
        settings: RunnerSettings,
    ) -> Self {
        Self {
            parent_addrs,
            server_name,
            ca_cert: ca_cert.to_vec(),
            runner_cert: runner.cert.to_vec(),
            runner_key: runner.key_der().to_vec(),
            runner_id,
            settings,
        }
    }

    /// The runner's certificate and key.
    #[must_use]
    pub fn runner_identity(&self) -> IssuedCert {
        IssuedCert::new(
            CertificateDer::from(self.runner_cert.clone()),
            self.runner_key.clone(),
        )
    }

    /// The encoded form, for [`PARENT_ENV`].
    ///
    /// # Panics
    /// Never: every field encodes.
    #[must_use]
    pub fn encode(&self) -> String {
        let bytes = wire::encode_value(self).expect("a boot token always encodes");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Parses an encoded token.
    ///
    /// # Errors
    /// A [`TokenError`] saying what is wrong with it.
    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong(text.len()));
        }
        let body = text
            .strip_prefix(PREFIX)
            .ok_or(TokenError::UnsupportedVersion)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Base64(e.to_string()))?;
        let token: Self =
            wire::decode_payload(&bytes).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if token.parent_addrs.is_empty() {
            return Err(TokenError::Malformed("no parent address".into()));
        }
        if token.settings.max_concurrency == 0 {
            return Err(TokenError::Malformed("max_concurrency is 0".into()));
        }
        Ok(token)
    }

    /// Reads the token from the descriptor [`PARENT_FD_ENV`] names, reading it to its end and
    /// closing it, or else from [`PARENT_ENV`].
    ///
    /// # Errors
    /// [`TokenError::Missing`] when neither is set, or why the value is not a token.
    pub fn from_env() -> Result<Self, TokenError> {
        if let Some(fd) = std::env::var_os(PARENT_FD_ENV) {
            return Self::decode(&read_inherited(&fd)?);
        }
        match std::env::var(PARENT_ENV) {
            Ok(v) => Self::decode(&v),
            Err(std::env::VarError::NotPresent) => Err(TokenError::Missing),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(TokenError::Malformed("not valid UTF-8".into()))
            }
        }
    }
}

/// Reads the token text from the inherited descriptor `fd`, and closes it.
fn read_inherited(fd: &std::ffi::OsStr) -> Result<String, TokenError> {
    use std::io::Read as _;
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let number: i32 = fd
        .to_str()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 2)
        .ok_or_else(|| {
            TokenError::Malformed(format!("{PARENT_FD_ENV} is not a descriptor number"))
        })?;
    // Whether the descriptor is open, without touching it: `/dev/fd` lists this process's
    // open descriptors (on Linux and macOS alike; where a container lacks it, reading a
    // descriptor that is not open fails below instead).
    let listed = std::path::Path::new("/dev/fd");
    if listed.is_dir() && !listed.join(number.to_string()).exists() {
        return Err(TokenError::Malformed(format!(
            "{PARENT_FD_ENV} names descriptor {number}, which is not open"
        )));
    }
    // SAFETY: the descriptor is open (checked above) and was inherited for this alone: the
    // parent handed it over and nothing else in this process knows of it, so taking ownership
    // (and closing it when done) cannot close something another owner uses.
    let owned = unsafe { OwnedFd::from_raw_fd(number) };
    let mut text = String::new();
    std::fs::File::from(owned)
        .take(MAX_TOKEN_LEN as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| TokenError::Malformed(format!("cannot read descriptor {number}: {e}")))?;
    Ok(text)
}

impl fmt::Debug for BootToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootToken")
            .field("parent_addrs", &self.parent_addrs)
            .field("server_name", &self.server_name)
            .field("runner_id", &self.runner_id)
            .field("settings", &self.settings)
            .field("runner_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::PoolCa;

    fn settings() -> RunnerSettings {
        RunnerSettings {
            max_concurrency: 4,
            idle_shutdown_after: Some(Duration::from_secs(30)),
            connect_failsafe: Duration::from_secs(20),
            drain_grace: Duration::from_secs(30),
            max_payload_len: 1 << 20,
            peer_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(1),
            congestion: crate::transport::CongestionControl::default(),
            log_filter: "off".into(),
            forward_output: false,
        }
    }

    #[test]
    fn round_trips_and_redacts() {
        let ca = PoolCa::generate("t").unwrap();
        let id = Uuid::new_v4();
        let cert = ca.issue_runner(id, Duration::from_secs(60)).unwrap();
        let token = BootToken::new(
            vec!["127.0.0.1:1".into()],
            "x".into(),
            ca.cert(),
            &cert,
            id,
            settings(),
        );
        let back = BootToken::decode(&token.encode()).unwrap();
        assert_eq!(back.runner_id, id);
        assert_eq!(back.settings, settings());
        assert_eq!(back.runner_identity().key_der(), cert.key_der());
        assert!(format!("{back:?}").contains("<redacted>"));
    }

    #[test]
    fn a_bad_token_descriptor_is_a_clear_error() {
        for bad in ["x", "1", "-4", "999999"] {
            let error = read_inherited(std::ffi::OsStr::new(bad)).unwrap_err();
            assert!(
                matches!(&error, TokenError::Malformed(m) if m.contains(PARENT_FD_ENV)),
                "{bad}: {error:?}"
            );
        }
    }

    #[test]
    fn malformed_tokens_are_clear_errors() {
        assert!(matches!(
            BootToken::decode("nope"),
            Err(TokenError::UnsupportedVersion)
        ));
        assert!(matches!(
            BootToken::decode("fb1.***"),
            Err(TokenError::Base64(_))
        ));
        assert!(matches!(
            BootToken::decode("fb1.AAAA"),
            Err(TokenError::Malformed(_))
        ));
        let huge = format!("fb1.{}", "A".repeat(MAX_TOKEN_LEN));
        assert!(matches!(
            BootToken::decode(&huge),
            Err(TokenError::TooLong(_))
        ));
    }
}
