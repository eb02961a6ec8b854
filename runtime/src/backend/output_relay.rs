//! The parent's relay of a local runner process's output: each line the runner writes to
//! stdout or stderr is logged with its runner id, and the last lines of stderr are kept for the
//! error of a runner that exits early. Both the exec path (`local/mod.rs`) and the fork
//! server's client use it. The runner's side of it is `runner/relayed_output.rs`; output that
//! a runner sends over its connection instead is `runner/logs.rs`.

use std::sync::Arc;
use std::time::Duration;

/// The longest line the relay logs as one event; a longer line is logged in pieces of this
/// size, each but the last marked `split`. It bounds the relay's memory per stream.
pub(crate) const MAX_OUTPUT_LINE: usize = 64 << 10;

/// Logs each line a runner writes, until the runner closes the stream. Lines that are not
/// UTF-8 are logged lossily; a line over [`MAX_OUTPUT_LINE`] is split and says so. With a
/// `tail`, the last lines are kept there too, for the error of a runner that exits early.
pub(crate) async fn relay_output(
    output: impl tokio::io::AsyncRead + Unpin,
    runner: impl std::fmt::Display,
    stream: &'static str,
    tail: Option<OutputTail>,
) {
    relay_lines(output, |line, split| {
        let text = String::from_utf8_lossy(line);
        if let Some(tail) = &tail {
            tail.push(&text);
        }
        if split {
            tracing::info!(target: "firebrand::runner_output", %runner, stream, split, "{text}");
        } else {
            tracing::info!(target: "firebrand::runner_output", %runner, stream, "{text}");
        }
    })
    .await;
    if let Some(tail) = &tail {
        tail.close();
    }
}

/// The last lines a process wrote to stderr: a runner that exits before it connects usually
/// said why there, and its boot error should say it too.
#[derive(Clone, Default)]
pub(crate) struct OutputTail(Arc<TailState>);

#[derive(Default)]
struct TailState {
    lines: parking_lot::Mutex<std::collections::VecDeque<String>>,
    closed: tokio::sync::watch::Sender<bool>,
}

impl OutputTail {
    /// Lines kept.
    const LINES: usize = 4;
    /// Bytes kept of each line.
    const LINE_LEN: usize = 512;
    /// How long the end of a process's output is awaited once it has exited.
    const FLUSH_WAIT: Duration = Duration::from_millis(200);

    fn push(&self, line: &str) {
        let mut end = line.len().min(Self::LINE_LEN);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        let mut lines = self.0.lines.lock();
        if lines.len() == Self::LINES {
            lines.pop_front();
        }
        lines.push_back(line[..end].to_string());
    }

    fn close(&self) {
        self.0.closed.send_replace(true);
    }

    /// `description`, with what the process last wrote to stderr once the relay has read it
    /// to its end (briefly awaited: the process has exited, so its pipe is closing).
    pub(crate) async fn explain(&self, description: String) -> String {
        let mut closed = self.0.closed.subscribe();
        let _ = tokio::time::timeout(Self::FLUSH_WAIT, closed.wait_for(|closed| *closed)).await;
        let lines = self.0.lines.lock();
        if lines.is_empty() {
            return description;
        }
        let said: Vec<&str> = lines.iter().map(String::as_str).collect();
        format!("{description}; it last wrote: {}", said.join(" | "))
    }
}

/// Hands `emit` each line of `output`, without its line ending, and whether it is a piece of a
/// longer line. It reads to the end whatever the bytes are: it never stops early, which would
/// close the pipe and make the runner's next write fail (EPIPE), or panic in `println!`.
pub(crate) async fn relay_lines(
    output: impl tokio::io::AsyncRead + Unpin,
    mut emit: impl FnMut(&[u8], bool),
) {
    use tokio::io::AsyncBufReadExt as _;
    let mut reader = tokio::io::BufReader::with_capacity(MAX_OUTPUT_LINE, output);
    let mut line = Vec::new();
    loop {
        let buffer = match reader.fill_buf().await {
            Ok(buffer) => buffer,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Not seen on a pipe; keep it open anyway, and drop what comes.
                tracing::warn!(error = %e, "cannot read a runner's output; discarding the rest");
                let _ = tokio::io::copy(&mut reader, &mut tokio::io::sink()).await;
                return;
            }
        };
        if buffer.is_empty() {
            if !line.is_empty() {
                emit(&line, false);
            }
            return;
        }
        let window = &buffer[..buffer.len().min(MAX_OUTPUT_LINE - line.len())];
        match window.iter().position(|&b| b == b'\n') {
            Some(end) => {
                line.extend_from_slice(&window[..end]);
                reader.consume(end + 1);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                emit(&line, false);
                line.clear();
            }
            None => {
                let taken = window.len();
                line.extend_from_slice(window);
                reader.consume(taken);
                if line.len() == MAX_OUTPUT_LINE {
                    emit(&line, true);
                    line.clear();
                }
            }
        }
        // A line buffer grown by one huge line is not kept for the short ones after it.
        if line.is_empty() && line.capacity() > 4096 {
            line = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(bytes: &[u8]) -> Vec<(Vec<u8>, bool)> {
        let mut lines = Vec::new();
        relay_lines(bytes, |line, split| lines.push((line.to_vec(), split))).await;
        lines
    }

    #[tokio::test]
    async fn the_relay_reads_binary_and_overlong_lines_to_the_end() {
        let mut output = b"plain\r\n\xff\xfe binary \x00\n".to_vec();
        output.extend(std::iter::repeat_n(b'x', 2 * MAX_OUTPUT_LINE + 10));
        output.extend_from_slice(b"\nafter\nno newline at the end");
        let lines = lines_of(&output).await;
        let expected: Vec<(Vec<u8>, bool)> = vec![
            (b"plain".to_vec(), false),
            (b"\xff\xfe binary \x00".to_vec(), false),
            (vec![b'x'; MAX_OUTPUT_LINE], true),
            (vec![b'x'; MAX_OUTPUT_LINE], true),
            (vec![b'x'; 10], false),
            (b"after".to_vec(), false),
            (b"no newline at the end".to_vec(), false),
        ];
        assert_eq!(lines, expected);
    }
}
