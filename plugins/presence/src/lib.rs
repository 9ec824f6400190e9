//! The presence plugin: tells a user's contacts when the user comes online or goes offline,
//! and gives a device that opens a session the presence of the user's contacts.
//!
//! Subscribes to `session-opened` and `session-closed`. A user's *contacts* are their friends
//! and colleagues (the user's own lists), each once. Every message it sends is a new message of
//! kind `presence` from the user, whose body is `{"presence":[{"user":..,"state":..,"devices":..}]}`:
//! - when a user's first device comes online, one message to the contacts who are online:
//!   the user, `"online"`, 1 device;
//! - when a session opens (any device), a snapshot to the user themself: each contact with
//!   their state and number of devices online, sorted by user. It is one message unless it is
//!   large (more than [`SNAPSHOT_ENTRIES`] contacts, or over the host's body limit), when it
//!   is split into several, each listing some of the contacts;
//! - when a user's last device goes offline, one message to the contacts who are online: the
//!   user, `"offline"`, 0 devices.
//!
//! It takes no configuration (any key is `invalid-config`). `docs/plugins.md` documents the
//! bodies for client authors.

use iim_plugin_sdk::body::{self, Presence as Body};
use iim_plugin_sdk::{
    Config, Event, HostError, Message, MessageKind, Plugin, PluginError, PresenceEntry,
    PresenceState, SessionInfo, Subscription, UserId, host,
};
use std::collections::BTreeSet;

/// Most contacts in one snapshot message. An entry takes at most about 110 bytes (a user name
/// is at most 64), so a message stays well under the host's default body limit of 32 KiB; a
/// user has at most 1000 contacts (500 friends, 500 colleagues), so a snapshot takes at most
/// 10 of the 64 sends the host allows per event.
pub const SNAPSHOT_ENTRIES: usize = 100;

/// One user's presence in a body.
type Entry = body::PresenceEntry;

fn entry(e: &PresenceEntry) -> Entry {
    Entry {
        user: e.user.clone(),
        state: match e.state {
            PresenceState::Online => body::PresenceState::Online,
            PresenceState::Offline => body::PresenceState::Offline,
        },
        devices: e.devices,
    }
}

/// The presence plugin.
#[derive(Debug)]
pub struct Presence;

impl Plugin for Presence {
    const NAME: &'static str = "presence";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new(config: &Config) -> Result<Self, PluginError> {
        config.deny_unknown(&[])?;
        Ok(Presence)
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::SessionOpened, Subscription::SessionClosed]
    }

    fn handle(&self, event: Event) -> Result<(), PluginError> {
        match event {
            Event::SessionOpened(session) => opened(&session),
            Event::SessionClosed(session) => closed(&session),
            Event::Message(_) | Event::Delivered(_) => Err(PluginError::Rejected(
                "the presence plugin handles sessions only".to_owned(),
            )),
        }
    }
}

fn opened(session: &SessionInfo) -> Result<(), PluginError> {
    let contacts = contacts_of(&session.user)?;
    if session.devices_online == 1 {
        tell_online_contacts(session, PresenceState::Online, &contacts)?;
    }
    let snapshot: Vec<Entry> = contacts.iter().map(entry).collect();
    let me = vec![session.user.clone()];
    if snapshot.is_empty() {
        return Ok(send_presence(&[], &me, &me)?);
    }
    for part in snapshot.chunks(SNAPSHOT_ENTRIES) {
        send_split(part, &me)?;
    }
    Ok(())
}

/// Sends `entries` to `user` (a one-user list) in one message, or, if the host finds it too
/// large, in two halves, and so on.
fn send_split(entries: &[Entry], user: &[UserId]) -> Result<(), PluginError> {
    match send_presence(entries, user, user) {
        Err(HostError::LimitExceeded(_)) if entries.len() > 1 => {
            let (first, second) = entries.split_at(entries.len() / 2);
            send_split(first, user)?;
            send_split(second, user)
        }
        result => Ok(result?),
    }
}

fn closed(session: &SessionInfo) -> Result<(), PluginError> {
    if session.devices_online == 0 {
        let contacts = contacts_of(&session.user)?;
        tell_online_contacts(session, PresenceState::Offline, &contacts)?;
    }
    Ok(())
}

