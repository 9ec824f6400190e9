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

use super::show::{self, format_time, group_of};
use super::{
    Cli, Home, deliveries, login_refused, open_device, read_report, read_report_client_id,
};
use anyhow::{Context as _, bail};
use iim_client::proto::body::{Presence, PresenceState, Receipt};
use iim_client::proto::{Address, ErrorCode, Message, MessageId, MessageKind, SessionMode, UserId};
use iim_client::{Accepted, ClientError, Device, Submission, Update};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::mpsc;

/// The most entries `/history` keeps; older ones are dropped (and counted).
const HISTORY_KEPT: usize = 10_000;
/// The most chat messages of other conversations kept to report read when the user turns to
/// them.
const UNREAD_KEPT: usize = 4_096;
/// How much of an own message a line about it quotes.
const EXCERPT_CHARS: usize = 40;
/// The longest line the editor takes: past the host's limit for a body (64 KiB) anyway.
const LINE_CHARS: usize = 65_536;
/// How many typed lines Up and Down go back through.
const RECALL_KEPT: usize = 500;
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
            (what, answer) = next_answer(&mut link.waiting), if !link.waiting.is_empty() => {
                chat.answered(what, answer);
            }
            update = next_update(link.device.as_ref()) => match update {
                Some(Ok(Update::Message { seq, message })) => {
                    chat.received(&mut link, seq, &message);
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
                        chat.back(&mut link);
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
        let submission = device.submit(
            sent.client_id,
            MessageKind::Chat,
            std::slice::from_ref(&sent.to),
            sent.text.as_bytes(),
        );
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
        };
        chat.screen.prompt = prompt(chat.to.as_ref());
        chat
    }

    fn welcome(&mut self) {
        let with = match &self.to {
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
            at: now_ms(),
            state: SentState::Pending,
        });
        self.remember(Entry::Sent(index));
        let line = self.sent[index].line(&self.me);
        self.screen.print_keyed(LineKey::Sent(index), &line);
        if !link.submit(index, &self.sent[index]) {
            self.resubmit.push(index);
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
    /// submission it holds; a device waiting to reconnect cannot.
    fn may_leave(&self, leave: Leave, has_device: bool) -> bool {
        match leave {
            Leave::Stay => false,
            Leave::WhenSent => self.unsent() == 0 || (has_device && self.connected),
            Leave::Now => true,
        }
    }

    /// A delivery: shown, acknowledged, and reported read if it is the conversation's.
    fn received(&mut self, link: &mut Link, seq: u64, message: &Message) {
        self.show_message(message);
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

    fn show_message(&mut self, message: &Message) {
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
        let line = show::message_line(false, message);
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

/// Which line a printed line is, for updating it in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKey {
    /// Own message `n` of [`Chat::sent`].
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
struct Screen {
    out: Box<dyn std::io::Write>,
    interactive: bool,
    /// The terminal's width, if known: without it, nothing is updated in place.
    cols: Option<usize>,
    last: Option<Last>,
    prompt: String,
    /// The input row as drawn, and the cursor's column in it.
    row: String,
    cursor: usize,
}

impl Screen {
    fn new(interactive: bool) -> Self {
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
    fn print(&mut self, text: &str) {
        self.put(text, None, None);
    }

    /// Prints `text` on one line that [`Screen::replace`] may update while it is the last.
    fn print_keyed(&mut self, key: LineKey, text: &str) {
        self.put(text, Some(key), None);
    }

    /// Replaces the last line printed with `text` if it is line `key` (and the terminal has
    /// not changed width since); false otherwise.
    fn replace(&mut self, key: LineKey, text: &str) -> bool {
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
    fn draw_input(&mut self, editor: &LineEditor) {
        if !self.interactive {
            return;
        }
        (self.row, self.cursor) = editor.render(&self.prompt, self.cols);
        let mut out = "\r\x1b[K".to_owned();
        self.input_row(&mut out);
        self.write(&out);
    }

    /// Clears the terminal (Ctrl-L), leaving the input row.
    fn clear(&mut self) {
        if self.interactive {
            let mut out = "\x1b[H\x1b[2J".to_owned();
            self.input_row(&mut out);
            self.write(&out);
            self.last = None;
        }
    }

    fn resize(&mut self) {
        if self.interactive {
            self.cols = terminal_columns();
        }
    }

    /// Takes the input row away: the shell's prompt comes next.
    fn close(&mut self) {
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
enum Typed {
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
struct LineEditor {
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
    fn feed(&mut self, bytes: &[u8]) -> Vec<Typed> {
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
struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    fn feed(&mut self, bytes: &[u8]) -> Vec<Typed> {
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
    fn end(&mut self) -> Vec<Typed> {
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
enum Input {
    Bytes(Vec<u8>),
    /// The end of the input, or the error that ended it.
    End(Option<String>),
}

/// Reads stdin on a thread of its own, as it comes. Not tokio's stdin: a read that blocks
/// cannot be cancelled, and tokio's would keep the runtime, hence the process, from ending
/// after `/quit` until another key is pressed; this thread ends with the process.
fn read_stdin() -> anyhow::Result<mpsc::UnboundedReceiver<Input>> {
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
struct Terminal {
    raw: Option<RawMode>,
}

impl Terminal {
    fn open() -> Self {
        use std::io::IsTerminal;
        let terminal = std::io::stdin().is_terminal()
            && std::io::stdout().is_terminal()
            && std::env::var_os("TERM").is_none_or(|term| term != "dumb");
        Self {
            raw: if terminal { RawMode::enter() } else { None },
        }
    }

    /// Whether the chat draws on a terminal (a prompt, lines updated in place).
    fn interactive(&self) -> bool {
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
struct Signals {
    ended: Ending,
    resized: Resizing,
}

impl Signals {
    fn new(interactive: bool) -> Self {
        Self {
            ended: Ending::new(),
            resized: Resizing::new(interactive),
        }
    }
}

/// The terminal going away (SIGHUP), or the process asked to end (SIGTERM).
struct Ending {
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
    async fn wait(&mut self) {
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
struct Resizing {
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
    async fn wait(&mut self) {
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
