//! Fault tests: a real host process is killed with SIGKILL at random moments while real devices
//! send and receive through it, and every message is accounted for: each one accepted reaches
//! every device of its recipient exactly once, in the order its sender sent it.
//!
//! Also: a lossy, duplicating, reordering UDP path between clients and the host, and a client
//! that moves to a new socket mid-stream.
//!
//! Random choices are drawn from a seed printed at the start; `IIM_FAULT_SEED=N` replays them.

use anyhow::{Context, ensure};
use iim_client::proto::{DeviceId, ErrorCode, MessageId, MessageKind, SessionMode, UserId};
use iim_client::{
    Accepted, ClientConfig, Connection, Credentials, Device, Event, Submission, Update,
};
use iim_e2e::lossy::{Impairment, LossyPath};
use iim_e2e::postgres::Cluster;
use iim_e2e::{ExchangeStore, HostProcess, PASSWORD, Plugins, next_message, text, within};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

type Result<T = ()> = anyhow::Result<T>;

/// The whole test fails if it has not finished by then.
const DEADLINE: Duration = Duration::from_secs(240);

/// The seed of this run: `IIM_FAULT_SEED`, or a new one.
fn seed() -> u64 {
    std::env::var("IIM_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// A client configuration that reconnects quickly: the host is back within a second.
fn client_config(host: &HostProcess) -> Result<ClientConfig> {
    let mut config = host.client_config()?;
    config.reconnect_first = Duration::from_millis(100);
    config.reconnect_max = Duration::from_secs(1);
    config.connect_timeout = Duration::from_secs(5);
    config.request_timeout = Duration::from_secs(10);
    Ok(config)
}

/// The body of the `n`th message from user `from` to user `to`.
fn body(from: usize, to: usize, n: usize) -> String {
    format!("{from}>{to}#{n}")
}

fn parse_body(body: &[u8]) -> Result<(usize, usize, usize)> {
    let text = std::str::from_utf8(body)?;
    let (from, rest) = text.split_once('>').context("no '>'")?;
    let (to, n) = rest.split_once('#').context("no '#'")?;
    Ok((from.parse()?, to.parse()?, n.parse()?))
}

/// What one receiving device got, in the order it got it: (sender, recipient, n, id).
type Received = Vec<(usize, usize, usize, MessageId)>;

/// Takes everything delivered to `device`, acknowledging each, until `stop` is set.
async fn receive(
    device: Device,
    mut stop: watch::Receiver<bool>,
    received_total: Arc<AtomicUsize>,
) -> Result<(Received, usize)> {
    let mut received = Received::new();
    let mut reconnects = 0;
    loop {
        let update = tokio::select! {
            update = device.next() => update,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        match update.context("the device ended")?? {
            Update::Message { seq, message } => {
                ensure!(message.kind == MessageKind::Chat, "unexpected {message:?}");
                let (from, to, n) = parse_body(&message.body)?;
                received.push((from, to, n, message.id));
                received_total.fetch_add(1, Ordering::Relaxed);
                device.ack(seq);
            }
            Update::Reconnected => reconnects += 1,
            Update::Synced { .. } | Update::Disconnected { .. } => {}
            other @ Update::Backlog { .. } => anyhow::bail!("a receive device got {other:?}"),
        }
    }
    device.close().await;
    Ok((received, reconnects))
}

/// Submits `per_pair` messages from user `from` to each other user, in rounds, pausing a
/// random moment between submissions, and hands each submission on as it is made.
async fn submit_all(
    device: Arc<Device>,
    from: usize,
    users: Vec<UserId>,
    per_pair: usize,
    mut rng: StdRng,
    pace: Pace,
    made: mpsc::UnboundedSender<(usize, usize, Submission)>,
) {
    for n in 0..per_pair {
        for (to, user) in users.iter().enumerate() {
            if to == from {
                continue;
            }
            let submission = device.submit(
                rng.random(),
                MessageKind::Chat,
                std::slice::from_ref(user),
                body(from, to, n).as_bytes(),
            );
            let _ = made.send((to, n, submission));
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..pace.0))).await;
        }
    }
}

/// The longest pause between two submissions of one sender, in ms (each a random part of it).
#[derive(Clone, Copy)]
struct Pace(u64);

/// Submissions as fast as the faults tests of one exchange send them.
const BRISK: Pace = Pace(8);

/// The `Accepted` answer of each submission of one sender, by (recipient, n).
type AcceptedBy = HashMap<(usize, usize), Accepted>;

