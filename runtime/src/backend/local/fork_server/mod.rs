//! A fork server: one template runner process that forks each new runner on request.
//!
//! Starting a runner with `exec` pays, every time, for the kernel loading the binary, the dynamic
//! loader's relocations, and the C library's and crypto libraries' CPU feature probes (each
//! `cpuid` traps to the hypervisor on a VM). A forked runner inherits all of that from the
//! template, which paid it once. On a 2-core VM this is about a third of a runner's start-up CPU.
//!
//! The parent ([`client`]) and the template ([`server`]) talk over a `SOCK_SEQPACKET` socket pair,
//! the template's stdin: one bincode message per packet, with the runner's stdout and stderr
//! passed as file descriptors (`SCM_RIGHTS`) alongside a spawn request.
//!
//! Every system call goes through rustix, so `unsafe` is left only where no safe API can be:
//! the `fork` itself (and `_exit` in its child when setting up fails), and tokio's
//! `AsyncFd::register` for the parent's end of the socket. The template watches its runners
//! through pidfds (Linux 5.3 or later), polled beside the control socket: a pidfd turns readable
//! when its runner exits, is reaped with `waitid`, and is the only way the template signals a
//! runner, so a reused pid is never signalled.

pub(crate) mod client;
pub(crate) mod server;

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// Bumped when a message changes; the template announces it in [`Reply::Ready`].
const PROTOCOL: u32 = 1;

/// The largest message either side accepts. A spawn request carries the boot token and the
/// runner's environment: a few KiB.
const MAX_MESSAGE: usize = 256 * 1024;

/// Parent to template.
#[derive(Debug, Serialize, Deserialize)]
enum Request {
    /// Fork a runner with these variables added to the template's environment. Carries either
    /// no file descriptors (the runner keeps the template's stdout and stderr) or two.
    Spawn { env: Vec<(String, String)> },
    /// SIGKILL this runner, if it has not been reaped yet.
    Kill { pid: i32 },
}

/// Template to parent.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    /// Sent once, first.
    Ready { protocol: u32 },
    /// The answer to the oldest unanswered [`Request::Spawn`].
    Spawned { pid: i32 },
    /// The answer to the oldest unanswered [`Request::Spawn`] when `fork` failed.
    SpawnFailed { error: String },
    /// A runner ended: its exit code, or the signal that killed it.
    Exited {
        pid: i32,
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// A connected `SOCK_SEQPACKET` pair, close-on-exec.
fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    Ok(socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A pipe, close-on-exec: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// The most descriptors one message carries: a runner's stdout and stderr.
const MAX_FDS: usize = 2;

/// Sends one message, with `fds` attached. On a non-blocking socket a full buffer is
/// [`io::ErrorKind::WouldBlock`].
fn send(
    socket: BorrowedFd<'_>,
    message: &impl Serialize,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let bytes = crate::wire::encode_value(message)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one message",
        ));
    }
    rustix::net::sendmsg(
        socket,
        &[io::IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// Receives one message and the descriptors that came with it; `None` at end of stream. A
/// message that does not fit or does not decode is [`io::ErrorKind::InvalidData`].
fn recv<T: serde::de::DeserializeOwned>(
    socket: BorrowedFd<'_>,
    buffer: &mut [u8],
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        socket,
        &mut [io::IoSliceMut::new(buffer)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    // Take ownership of every descriptor first, so that none leaks whatever happens next.
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if received.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    if received
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "fork server message truncated",
        ));
    }
    // Bounded like every decode, and a message with bytes after its value is refused.
    let message = crate::wire::decode_payload(&buffer[..received.bytes])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((message, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd as _;

    #[test]
    fn messages_and_descriptors_cross_the_socket() {
        let (a, b) = socket_pair().unwrap();
        let (read_end, write_fd) = pipe().unwrap();
        send(
            a.as_fd(),
            &Request::Spawn {
                env: vec![("K".into(), "V".into())],
            },
            &[write_fd.as_fd()],
        )
        .unwrap();
        drop(write_fd);
        let mut buffer = vec![0; MAX_MESSAGE];
        let (request, fds): (Request, _) = recv(b.as_fd(), &mut buffer).unwrap().unwrap();
        assert!(matches!(request, Request::Spawn { env } if env == [("K".into(), "V".into())]));
        assert_eq!(fds.len(), 1);
        // The received descriptor is the pipe's write end: what goes in comes out.
        let mut file = std::fs::File::from(fds.into_iter().next().unwrap());
        std::io::Write::write_all(&mut file, b"hi").unwrap();
        drop(file);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(read_end), &mut out).unwrap();
        assert_eq!(out, "hi");
        drop(a);
        assert!(recv::<Request>(b.as_fd(), &mut buffer).unwrap().is_none());
    }

    #[test]
    fn garbage_is_invalid_data() {
        let (a, b) = socket_pair().unwrap();
        assert_eq!(rustix::io::write(&a, &[0xff; 3]).unwrap(), 3);
        let mut buffer = vec![0; 64];
        let error = recv::<Request>(b.as_fd(), &mut buffer).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
