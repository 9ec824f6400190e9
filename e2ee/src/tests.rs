//! The scheme's properties, as a user of it would notice them.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use crate::direct::seal_copies;
use crate::*;

const NOW: u64 = 1_700_000_000_000;

fn identity(user: &str, device: &str) -> DeviceIdentity {
    DeviceIdentity::generate(user, device, NOW).unwrap()
}

fn card(identity: &DeviceIdentity) -> DeviceCard {
    identity.card().unwrap()
}

fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

/// alice (a1, a2) and bob (b1, b2).
fn four() -> Vec<DeviceIdentity> {
    vec![
        identity("alice", "a1"),
        identity("alice", "a2"),
        identity("bob", "b1"),
        identity("bob", "b2"),
    ]
}

#[test]
fn every_device_of_both_users_opens_each_message() {
    let devices = four();
    let cards: Vec<_> = devices.iter().map(card).collect();
    for (sender, to) in [(0, "bob"), (3, "alice"), (1, "bob")] {
        let plaintext = format!("hello from {}", devices[sender].identity());
        let body = seal(
            &devices[sender],
            &users(&[to]),
            &cards,
            plaintext.as_bytes(),
        )
        .unwrap();
        assert!(is_e2e(&body));
        let (user, device) = peek_sender(&body).unwrap();
        assert_eq!(format!("{user}/{device}"), devices[sender].identity());
        let mut nonces = Vec::new();
        for me in &devices {
            let opened = open(me, &cards[sender], &body).unwrap();
            assert_eq!(opened.plaintext, plaintext.as_bytes());
            assert_eq!(opened.to_users, users(&[to]));
            assert_eq!(opened.sender_user, devices[sender].user());
            assert_eq!(opened.sender_device, devices[sender].device());
            nonces.push(opened.nonce);
        }
        // One message, one nonce, whoever opens it.
        assert!(nonces.windows(2).all(|pair| pair[0] == pair[1]));
    }
    // Two messages never share a nonce.
    let a = seal(&devices[0], &users(&["bob"]), &cards, b"x").unwrap();
    let b = seal(&devices[0], &users(&["bob"]), &cards, b"x").unwrap();
    assert_ne!(
        open(&devices[2], &cards[0], &a).unwrap().nonce,
        open(&devices[2], &cards[0], &b).unwrap().nonce
    );
}

#[test]
fn a_device_added_later_gets_not_for_this_device() {
    let devices = four();
    let cards: Vec<_> = devices.iter().map(card).collect();
    let body = seal(&devices[0], &users(&["bob"]), &cards, b"before b3").unwrap();
    let b3 = identity("bob", "b3");
    assert!(matches!(
        open(&b3, &cards[0], &body),
        Err(Error::NotForThisDevice)
    ));
}

#[test]
fn every_flipped_bit_of_an_envelope_is_detected() {
    let alice = identity("alice", "a1");
    let bob = identity("bob", "b1");
    let body = seal(&alice, &users(&["bob"]), &[card(&bob)], b"hi").unwrap();
    let alice_card = card(&alice);
    assert_eq!(open(&bob, &alice_card, &body).unwrap().plaintext, b"hi");
    for bit in 0..body.len() * 8 {
        let mut flipped = body.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(
            open(&bob, &alice_card, &flipped).is_err(),
            "bit {bit} of {} flipped went unnoticed",
            body.len() * 8
        );
    }
    // Truncated or extended, too.
    for len in 0..body.len() {
        assert!(open(&bob, &alice_card, &body[..len]).is_err());
    }
    let mut longer = body.clone();
    longer.push(0);
    assert!(open(&bob, &alice_card, &longer).is_err());
}

