//! 1:1 envelopes: one HPKE copy per recipient device, the whole signed by the sender's device.
//!
//! Wire: `MAGIC_DIRECT ‖ postcard(Content) ‖ Ed25519 signature (64 bytes)`; the signature
//! covers everything before it.

use std::collections::BTreeSet;

use openmls::prelude::{OpenMlsCrypto, OpenMlsRand};
use openmls_traits::types::HpkeCiphertext;
use serde::{Deserialize, Serialize};

use crate::identity::{KEY_LEN, SIGNATURE_LEN, check_name, crypto, verify};
use crate::{
    CIPHERSUITE, DeviceCard, DeviceIdentity, Error, MAGIC_DIRECT, MAGIC_MLS, MAX_COPIES,
    MAX_PLAINTEXT, MAX_TO_USERS, Result, decode, encode,
};

/// The label at the head of every copy's HPKE `info`.
const INFO_LABEL: &str = "iim-e2e direct v1";
/// A copy's ciphertext is its inner plaintext plus the AEAD tag (AES-128-GCM: 16 bytes) and
/// the inner framing; this bounds it generously.
const MAX_COPY: usize = MAX_PLAINTEXT + MAX_TO_USERS * (crate::MAX_NAME + 2) + 64;

/// What the signature covers, after the magic.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Content {
    sender_user: String,
    sender_device: String,
    copies: Vec<Copy>,
}

/// One recipient device's HPKE copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Copy {
    user: String,
    device: String,
    kem_output: Vec<u8>,
    ciphertext: Vec<u8>,
}

/// What each copy seals.
#[derive(Serialize, Deserialize)]
struct Inner {
    to_users: Vec<String>,
    nonce: [u8; 16],
    plaintext: Vec<u8>,
}

/// A parsed, not yet verified, envelope.
#[derive(Debug)]
pub(crate) struct Envelope<'a> {
    signed: &'a [u8],
    signature: &'a [u8],
    content: Content,
}

impl<'a> Envelope<'a> {
    /// Parses `body` and checks its shape (names, sizes, no device twice); no key needed.
    pub(crate) fn parse(body: &'a [u8]) -> Result<Self> {
        if !body.starts_with(MAGIC_DIRECT) {
            return Err(Error::BadMagic);
        }
        let split = body
            .len()
            .checked_sub(SIGNATURE_LEN)
            .filter(|&split| split >= MAGIC_DIRECT.len())
            .ok_or(Error::Malformed("envelope"))?;
        let (signed, signature) = body.split_at(split);
        let content: Content = decode(&signed[MAGIC_DIRECT.len()..], "envelope")?;
        check_name(&content.sender_user)?;
        check_name(&content.sender_device)?;
        if content.copies.len() > MAX_COPIES {
            return Err(Error::TooLarge("recipient devices"));
        }
        let mut seen = BTreeSet::new();
        for copy in &content.copies {
            check_name(&copy.user)?;
            check_name(&copy.device)?;
            if copy.kem_output.len() != KEY_LEN || copy.ciphertext.len() > MAX_COPY {
                return Err(Error::Malformed("envelope copy"));
            }
            if !seen.insert((&copy.user, &copy.device)) {
                return Err(Error::Malformed("envelope: a device twice"));
            }
        }
        Ok(Self {
            signed,
            signature,
            content,
        })
    }
}

/// A 1:1 message opened by [`open`]. The caller checks `nonce` against those it has seen, and
/// may compare `to_users` with the body's visible addressees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The message.
    pub plaintext: Vec<u8>,
    /// The users the sender addressed.
    pub to_users: Vec<String>,
    /// Random, unique per message: a second body with the same nonce is a replay.
    pub nonce: [u8; 16],
    /// The sender's user (authenticated by its card).
    pub sender_user: String,
    /// The sender's device (authenticated by its card).
    pub sender_device: String,
}

/// Whether `body` is an e2e body (1:1 or group) rather than a plain one.
pub fn is_e2e(body: &[u8]) -> bool {
    body.starts_with(MAGIC_DIRECT) || body.starts_with(MAGIC_MLS)
}

/// The `(user, device)` a 1:1 envelope claims to be from, so a client knows whose card to
/// fetch. Not authenticated: [`open`] checks it.
pub fn peek_sender(body: &[u8]) -> Result<(String, String)> {
    let content = Envelope::parse(body)?.content;
    Ok((content.sender_user, content.sender_device))
}

/// Seals `plaintext` from `sender` for `to_users`: one HPKE copy per card in `recipients`,
/// which are the devices of the addressed users and the sender's own devices (the sender's
/// user need not be in `to_users`).
pub fn seal(
    sender: &DeviceIdentity,
    to_users: &[String],
    recipients: &[DeviceCard],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    for card in recipients {
        if card.user() != sender.user() && !to_users.iter().any(|user| user == card.user()) {
            return Err(Error::BadRecipient(card.identity()));
        }
    }
    seal_copies(sender, to_users, recipients, plaintext)
}

