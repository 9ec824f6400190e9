//! A network of hosts: an exchange and hosts `h1`, `h2`, `h3`, each a real `iim-host` process
//! on loopback, measured in one run.
//!
//! - *Chat within a host and across hosts.* The load of the main benchmark (N pairs × M chat
//!   messages, W submissions in flight per sender, every delivery acknowledged) on chat-only
//!   hosts with the benchmark's raised submission rate, twice in sequence against the same
//!   network, with fresh users each time: first every user at `h1` (same host), then the
//!   senders at `h1` and the receivers spread over `h2` and `h3` (cross host: each message
//!   goes `h1` → exchange → its host, one envelope a hop, each made durable and acknowledged).
//!   The ratio cross/same compares their throughput. Each run also says how much CPU every
//!   process of the network (and this one, the clients) used per delivered message, read from
//!   `/proc` before and after it: on one machine the processes share its cores, so the
//!   cross-host rate is bounded by the sum.
//! - *Presence fan-out.* On a second network, with the default plugins (presence is one):
//!   `star` at `h1` has F contacts spread evenly over the three hosts, all online. Measured
//!   from `star`'s login request: the first and the last contact to get `star`'s presence
//!   notice, and the envelopes it took — one from `h1`, one from the exchange to each other
//!   host with contacts; any other count, or a contact without the notice, fails the run.
//!   A friend list holds at most [`MAX_RELATIONS`] users, so contacts past that number are
//!   colleagues: the presence plugin tells friends and colleagues alike.
//!
//! With `--database`, other figures, in one run:
//! - *The cross-host load on either store.* The cross-host chat run above, first through one
//!   exchange on its own store, then through `--exchanges` exchanges sharing a PostgreSQL
//!   cluster the run starts (one server, declared single-node: every commit waits for its
//!   own fsync, not a standby's). Hosts list every exchange and are all linked to the first.
//! - *What the database sustains.* Four exchanges' stores (no hosts, no QUIC) storing `905`s
//!   of two rows each as fast as they can for 5 s, each on its own connection, into a fresh
//!   cluster; then every row acknowledged, 32 at a time. And the relay tables' live and dead
//!   rows, after each run, from PostgreSQL's statistics.
//! - *One exchange's pool.* The same four writers as the links of one exchange, for 3 s on
//!   one connection (calls one at a time, as an exchange did before its pool), then for 3 s on
//!   the default pool; the ratio of the two rates.
//! - *An exchange's death.* On the PostgreSQL network, `h1` sends `h2` a message every 5 ms;
//!   the exchange that forwards to `h2` is killed (`kill -9`). The figure is the time from the
//!   kill to the first delivery after the pause it causes; every message must arrive once,
//!   in order.
//! - *Housekeeping* (`--housekeeping SECS`, instead of the above). The relay tables as a queue
//!   under a steady load, for SECS seconds in each of three settings: PostgreSQL's defaults,
//!   the schema's storage parameters for the relay tables, and those with autovacuum waking
//!   every 10 s. The figures: dead rows and bytes at their most, and the share of HOT updates.

use crate::iim_run::{self, Placement};
use crate::stats::{self, Clock, Load, Summary};
use anyhow::{Context, bail};
use iim_client::Connection;
use iim_client::proto::{MessageKind, RelationKind, SessionMode, UserId};
use iim_e2e::{HostProcess, Plugins, within};
use iim_host::cmd::relation::MAX_RELATIONS;
use iim_host::store::Sealer;
use iim_host::store::postgres::{DEFAULT_CONNECTIONS, Durability, PgExchange};
use iim_proto::peer::{Envelope, RelayRow};
use iim_proto::{DeviceId, Message, MessageId};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// The hosts of each network, `h1` first.
pub const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
/// Most clients registering, logging in or adding relations at once.
const CONCURRENCY: usize = 32;
/// Longest wait for the network to settle (hosts up, users and presence known everywhere,
/// envelopes acknowledged).
pub const WAIT: Duration = Duration::from_secs(60);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);

/// The figures of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    /// Sender/receiver pairs of each chat run.
    pub pairs: u32,
    /// Messages each sender sends.
    pub messages_per_sender: u32,
    /// Most submissions a sender has in flight.
    pub window: u32,
    /// Body size of every message, in bytes.
    pub body: usize,
    /// Every user at `h1`.
    pub same_host: Summary,
    /// Senders at `h1`, receivers at `h2` and `h3`.
    pub cross_host: Summary,
    /// Cross-host over same-host throughput.
    pub ratio: f64,
    /// CPU per delivered message of the same-host run, by process.
    pub same_host_cpu: CpuPerMessage,
    /// CPU per delivered message of the cross-host run, by process.
    pub cross_host_cpu: CpuPerMessage,
    /// The presence fan-out.
    pub presence: FanOut,
}

/// CPU time per delivered message of one chat run, µs, by process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CpuPerMessage {
    /// Hosts `h1`, `h2`, `h3`.
    pub hosts: [f64; 3],
    /// The exchange.
    pub exchange: f64,
    /// This process: the clients.
    pub clients: f64,
}

impl CpuPerMessage {
    /// Every process together.
    pub fn total(&self) -> f64 {
        self.hosts.iter().sum::<f64>() + self.exchange + self.clients
    }
}

/// CPU seconds each process of a network has used so far: `h1`, `h2`, `h3`, the exchange,
/// this process.
fn cpu_now(net: &Net) -> anyhow::Result<[f64; 5]> {
    let of = |host: &HostProcess| -> anyhow::Result<f64> {
        let pid = host
            .pid()
            .context("a process of the network is not running")?;
        crate::process::cpu_secs(&pid.to_string())
    };
    Ok([
        of(net.host(0))?,
        of(net.host(1))?,
        of(net.host(2))?,
        of(&net.exchange)?,
        crate::process::cpu_secs("self")?,
    ])
}

/// The figures of the presence fan-out.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FanOut {
    /// `star`'s contacts, all online.
    pub friends: u32,
    /// How many of them live at `h1`, `h2`, `h3`.
    pub per_host: Vec<u32>,
    /// How many of them are colleagues rather than friends (past [`MAX_RELATIONS`]).
    pub colleagues: u32,
    /// Seconds taken to register the contacts and bring them online, with their relations.
    pub setup_secs: f64,
    /// Envelopes `h1` put in its relay outbox for `star`'s notice.
    pub origin_envelopes: u64,
    /// Envelopes the exchange sent to hosts for it.
    pub exchange_envelopes: u64,
    /// From `star`'s login request to its answer (the password checked), in ms.
    pub login_ms: f64,
    /// From `star`'s login request to the first contact's notice, in ms.
    pub first_ms: f64,
    /// From `star`'s login request to the last contact's notice, in ms.
    pub last_ms: f64,
    /// From `star`'s login request to the first and the last notice at `h1`, `h2`, `h3`, in
    /// ms.
    pub per_host_ms: Vec<(f64, f64)>,
    /// CPU each process used from just before `star`'s login request until every contact
    /// had the notice, ms: `h1`, `h2`, `h3`, the exchange, this process (the clients).
    pub cpu_ms: [f64; 5],
}

