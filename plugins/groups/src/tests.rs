//! The groups plugin against the fake host: what each member is sent, and what is refused.

use super::*;
use crate::conversation::KEEP_RECEIPTS;
use crate::requests::MAX_USERS_PER_REQUEST;
use iim_plugin_sdk::MessageId;
use iim_plugin_sdk::body::{
    GroupMember, GroupNotice, GroupReply, GroupRequest, GroupRole, GroupSummary, ReadReport,
    Receipt,
};
use iim_plugin_sdk::testing::{FakeHost, Sent};

/// A host with alice, bob (phone and laptop), carol, dave and erin online, and the plugin.
struct Scene {
    fake: FakeHost,
    plugin: Groups,
}

/// What one event sent, sorted out.
#[derive(Debug, Default)]
struct Outcome {
    sent: Vec<Sent>,
}

impl Outcome {
    /// The replies to request `id`, in order, or the reason it was refused.
    fn answer(&self, id: MessageId) -> Result<Vec<GroupReply>, String> {
        let mut replies = Vec::new();
        for sent in &self.sent {
            let m = &sent.message;
            if m.kind == MessageKind::Receipt
                && let Ok(Receipt::Refused {
                    id: of,
                    reason,
                    users,
                }) = Receipt::from_json(&m.body)
                && of == id
            {
                assert!(users.is_empty(), "{users:?}");
                assert_eq!(sent.recipients(), [m.sender.as_str()], "to the sender only");
                return Err(reason);
            }
            if m.kind == MessageKind::group()
                && let Ok(reply) = GroupReply::from_json(&m.body)
                && reply.request() == id
            {
                assert_eq!(
                    m.to,
                    std::slice::from_ref(&m.sender),
                    "a reply is to the requester"
                );
                assert_eq!(sent.recipients(), [m.sender.as_str()], "and to them only");
                replies.push(reply);
            }
        }
        Ok(replies)
    }

    /// The reason request or message `id` was refused.
    fn refusal(&self, id: MessageId) -> String {
        match self.answer(id) {
            Err(reason) => reason,
            Ok(replies) => panic!("not refused: {replies:?}"),
        }
    }

    /// That request `id` was carried out: its only reply is `done`.
    fn done(&self, id: MessageId) {
        assert_eq!(
            self.answer(id),
            Ok(vec![GroupReply::Done { request: id }]),
            "{:#?}",
            self.sent
        );
    }

    /// The notices sent, each with its recipients, sorted by name.
    fn notices(&self) -> Vec<(GroupNotice, Vec<String>)> {
        self.sent
            .iter()
            .filter(|s| s.message.kind == MessageKind::group() && s.message.group().is_some())
            .map(|s| {
                let notice = GroupNotice::from_json(&s.message.body).expect("a notice");
                let mut to: Vec<String> = s.recipients().iter().map(|u| (*u).to_owned()).collect();
                to.sort();
                (notice, to)
            })
            .collect()
    }

    /// The `counts` receipts sent, as (delivered, read), each checked to be to the sender.
    fn counts(&self, sender: &str) -> Vec<(u32, u32, u32)> {
        self.sent
            .iter()
            .filter_map(|s| match Receipt::from_json(&s.message.body) {
                Ok(Receipt::Counts {
                    members,
                    delivered,
                    read,
                    group,
                    ..
                }) => {
                    assert_eq!(s.recipients(), [sender]);
                    assert_eq!(group, "team");
                    Some((members, delivered, read))
                }
                _ => None,
            })
            .collect()
    }
}

fn names(users: &[&str]) -> Vec<String> {
    users.iter().map(|u| (*u).to_owned()).collect()
}

fn create(members: &[&str]) -> GroupRequest {
    GroupRequest::Create {
        title: "The team".into(),
        members: names(members),
    }
}

impl Scene {
    fn new() -> Self {
        Self::with(&[])
    }

    fn with(config: &[(&str, &str)]) -> Self {
        let mut fake = FakeHost::new();
        for user in ["alice", "bob", "carol", "dave", "erin"] {
            fake.connect(user, "phone");
        }
        fake.connect("bob", "laptop");
        let plugin = fake.init::<Groups>(config).expect("valid configuration");
        Self { fake, plugin }
    }

    /// The scene with #team made by alice, with bob and carol.
    fn with_team() -> Self {
        let mut scene = Self::new();
        let (id, out) = scene.request("alice", "#team", &create(&["bob", "carol"]));
        out.done(id);
        scene
    }

    /// Hands `event` to the plugin, which must handle it: what it sent.
    fn run(&mut self, event: Event) -> Outcome {
        self.fake.handle(&self.plugin, event).expect("handled");
        Outcome {
            sent: self.fake.take_sent(),
        }
    }

    /// `who` submits `body` of `kind` to `to`.
    fn submit(
        &mut self,
        who: &str,
        kind: MessageKind,
        to: &str,
        body: &[u8],
    ) -> (Message, Outcome) {
        let event = self.fake.submit(who, kind, &[to], body);
        let Event::Message(message) = event.clone() else {
            unreachable!()
        };
        (message, self.run(event))
    }

