//! `iim push register TOKEN` and `iim push unregister`: this device's push notifications, asked
//! of the host's push plugin, which answers with a `push` message (`docs/plugins.md`, "push").
//!
//! As `iim group` does, the command opens the device's delivery session for a moment (taking it
//! from an `iim listen` of the same profile, which takes it back after) and waits a bounded time
//! for the answer naming this device; it acknowledges only while everything that came was its
//! own, so that `listen` loses nothing (see `group.rs`).

use super::deliveries::{AnswerTimeout, DeliveryLock};
use super::{Cli, profile_dir, saved_login, session};
use anyhow::{anyhow, bail};
use clap::Subcommand;
use iim_client::proto::body::{PUSH_KIND, PushReply, PushRequest};
use iim_client::proto::{ErrorCode, MessageKind, SessionMode, UserId};
use iim_client::{ClientError, Event};
use std::time::Duration;
use tokio::time::Instant;

/// `iim push`: the subcommand and how long to wait for the answer.
#[derive(Debug, clap::Args)]
pub(crate) struct PushArgs {
    #[command(flatten)]
    timeout: AnswerTimeout,
    #[command(subcommand)]
    op: PushCommand,
}

/// What to ask of the push plugin, for this device.
#[derive(Debug, Subcommand)]
pub(crate) enum PushCommand {
    /// Be notified through the host's push gateway when a message waits and none of your
    /// devices is online. TOKEN is what the phone's platform gave the app (an APNs device
    /// token or an FCM registration token, as the host's gateway takes); registering again
    /// replaces it.
    Register {
        /// The device's push token.
        token: String,
        /// Be notified whenever this device is not online, also while another of your devices
        /// is (a phone, while your laptop is connected).
        #[arg(long)]
        always: bool,
    },
    /// Stop being notified.
    Unregister,
}

/// Runs `iim push`.
pub(crate) async fn run(cli: &Cli, args: &PushArgs) -> anyhow::Result<()> {
    let timeout = args.timeout.duration();
    let deadline = Instant::now() + timeout;
    let dir = profile_dir(cli)?;
    saved_login(&dir)?;
    let lock = DeliveryLock::take(&dir, deadline).await?;
    let request = match &args.op {
        PushCommand::Register { token, always } => PushRequest::Register {
            token: token.clone(),
            always: *always,
        },
        PushCommand::Unregister => PushRequest::Unregister,
    };
    let body = request.to_json();
    let client_id = iim_client::new_client_id();
    loop {
        lock.mark()?;
        let (conn, profile) = session(cli, SessionMode::Receive).await?;
        let kind = MessageKind::Custom(PUSH_KIND.into());
        let submitted = conn.submit(
            client_id,
            kind.clone(),
            std::slice::from_ref(&profile.user),
            &body,
        );
        let lost = match tokio::time::timeout_at(deadline, submitted).await {
            Err(_) => bail!("the host did not take the request within {timeout:?}"),
            Ok(Err(e)) if e.code() == Some(ErrorCode::UNSUPPORTED_KIND) => {
                bail!("this host has no push plugin ({e})")
            }
            Ok(Err(e)) => Some(e),
            Ok(Ok(_)) => None,
        };
        let outcome = match lost {
            Some(e) => Err(e),
            None => {
                answer(
                    &conn,
                    &profile.user,
                    profile.device.as_str(),
                    &kind,
                    deadline,
                )
                .await
            }
        };
        match outcome {
            Ok(Some(reply)) => {
                conn.close().await;
                return print(cli.json, reply);
            }
            Ok(None) => {
                conn.close().await;
                bail!(
                    "no answer from the push plugin within {} s (is it loaded? `iim-host admin \
                     plugins`)",
                    timeout.as_secs()
                );
            }
            // Lost, or a reconnecting `listen` took the deliveries back: ask again (the same
            // client id: the host takes a repeat as the same request).
            Err(e)
                if Instant::now() < deadline
                    && (e.is_transient() || e.code() == Some(ErrorCode::SESSION_REPLACED)) =>
            {
                drop(conn);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until `deadline` for the push plugin's answer about `me`'s `device`; `None` if none
/// came.
async fn answer(
    conn: &iim_client::Connection,
    me: &UserId,
    device: &str,
    kind: &MessageKind,
    deadline: Instant,
) -> Result<Option<PushReply>, ClientError> {
    let mut others = 0;
    loop {
        let Ok(event) = tokio::time::timeout_at(deadline, conn.next_event()).await else {
            return Ok(None);
        };
        let (seq, message) = match event {
            Some(Ok(Event::Message { seq, message })) => (seq, message),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e),
            None => return Err(ClientError::ConnectionLost("the connection ended".into())),
        };
        let reply = (message.kind == *kind)
            .then(|| PushReply::from_json(&message.body).ok())
            .flatten()
            .filter(|reply| match reply {
                PushReply::Registered { device: d }
                | PushReply::Unregistered { device: d }
                | PushReply::Refused { device: d, .. } => d == device,
            });
        // The presence snapshot a session of `me` gets as it opens (see `group.rs`).
        let own_snapshot = message.kind == MessageKind::Presence && message.from == *me;
        if reply.is_none() && !own_snapshot {
            others += 1;
        }
        if others == 0 {
            // Not needed for the answer: if it fails, `listen` shows one line more.
            let _ = conn.ack(seq).await;
        }
        if reply.is_some() {
            return Ok(reply);
        }
    }
}

/// Prints the answer, or fails with the plugin's reason.
fn print(json: bool, reply: PushReply) -> anyhow::Result<()> {
    if json {
        println!("{}", String::from_utf8_lossy(&reply.to_json()));
    }
    match reply {
        PushReply::Registered { device } => {
            if !json {
                println!("registered for push: {device}");
            }
            Ok(())
        }
        PushReply::Unregistered { device } => {
            if !json {
                println!("unregistered from push: {device}");
            }
            Ok(())
        }
        PushReply::Refused { reason, .. } => Err(anyhow!("refused: {reason}")),
    }
}
