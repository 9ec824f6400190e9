//! Files: how fast a file goes up to a host and comes back down, against a bare QUIC stream
//! carrying as many bytes, and what the transfers cost the host in memory.
//!
//! A chat-only host (`limits.max_file` the file's size, `limits.file_quota` every round's file)
//! and one user logged in on one connection. A file of `mib` MiB of pseudo-random bytes is
//! written once. Each round changes its first 8 bytes (the host keeps files by their SHA-256,
//! and would answer the same bytes `Stored` at once), uploads it with
//! `Connection::upload_file`, downloads it with `Connection::download_file` and compares the
//! downloaded bytes with the file's.
//!
//! The client library hashes a file before sending it and takes no hash from its caller, so
//! an upload's phases are told apart by its progress reports, whose first comes once the hash
//! is known and the host answered `Ready`:
//! - *hashing*: the call to the first report (the file read and hashed, and one round trip
//!   for the request);
//! - *sending*: the first report to the call's return, i.e. every byte sent, then the host's
//!   check, fsync and rename, and its `Stored` (of which *tail*, from the last byte handed to
//!   QUIC to `Stored`, is the part after the sending).
//!
//! A download's *transfer* is the call to the report of its last byte written to `<out>.part`;
//! the *whole call* adds the client's fsync and SHA-256 check of the file and the rename.
//!
//! The baseline, measured in the same run once the host is gone: a quinn server in this
//! process, on a runtime of its own (as the host is a process of its own), with the same TLS as
//! iim (rustls, ring, TLS 1.3) and quinn's default transport settings. On one connection each
//! round a stream carries as many bytes up (the server reads it to its end, then acknowledges
//! with the count) and another as many down (the server writes them, then ends the stream),
//! from memory, without disk or hashing at either end. The ratios iim/raw compare sending with
//! the upload and transfer with the download, medians over the rounds.
//!
//! The CPU time each side used is read too (the host's threads, and this process's: the
//! client, or the raw client and server): on a machine of few cores, where client and host
//! share them, throughput follows the CPU a byte costs.
//!
//! The host's resident memory is read before the first round, sampled every 50 ms during the
//! rounds and read after them: a file is streamed through the host, so the peak should grow by
//! far less than a file.

use crate::raw;
use crate::stats::median;
use anyhow::{Context, bail};
use iim_client::proto::SessionMode;
use iim_client::proto::file::Sha256;
use iim_e2e::HostProcess;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The shape of a run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// The file's size, in MiB.
    pub mib: u64,
    /// Uploads and downloads measured, each of a new file.
    pub rounds: u32,
}

/// One round of iim.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Round {
    /// Upload: the call to the first progress report (hashing and the request), in s.
    pub hash_secs: f64,
    /// Upload: the first progress report to `Stored`, in s.
    pub send_secs: f64,
    /// Upload: the last byte handed to QUIC to `Stored`, in s (part of `send_secs`).
    pub tail_secs: f64,
    /// Upload: the whole call, in s.
    pub upload_secs: f64,
    /// Download: the call to its last byte written, in s.
    pub transfer_secs: f64,
    /// Download: the whole call, the client's fsync and SHA-256 check included, in s.
    pub download_secs: f64,
    /// The file's size over `send_secs`, in MiB/s.
    pub upload_mib_per_s: f64,
    /// The file's size over `upload_secs`, in MiB/s.
    pub upload_with_hash_mib_per_s: f64,
    /// The file's size over `transfer_secs`, in MiB/s.
    pub download_mib_per_s: f64,
    /// The file's size over `download_secs`, in MiB/s.
    pub download_with_check_mib_per_s: f64,
    /// CPU time the host used during the upload call, in s.
    pub upload_host_cpu_secs: f64,
    /// CPU time this process (the client) used during the upload call, hashing included, in s.
    pub upload_client_cpu_secs: f64,
    /// CPU time the host used during the download call, in s.
    pub download_host_cpu_secs: f64,
    /// CPU time this process (the client) used during the download call, its check
    /// included, in s.
    pub download_client_cpu_secs: f64,
    /// Whether the downloaded bytes are the uploaded ones.
    pub bytes_match: bool,
}

/// One round of the raw baseline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RawRound {
    /// Opening the upload's stream to the server's acknowledgement, in s.
    pub upload_secs: f64,
    /// Opening the download's stream to its end, in s.
    pub download_secs: f64,
    /// As many bytes as the file's over `upload_secs`, in MiB/s.
    pub upload_mib_per_s: f64,
    /// As many bytes as the file's over `download_secs`, in MiB/s.
    pub download_mib_per_s: f64,
    /// CPU time this process (client and server) used for the upload, in s.
    pub upload_cpu_secs: f64,
    /// CPU time this process (client and server) used for the download, in s.
    pub download_cpu_secs: f64,
}

