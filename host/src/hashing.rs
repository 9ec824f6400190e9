//! The password hashers: `limits.max_hashing` threads that hash and check passwords, each in
//! its own argon2 memory, behind a queue of `limits.hashing_queue`.
//!
//! Why threads of their own rather than tokio's blocking pool: a hash needs 19 MiB. On the
//! blocking pool (up to 512 threads) a burst of logins ran hundreds of hashes at once, each
//! thread taking its 19 MiB from its own malloc arena, which kept it afterwards: the host's
//! memory grew by about 10 MB per login, to gigabytes, and was never returned. Here each
//! hasher is given its [`HashMemory`] once, when it starts, and reuses it for every hash, so
//! the memory passwords take is `max_hashing` × 19 MiB, whatever the load.
//!
//! Why a bounded queue: the hashers get through a fixed number of hashes a second (tens per
//! core). A burst larger than they can finish in a few seconds would leave the last of its
//! logins waiting past the client's patience (30 s by default for an answer), and their
//! connections would end without an answer. A hash that would wait behind a full queue is
//! refused at once instead ([`HashingError::Busy`]), with an estimate of when to try again.

use crate::accounts::{HashMemory, PasswordError};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Why a hash or check was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashingError {
    /// Every hasher is busy and the queue is full: the asker should try again later.
    #[error(
        "the host is busy checking passwords; try again in {} s",
        retry_after.as_secs()
    )]
    Busy {
        /// About when the hashers will have got through what is queued now.
        retry_after: Duration,
    },
    /// The hashers are gone (the host is stopping) or failed on this job.
    #[error("password hashing failed")]
    Failed,
}

/// A job for a hasher: does its work in the hasher's memory and answers its asker, unless the
/// asker is gone. Returns whether it hashed anything.
type Job = Box<dyn FnOnce(&mut HashMemory) -> bool + Send>;

/// What the askers and the hashers share.
struct Load {
    /// Jobs taken and not finished (queued or being worked on).
    pending: AtomicUsize,
    /// The recent mean time of one hash, in microseconds.
    mean_us: AtomicU64,
}

/// What one hash is taken to cost until the first is measured: argon2id with 19 MiB and 2
/// passes takes 20–50 ms of a core.
const FIRST_GUESS: Duration = Duration::from_millis(50);

impl Load {
    /// Records a hash that took `took`: a moving mean with weight 1/8 on the newest.
    fn record(&self, took: Duration) {
        let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let old = self.mean_us.load(Ordering::Relaxed);
        let new = old - old / 8 + took / 8;
        self.mean_us.store(new, Ordering::Relaxed);
    }
}

/// The pool of hashing threads and its queue.
pub struct PasswordHashers {
    jobs: SyncSender<Job>,
    load: Arc<Load>,
    threads: usize,
}

impl PasswordHashers {
    /// Starts `threads` hashers (at least one), each allocating its memory as it starts, and a
    /// queue of `queue` jobs in front of them (0: a job is taken only if a hasher is free).
    pub fn start(threads: usize, queue: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let load = Arc::new(Load {
            pending: AtomicUsize::new(0),
            mean_us: AtomicU64::new(u64::try_from(FIRST_GUESS.as_micros()).unwrap_or(0)),
        });
        for i in 0..threads {
            let (rx, load) = (Arc::clone(&rx), Arc::clone(&load));
            // Allocated by the hasher at once, not when its first job comes: the host's memory
            // is what it stays from its first moments on. Not here, where filling tens of MiB
            // would hold up the host's start (and a restart's first login).
            std::thread::Builder::new()
                .name(format!("iim-hasher-{i}"))
                .spawn(move || hasher(HashMemory::new(), &rx, &load))?;
        }
        Ok(Self {
            jobs,
            load,
            threads,
        })
    }

    /// Hashes `password` for storage (after checking it against the password rules).
    pub async fn hash(
        &self,
        password: String,
    ) -> Result<Result<String, PasswordError>, HashingError> {
        self.run(move |memory| memory.hash(&password)).await
    }

    /// Whether `password` matches the stored `hash`.
    pub async fn verify(&self, hash: String, password: String) -> Result<bool, HashingError> {
        self.run(move |memory| memory.verify(&hash, &password))
            .await
    }

