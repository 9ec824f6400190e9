//! The plugins directory: what is loaded at start, and every change after.
//!
//! Each `NAME.wasm` in the directory is a plugin named `NAME` (a valid user-style name), with
//! an optional `NAME.toml` beside it whose top-level `key = value` pairs are its configuration.
//! The loader looks at the directory every `watch_interval_ms` (and at once when the operator
//! asks). A new or changed file is compiled, checked against the WIT world, instantiated and
//! initialised off to the side; only a build that passes all of that replaces the serving
//! one, and a build that fails is refused with one log line while the old build keeps serving.
//! A removed file unloads its plugin.

use super::lane::{self, Command, Ready};
use super::runtime::{LoadError, sha256_hex};
use super::settings::{self, PluginFile};
use super::{LaneHandle, LoadedInfo, PluginHost, Subscription};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{Semaphore, mpsc};

/// The plugins built with the host, installed in a plugins directory that does not exist yet,
/// and upgraded in one where a host installed them (see [`install_defaults`]).
pub const DEFAULT_PLUGINS: &[(&str, &[u8])] = &[
    ("chat", include_bytes!(env!("IIM_PLUGIN_CHAT_WASM"))),
    ("presence", include_bytes!(env!("IIM_PLUGIN_PRESENCE_WASM"))),
    ("receipts", include_bytes!(env!("IIM_PLUGIN_RECEIPTS_WASM"))),
    ("groups", include_bytes!(env!("IIM_PLUGIN_GROUPS_WASM"))),
    ("keys", include_bytes!(env!("IIM_PLUGIN_KEYS_WASM"))),
];

/// The configuration written beside a default plugin when it is installed, if the directory
/// has none of that name: the key directory runs in one instance (a claim takes another
/// user's one-time key package, which two instances could hand out twice).
pub const DEFAULT_CONFIGS: &[(&str, &str)] = &[(
    "keys",
    "# Written by iim-host with the keys plugin: one instance, see plugins/keys/README.md.\n\
     [host]\ninstances = 1\n",
)];

/// Why a plugin file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum RefusedPlugin {
    /// The file could not be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The file name is not a valid plugin name.
    #[error("{0} is not a valid plugin name (a-z 0-9 . _ -, 1 to 64 bytes)")]
    Name(String),
    /// The configuration file is not a flat TOML table.
    #[error("configuration {0}: {1}")]
    Config(PathBuf, String),
    /// The build could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// It handles a message kind another plugin already handles.
    #[error("it handles {0}, which plugin {1} already handles")]
    Conflict(Subscription, String),
}

/// What the loader last saw of one plugin's files.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    wasm: (SystemTime, u64),
    config: Option<(SystemTime, u64)>,
}

/// The file in a plugins directory that records the default plugins the host installed there,
/// each with the SHA-256 of the bytes it wrote: `NAME HEX` per line. The loader reads only
/// `.wasm` files, so it is not mistaken for a plugin.
pub const DEFAULTS_MANIFEST: &str = ".iim-defaults";

/// What [`install_defaults`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DefaultsReport {
    /// The directory was created, with every default plugin in it.
    pub created: bool,
    /// Default plugins replaced by this host's build: the file was the one an earlier host
    /// installed, untouched since.
    pub upgraded: Vec<String>,
    /// Default plugins left as they are because the operator replaced them.
    pub kept: Vec<String>,
    /// Default plugins new in this host's build (the manifest does not name them, and no file
    /// of their name is there): installed.
    pub added: Vec<String>,
}

