//! `Register`, `Login`, `Authenticate`, `Logout`, and `Account`: what a user does with their
//! own account (change the password, list and revoke devices, delete it).

use super::Refusal;
use crate::Host;
use crate::accounts::{self, PasswordError};
use crate::clock::now_ms;
use crate::hashing::HashingError;
use crate::iim::Home;
use crate::network::NetworkError;
use crate::plugin::{AccountDeletion, Subscription};
use crate::store::UserRecord;
use iim_proto::session::{Authenticated, Identity};
use iim_proto::{
    AccountOp, DeviceId, DeviceInfo, ErrorCode, MessageKind, RequestId, ServerFrame, UserId,
};

fn auth_failed() -> Refusal {
    Refusal::new(ErrorCode::AUTH_FAILED, "wrong user name or password")
}

/// The refusal of a hash or check the hashers did not make: a full queue is `rate_limited`
/// with the time to wait (the client is told, not left waiting past its patience).
fn not_hashed(e: HashingError) -> Refusal {
    match e {
        HashingError::Busy { .. } => {
            tracing::info!(%e, "password check refused: the hashing queue is full");
            Refusal::new(ErrorCode::RATE_LIMITED, e.to_string())
        }
        HashingError::Failed => Refusal::new(ErrorCode::INTERNAL, e.to_string()),
    }
}

/// Creates an account.
pub async fn register(host: &Host, user: &UserId, password: String) -> Result<(), Refusal> {
    if host.iim.exists(user)? {
        return Err(Refusal::new(
            ErrorCode::USER_EXISTS,
            format!("user {user} exists"),
        ));
    }
    // The rules first: a password they refuse does not wait for a hasher.
    accounts::check_password(&password)
        .map_err(|e| Refusal::new(ErrorCode::INVALID_ARGUMENT, e.to_string()))?;
    let hash = host
        .passwords
        .hash(password)
        .await
        .map_err(not_hashed)?
        .map_err(|e| match e {
            PasswordError::Hash(_) => Refusal::new(ErrorCode::INTERNAL, e.to_string()),
            _ => Refusal::new(ErrorCode::INVALID_ARGUMENT, e.to_string()),
        })?;
    // In a network, the name must be free in every host: the exchange's directory decides,
    // and this host becomes the user's home.
    if let Some(network) = &host.network {
        match network.claim(user.clone()).await {
            Ok(home) if home == network.server() => {}
            Ok(home) => {
                return Err(Refusal::new(
                    ErrorCode::USER_EXISTS,
                    format!("user {user} exists (on host {home})"),
                ));
            }
            Err(NetworkError::Unavailable(reason)) => {
                return Err(Refusal::new(
                    ErrorCode::UNAVAILABLE,
                    format!("cannot register now: {reason}; try again later"),
                ));
            }
            Err(NetworkError::Store(e)) => return Err(e.into()),
        }
    }
    let record = UserRecord {
        password_hash: hash,
        created_at: now_ms(),
    };
    if !host.store.accounts.create(user, &record)? {
        return Err(Refusal::new(
            ErrorCode::USER_EXISTS,
            format!("user {user} exists"),
        ));
    }
    host.store.flush().await?;
    tracing::info!(%user, "registered");
    Ok(())
}

/// The redirect for a user whose home is another host of the network, if it is.
fn redirect(host: &Host, user: &UserId) -> Result<Option<Authenticated>, Refusal> {
    let Some(Home::Remote(server)) = host.iim.home(user)? else {
        return Ok(None);
    };
    let addr = host
        .iim
        .directory()
        .and_then(|directory| directory.server_info(&server))
        .map(|info| info.addr);
    match addr {
        Some(addr) => Ok(Some(Authenticated::Redirect { server, addr })),
        None => Err(Refusal::new(
            ErrorCode::UNAVAILABLE,
            format!(
                "the home host {server} of {user} is not in this host's registry yet; try again later"
            ),
        )),
    }
}