    /// `who` sends `request` to `to` (`#team`, or themself).
    fn request(&mut self, who: &str, to: &str, request: &GroupRequest) -> (MessageId, Outcome) {
        let (message, out) = self.submit(who, MessageKind::group(), to, &request.to_json());
        (message.id, out)
    }

    /// `who` says `text` in #team.
    fn say(&mut self, who: &str, text: &str) -> (Message, Outcome) {
        self.submit(who, MessageKind::Chat, "#team", text.as_bytes())
    }

    /// The replies to `who`'s question `request` to `to`, before the `done` that must end them.
    fn replies(&mut self, who: &str, to: &str, request: &GroupRequest) -> Vec<GroupReply> {
        let (id, out) = self.request(who, to, request);
        let mut replies = out.answer(id).expect("answered");
        let last = replies.pop().expect("a reply");
        assert_eq!(last, GroupReply::Done { request: id }, "ends with done");
        replies
    }

    /// The members of #team, as `who` is told them.
    fn members(&mut self, who: &str) -> Vec<(String, GroupRole)> {
        self.replies(who, "#team", &GroupRequest::Members)
            .iter()
            .flat_map(|reply| match reply {
                GroupReply::Members { members, group, .. } => {
                    assert_eq!(group, "team");
                    members.clone()
                }
                other => panic!("not members: {other:?}"),
            })
            .map(|GroupMember { user, role }| (user, role))
            .collect()
    }

    /// `who`'s groups, as `list` answers.
    fn list(&mut self, who: &str) -> Vec<GroupSummary> {
        self.replies(who, who, &GroupRequest::List)
            .iter()
            .flat_map(|reply| match reply {
                GroupReply::List { groups, .. } => groups.clone(),
                other => panic!("not a list: {other:?}"),
            })
            .collect()
    }

    fn chats(&self, user: &str) -> Vec<MessageId> {
        self.fake
            .inbox(user)
            .iter()
            .filter(|m| m.kind == MessageKind::Chat)
            .map(|m| m.id)
            .collect()
    }
}

fn roles(members: &[(&str, GroupRole)]) -> Vec<(String, GroupRole)> {
    members.iter().map(|(u, r)| ((*u).to_owned(), *r)).collect()
}

