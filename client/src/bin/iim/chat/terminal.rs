//! The chat's terminal: raw mode through `stty`, the line editor, the screen that prints above
//! the prompt, and the signals besides Ctrl-C (a hang-up or a termination, a resize).
//!
//! [`Terminal`] turns the terminal's echo and line editing off while the chat runs, and back
//! when dropped; [`LineEditor`] turns the keys pressed into lines, edited as in a shell;
//! [`Screen`] prints above the line being typed and updates the last line in place. Elsewhere
//! (a pipe, a file) [`LineSplitter`] reads plain lines and the screen prints plain lines.
//! What is said and sent is `chat`'s: nothing here knows of devices or messages.

use anyhow::Context as _;
use std::fmt::Write as _;
use std::io::Write as _;
// Only the Unix signals are polled by hand.
#[cfg(unix)]
use std::task::Poll;
use tokio::sync::mpsc;

/// The longest line the editor takes: past the host's limit for a body (64 KiB) anyway.
const LINE_CHARS: usize = 65_536;
/// How many typed lines Up and Down go back through.
const RECALL_KEPT: usize = 500;

/// Which line a printed line is, for updating it in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LineKey {
    /// Own message `n` of [`Chat::sent`](super::Chat::sent).
    Sent(usize),
    /// The connection's status.
    Status,
}

/// The last line printed, while it may be updated in place.
#[derive(Debug, Clone, Copy)]
struct Last {
    key: LineKey,
    /// The rows it takes, at `cols` columns.
    rows: usize,
    cols: usize,
}

/// Where the chat prints: a terminal, with the line being typed on its last row, or plain
/// lines.
pub(super) struct Screen {
    out: Box<dyn std::io::Write>,
    pub(super) interactive: bool,
    /// The terminal's width, if known: without it, nothing is updated in place.
    cols: Option<usize>,
    last: Option<Last>,
    pub(super) prompt: String,
    /// The input row as drawn, and the cursor's column in it.
    row: String,
    cursor: usize,
}

impl Screen {
    pub(super) fn new(interactive: bool) -> Self {
        let cols = if interactive {
            terminal_columns()
        } else {
            None
        };
        Self::on(Box::new(std::io::stdout()), interactive, cols)
    }

    fn on(out: Box<dyn std::io::Write>, interactive: bool, cols: Option<usize>) -> Self {
        Self {
            out,
            interactive,
            cols,
            last: None,
            prompt: String::new(),
            row: String::new(),
            cursor: 0,
        }
    }

    /// Prints `text` on lines of its own, above the input row.
    pub(super) fn print(&mut self, text: &str) {
        self.put(text, None, None);
    }

    /// Prints `text` on one line that [`Screen::replace`] may update while it is the last.
    pub(super) fn print_keyed(&mut self, key: LineKey, text: &str) {
        self.put(text, Some(key), None);
    }

    /// Replaces the last line printed with `text` if it is line `key` (and the terminal has
    /// not changed width since); false otherwise.
    pub(super) fn replace(&mut self, key: LineKey, text: &str) -> bool {
        match self.last {
            Some(last) if self.interactive && last.key == key && self.cols == Some(last.cols) => {
                self.put(text, Some(key), Some(last.rows));
                true
            }
            _ => false,
        }
    }

    fn put(&mut self, text: &str, key: Option<LineKey>, replacing: Option<usize>) {
        let text = printable(text, key.is_some());
        let mut out = String::new();
        if self.interactive {
            // Off the input row (the cursor to its start, the row cleared); up over the line
            // replaced, which is cleared with everything below it.
            out.push_str("\r\x1b[K");
            if let Some(rows) = replacing {
                let _ = write!(out, "\x1b[{rows}A\x1b[J");
            }
        }
        out.push_str(&text);
        out.push('\n');
        self.last = None;
        if self.interactive {
            self.input_row(&mut out);
            if let (Some(key), Some(cols)) = (key, self.cols) {
                self.last = Some(Last {
                    key,
                    rows: rows(&text, cols),
                    cols,
                });
            }
        }
        self.write(&out);
    }

