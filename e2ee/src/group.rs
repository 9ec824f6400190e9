//! Groups: MLS (RFC 9420) through openmls, one [`Device`] holding all of a device's groups.
//!
//! Every MLS message on the wire is `MAGIC_MLS ‖ MLSMessage` (TLS presentation language, as
//! RFC 9420 defines it): commits, welcomes, application messages and key packages alike.

use std::collections::BTreeMap;

use openmls::group::{
    MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig, PURE_CIPHERTEXT_WIRE_FORMAT_POLICY,
    StagedWelcome, WelcomeError,
};
use openmls::prelude::{
    BasicCredential, ContentType, Credential, DeserializeBytes, GroupId, KeyPackage,
    MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, OpenMlsProvider, ProcessedMessageContent,
    ProtocolMessage, ProtocolVersion,
};
use openmls_rust_crypto::OpenMlsRustCrypto;
use serde::{Deserialize, Serialize};

use crate::identity::check_name;
use crate::{
    CIPHERSUITE, DeviceCard, DeviceIdentity, Error, MAGIC_MLS, MAX_GROUP_NAME, MAX_PAST_EPOCHS,
    MAX_PLAINTEXT, Result, decode, encode, strip_magic,
};

/// The first bytes of a saved [`Device`].
const MAGIC_DEVICE: &[u8; 8] = b"iim-dev\x01";
/// At most this many key packages at once.
const MAX_KEY_PACKAGES: usize = 1000;

/// A group (MLS) body, parsed, not yet processed.
#[derive(Debug)]
pub struct GroupMessage {
    // Boxed: an MLS message is large on the stack (its variants hold whole structures).
    body: Box<MlsMessageBodyIn>,
}

impl GroupMessage {
    /// Parses `MAGIC_MLS ‖ MLSMessage`; trailing bytes are an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let message = MlsMessageIn::tls_deserialize_exact_bytes(strip_magic(bytes, MAGIC_MLS)?)
            .map_err(|_| Error::Malformed("mls message"))?;
        Ok(Self {
            body: Box::new(message.extract()),
        })
    }

    /// The group a commit or an application message is for; `None` for a welcome (encrypted
    /// to its new members) or a key package.
    pub fn group(&self) -> Option<String> {
        let id = match self.body.as_ref() {
            MlsMessageBodyIn::PrivateMessage(m) => m.group_id(),
            MlsMessageBodyIn::PublicMessage(m) => m.group_id(),
            _ => return None,
        };
        String::from_utf8(id.as_slice().to_vec()).ok()
    }

    /// Whether this is an application message (what a member wrote), rather than a commit, a
    /// welcome or a key package. The content type is visible (MLS encrypts only the content).
    pub fn is_application(&self) -> bool {
        let content_type = match self.body.as_ref() {
            MlsMessageBodyIn::PrivateMessage(m) => m.content_type(),
            MlsMessageBodyIn::PublicMessage(m) => m.content_type(),
            _ => return false,
        };
        content_type == ContentType::Application
    }

    /// Whether this is a welcome, for [`Device::join`].
    pub fn is_welcome(&self) -> bool {
        matches!(*self.body, MlsMessageBodyIn::Welcome(_))
    }
}

/// What [`Device::process`] made of a group body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// An application message from another member.
    Application {
        /// The group.
        group: String,
        /// `"user/device"` of the sender, authenticated by MLS.
        sender: String,
        /// The message.
        plaintext: Vec<u8>,
    },
    /// A commit, merged: the group is at a new epoch.
    Commit {
        /// The group.
        group: String,
        /// `"user/device"` of the committer.
        committer: String,
        /// Devices added.
        added: Vec<String>,
        /// Devices removed. If this device is one of them, its group is gone.
        removed: Vec<String>,
    },
    /// This device joined a group through a welcome.
    Joined {
        /// The group.
        group: String,
    },
    /// A message this device sent itself, come back (nothing to do).
    Own {
        /// The group.
        group: String,
    },
}

