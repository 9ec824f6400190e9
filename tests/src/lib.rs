//! Helpers for the end-to-end tests: start the real `iim-host` binary on loopback with a
//! temporary data directory, and connect real clients to it.

pub mod cli;
pub mod gateway;
pub mod lossy;
pub mod metrics;
pub mod netns;
pub mod postgres;
pub mod tcp_proxy;

use anyhow::{Context, anyhow, bail};
use iim_client::proto::{DeviceId, ErrorCode, Message, SessionMode, UserId};
use iim_client::{ClientConfig, ClientError, Connection, Credentials, Device, Event};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The secret of the networks tests start ([`HostProcess::start_exchange`]).
pub const NETWORK_SECRET: &str = "test-network-secret";

/// Where a test's exchange keeps the network's state.
#[derive(Debug, Clone, Copy)]
pub enum ExchangeStore<'a> {
    /// Its own store, in its data directory.
    Own,
    /// The PostgreSQL database at this URL, declared single-node (a test cluster without a
    /// standby).
    SingleNode(&'a str),
    /// The PostgreSQL database at this URL, which must have a synchronous standby.
    Replicated(&'a str),
}

/// The configuration of an exchange (the secret [`NETWORK_SECRET`]) on `store`.
pub fn exchange_config(store: ExchangeStore<'_>) -> String {
    let database = match store {
        ExchangeStore::Own => String::new(),
        ExchangeStore::SingleNode(url) => {
            format!("database = {url:?}\ndatabase_single_node = true\n")
        }
        ExchangeStore::Replicated(url) => format!("database = {url:?}\n"),
    };
    format!("role = \"exchange\"\n[network]\nsecret = \"{NETWORK_SECRET}\"\n{database}")
}

/// The configuration of host `server_id` in the network of `exchange`, with `toml` (keys and
/// sections other than `server_id` and `[network]`).
pub fn network_config(exchange: &HostProcess, server_id: &str, toml: &str) -> String {
    format!(
        "server_id = \"{server_id}\"\n{toml}\n[network]\nexchange = \"{}\"\n\
         exchange_cert = \"{}\"\nsecret = \"{NETWORK_SECRET}\"\n",
        exchange.addr,
        exchange.cert.display()
    )
}

/// Several exchanges of one database, as a host lists them: their addresses in this order,
/// and one file with each one's certificate (kept while this lives).
pub struct ExchangeList {
    addrs: String,
    certs: tempfile::TempDir,
}

impl ExchangeList {
    /// `exchanges`, the first tried first.
    pub fn of(exchanges: &[&HostProcess]) -> anyhow::Result<Self> {
        let certs = tempfile::tempdir()?;
        let mut pem = Vec::new();
        for exchange in exchanges {
            pem.extend(std::fs::read(&exchange.cert)?);
        }
        std::fs::write(certs.path().join("exchanges.pem"), pem)?;
        let addrs: Vec<String> = exchanges.iter().map(|e| e.addr.to_string()).collect();
        Ok(Self {
            addrs: addrs.join(","),
            certs,
        })
    }

    /// The configuration of host `server_id` in their network, with `toml` (keys and
    /// sections other than `server_id` and `[network]`).
    pub fn host_config(&self, server_id: &str, toml: &str) -> String {
        format!(
            "server_id = \"{server_id}\"\n{toml}\n[network]\nexchange = \"{}\"\n\
             exchange_cert = {:?}\nsecret = \"{NETWORK_SECRET}\"\n",
            self.addrs,
            self.certs
                .path()
                .join("exchanges.pem")
                .display()
                .to_string()
        )
    }
}

/// How long any single step of a test may take before the test fails.
pub const STEP: Duration = Duration::from_secs(20);

/// Fails unless `fut` completes within [`STEP`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(STEP, fut)
        .await
        .map_err(|_| anyhow!("timed out: {what}"))
}

/// The directory the workspace's binaries are built into: the one the running program was
/// built into (`target/<profile>/` for a binary, `target/<profile>/deps/` for a test).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        dir
    }
}

/// A `cargo` command run from a test or a benchmark, with the environment it would have in a
/// shell. `cargo test` and `cargo run` give the program they run variables about its own
/// package (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, ...), and some dependencies' build scripts
/// rerun when those change (ring's does): inherited, they would make this cargo rebuild those
/// crates in place, and the next `cargo test` or `cargo build` from the shell rebuild them
/// again.
pub fn cargo() -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let kept = matches!(key, "CARGO_HOME" | "CARGO_TARGET_DIR" | "CARGO_MAKEFLAGS");
        if (key.starts_with("CARGO_") && !kept) || key == "OUT_DIR" {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Builds (once per test process) and returns the path of a workspace binary.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        // `cargo test` builds only this package's dependencies as libraries, not the host's
        // binary, so build the binaries here, with the same profile as this test.
        let dir = bin_dir();
        let mut cmd = cargo();
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "iim-host",
            "-p",
            "iim-client",
            "--bins",
        ]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!("cargo build failed: {status}")),
            Err(e) => Err(format!("cannot run cargo: {e}")),
        }
    });
    if let Err(e) = built {
        bail!("{e}");
    }
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!("{} was not built", path.display());
    }
    Ok(path)
}

