//! One lane of a plugin: its queue of events, its live instance, and what happens when a call
//! fails. A plugin has `plugins.instances` lanes; an event is queued in the one its acting user
//! hashes to.
//!
//! Events are handled one at a time, in queue order. A call that returns `ok` has its effects
//! applied (messages sent, storage written) before the next event starts. A call that traps,
//! times out or runs out of memory costs the instance: the next attempt runs on a fresh one.
//! After `max_attempts` the event is set aside as a dead letter, which the operator can list,
//! and the lane goes on with the next event.

use super::DeadLetter;
use super::event::Event;
use super::imports::{Call, Effects, Outgoing, Services};
use super::runtime::{Build, CallOutcome, Instance};
use super::settings::Settings;
use super::{LoadedInfo, PluginHost};
use crate::iim::{ServerRow, UserList, UserRow};
use crate::metrics::label;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// A build ready to serve in one lane: compiled, and checked by one instance's `init`.
pub struct Ready {
    /// The build, for the lane's instances.
    pub build: Build,
    /// The configuration `init` is given.
    pub config: Vec<(String, String)>,
    /// How the host runs it.
    pub settings: Settings,
    /// What `init` said.
    pub info: LoadedInfo,
    /// The lane's instance if one was made already (the one that checked the build); else the
    /// lane makes one when its first event comes, so that an idle lane costs no instance.
    pub instance: Option<Instance>,
}

/// What a lane is told.
pub enum Command {
    /// Handle an event; the permit is released when it is done.
    Event(Event, OwnedSemaphorePermit),
    /// Serve the events after this one with another build. The counter holds how many of the
    /// plugin's lanes have yet to switch.
    Swap(Box<Ready>, Arc<AtomicUsize>),
    /// Stop after the events queued before this; then add a permit to the semaphore, if
    /// given, which the lanes replacing this one wait for.
    Stop(Option<Arc<Semaphore>>),
}

/// What a lane waits for before its first event: the lanes it replaces, each of which adds a
/// permit to the semaphore when it has handled its last event.
#[derive(Clone)]
pub struct Gate {
    /// Where the replaced lanes leave their permits.
    pub stopped: Arc<Semaphore>,
    /// How many lanes are replaced.
    pub lanes: u32,
}

/// Runs a lane until it is stopped.
pub async fn run(
    host: Arc<PluginHost>,
    name: String,
    index: usize,
    mut queue: mpsc::UnboundedReceiver<Command>,
    ready: Ready,
    gate: Option<Gate>,
) {
    let mut lane = Lane {
        host,
        measures: Measures::of(&name),
        name,
        index,
        build: ready.build,
        config: ready.config,
        settings: ready.settings,
        info: ready.info,
        instance: ready.instance,
    };
    if let Some(gate) = gate {
        // The permits go back at once: every new lane waits for the same old ones.
        let _ = gate.stopped.acquire_many(gate.lanes).await;
    }
    // Whatever ends this lane (a stop, or a panic), the lanes replacing it are let go.
    let mut stopped = Stopped(None);
    while let Some(command) = queue.recv().await {
        match command {
            Command::Event(event, _permit) => lane.handle(event).await,
            Command::Swap(ready, waiting) => {
                // The last of the plugin's lanes to switch says so once for all of them.
                if waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
                    tracing::info!(
                        plugin = %lane.name,
                        from = %lane.info.digest,
                        to = %ready.info.digest,
                        version = %ready.info.version,
                        "plugin replaced"
                    );
                } else {
                    tracing::debug!(plugin = %lane.name, lane = lane.index, to = %ready.info.digest, "lane switched to the new build");
                }
                lane.build = ready.build;
                lane.config = ready.config;
                lane.settings = ready.settings;
                lane.info = ready.info;
                lane.instance = ready.instance;
            }
            Command::Stop(gate) => {
                stopped.0 = gate;
                break;
            }
        }
    }
    // Events still queued were never handled here: message events stay recorded for dispatch
    // and go to the next plugin that handles their kind.
    queue.close();
    while let Some(command) = queue.recv().await {
        if let Command::Event(Event::Message(m), _) = command {
            lane.host.settled(m.id);
        }
    }
    tracing::debug!(plugin = %lane.name, lane = lane.index, "plugin lane stopped");
}

/// Adds a permit to the semaphore the replacing lanes wait at when the lane's task ends, even
/// by a panic.
struct Stopped(Option<Arc<Semaphore>>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(stopped) = &self.0 {
            stopped.add_permits(1);
        }
    }
}

/// A plugin's metrics, looked up once for its lane.
struct Measures {
    calls: Counter,
    seconds: Histogram,
    failures: Counter,
    dead_letters: Counter,
}

