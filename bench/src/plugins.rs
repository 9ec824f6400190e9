//! The plugin path against a native one, in one process and one run.
//!
//! Both paths handle the same chat events with the same logic (resolve the addressees, send
//! the message on to them) through the same host imports (`resolve`, `send`, which check their
//! arguments and collect the send). The plugin path is the real chat plugin, compiled and
//! called by the host's runtime (`Instance::handle`: the event lowered into the component,
//! the handler, the imports called back across the boundary, under the call's time bound);
//! the native path is that logic in Rust, calling the imports directly.
//!
//! - *Dispatch*: events handled per second on each path, and the difference per event: what
//!   going through a plugin costs (goal: at most 1 µs).
//! - *Throughput*: the same, plus applying the effects (the message appended to the
//!   recipient's inbox in the store), which is chat as the host runs it (goal: plugin at least
//!   0.9 of native).

use anyhow::{Context, anyhow};
use iim_host::config::PluginsConfig;
use iim_host::iim::Iim;
use iim_host::plugin::bindings::iim::plugin::iim::Host as Imports;
use iim_host::plugin::bindings::iim::plugin::types as wit;
use iim_host::plugin::imports::{Call, Effects, PluginState};
use iim_host::plugin::runtime::{CallOutcome, Instance};
use iim_host::plugin::{Event, Runtime, Services, lane, loader};
use iim_host::registry::Registry;
use iim_host::store::{Store, UserRecord};
use iim_proto::{DeviceId, Message, MessageId, MessageKind, UserId};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Figures of one plugin benchmark run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    /// Events handled per path in each measurement.
    pub events: u32,
    /// Plugin path, handling only: µs per event.
    pub plugin_dispatch_us: f64,
    /// Native path, handling only: µs per event.
    pub native_dispatch_us: f64,
    /// What the plugin boundary costs per event: plugin − native, µs.
    pub dispatch_overhead_us: f64,
    /// Plugin path with effects applied: events per second.
    pub plugin_msgs_per_sec: f64,
    /// Native path with effects applied: events per second.
    pub native_msgs_per_sec: f64,
    /// plugin / native throughput.
    pub ratio: f64,
}

const TIMEOUT: Duration = Duration::from_secs(5);

/// Rounds each measurement is split into, the paths alternating.
const ROUNDS: u32 = 10;

/// Runs the benchmark with `events` events per measurement.
pub fn run(events: u32) -> anyhow::Result<Figures> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(measure(events))
}

struct Bench {
    services: Arc<Services>,
    alice: UserId,
    bob: UserId,
    phone: DeviceId,
    next_id: u64,
}

impl Bench {
    /// A chat event from Alice to Bob with a new id.
    fn event(&mut self) -> Event {
        self.next_id += 1;
        Event::Message(Arc::new(Message {
            id: MessageId(self.next_id),
            kind: MessageKind::Chat,
            from: self.alice.clone(),
            from_device: self.phone.clone(),
            to: vec![self.bob.clone()],
            body: vec![b'x'; 100],
            sent_at: 0,
        }))
    }

    fn call(&self, event: &Event) -> Call {
        Call {
            user: self.alice.clone(),
            device: self.phone.clone(),
            message: match event {
                Event::Message(m) => Some(Arc::clone(m)),
                _ => None,
            },
            effects: Effects::default(),
        }
    }

    async fn plugin(&mut self, instance: &mut Instance, apply: bool) -> anyhow::Result<()> {
        let event = self.event();
        instance.state().begin(self.call(&event));
        let outcome = instance.handle(&event.to_wit(), TIMEOUT).await;
        let effects = instance
            .state()
            .end()
            .map(|c| c.effects)
            .unwrap_or_default();
        if !matches!(outcome, CallOutcome::Handled) || effects.sends.len() != 1 {
            return Err(anyhow!("the chat plugin did not send the message on"));
        }
        if apply {
            lane::apply(&self.services, "chat", &event, effects)?;
        }
        Ok(())
    }

    fn native(&mut self, state: &mut PluginState, apply: bool) -> anyhow::Result<()> {
        let event = self.event();
        state.begin(self.call(&event));
        native_chat(state, &event.to_wit())?;
        let effects = state.end().map(|c| c.effects).unwrap_or_default();
        if effects.sends.len() != 1 {
            return Err(anyhow!("the native handler did not send the message on"));
        }
        if apply {
            lane::apply(&self.services, "native-chat", &event, effects)?;
        }
        Ok(())
    }
}

