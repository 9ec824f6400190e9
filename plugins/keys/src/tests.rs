//! The key directory against the fake host: what each request stores and what it answers.

use super::*;
use iim_plugin_sdk::body::keys::{Base64, CardEntry, ClaimedPackage, KeysReply, KeysRequest};
use iim_plugin_sdk::testing::FakeHost;
use serde_json::json;

/// A host with alice, bob, carol and dave, and the plugin.
struct Scene {
    fake: FakeHost,
    plugin: Keys,
}

impl Scene {
    fn new() -> Self {
        let mut fake = FakeHost::new();
        for user in ["alice", "bob", "carol", "dave"] {
            fake.add_user(user);
        }
        let plugin = fake.init::<Keys>(&[]).expect("init");
        Scene { fake, plugin }
    }

    /// `user`'s `device` sends `body` as a `keys` message to `to`: the replies, each checked
    /// to be a `keys` message to the user only, naming the request and the device.
    fn send_to(&mut self, user: &str, device: &str, to: &[&str], body: &[u8]) -> Vec<Answer> {
        let event = self.fake.submit_from(
            user,
            device,
            MessageKind::Custom(KEYS_KIND.into()),
            to,
            body,
        );
        let Event::Message(request) = &event else {
            unreachable!("a submission is a message")
        };
        let id = request.id;
        self.fake.handle(&self.plugin, event).expect("handled");
        self.fake
            .take_sent()
            .into_iter()
            .map(|sent| {
                let m = &sent.message;
                assert_eq!(m.kind, MessageKind::Custom(KEYS_KIND.into()));
                assert_eq!(
                    (m.sender.as_str(), m.to.as_slice()),
                    (user, [user.to_owned()].as_slice())
                );
                assert_eq!(sent.recipients(), [user], "a reply goes to the user only");
                let reply = KeysReply::from_json(&m.body).expect("a reply");
                assert_eq!((reply.request, reply.device.as_str()), (id, device));
                reply.answer
            })
            .collect()
    }

    /// `user`'s `device` sends `request` to its own user.
    fn ask(&mut self, user: &str, device: &str, request: &KeysRequest) -> Vec<Answer> {
        self.send_to(user, device, &[user], &request.to_json())
    }

    /// The one reply to `request`.
    fn ask_one(&mut self, user: &str, device: &str, request: &KeysRequest) -> Answer {
        let mut answers = self.ask(user, device, request);
        assert_eq!(answers.len(), 1, "{answers:?}");
        answers.remove(0)
    }

    /// Publishes `card` and `packages` from `user`'s `device`.
    fn publish(&mut self, user: &str, device: &str, card: &[u8], packages: &[&[u8]]) -> Answer {
        self.ask_one(user, device, &publish(card, packages))
    }

    /// The reason `request` was refused; nothing was stored.
    fn refusal(&mut self, user: &str, device: &str, body: &[u8]) -> String {
        let before = self.storage();
        let answers = self.send_to(user, device, &[user], body);
        assert_eq!(self.storage(), before, "a refused request changes nothing");
        match answers.as_slice() {
            [Answer::Refused { reason }] => reason.clone(),
            other => panic!("not refused: {other:?}"),
        }
    }

    /// Every stored key and value.
    fn storage(&self) -> Vec<(String, Vec<u8>)> {
        self.fake
            .stored_keys()
            .map(|key| {
                (
                    key.to_owned(),
                    self.fake.stored(key).unwrap_or_default().to_vec(),
                )
            })
            .collect()
    }
}

fn publish(card: &[u8], packages: &[&[u8]]) -> KeysRequest {
    KeysRequest::Publish {
        card: Base64(card.to_vec()),
        key_packages: packages.iter().map(|p| Base64(p.to_vec())).collect(),
    }
}

fn cards(users: &[&str]) -> KeysRequest {
    KeysRequest::Cards {
        users: users.iter().map(|u| (*u).to_owned()).collect(),
    }
}

