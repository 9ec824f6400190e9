//! `iim-bench store`: what the store work of the message path costs per chat message, written
//! as today (each record a separate sled write) and in rounds (issue 18, Deliver 1): one sled
//! batch per tree per round, an append-only log beside sled, or fjall (a maintained LSM engine)
//! in place of sled. No network, no plugin, no host:
//! one thread replays the store's part of N chat messages from 8 senders to 8 receivers (one
//! device each, 100-byte bodies), in the host's record shapes — keys from
//! `iim_host::store::keys`, values postcard, messages sealed with the real `Sealer`.
//!
//! Per message, in every variant: the accept (dedup look-up, dispatch record, dedup record),
//! the inbox append (time-to-live look-up, id-record look-up, expiry record, id record, entry),
//! the dispatch record's removal, the receiver's cursor, and the prune of the acknowledged
//! entry (its body dropped: the entry read, opened, re-sealed and written again; the prune
//! mark). The work goes in a pipeline of rounds of R messages, as a host that commits in
//! rounds would see it: round r accepts messages r·R.., appends and dispatches those accepted
//! in round r−1 (the plugin hands them on once they are `Accepted`), and takes the
//! acknowledgements of those appended in round r−2; then the round is made durable.
//!
//! Variants, each in a process of its own (so that sled's process-wide state — its thread
//! pool, the lock its first batch turns on — and the allocator start alike) on a fresh
//! directory; A, B, C, D, E1 and E2 at the main size, then A, A', B, C, E1 and E2 at each round
//! size of the sweep:
//!
//! - `today` (A): the host's own `iim_host::store::Store`, called as the host calls it
//!   (`Messages::accept`, `Messages::expiry`, `Inbox::append`, `Messages::dispatched`,
//!   `Cursors::set`, `Inbox::prune`), and `Store::flush` (its flusher thread: sled's `flush`,
//!   then `fsync` of sled's log) once per round.
//! - `replica` (A'): the same records written the same way by this file (one sled call per
//!   record, `fetch_and_update` for the cursor, `compare_and_swap` for the prune), flushed and
//!   synced inline: it checks that what B changes is measured against the same work.
//! - `batch` (B): the same records, gathered per tree into one `sled::Batch` per round
//!   (`messages`, `inbox`, `cursors`: three `apply_batch`), then one flush and one fsync.
//!   What a round reads of its own writes (a dedup record, a cursor, a prune mark) comes from
//!   small maps beside the batches, as it would in the host. Writes need no `compare_and_swap`:
//!   one writer owns the round. A batch is a map: the round's repeated writes of one cursor or
//!   one prune mark become one insert (C writes a record for each).
//! - `log` (C): every record of a round framed (u32 length, crc32 of the payload, the postcard
//!   record: tree, key, value or removal) into one buffer, appended to a file with one
//!   `write` and one `sync_data`; the reads the host would make (dedup, dispatch set,
//!   time-to-live, id records, expiry order, each inbox's positions → the record's place in
//!   the file, cursors, prune marks) from in-memory indexes kept as records are written, whose
//!   CPU counts. The prune reads the entry back from the file (`pread`), checks its crc and
//!   opens it. Left out: compacting the log (nothing is ever reclaimed here) and its
//!   start-up replay, which is measured apart (`replay`: the whole file read, checked and
//!   indexed again, and the result compared with the live index).
//! - `checkpoint` (D): C, plus every K rounds the index records changed since the last
//!   checkpoint (coalesced by key: an entry's final place, dedup, id, expiry, cursors, marks,
//!   the dispatch set's removals; no bodies) written to a sled database in one batch per tree,
//!   flushed and synced: what persisting the index costs, so that a start need not replay the
//!   whole log.
//! - `fjall-each` (E1) and `fjall-batch` (E2): the same records, keys and sealed values in a
//!   fjall database (an LSM tree per keyspace, one journal for all of them) whose keyspaces are
//!   named as the host's sled trees; E1 writes each record with its own `insert`/`remove`, as
//!   A', E2 gathers the round into one `OwnedWriteBatch` (atomic across the keyspaces), as B
//!   (the same maps beside it for what the round reads of its own writes). Then one
//!   `Database::persist(SyncData)` per round (an `fdatasync` of the journal): the journal's
//!   only sync, as fjall is set to leave persisting to its caller (`manual_journal_persist`) —
//!   fjall still `fsync`s the journal when it seals a memtable and its tables when it writes
//!   them, on its worker threads (not counted, as sled's own). The reads go through fjall as
//!   the host's would, but for one: the prune reads each of the user's cursors with a `get`
//!   (the devices known in memory) instead of a prefix scan, whose cost in an LSM tree grows
//!   with the versions of a cursor not yet compacted away (see `FjallPath::cursor_keys`).
//!   Settings (`fjall_open`): memtables of 16 MiB per keyspace, journals bounded to 64 MiB
//!   (fjall's least) so that a start replays little, no compression (the values are
//!   ciphertext), fjall's default worker threads (min(cores, 4)) and 32 MiB block cache. Its
//!   start-up is measured apart (`replay`): the database closed, then opened again (its
//!   journal replayed into memtables) and its records compared with the live ones. Flushes
//!   and compactions still running after the last round are not awaited.
//!
//! Left out of every variant alike: the account check of an append (a sled read that stays in
//! sled whatever the message path becomes), sled's id generator (a counter here: it is an
//! atomic add), the expiry sweep, backlog reads, and several threads writing at once (one
//! thread drives here; in the host, sessions and plugin lanes contend on sled's leaves).
//!
//! Each variant reports its process's CPU time (every thread's, sled's flusher and I/O threads
//! and the host store's flusher included: the threads' ns in `/proc/self/task/*/schedstat`, or
//! `/proc/self/stat`'s ticks of 10 ms if threads that ended took time with them), wall time,
//! the fsyncs it asked for (sled also `sync_file_range`s each log buffer it writes, and its own
//! flusher thread `fsync`s every 500 ms: not counted), and the bytes the process sent to the
//! disk (`/proc/self/io` `write_bytes`). On a 2-core machine a variant's CPU can exceed its wall
//! time: sled's threads run beside the one that drives. Afterwards each variant counts its
//! records (census): every variant must end with the same numbers, or the run fails.

use anyhow::{Context, bail};
use iim_host::store::{Acceptance, DataKeys, RESTART_GAP, Sealer, Store, keys};
use iim_proto::{Address, DeviceId, Message, MessageId, MessageKind, UserId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Senders, each with its receiver.
const PAIRS: usize = 8;
/// The device every user has.
const DEVICE: &str = "bench";
/// Body size of every message, as `iim-bench`'s chat load.
const BODY: usize = 100;
/// The first message's `sent_at`; message k's is k ms later.
const SENT_AT: u64 = 1_700_000_000_000;
/// The first byte of a pruned entry (`store::inbox`'s `PRUNED`).
const PRUNED: u8 = 0;

/// A way of writing the message path's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// A: the host's `Store` (its message log, since the store's format 3), a commit per round.
    Today,
    /// A': the sled writes of the host's store before the message log (format 2), one by one,
    /// made by this benchmark, a flush and an fsync per round.
    Replica,
    /// B: one sled batch per tree per round.
    Batch,
    /// C: an append-only log, one write and one fsync per round, indexes in memory.
    Log,
    /// D: C, and the index changes checkpointed into sled every K rounds.
    Checkpoint,
    /// E1: fjall, each record an insert or a removal, one journal sync per round.
    FjallEach,
    /// E2: fjall, one write batch per round, one journal sync per round.
    FjallBatch,
}

impl Variant {
    /// Its name in the table.
    fn label(self) -> &'static str {
        match self {
            Variant::Today => "A Store (log)",
            Variant::Replica => "A' sled, before",
            Variant::Batch => "B sled batch",
            Variant::Log => "C log",
            Variant::Checkpoint => "D log+ckpt",
            Variant::FjallEach => "E1 fjall each",
            Variant::FjallBatch => "E2 fjall batch",
        }
    }

    /// Its value on the command line.
    fn arg(self) -> &'static str {
        match self {
            Variant::Today => "today",
            Variant::Replica => "replica",
            Variant::Batch => "batch",
            Variant::Log => "log",
            Variant::Checkpoint => "checkpoint",
            Variant::FjallEach => "fjall-each",
            Variant::FjallBatch => "fjall-batch",
        }
    }

    /// Whether its database is fjall's, whose start is an opening rather than a replay.
    fn fjall(self) -> bool {
        matches!(self, Variant::FjallEach | Variant::FjallBatch)
    }
}

/// The shape of a run.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Messages of the main runs.
    pub messages: u32,
    /// Messages per round of the main runs.
    pub round: u32,
    /// Round sizes of the sweep.
    pub sweep: Vec<u32>,
    /// Messages of each sweep run.
    pub sweep_messages: u32,
    /// D: rounds between checkpoints.
    pub checkpoint: u32,
}

impl Shape {
    /// Refuses sizes that measure nothing.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.messages == 0 || self.round == 0 || self.checkpoint == 0 {
            bail!("--messages, --round and --checkpoint must be at least 1");
        }
        if self.sweep.contains(&0) {
            bail!("--sweep round sizes must be at least 1");
        }
        Ok(())
    }
}

/// The records a variant holds at the end; every variant must hold the same.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Census {
    /// Dedup records.
    pub dedup: u64,
    /// Dispatch records left (none: every message was dispatched).
    pub dispatch: u64,
    /// Inbox entries.
    pub entries: u64,
    /// Of them, pruned (all: every device acknowledged every one).
    pub pruned: u64,
    /// Inbox id records.
    pub ids: u64,
    /// Expiry records.
    pub expiry: u64,
    /// The sum of the cursors.
    pub cursors: u64,
    /// The sum of the prune marks.
    pub marks: u64,
}

