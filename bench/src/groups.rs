//! Groups: one message to a large group, and group chat against 1:1 chat, on a network of an
//! exchange and hosts `h1`, `h2`, `h3` (each a real `iim-host` process) with the chat and
//! groups plugins only, so that every message a member gets is one of theirs (no presence
//! notices, no per-message receipts), measured in one run.
//!
//! - *Set-up.* `members` users `m0`, `m1`, … registered at `h1`, `h2`, `h3` in turn (user `i`
//!   at host `i % 3`), each with a password. A registration costs the host one argon2id hash,
//!   made with fixed parameters (19 MiB, 2 passes: no configuration key lowers them) on its
//!   `limits.max_hashing` threads, so on a machine of few cores registering is most of the
//!   set-up. The users register through a few connections per host, each user after user,
//!   not a connection each: the benchmark's hosts take `limits.auth_rate`,
//!   `limits.auth_burst` and `limits.auth_timeout_secs` raised for that ([`HOST_CONFIG`]).
//!   The first `online` users are the online members, each logged in (one more hash) on a
//!   connection of its own that acknowledges every delivery as it comes; the others never log
//!   in. `m0`, at `h1`, makes `#crowd` with every user in it, which makes `h1` its home: a
//!   `create`, then `add`s, 100 users a request (the groups plugin's limit), each answered
//!   before the next; the offline users go in first, so that the online ones miss most of the
//!   `added` notices each `add` sends every member. Then `m0` makes `#team` of the first
//!   `group_size` online users. Each step is timed.
//! - *One message to `#crowd`.* `m0` submits one chat message; measured from the submission to
//!   the last online member's device getting it (the sender's device is one of them), while
//!   every offline member gets it in their inbox. The hosts' network counters (`iim-host admin
//!   network`: `envelopes_in`, `envelopes_out`) say what crossed hosts for it: the message
//!   itself should reach `h2` and `h3` in one envelope each, whatever the number of members
//!   there (the goal), and every member elsewhere whose device acknowledges it sends `h1` a
//!   `delivered` receipt, an envelope each. The CPU time each process used from the submission
//!   to the last member's delivery says roughly where the time goes. A warm-up message goes
//!   first; after each message the run waits until `h1`'s groups plugin has counted every
//!   online member's delivery (it asks the plugin who got the message, every 200 ms), so that
//!   nothing of the warm-up competes with the measured message.
//! - *Group chat against 1:1 chat.* The first `senders` members of `#team` (spread over the
//!   three hosts, each submitting at their own) each send `messages` chat messages to `#team`,
//!   at most [`WINDOW`] in flight each; every member's device, the sender's included, gets
//!   every one: deliveries per second from the first submission to the last delivery, and
//!   their latency. Then the baseline, in the same network with the same devices: the same
//!   senders send each of their messages as `group_size` 1:1 chat messages through the chat
//!   plugin, one to each member of `#team` (themselves included, as a group message comes back
//!   to its sender): as many deliveries. The ratio group/1:1 compares their deliveries per
//!   second. Between the two runs the network settles ([`quiet`]), so that the group run's
//!   last receipts do not weigh on the baseline; the CPU time each process used in each run
//!   is printed too.
//!
//! Every online member's device must get every message meant for it exactly once: a lost,
//! repeated or stray chat message fails the run, as does any wait past its bound ([`STALL`]
//! for the next delivery or answer, 60 s for the network to settle, `--timeout` for the
//! whole run).

use crate::network::{self, HOSTS, Net};
use crate::stats::{self, Clock, FirstSend, Summary, Tally};
use anyhow::{Context, anyhow, bail, ensure};
use iim_client::proto::body::{GroupReply, GroupRequest, Receipt};
use iim_client::proto::{Address, GROUP_KIND, Message, MessageId, MessageKind, UserId};
use iim_client::{Connection, Event};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;

/// The hosts' configuration: the submission rate raised as for every benchmark
/// ([`crate::iim_run::HOST_CONFIG`]: the per-session limit would cap what is measured), and
/// so that a connection registers user after user, `limits.auth_rate` / `limits.auth_burst`
/// (the register and login attempts one connection may make: 2 a second, bursts of 10, by
/// default) and `limits.auth_timeout_secs` (how long a connection may stay unauthenticated,
/// as registering leaves it: 60 s by default) raised. Nothing makes a registration cheaper:
/// the argon2 parameters are not configurable, and `limits.max_hashing` only sets how many
/// hashes run at once (on 2 cores, 1 or 2 threads a host instead of the default 4 registered
/// some 10% faster, near the noise; fewer would starve a machine of more cores, so the
/// default stays).
const HOST_CONFIG: &str = "[limits]\nsubmit_rate = 1000000\nsubmit_burst = 1000000\n\
                           auth_rate = 1000000\nauth_burst = 1000000\n\
                           auth_timeout_secs = 3600\n";
/// The plugins every host runs.
const PLUGINS: &[&str] = &["chat", "groups"];
/// The large group.
const CROWD: &str = "crowd";
/// The group of the throughput runs.
const TEAM: &str = "team";
/// The most members a group may have (the groups plugin's default `max_members`).
const MAX_MEMBERS: u32 = 10_000;
/// The most users one group request names (the groups plugin's limit).
const PER_REQUEST: usize = 100;
/// Connections per host registering users, each one user after another: enough to keep the
/// host's hashing threads busy, well within its hashing queue.
const REGISTERING: usize = 8;
/// Submissions each sender has in flight in the throughput runs.
const WINDOW: u32 = 32;
/// Body size of every chat message, in bytes.
const BODY: usize = 100;
/// Longest wait for a member's next delivery, or for the answer to a submission.
const STALL: Duration = Duration::from_secs(60);
/// How often the run asks the groups plugin whether it counted every delivery.
const COUNTED_POLL: Duration = Duration::from_millis(200);

