//! End-to-end: the real `iim-host` binary on 127.0.0.1, driven by the client library.
//!
//! These tests are about the delivery path and count every message a user receives, so their
//! hosts load only the chat plugin; presence and receipts are tested in `plugins.rs`.

use iim_client::proto::{
    DeviceId, ErrorCode, MessageId, MessageKind, RelationKind, ServerFrame, SessionMode, UserId,
};
use iim_client::{Credentials, Device, Update, new_client_id};
use iim_e2e::*;

type Result = anyhow::Result<()>;

#[tokio::test]
async fn users_register_befriend_and_chat_both_ways() -> Result {
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let (b, _) = host.online(&bob, "laptop").await?;

    a.add_relation(RelationKind::Friend, &bob).await?;
    a.add_relation(RelationKind::Colleague, &bob).await?;
    b.add_relation(RelationKind::Friend, &alice).await?;
    assert_eq!(a.relations(RelationKind::Friend).await?, vec![bob.clone()]);
    assert_eq!(
        a.relations(RelationKind::Colleague).await?,
        vec![bob.clone()]
    );
    a.remove_relation(RelationKind::Colleague, &bob).await?;
    assert!(a.relations(RelationKind::Colleague).await?.is_empty());
    assert_eq!(
        code_of(
            a.add_relation(RelationKind::Friend, &UserId::new("nobody")?)
                .await
        )?,
        ErrorCode::UNKNOWN_USER
    );
    assert_eq!(
        code_of(a.add_relation(RelationKind::Friend, &alice).await)?,
        ErrorCode::INVALID_ARGUMENT
    );

    let sent = a.send_text(&bob, "hi bob").await?;
    let got = next_message(&b).await?;
    assert_eq!(
        (got.id, got.from.clone(), text(&got)),
        (sent.id, alice.clone(), "hi bob".into())
    );
    assert_eq!(got.to, vec![bob.clone()]);
    assert_eq!(got.kind, MessageKind::Chat);
    assert_eq!(got.sent_at, sent.sent_at);
    assert_eq!(got.from_device, DeviceId::new("phone")?);

    let reply = b.send_text(&alice, "hi alice").await?;
    let got = next_message(&a).await?;
    assert_eq!(
        (got.id, got.from.clone(), text(&got)),
        (reply.id, bob, "hi alice".into())
    );
    assert!(reply.id > sent.id, "ids grow");
    Ok(())
}

#[tokio::test]
async fn offline_messages_arrive_at_login_in_order_before_new_ones() -> Result {
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let mut sent = Vec::new();
    for i in 0..30 {
        sent.push(a.send_text(&bob, &format!("offline {i}")).await?.id);
    }

    // Bob logs in while Alice keeps sending: the backlog must come whole, in order, before
    // anything sent after the login started.
    let b = host.connect().await?;
    let laptop = DeviceId::new("laptop")?;
    let login = b.login(&bob, PASSWORD, &laptop, SessionMode::Receive);
    let sender = async {
        let mut ids = Vec::new();
        for i in 0..10 {
            ids.push(a.send_text(&bob, &format!("new {i}")).await?.id);
        }
        anyhow::Ok(ids)
    };
    let (login, new_ids) = tokio::join!(login, sender);
    login?;
    let new_ids = new_ids?;

    let mut received = Vec::new();
    let mut synced_at = None;
    while received.len() < sent.len() + new_ids.len() || synced_at.is_none() {
        match next_event(&b).await? {
            iim_client::Event::Message { seq, message } => {
                b.ack(seq).await?;
                received.push(message);
            }
            iim_client::Event::Synced { count } => {
                assert!(synced_at.is_none(), "one Synced");
                assert_eq!(count as usize, received.len());
                synced_at = Some(received.len());
            }
            other @ iim_client::Event::Backlog { .. } => anyhow::bail!("unexpected {other:?}"),
        }
    }
    let synced_at = synced_at.ok_or_else(|| anyhow::anyhow!("no Synced"))?;
    assert!(
        synced_at >= sent.len(),
        "the whole offline backlog comes before Synced"
    );
    let ids: Vec<_> = received.iter().map(|m| m.id).collect();
    let expected: Vec<_> = sent.iter().chain(&new_ids).copied().collect();
    assert_eq!(
        ids, expected,
        "every message once, in the order it was sent"
    );
    assert_eq!(text(&received[0]), "offline 0");
    Ok(())
}

/// The next `n` events, which must all be messages; returns their (position, id).
async fn messages(
    conn: &iim_client::Connection,
    n: usize,
) -> anyhow::Result<Vec<(u64, MessageId)>> {
    let mut got = Vec::new();
    while got.len() < n {
        match next_event(conn).await? {
            iim_client::Event::Message { seq, message } => got.push((seq, message.id)),
            other => anyhow::bail!("expected a message, got {other:?}"),
        }
    }
    Ok(got)
}

/// Fails if an event arrives within a moment.
async fn nothing_more(conn: &iim_client::Connection) -> Result {
    match tokio::time::timeout(std::time::Duration::from_millis(300), conn.next_event()).await {
        Err(_) => Ok(()),
        Ok(event) => anyhow::bail!("unexpected {event:?}"),
    }
}

