//! `iim`: the iim command-line client.
//!
//! `login` keeps the server, the certificate, the user, the device and its token in the
//! profile directory; every later command uses them.
//!
//! In a network of hosts every user has a home host, and any other host answers a login with a
//! redirect there. Every command that logs in or authenticates follows it (through the
//! library), says so on stderr, and keeps the home host's address in the profile, with the
//! address that redirected: the next command goes straight to the home host, also when
//! `--server` names the host that redirected. `register` is never redirected: the host an
//! account is registered at becomes its home.
//!
//! `send-file` and `download` move files on streams of their own, through a device that
//! reconnects by itself (as `listen` does): a transfer cut off goes on from where it stopped,
//! from what the host kept of an upload or from the `.part` file of a download.
//!
//! A message goes to users or to one group (`#team`). `group` asks the groups plugin and
//! waits for its answer, which comes as a message (`group.rs`); `show.rs` is how `listen`
//! shows each message. `chat` is a conversation in the terminal on one such device
//! (`chat.rs`).

// The binary's modules live in `iim/`, beside this file, which stays where the crate's
// `[[bin]]` and the documents name it.
#[path = "iim/account.rs"]
mod account;
#[path = "iim/chat.rs"]
mod chat;
#[path = "iim/deliveries.rs"]
mod deliveries;
#[path = "iim/e2e.rs"]
mod e2e;
#[path = "iim/group.rs"]
mod group;
#[path = "iim/push.rs"]
mod push;
#[path = "iim/show.rs"]
mod show;

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use iim_client::proto::body::{FILE_KIND, ReadReport};
use iim_client::proto::file::Sha256;
use iim_client::proto::session::Backoff;
use iim_client::proto::{
    Address, DeviceId, ErrorCode, MessageId, MessageKind, RelationKind, SessionMode, UserId,
};
use iim_client::{
    ClientConfig, ClientError, Connection, Credentials, Device, NetworkProfile, Update,
};
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
    /// Host address [default: the profile's, else 127.0.0.1:7447]. After a host redirected the
    /// profile's login, the profile keeps the home host it named, and that is asked.
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
    #[command(flatten)]
    link: LinkArgs,
    #[command(subcommand)]
    command: Command,
}