/// The saved form of a [`Device`], after its magic.
#[derive(Serialize, Deserialize)]
struct DeviceFile {
    identity: Vec<u8>,
    groups: Vec<String>,
    /// openmls's storage: every group's state and the unused key packages' secrets.
    storage: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The whole e2e state of a device: its identity, the secrets of its unused key packages and
/// every group it is in. Saved with [`to_bytes`](Self::to_bytes) after each change, it lets a
/// restarted client continue its groups.
pub struct Device {
    identity: DeviceIdentity,
    provider: OpenMlsRustCrypto,
    groups: BTreeMap<String, MlsGroup>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("identity", &self.identity)
            .field("groups", &self.groups.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Device {
    /// A device in no group yet.
    pub fn new(identity: DeviceIdentity) -> Self {
        Self {
            identity,
            provider: OpenMlsRustCrypto::default(),
            groups: BTreeMap::new(),
        }
    }

    /// This device's keys (for 1:1 messages and its card).
    pub fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    /// `n` fresh key packages (each `MAGIC_MLS ‖ MLSMessage`), one-time, for the key directory;
    /// their secrets stay in this device until a welcome uses them.
    pub fn key_packages(&mut self, n: usize) -> Result<Vec<Vec<u8>>> {
        if n > MAX_KEY_PACKAGES {
            return Err(Error::TooLarge("key packages"));
        }
        (0..n)
            .map(|_| {
                let bundle = KeyPackage::builder()
                    .build(
                        CIPHERSUITE,
                        &self.provider,
                        self.identity.signer(),
                        self.identity.credential(),
                    )
                    .map_err(mls)?;
                frame(MlsMessageOut::from(bundle.key_package().clone()))
            })
            .collect()
    }

    /// Creates group `name` with this device as its only member (and its committer).
    pub fn create_group(&mut self, name: &str) -> Result<()> {
        check_group_name(name)?;
        if self.groups.contains_key(name) {
            return Err(Error::GroupExists(name.to_owned()));
        }
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .build();
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            self.identity.signer(),
            &config,
            GroupId::from_slice(name.as_bytes()),
            self.identity.credential(),
        )
        .map_err(mls)?;
        self.groups.insert(name.to_owned(), group);
        Ok(())
    }

    /// Adds devices to `group`, each given as the card the client accepted and a key package
    /// the key directory handed out for it; the key package must be that device's (same
    /// identity and signature key). Returns `(commit, welcome)`: the commit for the current
    /// members, the welcome for the new ones. The commit is merged here at once.
    pub fn add(
        &mut self,
        group: &str,
        members: &[(DeviceCard, Vec<u8>)],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let mut key_packages = Vec::with_capacity(members.len());
        for (card, bytes) in members {
            key_packages.push(self.check_key_package(card, bytes)?);
        }
        let mls_group = self.groups.get_mut(group).ok_or_else(|| unknown(group))?;
        let (commit, welcome, _) = mls_group
            .add_members(&self.provider, self.identity.signer(), &key_packages)
            .map_err(mls)?;
        mls_group
            .merge_pending_commit(&self.provider)
            .map_err(mls)?;
        Ok((frame(commit)?, frame(welcome)?))
    }

    /// Removes devices (by `"user/device"`) from `group`; returns the commit for the members,
    /// merged here at once. The removed devices cannot open anything sent after it.
    pub fn remove(&mut self, group: &str, devices: &[String]) -> Result<Vec<u8>> {
        let mls_group = self.groups.get_mut(group).ok_or_else(|| unknown(group))?;
        let mut leaves = Vec::with_capacity(devices.len());
        for device in devices {
            let leaf = mls_group
                .members()
                .find(|member| identity_of(&member.credential).ok().as_ref() == Some(device))
                .ok_or_else(|| Error::UnknownMember(device.clone()))?;
            leaves.push(leaf.index);
        }
        let (commit, _, _) = mls_group
            .remove_members(&self.provider, self.identity.signer(), &leaves)
            .map_err(mls)?;
        mls_group
            .merge_pending_commit(&self.provider)
            .map_err(mls)?;
        frame(commit)
    }

    /// Joins the group a welcome is for; returns its name.
    pub fn join(&mut self, welcome: &[u8]) -> Result<String> {
        self.join_checked(welcome, &mut |_, _| Ok(()))
            .map(|(name, _)| name)
    }

    /// Joins the group a welcome is for, as [`join`](Self::join) does, once `check` accepted
    /// every member the welcome names, by `"user/device"` and signature key (the client
    /// compares them with the cards it accepted); returns the group's name and the
    /// `"user/device"` of the member who sent the welcome. Refused by `check`, the device joins
    /// nothing (the key package the welcome used is spent all the same).
    pub fn join_checked(
        &mut self,
        welcome: &[u8],
        check: &mut dyn FnMut(&str, &[u8]) -> Result<()>,
    ) -> Result<(String, String)> {
        let MlsMessageBodyIn::Welcome(welcome) = *GroupMessage::from_bytes(welcome)?.body else {
            return Err(Error::Unexpected("not a welcome"));
        };
        let config = MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .build();
        let staged = StagedWelcome::new_from_welcome(&self.provider, &config, welcome, None)
            .map_err(|e| match e {
                WelcomeError::NoMatchingKeyPackage => Error::NotForThisDevice,
                e => mls(e),
            })?;
        let name = group_name(staged.group_context().group_id())?;
        if self.groups.contains_key(&name) {
            return Err(Error::GroupExists(name));
        }
        for member in staged.members() {
            check(&identity_of(&member.credential)?, &member.signature_key)?;
        }
        let sender = identity_of(staged.welcome_sender().map_err(mls)?.credential())?;
        let group = staged.into_group(&self.provider).map_err(mls)?;
        self.groups.insert(name.clone(), group);
        Ok((name, sender))
    }

    /// The members of `group`, as `"user/device"`, each with its signature key.
    pub fn members_with_keys(&self, group: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mls_group = self.groups.get(group).ok_or_else(|| unknown(group))?;
        mls_group
            .members()
            .map(|member| Ok((identity_of(&member.credential)?, member.signature_key)))
            .collect()
    }

    /// Encrypts an application message for `group`.
    pub fn encrypt(&mut self, group: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(Error::TooLarge("plaintext"));
        }
        let mls_group = self.groups.get_mut(group).ok_or_else(|| unknown(group))?;
        let message = mls_group
            .create_message(&self.provider, self.identity.signer(), plaintext)
            .map_err(mls)?;
        frame(message)
    }

