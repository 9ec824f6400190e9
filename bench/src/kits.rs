//! The plugin kits compared on one workload: each kit's example (`kits/LANG/example`, the same
//! `typing` plugin in every language) against the Rust one, in one run.
//!
//! For each language, in a process of its own (so that one language's memory is not another's):
//! - *size* of the component;
//! - *first load*: compiling it with the host's engine and no cache (what a host does the first
//!   time it sees the file), then loading it again from a compiled-code cache (what a restart
//!   or a second host with the same cache does);
//! - *memory*: the process's resident memory as the host's instances are made (each
//!   initialised and given one event, as a lane's would be): the first instance, and each one
//!   after it;
//! - *per event*: the median over rounds of handling a typing event (the message passed on to
//!   one addressee: `resolve` and `send` across the boundary), in µs, and as a ratio against
//!   the Rust example measured in the same run.
//!
//! `iim-bench plugins --lang rust,python,js,ts,c,zig [--events 2000] [--instances 8] [--json]`
//! builds each example with its kit's build script (`cargo` for Rust) into
//! `target/kits-bench/`, then measures.

use anyhow::{Context, anyhow};
use iim_host::config::PluginsConfig;
use iim_host::plugin::check::Sandbox;
use iim_host::plugin::imports::{Call, Effects};
use iim_host::plugin::runtime::CallOutcome;
use iim_host::plugin::settings::Settings;
use iim_host::plugin::{Event, Runtime};
use iim_proto::{DeviceId, Message, MessageId, MessageKind, UserId};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The figures of one language.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Figures {
    /// The kit.
    pub lang: String,
    /// Size of the component, bytes.
    pub size: u64,
    /// Compiling it with no cache, seconds.
    pub compile_s: f64,
    /// Loading it from the compiled-code cache, seconds.
    pub cached_load_s: f64,
    /// Resident memory the first instance added (with the compiled code), MiB.
    pub first_instance_mib: f64,
    /// Resident memory each further instance added, MiB (mean).
    pub per_instance_mib: f64,
    /// Instances made.
    pub instances: usize,
    /// Handling one typing event, µs (median of the rounds).
    pub event_us: f64,
    /// In a running `iim-host` (release build, chat loaded): how long `admin reload` took to
    /// load the plugin the first time (compile, check, init), seconds.
    #[serde(default)]
    pub host_first_load_s: f64,
    /// The host's resident memory growth from that load, MiB.
    #[serde(default)]
    pub host_load_mib: f64,
    /// `event_us` against the Rust example's in the same run (filled in by the parent; 0 until
    /// then).
    #[serde(default)]
    pub event_ratio: f64,
}

/// Builds the example of every language in `langs` and measures each in a child process.
pub fn run(langs: &[String], events: u32, instances: usize) -> anyhow::Result<Vec<Figures>> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the bench crate is in the workspace")?
        .to_path_buf();
    let out = workspace.join("target/kits-bench");
    let mut langs: Vec<String> = langs.to_vec();
    if !langs.iter().any(|l| l == "rust") {
        // The baseline, always.
        langs.insert(0, "rust".into());
    }
    let mut figures = Vec::new();
    for lang in &langs {
        eprintln!("iim-bench plugins: building the {lang} example");
        let wasm = build(&workspace, &out, lang)?;
        eprintln!("iim-bench plugins: measuring the {lang} example");
        let child = std::process::Command::new(std::env::current_exe()?)
            .arg("plugin-kit")
            .arg("--lang")
            .arg(lang)
            .arg("--wasm")
            .arg(&wasm)
            .args(["--events", &events.to_string()])
            .args(["--instances", &instances.to_string()])
            .output()
            .context("cannot run iim-bench plugin-kit")?;
        anyhow::ensure!(
            child.status.success(),
            "measuring {lang} failed: {}",
            String::from_utf8_lossy(&child.stderr)
        );
        let mut f: Figures = serde_json::from_slice(&child.stdout)
            .with_context(|| format!("the {lang} measurement printed no figures"))?;
        eprintln!("iim-bench plugins: loading the {lang} example into a running host");
        (f.host_first_load_s, f.host_load_mib) = in_a_host(&wasm)?;
        figures.push(f);
    }
    let rust = figures
        .iter()
        .find(|f| f.lang == "rust")
        .map(|f| f.event_us)
        .unwrap_or(f64::NAN);
    for f in &mut figures {
        f.event_ratio = f.event_us / rust;
    }
    Ok(figures)
}