fn claim(devices: &[&str]) -> KeysRequest {
    KeysRequest::Claim {
        devices: devices.iter().map(|d| (*d).to_owned()).collect(),
    }
}

fn card(user: &str, device: &str, card: &[u8]) -> CardEntry {
    CardEntry {
        user: user.into(),
        device: device.into(),
        card: Base64(card.to_vec()),
    }
}

fn claimed(user: &str, device: &str, card: &[u8], package: &[u8]) -> ClaimedPackage {
    ClaimedPackage {
        user: user.into(),
        device: device.into(),
        card: Base64(card.to_vec()),
        key_package: Base64(package.to_vec()),
    }
}

#[test]
fn another_user_reads_the_cards_published_and_no_key_package() {
    let mut scene = Scene::new();
    assert_eq!(
        scene.publish("bob", "phone", b"bob phone card", &[b"kp1", b"kp2"]),
        Answer::Published { key_packages: 2 }
    );
    assert_eq!(
        scene.publish("bob", "laptop", b"bob laptop card", &[]),
        Answer::Published { key_packages: 0 }
    );
    // Published again: the card is replaced, the packages added to those waiting.
    assert_eq!(
        scene.publish("bob", "phone", b"bob phone card 2", &[b"kp3"]),
        Answer::Published { key_packages: 3 }
    );
    let answers = scene.ask("alice", "phone", &cards(&["carol", "bob", "bob"]));
    assert_eq!(
        answers,
        [Answer::Cards {
            cards: vec![
                card("bob", "laptop", b"bob laptop card"),
                card("bob", "phone", b"bob phone card 2"),
            ],
            more: false,
            unanswered: Vec::new(),
        }]
    );
    let sent = scene.fake.inbox("alice");
    let body = String::from_utf8_lossy(&sent[sent.len() - 1].body);
    assert!(!body.contains("key_package"), "{body}");
}

#[test]
fn a_claim_takes_exactly_one_package_per_device_oldest_first_and_names_the_missing() {
    let mut scene = Scene::new();
    scene.publish("bob", "phone", b"bob card", &[b"kp1", b"kp2"]);
    scene.publish("carol", "tablet", b"carol card", &[]);
    let claim_all = claim(&["bob/phone", "carol/tablet", "dave/laptop", "bob/phone"]);
    assert_eq!(
        scene.ask("alice", "phone", &claim_all),
        [Answer::Claimed {
            packages: vec![claimed("bob", "phone", b"bob card", b"kp1")],
            missing: vec!["carol/tablet".into(), "dave/laptop".into()],
            more: false,
            unanswered: Vec::new(),
        }]
    );
    // Taken: the next claim, by anyone, gets the next one.
    assert_eq!(
        scene.ask_one("carol", "tablet", &claim(&["bob/phone"])),
        Answer::Claimed {
            packages: vec![claimed("bob", "phone", b"bob card", b"kp2")],
            missing: Vec::new(),
            more: false,
            unanswered: Vec::new(),
        }
    );
    assert_eq!(
        scene.ask_one("alice", "phone", &claim(&["bob/phone"])),
        Answer::Claimed {
            packages: Vec::new(),
            missing: vec!["bob/phone".into()],
            more: false,
            unanswered: Vec::new(),
        }
    );
    // The card stays; new packages come after, numbered on.
    assert_eq!(
        scene.publish("bob", "phone", b"bob card", &[b"kp3", b"kp4"]),
        Answer::Published { key_packages: 2 }
    );
    let Answer::Claimed { packages, .. } = scene.ask_one("alice", "phone", &claim(&["bob/phone"]))
    else {
        panic!("claimed")
    };
    assert_eq!(packages, [claimed("bob", "phone", b"bob card", b"kp3")]);
}