/// How the connection spends keep-alives: a profile, and each of its timeouts overridden.
#[derive(Debug, clap::Args)]
struct LinkArgs {
    /// `desktop`: a keep-alive after 10 s of quiet, idle timeout 30 s, a host taken for gone
    /// 5 s after an unanswered keep-alive. `mobile`: 25 s, 60 s and 10 s, for fewer radio
    /// wake-ups on battery. The host's `limits.idle_timeout_secs` (60 s unless configured)
    /// caps the idle timeout.
    #[arg(
        long,
        global = true,
        env = "IIM_NETWORK_PROFILE",
        value_name = "PROFILE",
        default_value = "desktop"
    )]
    network_profile: NetworkProfile,
    /// Seconds of quiet before a keep-alive [default: the profile's].
    #[arg(long, global = true, value_name = "SECS")]
    keep_alive: Option<u64>,
    /// Seconds without a packet from the host after which the connection is over [default:
    /// the profile's].
    #[arg(long, global = true, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Seconds a keep-alive may go unanswered before the host is taken for gone and the
    /// client reconnects [default: the profile's].
    #[arg(long, global = true, value_name = "SECS")]
    dead_host_after: Option<u64>,
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
    /// Send a message (chat unless --kind says otherwise) to users or to one group; prints the
    /// accepted message id.
    ///
    /// `iim send bob carol TEXT`, `iim send '#team' TEXT`. The body is TEXT, the last
    /// argument (`-` reads it from stdin instead), or what --body-file reads: then every
    /// argument is a recipient. A message to a group reaches its members; a non-member's is
    /// refused by the groups plugin, with a receipt that `listen` shows.
    #[command(override_usage = "iim send [OPTIONS] TO... <TEXT | ->\n       \
                                iim send [OPTIONS] --body-file PATH TO...")]
    Send {
        /// Recipients (users, or one group written `#team`), then the body as text (`-`:
        /// stdin).
        #[arg(required = true, value_name = "ARG")]
        args: Vec<String>,
        /// The message's kind: `chat`, `receipt`, `presence`, or the name of a custom kind that
        /// a plugin of the host handles (say `typing`); the host refuses a kind no plugin
        /// handles.
        #[arg(long, value_name = "KIND", default_value = "chat")]
        kind: MessageKind,
        /// Send the bytes of file PATH as the body, instead of TEXT (`-`: stdin).
        #[arg(long, value_name = "PATH")]
        body_file: Option<PathBuf>,
        /// Seconds the message waits for the recipient; after that it expires and you get an
        /// `expired` receipt. Without it, the host's default applies (30 days unless
        /// configured otherwise).
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..))]
        ttl: Option<u32>,
        /// Encrypt the message end to end, for every device of the recipients and your other
        /// devices, with the keys they published in the host's key directory (`keys` plugin):
        /// the host sees who it is to, never what it says. To a group (`#team`), with the
        /// group's MLS group (`iim e2e group`). Chat messages only. `iim e2e on USER` makes it
        /// the default for a conversation.
        #[arg(long, conflicts_with = "plain")]
        e2e: bool,
        /// Send in the clear even where `iim e2e on` made encryption the default.
        #[arg(long)]
        plain: bool,
    },
    /// Stay connected and print every message as it arrives.
    ///
    /// Chat, contacts coming online or going offline, receipts for the messages you sent, and
    /// your groups' messages and changes (`#team alice: hello  (id 12)`, `#team: alice added
    /// bob`). A lost connection, or a host that restarts, is reconnected by itself; so is a
    /// moment of `iim group`, which takes the device's deliveries while it waits for its
    /// answer.
    Listen {
        /// Mark every chat message read once it is printed (as `iim read` does).
        #[arg(long)]
        read: bool,
    },
    /// Chat in this terminal: type a line and press Enter to send it; what arrives is shown as
    /// it comes.
    ///
    /// `iim chat bob`, `iim chat '#team'`. One device session for the whole chat, as `listen`
    /// has, reconnected by itself. First what waited for this device, in order, then
    /// everything as it arrives: messages from anyone (each says who), contacts coming online
    /// or going offline, groups' changes, receipts. Your own messages show how far they got:
    /// `pending` (the host does not have it yet; the device holds it, also while it
    /// reconnects), then its id and `sent`, `delivered to bob`, `read by bob` (a group's:
    /// `delivered to N of M, read by K`). The conversation's chat messages are reported read as
    /// they are shown, unless --no-read (or `/read off`). Commands: `/to USER|#GROUP`,
    /// `/history` (everything that arrived since the chat started), `/who`, `/read [on|off]`,
    /// `/help`, `/quit` (also Ctrl-D, Ctrl-C), which waits for the messages not sent yet.
    /// Prints no JSON: --json is refused.
    Chat {
        /// Whom to write to: a user, or a group (`#team`); `/to` changes it.
        #[arg(value_name = "USER|#GROUP")]
        to: Option<Address>,
        /// Do not report the conversation's chat messages read as they are shown (`/read on`
        /// starts it).
        #[arg(long)]
        no_read: bool,
    },
    /// Send a file: upload it to your home host, then send a `file` message naming it to TO
    /// (one or more users, or one group written `#team`); prints the file's id.
    ///
    /// An upload cut off (a lost connection, a host that restarts) goes on from what the host
    /// kept once reconnected; a file the host has already is not sent again. Progress is shown
    /// on stderr when it is a terminal.
    SendFile {
        /// Recipients: users, or one group (`#team`).
        #[arg(required = true, value_name = "TO")]
        to: Vec<Address>,
        /// The file.
        path: PathBuf,
        /// Its media type (`image/png`) [default: from the file's extension, else
        /// application/octet-stream].
        #[arg(long, value_name = "TYPE")]
        media_type: Option<String>,
    },
    /// Download a file by its id (as `listen` and `send-file` show it); prints where it was
    /// saved.
    ///
    /// The bytes go to PATH.part (without --out: FILE-ID.part) as they come; a download cut
    /// off goes on from there once reconnected, and so does running the command again. The
    /// file is checked against its id before it takes its name. Progress is shown on stderr
    /// when it is a terminal.
    Download {
        /// The file's id: 64 hex digits.
        #[arg(value_name = "FILE-ID", value_parser = parse_file_id)]
        file: Sha256,
        /// Where to save it (replacing what is there) [default: the name it was sent with,
        /// in the current directory, which must not exist yet].
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
    /// Tell the sender of a chat message you received that you read it.
    ///
    /// The host's receipts plugin checks the report: if ID is not a chat message from SENDER in
    /// your inbox, nothing is sent (and no error comes back). Otherwise SENDER and your other
    /// devices get a read receipt. Reporting a message again from this device sends nothing new.
    /// For a message to a group, name the group (`--from '#team'`): its sender then counts
    /// you among the readers.
    Read {
        /// The message's id, as `listen` shows it (`(id 42)`, or `id` with --json).
        id: u64,
        /// Who sent it, as `listen` shows it (`from` with --json); for a group's message, the
        /// group (`#team`).
        #[arg(long, value_name = "SENDER")]
        from: Address,
    },
    /// Manage groups: create, rename, delete, add, remove, leave, role, members, list,
    /// receipts.
    ///
    /// Each asks the groups plugin and waits for its answer (--timeout), which it prints;
    /// a refusal is an error with the plugin's reason. While it waits it takes this device's
    /// deliveries from an `iim listen` of the same profile, which takes them back once it is
    /// done and shows whatever arrived meanwhile.
    Group(group::GroupArgs),
    /// End-to-end encryption of this device: `setup`, `status`, `cards USER...`, `trust
    /// USER/DEVICE`, `group NAME`, `on [USER]`, `off [USER]`.
    ///
    /// Each device has its own keys, kept in the profile (`e2e.keys`, readable by you only);
    /// their public half, the device's card, is published in the host's key directory (the
    /// `keys` plugin). A device's first card is pinned (trusted on first use); a different one
    /// later is refused until you compare fingerprints with its owner and trust it. `listen`
    /// opens what is encrypted and says so; a body altered or played again is shown as
    /// refused.
    E2e(e2e::E2eArgs),
    /// Push notifications for this device: `register TOKEN`, `unregister`.
    ///
    /// The host's push plugin then notifies the device through its push gateway (FCM or APNs,
    /// as the host's operator configured it) when a message waits and none of your devices is
    /// online. The command asks the plugin and waits for its answer (--timeout), which it
    /// prints; a refusal (a token of the wrong shape) is an error with the plugin's reason. As
    /// `group` does, it takes this device's deliveries from an `iim listen` of the same
    /// profile for that moment.
    Push(push::PushArgs),
    /// Revoke this device's token and forget the login.
    Logout,
    /// Your account: change the password, list and revoke devices, delete it.
    Account {
        #[command(subcommand)]
        op: account::AccountCommand,
    },
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
    /// The host of the login: the user's home host.
    server: SocketAddr,
    ca: PathBuf,
    user: UserId,
    device: DeviceId,
    token: String,
    /// The host that redirected the login to `server`, if one did: asking it again would only
    /// be redirected again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    redirected_from: Option<SocketAddr>,
    /// Which conversations `iim send` encrypts end to end by default (`iim e2e on|off`).
    #[serde(default, skip_serializing_if = "e2e::E2eSettings::is_off")]
    e2e: e2e::E2eSettings,
}

impl Profile {
    /// The host to ask for this profile's user when the flags name `asked`: that one, unless
    /// it is none or the one that redirected the login, and then the home host.
    fn host_for(&self, asked: Option<SocketAddr>) -> SocketAddr {
        match asked {
            Some(asked) if Some(asked) != self.redirected_from => asked,
            _ => self.server,
        }
    }

