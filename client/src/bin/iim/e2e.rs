//! `iim e2e …` and the end-to-end side of `iim send --e2e` and `iim listen`.
//!
//! The device's keys live in the profile directory (`e2e.keys`, mode 0600: `iim_client::e2e`).
//! The key directory is the host's `keys` plugin; asking it is a request message whose answer
//! comes back as a message, so, as `iim group` does, a command that asks opens the device's
//! delivery session for a moment ([`Directory`]), taking it from an `iim listen` of the same
//! profile, which takes it back after; it acknowledges only while everything that came was its
//! own, so that `listen` loses nothing.
//!
//! `iim listen` opens what it can with the cards it has pinned; a message from a device it has
//! no card for is held, with everything after it, until the directory's answer comes (or
//! [`CARD_WAIT`] passes): the order of what is shown is the order of delivery.

use super::deliveries::{AnswerTimeout, DeliveryLock};
use super::{Cli, Profile, print_result, profile_dir, save_profile, saved_login, session};
use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use iim_client::e2e::is_end_to_end;
use iim_client::e2e::{CardNews, E2eError, KEY_PACKAGES, Keyring, cards_of, keys_kind, keys_reply};
use iim_client::proto::body::keys::{Answer, CardEntry, KeysReply, KeysRequest};
use iim_client::proto::{Address, ErrorCode, Message, MessageId, MessageKind, SessionMode, UserId};
use iim_client::{ClientError, Connection, Event};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// The keyring's file in the profile directory.
const KEYRING_FILE: &str = "e2e.keys";

/// How long `listen` holds a message from a device it has no card for, waiting for the key
/// directory's answer.
pub(crate) const CARD_WAIT: Duration = Duration::from_secs(10);

/// `iim e2e`: the subcommand and how long to wait for the key directory.
#[derive(Debug, clap::Args)]
pub(crate) struct E2eArgs {
    #[command(flatten)]
    timeout: AnswerTimeout,
    #[command(subcommand)]
    op: E2eCommand,
}

/// What to do with this device's end-to-end encryption.
#[derive(Debug, Subcommand)]
pub(crate) enum E2eCommand {
    /// Make this device's keys (once) and publish its card and MLS key packages in the host's
    /// key directory; prints the device's fingerprint. `iim send --e2e` does it by itself the
    /// first time.
    Setup,
    /// This device's fingerprint, the conversations encrypted by default, the keys pinned.
    Status,
    /// Fetch the devices of USERS from the key directory and show their fingerprints: a
    /// device seen for the first time is pinned (trusted on first use); a key that differs
    /// from the pinned one is shown as changed and not used until `iim e2e trust`.
    Cards {
        /// Whose devices.
        #[arg(required = true)]
        users: Vec<UserId>,
    },
    /// Accept the changed key of USER/DEVICE (after comparing its fingerprint with its owner,
    /// out of band).
    Trust {
        /// The device, `user/device`.
        device: String,
    },
    /// Encrypt messages end to end by default (`iim send`): to USER, or without USER to
    /// everyone. `iim send --plain` sends one message in the clear all the same.
    On {
        /// The conversation [default: every conversation].
        user: Option<UserId>,
    },
    /// Stop encrypting by default: to USER, or without USER every default set.
    Off {
        /// The conversation [default: every one].
        user: Option<UserId>,
    },
}

/// The profile's end-to-end setting: which conversations `iim send` encrypts by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct E2eSettings {
    /// Every conversation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) all: bool,
    /// These users.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub(crate) with: BTreeSet<UserId>,
}

impl E2eSettings {
    /// Whether nothing is encrypted by default.
    pub(crate) fn is_off(&self) -> bool {
        !self.all && self.with.is_empty()
    }

    /// Whether a message to `to` is encrypted by default.
    pub(crate) fn covers(&self, to: &[Address]) -> bool {
        self.all
            || (!to.is_empty()
                && to
                    .iter()
                    .all(|a| matches!(a, Address::User(u) if self.with.contains(u))))
    }
}