/// Creates the plugins directory with the default plugins if it does not exist; in one that
/// does, upgrades each default plugin this host's build differs from, if the file there is
/// still the one a host installed (the manifest says so). A default plugin the operator
/// replaced is kept; one the operator removed stays removed; one new in this build (not in the
/// manifest, no file of its name) is added; a directory without a manifest (made by hand) is
/// not touched. A default plugin of this host's that has a [`DEFAULT_CONFIGS`] entry and no
/// configuration file gets that one.
pub fn install_defaults(dir: &Path) -> std::io::Result<DefaultsReport> {
    let mut report = DefaultsReport::default();
    let mut manifest = BTreeMap::new();
    if dir.exists() {
        let text = match std::fs::read_to_string(dir.join(DEFAULTS_MANIFEST)) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
            Err(e) => return Err(e),
        };
        for line in text.lines() {
            if let Some((name, digest)) = line.split_once(' ') {
                manifest.insert(name.to_owned(), digest.trim().to_owned());
            }
        }
    } else {
        std::fs::create_dir_all(dir)?;
        report.created = true;
    }
    for (name, bytes) in DEFAULT_PLUGINS {
        let ours = sha256_hex(bytes);
        let path = dir.join(format!("{name}.wasm"));
        if !report.created {
            let Some(installed) = manifest.get(*name) else {
                if path.exists() {
                    continue; // the operator's own plugin of that name
                }
                report.added.push((*name).to_owned());
                let partial = dir.join(format!(".{name}.wasm.partial"));
                std::fs::write(&partial, bytes)?;
                std::fs::rename(&partial, &path)?;
                manifest.insert((*name).to_owned(), ours);
                continue;
            };
            let there = match std::fs::read(&path) {
                Ok(there) => sha256_hex(&there),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed
                Err(e) => return Err(e),
            };
            if there == ours {
                continue;
            }
            if there != *installed {
                report.kept.push((*name).to_owned());
                continue;
            }
            report.upgraded.push((*name).to_owned());
        }
        // Written beside it and renamed: a crash leaves the old file or the new one whole.
        let partial = dir.join(format!(".{name}.wasm.partial"));
        std::fs::write(&partial, bytes)?;
        std::fs::rename(&partial, &path)?;
        manifest.insert((*name).to_owned(), ours);
    }
    for (name, config) in DEFAULT_CONFIGS {
        let path = dir.join(format!("{name}.toml"));
        let ours = manifest.contains_key(*name) && dir.join(format!("{name}.wasm")).exists();
        if ours && !path.exists() {
            // Before the plugin is loaded (the loader runs after): it starts configured.
            let partial = dir.join(format!(".{name}.toml.partial"));
            std::fs::write(&partial, config)?;
            std::fs::rename(&partial, &path)?;
        }
    }
    if report.created || !report.upgraded.is_empty() || !report.added.is_empty() {
        let text: String = manifest
            .iter()
            .map(|(name, digest)| format!("{name} {digest}\n"))
            .collect();
        let partial = dir.join(format!("{DEFAULTS_MANIFEST}.partial"));
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, dir.join(DEFAULTS_MANIFEST))?;
    }
    Ok(report)
}

/// Loads every plugin in `dir` now, then watches it until the host shuts down.
pub struct Loader {
    host: Arc<PluginHost>,
    dir: PathBuf,
    seen: BTreeMap<String, Seen>,
}

impl Loader {
    /// A loader of `dir` for `host`.
    pub fn new(host: Arc<PluginHost>, dir: PathBuf) -> Self {
        Self {
            host,
            dir,
            seen: BTreeMap::new(),
        }
    }

