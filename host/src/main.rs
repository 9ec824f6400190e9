//! `iim-host`: run an iim host.

use anyhow::Context;
use clap::Parser;
use iim_host::config::{Config, Role};
use iim_host::exchange::Exchange;
use iim_host::server::Server;
use std::net::SocketAddr;
use std::path::PathBuf;
use tracing_subscriber::EnvFilter;

/// The allocator: under a sustained chat load glibc's spent a quarter of the host's CPU
/// (merging and splitting free chunks as sessions, commit rounds and sled allocate and free
/// across threads); jemalloc's thread caches do not (`iim-bench --pairs 8 --messages 8000`:
/// 49k → 67k msgs/s, 28 → 20 µs of host CPU a message), and an idle session costs about the
/// same (`iim-bench sessions --clients 2000`: 40.6 KiB, 39.3 with glibc's; mimalloc's: 48).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// The exchange: the PostgreSQL database that keeps the network's state, shared by
    /// every exchange of the network [default: its own store in --data-dir].
    #[arg(long, value_name = "URL", env = "IIM_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// The exchange: --database has no synchronous standby, and that is meant.
    #[arg(long)]
    database_single_node: bool,
    /// The exchange: connections to --database for its calls, side by side [default: 8].
    #[arg(long, value_name = "N")]
    database_connections: Option<usize>,
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
    /// The data key file, which encrypts the store at rest [default: <data-dir>.key, beside
    /// the data directory]; made on first start.
    #[arg(long, env = "IIM_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Directory for compiled plugins (default: <data-dir>/plugin-cache).
    #[arg(long)]
    plugin_cache_dir: Option<PathBuf>,
    /// Serves /metrics (Prometheus' text format), /healthz and /readyz over plain HTTP on this
    /// TCP address (port 0: any free one) [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// How the log (on stderr) is written: text for people, or json, one object a line.
    #[arg(long, value_enum, env = "IIM_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
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
    /// Writes, checks, tests and installs plugins (docs/plugins.md, kits/).
    Plugin {
        #[command(subcommand)]
        action: PluginAction,
    },
    /// Reads the store of a stopped host (--data-dir, or the config's; its data key file).
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
}

#[derive(Debug, clap::Subcommand)]
enum StoreAction {
    /// Lists every record whose key or value (opened with the data key) holds TEXT: one line
    /// per record, `tree<TAB>key<TAB>(in the key|value)`. An audit of what the store keeps of
    /// a name, for instance after an account's deletion. Exits with 1 if it finds any.
    Find {
        /// The text to look for.
        text: String,
    },
}