    /// Runs `work` on a hasher, or refuses it at once if the queue is full.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut HashMemory) -> T + Send + 'static,
    ) -> Result<T, HashingError> {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |memory| {
            // An asker that went away (its connection closed while it waited) costs no hash.
            if answer.is_closed() {
                return false;
            }
            let _ = answer.send(work(memory));
            true
        });
        let waiting = self.load.pending.fetch_add(1, Ordering::Relaxed);
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.load.pending.fetch_sub(1, Ordering::Relaxed);
                return Err(HashingError::Busy {
                    retry_after: self.retry_after(waiting),
                });
            }
            Err(TrySendError::Disconnected(_)) => {
                self.load.pending.fetch_sub(1, Ordering::Relaxed);
                return Err(HashingError::Failed);
            }
        }
        // Dropped unanswered only if the job panicked (or the hashers are gone).
        answered.await.map_err(|_| HashingError::Failed)
    }

    /// About how long the hashers take to get through `waiting` jobs: when a refused asker
    /// may find room. Whole seconds, at least one, as the client is told. (Telling each asker
    /// of a burst its own turn instead, one hash apart, was tried: each was refused only once,
    /// but the hashers idled between turns, and the burst took a fifth longer to log in.)
    fn retry_after(&self, waiting: usize) -> Duration {
        let mean = Duration::from_micros(self.load.mean_us.load(Ordering::Relaxed));
        let rounds = u32::try_from(waiting.div_ceil(self.threads)).unwrap_or(u32::MAX);
        Duration::from_secs(mean.saturating_mul(rounds).as_secs_f64().ceil().max(1.0) as u64)
    }
}

/// A hasher: takes jobs until the pool is dropped, all in its one `memory`.
fn hasher(mut memory: HashMemory, jobs: &Mutex<Receiver<Job>>, load: &Load) {
    loop {
        // The lock is held while waiting: the other hashers wait for it instead of the
        // channel, which comes to the same.
        let job = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = job else {
            return;
        };
        let started = Instant::now();
        // A job that panics loses its answer (its asker is told the hashing failed), not the
        // hasher.
        match std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut memory))) {
            Ok(true) => load.record(started.elapsed()),
            Ok(false) => {}
            Err(_) => tracing::error!("a password hashing job panicked"),
        }
        load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_and_checks() {
        let hashers = PasswordHashers::start(2, 4).expect("start");
        let hash = hashers
            .hash("correct horse".into())
            .await
            .expect("hashed")
            .expect("valid password");
        assert!(hashers.verify(hash.clone(), "correct horse".into()).await == Ok(true));
        assert!(hashers.verify(hash, "wrong horse".into()).await == Ok(false));
        assert_eq!(
            hashers.hash("short".into()).await,
            Ok(Err(PasswordError::TooShort))
        );
    }

    /// With the one hasher busy and the queue full, the next job is refused at once; the
    /// queued one still runs.
    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let hashers = Arc::new(PasswordHashers::start(1, 1).expect("start"));
        let (started, on_start) = oneshot::channel();
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let busy = {
            let hashers = Arc::clone(&hashers);
            tokio::spawn(async move {
                hashers
                    .run(move |_| {
                        let _ = started.send(());
                        let _ = gate.recv();
                        "first"
                    })
                    .await
            })
        };
        on_start.await.expect("the hasher took the first job");
        let queued = {
            let hashers = Arc::clone(&hashers);
            tokio::spawn(async move { hashers.run(|_| "second").await })
        };
        // Queued (not refused) once the count of pending jobs shows it.
        while hashers.load.pending.load(Ordering::Relaxed) < 2 {
            tokio::task::yield_now().await;
        }
        match hashers.run(|_| "third").await {
            Err(HashingError::Busy { retry_after }) => {
                assert!(retry_after >= Duration::from_secs(1), "{retry_after:?}");
            }
            other => panic!("expected Busy, got {other:?}"),
        }
        release.send(()).expect("release");
        assert_eq!(busy.await.expect("task"), Ok("first"));
        assert_eq!(queued.await.expect("task"), Ok("second"));
        // The hasher counts a job done just after it answered: the count comes back to 0.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while hashers.load.pending.load(Ordering::Relaxed) != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "pending jobs stay counted"
            );
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn the_wait_is_estimated_from_the_mean_hash() {
        let hashers = PasswordHashers::start(4, 0).expect("start");
        hashers.load.mean_us.store(40_000, Ordering::Relaxed);
        assert_eq!(hashers.retry_after(0), Duration::from_secs(1));
        // 100 jobs on 4 hashers: 25 rounds of 40 ms.
        assert_eq!(hashers.retry_after(100), Duration::from_secs(1));
        assert_eq!(hashers.retry_after(101), Duration::from_secs(2));
        assert_eq!(hashers.retry_after(400), Duration::from_secs(4));
    }
}
