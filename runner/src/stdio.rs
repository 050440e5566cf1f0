//! Guest stdout/stderr: written to the runner's own stdout/stderr (as `spin up` shows component
//! output on the terminal), a line at a time.
//!
//! A guest's `println!`/`eprintln!` reaches the host as many small writes (Rust formats piece
//! by piece; serde_json's `Display` writes every token separately), each of which would be a
//! `write(2)` of its own. This stream collects a guest instance's output and emits complete
//! lines with one `write(2)` each, which also keeps lines of concurrent instances from
//! interleaving. Like Spin's stdio pipe, a write never waits and never yields. A partial line is
//! emitted when a newline follows, when it grows past [`MAX_PENDING`], or when the instance ends.

use std::io::{self, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// A partial line longer than this is written out without waiting for its newline.
pub const MAX_PENDING: usize = 64 * 1024;

/// Which of the runner's streams a guest stream goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The runner's stdout.
    Stdout,
    /// The runner's stderr.
    Stderr,
}

impl Target {
    fn emit(self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Target::Stdout => io::stdout().lock().write_all(bytes),
            Target::Stderr => io::stderr().lock().write_all(bytes),
        }
    }
}

struct LineBuffer {
    target: Target,
    pending: Vec<u8>,
    /// Where output goes; `None` is the real stream (tests capture it instead).
    sink: Option<Arc<Mutex<Vec<u8>>>>,
}

impl LineBuffer {
    fn emit(&self, bytes: &[u8]) -> io::Result<()> {
        match &self.sink {
            None => self.target.emit(bytes),
            Some(sink) => {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(bytes);
                Ok(())
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match bytes.iter().rposition(|&b| b == b'\n') {
            Some(last) => {
                let (lines, rest) = bytes.split_at(last + 1);
                if self.pending.is_empty() {
                    self.emit(lines)?;
                } else {
                    self.pending.extend_from_slice(lines);
                    let out = std::mem::take(&mut self.pending);
                    let result = self.emit(&out);
                    self.pending = out;
                    self.pending.clear();
                    result?;
                }
                self.pending.extend_from_slice(rest);
            }
            None => self.pending.extend_from_slice(bytes),
        }
        if self.pending.len() > MAX_PENDING {
            let out = std::mem::take(&mut self.pending);
            self.emit(&out)?;
        }
        Ok(())
    }
}

impl Drop for LineBuffer {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let _ = self.emit(&self.pending);
        }
    }
}

/// One guest instance's stdout or stderr (clones share the buffer).
#[derive(Clone)]
pub struct GuestOutput(Arc<Mutex<LineBuffer>>);

impl GuestOutput {
    /// A stream to the runner's `target`.
    pub fn new(target: Target) -> Self {
        Self::with_sink(target, None)
    }

    /// A stream whose complete writes land in `sink` (tests).
    pub fn captured(target: Target, sink: Arc<Mutex<Vec<u8>>>) -> Self {
        Self::with_sink(target, Some(sink))
    }

    fn with_sink(target: Target, sink: Option<Arc<Mutex<Vec<u8>>>>) -> Self {
        Self(Arc::new(Mutex::new(LineBuffer {
            target,
            pending: Vec::new(),
            sink,
        })))
    }

    fn write_bytes(&self, bytes: &[u8]) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(bytes)
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        let target = self.0.lock().unwrap_or_else(|p| p.into_inner()).target;
        match target {
            Target::Stdout => std::io::IsTerminal::is_terminal(&io::stdout()),
            Target::Stderr => std::io::IsTerminal::is_terminal(&io::stderr()),
        }
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes)
            .map_err(|e| StreamError::LastOperationFailed(e.into()))
    }

    /// Complete lines are already out; a partial line waits for its newline (see module docs).
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(1024 * 1024)
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.write_bytes(buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes(chunks: &[&str]) -> (Vec<u8>, Arc<Mutex<Vec<u8>>>, GuestOutput) {
        let sink = Arc::new(Mutex::new(Vec::new()));
        let out = GuestOutput::captured(Target::Stderr, sink.clone());
        for c in chunks {
            out.write_bytes(c.as_bytes()).unwrap();
        }
        let seen = sink.lock().unwrap().clone();
        (seen, sink, out)
    }

    #[test]
    fn pieces_of_a_line_come_out_together() {
        let (seen, _, _) = writes(&["{", "\"event\"", ":", "\"chat\"", "}", "\n"]);
        assert_eq!(seen, b"{\"event\":\"chat\"}\n");
    }

    #[test]
    fn only_complete_lines_are_written_and_the_rest_on_drop() {
        let (seen, sink, out) = writes(&["a\nb", "c\nd"]);
        assert_eq!(seen, b"a\nbc\n");
        drop(out);
        assert_eq!(&*sink.lock().unwrap(), b"a\nbc\nd");
    }

    #[test]
    fn a_long_partial_line_is_not_held_forever() {
        let long = "x".repeat(MAX_PENDING + 1);
        let (seen, _, _) = writes(&[&long]);
        assert_eq!(seen.len(), MAX_PENDING + 1);
    }
}