impl Measures {
    fn of(plugin: &str) -> Self {
        let metrics = crate::metrics::metrics();
        let plugin = label("plugin", plugin);
        Self {
            calls: metrics.plugin_calls.get_or_create_owned(&plugin),
            seconds: metrics.plugin_call_seconds.get_or_create_owned(&plugin),
            failures: metrics.plugin_failures.get_or_create_owned(&plugin),
            dead_letters: metrics.plugin_dead_letters.get_or_create_owned(&plugin),
        }
    }
}

struct Lane {
    host: Arc<PluginHost>,
    measures: Measures,
    name: String,
    index: usize,
    build: Build,
    config: Vec<(String, String)>,
    settings: Settings,
    info: LoadedInfo,
    instance: Option<Instance>,
}

impl Lane {
    async fn handle(&mut self, event: Event) {
        if !self.info.subscriptions.contains(&event.subscription()) {
            // A build that replaced the one this was queued for no longer handles it.
            tracing::info!(plugin = %self.name, %event, "no longer subscribed; not handled here");
            match &event {
                // Still recorded for dispatch: the next plugin that handles its kind gets it.
                Event::Message(m) => self.host.settled(m.id),
                // This plugin no longer wants it.
                Event::AccountDeleted(d) => self.host.notice_settled(d.id, &self.name),
                _ => {}
            }
            return;
        }
        let max_attempts = self.host.config.max_attempts;
        let timeout = self.settings.call_timeout();
        let wit_event = event.to_wit();
        let groups = self
            .info
            .subscriptions
            .contains(&super::Subscription::Groups);
        let mut last_error = String::new();
        for attempt in 1..=max_attempts {
            if attempt > 1 {
                // Brief and growing: a plugin failing on a host that is briefly unavailable
                // gets a chance; a plugin failing for good does not hold its lane for long.
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            }
            let instance = match self.instance().await {
                Ok(instance) => instance,
                Err(e) => {
                    last_error = format!("no instance could be made: {e}");
                    continue;
                }
            };
            let (user, device) = event.acting();
            instance.state().begin(Call {
                user: user.clone(),
                device: device.clone(),
                message: match &event {
                    Event::Message(m) => Some(Arc::clone(m)),
                    _ => None,
                },
                groups,
                effects: Effects::default(),
            });
            let started = std::time::Instant::now();
            let busy = crate::metrics::Busy::start(|m| &m.busy_plugin);
            let outcome = instance.handle(&wit_event, timeout).await;
            let effects = instance.state().end().map(|call| call.effects);
            drop(busy);
            self.measures.calls.inc();
            self.measures
                .seconds
                .observe(started.elapsed().as_secs_f64());
            if matches!(outcome, CallOutcome::Failed(_) | CallOutcome::Trapped(_)) {
                self.measures.failures.inc();
            }
            if let (CallOutcome::Handled, Event::Message(m), Some(group)) =
                (&outcome, &event, event.group())
                && let Err(e) = self.host.services.store.messages.applying(group, m.id)
            {
                tracing::error!(id = %m.id, %group, error = %e, "cannot record the group message being applied; retrying");
                last_error = format!("recording it failed: {e}");
                continue;
            }
            match outcome {
                CallOutcome::Handled => match apply(
                    &self.host.services,
                    &self.name,
                    &event,
                    effects.unwrap_or_default(),
                ) {
                    Ok(requests) => {
                        self.settle(&event);
                        self.raise_requests(requests);
                        return;
                    }
                    Err(e) => {
                        tracing::error!(plugin = %self.name, %event, error = %e, "the effects of a handled event could not be applied; retrying");
                        last_error = format!("applying its effects failed: {e}");
                    }
                },
                CallOutcome::Rejected(reason) => {
                    tracing::info!(plugin = %self.name, %event, %reason, "plugin refused the event");
                    self.settle(&event);
                    return;
                }
                CallOutcome::Failed(reason) => {
                    tracing::warn!(plugin = %self.name, %event, attempt, %reason, "plugin failed to handle the event");
                    last_error = format!("failed: {reason}");
                }
                CallOutcome::Trapped(reason) => {
                    tracing::warn!(plugin = %self.name, %event, attempt, %reason, "plugin call failed; replacing the instance");
                    self.instance = None;
                    last_error = reason;
                }
            }
        }
        self.dead_letter(&event, max_attempts, last_error);
        self.settle(&event);
    }

    /// The live instance, making one if the lane has none yet or the last one was lost.
    async fn instance(&mut self) -> Result<&mut Instance, super::runtime::LoadError> {
        if self.instance.is_none() {
            let made = self
                .host
                .runtime
                .instantiate(
                    &self.build,
                    &self.name,
                    Arc::clone(&self.host.services),
                    &self.config,
                    &self.settings,
                )
                .await;
            match made {
                Ok((instance, _)) => self.instance = Some(instance),
                Err(e) => {
                    tracing::error!(plugin = %self.name, error = %e, "cannot make a new instance");
                    return Err(e);
                }
            }
        }
        self.instance
            .as_mut()
            .ok_or_else(|| super::runtime::LoadError::Trap("no instance".into()))
    }