/// Runs both measurements, one network after the other.
pub async fn run(load: Load, friends: u32) -> anyhow::Result<Figures> {
    let ((same_host, same_host_cpu), (cross_host, cross_host_cpu)) = chat(load).await?;
    let presence = fan_out(friends).await?;
    Ok(Figures {
        pairs: load.pairs,
        messages_per_sender: load.messages,
        window: load.window,
        body: load.body,
        same_host,
        cross_host,
        ratio: cross_host.msgs_per_s / same_host.msgs_per_s,
        same_host_cpu,
        cross_host_cpu,
        presence,
    })
}

/// Prints the figures as a table.
pub fn print(f: &Figures) {
    let load = Load {
        pairs: f.pairs,
        messages: f.messages_per_sender,
        window: f.window,
        body: f.body,
    };
    println!("network: an exchange and hosts h1, h2, h3, each a process");
    println!("chat: {}; senders at h1", load.describe());
    stats::print_runs(&[("same-host", &f.same_host), ("cross-host", &f.cross_host)]);
    println!("ratio cross/same (msgs/s): {:.4}", f.ratio);
    println!("CPU per delivered message, µs, by process (this machine's cores are shared by all):");
    println!("run              h1       h2       h3  exchange  clients    total");
    for (name, cpu) in [
        ("same-host", &f.same_host_cpu),
        ("cross-host", &f.cross_host_cpu),
    ] {
        println!(
            "{name:<10} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>8.1} {:>8.1}",
            cpu.hosts[0],
            cpu.hosts[1],
            cpu.hosts[2],
            cpu.exchange,
            cpu.clients,
            cpu.total()
        );
    }
    let p = &f.presence;
    let per_host: Vec<String> = HOSTS
        .iter()
        .zip(&p.per_host)
        .map(|(host, n)| format!("{n} at {host}"))
        .collect();
    println!(
        "presence fan-out: star at h1, {} friends online ({}; {} of them colleagues), set up in {:.1} s",
        p.friends,
        per_host.join(", "),
        p.colleagues,
        p.setup_secs
    );
    println!("envelopes sent by h1           {:>10}", p.origin_envelopes);
    println!(
        "envelopes sent by the exchange {:>10}",
        p.exchange_envelopes
    );
    println!("login request to its answer    {:>10.1} ms", p.login_ms);
    println!("login request to first notice  {:>10.1} ms", p.first_ms);
    println!("login request to last notice   {:>10.1} ms", p.last_ms);
    for (host, (first, last)) in HOSTS.iter().zip(&p.per_host_ms) {
        println!("  at {host}: first {first:>6.1} ms, last {last:>6.1} ms");
    }
    let [h1, h2, h3, exchange, clients] = p.cpu_ms;
    println!(
        "CPU until the last notice, ms: h1 {h1:.1}, h2 {h2:.1}, h3 {h3:.1}, exchange \
         {exchange:.1}, clients {clients:.1} (total {:.1})",
        p.cpu_ms.iter().sum::<f64>()
    );
}

/// Where a network's state is kept.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// One exchange, on its own store.
    Sled,
    /// This many exchanges on one PostgreSQL cluster started for the run (one server, no
    /// standby, declared single-node); every host lists them all.
    Postgres(usize),
}

/// The exchanges and their hosts.
pub struct Net {
    /// The first exchange, which every host tries first.
    pub exchange: HostProcess,
    /// The other exchanges, if the state is in PostgreSQL.
    pub others: Vec<HostProcess>,
    pub hosts: Vec<HostProcess>,
    /// The database, stopped after every process (fields drop in order).
    pub cluster: Option<iim_e2e::postgres::Cluster>,
    /// The exchanges as the hosts list them, with their certificates.
    _exchanges: iim_e2e::ExchangeList,
}

impl Net {
    /// Starts the exchange and [`HOSTS`] in its network, each with configuration `config`
    /// and the default plugins `only` (all of them if `None`), and waits until every host
    /// sees every host up.
    pub async fn start(
        config: &'static str,
        only: Option<&'static [&'static str]>,
    ) -> anyhow::Result<Self> {
        Self::start_on(Backend::Sled, config, only).await
    }

    /// [`Net::start`], the network's state kept as `backend` says.
    pub async fn start_on(
        backend: Backend,
        config: &'static str,
        only: Option<&'static [&'static str]>,
    ) -> anyhow::Result<Self> {
        let net = tokio::task::spawn_blocking(move || {
            let (cluster, exchanges) = start_exchanges(backend)?;
            let files = only
                .map(|names| {
                    names
                        .iter()
                        .map(|name| Ok((*name, iim_e2e::default_plugin(name)?)))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
                .transpose()?;
            let only: Option<Vec<(&str, &Path)>> = files
                .as_ref()
                .map(|files| files.iter().map(|(n, f)| (*n, f.as_path())).collect());
            let list = iim_e2e::ExchangeList::of(&exchanges.iter().collect::<Vec<_>>())?;
            let mut hosts = Vec::new();
            for id in HOSTS {
                let plugins = match &only {
                    Some(only) => Plugins::Only(only),
                    None => Plugins::Default,
                };
                hosts.push(HostProcess::start_with(
                    &list.host_config(id, config),
                    plugins,
                )?);
            }
            let mut exchanges = exchanges.into_iter();
            let exchange = exchanges.next().context("no exchange")?;
            anyhow::Ok(Net {
                exchange,
                others: exchanges.collect(),
                hosts,
                cluster,
                _exchanges: list,
            })
        })
        .await
        .context("starting the network")??;
        let up = async {
            poll_until("every host to see every host up", || async {
                let mut up = 0;
                for host in &net.hosts {
                    up += host.hosts_up().await?;
                }
                let all = net.hosts.len() * net.hosts.len();
                Ok((up == all, format!("{up} of {all} up")))
            })
            .await
        };
        net.on_failure(up.await)?;
        Ok(net)
    }

    /// Host `i % 3`.
    pub fn host(&self, i: usize) -> &HostProcess {
        &self.hosts[i % self.hosts.len()]
    }

    /// Passes `result` on, printing the end of every process's log first if it failed.
    pub fn on_failure<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if result.is_err() {
            iim_run::print_log_tail("the exchange", &self.exchange);
            for other in &self.others {
                iim_run::print_log_tail("another exchange", other);
            }
            for (id, host) in HOSTS.iter().zip(&self.hosts) {
                iim_run::print_log_tail(id, host);
            }
        }
        result
    }
}

