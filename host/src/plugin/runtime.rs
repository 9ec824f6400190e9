//! The wasmtime side of plugins: one engine, builds compiled and pre-instantiated once, and
//! instances whose every call is bounded in time and memory.
//!
//! Time: the engine's epoch advances every [`TICK`]; during a call the store's epoch callback
//! yields to tokio at every tick (so a busy plugin shares the thread) and traps once the call
//! has run longer than its timeout. An async timeout around the call also bounds whatever the
//! call awaits. Memory: store limits cap each linear memory and table, and a failed growth
//! traps rather than returning -1 to a guest that may not check it.

use super::bindings::exports::iim::plugin::handler::PluginError as WitPluginError;
use super::bindings::iim::plugin::types as wit;
use super::bindings::{Plugin, PluginPre};
use super::imports::{PluginState, Services};
use super::settings::Settings;
use super::stdio::{PluginOutput, Stream};
use crate::config::PluginsConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline,
};
use wasmtime_wasi::WasiCtxBuilder;

/// How often the engine's epoch advances: the granularity of call timeouts.
pub const TICK: Duration = Duration::from_millis(10);

/// Instances the pool holds at once, at least: every plugin's serving instances, a new build's
/// while one is replaced, and builds being validated.
const POOLED_INSTANCES: u32 = 64;

/// Pooled instances per configured instance of a plugin (`plugins.instances`): room for a
/// dozen plugins, with one of them being replaced.
const POOLED_PER_INSTANCE: u32 = 12;

/// The part of each pooled fiber stack kept resident between calls.
const ASYNC_STACK_RESIDENT: usize = 256 << 10;

/// Why a plugin build could not be loaded or an instance made.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is not a valid component, or wasmtime could not compile it.
    #[error("not a valid component: {0:#}")]
    Compile(wasmtime::Error),
    /// The component does not fit the `iim:plugin@0.1.2` world (or 0.1.0, 0.1.1): a missing or mistyped export,
    /// or an import the host does not provide.
    #[error("does not fit the iim:plugin@0.1.2 world: {0:#}")]
    Interface(wasmtime::Error),
    /// Instantiating or initialising it trapped, ran out of time or memory.
    #[error("init failed: {0}")]
    Trap(String),
    /// The plugin refused its configuration.
    #[error("refused its configuration: {0}")]
    Config(String),
    /// `init` returned something unusable (an empty name, a bad subscription).
    #[error("invalid plugin info: {0}")]
    Info(String),
}

/// A compiled, type-checked plugin build, ready to instantiate.
#[derive(Clone)]
pub struct Build {
    pub(super) pre: PluginPre<PluginState>,
    /// SHA-256 of the file, to tell builds apart in logs.
    pub digest: String,
}

/// A live instance of a plugin build, with its store.
pub struct Instance {
    store: Store<PluginState>,
    plugin: Plugin,
    /// Its stderr, for the last line before a trap.
    stderr: PluginOutput,
}

/// What happened to one call of `handle`.
pub enum CallOutcome {
    /// The handler returned `ok`.
    Handled,
    /// The handler refused the event on purpose: not retried.
    Rejected(String),
    /// The handler returned `failed`: retried on the same instance.
    Failed(String),
    /// The call trapped, timed out or ran out of memory: the instance is unusable.
    Trapped(String),
}

/// The engine and linker every plugin shares.
pub struct Runtime {
    engine: Engine,
    linker: Linker<PluginState>,
}

