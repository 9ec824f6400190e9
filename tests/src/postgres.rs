//! Throwaway PostgreSQL clusters for the tests of the exchange's PostgreSQL store: each made
//! with `initdb` in a temporary directory and started with `pg_ctl` on a free port of
//! 127.0.0.1 (its Unix socket in that directory too), never the system's own cluster.
//!
//! PostgreSQL refuses to run as root; a test running as root runs its programs as the
//! `postgres` system user (which Debian's packages create), owner of the directory. The
//! programs are Debian's (`/usr/lib/postgresql/N/bin`, the newest N) unless `IIM_PG_BIN`
//! names a directory. A test that finds none says so and passes, unless
//! `IIM_POSTGRES_REQUIRED=1` (set by `.ci/run`) asks that it fail instead.

use anyhow::{Context, bail};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The superuser `initdb` makes, whom the tests connect as (trusted on loopback).
pub const SUPERUSER: &str = "iim";

/// Where PostgreSQL's programs are, if anywhere.
fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("IIM_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    newest.map(|(_, bin)| bin)
}

/// Whether clusters can be made here; if not, and `IIM_POSTGRES_REQUIRED` is not set, says why
/// on stderr (the test then passes without running).
pub fn available() -> anyhow::Result<bool> {
    if bin_dir().is_some() {
        return Ok(true);
    }
    let why = "PostgreSQL's programs are not installed (Debian: apt-get install postgresql; \
               or set IIM_PG_BIN to the directory of initdb and pg_ctl)";
    if std::env::var_os("IIM_POSTGRES_REQUIRED").is_some() {
        bail!("{why}");
    }
    eprintln!("skipped: {why}");
    Ok(false)
}

/// The user and group ids to run PostgreSQL's programs as: `postgres`'s when this process is
/// root, none (this process's own) otherwise.
fn run_as() -> anyhow::Result<Option<(u32, u32)>> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no effective user id in /proc/self/status")?;
    if euid != "0" {
        return Ok(None);
    }
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        if !out.status.success() {
            bail!(
                "running as root, and there is no `postgres` user to run PostgreSQL as \
                 (Debian's postgresql package creates it)"
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

/// One PostgreSQL cluster, stopped (immediately) and removed when dropped.
#[derive(Debug)]
pub struct Cluster {
    /// The temporary directory: `data/`, the server's `log` and its socket.
    dir: PathBuf,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    port: u16,
    running: bool,
}

impl Cluster {
    /// A new cluster, started, with `settings` (`name=value`) given to the server on its
    /// command line. Durable as a production one (`fsync` on), since the failover tests
    /// count on what was committed.
    pub fn start(settings: &[&str]) -> anyhow::Result<Self> {
        let mut cluster = Self::empty("pg")?;
        let mut initdb = cluster.command("initdb");
        initdb.arg("-D").arg(cluster.data()).args([
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]);
        run(initdb, "initdb")?;
        cluster.start_server(settings)?;
        Ok(cluster)
    }

    /// A streaming standby of `primary`, copied from it with `pg_basebackup` and started;
    /// it names itself `name` to the primary, whose `synchronous_standby_names` may list it.
    pub fn start_standby(primary: &Cluster, name: &str) -> anyhow::Result<Self> {
        let mut cluster = Self::empty(name)?;
        let mut copy = cluster.command("pg_basebackup");
        copy.arg("-D")
            .arg(cluster.data())
            .arg("-d")
            .arg(format!(
                "host=127.0.0.1 port={} user={SUPERUSER} application_name={name}",
                primary.port
            ))
            .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"]);
        run(copy, "pg_basebackup")?;
        cluster.start_server(&[])?;
        Ok(cluster)
    }

    /// Makes a standby the primary (`pg_ctl promote`), waiting until it takes writes.
    pub fn promote(&self) -> anyhow::Result<()> {
        let mut promote = self.command("pg_ctl");
        promote
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "30", "promote"]);
        run(promote, "pg_ctl promote")
    }

    /// The connection string for every one of `clusters`, to whichever takes writes.
    pub fn url_of_writable(clusters: &[&Cluster]) -> String {
        let ports: Vec<String> = clusters.iter().map(|c| c.port.to_string()).collect();
        let hosts = vec!["127.0.0.1"; clusters.len()].join(",");
        format!(
            "host={hosts} port={} user={SUPERUSER} dbname=postgres \
             target_session_attrs=read-write connect_timeout=5",
            ports.join(",")
        )
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its connection string (libpq's key=value form), for database `postgres`.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname=postgres",
            self.port
        )
    }

    /// A client connected to it, its connection driven by a task of its own.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connect to the cluster on port {}", self.port))?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Stops the server: `mode` is `pg_ctl`'s (`fast`, or `immediate`: as if it crashed).
    pub fn stop(&mut self, mode: &str) -> anyhow::Result<()> {
        if !self.running {
            return Ok(());
        }
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "30", "-m", mode, "stop"]);
        run(stop, "pg_ctl stop")?;
        self.running = false;
        Ok(())
    }

    /// The server's log so far, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn empty(tag: &str) -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let bin = bin_dir().context("PostgreSQL's programs are not installed")?;
        let run_as = run_as()?;
        // Short: the socket's path must fit in about 100 bytes.
        let dir = std::env::temp_dir().join(format!(
            "iim-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .with_context(|| format!("give {} to postgres", dir.display()))?;
        }
        Ok(Self {
            dir,
            bin,
            run_as,
            port: 0,
            running: false,
        })
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
            // Root's home is closed to postgres.
            command.env("HOME", std::env::temp_dir());
        }
        for var in ["PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE"] {
            command.env_remove(var);
        }
        command
    }

    /// Starts the server on a free port; tried again on another if the port was taken
    /// between finding it free and the server binding it.
    fn start_server(&mut self, settings: &[&str]) -> anyhow::Result<()> {
        let mut failure = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let mut options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1",
                self.dir.display()
            );
            for setting in settings {
                options.push_str(" -c ");
                options.push_str(setting);
            }
            let mut start = self.command("pg_ctl");
            start
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("log"))
                .args(["-w", "-t", "30", "-o", &options, "start"]);
            let out = start.output().context("cannot run pg_ctl")?;
            if out.status.success() {
                self.port = port;
                self.running = true;
                return Ok(());
            }
            failure = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        bail!("pg_ctl start failed five times: {failure}\n{}", self.log())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop("immediate");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `command`, failing with what it printed.
fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
