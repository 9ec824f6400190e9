//! What a host (or an exchange) counts, and the HTTP endpoint that serves it (DESIGN.md §9):
//! `GET /metrics` in the Prometheus/OpenMetrics text format, `/healthz` and `/readyz`.
//!
//! The counters are one process-wide [`Metrics`] ([`metrics`]): a process runs one host or one
//! exchange, and the modules that count (the store's flusher, the plugin lanes, the sessions)
//! are far apart and below the host's state, so a global spares threading a handle through
//! all of them, as the metrics facades of other servers do. The types and the text format are
//! `prometheus-client`'s; this module only names the metrics and serves them. Gauges that are
//! cheaper to read than to keep (relay outboxes, devices online) are set just before each
//! scrape by the process's [`Observed`].
//!
//! The endpoint is plain HTTP/1.1, off unless `--metrics ADDR` (or `[metrics] listen`) is
//! given; it shows no user's name or message, but should still listen only where the scraper
//! can reach it (loopback, or a private network).

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// A label set of one label (`plugin`, `peer`, `outcome`, ...).
type Label = [(&'static str, String); 1];

/// A histogram's buckets: seconds from 10 µs to about 10 s, doubling.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 2.0, 21))
}

/// Everything the process counts. Counters only grow; gauges are what is now.
pub struct Metrics {
    registry: Registry,
    /// Open client connections.
    pub connections: Gauge,
    /// Devices with a delivery session (set at each scrape).
    pub devices_online: Gauge,
    /// Submissions answered, by outcome (`accepted`, `refused`).
    pub submissions: Family<Label, Counter>,
    /// Messages appended to an inbox (one per recipient user).
    pub inbox_appends: Counter,
    /// Inbox entries that still hold their message: not yet acknowledged by every device of
    /// their user, nor expired (counted at start, then kept).
    pub inbox_waiting: Gauge,
    /// Deliveries sent to devices, first sendings.
    pub deliveries: Counter,
    /// Deliveries sent again because no acknowledgement came in time.
    pub redeliveries: Counter,
    /// Deliveries devices acknowledged.
    pub acks: Counter,
    /// Inbox entries taken out because their time ran out.
    pub expired: Counter,
    /// Callers each store commit made durable (submissions' flushes and others').
    pub commit_round_size: Histogram,
    /// Time of a store commit: sled's log flushed and synced.
    pub commit_seconds: Histogram,
    /// Time of the fsync of a commit alone.
    pub fsync_seconds: Histogram,
    /// Plugin calls (events handled or tried), by plugin.
    pub plugin_calls: Family<Label, Counter>,
    /// Time of each plugin call, by plugin.
    pub plugin_call_seconds: Family<Label, Histogram, fn() -> Histogram>,
    /// Plugin calls that failed (a trap, an error, a limit), by plugin.
    pub plugin_failures: Family<Label, Counter>,
    /// Events set aside as dead letters, by plugin.
    pub plugin_dead_letters: Family<Label, Counter>,
    /// Envelopes waiting to be relayed, by peer: a host's to its exchange, an exchange's to
    /// each host (set at each scrape).
    pub relay_waiting: Family<Label, Gauge>,
    /// Whether this host is joined to its network's exchange now (1) or not (0); absent
    /// without a network.
    pub exchange_connected: Gauge,
    /// File transfers finished, by direction (`upload`, `download`).
    pub file_transfers: Family<Label, Counter>,
    /// Bytes of files received and sent, by direction.
    pub file_bytes: Family<Label, Counter>,
    /// CPU time the host's threads spent in each part of the message path, by part: `store`
    /// (the message path's records: accepting, appending, acknowledging, reading inboxes),
    /// `plugin` (calls into plugins, with the imports they call), `frames` (a session
    /// decoding and handling what its client sent, and encoding what it sends); see
    /// [`Busy`] (timed only while an endpoint serves them, in a sample of the sections). What
    /// the process's CPU time ([`Metrics::cpu_seconds`]) has beyond their sum is QUIC, TLS,
    /// the store's commits, scheduling and the rest.
    pub busy: Family<Label, Seconds>,
    /// `busy{part="store"}`.
    pub busy_store: Seconds,
    /// `busy{part="plugin"}`.
    pub busy_plugin: Seconds,
    /// `busy{part="frames"}`.
    pub busy_frames: Seconds,
    /// CPU time of the process, user and system (brought up to date at each scrape).
    pub cpu_seconds: Seconds,
}

/// A counter of seconds.
pub type Seconds = Counter<f64, AtomicU64>;

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("iim");
        let m = Self {
            registry: Registry::default(),
            connections: Gauge::default(),
            devices_online: Gauge::default(),
            submissions: Family::default(),
            inbox_appends: Counter::default(),
            inbox_waiting: Gauge::default(),
            deliveries: Counter::default(),
            redeliveries: Counter::default(),
            acks: Counter::default(),
            expired: Counter::default(),
            commit_round_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            commit_seconds: seconds(),
            fsync_seconds: seconds(),
            plugin_calls: Family::default(),
            plugin_call_seconds: Family::new_with_constructor(seconds),
            plugin_failures: Family::default(),
            plugin_dead_letters: Family::default(),
            relay_waiting: Family::default(),
            exchange_connected: Gauge::default(),
            file_transfers: Family::default(),
            file_bytes: Family::default(),
            busy: Family::default(),
            busy_store: Seconds::default(),
            busy_plugin: Seconds::default(),
            busy_frames: Seconds::default(),
            cpu_seconds: Seconds::default(),
        };
        let busy = |part| m.busy.get_or_create_owned(&label("part", part));
        let (busy_store, busy_plugin, busy_frames) =
            (busy("store"), busy("plugin"), busy("frames"));
        let r = &mut registry;
        r.register(
            "connections",
            "Open client connections",
            m.connections.clone(),
        );
        r.register(
            "devices_online",
            "Devices with a delivery session",
            m.devices_online.clone(),
        );
        r.register(
            "submissions",
            "Submissions answered, by outcome",
            m.submissions.clone(),
        );
        r.register(
            "inbox_appends",
            "Messages appended to an inbox, one per recipient user",
            m.inbox_appends.clone(),
        );
        r.register(
            "inbox_waiting",
            "Inbox entries not yet acknowledged by every device of their user nor expired",
            m.inbox_waiting.clone(),
        );
        r.register(
            "deliveries",
            "Deliveries sent to devices (first sendings)",
            m.deliveries.clone(),
        );
        r.register(
            "redeliveries",
            "Deliveries sent again for want of an acknowledgement",
            m.redeliveries.clone(),
        );
        r.register("acks", "Deliveries devices acknowledged", m.acks.clone());
        r.register(
            "expired",
            "Inbox entries taken out because their time ran out",
            m.expired.clone(),
        );
        r.register(
            "commit_round_size",
            "Callers made durable by one store commit",
            m.commit_round_size.clone(),
        );
        r.register_with_unit(
            "commit",
            "Time of a store commit (log flushed and synced)",
            Unit::Seconds,
            m.commit_seconds.clone(),
        );
        r.register_with_unit(
            "fsync",
            "Time of the fsync of a store commit",
            Unit::Seconds,
            m.fsync_seconds.clone(),
        );
        r.register(
            "plugin_calls",
            "Plugin calls, by plugin",
            m.plugin_calls.clone(),
        );
        r.register_with_unit(
            "plugin_call",
            "Time of a plugin call, by plugin",
            Unit::Seconds,
            m.plugin_call_seconds.clone(),
        );
        r.register(
            "plugin_failures",
            "Plugin calls that failed (trap, error, limit), by plugin",
            m.plugin_failures.clone(),
        );
        r.register(
            "plugin_dead_letters",
            "Events set aside as dead letters, by plugin",
            m.plugin_dead_letters.clone(),
        );
        r.register(
            "relay_waiting",
            "Envelopes waiting to be relayed, by peer",
            m.relay_waiting.clone(),
        );
        r.register(
            "exchange_connected",
            "Whether the host is joined to its exchange now",
            m.exchange_connected.clone(),
        );
        r.register(
            "file_transfers",
            "File transfers finished, by direction",
            m.file_transfers.clone(),
        );
        r.register_with_unit(
            "file",
            "Bytes of files received and sent, by direction",
            Unit::Bytes,
            m.file_bytes.clone(),
        );
        r.register_with_unit(
            "busy",
            "Time spent in each part of the message path, by part",
            Unit::Seconds,
            m.busy.clone(),
        );
        r.register_with_unit(
            "cpu",
            "CPU time of the process, user and system",
            Unit::Seconds,
            m.cpu_seconds.clone(),
        );
        Self {
            registry,
            busy_store,
            busy_plugin,
            busy_frames,
            ..m
        }
    }

    /// Brings the process's CPU time up to date.
    fn refresh_cpu(&self) {
        use nix::sys::resource::{UsageWho, getrusage};
        let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) else {
            return;
        };
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        let total = secs(usage.user_time()) + secs(usage.system_time());
        // Scrapes may overlap: the counter only grows.
        let seen = self.cpu_seconds.get();
        if total > seen {
            self.cpu_seconds.inc_by(total - seen);
        }
    }

    /// The counters in the text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// The label set `[(name, value)]`.