#[derive(Debug, clap::Subcommand)]
enum PluginAction {
    /// Writes a new plugin project NAME/ from a kit's template, with the WIT beside it.
    New {
        /// The plugin's name: 1 to 64 bytes of a-z 0-9 . _ -.
        name: String,
        /// The language: one of the kits (rust, js, ts, python, c, zig).
        #[arg(long)]
        lang: String,
        /// Where to write it [default: ./NAME].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The Rust SDK's directory (plugin-sdk of the iim repository), for --lang rust
        /// [default: where it was when this host was built].
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Compiles a plugin with the host's engine, checks it against the world, lists every
    /// import the host does not provide, and runs its init in a sandbox. Touches no running
    /// host. Exits with 1 if the host would refuse it.
    Check {
        /// The component.
        file: PathBuf,
        /// Its configuration file (NAME.toml) to run init with.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Checks a plugin, then copies it (and its configuration) into the plugins directory,
    /// atomically; a running host loads it within half a second.
    Install {
        /// The component.
        file: PathBuf,
        /// Its configuration file, installed as NAME.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The name to install it under [default: the name its init gives].
        #[arg(long)]
        name: Option<String>,
    },
    /// Compiles a plugin into a compiled-code cache, for a host with these settings (what a
    /// host runs to compile a new plugin outside its own memory).
    #[command(hide = true)]
    Compile {
        file: PathBuf,
        #[arg(long)]
        cache_dir: PathBuf,
        #[arg(long)]
        instances: usize,
        #[arg(long)]
        max_memory_mib: u64,
    },
    /// Runs a plugin against a host of its own (a temporary store, no server) with a script
    /// of events and what each should do (docs/plugins.md, "Testing a plugin"). Exits with 1
    /// if a step fails.
    Test {
        /// The component.
        file: PathBuf,
        /// The script (TOML).
        script: PathBuf,
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
    /// Lists the notices of deleted accounts that plugins have not handled yet.
    Notices,
    /// Shows the network: the registry, the directory and the relay counters (of a host or
    /// of the exchange).
    Network,
    /// Hands the dead letters (or the one numbered ID) back to be handled again, once the
    /// plugin has been fixed. Exits with 1 if any letter was kept.
    RetryDeadLetters {
        /// The number of one dead letter, as `dead-letters` lists it.
        id: Option<u64>,
    },
    /// Adds a data key to the key file and makes it current: new writes are sealed with it at
    /// once, and what older keys sealed is re-encrypted in the background (see key-status).
    /// The older keys stay in the file, for backups made before.
    RotateKey,
    /// Shows the data key file, the current key, the keys still in use and how far a
    /// re-encryption went.
    KeyStatus,
}

/// How the log is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One line per event, for people.
    Text,
    /// One JSON object per line, for log collectors: `timestamp`, `level`, `fields`
    /// (`message` and the event's own), `target`, and the `spans` it happened in.
    Json,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let log = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("IIM_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => log.init(),
        LogFormat::Json => log.json().with_span_list(true).init(),
    }
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
    if let Some(url) = args.database {
        config.network.database = Some(url);
    }
    if args.database_single_node {
        config.network.database_single_node = true;
    }
    if let Some(connections) = args.database_connections {
        config.network.database_connections = Some(connections);
    }
    if let Some(dir) = args.plugin_cache_dir {
        config.plugins.cache_dir = Some(dir);
    }
    if let Some(addr) = args.metrics {
        config.metrics.listen = Some(addr);
    }
    if let Some(file) = args.key_file {
        config.storage.key_file = Some(file);
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
        config.storage.key_file.as_mut(),
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
    if let Some(Command::Plugin { action }) = args.command {
        let code = runtime
            .block_on(plugin_command(action, &config))
            .unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                2
            });
        std::process::exit(code);
    }
    if let Some(Command::Store {
        action: StoreAction::Find { text },
    }) = &args.command
    {
        let path = config.data_dir.join("store");
        if !path.exists() {
            anyhow::bail!("no store in {}", config.data_dir.display());
        }
        let store = iim_host::store::sealer_for(&path, &config.key_file(), config.storage.encrypt)
            .and_then(|sealer| iim_host::store::Store::open_with(&path, sealer))
            .with_context(|| {
                format!(
                    "cannot open the store in {} (is its host running?)",
                    path.display()
                )
            })?;
        let found = store.records_containing(text.as_bytes())?;
        let mut out = std::io::stdout().lock();
        for record in &found {
            let _ = std::io::Write::write_fmt(&mut out, format_args!("{record}\n"));
        }
        std::process::exit(i32::from(!found.is_empty()));
    }
    if let Some(Command::Admin { action }) = args.command {
        let command = match action {
            AdminAction::Plugins => "plugins".to_owned(),
            AdminAction::Reload => "reload".to_owned(),
            AdminAction::DeadLetters => "dead-letters".to_owned(),
            AdminAction::Notices => "notices".to_owned(),
            AdminAction::RetryDeadLetters { id: None } => "retry-dead-letters".to_owned(),
            AdminAction::RetryDeadLetters { id: Some(id) } => format!("retry-dead-letters {id}"),
            AdminAction::Network => "network".to_owned(),
            AdminAction::RotateKey => "rotate-key".to_owned(),
            AdminAction::KeyStatus => "key-status".to_owned(),
        };
        let reply = runtime.block_on(iim_host::admin::request(&config.data_dir, &command))?;
        print!("{reply}");
        if reply.starts_with("error:") || reply.contains("\terror: ") {
            std::process::exit(1);
        }
        return Ok(());
    }
    iim_host::fd_limit::raise(config.limits.max_connections);
    if config.role == Role::Exchange {
        return runtime.block_on(async {
            let exchange = Exchange::start(config).await?;
            // Scripts and tests read this line to learn the bound port and the certificate.
            println!(
                "iim-host exchange listening on {} (certificate {})",
                exchange.local_addr()?,
                exchange.cert_path().display()
            );
            if let Some(addr) = exchange.metrics_addr() {
                metrics_line(addr);
            }
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
        if let Some(addr) = server.metrics_addr() {
            metrics_line(addr);
        }
        server.run(stop_signal()).await?;
        anyhow::Ok(())
    })
}

/// Says where the metrics endpoint listens, on stdout (after the line scripts read for the
/// bound port; whoever read that may have closed stdout since) and in the log.
fn metrics_line(addr: SocketAddr) {
    use std::io::Write as _;
    tracing::info!(%addr, "metrics endpoint listening (/metrics, /healthz, /readyz)");
    let _ = writeln!(
        std::io::stdout(),
        "iim-host metrics on http://{addr}/metrics"
    );
}

/// `println!` that does not panic when stdout is closed (`iim-host plugin check X | head -1`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Runs an `iim-host plugin` command; the exit code.
async fn plugin_command(action: PluginAction, config: &Config) -> anyhow::Result<i32> {
    use iim_host::plugin::{check, harness, kits, settings};
    let plugins_dir = config
        .plugins
        .dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("plugins"));
    // Checks and tests compile into a cache of the user's; an install into the host's, so that
    // the host's load finds the build compiled.
    let user_cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|dir| dir.join("iim").join("plugin-cache"));
    let host_cache = config
        .plugins
        .cache_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("plugin-cache"));
    let runtime_with = |cache: Option<&std::path::Path>| {
        let runtime = iim_host::plugin::Runtime::new(&config.plugins, cache)
            .map_err(|e| anyhow::anyhow!("cannot start the plugin engine: {e}"))?;
        iim_host::plugin::runtime::start_ticker(runtime.engine());
        anyhow::Ok(runtime)
    };
    let read_config = |path: Option<&PathBuf>| -> anyhow::Result<settings::PluginFile> {
        match path {
            Some(path) => settings::read(path, &config.plugins)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
            None => Ok(settings::PluginFile {
                config: Vec::new(),
                settings: settings::Settings::defaults(&config.plugins),
            }),
        }
    };
    let read = |file: &PathBuf| {
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
    };
    let stem = |file: &PathBuf| {
        file.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plugin")
            .to_owned()
    };
    match action {
        PluginAction::New {
            name,
            lang,
            dir,
            sdk,
        } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let written = kits::new_project(&name, &lang, &dir, sdk.as_deref())?;
            say!(
                "wrote {} files into {}/; next:",
                written.len(),
                dir.display()
            );
            say!("  cd {} && ./build.sh", dir.display());
            say!("  iim-host plugin check {name}.wasm");
            say!(
                "  iim-host plugin test {name}.wasm SCRIPT.toml   (docs/plugins.md, \"Testing a plugin\")"
            );
            say!("  iim-host --data-dir YOUR_HOST_DATA_DIR plugin install {name}.wasm");
            Ok(0)
        }
        PluginAction::Check { file, config: path } => {
            let bytes = read(&file)?;
            let plugin = read_config(path.as_ref())?;
            let runtime = runtime_with(user_cache.as_deref())?;
            let ok = report_check(&runtime, &file, &bytes, &stem(&file), &plugin)
                .await?
                .is_some();
            Ok(if ok { 0 } else { 1 })
        }
        PluginAction::Install {
            file,
            config: path,
            name,
        } => {
            let bytes = read(&file)?;
            let runtime = runtime_with(Some(&host_cache))?;
            let given = read_config(path.as_ref())?;
            let checked_as = name.clone().unwrap_or_else(|| stem(&file));
            let Some(mut info) = report_check(&runtime, &file, &bytes, &checked_as, &given).await?
            else {
                eprintln!("not installed");
                return Ok(1);
            };
            // The name: --name, else the one init gives.
            let name = name.unwrap_or_else(|| info.name.clone());
            if iim_proto::UserId::new(&name).is_err() {
                anyhow::bail!("{name:?} is not a plugin name: 1 to 64 bytes of a-z 0-9 . _ -");
            }
            let wasm_target = plugins_dir.join(format!("{name}.wasm"));
            let toml_target = plugins_dir.join(format!("{name}.toml"));
            // Without --config, the host will load it with the configuration already there:
            // init runs again with that one (the compile is cached by now).
            if path.is_none() && toml_target.is_file() {
                let installed = read_config(Some(&toml_target))?;
                match check::check(&runtime, &bytes, &name, &installed).await {
                    Ok((_, Some(Ok(again)))) => {
                        say!(
                            "  init with the configuration already installed ({}): ok",
                            toml_target.display()
                        );
                        info = again;
                    }
                    Ok((_, Some(Err(e)))) | Err(e) => {
                        say!(
                            "error: init with the configuration already installed ({}): {e}",
                            toml_target.display()
                        );
                        eprintln!("not installed");
                        return Ok(1);
                    }
                    Ok((_, None)) => {
                        anyhow::bail!("{} did not fit on a second look", file.display())
                    }
                }
            }
            std::fs::create_dir_all(&plugins_dir)
                .with_context(|| format!("cannot create {}", plugins_dir.display()))?;
            // Both files written and synced beside their places first, what is there kept aside,
            // then the two renames back to back: a host looking meanwhile sees the old pair or
            // the new one (at worst, for a moment, the old build with the new configuration,
            // which it refuses while the old build keeps serving).
            let mut placed = Vec::new();
            if let Some(path) = &path {
                let text = std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                placed.push(Placed::prepare(&toml_target, &text)?);
            }
            placed.push(Placed::prepare(&wasm_target, &bytes)?);
            for file in &mut placed {
                file.put()?;
            }
            say!("installed {} as {}", file.display(), wasm_target.display());
            let loaded = match iim_host::admin::request(&config.data_dir, "reload").await {
                Ok(reply) => match reply.lines().find(|l| l.starts_with(&format!("{name}\t"))) {
                    Some(line) if line.contains(&info.digest) => {
                        say!("the running host loaded it: {line}");
                        true
                    }
                    _ => {
                        let why = reply
                            .lines()
                            .find_map(|l| l.strip_prefix(&format!("{name}\trefused: ")))
                            .unwrap_or("its log says why (`plugin refused`)");
                        say!("the running host did not load this build: {why}");
                        false
                    }
                },
                Err(_) => {
                    say!(
                        "no host is running with this data directory; it loads the plugin when it starts"
                    );
                    true
                }
            };
            if loaded {
                for file in placed {
                    file.keep();
                }
                return Ok(0);
            }
            // Refused: what was there goes back, so that a restart serves what serves now.
            for file in placed.into_iter().rev() {
                file.put_back()?;
            }
            let _ = iim_host::admin::request(&config.data_dir, "reload").await;
            say!(
                "the files that were there before are back in {}",
                plugins_dir.display()
            );
            Ok(1)
        }
        PluginAction::Compile {
            file,
            cache_dir,
            instances,
            max_memory_mib,
        } => {
            let plugins = iim_host::config::PluginsConfig {
                instances,
                max_memory_mib,
                ..config.plugins.clone()
            };
            let runtime = iim_host::plugin::Runtime::new(&plugins, Some(&cache_dir))
                .map_err(|e| anyhow::anyhow!("cannot start the plugin engine: {e}"))?;
            Ok(match runtime.compile(&read(&file)?) {
                Ok(_) => 0,
                Err(e) => {
                    eprintln!("error: {}: {e}", file.display());
                    1
                }
            })
        }
        PluginAction::Test { file, script } => {
            let bytes = read(&file)?;
            let text = std::fs::read_to_string(&script)
                .with_context(|| format!("cannot read {}", script.display()))?;
            let script_parsed =
                harness::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", script.display()))?;
            let runtime = runtime_with(user_cache.as_deref())?;
            if let Err(e) = check::is_component(&bytes) {
                anyhow::bail!("{}: {e}", file.display());
            }
            let report = harness::run(&runtime, &bytes, &stem(&file), &script_parsed).await?;
            say!("{}", report.text.trim_end());
            if report.failures == 0 {
                say!("{} steps, all as expected", report.steps);
                Ok(0)
            } else {
                say!("{} of {} steps failed", report.failures, report.steps);
                Ok(1)
            }
        }
    }
}