/// The presence of `user`'s friends and colleagues, each once, sorted by user.
fn contacts_of(user: &str) -> Result<Vec<PresenceEntry>, PluginError> {
    let mut users: BTreeSet<UserId> = host::friends(user)?.into_iter().collect();
    users.extend(host::colleagues(user)?);
    users.remove(user);
    let users: Vec<UserId> = users.into_iter().collect();
    if users.is_empty() {
        return Ok(Vec::new());
    }
    Ok(host::presence(&users)?)
}

/// Tells the contacts who are online that the session's user is now in `state`, in one
/// message.
fn tell_online_contacts(
    session: &SessionInfo,
    state: PresenceState,
    contacts: &[PresenceEntry],
) -> Result<(), PluginError> {
    let online: Vec<UserId> = contacts
        .iter()
        .filter(|c| c.state == PresenceState::Online)
        .map(|c| c.user.clone())
        .collect();
    if online.is_empty() {
        return Ok(());
    }
    let me = entry(&PresenceEntry {
        user: session.user.clone(),
        state,
        devices: session.devices_online,
    });
    // The notice's `to` is empty: each contact would otherwise learn who the user's other
    // contacts are.
    Ok(send_presence(&[me], &[], &online)?)
}

/// Sends one presence message with `entries`, addressed `to`, to `users`.
fn send_presence(entries: &[Entry], to: &[UserId], users: &[UserId]) -> Result<(), HostError> {
    let body = Body {
        presence: entries.to_vec(),
    }
    .to_json();
    let message = Message::new(MessageKind::Presence, to.to_vec(), body);
    host::send_to(&message, users)?;
    Ok(())
}

iim_plugin_sdk::export_plugin!(Presence);

#[cfg(test)]
mod tests {
    use super::*;
    use iim_plugin_sdk::testing::{DEFAULT_MAX_BODY, FakeHost, Sent};

    /// alice's friends: bob (online), carol (offline); colleagues: bob again, dave (online on
    /// two devices). erin (online) has alice as a friend, but alice does not have erin.
    fn scene() -> FakeHost {
        let mut fake = FakeHost::new();
        fake.add_user("alice")
            .connect("bob", "phone")
            .add_user("carol")
            .connect("dave", "phone")
            .connect("dave", "laptop")
            .connect("erin", "phone")
            .add_friend("alice", "bob")
            .add_friend("alice", "carol")
            .add_colleague("alice", "bob")
            .add_colleague("alice", "dave")
            .add_friend("erin", "alice");
        fake
    }

    fn body(sent: &Sent) -> String {
        String::from_utf8_lossy(&sent.message.body).into_owned()
    }

    #[test]
    fn describes_itself_and_takes_no_configuration() {
        let mut fake = FakeHost::new();
        let info = fake.init::<Presence>(&[]).expect("no config").info();
        assert_eq!(info.name, "presence");
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(
            info.subscriptions,
            [Subscription::SessionOpened, Subscription::SessionClosed]
        );
        assert!(matches!(
            fake.init::<Presence>(&[("interval", "5")]),
            Err(PluginError::InvalidConfig(_))
        ));
    }

    #[test]
    fn first_device_online_tells_online_contacts_once_and_sends_a_snapshot() {
        let mut fake = scene();
        let event = fake.open_session("alice", "phone");
        fake.run::<Presence>(&[], event).expect("handled");

        let [notice, snapshot] = fake.sent() else {
            panic!("a notice and a snapshot: {:?}", fake.sent())
        };
        assert_eq!(notice.message.kind, MessageKind::Presence);
        assert_eq!(notice.message.sender, "alice");
        assert_eq!(
            notice.recipients(),
            ["bob", "dave"],
            "online contacts, once each"
        );
        assert!(
            notice.message.to.is_empty(),
            "contacts do not see each other"
        );
        assert_eq!(
            body(notice),
            r#"{"presence":[{"user":"alice","state":"online","devices":1}]}"#
        );
        assert!(fake.inbox("carol").is_empty(), "offline contact");
        assert!(fake.inbox("erin").is_empty(), "not in alice's lists");

        assert_eq!(snapshot.recipients(), ["alice"]);
        assert_eq!(snapshot.message.to, ["alice"]);
        assert_eq!(
            body(snapshot),
            concat!(
                r#"{"presence":["#,
                r#"{"user":"bob","state":"online","devices":1},"#,
                r#"{"user":"carol","state":"offline","devices":0},"#,
                r#"{"user":"dave","state":"online","devices":2}"#,
                r#"]}"#
            )
        );
    }