#[test]
fn another_device_of_the_user_unpublishes_a_device() {
    let mut scene = Scene::new();
    scene.publish("bob", "phone", b"phone card", &[b"kp1", b"kp2"]);
    scene.publish("bob", "laptop", b"laptop card", &[b"kp3"]);
    let unpublish_phone = KeysRequest::Unpublish {
        device: Some("phone".into()),
    };
    assert_eq!(
        scene.ask_one("bob", "laptop", &unpublish_phone),
        Answer::Unpublished {
            removed: "phone".into()
        }
    );
    assert_eq!(
        scene.ask_one("alice", "phone", &cards(&["bob"])),
        Answer::Cards {
            cards: vec![card("bob", "laptop", b"laptop card")],
            more: false,
            unanswered: Vec::new(),
        }
    );
    let Answer::Claimed { missing, .. } = scene.ask_one("alice", "phone", &claim(&["bob/phone"]))
    else {
        panic!("claimed")
    };
    assert_eq!(missing, ["bob/phone"]);
    // Without a device: the sending device itself. Nothing of bob is left.
    assert_eq!(
        scene.ask_one("bob", "laptop", &KeysRequest::Unpublish { device: None }),
        Answer::Unpublished {
            removed: "laptop".into()
        }
    );
    assert_eq!(scene.storage(), []);
}