    /// Notes that a connection to `asked` ended up at `home` (the server id `home_id`): if that
    /// is a redirect, says so and remembers where it led. Returns whether it was one.
    fn note_home(&mut self, asked: SocketAddr, home_id: &str, home: SocketAddr) -> bool {
        if home == asked {
            return false;
        }
        eprintln!("redirected to home host {home_id} at {home}");
        self.server = home;
        self.redirected_from = Some(asked);
        true
    }
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

/// The client configuration for `server`, trusting `ca`, with the flags' timeouts.
fn client_config(cli: &Cli, server: SocketAddr, ca: &Path) -> anyhow::Result<ClientConfig> {
    let link = &cli.link;
    let mut config = ClientConfig::new(server)
        .with_ca_file(ca)?
        .with_profile(link.network_profile);
    let secs = std::time::Duration::from_secs;
    config.keep_alive = link.keep_alive.map_or(config.keep_alive, secs);
    config.idle_timeout = link.idle_timeout.map_or(config.idle_timeout, secs);
    config.dead_host_after = link.dead_host_after.map_or(config.dead_host_after, secs);
    config.check()?;
    Ok(config)
}

async fn connect(cli: &Cli, server: SocketAddr, ca: &Path) -> anyhow::Result<Connection> {
    let config = client_config(cli, server, ca)?;
    Ok(Connection::connect(&config).await?)
}

/// The saved login, or an error saying how to make one.
fn saved_login(dir: &Path) -> anyhow::Result<Profile> {
    load_profile(dir)?
        .ok_or_else(|| anyhow!("not logged in: run `iim login USER --password PW` first"))
}

/// The host refused the saved login (rather than could not be reached, or sent nowhere).
fn login_refused(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Refused { .. } => {
            anyhow::Error::new(e).context("the saved login was refused; run `iim login` again")
        }
        other => other.into(),
    }
}