/// The keyring file of profile directory `dir`.
pub(crate) fn keyring_path(dir: &Path) -> PathBuf {
    dir.join(KEYRING_FILE)
}

/// The profile's keyring, made if there is none (not saved yet).
pub(crate) fn keyring(dir: &Path, profile: &Profile) -> anyhow::Result<Keyring> {
    Ok(Keyring::open_or_create(
        &keyring_path(dir),
        &profile.user,
        &profile.device,
        now_ms(),
    )?)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs `iim e2e`.
pub(crate) async fn run(cli: &Cli, args: &E2eArgs) -> anyhow::Result<()> {
    let dir = profile_dir(cli)?;
    let mut profile = saved_login(&dir)?;
    let timeout = args.timeout.duration();
    match &args.op {
        E2eCommand::Setup => {
            let mut keys = keyring(&dir, &profile)?;
            let mut directory = Directory::open(cli, timeout).await?;
            let waiting = publish(&mut directory, &mut keys).await;
            directory.close().await;
            let waiting = waiting?;
            let fingerprint = keys.fingerprint()?;
            print_result(
                cli,
                serde_json::json!({ "device": keys.me(), "fingerprint": fingerprint,
                                    "key_packages": waiting }),
                || {
                    format!(
                        "published the card of {} ({waiting} key packages wait)\n\
                         fingerprint {fingerprint}",
                        keys.me()
                    )
                },
            );
        }
        E2eCommand::Status => {
            let path = keyring_path(&dir);
            if !path.exists() {
                bail!("this device has no end-to-end keys yet: `iim e2e setup` makes them");
            }
            let keys = keyring(&dir, &profile)?;
            let pinned: Vec<(String, String)> = keys
                .pinned()
                .map(|(device, fingerprint)| (device.to_owned(), fingerprint))
                .collect();
            let fingerprint = keys.fingerprint()?;
            let settings = &profile.e2e;
            print_result(
                cli,
                serde_json::json!({ "device": keys.me(), "fingerprint": fingerprint,
                                    "default": settings, "pinned": pinned }),
                || {
                    let default = match (settings.all, settings.with.is_empty()) {
                        (true, _) => "every conversation".to_owned(),
                        (false, true) => "none (only `iim send --e2e`)".to_owned(),
                        (false, false) => settings
                            .with
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    };
                    let mut text = format!(
                        "device {} fingerprint {fingerprint}\nencrypted by default: {default}\n\
                         pinned keys:",
                        keys.me()
                    );
                    for (device, fingerprint) in &pinned {
                        text.push_str(&format!("\n  {device}  {fingerprint}"));
                    }
                    text
                },
            );
        }
        E2eCommand::Cards { users } => {
            let mut keys = keyring(&dir, &profile)?;
            let mut directory = Directory::open(cli, timeout).await?;
            let cards = fetch_cards(&mut directory, users).await;
            directory.close().await;
            let news = keys.accept_cards(&cards?);
            keys.save()?;
            if cli.json {
                for news in &news {
                    println!("{}", news_json(news));
                }
            } else if news.is_empty() {
                println!("no device of these users has a card in the key directory");
            } else {
                for news in &news {
                    println!("{}", news_text(news));
                }
            }
        }
        E2eCommand::Trust { device } => {
            let mut keys = keyring(&dir, &profile)?;
            let fingerprint = keys.trust(device)?;
            keys.save()?;
            print_result(
                cli,
                serde_json::json!({ "trusted": device, "fingerprint": fingerprint }),
                || format!("trusted the new key of {device}: {fingerprint}"),
            );
        }
        E2eCommand::On { user } | E2eCommand::Off { user } => {
            let on = matches!(args.op, E2eCommand::On { .. });
            let settings = &mut profile.e2e;
            match (user, on) {
                (None, on) => {
                    settings.all = on;
                    if !on {
                        settings.with.clear();
                    }
                }
                (Some(user), true) => {
                    settings.with.insert(user.clone());
                }
                (Some(user), false) => {
                    settings.with.remove(user);
                }
            }
            save_profile(&dir, &profile)?;
            let what = user.as_ref().map_or_else(
                || "every conversation".to_owned(),
                |u| format!("messages to {u}"),
            );
            let state = if on { "on" } else { "off" };
            print_result(
                cli,
                serde_json::json!({ "e2e": state, "user": user }),
                || format!("end-to-end encryption by default {state} for {what}"),
            );
        }
    }
    Ok(())
}

/// Publishes this device's card and tops its key packages up to [`KEY_PACKAGES`]; saves the
/// keyring (the packages' secrets) before the request goes out. Returns how many wait.
pub(crate) async fn publish(directory: &mut Directory, keys: &mut Keyring) -> anyhow::Result<u32> {
    let request = keys.publish(KEY_PACKAGES)?;
    keys.save()?;
    let replies = directory.ask(&request).await?;
    match replies.last().map(|reply| &reply.answer) {
        Some(Answer::Published { key_packages }) => Ok(*key_packages),
        Some(Answer::Refused { reason }) => bail!("the key directory refused: {reason}"),
        other => bail!("unexpected answer from the key directory: {other:?}"),
    }
}

/// The cards of every device of `users`, from the directory.
pub(crate) async fn fetch_cards(
    directory: &mut Directory,
    users: &[UserId],
) -> anyhow::Result<Vec<CardEntry>> {
    let request = KeysRequest::Cards {
        users: users.iter().map(ToString::to_string).collect(),
    };
    let replies = directory.ask(&request).await?;
    cards_of(&replies)
        .unwrap_or_else(|| Err(E2eError::Directory("an incomplete answer".into())))
        .map_err(Into::into)
}

/// Seals `plaintext` for users `to` and this user's other devices, as the directory lists
/// them now (publishing this device's card first if the keyring is new). Says on stderr which
/// devices it saw for the first time. Returns the body and where to send it.
pub(crate) async fn seal(
    directory: &mut Directory,
    keys: &mut Keyring,
    new_keyring: bool,
    to: &[UserId],
    plaintext: &[u8],
) -> anyhow::Result<(Vec<u8>, Vec<Address>)> {
    if new_keyring {
        publish(directory, keys).await?;
        eprintln!(
            "iim: made this device's end-to-end keys; fingerprint {}",
            keys.fingerprint()?
        );
    }
    let mut users: Vec<UserId> = to.to_vec();
    let me = &directory.profile.user;
    if !users.contains(me) {
        users.push(me.clone());
    }
    let cards = fetch_cards(directory, &users).await?;
    for news in keys.accept_cards(&cards) {
        match &news {
            CardNews::Known { .. } => {}
            CardNews::New { device, .. } if *device == keys.me() => {}
            news => eprintln!("iim: {}", news_text(news)),
        }
    }
    let sealed = keys.seal(to, &cards, plaintext);
    // Cards pinned are kept whether or not the message could be sealed.
    keys.save()?;
    Ok(sealed?)
}

fn news_text(news: &CardNews) -> String {
    match news {
        CardNews::New {
            device,
            fingerprint,
        } => format!("{device}  {fingerprint}  (new: pinned)"),
        CardNews::Known {
            device,
            fingerprint,
        } => format!("{device}  {fingerprint}"),
        CardNews::Changed {
            device,
            pinned,
            offered,
        } => format!(
            "{device}  {offered}  (CHANGED from {pinned}: not used until `iim e2e trust {device}`)"
        ),
        CardNews::Invalid { device, reason } => format!("{device}  invalid card ignored: {reason}"),
    }
}

fn news_json(news: &CardNews) -> serde_json::Value {
    match news {
        CardNews::New {
            device,
            fingerprint,
        } => serde_json::json!({ "device": device, "fingerprint": fingerprint, "state": "new" }),
        CardNews::Known {
            device,
            fingerprint,
        } => serde_json::json!({ "device": device, "fingerprint": fingerprint, "state": "pinned" }),
        CardNews::Changed {
            device,
            pinned,
            offered,
        } => serde_json::json!({ "device": device, "fingerprint": offered, "pinned": pinned,
                                 "state": "changed" }),
        CardNews::Invalid { device, reason } => {
            serde_json::json!({ "device": device, "state": "invalid", "reason": reason })
        }
    }
}

/// The device's delivery session, held for asking the key directory: taken from an `iim
/// listen` of this profile until [`close`](Self::close)d.
pub(crate) struct Directory {
    conn: Connection,
    pub(crate) profile: Profile,
    deadline: Instant,
    timeout: Duration,
    /// Messages that came that were not answers: once one did, nothing more is acknowledged.
    others: u64,
    lock: DeliveryLock,
}

impl Directory {
    /// Takes the profile's deliveries (waiting while another command holds them) and opens a
    /// delivery session; every answer must come within `timeout` of now.
    pub(crate) async fn open(cli: &Cli, timeout: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + timeout;
        let dir = profile_dir(cli)?;
        let lock = DeliveryLock::take(&dir, deadline).await?;
        lock.mark()?;
        let (conn, profile) = session(cli, SessionMode::Receive).await?;
        Ok(Self {
            conn,
            profile,
            deadline,
            timeout,
            others: 0,
            lock,
        })
    }

    /// The connection, to send on.
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Submits `request` and waits for the whole answer: the parts of a reply naming it.
    pub(crate) async fn ask(&mut self, request: &KeysRequest) -> anyhow::Result<Vec<KeysReply>> {
        let me = std::slice::from_ref(&self.profile.user);
        let body = request.to_json();
        let submitted = self
            .conn
            .submit(iim_client::new_client_id(), keys_kind(), me, &body);
        let accepted = match tokio::time::timeout_at(self.deadline, submitted).await {
            Err(_) => bail!(
                "the host did not take the request within {:?}",
                self.timeout
            ),
            Ok(Err(e)) if e.code() == Some(ErrorCode::UNSUPPORTED_KIND) => {
                bail!("this host has no key directory (the `keys` plugin) ({e})")
            }
            Ok(result) => result?,
        };
        let mut parts = Vec::new();
        loop {
            let message = self.next(accepted.id).await?;
            let Some(reply) = message else { continue };
            let last = !matches!(
                reply.answer,
                Answer::Cards { more: true, .. } | Answer::Claimed { more: true, .. }
            );
            parts.push(reply);
            if last {
                return Ok(parts);
            }
        }
    }

    /// The next message: the directory's reply to `request`, or `None` for another.
    async fn next(&mut self, request: MessageId) -> anyhow::Result<Option<KeysReply>> {
        let event = tokio::time::timeout_at(self.deadline, self.conn.next_event())
            .await
            .map_err(|_| {
                anyhow!(
                    "no answer from the key directory within {} s (is the `keys` plugin \
                     loaded? `iim-host admin plugins`)",
                    self.timeout.as_secs()
                )
            })?;
        let (seq, message) = match event {
            Some(Ok(Event::Message { seq, message })) => (seq, message),
            Some(Ok(_)) => return Ok(None),
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ClientError::ConnectionLost("the connection ended".into()).into()),
        };
        let reply = keys_reply(&message, &self.profile.device).filter(|r| r.request == request.0);
        if reply.is_none() && !is_own_presence_snapshot(&message, &self.profile.user) {
            self.others += 1;
        }
        if self.others == 0 {
            // Not needed for the answer: if it fails, `listen` shows one line more.
            let _ = self.conn.ack(seq).await;
        }
        Ok(reply)
    }

    /// Closes the session, then lets a waiting `listen` take the deliveries back.
    pub(crate) async fn close(self) {
        self.conn.close().await;
        drop(self.lock);
    }
}