/// Loads `wasm` into a fresh `iim-host` (chat only) and returns how long the load took and how
/// much the host's resident memory grew.
fn in_a_host(wasm: &Path) -> anyhow::Result<(f64, f64)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // A cache of its own: the first load compiles.
        let cache = tempfile::tempdir()?;
        let chat = iim_e2e::default_plugin("chat")?;
        let host = iim_e2e::HostProcess::start_with(
            &format!("[plugins]\ncache_dir = {:?}\n", cache.path()),
            iim_e2e::Plugins::Only(&[("chat", &chat)]),
        )?;
        let pid = host.pid().context("the host runs")?;
        // Settled after its start (chat compiled, the store open).
        host.admin("plugins").await?;
        let before = crate::process::rss_mib(pid)?;
        let tmp = host.plugins_dir().join(".typing.partial");
        std::fs::copy(wasm, &tmp)?;
        std::fs::rename(&tmp, host.plugins_dir().join("typing.wasm"))?;
        let started = Instant::now();
        let listed = host.admin("reload").await?;
        let took = started.elapsed().as_secs_f64();
        anyhow::ensure!(listed.contains("message(typing)"), "not loaded: {listed}");
        let after = crate::process::rss_mib(pid)?;
        Ok((took, after - before))
    })
}

fn build(workspace: &Path, out: &Path, lang: &str) -> anyhow::Result<PathBuf> {
    if lang == "rust" {
        let target = out.join("rust-target");
        let status = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
            .current_dir(workspace)
            .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2"])
            .args(["-p", "iim-plugin-typing", "--target-dir"])
            .arg(&target)
            .status()?;
        anyhow::ensure!(status.success(), "building the Rust example failed");
        return Ok(target.join("wasm32-wasip2/release/iim_plugin_typing.wasm"));
    }
    let script = workspace.join("kits").join(lang).join("example/build.sh");
    anyhow::ensure!(
        script.is_file(),
        "no kit {lang}: {} is missing",
        script.display()
    );
    let dir = out.join(lang);
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .status()?;
    anyhow::ensure!(status.success(), "{} failed", script.display());
    Ok(dir.join("typing.wasm"))
}

/// The process's resident memory, in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Measures one language's component (the child process's work).
pub fn measure_one(
    lang: &str,
    wasm: &Path,
    events: u32,
    instances: usize,
) -> anyhow::Result<Figures> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(measure(lang, wasm, events, instances.max(1)))
}

