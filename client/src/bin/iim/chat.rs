//! `iim chat`: a conversation in the terminal, on one device session that stays open.
//!
//! One [`Device`] in `Receive` mode for the whole chat, as `iim listen` has: it reconnects by
//! itself, submits again what the host had not accepted, and hands each delivery over once.
//! What arrives is shown as it comes, in `show.rs`'s words (what waited for the device first),
//! and acknowledged once shown. The user's own messages are shown with how far they got:
//! `pending` (the device holds it until the host has accepted it, across reconnects), then the
//! host's id and `sent`, `delivered to bob`, `read by bob` (for a group, its counts) as the
//! receipts come.
//!
//! On a terminal, the chat edits the line being typed itself, on the last row behind a prompt,
//! with the terminal's echo and line editing off while it runs (`stty` switches them, and puts
//! them back: no terminal crate for two settings). What arrives is printed above the line being
//! typed, never through it. A line still just above the prompt is updated in place (an own
//! message going from pending to sent, the countdown of a reconnect); one further up is left
//! as it is, and the news comes as a line of its own. Elsewhere (a pipe, a file) the chat reads
//! lines and prints lines, so that `echo hi | iim chat bob` sends and waits for the host.

#[path = "chat/terminal.rs"]
mod terminal;

use super::show::{self, format_time, group_of};
use super::{
    Cli, Home, deliveries, e2e, login_refused, open_device, read_report, read_report_client_id,
};
use anyhow::bail;
use iim_client::proto::body::{Presence, PresenceState, Receipt};
use iim_client::proto::{Address, ErrorCode, Message, MessageId, MessageKind, SessionMode, UserId};
use iim_client::{Accepted, ClientError, Device, Submission, Update};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use terminal::{
    Input, LineEditor, LineKey, LineSplitter, Screen, Signals, Terminal, Typed, read_stdin,
};
use tokio::sync::mpsc;

/// The most entries `/history` keeps; older ones are dropped (and counted).
const HISTORY_KEPT: usize = 10_000;
/// The most chat messages of other conversations kept to report read when the user turns to
/// them.
const UNREAD_KEPT: usize = 4_096;
/// How much of an own message a line about it quotes.
const EXCERPT_CHARS: usize = 40;
/// How long, once the device is closed, the answers to its last submissions may take.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// What `/help` says.
const HELP: &[&str] = &[
    "Type a message and press Enter: it goes to the conversation the prompt names.",
    "  /to USER|#GROUP  talk to a user, or to a group (#team), from now on",
    "  /history         show again everything that arrived since the chat started",
    "  /who             your contacts (friends, colleagues): who is online",
    "  /read [on|off]   report the conversation's messages read as they are shown (on",
    "                   unless started with --no-read); turning to a conversation reports",
    "                   what was shown of it meanwhile",
    "  /quit            leave (also Ctrl-D on an empty line, or Ctrl-C); a message not sent",
    "                   yet is waited for, and /quit again leaves without it",
    "  //TEXT           send TEXT, which starts with one /",
    "Your messages show how far they got: pending, then their id and sent, delivered to,",
    "read by (a group's: delivered to N of M, read by K).",
];

/// A Ctrl-C to come.
type Interrupt = Pin<Box<dyn Future<Output = std::io::Result<()>>>>;

/// Runs `iim chat`: with `to` (a user, or a group), reporting the conversation's messages read
/// as they are shown if `read`.
pub(crate) async fn run(cli: &Cli, to: Option<Address>, read: bool) -> anyhow::Result<()> {
    if cli.json {
        bail!(
            "`iim chat` is for a person at a terminal and prints no JSON: \
             `iim --json listen` reads messages as JSON, `iim send` sends them"
        );
    }
    // Polled from here on, so that a Ctrl-C that comes while the device connects is not lost.
    let mut interrupt = Box::pin(tokio::signal::ctrl_c());
    let Some((device, home)) = open_device(cli, SessionMode::Receive, interrupt.as_mut()).await?
    else {
        return Ok(());
    };
    let terminal = Terminal::open();
    let input = read_stdin()?;
    let signals = Signals::new(terminal.interactive());
    let mut chat = Chat::new(&home, to, read, Screen::new(terminal.interactive()));
    chat.welcome();
    let link = Link {
        device: Some(device),
        waiting: Vec::new(),
    };
    let outcome = converse(cli, &mut chat, link, home, input, interrupt, signals).await;
    chat.screen.close();
    // The terminal's settings are put back before `main` prints an error.
    drop(terminal);
    outcome
}

/// Whether the user asked to leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// No.
    Stay,
    /// Once every message typed is with the host (or the device is connected, and closing it
    /// hands them over).
    WhenSent,
    /// At once, even if messages are not sent.
    Now,
}