impl Runtime {
    /// An engine with the pooling allocator and epoch interruption, and a linker with the
    /// host's imports and a WASI that reaches nothing (no files, sockets or environment).
    /// With `cache_dir`, compiled code is cached there (keyed by the component's bytes and
    /// wasmtime's version and settings): a large plugin (a Python one takes tens of seconds)
    /// compiles once, not at every start.
    pub fn new(
        config: &PluginsConfig,
        cache_dir: Option<&std::path::Path>,
    ) -> wasmtime::Result<Self> {
        let max_memory =
            usize::try_from(config.max_memory_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        // Sized for the most instances a plugin may be given (its `[host] instances`), not only
        // the host's default: an idle lane holds none, so room costs only address space.
        let pooled = u32::try_from(config.instances.max(crate::config::MAX_PLUGIN_INSTANCES))
            .unwrap_or(u32::MAX)
            .saturating_mul(POOLED_PER_INSTANCE)
            .max(POOLED_INSTANCES);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(pooled)
            .total_core_instances(pooled * 16)
            .max_core_instances_per_component(32)
            .total_memories(pooled * 4)
            .max_memories_per_component(16)
            .total_tables(pooled * 8)
            .max_tables_per_component(16)
            .total_stacks(pooled)
            .max_memory_size(max_memory)
            .max_core_instance_size(4 << 20)
            .max_component_instance_size(4 << 20)
            .table_elements(100_000)
            // Every call runs on a pooled fiber stack; by default the pool gives a stack's
            // pages back to the kernel after each call, and the next call faults them in again
            // (about 10 µs a call). Keeping the touched part resident avoids that.
            .async_stack_keep_resident(ASYNC_STACK_RESIDENT);
        let mut engine_config = wasmtime::Config::new();
        engine_config
            .epoch_interruption(true)
            // The WIT has no async functions, streams or futures: without the component
            // model's concurrency machinery a call costs a fraction of what it does with it.
            .concurrency_support(false)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        if let Some(dir) = cache_dir {
            let mut cache = wasmtime::CacheConfig::new();
            cache.with_directory(dir);
            engine_config.cache(Some(wasmtime::Cache::new(cache)?));
        }
        let engine = Engine::new(&engine_config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // Outbound HTTP, to the hosts each plugin's configuration allows (`http.rs`).
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        Plugin::add_to_linker::<PluginState, wasmtime::component::HasSelf<PluginState>>(
            &mut linker,
            |state| state,
        )?;
        Ok(Self { engine, linker })
    }

    /// The linker: the host's imports.
    pub(super) fn linker(&self) -> &Linker<PluginState> {
        &self.linker
    }

    /// The engine, whose epoch a ticker advances.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles a component and checks it against the world: its exports and the imports it
    /// needs. CPU-heavy: run it off the async threads.
    pub fn compile(&self, bytes: &[u8]) -> Result<Build, LoadError> {
        let component = Component::new(&self.engine, bytes).map_err(LoadError::Compile)?;
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(LoadError::Interface)?;
        let pre = PluginPre::new(instance_pre).map_err(LoadError::Interface)?;
        Ok(Build {
            pre,
            digest: short_digest(bytes),
        })
    }

    /// Makes a new instance of `build` and runs its `init` with `config`, bounded by
    /// `settings`.
    pub async fn instantiate(
        &self,
        build: &Build,
        name: &str,
        services: Arc<Services>,
        config: &[(String, String)],
        settings: &Settings,
    ) -> Result<(Instance, wit::PluginInfo), LoadError> {
        let limits = wasmtime::StoreLimitsBuilder::new()
            .memory_size(settings.max_memory())
            .table_elements(100_000)
            .trap_on_grow_failure(true)
            .build();
        // What the plugin prints goes to the log under its name, not to the host's stderr.
        let stderr = PluginOutput::new(name, Stream::Stderr);
        let wasi = WasiCtxBuilder::new()
            .stdout(PluginOutput::new(name, Stream::Stdout))
            .stderr(stderr.clone())
            .build();
        let outbound =
            super::http::Policy::new(name, &settings.outbound).map_err(LoadError::Config)?;
        let state = PluginState::new(
            name,
            services,
            wasi,
            (ResourceTable::new(), limits),
            Arc::new(outbound),
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| state.limits());
        store.epoch_deadline_callback(on_tick);
        let timeout = settings.call_timeout();
        arm(&mut store, timeout);
        let plugin = bounded(timeout, build.pre.instantiate_async(&mut store))
            .await
            .map_err(|e| LoadError::Trap(e.to_string()))?;
        arm(&mut store, timeout);
        let info = bounded(
            timeout,
            plugin.iim_plugin_handler().call_init(&mut store, config),
        )
        .await
        .map_err(|e| LoadError::Trap(e.to_string()))?;
        match info {
            Ok(info) => Ok((
                Instance {
                    store,
                    plugin,
                    stderr,
                },
                info,
            )),
            Err(WitPluginError::InvalidConfig(reason)) => Err(LoadError::Config(reason)),
            Err(WitPluginError::Rejected(reason) | WitPluginError::Failed(reason)) => {
                Err(LoadError::Config(reason))
            }
        }
    }
}

impl Instance {
    /// The state the host imports work on.
    pub fn state(&mut self) -> &mut PluginState {
        self.store.data_mut()
    }

    /// Calls `handle(event)`, bounded by `timeout`.
    pub async fn handle(&mut self, event: &wit::Event, timeout: Duration) -> CallOutcome {
        self.stderr.forget();
        arm(&mut self.store, timeout);
        let call = self
            .plugin
            .iim_plugin_handler()
            .call_handle(&mut self.store, event);
        match bounded(timeout, call).await {
            Ok(Ok(())) => CallOutcome::Handled,
            Ok(Err(WitPluginError::Rejected(reason))) => CallOutcome::Rejected(reason),
            Ok(Err(WitPluginError::Failed(reason) | WitPluginError::InvalidConfig(reason))) => {
                CallOutcome::Failed(reason)
            }
            Err(trap) => CallOutcome::Trapped(match self.stderr.last_words() {
                // An uncaught exception's message, which the trap itself does not carry.
                Some(words) => format!("{trap}; its last line on stderr: {words}"),
                None => trap.to_string(),
            }),
        }
    }
}

/// Starts a call's clock: see [`on_tick`].
fn arm(store: &mut Store<PluginState>, timeout: Duration) {
    store.data_mut().clock = CallClock {
        started: Instant::now(),
        timeout,
    };
    store.set_epoch_deadline(1);
}

/// When a call started and how long it may run.
#[derive(Clone, Copy)]
pub struct CallClock {
    started: Instant,
    timeout: Duration,
}

impl Default for CallClock {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            timeout: Duration::ZERO,
        }
    }
}