/// The chat plugin's logic (policy "anyone"), natively.
fn native_chat(state: &mut PluginState, event: &wit::Event) -> anyhow::Result<()> {
    let wit::Event::Message(message) = event else {
        return Ok(());
    };
    let list = Imports::resolve(state, message.to.clone())
        .map_err(|e| anyhow!("{e}"))?
        .map_err(|e| anyhow!("{e:?}"))?;
    Imports::send(state, message.clone(), list)
        .map_err(|e| anyhow!("{e}"))?
        .map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

async fn measure(events: u32) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("store"))?;
    let registry = Arc::new(Registry::new(16));
    let iim = Arc::new(Iim::new("h1".into(), store.clone(), Arc::clone(&registry)));
    let services = Arc::new(Services {
        store: store.clone(),
        registry,
        iim,
        max_body: iim_proto::DEFAULT_MAX_BODY,
        max_frame: iim_proto::DEFAULT_MAX_FRAME,
        max_send_users: 10_000,
    });
    let alice = UserId::new("alice")?;
    let bob = UserId::new("bob")?;
    for user in [&alice, &bob] {
        let record = UserRecord {
            password_hash: String::new(),
            created_at: 0,
        };
        store.create_user(user, &record)?;
    }
    let config = PluginsConfig::default();
    let plugins = Runtime::new(&config, None).map_err(|e| anyhow!("{e}"))?;
    iim_host::plugin::runtime::start_ticker(plugins.engine());
    let (_, chat) = loader::DEFAULT_PLUGINS
        .iter()
        .find(|(name, _)| *name == "chat")
        .context("no chat plugin built in")?;
    let build = plugins.compile(chat)?;
    let (mut instance, _) = plugins
        .instantiate(&build, "chat", Arc::clone(&services), &[])
        .await?;
    let mut state = PluginState::native("native-chat", Arc::clone(&services));
    let mut bench = Bench {
        services,
        alice,
        bob,
        phone: DeviceId::new("phone")?,
        next_id: 0,
    };

    // Warm both paths up (caches, the instance's first calls), then measure each in turn.
    for _ in 0..events.min(2000) {
        bench.plugin(&mut instance, false).await?;
        bench.native(&mut state, false)?;
    }
    // Each path runs in alternating rounds, so that both see the same machine and the same
    // store as it grows (sled's background flushing, page cache, allocator state): measured
    // one after the other, the second path would run against a larger store.
    let mut plugin_dispatch = Duration::ZERO;
    let mut native_dispatch = Duration::ZERO;
    let mut plugin_apply = Duration::ZERO;
    let mut native_apply = Duration::ZERO;
    let chunk = events.div_ceil(ROUNDS);
    for round in 0..ROUNDS {
        let n = chunk.min(events.saturating_sub(chunk * round));
        for apply in [false, true] {
            let (plugin_total, native_total) = if apply {
                (&mut plugin_apply, &mut native_apply)
            } else {
                (&mut plugin_dispatch, &mut native_dispatch)
            };
            for plugin_first in [round % 2 == 0, round % 2 != 0] {
                let started = Instant::now();
                if plugin_first {
                    for _ in 0..n {
                        bench.plugin(&mut instance, apply).await?;
                    }
                    *plugin_total += started.elapsed();
                } else {
                    for _ in 0..n {
                        bench.native(&mut state, apply)?;
                    }
                    *native_total += started.elapsed();
                }
            }
        }
    }

    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(events);
    let rate = |d: Duration| f64::from(events) / d.as_secs_f64();
    Ok(Figures {
        events,
        plugin_dispatch_us: per(plugin_dispatch),
        native_dispatch_us: per(native_dispatch),
        dispatch_overhead_us: per(plugin_dispatch) - per(native_dispatch),
        plugin_msgs_per_sec: rate(plugin_apply),
        native_msgs_per_sec: rate(native_apply),
        ratio: rate(plugin_apply) / rate(native_apply),
    })
}

/// Prints the figures as a table.
pub fn print(f: &Figures) {
    println!(
        "plugin dispatch: chat event -> handle -> resolve + send, {} events per path",
        f.events
    );
    println!("path        µs/event");
    println!("plugin    {:>10.3}", f.plugin_dispatch_us);
    println!("native    {:>10.3}", f.native_dispatch_us);
    println!(
        "plugin boundary per event: {:.3} µs (goal <= 1)",
        f.dispatch_overhead_us
    );
    println!("chat throughput with effects applied (inbox append)");
    println!("path         msgs/s");
    println!("plugin  {:>12.1}", f.plugin_msgs_per_sec);
    println!("native  {:>12.1}", f.native_msgs_per_sec);
    println!("ratio plugin/native (msgs/s): {:.3} (goal >= 0.9)", f.ratio);
}