/// The start-up replay of a log (C, D): the whole file read, each frame's crc checked, each
/// record decoded and indexed again. For fjall (E): the database opened again, its journal
/// replayed into memtables by fjall.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replay {
    /// C, D: records replayed. E: records written since the database was made (what its
    /// journals hold, less what fjall already flushed into tables).
    pub records: u64,
    /// C, D: the log's size. E: the database directory's disk use (journals and tables).
    pub bytes: u64,
    /// Wall time, in s.
    pub wall_secs: f64,
    /// CPU time, in s.
    pub cpu_secs: f64,
    /// Wall time per message, in µs.
    pub wall_us_per_message: f64,
}

/// One variant's run, measured in a process of its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// Which variant.
    pub variant: Variant,
    /// Messages.
    pub messages: u32,
    /// Messages per round.
    pub round: u32,
    /// Rounds made durable (two more than the messages need: the pipeline drains).
    pub rounds: u64,
    /// D: rounds between checkpoints.
    pub checkpoint_every: Option<u32>,
    /// CPU time of the process, every thread, in s.
    pub cpu_secs: f64,
    /// Where it was read: `threads` (each thread's ns), or `ticks` (10 ms) if threads that
    /// ended took time with them.
    pub cpu_clock: String,
    /// Wall time, in s.
    pub wall_secs: f64,
    /// CPU per message, in µs.
    pub cpu_us_per_message: f64,
    /// Wall time per message, in µs.
    pub wall_us_per_message: f64,
    /// Messages per second of wall time.
    pub messages_per_s: f64,
    /// fsyncs (`sync_data`) the variant asked for: one per round, and one per checkpoint.
    pub fsyncs: u64,
    /// Bytes the process sent to the disk (`/proc/self/io` `write_bytes`), per message.
    pub disk_bytes_per_message: f64,
    /// The records at the end.
    pub census: Census,
    /// C, D: the log's replay; E: the database's reopening.
    pub replay: Option<Replay>,
}

/// A row's ratios to A at the same round size.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// CPU per message over A's.
    pub cpu: f64,
    /// Wall time per message over A's.
    pub wall: f64,
}

/// A run and its ratios to A.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The run.
    #[serde(flatten)]
    pub run: Run,
    /// Over A at the same round size and messages, if A ran.
    pub to_today: Option<Ratios>,
}

/// The run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Senders (each with its receiver, one device each).
    pub pairs: usize,
    /// Body size, in bytes.
    pub body: usize,
    /// A, B, C, D, E1 and E2 at the main size.
    pub main: Vec<Row>,
    /// A, A', B, C, E1 and E2 at each round size of the sweep.
    pub sweep: Vec<Row>,
    /// Every variant ended with the same records.
    pub census_agrees: bool,
}

/// Runs every variant, each in a child process, and gathers their figures.
pub fn run(shape: &Shape, timeout: u64) -> anyhow::Result<Figures> {
    shape.check()?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut main = Vec::new();
    for variant in [
        Variant::Today,
        Variant::Replica,
        Variant::Batch,
        Variant::Log,
        Variant::Checkpoint,
        Variant::FjallEach,
        Variant::FjallBatch,
    ] {
        main.push(child(
            variant,
            shape.messages,
            shape.round,
            shape.checkpoint,
            deadline,
        )?);
    }
    let mut sweep = Vec::new();
    let sweep_rounds = if shape.sweep_messages == 0 {
        &[][..]
    } else {
        &shape.sweep[..]
    };
    for &round in sweep_rounds {
        for variant in [
            Variant::Today,
            Variant::Replica,
            Variant::Batch,
            Variant::Log,
            Variant::FjallEach,
            Variant::FjallBatch,
        ] {
            sweep.push(child(
                variant,
                shape.sweep_messages,
                round,
                shape.checkpoint,
                deadline,
            )?);
        }
    }
    let census_agrees = agrees(&main) && agrees(&sweep);
    let figures = Figures {
        pairs: PAIRS,
        body: BODY,
        main: with_ratios(main),
        sweep: with_ratios(sweep),
        census_agrees,
    };
    Ok(figures)
}

/// Whether the runs of each size ended with the same records.
fn agrees(runs: &[Run]) -> bool {
    runs.iter().all(|a| {
        runs.iter()
            .filter(|b| (b.messages, b.round) == (a.messages, a.round))
            .all(|b| b.census == a.census)
    })
}

fn with_ratios(runs: Vec<Run>) -> Vec<Row> {
    let today: Vec<Run> = runs
        .iter()
        .filter(|r| r.variant == Variant::Today)
        .cloned()
        .collect();
    runs.into_iter()
        .map(|run| {
            let to_today = today
                .iter()
                .find(|a| (a.messages, a.round) == (run.messages, run.round))
                .map(|a| Ratios {
                    cpu: run.cpu_us_per_message / a.cpu_us_per_message,
                    wall: run.wall_us_per_message / a.wall_us_per_message,
                });
            Row { run, to_today }
        })
        .collect()
}

