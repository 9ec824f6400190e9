//! `iim-host`: run an iim host.

use anyhow::Context;
use clap::Parser;
use iim_host::config::{Config, Role};
use iim_host::exchange::Exchange;
use iim_host::server::Server;
use std::net::SocketAddr;
use std::path::PathBuf;
use tracing_subscriber::EnvFilter;

/// The iim host: a QUIC instant-messaging server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file; flags override what it sets.
    #[arg(long, short = 'c', env = "IIM_CONFIG")]
    config: Option<PathBuf>,
    /// What to run: a host (clients, plugins, inboxes), or the exchange of a network of hosts
    /// (registry, directory, relay) [default: host].
    #[arg(long, value_enum)]
    role: Option<Role>,
    /// UDP address to listen on [default: 127.0.0.1:7447].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory for the store and the generated certificate [default: ./iim-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// This host's server id [default: h1].
    #[arg(long)]
    server_id: Option<String>,
    /// Joins the network whose exchange listens at this address (`host:port`).
    #[arg(long)]
    exchange: Option<String>,
    /// The exchange's certificate (PEM), to trust; with --exchange.
    #[arg(long)]
    exchange_cert: Option<PathBuf>,
    /// The network's secret, which hosts show the exchange when they join.
    #[arg(long, env = "IIM_NETWORK_SECRET", hide_env_values = true)]
    network_secret: Option<String>,
    /// This host's address for clients, where other hosts redirect its users [default: the
    /// listening address].
    #[arg(long)]
    advertise: Option<String>,
    /// PEM certificate chain (instead of the generated one); needs --key.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Directory for compiled plugins (default: <data-dir>/plugin-cache).
    #[arg(long)]
    plugin_cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Asks the host running with this data directory (--data-dir, or the config's) to act.
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
}

#[derive(Debug, Clone, Copy, clap::Subcommand)]
enum AdminAction {
    /// Lists the loaded plugins: file, name and version, digest, subscriptions.
    Plugins,
    /// Looks at the plugins directory now; answers once the changes are applied.
    Reload,
    /// Lists the events no plugin build could handle.
    DeadLetters,
    /// Shows the network: the registry, the directory and the relay counters (of a host or
    /// of the exchange).
    Network,
    /// Hands the dead letters (or the one numbered ID) back to be handled again, once the
    /// plugin has been fixed. Exits with 1 if any letter was kept.
    RetryDeadLetters {
        /// The number of one dead letter, as `dead-letters` lists it.
        id: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("IIM_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(id) = args.server_id {
        config.server_id = id;
    }
    if let Some(role) = args.role {
        config.role = role;
    }
    if let Some(exchange) = args.exchange {
        config.network.exchange = Some(exchange);
    }
    if let Some(cert) = args.exchange_cert {
        config.network.exchange_cert = Some(cert);
    }
    if let Some(secret) = args.network_secret {
        config.network.secret = Some(secret);
    }
    if let Some(addr) = args.advertise {
        config.network.advertise = Some(addr);
    }
    if let Some(dir) = args.plugin_cache_dir {
        config.plugins.cache_dir = Some(dir);
    }
    if let (Some(cert), Some(key)) = (args.cert, args.key) {
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
    }
    // Paths relative to where the host was started, made absolute once (the compiled-plugin
    // cache must be given an absolute path).
    for path in [
        Some(&mut config.data_dir),
        config.plugins.dir.as_mut(),
        config.plugins.cache_dir.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        *path = std::path::absolute(&*path)
            .with_context(|| format!("cannot resolve the path {}", path.display()))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    if let Some(Command::Admin { action }) = args.command {
        let command = match action {
            AdminAction::Plugins => "plugins".to_owned(),
            AdminAction::Reload => "reload".to_owned(),
            AdminAction::DeadLetters => "dead-letters".to_owned(),
            AdminAction::RetryDeadLetters { id: None } => "retry-dead-letters".to_owned(),
            AdminAction::RetryDeadLetters { id: Some(id) } => format!("retry-dead-letters {id}"),
            AdminAction::Network => "network".to_owned(),
        };
        let reply = runtime.block_on(iim_host::admin::request(&config.data_dir, &command))?;
        print!("{reply}");
        if reply.starts_with("error:") || reply.contains("\terror: ") {
            std::process::exit(1);
        }
        return Ok(());
    }
    if config.role == Role::Exchange {
        return runtime.block_on(async {
            let exchange = Exchange::start(config).await?;
            // Scripts and tests read this line to learn the bound port and the certificate.
            println!(
                "iim-host exchange listening on {} (certificate {})",
                exchange.local_addr()?,
                exchange.cert_path().display()
            );
            exchange.run(stop_signal()).await?;
            anyhow::Ok(())
        });
    }
    runtime.block_on(async {
        let server = Server::start(config).await?;
        // Scripts and tests read this line to learn the bound port and the certificate.
        println!(
            "iim-host listening on {} (certificate {})",
            server.local_addr()?,
            server.cert_path().display()
        );
        server.run(stop_signal()).await?;
        anyhow::Ok(())
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