/// The chat's loop, until the user leaves or the device ends for good. Then the device is
/// closed, which hands the host what it has not read yet.
async fn converse(
    cli: &Cli,
    chat: &mut Chat,
    mut link: Link,
    mut home: Home,
    mut input: mpsc::UnboundedReceiver<Input>,
    mut interrupt: Interrupt,
    mut signals: Signals,
) -> anyhow::Result<()> {
    type Reopen<'a> = Pin<Box<dyn Future<Output = anyhow::Result<Option<(Device, Home)>>> + 'a>>;
    // While an `iim group` of this profile has the device's deliveries: getting them back.
    let mut reopening: Option<Reopen<'_>> = None;
    let (mut reading, mut interrupts) = (true, true);
    let mut leave = Leave::Stay;
    let mut ended = None;
    loop {
        if chat.may_leave(leave, link.device.is_some()) {
            break;
        }
        tokio::select! {
            // The user's signals first; the host's answers before the deliveries, since an own
            // message to a group comes back to its sender and is recognised by its id.
            biased;
            signal = &mut interrupt, if interrupts => {
                interrupt = Box::pin(tokio::signal::ctrl_c());
                match signal {
                    Ok(()) => leave = chat.asked_to_leave(leave),
                    // No Ctrl-C handler: the terminal's default, which ends the process.
                    Err(_) => interrupts = false,
                }
            }
            () = signals.ended.wait() => leave = Leave::Now,
            () = sleep_until(chat.opener.deadline()) => {
                if let Err(e) = chat.cards_late(&mut link) {
                    ended = Some(e);
                    break;
                }
            }
            (what, answer) = next_answer(&mut link.waiting), if !link.waiting.is_empty() => {
                chat.answered(what, answer);
            }
            update = next_update(link.device.as_ref()) => match update {
                Some(Ok(Update::Message { seq, message })) => {
                    if let Err(e) = chat.delivered(&mut link, seq, message) {
                        ended = Some(e);
                        break;
                    }
                }
                Some(Ok(Update::Synced { count })) => chat.synced(count),
                Some(Ok(Update::Disconnected { reason, retry_in })) => {
                    chat.disconnected(&reason, retry_in);
                }
                Some(Ok(Update::Reconnected)) => {
                    chat.reconnected();
                    if let Some(device) = &link.device
                        && let Err(e) = home.remember_home(device)
                    {
                        chat.say(&format!("cannot remember the home host: {e:#}"));
                    }
                }
                // Only a paged device gets one.
                Some(Ok(Update::Backlog { .. })) => {}
                // `iim group` of this profile took the deliveries for a moment (as it does from
                // `listen`): take them back once it is done. Another session taking them over is
                // not fought.
                Some(Err(e))
                    if e.code() == Some(ErrorCode::SESSION_REPLACED)
                        && deliveries::taken_by_a_command(&home.dir) =>
                {
                    link.device = None;
                    chat.taken();
                    let dir = home.dir.clone();
                    reopening = Some(Box::pin(async move {
                        deliveries::released(&dir).await;
                        let never = std::future::pending::<()>();
                        tokio::pin!(never);
                        open_device(cli, SessionMode::Receive, never).await
                    }));
                }
                Some(Err(e)) => {
                    ended = Some(login_refused(e));
                    break;
                }
                None => {
                    ended = Some(anyhow::anyhow!("the device ended"));
                    break;
                }
            },
            reopened = poll_option(&mut reopening) => {
                reopening = None;
                match reopened {
                    Ok(Some((device, new_home))) => {
                        link.device = Some(device);
                        home = new_home;
                        // What it held comes again on the new session.
                        chat.opener = e2e::Opener::new(&home.dir, &home.profile);
                        chat.back(&mut link);
                        chat.seal_waiting(&mut link);
                    }
                    Ok(None) => {
                        ended = Some(anyhow::anyhow!("the device was not opened again"));
                        break;
                    }
                    Err(e) => {
                        ended = Some(e);
                        break;
                    }
                }
            }
            typed = input.recv(), if reading => {
                let typed = match typed {
                    Some(Input::Bytes(bytes)) => chat.typed(&bytes),
                    Some(Input::End(error)) => {
                        reading = false;
                        if let Some(error) = error {
                            chat.say(&format!("cannot read what is typed: {error}"));
                        }
                        chat.typed_end()
                    }
                    None => {
                        reading = false;
                        chat.typed_end()
                    }
                };
                for typed in typed {
                    match typed {
                        Typed::Line(line) => {
                            if chat.entered(&mut link, &line) {
                                leave = chat.asked_to_leave(leave);
                            }
                        }
                        Typed::End => leave = chat.asked_to_leave(leave),
                        Typed::Redraw => chat.screen.clear(),
                    }
                }
                chat.draw_input();
            }
            () = signals.resized.wait() => {
                chat.screen.resize();
                chat.draw_input();
            }
        }
    }
    if let Some(device) = link.device.take() {
        device.close().await;
    }
    // Closed, the device has answered every submission: with the host's answer, or a failure.
    for waiting in std::mem::take(&mut link.waiting) {
        if let Ok(answer) = tokio::time::timeout(CLOSE_WAIT, waiting.submission).await {
            chat.answered(waiting.what, answer);
        }
    }
    let unsent = chat.unsent();
    if let Some(e) = ended {
        let e = e.context("the chat's device session ended");
        if unsent > 0 {
            return Err(e.context(format!("{unsent} message(s) not sent")));
        }
        return Err(e);
    }
    if unsent > 0 {
        bail!("{unsent} message(s) not sent: the chat ended before the host had them");
    }
    Ok(())
}

/// Sleeps until `deadline`; never, without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The next update of `device`; never, without one.
async fn next_update(device: Option<&Device>) -> Option<Result<Update, ClientError>> {
    match device {
        Some(device) => device.next().await,
        None => std::future::pending().await,
    }
}

/// What `future` gives; never, without one.
async fn poll_option<F: Future + Unpin>(future: &mut Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// The first of the `waiting` submissions that the host answered (or that failed), taken out
/// of the list, with what it was for.
fn next_answer(
    waiting: &mut Vec<Waiting>,
) -> impl Future<Output = (What, Result<Accepted, ClientError>)> + '_ {
    std::future::poll_fn(move |cx| {
        let answered = waiting.iter_mut().enumerate().find_map(|(i, w)| {
            match Pin::new(&mut w.submission).poll(cx) {
                Poll::Ready(answer) => Some((i, answer)),
                Poll::Pending => None,
            }
        });
        match answered {
            Some((i, answer)) => Poll::Ready((waiting.remove(i).what, answer)),
            None => Poll::Pending,
        }
    })
}

