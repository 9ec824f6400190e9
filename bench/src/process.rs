//! What `/proc` says about a process: its resident memory (`VmRSS` in `/proc/<pid>/status`),
//! read once or sampled for its peak, and the CPU time its threads used.

use anyhow::Context;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The resident memory of process `pid`, in MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))?;
    Ok(kib / 1024.0)
}

/// The highest resident memory of `pid` sampled `every` so often until `sampling` turns
/// false, in MiB.
pub async fn peak_rss_mib(pid: u32, every: Duration, sampling: Arc<AtomicBool>) -> f64 {
    let mut peak: f64 = 0.0;
    while sampling.load(Ordering::Relaxed) {
        if let Ok(rss) = rss_mib(pid) {
            peak = peak.max(rss);
        }
        tokio::time::sleep(every).await;
    }
    peak
}

/// The CPU time the live threads of process `pid` (`"self"`: this one) have used, in s: the
/// sum of the first field of `/proc/<pid>/task/*/schedstat` (nanoseconds on a CPU), finer
/// than the clock ticks of `/proc/<pid>/stat`. Threads that ended are not counted: compare
/// two readings over a span in which no thread ends.
pub fn cpu_secs(pid: &str) -> anyhow::Result<f64> {
    let dir = format!("/proc/{pid}/task");
    let mut ns = 0u64;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the reading.
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|on_cpu| on_cpu.parse::<u64>().ok())
            .with_context(|| format!("no time on a CPU in {}", path.display()))?;
    }
    Ok(ns as f64 / 1e9)
}