#[test]
fn a_body_presented_as_from_someone_else_is_refused() {
    let alice = identity("alice", "a1");
    let bob = identity("bob", "b1");
    let carol = identity("carol", "c1");
    let body = seal(&alice, &users(&["bob"]), &[card(&bob)], b"hi").unwrap();
    // The host says it is from carol and hands carol's card.
    assert!(matches!(
        open(&bob, &card(&carol), &body),
        Err(Error::WrongSender { .. })
    ));
    // A card with alice's names but another key (a key directory lying) fails the signature.
    let impostor = card(&identity("alice", "a1"));
    assert!(matches!(
        open(&bob, &impostor, &body),
        Err(Error::BadSignature)
    ));
    // carol signs an envelope of her own around alice's copy: the copy names alice as sender
    // in its HPKE info, so it does not open as carol's.
    let carols = seal(&carol, &users(&["bob"]), &[card(&bob)], b"x").unwrap();
    let alice_copy = direct::Envelope::parse(&body).unwrap();
    let transplanted = transplant(&carol, &carols, &alice_copy);
    assert!(matches!(
        open(&bob, &card(&carol), &transplanted),
        Err(Error::DecryptFailed)
    ));
}

/// carol's envelope with its copy replaced by the one in `donor`, re-signed by carol.
fn transplant(carol: &DeviceIdentity, carols: &[u8], donor: &direct::Envelope<'_>) -> Vec<u8> {
    let mut envelope = direct::Envelope::parse(carols).unwrap();
    envelope.replace_copies_for_test(donor);
    envelope.resign_for_test(carol)
}

#[test]
fn addressed_users_are_checked() {
    let alice = identity("alice", "a1");
    let alice2 = identity("alice", "a2");
    let bob = identity("bob", "b1");
    let carol = identity("carol", "c1");
    // seal refuses a card whose user is not addressed...
    assert!(matches!(
        seal(&alice, &users(&["bob"]), &[card(&bob), card(&carol)], b"x"),
        Err(Error::BadRecipient(_))
    ));
    // ...and a sender that seals one anyway is caught by the recipient.
    let body = seal_copies(&alice, &users(&["bob"]), &[card(&bob), card(&carol)], b"x").unwrap();
    assert!(matches!(
        open(&carol, &card(&alice), &body),
        Err(Error::NotAddressed)
    ));
    assert!(open(&bob, &card(&alice), &body).is_ok());
    // The sender's own devices need not be addressed.
    let body = seal(&alice, &users(&["bob"]), &[card(&bob), card(&alice2)], b"x").unwrap();
    assert_eq!(
        open(&alice2, &card(&alice), &body).unwrap().to_users,
        users(&["bob"])
    );
}

#[test]
fn seal_bounds_its_input() {
    let alice = identity("alice", "a1");
    let bob = card(&identity("bob", "b1"));
    let to = users(&["bob"]);
    assert!(matches!(
        seal(&alice, &to, &[], b"x"),
        Err(Error::NoRecipients)
    ));
    assert!(matches!(
        seal(&alice, &to, &[bob.clone(), bob.clone()], b"x"),
        Err(Error::BadRecipient(_))
    ));
    assert!(matches!(
        seal(&alice, &to, &vec![bob.clone(); MAX_COPIES + 1], b"x"),
        Err(Error::TooLarge(_))
    ));
    assert!(matches!(
        seal(
            &alice,
            &to,
            std::slice::from_ref(&bob),
            &vec![0; MAX_PLAINTEXT + 1]
        ),
        Err(Error::TooLarge(_))
    ));
    let long = "b".repeat(MAX_NAME + 1);
    assert!(matches!(
        seal(&alice, &[to[0].clone(), long.clone()], &[bob], b"x"),
        Err(Error::InvalidName(_))
    ));
    for bad in ["", "Bob", "b/1", "é", long.as_str()] {
        assert!(matches!(
            DeviceIdentity::generate(bad, "d", NOW),
            Err(Error::InvalidName(_))
        ));
    }
}