#[test]
fn what_is_over_a_bound_or_malformed_is_refused_with_the_reason() {
    let mut scene = Scene::new();
    let big_card = publish(&[7; MAX_CARD + 1], &[]);
    let reason = scene.refusal("bob", "phone", &big_card.to_json());
    assert!(
        reason.contains("a card is 1 to 4096 bytes; this one is 4097"),
        "{reason}"
    );
    let big_package = publish(b"card", &[b"kp", &[7; MAX_KEY_PACKAGE + 1]]);
    let reason = scene.refusal("bob", "phone", &big_package.to_json());
    assert!(reason.contains("key_packages[1] is 16385"), "{reason}");
    let many: Vec<&[u8]> = vec![b"kp"; MAX_PACKAGES_PER_REQUEST + 1];
    let reason = scene.refusal("bob", "phone", &publish(b"card", &many).to_json());
    assert!(
        reason.contains("at most 20 key packages per request; this one has 21"),
        "{reason}"
    );

    // 100 may wait; the 101st is refused, and the reply says how many more fit.
    let twenty: Vec<&[u8]> = vec![b"kp"; MAX_PACKAGES_PER_REQUEST];
    for _ in 0..4 {
        scene.publish("bob", "phone", b"card", &twenty);
    }
    let nineteen = publish(b"card", &twenty[1..]);
    assert_eq!(
        scene.ask_one("bob", "phone", &nineteen),
        Answer::Published { key_packages: 99 }
    );
    let reason = scene.refusal("bob", "phone", &publish(b"card", &[b"a", b"b"]).to_json());
    assert!(
        reason.contains("bob/phone has 99 key packages waiting"),
        "{reason}"
    );
    assert!(reason.contains("publish at most 1 more"), "{reason}");

    let users: Vec<String> = (0..=MAX_NAMES).map(|i| format!("user{i}")).collect();
    let reason = scene.refusal("alice", "phone", &KeysRequest::Cards { users }.to_json());
    assert!(
        reason.contains("at most 64 users per request; this one names 65"),
        "{reason}"
    );
    let reason = scene.refusal("alice", "phone", &cards(&["Bob"]).to_json());
    assert!(reason.contains("\"Bob\" is not a user name"), "{reason}");
    let reason = scene.refusal("alice", "phone", &claim(&["bob/phone/x"]).to_json());
    assert!(
        reason.contains("\"bob/phone/x\" is not user/device"),
        "{reason}"
    );
    let reason = scene.refusal("alice", "phone", &claim(&["bob"]).to_json());
    assert!(reason.contains("\"bob\" is not user/device"), "{reason}");
    let reason = scene.refusal("alice", "phone", br#"{"op":"publish","card":"%%"}"#);
    assert!(reason.contains("not a keys request"), "{reason}");
    assert!(reason.contains("base64"), "{reason}");
    let reason = scene.refusal("alice", "phone", b"{\"op\":\"rotate\"}");
    assert!(reason.contains("not a keys request"), "{reason}");
}

#[test]
fn a_user_has_at_most_so_many_devices_published() {
    let mut scene = Scene::new();
    for i in 0..MAX_DEVICES {
        scene.publish("bob", &format!("d{i}"), b"card", &[]);
    }
    let reason = scene.refusal("bob", "one-more", &publish(b"card", &[]).to_json());
    assert!(
        reason.contains("bob has published the cards of 32 devices"),
        "{reason}"
    );
    // A device already published may publish again.
    assert_eq!(
        scene.publish("bob", "d0", b"card 2", &[b"kp"]),
        Answer::Published { key_packages: 1 }
    );
}

#[test]
fn a_user_cannot_write_another_user_s_card_whatever_the_body_says() {
    let mut scene = Scene::new();
    scene.publish("bob", "phone", b"bob's real card", &[b"bob kp"]);
    // Names in the body are not whose card it is: the acting user and device are.
    let forged = json!({
        "op": "publish",
        "user": "bob",
        "device": "phone",
        "card": "bWFsbG9yeSdzIGNhcmQ=",
        "key_packages": ["bWFsbG9yeSdzIGtw"],
    });
    let answers = scene.send_to("alice", "phone", &["alice"], forged.to_string().as_bytes());
    assert_eq!(answers, [Answer::Published { key_packages: 1 }]);
    // A request addressed to bob is refused, not carried out for him.
    let before = scene.storage();
    let answers = scene.send_to("alice", "phone", &["bob"], &publish(b"x", &[]).to_json());
    assert!(
        matches!(&answers[..], [Answer::Refused { reason }] if reason.contains("addressed to its sender's own user, alice")),
        "{answers:?}"
    );
    assert_eq!(scene.storage(), before);
    // Unpublishing "phone" is alice's phone.
    scene.ask_one(
        "alice",
        "phone",
        &KeysRequest::Unpublish {
            device: Some("phone".into()),
        },
    );
    assert_eq!(
        scene.ask_one("carol", "phone", &cards(&["alice", "bob"])),
        Answer::Cards {
            cards: vec![card("bob", "phone", b"bob's real card")],
            more: false,
            unanswered: Vec::new(),
        }
    );
    let Answer::Claimed { packages, .. } = scene.ask_one("carol", "phone", &claim(&["bob/phone"]))
    else {
        panic!("claimed")
    };
    assert_eq!(
        packages,
        [claimed("bob", "phone", b"bob's real card", b"bob kp")]
    );
}

#[test]
fn a_large_answer_comes_in_parts_under_the_host_s_body_limit() {
    let mut scene = Scene::new();
    scene.fake.set_max_body(3000);
    for i in 0..6 {
        let card = vec![i; 1000];
        scene.publish("bob", &format!("d{i}"), &card, &[&[i; 700], &[i; 700]]);
    }
    let answers = scene.ask("alice", "phone", &cards(&["bob"]));
    assert!(answers.len() >= 3, "{answers:?}");
    let mut all = Vec::new();
    for (i, answer) in answers.iter().enumerate() {
        let Answer::Cards {
            cards,
            more,
            unanswered,
        } = answer
        else {
            panic!("{answer:?}")
        };
        assert_eq!(
            *more,
            i + 1 < answers.len(),
            "`more` on every part but the last"
        );
        assert!(unanswered.is_empty());
        all.extend(cards.iter().map(|c| c.device.clone()));
    }
    assert_eq!(all, ["d0", "d1", "d2", "d3", "d4", "d5"]);

    let devices: Vec<String> = (0..6).map(|i| format!("bob/d{i}")).collect();
    let devices: Vec<&str> = devices.iter().map(String::as_str).collect();
    let answers = scene.ask("alice", "phone", &claim(&devices));
    let taken: usize = answers
        .iter()
        .map(|a| match a {
            Answer::Claimed { packages, .. } => packages.len(),
            other => panic!("{other:?}"),
        })
        .sum();
    assert_eq!(taken, 6);

    // A host whose limit does not take one package with its card: the event fails (the
    // operator finds it among the dead letters), and nothing is taken.
    scene.fake.set_max_body(1500);
    let before = scene.storage();
    let event = scene.fake.submit_from(
        "alice",
        "phone",
        MessageKind::Custom(KEYS_KIND.into()),
        &["alice"],
        &claim(&["bob/d0"]).to_json(),
    );
    let failed = scene.fake.handle(&scene.plugin, event);
    assert!(
        matches!(&failed, Err(PluginError::Failed(why)) if why.contains("over the limit of 1500")),
        "{failed:?}"
    );
    assert_eq!(scene.storage(), before);
    assert_eq!(
        scene
            .storage()
            .iter()
            .filter(|(k, _)| k.starts_with("p/"))
            .count(),
        6
    );
}

#[test]
fn what_the_event_s_sends_cannot_carry_is_named_for_asking_again() {
    let mut scene = Scene::new();
    // One card per part, and more cards than an event may send messages.
    scene.fake.set_max_body(1500);
    let users = ["alice", "bob", "carol"];
    for user in users {
        for i in 0..25 {
            scene.publish(user, &format!("d{i}"), &[1; 900], &[]);
        }
    }
    let answers = scene.ask("dave", "phone", &cards(&users));
    assert_eq!(answers.len(), iim_plugin_sdk::host::MAX_SENDS_PER_EVENT);
    let mut got = Vec::new();
    let mut left = Vec::new();
    for answer in &answers {
        let Answer::Cards {
            cards, unanswered, ..
        } = answer
        else {
            panic!("{answer:?}")
        };
        got.extend(cards.iter().map(|c| format!("{}/{}", c.user, c.device)));
        left.extend(unanswered.iter().cloned());
    }
    assert_eq!(left, ["carol"], "the user whose cards did not all go");
    assert_eq!(got.len(), 64);
    assert!(got.iter().filter(|d| d.starts_with("carol/")).count() < 25);
}

#[test]
fn a_deleted_account_s_cards_and_packages_go_and_everyone_else_s_stay() {
    let mut scene = Scene::new();
    scene.publish("alice", "phone", b"alice phone card", &[b"a1", b"a2"]);
    scene.publish("alice", "laptop", b"alice laptop card", &[b"a3"]);
    scene.publish("bob", "phone", b"bob phone card", &[b"b1"]);
    let deleted = scene.fake.account_deleted("alice");
    scene.fake.handle(&scene.plugin, deleted).expect("handled");
    assert!(
        scene.fake.take_sent().is_empty(),
        "nothing is sent to a deleted user"
    );
    let left: Vec<&str> = scene.fake.stored_keys().collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|k| k.contains("/bob/")), "{left:?}");
}

#[test]
fn one_user_s_packages_are_bounded_so_that_a_deletion_fits_in_one_event() {
    let mut scene = Scene::new();
    let package = [7u8; 8];
    let twenty: Vec<&[u8]> = vec![&package[..]; MAX_PACKAGES_PER_REQUEST];
    let mut published = 0;
    'devices: for d in 0..MAX_DEVICES {
        let device = format!("d{d}");
        for _ in 0..MAX_WAITING / MAX_PACKAGES_PER_REQUEST {
            if published + twenty.len() > MAX_WAITING_PER_USER {
                break 'devices;
            }
            scene.publish("alice", &device, b"card", &twenty);
            published += twenty.len();
        }
    }
    let reason = scene.refusal("alice", "last", &publish(b"card", &[b"one more"]).to_json());
    assert!(
        reason.contains("at most 200 may wait for one user"),
        "{reason}"
    );
}