/// The device, while the chat has one, and its submissions that wait for the host's answer.
struct Link {
    device: Option<Device>,
    waiting: Vec<Waiting>,
}

/// A submission waiting for its answer.
struct Waiting {
    what: What,
    submission: Submission,
}

/// What a submission is.
#[derive(Debug, Clone, Copy)]
enum What {
    /// The own message at this index of [`Chat::sent`].
    Message(usize),
    /// A report that the user read this message.
    ReadReport(MessageId),
}

impl Link {
    /// Submits own message `index`; false without a device.
    fn submit(&mut self, index: usize, sent: &Sent) -> bool {
        let Some(device) = &self.device else {
            return false;
        };
        // The same client id every time it is submitted: the host accepts it once.
        // An e2e message to users goes to the addresses its sealing named (the sender too, for
        // their other devices).
        let (to, body) = match &sent.sealed {
            Some((body, to)) => (to.as_slice(), body.as_slice()),
            None => (std::slice::from_ref(&sent.to), sent.text.as_bytes()),
        };
        let submission = device.submit(sent.client_id, MessageKind::Chat, to, body);
        self.waiting.push(Waiting {
            what: What::Message(index),
            submission,
        });
        true
    }

    /// Reports message `id` of `conversation` (its sender, or its group) read; false without a
    /// device.
    fn report_read(&mut self, conversation: &Address, id: MessageId) -> bool {
        let Some(device) = &self.device else {
            return false;
        };
        let submission = device.submit(
            read_report_client_id(id, conversation),
            MessageKind::Receipt,
            std::slice::from_ref(conversation),
            &read_report(id),
        );
        self.waiting.push(Waiting {
            what: What::ReadReport(id),
            submission,
        });
        true
    }
}

/// One of the user's own messages, typed in this chat, and how far it got.
#[derive(Debug)]
struct Sent {
    /// Its idempotency id, kept for a submission again on a new device.
    client_id: u64,
    to: Address,
    text: String,
    /// What is submitted when it is not `text`: the end-to-end body sealed from it and the
    /// addresses it goes to (sealed once, submitted as it is again after a reconnect).
    sealed: Option<(Vec<u8>, Vec<Address>)>,
    /// When it was typed; once accepted, when the host accepted it (ms since the epoch).
    at: u64,
    state: SentState,
}

/// How far an own message got.
#[derive(Debug)]
enum SentState {
    /// The host has not accepted it yet; the device holds it until it has.
    Pending,
    /// The host has it, with this id, and these receipts came for it.
    Accepted { id: MessageId, receipts: Receipts },
    /// The host refused it (an unknown user, a body too large): it goes nowhere.
    Refused(String),
    /// The chat's device ended before the host had it.
    Lost(String),
}

/// What the receipts for an own message said.
#[derive(Debug, Default)]
struct Receipts {
    delivered: BTreeSet<String>,
    read: BTreeSet<String>,
    expired: BTreeSet<String>,
    /// A group's counts, the highest so far: members, delivered, read.
    counts: Option<(u32, u32, u32)>,
    /// Refused by a plugin (a group's non-member, a friends-only policy): whom, and why.
    refused: Option<(Vec<String>, String)>,
}

impl Receipts {
    fn note(&mut self, receipt: &Receipt) {
        match receipt {
            Receipt::Delivered { user, .. } => {
                self.delivered.insert(user.clone());
            }
            Receipt::Read { user, .. } => {
                self.read.insert(user.clone());
            }
            Receipt::Expired { user, .. } => {
                self.expired.insert(user.clone());
            }
            // The plugin sends them as they grow; the network may reorder two of them.
            Receipt::Counts {
                members,
                delivered,
                read,
                ..
            } => {
                let (_, d, r) = self.counts.unwrap_or_default();
                self.counts = Some((*members, d.max(*delivered), r.max(*read)));
            }
            Receipt::Refused { users, reason, .. } => {
                self.refused = Some((users.clone(), reason.clone()));
            }
        }
    }

    /// `sent`, `delivered to bob`, `read by bob`, `delivered to 2 of 3, read by 1`, ...
    fn progress(&self) -> String {
        if let Some((users, reason)) = &self.refused {
            return match users.as_slice() {
                [] => format!("refused: {reason}"),
                users => format!("refused for {}: {reason}", users.join(", ")),
            };
        }
        if let Some((members, delivered, read)) = self.counts {
            return format!("delivered to {delivered} of {members}, read by {read}");
        }
        let list = |users: &mut dyn Iterator<Item = &String>| {
            users.map(String::as_str).collect::<Vec<_>>().join(", ")
        };
        let mut parts = Vec::new();
        if !self.read.is_empty() {
            parts.push(format!("read by {}", list(&mut self.read.iter())));
        }
        let mut unread = self.delivered.difference(&self.read).peekable();
        if unread.peek().is_some() {
            parts.push(format!("delivered to {}", list(&mut unread)));
        }
        if !self.expired.is_empty() {
            parts.push(format!(
                "expired before {} got it",
                list(&mut self.expired.iter())
            ));
        }
        if parts.is_empty() {
            "sent".to_owned()
        } else {
            parts.join("; ")
        }
    }
}