pub fn label(name: &'static str, value: impl Into<String>) -> Label {
    [(name, value.into())]
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Counts the CPU time of the calling thread from now until it is dropped into a counter of
/// seconds: a part of the message path ([`Metrics::busy`]). CPU time rather than wall time,
/// so that waiting for a lock or for a core is not counted; a section that ends on another
/// thread than it started on (an `await` in it moved the task) counts its wall time instead.
///
/// One section in [`SAMPLED`], chosen at random, is timed and counted [`SAMPLED`] times: a
/// thread's CPU clock is a system call (not a vDSO read), and reading it twice in each of the
/// several sections of every message cost about 10 of the host's 36 µs per message under
/// load (`iim-bench`). Over the thousands of sections of a second the estimate is close; it
/// is unbiased whatever the order the sections come in.
pub struct Busy(Option<Section>);

/// One section in this many is timed.
const SAMPLED: u32 = 16;

/// A section being timed.
struct Section {
    counter: &'static Seconds,
    thread: std::thread::ThreadId,
    cpu: Option<Duration>,
    wall: std::time::Instant,
}

impl Busy {
    /// Starts timing into `part` (one of [`Metrics`]' `busy_*`) if this section is one of the
    /// sampled ones; times nothing (no clock read) unless the process serves its metrics.
    pub fn start(part: fn(&'static Metrics) -> &'static Seconds) -> Self {
        if !SERVED.load(Ordering::Relaxed) || !sampled() {
            return Self(None);
        }
        Self(Some(Section {
            counter: part(metrics()),
            thread: std::thread::current().id(),
            cpu: thread_cpu(),
            wall: std::time::Instant::now(),
        }))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let Some(section) = &self.0 else {
            return;
        };
        let same_thread = std::thread::current().id() == section.thread;
        let spent = match (same_thread, section.cpu, thread_cpu()) {
            (true, Some(start), Some(end)) => end.saturating_sub(start),
            _ => section.wall.elapsed(),
        };
        section
            .counter
            .inc_by(spent.as_secs_f64() * f64::from(SAMPLED));
    }
}

/// Whether the section starting now is timed: true once in [`SAMPLED`] calls on a thread,
/// at random (a xorshift generator per thread, seeded by std's `RandomState`).
fn sampled() -> bool {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one(std::thread::current().id()) | 1
        });
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x % u64::from(SAMPLED) == 0
    })
}