/// Runs `variant` in a child process (`iim-bench store-variant`), killed at `deadline`.
fn child(
    variant: Variant,
    messages: u32,
    round: u32,
    checkpoint: u32,
    deadline: Instant,
) -> anyhow::Result<Run> {
    eprintln!(
        "store: {} with {messages} messages in rounds of {round}",
        variant.label()
    );
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(["store-variant", "--variant", variant.arg()])
        .args(["--messages", &messages.to_string()])
        .args(["--round", &round.to_string()])
        .args(["--checkpoint", &checkpoint.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting a variant's process")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "gave up: {} did not finish in time (--timeout)",
                variant.label()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        std::io::Read::read_to_string(&mut stdout, &mut out)?;
    }
    if !status.success() {
        bail!("{} failed ({status})", variant.label());
    }
    let run: Run = serde_json::from_str(out.trim())
        .with_context(|| format!("{}'s figures do not read: {out}", variant.label()))?;
    eprintln!(
        "store: {}: {:.1} µs CPU, {:.1} µs wall per message",
        variant.label(),
        run.cpu_us_per_message,
        run.wall_us_per_message
    );
    Ok(run)
}

/// Prints the figures as tables.
pub fn print(f: &Figures) {
    let Some(first) = f.main.first() else {
        return;
    };
    println!(
        "store work of {} chat messages, {} senders -> {} receivers (one device each), {}-byte \
         bodies sealed; rounds of {}; each variant in a fresh process and directory",
        first.run.messages, f.pairs, f.pairs, f.body, first.run.round
    );
    print_rows(&f.main);
    for row in &f.main {
        if let Some(replay) = &row.run.replay
            && row.run.variant.fjall()
        {
            println!(
                "{}: reopening at start ({} records written, {:.1} MiB on disk): {:.0} ms wall, \
                 {:.0} ms CPU, {:.2} µs per message",
                row.run.variant.label(),
                replay.records,
                replay.bytes as f64 / (1024.0 * 1024.0),
                replay.wall_secs * 1e3,
                replay.cpu_secs * 1e3,
                replay.wall_us_per_message
            );
        } else if let Some(replay) = &row.run.replay {
            println!(
                "{}: replaying its log at start ({} records, {:.1} MiB): {:.0} ms wall, {:.0} ms \
                 CPU, {:.2} µs per message",
                row.run.variant.label(),
                replay.records,
                replay.bytes as f64 / (1024.0 * 1024.0),
                replay.wall_secs * 1e3,
                replay.cpu_secs * 1e3,
                replay.wall_us_per_message
            );
        }
    }
    if let Some(ckpt) = f.main.iter().find_map(|r| r.run.checkpoint_every) {
        println!("D checkpoints the index every {ckpt} rounds");
    }
    if f.main.iter().chain(&f.sweep).any(|r| r.run.variant.fjall()) {
        println!(
            "E: fjall, memtables of {} MiB per keyspace, journals of at most {} MiB, no \
             compression, the journal's sync left to the round's persist (SyncData)",
            FJALL_MEMTABLE >> 20,
            FJALL_JOURNALS >> 20
        );
    }
    if let Some(first) = f.sweep.first() {
        println!();
        println!("round sizes: {} messages each", first.run.messages);
        print_rows(&f.sweep);
    }
    if f.main
        .iter()
        .chain(&f.sweep)
        .any(|r| r.run.cpu_clock == "ticks")
    {
        println!("* CPU read in clock ticks (10 ms): threads that ended took time with them");
    }
    println!();
    println!(
        "census (every variant ended with the same records): {}",
        if f.census_agrees { "yes" } else { "NO" }
    );
    if let Some(row) = f.main.first() {
        let c = &row.run.census;
        println!(
            "  dedup {} dispatch {} entries {} (pruned {}) ids {} expiry {}",
            c.dedup, c.dispatch, c.entries, c.pruned, c.ids, c.expiry
        );
    }
}

fn print_rows(rows: &[Row]) {
    println!(
        "{:<16} {:>5} {:>11} {:>12} {:>10} {:>7} {:>11} {:>7} {:>7}",
        "variant",
        "round",
        "CPU µs/msg",
        "wall µs/msg",
        "msgs/s",
        "fsyncs",
        "disk B/msg",
        "CPU/A",
        "wall/A"
    );
    for row in rows {
        let r = &row.run;
        let (cpu, wall) = match &row.to_today {
            Some(ratios) => (format!("{:.3}", ratios.cpu), format!("{:.3}", ratios.wall)),
            None => ("-".into(), "-".into()),
        };
        let clock = if r.cpu_clock == "ticks" { "*" } else { "" };
        println!(
            "{:<16} {:>5} {:>11} {:>12.2} {:>10.0} {:>7} {:>11.0} {:>7} {:>7}",
            r.variant.label(),
            r.round,
            format!("{clock}{:.2}", r.cpu_us_per_message),
            r.wall_us_per_message,
            r.messages_per_s,
            r.fsyncs,
            r.disk_bytes_per_message,
            cpu,
            wall
        );
    }
}

// ---- one variant, in its own process ----

/// Measures one variant (the hidden `store-variant` command): its figures as one JSON line.
pub fn measure(
    variant: Variant,
    messages: u32,
    round: u32,
    checkpoint: u32,
) -> anyhow::Result<Run> {
    if messages == 0 || round == 0 || checkpoint == 0 {
        bail!("--messages, --round and --checkpoint must be at least 1");
    }
    let dir = tempfile::tempdir()?;
    let keys = DataKeys::create(&dir.path().join("data.key"), SENT_AT)?;
    let sealer = Sealer::new(keys);
    let load = Load::new()?;
    let ttl = iim_host::config::Limits::default()
        .message_ttl()
        .map_or(u64::MAX, |d| d.as_millis() as u64);
    let path = dir.path().join("store");
    let mut backend: Box<dyn Backend> = match variant {
        Variant::Today => Box::new(HostStore::open(&path, sealer.clone(), ttl)?),
        Variant::Replica => Box::new(SledPath::open(&path, sealer.clone(), ttl, false)?),
        Variant::Batch => Box::new(SledPath::open(&path, sealer.clone(), ttl, true)?),
        Variant::Log => Box::new(LogPath::open(dir.path(), sealer.clone(), ttl, None)?),
        Variant::Checkpoint => Box::new(LogPath::open(
            dir.path(),
            sealer.clone(),
            ttl,
            Some(checkpoint),
        )?),
        Variant::FjallEach => Box::new(FjallPath::open(&path, sealer.clone(), ttl, false)?),
        Variant::FjallBatch => Box::new(FjallPath::open(&path, sealer.clone(), ttl, true)?),
    };
    // Each receiver's device takes deliveries: it has a cursor (`cmd::fetch` adds it).
    backend.prepare(&load)?;

    let (cpu, disk, started) = (Cpu::now()?, disk_write_bytes()?, Instant::now());
    let rounds = drive(backend.as_mut(), &load, messages, round)?;
    backend.finish()?;
    let wall_secs = started.elapsed().as_secs_f64();
    let (cpu_secs, cpu_clock) = cpu.since()?;
    let disk = disk_write_bytes()?.saturating_sub(disk);

    let fsyncs = backend.fsyncs();
    let replay = backend.replay(messages)?;
    let census = backend.census(&sealer)?;
    let n = f64::from(messages);
    Ok(Run {
        variant,
        messages,
        round,
        rounds,
        checkpoint_every: (variant == Variant::Checkpoint).then_some(checkpoint),
        cpu_secs,
        cpu_clock: cpu_clock.into(),
        wall_secs,
        cpu_us_per_message: cpu_secs * 1e6 / n,
        wall_us_per_message: wall_secs * 1e6 / n,
        messages_per_s: n / wall_secs,
        fsyncs,
        disk_bytes_per_message: disk as f64 / n,
        census,
        replay,
    })
}

/// The CPU time of this process's threads: each live thread's time on a CPU, in ns
/// (`/proc/self/task/*/schedstat`), and the whole process's in clock ticks (`/proc/self/stat`
/// utime + stime: 10 ms each, but threads that ended are in it).
struct Cpu {
    threads: HashMap<String, u64>,
    ticks: f64,
}

impl Cpu {
    fn now() -> anyhow::Result<Self> {
        let mut threads = HashMap::new();
        for task in std::fs::read_dir("/proc/self/task")? {
            let task = task?;
            // A thread may end between the listing and the reading.
            let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
                continue;
            };
            let ns = stat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse().ok())
                .context("a schedstat without the time on a CPU")?;
            threads.insert(task.file_name().to_string_lossy().into_owned(), ns);
        }
        Ok(Self {
            threads,
            ticks: cpu_ticks_secs()?,
        })
    }

    /// The CPU time since `self`, in s, and the clock it was read from: the threads' ns,
    /// unless threads ended meanwhile taking more than 30 ms with them (sled's I/O pool lets
    /// idle threads go), then the ticks.
    fn since(&self) -> anyhow::Result<(f64, &'static str)> {
        let now = Self::now()?;
        let ns: u64 = now
            .threads
            .iter()
            .map(|(tid, &ns)| ns.saturating_sub(self.threads.get(tid).copied().unwrap_or(0)))
            .sum();
        let precise = ns as f64 / 1e9;
        let ticks = now.ticks - self.ticks;
        Ok(if ticks > precise + 0.03 {
            (ticks, "ticks")
        } else {
            (precise, "threads")
        })
    }
}

/// The CPU time this process has used, every thread (also those that ended), in s, to 10 ms.
fn cpu_ticks_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The command's name, in parentheses, may hold spaces: count fields after it. utime and
    // stime are the stat's 14th and 15th fields, the 12th and 13th after the name.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("/proc/self/stat does not read")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("/proc/self/stat has no CPU times")
    };
    // USER_HZ is 100 on every Linux ABI.
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// The bytes this process has sent to the disk so far (`write_bytes` of `/proc/self/io`).
fn disk_write_bytes() -> anyhow::Result<u64> {
    let io = std::fs::read_to_string("/proc/self/io")?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .context("no write_bytes in /proc/self/io")
}

/// The users and the messages.
struct Load {
    senders: Vec<UserId>,
    receivers: Vec<UserId>,
    device: DeviceId,
}

impl Load {
    fn new() -> anyhow::Result<Self> {
        let users = |side: &str| -> anyhow::Result<Vec<UserId>> {
            (0..PAIRS)
                .map(|i| Ok(UserId::new(format!("iim-{side}{i}"))?))
                .collect()
        };
        Ok(Self {
            senders: users("s")?,
            receivers: users("r")?,
            device: DeviceId::new(DEVICE)?,
        })
    }

    /// Message `k` with id `id`: from sender k mod 8 to its receiver.
    fn message(&self, k: u32, id: MessageId) -> Message {
        let pair = k as usize % PAIRS;
        Message {
            id,
            kind: MessageKind::Chat,
            from: self.senders[pair].clone(),
            from_device: self.device.clone(),
            to: vec![Address::User(self.receivers[pair].clone())],
            body: crate::stats::body(BODY, u64::from(k), k),
            sent_at: SENT_AT + u64::from(k),
        }
    }
}

/// One way of writing the message path's records.
trait Backend {
    /// Gives each receiver's device its cursor, unmeasured.
    fn prepare(&mut self, load: &Load) -> anyhow::Result<()>;
    /// Stores a new submission (`client_id` never seen before) and returns its message.
    fn accept(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        client_id: u64,
        build: &dyn Fn(MessageId) -> Message,
    ) -> anyhow::Result<Message>;
    /// Appends `message` to `user`'s inbox (its time to live looked up first); its position.
    fn append(&mut self, user: &UserId, message: &Message) -> anyhow::Result<u64>;
    /// The message is in every inbox: its dispatch record goes.
    fn dispatched(&mut self, id: MessageId) -> anyhow::Result<()>;
    /// `device` acknowledged up to `seq`: its cursor, then the prune.
    fn ack(&mut self, user: &UserId, device: &DeviceId, seq: u64) -> anyhow::Result<()>;
    /// Makes the round durable.
    fn commit(&mut self) -> anyhow::Result<()>;
    /// After the last round, still measured: D's last checkpoint.
    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    /// fsyncs asked for since `prepare`.
    fn fsyncs(&self) -> u64;
    /// C, D: the log's start-up replay; E: the database's reopening.
    fn replay(&mut self, messages: u32) -> anyhow::Result<Option<Replay>>;
    /// The records at the end.
    fn census(self: Box<Self>, sealer: &Sealer) -> anyhow::Result<Census>;
}

/// Runs the pipeline of rounds; returns how many rounds were made durable.
fn drive(backend: &mut dyn Backend, load: &Load, messages: u32, round: u32) -> anyhow::Result<u64> {
    let batches = messages.div_ceil(round);
    // Round r−1's accepted messages, and round r−2's appended positions (pair, seq).
    let mut accepted: Vec<(usize, Message)> = Vec::new();
    let mut appended: Vec<(usize, u64)> = Vec::new();
    let mut rounds = 0;
    for r in 0..batches + 2 {
        let acks = std::mem::take(&mut appended);
        let to_append = std::mem::take(&mut accepted);
        let start = r.saturating_mul(round).min(messages);
        let end = start.saturating_add(round).min(messages);
        for k in start..end {
            let pair = k as usize % PAIRS;
            let client_id = u64::from(k) / PAIRS as u64 + 1;
            let build = |id| load.message(k, id);
            let message = backend.accept(&load.senders[pair], &load.device, client_id, &build)?;
            accepted.push((pair, message));
        }
        for (pair, message) in to_append {
            let seq = backend.append(&load.receivers[pair], &message)?;
            backend.dispatched(message.id)?;
            appended.push((pair, seq));
        }
        for (pair, seq) in acks {
            backend.ack(&load.receivers[pair], &load.device, seq)?;
        }
        backend.commit()?;
        rounds += 1;
    }
    Ok(rounds)
}

/// A dispatch record's value before sealing: the host's `store::messages::Dispatch`, whose
/// postcard bytes these are (a struct is its fields in order).
#[derive(Serialize)]
struct Dispatch<'a> {
    client_id: Option<u64>,
    message: &'a Message,
}