/// Whether `message` is the presence snapshot a session of `me` gets as it opens.
fn is_own_presence_snapshot(message: &Message, me: &UserId) -> bool {
    message.kind == MessageKind::Presence && message.from == *me
}

/// Unpublishes `device`'s card from the key directory, without waiting for the answer (the
/// device is revoked or logged out; a host without a key directory has nothing to remove).
pub(crate) async fn unpublish(conn: &Connection, me: &UserId, device: &str) {
    let request = KeysRequest::Unpublish {
        device: Some(device.to_owned()),
    };
    let sent = conn
        .submit(
            iim_client::new_client_id(),
            keys_kind(),
            std::slice::from_ref(me),
            &request.to_json(),
        )
        .await;
    match sent {
        Ok(_) => {}
        Err(e) if e.code() == Some(ErrorCode::UNSUPPORTED_KIND) => {}
        Err(e) => eprintln!("iim: could not remove {device}'s key from the key directory: {e}"),
    }
}

/// Removes the keyring of profile directory `dir` (the device logged out or was revoked).
pub(crate) fn forget_keys(dir: &Path) -> anyhow::Result<()> {
    let path = keyring_path(dir);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// How `listen` shows a message's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seal {
    /// A body in the clear.
    Plain,
    /// An end-to-end body this device opened: the message's body is now what was sealed.
    Opened,
    /// An end-to-end body this device could not open, and why.
    Failed(String),
    /// The key directory's business (a reply to this device or another of the user's): not
    /// shown.
    Hidden,
}

