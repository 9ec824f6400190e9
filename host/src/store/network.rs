//! A host's durable view of its network: its number, the registry and directory it caches,
//! and the names of deleted accounts it has yet to release at the exchange (the `network`
//! tree); and its relay outbox and relay position, in the message log.

use super::hot::{Head, Journal};
use super::{Sealer, StoreError, decode, encode, get_u64, keys};
use iim_proto::peer::{Envelope, ServerInfo};
use iim_proto::{Address, UserId};
use std::sync::Arc;

/// What this host knows of its network, durably, and its relay outbox.
#[derive(Clone)]
pub struct NetworkStore {
    tree: sled::Tree,
    /// The relay outbox's envelopes (they hold messages) and the host's credential are sealed.
    sealer: Sealer,
    /// Where the relay outbox and the relay position are.
    journal: Arc<Journal>,
}

impl NetworkStore {
    pub(super) fn new(
        db: &sled::Db,
        sealer: &Sealer,
        journal: &Arc<Journal>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            tree: db.open_tree("network")?,
            sealer: sealer.clone(),
            journal: Arc::clone(journal),
        })
    }

    /// This host's number in its network, if it has joined one.
    pub fn host_number(&self) -> Result<Option<u16>, StoreError> {
        Ok(get_u64(&self.tree, "network", keys::NET_NUMBER)?.map(|n| n as u16))
    }

    /// Records this host's number. Durable after the next flush.
    pub fn set_host_number(&self, number: u16) -> Result<(), StoreError> {
        self.tree
            .insert(keys::NET_NUMBER, &u64::from(number).to_be_bytes())?;
        Ok(())
    }

    /// The credential this host shows the exchange (empty until it is made, before the first
    /// join).
    pub fn host_credential(&self) -> Result<String, StoreError> {
        let Some(stored) = self.tree.get(keys::NET_CREDENTIAL)? else {
            return Ok(String::new());
        };
        let credential = self.sealer.open("network", keys::NET_CREDENTIAL, &stored)?;
        Ok(String::from_utf8_lossy(&credential).into_owned())
    }

    /// Records this host's credential. Durable after the next flush.
    pub fn set_host_credential(&self, credential: &str) -> Result<(), StoreError> {
        let sealed = self.sealer.seal(
            "network",
            keys::NET_CREDENTIAL,
            credential.as_bytes().to_vec(),
        );
        self.tree.insert(keys::NET_CREDENTIAL, sealed)?;
        Ok(())
    }

    /// The cached directory: every (user, home server) and the version it is complete up to.
    pub fn cached_directory(&self) -> Result<(u64, Vec<(Address, String)>), StoreError> {
        let version = get_u64(&self.tree, "network", keys::NET_DIRECTORY_VERSION)?.unwrap_or(0);
        let mut homes = Vec::new();
        for entry in self.tree.scan_prefix(keys::NET_HOME_PREFIX) {
            let (key, value) = entry?;
            let corrupt = |reason: &str| StoreError::Corrupt {
                tree: "network",
                reason: reason.into(),
            };
            let name = std::str::from_utf8(&key[1..]).map_err(|_| corrupt("user not UTF-8"))?;
            let user: Address = name.parse().map_err(|_| corrupt("invalid name"))?;
            let server = String::from_utf8(value.to_vec()).map_err(|_| corrupt("server id"))?;
            homes.push((user, server));
        }
        Ok((version, homes))
    }

    /// Caches directory entries; `version` (if any) is the version the cache is now complete
    /// up to. An entry with an empty home removes its name: it was released.
    pub fn cache_directory(
        &self,
        entries: &[(Address, String)],
        version: Option<u64>,
    ) -> Result<(), StoreError> {
        for (user, server) in entries {
            if server.is_empty() {
                self.tree.remove(keys::net_home(user))?;
            } else {
                self.tree.insert(keys::net_home(user), server.as_bytes())?;
            }
        }
        if let Some(version) = version
            && version > get_u64(&self.tree, "network", keys::NET_DIRECTORY_VERSION)?.unwrap_or(0)
        {
            self.tree
                .insert(keys::NET_DIRECTORY_VERSION, &version.to_be_bytes())?;
        }
        Ok(())
    }

    /// The cached registry.
    pub fn cached_servers(&self) -> Result<Vec<ServerInfo>, StoreError> {
        self.tree
            .scan_prefix(keys::NET_SERVER_PREFIX)
            .map(|entry| decode("network", &entry?.1))
            .collect()
    }

    /// Caches the registry.
    pub fn cache_servers(&self, servers: &[ServerInfo]) -> Result<(), StoreError> {
        for server in servers {
            self.tree
                .insert(keys::net_server(&server.id), encode(server))?;
        }
        Ok(())
    }

    /// Puts an envelope (`905`) in the relay outbox, numbered one past the last; returns its
    /// number. Durable after the next flush. The outbox is in the message log: numbered and
    /// appended under its lock, so that it is written in number order.
    pub fn relay_push(&self, envelope: &Envelope) -> Result<u64, StoreError> {
        let plain = encode(envelope);
        let mut inner = self.journal.lock();
        let seq = inner.state.relay_high() + 1;
        let sealed = self.sealer.seal("network", &keys::net_outbox(seq), plain);
        inner.log(Head::RelayOut { seq }, &sealed);
        Ok(seq)
    }

    /// Up to `limit` outbox entries after number `after`, in order.
    pub fn relay_outbox(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Envelope)>, StoreError> {
        let found = {
            let inner = self.journal.lock();
            inner
                .state
                .relay_out
                .range(after.saturating_add(1)..)
                .take(limit)
                .map(|(seq, loc)| Ok((*seq, inner.tail.locate(*loc)?)))
                .collect::<Result<Vec<_>, StoreError>>()?
        };
        found
            .into_iter()
            .map(|(seq, located)| {
                let key = keys::net_outbox(seq);
                let stored = located.read()?;
                let envelope = self.sealer.open("network", &key, &stored)?;
                Ok((seq, decode("network", &envelope)?))
            })
            .collect()
    }

    /// The exchange has every outbox entry up to `seq`: they leave the outbox. Durable after
    /// the next flush (until then a restart sends them again, and the exchange drops repeats).
    pub fn relay_acked(&self, seq: u64) -> Result<(), StoreError> {
        let mut inner = self.journal.lock();
        let last = inner.state.relay_high();
        if seq > last {
            // The exchange has numbers this host never made durably (its store was lost or
            // rolled back): numbering goes on above them, or the exchange would take new
            // envelopes for repeats and drop them.
            tracing::error!(
                acknowledged = seq,
                last,
                "the exchange acknowledged relay envelopes this host has no record of"
            );
        }
        if seq > inner.state.relay_acked {
            inner.log(Head::RelayAcked { seq }, &[]);
        }
        Ok(())
    }

    /// How many envelopes wait in the relay outbox.
    pub fn relay_waiting(&self) -> usize {
        self.journal.lock().state.relay_out.len()
    }

    /// The highest `906` number this host made durable.
    pub fn relayed_in(&self) -> Result<u64, StoreError> {
        Ok(self.journal.lock().state.relayed_in)
    }

    /// Records that every `906` up to `seq` is applied. Durable after the next flush.
    pub fn set_relayed_in(&self, seq: u64) -> Result<(), StoreError> {
        // In the message log, with the inbox entries the relayed messages made: both are
        // durable, or neither.
        self.journal.lock().log(Head::RelayedIn { seq }, &[]);
        Ok(())
    }

    /// Records that the name of `user`, whose account was deleted, is to be released at the
    /// exchange. Durable after the next flush.
    pub fn release_later(&self, user: &UserId) -> Result<(), StoreError> {
        self.tree.insert(keys::net_release(user), &[])?;
        Ok(())
    }

    /// The names waiting to be released, by name.
    pub fn to_release(&self) -> Result<Vec<UserId>, StoreError> {
        self.tree
            .scan_prefix(keys::NET_RELEASE_PREFIX)
            .map(|entry| {
                keys::net_release_user(&entry?.0).ok_or_else(|| StoreError::Corrupt {
                    tree: "network",
                    reason: "a release record without a valid name".into(),
                })
            })
            .collect()
    }

    /// Whether the name of `user` waits to be released.
    pub fn is_to_release(&self, user: &UserId) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(keys::net_release(user))?)
    }

    /// The name of `user` needs no release any more: the exchange released it, or this host
    /// claimed it again. Durable after the next flush.
    pub fn release_done(&self, user: &UserId) -> Result<(), StoreError> {
        self.tree.remove(keys::net_release(user))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::tests::{message, reopen};
    use iim_proto::UserId;

    fn envelope(id: u64) -> Envelope {
        Envelope {
            message: message(id),
            expires_at: None,
            rows: vec![iim_proto::peer::RelayRow {
                server: "h2".into(),
                users: vec![UserId::new("bob").expect("valid").into()],
            }],
        }
    }

    #[test]
    fn the_relay_outbox_is_numbered_in_order_and_never_reuses_a_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        {
            let store = Store::open(&path).expect("open");
            for id in 1..=5 {
                assert_eq!(store.network.relay_push(&envelope(id)).expect("push"), id);
            }
            let first: Vec<u64> = store
                .network
                .relay_outbox(0, 3)
                .expect("read")
                .into_iter()
                .map(|(seq, e)| {
                    assert_eq!(e.message.id.0, seq);
                    seq
                })
                .collect();
            assert_eq!(first, vec![1, 2, 3]);
            assert_eq!(store.network.relay_outbox(3, 10).expect("read").len(), 2);
            // The exchange has them all: the outbox empties.
            store.network.relay_acked(5).expect("ack");
            assert_eq!(store.network.relay_waiting(), 0);
            assert!(store.network.relay_outbox(0, 10).expect("read").is_empty());
        }
        // Reopened with an empty outbox, numbering goes on after what was acknowledged (the
        // exchange drops numbers it has seen).
        let store = reopen(&path, Store::open);
        assert_eq!(store.network.relay_push(&envelope(6)).expect("push"), 6);
        store
            .network
            .relay_acked(3)
            .expect("an old ack changes nothing");
        assert_eq!(store.network.relay_waiting(), 1);
    }

    #[test]
    fn a_host_number_goes_into_every_message_id_and_the_caches_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let bob: Address = UserId::new("bob").expect("valid").into();
        {
            let store = Store::open(&path).expect("open");
            assert_eq!(store.network.host_number().expect("read"), None);
            store.network.set_host_number(3).expect("number");
            store.messages.use_host_number(3);
            let id = store
                .messages
                .number(|id| iim_proto::Message { id, ..message(0) })
                .expect("id")
                .id;
            assert_eq!(id.0 >> iim_proto::peer::ID_BITS, 3, "{id}");
            assert!(id.0 < 1 << 53, "fits a JSON number: {id}");
            store
                .network
                .cache_directory(&[(bob.clone(), "h2".into())], Some(7))
                .expect("cache");
            store
                .network
                .cache_servers(&[ServerInfo {
                    id: "h2".into(),
                    number: 2,
                    addr: "127.0.0.1:1".into(),
                    up: true,
                }])
                .expect("cache");
        }
        let store = reopen(&path, Store::open);
        assert_eq!(store.network.host_number().expect("read"), Some(3));
        assert_eq!(
            store.network.cached_directory().expect("read"),
            (7, vec![(bob, "h2".to_owned())])
        );
        assert_eq!(store.network.cached_servers().expect("read")[0].number, 2);
    }

    #[test]
    fn a_released_name_leaves_the_cache_and_a_release_waits_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let dora = UserId::new("dora").expect("valid");
        let bob: Address = UserId::new("bob").expect("valid").into();
        {
            let store = Store::open(&path).expect("open");
            let entries = [
                (dora.clone().into(), "h1".to_owned()),
                (bob.clone(), "h2".into()),
            ];
            store
                .network
                .cache_directory(&entries, Some(2))
                .expect("cache");
            store
                .network
                .cache_directory(&[(dora.clone().into(), String::new())], Some(3))
                .expect("cache");
            store.network.release_later(&dora).expect("record");
            store.network.release_later(&dora).expect("twice is once");
        }
        let store = reopen(&path, Store::open);
        assert_eq!(
            store.network.cached_directory().expect("read"),
            (3, vec![(bob, "h2".to_owned())]),
            "no empty home is kept"
        );
        assert_eq!(
            store.network.to_release().expect("read"),
            vec![dora.clone()]
        );
        assert!(store.network.is_to_release(&dora).expect("read"));
        assert!(store.network.relay_outbox(0, 10).expect("read").is_empty());
        store.network.release_done(&dora).expect("done");
        assert!(store.network.to_release().expect("read").is_empty());
        assert!(!store.network.is_to_release(&dora).expect("read"));
    }
}