/// Connects and authenticates with the profile's token, at the user's home host.
async fn session(cli: &Cli, mode: SessionMode) -> anyhow::Result<(Connection, Profile)> {
    let dir = profile_dir(cli)?;
    let mut profile = saved_login(&dir)?;
    let (_, ca) = target(cli, Some(&profile))?;
    let server = profile.host_for(cli.server);
    let config = client_config(cli, server, &ca)?;
    let (conn, home) = Connection::resume_home(
        &config,
        &profile.user,
        &profile.device,
        &profile.token,
        mode,
    )
    .await
    .map_err(login_refused)?;
    if profile.note_home(server, conn.server(), home.server) {
        save_profile(&dir, &profile)?;
    }
    Ok((conn, profile))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Register { user, password } => {
            let dir = profile_dir(&cli)?;
            let (server, ca) = target(&cli, load_profile(&dir)?.as_ref())?;
            let conn = connect(&cli, server, &ca).await?;
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
            // What a redirect taught about this user's home still holds; another user's home
            // is not theirs.
            let same_user = old.as_ref().filter(|old| &old.user == user);
            let server = same_user.map_or(server, |old| old.host_for(cli.server));
            let device = match (device, same_user) {
                (Some(device), _) => device.clone(),
                (None, Some(old)) => old.device.clone(),
                (None, None) => DeviceId::new(format!("cli-{:08x}", rand::random::<u32>()))?,
            };
            let config = client_config(&cli, server, &ca)?;
            let (conn, token, home) =
                Connection::login_home(&config, user, password, &device, SessionMode::SendOnly)
                    .await?;
            let mut profile = Profile {
                server,
                ca,
                user: user.clone(),
                device: device.clone(),
                token,
                redirected_from: same_user
                    .filter(|old| old.server == server)
                    .and_then(|old| old.redirected_from),
                e2e: same_user.map(|old| old.e2e.clone()).unwrap_or_default(),
            };
            // The end-to-end keys are the device's: another device (or user) of this profile
            // makes its own.
            if same_user.is_none_or(|old| old.device != device) {
                e2e::forget_keys(&dir)?;
            }
            profile.note_home(server, conn.server(), home.server);
            save_profile(&dir, &profile)?;
            print_result(
                &cli,
                serde_json::json!({ "user": user, "device": device }),
                || format!("logged in as {user} on device {device}"),
            );
            conn.close().await;
        }
        Command::Friend { op } => relation(&cli, RelationKind::Friend, op).await?,
        Command::Colleague { op } => relation(&cli, RelationKind::Colleague, op).await?,
        Command::Send {
            args,
            kind,
            body_file,
            ttl,
            e2e,
            plain,
        } => {
            // Before connecting: recipients that cannot go together, a missing file or a
            // missing body are the user's to fix, with no host involved.
            let (to, text) = send_args(args, body_file.is_some())?;
            let source = BodySource::open(text, body_file.as_deref()).await?;
            let profile = saved_login(&profile_dir(&cli)?)?;
            let e2e = *e2e || (!plain && *kind == MessageKind::Chat && profile.e2e.covers(&to));
            if e2e {
                return e2e::send(&cli, kind, &to, source, *ttl).await;
            }
            let (conn, _) = session(&cli, SessionMode::SendOnly).await?;
            let body = source.read(conn.max_body()).await?;
            let client_id = iim_client::new_client_id();
            let accepted = match ttl {
                None => conn.submit(client_id, kind.clone(), &to, &body).await?,
                Some(secs) => {
                    let ttl = std::time::Duration::from_secs(u64::from(*secs));
                    conn.submit_expiring(client_id, kind.clone(), &to, &body, ttl)
                        .await?
                }
            };
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
        Command::Listen { read } => listen(&cli, *read).await?,
        Command::Chat { to, no_read } => chat::run(&cli, to.clone(), !no_read).await?,
        Command::SendFile {
            to,
            path,
            media_type,
        } => send_file(&cli, to, path, media_type.as_deref()).await?,
        Command::Download { file, out } => download(&cli, file, out.as_deref()).await?,
        Command::Read { id, from } => {
            let (conn, _) = session(&cli, SessionMode::SendOnly).await?;
            let message = MessageId(*id);
            conn.submit(
                read_report_client_id(message, from),
                MessageKind::Receipt,
                std::slice::from_ref(from),
                &read_report(message),
            )
            .await?;
            let place = if from.group().is_some() { "in" } else { "from" };
            print_result(
                &cli,
                serde_json::json!({ "read": id, "from": from }),
                || format!("reported message {id} {place} {from} as read"),
            );
            conn.close().await;
        }
        Command::Group(args) => group::run(&cli, args).await?,
        Command::Push(args) => push::run(&cli, args).await?,
        Command::E2e(args) => e2e::run(&cli, args).await?,
        Command::Account { op } => account::run(&cli, op).await?,
        Command::Logout => {
            let dir = profile_dir(&cli)?;
            let (conn, profile) = session(&cli, SessionMode::SendOnly).await?;
            if e2e::keyring_path(&dir).exists() {
                e2e::unpublish(&conn, &profile.user, profile.device.as_str()).await;
            }
            conn.logout().await?;
            std::fs::remove_file(dir.join("profile.json"))
                .with_context(|| format!("cannot remove the profile in {}", dir.display()))?;
            e2e::forget_keys(&dir)?;
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

/// Listens until Ctrl-C. The device reconnects by itself (with a growing wait) when the
/// connection is lost or the host goes away for a while: on a mobile network that is an
/// everyday event. The host sends again from the device's cursor what it had not seen
/// acknowledged; the device acknowledges again what was shown, and does not show it twice.
async fn listen(cli: &Cli, read: bool) -> anyhow::Result<()> {
    // One future for the whole run, polled first: once it has been polled, a Ctrl-C that comes
    // while a message is being handled, or while waiting to reconnect, is not lost.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let Some((mut device, mut home)) =
        open_device(cli, SessionMode::Receive, ctrl_c.as_mut()).await?
    else {
        return Ok(());
    };
    if !cli.json {
        eprintln!(
            "listening as {} on device {}",
            home.profile.user, home.profile.device
        );
    }
    let mut opener = e2e::Opener::new(&home.dir, &home.profile);
    loop {
        let card_wait = opener.deadline();
        let update = tokio::select! {
            biased;
            _ = &mut ctrl_c => {
                // Makes sure the host has read the last acknowledgements before closing, so
                // that the next `listen` does not show their messages again.
                device.close().await;
                return Ok(());
            }
            () = tokio::time::sleep_until(card_wait.unwrap_or_else(tokio::time::Instant::now)),
                if card_wait.is_some() => {
                for ready in opener.expire(&device)? {
                    shown(cli, &device, &home, read, ready);
                }
                continue;
            }
            update = device.next() => update,
        };
        match update {
            Some(Ok(Update::Message { seq, message })) => {
                for ready in opener.take(&device, seq, message)? {
                    shown(cli, &device, &home, read, ready);
                }
            }
            Some(Ok(Update::Synced { count })) => {
                if cli.json {
                    println!(
                        "{}",
                        serde_json::json!({ "kind": "synced", "count": count })
                    );
                } else {
                    eprintln!("({count} waiting message(s) delivered; now live)");
                }
            }
            Some(Ok(update)) => home.connection_update(&device, &update),
            // `iim group` of this profile took the deliveries for a moment: take them back
            // once it is done. Another listener taking them over is not fought.
            Some(Err(e))
                if e.code() == Some(ErrorCode::SESSION_REPLACED)
                    && deliveries::taken_by_a_command(&home.dir) =>
            {
                eprintln!(
                    "iim: `iim group` took this device's deliveries while it waits for its \
                     answer; listening again once it is done"
                );
                tokio::select! {
                    biased;
                    _ = &mut ctrl_c => return Ok(()),
                    () = deliveries::released(&home.dir) => {}
                }
                let Some((again, new_home)) =
                    open_device(cli, SessionMode::Receive, ctrl_c.as_mut()).await?
                else {
                    return Ok(());
                };
                (device, home) = (again, new_home);
                // What it held comes again on the new session.
                opener = e2e::Opener::new(&home.dir, &home.profile);
                eprintln!("iim: listening again");
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ClientError::ConnectionLost("the connection ended".into()).into()),
        }
    }
}

/// Shows a message `listen` got (unless it is the key directory's business), acknowledges
/// it, and with `read` reports a chat message from someone else read.
fn shown(cli: &Cli, device: &Device, home: &Home, read: bool, ready: e2e::Ready) {
    let e2e::Ready { seq, message, seal } = ready;
    if seal != e2e::Seal::Hidden {
        println!("{}", show::message_line_sealed(cli.json, &message, &seal));
    }
    // Acknowledged before it is reported read, so that its sender hears of the delivery
    // first (the receipts plugin handles both in the order they come).
    device.ack(seq);
    if read && message.kind == MessageKind::Chat && message.from != home.profile.user {
        // A group's message is reported to the group, which counts its readers.
        let to = match show::group_of(&message) {
            Some(group) => Address::Group(group.clone()),
            None => Address::User(message.from.clone()),
        };
        let id = message.id;
        let report = device.submit(
            read_report_client_id(id, &to),
            MessageKind::Receipt,
            std::slice::from_ref(&to),
            &read_report(id),
        );
        // The report goes out in order; its answer may wait for a reconnect.
        tokio::spawn(async move {
            // Say so and go on listening: the sender's account may be gone.
            if let Err(e) = report.await {
                eprintln!("iim: cannot mark message {id} read: {e}");
            }
        });
    }
}

/// Where the profile's device connects, kept up to date as redirects teach it.
struct Home {
    dir: PathBuf,
    profile: Profile,
    /// The host the device connects to.
    server: SocketAddr,
}

impl Home {
    /// Says on stderr that the device lost its connection or got it back; remembers the home
    /// host a reconnect was redirected to. Other updates are not about the connection.
    fn connection_update(&mut self, device: &Device, update: &Update) {
        match update {
            // The device goes to the home host at once; the profile remembers it once there.
            Update::Disconnected {
                reason: ClientError::Redirected { server, addr },
                ..
            } => eprintln!("redirected to home host {server} at {addr}"),
            Update::Disconnected { reason, retry_in } => {
                eprintln!(
                    "iim: connection lost ({reason}); reconnecting in {:.1} s",
                    retry_in.as_secs_f64()
                );
            }
            Update::Reconnected => {
                eprintln!("iim: reconnected");
                // The device goes on if the profile cannot be written.
                if let Err(e) = self.remember_home(device) {
                    eprintln!("iim: cannot remember the home host: {}", one_line(&e));
                }
            }
            // Only paged devices get a summary; the commands take their backlog pushed, or
            // none.
            Update::Message { .. } | Update::Synced { .. } | Update::Backlog { .. } => {}
        }
    }

    /// Once `device` has reconnected: remembers in the profile the home host a redirect sent
    /// it to, if one did (said when the redirect came).
    fn remember_home(&mut self, device: &Device) -> anyhow::Result<()> {
        let (_, home) = device.home();
        if home != self.server {
            self.profile.server = home;
            self.profile.redirected_from = Some(self.server);
            self.server = home;
            save_profile(&self.dir, &self.profile)?;
        }
        Ok(())
    }
}

/// Opens the profile's device in `mode`, at the user's home host (a redirect is followed and
/// remembered). The device reconnects by itself once open; until then, this tries again with
/// the same growing wait while the host cannot be reached. `None` if `stop` comes first.
async fn open_device<F: std::future::Future>(
    cli: &Cli,
    mode: SessionMode,
    mut stop: std::pin::Pin<&mut F>,
) -> anyhow::Result<Option<(Device, Home)>> {
    let dir = profile_dir(cli)?;
    let mut profile = saved_login(&dir)?;
    let (_, ca) = target(cli, Some(&profile))?;
    let mut server = profile.host_for(cli.server);
    let config = client_config(cli, server, &ca)?;
    let mut backoff = Backoff::new(config.reconnect_first, config.reconnect_max);
    let device = loop {
        let opened = tokio::select! {
            biased;
            _ = stop.as_mut() => return Ok(None),
            opened = Device::open(
                &config,
                &profile.user,
                &profile.device,
                Credentials::Token(profile.token.clone()),
                mode,
            ) => opened,
        };
        let wait = match opened {
            Ok(device) => break device,
            Err(e) if e.is_transient() => {
                let wait = backoff.next_wait();
                eprintln!(
                    "iim: cannot reach the host ({e}); trying again in {:.1} s",
                    wait.as_secs_f64()
                );
                wait
            }
            Err(e) => return Err(login_refused(e)),
        };
        tokio::select! {
            biased;
            _ = stop.as_mut() => return Ok(None),
            () = tokio::time::sleep(wait) => {}
        }
    };
    let (home_id, home) = device.home();
    if profile.note_home(server, &home_id, home) {
        save_profile(&dir, &profile)?;
        server = home;
    }
    Ok(Some((
        device,
        Home {
            dir,
            profile,
            server,
        },
    )))
}

/// Opens the profile's device for a file transfer: sending only, until it is opened.
async fn transfer_device(cli: &Cli) -> anyhow::Result<(Device, Home)> {
    let never = std::future::pending::<()>();
    tokio::pin!(never);
    open_device(cli, SessionMode::SendOnly, never)
        .await?
        .ok_or_else(|| anyhow!("the device was not opened"))
}

/// Waits for `work` on `device`, saying on stderr when the connection is lost and back (the
/// device carries the work on across reconnects).
async fn with_notices<T>(
    device: &Device,
    home: &mut Home,
    line: &ProgressLine,
    work: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::pin!(work);
    let mut updates = true;
    loop {
        tokio::select! {
            done = &mut work => return done,
            update = device.next(), if updates => match update {
                Some(Ok(update)) => {
                    if matches!(update, Update::Disconnected { .. } | Update::Reconnected) {
                        line.interrupt();
                    }
                    home.connection_update(device, &update);
                }
                // The device ended: `work` fails with its error.
                Some(Err(_)) | None => updates = false,
            },
        }
    }
}

/// `iim send-file`: uploads the file (going on from what the host kept of a cut-off upload),
/// then sends a `file` message naming it.
async fn send_file(
    cli: &Cli,
    to: &[Address],
    path: &Path,
    media_type: Option<&str>,
) -> anyhow::Result<()> {
    // Before connecting: a missing file, or recipients that cannot go together, are the
    // user's to fix, with no host involved.
    check_recipients(to)?;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file", path.display());
    }
    let media_type = media_type.unwrap_or_else(|| guess_media_type(path));
    let (device, mut home) = transfer_device(cli).await?;
    let label = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let line = ProgressLine::new(&label);
    let mut progress = |done, size| line.show(done, size);
    let upload = device.upload_file(path, media_type, &mut progress);
    let file = with_notices(&device, &mut home, &line, upload).await;
    line.finish();
    let file = file.with_context(|| format!("cannot upload {}", path.display()))?;
    let submission = device.submit(
        iim_client::new_client_id(),
        MessageKind::Custom(FILE_KIND.into()),
        to,
        &file.to_json(),
    );
    let accepted = with_notices(&device, &mut home, &line, submission)
        .await
        .with_context(|| format!("uploaded {}, but cannot send the message", file.file))?;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({
                "file": file.file,
                "name": file.name,
                "size": file.size,
                "media_type": file.media_type,
                "id": accepted.id.0,
                "sent_at": accepted.sent_at,
            })
        );
    } else {
        println!("{}", file.file);
    }
    device.close().await;
    Ok(())
}