/// A message ready to be shown and acknowledged, in delivery order.
pub(crate) struct Ready {
    pub(crate) seq: u64,
    pub(crate) message: Message,
    pub(crate) seal: Seal,
}

/// How long cards fetched for a user are taken as all there are: a message from a device not
/// among them after that fetches again (the user may have added it since).
const CARDS_FRESH: Duration = Duration::from_secs(60);

/// Opens the e2e bodies `listen` gets, holding messages (in order) while a sender's card is
/// fetched.
pub(crate) struct Opener {
    dir: PathBuf,
    profile: Profile,
    /// Loaded at the first e2e body.
    keys: Option<Keyring>,
    held: std::collections::VecDeque<(u64, Message)>,
    /// The user whose cards were asked for, and until when the answer is waited for.
    asking: Option<(UserId, Instant)>,
    /// The parts of the `cards` answer so far.
    parts: Vec<KeysReply>,
    /// When each user's cards were last fetched.
    fetched: std::collections::BTreeMap<UserId, Instant>,
}

impl Opener {
    pub(crate) fn new(dir: &Path, profile: &Profile) -> Self {
        Self {
            dir: dir.to_owned(),
            profile: profile.clone(),
            keys: None,
            held: std::collections::VecDeque::new(),
            asking: None,
            parts: Vec::new(),
            fetched: std::collections::BTreeMap::new(),
        }
    }

