//! Recovery after `kill -9`: how long a host killed with many messages waiting in inboxes
//! takes to serve again, and to hand every waiting message over.
//!
//! A chat-only host is filled with `messages` chat messages to `users` offline recipients
//! (each answered Accepted, hence durable), then killed with SIGKILL and started again on the
//! same data directory. Measured: the restart (kill, start, store opened, plugins loaded,
//! messages accepted before the kill routed again, listening), the first login answered
//! after it, and the drain (every recipient logs in and takes its whole backlog,
//! acknowledging it).

use anyhow::{Context, bail};
use iim_client::Connection;
use iim_client::proto::{DeviceId, MessageKind, SessionMode, UserId};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;
use tokio::task::JoinSet;

/// Figures of one recovery run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    /// Messages waiting at the kill.
    pub messages: u32,
    /// Recipients they wait for.
    pub users: u32,
    /// Filling: accepted messages per second.
    pub fill_msgs_per_s: f64,
    /// Kill to listening again, in ms.
    pub restart_ms: f64,
    /// Kill to the first login answered, in ms.
    pub first_login_ms: f64,
    /// From the recipients' logins to their last backlog message acknowledged, in s.
    pub drain_secs: f64,
    /// Backlog messages handed over per second.
    pub drain_msgs_per_s: f64,
}

/// Senders filling the inboxes, and submissions each keeps in flight.
const SENDERS: u32 = 8;
const WINDOW: u32 = 32;

/// Runs the measurement.
pub async fn run(messages: u32, users: u32) -> anyhow::Result<Figures> {
    let mut host = crate::iim_run::start_host().await?;
    let mut recipients = Vec::new();
    for i in 0..users {
        recipients.push(host.register(&format!("r{i}")).await?);
    }
    let recipients = Arc::new(recipients);

    let started = Instant::now();
    let next = Arc::new(AtomicU32::new(0));
    let mut fill = JoinSet::new();
    for i in 0..SENDERS {
        let sender = host.register(&format!("s{i}")).await?;
        let conn = Arc::new(host.connect().await?);
        let device = DeviceId::new("bench")?;
        conn.login(&sender, iim_e2e::PASSWORD, &device, SessionMode::SendOnly)
            .await?;
        for _ in 0..WINDOW {
            let (conn, next, recipients) = (
                Arc::clone(&conn),
                Arc::clone(&next),
                Arc::clone(&recipients),
            );
            fill.spawn(async move { submit_until(conn, next, messages, recipients).await });
        }
    }
    while let Some(done) = fill.join_next().await {
        done.context("a sender failed")??;
    }
    let fill_secs = started.elapsed().as_secs_f64();
    eprintln!("recovery: {messages} messages accepted in {fill_secs:.1} s; kill -9");

    let killed = Instant::now();
    tokio::task::block_in_place(|| host.restart())?;
    let restart_ms = killed.elapsed().as_secs_f64() * 1000.0;
    let first = host.connect().await?;
    first
        .login(
            &recipients[0],
            iim_e2e::PASSWORD,
            &DeviceId::new("first")?,
            SessionMode::SendOnly,
        )
        .await?;
    let first_login_ms = killed.elapsed().as_secs_f64() * 1000.0;
    first.close().await;
    eprintln!("recovery: listening after {restart_ms:.0} ms; draining");

    let drain_started = Instant::now();
    let host = Arc::new(host);
    let mut drain = JoinSet::new();
    for user in recipients.iter() {
        let user = user.clone();
        let host = Arc::clone(&host);
        drain.spawn(async move {
            let (conn, backlog) = host.online(&user, "phone").await?;
            conn.close().await;
            anyhow::Ok(backlog.len())
        });
    }
    let mut drained = 0;
    while let Some(done) = drain.join_next().await {
        drained += done.context("a recipient failed")??;
    }
    let drain_secs = drain_started.elapsed().as_secs_f64();
    if drained != messages as usize {
        bail!("{drained} messages handed over after the restart, {messages} accepted before");
    }
    Ok(Figures {
        messages,
        users,
        fill_msgs_per_s: f64::from(messages) / fill_secs,
        restart_ms,
        first_login_ms,
        drain_secs,
        drain_msgs_per_s: f64::from(messages) / drain_secs,
    })
}

/// Submits message after message, to the recipients in turn, until `messages` are taken.
async fn submit_until(
    conn: Arc<Connection>,
    next: Arc<AtomicU32>,
    messages: u32,
    recipients: Arc<Vec<UserId>>,
) -> anyhow::Result<()> {
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= messages {
            return Ok(());
        }
        let to = &recipients[n as usize % recipients.len()];
        let body = format!("waiting message {n}");
        conn.submit(
            iim_client::new_client_id(),
            MessageKind::Chat,
            std::slice::from_ref(to),
            body.as_bytes(),
        )
        .await
        .with_context(|| format!("submitting message {n}"))?;
    }
}

/// Prints the figures as a table.
pub fn print(f: &Figures) {
    println!(
        "recovery after kill -9 with {} messages waiting for {} offline users",
        f.messages, f.users
    );
    println!(
        "fill (accepted, durable)       {:>10.1} msgs/s",
        f.fill_msgs_per_s
    );
    println!("kill to listening again        {:>10.1} ms", f.restart_ms);
    println!(
        "kill to first login answered   {:>10.1} ms",
        f.first_login_ms
    );
    println!(
        "drain: all backlogs delivered  {:>10.2} s ({:.1} msgs/s)",
        f.drain_secs, f.drain_msgs_per_s
    );
}
