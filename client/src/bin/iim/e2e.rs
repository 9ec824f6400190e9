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
use iim_client::e2e::{
    CardNews, E2eError, KEY_PACKAGES, Keyring, Processed, cards_of, claimed_of, keys_kind,
    keys_reply,
};
use iim_client::proto::body::GroupRole;
use iim_client::proto::body::keys::{Answer, CardEntry, KeysReply, KeysRequest};
use iim_client::proto::{
    Address, ErrorCode, GroupId, Message, MessageId, MessageKind, SessionMode, UserId,
};
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
    /// Make the end-to-end (MLS) group of group NAME on this device, or bring it up to date
    /// with the group's members: every device of theirs with a card in the key directory is
    /// added (it reads what is sent from then on, not before), the devices of members who left
    /// and devices no longer in the directory (revoked, logged out) are removed (they cannot
    /// read what is sent after). The device that made it (the group's owner's) is the only one
    /// that changes it; `iim send --e2e '#NAME'` from it does this first by itself. Members'
    /// devices join through the welcome their `iim listen` receives.
    Group {
        /// The group (`team` or `#team`).
        #[arg(value_parser = super::group::parse_group)]
        group: GroupId,
    },
    /// Encrypt messages end to end by default (`iim send`, `iim chat`): to USER, or without
    /// USER to everyone. `iim send --plain` sends one message in the clear all the same.
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

/// Runs `f` on the profile's keyring (made if there is none), under its lock, and saves it
/// after (`Keyring::update`): `listen` and the commands of one device change it in turn.
pub(crate) fn with_keys<T>(
    dir: &Path,
    profile: &Profile,
    f: impl FnOnce(&mut Keyring) -> T,
) -> anyhow::Result<T> {
    Ok(Keyring::update(
        &keyring_path(dir),
        &profile.user,
        &profile.device,
        now_ms(),
        f,
    )?)
}

