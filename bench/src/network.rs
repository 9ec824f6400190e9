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

use crate::iim_run::{self, Placement};
use crate::stats::{self, Clock, Load, Summary};
use anyhow::{Context, bail};
use iim_client::Connection;
use iim_client::proto::{MessageKind, RelationKind, SessionMode, UserId};
use iim_e2e::{HostProcess, Plugins, within};
use iim_host::cmd::relation::MAX_RELATIONS;
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

/// An exchange and its hosts.
pub struct Net {
    pub exchange: HostProcess,
    pub hosts: Vec<HostProcess>,
}

impl Net {
    /// Starts the exchange and [`HOSTS`] in its network, each with configuration `config`
    /// and the default plugins `only` (all of them if `None`), and waits until every host
    /// sees every host up.
    pub async fn start(
        config: &'static str,
        only: Option<&'static [&'static str]>,
    ) -> anyhow::Result<Self> {
        let net = tokio::task::spawn_blocking(move || {
            let exchange = HostProcess::start_exchange()?;
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
            let mut hosts = Vec::new();
            for id in HOSTS {
                let plugins = match &only {
                    Some(only) => Plugins::Only(only),
                    None => Plugins::Default,
                };
                hosts.push(HostProcess::start_in_network(
                    &exchange, id, config, plugins,
                )?);
            }
            anyhow::Ok(Net { exchange, hosts })
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
            for (id, host) in HOSTS.iter().zip(&self.hosts) {
                iim_run::print_log_tail(id, host);
            }
        }
        result
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
