//! The operator's socket: a Unix socket at `<data_dir>/admin.sock` (mode 0600), one command
//! per connection, answered in plain text. `iim-host admin COMMAND` is its client.
//!
//! Commands: `plugins` lists the loaded plugins; `reload` looks at the plugins directory now
//! and answers once the changes are applied (or refused: see the host's log); `dead-letters`
//! lists the events no plugin build could handle; `retry-dead-letters [ID]` hands them (or
//! letter `ID`) back to be handled again, once the plugin has been fixed.

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

/// Binds the socket (replacing a stale one) and serves it until shutdown.
pub fn start(host: Arc<Host>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(&host.config.data_dir);
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
    Ok(tokio::spawn(serve(host, listener, path)))
}

async fn serve(host: Arc<Host>, listener: UnixListener, path: PathBuf) {
    let mut shutdown = host.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let host = Arc::clone(&host);
                    tokio::spawn(async move {
                        if let Err(e) = answer(&host, stream).await {
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

async fn answer(host: &Host, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_COMMAND))
        .read_line(&mut line)
        .await?;
    let command = line.trim();
    tracing::info!(command, "admin command");
    let reply = match command {
        "plugins" => plugins(host),
        "reload" => {
            host.plugins.reload().await;
            plugins(host)
        }
        "dead-letters" => dead_letters(host),
        "retry-dead-letters" => retry_dead_letters(host, None).await,
        retry if retry.starts_with("retry-dead-letters ") => {
            match retry["retry-dead-letters ".len()..].trim().parse::<u64>() {
                Ok(id) => retry_dead_letters(host, Some(id)).await,
                Err(_) => "error: retry-dead-letters takes a dead letter's number\n".into(),
            }
        }
        other => format!(
            "error: unknown command {other:?}; try plugins, reload, dead-letters or \
             retry-dead-letters [ID]\n"
        ),
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await
}

fn plugins(host: &Host) -> String {
    let mut out = String::new();
    for (file, info) in host.plugins.loaded() {
        let subs: Vec<String> = info.subscriptions.iter().map(|s| s.to_string()).collect();
        let _ = writeln!(
            out,
            "{file}\t{} {}\t{}\t{}",
            info.name,
            info.version,
            info.digest,
            subs.join(", ")
        );
    }
    if out.is_empty() {
        out.push_str("no plugin loaded\n");
    }
    out
}

fn dead_letters(host: &Host) -> String {
    match host.store.dead_letters() {
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
        None => match host.store.dead_letters() {
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