fn encode<T: Serialize>(value: &T) -> anyhow::Result<Vec<u8>> {
    Ok(postcard::to_stdvec(value)?)
}

fn u64_of(bytes: &[u8]) -> anyhow::Result<u64> {
    let raw: [u8; 8] = bytes.try_into().context("a stored number is not 8 bytes")?;
    Ok(u64::from_be_bytes(raw))
}

/// An entry's value once every device acknowledged it: the message without its body.
fn pruned_entry(plain: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
    if plain.first() == Some(&PRUNED) {
        return Ok(None);
    }
    let message: Message = postcard::from_bytes(plain)?;
    let mut bytes = vec![PRUNED];
    bytes.extend(encode(&Message {
        body: Vec::new(),
        ..message
    })?);
    Ok(Some(bytes))
}

// ---- A: the host's store ----

/// The host's own `Store`.
struct HostStore {
    store: Option<Store>,
    path: PathBuf,
    runtime: tokio::runtime::Runtime,
    ttl: u64,
    fsyncs: u64,
}

impl HostStore {
    fn open(path: &Path, sealer: Sealer, ttl: u64) -> anyhow::Result<Self> {
        Ok(Self {
            store: Some(Store::open_with(path, sealer)?),
            path: path.to_owned(),
            runtime: tokio::runtime::Builder::new_current_thread().build()?,
            ttl,
            fsyncs: 0,
        })
    }

    fn store(&self) -> anyhow::Result<&Store> {
        self.store.as_ref().context("the store is closed")
    }
}

impl Backend for HostStore {
    fn prepare(&mut self, load: &Load) -> anyhow::Result<()> {
        for user in &load.receivers {
            self.store()?.cursors.add(user, &load.device)?;
        }
        Ok(())
    }

    fn accept(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        client_id: u64,
        build: &dyn Fn(MessageId) -> Message,
    ) -> anyhow::Result<Message> {
        match self
            .store()?
            .messages
            .accept(user, device, client_id, None, build)?
        {
            Acceptance::New(message) => Ok(message),
            Acceptance::Duplicate { id, .. } => bail!("message {id} accepted twice"),
        }
    }

    fn append(&mut self, user: &UserId, message: &Message) -> anyhow::Result<u64> {
        // As `Iim::send`: the message's own time to live, else the host's default.
        let store = self.store()?;
        let explicit = store.messages.expiry(message.id)?;
        let expires_at = explicit.unwrap_or(message.sent_at.saturating_add(self.ttl));
        store
            .inbox
            .append(user, message, Some(expires_at), |seq| seq)?
            .context("appended twice")
    }

    fn dispatched(&mut self, id: MessageId) -> anyhow::Result<()> {
        Ok(self.store()?.messages.dispatched(id)?)
    }

    fn ack(&mut self, user: &UserId, device: &DeviceId, seq: u64) -> anyhow::Result<()> {
        // As `cmd::ack::save_cursor`.
        let store = self.store()?;
        store.cursors.set(user, device, seq)?;
        store.inbox.prune(user)?;
        Ok(())
    }

    fn commit(&mut self) -> anyhow::Result<()> {
        let store = self.store.as_ref().context("the store is closed")?;
        self.runtime.block_on(store.flush())?;
        self.fsyncs += 1;
        Ok(())
    }

    fn fsyncs(&self) -> u64 {
        self.fsyncs
    }

    fn replay(&mut self, _messages: u32) -> anyhow::Result<Option<Replay>> {
        Ok(None)
    }

    fn census(mut self: Box<Self>, sealer: &Sealer) -> anyhow::Result<Census> {
        // The message path's records are in the store's message log: counted by the store,
        // opened again once it (and its flusher thread) let go, so from what reached the disk.
        drop(self.store.take());
        let until = Instant::now() + Duration::from_secs(10);
        let store = loop {
            match Store::open_with(&self.path, sealer.clone()) {
                Ok(store) => break store,
                Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e).context("opening the store again"),
            }
        };
        let counts = store.counts()?;
        Ok(Census {
            dedup: counts.dedup,
            dispatch: counts.pending,
            entries: counts.entries,
            pruned: counts.pruned,
            // The log keeps one index of ids per inbox: one per entry.
            ids: counts.entries,
            expiry: counts.expiries,
            cursors: counts.cursor_sum,
            marks: counts.prune_mark_sum,
        })
    }
}

// ---- A' and B: this benchmark's sled writes ----

/// A round's sled batches (B), and what the round reads of its own writes.
#[derive(Default)]
struct Round {
    messages: sled::Batch,
    inbox: sled::Batch,
    cursors: sled::Batch,
    /// Dedup records written this round.
    dedup: HashMap<Vec<u8>, (u64, u64)>,
    /// Cursors written this round.
    cursor: HashMap<Vec<u8>, u64>,
    /// Prune marks written this round.
    mark: HashMap<Vec<u8>, u64>,
}

/// The host's records in sled, written one by one (A') or in one batch per tree (B).
struct SledPath {
    db: sled::Db,
    messages: sled::Tree,
    inbox: sled::Tree,
    cursors: sled::Tree,
    /// sled's log, which the host's flusher fsyncs.
    log_file: File,
    sealer: Sealer,
    /// The last position of each inbox (the host's `Inbox` heads).
    heads: HashMap<UserId, u64>,
    next_id: u64,
    ttl: u64,
    fsyncs: u64,
    /// B: the round being gathered.
    round: Option<Round>,
}

impl SledPath {
    fn open(path: &Path, sealer: Sealer, ttl: u64, batched: bool) -> anyhow::Result<Self> {
        // The host's configuration: sled's defaults.
        let db = sled::Config::new().path(path).open()?;
        Ok(Self {
            messages: db.open_tree("messages")?,
            inbox: db.open_tree("inbox")?,
            cursors: db.open_tree("cursors")?,
            log_file: File::open(path.join("db")).context("sled's log file")?,
            db,
            sealer,
            heads: HashMap::new(),
            next_id: 1,
            ttl,
            fsyncs: 0,
            round: batched.then(Round::default),
        })
    }

    /// The position after `user`'s last: a new inbox starts `RESTART_GAP` above nothing.
    fn next_seq(&mut self, user: &UserId) -> u64 {
        self.heads.get(user).copied().unwrap_or(RESTART_GAP) + 1
    }
}

impl Backend for SledPath {
    fn prepare(&mut self, load: &Load) -> anyhow::Result<()> {
        for user in &load.receivers {
            self.cursors
                .insert(keys::cursor(user, &load.device), &0u64.to_be_bytes())?;
        }
        Ok(())
    }

    fn accept(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        client_id: u64,
        build: &dyn Fn(MessageId) -> Message,
    ) -> anyhow::Result<Message> {
        let dedup_key = keys::dedup(user, device, client_id);
        let seen = match &self.round {
            Some(round) => round.dedup.contains_key(&dedup_key),
            None => false,
        };
        if seen || self.messages.get(&dedup_key)?.is_some() {
            bail!("client id {client_id} accepted twice");
        }
        let message = build(MessageId(self.next_id));
        self.next_id += 1;
        let key = keys::dispatch(message.id.0);
        let dispatch = Dispatch {
            client_id: Some(client_id),
            message: &message,
        };
        let sealed = self.sealer.seal("messages", &key, encode(&dispatch)?);
        let dedup = encode(&(message.id.0, message.sent_at))?;
        match &mut self.round {
            Some(round) => {
                round.messages.insert(key, sealed);
                round.messages.insert(dedup_key.as_slice(), dedup);
                round
                    .dedup
                    .insert(dedup_key, (message.id.0, message.sent_at));
            }
            None => {
                // In this order, as `Messages::accept`.
                self.messages.insert(key, sealed)?;
                self.messages.insert(dedup_key, dedup)?;
            }
        }
        Ok(message)
    }

    fn append(&mut self, user: &UserId, message: &Message) -> anyhow::Result<u64> {
        let id = message.id.0;
        let explicit = self
            .messages
            .get(keys::ttl(id))?
            .map(|v| u64_of(&v))
            .transpose()?;
        let expires_at = explicit.unwrap_or(message.sent_at.saturating_add(self.ttl));
        let seq = self.next_seq(user);
        let id_key = keys::inbox_id(user, id);
        if self.inbox.get(&id_key)?.is_some() {
            bail!("message {id} appended twice");
        }
        let expiry_key = keys::expiry(expires_at, user, seq);
        let key = keys::inbox(user, seq);
        let sealed = self.sealer.seal("inbox", &key, encode(message)?);
        match &mut self.round {
            Some(round) => {
                round.inbox.insert(expiry_key, &id.to_be_bytes());
                round.inbox.insert(id_key, &seq.to_be_bytes());
                round.inbox.insert(key, sealed);
            }
            None => {
                // In this order, as `Inbox::append_at`.
                self.inbox.insert(expiry_key, &id.to_be_bytes())?;
                self.inbox.insert(id_key, &seq.to_be_bytes())?;
                self.inbox.insert(key, sealed)?;
            }
        }
        self.heads.insert(user.clone(), seq);
        Ok(seq)
    }

    fn dispatched(&mut self, id: MessageId) -> anyhow::Result<()> {
        let key = keys::dispatch(id.0);
        match &mut self.round {
            Some(round) => round.messages.remove(key),
            None => {
                self.messages.remove(key)?;
            }
        }
        Ok(())
    }