async fn measure(
    lang: &str,
    wasm: &Path,
    events: u32,
    instances: usize,
) -> anyhow::Result<Figures> {
    let bytes = std::fs::read(wasm).with_context(|| format!("cannot read {}", wasm.display()))?;
    let alice = UserId::new("alice")?;
    let bob = UserId::new("bob")?;
    let sandbox = Sandbox::new(&[alice.clone(), bob.clone()])?;
    let services = Arc::clone(&sandbox.services);
    let dir = tempfile::tempdir()?;
    let config = PluginsConfig::default();
    let settings = Settings {
        instances,
        ..Settings::defaults(&config)
    };

    // First load, no cache; then from a cache another engine filled.
    let cache = dir.path().join("cache");
    let cold = Runtime::new(&config, None).map_err(|e| anyhow!("{e}"))?;
    let started = Instant::now();
    drop(cold.compile(&bytes)?);
    let compile_s = started.elapsed().as_secs_f64();
    drop(cold);
    let filler = Runtime::new(&config, Some(&cache)).map_err(|e| anyhow!("{e}"))?;
    drop(filler.compile(&bytes)?);
    drop(filler);
    let plugins = Runtime::new(&config, Some(&cache)).map_err(|e| anyhow!("{e}"))?;
    iim_host::plugin::runtime::start_ticker(plugins.engine());
    let before = rss();
    let started = Instant::now();
    let build = plugins.compile(&bytes)?;
    let cached_load_s = started.elapsed().as_secs_f64();

    let phone = DeviceId::new("phone")?;
    let mut next_id = 0;
    let mut event = || {
        next_id += 1;
        Event::Message(Arc::new(Message {
            id: MessageId(next_id),
            kind: MessageKind::Custom("typing".into()),
            from: alice.clone(),
            from_device: phone.clone(),
            to: vec![bob.clone().into()],
            body: b"started".to_vec(),
            sent_at: 0,
        }))
    };
    let call = |event: &Event| Call {
        user: alice.clone(),
        device: phone.clone(),
        message: match event {
            Event::Message(m) => Some(Arc::clone(m)),
            _ => None,
        },
        groups: false,
        effects: Effects::default(),
    };
    let timeout = Duration::from_secs(10);
    let mut made = Vec::new();
    let mut after_first = 0;
    for n in 0..instances {
        let (mut instance, _) = plugins
            .instantiate(&build, "typing", Arc::clone(&services), &[], &settings)
            .await?;
        let e = event();
        instance.state().begin(call(&e));
        let outcome = instance.handle(&e.to_wit(), timeout).await;
        instance.state().end();
        anyhow::ensure!(
            matches!(outcome, CallOutcome::Handled),
            "the {lang} example did not handle a typing event"
        );
        made.push(instance);
        if n == 0 {
            after_first = rss();
        }
    }
    let after_all = rss();
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let first_instance_mib = mib(after_first.saturating_sub(before));
    let per_instance_mib = if instances > 1 {
        mib(after_all.saturating_sub(after_first)) / (instances - 1) as f64
    } else {
        0.0
    };

    // Per event, on the first instance: rounds, median.
    let instance = &mut made[0];
    for _ in 0..events.min(200) {
        let e = event();
        instance.state().begin(call(&e));
        let _ = instance.handle(&e.to_wit(), timeout).await;
        instance.state().end();
    }
    let rounds = 10;
    let per_round = events.div_ceil(rounds).max(1);
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        for _ in 0..per_round {
            let e = event();
            instance.state().begin(call(&e));
            let outcome = instance.handle(&e.to_wit(), timeout).await;
            let effects = instance
                .state()
                .end()
                .map(|c| c.effects)
                .unwrap_or_default();
            anyhow::ensure!(
                matches!(outcome, CallOutcome::Handled) && effects.sends.len() == 1,
                "the {lang} example did not pass a typing event on"
            );
        }
        samples.push(started.elapsed().as_secs_f64() * 1e6 / f64::from(per_round));
    }
    samples.sort_by(f64::total_cmp);
    let event_us = samples[samples.len() / 2];
    Ok(Figures {
        lang: lang.to_owned(),
        size: bytes.len() as u64,
        compile_s,
        cached_load_s,
        first_instance_mib,
        per_instance_mib,
        instances,
        event_us,
        host_first_load_s: 0.0,
        host_load_mib: 0.0,
        event_ratio: 0.0,
    })
}

/// Prints the figures as a table.
pub fn print(figures: &[Figures]) {
    println!(
        "plugin kits: the typing example in each language (per event: median of 10 rounds; \
         memory: resident, {} instances)",
        figures.first().map_or(0, |f| f.instances)
    );
    println!(
        "{:<8} {:>9} {:>10} {:>9} {:>12} {:>13} {:>10} {:>8} {:>11} {:>10}",
        "kit",
        "size MB",
        "compile s",
        "cached s",
        "1st inst MiB",
        "next inst MiB",
        "µs/event",
        "vs rust",
        "host load s",
        "host +MiB"
    );
    for f in figures {
        println!(
            "{:<8} {:>9.2} {:>10.2} {:>9.3} {:>12.1} {:>13.2} {:>10.2} {:>8.1} {:>11.2} {:>10.1}",
            f.lang,
            f.size as f64 / 1e6,
            f.compile_s,
            f.cached_load_s,
            f.first_instance_mib,
            f.per_instance_mib,
            f.event_us,
            f.event_ratio,
            f.host_first_load_s,
            f.host_load_mib
        );
    }
    println!(
        "host load: `admin reload` of the new plugin in a running iim-host (compiled in a child \
         process, one instance made and initialised); host +MiB: its resident memory after"
    );
}