/// Checks a plugin and prints what was found; the loaded info if a host would load it.
async fn report_check(
    runtime: &iim_host::plugin::Runtime,
    file: &std::path::Path,
    bytes: &[u8],
    name: &str,
    plugin: &iim_host::plugin::settings::PluginFile,
) -> anyhow::Result<Option<iim_host::plugin::LoadedInfo>> {
    use iim_host::plugin::check;
    let (examined, init) = match check::check(runtime, bytes, name, plugin).await {
        Ok(found) => found,
        Err(e) => {
            say!("error: {}: {e}", file.display());
            return Ok(None);
        }
    };
    say!(
        "{}: a component of {} bytes (digest {}), compiled (or taken from the cache) in {:.3} s",
        file.display(),
        examined.size,
        examined.digest,
        examined.compile.as_secs_f64()
    );
    // By package: `wasi:io@0.2.9 (poll, error, streams)`.
    let mut packages: Vec<(String, Vec<String>)> = Vec::new();
    for import in &examined.imports {
        let (package, interface) = match import.split_once('/') {
            Some((namespace, rest)) => match rest.split_once('@') {
                Some((interface, version)) => (format!("{namespace}@{version}"), interface),
                None => (namespace.to_owned(), rest),
            },
            None => (import.clone(), ""),
        };
        match packages.iter_mut().find(|(p, _)| *p == package) {
            Some((_, interfaces)) => interfaces.push(interface.to_owned()),
            None => packages.push((package, vec![interface.to_owned()])),
        }
    }
    let packages: Vec<String> = packages
        .into_iter()
        .map(|(package, interfaces)| format!("{package} ({})", interfaces.join(", ")))
        .collect();
    say!("  imports: {}", packages.join("; "));
    say!("  exports: {}", examined.exports.join(", "));
    if examined.imports.iter().any(|i| i.starts_with("wasi:http/")) {
        let outbound = &plugin.settings.outbound;
        if outbound.allowed.is_empty() {
            say!(
                "  note: it imports wasi:http, but its configuration allows no host: every \
                 request it makes will be denied (host.allowed_outbound_hosts)"
            );
        } else {
            let allowed: Vec<String> = outbound.allowed.iter().map(|a| a.to_string()).collect();
            say!(
                "  outbound HTTP: {} (within {} ms, bodies up to {} KiB{})",
                allowed.join(", "),
                outbound.timeout_ms,
                outbound.max_body_kib,
                outbound
                    .ca_file
                    .as_ref()
                    .map(|f| format!(", also trusting {}", f.display()))
                    .unwrap_or_default()
            );
        }
    }
    let mut ok = true;
    if !examined.missing.is_empty() {
        ok = false;
        say!("error: it imports what this host does not provide:");
        for (import, why) in &examined.missing {
            say!("  {import}: {why}");
        }
    }
    if let Err(e) = &examined.world {
        ok = false;
        say!("error: {e}");
    }
    let info = match init {
        Some(Ok(info)) => {
            let subs: Vec<String> = info.subscriptions.iter().map(|s| s.to_string()).collect();
            say!(
                "  init: {} {}, handles {}",
                info.name,
                info.version,
                if subs.is_empty() {
                    "nothing".to_owned()
                } else {
                    subs.join(", ")
                }
            );
            if info.name != name {
                say!(
                    "  note: it calls itself {:?}; a host names a plugin by its file: installed \
                     as {name}.wasm it is {name:?} in logs, admin and dead letters",
                    info.name
                );
            }
            Some(info)
        }
        Some(Err(e)) => {
            ok = false;
            say!("error: init: {e}");
            None
        }
        None => None,
    };
    if ok {
        say!("ok: a host would load it");
    }
    Ok(info.filter(|_| ok))
}