/// The shape of a run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Users, every one a member of `#crowd` (`m0`, its owner, included).
    pub members: u32,
    /// Of them, online (the first ones).
    pub online: u32,
    /// Members of `#team` sending in the throughput runs.
    pub senders: u32,
    /// Members of `#team`, all online.
    pub group_size: u32,
    /// Messages each sender sends in each throughput run.
    pub messages: u32,
}

impl Shape {
    /// Fails unless the sizes fit together.
    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=MAX_MEMBERS).contains(&self.members),
            "--members must be 1 to {MAX_MEMBERS} (the groups plugin's max_members)"
        );
        ensure!(
            (1..=self.members).contains(&self.online),
            "--online must be 1 to --members"
        );
        ensure!(
            (1..=self.online).contains(&self.group_size),
            "--group-size must be 1 to --online (every member of #team is online)"
        );
        ensure!(
            (1..=self.group_size).contains(&self.senders),
            "--senders must be 1 to --group-size"
        );
        ensure!(self.messages >= 1, "--messages must be at least 1");
        ensure!(
            u64::from(self.senders) * u64::from(self.messages) <= u64::from(u32::MAX),
            "--senders x --messages is too large"
        );
        Ok(())
    }
}

/// The figures of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    /// Users, every one a member of `#crowd`.
    pub members: u32,
    /// Of them, online.
    pub online: u32,
    /// Users at `h1`, `h2`, `h3`.
    pub members_per_host: Vec<u32>,
    /// Online users at `h1`, `h2`, `h3`.
    pub online_per_host: Vec<u32>,
    /// How long the set-up took.
    pub setup: Setup,
    /// One message to `#crowd`.
    pub crowd: CrowdMessage,
    /// Members of `#team` sending.
    pub senders: u32,
    /// Members of `#team`.
    pub group_size: u32,
    /// Messages each sender sent in each throughput run.
    pub messages_per_sender: u32,
    /// Senders' messages to `#team`; `delivered` counts deliveries to members' devices.
    pub group: Summary,
    /// The same deliveries as 1:1 chat messages.
    pub one_to_one: Summary,
    /// CPU time `h1`, `h2`, `h3`, the exchange and the benchmark used during the group run,
    /// in s.
    pub group_cpu_secs: Vec<f64>,
    /// The same during the 1:1 run.
    pub one_to_one_cpu_secs: Vec<f64>,
    /// Group over 1:1 deliveries per second.
    pub ratio: f64,
}

/// How long each step of the set-up took, in s.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Setup {
    /// Registering every user.
    pub register_secs: f64,
    /// Registrations per second.
    pub registrations_per_s: f64,
    /// After that, until every host's directory knew every user.
    pub directory_secs: f64,
    /// Making `#crowd`, `m0` online first.
    pub crowd_secs: f64,
    /// The group requests that took (a `create`, then `add`s).
    pub crowd_requests: u32,
    /// Bringing the other online members online: a login each, then their backlogs.
    pub online_secs: f64,
    /// Making `#team`, and every host learning both groups' home.
    pub team_secs: f64,
    /// The whole set-up, from the first registration.
    pub total_secs: f64,
}

/// The figures of the one message to `#crowd`; times from its submission, in ms.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CrowdMessage {
    /// To the host's `Accepted`.
    pub accepted_ms: f64,
    /// To the first online member's device getting it.
    pub first_ms: f64,
    /// To the median online member's.
    pub p50_ms: f64,
    /// To the last online member's.
    pub last_ms: f64,
    /// To the last online member's at `h1`, `h2`, `h3`.
    pub last_per_host_ms: Vec<f64>,
    /// To `h1`'s groups plugin having counted every online member's delivery (polled).
    pub counted_ms: f64,
    /// Envelopes `h1`, `h2`, `h3` took in from the exchange, to the counting: the message
    /// at `h2` and `h3`, the members' `delivered` receipts at `h1`.
    pub envelopes_in: Vec<u64>,
    /// Envelopes `h1`, `h2`, `h3` put in their relay outboxes, to the counting.
    pub envelopes_out: Vec<u64>,
    /// Envelopes the exchange took in, to the counting.
    pub exchange_in: u64,
    /// Envelopes the exchange sent, to the counting.
    pub exchange_out: u64,
    /// CPU time `h1`, `h2`, `h3`, the exchange and the benchmark (every client) used from the
    /// submission to the last online member's delivery, in s.
    pub cpu_secs: Vec<f64>,
}

/// Runs the set-up and the measurements on a network of their own.
pub async fn run(shape: Shape) -> anyhow::Result<Figures> {
    let net = Arc::new(Net::start(HOST_CONFIG, Some(PLUGINS)).await?);
    net.on_failure(measure(&net, shape).await)
}

