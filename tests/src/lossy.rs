//! A lossy UDP path for tests: a relay on 127.0.0.1 between clients and a host that drops,
//! duplicates and delays (hence reorders) datagrams in both directions, from a seed.
//!
//! Clients connect to [`LossyPath::addr`] instead of the host's address; each client address
//! gets its own socket towards the host, as if it came through its own lossy link.
//! [`LossyPath::rebind_all`] gives every client a new socket towards the host, as a phone's
//! address changes (or a NAT forgets its binding): the host's datagrams to the old one are lost.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;

/// What the path does to each datagram, as probabilities in `0.0..=1.0`.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// Dropped.
    pub loss: f64,
    /// Sent twice.
    pub duplicate: f64,
    /// Held back for `delay_ms` (a random time in it) before it goes on: it falls behind the
    /// datagrams sent after it.
    pub delay: f64,
    /// The range of a delay, in milliseconds.
    pub delay_ms: (u64, u64),
}

/// What the path did so far.
#[derive(Debug, Default)]
pub struct PathCounts {
    /// Datagrams that came in.
    pub seen: AtomicU64,
    /// Dropped.
    pub dropped: AtomicU64,
    /// Sent twice.
    pub duplicated: AtomicU64,
    /// Delayed.
    pub delayed: AtomicU64,
}

impl PathCounts {
    /// (seen, dropped, duplicated, delayed).
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.seen.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.duplicated.load(Ordering::Relaxed),
            self.delayed.load(Ordering::Relaxed),
        )
    }
}

/// The relay. Dropping it stops it.
pub struct LossyPath {
    addr: SocketAddr,
    counts: Arc<PathCounts>,
    /// Each client's socket towards the host.
    backs: Backs,
    task: tokio::task::JoinHandle<()>,
}

impl LossyPath {
    /// Starts a relay to `target` that impairs datagrams as `impairment` says, drawing from
    /// `seed`.
    pub async fn start(
        target: SocketAddr,
        impairment: Impairment,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let counts = Arc::new(PathCounts::default());
        let link = Link {
            impairment,
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed))),
            counts: Arc::clone(&counts),
        };
        let backs = Backs::default();
        let task = tokio::spawn(relay(front, target, link, backs.clone()));
        Ok(Self {
            addr,
            counts,
            backs,
            task,
        })
    }

    /// Returns once no datagram has come in either way for `quiet` (checked every 20 ms): the
    /// clients behind it are idle, with nothing of theirs left in flight.
    pub async fn quiet(&self, quiet: std::time::Duration) {
        let step = std::time::Duration::from_millis(20);
        let mut seen = self.counts.seen.load(Ordering::Relaxed);
        let mut still = std::time::Duration::ZERO;
        while still < quiet {
            tokio::time::sleep(step).await;
            let now = self.counts.seen.load(Ordering::Relaxed);
            if now == seen {
                still += step;
            } else {
                (seen, still) = (now, std::time::Duration::ZERO);
            }
        }
    }

    /// Every client's address towards the host changes, as a phone's does when it moves to
    /// another network: what a client sends next goes out through a new socket (the host sees
    /// a new address), and the old sockets are closed, so what the host still sends to them
    /// is lost until the host follows the client to its new address.
    pub fn rebind_all(&self) {
        // Dropped, each closes its socket and stops its task.
        self.backs.lock().clear();
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the path did so far.
    pub fn counts(&self) -> &PathCounts {
        &self.counts
    }
}

impl Drop for LossyPath {
    fn drop(&mut self) {
        self.task.abort();
        self.backs.lock().clear();
    }
}

/// The impairment of both directions, with its random source and counts.
#[derive(Clone)]
struct Link {
    impairment: Impairment,
    rng: Arc<Mutex<StdRng>>,
    counts: Arc<PathCounts>,
}

/// What to do with one datagram.
enum Fate {
    Drop,
    Send {
        copies: usize,
        delay: Option<Duration>,
    },
}

impl Link {
    fn fate(&self) -> Fate {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let i = self.impairment;
        self.counts.seen.fetch_add(1, Ordering::Relaxed);
        if rng.random_bool(i.loss) {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return Fate::Drop;
        }
        let copies = if rng.random_bool(i.duplicate) {
            self.counts.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        let delay = rng.random_bool(i.delay).then(|| {
            self.counts.delayed.fetch_add(1, Ordering::Relaxed);
            Duration::from_millis(rng.random_range(i.delay_ms.0..=i.delay_ms.1))
        });
        Fate::Send { copies, delay }
    }

    /// Sends `datagram` to `to` through `socket` as its fate says.
    fn pass(&self, socket: &Arc<UdpSocket>, datagram: Vec<u8>, to: SocketAddr) {
        match self.fate() {
            Fate::Drop => {}
            // Now, so that datagrams not held back keep their order. A full buffer is one
            // more loss.
            Fate::Send {
                copies,
                delay: None,
            } => {
                for _ in 0..copies {
                    let _ = socket.try_send_to(&datagram, to);
                }
            }
            Fate::Send {
                copies,
                delay: Some(delay),
            } => {
                let socket = Arc::clone(socket);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    for _ in 0..copies {
                        let _ = socket.try_send_to(&datagram, to);
                    }
                });
            }
        }
    }
}

/// One client's socket towards the host, and the task that carries what the host sends to it.
struct Back {
    socket: Arc<UdpSocket>,
    task: tokio::task::AbortHandle,
}

/// The clients' sockets towards the host, by client address.
#[derive(Clone, Default)]
struct Backs(Arc<Mutex<HashMap<SocketAddr, Back>>>);

impl Backs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Back>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Back {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Carries what clients send to the host, each client through a socket of its own (made at
/// its first datagram, and again after [`LossyPath::rebind_all`]); ends when aborted.
async fn relay(front: Arc<UdpSocket>, target: SocketAddr, link: Link, backs: Backs) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            return;
        };
        let current = backs
            .lock()
            .get(&client)
            .map(|back| Arc::clone(&back.socket));
        let back = match current {
            Some(back) => back,
            None => {
                let Ok(back) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if back.connect(target).await.is_err() {
                    continue;
                }
                let back = Arc::new(back);
                let task = tokio::spawn(relay_back(
                    Arc::clone(&back),
                    Arc::clone(&front),
                    client,
                    link.clone(),
                ));
                backs.lock().insert(
                    client,
                    Back {
                        socket: Arc::clone(&back),
                        task: task.abort_handle(),
                    },
                );
                back
            }
        };
        link.pass(&back, buf[..n].to_vec(), target);
    }
}

/// Carries what the host sends to `client`'s socket back to the client.
async fn relay_back(back: Arc<UdpSocket>, front: Arc<UdpSocket>, client: SocketAddr, link: Link) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok(n) = back.recv(&mut buf).await else {
            return;
        };
        link.pass(&front, buf[..n].to_vec(), client);
    }
}
