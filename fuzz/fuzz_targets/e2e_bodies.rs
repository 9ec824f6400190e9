//! The bodies of end-to-end encrypted messages as a client reads them off a delivery
//! (`iim-e2ee`): 1:1 envelopes, MLS group messages, device cards, saved device state.
//!
//! Input: a byte choosing what to do, then the body. Even: every parser, keyless
//! (`iim_e2ee::parse_any`). Odd: bob's phone opens the body as a 1:1 envelope from alice's
//! phone (the identities in `fuzz/keys/`, which the seeds were sealed with, so that the fuzzer
//! starts from envelopes that open and mutates past the signature check's early exits).
//! Checked: nothing panics; an envelope opens only as what was sealed (its sender is alice's
//! phone, bob is addressed).

#![no_main]

use iim_e2ee::{DeviceCard, DeviceIdentity, open, parse_any};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// Bob's phone, and the card of alice's phone.
fn keys() -> &'static (DeviceIdentity, DeviceCard) {
    static KEYS: OnceLock<(DeviceIdentity, DeviceCard)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let bob = DeviceIdentity::from_bytes(include_bytes!("../keys/bob-phone.identity"))
            .expect("the fuzz identity loads");
        let alice = DeviceIdentity::from_bytes(include_bytes!("../keys/alice-phone.identity"))
            .expect("the fuzz identity loads");
        (bob, alice.card().expect("a card"))
    })
}

fuzz_target!(|data: &[u8]| {
    let ([what], body) = iim_fuzz::header::<1>(data);
    if what % 2 == 0 {
        parse_any(body);
        return;
    }
    let (bob, alice) = keys();
    if let Ok(opened) = open(bob, alice, body) {
        assert_eq!(
            (opened.sender_user.as_str(), opened.sender_device.as_str()),
            ("alice", "phone")
        );
        assert!(opened.to_users.iter().any(|user| user == "bob"));
    }
});