/// Starts [`submit_all`] on `device` and awaits each submission in order as it is made,
/// counting them in `accepted_total`; the task returns every answer.
fn send_all(
    device: Arc<Device>,
    from: usize,
    users: Vec<UserId>,
    per_pair: usize,
    rng: StdRng,
    pace: Pace,
    accepted_total: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Result<AcceptedBy>> {
    let (made, mut submissions) = mpsc::unbounded_channel();
    tokio::spawn(submit_all(
        Arc::clone(&device),
        from,
        users,
        per_pair,
        rng,
        pace,
        made,
    ));
    tokio::spawn(async move {
        let mut accepted = AcceptedBy::new();
        while let Some((to, n, submission)) = submissions.recv().await {
            let answer = submission
                .await
                .with_context(|| format!("submission {}", body(from, to, n)))?;
            accepted.insert((to, n), answer);
            accepted_total.fetch_add(1, Ordering::Relaxed);
        }
        drop(device);
        anyhow::Ok(accepted)
    })
}

/// A receiving device's task: (user, device name, what it received and its reconnects).
type Receiver = (
    usize,
    &'static str,
    tokio::task::JoinHandle<Result<(Received, usize)>>,
);

/// The accounting after the faults: every submission was accepted once, with an id of its
/// own; once every delivery arrived (and a second more for repeats), every device received
/// each message for its user exactly once, in its sender's order.
async fn account(
    senders: Vec<tokio::task::JoinHandle<Result<AcceptedBy>>>,
    receivers: Vec<Receiver>,
    received_total: &AtomicUsize,
    stop: watch::Sender<bool>,
    users: usize,
    per_pair: usize,
) -> Result {
    let expected_accepted = users * (users - 1) * per_pair;
    let expected_per_device = (users - 1) * per_pair;
    let mut accepted: HashMap<(usize, usize, usize), Accepted> = HashMap::new();
    for (from, sender) in senders.into_iter().enumerate() {
        for ((to, n), answer) in sender.await?? {
            accepted.insert((from, to, n), answer);
        }
    }
    ensure!(
        accepted.len() == expected_accepted,
        "{} accepted",
        accepted.len()
    );
    let mut ids: Vec<MessageId> = accepted.values().map(|a| a.id).collect();
    ids.sort();
    ids.dedup();
    ensure!(ids.len() == expected_accepted, "two submissions got one id");

    // Wait for every delivery, then a little longer for any repeat.
    while received_total.load(Ordering::Relaxed) < receivers.len() * expected_per_device {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(true)?;
    for (to, name, task) in receivers {
        let (received, reconnects) = task.await??;
        ensure!(
            received.len() == expected_per_device,
            "user{to}/{name} received {} messages, expected {expected_per_device}",
            received.len()
        );
        for from in (0..users).filter(|from| *from != to) {
            let mut got = Vec::new();
            for (f, t, n, id) in &received {
                if *f == from {
                    ensure!(*t == to, "user{to}/{name} got a message for user{t}");
                    got.push((*n, *id));
                }
            }
            let want: Vec<(usize, MessageId)> = (0..per_pair)
                .map(|n| (n, accepted[&(from, to, n)].id))
                .collect();
            ensure!(
                got == want,
                "user{to}/{name} from user{from}: got {:?}",
                got.iter().map(|(n, _)| *n).collect::<Vec<_>>()
            );
        }
        eprintln!(
            "user{to}/{name}: {} messages in order, none twice, {reconnects} reconnects",
            received.len()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_host_at_random_moments_loses_and_repeats_nothing() -> Result {
    const USERS: usize = 3;
    const PER_PAIR: usize = 100;
    const KILLS: usize = 4;
    let seed = seed();
    eprintln!("fault seed {seed} (IIM_FAULT_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = std::time::Instant::now();
    tokio::time::timeout(DEADLINE, async {
        let mut host = HostProcess::start_chat_only()?;
        let config = client_config(&host)?;
        let mut users = Vec::new();
        for i in 0..USERS {
            users.push(host.register(&format!("user{i}")).await?);
        }
        // User 0 has two receiving devices, the others one.
        let (stop, stopped) = watch::channel(false);
        let received_total = Arc::new(AtomicUsize::new(0));
        let mut receivers = Vec::new();
        for (i, user) in users.iter().enumerate() {
            let devices: &[&str] = if i == 0 {
                &["phone", "laptop"]
            } else {
                &["phone"]
            };
            for name in devices {
                let device = Device::open(
                    &config,
                    user,
                    &DeviceId::new(*name)?,
                    Credentials::Password(PASSWORD.into()),
                    SessionMode::Receive,
                )
                .await?;
                let task = tokio::spawn(receive(
                    device,
                    stopped.clone(),
                    Arc::clone(&received_total),
                ));
                receivers.push((i, *name, task));
            }
        }
        let expected_per_device = (USERS - 1) * PER_PAIR;
        let expected_received = receivers.len() * expected_per_device;

        // One sending device per user; its submissions are awaited in order as they are made.
        let accepted_total = Arc::new(AtomicUsize::new(0));
        let mut senders = Vec::new();
        for (from, user) in users.iter().enumerate() {
            let device = Arc::new(
                Device::open(
                    &config,
                    user,
                    &DeviceId::new("sender")?,
                    Credentials::Password(PASSWORD.into()),
                    SessionMode::SendOnly,
                )
                .await?,
            );
            senders.push(send_all(
                device,
                from,
                users.clone(),
                PER_PAIR,
                StdRng::seed_from_u64(rng.random()),
                BRISK,
                Arc::clone(&accepted_total),
            ));
        }
        let expected_accepted = USERS * (USERS - 1) * PER_PAIR;

        // Kill the host once every fifth of the traffic, a random moment after, and start it
        // again after a random pause: kills land while messages are being accepted, stored,
        // handled by the chat plugin and delivered.
        for k in 1..=KILLS {
            let threshold = k * expected_accepted / (KILLS + 1);
            while accepted_total.load(Ordering::Relaxed) < threshold {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
            let at_kill = (
                accepted_total.load(Ordering::Relaxed),
                received_total.load(Ordering::Relaxed),
            );
            host.kill9()?;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
            tokio::task::block_in_place(|| host.restart())?;
            eprintln!(
                "{:>6.2} s: kill {k}, after {} of {expected_accepted} accepted and {} of \
                 {expected_received} received",
                started.elapsed().as_secs_f64(),
                at_kill.0,
                at_kill.1
            );
        }

        account(senders, receivers, &received_total, stop, USERS, PER_PAIR).await?;
        eprintln!(
            "{:>6.2} s: all accounted for",
            started.elapsed().as_secs_f64()
        );
        host.kill9()?;
        anyhow::Ok(())
    })
    .await
    .context("the fault test did not finish in time")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_moves_to_a_new_socket_mid_stream_keeps_its_session_and_loses_nothing()
-> Result {
    const MESSAGES: usize = 300;
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (bob_conn, _) = host.online(&bob, "phone").await?;
    let sender = host.connect().await?;
    within(
        "login",
        sender.login(
            &alice,
            PASSWORD,
            &DeviceId::new("laptop")?,
            SessionMode::SendOnly,
        ),
    )
    .await??;
    let sending = tokio::spawn({
        let bob = bob.clone();
        async move {
            let mut ids = Vec::new();
            for n in 0..MESSAGES {
                ids.push(sender.send_text(&bob, &n.to_string()).await?.id);
            }
            anyhow::Ok(ids)
        }
    });

    // Bob's phone changes networks twice while the messages stream in.
    let mut received = Vec::new();
    let mut ports = vec![bob_conn.local_addr()?.port()];
    while received.len() < MESSAGES {
        let message = next_message(&bob_conn).await?;
        received.push((text(&message), message.id));
        if received.len() == MESSAGES / 3 || received.len() == 2 * MESSAGES / 3 {
            let moved_to = bob_conn.rebind()?;
            ensure!(
                !ports.contains(&moved_to.port()),
                "rebound to a port used before"
            );
            ports.push(moved_to.port());
        }
    }
    let ids = within("sender", sending).await???;
    let want: Vec<(String, MessageId)> = (0..MESSAGES).map(|n| n.to_string()).zip(ids).collect();
    ensure!(
        received == want,
        "received out of order, twice or not at all"
    );

    // Still the same connection and delivery session: it carries on, and its
    // acknowledgements, sent from the new sockets, reached the host.
    let path = bob_conn.quic().stats().path;
    ensure!(
        bob_conn.quic().close_reason().is_none(),
        "the connection ended"
    );
    bob_conn.close().await;
    let (_again, backlog) = host.online(&bob, "phone").await?;
    ensure!(
        backlog.is_empty(),
        "{} delivered again after moving",
        backlog.len()
    );
    eprintln!(
        "moved through ports {ports:?}; path rtt {:?}, {} lost packets",
        path.rtt, path.lost_packets
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_duplicating_reordering_path_loses_and_repeats_nothing() -> Result {
    const MESSAGES: usize = 400;
    let seed = seed();
    eprintln!("path seed {seed} (IIM_FAULT_SEED={seed} replays it)");
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    // Both ways: one datagram in ten lost, one in twenty twice, one in ten held back 5-50 ms.
    let impairment = Impairment {
        loss: 0.10,
        duplicate: 0.05,
        delay: 0.10,
        delay_ms: (5, 50),
    };
    let path = LossyPath::start(host.addr, impairment, seed).await?;
    let mut config = client_config(&host)?;
    config.server = path.addr();
    config.connect_timeout = Duration::from_secs(15);
    let phone = DeviceId::new("phone")?;
    let password = || Credentials::Password(PASSWORD.into());
    let bob_phone = within(
        "bob's phone",
        Device::open(&config, &bob, &phone, password(), SessionMode::Receive),
    )
    .await??;
    let alice_phone = within(
        "alice's phone",
        Device::open(&config, &alice, &phone, password(), SessionMode::SendOnly),
    )
    .await??;

    tokio::time::timeout(DEADLINE, async {
        // Four at a time, so that the traffic spreads over many datagrams.
        let sending = tokio::spawn({
            let bob = bob.clone();
            async move {
                let mut ids = Vec::new();
                for chunk in 0..MESSAGES / 4 {
                    let burst: Vec<Submission> = (0..4)
                        .map(|i| alice_phone.send_text(&bob, &(chunk * 4 + i).to_string()))
                        .collect();
                    for submission in burst {
                        ids.push(submission.await?.id);
                    }
                }
                anyhow::Ok(ids)
            }
        });
        let mut received = Vec::new();
        while received.len() < MESSAGES {
            if let Update::Message { seq, message } =
                bob_phone.next().await.context("bob's phone ended")??
            {
                received.push((text(&message), message.id));
                bob_phone.ack(seq);
            }
        }
        // Anything repeated would come now.
        if let Ok(Some(update)) =
            tokio::time::timeout(Duration::from_secs(1), bob_phone.next()).await
            && let Update::Message { message, .. } = update?
        {
            anyhow::bail!("delivered again: {}", text(&message));
        }
        let ids = sending.await??;
        let want: Vec<(String, MessageId)> =
            (0..MESSAGES).map(|n| n.to_string()).zip(ids).collect();
        ensure!(
            received == want,
            "received out of order, twice or not at all"
        );
        anyhow::Ok(())
    })
    .await
    .context("the lossy-path test did not finish in time")??;

    let (seen, dropped, duplicated, delayed) = path.counts().snapshot();
    eprintln!(
        "{MESSAGES} messages through {seen} datagrams: {dropped} dropped, {duplicated} \
         duplicated, {delayed} held back"
    );
    ensure!(
        dropped > 0 && duplicated > 0 && delayed > 0,
        "the path did not impair the traffic"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_coming_back_resumes_in_0rtt_and_gets_what_waited() -> Result {
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let config = host.client_config()?;
    let phone = DeviceId::new("phone")?;

    // The first connection cannot resume anything; it leaves a TLS session to resume.
    let first = within("connect", Connection::connect(&config)).await??;
    ensure!(!first.used_0rtt(), "0-RTT without a session to resume");
    let token = within(
        "login",
        first.login(&bob, PASSWORD, &phone, SessionMode::Receive),
    )
    .await??;
    ensure!(matches!(
        iim_e2e::next_event(&first).await?,
        Event::Synced { count: 0 }
    ));
    first.close().await;

    let (a, _) = host.online(&alice, "phone").await?;
    let waiting = a.send_text(&bob, "while you were away").await?;

    // Coming back: Hello and Authenticate in the first flight, then the backlog.
    let back = within(
        "resume",
        Connection::resume(&config, &bob, &phone, &token, SessionMode::Receive),
    )
    .await??;
    ensure!(back.used_0rtt(), "the host did not take the early data");
    let message = next_message(&back).await?;
    ensure!(message.id == waiting.id, "got {message:?}");
    ensure!(matches!(
        iim_e2e::next_event(&back).await?,
        Event::Synced { count: 1 }
    ));
    within("send", back.send_text(&alice, "back")).await??;

    // After a restart the host knows none of the TLS sessions the client kept: early data is
    // refused, and the client connects again in full, without trying another stale session.
    let mut host = host;
    tokio::task::block_in_place(|| host.restart())?;
    let after_restart = within(
        "resume after a restart",
        Connection::resume(&config, &bob, &phone, &token, SessionMode::SendOnly),
    )
    .await??;
    ensure!(
        !after_restart.used_0rtt(),
        "early data taken by a new process"
    );
    within("send", after_restart.send_text(&alice, "after the restart")).await??;

    // A token that is not the device's is refused in early data as after the handshake.
    let refused = Connection::resume(&config, &bob, &phone, "not the token", SessionMode::Receive)
        .await
        .err()
        .context("a wrong token was taken")?;
    ensure!(refused.code() == Some(ErrorCode::AUTH_FAILED), "{refused}");
    Ok(())
}

/// Reads frames from `recv` until `n` have come.
async fn read_frames(
    recv: &mut quinn::RecvStream,
    n: usize,
) -> Result<Vec<iim_client::proto::ServerFrame>> {
    let mut decoder = iim_client::proto::FrameDecoder::new(1 << 16);
    let mut frames = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some(frame) = decoder.decode()? {
            frames.push(frame);
        }
        if frames.len() >= n {
            return Ok(frames);
        }
        let read = within("a frame", recv.read(&mut buf)).await??;
        decoder.push(&buf[..read.context("the host ended the stream")?]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_is_taken_only_where_a_replay_would_change_nothing() -> Result {
    use iim_client::proto::{ClientFrame, ServerFrame, encode_frame};
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let config = host.client_config()?;
    let laptop = DeviceId::new("laptop")?;
    let hello = ClientFrame::Hello {
        version: iim_client::proto::PROTOCOL_VERSION,
        agent: "early".into(),
    };
    let login = ClientFrame::Login {
        req: 1,
        user: alice.clone(),
        password: PASSWORD.into(),
        device: laptop.clone(),
        mode: SessionMode::SendOnly,
    };
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(iim_client::quic_client_config(&config.roots)?);

    // The first connection has no TLS session to resume: its login is taken, and it leaves a
    // session and a token.
    let conn = within("connect", endpoint.connect(host.addr, "localhost")?).await??;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut bytes = encode_frame(&hello, 1 << 16)?;
    bytes.extend(encode_frame(&login, 1 << 16)?);
    send.write_all(&bytes).await?;
    let Some(ServerFrame::LoggedIn { mut token, .. }) = read_frames(&mut recv, 2).await?.pop()
    else {
        anyhow::bail!("the first login was not taken");
    };
    conn.close(0u32.into(), b"");

    // Then, in 0-RTT: the same login, and a token and a submission. The login is refused
    // whenever the host reads it before the handshake is complete (it can also be read just
    // after, and then taken); the token and the submission are taken either way, the
    // submission once whatever the number of rounds.
    let mut refused = 0;
    let mut ids = Vec::new();
    for round in 0..10 {
        let (conn, accepted) = match endpoint.connect(host.addr, "localhost")?.into_0rtt() {
            Ok(early) => early,
            // Each resumption uses a ticket up; new ones come after the handshake, and may
            // not have come before the last round closed.
            Err(_) if round > 0 => break,
            Err(_) => anyhow::bail!("no TLS session to resume"),
        };
        let (mut send, mut recv) = conn.open_bi().await?;
        let early = [
            hello.clone(),
            login.clone(),
            ClientFrame::Authenticate {
                req: 2,
                user: alice.clone(),
                device: laptop.clone(),
                token: token.clone(),
                mode: SessionMode::SendOnly,
            },
            ClientFrame::Submit {
                req: 3,
                client_id: 7,
                kind: MessageKind::Chat,
                to: vec![bob.clone().into()],
                body: b"once".to_vec(),
            },
        ];
        let mut bytes = Vec::new();
        for frame in &early {
            bytes.extend(encode_frame(frame, 1 << 16)?);
        }
        send.write_all(&bytes).await?;
        let answers = read_frames(&mut recv, 4).await?;
        ensure!(
            within("handshake", accepted).await?,
            "round {round}: 0-RTT refused"
        );
        match &answers[1] {
            ServerFrame::Error {
                req: Some(1),
                code: ErrorCode::TOO_EARLY,
                ..
            } => {
                refused += 1;
                ensure!(
                    matches!(answers[2], ServerFrame::Ok { req: 2 }),
                    "round {round}: {:?}",
                    answers[2]
                );
            }
            // Read after the handshake completed: a login like any other, which issued a new
            // token and authenticated the connection (so the Authenticate is refused).
            ServerFrame::LoggedIn { token: new, .. } => token = new.clone(),
            other => anyhow::bail!("round {round}: {other:?}"),
        }
        let ServerFrame::Accepted { req: 3, id, .. } = answers[3] else {
            anyhow::bail!("round {round}: {:?}", answers[3]);
        };
        ids.push(id);
        // A moment for the host's new session tickets to arrive.
        tokio::time::sleep(Duration::from_millis(20)).await;
        conn.close(0u32.into(), b"");
    }
    eprintln!("early logins refused in {refused} rounds");
    ensure!(refused > 0, "no early login was refused");
    ids.dedup();
    ensure!(ids.len() == 1, "one submission, several ids: {ids:?}");
    let (_b, backlog) = host.online(&bob, "phone").await?;
    ensure!(iim_e2e::ids(&backlog) == ids, "{backlog:?}");
    Ok(())
}

/// Opens a device of `user` on `host` (its home), reconnecting quickly.
async fn open_device(
    host: &HostProcess,
    user: &UserId,
    name: &str,
    mode: SessionMode,
) -> Result<Device> {
    Ok(Device::open(
        &client_config(host)?,
        user,
        &DeviceId::new(name)?,
        Credentials::Password(PASSWORD.into()),
        mode,
    )
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_exchange_and_a_host_under_cross_host_traffic_loses_and_repeats_nothing()
-> Result {
    // An exchange and three hosts, two users on each (user i on host i % 3): most messages
    // cross the exchange, from several senders and plugin lanes of each host at once.
    const HOSTS: usize = 3;
    const USERS: usize = 6;
    const PER_PAIR: usize = 20;
    let seed = seed();
    eprintln!("fault seed {seed} (IIM_FAULT_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = std::time::Instant::now();
    tokio::time::timeout(DEADLINE, async {
        let mut exchange = HostProcess::start_exchange()?;
        let chat = iim_e2e::default_plugin("chat")?;
        let mut hosts = Vec::new();
        for i in 0..HOSTS {
            hosts.push(HostProcess::start_in_network(
                &exchange,
                &format!("h{i}"),
                "",
                iim_e2e::Plugins::Only(&[("chat", &chat)]),
            )?);
        }
        let traffic = CrossTraffic::start(&hosts, USERS, PER_PAIR, BRISK, &mut rng).await?;
        let (received_total, accepted_total) = (&traffic.received, &traffic.accepted);
        let expected_received = traffic.expected_received();
        let expected_accepted = USERS * (USERS - 1) * PER_PAIR;

        // Kill -9 the exchange, then host h1, then both at once, each a random moment after
        // another quarter of the messages arrived (so while envelopes are on their way), and
        // start them again after a random pause.
        for k in 1..=3usize {
            let threshold = k * expected_received / 4;
            while received_total.load(Ordering::Relaxed) < threshold {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
            let at_kill = (
                accepted_total.load(Ordering::Relaxed),
                received_total.load(Ordering::Relaxed),
            );
            let what = match k {
                1 => {
                    exchange.kill9()?;
                    "the exchange"
                }
                2 => {
                    hosts[1].kill9()?;
                    "host h1"
                }
                _ => {
                    exchange.kill9()?;
                    hosts[2].kill9()?;
                    "the exchange and host h2"
                }
            };
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
            tokio::task::block_in_place(|| -> Result {
                match k {
                    1 => exchange.restart(),
                    2 => hosts[1].restart(),
                    _ => {
                        exchange.restart()?;
                        hosts[2].restart()
                    }
                }
            })?;
            eprintln!(
                "{:>6.2} s: killed {what}, after {} of {expected_accepted} accepted and {} of \
                 {expected_received} received",
                started.elapsed().as_secs_f64(),
                at_kill.0,
                at_kill.1
            );
        }

        traffic.settle(&hosts, started).await?;
        anyhow::Ok(())
    })
    .await
    .context("the fault test did not finish in time")?
}

/// Users spread over hosts (user i on host i % hosts, each known everywhere), each with a
/// receiving device, and each sending `per_pair` messages to every other user.
struct CrossTraffic {
    senders: Vec<tokio::task::JoinHandle<Result<AcceptedBy>>>,
    receivers: Vec<Receiver>,
    /// Messages received so far, by every device.
    received: Arc<AtomicUsize>,
    /// Submissions accepted so far.
    accepted: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    users: usize,
    per_pair: usize,
}

impl CrossTraffic {
    async fn start(
        hosts: &[HostProcess],
        users: usize,
        per_pair: usize,
        pace: Pace,
        rng: &mut StdRng,
    ) -> Result<Self> {
        let mut names = Vec::new();
        for i in 0..users {
            names.push(hosts[i % hosts.len()].register(&format!("user{i}")).await?);
        }
        // Every host must know every user before the traffic starts.
        for host in hosts {
            while host.network_stat("directory_users").await? < users as u64 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let (stop, stopped) = watch::channel(false);
        let received = Arc::new(AtomicUsize::new(0));
        let mut receivers = Vec::new();
        for (i, user) in names.iter().enumerate() {
            let host = &hosts[i % hosts.len()];
            let device = open_device(host, user, "phone", SessionMode::Receive).await?;
            let task = tokio::spawn(receive(device, stopped.clone(), Arc::clone(&received)));
            receivers.push((i, "phone", task));
        }
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut senders = Vec::new();
        for (from, user) in names.iter().enumerate() {
            let host = &hosts[from % hosts.len()];
            let device = open_device(host, user, "sender", SessionMode::SendOnly).await?;
            senders.push(send_all(
                Arc::new(device),
                from,
                names.clone(),
                per_pair,
                StdRng::seed_from_u64(rng.random()),
                pace,
                Arc::clone(&accepted),
            ));
        }
        Ok(Self {
            senders,
            receivers,
            received,
            accepted,
            stop,
            users,
            per_pair,
        })
    }

    /// Submissions accepted and messages received so far.
    fn counts(&self) -> (usize, usize) {
        (
            self.accepted.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    /// Deliveries once every message arrived.
    fn expected_received(&self) -> usize {
        self.receivers.len() * (self.users - 1) * self.per_pair
    }

    /// [`CrossTraffic::account`], then every outbox of `hosts` empty: the relay holds nothing
    /// more.
    async fn settle(self, hosts: &[HostProcess], started: std::time::Instant) -> Result {
        self.account().await?;
        for host in hosts {
            ensure!(
                host.network_stat("envelopes_waiting").await? == 0,
                "an outbox is not empty"
            );
        }
        eprintln!(
            "{:>6.2} s: all accounted for",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// [`account`]: every message accepted once, and received once, in order.
    async fn account(self) -> Result {
        account(
            self.senders,
            self.receivers,
            &self.received,
            self.stop,
            self.users,
            self.per_pair,
        )
        .await
    }
}

/// Starts `n` hosts (`h0`, `h1`, …, with the chat plugin alone) into `hosts`, each listing
/// every exchange of `exchanges`; the list returned is to keep.
fn start_hosts_of(
    exchanges: &[HostProcess],
    n: usize,
    hosts: &mut Vec<HostProcess>,
) -> Result<iim_e2e::ExchangeList> {
    let list = iim_e2e::ExchangeList::of(&exchanges.iter().collect::<Vec<_>>())?;
    let chat = iim_e2e::default_plugin("chat")?;
    for i in 0..n {
        hosts.push(HostProcess::start_with(
            &list.host_config(&format!("h{i}"), ""),
            iim_e2e::Plugins::Only(&[("chat", &chat)]),
        )?);
    }
    Ok(list)
}

/// Prints the log of every process of a network whose test failed.
fn print_logs(exchanges: &[HostProcess], hosts: &[HostProcess]) {
    for (i, exchange) in exchanges.iter().enumerate() {
        eprintln!("---- exchange {i}'s log ----\n{}", exchange.log());
    }
    for (i, host) in hosts.iter().enumerate() {
        eprintln!("---- h{i}'s log ----\n{}", host.log());
    }
}

/// Says which fault came when, after how many messages were accepted and received.
fn report(
    started: std::time::Instant,
    what: &str,
    (accepted, received): (usize, usize),
    expected: usize,
) {
    eprintln!(
        "{:>6.2} s: {what}, after {accepted} accepted and {received} of {expected} received",
        started.elapsed().as_secs_f64()
    );
}

/// Sends `signal` (`STOP`, `CONT`) to `process`.
fn signal(process: &HostProcess, signal: &str) -> Result {
    let pid = process.pid().context("the process is not running")?;
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

/// Which of `exchanges` forwards to host `server` now, as `admin network` of the first one
/// that answers shows it (`None`: none does).
async fn forwarder_of(exchanges: &[HostProcess], server: &str) -> Result<Option<usize>> {
    for exchange in exchanges {
        let Ok(network) = exchange.admin("network").await else {
            continue;
        };
        for line in network.lines() {
            let Some((name, targets)) = line
                .strip_prefix("exchange ")
                .and_then(|rest| rest.split_once(" forwards "))
            else {
                continue;
            };
            let forwards = targets
                .trim_matches(['[', ']'])
                .split_whitespace()
                .any(|t| t == server);
            if forwards {
                return Ok(exchanges.iter().position(|e| e.addr.to_string() == name));
            }
        }
        return Ok(None);
    }
    anyhow::bail!("no exchange answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_exchanges_on_one_database_relay_through_kills_and_a_stop_of_either_or_both() -> Result
{
    // Two exchanges share one PostgreSQL database; three hosts list both, two users on each.
    // Under cross-host traffic: kill -9 of the exchange the hosts are on, then of the other
    // (each started again), of both one after the other, and SIGSTOP of the one that
    // forwards to h0 for longer than a link's idle timeout. Every accepted message is
    // delivered once, in its sender's order.
    if !iim_e2e::postgres::available()? {
        return Ok(());
    }
    const HOSTS: usize = 3;
    const USERS: usize = 6;
    const PER_PAIR: usize = 30;
    let seed = seed();
    eprintln!("fault seed {seed} (IIM_FAULT_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = std::time::Instant::now();
    let cluster = Cluster::start(&[])?;
    let first = HostProcess::start_exchange_on(&cluster.url())?;
    let url = cluster.url();
    let second = HostProcess::start_another_exchange(ExchangeStore::SingleNode(&url), &first)?;
    let mut exchanges = vec![first, second];
    let mut hosts = Vec::new();
    let outcome = tokio::time::timeout(DEADLINE, async {
        let _certs = start_hosts_of(&exchanges, HOSTS, &mut hosts)?;
        // About 15 s of submissions: the faults come while they do.
        let traffic = CrossTraffic::start(&hosts, USERS, PER_PAIR, Pace(200), &mut rng).await?;
        let received_total = &traffic.received;
        let expected_received = traffic.expected_received();

        for k in 1..=4usize {
            let threshold = k * expected_received / 6;
            while received_total.load(Ordering::Relaxed) < threshold {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
            let at_fault = traffic.counts();
            let pause = Duration::from_millis(rng.random_range(0..300));
            let what = match k {
                1 | 2 => {
                    let i = forwarder_of(&exchanges, "h0").await?.unwrap_or(k - 1);
                    exchanges[i].kill9()?;
                    tokio::time::sleep(pause).await;
                    tokio::task::block_in_place(|| exchanges[i].restart())?;
                    format!("killed exchange {i}, the one h0 was on")
                }
                3 => {
                    exchanges[0].kill9()?;
                    tokio::time::sleep(pause).await;
                    exchanges[1].kill9()?;
                    tokio::time::sleep(pause).await;
                    tokio::task::block_in_place(|| -> Result {
                        exchanges[0].restart()?;
                        exchanges[1].restart()
                    })?;
                    "killed both exchanges, one after the other".to_owned()
                }
                _ => {
                    let i = within("a forwarder of h0", async {
                        loop {
                            if let Some(i) = forwarder_of(&exchanges, "h0").await? {
                                return anyhow::Ok(i);
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    })
                    .await??;
                    signal(&exchanges[i], "STOP")?;
                    let before = received_total.load(Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(8)).await;
                    let during = received_total.load(Ordering::Relaxed) - before;
                    signal(&exchanges[i], "CONT")?;
                    // Submissions went on: the other exchange took the hosts over.
                    ensure!(
                        during > 0,
                        "nothing was relayed while exchange {i} was stopped"
                    );
                    format!(
                        "stopped exchange {i}, the one h0 was on, for 8 s ({during} received \
                         meanwhile)"
                    )
                }
            };
            report(started, &what, at_fault, expected_received);
        }

        traffic.settle(&hosts, started).await?;
        anyhow::Ok(())
    })
    .await
    .context("the fault test did not finish in time")
    .and_then(|done| done);
    if outcome.is_err() {
        print_logs(&exchanges, &hosts);
    }
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_primary_killed_under_cross_host_traffic_and_its_standby_promoted_loses_nothing()
-> Result {
    // Two exchanges on a primary with a synchronous standby (the connection string lists
    // both, the writable one wanted); three hosts, two users on each. Under cross-host
    // traffic the primary is stopped at once (`pg_ctl stop -m immediate`: no shutdown
    // checkpoint, connections cut) and the standby promoted. Every accepted message is
    // delivered once, in its sender's order.
    if !iim_e2e::postgres::available()? {
        return Ok(());
    }
    const HOSTS: usize = 3;
    const USERS: usize = 6;
    const PER_PAIR: usize = 20;
    let seed = seed();
    eprintln!("fault seed {seed} (IIM_FAULT_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = std::time::Instant::now();
    let mut primary = Cluster::start(&["synchronous_standby_names=standby1"])?;
    let standby = Cluster::start_standby(&primary, "standby1")?;
    let url = Cluster::url_of_writable(&[&primary, &standby]);
    let store = ExchangeStore::Replicated(&url);
    let first = HostProcess::start_with(&iim_e2e::exchange_config(store), Plugins::Default)?;
    let second = HostProcess::start_another_exchange(store, &first)?;
    let exchanges = vec![first, second];
    let mut hosts = Vec::new();
    let outcome = tokio::time::timeout(DEADLINE, async {
        let _certs = start_hosts_of(&exchanges, HOSTS, &mut hosts)?;
        let traffic = CrossTraffic::start(&hosts, USERS, PER_PAIR, Pace(100), &mut rng).await?;
        let expected_received = traffic.expected_received();
        while traffic.received.load(Ordering::Relaxed) < expected_received / 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
        let at_fault = traffic.counts();
        tokio::task::block_in_place(|| -> Result {
            primary.stop("immediate")?;
            standby.promote()
        })?;
        report(
            started,
            "the primary stopped and the standby promoted",
            at_fault,
            expected_received,
        );
        traffic.settle(&hosts, started).await?;
        anyhow::Ok(())
    })
    .await
    .context("the fault test did not finish in time")
    .and_then(|done| done);
    if outcome.is_err() {
        print_logs(&exchanges, &hosts);
        eprintln!("---- the standby's log ----\n{}", standby.log());
    }
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_connections_between_an_exchange_and_its_database_cut_or_silent_lose_nothing() -> Result
{
    // One exchange on PostgreSQL, through a TCP proxy on loopback; three hosts, two users on
    // each. Under cross-host traffic every connection between the exchange and the database
    // is reset at once; later they all go silent for 15 s (open, nothing moving), longer than
    // the exchange waits for an answer (10 s) and than the database lets a session be idle
    // (5 s). Every accepted message is delivered once, in its sender's order.
    if !iim_e2e::postgres::available()? {
        return Ok(());
    }
    const HOSTS: usize = 3;
    const USERS: usize = 6;
    const PER_PAIR: usize = 20;
    let seed = seed();
    eprintln!("fault seed {seed} (IIM_FAULT_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = std::time::Instant::now();
    let cluster = Cluster::start(&[])?;
    let proxy =
        iim_e2e::tcp_proxy::FaultProxy::start(([127, 0, 0, 1], cluster.port()).into()).await?;
    let url = format!(
        "host=127.0.0.1 port={} user={} dbname=postgres",
        proxy.addr().port(),
        iim_e2e::postgres::SUPERUSER
    );
    let exchanges = vec![HostProcess::start_exchange_on(&url)?];
    let mut hosts = Vec::new();
    let outcome = tokio::time::timeout(DEADLINE, async {
        let _certs = start_hosts_of(&exchanges, HOSTS, &mut hosts)?;
        let traffic = CrossTraffic::start(&hosts, USERS, PER_PAIR, Pace(100), &mut rng).await?;
        let expected_received = traffic.expected_received();
        for k in 1..=2usize {
            while traffic.received.load(Ordering::Relaxed) < k * expected_received / 3 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
            let at_fault = traffic.counts();
            let what = match k {
                1 => {
                    proxy.cut();
                    "every connection to the database reset"
                }
                _ => {
                    proxy.stall(true);
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    proxy.stall(false);
                    "every connection to the database silent for 15 s"
                }
            };
            report(started, what, at_fault, expected_received);
        }
        traffic.settle(&hosts, started).await?;
        anyhow::Ok(())
    })
    .await
    .context("the fault test did not finish in time")
    .and_then(|done| done);
    if outcome.is_err() {
        print_logs(&exchanges, &hosts);
    }
    outcome
}