/// The workspace's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where the wasm plugins are built: the host's build script builds the default plugins
/// there, and [`test_plugin`] the test plugins.
fn plugins_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
        .join("plugins-wasm")
}

/// The component of default plugin `name` (`chat`, `presence`, `receipts`), as the host's
/// build script built it.
pub fn default_plugin(name: &str) -> anyhow::Result<PathBuf> {
    // Building the host binary runs its build script, which builds the default plugins.
    binary("iim-host")?;
    let path = plugins_target()
        .join("wasm32-wasip2/release")
        .join(format!("iim_plugin_{name}.wasm"));
    anyhow::ensure!(path.is_file(), "{} was not built", path.display());
    Ok(path)
}

/// Builds (once per test process) the test plugin crate `iim-test-plugin-<name>` for
/// `wasm32-wasip2` and returns its component.
pub fn test_plugin(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|b| b == name) {
        let status = cargo()
            .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2"])
            .arg("-p")
            .arg(format!("iim-test-plugin-{name}"))
            .arg("--target-dir")
            .arg(plugins_target())
            .status()
            .context("cannot run cargo")?;
        anyhow::ensure!(
            status.success(),
            "building test plugin {name} failed: {status}"
        );
        built.push(name.to_owned());
    }
    let path = plugins_target()
        .join("wasm32-wasip2/release")
        .join(format!("iim_test_plugin_{name}.wasm"));
    anyhow::ensure!(path.is_file(), "{} was not built", path.display());
    Ok(path)
}

/// What each kit's example build needs on the machine (its build script installs the rest
/// from the registries): `.ci/run` installs these, and sets `IIM_KITS_REQUIRED=1` so that a
/// missing one fails the tests there instead of skipping them.
const KIT_TOOLS: &[(&str, &[&str])] = &[
    ("rust", &[]),
    ("python", &["python3"]),
    ("js", &["node", "npm"]),
    ("ts", &["node", "npm"]),
    ("c", &["clang-14", "python3"]),
    ("zig", &["python3"]),
];

/// Builds (once per test process) the example plugin `typing` of kit `lang` (`kits/LANG/example`)
/// and returns its component; `None`, with a line saying why, when the machine lacks a tool the
/// kit needs and `IIM_KITS_REQUIRED` is not set.
pub fn kit_example(lang: &str) -> anyhow::Result<Option<PathBuf>> {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, path)) = built.iter().find(|(l, _)| l == lang) {
        return Ok(Some(path.clone()));
    }
    let (_, tools) = KIT_TOOLS
        .iter()
        .find(|(l, _)| *l == lang)
        .with_context(|| format!("no kit {lang}"))?;
    let lacking: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if !lacking.is_empty() {
        anyhow::ensure!(
            std::env::var_os("IIM_KITS_REQUIRED").is_none(),
            "kit {lang} needs {} on this machine",
            lacking.join(", ")
        );
        eprintln!(
            "skipped: kit {lang} needs {} (IIM_KITS_REQUIRED=1 makes this a failure)",
            lacking.join(", ")
        );
        return Ok(None);
    }
    let path = if lang == "rust" {
        let status = cargo()
            .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2"])
            .args(["-p", "iim-plugin-typing", "--target-dir"])
            .arg(plugins_target())
            .status()
            .context("cannot run cargo")?;
        anyhow::ensure!(
            status.success(),
            "building the Rust example failed: {status}"
        );
        plugins_target().join("wasm32-wasip2/release/iim_plugin_typing.wasm")
    } else {
        let out = plugins_target().join("kits").join(lang);
        let script = workspace().join("kits").join(lang).join("example/build.sh");
        let status = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .status()
            .context("cannot run bash")?;
        anyhow::ensure!(status.success(), "{} failed: {status}", script.display());
        out.join("typing.wasm")
    };
    anyhow::ensure!(path.is_file(), "{} was not built", path.display());
    built.push((lang.to_owned(), path.clone()));
    Ok(Some(path))
}