    #[test]
    fn another_device_gets_only_a_snapshot() {
        let mut fake = scene();
        fake.connect("alice", "phone");
        let event = fake.open_session("alice", "laptop");
        fake.run::<Presence>(&[], event).expect("handled");
        let [snapshot] = fake.sent() else {
            panic!("only a snapshot: {:?}", fake.sent())
        };
        assert_eq!(snapshot.recipients(), ["alice"]);
        assert!(fake.inbox("bob").is_empty());
    }

    #[test]
    fn a_user_without_contacts_gets_an_empty_snapshot() {
        let mut fake = scene();
        let event = fake.open_session("frank", "laptop");
        fake.run::<Presence>(&[], event).expect("handled");
        let [snapshot] = fake.sent() else {
            panic!("only a snapshot: {:?}", fake.sent())
        };
        assert_eq!(snapshot.recipients(), ["frank"]);
        assert_eq!(body(snapshot), r#"{"presence":[]}"#);
    }

    #[test]
    fn no_notice_when_no_contact_is_online() {
        let mut fake = scene();
        fake.disconnect("bob", "phone")
            .disconnect("dave", "phone")
            .disconnect("dave", "laptop");
        let event = fake.open_session("alice", "phone");
        fake.run::<Presence>(&[], event).expect("handled");
        let [snapshot] = fake.sent() else {
            panic!("only a snapshot: {:?}", fake.sent())
        };
        assert_eq!(snapshot.recipients(), ["alice"]);
    }

    /// alice with `n` friends, every third online; returns the snapshot's entries.
    fn snapshot_of_many(n: usize, max_body: usize) -> (FakeHost, Vec<serde_json::Value>) {
        let mut fake = FakeHost::new();
        fake.set_max_body(max_body);
        for i in 0..n {
            let friend = format!("friend{i:04}");
            fake.add_friend("alice", &friend);
            if i % 3 == 0 {
                fake.connect(&friend, "phone");
            }
        }
        let event = fake.open_session("alice", "phone");
        fake.run::<Presence>(&[], event).expect("handled");
        let mut entries = Vec::new();
        for sent in fake.sent().iter().filter(|s| s.recipients() == ["alice"]) {
            let body: serde_json::Value =
                serde_json::from_slice(&sent.message.body).expect("JSON body");
            entries.extend(body["presence"].as_array().cloned().unwrap_or_default());
        }
        (fake, entries)
    }

    fn listed_once_in_order(entries: &[serde_json::Value], n: usize) {
        let users: Vec<&str> = entries.iter().filter_map(|e| e["user"].as_str()).collect();
        let expected: Vec<String> = (0..n).map(|i| format!("friend{i:04}")).collect();
        assert_eq!(users, expected);
        assert_eq!(entries[3]["state"], "online");
        assert_eq!(entries[4]["state"], "offline");
    }

    #[test]
    fn a_large_snapshot_is_split() {
        let (fake, entries) = snapshot_of_many(250, DEFAULT_MAX_BODY);
        // One notice to the online friends, three snapshot parts.
        assert_eq!(fake.sent().len(), 4);
        listed_once_in_order(&entries, 250);
    }

    #[test]
    fn a_snapshot_over_the_body_limit_is_split_further() {
        let (fake, entries) = snapshot_of_many(60, 1024);
        for sent in fake.sent() {
            assert!(sent.message.body.len() <= 1024);
        }
        assert!(fake.sent().len() > 2, "split: {} sends", fake.sent().len());
        listed_once_in_order(&entries, 60);
    }

    #[test]
    fn last_device_offline_tells_online_contacts() {
        let mut fake = scene();
        fake.connect("alice", "phone");
        let event = fake.close_session("alice", "phone");
        fake.run::<Presence>(&[], event).expect("handled");
        let [notice] = fake.sent() else {
            panic!("one notice: {:?}", fake.sent())
        };
        assert_eq!(notice.recipients(), ["bob", "dave"]);
        assert_eq!(
            body(notice),
            r#"{"presence":[{"user":"alice","state":"offline","devices":0}]}"#
        );
    }

    #[test]
    fn closing_one_of_several_devices_tells_nobody() {
        let mut fake = scene();
        fake.connect("alice", "phone").connect("alice", "laptop");
        let event = fake.close_session("alice", "phone");
        fake.run::<Presence>(&[], event).expect("handled");
        assert!(fake.sent().is_empty());
    }
}
