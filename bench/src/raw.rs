//! The raw run: the same load over a bare QUIC relay that stores nothing and parses nothing.
//!
//! The relay is this binary run as `iim-bench relay`, a separate process like the host. Every
//! client opens one bidirectional stream and sends a 5-byte header: the pair's number (u32,
//! big-endian) and its role (0 sender, 1 receiver). The relay answers one byte when it has
//! registered the client, then pipes bytes both ways between the two streams of a pair.
//!
//! Over that pipe a sender writes frames (u32 big-endian length, then the body of
//! [`crate::stats::body`]); the receiver acknowledges each frame with its index (u32), and the
//! sender keeps at most `window` frames unacknowledged. The window is end to end here (the
//! relay does not answer for frames), where iim's counts submissions the host has not yet
//! accepted.

use crate::schedule::{self, Due, OpenRun, Part, Parts, Schedule};
use crate::stats::{self, Clock, FirstSend, Load, Summary, Tally};
use anyhow::{Context, anyhow, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

/// The ALPN of the relay.
const ALPN: &[u8] = b"raw/1";
/// Role byte of a sender.
const SENDER: u8 = 0;
/// Role byte of a receiver.
const RECEIVER: u8 = 1;
/// Longest wait for the relay to start, and for any step of setting a pair up.
const STEP: Duration = Duration::from_secs(20);
/// Longest wait for the next frame or acknowledgement before a client gives up.
const STALL: Duration = Duration::from_secs(60);
/// What the relay's first line of output starts with.
const BANNER: &str = "iim-bench relay listening on ";

// ---- the relay process ----

/// Runs the relay: listens on `listen`, writes its certificate into `cert_dir`, prints
/// `iim-bench relay listening on ADDR (certificate PATH)` and serves until its standard input
/// closes (the benchmark ended or died).
pub fn relay_main(listen: SocketAddr, cert_dir: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let identity = SelfSigned::generate()?;
        let cert_path = cert_dir.join("relay-cert.pem");
        std::fs::write(&cert_path, &identity.cert_pem)
            .with_context(|| format!("writing {}", cert_path.display()))?;
        let endpoint = quinn::Endpoint::server(identity.config, listen)
            .with_context(|| format!("cannot listen on {listen}"))?;
        println!(
            "{BANNER}{} (certificate {})",
            endpoint.local_addr()?,
            cert_path.display()
        );

        let slots: Slots = Arc::default();
        // Standard input is read on a thread of its own: it closes when the benchmark ends.
        let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
            let _ = closed_tx.send(());
        });
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let slots = Arc::clone(&slots);
                    tokio::spawn(async move {
                        if let Err(e) = relay_client(incoming, slots).await {
                            eprintln!("relay: client dropped: {e:#}");
                        }
                    });
                }
                _ = &mut closed => break,
            }
        }
        endpoint.close(0u32.into(), b"bye");
        Ok(())
    })
}

/// A raw server's identity: a new self-signed certificate for `localhost` and 127.0.0.1, and
/// the QUIC server configuration presenting it. TLS 1.3 with rustls' ring provider, as the
/// host's; ALPN `raw/1`; quinn's default transport settings.
pub(crate) struct SelfSigned {
    /// The server configuration.
    pub config: quinn::ServerConfig,
    /// The certificate, for a client to trust.
    pub cert: CertificateDer<'static>,
    /// The same, in PEM.
    pub cert_pem: String,
}

impl SelfSigned {
    /// A new identity.
    pub fn generate() -> anyhow::Result<Self> {
        let generated = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .context("generating a certificate")?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            generated.signing_key.serialize_der(),
        ));
        let cert = generated.cert.der().clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        Ok(Self {
            config: quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            cert,
            cert_pem: generated.cert.pem(),
        })
    }
}