    /// The input row, and the cursor put where it is in it.
    fn input_row(&self, out: &mut String) {
        out.push_str(&self.row);
        out.push('\r');
        if self.cursor > 0 {
            let _ = write!(out, "\x1b[{}C", self.cursor);
        }
    }

    /// Draws the line being typed again.
    pub(super) fn draw_input(&mut self, editor: &LineEditor) {
        if !self.interactive {
            return;
        }
        (self.row, self.cursor) = editor.render(&self.prompt, self.cols);
        let mut out = "\r\x1b[K".to_owned();
        self.input_row(&mut out);
        self.write(&out);
    }

    /// Clears the terminal (Ctrl-L), leaving the input row.
    pub(super) fn clear(&mut self) {
        if self.interactive {
            let mut out = "\x1b[H\x1b[2J".to_owned();
            self.input_row(&mut out);
            self.write(&out);
            self.last = None;
        }
    }

    pub(super) fn resize(&mut self) {
        if self.interactive {
            self.cols = terminal_columns();
        }
    }

    /// Takes the input row away: the shell's prompt comes next.
    pub(super) fn close(&mut self) {
        if self.interactive {
            self.write("\r\x1b[K");
        }
    }

    fn write(&mut self, text: &str) {
        // A terminal that went away (a hang-up) takes nothing more; the chat still closes its
        // device.
        let _ = self.out.write_all(text.as_bytes());
        let _ = self.out.flush();
    }
}

/// The rows `text` (one line) takes on a terminal `cols` wide.
fn rows(text: &str, cols: usize) -> usize {
    width(text).div_ceil(cols.max(1)).max(1)
}

/// `text` made safe to print on a terminal: what another user wrote must not move the cursor,
/// change colours or set the window's title. Control characters are shown as `^[` (C0) or
/// `\u{9b}` (C1 and the marks that reorder the text after them), a carriage return is dropped,
/// and newlines and tabs become spaces if `one_line`.
fn printable(text: &str, one_line: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' if !one_line => out.push('\n'),
            '\n' | '\t' => out.push(' '),
            '\r' => {}
            '\u{7f}' => out.push_str("^?"),
            c if u32::from(c) < 0x20 => {
                out.push('^');
                out.push(char::from_u32(u32::from(c) + 0x40).unwrap_or('?'));
            }
            c if c.is_control()
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// How many columns a terminal gives `c`: 2 for the wide East Asian characters and most
/// emoji, 0 for combining marks and zero-width characters, 1 otherwise. Close enough for
/// keeping a line on one row, without a table of all of Unicode.
fn char_width(c: char) -> usize {
    match u32::from(c) {
        0x0300..=0x036F
        | 0x1AB0..=0x1AFF
        | 0x1DC0..=0x1DFF
        | 0x200B..=0x200F
        | 0x20D0..=0x20FF
        | 0xFE00..=0xFE0F
        | 0xFE20..=0xFE2F => 0,
        0x1100..=0x115F
        | 0x2E80..=0x303E
        | 0x3041..=0x33FF
        | 0x3400..=0x4DBF
        | 0x4E00..=0x9FFF
        | 0xA000..=0xA4CF
        | 0xAC00..=0xD7A3
        | 0xF900..=0xFAFF
        | 0xFE30..=0xFE4F
        | 0xFF00..=0xFF60
        | 0xFFE0..=0xFFE6
        | 0x1F300..=0x1F64F
        | 0x1F900..=0x1F9FF
        | 0x20000..=0x3FFFD => 2,
        _ => 1,
    }
}

fn width(text: &str) -> usize {
    text.chars().map(char_width).sum()
}

/// What typing gave.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Typed {
    /// A line, Enter pressed.
    Line(String),
    /// The end of the input: Ctrl-D on an empty line, or stdin closed.
    End,
    /// Ctrl-L: clear the screen.
    Redraw,
}