#[test]
fn cards_round_trip_verify_and_fingerprint() {
    let alice = identity("alice", "a1");
    let alice_card = card(&alice);
    let bytes = alice_card.to_bytes().unwrap();
    let parsed = DeviceCard::from_bytes(&bytes).unwrap();
    parsed.verify().unwrap();
    assert_eq!(parsed, alice_card);
    assert_eq!(parsed.identity(), "alice/a1");
    assert_eq!(parsed.created_at_ms(), NOW);
    let fingerprint = parsed.fingerprint();
    assert_eq!(fingerprint.len(), 8 * 4 + 7);
    assert_ne!(fingerprint, card(&identity("alice", "a1")).fingerprint());
    // One bit of each byte (each costs a signature check, slow unoptimised).
    for index in 0..bytes.len() {
        let mut flipped = bytes.clone();
        flipped[index] ^= 1 << (index % 8);
        assert!(
            DeviceCard::from_bytes(&flipped).is_err(),
            "card byte {index} flipped went unnoticed"
        );
    }
}

#[test]
fn an_identity_saved_and_loaded_still_opens_and_signs() {
    let alice = identity("alice", "a1");
    let bob = identity("bob", "b1");
    let body = seal(&alice, &users(&["bob"]), &[card(&bob)], b"kept").unwrap();
    let bob_again = DeviceIdentity::from_bytes(&bob.to_bytes().unwrap()).unwrap();
    assert_eq!(card(&bob_again), card(&bob));
    assert_eq!(
        open(&bob_again, &card(&alice), &body).unwrap().plaintext,
        b"kept"
    );
    // A damaged key is an error, not a device that cannot open or signs garbage.
    let bytes = bob.to_bytes().unwrap();
    for index in [bytes.len() - 1, bytes.len() - 40] {
        let mut damaged = bytes.clone();
        damaged[index] ^= 1;
        assert!(DeviceIdentity::from_bytes(&damaged).is_err());
    }
}

/// A device with its card, and one key package published.
fn member(user: &str, device: &str) -> (Device, DeviceCard, Vec<u8>) {
    let mut device = Device::new(identity(user, device));
    let card = device.identity().card().unwrap();
    let key_package = device.key_packages(1).unwrap().remove(0);
    (device, card, key_package)
}

fn application(processed: Processed) -> (String, Vec<u8>) {
    match processed {
        Processed::Application {
            sender, plaintext, ..
        } => (sender, plaintext),
        other => panic!("not an application message: {other:?}"),
    }
}