/// Where test hosts cache compiled plugins: shared by every test and run, so that a large
/// plugin (the Python one) is compiled once.
pub fn plugin_cache() -> PathBuf {
    plugins_target().join("cache")
}

/// How long an admin command may take: `reload` compiles what changed, and a Python plugin
/// compiles in tens of seconds when the cache does not have it yet.
pub const ADMIN_STEP: Duration = Duration::from_secs(300);

/// Which plugins a test host starts with.
pub enum Plugins<'a> {
    /// The host's defaults: it installs chat, presence and receipts.
    Default,
    /// Exactly these, as `(name, component file)`.
    Only(&'a [(&'a str, &'a Path)]),
    /// Exactly these, as `(name, component file, configuration file's text)`.
    Configured(&'a [(&'a str, &'a Path, &'a str)]),
}

/// A running `iim-host` process with its own data directory.
pub struct HostProcess {
    child: Option<Child>,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its certificate.
    pub cert: PathBuf,
    data: tempfile::TempDir,
    /// Holds the data key file, outside the data directory (as a host's default, beside it,
    /// would be, but removed with the test).
    keys: tempfile::TempDir,
    stderr_log: PathBuf,
    /// The network namespace it runs in, if not the test's own.
    namespace: Option<String>,
    /// The `iim-host` it runs, when not this workspace's ([`HostProcess::start_from`]).
    program: Option<PathBuf>,
}