    /// Processes a group body: an application message, a commit (merged at once: the host
    /// delivers a group's messages in one order and only one device commits) or a welcome.
    ///
    /// A device's own application message coming back gives [`Processed::Own`]; its own commit
    /// coming back is an error (it was merged when made, the group is past its epoch), so the
    /// host should not echo a device's bodies to it. Who may commit is not checked here:
    /// [`Processed::Commit`] names the committer for the client to compare with the group's
    /// creator.
    pub fn process(&mut self, body: &[u8]) -> Result<Processed> {
        let message: ProtocolMessage = match *GroupMessage::from_bytes(body)?.body {
            MlsMessageBodyIn::PrivateMessage(m) => m.into(),
            MlsMessageBodyIn::PublicMessage(m) => m.into(),
            MlsMessageBodyIn::Welcome(_) => {
                return self.join(body).map(|group| Processed::Joined { group });
            }
            _ => return Err(Error::Unexpected("key package or group info")),
        };
        let name = group_name(message.group_id())?;
        let mls_group = self.groups.get_mut(&name).ok_or_else(|| unknown(&name))?;
        let processed = mls_group
            .process_message(&self.provider, message)
            .map_err(mls)?;
        let sender = identity_of(processed.credential())?;
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(message) => Ok(Processed::Application {
                group: name,
                sender,
                plaintext: message.into_bytes(),
            }),
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let mut added = staged
                    .add_proposals()
                    .map(|add| {
                        identity_of(add.add_proposal().key_package().leaf_node().credential())
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut removed = staged
                    .remove_proposals()
                    .map(|remove| {
                        let leaf = remove.remove_proposal().removed();
                        let credential = mls_group
                            .member(leaf)
                            .ok_or_else(|| Error::Mls(format!("no member at leaf {leaf:?}")))?;
                        identity_of(credential)
                    })
                    .collect::<Result<Vec<_>>>()?;
                // openmls's order is not the commit's: sorted, the result is deterministic.
                added.sort();
                removed.sort();
                let self_removed = staged.self_removed();
                mls_group
                    .merge_staged_commit(&self.provider, *staged)
                    .map_err(mls)?;
                if self_removed {
                    // Nothing more will open: forget the group's secrets.
                    if let Some(mut gone) = self.groups.remove(&name) {
                        gone.delete(self.provider.storage()).map_err(mls)?;
                    }
                }
                Ok(Processed::Commit {
                    group: name,
                    committer: sender,
                    added,
                    removed,
                })
            }
            ProcessedMessageContent::OwnPendingCommit
            | ProcessedMessageContent::OwnPrivateMessage => Ok(Processed::Own { group: name }),
            ProcessedMessageContent::ProposalMessage(_)
            | ProcessedMessageContent::ExternalJoinProposalMessage(_) => {
                Err(Error::Unexpected("proposal"))
            }
        }
    }

    /// The members of `group`, as `"user/device"`.
    pub fn members(&self, group: &str) -> Result<Vec<String>> {
        let mls_group = self.groups.get(group).ok_or_else(|| unknown(group))?;
        mls_group
            .members()
            .map(|member| identity_of(&member.credential))
            .collect()
    }