    fn ack(&mut self, user: &UserId, device: &DeviceId, seq: u64) -> anyhow::Result<()> {
        let cursor_key = keys::cursor(user, device);
        // The cursor, as `Cursors::set`: never moved back.
        match &mut self.round {
            Some(round) => {
                let old = match round.cursor.get(&cursor_key) {
                    Some(&old) => old,
                    None => self
                        .cursors
                        .get(&cursor_key)?
                        .map(|v| u64_of(&v))
                        .transpose()?
                        .unwrap_or(0),
                };
                let new = old.max(seq);
                round
                    .cursors
                    .insert(cursor_key.as_slice(), &new.to_be_bytes());
                round.cursor.insert(cursor_key, new);
            }
            None => {
                self.cursors.fetch_and_update(&cursor_key, |old| {
                    let old = old
                        .and_then(|v| <[u8; 8]>::try_from(v).ok())
                        .map_or(0, u64::from_be_bytes);
                    Some(old.max(seq).to_be_bytes().to_vec())
                })?;
            }
        }
        // The prune, as `Inbox::prune`: up to the lowest cursor of the user's devices.
        let mut through = None::<u64>;
        for entry in self.cursors.scan_prefix(keys::cursor_prefix(user)) {
            let (key, value) = entry?;
            let cursor = match self.round.as_ref().and_then(|r| r.cursor.get(key.as_ref())) {
                Some(&pending) => pending,
                None => u64_of(&value)?,
            };
            through = Some(through.map_or(cursor, |t| t.min(cursor)));
        }
        let Some(through) = through else {
            return Ok(());
        };
        let mark_key = keys::inbox_pruned(user);
        let from = match self.round.as_ref().and_then(|r| r.mark.get(&mark_key)) {
            Some(&pending) => pending,
            None => self
                .inbox
                .get(&mark_key)?
                .map(|v| u64_of(&v))
                .transpose()?
                .unwrap_or(0),
        };
        if through <= from {
            return Ok(());
        }
        let (start, end) = keys::inbox_range(user, from);
        let end = end.min(keys::inbox(user, through.saturating_add(1)));
        for entry in self.inbox.range(start..end) {
            let (key, value) = entry?;
            let plain = self.sealer.open("inbox", &key, &value)?;
            let Some(pruned) = pruned_entry(&plain)? else {
                continue;
            };
            let without_body = self.sealer.seal("inbox", &key, pruned);
            match &mut self.round {
                Some(round) => round.inbox.insert(key, without_body),
                None => {
                    // Unless it changed meanwhile (it expired), as the host does.
                    let _ = self
                        .inbox
                        .compare_and_swap(key, Some(value), Some(without_body))?;
                }
            }
        }
        match &mut self.round {
            Some(round) => {
                round
                    .inbox
                    .insert(mark_key.as_slice(), &through.to_be_bytes());
                round.mark.insert(mark_key, through);
            }
            None => {
                self.inbox.insert(mark_key, &through.to_be_bytes())?;
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> anyhow::Result<()> {
        if let Some(round) = self.round.take() {
            // Each batch is atomic; a crash keeps a prefix of them, in this order (the
            // dispatch and dedup records before the appends they cause).
            self.messages.apply_batch(round.messages)?;
            self.inbox.apply_batch(round.inbox)?;
            self.cursors.apply_batch(round.cursors)?;
            self.round = Some(Round::default());
        }
        // As the host's flusher: sled's flush, then an fsync of its log.
        self.db.flush()?;
        self.log_file.sync_data()?;
        self.fsyncs += 1;
        Ok(())
    }

    fn fsyncs(&self) -> u64 {
        self.fsyncs
    }

    fn replay(&mut self, _messages: u32) -> anyhow::Result<Option<Replay>> {
        Ok(None)
    }

    fn census(self: Box<Self>, sealer: &Sealer) -> anyhow::Result<Census> {
        sled_census(&self.db, sealer)
    }
}

/// The first byte of each kind of record, as `keys` writes them (its tags are its own).
struct Tags {
    dedup: u8,
    dispatch: u8,
    ttl: u8,
    entry: u8,
    id: u8,
    expiry: u8,
    mark: u8,
}

impl Tags {
    fn new() -> anyhow::Result<Self> {
        let user = UserId::new("u")?;
        let first = |key: Vec<u8>| key.first().copied().context("an empty key");
        Ok(Self {
            dedup: first(keys::dedup(&user, &DeviceId::new("d")?, 0))?,
            dispatch: first(keys::dispatch(0))?,
            ttl: first(keys::ttl(0))?,
            entry: first(keys::inbox(&user, 0))?,
            id: first(keys::inbox_id(&user, 0))?,
            expiry: first(keys::expiry(0, &user, 0))?,
            mark: first(keys::inbox_pruned(&user))?,
        })
    }
}

impl Census {
    /// Counts the record `(key, value)` of `tree` (`MESSAGES`, `INBOX`, `CURSORS`), stored in
    /// the host's layout.
    fn count(
        &mut self,
        tags: &Tags,
        sealer: &Sealer,
        tree: u8,
        key: &[u8],
        value: &[u8],
    ) -> anyhow::Result<()> {
        let tag = key.first().copied();
        match tree {
            MESSAGES if tag == Some(tags.dedup) => self.dedup += 1,
            MESSAGES if tag == Some(tags.dispatch) => self.dispatch += 1,
            INBOX if tag == Some(tags.entry) => {
                self.entries += 1;
                let plain = sealer.open("inbox", key, value)?;
                self.pruned += u64::from(plain.first() == Some(&PRUNED));
            }
            INBOX if tag == Some(tags.id) => self.ids += 1,
            INBOX if tag == Some(tags.expiry) => self.expiry += 1,
            INBOX if tag == Some(tags.mark) => self.marks += u64_of(value)?,
            CURSORS => self.cursors += u64_of(value)?,
            _ => {}
        }
        Ok(())
    }
}

/// Counts the records of a database in the host's layout.
fn sled_census(db: &sled::Db, sealer: &Sealer) -> anyhow::Result<Census> {
    let tags = Tags::new()?;
    let mut census = Census::default();
    for (tree, name) in (0u8..).zip(TREES) {
        for entry in db.open_tree(name)?.iter() {
            let (key, value) = entry?;
            census.count(&tags, sealer, tree, &key, &value)?;
        }
    }
    Ok(census)
}

// ---- C and D: an append-only log ----

/// The trees a log record belongs to.
const MESSAGES: u8 = 0;
const INBOX: u8 = 1;
const CURSORS: u8 = 2;
const TREES: [&str; 3] = ["messages", "inbox", "cursors"];

/// Bytes serialised as one length and the bytes (postcard's `serialize_bytes`), not as a
/// sequence of numbers.
struct Raw<'a>(&'a [u8]);

impl Serialize for Raw<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// A log record as written: a sled record's tree, key and value (none: removed).
#[derive(Serialize)]
struct Record<'a> {
    tree: u8,
    key: Raw<'a>,
    value: Option<Raw<'a>>,
}

/// A log record as read.
#[derive(Deserialize)]
struct Read<'a> {
    tree: u8,
    #[serde(borrow)]
    key: &'a [u8],
    #[serde(borrow)]
    value: Option<&'a [u8]>,
}

/// A frame's header: the payload's length and its crc32, little-endian u32 each.
const FRAME: usize = 8;

/// Where a record is in the log: its frame's offset and length.
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: u64,
    len: u32,
}

/// What the host would keep in memory to serve the message path's reads from a log.
#[derive(Default)]
struct Index {
    /// Dedup key → (message id, sent at).
    dedup: HashMap<Vec<u8>, (u64, u64)>,
    /// Messages recorded for dispatch → their record.
    dispatch: HashMap<u64, Slot>,
    /// Message → its own expiry (none here).
    ttl: HashMap<u64, u64>,
    /// Inbox id key → position.
    ids: HashMap<Vec<u8>, u64>,
    /// Expiry key (in expiry order) → message id.
    expiry: BTreeMap<Vec<u8>, u64>,
    /// User → position → the entry's record.
    entries: HashMap<Vec<u8>, BTreeMap<u64, Slot>>,
    /// User → prune mark.
    marks: HashMap<Vec<u8>, u64>,
    /// Cursor key (user, device) → position.
    cursors: BTreeMap<Vec<u8>, u64>,
    /// Records indexed.
    records: u64,
}

impl Index {
    /// Indexes the record `(tree, key, value)` stored at `slot`.
    fn apply(
        &mut self,
        tags: &Tags,
        tree: u8,
        key: &[u8],
        value: Option<&[u8]>,
        slot: Slot,
    ) -> anyhow::Result<()> {
        self.records += 1;
        let tag = key.first().copied();
        let number = |v: Option<&[u8]>| v.map(u64_of).transpose();
        match tree {
            MESSAGES if tag == Some(tags.dedup) => match value {
                Some(v) => {
                    self.dedup.insert(key.to_vec(), postcard::from_bytes(v)?);
                }
                None => {
                    self.dedup.remove(key);
                }
            },
            MESSAGES if tag == Some(tags.dispatch) => {
                let id = u64_of(key.get(1..9).context("a short dispatch key")?)?;
                match value {
                    Some(_) => self.dispatch.insert(id, slot),
                    None => self.dispatch.remove(&id),
                };
            }
            MESSAGES if tag == Some(tags.ttl) => {
                let id = u64_of(key.get(1..9).context("a short ttl key")?)?;
                match number(value)? {
                    Some(at) => self.ttl.insert(id, at),
                    None => self.ttl.remove(&id),
                };
            }
            INBOX if tag == Some(tags.id) => match number(value)? {
                Some(seq) => {
                    self.ids.insert(key.to_vec(), seq);
                }
                None => {
                    self.ids.remove(key);
                }
            },
            INBOX if tag == Some(tags.expiry) => match number(value)? {
                Some(id) => {
                    self.expiry.insert(key.to_vec(), id);
                }
                None => {
                    self.expiry.remove(key);
                }
            },
            INBOX if tag == Some(tags.entry) => {
                let seq = keys::inbox_seq(key).context("an entry key without a position")?;
                // Tag, user, separator, position.
                let user = key
                    .get(1..key.len().saturating_sub(9))
                    .context("a short entry key")?;
                if !self.entries.contains_key(user) {
                    self.entries.insert(user.to_vec(), BTreeMap::new());
                }
                let inbox = self.entries.get_mut(user).context("an inbox just made")?;
                match value {
                    Some(_) => inbox.insert(seq, slot),
                    None => inbox.remove(&seq),
                };
            }
            INBOX if tag == Some(tags.mark) => {
                let user = key.get(1..).context("a short mark key")?;
                match number(value)? {
                    Some(mark) => self.marks.insert(user.to_vec(), mark),
                    None => self.marks.remove(user),
                };
            }
            CURSORS => match number(value)? {
                Some(seq) => {
                    self.cursors.insert(key.to_vec(), seq);
                }
                None => {
                    self.cursors.remove(key);
                }
            },
            _ => {}
        }
        Ok(())
    }
}