/// This device's `user/device` and fingerprint.
fn who_am_i(dir: &Path, profile: &Profile) -> anyhow::Result<(String, String)> {
    Ok(with_keys(dir, profile, |k| {
        k.fingerprint().map(|fingerprint| (k.me(), fingerprint))
    })??)
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
            let mut directory = Directory::open(cli, timeout).await?;
            let waiting = publish(&mut directory, &dir).await;
            directory.close().await;
            let waiting = waiting?;
            let (me, fingerprint) = who_am_i(&dir, &profile)?;
            print_result(
                cli,
                serde_json::json!({ "device": me, "fingerprint": fingerprint,
                                    "key_packages": waiting }),
                || {
                    format!(
                        "published the card of {me} ({waiting} key packages wait)\n\
                         fingerprint {fingerprint}"
                    )
                },
            );
        }
        E2eCommand::Status => {
            let path = keyring_path(&dir);
            if !path.exists() {
                bail!("this device has no end-to-end keys yet: `iim e2e setup` makes them");
            }
            let pinned: Vec<(String, String)> = with_keys(&dir, &profile, |k| {
                k.pinned()
                    .map(|(device, fingerprint)| (device.to_owned(), fingerprint))
                    .collect()
            })?;
            let (me, fingerprint) = who_am_i(&dir, &profile)?;
            let settings = &profile.e2e;
            print_result(
                cli,
                serde_json::json!({ "device": me, "fingerprint": fingerprint,
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
                        "device {me} fingerprint {fingerprint}\nencrypted by default: \
                         {default}\npinned keys:"
                    );
                    for (device, fingerprint) in &pinned {
                        text.push_str(&format!("\n  {device}  {fingerprint}"));
                    }
                    text
                },
            );
        }
        E2eCommand::Cards { users } => {
            let mut directory = Directory::open(cli, timeout).await?;
            let cards = fetch_cards(&mut directory, users).await;
            directory.close().await;
            let cards = cards?;
            let news = with_keys(&dir, &profile, |k| k.accept_cards(&cards))?;
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
        E2eCommand::Group { group } => {
            let mut directory = Directory::open(cli, timeout).await?;
            let done = async {
                publish_if_new(&mut directory, &dir).await?;
                let (in_group, commits) =
                    with_keys(&dir, &profile, |k| (k.in_group(group), k.commits(group)))?;
                if in_group && !commits {
                    bail!(
                        "#{group}'s end-to-end group is changed by the device that made it; \
                         this one reads and writes in it"
                    );
                }
                sync_group(&mut directory, &dir, group, !in_group).await
            }
            .await;
            directory.close().await;
            let (added, removed) = done?;
            print_result(
                cli,
                serde_json::json!({ "group": group, "added": added, "removed": removed }),
                || {
                    let list = |devices: &[String]| match devices {
                        [] => "none".to_owned(),
                        devices => devices.join(", "),
                    };
                    format!(
                        "#{group}: end-to-end group up to date; added: {}; removed: {}",
                        list(&added),
                        list(&removed)
                    )
                },
            );
        }
        E2eCommand::Trust { device } => {
            let fingerprint = with_keys(&dir, &profile, |k| k.trust(device))??;
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

/// Publishes this device's card and [`KEY_PACKAGES`] more key packages; the keyring (the
/// packages' secrets) is saved before the request goes out. Returns how many wait.
pub(crate) async fn publish(directory: &mut Directory, dir: &Path) -> anyhow::Result<u32> {
    let request = with_keys(dir, &directory.profile, |k| k.publish(KEY_PACKAGES))??;
    let replies = directory.ask(&request).await?;
    match replies.last().map(|reply| &reply.answer) {
        Some(Answer::Published { key_packages }) => {
            with_keys(dir, &directory.profile, Keyring::set_published)?;
            Ok(*key_packages)
        }
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

/// Publishes this device's card first if the key directory has not taken it yet (new keys),
/// saying so.
async fn publish_if_new(directory: &mut Directory, dir: &Path) -> anyhow::Result<()> {
    let published = with_keys(dir, &directory.profile, |k| k.is_published())?;
    if !published {
        publish(directory, dir).await?;
        let (_, fingerprint) = who_am_i(dir, &directory.profile)?;
        eprintln!("iim: made this device's end-to-end keys; fingerprint {fingerprint}");
    }
    Ok(())
}

/// Pins the cards fetched, saying on stderr which devices were new or changed; returns what
/// `f` makes of the keyring after.
fn accept_and<T>(
    dir: &Path,
    profile: &Profile,
    cards: &[CardEntry],
    f: impl FnOnce(&mut Keyring) -> T,
) -> anyhow::Result<T> {
    with_keys(dir, profile, |k| {
        for news in k.accept_cards(cards) {
            match &news {
                CardNews::Known { .. } => {}
                CardNews::New { device, .. } if *device == k.me() => {}
                news => eprintln!("iim: {}", news_text(news)),
            }
        }
        f(k)
    })
}

/// Seals `plaintext` for users `to` and this user's other devices, as the directory lists
/// them now. Returns the body and where to send it.
async fn seal(
    directory: &mut Directory,
    dir: &Path,
    to: &[UserId],
    plaintext: &[u8],
) -> anyhow::Result<(Vec<u8>, Vec<Address>)> {
    let mut users: Vec<UserId> = to.to_vec();
    let me = directory.profile.user.clone();
    if !users.contains(&me) {
        users.push(me);
    }
    let cards = fetch_cards(directory, &users).await?;
    seal_with(dir, &directory.profile, to, &cards, plaintext)
}

/// Seals `plaintext` for users `to` and this user's other devices with `cards`, the current
/// cards of those users and this one (pinning the new ones; what is pinned is kept whether or
/// not the message could be sealed): the body and the addresses it goes to.
pub(crate) fn seal_with(
    dir: &Path,
    profile: &Profile,
    to: &[UserId],
    cards: &[CardEntry],
    plaintext: &[u8],
) -> anyhow::Result<(Vec<u8>, Vec<Address>)> {
    Ok(accept_and(dir, profile, cards, |k| {
        k.seal(to, cards, plaintext)
    })??)
}

/// `iim send --e2e`: seals the body for the recipients' devices and this user's others (or,
/// for a group, encrypts it for the group's MLS group, which this device first brings up to
/// date with the group's members if it commits its changes) and sends it as a chat message.
pub(crate) async fn send(
    cli: &Cli,
    kind: &MessageKind,
    to: &[Address],
    source: super::BodySource,
    ttl: Option<u32>,
) -> anyhow::Result<()> {
    if *kind != MessageKind::Chat {
        bail!(
            "only chat messages are encrypted end to end (this one is {kind}): send it with \
             --plain"
        );
    }
    let group = match to {
        [Address::Group(group)] => Some(group.clone()),
        _ => None,
    };
    let users = match &group {
        Some(_) => Vec::new(),
        None => to
            .iter()
            .map(|address| match address {
                Address::User(user) => Ok(user.clone()),
                Address::Group(group) => Err(anyhow!(
                    "#{group}: a message to a group goes to that group alone"
                )),
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
    };
    let dir = profile_dir(cli)?;
    let mut directory = Directory::open(cli, Duration::from_secs(10)).await?;
    let sent = async {
        let body = source.read(directory.connection().max_body()).await?;
        publish_if_new(&mut directory, &dir).await?;
        let (sealed, addresses) = match &group {
            Some(group) => {
                let profile = directory.profile.clone();
                let (in_group, commits) =
                    with_keys(&dir, &profile, |k| (k.in_group(group), k.commits(group)))?;
                if !in_group {
                    bail!(
                        "this device is not in #{group}'s end-to-end group: the group's owner \
                         makes it with `iim e2e group {group}`, and `iim listen` here then \
                         receives its welcome"
                    );
                }
                if commits {
                    sync_group(&mut directory, &dir, group, false).await?;
                }
                let sealed = with_keys(&dir, &profile, |k| k.encrypt_for_group(group, &body))??;
                (sealed, vec![Address::Group(group.clone())])
            }
            None => seal(&mut directory, &dir, &users, &body).await?,
        };
        let conn = directory.connection();
        let client_id = iim_client::new_client_id();
        let accepted = match ttl {
            None => {
                conn.submit(client_id, kind.clone(), &addresses, &sealed)
                    .await?
            }
            Some(secs) => {
                let ttl = Duration::from_secs(u64::from(secs));
                conn.submit_expiring(client_id, kind.clone(), &addresses, &sealed, ttl)
                    .await?
            }
        };
        anyhow::Ok(accepted)
    }
    .await;
    directory.close().await;
    let accepted = sent?;
    print_result(
        cli,
        serde_json::json!({ "id": accepted.id.0, "sent_at": accepted.sent_at, "e2e": true }),
        || accepted.id.to_string(),
    );
    Ok(())
}

/// Sends an MLS body (a commit, a welcome) to `group`, as a chat message.
async fn to_group(conn: &Connection, group: &GroupId, body: &[u8]) -> Result<(), ClientError> {
    let to = [Address::Group(group.clone())];
    conn.submit(iim_client::new_client_id(), MessageKind::Chat, &to, body)
        .await
        .map(drop)
}

/// Users in one `cards` request, devices in one `claim` (the key directory's limit).
const PER_REQUEST: usize = 64;

/// Brings the MLS group of `group` up to date with the group's members, as this device (its
/// committer) sees them: the devices of users no longer members, or no longer in the key
/// directory, removed; every device of the members with a card and a key package left
/// added. With `create`, makes the MLS group first (this user must own the group). The
/// commits and the welcome go to the group, in order. Returns `(added, removed)`.
async fn sync_group(
    directory: &mut Directory,
    dir: &Path,
    group: &GroupId,
    create: bool,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let profile = directory.profile.clone();
    let members = super::group::members(
        directory.connection(),
        &profile.user,
        group,
        directory.deadline,
    )
    .await?;
    if create {
        let owner = members.first().filter(|m| m.role == GroupRole::Owner);
        if owner.is_none_or(|m| m.user != profile.user.as_str()) {
            bail!("only #{group}'s owner makes its end-to-end group");
        }
        with_keys(dir, &profile, |k| k.create_group(group))??;
    }
    let users: Vec<UserId> = members
        .iter()
        .filter_map(|m| UserId::new(m.user.as_str()).ok())
        .collect();
    let mut cards = Vec::new();
    for chunk in users.chunks(PER_REQUEST) {
        cards.extend(fetch_cards(directory, chunk).await?);
    }
    // Which devices should be in: those whose card is the one pinned (a changed or invalid
    // card leaves its device out until trusted); a member whose key in the group is not its
    // pinned card's (it made new keys) is removed and added again.
    let (removal, to_add) = accept_and(dir, &profile, &cards, |k| {
        let me = k.me();
        let wanted: BTreeSet<String> = cards
            .iter()
            .filter(|c| k.is_pinned(c))
            .map(|c| format!("{}/{}", c.user, c.device))
            .filter(|d| *d != me)
            .collect();
        let stale: BTreeSet<String> = k
            .stale_members(group)?
            .into_iter()
            .filter(|d| *d != me)
            .collect();
        let members: BTreeSet<String> = k
            .group_members(group)?
            .into_iter()
            .filter(|d| *d != me && !stale.contains(d))
            .collect();
        let gone: Vec<String> = members.difference(&wanted).chain(&stale).cloned().collect();
        let new: Vec<String> = wanted.difference(&members).cloned().collect();
        let removal = match gone.is_empty() {
            true => None,
            false => Some((k.remove_from_group(group, &gone)?, gone)),
        };
        Ok::<_, E2eError>((removal, new))
    })??;
    let removed = match removal {
        Some((commit, gone)) => {
            to_group(directory.connection(), group, &commit).await?;
            gone
        }
        None => Vec::new(),
    };
    let mut claimed = Vec::new();
    let mut missing = Vec::new();
    for chunk in to_add.chunks(PER_REQUEST) {
        let request = KeysRequest::Claim {
            devices: chunk.to_vec(),
        };
        let replies = directory.ask(&request).await?;
        let answer = claimed_of(&replies)
            .unwrap_or_else(|| Err(E2eError::Directory("an incomplete answer".into())))?;
        // Only the devices asked for: the directory cannot slip others in.
        claimed.extend(answer.packages.into_iter().filter(|p| {
            chunk
                .iter()
                .any(|d| *d == format!("{}/{}", p.user, p.device))
        }));
        missing.extend(answer.missing);
    }
    for device in &missing {
        eprintln!(
            "iim: {device} has no key package left in the key directory: it is added once it \
             publishes more (`iim e2e setup` on it)"
        );
    }
    let mut added = Vec::new();
    if !claimed.is_empty() {
        let (commit, welcome) = with_keys(dir, &profile, |k| k.add_to_group(group, &claimed))??;
        to_group(directory.connection(), group, &commit).await?;
        to_group(directory.connection(), group, &welcome).await?;
        added = claimed
            .iter()
            .map(|c| format!("{}/{}", c.user, c.device))
            .collect();
    }
    Ok((added, removed))
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

/// Removes the keyring of profile directory `dir` (the device logged out or was revoked),
/// under its lock: a `listen` of the device does not write it back.
pub(crate) fn forget_keys(dir: &Path) -> anyhow::Result<()> {
    let path = keyring_path(dir);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.with_extension("lock"))
        .and_then(|lock| lock.lock().map(|()| lock));
    // Without it (no profile directory: nothing to remove; a file system without locks) the
    // keyring is removed all the same.
    let _lock = lock.ok();
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
    /// What an end-to-end body that carries no message said: a group's members changed, this
    /// device joined a group, this device sent it.
    Notice(String),
    /// An end-to-end body this device could not open, and why.
    Failed(String),
    /// Not shown: the key directory's business (a reply to this device or another of the
    /// user's), or a group's welcome for other devices.
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
    held: std::collections::VecDeque<(u64, Message)>,
    /// The users whose cards were asked for, and until when the answer is waited for.
    asking: Option<(Vec<UserId>, Instant)>,
    /// The parts of the `cards` answer so far.
    parts: Vec<KeysReply>,
    /// Each user's cards as last fetched, and when.
    fetched: std::collections::BTreeMap<UserId, (Instant, Vec<CardEntry>)>,
    /// This device joined a group, using up one of its key packages: one more is published.
    used_key_package: bool,
}

impl Opener {
    pub(crate) fn new(dir: &Path, profile: &Profile) -> Self {
        Self {
            dir: dir.to_owned(),
            profile: profile.clone(),
            held: std::collections::VecDeque::new(),
            asking: None,
            parts: Vec::new(),
            fetched: std::collections::BTreeMap::new(),
            used_key_package: false,
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
    ) -> anyhow::Result<Vec<Ready>> {
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
        let asked = self
            .asking
            .take()
            .map(|(users, _)| users)
            .unwrap_or_default();
        let cards = cards.unwrap_or_else(|e| {
            eprintln!("iim: {e}");
            Vec::new()
        });
        for user in asked {
            let theirs = cards
                .iter()
                .filter(|c| c.user == user.as_str())
                .cloned()
                .collect();
            self.fetched.insert(user, (Instant::now(), theirs));
        }
        if let Err(e) = accept_and(&self.dir, &self.profile, &cards, |_| ()) {
            eprintln!("iim: {e:#}");
        }
    }

    /// The deadline passed: the held message's sender's card did not come.
    pub(crate) fn expire(&mut self, device: &iim_client::Device) -> anyhow::Result<Vec<Ready>> {
        if let Some((users, _)) = self.asking.take() {
            eprintln!("iim: the key directory did not answer for the keys of {users:?}");
            for user in users {
                self.fetched.insert(user, (Instant::now(), Vec::new()));
            }
            self.parts.clear();
        }
        self.drain(device)
    }

    /// The held messages that can be shown now, in order. A failure of this device's own
    /// (its keyring cannot be read or written) is an error: nothing after the message is
    /// shown or acknowledged, so the host keeps it.
    fn drain(&mut self, device: &iim_client::Device) -> anyhow::Result<Vec<Ready>> {
        let mut ready = Vec::new();
        while let Some((seq, mut message)) = self.held.pop_front() {
            let seal = match self.open(&mut message) {
                Ok(seal) => seal,
                Err(Need::Cards(user)) => {
                    if self.asking.is_none() {
                        self.ask(device, vec![user]);
                    }
                    self.held.push_front((seq, message));
                    break;
                }
                Err(Need::Fatal(e)) => {
                    return Err(e.context(format!(
                        "message {} cannot be opened on this device",
                        message.id
                    )));
                }
            };
            ready.push(Ready { seq, message, seal });
        }
        if std::mem::take(&mut self.used_key_package) {
            self.publish_one(device);
        }
        Ok(ready)
    }

    /// Publishes one more key package of this device, in place of the one a welcome used, so
    /// that the device can be added to as many groups as before.
    fn publish_one(&self, device: &iim_client::Device) {
        let request = match with_keys(&self.dir, &self.profile, |k| k.publish(1)) {
            Ok(Ok(request)) => request,
            Ok(Err(e)) => return eprintln!("iim: cannot make a key package: {e}"),
            Err(e) => return eprintln!("iim: cannot make a key package: {e:#}"),
        };
        self.request(device, &request, "publish a key package");
    }

    /// Sends `request` to the key directory through `device`, its answer to come among the
    /// deliveries; a failure to send is said on stderr (`cannot WHAT`).
    fn request(&self, device: &iim_client::Device, request: &KeysRequest, what: &'static str) {
        let submission = device.submit(
            iim_client::new_client_id(),
            keys_kind(),
            std::slice::from_ref(&self.profile.user),
            &request.to_json(),
        );
        tokio::spawn(async move {
            if let Err(e) = submission.await {
                eprintln!("iim: cannot {what}: {e}");
            }
        });
    }

    /// How `message` shows, its body replaced by what it opened to; or what it needs first.
    fn open(&mut self, message: &mut Message) -> Result<Seal, Need> {
        if message.kind == keys_kind() {
            return Ok(Seal::Hidden);
        }
        if message.kind != MessageKind::Chat || !is_end_to_end(&message.body) {
            return Ok(Seal::Plain);
        }
        if message.from == self.profile.user && message.from_device == self.profile.device {
            // Sealed for the others: this device keeps no copy of what it sent.
            return Ok(Seal::Notice(
                "(sent from this device, end to end encrypted)".into(),
            ));
        }
        if let Some(group) = iim_client::proto::group_of(&message.to).cloned() {
            return self.open_group(&group, message);
        }
        let opened = match with_keys(&self.dir, &self.profile, |k| k.open(message)) {
            Ok(opened) => opened,
            Err(e) => return Err(Need::Fatal(e)),
        };
        match opened {
            Ok(opened) => {
                message.body = opened.plaintext;
                Ok(Seal::Opened)
            }
            Err(E2eError::UnknownSender { user, device }) => {
                if self.fresh(&message.from) {
                    Ok(Seal::Failed(format!(
                        "no key of {user}/{device} in the key directory"
                    )))
                } else {
                    Err(Need::Cards(message.from.clone()))
                }
            }
            // A pinned sender's signature that fails: its keys may have changed. Its user's
            // cards are fetched once (a changed card is then said so) before it is refused.
            Err(E2eError::Crypto(iim_e2ee::Error::BadSignature)) if !self.fresh(&message.from) => {
                Err(Need::Cards(message.from.clone()))
            }
            Err(e) => Ok(failed(&e)),
        }
    }

    /// What a group's MLS body comes to on this device; or what it needs first (the cards of a
    /// member a welcome names).
    fn open_group(&mut self, group: &GroupId, message: &mut Message) -> Result<Seal, Need> {
        let processed = with_keys(&self.dir, &self.profile, |k| k.process_group(message))
            .map_err(Need::Fatal)?;
        if let Err(E2eError::UnknownSender { user, device }) = &processed {
            let Ok(user) = UserId::new(user.as_str()) else {
                return Ok(Seal::Failed(format!(
                    "REFUSED, a welcome names {user}/{device}"
                )));
            };
            if !self.fresh(&user) {
                return Err(Need::Cards(user));
            }
            return Ok(Seal::Failed(format!(
                "REFUSED, the welcome names {user}/{device}, which has no key in the key directory"
            )));
        }
        Ok(match processed {
            Ok(Processed::Application { plaintext, .. }) => {
                message.body = plaintext;
                Seal::Opened
            }
            Ok(Processed::Commit { added, removed, .. }) => {
                let mut changes = Vec::new();
                if !added.is_empty() {
                    changes.push(format!("added {}", added.join(", ")));
                }
                if !removed.is_empty() {
                    changes.push(format!("removed {}", removed.join(", ")));
                }
                let me = format!("{}/{}", self.profile.user, self.profile.device);
                if removed.contains(&me) {
                    changes.push("this device can no longer read the group".into());
                }
                Seal::Notice(format!("end-to-end keys changed: {}", changes.join("; ")))
            }
            Ok(Processed::Joined { .. }) => {
                self.used_key_package = true;
                Seal::Notice(format!("this device joined #{group}'s end-to-end group"))
            }
            Ok(Processed::Own { .. }) => {
                Seal::Notice("(sent from this device, end to end encrypted)".into())
            }
            Err(E2eError::NotForThisDevice) => Seal::Hidden,
            Err(E2eError::SeenBefore) => {
                Seal::Notice("(delivered again; shown before on this device)".into())
            }
            Err(e) => failed(&e),
        })
    }

    /// Whether `user`'s cards were fetched lately.
    fn fresh(&self, user: &UserId) -> bool {
        self.fetched
            .get(user)
            .is_some_and(|(at, _)| at.elapsed() < CARDS_FRESH)
    }

    /// The cards of every device of `users`, if they were all fetched lately.
    pub(crate) fn cards(&self, users: &[UserId]) -> Option<Vec<CardEntry>> {
        let mut cards = Vec::new();
        for user in users {
            let (at, theirs) = self.fetched.get(user)?;
            if at.elapsed() >= CARDS_FRESH {
                return None;
            }
            cards.extend(theirs.iter().cloned());
        }
        Some(cards)
    }

    /// Asks the directory, through `device`, for the cards of `users` (one request at a
    /// time: nothing is asked while an answer is awaited).
    pub(crate) fn ask(&mut self, device: &iim_client::Device, users: Vec<UserId>) {
        if self.asking.is_some() {
            return;
        }
        let request = KeysRequest::Cards {
            users: users.iter().map(ToString::to_string).collect(),
        };
        self.request(device, &request, "ask the key directory for keys");
        self.parts.clear();
        self.asking = Some((users, Instant::now() + CARD_WAIT));
    }
}

/// Why a held message cannot be shown yet.
enum Need {
    /// The cards of this user are to be fetched first.
    Cards(UserId),
    /// This device's keyring failed: stop, the host keeps the message.
    Fatal(anyhow::Error),
}

/// A body that did not open: said plainly, and loudly when the body itself failed its check.
fn failed(e: &E2eError) -> Seal {
    if e.is_tampering() {
        Seal::Failed(format!("REFUSED, it failed its end-to-end check: {e}"))
    } else {
        Seal::Failed(e.to_string())
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