    /// The current epoch of `group` (0 at creation, one more per commit).
    pub fn epoch(&self, group: &str) -> Result<u64> {
        let mls_group = self.groups.get(group).ok_or_else(|| unknown(group))?;
        Ok(mls_group.epoch().as_u64())
    }

    /// The groups this device is in.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }

    /// The whole state, versioned, for a file only this device's user may read (it holds the
    /// identity's secrets and the groups' current secrets).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let storage = self
            .provider
            .storage()
            .values
            .read()
            .map_err(|_| Error::Crypto("storage lock poisoned".into()))?
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        let file = DeviceFile {
            identity: self.identity.to_bytes()?,
            groups: self.groups.keys().cloned().collect(),
            storage,
        };
        let mut bytes = MAGIC_DEVICE.to_vec();
        bytes.extend(encode(&file, "device state")?);
        Ok(bytes)
    }

    /// Reads what [`to_bytes`](Self::to_bytes) wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let file: DeviceFile = decode(strip_magic(bytes, MAGIC_DEVICE)?, "device state")?;
        let identity = DeviceIdentity::from_bytes(&file.identity)?;
        let provider = OpenMlsRustCrypto::default();
        provider
            .storage()
            .values
            .write()
            .map_err(|_| Error::Crypto("storage lock poisoned".into()))?
            .extend(file.storage);
        let mut groups = BTreeMap::new();
        for name in file.groups {
            check_group_name(&name)?;
            let group = MlsGroup::load(provider.storage(), &GroupId::from_slice(name.as_bytes()))
                .map_err(|_| Error::Malformed("device state: group"))?
                .ok_or(Error::Malformed("device state: group missing"))?;
            groups.insert(name, group);
        }
        Ok(Self {
            identity,
            provider,
            groups,
        })
    }

    /// The key package in `bytes`, verified, and checked to be the device of `card`.
    fn check_key_package(&self, card: &DeviceCard, bytes: &[u8]) -> Result<KeyPackage> {
        let refuse = |why: &str| Error::BadKeyPackage(format!("{}: {why}", card.identity()));
        let MlsMessageBodyIn::KeyPackage(key_package) = *GroupMessage::from_bytes(bytes)?.body
        else {
            return Err(refuse("not a key package"));
        };
        let key_package = key_package
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .map_err(|e| refuse(&e.to_string()))?;
        if key_package.ciphersuite() != CIPHERSUITE {
            return Err(refuse("another ciphersuite"));
        }
        let leaf = key_package.leaf_node();
        if identity_of(leaf.credential())? != card.identity() {
            return Err(refuse("another identity"));
        }
        if leaf.signature_key().as_slice() != card.signature_key() {
            return Err(refuse("another signature key"));
        }
        Ok(key_package)
    }
}

/// `MAGIC_MLS ‖ message`.
fn frame(message: MlsMessageOut) -> Result<Vec<u8>> {
    let mut bytes = MAGIC_MLS.to_vec();
    bytes.extend(message.to_bytes().map_err(mls)?);
    Ok(bytes)
}

/// `"user/device"` of a credential, which must be a basic one of that form.
fn identity_of(credential: &Credential) -> Result<String> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| Error::Malformed("credential: not basic"))?;
    let identity = std::str::from_utf8(basic.identity())
        .map_err(|_| Error::Malformed("credential identity"))?;
    let (user, device) = identity
        .split_once('/')
        .ok_or(Error::Malformed("credential identity"))?;
    check_name(user)?;
    check_name(device)?;
    Ok(identity.to_owned())
}

/// A group's name from its MLS group id.
fn group_name(id: &GroupId) -> Result<String> {
    let name =
        String::from_utf8(id.as_slice().to_vec()).map_err(|_| Error::Malformed("group id"))?;
    check_group_name(&name)?;
    Ok(name)
}

/// A group name is 1 to 128 bytes of UTF-8 without control characters.
fn check_group_name(name: &str) -> Result<()> {
    if (1..=MAX_GROUP_NAME).contains(&name.len()) && !name.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(Error::InvalidName(
            name.chars().take(MAX_GROUP_NAME + 1).collect(),
        ))
    }
}

fn unknown(group: &str) -> Error {
    Error::UnknownGroup(group.to_owned())
}

/// openmls's errors are many types; what the caller needs is that the operation failed.
fn mls(error: impl std::fmt::Display) -> Error {
    Error::Mls(error.to_string())
}