/// Starts the exchanges of `backend` (and the cluster they need).
fn start_exchanges(
    backend: Backend,
) -> anyhow::Result<(Option<iim_e2e::postgres::Cluster>, Vec<HostProcess>)> {
    match backend {
        Backend::Sled => Ok((None, vec![HostProcess::start_exchange()?])),
        Backend::Postgres(n) => {
            anyhow::ensure!(
                iim_e2e::postgres::available()?,
                "PostgreSQL is not installed here (initdb and pg_ctl, or IIM_PG_BIN)"
            );
            let cluster = iim_e2e::postgres::Cluster::start(&[])?;
            let url = cluster.url();
            let first = HostProcess::start_exchange_on(&url)?;
            let mut exchanges = vec![];
            for _ in 1..n {
                exchanges.push(HostProcess::start_another_exchange(
                    iim_e2e::ExchangeStore::SingleNode(&url),
                    &first,
                )?);
            }
            exchanges.insert(0, first);
            Ok((Some(cluster), exchanges))
        }
    }
}

/// Calls `probe` every [`POLL`] until it says done; fails after [`WAIT`], with `what` and
/// the state `probe` last described.
pub async fn poll_until<F, Fut>(what: &str, mut probe: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<(bool, String)>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let (done, state) = probe().await?;
        if done {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("waited {} s for {what}; {state}", WAIT.as_secs());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs `task(i)` for every `i` in `0..n`, at most [`CONCURRENCY`] at a time, and returns
/// their results in order; fails with the first failure (the others are dropped).
pub async fn bounded<T, F, Fut>(n: u32, task: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(u32) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let mut results: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut tasks = JoinSet::new();
    let mut next = 0;
    loop {
        while next < n && tasks.len() < CONCURRENCY {
            let (i, fut) = (next, task(next));
            tasks.spawn(async move { (i, fut.await) });
            next += 1;
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        let (i, result) = done.context("a task failed")?;
        results[i as usize] = Some(result?);
    }
    Ok(results.into_iter().flatten().collect())
}

/// The chat load within `h1`, then from `h1` to `h2` and `h3`, against one network.
async fn chat(load: Load) -> anyhow::Result<((Summary, CpuPerMessage), (Summary, CpuPerMessage))> {
    let net = Net::start(iim_run::HOST_CONFIG, Some(&["chat"])).await?;
    let runs = async {
        let clock = Clock::new();
        let h1 = net.host(0);
        let same = Placement {
            name: "same-host",
            senders: h1,
            receivers: &[h1],
            probe: None,
        };
        let same = chat_run(&net, same, load, clock).await?;
        eprintln!("same-host: done in {:.2} s", same.0.secs);
        let cross = Placement {
            name: "cross-host",
            senders: h1,
            receivers: &[net.host(1), net.host(2)],
            probe: None,
        };
        let cross = chat_run(&net, cross, load, clock).await?;
        eprintln!("cross-host: done in {:.2} s", cross.0.secs);
        Ok((same, cross))
    };
    net.on_failure(runs.await)
}

/// One chat run with fresh users placed as `place` says.
async fn chat_run(
    net: &Net,
    place: Placement<'_>,
    load: Load,
    clock: Clock,
) -> anyhow::Result<(Summary, CpuPerMessage)> {
    let h1 = net.host(0);
    let known = h1.network_stat("directory_users").await?;
    let pairs = iim_run::register(place, load).await?;
    // The exchange tells every host of each registration; measure once the senders' host
    // knows every receiver, not the look-ups of the first messages.
    let all = known + 2 * u64::from(load.pairs);
    poll_until("h1 to know every user", || async {
        let n = h1.network_stat("directory_users").await?;
        Ok((n >= all, format!("directory_users {n} of {all}")))
    })
    .await?;
    let before = cpu_now(net)?;
    let summary = iim_run::measure(place, &pairs, load, clock, iim_run::Sealing::Clear).await?;
    let after = cpu_now(net)?;
    let per = |i: usize| (after[i] - before[i]) * 1e6 / summary.delivered.max(1) as f64;
    let cpu = CpuPerMessage {
        hosts: [per(0), per(1), per(2)],
        exchange: per(3),
        clients: per(4),
    };
    Ok((summary, cpu))
}

/// The presence fan-out, on a network of its own with the default plugins.
async fn fan_out(friends: u32) -> anyhow::Result<FanOut> {
    let net = Arc::new(Net::start(iim_run::HOST_CONFIG, None).await?);
    net.on_failure(fan_out_on(&net, friends).await)
}

async fn fan_out_on(net: &Arc<Net>, friends: u32) -> anyhow::Result<FanOut> {
    let setup_started = Instant::now();
    let h1 = net.host(0);
    let star = h1.register("star").await?;
    let mut per_host = vec![0u32; HOSTS.len()];
    for i in 0..friends {
        per_host[i as usize % HOSTS.len()] += 1;
    }
    eprintln!("presence: registering {friends} friends and bringing them online");
    let sessions = friends_online(net, friends).await?;
    eprintln!("presence: {friends} friends online; star adds them");
    let users: Vec<UserId> = sessions.iter().map(|(u, _)| u.clone()).collect();
    add_contacts(h1, &star, users).await?;

    // h1 hears from the exchange who of the other hosts' users is online.
    let remote = u64::from(friends - per_host[0]);
    poll_until("h1 to know the other hosts' friends online", || async {
        let n = h1.network_stat("remote_online").await?;
        Ok((n >= remote, format!("remote_online {n} of {remote}")))
    })
    .await?;
    let setup_secs = setup_started.elapsed().as_secs_f64();
    eprintln!("presence: set up in {setup_secs:.1} s; star logs in");

    let origin_before = h1.network_stat("envelopes_out").await?;
    let exchange_before = net.exchange.network_stat("envelopes_out").await?;
    let clock = Clock::new();
    let mut listeners = JoinSet::new();
    for (i, (_, conn)) in sessions.into_iter().enumerate() {
        let star = star.clone();
        listeners.spawn(async move {
            let got = notice(&conn, &star, clock).await;
            (i, conn, got)
        });
    }
    let star_conn = h1.connect().await?;
    let cpu_before = cpu_now(net)?;
    let login = clock.now_ns();
    iim_run::login(&star_conn, &star, "phone", SessionMode::Receive).await?;
    let logged_in = clock.now_ns();
    let snapshot = tokio::spawn(snapshot_online(star_conn, star.clone(), friends));

    let mut times = Vec::with_capacity(friends as usize);
    let mut missing = Vec::new();
    let mut conns = Vec::with_capacity(friends as usize);
    while let Some(done) = listeners.join_next().await {
        let (i, conn, got) = done.context("a friend's task failed")?;
        match got {
            Ok(at) => times.push((i % HOSTS.len(), at.saturating_sub(login))),
            Err(e) => missing.push((i, e)),
        }
        conns.push(conn);
    }
    let cpu_after = cpu_now(net)?;
    if let Some((i, e)) = missing.first() {
        let mut per_host_missing = vec![0; HOSTS.len()];
        for (i, _) in &missing {
            per_host_missing[i % HOSTS.len()] += 1;
        }
        bail!(
            "{} of {friends} friends did not get star's presence notice ({} at h1, {} at h2, \
             {} at h3); f{i}: {e:#}",
            missing.len(),
            per_host_missing[0],
            per_host_missing[1],
            per_host_missing[2],
        );
    }
    let (star_conn, seen) = tokio::time::timeout(WAIT, snapshot)
        .await
        .context("star's snapshot did not come")?
        .context("star's snapshot task failed")??;
    if seen != friends {
        bail!("star's presence snapshot shows {seen} of its {friends} friends online");
    }

    // Everything h1 relayed acknowledged by the exchange: nothing more can leave for it.
    poll_until("h1's relay outbox to empty", || async {
        let n = h1.network_stat("envelopes_waiting").await?;
        Ok((n == 0, format!("envelopes_waiting {n}")))
    })
    .await?;
    let origin_envelopes = (h1.network_stat("envelopes_out").await?).saturating_sub(origin_before);
    let exchange_envelopes =
        (net.exchange.network_stat("envelopes_out").await?).saturating_sub(exchange_before);
    let other_hosts = per_host[1..].iter().filter(|n| **n > 0).count() as u64;
    let expected_origin = u64::from(other_hosts > 0);
    if origin_envelopes != expected_origin || exchange_envelopes != other_hosts {
        bail!(
            "star's presence notice took {origin_envelopes} envelopes from h1 (expected \
             {expected_origin}) and {exchange_envelopes} from the exchange (expected \
             {other_hosts})"
        );
    }
    // Only now may star go offline, and its friends with it.
    drop((star_conn, conns));
    let ms = |ns: u64| ns as f64 / 1e6;
    // The first and the last notice among the contacts at `host`, or at every host.
    let span = |host: Option<usize>| {
        let at = || {
            times
                .iter()
                .filter(move |(h, _)| host.is_none_or(|host| *h == host))
                .map(|(_, at)| *at)
        };
        (ms(at().min().unwrap_or(0)), ms(at().max().unwrap_or(0)))
    };
    let (first_ms, last_ms) = span(None);
    Ok(FanOut {
        friends,
        per_host,
        colleagues: friends.saturating_sub(MAX_RELATIONS as u32),
        setup_secs,
        origin_envelopes,
        exchange_envelopes,
        login_ms: ms(logged_in.saturating_sub(login)),
        first_ms,
        last_ms,
        per_host_ms: (0..HOSTS.len()).map(|h| span(Some(h))).collect(),
        cpu_ms: std::array::from_fn(|i| (cpu_after[i] - cpu_before[i]) * 1e3),
    })
}

/// Registers friends `f0`..`f{n-1}`, friend `i` at host `i % 3`, and brings each online on
/// its own connection, its own (empty) presence snapshot taken.
async fn friends_online(net: &Arc<Net>, n: u32) -> anyhow::Result<Vec<(UserId, Connection)>> {
    bounded(n, |i| {
        let net = Arc::clone(net);
        async move {
            let host = net.host(i as usize);
            let user = host.register(&format!("f{i}")).await?;
            let (conn, backlog) = host.online(&user, "phone").await?;
            anyhow::ensure!(backlog.is_empty(), "{user} has a backlog");
            let snapshot = iim_e2e::next_message(&conn).await?;
            anyhow::ensure!(
                snapshot.kind == MessageKind::Presence && snapshot.from == user,
                "{user} expected its presence snapshot, got {snapshot:?}"
            );
            Ok((user, conn))
        }
    })
    .await
}

/// `star`, at `host`, adds `users` to its contacts from a send-only session (which does not
/// make it online): friends up to [`MAX_RELATIONS`], colleagues past it.
async fn add_contacts(host: &HostProcess, star: &UserId, users: Vec<UserId>) -> anyhow::Result<()> {
    let setup = Arc::new(host.connect().await?);
    iim_run::login(&setup, star, "setup", SessionMode::SendOnly).await?;
    let users = Arc::new(users);
    bounded(users.len() as u32, |i| {
        let (setup, users) = (Arc::clone(&setup), Arc::clone(&users));
        async move {
            let kind = if (i as usize) < MAX_RELATIONS {
                RelationKind::Friend
            } else {
                RelationKind::Colleague
            };
            let user = &users[i as usize];
            within("adding a relation", setup.add_relation(kind, user))
                .await?
                .with_context(|| format!("star adding {user} as a {kind}"))
        }
    })
    .await?;
    if let Ok(setup) = Arc::try_unwrap(setup) {
        setup.close().await;
    }
    Ok(())
}

/// Waits for `star`'s presence notice on a friend's connection, acknowledges it and returns
/// when it arrived; anything else first fails.
async fn notice(conn: &Connection, star: &UserId, clock: Clock) -> anyhow::Result<u64> {
    // At most `iim_e2e::STEP` (20 s).
    let event = iim_e2e::next_event(conn).await?;
    let iim_client::Event::Message { seq, message } = event else {
        bail!("expected star's notice, got {event:?}");
    };
    let at = clock.now_ns();
    conn.ack(seq).await.context("acknowledging the notice")?;
    let body: serde_json::Value =
        serde_json::from_slice(&message.body).context("a presence body that is not JSON")?;
    let entry = &body["presence"][0];
    let online = entry["user"] == star.as_str() && entry["state"] == "online";
    if message.kind != MessageKind::Presence || message.from != *star || !online {
        bail!("expected star's notice, got {message:?}");
    }
    Ok(at)
}

/// Reads `star`'s session until its presence snapshot listed `friends` contacts, acknowledging
/// every delivery; returns the session, still open (closing it would send the contacts
/// `star`'s going offline), and how many contacts the snapshot showed online.
async fn snapshot_online(
    conn: Connection,
    star: UserId,
    friends: u32,
) -> anyhow::Result<(Connection, u32)> {
    let (mut listed, mut online) = (0, 0);
    while listed < friends {
        match iim_e2e::next_event(&conn).await? {
            iim_client::Event::Message { seq, message } => {
                conn.ack(seq).await?;
                if message.kind != MessageKind::Presence || message.from != star {
                    bail!("star expected its presence snapshot, got {message:?}");
                }
                let body: serde_json::Value = serde_json::from_slice(&message.body)?;
                for entry in body["presence"].as_array().into_iter().flatten() {
                    listed += 1;
                    online += u32::from(entry["state"] == "online");
                }
            }
            iim_client::Event::Synced { .. } => {}
            other => bail!("star's session got {other:?}"),
        }
    }
    Ok((conn, online))
}

/// The figures of `iim-bench network --database`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DatabaseFigures {
    /// Exchanges sharing the database.
    pub exchanges: usize,
    /// Sender/receiver pairs of each chat run.
    pub pairs: u32,
    /// Messages each sender sends.
    pub messages_per_sender: u32,
    /// Most submissions a sender has in flight.
    pub window: u32,
    /// Body size of every message, in bytes.
    pub body: usize,
    /// Senders at `h1`, receivers at `h2` and `h3`, through one exchange on its own store.
    pub sled: Summary,
    /// The same through the exchanges sharing one PostgreSQL database.
    pub postgres: Summary,
    /// PostgreSQL over sled, msgs/s.
    pub ratio: f64,
    /// What the database sustains, exchanges' store calls alone (no network, no hosts).
    pub relay: RelayRate,
    /// One exchange whose links store at once, on one connection (as before the pool).
    pub one_connection: RelayRate,
    /// The same on the default pool of connections.
    pub pooled: RelayRate,
    /// `pooled` over `one_connection`, `905`s/s.
    pub pool_ratio: f64,
    /// From `kill -9` of the exchange that forwards to `h2` to the first message another
    /// exchange relayed to it, in ms, under a message every 5 ms from `h1`.
    pub failover_ms: f64,
    /// Messages delivered during that measurement, each once and in order.
    pub failover_messages: usize,
    /// The relay tables right after the PostgreSQL chat run.
    pub tables: Vec<TableHealth>,
}

/// `905`s stored by several writers at once, then every row acknowledged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayRate {
    /// Writers at once: exchanges, or the links of one exchange.
    pub writers: usize,
    /// The writers are links of one exchange with this many connections (`None`: each writer
    /// an exchange of its own, with the default pool).
    pub shared: Option<usize>,
    /// Target hosts each `905` names (one row each).
    pub targets: usize,
    /// `905`s stored per second (each one transaction, committed with an fsync).
    pub envelopes_per_s: f64,
    /// Relay rows stored per second.
    pub rows_per_s: f64,
    /// Relay rows acknowledged (deleted, with their messages) per second.
    pub acked_rows_per_s: f64,
    /// The relay tables after every row was acknowledged, before any vacuum.
    pub tables: Vec<TableHealth>,
}

/// One table's rows, as PostgreSQL's statistics count them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableHealth {
    pub table: String,
    pub live_rows: i64,
    pub dead_rows: i64,
    /// With its indexes and TOAST.
    pub bytes: i64,
    /// Times autovacuum processed it.
    pub autovacuums: i64,
}

