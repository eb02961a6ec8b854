//! A runner's stdout and stderr when its parent relays them: they must outlive the parent.

use std::os::fd::AsRawFd as _;

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

fn watch() {
    let mut open = [libc::STDOUT_FILENO, libc::STDERR_FILENO].to_vec();
    while !open.is_empty() {
        // No events asked for: poll still reports POLLERR, which a pipe's write end raises
        // once its last reader is gone, and POLLHUP.
        let mut polls: Vec<libc::pollfd> = open
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: 0,
                revents: 0,
            })
            .collect();
        // SAFETY: `polls` is a live array of `polls.len()` pollfds.
        let ready = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, -1) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        for poll in polls.iter().filter(|p| p.revents != 0) {
            if poll.revents & libc::POLLNVAL == 0 {
                to_dev_null(poll.fd);
            }
            open.retain(|&fd| fd != poll.fd);
        }
    }
}

fn to_dev_null(fd: i32) {
    let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") else {
        return;
    };
    // SAFETY: dup2 replaces `fd` (stdout or stderr) with a descriptor this process owns; any
    // write racing with it goes to one or the other, both valid.
    unsafe { libc::dup2(null.as_raw_fd(), fd) };
}
