//! `iim account`: what a user does with their own account: change the password, list and
//! revoke devices, delete the account (`docs/protocol.md`, "Accounts").

use super::{Cli, print_result, profile_dir, session};
use anyhow::{Context, bail};
use clap::Subcommand;
use iim_client::proto::{DeviceId, SessionMode};

/// What to do with the account of the profile's login.
#[derive(Debug, Subcommand)]
pub(crate) enum AccountCommand {
    /// Change the password. Your other devices are logged out (their tokens revoked, their
    /// sessions ended) and log in again with the new one; this device stays logged in.
    Password {
        /// The password now.
        #[arg(long, env = "IIM_PASSWORD")]
        old: String,
        /// The new password (at least 8 characters).
        #[arg(long, env = "IIM_NEW_PASSWORD")]
        new: String,
    },
    /// List your devices: when each last logged in and was last active, and how many
    /// sessions it has open now.
    Devices,
    /// Revoke a device: its token is revoked, its sessions end at once and it receives
    /// nothing more until it logs in again with the password.
    Revoke {
        /// The device, as `devices` lists it.
        device: DeviceId,
    },
    /// Delete your account with what the host keeps of it: devices, inbox, relations (also
    /// your name in others' lists), the files you uploaded, what plugins keep for you (push
    /// tokens, published keys, group memberships). Your name may then be registered
    /// again, on any host of the network. This cannot be undone.
    Delete {
        /// The password, asked again.
        #[arg(long, env = "IIM_PASSWORD")]
        password: String,
        /// Confirms the deletion; without it nothing is deleted.
        #[arg(long)]
        yes: bool,
    },
}

/// Runs `iim account …`.
pub(crate) async fn run(cli: &Cli, op: &AccountCommand) -> anyhow::Result<()> {
    if let AccountCommand::Delete { yes: false, .. } = op {
        bail!("deleting the account cannot be undone: add --yes to confirm");
    }
    let dir = profile_dir(cli)?;
    let (conn, profile) = session(cli, SessionMode::SendOnly).await?;
    let user = &profile.user;
    match op {
        AccountCommand::Password { old, new } => {
            conn.change_password(old, new).await?;
            print_result(cli, serde_json::json!({ "password_changed": user }), || {
                format!("changed the password of {user}; your other devices must log in again")
            });
        }
        AccountCommand::Devices => {
            let devices = conn.devices().await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!(
                        devices
                            .iter()
                            .map(|d| serde_json::json!({
                                "device": d.device,
                                "logged_in_at": d.logged_in_at,
                                "last_active_at": d.last_active_at,
                                "sessions": d.sessions,
                                "this": d.device == profile.device,
                            }))
                            .collect::<Vec<_>>()
                    )
                );
            } else {
                for d in &devices {
                    let this = if d.device == profile.device {
                        " (this one)"
                    } else {
                        ""
                    };
                    let now = if d.sessions > 0 {
                        format!("online, {} session(s)", d.sessions)
                    } else {
                        "offline".to_owned()
                    };
                    println!(
                        "{}{this}  {now}  last active {}  logged in {}",
                        d.device,
                        when(d.last_active_at),
                        when(d.logged_in_at),
                    );
                }
            }
        }
        AccountCommand::Revoke { device } => {
            // Its card leaves the key directory first (while this device may still ask, if it
            // is the one revoked): nobody seals messages to it any more.
            super::e2e::unpublish(&conn, user, device.as_str()).await;
            conn.revoke_device(device).await?;
            if device == &profile.device {
                forget_login(&dir)?;
                super::e2e::forget_keys(&dir)?;
            }
            print_result(cli, serde_json::json!({ "revoked": device }), || {
                format!("revoked device {device} of {user}")
            });
        }
        AccountCommand::Delete { password, .. } => {
            conn.delete_account(password).await?;
            forget_login(&dir)?;
            super::e2e::forget_keys(&dir)?;
            print_result(cli, serde_json::json!({ "deleted": user }), || {
                format!("deleted the account {user}")
            });
        }
    }
    conn.close().await;
    Ok(())
}

/// How long ago `ms` (a Unix time in milliseconds) was, for people.
fn when(ms: u64) -> String {
    if ms == 0 {
        return "unknown".to_owned();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86_400 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

/// The login is gone: the profile's token no longer opens anything.
fn forget_login(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::remove_file(dir.join("profile.json"))
        .with_context(|| format!("cannot remove the profile in {}", dir.display()))
}
