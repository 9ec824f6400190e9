//! Accounts a user controls (`iim account`, `docs/protocol.md` "Accounts"), against the real
//! `iim-host` binary: the devices listed with their activity, a device revoked (its sessions
//! end at once, its token opens nothing, it receives nothing more), the password changed
//! (the other devices revoked, this one kept), and an account deleted, after which the store,
//! searched by `iim-host store find`, keeps nothing of its user but the messages the user
//! sent that are other users' now, and the name can be registered again.

use anyhow::{Context, ensure};
use iim_client::proto::body::{
    FILE_KIND, GroupNotice, GroupRequest, GroupRole, PUSH_KIND, PushReply, PushRequest,
};
use iim_client::proto::{
    Address, DeviceId, ErrorCode, GROUP_KIND, MessageKind, RelationKind, SessionMode, UserId,
};
use iim_client::{ClientError, Connection, new_client_id};
use iim_e2e::*;

type Result = anyhow::Result<()>;

/// A connection of `user` logged in as `device` with `password`, and the device's token.
async fn logged_in(
    host: &HostProcess,
    user: &UserId,
    password: &str,
    device: &str,
    mode: SessionMode,
) -> anyhow::Result<(Connection, String)> {
    let conn = host.connect().await?;
    let token = within(
        "login",
        conn.login(user, password, &DeviceId::new(device)?, mode),
    )
    .await??;
    Ok((conn, token))
}

/// Whether `token` still opens `device` of `user`: the error code if not.
async fn token_refused(
    host: &HostProcess,
    user: &UserId,
    device: &str,
    token: &str,
) -> anyhow::Result<Option<ErrorCode>> {
    let conn = host.connect().await?;
    let outcome = within(
        "authenticate",
        conn.authenticate(user, &DeviceId::new(device)?, token, SessionMode::SendOnly),
    )
    .await?;
    conn.close().await;
    Ok(outcome.err().and_then(|e| e.code()))
}