/// A key, as the editor takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Char(char),
    Enter,
    Backspace,
    Delete,
    Left,
    Right,
    WordLeft,
    WordRight,
    Home,
    End,
    /// An older line typed (Up, Ctrl-P).
    Older,
    /// A newer one (Down, Ctrl-N).
    Newer,
    /// Ctrl-U.
    KillBefore,
    /// Ctrl-K.
    KillAfter,
    /// Ctrl-W, Alt-Backspace.
    KillWord,
    /// Ctrl-D.
    EndOfInput,
    /// Ctrl-L.
    Redraw,
    /// Anything else: ignored.
    Other,
}

/// How the start of the bytes typed reads: a key and its length, or not whole yet.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Key(Key, usize),
    Incomplete,
}

/// The key at the start of `bytes`, as a terminal sends it (xterm's sequences, which tmux,
/// screen and the Linux console send too).
fn parse_key(bytes: &[u8]) -> Parsed {
    let Some(&first) = bytes.first() else {
        return Parsed::Incomplete;
    };
    let key = match first {
        b'\r' | b'\n' => Key::Enter,
        0x7f | 0x08 => Key::Backspace,
        0x01 => Key::Home,
        0x05 => Key::End,
        0x02 => Key::Left,
        0x06 => Key::Right,
        0x04 => Key::EndOfInput,
        0x0b => Key::KillAfter,
        0x15 => Key::KillBefore,
        0x17 => Key::KillWord,
        0x0c => Key::Redraw,
        0x10 => Key::Older,
        0x0e => Key::Newer,
        0x1b => return escape(bytes),
        0x00..=0x1f => Key::Other,
        0x80.. => return utf8(first, bytes),
        c => Key::Char(char::from(c)),
    };
    Parsed::Key(key, 1)
}

/// A key that starts with Esc.
fn escape(bytes: &[u8]) -> Parsed {
    let key = |key, len| Parsed::Key(key, len);
    match bytes.get(1) {
        None => Parsed::Incomplete,
        Some(b'[') => csi(bytes),
        Some(b'O') => match bytes.get(2) {
            None => Parsed::Incomplete,
            Some(b'A') => key(Key::Older, 3),
            Some(b'B') => key(Key::Newer, 3),
            Some(b'C') => key(Key::Right, 3),
            Some(b'D') => key(Key::Left, 3),
            Some(b'H') => key(Key::Home, 3),
            Some(b'F') => key(Key::End, 3),
            Some(_) => key(Key::Other, 3),
        },
        Some(b'b') => key(Key::WordLeft, 2),
        Some(b'f') => key(Key::WordRight, 2),
        Some(0x7f | 0x08) => key(Key::KillWord, 2),
        // Esc pressed alone, then a key: the key counts.
        Some(_) => key(Key::Other, 1),
    }
}

/// A control sequence: `Esc [`, parameters and intermediates, a final byte.
fn csi(bytes: &[u8]) -> Parsed {
    let body = bytes.get(2..).unwrap_or_default();
    let Some(end) = body.iter().position(|b| !(0x20..=0x3f).contains(b)) else {
        // Not whole yet, unless longer than any key's: then it is noise, and dropped.
        return if body.len() > 16 {
            Parsed::Key(Key::Other, bytes.len())
        } else {
            Parsed::Incomplete
        };
    };
    let (params, last) = (&body[..end], body[end]);
    if !(0x40..=0x7e).contains(&last) {
        // Not a sequence after all: what came before the stray byte is dropped.
        return Parsed::Key(Key::Other, 2 + end);
    }
    // `1;5C` is Ctrl-Right, `1;3C` Alt-Right: a word at a time.
    let modified = params.contains(&b';');
    let key = match (last, params) {
        (b'A', _) => Key::Older,
        (b'B', _) => Key::Newer,
        (b'C', _) if modified => Key::WordRight,
        (b'C', _) => Key::Right,
        (b'D', _) if modified => Key::WordLeft,
        (b'D', _) => Key::Left,
        (b'H', _) | (b'~', b"1" | b"7") => Key::Home,
        (b'F', _) | (b'~', b"4" | b"8") => Key::End,
        (b'~', b"3") => Key::Delete,
        _ => Key::Other,
    };
    Parsed::Key(key, 2 + end + 1)
}

