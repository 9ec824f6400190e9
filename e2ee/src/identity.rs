//! A device's long-term keys ([`DeviceIdentity`]) and their public, self-signed half
//! ([`DeviceCard`]).

use openmls::prelude::{BasicCredential, CredentialWithKey, OpenMlsCrypto, OpenMlsRand};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::signatures::Signer;
use openmls_traits::types::{HpkeCiphertext, HpkeKeyPair, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{CIPHERSUITE, Error, MAX_NAME, Result, decode, encode, strip_magic};

/// The first bytes of a serialized [`DeviceIdentity`] (its secrets: a profile's 0600 file).
const MAGIC_IDENTITY: &[u8; 8] = b"iim-key\x01";
/// The first bytes of a serialized [`DeviceCard`], and of what its self-signature covers.
const MAGIC_CARD: &[u8; 8] = b"iim-crd\x01";
/// Prefixed to the signature key before it is hashed into a fingerprint.
const FINGERPRINT_LABEL: &[u8] = b"iim-e2e fingerprint\x01";

/// Ed25519 sizes: public and secret keys, signatures. X25519 keys are 32 bytes as well.
pub(crate) const KEY_LEN: usize = 32;
pub(crate) const SIGNATURE_LEN: usize = 64;
const SCHEME: SignatureScheme = SignatureScheme::ED25519;

/// A fresh crypto provider (its random generator seeded from the system).
pub(crate) fn crypto() -> RustCrypto {
    RustCrypto::default()
}

/// Whether `name` may be a user's or a device's: 1 to 64 bytes of `a-z 0-9 . _ -`, what the
/// host accepts. No `/`, so `"user/device"` is unambiguous.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// `Ok` if `name` is [`valid_name`], else [`Error::InvalidName`].
pub(crate) fn check_name(name: &str) -> Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(Error::InvalidName(
            name.chars().take(MAX_NAME + 1).collect(),
        ))
    }
}

/// Verifies an Ed25519 `signature` by `public_key` over `magic ‖ content`.
pub(crate) fn verify(public_key: &[u8], signed: &[u8], signature: &[u8]) -> Result<()> {
    crypto()
        .verify_signature(SCHEME, signed, public_key, signature)
        .map_err(|_| Error::BadSignature)
}

/// A device's long-term secret keys: an Ed25519 key pair (its MLS credential as well) and an
/// X25519 HPKE key pair for 1:1 messages.
pub struct DeviceIdentity {
    user: String,
    device: String,
    created_at_ms: u64,
    signer: SignatureKeyPair,
    hpke: HpkeKeyPair,
}

/// The serialized form of a [`DeviceIdentity`], after its magic; `S` is the signature key
/// pair, borrowed to write and owned to read.
#[derive(Serialize, Deserialize)]
struct IdentityFile<S> {
    user: String,
    device: String,
    created_at_ms: u64,
    signer: S,
    hpke_private: Vec<u8>,
    hpke_public: Vec<u8>,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("DeviceIdentity")
            .field("user", &self.user)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl DeviceIdentity {
    /// New keys for `device` of `user`; `created_at_ms` (now, in ms since the Unix epoch) goes
    /// into its card.
    pub fn generate(user: &str, device: &str, created_at_ms: u64) -> Result<Self> {
        check_name(user)?;
        check_name(device)?;
        let signer = SignatureKeyPair::new(SCHEME).map_err(|e| Error::Crypto(e.to_string()))?;
        let crypto = crypto();
        let ikm = crypto
            .random_vec(KEY_LEN)
            .map_err(|e| Error::Crypto(e.to_string()))?;
        let hpke = crypto
            .derive_hpke_keypair(CIPHERSUITE.hpke_config(), &ikm)
            .map_err(|e| Error::Crypto(e.to_string()))?;
        Ok(Self {
            user: user.to_owned(),
            device: device.to_owned(),
            created_at_ms,
            signer,
            hpke,
        })
    }

    /// The user this device belongs to.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// This device's name.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// `"user/device"`: this device's MLS identity.
    pub fn identity(&self) -> String {
        format!("{}/{}", self.user, self.device)
    }

    /// The public card to publish, self-signed.
    pub fn card(&self) -> Result<DeviceCard> {
        let content = CardContent {
            user: self.user.clone(),
            device: self.device.clone(),
            signature_key: self.signer.public().to_vec(),
            hpke_key: self.hpke.public.clone(),
            created_at_ms: self.created_at_ms,
        };
        let signature = self.sign(&content.signed_bytes()?)?;
        Ok(DeviceCard { content, signature })
    }

    /// The secrets, versioned, for a file only this device's user may read.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let file = IdentityFile {
            user: self.user.clone(),
            device: self.device.clone(),
            created_at_ms: self.created_at_ms,
            signer: &self.signer,
            hpke_private: self.hpke.private.to_vec(),
            hpke_public: self.hpke.public.clone(),
        };
        let mut bytes = MAGIC_IDENTITY.to_vec();
        bytes.extend(encode(&file, "identity")?);
        Ok(bytes)
    }

    /// Reads what [`to_bytes`](Self::to_bytes) wrote, and checks that each secret key matches
    /// its public key (a damaged file is an error, not a device that signs garbage).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let file: IdentityFile<SignatureKeyPair> =
            decode(strip_magic(bytes, MAGIC_IDENTITY)?, "identity")?;
        check_name(&file.user)?;
        check_name(&file.device)?;
        let keys = [file.signer.public(), &file.hpke_private, &file.hpke_public];
        if file.signer.signature_scheme() != SCHEME || keys.iter().any(|key| key.len() != KEY_LEN) {
            return Err(Error::Malformed("identity keys"));
        }
        let identity = Self {
            user: file.user,
            device: file.device,
            created_at_ms: file.created_at_ms,
            signer: file.signer,
            hpke: HpkeKeyPair {
                private: file.hpke_private.into(),
                public: file.hpke_public,
            },
        };
        let probe = b"iim-e2e identity self-test";
        verify(identity.signer.public(), probe, &identity.sign(probe)?)
            .map_err(|_| Error::Malformed("identity signature key"))?;
        let sealed = identity.seal_to_self(probe)?;
        if identity.hpke_open(&sealed, b"", b"")? != probe {
            return Err(Error::Malformed("identity hpke key"));
        }
        Ok(identity)
    }

    /// Ed25519 signature of `payload` (a magic-prefixed structure of this crate).
    pub(crate) fn sign(&self, payload: &[u8]) -> Result<Vec<u8>> {
        self.signer
            .sign(payload)
            .map_err(|e| Error::Crypto(format!("{e:?}")))
    }

    /// HPKE-opens a copy sealed to this device.
    pub(crate) fn hpke_open(
        &self,
        sealed: &HpkeCiphertext,
        info: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>> {
        crypto()
            .hpke_open(
                CIPHERSUITE.hpke_config(),
                sealed,
                &self.hpke.private,
                info,
                aad,
            )
            .map_err(|_| Error::DecryptFailed)
    }

    fn seal_to_self(&self, plaintext: &[u8]) -> Result<HpkeCiphertext> {
        crypto()
            .hpke_seal(
                CIPHERSUITE.hpke_config(),
                &self.hpke.public,
                b"",
                b"",
                plaintext,
            )
            .map_err(|e| Error::Crypto(e.to_string()))
    }

    /// The signer openmls uses for this device's MLS messages.
    pub(crate) fn signer(&self) -> &SignatureKeyPair {
        &self.signer
    }

    /// This device's MLS credential: `"user/device"` and its signature key.
    pub(crate) fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.identity().into_bytes()).into(),
            signature_key: self.signer.public().into(),
        }
    }
}