impl Sent {
    /// How it is shown: `12:03:07 alice → bob: hi  (id 42, read by bob)`, or for a group as its
    /// members see it, `12:03:07 #team alice: hi  (id 42, delivered to 2 of 3, read by 1)`.
    fn line(&self, me: &UserId) -> String {
        let time = format_time(self.at);
        let status = match &self.state {
            SentState::Pending => "pending".to_owned(),
            SentState::Accepted { id, receipts } => format!("id {id}, {}", receipts.progress()),
            SentState::Refused(reason) | SentState::Lost(reason) => format!("not sent: {reason}"),
        };
        match &self.to {
            Address::Group(group) => format!("{time} #{group} {me}: {}  ({status})", self.text),
            Address::User(user) => format!("{time} {me} → {user}: {}  ({status})", self.text),
        }
    }

    /// Whether the host does not have it, and will not unless the chat goes on.
    fn unsent(&self) -> bool {
        matches!(self.state, SentState::Pending | SentState::Lost(_))
    }
}

/// `"the text"`, or its start and `…`.
fn excerpt(text: &str) -> String {
    let mut chars = text.chars();
    let start: String = chars.by_ref().take(EXCERPT_CHARS).collect();
    if chars.next().is_some() {
        format!("{:?}", format!("{start}…"))
    } else {
        format!("{start:?}")
    }
}

/// One thing `/history` shows again.
#[derive(Debug)]
enum Entry {
    /// A line, as it was shown.
    Line(String),
    /// An own message, with how far it got by then.
    Sent(usize),
}

/// What a line typed asks for.
#[derive(Debug, PartialEq)]
enum Request<'a> {
    /// Nothing (a blank line).
    Nothing,
    /// Send this.
    Text(&'a str),
    /// A command.
    Command(Command),
    /// A command the chat does not know.
    Unknown(&'a str),
    /// A command used wrongly: what to say.
    Invalid(String),
}

/// The chat's commands.
#[derive(Debug, PartialEq)]
enum Command {
    Quit,
    Help,
    /// Talk to this user or group; without one, say who the conversation is with.
    To(Option<Address>),
    History,
    Who,
    /// Turn reporting read on or off; without a setting, switch it.
    Read(Option<bool>),
}

/// What `line` asks for: a command (`/to bob`) or text to send (`//x` sends `/x`).
fn request(line: &str) -> Request<'_> {
    if line.trim().is_empty() {
        return Request::Nothing;
    }
    if line.starts_with("//") {
        return Request::Text(&line[1..]);
    }
    let Some(command) = line.strip_prefix('/') else {
        return Request::Text(line);
    };
    let mut words = command.split_whitespace();
    let (name, argument, more) = (words.next().unwrap_or(""), words.next(), words.next());
    let command = match (name, argument, more) {
        ("quit" | "exit" | "q", None, _) => Command::Quit,
        ("help" | "?", None, _) => Command::Help,
        ("to", None, _) => Command::To(None),
        ("to", Some(to), None) => match to.parse::<Address>() {
            Ok(to) => Command::To(Some(to)),
            Err(e) => return Request::Invalid(format!("{to:?} is not a user or a group: {e}")),
        },
        ("history", None, _) => Command::History,
        ("who", None, _) => Command::Who,
        ("read", None, _) => Command::Read(None),
        ("read", Some("on"), None) => Command::Read(Some(true)),
        ("read", Some("off"), None) => Command::Read(Some(false)),
        ("to", ..) => return Request::Invalid("/to takes one user or group: /to bob".into()),
        ("read", ..) => return Request::Invalid("/read takes on or off, or nothing".into()),
        ("quit" | "exit" | "q" | "help" | "?" | "history" | "who", ..) => {
            return Request::Invalid(format!("/{name} takes nothing after it"));
        }
        (name, ..) => return Request::Unknown(name),
    };
    Request::Command(command)
}

/// The chat: who the user is and talks to, what arrived, what they sent, and the screen.
struct Chat {
    me: UserId,
    device_name: String,
    to: Option<Address>,
    /// Whether the conversation's chat messages are reported read as they are shown.
    read: bool,
    /// Whether the device is connected (as far as its updates said).
    connected: bool,
    /// Whether the first `Synced` came: the end of what waited for the device.
    synced: bool,
    sent: Vec<Sent>,
    /// The own messages the host accepted, by id, for their receipts.
    by_id: HashMap<MessageId, usize>,
    /// Own messages to submit once the chat has a device again.
    resubmit: Vec<usize>,
    /// Chat messages shown but not reported read: the conversation and the message.
    unread: VecDeque<(Address, MessageId)>,
    /// The contacts' presence as the presence messages said it: state and devices online.
    presence: BTreeMap<String, (PresenceState, u32)>,
    history: VecDeque<Entry>,
    /// History entries dropped past [`HISTORY_KEPT`].
    forgotten: u64,
    editor: LineEditor,
    /// Splits what is read into lines when it is not a terminal.
    lines: LineSplitter,
    screen: Screen,
    /// Opens what arrives end-to-end encrypted, and keeps the cards fetched for sealing.
    opener: e2e::Opener,
    /// Which conversations are encrypted end to end (the profile's `iim e2e on`).
    e2e: e2e::E2eSettings,
    /// The profile, for its keyring.
    home: (std::path::PathBuf, super::Profile),
    /// Own messages to encrypt, in order, waiting for their recipients' cards.
    sealing: VecDeque<usize>,
}