/// A character of more than one byte of UTF-8, starting with `first`.
fn utf8(first: u8, bytes: &[u8]) -> Parsed {
    let len = match first {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return Parsed::Key(Key::Other, 1),
    };
    let continued = |b: &u8| b & 0xc0 == 0x80;
    match bytes.get(..len) {
        None if bytes.iter().skip(1).all(continued) => Parsed::Incomplete,
        None => Parsed::Key(Key::Other, 1),
        Some(whole) => match std::str::from_utf8(whole)
            .ok()
            .and_then(|s| s.chars().next())
        {
            Some(c) => Parsed::Key(Key::Char(c), len),
            None => Parsed::Key(Key::Other, 1),
        },
    }
}

/// The line being typed, edited as in a shell: Left, Right, Home, End (Ctrl-A, Ctrl-E), a word
/// at a time with Ctrl or Alt, Backspace, Delete, Ctrl-U, Ctrl-K, Ctrl-W, Up and Down through
/// the lines typed before, Ctrl-D to leave on an empty line.
#[derive(Debug, Default)]
pub(super) struct LineEditor {
    text: Vec<char>,
    /// Where the cursor is: before `text[cursor]`.
    cursor: usize,
    /// The lines typed, oldest first.
    recall: Vec<String>,
    /// The line of `recall` shown, while going through them.
    recalling: Option<usize>,
    /// The line being typed when Up was first pressed, for Down to come back to.
    draft: Vec<char>,
    /// The bytes of a key not read whole yet.
    partial: Vec<u8>,
}

impl LineEditor {
    /// Takes the bytes typed; returns the lines they end, and the other events.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Vec<Typed> {
        self.partial.extend_from_slice(bytes);
        let mut typed = Vec::new();
        let mut at = 0;
        while let Some(rest) = self.partial.get(at..).filter(|rest| !rest.is_empty()) {
            let Parsed::Key(key, len) = parse_key(rest) else {
                break;
            };
            at += len;
            typed.extend(self.key(key));
        }
        self.partial.drain(..at.min(self.partial.len()));
        typed
    }

    fn key(&mut self, key: Key) -> Option<Typed> {
        match key {
            Key::Char(c) => {
                if !c.is_control() && self.text.len() < LINE_CHARS {
                    self.text.insert(self.cursor, c);
                    self.cursor += 1;
                }
            }
            Key::Enter => {
                let line: String = std::mem::take(&mut self.text).into_iter().collect();
                self.cursor = 0;
                self.recalling = None;
                self.draft.clear();
                if !line.trim().is_empty() && self.recall.last() != Some(&line) {
                    if self.recall.len() == RECALL_KEPT {
                        self.recall.remove(0);
                    }
                    self.recall.push(line.clone());
                }
                return Some(Typed::Line(line));
            }
            Key::Backspace => {
                if self.cursor > 0 {
                    self.cursor -= 1;
                    self.text.remove(self.cursor);
                }
            }
            Key::EndOfInput if self.text.is_empty() => return Some(Typed::End),
            Key::Delete | Key::EndOfInput => {
                if self.cursor < self.text.len() {
                    self.text.remove(self.cursor);
                }
            }
            Key::Left => self.cursor = self.cursor.saturating_sub(1),
            Key::Right => self.cursor = (self.cursor + 1).min(self.text.len()),
            Key::Home => self.cursor = 0,
            Key::End => self.cursor = self.text.len(),
            Key::WordLeft => self.cursor = self.word_start(),
            Key::WordRight => {
                let mut at = self.cursor;
                while at < self.text.len() && self.text[at].is_whitespace() {
                    at += 1;
                }
                while at < self.text.len() && !self.text[at].is_whitespace() {
                    at += 1;
                }
                self.cursor = at;
            }
            Key::KillBefore => {
                self.text.drain(..self.cursor);
                self.cursor = 0;
            }
            Key::KillAfter => self.text.truncate(self.cursor),
            Key::KillWord => {
                let start = self.word_start();
                self.text.drain(start..self.cursor);
                self.cursor = start;
            }
            Key::Older => self.recall_older(),
            Key::Newer => self.recall_newer(),
            Key::Redraw => return Some(Typed::Redraw),
            Key::Other => {}
        }
        None
    }

    /// Where the word before the cursor starts.
    fn word_start(&self) -> usize {
        let mut at = self.cursor;
        while at > 0 && self.text[at - 1].is_whitespace() {
            at -= 1;
        }
        while at > 0 && !self.text[at - 1].is_whitespace() {
            at -= 1;
        }
        at
    }

    fn recall_older(&mut self) {
        let index = match self.recalling {
            None if self.recall.is_empty() => return,
            None => {
                self.draft = self.text.clone();
                self.recall.len() - 1
            }
            Some(0) => return,
            Some(i) => i - 1,
        };
        self.show_recalled(index);
    }

    fn recall_newer(&mut self) {
        match self.recalling {
            None => {}
            Some(i) if i + 1 < self.recall.len() => self.show_recalled(i + 1),
            Some(_) => {
                self.recalling = None;
                self.text = std::mem::take(&mut self.draft);
                self.cursor = self.text.len();
            }
        }
    }

    fn show_recalled(&mut self, index: usize) {
        self.recalling = Some(index);
        self.text = self.recall[index].chars().collect();
        self.cursor = self.text.len();
    }

    /// The input row for a terminal `cols` wide (if known): the prompt and as much of the line
    /// as fits around the cursor, never up to the last column (where a terminal wraps); and
    /// the cursor's column.
    fn render(&self, prompt: &str, cols: Option<usize>) -> (String, usize) {
        let widths: Vec<usize> = self.text.iter().map(|&c| char_width(c)).collect();
        let prompt_width = width(prompt);
        let room = cols.map_or(usize::MAX, |cols| {
            cols.saturating_sub(prompt_width + 1).max(1)
        });
        let (mut start, mut used) = (self.cursor, 0);
        while start > 0 && used + widths[start - 1] <= room {
            start -= 1;
            used += widths[start];
        }
        let before = used;
        let mut end = self.cursor;
        while end < self.text.len() && used + widths[end] <= room {
            used += widths[end];
            end += 1;
        }
        let mut row = prompt.to_owned();
        row.extend(&self.text[start..end]);
        (row, prompt_width + before)
    }
}

