//! Plugins: WebAssembly components that decide what is sent to whom.
//!
//! The host raises [`Event`]s; each goes to the plugins that subscribed to it. Every loaded
//! plugin has `plugins.instances` *lanes* ([`lane`]): each one task, one queue and one live
//! instance, handling its events one at a time in the order they were raised. An event goes to
//! the lane its acting user hashes to, so one user's events (a sender's messages, a reader's
//! receipts, a device's sessions) are handled in order by one instance, while other users'
//! events are handled beside them.
//! A new build of a plugin is compiled, instantiated and initialised beside the serving one
//! ([`loader`]) and handed to every lane of the plugin through its queue, all under the lock
//! that routing takes: the events raised before the hand-over are handled by the old build, the
//! events after it by the new one, each by exactly one.
//!
//! Submitted messages are durable events: the store records each for dispatch when it accepts
//! it, and the record goes only once the plugin handled it (or it was set aside as a dead
//! letter). A message accepted while no plugin could take it stays recorded and is routed when
//! one can. The other events live in memory.

// Generated from wit/iim.wit; the WIT carries the documentation.
#[allow(missing_docs)]
pub mod bindings;
pub mod check;
pub mod convert;
pub mod dead_letter;
pub mod event;
pub mod harness;
pub mod http;
pub mod imports;
pub mod kits;
pub mod lane;
pub mod loader;
pub mod runtime;
pub mod settings;
pub mod stdio;

pub use dead_letter::DeadLetter;
pub use event::{AccountDeletion, Delivered, Event, SessionInfo, Subscription};
pub use imports::Services;
pub use runtime::Runtime;

use iim_proto::{GroupId, Message, MessageId, MessageKind};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::{Semaphore, mpsc};

/// Why a dead letter was not handed back.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// No letter has this number.
    #[error("no dead letter {0}")]
    NoLetter(u64),
    /// No loaded plugin handles the letter's message now; it is kept.
    #[error("no plugin handles {0} messages now; the letter is kept")]
    NoHandler(MessageKind),
    /// The plugin that failed the letter's event is gone or no longer wants it; it is kept.
    #[error(
        "plugin {plugin} is not loaded or no longer handles {subscription}; the letter is kept"
    )]
    PluginGone {
        /// The plugin.
        plugin: String,
        /// What the event is.
        subscription: Subscription,
    },
    /// The plugin went away while the letter was handed back; it is kept.
    #[error("plugin {0} went away; the letter is kept")]
    WentAway(String),
    /// The store failed.
    #[error("dead letter {id}: {source}")]
    Store {
        /// The letter.
        id: u64,
        /// What failed.
        source: crate::store::StoreError,
    },
}

/// A plugin as loaded: what the operator sees of it.
#[derive(Debug, Clone)]
pub struct LoadedInfo {
    /// The name the plugin gave itself at `init`.
    pub name: String,
    /// Its own version.
    pub version: String,
    /// The first bytes of its SHA-256, in hex.
    pub digest: String,
    /// What it handles.
    pub subscriptions: Vec<Subscription>,
}

impl LoadedInfo {
    /// What `init` answered, in the host's terms: `groups` if it called `subscribe-groups`;
    /// an error if it gave no name or a subscription the host cannot take.
    pub fn from_init(
        info: bindings::iim::plugin::types::PluginInfo,
        groups: bool,
        digest: &str,
    ) -> Result<Self, runtime::LoadError> {
        if info.name.is_empty() {
            return Err(runtime::LoadError::Info("the plugin gave no name".into()));
        }
        let mut subscriptions = info
            .subscriptions
            .into_iter()
            .map(Subscription::from_wit)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| runtime::LoadError::Info(format!("{e:?}")))?;
        if groups {
            subscriptions.push(Subscription::Groups);
        }
        Ok(Self {
            name: info.name,
            version: info.version,
            digest: digest.to_owned(),
            subscriptions,
        })
    }
}

struct LaneHandle {
    /// One queue per lane of the plugin.
    queues: Vec<mpsc::UnboundedSender<lane::Command>>,
    /// Events queued in all its lanes, at most: a raiser waits for a permit before it queues
    /// one.
    permits: Arc<Semaphore>,
    info: LoadedInfo,
    settings: settings::Settings,
}

impl LaneHandle {
    /// Queues `event` for the lane that handles it ([`Event::lane`]).
    fn queue(&self, event: Event, permit: tokio::sync::OwnedSemaphorePermit) -> bool {
        self.queues[event.lane(self.queues.len())]
            .send(lane::Command::Event(event, permit))
            .is_ok()
    }

    /// Tells every lane to stop after the events queued in it.
    fn stop(&self) {
        self.permits.close();
        for queue in &self.queues {
            let _ = queue.send(lane::Command::Stop(None));
        }
    }

