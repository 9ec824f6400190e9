//! Push notifications end to end: a real host with the chat and push plugins, real devices,
//! and a real HTTPS server on loopback standing in for the push gateway, which records what it
//! receives.

use anyhow::{Context, ensure};
use iim_client::proto::body::{PUSH_KIND, PushReply, PushRequest};
use iim_client::proto::{DeviceId, MessageKind, SessionMode, UserId};
use iim_client::{Device, Update};
use iim_e2e::gateway::Gateway;
use iim_e2e::{HostProcess, PASSWORD, Plugins, default_plugin, within};
use std::time::Duration;

type Result<T = ()> = anyhow::Result<T>;

/// How long a push may take to reach the gateway (the plugin's retries included).
const PUSHED: Duration = Duration::from_secs(20);

/// An FCM-shaped token.
const TOKEN: &str = "fcm-token-for-bobs-phone-0123456789";

/// A host with the chat plugin and the push plugin, which posts to `gateway` in `format` with
/// `extra` configuration, and may call `allowed` (the gateway's origin unless said otherwise).
fn host(
    gateway: &Gateway,
    format: &str,
    extra: &str,
    allowed: Option<&str>,
) -> Result<HostProcess> {
    let url = match format {
        "apns" => gateway.origin(),
        _ => format!("{}/v1/projects/test/messages:send", gateway.origin()),
    };
    let allowed = allowed.map_or_else(|| gateway.origin(), str::to_owned);
    let toml = format!(
        "gateway = \"{url}\"\nformat = \"{format}\"\nretries = 1\n{extra}\n\
         [host]\nallowed_outbound_hosts = [\"{allowed}\"]\nhttp_ca_file = \"{}\"\n\
         call_timeout_ms = 10000\nhttp_timeout_ms = 2000\n",
        gateway.cert.display()
    );
    let (chat, push) = (default_plugin("chat")?, default_plugin("push")?);
    HostProcess::start_with(
        "",
        Plugins::Configured(&[("chat", &chat, ""), ("push", &push, &toml)]),
    )
}

/// Registers `phone` (a receiving device of bob's) for push with `token`, and waits for the
/// plugin's answer.
async fn register(phone: &Device, bob: &UserId, token: &str) -> Result<PushReply> {
    register_with(phone, bob, token, false).await
}

/// [`register`], asking to be notified whenever the device is offline (`always`).
async fn register_with(
    phone: &Device,
    bob: &UserId,
    token: &str,
    always: bool,
) -> Result<PushReply> {
    let body = PushRequest::Register {
        token: token.into(),
        always,
    }
    .to_json();
    let kind = MessageKind::Custom(PUSH_KIND.into());
    phone
        .submit(
            iim_client::new_client_id(),
            kind.clone(),
            std::slice::from_ref(bob),
            &body,
        )
        .await?;
    loop {
        let update = within("the push plugin's answer", phone.next())
            .await?
            .context("the device ended")??;
        if let Update::Message { seq, message } = update {
            phone.ack(seq);
            if message.kind == kind {
                return Ok(PushReply::from_json(&message.body)?);
            }
        }
    }
}

