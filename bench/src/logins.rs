//! Password logins: what they cost the host in memory, how many it checks per second, and what
//! a burst of them gets.
//!
//! One user registers and logs in once (the warm-up); the host's resident memory (`VmRSS` of
//! its process) then is the baseline. Then `logins` password logins, `concurrency` at a time,
//! each on a new connection (a login authenticates its connection, so a connection logs in
//! once), the first `concurrency` of them sent together. A login the host refuses as busy
//! (`rate_limited`) is tried again on the same connection after the wait the host names; any
//! other failure (no answer in time, a connection closed or lost) is counted and fails the run. The resident memory is
//! read again after the last login and sampled every 100 ms meanwhile; the run fails if it grew
//! by more than `max_growth_mib` over the baseline.

use anyhow::{Context, anyhow, bail};
use iim_client::ClientError;
use iim_client::proto::{DeviceId, ErrorCode, SessionMode, UserId};
use iim_e2e::HostProcess;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

/// The shape of a run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Logins measured.
    pub logins: u32,
    /// Logins in flight at once.
    pub concurrency: u32,
    /// Most the host's resident memory may grow over the baseline, in MiB.
    pub max_growth_mib: u64,
}

/// The figures of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    /// Logins measured.
    pub logins: u32,
    /// Logins in flight at once.
    pub concurrency: u32,
    /// Logins answered `LoggedIn`.
    pub succeeded: u32,
    /// Times a login was refused as `rate_limited` (and tried again).
    pub refused_busy: u64,
    /// Logins that failed otherwise, by why.
    pub failed: BTreeMap<String, u32>,
    /// From the first login sent to the last answered, in s.
    pub secs: f64,
    /// Successful logins per second.
    pub logins_per_s: f64,
    /// Median time from a login's first attempt to its success (waits after refusals
    /// included), in ms.
    pub p50_ms: f64,
    /// 99th percentile of the same, in ms.
    pub p99_ms: f64,
    /// The longest any attempt waited for its answer (a success or a refusal), in ms: a
    /// login queued for the hashers must be answered well within the client's 30 s.
    pub longest_answer_ms: f64,
    /// The host's resident memory when it started listening, in MiB.
    pub rss_start_mib: f64,
    /// The baseline: after the warm-up, before the measured logins, in MiB.
    pub rss_before_mib: f64,
    /// After the last measured login, in MiB.
    pub rss_after_mib: f64,
    /// The highest sample during the logins, in MiB.
    pub rss_peak_mib: f64,
    /// `rss_after_mib - rss_before_mib`.
    pub growth_mib: f64,
    /// `rss_after_mib / rss_before_mib`.
    pub ratio: f64,
    /// The most growth allowed, in MiB.
    pub max_growth_mib: u64,
}

impl Figures {
    /// Why the run failed, if it did.
    pub fn verdict(&self) -> anyhow::Result<()> {
        let failed: u32 = self.failed.values().sum();
        if failed > 0 {
            bail!(
                "{failed} of {} logins failed without a rate_limited refusal: {:?}",
                self.logins,
                self.failed
            );
        }
        if self.growth_mib > self.max_growth_mib as f64 {
            bail!(
                "the host's memory grew by {:.1} MiB over {} logins (more than {} MiB)",
                self.growth_mib,
                self.logins,
                self.max_growth_mib
            );
        }
        Ok(())
    }
}

/// How long a refused login waits when the host does not say.
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// How often the host's memory is sampled during the logins.
const SAMPLE: Duration = Duration::from_millis(100);

/// Runs the measurement against a fresh chat-only host with its default limits.
pub async fn run(shape: Shape) -> anyhow::Result<Figures> {
    let host = tokio::task::spawn_blocking(HostProcess::start_chat_only)
        .await
        .context("starting the host")??;
    let result = measure(&host, shape).await;
    let failed = match &result {
        Ok(figures) => figures.verdict().is_err(),
        Err(_) => true,
    };
    if failed {
        // Why the host ended sessions is in its log, which goes with its data directory.
        let kept = std::env::temp_dir().join("iim-bench-logins-host.log");
        match std::fs::write(&kept, host.log()) {
            Ok(()) => eprintln!("logins: the host's log is kept in {}", kept.display()),
            Err(e) => eprintln!("logins: cannot keep the host's log: {e}"),
        }
    }
    result
}

