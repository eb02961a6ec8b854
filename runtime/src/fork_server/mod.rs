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

pub(crate) mod client;
pub(crate) mod server;

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

/// Set in the template's environment: [`run_if_child`](crate::run_if_child) then serves as a
/// fork server instead of as a runner.
pub(crate) const FORK_SERVER_ENV: &str = "FIREBRAND_FORK_SERVER";

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
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded, so both are fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A pipe, close-on-exec: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one message, with `fds` attached. On a non-blocking socket a full buffer is
/// [`io::ErrorKind::WouldBlock`].
fn send(socket: BorrowedFd<'_>, message: &impl Serialize, fds: &[RawFd]) -> io::Result<()> {
    let bytes = crate::wire::encode_value(message)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // u64 elements keep the buffer aligned for `cmsghdr`.
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the sendmsg call.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
        assert!(
            space <= std::mem::size_of_val(&control),
            "too many descriptors"
        );
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space;
        // SAFETY: msg_control points at `space` writable, aligned bytes, enough for one
        // cmsghdr carrying `fds`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
    }
    // SAFETY: `header` is fully initialised and points at live buffers.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &header, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message and the descriptors that came with it; `None` at end of stream. A
/// message that does not fit or does not decode is [`io::ErrorKind::InvalidData`].
fn recv<T: serde::de::DeserializeOwned>(
    socket: BorrowedFd<'_>,
    buffer: &mut [u8],
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the recvmsg call.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `header` points at live, writable buffers of the sizes it states.
    let received =
        unsafe { libc::recvmsg(socket.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    // Take ownership of every descriptor first, so that none leaks whatever happens next.
    let mut fds = Vec::new();
    // SAFETY: recvmsg filled `header` and its control buffer; the CMSG macros walk it within
    // msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count =
                    ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    if received == 0 && fds.is_empty() {
        return Ok(None);
    }
    if header.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "fork server message truncated",
        ));
    }
    // Bounded like every decode, and a message with bytes after its value is refused.
    let message = crate::wire::decode_payload(&buffer[..received as usize])
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
            &[write_fd.as_raw_fd()],
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
        // SAFETY: writes 3 bytes from a live buffer.
        let n = unsafe { libc::write(a.as_raw_fd(), [0xffu8; 3].as_ptr().cast(), 3) };
        assert_eq!(n, 3);
        let mut buffer = vec![0; 64];
        let error = recv::<Request>(b.as_fd(), &mut buffer).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