impl Chat {
    fn new(home: &Home, to: Option<Address>, read: bool, screen: Screen) -> Self {
        let mut chat = Self {
            me: home.profile.user.clone(),
            device_name: home.profile.device.to_string(),
            to,
            read,
            connected: true,
            synced: false,
            sent: Vec::new(),
            by_id: HashMap::new(),
            resubmit: Vec::new(),
            unread: VecDeque::new(),
            presence: BTreeMap::new(),
            history: VecDeque::new(),
            forgotten: 0,
            editor: LineEditor::default(),
            lines: LineSplitter::default(),
            screen,
            opener: e2e::Opener::new(&home.dir, &home.profile),
            e2e: home.profile.e2e.clone(),
            home: (home.dir.clone(), home.profile.clone()),
            sealing: VecDeque::new(),
        };
        chat.screen.prompt = prompt(chat.to.as_ref());
        chat
    }

    fn welcome(&mut self) {
        let with = match &self.to {
            Some(to) if self.e2e.covers(std::slice::from_ref(to)) => {
                format!("with {to} (end-to-end encrypted)")
            }
            Some(to) => format!("with {to}"),
            None => "with nobody yet (/to USER or /to #GROUP)".to_owned(),
        };
        self.say(&format!(
            "chatting as {} on device {} {with}; /help lists the commands",
            self.me, self.device_name
        ));
        self.draw_input();
    }

    /// Says `text`, a line of the chat's own.
    fn say(&mut self, text: &str) {
        self.screen.print(text);
    }

    /// Says `text` at the current time: news of the connection.
    fn say_now(&mut self, text: &str) {
        self.screen
            .print(&format!("{} {text}", format_time(now_ms())));
    }

    fn draw_input(&mut self) {
        self.screen.draw_input(&self.editor);
    }

    fn remember(&mut self, entry: Entry) {
        if self.history.len() == HISTORY_KEPT {
            self.history.pop_front();
            self.forgotten += 1;
        }
        self.history.push_back(entry);
    }

    /// What was typed: the lines it ends (or the end of the input).
    fn typed(&mut self, bytes: &[u8]) -> Vec<Typed> {
        if self.screen.interactive {
            self.editor.feed(bytes)
        } else {
            self.lines.feed(bytes)
        }
    }

    /// The end of what is typed: a last line without its newline, then the end.
    fn typed_end(&mut self) -> Vec<Typed> {
        if self.screen.interactive {
            vec![Typed::End]
        } else {
            self.lines.end()
        }
    }

    /// Does what line `line` asks; true if it asks to leave.
    fn entered(&mut self, link: &mut Link, line: &str) -> bool {
        match request(line) {
            Request::Nothing => {}
            Request::Text(text) => self.send(link, text),
            Request::Command(Command::Quit) => return true,
            Request::Command(Command::Help) => {
                for line in HELP {
                    self.say(line);
                }
            }
            Request::Command(Command::To(None)) => match &self.to {
                Some(to) if self.e2e.covers(std::slice::from_ref(to)) => {
                    self.say(&format!("talking to {to}, end-to-end encrypted"));
                }
                Some(to) => self.say(&format!("talking to {to}")),
                None => self.say("talking to nobody yet: /to USER or /to #GROUP"),
            },
            Request::Command(Command::To(Some(to))) => {
                self.say(&format!("talking to {to}"));
                self.screen.prompt = prompt(Some(&to));
                self.to = Some(to.clone());
                if self.read {
                    self.report_unread(link, &to);
                }
            }
            Request::Command(Command::History) => self.show_history(),
            Request::Command(Command::Who) => self.who(),
            Request::Command(Command::Read(setting)) => {
                self.read = setting.unwrap_or(!self.read);
                if self.read {
                    self.say("the conversation's messages are reported read as they are shown");
                    if let Some(to) = self.to.clone() {
                        self.report_unread(link, &to);
                    }
                } else {
                    self.say("messages are no longer reported read (/read on to start again)");
                }
            }
            Request::Unknown(name) => {
                self.say(&format!(
                    "no command /{name}: /help lists them (//TEXT sends TEXT starting with /)"
                ));
            }
            Request::Invalid(what) => self.say(&what),
        }
        false
    }

    /// Sends `text` to the conversation.
    fn send(&mut self, link: &mut Link, text: &str) {
        let Some(to) = self.to.clone() else {
            self.say("talking to nobody yet: /to USER or /to #GROUP first");
            return;
        };
        let index = self.sent.len();
        self.sent.push(Sent {
            client_id: iim_client::new_client_id(),
            to,
            text: text.to_owned(),
            sealed: None,
            at: now_ms(),
            state: SentState::Pending,
        });
        self.remember(Entry::Sent(index));
        let line = self.sent[index].line(&self.me);
        self.screen.print_keyed(LineKey::Sent(index), &line);
        if self.e2e.covers(std::slice::from_ref(&self.sent[index].to)) {
            self.sealing.push_back(index);
            self.seal_waiting(link);
        } else if !link.submit(index, &self.sent[index]) {
            self.resubmit.push(index);
        }
    }