    fn dead_letter(&self, event: &Event, attempts: u32, error: String) {
        tracing::error!(plugin = %self.name, %event, attempts, %error, "event set aside as a dead letter");
        self.measures.dead_letters.inc();
        let letter = DeadLetter {
            plugin: self.name.clone(),
            version: self.info.version.clone(),
            digest: self.info.digest.clone(),
            event: event.clone(),
            error,
            attempts,
            at: crate::clock::now_ms(),
        };
        if let Err(e) = letter.keep(&self.host.services.store) {
            tracing::error!(plugin = %self.name, %event, error = %e, "dead letter not stored");
        }
    }

    /// Hands the requests to groups a handling made to the plugins, in order, from a task of
    /// their own: this lane may be the one they go to, and must not wait for room in its own
    /// queue. They are recorded for dispatch, so a crash meanwhile loses none.
    fn raise_requests(&self, requests: Vec<iim_proto::Message>) {
        if requests.is_empty() {
            return;
        }
        let host = Arc::clone(&self.host);
        tokio::spawn(async move {
            for request in requests {
                host.raise(Event::Message(Arc::new(request))).await;
            }
        });
    }

    /// The event is done with (handled, refused or set aside): a message event's dispatch
    /// record goes, and a deletion notice's record for this plugin.
    fn settle(&self, event: &Event) {
        match event {
            Event::Message(m) => {
                if let Err(e) = self.host.services.store.messages.dispatched(m.id) {
                    tracing::error!(id = %m.id, error = %e, "dispatch record not removed; it will be handled again");
                }
                self.host.settled(m.id);
            }
            Event::AccountDeleted(d) => self.host.notice_settled(d.id, &self.name),
            _ => {}
        }
    }
}

/// Whether `send` is a request to a group rather than a message to users: a new message of kind
/// `group` addressed to one group, sent to nobody (which only the plugin that handles groups
/// may send). It is handled as if its acting user had submitted it: in the group's order, by
/// the plugin that handles groups (on the group's home host).
fn is_group_request(send: &super::imports::PendingSend) -> bool {
    match &send.message {
        Outgoing::New { kind, to, .. } => {
            send.users.is_empty()
                && matches!(kind, iim_proto::MessageKind::Custom(k) if k == iim_proto::GROUP_KIND)
                && matches!(to.as_slice(), [iim_proto::Address::Group(_)])
        }
        Outgoing::Forward(_) => false,
    }
}

/// Applies the effects of plugin `plugin`'s successful handling of `event`: sends what it sent,
/// in order, and writes what it stored, in one batch. Returns the requests to groups it made
/// ([`is_group_request`]), recorded for dispatch: the caller raises them.
pub fn apply(
    services: &Services,
    plugin: &str,
    event: &Event,
    effects: Effects,
) -> Result<Vec<iim_proto::Message>, crate::iim::IimError> {
    let (user, device) = event.acting();
    let key = event.durable_key();
    let mut requests = Vec::new();
    let sent = !effects.sends.is_empty();
    for (index, send) in effects.sends.into_iter().enumerate() {
        let request = is_group_request(&send);
        let message = match send.message {
            Outgoing::Forward(message) => Arc::unwrap_or_clone(message),
            Outgoing::New { kind, to, body } => {
                let build = |id| iim_proto::Message {
                    id,
                    kind,
                    from: user.clone(),
                    from_device: device.clone(),
                    to,
                    body,
                    sent_at: crate::clock::now_ms(),
                };
                match &key {
                    Some(key) => {
                        services
                            .store
                            .messages
                            .effect(plugin, key, index as u32, build)?
                    }
                    None => services.store.messages.number(build)?,
                }
            }
        };
        if request {
            // Recorded for dispatch as a submission is: raised by the caller, routed again
            // after a crash.
            services.store.messages.redispatch(&message)?;
            requests.push(message);
            continue;
        }
        let list = UserList {
            servers: vec![ServerRow {
                server: services.iim.server().to_owned(),
                users: send
                    .users
                    .into_iter()
                    .map(|user| UserRow {
                        user,
                        devices: Vec::new(),
                    })
                    .collect(),
            }],
        };
        services.iim.send(&message, &list)?;
    }
    if !effects.kv.is_empty() {
        if sent {
            // The sends' inbox entries (in the message log) durable before the plugin's
            // values (in sled): a value must not outlive the messages the event sent with it,
            // or the event, handled again after a crash, would find its values changed and
            // its messages gone. Only events with both pay for this commit.
            services.store.commit_now()?;
        }
        services.store.plugin_kv.apply(plugin, &effects.kv)?;
    }
    Ok(requests)
}