/// The id of the message an FCM push is about (`message.data.iim_id`).
fn pushed_id(push: &iim_e2e::gateway::Received) -> Result<u64> {
    let json = push.json()?;
    json["message"]["data"]["iim_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("no iim_id in {json}"))
}

/// The next chat message `device` is handed, acknowledged.
async fn next_chat(device: &Device) -> Result<String> {
    loop {
        if let Update::Message { seq, message } = within("a message", device.next())
            .await?
            .context("the device ended")??
        {
            device.ack(seq);
            if message.kind == MessageKind::Chat {
                return Ok(String::from_utf8(message.body)?);
            }
        }
    }
}

struct Users {
    bob: UserId,
    laptop: Device,
}

/// Registers alice and bob, bob's phone for push (then closes it: bob is offline), and opens
/// alice's sending laptop.
async fn offline_bob(host: &HostProcess) -> Result<Users> {
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let phone = host.device(&bob, "phone", SessionMode::Receive).await?;
    let reply = register(&phone, &bob, TOKEN).await?;
    ensure!(
        reply
            == PushReply::Registered {
                device: "phone".into()
            },
        "{reply:?}"
    );
    phone.close().await;
    let laptop = host.device(&alice, "laptop", SessionMode::SendOnly).await?;
    Ok(Users { bob, laptop })
}

/// The host's dead letters, once `n` of them are waiting notices.
async fn dead_letters(host: &HostProcess, n: usize) -> Result<String> {
    within("dead letters", async {
        loop {
            let letters = host.admin("dead-letters").await?;
            if letters.matches("\twaiting ").count() >= n {
                return anyhow::Ok(letters);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_is_notified_once_without_the_text_and_a_burst_is_one_push() -> Result {
    let gateway = Gateway::start(false).await?;
    let host = host(&gateway, "fcm", "collapse_secs = 3", None)?;
    let Users { bob, laptop, .. } = offline_bob(&host).await?;

    // A burst: the first message, and four more within the collapse window (the window is
    // counted in the messages' own times, so however late the plugin handles them).
    let first = laptop.send_text(&bob, "the secret plans").await?;
    for n in 0..4 {
        laptop.send_text(&bob, &format!("more {n}")).await?;
    }
    let received = gateway.wait_for(1, PUSHED).await?;
    let push = &received[0];
    ensure!(push.method == "POST" && push.path == "/v1/projects/test/messages:send");
    ensure!(push.header("content-type") == Some("application/json"));
    let json = push.json()?;
    let message = &json["message"];
    ensure!(message["token"] == TOKEN, "{json}");
    ensure!(message["notification"]["title"] == "alice", "{json}");
    ensure!(pushed_id(push)? == first.id.0, "{json}");
    ensure!(
        !String::from_utf8_lossy(&push.body).contains("secret"),
        "the message's text went to the gateway: {json}"
    );

    // After the window, the next message is pushed, counting the four held back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    laptop.send_text(&bob, "after the window").await?;
    let received = gateway.wait_for(2, PUSHED).await?;
    ensure!(
        received.len() == 2,
        "{} pushes for the burst",
        received.len()
    );
    let json = received[1].json()?;
    ensure!(
        json["message"]["notification"]["body"] == "5 new messages",
        "{json}"
    );

    // Everything is still in bob's inbox for when the phone comes back.
    let phone = host.device(&bob, "phone", SessionMode::Receive).await?;
    ensure!(next_chat(&phone).await? == "the secret plans");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_device_is_not_notified() -> Result {
    let gateway = Gateway::start(false).await?;
    let host = host(&gateway, "fcm", "collapse_secs = 0", None)?;
    let Users { bob, laptop, .. } = offline_bob(&host).await?;
    let phone = host.device(&bob, "phone", SessionMode::Receive).await?;
    laptop.send_text(&bob, "while online").await?;
    ensure!(next_chat(&phone).await? == "while online");
    phone.close().await;
    let offline = laptop.send_text(&bob, "while offline").await?;
    let received = gateway.wait_for(1, PUSHED).await?;
    // The push that came is the offline message's: none came for the first.
    ensure!(received.len() == 1, "{} pushes", received.len());
    ensure!(pushed_id(&received[0])? == offline.id.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_laptop_online_only_the_device_that_asked_is_notified() -> Result {
    let gateway = Gateway::start(false).await?;
    let host = host(&gateway, "fcm", "collapse_secs = 0", None)?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    // Registered in the plugin's order of devices: the phone first, then the tablet.
    let phone = host.device(&bob, "phone", SessionMode::Receive).await?;
    register(&phone, &bob, TOKEN).await?;
    phone.close().await;
    let tablet = host.device(&bob, "tablet", SessionMode::Receive).await?;
    let tablet_token = "fcm-token-for-bobs-tablet-0123456789";
    let reply = register_with(&tablet, &bob, tablet_token, true).await?;
    ensure!(matches!(reply, PushReply::Registered { .. }), "{reply:?}");
    tablet.close().await;

    let laptop = host.device(&bob, "laptop", SessionMode::Receive).await?;
    let sender = host.device(&alice, "laptop", SessionMode::SendOnly).await?;
    let sent = sender.send_text(&bob, "bob's laptop is on").await?;
    ensure!(next_chat(&laptop).await? == "bob's laptop is on");
    // The tablet's push is made after the phone was passed over: one push in all.
    let received = gateway.wait_for(1, PUSHED).await?;
    ensure!(received.len() == 1, "{} pushes", received.len());
    ensure!(received[0].json()?["message"]["token"] == tablet_token);
    ensure!(pushed_id(&received[0])? == sent.id.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_may_not_call_a_host_its_configuration_does_not_allow() -> Result {
    let gateway = Gateway::start(false).await?;
    // Allowed: another port of the same address; the gateway's own is not.
    let host = host(&gateway, "fcm", "", Some("https://127.0.0.1:9"))?;
    let Users { bob, laptop, .. } = offline_bob(&host).await?;
    laptop.send_text(&bob, "hello").await?;
    // The notice fails for good, and the operator sees why.
    let letters = dead_letters(&host, 1).await?;
    ensure!(
        letters.contains("push") && letters.contains("denied"),
        "{letters}"
    );
    ensure!(
        host.log().contains("outbound HTTP refused"),
        "the host's log does not say it refused"
    );
    ensure!(gateway.received().is_empty(), "the gateway was reached");
    // Chat is untouched.
    let phone = host.device(&bob, "phone", SessionMode::Receive).await?;
    ensure!(next_chat(&phone).await? == "hello");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_is_down_costs_a_dead_letter_and_nothing_else() -> Result {
    let mut gateway = Gateway::start(false).await?;
    let host = host(&gateway, "fcm", "collapse_secs = 0", None)?;
    let Users { bob, laptop, .. } = offline_bob(&host).await?;

    gateway.stop();
    laptop.send_text(&bob, "while the gateway is down").await?;
    let letters = dead_letters(&host, 1).await?;
    ensure!(letters.contains("the gateway was not reached"), "{letters}");

    // A gateway that answers 503 is tried again (retries = 1), on each of the host's attempts;
    // then the notice is set aside too.
    gateway.restart().await?;
    gateway.answer(503);
    laptop.send_text(&bob, "while the gateway fails").await?;
    let letters = dead_letters(&host, 2).await?;
    ensure!(letters.contains("503"), "{letters}");
    let tried = gateway.received().len();
    ensure!(tried >= 2, "the failing gateway was asked {tried} times");

    // Back: the next message is pushed.
    gateway.answer(200);
    let back = laptop.send_text(&bob, "the gateway is back").await?;
    let received = gateway.wait_for(tried + 1, PUSHED).await?;
    ensure!(pushed_id(&received[tried])? == back.id.0);

    // And every message waits for bob, in order.
    let phone = host.device(&bob, "phone", SessionMode::Receive).await?;
    for text in [
        "while the gateway is down",
        "while the gateway fails",
        "the gateway is back",
    ] {
        ensure!(next_chat(&phone).await? == text);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_pushes_go_over_http2_to_the_device_token_s_path() -> Result {
    let gateway = Gateway::start(true).await?;
    let host = host(&gateway, "apns", "apns_topic = \"com.example.iim\"", None)?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let phone = host.device(&bob, "phone", SessionMode::Receive).await?;
    let token = "0a".repeat(32);
    let reply = register(&phone, &bob, &token).await?;
    ensure!(matches!(reply, PushReply::Registered { .. }), "{reply:?}");
    // A token of the wrong shape is refused, and the one before is kept.
    let refused = register(&phone, &bob, "not-hex").await?;
    ensure!(matches!(refused, PushReply::Refused { .. }), "{refused:?}");
    phone.close().await;
    let laptop = host.device(&alice, "laptop", SessionMode::SendOnly).await?;
    laptop.send_text(&bob, "hi").await?;
    let received = gateway.wait_for(1, PUSHED).await?;
    let push = &received[0];
    ensure!(push.version == "HTTP/2.0", "{}", push.version);
    ensure!(push.path == format!("/3/device/{token}"), "{}", push.path);
    ensure!(push.header("apns-topic") == Some("com.example.iim"));
    ensure!(push.header("apns-push-type") == Some("alert"));
    ensure!(push.json()?["aps"]["alert"]["title"] == "alice");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_send_the_host_s_waiting_notice() -> Result {
    let gateway = Gateway::start(false).await?;
    let host = host(&gateway, "fcm", "", None)?;
    let mallory = host.register("mallory").await?;
    let bob = host.register("bob").await?;
    let conn = host.connect().await?;
    within(
        "login",
        conn.login(
            &mallory,
            PASSWORD,
            &DeviceId::new("d")?,
            SessionMode::SendOnly,
        ),
    )
    .await??;
    let notice = iim_client::proto::body::Waiting {
        id: 1,
        kind: "chat".into(),
        from: "mallory".into(),
        from_device: "d".into(),
        to: vec!["bob".into()],
        sent_at: 0,
        online: Vec::new(),
    };
    let kind = MessageKind::Custom(iim_client::proto::body::WAITING_KIND.into());
    let refused = conn
        .submit(1, kind, std::slice::from_ref(&bob), &notice.to_json())
        .await;
    ensure!(
        iim_e2e::code_of(refused)? == iim_client::proto::ErrorCode::INVALID_ARGUMENT,
        "a client's waiting notice was not refused"
    );
    ensure!(gateway.received().is_empty());
    Ok(())
}

/// `iim ARGS` against `host` with profile `profile`, run off the async threads.
async fn iim(
    host: &HostProcess,
    profile: &std::path::Path,
    args: &[&str],
) -> Result<std::process::Output> {
    let mut command = tokio::process::Command::from(host.iim(profile)?);
    command.args(args).env("IIM_PASSWORD", PASSWORD);
    Ok(within("iim", command.output()).await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iim_push_register_registers_the_device_and_says_why_a_token_is_refused() -> Result {
    let gateway = Gateway::start(false).await?;
    let host = host(&gateway, "fcm", "", None)?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let profiles = tempfile::tempdir()?;
    let profile = profiles.path().join("bob");
    let login = iim(&host, &profile, &["login", "bob", "--device", "phone"]).await?;
    ensure!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );

    let refused = iim(&host, &profile, &["push", "register", "short"]).await?;
    ensure!(
        !refused.status.success(),
        "a token of the wrong shape was taken"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        stderr.contains("refused: an FCM registration token"),
        "{stderr}"
    );

    let registered = iim(&host, &profile, &["push", "register", TOKEN]).await?;
    let stdout = String::from_utf8_lossy(&registered.stdout);
    ensure!(
        registered.status.success() && stdout.trim() == "registered for push: phone",
        "{stdout}{}",
        String::from_utf8_lossy(&registered.stderr)
    );

    let laptop = host.device(&alice, "laptop", SessionMode::SendOnly).await?;
    let sent = laptop.send_text(&bob, "to the registered phone").await?;
    let received = gateway.wait_for(1, PUSHED).await?;
    ensure!(received[0].json()?["message"]["token"] == TOKEN);
    ensure!(pushed_id(&received[0])? == sent.id.0);

    let unregistered = iim(&host, &profile, &["push", "unregister"]).await?;
    ensure!(
        String::from_utf8_lossy(&unregistered.stdout).trim() == "unregistered from push: phone"
    );
    Ok(())
}