/// One side of a pair, registered and waiting for the other.
struct Side {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// The pairs that have one side registered, by pair number: (sender, receiver).
type Slots = Arc<Mutex<HashMap<u32, (Option<Side>, Option<Side>)>>>;

async fn relay_client(incoming: quinn::Incoming, slots: Slots) -> anyhow::Result<()> {
    let conn = incoming.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut header = [0u8; 5];
    recv.read_exact(&mut header).await?;
    let [a, b, c, d, role] = header;
    let pair = u32::from_be_bytes([a, b, c, d]);
    if role != SENDER && role != RECEIVER {
        bail!("unknown role {role}");
    }
    let side = Side {
        conn,
        send: {
            send.write_all(&[1]).await?;
            send
        },
        recv,
    };
    let complete = {
        let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots.entry(pair).or_default();
        let place = if role == SENDER {
            &mut slot.0
        } else {
            &mut slot.1
        };
        if place.is_some() {
            bail!("pair {pair} has two clients of role {role}");
        }
        *place = Some(side);
        if slot.0.is_some() && slot.1.is_some() {
            slots.remove(&pair)
        } else {
            None
        }
    };
    if let Some((Some(sender), Some(receiver))) = complete {
        // Each direction ends when its source finishes; the connections live until both do.
        let a = tokio::spawn(pipe(sender.recv, receiver.send));
        let b = tokio::spawn(pipe(receiver.recv, sender.send));
        let _ = a.await;
        let _ = b.await;
        drop((sender.conn, receiver.conn));
    }
    Ok(())
}

/// Copies every byte from `from` to `to`, then finishes `to`.
async fn pipe(mut from: quinn::RecvStream, mut to: quinn::SendStream) -> anyhow::Result<()> {
    while let Some(chunk) = from.read_chunk(usize::MAX, true).await? {
        to.write_chunk(chunk.bytes).await?;
    }
    to.finish()?;
    Ok(())
}

// ---- the benchmark's side ----

/// A relay process; killed when dropped.
struct Relay {
    child: tokio::process::Child,
    addr: SocketAddr,
    roots: Vec<CertificateDer<'static>>,
    _dir: tempfile::TempDir,
}

impl Relay {
    /// Starts `iim-bench relay` on 127.0.0.1 and reads where it listens.
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let exe = std::env::current_exe().context("cannot find this program")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("relay")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--cert-dir")
            .arg(dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the relay")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        tokio::time::timeout(STEP, BufReader::new(stdout).read_line(&mut line))
            .await
            .map_err(|_| anyhow!("the relay did not report its address"))??;
        let rest = line
            .trim()
            .strip_prefix(BANNER)
            .ok_or_else(|| anyhow!("unexpected first line from the relay: {line:?}"))?;
        let (addr, cert) = rest
            .split_once(" (certificate ")
            .ok_or_else(|| anyhow!("unexpected first line from the relay: {line:?}"))?;
        let cert = PathBuf::from(cert.trim_end_matches(')'));
        let roots = CertificateDer::pem_file_iter(&cert)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading {}", cert.display()))?;
        Ok(Self {
            child,
            addr: addr.parse()?,
            roots,
            _dir: dir,
        })
    }

