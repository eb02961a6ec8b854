//! A runner's stdout and stderr when its parent relays them: they must outlive the parent.

use std::os::fd::{AsFd, BorrowedFd};

/// Watches stdout and stderr, pipes whose reader is the parent, and points each at
/// `/dev/null` once its reader is gone.
///
/// When the parent dies, its ends of the pipes close, and every later write fails with EPIPE:
/// `println!` panics, and so does a `tracing` subscriber that reports its write errors with
/// `eprintln!`. A runner that lost its parent still drains its calls for the drain grace, and
/// must be able to log while it does; with nobody left to read, its output goes nowhere.
pub(super) fn outlive_the_relay() {
    let spawned = std::thread::Builder::new()
        .name("firebrand-output".into())
        .spawn(watch);
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch the output pipes");
    }
}

/// The two descriptors of this process's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub(super) const BOTH: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

    pub(super) fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    pub(super) fn fd(self) -> BorrowedFd<'static> {
        match self {
            Stream::Stdout => rustix::stdio::stdout(),
            Stream::Stderr => rustix::stdio::stderr(),
        }
    }

    /// Points this descriptor at what `fd` points at (dup2). A write racing with it goes to
    /// one or the other, both valid.
    pub(super) fn point_at(self, fd: impl AsFd) -> std::io::Result<()> {
        match self {
            Stream::Stdout => rustix::stdio::dup2_stdout(fd)?,
            Stream::Stderr => rustix::stdio::dup2_stderr(fd)?,
        }
        Ok(())
    }
}

fn watch() {
    use rustix::event::{PollFd, PollFlags};
    let mut open = Stream::BOTH.to_vec();
    while !open.is_empty() {
        // No events asked for: poll still reports POLLERR, which a pipe's write end raises
        // once its last reader is gone, and POLLHUP.
        let mut polls: Vec<PollFd<'_>> = open
            .iter()
            .map(|stream| PollFd::from_borrowed_fd(stream.fd(), PollFlags::empty()))
            .collect();
        match rustix::event::poll(&mut polls, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return,
        }
        let events: Vec<PollFlags> = polls.iter().map(PollFd::revents).collect();
        let mut still_open = Vec::new();
        for (stream, events) in open.into_iter().zip(events) {
            if events.is_empty() {
                still_open.push(stream);
            } else if !events.contains(PollFlags::NVAL) {
                to_dev_null(stream);
            }
        }
        open = still_open;
    }
}

fn to_dev_null(stream: Stream) {
    let pointed = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .and_then(|null| stream.point_at(&null));
    if let Err(error) = pointed {
        // The stream stays a pipe nobody reads: its writes fail from now on.
        tracing::warn!(stream = stream.name(), %error, "cannot point the runner's output at /dev/null");
    }
}