/// The figures of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    /// The file's size, in MiB.
    pub mib: u64,
    /// iim, round after round.
    pub iim: Vec<Round>,
    /// The raw baseline, round after round.
    pub raw: Vec<RawRound>,
    /// Median over the rounds of [`Round::upload_mib_per_s`].
    pub upload_mib_per_s: f64,
    /// Median of [`Round::upload_with_hash_mib_per_s`].
    pub upload_with_hash_mib_per_s: f64,
    /// Median of [`Round::download_mib_per_s`].
    pub download_mib_per_s: f64,
    /// Median of [`Round::download_with_check_mib_per_s`].
    pub download_with_check_mib_per_s: f64,
    /// Median of [`RawRound::upload_mib_per_s`].
    pub raw_upload_mib_per_s: f64,
    /// Median of [`RawRound::download_mib_per_s`].
    pub raw_download_mib_per_s: f64,
    /// `upload_mib_per_s / raw_upload_mib_per_s`.
    pub upload_ratio: f64,
    /// `upload_with_hash_mib_per_s / raw_upload_mib_per_s`.
    pub upload_with_hash_ratio: f64,
    /// `download_mib_per_s / raw_download_mib_per_s`.
    pub download_ratio: f64,
    /// `download_with_check_mib_per_s / raw_download_mib_per_s`.
    pub download_with_check_ratio: f64,
    /// The host's resident memory when it started listening, in MiB.
    pub rss_start_mib: f64,
    /// Before the first round (the user logged in), in MiB.
    pub rss_before_mib: f64,
    /// The highest sample during the rounds, in MiB.
    pub rss_peak_mib: f64,
    /// After the last round, in MiB.
    pub rss_after_mib: f64,
    /// `rss_peak_mib - rss_before_mib`.
    pub peak_growth_mib: f64,
}

impl Figures {
    /// Why the run failed, if it did: a download whose bytes are not the file's.
    pub fn verdict(&self) -> anyhow::Result<()> {
        let bad: Vec<usize> = (self.iim.iter().enumerate())
            .filter(|(_, round)| !round.bytes_match)
            .map(|(i, _)| i + 1)
            .collect();
        if !bad.is_empty() {
            bail!("the bytes downloaded in round(s) {bad:?} are not the file's");
        }
        Ok(())
    }
}

const MIB: u64 = 1024 * 1024;
/// Bytes written at a time by the raw baseline: what iim's client and host read and write at
/// a time.
const CHUNK: usize = 256 * 1024;
/// How often the host's memory is sampled during the rounds.
const SAMPLE: Duration = Duration::from_millis(50);
/// The name the file is uploaded under.
const FILE_NAME: &str = "bench.bin";
const MEDIA_TYPE: &str = "application/octet-stream";
/// Raw stream kinds: the first byte of a stream to the raw server.
const RAW_UPLOAD: u8 = b'U';
const RAW_DOWNLOAD: u8 = b'D';

/// Runs the measurement: iim against a fresh host, then the raw baseline.
pub async fn run(shape: Shape) -> anyhow::Result<Figures> {
    let size = (shape.mib.checked_mul(MIB)).context("--mib is too large")?;
    let dir = tempfile::tempdir().context("making a temporary directory")?;
    let source = dir.path().join(FILE_NAME);
    {
        let source = source.clone();
        tokio::task::spawn_blocking(move || write_random(&source, size))
            .await
            .context("writing the file")??;
    }
    // Every round's file is a new one, and stays: the user's quota must hold them all.
    let quota = size
        .checked_mul(u64::from(shape.rounds))
        .context("--mib times --rounds is too large")?;
    let config = format!("[limits]\nmax_file = {size}\nfile_quota = {quota}\n");
    let host =
        tokio::task::spawn_blocking(move || HostProcess::start_chat_only_with_config(&config))
            .await
            .context("starting the host")??;
    eprintln!(
        "files: host listening on {}; {} rounds of {} MiB",
        host.addr, shape.rounds, shape.mib
    );
    let iim = measure_iim(&host, &source, dir.path(), shape).await;
    if iim.is_err() {
        crate::iim_run::print_log_tail("host", &host);
    }
    let iim = iim?;
    // The baseline runs alone, as iim did.
    drop(host);
    let raw = measure_raw(size, shape.rounds).await?;
    Ok(iim.with_raw(raw))
}

