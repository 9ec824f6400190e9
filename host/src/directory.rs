//! What a host knows of its network (DESIGN.md §3): the registry of hosts, the user directory
//! (user → home host) and how many devices the users of other hosts have online.
//!
//! Kept in memory, and the registry and the directory also in the store, so that a host
//! restarted while the exchange is away still routes. The link to the exchange
//! ([`crate::network`]) keeps it up to date; the IIM entry point, the plugins and the requests
//! read it.

use crate::store::{Store, StoreError};
use iim_proto::peer::ServerInfo;
use iim_proto::{Address, UserId};
use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A host's view of its network.
pub struct Directory {
    server: String,
    store: Store,
    /// Users' and groups' homes.
    homes: RwLock<HashMap<Address, String>>,
    /// The directory version the cache is complete up to.
    version: AtomicU64,
    servers: RwLock<BTreeMap<String, ServerInfo>>,
    /// Users of other hosts with devices online, and how many.
    presence: RwLock<HashMap<UserId, u32>>,
}

impl Directory {
    /// The view of host `server`, from what `store` cached (every host down until the link
    /// says otherwise).
    pub fn new(server: String, store: Store) -> Result<Self, StoreError> {
        let (version, homes) = store.network.cached_directory()?;
        let servers = store
            .network
            .cached_servers()?
            .into_iter()
            .map(|s| (s.id.clone(), ServerInfo { up: false, ..s }))
            .collect();
        Ok(Self {
            server,
            store,
            homes: RwLock::new(homes.into_iter().collect()),
            version: AtomicU64::new(version),
            servers: RwLock::new(servers),
            presence: RwLock::default(),
        })
    }

    /// This host's server id.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The home server of `name` (a user or a group) as the directory says, if it knows it.
    pub fn home_of(&self, name: &Address) -> Option<String> {
        read(&self.homes).get(name).cloned()
    }

    /// The home server of `user` as the directory says, if it knows the user.
    pub fn home_of_user(&self, user: &UserId) -> Option<String> {
        self.home_of(&Address::User(user.clone()))
    }

    /// Whether the directory knows `name`.
    pub fn knows(&self, name: &Address) -> bool {
        read(&self.homes).contains_key(name)
    }

    /// How many names (users and groups) the cached directory holds.
    pub fn len(&self) -> usize {
        read(&self.homes).len()
    }

    /// Whether the cached directory holds no name.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The directory version the cache is complete up to.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Server `id`, if the registry has it.
    pub fn server_info(&self, id: &str) -> Option<ServerInfo> {
        read(&self.servers).get(id).cloned()
    }

    /// The registry.
    pub fn servers(&self) -> Vec<ServerInfo> {
        read(&self.servers).values().cloned().collect()
    }

    /// How many devices of `user`, a user of another host, are online (0 if unknown).
    pub fn presence_of(&self, user: &UserId) -> u32 {
        read(&self.presence).get(user).copied().unwrap_or(0)
    }

    /// How many users of other hosts have devices online, as far as this host knows.
    pub fn remote_online(&self) -> usize {
        read(&self.presence).len()
    }

    /// Learns where users live (a claim's, a release's or a look-up's answer), caching it. An
    /// empty home forgets the name.
    pub fn learn(&self, entries: &[(Address, String)]) -> Result<(), StoreError> {
        self.store.network.cache_directory(entries, None)?;
        let mut homes = write(&self.homes);
        for (user, server) in entries {
            set_home(&mut homes, user.clone(), server.clone());
        }
        Ok(())
    }

    /// Takes directory entries the exchange sent, complete up to `version`, caching them. An
    /// entry with an empty home forgets the name: it was released (its account deleted).
    pub fn update(&self, version: u64, entries: Vec<(Address, String)>) -> Result<(), StoreError> {
        self.store
            .network
            .cache_directory(&entries, Some(version))?;
        let mut homes = write(&self.homes);
        for (user, server) in entries {
            set_home(&mut homes, user, server);
        }
        self.version.fetch_max(version, Ordering::Relaxed);
        Ok(())
    }

    /// Takes (and caches) the registry, or changes to it.
    pub fn set_servers(&self, servers: Vec<ServerInfo>) -> Result<(), StoreError> {
        self.store.network.cache_servers(&servers)?;
        let mut map = write(&self.servers);
        for server in servers {
            map.insert(server.id.clone(), server);
        }
        Ok(())
    }

    /// Takes the presence of users of other hosts: how many devices each has online.
    pub fn set_presence(&self, entries: Vec<(UserId, u32)>) {
        let mut presence = write(&self.presence);
        for (user, devices) in entries {
            if devices == 0 {
                presence.remove(&user);
            } else {
                presence.insert(user, devices);
            }
        }
    }

    /// The link to the exchange is down: every other host counts as down, and their users as
    /// offline, until it is back.
    pub fn link_down(&self) {
        write(&self.presence).clear();
        for server in write(&self.servers).values_mut() {
            server.up = false;
        }
    }
}

/// Records `name`'s home, or forgets the name if `home` is empty (the directory's mark of a
/// released name: no host is its home).
fn set_home(homes: &mut HashMap<Address, String>, name: Address, home: String) {
    if home.is_empty() {
        homes.remove(&name);
    } else {
        homes.insert(name, home);
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}
