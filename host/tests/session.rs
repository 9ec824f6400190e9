//! Component tests of the session driver: a real host (`Server`, its store in a temporary
//! directory, the default plugins) started inside the test process, driven by the client
//! library over QUIC on 127.0.0.1, and its store and registry looked at directly — what an
//! end-to-end test through a subprocess cannot see.

use iim_client::{ClientConfig, Connection, Event};
use iim_host::Host;
use iim_host::config::Config;
use iim_host::server::Server;
use iim_proto::{DeviceId, ErrorCode, MessageKind, SessionMode, UserId};
use std::sync::Arc;
use std::time::Duration;

type Result = std::result::Result<(), Box<dyn std::error::Error>>;

const PASSWORD: &str = "correct horse";

/// A host running in this process.
struct InProcess {
    host: Arc<Host>,
    client: ClientConfig,
    _stop: tokio::sync::oneshot::Sender<()>,
    _data: tempfile::TempDir,
}

impl InProcess {
    async fn start() -> std::result::Result<Self, Box<dyn std::error::Error>> {
        let data = tempfile::tempdir()?;
        let config = Config {
            data_dir: data.path().to_owned(),
            listen: "127.0.0.1:0".parse()?,
            ..Config::default()
        };
        let server = Server::start(config).await?;
        let client = ClientConfig::new(server.local_addr()?).with_ca_file(server.cert_path())?;
        let host = server.host();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            host,
            client,
            _stop: stop,
            _data: data,
        })
    }

    async fn user(&self, name: &str) -> std::result::Result<UserId, Box<dyn std::error::Error>> {
        let user = UserId::new(name)?;
        let conn = Connection::connect(&self.client).await?;
        conn.register(&user, PASSWORD).await?;
        conn.close().await;
        Ok(user)
    }

    async fn login(
        &self,
        user: &UserId,
        device: &str,
        mode: SessionMode,
    ) -> std::result::Result<Connection, Box<dyn std::error::Error>> {
        let conn = Connection::connect(&self.client).await?;
        conn.login(user, PASSWORD, &DeviceId::new(device)?, mode)
            .await?;
        Ok(conn)
    }
}

/// Waits (at most 10 s) until `ready` holds.
async fn until(what: &str, mut ready: impl FnMut() -> bool) -> Result {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ready() {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{what}: not within 10 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_move_the_stored_cursor_and_prune_what_every_device_has() -> Result {
    let host = InProcess::start().await?;
    let alice = host.user("alice").await?;
    let bob = host.user("bob").await?;
    let b = host.login(&bob, "phone", SessionMode::Receive).await?;
    let a = host.login(&alice, "laptop", SessionMode::SendOnly).await?;
    let mut ids = Vec::new();
    for text in ["one", "two", "three"] {
        ids.push(a.send_text(&bob, text).await?.id);
    }
    // Bob's phone takes every delivery (its presence snapshot included) and acknowledges the
    // last chat message only: one cumulative acknowledgement.
    let mut last = 0;
    let mut chat = Vec::new();
    while chat.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), b.next_event()).await? {
            Some(Ok(Event::Message { seq, message })) => {
                if message.kind == MessageKind::Chat {
                    chat.push(message.id);
                }
                last = seq;
            }
            Some(Ok(_)) => {}
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    assert_eq!(chat, ids);
    b.ack(last).await?;
    let phone = DeviceId::new("phone")?;
    let store = &host.host.store;
    until("the cursor saved", || {
        store.cursors.get(&bob, &phone).ok() == Some(last)
    })
    .await?;
    // Bob's only device has everything: nothing is read from his inbox any more, but the
    // messages keep their place (without their bodies) for read receipts until they expire.
    until("the inbox pruned", || {
        store
            .inbox
            .after(&bob, 0, 100)
            .is_ok_and(|left| left.is_empty())
    })
    .await?;
    for id in &ids {
        let kept = store
            .inbox
            .message(&bob, *id)?
            .ok_or("the pruned entry is kept")?;
        assert!(kept.body.is_empty(), "pruned to what a receipt needs");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_delivery_session_leaves_the_registry_to_the_new_one() -> Result {
    let host = InProcess::start().await?;
    let bob = host.user("bob").await?;
    let first = host.login(&bob, "phone", SessionMode::Receive).await?;
    let registry = &host.host.registry;
    until("the first session attached", || {
        registry.online(&bob).len() == 1
    })
    .await?;
    let before = registry.online(&bob)[0].1;
    let second = host.login(&bob, "phone", SessionMode::Receive).await?;
    // The first is told why it ends.
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), first.next_event()).await? {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    let code = match ended {
        Some(Err(e)) => e.code(),
        other => {
            return Err(format!("the first session did not end with an error: {other:?}").into());
        }
    };
    assert_eq!(code, Some(ErrorCode::SESSION_REPLACED));
    // One delivery session of the device: the new one.
    until("the new session attached", || {
        let online = registry.online(&bob);
        online.len() == 1 && online[0].1 != before
    })
    .await?;
    // A send-only connection of the same device takes nothing from it.
    let tool = host.login(&bob, "phone", SessionMode::SendOnly).await?;
    tool.relations(iim_proto::RelationKind::Friend).await?;
    assert_eq!(registry.online(&bob).len(), 1);
    drop(second);
    until("the device offline", || registry.online(&bob).is_empty()).await?;
    Ok(())
}