/// What the iim part found.
struct IimFigures {
    rounds: Vec<Round>,
    rss_start: f64,
    rss_before: f64,
    rss_peak: f64,
    rss_after: f64,
    mib: u64,
}

impl IimFigures {
    fn with_raw(self, raw: Vec<RawRound>) -> Figures {
        let median_of = |f: fn(&Round) -> f64| median(self.rounds.iter().map(f));
        let upload = median_of(|r| r.upload_mib_per_s);
        let upload_with_hash = median_of(|r| r.upload_with_hash_mib_per_s);
        let download = median_of(|r| r.download_mib_per_s);
        let download_with_check = median_of(|r| r.download_with_check_mib_per_s);
        let raw_upload = median(raw.iter().map(|r| r.upload_mib_per_s));
        let raw_download = median(raw.iter().map(|r| r.download_mib_per_s));
        Figures {
            mib: self.mib,
            iim: self.rounds,
            raw,
            upload_mib_per_s: upload,
            upload_with_hash_mib_per_s: upload_with_hash,
            download_mib_per_s: download,
            download_with_check_mib_per_s: download_with_check,
            raw_upload_mib_per_s: raw_upload,
            raw_download_mib_per_s: raw_download,
            upload_ratio: upload / raw_upload,
            upload_with_hash_ratio: upload_with_hash / raw_upload,
            download_ratio: download / raw_download,
            download_with_check_ratio: download_with_check / raw_download,
            rss_start_mib: self.rss_start,
            rss_before_mib: self.rss_before,
            rss_peak_mib: self.rss_peak,
            rss_after_mib: self.rss_after,
            peak_growth_mib: self.rss_peak - self.rss_before,
        }
    }
}

async fn measure_iim(
    host: &HostProcess,
    source: &Path,
    dir: &Path,
    shape: Shape,
) -> anyhow::Result<IimFigures> {
    let pid = host.pid().context("the host is not running")?;
    let rss_start = crate::process::rss_mib(pid)?;
    let user = host.register("files").await?;
    let conn = host.connect().await?;
    crate::iim_run::login(&conn, &user, "bench", SessionMode::SendOnly).await?;
    let rss_before = crate::process::rss_mib(pid)?;

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn(crate::process::peak_rss_mib(
        pid,
        SAMPLE,
        Arc::clone(&sampling),
    ));
    let rounds = async {
        let mut rounds = Vec::with_capacity(shape.rounds as usize);
        for round in 0..shape.rounds {
            let figures = iim_round(&conn, pid, source, dir, round).await?;
            eprintln!(
                "files: round {}: up {:.1} MiB/s ({:.1} with hashing), down {:.1} MiB/s \
                 ({:.1} with the check)",
                round + 1,
                figures.upload_mib_per_s,
                figures.upload_with_hash_mib_per_s,
                figures.download_mib_per_s,
                figures.download_with_check_mib_per_s
            );
            rounds.push(figures);
        }
        anyhow::Ok(rounds)
    }
    .await;
    sampling.store(false, Ordering::Relaxed);
    let rounds = rounds?;
    let rss_after = crate::process::rss_mib(pid)?;
    let rss_peak = sampler
        .await
        .context("the memory sampler failed")?
        .max(rss_after);
    conn.close().await;
    Ok(IimFigures {
        rounds,
        rss_start,
        rss_before,
        rss_peak,
        rss_after,
        mib: shape.mib,
    })
}

/// When a transfer's progress reports came: the first, and the one that said it was whole.
#[derive(Default)]
struct Reports {
    first: Option<Instant>,
    whole: Option<Instant>,
}

impl Reports {
    fn report(&mut self, done: u64, size: u64) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        if done == size {
            self.whole.get_or_insert(now);
        }
    }
}