/// D: the index changes since the last checkpoint, and the sled database they go to.
struct Checkpoint {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    log_file: File,
    /// Per tree: key → its index value (none: removed), the last change of each key.
    dirty: [HashMap<Vec<u8>, Option<Vec<u8>>>; 3],
    /// Rounds between checkpoints.
    every: u32,
    /// Rounds since the last one.
    rounds: u32,
}

impl Checkpoint {
    fn open(path: &Path, every: u32) -> anyhow::Result<Self> {
        let db = sled::Config::new().path(path).open()?;
        let trees = TREES
            .iter()
            .map(|name| db.open_tree(name))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            log_file: File::open(path.join("db")).context("sled's log file")?,
            trees,
            db,
            dirty: Default::default(),
            every,
            rounds: 0,
        })
    }

    /// Notes a record's index change: entries and dispatch records by their place in the log,
    /// the others (numbers) as they are.
    fn note(&mut self, tags: &Tags, tree: u8, key: &[u8], value: Option<&[u8]>, slot: Slot) {
        let tag = key.first().copied();
        let by_place = (tree == INBOX && tag == Some(tags.entry))
            || (tree == MESSAGES && tag == Some(tags.dispatch));
        let value = value.map(|v| {
            if by_place {
                let mut place = slot.offset.to_be_bytes().to_vec();
                place.extend_from_slice(&slot.len.to_be_bytes());
                place
            } else {
                v.to_vec()
            }
        });
        if let Some(dirty) = self.dirty.get_mut(usize::from(tree)) {
            dirty.insert(key.to_vec(), value);
        }
    }

    /// Writes the changes (one batch per tree) and how far into the log they go, then flushes
    /// and syncs sled.
    fn write(&mut self, log_len: u64) -> anyhow::Result<()> {
        for (dirty, tree) in self.dirty.iter_mut().zip(&self.trees) {
            let mut batch = sled::Batch::default();
            for (key, value) in dirty.drain() {
                match value {
                    Some(value) => batch.insert(key, value),
                    None => batch.remove(key),
                }
            }
            tree.apply_batch(batch)?;
        }
        self.db.insert("log-offset", &log_len.to_be_bytes())?;
        self.db.flush()?;
        self.log_file.sync_data()?;
        self.rounds = 0;
        Ok(())
    }
}

/// The host's records in an append-only log, indexed in memory (C), checkpointed (D).
struct LogPath {
    file: File,
    path: PathBuf,
    /// The file's length: where the round's buffer goes.
    len: u64,
    /// The round's frames.
    buf: Vec<u8>,
    sealer: Sealer,
    tags: Tags,
    index: Index,
    heads: HashMap<UserId, u64>,
    next_id: u64,
    ttl: u64,
    fsyncs: u64,
    checkpoint: Option<Checkpoint>,
}

impl LogPath {
    fn open(dir: &Path, sealer: Sealer, ttl: u64, checkpoint: Option<u32>) -> anyhow::Result<Self> {
        let path = dir.join("messages.log");
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let checkpoint = checkpoint
            .map(|every| Checkpoint::open(&dir.join("index"), every))
            .transpose()?;
        Ok(Self {
            file,
            path,
            len: 0,
            buf: Vec::with_capacity(1 << 20),
            sealer,
            tags: Tags::new()?,
            index: Index::default(),
            heads: HashMap::new(),
            next_id: 1,
            ttl,
            fsyncs: 0,
            checkpoint,
        })
    }

    /// Frames record `(tree, key, value)` into the round's buffer and indexes it.
    fn record(&mut self, tree: u8, key: &[u8], value: Option<&[u8]>) -> anyhow::Result<()> {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; FRAME]);
        let record = Record {
            tree,
            key: Raw(key),
            value: value.map(Raw),
        };
        let buf = postcard::to_extend(&record, std::mem::take(&mut self.buf))?;
        self.buf = buf;
        let payload = &self.buf[at + FRAME..];
        let len = u32::try_from(payload.len())?;
        let crc = crc32fast::hash(payload);
        self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        self.buf[at + 4..at + FRAME].copy_from_slice(&crc.to_le_bytes());
        let slot = Slot {
            offset: self.len + at as u64,
            len: len + FRAME as u32,
        };
        self.index.apply(&self.tags, tree, key, value, slot)?;
        if let Some(checkpoint) = &mut self.checkpoint {
            checkpoint.note(&self.tags, tree, key, value, slot);
        }
        Ok(())
    }

    /// The frame at `slot`, its crc checked: from the file, or from the round's buffer.
    fn frame(&self, slot: Slot) -> anyhow::Result<Vec<u8>> {
        let len = slot.len as usize;
        let frame = if slot.offset >= self.len {
            let at = usize::try_from(slot.offset - self.len)?;
            self.buf
                .get(at..at + len)
                .context("a slot past the buffer")?
                .to_vec()
        } else {
            let mut frame = vec![0; len];
            self.file.read_exact_at(&mut frame, slot.offset)?;
            frame
        };
        let crc = u32::from_le_bytes(frame[4..FRAME].try_into()?);
        if crc32fast::hash(&frame[FRAME..]) != crc {
            bail!("the record at {} fails its crc", slot.offset);
        }
        Ok(frame)
    }
}

impl Backend for LogPath {
    fn prepare(&mut self, load: &Load) -> anyhow::Result<()> {
        for user in &load.receivers {
            let key = keys::cursor(user, &load.device);
            self.record(CURSORS, &key, Some(&0u64.to_be_bytes()))?;
        }
        self.commit()?;
        if let Some(checkpoint) = &mut self.checkpoint {
            checkpoint.write(self.len)?;
        }
        self.fsyncs = 0;
        Ok(())
    }

    fn accept(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        client_id: u64,
        build: &dyn Fn(MessageId) -> Message,
    ) -> anyhow::Result<Message> {
        let dedup_key = keys::dedup(user, device, client_id);
        if self.index.dedup.contains_key(&dedup_key) {
            bail!("client id {client_id} accepted twice");
        }
        let message = build(MessageId(self.next_id));
        self.next_id += 1;
        let key = keys::dispatch(message.id.0);
        let dispatch = Dispatch {
            client_id: Some(client_id),
            message: &message,
        };
        let sealed = self.sealer.seal("messages", &key, encode(&dispatch)?);
        self.record(MESSAGES, &key, Some(&sealed))?;
        let dedup = encode(&(message.id.0, message.sent_at))?;
        self.record(MESSAGES, &dedup_key, Some(&dedup))?;
        Ok(message)
    }

    fn append(&mut self, user: &UserId, message: &Message) -> anyhow::Result<u64> {
        let id = message.id.0;
        let explicit = self.index.ttl.get(&id).copied();
        let expires_at = explicit.unwrap_or(message.sent_at.saturating_add(self.ttl));
        let seq = self.heads.get(user).copied().unwrap_or(RESTART_GAP) + 1;
        let id_key = keys::inbox_id(user, id);
        if self.index.ids.contains_key(&id_key) {
            bail!("message {id} appended twice");
        }
        let expiry_key = keys::expiry(expires_at, user, seq);
        self.record(INBOX, &expiry_key, Some(&id.to_be_bytes()))?;
        self.record(INBOX, &id_key, Some(&seq.to_be_bytes()))?;
        let key = keys::inbox(user, seq);
        let sealed = self.sealer.seal("inbox", &key, encode(message)?);
        self.record(INBOX, &key, Some(&sealed))?;
        self.heads.insert(user.clone(), seq);
        Ok(seq)
    }

    fn dispatched(&mut self, id: MessageId) -> anyhow::Result<()> {
        self.record(MESSAGES, &keys::dispatch(id.0), None)
    }

    fn ack(&mut self, user: &UserId, device: &DeviceId, seq: u64) -> anyhow::Result<()> {
        let cursor_key = keys::cursor(user, device);
        let old = self.index.cursors.get(&cursor_key).copied().unwrap_or(0);
        self.record(CURSORS, &cursor_key, Some(&old.max(seq).to_be_bytes()))?;
        // The prune: up to the lowest cursor of the user's devices.
        let prefix = keys::cursor_prefix(user);
        let through = self
            .index
            .cursors
            .range(prefix.clone()..)
            .take_while(|(key, _)| key.starts_with(&prefix))
            .map(|(_, &cursor)| cursor)
            .min();
        let Some(through) = through else {
            return Ok(());
        };
        let name = user.as_str().as_bytes();
        let from = self.index.marks.get(name).copied().unwrap_or(0);
        if through <= from {
            return Ok(());
        }
        let slots: Vec<(u64, Slot)> = match self.index.entries.get(name) {
            Some(inbox) => inbox
                .range(from.saturating_add(1)..=through)
                .map(|(&seq, &slot)| (seq, slot))
                .collect(),
            None => Vec::new(),
        };
        for (seq, slot) in slots {
            let frame = self.frame(slot)?;
            let read: Read = postcard::from_bytes(&frame[FRAME..])?;
            let value = read.value.context("an entry's record without a value")?;
            let key = keys::inbox(user, seq);
            let plain = self.sealer.open("inbox", &key, value)?;
            let Some(pruned) = pruned_entry(&plain)? else {
                continue;
            };
            let without_body = self.sealer.seal("inbox", &key, pruned);
            self.record(INBOX, &key, Some(&without_body))?;
        }
        self.record(
            INBOX,
            &keys::inbox_pruned(user),
            Some(&through.to_be_bytes()),
        )
    }