    /// Looks at the directory once and applies what changed. Returns the number of plugins
    /// loaded, replaced or removed.
    pub async fn scan(&mut self) -> usize {
        let found = match self.list() {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot read the plugins directory");
                return 0;
            }
        };
        let mut changes = 0;
        let gone: Vec<String> = self
            .seen
            .keys()
            .filter(|name| !found.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.seen.remove(&name);
            self.host.set_refused(&name, None);
            if self.host.unload(&name) {
                tracing::info!(plugin = %name, "plugin file removed; unloading");
                changes += 1;
            }
        }
        for (name, seen) in found {
            if self.seen.get(&name) == Some(&seen) {
                continue;
            }
            self.seen.insert(name.clone(), seen);
            match self.load(&name).await {
                Ok(info) => {
                    tracing::info!(
                        plugin = %name,
                        version = %info.version,
                        digest = %info.digest,
                        subscriptions = %info.subscriptions.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "),
                        "plugin loaded"
                    );
                    self.host.set_refused(&name, None);
                    changes += 1;
                }
                Err(e) => {
                    self.host.set_refused(&name, Some(e.to_string()));
                    let serving = self.host.lanes().contains_key(&name);
                    tracing::error!(
                        plugin = %name,
                        error = %e,
                        "plugin refused; {}",
                        if serving { "the loaded build keeps serving" } else { "not loaded" }
                    );
                }
            }
        }
        changes
    }

    /// Scans every interval, or when woken, until shutdown.
    pub async fn watch(mut self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let every = Duration::from_millis(self.host.config.watch_interval_ms.max(10));
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.host.rescan.notified() => {}
                _ = shutdown.wait_for(|stopping| *stopping) => return,
            }
            if self.scan().await > 0 {
                // A plugin came or changed: messages that waited for a handler can go now.
                if let Err(e) = self.host.route_pending().await {
                    tracing::error!(error = %e, "cannot route pending messages");
                }
            }
            self.host.scanned();
        }
    }

    fn list(&self) -> std::io::Result<BTreeMap<String, Seen>> {
        let mut found = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("wasm") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp =
                |m: &std::fs::Metadata| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len());
            let config = std::fs::metadata(path.with_extension("toml"))
                .ok()
                .map(|m| stamp(&m));
            found.insert(
                name.to_owned(),
                Seen {
                    wasm: stamp(&meta),
                    config,
                },
            );
        }
        Ok(found)
    }

    /// Compiles, instantiates and initialises `name`, then starts its lane or hands the new
    /// build to the running lane.
    async fn load(&self, name: &str) -> Result<LoadedInfo, RefusedPlugin> {
        if iim_proto::UserId::new(name).is_err() {
            return Err(RefusedPlugin::Name(name.to_owned()));
        }
        let wasm_path = self.dir.join(format!("{name}.wasm"));
        let bytes = tokio::fs::read(&wasm_path)
            .await
            .map_err(|e| RefusedPlugin::Read(wasm_path.clone(), e))?;
        let config_path = wasm_path.with_extension("toml");
        let PluginFile { config, settings } = settings::read(&config_path, &self.host.config)
            .map_err(|e| RefusedPlugin::Config(config_path, e))?;
        if let Some(cache) = &self.host.cache_dir
            && bytes.len() > COMPILE_IN_CHILD_OVER
        {
            compile_in_child(&wasm_path, cache, &self.host.config).await;
        }
        let runtime = Arc::clone(&self.host.runtime);
        let build = tokio::task::spawn_blocking(move || runtime.compile(&bytes))
            .await
            .map_err(|e| LoadError::Trap(format!("compilation stopped: {e}")))??;
        let services = Arc::clone(&self.host.services);
        let (mut instance, info) = self
            .host
            .runtime
            .instantiate(&build, name, Arc::clone(&services), &config, &settings)
            .await?;
        let groups = instance.state().subscribed_groups();
        let info = LoadedInfo::from_init(info, groups, &build.digest)?;
        if info.name != name {
            tracing::info!(plugin = %name, calls_itself = %info.name, "the plugin's file name is its name here; plugin-info.name differs");
        }
        // One lane per instance. The instance that checked the build serves the first lane;
        // the others make theirs when their first event comes.
        let mut first = Some(instance);
        let ready = (0..settings.instances)
            .map(|_| Ready {
                build: build.clone(),
                config: config.clone(),
                settings: settings.clone(),
                info: info.clone(),
                instance: first.take(),
            })
            .collect();
        self.host.install(name, ready)?;
        Ok(info)
    }
}

/// Components larger than this (bytes) are compiled in a child process first: an interpreter
/// (JavaScript, Python: 12–18 MB) takes hundreds of MiB to compile; a plugin of a compiled
/// language (well under 4 MB) takes little, and a child would only add its start-up.
const COMPILE_IN_CHILD_OVER: usize = 4 << 20;