/// Whether an [`Endpoint`] serves the metrics: only then are the `busy` parts timed.
static SERVED: AtomicBool = AtomicBool::new(false);

/// The CPU time the calling thread has used.
fn thread_cpu() -> Option<Duration> {
    use nix::time::{ClockId, clock_gettime};
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
    Some(Duration::new(
        u64::try_from(t.tv_sec()).ok()?,
        u32::try_from(t.tv_nsec()).ok()?,
    ))
}

/// Times `f` into `histogram`.
pub fn timed<T>(histogram: &Histogram, f: impl FnOnce() -> T) -> T {
    let start = std::time::Instant::now();
    let value = f();
    histogram.observe(start.elapsed().as_secs_f64());
    value
}

/// What the endpoint asks of the process it serves.
pub trait Observed: Send + Sync + 'static {
    /// Sets the gauges read at each scrape (it may ask a database).
    fn refresh<'a>(&'a self, metrics: &'a Metrics) -> Refreshing<'a>;
    /// `Ok` while it takes traffic, once serving; else why not (answered with 503).
    fn readiness(&self) -> Result<(), String>;
}

/// What [`Observed::refresh`] returns: done once the gauges are set.
pub type Refreshing<'a> = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The readiness of a process whose shutdown signal is `shutdown`: ready until it stops.
pub fn until_shutdown(shutdown: &tokio::sync::watch::Receiver<bool>) -> Result<(), String> {
    match *shutdown.borrow() {
        true => Err("shutting down".into()),
        false => Ok(()),
    }
}