/// What a store does at each epoch tick during a call: yield to tokio once the call has run a
/// whole tick (a call normally takes microseconds; yielding the moment a tick happens to fall
/// inside one would send it to the back of the runtime's queue for nothing), and trap once
/// the call has run past its timeout. Set once per store; [`arm`] starts each call's clock.
fn on_tick(store: wasmtime::StoreContextMut<'_, PluginState>) -> wasmtime::Result<UpdateDeadline> {
    let clock = store.data().clock;
    let running = clock.started.elapsed();
    Ok(if running >= clock.timeout {
        UpdateDeadline::Interrupt
    } else if running >= TICK {
        UpdateDeadline::Yield(1)
    } else {
        UpdateDeadline::Continue(1)
    })
}

/// Runs a call under an async timeout a little longer than the epoch's, so that the epoch
/// trap (which leaves a clean error) normally fires first; the timeout catches a call stuck
/// in something that does not tick.
async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = wasmtime::Result<T>>,
) -> Result<T, CallFailed> {
    match tokio::time::timeout(timeout + timeout / 2 + TICK * 2, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(CallFailed(describe_trap(&error, timeout))),
        Err(_) => Err(CallFailed(format!(
            "timed out after {} ms",
            timeout.as_millis()
        ))),
    }
}

/// A call into a plugin that trapped or ran out of time, said in one line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CallFailed(String);

/// One line saying why a call failed, naming the usual causes plainly. (The full error, with
/// the guest's backtrace, goes to the debug log.)
fn describe_trap(error: &wasmtime::Error, timeout: Duration) -> String {
    tracing::debug!(error = ?error, "plugin call failed");
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => {
            format!("ran longer than its {} ms limit", timeout.as_millis())
        }
        Some(trap) => format!("trapped: {trap}"),
        None => {
            let cause = error.root_cause().to_string().replace('\n', " ");
            if cause.contains("growing memory")
                || cause.contains("memory") && cause.contains("limit")
            {
                format!("exceeded its memory limit ({cause})")
            } else {
                format!("trapped: {cause}")
            }
        }
    }
}

/// The first 12 hex digits of the SHA-256 of `bytes`: how logs and `admin plugins` tell builds
/// apart.
pub fn short_digest(bytes: &[u8]) -> String {
    let mut digest = sha256_hex(bytes);
    digest.truncate(12);
    digest
}

/// The SHA-256 of `bytes`, in lower-case hex: how plugin files are told apart.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    iim_proto::file::hex(&sha2::Sha256::digest(bytes).into())
}

/// Advances the engine's epoch every [`TICK`] until the engine has no other owner.
pub fn start_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("iim-plugin-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(TICK);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the plugin epoch ticker; calls are bounded only by their async timeout");
    }
}