/// Has a child `iim-host` compile `wasm` into the compiled-code cache, so that the host's own
/// compile finds it there. Compiling a large component (a JavaScript or Python interpreter)
/// takes hundreds of MiB, which the allocator keeps once freed: in a child, the memory goes
/// when the child does. Only when this process is `iim-host` (a test or benchmark embedding
/// the host compiles in process); any failure leaves the compile to this process, which then
/// reports the error.
async fn compile_in_child(wasm: &Path, cache: &Path, config: &crate::config::PluginsConfig) {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    if exe.file_stem().and_then(|s| s.to_str()) != Some("iim-host") {
        return;
    }
    let child = tokio::process::Command::new(&exe)
        .args(["plugin", "compile"])
        .arg(wasm)
        .arg("--cache-dir")
        .arg(cache)
        .args(["--instances", &config.instances.to_string()])
        .args(["--max-memory-mib", &config.max_memory_mib.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(Duration::from_secs(600), child).await {
        Ok(Ok(status)) if status.success() => {}
        outcome => {
            tracing::debug!(?outcome, wasm = %wasm.display(), "compiling in a child did not succeed; compiling here")
        }
    }
}

impl PluginHost {
    /// Starts the lanes of a new plugin, one per instance in `ready`, or hands a new build to
    /// the running lanes, one instance each: atomically with respect to routing, so no event
    /// is queued for a build that does not subscribe to it.
    fn install(self: &Arc<Self>, name: &str, ready: Vec<Ready>) -> Result<(), RefusedPlugin> {
        let Some(info) = ready.first().map(|r| r.info.clone()) else {
            return Err(LoadError::Trap("no instance was made".into()).into());
        };
        let mut lanes = self.lanes();
        for sub in &info.subscriptions {
            if !matches!(sub, Subscription::Message(_) | Subscription::Groups) {
                continue;
            }
            // A deleted account's notice goes to every plugin that asks for it.
            if matches!(sub, Subscription::Message(iim_proto::MessageKind::Custom(k))
                if k == iim_proto::body::ACCOUNT_DELETED_KIND)
            {
                continue;
            }
            if let Some((other, _)) = lanes
                .iter()
                .find(|(other, lane)| *other != name && lane.info.subscriptions.contains(sub))
            {
                return Err(RefusedPlugin::Conflict(sub.clone(), other.clone()));
            }
        }
        if let Some(lane) = lanes.get_mut(name)
            && lane.queues.len() != ready.len()
        {
            // Another number of instances: new lanes, which start once the old ones have
            // handled what was queued in them, so that each user's events stay in order.
            let gate = lane.retire();
            let permits = Arc::clone(&lane.permits);
            tracing::info!(
                plugin = %name,
                from = %lane.info.digest,
                to = %info.digest,
                version = %info.version,
                instances = ready.len(),
                "plugin replaced, with new lanes once the old ones are done"
            );
            lanes.remove(name);
            self.start_lanes(&mut lanes, name, ready, Some(gate), permits);
            return Ok(());
        }
        if let Some(lane) = lanes.get_mut(name) {
            // The old build's queues stay: what was raised before this is handled by the old
            // build, what is raised after by the new one. The lock held here keeps every
            // event raised meanwhile on one side of the hand-over in every lane.
            let settings = ready[0].settings.clone();
            let mut handed = 0;
            let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(ready.len()));
            for (queue, ready) in lane.queues.iter().zip(ready) {
                let swap = Command::Swap(Box::new(ready), Arc::clone(&waiting));
                if queue.send(swap).is_ok() {
                    handed += 1;
                }
            }
            if handed == lane.queues.len() {
                lane.info = info;
                lane.settings = settings;
                return Ok(());
            }
            // A lane ended (it cannot, short of a panic): stop the others and refuse; the
            // next look at the directory starts the plugin afresh.
            if let Some(lane) = lanes.remove(name) {
                lane.stop();
            }
            return Err(LoadError::Trap("the plugin's lanes had stopped".into()).into());
        }
        let permits = Arc::new(Semaphore::new(self.config.queue));
        self.start_lanes(&mut lanes, name, ready, None, permits);
        Ok(())
    }

    /// Starts one lane per build in `ready` for plugin `name`, after `gate` if given.
    fn start_lanes(
        self: &Arc<Self>,
        lanes: &mut BTreeMap<String, LaneHandle>,
        name: &str,
        ready: Vec<Ready>,
        gate: Option<lane::Gate>,
        permits: Arc<Semaphore>,
    ) {
        let Some(first) = ready.first() else {
            return;
        };
        let (info, settings) = (first.info.clone(), first.settings.clone());
        let mut queues = Vec::with_capacity(ready.len());
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for (index, ready) in ready.into_iter().enumerate() {
            let (queue, commands) = mpsc::unbounded_channel();
            queues.push(queue);
            let gate = gate.clone();
            tasks.push(tokio::spawn(lane::run(
                Arc::clone(self),
                name.to_owned(),
                index,
                commands,
                ready,
                gate,
            )));
        }
        lanes.insert(
            name.to_owned(),
            LaneHandle {
                queues,
                permits,
                info,
                settings,
            },
        );
    }

    /// Stops plugin `name`'s lanes; `false` if it was not loaded.
    pub fn unload(&self, name: &str) -> bool {
        match self.lanes().remove(name) {
            Some(lane) => {
                lane.stop();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(dir: &Path) -> String {
        std::fs::read_to_string(dir.join(DEFAULTS_MANIFEST)).expect("manifest")
    }

    #[test]
    fn defaults_are_installed_then_upgraded_only_where_untouched() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("plugins");
        let report = install_defaults(&dir).expect("install");
        assert!(report.created);
        for (name, bytes) in DEFAULT_PLUGINS {
            let there = std::fs::read(dir.join(format!("{name}.wasm"))).expect("installed");
            assert_eq!(&there, bytes);
            assert!(manifest(&dir).contains(&format!("{name} {}\n", sha256_hex(bytes))));
        }
        let keys = std::fs::read_to_string(dir.join("keys.toml")).expect("keys' configuration");
        assert!(keys.contains("instances = 1"), "{keys}");
        // The operator's own configuration is left as it is.
        std::fs::write(dir.join("keys.toml"), "[host]\ninstances = 1\n# mine\n").expect("write");
        assert_eq!(
            install_defaults(&dir).expect("again"),
            DefaultsReport::default()
        );
        assert!(
            std::fs::read_to_string(dir.join("keys.toml"))
                .expect("read")
                .contains("# mine")
        );

        // As if an earlier host had installed other builds: chat untouched since, presence
        // replaced by the operator afterwards, receipts removed by the operator.
        let old = b"an older build".as_slice();
        let mut text = String::new();
        for (name, _) in DEFAULT_PLUGINS {
            text.push_str(&format!("{name} {}\n", sha256_hex(old)));
        }
        std::fs::write(dir.join(DEFAULTS_MANIFEST), text).expect("manifest");
        std::fs::write(dir.join("chat.wasm"), old).expect("chat");
        std::fs::write(dir.join("presence.wasm"), b"the operator's own").expect("presence");
        std::fs::remove_file(dir.join("receipts.wasm")).expect("receipts");

        let report = install_defaults(&dir).expect("upgrade");
        assert_eq!(
            report,
            DefaultsReport {
                created: false,
                upgraded: vec!["chat".into()],
                kept: vec!["presence".into()],
                added: Vec::new(),
            }
        );
        let chat = DEFAULT_PLUGINS
            .iter()
            .find(|(n, _)| *n == "chat")
            .expect("chat");
        assert_eq!(std::fs::read(dir.join("chat.wasm")).expect("chat"), chat.1);
        assert!(manifest(&dir).contains(&format!("chat {}\n", sha256_hex(chat.1))));
        assert_eq!(
            std::fs::read(dir.join("presence.wasm")).expect("presence"),
            b"the operator's own"
        );
        assert!(!dir.join("receipts.wasm").exists(), "removed stays removed");
        assert!(
            !std::fs::read_dir(&dir).expect("list").any(|e| e
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .ends_with(".partial")),
            "no partial file left"
        );
    }

    #[test]
    fn a_default_plugin_new_in_this_build_is_added_unless_a_file_has_its_name() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("plugins");
        install_defaults(&dir).expect("install");
        // As an earlier host left it, before groups was a default plugin.
        let text: String = manifest(&dir)
            .lines()
            .filter(|line| !line.starts_with("groups "))
            .map(|line| format!("{line}\n"))
            .collect();
        std::fs::write(dir.join(DEFAULTS_MANIFEST), text).expect("manifest");
        std::fs::remove_file(dir.join("groups.wasm")).expect("groups");
        let report = install_defaults(&dir).expect("again");
        assert_eq!(report.added, ["groups"]);
        assert!(dir.join("groups.wasm").exists());
        assert!(manifest(&dir).contains("groups "));
        // The operator removes it: it stays removed.
        std::fs::remove_file(dir.join("groups.wasm")).expect("groups");
        assert_eq!(
            install_defaults(&dir).expect("third"),
            DefaultsReport::default()
        );
        assert!(!dir.join("groups.wasm").exists());

        // A plugin of the operator's own by that name is not replaced.
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("plugins");
        install_defaults(&dir).expect("install");
        std::fs::write(dir.join(DEFAULTS_MANIFEST), "").expect("manifest");
        std::fs::write(dir.join("groups.wasm"), b"mine").expect("mine");
        let report = install_defaults(&dir).expect("again");
        assert!(!report.added.contains(&"groups".to_owned()));
        assert_eq!(
            std::fs::read(dir.join("groups.wasm")).expect("read"),
            b"mine"
        );
    }

    #[test]
    fn a_directory_made_by_hand_is_not_touched() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(root.path().join("chat.wasm"), b"mine").expect("write");
        assert_eq!(
            install_defaults(root.path()).expect("install"),
            DefaultsReport::default()
        );
        assert_eq!(
            std::fs::read(root.path().join("chat.wasm")).expect("read"),
            b"mine"
        );
        assert!(!root.path().join(DEFAULTS_MANIFEST).exists());
    }
}