/// What a [`DeviceCard`]'s self-signature covers (after the card magic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CardContent {
    user: String,
    device: String,
    signature_key: Vec<u8>,
    hpke_key: Vec<u8>,
    created_at_ms: u64,
}

impl CardContent {
    fn signed_bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = MAGIC_CARD.to_vec();
        bytes.extend(encode(self, "card")?);
        Ok(bytes)
    }
}

/// The public part of a device, published through the host's key directory: names, keys,
/// creation time, and a self-signature over all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCard {
    content: CardContent,
    signature: Vec<u8>,
}

impl DeviceCard {
    /// The user the device belongs to.
    pub fn user(&self) -> &str {
        &self.content.user
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        &self.content.device
    }

    /// `"user/device"`.
    pub fn identity(&self) -> String {
        format!("{}/{}", self.content.user, self.content.device)
    }

    /// The device's Ed25519 public key.
    pub fn signature_key(&self) -> &[u8] {
        &self.content.signature_key
    }

    /// The device's X25519 HPKE public key.
    pub fn hpke_key(&self) -> &[u8] {
        &self.content.hpke_key
    }

    /// When the device made its keys (ms since the Unix epoch, as the device said).
    pub fn created_at_ms(&self) -> u64 {
        self.content.created_at_ms
    }

    /// `magic ‖ content ‖ signature`.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = self.content.signed_bytes()?;
        bytes.extend_from_slice(&self.signature);
        Ok(bytes)
    }

    /// Parses a card and [`verify`](Self::verify)s it: every `DeviceCard` there is has passed
    /// that check, so [`seal`](crate::seal), [`open`](crate::open) and
    /// [`Device::add`](crate::Device::add) need not repeat it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let rest = strip_magic(bytes, MAGIC_CARD)?;
        let split = rest
            .len()
            .checked_sub(SIGNATURE_LEN)
            .ok_or(Error::Malformed("card"))?;
        let (content, signature) = rest.split_at(split);
        let card = Self {
            content: decode(content, "card")?,
            signature: signature.to_vec(),
        };
        card.verify()?;
        Ok(card)
    }

    /// Checks the names, the key sizes and the self-signature.
    pub fn verify(&self) -> Result<()> {
        check_name(&self.content.user)?;
        check_name(&self.content.device)?;
        if self.content.signature_key.len() != KEY_LEN || self.content.hpke_key.len() != KEY_LEN {
            return Err(Error::Malformed("card keys"));
        }
        verify(
            &self.content.signature_key,
            &self.content.signed_bytes()?,
            &self.signature,
        )
    }

    /// A safety number for users to compare out of band: 128 bits of SHA-256 of the signature
    /// key, as eight groups of four hex digits.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::new()
            .chain_update(FINGERPRINT_LABEL)
            .chain_update(&self.content.signature_key)
            .finalize();
        digest[..16]
            .chunks(2)
            .map(|pair| pair.iter().map(|b| format!("{b:02x}")).collect::<String>())
            .collect::<Vec<_>>()
            .join(" ")
    }
}