#[tokio::test]
async fn a_paged_device_gets_a_summary_then_its_backlog_in_the_pages_it_asks_for() -> Result {
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let mut sent = Vec::new();
    let mut bytes = 0;
    for i in 0..25 {
        let text = format!("offline {i}");
        bytes += text.len() as u64;
        sent.push(a.send_text(&bob, &text).await?.id);
    }
    let phone = DeviceId::new("phone")?;
    let paged = |conn: iim_client::Connection| {
        let (bob, phone) = (bob.clone(), phone.clone());
        async move {
            within(
                "login",
                conn.login(&bob, PASSWORD, &phone, SessionMode::Paged),
            )
            .await??;
            anyhow::Ok(conn)
        }
    };

    // The summary first, and nothing before it is asked for.
    let b = paged(host.connect().await?).await?;
    match next_event(&b).await? {
        iim_client::Event::Backlog {
            count,
            bytes: b_bytes,
            ids,
        } => {
            assert_eq!((count, b_bytes), (25, bytes));
            assert_eq!(ids, sent);
        }
        other => anyhow::bail!("expected the summary, got {other:?}"),
    }
    nothing_more(&b).await?;
    assert_eq!(
        code_of(b.fetch(0).await)?,
        ErrorCode::INVALID_ARGUMENT,
        "an empty page"
    );
    let page = within("fetch", b.fetch(10)).await??;
    assert_eq!((page.count, page.remaining), (10, 15));
    let first = messages(&b, 10).await?;
    nothing_more(&b).await?;
    // Only the first five are acknowledged before the connection goes.
    b.ack(first[4].0).await?;
    b.close().await;

    // The next session resumes from the cursor.
    let b = paged(host.connect().await?).await?;
    match next_event(&b).await? {
        iim_client::Event::Backlog { count, ids, .. } => {
            assert_eq!(count, 20);
            assert_eq!(ids, sent[5..]);
        }
        other => anyhow::bail!("expected the summary, got {other:?}"),
    }
    // A message sent now is new: it comes after the backlog's end.
    let live = a.send_text(&bob, "live").await?.id;
    let mut got = Vec::new();
    for (want_count, want_remaining) in [(8, 12), (8, 4), (4, 0)] {
        let page = within("fetch", b.fetch(8)).await??;
        assert_eq!((page.count, page.remaining), (want_count, want_remaining));
        let page_messages = messages(&b, want_count as usize).await?;
        if let Some((seq, _)) = page_messages.last() {
            b.ack(*seq).await?;
        }
        got.extend(page_messages.into_iter().map(|(_, id)| id));
    }
    assert_eq!(got, sent[5..]);
    assert_eq!(
        next_event(&b).await?,
        iim_client::Event::Synced { count: 20 }
    );
    assert_eq!(next_message(&b).await?.id, live, "then what is new");
    assert_eq!(
        code_of(b.fetch(8).await)?,
        ErrorCode::INVALID_ARGUMENT,
        "nothing left to fetch"
    );

    // A receive session has its backlog pushed; fetching there is refused.
    assert_eq!(code_of(a.fetch(8).await)?, ErrorCode::INVALID_ARGUMENT);

    // Everything so far was acknowledged by Bob's only device, so it has left the inbox. What
    // the phone has not acknowledged waits, and a new device gets that: here through a Device.
    b.close().await;
    let mut later = Vec::new();
    for i in 0..3 {
        later.push(a.send_text(&bob, &format!("later {i}")).await?.id);
    }
    let tablet = host.device(&bob, "tablet", SessionMode::Paged).await?;
    let Update::Backlog { count: 3, ids, .. } = next_update(&tablet).await? else {
        anyhow::bail!("expected a summary of 3");
    };
    assert_eq!(ids, later);
    let page = within("fetch", tablet.fetch(100)).await??;
    assert_eq!((page.count, page.remaining), (3, 0));
    let mut ids = Vec::new();
    while ids.len() < 3 {
        let Update::Message { seq, message } = next_update(&tablet).await? else {
            anyhow::bail!("expected a message");
        };
        tablet.ack(seq);
        ids.push(message.id);
    }
    assert_eq!(ids, later);
    assert!(matches!(
        next_update(&tablet).await?,
        Update::Synced { count: 3 }
    ));
    Ok(())
}