    fn commit(&mut self) -> anyhow::Result<()> {
        // One write and one fsync for the round.
        self.file.write_all(&self.buf)?;
        self.file.sync_data()?;
        self.fsyncs += 1;
        self.len += self.buf.len() as u64;
        self.buf.clear();
        if let Some(checkpoint) = &mut self.checkpoint {
            checkpoint.rounds += 1;
            if checkpoint.rounds >= checkpoint.every {
                checkpoint.write(self.len)?;
                self.fsyncs += 1;
            }
        }
        Ok(())
    }

    fn fsyncs(&self) -> u64 {
        self.fsyncs
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        // The last changes go into a checkpoint too: D's figures cover every message.
        if let Some(checkpoint) = &mut self.checkpoint
            && checkpoint.rounds > 0
        {
            checkpoint.write(self.len)?;
            self.fsyncs += 1;
        }
        Ok(())
    }

    fn replay(&mut self, messages: u32) -> anyhow::Result<Option<Replay>> {
        let (cpu, started) = (Cpu::now()?, Instant::now());
        let bytes = std::fs::read(&self.path)?;
        let mut index = Index::default();
        let mut at = 0usize;
        while at < bytes.len() {
            let header = bytes.get(at..at + FRAME).context("a cut-off frame")?;
            let len = u32::from_le_bytes(header[..4].try_into()?) as usize;
            let crc = u32::from_le_bytes(header[4..].try_into()?);
            let payload = bytes
                .get(at + FRAME..at + FRAME + len)
                .context("a cut-off record")?;
            if crc32fast::hash(payload) != crc {
                bail!("the record at {at} fails its crc");
            }
            let read: Read = postcard::from_bytes(payload)?;
            let slot = Slot {
                offset: at as u64,
                len: u32::try_from(FRAME + len)?,
            };
            index.apply(&self.tags, read.tree, read.key, read.value, slot)?;
            at += FRAME + len;
        }
        let wall_secs = started.elapsed().as_secs_f64();
        let (cpu_secs, _) = cpu.since()?;
        let same = index.records == self.index.records
            && index.dedup.len() == self.index.dedup.len()
            && index.dispatch.len() == self.index.dispatch.len()
            && index.ids.len() == self.index.ids.len()
            && index.expiry.len() == self.index.expiry.len()
            && index.cursors == self.index.cursors
            && index.marks == self.index.marks
            && index.entries.iter().all(|(user, inbox)| {
                self.index.entries.get(user).is_some_and(|live| {
                    live.len() == inbox.len()
                        && live
                            .iter()
                            .zip(inbox)
                            .all(|((a, x), (b, y))| a == b && x.offset == y.offset)
                })
            });
        if !same {
            bail!("the replayed index differs from the live one");
        }
        Ok(Some(Replay {
            records: index.records,
            bytes: bytes.len() as u64,
            wall_secs,
            cpu_secs,
            wall_us_per_message: wall_secs * 1e6 / f64::from(messages),
        }))
    }

    fn census(self: Box<Self>, sealer: &Sealer) -> anyhow::Result<Census> {
        let index = &self.index;
        let mut census = Census {
            dedup: index.dedup.len() as u64,
            dispatch: index.dispatch.len() as u64,
            ids: index.ids.len() as u64,
            expiry: index.expiry.len() as u64,
            cursors: index.cursors.values().sum(),
            marks: index.marks.values().sum(),
            ..Census::default()
        };
        for (user, inbox) in &index.entries {
            let user = UserId::new(std::str::from_utf8(user)?)?;
            for (&seq, &slot) in inbox {
                census.entries += 1;
                let frame = self.frame(slot)?;
                let read: Read = postcard::from_bytes(&frame[FRAME..])?;
                let value = read.value.context("an entry's record without a value")?;
                let plain = sealer.open("inbox", &keys::inbox(&user, seq), value)?;
                census.pruned += u64::from(plain.first() == Some(&PRUNED));
            }
        }
        Ok(census)
    }
}

// ---- E1 and E2: fjall ----

/// E: the largest memtable of each keyspace before fjall seals it and flushes it into a table.
/// fjall's default is 64 MiB; 16 bounds the memory of the three keyspaces (each with at most
/// four sealed memtables waiting for a flush before fjall holds writes back) and what a start
/// replays, and still holds many rounds of a busy host.
const FJALL_MEMTABLE: u64 = 16 << 20;
/// E: the journals' total size past which fjall flushes the keyspaces that hold the oldest
/// journal back (512 MiB by default, 64 MiB at least): the `cursors` keyspace, small, would
/// otherwise keep every journal until then, and a start would replay them all.
const FJALL_JOURNALS: u64 = 64 << 20;

/// Opens (or makes) a fjall database with the keyspaces `TREES`, set for the message path: the
/// caller persists the journal (once per round), nothing is compressed (the values are
/// ciphertext; keys go into tables with fjall's prefix truncation anyway).
fn fjall_open(path: &Path) -> anyhow::Result<(fjall::Database, [fjall::Keyspace; 3])> {
    let db = fjall::Database::builder(path)
        .manual_journal_persist(true)
        .journal_compression(fjall::CompressionType::None)
        .max_journaling_size(FJALL_JOURNALS)
        .open()?;
    let options = || {
        fjall::KeyspaceCreateOptions::default()
            .manual_journal_persist(true)
            .max_memtable_size(FJALL_MEMTABLE)
            .data_block_compression_policy(fjall::config::CompressionPolicy::disabled())
            .index_block_compression_policy(fjall::config::CompressionPolicy::disabled())
    };
    let [messages, inbox, cursors] = TREES;
    let trees = [
        db.keyspace(messages, options)?,
        db.keyspace(inbox, options)?,
        db.keyspace(cursors, options)?,
    ];
    Ok((db, trees))
}

/// Counts the records of a fjall database in the host's layout.
fn fjall_census(trees: &[fjall::Keyspace; 3], sealer: &Sealer) -> anyhow::Result<Census> {
    let tags = Tags::new()?;
    let mut census = Census::default();
    for (tree, keyspace) in (0u8..).zip(trees) {
        for guard in keyspace.iter() {
            let (key, value) = guard.into_inner()?;
            census.count(&tags, sealer, tree, &key, &value)?;
        }
    }
    Ok(census)
}

/// The disk space the files under `dir` take (their blocks: fjall's journal is made 64 MiB
/// long at once, most of it a hole).
fn disk_use(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        bytes += if meta.is_dir() {
            disk_use(&entry.path())?
        } else {
            meta.blocks() * 512
        };
    }
    Ok(bytes)
}

/// E2: a round's write batch, and what the round reads of its own writes (as B's `Round`).
struct FjallRound {
    batch: fjall::OwnedWriteBatch,
    /// Dedup records written this round.
    dedup: HashMap<Vec<u8>, (u64, u64)>,
    /// Cursors written this round.
    cursor: HashMap<Vec<u8>, u64>,
    /// Prune marks written this round.
    mark: HashMap<Vec<u8>, u64>,
}

impl FjallRound {
    fn new(db: &fjall::Database) -> Self {
        Self {
            batch: db.batch(),
            dedup: HashMap::new(),
            cursor: HashMap::new(),
            mark: HashMap::new(),
        }
    }
}

/// An open fjall database.
struct Fjall {
    db: fjall::Database,
    /// `messages`, `inbox`, `cursors`: indexed by `MESSAGES`, `INBOX`, `CURSORS`.
    trees: [fjall::Keyspace; 3],
    /// E2: the round being gathered (it holds the database too).
    round: Option<FjallRound>,
}

impl Fjall {
    fn insert(&mut self, tree: u8, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        let keyspace = &self.trees[usize::from(tree)];
        match &mut self.round {
            Some(round) => round.batch.insert(keyspace, key, value),
            None => keyspace.insert(key, value)?,
        }
        Ok(())
    }

    fn remove(&mut self, tree: u8, key: &[u8]) -> anyhow::Result<()> {
        let keyspace = &self.trees[usize::from(tree)];
        match &mut self.round {
            Some(round) => round.batch.remove(keyspace, key),
            None => keyspace.remove(key)?,
        }
        Ok(())
    }

    fn get(&self, tree: u8, key: &[u8]) -> anyhow::Result<Option<fjall::Slice>> {
        Ok(self.trees[usize::from(tree)].get(key)?)
    }

    /// A stored number, or none.
    fn number(&self, tree: u8, key: &[u8]) -> anyhow::Result<Option<u64>> {
        self.get(tree, key)?.map(|v| u64_of(&v)).transpose()
    }
}