#[test]
fn a_group_of_three_users_talks_grows_shrinks_and_survives_a_restart() {
    let (mut a1, _, _) = member("alice", "a1");
    let (mut b1, b1_card, b1_kp) = member("bob", "b1");
    let (mut b2, b2_card, b2_kp) = member("bob", "b2");
    let (mut c1, c1_card, c1_kp) = member("carol", "c1");
    a1.create_group("team").unwrap();
    let (_, welcome) = a1
        .add(
            "team",
            &[(b1_card, b1_kp), (b2_card, b2_kp), (c1_card, c1_kp)],
        )
        .unwrap();
    assert!(matches!(GroupMessage::from_bytes(&welcome), Ok(m) if m.is_welcome()));
    assert_eq!(b1.join(&welcome).unwrap(), "team");
    assert_eq!(
        b2.process(&welcome).unwrap(),
        Processed::Joined {
            group: "team".into()
        }
    );
    c1.join(&welcome).unwrap();
    let everyone = ["alice/a1", "bob/b1", "bob/b2", "carol/c1"];
    for device in [&a1, &b1, &b2, &c1] {
        assert_eq!(device.members("team").unwrap(), users(&everyone));
        assert_eq!(device.epoch("team").unwrap(), 1);
    }

    // Messages flow, each way.
    let hello = a1.encrypt("team", b"hello team").unwrap();
    assert!(
        matches!(E2eBody::from_bytes(&hello), Ok(E2eBody::Mls(m)) if m.group().as_deref() == Some("team"))
    );
    for device in [&mut b1, &mut b2, &mut c1] {
        assert_eq!(
            application(device.process(&hello).unwrap()),
            ("alice/a1".into(), b"hello team".to_vec())
        );
    }
    let reply = c1.encrypt("team", b"hi alice").unwrap();
    assert_eq!(application(a1.process(&reply).unwrap()).0, "carol/c1");
    assert_eq!(application(b1.process(&reply).unwrap()).1, b"hi alice");
    assert_eq!(
        c1.process(&reply).unwrap(),
        Processed::Own {
            group: "team".into()
        }
    );

    // bob sends just before a commit; it still opens after it (past epochs are kept).
    let late = b2.encrypt("team", b"sent at epoch 1").unwrap();

    // dave joins later: he cannot open what was sent before.
    let (mut d1, d1_card, d1_kp) = member("dave", "d1");
    let (commit, welcome) = a1.add("team", &[(d1_card, d1_kp)]).unwrap();
    for device in [&mut b1, &mut b2, &mut c1] {
        match device.process(&commit).unwrap() {
            Processed::Commit {
                committer,
                added,
                removed,
                ..
            } => {
                assert_eq!(committer, "alice/a1");
                assert_eq!(added, users(&["dave/d1"]));
                assert!(removed.is_empty());
            }
            other => panic!("not a commit: {other:?}"),
        }
    }
    d1.join(&welcome).unwrap();
    // The host echoing its own commit to the committer changes nothing there.
    assert!(!matches!(a1.process(&commit), Ok(Processed::Commit { .. })));
    assert_eq!(a1.epoch("team").unwrap(), 2);
    assert!(d1.process(&hello).is_err());
    assert!(d1.process(&late).is_err());
    assert_eq!(
        application(a1.process(&late).unwrap()).1,
        b"sent at epoch 1"
    );
    assert_eq!(
        application(c1.process(&late).unwrap()).1,
        b"sent at epoch 1"
    );

    // A restart: carol's whole state saved, dropped, loaded; she continues.
    let saved = c1.to_bytes().unwrap();
    drop(c1);
    let mut c1 = Device::from_bytes(&saved).unwrap();
    assert_eq!(c1.groups().collect::<Vec<_>>(), ["team"]);
    assert_eq!(c1.epoch("team").unwrap(), 2);

    // bob's devices are removed: they cannot open the next message; the others can.
    let commit = a1.remove("team", &users(&["bob/b1", "bob/b2"])).unwrap();
    for device in [&mut b1, &mut b2, &mut c1, &mut d1] {
        match device.process(&commit).unwrap() {
            Processed::Commit { removed, .. } => assert_eq!(removed, users(&["bob/b1", "bob/b2"])),
            other => panic!("not a commit: {other:?}"),
        }
    }
    assert_eq!(b1.groups().count(), 0);
    let after = a1.encrypt("team", b"bob is gone").unwrap();
    assert!(b1.process(&after).is_err());
    assert!(b2.process(&after).is_err());
    assert_eq!(application(c1.process(&after).unwrap()).1, b"bob is gone");
    assert_eq!(application(d1.process(&after).unwrap()).1, b"bob is gone");
    assert_eq!(
        c1.members("team").unwrap(),
        users(&["alice/a1", "carol/c1", "dave/d1"])
    );

    // The creator restarted continues to commit.
    let mut a1 = Device::from_bytes(&a1.to_bytes().unwrap()).unwrap();
    let back = a1.encrypt("team", b"after my restart").unwrap();
    assert_eq!(
        application(c1.process(&back).unwrap()).1,
        b"after my restart"
    );
}