#[tokio::test]
async fn messages_not_received_in_their_time_leave_the_inbox_and_their_sender_is_told() -> Result {
    // Messages live 1 s unless their sender says otherwise.
    let host = HostProcess::start_chat_only_with_config("[limits]\nmessage_ttl_secs = 1\n")?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let carol = host.register("carol").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let (b, _) = host.online(&bob, "phone").await?;
    let hour = std::time::Duration::from_secs(3600);
    let second = std::time::Duration::from_secs(1);
    let chat = MessageKind::Chat;

    // Bob is online and acknowledges; Carol is offline.
    let to_both = a
        .submit(
            new_client_id(),
            chat.clone(),
            &[bob.clone(), carol.clone()],
            b"to both",
        )
        .await?;
    let kept = a
        .submit_expiring(
            new_client_id(),
            chat.clone(),
            std::slice::from_ref(&carol),
            b"kept",
            hour,
        )
        .await?;
    let short = a
        .submit_expiring(
            new_client_id(),
            chat.clone(),
            std::slice::from_ref(&carol),
            b"short",
            second,
        )
        .await?;
    assert_eq!(next_message(&b).await?.id, to_both.id);
    assert_eq!(
        code_of(
            a.submit_expiring(
                new_client_id(),
                chat,
                std::slice::from_ref(&bob),
                b"x",
                std::time::Duration::ZERO
            )
            .await
        )?,
        ErrorCode::INVALID_ARGUMENT,
        "no time to live at all"
    );

    // Alice hears of what Carol never got, not of what Bob acknowledged.
    let mut notices = Vec::new();
    for _ in 0..2 {
        let notice = next_message(&a).await?;
        assert_eq!(notice.kind, MessageKind::Receipt);
        assert_eq!(
            (&notice.from, &notice.to[..]),
            (&alice, &[alice.clone().into()][..])
        );
        notices.push(text(&notice));
    }
    notices.sort();
    let mut want = vec![
        format!(
            r#"{{"state":"expired","id":{},"user":"carol"}}"#,
            to_both.id.0
        ),
        format!(
            r#"{{"state":"expired","id":{},"user":"carol"}}"#,
            short.id.0
        ),
    ];
    want.sort();
    assert_eq!(notices, want);
    nothing_more(&a).await?;

    // Carol finds only what has not expired.
    let (_c, backlog) = host.online(&carol, "phone").await?;
    assert_eq!(ids(&backlog), vec![kept.id]);
    Ok(())
}

#[tokio::test]
async fn every_online_device_of_a_user_receives_and_an_offline_one_catches_up() -> Result {
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let (phone, _) = host.online(&bob, "phone").await?;
    let (laptop, _) = host.online(&bob, "laptop").await?;

    let sent = a.send_text(&bob, "to all of bob").await?;
    assert_eq!(next_message(&phone).await?.id, sent.id);
    // The laptop takes it but does not acknowledge it yet.
    let laptop_seq = match next_event(&laptop).await? {
        iim_client::Event::Message { seq, message } => {
            assert_eq!(message.id, sent.id);
            seq
        }
        other => anyhow::bail!("expected the message, got {other:?}"),
    };

    // A third device that was never online gets what is in the inbox when it first logs in:
    // the message is there while a device of Bob's has not acknowledged it.
    let (tablet, backlog) = host.online(&bob, "tablet").await?;
    assert_eq!(ids(&backlog), vec![sent.id]);

    // Once every device has acknowledged it, it leaves the inbox: a new device does not get it.
    laptop.ack(laptop_seq).await?;
    // The host handles a connection's frames in order: once a later request is answered, the
    // ack before it has been handled.
    laptop.relations(RelationKind::Friend).await?;
    let (_, backlog) = host.online(&bob, "watch").await?;
    assert!(backlog.is_empty(), "pruned, yet sent again: {backlog:?}");

    // An acknowledged message is not delivered again to the same device.
    laptop.close().await;
    let second = a.send_text(&bob, "second").await?;
    assert_eq!(next_message(&phone).await?.id, second.id);
    assert_eq!(next_message(&tablet).await?.id, second.id);
    let (_, backlog) = host.online(&bob, "laptop").await?;
    assert_eq!(ids(&backlog), vec![second.id]);
    Ok(())
}