async fn measure(net: &Arc<Net>, shape: Shape) -> anyhow::Result<Figures> {
    let clock = Clock::new();
    let users: Vec<UserId> = (0..shape.members)
        .map(|i| UserId::new(format!("m{i}")))
        .collect::<Result<_, _>>()?;
    let online_n = shape.online as usize;

    let started = Instant::now();
    eprintln!("groups: registering {} users at h1, h2, h3", shape.members);
    register(net, &users).await?;
    let register_secs = started.elapsed().as_secs_f64();
    let step = Instant::now();
    known_everywhere(net, "every user", users.len()).await?;
    let directory_secs = step.elapsed().as_secs_f64();

    let step = Instant::now();
    let crowd = group(CROWD)?;
    eprintln!(
        "groups: registered in {register_secs:.1} s; m0 makes {crowd} of {} members",
        shape.members
    );
    let owner = Arc::new(Member::start(net, &users[0], 0, clock).await?);
    // The offline users first: each `add` tells every member so far.
    let order: Vec<UserId> = users[online_n..]
        .iter()
        .chain(&users[1..online_n])
        .cloned()
        .collect();
    let crowd_requests = owner.make_group(&crowd, &order).await?;
    let crowd_secs = step.elapsed().as_secs_f64();

    let step = Instant::now();
    eprintln!(
        "groups: {crowd} made in {crowd_secs:.1} s ({crowd_requests} requests); {} more \
         members log in",
        shape.online - 1
    );
    let users = Arc::new(users);
    let others = network::bounded(shape.online - 1, |i| {
        let (net, users) = (Arc::clone(net), Arc::clone(&users));
        async move {
            let index = i as usize + 1;
            Member::start(&net, &users[index], index, clock)
                .await
                .map(Arc::new)
        }
    })
    .await?;
    let online: Vec<Arc<Member>> = std::iter::once(owner).chain(others).collect();
    let online_secs = step.elapsed().as_secs_f64();

    let step = Instant::now();
    let team = group(TEAM)?;
    let team_members = &online[..shape.group_size as usize];
    let order: Vec<UserId> = team_members[1..].iter().map(|m| m.user.clone()).collect();
    online[0].make_group(&team, &order).await?;
    // Not measured: a host's first submission to a group of another host looks its home up.
    known_everywhere(net, "both groups", users.len() + 2).await?;
    let team_secs = step.elapsed().as_secs_f64();
    let setup = Setup {
        register_secs,
        registrations_per_s: f64::from(shape.members) / register_secs,
        directory_secs,
        crowd_secs,
        crowd_requests,
        online_secs,
        team_secs,
        total_secs: started.elapsed().as_secs_f64(),
    };
    eprintln!(
        "groups: set up in {:.1} s; one message to {crowd}",
        setup.total_secs
    );

    let crowd_figures = crowd_message(net, &online, &crowd, clock).await?;
    eprintln!(
        "groups: the last online member got it after {:.1} ms; {} senders to {team}",
        crowd_figures.last_ms, shape.senders
    );
    let to_team = Addressing::Group(team.clone());
    let (group, group_cpu_secs) = chat_run(net, team_members, shape, &to_team, clock).await?;
    eprintln!(
        "groups: {team} done in {:.2} s; waiting for h1 to handle its receipts",
        group.secs
    );
    quiet(net, &online[0], &team).await?;
    eprintln!("groups: the same deliveries as 1:1 chat");
    let (one_to_one, one_to_one_cpu_secs) =
        chat_run(net, team_members, shape, &Addressing::OneToOne, clock).await?;
    eprintln!("groups: 1:1 done in {:.2} s", one_to_one.secs);
    for member in &online {
        member.nothing_more()?;
    }
    Ok(Figures {
        members: shape.members,
        online: shape.online,
        members_per_host: per_host(shape.members),
        online_per_host: per_host(shape.online),
        setup,
        crowd: crowd_figures,
        senders: shape.senders,
        group_size: shape.group_size,
        messages_per_sender: shape.messages,
        group,
        one_to_one,
        group_cpu_secs,
        one_to_one_cpu_secs,
        ratio: group.msgs_per_s / one_to_one.msgs_per_s,
    })
}

/// How many of users `0..n` live at `h1`, `h2`, `h3` (user `i` at host `i % 3`).
fn per_host(n: u32) -> Vec<u32> {
    let hosts = HOSTS.len() as u32;
    (0..hosts)
        .map(|h| n / hosts + u32::from(h < n % hosts))
        .collect()
}

/// The address of group `name`.
fn group(name: &str) -> anyhow::Result<Address> {
    format!("#{name}")
        .parse()
        .with_context(|| format!("#{name} is not a group's name"))
}

fn group_kind() -> MessageKind {
    MessageKind::Custom(GROUP_KIND.into())
}

/// A message, briefly, for an error.
fn describe(message: &Message) -> String {
    let to: Vec<String> = message.to.iter().map(ToString::to_string).collect();
    format!(
        "{} message {} from {} to {}",
        message.kind,
        message.id,
        message.from,
        to.join(", ")
    )
}