    /// Tells every lane to stop after the events queued in it, for lanes that replace them:
    /// the gate those wait at. The queue's permits stay open, for the new lanes.
    fn retire(&self) -> lane::Gate {
        let stopped = Arc::new(Semaphore::new(0));
        let mut lanes = 0;
        for queue in &self.queues {
            if queue
                .send(lane::Command::Stop(Some(Arc::clone(&stopped))))
                .is_ok()
            {
                lanes += 1;
            }
        }
        lane::Gate { stopped, lanes }
    }
}

/// The plugins of one host, and the routing of events to them.
pub struct PluginHost {
    runtime: Arc<Runtime>,
    services: Arc<Services>,
    config: crate::config::PluginsConfig,
    /// Where compiled plugins are cached, if anywhere.
    cache_dir: Option<std::path::PathBuf>,
    /// Lanes by plugin (file) name.
    lanes: Mutex<BTreeMap<String, LaneHandle>>,
    /// Messages routed to a lane and not yet handled: a retry must not route them again.
    in_flight: Mutex<HashSet<MessageId>>,
    /// Deletion notices queued to a plugin and not yet handled: (deletion id, plugin).
    notices_in_flight: Mutex<HashSet<(MessageId, String)>>,
    /// Wakes the loader for a look at the plugins directory now.
    pub rescan: tokio::sync::Notify,
    /// How many scans of the plugins directory have completed.
    scans: tokio::sync::watch::Sender<u64>,
    /// Plugin files whose last build was refused, with why: what `admin plugins` shows beside
    /// what is loaded.
    refused: Mutex<BTreeMap<String, String>>,
    /// The lanes' tasks, to wait for at shutdown.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl PluginHost {
    /// A plugin host with no plugin loaded yet.
    pub fn new(
        config: crate::config::PluginsConfig,
        cache_dir: Option<&std::path::Path>,
        services: Arc<Services>,
    ) -> wasmtime::Result<Self> {
        let runtime = Arc::new(Runtime::new(&config, cache_dir)?);
        runtime::start_ticker(runtime.engine());
        Ok(Self {
            runtime,
            services,
            config,
            cache_dir: cache_dir.map(std::path::Path::to_path_buf),
            lanes: Mutex::new(BTreeMap::new()),
            in_flight: Mutex::new(HashSet::new()),
            notices_in_flight: Mutex::new(HashSet::new()),
            rescan: tokio::sync::Notify::new(),
            tasks: Mutex::new(Vec::new()),
            scans: tokio::sync::watch::Sender::new(0),
            refused: Mutex::new(BTreeMap::new()),
        })
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LaneHandle>> {
        // Every update of the map is a single insert, remove or field store.
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<MessageId>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The plugins loaded now, by name.
    pub fn loaded(&self) -> Vec<(String, LoadedInfo, settings::Settings)> {
        self.lanes()
            .iter()
            .map(|(name, lane)| (name.clone(), lane.info.clone(), lane.settings.clone()))
            .collect()
    }

    /// The plugin files whose last build was refused, with why (a loaded build of the same
    /// name may still be serving).
    pub fn refused(&self) -> Vec<(String, String)> {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect()
    }

    /// Records the outcome of loading plugin file `name`: `None` if it loaded (or went).
    fn set_refused(&self, name: &str, error: Option<String>) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        match error {
            Some(error) => refused.insert(name.to_owned(), error),
            None => refused.remove(name),
        };
    }

    /// The plugin that handles submitted messages of `kind`, if one is loaded.
    pub fn handler_of(&self, kind: &MessageKind) -> Option<String> {
        let wanted = Subscription::Message(kind.clone());
        self.lanes()
            .iter()
            .find(|(_, lane)| lane.info.subscriptions.contains(&wanted))
            .map(|(name, _)| name.clone())
    }

    /// The loaded plugins that subscribed to `wanted`, by name.
    pub fn subscribers(&self, wanted: &Subscription) -> Vec<String> {
        self.lanes()
            .iter()
            .filter(|(_, lane)| lane.info.subscriptions.contains(wanted))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Hands the notice of an account's deletion to `plugins` (those it was recorded for,
    /// [`crate::store::Accounts::notice_deletion`]); a plugin not loaded now gets it when
    /// [`PluginHost::route_pending`] finds it loaded. Returns how many it was queued for.
    pub async fn tell_deleted(&self, deletion: &AccountDeletion, plugins: &[String]) -> usize {
        let mut queued = 0;
        for name in plugins {
            let notice = (deletion.id, name.clone());
            if !self.notices_in_flight().insert(notice.clone()) {
                continue;
            }
            let permits = self.lanes().get(name).map(|lane| Arc::clone(&lane.permits));
            let sent = match permits {
                Some(permits) => {
                    let event = Event::AccountDeleted(deletion.clone());
                    self.queue_to(name, permits, event).await
                }
                None => false,
            };
            if sent {
                queued += 1;
            } else {
                self.notices_in_flight().remove(&notice);
            }
        }
        queued
    }

    fn notices_in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<(MessageId, String)>> {
        self.notices_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a lane when it is done with a deletion notice (handled, refused or set
    /// aside): its record goes, and a later routing may not send it again.
    fn notice_settled(&self, id: MessageId, plugin: &str) {
        if let Err(e) = self.services.store.accounts.notice_handled(id.0, plugin) {
            tracing::error!(%id, plugin, error = %e, "deletion notice record not removed; it will be handled again");
        }
        self.notices_in_flight().remove(&(id, plugin.to_owned()));
    }

    /// Whether a loaded plugin handles groups (`subscribe-groups`).
    pub fn handles_groups(&self) -> bool {
        self.lanes()
            .values()
            .any(|lane| lane.info.subscriptions.contains(&Subscription::Groups))
    }

    /// Whether any plugin wants the deliveries of messages of `kind`.
    pub fn wants_delivered(&self, kind: &MessageKind) -> bool {
        let wanted = Subscription::Delivered(kind.clone());
        self.lanes()
            .values()
            .any(|lane| lane.info.subscriptions.contains(&wanted))
    }

    /// Hands `event` to every plugin that subscribed to it, waiting while a plugin's queue is
    /// full. A message event no plugin handles stays recorded for dispatch. Returns how many
    /// plugins it was queued for.
    pub async fn raise(&self, event: Event) -> usize {
        if let Event::Message(m) = &event
            && let Some(group) = m.group()
            && let crate::iim::Home::Remote(server) = self.services.iim.group_home(group)
        {
            return self.relay_to_group(m, group, server);
        }
        let wanted = event.subscription();
        if let Event::Message(m) = &event
            && !self.in_flight().insert(m.id)
        {
            // Already on its way to a plugin.
            return 0;
        }
        let targets: Vec<(String, Arc<Semaphore>)> = self
            .lanes()
            .iter()
            .filter(|(_, lane)| lane.info.subscriptions.contains(&wanted))
            .map(|(name, lane)| (name.clone(), Arc::clone(&lane.permits)))
            .collect();
        let mut queued = 0;
        for (name, permits) in targets {
            if self.queue_to(&name, permits, event.clone()).await {
                queued += 1;
            }
        }
        if queued == 0
            && let Event::Message(m) = &event
        {
            self.in_flight().remove(&m.id);
            tracing::warn!(id = %m.id, kind = %m.kind, "no plugin handles this message now; it stays recorded for dispatch");
        }
        queued
    }

    /// Hands a message to a group of another host to that host, whose groups plugin is the
    /// group's sequencer (DESIGN.md §7), and lets go of its dispatch record: 1 if it is on its
    /// way, 0 if it stays recorded for the next retry.
    fn relay_to_group(&self, message: &Message, group: &GroupId, server: String) -> usize {
        let store = &self.services.store;
        match self
            .services
            .iim
            .relay_to_group(message, group, server.clone())
        {
            Ok(()) => {
                tracing::debug!(id = %message.id, %group, %server, "relayed to the group's home host");
                if let Err(e) = store.messages.dispatched(message.id) {
                    // Relayed again at the next retry: the home host's plugin sees a
                    // message it handled, which reaches each inbox once.
                    tracing::error!(id = %message.id, error = %e, "dispatch record not removed");
                }
                1
            }
            Err(e) => {
                tracing::warn!(id = %message.id, %group, %server, error = %e, "cannot relay to the group's home host now; it stays recorded for dispatch");
                0
            }
        }
    }

    /// Queues `event` for plugin `name`, waiting for room in its queue; `false` if the plugin
    /// went away meanwhile.
    async fn queue_to(&self, name: &str, permits: Arc<Semaphore>, event: Event) -> bool {
        let Ok(permit) = permits.acquire_owned().await else {
            return false;
        };
        // The lane may have gone while this waited; its queue then refuses the event.
        self.lanes()
            .get(name)
            .is_some_and(|lane| lane.queue(event, permit))
    }

    /// Hands dead letter `id` to be handled again, now that the plugin may have been fixed,
    /// and answers which plugin it went to. A message goes to whichever plugin handles its
    /// kind now, as a pending message (recorded for dispatch again);
    /// another event goes back to the plugin that failed it only (the others handled it). A
    /// letter that no loaded plugin would take is kept, and the error says why.
    pub async fn retry_dead_letter(&self, id: u64) -> Result<String, RetryError> {
        let store = &self.services.store;
        let failed = |source| RetryError::Store { id, source };
        let letter = DeadLetter::read(store, id)
            .map_err(failed)?
            .ok_or(RetryError::NoLetter(id))?;
        // The plugin it goes to, and (for an event other than a message) that plugin's queue.
        let (plugin, permits) = match &letter.event {
            Event::Message(m) => {
                let handler = self
                    .handler_of(&m.kind)
                    .ok_or_else(|| RetryError::NoHandler(m.kind.clone()))?;
                (handler, None)
            }
            event => {
                let wanted = event.subscription();
                let permits = self
                    .lanes()
                    .get(&letter.plugin)
                    .filter(|lane| lane.info.subscriptions.contains(&wanted))
                    .map(|lane| Arc::clone(&lane.permits))
                    .ok_or_else(|| RetryError::PluginGone {
                        plugin: letter.plugin.clone(),
                        subscription: wanted,
                    })?;
                (letter.plugin.clone(), Some(permits))
            }
        };
        // A message event is recorded for dispatch first, and durably (the message log and
        // sled are made durable one after the other), so that from here on it is a pending
        // message like any other: a crash before it is handled leaves it pending, never lost
        // (at worst the letter stays listed too, and handling it twice delivers it once).
        if let Event::Message(message) = &letter.event {
            store.messages.redispatch(message).map_err(failed)?;
            store.flush().await.map_err(failed)?;
        }
        if !store.dead_letters.remove(id).map_err(failed)? {
            return Err(RetryError::NoLetter(id));
        }
        match (&letter.event, permits) {
            (Event::Message(m), _) => {
                // Durable as a pending message before it is handed over; if no plugin takes it
                // now, the periodic retry routes it.
                store.flush().await.map_err(failed)?;
                if self.raise(letter.event.clone()).await == 0 {
                    tracing::warn!(id = %m.id, "requeued dead letter waits for a plugin");
                }
            }
            (event, permits) => {
                let queued = match permits {
                    Some(permits) => self.queue_to(&plugin, permits, event.clone()).await,
                    None => false,
                };
                if !queued {
                    letter.keep(store).map_err(failed)?;
                    return Err(RetryError::WentAway(plugin));
                }
            }
        }
        tracing::info!(letter = id, %plugin, event = %letter.event, "dead letter handed back");
        Ok(plugin)
    }

    /// Called by a lane when it is done with a message event (handled, refused, set aside, or
    /// left for another build): a retry may route it again if it is still recorded.
    fn settled(&self, id: MessageId) {
        self.in_flight().remove(&id);
    }

    /// Hands every deletion notice not handled yet to its plugin, unless it is on its way
    /// there already. Returns how many were queued.
    async fn route_deletion_notices(&self) -> Result<usize, crate::store::StoreError> {
        let mut routed = 0;
        for (id, plugin, user, at) in self.services.store.accounts.pending_notices()? {
            let deletion = AccountDeletion {
                id: MessageId(id),
                user,
                at,
            };
            routed += self
                .tell_deleted(&deletion, std::slice::from_ref(&plugin))
                .await;
        }
        Ok(routed)
    }

    /// Every dead letter kept, with its number, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<(u64, DeadLetter)>, crate::store::StoreError> {
        DeadLetter::all(&self.services.store)
    }

    /// Routes every message recorded for dispatch that is not on its way to a plugin: after a
    /// restart, after a plugin comes back, and periodically. Returns how many were queued.
    pub async fn route_pending(&self) -> Result<usize, crate::store::StoreError> {
        let mut routed = self.route_deletion_notices().await?;
        let pending = self.services.store.messages.pending()?;
        for message in pending {
            if !self.in_flight().insert(message.id) {
                continue;
            }
            // Handled since the scan above: a lane removes the record before it lets go of
            // the id, so a record still here now is one no lane holds.
            let still = self.services.store.messages.is_pending(message.id);
            self.in_flight().remove(&message.id);
            if !still? {
                continue;
            }
            if self.raise(Event::Message(Arc::new(message))).await > 0 {
                routed += 1;
            }
        }
        Ok(routed)
    }

    /// Looks at the plugins directory now and returns once that look is applied.
    pub async fn reload(&self) {
        let mut scans = self.scans.subscribe();
        let before = *scans.borrow_and_update();
        self.rescan.notify_one();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(120),
            scans.wait_for(|done| *done > before),
        )
        .await;
    }

    /// Records that a scan of the plugins directory completed.
    fn scanned(&self) {
        self.scans.send_modify(|n| *n += 1);
    }

    /// Stops every lane after the events queued in it, and waits for them.
    pub async fn stop(&self) {
        for (_, lane) in std::mem::take(&mut *self.lanes()) {
            lane.stop();
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
    }
}