/// [`seal`] without checking that each card's user is addressed; tests use it to make
/// envelopes an honest sender would not.
pub(crate) fn seal_copies(
    sender: &DeviceIdentity,
    to_users: &[String],
    recipients: &[DeviceCard],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    check_to_users(to_users)?;
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(Error::TooLarge("plaintext"));
    }
    if recipients.is_empty() {
        return Err(Error::NoRecipients);
    }
    if recipients.len() > MAX_COPIES {
        return Err(Error::TooLarge("recipient devices"));
    }
    let crypto = crypto();
    let nonce = crypto
        .random_array::<16>()
        .map_err(|e| Error::Crypto(e.to_string()))?;
    let inner = encode(
        &Inner {
            to_users: to_users.to_vec(),
            nonce,
            plaintext: plaintext.to_vec(),
        },
        "inner",
    )?;
    let mut seen = BTreeSet::new();
    let mut copies = Vec::with_capacity(recipients.len());
    for card in recipients {
        if !seen.insert(card.identity()) {
            return Err(Error::BadRecipient(card.identity()));
        }
        let info = info(sender.user(), sender.device(), card.user(), card.device())?;
        let sealed = crypto
            .hpke_seal(
                CIPHERSUITE.hpke_config(),
                card.hpke_key(),
                &info,
                MAGIC_DIRECT,
                &inner,
            )
            .map_err(|e| Error::Crypto(e.to_string()))?;
        copies.push(Copy {
            user: card.user().to_owned(),
            device: card.device().to_owned(),
            kem_output: sealed.kem_output.into(),
            ciphertext: sealed.ciphertext.into(),
        });
    }
    let content = Content {
        sender_user: sender.user().to_owned(),
        sender_device: sender.device().to_owned(),
        copies,
    };
    let mut body = MAGIC_DIRECT.to_vec();
    body.extend(encode(&content, "envelope")?);
    let signature = sender.sign(&body)?;
    body.extend(signature);
    Ok(body)
}

/// Opens `body` for device `me`, from the device of `sender_card` (fetched by the names
/// [`peek_sender`] gave, and accepted by the client). Checks the sender's names and the
/// signature first, then opens this device's copy and checks what it carries.
pub fn open(me: &DeviceIdentity, sender_card: &DeviceCard, body: &[u8]) -> Result<Opened> {
    let envelope = Envelope::parse(body)?;
    let content = &envelope.content;
    if content.sender_user != sender_card.user() || content.sender_device != sender_card.device() {
        return Err(Error::WrongSender {
            claimed: format!("{}/{}", content.sender_user, content.sender_device),
            card: sender_card.identity(),
        });
    }
    verify(
        sender_card.signature_key(),
        envelope.signed,
        envelope.signature,
    )?;
    let copy = content
        .copies
        .iter()
        .find(|copy| copy.user == me.user() && copy.device == me.device())
        .ok_or(Error::NotForThisDevice)?;
    let info = info(
        &content.sender_user,
        &content.sender_device,
        me.user(),
        me.device(),
    )?;
    let sealed = HpkeCiphertext {
        kem_output: copy.kem_output.clone().into(),
        ciphertext: copy.ciphertext.clone().into(),
    };
    let inner: Inner = decode(&me.hpke_open(&sealed, &info, MAGIC_DIRECT)?, "inner")?;
    check_to_users(&inner.to_users)?;
    let addressed = |user: &str| inner.to_users.iter().any(|to| to == user);
    if me.user() != content.sender_user && !addressed(me.user()) {
        return Err(Error::NotAddressed);
    }
    Ok(Opened {
        plaintext: inner.plaintext,
        to_users: inner.to_users,
        nonce: inner.nonce,
        sender_user: content.sender_user.clone(),
        sender_device: content.sender_device.clone(),
    })
}

/// A copy's HPKE `info`: the label, the sender's and the recipient's user and device, each
/// length-prefixed (postcard), so no two different tuples give the same bytes.
fn info(from_user: &str, from_device: &str, to_user: &str, to_device: &str) -> Result<Vec<u8>> {
    encode(
        &(INFO_LABEL, from_user, from_device, to_user, to_device),
        "info",
    )
}

fn check_to_users(to_users: &[String]) -> Result<()> {
    if to_users.len() > MAX_TO_USERS {
        return Err(Error::TooLarge("addressed users"));
    }
    to_users.iter().try_for_each(|user| check_name(user))
}

#[cfg(test)]
impl Envelope<'_> {
    /// Puts `donor`'s copies in this envelope (what a dishonest sender could do).
    pub(crate) fn replace_copies_for_test(&mut self, donor: &Envelope<'_>) {
        self.content.copies = donor.content.copies.clone();
    }

    /// The envelope, signed anew by `signer`.
    pub(crate) fn resign_for_test(&self, signer: &DeviceIdentity) -> Vec<u8> {
        let mut body = MAGIC_DIRECT.to_vec();
        body.extend(encode(&self.content, "envelope").expect("encodes"));
        let signature = signer.sign(&body).expect("signs");
        body.extend(signature);
        body
    }
}