/// Lines from what is read when it is not a terminal.
#[derive(Debug, Default)]
pub(super) struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Vec<Typed> {
        self.partial.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            lines.push(Typed::Line(text_of(&line[..end])));
        }
        // A line without end is cut, rather than held in memory whole.
        if self.partial.len() > LINE_CHARS * 4 {
            lines.push(Typed::Line(text_of(&std::mem::take(&mut self.partial))));
        }
        lines
    }

    /// The end of the input: a last line without its newline, then the end.
    pub(super) fn end(&mut self) -> Vec<Typed> {
        let mut typed = Vec::new();
        if !self.partial.is_empty() {
            typed.push(Typed::Line(text_of(&std::mem::take(&mut self.partial))));
        }
        typed.push(Typed::End);
        typed
    }
}

/// A line read, as text: without a carriage return before its end, invalid UTF-8 replaced.
fn text_of(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    String::from_utf8_lossy(bytes).into_owned()
}

/// What the thread reading stdin sends.
#[derive(Debug)]
pub(super) enum Input {
    Bytes(Vec<u8>),
    /// The end of the input, or the error that ended it.
    End(Option<String>),
}

/// Reads stdin on a thread of its own, as it comes. Not tokio's stdin: a read that blocks
/// cannot be cancelled, and tokio's would keep the runtime, hence the process, from ending
/// after `/quit` until another key is pressed; this thread ends with the process.
pub(super) fn read_stdin() -> anyhow::Result<mpsc::UnboundedReceiver<Input>> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("iim-chat-input".into())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 4096];
            loop {
                let input = match stdin.read(&mut buf) {
                    Ok(0) => Input::End(None),
                    Ok(n) => Input::Bytes(buf[..n].to_vec()),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => Input::End(Some(e.to_string())),
                };
                let end = matches!(input, Input::End(_));
                if tx.send(input).is_err() || end {
                    return;
                }
            }
        })
        .context("cannot start reading the terminal")?;
    Ok(rx)
}