/// Runs the `--database` measurements: the cross-host chat load through the sled exchange
/// and then through `exchanges` exchanges on PostgreSQL, the relay rate of the database, and
/// an exchange's death under traffic.
pub async fn run_database(load: Load, exchanges: usize) -> anyhow::Result<DatabaseFigures> {
    let clock = Clock::new();
    let sled = {
        let net = Net::start(iim_run::HOST_CONFIG, Some(&["chat"])).await?;
        let run = cross_host(&net, "sled", load, clock).await;
        net.on_failure(run)?
    };
    eprintln!("sled: done in {:.2} s", sled.secs);
    let mut net = Net::start_on(
        Backend::Postgres(exchanges),
        iim_run::HOST_CONFIG,
        Some(&["chat"]),
    )
    .await?;
    let postgres = {
        let run = cross_host(&net, "pg", load, clock).await;
        net.on_failure(run)?
    };
    eprintln!("postgres: done in {:.2} s", postgres.secs);
    let cluster = net.cluster.as_ref().context("the network has a cluster")?;
    let tables = table_health(&cluster.connect().await?).await?;
    let failover = failover(&mut net).await;
    let (failover_ms, failover_messages) = net.on_failure(failover)?;
    drop(net);
    let relay = relay_rate(4, 2, Duration::from_secs(5), None).await?;
    let one_connection = relay_rate(4, 2, Duration::from_secs(3), Some(1)).await?;
    let pooled = relay_rate(4, 2, Duration::from_secs(3), Some(DEFAULT_CONNECTIONS)).await?;
    Ok(DatabaseFigures {
        exchanges,
        pairs: load.pairs,
        messages_per_sender: load.messages,
        window: load.window,
        body: load.body,
        ratio: postgres.msgs_per_s / sled.msgs_per_s,
        sled,
        postgres,
        pool_ratio: pooled.envelopes_per_s / one_connection.envelopes_per_s,
        relay,
        one_connection,
        pooled,
        failover_ms,
        failover_messages,
        tables,
    })
}

