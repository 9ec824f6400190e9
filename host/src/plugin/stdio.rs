//! A plugin's stdout and stderr (WASI's `wasi:cli/stdout` and `stderr`): what a plugin writes
//! there becomes the host's `tracing` events, one per line, with the plugin's name.
//!
//! Inherited as they were, a plugin's streams went to the host's stderr as raw bytes: a
//! JavaScript plugin's uncaught exception or a Rust plugin's panic message could not be told
//! from another plugin's, and bypassed the log's filter and format. As events they carry a
//! `plugin` field and a `stream` field (`stdout` at level info, `stderr` at warn).
//!
//! A line is logged when its newline comes, not at each write: guests write a line in pieces
//! (Rust's `eprintln!` writes each formatted piece) and flush after every write (wasi-libc's
//! `write` is `blocking-write-and-flush`), so neither a write nor a flush ends a line. What is
//! left without a newline is logged when the instance goes away.
//!
//! Bounded: a line keeps its first [`MAX_LOG_LINE`] bytes and drops the rest up to its newline
//! (the event says how many bytes it dropped), so a plugin that writes megabytes, with or
//! without newlines, holds at most that many bytes of the host's memory per stream.

use super::imports::MAX_LOG_LINE;
use bytes::Bytes;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How many bytes a guest may write at once: what wasmtime's own streams allow.
const WRITE_PERMIT: usize = 64 * 1024;

/// Which of a plugin's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// `wasi:cli/stdout`: logged at level info.
    Stdout,
    /// `wasi:cli/stderr`: logged at level warn.
    Stderr,
}

/// One output stream of a plugin instance, logged line by line. Every handle the guest
/// opens on the stream is a clone sharing the one line being written.
#[derive(Clone)]
pub struct PluginOutput(Arc<Mutex<LineLog>>);

impl PluginOutput {
    /// Stream `stream` of an instance of plugin `plugin`.
    pub fn new(plugin: &str, stream: Stream) -> Self {
        Self(Arc::new(Mutex::new(LineLog {
            plugin: plugin.into(),
            stream,
            line: Vec::new(),
            dropped: 0,
            last: None,
            forgotten: 0,
        })))
    }

    /// What the guest wrote last on this stream since [`PluginOutput::forget`]: the line being
    /// written if it has anything, else the last whole line. A guest that traps on an uncaught
    /// exception (JavaScript, Python) prints why here first.
    pub fn last_words(&self) -> Option<String> {
        let log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Only what the line gained since `forget`: the rest was written by an earlier call.
        let fresh = log.line.get(log.forgotten..).unwrap_or_default();
        let partial = String::from_utf8_lossy(fresh).trim().to_owned();
        if partial.is_empty() {
            log.last.clone()
        } else {
            Some(partial)
        }
    }

    /// Forgets the last line (at the start of a call, so that [`PluginOutput::last_words`]
    /// speaks of that call only).
    pub fn forget(&self) {
        let mut log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        log.last = None;
        log.forgotten = log.line.len();
    }

    fn write_bytes(&self, bytes: &[u8]) {
        // A lock poisoned by a panic while logging still holds a usable line: going on with
        // it beats failing the guest's write.
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(bytes);
    }
}

/// The line being written, and where it goes once complete.
struct LineLog {
    plugin: Arc<str>,
    stream: Stream,
    /// The line so far, without its newline: at most [`MAX_LOG_LINE`] bytes.
    line: Vec<u8>,
    /// Bytes of the line dropped past [`MAX_LOG_LINE`].
    dropped: usize,
    /// The last line logged, if it said anything.
    last: Option<String>,
    /// How much of `line` was there at the last `forget`.
    forgotten: usize,
}

impl LineLog {
    fn write(&mut self, mut bytes: &[u8]) {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            self.append(&bytes[..newline]);
            self.emit();
            bytes = &bytes[newline + 1..];
        }
        self.append(bytes);
    }

    fn append(&mut self, bytes: &[u8]) {
        let kept = bytes.len().min(MAX_LOG_LINE - self.line.len());
        self.line.extend_from_slice(&bytes[..kept]);
        self.dropped += bytes.len() - kept;
    }

    /// Logs the line, unless it is blank, and starts the next.
    fn emit(&mut self) {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        // Says nothing (Rust's panic message starts with one).
        if line.iter().all(u8::is_ascii_whitespace) && self.dropped == 0 {
            self.line.clear();
            return;
        }
        // Whatever the guest wrote: a byte that is not UTF-8 (or a character the cut split)
        // becomes U+FFFD rather than losing the line.
        let text = String::from_utf8_lossy(line);
        self.last = Some(text.trim().to_owned());
        let plugin = &self.plugin;
        let dropped = (self.dropped > 0).then_some(self.dropped);
        match self.stream {
            Stream::Stdout => {
                tracing::info!(plugin = %plugin, stream = "stdout", dropped, "{text}")
            }
            Stream::Stderr => {
                tracing::warn!(plugin = %plugin, stream = "stderr", dropped, "{text}")
            }
        }
        self.line.clear();
        self.dropped = 0;
        self.forgotten = 0;
    }
}

