//! Time as the host tells it: wall-clock milliseconds for what is stored and sent, and the
//! ticks of its periodic tasks.

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The ticks of a task the host runs every `period` until it shuts down.
pub struct Ticks {
    interval: tokio::time::Interval,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Ticks {
    /// Ticks every `period` (the first at once), late ticks delayed rather than bunched, until
    /// `shutdown` becomes true.
    pub fn new(shutdown: tokio::sync::watch::Receiver<bool>, period: std::time::Duration) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { interval, shutdown }
    }

    /// Waits for the next tick: `false` once the host is shutting down.
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.interval.tick() => true,
            _ = self.shutdown.wait_for(|stopping| *stopping) => false,
        }
    }
}
