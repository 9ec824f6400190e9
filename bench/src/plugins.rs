//! The plugin path against a native one, in one process and one run.
//!
//! Both paths handle the same chat events with the same logic (the addressees, each once; the
//! message passed on to them) through the same host import (`pass-on`, which checks its
//! arguments and collects the send). The plugin path is the real chat plugin, compiled and
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
use iim_host::plugin::{Event, Runtime, Services, SessionInfo, lane, loader};
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
    /// Rounds the events were split into (each figure is the median over them).
    pub rounds: u32,
    /// Plugin path, handling only: µs per event.
    pub plugin_dispatch_us: f64,
    /// Native path, handling only: µs per event.
    pub native_dispatch_us: f64,
    /// What the plugin boundary costs per event: plugin − native, µs.
    pub dispatch_overhead_us: f64,
    /// A call into the plugin that does next to nothing (a session event, which the chat
    /// plugin refuses at once): the fixed cost of a call, µs.
    pub empty_call_us: f64,
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
            to: vec![self.bob.clone().into()],
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
            groups: false,
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

    /// A session event, which the chat plugin refuses without calling the host.
    async fn empty(&mut self, instance: &mut Instance, event: &Event) -> anyhow::Result<()> {
        instance.state().begin(self.call(event));
        let outcome = instance.handle(&event.to_wit(), TIMEOUT).await;
        instance.state().end();
        if !matches!(outcome, CallOutcome::Rejected(_)) {
            return Err(anyhow!("the chat plugin did not refuse a session event"));
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
    let mut addressees: Vec<String> = Vec::with_capacity(message.to.len());
    for user in &message.to {
        if !addressees.contains(user) {
            addressees.push(user.clone());
        }
    }
    Imports::pass_on(state, addressees)
        .map_err(|e| anyhow!("{e}"))?
        .map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

async fn measure(events: u32) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("store"))?;
    let registry = Arc::new(Registry::new(16));
    let iim = Arc::new(Iim::new(
        "h1".into(),
        store.clone(),
        Arc::clone(&registry),
        iim_host::config::Limits::default().message_ttl(),
        None,
    ));
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
        store.accounts.create(user, &record)?;
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
        .instantiate(
            &build,
            "chat",
            Arc::clone(&services),
            &[],
            &iim_host::plugin::settings::Settings::defaults(&config),
        )
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
    // store as it grows (sled's background flushing, page cache, allocator state), and the
    // store is flushed after every phase that wrote to it, so that no phase pays for another's
    // writes. Each figure is the median over the rounds: this machine is shared, and a burst
    // of other work in one round would otherwise move the mean of a path by several µs.
    let session = Event::SessionOpened(SessionInfo {
        user: bench.alice.clone(),
        device: bench.phone.clone(),
        devices_online: 1,
    });
    let [
        mut empty,
        mut plugin_dispatch,
        mut native_dispatch,
        mut plugin_apply,
        mut native_apply,
    ] = std::array::from_fn::<_, 5, _>(|_| Vec::with_capacity(ROUNDS as usize));
    let chunk = events.div_ceil(ROUNDS).max(1);
    let mut round = 0;
    let mut done = 0;
    while done < events {
        let n = chunk.min(events - done);
        let per_event = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(n);
        let started = Instant::now();
        for _ in 0..n {
            bench.empty(&mut instance, &session).await?;
        }
        empty.push(per_event(started.elapsed()));
        for apply in [false, true] {
            for plugin_first in [round % 2 == 0, round % 2 != 0] {
                let started = Instant::now();
                if plugin_first {
                    for _ in 0..n {
                        bench.plugin(&mut instance, apply).await?;
                    }
                } else {
                    for _ in 0..n {
                        bench.native(&mut state, apply)?;
                    }
                }
                let took = per_event(started.elapsed());
                if apply {
                    store.flush().await?;
                }
                match (apply, plugin_first) {
                    (false, true) => plugin_dispatch.push(took),
                    (false, false) => native_dispatch.push(took),
                    (true, true) => plugin_apply.push(took),
                    (true, false) => native_apply.push(took),
                }
            }
        }
        done += n;
        round += 1;
    }

    let plugin_dispatch_us = median(&mut plugin_dispatch);
    let native_dispatch_us = median(&mut native_dispatch);
    let plugin_msgs_per_sec = 1e6 / median(&mut plugin_apply);
    let native_msgs_per_sec = 1e6 / median(&mut native_apply);
    Ok(Figures {
        events,
        rounds: round,
        plugin_dispatch_us,
        native_dispatch_us,
        dispatch_overhead_us: plugin_dispatch_us - native_dispatch_us,
        empty_call_us: median(&mut empty),
        plugin_msgs_per_sec,
        native_msgs_per_sec,
        ratio: plugin_msgs_per_sec / native_msgs_per_sec,
    })
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Prints the figures as a table.
pub fn print(f: &Figures) {
    println!(
        "plugin dispatch: chat event -> handle -> pass-on, {} events per path \
         in {} rounds (medians of the rounds)",
        f.events, f.rounds
    );
    println!("path        µs/event");
    println!("plugin    {:>10.3}", f.plugin_dispatch_us);
    println!("native    {:>10.3}", f.native_dispatch_us);
    println!(
        "plugin boundary per event: {:.3} µs (goal <= 2)",
        f.dispatch_overhead_us
    );
    println!(
        "of which a call that does nothing (a session event, refused): {:.3} µs",
        f.empty_call_us
    );
    println!("chat throughput with effects applied (inbox append)");
    println!("path         msgs/s");
    println!("plugin  {:>12.1}", f.plugin_msgs_per_sec);
    println!("native  {:>12.1}", f.native_msgs_per_sec);
    println!("ratio plugin/native (msgs/s): {:.3} (goal >= 0.9)", f.ratio);
}