/// Uploads a new file (the source with its first 8 bytes set to the round), downloads it and
/// compares.
async fn iim_round(
    conn: &iim_client::Connection,
    host: u32,
    source: &Path,
    dir: &Path,
    round: u32,
) -> anyhow::Result<Round> {
    {
        let source = source.to_owned();
        tokio::task::spawn_blocking(move || mark(&source, round))
            .await
            .context("changing the file")??;
    }
    let size = std::fs::metadata(source)?.len();
    let mib = size as f64 / MIB as f64;
    let host = host.to_string();
    let cpu = Cpu::now(&host)?;

    let mut up = Reports::default();
    let started = Instant::now();
    let file = conn
        .upload_file(source, MEDIA_TYPE, &mut |done, size| up.report(done, size))
        .await
        .with_context(|| format!("uploading in round {}", round + 1))?;
    let stored = Instant::now();
    let (upload_host_cpu_secs, upload_client_cpu_secs) = cpu.since(&host)?;
    if file.size != size {
        bail!("the host took {} bytes of {size}", file.size);
    }
    let sha256: Sha256 = file
        .sha256()
        .with_context(|| format!("the upload returned the file id {:?}", file.file))?;
    let hashed = up.first.context("the upload reported no progress")?;
    let sent = up
        .whole
        .context("the upload never reported its last byte")?;

    let out = dir.join(format!("download-{round}.bin"));
    let mut down = Reports::default();
    let cpu = Cpu::now(&host)?;
    let asked = Instant::now();
    let downloaded = conn
        .download_file(&sha256, &out, &mut |done, size| down.report(done, size))
        .await
        .with_context(|| format!("downloading in round {}", round + 1))?;
    let checked = Instant::now();
    let (download_host_cpu_secs, download_client_cpu_secs) = cpu.since(&host)?;
    let arrived = down
        .whole
        .context("the download never reported its last byte")?;
    let bytes_match = downloaded.size == size && {
        let (source, out) = (source.to_owned(), out.clone());
        tokio::task::spawn_blocking(move || same_bytes(&source, &out))
            .await
            .context("comparing the download")??
    };
    if !bytes_match {
        eprintln!(
            "files: round {}: the download ({}) is not the file",
            round + 1,
            out.display()
        );
    } else {
        std::fs::remove_file(&out).with_context(|| format!("removing {}", out.display()))?;
    }

    let secs = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64();
    let (send_secs, upload_secs) = (secs(hashed, stored), secs(started, stored));
    let (transfer_secs, download_secs) = (secs(asked, arrived), secs(asked, checked));
    Ok(Round {
        hash_secs: secs(started, hashed),
        send_secs,
        tail_secs: secs(sent, stored),
        upload_secs,
        transfer_secs,
        download_secs,
        upload_mib_per_s: mib / send_secs,
        upload_with_hash_mib_per_s: mib / upload_secs,
        download_mib_per_s: mib / transfer_secs,
        download_with_check_mib_per_s: mib / download_secs,
        upload_host_cpu_secs,
        upload_client_cpu_secs,
        download_host_cpu_secs,
        download_client_cpu_secs,
        bytes_match,
    })
}

/// CPU time used so far by the host and by this process (the client), in s.
struct Cpu {
    host: f64,
    client: f64,
}

impl Cpu {
    fn now(host: &str) -> anyhow::Result<Self> {
        Ok(Self {
            host: crate::process::cpu_secs(host)?,
            client: crate::process::cpu_secs("self")?,
        })
    }

    /// What the host and this process used since `self`.
    fn since(&self, host: &str) -> anyhow::Result<(f64, f64)> {
        let now = Self::now(host)?;
        Ok((now.host - self.host, now.client - self.client))
    }
}

/// Pseudo-random bytes (splitmix64): as incompressible as random ones, and the same every run.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            word.copy_from_slice(&z.to_le_bytes()[..word.len()]);
        }
    }
}

/// Writes `size` pseudo-random bytes to `path`, a MiB at a time.
fn write_random(path: &Path, size: u64) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut noise = Noise(0x1157_f11e);
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        noise.fill(&mut buf[..n]);
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(())
}

/// Makes the file at `path` a new one for round `round`: its first 8 bytes are the round's.
fn mark(path: &Path, round: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let marker = (u64::from(round) + 1).to_be_bytes();
    file.write_all_at(&marker, 0)?;
    Ok(())
}