/// `iim download`: downloads the file to `out`, or under its name into the current directory,
/// going on from what a cut-off download left.
async fn download(cli: &Cli, id: &Sha256, out: Option<&Path>) -> anyhow::Result<()> {
    let (device, mut home) = transfer_device(cli).await?;
    let hex_id = iim_client::proto::file::hex(id);
    let label = out.map_or_else(|| hex_id[..12].to_owned(), |p| p.display().to_string());
    let line = ProgressLine::new(&label);
    let mut progress = |done, size| line.show(done, size);
    let saved = match out {
        Some(out) => {
            let download = device.download_file(id, out, &mut progress);
            with_notices(&device, &mut home, &line, download).await
        }
        None => {
            let download = device.download_file_into(id, Path::new("."), &mut progress);
            with_notices(&device, &mut home, &line, download).await
        }
    };
    line.finish();
    let saved = saved.with_context(|| format!("cannot download {hex_id}"))?;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({
                "file": hex_id,
                "name": saved.name,
                "size": saved.size,
                "media_type": saved.media_type,
                "path": saved.path,
            })
        );
    } else {
        println!("{}", saved.path.display());
    }
    device.close().await;
    Ok(())
}

/// A media type for a file sent without `--media-type`, from its extension: the common ones,
/// else `application/octet-stream` (bytes, nothing more known).
fn guess_media_type(path: &Path) -> &'static str {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match extension.as_str() {
        "txt" | "log" => "text/plain",
        "md" => "text/markdown",
        "html" | "htm" => "text/html",
        "css" => "text/css",
        "csv" => "text/csv",
        "json" => "application/json",
        "xml" => "application/xml",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        _ => "application/octet-stream",
    }
}

