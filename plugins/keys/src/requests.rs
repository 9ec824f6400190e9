//! The four requests: each checked in full before anything changes, so a refused one changes
//! nothing.

use crate::answer::{self, Part, Request};
use crate::store;
use crate::{MAX_CARD, MAX_DEVICES, MAX_KEY_PACKAGE, MAX_NAMES, MAX_PACKAGES_PER_REQUEST};
use crate::{MAX_NAME, MAX_WAITING, MAX_WAITING_PER_USER};
use iim_plugin_sdk::body::keys::{Answer, Base64, CardEntry, ClaimedPackage, KeysRequest};
use iim_plugin_sdk::{HostError, PluginError};

/// Why a request is not carried out.
#[derive(Debug)]
pub enum Failure {
    /// Refused, for this reason: the device is told with a `refused` reply, and the event is
    /// handled (`ok`), so that the reply is sent.
    Refused(String),
    /// The plugin failed: the event is retried.
    Plugin(PluginError),
}

impl From<PluginError> for Failure {
    fn from(e: PluginError) -> Self {
        Failure::Plugin(e)
    }
}

impl From<HostError> for Failure {
    fn from(e: HostError) -> Self {
        Failure::Plugin(e.into())
    }
}

fn refused<T>(reason: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::Refused(reason.into()))
}

/// Carries out `request`, and answers it unless it is refused.
pub fn carry_out(request: Request<'_>) -> Result<(), Failure> {
    let message = request.message;
    if !matches!(message.to.as_slice(), [only] if *only == message.sender) {
        return refused(format!(
            "a keys request is addressed to its sender's own user, {}, and to no one else",
            message.sender
        ));
    }
    match KeysRequest::from_json(&message.body) {
        Ok(KeysRequest::Publish { card, key_packages }) => publish(request, card, key_packages),
        Ok(KeysRequest::Unpublish { device }) => unpublish(request, device),
        Ok(KeysRequest::Cards { users }) => cards(request, users),
        Ok(KeysRequest::Claim { devices }) => claim(request, devices),
        Err(e) => refused(format!("not a keys request: {e}")),
    }
}

/// Stores the requesting device's card and adds its key packages.
fn publish(request: Request<'_>, card: Base64, packages: Vec<Base64>) -> Result<(), Failure> {
    let (user, device) = (request.user(), request.device());
    if card.0.is_empty() || card.0.len() > MAX_CARD {
        return refused(format!(
            "a card is 1 to {MAX_CARD} bytes; this one is {}",
            card.0.len()
        ));
    }
    if packages.len() > MAX_PACKAGES_PER_REQUEST {
        return refused(format!(
            "at most {MAX_PACKAGES_PER_REQUEST} key packages per request; this one has {}",
            packages.len()
        ));
    }
    if let Some((i, package)) = packages
        .iter()
        .enumerate()
        .find(|(_, p)| p.0.is_empty() || p.0.len() > MAX_KEY_PACKAGE)
    {
        return refused(format!(
            "a key package is 1 to {MAX_KEY_PACKAGE} bytes; key_packages[{i}] is {}",
            package.0.len()
        ));
    }
    let waiting = store::waiting(user, device)?;
    if waiting + packages.len() > MAX_WAITING {
        return refused(format!(
            "{user}/{device} has {waiting} key packages waiting, and at most {MAX_WAITING} may \
             wait: publish at most {} more",
            MAX_WAITING - waiting.min(MAX_WAITING)
        ));
    }
    let of_user = store::waiting_of_user(user)?;
    if of_user + packages.len() > MAX_WAITING_PER_USER {
        return refused(format!(
            "{user}'s devices have {of_user} key packages waiting, and at most \
             {MAX_WAITING_PER_USER} may wait for one user: publish at most {} more",
            MAX_WAITING_PER_USER - of_user.min(MAX_WAITING_PER_USER)
        ));
    }
    if store::card(user, device)?.is_none() {
        let devices = store::devices(user)?;
        if devices.len() >= MAX_DEVICES {
            return refused(format!(
                "{user} has published the cards of {} devices, the most: unpublish one first",
                devices.len()
            ));
        }
    }
    store::set_card(user, device, &card.0)?;
    let packages: Vec<Vec<u8>> = packages.into_iter().map(|p| p.0).collect();
    store::add_packages(user, device, &packages)?;
    request.reply(Answer::Published {
        key_packages: u32::try_from(waiting + packages.len()).unwrap_or(u32::MAX),
    })?;
    Ok(())
}