#[tokio::test]
async fn unacknowledged_deliveries_come_again_at_the_next_login() -> Result {
    let TwoUsers {
        host,
        alice: _,
        bob,
        a,
        b,
    } = TwoUsers::start().await?;
    let first = a.send_text(&bob, "one").await?;
    let second = a.send_text(&bob, "two").await?;
    // Take both, acknowledge only the first.
    for expected in [first.id, second.id] {
        match next_event(&b).await? {
            iim_client::Event::Message { seq, message } => {
                assert_eq!(message.id, expected);
                if expected == first.id {
                    b.ack(seq).await?;
                }
            }
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    // The host handles a connection's frames in order: once a later request is answered,
    // the ack before it has been handled.
    b.relations(RelationKind::Friend).await?;
    b.close().await;
    let (_, backlog) = host.online(&bob, "phone").await?;
    assert_eq!(ids(&backlog), vec![second.id]);
    Ok(())
}

#[tokio::test]
async fn a_resubmission_with_the_same_client_id_is_accepted_once() -> Result {
    let TwoUsers {
        host: _host,
        alice: _,
        bob,
        a,
        b,
    } = TwoUsers::start().await?;
    let to = [bob.clone()];
    let first = a.submit(42, MessageKind::Chat, &to, b"once").await?;
    let again = a.submit(42, MessageKind::Chat, &to, b"once").await?;
    assert_eq!((first.id, first.sent_at), (again.id, again.sent_at));
    let marker = a.send_text(&bob, "marker").await?;
    assert_eq!(next_message(&b).await?.id, first.id);
    assert_eq!(
        next_message(&b).await?.id,
        marker.id,
        "the duplicate was not delivered"
    );
    Ok(())
}

#[tokio::test]
async fn wrong_passwords_and_unknown_users_are_refused() -> Result {
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let conn = host.connect().await?;
    let device = DeviceId::new("phone")?;
    let refused = conn
        .login(&alice, "wrong password", &device, SessionMode::Receive)
        .await;
    assert_eq!(code_of(refused)?, ErrorCode::AUTH_FAILED);
    let ghost = UserId::new("ghost")?;
    let refused = conn
        .login(&ghost, PASSWORD, &device, SessionMode::Receive)
        .await;
    assert_eq!(code_of(refused)?, ErrorCode::AUTH_FAILED);
    // Nothing but login works before it.
    assert_eq!(
        code_of(conn.send_text(&alice, "x").await)?,
        ErrorCode::NOT_AUTHENTICATED
    );
    assert_eq!(
        code_of(conn.relations(RelationKind::Friend).await)?,
        ErrorCode::NOT_AUTHENTICATED
    );
    // Registering a taken name, or with a short password, is refused.
    assert_eq!(
        code_of(conn.register(&alice, PASSWORD).await)?,
        ErrorCode::USER_EXISTS
    );
    let carol = UserId::new("carol")?;
    assert_eq!(
        code_of(conn.register(&carol, "short").await)?,
        ErrorCode::INVALID_ARGUMENT
    );
    // The same connection still logs in with the right password.
    conn.login(&alice, PASSWORD, &device, SessionMode::Receive)
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_token_cannot_act_as_another_user_or_device() -> Result {
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let phone = DeviceId::new("phone")?;
    let conn = host.connect().await?;
    let token = conn
        .login(&alice, PASSWORD, &phone, SessionMode::SendOnly)
        .await?;
    conn.close().await;

    let conn = host.connect().await?;
    let as_bob = conn
        .authenticate(&bob, &phone, &token, SessionMode::Receive)
        .await;
    assert_eq!(code_of(as_bob)?, ErrorCode::AUTH_FAILED);
    let other_device = conn
        .authenticate(
            &alice,
            &DeviceId::new("laptop")?,
            &token,
            SessionMode::Receive,
        )
        .await;
    assert_eq!(code_of(other_device)?, ErrorCode::AUTH_FAILED);
    let forged = conn
        .authenticate(&alice, &phone, &"0".repeat(64), SessionMode::Receive)
        .await;
    assert_eq!(code_of(forged)?, ErrorCode::AUTH_FAILED);

    // With the right token the session is Alice's, and what it sends is from Alice.
    conn.authenticate(&alice, &phone, &token, SessionMode::SendOnly)
        .await?;
    let (b, _) = host.online(&bob, "phone").await?;
    conn.send_text(&bob, "who am i").await?;
    assert_eq!(next_message(&b).await?.from, alice);

    // After logout the token is dead.
    conn.logout().await?;
    let conn = host.connect().await?;
    let revoked = conn
        .authenticate(&alice, &phone, &token, SessionMode::SendOnly)
        .await;
    assert_eq!(code_of(revoked)?, ErrorCode::AUTH_FAILED);
    Ok(())
}

#[tokio::test]
async fn bad_submissions_get_clear_errors() -> Result {
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let big = vec![b'x'; a.max_body() as usize + 1];
    assert_eq!(
        code_of(
            a.submit(1, MessageKind::Chat, std::slice::from_ref(&bob), &big)
                .await
        )?,
        ErrorCode::BODY_TOO_LARGE
    );
    assert_eq!(
        code_of(a.send_text(&UserId::new("nobody")?, "x").await)?,
        ErrorCode::UNKNOWN_USER
    );
    assert_eq!(
        code_of(a.submit::<UserId>(2, MessageKind::Chat, &[], b"x").await)?,
        ErrorCode::INVALID_ARGUMENT
    );
    // A chat message is text; a custom kind may carry any bytes.
    let not_text = a
        .submit(
            5,
            MessageKind::Chat,
            std::slice::from_ref(&bob),
            &[0xff, 0xfe],
        )
        .await;
    assert!(
        matches!(&not_text, Err(iim_client::ClientError::Refused { code, message })
            if *code == ErrorCode::INVALID_ARGUMENT && message.contains("UTF-8")),
        "{not_text:?}"
    );
    assert_eq!(
        code_of(
            a.submit(
                3,
                MessageKind::Custom("poll".into()),
                std::slice::from_ref(&bob),
                b"x"
            )
            .await
        )?,
        ErrorCode::UNSUPPORTED_KIND
    );
    // The largest body accepted is delivered whole.
    let (b, _) = host.online(&bob, "phone").await?;
    let max = vec![b'y'; a.max_body() as usize];
    a.submit(4, MessageKind::Chat, std::slice::from_ref(&bob), &max)
        .await?;
    assert_eq!(next_message(&b).await?.body, max);
    Ok(())
}

/// Two users chatting, used to check that bad input elsewhere does not disturb anyone.
async fn chat_still_works(
    host: &HostProcess,
    a: &iim_client::Connection,
    b: &iim_client::Connection,
    bob: &UserId,
) -> Result {
    let sent = a.send_text(bob, "still here").await?;
    assert_eq!(next_message(b).await?.id, sent.id);
    assert!(
        host.connect().await.is_ok(),
        "the host accepts new connections"
    );
    Ok(())
}

#[tokio::test]
async fn an_oversized_frame_is_refused_and_the_host_keeps_serving() -> Result {
    let TwoUsers {
        mut host,
        alice: _,
        bob,
        a,
        b,
    } = TwoUsers::start().await?;

    let mut raw = RawConnection::hello(&host, 1).await?;
    // Announce 100 MiB and start sending it.
    raw.send.write_all(&(100u32 << 20).to_be_bytes()).await?;
    raw.send.write_all(&[0u8; 4096]).await?;
    assert_eq!(raw.closing_code().await?, ErrorCode::FRAME_TOO_LARGE);
    chat_still_works(&host, &a, &b, &bob).await?;
    assert!(host.is_running());

    // A client-side guard: the library refuses to encode what the host would refuse.
    let huge = vec![0u8; iim_client::proto::DEFAULT_MAX_FRAME as usize * 2];
    let err = a
        .submit(9, MessageKind::Chat, std::slice::from_ref(&bob), &huge)
        .await;
    assert!(
        matches!(err, Err(iim_client::ClientError::TooLarge(_))),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_stream_finished_in_the_middle_of_a_frame_is_malformed_not_a_clean_close() -> Result {
    let TwoUsers {
        host,
        alice: _,
        bob,
        a,
        b,
    } = TwoUsers::start().await?;

    // Hello, then the first 5 bytes of a 12-byte frame, then the end of the stream.
    let mut raw = RawConnection::hello(&host, 1).await?;
    raw.send.write_all(&[0, 0, 0, 12, 0x06]).await?;
    raw.send.finish()?;
    let frames = raw.read_to_end().await?;
    let Some(ServerFrame::Error {
        req: None,
        code,
        message,
    }) = frames.last()
    else {
        panic!("no closing error frame in {frames:?}");
    };
    assert_eq!(*code, ErrorCode::MALFORMED, "{message}");
    assert!(message.contains("middle of a frame"), "{message}");

    // The same stream finished between frames is a clean close: no error frame.
    let mut raw = RawConnection::hello(&host, 1).await?;
    raw.send.finish()?;
    let frames = raw.read_to_end().await?;
    assert!(
        matches!(frames.as_slice(), [ServerFrame::Welcome { .. }]),
        "{frames:?}"
    );
    chat_still_works(&host, &a, &b, &bob).await?;
    Ok(())
}

#[tokio::test]
async fn garbage_bytes_are_refused_and_the_host_keeps_serving() -> Result {
    let TwoUsers {
        mut host,
        alice: _,
        bob,
        a,
        b,
    } = TwoUsers::start().await?;

    // Garbage instead of Hello.
    let mut raw = RawConnection::open(&host).await?;
    raw.send
        .write_all(&[0, 0, 0, 9, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5])
        .await?;
    assert_eq!(raw.closing_code().await?, ErrorCode::MALFORMED);

    // Garbage after a good Hello (arriving in the same read as it).
    let mut raw = RawConnection::hello(&host, 1).await?;
    raw.send.write_all(&[0, 0, 0, 3, 200, 201, 202]).await?;
    assert_eq!(raw.closing_code().await?, ErrorCode::MALFORMED);

    // Random byte strings (fixed seed) on fresh connections.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..20 {
        let mut raw = RawConnection::open(&host).await?;
        let mut bytes = Vec::new();
        for _ in 0..64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            bytes.push(seed as u8);
        }
        raw.send.write_all(&bytes).await?;
        let _ = raw.send.finish();
        // Whatever the bytes, the host answers with an error or closes; it never hangs.
        if let Err(e) = raw.read_to_end().await {
            anyhow::ensure!(
                !e.to_string().contains("timed out"),
                "round {round}: {e} after {bytes:?}"
            );
        }
    }

    // A wrong protocol version gets its own code.
    let mut raw = RawConnection::hello(&host, 99).await?;
    assert_eq!(raw.closing_code().await?, ErrorCode::UNSUPPORTED_VERSION);

    chat_still_works(&host, &a, &b, &bob).await?;
    assert!(host.is_running());
    assert!(!host.log().contains("panicked"), "no panic in the host log");
    Ok(())
}

#[tokio::test]
async fn a_second_receive_session_of_a_device_replaces_the_first() -> Result {
    let host = HostProcess::start_chat_only()?;
    let bob = host.register("bob").await?;
    let (first, _) = host.online(&bob, "phone").await?;
    let (_second, _) = host.online(&bob, "phone").await?;
    match within("replaced", first.next_event()).await? {
        Some(Err(e)) => assert_eq!(e.code(), Some(ErrorCode::SESSION_REPLACED)),
        other => anyhow::bail!("expected the first session to be replaced, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_closed_right_after_submitting_reports_what_the_host_accepted() -> Result {
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let laptop = host.device(&alice, "laptop", SessionMode::SendOnly).await?;
    let submissions: Vec<_> = (0..20)
        .map(|i| laptop.send_text(&bob, &format!("last words {i}")))
        .collect();
    within("close", laptop.close()).await?;
    let mut ids = Vec::new();
    for submission in submissions {
        ids.push(within("answer", submission).await??.id);
    }
    let (_b, backlog) = host.online(&bob, "phone").await?;
    assert_eq!(iim_e2e::ids(&backlog), ids, "each accepted once, none lost");
    Ok(())
}

/// The next update of `device` that is not about the connection coming and going.
async fn next_update(device: &Device) -> anyhow::Result<Update> {
    loop {
        match within("next update", device.next()).await? {
            Some(Ok(Update::Disconnected { .. } | Update::Reconnected)) => {}
            Some(update) => return Ok(update?),
            None => anyhow::bail!("the device ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_comes_back_after_a_restart_and_ends_when_another_session_takes_over() -> Result {
    let mut host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let mut config = host.client_config()?;
    config.reconnect_first = std::time::Duration::from_millis(100);
    let phone_id = DeviceId::new("phone")?;
    let phone = within(
        "open",
        Device::open(
            &config,
            &bob,
            &phone_id,
            Credentials::Password(PASSWORD.into()),
            SessionMode::Receive,
        ),
    )
    .await??;
    assert!(matches!(
        next_update(&phone).await?,
        Update::Synced { count: 0 }
    ));
    let (a, _) = host.online(&alice, "phone").await?;
    a.send_text(&bob, "before").await?;
    let Update::Message { seq, message } = next_update(&phone).await? else {
        anyhow::bail!("expected a message");
    };
    assert_eq!(text(&message), "before");
    phone.ack(seq);
    // The host reads a connection's frames in order: once it has answered a submission made
    // after the acknowledgement, it has the acknowledgement too (else the stop below could
    // come first, and the message would rightly come again).
    within(
        "a submission after the ack",
        phone.send_text(&alice, "got it"),
    )
    .await??;

    // The host stops, saying so, and comes back: the device follows by itself.
    host.terminate()?;
    match within("disconnected", phone.next()).await? {
        Some(Ok(Update::Disconnected { reason, .. })) => {
            assert_eq!(reason.code(), Some(ErrorCode::SHUTTING_DOWN), "{reason}");
        }
        other => anyhow::bail!("expected Disconnected, got {other:?}"),
    }
    host.wait().await?;
    tokio::task::block_in_place(|| host.restart())?;
    assert!(
        matches!(next_update(&phone).await?, Update::Synced { count: 0 }),
        "what was acknowledged before the stop is not delivered again"
    );
    let (a, _) = host.online(&alice, "phone").await?;
    a.send_text(&bob, "after").await?;
    // A submission from the device itself, across the same connection.
    within("own submission", phone.send_text(&alice, "hello from bob")).await??;
    let Update::Message { message, .. } = next_update(&phone).await? else {
        anyhow::bail!("expected a message");
    };
    assert_eq!(text(&message), "after");

    // Another session of the device, opened with its token, takes over: the first one ends
    // for good, and what it is asked to send fails at once.
    let _tablet = Device::open(
        &config,
        &bob,
        &phone_id,
        Credentials::Token(phone.token().into()),
        SessionMode::Receive,
    )
    .await?;
    match within("replaced", phone.next()).await? {
        Some(Err(e)) => assert_eq!(e.code(), Some(ErrorCode::SESSION_REPLACED), "{e}"),
        other => anyhow::bail!("expected the device to end, got {other:?}"),
    }
    assert!(within("end", phone.next()).await?.is_none());
    assert!(
        within("refused", phone.send_text(&alice, "late"))
            .await?
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn accepted_messages_and_accounts_survive_kill_9() -> Result {
    let mut host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(a.send_text(&bob, &format!("m{i}")).await?.id);
    }
    let cert_before = std::fs::read(&host.cert)?;
    host.restart()?; // SIGKILL, then start on the same data directory
    assert_eq!(
        std::fs::read(&host.cert)?,
        cert_before,
        "the generated certificate is kept"
    );
    let (_, backlog) = host.online(&bob, "phone").await?;
    assert_eq!(ids(&backlog), sent);
    // Ids keep growing after the restart.
    let (a, _) = host.online(&alice, "phone").await?;
    let next = a.send_text(&bob, "after").await?;
    assert!(next.id > *sent.last().expect("sent some"));
    Ok(())
}

#[tokio::test]
async fn sigterm_ends_sessions_with_a_reason_and_stops_cleanly() -> Result {
    let mut host = HostProcess::start_chat_only()?;
    let bob = host.register("bob").await?;
    let (b, _) = host.online(&bob, "phone").await?;
    host.terminate()?;
    match within("shutdown notice", b.next_event()).await? {
        Some(Err(e)) => assert_eq!(e.code(), Some(ErrorCode::SHUTTING_DOWN)),
        other => anyhow::bail!("expected a shutdown notice, got {other:?}"),
    }
    let status = within("host exit", host.wait()).await??;
    assert!(status.success(), "exit status {status}");
    assert!(host.log().contains("stopped"));
    Ok(())
}

#[tokio::test]
async fn submissions_over_the_rate_wait_their_turn_and_none_is_refused() -> Result {
    // 40 at once, then 400 a second.
    let host = HostProcess::start_chat_only_with_config(
        "[limits]\nsubmit_rate = 400\nsubmit_burst = 40\n",
    )?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (b, _) = host.online(&bob, "phone").await?;
    let a = host.device(&alice, "phone", SessionMode::SendOnly).await?;
    // All at once, as a device does with what waited while it was offline.
    let started = std::time::Instant::now();
    let submissions: Vec<_> = (0..300)
        .map(|i| {
            a.submit(
                new_client_id(),
                MessageKind::Chat,
                std::slice::from_ref(&bob),
                format!("{i}").as_bytes(),
            )
        })
        .collect();
    let mut ids = Vec::new();
    for submission in submissions {
        ids.push(within("accepted", submission).await??.id);
    }
    let took = started.elapsed();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "accepted in the order submitted"
    );
    // The rate held: 260 past the burst at 400 a second.
    assert!(
        took >= std::time::Duration::from_millis(600),
        "300 accepted in {took:?}: the rate was not applied"
    );
    for (i, id) in ids.iter().enumerate() {
        let message = next_message(&b).await?;
        assert_eq!((message.id, text(&message)), (*id, format!("{i}")));
    }
    nothing_more(&b).await?;
    Ok(())
}

#[tokio::test]
async fn password_guessing_on_one_connection_is_rate_limited() -> Result {
    // No refill, so the outcome does not depend on how fast this machine hashes.
    let host =
        HostProcess::start_chat_only_with_config("[limits]\nauth_rate = 0\nauth_burst = 3\n")?;
    let alice = host.register("alice").await?;
    let conn = host.connect().await?;
    let device = DeviceId::new("phone")?;
    let mut codes = Vec::new();
    for i in 0..5 {
        let guess = format!("guess number {i}");
        codes.push(code_of(
            conn.login(&alice, &guess, &device, SessionMode::SendOnly)
                .await,
        )?);
    }
    use ErrorCode as E;
    assert_eq!(
        codes,
        [
            E::AUTH_FAILED,
            E::AUTH_FAILED,
            E::AUTH_FAILED,
            E::RATE_LIMITED,
            E::RATE_LIMITED
        ]
    );
    // Other connections are not affected.
    let other = host.connect().await?;
    other
        .login(&alice, PASSWORD, &device, SessionMode::SendOnly)
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_backlog_beyond_the_window_and_a_flood_beyond_the_queue_arrive_whole_in_order() -> Result
{
    // A tiny window and queue, so that paging the backlog by acks and catching up from the
    // inbox after the live queue overflows are both exercised.
    let host = HostProcess::start_chat_only_with_config(
        "[limits]\nmax_in_flight = 8\nsession_queue = 4\n",
    )?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let mut sent = Vec::new();
    for i in 0..60 {
        sent.push(a.send_text(&bob, &format!("old {i}")).await?.id);
    }
    let b = host.connect().await?;
    let phone = DeviceId::new("phone")?;
    b.login(&bob, PASSWORD, &phone, SessionMode::Receive)
        .await?;
    let flood = async {
        let mut ids = Vec::new();
        for i in 0..60 {
            ids.push(a.send_text(&bob, &format!("new {i}")).await?.id);
        }
        anyhow::Ok(ids)
    };
    let receive = async {
        let mut got = Vec::new();
        let mut synced = None;
        while got.len() < 120 {
            match next_event(&b).await? {
                iim_client::Event::Message { seq, message } => {
                    b.ack(seq).await?;
                    got.push(message.id);
                }
                iim_client::Event::Synced { count } => {
                    anyhow::ensure!(synced.is_none(), "Synced comes once");
                    synced = Some(count);
                }
                other @ iim_client::Event::Backlog { .. } => anyhow::bail!("unexpected {other:?}"),
            }
        }
        anyhow::Ok((got, synced))
    };
    let (flood, received) = tokio::join!(flood, receive);
    sent.extend(flood?);
    let (got, synced) = received?;
    assert_eq!(got, sent, "every message once, in order");
    assert!(synced.is_some_and(|count| count >= 60), "{synced:?}");
    Ok(())
}

#[tokio::test]
async fn a_device_that_never_acknowledges_is_disconnected_and_loses_nothing() -> Result {
    let host = HostProcess::start_chat_only_with_config(
        "[limits]\nmax_in_flight = 4\nretransmit_initial_ms = 200\nretransmit_max_ms = 400\n\
         retransmit_budget = 3\n",
    )?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let (b, _) = host.online(&bob, "phone").await?;
    let mut sent = Vec::new();
    for i in 0..10 {
        sent.push(a.send_text(&bob, &format!("m{i}")).await?.id);
    }
    let mut unacked = 0;
    let closed = loop {
        match within("deliveries, then a close", b.next_event()).await? {
            Some(Ok(iim_client::Event::Message { .. })) => unacked += 1,
            Some(Ok(other)) => anyhow::bail!("unexpected {other:?}"),
            Some(Err(e)) => break e,
            None => anyhow::bail!("closed without a reason"),
        }
    };
    assert_eq!(closed.code(), Some(ErrorCode::TOO_SLOW), "{closed}");
    // Sent three times (200 and 400 ms apart), then given up 400 ms after the third.
    assert!(
        closed.to_string().contains("sent 3 times over 1000 ms"),
        "{closed}"
    );
    // The retransmissions reach the client, which hands each position over once.
    assert_eq!(unacked, 4, "no more than the window is sent ahead of acks");
    let (_, backlog) = host.online(&bob, "phone").await?;
    assert_eq!(ids(&backlog), sent);
    Ok(())
}

#[tokio::test]
async fn logout_ends_the_device_s_delivery_session() -> Result {
    let host = HostProcess::start_chat_only()?;
    let bob = host.register("bob").await?;
    let phone = DeviceId::new("phone")?;
    let listening = host.connect().await?;
    let token = listening
        .login(&bob, PASSWORD, &phone, SessionMode::Receive)
        .await?;
    assert!(matches!(
        next_event(&listening).await?,
        iim_client::Event::Synced { count: 0 }
    ));
    let other = host.connect().await?;
    other
        .authenticate(&bob, &phone, &token, SessionMode::SendOnly)
        .await?;
    other.logout().await?;
    match within("logged out", listening.next_event()).await? {
        Some(Err(e)) => assert_eq!(e.code(), Some(ErrorCode::LOGGED_OUT)),
        other => anyhow::bail!("expected the session to end, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_connection_that_never_authenticates_is_closed() -> Result {
    let host = HostProcess::start_chat_only_with_config("[limits]\nauth_timeout_secs = 1\n")?;
    let mut raw = RawConnection::hello(&host, 1).await?;
    assert_eq!(raw.closing_code().await?, ErrorCode::NOT_AUTHENTICATED);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelining_senders_at_once_are_all_delivered_in_order() -> Result {
    // Eight senders with fifteen submissions in flight each: many flushes at once, and
    // submissions read together sharing one flush.
    const PAIRS: usize = 8;
    const EACH: usize = 60;
    let host = std::sync::Arc::new(HostProcess::start_chat_only()?);
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for i in 0..PAIRS {
        let to = host.register(&format!("r{i}")).await?;
        let from = host.register(&format!("s{i}")).await?;
        receivers.push((host.online(&to, "phone").await?.0, from.clone()));
        senders.push((
            std::sync::Arc::new(host.online(&from, "phone").await?.0),
            to,
        ));
    }
    let mut sending = tokio::task::JoinSet::new();
    for (conn, to) in senders {
        sending.spawn(async move {
            let mut batch = tokio::task::JoinSet::new();
            let mut ids = Vec::new();
            for chunk in 0..EACH / 15 {
                for i in 0..15 {
                    let (conn, to) = (std::sync::Arc::clone(&conn), to.clone());
                    let text = format!("{chunk}.{i}");
                    batch.spawn(async move { conn.send_text(&to, &text).await });
                }
                while let Some(sent) = batch.join_next().await {
                    ids.push(sent??.id);
                }
            }
            ids.sort();
            anyhow::Ok(ids)
        });
    }
    let mut sent = Vec::new();
    while let Some(ids) = within("senders", sending.join_next()).await? {
        sent.push(ids??);
    }
    let total: usize = sent.iter().map(Vec::len).sum();
    assert_eq!(total, PAIRS * EACH);
    for (conn, from) in &receivers {
        let mut got = Vec::new();
        while got.len() < EACH {
            let message = next_message(conn).await?;
            assert_eq!(&message.from, from);
            got.push(message.id);
        }
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in acceptance order");
        assert!(
            sent.contains(&got),
            "exactly the accepted messages of its sender"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_logins_is_answered_or_told_to_wait_and_no_connection_is_dropped() -> Result {
    // One hashing thread and two places in its queue: a burst of 32 logins sent together
    // overflows it at once, however fast this machine hashes.
    const BURST: usize = 32;
    let host =
        HostProcess::start_chat_only_with_config("[limits]\nmax_hashing = 1\nhashing_queue = 2\n")?;
    let alice = host.register("alice").await?;
    let mut conns = Vec::new();
    for _ in 0..BURST {
        conns.push(std::sync::Arc::new(host.connect().await?));
    }
    let mut burst = tokio::task::JoinSet::new();
    for (i, conn) in conns.iter().enumerate() {
        let (conn, alice) = (std::sync::Arc::clone(conn), alice.clone());
        burst.spawn(async move {
            let device = DeviceId::new(format!("d{i}"))?;
            let answer = conn
                .login(&alice, PASSWORD, &device, SessionMode::SendOnly)
                .await;
            anyhow::Ok((i, answer))
        });
    }
    let (mut logged_in, mut refused) = (Vec::new(), Vec::new());
    while let Some(done) = within("the burst's answers", burst.join_next()).await? {
        match done?? {
            (i, Ok(_)) => logged_in.push(i),
            (i, Err(iim_client::ClientError::Refused { code, message }))
                if code == ErrorCode::RATE_LIMITED =>
            {
                assert!(
                    message.starts_with("the host is busy checking passwords; try again in "),
                    "{message}"
                );
                refused.push(i);
            }
            (i, Err(e)) => anyhow::bail!("login {i} failed otherwise: {e}"),
        }
    }
    assert!(!logged_in.is_empty(), "the hashing thread checked some");
    assert!(!refused.is_empty(), "the queue overflowed");
    // Every connection is still open: the logged-in ones serve requests, and the refused ones
    // log in now that the queue is empty (one at a time, so it stays so).
    for &i in &logged_in {
        conns[i].relations(RelationKind::Friend).await?;
    }
    for &i in &refused {
        let device = DeviceId::new(format!("d{i}"))?;
        within(
            "a login after the burst",
            conns[i].login(&alice, PASSWORD, &device, SessionMode::SendOnly),
        )
        .await??;
        conns[i].relations(RelationKind::Friend).await?;
    }
    Ok(())
}