/// Checks the password and issues a new token for `device`, replacing its old one; or
/// redirects a user whose home is another host there.
pub async fn login(
    host: &Host,
    user: &UserId,
    password: String,
    device: &DeviceId,
) -> Result<Authenticated, Refusal> {
    if let Some(redirect) = redirect(host, user)? {
        return Ok(redirect);
    }
    // An unknown user is checked against a hash nobody's password matches, so that a wrong
    // user name costs the same time (and the same place in the queue) as a wrong password.
    let record = host.store.accounts.get(user)?;
    let known = record.is_some();
    let stored = record.map_or_else(|| DUMMY_HASH.to_owned(), |r| r.password_hash);
    let matches = host
        .passwords
        .verify(stored, password)
        .await
        .map_err(not_hashed)?;
    if !(known && matches) {
        return Err(auth_failed());
    }
    let token = accounts::new_token();
    host.store
        .accounts
        .set_token(user, device, &accounts::token_hash(&token))?;
    host.store.accounts.touch(user, device, now_ms(), true)?;
    host.store.flush().await?;
    Ok(Authenticated::LoggedIn { token })
}

/// A valid argon2id hash of a password nobody has, for the timing of unknown users.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0eDaQdb1Pn/cm3T3xqAPGhcIvwAQkIVQuJK1d8kLZOk";

/// Checks a device token; or redirects a user whose home is another host there.
pub fn authenticate(
    host: &Host,
    user: &UserId,
    device: &DeviceId,
    token: &str,
) -> Result<Authenticated, Refusal> {
    if let Some(redirect) = redirect(host, user)? {
        return Ok(redirect);
    }
    let stored = host.store.accounts.token(user, device)?;
    match stored {
        Some(hash) if accounts::same_hash(&hash, &accounts::token_hash(token)) => {
            // Not flushed: a last activity lost in a crash is an earlier one.
            host.store.accounts.touch(user, device, now_ms(), false)?;
            Ok(Authenticated::TokenAccepted)
        }
        _ => Err(Refusal::new(
            ErrorCode::AUTH_FAILED,
            "the token is not valid for this user and device; log in again",
        )),
    }
}

/// Revokes `device`'s token and ends its delivery session, if another connection has one.
pub async fn logout(host: &Host, user: &UserId, device: &DeviceId) -> Result<(), Refusal> {
    host.store.accounts.remove_token(user, device)?;
    host.store.flush().await?;
    host.registry.kick_device(
        user,
        device,
        ErrorCode::LOGGED_OUT,
        "this device logged out",
    );
    Ok(())
}

/// Checks `password` against `user`'s (the hashers' queue, as a login): for the requests that
/// ask for it again.
async fn check_password(host: &Host, user: &UserId, password: String) -> Result<(), Refusal> {
    let Some(record) = host.store.accounts.get(user)? else {
        return Err(auth_failed());
    };
    let matches = host
        .passwords
        .verify(record.password_hash, password)
        .await
        .map_err(not_hashed)?;
    if matches {
        Ok(())
    } else {
        Err(Refusal::new(ErrorCode::AUTH_FAILED, "wrong password"))
    }
}

