//! `iim-bench`: chat throughput and end-to-end latency of a real iim host, against the same load
//! over a raw QUIC relay that stores nothing.
//!
//! N sender/receiver pairs on 127.0.0.1; each sender sends M chat messages to its receiver with
//! at most W submissions in flight; each receiver acknowledges every delivery. The iim run goes
//! through the real `iim-host` binary (durable: Accepted means flushed to disk); the raw run
//! goes through `iim-bench relay`, a separate process that pipes bytes between the two streams
//! of a pair. Both report delivered messages per second (first send to last delivery) and the
//! p50/p99 of send-to-receive latency; the ratio iim/raw compares their throughput.
//!
//! ```text
//! cargo run --release -p iim-bench -- [--pairs 8] [--messages 2000] [--window 32] [--body 100] [--json]
//! ```
//!
//! With `--encryption [ROUNDS]` (default 2) it measures the cost of encryption at rest and end
//! to end instead: the same load against a host whose store is in the clear, one whose store is
//! encrypted, and one whose store is encrypted while every sender seals each body end to end
//! and every receiver opens it (the clients' sealing and opening counted, on the same cores),
//! alternately, and the raw relay once (see `encryption.rs`).
//!
//! With `--baseline DIR [--rounds 2]` (its `--messages` default 4000) it measures this build
//! against another: the `iim-host` and chat plugin that `bash bench/baseline.sh [REV] [DIR]`
//! built at commit REV (default c1dbb36, where issue 18 started) in the worktree DIR, and this
//! workspace's, alternately (A B A B …), each round against a fresh host, then the raw relay
//! once; it prints every round, the medians, the ratio current/baseline and iim/raw of each
//! (see `baseline.rs`).
//!
//! `iim-bench open-loop [--pairs 8] [--seconds 10] [--at 0.25,0.5,0.75] [--body 100]
//! [--messages 4000] [--window 32] [--json]` measures latency under a fixed load instead: the
//! closed-loop maximum of iim and of the raw relay, then each fraction of iim's maximum offered
//! on a fixed schedule, independent of the answers, to a host and to the relay: p50, p99,
//! p99.9 and max from each message's due time, the delivered rate, and how late the load
//! generator itself was (see `open_loop.rs`).
//!
//! `iim-bench plugins [--events 20000] [--json]` measures the plugin path against a native one
//! instead (see `plugins.rs`); `iim-bench plugins --lang rust,python,js,ts,c,zig [--events 2000]
//! [--instances 8] [--json]` the plugin kits' examples against the Rust one: size, first-load
//! compile time, memory per instance, cost per event (see `kits.rs`); `iim-bench recovery [--messages 100000] [--users 10] [--json]`
//! how a host killed with that many messages waiting comes back (see `recovery.rs`);
//! `iim-bench network [--pairs 4] [--messages 2000] [--window 32] [--body 100] [--friends 1000]
//! [--json]` a network of hosts (an exchange and three hosts): the same chat load within one
//! host and across hosts, and one user's presence reaching friends on every host (see
//! `network.rs`); `iim-bench network --database [--exchanges 2] [--pairs 4] …` the network's
//! state in PostgreSQL: the cross-host load through the sled exchange and through exchanges
//! sharing one database, the relay rate the database sustains, and the time from an
//! exchange's death to the first message another relays, and with `--housekeeping SECS`
//! instead the relay tables' dead rows and size under a steady load, with PostgreSQL's
//! defaults against the schema's table settings; `iim-bench logins [--logins 10000] [--concurrency 16] [--max-growth-mib 64]
//! [--json]` password logins against a host: logins per second, and the host's resident memory
//! before and after them, failing if it grew by more than the limit or if any login failed
//! otherwise than with a `rate_limited` refusal (see `logins.rs`); `iim-bench files [--mib 100]
//! [--rounds 3] [--json]` a file uploaded and downloaded with the client library (each round a
//! new file) against a bare quinn stream carrying as many bytes up and down, in MiB/s and as
//! ratios iim/raw, and the host's resident memory before, at its peak during and after the
//! transfers, failing if a download's bytes are not the file's (see `files.rs`); `iim-bench
//! groups [--members 10000] [--online 1000] [--senders 8] [--group-size 100] [--messages 100]
//! [--json]` groups on a network of three hosts: how long one message to a group of that many
//! members takes to reach the last of its online members, and the envelopes each host takes
//! for it, then group chat against as many deliveries as 1:1 chat, with the time the set-up
//! took (see `groups.rs`); `iim-bench blob-store [--mib 64] [--rounds 3] [--json]` a file
//! through the blob store alone, encrypted at rest against kept in the clear, in MiB/s and as
//! ratios (see `blob_store.rs`); `iim-bench store [--messages 200000] [--round 256]
//! [--sweep 1,16,64,256] [--sweep-messages 2048] [--checkpoint 16] [--json]` the message path's
//! store work alone, in one process per variant: each record a separate sled write as today
//! (through the host's `Store`, and as this benchmark writes it), one sled batch per tree per
//! round, an append-only log with in-memory indexes (with and without a sled checkpoint of
//! them), and fjall (each record a write, or one write batch per round), one flush and one
//! fsync per round: CPU and wall time per message, fsyncs, disk bytes, ratios to today's, at
//! each round size (see `store.rs`); `iim-bench sessions [--clients 10000] [--json]` idle
//! sessions: that many devices (a user each) log in with their tokens, each on a QUIC
//! connection of its own kept open and idle, then get one chat message fanned out to all of
//! them: token logins per second, the host's resident memory before and after and per session
//! (issue 18's goal: at most 32 KiB), and the time from the submissions to the last device,
//! failing unless every device got it exactly once (see `sessions.rs`; its set-up registers
//! and logs in every user with a password, two hashes each: at 10,000 it needs more than the
//! default `--timeout`). Every command takes `--timeout SECS` (default 300).

