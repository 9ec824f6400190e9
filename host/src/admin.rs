//! The operator's socket: a Unix socket at `<data_dir>/admin.sock` (mode 0600), one command
//! per connection, answered in plain text. `iim-host admin COMMAND` is its client.
//!
//! Commands: `plugins` lists the loaded plugins; `reload` looks at the plugins directory now
//! and answers once the changes are applied (or refused: see the host's log); `dead-letters`
//! lists the events no plugin build could handle; `retry-dead-letters [ID]` hands them (or
//! letter `ID`) back to be handled again, once the plugin has been fixed; `network` shows
//! what the host knows of its network and its relay counters; `rotate-key` makes a new data
//! key current and re-encrypts in the background, `key-status` shows how far that went
//! ([`crate::key_rotation`]). The exchange serves its own
//! commands on the same kind of socket (see [`crate::exchange`]).

use crate::Host;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The socket's path in a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Longest command line read.
const MAX_COMMAND: u64 = 256;

/// What answers the commands of one process's socket: a command line in, the reply out.
pub type Commands =
    Arc<dyn Fn(String) -> std::pin::Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Binds the host's socket (replacing a stale one) and serves it until shutdown.
pub fn start(host: Arc<Host>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let data_dir = host.config.data_dir.clone();
    let shutdown = host.shutdown.clone();
    let commands: Commands = Arc::new(move |command| {
        let host = Arc::clone(&host);
        Box::pin(async move { answer(&host, &command).await })
    });
    serve_socket(&data_dir, shutdown, commands)
}

/// Binds the socket of `data_dir` (replacing a stale one) and answers it with `commands`
/// until `shutdown` becomes true.
pub fn serve_socket(
    data_dir: &Path,
    shutdown: tokio::sync::watch::Receiver<bool>,
    commands: Commands,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(tokio::spawn(serve(listener, path, shutdown, commands)))
}

async fn serve(
    listener: UnixListener,
    path: PathBuf,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    commands: Commands,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let commands = Arc::clone(&commands);
                    tokio::spawn(async move {
                        if let Err(e) = reply(stream, commands).await {
                            tracing::debug!(error = %e, "admin connection failed");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "admin socket accept failed"),
            },
            _ = shutdown.wait_for(|stopping| *stopping) => break,
        }
    }
    let _ = std::fs::remove_file(path);
}

async fn reply(stream: UnixStream, commands: Commands) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_COMMAND))
        .read_line(&mut line)
        .await?;
    let command = line.trim().to_owned();
    tracing::info!(command, "admin command");
    let reply = commands(command).await;
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await
}

async fn answer(host: &Host, command: &str) -> String {
    match command {
        "plugins" => plugins(host),
        "reload" => {
            host.plugins.reload().await;
            plugins(host)
        }
        "dead-letters" => dead_letters(host),
        "notices" => notices(host),
        "network" => network(host),
        "rotate-key" => match host.key_rotation.rotate(&host.data()) {
            Ok(reply) => reply,
            Err(e) => format!("error: {e}\n"),
        },
        "key-status" => host.key_rotation.status(&host.data()),
        "retry-dead-letters" => retry_dead_letters(host, None).await,
        retry if retry.starts_with("retry-dead-letters ") => {
            match retry["retry-dead-letters ".len()..].trim().parse::<u64>() {
                Ok(id) => retry_dead_letters(host, Some(id)).await,
                Err(_) => "error: retry-dead-letters takes a dead letter's number\n".into(),
            }
        }
        other => format!(
            "error: unknown command {other:?}; try plugins, reload, dead-letters, \
             retry-dead-letters [ID], notices, network, rotate-key or key-status\n"
        ),
    }
}