#[test]
fn key_package_secrets_survive_a_restart() {
    let (mut a1, _, _) = member("alice", "a1");
    let (e1, e1_card, e1_kp) = member("erin", "e1");
    let mut e1 = Device::from_bytes(&e1.to_bytes().unwrap()).unwrap();
    a1.create_group("g").unwrap();
    let (_, welcome) = a1.add("g", &[(e1_card, e1_kp)]).unwrap();
    e1.join(&welcome).unwrap();
    let message = a1.encrypt("g", b"welcome erin").unwrap();
    assert_eq!(
        application(e1.process(&message).unwrap()).1,
        b"welcome erin"
    );
    // A key package is used once.
    assert!(e1.join(&welcome).is_err());
}

#[test]
fn a_key_package_must_be_the_cards_device() {
    let (mut a1, _, _) = member("alice", "a1");
    let (_, b1_card, _) = member("bob", "b1");
    let (_, _, c1_kp) = member("carol", "c1");
    a1.create_group("g").unwrap();
    assert!(matches!(
        a1.add("g", &[(b1_card.clone(), c1_kp)]),
        Err(Error::BadKeyPackage(_))
    ));
    // Same names, another key: the card the client checked wins.
    let (_, _, other_b1_kp) = member("bob", "b1");
    assert!(matches!(
        a1.add("g", &[(b1_card, other_b1_kp)]),
        Err(Error::BadKeyPackage(_))
    ));
    assert_eq!(a1.epoch("g").unwrap(), 0);
    assert!(matches!(a1.create_group("g"), Err(Error::GroupExists(_))));
    assert!(matches!(
        a1.encrypt("nope", b"x"),
        Err(Error::UnknownGroup(_))
    ));
    assert!(matches!(
        a1.remove("g", &users(&["bob/b1"])),
        Err(Error::UnknownMember(_))
    ));
}

#[test]
fn truncated_bodies_of_every_kind_are_errors() {
    let (mut a1, b1_card, b1_kp) = {
        let (a1, _, _) = member("alice", "a1");
        let (_, card, kp) = member("bob", "b1");
        (a1, card, kp)
    };
    a1.create_group("g").unwrap();
    let (commit, welcome) = a1.add("g", &[(b1_card.clone(), b1_kp.clone())]).unwrap();
    let message = a1.encrypt("g", b"x").unwrap();
    let envelope = seal(
        a1.identity(),
        &users(&["bob"]),
        std::slice::from_ref(&b1_card),
        b"x",
    )
    .unwrap();
    let card_bytes = b1_card.to_bytes().unwrap();
    let identity_bytes = a1.identity().to_bytes().unwrap();
    let device_bytes = a1.to_bytes().unwrap();
    for body in [&commit, &welcome, &message, &b1_kp] {
        for len in 0..body.len() {
            assert!(GroupMessage::from_bytes(&body[..len]).is_err());
        }
    }
    for len in 0..envelope.len() {
        assert!(peek_sender(&envelope[..len]).is_err());
    }
    for len in 0..card_bytes.len() {
        assert!(DeviceCard::from_bytes(&card_bytes[..len]).is_err());
    }
    for len in 0..identity_bytes.len() {
        assert!(DeviceIdentity::from_bytes(&identity_bytes[..len]).is_err());
    }
    for len in (0..device_bytes.len()).step_by(7) {
        assert!(Device::from_bytes(&device_bytes[..len]).is_err());
    }
    assert!(matches!(
        E2eBody::from_bytes(b"plain text"),
        Err(Error::BadMagic)
    ));
    assert!(!is_e2e(b"plain text"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), kind in 0..5usize) {
        let magic: &[u8] = [&MAGIC_DIRECT[..], &MAGIC_MLS[..], b"iim-crd\x01", b"iim-key\x01", b"iim-dev\x01"][kind];
        let mut framed = magic.to_vec();
        framed.extend_from_slice(&bytes);
        parse_any(&bytes);
        parse_any(&framed);
        prop_assert!(DeviceCard::from_bytes(&framed).is_err());
        prop_assert!(DeviceIdentity::from_bytes(&framed).is_err());
        prop_assert!(Device::from_bytes(&framed).is_err());
    }
}