/// A transfer's progress on one line of stderr, redrawn in place (`\r`), if stderr is a
/// terminal; nothing otherwise (a log or a pipe would fill with redraws).
struct ProgressLine {
    label: String,
    terminal: bool,
    state: std::sync::Mutex<LineState>,
}

#[derive(Default)]
struct LineState {
    /// A line is drawn and not ended yet.
    open: bool,
    /// When it was last drawn; redrawn at most every [`REDRAW`], and at the end.
    drawn: Option<std::time::Instant>,
}

/// The shortest time between two redraws of a progress line.
const REDRAW: std::time::Duration = std::time::Duration::from_millis(100);

impl ProgressLine {
    fn new(label: &str) -> Self {
        use std::io::IsTerminal;
        Self {
            label: label.to_owned(),
            terminal: std::io::stderr().is_terminal(),
            state: std::sync::Mutex::default(),
        }
    }

    fn show(&self, done: u64, size: u64) {
        if !self.terminal {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if done < size && state.drawn.is_some_and(|at| now - at < REDRAW) {
            return;
        }
        state.drawn = Some(now);
        state.open = true;
        eprint!("\r{}\x1b[K", progress_text(&self.label, done, size));
    }

    /// Ends the line, so that what is printed next starts on a line of its own.
    fn interrupt(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if std::mem::take(&mut state.open) {
            eprintln!();
        }
    }

    fn finish(&self) {
        self.interrupt();
    }
}

/// What a progress line says: `report.pdf: 45% (12.3 MiB of 27.0 MiB)`.
fn progress_text(label: &str, done: u64, size: u64) -> String {
    let percent = if size == 0 {
        100
    } else {
        u128::from(done.min(size)) * 100 / u128::from(size)
    };
    format!(
        "{label}: {percent}% ({} of {})",
        human_bytes(done),
        human_bytes(size)
    )
}

/// A size for people: bytes up to 1 KiB, then KiB, MiB, GiB, TiB with one decimal.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A file id on the command line: 64 hex digits.
fn parse_file_id(text: &str) -> Result<Sha256, String> {
    iim_client::proto::file::parse_hex(text)
        .ok_or_else(|| "a file id is 64 hex digits (as `listen` and `send-file` show it)".into())
}

/// Where `iim send` takes its message's body from.
enum BodySource {
    /// TEXT, as given.
    Text(String),
    /// A file, or stdin.
    Reader {
        /// What it is, for errors.
        name: String,
        /// Its bytes.
        reader: Box<dyn tokio::io::AsyncRead + Unpin>,
    },
}

impl BodySource {
    /// The one source that TEXT and --body-file name (`-` in either is stdin). A file is
    /// opened here, so that a missing one is reported before anything else happens.
    async fn open(text: Option<&str>, file: Option<&Path>) -> anyhow::Result<Self> {
        let stdin = || BodySource::Reader {
            name: "stdin".into(),
            reader: Box::new(tokio::io::stdin()),
        };
        match (text, file) {
            (Some(_), Some(_)) => {
                bail!("two bodies: give TEXT, `-` (stdin) or --body-file PATH, not two of them")
            }
            (None, None) => bail!("no body: give TEXT, `-` (stdin) or --body-file PATH"),
            (Some("-"), None) => Ok(stdin()),
            (None, Some(path)) if path == Path::new("-") => Ok(stdin()),
            (Some(text), None) => Ok(BodySource::Text(text.to_owned())),
            (None, Some(path)) => {
                let file = tokio::fs::File::open(path)
                    .await
                    .with_context(|| format!("cannot read {}", path.display()))?;
                Ok(BodySource::Reader {
                    name: path.display().to_string(),
                    reader: Box::new(file),
                })
            }
        }
    }

    /// The body. A file or stdin is read up to one byte past `max_body` (the host's limit,
    /// which it would refuse anyway), so that a huge file or an endless pipe is refused
    /// without being held in memory whole.
    async fn read(self, max_body: u32) -> anyhow::Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let (name, reader) = match self {
            BodySource::Text(text) => return Ok(text.into_bytes()),
            BodySource::Reader { name, reader } => (name, reader),
        };
        let mut body = Vec::new();
        reader
            .take(u64::from(max_body) + 1)
            .read_to_end(&mut body)
            .await
            .with_context(|| format!("cannot read {name}"))?;
        if body.len() > max_body as usize {
            bail!("{name} is over the host's limit of {max_body} bytes for a body");
        }
        Ok(body)
    }
}