/// The host's view of its network: the registry, the directory's size and the relay
/// counters, one `key value` pair per line.
fn network(host: &Host) -> String {
    let Some(network) = &host.network else {
        return format!("server {}\nnetwork none\n", host.config.server_id);
    };
    let mut out = String::new();
    let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    let stats = &network.outbox.stats;
    let _ = writeln!(out, "server {}", network.server());
    let _ = writeln!(
        out,
        "exchange {}",
        if network.is_up() { "up" } else { "down" }
    );
    let _ = writeln!(out, "directory_users {}", network.directory.len());
    let _ = writeln!(out, "remote_online {}", network.directory.remote_online());
    let _ = writeln!(out, "envelopes_out {}", load(&stats.envelopes_out));
    let _ = writeln!(out, "envelopes_sent {}", load(&stats.envelopes_sent));
    let _ = writeln!(out, "envelopes_acked {}", load(&stats.envelopes_acked));
    let _ = writeln!(
        out,
        "envelopes_waiting {}",
        host.store.network.relay_waiting()
    );
    let _ = writeln!(out, "envelopes_in {}", load(&stats.envelopes_in));
    let _ = writeln!(
        out,
        "relayed_deliveries {}",
        load(&stats.relayed_deliveries)
    );
    for s in network.directory.servers() {
        let _ = writeln!(
            out,
            "host {} number {} addr {} {}",
            s.id,
            s.number,
            s.addr,
            if s.up { "up" } else { "down" }
        );
    }
    out
}

fn plugins(host: &Host) -> String {
    let mut out = String::new();
    for (file, info, settings) in host.plugins.loaded() {
        let subs: Vec<String> = info.subscriptions.iter().map(|s| s.to_string()).collect();
        let _ = writeln!(
            out,
            "{file}\t{} {}\t{}\t{}\tinstances {}, {} MiB, {} ms",
            info.name,
            info.version,
            info.digest,
            subs.join(", "),
            settings.instances,
            settings.max_memory_mib,
            settings.call_timeout_ms,
        );
    }
    if out.is_empty() {
        out.push_str("no plugin loaded\n");
    }
    for (file, error) in host.plugins.refused() {
        let _ = writeln!(out, "{file}\trefused: {error}");
    }
    out
}

/// The notices of deleted accounts that plugins have not handled yet, one per line.
fn notices(host: &Host) -> String {
    match host.store.accounts.pending_notices() {
        Ok(notices) if notices.is_empty() => "no notices waiting\n".into(),
        Ok(notices) => {
            let mut out = String::new();
            for (id, plugin, user, at) in notices {
                let _ = writeln!(
                    out,
                    "{id}\taccount-deleted {user}\tfor {plugin}\tat {at} ms"
                );
            }
            out
        }
        Err(e) => format!("error: cannot read the notices: {e}\n"),
    }
}

fn dead_letters(host: &Host) -> String {
    match host.plugins.dead_letters() {
        Ok(letters) if letters.is_empty() => "no dead letters\n".into(),
        Ok(letters) => {
            let mut out = String::new();
            for (id, l) in letters {
                let _ = writeln!(
                    out,
                    "{id}\tat {} ms\t{} {} ({})\t{}\tattempts {}\t{}",
                    l.at, l.plugin, l.version, l.digest, l.event, l.attempts, l.error
                );
            }
            out
        }
        Err(e) => format!("error: cannot read dead letters: {e}\n"),
    }
}

/// Hands dead letter `only` (or every one) back to be handled again: a line per letter.
async fn retry_dead_letters(host: &Host, only: Option<u64>) -> String {
    let ids: Vec<u64> = match only {
        Some(id) => vec![id],
        None => match host.plugins.dead_letters() {
            Ok(letters) => letters.into_iter().map(|(id, _)| id).collect(),
            Err(e) => return format!("error: cannot read dead letters: {e}\n"),
        },
    };
    if ids.is_empty() {
        return "no dead letters\n".into();
    }
    let mut out = String::new();
    for id in ids {
        let _ = match host.plugins.retry_dead_letter(id).await {
            Ok(plugin) => writeln!(out, "{id}\trequeued to {plugin}"),
            Err(e) => writeln!(out, "{id}\terror: {e}"),
        };
    }
    out
}

/// Sends `command` to the host whose data directory is `data_dir`, and returns its answer.
pub async fn request(data_dir: &Path, command: &str) -> std::io::Result<String> {
    let path = socket_path(data_dir);
    let mut stream = UnixStream::connect(&path).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot reach the host's admin socket {} ({e}); is the host running with this data directory?",
                path.display()
            ),
        )
    })?;
    stream.write_all(command.as_bytes()).await?;
    stream.write_all(b"\n").await?;
    let mut reply = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut reply).await?;
    Ok(reply)
}
