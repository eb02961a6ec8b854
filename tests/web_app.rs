//! `examples/web_app.rs` as a user runs it: real HTTP requests to an axum server whose route
//! runs on a pool, then Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or
//! SIGTERM while the requests are in flight. Every request is answered, the server exits 0, and
//! no runner is left behind.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[path = "common/example_binary.rs"]
mod example_binary;

/// The example's binary.
fn example() -> PathBuf {
    example_binary::example_binary("web_app")
}

fn fib(n: u32) -> u64 {
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..n {
        (a, b) = (b, a + b);
    }
    a
}

/// A `GET` with `Connection: close`: the status line's code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("the server accepts");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return found;
    };
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            found.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Waits for `done`, polling every 20 ms, for at most `limit`.
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Server {
    child: Child,
    addr: String,
    lines: mpsc::Receiver<String>,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new(example())
            .args(["--addr", "127.0.0.1:0"])
            // A group of its own, as a shell gives a foreground job: the test signals it whole.
            .process_group(0)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the server prints its address");
        let addr = first
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        Server { child, addr, lines }
    }

    /// The line that contains `text`, among those printed next.
    fn expect_line(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {text:?}"));
            if line.contains(text) {
                return line;
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Only if a check failed: nothing of the test may outlive it.
        // SAFETY: `kill` takes plain integers; a group that is gone gives ESRCH.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Starts four slow requests (seconds each, on two runners), waits until they run there, sends `signal` to the
/// server's whole process group, and checks every request is answered and nothing is left.
fn requests_in_flight_finish_after(signal: i32) {
    const N: u32 = 40;
    let server = Server::start();
    let requests: Vec<_> = (0..4)
        .map(|i| {
            let addr = server.addr.clone();
            std::thread::spawn(move || get(&addr, &format!("/fib/{}", N - i % 2)))
        })
        .collect();
    // Signalled only once all four run on runners: a runner that died before its call was
    // placed would be replaced, and hide the failure this test is for.
    wait_until(Duration::from_secs(60), "four calls in flight", || {
        get(&server.addr, "/stats").1.contains("in_flight=4")
    });
    let pid = server.child.id();
    let runners = children(pid);
    // SAFETY: `kill` takes plain integers; the group is the server's, made above.
    assert_eq!(unsafe { libc::kill(-(pid as i32), signal) }, 0);

    for (i, request) in requests.into_iter().enumerate() {
        let (status, body) = request.join().unwrap();
        let n = N - i as u32 % 2;
        assert_eq!(status, 200, "request {i}: {body}");
        assert_eq!(body, fib(n).to_string(), "request {i}");
    }
    server.expect_line("shut down cleanly");
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert!(status.success(), "the server exits cleanly: {status}");
    wait_until(Duration::from_secs(10), "the runners to end", || {
        runners.iter().all(|r| !alive(*r))
    });
}

#[test]
fn ctrl_c_lets_requests_in_flight_finish_and_stops_every_runner() {
    requests_in_flight_finish_after(libc::SIGINT);
}

#[test]
fn sigterm_lets_requests_in_flight_finish_and_stops_every_runner() {
    requests_in_flight_finish_after(libc::SIGTERM);
}