#[test]
fn describes_itself_subscribes_to_groups_and_checks_its_configuration() {
    let scene = Scene::new();
    let info = scene.plugin.info();
    assert_eq!(info.name, "groups");
    assert_eq!(
        info.subscriptions,
        [
            Subscription::Message(MessageKind::Custom("group".into())),
            Subscription::Message(MessageKind::Custom("account-deleted".into()))
        ]
    );
    assert!(scene.fake.subscribed_groups::<Groups>());
    assert_eq!(
        (scene.plugin.max_members(), scene.plugin.max_groups()),
        (10_000, 1000)
    );
    let mut fake = FakeHost::new();
    let groups = fake
        .init::<Groups>(&[("max_members", "50"), ("max_groups", "3")])
        .expect("valid");
    assert_eq!((groups.max_members(), groups.max_groups()), (50, 3));
    for bad in [
        [("max_member", "5")],
        [("max_members", "0")],
        [("max_members", "10001")],
        [("max_groups", "many")],
        [("max_groups", "4001")],
    ] {
        assert!(
            matches!(
                fake.init::<Groups>(&bad),
                Err(PluginError::InvalidConfig(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn create_makes_the_requester_owner_and_tells_every_member() {
    let mut scene = Scene::new();
    let request = GroupRequest::Create {
        title: String::new(),
        members: names(&["bob", "carol", "bob", "alice"]),
    };
    let (id, out) = scene.request("alice", "#team", &request);
    out.done(id);
    assert_eq!(
        out.notices(),
        [(
            GroupNotice::Created {
                title: "team".into(),
                members: names(&["alice", "bob", "carol"]),
            },
            names(&["alice", "bob", "carol"])
        )],
        "the title defaults to the name; the owner first, each once"
    );
    let notice = &out.sent[0].message;
    assert_eq!(notice.to, ["#team"]);
    assert_eq!(notice.sender, "alice");
    assert_eq!(
        scene.members("carol"),
        roles(&[
            ("alice", GroupRole::Owner),
            ("bob", GroupRole::Member),
            ("carol", GroupRole::Member)
        ])
    );
    assert_eq!(
        scene.list("bob"),
        [GroupSummary {
            group: "team".into(),
            title: "team".into(),
            role: GroupRole::Member,
            members: 3,
        }]
    );
}

#[test]
fn create_is_refused_for_a_group_that_exists_unknown_users_and_bad_requests() {
    let mut scene = Scene::with_team();
    let keys_before: Vec<String> = scene.fake.stored_keys().map(str::to_owned).collect();
    let many: Vec<String> = (0..=MAX_USERS_PER_REQUEST)
        .map(|i| format!("u{i}"))
        .collect();
    for (request, expected) in [
        (create(&["dave"]), "#team already exists"),
        (create(&["dave", "mallory"]), "there is no user mallory"),
        (create(&["Dave"]), "\"Dave\" is not a user name"),
        (
            GroupRequest::Create {
                title: "t".repeat(201),
                members: vec![],
            },
            "at most 200 bytes",
        ),
        (
            GroupRequest::Create {
                title: String::new(),
                members: many,
            },
            "at most 100 users",
        ),
    ] {
        let to = if expected.contains("exists") {
            "#team"
        } else {
            "#other"
        };
        let (id, out) = scene.request("dave", to, &request);
        let reason = out.refusal(id);
        assert!(reason.contains(expected), "{reason}");
        assert_eq!(out.sent.len(), 1, "the refusal only");
        let keys: Vec<String> = scene.fake.stored_keys().map(str::to_owned).collect();
        assert_eq!(keys, keys_before, "nothing stored");
    }
}

#[test]
fn a_members_message_goes_once_to_every_member_the_sender_included() {
    let mut scene = Scene::with_team();
    let (message, out) = scene.say("bob", "hello");
    let [forwarded] = &out.sent[..] else {
        panic!("one send: {:#?}", out.sent)
    };
    assert_eq!(forwarded.message, message, "unchanged, same id");
    let mut to = forwarded.recipients();
    to.sort();
    assert_eq!(to, ["alice", "bob", "carol"]);
    for member in ["alice", "bob", "carol"] {
        assert_eq!(scene.chats(member), [message.id], "{member}");
    }
    assert!(scene.chats("dave").is_empty());
    // Any kind but group and receipt is passed on alike.
    let kind = MessageKind::Custom("file".into());
    let (file, out) = scene.submit("carol", kind, "#team", b"{}");
    assert_eq!(out.sent.len(), 1);
    assert_eq!(out.sent[0].message, file);
}

#[test]
fn a_non_members_message_is_refused_with_a_receipt_and_passed_on_to_no_one() {
    let mut scene = Scene::with_team();
    let (message, out) = scene.say("erin", "let me in");
    assert_eq!(out.sent.len(), 1, "{:#?}", out.sent);
    let reason = out.refusal(message.id);
    assert_eq!(reason, "you are not a member of #team");
    assert_eq!(out.sent[0].message.kind, MessageKind::Receipt);
    for member in ["alice", "bob", "carol"] {
        assert!(scene.chats(member).is_empty(), "{member}");
    }
    let (message, out) = scene.submit("erin", MessageKind::Chat, "#nowhere", b"hi");
    let reason = out.refusal(message.id);
    assert!(
        reason.contains("not a member of #nowhere") && reason.contains("no such group"),
        "{reason}"
    );
}

#[test]
fn only_the_owner_and_admins_add_and_members_already_in_are_ignored() {
    let mut scene = Scene::with_team();
    let add = |users: &[&str]| GroupRequest::Add {
        users: names(users),
    };
    let (id, out) = scene.request("bob", "#team", &add(&["dave"]));
    assert_eq!(
        out.refusal(id),
        "only the owner and admins of #team may add members"
    );
    let (id, out) = scene.request("alice", "#team", &add(&["dave", "bob", "dave"]));
    out.done(id);
    assert_eq!(
        out.notices(),
        [(
            GroupNotice::Added {
                users: names(&["dave"])
            },
            names(&["alice", "bob", "carol", "dave"])
        )],
        "the members after the change, the added one included"
    );
    // Nothing new: done, no notice.
    let (id, out) = scene.request("alice", "#team", &add(&["bob"]));
    out.done(id);
    assert!(out.notices().is_empty());
    let (id, out) = scene.request("alice", "#team", &add(&["mallory"]));
    assert_eq!(out.refusal(id), "there is no user mallory");
    // A non-member is told so, whatever the request.
    let (id, out) = scene.request("erin", "#team", &add(&["erin"]));
    assert_eq!(out.refusal(id), "you are not a member of #team");
}

#[test]
fn removal_follows_the_roles_and_the_removed_hear_of_it_then_nothing() {
    let mut scene = Scene::with_team();
    let add = GroupRequest::Add {
        users: names(&["dave", "erin"]),
    };
    let (id, out) = scene.request("alice", "#team", &add);
    out.done(id);
    let role = |user: &str, role| GroupRequest::Role {
        user: user.into(),
        role,
    };
    let remove = |users: &[&str]| GroupRequest::Remove {
        users: names(users),
    };
    let (id, out) = scene.request("alice", "#team", &role("bob", GroupRole::Admin));
    out.done(id);
    let (id, out) = scene.request("alice", "#team", &role("dave", GroupRole::Admin));
    out.done(id);

    let (id, out) = scene.request("carol", "#team", &remove(&["erin"]));
    assert_eq!(
        out.refusal(id),
        "only the owner and admins of #team may remove members"
    );
    let (id, out) = scene.request("bob", "#team", &remove(&["dave"]));
    assert_eq!(
        out.refusal(id),
        "an admin of #team removes members only, and dave is an admin"
    );
    let (id, out) = scene.request("bob", "#team", &remove(&["erin", "alice"]));
    assert!(out.refusal(id).contains("alice is its owner"));
    let (id, out) = scene.request("alice", "#team", &remove(&["alice"]));
    assert!(out.refusal(id).contains("cannot remove yourself"));
    assert_eq!(scene.members("alice").len(), 5, "nothing changed");

    // An admin removes a member; the owner removes an admin. Non-members are ignored.
    let (id, out) = scene.request("bob", "#team", &remove(&["erin", "mallory"]));
    out.done(id);
    assert_eq!(
        out.notices(),
        [(
            GroupNotice::Removed {
                users: names(&["erin"])
            },
            names(&["alice", "bob", "carol", "dave", "erin"])
        )],
        "the members before the change: erin learns it"
    );
    let (id, out) = scene.request("alice", "#team", &remove(&["dave"]));
    out.done(id);
    assert_eq!(
        out.notices()[0].1,
        names(&["alice", "bob", "carol", "dave"])
    );

    // After: nothing is sent to them, and they may not write.
    let before = (
        scene.fake.inbox("erin").len(),
        scene.fake.inbox("dave").len(),
    );
    let (message, out) = scene.say("carol", "after");
    assert_eq!(out.sent[0].message, message);
    assert_eq!(
        (
            scene.fake.inbox("erin").len(),
            scene.fake.inbox("dave").len()
        ),
        before
    );
    let (message, out) = scene.say("erin", "still here?");
    assert_eq!(out.refusal(message.id), "you are not a member of #team");
    assert!(scene.list("dave").is_empty());
    assert_eq!(
        scene.members("alice"),
        roles(&[
            ("alice", GroupRole::Owner),
            ("bob", GroupRole::Admin),
            ("carol", GroupRole::Member)
        ])
    );
}

#[test]
fn anyone_but_the_owner_leaves() {
    let mut scene = Scene::with_team();
    let (id, out) = scene.request("alice", "#team", &GroupRequest::Leave);
    assert!(
        out.refusal(id)
            .starts_with("the owner cannot leave #team: hand it on first"),
        "{:?}",
        out.answer(id)
    );
    let (id, out) = scene.request("carol", "#team", &GroupRequest::Leave);
    out.done(id);
    assert_eq!(
        out.notices(),
        [(GroupNotice::Left, names(&["alice", "bob", "carol"]))]
    );
    assert_eq!(out.sent[0].message.sender, "carol", "from the one who left");
    assert_eq!(scene.members("bob").len(), 2);
    assert!(scene.list("carol").is_empty());
    let (id, out) = scene.request("carol", "#team", &GroupRequest::Leave);
    assert_eq!(out.refusal(id), "you are not a member of #team");
}

#[test]
fn the_owner_sets_roles_and_hands_the_group_on() {
    let mut scene = Scene::with_team();
    let role = |user: &str, role| GroupRequest::Role {
        user: user.into(),
        role,
    };
    let (id, out) = scene.request("bob", "#team", &role("carol", GroupRole::Admin));
    assert_eq!(out.refusal(id), "only the owner of #team may change roles");
    let (id, out) = scene.request("alice", "#team", &role("alice", GroupRole::Member));
    assert!(out.refusal(id).contains("cannot change your own role"));
    let (id, out) = scene.request("alice", "#team", &role("dave", GroupRole::Admin));
    assert_eq!(out.refusal(id), "dave is not a member of #team");

    let (id, out) = scene.request("alice", "#team", &role("bob", GroupRole::Admin));
    out.done(id);
    assert_eq!(
        out.notices(),
        [(
            GroupNotice::Role {
                user: "bob".into(),
                role: GroupRole::Admin
            },
            names(&["alice", "bob", "carol"])
        )]
    );
    // An admin may rename and add, not delete nor set roles.
    let rename = GroupRequest::Rename {
        title: "Team B".into(),
    };
    let (id, out) = scene.request("bob", "#team", &rename);
    out.done(id);
    assert_eq!(
        out.notices()[0].0,
        GroupNotice::Renamed {
            title: "Team B".into()
        }
    );
    let (id, out) = scene.request("bob", "#team", &GroupRequest::Delete);
    assert_eq!(out.refusal(id), "only the owner of #team may delete it");

    // Handed on: carol owns it, alice is an admin.
    let (id, out) = scene.request("alice", "#team", &role("carol", GroupRole::Owner));
    out.done(id);
    let told: Vec<GroupNotice> = out.notices().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        told,
        [
            GroupNotice::Role {
                user: "carol".into(),
                role: GroupRole::Owner
            },
            GroupNotice::Role {
                user: "alice".into(),
                role: GroupRole::Admin
            },
        ]
    );
    assert_eq!(
        scene.members("bob"),
        roles(&[
            ("carol", GroupRole::Owner),
            ("alice", GroupRole::Admin),
            ("bob", GroupRole::Admin)
        ])
    );
    let (id, out) = scene.request("alice", "#team", &role("bob", GroupRole::Member));
    assert_eq!(out.refusal(id), "only the owner of #team may change roles");
    let (id, out) = scene.request("alice", "#team", &GroupRequest::Leave);
    out.done(id);
    assert_eq!(
        scene.list("carol"),
        [GroupSummary {
            group: "team".into(),
            title: "Team B".into(),
            role: GroupRole::Owner,
            members: 2,
        }]
    );
}

#[test]
fn rename_is_for_the_owner_and_admins_and_an_empty_title_is_the_name() {
    let mut scene = Scene::with_team();
    let rename = |title: &str| GroupRequest::Rename {
        title: title.into(),
    };
    let (id, out) = scene.request("bob", "#team", &rename("Mine"));
    assert_eq!(
        out.refusal(id),
        "only the owner and admins of #team may rename it"
    );
    let (id, out) = scene.request("alice", "#team", &rename(""));
    out.done(id);
    assert_eq!(
        out.notices(),
        [(
            GroupNotice::Renamed {
                title: "team".into()
            },
            names(&["alice", "bob", "carol"])
        )]
    );
}

#[test]
fn a_deleted_group_tells_its_members_and_a_new_one_of_its_name_starts_empty() {
    let mut scene = Scene::with_team();
    let (id, out) = scene.request("alice", "#team", &GroupRequest::Delete);
    out.done(id);
    assert_eq!(
        out.notices(),
        [(GroupNotice::Deleted, names(&["alice", "bob", "carol"]))]
    );
    assert!(scene.list("bob").is_empty());
    let (message, out) = scene.say("bob", "anyone?");
    assert!(out.refusal(message.id).contains("no such group"));
    let (id, out) = scene.request("alice", "#team", &GroupRequest::Members);
    assert_eq!(out.refusal(id), "there is no group #team");

    // Made again, by dave, with erin: none of the old members is in it.
    let (id, out) = scene.request("dave", "#team", &create(&["erin"]));
    out.done(id);
    assert_eq!(
        scene.members("erin"),
        roles(&[("dave", GroupRole::Owner), ("erin", GroupRole::Member)])
    );
    let (message, out) = scene.say("bob", "me?");
    assert_eq!(out.refusal(message.id), "you are not a member of #team");
    let (message, out) = scene.say("alice", "me?");
    assert_eq!(out.refusal(message.id), "you are not a member of #team");
    assert!(scene.list("alice").is_empty());
    assert_eq!(scene.list("erin").len(), 1);
    // The old generation's keys are gone (a small group is cleaned up in the same event).
    let left: Vec<&str> = scene.fake.stored_keys().collect();
    assert!(
        left.iter()
            .all(|k| !k.contains("alice") && !k.contains("bob") && !k.contains("carol")),
        "{left:?}"
    );
}

#[test]
fn list_is_sorted_by_name_and_asked_of_oneself() {
    let mut scene = Scene::new();
    for (group, owner) in [("#zeta", "bob"), ("#alpha", "alice"), ("#mid", "carol")] {
        let (id, out) = scene.request(owner, group, &create(&["alice", "bob"]));
        out.done(id);
    }
    let groups: Vec<(String, GroupRole, u32)> = scene
        .list("alice")
        .into_iter()
        .map(|g| (g.group, g.role, g.members))
        .collect();
    assert_eq!(
        groups,
        [
            ("alpha".into(), GroupRole::Owner, 2),
            ("mid".into(), GroupRole::Member, 3),
            ("zeta".into(), GroupRole::Member, 2),
        ]
    );
    assert_eq!(
        scene.list("erin"),
        [],
        "no groups: one empty reply, then done"
    );
    let (id, out) = scene.request("alice", "bob", &GroupRequest::List);
    assert!(out.refusal(id).contains("to yourself only"));
    let (id, out) = scene.request("alice", "#alpha", &GroupRequest::List);
    assert!(out.refusal(id).contains("list is addressed to yourself"));
    let (id, out) = scene.request("alice", "alice", &GroupRequest::Members);
    assert_eq!(
        out.refusal(id),
        "members is addressed to the group (#name), not to yourself"
    );
}

#[test]
fn malformed_requests_and_reports_are_refused_naming_the_group() {
    let mut scene = Scene::with_team();
    for body in [&b"not json"[..], br#"{"op":"fly"}"#, br#"{"op":"add"}"#] {
        let (message, out) = scene.submit("alice", MessageKind::group(), "#team", body);
        let reason = out.refusal(message.id);
        assert!(reason.contains("#team is a request"), "{reason}");
    }
    let (message, out) = scene.submit("alice", MessageKind::group(), "alice", b"{");
    assert!(out.refusal(message.id).contains("to yourself is a request"));
    let (message, out) = scene.submit(
        "bob",
        MessageKind::Receipt,
        "#team",
        br#"{"state":"delivered","id":1}"#,
    );
    assert!(out.refusal(message.id).contains("a read report"));
    assert_eq!(scene.members("alice").len(), 3, "nothing changed");
}

/// #team of alice and `members` others (users `m0`, `m1`, ... on a phone each).
fn team_of(members: usize) -> Scene {
    let mut scene = Scene::new();
    let users: Vec<String> = (0..members).map(|i| format!("m{i}")).collect();
    for user in &users {
        scene.fake.connect(user, "phone");
    }
    let (id, out) = scene.request("alice", "#team", &create(&[]));
    out.done(id);
    for chunk in users.chunks(MAX_USERS_PER_REQUEST) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let add = GroupRequest::Add {
            users: names(&refs),
        };
        let (id, out) = scene.request("alice", "#team", &add);
        out.done(id);
    }
    scene
}

#[test]
fn the_sender_gets_counts_at_powers_of_two_and_at_every_member() {
    let mut scene = team_of(6);
    scene.fake.connect("m0", "laptop");
    let (message, _) = scene.say("alice", "read me");
    let mut told = Vec::new();
    // alice's own device first: not counted.
    let ack = scene.fake.acknowledge("alice", "phone", &message);
    assert!(scene.run(ack).sent.is_empty());
    for i in 0..6 {
        let member = format!("m{i}");
        let ack = scene.fake.acknowledge(&member, "phone", &message);
        told.extend(scene.run(ack).counts("alice"));
        if i == 0 {
            // A member's second device is the same member.
            let ack = scene.fake.acknowledge(&member, "laptop", &message);
            assert!(scene.run(ack).sent.is_empty());
        }
    }
    assert_eq!(told, [(6, 1, 0), (6, 2, 0), (6, 4, 0), (6, 6, 0)]);
    told.clear();
    let report = ReadReport { id: message.id }.to_json();
    for i in [3, 1, 4, 1, 5, 0] {
        let member = format!("m{i}");
        let (report, out) = scene.submit(&member, MessageKind::Receipt, "#team", &report);
        assert!(out.answer(report.id).is_ok(), "not refused");
        told.extend(out.counts("alice"));
    }
    assert_eq!(
        told,
        [(6, 6, 1), (6, 6, 2), (6, 6, 4)],
        "m1 read once; 5 of 6 is not news"
    );
    let (_, out) = scene.submit("m2", MessageKind::Receipt, "#team", &report);
    assert_eq!(out.counts("alice"), [(6, 6, 6)]);
    // The sender's own report, and a non-member's.
    let (_, out) = scene.submit("alice", MessageKind::Receipt, "#team", &report);
    assert!(out.sent.is_empty());
    let (report, out) = scene.submit("erin", MessageKind::Receipt, "#team", &report);
    assert_eq!(out.refusal(report.id), "you are not a member of #team");

    // The names, for the sender only.
    let receipts = GroupRequest::Receipts { id: message.id };
    let (id, out) = scene.request("m0", "#team", &receipts);
    assert!(out.refusal(id).starts_with("only the sender of message"));
    let (id, out) = scene.request("alice", "#team", &receipts);
    let replies = out.answer(id).expect("answered");
    let all = names(&["m0", "m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(
        replies,
        [
            GroupReply::Receipts {
                request: id,
                id: message.id,
                members: 6,
                delivered: all.clone(),
                read: all,
            },
            GroupReply::Done { request: id }
        ]
    );
    let (id, out) = scene.request("alice", "#team", &GroupRequest::Receipts { id: 1 });
    assert!(out.refusal(id).contains("has no counts of message 1"));
}

#[test]
fn a_member_on_another_host_is_counted_from_the_delivered_receipt_their_host_sends() {
    let mut scene = team_of(2);
    let (message, _) = scene.say("alice", "far away");
    let delivered = |user: &str| {
        Receipt::Delivered {
            id: message.id,
            user: user.to_owned(),
            device: "phone".to_owned(),
        }
        .to_json()
    };
    let (_, out) = scene.submit("m0", MessageKind::Receipt, "#team", &delivered("m0"));
    assert_eq!(out.counts("alice"), [(2, 1, 0)]);
    // Once per member, whichever device.
    let (_, out) = scene.submit("m0", MessageKind::Receipt, "#team", &delivered("m0"));
    assert!(out.sent.is_empty(), "{:?}", out.sent);
    // A member speaks for themself only.
    let (report, out) = scene.submit("m0", MessageKind::Receipt, "#team", &delivered("m1"));
    assert!(out.refusal(report.id).contains("is a read report"));
    let (report, out) = scene.submit("erin", MessageKind::Receipt, "#team", &delivered("erin"));
    assert_eq!(out.refusal(report.id), "you are not a member of #team");
    let read = ReadReport { id: message.id }.to_json();
    let (_, out) = scene.submit("m0", MessageKind::Receipt, "#team", &read);
    assert_eq!(out.counts("alice"), [(2, 1, 1)]);
}

#[test]
fn a_notices_delivery_is_not_counted() {
    let mut scene = Scene::with_team();
    let notice = scene.fake.inbox("bob")[0].clone();
    assert_eq!(notice.to, ["#team"]);
    let ack = scene.fake.acknowledge("bob", "phone", &notice);
    assert!(scene.run(ack).sent.is_empty());
}

#[test]
fn receipts_are_kept_for_the_latest_messages_only() {
    let mut scene = Scene::with_team();
    let mut sent = Vec::new();
    for n in 0..=KEEP_RECEIPTS {
        let (message, _) = scene.say("alice", &format!("{n}"));
        if n < 2 {
            // Marks to clean up once forgotten.
            let ack = scene.fake.acknowledge("bob", "phone", &message);
            scene.run(ack);
        }
        sent.push(message);
    }
    let (id, out) = scene.request("alice", "#team", &GroupRequest::Receipts { id: sent[0].id });
    assert!(out.refusal(id).contains("has no counts"));
    let (id, out) = scene.request("alice", "#team", &GroupRequest::Receipts { id: sent[1].id });
    assert!(out.answer(id).is_ok());
    let first = format!("/{:020}/", sent[0].id);
    assert!(
        scene.fake.stored_keys().all(|k| !k.contains(&first)),
        "the forgotten message's marks are cleaned up"
    );
    // Its delivery now counts for nothing.
    let ack = scene.fake.acknowledge("carol", "phone", &sent[0]);
    assert!(scene.run(ack).sent.is_empty());
}

#[test]
fn the_first_in_the_group_s_order_is_forgotten_first_whatever_its_id() {
    let mut scene = Scene::with_team();
    // Bob's message, numbered by his host: a higher id than any of this host's below.
    let Event::Message(mut far) =
        scene
            .fake
            .submit("bob", MessageKind::Chat, &["#team"], b"from afar")
    else {
        unreachable!()
    };
    far.id = 3 << 42;
    scene.run(Event::Message(far.clone()));
    let mut sent = Vec::new();
    for n in 0..KEEP_RECEIPTS {
        let (message, _) = scene.say("alice", &format!("{n}"));
        sent.push(message);
    }
    let (id, out) = scene.request("bob", "#team", &GroupRequest::Receipts { id: far.id });
    assert!(
        out.refusal(id).contains("has no counts"),
        "the first is forgotten"
    );
    let (id, out) = scene.request("alice", "#team", &GroupRequest::Receipts { id: sent[0].id });
    assert!(out.answer(id).is_ok(), "the second is kept");
}

#[test]
fn members_and_groups_per_user_are_limited() {
    let mut scene = Scene::with(&[("max_members", "3"), ("max_groups", "2")]);
    let (id, out) = scene.request("alice", "#one", &create(&["bob", "carol", "dave"]));
    assert_eq!(
        out.refusal(id),
        "#one would have 4 members; a group has at most 3"
    );
    let (id, out) = scene.request("alice", "#one", &create(&["bob"]));
    out.done(id);
    let add = |users: &[&str]| GroupRequest::Add {
        users: names(users),
    };
    let (id, out) = scene.request("alice", "#one", &add(&["carol", "dave"]));
    assert_eq!(
        out.refusal(id),
        "#one has 2 members; adding 2 would pass the limit of 3"
    );
    let (id, out) = scene.request("bob", "#two", &create(&["carol"]));
    out.done(id);
    // bob is in two groups: no third.
    let (id, out) = scene.request("carol", "#three", &create(&["bob"]));
    assert_eq!(
        out.refusal(id),
        "bob is in 2 groups already, the most a user may be in"
    );
    let (id, out) = scene.request("bob", "#three", &create(&[]));
    assert!(out.refusal(id).starts_with("bob is in 2 groups"));
    // A group bob left no longer counts.
    let (id, out) = scene.request("bob", "#two", &GroupRequest::Delete);
    out.done(id);
    let (id, out) = scene.request("carol", "#three", &create(&["bob"]));
    out.done(id);
}

#[test]
fn a_deleted_groups_index_entries_do_not_count_before_their_cleanup() {
    // 200 members take 400 writes to clean up: more than the delete's event has left.
    let mut scene = team_of(200);
    let plugin = scene
        .fake
        .init::<Groups>(&[("max_groups", "1")])
        .expect("valid");
    scene.plugin = plugin;
    let (id, out) = scene.request("m99", "#two", &create(&[]));
    assert_eq!(
        out.refusal(id),
        "m99 is in 1 groups already, the most a user may be in"
    );
    let (id, out) = scene.request("alice", "#team", &GroupRequest::Delete);
    out.done(id);
    assert!(
        scene.fake.stored("u/m99/team").is_some(),
        "m99's entry waits for the cleanup"
    );
    let (id, out) = scene.request("m99", "#two", &create(&[]));
    out.done(id);
    assert_eq!(scene.list("m99").len(), 1);
}

#[test]
fn a_large_group_is_paged_sent_in_one_message_and_deleted_over_several_events() {
    const MEMBERS: usize = 1050;
    let mut scene = team_of(MEMBERS);
    let (message, out) = scene.say("m7", "hello, all");
    let [forwarded] = &out.sent[..] else {
        panic!("one send: {} sends", out.sent.len())
    };
    assert_eq!(forwarded.message, message);
    assert_eq!(forwarded.recipients().len(), MEMBERS + 1, "everyone once");

    let members = scene.members("m1049");
    assert_eq!(members.len(), MEMBERS + 1);
    assert_eq!(members[0], ("alice".to_owned(), GroupRole::Owner));
    assert!(members[1..].windows(2).all(|w| w[0].0 < w[1].0), "by name");
    let (id, out) = scene.request("m3", "#team", &GroupRequest::Members);
    assert!(out.answer(id).expect("answered").len() > 2, "in parts");

    let too_many: Vec<String> = (0..101).map(|i| format!("x{i}")).collect();
    let (id, out) = scene.request("alice", "#team", &GroupRequest::Add { users: too_many });
    assert!(out.refusal(id).contains("at most 100 users"));

    let (id, out) = scene.request("alice", "#team", &GroupRequest::Delete);
    out.done(id);
    assert_eq!(out.notices()[0].1.len(), MEMBERS + 1);
    let old = |fake: &FakeHost| {
        fake.stored_keys()
            .filter(|k| k.starts_with("m/") || k.starts_with("u/") || k.starts_with("t/"))
            .count()
    };
    assert!(old(&scene.fake) > 0, "too many keys for one event");
    // Made again at once: the old generation never leaks into it.
    let (id, out) = scene.request("m5", "#team", &create(&["m6"]));
    out.done(id);
    assert_eq!(
        scene.members("m6"),
        roles(&[("m5", GroupRole::Owner), ("m6", GroupRole::Member)])
    );
    // Every later event of the group carries the cleanup on: here the members' deliveries of
    // the deleted notice.
    let deleted = scene
        .fake
        .inbox("m900")
        .iter()
        .rev()
        .find(|m| GroupNotice::from_json(&m.body) == Ok(GroupNotice::Deleted))
        .cloned()
        .expect("the deleted notice");
    for i in 0..12 {
        let user = format!("m{i}");
        let ack = scene.fake.acknowledge(&user, "phone", &deleted);
        scene.run(ack);
    }
    let left: Vec<&str> = scene
        .fake
        .stored_keys()
        .filter(|k| !k.starts_with("g/"))
        .collect();
    assert_eq!(
        left,
        [
            format!("m/team/{id}/m5"),
            format!("m/team/{id}/m6"),
            "u/m5/team".to_owned(),
            "u/m6/team".to_owned(),
        ],
        "only the new generation's"
    );
    assert_eq!(scene.list("m6").len(), 1);
    assert!(scene.list("m7").is_empty());
}

/// The requests to groups an event sent (a `group` message to one group, sent to nobody): the
/// host hands each back to the plugin in its group's order, as the test does here.
fn group_requests(out: &Outcome) -> Vec<Message> {
    out.sent
        .iter()
        .filter(|sent| sent.users.servers.iter().all(|row| row.users.is_empty()))
        .map(|sent| sent.message.clone())
        .collect()
}

#[test]
fn a_deleted_account_leaves_every_group_and_its_groups_go_on_without_it() {
    // alice owns #team (bob, carol) and is a member of bob's #club and of #solo, her own,
    // alone.
    let mut scene = Scene::with_team();
    let (id, out) = scene.request("bob", "#club", &create(&["alice", "dave"]));
    out.done(id);
    let (id, out) = scene.request("alice", "#solo", &create(&[]));
    out.done(id);

    let deleted = scene.fake.account_deleted("alice");
    let mut pending = group_requests(&scene.run(deleted));
    assert_eq!(pending.len(), 1, "one chain for three groups");
    let mut notices = Vec::new();
    while let Some(request) = pending.pop() {
        assert_eq!(request.sender, "alice");
        assert!(matches!(
            GroupRequest::from_json(&request.body),
            Ok(GroupRequest::Forget { .. })
        ));
        let out = scene.run(Event::Message(request));
        pending.extend(group_requests(&out));
        let (_, told): (Vec<Sent>, Vec<Sent>) = out
            .sent
            .into_iter()
            .partition(|sent| sent.users.servers.iter().all(|row| row.users.is_empty()));
        notices.extend(Outcome { sent: told }.notices());
    }
    // #club and #team are told alice left; #team is bob's now (the first member by name, no
    // admin); #solo is gone.
    assert!(
        notices.contains(&(GroupNotice::Left, names(&["bob", "dave"]))),
        "{notices:?}"
    );
    assert!(
        notices.contains(&(GroupNotice::Left, names(&["bob", "carol"]))),
        "{notices:?}"
    );
    assert!(
        notices.contains(&(
            GroupNotice::Role {
                user: "bob".into(),
                role: GroupRole::Owner
            },
            names(&["bob", "carol"])
        )),
        "{notices:?}"
    );
    assert_eq!(
        scene.members("bob"),
        [
            ("bob".to_owned(), GroupRole::Owner),
            ("carol".to_owned(), GroupRole::Member)
        ]
    );
    // Nothing of alice's is left in the plugin's storage but what #solo's cleanup removes
    // next, which names no user.
    let left: Vec<&str> = scene
        .fake
        .stored_keys()
        .filter(|key| key.contains("alice"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A user whose account exists cannot send it.
    let (id, out) = scene.request("carol", "#team", &GroupRequest::Forget { next: vec![] });
    assert!(out.refusal(id).contains("forget is the host's"));
}