/// Changes the password, lists or revokes devices ([`AccountOp`], but deletion: [`delete`]).
pub async fn manage(
    host: &Host,
    req: RequestId,
    who: &Identity,
    op: AccountOp,
) -> Result<ServerFrame, Refusal> {
    let user = &who.user;
    match op {
        AccountOp::ChangePassword { old, new } => {
            accounts::check_password(&new)
                .map_err(|e| Refusal::new(ErrorCode::INVALID_ARGUMENT, e.to_string()))?;
            check_password(host, user, old).await?;
            let hash = host
                .passwords
                .hash(new)
                .await
                .map_err(not_hashed)?
                .map_err(|e| Refusal::new(ErrorCode::INTERNAL, e.to_string()))?;
            if !host.store.accounts.set_password(user, hash)? {
                return Err(auth_failed());
            }
            // Whoever knew the old password may have logged a device in with it: every other
            // device logs in again, with the new one.
            let others: Vec<DeviceId> = host
                .store
                .accounts
                .devices(user)?
                .into_iter()
                .map(|(device, _)| device)
                .filter(|device| device != &who.device)
                .collect();
            for device in &others {
                host.store.accounts.remove_token(user, device)?;
            }
            host.store.flush().await?;
            host.registry.kick_others(
                user,
                &who.device,
                ErrorCode::REVOKED,
                "the account's password changed; log in again",
            );
            tracing::info!(%user, revoked = others.len(), "password changed");
            Ok(ServerFrame::Ok { req })
        }
        AccountOp::Devices => {
            let sessions = host.registry.connections(user);
            let devices = host
                .store
                .accounts
                .devices(user)?
                .into_iter()
                .map(|(device, record)| DeviceInfo {
                    sessions: sessions.get(&device).copied().unwrap_or(0),
                    device,
                    logged_in_at: record.logged_in_at,
                    last_active_at: record.last_active_at,
                })
                .collect();
            Ok(ServerFrame::Devices { req, devices })
        }
        AccountOp::Revoke(device) => {
            if host.store.accounts.token(user, &device)?.is_none() {
                return Err(Refusal::new(
                    ErrorCode::INVALID_ARGUMENT,
                    format!("{user} has no device {device}"),
                ));
            }
            host.store.accounts.remove_token(user, &device)?;
            // It receives nothing more: pruning no longer waits for it.
            host.store.cursors.remove(user, &device)?;
            host.store.flush().await?;
            host.registry.kick_device(
                user,
                &device,
                ErrorCode::REVOKED,
                &format!("this device was revoked by {}", who.device),
            );
            tracing::info!(%user, %device, by = %who.device, "device revoked");
            Ok(ServerFrame::Ok { req })
        }
        AccountOp::Delete { .. } => Err(Refusal::new(
            ErrorCode::INTERNAL,
            "an account's deletion out of its place",
        )),
    }
}

/// Deletes `who`'s account and what the store keeps of it, once the password is given again
/// ([`crate::store::Store::delete_user`]), with the notices to the plugins that keep things
/// for users (recorded in the same flush, so that a crash still tells them), then the bytes of
/// its files; every session of the account ends, and the plugins are told. In a network the
/// exchange is asked to release the name.
pub async fn delete(host: &Host, who: &Identity, password: String) -> Result<(), Refusal> {
    let user = &who.user;
    check_password(host, user, password).await?;
    let files = host.store.delete_user(user)?;
    let deletion = AccountDeletion {
        id: host.store.messages.new_id()?,
        user: user.clone(),
        at: now_ms(),
    };
    let plugins = host
        .plugins
        .subscribers(&Subscription::Message(MessageKind::Custom(
            iim_proto::body::ACCOUNT_DELETED_KIND.into(),
        )));
    host.store
        .accounts
        .notice_deletion(deletion.id.0, user, deletion.at, &plugins)?;
    // In a network the exchange releases the name: asked once the deletion is durable, and
    // again until it answers (the record is written with the deletion).
    if let Some(network) = &host.network {
        network.release_later(user)?;
    }
    host.store.flush().await?;
    for sha256 in &files {
        let id = crate::blobs::FileId::from_digest(sha256);
        if let Err(e) = host.blobs.remove(&id) {
            tracing::error!(error = %e, file = %id, "a deleted account's file forgotten but its bytes not removed");
        }
    }
    host.registry
        .kick_user(user, ErrorCode::ACCOUNT_DELETED, "the account was deleted");
    tracing::info!(%user, files = files.len(), plugins = plugins.len(), "account deleted");
    host.plugins.tell_deleted(&deletion, &plugins).await;
    Ok(())
}