    /// Kills the relay and waits for it.
    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The quinn client configuration for a raw server (the relay): TLS 1.3 with rustls' ring
/// provider, ALPN `raw/1`, quinn's default transport settings, trusting `roots`.
pub(crate) fn client_config(
    roots: &[CertificateDer<'static>],
) -> anyhow::Result<quinn::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for cert in roots {
        store.add(cert.clone())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// A client's connection to the relay, registered for one side of a pair.
struct Client {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Client {
    /// Connects (one endpoint per client, like an iim client), opens the stream, sends the
    /// header and waits until the relay has registered it.
    async fn connect(relay: &Relay, pair: u32, role: u8) -> anyhow::Result<Self> {
        let setup = async {
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            endpoint.set_default_client_config(client_config(&relay.roots)?);
            let conn = endpoint.connect(relay.addr, "localhost")?.await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            let mut header = [0u8; 5];
            header[..4].copy_from_slice(&pair.to_be_bytes());
            header[4] = role;
            send.write_all(&header).await?;
            let mut ready = [0u8; 1];
            recv.read_exact(&mut ready).await?;
            Ok::<_, anyhow::Error>(Self {
                _endpoint: endpoint,
                conn,
                send,
                recv,
            })
        };
        tokio::time::timeout(STEP, setup)
            .await
            .map_err(|_| anyhow!("connecting to the relay timed out"))?
    }
}

/// Runs the load over a fresh relay process and returns its figures.
pub async fn run(load: Load, clock: Clock) -> anyhow::Result<Summary> {
    let relay = Relay::start().await?;
    eprintln!("raw: relay listening on {}", relay.addr);
    let result = measure(&relay, load, clock).await;
    relay.stop().await;
    result
}

/// Connects the receivers and the senders of `pairs` pairs: every receiver is registered
/// before any sender connects.
async fn connect(relay: &Relay, pairs: u32) -> anyhow::Result<(Vec<Client>, Vec<Client>)> {
    let mut receivers = Vec::with_capacity(pairs as usize);
    for pair in 0..pairs {
        receivers.push(Client::connect(relay, pair, RECEIVER).await?);
    }
    let mut senders = Vec::with_capacity(pairs as usize);
    for pair in 0..pairs {
        senders.push(Client::connect(relay, pair, SENDER).await?);
    }
    eprintln!("raw: {pairs} pairs connected; sending");
    Ok((receivers, senders))
}

async fn measure(relay: &Relay, load: Load, clock: Clock) -> anyhow::Result<Summary> {
    let (receivers, senders) = connect(relay, load.pairs).await?;

    let first_send = Arc::new(FirstSend::new());
    // Senders and receivers in one set, so that whichever fails first ends the run. Every
    // connection stays open until all are done, so that no last acknowledgement is lost to a
    // close.
    let mut tasks: JoinSet<anyhow::Result<(Option<Tally>, Client)>> = JoinSet::new();
    for client in receivers {
        tasks.spawn(async move {
            receive(client, load.messages, clock, None)
                .await
                .map(|(tally, client)| (Some(tally), client))
        });
    }
    for client in senders {
        let first_send = Arc::clone(&first_send);
        tasks.spawn(async move {
            send(client, load, clock, first_send)
                .await
                .map(|client| (None, client))
        });
    }
    let mut open = Vec::new();
    let mut tallies = Vec::with_capacity(load.pairs as usize);
    while let Some(done) = tasks.join_next().await {
        let (tally, client) = done.context("a benchmark task failed")??;
        tallies.extend(tally);
        open.push(client);
    }
    let summary = Summary::of(&tallies, first_send.get(), load.total())?;
    for client in open {
        client.conn.close(0u32.into(), b"done");
    }
    Ok(summary)
}

/// A sender: writes its frames with at most `window` unacknowledged, then waits for the last
/// acknowledgements.
async fn send(
    mut client: Client,
    load: Load,
    clock: Clock,
    first_send: Arc<FirstSend>,
) -> anyhow::Result<Client> {
    let window = Arc::new(Semaphore::new(load.window as usize));
    let mut recv = client.recv;
    let acks = {
        let window = Arc::clone(&window);
        let messages = load.messages;
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut acked = 0u32;
            while acked < messages {
                let chunk = tokio::time::timeout(STALL, recv.read_chunk(usize::MAX, true))
                    .await
                    .map_err(|_| anyhow!("no acknowledgement for {} s", STALL.as_secs()))??
                    .ok_or_else(|| anyhow!("the relay ended the stream after {acked} acks"))?;
                buf.extend_from_slice(&chunk.bytes);
                let whole = buf.len() / 4;
                buf.drain(..whole * 4);
                acked += u32::try_from(whole)?;
                window.add_permits(whole);
            }
            Ok::<_, anyhow::Error>(recv)
        })
    };
    let body_len = u32::try_from(load.body)?;
    let mut frame = Vec::with_capacity(4 + load.body);
    for index in 0..load.messages {
        tokio::time::timeout(STALL, window.acquire())
            .await
            .map_err(|_| anyhow!("no acknowledgement for {} s", STALL.as_secs()))??
            .forget();
        let now = clock.now_ns();
        first_send.record(now);
        frame.clear();
        frame.extend_from_slice(&body_len.to_be_bytes());
        frame.extend_from_slice(&stats::body(load.body, now, index));
        client
            .send
            .write_all(&frame)
            .await
            .context("writing a frame")?;
    }
    client.recv = acks.await.context("the acknowledgement reader failed")??;
    client.send.finish()?;
    Ok(client)
}

/// A receiver: reads frames, acknowledging each, until `messages` arrived (or, given `until`,
/// that time on `clock` came).
async fn receive(
    mut client: Client,
    messages: u32,
    clock: Clock,
    until: Option<u64>,
) -> anyhow::Result<(Tally, Client)> {
    let mut tally = Tally::new(messages);
    let mut buf: Vec<u8> = Vec::new();
    let mut acks = Vec::new();
    while !tally.done() {
        let Some(wait) = schedule::wait(STALL, clock, until) else {
            break;
        };
        let chunk = match tokio::time::timeout(wait, client.recv.read_chunk(usize::MAX, true)).await
        {
            Ok(chunk) => chunk?.ok_or_else(|| anyhow!("the relay ended the stream"))?,
            Err(_) if schedule::wait(STALL, clock, until).is_none() => break,
            Err(_) => bail!(
                "no frame for {} s; received {} of {messages}",
                STALL.as_secs(),
                tally.count()
            ),
        };
        let now = clock.now_ns();
        buf.extend_from_slice(&chunk.bytes);
        let mut used = 0;
        acks.clear();
        while let Some(len) = buf.get(used..used + 4) {
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let Some(body) = buf.get(used + 4..used + 4 + len) else {
                break;
            };
            tally.record(body, now)?;
            let (_, index) = stats::parse_body(body)?;
            acks.extend_from_slice(&index.to_be_bytes());
            used += 4 + len;
        }
        buf.drain(..used);
        if !acks.is_empty() {
            client
                .send
                .write_all(&acks)
                .await
                .context("writing acknowledgements")?;
        }
    }
    client.send.finish()?;
    Ok((tally, client))
}

/// Runs `schedule` open loop over a fresh relay: each sender writes each frame as it falls
/// due, whatever the acknowledgements, and each receiver takes what arrives until every frame
/// did or [`schedule::DRAIN`] after the last was due.
pub async fn run_open(schedule: Schedule, clock: Clock) -> anyhow::Result<(Schedule, OpenRun)> {
    let relay = Relay::start().await?;
    eprintln!("raw: relay listening on {}", relay.addr);
    let result = measure_open(&relay, schedule, clock).await;
    relay.stop().await;
    result
}

async fn measure_open(
    relay: &Relay,
    schedule: Schedule,
    clock: Clock,
) -> anyhow::Result<(Schedule, OpenRun)> {
    let (receivers, senders) = connect(relay, schedule.senders).await?;
    let (schedule, dues) = schedule::pace(schedule, clock)?;
    let until = schedule.until_ns();
    let (messages, body) = (schedule.messages, schedule.body);
    // Every connection stays open until all are done.
    let mut tasks: JoinSet<anyhow::Result<(Part, Client)>> = JoinSet::new();
    for (i, client) in receivers.into_iter().enumerate() {
        tasks.spawn(async move {
            let (tally, client) = receive(client, messages, clock, Some(until)).await?;
            Ok((Part::Received(i, tally), client))
        });
    }
    for (client, dues) in senders.into_iter().zip(dues) {
        tasks.spawn(async move {
            let (lateness, client) = send_open(client, dues, messages, body, clock, until).await?;
            Ok((Part::Sent(lateness), client))
        });
    }
    let mut parts = Parts::new(schedule.senders);
    let mut open = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (part, client) = done.context("a benchmark task failed")??;
        parts.add(part)?;
        open.push(client);
    }
    let run = parts.finish(clock)?;
    for client in open {
        client.conn.close(0u32.into(), b"done");
    }
    Ok((schedule, run))
}

/// An open-loop sender: writes each frame as the pacer hands it over, then finishes its
/// stream. Its receiver acknowledges every frame; they are read, so that they do not fill the
/// stream, and counted for nothing: no frame waits for one. Returns how late it issued each
/// frame (a frame waits for the stream's flow control, like a message for a host's reading).
async fn send_open(
    mut client: Client,
    mut dues: mpsc::UnboundedReceiver<Due>,
    dues_expected: u32,
    body: usize,
    clock: Clock,
    until: u64,
) -> anyhow::Result<(Vec<u64>, Client)> {
    let mut recv = client.recv;
    let ack_bytes = 4 * u64::from(dues_expected);
    let acks = tokio::spawn(async move {
        let mut read = 0u64;
        while read < ack_bytes
            && let Some(wait) = schedule::wait(STALL, clock, Some(until))
        {
            match tokio::time::timeout(wait, recv.read_chunk(usize::MAX, true)).await {
                Ok(Ok(Some(chunk))) => read += chunk.bytes.len() as u64,
                // The relay closes a pair's connections once both its streams are finished,
                // which may come before the end of this one is read; and what this reads
                // counts for nothing.
                Ok(Ok(None) | Err(_)) | Err(_) => break,
            }
        }
        recv
    });
    let body_len = u32::try_from(body)?;
    let mut lateness = Vec::new();
    let mut frame = Vec::with_capacity(4 + body);
    while let Some(due) = dues.recv().await {
        let body = schedule::issue(clock, due, &mut lateness, body);
        frame.clear();
        frame.extend_from_slice(&body_len.to_be_bytes());
        frame.extend_from_slice(&body);
        // A stream its reader stopped reading (its run is over) takes no more: what is left
        // counts as undelivered.
        let write = client.send.write_all(&frame);
        match tokio::time::timeout_at(clock.instant_at(until).into(), write).await {
            Ok(written) => written.context("writing a frame")?,
            Err(_) => break,
        }
    }
    client.send.finish()?;
    client.recv = acks.await.context("the acknowledgement reader failed")?;
    Ok((lateness, client))
}