/// The body of a read report for chat message `id` (docs/plugins.md).
fn read_report(id: MessageId) -> Vec<u8> {
    ReadReport { id: id.0 }.to_json()
}

/// The idempotency id of the read report for message `id` of `sender` (a user, or the group
/// of a group's message): the same every time, so that the host takes a second report of the
/// same message from this device as a repeat and sends no second receipt (`listen --read`
/// after a lost acknowledgement, `iim read` twice). The sender is part of it so that a report
/// corrected after naming the wrong sender is a new one. A stable hash, because the id must
/// not change between builds of the client (a user's address is the user's name, as before
/// groups).
fn read_report_client_id(id: MessageId, sender: &Address) -> u64 {
    iim_client::proto::stable_hash(
        b"read\0"
            .iter()
            .chain(&id.0.to_be_bytes())
            .chain(sender.to_string().as_bytes())
            .copied(),
    )
}

/// The recipients and the TEXT of `iim send`'s arguments: the last one is TEXT (or `-`),
/// unless --body-file gives the body (`body_file`).
fn send_args(args: &[String], body_file: bool) -> anyhow::Result<(Vec<Address>, Option<&str>)> {
    let (to, text) = match args {
        [] => bail!("no recipient: give users or one group (#name)"),
        to if body_file => (to, None),
        [to @ .., text] if !to.is_empty() => (to, Some(text.as_str())),
        _ => bail!("no body: give TEXT, `-` (stdin) or --body-file PATH after the recipients"),
    };
    let to = to
        .iter()
        .map(|arg| {
            arg.parse::<Address>()
                .with_context(|| format!("{arg:?} is not a user or a group (#name)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    check_recipients(&to)?;
    Ok((to, text))
}

/// A message goes to users or to exactly one group: anything else is said here, before the
/// host refuses it.
fn check_recipients(to: &[Address]) -> anyhow::Result<()> {
    let (groups, users): (Vec<&Address>, Vec<&Address>) =
        to.iter().partition(|a| a.group().is_some());
    let list = |addresses: &[&Address]| {
        addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (groups.as_slice(), users.is_empty()) {
        ([], _) | ([_], true) => Ok(()),
        ([group], false) => bail!(
            "a message goes to users or to one group, not both: {group} and {}",
            list(&users)
        ),
        (groups, _) => bail!("a message goes to one group at most, not {}", list(groups)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_as_a_percentage_and_sizes() {
        assert_eq!(
            progress_text("report.pdf", 12_900_000, 28_311_552),
            "report.pdf: 45% (12.3 MiB of 27.0 MiB)"
        );
        assert_eq!(progress_text("a", 0, 0), "a: 100% (0 B of 0 B)");
        assert_eq!(progress_text("a", 512, 2048), "a: 25% (512 B of 2.0 KiB)");
        // No overflow at the very end of the range.
        assert_eq!(
            progress_text("a", u64::MAX - 1, u64::MAX),
            "a: 99% (16777216.0 TiB of 16777216.0 TiB)"
        );
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }

    #[test]
    fn send_file_takes_recipients_then_the_file() {
        let cli = Cli::try_parse_from([
            "iim",
            "send-file",
            "bob",
            "carol",
            "report.pdf",
            "--media-type",
            "application/pdf",
        ])
        .expect("parses");
        let Command::SendFile {
            to,
            path,
            media_type,
        } = cli.command
        else {
            panic!("not send-file");
        };
        assert_eq!(to, ["bob", "carol"].map(address));
        assert_eq!(path, Path::new("report.pdf"));
        assert_eq!(media_type.as_deref(), Some("application/pdf"));
        assert!(Cli::try_parse_from(["iim", "send-file", "report.pdf"]).is_err());
        assert_eq!(guess_media_type(Path::new("a/b.PDF")), "application/pdf");
        assert_eq!(
            guess_media_type(Path::new("notes")),
            "application/octet-stream"
        );
    }

    fn address(text: &str) -> Address {
        text.parse().expect("address")
    }

    /// `iim send ARGS` as `send_args` reads them, or its error.
    fn send(args: &[&str], body_file: bool) -> Result<(Vec<Address>, Option<String>), String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        send_args(&args, body_file)
            .map(|(to, text)| (to, text.map(str::to_owned)))
            .map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn send_takes_users_or_one_group_then_the_body() {
        let cli = Cli::try_parse_from(["iim", "send", "bob", "carol", "hi there"]).expect("parses");
        let Command::Send { args, .. } = cli.command else {
            panic!("not send");
        };
        assert_eq!(args, ["bob", "carol", "hi there"]);
        assert_eq!(
            send(&["bob", "carol", "hi there"], false),
            Ok((
                vec![address("bob"), address("carol")],
                Some("hi there".into())
            ))
        );
        assert_eq!(
            send(&["#team", "-"], false),
            Ok((vec![address("#team")], Some("-".into())))
        );
        // With --body-file, every argument is a recipient.
        assert_eq!(
            send(&["bob", "carol"], true),
            Ok((vec![address("bob"), address("carol")], None))
        );

        let error = |args: &[&str], body_file| send(args, body_file).expect_err("refused");
        assert!(error(&["bob"], false).starts_with("no body"));
        assert!(error(&[], true).starts_with("no recipient"));
        assert_eq!(
            error(&["#team", "bob", "hi"], false),
            "a message goes to users or to one group, not both: #team and bob"
        );
        assert_eq!(
            error(&["bob", "#team", "carol", "hi"], false),
            "a message goes to users or to one group, not both: #team and bob, carol"
        );
        assert_eq!(
            error(&["#team", "#ops", "hi"], false),
            "a message goes to one group at most, not #team, #ops"
        );
        assert!(
            error(&["bob", "two words"], true)
                .starts_with(r#""two words" is not a user or a group (#name): "#),
            "{}",
            error(&["bob", "two words"], true)
        );
        assert!(error(&["Bob", "hi"], false).contains("not a user or a group"));
        assert!(error(&["#", "hi"], false).contains("not a user or a group"));
    }

    #[test]
    fn send_file_takes_a_group_alone() {
        let cli = Cli::try_parse_from(["iim", "send-file", "#team", "a.txt"]).expect("parses");
        let Command::SendFile { to, .. } = cli.command else {
            panic!("not send-file");
        };
        assert_eq!(to, [address("#team")]);
        assert!(check_recipients(&to).is_ok());
        assert!(check_recipients(&[address("#team"), address("bob")]).is_err());
        assert!(Cli::try_parse_from(["iim", "send-file", "Team", "a.txt"]).is_err());
    }

    #[test]
    fn chat_takes_a_user_a_group_or_nobody() {
        let to = |args: &[&str]| match Cli::try_parse_from(args).map(|cli| cli.command) {
            Ok(Command::Chat { to, no_read }) => Ok((to, no_read)),
            Ok(other) => panic!("not chat: {other:?}"),
            Err(e) => Err(e.kind()),
        };
        assert_eq!(
            to(&["iim", "chat", "bob"]),
            Ok((Some(address("bob")), false))
        );
        assert_eq!(
            to(&["iim", "chat", "#team", "--no-read"]),
            Ok((Some(address("#team")), true))
        );
        assert_eq!(to(&["iim", "chat"]), Ok((None, false)));
        assert!(to(&["iim", "chat", "Bob"]).is_err());
        assert!(to(&["iim", "chat", "bob", "carol"]).is_err());
    }

    #[test]
    fn read_takes_a_sender_or_a_group() {
        let cli = Cli::try_parse_from(["iim", "read", "12", "--from", "#team"]).expect("parses");
        let Command::Read { id, from } = cli.command else {
            panic!("not read");
        };
        assert_eq!((id, from), (12, address("#team")));
    }

    #[test]
    fn download_takes_a_file_id() {
        let id = "0f".repeat(32);
        let cli = Cli::try_parse_from(["iim", "download", &id, "--out", "x"]).expect("parses");
        let Command::Download { file, out } = cli.command else {
            panic!("not download");
        };
        assert_eq!(file, [0x0f; 32]);
        assert_eq!(out.as_deref(), Some(Path::new("x")));
        assert!(Cli::try_parse_from(["iim", "download", "0f0f"]).is_err());
    }

    fn addr(a: &str) -> SocketAddr {
        a.parse().expect("addr")
    }

    fn profile() -> Profile {
        Profile {
            server: addr("127.0.0.1:7501"),
            ca: PathBuf::from("/ca.pem"),
            user: UserId::new("alice").expect("name"),
            device: DeviceId::new("laptop").expect("name"),
            token: "t".into(),
            redirected_from: None,
            e2e: e2e::E2eSettings::default(),
        }
    }

    #[test]
    fn a_redirect_is_remembered_and_its_host_not_asked_again() {
        let mut p = profile();
        // Not a redirect: nothing changes.
        assert!(!p.note_home(addr("127.0.0.1:7501"), "h1", addr("127.0.0.1:7501")));
        assert_eq!(p.redirected_from, None);
        assert_eq!(p.host_for(None), addr("127.0.0.1:7501"));
        assert_eq!(
            p.host_for(Some(addr("127.0.0.1:7509"))),
            addr("127.0.0.1:7509")
        );

        // h1 sent alice to her home h2.
        assert!(p.note_home(addr("127.0.0.1:7501"), "h2", addr("127.0.0.1:7502")));
        assert_eq!(p.server, addr("127.0.0.1:7502"));
        assert_eq!(p.redirected_from, Some(addr("127.0.0.1:7501")));
        // Next time: straight to h2, also when --server names h1 again.
        assert_eq!(p.host_for(None), addr("127.0.0.1:7502"));
        assert_eq!(
            p.host_for(Some(addr("127.0.0.1:7501"))),
            addr("127.0.0.1:7502")
        );
        // Another host named on the command line is asked.
        assert_eq!(
            p.host_for(Some(addr("127.0.0.1:7503"))),
            addr("127.0.0.1:7503")
        );
    }

    #[test]
    fn a_profile_keeps_its_format_without_a_redirect() {
        // A profile written before redirects existed still loads.
        let old = r#"{"server":"127.0.0.1:7447","ca":"/ca.pem","user":"alice","device":"laptop","token":"t"}"#;
        let p: Profile = serde_json::from_str(old).expect("an old profile loads");
        assert_eq!(p.redirected_from, None);
        let json = serde_json::to_value(&p).expect("json");
        assert!(json.get("redirected_from").is_none(), "{json}");

        let mut p = profile();
        p.note_home(addr("127.0.0.1:7501"), "h2", addr("127.0.0.1:7502"));
        let json = serde_json::to_string(&p).expect("json");
        let back: Profile = serde_json::from_str(&json).expect("loads");
        assert_eq!(back.server, addr("127.0.0.1:7502"));
        assert_eq!(back.redirected_from, Some(addr("127.0.0.1:7501")));
    }

    #[test]
    fn a_read_report_has_one_id_per_message_and_sender() {
        let (alice, bob, team) = (address("alice"), address("bob"), address("#team"));
        let id = read_report_client_id(MessageId(42), &alice);
        assert_eq!(id, read_report_client_id(MessageId(42), &alice));
        assert_ne!(id, read_report_client_id(MessageId(43), &alice));
        assert_ne!(id, read_report_client_id(MessageId(42), &bob));
        assert_ne!(id, read_report_client_id(MessageId(42), &team));
        // The same id as before groups: a report made again after an upgrade is a repeat.
        let before = iim_client::proto::stable_hash(
            b"read\0"
                .iter()
                .chain(&42u64.to_be_bytes())
                .chain(b"alice")
                .copied(),
        );
        assert_eq!(id, before);
    }
}