    /// Until when a held message waits for a card, if one does.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.asking.as_ref().map(|(_, deadline)| *deadline)
    }

    /// Takes a delivered message; returns those now ready, in order (none while one waits
    /// for its sender's card, which `device` asks the directory for).
    pub(crate) fn take(
        &mut self,
        device: &iim_client::Device,
        seq: u64,
        message: Message,
    ) -> Vec<Ready> {
        let reply = keys_reply(&message, &self.profile.device)
            .filter(|r| matches!(r.answer, Answer::Cards { .. } | Answer::Refused { .. }));
        if let Some(reply) = reply
            && self.asking.is_some()
        {
            self.parts.push(reply);
            if let Some(cards) = cards_of(&self.parts) {
                self.cards_came(cards);
            }
        }
        self.held.push_back((seq, message));
        self.drain(device)
    }

    /// The whole answer to the cards asked for came: the new ones are pinned.
    fn cards_came(&mut self, cards: Result<Vec<CardEntry>, E2eError>) {
        self.parts.clear();
        if let Some((user, _)) = self.asking.take() {
            self.fetched.insert(user, Instant::now());
        }
        match (cards, self.keys.as_mut()) {
            (Ok(cards), Some(keys)) => {
                for news in keys.accept_cards(&cards) {
                    if !matches!(news, CardNews::Known { .. }) {
                        eprintln!("iim: {}", news_text(&news));
                    }
                }
                if let Err(e) = keys.save() {
                    eprintln!("iim: {e}");
                }
            }
            (Err(e), _) => eprintln!("iim: {e}"),
            (Ok(_), None) => {}
        }
    }

    /// The deadline passed: the held message's sender's card did not come.
    pub(crate) fn expire(&mut self, device: &iim_client::Device) -> Vec<Ready> {
        if let Some((user, _)) = self.asking.take() {
            eprintln!("iim: the key directory did not answer for {user}'s keys");
            self.fetched.insert(user, Instant::now());
            self.parts.clear();
        }
        self.drain(device)
    }

    fn drain(&mut self, device: &iim_client::Device) -> Vec<Ready> {
        let mut ready = Vec::new();
        while let Some((seq, mut message)) = self.held.pop_front() {
            let seal = match self.open(&mut message) {
                Ok(seal) => seal,
                Err(user) => {
                    if self.asking.is_none() {
                        self.ask(device, user);
                    }
                    self.held.push_front((seq, message));
                    break;
                }
            };
            ready.push(Ready { seq, message, seal });
        }
        ready
    }

    /// How `message` shows, its body replaced by what it opened to; `Err(user)`: the card of
    /// its sender, of `user`, is to be fetched first.
    fn open(&mut self, message: &mut Message) -> Result<Seal, UserId> {
        if message.kind == keys_kind() {
            return Ok(Seal::Hidden);
        }
        if message.kind != MessageKind::Chat || !is_end_to_end(&message.body) {
            return Ok(Seal::Plain);
        }
        let keys = match &mut self.keys {
            Some(keys) => keys,
            None => match keyring(&self.dir, &self.profile) {
                Ok(keys) => self.keys.insert(keys),
                Err(e) => return Ok(Seal::Failed(format!("{e:#}"))),
            },
        };
        let opened = keys.open(message);
        let saved = keys.save();
        match opened {
            Ok(opened) => {
                if let Err(e) = saved {
                    eprintln!("iim: {e}");
                }
                message.body = opened.plaintext;
                Ok(Seal::Opened)
            }
            Err(E2eError::UnknownSender { user, device }) => {
                let fresh = self
                    .fetched
                    .get(&message.from)
                    .is_some_and(|at| at.elapsed() < CARDS_FRESH);
                if fresh {
                    Ok(Seal::Failed(format!(
                        "no key of {user}/{device} in the key directory"
                    )))
                } else {
                    Err(message.from.clone())
                }
            }
            Err(e) if e.is_tampering() => Ok(Seal::Failed(format!(
                "REFUSED, it failed its end-to-end check: {e}"
            ))),
            Err(e) => Ok(Seal::Failed(e.to_string())),
        }
    }

    /// Asks the directory, through `device`, for the cards of `user`.
    fn ask(&mut self, device: &iim_client::Device, user: UserId) {
        let request = KeysRequest::Cards {
            users: vec![user.to_string()],
        };
        let submission = device.submit(
            iim_client::new_client_id(),
            keys_kind(),
            std::slice::from_ref(&self.profile.user),
            &request.to_json(),
        );
        let asked = user.clone();
        tokio::spawn(async move {
            if let Err(e) = submission.await {
                eprintln!("iim: cannot ask the key directory for {asked}'s keys: {e}");
            }
        });
        self.parts.clear();
        self.asking = Some((user, Instant::now() + CARD_WAIT));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::new(name).expect("user")
    }

    #[test]
    fn the_default_covers_every_conversation_or_the_users_named() {
        let mut settings = E2eSettings::default();
        assert!(settings.is_off());
        let bob = [Address::User(user("bob"))];
        assert!(!settings.covers(&bob));
        settings.with.insert(user("bob"));
        assert!(settings.covers(&bob));
        let both = [Address::User(user("bob")), Address::User(user("carol"))];
        assert!(!settings.covers(&both), "carol is not covered");
        settings.all = true;
        assert!(settings.covers(&both));
        let json = serde_json::to_string(&E2eSettings::default()).expect("json");
        assert_eq!(json, "{}");
    }
}