    /// Encrypts and submits the own messages waiting to be, in order, as far as the cards
    /// fetched allow; asks for the cards the first one needs.
    fn seal_waiting(&mut self, link: &mut Link) {
        while let Some(&index) = self.sealing.front() {
            let Some(sent) = self.sent.get(index) else {
                self.sealing.pop_front();
                continue;
            };
            let (dir, profile) = &self.home;
            let sealed = match &sent.to {
                Address::Group(group) => e2e::with_keys(dir, profile, |k| {
                    k.encrypt_for_group(group, sent.text.as_bytes())
                        .map(|body| (body, vec![sent.to.clone()]))
                })
                .and_then(|sealed| Ok(sealed?)),
                Address::User(user) => {
                    let mut users = vec![user.clone()];
                    if *user != self.me {
                        users.push(self.me.clone());
                    }
                    let Some(cards) = self.opener.cards(&users) else {
                        if let Some(device) = &link.device {
                            self.opener.ask(device, users);
                        }
                        return;
                    };
                    e2e::seal_with(
                        dir,
                        profile,
                        std::slice::from_ref(user),
                        &cards,
                        sent.text.as_bytes(),
                    )
                }
            };
            self.sealing.pop_front();
            match sealed {
                Ok(sealed) => {
                    self.sent[index].sealed = Some(sealed);
                    if !link.submit(index, &self.sent[index]) {
                        self.resubmit.push(index);
                    }
                }
                Err(e) => {
                    let reason = format!("{e:#}");
                    let news = format!(
                        "{} message to {} not sent ({reason}): {}",
                        format_time(now_ms()),
                        self.sent[index].to,
                        excerpt(&self.sent[index].text)
                    );
                    self.sent[index].state = SentState::Refused(reason);
                    self.show_sent(index, &news);
                }
            }
        }
    }

    /// The host answered the submission of `what`.
    fn answered(&mut self, what: What, answer: Result<Accepted, ClientError>) {
        match what {
            What::Message(index) => self.message_answered(index, answer),
            What::ReadReport(id) => match answer {
                Ok(_) => {}
                // The device went; the message stays unreported, nothing worse.
                Err(ClientError::ConnectionLost(_)) => {}
                Err(e) if e.code() == Some(ErrorCode::SESSION_REPLACED) => {}
                Err(e) => self.say(&format!("cannot report message {id} read: {e}")),
            },
        }
    }

    fn message_answered(&mut self, index: usize, answer: Result<Accepted, ClientError>) {
        let Some(sent) = self.sent.get_mut(index) else {
            return;
        };
        let news = match answer {
            Ok(accepted) => {
                sent.at = accepted.sent_at;
                sent.state = SentState::Accepted {
                    id: accepted.id,
                    receipts: Receipts::default(),
                };
                self.by_id.insert(accepted.id, index);
                format!(
                    "{} message {} sent to {}: {}",
                    format_time(accepted.sent_at),
                    accepted.id,
                    sent.to,
                    excerpt(&sent.text)
                )
            }
            // An `iim group` took the device's deliveries: submitted again once they are back.
            Err(e) if e.code() == Some(ErrorCode::SESSION_REPLACED) => {
                self.resubmit.push(index);
                return;
            }
            Err(e) => {
                let reason = e.to_string();
                let news = format!(
                    "{} message to {} not sent ({reason}): {}",
                    format_time(now_ms()),
                    sent.to,
                    excerpt(&sent.text)
                );
                sent.state = match e {
                    ClientError::Refused { .. } => SentState::Refused(reason),
                    _ => SentState::Lost(reason),
                };
                news
            }
        };
        self.show_sent(index, &news);
    }

    /// Shows how far own message `index` got: its line updated in place if it is just above
    /// the prompt, else `news` on a line of its own.
    fn show_sent(&mut self, index: usize, news: &str) {
        let line = self.sent[index].line(&self.me);
        if !self.screen.replace(LineKey::Sent(index), &line) {
            self.screen.print(news);
        }
    }

    fn unsent(&self) -> usize {
        self.sent.iter().filter(|s| s.unsent()).count()
    }

    /// The user asked to leave (once more, if `leave` says they had).
    fn asked_to_leave(&mut self, leave: Leave) -> Leave {
        match leave {
            Leave::Stay => {
                let unsent = self.unsent();
                if unsent > 0 && !self.connected {
                    self.say(&format!(
                        "{unsent} message(s) not sent yet: they go once the connection is back; \
                         /quit or Ctrl-C again leaves without them"
                    ));
                }
                Leave::WhenSent
            }
            Leave::WhenSent | Leave::Now => Leave::Now,
        }
    }

    /// Whether the chat may end now. Closing a connected device hands the host every
    /// submission it holds; a device waiting to reconnect cannot, and a message still waiting
    /// to be encrypted is not submitted yet.
    fn may_leave(&self, leave: Leave, has_device: bool) -> bool {
        match leave {
            Leave::Stay => false,
            Leave::WhenSent => {
                self.unsent() == 0 || (has_device && self.connected && self.sealing.is_empty())
            }
            Leave::Now => true,
        }
    }

    /// A delivery: opened if it is end-to-end encrypted (held while its sender's card is
    /// fetched), then each ready one handled in order.
    fn delivered(&mut self, link: &mut Link, seq: u64, message: Message) -> anyhow::Result<()> {
        let Some(device) = &link.device else {
            return Ok(());
        };
        for ready in self.opener.take(device, seq, message)? {
            self.received(link, ready);
        }
        // The cards some own messages waited for may be here.
        self.seal_waiting(link);
        Ok(())
    }

    /// No answer came for the cards asked for: what waited for them goes on without.
    fn cards_late(&mut self, link: &mut Link) -> anyhow::Result<()> {
        let Some(device) = &link.device else {
            return Ok(());
        };
        for ready in self.opener.expire(device)? {
            self.received(link, ready);
        }
        self.seal_waiting(link);
        Ok(())
    }

