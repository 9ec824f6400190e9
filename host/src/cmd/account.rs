//! `Register`, `Login`, `Authenticate`, `Logout`.

use super::Refusal;
use crate::Host;
use crate::accounts::{self, PasswordError};
use crate::clock::now_ms;
use crate::iim::Home;
use crate::network::NetworkError;
use crate::store::UserRecord;
use iim_proto::session::Authenticated;
use iim_proto::{DeviceId, ErrorCode, UserId};

fn auth_failed() -> Refusal {
    Refusal::new(ErrorCode::AUTH_FAILED, "wrong user name or password")
}

/// Runs a password hash or check on a blocking thread, at most `max_hashing` at once.
async fn hashing<T: Send + 'static>(
    host: &Host,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Refusal> {
    let internal = || Refusal::new(ErrorCode::INTERNAL, "password hashing failed");
    let _permit = host.hashing.acquire().await.map_err(|_| internal())?;
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        tracing::error!(error = %e, "password hashing task failed");
        internal()
    })
}

/// Creates an account.
pub async fn register(host: &Host, user: &UserId, password: String) -> Result<(), Refusal> {
    if host.iim.exists(user)? {
        return Err(Refusal::new(
            ErrorCode::USER_EXISTS,
            format!("user {user} exists"),
        ));
    }
    let hash = hashing(host, move || accounts::hash_password(&password))
        .await?
        .map_err(|e| match e {
            PasswordError::Hash(_) => Refusal::new(ErrorCode::INTERNAL, e.to_string()),
            _ => Refusal::new(ErrorCode::INVALID_ARGUMENT, e.to_string()),
        })?;
    // In a network, the name must be free in every host: the exchange's directory decides,
    // and this host becomes the user's home.
    if let Some(network) = &host.network {
        match network.claim(user).await {
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
    let Some(record) = host.store.accounts.get(user)? else {
        // Hash anyway, so that a wrong user name costs the same time as a wrong password.
        let _ =
            tokio::task::spawn_blocking(move || accounts::verify_password(DUMMY_HASH, &password))
                .await;
        return Err(auth_failed());
    };
    let ok = tokio::task::spawn_blocking(move || {
        accounts::verify_password(&record.password_hash, &password)
    })
    .await
    .unwrap_or(false);
    if !ok {
        return Err(auth_failed());
    }
    let token = accounts::new_token();
    host.store
        .accounts
        .set_token(user, device, &accounts::token_hash(&token))?;
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