/// Waits for the host to end `conn`, and returns the code it gave.
async fn ended_by_host(conn: &Connection) -> anyhow::Result<ErrorCode> {
    loop {
        match within("the host ending the session", conn.next_event()).await? {
            Some(Err(ClientError::ClosedByHost { code, .. })) => return Ok(code),
            // Messages delivered before the end are not what this waits for (an
            // acknowledgement may find the session gone already).
            Some(Ok(_)) => {}
            other => anyhow::bail!("expected the host to end the session, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_listed_revoked_at_once_and_a_new_password_logs_the_others_out() -> Result {
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (phone, _) = host.online(&alice, "phone").await?;
    let (laptop, laptop_token) =
        logged_in(&host, &alice, PASSWORD, "laptop", SessionMode::Receive).await?;
    let (tablet, tablet_token) =
        logged_in(&host, &alice, PASSWORD, "tablet", SessionMode::SendOnly).await?;

    let devices = phone.devices().await?;
    let names: Vec<&str> = devices.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(names, ["laptop", "phone", "tablet"]);
    for device in &devices {
        ensure!(device.sessions == 1, "{device:?}");
        ensure!(
            device.logged_in_at > 0 && device.last_active_at >= device.logged_in_at,
            "{device:?}"
        );
    }

    // The laptop is revoked from the phone: its session ends at once, its token opens
    // nothing, and what bob sends next reaches the phone alone.
    phone.revoke_device(&DeviceId::new("laptop")?).await?;
    assert_eq!(ended_by_host(&laptop).await?, ErrorCode::REVOKED);
    assert_eq!(
        token_refused(&host, &alice, "laptop", &laptop_token).await?,
        Some(ErrorCode::AUTH_FAILED)
    );
    let names: Vec<DeviceId> = phone
        .devices()
        .await?
        .into_iter()
        .map(|d| d.device)
        .collect();
    assert_eq!(names, [DeviceId::new("phone")?, DeviceId::new("tablet")?]);
    let refused = phone.revoke_device(&DeviceId::new("laptop")?).await;
    assert_eq!(code_of(refused)?, ErrorCode::INVALID_ARGUMENT);
    let (b, _) = host.online(&bob, "phone").await?;
    b.send_text(&alice, "after the revocation").await?;
    assert_eq!(text(&next_message(&phone).await?), "after the revocation");

    // The password: a wrong old one or a new one too short changes nothing.
    let wrong = phone
        .change_password("not the password", "a new password")
        .await;
    assert_eq!(code_of(wrong)?, ErrorCode::AUTH_FAILED);
    let short = phone.change_password(PASSWORD, "short").await;
    assert_eq!(code_of(short)?, ErrorCode::INVALID_ARGUMENT);
    assert_eq!(
        token_refused(&host, &alice, "tablet", &tablet_token).await?,
        None
    );
    // The right one: the tablet is logged out, the phone stays, the old password opens
    // nothing and the new one does.
    phone.change_password(PASSWORD, "a new password").await?;
    assert_eq!(ended_by_host(&tablet).await?, ErrorCode::REVOKED);
    assert_eq!(
        token_refused(&host, &alice, "tablet", &tablet_token).await?,
        Some(ErrorCode::AUTH_FAILED)
    );
    b.send_text(&alice, "after the new password").await?;
    assert_eq!(text(&next_message(&phone).await?), "after the new password");
    let old = logged_in(&host, &alice, PASSWORD, "desk", SessionMode::SendOnly).await;
    ensure!(old.is_err(), "the old password still logs in");
    let (desk, _) = logged_in(
        &host,
        &alice,
        "a new password",
        "desk",
        SessionMode::SendOnly,
    )
    .await?;
    let names: Vec<DeviceId> = desk
        .devices()
        .await?
        .into_iter()
        .map(|d| d.device)
        .collect();
    assert_eq!(names, [DeviceId::new("desk")?, DeviceId::new("phone")?]);
    for conn in [phone, b, desk] {
        conn.close().await;
    }
    Ok(())
}

/// A host with the chat plugin, the push plugin (which keeps each device's push token in its
/// storage, and forgets a deleted account's), posting to `gateway`, the keys plugin (the
/// end-to-end key directory, which forgets a deleted account's cards) and the groups plugin
/// (whose groups go on without a deleted member).
fn plugins_host(gateway: &gateway::Gateway) -> anyhow::Result<HostProcess> {
    let toml = gateway.push_config();
    let (chat, push) = (default_plugin("chat")?, default_plugin("push")?);
    let (keys, groups) = (default_plugin("keys")?, default_plugin("groups")?);
    HostProcess::start_with(
        "",
        Plugins::Configured(&[
            ("chat", &chat, ""),
            ("push", &push, &toml),
            ("keys", &keys, "[host]\ninstances = 1\n"),
            ("groups", &groups, ""),
        ]),
    )
}

/// Publishes a card for the device of `conn` (a delivery session of `user`) in the key
/// directory, and waits for the plugin's answer. The card is opaque to the plugin: any bytes.
async fn publish_card(conn: &Connection, user: &UserId) -> Result {
    let kind = MessageKind::Custom("keys".into());
    // "a card" and "a key package", in base64.
    let body = br#"{"op":"publish","card":"YSBjYXJk","key_packages":["YSBrZXkgcGFja2FnZQ=="]}"#;
    conn.submit(
        new_client_id(),
        kind.clone(),
        std::slice::from_ref(user),
        body,
    )
    .await?;
    let reply = next_message(conn).await?;
    ensure!(reply.kind == kind, "{reply:?}");
    ensure!(
        text(&reply).contains(r#""op":"published""#),
        "{}",
        text(&reply)
    );
    Ok(())
}

/// Registers the device of `conn` (a delivery session of `user`) for push, and waits for the
/// plugin's answer.
async fn register_for_push(conn: &Connection, user: &UserId) -> Result {
    let kind = MessageKind::Custom(PUSH_KIND.into());
    let body = PushRequest::Register {
        token: "push-token-of-the-user-to-delete".into(),
        always: false,
    }
    .to_json();
    conn.submit(
        new_client_id(),
        kind.clone(),
        std::slice::from_ref(user),
        &body,
    )
    .await?;
    let reply = next_message(conn).await?;
    ensure!(reply.kind == kind, "{reply:?}");
    let reply = PushReply::from_json(&reply.body)?;
    ensure!(matches!(reply, PushReply::Registered { .. }), "{reply:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_account_leaves_nothing_of_its_user_in_the_store_and_its_name_is_free() -> Result
{
    let gateway = gateway::Gateway::start(false).await?;
    let mut host = plugins_host(&gateway)?;
    // A name no other record could hold by chance.
    let alice = host.register("alice-to-delete").await?;
    let bob = host.register("bob").await?;
    let carol = host.register("carol").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let (a2, _) = logged_in(&host, &alice, PASSWORD, "laptop", SessionMode::SendOnly).await?;
    let (b, _) = host.online(&bob, "phone").await?;
    a.add_relation(RelationKind::Friend, &bob).await?;
    a.add_relation(RelationKind::Colleague, &carol).await?;
    b.add_relation(RelationKind::Friend, &alice).await?;

    // What alice owns: a push registration (a plugin's value), messages waiting in her inbox
    // (one delivered, more not), a file she uploaded and sent; what she sent bob is bob's.
    register_for_push(&a, &alice).await?;
    publish_card(&a, &alice).await?;
    for i in 0..3 {
        b.send_text(&alice, &format!("to alice {i}")).await?;
    }
    next_message(&a).await?;
    a.send_text(&bob, "from alice").await?;
    assert_eq!(text(&next_message(&b).await?), "from alice");
    let scratch = tempfile::tempdir()?;
    let path = scratch.path().join("alice's.txt");
    std::fs::write(&path, b"a file of alice's")?;
    let file = a.upload_file(&path, "text/plain", &mut |_, _| {}).await?;
    a.submit(
        new_client_id(),
        MessageKind::Custom(FILE_KIND.into()),
        std::slice::from_ref(&bob),
        &file.to_json(),
    )
    .await?;
    next_message(&b).await?;
    let sha256 = file.sha256().context("a file id")?;
    // A group alice owns, with bob: it goes on without her, bob its owner.
    let create = GroupRequest::Create {
        title: String::new(),
        members: vec![bob.to_string()],
    };
    a.submit(
        new_client_id(),
        MessageKind::Custom(GROUP_KIND.into()),
        &["#team".parse::<Address>()?],
        &create.to_json(),
    )
    .await?;
    next_message(&a).await?;
    let created = next_message(&b).await?;
    ensure!(
        GroupNotice::from_json(&created.body)
            .is_ok_and(|n| matches!(n, GroupNotice::Created { .. })),
        "{created:?}"
    );
    let file_id = sha256
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let blob = host
        .data_dir()
        .join("files")
        .join(&file_id[..2])
        .join(&file_id);
    ensure!(
        blob.exists(),
        "the file is not where the test looks: {}",
        blob.display()
    );

    let wrong = a.delete_account("not the password").await;
    assert_eq!(code_of(wrong)?, ErrorCode::AUTH_FAILED);
    a2.delete_account(PASSWORD).await?;
    assert_eq!(ended_by_host(&a).await?, ErrorCode::ACCOUNT_DELETED);
    // Gone for everyone at once: messages to alice are refused, bob's list lacks her, her
    // file is gone.
    let refused = b.send_text(&alice, "after the deletion").await;
    assert_eq!(code_of(refused)?, ErrorCode::UNKNOWN_USER);
    assert_eq!(
        b.relations(RelationKind::Friend).await?,
        Vec::<UserId>::new()
    );
    let out = scratch.path().join("downloaded");
    let gone = b.download_file(&sha256, &out, &mut |_, _| {}).await;
    assert_eq!(code_of(gone)?, ErrorCode::NOT_FOUND);
    let login = logged_in(&host, &alice, PASSWORD, "phone", SessionMode::SendOnly).await;
    ensure!(login.is_err(), "a deleted account logs in");
    let mut told = Vec::new();
    while told.len() < 2 {
        told.push(GroupNotice::from_json(&next_message(&b).await?.body)?);
    }
    assert_eq!(
        told,
        [
            GroupNotice::Left,
            GroupNotice::Role {
                user: bob.to_string(),
                role: GroupRole::Owner
            }
        ]
    );
    b.close().await;
    // The push and keys plugins were told, and forgot her registration and her card.
    within("the plugins handling the deletion's notice", async {
        loop {
            let notices = host.admin("notices").await?;
            if notices == "no notices waiting\n" {
                return anyhow::Ok(());
            }
            ensure!(
                ["push", "keys", "groups"]
                    .iter()
                    .any(|p| notices.contains(&format!("for {p}"))),
                "{notices}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await??;

    // The store, searched record by record (values opened with the data key): alice's name
    // is only in bob's inbox, as the sender of the messages she sent him.
    host.terminate()?;
    host.wait().await?;
    let found = host.store_find(alice.as_str())?;
    ensure!(
        !found.is_empty(),
        "bob's messages from alice are his: they are found"
    );
    for record in &found {
        ensure!(
            record.starts_with("inbox\tebob\\x00") && record.ends_with("(in the value)"),
            "the store still holds {record}"
        );
    }
    ensure!(
        !blob.exists(),
        "the deleted account's file {} is still on disk",
        blob.display()
    );

    // The name is free: registered again, it is a new account with nothing of the old one.
    host.restart()?;
    host.register(alice.as_str()).await?;
    let (again, backlog) = host.online(&alice, "phone").await?;
    ensure!(backlog.is_empty(), "the new account got {backlog:?}");
    assert_eq!(
        again.relations(RelationKind::Friend).await?,
        Vec::<UserId>::new()
    );
    assert_eq!(
        again.relations(RelationKind::Colleague).await?,
        Vec::<UserId>::new()
    );
    again.close().await;
    Ok(())
}