/// Removes a device of the requesting user from the directory: the one named, or the
/// requesting device itself.
fn unpublish(request: Request<'_>, device: Option<String>) -> Result<(), Failure> {
    let device = device.unwrap_or_else(|| request.device().to_owned());
    if !valid_name(&device) {
        return refused(format!("{device:?} is not a device name"));
    }
    let removed = store::remove_device(request.user(), &device)?;
    iim_plugin_sdk::debug!(
        "{}/{device} unpublished by {}, with {removed} key packages",
        request.user(),
        request.device()
    );
    request.reply(Answer::Unpublished { removed: device })?;
    Ok(())
}

/// Answers with the cards of every device of `users`.
fn cards(request: Request<'_>, users: Vec<String>) -> Result<(), Failure> {
    let users = distinct(users, "users", |user| {
        valid_name(user)
            .then_some(())
            .ok_or_else(|| format!("{user:?} is not a user name"))
    })?;
    let mut entries = Vec::new();
    for user in &users {
        for (device, card) in store::cards(user)? {
            entries.push(CardEntry {
                user: user.clone(),
                device,
                card: Base64(card),
            });
        }
    }
    answer::in_parts(
        request,
        &entries,
        |entry| entry.user.clone(),
        |part: Part<CardEntry>| Answer::Cards {
            cards: part.items,
            more: !part.last,
            unanswered: part.unanswered,
        },
    )?;
    Ok(())
}

/// Takes one key package of each of `devices` (`user/device`) and answers with them.
fn claim(request: Request<'_>, devices: Vec<String>) -> Result<(), Failure> {
    let devices = distinct(devices, "devices", |named| match named.split_once('/') {
        Some((user, device)) if valid_name(user) && valid_name(device) => Ok(()),
        _ => Err(format!("{named:?} is not user/device")),
    })?;
    let (mut packages, mut keys, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for named in devices {
        let Some((user, device)) = named.split_once('/') else {
            continue;
        };
        let found = match store::card(user, device)? {
            Some(card) => store::oldest_package(user, device)?.map(|found| (card, found)),
            None => None,
        };
        match found {
            Some((card, (key, package))) => {
                packages.push(ClaimedPackage {
                    user: user.to_owned(),
                    device: device.to_owned(),
                    card: Base64(card),
                    key_package: Base64(package),
                });
                keys.push(key);
            }
            None => missing.push(named),
        }
    }
    let sent = answer::in_parts(
        request,
        &packages,
        |package| format!("{}/{}", package.user, package.device),
        |part: Part<ClaimedPackage>| Answer::Claimed {
            packages: part.items,
            missing: if part.last {
                missing.clone()
            } else {
                Vec::new()
            },
            more: !part.last,
            unanswered: part.unanswered,
        },
    )?;
    // Only what went: a device left unanswered keeps its package for the next claim.
    for key in &keys[..sent] {
        store::take_package(key)?;
    }
    Ok(())
}

/// `names` without repeats, in their order: at most [`MAX_NAMES`] (repeats counted), each
/// passing `check`.
fn distinct(
    names: Vec<String>,
    what: &str,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<Vec<String>, Failure> {
    if names.len() > MAX_NAMES {
        return refused(format!(
            "at most {MAX_NAMES} {what} per request; this one names {}",
            names.len()
        ));
    }
    let mut seen = Vec::with_capacity(names.len());
    for name in names {
        if let Err(reason) = check(&name) {
            return refused(reason);
        }
        if !seen.contains(&name) {
            seen.push(name);
        }
    }
    Ok(seen)
}

/// Whether `name` is a user or device name: 1 to 64 bytes of `a-z 0-9 . _ -` (as the host
/// has it). Names become storage keys, so nothing else (no `/`) may pass.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}