mod baseline;
mod blob_store;
mod encryption;
mod files;
mod groups;
mod iim_run;
mod kits;
mod logins;
mod mobile;
mod network;
mod open_loop;
mod plugins;
mod process;
mod raw;
mod recovery;
mod rounds;
mod schedule;
mod sessions;
mod stats;
mod store;

use anyhow::bail;
use clap::{Parser, Subcommand};
use stats::{Clock, Load, Summary};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Benchmark: iim chat throughput and latency against a raw QUIC relay baseline.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The relay (used by the benchmark itself).
    #[command(subcommand)]
    command: Option<Command>,
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 8)]
    pairs: u32,
    #[command(flatten)]
    shape: Shape,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Measures the cost of encryption at rest and end to end instead: the same chat load
    /// against a host with its store in the clear, one with it encrypted, and one with it
    /// encrypted while every sender seals each body end to end with its keyring and every
    /// receiver opens and checks it (their CPU time counted: the clients share the cores with
    /// the host), alternately (A B C A B C …), this many rounds each, and the raw relay once.
    #[arg(long, value_name = "ROUNDS", num_args = 0..=1, default_missing_value = "2")]
    encryption: Option<u32>,
    /// Measures this build against a baseline instead: the `iim-host` and chat plugin that
    /// `bash bench/baseline.sh [REV] [DIR]` built in worktree DIR (A), and this workspace's
    /// (B), alternately (A B A B …), --rounds rounds each, and the raw relay once.
    #[arg(long, value_name = "DIR", conflicts_with = "encryption")]
    baseline: Option<PathBuf>,
    /// With --baseline: rounds of each build.
    #[arg(long, default_value_t = 2, requires = "baseline")]
    rounds: u32,
    /// Give up (and fail) after this many seconds.
    #[arg(long, global = true, default_value_t = 300)]
    timeout: u64,
}

/// The chat load apart from its number of pairs, whose default differs between commands.
#[derive(Debug, clap::Args)]
struct Shape {
    /// Messages each sender sends [default: 2000; 4000 with --baseline and for open-loop's
    /// maximum, issue 18's load].
    #[arg(long)]
    messages: Option<u32>,
    /// Most submissions each sender has in flight.
    #[arg(long, default_value_t = 32)]
    window: u32,
    /// Body size of every message, in bytes.
    #[arg(long, default_value_t = 100)]
    body: usize,
}