    /// A delivery: shown, acknowledged, and reported read if it is the conversation's.
    fn received(&mut self, link: &mut Link, ready: e2e::Ready) {
        let e2e::Ready { seq, message, seal } = ready;
        let message = &message;
        self.show_message(message, &seal);
        if let Some(device) = &link.device {
            device.ack(seq);
        }
        if message.kind != MessageKind::Chat || message.from == self.me {
            return;
        }
        let conversation = match group_of(message) {
            Some(group) => Address::Group(group.clone()),
            None => Address::User(message.from.clone()),
        };
        // Acknowledged before it is reported read, so that its sender hears of the delivery
        // first (the receipts plugin handles both in the order they come).
        if self.read
            && self.to.as_ref() == Some(&conversation)
            && link.report_read(&conversation, message.id)
        {
            return;
        }
        if self.unread.len() == UNREAD_KEPT {
            self.unread.pop_front();
        }
        self.unread.push_back((conversation, message.id));
    }

    fn show_message(&mut self, message: &Message, seal: &e2e::Seal) {
        if *seal == e2e::Seal::Hidden {
            return;
        }
        match &message.kind {
            MessageKind::Receipt => {
                if let Ok(receipt) = Receipt::from_json(&message.body)
                    && self.receipt(message, &receipt)
                {
                    return;
                }
            }
            MessageKind::Presence => {
                // Notifications and snapshots alike: the latest entry for a user holds.
                if let Ok(presence) = Presence::from_json(&message.body) {
                    for entry in presence.presence {
                        self.presence
                            .insert(entry.user, (entry.state, entry.devices));
                    }
                }
            }
            // An own message to a group comes back to its sender: it is already shown.
            _ if message.from == self.me && self.by_id.contains_key(&message.id) => return,
            _ => {}
        }
        let line = show::message_line_sealed(false, message, seal);
        self.screen.print(&line);
        self.remember(Entry::Line(line));
    }

    /// Takes a receipt about an own message of this chat, or the echo of one of its own read
    /// reports; false for any other, which is shown as it is.
    fn receipt(&mut self, message: &Message, receipt: &Receipt) -> bool {
        // The receipts plugin tells the reader's devices too, this one included.
        if let Receipt::Read { user, device, .. } = receipt
            && *user == self.me.as_str()
            && *device == self.device_name
        {
            return true;
        }
        let id = MessageId(receipt_id(receipt));
        let Some(&index) = self.by_id.get(&id) else {
            return false;
        };
        let Some(Sent {
            state: SentState::Accepted { receipts, .. },
            text,
            ..
        }) = self.sent.get_mut(index)
        else {
            return false;
        };
        receipts.note(receipt);
        let news = format!("{}: {}", show::message_line(false, message), excerpt(text));
        self.show_sent(index, &news);
        true
    }

    /// The first `Synced`: what waited for the device is all shown.
    fn synced(&mut self, count: u64) {
        // After a reconnect, what came meanwhile is simply shown.
        if std::mem::replace(&mut self.synced, true) {
            return;
        }
        match count {
            0 => self.say("(nothing waited for you; live from here)"),
            count => self.say(&format!(
                "({count} message(s) that waited for you above; live from here)"
            )),
        }
    }

    fn disconnected(&mut self, reason: &ClientError, retry_in: Duration) {
        let secs = retry_in.as_secs_f64();
        let text = match reason {
            ClientError::Redirected { server, addr } => {
                format!("redirected to home host {server} at {addr}")
            }
            reason if self.connected => {
                format!("connection lost ({reason}); reconnecting in {secs:.1} s…")
            }
            reason => format!("still no connection ({reason}); trying again in {secs:.1} s…"),
        };
        self.connected = false;
        // One status line while it lasts.
        let line = format!("{} {text}", format_time(now_ms()));
        if !self.screen.replace(LineKey::Status, &line) {
            self.screen.print_keyed(LineKey::Status, &line);
        }
    }

    fn reconnected(&mut self) {
        self.connected = true;
        self.say_now("reconnected");
    }

    /// An `iim group` took the device's deliveries for a moment.
    fn taken(&mut self) {
        self.connected = false;
        self.say_now(
            "`iim group` took this device's deliveries while it waits for its answer; \
             the chat goes on once it is done",
        );
    }

    /// The deliveries are back, on a new device: what was not sent is submitted on it.
    fn back(&mut self, link: &mut Link) {
        self.connected = true;
        self.say_now("the chat has its deliveries back");
        for index in std::mem::take(&mut self.resubmit) {
            if let Some(sent) = self.sent.get(index)
                && matches!(sent.state, SentState::Pending)
                && !link.submit(index, sent)
            {
                self.resubmit.push(index);
            }
        }
    }

    /// Reports read what was shown of `conversation` and not reported yet.
    fn report_unread(&mut self, link: &mut Link, conversation: &Address) {
        let mut kept = VecDeque::with_capacity(self.unread.len());
        for (of, id) in std::mem::take(&mut self.unread) {
            if of != *conversation || !link.report_read(&of, id) {
                kept.push_back((of, id));
            }
        }
        self.unread = kept;
    }

    fn show_history(&mut self) {
        let mut lines = vec![match self.forgotten {
            0 => "── what arrived since the chat started ──".to_owned(),
            n => format!("── what arrived since the chat started ({n} earliest left out) ──"),
        }];
        for entry in &self.history {
            lines.push(match entry {
                Entry::Line(line) => line.clone(),
                Entry::Sent(index) => self.sent[*index].line(&self.me),
            });
        }
        lines.push("── end of the history ──".to_owned());
        for line in lines {
            self.screen.print(&line);
        }
    }