/// Registers `users`, user `i` at host `i % 3`, through [`REGISTERING`] connections per host,
/// each registering user after user.
async fn register(net: &Net, users: &[UserId]) -> anyhow::Result<()> {
    let total = users.len();
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for h in 0..HOSTS.len() {
        let theirs: Vec<&UserId> = users.iter().skip(h).step_by(HOSTS.len()).collect();
        for c in 0..REGISTERING {
            let batch: Vec<UserId> = theirs
                .iter()
                .skip(c)
                .step_by(REGISTERING)
                .map(|user| (*user).clone())
                .collect();
            if batch.is_empty() {
                continue;
            }
            let conn = net.host(h).connect().await?;
            let done = Arc::clone(&done);
            tasks.spawn(async move {
                for user in batch {
                    iim_e2e::within("register", conn.register(&user, iim_e2e::PASSWORD))
                        .await?
                        .with_context(|| format!("registering {user}"))?;
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_multiple_of(1000) && n < total {
                        eprintln!("groups: registered {n} of {total}");
                    }
                }
                conn.close().await;
                anyhow::Ok(())
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a registering task failed")??;
    }
    Ok(())
}

/// Waits until every host's directory holds at least `names` names (users and groups).
async fn known_everywhere(net: &Net, what: &str, names: usize) -> anyhow::Result<()> {
    let names = names as u64;
    network::poll_until(&format!("every host to know {what}"), || async {
        let mut least = u64::MAX;
        for host in &net.hosts {
            least = least.min(host.network_stat("directory_users").await?);
        }
        Ok((
            least >= names,
            format!("the smallest directory holds {least} of {names} names"),
        ))
    })
    .await
}

/// Waits until the network is quiet — nothing waiting in any host's relay outbox nor in the
/// exchange's for any host, and `h1`, the groups' home, taking no more envelopes between two
/// looks — then asks `h1`'s groups plugin a question about `group` (from `asker`, a member),
/// which it answers once it has handled every event of the group before it: the members'
/// `delivered` receipts among them. (Not the counts of the run's last message: the plugin
/// keeps the counts of its latest 100 messages by id, and the ids of different hosts do not
/// follow the group's order.)
async fn quiet(net: &Net, asker: &Member, group: &Address) -> anyhow::Result<()> {
    let previous = AtomicU64::new(u64::MAX);
    network::poll_until("the network to be quiet", || async {
        let mut waiting = 0;
        for host in &net.hosts {
            waiting += host.network_stat("envelopes_waiting").await?;
        }
        // The exchange's lines `host ID number N addr ADDR up|down waiting N`.
        let exchange = net.exchange.admin("network").await?;
        for line in exchange.lines().filter(|l| l.starts_with("host ")) {
            waiting += line
                .rsplit_once(" waiting ")
                .and_then(|(_, n)| n.trim().parse::<u64>().ok())
                .with_context(|| format!("no waiting count in the exchange's {line:?}"))?;
        }
        let taken = net.hosts[0].network_stat("envelopes_in").await?;
        let before = previous.swap(taken, Ordering::Relaxed);
        Ok((
            waiting == 0 && taken == before,
            format!("{waiting} envelopes waiting; h1 took {taken}"),
        ))
    })
    .await?;
    asker.ask(group, &GroupRequest::Members).await?;
    Ok(())
}

/// What a member's device got: a message and when (on the run's clock), or why the
/// connection ended.
type Arrival = anyhow::Result<(Message, u64)>;

/// An online member: one connection in receive mode, whose every delivery a task of its own
/// acknowledges as it comes and passes on, timed, to whichever step of the run reads them.
struct Member {
    user: UserId,
    /// Its host: `h1`, `h2`, `h3` as 0, 1, 2.
    host: usize,
    conn: Arc<Connection>,
    arrivals: Mutex<mpsc::UnboundedReceiver<Arrival>>,
}

impl Member {
    /// Logs user `index` in at its host, takes its backlog (which must hold no chat message)
    /// and starts reading its deliveries.
    async fn start(net: &Net, user: &UserId, index: usize, clock: Clock) -> anyhow::Result<Self> {
        let host = index % HOSTS.len();
        let (conn, backlog) = net
            .host(host)
            .online(user, "bench")
            .await
            .with_context(|| format!("bringing {user} online"))?;
        if let Some(stray) = backlog.iter().find(|m| m.kind == MessageKind::Chat) {
            bail!("{user} found {} in its backlog", describe(stray));
        }
        let conn = Arc::new(conn);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(read(Arc::clone(&conn), tx, clock));
        Ok(Self {
            user: user.clone(),
            host,
            conn,
            arrivals: Mutex::new(rx),
        })
    }

    /// The next delivery, waiting at most [`STALL`] for it.
    async fn next(&self, what: &str) -> anyhow::Result<(Message, u64)> {
        let mut arrivals = self.arrivals.lock().await;
        match tokio::time::timeout(STALL, arrivals.recv()).await {
            Err(_) => bail!(
                "{}: nothing came for {} s, waiting for {what}",
                self.user,
                STALL.as_secs()
            ),
            Ok(None) => bail!("{}: its reader ended", self.user),
            Ok(Some(arrival)) => arrival.with_context(|| format!("{}", self.user)),
        }
    }

    /// Submits a message, waiting at most [`STALL`] for the host's answer.
    async fn submit(
        &self,
        kind: MessageKind,
        to: &Address,
        body: &[u8],
    ) -> anyhow::Result<iim_client::Accepted> {
        let submit = self.conn.submit(
            iim_client::new_client_id(),
            kind,
            std::slice::from_ref(to),
            body,
        );
        tokio::time::timeout(STALL, submit)
            .await
            .map_err(|_| {
                anyhow!(
                    "{}: no answer to a submission to {to} for {} s",
                    self.user,
                    STALL.as_secs()
                )
            })?
            .with_context(|| format!("{} submitting to {to}", self.user))
    }

    /// Submits `request` to `group` and takes this member's deliveries until the groups
    /// plugin answers it: returns its replies before `done`. Fails on a refusal, and on a chat
    /// message meanwhile (it is asked between runs).
    async fn ask(
        &self,
        group: &Address,
        request: &GroupRequest,
    ) -> anyhow::Result<Vec<GroupReply>> {
        let id = self
            .submit(group_kind(), group, &request.to_json())
            .await?
            .id
            .0;
        let mut replies = Vec::new();
        loop {
            let (message, _) = self.next("the groups plugin's answer").await?;
            if message.kind == MessageKind::Chat {
                bail!("{} got {} between runs", self.user, describe(&message));
            }
            if message.kind == group_kind()
                && let Ok(reply) = GroupReply::from_json(&message.body)
                && reply.request() == id
            {
                if matches!(reply, GroupReply::Done { .. }) {
                    return Ok(replies);
                }
                replies.push(reply);
            } else if message.kind == MessageKind::Receipt
                && let Ok(Receipt::Refused {
                    id: refused,
                    reason,
                    ..
                }) = Receipt::from_json(&message.body)
                && refused == id
            {
                bail!("{group} refused {}'s request: {reason}", self.user);
            }
        }
    }

    /// Makes `group`, owned by this member, with `users` in it: a `create` naming the first
    /// [`PER_REQUEST`], then `add`s of as many, each answered before the next. Returns how
    /// many requests that took.
    async fn make_group(&self, group: &Address, users: &[UserId]) -> anyhow::Result<u32> {
        let names = |chunk: &[UserId]| chunk.iter().map(ToString::to_string).collect();
        let mut chunks = users.chunks(PER_REQUEST);
        let create = GroupRequest::Create {
            title: format!("iim-bench {group}"),
            members: names(chunks.next().unwrap_or(&[])),
        };
        self.ask(group, &create).await?;
        let mut requests: u32 = 1;
        for chunk in chunks {
            let add = GroupRequest::Add {
                users: names(chunk),
            };
            self.ask(group, &add).await?;
            requests += 1;
            if requests.is_multiple_of(20) {
                let now_in = (requests as usize * PER_REQUEST).min(users.len()) + 1;
                eprintln!(
                    "groups: {group}: {now_in} of {} members in",
                    users.len() + 1
                );
            }
        }
        Ok(requests)
    }

    /// Asks the groups plugin who got message `id` of `group` (this member sent it), every
    /// [`COUNTED_POLL`], until it counts `expected` members' devices: every online member
    /// but the sender. Fails if it counts more, or after [`network::WAIT`].
    async fn counted(&self, group: &Address, id: MessageId, expected: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + network::WAIT;
        loop {
            let replies = self
                .ask(group, &GroupRequest::Receipts { id: id.0 })
                .await?;
            let delivered: usize = replies
                .iter()
                .map(|reply| match reply {
                    GroupReply::Receipts { delivered, .. } => delivered.len(),
                    _ => 0,
                })
                .sum();
            ensure!(
                delivered <= expected,
                "{group}: message {id} counted delivered to {delivered} members, but only \
                 {expected} (online, not its sender) could have it"
            );
            if delivered == expected {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "waited {} s for {group}'s home to count every delivery of message {id}; \
                     {delivered} of {expected}",
                    network::WAIT.as_secs()
                );
            }
            tokio::time::sleep(COUNTED_POLL).await;
        }
    }

    /// Fails if a chat message came to this member's device after the runs (a repeat, or a
    /// message it should not have got) or its connection ended.
    fn nothing_more(&self) -> anyhow::Result<()> {
        let mut arrivals = self
            .arrivals
            .try_lock()
            .map_err(|_| anyhow!("{}: its deliveries are still being read", self.user))?;
        while let Ok(arrival) = arrivals.try_recv() {
            let (message, _) = arrival.with_context(|| format!("{}", self.user))?;
            ensure!(
                message.kind != MessageKind::Chat,
                "{} got {} after the runs",
                self.user,
                describe(&message)
            );
        }
        Ok(())
    }
}

/// A member's reader: acknowledges each delivery and passes it on with the time it came,
/// until the connection ends (passed on as an error).
async fn read(conn: Arc<Connection>, arrivals: mpsc::UnboundedSender<Arrival>, clock: Clock) {
    loop {
        let arrival = match conn.next_event().await {
            Some(Ok(Event::Message { seq, message })) => {
                let at = clock.now_ns();
                match conn.ack(seq).await {
                    Ok(()) => Ok((message, at)),
                    Err(e) => Err(anyhow::Error::from(e).context("acknowledging a delivery")),
                }
            }
            Some(Ok(Event::Synced { .. })) => continue,
            Some(Ok(other)) => Err(anyhow!("a receive session got {other:?}")),
            Some(Err(e)) => Err(anyhow::Error::from(e).context("receiving")),
            None => Err(anyhow!("the connection ended")),
        };
        let ended = arrival.is_err();
        if arrivals.send(arrival).is_err() || ended {
            return;
        }
    }
}

/// The network counters of every host and the exchange.
struct Counters {
    /// `envelopes_in` of `h1`, `h2`, `h3`.
    hosts_in: Vec<u64>,
    /// `envelopes_out` of `h1`, `h2`, `h3`.
    hosts_out: Vec<u64>,
    /// The exchange's `envelopes_in`.
    exchange_in: u64,
    /// The exchange's `envelopes_out`.
    exchange_out: u64,
}

impl Counters {
    async fn read(net: &Net) -> anyhow::Result<Self> {
        let (mut hosts_in, mut hosts_out) = (Vec::new(), Vec::new());
        for host in &net.hosts {
            hosts_in.push(host.network_stat("envelopes_in").await?);
            hosts_out.push(host.network_stat("envelopes_out").await?);
        }
        Ok(Self {
            hosts_in,
            hosts_out,
            exchange_in: net.exchange.network_stat("envelopes_in").await?,
            exchange_out: net.exchange.network_stat("envelopes_out").await?,
        })
    }
}

/// The CPU time `h1`, `h2`, `h3`, the exchange and this process have used, in s.
fn cpu(net: &Net) -> anyhow::Result<Vec<f64>> {
    let mut pids = Vec::new();
    for process in net.hosts.iter().chain([&net.exchange]) {
        pids.push(process.pid().context("a host is not running")?.to_string());
    }
    pids.push("self".into());
    pids.iter()
        .map(|pid| crate::process::cpu_secs(pid))
        .collect()
}

/// The CPU time used between two readings of [`cpu`].
fn used_since(before: &[f64], after: &[f64]) -> Vec<f64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// The one message to `#crowd`, after a warm-up.
async fn crowd_message(
    net: &Net,
    online: &[Arc<Member>],
    crowd: &Address,
    clock: Clock,
) -> anyhow::Result<CrowdMessage> {
    let owner = &online[0];
    let others = online.len() - 1;
    let warm_up = round(online, crowd, 0, clock).await?;
    owner.counted(crowd, warm_up.id, others).await?;

    let before = Counters::read(net).await?;
    let cpu_before = cpu(net)?;
    let measured = round(online, crowd, 1, clock).await?;
    let cpu_after = cpu(net)?;
    owner.counted(crowd, measured.id, others).await?;
    let counted_at = clock.now_ns();
    let after = Counters::read(net).await?;

    let since = |at: u64| at.saturating_sub(measured.submitted) as f64 / 1e6;
    let mut times: Vec<u64> = measured.arrivals.iter().map(|(_, at)| *at).collect();
    times.sort_unstable();
    let last_per_host_ms = (0..HOSTS.len())
        .map(|h| {
            let last = measured.arrivals.iter().filter(|(host, _)| *host == h);
            last.map(|(_, at)| since(*at)).fold(0.0, f64::max)
        })
        .collect();
    let delta = |a: &[u64], b: &[u64]| -> Vec<u64> {
        a.iter().zip(b).map(|(a, b)| b.saturating_sub(*a)).collect()
    };
    Ok(CrowdMessage {
        accepted_ms: since(measured.accepted),
        first_ms: since(times.first().copied().unwrap_or(0)),
        p50_ms: since(stats::percentile(&times, 0.5)),
        last_ms: since(times.last().copied().unwrap_or(0)),
        last_per_host_ms,
        counted_ms: since(counted_at),
        envelopes_in: delta(&before.hosts_in, &after.hosts_in),
        envelopes_out: delta(&before.hosts_out, &after.hosts_out),
        exchange_in: after.exchange_in.saturating_sub(before.exchange_in),
        exchange_out: after.exchange_out.saturating_sub(before.exchange_out),
        cpu_secs: used_since(&cpu_before, &cpu_after),
    })
}

/// One message to `#crowd` from its owner, and when each online member's device got it.
struct Round {
    id: MessageId,
    /// When it was submitted.
    submitted: u64,
    /// When the host's `Accepted` came.
    accepted: u64,
    /// Each online member's host and when its device got the message.
    arrivals: Vec<(usize, u64)>,
}

/// Sends message `index` (of the run's clock's body format) from `online[0]`, the owner, to
/// `crowd`, and waits until every online member's device has it.
async fn round(
    online: &[Arc<Member>],
    crowd: &Address,
    index: u32,
    clock: Clock,
) -> anyhow::Result<Round> {
    let mut waiting = JoinSet::new();
    for member in online {
        let (member, crowd) = (Arc::clone(member), crowd.clone());
        waiting.spawn(async move {
            let got = crowd_message_of(&member, &crowd, index).await;
            (member.host, member.user.clone(), got)
        });
    }
    let submitted = clock.now_ns();
    let body = stats::body(BODY, submitted, index);
    let accepted = online[0].submit(MessageKind::Chat, crowd, &body).await?;
    let accepted_at = clock.now_ns();
    let mut arrivals = Vec::with_capacity(online.len());
    let mut missing = Vec::new();
    while let Some(done) = waiting.join_next().await {
        let (host, user, got) = done.context("a member's task failed")?;
        match got {
            Ok((id, at)) if id == accepted.id => arrivals.push((host, at)),
            Ok((id, _)) => {
                missing.push((host, user, anyhow!("got message {id}, not {}", accepted.id)))
            }
            Err(e) => missing.push((host, user, e)),
        }
    }
    if let Some((_, user, e)) = missing.first() {
        let mut per_host = [0; HOSTS.len()];
        for (host, ..) in &missing {
            per_host[*host] += 1;
        }
        bail!(
            "{} of {} online members did not get message {} to {crowd} ({} at h1, {} at h2, \
             {} at h3); {user}: {e:#}",
            missing.len(),
            online.len(),
            accepted.id,
            per_host[0],
            per_host[1],
            per_host[2],
        );
    }
    Ok(Round {
        id: accepted.id,
        submitted,
        accepted: accepted_at,
        arrivals,
    })
}

/// Takes `member`'s deliveries until chat message `index` to `crowd`; returns its id and when
/// it came. Any other chat message first fails.
async fn crowd_message_of(
    member: &Member,
    crowd: &Address,
    index: u32,
) -> anyhow::Result<(MessageId, u64)> {
    loop {
        let (message, at) = member.next("the message to the group").await?;
        if message.kind != MessageKind::Chat {
            continue;
        }
        let (_, got) = stats::parse_body(&message.body)?;
        ensure!(
            message.to.as_slice() == std::slice::from_ref(crowd) && got == index,
            "got {} (index {got}), expected message {index} to {crowd}",
            describe(&message)
        );
        return Ok((message.id, at));
    }
}

/// How the senders address their messages in a throughput run.
#[derive(Clone)]
enum Addressing {
    /// To the group: one submission, which every member gets.
    Group(Address),
    /// To each member of the group in turn, 1:1: one submission per delivery.
    OneToOne,
}

/// One throughput run: the first `shape.senders` of `team` each send `shape.messages`
/// messages as `how` says, at most [`WINDOW`] in flight each, and every member of `team`
/// must get each exactly once. Message `n` of sender `s` carries index `s * messages + n`.
/// Returns the run's summary and the CPU time each process (as [`cpu`] lists them) used.
async fn chat_run(
    net: &Net,
    team: &[Arc<Member>],
    shape: Shape,
    how: &Addressing,
    clock: Clock,
) -> anyhow::Result<(Summary, Vec<f64>)> {
    let senders: Arc<Vec<UserId>> = Arc::new(
        team[..shape.senders as usize]
            .iter()
            .map(|m| m.user.clone())
            .collect(),
    );
    let recipients: Arc<Vec<UserId>> = Arc::new(team.iter().map(|m| m.user.clone()).collect());
    let first_send = Arc::new(FirstSend::new());
    let cpu_before = cpu(net)?;
    // Senders and members in one set, so that whichever fails first ends the run.
    let mut tasks: JoinSet<anyhow::Result<Option<Tally>>> = JoinSet::new();
    for member in team {
        let (member, senders, how) = (Arc::clone(member), Arc::clone(&senders), how.clone());
        tasks.spawn(async move {
            receive(&member, &senders, shape.messages, &how)
                .await
                .map(Some)
                .with_context(|| format!("member {}", member.user))
        });
    }
    for (s, sender) in team[..shape.senders as usize].iter().enumerate() {
        let next = Arc::new(AtomicU64::new(0));
        for _ in 0..WINDOW {
            let job = Sending {
                conn: Arc::clone(&sender.conn),
                index_base: s as u32 * shape.messages,
                messages: shape.messages,
                how: how.clone(),
                recipients: Arc::clone(&recipients),
                next: Arc::clone(&next),
                clock,
                first_send: Arc::clone(&first_send),
            };
            let who = sender.user.clone();
            tasks.spawn(async move {
                job.run()
                    .await
                    .map(|()| None)
                    .with_context(|| format!("sender {who}"))
            });
        }
    }
    let mut tallies = Vec::with_capacity(team.len());
    while let Some(done) = tasks.join_next().await {
        if let Some(tally) = done.context("a benchmark task failed")?? {
            tallies.push(tally);
        }
    }
    let expected = u64::from(shape.senders) * u64::from(shape.messages) * team.len() as u64;
    let used = used_since(&cpu_before, &cpu(net)?);
    Ok((Summary::of(&tallies, first_send.get(), expected)?, used))
}

/// Takes `member`'s deliveries until it has every message of the run's `senders` (each
/// `messages`), addressed as `how` says; fails on a repeat or a chat message of anyone else
/// or to another address. Other kinds (notices, counts) are passed over.
async fn receive(
    member: &Member,
    senders: &[UserId],
    messages: u32,
    how: &Addressing,
) -> anyhow::Result<Tally> {
    let expected = senders.len() as u32 * messages;
    let to = match how {
        Addressing::Group(group) => group.clone(),
        Addressing::OneToOne => Address::User(member.user.clone()),
    };
    let mut tally = Tally::new(expected);
    while !tally.done() {
        let (message, at) = member
            .next("the run's messages")
            .await
            .with_context(|| format!("received {} of {expected}", tally.count()))?;
        if message.kind != MessageKind::Chat {
            continue;
        }
        let (_, index) = stats::parse_body(&message.body)?;
        let sender = senders.get((index / messages) as usize);
        ensure!(
            message.to.as_slice() == std::slice::from_ref(&to) && sender == Some(&message.from),
            "got {} (index {index})",
            describe(&message)
        );
        tally.record(&message.body, at)?;
    }
    Ok(tally)
}

/// One of a sender's [`WINDOW`] workers: submits message after message until the sender's
/// are taken.
struct Sending {
    conn: Arc<Connection>,
    /// The index of the sender's first message.
    index_base: u32,
    messages: u32,
    how: Addressing,
    /// The members of the group, for 1:1 messages.
    recipients: Arc<Vec<UserId>>,
    /// The sender's next submission: a message, or with `OneToOne` a message to one member.
    next: Arc<AtomicU64>,
    clock: Clock,
    first_send: Arc<FirstSend>,
}

impl Sending {
    async fn run(self) -> anyhow::Result<()> {
        let group = self.recipients.len() as u64;
        let submissions = match self.how {
            Addressing::Group(_) => u64::from(self.messages),
            Addressing::OneToOne => u64::from(self.messages) * group,
        };
        loop {
            let next = self.next.fetch_add(1, Ordering::Relaxed);
            if next >= submissions {
                return Ok(());
            }
            let (n, to) = match &self.how {
                Addressing::Group(to) => (next, to.clone()),
                Addressing::OneToOne => (
                    next / group,
                    Address::User(self.recipients[(next % group) as usize].clone()),
                ),
            };
            let index = self.index_base + u32::try_from(n)?;
            let now = self.clock.now_ns();
            self.first_send.record(now);
            let body = stats::body(BODY, now, index);
            let submit = self.conn.submit(
                iim_client::new_client_id(),
                MessageKind::Chat,
                std::slice::from_ref(&to),
                &body,
            );
            tokio::time::timeout(STALL, submit)
                .await
                .map_err(|_| {
                    anyhow!(
                        "no answer to submission {index} for {} s (is a host stuck?)",
                        STALL.as_secs()
                    )
                })?
                .with_context(|| format!("submitting message {index} to {to}"))?;
        }
    }
}

/// Prints the figures as tables.
pub fn print(f: &Figures) {
    let at = |counts: &[u32]| -> String {
        HOSTS
            .iter()
            .zip(counts)
            .map(|(host, n)| format!("{n} at {host}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("groups: an exchange and hosts h1, h2, h3, each a process; chat and groups plugins");
    println!(
        "{} users ({}), every one in #{CROWD}; {} online ({})",
        f.members,
        at(&f.members_per_host),
        f.online,
        at(&f.online_per_host)
    );
    let s = &f.setup;
    let row = |label: String, value: f64, unit: &str| println!("  {label:<52} {value:>9.1} {unit}");
    println!("set-up");
    row(
        format!(
            "register {} users ({:.1}/s, a password hash each)",
            f.members, s.registrations_per_s
        ),
        s.register_secs,
        "s",
    );
    row(
        "every host's directory knows them".into(),
        s.directory_secs,
        "s",
    );
    row(
        format!(
            "#{CROWD}: m0 online, a create and {} adds",
            s.crowd_requests.saturating_sub(1)
        ),
        s.crowd_secs,
        "s",
    );
    row(
        format!("{} more members log in", f.online.saturating_sub(1)),
        s.online_secs,
        "s",
    );
    row(
        format!("#{TEAM} of {}; every host knows both groups", f.group_size),
        s.team_secs,
        "s",
    );
    row("set-up in all".into(), s.total_secs, "s");

    let c = &f.crowd;
    println!(
        "one chat message to #{CROWD} ({} members, {} online) from m0 at h1, its home",
        f.members, f.online
    );
    row("submit to Accepted".into(), c.accepted_ms, "ms");
    row("submit to the first online member".into(), c.first_ms, "ms");
    row("submit to the median online member".into(), c.p50_ms, "ms");
    let goal = |met: bool| if met { "met" } else { "MISSED" };
    println!(
        "  {:<52} {:>9.1} ms (goal <= 1000 ms: {})",
        "submit to the last online member",
        c.last_ms,
        goal(c.last_ms <= 1000.0)
    );
    row(
        "submit to h1 counting every delivery (polled)".into(),
        c.counted_ms,
        "ms",
    );
    println!(
        "  {:<9} {:>8} {:>8} {:>10} {:>13} {:>13} {:>8}",
        "process", "members", "online", "last ms", "envelopes in", "envelopes out", "CPU s"
    );
    for (h, host) in HOSTS.iter().enumerate() {
        println!(
            "  {:<9} {:>8} {:>8} {:>10.1} {:>13} {:>13} {:>8.3}",
            host,
            f.members_per_host[h],
            f.online_per_host[h],
            c.last_per_host_ms[h],
            c.envelopes_in[h],
            c.envelopes_out[h],
            c.cpu_secs[h]
        );
    }
    println!(
        "  {:<9} {:>8} {:>8} {:>10} {:>13} {:>13} {:>8.3}",
        "exchange", "", "", "", c.exchange_in, c.exchange_out, c.cpu_secs[3]
    );
    println!(
        "  {:<9} {:>8} {:>8} {:>10} {:>13} {:>13} {:>8.3}",
        "clients", "", "", "", "", "", c.cpu_secs[4]
    );
    // The message itself is all that reaches h2 and h3; h1 takes the members' receipts.
    let met = (1..HOSTS.len()).all(|h| c.envelopes_in[h] == u64::from(f.members_per_host[h] > 0));
    println!(
        "  envelopes into h2, h3 for the message: {} (goal 1 per host: {}); into h1: {}, \
         the delivered receipts of the online members elsewhere",
        c.envelopes_in[1..]
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        goal(met),
        c.envelopes_in[0]
    );
    println!("  (CPU s: from the submission to the last online member's delivery)");

    let team_per_host = per_host(f.group_size);
    println!(
        "group chat: {} senders ({}) x {} messages of {BODY} bytes, window {WINDOW} each, to \
         #{TEAM} of {} members ({}), all online; delivered counts deliveries to members' devices",
        f.senders,
        at(&per_host(f.senders)),
        f.messages_per_sender,
        f.group_size,
        at(&team_per_host)
    );
    println!(
        "  1:1: each of those messages sent to each member, the sender included, through chat"
    );
    stats::print_runs(&[("group", &f.group), ("1:1", &f.one_to_one)]);
    let cpu = |secs: &[f64]| -> String {
        secs.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "CPU s of h1, h2, h3, the exchange, the clients: group {}; 1:1 {}",
        cpu(&f.group_cpu_secs),
        cpu(&f.one_to_one_cpu_secs)
    );
    println!("ratio group/1:1 (deliveries/s): {:.4}", f.ratio);
}