/// Messages each sender sends unless `--messages` says otherwise.
const MESSAGES: u32 = 2000;
/// The same, for the loads issue 18 sets its goals with (`--baseline`, open-loop's maximum).
const ISSUE_MESSAGES: u32 = 4000;

impl Shape {
    /// The load of `pairs` pairs of this shape, checked.
    fn load(&self, pairs: u32) -> anyhow::Result<Load> {
        self.load_or(pairs, MESSAGES)
    }

    /// [`Shape::load`], with `messages` per sender unless `--messages` says otherwise.
    fn load_or(&self, pairs: u32, messages: u32) -> anyhow::Result<Load> {
        let load = Load {
            pairs,
            messages: self.messages.unwrap_or(messages),
            window: self.window,
            body: self.body,
        };
        load.check()?;
        Ok(load)
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// The plugin path against a native one: dispatch cost per event and chat throughput.
    Plugins {
        /// Events handled per path in each measurement.
        #[arg(long, default_value_t = 20_000)]
        events: u32,
        /// Compare the plugin kits' examples instead (kits/LANG/example), these languages
        /// against the Rust one: size, first-load compile time, memory per instance, cost per
        /// event. Comma-separated: rust, python, js, ts, c, zig.
        #[arg(long, value_delimiter = ',')]
        lang: Vec<String>,
        /// With --lang: instances made of each plugin, as a host's lanes.
        #[arg(long, default_value_t = 8)]
        instances: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One language of `plugins --lang`, measured in a process of its own.
    #[command(hide = true)]
    PluginKit {
        #[arg(long)]
        lang: String,
        #[arg(long)]
        wasm: PathBuf,
        #[arg(long)]
        events: u32,
        #[arg(long)]
        instances: usize,
    },
    /// Recovery after kill -9 with many messages waiting: restart and drain times.
    Recovery {
        /// Messages waiting in inboxes at the kill.
        #[arg(long, default_value_t = 100_000)]
        messages: u32,
        /// Offline users they wait for.
        #[arg(long, default_value_t = 10)]
        users: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A network of hosts: chat within one host against chat across hosts, and a presence
    /// change reaching friends on every host.
    Network {
        /// Sender/receiver pairs of each chat run.
        #[arg(long, default_value_t = 4)]
        pairs: u32,
        #[command(flatten)]
        shape: Shape,
        /// Friends of the user whose presence fans out, spread over the three hosts.
        #[arg(long, default_value_t = 1000)]
        friends: u32,
        /// Instead: the cross-host chat through the sled exchange against the same through
        /// exchanges sharing a PostgreSQL database (a cluster the run starts), what the
        /// database sustains, and an exchange killed under traffic.
        #[arg(long)]
        database: bool,
        /// Exchanges sharing the database, with --database.
        #[arg(long, default_value_t = 2, requires = "database")]
        exchanges: usize,
        /// Instead, with --database: the relay tables under a steady load for this many
        /// seconds, with PostgreSQL's default settings, with the schema's, and with those and
        /// autovacuum waking every 10 s: dead rows and bytes at their most.
        #[arg(long, value_name = "SECS", requires = "database")]
        housekeeping: Option<u64>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Password logins: logins per second and the host's memory before and after them.
    Logins {
        /// Logins measured (each on a new connection).
        #[arg(long, default_value_t = 10_000)]
        logins: u32,
        /// Logins in flight at once; the first this many are sent together.
        #[arg(long, default_value_t = 16)]
        concurrency: u32,
        /// Most the host's resident memory may grow over the logins, in MiB.
        #[arg(long, default_value_t = 64)]
        max_growth_mib: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Files: upload and download MiB/s through a host against a bare QUIC stream, and the
    /// host's memory during the transfers.
    ///
    /// Each round uploads a new file of --mib MiB of pseudo-random bytes (its first 8 bytes
    /// changed: the host keeps files by their SHA-256) with the client library, then
    /// downloads it and compares the bytes; the upload's hashing is timed apart from its
    /// sending. Then a quinn stream in this process carries as many bytes up and down. Prints
    /// both, the ratios iim/raw, the CPU time each side used, and the host's resident memory
    /// before, at its peak during (sampled every 50 ms) and after the transfers. Fails if a
    /// download's bytes differ.
    Files {
        /// The file's size, in MiB.
        #[arg(long, default_value_t = 100)]
        mib: u64,
        /// Rounds (an upload and a download each).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The blob store's cost of encryption at rest: a file uploaded into and downloaded from
    /// `Blobs` with its sealer on, against the same store kept in the clear, in MiB/s.
    ///
    /// Each round writes a new file of --mib MiB through `Blobs::upload`, `Upload::write` (256
    /// KiB at a time) and `Upload::finish` (hash check, fsync, rename), then reads it back with
    /// `Blobs::read` and compares the bytes; rounds alternate between the two stores. Prints
    /// the medians and the ratios encrypted/clear. Fails if a read's bytes differ.
    BlobStore {
        /// The file's size, in MiB.
        #[arg(long, default_value_t = 64)]
        mib: u64,
        /// Rounds per store (an upload and a download each), after one unmeasured.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Groups on a network of three hosts: one message to a large group, and group chat
    /// against 1:1 chat.
    ///
    /// Registers --members users over hosts h1, h2, h3 and brings the first --online of them
    /// online; m0 makes #crowd of every user, and #team of the first --group-size online
    /// ones. Measures one chat message to #crowd from the submission to the last online
    /// member's device, with the envelopes each host took for it; then --senders members of
    /// #team each send --messages messages to it, and the same deliveries as 1:1 chat
    /// messages: deliveries per second, and the ratio. Prints how long each step of the
    /// set-up took. Fails if a member's device misses a message or gets one twice.
    Groups {
        /// Users, every one a member of #crowd (its owner, m0, included).
        #[arg(long, default_value_t = 10_000)]
        members: u32,
        /// Of them, online (the first ones), each on a connection of its own.
        #[arg(long, default_value_t = 1000)]
        online: u32,
        /// Members of #team sending in the throughput runs.
        #[arg(long, default_value_t = 8)]
        senders: u32,
        /// Members of #team, all online.
        #[arg(long, default_value_t = 100)]
        group_size: u32,
        /// Messages each sender sends in each throughput run.
        #[arg(long, default_value_t = 100)]
        messages: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Mobile recovery: a listening device after its address changes and after its host is
    /// killed, against a client as iim's was before it watched the network and the host's
    /// answers (keep-alive 10 s, idle timeout 30 s).
    ///
    /// Address change (a relay on loopback gives the device a new address towards the host):
    /// from the change to the next message handed over. Kill and restart at once: to the
    /// device's reconnect and to the next message. Kill, host stays down: to the device's
    /// noticing (one round per client: the old client takes the 30 s idle timeout). Clients:
    /// `before`, the `desktop` and `mobile` profiles. Fails if a message is handed over twice
    /// or out of turn.
    Mobile {
        /// Rounds of the address change and of the kill and restart, per client.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Latency under a fixed load: messages offered at fixed times, independent of the
    /// answers, through a host and through the raw relay at the same rates.
    ///
    /// First the closed-loop load (--messages per sender, --window) measures the maximum of
    /// iim and of the raw relay. Then each fraction of --at of iim's maximum is offered for
    /// --seconds, spread evenly over the senders (message k of sender s of S due at
    /// start + (k·S + s) / rate), to a fresh host and then to a fresh relay. Latency runs from
    /// each message's due time to its delivery: p50, p99, p99.9, max, with the delivered rate
    /// and how many messages this process issued late. Prints iim's p99 over raw's at each
    /// rate, and whether issue 18's goal (p99 at 50% ≤ 2× raw's, or ≤ 10 ms) is met.
    OpenLoop {
        /// Senders, each with its receiver.
        #[arg(long, default_value_t = 8)]
        pairs: u32,
        /// Seconds each open-loop run offers messages for.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Offered rates, as fractions of iim's closed-loop maximum, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [0.25, 0.5, 0.75])]
        at: Vec<f64>,
        #[command(flatten)]
        shape: Shape,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The message path's store work alone: the host's `Store` (its message log) against the
    /// separate sled writes it made before, rounds written as one sled batch per tree, a bare
    /// append-only log, and fjall (issue 18, Deliver 1).
    ///
    /// Replays, in one thread, the store work of --messages chat messages from 8 senders to
    /// 8 receivers (one device each): accept, inbox append, dispatch record removed, cursor,
    /// prune, in the host's record shapes, sealed. Variants, each in a process of its own on a
    /// fresh directory: A the host's `Store` (the message log), A' the sled writes the store
    /// made one by one before the message log (format 2), B those writes as one sled batch per
    /// tree per round, C a bare append-only log (one write per round) with its indexes in
    /// memory, D C with the index checkpointed into sled every --checkpoint rounds, E1 fjall
    /// with each record a write, E2 fjall with one write batch per round; one commit (flush
    /// and fsync) per round of --round messages. Then A, A', B, C, E1 and E2 at each round size
    /// of --sweep with --sweep-messages messages. Prints CPU and wall µs per message, msgs/s,
    /// fsyncs, disk bytes per message and ratios to A; fails if the variants do not end with
    /// the same records.
    Store {
        /// Messages of the main runs.
        #[arg(long, default_value_t = 200_000)]
        messages: u32,
        /// Messages per round (one flush and one fsync each) of the main runs.
        #[arg(long, default_value_t = 256)]
        round: u32,
        /// Round sizes of the sweep, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64, 256])]
        sweep: Vec<u32>,
        /// Messages of each sweep run (0: no sweep).
        #[arg(long, default_value_t = 2048)]
        sweep_messages: u32,
        /// D: rounds between checkpoints of the log's index into sled.
        #[arg(long, default_value_t = 16)]
        checkpoint: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Idle sessions: token logins per second, the host's memory per idle session, and one
    /// message fanned out to every device (issue 18, Deliver 4).
    ///
    /// Registers --clients users on a chat-only host (limits.max_connections raised to fit)
    /// and logs each in once with its password (one device each; two argon2id hashes a user,
    /// which the host's hashing threads bound: at 10,000 users give --timeout 1200). Then reads
    /// the host's resident memory, logs every device in with its token (`Authenticate`,
    /// receive mode), 64 at a time, each on a QUIC connection of its own that stays open and
    /// idle (500 connections per client UDP socket), and reads it again: the growth per
    /// session, against the goal of 32 KiB. Then one chat message to every user, as
    /// submissions of at most 256 recipients (the protocol's limit) all in flight: the time
    /// from the first submission to the last device. Fails unless every device got it exactly
    /// once.
    Sessions {
        /// Devices, each a user of its own, each on a connection of its own.
        #[arg(long, default_value_t = 10_000)]
        clients: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One variant of `store`, measured in a process of its own.
    #[command(hide = true)]
    StoreVariant {
        #[arg(long)]
        variant: store::Variant,
        #[arg(long)]
        messages: u32,
        #[arg(long)]
        round: u32,
        #[arg(long)]
        checkpoint: u32,
    },
    /// Runs the raw relay until standard input closes.
    #[command(hide = true)]
    Relay {
        /// UDP address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Directory to write the relay's certificate into.
        #[arg(long)]
        cert_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if cfg!(debug_assertions)
        && !matches!(
            args.command,
            Some(Command::Relay { .. } | Command::StoreVariant { .. })
        )
    {
        // CI runs the benchmarks small on the tests' debug build, for their checks (every
        // message delivered once, memory bounded), not for their figures.
        eprintln!(
            "iim-bench: a debug build: its checks hold, its figures do not say how fast iim \
             is (cargo run --release -p iim-bench)"
        );
    }
    let result = match &args.command {
        Some(Command::Relay { listen, cert_dir }) => raw::relay_main(*listen, cert_dir),
        Some(Command::Plugins {
            lang,
            events,
            instances,
            json,
        }) if !lang.is_empty() => kits::run(lang, (*events).max(1), *instances).map(|f| {
            if *json {
                println!("{}", serde_json::to_string(&f).unwrap_or_default());
            } else {
                kits::print(&f);
            }
        }),
        Some(Command::PluginKit {
            lang,
            wasm,
            events,
            instances,
        }) => kits::measure_one(lang, wasm, *events, *instances)
            .map(|f| println!("{}", serde_json::to_string(&f).unwrap_or_default())),
        Some(Command::Plugins { events, json, .. }) => plugins::run((*events).max(1)).map(|f| {
            if *json {
                println!("{}", serde_json::to_string(&f).unwrap_or_default());
            } else {
                plugins::print(&f);
            }
        }),
        Some(Command::Recovery {
            messages,
            users,
            json,
        }) => recovery_main(*messages, *users, *json, args.timeout),
        Some(Command::Network {
            database: true,
            housekeeping: Some(secs),
            json,
            ..
        }) => housekeeping_main(*secs, *json, args.timeout),
        Some(Command::Network {
            pairs,
            shape,
            database: true,
            exchanges,
            json,
            ..
        }) => network_database_main(shape, *pairs, *exchanges, *json, args.timeout),
        Some(Command::Network {
            pairs,
            shape,
            friends,
            json,
            ..
        }) => network_main(shape, *pairs, *friends, *json, args.timeout),
        Some(Command::Logins {
            logins,
            concurrency,
            max_growth_mib,
            json,
        }) => {
            let shape = logins::Shape {
                logins: *logins,
                concurrency: *concurrency,
                max_growth_mib: *max_growth_mib,
            };
            logins_main(shape, *json, args.timeout)
        }
        Some(Command::Files { mib, rounds, json }) => {
            let shape = files::Shape {
                mib: *mib,
                rounds: *rounds,
            };
            files_main(shape, *json, args.timeout)
        }
        Some(Command::BlobStore { mib, rounds, json }) => blob_store_main(*mib, *rounds, *json),
        Some(Command::Groups {
            members,
            online,
            senders,
            group_size,
            messages,
            json,
        }) => {
            let shape = groups::Shape {
                members: *members,
                online: *online,
                senders: *senders,
                group_size: *group_size,
                messages: *messages,
            };
            groups_main(shape, *json, args.timeout)
        }
        Some(Command::Mobile { rounds, json }) => {
            mobile_main((*rounds).max(1), *json, args.timeout)
        }
        Some(Command::OpenLoop {
            pairs,
            seconds,
            at,
            shape,
            json,
        }) => shape.load_or(*pairs, ISSUE_MESSAGES).and_then(|max_load| {
            let shape = open_loop::Shape {
                max_load,
                seconds: *seconds,
                at: at.clone(),
            };
            open_loop_main(shape, *json, args.timeout)
        }),
        Some(Command::Store {
            messages,
            round,
            sweep,
            sweep_messages,
            checkpoint,
            json,
        }) => {
            let shape = store::Shape {
                messages: *messages,
                round: *round,
                sweep: sweep.clone(),
                sweep_messages: *sweep_messages,
                checkpoint: *checkpoint,
            };
            store_main(&shape, *json, args.timeout)
        }
        Some(Command::Sessions { clients, json }) => sessions_main(*clients, *json, args.timeout),
        Some(Command::StoreVariant {
            variant,
            messages,
            round,
            checkpoint,
        }) => store::measure(*variant, *messages, *round, *checkpoint)
            .map(|run| println!("{}", serde_json::to_string(&run).unwrap_or_default())),
        None => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iim-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the host (before any clock starts: the first build can take minutes), then runs
/// `measure` on a fresh runtime, failing if it takes more than `timeout` seconds.
fn run_bounded<T>(
    what: &str,
    timeout: u64,
    measure: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    eprintln!("iim-bench: building iim-host");
    iim_e2e::binary("iim-host")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(timeout), measure).await });
    // Whatever is left (connections of a run that timed out) goes now, not at exit.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(result) => result,
        Err(_) => bail!("gave up: {what} did not finish within {timeout} s (--timeout)"),
    }
}

/// Runs both loads and prints the figures.
fn bench(args: &Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.baseline {
        if args.rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        let load = args.shape.load_or(args.pairs, ISSUE_MESSAGES)?;
        // Checked before the current host is built, which can take minutes.
        let build = iim_run::Build::other(dir)?;
        let figures = run_bounded(
            "the baseline benchmark",
            args.timeout,
            baseline::run(load, args.rounds, build, dir),
        )?;
        baseline::report(&load, &figures, args.json);
        return Ok(());
    }
    let load = args.shape.load(args.pairs)?;
    if let Some(rounds) = args.encryption {
        if rounds == 0 {
            bail!("--encryption takes at least 1 round");
        }
        let figures = run_bounded(
            "the encryption benchmark",
            args.timeout,
            encryption::run(load, rounds),
        )?;
        encryption::report(&load, &figures, args.json);
        return Ok(());
    }
    let (iim, raw) = run_bounded("the benchmark", args.timeout, async {
        let clock = Clock::new();
        let iim = iim_run::run(load, clock).await?;
        eprintln!("iim: done in {:.2} s", iim.secs);
        let raw = raw::run(load, clock).await?;
        eprintln!("raw: done in {:.2} s", raw.secs);
        Ok((iim, raw))
    })?;
    report(&load, &iim, &raw, args.json);
    Ok(())
}

/// Runs the open-loop measurements and prints their figures.
fn open_loop_main(shape: open_loop::Shape, json: bool, timeout: u64) -> anyhow::Result<()> {
    shape.check()?;
    schedule::tighten_timer_slack();
    let figures = run_bounded("the open-loop benchmark", timeout, open_loop::run(shape))?;
    open_loop::report(&figures, json);
    Ok(())
}

/// Runs the mobile recovery measurements and prints their figures.
fn mobile_main(rounds: u32, json: bool, timeout: u64) -> anyhow::Result<()> {
    let figures = run_bounded("the mobile run", timeout, mobile::run(rounds))?;
    if json {
        println!("{}", serde_json::to_string(&figures).unwrap_or_default());
    } else {
        mobile::print(&figures);
    }
    Ok(())
}

/// Runs the recovery measurement and prints its figures.
fn recovery_main(messages: u32, users: u32, json: bool, timeout: u64) -> anyhow::Result<()> {
    if messages == 0 || users == 0 {
        bail!("--messages and --users must be at least 1");
    }
    let figures = run_bounded("the recovery run", timeout, recovery::run(messages, users))?;
    if json {
        println!("{}", serde_json::to_string(&figures).unwrap_or_default());
    } else {
        recovery::print(&figures);
    }
    Ok(())
}

/// Runs the network measurements and prints their figures.
fn network_main(
    shape: &Shape,
    pairs: u32,
    friends: u32,
    json: bool,
    timeout: u64,
) -> anyhow::Result<()> {
    let load = shape.load(pairs)?;
    if friends == 0 {
        bail!("--friends must be at least 1");
    }
    let figures = run_bounded(
        "the network benchmark",
        timeout,
        network::run(load, friends),
    )?;
    if json {
        println!("{}", serde_json::to_string(&figures).unwrap_or_default());
    } else {
        network::print(&figures);
    }
    Ok(())
}

/// Runs the `network --database --housekeeping SECS` measurements and prints their figures.
fn housekeeping_main(secs: u64, json: bool, timeout: u64) -> anyhow::Result<()> {
    if secs == 0 {
        bail!("--housekeeping needs at least one second");
    }
    let runs = network::HOUSEKEEPING.len() as u64;
    // Each run starts a server of its own and, at the end, reads its tables whole.
    let needed = runs * (secs + 30);
    if timeout < needed {
        bail!(
            "--housekeeping {secs} runs {runs} settings of {secs} s each: give it --timeout \
             {needed} or more (now {timeout})"
        );
    }
    let runs = run_bounded("the housekeeping benchmark", timeout, async {
        let mut runs = Vec::new();
        for setting in network::HOUSEKEEPING {
            runs.push(network::housekeeping(setting, Duration::from_secs(secs)).await?);
        }
        anyhow::Ok(runs)
    })?;
    if json {
        println!("{}", serde_json::to_string(&runs).unwrap_or_default());
    } else {
        network::print_housekeeping(&runs);
    }
    Ok(())
}

/// Runs the `network --database` measurements and prints their figures.
fn network_database_main(
    shape: &Shape,
    pairs: u32,
    exchanges: usize,
    json: bool,
    timeout: u64,
) -> anyhow::Result<()> {
    let load = shape.load(pairs)?;
    if exchanges < 2 {
        bail!("--exchanges must be at least 2: one is killed under traffic");
    }
    let figures = run_bounded(
        "the network benchmark on PostgreSQL",
        timeout,
        network::run_database(load, exchanges),
    )?;
    if json {
        println!("{}", serde_json::to_string(&figures).unwrap_or_default());
    } else {
        network::print_database(&figures);
    }
    Ok(())
}

/// Runs the login measurement, prints its figures, and fails if the host's memory grew past
/// the limit or a login failed.
fn logins_main(shape: logins::Shape, json: bool, timeout: u64) -> anyhow::Result<()> {
    if shape.logins == 0 || shape.concurrency == 0 {
        bail!("--logins and --concurrency must be at least 1");
    }
    let figures = run_bounded("the login benchmark", timeout, logins::run(shape))?;
    if json {
        println!("{}", serde_json::to_string(&figures).unwrap_or_default());
    } else {
        logins::print(&figures);
    }
    figures.verdict()
}

/// Runs the idle-sessions measurement and prints its figures; a device that missed the
/// message or got it twice has failed the run already.
fn sessions_main(clients: u32, json: bool, timeout: u64) -> anyhow::Result<()> {
    if clients == 0 {
        bail!("--clients must be at least 1");
    }
    let figures = run_bounded("the sessions benchmark", timeout, sessions::run(clients))?;
    if json {
        println!("{}", serde_json::to_string(&figures).unwrap_or_default());
    } else {
        sessions::print(&figures);
    }
    Ok(())
}

/// Runs the file measurement, prints its figures, and fails if a download's bytes differ.
fn files_main(shape: files::Shape, json: bool, timeout: u64) -> anyhow::Result<()> {
    if shape.mib == 0 || shape.rounds == 0 {
        bail!("--mib and --rounds must be at least 1");
    }
    let figures = run_bounded("the file benchmark", timeout, files::run(shape))?;
    if json {
        println!("{}", serde_json::to_string(&figures).unwrap_or_default());
    } else {
        files::print(&figures);
    }
    figures.verdict()
}

/// Runs the blob store measurement and prints its figures.
fn blob_store_main(mib: u64, rounds: u32, json: bool) -> anyhow::Result<()> {
    if mib == 0 || rounds == 0 {
        bail!("--mib and --rounds must be at least 1");
    }
    let figures = blob_store::run(blob_store::Shape { mib, rounds })?;
    if json {
        println!("{}", serde_json::to_string(&figures).unwrap_or_default());
    } else {
        blob_store::print(&figures);
    }
    Ok(())
}

/// Runs the store measurements and prints their figures; fails if the variants did not end
/// with the same records.
fn store_main(shape: &store::Shape, json: bool, timeout: u64) -> anyhow::Result<()> {
    let figures = store::run(shape, timeout)?;
    if json {
        println!("{}", serde_json::to_string(&figures).unwrap_or_default());
    } else {
        store::print(&figures);
    }
    if !figures.census_agrees {
        bail!("the variants did not end with the same records");
    }
    Ok(())
}

/// Runs the groups measurements and prints their figures; a lost or repeated message has
/// failed the run already.
fn groups_main(shape: groups::Shape, json: bool, timeout: u64) -> anyhow::Result<()> {
    shape.check()?;
    let figures = run_bounded("the groups benchmark", timeout, groups::run(shape))?;
    if json {
        println!("{}", serde_json::to_string(&figures).unwrap_or_default());
    } else {
        groups::print(&figures);
    }
    Ok(())
}

/// Prints the figures as a table, or as one JSON object.
fn report(load: &Load, iim: &Summary, raw: &Summary, json: bool) {
    let ratio = iim.msgs_per_s / raw.msgs_per_s;
    if json {
        let value = serde_json::json!({
            "pairs": load.pairs,
            "messages_per_sender": load.messages,
            "window": load.window,
            "body": load.body,
            "iim": iim,
            "raw": raw,
            "ratio": ratio,
        });
        println!("{value}");
        return;
    }
    println!("{}", load.describe());
    stats::print_runs(&[("iim", iim), ("raw", raw)]);
    println!("ratio iim/raw (msgs/s): {ratio:.4}");
    if let Some(breakdown) = &iim.breakdown {
        println!("{}", breakdown.describe());
    }
}