/// Prints the `--database` figures.
pub fn print_database(f: &DatabaseFigures) {
    let load = Load {
        pairs: f.pairs,
        messages: f.messages_per_sender,
        window: f.window,
        body: f.body,
    };
    println!(
        "network: hosts h1, h2, h3; one exchange on its own store, then {} exchanges on one \
         PostgreSQL database (one server, synchronous_commit on)",
        f.exchanges
    );
    println!(
        "cross-host chat: {}; senders at h1, receivers at h2 and h3",
        load.describe()
    );
    stats::print_runs(&[("sled", &f.sled), ("postgres", &f.postgres)]);
    println!("ratio postgres/sled (msgs/s): {:.4}", f.ratio);
    let r = &f.relay;
    println!(
        "the database alone: {} exchanges storing 905s of {} rows each: {:.0} 905s/s, {:.0} \
         rows/s stored; {:.0} rows/s acknowledged",
        r.writers, r.targets, r.envelopes_per_s, r.rows_per_s, r.acked_rows_per_s
    );
    for r in [&f.one_connection, &f.pooled] {
        println!(
            "one exchange, {} links storing 905s of {} rows at once on {} connection(s): {:.0} \
             905s/s, {:.0} rows/s stored",
            r.writers,
            r.targets,
            r.shared.unwrap_or(0),
            r.envelopes_per_s,
            r.rows_per_s
        );
    }
    println!("ratio pooled/one connection (905s/s): {:.4}", f.pool_ratio);
    println!(
        "an exchange killed under a message every 5 ms: first message relayed by another \
         {:.0} ms after the kill ({} messages, each once, in order)",
        f.failover_ms, f.failover_messages
    );
    for (when, tables) in [
        ("after the postgres chat run", &f.tables),
        (
            "after the relay-rate run, every row acknowledged",
            &r.tables,
        ),
    ] {
        println!("relay tables {when}:");
        println!(
            "  {:<16} {:>10} {:>10} {:>12} {:>12}",
            "table", "live", "dead", "bytes", "autovacuums"
        );
        for t in tables {
            println!(
                "  {:<16} {:>10} {:>10} {:>12} {:>12}",
                t.table, t.live_rows, t.dead_rows, t.bytes, t.autovacuums
            );
        }
    }
}

/// The chat load from `h1` to `h2` and `h3`, fresh users named `name-…`.
async fn cross_host(net: &Net, name: &str, load: Load, clock: Clock) -> anyhow::Result<Summary> {
    let place = Placement {
        name,
        senders: net.host(0),
        receivers: &[net.host(1), net.host(2)],
        probe: None,
    };
    Ok(chat_run(net, place, load, clock).await?.0)
}

