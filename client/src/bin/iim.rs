//! `iim`: the iim command-line client.
//!
//! `login` keeps the server, the certificate, the user, the device and its token in the
//! profile directory; every later command uses them.

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use iim_client::proto::{DeviceId, Message, MessageKind, RelationKind, SessionMode, UserId};
use iim_client::{ClientConfig, Connection, Event};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const DEFAULT_SERVER: &str = "127.0.0.1:7447";
/// Where a host started with its defaults in this directory keeps its certificate.
const DEV_CA: &str = "iim-data/cert.pem";

/// iim command-line client.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Host address [default: the profile's, else 127.0.0.1:7447].
    #[arg(long, global = true, env = "IIM_SERVER")]
    server: Option<SocketAddr>,
    /// PEM certificate to trust [default: the profile's, else ./iim-data/cert.pem].
    #[arg(long, global = true, env = "IIM_CA")]
    ca: Option<PathBuf>,
    /// Profile directory holding the login [default: ~/.iim].
    #[arg(long, global = true, env = "IIM_PROFILE")]
    profile: Option<PathBuf>,
    /// Print JSON (one object per line for `listen`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create an account.
    Register {
        /// User name: lowercase letters, digits, '.', '_', '-'.
        user: UserId,
        /// Password (at least 8 characters).
        #[arg(long, env = "IIM_PASSWORD")]
        password: String,
    },
    /// Log in and keep the device's token in the profile.
    Login {
        /// User name.
        user: UserId,
        /// Password.
        #[arg(long, env = "IIM_PASSWORD")]
        password: String,
        /// Device name [default: the profile's, else a new one].
        #[arg(long)]
        device: Option<DeviceId>,
    },
    /// Manage friends.
    Friend {
        #[command(subcommand)]
        op: RelationCommand,
    },
    /// Manage colleagues.
    Colleague {
        #[command(subcommand)]
        op: RelationCommand,
    },
    /// Send a chat message; prints the accepted message id.
    Send {
        /// Recipient.
        to: UserId,
        /// Text.
        text: String,
    },
    /// Stay connected and print every message as it arrives.
    Listen,
    /// Revoke this device's token and forget the login.
    Logout,
}

#[derive(Debug, Subcommand)]
enum RelationCommand {
    /// Add a user.
    Add {
        /// The user.
        user: UserId,
    },
    /// Remove a user.
    Remove {
        /// The user.
        user: UserId,
    },
    /// List the users.
    List,
}

/// What `login` remembers.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Profile {
    server: SocketAddr,
    ca: PathBuf,
    user: UserId,
    device: DeviceId,
    token: String,
}

fn profile_dir(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &cli.profile {
        return Ok(dir.clone());
    }
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("no HOME; pass --profile DIR"))?;
    Ok(PathBuf::from(home).join(".iim"))
}

fn load_profile(dir: &Path) -> anyhow::Result<Option<Profile>> {
    let path = dir.join("profile.json");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!("{} is not a valid profile", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn save_profile(dir: &Path, profile: &Profile) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("profile.json");
    let tmp = dir.join("profile.json.tmp");
    let json = serde_json::to_vec_pretty(profile)?;
    write_private(&tmp, &json).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents)
}

/// Where to connect and what to trust: flags, then the profile, then the defaults.
fn target(cli: &Cli, profile: Option<&Profile>) -> anyhow::Result<(SocketAddr, PathBuf)> {
    let server = match (cli.server, profile) {
        (Some(server), _) => server,
        (None, Some(p)) => p.server,
        (None, None) => DEFAULT_SERVER.parse()?,
    };
    let ca = match (&cli.ca, profile) {
        (Some(ca), _) => ca.clone(),
        (None, Some(p)) => p.ca.clone(),
        (None, None) if Path::new(DEV_CA).exists() => PathBuf::from(DEV_CA),
        (None, None) => bail!(
            "no certificate to trust: pass --ca with the host's cert.pem \
             (a host started with its defaults keeps it in iim-data/cert.pem)"
        ),
    };
    let ca = std::path::absolute(&ca).unwrap_or(ca);
    Ok((server, ca))
}

async fn connect(server: SocketAddr, ca: &Path) -> anyhow::Result<Connection> {
    let config = ClientConfig::new(server).with_ca_file(ca)?;
    Ok(Connection::connect(&config).await?)
}

