//! Who of this profile's processes holds the device's deliveries.
//!
//! The host gives a device one delivery session: a second one replaces the first
//! (`session_replaced`). `iim group` needs one for a moment, to receive the groups plugin's
//! answer, and so takes them from an `iim listen` of the same profile. This file lock in the
//! profile directory lets the listener tell that moment from another listener taking over for
//! good: a group command holds the lock (`DeliveryLock`) from before it connects until its
//! connection is closed, and marks the file each time it connects; a listener that loses its
//! session while the lock is held, or just after the file was marked
//! ([`taken_by_a_command`]), waits for the lock to be free ([`released`]) and connects again.
//! The host keeps what the command did not acknowledge, so the listener gets it then.

use anyhow::{Context, bail};
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The lock's file in the profile directory.
const LOCK_FILE: &str = "deliveries.lock";

/// How often a waiting process tries the lock again. A flock cannot be waited for without a
/// thread that cannot be cancelled, and these waits are short.
const POLL: Duration = Duration::from_millis(50);

/// How long after a command marked the file a lost session is taken to be its doing: a
/// listener hears of the replacement within a round trip of the command connecting, even if
/// the command has finished since.
const RECENTLY: Duration = Duration::from_secs(10);

/// `--timeout SECS`: how long a command that asks a plugin waits for its answer.
#[derive(Debug, Clone, Copy, clap::Args)]
pub(crate) struct AnswerTimeout {
    /// Seconds to wait for the plugin's answer.
    #[arg(
        long = "timeout",
        value_name = "SECS",
        default_value_t = 10,
        global = true,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    secs: u64,
}

impl AnswerTimeout {
    /// The wait.
    pub(crate) fn duration(self) -> Duration {
        Duration::from_secs(self.secs)
    }
}

/// The profile's deliveries, held by a group command until dropped (after its connection is
/// closed).
pub(crate) struct DeliveryLock {
    file: File,
}

impl DeliveryLock {
    /// Takes the lock of profile directory `dir`, waiting while another command of the
    /// profile holds it, until `deadline`.
    pub(crate) async fn take(dir: &Path, deadline: Instant) -> anyhow::Result<Self> {
        let path = lock_path(dir);
        let file = open(&path)?;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { file }),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    tokio::time::sleep(POLL).await;
                }
                Err(TryLockError::WouldBlock) => bail!(
                    "another iim command of this profile is still waiting for an answer \
                     (it holds {})",
                    path.display()
                ),
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()));
                }
            }
        }
    }

    /// Marks the file, just before connecting: the listener this connection replaces learns
    /// that a command did it, however soon the command is done.
    pub(crate) fn mark(&self) -> anyhow::Result<()> {
        self.file
            .set_modified(SystemTime::now())
            .context("cannot mark the deliveries lock")
    }
}

/// Whether the delivery session that profile directory `dir`'s device just lost was taken by
/// an iim command of the profile: the lock is held, or was marked moments ago.
pub(crate) fn taken_by_a_command(dir: &Path) -> bool {
    let Ok(file) = File::open(lock_path(dir)) else {
        // No command of this profile ever took the deliveries.
        return false;
    };
    if matches!(file.try_lock(), Err(TryLockError::WouldBlock)) {
        return true;
    }
    file.metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|marked| SystemTime::now().duration_since(marked).ok())
        .is_some_and(|ago| ago < RECENTLY)
}

/// Waits until no command of profile directory `dir` holds the lock.
pub(crate) async fn released(dir: &Path) {
    let Ok(file) = File::open(lock_path(dir)) else {
        return;
    };
    // Held for an instant and let go at once: the listener only needs the command gone. An
    // error other than "held" is not worth waiting for.
    while matches!(file.try_lock(), Err(TryLockError::WouldBlock)) {
        tokio::time::sleep(POLL).await;
    }
}

fn lock_path(dir: &Path) -> PathBuf {
    dir.join(LOCK_FILE)
}

fn open(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_or_freshly_marked_lock_means_a_command_took_the_deliveries() {
        let dir = tempfile::tempdir().expect("dir");
        assert!(!taken_by_a_command(dir.path()), "no lock file yet");
        let deadline = Instant::now() + Duration::from_secs(5);
        let lock = DeliveryLock::take(dir.path(), deadline)
            .await
            .expect("lock");
        assert!(taken_by_a_command(dir.path()), "held");
        // A second command waits for it, and gives up at its deadline.
        let soon = Instant::now() + Duration::from_millis(120);
        let second = DeliveryLock::take(dir.path(), soon).await;
        assert!(second.is_err(), "taken twice");

        // Let go just now: still the command's doing.
        lock.mark().expect("mark");
        drop(lock);
        released(dir.path()).await;
        assert!(taken_by_a_command(dir.path()), "marked moments ago");

        // Long ago: something else took the deliveries.
        let old = SystemTime::now() - RECENTLY * 2;
        open(&lock_path(dir.path()))
            .and_then(|f| Ok(f.set_modified(old)?))
            .expect("age the file");
        assert!(!taken_by_a_command(dir.path()));
    }
}