async fn measure(host: &HostProcess, shape: Shape) -> anyhow::Result<Figures> {
    let pid = host.pid().context("the host is not running")?;
    let rss_start = crate::process::rss_mib(pid)?;
    let user = host.register("logins").await?;
    let conn = host.connect().await?;
    crate::iim_run::login(&conn, &user, "warm-up", SessionMode::SendOnly).await?;
    drop(conn);
    let rss_before = crate::process::rss_mib(pid)?;
    eprintln!(
        "logins: host at {rss_before:.1} MiB after the warm-up; {} logins, {} at a time",
        shape.logins, shape.concurrency
    );

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn(crate::process::peak_rss_mib(
        pid,
        SAMPLE,
        Arc::clone(&sampling),
    ));
    let tally = Arc::new(Tally::default());
    let workers = shape.concurrency.min(shape.logins).max(1);
    let start = Arc::new(Barrier::new(workers as usize));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for worker in 0..workers {
        let job = Worker {
            index: worker,
            host: host.client_config()?,
            user: user.clone(),
            device: DeviceId::new(format!("bench-{worker}"))?,
            logins: shape.logins,
            tally: Arc::clone(&tally),
        };
        let start = Arc::clone(&start);
        tasks.spawn(async move { job.run(&start).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a login task failed")?;
    }
    let secs = started.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let rss_after = crate::process::rss_mib(pid)?;
    let rss_peak = sampler
        .await
        .context("the memory sampler failed")?
        .max(rss_after);

    let mut latencies = tally
        .latencies
        .lock()
        .map_err(|_| anyhow!("a login task panicked"))?
        .clone();
    latencies.sort_unstable_by(f64::total_cmp);
    let failed = tally
        .failed
        .lock()
        .map_err(|_| anyhow!("a login task panicked"))?
        .clone();
    let succeeded = u32::try_from(latencies.len())?;
    Ok(Figures {
        logins: shape.logins,
        concurrency: shape.concurrency,
        succeeded,
        refused_busy: tally.refused.load(Ordering::Relaxed),
        failed,
        secs,
        logins_per_s: f64::from(succeeded) / secs,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        longest_answer_ms: tally.longest_answer_us.load(Ordering::Relaxed) as f64 / 1000.0,
        rss_start_mib: rss_start,
        rss_before_mib: rss_before,
        rss_after_mib: rss_after,
        rss_peak_mib: rss_peak,
        growth_mib: rss_after - rss_before,
        ratio: rss_after / rss_before,
        max_growth_mib: shape.max_growth_mib,
    })
}

/// What the workers found.
#[derive(Default)]
struct Tally {
    /// The next login to take.
    next: AtomicU32,
    /// `rate_limited` refusals.
    refused: AtomicU64,
    /// The longest any login waited for its answer (success or refusal), in µs.
    longest_answer_us: AtomicU64,
    /// From the first attempt of each successful login to its success, in ms.
    latencies: std::sync::Mutex<Vec<f64>>,
    /// Failed logins by why.
    failed: std::sync::Mutex<BTreeMap<String, u32>>,
}

impl Tally {
    fn answered(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.longest_answer_us.fetch_max(us, Ordering::Relaxed);
    }

    fn logged_in(&self, took: Duration) {
        let mut latencies = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        latencies.push(took.as_secs_f64() * 1000.0);
    }

    fn fail(&self, why: String) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        *failed.entry(why).or_default() += 1;
    }
}

/// One of the `concurrency` loggers-in.
struct Worker {
    index: u32,
    host: iim_client::ClientConfig,
    user: UserId,
    device: DeviceId,
    logins: u32,
    tally: Arc<Tally>,
}

impl Worker {
    /// Takes logins until all are taken, each on a new connection; the first after every
    /// worker connected. A refused login waits as the host says and tries again on the same
    /// connection (a refusal leaves it open).
    async fn run(self, start: &Barrier) {
        let mut first = Some(start);
        // Spread over a second, as a client should, so that the logins refused together do
        // not all come back together.
        let jitter = Duration::from_millis(u64::from(self.index % 1000));
        while self.tally.next.fetch_add(1, Ordering::Relaxed) < self.logins {
            let connected = iim_client::Connection::connect(&self.host).await;
            if let Some(start) = first.take() {
                start.wait().await;
            }
            let conn = match connected {
                Ok(conn) => conn,
                Err(e) => {
                    self.tally.fail(format!("connecting: {}", why(&e)));
                    continue;
                }
            };
            let began = Instant::now();
            loop {
                let sent = Instant::now();
                let answer = conn
                    .login(
                        &self.user,
                        iim_e2e::PASSWORD,
                        &self.device,
                        SessionMode::SendOnly,
                    )
                    .await;
                self.tally.answered(sent.elapsed());
                match answer {
                    Ok(_) => break self.tally.logged_in(began.elapsed()),
                    Err(ClientError::Refused { code, message })
                        if code == ErrorCode::RATE_LIMITED =>
                    {
                        self.tally.refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(retry_after(&message) + jitter).await;
                    }
                    Err(e) => break self.tally.fail(format!("logging in: {}", why(&e))),
                }
            }
            // Dropping the connection closes it.
        }
        // A worker with no login to take still lets the others start.
        if let Some(start) = first {
            start.wait().await;
        }
    }
}

/// The kind of a failure, for the tally.
fn why(e: &ClientError) -> String {
    match e {
        ClientError::Connect { source, .. } => format!("no connection: {source}"),
        ClientError::Timeout(after) => format!("no answer within {} s", after.as_secs()),
        ClientError::ClosedByHost { code, message } => {
            format!("closed by the host: {code} ({message})")
        }
        ClientError::ConnectionLost(reason) => format!("connection lost: {reason}"),
        ClientError::Refused { code, .. } => format!("refused: {code}"),
        other => other.to_string(),
    }
}

/// The wait a `rate_limited` refusal names ("... try again in N s").
fn retry_after(message: &str) -> Duration {
    message
        .rsplit_once("try again in ")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .map_or(DEFAULT_RETRY, Duration::from_secs)
}

/// The nearest-rank percentile `p` (0..=1) of sorted values; 0 for none.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Prints the figures as a table.
pub fn print(f: &Figures) {
    println!(
        "{} password logins, {} at a time, each on a new connection",
        f.logins, f.concurrency
    );
    println!(
        "succeeded                      {:>10} ({:.1} logins/s over {:.1} s)",
        f.succeeded, f.logins_per_s, f.secs
    );
    println!(
        "logged in after                {:>10.1} ms p50, {:.1} ms p99 (waits included)",
        f.p50_ms, f.p99_ms
    );
    println!(
        "longest wait for an answer     {:>10.1} ms",
        f.longest_answer_ms
    );
    println!("refused as busy (tried again)  {:>10}", f.refused_busy);
    let failed: u32 = f.failed.values().sum();
    println!("failed otherwise               {failed:>10}");
    for (why, count) in &f.failed {
        println!("  {count:>6}  {why}");
    }
    println!(
        "host RSS at start              {:>10.1} MiB",
        f.rss_start_mib
    );
    println!(
        "host RSS before (baseline)     {:>10.1} MiB",
        f.rss_before_mib
    );
    println!(
        "host RSS after                 {:>10.1} MiB",
        f.rss_after_mib
    );
    println!(
        "host RSS peak                  {:>10.1} MiB",
        f.rss_peak_mib
    );
    println!(
        "growth after/before            {:>+10.1} MiB (ratio {:.3}; at most {} MiB)",
        f.growth_mib, f.ratio, f.max_growth_mib
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_is_read_from_the_refusal() {
        let message = "the host is busy checking passwords; try again in 3 s";
        assert_eq!(retry_after(message), Duration::from_secs(3));
        assert_eq!(retry_after("slow down"), DEFAULT_RETRY);
    }
}