/// Whether the files at `a` and `b` hold the same bytes, read a MiB at a time.
fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let open = |path: &Path| {
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))
    };
    let (mut a, mut b) = (open(a)?, open(b)?);
    if a.metadata()?.len() != b.metadata()?.len() {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    loop {
        let n = read_full(&mut a, &mut x)?;
        let m = read_full(&mut b, &mut y)?;
        if n != m || x[..n] != y[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Fills `buf` unless the file ends first; the bytes read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ---- the raw baseline ----

/// The raw server: a quinn endpoint in this process, on a runtime (and threads) of its own.
struct RawServer {
    addr: std::net::SocketAddr,
    cert: rustls::pki_types::CertificateDer<'static>,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl RawServer {
    fn start() -> anyhow::Result<Self> {
        let identity = raw::SelfSigned::generate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the raw server's runtime")?;
        let endpoint = {
            // The endpoint is driven by the runtime it is made in.
            let _in = runtime.enter();
            quinn::Endpoint::server(identity.config, "127.0.0.1:0".parse()?)
                .context("the raw server cannot listen")?
        };
        let addr = endpoint.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            runtime.block_on(serve(endpoint, stopped));
            runtime.shutdown_timeout(Duration::from_secs(1));
        });
        Ok(Self {
            addr,
            cert: identity.cert,
            stop,
            thread,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

async fn serve(endpoint: quinn::Endpoint, mut stopped: tokio::sync::oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(incoming).await {
                        eprintln!("files: the raw server dropped a connection: {e:#}");
                    }
                });
            }
            _ = &mut stopped => break,
        }
    }
    endpoint.close(0u32.into(), b"done");
}

async fn serve_connection(incoming: quinn::Incoming) -> anyhow::Result<()> {
    let conn = incoming.await?;
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(quinn::ConnectionError::ApplicationClosed(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        tokio::spawn(async move {
            if let Err(e) = serve_stream(send, recv).await {
                eprintln!("files: the raw server dropped a stream: {e:#}");
            }
        });
    }
}

/// A raw stream: `U` then bytes to the end, answered with their count (u64, big-endian); or
/// `D` and a count, answered with that many bytes.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let mut kind = [0u8; 1];
    recv.read_exact(&mut kind).await?;
    match kind[0] {
        RAW_UPLOAD => {
            let mut count = 0u64;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                count += chunk.bytes.len() as u64;
            }
            send.write_all(&count.to_be_bytes()).await?;
        }
        RAW_DOWNLOAD => {
            let mut count = [0u8; 8];
            recv.read_exact(&mut count).await?;
            write_bytes(&mut send, u64::from_be_bytes(count), &noise_block()).await?;
        }
        other => bail!("unknown stream kind {other}"),
    }
    send.finish()?;
    // Dropping the stream now would be fine for quinn, which sends what is left; waiting
    // keeps the task (and its connection) until the client has it all.
    let _ = send.stopped().await;
    Ok(())
}

/// A chunk of pseudo-random bytes to send again and again.
fn noise_block() -> Vec<u8> {
    let mut block = vec![0u8; CHUNK];
    Noise(0xba5e_110e).fill(&mut block);
    block
}

