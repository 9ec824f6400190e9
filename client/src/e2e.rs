//! End-to-end encryption for a device: its keys, the cards it trusts, what it has opened.
//!
//! A [`Keyring`] is one device's side of `iim-e2ee`, kept in a file only the device's user may
//! read (mode 0600): the device's identity and MLS state, the cards of other devices it has
//! accepted (trust on first use: the first card seen for a device is pinned, and a different
//! one later is refused until the user [trusts](Keyring::trust) it), and the nonces of the 1:1
//! messages it opened, so that a body the host plays again is noticed.
//!
//! The key directory is the host's `keys` plugin (`plugins/keys/README.md`): a device
//! [publishes](Keyring::publish) its card there and fetches others' with a
//! [`KeysRequest::Cards`]; the replies are messages, which the application reads from its
//! deliveries ([`keys_reply`]). A 1:1 message is [sealed](Keyring::seal) for every device the
//! directory lists for the addressed users and for the sender's own other devices, and sent as
//! an ordinary `chat` message: the host and its plugins route it by its visible fields and see
//! an opaque body. [`Keyring::open`] opens one.

use crate::ClientError;
use iim_e2ee::{DeviceCard, DeviceIdentity};
use iim_proto::body::keys::{
    Answer, Base64, CardEntry, ClaimedPackage, KEYS_KIND, KeysReply, KeysRequest,
};
use iim_proto::{Address, DeviceId, GroupId, Message, MessageKind, UserId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

pub use iim_e2ee::{GroupMessage, Opened, Processed};
pub use iim_proto::body::is_end_to_end;

/// How many nonces of opened messages a keyring keeps: a replay of anything older is not
/// noticed (800 KB of the file at most).
pub const NONCES_KEPT: usize = 50_000;

/// How many key packages a device keeps in the directory, for MLS groups to add it by.
pub const KEY_PACKAGES: usize = 10;

/// What the file starts with; the version after it.
const MAGIC: &[u8; 8] = b"iim-kr\x00\x01";

/// Why an end-to-end operation failed.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    /// The keyring file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The keyring file belongs to another device.
    #[error("{path} holds the keys of {holds}, not of {wanted}")]
    OtherDevice {
        /// The file.
        path: String,
        /// `user/device` whose keys it holds.
        holds: String,
        /// `user/device` asked for.
        wanted: String,
    },
    /// A user addressed has no device with a published card: they cannot read e2e messages.
    #[error("{0} has no device set up for end-to-end encryption (no card in the key directory)")]
    NoDevices(String),
    /// A device's card differs from the one pinned for it: the user must compare fingerprints
    /// and trust the new one.
    #[error(
        "the key of {device} changed (pinned {pinned}, now {offered}): compare fingerprints \
         with its owner, then trust it (`iim e2e trust {device}`)"
    )]
    KeyChanged {
        /// `user/device`.
        device: String,
        /// The pinned card's fingerprint.
        pinned: String,
        /// The new card's fingerprint.
        offered: String,
    },
    /// No card is known for the device that sent a message: fetch the user's cards, then
    /// open it again.
    #[error("no key known for {user}/{device}")]
    UnknownSender {
        /// The sender's user.
        user: String,
        /// The sender's device.
        device: String,
    },
    /// The message was played again: this device opened one with the same nonce before.
    #[error("this message was opened before: a replay")]
    Replayed,
    /// The message's visible fields do not match what was sealed inside.
    #[error("{0}")]
    Mismatch(String),
    /// A group's welcome for other devices, or a commit of a group this device is not in
    /// (every member gets the group's messages).
    #[error("a group change for other devices")]
    NotForThisDevice,
    /// A group message this device processed before, delivered again: its secrets are spent
    /// (forward secrecy), it cannot be opened twice.
    #[error("processed before on this device")]
    SeenBefore,
    /// A message of a group whose MLS group this device is not in: it was not added yet (or
    /// had no key package left), or was removed.
    #[error("this device is not in #{0}'s end-to-end group")]
    NotInGroup(String),
    /// The cryptography refused: a body altered, not sealed for this device, malformed.
    #[error("{0}")]
    Crypto(#[from] iim_e2ee::Error),
    /// The key directory refused a request, or is not there.
    #[error("key directory: {0}")]
    Directory(String),
    /// The host or the connection failed.
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl E2eError {
    /// Whether the body itself failed its checks: altered, replayed, or addressed otherwise
    /// than it says (as opposed to a key not known yet or a local failure).
    pub fn is_tampering(&self) -> bool {
        matches!(
            self,
            E2eError::Replayed
                | E2eError::Mismatch(_)
                | E2eError::Crypto(
                    iim_e2ee::Error::BadSignature
                        | iim_e2ee::Error::BadKeyPackage(_)
                        | iim_e2ee::Error::DecryptFailed
                        | iim_e2ee::Error::Malformed(_)
                        | iim_e2ee::Error::WrongSender { .. }
                        | iim_e2ee::Error::NotAddressed
                )
        )
    }
}

/// What a fetched card meant to the keyring ([`Keyring::accept_cards`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardNews {
    /// A device seen for the first time: its card is pinned now.
    New {
        /// `user/device`.
        device: String,
        /// Its fingerprint.
        fingerprint: String,
    },
    /// The pinned card, again.
    Known {
        /// `user/device`.
        device: String,
        /// Its fingerprint.
        fingerprint: String,
    },
    /// A card different from the pinned one: kept aside, not used, until
    /// [trusted](Keyring::trust).
    Changed {
        /// `user/device`.
        device: String,
        /// The pinned card's fingerprint.
        pinned: String,
        /// The new card's fingerprint.
        offered: String,
    },
    /// A card that does not verify, or is filed under other names than its own: ignored.
    Invalid {
        /// `user/device` the directory filed it under.
        device: String,
        /// Why.
        reason: String,
    },
}