/// A failure to start the endpoint.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct ListenError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// The running endpoint; dropping it stops it.
pub struct Endpoint {
    addr: SocketAddr,
    serving: Arc<AtomicBool>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Endpoint {
    /// Binds the endpoint to `addr` (port 0: any free one) and serves it on the runtime
    /// until dropped. `/readyz` answers 503 until [`Endpoint::serving`] says otherwise.
    pub async fn start(addr: SocketAddr, observed: Arc<dyn Observed>) -> Result<Self, ListenError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ListenError { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ListenError { addr, source })?;
        SERVED.store(true, Ordering::Relaxed);
        let serving = Arc::new(AtomicBool::new(false));
        let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
        let state = Arc::new(State {
            observed,
            serving: Arc::clone(&serving),
        });
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = &mut stop => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        // Out of file descriptors and the like: wait a little rather than spin.
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics endpoint: cannot accept");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = Arc::clone(&state);
                        let (method, path) =
                            (request.method().clone(), request.uri().path().to_owned());
                        async move {
                            Ok::<_, std::convert::Infallible>(state.answer(&method, &path).await)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(io, service);
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "metrics endpoint: connection ended");
                    }
                });
            }
        });
        Ok(Self {
            addr: local,
            serving,
            _stop: stop_tx,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the process takes traffic now (it started serving and is not stopping).
    pub fn serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }
}

/// What the endpoint's connections share.
struct State {
    observed: Arc<dyn Observed>,
    serving: Arc<AtomicBool>,
}

impl State {
    /// The answer to one request.
    async fn answer(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n".into());
        }
        match path {
            "/metrics" => {
                let metrics = metrics();
                metrics.refresh_cpu();
                self.observed.refresh(metrics).await;
                reply(StatusCode::OK, OPENMETRICS, metrics.encode())
            }
            // Alive: the runtime answers.
            "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" => {
                let ready = match self.serving.load(Ordering::Relaxed) {
                    true => self.observed.readiness(),
                    false => Err("not serving: starting or stopping".into()),
                };
                match ready {
                    Ok(()) => reply(StatusCode::OK, TEXT, "ready\n".into()),
                    Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
                }
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                TEXT,
                "not found: /metrics, /healthz, /readyz\n".into(),
            ),
        }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_every_metric_with_its_prefix_and_labels() {
        let m = Metrics::new();
        m.submissions
            .get_or_create(&label("outcome", "accepted"))
            .inc();
        m.plugin_call_seconds
            .get_or_create(&label("plugin", "chat"))
            .observe(0.001);
        let text = m.encode();
        assert!(
            text.contains("iim_submissions_total{outcome=\"accepted\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("iim_plugin_call_seconds_count{plugin=\"chat\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE iim_commit_seconds histogram"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