impl HostProcess {
    /// Starts a host on 127.0.0.1 with a fresh data directory.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with_config("")
    }

    /// Starts a host whose configuration file holds `toml` (see `host/src/config.rs`).
    pub fn start_with_config(toml: &str) -> anyhow::Result<Self> {
        Self::start_with(toml, Plugins::Default)
    }

    /// Starts a host with only the chat plugin: for tests of the delivery path that count
    /// every message a user receives (no presence notifications, no receipts).
    pub fn start_chat_only() -> anyhow::Result<Self> {
        Self::start_chat_only_with_config("")
    }

    /// [`HostProcess::start_chat_only`] with configuration `toml`.
    pub fn start_chat_only_with_config(toml: &str) -> anyhow::Result<Self> {
        let chat = default_plugin("chat")?;
        Self::start_with(toml, Plugins::Only(&[("chat", &chat)]))
    }

    /// Starts a host with configuration `toml` and the given plugins.
    pub fn start_with(toml: &str, plugins: Plugins<'_>) -> anyhow::Result<Self> {
        let data = Self::data_dir_with(toml, plugins)?;
        Self::launch(data, "127.0.0.1:0".parse()?, None)
    }

    /// [`HostProcess::start_with`], running the `iim-host` executable `program` rather than
    /// this workspace's: another build of it, say a benchmark's baseline built at an older
    /// commit. Its command line (the flags `spawn` passes, the line it prints when listening)
    /// must be this workspace's. [`HostProcess::restart`], [`HostProcess::admin`] and
    /// [`HostProcess::store_find`] run `program` too.
    pub fn start_from(program: &Path, toml: &str, plugins: Plugins<'_>) -> anyhow::Result<Self> {
        anyhow::ensure!(program.is_file(), "no iim-host at {}", program.display());
        let data = Self::data_dir_with(toml, plugins)?;
        let keys = tempfile::tempdir()?;
        Self::launch_from(
            Some(program.to_path_buf()),
            data,
            keys,
            "127.0.0.1:0".parse()?,
            None,
        )
    }

    /// A fresh data directory holding the configuration file `toml` and `plugins`.
    fn data_dir_with(toml: &str, plugins: Plugins<'_>) -> anyhow::Result<tempfile::TempDir> {
        let data = tempfile::tempdir()?;
        std::fs::write(data.path().join("host.toml"), toml)?;
        let dir = data.path().join("plugins");
        let configured: Vec<(&str, &Path, Option<&str>)> = match plugins {
            Plugins::Default => Vec::new(),
            Plugins::Only(list) => list.iter().map(|(n, f)| (*n, *f, None)).collect(),
            Plugins::Configured(list) => list.iter().map(|(n, f, t)| (*n, *f, Some(*t))).collect(),
        };
        if !matches!(plugins, Plugins::Default) {
            std::fs::create_dir_all(&dir)?;
        }
        for (name, file, toml) in configured {
            if let Some(toml) = toml {
                std::fs::write(dir.join(format!("{name}.toml")), toml)?;
            }
            std::fs::copy(file, dir.join(format!("{name}.wasm")))?;
        }
        Ok(data)
    }

    /// Starts a host with its defaults in network namespace `namespace` (see [`netns`]),
    /// listening on `listen` there.
    pub fn start_in_namespace(namespace: &str, listen: SocketAddr) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        std::fs::write(data.path().join("host.toml"), "")?;
        Self::launch(data, listen, Some(namespace))
    }

    /// Starts a host on data directory `data` (a copy of another host's: [`copy_dir`]) with a
    /// copy of `key_file` as its data key file (none: the host has no key file).
    pub fn start_on(data: tempfile::TempDir, key_file: Option<&Path>) -> anyhow::Result<Self> {
        let keys = tempfile::tempdir()?;
        if let Some(key_file) = key_file {
            std::fs::copy(key_file, keys.path().join("data.key"))?;
        }
        Self::launch_with(data, keys, "127.0.0.1:0".parse()?, None)
    }

    /// Starts the host of data directory `data`, listening on `listen` (in `namespace`).
    fn launch(
        data: tempfile::TempDir,
        listen: SocketAddr,
        namespace: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::launch_with(data, tempfile::tempdir()?, listen, namespace)
    }

    /// [`HostProcess::launch`] with the data key file in `keys`.
    fn launch_with(
        data: tempfile::TempDir,
        keys: tempfile::TempDir,
        listen: SocketAddr,
        namespace: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::launch_from(None, data, keys, listen, namespace)
    }

    /// [`HostProcess::launch_with`], running `program` (none: this workspace's `iim-host`).
    fn launch_from(
        program: Option<PathBuf>,
        data: tempfile::TempDir,
        keys: tempfile::TempDir,
        listen: SocketAddr,
        namespace: Option<&str>,
    ) -> anyhow::Result<Self> {
        let key_file = keys.path().join("data.key");
        let (child, addr, cert, stderr_log) = spawn(
            program.as_deref(),
            data.path(),
            &key_file,
            listen,
            namespace,
        )?;
        Ok(Self {
            child: Some(child),
            addr,
            cert,
            data,
            keys,
            stderr_log,
            namespace: namespace.map(str::to_owned),
            program,
        })
    }

    /// The `iim-host` executable this host runs.
    fn program(&self) -> anyhow::Result<PathBuf> {
        match &self.program {
            Some(program) => Ok(program.clone()),
            None => binary("iim-host"),
        }
    }

    /// Starts an exchange (`role = "exchange"`) on 127.0.0.1 with a fresh data directory and
    /// the secret [`NETWORK_SECRET`].
    pub fn start_exchange() -> anyhow::Result<Self> {
        Self::start_with(&exchange_config(ExchangeStore::Own), Plugins::Default)
    }

    /// [`HostProcess::start_exchange`], keeping the network's state in the PostgreSQL
    /// database at `url` (declared single-node: a test's cluster has no standby).
    pub fn start_exchange_on(url: &str) -> anyhow::Result<Self> {
        Self::start_with(
            &exchange_config(ExchangeStore::SingleNode(url)),
            Plugins::Default,
        )
    }

    /// An exchange on `store`, one more of the database that `first` uses: with a copy of
    /// `first`'s data key file, which seals what they relay.
    pub fn start_another_exchange(
        store: ExchangeStore<'_>,
        first: &HostProcess,
    ) -> anyhow::Result<Self> {
        let data = Self::data_dir_with(&exchange_config(store), Plugins::Default)?;
        let keys = tempfile::tempdir()?;
        std::fs::copy(first.key_file(), keys.path().join("data.key"))?;
        Self::launch_with(data, keys, "127.0.0.1:0".parse()?, None)
    }

    /// Starts host `server_id` in the network of `exchange`, with configuration `toml` (keys
    /// and sections other than `server_id` and `[network]`) and `plugins`.
    pub fn start_in_network(
        exchange: &HostProcess,
        server_id: &str,
        toml: &str,
        plugins: Plugins<'_>,
    ) -> anyhow::Result<Self> {
        Self::start_with(&network_config(exchange, server_id, toml), plugins)
    }

    /// Replaces the configuration file; it takes effect at the next [`HostProcess::restart`].
    pub fn rewrite_config(&self, toml: &str) -> anyhow::Result<()> {
        Ok(std::fs::write(self.data.path().join("host.toml"), toml)?)
    }

    /// A client configuration for this host that also trusts the certificates of `others`
    /// (the other hosts of its network, where it may be redirected).
    pub fn client_config_trusting(&self, others: &[&HostProcess]) -> anyhow::Result<ClientConfig> {
        let mut config = self.client_config()?;
        for other in others {
            config = config.with_ca_file(&other.cert)?;
        }
        Ok(config)
    }

    /// How many hosts `iim-host admin network` lists as up.
    pub async fn hosts_up(&self) -> anyhow::Result<usize> {
        let out = self.admin("network").await?;
        Ok(out
            .lines()
            .filter(|l| l.starts_with("host ") && l.ends_with(" up"))
            .count())
    }

    /// The value of `key` in `iim-host admin network` (a `key value` line).
    pub async fn network_stat(&self, key: &str) -> anyhow::Result<u64> {
        let out = self.admin("network").await?;
        out.lines()
            .find_map(|line| {
                line.strip_prefix(key)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .with_context(|| format!("no {key} in: {out}"))
    }

    /// Kills the process with SIGKILL (no shutdown, nothing flushed) and waits for it.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Sends SIGTERM: the host ends its sessions, flushes and exits.
    pub fn terminate(&mut self) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("not running")?;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        Ok(())
    }

    /// Waits for the process to exit and returns its status.
    pub async fn wait(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        Ok(tokio::task::spawn_blocking(move || child.wait()).await??)
    }

    /// Starts the host again on the same address and data directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9()?;
        let (child, addr, cert, log) = spawn(
            self.program.as_deref(),
            self.data.path(),
            &self.key_file(),
            self.addr,
            self.namespace.as_deref(),
        )?;
        self.child = Some(child);
        self.addr = addr;
        self.cert = cert;
        self.stderr_log = log;
        Ok(())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The host's data directory.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The host's data key file (outside its data directory).
    pub fn key_file(&self) -> PathBuf {
        self.keys.path().join("data.key")
    }

    /// The plugins directory the host watches.
    pub fn plugins_dir(&self) -> PathBuf {
        self.data.path().join("plugins")
    }

    /// Runs `iim-host admin <command>` against this host and returns what it printed.
    pub async fn admin(&self, command: &str) -> anyhow::Result<String> {
        let mut cmd = tokio::process::Command::new(self.program()?);
        cmd.arg("--data-dir")
            .arg(self.data.path())
            .arg("admin")
            .args(command.split_whitespace());
        let output = tokio::time::timeout(ADMIN_STEP, cmd.output())
            .await
            .map_err(|_| anyhow!("timed out: iim-host admin {command}"))??;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        anyhow::ensure!(
            output.status.success(),
            "iim-host admin {command} failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(stdout)
    }

    /// The host's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The `iim` command-line client for this host (`--server`, `--ca`) with profile
    /// directory `profile`; its arguments to add.
    pub fn iim(&self, profile: &Path) -> anyhow::Result<Command> {
        self.iim_in(None, profile)
    }

    /// [`HostProcess::iim`], run in network namespace `namespace` if one is given.
    pub fn iim_in(&self, namespace: Option<&str>, profile: &Path) -> anyhow::Result<Command> {
        let mut command = match namespace {
            Some(namespace) => netns::exec(namespace, &binary("iim")?),
            None => Command::new(binary("iim")?),
        };
        command
            .arg("--server")
            .arg(self.addr.to_string())
            .arg("--ca")
            .arg(&self.cert)
            .arg("--profile")
            .arg(profile);
        Ok(command)
    }

    /// A client configuration for this host.
    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        Ok(ClientConfig::new(self.addr).with_ca_file(&self.cert)?)
    }

    /// A new connection, handshake done.
    pub async fn connect(&self) -> anyhow::Result<Connection> {
        let config = self.client_config()?;
        within("connect", Connection::connect(&config))
            .await?
            .context("connect")
    }

    /// Registers `name` (password [`PASSWORD`]).
    pub async fn register(&self, name: &str) -> anyhow::Result<UserId> {
        let user = UserId::new(name)?;
        let conn = self.connect().await?;
        within("register", conn.register(&user, PASSWORD)).await??;
        conn.close().await;
        Ok(user)
    }

    /// Opens a [`Device`] of `user` named `device`, logging in with [`PASSWORD`].
    pub async fn device(
        &self,
        user: &UserId,
        device: &str,
        mode: SessionMode,
    ) -> anyhow::Result<Device> {
        let credentials = Credentials::Password(PASSWORD.into());
        let config = self.client_config()?;
        let device = DeviceId::new(device)?;
        within(
            "opening a device",
            Device::open(&config, user, &device, credentials, mode),
        )
        .await?
        .map_err(Into::into)
    }

    /// Logs `user` in on `device` in receive mode and waits for the end of its backlog.
    /// Returns the connection and the backlog.
    pub async fn online(
        &self,
        user: &UserId,
        device: &str,
    ) -> anyhow::Result<(Connection, Vec<Message>)> {
        let conn = self.connect().await?;
        let device = DeviceId::new(device)?;
        within(
            "login",
            conn.login(user, PASSWORD, &device, SessionMode::Receive),
        )
        .await??;
        let mut backlog = Vec::new();
        loop {
            match next_event(&conn).await? {
                Event::Message { seq, message } => {
                    conn.ack(seq).await?;
                    backlog.push(message);
                }
                Event::Synced { count } => {
                    assert_eq!(count as usize, backlog.len(), "Synced counts the backlog");
                    return Ok((conn, backlog));
                }
                other @ Event::Backlog { .. } => bail!("a receive session got {other:?}"),
            }
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// `command` (an `iim-host`) given data directory `data`, data key file `key_file`, the
/// configuration file in `data` and the address to listen on.
fn host_args<'a>(
    command: &'a mut Command,
    data: &Path,
    key_file: &Path,
    listen: SocketAddr,
) -> &'a mut Command {
    command
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--data-dir")
        .arg(data)
        .arg("--key-file")
        .arg(key_file)
        .arg("--config")
        .arg(data.join("host.toml"))
}

/// Starts `program` (none: this workspace's `iim-host`) on data directory `data`.
fn spawn(
    program: Option<&Path>,
    data: &Path,
    key_file: &Path,
    listen: SocketAddr,
    namespace: Option<&str>,
) -> anyhow::Result<(Child, SocketAddr, PathBuf, PathBuf)> {
    let stderr_log = data.join(format!("host-{}.log", rand_suffix()));
    let stderr = std::fs::File::create(&stderr_log)?;
    let program = match program {
        Some(program) => program.to_path_buf(),
        None => binary("iim-host")?,
    };
    let mut command = match namespace {
        Some(namespace) => netns::exec(namespace, &program),
        None => Command::new(&program),
    };
    // The shared cache, unless the configuration names one (a benchmark timing first loads).
    let config = std::fs::read_to_string(data.join("host.toml")).unwrap_or_default();
    if !config.contains("cache_dir") {
        command.arg("--plugin-cache-dir").arg(plugin_cache());
    }
    let mut child = host_args(&mut command, data, key_file, listen)
        // `IIM_TEST_HOST_LOG=info,iim_host::plugin=debug cargo test ...` gives the hosts a
        // test starts another log filter, to see why a test failed.
        .env(
            "IIM_LOG",
            std::env::var("IIM_TEST_HOST_LOG").unwrap_or_else(|_| "info".into()),
        )
        // The log is a file that tests search: plain text, without colours.
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("cannot start iim-host")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(STEP)
        .map_err(|_| anyhow!("iim-host did not report its address"))?;
    // "iim-host listening on ADDR (certificate PATH)", or "iim-host exchange listening on ..."
    let rest = line
        .trim()
        .strip_prefix("iim-host listening on ")
        .or_else(|| line.trim().strip_prefix("iim-host exchange listening on "))
        .ok_or_else(|| anyhow!("unexpected first line from iim-host: {line:?}"))?;
    let (addr, cert) = rest
        .split_once(" (certificate ")
        .ok_or_else(|| anyhow!("unexpected first line from iim-host: {line:?}"))?;
    let cert = PathBuf::from(cert.trim_end_matches(')'));
    Ok((child, addr.parse()?, cert, stderr_log))
}

impl HostProcess {
    /// The records of this (stopped) host's store that hold `text`, as `iim-host store find`
    /// lists them: `tree<TAB>key<TAB>(in the key|value)`.
    pub fn store_find(&self, text: &str) -> anyhow::Result<Vec<String>> {
        let output = host_args(
            &mut Command::new(self.program()?),
            self.data.path(),
            &self.key_file(),
            "127.0.0.1:0".parse()?,
        )
        .args(["store", "find", text])
        .env("NO_COLOR", "1")
        .output()
        .context("cannot run iim-host store find")?;
        match output.status.code() {
            Some(0 | 1) => Ok(String::from_utf8(output.stdout)?
                .lines()
                .map(str::to_owned)
                .collect()),
            _ => bail!(
                "iim-host store find failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }
}

/// Keeps only the key numbered `id` in key file `path`, current: after a rotation and its
/// re-encryption, the older keys are not needed to read anything.
pub fn keep_only_key(path: &Path, id: u32) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut blocks = text.split("[[keys]]");
    let _head = blocks.next();
    let kept: Vec<&str> = blocks
        .filter(|block| block.contains(&format!("\nid = {id}\n")))
        .collect();
    anyhow::ensure!(kept.len() == 1, "key {id} in {text}");
    std::fs::write(path, format!("current = {id}\n\n[[keys]]{}", kept[0]))?;
    Ok(())
}

/// Runs `iim-host` on data directory `data` with data key file `key_file` (which may not
/// exist) and the configuration file there, and expects it to refuse to start: returns what it
/// wrote on stderr.
pub fn refused_to_start_on(data: &Path, key_file: &Path) -> anyhow::Result<String> {
    let mut child = host_args(
        &mut Command::new(binary("iim-host")?),
        data,
        key_file,
        "127.0.0.1:0".parse()?,
    )
    .arg("--plugin-cache-dir")
    .arg(plugin_cache())
    .env("NO_COLOR", "1")
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()?;
    let started = std::time::Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > STEP {
            child.kill()?;
            bail!("iim-host did not stop by itself");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output()?;
    anyhow::ensure!(!output.status.success(), "iim-host exited successfully");
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Copies directory `from` into `to` (made if need be): its directories and regular files;
/// sockets and the like are left out.
pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Every regular file under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            found.extend(files_containing(&entry.path(), needle)?);
        } else if kind.is_file() {
            let bytes = std::fs::read(entry.path())?;
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(entry.path());
            }
        }
    }
    Ok(found)
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The password every test user gets.
pub const PASSWORD: &str = "correct horse battery";

/// The next event, failing on timeout, on the end of the connection or on an error event.
pub async fn next_event(conn: &Connection) -> anyhow::Result<Event> {
    match within("next event", conn.next_event()).await? {
        Some(Ok(event)) => Ok(event),
        Some(Err(e)) => Err(e.into()),
        None => bail!("the connection ended"),
    }
}

/// The next delivered message (acknowledged), skipping nothing: any other event fails.
pub async fn next_message(conn: &Connection) -> anyhow::Result<Message> {
    match next_event(conn).await? {
        Event::Message { seq, message } => {
            conn.ack(seq).await?;
            Ok(message)
        }
        other => bail!("expected a message, got {other:?}"),
    }
}

/// The text of a chat message.
pub fn text(message: &Message) -> String {
    String::from_utf8_lossy(&message.body).into_owned()
}

/// The error code of a failed request.
pub fn code_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> anyhow::Result<ErrorCode> {
    match result {
        Err(e) => e.code().ok_or_else(|| anyhow!("error without a code: {e}")),
        Ok(v) => bail!("expected an error, got {v:?}"),
    }
}

/// A raw QUIC connection to the host, speaking bytes: for tests of malformed input.
pub struct RawConnection {
    /// The connection.
    pub conn: quinn::Connection,
    /// The stream's sending half.
    pub send: quinn::SendStream,
    /// The stream's receiving half.
    pub recv: quinn::RecvStream,
    _endpoint: quinn::Endpoint,
}

impl RawConnection {
    /// Connects and opens the stream; sends nothing.
    pub async fn open(host: &HostProcess) -> anyhow::Result<Self> {
        Self::open_from(host, "127.0.0.1".parse()?).await
    }

    /// [`RawConnection::open`] from address `from` (another loopback address is another
    /// client's address, for the host's limits per address).
    pub async fn open_from(host: &HostProcess, from: std::net::IpAddr) -> anyhow::Result<Self> {
        let config = host.client_config()?;
        let mut endpoint = quinn::Endpoint::client(SocketAddr::new(from, 0))?;
        endpoint.set_default_client_config(iim_client::quic_client_config(&config.roots)?);
        let conn = within("raw connect", endpoint.connect(host.addr, "localhost")?).await??;
        let (send, recv) = conn.open_bi().await?;
        Ok(Self {
            conn,
            send,
            recv,
            _endpoint: endpoint,
        })
    }

    /// Connects, opens the stream and sends `Hello` for `version`.
    pub async fn hello(host: &HostProcess, version: u16) -> anyhow::Result<Self> {
        let mut raw = Self::open(host).await?;
        let hello = iim_client::proto::ClientFrame::Hello {
            version,
            agent: "raw".into(),
        };
        raw.send
            .write_all(&iim_client::proto::encode_frame(&hello, 1024)?)
            .await?;
        Ok(raw)
    }

    /// Sends `frame`, and reads the host's frames until one answers request `req`: returns it.
    pub async fn request(
        &mut self,
        req: u64,
        frame: &iim_client::proto::ClientFrame,
    ) -> anyhow::Result<iim_client::proto::ServerFrame> {
        use iim_client::proto::ServerFrame;
        self.send
            .write_all(&iim_client::proto::encode_frame(frame, 1 << 16)?)
            .await?;
        let mut decoder = iim_client::proto::FrameDecoder::new(1 << 20);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while let Some(frame) = decoder.decode::<ServerFrame>()? {
                let answers = match &frame {
                    ServerFrame::Ok { req: r }
                    | ServerFrame::LoggedIn { req: r, .. }
                    | ServerFrame::Error { req: Some(r), .. } => *r == req,
                    _ => false,
                };
                if answers {
                    return Ok(frame);
                }
            }
            let n = within("an answer", self.recv.read(&mut buf))
                .await??
                .context("the host ended the stream")?;
            decoder.push(&buf[..n]);
        }
    }

    /// Reads to the end of the stream and returns the code of the closing error frame (an
    /// `Error` without `req`, the last frame), failing if there is none.
    pub async fn closing_code(&mut self) -> anyhow::Result<ErrorCode> {
        let frames = self.read_to_end().await?;
        match frames.last() {
            Some(iim_client::proto::ServerFrame::Error {
                req: None, code, ..
            }) => Ok(*code),
            _ => bail!("no closing error frame in {frames:?}"),
        }
    }

    /// Reads every frame until the host ends the stream; returns them.
    pub async fn read_to_end(&mut self) -> anyhow::Result<Vec<iim_client::proto::ServerFrame>> {
        let bytes = within("read to end", self.recv.read_to_end(1 << 20)).await??;
        let mut decoder = iim_client::proto::FrameDecoder::new(1 << 20);
        decoder.push(&bytes);
        let mut frames = Vec::new();
        while let Some(frame) = decoder.decode()? {
            frames.push(frame);
        }
        Ok(frames)
    }
}

/// A host with two users, `alice` and `bob`, each online on device `phone`.
pub struct TwoUsers {
    /// The host.
    pub host: HostProcess,
    /// Alice.
    pub alice: UserId,
    /// Bob.
    pub bob: UserId,
    /// Alice's phone.
    pub a: Connection,
    /// Bob's phone.
    pub b: Connection,
}

impl TwoUsers {
    /// Starts a host with only the chat plugin, registers both users and brings their phones
    /// online.
    pub async fn start() -> anyhow::Result<Self> {
        let host = HostProcess::start_chat_only()?;
        let alice = host.register("alice").await?;
        let bob = host.register("bob").await?;
        let (a, _) = host.online(&alice, "phone").await?;
        let (b, _) = host.online(&bob, "phone").await?;
        Ok(Self {
            host,
            alice,
            bob,
            a,
            b,
        })
    }
}

/// The ids of `messages`, in order.
pub fn ids(messages: &[Message]) -> Vec<iim_client::proto::MessageId> {
    messages.iter().map(|m| m.id).collect()
}

/// Alice sends Bob messages of `kind` (bodies `m0`, `m1`, ...) until `changes` is done (and at
/// least 100 messages), then an end marker; fails unless Bob got every one once, in order, and
/// nothing after. For plugins replaced or reconfigured under load.
pub async fn under_load<F>(
    (a, b, bob): (Connection, Connection, UserId),
    kind: iim_client::proto::MessageKind,
    changes: F,
) -> anyhow::Result<F::Output>
where
    F: std::future::Future,
{
    let changing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let still_changing = std::sync::Arc::clone(&changing);
    let sent_kind = kind.clone();
    let sender = tokio::spawn(async move {
        let mut ids = Vec::new();
        while ids.len() < 100 || still_changing.load(std::sync::atomic::Ordering::SeqCst) {
            let body = format!("m{}", ids.len());
            let accepted = a
                .submit(
                    iim_client::new_client_id(),
                    sent_kind.clone(),
                    std::slice::from_ref(&bob),
                    body.as_bytes(),
                )
                .await?;
            ids.push(accepted.id);
        }
        a.submit(
            iim_client::new_client_id(),
            sent_kind,
            std::slice::from_ref(&bob),
            b"end",
        )
        .await?;
        anyhow::Ok((a, ids))
    });
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&received);
    let receiver = tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            let message = next_message(&b).await?;
            if text(&message) == "end" {
                return anyhow::Ok((b, got));
            }
            got.push(message);
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    // The changes start once messages flow, so that they happen under the load.
    within("the first messages", async {
        while received.load(std::sync::atomic::Ordering::SeqCst) < 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    let outcome = changes.await;
    changing.store(false, std::sync::atomic::Ordering::SeqCst);
    let (_a, sent) = within("sender", sender).await???;
    let (b, got) = within("receiver", receiver).await???;
    anyhow::ensure!(ids(&got) == sent, "not every message once, in order");
    for (i, message) in got.iter().enumerate() {
        anyhow::ensure!(message.kind == kind, "{message:?} is not {kind}");
        anyhow::ensure!(text(message) == format!("m{i}"), "{message:?} is not m{i}");
    }
    if let Ok(event) = tokio::time::timeout(Duration::from_millis(300), b.next_event()).await {
        anyhow::bail!("after the end marker, {event:?}");
    }
    Ok(outcome)
}