/// The terminal the chat runs on, if it runs on one: its echo and line editing are off while
/// the chat runs, and back as they were when this is dropped.
pub(super) struct Terminal {
    raw: Option<RawMode>,
}

impl Terminal {
    pub(super) fn open() -> Self {
        use std::io::IsTerminal;
        let terminal = std::io::stdin().is_terminal()
            && std::io::stdout().is_terminal()
            && std::env::var_os("TERM").is_none_or(|term| term != "dumb");
        Self {
            raw: if terminal { RawMode::enter() } else { None },
        }
    }

    /// Whether the chat draws on a terminal (a prompt, lines updated in place).
    pub(super) fn interactive(&self) -> bool {
        self.raw.is_some()
    }
}

/// The terminal's settings as they were, put back when dropped (also when the chat fails or
/// panics).
struct RawMode {
    saved: String,
}

impl RawMode {
    fn enter() -> Option<Self> {
        let saved = stty(&["-g"])?;
        // Keys as they are pressed, not echoed: the chat draws the line. Ctrl-C still
        // interrupts (isig), and output still turns \n into \r\n (opost).
        stty(&["-icanon", "-echo", "min", "1", "time", "0"])?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = stty(&[&self.saved]);
    }
}

/// Runs `stty ARGS` on the terminal that is stdin; its output, if it succeeded.
#[cfg(unix)]
fn stty(args: &[&str]) -> Option<String> {
    let output = std::process::Command::new("stty")
        .args(args)
        .stdin(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// No `stty`: the chat reads and prints plain lines.
#[cfg(not(unix))]
fn stty(_: &[&str]) -> Option<String> {
    None
}

/// The terminal's width in columns.
fn terminal_columns() -> Option<usize> {
    let size = stty(&["size"])?;
    let cols: usize = size.split_whitespace().nth(1)?.parse().ok()?;
    (cols > 0).then_some(cols)
}

/// The signals the chat takes besides Ctrl-C: one field each, so that the chat's loop waits
/// for both at once.
pub(super) struct Signals {
    pub(super) ended: Ending,
    pub(super) resized: Resizing,
}

impl Signals {
    pub(super) fn new(interactive: bool) -> Self {
        Self {
            ended: Ending::new(),
            resized: Resizing::new(interactive),
        }
    }
}

/// The terminal going away (SIGHUP), or the process asked to end (SIGTERM).
pub(super) struct Ending {
    #[cfg(unix)]
    signals: Vec<tokio::signal::unix::Signal>,
}

impl Ending {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                signals: [SignalKind::hangup(), SignalKind::terminate()]
                    .into_iter()
                    .filter_map(|kind| signal(kind).ok())
                    .collect(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Waits for a hang-up or a termination: the chat closes its device and ends.
    pub(super) async fn wait(&mut self) {
        #[cfg(unix)]
        std::future::poll_fn(|cx| {
            for signal in &mut self.signals {
                if let Poll::Ready(Some(())) = signal.poll_recv(cx) {
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        })
        .await;
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    }
}

/// The terminal changing size (SIGWINCH).
pub(super) struct Resizing {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Resizing {
    fn new(interactive: bool) -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                signal: interactive
                    .then(|| signal(SignalKind::window_change()).ok())
                    .flatten(),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = interactive;
            Self {}
        }
    }

    /// Waits for the terminal to change size.
    pub(super) async fn wait(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal
            && signal.recv().await.is_some()
        {
            return;
        }
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// What the editor gives for `chunks` fed one after the other, and its line after them.
    fn edit(chunks: &[&[u8]]) -> (Vec<Typed>, String) {
        let mut editor = LineEditor::default();
        let typed = chunks.iter().flat_map(|c| editor.feed(c)).collect();
        (typed, editor.text.iter().collect())
    }

    fn line(text: &str) -> Typed {
        Typed::Line(text.to_owned())
    }

    #[test]
    fn lines_are_typed_and_edited_as_in_a_shell() {
        assert_eq!(edit(&[b"hi\r"]), (vec![line("hi")], String::new()));
        // Backspace, Left and a key in the middle, Home, End, Delete.
        assert_eq!(edit(&[b"helo\x1b[D\x1b[Dl\r"]).0, [line("hello")]);
        assert_eq!(edit(&[b"ab\x7fc\x01X\x05Y\r"]).0, [line("XacY")]);
        assert_eq!(edit(&[b"abc\x1b[H\x1b[3~\r"]).0, [line("bc")]);
        // Ctrl-U, Ctrl-K, Ctrl-W, Ctrl-Left.
        assert_eq!(edit(&[b"one two\x15three\r"]).0, [line("three")]);
        assert_eq!(edit(&[b"one two\x1b[1;5D\x0b\r"]).0, [line("one ")]);
        assert_eq!(edit(&[b"one two  \x17\r"]).0, [line("one ")]);
        // A newline ends a line as Enter does; a pasted text gives its lines.
        assert_eq!(edit(&[b"a\nb\r"]).0, [line("a"), line("b")]);
        // Ctrl-D ends the input on an empty line only; elsewhere it deletes.
        assert_eq!(edit(&[b"\x04"]).0, [Typed::End]);
        assert_eq!(edit(&[b"ab\x01\x04\r"]).0, [line("b")]);
        assert_eq!(edit(&[b"\x0c"]).0, [Typed::Redraw]);
    }

    #[test]
    fn keys_split_across_reads_and_unknown_sequences_are_taken_whole() {
        // A character and an arrow, each cut in two.
        assert_eq!(
            edit(&[b"\xc3", b"\xa9t\xc3", b"\xa9\x1b", b"[", b"D!\r"]).0,
            [line("ét!é")]
        );
        assert_eq!(edit(&["日本".as_bytes(), b"\r"]).0, [line("日本")]);
        // A key the editor does not know does nothing; neither does invalid UTF-8, nor a
        // control character.
        assert_eq!(
            edit(&[b"a\x1b[15~\x1bOPb\xff\xc3(\x07c\r"]).0,
            [line("ab(c")]
        );
        // Esc alone, then a key: the key counts.
        assert_eq!(edit(&[b"\x1b", b"x\r"]).0, [line("x")]);
        // A sequence with no end is dropped once it is longer than any key.
        assert_eq!(edit(&[b"\x1b[1;2;3;4;5;6;7;8;9;0", b"z\r"]).0, [line("z")]);
        // Still waiting for the rest of a key: nothing yet, the line kept.
        assert_eq!(edit(&[b"ab\x1b["]), (vec![], "ab".to_owned()));
    }

    #[test]
    fn up_and_down_go_through_the_lines_typed() {
        let mut editor = LineEditor::default();
        editor.feed(b"first\rsecond\rsecond\rdraft");
        assert_eq!(editor.recall, ["first", "second"], "a repeat is kept once");
        editor.feed(b"\x1b[A");
        assert_eq!(editor.text.iter().collect::<String>(), "second");
        editor.feed(b"\x1b[A\x1b[A");
        assert_eq!(editor.text.iter().collect::<String>(), "first");
        editor.feed(b"\x1b[B\x1b[B");
        assert_eq!(editor.text.iter().collect::<String>(), "draft");
        assert_eq!(editor.feed(b"\x1bOA!\r"), [line("second!")]);
    }

    #[test]
    fn a_long_line_scrolls_around_the_cursor_and_stays_off_the_last_column() {
        let mut editor = LineEditor::default();
        editor.feed(b"0123456789abcdef");
        // 12 columns: the prompt (3), then 8 characters; the cursor after the last one.
        assert_eq!(editor.render("b> ", Some(12)), ("b> 89abcdef".into(), 11));
        editor.feed(b"\x01\x1b[C");
        assert_eq!(editor.render("b> ", Some(12)), ("b> 01234567".into(), 4));
        assert_eq!(editor.render("b> ", None).0, "b> 0123456789abcdef");
        // Wide characters take two columns.
        let mut editor = LineEditor::default();
        editor.feed("日本語です".as_bytes());
        assert_eq!(editor.render("> ", Some(9)), ("> 語です".into(), 8));
    }

    #[test]
    fn what_others_wrote_cannot_drive_the_terminal() {
        assert_eq!(
            printable("hi\x1b]0;owned\x07\x1b[2J\r\u{9b}1m\u{202e}x", false),
            "hi^[]0;owned^G^[[2J\\u{9b}1m\\u{202e}x"
        );
        assert_eq!(printable("two\nlines\tand", false), "two\nlines and");
        assert_eq!(printable("two\nlines", true), "two lines");
        assert_eq!(rows("", 10), 1);
        assert_eq!(rows("0123456789", 10), 1);
        assert_eq!(rows("0123456789a", 10), 2);
        assert_eq!(rows("日本語日本", 10), 1);
    }

    /// A screen writing into a buffer the test reads.
    fn screen(interactive: bool, cols: Option<usize>) -> (Screen, Rc<RefCell<Vec<u8>>>) {
        #[derive(Clone)]
        struct Shared(Rc<RefCell<Vec<u8>>>);
        impl std::io::Write for Shared {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.borrow_mut().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Rc::new(RefCell::new(Vec::new()));
        let mut screen = Screen::on(Box::new(Shared(Rc::clone(&out))), interactive, cols);
        screen.prompt = "bob> ".into();
        (screen, out)
    }

    fn taken(out: &Rc<RefCell<Vec<u8>>>) -> String {
        String::from_utf8(std::mem::take(&mut *out.borrow_mut())).expect("utf-8")
    }

    #[test]
    fn the_last_line_is_updated_in_place_and_only_the_last() {
        let (mut screen, out) = screen(true, Some(20));
        let mut editor = LineEditor::default();
        editor.feed(b"typing");
        screen.draw_input(&editor);
        assert_eq!(taken(&out), "\r\x1b[Kbob> typing\r\x1b[11C");
        // Printed above the line being typed, which is drawn again after it.
        screen.print_keyed(LineKey::Sent(0), "alice → bob: a long line (pending)");
        assert_eq!(
            taken(&out),
            "\r\x1b[Kalice → bob: a long line (pending)\nbob> typing\r\x1b[11C"
        );
        // The line takes two rows: up two, cleared, written again.
        assert!(screen.replace(LineKey::Sent(0), "alice → bob: sent"));
        assert_eq!(
            taken(&out),
            "\r\x1b[K\x1b[2A\x1b[Jalice → bob: sent\nbob> typing\r\x1b[11C"
        );
        assert!(!screen.replace(LineKey::Sent(1), "another"));
        assert!(!screen.replace(LineKey::Status, "status"));
        screen.print("news");
        assert!(!screen.replace(LineKey::Sent(0), "too late"));
        assert_eq!(taken(&out), "\r\x1b[Knews\nbob> typing\r\x1b[11C");
        // Another width since: the rows it took are not known.
        screen.print_keyed(LineKey::Status, "lost");
        screen.cols = Some(40);
        assert!(!screen.replace(LineKey::Status, "still lost"));
    }

    #[test]
    fn without_a_terminal_lines_are_plain() {
        let (mut screen, out) = screen(false, None);
        screen.draw_input(&LineEditor::default());
        screen.print_keyed(LineKey::Sent(0), "alice → bob: hi  (pending)");
        assert!(!screen.replace(LineKey::Sent(0), "alice → bob: hi  (id 1, sent)"));
        screen.print("message 1 sent to bob: \"hi\"");
        screen.close();
        assert_eq!(
            taken(&out),
            "alice → bob: hi  (pending)\nmessage 1 sent to bob: \"hi\"\n"
        );
        let mut lines = LineSplitter::default();
        assert_eq!(lines.feed(b"one\r\ntw"), [line("one")]);
        assert_eq!(lines.feed(b"o\n\xffthree"), [line("two")]);
        assert_eq!(lines.end(), [line("\u{fffd}three"), Typed::End]);
    }
}