/// Writes `count` bytes, a chunk at a time (the chunk over and over).
async fn write_bytes(send: &mut quinn::SendStream, count: u64, block: &[u8]) -> anyhow::Result<()> {
    let mut left = count;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        send.write_all(&block[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// Runs `rounds` raw uploads and downloads of `size` bytes on one connection.
async fn measure_raw(size: u64, rounds: u32) -> anyhow::Result<Vec<RawRound>> {
    let server = RawServer::start()?;
    let result = async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(raw::client_config(std::slice::from_ref(&server.cert))?);
        let conn = endpoint.connect(server.addr, "localhost")?.await?;
        let block = noise_block();
        let mib = size as f64 / MIB as f64;
        let mut figures = Vec::with_capacity(rounds as usize);
        let cpu = || crate::process::cpu_secs("self");
        for _ in 0..rounds {
            let before = cpu()?;
            let upload_secs = raw_upload(&conn, size, &block).await?;
            let uploaded = cpu()?;
            let download_secs = raw_download(&conn, size).await?;
            let downloaded = cpu()?;
            eprintln!(
                "files: raw: up {:.1} MiB/s, down {:.1} MiB/s",
                mib / upload_secs,
                mib / download_secs
            );
            figures.push(RawRound {
                upload_secs,
                download_secs,
                upload_mib_per_s: mib / upload_secs,
                download_mib_per_s: mib / download_secs,
                upload_cpu_secs: uploaded - before,
                download_cpu_secs: downloaded - uploaded,
            });
        }
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        anyhow::Ok(figures)
    }
    .await;
    server.stop().await;
    result
}

/// Sends `size` bytes and waits for the server to have read them all; in s.
async fn raw_upload(conn: &quinn::Connection, size: u64, block: &[u8]) -> anyhow::Result<f64> {
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[RAW_UPLOAD]).await?;
    write_bytes(&mut send, size, block).await?;
    send.finish()?;
    let mut count = [0u8; 8];
    recv.read_exact(&mut count).await?;
    let secs = started.elapsed().as_secs_f64();
    let count = u64::from_be_bytes(count);
    if count != size {
        bail!("the raw server read {count} bytes of {size}");
    }
    Ok(secs)
}

/// Asks for `size` bytes and reads them to the stream's end; in s.
async fn raw_download(conn: &quinn::Connection, size: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut request = [RAW_DOWNLOAD; 9];
    request[1..].copy_from_slice(&size.to_be_bytes());
    send.write_all(&request).await?;
    send.finish()?;
    let mut count = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        count += chunk.bytes.len() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    if count != size {
        bail!("the raw server sent {count} bytes of {size}");
    }
    Ok(secs)
}

/// Prints the figures as a table.
pub fn print(f: &Figures) {
    println!(
        "files of {} MiB (pseudo-random), {} rounds, each a new file: uploaded, then downloaded",
        f.mib,
        f.iim.len()
    );
    println!(
        "round  hash s  send s  tail s  up MiB/s (w/ hash)  transfer s  check s  down MiB/s (w/ check)  bytes"
    );
    for (i, r) in f.iim.iter().enumerate() {
        println!(
            "{:>5}  {:>6.3}  {:>6.3}  {:>6.3}  {:>8.1} {:>9.1}  {:>10.3}  {:>7.3}  {:>10.1} {:>10.1}  {}",
            i + 1,
            r.hash_secs,
            r.send_secs,
            r.tail_secs,
            r.upload_mib_per_s,
            r.upload_with_hash_mib_per_s,
            r.transfer_secs,
            r.download_secs - r.transfer_secs,
            r.download_mib_per_s,
            r.download_with_check_mib_per_s,
            if r.bytes_match { "same" } else { "DIFFER" }
        );
    }
    for (i, r) in f.iim.iter().enumerate() {
        println!(
            "{:>5}  CPU s: upload host {:.3} + client {:.3} (hashing included); download host {:.3} + client {:.3} (check included)",
            i + 1,
            r.upload_host_cpu_secs,
            r.upload_client_cpu_secs,
            r.download_host_cpu_secs,
            r.download_client_cpu_secs
        );
    }
    for (i, r) in f.raw.iter().enumerate() {
        println!(
            "raw {:>1}  upload {:>6.3} s {:>8.1} MiB/s (CPU {:.3} s)   download {:>6.3} s {:>8.1} MiB/s (CPU {:.3} s)",
            i + 1,
            r.upload_secs,
            r.upload_mib_per_s,
            r.upload_cpu_secs,
            r.download_secs,
            r.download_mib_per_s,
            r.download_cpu_secs
        );
    }
    println!(
        "upload   iim {:>8.1} MiB/s ({:.1} with hashing)  raw {:>8.1} MiB/s  ratio iim/raw {:.3} ({:.3} with hashing)",
        f.upload_mib_per_s,
        f.upload_with_hash_mib_per_s,
        f.raw_upload_mib_per_s,
        f.upload_ratio,
        f.upload_with_hash_ratio
    );
    println!(
        "download iim {:>8.1} MiB/s ({:.1} with the check)  raw {:>8.1} MiB/s  ratio iim/raw {:.3} ({:.3} with the check)",
        f.download_mib_per_s,
        f.download_with_check_mib_per_s,
        f.raw_download_mib_per_s,
        f.download_ratio,
        f.download_with_check_ratio
    );
    println!(
        "host RSS at start              {:>10.1} MiB",
        f.rss_start_mib
    );
    println!(
        "host RSS before the transfers  {:>10.1} MiB",
        f.rss_before_mib
    );
    println!(
        "host RSS peak (every 50 ms)    {:>10.1} MiB",
        f.rss_peak_mib
    );
    println!(
        "host RSS after                 {:>10.1} MiB",
        f.rss_after_mib
    );
    println!(
        "peak growth                    {:>+10.1} MiB ({:.1}% of the file)",
        f.peak_growth_mib,
        100.0 * f.peak_growth_mib / f.mib as f64
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_file_differs_only_in_its_first_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_random(&a, MIB + 5).expect("write");
        write_random(&b, MIB + 5).expect("write");
        assert!(same_bytes(&a, &b).expect("compare"));
        mark(&b, 0).expect("mark");
        assert!(!same_bytes(&a, &b).expect("compare"));
        mark(&a, 0).expect("mark");
        assert!(same_bytes(&a, &b).expect("compare"));
        std::fs::write(&b, b"short").expect("write");
        assert!(!same_bytes(&a, &b).expect("compare"));
    }
}