    fn who(&mut self) {
        if self.presence.is_empty() {
            self.say(
                "no contact's presence known: your contacts are your friends and colleagues \
                 (iim friend add USER)",
            );
            return;
        }
        let list: Vec<String> = self
            .presence
            .iter()
            .map(|(user, (state, devices))| match state {
                PresenceState::Online => format!(
                    "{user} online ({devices} device{})",
                    if *devices == 1 { "" } else { "s" }
                ),
                PresenceState::Offline => format!("{user} offline"),
            })
            .collect();
        self.say(&format!("contacts: {}", list.join(", ")));
    }
}

/// The id of the message a receipt is about.
fn receipt_id(receipt: &Receipt) -> u64 {
    match receipt {
        Receipt::Delivered { id, .. }
        | Receipt::Read { id, .. }
        | Receipt::Refused { id, .. }
        | Receipt::Expired { id, .. }
        | Receipt::Counts { id, .. } => *id,
    }
}

/// The prompt for a conversation with `to`: `bob> `, `#team> `, or `> `.
fn prompt(to: Option<&Address>) -> String {
    match to {
        Some(to) => format!("{to}> "),
        None => "> ".to_owned(),
    }
}

/// Now, in milliseconds since the Unix epoch (as the host's `sent_at`).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_typed_are_messages_or_commands() {
        assert_eq!(request("  "), Request::Nothing);
        assert_eq!(request("hello /quit"), Request::Text("hello /quit"));
        assert_eq!(request("//quit"), Request::Text("/quit"));
        assert_eq!(request("/quit"), Request::Command(Command::Quit));
        assert_eq!(request("/q"), Request::Command(Command::Quit));
        assert_eq!(request("/help"), Request::Command(Command::Help));
        assert_eq!(request("/history"), Request::Command(Command::History));
        assert_eq!(request("/who"), Request::Command(Command::Who));
        assert_eq!(request("/to"), Request::Command(Command::To(None)));
        assert_eq!(
            request("/to  #team "),
            Request::Command(Command::To(Some("#team".parse().expect("group"))))
        );
        assert_eq!(request("/read"), Request::Command(Command::Read(None)));
        assert_eq!(
            request("/read off"),
            Request::Command(Command::Read(Some(false)))
        );
        assert!(matches!(request("/to Bob"), Request::Invalid(e) if e.contains("\"Bob\"")));
        assert!(matches!(request("/to a b"), Request::Invalid(_)));
        assert!(matches!(request("/read maybe"), Request::Invalid(_)));
        assert!(matches!(request("/quit now"), Request::Invalid(_)));
        assert_eq!(request("/dance"), Request::Unknown("dance"));
    }

    fn receipt(json: &str) -> Receipt {
        Receipt::from_json(json.as_bytes()).expect("receipt")
    }

    #[test]
    fn an_own_message_shows_how_far_it_got() {
        let me = UserId::new("alice").expect("name");
        let mut sent = Sent {
            client_id: 1,
            to: "bob".parse().expect("user"),
            text: "hi".into(),
            sealed: None,
            at: (12 * 3600 + 3 * 60 + 7) * 1000,
            state: SentState::Pending,
        };
        assert_eq!(sent.line(&me), "12:03:07 alice → bob: hi  (pending)");
        assert!(sent.unsent());
        let mut receipts = Receipts::default();
        assert_eq!(receipts.progress(), "sent");
        receipts.note(&receipt(
            r#"{"state":"delivered","id":42,"user":"bob","device":"phone"}"#,
        ));
        assert_eq!(receipts.progress(), "delivered to bob");
        receipts.note(&receipt(
            r#"{"state":"read","id":42,"user":"bob","device":"laptop"}"#,
        ));
        assert_eq!(receipts.progress(), "read by bob");
        sent.state = SentState::Accepted {
            id: MessageId(42),
            receipts,
        };
        assert_eq!(
            sent.line(&me),
            "12:03:07 alice → bob: hi  (id 42, read by bob)"
        );
        assert!(!sent.unsent());
        sent.state = SentState::Refused("no such user: bob (unknown_user)".into());
        assert_eq!(
            sent.line(&me),
            "12:03:07 alice → bob: hi  (not sent: no such user: bob (unknown_user))"
        );

        // A group's counts, the highest of each.
        let mut counts = Receipts::default();
        let count = |d, r| {
            format!(
                r#"{{"state":"counts","id":9,"group":"team","members":3,"delivered":{d},"read":{r}}}"#
            )
        };
        counts.note(&receipt(&count(2, 1)));
        counts.note(&receipt(&count(1, 0)));
        assert_eq!(counts.progress(), "delivered to 2 of 3, read by 1");
        let to_team = Sent {
            to: "#team".parse().expect("group"),
            state: SentState::Accepted {
                id: MessageId(9),
                receipts: counts,
            },
            ..sent
        };
        assert_eq!(
            to_team.line(&me),
            "12:03:07 #team alice: hi  (id 9, delivered to 2 of 3, read by 1)"
        );
        let mut refused = Receipts::default();
        refused.note(&receipt(
            r#"{"state":"refused","id":9,"users":[],"reason":"you are not a member of #team"}"#,
        ));
        assert_eq!(refused.progress(), "refused: you are not a member of #team");
        assert_eq!(excerpt("short"), "\"short\"");
        assert_eq!(excerpt(&"x".repeat(50)), format!("\"{}…\"", "x".repeat(40)));
    }
}