/// Connects and authenticates with the profile's token.
async fn session(cli: &Cli, mode: SessionMode) -> anyhow::Result<(Connection, Profile)> {
    let dir = profile_dir(cli)?;
    let profile = load_profile(&dir)?
        .ok_or_else(|| anyhow!("not logged in: run `iim login USER --password PW` first"))?;
    let (server, ca) = target(cli, Some(&profile))?;
    let conn = connect(server, &ca).await?;
    conn.authenticate(&profile.user, &profile.device, &profile.token, mode)
        .await
        .context("the saved login was refused; run `iim login` again")?;
    Ok((conn, profile))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Register { user, password } => {
            let dir = profile_dir(&cli)?;
            let (server, ca) = target(&cli, load_profile(&dir)?.as_ref())?;
            let conn = connect(server, &ca).await?;
            conn.register(user, password).await?;
            print_result(&cli, serde_json::json!({ "registered": user }), || {
                format!("registered {user}")
            });
            conn.close().await;
        }
        Command::Login {
            user,
            password,
            device,
        } => {
            let dir = profile_dir(&cli)?;
            let old = load_profile(&dir)?;
            let (server, ca) = target(&cli, old.as_ref())?;
            let device = match (device, &old) {
                (Some(device), _) => device.clone(),
                (None, Some(old)) if &old.user == user => old.device.clone(),
                (None, _) => DeviceId::new(format!("cli-{:08x}", rand::random::<u32>()))?,
            };
            let conn = connect(server, &ca).await?;
            let token = conn
                .login(user, password, &device, SessionMode::SendOnly)
                .await?;
            save_profile(
                &dir,
                &Profile {
                    server,
                    ca,
                    user: user.clone(),
                    device: device.clone(),
                    token,
                },
            )?;
            print_result(
                &cli,
                serde_json::json!({ "user": user, "device": device }),
                || format!("logged in as {user} on device {device}"),
            );
            conn.close().await;
        }
        Command::Friend { op } => relation(&cli, RelationKind::Friend, op).await?,
        Command::Colleague { op } => relation(&cli, RelationKind::Colleague, op).await?,
        Command::Send { to, text } => {
            let (conn, _) = session(&cli, SessionMode::SendOnly).await?;
            let accepted = conn.send_text(to, text).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({ "id": accepted.id.0, "sent_at": accepted.sent_at })
                );
            } else {
                println!("{}", accepted.id);
            }
            conn.close().await;
        }
        Command::Listen => listen(&cli).await?,
        Command::Logout => {
            let dir = profile_dir(&cli)?;
            let (conn, profile) = session(&cli, SessionMode::SendOnly).await?;
            conn.logout().await?;
            std::fs::remove_file(dir.join("profile.json"))
                .with_context(|| format!("cannot remove the profile in {}", dir.display()))?;
            print_result(
                &cli,
                serde_json::json!({ "logged_out": profile.user }),
                || format!("logged out {}", profile.user),
            );
        }
    }
    Ok(())
}

async fn relation(cli: &Cli, kind: RelationKind, op: &RelationCommand) -> anyhow::Result<()> {
    let (conn, _) = session(cli, SessionMode::SendOnly).await?;
    match op {
        RelationCommand::Add { user } => {
            conn.add_relation(kind, user).await?;
            print_result(
                cli,
                serde_json::json!({ "added": user, "kind": kind.to_string() }),
                || format!("added {user} as a {kind}"),
            );
        }
        RelationCommand::Remove { user } => {
            conn.remove_relation(kind, user).await?;
            print_result(
                cli,
                serde_json::json!({ "removed": user, "kind": kind.to_string() }),
                || format!("removed {user} from your {kind}s"),
            );
        }
        RelationCommand::List => {
            let users = conn.relations(kind).await?;
            if cli.json {
                println!("{}", serde_json::json!(users));
            } else {
                for user in users {
                    println!("{user}");
                }
            }
        }
    }
    conn.close().await;
    Ok(())
}

async fn listen(cli: &Cli) -> anyhow::Result<()> {
    let (conn, profile) = session(cli, SessionMode::Receive).await?;
    if !cli.json {
        eprintln!("listening as {} on device {}", profile.user, profile.device);
    }
    loop {
        let event = tokio::select! {
            event = conn.next_event() => event,
            _ = tokio::signal::ctrl_c() => {
                conn.close().await;
                return Ok(());
            }
        };
        match event {
            Some(Ok(Event::Message { seq, message })) => {
                print_message(cli.json, &message);
                conn.ack(seq).await?;
            }
            Some(Ok(Event::Synced { count })) => {
                if cli.json {
                    println!(
                        "{}",
                        serde_json::json!({ "kind": "synced", "count": count })
                    );
                } else {
                    eprintln!("({count} waiting message(s) delivered; now live)");
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the connection ended"),
        }
    }
}

fn print_message(json: bool, message: &Message) {
    let body = String::from_utf8_lossy(&message.body);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "kind": message.kind.to_string(),
                "id": message.id.0,
                "from": message.from,
                "from_device": message.from_device,
                "to": message.to,
                "body": body,
                "sent_at": message.sent_at,
            })
        );
    } else {
        let label = match &message.kind {
            MessageKind::Chat => String::new(),
            other => format!("[{other}] "),
        };
        println!(
            "{} {}: {label}{body}  (#{})",
            format_time(message.sent_at),
            message.from,
            message.id
        );
    }
}

/// `HH:MM:SS` UTC of a Unix time in milliseconds.
fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

fn print_result(cli: &Cli, json: serde_json::Value, text: impl FnOnce() -> String) {
    if cli.json {
        println!("{json}");
    } else {
        println!("{}", text());
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("iim: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iim: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