impl Drop for LineLog {
    /// The last line, if it had no newline: the instance is gone (trapped, replaced or shut
    /// down), and what it said last is often why.
    fn drop(&mut self) {
        self.emit();
    }
}

impl IsTerminal for PluginOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PluginOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Writing never waits: a line is logged (or its excess dropped) as the guest writes it.
#[wasmtime_wasi::async_trait]
impl Pollable for PluginOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for PluginOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes);
        Ok(())
    }

    /// Nothing to do: a flush does not end a line (see the module's documentation).
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

/// For WASI 0.3's streams, which the host does not link yet; the same lines either way.
impl AsyncWrite for PluginOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_words_are_the_line_being_written_else_the_last_line_of_the_call() {
        let out = PluginOutput::new("p", Stream::Stderr);
        assert_eq!(out.last_words(), None);
        out.write_bytes(b"Traceback:\n  ValueError: x\n");
        assert_eq!(out.last_words().as_deref(), Some("ValueError: x"));
        out.forget();
        assert_eq!(
            out.last_words(),
            None,
            "a new call starts with nothing said"
        );
        out.write_bytes(b"Error: no answer");
        assert_eq!(out.last_words().as_deref(), Some("Error: no answer"));
    }

    /// The host's log format, written to memory.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        /// Logs this thread's events here until the guard is dropped.
        fn start() -> (Self, tracing::subscriber::DefaultGuard) {
            let captured = Self::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            (captured, tracing::subscriber::set_default(subscriber))
        }

        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    fn write(stream: &mut PluginOutput, bytes: impl Into<Bytes>) {
        OutputStream::write(stream, bytes.into()).expect("never fails");
        OutputStream::flush(stream).expect("never fails");
    }

    #[test]
    fn each_line_is_one_event_with_the_plugin_s_name_whatever_the_writes() {
        let (log, _guard) = Captured::start();
        let mut err = PluginOutput::new("echo", Stream::Stderr);
        let mut other_handle = err.clone();
        for piece in ["first ", "line\nsecond", " line\r\n\n \n"] {
            write(&mut err, piece);
        }
        write(&mut other_handle, "no newline");
        assert_eq!(log.lines().len(), 2, "a flush does not end a line");
        drop((err, other_handle));
        write(
            &mut PluginOutput::new("echo", Stream::Stdout),
            "to stdout\n",
        );

        let lines = log.lines();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        for (line, (level, stream, text)) in lines.iter().zip([
            ("WARN", "stderr", "first line"),
            ("WARN", "stderr", "second line"),
            ("WARN", "stderr", "no newline"),
            ("INFO", "stdout", "to stdout"),
        ]) {
            assert!(line.contains(level), "{line}");
            assert!(line.contains("plugin=echo"), "{line}");
            assert!(line.contains(&format!("stream=\"{stream}\"")), "{line}");
            assert!(line.contains(&format!(": {text} ")), "{line}");
            assert!(!line.contains("dropped"), "{line}");
        }
    }

    #[test]
    fn a_long_line_keeps_its_first_bytes_and_says_how_many_it_dropped() {
        let (log, _guard) = Captured::start();
        let mut err = PluginOutput::new("flood", Stream::Stderr);
        // Ten megabytes without a newline: the host holds no more than a line of it.
        let chunk = Bytes::from(vec![b'x'; WRITE_PERMIT]);
        for _ in 0..160 {
            write(&mut err, chunk.clone());
        }
        let held = err.0.lock().expect("not poisoned").line.capacity();
        assert!(held <= 2 * MAX_LOG_LINE, "{held} bytes held");
        write(&mut err, "\nshort\n");

        let lines = log.lines();
        assert_eq!(lines.len(), 2, "{} lines", lines.len());
        let kept = "x".repeat(MAX_LOG_LINE);
        assert!(lines[0].contains(&kept), "the first bytes are kept");
        assert!(!lines[0].contains(&format!("{kept}x")), "and no more");
        let dropped = 160 * WRITE_PERMIT - MAX_LOG_LINE;
        assert!(
            lines[0].ends_with(&format!("dropped={dropped}")),
            "{}",
            &lines[0][..80]
        );
        assert!(lines[1].contains(": short"), "{}", lines[1]);
        assert!(!lines[1].contains("dropped"), "{}", lines[1]);
    }
}