/// The host's records in fjall, written one by one (E1) or in one batch per round (E2).
struct FjallPath {
    /// None while it is reopened.
    open: Option<Fjall>,
    path: PathBuf,
    sealer: Sealer,
    /// E2.
    batched: bool,
    /// The last position of each inbox (the host's `Inbox` heads).
    heads: HashMap<UserId, u64>,
    /// The cursor keys of each user's devices, known in memory (as the host knows a user's
    /// devices), so that the prune reads each cursor with a point `get`. A prefix scan of the
    /// user's cursors, as the host does in sled, walks every version of a cursor that is
    /// still in fjall's memtable (one per write, until the memtable is flushed): its cost
    /// grows with the run (measured with rounds of 256, E1: 41 µs of CPU per message at 2,500
    /// messages, 188 µs at 20,000; with these gets, 17 µs at both).
    cursor_keys: HashMap<UserId, Vec<Vec<u8>>>,
    next_id: u64,
    ttl: u64,
    fsyncs: u64,
    /// Inserts and removals made since the database was made.
    records: u64,
}

impl FjallPath {
    fn open(path: &Path, sealer: Sealer, ttl: u64, batched: bool) -> anyhow::Result<Self> {
        let (db, trees) = fjall_open(path)?;
        let round = batched.then(|| FjallRound::new(&db));
        Ok(Self {
            open: Some(Fjall { db, trees, round }),
            path: path.to_owned(),
            sealer,
            batched,
            heads: HashMap::new(),
            cursor_keys: HashMap::new(),
            next_id: 1,
            ttl,
            fsyncs: 0,
            records: 0,
        })
    }

    fn fjall(&mut self) -> anyhow::Result<&mut Fjall> {
        self.open.as_mut().context("the database is closed")
    }
}

impl Backend for FjallPath {
    fn prepare(&mut self, load: &Load) -> anyhow::Result<()> {
        let fjall = self.open.as_mut().context("the database is closed")?;
        for user in &load.receivers {
            let key = keys::cursor(user, &load.device);
            fjall.trees[usize::from(CURSORS)].insert(&key, 0u64.to_be_bytes())?;
            self.cursor_keys.entry(user.clone()).or_default().push(key);
        }
        fjall.db.persist(fjall::PersistMode::SyncData)?;
        self.records += load.receivers.len() as u64;
        Ok(())
    }

    fn accept(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        client_id: u64,
        build: &dyn Fn(MessageId) -> Message,
    ) -> anyhow::Result<Message> {
        let id = MessageId(self.next_id);
        let fjall = self.open.as_mut().context("the database is closed")?;
        let dedup_key = keys::dedup(user, device, client_id);
        let seen = match &fjall.round {
            Some(round) => round.dedup.contains_key(&dedup_key),
            None => false,
        };
        if seen || fjall.get(MESSAGES, &dedup_key)?.is_some() {
            bail!("client id {client_id} accepted twice");
        }
        let message = build(id);
        let key = keys::dispatch(message.id.0);
        let dispatch = Dispatch {
            client_id: Some(client_id),
            message: &message,
        };
        let sealed = self.sealer.seal("messages", &key, encode(&dispatch)?);
        let dedup = encode(&(message.id.0, message.sent_at))?;
        // In this order, as `Messages::accept`.
        fjall.insert(MESSAGES, &key, &sealed)?;
        fjall.insert(MESSAGES, &dedup_key, &dedup)?;
        if let Some(round) = &mut fjall.round {
            round
                .dedup
                .insert(dedup_key, (message.id.0, message.sent_at));
        }
        self.next_id += 1;
        self.records += 2;
        Ok(message)
    }

    fn append(&mut self, user: &UserId, message: &Message) -> anyhow::Result<u64> {
        let id = message.id.0;
        let seq = self.heads.get(user).copied().unwrap_or(RESTART_GAP) + 1;
        let fjall = self.open.as_mut().context("the database is closed")?;
        let explicit = fjall.number(MESSAGES, &keys::ttl(id))?;
        let expires_at = explicit.unwrap_or(message.sent_at.saturating_add(self.ttl));
        let id_key = keys::inbox_id(user, id);
        if fjall.get(INBOX, &id_key)?.is_some() {
            bail!("message {id} appended twice");
        }
        let expiry_key = keys::expiry(expires_at, user, seq);
        let key = keys::inbox(user, seq);
        let sealed = self.sealer.seal("inbox", &key, encode(message)?);
        // In this order, as `Inbox::append_at`.
        fjall.insert(INBOX, &expiry_key, &id.to_be_bytes())?;
        fjall.insert(INBOX, &id_key, &seq.to_be_bytes())?;
        fjall.insert(INBOX, &key, &sealed)?;
        self.heads.insert(user.clone(), seq);
        self.records += 3;
        Ok(seq)
    }

    fn dispatched(&mut self, id: MessageId) -> anyhow::Result<()> {
        self.fjall()?.remove(MESSAGES, &keys::dispatch(id.0))?;
        self.records += 1;
        Ok(())
    }

    fn ack(&mut self, user: &UserId, device: &DeviceId, seq: u64) -> anyhow::Result<()> {
        let fjall = self.open.as_mut().context("the database is closed")?;
        let cursor_key = keys::cursor(user, device);
        // The cursor, as `Cursors::set`: never moved back. fjall has no `fetch_and_update`
        // outside its transactions: one writer owns the round, so a read and a write.
        let pending = fjall
            .round
            .as_ref()
            .and_then(|r| r.cursor.get(&cursor_key).copied());
        let old = match pending {
            Some(old) => old,
            None => fjall.number(CURSORS, &cursor_key)?.unwrap_or(0),
        };
        let new = old.max(seq);
        fjall.insert(CURSORS, &cursor_key, &new.to_be_bytes())?;
        self.records += 1;
        if let Some(round) = &mut fjall.round {
            round.cursor.insert(cursor_key, new);
        }
        // The prune, as `Inbox::prune`: up to the lowest cursor of the user's devices, each
        // read with a `get` (not a prefix scan: see `cursor_keys`).
        let mut through = None::<u64>;
        for key in self.cursor_keys.get(user).into_iter().flatten() {
            let pending = fjall
                .round
                .as_ref()
                .and_then(|r| r.cursor.get(key).copied());
            let cursor = match pending {
                Some(pending) => pending,
                None => match fjall.number(CURSORS, key)? {
                    Some(cursor) => cursor,
                    // Forgotten meanwhile (a device revoked): the prune waits for it no more.
                    None => continue,
                },
            };
            through = Some(through.map_or(cursor, |t| t.min(cursor)));
        }
        let Some(through) = through else {
            return Ok(());
        };
        let mark_key = keys::inbox_pruned(user);
        let from = match fjall.round.as_ref().and_then(|r| r.mark.get(&mark_key)) {
            Some(&pending) => pending,
            None => fjall.number(INBOX, &mark_key)?.unwrap_or(0),
        };
        if through <= from {
            return Ok(());
        }
        let (start, end) = keys::inbox_range(user, from);
        let end = end.min(keys::inbox(user, through.saturating_add(1)));
        // Read whole before the writes (E1 writes into the keyspace it reads).
        let entries = fjall.trees[usize::from(INBOX)]
            .range(start..end)
            .map(|guard| guard.into_inner())
            .collect::<Result<Vec<_>, _>>()?;
        for (key, value) in entries {
            let plain = self.sealer.open("inbox", &key, &value)?;
            let Some(pruned) = pruned_entry(&plain)? else {
                continue;
            };
            // No compare-and-swap outside fjall's transactions: the one writer's insert.
            let without_body = self.sealer.seal("inbox", &key, pruned);
            fjall.insert(INBOX, &key, &without_body)?;
            self.records += 1;
        }
        fjall.insert(INBOX, &mark_key, &through.to_be_bytes())?;
        self.records += 1;
        if let Some(round) = &mut fjall.round {
            round.mark.insert(mark_key, through);
        }
        Ok(())
    }

    fn commit(&mut self) -> anyhow::Result<()> {
        let fjall = self.open.as_mut().context("the database is closed")?;
        if let Some(round) = fjall.round.take() {
            // Atomic across the keyspaces, in the journal's one order.
            round.batch.commit()?;
            fjall.round = Some(FjallRound::new(&fjall.db));
        }
        // The journal's buffer written out and `fdatasync`ed.
        fjall.db.persist(fjall::PersistMode::SyncData)?;
        self.fsyncs += 1;
        Ok(())
    }

    fn fsyncs(&self) -> u64 {
        self.fsyncs
    }

    fn replay(&mut self, messages: u32) -> anyhow::Result<Option<Replay>> {
        let fjall = self.open.as_ref().context("the database is closed")?;
        let live = fjall_census(&fjall.trees, &self.sealer)?;
        // Closed when its last handle goes (the keyspaces and a batch hold it too): its
        // worker threads stopped, its journal synced, its lock let go. Its memtables are not
        // flushed: the opening replays the journal as after a crash.
        drop(self.open.take());
        let (cpu, started) = (Cpu::now()?, Instant::now());
        let (db, trees) = fjall_open(&self.path)?;
        let wall_secs = started.elapsed().as_secs_f64();
        let (cpu_secs, _) = cpu.since()?;
        if fjall_census(&trees, &self.sealer)? != live {
            bail!("the reopened database holds other records than the live one");
        }
        let round = self.batched.then(|| FjallRound::new(&db));
        self.open = Some(Fjall { db, trees, round });
        Ok(Some(Replay {
            records: self.records,
            bytes: disk_use(&self.path)?,
            wall_secs,
            cpu_secs,
            wall_us_per_message: wall_secs * 1e6 / f64::from(messages),
        }))
    }

    fn census(self: Box<Self>, sealer: &Sealer) -> anyhow::Result<Census> {
        let fjall = self.open.as_ref().context("the database is closed")?;
        fjall_census(&fjall.trees, sealer)
    }
}