/// One file `plugin install` puts in the plugins directory: written and synced beside its
/// place (a dot-file the host's loader ignores), what was there kept aside until the host has
/// loaded the new one.
struct Placed {
    target: PathBuf,
    partial: PathBuf,
    previous: PathBuf,
    had_previous: bool,
}

impl Placed {
    fn prepare(target: &std::path::Path, bytes: &[u8]) -> anyhow::Result<Self> {
        use std::io::Write as _;
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("plugin");
        let partial = target.with_file_name(format!(".{name}.partial"));
        let previous = target.with_file_name(format!(".{name}.previous"));
        let mut file = std::fs::File::create(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok(Self {
            target: target.to_owned(),
            partial,
            previous,
            had_previous: false,
        })
    }

    /// Keeps what is there aside (a hard link), then renames the new file into place.
    fn put(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.previous);
        self.had_previous = std::fs::hard_link(&self.target, &self.previous).is_ok();
        std::fs::rename(&self.partial, &self.target).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.partial.display(),
                self.target.display()
            )
        })
    }

    /// The new file stays; what was there goes.
    fn keep(self) {
        let _ = std::fs::remove_file(&self.previous);
    }

    /// What was there comes back (or, if nothing was, the new file goes).
    fn put_back(self) -> anyhow::Result<()> {
        if self.had_previous {
            std::fs::rename(&self.previous, &self.target)
                .with_context(|| format!("cannot put back {}", self.target.display()))?;
        } else {
            std::fs::remove_file(&self.target)
                .with_context(|| format!("cannot remove {}", self.target.display()))?;
        }
        Ok(())
    }
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