/// The relay tables' rows, counted exactly (`pgstattuple`: PostgreSQL's statistics are sent
/// seconds late), with their autovacuums so far.
async fn table_health(sql: &tokio_postgres::Client) -> anyhow::Result<Vec<TableHealth>> {
    sql.batch_execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        .await
        .context("the extension pgstattuple (PostgreSQL's contrib)")?;
    let rows = sql
        .query(
            "SELECT s.relname::text, t.tuple_count, t.dead_tuple_count,
                 pg_total_relation_size(s.relid), s.autovacuum_count
             FROM pg_stat_user_tables s, pgstattuple(s.relid) t
             WHERE s.relname IN ('relay_messages', 'relay_rows', 'relay_targets',
                 'relay_inbound', 'presence')
             ORDER BY s.relname",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| TableHealth {
            table: row.get(0),
            live_rows: row.get(1),
            dead_rows: row.get(2),
            bytes: row.get(3),
            autovacuums: row.get(4),
        })
        .collect())
}

/// `h1`'s user sends `h2`'s a message every 5 ms; once messages flow, the exchange that
/// forwards to `h2` is killed. Returns the ms from the kill to the first message relayed by
/// another exchange (the first delivery after the kill that follows a pause of more than
/// [`FAILOVER_GAP`]: until then, messages the killed exchange had sent may still arrive),
/// and how many messages were delivered, each checked once and in order.
async fn failover(net: &mut Net) -> anyhow::Result<(f64, usize)> {
    anyhow::ensure!(!net.others.is_empty(), "--exchanges must be at least 2");
    let h1 = net.host(0);
    let known = h1.network_stat("directory_users").await?;
    let alice = h1.register("failover-a").await?;
    let bob = net.host(1).register("failover-b").await?;
    poll_until("h1 to know failover-b", || async {
        let n = h1.network_stat("directory_users").await?;
        Ok((n >= known + 2, format!("directory_users {n}")))
    })
    .await?;
    let (a, _) = h1.online(&alice, "phone").await?;
    let (b, _) = net.host(1).online(&bob, "phone").await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                a.submit(
                    iim_client::new_client_id(),
                    MessageKind::Chat,
                    std::slice::from_ref(&bob),
                    n.to_string().as_bytes(),
                )
                .await?;
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            a.close().await;
            anyhow::Ok(n)
        })
    };
    let got: Arc<std::sync::Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let receiver = {
        let got = Arc::clone(&got);
        tokio::spawn(async move {
            // Ends with the first failure: the wait for every message says what arrived.
            while let Ok(message) = iim_e2e::next_message(&b).await {
                let Ok(n) = String::from_utf8_lossy(&message.body).parse::<u64>() else {
                    return;
                };
                got.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((n, Instant::now()));
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The exchange that forwards to h2, by its address in `admin network`.
    let network = net.exchange.admin("network").await?;
    let forwarder = network
        .lines()
        .filter_map(|l| l.strip_prefix("exchange ")?.split_once(" forwards "))
        .find(|(_, targets)| {
            targets
                .trim_matches(['[', ']'])
                .split_whitespace()
                .any(|t| t == "h2")
        })
        .map(|(name, _)| name.to_owned())
        .context("no exchange forwards to h2")?;
    let killed = Instant::now();
    if net.exchange.addr.to_string() == forwarder {
        net.exchange.kill9()?;
    } else {
        net.others
            .iter_mut()
            .find(|e| e.addr.to_string() == forwarder)
            .context("the forwarder is none of the exchanges")?
            .kill9()?;
    }
    let count = || got.lock().unwrap_or_else(|p| p.into_inner()).len();
    let before = count();
    poll_until("a message relayed by another exchange", || async {
        let resumed = got
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .is_some_and(|(_, at)| at.duration_since(killed) > FAILOVER_GAP);
        Ok((
            resumed,
            format!("{} delivered since the kill", count() - before),
        ))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = usize::try_from(sender.await??)?;
    poll_until("every message delivered", || async {
        let n = count();
        Ok((n >= sent, format!("{n} of {sent} delivered")))
    })
    .await?;
    receiver.abort();
    let got = std::mem::take(&mut *got.lock().unwrap_or_else(|p| p.into_inner()));
    let numbers: Vec<u64> = got.iter().map(|(n, _)| *n).collect();
    if numbers != (0..sent as u64).collect::<Vec<_>>() {
        bail!("the messages did not arrive each once and in order: {numbers:?}");
    }
    let after: Vec<Instant> = got.iter().map(|(_, at)| *at).collect();
    let resumed = after
        .windows(2)
        .find(|w| w[1] > killed && w[1].duration_since(w[0]) > FAILOVER_GAP)
        .map(|w| w[1])
        .or_else(|| after.iter().copied().find(|at| *at > killed))
        .context("nothing was delivered after the kill")?;
    Ok((resumed.duration_since(killed).as_secs_f64() * 1e3, sent))
}

/// A pause in deliveries that says the relay stopped (messages come every 5 ms).
const FAILOVER_GAP: Duration = Duration::from_millis(500);

/// `writers` exchanges (or, `shared`, the links of one exchange with that many connections)
/// store `905`s of `targets` rows each into a fresh database for `secs`, at once; then every
/// target's rows are acknowledged, 32 at a time (a link's window).
async fn relay_rate(
    writers: usize,
    targets: usize,
    secs: Duration,
    shared: Option<usize>,
) -> anyhow::Result<RelayRate> {
    let cluster = tokio::task::spawn_blocking(|| iim_e2e::postgres::Cluster::start(&[])).await??;
    let url = cluster.url();
    let mut dbs = Vec::new();
    match shared {
        None => {
            for _ in 0..writers {
                let db = PgExchange::connect(&url, Sealer::clear(), Durability::SingleNode).await?;
                dbs.push(Arc::new(db));
            }
        }
        Some(connections) => {
            let db = PgExchange::connect_as(
                &url,
                "",
                connections,
                Sealer::clear(),
                Durability::SingleNode,
            )
            .await?;
            let db = Arc::new(db);
            dbs = (0..writers).map(|_| Arc::clone(&db)).collect();
        }
    }
    let targets: Vec<String> = (0..targets).map(|i| format!("t{i}")).collect();
    let origins: Vec<String> = (0..writers).map(|i| format!("o{i}")).collect();
    for id in origins.iter().chain(&targets) {
        dbs[0]
            .join(id, "127.0.0.1:1", "a benchmark's credential")
            .await?;
    }
    let started = Instant::now();
    let deadline = started + secs;
    let mut tasks = JoinSet::new();
    for (i, (db, origin)) in dbs.iter().zip(&origins).enumerate() {
        let (db, origin, targets) = (Arc::clone(db), origin.clone(), targets.clone());
        tasks.spawn(async move {
            let mut seq = 0u64;
            while Instant::now() < deadline {
                seq += 1;
                db.relay_in(&origin, seq, relay_envelope(i, seq, &targets)?)
                    .await?;
            }
            anyhow::Ok(seq)
        });
    }
    let mut stored = 0u64;
    while let Some(done) = tasks.join_next().await {
        stored += done??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let acking = Instant::now();
    for target in &targets {
        let mut seq = 0;
        while seq < stored {
            seq = (seq + 32).min(stored);
            dbs[0].outbox_acked(target, seq).await?;
        }
    }
    let acked_secs = acking.elapsed().as_secs_f64();
    let tables = table_health(&cluster.connect().await?).await?;
    let rows = stored as f64 * targets.len() as f64;
    Ok(RelayRate {
        writers,
        shared,
        targets: targets.len(),
        envelopes_per_s: stored as f64 / elapsed,
        rows_per_s: rows / elapsed,
        acked_rows_per_s: rows / acked_secs,
        tables,
    })
}

/// The `seq`th `905` of writer `i`: a 100-byte chat message from `alice` to `bob`, one row
/// for each of `targets`.
fn relay_envelope(i: usize, seq: u64, targets: &[String]) -> anyhow::Result<Envelope> {
    let bob = UserId::new("bob")?;
    let message = Message {
        id: MessageId(((i as u64 + 1) << 40) | seq),
        kind: MessageKind::Chat,
        from: UserId::new("alice")?,
        from_device: DeviceId::new("phone")?,
        to: vec![bob.clone().into()],
        body: vec![b'x'; 100],
        sent_at: 1,
    };
    let rows = targets
        .iter()
        .map(|t| RelayRow {
            server: t.clone(),
            users: vec![bob.clone().into()],
        })
        .collect();
    Ok(Envelope {
        message,
        expires_at: None,
        rows,
    })
}

/// `905`s offered per second in each housekeeping run: well under what the database sustains
/// here, so that every setting carries the same load.
pub const HOUSEKEEPING_RATE: u64 = 1000;
/// Rows waiting for a host that is down through every housekeeping run, each with its message.
const HOUSEKEEPING_BACKLOG: u64 = 1_000_000;
/// `905`s each writer stores in one transaction, as a busy link batches them.
const HOUSEKEEPING_BATCH: u64 = 16;
/// How often the relay tables are looked at during a housekeeping run.
const HOUSEKEEPING_SAMPLE: Duration = Duration::from_secs(5);
/// The relay tables' storage parameters, each reset in the run without them.
const RELAY_TABLES: [&str; 5] = [
    "relay_messages",
    "relay_rows",
    "relay_targets",
    "relay_inbound",
    "presence",
];

/// One setting of the housekeeping runs.
#[derive(Debug, Clone, Copy)]
pub struct Housekeeping {
    /// What it is called in the figures.
    pub name: &'static str,
    /// The schema's storage parameters for the relay tables are kept (else reset to
    /// PostgreSQL's defaults).
    pub table_settings: bool,
    /// Given to the server on its command line.
    pub server_settings: &'static [&'static str],
}

/// The settings compared: PostgreSQL's defaults, the schema's table settings, and those with
/// the server's autovacuum waking every 10 s rather than every minute (docs/network.md).
pub const HOUSEKEEPING: [Housekeeping; 3] = [
    Housekeeping {
        name: "defaults",
        table_settings: false,
        server_settings: &[],
    },
    Housekeeping {
        name: "schema",
        table_settings: true,
        server_settings: &[],
    },
    Housekeeping {
        name: "schema+naptime",
        table_settings: true,
        server_settings: &["autovacuum_naptime=10s"],
    },
];

/// The relay tables of one housekeeping run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Churn {
    pub name: &'static str,
    pub secs: f64,
    /// Relay rows stored (and acknowledged, at most 100 ms later) per second.
    pub rows_per_s: f64,
    /// Store calls (a batch of `905`s, one transaction): median and 99th percentile.
    pub store_p50_ms: f64,
    pub store_p99_ms: f64,
    /// Dead rows in `relay_rows` and `relay_messages`, the most seen at once (PostgreSQL's
    /// statistics), and at the end (counted).
    pub peak_dead: i64,
    pub end_dead: i64,
    /// Bytes of the relay tables with their indexes: the most seen, and at the end.
    pub peak_bytes: i64,
    pub end_bytes: i64,
    /// Autovacuums of the relay tables during the run.
    pub autovacuums: i64,
    /// Of the updates to `relay_targets` and `relay_inbound`, the share that were HOT (no
    /// new index entries).
    pub hot_share: f64,
}

/// Two writers store `905`s of two rows each at [`HOUSEKEEPING_RATE`] for `secs`, while each
/// target acknowledges what was stored every 100 ms, as a steady network does; the relay
/// tables are looked at every [`HOUSEKEEPING_SAMPLE`].
pub async fn housekeeping(setting: Housekeeping, secs: Duration) -> anyhow::Result<Churn> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let settings = setting.server_settings;
    let cluster =
        tokio::task::spawn_blocking(move || iim_e2e::postgres::Cluster::start(settings)).await??;
    let db = Arc::new(
        PgExchange::connect_as(
            &cluster.url(),
            "",
            DEFAULT_CONNECTIONS,
            Sealer::clear(),
            Durability::SingleNode,
        )
        .await?,
    );
    let sql = cluster.connect().await?;
    if !setting.table_settings {
        for table in RELAY_TABLES {
            let options: Vec<String> = sql
                .query(
                    "SELECT split_part(unnest(reloptions), '=', 1) FROM pg_class WHERE relname = $1",
                    &[&table],
                )
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            if !options.is_empty() {
                sql.batch_execute(&format!(
                    "ALTER TABLE {table} RESET ({})",
                    options.join(", ")
                ))
                .await?;
            }
        }
    }
    let targets: Vec<String> = vec!["t0".into(), "t1".into()];
    let origins: Vec<String> = vec!["o0".into(), "o1".into()];
    for id in origins.iter().chain(&targets) {
        db.join(id, "127.0.0.1:1", "a benchmark's credential")
            .await?;
    }
    // What waits for a host that is down: rows nobody acknowledges, which PostgreSQL's
    // default thresholds count against the dead ones.
    sql.batch_execute(&format!(
        "INSERT INTO relay_messages (id, body)
             SELECT (3::bigint << 40) | g, convert_to(repeat('x', 150), 'UTF8')
             FROM generate_series(1, {HOUSEKEEPING_BACKLOG}) g;
         INSERT INTO relay_rows (target, seq, message, users)
             SELECT 'down', g, (3::bigint << 40) | g, convert_to('bob', 'UTF8')
             FROM generate_series(1, {HOUSEKEEPING_BACKLOG}) g;
         INSERT INTO relay_targets (target, last, acked) VALUES ('down', {HOUSEKEEPING_BACKLOG}, 0);"
    ))
    .await
    .context("storing the backlog of a host that is down")?;
    sql.batch_execute("VACUUM ANALYZE relay_messages, relay_rows, relay_targets")
        .await?;
    eprintln!(
        "housekeeping {}: {HOUSEKEEPING_BACKLOG} rows wait for a host that is down; the load starts",
        setting.name
    );
    let started = Instant::now();
    let deadline = started + secs;
    // `905`s whose store call returned: each target's rows up to there are committed (rows
    // are numbered per target in commit order).
    let stored = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut writers = JoinSet::new();
    let every = Duration::from_secs_f64(
        (HOUSEKEEPING_BATCH * origins.len() as u64) as f64 / HOUSEKEEPING_RATE as f64,
    );
    for (i, origin) in origins.iter().enumerate() {
        let (db, origin, targets, stored) = (
            Arc::clone(&db),
            origin.clone(),
            targets.clone(),
            Arc::clone(&stored),
        );
        writers.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut seq, mut latencies) = (0u64, Vec::new());
            while Instant::now() < deadline {
                tick.tick().await;
                let batch = (0..HOUSEKEEPING_BATCH)
                    .map(|_| {
                        seq += 1;
                        Ok((seq, relay_envelope(i, seq, &targets)?))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let call = Instant::now();
                db.relay_in_batch(&origin, batch).await?;
                latencies.push(call.elapsed().as_nanos() as u64);
                stored.fetch_add(HOUSEKEEPING_BATCH, Ordering::Release);
            }
            anyhow::Ok(latencies)
        });
    }
    let acker = tokio::spawn({
        let (db, targets, stored, done) = (
            Arc::clone(&db),
            targets.clone(),
            Arc::clone(&stored),
            Arc::clone(&done),
        );
        async move {
            while !done.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let upto = stored.load(Ordering::Acquire);
                for target in &targets {
                    db.outbox_acked(target, upto).await?;
                }
            }
            anyhow::Ok(())
        }
    });
    let (mut peak_dead, mut peak_bytes) = (0, 0);
    while Instant::now() < deadline {
        tokio::time::sleep(HOUSEKEEPING_SAMPLE.min(deadline - Instant::now())).await;
        // PostgreSQL's statistics (a second late at most): counting exactly would read the
        // backlog whole every time.
        let row = sql
            .query_one(
                "SELECT coalesce(sum(n_dead_tup) FILTER (WHERE relname IN ('relay_rows', 'relay_messages')), 0)::bigint,
                     coalesce(sum(pg_total_relation_size(relid)), 0)::bigint
                 FROM pg_stat_user_tables
                 WHERE relname IN ('relay_messages', 'relay_rows', 'relay_targets', 'relay_inbound', 'presence')",
                &[],
            )
            .await?;
        let (dead, bytes): (i64, i64) = (row.get(0), row.get(1));
        eprintln!(
            "housekeeping {}: {:.0} s, {dead} dead rows in relay_rows and relay_messages, {:.1} MB",
            setting.name,
            started.elapsed().as_secs_f64(),
            bytes as f64 / 1e6
        );
        peak_dead = peak_dead.max(dead);
        peak_bytes = peak_bytes.max(bytes);
    }
    let mut latencies = Vec::new();
    while let Some(done) = writers.join_next().await {
        latencies.extend(done??);
    }
    let secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Release);
    acker.await??;
    // Every row acknowledged: only the backlog is left, each message with its row.
    let stored = stored.load(Ordering::Acquire);
    for target in &targets {
        db.outbox_acked(target, stored).await?;
    }
    let left = sql
        .query_one(
            "SELECT (SELECT count(*) FROM relay_rows WHERE target <> 'down'),
                 (SELECT count(*) FROM relay_messages)",
            &[],
        )
        .await?;
    let (rows, messages): (i64, i64) = (left.get(0), left.get(1));
    if rows != 0 || u64::try_from(messages)? != HOUSEKEEPING_BACKLOG {
        bail!(
            "after every acknowledgement, {rows} rows for the hosts that are up and {messages} \
             messages are left, not 0 and the backlog's {HOUSEKEEPING_BACKLOG}"
        );
    }
    let tables = table_health(&sql).await?;
    let (updates, hot): (i64, i64) = {
        let row = sql
            .query_one(
                "SELECT sum(n_tup_upd)::bigint, sum(n_tup_hot_upd)::bigint FROM pg_stat_user_tables
                 WHERE relname IN ('relay_targets', 'relay_inbound')",
                &[],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    latencies.sort_unstable();
    let tail = stats::Tail::of(&latencies);
    Ok(Churn {
        name: setting.name,
        secs,
        rows_per_s: (stored * targets.len() as u64) as f64 / secs,
        store_p50_ms: tail.p50_us / 1e3,
        store_p99_ms: tail.p99_us / 1e3,
        peak_dead,
        end_dead: tables
            .iter()
            .filter(|t| t.table == "relay_rows" || t.table == "relay_messages")
            .map(|t| t.dead_rows)
            .sum(),
        peak_bytes,
        end_bytes: tables.iter().map(|t| t.bytes).sum(),
        autovacuums: tables.iter().map(|t| t.autovacuums).sum(),
        hot_share: if updates == 0 {
            0.0
        } else {
            hot as f64 / updates as f64
        },
    })
}

/// Prints the housekeeping runs, and each one's peak dead rows and bytes over the first's.
pub fn print_housekeeping(runs: &[Churn]) {
    println!(
        "relay tables under a steady load, each setting on a fresh PostgreSQL server \
         (synchronous_commit on): {HOUSEKEEPING_RATE} 905s/s of 2 rows from 2 writers \
         ({HOUSEKEEPING_BATCH} a transaction), every row acknowledged within 100 ms, \
         while {HOUSEKEEPING_BACKLOG} rows wait for a host that is down"
    );
    println!(
        "  {:<16} {:>6} {:>8} {:>9} {:>9} {:>10} {:>10} {:>11} {:>11} {:>5} {:>5}",
        "setting",
        "secs",
        "rows/s",
        "p50 ms",
        "p99 ms",
        "peak dead",
        "end dead",
        "peak bytes",
        "end bytes",
        "vacs",
        "hot"
    );
    for r in runs {
        println!(
            "  {:<16} {:>6.0} {:>8.0} {:>9.1} {:>9.1} {:>10} {:>10} {:>11} {:>11} {:>5} {:>5.2}",
            r.name,
            r.secs,
            r.rows_per_s,
            r.store_p50_ms,
            r.store_p99_ms,
            r.peak_dead,
            r.end_dead,
            r.peak_bytes,
            r.end_bytes,
            r.autovacuums,
            r.hot_share
        );
    }
    if let Some((base, rest)) = runs.split_first() {
        for r in rest {
            println!(
                "ratio {}/{}: peak dead rows {:.4}, peak bytes {:.4}",
                r.name,
                base.name,
                r.peak_dead as f64 / base.peak_dead.max(1) as f64,
                r.peak_bytes as f64 / base.peak_bytes.max(1) as f64
            );
        }
    }
}