/// The file's contents.
#[derive(Serialize, Deserialize)]
struct KeyringFile {
    /// `iim_e2ee::Device::to_bytes`: the identity and the MLS state.
    device: Vec<u8>,
    /// Accepted cards by `user/device`.
    pinned: BTreeMap<String, Vec<u8>>,
    /// Cards offered for a pinned device that differ from its pinned one, by `user/device`.
    offered: BTreeMap<String, Vec<u8>>,
    /// Nonces of opened 1:1 messages, oldest first.
    nonces: Vec<([u8; 16], u64)>,
    /// Ids of the group messages processed, oldest first.
    processed: Vec<u64>,
    /// The MLS groups this device created, and so commits the changes of.
    created: BTreeSet<String>,
    /// Whether the key directory took this device's card.
    published: bool,
}

/// One device's end-to-end keys and trust, saved in a file.
pub struct Keyring {
    path: PathBuf,
    device: iim_e2ee::Device,
    pinned: BTreeMap<String, DeviceCard>,
    offered: BTreeMap<String, DeviceCard>,
    nonces: VecDeque<[u8; 16]>,
    /// Each nonce kept, with the id of the message it came in.
    seen: HashMap<[u8; 16], u64>,
    /// Ids of the group messages processed (their secrets are spent: a message delivered
    /// again cannot be processed again).
    processed: VecDeque<u64>,
    processed_set: HashSet<u64>,
    created: BTreeSet<String>,
    published: bool,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("path", &self.path)
            .field("device", &self.device.identity().identity())
            .field("pinned", &self.pinned.len())
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// The keyring in `path` for `user`'s `device`, or new keys for it if there is no file
    /// (written by [`save`](Self::save)). A file of another device is refused.
    pub fn open_or_create(
        path: &Path,
        user: &UserId,
        device: &DeviceId,
        now_ms: u64,
    ) -> Result<Self, E2eError> {
        let file_error = |reason: String| E2eError::File {
            path: path.display().to_string(),
            reason,
        };
        let wanted = format!("{user}/{device}");
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = DeviceIdentity::generate(user.as_str(), device.as_str(), now_ms)?;
                let mut keyring = Self::empty(path, iim_e2ee::Device::new(identity));
                keyring.pin_own()?;
                return Ok(keyring);
            }
            Err(e) => return Err(file_error(e.to_string())),
        };
        let Some(contents) = bytes.strip_prefix(MAGIC.as_slice()) else {
            return Err(file_error(
                "not an iim keyring (or of a newer version)".into(),
            ));
        };
        let file: KeyringFile = postcard::from_bytes(contents)
            .map_err(|e| file_error(format!("damaged keyring: {e}")))?;
        let device = iim_e2ee::Device::from_bytes(&file.device)?;
        let holds = device.identity().identity();
        if holds != wanted {
            return Err(E2eError::OtherDevice {
                path: path.display().to_string(),
                holds,
                wanted,
            });
        }
        let cards = |map: BTreeMap<String, Vec<u8>>| {
            map.into_iter()
                .map(|(name, bytes)| Ok((name, DeviceCard::from_bytes(&bytes)?)))
                .collect::<Result<BTreeMap<_, _>, E2eError>>()
        };
        let mut keyring = Self::empty(path, device);
        keyring.pinned = cards(file.pinned)?;
        keyring.offered = cards(file.offered)?;
        for (nonce, id) in file.nonces {
            keyring.remember(nonce, id);
        }
        for id in file.processed {
            keyring.processed_one(id);
        }
        keyring.created = file.created;
        keyring.published = file.published;
        Ok(keyring)
    }

    /// Runs `f` on the keyring in `path` (made if there is none) and saves it after, all under
    /// an exclusive lock of `path` + `.lock`: the processes of one device (a `listen`, a
    /// `send`) change it in turn, each from what the one before saved. Blocks while another
    /// holds the lock, which is held for local work only, never across a network wait.
    pub fn update<T>(
        path: &Path,
        user: &UserId,
        device: &DeviceId,
        now_ms: u64,
        f: impl FnOnce(&mut Keyring) -> T,
    ) -> Result<T, E2eError> {
        let file_error = |reason: String| E2eError::File {
            path: path.display().to_string(),
            reason,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| file_error(e.to_string()))?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.with_extension("lock"))
            .map_err(|e| file_error(format!("cannot open its lock: {e}")))?;
        lock.lock()
            .map_err(|e| file_error(format!("cannot lock it: {e}")))?;
        let mut keyring = Self::open_or_create(path, user, device, now_ms)?;
        let result = f(&mut keyring);
        keyring.save()?;
        drop(lock);
        Ok(result)
    }

    fn empty(path: &Path, device: iim_e2ee::Device) -> Self {
        Self {
            path: path.to_owned(),
            device,
            pinned: BTreeMap::new(),
            offered: BTreeMap::new(),
            nonces: VecDeque::new(),
            seen: HashMap::new(),
            processed: VecDeque::new(),
            processed_set: HashSet::new(),
            created: BTreeSet::new(),
            published: false,
        }
    }

    /// This device's own card is pinned: the directory cannot swap it either.
    fn pin_own(&mut self) -> Result<(), E2eError> {
        let card = self.device.identity().card()?;
        self.pinned.insert(card.identity(), card);
        Ok(())
    }

    /// Writes the keyring to its file, mode 0600, replacing it whole (a crash leaves the old
    /// file or the new one).
    pub fn save(&self) -> Result<(), E2eError> {
        let file_error = |reason: String| E2eError::File {
            path: self.path.display().to_string(),
            reason,
        };
        let cards = |map: &BTreeMap<String, DeviceCard>| {
            map.iter()
                .map(|(name, card)| Ok((name.clone(), card.to_bytes()?)))
                .collect::<Result<BTreeMap<_, _>, E2eError>>()
        };
        let file = KeyringFile {
            device: self.device.to_bytes()?,
            pinned: cards(&self.pinned)?,
            offered: cards(&self.offered)?,
            nonces: self
                .nonces
                .iter()
                .map(|nonce| (*nonce, self.seen.get(nonce).copied().unwrap_or_default()))
                .collect(),
            processed: self.processed.iter().copied().collect(),
            created: self.created.clone(),
            published: self.published,
        };
        let mut bytes = MAGIC.to_vec();
        bytes.extend(postcard::to_stdvec(&file).map_err(|e| file_error(e.to_string()))?);
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| file_error(e.to_string()))?;
        }
        let tmp = self.path.with_extension("tmp");
        write_private(&tmp, &bytes).map_err(|e| file_error(e.to_string()))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| file_error(e.to_string()))
    }

    /// `user/device` of this keyring.
    pub fn me(&self) -> String {
        self.device.identity().identity()
    }

    /// Whether the key directory took this device's card ([`set_published`](Self::set_published)).
    pub fn is_published(&self) -> bool {
        self.published
    }

    /// Notes that the key directory took this device's card.
    pub fn set_published(&mut self) {
        self.published = true;
    }

    /// This device's fingerprint, for its user to compare with those who write to it.
    pub fn fingerprint(&self) -> Result<String, E2eError> {
        Ok(self.device.identity().card()?.fingerprint())
    }

    /// The request that publishes this device's card and `key_packages` fresh key packages
    /// (their secrets stay here: [`save`](Self::save) after).
    pub fn publish(&mut self, key_packages: usize) -> Result<KeysRequest, E2eError> {
        let card = self.device.identity().card()?.to_bytes()?;
        let key_packages = self
            .device
            .key_packages(key_packages)?
            .into_iter()
            .map(Base64)
            .collect();
        Ok(KeysRequest::Publish {
            card: Base64(card),
            key_packages,
        })
    }

    /// Takes the cards the directory gave: each is checked (its signature, and that it is
    /// filed under its own names); a device's first card is pinned, the pinned one is used,
    /// and a different one is kept aside until [trusted](Self::trust).
    pub fn accept_cards(&mut self, entries: &[CardEntry]) -> Vec<CardNews> {
        entries
            .iter()
            .map(|entry| {
                let device = format!("{}/{}", entry.user, entry.device);
                let card = match DeviceCard::from_bytes(&entry.card.0) {
                    Ok(card) if card.identity() == device => card,
                    Ok(card) => {
                        return CardNews::Invalid {
                            reason: format!("the card is {}'s", card.identity()),
                            device,
                        };
                    }
                    Err(e) => {
                        return CardNews::Invalid {
                            device,
                            reason: e.to_string(),
                        };
                    }
                };
                let fingerprint = card.fingerprint();
                match self.pinned.get(&device) {
                    None => {
                        self.pinned.insert(device.clone(), card);
                        CardNews::New {
                            device,
                            fingerprint,
                        }
                    }
                    Some(pinned) if pinned.fingerprint() == fingerprint => {
                        self.offered.remove(&device);
                        CardNews::Known {
                            device,
                            fingerprint,
                        }
                    }
                    Some(pinned) => {
                        let pinned = pinned.fingerprint();
                        self.offered.insert(device.clone(), card);
                        CardNews::Changed {
                            device,
                            pinned,
                            offered: fingerprint,
                        }
                    }
                }
            })
            .collect()
    }

    /// Replaces the pinned card of `device` (`user/device`) by the one offered since, after
    /// its user compared fingerprints; returns the new fingerprint.
    pub fn trust(&mut self, device: &str) -> Result<String, E2eError> {
        let card = self.offered.remove(device).ok_or_else(|| {
            E2eError::Directory(format!(
                "no new key of {device} waits to be trusted (`iim e2e cards` fetches them)"
            ))
        })?;
        let fingerprint = card.fingerprint();
        self.pinned.insert(device.to_owned(), card);
        Ok(fingerprint)
    }

    /// The pinned cards' `user/device` and fingerprint.
    pub fn pinned(&self) -> impl Iterator<Item = (&str, String)> {
        self.pinned
            .iter()
            .map(|(name, card)| (name.as_str(), card.fingerprint()))
    }

    /// Seals `plaintext` for `to` (users) and this user's other devices: `current` are the
    /// devices the directory lists now for those users and this one (`user/device`, after
    /// [`accept_cards`](Self::accept_cards)); each is sealed to with its pinned card. Returns
    /// the body, and the addresses to send it to: `to`, and this user when another device of
    /// theirs gets a copy.
    pub fn seal(
        &self,
        to: &[UserId],
        current: &[CardEntry],
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, Vec<Address>), E2eError> {
        let me = self.device.identity();
        let mut cards = Vec::new();
        let mut covered = BTreeSet::new();
        for entry in current {
            let device = format!("{}/{}", entry.user, entry.device);
            let own_user = entry.user == me.user();
            if device == me.identity() || !(own_user || to.iter().any(|u| u.as_str() == entry.user))
            {
                continue;
            }
            if let Some(offered) = self.offered.get(&device) {
                return Err(E2eError::KeyChanged {
                    pinned: self
                        .pinned
                        .get(&device)
                        .map(DeviceCard::fingerprint)
                        .unwrap_or_default(),
                    offered: offered.fingerprint(),
                    device,
                });
            }
            // A card that was invalid is not pinned: that device gets no copy.
            if let Some(card) = self.pinned.get(&device) {
                cards.push(card.clone());
                covered.insert(entry.user.clone());
            }
        }
        for user in to {
            if user.as_str() != me.user() && !covered.contains(user.as_str()) {
                return Err(E2eError::NoDevices(user.to_string()));
            }
        }
        let to_users: Vec<String> = to.iter().map(ToString::to_string).collect();
        let mut addresses: Vec<Address> = to.iter().cloned().map(Address::User).collect();
        if covered.contains(me.user()) && !to.iter().any(|u| u.as_str() == me.user()) {
            let own = UserId::new(me.user()).map_err(|e| E2eError::Mismatch(e.to_string()))?;
            addresses.push(Address::User(own));
        }
        if cards.is_empty() {
            // Only to oneself, from one's only device: sealed to this device, to read later.
            cards.push(me.card()?);
        }
        let body = iim_e2ee::seal(me, &to_users, &cards, plaintext)?;
        Ok((body, addresses))
    }

    /// Opens the e2e body of `message`: from a device whose card is pinned, of the user the
    /// host says sent it, addressed to the users it is routed to, and never opened before.
    /// [`E2eError::UnknownSender`]: fetch that user's cards and try again. The nonce is
    /// remembered: [`save`](Self::save) after.
    pub fn open(&mut self, message: &Message) -> Result<Opened, E2eError> {
        let (user, device) = iim_e2ee::peek_sender(&message.body)?;
        if user != message.from.as_str() || device != message.from_device.as_str() {
            return Err(E2eError::Mismatch(format!(
                "sealed by {user}/{device} but delivered as from {}/{}",
                message.from, message.from_device
            )));
        }
        let name = format!("{user}/{device}");
        let Some(card) = self.pinned.get(&name) else {
            if let Some(offered) = self.offered.get(&name) {
                return Err(E2eError::KeyChanged {
                    device: name,
                    pinned: String::new(),
                    offered: offered.fingerprint(),
                });
            }
            return Err(E2eError::UnknownSender { user, device });
        };
        let opened = match iim_e2ee::open(self.device.identity(), card, &message.body) {
            Ok(opened) => opened,
            // Signed with another key than the pinned one: if the directory offered a new card
            // for the device, its keys changed (rather than the body).
            Err(iim_e2ee::Error::BadSignature) if self.offered.contains_key(&name) => {
                return Err(E2eError::KeyChanged {
                    pinned: card.fingerprint(),
                    offered: self.offered[&name].fingerprint(),
                    device: name,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let sealed_to: BTreeSet<&str> = opened
            .to_users
            .iter()
            .map(String::as_str)
            .filter(|u| *u != user)
            .collect();
        let routed_to: BTreeSet<&str> = message
            .to
            .iter()
            .filter_map(|address| match address {
                Address::User(u) if u.as_str() != user => Some(u.as_str()),
                _ => None,
            })
            .collect();
        if sealed_to != routed_to || message.to.iter().any(|a| !matches!(a, Address::User(_))) {
            return Err(E2eError::Mismatch(format!(
                "sealed for {sealed_to:?} but routed to {:?}",
                message.to
            )));
        }
        match self.seen.get(&opened.nonce) {
            // The same message delivered again (a session that ended before its
            // acknowledgement reached the host): not a replay.
            Some(id) if *id == message.id.0 => {}
            Some(_) => return Err(E2eError::Replayed),
            None => self.remember(opened.nonce, message.id.0),
        }
        Ok(opened)
    }

    /// Whether this device is in the MLS group of iim group `group`.
    pub fn in_group(&self, group: &GroupId) -> bool {
        self.device.groups().any(|g| g == group.as_str())
    }

    /// Whether this device created the MLS group of `group`, and so commits its changes.
    pub fn commits(&self, group: &GroupId) -> bool {
        self.created.contains(group.as_str()) && self.in_group(group)
    }

    /// Creates the MLS group of `group`, with this device its only member and its committer.
    pub fn create_group(&mut self, group: &GroupId) -> Result<(), E2eError> {
        self.device.create_group(group.as_str())?;
        self.created.insert(group.to_string());
        Ok(())
    }

    /// Whether `entry` is the card pinned for its device (not a changed one, not invalid).
    pub fn is_pinned(&self, entry: &CardEntry) -> bool {
        let device = format!("{}/{}", entry.user, entry.device);
        self.pinned
            .get(&device)
            .and_then(|card| card.to_bytes().ok())
            .is_some_and(|bytes| bytes == entry.card.0)
    }

    /// The members of the MLS group of `group` whose key is not that of the card pinned for
    /// them (their device made new keys, or no card is pinned): to be removed, and added again
    /// with their current card.
    pub fn stale_members(&self, group: &GroupId) -> Result<Vec<String>, E2eError> {
        Ok(self
            .device
            .members_with_keys(group.as_str())?
            .into_iter()
            .filter(|(member, key)| {
                self.pinned
                    .get(member)
                    .is_none_or(|card| card.signature_key() != key.as_slice())
            })
            .map(|(member, _)| member)
            .collect())
    }

    /// The devices (`user/device`) in the MLS group of `group`.
    pub fn group_members(&self, group: &GroupId) -> Result<Vec<String>, E2eError> {
        Ok(self.device.members(group.as_str())?)
    }

    /// Removes `devices` from the MLS group of `group`: the commit to send to the group.
    pub fn remove_from_group(
        &mut self,
        group: &GroupId,
        devices: &[String],
    ) -> Result<Vec<u8>, E2eError> {
        Ok(self.device.remove(group.as_str(), devices)?)
    }

    /// Adds the devices whose key packages were claimed to the MLS group of `group`, each
    /// checked against the card pinned for it (a device seen for the first time is pinned
    /// now); returns the commit and the welcome, to send to the group in that order.
    pub fn add_to_group(
        &mut self,
        group: &GroupId,
        claimed: &[ClaimedPackage],
    ) -> Result<(Vec<u8>, Vec<u8>), E2eError> {
        let entries: Vec<CardEntry> = claimed
            .iter()
            .map(|c| CardEntry {
                user: c.user.clone(),
                device: c.device.clone(),
                card: c.card.clone(),
            })
            .collect();
        let mut members = Vec::with_capacity(claimed.len());
        for (news, package) in self.accept_cards(&entries).into_iter().zip(claimed) {
            match news {
                CardNews::New { device, .. } | CardNews::Known { device, .. } => {
                    let card = self.pinned.get(&device).cloned().ok_or_else(|| {
                        E2eError::Directory(format!("no card pinned for {device}"))
                    })?;
                    members.push((card, package.key_package.0.clone()));
                }
                CardNews::Changed {
                    device,
                    pinned,
                    offered,
                } => {
                    return Err(E2eError::KeyChanged {
                        device,
                        pinned,
                        offered,
                    });
                }
                CardNews::Invalid { device, reason } => {
                    return Err(E2eError::Directory(format!(
                        "the card of {device} is invalid: {reason}"
                    )));
                }
            }
        }
        Ok(self.device.add(group.as_str(), &members)?)
    }

    /// Encrypts `plaintext` for the MLS group of `group`: the body of a chat message to it.
    pub fn encrypt_for_group(
        &mut self,
        group: &GroupId,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, E2eError> {
        Ok(self.device.encrypt(group.as_str(), plaintext)?)
    }

    /// Processes the MLS body of `message`, a message to a group: an application message
    /// (checked to be from the device the host says sent it, for the group it was sent to),
    /// a commit (merged), or a welcome (this device joins; a welcome for other devices is
    /// [`E2eError::NotForThisDevice`]).
    pub fn process_group(&mut self, message: &Message) -> Result<Processed, E2eError> {
        if self.processed_set.contains(&message.id.0) {
            return Err(E2eError::SeenBefore);
        }
        let parsed = iim_e2ee::GroupMessage::from_bytes(&message.body)?;
        let routed = iim_proto::group_of(&message.to).map(ToString::to_string);
        if parsed.is_welcome() {
            let joined = self.join(message, routed.as_deref());
            if joined.is_ok() {
                self.processed_one(message.id.0);
            }
            return joined;
        }
        if routed
            .as_deref()
            .is_some_and(|g| !self.device.groups().any(|mine| mine == g))
        {
            // A commit before this device was added (the one that adds it comes to it too),
            // or anything after it was removed.
            return Err(match parsed.is_application() {
                true => E2eError::NotInGroup(routed.unwrap_or_default()),
                false => E2eError::NotForThisDevice,
            });
        }
        if parsed.group() != routed {
            return Err(E2eError::Mismatch(format!(
                "sealed for group {:?} but sent to {routed:?}",
                parsed.group()
            )));
        }
        let processed = self.device.process(&message.body)?;
        self.processed_one(message.id.0);
        let sender = match &processed {
            Processed::Application { sender, .. } => Some(sender),
            Processed::Commit { committer, .. } => Some(committer),
            _ => None,
        };
        let from = format!("{}/{}", message.from, message.from_device);
        if let Some(sender) = sender
            && *sender != from
        {
            return Err(E2eError::Mismatch(format!(
                "sent by {sender} in the group but delivered as from {from}"
            )));
        }
        Ok(processed)
    }

    /// Joins the group of a welcome routed through `routed`: sent by the device the host says
    /// sent it, and naming only members whose signature keys are those of the cards this
    /// device pinned (a member with no card pinned: [`E2eError::UnknownSender`]; fetch that
    /// user's cards and process the welcome again, which the attempt did not spend).
    fn join(&mut self, message: &Message, routed: Option<&str>) -> Result<Processed, E2eError> {
        // Kept to undo a join refused: the attempt spends the welcome's key package.
        let before = self.device.to_bytes()?;
        let pinned = &self.pinned;
        let mut unknown = None;
        let joined = self
            .device
            .join_checked(&message.body, &mut |member, key| match pinned.get(member) {
                Some(card) if card.signature_key() == key => Ok(()),
                Some(_) => Err(iim_e2ee::Error::BadKeyPackage(format!(
                    "the welcome gives {member} a key other than its pinned card's"
                ))),
                None => {
                    unknown = Some(member.to_owned());
                    Err(iim_e2ee::Error::UnknownMember(member.to_owned()))
                }
            });
        let (group, sender) = match joined {
            Ok(joined) => joined,
            // Every member gets the group's welcomes: most are for the devices added.
            Err(iim_e2ee::Error::NotForThisDevice) => return Err(E2eError::NotForThisDevice),
            Err(e) => {
                self.device = iim_e2ee::Device::from_bytes(&before)?;
                return Err(match unknown {
                    Some(member) => {
                        let (user, device) = member.split_once('/').unwrap_or((&member, ""));
                        E2eError::UnknownSender {
                            user: user.to_owned(),
                            device: device.to_owned(),
                        }
                    }
                    None => e.into(),
                });
            }
        };
        let from = format!("{}/{}", message.from, message.from_device);
        let refused = if routed != Some(group.as_str()) {
            Some(format!(
                "a welcome to group {group} came through {routed:?}"
            ))
        } else if sender != from {
            Some(format!("a welcome from {sender} delivered as from {from}"))
        } else {
            None
        };
        if let Some(reason) = refused {
            // Not joined after all.
            self.device = iim_e2ee::Device::from_bytes(&before)?;
            return Err(E2eError::Mismatch(reason));
        }
        Ok(Processed::Joined { group })
    }

    fn remember(&mut self, nonce: [u8; 16], id: u64) {
        if self.seen.insert(nonce, id).is_none() {
            self.nonces.push_back(nonce);
        }
        while self.nonces.len() > NONCES_KEPT {
            if let Some(old) = self.nonces.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    fn processed_one(&mut self, id: u64) {
        if self.processed_set.insert(id) {
            self.processed.push_back(id);
        }
        while self.processed.len() > NONCES_KEPT {
            if let Some(old) = self.processed.pop_front() {
                self.processed_set.remove(&old);
            }
        }
    }
}

/// The message kind of the key directory's requests and replies.
pub fn keys_kind() -> MessageKind {
    MessageKind::Custom(KEYS_KIND.into())
}

/// The key directory's reply in `message`, if it is one meant for `device` (replies go to
/// every device of the user; each names the device that asked).
pub fn keys_reply(message: &Message, device: &DeviceId) -> Option<KeysReply> {
    let to_self = matches!(message.to.as_slice(), [Address::User(u)] if *u == message.from);
    if message.kind != keys_kind() || !to_self {
        return None;
    }
    KeysReply::from_json(&message.body)
        .ok()
        .filter(|reply| reply.device == device.as_str())
}

/// A whole `claim` answer.
#[derive(Debug, Clone, Default)]
pub struct Claimed {
    /// The key packages taken, with their devices' cards.
    pub packages: Vec<ClaimedPackage>,
    /// The devices (`user/device`) that had no card or no key package left.
    pub missing: Vec<String>,
}

/// The key packages of a whole `claim` answer, once its last part came: `None` while parts
/// are missing.
pub fn claimed_of(parts: &[KeysReply]) -> Option<Result<Claimed, E2eError>> {
    let mut packages = Vec::new();
    for part in parts {
        match &part.answer {
            Answer::Claimed {
                packages: some,
                missing,
                more,
                unanswered,
            } => {
                packages.extend(some.iter().cloned());
                if !more {
                    let mut missing = missing.clone();
                    missing.extend(unanswered.iter().cloned());
                    return Some(Ok(Claimed { packages, missing }));
                }
            }
            Answer::Refused { reason } => return Some(Err(E2eError::Directory(reason.clone()))),
            _ => {}
        }
    }
    None
}

/// The cards of a whole `cards` answer, once its last part came: `None` while parts are
/// missing. Users left unanswered are an error (asking for fewer at a time would do).
pub fn cards_of(parts: &[KeysReply]) -> Option<Result<Vec<CardEntry>, E2eError>> {
    let mut cards = Vec::new();
    for part in parts {
        match &part.answer {
            Answer::Cards {
                cards: some,
                more,
                unanswered,
            } => {
                cards.extend(some.iter().cloned());
                if !more {
                    if !unanswered.is_empty() {
                        return Some(Err(E2eError::Directory(format!(
                            "the directory had no room for the cards of {unanswered:?}"
                        ))));
                    }
                    return Some(Ok(cards));
                }
            }
            Answer::Refused { reason } => return Some(Err(E2eError::Directory(reason.clone()))),
            _ => {}
        }
    }
    None
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::new(name).expect("user")
    }

    fn keyring(dir: &Path, who: &str) -> Keyring {
        let (u, d) = who.split_once('/').expect("user/device");
        Keyring::open_or_create(
            &dir.join(format!("{u}-{d}.keys")),
            &user(u),
            &DeviceId::new(d).expect("device"),
            1,
        )
        .expect("keyring")
    }

    fn entry(keyring: &Keyring) -> CardEntry {
        let card = keyring.device.identity().card().expect("card");
        CardEntry {
            user: card.user().into(),
            device: card.device().into(),
            card: Base64(card.to_bytes().expect("bytes")),
        }
    }

    fn delivered(from: &str, to: &[&str], body: Vec<u8>) -> Message {
        Message {
            id: iim_proto::MessageId(7),
            kind: MessageKind::Chat,
            from: user(from),
            from_device: DeviceId::new("phone").expect("device"),
            to: to.iter().map(|u| Address::User(user(u))).collect(),
            sent_at: 1,
            body,
        }
    }

    #[test]
    fn a_message_opens_on_every_device_of_the_addressee_and_the_sender_s_others_once() {
        let dir = tempfile::tempdir().expect("dir");
        let mut alice = keyring(dir.path(), "alice/phone");
        let mut alice_laptop = keyring(dir.path(), "alice/laptop");
        let mut bob = keyring(dir.path(), "bob/phone");
        let mut bob_laptop = keyring(dir.path(), "bob/laptop");
        let current = [
            entry(&alice),
            entry(&alice_laptop),
            entry(&bob),
            entry(&bob_laptop),
        ];
        let news = alice.accept_cards(&current);
        assert!(
            matches!(&news[0], CardNews::Known { .. }),
            "its own: {news:?}"
        );
        assert!(news[1..].iter().all(|n| matches!(n, CardNews::New { .. })));
        let (body, to) = alice
            .seal(&[user("bob")], &current, b"hello bob")
            .expect("seal");
        assert_eq!(
            to,
            vec![Address::User(user("bob")), Address::User(user("alice"))]
        );
        assert!(is_end_to_end(&body));
        let message = delivered("alice", &["bob", "alice"], body);
        let mut replayed = message.clone();
        replayed.id = iim_proto::MessageId(8);
        for reader in [&mut bob, &mut bob_laptop, &mut alice_laptop] {
            assert!(matches!(
                reader.open(&message),
                Err(E2eError::UnknownSender { .. })
            ));
            reader.accept_cards(&current);
            let opened = reader.open(&message).expect("opens");
            assert_eq!(opened.plaintext, b"hello bob");
            // Delivered again (the same message): opens again; the same body in another
            // message: a replay.
            reader.open(&message).expect("delivered again");
            let again = reader.open(&replayed).expect_err("replayed");
            assert!(matches!(again, E2eError::Replayed) && again.is_tampering());
        }

        // Saved and read back: the nonces too.
        bob.save().expect("save");
        let mut bob = keyring(dir.path(), "bob/phone");
        assert!(matches!(bob.open(&replayed), Err(E2eError::Replayed)));
        bob.open(&message).expect("delivered again");
        let other = Keyring::open_or_create(
            &dir.path().join("bob-phone.keys"),
            &user("bob"),
            &DeviceId::new("tablet").expect("device"),
            1,
        );
        assert!(matches!(other, Err(E2eError::OtherDevice { .. })));
    }

    #[test]
    fn an_altered_or_rerouted_body_and_a_changed_key_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let mut alice = keyring(dir.path(), "alice/phone");
        let mut bob = keyring(dir.path(), "bob/phone");
        let current = [entry(&alice), entry(&bob)];
        alice.accept_cards(&current);
        bob.accept_cards(&current);
        let (body, _) = alice.seal(&[user("bob")], &current, b"hi").expect("seal");

        let mut altered = body.clone();
        let middle = altered.len() / 2;
        altered[middle] ^= 1;
        let e = bob
            .open(&delivered("alice", &["bob"], altered))
            .expect_err("altered");
        assert!(e.is_tampering(), "{e}");
        let e = bob
            .open(&delivered("alice", &["bob", "carol"], body.clone()))
            .expect_err("rerouted");
        assert!(matches!(e, E2eError::Mismatch(_)), "{e}");
        let e = bob
            .open(&delivered("carol", &["bob"], body.clone()))
            .expect_err("from someone else");
        assert!(matches!(e, E2eError::Mismatch(_)), "{e}");
        bob.open(&delivered("alice", &["bob"], body))
            .expect("the untouched body opens");

        // Bob's phone gets new keys: alice's keyring refuses to seal to it until trusted.
        let _ = std::fs::remove_file(dir.path().join("bob-phone.keys"));
        let new_bob = keyring(dir.path(), "bob/phone");
        let current = [entry(&alice), entry(&new_bob)];
        let news = alice.accept_cards(&current);
        assert!(matches!(&news[1], CardNews::Changed { .. }), "{news:?}");
        let e = alice
            .seal(&[user("bob")], &current, b"hi")
            .expect_err("changed");
        assert!(matches!(e, E2eError::KeyChanged { .. }), "{e}");
        alice.trust("bob/phone").expect("trust");
        alice.seal(&[user("bob")], &current, b"hi").expect("sealed");
        let e = alice
            .seal(&[user("carol")], &current, b"hi")
            .expect_err("no cards");
        assert!(matches!(e, E2eError::NoDevices(_)), "{e}");
    }
}
