//! The secret of the claim that woke this runner's machine, read where the parent put it.
//!
//! A parked runner dials back with the boot token it was started with, and a copy of that token
//! dials the same way. So a parent that claims a parked Fly machine also writes a fresh
//! [`ClaimSecret`] into the machine's metadata before it starts it, and admits only a hello
//! that carries it. The runner reads it through the machine-local API, a Unix socket that only
//! processes on that machine can open and that needs no token; a copy of the boot token dialing
//! from anywhere else has no way to it.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::wire::{ClaimSecret, FLY_CLAIM_KEY};

/// Where Fly serves the machine-local API.
const FLY_API_SOCKET: &str = "/.fly/api";

/// Overrides where the machine-local API socket is (`/.fly/api` on Fly): the fake Machines API serves each of its machines its own
/// socket, and says where through this variable.
pub const FLY_API_SOCKET_ENV: &str = "FIREBRAND_FLY_API_SOCKET";

/// How long the read may take. The socket is local: a slow answer means something is wrong,
/// and the dial goes on without a secret (a claim then refuses it, and says why).
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest answer read: a metadata value and its headers.
const MAX_REPLY_LEN: u64 = 64 * 1024;

/// The secret of the claim that woke this machine, when the runner runs on a Fly machine whose
/// metadata holds one; `None` elsewhere, and on a machine never claimed.
pub(super) async fn read() -> Option<ClaimSecret> {
    let app = std::env::var("FLY_APP_NAME").ok()?;
    let machine = std::env::var("FLY_MACHINE_ID").ok()?;
    let socket = std::env::var(FLY_API_SOCKET_ENV).unwrap_or_else(|_| FLY_API_SOCKET.into());
    let path = format!("/v1/apps/{app}/machines/{machine}/metadata/{FLY_CLAIM_KEY}");
    match tokio::time::timeout(READ_TIMEOUT, get(&socket, &path)).await {
        Ok(Ok(secret)) => secret,
        Ok(Err(why)) => {
            tracing::debug!(%socket, reason = %why, "no claim secret from the machine-local API");
            None
        }
        Err(_) => {
            tracing::warn!(%socket, after = ?READ_TIMEOUT, "the machine-local API did not answer");
            None
        }
    }
}

/// `GET path` on the Unix socket: the metadata value, `None` on a 404.
async fn get(socket: &str, path: &str) -> Result<Option<ClaimSecret>, String> {
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: flaps\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut reply = Vec::new();
    stream
        .take(MAX_REPLY_LEN)
        .read_to_end(&mut reply)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(&reply) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err("the answer ended early".into()),
        Err(e) => return Err(format!("not an HTTP answer: {e}")),
    };
    match response.code {
        Some(200) => {}
        Some(404) => return Ok(None),
        other => return Err(format!("answered {other:?}")),
    }
    let chunked = response.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("chunked")
    });
    let body = &reply[head_len..];
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    #[derive(serde::Deserialize)]
    struct Value {
        value: String,
    }
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| format!("not a metadata value: {e}"))?;
    Ok(Some(ClaimSecret::from_text(value.value)))
}

/// The body of a chunked answer.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let (start, len) = match httparse::parse_chunk_size(body) {
            Ok(httparse::Status::Complete(found)) => found,
            _ => return Err("a malformed chunk".into()),
        };
        let len = usize::try_from(len).map_err(|_| "a chunk too long".to_owned())?;
        if len == 0 {
            return Ok(out);
        }
        let chunk = body
            .get(start..start + len)
            .ok_or_else(|| "a chunk cut short".to_owned())?;
        out.extend_from_slice(chunk);
        body = body.get(start + len + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn chunked_bodies_are_joined_and_bad_ones_refused() {
        assert_eq!(
            dechunk(b"4\r\n{\"va\r\n3\r\nlue\r\n0\r\n\r\n").unwrap(),
            b"{\"value"
        );
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(dechunk(b"9\r\nabc").is_err());
    }
}
